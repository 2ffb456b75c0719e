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
        impact: Vec::new(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

/// Where a test's store is: a temporary directory (sled), or a database of its own on the test
/// PostgreSQL server.
pub(crate) enum Place {
    Sled(tempfile::TempDir),
    /// The server is held for as long as the place lives.
    Postgres(
        #[allow(dead_code)] std::sync::Arc<crate::test_postgres::Postgres>,
        std::path::PathBuf,
    ),
}

impl Place {
    pub(crate) fn sled() -> Place {
        Place::Sled(tempfile::tempdir().unwrap())
    }

    pub(crate) fn postgres() -> Place {
        let server = crate::test_postgres::shared();
        let url = server.database();
        Place::Postgres(server, url.into())
    }

    /// The location `Store::open` takes.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Place::Sled(dir) => dir.path(),
            Place::Postgres(_, url) => url,
        }
    }

    /// A new, empty place of the same backend.
    pub(crate) fn another(&self) -> Place {
        match self {
            Place::Sled(_) => Place::sled(),
            Place::Postgres(..) => Place::postgres(),
        }
    }
}

/// Each test, once on sled and once on PostgreSQL (`<name>::sled`, `<name>::postgres`).
macro_rules! on_both {
    ($(#[$meta:meta])* fn $name:ident($place:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            fn run($place: Place) $body

            #[test]
            fn sled() {
                run(Place::sled())
            }

            #[test]
            fn postgres() {
                run(Place::postgres())
            }
        }
    };
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

on_both! {
    fn a_committed_transition_survives_reopening(dir) {
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
}

on_both! {
    fn a_stale_transition_is_refused(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        tick(&store, &current).unwrap();
        let again = tick(&store, &current);
        assert!(
            matches!(again, Err(StoreError::Conflict { .. })),
            "{again:?}"
        );
        assert_eq!(store.events("w-1").unwrap().len(), 2);
    }
}

on_both! {
    fn creating_twice_is_refused(dir) {
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
}

on_both! {
    fn the_claimant_of_an_object_follows_every_claim_written(dir) {
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

on_both! {
    fn an_edited_event_breaks_the_chain(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        tick(&store, &current).unwrap();
        let key = records::event_key("w-1", 1);
        let written = store.tree("events").get(&key).unwrap().unwrap();
        let edited = String::from_utf8(written.to_vec())
            .unwrap()
            .replace("\"alice\"", "\"mallory\"");
        store.tree("events").insert(key, edited.as_bytes()).unwrap();
        let verdict = store.verify("w-1").unwrap();
        assert!(
            verdict
                .unwrap_err()
                .contains("event 1: content does not match its hash")
        );
    }
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

/// A tick committed on top of `current`, which may no longer be the rollout's head.
fn tick(store: &Store, current: &StoredRollout) -> Result<EventRecord, StoreError> {
    let next = current.rollout.clone();
    store.commit(
        current,
        &next,
        record(&next, EventKind::Tick),
        Attached::default(),
    )
}

/// A tick committed on top of the rollout's head.
fn ticked(store: &Store, current: &StoredRollout) -> StoredRollout {
    tick(store, current).unwrap();
    store.rollout(&current.rollout.id).unwrap()
}

on_both! {
    fn an_event_is_hashed_over_its_stored_bytes_so_fields_added_later_keep_it_verifiable(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        // An event as a later version writes it, with a field this version does not know.
        let (sealed, _) = records::seal(
            record(&current.rollout, EventKind::Tick),
            2,
            &current.last_hash,
        );
        let mut data = serde_json::to_value(&sealed).unwrap();
        data.as_object_mut().unwrap().remove("hash");
        data["added_later"] = serde_json::json!({"any": "shape"});
        let body = serde_json::to_vec(&serde_json::json!({"format": 3, "data": data})).unwrap();
        let hash = records::chain_hash(&current.last_hash, &body);
        let mut value = body[..body.len() - 1].to_vec();
        value.extend_from_slice(format!(",\"hash\":\"{hash}\"}}").as_bytes());
        store
            .tree("events")
            .insert(records::event_key("w-1", 2), value)
            .unwrap();
        let mut head = current.clone();
        head.rollout.last_seq = 2;
        head.last_hash = hash;
        store
            .tree("rollouts")
            .insert(b"w-1", records::encode(&head))
            .unwrap();
        assert_eq!(store.verify("w-1").unwrap(), Ok(2));
        assert_eq!(store.events("w-1").unwrap()[1].seq, 2);
    }
}

on_both! {
    fn an_event_of_format_2_verifies_by_the_rule_it_was_written_with(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        // Format 2 hashed the struct's JSON with an empty hash, and stored it with the hash.
        let mut legacy = record(&current.rollout, EventKind::Tick);
        legacy.seq = 2;
        legacy.prev_hash = current.last_hash.clone();
        let unsealed = serde_json::to_vec(&legacy).unwrap();
        legacy.hash = records::chain_hash(&legacy.prev_hash, &unsealed);
        let value = serde_json::to_vec(&serde_json::json!({"format": 2, "data": legacy})).unwrap();
        store
            .tree("events")
            .insert(records::event_key("w-1", 2), value)
            .unwrap();
        let mut head = current.clone();
        head.rollout.last_seq = 2;
        head.last_hash = legacy.hash.clone();
        store
            .tree("rollouts")
            .insert(b"w-1", records::encode(&head))
            .unwrap();
        assert_eq!(store.verify("w-1").unwrap(), Ok(2));
        // And a new event links to it.
        let head = ticked(&store, &store.rollout("w-1").unwrap());
        assert_eq!(head.rollout.last_seq, 3);
        assert_eq!(store.verify("w-1").unwrap(), Ok(3));
    }
}

#[test]
fn a_database_swapped_for_another_stores_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let our_id = Store::open(ours.path(), DEFAULT_LOCK_WAIT)
        .unwrap()
        .id()
        .to_string();
    let their_id = Store::open(theirs.path(), DEFAULT_LOCK_WAIT)
        .unwrap()
        .id()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(ours.path().join("store.id"))
            .unwrap()
            .trim(),
        our_id
    );
    std::fs::remove_dir_all(ours.path().join("sled")).unwrap();
    std::fs::rename(theirs.path().join("sled"), ours.path().join("sled")).unwrap();
    let err = Store::open(ours.path(), DEFAULT_LOCK_WAIT).err().unwrap();
    assert!(
        matches!(&err, StoreError::Replaced { expected, found, .. } if *expected == our_id && *found == their_id),
        "{err}"
    );
}

#[test]
fn a_missing_database_is_refused_rather_than_replaced_by_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let id = Store::open(dir.path(), DEFAULT_LOCK_WAIT)
        .unwrap()
        .id()
        .to_string();
    std::fs::remove_dir_all(dir.path().join("sled")).unwrap();
    let err = Store::open(dir.path(), DEFAULT_LOCK_WAIT).err().unwrap();
    assert!(
        matches!(&err, StoreError::Missing { id: missing, .. } if *missing == id),
        "{err}"
    );
    assert!(!dir.path().join("sled").exists(), "nothing was created");
    // An empty directory in its place is no better.
    std::fs::create_dir(dir.path().join("sled")).unwrap();
    let err = Store::open(dir.path(), DEFAULT_LOCK_WAIT).err().unwrap();
    assert!(matches!(err, StoreError::Replaced { .. }), "{err}");
}

#[test]
fn a_store_from_before_the_identity_file_gets_one() {
    let dir = tempfile::tempdir().unwrap();
    let id = Store::open(dir.path(), DEFAULT_LOCK_WAIT)
        .unwrap()
        .id()
        .to_string();
    std::fs::remove_file(dir.path().join("store.id")).unwrap();
    assert_eq!(Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap().id(), id);
    assert_eq!(
        identity::read(dir.path()).unwrap().as_deref(),
        Some(id.as_str())
    );
}

on_both! {
    fn an_export_rebuilds_the_store_and_its_heads_catch_a_rewrite(dir) {
        let export = {
            let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
            let current = created(&store);
            ticked(&store, &current);
            store.export(Timestamp::from_millis(9)).unwrap()
        };
        let files = tempfile::tempdir().unwrap();
        let file = files.path().join("export.json");
        export.write(&file).unwrap();
        let read = Export::read(&file).unwrap();
        assert_eq!(read, export);
        assert_eq!(read.heads.len(), 1);
        assert_eq!(read.heads[0].seq, 2);

        let copy = dir.another();
        import(copy.path(), &read).unwrap();
        {
            let store = Store::open(copy.path(), DEFAULT_LOCK_WAIT).unwrap();
            assert_eq!(store.id(), export.store);
            assert_eq!(store.verify("w-1").unwrap(), Ok(2));
            assert_eq!(
                store.check_heads(&read.heads).unwrap(),
                Vec::<String>::new()
            );
            // A second import over it is refused.
            drop(store);
            assert!(import(copy.path(), &read).is_err());
        }

        // Rewrite history in the original as someone with the database could: a new trail from
        // event 2, every hash recomputed. It verifies on its own; against the heads it does not.
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        store.tree("events").remove(records::event_key("w-1", 2)).unwrap();
        let mut head = store.rollout("w-1").unwrap();
        head.rollout.last_seq = 1;
        head.last_hash = store.events("w-1").unwrap()[0].hash.clone();
        store
            .tree("rollouts")
            .insert(b"w-1", records::encode(&head))
            .unwrap();
        let mut forged = record(&head.rollout, EventKind::Tick);
        forged.reason = "nothing happened here".into();
        let next = head.rollout.clone();
        store
            .commit(&head, &next, forged, Attached::default())
            .unwrap();
        assert_eq!(store.verify("w-1").unwrap(), Ok(2));
        let found = store.check_heads(&read.heads).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("history was rewritten"), "{found:?}");

        // A damaged export file is refused.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replacen("w-1", "w-2", 1)).unwrap();
        assert!(Export::read(&file).is_err());
    }
}

on_both! {
    /// The runner sorts a store by the glance of each record, so the glance must read what the
    /// whole record says: the same status, pending effects, expired hold and plans.
    fn a_glance_reads_what_the_whole_record_says(dir) {
        use crate::domain::event::{Effect, EffectId, PendingEffect};
        use crate::domain::rollout::{PlanChange, PlanFileChange};
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let mut current = created(&store);
        let glance = |store: &Store| {
            let listed = store.glances().unwrap();
            assert_eq!(listed.len(), 1);
            let whole = listed[0].decode().unwrap();
            assert_eq!(whole, store.rollout("w-1").unwrap());
            assert_eq!(listed[0].glance, RolloutGlance::from(&whole.rollout));
            listed[0].glance.clone()
        };
        let first = glance(&store);
        assert_eq!((first.pending, first.hold_expired), (0, false));
        assert_eq!((first.plan_change, first.plan_file), (None, None));

        let mut next = current.rollout.clone();
        next.status = RolloutStatus::Held;
        next.phases[1].hold_expired = true;
        next.pending.push(PendingEffect {
            id: EffectId { seq: 2, index: 0 },
            effect: Effect::CaptureBaseline,
        });
        next.plan_change = Some(PlanChange {
            plan_hash: "c".repeat(64),
            from_hash: next.plan_hash.clone(),
            by: "bob".into(),
            at: Timestamp::from_millis(7),
            weakens: vec!["approvals 1 → 0".into()],
            approvals: Vec::new(),
            approved: true,
        });
        next.plan_file = Some(PlanFileChange {
            plan_hash: "f".repeat(64),
            path: "plans/w.toml".into(),
            seen_at: Timestamp::from_millis(8),
        });
        current = store
            .commit(
                &current,
                &next,
                record(&next, EventKind::Tick),
                Attached::default(),
            )
            .map(|_| store.rollout("w-1").unwrap())
            .unwrap();
        let second = glance(&store);
        assert_eq!(second.status, RolloutStatus::Held);
        assert_eq!((second.pending, second.hold_expired), (1, true));
        assert_eq!(second.plan_change, Some(("c".repeat(64), true)));
        assert_eq!(second.plan_file, Some("f".repeat(64)));
        assert_eq!(current.rollout.status, RolloutStatus::Held);
    }
}

on_both! {
    /// Glanced at on several threads, a store lists in key order, every record once.
    fn glances_on_several_threads_keep_the_listing_order(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let plan = plan::parse("w", PLAN).unwrap();
        let plan_record = PlanRecord {
            path: "plans/w.toml".into(),
            source: PLAN.into(),
            hash: plan.hash.clone(),
        };
        for n in 0..5 {
            let rollout = Rollout::new(&format!("w-{n}"), &plan, "alice", Timestamp::from_millis(1));
            let start = EventKind::Start {
                plan_hash: plan.hash.clone(),
            };
            store
                .create(&rollout, record(&rollout, start), &plan_record, &[])
                .unwrap();
        }
        let ids =
            |listed: Vec<Glanced>| -> Vec<String> { listed.into_iter().map(|g| g.glance.id).collect() };
        let one = ids(store.glances_on(1, 1).unwrap());
        assert_eq!(one, ["w-0", "w-1", "w-2", "w-3", "w-4"]);
        assert_eq!(ids(store.glances_on(2, 1).unwrap()), one);
        assert_eq!(ids(store.glances_on(4, 2).unwrap()), one);
    }
}

on_both! {
    /// What providers keep their state in: writes, removals, atomic batches and prefix scans in
    /// key order, the same on both backends, and still there after reopening.
    fn a_provider_tree_keeps_batches_and_scans_in_key_order(dir) {
        {
            let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
            let tree = store.provider_tree("test").unwrap();
            tree.insert(b"a/2", b"two").unwrap();
            tree.apply_batch(&[
                (b"a/1".to_vec(), Some(b"one".to_vec())),
                (b"a/\xff".to_vec(), Some(vec![0, 255])),
                (b"b/1".to_vec(), Some(b"other".to_vec())),
                (b"a/2".to_vec(), None),
            ])
            .unwrap();
            tree.flush().unwrap();
            assert_eq!(tree.remove(b"b/1").unwrap().as_deref(), Some(&b"other"[..]));
            assert_eq!(tree.remove(b"b/1").unwrap(), None);
        }
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let tree = store.provider_tree("test").unwrap();
        let listed: Vec<(Vec<u8>, Vec<u8>)> = tree
            .scan_prefix(b"a/")
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            listed,
            vec![
                (b"a/1".to_vec(), b"one".to_vec()),
                (b"a/\xff".to_vec(), vec![0, 255]),
            ]
        );
        assert_eq!(tree.get(b"a/2").unwrap(), None);
        assert!(store.provider_tree("other").unwrap().scan_prefix(b"").unwrap().is_empty());
    }
}

/// Two processes on one database that both computed a transition from the same head: the
/// conditional commit lets exactly one in, and the trail stays contiguous.
#[test]
fn on_postgres_two_stores_committing_from_one_head_conflict_and_only_one_wins() {
    let place = Place::postgres();
    let first = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    let second = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    assert_eq!(first.id(), second.id());
    let current = created(&first);
    let outcomes: Vec<Result<EventRecord, StoreError>> = std::thread::scope(|scope| {
        let commits: Vec<_> = [&first, &second]
            .into_iter()
            .map(|store| {
                let current = current.clone();
                scope.spawn(move || {
                    let next = current.rollout.clone();
                    store.commit(
                        &current,
                        &next,
                        record(&next, EventKind::Tick),
                        Attached::default(),
                    )
                })
            })
            .collect();
        commits.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| matches!(
            o,
            Err(StoreError::Conflict {
                expected: 2,
                found: 2,
                ..
            })
        )),
        "{outcomes:?}"
    );
    assert_eq!(second.events("w-1").unwrap().len(), 2);
    assert_eq!(second.verify("w-1").unwrap(), Ok(2));
}

#[test]
fn on_postgres_a_schema_of_a_newer_phasegate_is_refused() {
    let place = Place::postgres();
    drop(Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap());
    let url = place.path().to_str().unwrap().to_string();
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    client
        .execute(
            "INSERT INTO phasegate.schema_version (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .unwrap();
    let err = Store::open(place.path(), DEFAULT_LOCK_WAIT).err().unwrap();
    assert!(
        err.to_string().contains("written by a newer phasegate"),
        "{err}"
    );
}

#[test]
fn on_postgres_an_error_never_shows_the_password() {
    let url = "postgres://phasegate:n0t-to-be-shown@127.0.0.1:1/none";
    let err = Store::open(Path::new(url), DEFAULT_LOCK_WAIT)
        .err()
        .unwrap();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("n0t-to-be-shown"), "{shown}");
    assert!(shown.contains("127.0.0.1:1"), "{shown}");
    let err = lock_driver(Path::new(url)).err().unwrap();
    assert!(!format!("{err} {err:?}").contains("n0t-to-be-shown"));
}

/// `sslmode=require` against a server without TLS is a clear error, not a silent plain
/// connection.
#[test]
fn on_postgres_a_url_that_requires_tls_is_refused_by_a_server_without_it() {
    let place = Place::postgres();
    let url = format!("{}?sslmode=require", place.path().display());
    let err = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT)
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// Over TLS with the server's certificate checked (`verify-full`), the store works as on plain
/// TCP: a rollout created, ticked and read back, and the same store opened again.
#[test]
fn on_postgres_over_verify_full_tls_a_store_round_trip_works() {
    use crate::test_postgres::{Admit, Postgres};
    let server = Postgres::start_tls(Admit::TlsOnly);
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.database(),
        server.ca_file().display()
    );
    let store = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT).unwrap();
    let current = created(&store);
    let current = ticked(&store, &current);
    let current = ticked(&store, &current);
    assert_eq!(current.rollout.last_seq, 3);
    let seqs: Vec<u64> = store.events("w-1").unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let chain = store.verify("w-1").unwrap();
    assert!(chain.is_ok(), "{chain:?}");
    drop(store);
    let again = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT).unwrap();
    assert_eq!(again.rollout("w-1").unwrap().rollout.last_seq, 3);
}

