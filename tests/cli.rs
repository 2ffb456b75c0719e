//! End-to-end tests of the `phasegate` binary: plans, the demo, a rollout driven through
//! approval and rollback, the audit trail, and store exclusivity. Each test gets its own store.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Phasegate, Receiver, answer, code, stderr, stdout};

use phasegate::adapters::parse_plan;
use phasegate::provider::simulator::SimProvider;
use phasegate::provider::simulator::settings;
use phasegate::store::{DEFAULT_LOCK_WAIT, Store};
use serde_json::Value;

fn phase<'v>(status: &'v Value, id: &str) -> &'v Value {
    status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no phase {id} in {status}"))
}

#[test]
fn the_example_plans_are_valid() {
    let pg = Phasegate::offline();
    let plans: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("plans"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
    assert!(plans.len() >= 3);
    let mut args = vec!["plan", "check"];
    let names: Vec<String> = plans.iter().map(|p| p.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = pg.run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).matches(": ok (").count(), plans.len());
}

#[test]
fn a_broken_plan_exits_2_and_every_error_has_a_line_and_column() {
    let pg = Phasegate::offline();
    let file = "tests/fixtures/broken-plan.toml";
    let out = pg.run(&["plan", "check", file]);
    assert_eq!(code(&out), 2);
    let text = stderr(&out);
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(file))
        .map(|l| &l[file.len()..])
        .collect();
    assert_eq!(errors.len(), 6, "{text}");
    for error in &errors {
        let mut parts = error.trim_start_matches(':').splitn(3, ':');
        let line: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{error}"));
        let column: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{error}"));
        assert!(line > 0 && column > 0);
    }
    assert!(
        text.contains("broken-plan.toml:23:19: unknown phase `pilto`"),
        "{text}"
    );
    assert!(
        text.contains("broken-plan.toml:22:11: empty scope"),
        "{text}"
    );
    assert!(
        text.contains("broken-plan.toml:21:8: mode weakens along an edge"),
        "{text}"
    );
    let json = pg.json(&["plan", "check", file]);
    assert_eq!(json[0]["valid"], false);
    assert_eq!(json[0]["errors"].as_array().unwrap().len(), 6);
    assert_eq!(json[0]["errors"][0]["line"], 17);
}

#[test]
fn plan_show_draws_the_graph() {
    let pg = Phasegate::offline();
    let out = pg.run(&[
        "plan",
        "show",
        "plans/ios-parallel-pilots.toml",
        "--format",
        "dot",
    ]);
    assert_eq!(code(&out), 0);
    let dot = stdout(&out);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert_eq!(
        dot.matches("-> 2").count(),
        2,
        "both pilots join into report-only: {dot}"
    );
    let json = pg.json(&["plan", "show", "plans/ios-parallel-pilots.toml"]);
    assert_eq!(json["order"][0], "pilot-it");
}

