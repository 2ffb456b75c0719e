//! The crash harness: kill -9 at any instant loses no transition and repeats no change.
//!
//! Every trial drives the real binary against `phasegate emulator` (with injected faults) on a
//! fresh tenant and store, kills it according to a schedule, then lets a clean `run` finish, and
//! checks the invariants against an uncrashed reference run of the same rollout:
//!
//! - I1 liveness: the rollout completes with every phase promoted, as the reference does;
//! - I2 exactly once, in order: the emulator's ledger holds the same writes (method, path, body
//!   digest) as the reference's, each once, in the same order;
//! - I3 the audit trail has contiguous sequence numbers and its hash chain verifies;
//! - I4 the outbox: every notification the trail committed was delivered, no delivery carries a
//!   key the trail does not have, and every delivery of a key has the same body;
//! - I5 recoverability: every process either exits normally or was killed; the store always
//!   reopens;
//! - I6 durable acknowledgements: every event a killed process printed as committed is in the
//!   trail after the restart;
//! - I7 mutual exclusion: a second `run` on the store exits 4 at once.
//!
//! Tiers: every crash point once (exhaustive), seeded random schedules of 1-10 kills mixing crash
//! points, timed SIGKILLs and start-up kills, and bursts of start-up kills. `HARNESS_SEED` picks
//! the random schedules (printed on every run); a failing seed is saved under
//! `tests/crash-regressions/` and replayed first from then on. `PHASEGATE_CRASH_LONG=1` runs the
//! long version. The self-test switches on deliberate bugs and requires the harness to catch them.
//!
//! This is a `harness = false` test, so its report is printed by every `cargo test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::rng::Rng;
use common::{BIN, Emulator};

const SECRET: &str = "crash-harness-secret";
const ID: &str = "crash-1";

/// How one process invocation of a trial ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// Runs to its end.
    None,
    /// Kills itself at its n-th crash point.
    AtPoint(u64),
    /// SIGKILLed after this long.
    After(Duration),
}

#[derive(Clone, Debug)]
struct Schedule {
    /// Kills for the first invocations (`start`, then `run`s); later ones run clean.
    kills: Vec<Kill>,
    mutation: Option<&'static str>,
    faults: f64,
    fault_seed: u64,
}

#[derive(Default)]
struct Tally {
    trials: AtomicU64,
    kills_at_points: AtomicU64,
    kills_timed: AtomicU64,
    processes: AtomicU64,
    checks: AtomicU64,
    mitigations: AtomicU64,
}

impl Tally {
    fn kills(&self) -> u64 {
        self.kills_at_points.load(Ordering::Relaxed) + self.kills_timed.load(Ordering::Relaxed)
    }
}

fn emulator(faults: f64, seed: u64) -> Emulator {
    Emulator::spawn(&[
        "--devices",
        "300",
        "--ca-rate",
        "100000",
        "--client-secret",
        SECRET,
        "--seed",
        "7",
        "--faults",
        &faults.to_string(),
        "--fault-seed",
        &seed.to_string(),
    ])
}

/// What a finished trial looked like from the outside.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: String,
    phases: Vec<(String, String)>,
    ledger: Vec<(String, String, String)>,
    notified_statuses: Vec<String>,
}

struct Trial {
    dir: tempfile::TempDir,
    emulator: Emulator,
    plan: PathBuf,
}

struct Run {
    code: Option<i32>,
    killed: bool,
    stdout: String,
    stderr: String,
}

