//! A rollout on a tenant other administrators configured for years, modelled by the emulator's
//! lived-in scenario on Microsoft's templates: phasegate changes only what it owns, never weakens
//! enforcement that is on, keeps the notify promise per device, stops on another admin's change,
//! lets one rollout own a policy, rolls several platforms out together, and waits for Multi Admin
//! Approval without writing anything twice. The real binary on both sides of a real socket.

mod common;

use std::collections::BTreeMap;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::{Value, json};

const DAY_SECS: i64 = 86_400;
const WINDOWS_POLICY: &str = "Windows 10/11 compliance baseline";
const CA_POLICY: &str = "Require compliant device for Office 365";

fn emulator(args: &[&str]) -> Emulator {
    let mut all = vec!["--client-secret", SECRET, "--ca-rate", "50"];
    all.extend_from_slice(args);
    Emulator::spawn(&all)
}

/// Every compliance policy (beta, with assignments and actions) and every Conditional Access
/// policy (v1.0), as the application reads them, keyed by display name.
fn tenant(emulator: &Emulator) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let policies = emulator.graph(
        SECRET,
        "/beta/deviceManagement/deviceCompliancePolicies?$expand=assignments,scheduledActionsForRule($expand=scheduledActionConfigurations)",
    );
    for p in policies["value"].as_array().unwrap() {
        out.insert(p["displayName"].as_str().unwrap().to_string(), p.clone());
    }
    let ca = emulator.graph(SECRET, "/v1.0/identity/conditionalAccess/policies");
    for p in ca["value"].as_array().unwrap() {
        out.insert(p["displayName"].as_str().unwrap().to_string(), p.clone());
    }
    out
}

