use super::*;
use crate::domain::event::{EventKind, Trigger};
use crate::domain::plan;
use crate::domain::rollout::RolloutStatus;
use crate::domain::time::Timestamp;

const PLAN: &str = include_str!("../../plans/windows-baseline.toml");

/// An unsealed record of `kind` for `rollout`, as the engine would commit it (shared with other
/// modules' tests).
pub(crate) fn record(rollout: &Rollout, kind: EventKind) -> EventRecord {
    EventRecord {
        seq: 0,
        at: Timestamp::from_millis(5),
        recorded_at: Timestamp::from_millis(6),
        event: crate::domain::event::Event {
            kind,
            trigger: Trigger::user("alice", "test"),
        },
        previous_status: rollout.status,
        status: rollout.status,
        reason: rollout.reason.clone(),
        notes: vec![],
        effects: vec![],
        prev_hash: String::new(),
        hash: String::new(),
    }
}

fn created(store: &Store) -> StoredRollout {
    let plan = plan::parse("w", PLAN).unwrap();
    let rollout = Rollout::new("w-1", &plan, "alice", Timestamp::from_millis(1));
    let plan_record = PlanRecord {
        path: "plans/w.toml".into(),
        source: PLAN.into(),
        hash: plan.hash.clone(),
    };
    let event = record(
        &rollout,
        EventKind::Start {
            plan_hash: plan.hash.clone(),
        },
    );
    store.create(&rollout, event, &plan_record, &[]).unwrap();
    store.rollout("w-1").unwrap()
}

#[test]
fn a_committed_transition_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        let mut next = current.rollout.clone();
        next.status = RolloutStatus::Running;
        store
            .commit(
                &current,
                &next,
                record(&next, EventKind::Tick),
                Attached::default(),
            )
            .unwrap();
    }
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    let stored = store.rollout("w-1").unwrap();
    assert_eq!(stored.rollout.status, RolloutStatus::Running);
    assert_eq!(stored.rollout.last_seq, 2);
    let events = store.events("w-1").unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(store.verify("w-1").unwrap(), Ok(2));
    assert_eq!(
        store.plan("w-1", &stored.rollout.plan_hash).unwrap().source,
        PLAN
    );
}

#[test]
fn a_stale_transition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    let current = created(&store);
    let next = current.rollout.clone();
    store
        .commit(
            &current,
            &next,
            record(&next, EventKind::Tick),
            Attached::default(),
        )
        .unwrap();
    let again = store.commit(
        &current,
        &next,
        record(&next, EventKind::Tick),
        Attached::default(),
    );
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    assert_eq!(store.events("w-1").unwrap().len(), 2);
}

#[test]
fn creating_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    created(&store);
    let plan = plan::parse("w", PLAN).unwrap();
    let rollout = Rollout::new("w-1", &plan, "bob", Timestamp::from_millis(1));
    let plan_record = PlanRecord {
        path: "p".into(),
        source: PLAN.into(),
        hash: plan.hash.clone(),
    };
    let err = store
        .create(
            &rollout,
            record(&rollout, EventKind::Tick),
            &plan_record,
            &[],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)));
    assert_eq!(store.next_rollout_id("w").unwrap(), "w-2");
}

#[test]
fn the_claimant_of_an_object_follows_every_claim_written() {
    let dir = tempfile::tempdir().unwrap();
    let objects = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let claimant = |store: &Store, asked: &[&str]| store.claimant(&objects(asked), "w-2").unwrap();
    {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        created(&store);
        store.set_claims("w-1", &objects(&["a", "b"])).unwrap();
        assert_eq!(
            claimant(&store, &["x", "b"]),
            Some(("w-1".into(), "b".into()))
        );
        assert_eq!(store.claimant(&objects(&["a"]), "w-1").unwrap(), None);
        // Asked once, the answer comes from the index; a later claim replaces the earlier one.
        store.set_claims("w-1", &objects(&["c"])).unwrap();
        assert_eq!(claimant(&store, &["a", "b"]), None);
        assert_eq!(claimant(&store, &["c"]), Some(("w-1".into(), "c".into())));
    }
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    assert_eq!(claimant(&store, &["c"]), Some(("w-1".into(), "c".into())));
    // A finished rollout claims nothing any more.
    let current = store.rollout("w-1").unwrap();
    let mut next = current.rollout.clone();
    next.status = RolloutStatus::Aborted;
    store
        .commit(
            &current,
            &next,
            record(&next, EventKind::Tick),
            Attached::default(),
        )
        .unwrap();
    assert_eq!(claimant(&store, &["c"]), None);
}

#[test]
fn a_value_of_another_format_is_reported_as_such() {
    let value = |format: u32| format!(r#"{{"format":{format},"data":{{"unexpected":true}}}}"#);
    let newer = FORMAT_VERSION + 1;
    let err =
        records::decode::<StoredRollout>("rollouts/w-1", value(newer).as_bytes()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("format {newer} is not readable")),
        "{err}"
    );
    let err = records::decode::<StoredRollout>("rollouts/w-1", value(FORMAT_VERSION).as_bytes())
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, message } if key == "rollouts/w-1" && !message.contains("not readable")),
        "{err}"
    );
}

#[test]
fn an_edited_event_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    let current = created(&store);
    let next = current.rollout.clone();
    store
        .commit(
            &current,
            &next,
            record(&next, EventKind::Tick),
            Attached::default(),
        )
        .unwrap();
    let key = records::event_key("w-1", 1);
    let mut edited: EventRecord =
        records::decode("e", &store.events.get(&key).unwrap().unwrap()).unwrap();
    edited.event.trigger.actor = "mallory".into();
    store.events.insert(key, records::encode(&edited)).unwrap();
    let verdict = store.verify("w-1").unwrap();
    assert!(
        verdict
            .unwrap_err()
            .contains("event 1: content does not match its hash")
    );
}

#[test]
fn a_second_process_gets_a_clear_in_use_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    let second = Store::open(dir.path(), Duration::from_millis(50));
    let message = second.err().expect("second open must fail").to_string();
    assert!(
        message.contains("is in use by another phasegate process"),
        "{message}"
    );
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn leftovers_of_a_killed_start_up_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap());
    // A half-created database and an unfinished snapshot, as a kill -9 at start-up leaves them.
    std::fs::create_dir_all(dir.path().join("sled.creating")).unwrap();
    std::fs::write(dir.path().join("sled.creating/conf"), b"torn").unwrap();
    std::fs::write(
        dir.path().join("sled/snap.00000000000000FF.generating"),
        b"",
    )
    .unwrap();
    let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
    assert!(
        !dir.path()
            .join("sled/snap.00000000000000FF.generating")
            .exists()
    );
    drop(store);
    // A store whose creation was interrupted before the rename is rebuilt from scratch.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fresh.path().join("sled.creating")).unwrap();
    std::fs::write(fresh.path().join("sled.creating/conf"), b"torn").unwrap();
    Store::open(fresh.path(), DEFAULT_LOCK_WAIT).unwrap();
    assert!(!fresh.path().join("sled.creating").exists());
}