impl Trial {
    fn new(faults: f64, seed: u64) -> Trial {
        let emulator = emulator(faults, seed);
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/crash-plan.toml"
        ))
        .unwrap()
        .replace("EMULATOR", &emulator.url);
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, text).unwrap();
        Trial {
            dir,
            emulator,
            plan,
        }
    }

    fn command(&self, args: &[&str], mutation: Option<&str>) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("PHASEGATE_STORE", self.dir.path().join("store"))
            .env("PHASEGATE_GRAPH_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .env_remove("PHASEGATE_CRASH_AT")
            .env_remove("PHASEGATE_CRASH_TRACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match mutation {
            Some(m) => command.env("PHASEGATE_MUTATION", m),
            None => command.env_remove("PHASEGATE_MUTATION"),
        };
        command
    }

    fn invoke(&self, args: &[&str], kill: Kill, mutation: Option<&str>) -> Run {
        let mut command = self.command(args, mutation);
        if let Kill::AtPoint(n) = kill {
            command.env("PHASEGATE_CRASH_AT", n.to_string());
        }
        let mut child = command.spawn().unwrap();
        if let Kill::After(delay) = kill {
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = child.kill();
        }
        let output = child.wait_with_output().unwrap();
        Run {
            code: output.status.code(),
            killed: output.status.signal() == Some(libc_sigkill()),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self
            .command(args, None)
            .arg("--output")
            .arg("json")
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn outcome(&self) -> Outcome {
        let status = self.json(&["status", ID]);
        let ledger = common::writes_of(&self.emulator.get("/_emulator/ledger"));
        let history = self.json(&["history", ID]);
        let notified_statuses = committed_notifications(&history)
            .into_values()
            .map(|(status, _)| status)
            .collect();
        Outcome {
            status: status["status"].as_str().unwrap_or("").into(),
            phases: status["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["id"].as_str().unwrap().into(),
                        p["state"].as_str().unwrap().into(),
                    )
                })
                .collect(),
            ledger,
            notified_statuses,
        }
    }
}

fn libc_sigkill() -> i32 {
    9
}

