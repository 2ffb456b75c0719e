//! Exceptions from enforcement: a person exempts a user or a group until a time, with a reason;
//! the exemption ends on its own when its time is up (`ExceptionExpired`, from the schedule) or
//! when a person revokes it. Each is an audit event.
//!
//! An exception changes only what enforcement blocks: owners are still told in notify phases
//! and the observation still reports their devices. It is part of the desired state, so
//! granting, revoking or expiring one while an enforce phase is applied queues a `Reconcile`
//! (crash-safe like every effect); otherwise the next reconcile carries it.

use std::time::Duration;

use super::{Machine, Rejection};
use crate::domain::desired::desired_state;
use crate::domain::event::{Effect, Until};
use crate::domain::plan::{Mode, identity_key};
use crate::domain::rollout::{Exception, Rollout, RolloutStatus, Subject};
use crate::domain::time::Timestamp;

/// At most this many exceptions are active at once.
pub const MAX_EXCEPTIONS: usize = 100;
const MAX_NAME: usize = 64;
const MAX_SUBJECT: usize = 256;
const MAX_REASON: usize = 1000;

/// The earliest end of an active exception: the agenda wakes then.
pub(super) fn next_expiry(rollout: &Rollout) -> Option<Timestamp> {
    rollout.exceptions.iter().map(|e| e.until).min()
}

/// When an exception of a rollout that is not finished ends next, whatever else it waits for:
/// an exception ends at its time even while the rollout is paused or waits for a person.
pub fn exception_deadline(rollout: &Rollout) -> Option<Timestamp> {
    if matches!(
        rollout.status,
        RolloutStatus::Aborted | RolloutStatus::Completed
    ) {
        return None;
    }
    next_expiry(rollout)
}

/// The exceptions whose time is up at `now`, by name.
pub fn expired_exceptions(rollout: &Rollout, now: Timestamp) -> Vec<String> {
    rollout
        .exceptions
        .iter()
        .filter(|e| e.until <= now)
        .map(|e| e.name.clone())
        .collect()
}

/// A subject as the machine keeps it: a user's UPN as an identity key, a group's name trimmed.
pub fn subject(user: Option<&str>, group: Option<&str>) -> Result<Subject, Rejection> {
    let subject = match (user, group) {
        (Some(upn), None) => Subject::User(identity_key(upn)),
        (None, Some(name)) => Subject::Group(name.trim().to_string()),
        _ => {
            return Err(Rejection::Invalid(
                "an exception is for one user or one group: give --user or --group".into(),
            ));
        }
    };
    let (Subject::User(text) | Subject::Group(text)) = &subject;
    if text.is_empty() || text.chars().count() > MAX_SUBJECT || text.chars().any(char::is_control) {
        return Err(Rejection::Invalid(format!(
            "an exception's user or group must be 1–{MAX_SUBJECT} printable characters"
        )));
    }
    Ok(subject)
}

/// `--until` as a person writes it: an RFC 3339 instant (`2026-12-24T17:00:00Z`) or a span from
/// when the grant is recorded (`3d`, `12h`).
pub fn parse_until(text: &str) -> Result<Until, Rejection> {
    let text = text.trim();
    if let Some(at) = Timestamp::parse_rfc3339(text).filter(|_| text.contains('T')) {
        return Ok(Until::At(at));
    }
    match humantime::parse_duration(text) {
        Ok(span) if !span.is_zero() => Ok(Until::AfterSecs(span.as_secs().max(1))),
        _ => Err(Rejection::Invalid(format!(
            "invalid exception end `{text}`: an RFC 3339 time such as 2026-12-24T17:00:00Z, or a span such as 3d or 12h"
        ))),
    }
}

fn check_name(name: &str) -> Result<(), Rejection> {
    let valid = (1..=MAX_NAME).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "invalid exception name `{name}`: 1–{MAX_NAME} letters, digits, `-` or `_`"
        )))
    }
}

