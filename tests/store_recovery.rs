//! A damaged, swapped or missing store, through the real binary: every command fails with a
//! clear error, the tenant gets back to its baseline from a backup (on the simulator and on the
//! Graph emulator), a swapped or deleted database is refused, history rewritten after an export
//! is found, and a store of the previous format opens, verifies and continues.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Emulator, Receiver, SECRET, answer, code, stderr, stdout};
use phasegate::adapters::parse_plan;
use phasegate::provider::simulator::{SimProvider, settings};
use phasegate::store::{DEFAULT_LOCK_WAIT, Store};
use serde_json::Value;

/// A simulator store in a directory of its own, commands run from the repository root.
struct Local {
    dir: tempfile::TempDir,
}

impl Local {
    fn new() -> Local {
        Local {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn run_in(&self, store: &Path, args: &[&str]) -> Output {
        Command::new(common::BIN)
            .args(args)
            .env("PHASEGATE_STORE", store)
            .env_remove("RUST_LOG")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_in(&self.store(), args)
    }

    fn json(&self, store: &Path, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.run_in(store, &all);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stderr(&out)))
    }

    fn start(&self, plan: &str) -> String {
        let out = self.run(&["start", plan, "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim().to_string()
    }
}

/// Flips one byte near the start of sled's log, where the first records are.
fn flip_a_byte(store: &Path) {
    let db = store.join("sled/db");
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&db, bytes).unwrap();
}

fn truncate(store: &Path) {
    let db = store.join("sled/db");
    let file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    file.set_len(300).unwrap();
}

/// Every command that reads or changes the store fails with a clear error, exit 1, no panic.
fn every_command_fails_clearly(run: impl Fn(&[&str]) -> Output, id: &str) {
    for args in [
        vec!["status"],
        vec!["status", id],
        vec!["history", id],
        vec!["history", id, "--verify"],
        vec!["run", "--once"],
        vec!["run", id],
        vec!["approve", id, "--by", "bob"],
        vec!["pause", id, "--by", "bob"],
        vec!["abort", id, "--by", "bob", "--reason", "store damaged"],
        vec!["rollback", id, "--by", "bob", "--reason", "store damaged"],
        vec!["export", "--to", "/dev/null"],
        vec!["token", "list"],
    ] {
        let out = run(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("the database is damaged and cannot be read")
                && err.contains("A damaged store"),
            "{args:?}: {err}"
        );
    }
}

fn simulated_assignments(store: &Path, plan_file: &str) -> usize {
    let store = Store::open(store, DEFAULT_LOCK_WAIT).unwrap();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(plan_file)).unwrap();
    let plan = parse_plan("p", &text).unwrap();
    let tenant = SimProvider::open(&settings::of(&plan.provider).unwrap(), &store).unwrap();
    let history = tenant.history(&plan.policy.compliance[0]);
    history.last().map_or(0, |h| h.assignments.len())
}