on_both! {
    /// A transition computed from a head the store never had (a rollout it does not hold, at
    /// event 5) writes nothing: the sequence starts at 1 and stays contiguous.
    fn a_transition_from_a_head_the_store_never_had_is_refused(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let mut current = created(&store);
        current.rollout.id = "w-9".into();
        current.rollout.last_seq = 5;
        let next = current.rollout.clone();
        let err = store
            .commit(&current, &next, record(&next, EventKind::Tick), Attached::default())
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { expected: 6, found: 0, .. }),
            "{err}"
        );
        assert!(matches!(store.rollout("w-9"), Err(StoreError::NotFound(_))));
        assert!(store.events("w-9").unwrap().is_empty());
    }
}

/// Makes every lease of the database expired, as if its length had passed on the database's
/// clock (a paused owner that did not renew).
fn expire_leases(place: &Place) {
    let url = place.path().to_str().unwrap().to_string();
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    client
        .execute(
            "UPDATE phasegate.leases SET expires_at = now() - interval '1 second'",
            &[],
        )
        .unwrap();
}

/// A stale owner (its lease expired and another replica took it) commits nothing, even from the
/// head the store is at: the fence refuses it, and the new owner's commits go on.
#[test]
fn on_postgres_a_stale_owners_commit_after_a_takeover_is_fenced_and_leaves_nothing() {
    let place = Place::postgres();
    let stale = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    let fresh = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    stale.set_replica("replica-a");
    fresh.set_replica("replica-b");
    let ttl = Duration::from_secs(60);
    let current = created(&stale);
    assert_eq!(stale.acquire_lease("w-1", ttl).unwrap(), Some(1));
    // Live: the other replica cannot take it, and a commit without a lease is refused.
    assert_eq!(fresh.acquire_lease("w-1", ttl).unwrap(), None);
    let unfenced = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    assert!(
        matches!(
            tick(&unfenced, &current),
            Err(StoreError::Fenced { epoch: 1, .. })
        ),
        "a commit without the lease goes through while a replica owns the rollout"
    );
    let current = {
        tick(&stale, &current).unwrap();
        stale.rollout("w-1").unwrap()
    };
    assert_eq!(current.rollout.last_seq, 2);
    expire_leases(&place);
    assert_eq!(fresh.acquire_lease("w-1", ttl).unwrap(), Some(2));
    let fenced_before = crate::metrics::global().fenced_count();
    let refused = tick(&stale, &current);
    assert!(
        matches!(refused, Err(StoreError::Fenced { ref id, epoch: 2 }) if id == "w-1"),
        "{refused:?}"
    );
    assert!(
        !stale.holds_lease("w-1"),
        "a fenced replica forgets the lease"
    );
    assert!(crate::metrics::global().fenced_count() > fenced_before);
    // Nothing of the refused commit is in the store.
    assert_eq!(fresh.rollout("w-1").unwrap().rollout.last_seq, 2);
    assert_eq!(fresh.events("w-1").unwrap().len(), 2);
    // The new owner commits from the same head; the stale one's renewal tells it the lease is lost.
    tick(&fresh, &current).unwrap();
    assert_eq!(stale.renew_leases(ttl).unwrap(), Vec::<String>::new());
    assert_eq!(fresh.verify("w-1").unwrap(), Ok(3));
    let leases = fresh.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].owner.as_str(), leases[0].epoch),
        ("replica-b", 2)
    );
    assert!(leases[0].remaining_ms > 0, "{leases:?}");
}

