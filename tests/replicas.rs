//! Two `serve` replicas on one PostgreSQL database (a real server, `common::postgres`): each
//! rollout is driven by the replica holding its lease; a replica paused (SIGSTOP) past its lease
//! loses its rollouts to the other, which carries them to completion, and commits nothing when it
//! wakes (SIGCONT). Every chain verifies and no effect's outcome is recorded twice. A command
//! given to a replica that does not own the rollout is carried out by the owner.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::postgres::shared;
use common::{Phasegate, Serve, code, stderr, stdout};
use serde_json::Value;

const ROLLOUTS: usize = 4;

/// A store in a new database with an admin token, and a way to start rollouts on it (each on a
/// simulated tenant of its own: a tenant is driven by one rollout at a time).
struct Setup {
    url: String,
    cli: Phasegate,
    root: std::path::PathBuf,
    token: String,
}

impl Setup {
    fn new() -> Setup {
        let url = shared_database();
        let pg = Phasegate::offline();
        let root = pg.dir.path().to_path_buf();
        let cli = pg
            .with_env("PHASEGATE_STORE", &url)
            .with_env("XDG_DATA_HOME", root.join("cli").to_str().unwrap());
        let out = cli.run(&["token", "create", "--name", "bob", "--role", "admin"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let token = stdout(&out).trim().to_string();
        Setup {
            url,
            cli,
            root,
            token,
        }
    }

    fn start(&self, seed: usize) -> String {
        let plan = self.root.join(format!("plan-{seed}.toml"));
        let text = include_str!("../plans/windows-baseline.toml")
            .replace("seed = 7", &format!("seed = {seed}"));
        std::fs::write(&plan, text).unwrap();
        let out = self
            .cli
            .run(&["start", plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim().to_string()
    }

    fn replica(&self, name: &str, args: &[&str]) -> Serve {
        let data = self.root.join(name);
        Serve::start_with(
            std::path::Path::new(&self.url),
            args,
            &[("XDG_DATA_HOME", data.to_str().unwrap())],
        )
    }
}

fn shared_database() -> String {
    // The server lives as long as the test process (the tests of this file share it).
    static SERVER: std::sync::OnceLock<std::sync::Arc<common::postgres::Postgres>> =
        std::sync::OnceLock::new();
    SERVER.get_or_init(shared).database()
}

#[test]
fn a_command_given_to_a_replica_that_does_not_own_the_rollout_is_carried_out_by_the_owner() {
    let setup = Setup::new();
    let id = setup.start(300);
    let token = &setup.token;
    let mut db = postgres::Client::connect(&setup.url, postgres::NoTls).unwrap();
    let a = setup.replica("a", &["--lease", "15s", "--renew-every", "1s"]);
    assert!(
        common::eventually(Duration::from_secs(60), || {
            live_owners(&mut db).contains_key(&id)
                && a.call("GET", &format!("/api/v1/rollouts/{id}"), token, None)
                    .1["status"]
                    == "waiting_approval"
        }),
        "{}",
        a.output()
    );
    let owner = live_owners(&mut db)[&id].clone();
    let b = setup.replica("b", &["--lease", "15s", "--renew-every", "1s"]);
    // Refused by the rollout's state on the owner: the owner's answer comes back (409).
    let (status, refused) = b.call(
        "POST",
        &format!("/api/v1/rollouts/{id}/resume"),
        token,
        Some(&serde_json::json!({"by": "bob", "reason": "not paused"})),
    );
    assert_eq!(status, 409, "{refused}");
    // Approved through the other replica: carried out by the owner, which keeps the lease.
    let (status, approved) = b.call(
        "POST",
        &format!("/api/v1/rollouts/{id}/approve"),
        token,
        Some(&serde_json::json!({"by": "bob"})),
    );
    assert_eq!(status, 200, "{approved}");
    // Never another owner: the lease row still names the first one, at the first epoch (it is
    // released, not handed over, when the rollout finishes).
    assert_eq!(lease_of(&mut db, &id), (owner.clone(), 1));
    assert!(
        common::eventually(Duration::from_secs(60), || {
            b.call("GET", &format!("/api/v1/rollouts/{id}"), token, None)
                .1["status"]
                == "completed"
        }),
        "{}",
        a.output()
    );
    assert_eq!(lease_of(&mut db, &id), (owner, 1));
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
    let history = setup.cli.json(&["history", &id]);
    let granted: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"]["kind"]["type"] == "approval_granted")
        .collect();
    assert_eq!(granted.len(), 1, "{history}");
    assert_eq!(granted[0]["event"]["trigger"]["actor"], "bob");
    let out = setup.cli.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// The owner (or last owner) of rollout `id`'s lease and its epoch.
fn lease_of(db: &mut postgres::Client, id: &str) -> (String, i64) {
    let row = db
        .query_one(
            "SELECT owner, epoch FROM phasegate.leases WHERE rollout = $1",
            &[&id],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Who holds each rollout's live lease, on the database's clock.
fn live_owners(db: &mut postgres::Client) -> BTreeMap<String, String> {
    db.query(
        "SELECT rollout, owner FROM phasegate.leases WHERE expires_at > now()",
        &[],
    )
    .unwrap()
    .into_iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

fn signal(serve: &Serve, signal: i32) {
    // SAFETY: kill only sends a signal to the child the test started.
    assert_eq!(unsafe { libc::kill(serve.child.id() as i32, signal) }, 0);
}

/// The outcomes of effects (the tenant's writes and deliveries) recorded in a trail.
fn outcomes(history: &Value) -> Vec<(String, String)> {
    history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let kind = &e["event"]["kind"];
            let name = kind["type"].as_str()?;
            ["reconciled", "baseline_captured", "delivered"]
                .contains(&name)
                .then(|| (name.to_string(), kind["effect"].to_string()))
        })
        .collect()
}

#[test]
fn a_paused_owner_loses_its_rollouts_to_the_other_replica_and_commits_nothing_when_it_wakes() {
    let server = shared();
    let url = server.database();
    let pg = Phasegate::offline();
    let root = pg.dir.path().to_path_buf();
    let data = |name: &str| root.join(name).to_str().unwrap().to_string();
    let cli = pg
        .with_env("PHASEGATE_STORE", &url)
        .with_env("XDG_DATA_HOME", &data("cli"));
    let out = cli.run(&["token", "create", "--name", "bob", "--role", "admin"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    // One simulated tenant each (a tenant is driven by one rollout at a time).
    let ids: Vec<String> = (0..ROLLOUTS)
        .map(|n| {
            let plan = root.join(format!("plan-{n}.toml"));
            let text = include_str!("../plans/windows-baseline.toml")
                .replace("seed = 7", &format!("seed = {}", 100 + n));
            std::fs::write(&plan, text).unwrap();
            let out = cli.run(&["start", plan.to_str().unwrap(), "--by", "alice"]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            stdout(&out).trim().to_string()
        })
        .collect();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let args = ["--lease", "5s", "--renew-every", "1s"];
    let a = Serve::start_with(
        std::path::Path::new(&url),
        &args,
        &[("XDG_DATA_HOME", &data("a"))],
    );
    // The first replica takes every rollout, and is paused at once, mid-way.
    assert!(
        common::eventually(Duration::from_secs(60), || {
            let owners = live_owners(&mut db);
            ids.iter().all(|id| owners.contains_key(id))
        }),
        "{}",
        a.output()
    );
    signal(&a, libc::SIGSTOP);
    let owners = live_owners(&mut db);
    let owner_a = owners[&ids[0]].clone();
    assert!(ids.iter().all(|id| owners[id] == owner_a), "{owners:?}");
    let b = Serve::start_with(
        std::path::Path::new(&url),
        &args,
        &[("XDG_DATA_HOME", &data("b"))],
    );
    // The other replica answers from the store.
    let (status, view) = b.call("GET", &format!("/api/v1/rollouts/{}", ids[0]), &token, None);
    assert_eq!(status, 200, "{view}");
    // The stale leases expire (database clock); the other replica takes the rollouts over.
    assert!(common::eventually(Duration::from_secs(30), || {
        live_owners(&mut db).is_empty()
    }));
    let expired_at = Instant::now();
    let seqs = |db: &mut postgres::Client| -> BTreeMap<String, i64> {
        db.query(
            "SELECT convert_from(key, 'UTF8'), seq FROM phasegate.entries WHERE tree = 'rollouts'",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
    };
    let before = seqs(&mut db);
    let mut failover = None;
    assert!(
        common::eventually(Duration::from_secs(90), || {
            let now = seqs(&mut db);
            if failover.is_none() && ids.iter().any(|id| now.get(id) > before.get(id)) {
                failover = Some(expired_at.elapsed());
            }
            ids.iter().all(|id| {
                let view = b
                    .call("GET", &format!("/api/v1/rollouts/{id}"), &token, None)
                    .1;
                if view["status"] == "waiting_approval" {
                    b.call(
                        "POST",
                        &format!("/api/v1/rollouts/{id}/approve"),
                        &token,
                        Some(&serde_json::json!({"by": "bob"})),
                    );
                }
                view["status"] == "completed"
            })
        }),
        "{}",
        b.output()
    );
    let failover = failover.expect("the other replica committed for the taken-over rollouts");
    println!(
        "took over {} rollouts of a paused replica; lease expiry to the new owner's first commit: {failover:?}",
        ids.len()
    );
    // Woken, the stale replica finds its leases taken and commits nothing.
    let finished = seqs(&mut db);
    signal(&a, libc::SIGCONT);
    assert!(
        common::eventually(Duration::from_secs(30), || {
            let log = a.output();
            log.contains("taken by another replica") || log.contains("lost the rollout's lease")
        }),
        "{}",
        a.output()
    );
    assert_eq!(
        seqs(&mut db),
        finished,
        "the stale replica committed after waking"
    );
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
    assert_eq!(seqs(&mut db), finished);
    for id in &ids {
        let out = cli.run(&["history", id, "--verify"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let history = cli.json(&["history", id]);
        let all = outcomes(&history);
        let unique: BTreeSet<_> = all.iter().collect();
        assert_eq!(
            unique.len(),
            all.len(),
            "an effect's outcome recorded twice: {all:?}"
        );
        assert_eq!(cli.status(id)["status"], "completed");
    }
}

/// `run` on PostgreSQL is a replica too: beside a live `serve` that owns the rollout it exits 4
/// naming that replica (after waiting once for its lease, which the replica renewed); once that
/// replica is killed, `run` waits for its lease to run out, takes the rollout over at the next
/// epoch and drives it on from the store.
#[test]
fn run_leaves_a_live_replicas_rollout_to_it_and_takes_over_a_killed_ones() {
    let setup = Setup::new();
    let id = setup.start(302);
    let mut db = postgres::Client::connect(&setup.url, postgres::NoTls).unwrap();
    let mut a = setup.replica("a", &["--lease", "3s", "--renew-every", "1s"]);
    assert!(
        common::eventually(Duration::from_secs(60), || {
            live_owners(&mut db).contains_key(&id)
                && a.call("GET", &format!("/api/v1/rollouts/{id}"), &setup.token, None)
                    .1["status"]
                    == "waiting_approval"
        }),
        "{}",
        a.output()
    );
    let owner = live_owners(&mut db)[&id].clone();
    assert_eq!(lease_of(&mut db, &id), (owner.clone(), 1));

    let out = setup.cli.run(&["run", &id]);
    assert_eq!(code(&out), 4, "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains(&owner), "{}", stderr(&out));
    assert_eq!(
        lease_of(&mut db, &id),
        (owner.clone(), 1),
        "the live owner keeps it"
    );

    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let out = setup.cli.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}{}", stdout(&out), stderr(&out));
    let (taken_by, epoch) = lease_of(&mut db, &id);
    assert!(taken_by.starts_with("run-"), "{taken_by}");
    assert_eq!(epoch, 2);
    assert!(live_owners(&mut db).is_empty(), "released when it exited");

    let approve = setup.cli.run(&["approve", &id, "--by", "bob"]);
    assert_eq!(code(&approve), 0, "{}", stderr(&approve));
    setup.cli.complete(&id);
    assert_eq!(setup.cli.status(&id)["status"], "completed");
    let out = setup.cli.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// Two replicas on one machine each keep a daemon file of their own: when one stops, the CLI on
/// that machine still reaches the other (which owns the rollout), instead of committing on the
/// store beside it and being refused.
#[test]
fn with_two_replicas_on_one_machine_the_cli_reaches_the_one_left_when_the_other_stops() {
    let setup = Setup::new();
    let id = setup.start(303);
    let mut db = postgres::Client::connect(&setup.url, postgres::NoTls).unwrap();
    let args = ["--lease", "15s", "--renew-every", "1s"];
    // Both on the CLI's machine: the same data directory as the CLI's.
    let owner = setup.replica("cli", &args);
    assert!(
        common::eventually(Duration::from_secs(60), || {
            live_owners(&mut db).contains_key(&id)
                && owner
                    .call("GET", &format!("/api/v1/rollouts/{id}"), &setup.token, None)
                    .1["status"]
                    == "waiting_approval"
        }),
        "{}",
        owner.output()
    );
    let other = setup.replica("cli", &args);
    let (status, _) = other.call("GET", "/api/v1/rollouts", &setup.token, None);
    assert_eq!(status, 200);
    assert_eq!(other.terminate(), Some(0));

    let approve = setup.cli.run(&["approve", &id, "--by", "bob"]);
    assert_eq!(code(&approve), 0, "{}", stderr(&approve));
    assert!(
        common::eventually(Duration::from_secs(60), || {
            setup.cli.status(&id)["status"] == "completed"
        }),
        "{}",
        owner.output()
    );
    assert_eq!(owner.terminate(), Some(0));
    let out = setup.cli.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}
