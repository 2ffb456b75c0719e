//! `cargo bench --bench scale`: one `phasegate serve` under many rollouts, each figure beside a
//! baseline measured in the same run.
//!
//! 1. **Driving.** The release binary serves a store of `PHASEGATE_SCALE_ROLLOUTS` (10,000)
//!    simulated rollouts — `PHASEGATE_SCALE_PER_PLAN` (10) of each plan, every rollout on a
//!    simulated tenant of its own (one rollout may drive a policy at a time) with
//!    `PHASEGATE_SCALE_DEVICES` (100) devices — from the moment the process starts until every
//!    rollout waits for an approval (two phases of `PHASEGATE_SCALE_SOAK`, observed every
//!    `PHASEGATE_SCALE_OBSERVE_EVERY`). Simulated time is virtual: the runner jumps a tenant's
//!    clock straight to the next deadline, so a rollout's next observation is due the moment its
//!    previous step is committed, and every rollout is due at once from the start — the worst
//!    case of a backend on real time. The **tick lag** of an observation or tick is the wall time
//!    from when it was due (the commit of the rollout's previous event, or the daemon's start if
//!    later) to its own commit, from the events' `recorded_at` (millisecond resolution); the
//!    **start-up queue** is the wall time from the daemon's start to a rollout's first commit.
//!    The schedule itself is checked in simulated time: no gap between two observations of a
//!    rollout longer than `observe_every`. Peak RSS is the daemon's `VmHWM`. Baseline: the same
//!    run with `PHASEGATE_SCALE_BASELINE` (100) rollouts, which shows how each figure grows with
//!    the number of rollouts.
//! 2. **Reading under watchers.** On the settled daemon of the large run,
//!    `GET /api/v1/rollouts/{id}` (`PHASEGATE_SCALE_REQUESTS` times on one keep-alive
//!    connection) while `PHASEGATE_SCALE_WATCHERS` (200) SSE streams of the watch endpoint are
//!    open, beside the same GET with none open (before and after) and in-process reads of the
//!    same rollout: `Store::rollout` with its events, and `engine::load`, the handler's read.
//! 3. **Reopening.** The large run's store, topped up to `PHASEGATE_SCALE_EVENTS` (1,000,000)
//!    events with pause/resume pairs committed through the engine (on scratch space,
//!    `PHASEGATE_SCALE_SCRATCH`, memory-backed by default: a commit's flush there costs no disk
//!    round trip) and copied back to disk. Each sample is a fresh process. **Reopen and resume**
//!    is the release `phasegate serve` from the spawn of its process until both its API has
//!    answered a `GET /api/v1/rollouts/{id}` (200) and its runner has said it resumed: every
//!    rollout that can move by itself has its actor working, sleeping until its next deadline or
//!    idle, and every rollout waiting for a person is known to the runner (its actor starts on a
//!    command; the sweep of their plan files that follows is timed too). Beside it, for a store
//!    whose every rollout is due: the runner of `phasegate run` in-process, which starts an
//!    actor for every unfinished rollout (until resumed, and until done), and the same loading
//!    one rollout after another (`Store::open`, the listing at a glance, each rollout's record, plan and plan file
//!    from the listed record, its tenant's offline clock). Baseline: a bare `sled` open of the
//!    same directory with the store's configuration. `PHASEGATE_SCALE_REOPENS` (5) samples of
//!    each; the page cache is warm. `PHASEGATE_SCALE_KEEP=DIR` keeps a copy of that store;
//!    `PHASEGATE_SCALE_REOPEN_STORE=DIR` measures only this part, on a store kept so.
//!
//! A quick run: `PHASEGATE_SCALE_ROLLOUTS=1000 PHASEGATE_SCALE_EVENTS=100000 cargo bench --bench
//! scale`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use phasegate::domain::event::EventKind;
use phasegate::domain::rollout::RolloutStatus;
use phasegate::domain::time::Timestamp;
use phasegate::engine::{self, Engine, Limits};
use phasegate::identity::Role;
use phasegate::store::{DEFAULT_LOCK_WAIT, PlanRecord, Store};

const BIN: &str = env!("CARGO_BIN_EXE_phasegate");
const GIB: u64 = 1 << 30;

