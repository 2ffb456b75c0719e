//! Sign-in impact: what the tenant's sign-in log says about the users of one phase, and the gate
//! and rollback criteria judged on it.
//!
//! A compliance rollout's real effect is on people signing in: a Conditional Access policy in
//! report-only mode records, for every sign-in it evaluates, whether it *would* have blocked it;
//! once enabled, it blocks. Device compliance only estimates that (a device's user may not sign
//! in at all; a device without a policy may fail a policy that covers every platform). Providers
//! read their log and hand each sign-in to a [`SignInCounter`] with what the policy made of it;
//! the gate reads the resulting [`SignInTally`].
//!
//! Rules:
//! - a blocked sign-in (the policy enforced and failed it) and a would-be-blocked one (report-only,
//!   failed or interrupted) are counted apart; the gate judges both together — a report-only
//!   phase is judged on what enforcing it would do — and `rollback_when` only the blocked ones,
//!   people actually locked out;
//! - ratios are over the distinct users who signed in during the window, so users who did not
//!   sign in cannot dilute the share of those who were blocked;
//! - sign-in data that could not be read (no permission, no licence) is *not available*, never
//!   zero: a plan that requires it holds (inconclusive); one that marks it optional is judged
//!   without it and says so.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::plan::{Gate, RollbackWhen, format_percent};
use super::time::{Timestamp, format_span};

/// What one phase's sign-in log read gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "availability")]
pub enum SignIns {
    Observed(SignInTally),
    /// The log could not be read; `reason` says why (for a person to fix).
    Unavailable {
        reason: String,
    },
}

impl SignIns {
    pub fn tally(&self) -> Option<&SignInTally> {
        match self {
            SignIns::Observed(tally) => Some(tally),
            SignIns::Unavailable { .. } => None,
        }
    }
}

/// The sign-ins of one phase's users over a window, as the phase's policy judged them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInTally {
    /// The window read: `[since, until]`.
    pub since: Timestamp,
    pub until: Timestamp,
    /// Sign-ins by the phase's users that the policy evaluated.
    pub signins: u64,
    /// Distinct users among them: the denominator of the ratios.
    pub users: u64,
    /// Sign-ins the policy blocked (enforced, `failure`).
    pub blocked: u64,
    /// Sign-ins the policy would have blocked (report-only, `reportOnlyFailure` or
    /// `reportOnlyInterrupted`).
    pub would_block: u64,
    /// Distinct users with at least one blocked sign-in.
    pub blocked_users: u64,
    /// Distinct users with at least one blocked or would-be-blocked sign-in.
    pub affected_users: u64,
    /// The log held more than the provider reads in one observation: the counts are a lower
    /// bound.
    #[serde(default)]
    pub truncated: bool,
}

impl SignInTally {
    /// Blocked and would-be-blocked sign-ins: what the gate judges.
    pub fn impact(&self) -> u64 {
        self.blocked + self.would_block
    }

    /// Affected users as a share of the users who signed in.
    pub fn impact_ratio(&self) -> Option<f64> {
        (self.users > 0).then(|| self.affected_users as f64 / self.users as f64)
    }

    /// Blocked users as a share of the users who signed in.
    pub fn blocked_ratio(&self) -> Option<f64> {
        (self.users > 0).then(|| self.blocked_users as f64 / self.users as f64)
    }
}

/// What the policy made of one sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignInOutcome {
    /// Enforced and failed: the user was blocked.
    Blocked,
    /// Report-only and failed or interrupted: enforcing would have blocked it.
    WouldBlock,
    /// Evaluated and satisfied.
    Passed,
}

/// Folds sign-ins into a [`SignInTally`], counting each user once per class.
#[derive(Debug)]
pub struct SignInCounter {
    since: Timestamp,
    until: Timestamp,
    signins: u64,
    blocked: u64,
    would_block: u64,
    users: HashSet<String>,
    blocked_users: HashSet<String>,
    affected_users: HashSet<String>,
}

impl SignInCounter {
    pub fn new(since: Timestamp, until: Timestamp) -> SignInCounter {
        SignInCounter {
            since,
            until,
            signins: 0,
            blocked: 0,
            would_block: 0,
            users: HashSet::new(),
            blocked_users: HashSet::new(),
            affected_users: HashSet::new(),
        }
    }

