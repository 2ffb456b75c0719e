//! One function per command. Each opens what it needs, calls the engine, prints, and returns an
//! exit code.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::remote::Remote;
use super::view::{self, rollout_view};
use super::{CommandResult, Failure, Output, exit, text};
use crate::daemon;
use crate::domain::event::EventKind;
use crate::domain::machine;
use crate::domain::plan::{Plan, Strictness};
use crate::domain::rollout::RolloutStatus;
use crate::engine::{self, Engine, EngineError};
use crate::provider;
use crate::provider::ErrorKind;
use crate::runner::{self, Runner};
use crate::store::{self, DEFAULT_LOCK_WAIT, EventRecord, PlanRecord, Store};

pub struct Context {
    pub store: PathBuf,
    pub output: Output,
    /// `--server URL`: talk to that daemon's API instead of the store.
    pub server: Option<String>,
}

impl Context {
    /// The daemon to go through, when one holds the store (or `--server` names one).
    pub(super) fn remote(&self) -> Result<Option<Remote>, Failure> {
        Remote::find(&self.store, self.server.as_deref())
    }
}

fn print_json<T: Serialize>(value: &T) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("views always serialize")
    );
}

/// `--strict`: the plan's warnings are errors; without it, as the plan says.
fn strictness(strict: bool) -> Strictness {
    if strict {
        Strictness::Strict
    } else {
        Strictness::AsWritten
    }
}

/// Reads and checks a plan; its warnings are in [`Plan::warnings`] (errors under `strict`).
fn read_plan(file: &Path, strict: bool) -> Result<(String, Plan), Failure> {
    let source = std::fs::read_to_string(file)
        .map_err(|e| Failure::invalid(format!("{}: cannot read the plan: {e}", file.display())))?;
    let plan =
        crate::adapters::check_plan(&file.display().to_string(), &source, strictness(strict))
            .map_err(|errors| Failure::invalid(errors.to_string()))?;
    Ok((source, plan))
}

pub fn plan_check(ctx: &Context, files: &[PathBuf], strict: bool) -> CommandResult {
    let mut results = Vec::new();
    for file in files {
        let name = file.display().to_string();
        let checked = match std::fs::read_to_string(file) {
            Err(e) => view::PlanCheckView {
                file: name.clone(),
                valid: false,
                phases: 0,
                errors: vec![view::FindingView {
                    line: 0,
                    column: 0,
                    message: format!("cannot read the plan: {e}"),
                    why: None,
                }],
                warnings: vec![],
            },
            Ok(source) => {
                let checked = crate::adapters::check_plan(&name, &source, strictness(strict));
                if ctx.output == Output::Text {
                    match &checked {
                        Ok(plan) => eprint!("{}", plan.warnings_in(&name, &source)),
                        Err(errors) => eprint!("{errors}"),
                    }
                }
                view::plan_check(&name, &source, &checked)
            }
        };
        if ctx.output == Output::Text {
            if checked.valid {
                let warnings = match checked.warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_string(),
                    n => format!(", {n} warnings"),
                };
                say!("{name}: ok ({} phases{warnings})", checked.phases);
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
    let (_, plan) = read_plan(file, false)?;
    if dot {
        say_raw!("{}", text::plan_dot(&plan));
    } else if ctx.output == Output::Json {
        print_json(&text::plan_json(&plan));
    } else {
        say_raw!("{}", text::plan_table(&plan));
    }
    Ok(exit::OK)
}

fn engine<'s>(store: &'s Store, actor: &str) -> Engine<'s> {
    Engine {
        store,
        notifier: crate::notifier::shared(),
        actor: actor.to_string(),
        delivery: crate::retry::Backoff::WEBHOOK,
        limits: crate::engine::Limits::default(),
    }
}

fn valid_id(id: &str) -> Result<(), Failure> {
    if super::valid_rollout_id(id) {
        Ok(())
    } else {
        Err(Failure::invalid(format!(
            "invalid rollout id `{id}`: use letters, digits, `-`, `_` and `.`"
        )))
    }
}

/// How `start` treats the readiness preflight.
pub struct StartPreflight {
    /// `--skip-preflight --reason TEXT`: start whatever it finds, recording why.
    pub skip: Option<String>,
    pub resolver: Option<std::net::SocketAddr>,
}

fn preflight_options(
    file: &Path,
    resolver: Option<std::net::SocketAddr>,
) -> crate::preflight::Options {
    crate::preflight::Options {
        resolver,
        plan_dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
    }
}

/// `phasegate preflight PLAN`: every check, one line each; exit 5 on an error.
pub async fn preflight(
    ctx: &Context,
    file: &Path,
    resolver: Option<std::net::SocketAddr>,
) -> CommandResult {
    let (_, plan) = read_plan(file, false)?;
    let report = crate::preflight::run(&plan, &preflight_options(file, resolver))
        .await
        .map_err(|e| Failure::invalid(format!("{}: {e}", file.display())))?;
    match ctx.output {
        Output::Text => say_raw!("{}", report.text()),
        Output::Json => print_json(&report),
    }
    Ok(if report.has_errors() {
        exit::NOT_READY
    } else {
        exit::OK
    })
}

