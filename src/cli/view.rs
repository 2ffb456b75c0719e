//! The JSON shapes of `--output json`. They are a contract for scripts and change pipelines, so
//! they are built here, separately from the domain types, and documented in `docs/cli.md`; add
//! fields freely, never rename or remove one.

use serde::{Deserialize, Serialize};

use crate::adapters;
use crate::domain::event::{Effect, EventKind};
use crate::domain::forecast;
use crate::domain::gate::{GateVerdict, Tally};
use crate::domain::machine;
use crate::domain::plan::{self, Diagnostic, Plan, PlanErrors, Platform, format_percent};
use crate::domain::rollout::{PhaseObservation, PhaseRecord, PhaseState, Rollout};
use crate::domain::signins::SignIns;
use crate::domain::time::{Timestamp, format_span};
use crate::store::EventRecord;

/// One plan's verdict, as `plan check --output json` lists them and `POST /api/v1/plans/check`
/// answers.
#[derive(Serialize)]
pub struct PlanCheckView {
    pub file: String,
    pub valid: bool,
    /// 0 when the plan is invalid.
    pub phases: usize,
    pub errors: Vec<FindingView>,
    /// What is valid but dangerous (empty when the plan is invalid: errors come first).
    pub warnings: Vec<FindingView>,
}

/// An error or warning at its place in the plan (line 0: the plan could not be read at all).
#[derive(Serialize)]
pub struct FindingView {
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// Why it matters (every warning, and an error that a strict check made of one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

fn findings(source: &str, diagnostics: &[Diagnostic]) -> Vec<FindingView> {
    diagnostics
        .iter()
        .map(|d| {
            let at = plan::position(source, d.span.start);
            FindingView {
                line: at.line,
                column: at.column,
                message: d.message.clone(),
                why: d.why.clone(),
            }
        })
        .collect()
}

pub fn plan_check(file: &str, source: &str, checked: &Result<Plan, PlanErrors>) -> PlanCheckView {
    match checked {
        Ok(plan) => PlanCheckView {
            file: file.to_string(),
            valid: true,
            phases: plan.phases.len(),
            errors: Vec::new(),
            warnings: findings(source, &plan.warnings),
        },
        Err(errors) => PlanCheckView {
            file: file.to_string(),
            valid: false,
            phases: 0,
            errors: findings(&errors.source, &errors.diagnostics),
            warnings: Vec::new(),
        },
    }
}

#[derive(Serialize)]
pub struct RolloutView {
    pub id: String,
    pub plan: String,
    pub plan_hash: String,
    pub status: String,
    pub reason: String,
    pub needs_attention: bool,
    pub current_phase: Option<String>,
    pub current_phases: Vec<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    pub events: u64,
    pub pending_effects: Vec<String>,
    /// What someone else changed, while the rollout waits for a person (`drifted`).
    pub drift: Vec<DriftView>,
    /// The write the tenant holds for another administrator's approval.
    pub tenant_approval: Option<TenantApprovalView>,
    /// A plan applied that weakens the plan in force, waiting for approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_change: Option<PlanChangeView>,
    /// The plan file holds a plan nobody applied; it is not adopted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_file_changed: Option<PlanFileView>,
    /// A promotion that is due waits for this freeze window to end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen: Option<FrozenView>,
    /// The plan's freeze windows, described.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub freeze_windows: Vec<String>,
    /// Active exceptions from enforcement.
    pub exceptions: Vec<ExceptionView>,
    /// The rollout's latest snapshot of each directory approver group (`[directory_approvers]`):
    /// approvals are judged against it, so how old it is matters.
    pub approver_snapshots: Vec<ApproverSnapshotView>,
    pub phases: Vec<PhaseView>,
}

/// A directory approver group as the rollout last read it, and how long ago (as of the
/// rollout's clock: a simulated tenant's, otherwise the last moment the tenant was heard from).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApproverSnapshotView {
    /// The approver group, as gates name it.
    pub group: String,
    /// The directory group it was read from.
    pub directory: String,
    /// Which directory said so.
    pub source: String,
    /// When it was read (RFC 3339).
    pub read_at: String,
    /// How long ago, in seconds and in words.
    pub age_seconds: u64,
    pub age: String,
    /// How many identities (principal names and mail addresses) it holds.
    pub members: usize,
    /// Why it could not be read: its approvals are refused while this is the latest.
    pub error: Option<String>,
}

/// The snapshots of the directory approver groups `groups` names (all of them with `None`).
pub fn approver_snapshots(
    rollout: &Rollout,
    groups: Option<&[String]>,
    now: Timestamp,
) -> Vec<ApproverSnapshotView> {
    rollout
        .approver_directory
        .iter()
        .filter(|(group, _)| groups.is_none_or(|g| g.contains(group)))
        .map(|(group, snapshot)| {
            let age = now.since(snapshot.read_at);
            ApproverSnapshotView {
                group: group.clone(),
                directory: snapshot.directory.clone(),
                source: snapshot.source.clone(),
                read_at: snapshot.read_at.rfc3339(),
                age_seconds: age.as_secs(),
                age: format_span(age),
                members: snapshot.members.len(),
                error: snapshot.error.clone(),
            }
        })
        .collect()
}

