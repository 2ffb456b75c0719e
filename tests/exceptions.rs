//! Exceptions from enforcement through the real binary on the simulated fleet: a group and a
//! user exempted during enforcement are not blocked, the exception ends on its own on the
//! virtual clock and they are blocked again, and the audit trail says who granted it and why.
//!
//! Two stores run the same plan over the same deterministic fleet, one with the exception and
//! one without, so every observation of one can be compared with the other's at the same
//! virtual time.

mod common;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::Value;

/// The Windows example plan on a smaller fleet, with a long enforce soak for the exception to
/// end inside; started by alice and run to the notify phase's approval.
fn at_the_enforce_promotion() -> (Phasegate, String) {
    let pg = Phasegate::offline();
    let text = std::fs::read_to_string(format!(
        "{}/plans/windows-baseline.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("devices = 10000", "devices = 2000")
    .replace("min_soak = \"2d\"\n\n[phase.gate]\nmin_reporting = \"95%\"\nmax_noncompliant_ratio = \"2%\"\n\n[phase.rollback_when]",
        "min_soak = \"6d\"\n\n[phase.gate]\nmin_reporting = \"95%\"\nmax_noncompliant_ratio = \"2%\"\n\n[phase.rollback_when]")
    .replace("blocked_ratio_above = \"5%\"", "blocked_ratio_above = \"50%\"");
    assert!(text.contains("min_soak = \"6d\""));
    std::fs::write(&pg.plan, text).unwrap();
    let id = pg.start();
    let out = pg.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(pg.status(&id)["status"], "waiting_approval");
    let out = pg.run(&["approve", &id, "--by", "bob", "--yes"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    (pg, id)
}

/// The enforce phase's observations: (virtual time, blocked devices).
fn enforced(pg: &Phasegate, id: &str) -> Vec<(String, u64)> {
    pg.json(&["history", id])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"]["kind"]["type"] == "observed")
        .flat_map(|e| {
            e["event"]["kind"]["observations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|o| o["phase"] == "enforce")
        .map(|o| {
            (
                o["at"].to_string(),
                o["tally"]["blocked"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{o}")),
            )
        })
        .collect()
}

fn notes(pg: &Phasegate, id: &str) -> Vec<Value> {
    pg.json(&["history", id]).as_array().unwrap().clone()
}

on_both_stores! {
    fn an_exempt_group_and_user_are_not_blocked_until_the_exception_ends_on_its_own() {
        let (plain, plain_id) = at_the_enforce_promotion();
        let (pg, id) = at_the_enforce_promotion();

        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "finance-close",
            "--group",
            "Finance",
            "--until",
            "3d",
            "--by",
            "Dana",
            "--reason",
            "quarter close",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "carol-repair",
            "--user",
            "User000042@fleet.example",
            "--until",
            "3d",
            "--by",
            "dana",
            "--reason",
            "laptop at the repair shop",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));

        // Listed in status, as JSON and as text.
        let status = pg.status(&id);
        let exceptions = status["exceptions"].as_array().unwrap();
        assert_eq!(exceptions.len(), 2, "{status}");
        assert_eq!(exceptions[0]["kind"], "group");
        assert_eq!(exceptions[0]["subject"], "Finance");
        assert_eq!(exceptions[0]["granted_by"], "dana");
        assert_eq!(exceptions[1]["subject"], "user000042@fleet.example");
        let text = stdout(&pg.run(&["status", &id]));
        assert!(
            text.contains("exception `finance-close`: group Finance exempt from enforcement until"),
            "{text}"
        );

        // Refusals exit 2 and record nothing.
        let before = pg.status(&id)["events"].clone();
        for refused in [
            vec![
                "exception",
                "grant",
                &id,
                "finance-close",
                "--group",
                "IT",
                "--until",
                "1d",
                "--reason",
                "again",
            ],
            vec![
                "exception",
                "grant",
                &id,
                "too-long",
                "--group",
                "IT",
                "--until",
                "91d",
                "--reason",
                "r",
            ],
            vec![
                "exception",
                "grant",
                &id,
                "bad name",
                "--group",
                "IT",
                "--until",
                "1d",
                "--reason",
                "r",
            ],
            vec![
                "exception",
                "grant",
                &id,
                "nobody",
                "--group",
                "IT",
                "--until",
                "1d",
                "--by",
                " ",
                "--reason",
                "r",
            ],
            vec!["exception", "revoke", &id, "unknown", "--reason", "r"],
        ] {
            let out = pg.run(&refused);
            assert_eq!(code(&out), 2, "{refused:?}: {}", stderr(&out));
            assert!(!stderr(&out).trim().is_empty());
        }
        assert_eq!(pg.status(&id)["events"], before);

        for (store, rollout) in [(&plain, &plain_id), (&pg, &id)] {
            let out = store.run(&["run", rollout]);
            assert!([0, 3].contains(&code(&out)), "{}", stderr(&out));
        }

        // The exception ended on its own, on the virtual clock, as its own audit event.
        assert!(pg.status(&id)["exceptions"].as_array().unwrap().is_empty());
        let trail = notes(&pg, &id);
        let expired: Vec<&Value> = trail
            .iter()
            .filter(|e| e["event"]["kind"]["type"] == "exception_expired")
            .collect();
        assert_eq!(expired.len(), 1, "{trail:#?}");
        assert_eq!(expired[0]["event"]["trigger"]["source"], "schedule");
        let said = expired[0]["notes"].to_string();
        assert!(said.contains("`finance-close` expired"), "{said}");
        assert!(said.contains("granted by dana: quarter close"), "{said}");
        let granted = trail
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "exception_granted")
            .unwrap();
        assert_eq!(granted["event"]["trigger"]["actor"], "Dana");
        assert_eq!(granted["event"]["trigger"]["reason"], "quarter close");
        let text = stdout(&pg.run(&["history", &id]));
        assert!(
            text.contains("exception `finance-close` granted by dana"),
            "{text}"
        );
        assert!(text.contains("exception `carol-repair` expired"), "{text}");

        // While it held, fewer devices were blocked than without it; afterwards, the same.
        let with = enforced(&pg, &id);
        let without = enforced(&plain, &plain_id);
        let expiry = expired[0]["at"].to_string();
        let mut during = 0;
        let mut after = 0;
        for (at, blocked) in &with {
            let Some((_, plain_blocked)) = without.iter().find(|(t, _)| t == at) else {
                continue;
            };
            // An observation due at the very instant of the expiry is taken before it.
            if at.as_str() <= expiry.as_str() {
                assert!(
                    blocked < plain_blocked,
                    "at {at}: {blocked} vs {plain_blocked}"
                );
                during += 1;
            } else {
                assert_eq!(blocked, plain_blocked, "at {at} (expiry {expiry})");
                after += 1;
            }
        }
        assert!(during > 0 && after > 0, "{with:?}\n{without:?}");
    }
}

/// The enforced copy of the plan's Conditional Access policy in the emulated tenant.
fn enforced_copy(emulator: &Emulator) -> Value {
    let state = emulator.get("/_emulator/state");
    state["conditionalAccess"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["displayName"]
                .as_str()
                .unwrap_or_default()
                .ends_with("(phasegate enforced)")
        })
        .cloned()
        .unwrap_or_else(|| panic!("no enforced copy in {state}"))
}

fn strings(value: &Value) -> Vec<String> {
    let mut all: Vec<String> = value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    all.sort();
    all
}

/// An emulated tenant (1,000 devices) whose rollout has its enforce phase applied and waits for
/// an approval after its soak, so that the phase stays applied meanwhile.
fn enforced_and_waiting_for_approval() -> (Emulator, Phasegate, String) {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "1000",
        "--ca-rate",
        "50",
    ]);
    let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 50.0, |t| {
        t.replace(
            "max_noncompliant_ratio = \"2%\"\n\n[phase.rollback_when]",
            "max_noncompliant_ratio = \"2%\"\napprovals = 1\n\n[phase.rollback_when]",
        )
    });
    let id = pg.start();
    let out = pg.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
    let out = pg.run(&["approve", &id, "--by", "bob", "--yes"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = pg.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
    (emulator, pg, id)
}

on_both_stores! {
    fn on_graph_an_exception_excludes_its_user_from_the_enforced_copy_and_keeps_every_other_exclusion()
    {
        let (emulator, pg, id) = enforced_and_waiting_for_approval();
        assert_eq!(pg.status(&id)["status"], "waiting_approval");
        let before = enforced_copy(&emulator);
        assert_eq!(before["state"], "enabled");
        let excluded_before = strings(&before["users"]["excludeUsers"]);
        let groups_before = strings(&before["users"]["excludeGroups"]);
        assert!(
            !excluded_before.is_empty() || !groups_before.is_empty(),
            "{before}"
        );

        let upn = "user000042@contoso.onmicrosoft.com";
        let user = emulator.graph(SECRET, &format!("/v1.0/users/{upn}"));
        let user_id = user["id"].as_str().unwrap().to_string();
        assert!(!excluded_before.contains(&user_id));
        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "repair",
            "--user",
            upn,
            "--until",
            "5d",
            "--by",
            "dana",
            "--reason",
            "laptop at the repair shop",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));

        let after = enforced_copy(&emulator);
        let mut expected = excluded_before.clone();
        expected.push(user_id.clone());
        expected.sort();
        assert_eq!(
            strings(&after["users"]["excludeUsers"]),
            expected,
            "{after}"
        );
        assert_eq!(strings(&after["users"]["excludeGroups"]), groups_before);
        assert_eq!(
            after["users"]["includeUsers"],
            before["users"]["includeUsers"]
        );

        // Revoked: the copy's exclusions are what they were.
        let out = pg.run(&[
            "exception",
            "revoke",
            &id,
            "repair",
            "--by",
            "dana",
            "--reason",
            "fixed",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        let revoked = enforced_copy(&emulator);
        assert_eq!(strings(&revoked["users"]["excludeUsers"]), excluded_before);
        assert_eq!(strings(&revoked["users"]["excludeGroups"]), groups_before);

        // A user the tenant does not have fails the reconcile, naming the user.
        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "ghost",
            "--user",
            "nobody@contoso.onmicrosoft.com",
            "--until",
            "1d",
            "--by",
            "dana",
            "--reason",
            "typo",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        pg.run(&["run", &id]);
        let status = pg.status(&id);
        assert_eq!(status["status"], "failed", "{status}");
        assert!(
            status["reason"]
                .as_str()
                .unwrap()
                .contains("nobody@contoso.onmicrosoft.com"),
            "{status}"
        );
    }
}

on_both_stores! {
    fn through_the_api_an_approver_grants_as_itself_and_the_cli_revokes_through_the_daemon() {
        let pg = Phasegate::offline();
        let text = std::fs::read_to_string(format!(
            "{}/plans/windows-baseline.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .replace("devices = 10000", "devices = 500");
        std::fs::write(&pg.plan, text).unwrap();
        let id = pg.start();
        let serve = pg.serve();
        let token = |name: &str, role: &str| {
            let out = pg.run(&["token", "create", "--name", name, "--role", role]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            stdout(&out).trim().to_string()
        };
        let anna = token("anna", "approver");
        let olga = token("olga", "operator");
        let path = format!("/api/v1/rollouts/{id}/exceptions");
        let body = serde_json::json!({
            "name": "trip", "user": "user000007@fleet.example", "until": "3d", "reason": "travelling",
        });
        let (status, answer) = serve.call("POST", &path, &olga, Some(&body));
        assert_eq!(status, 403, "{answer}");
        let mut as_other = body.clone();
        as_other["by"] = serde_json::json!("someone-else");
        let (status, answer) = serve.call("POST", &path, &anna, Some(&as_other));
        assert_eq!(status, 403, "{answer}");
        let mut both = body.clone();
        both["group"] = serde_json::json!("Finance");
        let (status, answer) = serve.call("POST", &path, &anna, Some(&both));
        assert_eq!(status, 400, "{answer}");

        let (status, answer) = serve.call("POST", &path, &anna, Some(&body));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["exceptions"][0]["granted_by"], "anna", "{answer}");
        assert_eq!(
            answer["exceptions"][0]["subject"],
            "user000007@fleet.example"
        );
        let (status, answer) = serve.call("POST", &path, &anna, Some(&body));
        assert_eq!(status, 409, "a name already active: {answer}");
        // The dashboard's rollout page lists it: who is exempt, why, who granted it, until when.
        let until = answer_until(&serve, &id, &anna);
        let bearer = format!("Bearer {anna}");
        let (status, page) = common::http(
            "GET",
            &format!("{}/ui/rollouts/{id}", serve.url),
            &[("Authorization", bearer.as_str())],
            b"",
        );
        assert_eq!(status, 200, "{page}");
        let row = page
            .split("<tr>")
            .find(|row| row.contains("<code>trip</code>"))
            .unwrap_or_else(|| panic!("no row for the exception: {page}"));
        assert!(
            row.contains("user <span class=\"text\">user000007@fleet.example</span>")
                && row.contains("travelling")
                && row.contains("anna at ")
                && row.contains(&format!("<time datetime=\"{until}\">")),
            "{row}"
        );

        let (status, answer) = serve.call(
            "DELETE",
            &format!("{path}/nothing"),
            &anna,
            Some(&serde_json::json!({"reason": "r"})),
        );
        assert_eq!(status, 409, "{answer}");
        // The CLI goes through the daemon holding the store.
        let out = pg.run(&[
            "exception",
            "revoke",
            &id,
            "trip",
            "--by",
            "dana",
            "--reason",
            "back early",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let (_, view) = serve.call("GET", &format!("/api/v1/rollouts/{id}"), &anna, None);
        assert_eq!(view["exceptions"], serde_json::json!([]), "{view}");
        let trail = pg.json(&["history", &id]);
        let revoked = trail
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "exception_revoked")
            .unwrap_or_else(|| panic!("{trail}"));
        assert_eq!(revoked["event"]["trigger"]["actor"], "dana");
    }
}

/// The end of the rollout's only active exception, as the API shows it.
fn answer_until(serve: &common::Serve, id: &str, token: &str) -> String {
    let (_, view) = serve.call("GET", &format!("/api/v1/rollouts/{id}"), token, None);
    view["exceptions"][0]["until"]
        .as_str()
        .unwrap_or_else(|| panic!("{view}"))
        .to_string()
}

on_both_stores! {
    /// An exception of a paused rollout ends at its time: on Graph its user leaves the enforced
    /// copy's exclusions during the pause, and nothing else the rollout would do is done.
    fn on_graph_a_paused_rollouts_exception_ends_at_its_time_and_its_user_is_excluded_no_more() {
        let (emulator, pg, id) = enforced_and_waiting_for_approval();
        let excluded_before = strings(&enforced_copy(&emulator)["users"]["excludeUsers"]);

        let upn = "user000042@contoso.onmicrosoft.com";
        let user_id = emulator.graph(SECRET, &format!("/v1.0/users/{upn}"))["id"]
            .as_str()
            .unwrap()
            .to_string();
        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "repair",
            "--user",
            upn,
            "--until",
            "1d",
            "--by",
            "dana",
            "--reason",
            "laptop at the repair shop",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        assert!(strings(&enforced_copy(&emulator)["users"]["excludeUsers"]).contains(&user_id));
        let until = pg.status(&id)["exceptions"][0]["until"]
            .as_str()
            .unwrap()
            .to_string();

        let out = pg.run(&["pause", &id, "--by", "carol", "--reason", "change freeze"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let paused_events = pg.status(&id)["events"].as_u64().unwrap();
        // Before its end, a run of the paused rollout changes nothing.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        assert_eq!(pg.status(&id)["events"].as_u64().unwrap(), paused_events);
        let writes = emulator.get("/_emulator/ledger")["value"]
            .as_array()
            .unwrap()
            .len();

        // The tenant's clock passes the exception's end while the rollout is paused.
        emulator.post(
            "/_emulator/clock",
            &serde_json::json!({"advanceBySeconds": 2 * 86_400}),
        );
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "paused", "{status}");
        assert_eq!(status["exceptions"], serde_json::json!([]), "{status}");
        assert!(
            status["pending_effects"].as_array().unwrap().is_empty(),
            "{status}"
        );
        assert_eq!(
            strings(&enforced_copy(&emulator)["users"]["excludeUsers"]),
            excluded_before,
            "the user is enforced again"
        );
        // Only the enforced copy was written, and the trail has the expiry and its reconcile only.
        let ledger = emulator.get("/_emulator/ledger");
        let new_writes: Vec<&Value> = ledger["value"].as_array().unwrap()[writes..]
            .iter()
            .collect();
        assert!(!new_writes.is_empty());
        assert!(
            new_writes.iter().all(|w| w["path"]
                .as_str()
                .unwrap()
                .contains("conditionalAccess/policies")),
            "{new_writes:?}"
        );
        let trail = notes(&pg, &id);
        let kinds: Vec<&str> = trail[paused_events as usize..]
            .iter()
            .map(|e| e["event"]["kind"]["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["exception_expired", "reconciled"], "{trail:?}");
        let expiry = &trail[paused_events as usize];
        let said = expiry["notes"].to_string();
        assert!(
            said.contains(&format!("exception `repair` expired at {until}")),
            "{said}"
        );
    }
}

on_both_stores! {
    /// Under `serve`, a paused rollout on a tenant whose clock runs on its own (the emulator's,
    /// a day a second) has its exception end at its time: the daemon waits until the tenant's clock
    /// reaches it and records the expiry; the rollout stays paused.
    fn under_serve_a_paused_rollouts_exception_ends_when_the_tenants_clock_reaches_it() {
        let emulator = Emulator::spawn(&[
            "--client-secret",
            SECRET,
            "--devices",
            "300",
            "--time-scale",
            "86400",
        ]);
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 1000.0, |t| t);
        let id = pg.start();
        let out = pg.run(&[
            "exception",
            "grant",
            &id,
            "trip",
            "--user",
            "user000042@contoso.onmicrosoft.com",
            "--until",
            "3d",
            "--by",
            "dana",
            "--reason",
            "travelling",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["pause", &id, "--by", "carol", "--reason", "change freeze"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let out = pg.run(&["token", "create", "--name", "vera", "--role", "viewer"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let vera = stdout(&out).trim().to_string();

        let serve = pg.serve();
        let view = || {
            serve
                .call("GET", &format!("/api/v1/rollouts/{id}"), &vera, None)
                .1
        };
        let until = view()["exceptions"][0]["until"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", view()))
            .to_string();
        let ended = common::eventually(std::time::Duration::from_secs(60), || {
            view()["exceptions"] == serde_json::json!([])
        });
        assert!(
            ended,
            "the exception never ended: {}\n{}",
            view(),
            serve.output()
        );
        let status = view();
        assert_eq!(status["status"], "paused", "{status}");
        let (_, history) = serve.call(
            "GET",
            &format!("/api/v1/rollouts/{id}/history"),
            &vera,
            None,
        );
        let expired = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "exception_expired")
            .unwrap_or_else(|| panic!("{history}"));
        assert!(
            expired["at"].as_str().unwrap() >= until.as_str(),
            "recorded before its end: {expired}"
        );
        // Nothing else was done while paused: the baseline was not even captured.
        assert!(
            history["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["event"]["kind"]["type"] != "baseline_captured"),
            "{history}"
        );
    }
}
