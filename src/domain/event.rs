//! What can happen to a rollout (events, the machine's input) and what the machine asks the
//! outside world to do (effects, its output).
//!
//! Every event carries a [`Trigger`]: who or what caused it and why. The audit trail is made of
//! these, so "who promoted this, and on what evidence" always has an answer.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::desired::DesiredState;
use super::directory::{ApproverSnapshot, Recipients};
use super::plan::Moment;
use super::rollout::{PhaseObservation, RolloutStatus, Subject};
use super::time::Timestamp;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub trigger: Trigger,
}

/// Who or what caused an event, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub source: TriggerSource,
    /// A person's name for `user`; the component otherwise (`run`, `simulator`, ...).
    pub actor: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// A person, through the CLI.
    User,
    /// A gate or abort criterion decided.
    Gate,
    /// Time passed: an observation or deadline came due.
    Schedule,
    /// The backend answered (an effect finished or failed).
    Provider,
    /// phasegate itself, e.g. on noticing a changed plan file.
    Internal,
}

impl TriggerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::User => "user",
            TriggerSource::Gate => "gate",
            TriggerSource::Schedule => "schedule",
            TriggerSource::Provider => "provider",
            TriggerSource::Internal => "internal",
        }
    }
}

impl Trigger {
    pub fn user(actor: impl Into<String>, reason: impl Into<String>) -> Trigger {
        Trigger {
            source: TriggerSource::User,
            actor: actor.into(),
            reason: reason.into(),
        }
    }

    pub fn new(source: TriggerSource, actor: &str, reason: impl Into<String>) -> Trigger {
        Trigger {
            source,
            actor: actor.to_string(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A person started the rollout with this plan.
    Start {
        plan_hash: String,
    },
    /// The provider recorded the tenant's configuration from before the rollout.
    BaselineCaptured {
        effect: EffectId,
    },
    /// The provider brought the backend to a desired state (or back to the baseline).
    Reconciled {
        effect: EffectId,
        changes: u64,
    },
    /// Fresh device counts for running phases.
    Observed {
        observations: Vec<PhaseObservation>,
    },
    /// Time passed with nothing observed; deadlines may have come due.
    Tick,
    ApprovalGranted {
        phase: String,
        ticket: Option<String>,
        comment: Option<String>,
        /// The approval digest the person was shown (`approve --digest`, the terminal's
        /// confirmation, the API's `digest`): refused when the rollout's evidence has moved
        /// since. `None`: bound to the evidence as it stands when recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    ApprovalRejected {
        phase: String,
    },
    /// An approval the rules refused (separation of duties, not an approver, a stale digest, a
    /// missing ticket, ...): recorded for the audit trail, it changes nothing else.
    ApprovalRefused {
        phase: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
        why: String,
    },
    PauseRequested,
    ResumeRequested,
    /// Roll back to `to`, or by one phase when `None`.
    RollbackRequested {
        to: Option<String>,
    },
    AbortRequested,
    /// An effect failed for good (retries are the shell's business and happen before this).
    ProviderFailed {
        effect: Option<EffectId>,
        error: String,
    },
    /// The plan file changed; the machine is handed the new plan with this event.
    PlanChanged {
        plan_hash: String,
    },
    /// A webhook answered a notification (`status` is its HTTP status).
    Delivered {
        effect: EffectId,
        status: u16,
    },
    /// Someone else changed what the rollout manages (found before a write, or on observing).
    /// Nothing more is written until a person decides.
    DriftDetected {
        effect: Option<EffectId>,
        changes: Vec<DriftChange>,
    },
    /// A person decided what to do about the drift.
    DriftResolved {
        resolution: DriftResolution,
    },
    /// The tenant holds a write for its own change approval (Intune Multi Admin Approval).
    TenantApprovalPending {
        effect: EffectId,
        request: TenantRequest,
    },
    /// A person applied a plan that weakens the one in force (`weakens` says how); it waits for
    /// approval under the plan in force. Handed to the machine with the plan in force.
    PlanChangeProposed {
        plan_hash: String,
        weakens: Vec<String>,
    },
    /// An approval of the plan change waiting, which the approver saw as `plan_hash`.
    PlanChangeApproved {
        plan_hash: String,
        ticket: Option<String>,
        comment: Option<String>,
    },
    /// The plan change waiting is turned down (or withdrawn by whoever applied it).
    PlanChangeRejected {
        plan_hash: String,
    },
    /// The rollout's plan file holds a plan nobody applied (`plan_hash`); it is not adopted.
    PlanFileChanged {
        plan_hash: String,
        path: String,
    },
    /// A person lets promotions through the freeze in force until it ends.
    FreezeOverridden,
    /// The directory's members of an e-mail announcement's groups, read once before its first
    /// attempt and fixed with it: every attempt goes to exactly these addresses.
    RecipientsResolved {
        effect: EffectId,
        recipients: Recipients,
    },
    /// The members of the plan's directory approver groups, as the directory had them (each
    /// group's snapshot, or why it could not be read): what approvals are judged against.
    ApproversRead {
        groups: std::collections::BTreeMap<String, ApproverSnapshot>,
    },
    /// An announcement that cannot be sent as planned (its groups are too large, or not in
    /// the directory), taken out of the outbox unsent.
    NotificationDropped {
        effect: EffectId,
        reason: String,
    },
    /// A person exempts a user or group from enforcement until a time (the trigger's reason is
    /// the exception's).
    ExceptionGranted {
        name: String,
        subject: Subject,
        until: Until,
    },
    /// A person ends an exception before its time.
    ExceptionRevoked {
        name: String,
    },
    /// Exceptions whose time is up, ended by the schedule.
    ExceptionExpired {
        names: Vec<String>,
    },
}

/// When an exception ends: at an instant, or a span after it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    At(Timestamp),
    AfterSecs(u64),
}

/// One member of a managed object that is no longer what phasegate last made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftChange {
    /// The object, as people know it (`compliance policy "Windows baseline"`).
    pub object: String,
    /// The member (`assignments`, `conditions.users.includeUsers`, ...).
    pub field: String,
    /// What phasegate last wrote or relied on.
    pub expected: String,
    pub found: String,
}

impl fmt::Display for DriftChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} → {}",
            self.object, self.field, self.expected, self.found
        )
    }
}