/// The knobs, from the environment.
struct Sizes {
    rollouts: usize,
    baseline: usize,
    per_plan: usize,
    devices: u32,
    observe_every: Duration,
    soak: String,
    watchers: usize,
    requests: usize,
    /// Events in the store the third part reopens.
    events: usize,
    reopens: usize,
    /// Where that store is topped up (memory-backed if there is one).
    scratch: PathBuf,
    /// Reopen this store (made by an earlier run, kept with `keep`) instead of running parts 1
    /// and 2.
    reopen_store: Option<PathBuf>,
    /// Where to keep a copy of the reopened store, for `reopen_store`.
    keep: Option<PathBuf>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Sizes {
    fn from_env() -> Sizes {
        let every = env_or("PHASEGATE_SCALE_OBSERVE_EVERY", "6h".to_string());
        let shm = Path::new("/dev/shm");
        Sizes {
            rollouts: env_or("PHASEGATE_SCALE_ROLLOUTS", 10_000usize).max(1),
            baseline: env_or("PHASEGATE_SCALE_BASELINE", 100usize).max(1),
            per_plan: env_or("PHASEGATE_SCALE_PER_PLAN", 10usize).max(1),
            devices: env_or("PHASEGATE_SCALE_DEVICES", 100),
            observe_every: humantime::parse_duration(&every).unwrap_or_else(|_| {
                panic!("PHASEGATE_SCALE_OBSERVE_EVERY={every:?} is not a duration")
            }),
            soak: env_or("PHASEGATE_SCALE_SOAK", "1d".to_string()),
            watchers: env_or("PHASEGATE_SCALE_WATCHERS", 200),
            requests: env_or("PHASEGATE_SCALE_REQUESTS", 2_000usize).max(1),
            events: env_or("PHASEGATE_SCALE_EVENTS", 1_000_000),
            reopens: env_or("PHASEGATE_SCALE_REOPENS", 5usize).max(1),
            scratch: std::env::var_os("PHASEGATE_SCALE_SCRATCH")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    if shm.is_dir() {
                        shm.to_path_buf()
                    } else {
                        std::env::temp_dir()
                    }
                }),
            reopen_store: std::env::var_os("PHASEGATE_SCALE_REOPEN_STORE").map(PathBuf::from),
            keep: std::env::var_os("PHASEGATE_SCALE_KEEP").map(PathBuf::from),
        }
    }
}

/// The plan of plan number `plan`, on the simulated tenant `seed`: a report-only phase for
/// everyone, then a notify phase whose gate asks for an approval, where the rollout stops.
fn plan_text(sizes: &Sizes, plan: usize, seed: usize) -> String {
    format!(
        r#"[rollout]
name = "scale-{plan:05}"
description = "scale benchmark"
observe_every = "{every}"

[policy]
compliance = "Scale baseline {plan:05}"
platform = "windows"

[provider]
kind = "simulator"
devices = {devices}
seed = {seed}

[[phase]]
id = "report"
mode = "report"
include = ["All Users"]
exclude = ["Break Glass"]
min_soak = "{soak}"

[phase.gate]
min_reporting = "50%"

[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
exclude = ["Break Glass"]
grace = "7d"
min_soak = "{soak}"

[phase.gate]
approvals = 1
"#,
        every = humantime::format_duration(sizes.observe_every),
        devices = sizes.devices,
        soak = sizes.soak,
    )
}

fn engine(store: &Store) -> Engine<'_> {
    Engine {
        store,
        notifier: phasegate::notifier::shared(),
        actor: "bench".into(),
        delivery: phasegate::retry::Backoff::WEBHOOK,
        limits: Limits::default(),
    }
}

/// Starts `n` rollouts in a new store and makes an admin token: the token, the rollout ids and
/// how long it took.
fn create_store(dir: &Path, sizes: &Sizes, n: usize) -> (String, Vec<String>, Duration) {
    let started = Instant::now();
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the bench store opens");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime builds");
    let engine = engine(&store);
    let plans = dir.join("plans");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (plan_no, nth) = (i / sizes.per_plan, i % sizes.per_plan + 1);
        let text = plan_text(sizes, plan_no, i + 1);
        // A path that does not exist: the runner finds no edited plan file to adopt.
        let path = plans.join(format!("scale-{plan_no:05}-{nth}.toml"));
        let path = path.to_string_lossy().into_owned();
        let plan = phasegate::adapters::parse_plan(&path, &text).expect("the bench plan is valid");
        let id = format!("{}-{nth}", plan.name);
        let record = PlanRecord {
            path,
            source: text.clone(),
            hash: plan.hash.clone(),
        };
        runtime.block_on(async {
            let mut provider = phasegate::provider::connect(&plan.provider, &store)
                .await
                .expect("the simulated tenant opens");
            engine
                .start(&plan, record, &id, "bench", provider.as_mut())
                .await
                .expect("the rollout starts");
        });
        ids.push(id);
    }
    let token = phasegate::api::auth::create(&store, "bench", Role::Admin)
        .expect("an admin token is created");
    (token, ids, started.elapsed())
}

/// A running `phasegate serve`, killed if dropped.
struct Serve {
    child: Child,
    url: String,
    started: SystemTime,
}

