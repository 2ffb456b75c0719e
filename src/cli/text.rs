//! Text renderings for people: tables for plans and rollouts, the audit trail, Graphviz.

use std::fmt::Write;

use petgraph::dot::{Config, Dot};
use serde::Serialize;

use super::view::{self, Text, elapsed};
use crate::domain::plan::{Gate, Plan, RollbackWhen};
use crate::domain::rollout::Rollout;
use crate::domain::signins::SignIns;
use crate::domain::time::{Timestamp, format_span};
use crate::engine::Loaded;
use crate::store::EventRecord;

fn gate_summary(gate: &Gate) -> String {
    let mut parts = Vec::new();
    if let Some(max) = gate.max_noncompliant_ratio {
        parts.push(format!("noncompliant ≤ {max}"));
    }
    if let Some(max) = gate.max_noncompliant {
        parts.push(format!("noncompliant ≤ {max} devices"));
    }
    if let Some(min) = gate.min_reporting {
        parts.push(format!("reporting ≥ {min}"));
    }
    if let Some(max) = gate.max_errors {
        parts.push(format!("errors ≤ {max}"));
    }
    if let Some(max) = gate.max_error_ratio {
        parts.push(format!("errors ≤ {max}"));
    }
    if let Some(max) = gate.max_blocked_signins {
        parts.push(format!("blocked sign-ins ≤ {max}"));
    }
    if let Some(max) = gate.max_blocked_signin_ratio {
        parts.push(format!("users blocked signing in ≤ {max}"));
    }
    if gate.approvals > 0 {
        parts.push(format!(
            "{} approval{}",
            gate.approvals,
            if gate.approvals == 1 { "" } else { "s" }
        ));
    }
    if parts.is_empty() {
        "data only".to_string()
    } else {
        parts.join(", ")
    }
}

fn rollback_summary(rollback: &RollbackWhen) -> String {
    let mut parts = Vec::new();
    if let Some(r) = rollback.noncompliant_ratio_above {
        parts.push(format!("noncompliant > {r}"));
    }
    if let Some(n) = rollback.noncompliant_above {
        parts.push(format!("noncompliant > {n} devices"));
    }
    if let Some(n) = rollback.errors_above {
        parts.push(format!("errors > {n}"));
    }
    if let Some(n) = rollback.blocked_signins_above {
        parts.push(format!("blocked sign-ins > {n}"));
    }
    if let Some(r) = rollback.blocked_signin_ratio_above {
        parts.push(format!("users blocked signing in > {r}"));
    }
    if let Some(r) = rollback.blocked_ratio_above {
        parts.push(format!("blocked > {r}"));
    }
    parts.join(", ")
}

