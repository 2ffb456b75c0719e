//! Scenario tests of the state machine, driven the way the engine drives it but with every effect
//! confirmed at once and time moved by hand.

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;
use crate::domain::desired::{desired_for_phases, desired_state};
use crate::domain::gate::Tally;
use crate::domain::plan::{self, Plan};

const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);

pub(super) const PLAN: &str = r#"
[rollout]
name = "test"
observe_every = "6h"

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
min_soak = "1d"
[phase.gate]
min_reporting = "90%"

[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
grace = "3d"
min_soak = "1d"
[phase.gate]
max_noncompliant_ratio = "2%"
approvals = 1

[[phase]]
id = "enforce"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]
min_soak = "1d"
[phase.rollback_when]
blocked_ratio_above = "5%"
"#;

pub(super) struct Harness {
    pub plan: Plan,
    pub rollout: Rollout,
    pub now: Timestamp,
    /// The last event the machine rejected, with why.
    pub rejected: Option<(Event, Rejection)>,
}

pub(super) fn healthy() -> Tally {
    Tally {
        targeted: 100,
        compliant: 99,
        noncompliant: 1,
        ..Tally::default()
    }
}

pub(super) fn failing(noncompliant: u64) -> Tally {
    Tally {
        targeted: 100,
        compliant: 100 - noncompliant,
        noncompliant,
        blocked: noncompliant,
        ..Tally::default()
    }
}

impl Harness {
    pub fn new(text: &str) -> Harness {
        let plan = plan::parse("test.toml", text).unwrap();
        let now = Timestamp::from_millis(1_800_000_000_000);
        let rollout = Rollout::new("test-1", &plan, "alice", now);
        Harness {
            plan,
            rollout,
            now,
            rejected: None,
        }
    }

    pub fn send(&mut self, kind: EventKind, trigger: Trigger) -> Result<Transition, Rejection> {
        let event = Event { kind, trigger };
        let transition = match step(&self.plan, &self.rollout, &event, self.now) {
            Ok(transition) => transition,
            Err(rejection) => {
                self.rejected = Some((event, rejection.clone()));
                return Err(rejection);
            }
        };
        self.rollout = transition.rollout.clone();
        self.rollout.last_seq += 1;
        self.rollout.check_invariants(&self.plan).unwrap();
        Ok(transition)
    }

    pub fn user(&mut self, kind: EventKind, who: &str) -> Result<Transition, Rejection> {
        self.send(kind, Trigger::user(who, "because"))
    }

    /// Confirms every pending effect, as a provider that always succeeds would.
    pub fn settle(&mut self) {
        while let Some(pending) = self.rollout.pending.first().cloned() {
            let kind = match pending.effect {
                Effect::CaptureBaseline => EventKind::BaselineCaptured { effect: pending.id },
                _ => EventKind::Reconciled {
                    effect: pending.id,
                    changes: 1,
                },
            };
            self.send(kind, Trigger::new(TriggerSource::Provider, "test", ""))
                .unwrap();
        }
    }

    pub fn approve(&mut self, phase: &str, who: &str) -> Result<Transition, Rejection> {
        let kind = EventKind::ApprovalGranted {
            phase: phase.into(),
            ticket: None,
            comment: None,
            digest: None,
        };
        self.user(kind, who)
    }

    pub fn observe(&mut self, tally: Tally) {
        let observations = self
            .rollout
            .phases
            .iter()
            .filter(|p| matches!(p.state, PhaseState::Soaking | PhaseState::AwaitingApproval))
            .map(|p| PhaseObservation {
                phase: p.id.clone(),
                at: self.now,
                tally,
                by_platform: Vec::new(),
                impact: None,
                forecasts: Vec::new(),
                signins: None,
                userless: 0,
            })
            .collect();
        self.send(
            EventKind::Observed { observations },
            Trigger::new(TriggerSource::Schedule, "test", "observation due"),
        )
        .unwrap();
    }

    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.plus(by);
    }

    pub fn state(&self, id: &str) -> PhaseState {
        self.rollout.phase(id).unwrap().state
    }

    pub fn start(&mut self) {
        self.user(
            EventKind::Start {
                plan_hash: self.plan.hash.clone(),
            },
            "alice",
        )
        .unwrap();
        self.settle();
    }

    /// Soaks the current phases and observes `tally` once the soak is over.
    pub fn soak_and_observe(&mut self, tally: Tally) {
        self.advance(DAY);
        self.observe(tally);
        self.settle();
    }
}

