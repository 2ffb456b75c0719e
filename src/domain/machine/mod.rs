//! The rollout state machine: `(plan, rollout, event, now) -> (rollout', effects)`.
//!
//! [`step`] is the only way a rollout changes. It is pure: no I/O, no clock, no randomness. The
//! shell commits the returned rollout together with the event in one durable transaction, and only
//! then carries out the effects (see `engine`). [`agenda`] tells the shell when the machine next
//! wants to hear from it: which phases to observe now, and when to wake up.
//!
//! The rules in brief (the full table is in `docs/state-machine.md`):
//! - a phase starts when everything in its `after` is promoted, and soaks once the provider
//!   confirms its configuration;
//! - after `min_soak`, the gate is judged on an observation taken after the soak ended: pass and
//!   enough approvals promote, pass without them waits for approval, anything else holds;
//! - `rollback_when` is checked on every observation of a running phase and rolls back on its own;
//! - rollback returns to an earlier phase's desired state without running gates; abort restores
//!   the configuration recorded before the first change;
//! - automation never leaves a status a person chose (paused, rolled back, rejected);
//! - approvals count only from people the phase's policy allows and separation of duties does
//!   not bar, and only until they expire or their evidence moves past the plan's tolerance
//!   (`approval.rs`).

use std::collections::BTreeSet;

use thiserror::Error;

use super::desired::desired_state;
use super::directory::Recipients;
use super::event::Message;
use super::event::{
    DriftChange, DriftResolution, Effect, EffectId, Event, EventKind, PendingEffect, TenantRequest,
    Trigger, TriggerSource,
};
use super::forecast::ImpactRecord;
use super::gate::{self, GateOutcome};
use super::plan::announce::{self, Facts};
use super::plan::{Moment, Plan, identity_key};
use super::rollout::{PhaseObservation, PhaseRecord, PhaseState, Rollout, RolloutStatus};
use super::signins;
use super::time::{Timestamp, format_span};

mod approval;
mod exception;
pub use exception::{MAX_EXCEPTIONS, exception_deadline, expired_exceptions, parse_until, subject};
mod forecast;
pub use approval::{approvers_due, conflict_of_duties, directory_member, evidence_digest};
mod freeze;
mod plan_change;
pub use plan_change::{plan_change_rules, waiting_plan_change};

/// The result of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub rollout: Rollout,
    /// Effects this step asked for (also appended to `rollout.pending`).
    pub effects: Vec<PendingEffect>,
    /// The decisions taken, in words, for the audit trail.
    pub notes: Vec<String>,
    /// The impact forecasts promotions were decided on, and forecasts checked on the outcome.
    pub impact: Vec<ImpactRecord>,
}

/// Why an event cannot be applied to a rollout in its current state. Nothing changes.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error("rollout `{id}` is {status}; cannot {action} now")]
    NotNow {
        id: String,
        status: RolloutStatus,
        action: &'static str,
    },
    #[error("unknown phase `{0}`")]
    UnknownPhase(String),
    #[error("{0}")]
    Invalid(String),
}

/// Applies one event.
pub fn step(
    plan: &Plan,
    rollout: &Rollout,
    event: &Event,
    now: Timestamp,
) -> Result<Transition, Rejection> {
    if event.trigger.source == TriggerSource::User && identity_key(&event.trigger.actor).is_empty()
    {
        return Err(Rejection::Invalid(
            "who gives this command? a person's name must not be empty".into(),
        ));
    }
    let mut machine = Machine {
        plan,
        now,
        trigger: &event.trigger,
        seq: rollout.last_seq + 1,
        next: rollout.clone(),
        effects: Vec::new(),
        notes: Vec::new(),
        impact: Vec::new(),
    };
    machine.handle(&event.kind)?;
    if machine.next.status.is_progressing() {
        machine.progress();
    }
    if machine.next.status != rollout.status {
        machine.announce(rollout.status);
    }
    machine.tell(rollout, &event.kind);
    assert!(
        rollout.status.can_transition_to(machine.next.status),
        "illegal transition {} -> {} on {}",
        rollout.status,
        machine.next.status,
        event.kind.name()
    );
    if machine.next != *rollout {
        machine.next.updated_at = now;
    }
    Ok(Transition {
        rollout: machine.next,
        effects: machine.effects,
        notes: machine.notes,
        impact: machine.impact,
    })
}

/// What the shell should do next for a rollout with no pending effects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agenda {
    /// Phases to observe now.
    pub observe: Vec<String>,
    /// When to come back if nothing else happens (then send [`EventKind::Tick`]).
    pub wake_at: Option<Timestamp>,
}

