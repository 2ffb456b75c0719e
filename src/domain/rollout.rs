//! The rollout aggregate: everything the state machine decides on, and nothing else.
//!
//! A `Rollout` holds the status of the whole rollout, one [`PhaseRecord`] per plan phase (with the
//! latest observation, gate verdict, hold and approvals), and the effects committed but not yet
//! confirmed. All decision inputs live here, persisted with every transition, so a restarted
//! process re-derives what to do from the record alone.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::event::{DriftChange, PendingEffect, TenantRequest};
use super::forecast::{Forecast, ForecastCheck, Impact};
use super::gate::{GateVerdict, Tally};
use super::plan::{Plan, Platform};
use super::signins::SignIns;
use super::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Created, not started.
    Pending,
    /// Applying, soaking or observing phases; automation is in charge.
    Running,
    /// A phase passed its gate and needs approvals before promotion.
    WaitingApproval,
    /// A phase's gate fails (or lacks data) after its soak; automation keeps watching.
    Held,
    /// A person paused it; only a person resumes it.
    Paused,
    /// Moving the backend back to an earlier phase's desired state.
    RollingBack,
    /// Back at an earlier phase, waiting for a person to resume, roll back further or abort.
    RolledBack,
    /// A person rejected a promotion.
    Rejected,
    /// Restoring the configuration from before the rollout.
    Aborting,
    /// The configuration from before the rollout is back. Final.
    Aborted,
    /// Every phase is promoted.
    Completed,
    /// The backend failed for good; a person resumes once it is fixed.
    Failed,
    /// Someone else changed what the rollout manages; nothing is written until a person
    /// re-applies, adopts the change, or aborts.
    Drifted,
    /// The tenant holds a write until another administrator approves it (Multi Admin Approval).
    WaitingTenantApproval,
}

impl RolloutStatus {
    pub const ALL: [RolloutStatus; 14] = [
        RolloutStatus::Pending,
        RolloutStatus::Running,
        RolloutStatus::WaitingApproval,
        RolloutStatus::Held,
        RolloutStatus::Paused,
        RolloutStatus::RollingBack,
        RolloutStatus::RolledBack,
        RolloutStatus::Rejected,
        RolloutStatus::Aborting,
        RolloutStatus::Aborted,
        RolloutStatus::Completed,
        RolloutStatus::Failed,
        RolloutStatus::Drifted,
        RolloutStatus::WaitingTenantApproval,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Pending => "pending",
            RolloutStatus::Running => "running",
            RolloutStatus::WaitingApproval => "waiting_approval",
            RolloutStatus::Held => "held",
            RolloutStatus::Paused => "paused",
            RolloutStatus::RollingBack => "rolling_back",
            RolloutStatus::RolledBack => "rolled_back",
            RolloutStatus::Rejected => "rejected",
            RolloutStatus::Aborting => "aborting",
            RolloutStatus::Aborted => "aborted",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Failed => "failed",
            RolloutStatus::Drifted => "drifted",
            RolloutStatus::WaitingTenantApproval => "waiting_tenant_approval",
        }
    }

    /// Gates are evaluated and phases promoted only in these statuses.
    pub fn is_progressing(self) -> bool {
        matches!(
            self,
            RolloutStatus::Running | RolloutStatus::WaitingApproval | RolloutStatus::Held
        )
    }

    /// A person has to look at it (CLI exit code 3).
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            RolloutStatus::WaitingApproval
                | RolloutStatus::Paused
                | RolloutStatus::Held
                | RolloutStatus::RolledBack
                | RolloutStatus::Rejected
                | RolloutStatus::Aborted
                | RolloutStatus::Drifted
                | RolloutStatus::WaitingTenantApproval
        )
    }

    /// The transition table. `docs/state-machine.md` draws the same edges; the property tests
    /// check every step against it.
    pub fn can_transition_to(self, next: RolloutStatus) -> bool {
        use RolloutStatus::*;
        if self == next {
            return true;
        }
        match self {
            Pending => matches!(next, Running | Aborted),
            Running | WaitingApproval | Held => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | Paused
                    | RollingBack
                    | Rejected
                    | Aborting
                    | Aborted
                    | Failed
                    | Drifted
                    | WaitingTenantApproval
            ),
            Paused => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | RollingBack
                    | Aborting
                    | Aborted
                    | Drifted
            ),
            RollingBack => matches!(
                next,
                RolledBack | Aborting | Aborted | Failed | Drifted | WaitingTenantApproval
            ),
            RolledBack | Rejected => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | RollingBack
                    | Aborting
                    | Aborted
                    | Drifted
            ),
            Aborting => matches!(next, Aborted | Failed | WaitingTenantApproval),
            Aborted => false,
            Completed => matches!(
                next,
                RollingBack | Aborting | Aborted | WaitingTenantApproval
            ),
            Failed => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | Paused
                    | RollingBack
                    | RolledBack
                    | Aborting
                    | Aborted
                    | Drifted
            ),
            // Back to where the rollout was interrupted, or on to what a person chose.
            Drifted => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | Paused
                    | RollingBack
                    | RolledBack
                    | Rejected
                    | Aborting
                    | Aborted
                    | Failed
                    | WaitingTenantApproval
            ),
            WaitingTenantApproval => matches!(
                next,
                Running
                    | WaitingApproval
                    | Held
                    | Completed
                    | Paused
                    | RollingBack
                    | RolledBack
                    | Rejected
                    | Aborting
                    | Aborted
                    | Failed
                    | Drifted
            ),
        }
    }
}

