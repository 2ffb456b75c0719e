//! The built-in simulated tenant: a [`Fleet`] plus the policy configuration phasegate writes to
//! it, persisted in the store so that the simulated world survives restarts like a real tenant.
//!
//! Time is virtual. The tenant keeps its own clock, which only moves when the engine asks it to
//! jump to the next deadline, so a two-week rollout runs in well under a second. Tenants are keyed
//! by their settings (seed, size, half-life): rollouts with the same settings share one world.
//!
//! Like a real tenant, the simulated one applies each write to what it holds when the write
//! arrives, and its clock never goes back: a write re-reads the stored configuration first, and
//! moving the clock writes the clock alone (never later than what is stored). Two processes may
//! hold the same tenant open for a moment (a `serve` replica paused past its lease wakes while
//! another drives the rollout); the one that was asleep must not put back what it last saw.

pub mod fleet;
pub mod settings;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Observation, Outcome, PhaseScope, Preflight, Provider, ProviderError, Record, SignInQuery,
};
use crate::domain::desired::DesiredState;
use crate::domain::directory::Member;
use crate::domain::event::DriftResolution;
use crate::domain::plan::{CompliancePolicy, Plan, PolicyTarget};
use crate::domain::signins::{SignInCounter, SignIns};
use crate::domain::time::Timestamp;
use crate::store::{KvTree, Store, StoreError, decode_json, encode_json};
pub use fleet::{ConfigEntry, Fleet, GROUPS, SimAssignment, SimExempt};
pub use settings::SimulatorSettings;

/// Simulated time starts on a Monday morning, the same for every tenant, so that runs with the
/// same seed are identical.
pub const SIMULATED_EPOCH: Timestamp = Timestamp::from_millis(1_767_600_000_000);

/// Where a simulated tenant's state lives: tenants are keyed by their settings.
fn tenant_record(
    settings: &SimulatorSettings,
    store: &Store,
) -> Result<(KvTree, String), StoreError> {
    let tree = store.provider_tree("simulator")?;
    let key = format!(
        "tenant/{}/{}/{}",
        settings.seed,
        settings.devices,
        settings.remediation_half_life.as_secs()
    );
    Ok((tree, key))
}

/// Where a tenant's clock is kept beside its state.
fn clock_key(tenant: &str) -> String {
    format!("clock/{tenant}")
}