impl Serve {
    fn start(store: &Path) -> Serve {
        let started = SystemTime::now();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("PHASEGATE_STORE", store)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("phasegate serve starts");
        let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut first = String::new();
        out.read_line(&mut first).expect("serve prints its address");
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        drain(out, false);
        drain(
            BufReader::new(child.stderr.take().expect("stderr is piped")),
            true,
        );
        Serve {
            child,
            url,
            started,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(mut self) {
        // SAFETY: kill only sends a signal to the child this struct owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("serve exits");
        assert!(status.success(), "serve exited with {status}");
        std::mem::forget(self);
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a child's output as it comes (a full pipe would stall it); errors are shown.
fn drain(from: impl BufRead + Send + 'static, show: bool) {
    std::thread::spawn(move || {
        for line in from.lines().map_while(Result::ok) {
            if show {
                eprintln!("serve: {line}");
            }
        }
    });
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status is readable");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat is readable");
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Polls until the process has used (almost) no CPU for `quiet`: every rollout is waiting for a
/// person. The figures come from the store afterwards, not from this poll.
fn wait_until_idle(pid: u32, quiet: Duration, limit: Duration) -> bool {
    let started = Instant::now();
    let poll = Duration::from_millis(250);
    let mut last = cpu_ticks(pid);
    let mut quiet_since = Instant::now();
    while started.elapsed() < limit {
        std::thread::sleep(poll);
        let now = cpu_ticks(pid);
        // More than one clock tick (10 ms) of CPU in a poll is work, not the flusher.
        if now - last > 1 {
            quiet_since = Instant::now();
        }
        last = now;
        if quiet_since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// A minimal HTTP/1.1 client on one keep-alive connection.
struct Http {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(url: &str) -> Http {
        let host = url
            .strip_prefix("http://")
            .expect("an http:// URL")
            .trim_end_matches('/')
            .to_string();
        let stream = TcpStream::connect(&host).expect("the daemon accepts connections");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Http {
            reader: BufReader::new(stream),
            host,
        }
    }

    fn get(&mut self, path: &str, token: &str) -> (u16, Vec<u8>) {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            self.host
        );
        self.reader
            .get_mut()
            .write_all(head.as_bytes())
            .expect("the request is sent");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {line:?}"));
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("a header line");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if let Some(n) = length {
            body.resize(n, 0);
            self.reader.read_exact(&mut body).expect("the body");
        } else if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).expect("a chunk size");
                let size = usize::from_str_radix(line.trim(), 16).expect("a hex chunk size");
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).expect("a chunk");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        }
        (status, body)
    }
}

/// An open SSE stream of one rollout's watch endpoint, read on a thread of its own.
struct Watcher {
    stream: TcpStream,
    thread: std::thread::JoinHandle<()>,
}

fn open_watchers(
    url: &str,
    token: &str,
    ids: &[String],
    n: usize,
) -> (Vec<Watcher>, Arc<AtomicUsize>) {
    let events = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u16>();
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let watchers: Vec<Watcher> = (0..n)
        .map(|i| {
            let id = &ids[i % ids.len()];
            let mut stream = TcpStream::connect(&host).expect("the daemon accepts a watcher");
            let head = format!(
                "GET /api/v1/rollouts/{id}/watch HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).expect("the watch request is sent");
            let reader = stream.try_clone().expect("the socket clones");
            let ready = ready_tx.clone();
            let events = events.clone();
            let thread = std::thread::spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    let _ = ready.send(0);
                    return;
                }
                let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let _ = ready.send(status);
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line.starts_with("event:") => {
                            events.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                    }
                }
            });
            Watcher { stream, thread }
        })
        .collect();
    for _ in 0..n {
        let status = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every watcher gets an answer");
        assert_eq!(status, 200, "a watch request was refused");
    }
    (watchers, events)
}

fn close_watchers(watchers: Vec<Watcher>) {
    for w in &watchers {
        let _ = w.stream.shutdown(std::net::Shutdown::Both);
    }
    for w in watchers {
        let _ = w.thread.join();
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    percentile(&samples, 0.5)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.0} µs", ms * 1e3)
    }
}

fn ratio(subject: Duration, baseline: Duration) -> String {
    if baseline.is_zero() {
        return "—".into();
    }
    format!("{:.1}×", subject.as_secs_f64() / baseline.as_secs_f64())
}

/// What one driving run found, from the store afterwards.
struct Drive {
    rollouts: usize,
    events: usize,
    /// The rollouts by status, in words.
    statuses: String,
    waiting: usize,
    /// From the daemon's start to its last commit.
    took: Duration,
    /// Per observation or tick: from when it was due to its commit.
    lags: Vec<Duration>,
    /// Per rollout: from the daemon's start to the rollout's first commit.
    first: Vec<Duration>,
    /// The longest simulated gap between two observations of a rollout, over `observe_every`.
    worst_gap: f64,
    peak_rss_kib: u64,
    create: Duration,
}

fn wall_ms(from: Timestamp, to: Timestamp) -> Duration {
    Duration::from_millis((to.as_millis() - from.as_millis()).max(0) as u64)
}

fn analyse(store: &Store, started: SystemTime, observe_every: Duration) -> Drive {
    let rollouts = store.rollouts().expect("the rollouts are listed");
    let started = Timestamp::from_system_time(started);
    let mut drive = Drive {
        rollouts: rollouts.len(),
        events: 0,
        statuses: String::new(),
        waiting: 0,
        took: Duration::ZERO,
        lags: Vec::new(),
        first: Vec::new(),
        worst_gap: 0.0,
        peak_rss_kib: 0,
        create: Duration::ZERO,
    };
    let mut last_commit = started;
    let mut statuses = BTreeMap::<&str, usize>::new();
    for stored in &rollouts {
        *statuses.entry(stored.rollout.status.as_str()).or_default() += 1;
        let events = store
            .events(&stored.rollout.id)
            .expect("the events are read");
        drive.events += events.iter().filter(|e| e.recorded_at >= started).count();
        if let Some(first) = events.iter().find(|e| e.recorded_at >= started) {
            drive.first.push(wall_ms(started, first.recorded_at));
        }
        let mut observed_at: Option<Timestamp> = None;
        for (i, event) in events.iter().enumerate() {
            last_commit = last_commit.max(event.recorded_at);
            let observed = matches!(event.event.kind, EventKind::Observed { .. });
            if (observed || matches!(event.event.kind, EventKind::Tick)) && i > 0 {
                // Simulated time is at the deadline as soon as the step before is committed
                // (or, for the first step of this daemon, as soon as it started).
                let due = events[i - 1].recorded_at.max(started);
                drive.lags.push(wall_ms(due, event.recorded_at));
            }
            if observed {
                if let Some(before) = observed_at {
                    let gap = event.at.since(before).as_secs_f64() / observe_every.as_secs_f64();
                    drive.worst_gap = drive.worst_gap.max(gap);
                }
                observed_at = Some(event.at);
            }
        }
    }
    drive.lags.sort();
    drive.first.sort();
    drive.took = wall_ms(started, last_commit);
    drive.waiting = statuses
        .get(RolloutStatus::WaitingApproval.as_str())
        .copied()
        .unwrap_or(0);
    drive.statuses = statuses
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    drive
}

