//! `phasegate serve` end to end: the real binary over a real store, its API on a real socket,
//! tokens with roles, the live stream, the CLI through the daemon, SIGTERM and restart, and the
//! shell defects the runner fixed (each fails on the code before it).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    BIN, Emulator, Phasegate, Receiver, SECRET, Serve, answer, code, eventually, http, sse_until,
    stderr, stdout,
};
use serde_json::{Value, json};

const PLAN: &str = include_str!("../plans/windows-baseline.toml");

fn cli(store: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("PHASEGATE_STORE", store)
        .env("PHASEGATE_GRAPH_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn token(store: impl AsRef<std::ffi::OsStr>, name: &str, role: &str) -> String {
    let out = cli(store, &["token", "create", "--name", name, "--role", role]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn status_of(serve: &Serve, token: &str, id: &str) -> Value {
    serve
        .call("GET", &format!("/api/v1/rollouts/{id}"), token, None)
        .1
}

on_both_stores! {
    fn a_rollout_started_through_the_api_is_watched_approved_paused_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let operator = token(&store, "olga", "operator");
        let approver = token(&store, "bob", "approver");
        let viewer = token(&store, "vera", "viewer");

        // Unauthenticated and unknown callers are told what is missing.
        let (status, body) = serve.call("GET", "/api/v1/rollouts", "", None);
        assert_eq!(status, 401, "{body}");
        let (status, body) = serve.call("GET", "/api/v1/rollouts", "pgt_nope", None);
        assert_eq!(status, 401);
        assert!(
            body["error"].as_str().unwrap().contains("unknown token"),
            "{body}"
        );

        let (status, started) = serve.call(
            "POST",
            "/api/v1/rollouts",
            &operator,
            Some(&json!({"plan": PLAN, "file": "windows-baseline.toml"})),
        );
        assert_eq!(status, 201, "{started}");
        let id = started["id"].as_str().unwrap().to_string();
        assert_eq!(
            started["created_by"], "olga",
            "the token's name, not a claimed one"
        );
        assert!(eventually(Duration::from_secs(30), || {
            status_of(&serve, &viewer, &id)["status"] == "waiting_approval"
        }));

        // Every transition so far, from the stream, in order, once.
        let url = format!("{}/api/v1/rollouts/{id}/watch", serve.url);
        let events_now = serve
            .call(
                "GET",
                &format!("/api/v1/rollouts/{id}/history"),
                &viewer,
                None,
            )
            .1["events"]
            .as_array()
            .unwrap()
            .len();
        let seen = sse_until(&url, &viewer, None, Duration::from_secs(10), |e| {
            e["seq"].as_u64() == Some(events_now as u64)
        });
        let seqs: Vec<u64> = seen
            .iter()
            .map(|(_, e)| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=events_now as u64).collect::<Vec<_>>());
        assert!(seen.iter().any(|(_, e)| e["status"] == "waiting_approval"));

        // A viewer may not approve; an approver may. Pausing is for operators.
        let (status, body) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/approve"),
            &viewer,
            Some(&json!({})),
        );
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("needs approver or admin"),
            "{body}"
        );
        let (status, body) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/pause"),
            &approver,
            Some(&json!({"reason": "x"})),
        );
        assert_eq!(status, 403, "{body}");
        let (status, body) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/approve"),
            &approver,
            Some(&json!({"by": "mallory"})),
        );
        assert_eq!(status, 403, "a token cannot claim another name: {body}");
        let (status, paused) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/pause"),
            &operator,
            Some(&json!({"reason": "change freeze"})),
        );
        assert_eq!(status, 200, "{paused}");
        assert_eq!(paused["status"], "paused");
        let (status, approved) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/approve"),
            &approver,
            Some(&json!({"ticket": "CHG-1", "comment": "evidence reviewed"})),
        );
        assert_eq!(status, 200, "{approved}");
        assert_eq!(
            approved["status"], "paused",
            "an approval does not lift a pause"
        );
        let last = seqs.len() + 2;

        // SIGTERM: exit 0; a restart resumes where it was.
        assert_eq!(store.daemon_files().len(), 1, "the daemon file is written");
        assert_eq!(serve.terminate(), Some(0));
        assert!(
            store.daemon_files().is_empty(),
            "the daemon file is gone"
        );
        let serve = Serve::start(&store);
        assert_eq!(status_of(&serve, &viewer, &id)["status"], "paused");
        let (status, _) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/resume"),
            &operator,
            Some(&json!({"reason": "freeze over"})),
        );
        assert_eq!(status, 200);
        let url = format!("{}/api/v1/rollouts/{id}/watch", serve.url);
        let later = sse_until(
            &url,
            &viewer,
            Some(&last.to_string()),
            Duration::from_secs(30),
            |e| e["status"] == "completed",
        );
        assert_eq!(
            later.first().map(|(id, _)| id.clone()),
            Some((last + 1).to_string()),
            "resumed after the last event seen"
        );
        assert_eq!(later.last().unwrap().1["status"], "completed");
        let history = cli(&store, &["history", &id]);
        assert!(
            stdout(&history).contains("user bob"),
            "{}",
            stdout(&history)
        );
        assert_eq!(serve.terminate(), Some(0));
    }
}

