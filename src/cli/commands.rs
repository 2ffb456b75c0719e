//! One function per command. Each opens what it needs, calls the engine, prints, and returns an
//! exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::view::{self, rollout_view};
use super::{CommandResult, Failure, Output, exit, text};
use crate::domain::event::EventKind;
use crate::domain::machine;
use crate::domain::plan::{self, Plan};
use crate::domain::rollout::{Rollout, RolloutStatus};
use crate::engine::{self, DriveOutcome, Engine, EngineError, Pace, RetryPolicy};
use crate::provider;
use crate::provider::ErrorKind;
use crate::store::{self, DEFAULT_LOCK_WAIT, EventRecord, PlanRecord, Store};

pub struct Context {
    pub store: PathBuf,
    pub output: Output,
}

fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("views always serialize")
    );
}

fn read_plan(file: &Path) -> Result<(String, Plan), Failure> {
    let source = std::fs::read_to_string(file)
        .map_err(|e| Failure::invalid(format!("{}: cannot read the plan: {e}", file.display())))?;
    let plan = plan::parse(&file.display().to_string(), &source)
        .map_err(|errors| Failure::invalid(errors.to_string()))?;
    Ok((source, plan))
}

#[derive(Serialize)]
struct CheckedPlan {
    file: String,
    valid: bool,
    phases: usize,
    errors: Vec<CheckError>,
}

#[derive(Serialize)]
struct CheckError {
    line: usize,
    column: usize,
    message: String,
}

pub fn plan_check(ctx: &Context, files: &[PathBuf]) -> CommandResult {
    let mut results = Vec::new();
    for file in files {
        let name = file.display().to_string();
        let checked = match std::fs::read_to_string(file) {
            Err(e) => CheckedPlan {
                file: name.clone(),
                valid: false,
                phases: 0,
                errors: vec![CheckError {
                    line: 0,
                    column: 0,
                    message: format!("cannot read the plan: {e}"),
                }],
            },
            Ok(source) => match plan::parse(&name, &source) {
                Ok(plan) => CheckedPlan {
                    file: name.clone(),
                    valid: true,
                    phases: plan.phases.len(),
                    errors: vec![],
                },
                Err(errors) => {
                    if ctx.output == Output::Text {
                        eprint!("{errors}");
                    }
                    CheckedPlan {
                        file: name.clone(),
                        valid: false,
                        phases: 0,
                        errors: errors
                            .diagnostics
                            .iter()
                            .map(|d| {
                                let at = plan::position(&errors.source, d.span.start);
                                CheckError {
                                    line: at.line,
                                    column: at.column,
                                    message: d.message.clone(),
                                }
                            })
                            .collect(),
                    }
                }
            },
        };
        if ctx.output == Output::Text {
            if checked.valid {
                println!("{name}: ok ({} phases)", checked.phases);
            } else if checked.errors.first().is_some_and(|e| e.line == 0) {
                eprintln!("{name}: {}", checked.errors[0].message);
            }
        }
        results.push(checked);
    }
    if ctx.output == Output::Json {
        print_json(&results);
    }
    let invalid = results.iter().filter(|r| !r.valid).count();
    if invalid > 0 {
        if ctx.output == Output::Text {
            eprintln!(
                "{invalid} of {} plan{} invalid",
                results.len(),
                if results.len() == 1 { " is" } else { "s are" }
            );
        }
        return Ok(exit::INVALID);
    }
    Ok(exit::OK)
}

pub fn plan_show(ctx: &Context, file: &Path, dot: bool) -> CommandResult {
    let (_, plan) = read_plan(file)?;
    if dot {
        print!("{}", text::plan_dot(&plan));
    } else if ctx.output == Output::Json {
        print_json(&text::plan_json(&plan));
    } else {
        print!("{}", text::plan_table(&plan));
    }
    Ok(exit::OK)
}

fn engine<'s>(store: &'s Store, actor: &str) -> Engine<'s> {
    Engine {
        store,
        notifier: crate::notifier::shared(),
        actor: actor.to_string(),
        retry: RetryPolicy::default(),
        limits: crate::engine::Limits::default(),
    }
}

fn valid_id(id: &str) -> Result<(), Failure> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Failure::invalid(format!(
            "invalid rollout id `{id}`: use letters, digits, `-`, `_` and `.`"
        )))
    }
}