/// Creates `n` rollouts, serves them until they all wait for an approval, and measures. `then`
/// gets the settled daemon before it is stopped.
fn drive(dir: &Path, sizes: &Sizes, n: usize, then: impl FnOnce(&Serve, &str, &[String])) -> Drive {
    let (token, ids, create) = create_store(dir, sizes, n);
    let serve = Serve::start(dir);
    let limit = Duration::from_secs(3600);
    assert!(
        wait_until_idle(serve.pid(), Duration::from_secs(2), limit),
        "serve did not settle within {limit:?}"
    );
    let peak_rss_kib = proc_status_kib(serve.pid(), "VmHWM:");
    then(&serve, &token, &ids);
    let started = serve.started;
    serve.terminate();
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the store reopens");
    let mut drive = analyse(&store, started, sizes.observe_every);
    drive.peak_rss_kib = peak_rss_kib;
    drive.create = create;
    drive
}

/// Latencies of the same GET, sorted.
fn get_series(http: &mut Http, path: &str, token: &str, n: usize) -> Vec<Duration> {
    for _ in 0..n.div_ceil(20) {
        let (status, body) = http.get(path, token);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let (status, _) = http.get(path, token);
            let took = start.elapsed();
            assert_eq!(status, 200, "GET {path}");
            took
        })
        .collect();
    samples.sort();
    samples
}

/// The API figures, on the settled daemon of the large run.
struct Api {
    target: String,
    bare: Vec<Duration>,
    with_watchers: Vec<Duration>,
    watchers: usize,
    replayed: usize,
    rss_kib: u64,
}

fn api_figures(serve: &Serve, token: &str, ids: &[String], sizes: &Sizes) -> Api {
    let target = ids[ids.len() / 2].clone();
    let path = format!("/api/v1/rollouts/{target}");
    let mut http = Http::connect(&serve.url);
    let bare = get_series(&mut http, &path, token, sizes.requests);
    let order: Vec<String> = (0..ids.len())
        .map(|i| ids[(ids.len() / 2 + i) % ids.len()].clone())
        .collect();
    let (watchers, replayed) = open_watchers(&serve.url, token, &order, sizes.watchers);
    let with_watchers = get_series(&mut http, &path, token, sizes.requests);
    let rss_kib = proc_status_kib(serve.pid(), "VmHWM:");
    let replayed = replayed.load(Ordering::Relaxed);
    close_watchers(watchers);
    // The baseline before and after, so that a drift of the machine shows in neither alone.
    let mut bare = bare;
    bare.extend(get_series(&mut http, &path, token, sizes.requests));
    bare.sort();
    Api {
        target,
        bare,
        with_watchers,
        watchers: sizes.watchers,
        replayed,
        rss_kib,
    }
}

