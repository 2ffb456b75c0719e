//! Providers connect rollouts to a device-management backend.
//!
//! A provider does four things, all reconciling or reading, never "apply step N": record the
//! tenant's configuration before a rollout ([`Provider::capture_baseline`]), bring the backend to a
//! desired state changing only what differs ([`Provider::reconcile`]), put a recorded baseline back
//! ([`Provider::restore`]), and report per-device compliance for phase scopes
//! ([`Provider::observe`]). Because every write is "make it so", redoing one after a crash changes
//! nothing.
//!
//! Providers also own their notion of time: the simulator runs on a virtual clock that jumps to
//! the next deadline; a real tenant runs on the wall clock.

pub mod graph;
pub mod simulator;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

use crate::domain::desired::DesiredState;
use crate::domain::directory::Member;
use crate::domain::event::{DriftChange, DriftResolution, TenantRequest};
use crate::domain::forecast::Labels;
use crate::domain::gate::DeviceReport;
use crate::domain::plan::{Mode, Plan, Platform, PolicyTarget, ProviderConfig};
use crate::domain::signins::SignIns;
use crate::domain::time::Timestamp;
use crate::store::Store;

/// Which devices a phase covers: users in any `include` group and in no `exclude` group, never
/// the emergency-access users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseScope {
    pub phase: String,
    pub mode: Mode,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub exclude_users: Vec<String>,
}

/// One phase's sign-in log read: its scope and the window `[since, until]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignInQuery {
    pub scope: PhaseScope,
    pub since: Timestamp,
    pub until: Timestamp,
}

/// What a provider keeps about one rollout between calls: the baseline it captured and what it
/// last made of the tenant. Opaque to the engine, which stores it with every outcome that
/// changes it, in the same transaction as the event.
pub type Record = serde_json::Value;

/// What `preflight` learned: the backend objects the rollout would drive (one rollout per
/// object), and what a person should know before starting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preflight {
    /// Stable names of the objects the rollout changes (`graph/<tenant>/<kind>/<id>`).
    pub resources: Vec<String>,
    pub warnings: Vec<String>,
}

/// How a change went.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The backend is as wanted; `changes` writes were made (0 if it already was).
    Done { changes: u64, record: Record },
    /// Someone else changed what the rollout manages; nothing was written.
    Drifted { changes: Vec<DriftChange> },
    /// The backend holds a write until another administrator approves it.
    Held {
        request: TenantRequest,
        record: Record,
    },
}

/// Per platform, the reports of one phase's devices.
pub type ScopeReports = Vec<(Platform, Vec<DeviceReport>)>;

/// An observation: one entry per scope asked for, and whatever drifted meanwhile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    pub scopes: Vec<ScopeReports>,
    pub drift: Vec<DriftChange>,
    /// The names of the groups and settings the reports' facts refer to.
    pub labels: Labels,
    /// Per scope, the devices under its policies that have no primary user, which no user
    /// group places in a phase (empty when the provider cannot tell).
    pub userless: Vec<u64>,
}

/// What kind of failure, which decides retries and exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth trying again: throttling, a 5xx, a timeout, a dropped connection.
    Transient,
    /// The backend refused; trying again will not help.
    Permanent,
    /// Credentials or permissions are wrong.
    Auth,
    /// Something the plan names does not exist (or is ambiguous).
    NotFound,
    /// Another rollout owns what this one would change, or the tenant forbids starting.
    Conflict,
    /// The backend holds the write until another administrator approves it; `reference`
    /// names the request.
    Held,
}

