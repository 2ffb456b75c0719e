//! Change approval through the real binary on the simulated fleet: who may approve, how many,
//! separation of duties, names compared as people, and approvals that expire on the
//! simulator's virtual clock.

mod common;

use common::{Phasegate, code, stderr, stdout};
use serde_json::Value;

fn phase<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no phase {id} in {status}"))
}

/// The Windows example plan, edited by `edit`, written beside the test's store; started by alice.
fn started(pg: &Phasegate, edit: impl FnOnce(String) -> String) -> String {
    let text = std::fs::read_to_string(format!(
        "{}/plans/windows-baseline.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    std::fs::write(&pg.plan, edit(text)).unwrap();
    pg.start()
}

/// What the audit trail says, every note of every event, in order.
fn trail(pg: &Phasegate, id: &str) -> Vec<String> {
    pg.json(&["history", id])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["notes"].as_array().cloned().unwrap_or_default())
        .map(|n| n.as_str().unwrap_or_default().to_string())
        .collect()
}

on_both_stores! {
    fn a_two_approver_phase_needs_two_people_other_than_the_starter() {
        let pg = Phasegate::offline();
        let id = started(&pg, |t| t.replace("approvals = 1", "approvals = 2"));
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        assert_eq!(pg.status(&id)["status"], "waiting_approval");

        // One approval leaves it waiting.
        let out = pg.run(&["approve", &id, "--by", "bob", "--ticket", "CHG-1"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval");
        let approvals = &phase(&status, "notify")["approvals"];
        assert_eq!(approvals["have"], 1);
        assert_eq!(approvals["required"], 2);
        assert_eq!(approvals["anyone"], true);
        assert_eq!(approvals["barred"][0]["who"], "alice");
        assert_eq!(approvals["barred"][0]["why"], "started this rollout");
        assert!(
            status["reason"]
                .as_str()
                .unwrap()
                .contains("needs 1 more approval"),
            "{status}"
        );

        // The starter is refused, however the name is written; so is the same approver again.
        for alice in ["alice", "ALICE", " Alice "] {
            let out = pg.run(&["approve", &id, "--by", alice]);
            assert_eq!(code(&out), 2, "{alice}: {}", stdout(&out));
            assert!(
                stderr(&out).contains(
                    "separation of duties: alice started this rollout and cannot approve `notify`; someone else must"
                ),
                "{}",
                stderr(&out)
            );
        }
        let out = pg.run(&["approve", &id, "--by", "BOB"]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains("bob has already approved"),
            "{}",
            stderr(&out)
        );
        // Every refused approval is in the audit trail: who tried, and why it was refused.
        let history = pg.json(&["history", &id]);
        let refused: Vec<(String, String)> = history
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"]["kind"]["type"] == "approval_refused")
            .map(|e| {
                (
                    e["event"]["trigger"]["actor"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    e["event"]["kind"]["why"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(refused.len(), 4, "{history}");
        let who: Vec<&str> = refused.iter().map(|(who, _)| who.as_str()).collect();
        assert_eq!(
            who,
            ["alice", "ALICE", "Alice", "BOB"],
            "the name as it was given"
        );
        assert!(
            refused[..3]
                .iter()
                .all(|(_, why)| why.contains("separation of duties")),
            "{refused:?}"
        );
        assert!(
            refused[3].1.contains("bob has already approved"),
            "{refused:?}"
        );
        assert_eq!(pg.status(&id)["status"], "waiting_approval");
        // Nobody is not a person: an empty name, given or defaulted, exits 2 and records nothing.
        let events = pg.json(&["history", &id]).as_array().unwrap().len();
        for by in ["", "   "] {
            let out = pg.run(&["approve", &id, "--by", by]);
            assert_eq!(code(&out), 2, "{by:?}");
            assert!(
                stderr(&out).contains("--by: a person's name must not be empty"),
                "{}",
                stderr(&out)
            );
            let plan = pg.plan.to_str().unwrap();
            for args in [
                vec!["pause", &id, "--by", by],
                vec!["reject", &id, "--by", by, "--reason", "no"],
                vec!["start", plan, "--by", by, "--id", "another"],
            ] {
                let out = pg.run(&args);
                assert_eq!(code(&out), 2, "{args:?}");
                assert!(
                    stderr(&out).contains("--by: a person's name must not be empty"),
                    "{args:?}: {}",
                    stderr(&out)
                );
            }
        }
        assert_eq!(pg.json(&["history", &id]).as_array().unwrap().len(), events);
        assert_eq!(pg.status(&id)["status"], "waiting_approval");

        // A second, distinct approver promotes it: the OS user, named without `--by`.
        let out = pg
            .command(&["approve", &id, "--ticket", "CHG-1"])
            .env("USER", "Carol")
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(phase(&status, "notify")["state"], "promoted");
        let granted = &phase(&status, "notify")["approvals"]["granted"];
        assert_eq!(granted[0]["by"], "bob");
        assert_eq!(granted[1]["by"], "carol");
        assert_eq!(granted[1]["ticket"], "CHG-1");
        let notes = trail(&pg, &id);
        assert!(
            notes.iter().any(|n| n.contains("approved by bob, carol")),
            "{notes:?}"
        );
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(pg.status(&id)["status"], "completed");
    }
}

on_both_stores! {
    fn named_approvers_and_a_ticket_pattern_are_enforced_and_shown() {
        let pg = Phasegate::offline();
        let id = started(&pg, |t| {
            t.replace(
                "[provider]",
                "[approvers]\nchange-board = [\"Bob@Contoso.com\", \"carol@contoso.com\"]\n\n[provider]",
            )
            .replace(
                "approvals = 1",
                "approvals = 1\napprover_groups = [\"change-board\"]\nticket_pattern = \"CHG[0-9]{7}\"",
            )
        });
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        let out = pg.run(&[
            "approve",
            &id,
            "--by",
            "dave@contoso.com",
            "--ticket",
            "CHG0000001",
        ]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains(
                "dave@contoso.com may not approve phase `notify`; its approvers are: group change-board"
            ),
            "{}",
            stderr(&out)
        );
        let out = pg.run(&["approve", &id, "--by", "bob@contoso.com", "--ticket", "42"]);
        assert_eq!(code(&out), 2);
        assert!(stderr(&out).contains("does not match"), "{}", stderr(&out));
        let text = stdout(&pg.run(&["status", &id]));
        assert!(text.contains("may approve: group change-board"), "{text}");
        assert!(
            text.contains("may not: alice (started this rollout)"),
            "{text}"
        );
        assert!(
            text.contains("ticket matching `CHG[0-9]{7}` required"),
            "{text}"
        );
        let status = pg.status(&id);
        let approvals = &phase(&status, "notify")["approvals"];
        assert_eq!(approvals["eligible"][0], "bob@contoso.com");
        assert_eq!(approvals["ticket_pattern"], "CHG[0-9]{7}");

        let out = pg.run(&[
            "approve",
            &id,
            "--by",
            "BOB@contoso.com",
            "--ticket",
            "CHG0000001",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(phase(&pg.status(&id), "notify")["state"], "promoted");
    }
}

on_both_stores! {
    fn an_approval_that_expired_before_the_gate_passed_does_not_count() {
        let pg = Phasegate::offline();
        // Two pilots side by side: pilot-it (2 days) and pilot-field (3 days) each need an
        // approval; pilot-field's last an hour.
        let text = std::fs::read_to_string(format!(
            "{}/plans/ios-parallel-pilots.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .replace(
            "min_reporting = \"90%\"\nmax_errors = 2",
            "min_reporting = \"90%\"\nmax_errors = 2\napprovals = 1",
        )
        .replace(
            "min_reporting = \"85%\"\nmax_errors = 2",
            "min_reporting = \"85%\"\nmax_errors = 2\napprovals = 1\napproval_expires_after = \"1h\"",
        );
        std::fs::write(&pg.plan, text).unwrap();
        let id = pg.start();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(phase(&status, "pilot-it")["state"], "awaiting_approval");
        assert_eq!(
            phase(&status, "pilot-field")["state"],
            "soaking",
            "{status}"
        );

        // pilot-field is approved while it soaks: accepted, counted for an hour.
        let out = pg.run(&[
            "approve",
            &id,
            "--by",
            "bob",
            "--phase",
            "pilot-field",
            "--ticket",
            "CHG-9",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        let approvals = &phase(&status, "pilot-field")["approvals"];
        assert!(
            approvals["granted"][0]["expires_at"].is_string(),
            "{approvals}"
        );
        assert_eq!(approvals["expires_after"], "1h");
        assert_eq!(approvals["have"], 1);
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(phase(&pg.status(&id), "pilot-it")["state"], "promoted");

        // The simulator's clock moves past the expiry and on to the gate: it no longer counts.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval", "{status}");
        let field = phase(&status, "pilot-field");
        assert_eq!(field["state"], "awaiting_approval");
        assert_eq!(field["approvals"]["have"], 0);
        assert_eq!(field["approvals"]["granted"], Value::Array(Vec::new()));
        let notes = trail(&pg, &id);
        let expired = notes
            .iter()
            .position(|n| n.starts_with("approval of `pilot-field` by bob expired"))
            .unwrap_or_else(|| panic!("no expiry in {notes:#?}"));
        assert!(
            notes[expired].contains("ticket CHG-9"),
            "{}",
            notes[expired]
        );
        let passed = notes
            .iter()
            .position(|n| n.starts_with("gate passed for `pilot-field`"))
            .unwrap_or_else(|| panic!("the gate never passed: {notes:#?}"));
        assert!(
            expired < passed,
            "expired after the gate passed: {notes:#?}"
        );
        let text = stdout(&pg.run(&["history", &id]));
        assert!(text.contains("by bob expired"), "{text}");

        // Asked again, a fresh approval promotes.
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(phase(&pg.status(&id), "pilot-field")["state"], "promoted");
    }
}

on_both_stores! {
    fn a_paused_rollout_applies_nothing_an_approval_committed_until_it_is_resumed() {
        let pg = Phasegate::offline();
        let id = started(&pg, |t| t);
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        // The approval commits the promotion: `enforce` is to be applied.
        let out = pg.run(&["approve", &id, "--by", "bob"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(phase(&status, "enforce")["state"], "applying");
        assert!(
            status["pending_effects"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e.as_str().unwrap().contains("reconcile")),
            "{status}"
        );
        let out = pg.run(&["pause", &id, "--by", "carol", "--reason", "change freeze"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        // The pause says what the pending change waits for, not that `run` would make it.
        let said = stdout(&out);
        assert!(
            said.contains(&format!(
                "the pending change waits for `phasegate resume {id}`"
            )) && !said.contains("carries out the change"),
            "{said}"
        );
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "paused");
        assert_eq!(phase(&status, "enforce")["state"], "applying", "{status}");
        assert_eq!(phase(&status, "enforce")["applied_at"], Value::Null);

        assert_eq!(code(&pg.run(&["resume", &id, "--by", "carol"])), 0);
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(pg.status(&id)["status"], "completed");
    }
}

/// Two phases side by side on the simulated Windows fleet: `pilot` (two days, one approval) and
/// `field`, which notifies owners, soaks four days and binds its approvals to their evidence.
const DRIFTING: &str = r#"
[rollout]
name = "drifting"
observe_every = "6h"

[policy]
compliance = "Windows 10/11 compliance baseline"
platform = "windows"

[provider]
kind = "simulator"
devices = 10000
seed = 7

[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
min_soak = "2d"

[phase.gate]
min_reporting = "85%"
approvals = 1

[[phase]]
id = "field"
mode = "notify"
include = ["Pilot Field"]
after = []
grace = "1d"
min_soak = "4d"

[phase.gate]
min_reporting = "50%"
max_noncompliant_ratio = "50%"
approvals = 1
approval_tolerance = "0.5%"

[[phase]]
id = "everyone"
mode = "notify"
include = ["All Users"]
after = ["pilot", "field"]
grace = "7d"
min_soak = "1d"
"#;

on_both_stores! {
    fn an_approval_whose_evidence_drifted_past_the_tolerance_does_not_promote_and_history_says_why() {
        let pg = Phasegate::offline();
        std::fs::write(&pg.plan, DRIFTING).unwrap();
        let id = pg.start();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(phase(&status, "pilot")["state"], "awaiting_approval");
        assert_eq!(phase(&status, "field")["state"], "soaking", "{status}");

        // bob approves `field` on what it shows now; owners go on fixing their devices.
        let seen = phase(&status, "field")["observation"].clone();
        let out = pg.run(&[
            "approve", &id, "--by", "bob", "--phase", "field", "--ticket", "CHG-3",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let status = pg.status(&id);
        let granted = &phase(&status, "field")["approvals"]["granted"][0];
        assert_eq!(granted["evidence_observed_at"], seen["at"]);
        assert_eq!(granted["evidence_digest"].as_str().unwrap().len(), 64);
        assert_eq!(code(&pg.run(&["approve", &id, "--by", "bob"])), 0);

        // When `field` passes its gate the counts have moved: the approval is void, it asks again.
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval", "{status}");
        let field = phase(&status, "field");
        assert_eq!(field["state"], "awaiting_approval");
        assert_eq!(field["approvals"]["have"], 0);
        assert_ne!(field["observation"]["noncompliant"], seen["noncompliant"]);
        let reason = status["reason"].as_str().unwrap();
        assert!(
            reason.contains(
                "bob's approval is void: the evidence moved past the plan's tolerance of 0.5% since it was given: failing"
            ),
            "{reason}"
        );
        let notes = trail(&pg, &id);
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("approval of `field` by bob void (given")
                    && n.contains("ticket CHG-3")),
            "{notes:#?}"
        );
        // Approved again on the evidence now, it promotes.
        let out = pg.run(&["approve", &id, "--by", "bob", "--phase", "field"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(phase(&pg.status(&id), "field")["state"], "promoted");
    }
}

/// A started rollout whose first approval is asked of the directory group `IT` (approver group
/// `board`), on the simulator.
fn started_with_directory_approvers() -> (Phasegate, String) {
    let pg = Phasegate::offline();
    let id = started(&pg, |t| {
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
    (pg, id)
}

on_both_stores! {
    /// An approver group the directory has (`[directory_approvers]`): its members are read when the
    /// phase is observed and starts waiting, and the approval is judged against that snapshot with
    /// no directory call; a non-member is refused naming the snapshot, a member approves.
    fn a_directory_approver_group_is_judged_against_the_snapshot_the_rollout_read() {
        let (pg, id) = started_with_directory_approvers();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        assert_eq!(pg.status(&id)["status"], "waiting_approval");
        let history = pg.json(&["history", &id]);
        let reads: Vec<&Value> = history
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"]["kind"]["type"] == "approvers_read")
            .collect();
        assert!(!reads.is_empty(), "the directory was never read");
        let board = &reads.last().unwrap()["event"]["kind"]["groups"]["board"];
        assert_eq!(board["directory"], "IT");
        let members: Vec<&str> = board["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(members.len() > 100, "{board}");
        let member = members
            .iter()
            .find(|m| m.ends_with("@contoso.com"))
            .expect("a member with a mail address");

        let out = pg.run(&["approve", &id, "--by", "mallory"]);
        assert_eq!(code(&out), 2, "{}", stdout(&out));
        let said = stderr(&out);
        assert!(
            said.contains("mallory may not approve phase `notify`")
                && said.contains("directory group board, `IT` as read ")
                && said.contains("from simulator")
                && said.contains("mallory is not among its members"),
            "{said}"
        );
        assert_eq!(pg.status(&id)["status"], "waiting_approval");

        let out = pg.run(&["approve", &id, "--by", &member.to_uppercase()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_ne!(pg.status(&id)["status"], "waiting_approval");
        let notes = trail(&pg, &id);
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("{member} approved `notify`"))
                    && n.contains("a member of group board, `IT` as read")),
            "{notes:?}"
        );
    }
}

on_both_stores! {
    /// `approve --digest`: the approval is for the evidence that digest names; a digest the
    /// rollout's evidence no longer has is refused, saying the evidence moved, and nothing is
    /// recorded; the digest `approvals` shows is accepted and kept with the approval.
    fn an_approval_pinned_to_a_digest_the_evidence_no_longer_has_is_refused() {
        let pg = Phasegate::offline();
        let id = started(&pg, |t| t);
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let pending = pg.json(&["approvals", &id]);
        let digest = pending[0]["digest"].as_str().unwrap().to_string();
        assert_eq!(digest.len(), 64);

        let out = pg.run(&["approve", &id, "--by", "bob", "--digest", "abc"]);
        assert_eq!(code(&out), 2, "{}", stdout(&out));
        assert!(
            stderr(&out).contains("--digest must be a digest"),
            "{}",
            stderr(&out)
        );
        let stale = "0".repeat(64);
        let out = pg.run(&["approve", &id, "--by", "bob", "--digest", &stale]);
        assert_eq!(code(&out), 2, "{}", stdout(&out));
        let said = stderr(&out);
        assert!(
            said.contains("the evidence of `notify` moved since it was shown")
                && said.contains(&stale)
                && said.contains(&digest),
            "{said}"
        );
        assert_eq!(pg.status(&id)["status"], "waiting_approval");

        let out = pg.run(&["approve", &id, "--by", "bob", "--digest", &digest]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_ne!(pg.status(&id)["status"], "waiting_approval");
        let history = pg.json(&["history", &id]);
        let granted = history
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["kind"]["type"] == "approval_granted")
            .unwrap();
        assert_eq!(granted["event"]["kind"]["digest"], digest.as_str());
    }
}

on_both_stores! {
    /// `status` and `approvals` (text and JSON) say when the rollout last read each directory
    /// approver group, from where, and how long ago: approvals are judged against that snapshot.
    fn status_and_approvals_show_when_the_approver_snapshot_was_read_and_its_age() {
        let (pg, id) = started_with_directory_approvers();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        let history = pg.json(&["history", &id]);
        let read = history
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["event"]["kind"]["type"] == "approvers_read")
            .expect("the directory was read");
        let recorded = &read["event"]["kind"]["groups"]["board"];
        // The trail keeps the instant in milliseconds.
        let read_ms = recorded["read_at"].as_u64().expect("read_at");
        let members = recorded["members"].as_array().unwrap().len();

        let status = pg.status(&id);
        let snapshots = status["approver_snapshots"].as_array().unwrap();
        assert_eq!(snapshots.len(), 1, "{status}");
        let snapshot = &snapshots[0];
        assert_eq!(snapshot["group"], "board");
        assert_eq!(snapshot["directory"], "IT");
        let source = snapshot["source"].as_str().unwrap().to_string();
        assert!(source.starts_with("simulator"), "{snapshot}");
        let read_at = snapshot["read_at"].as_str().unwrap().to_string();
        assert_eq!(snapshot["members"], members);
        assert!(snapshot["error"].is_null());
        // Its age is counted on the rollout's clock, up to its latest event at least.
        let secs = |t: &str| {
            humantime::parse_rfc3339(t)
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert_eq!(secs(&read_at), read_ms / 1000, "{snapshot}");
        let updated = secs(status["updated_at"].as_str().unwrap());
        let age = snapshot["age_seconds"].as_u64().unwrap();
        assert!(age >= updated - secs(&read_at), "{snapshot} {status}");
        assert!(!snapshot["age"].as_str().unwrap().is_empty());

        let pending = pg.json(&["approvals", &id]);
        let shown = &pending[0]["approver_snapshots"];
        assert_eq!(shown.as_array().unwrap().len(), 1, "{pending}");
        assert_eq!(shown[0]["group"], "board");
        assert_eq!(shown[0]["read_at"], read_at.as_str());
        assert_eq!(shown[0]["age_seconds"], age);

        let line = format!("approver group board: `IT` read from {source} at {read_at} (");
        let text = stdout(&pg.run(&["status", &id]));
        assert!(
            text.contains(&line) && text.contains(&format!("ago): {members} member identities")),
            "{text}"
        );
        let text = stdout(&pg.run(&["approvals", &id]));
        assert!(text.contains(&line), "{text}");
    }
}