/// In-process reads of the same rollout: the bare store read, and the handler's loading step.
fn store_reads(dir: &Path, id: &str, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the store reopens");
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..n.div_ceil(20) {
            f();
        }
        let mut samples: Vec<Duration> = (0..n)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        samples.sort();
        samples
    };
    let raw = time(&mut || {
        black_box(store.rollout(id).expect("the rollout is read"));
        black_box(store.events(id).expect("its events are read"));
    });
    let load = time(&mut || {
        black_box(engine::load(&store, id).expect("the rollout loads"));
    });
    (raw, load)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("the copy's directory is made");
    for entry in std::fs::read_dir(from).expect("the store directory is read") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("a store file is copied");
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .expect("the copy is synced");
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("a directory")
        .map(|e| {
            let e = e.expect("a directory entry");
            if e.file_type().expect("a file type").is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

/// Appends pause/resume pairs through the engine until the store holds `events` events in all
/// (each rollout ends where it was). Returns the events now in the store.
fn top_up(dir: &Path, events: usize) -> usize {
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the scratch store opens");
    let engine = engine(&store);
    let rollouts = store.rollouts().expect("the rollouts are listed");
    let mut total: usize = rollouts.iter().map(|r| r.rollout.last_seq as usize).sum();
    let missing = events.saturating_sub(total);
    let pairs = missing.div_ceil(2 * rollouts.len().max(1));
    for stored in &rollouts {
        let mut loaded = engine::load(&store, &stored.rollout.id).expect("the rollout loads");
        for _ in 0..pairs {
            if total >= events {
                break;
            }
            for kind in [EventKind::PauseRequested, EventKind::ResumeRequested] {
                let now = loaded.stored.rollout.updated_at;
                engine
                    .command(&mut loaded, kind, "bench", "scale benchmark", now)
                    .expect("pause and resume are recorded")
                    .expect("pause and resume change the rollout");
                total += 1;
            }
        }
    }
    total
}

/// The events in the store in `dir`, from its rollouts' sequence numbers.
fn count_events(dir: &Path) -> usize {
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the store opens");
    let rollouts = store.rollouts().expect("the rollouts are listed");
    rollouts.iter().map(|r| r.rollout.last_seq as usize).sum()
}

/// The child process's side of the reopen figures: one fresh process per sample, so no handle
/// of an earlier sample is still letting go of the store. Prints the figures on one line, in
/// nanoseconds: total, then its parts.
fn reopen_child(mode: &str, dir: &Path) {
    if mode == "run" {
        return run_child(dir);
    }
    if mode != "resume" {
        let started = Instant::now();
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(500))
            .open()
            .expect("sled opens the store's database");
        let took = started.elapsed();
        black_box(&db);
        println!("{} 0 0 0 0 0", took.as_nanos());
        return;
    }
    // Process set-up the runner shares with every command (the webhook client's roots).
    let engine_notifier = phasegate::notifier::shared();
    let started = Instant::now();
    let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the store opens");
    let opened = started.elapsed();
    black_box(engine_notifier);
    // What `Runner::run` does first: the rollouts that need an actor.
    let drivable: Vec<_> = store
        .glances()
        .expect("the rollouts are listed")
        .into_iter()
        .filter(|r| {
            !(matches!(
                r.glance.status,
                RolloutStatus::Completed | RolloutStatus::Aborted
            ) && r.glance.pending == 0)
        })
        .collect();
    let listed = started.elapsed();
    // What an actor started for a due rollout does before its first step, here for every one:
    // its plan from the listed record, the plan file, and (as a command before its provider
    // connects would need) the tenant's offline clock.
    let (mut loading, mut clock) = (Duration::ZERO, Duration::ZERO);
    let mut actors = Vec::with_capacity(drivable.len());
    let files = engine::PlanFiles::default();
    for listed in drivable {
        let t = Instant::now();
        let stored = listed.decode().expect("the rollout decodes");
        let loaded = engine::load_stored(&store, stored).expect("the rollout loads");
        assert!(
            !files.changed(&loaded.plan_record, &loaded.stored.rollout),
            "no plan change to adopt"
        );
        loading += t.elapsed();
        let t = Instant::now();
        let now = phasegate::provider::offline_now(&loaded.plan.provider, &store, &loaded)
            .unwrap_or(loaded.stored.rollout.updated_at);
        black_box(now);
        clock += t.elapsed();
        actors.push(loaded);
    }
    let took = started.elapsed();
    black_box(&actors);
    println!(
        "{} {} {} {} {} {}",
        took.as_nanos(),
        opened.as_nanos(),
        (listed - opened).as_nanos(),
        loading.as_nanos(),
        clock.as_nanos(),
        actors.len()
    );
}

/// What one `phasegate serve` start on a kept store showed, from the spawn of the process.
struct ServeStart {
    /// Its address printed: the store is open and the API listens.
    listening: Duration,
    /// A `GET /api/v1/rollouts/{id}` answered 200.
    answered: Duration,
    /// The runner said it resumed: every rollout that can move has its actor.
    resumed: Duration,
    /// The runner had looked at the plan files of the rollouts waiting for a person.
    swept: Option<Duration>,
    /// The rollouts driven at once and those waiting for a person, as the runner counted them.
    driven: usize,
    waiting: usize,
}

/// The value of `name=` in a log line.
fn log_field(line: &str, name: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Starts the release `phasegate serve` on the store in `dir` and times, from the process's
/// spawn, its API's first answer and the runner's resume; then stops it with SIGTERM.
fn serve_sample(dir: &Path, token: &str, id: &str) -> ServeStart {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("PHASEGATE_STORE", dir)
        .env("RUST_LOG", "warn,phasegate::runner=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("phasegate serve starts");
    let (lines_tx, lines) = std::sync::mpsc::channel::<(Duration, String)>();
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines_tx.send((started.elapsed(), line)).is_err() {
                return;
            }
        }
    });
    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut first = String::new();
    out.read_line(&mut first).expect("serve prints its address");
    let listening = started.elapsed();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    drain(out, false);
    let mut http = Http::connect(&url);
    let (status, body) = http.get(&format!("/api/v1/rollouts/{id}"), token);
    let answered = started.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (mut resumed, mut swept, mut driven, mut waiting) = (None, None, 0, 0);
    while resumed.is_none() || (swept.is_none() && waiting > 0) {
        let (at, line) = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("serve says it resumed");
        if line.contains("resumed: every rollout that can move") {
            resumed = Some(at);
            driven = log_field(&line, "driven").expect("driven= in the resume line");
            waiting = log_field(&line, "waiting").expect("waiting= in the resume line");
        } else if line.contains("looked at the plan files") {
            swept = Some(at);
        } else if !line.contains(" INFO ") {
            eprintln!("serve: {line}");
        }
    }
    // SAFETY: kill only sends a signal to the child started here.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let exit = child.wait().expect("serve exits");
    assert!(exit.success(), "serve exited with {exit}");
    ServeStart {
        listening,
        answered,
        resumed: resumed.expect("the resume line was seen"),
        swept,
        driven,
        waiting,
    }
}