/// The preflight before a start: its report goes to stderr (stdout is the start's), and an
/// error stops the start unless it is skipped. Returns the start event's reason.
async fn preflight_before_start(
    file: &Path,
    plan: &Plan,
    preflight: &StartPreflight,
) -> Result<String, Failure> {
    let gate = crate::preflight::before_start(
        plan,
        &preflight_options(file, preflight.resolver),
        preflight.skip.as_deref(),
    )
    .await
    .map_err(|e| Failure::invalid(format!("{}: {e}", file.display())))?;
    match gate {
        crate::preflight::StartGate::Start { reason, shown } => {
            show_findings(&shown);
            Ok(reason)
        }
        crate::preflight::StartGate::Refused { errors } => {
            show_findings(&errors);
            Err(Failure {
                code: exit::NOT_READY,
                message: format!(
                    "{}: {}; or start with --skip-preflight --reason TEXT",
                    file.display(),
                    not_started(
                        errors.len(),
                        &format!("phasegate preflight {}", file.display())
                    )
                ),
            })
        }
    }
}

/// Why nothing was started, for `errors` preflight errors that `how` shows in full.
pub fn not_started(errors: usize, how: &str) -> String {
    format!(
        "{}{errors} error{}: nothing was started; fix {} (`{how}` shows every check)",
        crate::preflight::REFUSED,
        if errors == 1 { "" } else { "s" },
        if errors == 1 { "it" } else { "them" },
    )
}

fn show_findings(findings: &[crate::preflight::Finding]) {
    for f in findings {
        show_finding(f.level.as_str(), f.check, &f.message, f.fix.as_deref());
    }
}

fn show_finding(level: &str, check: &str, message: &str, fix: Option<&str>) {
    eprintln!(
        "preflight {level}: {}: {}",
        view::Text(check),
        view::Text(message)
    );
    if let Some(fix) = fix {
        eprintln!("  fix: {}", view::Text(fix));
    }
}

pub async fn start(
    ctx: &Context,
    file: &Path,
    id: Option<String>,
    by: &str,
    strict: bool,
    preflight: StartPreflight,
) -> CommandResult {
    let (source, plan) = read_plan(file, strict)?;
    if let Some(remote) = ctx.remote()? {
        // The daemon runs the preflight (from its machine, as the rollout will) and records a
        // skip's reason.
        let path = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let mut body =
            serde_json::json!({"plan": source, "file": path.display().to_string(), "id": id});
        if strict {
            body["strict"] = serde_json::json!(true);
        }
        if let Some(reason) = &preflight.skip {
            body["skip_preflight"] = serde_json::json!(reason);
        }
        if let Some(resolver) = preflight.resolver {
            body["preflight_resolver"] = serde_json::json!(resolver.to_string());
        }
        if remote.local {
            body["by"] = serde_json::json!(by);
        }
        let view = remote.post("/api/v1/rollouts", &body).await?;
        for finding in view["preflight"].as_array().into_iter().flatten() {
            let field = |name: &str| finding[name].as_str().unwrap_or("").to_string();
            show_finding(
                &field("level"),
                &field("check"),
                &field("message"),
                finding["fix"].as_str(),
            );
        }
        for warning in view["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", warning.as_str().unwrap_or(""));
        }
        match ctx.output {
            Output::Text => say!("{}", view["id"].as_str().unwrap_or("")),
            Output::Json => print_json(&view),
        }
        return Ok(exit::OK);
    }
    let reason = preflight_before_start(file, &plan, &preflight).await?;
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
        .start_because(&plan, record, &id, by, &reason, provider.as_mut())
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
        Output::Text => say!("{id}"),
        Output::Json => {
            let loaded = engine::load(&store, &id)?;
            let now = provider::view_now(&store, &loaded);
            print_json(&rollout_view(&loaded.plan, &loaded.stored.rollout, now));
        }
    }
    Ok(exit::OK)
}

/// `phasegate run`: drives rollouts until each is finished or needs a person. While it runs it
/// owns the store and lets other commands in through its API on loopback (`daemon.json`).
pub async fn run(ctx: &Context, only: Option<&str>, once: bool) -> CommandResult {
    let _driver = store::lock_driver(&ctx.store)?;
    let store = std::sync::Arc::new(Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?);
    let ids: Vec<String> = match only {
        Some(id) => {
            store.rollout(id)?;
            vec![id.to_string()]
        }
        None => store
            .rollouts()?
            .into_iter()
            .filter(|r| {
                !matches!(
                    r.rollout.status,
                    RolloutStatus::Completed | RolloutStatus::Aborted
                ) || !r.rollout.pending.is_empty()
            })
            .map(|r| r.rollout.id)
            .collect(),
    };
    if ids.is_empty() {
        if ctx.output == Output::Text {
            say!("no rollouts to run");
        } else {
            print_json(&Vec::<view::RolloutView>::new());
        }
        return Ok(exit::OK);
    }
    let leasing = if store.is_postgres() {
        Some(take_run_leases(&store, &ids, only.is_some()).await?)
    } else {
        None
    };
    let runner = Runner::new(
        store.clone(),
        crate::notifier::shared(),
        runner::Settings {
            actor: "run".into(),
            until: runner::Until::Idle,
            only: only.map(str::to_string),
            once,
            limits: engine::Limits::default(),
            leasing,
        },
    );
    let handle = runner.handle();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let shutdown = daemon::shutdown_signal(stop);
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let api = local_api(&ctx.store, handle.clone(), store.clone(), "run", closing).await?;
    let text = ctx.output == Output::Text;
    let printer = tokio::spawn(print_transitions(handle.subscribe(), text));
    let report = runner.run(shutdown).await;
    let _ = closing_tx.send(true);
    drop(handle);
    let _ = api.await;
    printer.abort();
    let report = report?;
    for (id, error) in &report.errors {
        eprintln!("error: {id}: {}", error.trim_end());
    }
    if only.is_some()
        && let Some(error) = report.errors.values().next()
    {
        return Err(Failure {
            code: exit::FAILURE,
            message: error.clone(),
        });
    }
    finish_run(ctx, &store, &ids, !report.errors.is_empty())
}