/// The tenant's record (or the part of it `T` reads), if it has one yet.
fn read_tenant<T: serde::de::DeserializeOwned>(
    tree: &KvTree,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let bytes = tree.get(key.as_bytes())?;
    bytes
        .map(|bytes| decode_json(&format!("simulator/{key}"), &bytes))
        .transpose()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct TenantState {
    now: Option<Timestamp>,
    /// Per policy (`platform/name`), every configuration it has had, oldest first.
    policies: BTreeMap<String, Vec<ConfigEntry>>,
}

pub struct SimProvider {
    fleet: Fleet,
    tree: KvTree,
    key: String,
    state: TenantState,
    /// The lease its writes are conditional on (a `serve` replica's), if any.
    fence: Option<crate::store::WriteFence>,
}

impl SimProvider {
    pub fn open(settings: &SimulatorSettings, store: &Store) -> Result<SimProvider, StoreError> {
        let (tree, key) = tenant_record(settings, store)?;
        let mut state: TenantState = read_tenant(&tree, &key)?.unwrap_or_default();
        state.now = state.now.max(stored_clock(&tree, &key)?);
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
            fence: None,
        })
    }

    /// The simulated tenant's clock as the store keeps it, read without building the fleet or
    /// the policies' change log: what a command needs before (or instead of) connecting.
    pub fn offline_now(
        settings: &SimulatorSettings,
        store: &Store,
    ) -> Result<Timestamp, StoreError> {
        #[derive(Deserialize)]
        struct Clock {
            now: Option<Timestamp>,
        }
        let (tree, key) = tenant_record(settings, store)?;
        let kept = tree.get(clock_key(&key).as_bytes())?;
        if let Some(millis) = kept.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()) {
            return Ok(Timestamp::from_millis(i64::from_be_bytes(millis)));
        }
        // A tenant saved before the clock was kept apart: its state says.
        let clock: Option<Clock> = read_tenant(&tree, &key)?;
        Ok(clock.and_then(|c| c.now).unwrap_or(SIMULATED_EPOCH))
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Every configuration a policy has had, oldest first (the simulated tenant's change log).
    pub fn history(&self, policy: &CompliancePolicy) -> &[ConfigEntry] {
        self.state
            .policies
            .get(&policy_key(policy))
            .map_or(&[], Vec::as_slice)
    }

    /// Moves the stored clock to `at` unless it is there or beyond already (compare and swap:
    /// another process may move it meanwhile), and takes in what it is.
    fn move_clock(&mut self, at: Timestamp) -> Result<(), ProviderError> {
        let key = clock_key(&self.key);
        for _ in 0..WRITE_ATTEMPTS {
            let stored = self.tree.get(key.as_bytes()).map_err(unsaved)?;
            let stored_at = stored
                .as_deref()
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(|millis| Timestamp::from_millis(i64::from_be_bytes(millis)));
            if stored_at >= Some(at) {
                self.state.now = self.state.now.max(stored_at);
                return Ok(());
            }
            let bytes = at.as_millis().to_be_bytes();
            if self
                .tree
                .compare_and_swap_fenced(
                    key.as_bytes(),
                    stored.as_deref(),
                    bytes,
                    self.fence.as_ref(),
                )
                .map_err(unsaved)?
            {
                self.tree.flush().map_err(unsaved)?;
                self.state.now = Some(at);
                return Ok(());
            }
            self.refused_by_fence(key.as_bytes(), stored.as_deref())?;
        }
        Err(busy())
    }

    /// After a write that did not happen: if the value is still the one read, the fence refused
    /// it (the lease is lost), which no retry changes.
    fn refused_by_fence(&self, key: &[u8], read: Option<&[u8]>) -> Result<(), ProviderError> {
        if self.fence.is_some() && self.tree.get(key).map_err(unsaved)?.as_deref() == read {
            return Err(ProviderError::permanent(
                "the rollout's lease was lost: the simulated tenant was not written",
            ));
        }
        Ok(())
    }

    /// Takes in the stored clock if another process moved it further.
    fn catch_up_clock(&mut self) -> Result<(), ProviderError> {
        let stored = stored_clock(&self.tree, &self.key).map_err(unsaved)?;
        self.state.now = self.state.now.max(stored);
        Ok(())
    }

    fn current(&self, policy: &CompliancePolicy) -> Vec<SimAssignment> {
        self.history(policy)
            .last()
            .map(|e| e.assignments.clone())
            .unwrap_or_default()
    }

    fn current_exempt(&self, policy: &CompliancePolicy) -> SimExempt {
        self.history(policy)
            .last()
            .map(|e| e.exempt.clone())
            .unwrap_or_default()
    }

    /// Makes `wanted` (and `exempt`) every policy's configuration; returns how many assignments
    /// and exemptions changed.
    fn set(
        &mut self,
        target: &PolicyTarget,
        wanted: &[SimAssignment],
        exempt: &SimExempt,
    ) -> Result<u64, ProviderError> {
        for assignment in wanted {
            fleet::membership(&assignment.include, &assignment.exclude).map_err(unknown_group)?;
        }
        fleet::resolve_exempt(exempt, self.fleet.user_count()).map_err(unknown_exempt)?;
        // Applied to what the tenant holds now, at its time now, written back only over what was
        // read (compare and swap), so that no other process's write is lost.
        for _ in 0..WRITE_ATTEMPTS {
            let stored = self.tree.get(self.key.as_bytes()).map_err(unsaved)?;
            let held: Option<TenantState> = stored
                .as_deref()
                .map(|bytes| decode_json(&format!("simulator/{}", self.key), bytes))
                .transpose()
                .map_err(unsaved)?;
            self.state.policies = held.map(|s| s.policies).unwrap_or_default();
            self.catch_up_clock()?;
            let changes = self.change(target, wanted, exempt);
            if changes == 0 {
                return Ok(0);
            }
            let written = self
                .tree
                .compare_and_swap_fenced(
                    self.key.as_bytes(),
                    stored.as_deref(),
                    encode_json(&self.state),
                    self.fence.as_ref(),
                )
                .map_err(unsaved)?;
            if written {
                self.move_clock(self.now())?;
                return Ok(changes);
            }
            self.refused_by_fence(self.key.as_bytes(), stored.as_deref())?;
        }
        Err(busy())
    }

    /// Records `wanted` (and `exempt`) as every policy's configuration from now on, where it
    /// differs from the current one; how many assignments and exemptions changed.
    fn change(
        &mut self,
        target: &PolicyTarget,
        wanted: &[SimAssignment],
        exempt: &SimExempt,
    ) -> u64 {
        let at = self.now();
        let mut changes = 0;
        for policy in &target.compliance {
            let current = self.current(policy);
            let current_exempt = self.current_exempt(policy);
            let changed = wanted.iter().filter(|a| !current.contains(a)).count()
                + current.iter().filter(|a| !wanted.contains(a)).count()
                + usize::from(current_exempt != *exempt);
            if changed == 0 {
                continue;
            }
            changes += changed as u64;
            self.state
                .policies
                .entry(policy_key(policy))
                .or_default()
                .push(ConfigEntry {
                    at,
                    assignments: wanted.to_vec(),
                    exempt: exempt.clone(),
                });
        }
        changes
    }

    /// The simulated tenant's name for a policy, as other rollouts of this store see it.
    fn resource(&self, policy: &CompliancePolicy) -> String {
        format!(
            "simulator/{}/{}",
            self.key.trim_start_matches("tenant/"),
            policy_key(policy)
        )
    }
}

