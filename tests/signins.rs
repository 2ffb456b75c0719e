//! Sign-in impact as gate and rollback criteria, end to end: the real binary driving
//! `phasegate emulator` on loopback, whose sign-in log is evaluated against its own devices and
//! Conditional Access policies. Time moves on the emulator's virtual clock; nothing sleeps.

mod common;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::{Value, json};

fn emulator(extra: &[&str]) -> Emulator {
    let mut args = vec![
        "--client-secret",
        SECRET,
        "--devices",
        "3000",
        "--ca-rate",
        "20",
    ];
    args.extend_from_slice(extra);
    Emulator::spawn(&args)
}

/// The Graph example plan with its phases replaced by `phases`.
fn plan(emulator: &Emulator, phases: &str) -> Phasegate {
    Phasegate::with_plan(emulator, "windows-baseline-graph.toml", 20.0, |text| {
        let head = text.split("[[phase]]").next().unwrap().to_string();
        format!("{head}{phases}")
    })
}

fn advance(emulator: &Emulator, seconds: u64) {
    emulator.post("/_emulator/clock", &json!({"advanceBySeconds": seconds}));
}

/// `run --once` until `done` holds for the status, moving the tenant's clock on by `step`
/// seconds between passes; at most `passes` passes.
fn drive(
    pg: &Phasegate,
    emulator: &Emulator,
    id: &str,
    step: u64,
    passes: usize,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..passes {
        let out = pg.run(&["run", id, "--once"]);
        assert!(
            [0, 3].contains(&code(&out)),
            "run exited {}:\n{}\n{}",
            code(&out),
            stdout(&out),
            stderr(&out)
        );
        let status = pg.status(id);
        if done(&status) {
            return status;
        }
        advance(emulator, step);
    }
    panic!("not reached in {passes} passes: {}", pg.status(id));
}

fn phase<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap()
}

const REPORT_ONLY_GATED: &str = r#"[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "1h"

[phase.gate]
max_blocked_signin_ratio = "5%"
signin_window = "4h"

[[phase]]
id = "enforce"
mode = "enforce"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "1d"
"#;

on_both_stores! {
    fn a_report_only_phase_whose_sign_ins_would_fail_above_the_bound_holds_and_says_why() {
        let emulator = emulator(&[]);
        let pg = plan(&emulator, REPORT_ONLY_GATED);
        let id = pg.start();
        drive(&pg, &emulator, &id, 600, 10, |s| {
            phase(s, "pilot")["state"] == "soaking"
        });
        // The pilot's users sign in from all their devices, several times each. The report-only policy requires a
        // compliant device on every platform; the rollout assigns only the Windows policy, and the
        // tenant marks devices without a policy as not compliant: their sign-ins would fail.
        advance(&emulator, 1800);
        let burst = emulator.post(
            "/_emulator/signins",
            &json!({"count": 1500, "group": "Pilot IT"}),
        );
        let would_fail = burst["results"]["reportOnlyFailure"].as_u64().unwrap_or(0);
        assert!(would_fail > 20, "{burst}");
        assert_eq!(
            burst["results"]["failure"].as_u64().unwrap_or(0),
            0,
            "{burst}"
        );
        // Past the soak: the gate is judged on the sign-ins of the window.
        advance(&emulator, 3600);
        let status = drive(&pg, &emulator, &id, 0, 3, |s| {
            !phase(s, "pilot")["gate"].is_null()
                && phase(s, "pilot")["gate"]["outcome"] != "inconclusive"
        });
        let pilot = phase(&status, "pilot");
        assert_eq!(pilot["gate"]["outcome"], "fail", "{status}");
        assert_eq!(status["status"], "held", "{status}");
        let reasons = pilot["gate"]["reasons"].to_string();
        assert!(
            reasons.contains("blocked or would be blocked, more than 5%"),
            "{reasons}"
        );
        let signins = &pilot["observation"]["signins"];
        assert_eq!(signins["availability"], "observed", "{signins}");
        assert!(signins["would_block"].as_u64().unwrap() > 0, "{signins}");
        // 1,500 sign-ins are two pages of the log: both were read (the pilot's own, every one).
        assert!(signins["signins"].as_u64().unwrap() > 1000, "{signins}");
        assert_eq!(signins["blocked"], 0, "{signins}");
        // Nobody is blocked for real, and `status` says where that comes from.
        assert_eq!(pilot["observation"]["blocked"], 0);
        assert_eq!(pilot["observation"]["blocked_source"], "sign_in_log");
        // Nothing enforcing was written: the enforce phase never started.
        assert_eq!(phase(&status, "enforce")["state"], "pending", "{status}");
        let text = stdout(&pg.run(&["status", &id]));
        assert!(text.contains("sign-ins since"), "{text}");
    }
}