on_both_stores! {
    fn while_serve_runs_the_cli_goes_through_it_and_status_watch_follows_the_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, PLAN).unwrap();
        let serve = Serve::start(&store);
        let out = cli(&store, &["start", plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let admin = token(&store, "root", "admin");
        assert!(eventually(Duration::from_secs(30), || {
            status_of(&serve, &admin, &id)["status"] == "waiting_approval"
        }));
        let mut watch = Command::new(BIN)
            .args(["status", &id, "--watch"])
            .env("PHASEGATE_STORE", &store)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(watch.stdout.take().unwrap());
        let mut seen = String::new();
        // The first drawing shows the rollout waiting.
        while !seen.contains("waiting_approval") {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "{seen}");
            seen.push_str(&line);
        }
        let out = cli(
            &store,
            &["approve", &id, "--by", "carol", "--comment", "go"],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        assert!(watch.wait().unwrap().success());
        assert!(rest.contains("completed"), "{rest}");
        assert!(rest.contains("promoted"), "{rest}");
        let history = cli(&store, &["history", &id]);
        assert!(
            stdout(&history).contains("user carol"),
            "{}",
            stdout(&history)
        );
        let out = cli(&store, &["status", &id, "--output", "json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(view["status"], "completed");
        // A backup while the daemon runs: the CLI has it take the snapshot between its commits.
        let backup = dir.path().join("backup.json");
        let out = cli(
            &store,
            &[
                "export",
                "--to",
                backup.to_str().unwrap(),
                "--output",
                "json",
            ],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let exported: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(exported["heads"][0]["rollout"], id.as_str());
        let viewer = token(&store, "val", "viewer");
        let (status, _) = serve.call("GET", "/api/v1/export", &viewer, None);
        assert_eq!(status, 403, "only an admin exports the store");
        assert_eq!(serve.terminate(), Some(0));
        // The daemon's export is this store's, and the store still matches it.
        let out = cli(&store, &["verify", "--against", backup.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    }
}

on_both_stores! {
    fn metrics_parse_as_prometheus_text_and_carry_the_rollouts_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let operator = token(&store, "olga", "operator");
        let (status, started) = serve.call(
            "POST",
            "/api/v1/rollouts",
            &operator,
            Some(&json!({"plan": PLAN})),
        );
        assert_eq!(status, 201, "{started}");
        let id = started["id"].as_str().unwrap().to_string();
        assert!(eventually(Duration::from_secs(30), || {
            status_of(&serve, &operator, &id)["status"] == "waiting_approval"
        }));
        let bearer = format!("Bearer {operator}");
        let (status, text) = common::http(
            "GET",
            &format!("{}/metrics", serve.url),
            &[("Authorization", bearer.as_str())],
            b"",
        );
        assert_eq!(status, 200);
        let mut declared = std::collections::BTreeSet::new();
        let mut samples = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split_whitespace().next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let family = series.split('{').next().unwrap();
            let base = family
                .trim_end_matches("_total")
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                declared.contains(family) || declared.contains(base),
                "{family} has no # TYPE before it"
            );
            samples.insert(series.to_string(), value);
        }
        let get = |name: &str| {
            samples
                .iter()
                .find(|(k, _)| k.starts_with(name))
                .map(|(_, v)| *v)
        };
        assert_eq!(
            get("phasegate_rollouts{status=\"waiting_approval\"}"),
            Some(1.0)
        );
        let targeted = format!("phasegate_phase_targeted{{rollout=\"{id}\",phase=\"report-only\"}}");
        let alt = format!("phasegate_phase_targeted{{phase=\"report-only\",rollout=\"{id}\"}}");
        let value = get(&targeted)
            .or_else(|| get(&alt))
            .expect("the phase's targeted count");
        assert!(value > 1000.0, "{value}");
        assert!(
            samples
                .keys()
                .any(|k| k.starts_with("phasegate_transitions_total"))
        );
        assert!(
            samples
                .keys()
                .any(|k| k.starts_with("phasegate_effects_total"))
        );
        drop(serve);
    }
}

on_both_stores! {
    fn the_openapi_document_lists_exactly_the_routes_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let admin = token(&store, "root", "admin");
        let (status, doc) = serve.call("GET", "/api/v1/openapi.json", &admin, None);
        assert_eq!(status, 200);
        let file: Value = serde_json::from_str(include_str!("../docs/openapi.json")).unwrap();
        assert_eq!(doc, file, "the served document is docs/openapi.json");
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 15, "{}", paths.len());
        for (path, operations) in paths {
            for method in operations.as_object().unwrap().keys() {
                let concrete = path
                    .replace("{id}", "no-such-rollout")
                    .replace("{name}", "no-such-token");
                let method = method.to_uppercase();
                if concrete.ends_with("/watch") {
                    continue; // streams; checked by the other tests
                }
                // A body only where the method takes one: a server may answer a GET before reading
                // a body it was sent, and closing with it unread resets the connection.
                let sent = json!({});
                let body = (method != "GET").then_some(&sent);
                let (status, body) = serve.call(&method, &concrete, &admin, body);
                assert!(
                    status != 405 && !(status == 404 && body.is_null()),
                    "{method} {path} is documented but not served ({status})"
                );
            }
        }
        // And nothing served under /api/v1 is missing from the document.
        for (method, path) in [
            ("GET", "/api/v1/rollouts"),
            ("POST", "/api/v1/plans/check"),
            ("POST", "/api/v1/rollouts/{id}/plan"),
            ("POST", "/api/v1/rollouts/{id}/plan/approve"),
            ("POST", "/api/v1/rollouts/{id}/plan/reject"),
            ("POST", "/api/v1/rollouts/{id}/freeze-override"),
            ("POST", "/api/v1/rollouts/{id}/exceptions"),
            ("DELETE", "/api/v1/rollouts/{id}/exceptions/{name}"),
        ] {
            assert!(paths.contains_key(path) && paths[path].get(method.to_lowercase()).is_some());
        }
        drop(serve);
    }
}