#[test]
fn start_captures_the_baseline_then_applies_the_first_phase() {
    let mut h = Harness::new(PLAN);
    let t = h
        .user(
            EventKind::Start {
                plan_hash: h.plan.hash.clone(),
            },
            "alice",
        )
        .unwrap();
    let names: Vec<&str> = t.effects.iter().map(|e| e.effect.name()).collect();
    assert_eq!(names, vec!["capture_baseline", "reconcile"]);
    assert_eq!(h.rollout.status, RolloutStatus::Running);
    assert_eq!(h.state("pilot"), PhaseState::Applying);
    h.settle();
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    assert!(h.rollout.baseline_captured);
}

#[test]
fn no_promotion_before_the_soak_is_over() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.advance(HOUR * 23);
    h.observe(healthy());
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    assert_eq!(h.rollout.status, RolloutStatus::Running);
    h.advance(HOUR);
    h.observe(healthy());
    assert_eq!(h.state("pilot"), PhaseState::Promoted);
    assert_eq!(h.state("notify"), PhaseState::Applying);
}

#[test]
fn a_passing_gate_waits_for_approval_then_promotes() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(healthy());
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    let approve = EventKind::ApprovalGranted {
        phase: "notify".into(),
        ticket: Some("CHG-1".into()),
        comment: None,
        digest: None,
    };
    h.user(approve.clone(), "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    assert_eq!(h.state("enforce"), PhaseState::Applying);
    let again = h.user(approve, "bob");
    assert!(again.is_err(), "a promoted phase cannot be approved again");
}

#[test]
fn a_failing_gate_holds_until_it_passes() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(failing(8));
    assert_eq!(h.rollout.status, RolloutStatus::Held);
    assert!(
        h.rollout.reason.contains("noncompliant 8% exceeds 2%"),
        "{}",
        h.rollout.reason
    );
    h.advance(HOUR * 6);
    h.observe(failing(5));
    assert_eq!(h.rollout.status, RolloutStatus::Held);
    h.advance(HOUR * 6);
    h.observe(failing(1));
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    let record = h.rollout.phase("notify").unwrap();
    assert_eq!(record.holds, 1);
    assert_eq!(record.held_since, None);
}

#[test]
fn a_hold_that_outlasts_max_hold_asks_for_a_person() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(failing(8));
    h.advance(DAY * 7);
    let t = h
        .send(
            EventKind::Tick,
            Trigger::new(TriggerSource::Schedule, "test", ""),
        )
        .unwrap();
    assert!(h.rollout.phase("notify").unwrap().hold_expired);
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("longer than its max_hold"))
    );
    h.user(EventKind::ResumeRequested, "alice").unwrap();
    assert!(!h.rollout.phase("notify").unwrap().hold_expired);
}

#[test]
fn missing_data_never_promotes() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(Tally {
        targeted: 10,
        unknown: 10,
        ..Tally::default()
    });
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    assert_eq!(h.rollout.status, RolloutStatus::Held);
}

