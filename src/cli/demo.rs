//! `phasegate demo`: a complete four-phase rollout of the Windows baseline plan over a simulated
//! fleet, in a temporary store, approved by a clearly named demo approver.
//!
//! It uses exactly the machinery a real rollout uses (plan parsing, the sled store, the engine,
//! the simulator provider); only the approvals come from the demo instead of a person.

use std::time::Instant;

use serde::Serialize;

use super::view::{self, RolloutView, elapsed, rollout_view, tally_line};
use super::{CommandResult, Failure, Output, exit};
use crate::domain::event::EventKind;
use crate::domain::machine;
use crate::domain::plan::Plan;
use crate::domain::rollout::{Rollout, RolloutStatus};
use crate::domain::time::Timestamp;
use crate::engine::{self, DriveOutcome, Engine, Pace};
use crate::provider;
use crate::provider::simulator::settings::MAX_DEVICES as MAX_SIMULATED_DEVICES;
use crate::store::{DEFAULT_LOCK_WAIT, EventRecord, PlanRecord, Store};

const PLAN: &str = include_str!("../../plans/windows-baseline.toml");
pub const DEMO_APPROVER: &str = "demo-approver (automatic, demo only)";
const DEMO_OPERATOR: &str = "demo-operator";

#[derive(Serialize)]
struct DemoReport {
    devices: u32,
    seed: u64,
    simulated_start: String,
    simulated_end: String,
    simulated_duration: String,
    wall_ms: u128,
    timeline: Vec<Moment>,
    rollout: RolloutView,
}

#[derive(Serialize, Clone)]
struct Moment {
    at: String,
    elapsed: String,
    phase: String,
    what: String,
    detail: String,
}

/// The Windows baseline plan with the demo's fleet size and seed.
fn demo_plan(devices: u32, seed: u64) -> String {
    let text = PLAN
        .replacen("devices = 10000", &format!("devices = {devices}"), 1)
        .replacen("seed = 7", &format!("seed = {seed}"), 1);
    debug_assert!(text.contains(&format!("devices = {devices}")));
    text
}

pub async fn run(output: Output, devices: u32, seed: u64) -> CommandResult {
    if devices == 0 || i64::from(devices) > MAX_SIMULATED_DEVICES {
        return Err(Failure::invalid(format!(
            "--devices must be between 1 and {MAX_SIMULATED_DEVICES}"
        )));
    }
    let dir = tempfile::tempdir().map_err(|e| Failure {
        code: exit::FAILURE,
        message: format!("cannot create a temporary store: {e}"),
    })?;
    let plan_path = dir.path().join("windows-baseline.toml");
    let source = demo_plan(devices, seed);
    std::fs::write(&plan_path, &source).map_err(|e| Failure {
        code: exit::FAILURE,
        message: format!("cannot write the demo plan: {e}"),
    })?;
    let plan = crate::adapters::parse_plan(&plan_path.display().to_string(), &source)
        .map_err(|e| Failure::invalid(e.to_string()))?;
    let store = Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT)?;
    let mut provider = provider::connect(&plan.provider, &store).await?;
    let engine = Engine {
        store: &store,
        notifier: crate::notifier::shared(),
        actor: "demo".to_string(),
        delivery: crate::retry::Backoff::WEBHOOK,
        limits: crate::engine::Limits::default(),
    };
    let text = output == Output::Text;
    if text {
        say!(
            "phasegate demo: plan {} over {} simulated devices (seed {seed}), store in {}",
            plan.name,
            view::thousands(u64::from(devices)),
            dir.path().display()
        );
        say!(
            "approvals are given by \"{DEMO_APPROVER}\"; in a real rollout a person runs `phasegate approve`\n"
        );
        say!("{:<10} {:<12} WHAT", "SIM TIME", "PHASE");
    }
    let started = Instant::now();
    let id = "demo-1";
    let record = PlanRecord {
        path: plan_path.display().to_string(),
        source,
        hash: plan.hash.clone(),
    };
    let (first, _) = engine
        .start(&plan, record, id, DEMO_OPERATOR, provider.as_mut())
        .await?;
    let start_at = first.at;
    let mut timeline: Vec<Moment> = Vec::new();
    let mut narrate = |plan: &Plan, rollout: &Rollout, record: &EventRecord| {
        for moment in moments(plan, rollout, record, start_at) {
            if text {
                say!(
                    "{:<10} {:<12} {}{}",
                    moment.elapsed,
                    moment.phase,
                    moment.what,
                    if moment.detail.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", moment.detail)
                    }
                );
            }
            timeline.push(moment);
        }
    };
    loop {
        let outcome = engine
            .drive(id, provider.as_mut(), Pace::Continuous, &mut narrate)
            .await?;
        let loaded = engine::load(&store, id)?;
        match outcome {
            DriveOutcome::Stopped(RolloutStatus::WaitingApproval) => {
                let phase = machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)
                    .map_err(|e| Failure::invalid(e.to_string()))?;
                let record = engine.submit(
                    id,
                    EventKind::ApprovalGranted {
                        phase,
                        ticket: Some("DEMO-1".to_string()),
                        comment: Some("approved automatically by the demo".to_string()),
                        digest: None,
                    },
                    DEMO_APPROVER,
                    "approved automatically by the demo",
                    provider.now(),
                )?;
                if let Some(record) = record {
                    narrate(&loaded.plan, &loaded.stored.rollout, &record);
                }
            }
            _ => break,
        }
    }
    let loaded = engine::load(&store, id)?;
    let rollout = &loaded.stored.rollout;
    let end_at = provider.now();
    let wall_ms = started.elapsed().as_millis();
    match output {
        Output::Text => {
            say!();
            say_raw!(
                "{}",
                super::text::rollout_detail(&loaded.plan, rollout, end_at)
            );
            say!(
                "\n{}: {} after {} of simulated time ({} ms of wall time)",
                rollout.id,
                rollout.status,
                view::span(start_at, end_at),
                wall_ms
            );
        }
        Output::Json => {
            let report = DemoReport {
                devices,
                seed,
                simulated_start: start_at.rfc3339(),
                simulated_end: end_at.rfc3339(),
                simulated_duration: view::span(start_at, end_at),
                wall_ms,
                timeline,
                rollout: rollout_view(&loaded.plan, rollout, end_at),
            };
            say!(
                "{}",
                serde_json::to_string_pretty(&report).expect("views always serialize")
            );
        }
    }
    Ok(match rollout.status {
        RolloutStatus::Completed => exit::OK,
        status if status.needs_attention() => exit::ATTENTION,
        _ => exit::FAILURE,
    })
}