#[derive(Clone, Debug, Error, PartialEq)]
#[error("{message}")]
pub struct ProviderError {
    pub message: String,
    pub kind: ErrorKind,
    /// How long the backend asked us to wait before the next attempt.
    pub retry_after: Option<Duration>,
    /// The backend's reference for a write it holds for approval.
    pub reference: Option<String>,
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError {
            message: message.into(),
            kind,
            retry_after: None,
            reference: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::Permanent, message)
    }

    pub fn transient(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::Transient, message)
    }

    pub fn conflict(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::Conflict, message)
    }

    pub fn not_found(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::NotFound, message)
    }

    pub fn retryable(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// What a provider asks right before each write to a backend that cannot refuse a stale writer
/// (a real tenant): whether this process may still write for the rollout. Under `serve` with
/// leases it answers whether the replica still holds the rollout's lease, confirming it in the
/// database again when its last confirmation is too old to vouch for it (the process may have
/// been stalled since). An error: the write must not be sent.
pub trait WriteGuard: Send + Sync {
    fn before_write(&self) -> Result<(), ProviderError>;
}

#[async_trait]
pub trait Provider: Send {
    /// A short description for logs and the audit trail (`simulator`, `graph contoso`).
    fn describe(&self) -> String;

    /// The time of the provider's world.
    fn now(&self) -> Timestamp;

    /// Whether [`Provider::advance_to`] can jump time (the simulator) or time is real.
    fn is_virtual(&self) -> bool;

    /// From now on, write the backend only under this fence, where the backend can be fenced
    /// (the simulated tenant lives in the store; a real tenant cannot refuse a write for a lost
    /// lease, so the default ignores it).
    fn fence_writes(&mut self, fence: crate::store::WriteFence) {
        let _ = fence;
    }

    /// From now on, ask `guard` right before sending each write, where the backend itself cannot
    /// be fenced (a backend in the store is fenced by [`Provider::fence_writes`] instead, so the
    /// default ignores it).
    fn guard_writes(&mut self, guard: Arc<dyn WriteGuard>) {
        let _ = guard;
    }

    /// Moves virtual time forward to `at`. Real providers never get this call.
    async fn advance_to(&mut self, at: Timestamp) -> Result<(), ProviderError>;

    /// How long to wait, in real time, until the provider's clock reaches `at`.
    fn real_time_until(&self, at: Timestamp) -> Duration {
        at.since(self.now())
    }

    /// Checks that everything the plan names exists in the backend and that starting is safe.
    async fn preflight(&mut self, plan: &Plan) -> Result<Preflight, ProviderError>;

    /// Records the configuration a rollout of `target` may change, before its first change.
    async fn capture_baseline(&mut self, target: &PolicyTarget) -> Result<Record, ProviderError>;

    /// Brings the backend to `desired`, changing only the members the rollout manages.
    /// `resolution` is a person's answer to drift found before.
    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        resolution: Option<DriftResolution>,
        record: &Record,
    ) -> Result<Outcome, ProviderError>;

    /// Puts back what the rollout changed, as the baseline had it; what others changed since
    /// stays.
    async fn restore(
        &mut self,
        target: &PolicyTarget,
        record: &Record,
    ) -> Result<Outcome, ProviderError>;

    /// Reports, per scope and platform, every targeted device; and checks for drift.
    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
        record: &Record,
    ) -> Result<Observation, ProviderError>;

    /// The users of the directory group `group` (named as the plan names groups), members of
    /// nested groups included, each with the e-mail address the directory has for them: at
    /// most `limit` and one more (more than `limit` already says "too many"). A group that does
    /// not exist is `NotFound`; a directory that cannot be read now, any other error.
    async fn group_members(
        &mut self,
        _target: &PolicyTarget,
        group: &str,
        _limit: usize,
    ) -> Result<Vec<Member>, ProviderError> {
        Err(ProviderError::permanent(format!(
            "{} has no directory to read the members of `{group}` from",
            self.describe()
        )))
    }

    /// Reads the sign-ins of each query's users in its window, as the rollout's Conditional
    /// Access policy judged them: one answer per query, in order. A backend without a sign-in
    /// log says so ("not available"), never zero.
    async fn observe_signins(
        &mut self,
        _target: &PolicyTarget,
        queries: &[SignInQuery],
        _record: &Record,
    ) -> Result<Vec<SignIns>, ProviderError> {
        let reason = format!("{} keeps no sign-in log", self.describe());
        Ok(queries
            .iter()
            .map(|_| SignIns::Unavailable {
                reason: reason.clone(),
            })
            .collect())
    }
}

/// The backend's time without contacting it, for decisions recorded while the backend is busy
/// or away: a simulated tenant's clock from the store, otherwise the rollout's last event (the
/// last moment the backend's clock was seen).
pub fn offline_now(
    config: &ProviderConfig,
    store: &Store,
    loaded: &crate::engine::Loaded,
) -> Option<Timestamp> {
    let last = loaded.stored.rollout.updated_at;
    if config.kind == simulator::settings::KIND.name {
        let settings = simulator::settings::of(config).ok()?;
        simulator::SimProvider::offline_now(&settings, store)
            .ok()
            .map(|now| now.max(last))
    } else {
        Some(last)
    }
}

/// The rollout's clock for what `status` shows (how old a reading is): [`offline_now`], or the
/// rollout's last event when the simulated tenant's clock cannot be read.
pub fn view_now(store: &Store, loaded: &crate::engine::Loaded) -> Timestamp {
    offline_now(&loaded.plan.provider, store, loaded).unwrap_or(loaded.stored.rollout.updated_at)
}

/// Builds the provider a plan asks for (a Graph provider signs in and learns the tenant's time).
/// The adapter of the plan's kind reads its own settings (see [`crate::adapters`]).
pub async fn connect(config: &ProviderConfig, store: &Store) -> anyhow::Result<Box<dyn Provider>> {
    match config.kind.as_str() {
        kind if kind == simulator::settings::KIND.name => {
            let settings = simulator::settings::of(config).map_err(anyhow::Error::msg)?;
            Ok(Box::new(simulator::SimProvider::open(&settings, store)?))
        }
        kind if kind == graph::settings::KIND.name => {
            let settings = graph::settings::of(config).map_err(anyhow::Error::msg)?;
            let journal = store.provider_tree("graph")?;
            Ok(Box::new(
                graph::GraphProvider::connect(settings, store.id(), Some(journal)).await?,
            ))
        }
        other => Err(anyhow::anyhow!("no provider of kind `{other}`")),
    }
}