/// How long `run` on PostgreSQL holds a rollout's lease between renewals, and how often it
/// renews it: as `serve`'s defaults.
const RUN_LEASE: std::time::Duration = std::time::Duration::from_secs(15);
const RUN_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest `run` waits for another replica's lease to run out: a lease this short may be a
/// replica that stopped without releasing it (killed, its machine gone); a longer one is taken
/// to be alive.
const RUN_WAITS_FOR_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// On PostgreSQL `run` is a replica like `serve`: it drives a rollout only while it holds the
/// rollout's lease, so that its commits are fenced like theirs and it never acts beside the
/// owner. A lease held by another replica is waited for once, until it runs out (a replica that
/// stopped without releasing it); one renewed meanwhile belongs to a live replica: `run ID`
/// then exits 4 naming it, `run` leaves that rollout to it.
async fn take_run_leases(
    store: &Store,
    ids: &[String],
    only: bool,
) -> Result<runner::Leasing, Failure> {
    let replica = format!("run-{}", replica_name()?);
    store.set_replica(&replica);
    let mut taken = 0;
    for id in ids {
        match take_run_lease(store, id).await? {
            Ok(()) => taken += 1,
            Err(owner) if only => {
                return Err(Failure {
                    code: exit::STORE_IN_USE,
                    message: format!(
                        "rollout `{id}` is driven by replica `{owner}`, which keeps renewing its lease: \
                         give your command through that replica (`--server URL`), or stop it first"
                    ),
                });
            }
            Err(owner) => {
                tracing::warn!(rollout = %id, %owner, "the rollout is driven by another replica: leaving it to that replica");
            }
        }
    }
    Ok(runner::Leasing {
        replica,
        lease: RUN_LEASE,
        renew_every: RUN_RENEW_EVERY,
        max_rollouts: taken.clamp(1, runner::MAX_ROLLOUTS),
    })
}

/// Takes the lease of `id`, waiting once for another replica's lease to run out; `Err(owner)`
/// when that replica renewed it meanwhile (or holds it longer than `run` waits).
async fn take_run_lease(store: &Store, id: &str) -> Result<Result<(), String>, Failure> {
    let mut waited = false;
    let mut owner = String::new();
    // Bounded: a lease released between the two reads is tried again, a few times.
    for _ in 0..4 {
        if store.acquire_lease(id, RUN_LEASE)?.is_some() {
            return Ok(Ok(()));
        }
        let holder = store.leases()?.into_iter().find(|l| l.rollout == id);
        let Some(holder) = holder else {
            continue;
        };
        owner = holder.owner.clone();
        let remaining = std::time::Duration::from_millis(holder.remaining_ms.max(0) as u64);
        if waited || remaining > RUN_WAITS_FOR_LEASE {
            return Ok(Err(holder.owner));
        }
        tracing::warn!(
            rollout = %id,
            owner = %holder.owner,
            "the rollout is leased by another replica for {} more: waiting for it to run out (a replica that stopped keeps its lease until then)",
            humantime::format_duration(std::time::Duration::from_secs(remaining.as_secs() + 1))
        );
        // Past the end of the lease on the database's clock, with a margin for the clocks.
        tokio::time::sleep(remaining + std::time::Duration::from_millis(200)).await;
        waited = true;
    }
    Ok(Err(owner))
}

/// Serves the API on loopback for the CLI on this machine while this process holds the store.
async fn local_api(
    store_dir: &Path,
    handle: runner::Handle,
    store: std::sync::Arc<Store>,
    kind: &str,
    closing: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Failure> {
    let failure = |e: std::io::Error| Failure {
        code: exit::FAILURE,
        message: format!("cannot serve the local API: {e}"),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(failure)?;
    let addr = listener.local_addr().map_err(failure)?;
    let token = crate::identity::new_token().map_err(|e| Failure {
        code: exit::FAILURE,
        message: e,
    })?;
    let published = daemon::publish(
        store_dir,
        &daemon::DaemonFile {
            url: daemon::local_url(addr),
            token: token.clone(),
            pid: std::process::id(),
            kind: kind.to_string(),
        },
    )
    .map_err(failure)?;
    Ok(tokio::spawn(async move {
        let _published = published;
        if let Err(e) = daemon::serve_api(listener, handle, store, token, false, closing).await {
            tracing::warn!(error = %e, "the local API stopped");
        }
    }))
}

/// Prints each committed transition worth a line, as it happens.
async fn print_transitions(
    mut events: tokio::sync::broadcast::Receiver<runner::Announcement>,
    text: bool,
) {
    while let Ok(a) = events.recv().await {
        if text && worth_printing(&a.record) {
            say!("{}  {}", a.rollout, view::event_line(&a.record));
            for note in &a.record.notes {
                say!("{:width$}  · {note}", "", width = a.rollout.len());
            }
        }
    }
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
            say!("{}: {} — {}", rollout.id, rollout.status, rollout.reason);
        }
        views.push(rollout_view(&loaded.plan, rollout, rollout.updated_at));
    }
    if ctx.output == Output::Json {
        print_json(&views);
    }
    Ok(code)
}