pub fn agenda(plan: &Plan, rollout: &Rollout, now: Timestamp) -> Agenda {
    let mut agenda = Agenda::default();
    if !rollout.status.is_progressing() {
        return agenda;
    }
    let wake = |at: Timestamp, agenda: &mut Agenda| {
        agenda.wake_at = Some(agenda.wake_at.map_or(at, |w| w.min(at)));
    };
    for (phase, record) in plan.phases.iter().zip(&rollout.phases) {
        let Some(applied_at) = record.applied_at.filter(|_| is_watched(record.state)) else {
            continue;
        };
        let soak_end = applied_at.plus(phase.min_soak);
        let observe_at = match &record.observation {
            None => applied_at,
            Some(seen) if seen.at < soak_end => seen.at.plus(plan.observe_every).min(soak_end),
            Some(seen) => seen.at.plus(plan.observe_every),
        };
        if observe_at <= now {
            agenda.observe.push(record.id.clone());
        } else {
            wake(observe_at, &mut agenda);
        }
        if let Some(held_since) = record.held_since.filter(|_| !record.hold_expired) {
            wake(held_since.plus(phase.gate.max_hold), &mut agenda);
        }
    }
    if let Some(expiry) = approval::next_expiry(rollout) {
        wake(expiry, &mut agenda);
    }
    // The notice's end is a deadline: once it has passed, the tick starts the first phases.
    if let Some(until) = rollout.notice_until
        && waiting_for_notice(plan, rollout)
    {
        wake(until, &mut agenda);
    }
    if let Some(hold) = &rollout.freeze {
        wake(hold.until, &mut agenda);
    }
    if let Some(expiry) = exception::next_expiry(rollout) {
        wake(expiry, &mut agenda);
    }
    agenda
}

/// Whether a first phase (one without `after`) has not started yet.
fn waiting_for_notice(plan: &Plan, rollout: &Rollout) -> bool {
    plan.phases
        .iter()
        .zip(&rollout.phases)
        .any(|(phase, record)| phase.after.is_empty() && record.state == PhaseState::Pending)
}

/// The phase an `approve` without `--phase` means: the one awaiting approval, or else the one
/// running phase whose gate asks for approvals.
pub fn default_approval_phase(plan: &Plan, rollout: &Rollout) -> Result<String, Rejection> {
    let awaiting: Vec<&PhaseRecord> = rollout
        .phases
        .iter()
        .filter(|p| p.state == PhaseState::AwaitingApproval)
        .collect();
    if let [only] = awaiting.as_slice() {
        return Ok(only.id.clone());
    }
    let candidates: Vec<&str> = if awaiting.is_empty() {
        plan.phases
            .iter()
            .zip(&rollout.phases)
            .filter(|(phase, record)| record.state.is_current() && phase.gate.approvals > 0)
            .map(|(phase, _)| phase.id.as_str())
            .collect()
    } else {
        awaiting.iter().map(|p| p.id.as_str()).collect()
    };
    match candidates.as_slice() {
        [only] => Ok(only.to_string()),
        [] => Err(Rejection::Invalid(format!(
            "no running phase of `{}` needs an approval",
            rollout.id
        ))),
        many => Err(Rejection::Invalid(format!(
            "several phases could be meant ({}); name one with --phase",
            many.join(", ")
        ))),
    }
}

fn is_watched(state: PhaseState) -> bool {
    matches!(state, PhaseState::Soaking | PhaseState::AwaitingApproval)
}

struct Machine<'a> {
    plan: &'a Plan,
    now: Timestamp,
    trigger: &'a Trigger,
    seq: u64,
    next: Rollout,
    effects: Vec<PendingEffect>,
    notes: Vec<String>,
    impact: Vec<ImpactRecord>,
}