#[test]
fn the_demo_completes_all_four_phases_with_one_after_a_hold() {
    let pg = Phasegate::offline();
    let out = pg.run(&[
        "demo",
        "--devices",
        "20000",
        "--seed",
        "7",
        "--output",
        "json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rollout = &report["rollout"];
    assert_eq!(rollout["status"], "completed");
    let phases = rollout["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4);
    assert!(phases.iter().all(|p| p["state"] == "promoted"), "{rollout}");
    let held: Vec<&Value> = phases
        .iter()
        .filter(|p| p["holds"].as_u64() > Some(0))
        .collect();
    assert_eq!(held.len(), 1, "{rollout}");
    assert_eq!(held[0]["id"], "notify");
    let timeline = report["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|m| m["what"].as_str().unwrap().starts_with("gate HOLD"))
    );
    assert!(
        timeline
            .iter()
            .any(|m| m["what"].as_str().unwrap().contains("demo-approver"))
    );
}

on_both_stores! {
    fn a_rollout_stops_for_approval_and_completes_once_approved() {
        let pg = Phasegate::offline();
        let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        assert_eq!(id, "windows-baseline-1");

        let out = pg.run(&["run"]);
        assert_eq!(code(&out), 3, "{}{}", stdout(&out), stderr(&out));
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "waiting_approval");
        assert_eq!(status["current_phase"], "notify");
        assert_eq!(phase(&status, "notify")["state"], "awaiting_approval");
        assert_eq!(phase(&status, "notify")["gate"]["outcome"], "pass");
        assert!(phase(&status, "notify")["holds"].as_u64().unwrap() >= 1);

        let out = pg.run(&[
            "approve",
            &id,
            "--by",
            "bob",
            "--ticket",
            "CHG-7",
            "--comment",
            "CAB approved",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "completed");
        let approvals = &phase(&status, "notify")["approvals"]["granted"];
        assert_eq!(approvals[0]["by"], "bob");
        assert_eq!(approvals[0]["ticket"], "CHG-7");

        let out = pg.run(&["history", &id, "--verify"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
}

on_both_stores! {
    fn rollback_moves_a_running_rollout_back_one_phase_and_history_says_who_and_why() {
        let pg = Phasegate::offline();
        let id = stdout(&pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]))
            .trim()
            .to_string();
        assert_eq!(code(&pg.run(&["run"])), 3);

        let out = pg.run(&[
            "rollback",
            &id,
            "--by",
            "carol",
            "--reason",
            "helpdesk flooded",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "rolling_back");
        assert_eq!(status["current_phase"], "report-only");
        assert_eq!(phase(&status, "notify")["state"], "rolled_back");

        let out = pg.run(&["run", &id]);
        assert_eq!(
            code(&out),
            3,
            "rolled back needs attention: {}",
            stdout(&out)
        );
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "rolled_back");
        assert_eq!(phase(&status, "report-only")["state"], "soaking");

        let history = pg.json(&["history", &id]);
        let rollback = history
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "rollback_requested")
            .expect("the rollback is in the history");
        assert_eq!(rollback["event"]["trigger"]["source"], "user");
        assert_eq!(rollback["event"]["trigger"]["actor"], "carol");
        assert_eq!(rollback["event"]["trigger"]["reason"], "helpdesk flooded");
        // The same time format as `status`: RFC 3339 in UTC.
        for key in ["at", "recorded_at"] {
            let at = rollback[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key}: {rollback}"));
            assert!(
                at.ends_with('Z') && humantime::parse_rfc3339(at).is_ok(),
                "{key}: {at}"
            );
        }
        let status = pg.json(&["status", &id]);
        let applied = phase(&status, "pilot")["applied_at"].as_str().unwrap();
        assert_eq!(applied.len(), rollback["at"].as_str().unwrap().len());
        let text = stdout(&pg.run(&["history", &id]));
        assert!(text.contains("rollback_requested"), "{text}");
        assert!(text.contains("user carol: helpdesk flooded"), "{text}");

        // Resuming picks the rollout up again from report-only.
        assert_eq!(code(&pg.run(&["resume", &id, "--by", "carol"])), 0);
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3);
        assert_eq!(pg.json(&["status", &id])["status"], "waiting_approval");
    }
}

on_both_stores! {
    fn commands_a_state_does_not_allow_exit_2() {
        let pg = Phasegate::offline();
        let id = stdout(&pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]))
            .trim()
            .to_string();
        let out = pg.run(&["approve", &id, "--by", "bob", "--phase", "enforce"]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains("only a running phase can be approved"),
            "{}",
            stderr(&out)
        );
        let out = pg.run(&["status", "no-such-rollout"]);
        assert_eq!(code(&out), 2);
        assert!(stderr(&out).contains("no rollout `no-such-rollout`"));
    }
}

on_both_stores! {
    fn abort_restores_the_configuration_from_before_the_rollout() {
        let pg = Phasegate::offline();
        let id = stdout(&pg.run(&["start", "plans/ios-parallel-pilots.toml", "--by", "alice"]))
            .trim()
            .to_string();
        assert_eq!(code(&pg.run(&["run"])), 3);
        let out = pg.run(&["abort", &id, "--by", "alice", "--reason", "wrong policy"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(pg.json(&["status", &id])["status"], "aborting");
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3);
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "aborted");
        let phases = status["phases"].as_array().unwrap();
        assert!(
            phases
                .iter()
                .all(|p| p["state"] == "rolled_back" || p["state"] == "pending")
        );
        assert!(
            phases
                .iter()
                .filter(|p| p["state"] == "rolled_back")
                .count()
                >= 3
        );

        // The simulated tenant's policy is back to what it was before the rollout: unassigned.
        let store = Store::open(Path::new(pg.store()), DEFAULT_LOCK_WAIT).unwrap();
        let plan = parse_plan(
            "p",
            &std::fs::read_to_string("plans/ios-parallel-pilots.toml").unwrap(),
        )
        .unwrap();
        let settings = settings::of(&plan.provider).unwrap();
        let tenant = SimProvider::open(&settings, &store).unwrap();
        let history = tenant.history(&plan.policy.compliance[0]);
        assert!(
            history.len() >= 3,
            "phases were applied, then restored: {history:?}"
        );
        assert!(history.last().unwrap().assignments.is_empty());
    }
}