pub async fn status(ctx: &Context, id: Option<&str>, watch: bool) -> CommandResult {
    if watch {
        return status_watch(ctx, id.expect("clap requires an id")).await;
    }
    if let Some(remote) = ctx.remote()? {
        let path = match id {
            Some(id) => format!("/api/v1/rollouts/{id}"),
            None => "/api/v1/rollouts".to_string(),
        };
        match ctx.output {
            Output::Json => print_json(&remote.get(&path).await?),
            Output::Text => {
                let text = remote.get(&format!("{path}?format=text")).await?;
                say_raw!("{}", text["text"].as_str().unwrap_or(""));
            }
        }
        return Ok(exit::OK);
    }
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    match ctx.output {
        Output::Json => match id {
            Some(id) => {
                let loaded = engine::load(&store, id)?;
                let now = provider::view_now(&store, &loaded);
                print_json(&rollout_view(&loaded.plan, &loaded.stored.rollout, now))
            }
            None => print_json(&all_views(&store)?),
        },
        Output::Text => say_raw!("{}", status_text(&store, id, &ctx.store)?),
    }
    Ok(exit::OK)
}

fn all_views(store: &Store) -> Result<Vec<view::RolloutView>, Failure> {
    store
        .rollouts()?
        .iter()
        .map(|r| {
            let l = engine::load(store, &r.rollout.id)?;
            Ok(rollout_view(
                &l.plan,
                &l.stored.rollout,
                provider::view_now(store, &l),
            ))
        })
        .collect()
}

/// `status` as text, from the store (the API serves the same text).
pub fn status_text(store: &Store, id: Option<&str>, dir: &Path) -> Result<String, EngineError> {
    match id {
        Some(id) => {
            let loaded = engine::load(store, id)?;
            let now = provider::view_now(store, &loaded);
            Ok(text::rollout_detail(
                &loaded.plan,
                &loaded.stored.rollout,
                now,
            ))
        }
        None => {
            let loaded = store
                .rollouts()?
                .iter()
                .map(|r| engine::load(store, &r.rollout.id))
                .collect::<Result<Vec<_>, _>>()?;
            if loaded.is_empty() {
                Ok(format!("no rollouts in {}\n", store::display_location(dir)))
            } else {
                Ok(text::rollout_list(&loaded))
            }
        }
    }
}

