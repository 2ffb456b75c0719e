//! Rollout plans: parsing a TOML file and validating it into a [`Plan`].
//!
//! Parsing is staged. [`raw`] mirrors the file with spans; [`validate`] turns it into a `Plan`
//! whose existence is the proof that every check passed: phase ids are unique, `after` names
//! known phases, the phase graph is acyclic, modes never weaken along an edge, durations and
//! percentages are well-formed. Validation keeps going after a problem so that one run of
//! `plan check` shows everything wrong with a file, each problem at its line and column.
//!
//! A valid plan may still be dangerous — enforcing on everyone before anyone has looked, a gate
//! that cannot fail. `warnings.rs` finds those; a `Plan` carries them, and a plan checked strictly
//! (`[rollout] strict = true`, `plan check --strict`) is refused for them.

pub mod announce;
pub mod approval;
pub mod change;
mod diagnostics;
pub mod freeze;
mod raw;
mod warnings;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

pub use super::signins::SignInData;
pub use announce::{Announcement, Moment};
pub use approval::{ApprovalPolicy, identity_key};
pub use diagnostics::{Diagnostic, PlanErrors, PlanWarnings, Position, position};
use raw::{
    RawAdapterTables, RawEmergencyAccess, RawGate, RawPhase, RawPlan, RawRollbackWhen, RawWebhook,
};

use super::event::ChannelAddress;
use super::rollout::RolloutStatus;

/// How strongly a phase applies the policy. The order matters: a later phase may only keep or
/// strengthen the mode of the phases it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Assigned; violations are only reported (Conditional Access report-only).
    Report,
    /// Owners of noncompliant devices are told and given a grace period.
    Notify,
    /// Noncompliant devices are blocked.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Report => "report",
            Mode::Notify => "notify",
            Mode::Enforce => "enforce",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The device platform a compliance policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Windows,
    Ios,
    Android,
    Macos,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::Windows,
        Platform::Ios,
        Platform::Android,
        Platform::Macos,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Windows => "windows",
            Platform::Ios => "ios",
            Platform::Android => "android",
            Platform::Macos => "macos",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A share between 0 and 1, written in plans as a percentage such as `"2%"`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ratio(f64);

impl Ratio {
    pub fn from_fraction(fraction: f64) -> Ratio {
        Ratio(fraction.clamp(0.0, 1.0))
    }

    pub fn fraction(self) -> f64 {
        self.0
    }

    /// Parses `"2%"`, `"0.5%"` or `"100%"`.
    pub fn parse_percent(text: &str) -> Option<Ratio> {
        let number = text.trim().strip_suffix('%')?.trim();
        let value: f64 = number.parse().ok()?;
        (value.is_finite() && (0.0..=100.0).contains(&value)).then_some(Ratio(value / 100.0))
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", format_percent(self.0))
    }
}

/// `0.0234` → `2.34%`, trimming needless zeros.
pub fn format_percent(fraction: f64) -> String {
    let text = format!("{:.2}", fraction * 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// What is rolled out: one compliance policy per platform and, optionally, the Conditional
/// Access policy that requires compliant devices. Several policies go through the same phases and
/// gates together, as Microsoft's guidance creates them (one per platform).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyTarget {
    /// At least one; never two for the same platform.
    pub compliance: Vec<CompliancePolicy>,
    pub conditional_access: Option<String>,
    /// The notification message template a notify phase's e-mails use (Graph provider).
    pub notification_template: Option<String>,
}

/// A compliance policy, by the name (or id) the backend knows it by, and its platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompliancePolicy {
    pub name: String,
    pub platform: Platform,
}

impl PolicyTarget {
    /// The platforms whose compliance the rollout manages, in plan order.
    pub fn platforms(&self) -> Vec<Platform> {
        self.compliance.iter().map(|c| c.platform).collect()
    }
}

/// The accounts that must never be locked out: every enforcement scope excludes them, and no
/// write ever removes their exclusions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyAccess {
    /// Groups, by the names the plan's phases use.
    pub groups: Vec<String>,
    /// Users, by user principal name or object id.
    pub users: Vec<String>,
}

impl EmergencyAccess {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.users.is_empty()
    }
}

/// The backend a rollout drives: its kind, and settings that only the adapter of that kind reads
/// and checks (`crate::adapters`). The domain never looks inside them.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    pub kind: String,
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// Exit criteria checked before a phase is promoted.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub max_noncompliant: Option<u64>,
    pub max_noncompliant_ratio: Option<Ratio>,
    pub min_reporting: Option<Ratio>,
    /// A device whose last report is older than this counts as stale, never as compliant.
    pub stale_after: Duration,
    pub max_errors: Option<u64>,
    /// Errors as a share of the devices that reported.
    pub max_error_ratio: Option<Ratio>,
    pub approvals: u32,
    /// How long a failing gate may hold the rollout before it asks for a person.
    pub max_hold: Duration,
    /// Sign-ins blocked or would be blocked (report-only) in the window, as a count.
    pub max_blocked_signins: Option<u64>,
    /// Users with a blocked or would-be-blocked sign-in, as a share of the phase's users who
    /// signed in during the window.
    pub max_blocked_signin_ratio: Option<Ratio>,
    /// How far back each observation reads the sign-in log (never before the phase applied).
    pub signin_window: Duration,
    /// What the gate does when the sign-in log cannot be read.
    pub signin_data: SignInData,
}

/// Abort criteria watched while a phase runs; tripping one rolls the phase back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RollbackWhen {
    pub noncompliant_ratio_above: Option<Ratio>,
    pub noncompliant_above: Option<u64>,
    pub errors_above: Option<u64>,
    pub blocked_ratio_above: Option<Ratio>,
    /// Sign-ins the enforced policy blocked in the gate's `signin_window`, as a count.
    pub blocked_signins_above: Option<u64>,
    /// Users with a blocked sign-in, as a share of the phase's users who signed in.
    pub blocked_signin_ratio_above: Option<Ratio>,
}

impl RollbackWhen {
    pub fn is_empty(&self) -> bool {
        *self == RollbackWhen::default()
    }
}