/// A replica that lost a rollout's lease (its renewal said so, and it forgot the lease) commits
/// nothing of that rollout afterwards, even once no replica holds the lease any more: a replica
/// commits only under a lease it holds, and only a rollout's creation needs none.
#[test]
fn on_postgres_a_replica_that_lost_a_lease_commits_nothing_even_once_the_lease_lapsed() {
    let place = Place::postgres();
    let stale = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    let fresh = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    stale.set_replica("replica-a");
    fresh.set_replica("replica-b");
    let ttl = Duration::from_secs(60);
    // Created by a replica, without a lease: the creation needs none.
    let current = created(&stale);
    assert_eq!(stale.acquire_lease("w-1", ttl).unwrap(), Some(1));
    expire_leases(&place);
    assert_eq!(fresh.acquire_lease("w-1", ttl).unwrap(), Some(2));
    assert_eq!(stale.renew_leases(ttl).unwrap(), vec!["w-1".to_string()]);
    assert!(!stale.holds_lease("w-1"));
    // The new owner stops too: its lease runs out, nobody holds the rollout now.
    expire_leases(&place);
    assert_eq!(stale.lease_holder("w-1").unwrap(), None);
    let refused = tick(&stale, &current);
    assert!(
        matches!(refused, Err(StoreError::Fenced { epoch: 2, .. })),
        "{refused:?}"
    );
    assert_eq!(fresh.events("w-1").unwrap().len(), 1);
    // A process that is no replica (the CLI on the store) commits while no lease is live.
    let unleased = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    tick(&unleased, &current).unwrap();
    assert_eq!(unleased.verify("w-1").unwrap(), Ok(2));
}

