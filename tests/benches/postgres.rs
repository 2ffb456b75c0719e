//! `cargo bench --bench postgres`: durable transitions per second on a PostgreSQL store against a
//! bare `INSERT …` committed on its own (autocommit: the statement and its COMMIT) of the same
//! size, on the same server, in the same run, reported as a ratio (target ≥ 0.8×).
//!
//! The server is a real one started for the run (`tests/common/postgres.rs`) with `fsync=on`,
//! so both sides wait for the WAL to reach the disk. One transition is what the engine commits:
//! the rollout's record and its event (hash-chained), conditional on the rollout's head, in one
//! transaction.

#[path = "../common/postgres.rs"]
mod server;

use std::time::{Duration, Instant};

use phasegate::domain::event::{Event, EventKind, Trigger};
use phasegate::domain::machine;
use phasegate::domain::plan;
use phasegate::domain::rollout::{Rollout, RolloutStatus};
use phasegate::domain::time::Timestamp;
use phasegate::store::{
    Attached, DEFAULT_LOCK_WAIT, EventRecord, PlanRecord, Store, StoredRollout,
};

const PLAN: &str = include_str!("../../plans/windows-baseline.toml");
const ROUNDS: usize = 5;
const PER_ROUND: usize = 200;

fn main() {
    // `cargo test --benches` runs this in test mode with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench postgres` to measure");
        return;
    }
    let server = server::Postgres::start(&["fsync=on", "synchronous_commit=on"]);
    let url = server.database();
    let store = Store::open(url.as_ref(), DEFAULT_LOCK_WAIT).unwrap();
    let plan = plan::parse("bench", PLAN).unwrap();
    let now = Timestamp::from_millis(1_800_000_000_000);
    let rollout = Rollout::new("bench-1", &plan, "bench", now);
    let start = Event {
        kind: EventKind::Start {
            plan_hash: plan.hash.clone(),
        },
        trigger: Trigger::user("bench", "bench"),
    };
    let transition = machine::step(&plan, &rollout, &start, now).unwrap();
    let record = |before: &Rollout, after: &Rollout, event: Event| EventRecord {
        seq: 0,
        at: now,
        recorded_at: now,
        event,
        previous_status: before.status,
        status: after.status,
        reason: after.reason.clone(),
        notes: vec![],
        effects: vec![],
        impact: Vec::new(),
        prev_hash: String::new(),
        hash: String::new(),
    };
    let plan_record = PlanRecord {
        path: "bench.toml".into(),
        source: PLAN.into(),
        hash: plan.hash.clone(),
    };
    store
        .create(
            &transition.rollout,
            record(&rollout, &transition.rollout, start),
            &plan_record,
            &[],
        )
        .unwrap();
    let mut current = store.rollout("bench-1").unwrap();
    let mut transition_once = || {
        let pause = Event {
            kind: if current.rollout.status == RolloutStatus::Paused {
                EventKind::ResumeRequested
            } else {
                EventKind::PauseRequested
            },
            trigger: Trigger::user("bench", "bench"),
        };
        let next = machine::step(&plan, &current.rollout, &pause, now).unwrap();
        let event = record(&current.rollout, &next.rollout, pause);
        let sealed = store
            .commit(&current, &next.rollout, event, Attached::default())
            .unwrap();
        current = StoredRollout {
            rollout: Rollout {
                last_seq: sealed.seq,
                ..next.rollout
            },
            last_hash: sealed.hash,
        };
    };

    transition_once();
    // The same number of bytes per commit: the rollout's record and one event.
    let size = serde_json::to_vec(&store.rollout("bench-1").unwrap())
        .unwrap()
        .len()
        + serde_json::to_vec(&store.events("bench-1").unwrap()[1])
            .unwrap()
            .len();
    let mut bare = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    bare.batch_execute("CREATE TABLE bare (k bigint PRIMARY KEY, v bytea NOT NULL)")
        .unwrap();
    let insert = bare
        .prepare("INSERT INTO bare (k, v) VALUES ($1, $2)")
        .unwrap();
    let value = vec![7u8; size];
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
    assert_eq!(store.verify("bench-1").unwrap().map(|n| n > 1), Ok(true));
    println!("phasegate PostgreSQL benchmark (median of {ROUNDS} rounds of {PER_ROUND})");
    println!(
        "{:<52} {:>9.0}/s   {:<34} {:>9.0}/s   ratio {:.2}x (target >= 0.8x)",
        "durable transitions (record + event, conditional)",
        transitions,
        format!("bare INSERT of {size} bytes + COMMIT"),
        inserts,
        transitions / inserts
    );
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
