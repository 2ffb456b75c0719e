//! Gate evaluation: from device reports to a verdict with its evidence.
//!
//! Two pure steps. [`tally`] folds the per-device reports of one phase into counts, classifying
//! every device exactly once; it is the hot loop (a million devices per observation) and is kept
//! branch-light. [`evaluate`] checks a phase's gate against a tally and says pass, fail or
//! inconclusive, with the numbers it used and the reasons. The safety rules live here:
//! - a device that never reported, or whose last report is older than `stale_after`, is *unknown*
//!   or *stale* and never counts as compliant;
//! - ratios are taken over devices with a fresh report, so silence cannot dilute noncompliance;
//! - missing data (nothing targeted, nothing reported, coverage below `min_reporting`) is
//!   inconclusive, never a pass.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::forecast::DeviceFacts;
use super::plan::{Gate, Ratio, RollbackWhen, format_percent};
use super::signins::{self, SignIns};
use super::time::{Timestamp, format_span};

/// The compliance state a backend reports for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum DeviceState {
    Compliant,
    Noncompliant,
    /// Noncompliant, but within the grace period of a notify phase.
    InGrace,
    /// The policy failed to evaluate on the device.
    Error,
    /// Two policies disagree on the device.
    Conflict,
    /// Assigned, but no state known yet.
    Unknown,
}

/// One device's latest report as a provider sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    pub state: DeviceState,
    /// `None` when the device has never reported for this policy.
    pub last_reported: Option<Timestamp>,
    /// Access is currently blocked because the device is noncompliant and enforced.
    pub blocked: bool,
    /// When the device's grace period ends, while it is in one.
    pub grace_until: Option<Timestamp>,
    /// Its owner, groups, failing settings and whether its owner was told, as far as the
    /// provider knows (the impact forecast's input; the gate does not read it).
    pub facts: DeviceFacts,
}

/// How the devices targeted by one phase stand. Every targeted device is in exactly one of
/// `compliant`, `noncompliant`, `in_grace`, `errors`, `conflicts`, `unknown` and `stale`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub targeted: u64,
    pub compliant: u64,
    pub noncompliant: u64,
    pub in_grace: u64,
    pub errors: u64,
    pub conflicts: u64,
    /// Never reported.
    pub unknown: u64,
    /// Reported, but not within `stale_after`.
    pub stale: u64,
    /// Fresh noncompliant devices that are blocked.
    pub blocked: u64,
    /// The earliest end of a grace period among the devices in grace: none of them is blocked
    /// before it.
    #[serde(default)]
    pub earliest_block: Option<Timestamp>,
}

impl Tally {
    /// Devices with a fresh, known report: the denominator of every ratio.
    pub fn reported(&self) -> u64 {
        self.targeted - self.unknown - self.stale
    }

    /// Devices that fail the policy, whether or not their grace period is over.
    pub fn failing(&self) -> u64 {
        self.noncompliant + self.in_grace + self.conflicts
    }

    pub fn coverage(&self) -> Option<f64> {
        (self.targeted > 0).then(|| self.reported() as f64 / self.targeted as f64)
    }

    pub fn noncompliant_ratio(&self) -> Option<f64> {
        let reported = self.reported();
        (reported > 0).then(|| self.failing() as f64 / reported as f64)
    }

    pub fn error_ratio(&self) -> Option<f64> {
        let reported = self.reported();
        (reported > 0).then(|| self.errors as f64 / reported as f64)
    }

    pub fn blocked_ratio(&self) -> Option<f64> {
        let reported = self.reported();
        (reported > 0).then(|| self.blocked as f64 / reported as f64)
    }