    /// One sign-in by `user` at `at`; outside the window it is not counted.
    pub fn add(&mut self, user: &str, at: Timestamp, outcome: SignInOutcome) {
        if at < self.since || at > self.until {
            return;
        }
        self.signins += 1;
        if !self.users.contains(user) {
            self.users.insert(user.to_string());
        }
        match outcome {
            SignInOutcome::Blocked => {
                self.blocked += 1;
                if !self.blocked_users.contains(user) {
                    self.blocked_users.insert(user.to_string());
                }
            }
            SignInOutcome::WouldBlock => self.would_block += 1,
            SignInOutcome::Passed => return,
        }
        if !self.affected_users.contains(user) {
            self.affected_users.insert(user.to_string());
        }
    }

    pub fn finish(self, truncated: bool) -> SignInTally {
        SignInTally {
            since: self.since,
            until: self.until,
            signins: self.signins,
            users: self.users.len() as u64,
            blocked: self.blocked,
            would_block: self.would_block,
            blocked_users: self.blocked_users.len() as u64,
            affected_users: self.affected_users.len() as u64,
            truncated,
        }
    }
}

/// What a gate does when the sign-in log cannot be read (`signin_data` in the plan).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignInData {
    /// The gate is inconclusive without it: the phase holds.
    #[default]
    Required,
    /// The sign-in criteria are skipped, and the verdict says so.
    Optional,
}

impl SignInData {
    pub fn as_str(self) -> &'static str {
        match self {
            SignInData::Required => "required",
            SignInData::Optional => "optional",
        }
    }
}

/// Whether a gate or the rollback criteria of a phase need the sign-in log.
pub fn wanted(gate: &Gate, rollback: &RollbackWhen) -> bool {
    gate.max_blocked_signins.is_some()
        || gate.max_blocked_signin_ratio.is_some()
        || rollback.blocked_signins_above.is_some()
        || rollback.blocked_signin_ratio_above.is_some()
}

/// The window one observation reads: the gate's `signin_window` back from `now`, never before
/// the phase's configuration was in place (`applied_at`) — sign-ins before it say nothing about
/// this phase.
pub fn window(applied_at: Option<Timestamp>, span: Duration, now: Timestamp) -> Timestamp {
    let back = now.minus(span);
    match applied_at {
        Some(at) if at > back => at.min(now),
        _ => back,
    }
}

/// The sign-in part of a gate's judgement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Criteria that failed.
    pub failures: Vec<String>,
    /// Data that is missing (makes the gate inconclusive).
    pub missing: Vec<String>,
    /// What a pass or a skipped criterion should say.
    pub notes: Vec<String>,
}

/// Checks the gate's sign-in criteria against what was observed (`None`: nothing was read).
pub fn judge(gate: &Gate, signins: Option<&SignIns>) -> Judgement {
    let mut judgement = Judgement::default();
    if gate.max_blocked_signins.is_none() && gate.max_blocked_signin_ratio.is_none() {
        return judgement;
    }
    let tally = match signins {
        Some(SignIns::Observed(tally)) => tally,
        other => {
            let why = match other {
                Some(SignIns::Unavailable { reason }) => reason.clone(),
                _ => "not observed yet".to_string(),
            };
            let line = format!("sign-in criteria not available: {why}");
            match gate.signin_data {
                SignInData::Required => judgement.missing.push(line),
                SignInData::Optional => judgement.notes.push(format!(
                    "{line}; judged without them (signin_data = \"optional\")"
                )),
            }
            return judgement;
        }
    };
    let window = format_span(tally.until.since(tally.since));
    let lower_bound = if tally.truncated {
        " (at least: the log held more than one observation reads)"
    } else {
        ""
    };
    if let Some(max) = gate.max_blocked_signins
        && tally.impact() > max
    {
        judgement.failures.push(format!(
            "{} sign-ins blocked or would be blocked in the last {window}, more than {max} ({} blocked, {} report-only failures){lower_bound}",
            tally.impact(),
            tally.blocked,
            tally.would_block
        ));
    }
    if let Some(max) = gate.max_blocked_signin_ratio {
        match tally.impact_ratio() {
            None => judgement.missing.push(format!(
                "no sign-ins by the phase's users in the last {window}: the share of users blocked cannot be judged"
            )),
            Some(ratio) if ratio > max.fraction() => judgement.failures.push(format!(
                "sign-ins of {} blocked or would be blocked, more than {max} ({} of {} users who signed in in the last {window}){lower_bound}",
                format_percent(ratio),
                tally.affected_users,
                tally.users
            )),
            Some(_) => {}
        }
    }
    judgement.notes.push(format!(
        "{} of {} users' sign-ins blocked or would be blocked",
        tally.affected_users, tally.users
    ));
    judgement
}

