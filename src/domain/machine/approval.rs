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
use std::collections::BTreeMap;

use crate::domain::desired::desired_state;
use crate::domain::directory::ApproverSnapshot;
use crate::domain::event::Effect;
use crate::domain::forecast::Forecast;
use crate::domain::gate::Tally;
use crate::domain::plan::{ApprovalPolicy, Phase, Plan, format_percent, hash_source, identity_key};
use crate::domain::rollout::{Approval, ApprovalEvidence, PhaseRecord, PhaseState, Rollout};
use crate::domain::time::{Timestamp, format_span};

impl Machine<'_> {
    pub(super) fn approve(
        &mut self,
        phase: &str,
        ticket: &Option<String>,
        comment: &Option<String>,
        shown: Option<&str>,
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
        let via_directory = if policy.allows(&approver) {
            None
        } else {
            Some(
                directory_member(policy, &self.next.approver_directory, &approver, self.now)
                    .map_err(|why| {
                        Rejection::Invalid(format!(
                            "{approver} may not approve phase `{phase}`; its approvers are: {}{why}",
                            policy.who()
                        ))
                    })?,
            )
        };
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
        if let Some(shown) = shown {
            pinned_evidence(&self.next.plan_hash, phase, record, shown, now)
                .map_err(Rejection::Invalid)?;
        }
        let ticket = policy
            .ticket(ticket.as_deref())
            .map_err(Rejection::Invalid)?;
        let expires_at = policy.expires_after.map(|after| now.plus(after));
        let evidence = record.observation.as_ref().map(|seen| ApprovalEvidence {
            observed_at: seen.at,
            tally: seen.tally,
            digest: evidence_digest(&self.next.plan_hash, phase, &seen.tally, &seen.forecasts),
            forecasts: seen.forecasts.clone(),
        });
        let approval = Approval {
            by: approver.clone(),
            at: now,
            ticket: ticket.clone(),
            comment: comment.clone(),
            plan_hash: self.next.plan_hash.clone(),
            expires_at,
            evidence,
        };
        let record = self.record(idx);
        record.approval_note = None;
        record.approvals.retain(|a| a.by != approver);
        record.approvals.push(approval);
        let have = record.approvals.len();
        let ticket = ticket.map(|t| format!(", ticket {t}")).unwrap_or_default();
        let until = expires_at
            .map(|at| format!(", valid until {at}"))
            .unwrap_or_default();
        let member = via_directory
            .map(|group| format!(", a member of {group}"))
            .unwrap_or_default();
        self.notes.push(format!(
            "{approver} approved `{phase}` ({have} of {needed}{ticket}{until}{member})"
        ));
        Ok(())
    }

    /// Takes the directory's latest word on the plan's directory approver groups.
    pub(super) fn approvers_read(&mut self, groups: &BTreeMap<String, ApproverSnapshot>) {
        let follows = self
            .next
            .phases
            .iter()
            .filter_map(|p| p.observation.as_ref().map(|o| o.at))
            .max();
        for (name, snapshot) in groups {
            if !self.plan.directory_approvers.contains_key(name) {
                continue;
            }
            let said = match &snapshot.error {
                Some(error) => format!("could not be read: {error}"),
                None => format!("{} identities", snapshot.members.len()),
            };
            self.notes.push(format!(
                "approver group `{name}` ({}) from {}: {said}",
                snapshot.directory, snapshot.source
            ));
            let mut snapshot = snapshot.clone();
            snapshot.follows = follows;
            self.next.approver_directory.insert(name.clone(), snapshot);
        }
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
                let note = format!(
                    "approval of `{}` by {} expired (given {}{ticket}, valid for {lasted}); it no longer counts",
                    phase.id, approval.by, approval.at
                );
                record.approval_note = Some(format!("{}'s approval expired", approval.by));
                self.notes.push(note);
            }
        }
    }
}