    /// The counts of two disjoint sets of devices together (one phase's policies).
    pub fn plus(&self, other: &Tally) -> Tally {
        Tally {
            targeted: self.targeted + other.targeted,
            compliant: self.compliant + other.compliant,
            noncompliant: self.noncompliant + other.noncompliant,
            in_grace: self.in_grace + other.in_grace,
            errors: self.errors + other.errors,
            conflicts: self.conflicts + other.conflicts,
            unknown: self.unknown + other.unknown,
            stale: self.stale + other.stale,
            blocked: self.blocked + other.blocked,
            earliest_block: match (self.earliest_block, other.earliest_block) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// Classifies every report; `now - stale_after` is the freshness horizon.
pub fn tally(reports: &[DeviceReport], stale_after: Duration, now: Timestamp) -> Tally {
    let horizon = now.minus(stale_after);
    let mut counts = [0u64; 8];
    let mut blocked = 0u64;
    let mut earliest_block: Option<Timestamp> = None;
    for report in reports {
        let slot = match report.last_reported {
            None => 6,
            Some(at) if at < horizon => 7,
            Some(_) => report.state as usize,
        };
        counts[slot] += 1;
        blocked += u64::from(report.blocked && slot != 6 && slot != 7);
        if let Some(until) = report.grace_until
            && slot == DeviceState::InGrace as usize
            && earliest_block.is_none_or(|e| until < e)
        {
            earliest_block = Some(until);
        }
    }
    Tally {
        targeted: reports.len() as u64,
        compliant: counts[DeviceState::Compliant as usize],
        noncompliant: counts[DeviceState::Noncompliant as usize],
        in_grace: counts[DeviceState::InGrace as usize],
        errors: counts[DeviceState::Error as usize],
        conflicts: counts[DeviceState::Conflict as usize],
        unknown: counts[DeviceState::Unknown as usize] + counts[6],
        stale: counts[7],
        blocked,
        earliest_block,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Fail,
    Inconclusive,
}

impl GateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GateOutcome::Pass => "pass",
            GateOutcome::Fail => "fail",
            GateOutcome::Inconclusive => "inconclusive",
        }
    }
}

/// A gate's judgement of one observation, with the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateVerdict {
    pub outcome: GateOutcome,
    /// Why it did not pass (empty on pass), or what passed.
    pub reasons: Vec<String>,
    pub evidence: Evidence,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub observed_at: Timestamp,
    pub tally: Tally,
    pub noncompliant_ratio: Option<f64>,
    pub coverage: Option<f64>,
    /// What the sign-in log said, when the gate has sign-in criteria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signins: Option<SignIns>,
}

/// Checks `gate` against one observation of its phase's devices, with no sign-in log read.
/// Soak time and approvals are the state machine's business; this judges the data only.
pub fn evaluate(gate: &Gate, tally: &Tally, observed_at: Timestamp) -> GateVerdict {
    evaluate_with_signins(gate, tally, None, observed_at)
}

/// Checks `gate` against one observation: the devices' tally and, when the gate has sign-in
/// criteria, what the sign-in log said (`None`: not read).
pub fn evaluate_with_signins(
    gate: &Gate,
    tally: &Tally,
    signins: Option<&SignIns>,
    observed_at: Timestamp,
) -> GateVerdict {
    let judged = signins::judge(gate, signins);
    let uses_signins =
        gate.max_blocked_signins.is_some() || gate.max_blocked_signin_ratio.is_some();
    let evidence = Evidence {
        observed_at,
        tally: *tally,
        noncompliant_ratio: tally.noncompliant_ratio(),
        coverage: tally.coverage(),
        signins: signins.filter(|_| uses_signins).cloned(),
    };
    let mut failures = Vec::new();
    let mut missing = Vec::new();
    if tally.targeted == 0 {
        missing.push("no devices are targeted".to_string());
    } else if tally.reported() == 0 {
        missing.push(format!(
            "none of the {} targeted devices has reported recently",
            tally.targeted
        ));
    }
    if let (Some(min), Some(coverage)) = (gate.min_reporting, evidence.coverage)
        && coverage < min.fraction()
    {
        missing.push(format!(
            "reporting coverage {} is below {min} ({} of {} devices reported within {})",
            format_percent(coverage),
            tally.reported(),
            tally.targeted,
            format_span(gate.stale_after)
        ));
    }
    if let Some(max) = gate.max_noncompliant
        && tally.failing() > max
    {
        failures.push(format!(
            "{} noncompliant devices exceed the limit of {max}",
            tally.failing()
        ));
    }
    if let (Some(max), Some(ratio)) = (gate.max_noncompliant_ratio, evidence.noncompliant_ratio)
        && ratio > max.fraction()
    {
        failures.push(format!(
            "noncompliant {} exceeds {max} ({} of {} reporting devices)",
            format_percent(ratio),
            tally.failing(),
            tally.reported()
        ));
    }
    if let Some(max) = gate.max_errors
        && tally.errors > max
    {
        failures.push(format!(
            "{} devices report errors, more than {max}",
            tally.errors
        ));
    }
    if let Some(max) = gate.max_error_ratio
        && let Some(ratio) = tally.error_ratio()
        && ratio > max.fraction()
    {
        failures.push(format!(
            "errors {} exceed {max} ({} of {} reporting devices)",
            format_percent(ratio),
            tally.errors,
            tally.reported()
        ));
    }
    failures.extend(judged.failures);
    missing.extend(judged.missing);
    let (outcome, reasons) = if !failures.is_empty() {
        failures.extend(missing);
        (GateOutcome::Fail, failures)
    } else if !missing.is_empty() {
        (GateOutcome::Inconclusive, missing)
    } else {
        let mut summary = pass_summary(gate, tally);
        for note in judged.notes {
            summary.push_str(", ");
            summary.push_str(&note);
        }
        (GateOutcome::Pass, vec![summary])
    };
    GateVerdict {
        outcome,
        reasons,
        evidence,
    }
}