/// Where status changes are told (`[[webhook]]`): which statuses, and an address only the
/// channel's adapter reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    /// The statuses whose entry is announced.
    pub events: Vec<RolloutStatus>,
    pub address: ChannelAddress,
}

/// The statuses a webhook announces unless its plan says otherwise: the ones a person acts on.
pub const DEFAULT_WEBHOOK_EVENTS: [RolloutStatus; 7] = [
    RolloutStatus::WaitingApproval,
    RolloutStatus::Held,
    RolloutStatus::RolledBack,
    RolloutStatus::Rejected,
    RolloutStatus::Completed,
    RolloutStatus::Aborted,
    RolloutStatus::Failed,
];

#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub id: String,
    pub description: String,
    pub mode: Mode,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Indices (into [`Plan::phases`]) of the phases that must be promoted first.
    pub after: Vec<usize>,
    pub min_soak: Duration,
    pub grace: Option<Duration>,
    pub gate: Gate,
    pub rollback_when: RollbackWhen,
    /// Who may approve its promotion (`[phase.gate]` approval settings); the quorum is
    /// `gate.approvals`.
    pub approval: ApprovalPolicy,
}

/// A validated rollout plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub observe_every: Duration,
    /// The person who started a rollout, who asked for a promotion, or who wrote the plan may not
    /// approve it (`[rollout] separation_of_duties`, on unless the plan turns it off).
    pub separation_of_duties: bool,
    /// `[rollout] author`, as an [`identity_key`].
    pub author: Option<String>,
    /// `[approvers]`: each group's members, as keys.
    pub approver_groups: approval::ApproverGroups,
    /// `[directory_approvers]`: approver groups whose members the directory has (group name →
    /// the directory group's name), read by the shell into the rollout's snapshot.
    pub directory_approvers: approval::DirectoryApprovers,
    /// `[rollout] strict`: the plan's warnings are errors.
    pub strict: bool,
    /// `[rollout] max_exception`: how far ahead an exception may run.
    pub max_exception: Duration,
    pub policy: PolicyTarget,
    pub provider: ProviderConfig,
    /// In file order.
    pub phases: Vec<Phase>,
    /// Phase indices in an order where every phase comes after everything in its `after`.
    pub order: Vec<usize>,
    /// Where to tell about status changes.
    pub channels: Vec<Channel>,
    /// Break-glass accounts every enforcement scope excludes.
    pub emergency_access: EmergencyAccess,
    /// `[[announcement]]`: who is told what, when, through which channel.
    pub announcements: Vec<Announcement>,
    /// `[[freeze]]`: windows in which no phase is promoted.
    pub freezes: Vec<freeze::FreezeWindow>,
    /// `[preflight]`: the readiness checks' settings (domains, certificate file, which device
    /// actions the plan accepts), read and checked by `crate::preflight`, never by the domain.
    pub preflight: serde_json::Map<String, serde_json::Value>,
    /// Hex SHA-256 of the plan's text: a change mid-rollout is detected by it.
    pub hash: String,
    /// What is valid but dangerous in it, located in the plan's text, with why each matters
    /// (empty for a plan checked strictly: there they are errors).
    pub warnings: Vec<Diagnostic>,
}

/// The range a duration setting may take; every duration a plan sets has one (documented in
/// docs/plan-format.md), so no arithmetic on time can overflow and no loop can spin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 24 * 3600)
}

pub const OBSERVE_EVERY_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(60),
    max: days(7),
};
pub const MIN_SOAK_RANGE: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: days(365),
};
/// Intune's action schedule counts days after noncompliance up to 365.
pub const GRACE_RANGE: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: days(365),
};
/// Intune's compliance status validity period is at most 120 days.
pub const STALE_AFTER_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(3600),
    max: days(120),
};
/// The sign-in log is kept 30 days (7 without a premium licence); an observation reads at most a
/// week of it (learn.microsoft.com/entra/identity/monitoring-health/reference-reports-data-retention).
pub const SIGNIN_WINDOW_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(600),
    max: days(7),
};
pub const DEFAULT_SIGNIN_WINDOW: Duration = Duration::from_secs(24 * 3600);
pub const MAX_HOLD_RANGE: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: days(365),
};
/// The largest device count a gate or rollback criterion may name.
pub const MAX_COUNT: i64 = 100_000_000;
pub const MAX_APPROVALS: i64 = 10;
/// Phases in one plan: staged rollouts have a handful; the bound keeps every walk of the phase
/// graph small whatever a plan file holds.
pub const MAX_PHASES: usize = 100;
/// Groups a phase includes or excludes.
pub const MAX_GROUPS: usize = 100;

/// An exception from enforcement lasts at least an hour and at most a year.
pub const MAX_EXCEPTION_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(3600),
    max: days(365),
};
pub const DEFAULT_MAX_EXCEPTION: Duration = days(90);
pub const DEFAULT_OBSERVE_EVERY: Duration = Duration::from_secs(6 * 3600);
pub const DEFAULT_MIN_SOAK: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(7 * 24 * 3600);

impl Plan {
    /// How long the first phases wait after the start is announced: the longest `notice` of
    /// the plan's start announcements (none: they start at once).
    pub fn notice(&self) -> Duration {
        self.announcements
            .iter()
            .filter(|a| a.on.contains(&Moment::Start))
            .map(|a| a.notice)
            .max()
            .unwrap_or_default()
    }

    pub fn phase_index(&self, id: &str) -> Option<usize> {
        self.phases.iter().position(|p| p.id == id)
    }

    /// Every phase that must be promoted before `phase` may start, transitively.
    pub fn ancestors(&self, phase: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = self.phases[phase].after.clone();
        while let Some(next) = stack.pop() {
            if seen.insert(next) {
                stack.extend(self.phases[next].after.iter().copied());
            }
        }
        seen
    }

    /// The plan's warnings, located in `source` (the text it was parsed from) for display.
    pub fn warnings_in(&self, file: &str, source: &str) -> PlanWarnings {
        PlanWarnings {
            file: file.to_string(),
            source: source.to_string(),
            diagnostics: self.warnings.clone(),
        }
    }

