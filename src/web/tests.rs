//! The pages rendered from real rollouts: `plans/windows-baseline.toml` driven through the state
//! machine the way the engine drives it, with every event sealed into a hash-chained trail.

use std::time::Duration;

use super::chart::{Measure, PLOT_LEFT, PLOT_RIGHT, panel_bounds};
use super::rollout::{Verdict, gate_rows};
use super::*;
use crate::cli::view::{RolloutView, rollout_view};
use crate::domain::event::{DriftChange, Effect, Event, EventKind, Trigger, TriggerSource};
use crate::domain::gate::Tally;
use crate::domain::machine::step;
use crate::domain::plan::{self, Plan};
use crate::domain::rollout::{PhaseObservation, PhaseState, Rollout};
use crate::domain::time::Timestamp;
use crate::store::EventRecord;

const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);
const CSRF: &str = "csrf-token-123";

struct Scenario {
    plan: Plan,
    rollout: Rollout,
    history: Vec<EventRecord>,
    last_hash: String,
    now: Timestamp,
}

fn tally(targeted: u64, noncompliant: u64, in_grace: u64, errors: u64, unknown: u64) -> Tally {
    Tally {
        targeted,
        compliant: targeted - noncompliant - in_grace - errors - unknown,
        noncompliant,
        in_grace,
        errors,
        unknown,
        ..Tally::default()
    }
}

impl Scenario {
    fn new() -> Scenario {
        let source = include_str!("../../plans/windows-baseline.toml");
        let plan = plan::parse("plans/windows-baseline.toml", source).unwrap();
        let now = Timestamp::parse_rfc3339("2026-01-05T08:00:00Z").unwrap();
        let rollout = Rollout::new("windows-baseline-1", &plan, "alice", now);
        Scenario {
            plan,
            rollout,
            history: Vec::new(),
            last_hash: String::new(),
            now,
        }
    }

    /// One step of the machine, recorded as `engine` records it and sealed as the store seals it.
    fn send(&mut self, kind: EventKind, trigger: Trigger) {
        let event = Event { kind, trigger };
        let transition = step(&self.plan, &self.rollout, &event, self.now).unwrap();
        let record = EventRecord {
            seq: 0,
            at: self.now,
            recorded_at: self.now,
            event,
            previous_status: self.rollout.status,
            status: transition.rollout.status,
            reason: transition.rollout.reason.clone(),
            notes: transition.notes.clone(),
            effects: transition.effects.clone(),
            impact: Vec::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
        .sealed(self.rollout.last_seq + 1, &self.last_hash);
        self.rollout = transition.rollout;
        self.rollout.last_seq = record.seq;
        self.rollout.check_invariants(&self.plan).unwrap();
        self.last_hash = record.hash.clone();
        self.history.push(record);
    }

    fn user(&mut self, kind: EventKind, who: &str, reason: &str) {
        self.send(kind, Trigger::user(who, reason));
    }

    /// Confirms every pending effect, as a provider that always succeeds would.
    fn settle(&mut self) {
        while let Some(pending) = self.rollout.pending.first().cloned() {
            let kind = match pending.effect {
                Effect::CaptureBaseline => EventKind::BaselineCaptured { effect: pending.id },
                _ => EventKind::Reconciled {
                    effect: pending.id,
                    changes: 2,
                },
            };
            self.send(kind, Trigger::new(TriggerSource::Provider, "simulator", ""));
        }
    }

    fn observe(&mut self, tally: Tally) {
        let observations = self
            .rollout
            .phases
            .iter()
            .filter(|p| matches!(p.state, PhaseState::Soaking | PhaseState::AwaitingApproval))
            .map(|p| PhaseObservation {
                phase: p.id.clone(),
                at: self.now,
                tally,
                by_platform: Vec::new(),
                impact: None,
                forecasts: Vec::new(),
                signins: None,
                userless: 0,
            })
            .collect();
        self.send(
            EventKind::Observed { observations },
            Trigger::new(TriggerSource::Schedule, "run", "observation due"),
        );
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now.plus(by);
    }

    fn state(&self, id: &str) -> PhaseState {
        self.rollout.phase(id).unwrap().state
    }

    /// Pilot and report-only promoted; notify held once, then passing and waiting for approval.
    fn waiting_for_approval() -> Scenario {
        let mut s = Scenario::new();
        let hash = s.plan.hash.clone();
        s.user(
            EventKind::Start { plan_hash: hash },
            "alice",
            "rollout started",
        );
        s.settle();
        s.advance(HOUR * 12);
        s.observe(tally(200, 9, 0, 2, 30));
        s.advance(HOUR * 36);
        s.observe(tally(200, 6, 0, 2, 12));
        s.settle();
        assert_eq!(s.state("pilot"), PhaseState::Promoted);
        s.advance(DAY);
        s.observe(tally(1000, 80, 0, 12, 40));
        s.advance(DAY * 2);
        s.observe(tally(1000, 60, 0, 10, 30));
        s.settle();
        assert_eq!(s.state("report-only"), PhaseState::Promoted);
        s.advance(DAY);
        s.observe(tally(1000, 40, 10, 3, 30));
        s.advance(DAY * 2);
        s.observe(tally(1000, 20, 10, 3, 28));
        assert_eq!(s.rollout.status.as_str(), "held");
        s.advance(DAY);
        // 974 of 1,000 reported (97.4%); 15 of them fail (1.54%).
        s.observe(tally(1000, 10, 5, 2, 26));
        assert_eq!(s.state("notify"), PhaseState::AwaitingApproval);
        assert_eq!(s.rollout.status.as_str(), "waiting_approval");
        s
    }

    /// [`Self::waiting_for_approval`], approved, and enforcement soaking with a few blocked devices.
    fn enforcing() -> Scenario {
        let mut s = Scenario::waiting_for_approval();
        s.user(
            EventKind::ApprovalGranted {
                phase: "notify".into(),
                ticket: Some("CHG-1042".into()),
                comment: Some("numbers look good".into()),
                digest: None,
            },
            "bob",
            "CAB approved",
        );
        s.settle();
        assert_eq!(s.state("enforce"), PhaseState::Soaking);
        s.advance(HOUR * 6);
        s.observe(Tally {
            blocked: 4,
            ..tally(1000, 12, 0, 2, 20)
        });
        s
    }

    fn view(&self) -> RolloutView {
        rollout_view(&self.plan, &self.rollout, self.rollout.updated_at)
    }

    /// The trail checked as `Store::verify` checks it: sequence, links and hashes.
    fn verified(&self) -> Result<u64, String> {
        let mut prev = String::new();
        for (i, record) in self.history.iter().enumerate() {
            if record.seq != i as u64 + 1 || record.prev_hash != prev {
                return Err(format!("event {}: chain broken", record.seq));
            }
            if record.compute_hash() != record.hash {
                return Err(format!(
                    "event {}: content does not match its hash",
                    record.seq
                ));
            }
            prev = record.hash.clone();
        }
        Ok(self.history.len() as u64)
    }

    fn render_view(&self, view: &RolloutView, viewer: &Viewer) -> String {
        rollout_page(
            &RolloutPage {
                view,
                plan: &self.plan,
                history: &self.history,
                verified: self.verified(),
                csrf: CSRF,
            },
            viewer,
        )
    }

    fn render(&self, viewer: &Viewer) -> String {
        self.render_view(&self.view(), viewer)
    }
}

fn viewer(name: &str, role: Role) -> Viewer {
    Viewer {
        name: name.to_string(),
        role,
    }
}

/// The text between `start` and the next `end` after it.
fn between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html.find(start).unwrap_or_else(|| panic!("no {start}"));
    let rest = &html[from..];
    &rest[..rest.find(end).map_or(rest.len(), |to| to + end.len())]
}