impl Machine<'_> {
    /// A promotion committed before a pause whose configuration is not applied yet is decided
    /// again if its approvals no longer make the quorum: the phase waits for approval again and
    /// the phases it started go back to pending, before anything of them is written.
    pub(super) fn recheck_unapplied_promotions(&mut self) {
        let now = self.now;
        let mut taken_back = false;
        for idx in 0..self.plan.phases.len() {
            let phase = &self.plan.phases[idx];
            let record = &self.next.phases[idx];
            let valid = record
                .approvals
                .iter()
                .filter(|a| a.is_valid_at(now))
                .count();
            if !record.promotion_unapplied
                || record.state != PhaseState::Promoted
                || valid >= phase.gate.approvals as usize
            {
                continue;
            }
            let started: Vec<usize> = (0..self.plan.phases.len())
                .filter(|&s| {
                    let next = &self.next.phases[s];
                    self.plan.phases[s].after.contains(&idx)
                        && next.state == PhaseState::Applying
                        && next.applied_at.is_none()
                })
                .collect();
            if started.is_empty() {
                continue;
            }
            let names: Vec<String> = started
                .iter()
                .map(|&s| self.plan.phases[s].id.clone())
                .collect();
            for &s in &started {
                let next = &mut self.next.phases[s];
                next.state = PhaseState::Pending;
                next.reset_gate();
            }
            let record = &mut self.next.phases[idx];
            record.state = PhaseState::AwaitingApproval;
            record.promoted_at = None;
            record.promotion_unapplied = false;
            self.notes.push(format!(
                "the promotion of `{}` is decided again: its approvals no longer make the quorum of {} and nothing of `{}` is applied yet",
                phase.id,
                phase.gate.approvals,
                names.join("`, `")
            ));
            taken_back = true;
        }
        if taken_back {
            let desired = desired_state(self.plan, &self.next);
            self.request(Effect::Reconcile {
                desired,
                resolution: None,
                during_pause: false,
            });
        }
    }
}

/// Voids the approvals of `record` whose evidence moved past the phase's tolerance by `now`'s
/// observation `tally`, each with a note saying why; nothing without a tolerance.
pub(super) fn void_moved_evidence(
    phase: &Phase,
    record: &mut PhaseRecord,
    tally: &Tally,
    notes: &mut Vec<String>,
) {
    let Some(tolerance) = phase.approval.evidence_tolerance else {
        return;
    };
    let (kept, void): (Vec<Approval>, Vec<Approval>) = std::mem::take(&mut record.approvals)
        .into_iter()
        .partition(|a| {
            a.evidence.as_ref().is_some_and(|e| {
                moved(&e.tally, tally).is_none_or(|(_, by)| by <= tolerance.fraction())
            })
        });
    record.approvals = kept;
    for approval in void {
        let why = match approval
            .evidence
            .as_ref()
            .and_then(|e| moved(&e.tally, tally))
        {
            Some((what, _)) => format!(
                "the evidence moved past the plan's tolerance of {tolerance} since it was given: {what}"
            ),
            None => "it was given before any observation of the phase".to_string(),
        };
        let ticket = approval
            .ticket
            .as_ref()
            .map(|t| format!(", ticket {t}"))
            .unwrap_or_default();
        notes.push(format!(
            "approval of `{}` by {} void (given {}{ticket}): {why}; approve again on the evidence now",
            phase.id, approval.by, approval.at
        ));
        record.approval_note = Some(format!("{}'s approval is void: {why}", approval.by));
    }
}

/// One share of a phase's devices (failing, reporting, ...).
type Share = fn(&Tally) -> Option<f64>;

/// The share that moved most between two observations, in words, and by how much (a fraction).
pub(super) fn moved(then: &Tally, now: &Tally) -> Option<(String, f64)> {
    let shares: [(&str, Share); 4] = [
        ("failing", Tally::noncompliant_ratio),
        ("reporting", Tally::coverage),
        ("blocked", Tally::blocked_ratio),
        ("in error", Tally::error_ratio),
    ];
    shares
        .into_iter()
        .map(|(name, share)| {
            let (a, b) = (share(then).unwrap_or(0.0), share(now).unwrap_or(0.0));
            (
                format!("{name} {} → {}", format_percent(a), format_percent(b)),
                (a - b).abs(),
            )
        })
        .max_by(|x, y| x.1.total_cmp(&y.1))
}

