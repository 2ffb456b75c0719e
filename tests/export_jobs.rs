//! A rollout on the emulator with a million devices observes through Intune's reports export
//! API: the real binary on both sides of loopback sockets, the zip downloaded from the
//! emulator's blob origin. Each phase's counts are compared with the emulator's own, which it
//! computes from the snapshot of its device model the export was built from — not from the CSV,
//! and not with phasegate's counting. The device-group test runs on both store backends.

mod common;

use common::{Emulator, Phasegate, SECRET, code, stderr, stdout};
use serde_json::Value;

/// A pilot and everyone, side by side (the policy covers the whole fleet), each waiting for an
/// approval once soaked, observed daily.
fn plan(url: &str) -> String {
    format!(
        r#"[rollout]
name = "windows-at-scale"
observe_every = "1d"

[policy]
compliance = "Windows 10/11 compliance baseline"
platform = "windows"
conditional_access = "Require compliant device for Office 365"

[emergency_access]
groups = ["Break Glass"]

[provider]
kind = "graph"
tenant = "contoso.onmicrosoft.com"
client_id = "00001111-aaaa-2222-bbbb-3333cccc4444"
client_secret_env = "PHASEGATE_GRAPH_SECRET"
graph_url = "{url}"
login_url = "{url}"
ca_requests_per_second = 1000
request_timeout = "60s"
observe_through = "export"

[[phase]]
id = "pilot-it"
mode = "report"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "1d"

[phase.gate]
min_reporting = "50%"
approvals = 1

[[phase]]
id = "everyone"
mode = "report"
include = ["All Users"]
exclude = ["Break Glass"]
after = []
min_soak = "1d"

[phase.gate]
min_reporting = "50%"
approvals = 1
"#
    )
}

const COUNTS: [&str; 9] = [
    "targeted",
    "compliant",
    "noncompliant",
    "in_grace",
    "errors",
    "conflicts",
    "unknown",
    "stale",
    "userless",
];

on_both_stores! {
    fn a_million_devices_are_observed_through_export_jobs_each_device_once() {
        let emulator = Emulator::spawn(&[
            "--client-secret",
            SECRET,
            "--devices",
            "1000000",
            "--ca-rate",
            "1000",
        ]);
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 1000.0, |_| {
            plan(&emulator.url)
        });
        let id = pg.start();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["status"], "waiting_approval", "{status}");
        for (phase, group) in [(0, "Pilot%20IT"), (1, "All%20Users")] {
            let observed = &status["phases"][phase]["observation"];
            // The plan's default `stale_after` is three days.
            let truth: Value = emulator.get(&format!(
                "/_emulator/exportJobs/latest/truth?include={group}&exclude=Break%20Glass&stale_after=259200"
            ));
            // The observation ends after the report it counts, by the `DeviceCompliance` job that
            // dates the grace ends (queued, built over a million rows, polled) and no more.
            let at = |v: &Value| {
                phasegate::domain::time::Timestamp::parse_rfc3339(v["at"].as_str().unwrap()).unwrap()
            };
            let after = at(observed).since(at(&truth));
            assert!(
                at(observed) >= at(&truth) && after <= std::time::Duration::from_secs(5 * 60),
                "{observed} {truth}"
            );
            assert!(observed["earliest_block"].as_str().is_some(), "{observed}");
            for count in COUNTS {
                assert_eq!(
                    observed[count], truth[count],
                    "phase {phase}, {count}: phasegate {observed}, the emulator {truth}"
                );
            }
            // The phase has shared devices (counted once) and the policy userless devices.
            assert!(truth["shared"].as_u64().unwrap() > 0, "{truth}");
            assert!(truth["userless"].as_u64().unwrap() > 0, "{truth}");
        }
        let everyone = &status["phases"][1]["observation"];
        assert!(
            everyone["targeted"].as_u64().unwrap() > 300_000,
            "{everyone}"
        );
        assert!(everyone["userless"].as_u64().unwrap() > 5_000, "{everyone}");
    }
}

/// A phase of the device group "Shared Devices" (the emulator's kiosks and shared devices) beside
/// a user-group pilot, observed through export jobs.
fn device_group_plan(url: &str) -> String {
    plan(url)
        .replace("name = \"windows-at-scale\"", "name = \"shared-devices\"")
        .replace(
            "id = \"everyone\"\nmode = \"report\"\ninclude = [\"All Users\"]",
            "id = \"shared-devices\"\nmode = \"report\"\ninclude = [\"Shared Devices\"]",
        )
}