/// The text strictly between `start` and the next `end` after it.
fn inside<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html.find(start).unwrap_or_else(|| panic!("no {start}")) + start.len();
    let rest = &html[from..];
    &rest[..rest
        .find(end)
        .unwrap_or_else(|| panic!("no {end} after {start}"))]
}

/// Every form's `action`.
fn actions(html: &str) -> Vec<&str> {
    html.match_indices("<form ")
        .filter_map(|(at, _)| {
            let tag = &html[at..at + html[at..].find('>').unwrap()];
            let start = tag.find("action=\"")? + 8;
            Some(&tag[start..start + tag[start..].find('"').unwrap()])
        })
        .collect()
}

#[test]
fn roles_decide_who_approves_and_who_operates() {
    assert!(!Role::Viewer.can_approve() && !Role::Viewer.can_operate());
    assert!(Role::Approver.can_approve() && !Role::Approver.can_operate());
    assert!(!Role::Operator.can_approve() && Role::Operator.can_operate());
    assert!(Role::Admin.can_approve() && Role::Admin.can_operate());
}

#[test]
fn the_phase_graph_names_every_phase_with_its_mode_and_state() {
    let s = Scenario::waiting_for_approval();
    let html = s.render(&viewer("bob", Role::Viewer));
    let graph = between(&html, "<svg class=\"phase-graph\"", "</svg>");
    assert!(graph.contains("role=\"img\"") && graph.contains("<title>"));
    for (id, mode, state) in [
        ("pilot", "report", "promoted"),
        ("report-only", "report", "promoted"),
        ("notify", "notify", "awaiting_approval"),
        ("enforce", "enforce", "pending"),
    ] {
        assert!(
            graph.contains(&format!("data-phase=\"{id}\" data-state=\"{state}\"")),
            "{id} is {state}"
        );
        assert!(graph.contains(&format!("{mode} · {}</text>", state.replace('_', " "))));
        assert!(graph.contains(&format!("{id} ({mode}, {}", state.replace('_', " "))));
    }
    // One arrow per `after` edge: pilot → report-only → notify → enforce.
    assert_eq!(graph.matches("class=\"edge\"").count(), 3);
    assert!(graph.contains("data-from=\"notify\" data-to=\"enforce\""));
    // The current phase stands out, and not by colour alone: its state is written in its box.
    assert!(graph.contains("class=\"node state-awaiting_approval current\""));
}

#[test]
fn parallel_phases_share_a_column() {
    let source = include_str!("../../plans/ios-parallel-pilots.toml");
    let plan = plan::parse("plans/ios-parallel-pilots.toml", source).unwrap();
    let rollout = Rollout::new("ios-1", &plan, "alice", Timestamp::from_millis(0));
    let svg = super::graph::phase_graph(
        &plan,
        &rollout_view(&plan, &rollout, rollout.updated_at).phases,
    );
    assert_eq!(svg.matches("class=\"edge\"").count(), 4);
    let x_of = |id: &str| {
        let node = between(&svg, &format!("data-phase=\"{id}\""), "</g>");
        let x = between(node, "<rect x=\"", "\" ");
        x[9..x.len() - 2].parse::<f64>().unwrap()
    };
    assert_eq!(x_of("pilot-it"), x_of("pilot-field"));
    assert!(x_of("report-only") > x_of("pilot-it"));
}