#[test]
fn a_stale_observation_decides_nothing() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.advance(DAY);
    h.observe(healthy());
    let promoted_before = h.state("pilot");
    assert_eq!(promoted_before, PhaseState::Promoted);
    h.settle();
    h.advance(DAY);
    h.observe(healthy());
    h.advance(DAY);
    // The last observation is a day old: approving records the approval but cannot promote.
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(agenda(&h.plan, &h.rollout, h.now).observe, vec!["notify"]);
    h.observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn separation_of_duties_refuses_self_approval_by_default() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(healthy());
    let approve = EventKind::ApprovalGranted {
        phase: "notify".into(),
        ticket: None,
        comment: None,
        digest: None,
    };
    let refused = h.user(approve.clone(), "alice").unwrap_err();
    assert!(
        refused.to_string().contains("separation of duties"),
        "{refused}"
    );
    h.user(approve, "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn rollback_moves_back_one_phase_to_its_desired_state() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::Soaking);
    h.user(EventKind::RollbackRequested { to: None }, "carol")
        .unwrap();
    assert_eq!(h.rollout.status, RolloutStatus::RollingBack);
    assert_eq!(h.state("notify"), PhaseState::RolledBack);
    assert_eq!(h.state("pilot"), PhaseState::Applying);
    let pilot_only = desired_for_phases(&h.plan, &h.rollout.id, &BTreeSet::from([0]));
    assert_eq!(
        desired_state(&h.plan, &h.rollout).assignments,
        pilot_only.assignments
    );
    h.settle();
    assert_eq!(h.rollout.status, RolloutStatus::RolledBack);
    assert!(
        h.rollout.reason.contains("rolled back to `pilot`"),
        "{}",
        h.rollout.reason
    );
    assert!(h.rollout.reason.contains("carol"), "{}", h.rollout.reason);
    // Nothing automatic moves it on.
    h.soak_and_observe(healthy());
    assert_eq!(h.rollout.status, RolloutStatus::RolledBack);
    h.user(EventKind::ResumeRequested, "carol").unwrap();
    h.advance(DAY);
    h.observe(healthy());
    assert_eq!(h.state("pilot"), PhaseState::Promoted);
    assert_eq!(h.state("notify"), PhaseState::Applying);
}

#[test]
fn rollback_to_a_phase_that_is_not_promoted_is_refused() {
    let mut h = Harness::new(PLAN);
    h.start();
    let err = h
        .user(
            EventKind::RollbackRequested {
                to: Some("enforce".into()),
            },
            "carol",
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("can only roll back to a promoted phase"),
        "{err}"
    );
}

#[test]
fn rollback_when_rolls_back_on_its_own() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(healthy());
    h.approve("notify", "bob").unwrap();
    h.settle();
    assert_eq!(h.state("enforce"), PhaseState::Soaking);
    h.advance(HOUR * 6);
    h.observe(failing(9));
    assert_eq!(h.rollout.status, RolloutStatus::RollingBack);
    assert_eq!(h.state("enforce"), PhaseState::RolledBack);
    assert_eq!(h.state("notify"), PhaseState::Applying);
    assert!(
        h.rollout
            .reason
            .contains("rollback_when of `enforce` tripped"),
        "{}",
        h.rollout.reason
    );
    h.settle();
    assert_eq!(h.rollout.status, RolloutStatus::RolledBack);
}

#[test]
fn abort_before_any_change_needs_no_restore() {
    let mut h = Harness::new(PLAN);
    h.user(
        EventKind::Start {
            plan_hash: h.plan.hash.clone(),
        },
        "alice",
    )
    .unwrap();
    h.user(EventKind::AbortRequested, "alice").unwrap();
    assert_eq!(h.rollout.status, RolloutStatus::Aborted);
    assert!(h.rollout.pending.is_empty());
}

#[test]
fn abort_restores_the_baseline() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    let t = h.user(EventKind::AbortRequested, "alice").unwrap();
    assert_eq!(t.effects[0].effect, Effect::RestoreBaseline);
    assert_eq!(h.rollout.pending.len(), 1);
    assert_eq!(h.rollout.status, RolloutStatus::Aborting);
    h.settle();
    assert_eq!(h.rollout.status, RolloutStatus::Aborted);
    assert!(h.user(EventKind::ResumeRequested, "alice").is_err());
}

#[test]
fn a_pause_is_never_undone_by_automation() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.user(EventKind::PauseRequested, "alice").unwrap();
    h.soak_and_observe(healthy());
    h.send(
        EventKind::Tick,
        Trigger::new(TriggerSource::Schedule, "t", ""),
    )
    .unwrap();
    assert_eq!(h.rollout.status, RolloutStatus::Paused);
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    h.user(EventKind::ResumeRequested, "alice").unwrap();
    assert_eq!(h.state("pilot"), PhaseState::Promoted);
}

#[test]
fn a_changed_plan_resets_the_current_gate() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(healthy());
    h.approve("notify", "bob").unwrap_or_else(|e| panic!("{e}"));
    // Approved and promoted; now change the plan while enforce soaks.
    h.settle();
    h.plan = plan::parse(
        "test.toml",
        &PLAN.replace(
            "blocked_ratio_above = \"5%\"",
            "blocked_ratio_above = \"4%\"",
        ),
    )
    .unwrap();
    let t = h
        .send(
            EventKind::PlanChanged {
                plan_hash: h.plan.hash.clone(),
            },
            Trigger::user("carol", "plan apply"),
        )
        .unwrap();
    assert_eq!(h.state("enforce"), PhaseState::Applying);
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("gate of `enforce` reset")),
        "{:?}",
        t.notes
    );
    assert_eq!(h.rollout.plan_hash, h.plan.hash);
}