/// Follows a rollout live: through the daemon's stream when one holds the store, else by
/// looking at the store every second (opening it only for the moment of reading).
async fn status_watch(ctx: &Context, id: &str) -> CommandResult {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let draw = |text: &str| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if terminal {
            let _ = write!(out, "\x1b[2J\x1b[H");
        } else {
            let _ = writeln!(out, "---");
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
    };
    let done = |status: &str| matches!(status, "completed" | "aborted");
    if let Some(remote) = ctx.remote()? {
        let text_path = format!("/api/v1/rollouts/{id}?format=text");
        let first = remote.get(&text_path).await?;
        draw(first["text"].as_str().unwrap_or(""));
        if done(first["status"].as_str().unwrap_or("")) {
            return Ok(exit::OK);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watch_path = format!("/api/v1/rollouts/{id}/watch");
        let follow = remote.follow(&watch_path, |event| {
            let _ = tx.send(event["status"].as_str().unwrap_or("").to_string());
            true
        });
        tokio::pin!(follow);
        loop {
            tokio::select! {
                ended = &mut follow => return ended.map(|_| exit::OK),
                Some(status) = rx.recv() => {
                    let view = remote.get(&text_path).await?;
                    draw(view["text"].as_str().unwrap_or(""));
                    if done(&status) {
                        return Ok(exit::OK);
                    }
                }
            }
        }
    }
    let mut last = String::new();
    loop {
        let (text, status) = {
            let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
            let loaded = engine::load(&store, id)?;
            (
                text::rollout_detail(
                    &loaded.plan,
                    &loaded.stored.rollout,
                    provider::view_now(&store, &loaded),
                ),
                loaded.stored.rollout.status,
            )
        };
        if text != last {
            draw(&text);
            last = text;
        }
        if matches!(status, RolloutStatus::Completed | RolloutStatus::Aborted) {
            return Ok(exit::OK);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// How `serve` shares a PostgreSQL store with other replicas (`--lease`, `--renew-every`,
/// `--max-rollouts`).
#[derive(Clone, Copy, Debug)]
pub struct LeaseSettings {
    pub lease: std::time::Duration,
    pub renew_every: std::time::Duration,
    pub max_rollouts: usize,
}

/// A name for this process among the replicas of a store: its host, its pid and a random part,
/// so that a restarted process never takes over its predecessor's epochs.
fn replica_name() -> Result<String, Failure> {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|e| Failure {
        code: exit::FAILURE,
        message: format!("no randomness from the system: {e}"),
    })?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
                .take(63)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    Ok(format!(
        "{host}-{}-{}",
        std::process::id(),
        hex::encode(bytes)
    ))
}

/// `phasegate serve`: drives every rollout continuously and serves the API and the dashboard.
/// On PostgreSQL it is one of any number of replicas, each driving the rollouts it holds the
/// lease of.
pub async fn serve(
    ctx: &Context,
    listen: std::net::SocketAddr,
    leases: LeaseSettings,
) -> CommandResult {
    if leases.renew_every >= leases.lease {
        return Err(Failure::invalid(format!(
            "--renew-every ({}) must be shorter than --lease ({})",
            humantime::format_duration(leases.renew_every),
            humantime::format_duration(leases.lease)
        )));
    }
    // On sled one process drives the store (its file lock); on PostgreSQL the leases share it.
    let _driver = if store::is_postgres(&ctx.store) {
        None
    } else {
        Some(store::lock_driver(&ctx.store)?)
    };
    let store = std::sync::Arc::new(Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?);
    let leasing = if store.is_postgres() {
        Some(runner::Leasing {
            replica: replica_name()?,
            lease: leases.lease,
            renew_every: leases.renew_every,
            max_rollouts: leases.max_rollouts.clamp(1, runner::MAX_ROLLOUTS),
        })
    } else {
        None
    };
    let replica = leasing.as_ref().map(|l| l.replica.clone());
    let runner = Runner::new(
        store.clone(),
        crate::notifier::shared(),
        runner::Settings {
            actor: "serve".into(),
            until: runner::Until::Shutdown,
            only: None,
            once: false,
            limits: engine::Limits::default(),
            leasing,
        },
    );
    let handle = runner.handle();
    let failure = |e: std::io::Error| Failure {
        code: exit::FAILURE,
        message: format!("cannot listen on {listen}: {e}"),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(failure)?;
    let addr = listener.local_addr().map_err(failure)?;
    let token = crate::identity::new_token().map_err(|e| Failure {
        code: exit::FAILURE,
        message: e,
    })?;
    // SIGTERM from the moment the address is out shuts down cleanly.
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let shutdown = daemon::shutdown_signal(stop);
    let published = daemon::publish(
        &ctx.store,
        &daemon::DaemonFile {
            url: daemon::local_url(addr),
            token: token.clone(),
            pid: std::process::id(),
            kind: "serve".into(),
        },
    )
    .map_err(failure)?;
    say!("phasegate serve listening on http://{addr}");
    say!("  store:     {}", store::display_location(&ctx.store));
    if let Some(replica) = &replica {
        say!(
            "  replica:   {replica} (lease {}, renewed every {}, at most {} rollouts)",
            humantime::format_duration(leases.lease),
            humantime::format_duration(leases.renew_every),
            leases.max_rollouts
        );
    }
    say!("  api:       http://{addr}/api/v1/rollouts   dashboard: http://{addr}/");
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let api = tokio::spawn(daemon::serve_api(
        listener,
        handle.clone(),
        store.clone(),
        token.clone(),
        true,
        closing,
    ));
    let report = runner.run(shutdown).await;
    let _ = closing_tx.send(true);
    drop(handle);
    let _ = api.await;
    drop(published);
    let report = report?;
    for (id, error) in &report.errors {
        eprintln!("error: {id}: {}", error.trim_end());
    }
    Ok(exit::OK)
}

pub async fn token_create(ctx: &Context, name: &str, role: &str) -> CommandResult {
    let (name, token, role) = if let Some(remote) = ctx.remote()? {
        let created = remote
            .post(
                "/api/v1/tokens",
                &serde_json::json!({"name": name, "role": role}),
            )
            .await?;
        (
            name.to_string(),
            created["token"].as_str().unwrap_or("").to_string(),
            created["role"].as_str().unwrap_or(role).to_string(),
        )
    } else {
        let parsed = crate::identity::Role::parse(role).ok_or_else(|| {
            Failure::invalid(format!(
                "unknown role `{role}`: expected viewer, approver, operator or admin"
            ))
        })?;
        let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
        let token = crate::api::auth::create(&store, name, parsed)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        (name.to_string(), token, parsed.to_string())
    };
    match ctx.output {
        Output::Json => {
            print_json(&serde_json::json!({"name": name, "role": role, "token": token}))
        }
        Output::Text => {
            say!("{token}");
            eprintln!(
                "token for `{name}` ({role}); it is shown only now — keep it in a secret store"
            );
        }
    }
    Ok(exit::OK)
}

pub async fn token_list(ctx: &Context) -> CommandResult {
    let list: Vec<serde_json::Value> = if let Some(remote) = ctx.remote()? {
        remote
            .get("/api/v1/tokens")
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default()
    } else {
        let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
        store
            .tokens()?
            .iter()
            .map(|t| {
                serde_json::json!({"name": t.name, "role": t.role.as_str(),
                    "created_at": t.created_at.rfc3339(), "revoked_at": t.revoked_at.map(|r| r.rfc3339())})
            })
            .collect()
    };
    match ctx.output {
        Output::Json => print_json(&list),
        Output::Text => {
            say!("{:<24} {:<9} {:<21} REVOKED", "NAME", "ROLE", "CREATED");
            for t in &list {
                say!(
                    "{:<24} {:<9} {:<21} {}",
                    t["name"].as_str().unwrap_or(""),
                    t["role"].as_str().unwrap_or(""),
                    t["created_at"].as_str().unwrap_or(""),
                    t["revoked_at"].as_str().unwrap_or("-")
                );
            }
        }
    }
    Ok(exit::OK)
}

pub async fn token_revoke(ctx: &Context, name: &str) -> CommandResult {
    let revoked = if let Some(remote) = ctx.remote()? {
        remote
            .post(
                &format!("/api/v1/tokens/{name}/revoke"),
                &serde_json::json!({}),
            )
            .await?["revoked"]
            .as_u64()
            .unwrap_or(0) as usize
    } else {
        let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
        crate::api::auth::revoke(&store, name)?
    };
    if revoked == 0 {
        return Err(Failure::invalid(format!("no active token named `{name}`")));
    }
    if ctx.output == Output::Text {
        say!(
            "revoked {revoked} token{} named `{name}`",
            if revoked == 1 { "" } else { "s" }
        );
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

/// The promotions waiting for approval, in one rollout or all, as the store has them.
pub fn pending_approvals(
    store: &Store,
    id: Option<&str>,
) -> Result<Vec<view::PendingApprovalView>, EngineError> {
    let ids: Vec<String> = match id {
        Some(id) => vec![id.to_string()],
        None => store
            .rollouts()?
            .into_iter()
            .map(|r| r.rollout.id)
            .collect(),
    };
    let mut pending = Vec::new();
    for id in ids {
        let loaded = engine::load(store, &id)?;
        let now = provider::view_now(store, &loaded);
        pending.extend(view::pending_approvals(
            &loaded.plan,
            &loaded.stored.rollout,
            now,
        ));
    }
    Ok(pending)
}

/// The pending approvals, through the daemon when one holds the store.
async fn fetch_approvals(
    ctx: &Context,
    id: Option<&str>,
) -> Result<Vec<view::PendingApprovalView>, Failure> {
    if let Some(remote) = ctx.remote()? {
        let path = match id {
            Some(id) => format!("/api/v1/rollouts/{id}/approvals"),
            None => "/api/v1/approvals".to_string(),
        };
        let answer = remote.get(&path).await?;
        return serde_json::from_value(answer).map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("unreadable approvals from the daemon: {e}"),
        });
    }
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    Ok(pending_approvals(&store, id)?)
}

pub async fn approvals(ctx: &Context, id: Option<&str>) -> CommandResult {
    if let Some(id) = id {
        valid_id(id)?;
    }
    let pending = fetch_approvals(ctx, id).await?;
    match ctx.output {
        Output::Json => print_json(&pending),
        Output::Text => say_raw!("{}", text::approvals(&pending)),
    }
    Ok(exit::OK)
}

/// The request a decision about `id` is about: the named phase's, or else the only one.
async fn request_shown(
    ctx: &Context,
    id: &str,
    phase: Option<&str>,
) -> Result<Option<view::PendingApprovalView>, Failure> {
    valid_id(id)?;
    let pending = fetch_approvals(ctx, Some(id)).await?;
    Ok(match phase {
        Some(phase) => pending.into_iter().find(|p| p.phase == phase),
        None if pending.len() == 1 => pending.into_iter().next(),
        None => None,
    })
}

/// Whether `approve` asks before recording: only a person at a terminal, and not with `--yes`.
/// Without a terminal (a script, a pipe, a test) it proceeds as it always did.
pub fn asks_first(stdin_is_terminal: bool, yes: bool) -> bool {
    stdin_is_terminal && !yes
}

/// Whether `text` looks like an approval digest (SHA-256 in hex).
pub fn is_digest(text: &str) -> bool {
    let text = text.trim();
    text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// A person's answer to a yes/no question: only `y` or `yes` (any case) is yes.
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// What an `approve` says: the phase, ticket, comment, and the digest approved.
pub struct Approval {
    pub phase: Option<String>,
    pub ticket: Option<String>,
    pub comment: Option<String>,
    /// `--digest`: the approval digest the approver saw elsewhere (a script, `approvals`).
    pub digest: Option<String>,
}

pub async fn approve(
    ctx: &Context,
    id: &str,
    by: &str,
    approval: Approval,
    yes: bool,
) -> CommandResult {
    let Approval {
        phase,
        ticket,
        comment,
        mut digest,
    } = approval;
    if let Some(given) = &digest
        && !is_digest(given)
    {
        return Err(Failure {
            code: exit::INVALID,
            message: format!(
                "--digest must be a digest as `approvals` shows it (64 hex digits), found `{given}`"
            ),
        });
    }
    let shown = request_shown(ctx, id, phase.as_deref()).await?;
    if ctx.output == Output::Text
        && let Some(request) = &shown
    {
        say_raw!("{}", text::approval_request(request));
    }
    if asks_first(std::io::IsTerminal::is_terminal(&std::io::stdin()), yes) {
        let what = shown.as_ref().map_or_else(
            || format!("the promotion of `{id}`"),
            |r| format!("promoting `{}` of `{id}`", r.phase),
        );
        eprint!("approve {what} on this evidence? [y/N] ");
        let mut answer = String::new();
        let read = std::io::stdin().read_line(&mut answer);
        if read.is_err() || !is_yes(&answer) {
            return Err(Failure {
                code: exit::FAILURE,
                message: "not approved: the answer was not yes; nothing was recorded".into(),
            });
        }
        // The person confirmed what was shown: the approval is for that evidence only.
        if digest.is_none() {
            digest = shown.as_ref().and_then(|r| r.digest.clone());
        }
    }
    let reason = comment.clone().unwrap_or_default();
    let body =
        serde_json::json!({"phase": phase, "ticket": ticket, "comment": comment, "digest": digest});
    submit(ctx, id, by, &reason, ("approve", body), |loaded| {
        let phase = match phase {
            Some(phase) => phase,
            None => machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)?,
        };
        Ok(EventKind::ApprovalGranted {
            phase,
            ticket,
            comment,
            digest,
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
    if ctx.output == Output::Text
        && let Some(request) = request_shown(ctx, id, phase.as_deref()).await?
    {
        say_raw!("{}", text::approval_request(&request));
    }
    let body = serde_json::json!({"phase": phase});
    submit(ctx, id, by, reason, ("reject", body), |loaded| {
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
    let (action, body, kind) = match what {
        Simple::Pause => ("pause", serde_json::json!({}), EventKind::PauseRequested),
        Simple::Resume => ("resume", serde_json::json!({}), EventKind::ResumeRequested),
        Simple::Rollback(to) => (
            "rollback",
            serde_json::json!({"to": to}),
            EventKind::RollbackRequested { to },
        ),
        Simple::Abort => ("abort", serde_json::json!({}), EventKind::AbortRequested),
        Simple::Resolve(resolution) => (
            "drift",
            serde_json::json!({"decision": resolution.as_str()}),
            EventKind::DriftResolved { resolution },
        ),
    };
    submit(ctx, id, by, reason, (action, body), |_| Ok(kind)).await
}

pub async fn plan_approve(
    ctx: &Context,
    id: &str,
    by: &str,
    plan: Option<String>,
    ticket: Option<String>,
    comment: Option<String>,
) -> CommandResult {
    let reason = comment.clone().unwrap_or_default();
    let body = serde_json::json!({"plan": plan, "ticket": ticket, "comment": comment});
    submit(ctx, id, by, &reason, ("plan/approve", body), |loaded| {
        Ok(EventKind::PlanChangeApproved {
            plan_hash: machine::waiting_plan_change(&loaded.stored.rollout, plan.as_deref())?,
            ticket,
            comment,
        })
    })
    .await
}

pub async fn plan_reject(
    ctx: &Context,
    id: &str,
    by: &str,
    plan: Option<String>,
    reason: &str,
) -> CommandResult {
    let body = serde_json::json!({"plan": plan});
    submit(ctx, id, by, reason, ("plan/reject", body), |loaded| {
        Ok(EventKind::PlanChangeRejected {
            plan_hash: machine::waiting_plan_change(&loaded.stored.rollout, plan.as_deref())?,
        })
    })
    .await
}

pub async fn freeze_override(ctx: &Context, id: &str, by: &str, reason: &str) -> CommandResult {
    let body = serde_json::json!({});
    submit(ctx, id, by, reason, ("freeze-override", body), |_| {
        Ok(EventKind::FreezeOverridden)
    })
    .await
}

/// `plan apply`: through the daemon's API when one holds the store, else directly.
pub async fn plan_apply(
    ctx: &Context,
    id: &str,
    file: &Path,
    by: &str,
    reason: &str,
) -> CommandResult {
    let source = std::fs::read_to_string(file)
        .map_err(|e| Failure::invalid(format!("{}: cannot read the plan: {e}", file.display())))?;
    let path = file.display().to_string();
    if let Some(remote) = ctx.remote()? {
        let mut body = serde_json::json!({"plan": source, "file": path, "reason": reason});
        if remote.local {
            body["by"] = serde_json::json!(by);
        }
        let view = remote
            .post(&format!("/api/v1/rollouts/{id}/plan"), &body)
            .await?;
        print_decision(ctx, id, &view);
        return Ok(exit::OK);
    }
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let mut loaded = engine::load(&store, id)?;
    let now = provider::offline_now(&loaded.plan.provider, &store, &loaded)
        .unwrap_or(loaded.stored.rollout.updated_at);
    let engine = engine(&store, "cli");
    let record = engine.apply_plan(&mut loaded, &path, source, by, reason, now)?;
    let loaded = engine::load(&store, id)?;
    print_local(ctx, &loaded, record.as_ref());
    Ok(exit::OK)
}

/// A decision's answer from the daemon: its notes and where the rollout stands.
pub(super) fn print_decision(ctx: &Context, id: &str, view: &serde_json::Value) {
    match ctx.output {
        Output::Json => print_json(view),
        Output::Text => {
            for note in view["recorded"]["notes"].as_array().into_iter().flatten() {
                say!("· {}", note.as_str().unwrap_or(""));
            }
            say!(
                "{}: {} — {}",
                view["id"].as_str().unwrap_or(id),
                view["status"].as_str().unwrap_or(""),
                view["reason"].as_str().unwrap_or("")
            );
        }
    }
}

/// What carries out a pending change: `run`, or nothing before a person decides (a paused
/// rollout's change waits for `resume`).
fn run_hint(rollout: &crate::domain::rollout::Rollout) {
    if rollout.pending.is_empty() {
        return;
    }
    if engine::may_carry_out_any(rollout) {
        say!("`phasegate run {}` carries out the change", rollout.id);
    } else if rollout.status == crate::domain::rollout::RolloutStatus::Paused {
        say!(
            "the pending change waits for `phasegate resume {}`: nothing is written while the rollout is paused",
            rollout.id
        );
    }
}

/// A decision recorded here: its notes and where the rollout stands.
fn print_local(ctx: &Context, loaded: &engine::Loaded, record: Option<&EventRecord>) {
    match ctx.output {
        Output::Json => print_json(&rollout_view(
            &loaded.plan,
            &loaded.stored.rollout,
            loaded.stored.rollout.updated_at,
        )),
        Output::Text => {
            let rollout = &loaded.stored.rollout;
            if let Some(record) = record {
                for note in &record.notes {
                    say!("· {note}");
                }
            }
            say!("{}: {} — {}", rollout.id, rollout.status, rollout.reason);
            run_hint(rollout);
        }
    }
}

/// Applies a person's command and shows where the rollout stands: through the daemon's API when
/// one holds the store, else directly — recorded without contacting the backend either way.
pub(super) async fn submit(
    ctx: &Context,
    id: &str,
    by: &str,
    reason: &str,
    remote_call: (&str, serde_json::Value),
    event: impl FnOnce(&engine::Loaded) -> Result<EventKind, machine::Rejection>,
) -> CommandResult {
    if let Some(remote) = ctx.remote()? {
        let (action, mut body) = remote_call;
        body["reason"] = serde_json::json!(reason);
        if remote.local {
            body["by"] = serde_json::json!(by);
        }
        let view = remote
            .post(&format!("/api/v1/rollouts/{id}/{action}"), &body)
            .await?;
        match ctx.output {
            Output::Json => print_json(&view),
            Output::Text => {
                for note in view["recorded"]["notes"].as_array().into_iter().flatten() {
                    say!("· {}", note.as_str().unwrap_or(""));
                }
                say!(
                    "{}: {} — {}",
                    view["id"].as_str().unwrap_or(id),
                    view["status"].as_str().unwrap_or(""),
                    view["reason"].as_str().unwrap_or("")
                );
            }
        }
        return Ok(exit::OK);
    }
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let loaded = engine::load(&store, id)?;
    let kind = event(&loaded).map_err(EngineError::from)?;
    // A decision is recorded without contacting the backend; `run` carries it out.
    let now = provider::offline_now(&loaded.plan.provider, &store, &loaded)
        .unwrap_or(loaded.stored.rollout.updated_at);
    let engine = engine(&store, "cli");
    let record = engine.submit(id, kind, by, reason, now)?;
    let loaded = engine::load(&store, id)?;
    match ctx.output {
        Output::Json => print_json(&rollout_view(
            &loaded.plan,
            &loaded.stored.rollout,
            loaded.stored.rollout.updated_at,
        )),
        Output::Text => {
            let rollout = &loaded.stored.rollout;
            if let Some(record) = &record {
                for note in &record.notes {
                    say!("· {note}");
                }
            }
            say!("{}: {} — {}", rollout.id, rollout.status, rollout.reason);
            run_hint(rollout);
        }
    }
    Ok(exit::OK)
}

pub async fn history(ctx: &Context, id: &str, verify: bool) -> CommandResult {
    if let Some(remote) = ctx.remote()? {
        let answer = remote
            .get(&format!("/api/v1/rollouts/{id}/history"))
            .await?;
        let verified = answer["verified"].as_bool().unwrap_or(false);
        if verify {
            match ctx.output {
                Output::Json => print_json(&serde_json::json!({"id": id, "verified": verified,
                    "events": answer["events"].as_array().map_or(0, Vec::len), "verification": answer["verification"]})),
                Output::Text if verified => {
                    say!("{id}: {}", answer["verification"].as_str().unwrap_or(""))
                }
                Output::Text => {
                    eprintln!("{id}: {}", answer["verification"].as_str().unwrap_or(""))
                }
            }
            return Ok(if verified { exit::OK } else { exit::FAILURE });
        }
        let events = view::history_records(answer["events"].clone()).map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("unreadable history from the daemon: {e}"),
        })?;
        // The daemon shows them redacted; so does this side, whatever daemon answered.
        let events = view::audit_trail(events);
        match ctx.output {
            Output::Json => print_json(&view::history_json(&events)),
            Output::Text => say_raw!("{}", text::history(&events)),
        }
        return Ok(exit::OK);
    }
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
                Ok(n) => say!("{id}: audit trail verified, {n} events, hash chain intact"),
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
    let events = view::audit_trail(store.events(id)?);
    match ctx.output {
        Output::Json => print_json(&view::history_json(&events)),
        Output::Text => say_raw!("{}", text::history(&events)),
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::{asks_first, is_yes};

    #[test]
    fn approve_asks_only_a_person_at_a_terminal_who_did_not_say_yes_already() {
        assert!(asks_first(true, false));
        assert!(!asks_first(true, true));
        assert!(!asks_first(false, false), "scripts keep working unchanged");
        assert!(!asks_first(false, true));
    }

    #[test]
    fn only_y_or_yes_is_yes() {
        for yes in ["y", "Y", "yes", " YES\n", "Yes\r\n"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yess", "y e s", "ok", "1"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }
}