pub async fn start(ctx: &Context, file: &Path, id: Option<String>, by: &str) -> CommandResult {
    let (source, plan) = read_plan(file)?;
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let id = match id {
        Some(id) => {
            valid_id(&id)?;
            id
        }
        None => store.next_rollout_id(&plan.name)?,
    };
    let mut provider = provider::connect(&plan.provider, &store).await?;
    let path = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let record = PlanRecord {
        path: path.display().to_string(),
        source,
        hash: plan.hash.clone(),
    };
    let (_, warnings) = engine(&store, "start")
        .start(&plan, record, &id, by, provider.as_mut())
        .await
        .map_err(|err| match err {
            EngineError::Provider(e)
                if matches!(e.kind, ErrorKind::NotFound | ErrorKind::Conflict) =>
            {
                Failure::invalid(format!("{}: {e}", file.display()))
            }
            other => Failure::from(other),
        })?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    match ctx.output {
        Output::Text => println!("{id}"),
        Output::Json => {
            let loaded = engine::load(&store, &id)?;
            print_json(&rollout_view(&loaded.plan, &loaded.stored.rollout));
        }
    }
    Ok(exit::OK)
}

/// How long `run` sleeps at most before looking at the store again (approvals may have arrived).
const POLL: Duration = Duration::from_secs(30);

pub async fn run(ctx: &Context, only: Option<&str>, once: bool) -> CommandResult {
    let _driver = store::lock_driver(&ctx.store)?;
    loop {
        let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
        let ids: Vec<String> = match only {
            Some(id) => vec![id.to_string()],
            None => store
                .rollouts()?
                .into_iter()
                .filter(|r| {
                    !matches!(
                        r.rollout.status,
                        RolloutStatus::Completed | RolloutStatus::Aborted
                    )
                })
                .map(|r| r.rollout.id)
                .collect(),
        };
        if ids.is_empty() {
            if ctx.output == Output::Text {
                println!("no rollouts to run");
            } else {
                print_json(&Vec::<view::RolloutView>::new());
            }
            return Ok(exit::OK);
        }
        let mut waits = Vec::new();
        let mut failed = false;
        for id in &ids {
            match drive_one(ctx, &store, id, once).await {
                Ok(DriveOutcome::Wait(wait)) => waits.push(wait),
                Ok(DriveOutcome::Stopped(_)) => {}
                Err(failure) if only.is_some() => return Err(failure),
                Err(failure) => {
                    eprintln!("error: {id}: {}", failure.message.trim_end());
                    failed = true;
                }
            }
        }
        let earliest = waits.iter().min().copied();
        if once || earliest.is_none() {
            return finish_run(ctx, &store, &ids, failed);
        }
        drop(store);
        let wait = earliest.unwrap_or(POLL).min(POLL);
        tracing::info!(?wait, "waiting for the next deadline");
        tokio::time::sleep(wait).await;
    }
}

async fn drive_one(
    ctx: &Context,
    store: &Store,
    id: &str,
    once: bool,
) -> Result<DriveOutcome, Failure> {
    let loaded = engine::load(store, id)?;
    let mut provider = provider::connect(&loaded.plan.provider, store).await?;
    let pace = if once { Pace::Once } else { Pace::Continuous };
    let text = ctx.output == Output::Text;
    let mut print = |_: &Plan, rollout: &Rollout, record: &EventRecord| {
        if text && worth_printing(record) {
            println!("{}  {}", rollout.id, view::event_line(record));
            for note in &record.notes {
                println!("{:width$}  · {note}", "", width = rollout.id.len());
            }
        }
    };
    Ok(engine(store, "run")
        .drive(id, provider.as_mut(), pace, &mut print)
        .await?)
}

fn worth_printing(record: &EventRecord) -> bool {
    !record.notes.is_empty()
        || record.previous_status != record.status
        || record.event.trigger.source == crate::domain::event::TriggerSource::User
}

fn finish_run(ctx: &Context, store: &Store, ids: &[String], failed: bool) -> CommandResult {
    let mut views = Vec::new();
    let mut code = if failed { exit::FAILURE } else { exit::OK };
    for id in ids {
        let loaded = engine::load(store, id)?;
        let rollout = &loaded.stored.rollout;
        if rollout.status == RolloutStatus::Failed {
            code = exit::FAILURE;
        } else if rollout.status.needs_attention() && code == exit::OK {
            code = exit::ATTENTION;
        }
        if ctx.output == Output::Text {
            println!("{}: {} — {}", rollout.id, rollout.status, rollout.reason);
        }
        views.push(rollout_view(&loaded.plan, rollout));
    }
    if ctx.output == Output::Json {
        print_json(&views);
    }
    Ok(code)
}

