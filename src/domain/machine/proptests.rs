//! Property tests: random event sequences against the state machine's invariants.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::tests::{Harness, PLAN};
use super::*;
use crate::domain::desired::{desired_for_phases, desired_state};
use crate::domain::gate::Tally;

const PARALLEL: &str = include_str!("../../../plans/ios-parallel-pilots.toml");

#[derive(Clone, Debug)]
enum Op {
    Advance(u32),
    ConfirmEffect,
    FailEffect,
    Observe {
        noncompliant: u8,
        silent: u8,
        errors: u8,
    },
    Tick,
    Approve {
        phase: u8,
        approver: u8,
    },
    Reject {
        phase: u8,
    },
    Pause,
    Resume,
    Rollback {
        to: Option<u8>,
    },
    Abort,
    /// Someone else changed what the rollout manages.
    Drift,
    /// The tenant holds the pending change for approval.
    Hold,
    Resolve {
        adopt: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..60).prop_map(Op::Advance),
        6 => Just(Op::ConfirmEffect),
        1 => Just(Op::FailEffect),
        6 => (0u8..12, 0u8..15, 0u8..4).prop_map(|(noncompliant, silent, errors)| Op::Observe { noncompliant, silent, errors }),
        2 => Just(Op::Tick),
        3 => (0u8..6, 0u8..5).prop_map(|(phase, approver)| Op::Approve { phase, approver }),
        1 => (0u8..6).prop_map(|phase| Op::Reject { phase }),
        1 => Just(Op::Pause),
        2 => Just(Op::Resume),
        1 => proptest::option::of(0u8..6).prop_map(|to| Op::Rollback { to }),
        1 => Just(Op::Abort),
        1 => Just(Op::Drift),
        1 => Just(Op::Hold),
        1 => any::<bool>().prop_map(|adopt| Op::Resolve { adopt }),
    ]
}

fn tally(noncompliant: u8, silent: u8, errors: u8) -> Tally {
    let noncompliant = u64::from(noncompliant);
    let silent = u64::from(silent);
    let errors = u64::from(errors);
    Tally {
        targeted: 100,
        compliant: 100 - noncompliant - silent - errors,
        noncompliant,
        unknown: silent,
        errors,
        blocked: noncompliant,
        ..Tally::default()
    }
}

fn phase_id(h: &Harness, n: u8) -> String {
    h.plan.phases[n as usize % h.plan.phases.len()].id.clone()
}

/// Applies an op; `Ok(None)` when the machine rejected it (which must change nothing).
fn apply(h: &mut Harness, op: &Op) -> Option<Transition> {
    let provider = || Trigger::new(TriggerSource::Provider, "prop", "");
    let result = match op {
        Op::Advance(hours) => {
            h.advance(Duration::from_secs(u64::from(*hours) * 3600));
            return None;
        }
        Op::ConfirmEffect => {
            let pending = h.rollout.pending.first()?.clone();
            let kind = match pending.effect {
                Effect::CaptureBaseline => EventKind::BaselineCaptured { effect: pending.id },
                _ => EventKind::Reconciled {
                    effect: pending.id,
                    changes: 1,
                },
            };
            h.send(kind, provider())
        }
        Op::FailEffect => {
            let pending = h.rollout.pending.first()?.clone();
            h.send(
                EventKind::ProviderFailed {
                    effect: Some(pending.id),
                    error: "boom".into(),
                },
                provider(),
            )
        }
        Op::Observe {
            noncompliant,
            silent,
            errors,
        } => {
            let observations = h
                .rollout
                .phases
                .iter()
                .filter(|p| matches!(p.state, PhaseState::Soaking | PhaseState::AwaitingApproval))
                .map(|p| PhaseObservation {
                    phase: p.id.clone(),
                    at: h.now,
                    tally: tally(*noncompliant, *silent, *errors),
                    by_platform: Vec::new(),
                    impact: None,
                    forecasts: Vec::new(),
                    signins: None,
                    userless: 0,
                })
                .collect();
            h.send(
                EventKind::Observed { observations },
                Trigger::new(TriggerSource::Schedule, "prop", ""),
            )
        }
        Op::Tick => h.send(
            EventKind::Tick,
            Trigger::new(TriggerSource::Schedule, "prop", ""),
        ),
        Op::Approve { phase, approver } => {
            let who = ["alice", "bob", "carol", "Bob ", "CAROL"][*approver as usize];
            let phase = phase_id(h, *phase);
            h.user(
                EventKind::ApprovalGranted {
                    phase,
                    ticket: None,
                    comment: None,
                    digest: None,
                },
                who,
            )
        }
        Op::Reject { phase } => {
            let phase = phase_id(h, *phase);
            h.user(EventKind::ApprovalRejected { phase }, "bob")
        }
        Op::Pause => h.user(EventKind::PauseRequested, "alice"),
        Op::Resume => h.user(EventKind::ResumeRequested, "alice"),
        Op::Rollback { to } => {
            let to = to.map(|n| phase_id(h, n));
            h.user(EventKind::RollbackRequested { to }, "carol")
        }
        Op::Abort => h.user(EventKind::AbortRequested, "alice"),
        Op::Drift => h.send(
            EventKind::DriftDetected {
                effect: h.rollout.pending.first().map(|p| p.id),
                changes: vec![crate::domain::event::DriftChange {
                    object: "policy".into(),
                    field: "assignments".into(),
                    expected: "a".into(),
                    found: "b".into(),
                }],
            },
            provider(),
        ),
        Op::Hold => {
            let pending = h
                .rollout
                .pending
                .iter()
                .find(|p| !p.effect.is_notification())?
                .clone();
            h.send(
                EventKind::TenantApprovalPending {
                    effect: pending.id,
                    request: crate::domain::event::TenantRequest {
                        reference: "r-1".into(),
                        summary: "assign".into(),
                    },
                },
                provider(),
            )
        }
        Op::Resolve { adopt } => {
            let resolution = if *adopt {
                crate::domain::event::DriftResolution::Adopt
            } else {
                crate::domain::event::DriftResolution::Reapply
            };
            h.user(EventKind::DriftResolved { resolution }, "dana")
        }
    };
    result.ok()
}

