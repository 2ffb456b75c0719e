//! The dashboard in a real browser: `phasegate serve` over a real store, Debian's Chromium
//! headless through ChromeDriver. A person signs in with a token, sees the rollout's phases, the
//! gate evidence against each threshold and the chart, watches the page follow the rollout live,
//! and approves from the page. Screenshots are kept under `target/dashboard/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::browser::Browser;
use common::{BIN, SECRET, Serve, code, eventually, stderr, stdout};
use serde_json::{Value, json};

const PLAN: &str = include_str!("../plans/windows-baseline.toml");

fn token(store: &Path, name: &str, role: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "create", "--name", name, "--role", role])
        .env("PHASEGATE_STORE", store)
        .env("PHASEGATE_GRAPH_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// A count as the dashboard writes it: `4,986`.
fn thousands(count: &Value) -> String {
    let digits = count.as_u64().unwrap().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Where the run keeps the screenshots: `target/dashboard/` for the test on sled,
/// `target/dashboard/postgres/` for the same test on PostgreSQL.
fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    match common::stores::backend() {
        common::stores::Backend::Sled => dir,
        common::stores::Backend::Postgres => dir.join("postgres"),
    }
}

fn status(serve: &Serve, token: &str, id: &str) -> Value {
    serve
        .call("GET", &format!("/api/v1/rollouts/{id}"), token, None)
        .1
}

/// A rollout of the Windows baseline started by `olga`, waiting for approval of `notify`.
fn waiting_rollout(serve: &Serve, operator: &str) -> String {
    let (code, started) = serve.call(
        "POST",
        "/api/v1/rollouts",
        operator,
        Some(&json!({"plan": PLAN, "file": "windows-baseline.toml"})),
    );
    assert_eq!(code, 201, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(60), || {
            status(serve, operator, &id)["status"] == "waiting_approval"
        }),
        "{}",
        status(serve, operator, &id)
    );
    id
}

fn sign_in(browser: &Browser, serve: &Serve, token: &str) {
    browser.open(&format!("{}/login", serve.url));
    browser.type_into("input[name=token]", token);
    browser.click("form button[type=submit]");
    assert!(
        eventually(Duration::from_secs(10), || browser.url().ends_with("/ui/")),
        "signing in did not lead to the rollouts: {}",
        browser.url()
    );
}