impl fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseState {
    Pending,
    /// Its configuration is committed as desired; the provider has not confirmed it yet.
    Applying,
    /// Applied; soak time runs and the gate is watched.
    Soaking,
    /// The gate passes; approvals are missing.
    AwaitingApproval,
    Promoted,
    RolledBack,
}

impl PhaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseState::Pending => "pending",
            PhaseState::Applying => "applying",
            PhaseState::Soaking => "soaking",
            PhaseState::AwaitingApproval => "awaiting_approval",
            PhaseState::Promoted => "promoted",
            PhaseState::RolledBack => "rolled_back",
        }
    }

    /// Applied and not yet promoted: the phases a rollout is "in".
    pub fn is_current(self) -> bool {
        matches!(
            self,
            PhaseState::Applying | PhaseState::Soaking | PhaseState::AwaitingApproval
        )
    }
}

impl fmt::Display for PhaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Device counts for one phase at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseObservation {
    pub phase: String,
    pub at: Timestamp,
    /// All the phase's devices, over every platform the rollout manages.
    pub tally: Tally,
    /// The same devices per platform, when the rollout manages more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_platform: Vec<(Platform, Tally)>,
    /// How many of the devices are told and blocked (the actual the forecast is checked on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact: Option<Impact>,
    /// What promoting the phase would do: one forecast per phase its promotion starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forecasts: Vec<Forecast>,
    /// The phase's users' sign-ins, when its gate or rollback criteria ask for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signins: Option<SignIns>,
    /// Devices under the phase's policies without a primary user: no user group places them
    /// in a phase, so they are not in `tally` and are reported beside it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub userless: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A plan change that weakens the rollout's safeguards: who applied it, what it weakens, and the
/// approvals it has under the rules of the plan in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanChange {
    /// The hash of the plan applied (the store keeps its text under it).
    pub plan_hash: String,
    /// The hash of the plan in force when it was applied.
    pub from_hash: String,
    /// Who applied it, as an identity key.
    pub by: String,
    pub at: Timestamp,
    /// Every way it weakens the plan in force, in words.
    pub weakens: Vec<String>,
    pub approvals: Vec<Approval>,
    /// The quorum was met: the shell adopts the plan next.
    pub approved: bool,
}