on_both_stores! {
    fn a_device_group_phase_holds_its_shared_and_userless_devices_as_the_emulator_counts_them() {
        let emulator = Emulator::spawn(&[
            "--client-secret",
            SECRET,
            "--devices",
            "100000",
            "--ca-rate",
            "1000",
        ]);
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 1000.0, |_| {
            device_group_plan(&emulator.url)
        });
        let id = pg.start();
        let out = pg.run(&["run", &id]);
        assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
        let status = pg.status(&id);
        assert_eq!(status["phases"][1]["id"], "shared-devices", "{status}");
        for (phase, group) in [(0, "Pilot%20IT"), (1, "Shared%20Devices")] {
            let observed = &status["phases"][phase]["observation"];
            let truth: Value = emulator.get(&format!(
                "/_emulator/exportJobs/latest/truth?include={group}&exclude=Break%20Glass&stale_after=259200"
            ));
            for count in COUNTS {
                assert_eq!(
                    observed[count], truth[count],
                    "phase {phase}, {count}: phasegate {observed}, the emulator {truth}"
                );
            }
        }
        let truth: Value = emulator.get(
            "/_emulator/exportJobs/latest/truth?include=Shared%20Devices&exclude=Break%20Glass&stale_after=259200",
        );
        // Every device of the phase is there through the device group, the userless ones too (in
        // the phase, not apart), and shared ones once.
        let targeted = truth["targeted"].as_u64().unwrap();
        assert!(targeted > 1_000, "{truth}");
        assert_eq!(truth["by_device_group"], truth["targeted"], "{truth}");
        assert!(
            truth["userless_by_device_group"].as_u64().unwrap() > 100,
            "{truth}"
        );
        assert!(truth["shared"].as_u64().unwrap() > 100, "{truth}");
        assert_eq!(truth["userless"], 0, "{truth}");
        // The pilot's users' phase still reports the policy's userless devices outside it.
        let pilot = &status["phases"][0]["observation"];
        assert!(pilot["userless"].as_u64().unwrap() > 0, "{pilot}");
    }
}

on_both_stores! {
    /// The same device-group phase through the `deviceStatuses` fallback: its user–device
    /// pairs read each device once, the system account's devices placed by the device group
    /// (their Entra ids from the managed devices), so each phase holds the devices the export
    /// route and the emulator count.
    fn the_device_statuses_fallback_places_the_same_devices_through_the_device_group() {
        let args = [
            "--client-secret",
            SECRET,
            "--devices",
            "20000",
            "--ca-rate",
            "1000",
        ];
        let observe = |through: &str| {
            let emulator = Emulator::spawn(&args);
            let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 1000.0, |_| {
                device_group_plan(&emulator.url).replace(
                    "observe_through = \"export\"",
                    &format!("observe_through = \"{through}\""),
                )
            });
            let id = pg.start();
            let out = pg.run(&["run", &id]);
            assert_eq!(code(&out), 3, "{}\n{}", stdout(&out), stderr(&out));
            (pg.status(&id), emulator)
        };
        let (statuses, _) = observe("device_statuses");
        let (export, emulator) = observe("export");
        for (phase, group) in [(0, "Pilot%20IT"), (1, "Shared%20Devices")] {
            let fallback = &statuses["phases"][phase]["observation"];
            let truth: Value = emulator.get(&format!(
                "/_emulator/exportJobs/latest/truth?include={group}&exclude=Break%20Glass&stale_after=259200"
            ));
            // Who is in the phase does not depend on the moment; the states do.
            for count in ["targeted", "userless"] {
                assert_eq!(
                    fallback[count], truth[count],
                    "phase {phase}, {count}: through deviceStatuses {fallback}, the emulator {truth}"
                );
                assert_eq!(
                    fallback[count], export["phases"][phase]["observation"][count],
                    "phase {phase}, {count}"
                );
            }
        }
        let shared = &statuses["phases"][1]["observation"];
        assert!(shared["targeted"].as_u64().unwrap() > 200, "{shared}");
        assert_eq!(shared["userless"], 0, "{shared}");
        assert!(
            statuses["phases"][0]["observation"]["userless"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
}