fn pass_summary(gate: &Gate, tally: &Tally) -> String {
    let mut parts = vec![format!(
        "{} of {} devices reported",
        tally.reported(),
        tally.targeted
    )];
    if gate.max_noncompliant_ratio.is_some() || gate.max_noncompliant.is_some() {
        parts.push(format!(
            "{} noncompliant ({})",
            tally.failing(),
            tally
                .noncompliant_ratio()
                .map_or("-".into(), format_percent)
        ));
    }
    if gate.max_errors.is_some() || gate.max_error_ratio.is_some() {
        parts.push(format!("{} errors", tally.errors));
    }
    parts.join(", ")
}

/// Checks a running phase's abort criteria. Only fresh data can trip them; no data never does
/// (the gate already refuses to promote on it).
pub fn rollback_trip(criteria: &RollbackWhen, tally: &Tally) -> Option<String> {
    let above = |ratio: Option<f64>, bound: Option<Ratio>| match (ratio, bound) {
        (Some(ratio), Some(bound)) => ratio > bound.fraction(),
        _ => false,
    };
    if above(
        tally.noncompliant_ratio(),
        criteria.noncompliant_ratio_above,
    ) {
        return Some(format!(
            "noncompliant {} is above the rollback bound of {}",
            format_percent(tally.noncompliant_ratio().unwrap_or(0.0)),
            criteria
                .noncompliant_ratio_above
                .unwrap_or(Ratio::from_fraction(0.0))
        ));
    }
    if let Some(max) = criteria.noncompliant_above
        && tally.failing() > max
    {
        return Some(format!(
            "{} noncompliant devices are above the rollback bound of {max}",
            tally.failing()
        ));
    }
    if let Some(max) = criteria.errors_above
        && tally.errors > max
    {
        return Some(format!(
            "{} devices report errors, above the rollback bound of {max}",
            tally.errors
        ));
    }
    if above(tally.blocked_ratio(), criteria.blocked_ratio_above) {
        return Some(format!(
            "blocked {} is above the rollback bound of {}",
            format_percent(tally.blocked_ratio().unwrap_or(0.0)),
            criteria
                .blocked_ratio_above
                .unwrap_or(Ratio::from_fraction(0.0))
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::DEFAULT_MAX_HOLD;

    const HOUR: Duration = Duration::from_secs(3600);

    fn gate() -> Gate {
        Gate {
            max_noncompliant: None,
            max_noncompliant_ratio: Ratio::parse_percent("2%"),
            min_reporting: Ratio::parse_percent("90%"),
            stale_after: Duration::from_secs(72 * 3600),
            max_errors: Some(1),
            max_error_ratio: None,
            approvals: 0,
            max_hold: DEFAULT_MAX_HOLD,
            max_blocked_signins: None,
            max_blocked_signin_ratio: None,
            signin_window: crate::domain::plan::DEFAULT_SIGNIN_WINDOW,
            signin_data: crate::domain::signins::SignInData::Required,
        }
    }

    fn report(state: DeviceState, hours_ago: Option<u64>, now: Timestamp) -> DeviceReport {
        DeviceReport {
            state,
            last_reported: hours_ago.map(|h| now.minus(HOUR * h as u32)),
            blocked: false,
            grace_until: None,
            facts: DeviceFacts::default(),
        }
    }

    fn counts(compliant: u64, noncompliant: u64, unknown: u64) -> Tally {
        Tally {
            targeted: compliant + noncompliant + unknown,
            compliant,
            noncompliant,
            unknown,
            ..Tally::default()
        }
    }

    #[test]
    fn the_earliest_block_is_the_first_grace_end_among_fresh_devices_in_grace() {
        let now = Timestamp::from_millis(1_800_000_000_000);
        let in_grace = |hours_ago, ends_in: u32| DeviceReport {
            grace_until: Some(now.plus(HOUR * ends_in)),
            ..report(DeviceState::InGrace, hours_ago, now)
        };
        let reports = [
            in_grace(Some(1), 50),
            in_grace(Some(2), 30),
            // Stale: its grace does not count, nor does it count as in grace.
            in_grace(Some(200), 5),
            report(DeviceState::Noncompliant, Some(1), now),
        ];
        let t = tally(&reports, HOUR * 72, now);
        assert_eq!(t.in_grace, 2);
        assert_eq!(t.earliest_block, Some(now.plus(HOUR * 30)));
        let other = tally(&reports[..1], HOUR * 72, now);
        assert_eq!(t.plus(&other).earliest_block, Some(now.plus(HOUR * 30)));
        assert_eq!(tally(&reports[3..], HOUR * 72, now).earliest_block, None);
    }

    #[test]
    fn tally_puts_every_device_in_exactly_one_class() {
        let now = Timestamp::from_millis(1_000_000_000_000);
        let reports = [
            report(DeviceState::Compliant, Some(1), now),
            report(DeviceState::Compliant, Some(100), now),
            report(DeviceState::Noncompliant, Some(2), now),
            report(DeviceState::InGrace, Some(2), now),
            report(DeviceState::Error, Some(2), now),
            report(DeviceState::Conflict, Some(2), now),
            report(DeviceState::Unknown, Some(2), now),
            report(DeviceState::Compliant, None, now),
        ];
        let t = tally(&reports, Duration::from_secs(72 * 3600), now);
        assert_eq!(t.targeted, 8);
        assert_eq!((t.compliant, t.stale, t.unknown), (1, 1, 2));
        assert_eq!(
            (t.noncompliant, t.in_grace, t.errors, t.conflicts),
            (1, 1, 1, 1)
        );
        let classified = t.compliant
            + t.noncompliant
            + t.in_grace
            + t.errors
            + t.conflicts
            + t.unknown
            + t.stale;
        assert_eq!(classified, t.targeted);
    }

    #[test]
    fn stale_devices_never_count_as_compliant() {
        let now = Timestamp::from_millis(10_000_000_000);
        let reports: Vec<DeviceReport> = (0..100)
            .map(|i| {
                let state = if i < 5 {
                    DeviceState::Noncompliant
                } else {
                    DeviceState::Compliant
                };
                let age = if i < 50 { 1 } else { 500 };
                report(state, Some(age), now)
            })
            .collect();
        let t = tally(&reports, Duration::from_secs(72 * 3600), now);
        // 5 noncompliant among 50 fresh reports is 10%, not 5% of 100 targeted.
        assert_eq!(t.noncompliant_ratio(), Some(0.1));
    }

    #[test]
    fn passes_when_every_criterion_holds() {
        let verdict = evaluate(&gate(), &counts(98, 1, 1), Timestamp::from_millis(0));
        assert_eq!(verdict.outcome, GateOutcome::Pass, "{:?}", verdict.reasons);
    }

    #[test]
    fn fails_on_too_much_noncompliance_and_says_why() {
        let verdict = evaluate(&gate(), &counts(90, 10, 0), Timestamp::from_millis(0));
        assert_eq!(verdict.outcome, GateOutcome::Fail);
        assert!(
            verdict.reasons[0].contains("noncompliant 10% exceeds 2%"),
            "{:?}",
            verdict.reasons
        );
    }

    #[test]
    fn missing_data_is_inconclusive_never_pass() {
        let nothing = evaluate(&gate(), &Tally::default(), Timestamp::from_millis(0));
        assert_eq!(nothing.outcome, GateOutcome::Inconclusive);
        let silent = evaluate(&gate(), &counts(0, 0, 50), Timestamp::from_millis(0));
        assert_eq!(silent.outcome, GateOutcome::Inconclusive);
        let thin = evaluate(&gate(), &counts(80, 0, 20), Timestamp::from_millis(0));
        assert_eq!(thin.outcome, GateOutcome::Inconclusive);
        assert!(
            thin.reasons[0].contains("coverage 80% is below 90%"),
            "{:?}",
            thin.reasons
        );
    }

    #[test]
    fn a_gate_with_no_criteria_still_needs_data() {
        let open = Gate {
            max_noncompliant_ratio: None,
            min_reporting: None,
            max_errors: None,
            max_error_ratio: None,
            ..gate()
        };
        let silent = evaluate(&open, &counts(0, 0, 10), Timestamp::from_millis(0));
        assert_eq!(silent.outcome, GateOutcome::Inconclusive);
        let some = evaluate(&open, &counts(1, 0, 10), Timestamp::from_millis(0));
        assert_eq!(some.outcome, GateOutcome::Pass);
    }

    #[test]
    fn rollback_trips_only_on_fresh_data_above_the_bound() {
        let criteria = RollbackWhen {
            noncompliant_ratio_above: Ratio::parse_percent("25%"),
            ..RollbackWhen::default()
        };
        assert!(rollback_trip(&criteria, &counts(70, 30, 0)).is_some());
        assert!(rollback_trip(&criteria, &counts(80, 20, 0)).is_none());
        assert!(rollback_trip(&criteria, &counts(0, 0, 100)).is_none());
    }

    #[test]
    fn sign_in_criteria_join_the_device_criteria_in_one_verdict() {
        use crate::domain::signins::{SignInTally, SignIns};
        let at = Timestamp::from_millis(1_000_000);
        let g = Gate {
            max_blocked_signin_ratio: Ratio::parse_percent("5%"),
            ..gate()
        };
        let seen = |users, affected| {
            SignIns::Observed(SignInTally {
                since: at.minus(HOUR),
                until: at,
                signins: users,
                users,
                blocked: 0,
                would_block: affected,
                blocked_users: 0,
                affected_users: affected,
                truncated: false,
            })
        };
        let devices_fine = counts(98, 1, 1);
        let pass = evaluate_with_signins(&g, &devices_fine, Some(&seen(100, 2)), at);
        assert_eq!(pass.outcome, GateOutcome::Pass, "{:?}", pass.reasons);
        assert!(
            pass.reasons[0].contains("2 of 100 users' sign-ins"),
            "{:?}",
            pass.reasons
        );
        assert!(pass.evidence.signins.is_some());
        let fail = evaluate_with_signins(&g, &devices_fine, Some(&seen(100, 30)), at);
        assert_eq!(fail.outcome, GateOutcome::Fail);
        assert!(
            fail.reasons[0].contains("sign-ins of 30%"),
            "{:?}",
            fail.reasons
        );
        // Without the log the gate cannot pass: it holds, saying why.
        let unread = evaluate(&g, &devices_fine, at);
        assert_eq!(unread.outcome, GateOutcome::Inconclusive);
        assert!(unread.reasons[0].contains("sign-in criteria not available"));
        // A gate without sign-in criteria keeps no sign-in evidence.
        let plain = evaluate_with_signins(&gate(), &devices_fine, Some(&seen(100, 30)), at);
        assert_eq!(plain.outcome, GateOutcome::Pass);
        assert!(plain.evidence.signins.is_none());
    }
}