/// Renewing keeps a lease (and its epoch); one taken over is reported lost; a released one is
/// taken by another replica at once, one epoch up.
#[test]
fn on_postgres_leases_are_renewed_lost_and_released() {
    let place = Place::postgres();
    let a = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    let b = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    a.set_replica("replica-a");
    b.set_replica("replica-b");
    let ttl = Duration::from_secs(60);
    let current = created(&a);
    assert_eq!(a.acquire_lease("w-1", ttl).unwrap(), Some(1));
    assert_eq!(
        a.acquire_lease("w-1", ttl).unwrap(),
        Some(1),
        "its own lease is renewed"
    );
    assert_eq!(a.renew_leases(ttl).unwrap(), Vec::<String>::new());
    assert_eq!(a.held_leases(), vec![("w-1".to_string(), 1)]);
    expire_leases(&place);
    assert_eq!(b.acquire_lease("w-1", ttl).unwrap(), Some(2));
    assert_eq!(a.renew_leases(ttl).unwrap(), vec!["w-1".to_string()]);
    assert!(a.held_leases().is_empty());
    tick(&b, &current).unwrap();
    b.release_lease("w-1").unwrap();
    assert_eq!(a.acquire_lease("w-1", ttl).unwrap(), Some(3));
    // A replica without the lease is refused, its commit leaves nothing.
    let after = a.rollout("w-1").unwrap();
    assert!(matches!(
        tick(&b, &after),
        Err(StoreError::Fenced { epoch: 3, .. })
    ));
    tick(&a, &after).unwrap();
    assert_eq!(a.verify("w-1").unwrap(), Ok(3));
}

