//! The built-in simulated tenant: a [`Fleet`] plus the policy configuration phasegate writes to
//! it, persisted in the store so that the simulated world survives restarts like a real tenant.
//!
//! Time is virtual. The tenant keeps its own clock, which only moves when the engine asks it to
//! jump to the next deadline, so a two-week rollout runs in well under a second. Tenants are keyed
//! by their settings (seed, size, half-life): rollouts with the same settings share one world.

pub mod fleet;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{PhaseScope, Provider, ProviderError};
use crate::domain::desired::DesiredState;
use crate::domain::gate::DeviceReport;
use crate::domain::plan::{Plan, PolicyTarget, SimulatorSettings};
use crate::domain::time::Timestamp;
use crate::store::{Store, StoreError, decode_json, encode_json};
pub use fleet::{ConfigEntry, Fleet, GROUPS, SimAssignment};

/// Simulated time starts on a Monday morning, the same for every tenant, so that runs with the
/// same seed are identical.
pub const SIMULATED_EPOCH: Timestamp = Timestamp::from_millis(1_767_600_000_000);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct TenantState {
    now: Option<Timestamp>,
    /// Per policy (`platform/name`), every configuration it has had, oldest first.
    policies: BTreeMap<String, Vec<ConfigEntry>>,
}

pub struct SimProvider {
    fleet: Fleet,
    tree: sled::Tree,
    key: String,
    state: TenantState,
}

impl SimProvider {
    pub fn open(settings: &SimulatorSettings, store: &Store) -> Result<SimProvider, StoreError> {
        let tree = store.provider_tree("simulator")?;
        let key = format!(
            "tenant/{}/{}/{}",
            settings.seed,
            settings.devices,
            settings.remediation_half_life.as_secs()
        );
        let state = match tree.get(key.as_bytes()).map_err(|e| StoreError::Database {
            path: store.path().to_path_buf(),
            message: e.to_string(),
        })? {
            Some(bytes) => decode_json(&format!("simulator/{key}"), &bytes)?,
            None => TenantState::default(),
        };
        let fleet = Fleet::new(
            settings.seed,
            settings.devices,
            settings.remediation_half_life,
            SIMULATED_EPOCH,
        );
        Ok(SimProvider {
            fleet,
            tree,
            key,
            state,
        })
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Every configuration the policy has had, oldest first (the simulated tenant's change log).
    pub fn history(&self, target: &PolicyTarget) -> &[ConfigEntry] {
        self.state
            .policies
            .get(&policy_key(target))
            .map_or(&[], Vec::as_slice)
    }

    fn persist(&self) -> Result<(), ProviderError> {
        let fail = |e: sled::Error| {
            ProviderError::permanent(format!("the simulated tenant could not be saved: {e}"))
        };
        self.tree
            .insert(self.key.as_bytes(), encode_json(&self.state))
            .map_err(fail)?;
        self.tree.flush().map_err(fail)?;
        Ok(())
    }

    fn current(&self, target: &PolicyTarget) -> Vec<SimAssignment> {
        self.history(target)
            .last()
            .map(|e| e.assignments.clone())
            .unwrap_or_default()
    }

    /// Makes `wanted` the policy's configuration; returns how many assignments changed.
    fn set(
        &mut self,
        target: &PolicyTarget,
        wanted: Vec<SimAssignment>,
    ) -> Result<u64, ProviderError> {
        for assignment in &wanted {
            fleet::membership(&assignment.include, &assignment.exclude).map_err(unknown_group)?;
        }
        let current = self.current(target);
        let changes = wanted.iter().filter(|a| !current.contains(a)).count()
            + current.iter().filter(|a| !wanted.contains(a)).count();
        if changes == 0 {
            return Ok(0);
        }
        let at = self.now();
        self.state
            .policies
            .entry(policy_key(target))
            .or_default()
            .push(ConfigEntry {
                at,
                assignments: wanted,
            });
        self.persist()?;
        Ok(changes as u64)
    }
}

fn policy_key(target: &PolicyTarget) -> String {
    format!("{}/{}", target.platform, target.compliance)
}

fn unknown_group(name: String) -> ProviderError {
    ProviderError::not_found(format!(
        "group `{name}` does not exist in the simulated tenant; its groups are: {}",
        GROUPS.join(", ")
    ))
}

#[async_trait]
impl Provider for SimProvider {
    fn describe(&self) -> String {
        format!("simulator ({} devices)", self.fleet.device_count())
    }

    fn now(&self) -> Timestamp {
        self.state.now.unwrap_or(SIMULATED_EPOCH)
    }

    fn is_virtual(&self) -> bool {
        true
    }

    async fn advance_to(&mut self, at: Timestamp) -> Result<(), ProviderError> {
        if at > self.now() {
            self.state.now = Some(at);
            self.persist()?;
        }
        Ok(())
    }

    async fn preflight(&mut self, plan: &Plan) -> Result<(), ProviderError> {
        for phase in &plan.phases {
            fleet::membership(&phase.include, &phase.exclude).map_err(unknown_group)?;
        }
        Ok(())
    }

    async fn capture_baseline(
        &mut self,
        target: &PolicyTarget,
    ) -> Result<serde_json::Value, ProviderError> {
        Ok(serde_json::json!({ "assignments": self.current(target) }))
    }

    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        _baseline: &serde_json::Value,
    ) -> Result<u64, ProviderError> {
        let wanted = desired
            .assignments
            .iter()
            .map(|a| SimAssignment {
                include: a.include.clone(),
                exclude: a.exclude.clone(),
                mode: a.mode,
                grace_secs: a.grace_secs,
            })
            .collect();
        self.set(target, wanted)
    }

    async fn restore(
        &mut self,
        target: &PolicyTarget,
        baseline: &serde_json::Value,
    ) -> Result<u64, ProviderError> {
        let wanted: Vec<SimAssignment> = serde_json::from_value(baseline["assignments"].clone())
            .map_err(|e| ProviderError::permanent(format!("unreadable baseline: {e}")))?;
        self.set(target, wanted)
    }

    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
    ) -> Result<Vec<Vec<DeviceReport>>, ProviderError> {
        let history = self
            .history(target)
            .iter()
            .map(fleet::resolve)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unknown_group)?;
        let now = self.now();
        scopes
            .iter()
            .map(|scope| {
                let membership =
                    fleet::membership(&scope.include, &scope.exclude).map_err(unknown_group)?;
                Ok(self
                    .fleet
                    .observe(target.platform, &history, membership, now))
            })
            .collect()
    }
}
