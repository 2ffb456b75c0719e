//! `cargo bench`: the two costs that bound phasegate's speed, each beside a baseline measured in
//! the same run, reported as ratios (absolute times vary by machine; ratios much less).
//!
//! 1. Gate evaluation over 1,000,000 device observations (tally + verdict) against a bare
//!    summation loop over the same reports.
//! 2. One durable transition (state machine step, sled transaction over three trees, flush)
//!    against a bare sled insert + flush of a value of the same size.

use std::hint::black_box;
use std::time::{Duration, Instant};

use phasegate::domain::gate::{self, DeviceReport, DeviceState};
use phasegate::domain::plan;
use phasegate::domain::time::Timestamp;
use phasegate::store::{DEFAULT_LOCK_WAIT, Store};

#[path = "support/transitions.rs"]
mod transitions;
use transitions::{ROLLOUT, Transitions};

const PLAN: &str = include_str!("../../plans/windows-baseline.toml");
const DEVICES: usize = 1_000_000;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(iterations: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm up
    median(
        (0..iterations)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

fn reports(now: Timestamp) -> Vec<DeviceReport> {
    let states = [
        DeviceState::Compliant,
        DeviceState::Noncompliant,
        DeviceState::InGrace,
        DeviceState::Error,
        DeviceState::Unknown,
    ];
    (0..DEVICES)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            DeviceReport {
                state: if h % 10 < 8 {
                    DeviceState::Compliant
                } else {
                    states[(h >> 8) as usize % 5]
                },
                last_reported: (!h.is_multiple_of(97))
                    .then(|| now.minus(Duration::from_secs(h % 400_000))),
                blocked: h.is_multiple_of(53),
                grace_until: None,
                facts: Default::default(),
            }
        })
        .collect()
}

fn report(name: &str, subject: Duration, baseline_name: &str, baseline: Duration) {
    println!(
        "{name:<46} {:>12?}   {baseline_name:<28} {:>12?}   ratio {:>8.1}x",
        subject,
        baseline,
        subject.as_secs_f64() / baseline.as_secs_f64()
    );
}

fn bench_gate() {
    let plan = plan::parse("bench", PLAN).unwrap();
    let gate_spec = &plan.phases[2].gate;
    let now = Timestamp::from_millis(1_800_000_000_000);
    let reports = reports(now);
    let baseline = measure(30, || {
        let sum: u64 = black_box(&reports)
            .iter()
            .map(|r| r.state as u64 + u64::from(r.blocked))
            .sum();
        black_box(sum);
    });
    let evaluation = measure(30, || {
        let tally = gate::tally(black_box(&reports), gate_spec.stale_after, now);
        black_box(gate::evaluate(gate_spec, &tally, now));
    });
    report(
        "gate evaluation, 1,000,000 observations",
        evaluation,
        "bare summation loop",
        baseline,
    );
}

fn bench_transition() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    let mut transitions = Transitions::start(&store);
    let durable = measure(500, || transitions.once());
    let value_len = serde_json::to_vec(&store.rollout(ROLLOUT).unwrap().rollout)
        .unwrap()
        .len();
    let raw_dir = tempfile::tempdir().unwrap();
    let raw = sled::open(raw_dir.path()).unwrap();
    let value = vec![7u8; value_len];
    let mut n = 0u64;
    let baseline = measure(500, || {
        n += 1;
        raw.insert(n.to_be_bytes(), value.as_slice()).unwrap();
        raw.flush().unwrap();
    });
    report(
        "one durable transition (step + tx + flush)",
        durable,
        "bare sled insert + flush",
        baseline,
    );
}

fn main() {
    // `cargo test --benches` runs this in test mode with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench` to measure");
        return;
    }
    println!("phasegate benchmarks (median of repeated runs; ratio = subject / baseline)");
    bench_gate();
    bench_transition();
}
