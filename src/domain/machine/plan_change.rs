//! A plan change is itself a change. A person applies a plan to a running rollout (`plan apply`);
//! the shell compares it with the plan in force ([`crate::domain::plan::change::weakenings`]):
//!
//! - one that weakens nothing is adopted at once (`PlanChanged`, handed the new plan), recorded
//!   with who applied it and both plans' hashes;
//! - one that weakens anything is recorded as waiting (`PlanChangeProposed`, handed the plan in
//!   force) and is adopted only once approved under the rules in force before it: the approval
//!   policy and quorum (at least one) of the rollout's current phase, never by the person who
//!   applied it, nor — with separation of duties — by whoever started the rollout or wrote the
//!   plan;
//! - a plan file edited behind phasegate's back is recorded as such (`PlanFileChanged`) and never
//!   adopted.
//!
//! Adopting a plan voids the approvals given for the old one (`plan_changed`), each with a note.

use super::{Machine, Rejection, short_hash};
use crate::domain::event::TriggerSource;
use crate::domain::plan::{Plan, identity_key};
use crate::domain::rollout::{
    Approval, PhaseState, PlanChange, PlanFileChange, Rollout, RolloutStatus,
};

/// The phase whose approval rules decide a plan change: the first (in run order) the rollout is
/// in, else the first not promoted yet, else the first.
pub fn plan_change_rules(plan: &Plan, rollout: &Rollout) -> usize {
    let order = || plan.order.iter().copied();
    order()
        .find(|&i| rollout.phases[i].state.is_current())
        .or_else(|| order().find(|&i| rollout.phases[i].state != PhaseState::Promoted))
        .unwrap_or(0)
}

/// The hash of the plan change waiting on `rollout`: the one `given` names (a hash, or the
/// start of one, at least 8 digits), or else the only one.
pub fn waiting_plan_change(rollout: &Rollout, given: Option<&str>) -> Result<String, Rejection> {
    let Some(change) = &rollout.plan_change else {
        return Err(Rejection::Invalid(format!(
            "no plan change of `{}` waits for approval",
            rollout.id
        )));
    };
    match given.map(str::trim) {
        None => Ok(change.plan_hash.clone()),
        Some(prefix) if prefix.len() >= 8 && change.plan_hash.starts_with(prefix) => {
            Ok(change.plan_hash.clone())
        }
        Some(other) => Err(Rejection::Invalid(format!(
            "the plan change waiting is to plan {}, not `{other}`: decide on what you were shown",
            short_hash(&change.plan_hash)
        ))),
    }
}

/// How many distinct people must approve a plan change under the rules of `phase`.
fn quorum(plan: &Plan, phase: usize) -> usize {
    (plan.phases[phase].gate.approvals as usize).max(1)
}

fn finished(status: RolloutStatus) -> bool {
    matches!(
        status,
        RolloutStatus::Aborting | RolloutStatus::Aborted | RolloutStatus::Completed
    )
}