fn group_id(emulator: &Emulator, name: &str) -> String {
    let state = emulator.get("/_emulator/state");
    state["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["displayName"] == name)
        .unwrap_or_else(|| panic!("no group {name}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What phasegate may own in an object: the All users target and the Break Glass exclusion it
/// adds, the block action's grace, its notification action, and its line in the description.
/// Everything else must be exactly as other admins left it.
fn not_owned(object: &Value, template: &str, break_glass: &str) -> Value {
    let mut object = object.clone();
    let map = object.as_object_mut().unwrap();
    for volatile in [
        "version",
        "lastModifiedDateTime",
        "modifiedDateTime",
        "@odata.context",
        "assignments@odata.context",
        "scheduledActionsForRule@odata.context",
    ] {
        map.remove(volatile);
    }
    if let Some(description) = map.get_mut("description")
        && let Some(text) = description.as_str()
    {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("phasegate: rollout "))
            .collect();
        *description = json!(kept.join("\n"));
    }
    if let Some(assignments) = map.get_mut("assignments") {
        let kept: Vec<Value> = assignments
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| {
                let t = &a["target"];
                let ty = t["@odata.type"].as_str().unwrap_or("");
                !(ty.ends_with("allLicensedUsersAssignmentTarget")
                    || (ty.ends_with("exclusionGroupAssignmentTarget")
                        && t["groupId"] == break_glass))
            })
            .map(|a| a["target"].clone())
            .collect();
        *assignments = json!(kept);
    }
    if let Some(rules) = map.get_mut("scheduledActionsForRule") {
        for rule in rules.as_array_mut().unwrap() {
            rule.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.contains("@odata.context"));
            let actions: Vec<Value> = rule["scheduledActionConfigurations"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| {
                    !(a["actionType"] == "notification" && a["notificationTemplateId"] == template)
                })
                .map(|a| {
                    let mut a = a.clone();
                    let m = a.as_object_mut().unwrap();
                    m.remove("id");
                    if m["actionType"] == "block" {
                        m.remove("gracePeriodHours");
                    }
                    a
                })
                .collect();
            rule["scheduledActionConfigurations"] = json!(actions);
        }
    }
    object
}

fn template_id(emulator: &Emulator, name: &str) -> String {
    let list = emulator.graph(
        SECRET,
        "/v1.0/deviceManagement/notificationMessageTemplates",
    );
    list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["displayName"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Asserts that nothing phasegate does not own changed since `before`.
fn assert_untouched(emulator: &Emulator, before: &BTreeMap<String, Value>, when: &str) {
    let template = template_id(emulator, "Compliance rollout - action required");
    let break_glass = group_id(emulator, "Break Glass");
    let now = tenant(emulator);
    let strip = |m: &BTreeMap<String, Value>| -> BTreeMap<String, Value> {
        m.iter()
            .map(|(k, v)| (k.clone(), not_owned(v, &template, &break_glass)))
            .collect()
    };
    let (before, now) = (strip(before), strip(&now));
    for (name, object) in &before {
        assert_eq!(
            now.get(name),
            Some(object),
            "{when}: `{name}` changed in what phasegate does not own"
        );
    }
    let added: Vec<&String> = now.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        added.iter().all(|k| k.ends_with("(phasegate enforced)")),
        "{when}: objects appeared: {added:?}"
    );
}

/// No write of the application removes an exclusion: Conditional Access PATCHes carry no
/// exclusion array at all (PATCH would replace it), every `assign` keeps each exclusion target
/// the policy had before the rollout, and the enforced copy excludes the emergency access.
fn assert_no_exclusion_removed(emulator: &Emulator, before: &BTreeMap<String, Value>) {
    let break_glass = group_id(emulator, "Break Glass");
    for entry in ledger(emulator).iter().filter(|e| e["actor"] != "admin") {
        let path = entry["path"].as_str().unwrap();
        let body = &entry["body"];
        if path.contains("conditionalAccess") && entry["method"] == "PATCH" {
            let users = &body["conditions"]["users"];
            for key in [
                "excludeUsers",
                "excludeGroups",
                "excludeRoles",
                "excludeGuestsOrExternalUsers",
            ] {
                assert!(users.get(key).is_none(), "a CA PATCH carried {key}: {body}");
            }
        }
        if path.contains("conditionalAccess") && entry["method"] == "POST" {
            let excluded = body["conditions"]["users"]["excludeGroups"]
                .as_array()
                .unwrap();
            assert!(excluded.contains(&json!(break_glass)), "{body}");
        }
        if path.ends_with("/assign") {
            let policy = path.split('/').nth(3).unwrap();
            let sent: Vec<&Value> = body["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| &a["target"])
                .collect();
            let had = before
                .values()
                .filter(|p| p["id"] == policy)
                .flat_map(|p| p["assignments"].as_array().cloned().unwrap_or_default());
            for kept in had.map(|a| a["target"].clone()) {
                let exclusion = kept["@odata.type"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("exclusionGroupAssignmentTarget");
                if exclusion {
                    assert!(
                        sent.iter().any(|t| t["groupId"] == kept["groupId"]
                            && t["@odata.type"] == kept["@odata.type"]),
                        "an assign dropped the exclusion {kept}: {body}"
                    );
                }
            }
        }
    }
}

fn ledger(emulator: &Emulator) -> Vec<Value> {
    emulator.get("/_emulator/ledger")["value"]
        .as_array()
        .unwrap()
        .clone()
}

fn app_writes(emulator: &Emulator) -> Vec<(String, String, String)> {
    ledger(emulator)
        .iter()
        .filter(|e| e["actor"] != "admin")
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
                e["bodySha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The plan stops for approval after report-only too, so the test can look at the tenant while
/// only report phases are applied.
fn stop_after_report_only(text: String) -> String {
    text.replacen(
        "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"",
        "min_reporting = \"95%\"\nmax_error_ratio = \"2%\"\napprovals = 1",
        1,
    )
}

fn run_until(pg: &Phasegate, id: &str, status: &str) {
    let out = pg.run(&["run", id]);
    assert_eq!(
        pg.status(id)["status"],
        status,
        "run exited {}:\n{}\n{}",
        code(&out),
        stdout(&out),
        stderr(&out)
    );
}

on_both_stores! {
    fn a_rollout_on_a_lived_in_tenant_changes_only_what_it_owns_and_never_weakens_enforcement() {
        let emulator = emulator(&["--scenario", "lived-in", "--devices", "3000"]);
        let before = tenant(&emulator);
        assert_eq!(before[CA_POLICY]["state"], "enabled");
        // Observed through the export (the default): the grace ends the earliest block is dated by
        // come from its `DeviceCompliance` report.
        let pg = Phasegate::with_plan(
            &emulator,
            "windows-baseline-graph.toml",
            50.0,
            stop_after_report_only,
        );
        let out = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("is already enabled: phasegate never changes it"),
            "{}",
            stderr(&out)
        );
        let id = stdout(&out).trim().to_string();

        // Only report phases are applied: no device is past its grace, nobody is blocked.
        run_until(&pg, &id, "waiting_approval");
        let status = pg.status(&id);
        assert_eq!(status["phases"][1]["state"], "awaiting_approval");
        assert_eq!(status["phases"][2]["state"], "pending");
        assert_untouched(&emulator, &before, "report phases");
        let windows = &tenant(&emulator)[WINDOWS_POLICY];
        let policy_id = windows["id"].as_str().unwrap();
        let statuses = emulator.graph(
            SECRET,
            &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy_id}/deviceStatuses"),
        );
        let now = emulator.get("/_emulator/clock")["now"]
            .as_str()
            .unwrap()
            .to_string();
        let failing: Vec<&Value> = statuses["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "nonCompliant")
            .collect();
        assert!(!failing.is_empty(), "the fleet has failing devices");
        for s in &failing {
            let until = s["complianceGracePeriodExpirationDateTime"]
                .as_str()
                .unwrap();
            assert!(
                until > now.as_str(),
                "{s} is past its grace during report phases"
            );
        }
        let observed = &status["phases"][1]["observation"];
        assert!(
            observed["in_grace"].as_u64().unwrap() > 0,
            "the gate counts them: {observed}"
        );
        assert_eq!(observed["blocked"], 0);
        // Dated from the tenant's grace ends: after the observation, within the grace held at
        // 8,760 h during report phases (not Intune's "never").
        let at = |t: &str| phasegate::domain::time::Timestamp::parse_rfc3339(t).unwrap();
        let (seen, earliest) = (
            at(observed["at"].as_str().unwrap()),
            at(observed["earliest_block"].as_str().unwrap()),
        );
        assert!(
            earliest > seen && earliest <= seen.plus(std::time::Duration::from_secs(8_760 * 3600)),
            "{observed}"
        );
        assert!(
            emulator.get("/_emulator/blocks")["value"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        // Through notify and enforce to the end.
        assert_eq!(code(&pg.run(&["approve", &id, "--by", "bob"])), 0);
        run_until(&pg, &id, "waiting_approval");
        assert_untouched(&emulator, &before, "notify");
        assert_eq!(code(&pg.run(&["approve", &id, "--by", "bob"])), 0);
        run_until(&pg, &id, "completed");
        assert_untouched(&emulator, &before, "completed");

        assert_no_exclusion_removed(&emulator, &before);
        // The enabled Conditional Access policy was never written, so never less than enabled.
        let writes = app_writes(&emulator);
        assert!(
            writes
                .iter()
                .all(|(_, path, _)| !path.contains("conditionalAccess")),
            "{writes:?}"
        );
        assert_eq!(tenant(&emulator)[CA_POLICY], before[CA_POLICY]);
        // Completing lets go of the ownership line.
        let description = tenant(&emulator)[WINDOWS_POLICY]["description"].clone();
        assert_eq!(description, before[WINDOWS_POLICY]["description"]);
    }
}

on_both_stores! {
    fn an_abort_mid_way_puts_back_exactly_what_was_there() {
        let emulator = emulator(&["--scenario", "lived-in", "--devices", "2000"]);
        let before = tenant(&emulator);
        let pg = Phasegate::with_plan(
            &emulator,
            "windows-baseline-graph.toml",
            50.0,
            stop_after_report_only,
        );
        let id = pg.start();
        run_until(&pg, &id, "waiting_approval");
        assert_ne!(tenant(&emulator)[WINDOWS_POLICY], before[WINDOWS_POLICY]);
        let out = pg.run(&["abort", &id, "--by", "alice", "--reason", "found a problem"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        run_until(&pg, &id, "aborted");
        let after = tenant(&emulator);
        for (name, object) in &before {
            let strip = |v: &Value| {
                let mut v = v.clone();
                let m = v.as_object_mut().unwrap();
                for k in ["version", "lastModifiedDateTime", "modifiedDateTime"] {
                    m.remove(k);
                }
                if let Some(rules) = m.get_mut("scheduledActionsForRule") {
                    for rule in rules.as_array_mut().unwrap() {
                        for a in rule["scheduledActionConfigurations"]
                            .as_array_mut()
                            .unwrap()
                        {
                            a.as_object_mut().unwrap().remove("id");
                        }
                    }
                }
                v
            };
            assert_eq!(strip(&after[name]), strip(object), "`{name}` after abort");
        }
        assert_eq!(after.len(), before.len());
        assert_no_exclusion_removed(&emulator, &before);
    }
}

on_both_stores! {
    fn nobody_is_blocked_before_being_told_plus_the_grace_also_after_a_rollback() {
        let emulator = emulator(&["--scenario", "lived-in", "--devices", "3000"]);
        let pg = Phasegate::new(&emulator, 50.0);
        let id = pg.start();
        run_until(&pg, &id, "waiting_approval");
        assert_eq!(pg.status(&id)["phases"][2]["state"], "awaiting_approval");
        let rolled_back_at = emulator.get("/_emulator/clock")["now"]
            .as_str()
            .unwrap()
            .to_string();
        // Back to report-only while owners are being told, then forward again.
        let out = pg.run(&[
            "rollback",
            &id,
            "--to",
            "report-only",
            "--by",
            "carol",
            "--reason",
            "helpdesk overloaded",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        run_until(&pg, &id, "rolled_back");
        assert_eq!(code(&pg.run(&["resume", &id, "--by", "carol"])), 0);
        run_until(&pg, &id, "waiting_approval");
        assert_eq!(pg.status(&id)["phases"][2]["state"], "awaiting_approval");
        assert_eq!(code(&pg.run(&["approve", &id, "--by", "bob"])), 0);
        run_until(&pg, &id, "completed");
        // Let a month of tenant time pass: every promise has come due.
        emulator.post(
            "/_emulator/clock",
            &json!({"advanceBySeconds": 30 * DAY_SECS}),
        );
        let template = template_id(&emulator, "Compliance rollout - action required");
        let notes = emulator.get("/_emulator/notifications")["value"]
            .as_array()
            .unwrap()
            .clone();
        let blocks = emulator.get("/_emulator/blocks")["value"]
            .as_array()
            .unwrap()
            .clone();
        assert!(!blocks.is_empty(), "enforcement blocks someone in the end");
        let seconds = |t: &str| {
            phasegate::domain::time::Timestamp::parse_rfc3339(t)
                .unwrap()
                .as_millis()
                / 1000
        };
        let rolled_back_at = seconds(&rolled_back_at);
        let mut failing_since_the_first_notify = 0;
        for block in &blocks {
            let device = &block["device"];
            let from = seconds(block["from"].as_str().unwrap());
            let told: Vec<i64> = notes
                .iter()
                .filter(|n| n["device"] == *device && n["templateId"] == template.as_str())
                .map(|n| seconds(n["at"].as_str().unwrap()))
                .filter(|at| *at <= from)
                .collect();
            failing_since_the_first_notify += usize::from(told.iter().any(|at| *at < rolled_back_at));
            let last = told
                .iter()
                .max()
                .unwrap_or_else(|| panic!("device {device} was blocked at {from} without being told"));
            assert!(
                from >= last + 7 * DAY_SECS,
                "device {device} told at {last}, blocked at {from}: {} days",
                (from - last) as f64 / DAY_SECS as f64
            );
        }
        assert!(
            failing_since_the_first_notify > 0,
            "some blocked devices were failing (and told) before the rollback"
        );
    }
}

on_both_stores! {
    fn another_admin_narrowing_the_enforcement_stops_the_rollout_until_a_person_decides() {
        let emulator = emulator(&["--scenario", "lived-in", "--devices", "2000"]);
        let pg = Phasegate::new(&emulator, 50.0);
        let id = pg.start();
        let out = pg.run(&["run", &id, "--once"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let before = tenant(&emulator);
        let ca = &before[CA_POLICY];
        let finance = group_id(&emulator, "Finance");
        let mut excluded = ca["conditions"]["users"]["excludeGroups"]
            .as_array()
            .unwrap()
            .clone();
        excluded.push(json!(finance));
        let answer = emulator.post(
            "/_emulator/as-admin",
            &json!({"method": "PATCH", "path": format!("/identity/conditionalAccess/policies/{}", ca["id"].as_str().unwrap()),
                    "body": {"conditions": {"users": {"excludeGroups": excluded}}}}),
        );
        assert_eq!(answer["status"], 204, "{answer}");
        let writes = app_writes(&emulator).len();

        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "drifted", "{status}");
        let drift = &status["drift"][0];
        assert_eq!(
            drift["object"],
            format!("Conditional Access policy `{CA_POLICY}`")
        );
        assert_eq!(drift["field"], "conditions.users");
        assert!(
            drift["found"].as_str().unwrap().contains(&finance),
            "{drift}"
        );
        assert!(
            !drift["expected"].as_str().unwrap().contains(&finance),
            "{drift}"
        );
        assert!(
            status["reason"]
                .as_str()
                .unwrap()
                .contains("changed by someone else")
        );
        // Nothing is written until a person decides, however often it runs.
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        assert_eq!(app_writes(&emulator).len(), writes);
        let out = pg.run(&["rollback", &id, "--by", "carol", "--reason", "x"]);
        assert_eq!(
            code(&out),
            2,
            "rollback must wait for the decision: {}",
            stderr(&out)
        );

        // Abort puts back phasegate's changes and keeps the other admin's.
        let out = pg.run(&[
            "abort",
            &id,
            "--by",
            "alice",
            "--reason",
            "scope changed under us",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        run_until(&pg, &id, "aborted");
        let after = tenant(&emulator);
        assert!(
            after[CA_POLICY]["conditions"]["users"]["excludeGroups"]
                .as_array()
                .unwrap()
                .contains(&json!(finance)),
            "the other admin's exclusion stays"
        );
        let pilot = group_id(&emulator, "Pilot IT");
        let windows = &after[WINDOWS_POLICY];
        assert!(
            windows["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["target"]["groupId"] == pilot.as_str())
        );
        assert!(!windows["assignments"].as_array().unwrap().iter().any(|a| {
            a["target"]["@odata.type"]
                .as_str()
                .unwrap()
                .ends_with("allLicensedUsersAssignmentTarget")
        }));
    }
}

on_both_stores! {
    fn drift_in_a_managed_member_is_reapplied_or_adopted_as_a_person_decides() {
        let emulator = emulator(&["--devices", "1500"]);
        let pg = Phasegate::new(&emulator, 50.0);
        let id = pg.start();
        assert_eq!(code(&pg.run(&["run", &id, "--once"])), 0);
        let ca = tenant(&emulator)[CA_POLICY].clone();
        let ca_path = format!(
            "/identity/conditionalAccess/policies/{}",
            ca["id"].as_str().unwrap()
        );
        let pilot = group_id(&emulator, "Pilot IT");
        assert_eq!(ca["conditions"]["users"]["includeGroups"], json!([pilot]));
        let narrow = || {
            let answer = emulator.post(
                "/_emulator/as-admin",
                &json!({"method": "PATCH", "path": ca_path, "body": {"conditions": {"users": {"includeGroups": []}}}}),
            );
            assert_eq!(answer["status"], 204, "{answer}");
        };
        narrow();
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        assert_eq!(pg.status(&id)["status"], "drifted");
        let out = pg.run(&[
            "drift",
            "reapply",
            &id,
            "--by",
            "dana",
            "--reason",
            "that was a mistake",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(code(&pg.run(&["run", &id, "--once"])), 0);
        assert_eq!(
            tenant(&emulator)[CA_POLICY]["conditions"]["users"]["includeGroups"],
            json!([pilot])
        );

        narrow();
        assert_eq!(code(&pg.run(&["run", &id])), 3);
        assert_eq!(pg.status(&id)["status"], "drifted");
        let out = pg.run(&[
            "drift",
            "adopt",
            &id,
            "--by",
            "dana",
            "--reason",
            "the identity team owns that",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let writes = app_writes(&emulator).len();
        assert_eq!(code(&pg.run(&["run", &id, "--once"])), 0);
        assert_eq!(
            tenant(&emulator)[CA_POLICY]["conditions"]["users"]["includeGroups"],
            json!([])
        );
        assert_eq!(
            app_writes(&emulator).len(),
            writes,
            "adopting writes nothing"
        );
        let history = pg.run(&["history", &id]);
        assert!(
            stdout(&history).contains("drift_resolved"),
            "{}",
            stdout(&history)
        );
    }
}

#[test]
fn one_rollout_owns_a_policy_also_across_stores() {
    let emulator = emulator(&["--devices", "1000"]);
    let pg = Phasegate::new(&emulator, 50.0);
    let first = pg.start();
    let out = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("rollout `{first}` already drives")),
        "{}",
        stderr(&out)
    );
    // Another store sees the ownership line phasegate wrote in the tenant.
    assert_eq!(code(&pg.run(&["run", &first, "--once"])), 0);
    let other = pg.second_store();
    let out = other.run(&["start", other.plan.to_str().unwrap(), "--by", "erin"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "managed by rollout `{first}` of another phasegate store"
        )),
        "{}",
        stderr(&out)
    );
}

on_both_stores! {
    fn windows_ios_and_android_roll_out_together_and_enforcement_covers_exactly_them() {
        let emulator = emulator(&["--devices", "3000"]);
        let pg = Phasegate::with_plan(&emulator, "multi-platform-graph.toml", 50.0, |t| t);
        let out = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(stderr(&out).contains("macos devices"), "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        pg.complete(&id);
        let status = pg.status(&id);
        let platforms: Vec<&str> = status["phases"][1]["observation"]["by_platform"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["platform"].as_str().unwrap())
            .collect();
        assert_eq!(platforms, ["windows", "ios", "android"]);
        let copy = &tenant(&emulator)[&format!("{CA_POLICY} (phasegate enforced)")];
        assert_eq!(copy["state"], "enabled");
        let mut covered: Vec<&str> = copy["conditions"]["platforms"]["includePlatforms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        covered.sort();
        assert_eq!(covered, ["android", "iOS", "windows"]);
        for name in [
            "Windows 10/11 compliance baseline",
            "iOS compliance baseline",
            "Android Enterprise work profile baseline",
        ] {
            let policy = &tenant(&emulator)[name];
            assert!(
                !policy["assignments"].as_array().unwrap().is_empty(),
                "{name} is assigned"
            );
        }
        assert!(
            tenant(&emulator)["macOS compliance baseline"]["assignments"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_no_exclusion_removed(&emulator, &BTreeMap::new());
    }
}

on_both_stores! {
    fn with_multi_admin_approval_the_rollout_waits_visibly_and_writes_each_change_once() {
        let calm = emulator(&["--devices", "1500"]);
        let calm_pg = Phasegate::new(&calm, 50.0);
        let calm_id = calm_pg.start();
        calm_pg.complete(&calm_id);

        let held = emulator(&["--devices", "1500", "--maa"]);
        let pg = Phasegate::new(&held, 50.0);
        let id = pg.start();
        let mut approved = 0;
        for _ in 0..40 {
            let out = pg.run(&["run", &id]);
            let status = pg.status(&id);
            match status["status"].as_str().unwrap() {
                "completed" => break,
                "waiting_tenant_approval" => {
                    assert_eq!(code(&out), 3);
                    let reference = status["tenant_approval"]["reference"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    assert!(
                        status["reason"].as_str().unwrap().contains(&reference),
                        "{status}"
                    );
                    let requests = held.get("/_emulator/approvals")["value"]
                        .as_array()
                        .unwrap()
                        .clone();
                    let request = requests
                        .iter()
                        .find(|r| r["id"] == reference.as_str())
                        .expect("the emulator has it");
                    assert_eq!(request["status"], "needsApproval");
                    let justification = request["requestJustification"].as_str().unwrap();
                    assert!(
                        justification.contains(&format!("phasegate rollout {id}")),
                        "{justification}"
                    );
                    // Running again while it waits asks, and writes nothing.
                    let writes = app_writes(&held).len();
                    assert_eq!(code(&pg.run(&["run", &id])), 3);
                    assert_eq!(app_writes(&held).len(), writes);
                    held.post(
                        &format!("/_emulator/approvals/{reference}/approve"),
                        &json!({"justification": "change 4711"}),
                    );
                    approved += 1;
                }
                "waiting_approval" => {
                    assert_eq!(
                        code(&pg.run(&["approve", &id, "--by", "bob", "--ticket", "CHG-4711"])),
                        0
                    );
                }
                other => panic!("{other}: {status}"),
            }
        }
        assert_eq!(pg.status(&id)["status"], "completed");
        assert!(
            approved >= 5,
            "every Intune write went through approval ({approved})"
        );
        // The same changes as without approval, each applied once, each approval used once (the
        // ownership lines differ: they name each store).
        let same = |writes: Vec<(String, String, String)>| -> Vec<(String, String, String)> {
            writes
                .into_iter()
                .map(|(m, p, d)| {
                    let claim = m == "PATCH";
                    (m, p, if claim { String::new() } else { d })
                })
                .collect()
        };
        assert_eq!(same(app_writes(&held)), same(app_writes(&calm)));
        let codes: Vec<String> = ledger(&held)
            .iter()
            .filter_map(|e| e["approval"].as_str().map(str::to_string))
            .collect();
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        assert_eq!(codes.len(), approved);
    }
}
