//! `cargo bench --bench failover`: how long a rollout whose owner is killed (SIGKILL) waits
//! before another `serve` replica owns it and commits for it again, against the lease length, on
//! a real PostgreSQL server started for the run (`tests/common/postgres.rs`). Target: within
//! lease + 1 s (the lease runs out, the other replica's next renewal takes it, loads the rollout
//! and ticks it), reported as the ratio failover / lease over several runs per lease length.
//!
//! Each run: a fresh database, a simulated rollout that keeps moving (a long soak observed every
//! hour of virtual time), replica A driving it and replica B beside it, A killed while it drives;
//! the failover is the time from the kill to the first commit of the rollout after it (B's, A
//! being dead), polled every 10 ms.

#[path = "../common/postgres.rs"]
mod server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_phasegate");
const RUNS: usize = 5;
const RENEW_EVERY: Duration = Duration::from_secs(1);
const LEASES: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(5)];

fn main() {
    // `cargo test --benches` runs this in test mode with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench failover` to measure");
        return;
    }
    let server = server::Postgres::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "phasegate failover benchmark: the owner of a moving rollout killed (SIGKILL), {RUNS} runs per lease, renewal every {RENEW_EVERY:?}"
    );
    for lease in LEASES {
        let failovers: Vec<Duration> = (0..RUNS)
            .map(|n| failover(&server, dir.path(), lease, n))
            .collect();
        let within = failovers
            .iter()
            .filter(|f| **f <= lease + Duration::from_secs(1))
            .count();
        let ratios: Vec<f64> = failovers
            .iter()
            .map(|f| f.as_secs_f64() / lease.as_secs_f64())
            .collect();
        println!(
            "lease {:>3}: failover {}   failover/lease median {:.2}x, max {:.2}x   within lease + 1s: {within} of {RUNS} (target: all)",
            format!("{}s", lease.as_secs()),
            failovers
                .iter()
                .map(|f| format!("{:.2}s", f.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" "),
            median(&ratios),
            ratios.iter().copied().fold(0.0, f64::max),
        );
    }
}

/// One run: the time from killing the owner to the rollout's next commit.
fn failover(
    server: &server::Postgres,
    dir: &std::path::Path,
    lease: Duration,
    n: usize,
) -> Duration {
    let url = server.database();
    let plan = dir.join(format!("plan-{}-{n}.toml", lease.as_secs()));
    std::fs::write(
        &plan,
        include_str!("../../plans/windows-baseline.toml")
            .replace("seed = 7", &format!("seed = {}", 500 + n))
            .replace("devices = 10000", "devices = 500")
            .replace("observe_every = \"6h\"", "observe_every = \"1h\"")
            .replace("min_soak = \"2d\"", "min_soak = \"60d\""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["start", plan.to_str().unwrap(), "--by", "alice"])
        .env("PHASEGATE_STORE", &url)
        .env("XDG_DATA_HOME", dir.join("cli"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let (mut a, name_a) = replica(&url, &dir.join(format!("a-{n}")), lease);
    let seq = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT seq FROM phasegate.entries WHERE tree = 'rollouts' AND key = convert_to($1, 'UTF8')",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let owner = |db: &mut postgres::Client| -> Option<String> {
        db.query_opt(
            "SELECT owner FROM phasegate.leases WHERE rollout = $1 AND expires_at > now()",
            &[&id],
        )
        .unwrap()
        .map(|row| row.get(0))
    };
    // A owns the rollout and drives it.
    let start = seq(&mut db);
    poll(|| owner(&mut db).as_deref() == Some(name_a.as_str()) && seq(&mut db) > start + 5);
    let (mut b, name_b) = replica(&url, &dir.join(format!("b-{n}")), lease);
    a.kill().unwrap();
    let killed = Instant::now();
    a.wait().unwrap();
    let at_kill = seq(&mut db);
    poll(|| seq(&mut db) > at_kill);
    let took = killed.elapsed();
    assert_eq!(owner(&mut db).as_deref(), Some(name_b.as_str()));
    b.kill().unwrap();
    b.wait().unwrap();
    took
}

/// Polls `done` every 10 ms, for a minute at most.
fn poll(mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `serve` replica on `url` and its name in the leases.
fn replica(url: &str, data: &std::path::Path, lease: Duration) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--lease", &format!("{}s", lease.as_secs())])
        .args(["--renew-every", &format!("{}s", RENEW_EVERY.as_secs())])
        .env("PHASEGATE_STORE", url)
        .env("XDG_DATA_HOME", data)
        .env_remove("RUST_LOG")
        .env_remove("PHASEGATE_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let name = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "serve exited");
        if let Some(rest) = line.trim().strip_prefix("replica:") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep reading, so the replica never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    (child, name)
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
