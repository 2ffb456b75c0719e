//! The impact forecast through the real binary on the simulated fleet, on its virtual clock:
//! each promotion of report-only → notify → enforce is decided on a forecast of who would be
//! told and blocked, recorded with it, and checked against the outcome once the started phase
//! has soaked; `approvals`, `approve` and `history` show it.

mod common;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::Value;

/// The largest error a forecast may have, as a share of the phase's reporting devices.
const TOLERANCE: f64 = 0.02;

fn phase<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no phase {id} in {status}"))
}

fn windows_baseline(pg: &Phasegate, devices: u32) -> String {
    let text = std::fs::read_to_string(format!(
        "{}/plans/windows-baseline.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("devices = 10000", &format!("devices = {devices}"));
    std::fs::write(&pg.plan, text).unwrap();
    pg.start()
}

on_both_stores! {
    fn forecasts_of_report_only_notify_enforce_are_within_two_percent_of_the_outcome() {
        let pg = Phasegate::offline();
        let id = windows_baseline(&pg, 20_000);

        // Runs until enforcement waits for approval.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval", "{status}");

        // `status` shows what promoting `notify` would do.
        let notify = phase(&status, "notify");
        let forecast = &notify["forecasts"][0];
        assert_eq!(forecast["phase"], "enforce", "{notify}");
        assert_eq!(forecast["mode"], "enforce");
        let blocked = forecast["blocked"]["devices"].as_u64().unwrap();
        assert!(blocked > 0, "noncompliant devices remain: {forecast}");
        assert!(forecast["blocked"]["users"].as_u64().unwrap() > 0);
        assert_eq!(forecast["blocked"]["by_platform"][0]["name"], "windows");
        assert!(
            !forecast["blocked"]["by_setting"]
                .as_array()
                .unwrap()
                .is_empty(),
            "the simulator names the failing settings: {forecast}"
        );
        let groups = forecast["blocked"]["groups"].as_array().unwrap();
        assert!(!groups.is_empty(), "{forecast}");
        assert!(
            groups.iter().all(|g| g["name"] != "All Users"),
            "the phase's whole scope is not a group worth listing: {forecast}"
        );
        let text = stdout(&pg.run(&["status", &id]));
        assert!(
            text.contains("forecast for `enforce` (enforce):") && text.contains("newly blocked"),
            "{text}"
        );
        assert!(text.contains("blocked by failing setting:"), "{text}");

        // `approvals` lists the request with its forecast and the digest an approval binds to.
        let pending = pg.json(&["approvals"]);
        let request = &pending[0];
        assert_eq!(request["rollout"], id.as_str(), "{pending}");
        assert_eq!(request["phase"], "notify");
        assert_eq!(request["gate_passed"], true);
        assert_eq!(request["forecasts"][0]["blocked"]["devices"], blocked);
        let digest = request["digest"].as_str().unwrap().to_string();
        assert_eq!(digest.len(), 64, "{request}");
        assert_eq!(pg.json(&["approvals", &id]), pending);
        let listed = stdout(&pg.run(&["approvals"]));
        assert!(
            listed.contains(&id) && listed.contains(&digest) && listed.contains("newly blocked"),
            "{listed}"
        );

        // `approve` shows it (no terminal: no question) and the approval binds to it.
        let out = pg.run(&["approve", &id, "--by", "bob", "--ticket", "CHG-7"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("forecast for `enforce` (enforce):"),
            "{}",
            stdout(&out)
        );
        // The approval is bound to the digest `approvals` showed.
        let approved = pg.status(&id);
        assert_eq!(
            phase(&approved, "notify")["approvals"]["granted"][0]["evidence_digest"],
            digest.as_str(),
            "{approved}"
        );
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "completed", "{status}");
        assert!(pg.json(&["approvals"]).as_array().unwrap().is_empty());

        // Every started phase kept the forecast it was started on and was checked after its soak.
        let mut seen = Vec::new();
        for id in ["report-only", "notify", "enforce"] {
            let record = phase(&status, id);
            let check = &record["forecast_check"];
            assert_eq!(check["phase"], id, "{record}");
            for what in ["notified", "blocked"] {
                let error = check[what]["error"].as_f64().unwrap();
                let (forecast, actual) = (
                    check[what]["forecast_devices"].as_u64().unwrap(),
                    check[what]["actual_devices"].as_u64().unwrap(),
                );
                eprintln!(
                    "{id} {what}: forecast {forecast}, actual {actual}, error {:.3}% of {} reporting devices",
                    error * 100.0,
                    check["reporting"]
                );
                assert!(error <= TOLERANCE, "{id} {what}: {check}");
            }
            seen.push((
                id,
                check["notified"]["forecast_devices"].as_u64().unwrap(),
                check["blocked"]["forecast_devices"].as_u64().unwrap(),
            ));
        }
        // Each forecast had something to say where its phase acts.
        assert_eq!(
            seen[0].1 + seen[0].2,
            0,
            "report-only tells nobody: {seen:?}"
        );
        assert!(
            seen[1].1 > 500,
            "about a tenth of the Windows devices fail: {seen:?}"
        );
        assert_eq!(seen[1].2, 0, "notify blocks nobody");
        assert!(seen[2].2 > 0, "{seen:?}");
        let notify = phase(&status, "notify");
        let actual = notify["forecast_check"]["notified"]["actual_devices"]
            .as_u64()
            .unwrap();
        let relative = (seen[1].1 as f64 - actual as f64).abs() / actual as f64;
        eprintln!("notify notified: relative error {:.3}%", relative * 100.0);
        assert!(relative <= TOLERANCE, "{notify}");

        // `history` records each forecast with its promotion and each check as it happened.
        let history = pg.json(&["history", &id]);
        let events = history.as_array().unwrap();
        let impact: Vec<&Value> = events
            .iter()
            .flat_map(|e| e["impact"].as_array().into_iter().flatten())
            .collect();
        let forecasts: Vec<&str> = impact
            .iter()
            .filter(|i| i["type"] == "forecast")
            .map(|i| i["phase"].as_str().unwrap())
            .collect();
        assert_eq!(
            forecasts,
            ["report-only", "notify", "enforce"],
            "{impact:?}"
        );
        let checks: Vec<&str> = impact
            .iter()
            .filter(|i| i["type"] == "check")
            .map(|i| i["phase"].as_str().unwrap())
            .collect();
        assert_eq!(checks, ["report-only", "notify", "enforce"], "{impact:?}");
        let promotion = events
            .iter()
            .find(|e| {
                e["notes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n.as_str().unwrap().starts_with("promoted `notify`"))
            })
            .expect("notify's promotion is in the trail");
        assert_eq!(promotion["impact"][0]["phase"], "enforce", "{promotion}");
        assert!(
            promotion["impact"][0]["at"]
                .as_str()
                .unwrap()
                .ends_with('Z'),
            "instants in RFC 3339: {promotion}"
        );
        let text = stdout(&pg.run(&["history", &id]));
        assert!(
            text.contains("· forecast for `enforce` (enforce):")
                && text.contains("· forecast for `enforce` against the outcome after its soak"),
            "{text}"
        );
        let granted = events
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "approval_granted")
            .unwrap();
        assert!(
            granted["notes"][0]
                .as_str()
                .unwrap()
                .contains("bob approved `notify`"),
            "{granted}"
        );
        assert!(pg.run(&["history", &id, "--verify"]).status.success());
    }
}

on_both_stores! {
    fn approve_asks_only_at_a_terminal_and_yes_skips_the_question() {
        let pg = Phasegate::offline();
        let id = windows_baseline(&pg, 2_000);
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        // A script without a terminal and with --yes proceeds the same way.
        let out = pg.run(&["approve", &id, "--by", "bob", "--yes"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("forecast for `enforce`"),
            "{}",
            stdout(&out)
        );
        assert!(!stderr(&out).contains("[y/N]"), "{}", stderr(&out));
    }
}

on_both_stores! {
    fn reject_shows_the_forecast_it_turns_down() {
        let pg = Phasegate::offline();
        let id = windows_baseline(&pg, 2_000);
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        let out = pg.run(&["reject", &id, "--by", "bob", "--reason", "too many blocked"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("forecast for `enforce` (enforce):"),
            "{}",
            stdout(&out)
        );
        assert_eq!(pg.status(&id)["status"], "rejected");
        assert!(pg.json(&["approvals", &id]).as_array().unwrap().is_empty());
    }
}

on_both_stores! {
    fn approvals_through_the_daemon_are_what_the_store_says() {
        let pg = Phasegate::offline();
        let id = windows_baseline(&pg, 2_000);
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        let local = pg.json(&["approvals"]);
        assert_eq!(local.as_array().unwrap().len(), 1, "{local}");
        let out = pg.run(&["token", "create", "--name", "vera", "--role", "viewer"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let viewer = stdout(&out).trim().to_string();

        let serve = pg.serve();
        let (status, all) = serve.call("GET", "/api/v1/approvals", &viewer, None);
        assert_eq!(status, 200, "{all}");
        assert_eq!(all, local);
        let path = format!("/api/v1/rollouts/{id}/approvals");
        let (status, one) = serve.call("GET", &path, &viewer, None);
        assert_eq!((status, &one), (200, &local));
        let (status, missing) = serve.call("GET", "/api/v1/rollouts/nope/approvals", &viewer, None);
        assert_eq!(status, 404, "{missing}");
        let (status, _) = serve.call("GET", "/api/v1/approvals", "not-a-token", None);
        assert_eq!(status, 401);

        // The CLI goes through the daemon that holds the store, for the list and the decision.
        assert_eq!(pg.json(&["approvals", &id]), local);
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("forecast for `enforce` (enforce):"),
            "{}",
            stdout(&out)
        );
        let (_, after) = serve.call("GET", &path, &viewer, None);
        assert_eq!(after, serde_json::json!([]), "approved: nothing waits");
        drop(serve);
    }
}

on_both_stores! {
    fn on_graph_the_forecast_counts_users_and_the_told_but_names_no_setting() {
        let emulator = Emulator::spawn(&[
            "--client-secret",
            SECRET,
            "--devices",
            "3000",
            "--ca-rate",
            "20",
        ]);
        let pg = Phasegate::new(&emulator, 20.0);
        let id = pg.start();
        pg.complete(&id);
        let status = pg.status(&id);
        assert_eq!(status["status"], "completed", "{status}");
        let enforce = phase(&status, "enforce");
        let forecast = &enforce["forecast"];
        assert_eq!(forecast["mode"], "enforce", "{enforce}");
        let blocked = &forecast["blocked"];
        assert!(blocked["devices"].as_u64().unwrap() > 0, "{forecast}");
        assert!(blocked["users"].as_u64().unwrap() > 0, "{forecast}");
        assert_eq!(blocked["by_setting"], serde_json::json!([]), "{forecast}");
        // The notify phase tells the owners of the failing devices, as forecast: the policy's
        // e-mail action goes in with it.
        let notify = phase(&status, "notify");
        let told = notify["forecast"]["notified"]["devices"].as_u64().unwrap();
        assert!(told > 0, "{notify}");
        // Device statuses only show the told devices still failing: the actual is a lower bound
        // there (docs/graph.md), so this checks it is measured, not how close it comes.
        let check = &notify["forecast_check"];
        eprintln!("graph notify: {}", check["summary"]);
        let actual = check["notified"]["actual_devices"].as_u64().unwrap();
        assert!(actual > 0 && actual <= told, "{check}");
        eprintln!("graph enforce: {}", enforce["forecast_check"]["summary"]);
    }
}