/// Idempotency keys of every notification the trail committed, with their status and seq.
fn committed_notifications(history: &Value) -> BTreeMap<String, (String, u64)> {
    let mut keys = BTreeMap::new();
    for record in history.as_array().into_iter().flatten() {
        for effect in record["effects"].as_array().into_iter().flatten() {
            if effect["effect"]["type"] == "notify" {
                let id = &effect["id"];
                let key = format!("{ID}:{}.{}", id["seq"], id["index"]);
                keys.insert(
                    key,
                    (
                        effect["effect"]["status"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        record["seq"].as_u64().unwrap_or(0),
                    ),
                );
            }
        }
    }
    keys
}

/// Drives a trial through its schedule and a clean finish; returns what went wrong, if anything.
fn run_trial(schedule: &Schedule, reference: &Outcome, tally: &Tally) -> Result<(), String> {
    let trial = Trial::new(schedule.faults, schedule.fault_seed);
    let plan = trial.plan.to_str().unwrap().to_string();
    let mut printed: Vec<(u64, String, String)> = Vec::new();
    let mut kills = schedule.kills.iter().copied();
    let mut started = false;
    let mut finished = false;
    for invocation in 0..40 {
        let kill = kills.next().unwrap_or(Kill::None);
        let args: Vec<&str> = if started {
            vec!["run", ID]
        } else {
            vec!["start", &plan, "--id", ID, "--by", "harness"]
        };
        let run = trial.invoke(&args, kill, schedule.mutation);
        tally.processes.fetch_add(1, Ordering::Relaxed);
        tally.mitigations.fetch_add(
            run.stderr
                .matches("removing an unfinished sled snapshot")
                .count() as u64
                + run.stderr.matches("removing a half-created store").count() as u64,
            Ordering::Relaxed,
        );
        if run.killed {
            match kill {
                Kill::AtPoint(_) => tally.kills_at_points.fetch_add(1, Ordering::Relaxed),
                _ => tally.kills_timed.fetch_add(1, Ordering::Relaxed),
            };
        }
        for line in run.stdout.lines() {
            // `run` prints `<id>  #<seq> <time>  <event> ... <hash>` once an event is committed.
            if let Some(rest) = line.strip_prefix(&format!("{ID}  #")) {
                let mut parts = rest.split_whitespace();
                let hash = rest.split_whitespace().last().unwrap_or("").to_string();
                if let (Some(seq), Some(_), Some(kind)) = (parts.next(), parts.next(), parts.next())
                {
                    printed.push((seq.parse().unwrap_or(0), kind.to_string(), hash));
                }
            }
        }
        tally.checks.fetch_add(1, Ordering::Relaxed);
        match (run.killed, run.code) {
            (true, _) => {
                if !started && !run.stdout.trim().is_empty() {
                    started = true;
                }
            }
            (false, Some(0)) if !started => started = true,
            (false, Some(2)) if !started && run.stderr.contains("already exists") => started = true,
            (false, Some(0)) => {
                finished = true;
                break;
            }
            (false, code) => {
                return Err(format!(
                    "I5: invocation {invocation} ({}) exited {code:?} unkilled:\n{}{}",
                    args[0], run.stdout, run.stderr
                ));
            }
        }
        if !started && invocation > 3 {
            // The start was killed before it said anything; a rollout may or may not exist.
            started = trial.json(&["status", ID])["id"] == ID;
        }
    }
    if !finished {
        return Err("I1: the rollout never completed".into());
    }
    let outcome = trial.outcome();
    tally.checks.fetch_add(4, Ordering::Relaxed);
    if outcome.status != reference.status || outcome.phases != reference.phases {
        return Err(format!(
            "I1: ended {} {:?}, reference {} {:?}",
            outcome.status, outcome.phases, reference.status, reference.phases
        ));
    }
    if outcome.ledger != reference.ledger {
        return Err(format!(
            "I2: writes differ from the reference:\n  got       {:?}\n  reference {:?}",
            short(&outcome.ledger),
            short(&reference.ledger)
        ));
    }
    let verify = trial
        .command(&["history", ID, "--verify"], None)
        .output()
        .unwrap();
    if verify.status.code() != Some(0) {
        return Err(format!("I3: {}", String::from_utf8_lossy(&verify.stderr)));
    }
    let history = trial.json(&["history", ID]);
    let committed = committed_notifications(&history);
    let deliveries = trial.emulator.get("/_emulator/deliveries");
    let mut bodies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in deliveries["value"].as_array().into_iter().flatten() {
        // `<store id>/<rollout>:<seq>.<index>`: the trail knows the part after the store's id.
        let key = d["idempotencyKey"].as_str().unwrap_or("");
        let key = key
            .split_once('/')
            .map_or(key, |(_, rest)| rest)
            .to_string();
        bodies
            .entry(key)
            .or_default()
            .insert(d["bodySha256"].as_str().unwrap_or("").to_string());
    }
    tally.checks.fetch_add(3, Ordering::Relaxed);
    if let Some(key) = bodies.keys().find(|k| !committed.contains_key(*k)) {
        return Err(format!(
            "I4: delivered {key}, which the trail never committed"
        ));
    }
    if let Some(key) = committed.keys().find(|k| !bodies.contains_key(*k)) {
        return Err(format!("I4: {key} was committed but never delivered"));
    }
    if let Some((key, _)) = bodies.iter().find(|(_, b)| b.len() > 1) {
        return Err(format!("I4: {key} was delivered with different bodies"));
    }
    if outcome.notified_statuses != reference.notified_statuses {
        return Err(format!(
            "I4: notified {:?}, reference {:?}",
            outcome.notified_statuses, reference.notified_statuses
        ));
    }
    let trail: BTreeMap<u64, (String, String)> = history
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let hash = r["hash"].as_str().unwrap_or("");
            (
                r["seq"].as_u64().unwrap_or(0),
                (
                    r["event"]["kind"]["type"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    hash[..hash.len().min(8)].to_string(),
                ),
            )
        })
        .collect();
    tally
        .checks
        .fetch_add(printed.len() as u64, Ordering::Relaxed);
    // The hash covers the commit's wall-clock time, so an event lost and computed again differs.
    if let Some((seq, kind, hash)) = printed
        .iter()
        .find(|(seq, kind, hash)| trail.get(seq) != Some(&(kind.clone(), hash.clone())))
    {
        return Err(format!(
            "I6: event #{seq} ({kind}, {hash}) was reported committed but is not in the trail"
        ));
    }
    Ok(())
}

fn short(ledger: &[(String, String, String)]) -> Vec<String> {
    ledger
        .iter()
        .map(|(m, p, d)| format!("{m} {} {}", p.rsplit('/').next().unwrap_or(""), &d[..8]))
        .collect()
}

