//! `cargo bench --bench postgres`: durable transitions per second on a PostgreSQL store against a
//! bare `INSERT …` committed on its own (autocommit: the statement and its COMMIT) of the same
//! size, on the same server, in the same run, reported as a ratio (target ≥ 0.8×).
//!
//! The server is a real one started for the run (`tests/common/postgres.rs`) with `fsync=on`,
//! so both sides wait for the WAL to reach the disk. One transition is what the engine commits:
//! the rollout's record and its event (hash-chained), conditional on the rollout's head, in one
//! transaction. `PHASEGATE_PG_FSYNC=off` starts the server without `fsync` instead, to see the
//! CPU-bound ratio: what each side costs besides waiting for the disk.
//!
//! Beside it, the same read of the rollout's row through the store (a request to the store's
//! worker thread, the record decoded) and as one `SELECT` on the bare client: what the hop to
//! the worker thread costs a transition.
//!
//! Second, what a `serve` replica reads at each lease renewal to find rollouts nobody drives, on
//! a store of `PHASEGATE_PG_ROLLOUTS` (2,000) rollouts in which nothing moved since the last
//! renewal: the live leases and every rollout's sequence (the census, `runner/census.rs`),
//! beside reading and glancing at every record (`Store::glances`, what a renewal read before).

#[path = "../common/postgres.rs"]
mod server;

use std::time::{Duration, Instant};

use phasegate::store::{DEFAULT_LOCK_WAIT, Store};

#[path = "support/transitions.rs"]
mod transitions;
use transitions::{ROLLOUT, Transitions};

const ROUNDS: usize = 5;
const PER_ROUND: usize = 200;

fn main() {
    // `cargo test --benches` runs this in test mode with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench postgres` to measure");
        return;
    }
    // `PHASEGATE_PG_FSYNC=off`: a server that does not wait for the disk, to see the CPU-bound
    // ratio (what each side costs besides the WAL flush).
    let fsync = std::env::var("PHASEGATE_PG_FSYNC").unwrap_or_else(|_| "on".into());
    let fsync = if fsync == "off" {
        "fsync=off"
    } else {
        "fsync=on"
    };
    let server = server::Postgres::start(&[fsync, "synchronous_commit=on"]);
    let url = server.database();
    let store = Store::open(url.as_ref(), DEFAULT_LOCK_WAIT).unwrap();
    let mut transitions = Transitions::start(&store);
    let mut transition_once = || transitions.once();
    transition_once();
    let mut bare = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // The same bytes per commit: the rollout's record and its latest event as the store wrote
    // them, so that the server compresses and logs the same amount on both sides.
    let value: Vec<u8> = bare
        .query_one(
            "SELECT (SELECT value FROM phasegate.entries WHERE tree = 'rollouts') ||
                 (SELECT value FROM phasegate.entries WHERE tree = 'events' ORDER BY key DESC LIMIT 1)",
            &[],
        )
        .unwrap()
        .get(0);
    let size = value.len();
    bare.batch_execute("CREATE TABLE bare (k bigint PRIMARY KEY, v bytea NOT NULL)")
        .unwrap();
    let insert = bare
        .prepare("INSERT INTO bare (k, v) VALUES ($1, $2)")
        .unwrap();
    let mut k = 0i64;
    let mut insert_once = || {
        k += 1;
        bare.execute(&insert, &[&k, &value]).unwrap();
    };

    // Rounds alternate, so that a slow moment of the disk costs both sides alike.
    insert_once();
    let (mut transitions, mut inserts) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        transitions.push(per_second(PER_ROUND, &mut transition_once));
        inserts.push(per_second(PER_ROUND, &mut insert_once));
    }
    let (transitions, inserts) = (median(transitions), median(inserts));
    assert_eq!(store.verify(ROLLOUT).unwrap().map(|n| n > 1), Ok(true));
    // Where a transition's time goes besides the statement: the same read of the rollout's row
    // through the store (its worker thread, the JSON decode) and on a bare client.
    let mut store_read = || {
        std::hint::black_box(store.rollout(ROLLOUT).unwrap());
    };
    let select = bare
        .prepare("SELECT value FROM phasegate.entries WHERE tree = 'rollouts' AND key = $1")
        .unwrap();
    let key = ROLLOUT.as_bytes().to_vec();
    let mut bare_read = || {
        let row = bare.query_one(&select, &[&key]).unwrap();
        std::hint::black_box(row.get::<_, Vec<u8>>(0));
    };
    let (mut through_store, mut through_bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        through_store.push(per_second(PER_ROUND, &mut store_read));
        through_bare.push(per_second(PER_ROUND, &mut bare_read));
    }
    let (through_store, through_bare) = (median(through_store), median(through_bare));
    println!("phasegate PostgreSQL benchmark (median of {ROUNDS} rounds of {PER_ROUND}, {fsync})");
    println!(
        "{:<52} {:>9.0}/s   {:<34} {:>9.0}/s   ratio {:.2}x (target >= 0.8x)",
        "durable transitions (record + event, conditional)",
        transitions,
        format!("bare INSERT of {size} bytes + COMMIT"),
        inserts,
        transitions / inserts
    );
    println!(
        "{:<52} {:>9.0}/s   {:<34} {:>9.0}/s   ratio {:.2}x",
        "the rollout's row read through the store",
        through_store,
        "the same SELECT on a bare client",
        through_bare,
        through_store / through_bare
    );
    drop(store);
    renewal_reads();
}

/// The census read of a renewal beside the whole listing, on a store of many rollouts.
fn renewal_reads() {
    let rollouts: usize = std::env::var("PHASEGATE_PG_ROLLOUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
        .clamp(1, 1_000_000);
    // Durability is not what this measures: a server of its own without fsync fills faster.
    let server = server::Postgres::start(&[]);
    let url = server.database();
    let store = Store::open(url.as_ref(), DEFAULT_LOCK_WAIT).unwrap();
    for n in 0..rollouts {
        let mut rollout = Transitions::start_as(&store, &format!("r-{n}"));
        rollout.once();
    }
    let mut census = || {
        let live = store.live_leases().unwrap();
        let seqs = store.rollout_seqs().unwrap();
        assert_eq!(seqs.len(), rollouts);
        std::hint::black_box((live, seqs));
    };
    let mut listing = || {
        let glanced = store.glances().unwrap();
        assert_eq!(glanced.len(), rollouts);
        std::hint::black_box(glanced);
    };
    census();
    listing();
    let (mut read, mut listed) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        read.push(timed(&mut census));
        listed.push(timed(&mut listing));
    }
    let (read, listed) = (median_time(read), median_time(listed));
    println!(
        "{:<52} {:>9.2} ms   {:<34} {:>9.2} ms   ratio {:.2}x",
        format!("renewal read, {rollouts} rollouts, none moved"),
        read.as_secs_f64() * 1e3,
        "every record listed and glanced",
        listed.as_secs_f64() * 1e3,
        read.as_secs_f64() / listed.as_secs_f64().max(1e-9)
    );
}

fn timed(f: &mut impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn median_time(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn per_second(n: usize, f: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    n as f64 / start.elapsed().max(Duration::from_nanos(1)).as_secs_f64()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
