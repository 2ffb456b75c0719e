//! Approvals in the machine: who may give one, which still count, and when they lapse.
//!
//! An approval is accepted while its phase runs (soaking, or waiting after its gate passed) from
//! someone the phase's policy names (anyone, when it names nobody), never from the person who
//! started the rollout, asked for this run of the phase, or wrote the plan while separation of
//! duties is on, and with the ticket the policy asks for. It counts towards the quorum only while
//! it has not expired: before every decision, expired approvals are taken out, each with a note
//! in the audit trail, so an approval that lapsed before the gate passed — or while the rollout
//! was paused — never promotes.

use super::{Machine, Rejection, is_watched, list_or_none};
use crate::domain::plan::{Plan, identity_key};
use crate::domain::rollout::{Approval, PhaseRecord, Rollout};
use crate::domain::time::{Timestamp, format_span};

impl Machine<'_> {
    pub(super) fn approve(
        &mut self,
        phase: &str,
        ticket: &Option<String>,
        comment: &Option<String>,
    ) -> Result<(), Rejection> {
        use crate::domain::rollout::RolloutStatus::*;
        if !matches!(
            self.next.status,
            Running | WaitingApproval | Held | Paused | Drifted | WaitingTenantApproval
        ) {
            return Err(self.not_now("approve"));
        }
        let idx = self.phase_index(phase)?;
        let plan_phase = &self.plan.phases[idx];
        let needed = plan_phase.gate.approvals;
        let policy = &plan_phase.approval;
        let approver = identity_key(&self.trigger.actor);
        let record = &self.next.phases[idx];
        if !is_watched(record.state) {
            return Err(Rejection::Invalid(format!(
                "phase `{phase}` is {}; only a running phase can be approved (running: {})",
                record.state,
                list_or_none(&self.next.current_phases())
            )));
        }
        if needed == 0 {
            return Err(Rejection::Invalid(format!(
                "phase `{phase}` needs no approval"
            )));
        }
        if !policy.allows(&approver) {
            return Err(Rejection::Invalid(format!(
                "{approver} may not approve phase `{phase}`; its approvers are: {}",
                policy.who()
            )));
        }
        if let Some(role) = conflict_of_duties(self.plan, &self.next, record, &approver) {
            return Err(Rejection::Invalid(format!(
                "separation of duties: {approver} {role} and cannot approve `{phase}`; someone else must"
            )));
        }
        let now = self.now;
        if record
            .approvals
            .iter()
            .any(|a| a.by == approver && a.is_valid_at(now))
        {
            return Err(Rejection::Invalid(format!(
                "{approver} has already approved phase `{phase}`"
            )));
        }
        let ticket = policy
            .ticket(ticket.as_deref())
            .map_err(Rejection::Invalid)?;
        let expires_at = policy.expires_after.map(|after| now.plus(after));
        let approval = Approval {
            by: approver.clone(),
            at: now,
            ticket: ticket.clone(),
            comment: comment.clone(),
            plan_hash: self.next.plan_hash.clone(),
            expires_at,
        };
        let record = self.record(idx);
        record.approvals.retain(|a| a.by != approver);
        record.approvals.push(approval);
        let have = record.approvals.len();
        let ticket = ticket.map(|t| format!(", ticket {t}")).unwrap_or_default();
        let until = expires_at
            .map(|at| format!(", valid until {at}"))
            .unwrap_or_default();
        self.notes.push(format!(
            "{approver} approved `{phase}` ({have} of {needed}{ticket}{until})"
        ));
        Ok(())
    }

    /// Takes out every approval of a running phase that has expired by now, saying so.
    pub(super) fn lapse_approvals(&mut self) {
        let now = self.now;
        for (phase, record) in self.plan.phases.iter().zip(&mut self.next.phases) {
            if !is_watched(record.state) {
                continue;
            }
            let (valid, expired): (Vec<Approval>, Vec<Approval>) =
                std::mem::take(&mut record.approvals)
                    .into_iter()
                    .partition(|a| a.is_valid_at(now));
            record.approvals = valid;
            for approval in expired {
                let lasted = approval
                    .expires_at
                    .map(|at| format_span(at.since(approval.at)))
                    .unwrap_or_default();
                let ticket = approval
                    .ticket
                    .as_ref()
                    .map(|t| format!(", ticket {t}"))
                    .unwrap_or_default();
                self.notes.push(format!(
                    "approval of `{}` by {} expired (given {}{ticket}, valid for {lasted}); it no longer counts",
                    phase.id, approval.by, approval.at
                ));
            }
        }
    }
}

/// Why separation of duties keeps `approver` (a key) from approving `record`'s promotion, as
/// the rest of a sentence; `None` if it does not (or the plan turned it off).
pub fn conflict_of_duties(
    plan: &Plan,
    rollout: &Rollout,
    record: &PhaseRecord,
    approver: &str,
) -> Option<&'static str> {
    if !plan.separation_of_duties {
        return None;
    }
    if identity_key(&rollout.created_by) == approver {
        Some("started this rollout")
    } else if record.requested_by.iter().any(|r| r == approver) {
        Some("asked for this promotion")
    } else if plan.author.as_deref() == Some(approver) {
        Some("wrote the plan")
    } else {
        None
    }
}

/// The earliest moment an approval of a running phase lapses, for the agenda.
pub(super) fn next_expiry(rollout: &Rollout) -> Option<Timestamp> {
    rollout
        .phases
        .iter()
        .filter(|r| is_watched(r.state))
        .flat_map(|r| r.approvals.iter().filter_map(|a| a.expires_at))
        .min()
}
