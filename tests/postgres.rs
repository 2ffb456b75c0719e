//! The binary on a PostgreSQL store: a whole simulated rollout, the one-driver lock, errors that
//! never show the password, and `store copy` from sled with a finished and a running rollout.
//! Every test runs a real server (`common::postgres`).

mod common;

use common::postgres::{Postgres, shared};
use common::{Phasegate, code, stderr, stdout};

/// The binary with its store in a new database of `server` (and its local files, the daemon
/// file, in a directory of the test's own).
fn on_postgres(server: &Postgres) -> (Phasegate, String) {
    let url = server.database();
    let pg = Phasegate::offline();
    let data = pg.dir.path().join("data").to_str().unwrap().to_string();
    (
        pg.with_env("PHASEGATE_STORE", &url)
            .with_env("XDG_DATA_HOME", &data),
        url,
    )
}

#[test]
fn a_simulated_rollout_runs_to_completion_on_postgres_and_its_trail_verifies() {
    let server = shared();
    let (pg, url) = on_postgres(&server);
    let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    pg.complete(&id);
    assert_eq!(pg.status(&id)["status"], "completed");
    let out = pg.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // `--store` selects it as well as the environment does.
    let out = pg
        .command(&["--store", &url, "status"])
        .env_remove("PHASEGATE_STORE")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));
}

#[test]
fn only_one_process_drives_a_postgres_store() {
    let server = shared();
    let (pg, url) = on_postgres(&server);
    let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The driver lock is the database's: held on a connection of this test, `run` is refused.
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let taken: bool = holder
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&0x7068_6173_6567_0002_i64],
        )
        .unwrap()
        .get(0);
    assert!(taken);
    let out = pg.run(&["run", "--once"]);
    assert_eq!(code(&out), 4, "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // Released on the server before the next `run` (a closed connection's session may end later).
    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&0x7068_6173_6567_0002_i64],
        )
        .unwrap();
    drop(holder);
    let out = pg.run(&["run", "--once"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn a_wrong_password_is_a_clear_error_that_never_shows_it() {
    let server = shared();
    let url = server.database();
    // The test server trusts every local connection: make this database ask for a password by
    // pointing at a port where nothing listens instead, and check the message names the place.
    let unreachable = url
        .replace("phasegate@", "phasegate:hunter2-secret@")
        .replace(&format!(":{}/", server.port), ":1/");
    let pg = Phasegate::offline().with_env("PHASEGATE_STORE", &unreachable);
    let out = pg.run(&["status"]);
    assert_ne!(code(&out), 0);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[test]
fn store_copy_moves_a_sled_store_and_its_running_rollout_completes_on_postgres() {
    let server = shared();
    let sled = Phasegate::offline();
    let start = |pg: &Phasegate| {
        let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let finished = start(&sled);
    sled.complete(&finished);
    let running = start(&sled);
    let out = sled.run(&["run", &running, "--once"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let before = sled.status(&running);
    assert_ne!(before["status"], "completed");
    let id = std::fs::read_to_string(sled.store_dir().join("store.id")).unwrap();

    let (pg, url) = on_postgres(&server);
    let from = sled.store_dir();
    let out = pg.run(&[
        "store",
        "copy",
        "--from",
        from.to_str().unwrap(),
        "--to",
        &url,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("every chain verified"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains(id.trim()), "{}", stdout(&out));
    // A second copy into the same database is refused: it holds a store now.
    let again = pg.run(&[
        "store",
        "copy",
        "--from",
        from.to_str().unwrap(),
        "--to",
        &url,
    ]);
    assert_ne!(code(&again), 0);
    assert!(
        stderr(&again).contains("holds a store already"),
        "{}",
        stderr(&again)
    );

    assert_eq!(pg.status(&finished)["status"], "completed");
    assert_eq!(pg.status(&running)["status"], before["status"]);
    pg.complete(&running);
    assert_eq!(pg.status(&running)["status"], "completed");
    for rollout in [&finished, &running] {
        let out = pg.run(&["history", rollout, "--verify"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    // The copy kept the store's identity.
    let heads = pg.run(&[
        "export",
        "--to",
        pg.dir.path().join("x.json").to_str().unwrap(),
    ]);
    assert_eq!(code(&heads), 0, "{}", stderr(&heads));
    let export = std::fs::read_to_string(pg.dir.path().join("x.json")).unwrap();
    assert!(
        export.contains(&format!("\"store\": \"{}\"", id.trim())),
        "store id kept"
    );
}

#[test]
fn serve_drives_a_postgres_store_and_the_cli_reaches_it_through_the_daemon() {
    let server = shared();
    let (pg, url) = on_postgres(&server);
    let data = pg.dir.path().join("data");
    let serve = common::Serve::start_with_env(
        std::path::Path::new(&url),
        &[("XDG_DATA_HOME", data.to_str().unwrap())],
    );
    // Its daemon file is in the store's local directory, under the data directory.
    let local: Vec<_> = std::fs::read_dir(data.join("phasegate"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(local.len(), 1, "{local:?}");
    let daemon_file = format!("daemon-{}.json", serve.child.id());
    assert!(local[0].join(&daemon_file).is_file(), "{local:?}");
    // (A second `serve` on the same database is a replica: see tests/replicas.rs.)
    // The CLI on this machine goes through the daemon (its file is in the local directory).
    let out = pg.run(&["token", "create", "--name", "olga", "--role", "operator"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let operator = stdout(&out).trim().to_string();
    let (status, started) = serve.call(
        "POST",
        "/api/v1/rollouts",
        &operator,
        Some(&serde_json::json!({
            "plan": include_str!("../plans/windows-baseline.toml"),
            "file": "windows-baseline.toml"
        })),
    );
    assert_eq!(status, 201, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert!(common::eventually(
        std::time::Duration::from_secs(30),
        || {
            serve
                .call("GET", &format!("/api/v1/rollouts/{id}"), &operator, None)
                .1["status"]
                == "waiting_approval"
        }
    ));
    assert_eq!(serve.terminate(), Some(0));
    let out = pg.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(pg.status(&id)["status"], "waiting_approval");
}