/// The uncrashed run, and how many crash points its `start` and `run` pass.
fn reference() -> (Outcome, u64, u64, Duration) {
    let trial = Trial::new(0.0, 0);
    let plan = trial.plan.to_str().unwrap().to_string();
    let count = |args: &[&str]| {
        let trace = trial.dir.path().join(format!("trace-{}", args[0]));
        let started = Instant::now();
        let out = trial
            .command(args, None)
            .env("PHASEGATE_CRASH_TRACE", &trace)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            std::fs::read_to_string(&trace).unwrap().lines().count() as u64,
            started.elapsed(),
        )
    };
    let (start_points, _) = count(&["start", &plan, "--id", ID, "--by", "harness"]);
    let (run_points, took) = count(&["run", ID]);
    let outcome = trial.outcome();
    assert_eq!(outcome.status, "completed");
    assert!(!outcome.ledger.is_empty() && !outcome.notified_statuses.is_empty());
    (outcome, start_points, run_points, took)
}

fn random_schedule(seed: u64, run_points: u64, run_time: Duration) -> Schedule {
    let mut rng = Rng(seed);
    let kills = (0..1 + rng.below(10))
        .map(|_| match rng.below(10) {
            0..=4 => Kill::AtPoint(1 + rng.below(run_points + 4)),
            5..=7 => Kill::After(Duration::from_micros(
                rng.below(run_time.as_micros() as u64 + 1),
            )),
            _ => Kill::After(Duration::from_micros(rng.below(20_000))),
        })
        .collect();
    Schedule {
        kills,
        mutation: None,
        faults: 0.1,
        fault_seed: seed,
    }
}

/// Runs schedules on two workers; returns the failures with their labels.
fn run_all(
    schedules: Vec<(String, Schedule)>,
    reference: &Outcome,
    tally: &Arc<Tally>,
) -> Vec<(String, String)> {
    let queue = Arc::new(Mutex::new(schedules));
    let failures = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..2 {
            let queue = queue.clone();
            let failures = failures.clone();
            let tally = tally.clone();
            scope.spawn(move || {
                loop {
                    let Some((label, schedule)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    tally.trials.fetch_add(1, Ordering::Relaxed);
                    if let Err(why) = run_trial(&schedule, reference, &tally) {
                        failures
                            .lock()
                            .unwrap()
                            .push((label, format!("{why}\n  schedule: {:?}", schedule.kills)));
                    }
                }
            });
        }
    });
    Arc::try_unwrap(failures).unwrap().into_inner().unwrap()
}

fn regression_seeds() -> Vec<u64> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash-regressions");
    let mut seeds: Vec<u64> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| text.trim().parse().ok())
        .collect();
    seeds.sort();
    seeds
}