const ENFORCED_WATCHED: &str = r#"[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "1h"

[[phase]]
id = "enforce"
mode = "enforce"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "7d"

[phase.rollback_when]
blocked_signins_above = 5
"#;

on_both_stores! {
    fn once_enforced_a_burst_of_failed_sign_ins_rolls_the_phase_back() {
        let emulator = emulator(&[]);
        let pg = plan(&emulator, ENFORCED_WATCHED);
        let id = pg.start();
        let status = drive(&pg, &emulator, &id, 3600, 30, |s| {
            phase(s, "enforce")["state"] == "soaking"
        });
        assert_eq!(status["status"], "running", "{status}");
        // A day on every device has checked in under enforcement; a quiet observation first.
        advance(&emulator, 86_400);
        let quiet = drive(&pg, &emulator, &id, 0, 2, |s| {
            !phase(s, "enforce")["observation"]["signins"].is_null()
        });
        assert_eq!(quiet["status"], "running", "{quiet}");
        // Then the owners of noncompliant Windows devices try to sign in: the enforced copy blocks
        // them.
        let burst = emulator.post(
            "/_emulator/signins",
            &json!({"count": 40, "group": "Pilot IT", "devices": "noncompliant"}),
        );
        assert!(
            burst["results"]["failure"].as_u64().unwrap_or(0) > 5,
            "{burst}"
        );
        advance(&emulator, 6 * 3600);
        let status = drive(&pg, &emulator, &id, 0, 3, |s| s["status"] == "rolled_back");
        let reason = status["reason"].as_str().unwrap();
        assert!(
            reason.contains("rollback_when of `enforce` tripped")
                && reason.contains("blocked sign-ins"),
            "{reason}"
        );
        // The enforced copy is gone or disabled again: nobody stays blocked by the rollout.
        let state = emulator.get("/_emulator/state");
        assert!(
            state["conditionalAccess"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["state"] != "enabled"),
            "{state}"
        );
    }
}

on_both_stores! {
    fn without_the_permission_the_criterion_is_not_available_and_preflight_says_so() {
        // The app has every permission but the sign-in log's.
        let roles = "DeviceManagementConfiguration.ReadWrite.All,DeviceManagementServiceConfig.Read.All,Policy.Read.All,Policy.ReadWrite.ConditionalAccess,Application.Read.All,GroupMember.Read.All,User.Read.All,Organization.Read.All";
        let emulator = emulator(&["--roles", roles]);
        let pg = plan(&emulator, REPORT_ONLY_GATED);
        let preflight = pg.run(&["preflight", pg.plan.to_str().unwrap()]);
        let said = format!("{}{}", stdout(&preflight), stderr(&preflight));
        assert_ne!(code(&preflight), 0, "{said}");
        assert!(said.contains("AuditLog.Read.All"), "{said}");
        // Started anyway, the gate holds: the criterion is not available, and says why.
        let out = pg.run(&[
            "start",
            pg.plan.to_str().unwrap(),
            "--by",
            "alice",
            "--skip-preflight",
            "--reason",
            "rehearsal without the sign-in log",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        drive(&pg, &emulator, &id, 600, 10, |s| {
            phase(s, "pilot")["state"] == "soaking"
        });
        advance(&emulator, 2 * 3600);
        let status = drive(&pg, &emulator, &id, 0, 3, |s| {
            !phase(s, "pilot")["gate"].is_null()
        });
        let pilot = phase(&status, "pilot");
        assert_eq!(pilot["gate"]["outcome"], "inconclusive", "{status}");
        let reasons = pilot["gate"]["reasons"].to_string();
        assert!(
            reasons.contains("sign-in criteria not available")
                && reasons.contains("AuditLog.Read.All")
                && reasons.contains("403"),
            "{reasons}"
        );
        assert_eq!(
            pilot["observation"]["signins"]["availability"],
            "unavailable"
        );
        assert_eq!(pilot["observation"]["blocked_source"], "estimate");
    }
}