/// A plan file edited behind phasegate's back: what it holds, and since when it is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanFileChange {
    pub plan_hash: String,
    pub path: String,
    pub seen_at: Timestamp,
}

/// A freeze window holding promotions that are due.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeHold {
    pub window: String,
    pub until: Timestamp,
    /// The same instant on the window's own clock (`Mon 06:00 Europe/Berlin`).
    pub until_local: String,
    /// The phases whose promotion waits.
    pub phases: Vec<String>,
}

/// A person let promotions through a freeze, until the freeze's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeOverride {
    pub window: String,
    pub by: String,
    pub at: Timestamp,
    pub until: Timestamp,
}

/// Who an exception exempts from enforcement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// A user, by sign-in name (UPN), as an identity key.
    User(String),
    /// A group, by the name the provider knows it by.
    Group(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::User(upn) => write!(f, "user {upn}"),
            Subject::Group(name) => write!(f, "group {name}"),
        }
    }
}

/// A named exemption from enforcement, granted by a person until a time; it ends on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    pub name: String,
    pub subject: Subject,
    pub until: Timestamp,
    pub reason: String,
    /// Who granted it, as an identity key.
    pub granted_by: String,
    pub granted_at: Timestamp,
}

/// A person's sign-off on promoting a phase, bound to the plan it was given for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who, as an identity key (trimmed, lowercase; see `plan::identity_key`).
    pub by: String,
    pub at: Timestamp,
    pub ticket: Option<String>,
    pub comment: Option<String>,
    pub plan_hash: String,
    /// When it lapses (the plan's `approval_expires_after`); never when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// The gate's evidence it was given on (`None`: no observation of the phase yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<ApprovalEvidence>,
}

/// What an approver was shown: the phase's latest observation when the approval was given, and
/// a digest binding it to the plan and the phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalEvidence {
    pub observed_at: Timestamp,
    pub tally: Tally,
    /// Hex SHA-256 of the plan's hash, the phase, the counts and the forecasts.
    pub digest: String,
    /// The impact forecasts shown with the counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forecasts: Vec<Forecast>,
}

impl Approval {
    /// Whether it still counts at `now`.
    pub fn is_valid_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub id: String,
    pub state: PhaseState,
    /// When the backend confirmed the phase's configuration: the start of its soak.
    pub applied_at: Option<Timestamp>,
    pub promoted_at: Option<Timestamp>,
    pub observation: Option<PhaseObservation>,
    pub verdict: Option<GateVerdict>,
    /// Since when the gate has been failing after the soak.
    pub held_since: Option<Timestamp>,
    /// The hold outlasted the gate's `max_hold`; a person should look.
    pub hold_expired: bool,
    /// How many times the gate held this phase.
    pub holds: u32,
    pub approvals: Vec<Approval>,
    /// Who asked for this run of the phase to be promoted: the people whose commands (a
    /// rollback to it, a resume after a rollback or rejection) put it on its way again, as
    /// identity keys. Separation of duties keeps them from approving it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requested_by: Vec<String>,
    /// Why an approval of this run stopped counting (expired, or its evidence moved), until
    /// the next approval: the rollout says it when it asks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_note: Option<String>,
    /// Promoted, and the configuration that promotion asked for is not confirmed yet: a resume
    /// after a pause decides it again if its approvals lapsed meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promotion_unapplied: bool,
    /// The forecast this run of the phase was started on (taken when the phase before it was
    /// promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
    /// That forecast against the outcome, once the phase had soaked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_check: Option<ForecastCheck>,
}

impl PhaseRecord {
    pub fn new(id: &str) -> PhaseRecord {
        PhaseRecord {
            id: id.to_string(),
            state: PhaseState::Pending,
            applied_at: None,
            promoted_at: None,
            observation: None,
            verdict: None,
            held_since: None,
            hold_expired: false,
            holds: 0,
            approvals: Vec::new(),
            requested_by: Vec::new(),
            approval_note: None,
            promotion_unapplied: false,
            forecast: None,
            forecast_check: None,
        }
    }