#[derive(Serialize)]
pub struct ExceptionView {
    pub name: String,
    /// `user` or `group`.
    pub kind: &'static str,
    /// The user's sign-in name or the group's name.
    pub subject: String,
    pub until: String,
    pub reason: String,
    pub granted_by: String,
    pub granted_at: String,
}

pub fn exception_view(exception: &crate::domain::rollout::Exception) -> ExceptionView {
    use crate::domain::rollout::Subject;
    let (kind, subject) = match &exception.subject {
        Subject::User(upn) => ("user", upn.clone()),
        Subject::Group(name) => ("group", name.clone()),
    };
    ExceptionView {
        name: exception.name.clone(),
        kind,
        subject,
        until: exception.until.rfc3339(),
        reason: exception.reason.clone(),
        granted_by: exception.granted_by.clone(),
        granted_at: exception.granted_at.rfc3339(),
    }
}

#[derive(Serialize)]
pub struct PlanChangeView {
    pub plan_hash: String,
    pub from_hash: String,
    pub by: String,
    pub at: String,
    pub weakens: Vec<String>,
    /// The phase whose approval rules decide it, and how many must approve.
    pub rules_of: String,
    pub required: usize,
    pub approvers: String,
    pub approved_by: Vec<String>,
}

#[derive(Serialize)]
pub struct PlanFileView {
    pub path: String,
    pub plan_hash: String,
    pub seen_at: String,
}

#[derive(Serialize)]
pub struct FrozenView {
    pub window: String,
    pub until: String,
    pub until_local: String,
    pub phases: Vec<String>,
}

#[derive(Serialize)]
pub struct DriftView {
    pub object: String,
    pub field: String,
    pub expected: String,
    pub found: String,
}

#[derive(Serialize)]
pub struct TenantApprovalView {
    pub reference: String,
    pub summary: String,
    pub since: String,
}

#[derive(Serialize)]
pub struct PhaseView {
    pub id: String,
    pub mode: String,
    pub state: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub after: Vec<String>,
    pub applied_at: Option<String>,
    pub soak_until: Option<String>,
    pub promoted_at: Option<String>,
    pub holds: u32,
    pub held_since: Option<String>,
    pub hold_expired: bool,
    pub approvals: ApprovalsView,
    pub observation: Option<ObservationView>,
    pub gate: Option<GateView>,
    /// What promoting the phase would do, from its latest observation: one forecast per phase
    /// the promotion starts.
    pub forecasts: Vec<ForecastView>,
    /// The forecast this run of the phase was started on.
    pub forecast: Option<ForecastView>,
    /// That forecast against the outcome, once the phase had soaked.
    pub forecast_check: Option<ForecastCheckView>,
    /// The digest an approval given now binds to (plan, phase, latest counts and forecasts);
    /// `None` before the phase's first observation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct ForecastView {
    /// The phase the promotion starts.
    pub phase: String,
    /// The phase whose promotion starts it.
    pub after: String,
    pub mode: String,
    pub at: String,
    pub devices: u64,
    /// Devices without a fresh report, whose impact is not known.
    pub unknown: u64,
    pub notified: AffectedView,
    pub blocked: AffectedView,
    pub blocked_at_once: u64,
    pub first_block: Option<String>,
    /// Told and blocked in the phase's scope already.
    pub before: ImpactView,
    pub summary: String,
}

#[derive(Serialize, Deserialize)]
pub struct AffectedView {
    pub devices: u64,
    pub users: u64,
    pub by_platform: Vec<CountView>,
    pub by_setting: Vec<CountView>,
    pub groups: Vec<CountView>,
}

/// A count of devices under a name (a platform, a setting, a group).
#[derive(Serialize, Deserialize)]
pub struct CountView {
    pub name: String,
    pub devices: u64,
}

#[derive(Serialize, Deserialize)]
pub struct ImpactView {
    pub notified_devices: u64,
    pub notified_users: u64,
    pub blocked_devices: u64,
    pub blocked_users: u64,
    pub reporting: u64,
}

#[derive(Serialize)]
pub struct ForecastCheckView {
    pub phase: String,
    pub forecast_at: String,
    pub at: String,
    pub reporting: u64,
    pub notified: ComparisonView,
    pub blocked: ComparisonView,
    /// The larger of the two errors, a fraction of the reporting devices.
    pub error: f64,
    pub summary: String,
}

#[derive(Serialize)]
pub struct ComparisonView {
    pub forecast_devices: u64,
    pub actual_devices: u64,
    pub forecast_users: u64,
    pub actual_users: u64,
    /// `|forecast - actual|` devices as a fraction of the reporting devices.
    pub error: f64,
}

