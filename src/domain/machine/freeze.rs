//! Freeze windows in the machine: a promotion that is due inside a window waits, with a deadline
//! at the window's end (the agenda wakes the shell then); the status says until when. Rollback
//! and abort never wait. A person the window names (`override_by`, `override_groups`) may let
//! promotions through until the freeze ends, with a reason, recorded.

use super::{Machine, Rejection};
use crate::domain::plan::freeze::{Frozen, frozen_at};
use crate::domain::rollout::{FreezeHold, FreezeOverride, RolloutStatus};

/// Overrides kept on a rollout (the ones that ended are dropped first).
const MAX_OVERRIDES: usize = 20;

impl Machine<'_> {
    /// The freeze holding promotions now, unless a person overrode it.
    pub(super) fn freeze_holding(&self) -> Option<Frozen> {
        let now = self.now;
        let frozen = frozen_at(&self.plan.freezes, now)?;
        let overridden = self
            .next
            .freeze_overrides
            .iter()
            .any(|o| o.at <= now && now < o.until);
        (!overridden).then_some(frozen)
    }

    /// A promotion of `phase` is due but `frozen` holds it.
    pub(super) fn hold_for_freeze(&mut self, phase: &str, frozen: Frozen) {
        let until_local = self
            .plan
            .freezes
            .iter()
            .find(|w| w.name == frozen.window)
            .map(|w| w.local(frozen.until))
            .unwrap_or_default();
        let hold = self.next.freeze.get_or_insert_with(|| FreezeHold {
            window: frozen.window.clone(),
            until: frozen.until,
            until_local,
            phases: Vec::new(),
        });
        if !hold.phases.iter().any(|p| p == phase) {
            hold.phases.push(phase.to_string());
        }
    }

    /// After the phases are judged: says when a freeze starts holding a promotion, and when it
    /// no longer does. `was` is the hold before this step.
    pub(super) fn settle_freeze(&mut self, was: Option<FreezeHold>) {
        match (&was, &self.next.freeze) {
            (Some(_), None) if self.freeze_holding().is_some() => {
                // Not judged this step (no fresh observation yet): still frozen.
                self.next.freeze = was;
            }
            (Some(old), None) => self.notes.push(format!(
                "freeze window `{}` no longer holds promotions",
                old.window
            )),
            (old, Some(hold)) if old.as_ref() != Some(hold) => self.notes.push(format!(
                "the promotion of `{}` is due, but freeze window `{}` holds promotions until {} ({})",
                hold.phases.join("`, `"),
                hold.window,
                hold.until,
                hold.until_local
            )),
            _ => {}
        }
    }

    pub(super) fn override_freeze(&mut self) -> Result<(), Rejection> {
        if matches!(
            self.next.status,
            RolloutStatus::Aborting | RolloutStatus::Aborted | RolloutStatus::Completed
        ) {
            return Err(self.not_now("override a freeze"));
        }
        let Some(who) = self.requester() else {
            return Err(Rejection::Invalid(
                "only a person overrides a freeze".into(),
            ));
        };
        let now = self.now;
        let Some(frozen) = frozen_at(&self.plan.freezes, now) else {
            return Err(Rejection::Invalid(format!(
                "no freeze window holds the promotions of `{}` now",
                self.next.id
            )));
        };
        let window = self
            .plan
            .freezes
            .iter()
            .find(|w| w.name == frozen.window)
            .expect("the window found is the plan's");
        if window.override_by.is_empty() {
            return Err(Rejection::Invalid(format!(
                "freeze window `{}` cannot be overridden: the plan names nobody who may (`override_by`, `override_groups`)",
                window.name
            )));
        }
        if !window.override_by.contains(&who) {
            return Err(Rejection::Invalid(format!(
                "{who} may not override freeze window `{}`; who may: {}",
                window.name,
                window.override_who.join(", ")
            )));
        }
        if self.trigger.reason.trim().is_empty() {
            return Err(Rejection::Invalid(
                "overriding a freeze needs a reason, for the audit trail".into(),
            ));
        }
        if self
            .next
            .freeze_overrides
            .iter()
            .any(|o| o.at <= now && now < o.until)
        {
            return Err(Rejection::Invalid(format!(
                "freeze window `{}` is overridden already",
                window.name
            )));
        }
        self.next.freeze_overrides.retain(|o| o.until > now);
        if self.next.freeze_overrides.len() >= MAX_OVERRIDES {
            self.next.freeze_overrides.remove(0);
        }
        self.next.freeze_overrides.push(FreezeOverride {
            window: window.name.clone(),
            by: who.clone(),
            at: now,
            until: frozen.until,
        });
        self.notes.push(format!(
            "{who} overrides freeze window `{}` until {} ({}): {}; promotions that are due go on",
            window.name,
            frozen.until,
            window.local(frozen.until),
            self.trigger.reason.trim()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{Harness, PLAN, healthy};
    use crate::domain::event::{EventKind, Trigger, TriggerSource};
    use crate::domain::machine::agenda;
    use crate::domain::rollout::{PhaseState, RolloutStatus};
    use crate::domain::time::Timestamp;

    const HOUR: Duration = Duration::from_secs(3600);

    /// PLAN with a freeze from Saturday 00:00 to Monday 00:00 UTC; the harness starts on
    /// Friday 2027-01-15 08:00 UTC, so `pilot` is due for promotion on Saturday 08:00.
    fn frozen_plan(extra: &str) -> String {
        PLAN.replace(
            "[[phase]]\nid = \"pilot\"",
            &format!(
                "[[freeze]]\nname = \"weekend\"\ntime_zone = \"UTC\"\nweekly = {{ from = \"sat 00:00\", to = \"mon 00:00\" }}\n{extra}\n[[phase]]\nid = \"pilot\""
            ),
        )
    }

    fn monday() -> Timestamp {
        Timestamp::parse_rfc3339("2027-01-18T00:00:00Z").unwrap()
    }

    fn frozen_harness(extra: &str) -> Harness {
        let mut h = Harness::new(&frozen_plan(extra));
        assert_eq!(h.now.rfc3339(), "2027-01-15T08:00:00Z");
        h.start();
        h.soak_and_observe(healthy());
        h
    }

    #[test]
    fn a_promotion_due_in_a_freeze_waits_until_it_ends_and_says_until_when() {
        let mut h = frozen_harness("");
        assert_eq!(h.now.rfc3339(), "2027-01-16T08:00:00Z");
        assert_eq!(h.state("pilot"), PhaseState::Soaking);
        assert_eq!(h.rollout.status, RolloutStatus::Running);
        assert_eq!(
            h.rollout.reason,
            "the promotion of `pilot` waits for freeze window `weekend` until 2027-01-18T00:00:00Z (Mon 2027-01-18 00:00 UTC)"
        );
        let hold = h.rollout.freeze.clone().unwrap();
        assert_eq!(hold.until, monday());
        // The machine wants to be woken when the window ends.
        let wake = agenda(&h.plan, &h.rollout, h.now).wake_at.unwrap();
        assert!(wake <= monday(), "{wake}");
        // Observations inside the window change nothing.
        h.advance(HOUR * 6);
        h.observe(healthy());
        assert_eq!(h.state("pilot"), PhaseState::Soaking);
        assert_eq!(h.rollout.freeze.as_ref().unwrap().until, monday());
        // A tick without a fresh observation keeps the freeze and says nothing new.
        h.advance(HOUR * 7);
        let t = h
            .send(
                EventKind::Tick,
                Trigger::new(TriggerSource::Schedule, "t", ""),
            )
            .unwrap();
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        assert!(h.rollout.freeze.is_some());
        // At the window's end the promotion goes on.
        h.now = monday();
        let t = {
            h.observe(healthy());
            h.rollout.clone()
        };
        assert_eq!(h.state("pilot"), PhaseState::Promoted);
        assert_eq!(t.phase("pilot").unwrap().promoted_at, Some(monday()));
        assert!(h.rollout.freeze.is_none());
    }

    #[test]
    fn rollback_and_abort_are_never_frozen() {
        let mut h = frozen_harness("");
        assert!(h.rollout.freeze.is_some());
        h.user(EventKind::RollbackRequested { to: None }, "bob")
            .unwrap();
        assert_eq!(h.rollout.status, RolloutStatus::RollingBack);
        let mut h = frozen_harness("");
        h.user(EventKind::AbortRequested, "bob").unwrap();
        assert_eq!(h.rollout.status, RolloutStatus::Aborting);
    }

    #[test]
    fn approvals_are_collected_in_a_freeze_and_the_promotion_waits() {
        let text = frozen_plan("").replace(
            "min_reporting = \"90%\"",
            "min_reporting = \"90%\"\napprovals = 1",
        );
        let mut h = Harness::new(&text);
        h.start();
        h.soak_and_observe(healthy());
        assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
        h.approve("pilot", "bob").unwrap();
        assert_eq!(h.state("pilot"), PhaseState::Soaking);
        assert_eq!(h.rollout.status, RolloutStatus::Running);
        assert!(
            h.rollout
                .reason
                .contains("waits for freeze window `weekend`")
        );
        assert_eq!(h.rollout.phase("pilot").unwrap().approvals.len(), 1);
    }

    #[test]
    fn only_a_named_person_overrides_a_freeze_with_a_reason_and_it_is_recorded() {
        let mut h = frozen_harness("override_by = [\"Dora\"]");
        let override_by = |h: &mut Harness, who: &str, why: &str| {
            h.send(EventKind::FreezeOverridden, Trigger::user(who, why))
        };
        let err = override_by(&mut h, "bob", "urgent").unwrap_err();
        assert!(
            err.to_string()
                .contains("bob may not override freeze window `weekend`; who may: dora"),
            "{err}"
        );
        let err = override_by(&mut h, "dora", " ").unwrap_err();
        assert!(err.to_string().contains("needs a reason"), "{err}");
        let t = override_by(&mut h, "DORA", "security fix, CAB-7").unwrap();
        assert!(
            t.notes[0].starts_with(
                "dora overrides freeze window `weekend` until 2027-01-18T00:00:00Z (Mon 2027-01-18 00:00 UTC): security fix, CAB-7"
            ),
            "{:?}",
            t.notes
        );
        // The promotion that was due goes on at once.
        assert_eq!(h.state("pilot"), PhaseState::Promoted);
        assert!(h.rollout.freeze.is_none());
        let err = override_by(&mut h, "dora", "again").unwrap_err();
        assert!(err.to_string().contains("overridden already"), "{err}");
    }

    #[test]
    fn a_window_nobody_may_override_and_no_window_in_force_are_refused() {
        let mut h = frozen_harness("");
        let err = h
            .send(EventKind::FreezeOverridden, Trigger::user("dora", "x"))
            .unwrap_err();
        assert!(err.to_string().contains("cannot be overridden"), "{err}");
        h.now = monday();
        let err = h
            .send(EventKind::FreezeOverridden, Trigger::user("dora", "x"))
            .unwrap_err();
        assert!(err.to_string().contains("no freeze window holds"), "{err}");
    }
}