    /// Records that `person` (a key) asked for this run's promotion.
    pub fn requested(&mut self, person: Option<String>) {
        if let Some(person) = person
            && !self.requested_by.contains(&person)
        {
            self.requested_by.push(person);
        }
    }

    /// Forgets everything a gate decided for the phase's current run.
    pub fn reset_gate(&mut self) {
        self.applied_at = None;
        self.observation = None;
        self.verdict = None;
        self.held_since = None;
        self.hold_expired = false;
        self.approvals.clear();
        self.requested_by.clear();
        self.approval_note = None;
        self.promotion_unapplied = false;
        self.forecast = None;
        self.forecast_check = None;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub plan_name: String,
    pub plan_hash: String,
    pub status: RolloutStatus,
    /// Why the rollout is in its status, in a sentence.
    pub reason: String,
    pub created_by: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// One record per plan phase, in plan order.
    pub phases: Vec<PhaseRecord>,
    /// Effects committed with a transition and not yet confirmed, oldest first.
    pub pending: Vec<PendingEffect>,
    pub baseline_captured: bool,
    /// Where `resume` returns to after a pause or a failure.
    pub resume_to: Option<RolloutStatus>,
    /// Where the rollout returns once drift is resolved or the tenant approved a held write.
    #[serde(default)]
    pub interrupted: Option<RolloutStatus>,
    /// What someone else changed, while the rollout waits for a person's decision.
    #[serde(default)]
    pub drift: Vec<DriftChange>,
    /// The write the tenant holds for approval, and since when.
    #[serde(default)]
    pub tenant_approval: Option<(TenantRequest, Timestamp)>,
    /// The start was announced with a notice period: no first phase is applied before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice_until: Option<Timestamp>,
    /// A plan a person applied that weakens the rollout's safeguards, waiting for approval under
    /// the plan in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_change: Option<PlanChange>,
    /// The rollout's plan file holds another plan than the one it runs, which nobody applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_file: Option<PlanFileChange>,
    /// A promotion that is due waits for a freeze window to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<FreezeHold>,
    /// Freezes a person let promotions through, until each freeze's end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_overrides: Vec<FreezeOverride>,
    /// The plan's directory approver groups as the shell last read them (group → snapshot):
    /// approvals are judged against these, with no directory call.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub approver_directory: BTreeMap<String, crate::domain::directory::ApproverSnapshot>,
    /// Active exceptions from enforcement, in the order granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exceptions: Vec<Exception>,
    /// Sequence number of the last event applied.
    pub last_seq: u64,
}

/// A rollout's record at a glance: what sorting a store's rollouts needs (whether it is finished,
/// whether it waits for a person, which plans are its), decoded from the stored record while the
/// rest of it is skipped unread. At resume this is read for every rollout in the store, and only
/// the ones to drive are decoded whole (`store::Store::glances`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RolloutGlance {
    pub id: String,
    pub plan_hash: String,
    pub status: RolloutStatus,
    /// How many effects are pending.
    #[serde(rename = "pending", deserialize_with = "count_items")]
    pub pending: usize,
    /// Whether any phase's hold has expired.
    #[serde(rename = "phases", deserialize_with = "any_hold_expired")]
    pub hold_expired: bool,
    /// The plan change on record: its plan's hash, and whether it is approved.
    #[serde(default, deserialize_with = "plan_change_glance")]
    pub plan_change: Option<(String, bool)>,
    /// The plan a changed plan file was recorded to hold.
    #[serde(default, deserialize_with = "plan_file_glance")]
    pub plan_file: Option<String>,
    /// How many exceptions are active: each ends at its time, whatever the rollout waits for.
    #[serde(default, deserialize_with = "count_items")]
    pub exceptions: usize,
}