    /// The phase graph, for display (`plan show --format dot`).
    pub fn graph(&self) -> DiGraph<String, ()> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = self
            .phases
            .iter()
            .map(|p| graph.add_node(format!("{} ({})", p.id, p.mode)))
            .collect();
        for (idx, phase) in self.phases.iter().enumerate() {
            for &pred in &phase.after {
                graph.add_edge(nodes[pred], nodes[idx], ());
            }
        }
        graph
    }
}

/// A duration setting as plans write them (`"2d"`, `"36h"`, `"1h 30m"`); adapters use it for theirs.
pub fn duration_setting(value: &Spanned<String>) -> Result<Duration, Diagnostic> {
    if let Some(unit) = ambiguous_unit(value.get_ref()) {
        return Err(Diagnostic::new(
            value.span(),
            format!(
                "`{}` uses `{unit}`, which reads as months here but as minutes to many: write \
                 days (\"30d\") or minutes (\"30m\")",
                value.get_ref()
            ),
        ));
    }
    humantime::parse_duration(value.get_ref()).map_err(|err| {
        Diagnostic::new(
            value.span(),
            format!(
                "invalid duration `{}` ({err}): expected a duration like \"2d\", \"36h\" or \"1h 30m\"",
                value.get_ref()
            ),
        )
    })
}

/// A month unit (`M`, `month`, `months`): humantime reads `1M` as a month of 30.44 days, while
/// people read a minute.
fn ambiguous_unit(text: &str) -> Option<&str> {
    text.split(|c: char| !c.is_ascii_alphabetic())
        .find(|unit| matches!(*unit, "M" | "month" | "months" | "mo"))
}

/// A duration setting within its range, or the problem at its place.
pub fn duration_within(
    value: &Spanned<String>,
    key: &str,
    range: DurationRange,
) -> Result<Duration, Diagnostic> {
    let duration = duration_setting(value)?;
    if duration < range.min || duration > range.max {
        return Err(Diagnostic::new(
            value.span(),
            format!(
                "`{key}` must be from {} to {}, found `{}`",
                super::time::format_span(range.min),
                super::time::format_span(range.max),
                value.get_ref()
            ),
        ));
    }
    Ok(duration)
}

/// An adapter's TOML table as the JSON object its adapter reads (and a record stores).
fn adapter_settings(table: toml::Table) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(table) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

pub fn hash_source(source: &str) -> String {
    hex::encode(Sha256::digest(source.as_bytes()))
}

/// Whether a plan's warnings are errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// As the plan says (`[rollout] strict`).
    AsWritten,
    /// Whatever the plan says (`plan check --strict`).
    Strict,
    /// Never: a plan the store holds was accepted when its rollout started, and what a later
    /// version warns about in it must not stop the rollout from loading.
    Lenient,
}

/// Parses and validates a plan; `file` is only used to name the file in errors. The plan's
/// warnings are in [`Plan::warnings`], unless the plan sets `strict`, which makes them errors.
pub fn parse(file: &str, source: &str) -> Result<Plan, PlanErrors> {
    check(file, source, Strictness::AsWritten)
}

/// [`parse`], with the plan's warnings weighed as `strictness` says.
pub fn check(file: &str, source: &str, strictness: Strictness) -> Result<Plan, PlanErrors> {
    let errors = |mut diagnostics: Vec<Diagnostic>| {
        diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
        PlanErrors {
            file: file.to_string(),
            source: source.to_string(),
            diagnostics,
        }
    };
    let (raw, tables): (RawPlan, _) = raw::read(source).map_err(|problems| {
        errors(
            problems
                .into_iter()
                .map(|problem| {
                    let hint = hint_for(source, problem.span.start);
                    Diagnostic::new(
                        problem.span,
                        format!("{}{hint}", describe_toml_error(&problem.message)),
                    )
                })
                .collect(),
        )
    })?;
    let mut checker = Checker {
        source,
        diagnostics: Vec::new(),
    };
    let plan = checker.plan(&raw, tables, hash_source(source));
    let mut plan = match plan {
        Some(plan) if checker.diagnostics.is_empty() => plan,
        _ => return Err(errors(checker.diagnostics)),
    };
    let found = warnings::of(&raw, &plan);
    let reason = match strictness {
        Strictness::Lenient => None,
        _ if plan.strict => Some("the plan sets `strict = true`"),
        Strictness::Strict => Some("the plan is checked strictly"),
        Strictness::AsWritten => None,
    };
    match reason {
        Some(reason) if !found.is_empty() => Err(errors(
            found
                .into_iter()
                .map(|warning| {
                    let why = warning.why.clone().unwrap_or_default();
                    warning.because(format!("{why}; an error here: {reason}"))
                })
                .collect(),
        )),
        _ => {
            plan.warnings = found;
            Ok(plan)
        }
    }
}

/// The share and duration settings are strings (`"2%"`, `"3d"`); a bare number there gets a hint
/// with the form expected, since `0.02` or `3` is what people try first.
fn hint_for(source: &str, offset: usize) -> &'static str {
    const SHARES: [&str; 5] = [
        "max_noncompliant_ratio",
        "min_reporting",
        "max_error_ratio",
        "noncompliant_ratio_above",
        "blocked_ratio_above",
    ];
    const DURATIONS: [&str; 8] = [
        "observe_every",
        "max_exception",
        "min_soak",
        "grace",
        "stale_after",
        "max_hold",
        "remediation_half_life",
        "request_timeout",
    ];
    let start = source
        .get(..offset.min(source.len()))
        .and_then(|before| before.rfind('\n'))
        .map_or(0, |i| i + 1);
    let line = source.get(start..).unwrap_or_default();
    let key = line.split('=').next().unwrap_or_default().trim();
    if SHARES.contains(&key) {
        "; a share is a percentage string, such as \"2%\" for 0.02"
    } else if DURATIONS.contains(&key) {
        "; a duration is a string, such as \"3d\", \"36h\" or \"1h 30m\""
    } else {
        ""
    }
}