#[test]
fn a_flipped_byte_in_the_database_fails_every_command_and_the_simulated_tenant_comes_back_from_the_export()
 {
    const PLAN: &str = "plans/ios-parallel-pilots.toml";
    let pg = Local::new();
    let id = pg.start(PLAN);
    assert_eq!(code(&pg.run(&["run"])), 3);
    assert!(
        simulated_assignments(&pg.store(), PLAN) > 0,
        "phases applied"
    );
    let backup = pg.dir.path().join("backup.json");
    let out = pg.run(&["export", "--to", backup.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    flip_a_byte(&pg.store());
    every_command_fails_clearly(|args| pg.run(args), &id);
    // The simulated tenant is inside the damaged database: restore-tenant says what to do.
    let out = pg.run(&["restore-tenant", "--from", backup.to_str().unwrap(), &id]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("restore-store"), "{}", stderr(&out));

    // Rebuilt in a new store directory: the rollout as it was, its trail verified.
    let rebuilt = pg.dir.path().join("rebuilt");
    let out = pg.run_in(
        &rebuilt,
        &["restore-store", "--from", backup.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        code(&pg.run_in(&rebuilt, &["verify", "--against", backup.to_str().unwrap()])),
        0
    );
    assert_eq!(code(&pg.run_in(&rebuilt, &["history", &id, "--verify"])), 0);
    assert_eq!(
        pg.json(&rebuilt, &["status", &id])["status"],
        "waiting_approval"
    );
    let out = pg.run_in(&rebuilt, &["abort", &id, "--by", "bob", "--reason", "disk"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    pg.run_in(&rebuilt, &["run", &id]);
    assert_eq!(pg.json(&rebuilt, &["status", &id])["status"], "aborted");
    assert_eq!(
        simulated_assignments(&rebuilt, PLAN),
        0,
        "back to the baseline"
    );
    // Restoring over an existing store is refused.
    let out = pg.run_in(
        &rebuilt,
        &["restore-store", "--from", backup.to_str().unwrap()],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn a_truncated_database_fails_every_command_and_the_graph_tenant_is_restored_from_the_recovery_kit()
{
    let emulator = Emulator::spawn(&["--client-secret", SECRET, "--ca-rate", "50"]);
    let before = configuration(&emulator);
    let pg = common::Phasegate::new(&emulator, 50.0);
    let id = pg.start();
    let out = pg.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(pg.status(&id)["status"], "waiting_approval");
    assert_ne!(configuration(&emulator), before, "phases applied");
    let store = pg.store_dir();
    // Kept automatically beside the database, after every commit that changed the record.
    let kit = store.join("recovery").join(format!("{id}.json"));
    let kept = pg.dir.path().join("kit.json");
    std::fs::copy(&kit, &kept).unwrap();

    truncate(&store);
    every_command_fails_clearly(|args| pg.run(args), &id);

    let out = pg.run(&["restore-tenant", "--from", kept.to_str().unwrap(), &id]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("tenant restored to the baseline"),
        "{}",
        stdout(&out)
    );
    assert_eq!(configuration(&emulator), before);
    // Again: nothing left to change.
    let out = pg.run(&["restore-tenant", "--from", kept.to_str().unwrap(), &id]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("(0 changes)"), "{}", stdout(&out));
}

#[test]
fn restoring_the_tenant_keeps_another_admins_change_and_is_refused_while_the_store_is_readable() {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--ca-rate",
        "50",
        "--scenario",
        "lived-in",
        "--devices",
        "2000",
    ]);
    let before = configuration(&emulator);
    let pg = common::Phasegate::new(&emulator, 50.0);
    let id = pg.start();
    assert_eq!(code(&pg.run(&["run", &id])), 3);
    let backup = pg.dir.path().join("backup.json");
    assert_eq!(
        code(&pg.run(&["export", "--to", backup.to_str().unwrap()])),
        0
    );
    let out = pg.run(&["restore-tenant", "--from", backup.to_str().unwrap(), &id]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("phasegate abort"), "{}", stderr(&out));

    // Another administrator excludes Finance from the Conditional Access policy phasegate
    // drives; then the database is lost.
    let state = emulator.get("/_emulator/state");
    let finance = state["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["displayName"] == "Finance")
        .unwrap()["id"]
        .clone();
    let ca = emulator.graph(SECRET, "/v1.0/identity/conditionalAccess/policies")["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["displayName"] == "Require compliant device for Office 365")
        .unwrap()
        .clone();
    let mut excluded = ca["conditions"]["users"]["excludeGroups"]
        .as_array()
        .unwrap()
        .clone();
    excluded.push(finance.clone());
    let answer = emulator.post(
        "/_emulator/as-admin",
        &serde_json::json!({"method": "PATCH", "path": format!("/identity/conditionalAccess/policies/{}", ca["id"].as_str().unwrap()),
                "body": {"conditions": {"users": {"excludeGroups": excluded}}}}),
    );
    assert_eq!(answer["status"], 204, "{answer}");
    std::fs::remove_dir_all(pg.store_dir().join("sled")).unwrap();
    let status = pg.run(&["status"]);
    assert_eq!(code(&status), 1);
    assert!(
        stderr(&status).contains("is missing"),
        "{}",
        stderr(&status)
    );

    let out = pg.run(&["restore-tenant", "--from", backup.to_str().unwrap(), &id]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let after = configuration(&emulator);
    assert_eq!(
        after["policies"], before["policies"],
        "compliance policies back"
    );
    let ca = emulator.graph(SECRET, "/v1.0/identity/conditionalAccess/policies")["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["displayName"] == "Require compliant device for Office 365")
        .unwrap()
        .clone();
    assert!(
        ca["conditions"]["users"]["excludeGroups"]
            .as_array()
            .unwrap()
            .contains(&finance),
        "the other admin's exclusion stays: {ca}"
    );
}

/// What phasegate manages in the emulated tenant, without timestamps and counters; an
/// assignment without a filter reads the same whether the filter is absent or `none`.
fn configuration(emulator: &Emulator) -> Value {
    let state = emulator.get("/_emulator/state");
    let assignment = |a: &Value| {
        let filter = a["deviceAndAppManagementAssignmentFilterId"].clone();
        serde_json::json!({"@odata.type": a["@odata.type"], "groupId": a["groupId"],
            "filter": filter, "filterType": if filter.is_null() { Value::Null } else { a["deviceAndAppManagementAssignmentFilterType"].clone() }})
    };
    let policies: Vec<Value> = state["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let assignments: Vec<Value> = p["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .map(assignment)
                .collect();
            serde_json::json!({"id": p["id"], "assignments": assignments, "actions": p["actions"]})
        })
        .collect();
    serde_json::json!({"policies": policies, "conditionalAccess": state["conditionalAccess"]})
}

#[test]
fn a_swapped_or_deleted_database_is_refused_with_a_clear_error() {
    let ours = Local::new();
    let theirs = Local::new();
    let id = ours.start("plans/windows-baseline.toml");
    theirs.start("plans/windows-baseline.toml");
    assert_eq!(code(&ours.run(&["run", "--once"])), 0);
    assert_eq!(code(&theirs.run(&["run", "--once"])), 0);
    let our_id = std::fs::read_to_string(ours.store().join("store.id")).unwrap();

    // Their database in our place: the same rollout id, a trail that verifies on its own.
    std::fs::rename(ours.store().join("sled"), ours.dir.path().join("kept")).unwrap();
    std::fs::rename(theirs.store().join("sled"), ours.store().join("sled")).unwrap();
    for args in [
        vec!["status"],
        vec!["history", &id, "--verify"],
        vec!["run"],
    ] {
        let out = ours.run(&args);
        assert_eq!(code(&out), 1, "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("is not this store's") && err.contains(our_id.trim()),
            "{args:?}: {err}"
        );
    }

    // No database at all: an error, never a fresh empty store.
    std::fs::remove_dir_all(ours.store().join("sled")).unwrap();
    for args in [
        vec!["status"],
        vec!["run"],
        vec!["start", "plans/windows-baseline.toml"],
    ] {
        let out = ours.run(&args);
        assert_eq!(code(&out), 1, "{args:?}");
        assert!(stderr(&out).contains("is missing"), "{}", stderr(&out));
    }
    assert!(!ours.store().join("sled").exists());

    // Our own database back: all is well.
    std::fs::rename(ours.dir.path().join("kept"), ours.store().join("sled")).unwrap();
    assert_eq!(code(&ours.run(&["history", &id, "--verify"])), 0);
}

#[test]
fn history_rewritten_after_an_export_or_a_notification_is_found() {
    let pg = Local::new();
    let hook = Receiver::start(answer(204, ""));
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/windows-baseline.toml"),
    )
    .unwrap()
    .replacen(
        "[[phase]]",
        &format!(
            "[[webhook]]\nurl = \"{}/hook\"\nevents = [\"waiting_approval\"]\n\n[[phase]]",
            hook.url
        ),
        1,
    );
    let plan = pg.dir.path().join("plan.toml");
    std::fs::write(&plan, text).unwrap();
    let id = pg.start(plan.to_str().unwrap());
    assert_eq!(code(&pg.run(&["run", &id])), 3);
    let backup = pg.dir.path().join("backup.json");
    let exported = pg.json(&pg.store(), &["export", "--to", backup.to_str().unwrap()]);
    let heads = pg.dir.path().join("heads.json");
    std::fs::write(&heads, exported["heads"].to_string()).unwrap();

    // The notification carries the head of the trail at the event that sent it.
    let requests = hook.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let body: Value = serde_json::from_str(requests[0].split_once("\r\n\r\n").unwrap().1).unwrap();
    let head = &body["chainHead"];
    let store_id = std::fs::read_to_string(pg.store().join("store.id")).unwrap();
    assert_eq!(head["store"], store_id.trim());
    assert_eq!(head["rollout"], id.as_str());
    assert!(
        body["idempotencyKey"]
            .as_str()
            .unwrap()
            .starts_with(store_id.trim())
    );
    let history = pg.json(&pg.store(), &["history", &id]);
    let event = &history[head["seq"].as_u64().unwrap() as usize - 1];
    assert_eq!(event["hash"], head["hash"]);
    let received = pg.dir.path().join("received.jsonl");
    std::fs::write(&received, format!("{}\n", body)).unwrap();
    for file in [&backup, &heads, &received] {
        let out = pg.run(&["verify", "--against", file.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }

    // Someone with the database rewrites the trail from the start, every hash recomputed: it
    // verifies on its own, but not against what was kept outside.
    rewrite_history(&pg.store(), &id);
    assert_eq!(code(&pg.run(&["history", &id, "--verify"])), 0);
    for file in [&backup, &heads, &received] {
        let out = pg.run(&["verify", "--against", file.to_str().unwrap()]);
        assert_eq!(code(&out), 1, "{file:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("history was rewritten"),
            "{}",
            stderr(&out)
        );
    }
}

/// Re-chains every event of `id` after replacing who started it, as a forger with the
/// database and the code would.
fn rewrite_history(store: &Path, id: &str) {
    use phasegate::store::{EventRecord, StoredRollout};
    let db = sled::open(store.join("sled")).unwrap();
    let events = db.open_tree("events").unwrap();
    let rollouts = db.open_tree("rollouts").unwrap();
    let mut prev = String::new();
    for entry in events.scan_prefix(format!("{id}\0").as_bytes()) {
        let (key, value) = entry.unwrap();
        let envelope: Value = serde_json::from_slice(&value).unwrap();
        let mut record: EventRecord = serde_json::from_value(envelope["data"].clone()).unwrap();
        record.event.trigger.actor = record.event.trigger.actor.replace("alice", "mallory");
        let sealed = record.clone().sealed(record.seq, &prev);
        prev = sealed.hash.clone();
        let mut data = serde_json::to_value(&sealed).unwrap();
        data.as_object_mut().unwrap().remove("hash");
        let body = serde_json::to_vec(&serde_json::json!({"format": 3, "data": data})).unwrap();
        let mut stored = body[..body.len() - 1].to_vec();
        stored.extend_from_slice(format!(",\"hash\":\"{}\"}}", sealed.hash).as_bytes());
        events.insert(key, stored).unwrap();
    }
    let envelope: Value = serde_json::from_slice(&rollouts.get(id).unwrap().unwrap()).unwrap();
    let mut head: StoredRollout = serde_json::from_value(envelope["data"].clone()).unwrap();
    head.last_hash = prev;
    let bytes = serde_json::to_vec(&serde_json::json!({"format": 3, "data": head})).unwrap();
    rollouts.insert(id, bytes).unwrap();
    db.flush().unwrap();
}

#[test]
fn a_store_of_the_previous_format_opens_verifies_and_continues() {
    const LAST_HASH: &str = "6fe4dd123cf98b6a495802bc9b6b7a8e138d3aedf5b18339ab4186d88ddc22d6";
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-format-2");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let store = dir.path().join("store");
    let run = |args: &[&str]| {
        Command::new(common::BIN)
            .args(args)
            .env("PHASEGATE_STORE", &store)
            .env_remove("RUST_LOG")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["history", "fixture-1", "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("6 events"), "{}", stdout(&out));
    let history: Value =
        serde_json::from_slice(&run(&["history", "fixture-1", "--output", "json"]).stdout).unwrap();
    assert_eq!(history[5]["hash"], LAST_HASH);
    assert_eq!(history[0]["event"]["trigger"]["actor"], "alice");
    assert!(store.join("store.id").exists(), "given an identity");

    // It continues: the new events link to the old ones, and the whole trail verifies.
    let out = run(&["run", "fixture-1"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let status: Value =
        serde_json::from_slice(&run(&["status", "fixture-1", "--output", "json"]).stdout).unwrap();
    assert_eq!(status["status"], "waiting_approval");
    let history: Value =
        serde_json::from_slice(&run(&["history", "fixture-1", "--output", "json"]).stdout).unwrap();
    assert!(history.as_array().unwrap().len() > 6);
    assert_eq!(history[6]["prev_hash"], LAST_HASH);
    let out = run(&["history", "fixture-1", "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let backup = dir.path().join("backup.json");
    let out = run(&["export", "--to", backup.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["verify", "--against", backup.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
