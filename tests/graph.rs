//! End-to-end tests of the Graph provider against `phasegate emulator` on loopback: the real
//! binary on both sides of a real socket. The rollouts that write the tenant (the documented
//! writes, injected faults, abort) run on both store backends (`on_both_stores!`).

mod common;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::Value;

trait EmulatorExt {
    fn start(args: &[&str]) -> Emulator;
    fn writes(&self) -> Vec<(String, String, String)>;
    fn configuration(&self) -> Value;
}

impl EmulatorExt for Emulator {
    fn start(args: &[&str]) -> Emulator {
        let mut all = vec!["--client-secret", SECRET];
        all.extend_from_slice(args);
        Emulator::spawn(&all)
    }

    /// The writes the application made: (method, path, body digest, the store blanked).
    fn writes(&self) -> Vec<(String, String, String)> {
        common::writes_of(&self.get("/_emulator/ledger"))
    }

    /// What phasegate manages in the tenant, without timestamps and counters.
    fn configuration(&self) -> Value {
        let state = self.get("/_emulator/state");
        let policies: Vec<Value> = state["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| serde_json::json!({"id": p["id"], "assignments": p["assignments"], "actions": p["actions"]}))
            .collect();
        serde_json::json!({"policies": policies, "conditionalAccess": state["conditionalAccess"]})
    }
}

fn short(writes: &[(String, String, String)]) -> Vec<String> {
    writes
        .iter()
        .map(|(method, path, _)| {
            let tail = path.rsplit('/').next().unwrap();
            let what = if path.contains("conditionalAccess") {
                if method == "POST" {
                    "policies"
                } else {
                    "policy"
                }
            } else if method == "PATCH" {
                "compliance policy"
            } else {
                tail
            };
            format!("{method} {what}")
        })
        .collect()
}

on_both_stores! {
    fn a_four_phase_rollout_completes_with_exactly_the_documented_writes() {
        let emulator = Emulator::start(&["--devices", "3000", "--ca-rate", "20"]);
        let pg = Phasegate::new(&emulator, 20.0);
        let id = pg.start();
        pg.complete(&id);
        let status = pg.status(&id);
        assert_eq!(status["status"], "completed");
        assert!(
            status["phases"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["state"] == "promoted")
        );
        // docs/graph.md, "What each phase writes": one line per write, in order.
        assert_eq!(
            short(&emulator.writes()),
            vec![
                "PATCH compliance policy",      // pilot: the ownership line
                "POST scheduleActionsForRules", // pilot: the block grace held at 8,760 h
                "POST assign",                  // pilot: assign Pilot IT, exclude Break Glass
                "PATCH policy",                 // pilot: CA report-only over the pilot group
                "POST assign",                  // report-only: add All users
                "PATCH policy",                 // report-only: CA report-only over all users
                "POST scheduleActionsForRules", // notify: the notification, grace still held
                "POST scheduleActionsForRules", // notify: the derived grace
                "POST policies",                // enforce: the enabled copy of the CA policy
                "PATCH compliance policy",      // completed: the ownership line removed
                "PATCH policy",                 // completed: the ownership line removed
            ]
        );
        let state = emulator.get("/_emulator/state");
        let copy = state["conditionalAccess"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["displayName"]
                    .as_str()
                    .unwrap()
                    .ends_with("(phasegate enforced)")
            })
            .expect("the enforced copy exists");
        assert_eq!(copy["state"], "enabled");
        assert_eq!(copy["users"]["includeUsers"][0], "All");
        // Nobody is blocked yet: owners were told a week ago at most. A month later, some are.
        assert_eq!(state["policies"][0]["deviceStatuses"]["blocked"], 0);
        emulator.post(
            "/_emulator/clock",
            &serde_json::json!({"advanceBySeconds": 30 * 86_400}),
        );
        let state = emulator.get("/_emulator/state");
        assert!(
            state["policies"][0]["deviceStatuses"]["blocked"]
                .as_u64()
                .unwrap()
                > 0
        );
        // Running again changes nothing.
        let writes = emulator.writes().len();
        assert_eq!(code(&pg.run(&["run", &id])), 0);
        assert_eq!(emulator.writes().len(), writes);
    }
}

on_both_stores! {
    fn with_injected_faults_the_tenant_ends_the_same_and_no_write_is_repeated() {
        let calm = Emulator::start(&["--devices", "3000", "--ca-rate", "20"]);
        let calm_pg = Phasegate::new(&calm, 20.0);
        let id = calm_pg.start();
        calm_pg.complete(&id);

        let faulty = Emulator::start(&["--devices", "3000", "--ca-rate", "20", "--faults", "0.2"]);
        let faulty_pg = Phasegate::new(&faulty, 20.0);
        let id = faulty_pg.start();
        faulty_pg.complete(&id);
        let state = faulty.get("/_emulator/state");
        assert!(state["faultsInjected"].as_u64().unwrap() > 20, "{state}");

        assert_eq!(
            faulty.writes(),
            calm.writes(),
            "the same writes, each once, in the same order"
        );
        assert_eq!(faulty.configuration(), calm.configuration());
        assert_eq!(faulty_pg.status(&id)["status"], "completed");
    }
}