impl From<&Rollout> for RolloutGlance {
    fn from(rollout: &Rollout) -> RolloutGlance {
        RolloutGlance {
            id: rollout.id.clone(),
            plan_hash: rollout.plan_hash.clone(),
            status: rollout.status,
            pending: rollout.pending.len(),
            hold_expired: rollout.phases.iter().any(|p| p.hold_expired),
            plan_change: rollout
                .plan_change
                .as_ref()
                .map(|c| (c.plan_hash.clone(), c.approved)),
            plan_file: rollout.plan_file.as_ref().map(|f| f.plan_hash.clone()),
            exceptions: rollout.exceptions.len(),
        }
    }
}

fn count_items<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Ok(Vec::<serde::de::IgnoredAny>::deserialize(d)?.len())
}

fn any_hold_expired<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    struct Phase {
        #[serde(default)]
        hold_expired: bool,
    }
    Ok(Vec::<Phase>::deserialize(d)?.iter().any(|p| p.hold_expired))
}

fn plan_change_glance<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<(String, bool)>, D::Error> {
    #[derive(Deserialize)]
    struct Change {
        plan_hash: String,
        approved: bool,
    }
    Ok(Option::<Change>::deserialize(d)?.map(|c| (c.plan_hash, c.approved)))
}

fn plan_file_glance<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct File {
        plan_hash: String,
    }
    Ok(Option::<File>::deserialize(d)?.map(|f| f.plan_hash))
}

impl Rollout {
    pub fn new(id: &str, plan: &Plan, created_by: &str, now: Timestamp) -> Rollout {
        Rollout {
            id: id.to_string(),
            plan_name: plan.name.clone(),
            plan_hash: plan.hash.clone(),
            status: RolloutStatus::Pending,
            reason: "created".to_string(),
            created_by: created_by.to_string(),
            created_at: now,
            updated_at: now,
            phases: plan
                .phases
                .iter()
                .map(|p| PhaseRecord::new(&p.id))
                .collect(),
            pending: Vec::new(),
            baseline_captured: false,
            resume_to: None,
            interrupted: None,
            drift: Vec::new(),
            tenant_approval: None,
            notice_until: None,
            plan_change: None,
            plan_file: None,
            freeze: None,
            freeze_overrides: Vec::new(),
            approver_directory: BTreeMap::new(),
            exceptions: Vec::new(),
            last_seq: 0,
        }
    }

    pub fn phase(&self, id: &str) -> Option<&PhaseRecord> {
        self.phases.iter().find(|p| p.id == id)
    }

    /// Ids of the phases the rollout is in (applied, not promoted).
    pub fn current_phases(&self) -> Vec<&str> {
        self.phases
            .iter()
            .filter(|p| p.state.is_current())
            .map(|p| p.id.as_str())
            .collect()
    }

    /// Checks what must always hold between the rollout and its plan. Violations are programming
    /// errors; the store checks before every write and after every read.
    pub fn check_invariants(&self, plan: &Plan) -> Result<(), String> {
        if self.phases.len() != plan.phases.len() {
            return Err(format!(
                "rollout has {} phases, plan has {}",
                self.phases.len(),
                plan.phases.len()
            ));
        }
        for (record, phase) in self.phases.iter().zip(&plan.phases) {
            if record.id != phase.id {
                return Err(format!("phase `{}` recorded as `{}`", phase.id, record.id));
            }
            if record.state.is_applied() {
                for &pred in &phase.after {
                    if self.phases[pred].state != PhaseState::Promoted {
                        return Err(format!(
                            "phase `{}` is {} while `{}` before it is {}",
                            record.id, record.state, plan.phases[pred].id, self.phases[pred].state
                        ));
                    }
                }
            }
        }
        if self.status == RolloutStatus::Completed
            && self.phases.iter().any(|p| p.state != PhaseState::Promoted)
        {
            return Err("completed with phases not promoted".into());
        }
        let setters = self
            .pending
            .iter()
            .filter(|p| p.effect.sets_configuration())
            .count();
        if setters > 1 {
            return Err(format!("{setters} configuration effects pending"));
        }
        Ok(())
    }
}
