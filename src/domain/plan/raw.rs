//! The plan file exactly as written: serde types that mirror the TOML, with spans kept on every
//! value a later check may need to point at. Unknown keys are rejected here, so a typo like
//! `min_soke` is reported with its position instead of being silently ignored — except in the
//! tables adapters own (`[provider]`, `[[webhook]]`, `[preflight]`), whose keys their adapter
//! checks.
//!
//! [`read`] reports every structural problem of a file at once: it parses the document into a
//! spanned tree first, then deserializes each table on its own, and within a table goes on past
//! a key that is unknown or of the wrong type, so that two mistakes in two places are two errors
//! of one run, not two runs.

use std::ops::Range;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

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
    /// `[approvers]`: named groups of people a gate may ask for approval.
    pub approvers: Option<Spanned<RawApproverGroups>>,
    /// `[directory_approvers]`: approver groups whose members the provider's directory has.
    pub directory_approvers: Option<Spanned<RawDirectoryApprovers>>,
    /// `[[announcement]]`: telling the organisation (`announce.rs`).
    #[serde(default)]
    pub announcement: Vec<Spanned<RawAnnouncement>>,
    /// `[[freeze]]`: windows in which no phase is promoted.
    #[serde(default)]
    pub freeze: Vec<Spanned<RawFreeze>>,
}

