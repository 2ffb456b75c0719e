//! The plan file exactly as written: serde types that mirror the TOML, with spans kept on every
//! value a later check may need to point at. Unknown keys are rejected here, so a typo like
//! `min_soke` is reported with its position instead of being silently ignored.

use serde::Deserialize;
use toml::Spanned;

use super::{Mode, Platform};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub rollout: Spanned<RawRollout>,
    pub policy: Spanned<RawPolicy>,
    pub provider: Spanned<RawProvider>,
    #[serde(default)]
    pub phase: Vec<Spanned<RawPhase>>,
    #[serde(default)]
    pub webhook: Vec<Spanned<RawWebhook>>,
    pub emergency_access: Option<Spanned<RawEmergencyAccess>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEmergencyAccess {
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub users: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub url: Spanned<String>,
    pub events: Option<Spanned<Vec<Spanned<String>>>>,
    pub secret_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub observe_every: Option<Spanned<String>>,
    #[serde(default)]
    pub separation_of_duties: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    /// One policy's name (with `platform`), or an array of `{ name, platform }` tables.
    pub compliance: Spanned<toml::Value>,
    pub platform: Option<Spanned<Platform>>,
    pub conditional_access: Option<Spanned<String>>,
    pub notification_template: Option<Spanned<String>>,
}

/// Settings of every provider kind in one table; which keys a kind accepts is checked during
/// validation so that a misplaced key is reported at its own line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub kind: Spanned<String>,
    // simulator
    pub devices: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    pub remediation_half_life: Option<Spanned<String>>,
    // graph
    pub tenant: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret_env: Option<Spanned<String>>,
    pub graph_url: Option<Spanned<String>>,
    pub login_url: Option<Spanned<String>>,
    pub ca_requests_per_second: Option<Spanned<f64>>,
    pub request_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPhase {
    pub id: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub mode: Spanned<Mode>,
    pub include: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    pub after: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_soak: Option<Spanned<String>>,
    pub grace: Option<Spanned<String>>,
    pub gate: Option<Spanned<RawGate>>,
    pub rollback_when: Option<Spanned<RawRollbackWhen>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGate {
    pub max_noncompliant: Option<Spanned<i64>>,
    pub max_noncompliant_ratio: Option<Spanned<String>>,
    pub min_reporting: Option<Spanned<String>>,
    pub stale_after: Option<Spanned<String>>,
    pub max_errors: Option<Spanned<i64>>,
    pub max_error_ratio: Option<Spanned<String>>,
    pub approvals: Option<Spanned<i64>>,
    pub max_hold: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollbackWhen {
    pub noncompliant_ratio_above: Option<Spanned<String>>,
    pub noncompliant_above: Option<Spanned<i64>>,
    pub errors_above: Option<Spanned<i64>>,
    pub blocked_ratio_above: Option<Spanned<String>>,
}