/// What a person chose when the tenant drifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftResolution {
    /// Write phasegate's members back as the rollout wants them.
    Reapply,
    /// Keep the other admin's values; phasegate stops managing the members that drifted.
    Adopt,
}

impl DriftResolution {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftResolution::Reapply => "reapply",
            DriftResolution::Adopt => "adopt",
        }
    }
}

/// A change the tenant holds until another administrator approves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRequest {
    /// The tenant's reference for the request (Intune: the approval code).
    pub reference: String,
    /// What the held write does, in words.
    pub summary: String,
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Start { .. } => "start",
            EventKind::BaselineCaptured { .. } => "baseline_captured",
            EventKind::Reconciled { .. } => "reconciled",
            EventKind::Observed { .. } => "observed",
            EventKind::Tick => "tick",
            EventKind::ApprovalGranted { .. } => "approval_granted",
            EventKind::ApprovalRejected { .. } => "approval_rejected",
            EventKind::ApprovalRefused { .. } => "approval_refused",
            EventKind::PauseRequested => "pause_requested",
            EventKind::ResumeRequested => "resume_requested",
            EventKind::RollbackRequested { .. } => "rollback_requested",
            EventKind::AbortRequested => "abort_requested",
            EventKind::ProviderFailed { .. } => "provider_failed",
            EventKind::PlanChanged { .. } => "plan_changed",
            EventKind::Delivered { .. } => "delivered",
            EventKind::DriftDetected { .. } => "drift_detected",
            EventKind::DriftResolved { .. } => "drift_resolved",
            EventKind::TenantApprovalPending { .. } => "tenant_approval_pending",
            EventKind::PlanChangeProposed { .. } => "plan_change_proposed",
            EventKind::PlanChangeApproved { .. } => "plan_change_approved",
            EventKind::PlanChangeRejected { .. } => "plan_change_rejected",
            EventKind::PlanFileChanged { .. } => "plan_file_changed",
            EventKind::FreezeOverridden => "freeze_overridden",
            EventKind::RecipientsResolved { .. } => "recipients_resolved",
            EventKind::NotificationDropped { .. } => "notification_dropped",
            EventKind::ApproversRead { .. } => "approvers_read",
            EventKind::ExceptionGranted { .. } => "exception_granted",
            EventKind::ExceptionRevoked { .. } => "exception_revoked",
            EventKind::ExceptionExpired { .. } => "exception_expired",
        }
    }
}

/// Names an effect durably: the sequence number of the event whose transition asked for it, and
/// its position among that transition's effects. Never random, so a retried effect carries the
/// same id (and idempotency key) as the first attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EffectId {
    pub seq: u64,
    pub index: u32,
}

impl fmt::Display for EffectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.seq, self.index)
    }
}

/// Where a notification goes: the settings of a channel's adapter, which only that adapter reads
/// (`crate::adapters`). Recorded whole with the effect, so a notification committed before a plan
/// change still goes where it was meant to.
///
/// On the wire the settings sit beside the effect's own fields, with the channel's kind under
/// `channel`; a webhook's has no `channel` key, so records written before channels had kinds
/// (`{"url", "secret_env", ...}`) read, and hash, exactly as they were written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChannelAddress(serde_json::Map<String, serde_json::Value>);

impl ChannelAddress {
    /// The kind of the first channel, whose records carry no kind.
    pub const WEBHOOK: &'static str = "webhook";
    const KIND: &'static str = "channel";

    pub fn new(kind: &str, mut settings: serde_json::Map<String, serde_json::Value>) -> Self {
        settings.remove(Self::KIND);
        if kind != Self::WEBHOOK {
            settings.insert(Self::KIND.into(), kind.into());
        }
        ChannelAddress(settings)
    }