/// A `[[freeze]]` window: one of `weekly`, `from`/`to` or `dates`, in `time_zone`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFreeze {
    pub name: Spanned<String>,
    pub time_zone: Option<Spanned<String>>,
    pub weekly: Option<Spanned<RawWeekly>>,
    pub from: Option<Spanned<String>>,
    pub to: Option<Spanned<String>>,
    pub dates: Option<Spanned<Vec<Spanned<String>>>>,
    pub override_by: Option<Spanned<Vec<Spanned<String>>>>,
    pub override_groups: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `weekly = { from = "fri 12:00", to = "mon 06:00" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeekly {
    pub from: Spanned<String>,
    pub to: Spanned<String>,
}

/// `[approvers]`: group name → the people in it.
/// `[directory_approvers]`: approver group name → the directory group's name.
pub(super) type RawDirectoryApprovers =
    std::collections::BTreeMap<Spanned<String>, Spanned<String>>;

pub(super) type RawApproverGroups =
    std::collections::BTreeMap<Spanned<String>, Spanned<Vec<Spanned<String>>>>;

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

/// The domain's part of an `[[announcement]]` table: when, to whom, with which words. The
/// other keys belong to the adapter of its `channel`, which checks them (`crate::adapters`).
#[derive(Debug, Deserialize)]
pub(super) struct RawAnnouncement {
    pub channel: Spanned<String>,
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    pub subject: Option<Spanned<String>>,
    pub template: Spanned<String>,
    pub notice: Option<Spanned<String>>,
}

impl RawAnnouncement {
    /// The keys the domain reads; every other key of the table is the channel adapter's.
    pub const DOMAIN_KEYS: &'static [&'static str] = &[
        "channel",
        "on",
        "groups",
        "addresses",
        "subject",
        "template",
        "notice",
    ];
}

/// The tables adapters own, whole: their keys become the adapter's settings.
#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct RawAdapterTables {
    pub provider: toml::Table,
    #[serde(default)]
    pub webhook: Vec<toml::Table>,
    /// `[preflight]`: what the readiness checks read (`crate::preflight::settings`).
    #[serde(default)]
    pub preflight: toml::Table,
    /// `[[announcement]]`, whole: the channel adapter's keys among the domain's.
    #[serde(default)]
    pub announcement: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub observe_every: Option<Spanned<String>>,
    /// Unset: on (the default for every phase that needs approval).
    pub separation_of_duties: Option<Spanned<bool>>,
    /// Who wrote the plan; with separation of duties, they may not approve it either.
    pub author: Option<Spanned<String>>,
    /// Warnings are errors for this plan, as with `plan check --strict`.
    #[serde(default)]
    pub strict: bool,
    /// How far ahead an exception may be granted.
    pub max_exception: Option<Spanned<String>>,
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
    /// People who may approve, by name (with `approver_groups`: anyone in either).
    pub approvers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Groups of `[approvers]` whose members may approve.
    pub approver_groups: Option<Spanned<Vec<Spanned<String>>>>,
    pub approval_expires_after: Option<Spanned<String>>,
    pub require_ticket: Option<Spanned<bool>>,
    pub ticket_pattern: Option<Spanned<String>>,
    /// How far the gate's evidence may move between an approval and the promotion.
    pub approval_tolerance: Option<Spanned<String>>,
    pub max_blocked_signins: Option<Spanned<i64>>,
    pub max_blocked_signin_ratio: Option<Spanned<String>>,
    pub signin_window: Option<Spanned<String>>,
    pub signin_data: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollbackWhen {
    pub noncompliant_ratio_above: Option<Spanned<String>>,
    pub noncompliant_above: Option<Spanned<i64>>,
    pub errors_above: Option<Spanned<i64>>,
    pub blocked_ratio_above: Option<Spanned<String>>,
    pub blocked_signins_above: Option<Spanned<i64>>,
    pub blocked_signin_ratio_above: Option<Spanned<String>>,
}

/// A structural problem: the file is not TOML, or not a plan's shape.
#[derive(Debug)]
pub(super) struct Problem {
    pub span: Range<usize>,
    pub message: String,
}

impl Problem {
    fn of(err: &toml::de::Error, otherwise: Range<usize>) -> Problem {
        Problem {
            span: err.span().unwrap_or(otherwise),
            message: err.message().to_string(),
        }
    }
}

/// The tables a plan may have.
const TABLES: [&str; 11] = [
    "rollout",
    "policy",
    "provider",
    "phase",
    "webhook",
    "emergency_access",
    "preflight",
    "approvers",
    "directory_approvers",
    "announcement",
    "freeze",
];

/// How many problems one table reports before the rest of it is left for the next run.
const PROBLEMS_PER_TABLE: usize = 32;

/// The plan as written, or every structural problem found in it: a syntax error (TOML has one
/// per run: what follows it cannot be read reliably), and every unknown key, value of the wrong
/// type and missing key, table by table.
///
/// With it, the tables adapters own as the same parse found them (`None` if they do not have the
/// adapters' shape, which the plan's own reading reports): a plan is parsed once.
pub(super) fn read(source: &str) -> Result<(RawPlan, Option<RawAdapterTables>), Vec<Problem>> {
    let root = DeTable::parse(source).map_err(|err| vec![Problem::of(&err, 0..0)])?;
    let mut root = root.into_inner();
    let adapter_tables = adapter_tables(&root);
    let mut problems = Vec::new();
    for key in root.keys() {
        if !TABLES.contains(&key.get_ref().as_ref()) {
            let expected: Vec<String> = TABLES.iter().map(|t| format!("`{t}`")).collect();
            problems.push(Problem {
                span: key.span(),
                message: format!(
                    "unknown field `{}`, expected one of {}",
                    key.get_ref(),
                    expected.join(", ")
                ),
            });
        }
    }
    let mut required = |name: &str, problems: &mut Vec<Problem>| {
        let value = root.remove(name);
        if value.is_none() {
            problems.push(Problem {
                span: 0..0,
                message: format!("missing field `{name}`"),
            });
        }
        value
    };
    let rollout = required("rollout", &mut problems);
    let policy = required("policy", &mut problems);
    let provider = required("provider", &mut problems);
    let rollout = rollout.and_then(|v| typed::<RawRollout>(v, &mut problems));
    let policy = policy.and_then(|v| typed::<RawPolicy>(v, &mut problems));
    let provider = provider.and_then(|v| typed::<RawProvider>(v, &mut problems));
    let phase = root
        .remove("phase")
        .map(|v| each::<RawPhase>(v, &mut problems));
    let webhook = root
        .remove("webhook")
        .map(|v| each::<RawWebhook>(v, &mut problems));
    let emergency_access = root
        .remove("emergency_access")
        .map(|v| typed::<RawEmergencyAccess>(v, &mut problems));
    let approvers = root
        .remove("approvers")
        .map(|v| typed::<RawApproverGroups>(v, &mut problems));
    let directory_approvers = root
        .remove("directory_approvers")
        .map(|v| typed::<RawDirectoryApprovers>(v, &mut problems));
    let announcement = root
        .remove("announcement")
        .map(|v| each::<RawAnnouncement>(v, &mut problems));
    let freeze = root
        .remove("freeze")
        .map(|v| each::<RawFreeze>(v, &mut problems));
    if !problems.is_empty() {
        return Err(problems);
    }
    let missing = "every table read, or a problem reported";
    let plan = RawPlan {
        rollout: rollout.expect(missing),
        policy: policy.expect(missing),
        provider: provider.expect(missing),
        phase: phase.unwrap_or(Some(Vec::new())).expect(missing),
        webhook: webhook.unwrap_or(Some(Vec::new())).expect(missing),
        emergency_access: emergency_access.map(|e| e.expect(missing)),
        approvers: approvers.map(|a| a.expect(missing)),
        directory_approvers: directory_approvers.map(|a| a.expect(missing)),
        announcement: announcement.unwrap_or(Some(Vec::new())).expect(missing),
        freeze: freeze.unwrap_or(Some(Vec::new())).expect(missing),
    };
    Ok((plan, adapter_tables))
}

/// The top-level tables [`RawAdapterTables`] reads.
const ADAPTER_TABLES: &[&str] = &["provider", "webhook", "preflight", "announcement"];

/// The adapters' tables, read from the document already parsed.
fn adapter_tables(root: &DeTable<'_>) -> Option<RawAdapterTables> {
    let subset: DeTable<'_> = root
        .iter()
        .filter(|(key, _)| ADAPTER_TABLES.contains(&key.get_ref().as_ref()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let value = Spanned::new(0..0, DeValue::Table(subset));
    RawAdapterTables::deserialize(ValueDeserializer::from(value)).ok()
}

/// An array of tables (`[[phase]]`), each table read on its own.
fn each<T: DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    problems: &mut Vec<Problem>,
) -> Option<Vec<Spanned<T>>> {
    let DeValue::Array(items) = value.get_ref() else {
        // Not an array: deserializing it as one says so, at its place.
        let span = value.span();
        if let Err(err) = Vec::<Spanned<T>>::deserialize(ValueDeserializer::from(value)) {
            problems.push(Problem::of(&err, span));
        }
        return None;
    };
    let mut all = Some(Vec::with_capacity(items.len()));
    for item in items.iter() {
        match typed::<T>(item.clone(), problems) {
            Some(table) => {
                if let Some(all) = all.as_mut() {
                    all.push(table);
                }
            }
            None => all = None,
        }
    }
    all
}

/// One table as its type. A key that is unknown or of the wrong type is reported and taken out,
/// and the table read again, so every such key is reported; a required key taken out this way
/// is not reported again as missing.
fn typed<T: DeserializeOwned>(
    mut value: Spanned<DeValue<'_>>,
    problems: &mut Vec<Problem>,
) -> Option<Spanned<T>> {
    let mut removed: Vec<String> = Vec::new();
    let mut found = 0;
    loop {
        let err = match Spanned::<T>::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(table) => return (found == 0).then_some(table),
            Err(err) => err,
        };
        let consequence = removed
            .iter()
            .any(|key| err.message() == format!("missing field `{key}`"));
        if consequence {
            return None;
        }
        let problem = Problem::of(&err, value.span());
        found += 1;
        let taken =
            found < PROBLEMS_PER_TABLE && take_out(value.get_mut(), &problem.span, &mut removed);
        problems.push(problem);
        if !taken {
            return None;
        }
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Takes out of `value` the deepest key whose name or value holds `span`; false if none does.
fn take_out(value: &mut DeValue<'_>, span: &Range<usize>, removed: &mut Vec<String>) -> bool {
    match value {
        DeValue::Table(table) => {
            let mut hit = None;
            for (key, child) in table.iter_mut() {
                if take_out(child.get_mut(), span, removed) {
                    return true;
                }
                if contains(&key.span(), span) || contains(&child.span(), span) {
                    hit = Some(key.get_ref().to_string());
                    break;
                }
            }
            match hit {
                Some(key) => {
                    table.remove(key.as_str());
                    removed.push(key);
                    true
                }
                None => false,
            }
        }
        DeValue::Array(items) => items
            .iter_mut()
            .any(|item| take_out(item.get_mut(), span, removed)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapters' tables taken from the plan's one parse are those a parse of their own finds,
    /// for every shipped plan and one with every adapter table: a table added to
    /// [`RawAdapterTables`] and not to [`ADAPTER_TABLES`] fails here.
    #[test]
    fn adapter_tables_come_from_the_one_parse() {
        let every_table = r#"
[rollout]
name = "r"
[policy]
compliance = "p"
platform = "windows"
[provider]
kind = "simulator"
devices = 10
[[webhook]]
url = "http://127.0.0.1:9/hook"
[[webhook]]
url = "http://127.0.0.1:9/other"
[preflight]
domains = ["example.com"]
[[announcement]]
channel = "slack"
template = "{plan} starts"
url = "https://hooks.slack.com/services/T0/B0/x"
"#;
        let sources = [
            every_table,
            include_str!("../../../plans/android-guarded.toml"),
            include_str!("../../../plans/ios-parallel-pilots.toml"),
            include_str!("../../../plans/multi-platform-graph.toml"),
            include_str!("../../../plans/windows-baseline-graph.toml"),
            include_str!("../../../plans/windows-baseline.toml"),
        ];
        for source in sources {
            let (_, tables) = read(source).unwrap_or_else(|_| panic!("{source}"));
            let own: RawAdapterTables = toml::from_str(source).unwrap();
            assert_eq!(tables.as_ref(), Some(&own), "{source}");
        }
        let (_, tables) = read(every_table).unwrap();
        let tables = tables.unwrap();
        assert_eq!(tables.webhook.len(), 2);
        assert!(!tables.preflight.is_empty());
        assert_eq!(tables.announcement.len(), 1);
    }
}