on_both! {
    /// A provider's compare and swap writes only over the value it read (or where there is none),
    /// so two processes updating one provider record lose neither's write.
    fn a_compare_and_swap_writes_only_over_what_was_read(dir) {
        let store = Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap();
        let tree = store.provider_tree("test").unwrap();
        assert!(tree.compare_and_swap("k", None, b"1").unwrap());
        assert!(!tree.compare_and_swap("k", None, b"2").unwrap());
        assert!(!tree.compare_and_swap("k", Some(b"0"), b"2").unwrap());
        assert_eq!(tree.get("k").unwrap().map(|b| b.to_vec()), Some(b"1".to_vec()));
        assert!(tree.compare_and_swap("k", Some(b"1"), b"2").unwrap());
        assert_eq!(tree.get("k").unwrap().map(|b| b.to_vec()), Some(b"2".to_vec()));
    }
}

/// A fenced compare and swap (what the simulated tenant is written with under `serve`) writes
/// only while the replica holds the rollout's lease at the fence's epoch.
#[test]
fn on_postgres_a_fenced_compare_and_swap_writes_only_under_the_lease() {
    let place = Place::postgres();
    let store = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    store.set_replica("replica-a");
    let ttl = Duration::from_secs(60);
    assert_eq!(store.acquire_lease("w-1", ttl).unwrap(), Some(1));
    let tree = store.provider_tree("test").unwrap();
    let fence = |epoch| crate::store::WriteFence {
        rollout: "w-1".into(),
        replica: "replica-a".into(),
        epoch,
    };
    assert!(
        tree.compare_and_swap_fenced("k", None, b"1", Some(&fence(1)))
            .unwrap()
    );
    assert!(
        !tree
            .compare_and_swap_fenced("k", Some(b"1"), b"2", Some(&fence(2)))
            .unwrap()
    );
    assert!(
        !tree
            .compare_and_swap_fenced("j", None, b"1", Some(&fence(2)))
            .unwrap()
    );
    assert!(
        tree.compare_and_swap_fenced("k", Some(b"1"), b"2", Some(&fence(1)))
            .unwrap()
    );
    assert_eq!(
        tree.get("k").unwrap().map(|b| b.to_vec()),
        Some(b"2".to_vec())
    );
    assert_eq!(tree.get("j").unwrap(), None);
}