on_both_stores! {
    /// The API's plan check returns a plan's warnings beside its errors, `strict` makes them errors,
    /// and a started rollout's `warnings` carry them.
    fn the_api_returns_a_plans_warnings_and_strict_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let operator = token(&store, "olga", "operator");
        let plan = PLAN.replacen("min_reporting = \"85%\"", "min_reporting = \"0%\"", 1);
        let body = json!({"plan": plan, "file": "w.toml"});
        let (status, checked) = serve.call("POST", "/api/v1/plans/check", &operator, Some(&body));
        assert_eq!(status, 200, "{checked}");
        assert_eq!(checked["valid"], true, "{checked}");
        assert_eq!(checked["errors"], json!([]));
        let warnings = checked["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1, "{checked}");
        assert_eq!(warnings[0]["line"], 41);
        assert_eq!(warnings[0]["column"], 17);
        assert!(
            warnings[0]["why"]
                .as_str()
                .unwrap()
                .contains("one is enough")
        );

        let strict = json!({"plan": plan, "file": "w.toml", "strict": true});
        let (status, checked) = serve.call("POST", "/api/v1/plans/check", &operator, Some(&strict));
        assert_eq!(status, 200, "{checked}");
        assert_eq!(checked["valid"], false, "{checked}");
        assert_eq!(checked["errors"][0]["line"], 41, "{checked}");
        assert_eq!(checked["warnings"], json!([]));
        let (status, refused) = serve.call("POST", "/api/v1/rollouts", &operator, Some(&strict));
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("w.toml:41:17: `min_reporting = \"0%\"`"),
            "{refused}"
        );

        let (status, started) = serve.call("POST", "/api/v1/rollouts", &operator, Some(&body));
        assert_eq!(status, 201, "{started}");
        let warnings = started["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1, "{started}");
        assert!(
            warnings[0].as_str().unwrap().starts_with(
                "w.toml:41:17: `min_reporting = \"0%\"` in phase `pilot` asks for no coverage; "
            ),
            "{started}"
        );
        drop(serve);
    }
}

