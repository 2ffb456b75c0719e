//! The crash harness with replicas: three `phasegate serve` replicas on one PostgreSQL server (a
//! real one, `common::postgres`) drive 100 rollouts to completion — 94 on simulated tenants, and
//! one in [`GRAPH_EVERY`] (6) through the Graph plan on a `phasegate emulator` of their own —
//! while a seeded chaos schedule kills owners (SIGKILL at a random instant, or at a random crash
//! point of their own through `PHASEGATE_CRASH_AT`), pauses them past their lease (SIGSTOP, then
//! SIGCONT: the woken owner must be fenced) and restarts replicas. Approvals are given through
//! random replicas as they fall due, as people would.
//!
//! Checked at the end, for every rollout:
//! - H1 liveness: completed, every phase promoted, nothing pending;
//! - H2 the audit trail has contiguous sequence numbers and its hash chain verifies;
//! - H3 nothing done twice: every effect the trail committed is concluded exactly once, no
//!   conclusion names an effect the trail did not commit, one approval per phase that needs one;
//! - H4 the tenant's writes: the simulated tenant's configuration history (its record of every
//!   write applied, kept in the store) holds every configuration the trail's reconcile effects
//!   asked for, in order, and ends in the last: no write lost. A configuration more would be a
//!   write of an owner paused between confirming its lease and writing that landed late (the
//!   simulated tenant refuses it under a lost lease; a real one could not): reported with where
//!   it landed;
//! - H5 acknowledged is durable: every commit a replica logged (`chain head`, replicas killed
//!   later included) is in the trail with its hash, and so is every approval the API acknowledged;
//! - H6 fencing: an owner woken after its leases were taken commits nothing for those rollouts
//!   until it holds their lease again;
//! - H7 every replica that was not killed stops cleanly (exit 0) on SIGTERM;
//! - H8 a Graph rollout's writes: its trail asked for the configurations an uninterrupted
//!   reference run of the same plan on a fresh emulator asked for, and its emulator's ledger
//!   holds the reference's writes in order, and nothing else. A write is the ledger's method,
//!   path and body digest, with the rollout and store of the ownership line blanked; the same
//!   write as an earlier entry (that the reference does not repeat) is a write applied twice, a
//!   failure — unless an owner of the rollout was paused past its lease and woken after it was
//!   taken: a write it sent after its last lease check landed late (Graph cannot refuse it; the
//!   owner asks its lease right before each write, so only a stall after that check is left),
//!   reported with where it landed.
//!
//! Failover times (an owner killed or paused → the first commit of each of its rollouts by
//! another replica) are printed beside the lease length, with the kills, pauses and fenced
//! commits, the Graph rollouts and the ledger writes checked, and the late stale writes.
//! `HARNESS_SEED` picks the schedule (printed on every run); `PHASEGATE_CRASH_LONG=1` runs more
//! trials. This is a `harness = false` test, so its report is printed by every `cargo test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::rng::Rng;
use common::{BIN, Emulator, Phasegate, SECRET, code, stderr, stdout};
use phasegate::domain::event::{Effect, EventKind};
use phasegate::domain::rollout::{PhaseState, RolloutStatus};
use phasegate::provider::simulator::SimAssignment;
use phasegate::store::{DEFAULT_LOCK_WAIT, EventRecord, Store};
use serde_json::{Value, json};

/// The replicas' lease and renewal interval: short, so that failovers happen many times a run.
const LEASE: Duration = Duration::from_secs(2);
const RENEW_EVERY: Duration = Duration::from_secs(1);
const REPLICAS: usize = 3;
/// Two replicas can hold every rollout between them while the third is down.
const MAX_ROLLOUTS: usize = 50;
/// A simulated fleet per rollout (each rollout drives a tenant of its own).
const DEVICES: u32 = 1000;
/// The chaos schedule's beat: a random interval in this range (milliseconds); at each beat an
/// owner is killed (3 in 10), paused past its lease (2 in 10) or left alone.
const BEAT: (u64, u64) = (500, 1500);
/// The whole run gives up after this long (a hang is a failure, not a wait).
const GIVE_UP: Duration = Duration::from_secs(240);
/// One rollout in this many (`ha-000`, `ha-017`, ...) drives the Graph plan
/// (`tests/fixtures/replicas-graph-plan.toml`) against a `phasegate emulator` of its own: 6 of
/// the 100.
const GRAPH_EVERY: usize = 17;
/// The emulators' tenant: its fleet and seed (the reference run's too).
const EMULATOR_ARGS: [&str; 8] = [
    "--devices",
    "300",
    "--ca-rate",
    "100000",
    "--client-secret",
    SECRET,
    "--seed",
    "7",
];

/// A configuration a reconcile effect asked for: assignments, exempt users, exempt groups.
type Config = (Vec<SimAssignment>, Vec<String>, Vec<String>);
/// An application write in an emulator's ledger: method, path, body digest (with the rollout and
/// the store named in ownership lines blanked, see [`ledger_writes`]).
type LedgerWrite = (String, String, String);

/// What a replica is doing.
#[derive(Debug)]
enum State {
    Running,
    /// SIGSTOPped until `until`; `held` are the leases it held (rollout, epoch) when paused.
    Paused {
        until: Instant,
        held: BTreeMap<String, i64>,
    },
    /// SIGCONTed after a pause; its log from `log_from` on is what it did awake.
    Woken,
    /// Gone: killed by the harness (`by_us`), or by itself at a crash point.
    Dead,
}

/// One `phasegate serve` process of the run.
struct Replica {
    child: Child,
    url: String,
    /// Its name in `phasegate.leases`.
    name: String,
    log: Arc<Mutex<String>>,
    state: State,
    crash_at: Option<u64>,
    /// Pauses it woke from: the rollouts taken from it meanwhile, with the event each was at when
    /// it woke, and where its log was then.
    wakes: Vec<(BTreeMap<String, i64>, usize)>,
    killed_by_us: bool,
    exit: Option<std::process::ExitStatus>,
}