/// Ends every other session on the place's database, as an administrator's
/// `pg_terminate_backend` (or a server restart) does; how many it ended.
fn end_other_sessions(place: &Place) -> i64 {
    let url = place.path().to_str().unwrap().to_string();
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let row = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap();
    row.get(0)
}

/// A session the server ended while the store was idle (57P01) costs the next request nothing:
/// it runs on a new session, reads and commits alike, and the trail goes on unbroken.
#[test]
fn on_postgres_a_session_the_server_ended_is_made_again_for_the_next_request() {
    let place = Place::postgres();
    let store = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
    let current = created(&store);
    assert!(end_other_sessions(&place) >= 1, "the store had a session");
    assert_eq!(store.rollout("w-1").unwrap().rollout.last_seq, 1);
    end_other_sessions(&place);
    tick(&store, &current).unwrap();
    assert_eq!(store.verify("w-1").unwrap(), Ok(2));
}

/// A database that cannot be reached at all is `Unavailable` (a 503 through the API, to be sent
/// again), not a failure of the request itself.
#[test]
fn on_postgres_a_database_that_went_away_is_unavailable_not_broken() {
    let server = crate::test_postgres::Postgres::start(&[]);
    let url = server.database();
    let store = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT).unwrap();
    created(&store);
    drop(server);
    let err = store.rollout("w-1").unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("try again"), "{err}");
}

on_both! {
    /// What a replica reads at every renewal: each rollout's sequence without its record, and
    /// then only the records that moved.
    fn the_sequences_tell_which_records_moved_and_only_those_are_read(place) {
        let store = Store::open(place.path(), DEFAULT_LOCK_WAIT).unwrap();
        let current = created(&store);
        assert_eq!(store.rollout_seqs().unwrap(), vec![("w-1".to_string(), 1)]);
        tick(&store, &current).unwrap();
        assert_eq!(store.rollout_seqs().unwrap(), vec![("w-1".to_string(), 2)]);
        let glanced = store
            .glances_of(&["w-1".to_string(), "absent".to_string()])
            .unwrap();
        assert_eq!(glanced.len(), 1);
        assert_eq!(glanced[0].glance.id, "w-1");
        assert_eq!(glanced[0].decode().unwrap().rollout.last_seq, 2);
        assert!(store.live_leases().unwrap().is_empty());
    }
}