// ----- the shell's defects, each with a test that failed before the runner -----

fn stopped_emulator_plan() -> (Emulator, Phasegate) {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "300",
        "--ca-rate",
        "50",
    ]);
    let pg = Phasegate::new(&emulator, 50.0);
    (emulator, pg)
}

on_both_stores! {
    fn decisions_are_recorded_with_no_call_to_an_unreachable_tenant() {
        let (emulator, pg) = stopped_emulator_plan();
        let id = pg.start();
        assert_eq!(code(&pg.run(&["run", &id, "--once"])), 0);
        drop(emulator); // the tenant is gone
        for args in [
            vec![
                "pause",
                &id,
                "--by",
                "alice",
                "--reason",
                "tenant maintenance",
            ],
            vec!["resume", &id, "--by", "alice"],
            vec!["abort", &id, "--by", "alice", "--reason", "giving up"],
        ] {
            let started = Instant::now();
            let out = pg.run(&args);
            assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{args:?} took {:?}",
                started.elapsed()
            );
        }
        assert_eq!(pg.status(&id)["status"], "aborting");
    }
}

on_both_stores! {
    fn a_paused_rollout_whose_change_keeps_failing_does_not_spin() {
        let (emulator, pg) = stopped_emulator_plan();
        let id = pg.start();
        drop(emulator); // the first change cannot be made
        let out = pg.run(&["pause", &id, "--by", "alice", "--reason", "tenant down"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let events = |pg: &Phasegate| pg.status(&id)["events"].as_u64().unwrap();
        let before = events(&pg);
        let started = Instant::now();
        let out = pg.run(&["run", &id]);
        assert_eq!(
            code(&out),
            3,
            "a paused rollout needs a person: {}",
            stderr(&out)
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(events(&pg), before, "nothing was tried, nothing recorded");
    }
}

on_both_stores! {
    fn while_run_waits_on_a_hanging_tenant_status_and_pause_get_in_at_once() {
        let (emulator, pg) = stopped_emulator_plan();
        let id = pg.start();
        let port: u16 = emulator.url.rsplit(':').next().unwrap().parse().unwrap();
        drop(emulator);
        // A tenant that accepts connections and never answers.
        let black_hole = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let held = std::thread::spawn(move || {
            let mut open = Vec::new();
            for stream in black_hole.incoming().take(64) {
                open.push(stream);
            }
        });
        let mut run = pg
            .command(&["run", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || !pg
            .store()
            .daemon_files()
            .is_empty()));
        for args in [
            vec!["status", &id],
            vec!["pause", &id, "--by", "alice", "--reason", "hanging tenant"],
        ] {
            let started = Instant::now();
            let out = pg.run(&args);
            assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{args:?} took {:?}",
                started.elapsed()
            );
        }
        // SAFETY: signals the child this test spawned.
        unsafe {
            libc::kill(run.id() as i32, libc::SIGTERM);
        }
        let status = run.wait().unwrap();
        assert!(status.code().is_some(), "run ended on SIGTERM");
        drop(held);
        assert_eq!(pg.status(&id)["status"], "paused");
    }
}

on_both_stores! {
    fn run_without_an_id_delivers_what_completed_rollouts_still_owe() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        // A receiver that is down while the rollout completes...
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let plan = dir.path().join("plan.toml");
        let text = PLAN.replacen(
            "[[phase]]",
            &format!("[[webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nevents = [\"completed\"]\n\n[[phase]]"),
            1,
        );
        std::fs::write(&plan, text).unwrap();
        let out = cli(&store, &["start", plan.to_str().unwrap(), "--by", "alice"]);
        let id = stdout(&out).trim().to_string();
        assert_eq!(code(&cli(&store, &["run", &id])), 3);
        assert_eq!(code(&cli(&store, &["approve", &id, "--by", "bob"])), 0);
        let out = cli(&store, &["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let view: Value =
            serde_json::from_slice(&cli(&store, &["status", &id, "--output", "json"]).stdout).unwrap();
        assert_eq!(view["status"], "completed");
        assert!(
            !view["pending_effects"].as_array().unwrap().is_empty(),
            "the notification is owed"
        );
        // ...is up again: a plain `run` delivers it.
        let receiver = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let got = std::thread::spawn(move || {
            let (mut stream, _) = receiver.accept().unwrap();
            let mut request = String::new();
            let mut buf = [0u8; 8192];
            let n = std::io::Read::read(&mut stream, &mut buf).unwrap();
            request.push_str(&String::from_utf8_lossy(&buf[..n]));
            std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            )
            .unwrap();
            request
        });
        let out = cli(&store, &["run"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let request = got.join().unwrap();
        assert!(request.contains("\"status\":\"completed\""), "{request}");
        let view: Value =
            serde_json::from_slice(&cli(&store, &["status", &id, "--output", "json"]).stdout).unwrap();
        assert!(
            view["pending_effects"].as_array().unwrap().is_empty(),
            "{view:#}\n{}",
            stderr(&out)
        );
    }
}

on_both_stores! {
    fn a_tenant_that_refuses_connections_is_named_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = include_str!("../plans/windows-baseline-graph.toml")
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, text).unwrap();
        let started = Instant::now();
        let store = common::stores::Location::new(dir.path());
        let out = cli(&store, &["start", plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 1, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("connection refused"),
            "{}",
            stderr(&out)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}

on_both_stores! {
    fn the_api_the_cli_through_it_and_the_daemon_log_show_webhook_addresses_redacted() {
        const PASSWORD: &str = "p4ss-w0rd-7f3k";
        const TOKEN: &str = "s3cret-tok-9q2z";
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        // One receiver takes the notifications (the trail records who answered); one is down, so
        // its notifications stay pending and the daemon tries them again.
        let up = Receiver::start(answer(200, ""));
        let up_host = up.url.strip_prefix("http://").unwrap().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let plan = dir.path().join("plan.toml");
        let text = PLAN.replacen(
            "[[phase]]",
            &format!(
                "[[webhook]]\nurl = \"http://hooks:{PASSWORD}@{up_host}/in?token={TOKEN}\"\n\n\
                 [[webhook]]\nurl = \"https://hooks:{PASSWORD}@127.0.0.1:{port}/in?token={TOKEN}\"\n\n[[phase]]"
            ),
            1,
        );
        std::fs::write(&plan, text).unwrap();
        let out = cli(&store, &["start", plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        assert_eq!(code(&cli(&store, &["run", &id])), 3);

        let serve = Serve::start(&store);
        let viewer = token(&store, "vera", "viewer");
        let mut shown = Vec::new();
        for path in [
            "/api/v1/rollouts".to_string(),
            "/api/v1/rollouts?format=text".to_string(),
            format!("/api/v1/rollouts/{id}"),
            format!("/api/v1/rollouts/{id}?format=text"),
            format!("/api/v1/rollouts/{id}/history"),
        ] {
            let (status, body) = serve.call("GET", &path, &viewer, None);
            assert_eq!(status, 200, "{path}: {body}");
            shown.push((path, body.to_string()));
        }
        let bearer = format!("Bearer {viewer}");
        let (status, page) = http(
            "GET",
            &format!("{}/ui/rollouts/{id}", serve.url),
            &[("Authorization", bearer.as_str())],
            b"",
        );
        assert_eq!(status, 200, "{page}");
        assert!(
            page.contains(&format!("http://***@{up_host}/in?token=*** answered 200")),
            "the dashboard's audit trail names the receiver: {page}"
        );
        shown.push(("the dashboard".into(), page));
        let history = serve
            .call(
                "GET",
                &format!("/api/v1/rollouts/{id}/history"),
                &viewer,
                None,
            )
            .1;
        let addresses: Vec<String> = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["effects"].as_array().unwrap().clone())
            .filter(|p| p["effect"]["type"] == "notify")
            .map(|p| p["effect"]["url"].as_str().unwrap().to_string())
            .collect();
        assert!(!addresses.is_empty());
        for address in &addresses {
            assert!(
                address == &format!("http://***@{up_host}/in?token=***")
                    || address == &format!("https://***@127.0.0.1:{port}/in?token=***"),
                "{address}"
            );
        }
        for args in [
            vec!["history", id.as_str()],
            vec!["history", id.as_str(), "--output", "json"],
            vec!["status", id.as_str(), "--output", "json"],
        ] {
            let out = cli(&store, &args);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            shown.push((args.join(" "), format!("{}{}", stdout(&out), stderr(&out))));
        }
        // The daemon tries the pending notifications and says it could not deliver them.
        assert!(
            eventually(Duration::from_secs(30), || serve.output().contains(
                &format!("POST https://***@127.0.0.1:{port}/in?token=***")
            )),
            "{}",
            serve.output()
        );
        shown.push(("the daemon's log".into(), serve.output()));
        for (what, text) in &shown {
            for secret in [PASSWORD, TOKEN] {
                assert!(!text.contains(secret), "{what} shows {secret}: {text}");
            }
        }
        assert_eq!(serve.terminate(), Some(0));
    }
}

// ----- the API's answers to bad requests -----

on_both_stores! {
    fn bad_requests_get_json_errors_and_the_role_is_checked_before_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let admin = token(&store, "root", "admin");
        let viewer = token(&store, "vera", "viewer");
        let operator = token(&store, "olga", "operator");
        let raw = |method: &str, path: &str, token: &str, content_type: &str, body: &[u8]| {
            let bearer = format!("Bearer {token}");
            let (status, text) = common::http(
                method,
                &format!("{}{path}", serve.url),
                &[("Authorization", &bearer), ("Content-Type", content_type)],
                body,
            );
            let error: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {path}: not JSON ({status}): {text:?}"));
            (
                status,
                error["error"].as_str().unwrap_or_default().to_string(),
            )
        };
        let (_, started) = serve.call(
            "POST",
            "/api/v1/rollouts",
            &operator,
            Some(&json!({"plan": PLAN})),
        );
        let id = started["id"].as_str().unwrap().to_string();

        // A viewer is told it may not approve, whatever its body says.
        let approve = format!("/api/v1/rollouts/{id}/approve");
        let (status, error) = raw("POST", &approve, &viewer, "application/json", b"{not json");
        assert_eq!(status, 403, "{error}");
        assert!(error.contains("needs approver or admin"), "{error}");

        // Bodies that cannot be read: each its own status, each in JSON.
        let pause = format!("/api/v1/rollouts/{id}/pause");
        let (status, error) = raw("POST", &pause, &operator, "application/json", b"{not json");
        assert_eq!(status, 400, "{error}");
        assert!(error.contains("invalid request body"), "{error}");
        let (status, error) = raw("POST", &pause, &operator, "text/plain", b"pause it");
        assert_eq!(status, 415, "{error}");
        assert!(error.contains("application/json"), "{error}");
        let (status, error) = raw(
            "POST",
            &pause,
            &operator,
            "application/json",
            br#"{"reasn": "typo"}"#,
        );
        assert_eq!(status, 422, "{error}");
        assert!(error.contains("reasn"), "{error}");
        let (status, error) = raw(
            "POST",
            "/api/v1/plans/check",
            &viewer,
            "application/json",
            b"",
        );
        assert_eq!(status, 400, "{error}");
        let big = vec![b' '; 3 * 1024 * 1024];
        let (status, error) = raw("POST", &pause, &operator, "application/json", &big);
        assert_eq!(status, 413, "{error}");

        // Nothing was recorded by any of them.
        let after = serve
            .call("GET", &format!("/api/v1/rollouts/{id}"), &viewer, None)
            .1;
        assert_ne!(after["status"], "paused", "{after}");

        // An unknown rollout is named before what is wrong with the decision about it.
        let (status, error) = raw(
            "POST",
            "/api/v1/rollouts/nope/reject",
            &admin,
            "application/json",
            b"{}",
        );
        assert_eq!(status, 404, "{error}");
        let (status, error) = raw(
            "POST",
            "/api/v1/rollouts/nope/drift",
            &admin,
            "application/json",
            br#"{"decision": "maybe"}"#,
        );
        assert_eq!(status, 404, "{error}");

        // A second active token of the same name is a conflict.
        let (status, body) = serve.call(
            "POST",
            "/api/v1/tokens",
            &admin,
            Some(&json!({"name": "vera", "role": "approver"})),
        );
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("revoke it first"));

        // A resume point that is not a sequence number.
        let rest = serve.url.strip_prefix("http://").unwrap();
        let mut stream = std::net::TcpStream::connect(rest).unwrap();
        use std::io::{Read, Write};
        write!(
            stream,
            "GET /api/v1/rollouts/{id}/watch HTTP/1.0\r\nHost: {rest}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {viewer}\r\nLast-Event-ID: seven\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
        assert!(answer.contains("Last-Event-ID"), "{answer}");
    }
}