on_both_stores! {
    fn a_token_that_stops_working_mid_rollout_is_renewed() {
        let emulator = Emulator::start(&["--devices", "2000", "--ca-rate", "20", "--token-uses", "15"]);
        let pg = Phasegate::new(&emulator, 20.0);
        let id = pg.start();
        pg.complete(&id);
        assert_eq!(pg.status(&id)["status"], "completed");
        assert_eq!(short(&emulator.writes()).len(), 11);
    }
}

on_both_stores! {
    fn twenty_five_thousand_devices_are_observed_through_paging() {
        let emulator = Emulator::start(&["--devices", "25000", "--ca-rate", "20"]);
        // Paging is `deviceStatuses`' way: this test observes through it, the fallback.
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 20.0, |t| {
            t.replace(
                "kind = \"graph\"",
                "kind = \"graph\"\nobserve_through = \"device_statuses\"",
            )
        });
        let id = pg.start();
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        let status = pg.status(&id);
        let observation = &status["phases"][2]["observation"];
        let observed = observation["targeted"].as_u64().unwrap();
        let userless = observation["userless"].as_u64().unwrap();
        let assigned = emulator.get("/_emulator/state")["policies"][0]["assignedDevices"]
            .as_u64()
            .unwrap();
        assert!(
            assigned > 12_000,
            "{assigned} devices span more than 12 pages of 1,000"
        );
        // The rows are user–device pairs: each shared device counts once, and the devices only the
        // system account reports are userless, in no phase.
        assert!(userless > 0, "{observation}");
        assert_eq!(observed + userless, assigned, "{observation}");
    }
}

on_both_stores! {
    fn a_wrong_secret_is_a_clear_error_with_exit_1_and_secrets_are_never_printed() {
        let emulator = Emulator::start(&["--devices", "500", "--ca-rate", "20"]);
        let pg = Phasegate::new(&emulator, 20.0);
        let wrong = "not-the-secret-9Kd";
        let out = pg
            .command(&["start", pg.plan.to_str().unwrap()])
            .env("PHASEGATE_GRAPH_SECRET", wrong)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert_eq!(code(&out), 1);
        let message = stderr(&out);
        assert!(
            message.contains("invalid_client: AADSTS7000215"),
            "{message}"
        );
        assert!(message.contains("contoso.onmicrosoft.com"), "{message}");
        assert!(
            !message.contains(wrong) && !stdout(&out).contains(wrong),
            "the secret leaked"
        );

        let out = pg
            .command(&["start", pg.plan.to_str().unwrap()])
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let out = pg
            .command(&["run", &id])
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(!stderr(&out).is_empty(), "trace logging is on");
        assert!(
            !stderr(&out).contains(SECRET) && !stdout(&out).contains(SECRET),
            "the secret leaked"
        );

        let out = pg
            .command(&["start", pg.plan.to_str().unwrap()])
            .env_remove("PHASEGATE_GRAPH_SECRET")
            .output()
            .unwrap();
        assert_eq!(code(&out), 1);
        assert!(
            stderr(&out).contains("PHASEGATE_GRAPH_SECRET"),
            "{}",
            stderr(&out)
        );
    }
}

on_both_stores! {
    fn a_group_the_tenant_does_not_have_is_invalid_input() {
        let emulator = Emulator::start(&["--devices", "500", "--ca-rate", "20"]);
        let pg = Phasegate::new(&emulator, 20.0);
        let text = std::fs::read_to_string(&pg.plan)
            .unwrap()
            .replace("\"Pilot IT\"", "\"Pilot Sales\"");
        std::fs::write(&pg.plan, text).unwrap();
        let out = pg.run(&["start", pg.plan.to_str().unwrap()]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains("group `Pilot Sales` not found in tenant contoso.onmicrosoft.com"),
            "{}",
            stderr(&out)
        );
    }
}