impl Machine<'_> {
    pub(super) fn grant_exception(
        &mut self,
        name: &str,
        subject: &Subject,
        until: Until,
    ) -> Result<(), Rejection> {
        if matches!(
            self.next.status,
            RolloutStatus::Aborting | RolloutStatus::Aborted | RolloutStatus::Completed
        ) {
            return Err(self.not_now("grant an exception"));
        }
        let Some(by) = self.requester() else {
            return Err(Rejection::Invalid(
                "only a person grants an exception".into(),
            ));
        };
        check_name(name)?;
        let reason = self.trigger.reason.trim().to_string();
        if reason.is_empty() || reason.chars().count() > MAX_REASON {
            return Err(Rejection::Invalid(format!(
                "an exception needs a reason (1–{MAX_REASON} characters), for the audit trail"
            )));
        }
        if let Subject::User(u) | Subject::Group(u) = subject
            && u.trim().is_empty()
        {
            return Err(Rejection::Invalid(
                "an exception's user or group must not be empty".into(),
            ));
        }
        let until = match until {
            Until::At(at) => at,
            Until::AfterSecs(secs) => self.now.plus(Duration::from_secs(secs)),
        };
        if until <= self.now {
            return Err(Rejection::Invalid(format!(
                "exception `{name}` would end at {}, which is not after now ({})",
                until.rfc3339(),
                self.now.rfc3339()
            )));
        }
        let latest = self.now.plus(self.plan.max_exception);
        if until > latest {
            return Err(Rejection::Invalid(format!(
                "exception `{name}` would end at {}, later than the plan allows ({}, `[rollout] max_exception`)",
                until.rfc3339(),
                latest.rfc3339()
            )));
        }
        if self.next.exceptions.iter().any(|e| e.name == name) {
            return Err(Rejection::Invalid(format!(
                "an exception named `{name}` is already active; revoke it first"
            )));
        }
        if self.next.exceptions.len() >= MAX_EXCEPTIONS {
            return Err(Rejection::Invalid(format!(
                "{MAX_EXCEPTIONS} exceptions are already active; revoke one first"
            )));
        }
        self.next.exceptions.push(Exception {
            name: name.to_string(),
            subject: subject.clone(),
            until,
            reason: reason.clone(),
            granted_by: by.clone(),
            granted_at: self.now,
        });
        self.notes.push(format!(
            "exception `{name}` granted by {by}: {subject} exempt from enforcement until {} ({reason})",
            until.rfc3339()
        ));
        self.enforce_exceptions();
        Ok(())
    }

    pub(super) fn revoke_exception(&mut self, name: &str) -> Result<(), Rejection> {
        if self.requester().is_none() {
            return Err(Rejection::Invalid(
                "only a person revokes an exception".into(),
            ));
        }
        if self.trigger.reason.trim().is_empty() {
            return Err(Rejection::Invalid(
                "revoking an exception needs a reason, for the audit trail".into(),
            ));
        }
        let Some(position) = self.next.exceptions.iter().position(|e| e.name == name) else {
            return Err(Rejection::Invalid(format!(
                "no active exception named `{name}`"
            )));
        };
        let ended = self.next.exceptions.remove(position);
        self.notes.push(format!(
            "exception `{name}` revoked by {}: {} is enforced again",
            self.by(),
            ended.subject
        ));
        self.enforce_exceptions();
        Ok(())
    }

    pub(super) fn expire_exceptions(&mut self, names: &[String]) -> Result<(), Rejection> {
        let now = self.now;
        let before = self.next.exceptions.len();
        let mut ended = Vec::new();
        self.next.exceptions.retain(|e| {
            let expires = names.contains(&e.name) && e.until <= now;
            if expires {
                ended.push(format!(
                    "exception `{}` expired at {}: {} is enforced again (granted by {}: {})",
                    e.name,
                    e.until.rfc3339(),
                    e.subject,
                    e.granted_by,
                    e.reason
                ));
            }
            !expires
        });
        self.notes.extend(ended);
        if self.next.exceptions.len() != before {
            self.enforce_exceptions();
        }
        Ok(())
    }

    /// While an enforce phase is applied, the backend gets the new set of exemptions now.
    fn enforce_exceptions(&mut self) {
        let enforcing = self
            .plan
            .phases
            .iter()
            .zip(&self.next.phases)
            .any(|(phase, record)| phase.mode == Mode::Enforce && record.state.is_applied());
        let reconciles = matches!(
            self.next.status,
            RolloutStatus::Running
                | RolloutStatus::WaitingApproval
                | RolloutStatus::Held
                | RolloutStatus::Paused
                | RolloutStatus::Failed
                | RolloutStatus::RolledBack
                | RolloutStatus::Rejected
        );
        if enforcing && reconciles {
            let desired = desired_state(self.plan, &self.next);
            // A pause holds back every change to the tenant, but not the end of an exception:
            // with nothing else held, the new exemptions are made during the pause. A change the
            // pause holds (a committed promotion, a plan change) takes them along when resumed.
            let during_pause = self.next.status == RolloutStatus::Paused
                && !self.next.pending.iter().any(|p| {
                    p.effect.sets_configuration()
                        && !matches!(
                            p.effect,
                            Effect::Reconcile {
                                during_pause: true,
                                ..
                            }
                        )
                });
            if self.next.status == RolloutStatus::Paused && !during_pause {
                self.notes.push(
                    "the pause holds a change to the tenant: the exemptions are changed with it when the rollout is resumed".to_string(),
                );
            }
            self.request(Effect::Reconcile {
                desired,
                resolution: None,
                during_pause,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{Harness, PLAN, healthy};
    use super::*;
    use crate::domain::event::{EventKind, Trigger, TriggerSource};
    use crate::domain::machine::agenda;
    use crate::domain::rollout::PhaseState;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn grant(name: &str, subject: Subject, until: Until) -> EventKind {
        EventKind::ExceptionGranted {
            name: name.into(),
            subject,
            until,
        }
    }

    fn carol() -> Subject {
        Subject::User("carol@example.com".into())
    }

    fn reconciles(h: &Harness) -> usize {
        h.rollout
            .pending
            .iter()
            .filter(|p| matches!(p.effect, Effect::Reconcile { .. }))
            .count()
    }

    /// PLAN started and taken to its enforce phase, applied and soaking.
    fn enforcing() -> Harness {
        let mut h = Harness::new(PLAN);
        h.start();
        h.soak_and_observe(healthy());
        h.soak_and_observe(healthy());
        h.approve("notify", "bob").unwrap();
        h.settle();
        assert_eq!(h.state("enforce"), PhaseState::Soaking);
        h
    }

    #[test]
    fn a_grant_while_enforcing_queues_a_reconcile_with_the_exemption() {
        let mut h = enforcing();
        let t = h
            .send(
                grant("laptop-repair", carol(), Until::AfterSecs(3 * 86_400)),
                Trigger::user(" Bob ", "laptop at the repair shop"),
            )
            .unwrap();
        let exception = &h.rollout.exceptions[0];
        assert_eq!(exception.granted_by, "bob");
        assert_eq!(exception.until, h.now.plus(3 * DAY));
        assert_eq!(exception.reason, "laptop at the repair shop");
        assert!(t.notes[0].contains("granted by bob"), "{:?}", t.notes);
        let [pending] = t.effects.as_slice() else {
            panic!("one effect: {:?}", t.effects)
        };
        let Effect::Reconcile { desired, .. } = &pending.effect else {
            panic!("a reconcile: {pending:?}")
        };
        assert_eq!(desired.exempt.users, vec!["carol@example.com".to_string()]);
        assert!(desired.assignments.iter().any(|a| a.mode == Mode::Enforce));
    }

    #[test]
    fn a_grant_before_enforcement_queues_nothing_and_the_enforce_phase_carries_it() {
        let mut h = Harness::new(PLAN);
        h.start();
        let t = h
            .user(grant("trip", carol(), Until::AfterSecs(30 * 86_400)), "bob")
            .unwrap();
        assert!(t.effects.is_empty(), "{:?}", t.effects);
        assert_eq!(reconciles(&h), 0);
        h.soak_and_observe(healthy());
        h.soak_and_observe(healthy());
        let t = h.approve("notify", "bob").unwrap();
        let desired = t
            .effects
            .iter()
            .find_map(|p| match &p.effect {
                Effect::Reconcile { desired, .. } => Some(desired.clone()),
                _ => None,
            })
            .expect("the promotion reconciles");
        assert_eq!(desired.exempt.users, vec!["carol@example.com".to_string()]);
    }

    #[test]
    fn every_bound_is_refused_and_nothing_is_recorded() {
        let mut h = enforcing();
        let week = Until::AfterSecs(7 * 86_400);
        let refused = [
            (grant("", carol(), week), "bob", "invalid exception name"),
            (grant("a b", carol(), week), "bob", "invalid exception name"),
            (grant(&"x".repeat(65), carol(), week), "bob", "invalid"),
            (
                grant("past", carol(), Until::At(h.now)),
                "bob",
                "not after now",
            ),
            (
                grant("long", carol(), Until::AfterSecs(91 * 86_400)),
                "bob",
                "later than the plan allows",
            ),
            (
                grant("empty", Subject::User(String::new()), week),
                "bob",
                "must not be empty",
            ),
            (grant("nobody", carol(), week), "  ", "must not be empty"),
        ];
        for (kind, who, why) in refused {
            let before = h.rollout.clone();
            let err = h.user(kind.clone(), who).unwrap_err();
            assert!(err.to_string().contains(why), "{kind:?}: {err}");
            assert_eq!(h.rollout, before);
        }
        let no_reason = h.send(grant("why", carol(), week), Trigger::user("bob", " "));
        assert!(
            no_reason
                .unwrap_err()
                .to_string()
                .contains("needs a reason")
        );
        h.user(grant("dup", carol(), week), "bob").unwrap();
        let dup = h.user(grant("dup", carol(), week), "bob").unwrap_err();
        assert!(dup.to_string().contains("already active"), "{dup}");
    }

    #[test]
    fn at_most_a_hundred_are_active_and_a_plan_may_lower_the_maximum() {
        let mut h = Harness::new(PLAN);
        for n in 0..MAX_EXCEPTIONS {
            h.user(
                grant(&format!("e{n}"), carol(), Until::AfterSecs(86_400)),
                "bob",
            )
            .unwrap();
        }
        let err = h
            .user(grant("one-more", carol(), Until::AfterSecs(86_400)), "bob")
            .unwrap_err();
        assert!(err.to_string().contains("already active"), "{err}");

        let short = PLAN.replace(
            "observe_every = \"6h\"",
            "observe_every = \"6h\"\nmax_exception = \"2d\"",
        );
        let mut h = Harness::new(&short);
        assert_eq!(h.plan.max_exception, 2 * DAY);
        let err = h
            .user(grant("trip", carol(), Until::AfterSecs(3 * 86_400)), "bob")
            .unwrap_err();
        assert!(err.to_string().contains("max_exception"), "{err}");
    }

    #[test]
    fn a_finished_rollout_grants_none() {
        let mut h = Harness::new(PLAN);
        h.user(EventKind::AbortRequested, "bob").unwrap();
        h.settle();
        let err = h
            .user(grant("late", carol(), Until::AfterSecs(86_400)), "bob")
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot grant an exception"),
            "{err}"
        );
    }

    #[test]
    fn a_revoke_ends_it_and_reconciles_while_enforcing() {
        let mut h = enforcing();
        h.user(grant("trip", carol(), Until::AfterSecs(86_400)), "bob")
            .unwrap();
        h.settle();
        let unknown = h.user(
            EventKind::ExceptionRevoked {
                name: "nope".into(),
            },
            "bob",
        );
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("no active exception")
        );
        let t = h
            .send(
                EventKind::ExceptionRevoked {
                    name: "trip".into(),
                },
                Trigger::user("dave", "back early"),
            )
            .unwrap();
        assert!(h.rollout.exceptions.is_empty());
        assert!(
            t.notes[0].contains("revoked by dave: back early"),
            "{:?}",
            t.notes
        );
        let Effect::Reconcile { desired, .. } = &t.effects[0].effect else {
            panic!("{:?}", t.effects)
        };
        assert!(desired.exempt.is_empty());
    }

    #[test]
    fn the_agenda_wakes_at_the_earliest_end_and_the_expiry_is_its_own_event() {
        let mut h = enforcing();
        h.user(grant("later", carol(), Until::AfterSecs(5 * 3600)), "bob")
            .unwrap();
        h.user(
            grant(
                "sooner",
                Subject::Group("Field Staff".into()),
                Until::AfterSecs(2 * 3600),
            ),
            "bob",
        )
        .unwrap();
        h.settle();
        let sooner = h.now.plus(2 * HOUR);
        let wake = agenda(&h.plan, &h.rollout, h.now).wake_at.unwrap();
        assert_eq!(wake, sooner);
        h.advance(HOUR);
        assert!(expired_exceptions(&h.rollout, h.now).is_empty());
        h.advance(HOUR);
        let names = expired_exceptions(&h.rollout, h.now);
        assert_eq!(names, vec!["sooner".to_string()]);
        let t = h
            .send(
                EventKind::ExceptionExpired { names },
                Trigger::new(TriggerSource::Schedule, "run", "exception ended"),
            )
            .unwrap();
        assert!(t.notes[0].contains("`sooner` expired"), "{:?}", t.notes);
        assert!(t.notes[0].contains("granted by bob"), "{:?}", t.notes);
        assert_eq!(h.rollout.exceptions.len(), 1);
        let Effect::Reconcile { desired, .. } = &t.effects[0].effect else {
            panic!("{:?}", t.effects)
        };
        assert_eq!(desired.exempt.users, vec!["carol@example.com".to_string()]);
        assert!(desired.exempt.groups.is_empty());
    }

    fn pause(h: &mut Harness) {
        h.user(EventKind::PauseRequested, "bob").unwrap();
        assert_eq!(h.rollout.status, RolloutStatus::Paused);
    }

    fn expire(h: &mut Harness) -> super::super::Transition {
        let names = expired_exceptions(&h.rollout, h.now);
        assert!(!names.is_empty());
        h.send(
            EventKind::ExceptionExpired { names },
            Trigger::new(TriggerSource::Schedule, "serve", "exception ended"),
        )
        .unwrap()
    }

    #[test]
    fn a_paused_rollouts_exception_ends_at_its_time_and_in_the_tenant_during_the_pause() {
        let mut h = enforcing();
        h.user(grant("trip", carol(), Until::AfterSecs(2 * 3600)), "bob")
            .unwrap();
        h.settle();
        pause(&mut h);
        // Paused, the rollout's agenda is empty, but its exception still has a deadline.
        assert_eq!(agenda(&h.plan, &h.rollout, h.now).wake_at, None);
        assert_eq!(exception_deadline(&h.rollout), Some(h.now.plus(2 * HOUR)));
        h.advance(2 * HOUR);
        let t = expire(&mut h);
        assert!(h.rollout.exceptions.is_empty());
        assert_eq!(h.rollout.status, RolloutStatus::Paused);
        let [pending] = t.effects.as_slice() else {
            panic!("one effect: {:?}", t.effects)
        };
        let Effect::Reconcile {
            desired,
            during_pause,
            ..
        } = &pending.effect
        else {
            panic!("a reconcile: {pending:?}")
        };
        assert!(*during_pause, "nothing else is held: made during the pause");
        assert!(desired.exempt.is_empty());
        // Confirmed, it applied no phase and the rollout stays paused.
        let phases = h.rollout.phases.clone();
        let t = h
            .send(
                EventKind::Reconciled {
                    effect: pending.id,
                    changes: 1,
                },
                Trigger::new(TriggerSource::Provider, "serve", "reconciled"),
            )
            .unwrap();
        assert!(h.rollout.pending.is_empty());
        assert_eq!(h.rollout.phases, phases);
        assert_eq!(h.rollout.status, RolloutStatus::Paused);
        assert!(t.notes[0].contains("during the pause"), "{:?}", t.notes);
        assert_eq!(exception_deadline(&h.rollout), None);
    }

    #[test]
    fn a_paused_rollout_holding_a_promotion_changes_the_exemptions_with_it_when_resumed() {
        let plan = format!(
            "{PLAN}[phase.gate]\napprovals = 1\n\n[[phase]]\nid = \"wide\"\nmode = \"enforce\"\n\
             include = [\"Contractors\"]\nexclude = [\"Break Glass\"]\nafter = [\"enforce\"]\nmin_soak = \"1d\"\n"
        );
        let mut h = Harness::new(&plan);
        h.start();
        h.soak_and_observe(healthy());
        h.soak_and_observe(healthy());
        h.approve("notify", "bob").unwrap();
        h.settle();
        h.user(
            grant("trip", carol(), Until::AfterSecs(3 * DAY.as_secs())),
            "bob",
        )
        .unwrap();
        h.settle();
        h.soak_and_observe(healthy());
        assert_eq!(h.state("enforce"), PhaseState::AwaitingApproval);
        h.approve("enforce", "bob").unwrap();
        assert_eq!(h.state("wide"), PhaseState::Applying);
        pause(&mut h);
        h.advance(3 * DAY);
        let t = expire(&mut h);
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("when the rollout is resumed")),
            "{:?}",
            t.notes
        );
        // One configuration effect: the promotion the pause holds, now without the exemption.
        let reconciles: Vec<_> = h
            .rollout
            .pending
            .iter()
            .filter_map(|p| match &p.effect {
                Effect::Reconcile {
                    desired,
                    during_pause,
                    ..
                } => Some((desired, *during_pause)),
                _ => None,
            })
            .collect();
        let [(desired, during_pause)] = reconciles.as_slice() else {
            panic!("{:?}", h.rollout.pending)
        };
        assert!(!during_pause, "held by the pause");
        assert!(desired.exempt.is_empty());
        assert!(desired.assignments.iter().any(|a| a.phase == "wide"));
        assert_eq!(h.state("wide"), PhaseState::Applying);
    }

    #[test]
    fn an_expiry_before_its_time_changes_nothing() {
        let mut h = enforcing();
        h.user(grant("trip", carol(), Until::AfterSecs(86_400)), "bob")
            .unwrap();
        h.settle();
        let t = h
            .send(
                EventKind::ExceptionExpired {
                    names: vec!["trip".into()],
                },
                Trigger::new(TriggerSource::Schedule, "run", "exception ended"),
            )
            .unwrap();
        assert!(t.effects.is_empty());
        assert_eq!(h.rollout.exceptions.len(), 1);
    }

    #[test]
    fn an_end_is_an_instant_or_a_span() {
        assert_eq!(
            parse_until("2026-12-24T17:00:00Z").unwrap(),
            Until::At(Timestamp::parse_rfc3339("2026-12-24T17:00:00Z").unwrap())
        );
        assert_eq!(parse_until("3d").unwrap(), Until::AfterSecs(3 * 86_400));
        for bad in ["", "0s", "soon", "2026-12-24", "-3d"] {
            assert!(parse_until(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn old_records_without_exceptions_still_decode_and_encode_the_same() {
        let h = Harness::new(PLAN);
        let json = serde_json::to_string(&h.rollout).unwrap();
        assert!(!json.contains("exceptions"), "{json}");
        let back: Rollout = serde_json::from_str(&json).unwrap();
        assert!(back.exceptions.is_empty());
    }
}