fn check_step(h: &Harness, before: &Rollout, op: &Op, transition: &Transition) {
    let after = &h.rollout;
    // No promotion without a passing gate, a finished soak and enough approvals.
    for (idx, (old, new)) in before.phases.iter().zip(&after.phases).enumerate() {
        if old.state != PhaseState::Promoted && new.state == PhaseState::Promoted {
            let phase = &h.plan.phases[idx];
            let applied_at = new.applied_at.expect("a promoted phase was applied");
            let soak_end = applied_at.plus(phase.min_soak);
            assert!(
                h.now >= soak_end,
                "promoted `{}` before its soak ended",
                phase.id
            );
            let seen = new.observation.as_ref().expect("promoted without data");
            assert!(
                seen.at >= soak_end,
                "promoted `{}` on data from during the soak",
                phase.id
            );
            let verdict = new.verdict.as_ref().expect("promoted without a verdict");
            assert_eq!(
                verdict.outcome,
                gate::GateOutcome::Pass,
                "promoted `{}` on {:?}",
                phase.id,
                verdict
            );
            // Enough distinct people, none whose approval lapsed, none barred by their duties.
            let people: BTreeSet<&str> = new.approvals.iter().map(|a| a.by.as_str()).collect();
            assert!(
                people.len() >= phase.gate.approvals as usize,
                "promoted `{}` with {} of {} approvals",
                phase.id,
                people.len(),
                phase.gate.approvals
            );
            for approval in &new.approvals {
                assert!(
                    approval.is_valid_at(h.now),
                    "promoted `{}` on an expired approval by {}",
                    phase.id,
                    approval.by
                );
                if let Some(tolerance) = phase.approval.evidence_tolerance {
                    let then = approval.evidence.as_ref().expect("bound to evidence");
                    let (_, by) = approval::moved(&then.tally, &seen.tally).unwrap();
                    assert!(
                        by <= tolerance.fraction(),
                        "promoted `{}` on an approval whose evidence moved by {by}",
                        phase.id
                    );
                }
                assert_eq!(
                    conflict_of_duties(&h.plan, after, new, &approval.by),
                    None,
                    "promoted `{}` approved by {}",
                    phase.id,
                    approval.by
                );
            }
        }
    }
    // A rollback lands exactly on the desired state of the phases it returns to.
    if after.status == RolloutStatus::RollingBack && before.status != RolloutStatus::RollingBack {
        let targets: BTreeSet<usize> = after
            .phases
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == PhaseState::Applying)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            desired_state(&h.plan, after).assignments,
            desired_for_phases(&h.plan, &after.id, &targets).assignments
        );
    }
    // Nothing is promoted while the tenant drifted or holds a change.
    let stopped = |s: RolloutStatus| {
        matches!(
            s,
            RolloutStatus::Drifted | RolloutStatus::WaitingTenantApproval
        )
    };
    if stopped(after.status) || matches!(op, Op::Resolve { .. }) {
        for (old, new) in before.phases.iter().zip(&after.phases) {
            assert!(
                old.state == PhaseState::Promoted || new.state != PhaseState::Promoted,
                "{op:?} promoted `{}` ({} → {})",
                new.id,
                before.status,
                after.status
            );
        }
    }
    // Drift is only left by a person's decision.
    if before.status == RolloutStatus::Drifted && after.status != RolloutStatus::Drifted {
        assert!(
            matches!(op, Op::Resolve { .. } | Op::Abort),
            "{op:?} left drift"
        );
    }
    // While drift is unresolved, automation asks for no new change.
    if !before.drift.is_empty()
        && !matches!(op, Op::Resolve { .. } | Op::Abort | Op::Rollback { .. })
    {
        assert!(
            transition
                .effects
                .iter()
                .all(|e| !e.effect.sets_configuration()),
            "{op:?} asked for a change while drifted"
        );
    }
    // A person's pause is only left by a person's command.
    if before.status == RolloutStatus::Paused && after.status != RolloutStatus::Paused {
        assert!(
            matches!(op, Op::Resume | Op::Rollback { .. } | Op::Abort),
            "{op:?} left a pause"
        );
    }
    // Effects get fresh, increasing ids.
    for effect in &transition.effects {
        assert_eq!(
            effect.id.seq, after.last_seq,
            "effect id not from this event"
        );
    }
}