fn drain(from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let mut log = into.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

impl Replica {
    /// Starts a replica on `store`; `None` if it died before saying where it listens (a crash
    /// point at start-up).
    fn start(store: &str, data: &Path, crash_at: Option<u64>) -> Option<Replica> {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--lease", &format!("{}s", LEASE.as_secs())])
            .args(["--renew-every", &format!("{}s", RENEW_EVERY.as_secs())])
            .args(["--max-rollouts", &MAX_ROLLOUTS.to_string()])
            .env("PHASEGATE_STORE", store)
            .env("PHASEGATE_GRAPH_SECRET", SECRET)
            .env("XDG_DATA_HOME", data)
            .env("RUST_LOG", "phasegate=info")
            .env_remove("PHASEGATE_MUTATION")
            .env_remove("PHASEGATE_CRASH_TRACE")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match crash_at {
            Some(n) => command.env("PHASEGATE_CRASH_AT", n.to_string()),
            None => command.env_remove("PHASEGATE_CRASH_AT"),
        };
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        drain(child.stderr.take().unwrap(), log.clone());
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut url, mut name) = (None, None);
        let mut line = String::new();
        while name.is_none() {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            log.lock().unwrap().push_str(&line);
            if url.is_none() {
                url = line
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_string);
            }
            if let Some(rest) = line.trim().strip_prefix("replica:") {
                name = rest.split_whitespace().next().map(str::to_string);
            }
        }
        drain(out, log.clone());
        match (url, name) {
            (Some(url), Some(name)) => Some(Replica {
                child,
                url,
                name,
                log,
                state: State::Running,
                crash_at,
                wakes: Vec::new(),
                killed_by_us: false,
                exit: None,
            }),
            _ => {
                let _ = child.wait();
                None
            }
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to the child this harness started.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    fn output(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn alive(&self) -> bool {
        !matches!(self.state, State::Dead)
    }

    fn running(&self) -> bool {
        matches!(self.state, State::Running | State::Woken)
    }
}

/// An API call with a token, bounded in time (a paused replica accepts connections and never
/// answers): its status and JSON body, or why there was none.
fn call(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &Value,
    limit: Duration,
) -> Result<(u16, Value), String> {
    let host = base.strip_prefix("http://").ok_or("not an http URL")?;
    let address: std::net::SocketAddr = host.parse().map_err(|e| format!("{host}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.set_write_timeout(Some(limit)).unwrap();
    let text = body.to_string();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        text.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(text.as_bytes()))
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// A rollout's plan: the simulator's example plan on a tenant of its own, with gates every
/// simulated fleet passes (the harness is about completing, not about being held).
fn plan_text(seed: u64) -> String {
    include_str!("../plans/windows-baseline.toml")
        .replace("seed = 7", &format!("seed = {seed}"))
        .replace("devices = 10000", &format!("devices = {DEVICES}"))
        .replace(
            "max_noncompliant_ratio = \"2%\"",
            "max_noncompliant_ratio = \"25%\"",
        )
        .replace(
            "blocked_ratio_above = \"5%\"",
            "blocked_ratio_above = \"50%\"",
        )
        .replace("min_reporting = \"85%\"", "min_reporting = \"60%\"")
        .replace("min_reporting = \"95%\"", "min_reporting = \"60%\"")
        .replace("max_error_ratio = \"5%\"", "max_error_ratio = \"50%\"")
        .replace("max_error_ratio = \"2%\"", "max_error_ratio = \"50%\"")
}

/// A Graph rollout's plan, on the emulator at `url` serving `tenant`.
fn graph_plan_text(url: &str, tenant: &str) -> String {
    include_str!("fixtures/replicas-graph-plan.toml")
        .replace("EMULATOR", url)
        .replace(
            "tenant = \"contoso.onmicrosoft.com\"",
            &format!("tenant = \"{tenant}\""),
        )
}

/// The emulator of a Graph rollout: a tenant of its own (phasegate lets one rollout at a time
/// drive a policy of a tenant, and the emulators' policies have the same ids).
fn graph_tenant(id: &str) -> (Emulator, String) {
    let tenant = format!("{id}.onmicrosoft.com");
    let mut args = EMULATOR_ARGS.to_vec();
    args.extend(["--tenant", &tenant]);
    (Emulator::spawn(&args), tenant)
}

/// What an uninterrupted run of the Graph plan does on a fresh emulator: the writes in its
/// ledger and the configurations its trail's reconcile effects asked for. Every Graph rollout of
/// the harness must end with the same (H8).
struct Reference {
    writes: Vec<LedgerWrite>,
    wanted: Vec<Config>,
}

/// The reference: `phasegate start` and `run` (approving when asked) on a sled store of its own,
/// no replica, no chaos.
fn reference() -> Reference {
    const ID: &str = "ha-reference";
    let (emulator, tenant) = graph_tenant(ID);
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, graph_plan_text(&emulator.url, &tenant)).unwrap();
    let store = dir.path().join("store");
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("PHASEGATE_STORE", &store)
            .env("PHASEGATE_GRAPH_SECRET", SECRET)
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env_remove("RUST_LOG")
            .env_remove("PHASEGATE_CRASH_AT")
            .env_remove("PHASEGATE_MUTATION")
            .output()
            .unwrap()
    };
    let plan = plan.to_str().unwrap();
    let out = cli(&["start", plan, "--id", ID, "--by", "alice"]);
    assert_eq!(code(&out), 0, "reference start: {}", stderr(&out));
    let mut completed = false;
    for _ in 0..8 {
        let out = cli(&["run", ID]);
        match code(&out) {
            0 => {
                completed = true;
                break;
            }
            3 => {
                let approve = cli(&["approve", ID, "--by", "bob"]);
                assert_eq!(
                    code(&approve),
                    0,
                    "reference approval: {}",
                    stderr(&approve)
                );
            }
            other => panic!("reference run exited {other}: {}", stderr(&out)),
        }
    }
    assert!(completed, "the reference rollout did not complete");
    let writes = ledger_writes(&emulator.get("/_emulator/ledger"), ID);
    let store = Store::open(&store, DEFAULT_LOCK_WAIT).unwrap();
    let wanted = wanted_of(&store.events(ID).unwrap());
    assert!(!writes.is_empty() && !wanted.is_empty());
    Reference { writes, wanted }
}

/// The application's writes in an emulator's ledger, the rollout's id blanked in ownership lines
/// (as the store is by [`common::writes_of`]): the reference's rollout and store are other ones.
fn ledger_writes(ledger: &Value, rollout: &str) -> Vec<LedgerWrite> {
    let text = ledger.to_string().replace(
        &format!("phasegate: rollout {rollout} "),
        "phasegate: rollout * ",
    );
    common::writes_of(&serde_json::from_str(&text).unwrap())
}

/// The configurations a trail's reconcile effects asked for, in order, each once in a row.
fn wanted_of(events: &[EventRecord]) -> Vec<Config> {
    let mut wanted: Vec<Config> = Vec::new();
    for record in events {
        for pending in &record.effects {
            if let Effect::Reconcile { desired, .. } = &pending.effect {
                let assignments = desired
                    .assignments
                    .iter()
                    .map(SimAssignment::from)
                    .collect();
                let entry = (
                    assignments,
                    desired.exempt.users.clone(),
                    desired.exempt.groups.clone(),
                );
                if wanted.last() != Some(&entry) {
                    wanted.push(entry);
                }
            }
        }
    }
    wanted
}

/// H8 on one emulator's ledger (`entries`, the raw ledger's application writes beside `writes`,
/// the same normalised): the reference's writes must all be there, in order. A write more is a
/// failure, unless it repeats one already applied while an owner of the rollout had been paused
/// past its lease and woken after it was taken (`stale_possible`): a late stale write, returned
/// with where it landed.
fn check_ledger(
    writes: &[LedgerWrite],
    entries: &[Value],
    reference: &[LedgerWrite],
    stale_possible: bool,
) -> Result<Vec<String>, String> {
    let mut matched = 0;
    let mut late = Vec::new();
    for (n, write) in writes.iter().enumerate() {
        if reference.get(matched) == Some(write) {
            matched += 1;
            continue;
        }
        let entry = &entries[n];
        let landed = format!(
            "ledger #{} at {} ({} of {} writes): {} {}",
            entry["sequence"],
            entry["at"].as_str().unwrap_or("?"),
            n + 1,
            writes.len(),
            write.0,
            write.1
        );
        match writes[..n].iter().position(|w| w == write) {
            Some(first) if stale_possible => late.push(format!(
                "{landed} applied again (first as write {}), after {} of the reference's {} writes",
                first + 1,
                matched,
                reference.len()
            )),
            Some(first) => {
                return Err(format!(
                    "H8: a write applied twice: {landed} repeats write {} with no owner paused past its lease",
                    first + 1
                ));
            }
            None if reference[matched..].contains(write) => {
                return Err(format!(
                    "H8: a write lost or out of order: {landed} came before the reference's write {} ({} {})",
                    matched + 1,
                    reference[matched].0,
                    reference[matched].1
                ));
            }
            None => return Err(format!("H8: a write the trail did not ask for: {landed}")),
        }
    }
    if matched < reference.len() {
        return Err(format!(
            "H8: the ledger's writes {} lack the reference's write {} ({} {}); the reference's: {}",
            short(writes),
            matched + 1,
            reference[matched].0,
            reference[matched].1,
            short(reference)
        ));
    }
    Ok(late)
}

/// H8 must catch what it is there for: a write lost, out of order, applied twice, or never asked
/// for; and tell a late stale write (an owner paused past its lease) from a repeat.
fn self_test_check_ledger() {
    let write = |path: &str, body: &str| ("PATCH".to_string(), path.to_string(), body.repeat(8));
    let (a, b, c) = (write("/a", "1"), write("/b", "2"), write("/a", "3"));
    let reference = [a.clone(), b.clone(), c.clone()];
    let check = |writes: &[LedgerWrite], paused: bool| {
        let entries: Vec<Value> = (1..=writes.len())
            .map(|n| json!({"sequence": n, "at": "2026-01-01T00:00:00Z"}))
            .collect();
        check_ledger(writes, &entries, &reference, paused)
    };
    assert_eq!(check(&reference, false), Ok(Vec::new()));
    let late = [a.clone(), b.clone(), c.clone(), a.clone()];
    assert!(check(&late, false).is_err_and(|e| e.contains("applied twice")));
    assert!(check(&late, true).is_ok_and(|l| l.len() == 1 && l[0].contains("ledger #4")));
    let twice = [a.clone(), a.clone(), b.clone(), c.clone()];
    assert!(check(&twice, false).is_err_and(|e| e.contains("applied twice")));
    assert!(check(&[a.clone(), c.clone()], false).is_err_and(|e| e.contains("lost")));
    assert!(check(&[a.clone(), b.clone()], false).is_err_and(|e| e.contains("lack")));
    let swapped = [b.clone(), a.clone(), c.clone()];
    assert!(check(&swapped, true).is_err_and(|e| e.contains("out of order")));
    let unasked = [a.clone(), b.clone(), write("/z", "9"), c.clone()];
    assert!(check(&unasked, true).is_err_and(|e| e.contains("did not ask for")));
}

fn short(writes: &[LedgerWrite]) -> String {
    let items: Vec<String> = writes
        .iter()
        .map(|(method, path, digest)| format!("{method} {path} {}", &digest[..8]))
        .collect();
    format!("[{}]", items.join(", "))
}

/// An owner taken out (killed or paused) and its rollouts that could move, with the event each
/// was at: each one's first commit after `at` is its failover.
struct Outage {
    at: Instant,
    paused: bool,
    replica: usize,
    waiting: BTreeMap<String, (i64, Duration)>,
}

#[derive(Default)]
struct Figures {
    kills: u64,
    kills_at_points: u64,
    pauses: u64,
    restarts: u64,
    fenced: u64,
    /// Fenced commits in the `/metrics` of the replicas alive at the end.
    fenced_in_metrics: u64,
    lost_at_renewal: u64,
    /// Writes of a paused owner that landed in the tenant after the new owner's (H4 reports them).
    stale_writes: u64,
    /// Rollouts on an emulator of their own, their ledgers' application writes checked (H8), and
    /// the late stale writes among them (an owner paused after its last lease check).
    graph_rollouts: u64,
    ledger_writes: u64,
    late_graph_writes: u64,
    approvals: u64,
    failovers: Vec<Duration>,
    /// The Graph rollouts' among them (a new owner also signs in to its tenant).
    graph_failovers: Vec<Duration>,
    after_expiry: Vec<Duration>,
    commits_logged: u64,
}

/// Everything one run looked at.
struct Trial {
    url: String,
    root: tempfile::TempDir,
    /// Bob's (an admin: approves, reads the metrics) and Alice's (an operator: starts).
    token: String,
    operator: String,
    replicas: Vec<Replica>,
    rng: Rng,
    db: postgres::Client,
    store: Store,
    ids: Vec<(String, u64)>,
    /// The Graph rollouts' emulators and their tenants, by rollout.
    emulators: BTreeMap<String, (Emulator, String)>,
    figures: Figures,
    /// Approvals acknowledged by the API: rollout and the event number it recorded.
    acknowledged: Arc<Mutex<Vec<(String, u64)>>>,
    approving: Arc<Mutex<BTreeSet<String>>>,
    /// The URLs of the replicas running now.
    urls: Arc<Mutex<Vec<String>>>,
    /// How the API answered the approvals, by status (and error).
    answers: Arc<Mutex<BTreeMap<String, u64>>>,
    /// How long each approval took the API to answer (or fail).
    latencies: Arc<Mutex<Vec<Duration>>>,
    /// Where a stale write landed, for the report.
    stale: Vec<String>,
    problems: Vec<String>,
}

impl Trial {
    fn new(server: &Postgres, seed: u64) -> Trial {
        let url = server.database();
        let pg = Phasegate::offline();
        let root = tempfile::tempdir().unwrap();
        let cli = pg
            .with_env("PHASEGATE_STORE", &url)
            .with_env("XDG_DATA_HOME", root.path().join("cli").to_str().unwrap());
        // Alice starts the rollouts, Bob approves them (separation of duties).
        let token_of = |name: &str, role: &str| {
            let out = cli.run(&["token", "create", "--name", name, "--role", role]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            stdout(&out).trim().to_string()
        };
        let operator = token_of("alice", "operator");
        let token = token_of("bob", "admin");
        let db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let store = Store::open(url.as_ref(), DEFAULT_LOCK_WAIT).unwrap();
        Trial {
            url,
            root,
            token,
            operator,
            replicas: Vec::new(),
            rng: Rng(seed),
            db,
            store,
            ids: Vec::new(),
            emulators: BTreeMap::new(),
            figures: Figures::default(),
            acknowledged: Arc::default(),
            approving: Arc::default(),
            urls: Arc::default(),
            answers: Arc::default(),
            latencies: Arc::default(),
            stale: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Starts a replica; one in three (after the first three) kills itself at a random crash
    /// point of its own.
    fn start_replica(&mut self, may_crash: bool) {
        let n = self.replicas.len();
        let crash_at = (may_crash && self.rng.below(3) == 0).then(|| 20 + self.rng.below(2000));
        let data = self.root.path().join(format!("replica-{n}"));
        match Replica::start(&self.url, &data, crash_at) {
            Some(replica) => self.replicas.push(replica),
            None => self.figures.kills_at_points += 1,
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].running())
            .collect()
    }

    fn pick_running(&mut self) -> Option<usize> {
        let running = self.running();
        (!running.is_empty()).then(|| running[self.rng.below(running.len() as u64) as usize])
    }

    /// The event each rollout is at.
    fn seqs(&mut self) -> BTreeMap<String, i64> {
        self.db
            .query(
                "SELECT convert_from(key, 'UTF8'), seq FROM phasegate.entries WHERE tree = 'rollouts'",
                &[],
            )
            .unwrap()
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// The live leases: rollout → (owner, epoch, time left).
    fn live_leases(&mut self) -> BTreeMap<String, (String, i64, Duration)> {
        self.db
            .query(
                "SELECT rollout, owner, epoch, (extract(epoch FROM (expires_at - now())) * 1000)::bigint
                 FROM phasegate.leases WHERE expires_at > now()",
                &[],
            )
            .unwrap()
            .into_iter()
            .map(|row| {
                let left: i64 = row.get(3);
                (
                    row.get(0),
                    (
                        row.get(1),
                        row.get(2),
                        Duration::from_millis(left.max(0) as u64),
                    ),
                )
            })
            .collect()
    }

    /// Rollout → (status, pending effects), from the store.
    fn statuses(&self) -> BTreeMap<String, (RolloutStatus, usize)> {
        self.store
            .glances()
            .unwrap()
            .into_iter()
            .map(|g| (g.glance.id.clone(), (g.glance.status, g.glance.pending)))
            .collect()
    }

    /// Starts the rollouts through the replicas' API on a thread of its own, while the chaos
    /// goes on: each on a running replica (`running`, kept up to date by the harness), again on
    /// another if that one died before answering (a rollout that exists already was started).
    fn start_rollouts(&mut self, count: usize, base_seed: u64) -> std::thread::JoinHandle<()> {
        self.ids = (0..count)
            .map(|n| (format!("ha-{n:03}"), base_seed + n as u64))
            .collect();
        for (n, (id, _)) in self.ids.iter().enumerate() {
            if n % GRAPH_EVERY == 0 {
                self.emulators.insert(id.clone(), graph_tenant(id));
            }
        }
        self.figures.graph_rollouts = self.emulators.len() as u64;
        let bodies: Vec<(String, Value)> = self
            .ids
            .iter()
            .map(|(id, seed)| {
                let file = self.root.path().join(format!("{id}.toml"));
                let text = match self.emulators.get(id) {
                    Some((emulator, tenant)) => graph_plan_text(&emulator.url, tenant),
                    None => plan_text(*seed),
                };
                std::fs::write(&file, &text).unwrap();
                let body = json!({"plan": text, "file": file.to_str().unwrap(), "id": id});
                (id.clone(), body)
            })
            .collect();
        let (operator, running) = (self.operator.clone(), self.urls.clone());
        std::thread::spawn(move || {
            for (n, (id, body)) in bodies.iter().enumerate() {
                let since = Instant::now();
                let mut last = String::new();
                for attempt in 0.. {
                    assert!(
                        since.elapsed() < Duration::from_secs(60),
                        "{id} could not be started: {last}"
                    );
                    let urls = running.lock().unwrap().clone();
                    let Some(url) = urls.get((n + attempt) % urls.len().max(1)) else {
                        // No replica is running: the harness restarts one.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let limit = Duration::from_secs(15);
                    match call(url, "POST", "/api/v1/rollouts", &operator, body, limit) {
                        Ok((201, _)) => break,
                        Ok((409, answer))
                            if answer["error"].to_string().contains("already exists") =>
                        {
                            break;
                        }
                        Ok((status, answer)) if status < 500 => {
                            panic!("starting {id}: {status} {answer}")
                        }
                        Ok((status, answer)) => last = format!("{status} {answer}"),
                        Err(e) => last = e,
                    }
                    // The replica died or failed: the next one (after a moment, for the harness to
                    // notice and replace the dead).
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    }

    /// Asks a running replica to approve `id` on a thread of its own (a forwarded command may
    /// take until its owner answers).
    fn approve(&mut self, id: &str) {
        if !self.approving.lock().unwrap().insert(id.to_string()) {
            return;
        }
        let Some(i) = self.pick_running() else {
            self.approving.lock().unwrap().remove(id);
            return;
        };
        self.figures.approvals += 1;
        let (url, token, id) = (
            self.replicas[i].url.clone(),
            self.token.clone(),
            id.to_string(),
        );
        let (acknowledged, approving) = (self.acknowledged.clone(), self.approving.clone());
        let answers = self.answers.clone();
        let latencies = self.latencies.clone();
        std::thread::spawn(move || {
            let asked = Instant::now();
            let answer = call(
                &url,
                "POST",
                &format!("/api/v1/rollouts/{id}/approve"),
                &token,
                &json!({"by": "bob"}),
                Duration::from_secs(70),
            );
            let label = match &answer {
                Ok((200, view)) => match view["recorded"]["seq"].as_u64() {
                    Some(seq) => {
                        acknowledged.lock().unwrap().push((id.clone(), seq));
                        "200".to_string()
                    }
                    None => format!("200 without a record: {view}"),
                },
                Ok((status, view)) => format!("{status} {}", view["error"]),
                Err(e) => format!("no answer: {e}"),
            };
            *answers.lock().unwrap().entry(label).or_default() += 1;
            latencies.lock().unwrap().push(asked.elapsed());
            approving.lock().unwrap().remove(&id);
        });
    }

    /// The rollouts replica `i` holds a live lease of that can move without a person, with the
    /// event each is at and its lease's time left.
    fn owned_moving(&mut self, i: usize) -> BTreeMap<String, (i64, Duration)> {
        let name = self.replicas[i].name.clone();
        let leases = self.live_leases();
        let seqs = self.seqs();
        let statuses = self.statuses();
        leases
            .into_iter()
            .filter(|(id, (owner, _, _))| {
                *owner == name
                    && statuses.get(id).is_some_and(|(status, pending)| {
                        *pending > 0
                            || matches!(
                                status,
                                RolloutStatus::Running
                                    | RolloutStatus::RollingBack
                                    | RolloutStatus::Aborting
                            )
                    })
            })
            .map(|(id, (_, _, left))| {
                let seq = seqs.get(&id).copied().unwrap_or(0);
                (id, (seq, left))
            })
            .collect()
    }

    fn owners(&mut self) -> Vec<usize> {
        let leases = self.live_leases();
        self.running()
            .into_iter()
            .filter(|&i| leases.values().any(|(o, _, _)| *o == self.replicas[i].name))
            .collect()
    }

    /// One beat of the chaos schedule: kill an owner, pause one, or let them be.
    fn chaos(&mut self, outages: &mut Vec<Outage>) {
        let running = self.running();
        if running.len() < 2 {
            return;
        }
        let owners = self.owners();
        if owners.is_empty() {
            return;
        }
        let victim = owners[self.rng.below(owners.len() as u64) as usize];
        match self.rng.below(10) {
            0..=2 => {
                self.replicas[victim].signal(libc::SIGKILL);
                let at = Instant::now();
                let _ = self.replicas[victim].child.wait();
                self.replicas[victim].state = State::Dead;
                self.replicas[victim].killed_by_us = true;
                self.figures.kills += 1;
                let waiting = self.owned_moving(victim);
                outages.push(Outage {
                    at,
                    paused: false,
                    replica: victim,
                    waiting,
                });
            }
            3..=4 => {
                self.replicas[victim].signal(libc::SIGSTOP);
                let at = Instant::now();
                self.figures.pauses += 1;
                let name = self.replicas[victim].name.clone();
                let held = self
                    .live_leases()
                    .into_iter()
                    .filter(|(_, (owner, _, _))| *owner == name)
                    .map(|(id, (_, epoch, _))| (id, epoch))
                    .collect();
                let pause = LEASE + RENEW_EVERY + self.rng.millis(200, 2500);
                self.replicas[victim].state = State::Paused {
                    until: at + pause,
                    held,
                };
                let waiting = self.owned_moving(victim);
                outages.push(Outage {
                    at,
                    paused: true,
                    replica: victim,
                    waiting,
                });
            }
            _ => {}
        }
    }

    /// Wakes the replicas whose pause is over, noting which of their leases were taken.
    fn wake(&mut self, outages: &mut Vec<Outage>) {
        let now = Instant::now();
        let leases: BTreeMap<String, (String, i64)> = self
            .db
            .query("SELECT rollout, owner, epoch FROM phasegate.leases", &[])
            .unwrap()
            .into_iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
        let seqs = self.seqs();
        for i in 0..self.replicas.len() {
            let State::Paused { until, held } = &self.replicas[i].state else {
                continue;
            };
            if *until > now {
                continue;
            }
            let taken: BTreeMap<String, i64> = held
                .iter()
                .filter(|(id, epoch)| leases.get(*id).is_some_and(|(_, e)| e != *epoch))
                .map(|(id, _)| (id.clone(), seqs.get(id).copied().unwrap_or(0)))
                .collect();
            let from = self.replicas[i].log.lock().unwrap().len();
            self.replicas[i].wakes.push((taken, from));
            self.replicas[i].signal(libc::SIGCONT);
            self.replicas[i].state = State::Woken;
            // Its rollouts not taken meanwhile are its own again: no failover to measure.
            outages.retain(|o| !(o.paused && o.replica == i));
        }
    }

    /// Notices replicas that died by themselves (a crash point: SIGKILL) and replaces the dead.
    fn tend_replicas(
        &mut self,
        dead_since: &mut BTreeMap<usize, Instant>,
        restart_after: Duration,
    ) {
        for i in 0..self.replicas.len() {
            let replica = &mut self.replicas[i];
            if replica.alive()
                && !matches!(replica.state, State::Paused { .. })
                && let Ok(Some(status)) = replica.child.try_wait()
            {
                replica.exit = Some(status);
                replica.state = State::Dead;
                if status.signal() == Some(libc::SIGKILL) && replica.crash_at.is_some() {
                    self.figures.kills_at_points += 1;
                } else {
                    self.problems.push(format!(
                        "H7: replica {} exited by itself ({status}):\n{}",
                        replica.name,
                        tail(&replica.output())
                    ));
                }
            }
            if !self.replicas[i].alive() {
                dead_since.entry(i).or_insert_with(Instant::now);
            }
        }
        let alive = self.replicas.iter().filter(|r| r.alive()).count();
        let due = dead_since
            .iter()
            .filter(|(_, at)| at.elapsed() >= restart_after)
            .map(|(i, _)| *i)
            .next();
        if alive < REPLICAS
            && let Some(i) = due
        {
            dead_since.remove(&i);
            self.figures.restarts += 1;
            self.start_replica(true);
        } else if alive >= REPLICAS {
            dead_since.clear();
        }
    }

    /// Notes the failovers that happened: the first commit of an outage's rollout after it.
    fn failovers(&mut self, outages: &mut Vec<Outage>) {
        if outages.is_empty() {
            return;
        }
        let seqs = self.seqs();
        let now = Instant::now();
        for outage in outages.iter_mut() {
            outage.waiting.retain(|id, (seq, left)| {
                if seqs.get(id).is_some_and(|s| s > seq) {
                    let took = now - outage.at;
                    self.figures.failovers.push(took);
                    if self.emulators.contains_key(id) {
                        self.figures.graph_failovers.push(took);
                    }
                    self.figures.after_expiry.push(took.saturating_sub(*left));
                    false
                } else {
                    true
                }
            });
        }
        outages.retain(|o| !o.waiting.is_empty() && o.at.elapsed() < Duration::from_secs(60));
    }

    /// Drives the run: chaos while any rollout is unfinished, approvals as they fall due.
    fn drive(&mut self, starter: std::thread::JoinHandle<()>) -> Result<Duration, String> {
        let started = Instant::now();
        let mut starter = Some(starter);
        let mut outages: Vec<Outage> = Vec::new();
        let mut dead_since = BTreeMap::new();
        let mut next_beat = Instant::now() + self.rng.millis(BEAT.0, BEAT.1);
        let mut restart_after = self.rng.millis(0, 1500);
        let mut statuses_at = Instant::now();
        loop {
            if started.elapsed() > GIVE_UP {
                let statuses = self.statuses();
                let unfinished: Vec<_> = statuses
                    .iter()
                    .filter(|(_, (s, p))| *s != RolloutStatus::Completed || *p > 0)
                    .collect();
                return Err(format!(
                    "H1: {} rollouts unfinished after {GIVE_UP:?}: {unfinished:?}",
                    unfinished.len()
                ));
            }
            self.wake(&mut outages);
            self.tend_replicas(&mut dead_since, restart_after);
            let urls = self
                .running()
                .into_iter()
                .map(|i| self.replicas[i].url.clone())
                .collect();
            *self.urls.lock().unwrap() = urls;
            if starter.as_ref().is_some_and(|s| s.is_finished()) {
                starter
                    .take()
                    .unwrap()
                    .join()
                    .map_err(|_| "the rollouts could not be started".to_string())?;
            }
            self.failovers(&mut outages);
            if Instant::now() >= next_beat {
                self.chaos(&mut outages);
                next_beat = Instant::now() + self.rng.millis(BEAT.0, BEAT.1);
                restart_after = self.rng.millis(0, 1500);
            }
            if statuses_at.elapsed() >= Duration::from_millis(200) {
                statuses_at = Instant::now();
                let statuses = self.statuses();
                let waiting: Vec<String> = statuses
                    .iter()
                    .filter(|(_, (s, _))| *s == RolloutStatus::WaitingApproval)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in waiting {
                    self.approve(&id);
                }
                if starter.is_none()
                    && statuses.len() == self.ids.len()
                    && statuses
                        .values()
                        .all(|(s, p)| *s == RolloutStatus::Completed && *p == 0)
                {
                    return Ok(started.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wakes the paused, scrapes the fenced commits of those alive and stops them (H7).
    fn stop_all(&mut self) {
        for replica in &mut self.replicas {
            if let State::Paused { .. } = replica.state {
                replica.signal(libc::SIGCONT);
                replica.state = State::Woken;
            }
        }
        for replica in &mut self.replicas {
            if !replica.alive() {
                continue;
            }
            self.figures.fenced_in_metrics += fenced_in_metrics(&replica.url, &self.token);
            replica.signal(libc::SIGTERM);
        }
        for replica in &mut self.replicas {
            if !replica.alive() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                match replica.child.try_wait().unwrap() {
                    Some(status) => break Some(status),
                    None if Instant::now() > deadline => break None,
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            replica.state = State::Dead;
            replica.exit = status;
            if status.and_then(|s| s.code()) != Some(0) {
                let _ = replica.child.kill();
                let _ = replica.child.wait();
                self.problems.push(format!(
                    "H7: replica {} did not stop cleanly on SIGTERM ({status:?}):\n{}",
                    replica.name,
                    tail(&replica.output())
                ));
            }
        }
    }

    /// Fenced commits and leases found lost at renewal, from every replica's log (the metric
    /// dies with a killed replica; the log of each is kept by the harness).
    fn count_fencing(&mut self) {
        for replica in &self.replicas {
            let log = replica.output();
            self.figures.fenced += log
                .matches("lost the rollout's lease: another replica drives it now")
                .count() as u64;
            self.figures.lost_at_renewal += log
                .matches("the rollout's lease was taken by another replica")
                .count() as u64;
        }
    }

    /// H6: after waking, a replica logs no commit of a rollout taken from it, beyond the event
    /// the rollout was at when it woke, before it takes that rollout's lease again. (A commit
    /// made just before the pause may be logged after it.)
    fn check_fencing(&mut self) {
        for replica in &self.replicas {
            let log = replica.output();
            for (taken, from) in &replica.wakes {
                let mut retaken = BTreeSet::new();
                for line in log[*from..].lines() {
                    let Some(id) = field(line, "rollout") else {
                        continue;
                    };
                    let Some(at_wake) = taken.get(id) else {
                        continue;
                    };
                    let seq: i64 = field(line, "seq").and_then(|s| s.parse().ok()).unwrap_or(0);
                    if line.contains("took the rollout's lease") {
                        retaken.insert(id.to_string());
                    } else if line.contains("chain head") && seq > *at_wake && !retaken.contains(id)
                    {
                        self.problems.push(format!(
                            "H6: replica {} committed {id} after waking although its lease had been taken: {line}",
                            replica.name
                        ));
                    }
                }
            }
        }
    }

    /// H5 (commits): every `chain head` any replica logged, as (rollout, seq) → hash.
    fn logged_commits(&mut self) -> BTreeMap<(String, u64), BTreeSet<String>> {
        let mut logged: BTreeMap<(String, u64), BTreeSet<String>> = BTreeMap::new();
        for replica in &self.replicas {
            for line in replica
                .output()
                .lines()
                .filter(|l| l.contains("chain head"))
            {
                if let (Some(id), Some(seq), Some(hash)) = (
                    field(line, "rollout"),
                    field(line, "seq").and_then(|s| s.parse().ok()),
                    field(line, "hash"),
                ) {
                    logged
                        .entry((id.to_string(), seq))
                        .or_default()
                        .insert(hash.to_string());
                }
            }
        }
        self.figures.commits_logged = logged.len() as u64;
        logged
    }

    /// The rollouts taken from an owner while it was paused past its lease (it woke after).
    fn taken_while_paused(&self) -> BTreeSet<String> {
        self.replicas
            .iter()
            .flat_map(|r| r.wakes.iter().flat_map(|(taken, _)| taken.keys().cloned()))
            .collect()
    }

    /// H8 for a Graph rollout: its trail asked for the reference's configurations, and its
    /// emulator's ledger holds the reference's writes, in order, none twice.
    fn check_graph(&mut self, id: &str, wanted: &[Config], reference: &Reference) -> Vec<String> {
        let mut problems = Vec::new();
        if wanted != reference.wanted {
            problems.push(format!(
                "H8: the trail asked for the configurations {}, the reference's {}",
                summary(wanted),
                summary(&reference.wanted)
            ));
        }
        let ledger = self.emulators[id].0.get("/_emulator/ledger");
        let writes = ledger_writes(&ledger, id);
        let entries: Vec<Value> = ledger["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["actor"] != "admin")
            .cloned()
            .collect();
        self.figures.ledger_writes += writes.len() as u64;
        let stale_possible = self.taken_while_paused().contains(id);
        match check_ledger(&writes, &entries, &reference.writes, stale_possible) {
            Ok(late) => {
                self.figures.late_graph_writes += late.len() as u64;
                self.stale
                    .extend(late.into_iter().map(|l| format!("{id} (Graph): {l}")));
            }
            Err(problem) => problems.push(problem),
        }
        problems
    }

    /// H1–H5 (and H8 for the Graph rollouts) for every rollout, from the store itself.
    fn check_rollouts(&mut self, reference: &Reference) {
        let logged = self.logged_commits();
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        let simulator = self.store.provider_tree("simulator").unwrap();
        let mut trails: BTreeMap<String, BTreeMap<u64, (String, String)>> = BTreeMap::new();
        for (id, seed) in self.ids.clone() {
            let mut problems = Vec::new();
            let stored = self.store.rollout(&id).unwrap();
            let rollout = &stored.rollout;
            if rollout.status != RolloutStatus::Completed
                || !rollout.pending.is_empty()
                || rollout
                    .phases
                    .iter()
                    .any(|p| p.state != PhaseState::Promoted)
            {
                problems.push(format!(
                    "H1: ended {:?} with phases {:?} and {} effects pending",
                    rollout.status,
                    rollout
                        .phases
                        .iter()
                        .map(|p| p.state.as_str())
                        .collect::<Vec<_>>(),
                    rollout.pending.len()
                ));
            }
            match self.store.verify(&id).unwrap() {
                Ok(n) if n == rollout.last_seq => {}
                Ok(n) => problems.push(format!(
                    "H2: {n} events verified, the rollout is at {}",
                    rollout.last_seq
                )),
                Err(why) => problems.push(format!("H2: {why}")),
            }
            let events = self.store.events(&id).unwrap();
            let trail: BTreeMap<u64, (String, String)> = events
                .iter()
                .map(|e| (e.seq, (e.event.kind.name().to_string(), e.hash.clone())))
                .collect();
            // H3: effects committed and concluded, each once.
            let mut requested = BTreeMap::new();
            let mut concluded: BTreeMap<String, u32> = BTreeMap::new();
            let wanted = wanted_of(&events);
            let mut approvals: BTreeMap<String, u32> = BTreeMap::new();
            for record in &events {
                for pending in &record.effects {
                    requested.insert(pending.id.to_string(), pending.effect.clone());
                }
                if let Some(effect) = concluded_effect(&record.event.kind) {
                    *concluded.entry(effect).or_default() += 1;
                }
                if let EventKind::ApprovalGranted { phase, .. } = &record.event.kind {
                    *approvals.entry(phase.clone()).or_default() += 1;
                }
            }
            for (effect, times) in &concluded {
                if !requested.contains_key(effect) {
                    problems.push(format!("H3: effect {effect} concluded but never committed"));
                } else if *times > 1 {
                    problems.push(format!("H3: effect {effect} concluded {times} times"));
                }
            }
            if let Some(effect) = requested.keys().find(|e| !concluded.contains_key(*e)) {
                problems.push(format!("H3: effect {effect} committed but never concluded"));
            }
            if approvals.values().any(|n| *n != 1) || approvals.is_empty() {
                problems.push(format!("H3: approvals per phase {approvals:?}"));
            }
            // H4: the simulated tenant's history of configurations against the trail's; H8: the
            // emulator's ledger against the reference's.
            let tenant = simulator
                .scan_prefix(format!("tenant/{seed}/{DEVICES}/"))
                .unwrap();
            if self.emulators.contains_key(&id) {
                problems.extend(self.check_graph(&id, &wanted, reference));
            } else {
                match tenant.as_slice() {
                    [(_, bytes)] => {
                        let state: Value = serde_json::from_slice(bytes).unwrap();
                        let history = tenant_history(&state["data"]);
                        // Every configuration the trail asked for was applied, in order, and the
                        // tenant ends in the last one. A write more is a stale one that landed: an
                        // owner paused between confirming its lease and writing (reported).
                        let mut rest = history.iter();
                        let applied = wanted.iter().all(|w| rest.any(|h| h == w));
                        if !applied || history.last() != wanted.last() {
                            problems.push(format!(
                                "H4: the tenant's configurations {} differ from the trail's {}",
                                summary(&history),
                                summary(&wanted)
                            ));
                        } else if history.len() > wanted.len() {
                            self.figures.stale_writes += (history.len() - wanted.len()) as u64;
                            self.stale.push(format!(
                                "{id}: the tenant's configurations {}, the trail's {}",
                                summary(&history),
                                summary(&wanted)
                            ));
                        }
                    }
                    other => problems.push(format!("H4: {} simulated tenants", other.len())),
                }
            }
            // H5: acknowledged approvals are in the trail.
            for (_, seq) in acknowledged.iter().filter(|(a, _)| *a == id) {
                if trail
                    .get(seq)
                    .is_none_or(|(kind, _)| kind != "approval_granted")
                {
                    problems.push(format!(
                        "H5: the API acknowledged an approval as event #{seq}, the trail has {:?}",
                        trail.get(seq)
                    ));
                }
            }
            for problem in problems {
                self.problems.push(format!("{id}: {problem}"));
            }
            trails.insert(id, trail);
        }
        // H5: every logged commit is in the trail, with the hash it was logged with.
        for ((id, seq), hashes) in &logged {
            let Some(trail) = trails.get(id) else {
                continue;
            };
            match trail.get(seq) {
                Some((_, hash)) if hashes.len() == 1 && hashes.contains(hash) => {}
                found => self.problems.push(format!(
                    "{id}: H5: event #{seq} was logged committed with {hashes:?}, the trail has {found:?}"
                )),
            }
        }
    }
}

/// `phasegate_fenced_commits_total` of a replica: its commits refused for a lease it had lost.
fn fenced_in_metrics(url: &str, token: &str) -> u64 {
    let host = url.trim_start_matches("http://");
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return 0;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head =
        format!("GET /metrics HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n");
    let mut text = String::new();
    if stream.write_all(head.as_bytes()).is_err() || stream.read_to_string(&mut text).is_err() {
        return 0;
    }
    text.lines()
        .filter(|l| {
            l.starts_with("phasegate_fenced_commits_total{") && l.contains("lease=\"lost\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The effect an event concludes, if any.
fn concluded_effect(kind: &EventKind) -> Option<String> {
    match kind {
        EventKind::BaselineCaptured { effect }
        | EventKind::Reconciled { effect, .. }
        | EventKind::Delivered { effect, .. } => Some(effect.to_string()),
        EventKind::DriftDetected {
            effect: Some(effect),
            ..
        }
        | EventKind::ProviderFailed {
            effect: Some(effect),
            ..
        } => Some(effect.to_string()),
        _ => None,
    }
}

/// Every configuration the simulated tenant's one policy has had, oldest first.
fn tenant_history(state: &Value) -> Vec<Config> {
    let policies = state["policies"].as_object().cloned().unwrap_or_default();
    policies
        .values()
        .flat_map(|entries| entries.as_array().cloned().unwrap_or_default())
        .map(|entry| {
            let strings = |v: &Value| -> Vec<String> {
                serde_json::from_value(v.clone()).unwrap_or_default()
            };
            (
                serde_json::from_value(entry["assignments"].clone()).unwrap(),
                strings(&entry["exempt"]["users"]),
                strings(&entry["exempt"]["groups"]),
            )
        })
        .collect()
}

fn summary(configs: &[Config]) -> String {
    let modes: Vec<String> = configs
        .iter()
        .map(|(a, _, _)| {
            a.iter()
                .map(|a| format!("{:?}:{}", a.mode, a.include.join("+")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    format!("[{}]", modes.join(" | "))
}

/// `name=value` of a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn stats(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "none".into();
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.2}s, median {:.2}s, p90 {:.2}s, max {:.2}s (n={})",
        at(0.0).as_secs_f64(),
        at(0.5).as_secs_f64(),
        at(0.9).as_secs_f64(),
        at(1.0).as_secs_f64(),
        sorted.len()
    )
}

fn trial(
    server: &Postgres,
    seed: u64,
    rollouts: usize,
    reference: &Reference,
) -> Result<Figures, String> {
    let mut trial = Trial::new(server, seed);
    for _ in 0..REPLICAS {
        trial.start_replica(false);
    }
    let starter = trial.start_rollouts(rollouts, 1000 + (seed % 10_000) * 1000);
    let driven = trial.drive(starter);
    let checking = Instant::now();
    trial.stop_all();
    trial.count_fencing();
    trial.check_fencing();
    if let Err(why) = &driven {
        trial.problems.insert(0, why.clone());
    } else {
        trial.check_rollouts(reference);
    }
    let f = &trial.figures;
    println!(
        "replica harness: seed {seed}: {rollouts} rollouts, {} replica processes, {} kills ({} SIGKILL at random instants, {} at crash points), {} pauses past the lease, {} restarts, {} fenced commits ({} of them in the /metrics of the replicas alive at the end), {} leases found lost at renewal, {} approvals asked ({} acknowledged), {} commits logged, driven in {:.1?}",
        trial.replicas.len(),
        f.kills + f.kills_at_points,
        f.kills,
        f.kills_at_points,
        f.pauses,
        f.restarts,
        f.fenced,
        f.fenced_in_metrics,
        f.lost_at_renewal,
        f.approvals,
        trial.acknowledged.lock().unwrap().len(),
        f.commits_logged,
        driven.as_ref().ok(),
    );
    println!(
        "replica harness: failover (lease {:?}, renewal {:?}): owner out → first commit by another replica: {}; after the lease expired: {}; of the Graph rollouts: {}",
        LEASE,
        RENEW_EVERY,
        stats(&f.failovers),
        stats(&f.after_expiry),
        stats(&f.graph_failovers)
    );
    println!(
        "replica harness: checked the rollouts in {:.1?}; {} Graph rollouts on emulators of their own, {} ledger writes checked against the reference's {} each; {} stale simulated-tenant writes and {} late stale Graph writes landed{}",
        checking.elapsed(),
        f.graph_rollouts,
        f.ledger_writes,
        reference.writes.len(),
        f.stale_writes,
        f.late_graph_writes,
        trial
            .stale
            .iter()
            .map(|s| format!("\n  {s}"))
            .collect::<String>()
    );
    println!(
        "replica harness: the API's answers to the approvals: {:?}, in {}",
        trial.answers.lock().unwrap(),
        stats(&trial.latencies.lock().unwrap())
    );
    if trial.problems.is_empty() {
        return Ok(trial.figures);
    }
    // The replicas' logs, for the post-mortem.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("replicas-crash-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::write(dir.join("problems.txt"), trial.problems.join("\n"));
    for (n, replica) in trial.replicas.iter().enumerate() {
        let _ = std::fs::write(
            dir.join(format!("replica-{n}-{}.log", replica.name)),
            replica.output(),
        );
    }
    for (id, (emulator, _)) in &trial.emulators {
        let ledger = emulator.get("/_emulator/ledger");
        let _ = std::fs::write(dir.join(format!("{id}-ledger.json")), ledger.to_string());
    }
    Err(format!(
        "{}\n(the replicas' logs are in {})",
        trial.problems.join("\n"),
        dir.display()
    ))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let long = std::env::var("PHASEGATE_CRASH_LONG").is_ok_and(|v| v == "1");
    let seed: u64 = std::env::var("HARNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_203);
    let trials = if long { 5 } else { 1 };
    let rollouts: usize = std::env::var("PHASEGATE_HA_ROLLOUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    println!(
        "replica harness: HARNESS_SEED={seed}{}: {trials} trial(s) of {rollouts} rollouts ({} through Graph on emulators, the rest simulated) on {REPLICAS} serve replicas",
        if long { " (long)" } else { "" },
        rollouts.div_ceil(GRAPH_EVERY)
    );
    self_test_check_ledger();
    let started = Instant::now();
    // The Graph rollouts' reference, made while the database starts.
    let reference = std::thread::spawn(reference);
    let server = Postgres::start(&[]);
    let reference = reference.join().expect("the reference Graph run");
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut totals = Figures::default();
    for n in 0..trials {
        let trial_seed = if n == 0 { seed } else { rng.next() };
        match trial(&server, trial_seed, rollouts, &reference) {
            Ok(figures) => {
                totals.kills += figures.kills + figures.kills_at_points;
                totals.pauses += figures.pauses;
                totals.fenced += figures.fenced;
                totals.graph_rollouts += figures.graph_rollouts;
                totals.ledger_writes += figures.ledger_writes;
                totals.late_graph_writes += figures.late_graph_writes;
                totals.failovers.extend(figures.failovers);
            }
            Err(why) => failures.push(format!(
                "trial seed {trial_seed} (repro: HARNESS_SEED={trial_seed} cargo test --test replicas_crash):\n{why}"
            )),
        }
    }
    println!(
        "replica harness: {trials} trial(s), {} kills, {} pauses, {} fenced commits, {} Graph rollouts with {} ledger writes checked ({} late stale), failover {}; {} failures, {:.0?}",
        totals.kills,
        totals.pauses,
        totals.fenced,
        totals.graph_rollouts,
        totals.ledger_writes,
        totals.late_graph_writes,
        stats(&totals.failovers),
        failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        totals.kills > 0 && totals.pauses > 0,
        "the schedule must kill and pause owners"
    );
}