/// What is worth telling about one committed event.
fn moments(plan: &Plan, rollout: &Rollout, record: &EventRecord, start: Timestamp) -> Vec<Moment> {
    let moment = |phase: &str, what: String, detail: String| Moment {
        at: record.at.rfc3339(),
        elapsed: elapsed(start, record.at),
        phase: phase.to_string(),
        what,
        detail,
    };
    let mut out = Vec::new();
    match &record.event.kind {
        EventKind::Reconciled { changes, .. } => {
            for (phase, state) in plan.phases.iter().zip(&rollout.phases) {
                if state.applied_at == Some(record.at) {
                    out.push(moment(
                        &phase.id,
                        format!("applied: {} for {}", phase.mode, phase.include.join(", ")),
                        format!(
                            "({changes} assignment change{})",
                            if *changes == 1 { "" } else { "s" }
                        ),
                    ));
                }
            }
        }
        EventKind::Observed { observations } => {
            for o in observations {
                let Some(record_state) = rollout.phase(&o.phase) else {
                    continue;
                };
                let decided = record
                    .notes
                    .iter()
                    .any(|n| n.contains(&format!("`{}`", o.phase)));
                let holding = record_state.held_since.is_some();
                // While held, report once a simulated day; otherwise only when a decision is made.
                let daily = holding && (o.at.as_millis() - start.as_millis()) % 86_400_000 == 0;
                if !(decided || daily) {
                    continue;
                }
                let verdict = record_state
                    .verdict
                    .as_ref()
                    .map(|v| match v.outcome {
                        crate::domain::gate::GateOutcome::Pass => "gate PASS".to_string(),
                        _ => format!("gate HOLD: {}", v.reasons.join("; ")),
                    })
                    .unwrap_or_default();
                out.push(moment(&o.phase, verdict, tally_line(&o.tally)));
            }
        }
        EventKind::ApprovalGranted { phase, .. } => {
            out.push(moment(
                phase,
                format!("approved by {}", record.event.trigger.actor),
                String::new(),
            ));
        }
        _ => {}
    }
    for note in &record.notes {
        if note.starts_with("promoted") {
            let phase = note.split('`').nth(1).unwrap_or("");
            out.push(moment(phase, "promoted".to_string(), String::new()));
        } else if note.contains("rollback_when") {
            out.push(moment("", note.clone(), String::new()));
        }
    }
    if record.previous_status != record.status && record.status == RolloutStatus::WaitingApproval {
        let phase = rollout
            .current_phases()
            .first()
            .map(|s| s.to_string())
            .unwrap_or_default();
        out.push(moment(
            &phase,
            "waiting for approval".to_string(),
            String::new(),
        ));
    }
    if record.status == RolloutStatus::Completed
        && record.previous_status != RolloutStatus::Completed
    {
        out.push(moment(
            "",
            "rollout completed".to_string(),
            rollout.reason.clone(),
        ));
    }
    out
}
