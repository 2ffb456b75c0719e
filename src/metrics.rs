//! Prometheus metrics: one process-wide registry, cheap recording calls, and the text a
//! `/metrics` endpoint serves.
//!
//! [`global`] is the registry every part of the process records into; [`Metrics::new`] makes a
//! private one for tests. Recording never panics and never fails: a label value is any string
//! (the encoder escapes it), a number too large for a gauge is clamped.
//!
//! Two kinds of series:
//! - **counters and histograms** (`transitions`, `effects`, provider requests, deliveries) are
//!   recorded where things happen, by [`Metrics::transition`], [`Metrics::effect`],
//!   [`Metrics::provider_request`] and friends;
//! - **gauges about rollouts** are replaced as a whole from a snapshot by
//!   [`Metrics::set_rollouts`], built with [`sample`] from the domain types, so a rollout that
//!   is no longer in the snapshot leaves no series behind.
//!
//! [`Metrics::render`] writes the Prometheus text exposition format, version 0.0.4
//! ([`CONTENT_TYPE`]). `docs/metrics.md` lists every metric.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::domain::gate::GateOutcome;
use crate::domain::plan::Plan;
use crate::domain::rollout::{Rollout, RolloutStatus};
use crate::domain::time::Timestamp;

/// The `Content-Type` of [`Metrics::render`]'s text: `text/plain; version=0.0.4; charset=utf-8`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The gate outcomes `phasegate_phase_gate` always has a series for.
const GATE_OUTCOMES: [GateOutcome; 3] = [
    GateOutcome::Pass,
    GateOutcome::Fail,
    GateOutcome::Inconclusive,
];

/// Upper bounds (seconds) of `phasegate_effect_duration_seconds`: a fast simulator write to a
/// slow Graph reconcile paced by Conditional Access and retries.
const EFFECT_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];
type Labels3 = [(&'static str, String); 3];

/// One phase of a rollout as the gauges show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseSample {
    pub phase: String,
    /// Devices the phase targets.
    pub targeted: u64,
    /// Devices with a fresh report (neither unknown nor stale).
    pub reporting: u64,
    /// Devices failing the policy: noncompliant, in grace, or in conflict.
    pub noncompliant: u64,
    pub in_grace: u64,
    pub blocked: u64,
    /// The latest gate verdict's outcome (`pass`, `fail`, `inconclusive`), if any.
    pub gate: Option<String>,
    /// How long the gate has held the phase so far; 0 when it is not held.
    pub held_seconds: u64,
}

/// One rollout as the gauges show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutSample {
    pub id: String,
    /// The rollout status (`running`, `held`, `waiting_approval`, ...).
    pub status: String,
    pub phases: Vec<PhaseSample>,
}

/// Builds the sample of one rollout: for every plan phase, the latest observation's tally, the
/// latest verdict's outcome, and the time held since `held_since` (measured to `now`). A plan
/// phase the rollout has no record of is all zeros.
pub fn sample(plan: &Plan, rollout: &Rollout, now: Timestamp) -> RolloutSample {
    let phases = plan
        .phases
        .iter()
        .map(|phase| {
            let Some(record) = rollout.phase(&phase.id) else {
                return PhaseSample {
                    phase: phase.id.clone(),
                    ..PhaseSample::default()
                };
            };
            let tally = record
                .observation
                .as_ref()
                .map(|o| o.tally)
                .unwrap_or_default();
            PhaseSample {
                phase: phase.id.clone(),
                targeted: tally.targeted,
                // `Tally::reported` and `Tally::failing`, saturating: a malformed record must not
                // make a scrape panic.
                reporting: tally
                    .targeted
                    .saturating_sub(tally.unknown)
                    .saturating_sub(tally.stale),
                noncompliant: tally
                    .noncompliant
                    .saturating_add(tally.in_grace)
                    .saturating_add(tally.conflicts),
                in_grace: tally.in_grace,
                blocked: tally.blocked,
                gate: record
                    .verdict
                    .as_ref()
                    .map(|v| v.outcome.as_str().to_string()),
                held_seconds: record
                    .held_since
                    .map_or(0, |since| now.since(since).as_secs()),
            }
        })
        .collect();
    RolloutSample {
        id: rollout.id.clone(),
        status: rollout.status.as_str().to_string(),
        phases,
    }
}

/// The status class of an HTTP status for `provider_request`: `2xx`, `3xx`, `4xx` or `5xx`
/// (`1xx` and `other` for what no client should ever hand over).
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

fn fenced_label(lost: bool) -> &'static str {
    if lost { "lost" } else { "none" }
}

/// The status class of an attempt that got no HTTP answer (connection, timeout, body read).
pub const TRANSPORT: &str = "transport";

/// Every metric family phasegate exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Held while a snapshot replaces the rollout gauges and while rendering, so a scrape never
    /// sees half a snapshot.
    snapshot: Mutex<()>,
    rollouts: Family<Labels1, Gauge>,
    phase_targeted: Family<Labels2, Gauge>,
    phase_reporting: Family<Labels2, Gauge>,
    phase_noncompliant: Family<Labels2, Gauge>,
    phase_in_grace: Family<Labels2, Gauge>,
    phase_blocked: Family<Labels2, Gauge>,
    phase_gate: Family<Labels3, Gauge>,
    phase_held_seconds: Family<Labels2, Gauge>,
    transitions: Family<Labels1, Counter>,
    effects: Family<Labels2, Counter>,
    effect_duration: Family<Labels1, Histogram>,
    provider_requests: Family<Labels3, Counter>,
    provider_throttled: Family<Labels1, Counter>,
    provider_retries: Family<Labels1, Counter>,
    notifications: Family<Labels1, Counter>,
    fenced: Family<Labels1, Counter>,
    leases: Family<Labels2, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// The process's registry: what the runner, the engine and the providers record into and what