#[test]
fn an_edited_audit_trail_fails_verification() {
    let pg = Phasegate::offline();
    let id = stdout(&pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]))
        .trim()
        .to_string();
    pg.run(&["run", "--once"]);
    // Copy the store, then edit the copy's first event: who started the rollout.
    let copy = tempfile::tempdir().unwrap();
    for entry in walk(&pg.store_dir()) {
        let target = copy
            .path()
            .join(entry.strip_prefix(pg.store_dir()).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    {
        let db = sled::open(copy.path().join("sled")).unwrap();
        let events = db.open_tree("events").unwrap();
        let (key, value) = events.iter().next().unwrap().unwrap();
        let edited = String::from_utf8(value.to_vec())
            .unwrap()
            .replace("alice", "mallory");
        events.insert(key, edited.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let out = pg.run(&[
        "--store",
        copy.path().to_str().unwrap(),
        "history",
        &id,
        "--verify",
    ]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("event 1: content does not match its hash"),
        "{}",
        stderr(&out)
    );
    // The original is untouched and still verifies.
    assert_eq!(code(&pg.run(&["history", &id, "--verify"])), 0);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if !path.ends_with("store.lock") && !path.ends_with("driver.lock") {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_second_run_on_the_same_store_exits_4() {
    let pg = Phasegate::offline();
    let plan = std::fs::read_to_string("plans/windows-baseline.toml")
        .unwrap()
        .replace("devices = 10000", "devices = 400000");
    let plan_path = pg.dir.path().join("big.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let out = pg.run(&["start", plan_path.to_str().unwrap(), "--by", "alice"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let first = pg.spawn(&["run"]);
    // Wait until the first run holds the driver lock: it writes its pid once it has it.
    let lock = pg.store_dir().join("driver.lock");
    let pid = first.id().to_string();
    let held = (0..2000).any(|_| {
        let holder = std::fs::read_to_string(&lock).unwrap_or_default();
        if holder.contains(&pid) {
            return true;
        }
        std::thread::yield_now();
        std::thread::park_timeout(std::time::Duration::from_millis(5));
        false
    });
    assert!(held, "the first run never took the lock");
    let second = pg.run(&["run"]);
    let first = first.wait_with_output().unwrap();
    assert_eq!(code(&second), 4, "{}", stderr(&second));
    let message = stderr(&second);
    assert!(
        message.contains("is in use by another phasegate process"),
        "{message}"
    );
    assert!(
        message.contains(&pg.store_dir().display().to_string()),
        "{message}"
    );
    assert!(message.contains(&pid), "names the holder: {message}");
    assert_eq!(code(&first), 3, "{}", stderr(&first));
}

/// The simulated tenant's configuration history for a plan in a store: every change phasegate
/// made to the policy, with its (simulated) time.
fn tenant_history(store: &Path, plan_file: &Path) -> Vec<(i64, String)> {
    let store = Store::open(store, DEFAULT_LOCK_WAIT).unwrap();
    let plan = parse_plan("p", &std::fs::read_to_string(plan_file).unwrap()).unwrap();
    let settings = settings::of(&plan.provider).unwrap();
    let tenant = SimProvider::open(&settings, &store).unwrap();
    tenant
        .history(&plan.policy.compliance[0])
        .iter()
        .map(|entry| (entry.at.as_millis(), format!("{:?}", entry.assignments)))
        .collect()
}

/// Runs `run` / `approve` until the rollout completes; returns how many runs it took.
fn drive_to_completion(pg: &Phasegate, id: &str) -> usize {
    for runs in 1..=10 {
        let out = pg.run(&["run", id]);
        match code(&out) {
            0 => return runs,
            3 => {
                let approve = pg.run(&["approve", id, "--by", "bob"]);
                assert_eq!(code(&approve), 0, "{}", stderr(&approve));
            }
            other => panic!("run exited {other}: {}", stderr(&out)),
        }
    }
    panic!("the rollout did not complete");
}

on_both_stores! {
    fn a_run_killed_at_any_moment_resumes_without_repeating_or_skipping_a_change() {
        let plan_text = std::fs::read_to_string("plans/windows-baseline.toml")
            .unwrap()
            .replace("devices = 10000", "devices = 200000");

        // The reference: the same rollout, never interrupted.
        let calm = Phasegate::offline();
        let calm_plan = calm.dir.path().join("plan.toml");
        std::fs::write(&calm_plan, &plan_text).unwrap();
        let id = stdout(&calm.run(&["start", calm_plan.to_str().unwrap(), "--by", "alice"]))
            .trim()
            .to_string();
        drive_to_completion(&calm, &id);
        let reference = tenant_history(Path::new(calm.store()), &calm_plan);
        assert_eq!(reference.len(), 4, "one change per phase: {reference:?}");

        // The same rollout, with `run` killed (SIGKILL) at staggered moments.
        let rough = Phasegate::offline();
        let rough_plan = rough.dir.path().join("plan.toml");
        std::fs::write(&rough_plan, &plan_text).unwrap();
        let out = rough.run(&["start", rough_plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let mut killed = 0;
        for delay_ms in [3u64, 15, 40, 80, 120, 160, 220, 300] {
            let mut child = rough.spawn(&["run", &id]);
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                killed += 1;
            }
            child.wait().unwrap();
        }
        assert!(
            killed >= 4,
            "only {killed} runs were still going when killed"
        );
        drive_to_completion(&rough, &id);

        let status = rough.json(&["status", &id]);
        assert_eq!(status["status"], "completed");
        assert_eq!(code(&rough.run(&["history", &id, "--verify"])), 0);
        // Every change made exactly once, in plan order, at the same simulated moments.
        assert_eq!(tenant_history(Path::new(rough.store()), &rough_plan), reference);
    }
}

/// The example plan with these `[[webhook]]` tables, written into the test's store directory.
fn plan_with_webhooks(pg: &Phasegate, webhooks: &str) -> PathBuf {
    let text = std::fs::read_to_string("plans/windows-baseline.toml")
        .unwrap()
        .replacen("[[phase]]", &format!("{webhooks}\n[[phase]]"), 1);
    let path = pg.dir.path().join("hooks.toml");
    std::fs::write(&path, text).unwrap();
    path
}

on_both_stores! {
    fn a_webhook_that_redirects_is_not_followed_and_its_notification_stays_pending() {
        let pg = Phasegate::offline();
        let elsewhere = Receiver::start(answer(200, ""));
        let redirecting = Receiver::start(answer(
            307,
            &format!("Location: {}/collect\r\n", elsewhere.url),
        ));
        let plan = plan_with_webhooks(
            &pg,
            &format!(
                "[[webhook]]\nurl = \"{}/hook\"\nevents = [\"waiting_approval\"]\n",
                redirecting.url
            ),
        );
        let out = pg.run(&["start", plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.json(&["status", &id]);
        assert_eq!(status["status"], "waiting_approval");

        assert_eq!(
            redirecting.requests().len(),
            1,
            "asked once: a redirect is final"
        );
        assert!(
            elsewhere.requests().is_empty(),
            "the redirect was followed: {:?}",
            elsewhere.requests()
        );
        let history = pg.json(&["history", &id]);
        assert!(
            !history
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"]["kind"]["type"] == "delivered"),
            "a redirect is not a delivery: {history:#}"
        );
        let pending = status["pending_effects"].as_array().unwrap();
        assert!(
            pending
                .iter()
                .any(|p| p.as_str().unwrap().starts_with("notify ")),
            "the notification stays in the outbox: {status:#}"
        );
        let log = stderr(&out);
        assert!(
            log.contains("answered 307") && log.contains("not followed"),
            "the warning says why: {log}"
        );
    }
}

on_both_stores! {
    fn webhook_credentials_appear_in_no_output_at_the_default_log_level() {
        const PASSWORD: &str = "p4ss-w0rd-7f3k";
        const TOKEN: &str = "s3cret-tok-9q2z";
        let pg = Phasegate::offline();
        let up = Receiver::start(answer(204, ""));
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let up_host = up.url.strip_prefix("http://").unwrap();
        let plan = plan_with_webhooks(
            &pg,
            &format!(
                "[[webhook]]\nurl = \"http://hooks:{PASSWORD}@{up_host}/hook?token={TOKEN}&team=ops\"\n\n\
                 [[webhook]]\nurl = \"http://hooks:{PASSWORD}@127.0.0.1:{down}/down?token={TOKEN}\"\n"
            ),
        );
        let mut outputs = Vec::new();
        let mut keep = |what: &str, out: Output| {
            outputs.push((what.to_string(), stdout(&out), stderr(&out)));
            out
        };
        let out = keep(
            "start",
            pg.run(&["start", plan.to_str().unwrap(), "--by", "alice"]),
        );
        let id = stdout(&out).trim().to_string();
        let run = keep("run", pg.run(&["run", &id]));
        assert_eq!(code(&run), 3, "{}", stderr(&run));
        for args in [
            vec!["status"],
            vec!["status", &id],
            vec!["history", &id],
            vec!["plan", "show", plan.to_str().unwrap()],
        ] {
            keep(&args.join(" "), pg.run(&args));
            let mut json = args.clone();
            json.extend(["--output", "json"]);
            keep(&json.join(" "), pg.run(&json));
        }
        for (what, out, err) in &outputs {
            // Logs into a pipe carry no colour codes.
            assert!(
                !err.contains('\u{1b}'),
                "`{what}` wrote escape codes: {err:?}"
            );
            for secret in [PASSWORD, TOKEN] {
                assert!(
                    !out.contains(secret) && !err.contains(secret),
                    "`{what}` shows {secret}:\n{out}\n{err}"
                );
            }
        }

        // The operator still recognises each endpoint, in the trail and in the log.
        let history = stdout(&pg.run(&["history", &id]));
        assert!(
            history.contains(&format!(
                "http://***@{up_host}/hook?token=***&team=*** answered 204"
            )),
            "{history}"
        );
        assert!(
            stderr(&run).contains(&format!("POST http://***@127.0.0.1:{down}/down?token=***")),
            "{}",
            stderr(&run)
        );
        let json = pg.json(&["history", &id]);
        let addresses: Vec<&str> = json
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["effects"].as_array().unwrap())
            .filter(|p| p["effect"]["type"] == "notify")
            .map(|p| p["effect"]["url"].as_str().unwrap())
            .collect();
        assert!(!addresses.is_empty());
        assert!(
            addresses.iter().all(|a| a.contains("://***@")),
            "{addresses:?}"
        );

        // What is sent is the real address, credentials and all.
        let requests = up.requests();
        assert!(!requests.is_empty());
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("hooks:{PASSWORD}"),
        );
        for request in &requests {
            assert!(
                request.starts_with(&format!("POST /hook?token={TOKEN}&team=ops HTTP/1.1")),
                "{request}"
            );
            assert!(
                request
                    .to_lowercase()
                    .contains(&format!("authorization: basic {}", basic.to_lowercase())),
                "{request}"
            );
        }
    }
}

on_both_stores! {
    /// A reason with a line break and escape sequences forges no line of `history` and reaches the
    /// terminal escaped; the JSON keeps it exactly as given.
    fn text_from_people_cannot_forge_history_lines_or_reach_the_terminal_raw() {
        let pg = Phasegate::offline();
        let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let forged = "queue check\n#99   2099-01-01T00:00:00Z  approval_granted     user mallory \u{1b}[2J\u{202e}";
        let out = pg.run(&["pause", &id, "--by", "bob\nroot", "--reason", forged]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        for args in [vec!["history", id.as_str()], vec!["status", id.as_str()]] {
            let out = pg.run(&args);
            let text = stdout(&out);
            assert!(
                !text.lines().any(|l| l.starts_with("#99")),
                "{args:?}: {text}"
            );
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{202e}'),
                "{args:?}: {text:?}"
            );
        }
        let history = stdout(&pg.run(&["history", &id]));
        assert!(history.contains("queue check\\n#99"), "{history}");
        assert!(history.contains("bob\\nroot"), "{history}");
        let json = pg.json(&["history", &id]);
        let events = json["events"]
            .as_array()
            .unwrap_or_else(|| json.as_array().unwrap());
        assert!(
            events
                .iter()
                .any(|e| e["event"]["trigger"]["reason"] == forged),
            "{json}"
        );
    }
}

on_both_stores! {
    /// Two stores each run a rollout with the same id to one receiver: their notifications never
    /// share an idempotency key, so the receiver drops none of them as a duplicate.
    fn idempotency_keys_are_unique_across_stores() {
        let receiver = Receiver::start(answer(204, ""));
        let mut keys = Vec::new();
        for _ in 0..2 {
            let pg = Phasegate::offline();
            let plan = plan_with_webhooks(
                &pg,
                &format!(
                    "[[webhook]]\nurl = \"{}/hook\"\nevents = [\"waiting_approval\"]\n",
                    receiver.url
                ),
            );
            let out = pg.run(&[
                "start",
                plan.to_str().unwrap(),
                "--by",
                "alice",
                "--id",
                "same-1",
            ]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            let out = pg.run(&["run", "same-1"]);
            assert_eq!(code(&out), 3, "{}", stderr(&out));
        }
        for request in receiver.requests() {
            let key = request
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Idempotency-Key: ")
                        .or(l.strip_prefix("idempotency-key: "))
                })
                .unwrap_or_else(|| panic!("no key in {request}"))
                .trim()
                .to_string();
            assert!(key.contains("/same-1:"), "{key}");
            keys.push(key);
        }
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_ne!(keys[0], keys[1], "two stores, one key");
    }
}

#[test]
fn completions_are_printed_for_each_shell_and_an_unknown_shell_is_refused() {
    let pg = Phasegate::offline();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = pg.run(&["completions", shell]);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for word in ["approve", "rollback", "serve", "store"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = pg.run(&["completions", "tcsh"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("possible values"), "{}", stderr(&out));
}

/// The example plan made dangerous: no soak on the pilot, whose gate asks for no coverage.
fn dangerous_plan(pg: &Phasegate, extra_rollout: &str) -> PathBuf {
    let text = std::fs::read_to_string("plans/windows-baseline.toml")
        .unwrap()
        .replacen("min_soak = \"2d\"", "min_soak = \"0s\"", 1)
        .replacen("min_reporting = \"85%\"", "min_reporting = \"0%\"", 1)
        .replacen(
            "name = \"windows-baseline\"",
            &format!("name = \"windows-baseline\"{extra_rollout}"),
            1,
        );
    let path = pg.dir.path().join("dangerous.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn plan_check_warns_about_valid_but_dangerous_plans_and_strict_makes_them_errors() {
    let pg = Phasegate::offline();
    let plan = dangerous_plan(&pg, "");
    let file = plan.to_str().unwrap();
    let out = pg.run(&["plan", "check", file]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{file}: ok (4 phases, 2 warnings)")
    );
    let text = stderr(&out);
    assert!(
        text.contains(&format!(
            "{file}:38:12: warning: phase `pilot` has no soak (`min_soak = \"0s\"`) before `report-only` starts\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{file}:41:17: warning: `min_reporting = \"0%\"` in phase `pilot` asks for no coverage\n"
        )),
        "{text}"
    );
    assert!(text.contains("41 | min_reporting = \"0%\"\n"), "{text}");
    assert_eq!(text.matches("   = why: ").count(), 2, "{text}");

    let json = pg.json(&["plan", "check", file]);
    assert_eq!(json[0]["valid"], true);
    assert_eq!(json[0]["errors"], serde_json::json!([]));
    let warnings = json[0]["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{json}");
    assert_eq!(
        (&warnings[0]["line"], &warnings[0]["column"]),
        (&38.into(), &12.into())
    );
    assert_eq!(
        (&warnings[1]["line"], &warnings[1]["column"]),
        (&41.into(), &17.into())
    );
    assert!(
        warnings
            .iter()
            .all(|w| w["why"].as_str().is_some_and(|w| !w.is_empty()))
    );

    // --strict: the same findings, as errors, exit 2.
    let out = pg.run(&["plan", "check", "--strict", file]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&format!(
            "{file}:41:17: `min_reporting = \"0%\"` in phase `pilot`"
        )),
        "{text}"
    );
    assert!(!text.contains("warning:"), "{text}");
    assert!(
        text.contains("an error here: the plan is checked strictly"),
        "{text}"
    );
    let json = pg.json(&["plan", "check", "--strict", file]);
    assert_eq!(json[0]["valid"], false);
    assert_eq!(json[0]["errors"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json[0]["warnings"], serde_json::json!([]));

    // The plan's own `strict = true` does the same.
    let strict = dangerous_plan(&pg, "\nstrict = true");
    let out = pg.run(&["plan", "check", strict.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("an error here: the plan sets `strict = true`"),
        "{}",
        stderr(&out)
    );
}

on_both_stores! {
    fn start_shows_the_plans_warnings_and_refuses_them_under_strict() {
        let pg = Phasegate::offline();
        let plan = dangerous_plan(&pg, "");
        let file = plan.to_str().unwrap();
        let out = pg.run(&["start", file, "--by", "alice", "--strict"]);
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(
            stderr(&out).contains(":41:17: `min_reporting = \"0%\"`"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            pg.json(&["status"]),
            serde_json::json!([]),
            "nothing started"
        );

        let out = pg.run(&["start", file, "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let text = stderr(&out);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[1].ends_with(
                "dangerous.toml:41:17: `min_reporting = \"0%\"` in phase `pilot` asks for no coverage; \
                 the gate judges the whole scope on however few devices report — one is enough, and \
                 silence is never counted as failing"
            ),
            "{text}"
        );
        // Recorded with the start event, for the audit trail.
        let history = stdout(&pg.run(&["history", &id]));
        assert!(history.contains("asks for no coverage"), "{history}");

        let strict = dangerous_plan(&pg, "\nstrict = true");
        let out = pg.run(&["start", strict.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(stderr(&out).contains("the plan sets `strict = true`"));
    }
}

#[test]
fn plan_check_reports_structural_errors_of_different_tables_in_one_run() {
    let pg = Phasegate::offline();
    let text = std::fs::read_to_string("plans/windows-baseline.toml")
        .unwrap()
        .replacen("observe_every = \"6h\"", "observe_every = 6", 1)
        .replacen("min_soak = \"2d\"", "min_soke = \"2d\"", 1)
        .replacen("max_error_ratio = \"2%\"", "max_eror_ratio = \"2%\"", 1);
    let path = pg.dir.path().join("typos.toml");
    std::fs::write(&path, text).unwrap();
    let file = path.to_str().unwrap();
    let out = pg.run(&["plan", "check", file]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let text = stderr(&out);
    let headlines: Vec<&str> = text.lines().filter(|l| l.starts_with(file)).collect();
    assert_eq!(headlines.len(), 3, "{text}");
    assert!(
        headlines[0].starts_with(&format!("{file}:15:17: invalid type: integer")),
        "{text}"
    );
    assert!(
        headlines[0].ends_with("a duration is a string, such as \"3d\", \"36h\" or \"1h 30m\""),
        "{text}"
    );
    assert!(
        headlines[1].starts_with(&format!("{file}:38:1: unknown field `min_soke`")),
        "{text}"
    );
    assert!(
        headlines[2].starts_with(&format!("{file}:54:1: unknown field `max_eror_ratio`")),
        "{text}"
    );
}

#[test]
fn a_ten_megabyte_line_does_not_flood_stderr() {
    let pg = Phasegate::offline();
    let long = "G".repeat(10 * 1024 * 1024);
    let text = std::fs::read_to_string("plans/windows-baseline.toml")
        .unwrap()
        .replacen(
            "include = [\"Pilot IT\"]",
            &format!("include = [\"{long}\", \"Pilot IT\", \"Pilot IT\", \"{long}\"]"),
            1,
        );
    let path = pg.dir.path().join("long.toml");
    std::fs::write(&path, text).unwrap();
    let out = pg.run(&["plan", "check", path.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.len() < 4096, "{} bytes of stderr", out.stderr.len());
    assert!(text.contains(":36:"), "{text}");
    assert!(text.contains("group `Pilot IT` is listed twice"), "{text}");
    assert!(text.contains("36 | …GGG"), "{text}");
    assert!(
        text.contains("G\", \"Pilot IT\", \"Pilot IT\", \"GGG"),
        "{text}"
    );
}
