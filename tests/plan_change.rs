//! A plan change is itself a change, and freeze windows hold promotions: through the real binary
//! on the simulated fleet and its virtual clock, and through the daemon's API.

mod common;

use common::{Phasegate, Serve, code, stderr, stdout};
use serde_json::{Value, json};

fn phase<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no phase {id} in {status}"))
}

fn example() -> String {
    std::fs::read_to_string(format!(
        "{}/plans/windows-baseline.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The Windows example plan, edited by `edit`, written beside the test's store; started by
/// alice and run until it waits for a person.
fn waiting(pg: &Phasegate, edit: impl FnOnce(String) -> String) -> String {
    std::fs::write(&pg.plan, edit(example())).unwrap();
    let id = pg.start();
    let out = pg.run(&["run", &id]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(pg.status(&id)["status"], "waiting_approval");
    id
}

/// Every note of every event, in order.
fn trail(pg: &Phasegate, id: &str) -> Vec<String> {
    pg.json(&["history", id])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["notes"].as_array().cloned().unwrap_or_default())
        .map(|n| n.as_str().unwrap_or_default().to_string())
        .collect()
}

fn hash_of(text: &str) -> String {
    phasegate::domain::plan::hash_source(text)
}

on_both_stores! {
    /// Must show 7: lowering `approvals` in the plan of a rollout waiting for approval does not
    /// promote it; the change waits for approval under the plan in force, and the audit trail names
    /// who made it and who approved it, with both plans' hashes.
    fn lowering_approvals_does_not_promote_the_change_waits_for_approval_and_history_names_who() {
        let pg = Phasegate::offline();
        let id = waiting(&pg, |t| t);
        let before = pg.status(&id)["plan_hash"].as_str().unwrap().to_string();
        let lowered_text = example().replace("approvals = 1", "approvals = 0");
        let lowered = pg.dir.path().join("lowered.toml");
        std::fs::write(&lowered, &lowered_text).unwrap();
        let file = lowered.to_str().unwrap();

        let out = pg.run(&["plan", "apply", &id, file, "--by", "Carol"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stdout(&out).contains("carol applied plan")
                && stdout(&out).contains("`notify`: approvals 1 → 0"),
            "{}",
            stdout(&out)
        );
        // Not promoted, now or after a run: the plan in force still asks for an approval.
        for _ in 0..2 {
            let status = pg.status(&id);
            assert_eq!(status["status"], "waiting_approval", "{status}");
            assert_eq!(phase(&status, "notify")["state"], "awaiting_approval");
            assert_eq!(status["plan_hash"], before.as_str());
            let change = &status["plan_change"];
            assert_eq!(change["by"], "carol");
            assert_eq!(change["plan_hash"], hash_of(&lowered_text));
            assert_eq!(change["from_hash"], before.as_str());
            assert_eq!(change["weakens"][0], "`notify`: approvals 1 → 0");
            assert_eq!(change["rules_of"], "notify");
            assert_eq!(change["required"], 1);
            let out = pg.run(&["run", &id]);
            assert_eq!(code(&out), 3, "{}", stderr(&out));
        }
        let text = stdout(&pg.run(&["status", &id]));
        assert!(
            text.contains("plan change waiting for approval") && text.contains("applied by carol"),
            "{text}"
        );

        // Whoever applied it may not approve it, however the name is written; nor the starter.
        for (who, why) in [
            ("CAROL", "carol applied this plan change"),
            ("alice", "alice started this rollout"),
        ] {
            let out = pg.run(&["plan", "approve", &id, "--by", who]);
            assert_eq!(code(&out), 2, "{who}: {}", stdout(&out));
            assert!(stderr(&out).contains(why), "{}", stderr(&out));
        }
        // Another person approves it under the rules in force: it is adopted.
        let out = pg.run(&[
            "plan",
            "approve",
            &id,
            "--by",
            "dave",
            "--plan",
            &hash_of(&lowered_text)[..8],
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["plan_hash"], hash_of(&lowered_text));
        assert!(status["plan_change"].is_null(), "{status}");
        // The gate is judged again on the new plan, which needs nobody: the rollout completes.
        assert_eq!(phase(&status, "notify")["state"], "applying");
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(pg.status(&id)["status"], "completed");

        let notes = trail(&pg, &id);
        let short = |h: &str| h[..12].to_string();
        assert!(
            notes.iter().any(|n| n.starts_with(&format!(
                "carol applied plan {} in place of {}",
                short(&hash_of(&lowered_text)),
                short(&before)
            ))),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.starts_with(&format!(
                "plan {} → {}, applied by carol and approved by dave",
                short(&before),
                short(&hash_of(&lowered_text))
            ))),
            "{notes:?}"
        );
        let events = pg.json(&["history", &id]);
        let applied = events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "plan_change_proposed")
            .unwrap_or_else(|| panic!("{events}"));
        assert_eq!(applied["event"]["trigger"]["actor"], "Carol");
    }
}

on_both_stores! {
    /// The plan-edit half of must show 2: an approval given, then a plan change: the promotion does
    /// not happen, the rollout asks again, and `history` says why.
    fn an_approval_then_a_plan_change_voids_it_and_the_rollout_asks_again() {
        let pg = Phasegate::offline();
        let two = |t: String| t.replace("approvals = 1", "approvals = 2");
        let id = waiting(&pg, two);
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let before = pg.status(&id)["plan_hash"].as_str().unwrap().to_string();
        assert_eq!(phase(&pg.status(&id), "notify")["approvals"]["have"], 1);

        // A change that weakens nothing (a tighter gate) is adopted at once, named.
        let tighter = two(example()).replace("max_hold = \"14d\"", "max_hold = \"10d\"");
        let file = pg.dir.path().join("tighter.toml");
        std::fs::write(&file, &tighter).unwrap();
        let out = pg.run(&[
            "plan",
            "apply",
            &id,
            file.to_str().unwrap(),
            "--by",
            "carol",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["plan_hash"], hash_of(&tighter));
        let notify = phase(&status, "notify");
        assert_eq!(notify["approvals"]["have"], 0, "{notify}");
        assert_ne!(notify["state"], "promoted");

        // A second approval now does not promote: the first one is gone.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval");
        assert!(
            status["reason"]
                .as_str()
                .unwrap()
                .contains("needs 2 more approvals"),
            "{status}"
        );
        let notes = trail(&pg, &id);
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("approval of `notify` by bob void")
                    && n.contains(&format!("for plan {}", &before[..12]))
                    && n.ends_with("the plan changed")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("applied by carol; it weakens nothing")),
            "{notes:?}"
        );
    }
}

on_both_stores! {
    /// A plan file edited behind phasegate's back is reported in `status` and `history`, with a
    /// warning, and never adopted.
    fn a_plan_file_edited_behind_phasegates_back_is_reported_not_adopted() {
        let pg = Phasegate::offline();
        let id = waiting(&pg, |t| t);
        let before = pg.status(&id)["plan_hash"].as_str().unwrap().to_string();
        let lowered = example().replace("approvals = 1", "approvals = 0");
        std::fs::write(&pg.plan, &lowered).unwrap();

        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval", "{status}");
        assert_eq!(status["plan_hash"], before.as_str());
        assert_eq!(phase(&status, "notify")["state"], "awaiting_approval");
        assert_eq!(status["plan_file_changed"]["plan_hash"], hash_of(&lowered));
        let text = stdout(&pg.run(&["status", &id]));
        assert!(
            text.contains("was changed outside phasegate") && text.contains("it is not adopted"),
            "{text}"
        );
        // Once recorded, another run adds nothing.
        let events = pg.json(&["history", &id]).as_array().unwrap().len();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        assert_eq!(pg.json(&["history", &id]).as_array().unwrap().len(), events);
        let notes = trail(&pg, &id);
        assert!(
            notes.iter().any(|n| n.starts_with("warning: the plan file")
                && n.contains("was changed outside phasegate")),
            "{notes:?}"
        );
        // Applied by a person, it is a change like any other: it waits for approval.
        let out = pg.run(&[
            "plan",
            "apply",
            &id,
            pg.plan.to_str().unwrap(),
            "--by",
            "carol",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert!(status["plan_file_changed"].is_null(), "{status}");
        assert_eq!(status["plan_change"]["by"], "carol");
        assert_eq!(status["status"], "waiting_approval");
    }
}

on_both_stores! {
    /// Must show 3: a promotion due inside a freeze window (Friday 12:00 to Monday 06:00
    /// Europe/Berlin) waits until the window ends, on the simulator's virtual clock; `status` says
    /// until when.
    fn a_promotion_due_inside_a_freeze_window_waits_until_the_window_ends() {
        let pg = Phasegate::offline();
        // The simulated tenant's clock starts on Monday 2026-01-05 08:00 UTC: `report-only`
        // (3 days' soak from Wednesday) is due on Saturday morning, inside the window.
        let id = waiting(&pg, |t| {
            t.replace(
                "[[phase]]\nid = \"pilot\"",
                "[[freeze]]\nname = \"weekend\"\ntime_zone = \"Europe/Berlin\"\nweekly = { from = \"fri 12:00\", to = \"mon 06:00\" }\n\n[[phase]]\nid = \"pilot\"",
            )
            .replacen(
                "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"",
                "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"\napprovals = 1",
                1,
            )
        });
        let status = pg.status(&id);
        assert_eq!(phase(&status, "report-only")["state"], "awaiting_approval");
        assert_eq!(
            status["freeze_windows"][0],
            "weekend: every Fri 12:00 to Mon 06:00 (Europe/Berlin)"
        );

        // Approved on Saturday: due, and frozen until Monday 06:00 in Berlin (05:00 UTC).
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "running", "{status}");
        assert_eq!(phase(&status, "report-only")["state"], "soaking");
        assert_eq!(
            status["reason"],
            "the promotion of `report-only` waits for freeze window `weekend` until 2026-01-12T05:00:00Z (Mon 2026-01-12 06:00 Europe/Berlin)"
        );
        assert_eq!(status["frozen"]["until"], "2026-01-12T05:00:00Z");
        let text = stdout(&pg.run(&["status", &id]));
        assert!(text.contains("frozen: freeze window `weekend`"), "{text}");

        // The runner sleeps until the window ends (virtual time), then promotes.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        let report_only = phase(&status, "report-only");
        assert_eq!(report_only["state"], "promoted");
        assert_eq!(
            report_only["promoted_at"], "2026-01-12T05:00:00Z",
            "{status}"
        );
        assert!(status["frozen"].is_null());
        let notes = trail(&pg, &id);
        assert!(
            notes.iter().any(|n| n.starts_with(
                "the promotion of `report-only` is due, but freeze window `weekend` holds promotions until 2026-01-12T05:00:00Z"
            )),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n == "freeze window `weekend` no longer holds promotions"),
            "{notes:?}"
        );
    }
}

on_both_stores! {
    /// A person the window names lets a due promotion through a freeze, with a reason; anyone else
    /// is refused; the override is in `history`.
    fn a_named_person_overrides_a_freeze_and_the_override_is_recorded() {
        let pg = Phasegate::offline();
        let id = waiting(&pg, |t| {
            t.replace(
                "[[phase]]\nid = \"pilot\"",
                "[approvers]\ncab = [\"Dora\"]\n\n[[freeze]]\nname = \"weekend\"\ntime_zone = \"Europe/Berlin\"\nweekly = { from = \"fri 12:00\", to = \"mon 06:00\" }\noverride_groups = [\"cab\"]\n\n[[phase]]\nid = \"pilot\"",
            )
            .replacen(
                "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"",
                "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"\napprovals = 1",
                1,
            )
        });
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(pg.status(&id)["frozen"].is_object());
        let out = pg.run(&[
            "freeze", "override", &id, "--by", "bob", "--reason", "urgent",
        ]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains("bob may not override freeze window `weekend`; who may: group cab"),
            "{}",
            stderr(&out)
        );
        let out = pg.run(&[
            "freeze",
            "override",
            &id,
            "--by",
            "DORA",
            "--reason",
            "CAB-7 security fix",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(
            phase(&status, "report-only")["state"],
            "promoted",
            "{status}"
        );
        assert!(status["frozen"].is_null());
        let notes = trail(&pg, &id);
        assert!(
            notes.iter().any(|n| n.starts_with(
                "dora overrides freeze window `weekend` until 2026-01-12T05:00:00Z (Mon 2026-01-12 06:00 Europe/Berlin): CAB-7 security fix"
            )),
            "{notes:?}"
        );
    }
}

on_both_stores! {
    /// Through the daemon's API the identity is the token's: an operator applies a weakening plan,
    /// an approver approves it, and the trail names both.
    fn through_the_api_a_plan_change_is_applied_and_approved_by_the_tokens_identities() {
        let dir = tempfile::tempdir().unwrap();
        let store = common::stores::Location::new(dir.path());
        let serve = Serve::start(&store);
        let cli = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_phasegate"))
                .args(args)
                .env("PHASEGATE_STORE", &store)
                .env_remove("RUST_LOG")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap()
        };
        let token = |name: &str, role: &str| {
            let out = cli(&["token", "create", "--name", name, "--role", role]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            stdout(&out).trim().to_string()
        };
        let (operator, approver, viewer) = (
            token("olga", "operator"),
            token("dave", "approver"),
            token("vic", "viewer"),
        );
        let (status, started) = serve.call(
            "POST",
            "/api/v1/rollouts",
            &operator,
            Some(&json!({"plan": example(), "id": "api-1", "file": "windows.toml"})),
        );
        assert_eq!(status, 201, "{started}");
        let wait_for = |what: &dyn Fn(&Value) -> bool| {
            for _ in 0..600 {
                let (_, view) = serve.call("GET", "/api/v1/rollouts/api-1", &viewer, None);
                if what(&view) {
                    return view;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            panic!("timed out: {}", serve.output());
        };
        wait_for(&|v| v["status"] == "waiting_approval");

        let lowered = example().replace("approvals = 1", "approvals = 0");
        let body = json!({"plan": lowered, "file": "windows.toml", "reason": "CAB-12"});
        let (status, answer) = serve.call("POST", "/api/v1/rollouts/api-1/plan", &viewer, Some(&body));
        assert_eq!(status, 403, "{answer}");
        let (status, answer) = serve.call(
            "POST",
            "/api/v1/rollouts/api-1/plan",
            &operator,
            Some(&json!({"plan": lowered, "by": "mallory"})),
        );
        assert_eq!(status, 403, "a token acts as itself: {answer}");
        let (status, answer) = serve.call(
            "POST",
            "/api/v1/rollouts/api-1/plan",
            &operator,
            Some(&body),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["plan_change"]["by"], "olga");
        assert_eq!(answer["status"], "waiting_approval");
        // An operator may not approve it; the approver does.
        let (status, _) = serve.call(
            "POST",
            "/api/v1/rollouts/api-1/plan/approve",
            &operator,
            Some(&json!({})),
        );
        assert_eq!(status, 403);
        let (status, answer) = serve.call(
            "POST",
            "/api/v1/rollouts/api-1/plan/approve",
            &approver,
            Some(&json!({})),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["plan_hash"], hash_of(&lowered), "{answer}");
        let done = wait_for(&|v| v["status"] == "completed");
        assert_eq!(done["plan_hash"], hash_of(&lowered));
        let (_, history) = serve.call("GET", "/api/v1/rollouts/api-1/history", &viewer, None);
        let notes: Vec<String> = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["notes"].as_array().cloned().unwrap_or_default())
            .map(|n| n.as_str().unwrap_or_default().to_string())
            .collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("applied by olga and approved by dave")),
            "{notes:?}"
        );
        drop(serve);
    }
}