/// `/metrics` serves.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn effect_histogram() -> Histogram {
    Histogram::new(EFFECT_BUCKETS)
}

/// A gauge value from a count, clamped to what a gauge holds.
fn gauge_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A fresh registry with every family registered, `phasegate_up` = 1 and
    /// `phasegate_build_info{version}` = 1.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        // The crate ends every help text with a full stop and every counter name with `_total`.
        let rollouts = Family::default();
        registry.register(
            "phasegate_rollouts",
            "Rollouts by status, from the latest snapshot",
            rollouts.clone(),
        );
        let phase_targeted = Family::default();
        registry.register(
            "phasegate_phase_targeted",
            "Devices a rollout phase targets, from its latest observation",
            phase_targeted.clone(),
        );
        let phase_reporting = Family::default();
        registry.register(
            "phasegate_phase_reporting",
            "Devices of a rollout phase with a fresh report, from its latest observation",
            phase_reporting.clone(),
        );
        let phase_noncompliant = Family::default();
        registry.register(
            "phasegate_phase_noncompliant",
            "Devices of a rollout phase failing the policy (noncompliant, in grace or in \
             conflict), from its latest observation",
            phase_noncompliant.clone(),
        );
        let phase_in_grace = Family::default();
        registry.register(
            "phasegate_phase_in_grace",
            "Noncompliant devices of a rollout phase within their grace period, from its latest \
             observation",
            phase_in_grace.clone(),
        );
        let phase_blocked = Family::default();
        registry.register(
            "phasegate_phase_blocked",
            "Devices of a rollout phase whose access is blocked, from its latest observation",
            phase_blocked.clone(),
        );
        let phase_gate = Family::default();
        registry.register(
            "phasegate_phase_gate",
            "1 for the outcome of a rollout phase's latest gate verdict, 0 for the others",
            phase_gate.clone(),
        );
        let phase_held_seconds = Family::default();
        registry.register(
            "phasegate_phase_held_seconds",
            "How long the gate has held a rollout phase so far, 0 when it is not held",
            phase_held_seconds.clone(),
        );
        let transitions = Family::default();
        registry.register(
            "phasegate_transitions",
            "State machine transitions committed, by event kind",
            transitions.clone(),
        );
        let effects = Family::default();
        registry.register(
            "phasegate_effects",
            "Effects carried out, by effect and outcome (done, drifted, held, failed)",
            effects.clone(),
        );
        let effect_duration = Family::<Labels1, Histogram>::new_with_constructor(effect_histogram);
        registry.register(
            "phasegate_effect_duration_seconds",
            "How long carrying out an effect took, by effect",
            effect_duration.clone(),
        );
        let provider_requests = Family::default();
        registry.register(
            "phasegate_provider_requests",
            "HTTP attempts to a provider's backend, by method and status class (2xx, 3xx, 4xx, \
             5xx, transport)",
            provider_requests.clone(),
        );
        let provider_throttled = Family::default();
        registry.register(
            "phasegate_provider_throttled",
            "Answers of 429 Too Many Requests from a provider's backend, batch items included",
            provider_throttled.clone(),
        );
        let provider_retries = Family::default();
        registry.register(
            "phasegate_provider_retries",
            "Requests to a provider's backend sent again after a failure, batch items included",
            provider_retries.clone(),
        );
        let notifications = Family::default();
        registry.register(
            "phasegate_notification_deliveries",
            "Notification delivery attempts of every channel, by outcome (delivered, failed)",
            notifications.clone(),
        );
        let fenced = Family::default();
        registry.register(
            "phasegate_fenced_commits",
            "Commits refused because this replica no longer held the rollout's lease (PostgreSQL)",
            fenced.clone(),
        );
        let leases = Family::default();
        registry.register(
            "phasegate_lease_held",
            "1 for each rollout whose lease this replica holds, labelled with the rollout and the \
             replica (PostgreSQL)",
            leases.clone(),
        );
        let up: Gauge = Gauge::default();
        up.set(1);
        registry.register("phasegate_up", "1 while phasegate serves metrics", up);
        let build_info = Family::<Labels1, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        registry.register(
            "phasegate_build_info",
            "1, labelled with the phasegate version",
            build_info,
        );
        Metrics {
            registry,
            snapshot: Mutex::new(()),
            rollouts,
            phase_targeted,
            phase_reporting,
            phase_noncompliant,
            phase_in_grace,
            phase_blocked,
            phase_gate,
            phase_held_seconds,
            transitions,
            effects,
            effect_duration,
            provider_requests,
            provider_throttled,
            provider_retries,
            notifications,
            fenced,
            leases,
        }
    }

    /// The leases this replica (`replica`) holds now: one gauge per rollout.
    pub fn set_leases(&self, replica: &str, held: &[String]) {
        let _snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        self.leases.clear();
        for id in held {
            self.leases
                .get_or_create(&[("rollout", id.clone()), ("replica", replica.to_string())])
                .set(1);
        }
    }

    /// Replaces every rollout gauge with the snapshot: `phasegate_rollouts` counts the snapshot's
    /// rollouts by status (0 for every other known status), and the per-phase gauges hold exactly
    /// the snapshot's rollouts and phases; series of rollouts no longer in it are removed.
    pub fn set_rollouts(&self, snapshot: &[RolloutSample]) {
        let _whole = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        self.rollouts.clear();
        for family in self.phase_families() {
            family.clear();
        }
        self.phase_gate.clear();
        for status in RolloutStatus::ALL {
            self.rollouts
                .get_or_create(&[("status", status.as_str().to_string())])
                .set(0);
        }
        for rollout in snapshot {
            self.rollouts
                .get_or_create(&[("status", rollout.status.clone())])
                .inc();
            for phase in &rollout.phases {
                let labels = [
                    ("rollout", rollout.id.clone()),
                    ("phase", phase.phase.clone()),
                ];
                let values = [
                    phase.targeted,
                    phase.reporting,
                    phase.noncompliant,
                    phase.in_grace,
                    phase.blocked,
                    phase.held_seconds,
                ];
                for (family, value) in self.phase_families().into_iter().zip(values) {
                    family.get_or_create(&labels).set(gauge_value(value));
                }
                let known = GATE_OUTCOMES.iter().map(|o| o.as_str());
                let other = phase
                    .gate
                    .as_deref()
                    .filter(|g| !GATE_OUTCOMES.iter().any(|o| o.as_str() == *g));
                for outcome in known.chain(other) {
                    let hit = phase.gate.as_deref() == Some(outcome);
                    self.phase_gate
                        .get_or_create(&[
                            ("rollout", rollout.id.clone()),
                            ("phase", phase.phase.clone()),
                            ("outcome", outcome.to_string()),
                        ])
                        .set(i64::from(hit));
                }
            }
        }
    }

    /// The per-phase gauge families in the order of [`Metrics::set_rollouts`]'s values.
    fn phase_families(&self) -> [&Family<Labels2, Gauge>; 6] {
        [
            &self.phase_targeted,
            &self.phase_reporting,
            &self.phase_noncompliant,
            &self.phase_in_grace,
            &self.phase_blocked,
            &self.phase_held_seconds,
        ]
    }

    /// One transition committed for an event of this kind (`EventKind::name`).
    /// A commit refused because its replica no longer holds the rollout's lease.
    /// `lost`: the committer had held the rollout's lease (a replica that stalled); otherwise it
    /// committed without a lease while a replica held one.
    pub fn fenced(&self, lost: bool) {
        self.fenced
            .get_or_create(&[("lease", fenced_label(lost).to_string())])
            .inc();
    }

    /// How many commits were fenced so far.
    pub fn fenced_count(&self) -> u64 {
        [true, false]
            .into_iter()
            .map(|lost| {
                self.fenced
                    .get_or_create(&[("lease", fenced_label(lost).to_string())])
                    .get()
            })
            .sum()
    }

    pub fn transition(&self, event: &str) {
        self.transitions
            .get_or_create(&[("event", event.to_string())])
            .inc();
    }

    /// One effect carried out (`Effect::name`) with its outcome (`done`, `drifted`, `held`,
    /// `failed`) and how long it took.
    pub fn effect(&self, effect: &str, outcome: &str, took: Duration) {
        self.effects
            .get_or_create(&[
                ("effect", effect.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        self.effect_duration
            .get_or_create(&[("effect", effect.to_string())])
            .observe(took.as_secs_f64());
    }

    /// One HTTP attempt to a provider's backend; `status_class` is [`status_class`] of its
    /// answer, or [`TRANSPORT`] when there was none.
    pub fn provider_request(&self, provider: &str, method: &str, status_class: &str) {
        self.provider_requests
            .get_or_create(&[
                ("provider", provider.to_string()),
                ("method", method.to_string()),
                ("status", status_class.to_string()),
            ])
            .inc();
    }

    /// One 429 answer from a provider's backend.
    pub fn provider_throttled(&self, provider: &str) {
        self.provider_throttled
            .get_or_create(&[("provider", provider.to_string())])
            .inc();
    }

    /// One request to a provider's backend sent again.
    pub fn provider_retry(&self, provider: &str) {
        self.provider_retries
            .get_or_create(&[("provider", provider.to_string())])
            .inc();
    }

    /// One webhook delivery attempt: `delivered` or `failed`.
    pub fn notification(&self, outcome: &str) {
        self.notifications
            .get_or_create(&[("outcome", outcome.to_string())])
            .inc();
    }

    /// Every family in the Prometheus text exposition format (version 0.0.4, [`CONTENT_TYPE`]).
    /// Families with no series yet are left out.
    pub fn render(&self) -> String {
        let _whole = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        if let Err(e) = prometheus_text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics failed; serving what was encoded");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use super::*;
    use crate::domain::gate::{Evidence, GateVerdict, Tally};
    use crate::domain::plan;
    use crate::domain::rollout::PhaseObservation;
    use crate::testing::{GRAPH_TRAFFIC, Script, scripted_server};

    // ---- a small strict parser of the text exposition format ----

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    #[derive(Debug, Default)]
    struct Exposition {
        /// Family name → type, from `# TYPE`.
        types: BTreeMap<String, String>,
        helps: BTreeSet<String>,
        samples: Vec<Sample>,
    }

    impl Exposition {
        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let wanted: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.samples
                .iter()
                .find(|s| s.name == name && s.labels == wanted)
                .map(|s| s.value)
        }

        /// The value of the one series of `name` whose labels include all of `labels`.
        fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            self.value(name, labels)
                .unwrap_or_else(|| panic!("no series {name}{labels:?} in {:#?}", self.samples))
        }

        fn series(&self, name: &str) -> Vec<&Sample> {
            self.samples.iter().filter(|s| s.name == name).collect()
        }
    }

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn is_label_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn parse_value(text: &str) -> Result<f64, String> {
        match text {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ if text
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')) =>
            {
                text.parse().map_err(|_| format!("bad value {text:?}"))
            }
            _ => Err(format!("bad value {text:?}")),
        }
    }

    /// `{a="x",b="y"}` at the start of `rest`; returns the labels and what follows.
    fn parse_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        let mut rest = rest.strip_prefix('{').expect("called on a brace");
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        loop {
            let (name, after) = rest
                .split_once('=')
                .ok_or_else(|| format!("label without `=` in {rest:?}"))?;
            if !is_label_name(name) {
                return Err(format!("bad label name {name:?}"));
            }
            let mut chars = after
                .strip_prefix('"')
                .ok_or_else(|| format!("label {name} value is not quoted"))?
                .char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next() {
                    None => return Err(format!("label {name} value is not closed")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in label {name}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(name.to_string(), value).is_some() {
                return Err(format!("label {name} given twice"));
            }
            rest = &after[1 + end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            } else {
                return Err(format!("expected `,` or `}}` before {rest:?}"));
            }
        }
    }

    /// Parses the text format strictly: every line is `# HELP`, `# TYPE` or a sample
    /// `name{labels} value`; every sample belongs to the family whose `# TYPE` came last
    /// (with `_bucket`, `_sum` and `_count` for histograms); families are not reopened; no series
    /// repeats; label values are quoted with only `\\`, `\"` and `\n` escaped.
    fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the text does not end with a newline".into());
        }
        let mut current: Option<(String, String)> = None;
        let mut seen = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.splitn(4, ' ');
                let (blank, keyword, name, rest) =
                    (words.next(), words.next(), words.next(), words.next());
                if blank != Some("") {
                    return Err(at("a comment must start with `# `".into()));
                }
                match (keyword, name, rest) {
                    (Some("HELP"), Some(name), Some(_)) if is_metric_name(name) => {
                        if !out.helps.insert(name.to_string()) {
                            return Err(at(format!("second HELP for {name}")));
                        }
                    }
                    (Some("TYPE"), Some(name), Some(kind)) if is_metric_name(name) => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                        {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        if out
                            .types
                            .insert(name.to_string(), kind.to_string())
                            .is_some()
                        {
                            return Err(at(format!("family {name} declared twice")));
                        }
                        current = Some((name.to_string(), kind.to_string()));
                    }
                    _ => return Err(at("neither HELP nor TYPE".into())),
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(at)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no space before the value".into()))?;
            let mut fields = rest.split(' ');
            let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
            if let Some(timestamp) = fields.next()
                && timestamp.parse::<i64>().is_err()
            {
                return Err(at(format!("bad timestamp {timestamp:?}")));
            }
            if fields.next().is_some() {
                return Err(at("trailing fields".into()));
            }
            let Some((family, kind)) = &current else {
                return Err(at("sample before any TYPE".into()));
            };
            let suffix = name.strip_prefix(family.as_str());
            let belongs = match kind.as_str() {
                "histogram" => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
                "summary" => matches!(suffix, Some("" | "_sum" | "_count")),
                _ => suffix == Some(""),
            };
            if !belongs {
                return Err(at(format!("sample outside its family {family} ({kind})")));
            }
            if kind == "histogram"
                && suffix == Some("_bucket")
                && labels.get("le").is_none_or(|le| parse_value(le).is_err())
            {
                return Err(at("bucket without a numeric `le`".into()));
            }
            if !seen.insert((name.to_string(), labels.clone())) {
                return Err(at("series repeated".into()));
            }
            out.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok(out)
    }

    // ---- the registry ----

    fn phase(name: &str) -> PhaseSample {
        PhaseSample {
            phase: name.to_string(),
            ..PhaseSample::default()
        }
    }

    fn snapshot() -> Vec<RolloutSample> {
        vec![
            RolloutSample {
                id: "baseline-1".into(),
                status: "held".into(),
                phases: vec![
                    PhaseSample {
                        targeted: 1000,
                        reporting: 950,
                        noncompliant: 70,
                        in_grace: 30,
                        blocked: 4,
                        gate: Some("fail".into()),
                        held_seconds: 7200,
                        ..phase("notify")
                    },
                    phase("enforce"),
                ],
            },
            RolloutSample {
                id: "ios-2".into(),
                status: "running".into(),
                phases: vec![PhaseSample {
                    targeted: 10,
                    reporting: 10,
                    gate: Some("pass".into()),
                    ..phase("pilot")
                }],
            },
        ]
    }

    const FAMILIES: [(&str, &str); 19] = [
        ("phasegate_rollouts", "gauge"),
        ("phasegate_phase_targeted", "gauge"),
        ("phasegate_phase_reporting", "gauge"),
        ("phasegate_phase_noncompliant", "gauge"),
        ("phasegate_phase_in_grace", "gauge"),
        ("phasegate_phase_blocked", "gauge"),
        ("phasegate_phase_gate", "gauge"),
        ("phasegate_phase_held_seconds", "gauge"),
        ("phasegate_transitions_total", "counter"),
        ("phasegate_effects_total", "counter"),
        ("phasegate_effect_duration_seconds", "histogram"),
        ("phasegate_provider_requests_total", "counter"),
        ("phasegate_provider_throttled_total", "counter"),
        ("phasegate_provider_retries_total", "counter"),
        ("phasegate_notification_deliveries_total", "counter"),
        ("phasegate_fenced_commits_total", "counter"),
        ("phasegate_lease_held", "gauge"),
        ("phasegate_up", "gauge"),
        ("phasegate_build_info", "gauge"),
    ];

    #[test]
    fn renders_every_family_in_the_strict_text_format() {
        let m = Metrics::new();
        m.set_rollouts(&snapshot());
        m.transition("start");
        m.transition("observed");
        m.transition("observed");
        m.effect("reconcile", "done", Duration::from_millis(1500));
        m.effect("reconcile", "failed", Duration::from_millis(20));
        m.effect("notify", "done", Duration::from_millis(3));
        m.provider_request("graph", "GET", "2xx");
        m.provider_request("graph", "GET", "2xx");
        m.provider_request("graph", "GET", status_class(429));
        m.provider_request("graph", "PATCH", TRANSPORT);
        m.provider_throttled("graph");
        m.provider_retry("graph");
        m.provider_retry("graph");
        m.notification("delivered");
        m.notification("failed");
        m.notification("failed");
        m.fenced(true);
        m.set_leases("replica-a", &["baseline-1".to_string()]);

        let text = m.render();
        let x = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for (family, kind) in FAMILIES {
            assert_eq!(
                x.types.get(family).map(String::as_str),
                Some(kind),
                "{family}"
            );
            assert!(x.helps.contains(family), "{family} has no HELP");
        }
        assert_eq!(x.types.len(), FAMILIES.len(), "{:?}", x.types);
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");

        assert_eq!(x.get("phasegate_rollouts", &[("status", "held")]), 1.0);
        assert_eq!(x.get("phasegate_rollouts", &[("status", "running")]), 1.0);
        assert_eq!(x.get("phasegate_rollouts", &[("status", "completed")]), 0.0);
        assert_eq!(
            x.series("phasegate_rollouts").len(),
            RolloutStatus::ALL.len()
        );
        let notify = [("rollout", "baseline-1"), ("phase", "notify")];
        assert_eq!(x.get("phasegate_phase_targeted", &notify), 1000.0);
        assert_eq!(x.get("phasegate_phase_reporting", &notify), 950.0);
        assert_eq!(x.get("phasegate_phase_noncompliant", &notify), 70.0);
        assert_eq!(x.get("phasegate_phase_in_grace", &notify), 30.0);
        assert_eq!(x.get("phasegate_phase_blocked", &notify), 4.0);
        assert_eq!(x.get("phasegate_phase_held_seconds", &notify), 7200.0);
        let gate = |rollout: &str, phase: &str, outcome: &str| {
            x.get(
                "phasegate_phase_gate",
                &[("rollout", rollout), ("phase", phase), ("outcome", outcome)],
            )
        };
        assert_eq!(gate("baseline-1", "notify", "fail"), 1.0);
        assert_eq!(gate("baseline-1", "notify", "pass"), 0.0);
        assert_eq!(gate("baseline-1", "notify", "inconclusive"), 0.0);
        assert_eq!(gate("ios-2", "pilot", "pass"), 1.0);
        // No verdict yet: every outcome is 0.
        for outcome in ["pass", "fail", "inconclusive"] {
            assert_eq!(gate("baseline-1", "enforce", outcome), 0.0);
        }
        assert_eq!(x.series("phasegate_phase_gate").len(), 9);
        assert_eq!(
            x.get(
                "phasegate_phase_held_seconds",
                &[("rollout", "ios-2"), ("phase", "pilot")]
            ),
            0.0
        );

        let transitions = "phasegate_transitions_total";
        assert_eq!(x.get(transitions, &[("event", "start")]), 1.0);
        assert_eq!(x.get(transitions, &[("event", "observed")]), 2.0);
        let effects = "phasegate_effects_total";
        assert_eq!(
            x.get(effects, &[("effect", "reconcile"), ("outcome", "done")]),
            1.0
        );
        assert_eq!(
            x.get(effects, &[("effect", "reconcile"), ("outcome", "failed")]),
            1.0
        );
        let duration = "phasegate_effect_duration_seconds";
        let reconcile = [("effect", "reconcile")];
        assert_eq!(x.get(&format!("{duration}_count"), &reconcile), 2.0);
        assert!((x.get(&format!("{duration}_sum"), &reconcile) - 1.52).abs() < 1e-9);
        let bucket = |le: &str| {
            x.get(
                &format!("{duration}_bucket"),
                &[("effect", "reconcile"), ("le", le)],
            )
        };
        assert_eq!(bucket("0.01"), 0.0);
        assert_eq!(bucket("0.025"), 1.0);
        assert_eq!(bucket("1"), 1.0);
        assert_eq!(bucket("2.5"), 2.0);
        assert_eq!(bucket("+Inf"), 2.0);
        assert_eq!(
            x.get(&format!("{duration}_count"), &[("effect", "notify")]),
            1.0
        );

        let requests = "phasegate_provider_requests_total";
        let request = |method, status| {
            x.get(
                requests,
                &[
                    ("provider", "graph"),
                    ("method", method),
                    ("status", status),
                ],
            )
        };
        assert_eq!(request("GET", "2xx"), 2.0);
        assert_eq!(request("GET", "4xx"), 1.0);
        assert_eq!(request("PATCH", "transport"), 1.0);
        let graph = [("provider", "graph")];
        assert_eq!(x.get("phasegate_provider_throttled_total", &graph), 1.0);
        assert_eq!(x.get("phasegate_provider_retries_total", &graph), 2.0);
        let deliveries = "phasegate_notification_deliveries_total";
        assert_eq!(x.get(deliveries, &[("outcome", "delivered")]), 1.0);
        assert_eq!(x.get(deliveries, &[("outcome", "failed")]), 2.0);

        assert_eq!(x.get("phasegate_up", &[]), 1.0);
        assert_eq!(
            x.get(
                "phasegate_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }

    #[test]
    fn a_fresh_registry_shows_only_that_it_is_up() {
        let x = parse(&Metrics::new().render()).unwrap();
        let names: Vec<&str> = x.types.keys().map(String::as_str).collect();
        assert_eq!(names, ["phasegate_build_info", "phasegate_up"]);
    }

    #[test]
    fn a_rollout_removed_from_the_snapshot_disappears() {
        let m = Metrics::new();
        let mut rollouts = snapshot();
        m.set_rollouts(&rollouts);
        let before = parse(&m.render()).unwrap();
        assert!(
            before
                .samples
                .iter()
                .any(|s| s.labels.get("rollout").is_some_and(|r| r == "baseline-1"))
        );

        rollouts.remove(0);
        m.set_rollouts(&rollouts);
        let x = parse(&m.render()).unwrap();
        let left: BTreeSet<&str> = x
            .samples
            .iter()
            .filter_map(|s| s.labels.get("rollout").map(String::as_str))
            .collect();
        assert_eq!(left, BTreeSet::from(["ios-2"]));
        assert_eq!(x.get("phasegate_rollouts", &[("status", "held")]), 0.0);
        assert_eq!(x.get("phasegate_rollouts", &[("status", "running")]), 1.0);

        // A phase the rollout no longer reports goes too.
        rollouts[0].phases.clear();
        m.set_rollouts(&rollouts);
        let x = parse(&m.render()).unwrap();
        assert!(x.series("phasegate_phase_targeted").is_empty());
        assert!(!x.types.contains_key("phasegate_phase_gate"));

        m.set_rollouts(&[]);
        let x = parse(&m.render()).unwrap();
        assert!(
            x.series("phasegate_rollouts")
                .iter()
                .all(|s| s.value == 0.0)
        );
        assert!(x.samples.iter().all(|s| !s.labels.contains_key("rollout")));
    }

    #[test]
    fn label_values_with_quotes_newlines_and_backslashes_are_escaped() {
        let m = Metrics::new();
        let id = "odd \"rollout\"\nsecond line \\ backslash";
        let phase_name = "phase \"p\"\n";
        m.set_rollouts(&[RolloutSample {
            id: id.into(),
            status: "status with \"quotes\"".into(),
            phases: vec![PhaseSample {
                targeted: 3,
                gate: Some("odd\noutcome".into()),
                ..phase(phase_name)
            }],
        }]);
        m.transition("event\n\"x\"");
        let text = m.render();
        assert!(
            text.contains(r#"rollout="odd \"rollout\"\nsecond line \\ backslash""#),
            "{text}"
        );
        let x = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let labels = [("rollout", id), ("phase", phase_name)];
        assert_eq!(x.get("phasegate_phase_targeted", &labels), 3.0);
        assert_eq!(
            x.get(
                "phasegate_rollouts",
                &[("status", "status with \"quotes\"")]
            ),
            1.0
        );
        assert_eq!(
            x.get(
                "phasegate_phase_gate",
                &[
                    ("rollout", id),
                    ("phase", phase_name),
                    ("outcome", "odd\noutcome")
                ]
            ),
            1.0
        );
        assert_eq!(
            x.get(
                "phasegate_phase_gate",
                &[("rollout", id), ("phase", phase_name), ("outcome", "pass")]
            ),
            0.0
        );
        assert_eq!(
            x.get("phasegate_transitions_total", &[("event", "event\n\"x\"")]),
            1.0
        );
    }

    #[test]
    fn the_test_parser_is_strict() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v\\\"\\n\"} 1\n";
        assert_eq!(parse(good).unwrap().get("a_total", &[("k", "v\"\n")]), 1.0);
        let bad = [
            ("no TYPE", "a 1\n"),
            ("TYPE of another family", "# TYPE b gauge\na 1\n"),
            ("unquoted", "# TYPE a gauge\na{k=v} 1\n"),
            ("bad escape", "# TYPE a gauge\na{k=\"\\t\"} 1\n"),
            ("unclosed", "# TYPE a gauge\na{k=\"v} 1\n"),
            ("no value", "# TYPE a gauge\na{k=\"v\"}\n"),
            ("bad value", "# TYPE a gauge\na one\n"),
            ("repeated", "# TYPE a gauge\na 1\na 2\n"),
            (
                "reopened",
                "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n",
            ),
            ("no newline", "# TYPE a gauge\na 1"),
            ("not a comment", "#TYPE a gauge\n"),
            ("empty line", "# TYPE a gauge\n\na 1\n"),
            ("bucket without le", "# TYPE h histogram\nh_bucket 1\n"),
            ("trailing comma", "# TYPE a gauge\na{k=\"v\",} 1\n"),
        ];
        for (why, text) in bad {
            assert!(parse(text).is_err(), "accepted {why}: {text:?}");
        }
    }

    #[test]
    fn the_global_registry_is_one_and_up() {
        assert!(std::ptr::eq(global(), global()));
        let x = parse(&global().render()).unwrap();
        assert_eq!(x.get("phasegate_up", &[]), 1.0);
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn status_classes() {
        let classes: Vec<&str> = [200, 204, 302, 400, 429, 500, 503, 99]
            .into_iter()
            .map(status_class)
            .collect();
        assert_eq!(
            classes,
            ["2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx", "other"]
        );
    }

    // ---- samples from the domain ----

    const PLAN: &str = r#"
[rollout]
name = "metrics"
[policy]
compliance = "Baseline"
platform = "windows"
[provider]
kind = "simulator"
[emergency_access]
groups = ["Break Glass"]
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
grace = "3d"
[[phase]]
id = "enforce"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]
"#;

    fn verdict(outcome: GateOutcome, tally: Tally, at: Timestamp) -> GateVerdict {
        GateVerdict {
            outcome,
            reasons: Vec::new(),
            evidence: Evidence {
                observed_at: at,
                tally,
                noncompliant_ratio: tally.noncompliant_ratio(),
                coverage: tally.coverage(),
                signins: None,
            },
        }
    }

    #[test]
    fn a_sample_takes_the_latest_tally_verdict_and_hold() {
        let plan = plan::parse("metrics.toml", PLAN).unwrap();
        let now = Timestamp::from_millis(1_800_000_000_000);
        let mut rollout = Rollout::new("metrics-1", &plan, "alice", now);
        rollout.status = RolloutStatus::Held;
        let pilot = Tally {
            targeted: 20,
            compliant: 19,
            unknown: 1,
            ..Tally::default()
        };
        rollout.phases[0].observation = Some(PhaseObservation {
            phase: "pilot".into(),
            at: now,
            tally: pilot,
            by_platform: Vec::new(),
            impact: None,
            forecasts: Vec::new(),
            signins: None,
            userless: 0,
        });
        rollout.phases[0].verdict = Some(verdict(GateOutcome::Pass, pilot, now));
        let notify = Tally {
            targeted: 1000,
            compliant: 800,
            noncompliant: 50,
            in_grace: 100,
            conflicts: 5,
            errors: 5,
            unknown: 30,
            stale: 10,
            blocked: 7,
            earliest_block: None,
        };
        rollout.phases[1].observation = Some(PhaseObservation {
            phase: "notify".into(),
            at: now,
            tally: notify,
            by_platform: Vec::new(),
            impact: None,
            forecasts: Vec::new(),
            signins: None,
            userless: 0,
        });
        rollout.phases[1].verdict = Some(verdict(GateOutcome::Fail, notify, now));
        rollout.phases[1].held_since = Some(now.minus(Duration::from_secs(90_000)));

        let s = sample(&plan, &rollout, now);
        assert_eq!(s.id, "metrics-1");
        assert_eq!(s.status, "held");
        assert_eq!(
            s.phases[0],
            PhaseSample {
                phase: "pilot".into(),
                targeted: 20,
                reporting: 19,
                noncompliant: 0,
                in_grace: 0,
                blocked: 0,
                gate: Some("pass".into()),
                held_seconds: 0,
            }
        );
        assert_eq!(
            s.phases[1],
            PhaseSample {
                phase: "notify".into(),
                targeted: 1000,
                reporting: 960,
                noncompliant: 155,
                in_grace: 100,
                blocked: 7,
                gate: Some("fail".into()),
                held_seconds: 90_000,
            }
        );
        assert_eq!(s.phases[2], phase("enforce"));

        // Into the registry and out as text, it alerts after a day.
        let m = Metrics::new();
        m.set_rollouts(&[s]);
        let x = parse(&m.render()).unwrap();
        let held = x.get(
            "phasegate_phase_held_seconds",
            &[("rollout", "metrics-1"), ("phase", "notify")],
        );
        assert!(held > 86_400.0);
    }

    #[test]
    fn a_malformed_tally_does_not_panic() {
        let plan = plan::parse("metrics.toml", PLAN).unwrap();
        let now = Timestamp::from_millis(0);
        let mut rollout = Rollout::new("r", &plan, "alice", now);
        let broken = Tally {
            targeted: 1,
            unknown: 5,
            noncompliant: u64::MAX,
            in_grace: 1,
            ..Tally::default()
        };
        rollout.phases[0].observation = Some(PhaseObservation {
            phase: "pilot".into(),
            at: now,
            tally: broken,
            by_platform: Vec::new(),
            impact: None,
            forecasts: Vec::new(),
            signins: None,
            userless: 0,
        });
        rollout.phases[0].held_since = Some(Timestamp::from_millis(1_000));
        let s = sample(&plan, &rollout, now);
        assert_eq!(s.phases[0].reporting, 0);
        assert_eq!(s.phases[0].noncompliant, u64::MAX);
        assert_eq!(s.phases[0].held_seconds, 0);
        let m = Metrics::new();
        m.set_rollouts(&[s]);
        let x = parse(&m.render()).unwrap();
        assert_eq!(
            x.get(
                "phasegate_phase_noncompliant",
                &[("rollout", "r"), ("phase", "pilot")]
            ),
            i64::MAX as f64
        );
    }

    // ---- instrumentation, against a scripted HTTP server on loopback ----

    fn counter(x: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
        x.value(name, labels).unwrap_or(0.0)
    }

    // These two tests read the process-wide registry: other tests in this binary that make Graph
    // requests hold `GRAPH_TRAFFIC` too, the notifier's own tests call `post` (which counts
    // nothing), and each of the two touches only its own families.
    #[tokio::test]
    async fn the_graph_client_counts_every_attempt_throttle_and_retry() {
        use crate::provider::graph::client::{Access, BatchRequest, GraphClient, Secret};
        use reqwest::Method;

        let _alone = GRAPH_TRAFFIC.lock().await;

        let script: Arc<Script> = Arc::new(|method: &str, path: &str, nth: u32| {
            let ok = |body: &str| Some((200, Vec::new(), body.to_string()));
            match (method, path, nth) {
                ("POST", "/tenant/oauth2/v2.0/token", 0) => Some((503, Vec::new(), String::new())),
                ("POST", "/tenant/oauth2/v2.0/token", _) => {
                    ok(r#"{"access_token":"t","expires_in":3600}"#)
                }
                ("GET", "/v1.0/throttled", 0) => {
                    Some((429, vec![("Retry-After", "0".to_string())], String::new()))
                }
                ("GET", "/v1.0/dropped", 0) => None,
                ("GET", _, _) => ok(r#"{"value":[]}"#),
                ("POST", "/v1.0/$batch", 0) => ok(
                    r#"{"responses":[{"id":"1","status":429,"headers":{"Retry-After":"0"},"body":{}},{"id":"2","status":200,"body":{"n":2}}]}"#,
                ),
                ("POST", "/v1.0/$batch", _) => {
                    ok(r#"{"responses":[{"id":"1","status":200,"body":{"n":1}}]}"#)
                }
                _ => Some((404, Vec::new(), String::new())),
            }
        });
        let url = scripted_server(script).await;
        let settings = crate::provider::graph::GraphSettings {
            tenant: "tenant".into(),
            client_id: "client".into(),
            credential: crate::provider::graph::settings::CredentialSettings::ClientSecret {
                env: "UNUSED".into(),
            },
            graph_url: url.clone(),
            login_url: url,
            ca_requests_per_second: 1.0,
            request_timeout: Duration::from_secs(10),
            observe_through: Default::default(),
        };
        let before = parse(&global().render()).unwrap();
        let client = GraphClient::new(settings, Secret::new("s".into())).unwrap();
        client
            .call(Method::GET, "/throttled", None, &[], Access::Read)
            .await
            .unwrap();
        client
            .call(Method::GET, "/dropped", None, &[], Access::Read)
            .await
            .unwrap();
        let answers = client
            .batch_get(&[
                BatchRequest {
                    id: "1".into(),
                    url: "/one".into(),
                    headers: Vec::new(),
                },
                BatchRequest {
                    id: "2".into(),
                    url: "/two".into(),
                    headers: Vec::new(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(answers[0].as_ref().unwrap()["n"], 1);
        assert_eq!(answers[1].as_ref().unwrap()["n"], 2);
        let after = parse(&global().render()).unwrap();

        let delta = |name: &str, labels: &[(&str, &str)]| {
            counter(&after, name, labels) - counter(&before, name, labels)
        };
        let requests = |method, status| {
            delta(
                "phasegate_provider_requests_total",
                &[
                    ("provider", "graph"),
                    ("method", method),
                    ("status", status),
                ],
            )
        };
        // The token: a 503, then a token. The reads: a 429 then an answer; a dropped
        // connection then an answer. The batch: two POSTs.
        assert_eq!(requests("POST", "5xx"), 1.0);
        assert_eq!(requests("POST", "2xx"), 3.0);
        assert_eq!(requests("GET", "4xx"), 1.0);
        assert_eq!(requests("GET", "transport"), 1.0);
        assert_eq!(requests("GET", "2xx"), 2.0);
        let graph = [("provider", "graph")];
        // The read's 429 and the batch item's.
        assert_eq!(delta("phasegate_provider_throttled_total", &graph), 2.0);
        // The token, the throttled read, the dropped read, the throttled batch item.
        assert_eq!(delta("phasegate_provider_retries_total", &graph), 4.0);
    }

    #[tokio::test]
    async fn webhook_deliveries_are_counted_per_attempt() {
        use crate::domain::event::ChannelAddress;
        use crate::notifier::{Delivery, Notifier, WebhookNotifier};

        let script: Arc<Script> = Arc::new(|_: &str, path: &str, _| match path {
            "/ok" => Some((200, Vec::new(), String::new())),
            "/down" => Some((503, Vec::new(), String::new())),
            _ => Some((404, Vec::new(), String::new())),
        });
        let url = scripted_server(script).await;
        let notifier = WebhookNotifier::new();
        let webhook = |path: &str, secret_env: Option<&str>| {
            let mut settings = serde_json::Map::new();
            settings.insert("url".into(), format!("{url}{path}").into());
            if let Some(env) = secret_env {
                settings.insert("secret_env".into(), env.into());
            }
            ChannelAddress::new(ChannelAddress::WEBHOOK, settings)
        };
        let (ok, down, gone) = (
            webhook("/ok", None),
            webhook("/down", None),
            webhook("/gone", None),
        );
        let unsigned = webhook("/ok", Some("PHASEGATE_METRICS_TEST_UNSET_SECRET"));
        let delivery = |to| Delivery {
            key: "r:1.0",
            to,
            body: b"{}".to_vec(),
            about: None,
        };
        let before = parse(&global().render()).unwrap();
        assert_eq!(notifier.deliver(&delivery(&ok)).await.unwrap(), 200);
        assert!(notifier.deliver(&delivery(&down)).await.is_err());
        assert!(
            notifier.deliver(&delivery(&gone)).await.is_err(),
            "a 404 is not a delivery"
        );
        assert!(notifier.deliver(&delivery(&unsigned)).await.is_err());
        let after = parse(&global().render()).unwrap();
        let delta = |outcome| {
            let labels = [("outcome", outcome)];
            let name = "phasegate_notification_deliveries_total";
            counter(&after, name, &labels) - counter(&before, name, &labels)
        };
        assert_eq!(delta("delivered"), 1.0);
        assert_eq!(delta("failed"), 3.0);
    }
}