#[test]
fn a_plan_that_drops_an_applied_phase_is_refused() {
    let mut h = Harness::new(PLAN);
    h.start();
    let cut = PLAN
        .split("[[phase]]\nid = \"notify\"")
        .next()
        .unwrap()
        .to_string();
    let smaller = plan::parse("t", &cut.replace("id = \"pilot\"", "id = \"first\"")).unwrap();
    h.plan = smaller;
    let err = h
        .send(
            EventKind::PlanChanged {
                plan_hash: h.plan.hash.clone(),
            },
            Trigger::user("carol", ""),
        )
        .unwrap_err();
    assert!(err.to_string().contains("drops phase `pilot`"), "{err}");
}

#[test]
fn a_tick_with_nothing_due_changes_nothing() {
    let mut h = Harness::new(PLAN);
    h.start();
    let before = h.rollout.clone();
    let event = Event {
        kind: EventKind::Tick,
        trigger: Trigger::new(TriggerSource::Schedule, "t", ""),
    };
    let t = step(&h.plan, &h.rollout, &event, h.now).unwrap();
    assert_eq!(t.rollout, before);
}

#[test]
fn the_agenda_observes_after_applying_and_wakes_at_the_soak_end() {
    let mut h = Harness::new(PLAN);
    h.start();
    assert_eq!(agenda(&h.plan, &h.rollout, h.now).observe, vec!["pilot"]);
    h.observe(healthy());
    let next = agenda(&h.plan, &h.rollout, h.now);
    assert!(next.observe.is_empty());
    assert_eq!(next.wake_at, Some(h.now.plus(HOUR * 6)));
    h.advance(HOUR * 20);
    h.observe(healthy());
    assert_eq!(
        agenda(&h.plan, &h.rollout, h.now).wake_at,
        Some(h.now.plus(HOUR * 4))
    );
}

#[test]
fn provider_failure_fails_and_resume_retries() {
    let mut h = Harness::new(PLAN);
    h.user(
        EventKind::Start {
            plan_hash: h.plan.hash.clone(),
        },
        "alice",
    )
    .unwrap();
    let effect = h.rollout.pending[0].id;
    h.send(
        EventKind::ProviderFailed {
            effect: Some(effect),
            error: "503 Service Unavailable".into(),
        },
        Trigger::new(TriggerSource::Provider, "simulator", ""),
    )
    .unwrap();
    assert_eq!(h.rollout.status, RolloutStatus::Failed);
    assert_eq!(h.rollout.pending.len(), 2, "nothing committed is lost");
    h.user(EventKind::ResumeRequested, "alice").unwrap();
    assert_eq!(h.rollout.status, RolloutStatus::Running);
    h.settle();
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
}

#[test]
fn effect_ids_come_from_the_event_sequence() {
    let mut h = Harness::new(PLAN);
    let t = h
        .user(
            EventKind::Start {
                plan_hash: h.plan.hash.clone(),
            },
            "alice",
        )
        .unwrap();
    let ids: Vec<String> = t.effects.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, vec!["1.0", "1.1"]);
}

#[test]
fn the_transition_table_has_no_way_out_of_aborted() {
    for next in RolloutStatus::ALL {
        assert_eq!(
            RolloutStatus::Aborted.can_transition_to(next),
            next == RolloutStatus::Aborted
        );
    }
}

/// `PLAN` with `gate` added to the gate of `notify` and `rollout` to `[rollout]`.
fn approval_plan(rollout: &str, gate: &str) -> String {
    PLAN.replace(
        "observe_every = \"6h\"",
        &format!("observe_every = \"6h\"\n{rollout}"),
    )
    .replace("approvals = 1", &format!("approvals = 1\n{gate}"))
}

/// A harness whose `notify` passed its gate and waits for approval.
pub(super) fn waiting_for_approval(text: &str) -> Harness {
    let mut h = Harness::new(text);
    h.start();
    h.soak_and_observe(healthy());
    h.soak_and_observe(healthy());
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    h
}