impl Machine<'_> {
    fn handle(&mut self, kind: &EventKind) -> Result<(), Rejection> {
        match kind {
            EventKind::Start { plan_hash } => self.start(plan_hash),
            EventKind::BaselineCaptured { effect } => {
                if self.complete(*effect).is_some() {
                    self.next.baseline_captured = true;
                }
                Ok(())
            }
            EventKind::Reconciled { effect, changes } => {
                self.reconciled(*effect, *changes);
                Ok(())
            }
            EventKind::Observed { observations } => {
                self.observed(observations);
                Ok(())
            }
            EventKind::Tick => Ok(()),
            EventKind::ApprovalGranted {
                phase,
                ticket,
                comment,
                digest,
            } => self.approve(phase, ticket, comment, digest.as_deref()),
            EventKind::ApprovalRejected { phase } => self.reject(phase),
            EventKind::ApprovalRefused { .. } => Ok(()),
            EventKind::PauseRequested => self.pause(),
            EventKind::ResumeRequested => self.resume(),
            EventKind::RollbackRequested { to } => self.rollback_requested(to.as_deref()),
            EventKind::AbortRequested => self.abort(),
            EventKind::ProviderFailed { error, .. } => self.provider_failed(error),
            EventKind::PlanChanged { plan_hash } => self.plan_changed(plan_hash),
            EventKind::Delivered { effect, .. } => {
                self.complete(*effect);
                Ok(())
            }
            EventKind::DriftDetected { effect, changes } => self.drifted(*effect, changes),
            EventKind::DriftResolved { resolution } => self.resolve_drift(*resolution),
            EventKind::TenantApprovalPending { effect, request } => {
                self.tenant_holds(*effect, request)
            }
            EventKind::PlanChangeProposed { plan_hash, weakens } => {
                self.propose_plan(plan_hash, weakens)
            }
            EventKind::PlanChangeApproved {
                plan_hash,
                ticket,
                comment,
            } => self.approve_plan_change(plan_hash, ticket, comment),
            EventKind::PlanChangeRejected { plan_hash } => self.reject_plan_change(plan_hash),
            EventKind::PlanFileChanged { plan_hash, path } => {
                self.plan_file_changed(plan_hash, path)
            }
            EventKind::FreezeOverridden => self.override_freeze(),
            EventKind::RecipientsResolved { effect, recipients } => {
                self.fix_recipients(*effect, recipients);
                Ok(())
            }
            EventKind::ApproversRead { groups } => {
                self.approvers_read(groups);
                Ok(())
            }
            EventKind::NotificationDropped { effect, .. } => {
                self.complete(*effect);
                Ok(())
            }
            EventKind::ExceptionGranted {
                name,
                subject,
                until,
            } => self.grant_exception(name, subject, *until),
            EventKind::ExceptionRevoked { name } => self.revoke_exception(name),
            EventKind::ExceptionExpired { names } => self.expire_exceptions(names),
        }
    }

    fn not_now(&self, action: &'static str) -> Rejection {
        Rejection::NotNow {
            id: self.next.id.clone(),
            status: self.next.status,
            action,
        }
    }

    fn by(&self) -> String {
        let trigger = self.trigger;
        if trigger.reason.is_empty() {
            trigger.actor.clone()
        } else {
            format!("{}: {}", trigger.actor, trigger.reason)
        }
    }

    /// The person giving this command, as an identity key (`None` for automation).
    fn requester(&self) -> Option<String> {
        (self.trigger.source == TriggerSource::User).then(|| identity_key(&self.trigger.actor))
    }

    /// Commits an effect to be carried out after this transition is durable.
    fn request(&mut self, effect: Effect) {
        if effect.sets_configuration() {
            self.next.pending.retain(|p| !p.effect.sets_configuration());
        }
        let pending = PendingEffect {
            id: EffectId {
                seq: self.seq,
                index: self.effects.len() as u32,
            },
            effect,
        };
        self.next.pending.push(pending.clone());
        self.effects.push(pending);
    }

    /// Removes a confirmed effect; `None` if it was not pending (superseded or already done).
    /// Fixes who a pending announcement goes to; once fixed, never again (a repeated answer
    /// for a message already delivered or fixed changes nothing).
    fn fix_recipients(&mut self, id: EffectId, recipients: &Recipients) {
        let pending = self.next.pending.iter_mut().find(|p| p.id == id);
        if let Some(PendingEffect {
            effect:
                Effect::Notify {
                    message: Some(message),
                    ..
                },
            ..
        }) = pending
            && message.recipients.is_none()
        {
            message.recipients = Some(recipients.clone());
        }
    }

    fn complete(&mut self, id: EffectId) -> Option<Effect> {
        let position = self.next.pending.iter().position(|p| p.id == id)?;
        Some(self.next.pending.remove(position).effect)
    }

    fn record(&mut self, idx: usize) -> &mut PhaseRecord {
        &mut self.next.phases[idx]
    }

    fn phase_index(&self, id: &str) -> Result<usize, Rejection> {
        self.plan
            .phase_index(id)
            .ok_or_else(|| Rejection::UnknownPhase(id.to_string()))
    }

    fn start(&mut self, plan_hash: &str) -> Result<(), Rejection> {
        if self.next.status != RolloutStatus::Pending {
            return Err(self.not_now("start"));
        }
        if plan_hash != self.next.plan_hash {
            return Err(Rejection::Invalid(
                "the plan changed between creating and starting the rollout".into(),
            ));
        }
        self.next.status = RolloutStatus::Running;
        self.next.reason = format!("started by {}", self.by());
        let notice = self.plan.notice();
        if !notice.is_zero() {
            let until = self.now.plus(notice);
            self.next.notice_until = Some(until);
            self.notes.push(format!(
                "the start is announced; the first phase waits until {} ({} notice)",
                until.rfc3339(),
                format_span(notice)
            ));
        }
        self.request(Effect::CaptureBaseline);
        Ok(())
    }

    /// Queues the plan's announcements of what this step did: the start, each phase that
    /// starts, and the statuses people are told about.
    fn tell(&mut self, before: &Rollout, kind: &EventKind) {
        if self.plan.announcements.is_empty() {
            return;
        }
        let mut moments: Vec<(Moment, Option<usize>)> = Vec::new();
        if matches!(kind, EventKind::Start { .. }) {
            moments.push((Moment::Start, None));
        }
        for (idx, (was, now)) in before.phases.iter().zip(&self.next.phases).enumerate() {
            if was.state != PhaseState::Applying && now.state == PhaseState::Applying {
                moments.push((Moment::Phase, Some(idx)));
            }
        }
        if self.next.status != before.status {
            let moment = match self.next.status {
                RolloutStatus::WaitingApproval => Some(Moment::Approval),
                RolloutStatus::Held => Some(Moment::Held),
                RolloutStatus::Completed => Some(Moment::Completed),
                RolloutStatus::RolledBack => Some(Moment::RolledBack),
                RolloutStatus::Aborted => Some(Moment::Aborted),
                RolloutStatus::Failed => Some(Moment::Failed),
                _ => None,
            };
            moments.extend(moment.map(|m| (m, None)));
        }
        for (moment, phase) in moments {
            let phase =
                phase.or_else(|| self.next.phases.iter().position(|r| r.state.is_current()));
            let phase_id = phase.map(|idx| self.plan.phases[idx].id.clone());
            let first_phase_at = self.next.notice_until.unwrap_or(self.now).rfc3339();
            for announcement in &self.plan.announcements {
                if !announcement.on.contains(&moment) {
                    continue;
                }
                let facts = Facts {
                    rollout: &self.next.id,
                    plan: &self.plan.name,
                    description: &self.plan.description,
                    moment: moment.as_str(),
                    status: self.next.status.as_str(),
                    phase: phase_id.as_deref().unwrap_or(""),
                    groups: announcement.groups.join(", "),
                    reason: &self.next.reason,
                    first_phase_at: first_phase_at.clone(),
                };
                let message = Message {
                    moment,
                    subject: announce::render(&announcement.subject, &facts),
                    text: announce::render(&announcement.template, &facts),
                    groups: announcement.groups.clone(),
                    addresses: announcement.addresses.clone(),
                    phase: phase_id.clone(),
                    recipients: None,
                };
                let effect = Effect::Notify {
                    to: announcement.address.clone(),
                    status: self.next.status,
                    previous: before.status,
                    reason: self.next.reason.clone(),
                    at: self.now,
                    message: Some(message),
                };
                self.request(effect);
            }
        }
    }

    /// Queues a notification for every channel that wants to hear about the new status.
    fn announce(&mut self, previous: RolloutStatus) {
        let status = self.next.status;
        for channel in &self.plan.channels {
            if channel.events.contains(&status) {
                self.request(Effect::Notify {
                    to: channel.address.clone(),
                    status,
                    previous,
                    reason: self.next.reason.clone(),
                    at: self.now,
                    message: None,
                });
            }
        }
    }

    fn reconciled(&mut self, effect: EffectId, changes: u64) {
        let Some(done) = self.complete(effect) else {
            return;
        };
        if self.next.tenant_approval.take().is_some()
            && self.next.status == RolloutStatus::WaitingTenantApproval
        {
            self.next.status = self
                .next
                .interrupted
                .take()
                .unwrap_or(RolloutStatus::Running);
            self.notes
                .push("the tenant approved the held change; it is made".to_string());
        }
        if done == Effect::RestoreBaseline {
            self.next.status = RolloutStatus::Aborted;
            self.next.reason = format!(
                "aborted; the configuration from before the rollout is restored ({changes} changes)"
            );
            return;
        }
        if matches!(
            done,
            Effect::Reconcile {
                during_pause: true,
                ..
            }
        ) {
            // Made during a pause: it changed the exemptions only, and applied no phase.
            self.notes.push(format!(
                "the exemptions are changed in the tenant during the pause ({changes} change{})",
                if changes == 1 { "" } else { "s" }
            ));
            return;
        }
        for record in &mut self.next.phases {
            record.promotion_unapplied = false;
        }
        for idx in 0..self.next.phases.len() {
            if self.next.phases[idx].state == PhaseState::Applying {
                let now = self.now;
                let record = self.record(idx);
                record.state = PhaseState::Soaking;
                record.applied_at = Some(now);
                let id = record.id.clone();
                self.notes.push(format!(
                    "`{id}` applied ({changes} change{}); soak started",
                    if changes == 1 { "" } else { "s" }
                ));
            }
        }
        if self.next.status == RolloutStatus::RollingBack {
            self.next.status = RolloutStatus::RolledBack;
            self.next.reason = self.next.reason.replacen("rolling back", "rolled back", 1);
        } else if self.next.interrupted == Some(RolloutStatus::RollingBack) {
            // The rollback finished while drift was being decided: the decision lands on it.
            self.next.interrupted = Some(RolloutStatus::RolledBack);
        } else if self.next.resume_to == Some(RolloutStatus::RollingBack) {
            // The rollback finished after a failure was recorded: resume lands on its result.
            self.next.resume_to = Some(RolloutStatus::RolledBack);
        }
    }

    /// Someone else changed what the rollout manages: stop, say what changed, write nothing.
    fn drifted(
        &mut self,
        effect: Option<EffectId>,
        changes: &[DriftChange],
    ) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if let Some(id) = effect
            && !self.next.pending.iter().any(|p| p.id == id)
        {
            return Ok(()); // about an effect that is no longer wanted
        }
        if changes.is_empty() {
            return Err(Rejection::Invalid("drift without a change".into()));
        }
        let restoring = matches!(self.next.interrupted, Some(Aborting | Completed));
        match self.next.status {
            WaitingTenantApproval if restoring => return Err(self.not_now("record drift")),
            // An abort puts back what phasegate changed whatever others did; drift cannot stop it.
            Failed if self.next.resume_to == Some(Aborting) => {
                return Err(self.not_now("record drift"));
            }
            Running | WaitingApproval | Held | RollingBack | WaitingTenantApproval => {
                let from = if self.next.status == WaitingTenantApproval {
                    self.next.interrupted.take()
                } else {
                    Some(self.next.status)
                };
                self.next.interrupted = from;
                self.next.status = Drifted;
            }
            Drifted | Paused | Failed => {}
            _ => return Err(self.not_now("record drift")),
        }
        self.next.tenant_approval = None;
        self.next.drift = changes.to_vec();
        let more = match changes.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        self.next.reason = format!(
            "changed by someone else: {}{more}; nothing is written until a person decides (`phasegate drift reapply`, `drift adopt`, or `abort`)",
            changes[0]
        );
        for change in changes {
            self.notes.push(format!("drift: {change}"));
        }
        Ok(())
    }

    fn resolve_drift(&mut self, resolution: DriftResolution) -> Result<(), Rejection> {
        if self.next.drift.is_empty() {
            return Err(Rejection::Invalid(format!(
                "rollout `{}` has no drift to resolve",
                self.next.id
            )));
        }
        if self.next.status == RolloutStatus::Drifted {
            self.next.status = self
                .next
                .interrupted
                .take()
                .unwrap_or(RolloutStatus::Running);
        }
        let changes = std::mem::take(&mut self.next.drift);
        // Gates are judged again on evidence from after the decision.
        for record in &mut self.next.phases {
            if is_watched(record.state) {
                record.observation = None;
                record.verdict = None;
            }
        }
        let desired = desired_state(self.plan, &self.next);
        self.request(Effect::Reconcile {
            desired,
            resolution: Some(resolution),
            during_pause: false,
        });
        let what = match resolution {
            DriftResolution::Reapply => "re-applying phasegate's values",
            DriftResolution::Adopt => "adopting the other admin's values",
        };
        self.notes.push(format!(
            "{} by {}: {what} for {}",
            resolution.as_str(),
            self.by(),
            changes
                .iter()
                .map(|c| format!("{} {}", c.object, c.field))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.next.reason = format!("drift resolved by {} ({})", self.by(), resolution.as_str());
        Ok(())
    }

    /// The tenant holds a write for another administrator's approval: wait, visibly.
    fn tenant_holds(&mut self, effect: EffectId, request: &TenantRequest) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if !self.next.pending.iter().any(|p| p.id == effect) {
            return Ok(());
        }
        if self
            .next
            .tenant_approval
            .as_ref()
            .is_some_and(|(held, _)| held == request)
        {
            return Ok(()); // still the same request
        }
        match self.next.status {
            Running | WaitingApproval | Held | RollingBack | Aborting | Completed => {
                self.next.interrupted = Some(self.next.status);
                self.next.status = WaitingTenantApproval;
            }
            WaitingTenantApproval | Paused => {}
            _ => return Err(self.not_now("wait for the tenant's approval")),
        }
        self.next.tenant_approval = Some((request.clone(), self.now));
        self.next.reason = format!(
            "the tenant holds a change for approval by another administrator: {} (request {}); approve it in the Intune admin center, then run again",
            request.summary, request.reference
        );
        self.notes.push(format!(
            "change held for Multi Admin Approval: {} (request {})",
            request.summary, request.reference
        ));
        Ok(())
    }

    fn observed(&mut self, observations: &[PhaseObservation]) {
        let mut seen = Vec::new();
        for observation in observations {
            let Some(idx) = self.plan.phase_index(&observation.phase) else {
                continue;
            };
            let record = self.record(idx);
            if is_watched(record.state) {
                record.observation = Some(observation.clone());
                seen.push(idx);
            }
        }
        if !self.next.status.is_progressing() {
            return;
        }
        for idx in seen {
            let phase = &self.plan.phases[idx];
            let Some(observation) = &self.next.phases[idx].observation else {
                continue;
            };
            let tripped =
                gate::rollback_trip(&phase.rollback_when, &observation.tally).or_else(|| {
                    signins::rollback_trip(&phase.rollback_when, observation.signins.as_ref())
                });
            if let Some(cause) = tripped {
                let why = format!("rollback_when of `{}` tripped: {cause}", phase.id);
                self.notes.push(why.clone());
                let frontier = BTreeSet::from([idx]);
                self.roll_back(self.one_phase_back(&frontier), &format!("gate: {why}"));
                return;
            }
        }
    }

    fn reject(&mut self, phase: &str) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if !matches!(self.next.status, Running | WaitingApproval | Held) {
            return Err(self.not_now("reject"));
        }
        let idx = self.phase_index(phase)?;
        if !is_watched(self.next.phases[idx].state) || self.plan.phases[idx].gate.approvals == 0 {
            return Err(Rejection::Invalid(format!(
                "phase `{phase}` is not waiting for an approval"
            )));
        }
        let record = self.record(idx);
        record.approvals.clear();
        record.state = PhaseState::Soaking;
        self.next.status = Rejected;
        self.next.reason = format!("promotion of `{phase}` rejected by {}", self.by());
        Ok(())
    }

    fn pause(&mut self) -> Result<(), Rejection> {
        if !self.next.status.is_progressing() {
            return Err(self.not_now("pause"));
        }
        self.next.resume_to = Some(self.next.status);
        self.next.status = RolloutStatus::Paused;
        self.next.reason = format!("paused by {}", self.by());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Rejection> {
        use RolloutStatus::*;
        match self.next.status {
            Paused | Failed => {
                let back = self.next.resume_to.take().unwrap_or(Running);
                self.next.status = if back.is_progressing() { Running } else { back };
                if self.next.status.is_progressing() {
                    self.recheck_unapplied_promotions();
                }
            }
            RolledBack | Rejected => {
                // Whoever sets the rollout going again asks for its current phases' promotion.
                let requester = self.requester();
                for record in self.next.phases.iter_mut().filter(|r| r.state.is_current()) {
                    record.requested(requester.clone());
                }
                self.next.status = Running;
            }
            Held if self.next.phases.iter().any(|p| p.hold_expired) => {
                let now = self.now;
                for record in self.next.phases.iter_mut().filter(|p| p.hold_expired) {
                    record.hold_expired = false;
                    record.held_since = Some(now);
                }
            }
            _ => return Err(self.not_now("resume")),
        }
        self.next.reason = format!("resumed by {}", self.by());
        if !self.next.drift.is_empty() && self.next.status != Aborting {
            // Drift found meanwhile still waits for a decision.
            self.next.interrupted = Some(self.next.status);
            self.next.status = Drifted;
            self.next.reason = format!(
                "resumed by {}, but someone else changed what the rollout manages: {}; decide with `phasegate drift reapply`, `drift adopt`, or `abort`",
                self.by(),
                self.next.drift[0]
            );
        }
        Ok(())
    }

    fn rollback_requested(&mut self, to: Option<&str>) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if matches!(self.next.status, Pending | RollingBack | Aborting | Aborted) {
            return Err(self.not_now("roll back"));
        }
        if self.next.status == Drifted {
            return Err(Rejection::Invalid(format!(
                "rollout `{}` drifted ({}); decide first: `phasegate drift reapply`, `drift adopt`, or `abort`",
                self.next.id,
                self.next
                    .drift
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )));
        }
        let targets = match to {
            Some(id) => {
                let idx = self.phase_index(id)?;
                if self.next.phases[idx].state != PhaseState::Promoted {
                    let promoted: Vec<&str> = self
                        .next
                        .phases
                        .iter()
                        .filter(|p| p.state == PhaseState::Promoted)
                        .map(|p| p.id.as_str())
                        .collect();
                    return Err(Rejection::Invalid(format!(
                        "can only roll back to a promoted phase; `{id}` is {} (promoted: {})",
                        self.next.phases[idx].state,
                        list_or_none(&promoted)
                    )));
                }
                BTreeSet::from([idx])
            }
            None => {
                let frontier = self.frontier();
                if frontier.is_empty() {
                    return Err(Rejection::Invalid(
                        "nothing to roll back: no phase is applied".into(),
                    ));
                }
                self.one_phase_back(&frontier)
            }
        };
        let by = format!("user {}", self.by());
        self.roll_back(targets, &by);
        Ok(())
    }

    /// Applied phases none of whose successors is applied: where the rollout currently is.
    fn frontier(&self) -> BTreeSet<usize> {
        let applied = |idx: usize| self.next.phases[idx].state.is_applied();
        (0..self.plan.phases.len())
            .filter(|&idx| applied(idx))
            .filter(|&idx| {
                !self
                    .plan
                    .phases
                    .iter()
                    .enumerate()
                    .any(|(succ, phase)| phase.after.contains(&idx) && applied(succ))
            })
            .collect()
    }

    /// The phases that become current again when `frontier` is rolled back by one phase.
    fn one_phase_back(&self, frontier: &BTreeSet<usize>) -> BTreeSet<usize> {
        frontier
            .iter()
            .flat_map(|&idx| self.plan.phases[idx].after.iter().copied())
            .collect()
    }

    /// Makes `targets` the current phases again, keeping what they follow, and rolls back the rest.
    fn roll_back(&mut self, targets: BTreeSet<usize>, cause: &str) {
        let mut keep = targets.clone();
        for &idx in &targets {
            keep.extend(self.plan.ancestors(idx));
        }
        let requester = self.requester();
        for idx in 0..self.next.phases.len() {
            let record = &mut self.next.phases[idx];
            if targets.contains(&idx) {
                record.state = PhaseState::Applying;
                record.promoted_at = None;
                record.reset_gate();
                record.requested(requester.clone());
            } else if !keep.contains(&idx) && record.state.is_applied() {
                record.state = PhaseState::RolledBack;
                record.promoted_at = None;
                record.reset_gate();
            }
        }
        let desired = desired_state(self.plan, &self.next);
        self.request(Effect::Reconcile {
            desired,
            resolution: None,
            during_pause: false,
        });
        let names: Vec<&str> = targets
            .iter()
            .map(|&i| self.plan.phases[i].id.as_str())
            .collect();
        let destination = if names.is_empty() {
            "before the first phase".to_string()
        } else {
            format!("`{}`", names.join("`, `"))
        };
        self.next.status = RolloutStatus::RollingBack;
        self.next.resume_to = None;
        self.next.interrupted = None;
        self.next.tenant_approval = None;
        self.next.reason = format!("rolling back to {destination} ({cause})");
    }

    fn abort(&mut self) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if matches!(self.next.status, Aborting | Aborted) {
            return Err(self.not_now("abort"));
        }
        let by = self.by();
        for record in &mut self.next.phases {
            if record.state.is_applied() {
                record.state = PhaseState::RolledBack;
                record.promoted_at = None;
                record.reset_gate();
            }
        }
        self.next.resume_to = None;
        self.next.interrupted = None;
        self.next.tenant_approval = None;
        self.next.drift.clear();
        if !self.next.baseline_captured {
            self.next.pending.clear();
            self.next.status = Aborted;
            self.next.reason = format!("aborted by {by} before any change was made");
            return Ok(());
        }
        self.next.pending.retain(|p| !p.effect.sets_configuration());
        self.request(Effect::RestoreBaseline);
        self.next.status = Aborting;
        self.next.reason =
            format!("aborting (by {by}): restoring the configuration from before the rollout");
        Ok(())
    }

    fn provider_failed(&mut self, error: &str) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if self.next.status == WaitingTenantApproval {
            self.next.status = self.next.interrupted.take().unwrap_or(Running);
            self.next.tenant_approval = None;
        }
        match self.next.status {
            Paused => {
                self.next.reason = format!("{}; the provider failed: {error}", self.next.reason);
                Ok(())
            }
            Running | WaitingApproval | Held | RollingBack | Aborting => {
                self.next.resume_to = Some(self.next.status);
                self.next.status = Failed;
                self.next.reason = format!("provider error: {error}");
                Ok(())
            }
            _ => Err(self.not_now("record a provider failure")),
        }
    }

    fn plan_changed(&mut self, plan_hash: &str) -> Result<(), Rejection> {
        use RolloutStatus::*;
        if matches!(self.next.status, Aborting | Aborted) {
            return Err(self.not_now("change the plan"));
        }
        if plan_hash != self.plan.hash {
            return Err(Rejection::Invalid(
                "the event does not match the plan it came with".into(),
            ));
        }
        if plan_hash == self.next.plan_hash {
            return Ok(());
        }
        self.plan_change_adopted(plan_hash)?;
        let mut old: Vec<PhaseRecord> = std::mem::take(&mut self.next.phases);
        for record in &old {
            if record.state.is_applied() && self.plan.phase_index(&record.id).is_none() {
                self.next.phases = old.clone();
                return Err(Rejection::Invalid(format!(
                    "the new plan drops phase `{}`, which is {}",
                    record.id, record.state
                )));
            }
        }
        let phases: Vec<PhaseRecord> = self
            .plan
            .phases
            .iter()
            .map(|phase| match old.iter().position(|r| r.id == phase.id) {
                Some(at) => old.swap_remove(at),
                None => PhaseRecord::new(&phase.id),
            })
            .collect();
        self.next.phases = phases;
        for (phase, record) in self.plan.phases.iter().zip(&self.next.phases) {
            if !record.state.is_applied() {
                continue;
            }
            if let Some(&pred) = phase
                .after
                .iter()
                .find(|&&p| self.next.phases[p].state != PhaseState::Promoted)
            {
                return Err(Rejection::Invalid(format!(
                    "in the new plan `{}` runs after `{}`, which is not promoted",
                    phase.id, self.plan.phases[pred].id
                )));
            }
        }
        let mut reset = Vec::new();
        for record in &mut self.next.phases {
            if record.state.is_current() {
                for approval in &record.approvals {
                    let ticket = approval
                        .ticket
                        .as_ref()
                        .map(|t| format!(", ticket {t}"))
                        .unwrap_or_default();
                    self.notes.push(format!(
                        "approval of `{}` by {} void (given {}{ticket}, for plan {}): the plan changed",
                        record.id,
                        approval.by,
                        approval.at,
                        short_hash(&approval.plan_hash)
                    ));
                }
                record.state = PhaseState::Applying;
                record.reset_gate();
                reset.push(record.id.clone());
            }
        }
        self.next.plan_hash = plan_hash.to_string();
        self.next.plan_name = self.plan.name.clone();
        if !reset.is_empty() {
            self.notes.push(format!(
                "the plan changed: gate of `{}` reset",
                reset.join("`, `")
            ));
        }
        if self.next.phases.iter().any(|p| p.state.is_applied()) {
            let desired = desired_state(self.plan, &self.next);
            self.request(Effect::Reconcile {
                desired,
                resolution: None,
                during_pause: false,
            });
        }
        if matches!(self.next.status, Held | WaitingApproval) {
            self.next.status = Running;
        }
        Ok(())
    }

    /// Judges watched phases, promotes, starts the phases that became ready, and settles the
    /// rollout's status. Idempotent: running it twice on the same state changes nothing.
    fn progress(&mut self) {
        self.lapse_approvals();
        let frozen_before = self.next.freeze.take();
        for &idx in &self.plan.order {
            self.judge(idx);
        }
        self.settle_freeze(frozen_before);
        let mut started = Vec::new();
        // A start announced with notice: the first phases wait it out.
        let noticed = self.next.notice_until.is_none_or(|until| self.now >= until);
        for &idx in &self.plan.order {
            let after = &self.plan.phases[idx].after;
            let ready = (noticed || !after.is_empty())
                && after
                    .iter()
                    .all(|&p| self.next.phases[p].state == PhaseState::Promoted);
            let record = self.record(idx);
            if ready && matches!(record.state, PhaseState::Pending | PhaseState::RolledBack) {
                record.state = PhaseState::Applying;
                record.reset_gate();
                started.push(record.id.clone());
                forecast::attach(self, idx);
            }
        }
        if !started.is_empty() {
            self.notes
                .push(format!("applying `{}`", started.join("`, `")));
            let desired = desired_state(self.plan, &self.next);
            self.request(Effect::Reconcile {
                desired,
                resolution: None,
                during_pause: false,
            });
        }
        let was_completed = self.next.status == RolloutStatus::Completed;
        self.settle_status();
        if self.next.status == RolloutStatus::Completed && !was_completed {
            // The configuration stays; the claim on the objects it was written to goes.
            let desired = desired_state(self.plan, &self.next);
            self.request(Effect::Reconcile {
                desired,
                resolution: None,
                during_pause: false,
            });
        }
    }

    fn judge(&mut self, idx: usize) {
        let frozen = self.freeze_holding();
        let plan = self.plan;
        let phase = &plan.phases[idx];
        let now = self.now;
        let observe_every = self.plan.observe_every;
        let record = &mut self.next.phases[idx];
        if !is_watched(record.state) {
            return;
        }
        let (Some(applied_at), Some(observation)) = (record.applied_at, &record.observation) else {
            return;
        };
        let verdict = gate::evaluate_with_signins(
            &phase.gate,
            &observation.tally,
            observation.signins.as_ref(),
            observation.at,
        );
        let soak_end = applied_at.plus(phase.min_soak);
        let decidable = now >= soak_end
            && observation.at >= soak_end
            && observation.at.plus(observe_every) >= now;
        record.verdict = Some(verdict.clone());
        if !decidable {
            self.expire_hold(idx);
            return;
        }
        forecast::soaked(self, idx);
        let record = &mut self.next.phases[idx];
        let Some(observation) = &record.observation else {
            return;
        };
        if verdict.outcome == GateOutcome::Pass {
            record.held_since = None;
            record.hold_expired = false;
            let tally = observation.tally;
            approval::void_moved_evidence(phase, record, &tally, &mut self.notes);
            let have = record.approvals.len();
            let needed = phase.gate.approvals as usize;
            if have >= needed
                && let Some(frozen) = frozen
            {
                record.state = PhaseState::Soaking;
                let id = phase.id.clone();
                self.hold_for_freeze(&id, frozen);
                return;
            }
            if have >= needed {
                record.state = PhaseState::Promoted;
                record.promoted_at = Some(now);
                record.promotion_unapplied = true;
                let approvers: Vec<&str> = record.approvals.iter().map(|a| a.by.as_str()).collect();
                let approved = if approvers.is_empty() {
                    String::new()
                } else {
                    format!("; approved by {}", approvers.join(", "))
                };
                self.notes.push(format!(
                    "promoted `{}`: gate passed ({}){approved}",
                    phase.id, verdict.reasons[0]
                ));
                forecast::promoted(self, idx);
            } else if record.state != PhaseState::AwaitingApproval {
                record.state = PhaseState::AwaitingApproval;
                self.notes.push(format!(
                    "gate passed for `{}` ({}); waiting for {} approval{}",
                    phase.id,
                    verdict.reasons[0],
                    needed - have,
                    if needed - have == 1 { "" } else { "s" }
                ));
            }
            return;
        }
        record.state = PhaseState::Soaking;
        if record.held_since.is_none() {
            record.held_since = Some(now);
            record.holds += 1;
            self.notes.push(format!(
                "gate {} for `{}`: {}",
                verdict.outcome.as_str(),
                phase.id,
                verdict.reasons.join("; ")
            ));
        }
        self.expire_hold(idx);
    }

    /// Flags a hold that has lasted longer than the gate's `max_hold`.
    fn expire_hold(&mut self, idx: usize) {
        let phase = &self.plan.phases[idx];
        let now = self.now;
        let record = &mut self.next.phases[idx];
        let Some(held_since) = record.held_since else {
            return;
        };
        if !record.hold_expired && now >= held_since.plus(phase.gate.max_hold) {
            record.hold_expired = true;
            self.notes.push(format!(
                "`{}` has been held for {}, longer than its max_hold; a person should look",
                phase.id,
                format_span(now.since(held_since))
            ));
        }
    }

    fn settle_status(&mut self) {
        let plan = self.plan;
        let records = &self.next.phases;
        if records.iter().all(|p| p.state == PhaseState::Promoted) {
            self.next.status = RolloutStatus::Completed;
            self.next.reason = format!("all {} phases promoted", records.len());
            return;
        }
        if let Some(held) = records.iter().find(|p| p.held_since.is_some()) {
            let reasons = held
                .verdict
                .as_ref()
                .map(|v| v.reasons.join("; "))
                .unwrap_or_default();
            let expired = if held.hold_expired {
                " (held longer than max_hold)"
            } else {
                ""
            };
            self.next.status = RolloutStatus::Held;
            self.next.reason = format!("gate holds `{}`: {reasons}{expired}", held.id);
            return;
        }
        if let Some(hold) = &self.next.freeze {
            self.next.status = RolloutStatus::Running;
            self.next.reason = format!(
                "the promotion of `{}` waits for freeze window `{}` until {} ({})",
                hold.phases.join("`, `"),
                hold.window,
                hold.until,
                hold.until_local
            );
            return;
        }
        if let Some((phase, record)) = plan
            .phases
            .iter()
            .zip(records)
            .find(|(_, r)| r.state == PhaseState::AwaitingApproval)
        {
            let missing = phase.gate.approvals as usize
                - record.approvals.len().min(phase.gate.approvals as usize);
            self.next.status = RolloutStatus::WaitingApproval;
            let why = record
                .approval_note
                .as_ref()
                .map(|note| format!(" ({note})"))
                .unwrap_or_default();
            self.next.reason = format!(
                "`{}` passed its gate and needs {missing} more approval{}{why}",
                phase.id,
                if missing == 1 { "" } else { "s" }
            );
            return;
        }
        self.next.status = RolloutStatus::Running;
        let applying: Vec<&str> = records
            .iter()
            .filter(|r| r.state == PhaseState::Applying)
            .map(|r| r.id.as_str())
            .collect();
        let notice = self
            .next
            .notice_until
            .filter(|&until| self.now < until && waiting_for_notice(plan, &self.next));
        self.next.reason = if !applying.is_empty() {
            format!("applying `{}`", applying.join("`, `"))
        } else if let Some(until) = notice {
            format!(
                "the start is announced; the first phase is applied from {}",
                until.rfc3339()
            )
        } else {
            let soaking: Vec<String> = plan
                .phases
                .iter()
                .zip(records)
                .filter(|(_, r)| r.state == PhaseState::Soaking)
                .map(|(phase, r)| match r.applied_at {
                    Some(at) => format!(
                        "`{}` (gate judged from {})",
                        phase.id,
                        at.plus(phase.min_soak)
                    ),
                    None => format!("`{}`", phase.id),
                })
                .collect();
            format!("soaking {}", soaking.join(", "))
        };
    }
}

/// The first 12 hex digits of a plan's hash, as the audit trail shows it.
pub fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

impl Trigger {
    /// The machine's own decisions, recorded as caused by the gate.
    pub fn gate(reason: impl Into<String>) -> Trigger {
        Trigger::new(TriggerSource::Gate, "gate", reason)
    }
}

#[cfg(test)]
mod announce_tests;
#[cfg(test)]
mod directory_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(super) mod tests;