/// The tenant's clock as stored beside its state, if it is.
fn stored_clock(tree: &KvTree, tenant: &str) -> Result<Option<Timestamp>, StoreError> {
    let kept = tree.get(clock_key(tenant).as_bytes())?;
    Ok(kept
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(|millis| Timestamp::from_millis(i64::from_be_bytes(millis))))
}

/// How many times a write to the simulated tenant is tried again when another process wrote it
/// between the read and the write.
const WRITE_ATTEMPTS: usize = 16;

fn busy() -> ProviderError {
    ProviderError::transient("the simulated tenant kept changing while this write was made")
}

fn unsaved(e: StoreError) -> ProviderError {
    ProviderError::permanent(format!("the simulated tenant could not be saved: {e}"))
}

fn policy_key(policy: &CompliancePolicy) -> String {
    format!("{}/{}", policy.platform, policy.name)
}

fn unknown_exempt(subject: String) -> ProviderError {
    ProviderError::not_found(format!(
        "an exception names {subject}, which the simulated tenant does not have (its users are user000000@fleet.example and on, its groups: {})",
        GROUPS.join(", ")
    ))
}

/// The simulated directory's users of a group: `user{n}`, mailed at `user{n}@contoso.com` when
/// they have a mailbox, a share of them with a disabled account; at most `limit` and one more.
pub fn directory_members(
    fleet: &Fleet,
    group: &str,
    limit: usize,
) -> Result<Vec<Member>, ProviderError> {
    let bit = fleet::group_bit(group).ok_or_else(|| unknown_group(group.to_string()))?;
    Ok(fleet
        .members_of(bit)
        .take(limit.saturating_add(1))
        .map(|user| Member {
            id: format!("user{user}"),
            name: format!("user{user}"),
            mail: fleet
                .has_mailbox(user)
                .then(|| format!("user{user}@{}", fleet::MAIL_DOMAIN)),
            enabled: fleet.account_enabled(user),
        })
        .collect())
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

    fn fence_writes(&mut self, fence: crate::store::WriteFence) {
        self.fence = Some(fence);
    }

    /// Moves the clock alone (the configuration stays as stored), never back.
    async fn advance_to(&mut self, at: Timestamp) -> Result<(), ProviderError> {
        self.move_clock(at)
    }

    async fn group_members(
        &mut self,
        _target: &PolicyTarget,
        group: &str,
        limit: usize,
    ) -> Result<Vec<Member>, ProviderError> {
        directory_members(&self.fleet, group, limit)
    }

    async fn preflight(&mut self, plan: &Plan) -> Result<Preflight, ProviderError> {
        for phase in &plan.phases {
            fleet::membership(&phase.include, &phase.exclude).map_err(unknown_group)?;
        }
        fleet::membership(&[], &plan.emergency_access.groups).map_err(unknown_group)?;
        let directory: Vec<String> = plan.directory_approvers.values().cloned().collect();
        fleet::membership(&directory, &[]).map_err(unknown_group)?;
        Ok(Preflight {
            resources: plan
                .policy
                .compliance
                .iter()
                .map(|p| self.resource(p))
                .collect(),
            warnings: Vec::new(),
        })
    }

    /// The simulated tenant has no other administrators: the record is the baseline alone,
    /// each policy's assignments by its key.
    async fn capture_baseline(&mut self, target: &PolicyTarget) -> Result<Record, ProviderError> {
        let policies: BTreeMap<String, Vec<SimAssignment>> = target
            .compliance
            .iter()
            .map(|p| (policy_key(p), self.current(p)))
            .collect();
        Ok(serde_json::json!({ "policies": policies }))
    }

    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        _resolution: Option<DriftResolution>,
        record: &Record,
    ) -> Result<Outcome, ProviderError> {
        let wanted: Vec<SimAssignment> = desired
            .assignments
            .iter()
            .map(SimAssignment::from)
            .collect();
        let exempt = SimExempt {
            users: desired.exempt.users.clone(),
            groups: desired.exempt.groups.clone(),
        };
        let changes = self.set(target, &wanted, &exempt)?;
        Ok(Outcome::Done {
            changes,
            record: record.clone(),
        })
    }

    async fn restore(
        &mut self,
        target: &PolicyTarget,
        record: &Record,
    ) -> Result<Outcome, ProviderError> {
        let baseline: BTreeMap<String, Vec<SimAssignment>> =
            serde_json::from_value(record["policies"].clone())
                .map_err(|e| ProviderError::permanent(format!("unreadable baseline: {e}")))?;
        let mut changes = 0;
        for policy in &target.compliance {
            let wanted = baseline
                .get(&policy_key(policy))
                .cloned()
                .unwrap_or_default();
            let one = PolicyTarget {
                compliance: vec![policy.clone()],
                ..target.clone()
            };
            changes += self.set(&one, &wanted, &SimExempt::default())?;
        }
        Ok(Outcome::Done {
            changes,
            record: record.clone(),
        })
    }

    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
        _record: &Record,
    ) -> Result<Observation, ProviderError> {
        let now = self.now();
        let mut histories = Vec::new();
        for policy in &target.compliance {
            let history = self
                .history(policy)
                .iter()
                .map(|entry| fleet::resolve(entry, self.fleet.user_count()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(unknown_group)?;
            histories.push((policy.platform, history));
        }
        let scopes = scopes
            .iter()
            .map(|scope| {
                let membership =
                    fleet::membership(&scope.include, &scope.exclude).map_err(unknown_group)?;
                Ok(histories
                    .iter()
                    .map(|(platform, history)| {
                        (
                            *platform,
                            self.fleet.observe(*platform, history, membership, now),
                        )
                    })
                    .collect())
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(Observation {
            scopes,
            drift: Vec::new(),
            labels: fleet::labels(),
            userless: Vec::new(),
        })
    }

    /// The simulated fleet's sign-ins (`fleet::Fleet::signins`): each query's users over its
    /// window, under the configuration history the rollout wrote.
    async fn observe_signins(
        &mut self,
        target: &PolicyTarget,
        queries: &[SignInQuery],
        _record: &Record,
    ) -> Result<Vec<SignIns>, ProviderError> {
        let mut histories = Vec::new();
        for policy in &target.compliance {
            let history = self
                .history(policy)
                .iter()
                .map(|entry| fleet::resolve(entry, self.fleet.user_count()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(unknown_group)?;
            histories.push((policy.platform, history));
        }
        queries
            .iter()
            .map(|query| {
                let membership = fleet::membership(&query.scope.include, &query.scope.exclude)
                    .map_err(unknown_group)?;
                let mut counter = SignInCounter::new(query.since, query.until);
                for (platform, history) in &histories {
                    self.fleet.signins(
                        *platform,
                        history,
                        membership,
                        query.since,
                        query.until,
                        &mut counter,
                    );
                }
                Ok(SignIns::Observed(counter.finish(false)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::{Mode, Platform};

    fn assignment(group: &str, mode: Mode) -> SimAssignment {
        SimAssignment {
            include: vec![group.to_string()],
            exclude: vec!["Break Glass".to_string()],
            mode,
            grace_secs: None,
        }
    }

    /// One tenant open twice (a replica woken from a pause beside the one that drives the rollout
    /// now, each with what it last read): the late one's clock move puts neither the clock nor the
    /// configuration back, and its write is applied to what the tenant holds.
    #[tokio::test]
    async fn a_tenant_open_twice_loses_no_write_and_its_clock_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), std::time::Duration::from_secs(1)).unwrap();
        let settings = SimulatorSettings {
            devices: 20,
            seed: 7,
            remediation_half_life: std::time::Duration::from_secs(3_600),
        };
        let target = PolicyTarget {
            compliance: vec![CompliancePolicy {
                name: "baseline".into(),
                platform: Platform::Windows,
            }],
            conditional_access: None,
            notification_template: None,
        };
        let day = |n: i64| Timestamp::from_millis(SIMULATED_EPOCH.as_millis() + n * 86_400_000);
        let pilot = vec![assignment("Pilot IT", Mode::Report)];
        let wider = vec![
            assignment("Pilot IT", Mode::Report),
            assignment("All Users", Mode::Report),
        ];
        let none = SimExempt::default();
        let mut asleep = SimProvider::open(&settings, &store).unwrap();
        asleep.set(&target, &pilot, &none).unwrap();
        let mut driving = SimProvider::open(&settings, &store).unwrap();
        driving.advance_to(day(3)).await.unwrap();
        assert_eq!(driving.set(&target, &wider, &none).unwrap(), 1);
        // The one that slept moves the clock to where it meant to: not back.
        asleep.advance_to(day(1)).await.unwrap();
        assert_eq!(SimProvider::offline_now(&settings, &store).unwrap(), day(3));
        assert_eq!(asleep.now(), day(3));
        let reopened = SimProvider::open(&settings, &store).unwrap();
        let history: Vec<_> = reopened
            .history(&target.compliance[0])
            .iter()
            .map(|e| (e.at, e.assignments.clone()))
            .collect();
        assert_eq!(
            history,
            vec![(SIMULATED_EPOCH, pilot.clone()), (day(3), wider.clone())]
        );
        // Its write of what the tenant holds already changes nothing.
        assert_eq!(asleep.set(&target, &wider, &none).unwrap(), 0);
        assert_eq!(
            SimProvider::open(&settings, &store)
                .unwrap()
                .history(&target.compliance[0])
                .len(),
            2
        );
    }

    /// The clock read without the fleet is the clock the connected tenant keeps.
    #[tokio::test]
    async fn the_offline_clock_is_the_tenants_clock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), std::time::Duration::from_secs(1)).unwrap();
        let settings = SimulatorSettings {
            devices: 20,
            seed: 7,
            remediation_half_life: std::time::Duration::from_secs(3_600),
        };
        let fresh = SimProvider::offline_now(&settings, &store).unwrap();
        assert_eq!(fresh, SIMULATED_EPOCH);
        let mut tenant = SimProvider::open(&settings, &store).unwrap();
        let later = Timestamp::from_millis(SIMULATED_EPOCH.as_millis() + 86_400_000);
        tenant.advance_to(later).await.unwrap();
        assert_eq!(SimProvider::offline_now(&settings, &store).unwrap(), later);
        let other = SimulatorSettings {
            seed: 8,
            ..settings
        };
        assert_eq!(
            SimProvider::offline_now(&other, &store).unwrap(),
            SIMULATED_EPOCH
        );
    }
}