/// The runner of `phasegate run` (until idle, so it starts an actor for every unfinished rollout,
/// as under `serve` for rollouts that can move), in this process: from `Store::open` until it
/// has resumed, then until it is done. Prints both in nanoseconds, and the rollouts it reported.
fn run_child(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime builds");
    let notifier = phasegate::notifier::shared();
    let started = Instant::now();
    let store = Arc::new(Store::open(dir, DEFAULT_LOCK_WAIT).expect("the store opens"));
    let settings = phasegate::runner::Settings {
        actor: "bench".into(),
        until: phasegate::runner::Until::Idle,
        only: None,
        once: false,
        limits: Limits::default(),
        leasing: None,
    };
    let runner = phasegate::runner::Runner::new(store, notifier, settings);
    let mut resumed = runner.handle().resumed();
    let (resumed_at, report) = runtime.block_on(async move {
        let running = tokio::spawn(runner.run(std::future::pending()));
        resumed.wait_for(|r| *r).await.expect("the runner resumes");
        let at = started.elapsed();
        (at, running.await.expect("the runner ends"))
    });
    let report = report.expect("the runner reports");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    println!(
        "{} {} 0 0 0 {}",
        resumed_at.as_nanos(),
        started.elapsed().as_nanos(),
        report.rollouts.len()
    );
}