pub fn status(ctx: &Context, id: Option<&str>) -> CommandResult {
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let loaded = match id {
        Some(id) => vec![engine::load(&store, id)?],
        None => store
            .rollouts()?
            .iter()
            .map(|r| engine::load(&store, &r.rollout.id))
            .collect::<Result<Vec<_>, _>>()?,
    };
    match (ctx.output, id) {
        (Output::Json, Some(_)) => {
            print_json(&rollout_view(&loaded[0].plan, &loaded[0].stored.rollout))
        }
        (Output::Json, None) => print_json(
            &loaded
                .iter()
                .map(|l| rollout_view(&l.plan, &l.stored.rollout))
                .collect::<Vec<_>>(),
        ),
        (Output::Text, Some(_)) => print!(
            "{}",
            text::rollout_detail(&loaded[0].plan, &loaded[0].stored.rollout)
        ),
        (Output::Text, None) if loaded.is_empty() => {
            println!("no rollouts in {}", ctx.store.display())
        }
        (Output::Text, None) => print!("{}", text::rollout_list(&loaded)),
    }
    Ok(exit::OK)
}

pub enum Simple {
    Pause,
    Resume,
    Rollback(Option<String>),
    Abort,
    Resolve(crate::domain::event::DriftResolution),
}

pub async fn approve(
    ctx: &Context,
    id: &str,
    by: &str,
    phase: Option<String>,
    ticket: Option<String>,
    comment: Option<String>,
) -> CommandResult {
    let reason = comment.clone().unwrap_or_default();
    submit(ctx, id, by, &reason, |loaded| {
        let phase = match phase {
            Some(phase) => phase,
            None => machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)?,
        };
        Ok(EventKind::ApprovalGranted {
            phase,
            ticket,
            comment,
        })
    })
    .await
}

pub async fn reject(
    ctx: &Context,
    id: &str,
    by: &str,
    phase: Option<String>,
    reason: &str,
) -> CommandResult {
    submit(ctx, id, by, reason, |loaded| {
        let phase = match phase {
            Some(phase) => phase,
            None => machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)?,
        };
        Ok(EventKind::ApprovalRejected { phase })
    })
    .await
}

pub async fn simple(
    ctx: &Context,
    id: &str,
    what: Simple,
    by: &str,
    reason: &str,
) -> CommandResult {
    let kind = match what {
        Simple::Pause => EventKind::PauseRequested,
        Simple::Resume => EventKind::ResumeRequested,
        Simple::Rollback(to) => EventKind::RollbackRequested { to },
        Simple::Abort => EventKind::AbortRequested,
        Simple::Resolve(resolution) => EventKind::DriftResolved { resolution },
    };
    submit(ctx, id, by, reason, |_| Ok(kind)).await
}

/// Applies a person's command and shows where the rollout stands.
async fn submit(
    ctx: &Context,
    id: &str,
    by: &str,
    reason: &str,
    event: impl FnOnce(&engine::Loaded) -> Result<EventKind, machine::Rejection>,
) -> CommandResult {
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let loaded = engine::load(&store, id)?;
    let kind = event(&loaded).map_err(EngineError::from)?;
    let provider = provider::connect(&loaded.plan.provider, &store).await?;
    let engine = engine(&store, "cli");
    let record = engine.submit(id, kind, by, reason, provider.as_ref())?;
    let loaded = engine::load(&store, id)?;
    match ctx.output {
        Output::Json => print_json(&rollout_view(&loaded.plan, &loaded.stored.rollout)),
        Output::Text => {
            let rollout = &loaded.stored.rollout;
            if let Some(record) = &record {
                for note in &record.notes {
                    println!("· {note}");
                }
            }
            println!("{}: {} — {}", rollout.id, rollout.status, rollout.reason);
            if !rollout.pending.is_empty() {
                println!("`phasegate run {}` carries out the change", rollout.id);
            }
        }
    }
    Ok(exit::OK)
}

pub fn history(ctx: &Context, id: &str, verify: bool) -> CommandResult {
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    if verify {
        let verdict = store.verify(id)?;
        #[derive(Serialize)]
        struct Verification<'a> {
            id: &'a str,
            verified: bool,
            events: u64,
            error: Option<String>,
        }
        let (events, error) = match &verdict {
            Ok(n) => (*n, None),
            Err(e) => (0, Some(e.clone())),
        };
        match ctx.output {
            Output::Json => print_json(&Verification {
                id,
                verified: verdict.is_ok(),
                events,
                error,
            }),
            Output::Text => match &verdict {
                Ok(n) => println!("{id}: audit trail verified, {n} events, hash chain intact"),
                Err(e) => eprintln!("{id}: audit trail is broken: {e}"),
            },
        }
        return Ok(if verdict.is_ok() {
            exit::OK
        } else {
            exit::FAILURE
        });
    }
    store.rollout(id)?;
    let events = store.events(id)?;
    match ctx.output {
        Output::Json => print_json(&events),
        Output::Text => print!("{}", text::history(&events)),
    }
    Ok(exit::OK)
}