fn describe_toml_error(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

/// Where a phase's parts are in the file, for checks made after the phase is built.
struct PhaseSpans {
    mode: Range<usize>,
    include: Range<usize>,
}

/// Collects diagnostics while building a plan; every check reports and carries on.
struct Checker<'s> {
    source: &'s str,
    diagnostics: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::new(span, message));
    }

    fn plan(
        &mut self,
        raw: &RawPlan,
        mut tables: Option<RawAdapterTables>,
        hash: String,
    ) -> Option<Plan> {
        let rollout_span = raw.rollout.span();
        let rollout = raw.rollout.get_ref();
        let name = self.name(&rollout.name);
        let observe_every = self.duration_in(
            rollout.observe_every.as_ref(),
            DEFAULT_OBSERVE_EVERY,
            "observe_every",
            OBSERVE_EVERY_RANGE,
        );
        let max_exception = self.duration_in(
            rollout.max_exception.as_ref(),
            DEFAULT_MAX_EXCEPTION,
            "max_exception",
            MAX_EXCEPTION_RANGE,
        );
        let policy = raw.policy.get_ref();
        let compliance = self.compliance(&policy.compliance, policy.platform.as_ref());
        let conditional_access = policy
            .conditional_access
            .as_ref()
            .and_then(|ca| self.non_empty(ca, "Conditional Access policy name"));
        let notification_template = policy
            .notification_template
            .as_ref()
            .and_then(|t| self.non_empty(t, "notification template name"));
        let provider_table = tables.as_mut().map(|t| std::mem::take(&mut t.provider));
        let provider = self.provider(&raw.provider.get_ref().kind, provider_table);
        if raw.phase.is_empty() {
            self.error(rollout_span.clone(), "a plan needs at least one [[phase]]");
        }
        let raw_spans: Vec<PhaseSpans> = raw
            .phase
            .iter()
            .map(|p| PhaseSpans {
                mode: p.get_ref().mode.span(),
                include: p.get_ref().include.span(),
            })
            .collect();
        let mut phases = self.phases(&raw.phase);
        let separation_of_duties = rollout
            .separation_of_duties
            .as_ref()
            .is_none_or(|s| *s.get_ref());
        let author = self.author(rollout.author.as_ref());
        let (approver_groups, groups_ok) = self.approver_groups(raw.approvers.as_ref());
        let (directory_approvers, directory_ok) =
            self.directory_approvers(raw.directory_approvers.as_ref(), &approver_groups);
        let groups_ok = groups_ok && directory_ok;
        let mut approvals_ok = groups_ok;
        if let Some((phases, _)) = phases.as_mut() {
            let gates: Vec<_> = raw
                .phase
                .iter()
                .map(|p| p.get_ref().gate.as_ref())
                .collect();
            let excluded = author.as_ref().and_then(|a| a.as_deref());
            let excluded = excluded.filter(|_| separation_of_duties);
            approvals_ok &= self
                .approval_policies(
                    &gates,
                    phases,
                    (&approver_groups, &directory_approvers),
                    groups_ok,
                    excluded,
                )
                .is_some();
        }
        let emergency_access = self.emergency_access(raw.emergency_access.as_ref());
        let freezes = self.freezes(&raw.freeze, &approver_groups);
        if let (Some((phases, _)), Some(emergency)) = (&phases, &emergency_access) {
            self.emergency_scopes(rollout_span.clone(), phases, emergency, &raw_spans);
        }
        let preflight = tables
            .as_mut()
            .map(|t| adapter_settings(std::mem::take(&mut t.preflight)))
            .unwrap_or_default();
        let known_groups: BTreeSet<String> = raw
            .phase
            .iter()
            .flat_map(|p| {
                let p = p.get_ref();
                p.include.get_ref().iter().chain(&p.exclude)
            })
            .map(|g| g.get_ref().trim().to_string())
            .collect();
        let announcements = self.announcements(
            &raw.announcement,
            tables.as_mut().map(|t| std::mem::take(&mut t.announcement)),
            &known_groups,
        );
        let mut tables = tables.map(|t| t.webhook.into_iter());
        let channels: Option<Vec<Channel>> = raw
            .webhook
            .iter()
            .map(|w| {
                let table = tables.as_mut().and_then(Iterator::next);
                self.webhook(w.get_ref(), table)
            })
            .collect();
        Some(Plan {
            channels: channels?,
            announcements: announcements?,
            name: name?,
            description: rollout.description.clone(),
            observe_every: observe_every?,
            separation_of_duties,
            author: approvals_ok.then_some(author?)?,
            approver_groups,
            directory_approvers,
            strict: rollout.strict,
            max_exception: max_exception?,
            policy: PolicyTarget {
                compliance: compliance?,
                conditional_access,
                notification_template,
            },
            emergency_access: emergency_access?,
            freezes: freezes?,
            preflight,
            provider: provider?,
            order: phases.as_ref()?.1.clone(),
            phases: phases?.0,
            hash,
            warnings: Vec::new(),
        })
    }

    /// `compliance = "X"` with `platform`, or `compliance = [{ name, platform }, ...]`.
    fn compliance(
        &mut self,
        value: &Spanned<toml::Value>,
        platform: Option<&Spanned<Platform>>,
    ) -> Option<Vec<CompliancePolicy>> {
        let span = value.span();
        let policies = match value.get_ref() {
            toml::Value::String(name) => {
                let Some(platform) = platform else {
                    self.error(
                        span,
                        "`compliance` names one policy, so [policy] needs its `platform` too",
                    );
                    return None;
                };
                vec![(name.clone(), Some(*platform.get_ref()))]
            }
            toml::Value::Array(items) => {
                if let Some(platform) = platform {
                    self.error(
                        platform.span(),
                        "with a list of compliance policies, each names its own `platform`; remove this one",
                    );
                    return None;
                }
                let mut policies = Vec::new();
                for item in items {
                    let entry = item.as_table().and_then(|t| {
                        let unknown = t.keys().find(|k| *k != "name" && *k != "platform");
                        if let Some(key) = unknown {
                            return Some(Err(format!(
                                "unknown key `{key}` in a compliance policy"
                            )));
                        }
                        let name = t.get("name")?.as_str()?.to_string();
                        let platform = t
                            .get("platform")
                            .and_then(|p| p.as_str())
                            .map(|p| Platform::ALL.into_iter().find(|x| x.as_str() == p));
                        Some(Ok((name, platform.flatten())))
                    });
                    match entry {
                        Some(Ok(entry)) => policies.push(entry),
                        Some(Err(message)) => {
                            self.error(span.clone(), message);
                            return None;
                        }
                        None => {
                            self.error(
                                span.clone(),
                                "each compliance policy is a table `{ name = \"...\", platform = \"windows\" }`",
                            );
                            return None;
                        }
                    }
                }
                policies
            }
            _ => {
                self.error(
                    span,
                    "`compliance` is a policy name, or a list of `{ name, platform }` tables",
                );
                return None;
            }
        };
        if policies.is_empty() {
            self.error(span, "`compliance` needs at least one policy");
            return None;
        }
        let mut out: Vec<CompliancePolicy> = Vec::new();
        for (name, platform) in policies {
            let Some(platform) = platform else {
                self.error(
                    span.clone(),
                    format!(
                        "compliance policy `{name}` needs a `platform`: windows, ios, android or macos"
                    ),
                );
                return None;
            };
            if name.trim().is_empty() {
                self.error(span.clone(), "a compliance policy name must not be empty");
                return None;
            }
            if let Some(other) = out.iter().find(|c| c.platform == platform) {
                self.error(
                    span.clone(),
                    format!(
                        "two compliance policies for {platform} (`{}` and `{name}`): a rollout manages one policy per platform",
                        other.name
                    ),
                );
                return None;
            }
            out.push(CompliancePolicy {
                name: name.trim().to_string(),
                platform,
            });
        }
        Some(out)
    }

    fn emergency_access(
        &mut self,
        raw: Option<&Spanned<RawEmergencyAccess>>,
    ) -> Option<EmergencyAccess> {
        let Some(raw) = raw else {
            return Some(EmergencyAccess::default());
        };
        let mut names = |list: &[Spanned<String>], what: &str| -> Option<Vec<String>> {
            let mut out: Vec<String> = Vec::new();
            for item in list {
                let name = item.get_ref().trim();
                if name.is_empty() {
                    self.error(
                        item.span(),
                        format!("an emergency-access {what} must not be empty"),
                    );
                    return None;
                }
                if !out.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                    out.push(name.to_string());
                }
            }
            Some(out)
        };
        let groups = names(&raw.get_ref().groups, "group");
        let users = names(&raw.get_ref().users, "user");
        let access = EmergencyAccess {
            groups: groups?,
            users: users?,
        };
        if access.is_empty() {
            self.error(
                raw.span(),
                "[emergency_access] names no group and no user: list the break-glass accounts",
            );
            return None;
        }
        Some(access)
    }

    /// Emergency-access accounts are never in an enforcement scope: a plan that enforces must
    /// name them, every enforce phase excludes their groups, and no phase includes one.
    fn emergency_scopes(
        &mut self,
        rollout_span: Range<usize>,
        phases: &[Phase],
        emergency: &EmergencyAccess,
        spans: &[PhaseSpans],
    ) {
        let enforcing: Vec<usize> = (0..phases.len())
            .filter(|&i| phases[i].mode == Mode::Enforce)
            .collect();
        if !enforcing.is_empty() && emergency.is_empty() {
            self.error(
                rollout_span,
                format!(
                    "phase `{}` enforces, so the plan must name its emergency-access accounts: add [emergency_access] with `groups` and/or `users`",
                    phases[enforcing[0]].id
                ),
            );
            return;
        }
        for (phase, span) in phases.iter().zip(spans) {
            for group in &emergency.groups {
                if phase.include.iter().any(|g| g.eq_ignore_ascii_case(group)) {
                    self.error(
                        span.include.clone(),
                        format!(
                            "phase `{}` includes the emergency-access group `{group}`; emergency access is never in scope",
                            phase.id
                        ),
                    );
                } else if phase.mode == Mode::Enforce
                    && !phase.exclude.iter().any(|g| g.eq_ignore_ascii_case(group))
                {
                    self.error(
                        span.mode.clone(),
                        format!(
                            "phase `{}` enforces without excluding the emergency-access group `{group}`: add it to `exclude`",
                            phase.id
                        ),
                    );
                }
            }
        }
    }

    fn name(&mut self, name: &Spanned<String>) -> Option<String> {
        let text = name.get_ref();
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            self.error(
                name.span(),
                format!(
                    "invalid rollout name `{text}`: expected 1 to 64 letters, digits, `-`, `_` or `.`"
                ),
            );
            return None;
        }
        Some(text.clone())
    }

    /// `[rollout] author`: a person's name, as a key.
    fn author(&mut self, author: Option<&Spanned<String>>) -> Option<Option<String>> {
        let Some(author) = author else {
            return Some(None);
        };
        if let Some(problem) = approval::identity_problem(author.get_ref()) {
            self.error(author.span(), format!("invalid `author`: {problem}"));
            return None;
        }
        Some(Some(identity_key(author.get_ref())))
    }

    fn non_empty(&mut self, value: &Spanned<String>, what: &str) -> Option<String> {
        if value.get_ref().trim().is_empty() {
            self.error(value.span(), format!("the {what} must not be empty"));
            return None;
        }
        Some(value.get_ref().trim().to_string())
    }

    /// A duration setting within its range, or its default.
    fn duration_in(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        key: &str,
        range: DurationRange,
    ) -> Option<Duration> {
        let Some(value) = value else {
            return Some(default);
        };
        match duration_within(value, key, range) {
            Ok(duration) => Some(duration),
            Err(diagnostic) => {
                self.diagnostics.push(diagnostic);
                None
            }
        }
    }

    fn ratio(&mut self, value: Option<&Spanned<String>>) -> Result<Option<Ratio>, ()> {
        let Some(value) = value else { return Ok(None) };
        match Ratio::parse_percent(value.get_ref()) {
            Some(ratio) => Ok(Some(ratio)),
            None => {
                self.error(
                    value.span(),
                    format!(
                        "invalid percentage `{}`: expected a value from \"0%\" to \"100%\", such as \"2%\" or \"0.5%\"",
                        value.get_ref()
                    ),
                );
                Err(())
            }
        }
    }

    fn count(&mut self, value: Option<&Spanned<i64>>, max: i64) -> Result<Option<u64>, ()> {
        let Some(value) = value else { return Ok(None) };
        let number = *value.get_ref();
        if !(0..=max).contains(&number) {
            self.error(
                value.span(),
                format!("expected a whole number from 0 to {max}, found {number}"),
            );
            return Err(());
        }
        Ok(Some(number as u64))
    }

    /// The provider's kind; its settings are the rest of the table, for its adapter.
    fn provider(
        &mut self,
        kind: &Spanned<String>,
        table: Option<toml::Table>,
    ) -> Option<ProviderConfig> {
        if kind.get_ref().trim().is_empty() {
            self.error(kind.span(), "the provider's `kind` must not be empty");
            return None;
        }
        let mut settings = adapter_settings(table?);
        settings.remove("kind");
        Some(ProviderConfig {
            kind: kind.get_ref().clone(),
            settings,
        })
    }

    /// A `[[webhook]]`: the statuses it announces are checked here; its address is the webhook
    /// adapter's.
    fn webhook(&mut self, raw: &RawWebhook, table: Option<toml::Table>) -> Option<Channel> {
        let events = match &raw.events {
            None => Some(DEFAULT_WEBHOOK_EVENTS.to_vec()),
            Some(list) => {
                let mut events = Vec::new();
                let mut ok = true;
                for name in list.get_ref() {
                    match RolloutStatus::ALL
                        .iter()
                        .find(|s| s.as_str() == name.get_ref())
                    {
                        Some(status) => events.push(*status),
                        None => {
                            let names: Vec<&str> =
                                RolloutStatus::ALL.iter().map(|s| s.as_str()).collect();
                            self.error(
                                name.span(),
                                format!(
                                    "unknown status `{name}`; statuses are: {}",
                                    names.join(", ")
                                ),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then_some(events)
            }
        };
        let mut settings = adapter_settings(table?);
        settings.remove("events");
        Some(Channel {
            events: events?,
            address: ChannelAddress::new(ChannelAddress::WEBHOOK, settings),
        })
    }

    fn phases(&mut self, raw: &[Spanned<RawPhase>]) -> Option<(Vec<Phase>, Vec<usize>)> {
        if let Some(extra) = raw.get(MAX_PHASES) {
            self.error(
                extra.span(),
                format!(
                    "a plan has at most {MAX_PHASES} phases; this one has {}",
                    raw.len()
                ),
            );
            return None;
        }
        let mut index_of: HashMap<String, usize> = HashMap::new();
        let mut unique = true;
        for (idx, phase) in raw.iter().enumerate() {
            let id = phase.get_ref().id.get_ref();
            if !valid_phase_id(id) {
                self.error(
                    phase.get_ref().id.span(),
                    format!(
                        "invalid phase id `{id}`: expected 1 to 64 letters, digits, `-` or `_`"
                    ),
                );
                unique = false;
            } else if let Some(&first) = index_of.get(id) {
                let first_line = position(self.source, raw[first].get_ref().id.span().start).line;
                self.error(
                    phase.get_ref().id.span(),
                    format!("duplicate phase id `{id}`; it is first defined on line {first_line}"),
                );
                unique = false;
            } else {
                index_of.insert(id.clone(), idx);
            }
        }
        let known: Vec<&str> = raw
            .iter()
            .map(|p| p.get_ref().id.get_ref().as_str())
            .collect();
        let mut afters = Vec::with_capacity(raw.len());
        let mut resolved = unique;
        for (idx, phase) in raw.iter().enumerate() {
            let (after, ok) = self.after(phase.get_ref(), idx, &index_of, &known);
            resolved &= ok;
            afters.push(after);
        }
        let phases: Vec<Option<Phase>> = raw
            .iter()
            .zip(&afters)
            .map(|(phase, after)| self.phase(phase.get_ref(), after.clone()))
            .collect();
        // The edges that did resolve are still checked, so one run reports every problem.
        self.modes_never_weaken(raw, &afters);
        let order = self.graph(raw, &afters);
        if !resolved {
            return None;
        }
        let phases: Option<Vec<Phase>> = phases.into_iter().collect();
        Some((phases?, order?))
    }

    fn after(
        &mut self,
        phase: &RawPhase,
        idx: usize,
        index_of: &HashMap<String, usize>,
        known: &[&str],
    ) -> (Vec<usize>, bool) {
        let Some(after) = &phase.after else {
            return (if idx == 0 { vec![] } else { vec![idx - 1] }, true);
        };
        let mut resolved = Vec::new();
        let mut ok = true;
        for name in after.get_ref() {
            match index_of.get(name.get_ref()) {
                Some(&target) if resolved.contains(&target) => {
                    self.error(
                        name.span(),
                        format!("`{}` is listed twice in `after`", name),
                    );
                    ok = false;
                }
                Some(&target) => resolved.push(target),
                None => {
                    self.error(
                        name.span(),
                        format!(
                            "unknown phase `{}` in `after`; the phases are: {}",
                            name,
                            known.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
        }
        (resolved, ok)
    }

    fn phase(&mut self, raw: &RawPhase, after: Vec<usize>) -> Option<Phase> {
        let include = self.groups(&raw.include);
        if let Some(extra) = raw.exclude.get(MAX_GROUPS) {
            self.error(
                extra.span(),
                format!(
                    "a phase excludes at most {MAX_GROUPS} groups; this one lists {}",
                    raw.exclude.len()
                ),
            );
            return None;
        }
        let exclude: Vec<String> = raw.exclude.iter().map(|g| g.get_ref().clone()).collect();
        for group in &raw.exclude {
            if raw
                .include
                .get_ref()
                .iter()
                .any(|i| i.get_ref() == group.get_ref())
            {
                self.error(
                    group.span(),
                    format!("group `{group}` is both included and excluded"),
                );
            } else if group.get_ref().trim().is_empty() {
                self.error(group.span(), "a group name must not be empty");
            }
        }
        let min_soak = self.duration_in(
            raw.min_soak.as_ref(),
            DEFAULT_MIN_SOAK,
            "min_soak",
            MIN_SOAK_RANGE,
        );
        let grace = self.grace(raw);
        let gate = self.gate(raw.gate.as_ref().map(|g| g.get_ref()));
        let rollback_when = self.rollback_when(raw.rollback_when.as_ref().map(|r| r.get_ref()));
        if let (Some(gate), Some(rollback)) = (&gate, &rollback_when)
            && !super::signins::wanted(gate, rollback)
            && let Some(raw_gate) = raw.gate.as_ref().map(|g| g.get_ref())
        {
            for (key, span) in [
                (
                    "signin_window",
                    raw_gate.signin_window.as_ref().map(|v| v.span()),
                ),
                (
                    "signin_data",
                    raw_gate.signin_data.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = span {
                    self.error(
                        span,
                        format!("`{key}` only applies with a sign-in criterion (`max_blocked_signins`, `max_blocked_signin_ratio`, or `blocked_signins_above` / `blocked_signin_ratio_above` in `rollback_when`)"),
                    );
                }
            }
        }
        Some(Phase {
            id: raw.id.get_ref().clone(),
            description: raw.description.clone(),
            mode: *raw.mode.get_ref(),
            include: include?,
            exclude,
            after,
            min_soak: min_soak?,
            grace: grace.ok()?,
            gate: gate?,
            rollback_when: rollback_when?,
            approval: ApprovalPolicy::default(),
        })
    }

    fn groups(&mut self, include: &Spanned<Vec<Spanned<String>>>) -> Option<Vec<String>> {
        if include.get_ref().len() > MAX_GROUPS {
            self.error(
                include.span(),
                format!(
                    "a phase includes at most {MAX_GROUPS} groups; this one lists {}",
                    include.get_ref().len()
                ),
            );
            return None;
        }
        if include.get_ref().is_empty() {
            self.error(
                include.span(),
                "empty scope: `include` needs at least one group",
            );
            return None;
        }
        let mut seen = BTreeSet::new();
        let mut ok = true;
        for group in include.get_ref() {
            if group.get_ref().trim().is_empty() {
                self.error(group.span(), "a group name must not be empty");
                ok = false;
            } else if !seen.insert(group.get_ref().clone()) {
                self.error(group.span(), format!("group `{group}` is listed twice"));
                ok = false;
            }
        }
        ok.then(|| {
            include
                .get_ref()
                .iter()
                .map(|g| g.get_ref().clone())
                .collect()
        })
    }

    fn grace(&mut self, raw: &RawPhase) -> Result<Option<Duration>, ()> {
        match (raw.mode.get_ref(), &raw.grace) {
            (Mode::Notify, Some(grace)) => match duration_within(grace, "grace", GRACE_RANGE) {
                Ok(grace) => Ok(Some(grace)),
                Err(diagnostic) => {
                    self.diagnostics.push(diagnostic);
                    Err(())
                }
            },
            (Mode::Notify, None) => {
                self.error(
                    raw.mode.span(),
                    "a notify phase needs a `grace` period, such as grace = \"7d\"",
                );
                Err(())
            }
            (mode, Some(grace)) => {
                self.error(
                    grace.span(),
                    format!("`grace` only applies to notify phases; this phase is {mode}"),
                );
                Err(())
            }
            (_, None) => Ok(None),
        }
    }

    fn gate(&mut self, raw: Option<&RawGate>) -> Option<Gate> {
        let default = RawGate::default();
        let raw = raw.unwrap_or(&default);
        let max_noncompliant = self.count(raw.max_noncompliant.as_ref(), MAX_COUNT);
        let max_noncompliant_ratio = self.ratio(raw.max_noncompliant_ratio.as_ref());
        let min_reporting = self.ratio(raw.min_reporting.as_ref());
        let stale_after = self.duration_in(
            raw.stale_after.as_ref(),
            DEFAULT_STALE_AFTER,
            "stale_after",
            STALE_AFTER_RANGE,
        );
        let max_errors = self.count(raw.max_errors.as_ref(), MAX_COUNT);
        let max_error_ratio = self.ratio(raw.max_error_ratio.as_ref());
        let approvals = self.count(raw.approvals.as_ref(), MAX_APPROVALS);
        let max_hold = self.duration_in(
            raw.max_hold.as_ref(),
            DEFAULT_MAX_HOLD,
            "max_hold",
            MAX_HOLD_RANGE,
        );
        let max_blocked_signins = self.count(raw.max_blocked_signins.as_ref(), MAX_COUNT);
        let max_blocked_signin_ratio = self.ratio(raw.max_blocked_signin_ratio.as_ref());
        let signin_window = self.duration_in(
            raw.signin_window.as_ref(),
            DEFAULT_SIGNIN_WINDOW,
            "signin_window",
            SIGNIN_WINDOW_RANGE,
        );
        let signin_data = self.signin_data(raw.signin_data.as_ref());
        Some(Gate {
            max_noncompliant: max_noncompliant.ok()?,
            max_noncompliant_ratio: max_noncompliant_ratio.ok()?,
            min_reporting: min_reporting.ok()?,
            stale_after: stale_after?,
            max_errors: max_errors.ok()?,
            max_error_ratio: max_error_ratio.ok()?,
            approvals: approvals.ok()?.unwrap_or(0) as u32,
            max_hold: max_hold?,
            max_blocked_signins: max_blocked_signins.ok()?,
            max_blocked_signin_ratio: max_blocked_signin_ratio.ok()?,
            signin_window: signin_window?,
            signin_data: signin_data?,
        })
    }

    fn signin_data(&mut self, value: Option<&Spanned<String>>) -> Option<SignInData> {
        match value.map(|v| (v, v.get_ref().as_str())) {
            None => Some(SignInData::Required),
            Some((_, "required")) => Some(SignInData::Required),
            Some((_, "optional")) => Some(SignInData::Optional),
            Some((v, other)) => {
                self.error(
                    v.span(),
                    format!("`signin_data` is \"required\" or \"optional\", not {other:?}"),
                );
                None
            }
        }
    }

    fn rollback_when(&mut self, raw: Option<&RawRollbackWhen>) -> Option<RollbackWhen> {
        let default = RawRollbackWhen::default();
        let raw = raw.unwrap_or(&default);
        let noncompliant_ratio_above = self.ratio(raw.noncompliant_ratio_above.as_ref());
        let noncompliant_above = self.count(raw.noncompliant_above.as_ref(), MAX_COUNT);
        let errors_above = self.count(raw.errors_above.as_ref(), MAX_COUNT);
        let blocked_ratio_above = self.ratio(raw.blocked_ratio_above.as_ref());
        let blocked_signins_above = self.count(raw.blocked_signins_above.as_ref(), MAX_COUNT);
        let blocked_signin_ratio_above = self.ratio(raw.blocked_signin_ratio_above.as_ref());
        Some(RollbackWhen {
            noncompliant_ratio_above: noncompliant_ratio_above.ok()?,
            noncompliant_above: noncompliant_above.ok()?,
            errors_above: errors_above.ok()?,
            blocked_ratio_above: blocked_ratio_above.ok()?,
            blocked_signins_above: blocked_signins_above.ok()?,
            blocked_signin_ratio_above: blocked_signin_ratio_above.ok()?,
        })
    }

    /// Builds the phase graph; reports cycles and the phases stuck behind them.
    fn graph(&mut self, raw: &[Spanned<RawPhase>], afters: &[Vec<usize>]) -> Option<Vec<usize>> {
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..raw.len()).map(|i| graph.add_node(i)).collect();
        for (idx, after) in afters.iter().enumerate() {
            for &pred in after {
                graph.add_edge(nodes[pred], nodes[idx], ());
            }
        }
        if toposort(&graph, None).is_ok() {
            return Some(file_order_topological(afters));
        }
        let id = |i: usize| raw[i].get_ref().id.get_ref().as_str();
        let mut in_cycle = BTreeSet::new();
        for component in tarjan_scc(&graph) {
            let members: BTreeSet<usize> = component.iter().map(|&n| graph[n]).collect();
            let first = *members.first().expect("components are never empty");
            let is_cycle = members.len() > 1 || afters[first].contains(&first);
            if !is_cycle {
                continue;
            }
            let cycle = cycle_path(first, &members, afters);
            let names: Vec<&str> = cycle.iter().map(|&i| id(i)).collect();
            let span = raw[first]
                .get_ref()
                .after
                .as_ref()
                .map_or_else(|| raw[first].get_ref().id.span(), |a| a.span());
            self.error(
                span,
                format!("the phases form a cycle: {}", names.join(" → ")),
            );
            in_cycle.extend(members);
        }
        for (idx, phase) in raw.iter().enumerate() {
            if in_cycle.contains(&idx) {
                continue;
            }
            let blocked_by = ancestors_nearest_first(idx, afters)
                .into_iter()
                .find(|a| in_cycle.contains(a));
            if let Some(blocker) = blocked_by {
                self.error(
                    phase.get_ref().id.span(),
                    format!(
                        "phase `{}` is unreachable: it waits on `{}`, which is part of a cycle",
                        id(idx),
                        id(blocker)
                    ),
                );
            }
        }
        None
    }

    fn modes_never_weaken(&mut self, raw: &[Spanned<RawPhase>], afters: &[Vec<usize>]) {
        for (idx, after) in afters.iter().enumerate() {
            let phase = raw[idx].get_ref();
            for &pred in after {
                let before = raw[pred].get_ref();
                if phase.mode.get_ref() < before.mode.get_ref() {
                    self.error(
                        phase.mode.span(),
                        format!(
                            "mode weakens along an edge: `{}` ({}) runs after `{}` ({}); a later phase must keep or strengthen the mode",
                            phase.id,
                            phase.mode.get_ref(),
                            before.id,
                            before.mode.get_ref()
                        ),
                    );
                }
            }
        }
    }
}

/// A topological order that keeps file order wherever the graph allows (Kahn's algorithm,
/// always taking the earliest ready phase), so `plan show` reads like the file.
fn file_order_topological(afters: &[Vec<usize>]) -> Vec<usize> {
    let mut waiting: Vec<usize> = afters.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..afters.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(afters.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for (succ, after) in afters.iter().enumerate() {
            if after.contains(&next) {
                waiting[succ] -= 1;
                if waiting[succ] == 0 {
                    ready.insert(succ);
                }
            }
        }
    }
    order
}

fn valid_phase_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Transitive `after` of a phase in breadth-first order, so the nearest ancestor comes first.
fn ancestors_nearest_first(idx: usize, afters: &[Vec<usize>]) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    let mut queue: std::collections::VecDeque<usize> = afters[idx].iter().copied().collect();
    while let Some(next) = queue.pop_front() {
        if seen.insert(next) {
            order.push(next);
            queue.extend(afters[next].iter().copied());
        }
    }
    order
}

/// A path through `members` that returns to `start`, following `after` edges backwards so the
/// names read in execution order (`a → b → a` means b runs after a, and a after b).
fn cycle_path(start: usize, members: &BTreeSet<usize>, afters: &[Vec<usize>]) -> Vec<usize> {
    // Depth-first search over "runs after" edges inside the component.
    let successors = |n: usize| -> Vec<usize> {
        (0..afters.len())
            .filter(|&s| members.contains(&s) && afters[s].contains(&n))
            .collect()
    };
    let mut path = vec![start];
    let mut visited = BTreeSet::from([start]);
    fn walk(
        node: usize,
        start: usize,
        path: &mut Vec<usize>,
        visited: &mut BTreeSet<usize>,
        successors: &dyn Fn(usize) -> Vec<usize>,
    ) -> bool {
        for next in successors(node) {
            if next == start {
                path.push(start);
                return true;
            }
            if visited.insert(next) {
                path.push(next);
                if walk(next, start, path, visited, successors) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(start, start, &mut path, &mut visited, &successors);
    path
}

#[cfg(test)]
mod tests;