#[test]
fn a_two_approver_phase_needs_two_distinct_people_other_than_the_starter() {
    let text = approval_plan("", "").replace("approvals = 1", "approvals = 2");
    let mut h = waiting_for_approval(&text);
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    assert!(
        h.rollout.reason.contains("needs 1 more approval"),
        "{}",
        h.rollout.reason
    );
    // The same person in other spelling is the same person.
    for bob in ["Bob", " BOB "] {
        let again = h.approve("notify", bob).unwrap_err();
        assert!(
            again.to_string().contains("bob has already approved"),
            "{again}"
        );
    }
    // The starter may not approve, however the name is written.
    for alice in ["alice", "ALICE", " Alice"] {
        let refused = h.approve("notify", alice).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "separation of duties: alice started this rollout and cannot approve `notify`; someone else must"
        );
    }
    // Nobody at all is not a person.
    for nobody in ["", "  "] {
        let refused = h.approve("notify", nobody).unwrap_err();
        assert!(
            refused.to_string().contains("must not be empty"),
            "{refused}"
        );
        assert!(h.user(EventKind::PauseRequested, nobody).is_err());
    }
    let t = h.approve("notify", "carol").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    assert!(
        t.notes.iter().any(|n| n.contains("approved by bob, carol")),
        "{:?}",
        t.notes
    );
    let by: Vec<&str> = h
        .rollout
        .phase("notify")
        .unwrap()
        .approvals
        .iter()
        .map(|a| a.by.as_str())
        .collect();
    assert_eq!(by, ["bob", "carol"]);
}

#[test]
fn only_the_named_approvers_may_approve_with_a_ticket_that_matches() {
    let text = approval_plan(
        "author = \"dave@contoso.com\"",
        "approvers = [\"Dave@contoso.com\", \"carol@contoso.com\"]\nticket_pattern = \"CHG[0-9]{4}\"",
    );
    let mut h = waiting_for_approval(&text);
    let approve = |ticket: Option<&str>| EventKind::ApprovalGranted {
        phase: "notify".into(),
        ticket: ticket.map(String::from),
        comment: None,
        digest: None,
    };
    let refused = h.user(approve(Some("CHG0001")), "bob").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "bob may not approve phase `notify`; its approvers are: dave@contoso.com, carol@contoso.com"
    );
    let refused = h
        .user(approve(Some("CHG0001")), "DAVE@contoso.com")
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("dave@contoso.com wrote the plan"),
        "{refused}"
    );
    let refused = h.user(approve(None), "Carol@Contoso.com").unwrap_err();
    assert!(
        refused.to_string().contains("needs a change ticket"),
        "{refused}"
    );
    let refused = h
        .user(approve(Some("INC0001")), "carol@contoso.com")
        .unwrap_err();
    assert!(refused.to_string().contains("does not match"), "{refused}");
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    h.user(approve(Some("CHG0001")), "Carol@Contoso.com")
        .unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    let approval = &h.rollout.phase("notify").unwrap().approvals[0];
    assert_eq!(approval.by, "carol@contoso.com");
    assert_eq!(approval.ticket.as_deref(), Some("CHG0001"));
}