/// One reopen sample in a fresh process: total, open, list, load, tenant clock, rollouts loaded.
fn reopen_sample(mode: &str, dir: &Path) -> [u128; 6] {
    let out = Command::new(std::env::current_exe().expect("the bench's own path"))
        .args(["--bench", "--reopen", mode])
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("the reopen sample runs");
    assert!(out.status.success(), "the reopen sample failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u128> = text
        .split_whitespace()
        .map(|w| w.parse().expect("a number"))
        .collect();
    numbers
        .try_into()
        .unwrap_or_else(|n| panic!("unexpected reopen figures {n:?}"))
}

struct Reopen {
    rollouts: usize,
    events: usize,
    bytes: u64,
    top_up: Duration,
    serve: Vec<ServeStart>,
    run: Vec<[u128; 6]>,
    resume: Vec<[u128; 6]>,
    bare: Vec<Duration>,
}

/// Tops the large run's store up to `sizes.events` events on scratch space (a commit's flush
/// there costs no disk round trip), copies it back to disk, and reopens it there.
fn reopen_figures(from: &Path, sizes: &Sizes) -> Reopen {
    if let Some(kept) = &sizes.reopen_store {
        return reopen_samples(kept, sizes, 0, Duration::ZERO);
    }
    let scratch_root = tempfile::tempdir_in(&sizes.scratch).expect("a scratch directory");
    let scratch = scratch_root.path().join("store");
    copy_dir(from, &scratch);
    let started = Instant::now();
    let events = top_up(&scratch, sizes.events);
    let top_up = started.elapsed();
    let disk_root = tempfile::tempdir().expect("a temporary directory");
    let dir = disk_root.path().join("store");
    copy_dir(&scratch, &dir);
    drop(scratch_root);
    if let Some(keep) = &sizes.keep {
        copy_dir(&dir, keep);
    }
    reopen_samples(&dir, sizes, events, top_up)
}

/// The reopen samples on the store in `dir`.
fn reopen_samples(dir: &Path, sizes: &Sizes, events: usize, top_up: Duration) -> Reopen {
    let (rollouts, token, target) = {
        let store = Store::open(dir, DEFAULT_LOCK_WAIT).expect("the copied store opens");
        let rollouts = store.rollouts().expect("the rollouts are listed");
        let name = format!("bench-reopen-{}", std::process::id());
        let token = phasegate::api::auth::create(&store, &name, Role::Viewer)
            .expect("a viewer token is created");
        let target = rollouts[rollouts.len() / 2].rollout.id.clone();
        (rollouts.len(), token, target)
    };
    let events = if events == 0 {
        count_events(dir)
    } else {
        events
    };
    let mut resume = Vec::new();
    let mut bare = Vec::new();
    let mut serve = Vec::new();
    let mut run = Vec::new();
    for _ in 0..sizes.reopens {
        bare.push(Duration::from_nanos(reopen_sample("sled", dir)[0] as u64));
        serve.push(serve_sample(dir, &token, &target));
        run.push(reopen_sample("run", dir));
        resume.push(reopen_sample("resume", dir));
    }
    Reopen {
        rollouts,
        events,
        bytes: dir_bytes(dir),
        top_up,
        serve,
        run,
        resume,
        bare,
    }
}

fn row(what: &str, subject: &str, baseline: &str, ratio: &str) {
    println!("  {what:<50} {subject:<36} {baseline:<50} {ratio}");
}

fn spread(samples: &[Duration], quantiles: &[f64]) -> String {
    quantiles
        .iter()
        .map(|q| ms(percentile(samples, *q)))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The same for figures read from `recorded_at`, which counts whole milliseconds.
fn spread_coarse(samples: &[Duration], quantiles: &[f64]) -> String {
    quantiles
        .iter()
        .map(|q| match percentile(samples, *q) {
            d if d.is_zero() => "<1 ms".to_string(),
            d => ms(d),
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// A ratio of millisecond figures, a zero counted as half a millisecond.
fn ratio_coarse(subject: Duration, baseline: Duration) -> String {
    let floor = Duration::from_micros(500);
    ratio(subject.max(floor), baseline.max(floor))
}

fn per_event(d: &Drive) -> Duration {
    d.took
        .checked_div(d.events.max(1) as u32)
        .unwrap_or_default()
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// Part 3's table; returns the figure the target is about.
fn print_reopen(reopen: &Reopen) -> Duration {
    let part = |i: usize| {
        median(
            reopen
                .resume
                .iter()
                .map(|r| Duration::from_nanos(r[i] as u64))
                .collect(),
        )
    };
    let serve = |f: fn(&ServeStart) -> Duration| median(reopen.serve.iter().map(f).collect());
    let resume = serve(|s| s.answered.max(s.resumed));
    let bare = median(reopen.bare.clone());
    let first = &reopen.serve[0];
    println!(
        "3. reopening the store of {} rollouts / {} events ({:.0} MiB, warm page cache; topped up in {:.0} s): median of {} fresh processes",
        reopen.rollouts,
        reopen.events,
        reopen.bytes as f64 / f64::from(1 << 20),
        reopen.top_up.as_secs_f64(),
        reopen.serve.len()
    );
    row("measured", "median", "baseline median", "ratio");
    row(
        "serve: process start to resumed and API answering",
        &ms(resume),
        &format!("{} bare sled open", ms(bare)),
        &ratio(resume, bare),
    );
    row(
        "  address printed (store open, API listening)",
        &ms(serve(|s| s.listening)),
        "",
        "",
    );
    row(
        "  first GET /api/v1/rollouts/{id} answered",
        &ms(serve(|s| s.answered)),
        "",
        "",
    );
    row(
        &format!(
            "  resumed ({} driven at once, {} waiting for a person)",
            first.driven, first.waiting
        ),
        &ms(serve(|s| s.resumed)),
        "",
        "",
    );
    if reopen.serve.iter().all(|s| s.swept.is_some()) {
        row(
            "  plan files of those waiting looked at (after)",
            &ms(serve(|s| s.swept.unwrap_or_default())),
            "",
            "",
        );
    }
    let run = |i: usize| {
        median(
            reopen
                .run
                .iter()
                .map(|r| Duration::from_nanos(r[i] as u64))
                .collect(),
        )
    };
    row(
        &format!(
            "in-process runner, an actor for each of {}: resumed",
            reopen.run.first().map_or(0, |r| r[5])
        ),
        &ms(run(0)),
        "",
        &ratio(run(0), bare),
    );
    row("  every actor idle, runner done", &ms(run(1)), "", "");
    row(
        &format!(
            "in-process, one after another: open, list, load {}",
            reopen.resume.first().map_or(0, |r| r[5])
        ),
        &ms(part(0)),
        "",
        &ratio(part(0), bare),
    );
    row("  Store::open", &ms(part(1)), "", &ratio(part(1), bare));
    row(
        "  listing the rollouts at a glance (Runner::run)",
        &ms(part(2)),
        "",
        "",
    );
    row(
        "  each actor's record, plan and plan file (decode, load_stored)",
        &ms(part(3)),
        "",
        "",
    );
    row("  each tenant's offline clock", &ms(part(4)), "", "");
    resume
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--reopen") {
        let (mode, dir) = (&args[at + 1], Path::new(&args[at + 2]));
        reopen_child(mode, dir);
        return;
    }
    // `cargo test --benches` runs this without `--bench`; stay quick there.
    if !args.iter().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench scale` to measure");
        return;
    }
    let sizes = Sizes::from_env();
    let began = Instant::now();
    let every = humantime::format_duration(sizes.observe_every);
    println!(
        "phasegate scale benchmark: {} rollouts ({} per plan, each on a simulated tenant of its own with {} devices; observe_every {every}, min_soak {})",
        sizes.rollouts, sizes.per_plan, sizes.devices, sizes.soak
    );

    if let Some(kept) = &sizes.reopen_store {
        let reopen = reopen_figures(kept, &sizes);
        println!();
        let resume = print_reopen(&reopen);
        println!(
            "target: reopen ≤ 300 ms: {} ({})",
            if resume <= Duration::from_millis(300) {
                "met"
            } else {
                "NOT met"
            },
            ms(resume)
        );
        return;
    }
    let base_root = tempfile::tempdir().expect("a temporary directory");
    let base = drive(
        &base_root.path().join("store"),
        &sizes,
        sizes.baseline,
        |_, _, _| {},
    );
    drop(base_root);
    eprintln!("[{:.0?}] the baseline run is done", began.elapsed());
    let root = tempfile::tempdir().expect("a temporary directory");
    let dir = root.path().join("store");
    let mut api = None;
    let large = drive(&dir, &sizes, sizes.rollouts, |serve, token, ids| {
        api = Some(api_figures(serve, token, ids, &sizes));
    });
    let api = api.expect("the API was measured");
    eprintln!("[{:.0?}] the large run is done", began.elapsed());
    let (raw_reads, loads) = store_reads(&dir, &api.target, sizes.requests);
    let reopen = reopen_figures(&dir, &sizes);
    drop(root);
    eprintln!("[{:.0?}] reopening is measured", began.elapsed());

    println!();
    println!(
        "1. one release `phasegate serve` (store on disk) from its start until every rollout waits for an approval; baseline: the same with {} rollouts",
        sizes.baseline
    );
    row(
        "measured",
        &format!("{} rollouts", large.rollouts),
        &format!("{} rollouts (baseline)", base.rollouts),
        "ratio",
    );
    row(
        "rollouts by status at the end",
        &large.statuses,
        &base.statuses,
        "",
    );
    row(
        "events committed by the daemon, in",
        &format!("{} in {:.1} s", large.events, large.took.as_secs_f64()),
        &format!("{} in {:.1} s", base.events, base.took.as_secs_f64()),
        &format!(
            "{:.0}× the events in {} the time",
            large.events as f64 / base.events.max(1) as f64,
            ratio(large.took, base.took)
        ),
    );
    row(
        "wall time per event",
        &ms(per_event(&large)),
        &ms(per_event(&base)),
        &ratio(per_event(&large), per_event(&base)),
    );
    let q = [0.5, 0.9, 0.99, 1.0];
    row(
        "tick lag p50 / p90 / p99 / max",
        &spread_coarse(&large.lags, &q),
        &spread_coarse(&base.lags, &q),
        &format!(
            "p99 {}, max {}",
            ratio_coarse(percentile(&large.lags, 0.99), percentile(&base.lags, 0.99)),
            ratio_coarse(percentile(&large.lags, 1.0), percentile(&base.lags, 1.0))
        ),
    );
    row(
        "start-up queue p50 / max",
        &spread_coarse(&large.first, &[0.5, 1.0]),
        &spread_coarse(&base.first, &[0.5, 1.0]),
        &ratio_coarse(percentile(&large.first, 1.0), percentile(&base.first, 1.0)),
    );
    row(
        "longest simulated gap between observations",
        &format!("{:.2} × observe_every", large.worst_gap),
        &format!("{:.2} × observe_every", base.worst_gap),
        "",
    );
    row(
        "peak RSS (VmHWM)",
        &mib(large.peak_rss_kib),
        &mib(base.peak_rss_kib),
        &format!(
            "{:.1}×",
            large.peak_rss_kib as f64 / base.peak_rss_kib.max(1) as f64
        ),
    );
    row(
        "starting the rollouts (in-process Engine::start)",
        &format!("{:.1} s", large.create.as_secs_f64()),
        &format!("{:.2} s", base.create.as_secs_f64()),
        &ratio(large.create, base.create),
    );

    println!();
    println!(
        "2. GET /api/v1/rollouts/{} on the settled daemon of {} rollouts: {} requests per series on one keep-alive connection",
        api.target, large.rollouts, sizes.requests
    );
    row("measured", "p50 / p99", "baseline p50 / p99", "p50 ratio");
    let p = [0.5, 0.99];
    row(
        &format!("GET, {} SSE watchers open", api.watchers),
        &spread(&api.with_watchers, &p),
        &format!("{} the same GET, no watchers", spread(&api.bare, &p)),
        &ratio(
            percentile(&api.with_watchers, 0.5),
            percentile(&api.bare, 0.5),
        ),
    );
    row(
        "",
        "",
        &format!("{} Store::rollout + events", spread(&raw_reads, &p)),
        &ratio(
            percentile(&api.with_watchers, 0.5),
            percentile(&raw_reads, 0.5),
        ),
    );
    row(
        "",
        "",
        &format!("{} engine::load (the handler's read)", spread(&loads, &p)),
        &ratio(percentile(&api.with_watchers, 0.5), percentile(&loads, 0.5)),
    );
    row(
        "events replayed to the watchers; peak RSS then",
        &format!("{}; {}", api.replayed, mib(api.rss_kib)),
        "",
        "",
    );

    let resume = print_reopen(&reopen);

    println!();
    let late = percentile(&large.lags, 1.0).max(percentile(&large.first, 1.0));
    let on_time = late <= sizes.observe_every
        && large.worst_gap <= 1.0 + 1e-9
        && large.waiting == large.rollouts;
    let rss = large.peak_rss_kib.max(api.rss_kib);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: every rollout observed within observe_every ({every}): {} (latest {} after due, simulated gap {:.2}×); peak RSS ≤ 1 GiB: {} ({}); reopen ≤ 300 ms: {} ({})",
        verdict(on_time),
        ms(late),
        large.worst_gap,
        verdict(rss * 1024 <= GIB),
        mib(rss),
        verdict(resume <= Duration::from_millis(300)),
        ms(resume)
    );
    println!("total wall time {:.0} s", began.elapsed().as_secs_f64());
}