    pub fn kind(&self) -> &str {
        self.0
            .get(Self::KIND)
            .and_then(serde_json::Value::as_str)
            .unwrap_or(Self::WEBHOOK)
    }

    /// The adapter's settings (without the kind).
    pub fn settings(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut settings = self.0.clone();
        settings.remove(Self::KIND);
        settings
    }
}

/// A change the machine wants made to the backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// Record the tenant's relevant configuration before the first change.
    CaptureBaseline,
    /// Bring the backend to this state, changing only what differs. `resolution` is a person's
    /// answer to drift the provider found, for this reconcile only.
    Reconcile {
        desired: DesiredState,
        #[serde(default)]
        resolution: Option<DriftResolution>,
        /// Requested while the rollout is paused, to change only the exemptions of its
        /// exceptions (nothing else was held back by the pause): it is carried out during the
        /// pause, so that an exception ends in the tenant at its time.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        during_pause: bool,
    },
    /// Put back exactly the configuration recorded by `CaptureBaseline`.
    RestoreBaseline,
    /// Tell a channel (a webhook) that the rollout entered `status`. Not idempotent by nature, so it goes
    /// through the outbox: committed with its transition, delivered at least once with the
    /// effect's durable id as idempotency key, and confirmed by a `Delivered` event.
    Notify {
        #[serde(flatten)]
        to: ChannelAddress,
        status: RolloutStatus,
        previous: RolloutStatus,
        reason: String,
        at: Timestamp,
        /// An announcement's words (`[[announcement]]`), rendered when its moment was
        /// committed; a `[[webhook]]` notification has none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<Message>,
    },
}

/// An announcement as rendered for its moment: the same words on every attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub moment: Moment,
    pub subject: String,
    pub text: String,
    /// The groups told, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The e-mail addresses told.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The phase the moment is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// For an e-mail to groups: their members, as the directory had them before the first
    /// attempt (`EventKind::RecipientsResolved`); `None` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Recipients>,
}

impl Effect {
    pub fn name(&self) -> &'static str {
        match self {
            Effect::CaptureBaseline => "capture_baseline",
            Effect::Reconcile { .. } => "reconcile",
            Effect::RestoreBaseline => "restore_baseline",
            Effect::Notify { .. } => "notify",
        }
    }

    /// Reconcile and restore both set the whole configuration, so a newer one replaces an older.
    pub fn sets_configuration(&self) -> bool {
        matches!(self, Effect::Reconcile { .. } | Effect::RestoreBaseline)
    }

    /// Outbox effects never hold up the rollout; configuration effects run strictly in order.
    pub fn is_notification(&self) -> bool {
        matches!(self, Effect::Notify { .. })
    }

    /// An `[[announcement]]`'s message: tried before any configuration effect, so the
    /// organisation hears of a change before it is made (one that cannot be delivered is left
    /// for later and holds nothing up).
    pub fn is_announcement(&self) -> bool {
        matches!(
            self,
            Effect::Notify {
                message: Some(_),
                ..
            }
        )
    }
}

/// An effect committed with its transition and not yet confirmed done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEffect {
    pub id: EffectId,
    pub effect: Effect,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification recorded before channels had kinds reads as a webhook's and serializes to
    /// the very same bytes, so the audit trail's hashes still verify.
    #[test]
    fn a_notification_recorded_before_channel_kinds_reads_and_hashes_the_same() {
        let old = r#"{"type":"notify","url":"https://hooks.example/x","secret_env":null,"status":"completed","previous":"running","reason":"done","at":1767600000000}"#;
        let effect: Effect = serde_json::from_str(old).unwrap();
        let Effect::Notify { to, status, .. } = &effect else {
            panic!("{effect:?}")
        };
        assert_eq!(to.kind(), ChannelAddress::WEBHOOK);
        assert_eq!(to.settings()["url"], "https://hooks.example/x");
        assert!(!to.settings().contains_key("type"), "{to:?}");
        assert_eq!(*status, RolloutStatus::Completed);
        assert_eq!(serde_json::to_string(&effect).unwrap(), old);
    }

    #[test]
    fn another_channel_kind_is_carried_with_its_address() {
        let mut settings = serde_json::Map::new();
        settings.insert("to".into(), "it@example.org".into());
        let address = ChannelAddress::new("email", settings);
        let effect = Effect::Notify {
            to: address.clone(),
            status: RolloutStatus::Held,
            previous: RolloutStatus::Running,
            reason: String::new(),
            at: Timestamp::from_millis(0),
            message: Some(Message {
                moment: Moment::Start,
                subject: "s".into(),
                text: "t".into(),
                groups: vec!["Pilot".into()],
                addresses: Vec::new(),
                phase: None,
                recipients: None,
            }),
        };
        let text = serde_json::to_string(&effect).unwrap();
        assert!(text.contains(r#""channel":"email""#), "{text}");
        let back: Effect = serde_json::from_str(&text).unwrap();
        assert_eq!(back, effect);
        let Effect::Notify { to, .. } = back else {
            unreachable!()
        };
        assert_eq!(to.kind(), "email");
        assert!(!to.settings().contains_key("channel"));
    }
}