fn kill_dash_nine_at_any_instant_loses_nothing_and_repeats_nothing() {
    let long = std::env::var("PHASEGATE_CRASH_LONG").is_ok_and(|v| v == "1");
    let seed: u64 = std::env::var("HARNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_128);
    let started = Instant::now();
    let (reference, start_points, run_points, run_time) = reference();
    println!(
        "crash harness: HARNESS_SEED={seed}{}; a clean start passes {start_points} crash points, a clean run {run_points} (in {run_time:?})",
        if long { " (long)" } else { "" }
    );
    let mut schedules: Vec<(String, Schedule)> = Vec::new();
    // Exhaustive: every crash point of `start` and of `run`, once each, with faults on.
    for n in 1..=start_points {
        schedules.push((
            format!("start point {n}"),
            Schedule {
                kills: vec![Kill::AtPoint(n)],
                mutation: None,
                faults: 0.1,
                fault_seed: n,
            },
        ));
    }
    for n in 1..=run_points {
        schedules.push((
            format!("run point {n}"),
            Schedule {
                kills: vec![Kill::None, Kill::AtPoint(n)],
                mutation: None,
                faults: 0.1,
                fault_seed: 1000 + n,
            },
        ));
    }
    // Random multi-kill schedules, saved failures first.
    let random_trials = if long { 900 } else { 30 };
    let mut random_seeds = regression_seeds();
    let mut rng = Rng(seed);
    random_seeds.extend((0..random_trials).map(|_| rng.next()));
    for s in &random_seeds {
        schedules.push((
            format!("random seed {s}"),
            random_schedule(*s, run_points, run_time),
        ));
    }
    // Bursts of kills in the first milliseconds of a process (sled's start-up).
    let bursts = if long { 400 } else { 20 };
    for i in 0..bursts {
        let mut rng = Rng(seed ^ (0xB0057 + i));
        let kills: Vec<Kill> = std::iter::once(Kill::None)
            .chain(
                (0..3 + rng.below(8))
                    .map(|_| Kill::After(Duration::from_micros(rng.below(20_000)))),
            )
            .collect();
        schedules.push((
            format!("start-up burst {i}"),
            Schedule {
                kills,
                mutation: None,
                faults: 0.0,
                fault_seed: 0,
            },
        ));
    }
    let tally = Arc::new(Tally::default());
    let failures = run_all(schedules, &reference, &tally);
    for (label, _) in &failures {
        if let Some(s) = label.strip_prefix("random seed ") {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/crash-regressions/{s}.seed"));
            let _ = std::fs::write(&path, format!("{s}\n"));
        }
    }
    // I7: a second `run` while one drives exits 4 at once.
    let exclusive = Trial::new(0.0, 1);
    let plan = exclusive.plan.to_str().unwrap().to_string();
    assert_eq!(
        exclusive
            .invoke(&["start", &plan, "--id", ID], Kill::None, None)
            .code,
        Some(0)
    );
    let _driver = fs_lock(&exclusive.dir.path().join("store/driver.lock"));
    let second = exclusive.invoke(&["run", ID], Kill::None, None);
    tally.checks.fetch_add(1, Ordering::Relaxed);
    let exclusion_ok = second.code == Some(4)
        && second
            .stderr
            .contains("is in use by another phasegate process");
    println!(
        "crash harness: {} trials, {} kills ({} at crash points, {} timed), {} processes, {} invariant checks, {} failures, sled start-up mitigations fired {} times, {:.0?}",
        tally.trials.load(Ordering::Relaxed),
        tally.kills(),
        tally.kills_at_points.load(Ordering::Relaxed),
        tally.kills_timed.load(Ordering::Relaxed),
        tally.processes.load(Ordering::Relaxed),
        tally.checks.load(Ordering::Relaxed),
        failures.len(),
        tally.mitigations.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        exclusion_ok,
        "I7: the second run exited {:?}: {}",
        second.code, second.stderr
    );
    assert!(
        failures.is_empty(),
        "{} trials failed (repro: HARNESS_SEED={seed} cargo test --test crash):\n{}",
        failures.len(),
        failures
            .iter()
            .map(|(l, w)| format!("- {l}: {w}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        long || tally.kills() >= 300,
        "the CI run must kill at least 300 times, killed {}",
        tally.kills()
    );
}

/// Holds the lock file like a running `run` does.
fn fs_lock(path: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    file
}

fn the_harness_catches_deliberate_bugs() {
    let (reference, _, run_points, _) = reference();
    let tally = Arc::new(Tally::default());
    // Every third crash point in CI (each bug is caught at many); all of them in the long run.
    let long = std::env::var("PHASEGATE_CRASH_LONG").is_ok_and(|v| v == "1");
    let stride = if long { 1 } else { 3 };
    for mutation in ["confirm-before-act", "skip-flush"] {
        let schedules: Vec<(String, Schedule)> = (1..=run_points)
            .step_by(stride)
            .map(|n| {
                (
                    format!("{mutation} at run point {n}"),
                    Schedule {
                        kills: vec![Kill::None, Kill::AtPoint(n)],
                        mutation: Some(mutation),
                        faults: 0.0,
                        fault_seed: 0,
                    },
                )
            })
            .collect();
        let failures = run_all(schedules, &reference, &tally);
        println!(
            "mutation {mutation}: {} of {} single-kill trials caught it",
            failures.len(),
            run_points.div_ceil(stride as u64)
        );
        assert!(
            !failures.is_empty(),
            "the harness missed the `{mutation}` bug"
        );
    }
}

fn main() {
    // `cargo test --test crash -- --list` and filters for other tests: nothing to list or skip.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let checks: [(&str, fn()); 2] = [
        (
            "kill -9 at any instant loses nothing and repeats nothing",
            kill_dash_nine_at_any_instant_loses_nothing_and_repeats_nothing,
        ),
        (
            "the harness catches deliberate bugs",
            the_harness_catches_deliberate_bugs,
        ),
    ];
    for (name, check) in checks {
        println!("crash harness: {name}");
        check();
        println!("crash harness: {name}: ok");
    }
}
