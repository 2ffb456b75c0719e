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

use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

use crate::domain::desired::DesiredState;
use crate::domain::gate::DeviceReport;
use crate::domain::plan::{Mode, Plan, PolicyTarget, ProviderSettings};
use crate::domain::time::Timestamp;
use crate::store::Store;

/// Which devices a phase covers: users in any `include` group and in no `exclude` group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseScope {
    pub phase: String,
    pub mode: Mode,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
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
}

#[derive(Clone, Debug, Error, PartialEq)]
#[error("{message}")]
pub struct ProviderError {
    pub message: String,
    pub kind: ErrorKind,
    /// How long the backend asked us to wait before the next attempt.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError {
            message: message.into(),
            kind,
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::Permanent, message)
    }

    pub fn transient(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::Transient, message)
    }

    pub fn not_found(message: impl Into<String>) -> ProviderError {
        ProviderError::new(ErrorKind::NotFound, message)
    }

    pub fn retryable(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

#[async_trait]
pub trait Provider: Send {
    /// A short description for logs and the audit trail (`simulator`, `graph contoso`).
    fn describe(&self) -> String;

    /// The time of the provider's world.
    fn now(&self) -> Timestamp;

    /// Whether [`Provider::advance_to`] can jump time (the simulator) or time is real.
    fn is_virtual(&self) -> bool;

    /// Moves virtual time forward to `at`. Real providers never get this call.
    async fn advance_to(&mut self, at: Timestamp) -> Result<(), ProviderError>;

    /// How long to wait, in real time, until the provider's clock reaches `at`.
    fn real_time_until(&self, at: Timestamp) -> Duration {
        at.since(self.now())
    }

    /// Checks that everything the plan names exists in the backend.
    async fn preflight(&mut self, plan: &Plan) -> Result<(), ProviderError>;

    /// Records the configuration a rollout of `target` may change, as an opaque document.
    async fn capture_baseline(
        &mut self,
        target: &PolicyTarget,
    ) -> Result<serde_json::Value, ProviderError>;

    /// Brings the backend to `desired`; returns how many changes it made (0 if it was already so).
    /// `baseline` is what [`Provider::capture_baseline`] recorded before the rollout.
    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        baseline: &serde_json::Value,
    ) -> Result<u64, ProviderError>;

    /// Puts back what [`Provider::capture_baseline`] recorded; returns the number of changes.
    async fn restore(
        &mut self,
        target: &PolicyTarget,
        baseline: &serde_json::Value,
    ) -> Result<u64, ProviderError>;

    /// Reports, per scope, every targeted device of the policy's platform.
    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
    ) -> Result<Vec<Vec<DeviceReport>>, ProviderError>;
}

/// Builds the provider a plan asks for (a Graph provider signs in and learns the tenant's time).
pub async fn connect(
    settings: &ProviderSettings,
    store: &Store,
) -> anyhow::Result<Box<dyn Provider>> {
    match settings {
        ProviderSettings::Simulator(settings) => {
            Ok(Box::new(simulator::SimProvider::open(settings, store)?))
        }
        ProviderSettings::Graph(settings) => Ok(Box::new(
            graph::GraphProvider::connect(settings.clone()).await?,
        )),
    }
}