on_both_stores! {
    fn an_approver_sees_the_phases_the_gate_evidence_and_the_chart_follows_live_and_approves() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let serve = Serve::start(&store);
        let operator = token(&store, "olga", "operator");
        let approver = token(&store, "bob", "approver");
        let id = waiting_rollout(&serve, &operator);

        let browser = Browser::start(1366, 900);
        sign_in(&browser, &serve, &approver);

        // The index lists the rollout under its status, linked to its page.
        let index = browser.text("main");
        assert!(index.contains(&id), "{index}");
        assert!(index.to_lowercase().contains("waiting"), "{index}");
        browser.click(&format!("a[href='/ui/rollouts/{id}']"));
        assert!(eventually(Duration::from_secs(10), || browser
            .url()
            .ends_with(&format!("/ui/rollouts/{id}"))));

        // The phase graph: every phase of the plan, with the state the API reports.
        let api = status(&serve, &approver, &id);
        let nodes = browser.script(
            "return [...document.querySelectorAll('svg.phase-graph g.node')].map(n => \
             [n.dataset.phase, n.dataset.state, n.getBoundingClientRect().width > 0])",
        );
        let expected: Vec<Value> = api["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| json!([p["id"], p["state"], true]))
            .collect();
        assert_eq!(nodes, Value::Array(expected));
        let graph = browser.text("#phases");
        for phase in ["pilot", "report-only", "notify", "enforce"] {
            assert!(graph.contains(phase), "phase {phase} not shown: {graph}");
        }

        // The gate of `notify`, open because it is the phase being decided: each criterion with
        // its threshold, the observed value and the verdict, as the API computed them.
        let gate = browser.text("#phase-2 table.gate");
        let evidence = &api["phases"][2]["gate"]["evidence"];
        let percent = |ratio: &Value| format!("{:.2}%", ratio.as_f64().unwrap() * 100.0);
        let row = |criterion: &str| {
            gate.lines()
                .find(|line| line.starts_with(criterion))
                .unwrap_or_else(|| panic!("no `{criterion}` row in the gate: {gate}"))
                .to_string()
        };
        let coverage = row("Reporting coverage");
        assert!(coverage.contains("at least 95%"), "{coverage}");
        assert!(
            coverage.contains(&percent(&evidence["coverage"])),
            "{coverage}"
        );
        assert!(
            coverage.contains(&format!(
                "{} of {} reported",
                thousands(&evidence["reported"]),
                thousands(&evidence["targeted"])
            )),
            "{coverage}"
        );
        assert!(coverage.ends_with("pass"), "{coverage}");
        let share = row("Noncompliant share");
        assert!(share.contains("at most 2%"), "{share}");
        assert!(
            share.contains(&percent(&evidence["noncompliant_ratio"])),
            "{share}"
        );
        assert!(share.ends_with("pass"), "{share}");
        let approvals = row("Approvals");
        assert!(approvals.contains("0 of 1"), "{approvals}");
        assert!(approvals.ends_with("fail"), "{approvals}");

        // The chart: a drawn series per watched phase and measure, with a marker per observation,
        // described for screen readers.
        let chart = browser.script(
            "const svg = document.querySelector('#evidence svg.chart'); \
             const box = svg.getBoundingClientRect(); \
             return {width: box.width, height: box.height, \
                     series: [...svg.querySelectorAll('path.series')].map(p => \
                         p.dataset.phase + '/' + p.dataset.measure + '/' + (p.getTotalLength() > 0)), \
                     markers: svg.querySelectorAll('circle.marker').length, \
                     label: svg.getAttribute('aria-label')}",
        );
        assert!(chart["width"].as_f64().unwrap() > 300.0, "{chart}");
        assert!(chart["height"].as_f64().unwrap() > 200.0, "{chart}");
        let series: Vec<&str> = chart["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for phase in ["pilot", "report-only", "notify"] {
            for measure in ["noncompliant", "coverage"] {
                let drawn = format!("{phase}/{measure}/true");
                assert!(series.contains(&drawn.as_str()), "{drawn} in {series:?}");
            }
        }
        assert!(chart["markers"].as_u64().unwrap() >= 10, "{chart}");
        let label = chart["label"].as_str().unwrap();
        assert!(
            label.contains("Latest:") && label.contains("notify"),
            "{chart}"
        );
        browser.screenshot(None, &screenshots().join("rollout.png"));
        browser.screenshot(Some("#evidence"), &screenshots().join("chart.png"));

        // Live: an operator pauses through the API; the open page follows without being reloaded.
        browser.script("window.__sameDocument = true; return null");
        let (code, body) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/pause"),
            &operator,
            Some(&json!({"reason": "checking the helpdesk queue"})),
        );
        assert_eq!(code, 200, "{body}");
        assert!(
            eventually(Duration::from_secs(15), || browser
                .text(".status-line")
                .to_lowercase()
                .contains("paused")),
            "the page did not follow the pause: {}",
            browser.text(".status-line")
        );
        assert_eq!(
            browser.script("return window.__sameDocument === true"),
            true,
            "the page was reloaded instead of updated"
        );
        let (code, body) = serve.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/resume"),
            &operator,
            Some(&json!({"reason": "queue is fine"})),
        );
        assert_eq!(code, 200, "{body}");
        assert!(eventually(Duration::from_secs(15), || browser
            .text(".status-line")
            .to_lowercase()
            .contains("waiting")));

        // The approver sees what the promotion would do: the impact forecast, beside the form.
        let forecast = browser.text("#approval .forecast");
        assert!(
            forecast.contains("If approved: enforce starts"),
            "{forecast}"
        );
        assert!(forecast.contains("Newly blocked"), "{forecast}");

        // Approving from the page: ticket, comment, the confirmation box, the button.
        browser.type_into("form.approve input[name=ticket]", "CHG-4711");
        browser.type_into(
            "form.approve textarea[name=comment]",
            "impact reviewed with the helpdesk",
        );
        browser.click("form.approve input[name=confirm]");
        browser.click("form.approve button[type=submit]");
        assert!(
            eventually(Duration::from_secs(30), || {
                let now = status(&serve, &approver, &id);
                now["phases"][3]["state"] != "pending"
            }),
            "{}",
            status(&serve, &approver, &id)
        );
        let approved = status(&serve, &approver, &id)["phases"][2]["approvals"]["granted"].clone();
        assert_eq!(approved[0]["by"], "bob", "{approved}");
        assert_eq!(approved[0]["ticket"], "CHG-4711", "{approved}");
        assert!(eventually(Duration::from_secs(15), || {
            browser.script(
                "const n = document.querySelector('svg.phase-graph g.node[data-phase=enforce]'); \
                 return n && n.dataset.state !== 'pending'",
            ) == true
        }));
        let audit = browser.text("#audit");
        assert!(audit.contains("bob"), "{audit}");
        browser.screenshot(None, &screenshots().join("approved.png"));
        assert_eq!(serve.terminate(), Some(0));
    }
}
