//! The transition the store benches measure: what the engine commits for one operator command
//! (a state machine step, the rollout's record and its hash-chained event, conditional on the
//! rollout's head), alternating pause and resume so that it can repeat for ever.

use phasegate::domain::event::{Event, EventKind, Trigger};
use phasegate::domain::machine;
use phasegate::domain::plan::{self, Plan};
use phasegate::domain::rollout::{Rollout, RolloutStatus};
use phasegate::domain::time::Timestamp;
use phasegate::store::{Attached, EventRecord, PlanRecord, Store, StoredRollout};

const PLAN: &str = include_str!("../../../plans/windows-baseline.toml");
pub const ROLLOUT: &str = "bench-1";

/// A started rollout `bench-1` in a store, and the head its next transition commits from.
pub struct Transitions<'a> {
    store: &'a Store,
    plan: Plan,
    now: Timestamp,
    current: StoredRollout,
}

impl<'a> Transitions<'a> {
    /// Starts `bench-1` in `store`.
    pub fn start(store: &'a Store) -> Transitions<'a> {
        Transitions::start_as(store, ROLLOUT)
    }

    /// Starts a rollout `id` in `store`.
    pub fn start_as(store: &'a Store, id: &str) -> Transitions<'a> {
        let plan = plan::parse("bench", PLAN).unwrap();
        let now = Timestamp::from_millis(1_800_000_000_000);
        let rollout = Rollout::new(id, &plan, "bench", now);
        let start = Event {
            kind: EventKind::Start {
                plan_hash: plan.hash.clone(),
            },
            trigger: Trigger::user("bench", "bench"),
        };
        let transition = machine::step(&plan, &rollout, &start, now).unwrap();
        let plan_record = PlanRecord {
            path: "bench.toml".into(),
            source: PLAN.into(),
            hash: plan.hash.clone(),
        };
        let first = record(now, &rollout, &transition.rollout, start);
        store
            .create(&transition.rollout, first, &plan_record, &[])
            .unwrap();
        let current = store.rollout(id).unwrap();
        Transitions {
            store,
            plan,
            now,
            current,
        }
    }

    /// One durable transition: pause if running, resume if paused.
    pub fn once(&mut self) {
        let command = Event {
            kind: if self.current.rollout.status == RolloutStatus::Paused {
                EventKind::ResumeRequested
            } else {
                EventKind::PauseRequested
            },
            trigger: Trigger::user("bench", "bench"),
        };
        let next = machine::step(&self.plan, &self.current.rollout, &command, self.now).unwrap();
        let event = record(self.now, &self.current.rollout, &next.rollout, command);
        let sealed = self
            .store
            .commit(&self.current, &next.rollout, event, Attached::default())
            .unwrap();
        self.current = StoredRollout {
            rollout: Rollout {
                last_seq: sealed.seq,
                ..next.rollout
            },
            last_hash: sealed.hash,
        };
    }
}

fn record(now: Timestamp, before: &Rollout, after: &Rollout, event: Event) -> EventRecord {
    EventRecord {
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
    }
}