fn counts(named: &[(String, u64)]) -> Vec<CountView> {
    named
        .iter()
        .map(|(name, devices)| CountView {
            name: name.clone(),
            devices: *devices,
        })
        .collect()
}

fn affected_view(a: &forecast::Affected) -> AffectedView {
    AffectedView {
        devices: a.devices,
        users: a.users,
        by_platform: a
            .by_platform
            .iter()
            .map(|(p, devices)| CountView {
                name: p.to_string(),
                devices: *devices,
            })
            .collect(),
        by_setting: counts(&a.by_setting),
        groups: counts(&a.groups),
    }
}

pub fn forecast_view(f: &forecast::Forecast) -> ForecastView {
    ForecastView {
        phase: f.phase.clone(),
        after: f.after.clone(),
        mode: f.mode.as_str().to_string(),
        at: f.at.rfc3339(),
        devices: f.devices,
        unknown: f.unknown,
        notified: affected_view(&f.notified),
        blocked: affected_view(&f.blocked),
        blocked_at_once: f.blocked_at_once,
        first_block: f.first_block.map(Timestamp::rfc3339),
        before: ImpactView {
            notified_devices: f.before.notified_devices,
            notified_users: f.before.notified_users,
            blocked_devices: f.before.blocked_devices,
            blocked_users: f.before.blocked_users,
            reporting: f.before.reporting,
        },
        summary: f.summary(),
    }
}

pub fn forecast_check_view(c: &forecast::ForecastCheck) -> ForecastCheckView {
    let comparison = |c: &forecast::Comparison| ComparisonView {
        forecast_devices: c.forecast_devices,
        actual_devices: c.actual_devices,
        forecast_users: c.forecast_users,
        actual_users: c.actual_users,
        error: c.error,
    };
    ForecastCheckView {
        phase: c.phase.clone(),
        forecast_at: c.forecast_at.rfc3339(),
        at: c.at.rfc3339(),
        reporting: c.reporting,
        notified: comparison(&c.notified),
        blocked: comparison(&c.blocked),
        error: c.error(),
        summary: c.summary(),
    }
}

/// A promotion waiting for approvals, as `phasegate approvals` lists them and
/// `GET /api/v1/approvals` answers.
#[derive(Serialize, Deserialize)]
pub struct PendingApprovalView {
    pub rollout: String,
    pub plan: String,
    pub status: String,
    pub phase: String,
    /// The gate passed and only approvals are missing (otherwise the phase still soaks or is
    /// held, and an approval given now counts once the gate passes on the evidence it saw).
    pub gate_passed: bool,
    pub required: u32,
    pub have: usize,
    pub approved_by: Vec<String>,
    /// The digest an approval given now binds to: the plan, the phase, the latest counts and
    /// the forecast below (`null` before the phase's first observation).
    pub digest: Option<String>,
    pub observation: Option<ObservationView>,
    pub gate: Option<GateView>,
    pub forecasts: Vec<ForecastView>,
    pub barred: Vec<BarredView>,
    pub note: Option<String>,
    /// The rollout's snapshots of the directory approver groups this phase asks, with their age.
    #[serde(default)]
    pub approver_snapshots: Vec<ApproverSnapshotView>,
}

/// Every phase of `rollout` that waits for approvals: running, asking for a quorum it does not
/// have yet.
pub fn pending_approvals(
    plan: &Plan,
    rollout: &Rollout,
    now: Timestamp,
) -> Vec<PendingApprovalView> {
    if !rollout.status.is_progressing()
        && rollout.status != crate::domain::rollout::RolloutStatus::Paused
    {
        return Vec::new();
    }
    plan.phases
        .iter()
        .zip(&rollout.phases)
        .filter(|(phase, record)| {
            phase.gate.approvals > 0
                && matches!(
                    record.state,
                    PhaseState::Soaking | PhaseState::AwaitingApproval
                )
                && record.approvals.len() < phase.gate.approvals as usize
        })
        .map(|(phase, record)| PendingApprovalView {
            rollout: rollout.id.clone(),
            plan: rollout.plan_name.clone(),
            status: rollout.status.as_str().to_string(),
            phase: phase.id.clone(),
            gate_passed: record.state == PhaseState::AwaitingApproval,
            required: phase.gate.approvals,
            have: record.approvals.len(),
            approved_by: record.approvals.iter().map(|a| a.by.clone()).collect(),
            digest: record.observation.as_ref().map(|o| {
                machine::evidence_digest(&rollout.plan_hash, &phase.id, &o.tally, &o.forecasts)
            }),
            observation: record
                .observation
                .as_ref()
                .map(|o| observation_with_platforms(o.at, &o.tally, &o.by_platform)),
            gate: record.verdict.as_ref().map(gate_view),
            forecasts: forecasts_of(record),
            barred: barred(plan, rollout, record),
            note: record.approval_note.clone(),
            approver_snapshots: approver_snapshots(
                rollout,
                Some(&phase.approval.directory_groups),
                now,
            ),
        })
        .collect()
}

