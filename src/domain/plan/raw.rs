//! The plan file exactly as written: serde types that mirror the TOML, with spans kept on every
//! value a later check may need to point at. Unknown keys are rejected here, so a typo like
//! `min_soke` is reported with its position instead of being silently ignored — except in the
//! tables adapters own (`[provider]`, `[[webhook]]`), whose other keys their adapter checks.

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

/// The domain's part of a `[[webhook]]` table: which statuses are announced. Where to, and how,
/// belongs to the channel's adapter, which checks the rest of the table (`crate::adapters`).
#[derive(Debug, Deserialize)]
pub(super) struct RawWebhook {
    pub events: Option<Spanned<Vec<Spanned<String>>>>,
}

/// The tables adapters own, whole: their keys become the adapter's settings.
#[derive(Debug, Deserialize)]
pub(super) struct RawAdapterTables {
    pub provider: toml::Table,
    #[serde(default)]
    pub webhook: Vec<toml::Table>,
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

/// The domain's part of `[provider]`: its kind. The other keys are the settings of that kind's
/// adapter, which checks them (`crate::adapters`).
#[derive(Debug, Deserialize)]
pub(super) struct RawProvider {
    pub kind: Spanned<String>,
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