pub fn plan_table(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "plan {} ({} phases)", plan.name, plan.phases.len());
    if !plan.description.is_empty() {
        let _ = writeln!(out, "  {}", Text(&plan.description));
    }
    let policies: Vec<String> = plan
        .policy
        .compliance
        .iter()
        .map(|c| format!("{} ({})", c.name, c.platform))
        .collect();
    let _ = writeln!(
        out,
        "  policy: {}{}",
        policies.join(", "),
        plan.policy
            .conditional_access
            .as_ref()
            .map(|ca| format!(", Conditional Access: {ca}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  provider: {}, observed every {}",
        plan.provider.kind,
        format_span(plan.observe_every)
    );
    let _ = writeln!(out);
    for (n, &idx) in plan.order.iter().enumerate() {
        let phase = &plan.phases[idx];
        let after: Vec<&str> = phase
            .after
            .iter()
            .map(|&i| plan.phases[i].id.as_str())
            .collect();
        let _ = writeln!(out, "{}. {} [{}]", n + 1, phase.id, phase.mode);
        if !phase.description.is_empty() {
            let _ = writeln!(out, "     {}", Text(&phase.description));
        }
        let exclude = if phase.exclude.is_empty() {
            String::new()
        } else {
            format!(" except {}", phase.exclude.join(", "))
        };
        let _ = writeln!(out, "     scope: {}{exclude}", phase.include.join(", "));
        if !after.is_empty() {
            let _ = writeln!(out, "     after: {}", after.join(", "));
        }
        let grace = phase
            .grace
            .map(|g| format!(", grace {}", format_span(g)))
            .unwrap_or_default();
        let _ = writeln!(out, "     soak: {}{grace}", format_span(phase.min_soak));
        let _ = writeln!(
            out,
            "     gate: {} (stale after {}, hold up to {})",
            gate_summary(&phase.gate),
            format_span(phase.gate.stale_after),
            format_span(phase.gate.max_hold)
        );
        if !phase.rollback_when.is_empty() {
            let _ = writeln!(
                out,
                "     rollback when: {}",
                rollback_summary(&phase.rollback_when)
            );
        }
    }
    out
}

pub fn plan_dot(plan: &Plan) -> String {
    let graph = plan.graph();
    format!("{:?}\n", Dot::with_config(&graph, &[Config::EdgeNoLabel]))
}

#[derive(Serialize)]
pub struct PlanJson {
    name: String,
    description: String,
    hash: String,
    /// The first policy's name and platform (kept for scripts written for one-policy plans).
    policy: String,
    platform: String,
    policies: Vec<PolicyJson>,
    conditional_access: Option<String>,
    emergency_access: EmergencyJson,
    provider: String,
    observe_every_secs: u64,
    order: Vec<String>,
    phases: Vec<PhaseJson>,
}

#[derive(Serialize)]
struct PolicyJson {
    name: String,
    platform: String,
}

#[derive(Serialize)]
struct EmergencyJson {
    groups: Vec<String>,
    users: Vec<String>,
}

#[derive(Serialize)]
struct PhaseJson {
    id: String,
    mode: String,
    include: Vec<String>,
    exclude: Vec<String>,
    after: Vec<String>,
    min_soak_secs: u64,
    grace_secs: Option<u64>,
    gate: String,
    rollback_when: String,
}

pub fn plan_json(plan: &Plan) -> PlanJson {
    PlanJson {
        name: plan.name.clone(),
        description: plan.description.clone(),
        hash: plan.hash.clone(),
        policy: plan.policy.compliance[0].name.clone(),
        platform: plan.policy.compliance[0].platform.to_string(),
        policies: plan
            .policy
            .compliance
            .iter()
            .map(|c| PolicyJson {
                name: c.name.clone(),
                platform: c.platform.to_string(),
            })
            .collect(),
        conditional_access: plan.policy.conditional_access.clone(),
        emergency_access: EmergencyJson {
            groups: plan.emergency_access.groups.clone(),
            users: plan.emergency_access.users.clone(),
        },
        provider: plan.provider.kind.clone(),
        observe_every_secs: plan.observe_every.as_secs(),
        order: plan
            .order
            .iter()
            .map(|&i| plan.phases[i].id.clone())
            .collect(),
        phases: plan
            .phases
            .iter()
            .map(|p| PhaseJson {
                id: p.id.clone(),
                mode: p.mode.to_string(),
                include: p.include.clone(),
                exclude: p.exclude.clone(),
                after: p.after.iter().map(|&i| plan.phases[i].id.clone()).collect(),
                min_soak_secs: p.min_soak.as_secs(),
                grace_secs: p.grace.map(|g| g.as_secs()),
                gate: gate_summary(&p.gate),
                rollback_when: rollback_summary(&p.rollback_when),
            })
            .collect(),
    }
}

/// `now` is the rollout's clock, for the age of the approver groups' snapshots.
pub fn rollout_detail(plan: &Plan, rollout: &Rollout, now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  (plan {}, started by {} at {})",
        rollout.id,
        rollout.status,
        rollout.plan_name,
        Text(&rollout.created_by),
        rollout.created_at
    );
    let _ = writeln!(out, "  {}", Text(&rollout.reason));
    if !rollout.pending.is_empty() {
        let effects: Vec<String> = rollout
            .pending
            .iter()
            .map(|p| format!("{} {}", p.effect.name(), p.id))
            .collect();
        let _ = writeln!(out, "  pending: {}", effects.join(", "));
    }
    for change in &rollout.drift {
        let _ = writeln!(
            out,
            "  drift: {} {}: expected {}, found {}",
            Text(&change.object),
            Text(&change.field),
            Text(&change.expected),
            Text(&change.found)
        );
    }
    if let Some((request, since)) = &rollout.tenant_approval {
        let _ = writeln!(
            out,
            "  held by the tenant since {since}: {} (Multi Admin Approval request {})",
            Text(&request.summary),
            Text(&request.reference)
        );
    }
    if let Some(hold) = &rollout.freeze {
        let _ = writeln!(
            out,
            "  frozen: freeze window `{}` holds the promotion of `{}` until {} ({})",
            Text(&hold.window),
            hold.phases.join("`, `"),
            hold.until,
            hold.until_local
        );
    }
    for exception in &rollout.exceptions {
        let _ = writeln!(
            out,
            "  exception `{}`: {} exempt from enforcement until {} (granted by {}: {})",
            Text(&exception.name),
            Text(&exception.subject.to_string()),
            exception.until,
            Text(&exception.granted_by),
            Text(&exception.reason)
        );
    }
    for snapshot in view::approver_snapshots(rollout, None, now) {
        out.push_str(&snapshot_line(&snapshot));
    }
    if let Some(change) = &rollout.plan_change {
        let short = crate::domain::machine::short_hash;
        let approved: Vec<&str> = change.approvals.iter().map(|a| a.by.as_str()).collect();
        let _ = writeln!(
            out,
            "  plan change waiting for approval: plan {} applied by {} at {} in place of {} (approved by {}); it weakens: {}",
            short(&change.plan_hash),
            Text(&change.by),
            change.at,
            short(&change.from_hash),
            if approved.is_empty() {
                "nobody yet".to_string()
            } else {
                approved.join(", ")
            },
            Text(&change.weakens.join("; "))
        );
    }
    if let Some(file) = &rollout.plan_file {
        let _ = writeln!(
            out,
            "  warning: the plan file {} was changed outside phasegate (plan {}, seen {}); it is not adopted: `phasegate plan apply {} FILE --by NAME`",
            Text(&file.path),
            crate::domain::machine::short_hash(&file.plan_hash),
            file.seen_at,
            rollout.id
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<14} {:<8} {:<18} {:>9} {:>9} {:>18} {:>8}  GATE",
        "PHASE", "MODE", "STATE", "TARGETED", "REPORTED", "NONCOMPLIANT", "BLOCKED"
    );
    for (phase, record) in plan.phases.iter().zip(&rollout.phases) {
        let (targeted, reported, noncompliant, blocked) = match &record.observation {
            Some(o) => (
                view::thousands(o.tally.targeted),
                view::thousands(o.tally.reported()),
                format!(
                    "{} ({})",
                    view::thousands(o.tally.failing()),
                    o.tally
                        .noncompliant_ratio()
                        .map_or("-".to_string(), crate::domain::plan::format_percent)
                ),
                match o.signins.as_ref().and_then(SignIns::tally) {
                    Some(seen) => view::thousands(seen.blocked_users),
                    None => view::thousands(o.tally.blocked),
                },
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let gate = match &record.verdict {
            Some(v) if v.outcome == crate::domain::gate::GateOutcome::Pass => "pass".to_string(),
            Some(v) => format!("{}: {}", v.outcome.as_str(), v.reasons.join("; ")),
            None => "-".to_string(),
        };
        let approvals = if phase.gate.approvals > 0 {
            format!(
                "  [approvals {}/{}]",
                record.approvals.len(),
                phase.gate.approvals
            )
        } else {
            String::new()
        };
        let watched = matches!(
            record.state,
            crate::domain::rollout::PhaseState::Soaking
                | crate::domain::rollout::PhaseState::AwaitingApproval
        );
        let _ = writeln!(
            out,
            "{:<14} {:<8} {:<18} {:>9} {:>9} {:>18} {:>8}  {gate}{approvals}",
            phase.id,
            phase.mode.as_str(),
            record.state.as_str(),
            targeted,
            reported,
            noncompliant,
            blocked
        );
        if phase.gate.approvals > 0 && watched {
            out.push_str(&approval_lines(plan, rollout, phase, record));
        }
        let Some(observation) = &record.observation else {
            continue;
        };
        match &observation.signins {
            Some(SignIns::Observed(t)) => {
                let _ = writeln!(
                    out,
                    "{:<14} sign-ins since {}: {} by {} users; blocked {} ({} users, the BLOCKED column), would be blocked {}{}",
                    "",
                    t.since,
                    view::thousands(t.signins),
                    view::thousands(t.users),
                    view::thousands(t.blocked),
                    view::thousands(t.blocked_users),
                    view::thousands(t.would_block),
                    if t.truncated { " (at least)" } else { "" }
                );
            }
            Some(SignIns::Unavailable { reason }) => {
                let _ = writeln!(
                    out,
                    "{:<14} sign-ins not available: {reason}; BLOCKED is the devices' estimate",
                    ""
                );
            }
            None => {}
        }
        if let Some(at) = observation.tally.earliest_block {
            let _ = writeln!(
                out,
                "{:<14} {} in grace; none of them is blocked before {at}",
                "",
                view::thousands(observation.tally.in_grace)
            );
        }
        if observation.userless > 0 {
            let _ = writeln!(
                out,
                "{:<14} {} devices without a primary user under the policy (in no phase by user)",
                "",
                view::thousands(observation.userless)
            );
        }
        for (platform, tally) in &observation.by_platform {
            let _ = writeln!(out, "{:<14} {platform}: {}", "", view::tally_line(tally));
        }
        if watched {
            for forecast in &observation.forecasts {
                out.push_str(&forecast_lines(&view::forecast_view(forecast), 15));
            }
        }
        if let Some(check) = &record.forecast_check {
            let _ = writeln!(out, "{:<14} {}", "", Text(&check.summary()));
        }
    }
    out
}

/// A forecast as lines indented by `indent`: the summary, then who is affected by platform,
/// failing setting and group.
pub fn forecast_lines(forecast: &view::ForecastView, indent: usize) -> String {
    let mut out = String::new();
    let pad = " ".repeat(indent);
    let _ = writeln!(out, "{pad}{}", Text(&forecast.summary));
    let named = |list: &[view::CountView]| {
        list.iter()
            .map(|c| format!("{} {}", Text(&c.name), view::thousands(c.devices)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (what, affected) in [
        ("notified", &forecast.notified),
        ("blocked", &forecast.blocked),
    ] {
        if affected.devices == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "{pad}  {what} by platform: {}",
            named(&affected.by_platform)
        );
        if !affected.by_setting.is_empty() {
            let _ = writeln!(
                out,
                "{pad}  {what} by failing setting: {}",
                named(&affected.by_setting)
            );
        }
        if !affected.groups.is_empty() {
            let _ = writeln!(
                out,
                "{pad}  {what}, largest groups: {}",
                named(&affected.groups)
            );
        }
    }
    if let Some(at) = &forecast.first_block {
        let _ = writeln!(
            out,
            "{pad}  the others are blocked when their grace ends, from {at}, unless fixed first"
        );
    }
    out
}

/// Promotions waiting for approval, as `phasegate approvals` lists them.
pub fn approvals(pending: &[view::PendingApprovalView]) -> String {
    if pending.is_empty() {
        return "no promotion waits for approval\n".to_string();
    }
    let mut out = String::new();
    for request in pending {
        out.push_str(&approval_request(request));
    }
    out
}

/// One promotion waiting for approval: what it is, where its gate stands, the digest an
/// approval binds to, and the forecast.
pub fn approval_request(request: &view::PendingApprovalView) -> String {
    let mut out = String::new();
    let next: Vec<&str> = request.forecasts.iter().map(|f| f.phase.as_str()).collect();
    let _ = writeln!(
        out,
        "{}  `{}` → `{}`  {} of {} approvals{}",
        request.rollout,
        request.phase,
        if next.is_empty() {
            "-".to_string()
        } else {
            next.join("`, `")
        },
        request.have,
        request.required,
        if request.approved_by.is_empty() {
            String::new()
        } else {
            format!(" (by {})", Text(&request.approved_by.join(", ")))
        }
    );
    let gate = match &request.gate {
        Some(g) if request.gate_passed => format!("passed ({})", Text(&g.reasons.join("; "))),
        Some(g) => format!("{}: {}", g.outcome, Text(&g.reasons.join("; "))),
        None => "not judged yet".to_string(),
    };
    let _ = writeln!(out, "  gate: {gate}");
    match &request.digest {
        Some(digest) => {
            let _ = writeln!(out, "  digest: {digest}");
        }
        None => {
            let _ = writeln!(out, "  digest: - (no observation of the phase yet)");
        }
    }
    for who in &request.barred {
        let _ = writeln!(out, "  may not approve: {} ({})", Text(&who.who), who.why);
    }
    if let Some(note) = &request.note {
        let _ = writeln!(out, "  {}", Text(note));
    }
    for snapshot in &request.approver_snapshots {
        out.push_str(&snapshot_line(snapshot));
    }
    for forecast in &request.forecasts {
        out.push_str(&forecast_lines(forecast, 2));
    }
    out
}

/// A directory approver group's snapshot: who read it from where, when, and how long ago.
fn snapshot_line(snapshot: &view::ApproverSnapshotView) -> String {
    let what = match &snapshot.error {
        Some(why) => format!("could not be read: {}", Text(why)),
        None => format!("{} member identities", snapshot.members),
    };
    format!(
        "  approver group {}: `{}` read from {} at {} ({} ago): {}\n",
        Text(&snapshot.group),
        Text(&snapshot.directory),
        Text(&snapshot.source),
        snapshot.read_at,
        snapshot.age,
        what
    )
}

pub fn rollout_list(loaded: &[Loaded]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<18} {:<16} {:<21} REASON",
        "ROLLOUT", "STATUS", "PHASE", "UPDATED"
    );
    for l in loaded {
        let rollout = &l.stored.rollout;
        let phase = rollout.current_phases().join(",");
        let _ = writeln!(
            out,
            "{:<28} {:<18} {:<16} {:<21} {}",
            rollout.id,
            rollout.status.as_str(),
            if phase.is_empty() { "-" } else { &phase },
            rollout.updated_at.rfc3339(),
            Text(&rollout.reason)
        );
    }
    out
}

pub fn history(events: &[EventRecord]) -> String {
    let mut out = String::new();
    let start = events.first().map(|e| e.at);
    for record in events {
        let since = start.map(|s| elapsed(s, record.at)).unwrap_or_default();
        let _ = writeln!(out, "{}  {since}", view::event_line(record));
        if let crate::domain::event::EventKind::ApprovalGranted {
            phase,
            ticket,
            comment,
            ..
        } = &record.event.kind
        {
            let ticket = ticket
                .as_ref()
                .map(|t| format!(" ticket {}", Text(t)))
                .unwrap_or_default();
            let comment = comment
                .as_ref()
                .map(|c| format!(": {}", Text(c)))
                .unwrap_or_default();
            let _ = writeln!(out, "        approves `{phase}`{ticket}{comment}");
        }
        if let crate::domain::event::EventKind::Observed { observations } = &record.event.kind {
            for o in observations {
                let _ = writeln!(out, "        {}: {}", o.phase, view::tally_line(&o.tally));
            }
        }
        for note in &record.notes {
            let _ = writeln!(out, "        · {}", Text(note));
        }
        if !record.effects.is_empty() {
            let effects: Vec<String> = record
                .effects
                .iter()
                .map(|p| format!("{} {}", p.effect.name(), p.id))
                .collect();
            let _ = writeln!(out, "        → {}", effects.join(", "));
        }
    }
    out
}

/// Under a phase waiting for approvals: those that count (with when each expires), who may
/// approve, and who may not.
fn approval_lines(
    plan: &Plan,
    rollout: &Rollout,
    phase: &crate::domain::plan::Phase,
    record: &crate::domain::rollout::PhaseRecord,
) -> String {
    let mut out = String::new();
    for approval in &record.approvals {
        let ticket = approval
            .ticket
            .as_ref()
            .map(|t| format!(", ticket {t}"))
            .unwrap_or_default();
        let until = approval
            .expires_at
            .map(|at| format!(", counts until {at}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<14} approved by {} at {}{ticket}{until}",
            "", approval.by, approval.at
        );
    }
    let policy = &phase.approval;
    let mut rules = vec![format!("may approve: {}", policy.who())];
    let barred: Vec<String> = view::barred(plan, rollout, record)
        .into_iter()
        .map(|b| format!("{} ({})", b.who, b.why))
        .collect();
    if !barred.is_empty() {
        rules.push(format!("may not: {}", barred.join(", ")));
    }
    if let Some(after) = policy.expires_after {
        rules.push(format!("approvals last {}", format_span(after)));
    }
    if let Some(tolerance) = policy.evidence_tolerance {
        rules.push(format!("void if the evidence moves more than {tolerance}"));
    }
    match &policy.ticket_pattern {
        Some(pattern) => rules.push(format!("ticket matching `{}` required", pattern.as_str())),
        None if policy.require_ticket => rules.push("ticket required".to_string()),
        None => {}
    }
    let _ = writeln!(out, "{:<14} {}", "", rules.join("; "));
    out
}