#[test]
fn a_long_chain_of_phases_runs_top_to_bottom() {
    let mut text = String::from(
        "[rollout]\nname = \"long\"\n[policy]\ncompliance = \"Baseline\"\nplatform = \"windows\"\n\
         [provider]\nkind = \"simulator\"\n",
    );
    for n in 1..=7 {
        text.push_str(&format!(
            "[[phase]]\nid = \"step-{n}\"\nmode = \"report\"\ninclude = [\"Group {n}\"]\n"
        ));
    }
    let plan = plan::parse("long.toml", &text).unwrap();
    let rollout = Rollout::new("long-1", &plan, "alice", Timestamp::from_millis(0));
    let svg = super::graph::phase_graph(
        &plan,
        &rollout_view(&plan, &rollout, rollout.updated_at).phases,
    );
    assert_eq!(svg.matches("class=\"edge\"").count(), 6);
    let at = |id: &str| {
        let node = between(&svg, &format!("data-phase=\"{id}\""), "</g>");
        let x: f64 = inside(node, "<rect x=\"", "\"").parse().unwrap();
        let y: f64 = inside(node, "\" y=\"", "\"").parse().unwrap();
        (x, y)
    };
    let first = at("step-1");
    for n in 2..=7 {
        let (x, y) = at(&format!("step-{n}"));
        assert_eq!(x, first.0);
        assert!(y > at(&format!("step-{}", n - 1)).1);
    }
    let width: f64 = inside(&svg, "width=\"", "\"").parse().unwrap();
    assert!(width < 400.0, "{width}");
}

#[test]
fn gate_rows_show_every_criterion_with_threshold_value_and_verdict() {
    let s = Scenario::waiting_for_approval();
    let view = s.view();
    let idx = s.plan.phase_index("notify").unwrap();
    let rows = gate_rows(&s.plan.phases[idx], &view.phases[idx]);
    let row = |name: &str| rows.iter().find(|r| r.criterion == name).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.criterion).collect();
    assert_eq!(
        names,
        [
            "Reporting coverage",
            "Noncompliant share",
            "Approvals",
            "Soak time",
            "Hold time"
        ]
    );
    let coverage = row("Reporting coverage");
    assert_eq!(coverage.threshold, "at least 95% (reported within 3d)");
    assert_eq!(coverage.observed, "97.4% (974 of 1,000 reported)");
    assert_eq!(coverage.verdict, Verdict::Pass);
    let share = row("Noncompliant share");
    assert_eq!(share.threshold, "at most 2%");
    assert_eq!(share.observed, "1.54% (15 of 974 reporting)");
    assert_eq!(share.verdict, Verdict::Pass);
    assert_eq!(row("Approvals").observed, "0 of 1");
    assert_eq!(row("Approvals").verdict, Verdict::Fail);
    let soak = row("Soak time");
    assert_eq!(soak.threshold, "at least 3d (until 2026-01-13 08:00 UTC)");
    assert_eq!(soak.observed, "4d at the latest observation");
    assert_eq!(soak.verdict, Verdict::Pass);
    assert_eq!(row("Hold time").threshold, "at most 14d");
    assert_eq!(row("Hold time").verdict, Verdict::Pass);

    // The phase that has not started has thresholds and nothing to judge.
    let idx = s.plan.phase_index("enforce").unwrap();
    let rows = gate_rows(&s.plan.phases[idx], &view.phases[idx]);
    assert!(rows.iter().all(|r| r.verdict == Verdict::NoData));

    // In the page: one table row per criterion, with the values.
    let html = s.render(&viewer("bob", Role::Viewer));
    let table = between(&html, "<caption>Gate of <code>notify</code>", "</table>");
    assert_eq!(table.matches("<tr class=\"criterion\">").count(), 5);
    assert!(table.contains("at least 95%") && table.contains("97.4%"));
    assert!(table.contains("<span class=\"verdict pass\">pass</span>"));
    assert!(table.contains("<span class=\"verdict fail\">fail</span>"));
    let pilot = between(&html, "<caption>Gate of <code>pilot</code>", "</table>");
    assert!(pilot.contains("Error share") && pilot.contains("at most 5%"));
    assert!(pilot.contains("1.06% (2 of 188 reporting)"), "{pilot}");
}

#[test]
fn a_failing_gate_shows_which_criterion_fails_and_since_when_it_holds() {
    let mut s = Scenario::waiting_for_approval();
    s.advance(HOUR * 6);
    s.observe(tally(1000, 40, 10, 3, 26));
    assert_eq!(s.rollout.status.as_str(), "held");
    let view = s.view();
    let idx = s.plan.phase_index("notify").unwrap();
    let rows = gate_rows(&s.plan.phases[idx], &view.phases[idx]);
    let share = rows
        .iter()
        .find(|r| r.criterion == "Noncompliant share")
        .unwrap();
    assert_eq!(share.verdict, Verdict::Fail);
    assert_eq!(share.observed, "5.13% (50 of 974 reporting)");
    let hold = rows.iter().find(|r| r.criterion == "Hold time").unwrap();
    assert!(
        hold.observed.starts_with("held since <time"),
        "{}",
        hold.observed
    );
    assert_eq!(hold.verdict, Verdict::Pass);
    let html = s.render(&viewer("bob", Role::Viewer));
    assert!(html.contains("noncompliant 5.13% exceeds 2%"));
}