on_both_stores! {
    fn abort_restores_the_recorded_configuration_exactly() {
        let emulator = Emulator::start(&["--devices", "2000", "--ca-rate", "20"]);
        let before = emulator.configuration();
        let pg = Phasegate::new(&emulator, 20.0);
        let id = pg.start();
        pg.complete(&id);
        assert_ne!(emulator.configuration(), before);
        let out = pg.run(&["abort", &id, "--by", "alice", "--reason", "rehearsal over"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        assert_eq!(pg.status(&id)["status"], "aborted");
        assert_eq!(emulator.configuration(), before);
    }
}

/// The emulator in this process, the provider talking to it over loopback; returns the ledger.
async fn reconcile_all_phases(seed: u64, faults: f64) -> Vec<Value> {
    use phasegate::domain::desired::desired_with;
    use phasegate::emulator;
    use phasegate::provider::Provider;
    use phasegate::provider::graph::GraphProvider;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = emulator::Settings {
        devices: 300,
        seed,
        faults,
        fault_seed: seed,
        time_scale: None,
        tenant_domain: "contoso.onmicrosoft.com".into(),
        client_id: "00001111-aaaa-2222-bbbb-3333cccc4444".into(),
        client_secret: SECRET.into(),
        credentials: Default::default(),
        token_lifetime: std::time::Duration::from_secs(3600),
        token_uses: None,
        ca_requests_per_second: 1e6,
        remediation_half_life: std::time::Duration::from_secs(2 * 86_400),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(emulator::serve(listener, settings, async {
        let _ = stopped.await;
    }));
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/plans/windows-baseline-graph.toml"
    ))
    .unwrap()
    .replace("http://127.0.0.1:8080", &url)
    .replace(
        "login_url = ",
        "ca_requests_per_second = 1000000.0\nrequest_timeout = \"2s\"\nlogin_url = ",
    );
    let plan = phasegate::adapters::parse_plan("graph.toml", &text).unwrap();
    let graph = phasegate::provider::graph::settings::of(&plan.provider).unwrap();
    let mut provider = GraphProvider::with_secret(graph, SECRET.into(), "test")
        .await
        .unwrap();
    let mut record = provider.capture_baseline(&plan.policy).await.unwrap();
    for phases in 1..=plan.phases.len() {
        let desired = desired_with(&plan, "graph-1", &(0..phases).collect());
        let mut attempts = 0;
        // Like the engine: a reconcile that gives up is simply run again.
        loop {
            match provider
                .reconcile(&plan.policy, &desired, None, &record)
                .await
            {
                Ok(phasegate::provider::Outcome::Done { record: next, .. }) => {
                    record = next;
                    break;
                }
                Ok(other) => panic!("seed {seed}: {other:?}"),
                Err(e) => {
                    attempts += 1;
                    assert!(e.retryable() && attempts < 5, "seed {seed}: {e}");
                }
            }
        }
    }
    // Not the blocking `http_get`: the emulator runs on this very thread.
    let ledger: Value = reqwest::get(format!("{url}/_emulator/ledger"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = stop.send(());
    let _ = server.await;
    ledger["value"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_write_whose_connection_drops_after_it_landed_is_never_repeated() {
    let digest = |ledger: &[Value]| -> Vec<(String, String, String)> {
        ledger
            .iter()
            .map(|e| {
                (
                    e["method"].as_str().unwrap().into(),
                    e["path"].as_str().unwrap().into(),
                    e["bodySha256"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let mut dropped = 0;
    for seed in 1..=12 {
        let calm = reconcile_all_phases(seed, 0.0).await;
        let faulty = reconcile_all_phases(seed, 0.3).await;
        assert_eq!(
            digest(&faulty),
            digest(&calm),
            "seed {seed}: every write once, in order"
        );
        dropped += faulty
            .iter()
            .filter(|e| e["connectionDropped"] == true)
            .count();
    }
    assert!(
        dropped > 0,
        "no write lost its response in 12 seeds; the test proves nothing"
    );
}

on_both_stores! {
    /// A directory approver group on Graph: the group is found by name and its users read
    /// through `transitiveMembers` (with their user principal names and mail addresses) when the
    /// phase waits for approval; the approval is judged against that reading.
    fn a_directory_approver_group_is_read_from_the_tenant_and_judges_approvals() {
        let emulator = Emulator::start(&["--devices", "3000", "--ca-rate", "20"]);
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 20.0, |t| {
            t.replacen(
                "[[phase]]",
                "[directory_approvers]\nboard = \"IT\"\n\n[[phase]]",
                1,
            )
            .replacen(
                "approvals = 1",
                "approvals = 1\napprover_groups = [\"board\"]",
                1,
            )
        });
        let id = pg.start();
        for _ in 0..8 {
            let out = pg.run(&["run", &id]);
            if pg.status(&id)["status"] == "waiting_approval" {
                break;
            }
            assert_eq!(code(&out), 0, "{}", stderr(&out));
        }
        assert_eq!(pg.status(&id)["status"], "waiting_approval");
        let history = pg.json(&["history", &id]);
        let read = history
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["event"]["kind"]["type"] == "approvers_read")
            .expect("the directory was read");
        let board = &read["event"]["kind"]["groups"]["board"];
        assert!(board["error"].is_null(), "{board}");
        assert!(
            board["source"].as_str().unwrap().starts_with("graph"),
            "{board}"
        );
        let members: Vec<&str> = board["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(members.len() > 10, "{board}");
        assert!(members.iter().all(|m| m.contains('@')), "{board}");
        let member = members
            .iter()
            .find(|m| m.starts_with("user"))
            .expect("a member who is not a break-glass account");

        let out = pg.run(&["approve", &id, "--by", "mallory@contoso.com"]);
        assert_eq!(code(&out), 2, "{}", stdout(&out));
        assert!(
            stderr(&out).contains("mallory@contoso.com is not among its members"),
            "{}",
            stderr(&out)
        );
        let out = pg.run(&["approve", &id, "--by", member]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_ne!(pg.status(&id)["status"], "waiting_approval");
    }
}