impl Machine<'_> {
    pub(super) fn propose_plan(
        &mut self,
        plan_hash: &str,
        weakens: &[String],
    ) -> Result<(), Rejection> {
        if finished(self.next.status) {
            return Err(self.not_now("change the plan"));
        }
        let Some(by) = self.requester() else {
            return Err(Rejection::Invalid(
                "only a person applies a plan change".into(),
            ));
        };
        if plan_hash == self.next.plan_hash {
            return Err(Rejection::Invalid(
                "the rollout already runs this plan".into(),
            ));
        }
        if weakens.is_empty() {
            return Err(Rejection::Invalid(
                "a plan change that weakens nothing is adopted at once, not proposed".into(),
            ));
        }
        if let Some(earlier) = self.next.plan_change.take() {
            self.notes.push(format!(
                "the plan change to {} applied by {} is replaced before it was approved",
                short_hash(&earlier.plan_hash),
                earlier.by
            ));
        }
        if self
            .next
            .plan_file
            .as_ref()
            .is_some_and(|f| f.plan_hash == plan_hash)
        {
            self.next.plan_file = None;
        }
        let rules = plan_change_rules(self.plan, &self.next);
        let phase = &self.plan.phases[rules];
        let needed = quorum(self.plan, rules);
        self.notes.push(format!(
            "{by} applied plan {} in place of {}; it weakens the rollout ({}), so it takes effect only once {needed} approver{} under the rules of `{}` ({}) approve it; {by} may not",
            short_hash(plan_hash),
            short_hash(&self.next.plan_hash),
            weakens.join("; "),
            if needed == 1 { "" } else { "s" },
            phase.id,
            phase.approval.who()
        ));
        self.next.plan_change = Some(PlanChange {
            plan_hash: plan_hash.to_string(),
            from_hash: self.next.plan_hash.clone(),
            by,
            at: self.now,
            weakens: weakens.to_vec(),
            approvals: Vec::new(),
            approved: false,
        });
        Ok(())
    }

    /// The change waiting, if it is the one named; why not otherwise.
    fn waiting_change(&self, plan_hash: &str) -> Result<&PlanChange, Rejection> {
        let Some(change) = &self.next.plan_change else {
            return Err(Rejection::Invalid(format!(
                "no plan change of `{}` waits for approval",
                self.next.id
            )));
        };
        if change.plan_hash != plan_hash {
            return Err(Rejection::Invalid(format!(
                "the plan change waiting is to plan {}, not {}: decide on what you were shown",
                short_hash(&change.plan_hash),
                short_hash(plan_hash)
            )));
        }
        Ok(change)
    }

    pub(super) fn approve_plan_change(
        &mut self,
        plan_hash: &str,
        ticket: &Option<String>,
        comment: &Option<String>,
    ) -> Result<(), Rejection> {
        if finished(self.next.status) {
            return Err(self.not_now("approve a plan change"));
        }
        let now = self.now;
        let change = self.waiting_change(plan_hash)?;
        if change.approved {
            return Err(Rejection::Invalid(
                "the plan change is approved already".into(),
            ));
        }
        let approver = identity_key(&self.trigger.actor);
        let rules = plan_change_rules(self.plan, &self.next);
        let phase = &self.plan.phases[rules];
        let policy = &phase.approval;
        if !policy.allows(&approver) {
            return Err(Rejection::Invalid(format!(
                "{approver} may not approve this plan change: under the rules of `{}` its approvers are: {}",
                phase.id,
                policy.who()
            )));
        }
        if approver == change.by {
            return Err(Rejection::Invalid(format!(
                "separation of duties: {approver} applied this plan change and cannot approve it; someone else must"
            )));
        }
        if self.plan.separation_of_duties {
            let role = if identity_key(&self.next.created_by) == approver {
                Some("started this rollout")
            } else if self.plan.author.as_deref() == Some(approver.as_str()) {
                Some("wrote the plan")
            } else {
                None
            };
            if let Some(role) = role {
                return Err(Rejection::Invalid(format!(
                    "separation of duties: {approver} {role} and cannot approve its plan change; someone else must"
                )));
            }
        }
        if change
            .approvals
            .iter()
            .any(|a| a.by == approver && a.is_valid_at(now))
        {
            return Err(Rejection::Invalid(format!(
                "{approver} has already approved this plan change"
            )));
        }
        let ticket = policy
            .ticket(ticket.as_deref())
            .map_err(Rejection::Invalid)?;
        let expires_at = policy.expires_after.map(|after| now.plus(after));
        let needed = quorum(self.plan, rules);
        let change = self.next.plan_change.as_mut().expect("checked above");
        change
            .approvals
            .retain(|a| a.by != approver && a.is_valid_at(now));
        change.approvals.push(Approval {
            by: approver.clone(),
            at: now,
            ticket: ticket.clone(),
            comment: comment.clone(),
            plan_hash: plan_hash.to_string(),
            expires_at,
            evidence: None,
        });
        let have = change.approvals.len();
        let ticket = ticket.map(|t| format!(", ticket {t}")).unwrap_or_default();
        self.notes.push(format!(
            "{approver} approved the plan change to {} applied by {} ({have} of {needed}{ticket})",
            short_hash(plan_hash),
            change.by
        ));
        if have >= needed {
            change.approved = true;
            let names: Vec<&str> = change.approvals.iter().map(|a| a.by.as_str()).collect();
            self.notes.push(format!(
                "the plan change to {} is approved by {}; it is adopted next",
                short_hash(plan_hash),
                names.join(", ")
            ));
        }
        Ok(())
    }

    pub(super) fn reject_plan_change(&mut self, plan_hash: &str) -> Result<(), Rejection> {
        let change = self.waiting_change(plan_hash)?;
        let who = identity_key(&self.trigger.actor);
        let rules = plan_change_rules(self.plan, &self.next);
        let policy = &self.plan.phases[rules].approval;
        if who != change.by && !policy.allows(&who) {
            return Err(Rejection::Invalid(format!(
                "{who} may not turn down this plan change: its approvers are {}, or {} who applied it",
                policy.who(),
                change.by
            )));
        }
        let verb = if who == change.by {
            "withdrawn"
        } else {
            "turned down"
        };
        self.notes.push(format!(
            "the plan change to {} applied by {} is {verb} by {}; the plan in force ({}) stays",
            short_hash(plan_hash),
            change.by,
            self.by(),
            short_hash(&self.next.plan_hash)
        ));
        self.next.plan_change = None;
        Ok(())
    }

    /// Before a plan is adopted: a person applied it (weakening nothing), or it is the change
    /// that was approved. Says so in the audit trail, with both plans' hashes.
    pub(super) fn plan_change_adopted(&mut self, plan_hash: &str) -> Result<(), Rejection> {
        let from = short_hash(&self.next.plan_hash).to_string();
        let to = short_hash(plan_hash);
        match (self.trigger.source, self.next.plan_change.take()) {
            (TriggerSource::User, waiting) => {
                let by = identity_key(&self.trigger.actor);
                if let Some(waiting) = waiting {
                    self.notes.push(format!(
                        "the plan change to {} applied by {} is withdrawn: {by} applied another plan",
                        short_hash(&waiting.plan_hash),
                        waiting.by
                    ));
                }
                self.notes.push(format!(
                    "plan {from} → {to}, applied by {by}; it weakens nothing"
                ));
            }
            (_, Some(change)) if change.plan_hash == plan_hash && change.approved => {
                let names: Vec<&str> = change.approvals.iter().map(|a| a.by.as_str()).collect();
                self.notes.push(format!(
                    "plan {from} → {to}, applied by {} and approved by {} ({})",
                    change.by,
                    names.join(", "),
                    change.weakens.join("; ")
                ));
            }
            _ => {
                return Err(Rejection::Invalid(
                    "a plan is adopted only when a person applies it (`phasegate plan apply`) or once the change waiting is approved"
                        .into(),
                ));
            }
        }
        if self
            .next
            .plan_file
            .as_ref()
            .is_some_and(|f| f.plan_hash == plan_hash)
        {
            self.next.plan_file = None;
        }
        Ok(())
    }

    pub(super) fn plan_file_changed(
        &mut self,
        plan_hash: &str,
        path: &str,
    ) -> Result<(), Rejection> {
        if matches!(
            self.next.status,
            RolloutStatus::Aborted | RolloutStatus::Completed
        ) {
            return Err(self.not_now("note a plan file change"));
        }
        if plan_hash == self.next.plan_hash {
            if self.next.plan_file.take().is_some() {
                self.notes.push(format!(
                    "the plan file {path} holds the plan the rollout runs again"
                ));
            }
            return Ok(());
        }
        if self
            .next
            .plan_file
            .as_ref()
            .is_some_and(|f| f.plan_hash == plan_hash)
        {
            return Ok(());
        }
        let applied = self
            .next
            .plan_change
            .as_ref()
            .is_some_and(|c| c.plan_hash == plan_hash);
        if applied {
            return Ok(()); // the change waiting for approval: applied by a person already
        }
        self.notes.push(format!(
            "warning: the plan file {path} was changed outside phasegate: it holds plan {}, not plan {} the rollout runs; it is not adopted (apply it with `phasegate plan apply {} {path} --by NAME`)",
            short_hash(plan_hash),
            short_hash(&self.next.plan_hash),
            self.next.id
        ));
        self.next.plan_file = Some(PlanFileChange {
            plan_hash: plan_hash.to_string(),
            path: path.to_string(),
            seen_at: self.now,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Harness, PLAN, healthy, waiting_for_approval};
    use super::*;
    use crate::domain::event::{EventKind, Trigger};
    use crate::domain::plan::{self, change::weakenings};

    fn weaker(h: &Harness) -> (Plan, Vec<String>) {
        let weaker =
            plan::parse("test.toml", &PLAN.replace("approvals = 1", "approvals = 0")).unwrap();
        let weakens = weakenings(&h.plan, &weaker);
        (weaker, weakens)
    }

    fn approve(h: &mut Harness, hash: &str, who: &str) -> Result<Vec<String>, Rejection> {
        let kind = EventKind::PlanChangeApproved {
            plan_hash: hash.to_string(),
            ticket: None,
            comment: None,
        };
        h.user(kind, who).map(|t| t.notes)
    }

    fn adopt(h: &mut Harness, plan: &Plan) -> Result<Vec<String>, Rejection> {
        let old = std::mem::replace(&mut h.plan, plan.clone());
        let kind = EventKind::PlanChanged {
            plan_hash: plan.hash.clone(),
        };
        let result = h.send(
            kind,
            Trigger::new(TriggerSource::Internal, "run", "approved"),
        );
        if result.is_err() {
            h.plan = old;
        }
        result.map(|t| t.notes)
    }

    #[test]
    fn lowering_approvals_waits_for_approval_under_the_rules_in_force() {
        let mut h = waiting_for_approval(PLAN);
        let original = h.plan.hash.clone();
        let (weaker, weakens) = weaker(&h);
        assert_eq!(weakens, vec!["`notify`: approvals 1 → 0".to_string()]);
        let t = h
            .user(
                EventKind::PlanChangeProposed {
                    plan_hash: weaker.hash.clone(),
                    weakens,
                },
                "Carol",
            )
            .unwrap();
        assert!(
            t.notes[0].starts_with("carol applied plan")
                && t.notes[0].contains("`notify`: approvals 1 → 0")
                && t.notes[0].contains("once 1 approver under the rules of `notify`"),
            "{:?}",
            t.notes
        );
        // Nothing is promoted: the plan in force still asks for an approval.
        assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
        assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
        assert_eq!(h.rollout.plan_hash, h.plan.hash);
        // It cannot be adopted before it is approved.
        let err = adopt(&mut h, &weaker).unwrap_err();
        assert!(err.to_string().contains("adopted only when"), "{err}");
        // Whoever applied it, and whoever started the rollout, may not approve it.
        let err = approve(&mut h, &weaker.hash, " CAROL ").unwrap_err();
        assert!(
            err.to_string()
                .contains("separation of duties: carol applied this plan change"),
            "{err}"
        );
        let err = approve(&mut h, &weaker.hash, "alice").unwrap_err();
        assert!(
            err.to_string().contains("alice started this rollout"),
            "{err}"
        );
        // An approval names what it saw: another plan's hash is refused.
        let running = h.plan.hash.clone();
        let err = approve(&mut h, &running, "dave").unwrap_err();
        assert!(
            err.to_string().contains("decide on what you were shown"),
            "{err}"
        );
        let notes = approve(&mut h, &weaker.hash, "dave").unwrap();
        assert!(
            notes.iter().any(|n| n.contains("is approved by dave")),
            "{notes:?}"
        );
        assert!(h.rollout.plan_change.as_ref().unwrap().approved);
        let notes = adopt(&mut h, &weaker).unwrap();
        let from = short_hash(&original);
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(&format!("plan {from} → "))
                    && n.contains("applied by carol and approved by dave")),
            "{notes:?}"
        );
        assert!(h.rollout.plan_change.is_none());
        assert_eq!(h.rollout.plan_hash, weaker.hash);
    }

    #[test]
    fn the_rules_in_force_decide_who_and_how_many() {
        let text = PLAN.replace(
            "approvals = 1",
            "approvals = 2\napprovers = [\"bob\", \"dave\", \"erin\"]",
        );
        let mut h = waiting_for_approval(&text);
        let weaker =
            plan::parse("test.toml", &text.replace("approvals = 2", "approvals = 1")).unwrap();
        let weakens = weakenings(&h.plan, &weaker);
        h.user(
            EventKind::PlanChangeProposed {
                plan_hash: weaker.hash.clone(),
                weakens,
            },
            "carol",
        )
        .unwrap();
        let err = approve(&mut h, &weaker.hash, "frank").unwrap_err();
        assert!(err.to_string().contains("frank may not approve"), "{err}");
        approve(&mut h, &weaker.hash, "bob").unwrap();
        assert!(!h.rollout.plan_change.as_ref().unwrap().approved);
        let err = approve(&mut h, &weaker.hash, "Bob").unwrap_err();
        assert!(err.to_string().contains("already approved"), "{err}");
        approve(&mut h, &weaker.hash, "dave").unwrap();
        assert!(h.rollout.plan_change.as_ref().unwrap().approved);
        let err = approve(&mut h, &weaker.hash, "erin").unwrap_err();
        assert!(err.to_string().contains("approved already"), "{err}");
    }

    #[test]
    fn a_plan_change_is_turned_down_or_withdrawn_and_the_plan_in_force_stays() {
        let mut h = waiting_for_approval(PLAN);
        let (weaker, weakens) = weaker(&h);
        let propose = EventKind::PlanChangeProposed {
            plan_hash: weaker.hash.clone(),
            weakens,
        };
        h.user(propose.clone(), "carol").unwrap();
        let t = h
            .user(
                EventKind::PlanChangeRejected {
                    plan_hash: weaker.hash.clone(),
                },
                "dave",
            )
            .unwrap();
        assert!(
            t.notes[0].contains("is turned down by dave"),
            "{:?}",
            t.notes
        );
        assert!(h.rollout.plan_change.is_none());
        h.user(propose, "carol").unwrap();
        let t = h
            .user(
                EventKind::PlanChangeRejected {
                    plan_hash: weaker.hash.clone(),
                },
                "carol",
            )
            .unwrap();
        assert!(
            t.notes[0].contains("is withdrawn by carol"),
            "{:?}",
            t.notes
        );
        let err = h
            .user(
                EventKind::PlanChangeRejected {
                    plan_hash: weaker.hash.clone(),
                },
                "dave",
            )
            .unwrap_err();
        assert!(err.to_string().contains("no plan change"), "{err}");
    }

    #[test]
    fn a_plan_that_weakens_nothing_applied_by_a_person_replaces_a_waiting_change() {
        let mut h = waiting_for_approval(PLAN);
        let (weaker, weakens) = weaker(&h);
        h.user(
            EventKind::PlanChangeProposed {
                plan_hash: weaker.hash.clone(),
                weakens: weakens.clone(),
            },
            "carol",
        )
        .unwrap();
        // Proposing nothing, the same plan, or as automation is refused.
        for (kind, who) in [
            (
                EventKind::PlanChangeProposed {
                    plan_hash: weaker.hash.clone(),
                    weakens: Vec::new(),
                },
                "carol",
            ),
            (
                EventKind::PlanChangeProposed {
                    plan_hash: h.plan.hash.clone(),
                    weakens: weakens.clone(),
                },
                "carol",
            ),
        ] {
            assert!(h.user(kind, who).is_err());
        }
        let stricter = plan::parse(
            "test.toml",
            &PLAN.replace(
                "max_noncompliant_ratio = \"2%\"",
                "max_noncompliant_ratio = \"1%\"",
            ),
        )
        .unwrap();
        assert!(weakenings(&h.plan, &stricter).is_empty());
        h.plan = stricter.clone();
        let t = h
            .user(
                EventKind::PlanChanged {
                    plan_hash: stricter.hash.clone(),
                },
                "erin",
            )
            .unwrap();
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("is withdrawn: erin applied another plan")),
            "{:?}",
            t.notes
        );
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("applied by erin; it weakens nothing")),
            "{:?}",
            t.notes
        );
        assert!(h.rollout.plan_change.is_none());
        assert_eq!(h.rollout.plan_hash, stricter.hash);
        // The gate is judged again on the new plan before anything is promoted.
        assert_eq!(h.state("notify"), PhaseState::Applying);
    }

    #[test]
    fn a_plan_file_changed_outside_phasegate_is_recorded_once_and_not_adopted() {
        let mut h = waiting_for_approval(PLAN);
        let running = h.rollout.plan_hash.clone();
        let file = |hash: &str| EventKind::PlanFileChanged {
            plan_hash: hash.to_string(),
            path: "plans/p.toml".into(),
        };
        let run = || Trigger::new(TriggerSource::Internal, "run", "plans/p.toml changed");
        let t = h.send(file("ab".repeat(32).as_str()), run()).unwrap();
        assert!(
            t.notes[0]
                .starts_with("warning: the plan file plans/p.toml was changed outside phasegate"),
            "{:?}",
            t.notes
        );
        assert_eq!(h.rollout.plan_hash, running);
        assert_eq!(h.rollout.status, RolloutStatus::WaitingApproval);
        assert_eq!(
            h.rollout.plan_file.as_ref().unwrap().plan_hash,
            "ab".repeat(32)
        );
        // Seen again: nothing new.
        let before = h.rollout.clone();
        let t = h.send(file("ab".repeat(32).as_str()), run()).unwrap();
        assert!(t.notes.is_empty());
        assert_eq!(t.rollout.plan_file, before.plan_file);
        // Put back: the warning goes.
        let t = h.send(file(&running), run()).unwrap();
        assert!(t.notes[0].contains("holds the plan the rollout runs again"));
        assert!(h.rollout.plan_file.is_none());
        h.observe(healthy());
    }

    #[test]
    fn the_waiting_change_is_named_by_its_hash_or_a_prefix_of_eight_digits() {
        let mut h = waiting_for_approval(PLAN);
        assert!(waiting_plan_change(&h.rollout, None).is_err());
        let (weaker, weakens) = weaker(&h);
        h.user(
            EventKind::PlanChangeProposed {
                plan_hash: weaker.hash.clone(),
                weakens,
            },
            "carol",
        )
        .unwrap();
        assert_eq!(waiting_plan_change(&h.rollout, None).unwrap(), weaker.hash);
        assert_eq!(
            waiting_plan_change(&h.rollout, Some(&weaker.hash[..8])).unwrap(),
            weaker.hash
        );
        assert!(waiting_plan_change(&h.rollout, Some(&weaker.hash[..7])).is_err());
        assert!(waiting_plan_change(&h.rollout, Some("00000000")).is_err());
    }
}