#[test]
fn the_chart_draws_one_line_per_phase_and_measure_inside_its_axes() {
    let s = Scenario::enforcing();
    let points = chart_points(&s.history);
    let observations: usize = s
        .history
        .iter()
        .map(|r| match &r.event.kind {
            EventKind::Observed { observations } => observations.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(points.len(), observations);
    let svg = chart_svg(&points);
    assert!(svg.contains("role=\"img\"") && svg.contains("aria-label=\"Chart of"));
    assert!(svg.contains("<title>Chart of"));
    assert!(svg.contains("Jan 7") && svg.contains("%</text>"));
    let phases = ["pilot", "report-only", "notify", "enforce"];
    assert_eq!(
        svg.matches("<path class=\"series\"").count(),
        phases.len() * 3
    );
    for (index, measure) in Measure::ALL.into_iter().enumerate() {
        let (top, bottom) = panel_bounds(index);
        for phase in phases {
            let tag = format!(
                "<path class=\"series\" data-phase=\"{phase}\" data-measure=\"{}\" d=\"",
                measure.name()
            );
            let d = inside(&svg, &tag, "\"");
            let numbers: Vec<f64> = d
                .split(' ')
                .filter(|t| *t != "M" && *t != "L")
                .map(|t| t.parse().unwrap())
                .collect();
            let expected = points.iter().filter(|p| p.phase == phase).count();
            assert_eq!(numbers.len(), expected * 2, "{phase} {}", measure.name());
            for xy in numbers.chunks(2) {
                assert!((PLOT_LEFT..=PLOT_RIGHT).contains(&xy[0]), "x {}", xy[0]);
                assert!(
                    (top..=bottom).contains(&xy[1]),
                    "y {} in {top}..{bottom}",
                    xy[1]
                );
            }
        }
    }
    // The legend names every phase.
    let legend = between(&svg, "<g class=\"legend\">", "</g>");
    for phase in phases {
        assert!(legend.contains(&format!(">{phase}</text>")));
    }
    // The page carries the chart and the same data as a table.
    let html = s.render(&viewer("bob", Role::Viewer));
    assert!(html.contains("<svg class=\"chart\""));
    assert_eq!(
        between(&html, "<details class=\"chart-data\">", "</details>")
            .matches("<tr><td>")
            .count(),
        points.len()
    );
}

#[test]
fn a_chart_without_observations_says_so() {
    let svg = chart_svg(&[]);
    assert!(svg.contains("role=\"img\"") && svg.contains("No observations yet"));
}

#[test]
fn the_approval_panel_is_for_approvers_only() {
    let s = Scenario::waiting_for_approval();
    let approve = "/ui/rollouts/windows-baseline-1/approve";
    let reject = "/ui/rollouts/windows-baseline-1/reject";
    for role in [Role::Approver, Role::Admin] {
        let html = s.render(&viewer("bob", role));
        let panel = between(&html, "<section id=\"approval\"", "</section>");
        assert_eq!(actions(panel), [approve, reject], "{role}");
        let form = between(panel, "<form class=\"approve\"", "</form>");
        assert!(form.contains(&format!("name=\"csrf\" value=\"{CSRF}\"")));
        assert!(form.contains("name=\"phase\" value=\"notify\""));
        assert!(form.contains("name=\"ticket\"") && form.contains("name=\"comment\""));
        assert!(form.contains("name=\"confirm\" value=\"yes\" required"));
        assert!(form.contains("I have reviewed the evidence"));
        let form = between(panel, "<form class=\"reject\"", "</form>");
        assert!(form.contains("name=\"reason\"") && form.contains("required"));
        assert!(form.contains(&format!("name=\"csrf\" value=\"{CSRF}\"")));
    }
    for role in [Role::Viewer, Role::Operator] {
        let html = s.render(&viewer("dave", role));
        assert!(!html.contains(approve) && !html.contains(reject), "{role}");
        let panel = between(&html, "<section id=\"approval\"", "</section>");
        assert!(panel.contains("approver or admin role may approve"));
        assert!(panel.contains("You are signed in as dave"));
    }
}

#[test]
fn separation_of_duties_keeps_the_starter_from_approving() {
    let mut s = Scenario::waiting_for_approval();
    // On by default, and for the starter however the name is written.
    for alice in ["alice", "ALICE"] {
        let html = s.render(&viewer(alice, Role::Admin));
        let panel = between(&html, "<section id=\"approval\"", "</section>");
        assert!(!panel.contains("/approve\""), "{alice}");
        assert!(panel.contains("you started this rollout"), "{alice}");
    }
    let html = s.render(&viewer("bob", Role::Approver));
    assert!(html.contains("/ui/rollouts/windows-baseline-1/approve"));
    let html = s.render(&viewer("dave", Role::Viewer));
    assert!(html.contains("except alice who started this rollout (separation of duties)"));
    s.plan.separation_of_duties = false;
    let html = s.render(&viewer("alice", Role::Admin));
    assert!(html.contains("/ui/rollouts/windows-baseline-1/approve"));
}

#[test]
fn nothing_to_approve_once_the_phase_is_promoted() {
    let s = Scenario::enforcing();
    let html = s.render(&viewer("bob", Role::Approver));
    assert!(!html.contains("/approve\""));
    assert!(html.contains("No phase is waiting for an approval."));
    // The approval is in the phase's record and in the trail, ticket and comment included.
    let notify = between(&html, "<ul class=\"approvals\">", "</ul>");
    assert!(notify.contains("<strong>bob</strong>") && notify.contains("CHG-1042"));
    assert!(html.contains("approves <code>notify</code>, ticket <code>CHG-1042</code>"));
}

#[test]
fn operator_forms_are_for_operators_only() {
    let s = Scenario::waiting_for_approval();
    let base = "/ui/rollouts/windows-baseline-1";
    for role in [Role::Operator, Role::Admin] {
        let html = s.render(&viewer("erin", role));
        let panel = between(&html, "<section id=\"operations\"", "</section>");
        assert_eq!(
            actions(panel),
            [format!("{base}/pause"), format!("{base}/rollback")],
            "{role}"
        );
        assert_eq!(panel.matches(&format!("value=\"{CSRF}\"")).count(), 2);
        let rollback = between(panel, "<form class=\"rollback\"", "</form>");
        assert!(rollback.contains("name=\"to\""));
        assert!(rollback.contains("<option value=\"report-only\">back to report-only</option>"));
        assert!(rollback.contains("name=\"reason\"") && rollback.contains("required"));
    }
    for role in [Role::Viewer, Role::Approver] {
        let html = s.render(&viewer("dave", role));
        let panel = between(&html, "<section id=\"operations\"", "</section>");
        assert!(actions(panel).is_empty(), "{role}");
        assert!(panel.contains("operator or admin role may pause, resume and roll back"));
    }
    // A paused rollout offers resume instead of pause.
    let mut paused = Scenario::waiting_for_approval();
    paused.user(EventKind::PauseRequested, "erin", "change freeze");
    let html = paused.render(&viewer("erin", Role::Operator));
    let panel = between(&html, "<section id=\"operations\"", "</section>");
    assert_eq!(
        actions(panel),
        [format!("{base}/resume"), format!("{base}/rollback")]
    );
}

#[test]
fn drift_shows_what_changed_and_offers_the_decision_to_operators() {
    let mut s = Scenario::waiting_for_approval();
    s.send(
        EventKind::DriftDetected {
            effect: None,
            changes: vec![DriftChange {
                object: "compliance policy \"Windows baseline\"".into(),
                field: "assignments".into(),
                expected: "Pilot IT, All Users".into(),
                found: "Pilot IT".into(),
            }],
        },
        Trigger::new(TriggerSource::Provider, "graph", "found on observing"),
    );
    assert_eq!(s.rollout.status.as_str(), "drifted");
    let html = s.render(&viewer("erin", Role::Operator));
    let drift = between(&html, "<section class=\"drift\"", "</section>");
    assert!(drift.contains("compliance policy &quot;Windows baseline&quot;"));
    assert!(
        drift.contains(
            "<td class=\"text\">Pilot IT, All Users</td><td class=\"text\">Pilot IT</td>"
        )
    );
    let panel = between(&html, "<section id=\"operations\"", "</section>");
    assert_eq!(actions(panel), ["/ui/rollouts/windows-baseline-1/drift"]);
    assert!(panel.contains("name=\"decision\" value=\"reapply\""));
    assert!(panel.contains("name=\"decision\" value=\"adopt\""));
    let html = s.render(&viewer("dave", Role::Viewer));
    assert!(!html.contains("/drift\""));
}

#[test]
fn a_write_held_by_the_tenant_is_explained() {
    let mut view = Scenario::waiting_for_approval().view();
    view.tenant_approval = Some(crate::cli::view::TenantApprovalView {
        reference: "MAA-77".into(),
        summary: "assign \"Windows baseline\" to All Users".into(),
        since: "2026-01-14T08:00:00Z".into(),
    });
    let s = Scenario::waiting_for_approval();
    let html = s.render_view(&view, &viewer("dave", Role::Viewer));
    let held = between(&html, "<section class=\"tenant-approval\"", "</section>");
    assert!(held.contains("<code>MAA-77</code>"));
    assert!(held.contains("assign &quot;Windows baseline&quot; to All Users"));
    assert!(held.contains("2026-01-14 08:00 UTC"));
}

#[test]
fn text_from_rollouts_events_and_people_is_escaped() {
    let mut s = Scenario::waiting_for_approval();
    s.user(
        EventKind::PauseRequested,
        "mallory\" onmouseover=\"alert(2)",
        "<b>freeze</b> & \"quotes\"\nsecond line",
    );
    let mut view = s.view();
    view.reason = "<script>alert(1)</script>".into();
    view.id = "odd id/<x>".into();
    let who = viewer("<img src=x onerror=alert(3)>", Role::Admin);
    let html = rollout_page(
        &RolloutPage {
            view: &view,
            plan: &s.plan,
            history: &s.history,
            verified: Err("event 3: <broken> & \"edited\"".into()),
            csrf: "\"><script>alert(4)</script>",
        },
        &who,
    );
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<b>freeze"));
    assert!(html.contains("&lt;b&gt;freeze&lt;/b&gt; &amp; &quot;quotes&quot;\nsecond line"));
    assert!(!html.contains("\" onmouseover="));
    assert!(html.contains("mallory&quot; onmouseover=&quot;alert(2)"));
    assert!(!html.contains("<img"));
    assert!(html.contains("&lt;img src=x onerror=alert(3)&gt;"));
    assert!(html.contains("event 3: &lt;broken&gt; &amp; &quot;edited&quot;"));
    // The id is escaped in text and percent-encoded in URLs.
    assert!(html.contains("<code>odd id/&lt;x&gt;</code>"));
    assert!(html.contains("action=\"/ui/rollouts/odd%20id%2F%3Cx%3E/resume\""));
    assert!(html.contains("data-rollout-id=\"odd id/&lt;x&gt;\""));
    // The only script is the dashboard's own file.
    assert_eq!(html.matches("<script").count(), 1);

    let mut listed = view;
    listed.plan = "<plan>".into();
    let index = index_page(&[listed], &who);
    assert!(!index.contains("<script>alert") && !index.contains("<plan>"));
    assert!(index.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(index.contains("href=\"/ui/rollouts/odd%20id%2F%3Cx%3E\""));

    let login = login_page(Some("<i>token</i> expired"));
    assert!(login.contains("&lt;i&gt;token&lt;/i&gt; expired") && !login.contains("<i>"));
}

#[test]
fn the_audit_trail_lists_every_event_and_its_verification() {
    let s = Scenario::enforcing();
    let html = s.render(&viewer("bob", Role::Viewer));
    let audit = between(&html, "<section id=\"audit\"", "</section>");
    assert_eq!(
        audit.matches("<tr class=\"event\"").count(),
        s.history.len()
    );
    let n = s.history.len();
    assert!(audit.contains(&format!("audit trail verified, {n} events")));
    for record in &s.history {
        let row = between(
            audit,
            &format!("<tr class=\"event\" id=\"event-{}\">", record.seq),
            "</tr>",
        );
        assert!(row.contains(&format!("<td class=\"num\">{}</td>", record.seq)));
        assert!(row.contains(&format!("<code>{}</code>", record.event.kind.name())));
        assert!(row.contains(&format!(">{}</code></td></tr>", &record.hash[..8])));
        assert!(row.contains(&format!(
            "<span class=\"source\">{}</span> {}",
            record.event.trigger.source.as_str(),
            record.event.trigger.actor
        )));
        assert!(row.contains(&format!("datetime=\"{}\"", record.at.rfc3339())));
        for note in &record.notes {
            assert!(row.contains(&esc(note)), "{note}");
        }
    }
    // Status changes read as `before → after`.
    assert!(
        audit.contains("Held by a gate</span> → <span class=\"badge status-waiting_approval\">")
    );
    assert!(audit.contains("user</span> bob: <span class=\"text\">CAB approved</span>"));

    let broken = rollout_page(
        &RolloutPage {
            view: &s.view(),
            plan: &s.plan,
            history: &s.history,
            verified: Err(
                "event 7: content does not match its hash (edited after it was written)".into(),
            ),
            csrf: CSRF,
        },
        &viewer("bob", Role::Viewer),
    );
    assert!(
        broken
            .contains("audit trail verification failed: event 7: content does not match its hash")
    );
    assert!(!broken.contains("audit trail verified"));
}

#[test]
fn the_index_groups_rollouts_with_those_needing_attention_first() {
    let waiting = Scenario::waiting_for_approval().view();
    let mut running = Scenario::enforcing().view();
    running.id = "windows-baseline-2".into();
    let mut completed = Scenario::enforcing().view();
    completed.id = "windows-baseline-0".into();
    completed.status = "completed".into();
    completed.needs_attention = false;
    completed.current_phases.clear();
    let mut failed = Scenario::enforcing().view();
    failed.id = "windows-baseline-3".into();
    failed.status = "failed".into();
    failed.reason = "provider error: HTTP 503".into();
    let html = index_page(
        &[completed, running, waiting, failed],
        &viewer("bob", Role::Viewer),
    );
    let order: Vec<usize> = [
        "group-failed",
        "group-waiting_approval",
        "group-running",
        "group-completed",
    ]
    .iter()
    .map(|g| {
        html.find(&format!("id=\"{g}\""))
            .unwrap_or_else(|| panic!("{g}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(html.contains("4 rollouts, 2 need attention."));
    let waiting = between(&html, "id=\"group-waiting_approval\"", "</section>");
    assert!(waiting.contains("<a href=\"/ui/rollouts/windows-baseline-1\">windows-baseline-1</a>"));
    assert!(waiting.contains("<code>notify</code>"));
    assert!(waiting.contains("`notify` passed its gate and needs 1 more approval"));
    assert!(
        waiting.contains("<time datetime=\"2026-01-14T08:00:00Z\">2026-01-14 08:00 UTC</time>")
    );
    let running = between(&html, "id=\"group-running\"", "</section>");
    assert!(running.contains("<code>enforce</code>"));
    let completed = between(&html, "id=\"group-completed\"", "</section>");
    assert!(completed.contains("<span class=\"none\">none</span>"));
    assert!(html.contains("<div id=\"rollouts\">"));
    // No forms on the index, so no CSRF token to carry.
    assert!(!html.contains("<form"));
}

#[test]
fn the_login_page_posts_a_token() {
    let html = login_page(None);
    assert_eq!(actions(&html), ["/login"]);
    assert!(html.contains("<label for=\"token\">") && html.contains("id=\"token\" name=\"token\""));
    assert!(!html.contains("role=\"alert\""));
    let html = login_page(Some("unknown token"));
    assert!(html.contains("role=\"alert\" id=\"login-error\">unknown token</p>"));
    // Nothing to watch before signing in.
    assert!(!html.contains("<script"));
}

/// Every page: English, landmarks, the two local assets, nothing from another origin, and a label
/// for every field.
#[test]
fn pages_are_accessible_and_self_contained() {
    let s = Scenario::waiting_for_approval();
    let mut drifted = Scenario::waiting_for_approval();
    drifted.send(
        EventKind::DriftDetected {
            effect: None,
            changes: vec![DriftChange {
                object: "policy".into(),
                field: "assignments".into(),
                expected: "a".into(),
                found: "b".into(),
            }],
        },
        Trigger::new(TriggerSource::Provider, "graph", ""),
    );
    let admin = viewer("root", Role::Admin);
    let pages = [
        s.render(&admin),
        drifted.render(&admin),
        index_page(&[s.view()], &admin),
        login_page(Some("no")),
    ];
    for html in &pages {
        assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        for landmark in ["<header", "<nav", "<main"] {
            assert!(html.contains(landmark), "{landmark}");
        }
        assert!(html.contains("<link rel=\"stylesheet\" href=\"/ui/assets/dashboard.css\">"));
        let local = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !local.contains("http://") && !local.contains("https://") && !local.contains("//cdn")
        );
        assert!(!html.contains(" style=\"") && !html.contains("<style"));
        assert!(!html.contains(" onclick=") && !html.contains("javascript:"));
        for (at, _) in html.match_indices('<') {
            let tag = &html[at..at + html[at..].find('>').unwrap()];
            let field = ["<input ", "<textarea ", "<select "]
                .iter()
                .any(|t| tag.starts_with(t));
            if !field || tag.contains("type=\"hidden\"") {
                continue;
            }
            let id = between(tag, "id=\"", "\" ");
            let id = &id[4..id.len() - 2];
            assert!(
                html.contains(&format!("<label for=\"{id}\">")),
                "no label for {id}"
            );
        }
    }
    assert!(pages[0].contains("<script src=\"/ui/assets/dashboard.js\" defer></script>"));
    // Every form of a rollout's page carries the CSRF token.
    for html in &pages[..2] {
        let forms: Vec<&str> = html.split("<form ").skip(1).collect();
        assert!(forms.len() >= 2);
        for form in forms {
            let form = &form[..form.find("</form>").unwrap()];
            assert!(
                form.contains(&format!(
                    "<input type=\"hidden\" name=\"csrf\" value=\"{CSRF}\">"
                )),
                "{form}"
            );
        }
    }
    // Form ids are unique on a page.
    for html in &pages[..2] {
        let mut ids: Vec<&str> = html
            .match_indices(" id=\"")
            .map(|(at, _)| {
                let rest = &html[at + 5..];
                &rest[..rest.find('"').unwrap()]
            })
            .collect();
        let all = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all);
    }
}

#[test]
fn the_script_watches_the_rollout_and_the_index() {
    assert!(
        JS.contains("new EventSource('/api/v1/rollouts/' + encodeURIComponent(id) + '/watch')")
    );
    assert!(JS.contains("addEventListener('transition', refresh)"));
    assert!(JS.contains("getElementById('rollout')"));
    assert!(JS.contains("new EventSource('/api/v1/watch')"));
    assert!(JS.contains("window.location.reload()"));
    assert!(!JS.contains("http://") && !JS.contains("https://"));
}

/// Relative luminance contrast of two `#rrggbb` colours.
fn contrast(a: &str, b: &str) -> f64 {
    let luminance = |hex: &str| {
        let channel = |i: usize| {
            let c = u8::from_str_radix(&hex[1 + 2 * i..3 + 2 * i], 16).unwrap() as f64 / 255.0;
            if c <= 0.03928 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * channel(0) + 0.7152 * channel(1) + 0.0722 * channel(2)
    };
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[test]
fn the_stylesheet_is_local_and_its_colours_meet_wcag_aa() {
    assert!(!CSS.contains("url(") && !CSS.contains("@import") && !CSS.contains("@font-face"));
    let var = |name: &str| {
        let at = CSS.find(&format!("--{name}: ")).unwrap() + name.len() + 4;
        &CSS[at..at + 7]
    };
    let white = "#ffffff";
    for name in ["text", "muted", "link"] {
        assert!(contrast(var(name), white) >= 4.5, "{name}");
    }
    for name in ["pass", "fail", "warn", "info", "none"] {
        let ratio = contrast(var(name), var(&format!("{name}-bg")));
        assert!(ratio >= 4.5, "{name}: {ratio:.2}");
    }
    assert!(contrast(var("muted"), var("panel")) >= 4.5);
    // The primary button: white on green.
    assert!(contrast("#ffffff", "#1a7f37") >= 4.5);
}

/// An approver sees what the promotion would do before deciding: the impact forecast made from
/// the phase's latest observation, beside the approve form.
#[test]
fn the_approval_panel_shows_the_impact_forecast() {
    use crate::domain::forecast::{Affected, Forecast, Impact};
    use crate::domain::plan::{Mode, Platform};
    let mut s = Scenario::waiting_for_approval();
    let before = s.render(&viewer("bob", Role::Approver));
    let panel = between(&before, "<section id=\"approval\"", "</section>");
    assert!(panel.contains("No impact forecast yet"), "{panel}");
    let at = s.now;
    let notify = s
        .rollout
        .phases
        .iter_mut()
        .find(|p| p.id == "notify")
        .unwrap();
    notify.observation.as_mut().unwrap().forecasts = vec![Forecast {
        phase: "enforce".into(),
        after: "notify".into(),
        mode: Mode::Enforce,
        at,
        devices: 9_683,
        unknown: 120,
        before: Impact::default(),
        notified: Affected::default(),
        blocked: Affected {
            devices: 174,
            users: 161,
            by_platform: vec![(Platform::Windows, 174)],
            by_setting: vec![("Require BitLocker".into(), 98)],
            groups: vec![("Sales".into(), 77)],
        },
        blocked_at_once: 12,
        first_block: None,
    }];
    let html = s.render(&viewer("bob", Role::Approver));
    let panel = between(&html, "<section id=\"approval\"", "</section>");
    let forecast = between(panel, "<div class=\"forecast\"", "</div>");
    assert!(forecast.contains("If approved: <code>enforce</code> starts (enforce)"));
    let blocked = between(forecast, "<th scope=\"row\">Newly blocked</th>", "</tr>");
    assert!(blocked.contains("<td>174</td><td>161</td>"), "{blocked}");
    assert!(blocked.contains("windows 174") && blocked.contains("Require BitLocker 98"));
    assert!(blocked.contains("Sales 77"));
    assert!(forecast.contains("9,683 (120 without a fresh report)"));
    assert!(forecast.contains("<dt>Blocked at once</dt><dd>12</dd>"));
    // The approval binds to the evidence shown: the form carries its digest.
    let digest = s.view().phases[2]
        .digest
        .clone()
        .expect("a digest once observed");
    let form = between(panel, "<form class=\"approve\"", "</form>");
    assert!(
        form.contains(&format!("name=\"digest\" value=\"{digest}\"")),
        "{form}"
    );
    // The forecast comes before the decision.
    assert!(
        panel.find("class=\"forecast\"").unwrap() < panel.find("<form class=\"approve\"").unwrap()
    );
}

/// A freeze holding the promotion and a plan change waiting for approval are on the page, each
/// saying what happens next.
#[test]
fn a_freeze_and_a_waiting_plan_change_are_explained() {
    use crate::cli::view::{FrozenView, PlanChangeView, PlanFileView};
    let s = Scenario::waiting_for_approval();
    let mut view = s.view();
    view.frozen = Some(FrozenView {
        window: "weekend".into(),
        until: "2026-01-12T05:00:00Z".into(),
        until_local: "Monday 06:00 Europe/Berlin".into(),
        phases: vec!["enforce".into()],
    });
    view.freeze_windows = vec!["weekend: Friday 12:00 to Monday 06:00 Europe/Berlin".into()];
    view.plan_change = Some(PlanChangeView {
        plan_hash: "ab".repeat(32),
        from_hash: view.plan_hash.clone(),
        by: "mallory".into(),
        at: "2026-01-09T10:00:00Z".into(),
        weakens: vec!["`notify` needs 0 approvals instead of 1".into()],
        rules_of: "notify".into(),
        required: 1,
        approvers: "anyone but mallory".into(),
        approved_by: Vec::new(),
    });
    view.plan_file_changed = Some(PlanFileView {
        path: "plans/w.toml".into(),
        plan_hash: "cd".repeat(32),
        seen_at: "2026-01-09T11:00:00Z".into(),
    });
    let html = s.render_view(&view, &viewer("bob", Role::Approver));
    let frozen = between(&html, "<section class=\"frozen\"", "</section>");
    assert!(frozen.contains("<code>enforce</code>") && frozen.contains("<code>weekend</code>"));
    assert!(frozen.contains("Monday 06:00 Europe/Berlin"));
    assert!(html.contains("weekend: Friday 12:00 to Monday 06:00 Europe/Berlin"));
    let change = between(&html, "<section class=\"plan-change\"", "</section>");
    assert!(change.contains("mallory applied plan"));
    assert!(change.contains("0 of 1 approval (anyone but mallory)"));
    assert!(change.contains("<li class=\"text\">`notify` needs 0 approvals instead of 1</li>"));
    assert!(change.contains("phasegate plan approve windows-baseline-1"));
    let file = between(&html, "<section class=\"plan-file\"", "</section>");
    assert!(file.contains("<code>plans/w.toml</code>") && file.contains("which nobody applied"));
}

/// Once a phase has soaked, its page says how far the forecast it was started on was off.
#[test]
fn a_phase_shows_its_forecast_against_the_outcome() {
    use crate::cli::view::{ComparisonView, ForecastCheckView};
    let s = Scenario::enforcing();
    let mut view = s.view();
    let comparison = |forecast_devices, actual_devices| ComparisonView {
        forecast_devices,
        actual_devices,
        forecast_users: 0,
        actual_users: 0,
        error: 0.0,
    };
    view.phases[2].forecast_check = Some(ForecastCheckView {
        phase: view.phases[2].id.clone(),
        forecast_at: "2026-01-08T08:00:00Z".into(),
        at: "2026-01-10T08:00:00Z".into(),
        reporting: 9_683,
        notified: comparison(981, 980),
        blocked: comparison(174, 156),
        error: 18.0 / 9_683.0,
        summary: String::new(),
    });
    let html = s.render_view(&view, &viewer("dave", Role::Viewer));
    let check = between(&html, "<p class=\"forecast-check", "</p>");
    assert!(check.contains("told 981 forecast, 980 actual"), "{check}");
    assert!(check.contains("blocked 174 forecast, 156 actual"));
    assert!(check.contains("error 0.2% of 9,683 reporting devices"));
}

#[test]
fn the_rollout_page_lists_the_active_exceptions_with_who_why_and_until_when() {
    use crate::domain::event::Until;
    use crate::domain::rollout::Subject;
    let mut s = Scenario::enforcing();
    let quiet = s.render(&viewer("vera", Role::Viewer));
    assert!(!quiet.contains("Exceptions from enforcement"));
    s.user(
        EventKind::ExceptionGranted {
            name: "trip".into(),
            subject: Subject::User("carol@contoso.com".into()),
            until: Until::AfterSecs(3 * 86_400),
        },
        "dana",
        "travelling <abroad>",
    );
    s.user(
        EventKind::ExceptionGranted {
            name: "lab".into(),
            subject: Subject::Group("Lab Devices".into()),
            until: Until::AfterSecs(86_400),
        },
        "erin",
        "test bench",
    );
    s.settle();
    let view = s.view();
    assert_eq!(view.exceptions.len(), 2);
    let html = s.render(&viewer("vera", Role::Viewer));
    let section = html
        .split("<section class=\"exceptions\"")
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .expect("an exceptions section");
    assert!(section.contains("Exceptions from enforcement"));
    let trip = section
        .split("<tr>")
        .find(|row| row.contains("<code>trip</code>"))
        .expect("the row of `trip`");
    assert!(
        trip.contains("user <span class=\"text\">carol@contoso.com</span>"),
        "{trip}"
    );
    assert!(trip.contains("travelling &lt;abroad&gt;"), "{trip}");
    assert!(trip.contains("dana at "), "{trip}");
    let until = &view
        .exceptions
        .iter()
        .find(|e| e.name == "trip")
        .unwrap()
        .until;
    assert!(
        trip.contains(&format!("<time datetime=\"{until}\">")),
        "{trip}"
    );
    let lab = section
        .split("<tr>")
        .find(|row| row.contains("<code>lab</code>"))
        .expect("the row of `lab`");
    assert!(
        lab.contains("group <span class=\"text\">Lab Devices</span>"),
        "{lab}"
    );
    assert!(lab.contains("erin at "), "{lab}");
}