/// A rejected event is rejected for what the rollout is: asked again it is rejected the same way
/// (the machine is a function of plan, rollout, event and time), and "not now" names the status
/// the rollout really has.
fn check_rejection(h: &Harness, op: &Op) {
    let Some((event, rejection)) = &h.rejected else {
        return; // nothing was sent (time passed, or no effect to confirm)
    };
    let again = step(&h.plan, &h.rollout, event, h.now);
    assert_eq!(
        again.as_ref().err(),
        Some(rejection),
        "{op:?}: not deterministic"
    );
    if let Rejection::NotNow { status, id, .. } = rejection {
        assert_eq!(*status, h.rollout.status, "{op:?}: {rejection}");
        assert_eq!(*id, h.rollout.id);
    }
}

/// `PLAN` with two approvers needed for `notify`, each approval lasting 12 hours.
fn quorum_plan() -> String {
    PLAN.replace(
        "approvals = 1",
        "approvals = 2\napproval_expires_after = \"12h\"\napproval_tolerance = \"1%\"",
    )
}

fn run(text: &str, ops: &[Op]) {
    let mut h = Harness::new(text);
    h.user(
        EventKind::Start {
            plan_hash: h.plan.hash.clone(),
        },
        "alice",
    )
    .unwrap();
    for op in ops {
        let before = h.rollout.clone();
        h.rejected = None;
        match apply(&mut h, op) {
            Some(transition) => check_step(&h, &before, op, &transition),
            None => check_rejection(&h, op),
        }
    }
}

proptest! {
    // Failing cases are kept beside this file (`proptests.regressions`) and replayed first.
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn linear_plan_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        run(PLAN, &ops);
    }

    #[test]
    fn two_approvers_with_expiry_keep_the_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        run(&quorum_plan(), &ops);
    }

    #[test]
    fn parallel_plan_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        run(PARALLEL, &ops);
    }
}

/// Drives a rollout to the end with healthy data and approvals: the invariants do not forbid
/// everything, progress is possible.
#[test]
fn a_healthy_rollout_completes() {
    for text in [PLAN, PARALLEL] {
        let mut h = Harness::new(text);
        h.start();
        for _ in 0..200 {
            if h.rollout.status == RolloutStatus::Completed {
                break;
            }
            h.advance(Duration::from_secs(6 * 3600));
            let phases = h
                .plan
                .phases
                .iter()
                .map(|p| p.id.clone())
                .collect::<Vec<_>>();
            h.observe(tally(0, 0, 0));
            for phase in phases {
                let _ = h.user(
                    EventKind::ApprovalGranted {
                        phase,
                        ticket: None,
                        comment: None,
                        digest: None,
                    },
                    "bob",
                );
            }
            h.settle();
        }
        assert_eq!(h.rollout.status, RolloutStatus::Completed);
    }
}