fn forecasts_of(record: &PhaseRecord) -> Vec<ForecastView> {
    record
        .observation
        .iter()
        .flat_map(|o| &o.forecasts)
        .map(forecast_view)
        .collect()
}

#[derive(Serialize)]
pub struct ApprovalsView {
    /// The quorum: distinct people who must approve.
    pub required: u32,
    /// The approvals that count (expired ones are taken out, with an audit event).
    pub granted: Vec<ApprovalView>,
    /// How many of `required` are there.
    pub have: usize,
    /// Who may approve: `anyone` (with the approver role), or the people named and the groups'
    /// members.
    pub anyone: bool,
    pub eligible: Vec<String>,
    pub groups: Vec<String>,
    /// Who may not, by separation of duties, with why.
    pub barred: Vec<BarredView>,
    pub expires_after: Option<String>,
    pub ticket_required: bool,
    pub ticket_pattern: Option<String>,
    /// How far the evidence may move before an approval is void (`null`: not bound).
    pub evidence_tolerance: Option<String>,
    /// Why an approval stopped counting, while the rollout asks again.
    pub note: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct BarredView {
    pub who: String,
    pub why: String,
}

#[derive(Serialize)]
pub struct ApprovalView {
    pub by: String,
    pub at: String,
    pub ticket: Option<String>,
    pub comment: Option<String>,
    /// When it stops counting (never when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The observation it was given on, and the digest binding it to plan, phase and counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_observed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_digest: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct ObservationView {
    pub at: String,
    pub targeted: u64,
    pub reported: u64,
    pub compliant: u64,
    pub noncompliant: u64,
    pub in_grace: u64,
    pub errors: u64,
    pub conflicts: u64,
    pub unknown: u64,
    pub stale: u64,
    /// Who is blocked: from the sign-in log where it was read (users whose sign-ins the
    /// enforced policy failed in the window), otherwise the devices' estimate (noncompliant past
    /// grace under an enabled policy). `blocked_source` says which.
    pub blocked: u64,
    /// `sign_in_log` or `estimate`.
    pub blocked_source: String,
    /// The devices' estimate, always.
    pub blocked_devices_estimate: u64,
    /// The earliest end of a grace period among the phase's devices in grace: none of them is
    /// blocked before it.
    pub earliest_block: Option<String>,
    /// The same counts per platform, when the rollout manages several.
    pub by_platform: Vec<PlatformView>,
    /// What the sign-in log said, when the phase's criteria read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signins: Option<SignInsView>,
    /// Devices under the phase's policies without a primary user: not placed in any phase by
    /// user, so not in `targeted`, and reported here rather than dropped.
    #[serde(default)]
    pub userless: u64,
}

#[derive(Serialize, Deserialize)]
pub struct SignInsView {
    /// `observed` or `unavailable`.
    pub availability: String,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub signins: u64,
    pub users: u64,
    pub blocked: u64,
    pub would_block: u64,
    pub blocked_users: u64,
    pub affected_users: u64,
    /// The log held more than one observation reads: the counts are a lower bound.
    pub truncated: bool,
}

pub fn signins_view(signins: &SignIns) -> SignInsView {
    match signins {
        SignIns::Observed(t) => SignInsView {
            availability: "observed".into(),
            reason: None,
            since: Some(t.since.rfc3339()),
            until: Some(t.until.rfc3339()),
            signins: t.signins,
            users: t.users,
            blocked: t.blocked,
            would_block: t.would_block,
            blocked_users: t.blocked_users,
            affected_users: t.affected_users,
            truncated: t.truncated,
        },
        SignIns::Unavailable { reason } => SignInsView {
            availability: "unavailable".into(),
            reason: Some(reason.clone()),
            since: None,
            until: None,
            signins: 0,
            users: 0,
            blocked: 0,
            would_block: 0,
            blocked_users: 0,
            affected_users: 0,
            truncated: false,
        },
    }
}

/// A phase's observation as `status` shows it, `blocked` from the sign-in log where it was read.
pub fn phase_observation_view(o: &PhaseObservation) -> ObservationView {
    let mut view = observation_with_platforms(o.at, &o.tally, &o.by_platform);
    if let Some(tally) = o.signins.as_ref().and_then(SignIns::tally) {
        view.blocked = tally.blocked_users;
        view.blocked_source = "sign_in_log".into();
    }
    view.signins = o.signins.as_ref().map(signins_view);
    view.userless = o.userless;
    view
}

#[derive(Serialize, Deserialize)]
pub struct PlatformView {
    pub platform: String,
    pub targeted: u64,
    pub reported: u64,
    pub compliant: u64,
    pub noncompliant: u64,
    pub in_grace: u64,
    pub errors: u64,
    pub unknown: u64,
    pub stale: u64,
    pub blocked: u64,
    pub earliest_block: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct GateView {
    pub outcome: String,
    pub reasons: Vec<String>,
    pub evidence: EvidenceView,
}

#[derive(Serialize, Deserialize)]
pub struct EvidenceView {
    pub observed_at: String,
    pub noncompliant_ratio: Option<f64>,
    pub coverage: Option<f64>,
    pub failing: u64,
    pub reported: u64,
    pub targeted: u64,
    pub errors: u64,
    pub blocked: u64,
}

pub fn observation_view(at: Timestamp, tally: &Tally) -> ObservationView {
    observation_with_platforms(at, tally, &[])
}

pub fn observation_with_platforms(
    at: Timestamp,
    tally: &Tally,
    by_platform: &[(Platform, Tally)],
) -> ObservationView {
    ObservationView {
        earliest_block: tally.earliest_block.map(Timestamp::rfc3339),
        by_platform: by_platform
            .iter()
            .map(|(platform, t)| PlatformView {
                platform: platform.to_string(),
                targeted: t.targeted,
                reported: t.reported(),
                compliant: t.compliant,
                noncompliant: t.noncompliant,
                in_grace: t.in_grace,
                errors: t.errors,
                unknown: t.unknown,
                stale: t.stale,
                blocked: t.blocked,
                earliest_block: t.earliest_block.map(Timestamp::rfc3339),
            })
            .collect(),
        at: at.rfc3339(),
        targeted: tally.targeted,
        reported: tally.reported(),
        compliant: tally.compliant,
        noncompliant: tally.noncompliant,
        in_grace: tally.in_grace,
        errors: tally.errors,
        conflicts: tally.conflicts,
        unknown: tally.unknown,
        stale: tally.stale,
        blocked: tally.blocked,
        blocked_source: "estimate".into(),
        blocked_devices_estimate: tally.blocked,
        signins: None,
        userless: 0,
    }
}

pub fn gate_view(verdict: &GateVerdict) -> GateView {
    let tally = &verdict.evidence.tally;
    GateView {
        outcome: verdict.outcome.as_str().to_string(),
        reasons: verdict.reasons.clone(),
        evidence: EvidenceView {
            observed_at: verdict.evidence.observed_at.rfc3339(),
            noncompliant_ratio: verdict.evidence.noncompliant_ratio,
            coverage: verdict.evidence.coverage,
            failing: tally.failing(),
            reported: tally.reported(),
            targeted: tally.targeted,
            errors: tally.errors,
            blocked: tally.blocked,
        },
    }
}

/// `now` is the rollout's clock, for the age of what it read (see [`ApproverSnapshotView`]).
pub fn rollout_view(plan: &Plan, rollout: &Rollout, now: Timestamp) -> RolloutView {
    let current: Vec<String> = rollout
        .current_phases()
        .into_iter()
        .map(str::to_string)
        .collect();
    RolloutView {
        id: rollout.id.clone(),
        plan: rollout.plan_name.clone(),
        plan_hash: rollout.plan_hash.clone(),
        status: rollout.status.as_str().to_string(),
        reason: rollout.reason.clone(),
        needs_attention: rollout.status.needs_attention(),
        current_phase: current.first().cloned(),
        current_phases: current,
        created_by: rollout.created_by.clone(),
        created_at: rollout.created_at.rfc3339(),
        updated_at: rollout.updated_at.rfc3339(),
        events: rollout.last_seq,
        pending_effects: rollout
            .pending
            .iter()
            .map(|p| format!("{} {}", p.effect.name(), p.id))
            .collect(),
        drift: rollout
            .drift
            .iter()
            .map(|c| DriftView {
                object: c.object.clone(),
                field: c.field.clone(),
                expected: c.expected.clone(),
                found: c.found.clone(),
            })
            .collect(),
        tenant_approval: rollout.tenant_approval.as_ref().map(|(request, since)| {
            TenantApprovalView {
                reference: request.reference.clone(),
                summary: request.summary.clone(),
                since: since.rfc3339(),
            }
        }),
        plan_change: rollout.plan_change.as_ref().map(|change| {
            let rules = crate::domain::machine::plan_change_rules(plan, rollout);
            let phase = &plan.phases[rules];
            PlanChangeView {
                plan_hash: change.plan_hash.clone(),
                from_hash: change.from_hash.clone(),
                by: change.by.clone(),
                at: change.at.rfc3339(),
                weakens: change.weakens.clone(),
                rules_of: phase.id.clone(),
                required: (phase.gate.approvals as usize).max(1),
                approvers: phase.approval.who(),
                approved_by: change.approvals.iter().map(|a| a.by.clone()).collect(),
            }
        }),
        plan_file_changed: rollout.plan_file.as_ref().map(|f| PlanFileView {
            path: f.path.clone(),
            plan_hash: f.plan_hash.clone(),
            seen_at: f.seen_at.rfc3339(),
        }),
        frozen: rollout.freeze.as_ref().map(|f| FrozenView {
            window: f.window.clone(),
            until: f.until.rfc3339(),
            until_local: f.until_local.clone(),
            phases: f.phases.clone(),
        }),
        freeze_windows: plan.freezes.iter().map(ToString::to_string).collect(),
        exceptions: rollout.exceptions.iter().map(exception_view).collect(),
        approver_snapshots: approver_snapshots(rollout, None, now),
        phases: plan
            .phases
            .iter()
            .zip(&rollout.phases)
            .map(|(phase, record)| PhaseView {
                id: phase.id.clone(),
                mode: phase.mode.as_str().to_string(),
                state: record.state.as_str().to_string(),
                include: phase.include.clone(),
                exclude: phase.exclude.clone(),
                after: phase
                    .after
                    .iter()
                    .map(|&i| plan.phases[i].id.clone())
                    .collect(),
                applied_at: record.applied_at.map(Timestamp::rfc3339),
                soak_until: record
                    .applied_at
                    .filter(|_| record.state != PhaseState::Promoted)
                    .map(|at| at.plus(phase.min_soak).rfc3339()),
                promoted_at: record.promoted_at.map(Timestamp::rfc3339),
                holds: record.holds,
                held_since: record.held_since.map(Timestamp::rfc3339),
                hold_expired: record.hold_expired,
                approvals: approvals_view(plan, rollout, phase, record),
                observation: record.observation.as_ref().map(phase_observation_view),
                gate: record.verdict.as_ref().map(gate_view),
                forecasts: if record.state.is_current() {
                    forecasts_of(record)
                } else {
                    Vec::new()
                },
                forecast: record.forecast.as_ref().map(forecast_view),
                forecast_check: record.forecast_check.as_ref().map(forecast_check_view),
                digest: record
                    .observation
                    .as_ref()
                    .filter(|_| record.state.is_current())
                    .map(|o| {
                        machine::evidence_digest(
                            &rollout.plan_hash,
                            &phase.id,
                            &o.tally,
                            &o.forecasts,
                        )
                    }),
            })
            .collect(),
    }
}

/// The keys under which an event record holds instants. The store keeps milliseconds (exact,
/// and able to say "never" with a saturated deadline); JSON output writes them as RFC 3339, as
/// `status` and the watch stream do.
const TIME_KEYS: [&str; 5] = [
    "at",
    "recorded_at",
    "earliest_block",
    "forecast_at",
    "first_block",
];

/// An audit trail as `history --output json` and the API show it: the records as stored (see
/// `audit_trail`), every instant in RFC 3339.
pub fn history_json(events: &[EventRecord]) -> serde_json::Value {
    let mut json = serde_json::to_value(events).unwrap_or_default();
    map_times(&mut json, &|value| {
        value
            .as_i64()
            .map(|millis| serde_json::Value::from(Timestamp::from_millis(millis).rfc3339()))
    });
    json
}

/// The records back from `history_json` (a daemon's answer), to render as text. Times come back
/// to the second.
pub fn history_records(mut json: serde_json::Value) -> Result<Vec<EventRecord>, String> {
    map_times(&mut json, &|value| {
        value
            .as_str()
            .and_then(Timestamp::parse_rfc3339)
            .map(|t| serde_json::Value::from(t.as_millis()))
    });
    serde_json::from_value(json).map_err(|e| e.to_string())
}

fn map_times(
    json: &mut serde_json::Value,
    convert: &dyn Fn(&serde_json::Value) -> Option<serde_json::Value>,
) {
    match json {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if TIME_KEYS.contains(&key.as_str())
                    && let Some(converted) = convert(value)
                {
                    *value = converted;
                } else {
                    map_times(value, convert);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                map_times(item, convert);
            }
        }
        _ => {}
    }
}

/// A phase's approvals: the quorum, those that count, who may give one and who may not.
fn approvals_view(
    plan: &Plan,
    rollout: &Rollout,
    phase: &plan::Phase,
    record: &PhaseRecord,
) -> ApprovalsView {
    let policy = &phase.approval;
    ApprovalsView {
        required: phase.gate.approvals,
        granted: record
            .approvals
            .iter()
            .map(|a| ApprovalView {
                by: a.by.clone(),
                at: a.at.rfc3339(),
                ticket: a.ticket.clone(),
                comment: a.comment.clone(),
                expires_at: a.expires_at.map(Timestamp::rfc3339),
                evidence_observed_at: a.evidence.as_ref().map(|e| e.observed_at.rfc3339()),
                evidence_digest: a.evidence.as_ref().map(|e| e.digest.clone()),
            })
            .collect(),
        have: record.approvals.len(),
        anyone: !policy.names_approvers(),
        eligible: policy.eligible.iter().cloned().collect(),
        groups: policy.groups.clone(),
        barred: barred(plan, rollout, record),
        expires_after: policy.expires_after.map(format_span),
        ticket_required: policy.require_ticket || policy.ticket_pattern.is_some(),
        ticket_pattern: policy
            .ticket_pattern
            .as_ref()
            .map(|p| p.as_str().to_string()),
        evidence_tolerance: policy.evidence_tolerance.map(|t| t.to_string()),
        note: record.approval_note.clone(),
    }
}

/// The people separation of duties keeps from approving a phase, with why.
pub fn barred(plan: &Plan, rollout: &Rollout, record: &PhaseRecord) -> Vec<BarredView> {
    let mut people = vec![plan::identity_key(&rollout.created_by)];
    people.extend(record.requested_by.iter().cloned());
    people.extend(plan.author.iter().cloned());
    let mut seen = Vec::new();
    people
        .into_iter()
        .filter(|who| {
            let fresh = !seen.contains(who);
            seen.push(who.clone());
            fresh
        })
        .filter_map(|who| {
            machine::conflict_of_duties(plan, rollout, record, &who).map(|why| BarredView {
                why: why.to_string(),
                who,
            })
        })
        .collect()
}

/// The audit trail as it is shown — `history` (text and JSON), the API, the dashboard: every
/// notification's address masked by its channel's adapter (a webhook's URL through
/// `notifier::redact_url`), and each credential it carried masked wherever the trail's text
/// repeats it (delivery reasons recorded before they were redacted). The records keep their
/// stored hashes: `history --verify` checks the store, not this copy.
pub fn audit_trail(mut events: Vec<EventRecord>) -> Vec<EventRecord> {
    // (as stored, as shown) for every setting the redaction changed.
    let mut masks: Vec<(String, String)> = Vec::new();
    for record in &mut events {
        for pending in &mut record.effects {
            let Effect::Notify { to, .. } = &mut pending.effect else {
                continue;
            };
            let shown = adapters::redacted_channel(to);
            let kept = shown.settings();
            for (key, value) in to.settings() {
                let Some(stored) = value.as_str().filter(|v| !v.is_empty()) else {
                    continue;
                };
                let masked = kept.get(&key).and_then(serde_json::Value::as_str);
                if masked != Some(stored) && !masks.iter().any(|(s, _)| s == stored) {
                    masks.push((stored.to_string(), masked.unwrap_or("***").to_string()));
                }
            }
            *to = shown;
        }
    }
    // The longest first, so that a URL extending another is masked whole.
    masks.sort_by_key(|(stored, _)| std::cmp::Reverse(stored.len()));
    let mask = |text: &mut String| {
        for (stored, shown) in &masks {
            if text.contains(stored.as_str()) {
                *text = text.replace(stored.as_str(), shown);
            }
        }
    };
    for record in &mut events {
        mask(&mut record.event.trigger.reason);
        mask(&mut record.reason);
        for note in &mut record.notes {
            mask(note);
        }
        if let EventKind::ProviderFailed { error, .. } = &mut record.event.kind {
            mask(error);
        }
    }
    events
}

/// One line of a tally for people: `targeted 5,012  reported 4,870  noncompliant 212 (4.35%)  blocked 0`.
pub fn tally_line(tally: &Tally) -> String {
    format!(
        "targeted {}  reported {}  noncompliant {} ({})  blocked {}",
        thousands(tally.targeted),
        thousands(tally.reported()),
        thousands(tally.failing()),
        tally
            .noncompliant_ratio()
            .map_or_else(|| "-".to_string(), format_percent),
        thousands(tally.blocked)
    )
}

pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `+3d 04:00` since `start`.
pub fn elapsed(start: Timestamp, at: Timestamp) -> String {
    let span = at.since(start).as_secs();
    format!(
        "+{}d {:02}:{:02}",
        span / 86_400,
        (span / 3600) % 24,
        (span / 60) % 60
    )
}

pub fn span(start: Timestamp, end: Timestamp) -> String {
    format_span(end.since(start))
}

/// A one-line summary of an audit-trail entry.
/// Text from outside (names, reasons, comments, tickets, what a tenant answered) as it may be
/// written to a terminal or a log line: control characters, line breaks and bidirectional
/// overrides are written as escapes (`\n`, `\u{1b}`), so such text can neither forge a line of
/// `history` nor send escape sequences to the terminal.
pub struct Text<'a>(pub &'a str);