#[test]
fn a_plan_may_turn_separation_of_duties_off() {
    let text = approval_plan("separation_of_duties = false", "");
    let mut h = waiting_for_approval(&text);
    h.approve("notify", "Alice").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn whoever_rolls_back_to_a_phase_asked_for_its_promotion_and_may_not_approve_it() {
    let mut h = waiting_for_approval(PLAN);
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    h.user(
        EventKind::RollbackRequested {
            to: Some("notify".into()),
        },
        "Carol",
    )
    .unwrap();
    h.settle();
    h.user(EventKind::ResumeRequested, "dana").unwrap();
    h.soak_and_observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    let refused = h.approve("notify", "carol").unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("carol asked for this promotion"),
        "{refused}"
    );
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn an_approval_that_expired_before_the_gate_passed_does_not_count() {
    let text = approval_plan("", "approval_expires_after = \"6h\"");
    let mut h = Harness::new(&text);
    h.start();
    h.soak_and_observe(healthy());
    // `notify` soaks; an approval given now lapses long before its gate is judged.
    h.approve("notify", "bob").unwrap();
    let given = h.now;
    let approval = h.rollout.phase("notify").unwrap().approvals[0].clone();
    assert_eq!(approval.expires_at, Some(given.plus(HOUR * 6)));
    // The machine wants to hear from the shell when it lapses.
    assert_eq!(
        agenda(&h.plan, &h.rollout, h.now).wake_at,
        Some(given.plus(HOUR * 6))
    );
    h.advance(HOUR * 6);
    let t = h
        .send(
            EventKind::Tick,
            Trigger::new(TriggerSource::Schedule, "t", ""),
        )
        .unwrap();
    assert!(
        t.notes
            .iter()
            .any(|n| n.starts_with("approval of `notify` by bob expired")),
        "{:?}",
        t.notes
    );
    assert!(h.rollout.phase("notify").unwrap().approvals.is_empty());
    h.advance(HOUR * 18);
    h.observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    // A fresh approval promotes.
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn a_resumed_rollout_checks_expiry_before_it_promotes() {
    let text = approval_plan("", "approval_expires_after = \"6h\"");
    let mut h = Harness::new(&text);
    h.start();
    h.soak_and_observe(healthy());
    h.user(EventKind::PauseRequested, "carol").unwrap();
    // Approved while paused; the gate would pass, but the approval lapses before the resume.
    h.approve("notify", "bob").unwrap();
    h.advance(DAY);
    h.observe(healthy());
    assert_eq!(h.rollout.status, RolloutStatus::Paused);
    let t = h.user(EventKind::ResumeRequested, "carol").unwrap();
    assert!(
        t.notes.iter().any(|n| n.contains("by bob expired")),
        "{:?}",
        t.notes
    );
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
}

#[test]
fn an_approval_still_valid_when_the_gate_passes_promotes() {
    let text = approval_plan("", "approval_expires_after = \"2d\"");
    let mut h = Harness::new(&text);
    h.start();
    h.soak_and_observe(healthy());
    h.approve("notify", "bob").unwrap();
    h.soak_and_observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn an_approval_whose_evidence_moved_past_the_tolerance_is_void_and_the_rollout_asks_again() {
    let text = approval_plan("", "approval_tolerance = \"0.5%\"");
    let mut h = Harness::new(&text);
    h.start();
    h.soak_and_observe(healthy());
    // `notify` soaks; seen with 1 of 100 failing, bob approves.
    h.advance(HOUR * 12);
    h.observe(healthy());
    h.approve("notify", "bob").unwrap();
    let approval = h.rollout.phase("notify").unwrap().approvals[0].clone();
    let evidence = approval.evidence.expect("bound to what bob saw");
    assert_eq!(evidence.tally, healthy());
    assert_eq!(
        evidence.digest,
        approval::evidence_digest(&h.plan.hash, "notify", &healthy(), &[])
    );
    // When the gate passes, the counts are no longer what bob approved.
    h.advance(HOUR * 12);
    let moved = Tally {
        compliant: 98,
        noncompliant: 2,
        ..healthy()
    };
    h.observe(moved);
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    assert!(
        h.rollout
            .reason
            .contains("bob's approval is void: the evidence moved past the plan's tolerance of 0.5% since it was given: failing 1% → 2%"),
        "{}",
        h.rollout.reason
    );
    assert!(h.rollout.phase("notify").unwrap().approvals.is_empty());
    // Approved again on the evidence now, it promotes.
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn an_approval_within_the_tolerance_still_counts() {
    let text = approval_plan("", "approval_tolerance = \"2%\"");
    let mut h = Harness::new(&text);
    h.start();
    h.soak_and_observe(healthy());
    h.advance(HOUR * 12);
    h.observe(healthy());
    h.approve("notify", "bob").unwrap();
    h.advance(HOUR * 12);
    h.observe(Tally {
        compliant: 98,
        noncompliant: 2,
        ..healthy()
    });
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn a_plan_change_voids_the_running_phases_approvals_and_says_so() {
    let text = PLAN.replace("approvals = 1", "approvals = 2");
    let mut h = waiting_for_approval(&text);
    h.approve("notify", "bob").unwrap();
    h.plan = plan::parse("test.toml", &text.replace("approvals = 2", "approvals = 1")).unwrap();
    let t = h
        .send(
            EventKind::PlanChanged {
                plan_hash: h.plan.hash.clone(),
            },
            Trigger::user("carol", "plan apply"),
        )
        .unwrap();
    assert!(
        t.notes
            .iter()
            .any(|n| n.starts_with("approval of `notify` by bob void")
                && n.ends_with("the plan changed")),
        "{:?}",
        t.notes
    );
    assert!(h.rollout.phase("notify").unwrap().approvals.is_empty());
    assert_eq!(h.state("notify"), PhaseState::Applying);
}

#[test]
fn a_resume_decides_again_a_promotion_whose_approval_lapsed_while_paused() {
    let text = approval_plan("", "approval_expires_after = \"6h\"");
    let mut h = waiting_for_approval(&text);
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    assert_eq!(h.state("enforce"), PhaseState::Applying);
    // Paused before the enforcement it committed is carried out; the approval lapses meanwhile.
    h.user(EventKind::PauseRequested, "carol").unwrap();
    h.advance(HOUR * 7);
    let t = h.user(EventKind::ResumeRequested, "carol").unwrap();
    assert!(
        t.notes
            .iter()
            .any(|n| n.starts_with("the promotion of `notify` is decided again")),
        "{:?}",
        t.notes
    );
    assert!(
        t.notes.iter().any(|n| n.contains("by bob expired")),
        "{:?}",
        t.notes
    );
    assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
    assert_eq!(h.state("enforce"), PhaseState::Pending);
    assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
    // The only configuration pending is the one without enforcement.
    let setters: Vec<&Effect> = h
        .rollout
        .pending
        .iter()
        .map(|p| &p.effect)
        .filter(|e| e.sets_configuration())
        .collect();
    let [Effect::Reconcile { desired, .. }] = setters.as_slice() else {
        panic!("{setters:?}")
    };
    assert!(desired.assignments.iter().all(|a| a.phase != "enforce"));
    // Approved again on a fresh observation, it promotes.
    h.observe(healthy());
    h.approve("notify", "bob").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
}

#[test]
fn a_resume_carries_out_a_promotion_whose_approvals_still_count() {
    let text = approval_plan("", "approval_expires_after = \"6h\"");
    let mut h = waiting_for_approval(&text);
    h.approve("notify", "bob").unwrap();
    h.user(EventKind::PauseRequested, "carol").unwrap();
    h.advance(HOUR);
    h.user(EventKind::ResumeRequested, "carol").unwrap();
    assert_eq!(h.state("notify"), PhaseState::Promoted);
    assert_eq!(h.state("enforce"), PhaseState::Applying);
    h.settle();
    assert_eq!(h.state("enforce"), PhaseState::Soaking);
    assert!(!h.rollout.phase("notify").unwrap().promotion_unapplied);
}

const SIGNIN_PLAN: &str = r#"
[rollout]
name = "test"
observe_every = "6h"

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
min_soak = "1d"
[phase.gate]
max_blocked_signin_ratio = "5%"

[[phase]]
id = "enforce"
mode = "enforce"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "1d"
[phase.rollback_when]
blocked_signins_above = 10
"#;

impl Harness {
    fn observe_signins(&mut self, signins: crate::domain::signins::SignIns) {
        let observations = self
            .rollout
            .phases
            .iter()
            .filter(|p| matches!(p.state, PhaseState::Soaking | PhaseState::AwaitingApproval))
            .map(|p| PhaseObservation {
                phase: p.id.clone(),
                at: self.now,
                tally: healthy(),
                by_platform: Vec::new(),
                impact: None,
                forecasts: Vec::new(),
                signins: Some(signins.clone()),
                userless: 0,
            })
            .collect();
        self.send(
            EventKind::Observed { observations },
            Trigger::new(TriggerSource::Schedule, "test", "observation due"),
        )
        .unwrap();
        self.settle();
    }
}

fn signin_tally(
    at: Timestamp,
    users: u64,
    blocked: u64,
    would_block: u64,
) -> crate::domain::signins::SignIns {
    crate::domain::signins::SignIns::Observed(crate::domain::signins::SignInTally {
        since: at.minus(DAY),
        until: at,
        signins: users,
        users,
        blocked,
        would_block,
        blocked_users: blocked,
        affected_users: blocked + would_block,
        truncated: false,
    })
}

#[test]
fn a_report_only_phase_holds_on_would_be_blocked_sign_ins_and_an_enforced_one_rolls_back_on_blocked_ones()
 {
    let mut h = Harness::new(SIGNIN_PLAN);
    h.start();
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    // Healthy devices, but 20 of 100 users' sign-ins would fail once enforced: the gate holds.
    h.advance(DAY);
    let at = h.now;
    h.observe_signins(signin_tally(at, 100, 0, 20));
    assert_eq!(h.rollout.status, RolloutStatus::Held);
    let verdict = h.rollout.phase("pilot").unwrap().verdict.clone().unwrap();
    assert_eq!(verdict.outcome, GateOutcome::Fail);
    assert!(
        verdict.reasons[0].contains("20% blocked or would be blocked, more than 5%"),
        "{:?}",
        verdict.reasons
    );
    assert!(verdict.evidence.signins.is_some());
    // Not read: the gate cannot pass; it holds as inconclusive, saying why.
    h.advance(HOUR * 6);
    h.observe_signins(crate::domain::signins::SignIns::Unavailable {
        reason: "403".into(),
    });
    let verdict = h.rollout.phase("pilot").unwrap().verdict.clone().unwrap();
    assert_eq!(verdict.outcome, GateOutcome::Inconclusive);
    assert_eq!(h.state("pilot"), PhaseState::Soaking);
    // Fixed: 2 of 100 pass, and the enforce phase starts.
    h.advance(HOUR * 6);
    let at = h.now;
    h.observe_signins(signin_tally(at, 100, 0, 2));
    assert_eq!(h.state("pilot"), PhaseState::Promoted);
    assert_eq!(h.state("enforce"), PhaseState::Soaking);
    // Report-only failures never roll back; within the bound neither do blocked ones.
    h.advance(HOUR * 6);
    let at = h.now;
    h.observe_signins(signin_tally(at, 100, 10, 40));
    assert_eq!(h.rollout.status, RolloutStatus::Running);
    // Above it, the phase rolls back at once, before its soak ends.
    h.advance(HOUR * 6);
    let at = h.now;
    h.observe_signins(signin_tally(at, 100, 11, 0));
    assert_eq!(h.state("enforce"), PhaseState::RolledBack);
    assert_eq!(h.rollout.status, RolloutStatus::RolledBack);
    assert!(
        h.rollout
            .reason
            .contains("11 blocked sign-ins (of 11 users) are above the rollback bound of 10"),
        "{}",
        h.rollout.reason
    );
}

#[test]
fn an_approval_pinned_to_the_digest_shown_is_refused_once_the_evidence_moved() {
    let mut h = Harness::new(PLAN);
    h.start();
    h.soak_and_observe(healthy());
    let approve = |digest: &str| EventKind::ApprovalGranted {
        phase: "notify".into(),
        ticket: None,
        comment: None,
        digest: Some(digest.into()),
    };
    // Nothing observed of `notify` yet: no evidence to pin.
    let refused = h.user(approve(&"0".repeat(64)), "bob").unwrap_err();
    assert!(
        refused.to_string().contains("has no evidence yet"),
        "{refused}"
    );
    h.advance(DAY);
    h.observe(healthy());
    let digest_now = |h: &Harness| {
        let seen = h
            .rollout
            .phase("notify")
            .unwrap()
            .observation
            .clone()
            .unwrap();
        evidence_digest(&h.rollout.plan_hash, "notify", &seen.tally, &seen.forecasts)
    };
    let shown = digest_now(&h);
    // The evidence moves between showing and confirming.
    h.advance(HOUR);
    let mut moved = healthy();
    moved.noncompliant += 1;
    h.observe(moved);
    assert_ne!(digest_now(&h), shown);
    let refused = h.user(approve(&shown), "bob").unwrap_err().to_string();
    assert!(
        refused.contains("the evidence of `notify` moved since it was shown")
            && refused.contains(&shown)
            && refused.contains(&digest_now(&h)),
        "{refused}"
    );
    assert!(h.rollout.phase("notify").unwrap().approvals.is_empty());
    // The digest as it stands now (any case) is accepted.
    let current = digest_now(&h).to_uppercase();
    h.user(approve(&current), "bob").unwrap();
    assert_eq!(h.rollout.phase("notify").unwrap().approvals.len(), 1);
}