/// Checks a running phase's sign-in rollback criteria: only blocked sign-ins (people locked out)
/// trip them, and only observed data; a log that could not be read never does.
pub fn rollback_trip(criteria: &RollbackWhen, signins: Option<&SignIns>) -> Option<String> {
    let tally = signins?.tally()?;
    if let Some(max) = criteria.blocked_signins_above
        && tally.blocked > max
    {
        return Some(format!(
            "{} blocked sign-ins (of {} users) are above the rollback bound of {max}",
            tally.blocked, tally.blocked_users
        ));
    }
    if let (Some(bound), Some(ratio)) = (criteria.blocked_signin_ratio_above, tally.blocked_ratio())
        && ratio > bound.fraction()
    {
        return Some(format!(
            "sign-ins of {} blocked ({} of {} users who signed in), above the rollback bound of {bound}",
            format_percent(ratio),
            tally.blocked_users,
            tally.users
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::{DEFAULT_MAX_HOLD, Ratio};

    const HOUR: Duration = Duration::from_secs(3600);

    fn percent(text: &str) -> Option<Ratio> {
        Ratio::parse_percent(text)
    }

    fn now() -> Timestamp {
        Timestamp::from_millis(1_800_000_000_000)
    }

    fn gate() -> Gate {
        Gate {
            max_noncompliant: None,
            max_noncompliant_ratio: None,
            min_reporting: None,
            stale_after: HOUR * 72,
            max_errors: None,
            max_error_ratio: None,
            approvals: 0,
            max_hold: DEFAULT_MAX_HOLD,
            max_blocked_signins: None,
            max_blocked_signin_ratio: None,
            signin_window: HOUR * 24,
            signin_data: SignInData::Required,
        }
    }

    fn tally(users: u64, affected: u64, blocked: u64, would_block: u64) -> SignIns {
        SignIns::Observed(SignInTally {
            since: now().minus(HOUR),
            until: now(),
            signins: users * 2,
            users,
            blocked,
            would_block,
            blocked_users: blocked.min(affected),
            affected_users: affected,
            truncated: false,
        })
    }

    #[test]
    fn the_counter_counts_each_user_once_per_class_and_only_inside_the_window() {
        let mut counter = SignInCounter::new(now().minus(HOUR), now());
        counter.add("a", now(), SignInOutcome::Blocked);
        counter.add("a", now(), SignInOutcome::Blocked);
        counter.add("a", now(), SignInOutcome::WouldBlock);
        counter.add("b", now(), SignInOutcome::WouldBlock);
        counter.add("c", now().minus(HOUR), SignInOutcome::Passed);
        // Outside the window: before it, and after it.
        counter.add("d", now().minus(HOUR * 2), SignInOutcome::Blocked);
        counter.add("e", now().plus(HOUR), SignInOutcome::Blocked);
        let t = counter.finish(false);
        assert_eq!((t.signins, t.users), (5, 3));
        assert_eq!((t.blocked, t.would_block, t.impact()), (2, 2, 4));
        assert_eq!((t.blocked_users, t.affected_users), (1, 2));
        assert_eq!(t.impact_ratio(), Some(2.0 / 3.0));
        assert_eq!(t.blocked_ratio(), Some(1.0 / 3.0));
    }

    #[test]
    fn the_window_starts_no_earlier_than_the_phase() {
        let applied = now().minus(HOUR * 2);
        assert_eq!(window(Some(applied), HOUR * 24, now()), applied);
        assert_eq!(window(Some(applied), HOUR, now()), now().minus(HOUR));
        assert_eq!(window(None, HOUR, now()), now().minus(HOUR));
        // A phase applied "after now" (clock skew) reads nothing before now.
        assert_eq!(window(Some(now().plus(HOUR)), HOUR, now()), now());
    }

    #[test]
    fn a_gate_without_sign_in_criteria_does_not_look_at_sign_ins() {
        assert_eq!(judge(&gate(), None), Judgement::default());
        let unavailable = SignIns::Unavailable {
            reason: "403".into(),
        };
        assert_eq!(judge(&gate(), Some(&unavailable)), Judgement::default());
    }

    #[test]
    fn the_gate_fails_above_either_bound_and_says_why() {
        let g = Gate {
            max_blocked_signins: Some(10),
            max_blocked_signin_ratio: percent("5%"),
            ..gate()
        };
        let within = judge(&g, Some(&tally(100, 5, 0, 10)));
        assert!(within.failures.is_empty(), "{within:?}");
        assert!(within.missing.is_empty());
        let count = judge(&g, Some(&tally(1000, 5, 0, 11)));
        assert_eq!(count.failures.len(), 1, "{count:?}");
        assert!(
            count.failures[0].starts_with("11 sign-ins blocked or would be blocked in the last 1h, more than 10 (0 blocked, 11 report-only failures)"),
            "{count:?}"
        );
        let ratio = judge(&g, Some(&tally(100, 6, 1, 5)));
        assert_eq!(ratio.failures.len(), 1, "{ratio:?}");
        assert!(
            ratio.failures[0]
                .contains("6% blocked or would be blocked, more than 5% (6 of 100 users"),
            "{ratio:?}"
        );
    }

    #[test]
    fn missing_sign_in_data_holds_unless_the_plan_makes_it_optional() {
        let g = Gate {
            max_blocked_signins: Some(0),
            ..gate()
        };
        let unavailable = SignIns::Unavailable {
            reason: "the app lacks AuditLog.Read.All".into(),
        };
        let required = judge(&g, Some(&unavailable));
        assert_eq!(
            required.missing,
            vec!["sign-in criteria not available: the app lacks AuditLog.Read.All".to_string()]
        );
        let optional = Gate {
            signin_data: SignInData::Optional,
            ..g.clone()
        };
        let skipped = judge(&optional, Some(&unavailable));
        assert!(skipped.missing.is_empty() && skipped.failures.is_empty());
        assert!(
            skipped.notes[0].contains("judged without them"),
            "{skipped:?}"
        );
        assert_eq!(judge(&g, None).missing.len(), 1);
    }

    #[test]
    fn no_sign_ins_at_all_cannot_judge_a_ratio_but_meets_a_count() {
        let ratio = Gate {
            max_blocked_signin_ratio: percent("1%"),
            ..gate()
        };
        assert_eq!(judge(&ratio, Some(&tally(0, 0, 0, 0))).missing.len(), 1);
        let count = Gate {
            max_blocked_signins: Some(0),
            ..gate()
        };
        let judged = judge(&count, Some(&tally(0, 0, 0, 0)));
        assert!(judged.missing.is_empty() && judged.failures.is_empty());
    }

    #[test]
    fn rollback_trips_on_blocked_sign_ins_only() {
        let criteria = RollbackWhen {
            blocked_signins_above: Some(5),
            ..RollbackWhen::default()
        };
        // Report-only failures block nobody.
        assert_eq!(rollback_trip(&criteria, Some(&tally(100, 50, 0, 50))), None);
        assert_eq!(rollback_trip(&criteria, Some(&tally(100, 5, 5, 0))), None);
        let tripped = rollback_trip(&criteria, Some(&tally(100, 6, 6, 0))).unwrap();
        assert!(
            tripped.contains("6 blocked sign-ins (of 6 users) are above the rollback bound of 5"),
            "{tripped}"
        );
        let unavailable = SignIns::Unavailable { reason: "x".into() };
        assert_eq!(rollback_trip(&criteria, Some(&unavailable)), None);
        assert_eq!(rollback_trip(&criteria, None), None);
        let ratio = RollbackWhen {
            blocked_signin_ratio_above: percent("10%"),
            ..RollbackWhen::default()
        };
        assert!(rollback_trip(&ratio, Some(&tally(100, 11, 11, 0))).is_some());
        assert!(rollback_trip(&ratio, Some(&tally(100, 10, 10, 0))).is_none());
        assert!(rollback_trip(&ratio, Some(&tally(0, 0, 0, 0))).is_none());
    }

    #[test]
    fn wanted_names_every_sign_in_criterion() {
        let none = RollbackWhen::default();
        assert!(!wanted(&gate(), &none));
        let g = Gate {
            max_blocked_signin_ratio: percent("1%"),
            ..gate()
        };
        assert!(wanted(&g, &none));
        let r = RollbackWhen {
            blocked_signins_above: Some(0),
            ..RollbackWhen::default()
        };
        assert!(wanted(&gate(), &r));
    }
}