/// What binds an approval to what it was given on: the plan, the phase, the counts and the
/// impact forecast shown (an observation without a forecast digests as before forecasts).
pub fn evidence_digest(
    plan_hash: &str,
    phase: &str,
    tally: &Tally,
    forecasts: &[Forecast],
) -> String {
    let counts = serde_json::to_string(tally).unwrap_or_default();
    let mut shown = format!("{plan_hash}\n{phase}\n{counts}");
    if !forecasts.is_empty() {
        shown.push('\n');
        shown.push_str(&serde_json::to_string(forecasts).unwrap_or_default());
    }
    hash_source(&shown)
}

/// An approval given on the digest `shown` holds only if the phase's evidence is still what
/// produced it: the same plan, phase, counts and forecast. Otherwise the evidence moved between
/// showing and confirming, and the person must look again.
fn pinned_evidence(
    plan_hash: &str,
    phase: &str,
    record: &PhaseRecord,
    shown: &str,
    now: Timestamp,
) -> Result<(), String> {
    let shown = shown.trim().to_ascii_lowercase();
    let Some(seen) = record.observation.as_ref() else {
        return Err(format!(
            "the approval names digest {shown}, but phase `{phase}` has no evidence yet; nothing was recorded"
        ));
    };
    let current = evidence_digest(plan_hash, phase, &seen.tally, &seen.forecasts);
    if shown == current {
        return Ok(());
    }
    Err(format!(
        "the evidence of `{phase}` moved since it was shown: the approval names digest {shown}, the phase's is now {current} (observed {} ago, at {}); look again (`phasegate approvals`) and approve what it shows",
        format_span(now.since(seen.at)),
        seen.at
    ))
}

/// The directory approver groups whose snapshot is due: named by a phase that is soaking or
/// waiting for approval and needs approvals, and not read yet or read before that phase's latest
/// observation (so it is refreshed as often as the phase is observed, and once more when the
/// phase starts waiting). Empty when nothing is due.
pub fn approvers_due(plan: &Plan, rollout: &Rollout) -> Vec<String> {
    let mut due = Vec::new();
    for (phase, record) in plan.phases.iter().zip(&rollout.phases) {
        if !is_watched(record.state) || phase.gate.approvals == 0 {
            continue;
        }
        let observed = record.observation.as_ref().map(|o| o.at);
        for group in &phase.approval.directory_groups {
            let stale = match rollout.approver_directory.get(group) {
                None => true,
                Some(snapshot) => {
                    let seen = snapshot.follows.unwrap_or(snapshot.read_at);
                    observed.is_some_and(|at| seen < at)
                }
            };
            if stale && !due.contains(group) {
                due.push(group.clone());
            }
        }
    }
    due
}

/// The directory approver group of `policy` that has `approver` in the rollout's latest
/// snapshot, in words with where and when it was read; or, as the end of a refusal, what each
/// of its groups' snapshots says (not read yet, unreadable, empty, or without this person).
pub fn directory_member(
    policy: &ApprovalPolicy,
    snapshots: &BTreeMap<String, ApproverSnapshot>,
    approver: &str,
    now: Timestamp,
) -> Result<String, String> {
    let mut why = String::new();
    for group in &policy.directory_groups {
        match snapshots.get(group) {
            Some(snapshot) if snapshot.has(approver) => {
                return Ok(format!("group {group}, {}", snapshot.provenance(now)));
            }
            Some(snapshot) => {
                let said = match &snapshot.error {
                    Some(error) => format!("could not be read ({error}), so none of its members may approve until it is"),
                    None if snapshot.members.is_empty() => "has no members".to_string(),
                    None => format!("{approver} is not among its members"),
                };
                why.push_str(&format!(
                    "; directory group {group}, {}: {said}",
                    snapshot.provenance(now)
                ));
            }
            None => why.push_str(&format!(
                "; directory group {group}: its members have not been read from the directory yet (they are read when the phase is observed and when it waits for approval)"
            )),
        }
    }
    Err(why)
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