impl std::fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || is_bidi_control(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Characters that reorder how a line is displayed (Trojan Source, CVE-2021-42574).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}')
}

pub fn event_line(record: &EventRecord) -> String {
    let trigger = &record.event.trigger;
    let who = if trigger.reason.is_empty() {
        format!("{} {}", trigger.source.as_str(), Text(&trigger.actor))
    } else {
        format!(
            "{} {}: {}",
            trigger.source.as_str(),
            Text(&trigger.actor),
            Text(&trigger.reason)
        )
    };
    let status = if record.previous_status == record.status {
        record.status.as_str().to_string()
    } else {
        format!("{} → {}", record.previous_status, record.status)
    };
    format!(
        "#{:<4} {}  {:<18} {:<30} [{}] {}",
        record.seq,
        record.at.rfc3339(),
        record.event.kind.name(),
        who,
        status,
        &record.hash[..record.hash.len().min(8)]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{
        ChannelAddress, EffectId, Event, PendingEffect, Trigger, TriggerSource,
    };
    use crate::domain::rollout::RolloutStatus;

    #[test]
    fn text_from_outside_cannot_break_a_line_or_reach_the_terminal_raw() {
        assert_eq!(Text("alice").to_string(), "alice");
        assert_eq!(Text("Zoë — 5%").to_string(), "Zoë — 5%");
        assert_eq!(
            Text("ok\n#9    2026-01-01T00:00:00Z  approval_granted").to_string(),
            "ok\\n#9    2026-01-01T00:00:00Z  approval_granted"
        );
        assert_eq!(
            Text("\u{1b}[2J\u{1b}]0;x\u{7}").to_string(),
            "\\u{1b}[2J\\u{1b}]0;x\\u{7}"
        );
        assert_eq!(Text("a\u{202e}b").to_string(), "a\\u{202e}b");
        assert_eq!(Text("tab\there\r").to_string(), "tab\\there\\r");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn elapsed_time_reads_as_days_and_clock() {
        let start = Timestamp::from_millis(0);
        let at = Timestamp::from_millis(((3 * 24 + 4) * 3600 + 30 * 60) * 1000);
        assert_eq!(elapsed(start, at), "+3d 04:30");
    }

    fn record(seq: u64, kind: EventKind, reason: &str, effects: Vec<PendingEffect>) -> EventRecord {
        EventRecord {
            seq,
            at: Timestamp::from_millis(0),
            recorded_at: Timestamp::from_millis(0),
            event: Event {
                kind,
                trigger: Trigger::new(TriggerSource::Internal, "outbox", reason),
            },
            previous_status: RolloutStatus::Running,
            status: RolloutStatus::Held,
            reason: "held".into(),
            notes: vec![format!("note {seq}")],
            effects,
            impact: Vec::new(),
            prev_hash: String::new(),
            hash: format!("hash-{seq}"),
        }
    }

    #[test]
    fn history_json_writes_every_instant_as_status_does_and_reads_back() {
        let mut settings = serde_json::Map::new();
        settings.insert("url".into(), "https://h.example/in".into());
        let notify = PendingEffect {
            id: EffectId { seq: 1, index: 0 },
            effect: Effect::Notify {
                to: ChannelAddress::new(ChannelAddress::WEBHOOK, settings),
                status: RolloutStatus::Held,
                previous: RolloutStatus::Running,
                reason: "gate failed".into(),
                at: Timestamp::from_millis(1_767_600_000_000),
                message: None,
            },
        };
        let trail = vec![record(1, EventKind::Tick, "", vec![notify])];
        let json = history_json(&trail);
        let entry = &json[0];
        assert_eq!(entry["seq"], 1, "other numbers stay numbers");
        assert_eq!(entry["at"], trail[0].at.rfc3339());
        assert_eq!(entry["recorded_at"], trail[0].recorded_at.rfc3339());
        assert_eq!(entry["effects"][0]["effect"]["at"], "2026-01-05T08:00:00Z");
        let back = history_records(json).unwrap();
        assert_eq!(back, trail, "instants on whole seconds come back exactly");
    }

    /// A trail recorded before redaction: the address with the effect, and in the delivery's
    /// reason.
    #[test]
    fn the_trail_is_shown_with_webhook_credentials_masked() {
        let stored = "https://hooks:hunter2@h.example/in?token=tok-1";
        let mut settings = serde_json::Map::new();
        settings.insert("url".into(), stored.into());
        let effect = EffectId { seq: 1, index: 0 };
        let trail = vec![
            record(
                1,
                EventKind::Tick,
                "",
                vec![PendingEffect {
                    id: effect,
                    effect: Effect::Notify {
                        to: ChannelAddress::new(ChannelAddress::WEBHOOK, settings),
                        status: RolloutStatus::Held,
                        previous: RolloutStatus::Running,
                        reason: "gate failed".into(),
                        at: Timestamp::from_millis(0),
                        message: None,
                    },
                }],
            ),
            record(
                2,
                EventKind::Delivered {
                    effect,
                    status: 200,
                },
                &format!("{stored} answered 200"),
                Vec::new(),
            ),
        ];
        let shown = audit_trail(trail.clone());
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("tok-1"),
            "{text}"
        );
        let Effect::Notify { to, reason, .. } = &shown[0].effects[0].effect else {
            unreachable!()
        };
        assert_eq!(to.settings()["url"], "https://***@h.example/in?token=***");
        assert_eq!(reason, "gate failed");
        assert_eq!(
            shown[1].event.trigger.reason,
            "https://***@h.example/in?token=*** answered 200"
        );
        // Everything else as recorded, hashes included.
        for (shown, stored) in shown.iter().zip(&trail) {
            assert_eq!(shown.hash, stored.hash);
            assert_eq!(shown.notes, stored.notes);
            assert_eq!(shown.reason, stored.reason);
        }
    }
}
