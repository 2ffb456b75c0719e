//! One rollout: status, phase graph, every gate criterion against the latest counts, the evidence
//! over time, the decisions a person may take, and the audit trail.

use std::fmt::Write;

use super::Viewer;
use super::change;
use super::chart::{chart_points, chart_svg};
use super::graph::phase_graph;
use super::html::{
    self, Esc, csrf_field, readable_time, rollout_url, state_badge, status_badge, time,
};
use crate::cli::view::{ApprovalsView, ObservationView, PhaseView, RolloutView, thousands};
use crate::domain::event::EventKind;
use crate::domain::plan::{Phase, Plan, RollbackWhen, format_percent, identity_key};
use crate::domain::time::{Timestamp, format_span};
use crate::store::EventRecord;

/// Everything a rollout's page shows.
pub struct RolloutPage<'a> {
    pub view: &'a RolloutView,
    /// The plan the rollout runs (the version its `plan_hash` names).
    pub plan: &'a Plan,
    /// The whole audit trail, oldest first.
    pub history: &'a [EventRecord],
    /// The trail's verification: `Ok(events checked)` or what is broken.
    pub verified: Result<u64, String>,
    /// The value of the hidden `csrf` field in every form.
    pub csrf: &'a str,
}

/// Statuses in which the machine accepts an approval, and a rejection.
const APPROVABLE: [&str; 6] = [
    "running",
    "waiting_approval",
    "held",
    "paused",
    "drifted",
    "waiting_tenant_approval",
];
const REJECTABLE: [&str; 3] = ["running", "waiting_approval", "held"];

fn is_watched(state: &str) -> bool {
    matches!(state, "soaking" | "awaiting_approval")
}

fn is_applied(state: &str) -> bool {
    matches!(
        state,
        "applying" | "soaking" | "awaiting_approval" | "promoted"
    )
}

/// The page of one rollout, for `viewer`.
pub fn rollout_page(page: &RolloutPage<'_>, viewer: &Viewer) -> String {
    let view = page.view;
    let mut main = String::new();
    let _ = writeln!(
        main,
        "<h1>Rollout <code>{}</code></h1>\n\
         <nav class=\"toc\" aria-label=\"On this page\"><a href=\"#status\">Status</a> \
         <a href=\"#phases\">Phases and gates</a> <a href=\"#evidence\">Evidence over time</a> \
         <a href=\"#decisions\">Decisions</a> <a href=\"#audit\">Audit trail</a></nav>\n\
         <p id=\"live-status\" class=\"live\" role=\"status\" aria-live=\"polite\"></p>",
        Esc(&view.id)
    );
    let _ = writeln!(
        main,
        "<div id=\"rollout\" data-rollout-id=\"{}\">",
        Esc(&view.id)
    );
    status_section(&mut main, page);
    phases_section(&mut main, page);
    evidence_section(&mut main, page);
    main.push_str(
        "<section id=\"decisions\" aria-labelledby=\"decisions-h\">\n<h2 id=\"decisions-h\">Decisions</h2>\n",
    );
    approval_panel(&mut main, page, viewer);
    operator_panel(&mut main, page, viewer);
    main.push_str("</section>\n");
    audit_section(&mut main, page);
    main.push_str("</div>\n");
    html::page(
        &format!("{} ({})", view.id, view.status),
        Some(viewer),
        &main,
    )
}

fn status_section(out: &mut String, page: &RolloutPage<'_>) {
    let view = page.view;
    let _ = writeln!(
        out,
        "<section id=\"status\" aria-labelledby=\"status-h\">\n<h2 id=\"status-h\">Status</h2>\n\
         <p class=\"status-line\">{}{}</p>\n<p class=\"reason text\">{}</p>",
        status_badge(&view.status),
        if view.needs_attention {
            " <span class=\"flag\">needs attention</span>"
        } else {
            ""
        },
        Esc(&view.reason)
    );
    if view.status == "waiting_approval" {
        out.push_str("<p><a href=\"#approval\">Review the gates, then decide</a></p>\n");
    }
    let current = if view.current_phases.is_empty() {
        "none".to_string()
    } else {
        view.current_phases
            .iter()
            .map(|p| format!("<code>{}</code>", Esc(p)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "<dl class=\"facts\">\n<dt>Plan</dt><dd><code>{}</code> <span class=\"hash\" title=\"{}\">{}</span>{}</dd>\n\
         <dt>Current phases</dt><dd>{current}</dd>\n\
         <dt>Started by</dt><dd>{} at {}</dd>\n<dt>Updated</dt><dd>{}</dd>\n<dt>Events</dt><dd>{}</dd>",
        Esc(&view.plan),
        Esc(&view.plan_hash),
        Esc(view.plan_hash.get(..12).unwrap_or(&view.plan_hash)),
        if page.plan.description.is_empty() {
            String::new()
        } else {
            format!(" — {}", Esc(&page.plan.description))
        },
        Esc(&view.created_by),
        time(&view.created_at),
        time(&view.updated_at),
        view.events
    );
    if !view.pending_effects.is_empty() {
        let _ = writeln!(
            out,
            "<dt>Pending effects</dt><dd>{}</dd>",
            view.pending_effects
                .iter()
                .map(|e| format!("<code>{}</code>", Esc(e)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    out.push_str("</dl>\n");
    if !view.drift.is_empty() {
        out.push_str(
            "<section class=\"drift\" aria-labelledby=\"drift-h\">\n<h3 id=\"drift-h\">Changed by someone else</h3>\n\
             <p>Nothing is written until a person re-applies phasegate's values, adopts these changes, or aborts.</p>\n\
             <table>\n<thead><tr><th scope=\"col\">Object</th><th scope=\"col\">Member</th>\
             <th scope=\"col\">phasegate expected</th><th scope=\"col\">Found</th></tr></thead>\n<tbody>\n",
        );
        for change in &view.drift {
            let _ = writeln!(
                out,
                "<tr><td class=\"text\">{}</td><td><code>{}</code></td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>",
                Esc(&change.object),
                Esc(&change.field),
                Esc(&change.expected),
                Esc(&change.found)
            );
        }
        out.push_str("</tbody>\n</table>\n</section>\n");
    }
    if let Some(held) = &view.tenant_approval {
        let _ = writeln!(
            out,
            "<section class=\"tenant-approval\" aria-labelledby=\"tenant-h\">\n<h3 id=\"tenant-h\">Held by the tenant</h3>\n\
             <p>Since {}, the tenant holds this change for approval by another administrator \
             (Multi Admin Approval): <span class=\"text\">{}</span></p>\n\
             <p>Request <code>{}</code>. Approve it in the Intune admin center; the rollout continues on its next run.</p>\n</section>",
            time(&held.since),
            Esc(&held.summary),
            Esc(&held.reference)
        );
    }
    change::freeze(out, view);
    change::exceptions(out, view);
    change::plan_changes(out, view);
    out.push_str("</section>\n");
}

fn phases_section(out: &mut String, page: &RolloutPage<'_>) {
    let plan = page.plan;
    out.push_str(
        "<section id=\"phases\" aria-labelledby=\"phases-h\">\n<h2 id=\"phases-h\">Phases and gates</h2>\n\
         <figure class=\"graph\">\n",
    );
    out.push_str(&phase_graph(plan, &page.view.phases));
    out.push_str(
        "<figcaption>Phases in plan order; an arrow runs from a phase to the phases that start once it is promoted.</figcaption>\n</figure>\n",
    );
    for &idx in &plan.order {
        let phase = &plan.phases[idx];
        let Some(record) = page.view.phases.get(idx) else {
            continue;
        };
        phase_details(out, plan, idx, phase, record);
    }
    out.push_str("</section>\n");
}

fn phase_details(out: &mut String, plan: &Plan, idx: usize, phase: &Phase, view: &PhaseView) {
    let open = (is_applied(&view.state) && view.state != "promoted") || view.observation.is_some();
    let _ = writeln!(
        out,
        "<details class=\"phase\" id=\"phase-{idx}\"{}>\n<summary><h3>Phase <code>{}</code> <span class=\"mode\">({} mode)</span> {}</h3></summary>",
        if open { " open" } else { "" },
        Esc(&phase.id),
        Esc(phase.mode.as_str()),
        state_badge(&view.state)
    );
    if !phase.description.is_empty() {
        let _ = writeln!(out, "<p class=\"text\">{}</p>", Esc(&phase.description));
    }
    let names = |names: &[String]| {
        names
            .iter()
            .map(|n| Esc(n).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let scope = if view.exclude.is_empty() {
        names(&view.include)
    } else {
        format!("{} except {}", names(&view.include), names(&view.exclude))
    };
    let after = if view.after.is_empty() {
        "nothing: starts with the rollout".to_string()
    } else {
        view.after
            .iter()
            .map(|a| format!("<code>{}</code>", Esc(a)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let grace = phase
        .grace
        .map(|g| format!(", owners get a grace period of {}", format_span(g)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "<dl class=\"facts\">\n<dt>Mode</dt><dd>{}{grace}</dd>\n<dt>Scope</dt><dd>{scope}</dd>\n<dt>After</dt><dd>{after}</dd>",
        phase.mode
    );
    if let Some(at) = &view.applied_at {
        let _ = writeln!(out, "<dt>Applied</dt><dd>{}</dd>", time(at));
    }
    if let Some(at) = &view.promoted_at {
        let _ = writeln!(out, "<dt>Promoted</dt><dd>{}</dd>", time(at));
    }
    if view.holds > 0 || view.held_since.is_some() {
        let since = view
            .held_since
            .as_ref()
            .map(|at| format!("; held since {}", time(at)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<dt>Holds</dt><dd>{} time{}{since}{}</dd>",
            view.holds,
            if view.holds == 1 { "" } else { "s" },
            if view.hold_expired {
                " — longer than <code>max_hold</code>: a person should look"
            } else {
                ""
            }
        );
    }
    if !phase.rollback_when.is_empty() {
        let _ = writeln!(
            out,
            "<dt>Rolls back on its own when</dt><dd>{}</dd>",
            Esc(&rollback_summary(&phase.rollback_when))
        );
    }
    out.push_str("</dl>\n");
    if let Some(observation) = &view.observation {
        observation_table(out, &phase.id, observation);
    }
    gate_table(out, plan, phase, view);
    if let Some(gate) = &view.gate {
        let _ = writeln!(
            out,
            "<p class=\"gate-outcome\">Gate verdict on the observation at {}: <span class=\"verdict {}\">{}</span></p>",
            time(&gate.evidence.observed_at),
            if gate.outcome == "pass" {
                "pass"
            } else if gate.outcome == "fail" {
                "fail"
            } else {
                "nodata"
            },
            Esc(&gate.outcome)
        );
        if !gate.reasons.is_empty() {
            out.push_str("<ul class=\"reasons\">\n");
            for reason in &gate.reasons {
                let _ = writeln!(out, "<li class=\"text\">{}</li>", Esc(reason));
            }
            out.push_str("</ul>\n");
        }
    }
    if !view.approvals.granted.is_empty() {
        out.push_str("<h4>Approvals</h4>\n<ul class=\"approvals\">\n");
        for approval in &view.approvals.granted {
            let ticket = approval
                .ticket
                .as_ref()
                .map(|t| format!(", ticket <code>{}</code>", Esc(t)))
                .unwrap_or_default();
            let comment = approval
                .comment
                .as_ref()
                .map(|c| format!(": <span class=\"text\">{}</span>", Esc(c)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "<li><strong>{}</strong> at {}{ticket}{comment}</li>",
                Esc(&approval.by),
                time(&approval.at)
            );
        }
        out.push_str("</ul>\n");
    }
    if let Some(check) = &view.forecast_check {
        change::forecast_check(out, check);
    }
    out.push_str("</details>\n");
}

fn rollback_summary(rollback: &RollbackWhen) -> String {
    let mut parts = Vec::new();
    if let Some(r) = rollback.noncompliant_ratio_above {
        parts.push(format!("noncompliant share above {r}"));
    }
    if let Some(n) = rollback.noncompliant_above {
        parts.push(format!("more than {n} noncompliant devices"));
    }
    if let Some(n) = rollback.errors_above {
        parts.push(format!("more than {n} devices with errors"));
    }
    if let Some(r) = rollback.blocked_ratio_above {
        parts.push(format!("blocked share above {r}"));
    }
    if let Some(n) = rollback.blocked_signins_above {
        parts.push(format!("more than {n} blocked sign-ins"));
    }
    if let Some(r) = rollback.blocked_signin_ratio_above {
        parts.push(format!("share of users blocked signing in above {r}"));
    }
    parts.join(", or ")
}

fn observation_table(out: &mut String, phase: &str, o: &ObservationView) {
    let _ = writeln!(
        out,
        "<table class=\"counts\">\n<caption>Latest counts of <code>{}</code>, observed {}</caption>\n<thead><tr>\
         <th scope=\"col\">Devices</th><th scope=\"col\">Targeted</th><th scope=\"col\">Reported</th>\
         <th scope=\"col\">Compliant</th><th scope=\"col\">Noncompliant</th><th scope=\"col\">In grace</th>\
         <th scope=\"col\">Errors</th><th scope=\"col\">Conflicts</th><th scope=\"col\">Unknown</th>\
         <th scope=\"col\">Stale</th><th scope=\"col\">Blocked</th></tr></thead>\n<tbody>",
        Esc(phase),
        time(&o.at)
    );
    let _ = writeln!(
        out,
        "<tr><th scope=\"row\">all</th>{}</tr>",
        [
            o.targeted,
            o.reported,
            o.compliant,
            o.noncompliant,
            o.in_grace,
            o.errors,
            o.conflicts,
            o.unknown,
            o.stale,
            o.blocked_devices_estimate
        ]
        .iter()
        .map(|n| format!("<td class=\"num\">{}</td>", thousands(*n)))
        .collect::<String>()
    );
    for p in &o.by_platform {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th>{}</tr>",
            Esc(&p.platform),
            [
                Some(p.targeted),
                Some(p.reported),
                Some(p.compliant),
                Some(p.noncompliant),
                Some(p.in_grace),
                Some(p.errors),
                None,
                Some(p.unknown),
                Some(p.stale),
                Some(p.blocked)
            ]
            .iter()
            .map(|n| match n {
                Some(n) => format!("<td class=\"num\">{}</td>", thousands(*n)),
                None => "<td class=\"num\">–</td>".to_string(),
            })
            .collect::<String>()
        );
    }
    out.push_str("</tbody>\n</table>\n");
    match &o.signins {
        Some(s) if s.availability == "observed" => {
            let _ = writeln!(
                out,
                "<p class=\"signins\">Sign-ins since {}: {} by {} users; <strong>{} blocked</strong> ({} users), {} would be blocked (report-only){}. The devices' Blocked column is an estimate.</p>",
                s.since.as_deref().map(time).unwrap_or_default(),
                thousands(s.signins),
                thousands(s.users),
                thousands(s.blocked),
                thousands(s.blocked_users),
                thousands(s.would_block),
                if s.truncated { ", at least" } else { "" }
            );
        }
        Some(s) => {
            let _ = writeln!(
                out,
                "<p class=\"signins\">Sign-ins not available: {}. Blocked is the devices' estimate.</p>",
                Esc(s.reason.as_deref().unwrap_or(""))
            );
        }
        None => {}
    }
    if let Some(at) = &o.earliest_block {
        let _ = writeln!(
            out,
            "<p>{} device{} in grace; none of them is blocked before {}.</p>",
            thousands(o.in_grace),
            if o.in_grace == 1 { "" } else { "s" },
            time(at)
        );
    }
}

/// Pass, fail, or not enough data to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Fail,
    NoData,
}

impl Verdict {
    fn of(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Fail }
    }

    fn html(self) -> &'static str {
        match self {
            Verdict::Pass => "<span class=\"verdict pass\">pass</span>",
            Verdict::Fail => "<span class=\"verdict fail\">fail</span>",
            Verdict::NoData => "<span class=\"verdict nodata\">no data</span>",
        }
    }
}

/// One criterion of a gate against the latest observation. `observed` is HTML.
pub(crate) struct GateRow {
    pub criterion: &'static str,
    pub threshold: String,
    pub observed: String,
    pub verdict: Verdict,
}

fn ts(text: &Option<String>) -> Option<Timestamp> {
    text.as_deref().and_then(Timestamp::parse_rfc3339)
}

fn span_between(start: Timestamp, end: Timestamp) -> String {
    format_span(end.since(start))
}

/// Every criterion of `phase`'s gate, as the state machine judges it (`gate::evaluate`, and the
/// soak, approval and hold rules of `machine`), against the phase's record.
pub(crate) fn gate_rows(phase: &Phase, view: &PhaseView) -> Vec<GateRow> {
    let gate = &phase.gate;
    let obs = view.observation.as_ref();
    let mut rows = Vec::new();
    let no_observation = || "no observation yet".to_string();
    let reported = obs.map_or(0, |o| o.reported);
    let failing = obs.map_or(0, |o| o.noncompliant + o.in_grace + o.conflicts);

    if let Some(min) = gate.min_reporting {
        let (observed, verdict) = match obs {
            None => (no_observation(), Verdict::NoData),
            Some(o) if o.targeted == 0 => ("no devices targeted".to_string(), Verdict::NoData),
            Some(o) => {
                let coverage = o.reported as f64 / o.targeted as f64;
                (
                    format!(
                        "{} ({} of {} reported)",
                        format_percent(coverage),
                        thousands(o.reported),
                        thousands(o.targeted)
                    ),
                    Verdict::of(coverage >= min.fraction()),
                )
            }
        };
        rows.push(GateRow {
            criterion: "Reporting coverage",
            threshold: format!(
                "at least {min} (reported within {})",
                format_span(gate.stale_after)
            ),
            observed,
            verdict,
        });
    }
    let counted = |value: String, ok: bool| match obs {
        None => (no_observation(), Verdict::NoData),
        Some(_) if reported == 0 => ("no device reported".to_string(), Verdict::NoData),
        Some(_) => (value, Verdict::of(ok)),
    };
    if let Some(max) = gate.max_noncompliant_ratio {
        let ratio = failing as f64 / reported.max(1) as f64;
        let (observed, verdict) = counted(
            format!(
                "{} ({} of {} reporting)",
                format_percent(ratio),
                thousands(failing),
                thousands(reported)
            ),
            ratio <= max.fraction(),
        );
        rows.push(GateRow {
            criterion: "Noncompliant share",
            threshold: format!("at most {max}"),
            observed,
            verdict,
        });
    }
    if let Some(max) = gate.max_noncompliant {
        let (observed, verdict) =
            counted(format!("{} devices", thousands(failing)), failing <= max);
        rows.push(GateRow {
            criterion: "Noncompliant devices",
            threshold: format!("at most {}", thousands(max)),
            observed,
            verdict,
        });
    }
    let errors = obs.map_or(0, |o| o.errors);
    if let Some(max) = gate.max_errors {
        let (observed, verdict) = counted(format!("{} devices", thousands(errors)), errors <= max);
        rows.push(GateRow {
            criterion: "Devices with errors",
            threshold: format!("at most {}", thousands(max)),
            observed,
            verdict,
        });
    }
    if let Some(max) = gate.max_error_ratio {
        let ratio = errors as f64 / reported.max(1) as f64;
        let (observed, verdict) = counted(
            format!(
                "{} ({} of {} reporting)",
                format_percent(ratio),
                thousands(errors),
                thousands(reported)
            ),
            ratio <= max.fraction(),
        );
        rows.push(GateRow {
            criterion: "Error share",
            threshold: format!("at most {max}"),
            observed,
            verdict,
        });
    }
    // Sign-in criteria, judged as `signins::judge` does: not available is no data.
    let signins = obs.and_then(|o| o.signins.as_ref());
    let signin_row = |value: Option<(String, bool)>| match (obs, signins) {
        (None, _) => (no_observation(), Verdict::NoData),
        (Some(_), None) => ("sign-ins not read yet".to_string(), Verdict::NoData),
        (Some(_), Some(s)) if s.availability != "observed" => (
            format!("not available: {}", s.reason.as_deref().unwrap_or("")),
            Verdict::NoData,
        ),
        (Some(_), Some(_)) => match value {
            Some((text, ok)) => (text, Verdict::of(ok)),
            None => ("no sign-ins in the window".to_string(), Verdict::NoData),
        },
    };
    if let Some(max) = gate.max_blocked_signins {
        let (observed, verdict) = signin_row(signins.map(|s| {
            let impact = s.blocked + s.would_block;
            (
                format!(
                    "{} ({} blocked, {} report-only)",
                    thousands(impact),
                    thousands(s.blocked),
                    thousands(s.would_block)
                ),
                impact <= max,
            )
        }));
        rows.push(GateRow {
            criterion: "Blocked sign-ins",
            threshold: format!("at most {}", thousands(max)),
            observed,
            verdict,
        });
    }
    if let Some(max) = gate.max_blocked_signin_ratio {
        let (observed, verdict) = signin_row(signins.and_then(|s| {
            (s.users > 0).then(|| {
                let ratio = s.affected_users as f64 / s.users as f64;
                (
                    format!(
                        "{} ({} of {} users)",
                        format_percent(ratio),
                        thousands(s.affected_users),
                        thousands(s.users)
                    ),
                    ratio <= max.fraction(),
                )
            })
        }));
        rows.push(GateRow {
            criterion: "Users blocked signing in",
            threshold: format!("at most {max}"),
            observed,
            verdict,
        });
    }
    if gate.approvals > 0 {
        let granted = &view.approvals.granted;
        let by = if granted.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                granted
                    .iter()
                    .map(|a| Esc(&a.by).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let have = granted.len() as u64;
        let need = u64::from(gate.approvals);
        let verdict = if have >= need {
            Verdict::Pass
        } else if is_watched(&view.state) {
            Verdict::Fail
        } else {
            Verdict::NoData
        };
        rows.push(GateRow {
            criterion: "Approvals",
            threshold: format!(
                "{} approval{}",
                gate.approvals,
                if gate.approvals == 1 { "" } else { "s" }
            ),
            observed: format!("{have} of {need}{by}"),
            verdict,
        });
    }
    let applied = ts(&view.applied_at);
    let soak_end = applied.map(|at| at.plus(phase.min_soak));
    let (observed, verdict) = match (applied, view.state.as_str()) {
        (Some(at), "promoted") => match ts(&view.promoted_at) {
            Some(promoted) => (
                format!("soaked {}", span_between(at, promoted)),
                Verdict::Pass,
            ),
            None => ("promoted".to_string(), Verdict::Pass),
        },
        (None, _) => ("not applied".to_string(), Verdict::NoData),
        (Some(at), _) => match obs.and_then(|o| Timestamp::parse_rfc3339(&o.at)) {
            Some(observed_at) if observed_at >= at => {
                let done = soak_end.is_some_and(|end| observed_at >= end);
                (
                    format!(
                        "{} at the latest observation{}",
                        span_between(at, observed_at),
                        if done { "" } else { " (still soaking)" }
                    ),
                    Verdict::of(done),
                )
            }
            _ => ("applied, not observed since".to_string(), Verdict::NoData),
        },
    };
    rows.push(GateRow {
        criterion: "Soak time",
        threshold: match soak_end {
            Some(end) if view.state != "promoted" => format!(
                "at least {} (until {})",
                format_span(phase.min_soak),
                readable_time(&end.rfc3339())
            ),
            _ => format!("at least {}", format_span(phase.min_soak)),
        },
        observed,
        verdict,
    });
    let (observed, verdict) = if view.state == "promoted" {
        (held_times(view.holds, "never held"), Verdict::Pass)
    } else if !is_watched(&view.state) {
        ("not running".to_string(), Verdict::NoData)
    } else if let Some(since) = &view.held_since {
        let observed_at = obs.and_then(|o| Timestamp::parse_rfc3339(&o.at));
        let how_long = match (ts(&view.held_since), observed_at) {
            (Some(start), Some(end)) if end > start => {
                format!(" ({} at the latest observation)", span_between(start, end))
            }
            _ => String::new(),
        };
        (
            format!(
                "held since {}{how_long}{}",
                time(since),
                if view.hold_expired {
                    "; longer than allowed"
                } else {
                    ""
                }
            ),
            Verdict::of(!view.hold_expired),
        )
    } else {
        (held_times(view.holds, "not held"), Verdict::Pass)
    };
    rows.push(GateRow {
        criterion: "Hold time",
        threshold: format!("at most {}", format_span(gate.max_hold)),
        observed,
        verdict,
    });
    rows
}

fn held_times(holds: u32, none: &str) -> String {
    match holds {
        0 => none.to_string(),
        1 => "not held now (held once before)".to_string(),
        n => format!("not held now (held {n} times before)"),
    }
}

fn gate_table(out: &mut String, plan: &Plan, phase: &Phase, view: &PhaseView) {
    let judged = view
        .observation
        .as_ref()
        .map(|o| format!(", against the observation at {}", time(&o.at)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "<table class=\"gate\">\n<caption>Gate of <code>{}</code>{judged}. Devices without a report within {} count as stale, never as compliant; observed every {}.</caption>\n\
         <thead><tr><th scope=\"col\">Criterion</th><th scope=\"col\">Threshold</th><th scope=\"col\">Observed</th><th scope=\"col\">Verdict</th></tr></thead>\n<tbody>",
        Esc(&phase.id),
        format_span(phase.gate.stale_after),
        format_span(plan.observe_every)
    );
    for row in gate_rows(phase, view) {
        let _ = writeln!(
            out,
            "<tr class=\"criterion\"><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
            row.criterion,
            Esc(&row.threshold),
            row.observed,
            row.verdict.html()
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

fn evidence_section(out: &mut String, page: &RolloutPage<'_>) {
    let points = chart_points(page.history);
    out.push_str(
        "<section id=\"evidence\" aria-labelledby=\"evidence-h\">\n<h2 id=\"evidence-h\">Evidence over time</h2>\n<figure class=\"chart\">\n",
    );
    out.push_str(&chart_svg(&points));
    out.push_str(
        "<figcaption>Every observation in the audit trail, per phase: the noncompliant share of the devices that reported, the share of targeted devices that reported, and the devices blocked.</figcaption>\n</figure>\n",
    );
    if !points.is_empty() {
        out.push_str(
            "<details class=\"chart-data\">\n<summary>The chart's data as a table</summary>\n<table>\n\
             <thead><tr><th scope=\"col\">Observed</th><th scope=\"col\">Phase</th><th scope=\"col\">Noncompliant</th>\
             <th scope=\"col\">Coverage</th><th scope=\"col\">Blocked</th></tr></thead>\n<tbody>\n",
        );
        for p in &points {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                time(&p.at.rfc3339()),
                Esc(&p.phase),
                p.noncompliant_ratio.map_or("–".to_string(), format_percent),
                p.coverage.map_or("–".to_string(), format_percent),
                thousands(p.blocked)
            );
        }
        out.push_str("</tbody>\n</table>\n</details>\n");
    }
    out.push_str("</section>\n");
}

/// The confirmation every approval and rejection needs; `required` makes browsers insist without
/// a script, and the serve side checks `confirm=yes` again.
fn confirm_box(out: &mut String, id: &str, text: &str) {
    let _ = writeln!(
        out,
        "<p class=\"confirm\"><input type=\"checkbox\" id=\"{id}\" name=\"confirm\" value=\"yes\" required> <label for=\"{id}\">{text}</label></p>"
    );
}

fn approval_panel(out: &mut String, page: &RolloutPage<'_>, viewer: &Viewer) {
    let view = page.view;
    let plan = page.plan;
    out.push_str(
        "<section id=\"approval\" aria-labelledby=\"approval-h\">\n<h3 id=\"approval-h\">Approval</h3>\n",
    );
    let waiting: Vec<usize> = plan
        .order
        .iter()
        .copied()
        .filter(|&idx| {
            plan.phases[idx].gate.approvals > 0
                && view.phases.get(idx).is_some_and(|p| is_watched(&p.state))
        })
        .collect();
    let may_approve = APPROVABLE.contains(&view.status.as_str());
    if waiting.is_empty() || !may_approve {
        out.push_str("<p>No phase is waiting for an approval.</p>\n</section>\n");
        return;
    }
    for idx in waiting {
        let phase = &plan.phases[idx];
        let record = &view.phases[idx];
        let who_may = who_may_approve(phase, &record.approvals);
        let have = record.approvals.granted.len();
        let need = phase.gate.approvals as usize;
        let _ = writeln!(
            out,
            "<div class=\"decision\">\n<h4>Promotion of <code>{}</code> to the next phase</h4>\n<p>{}; {} of {} approval{} granted. <a href=\"#phase-{idx}\">Review its gate</a>.</p>",
            Esc(&phase.id),
            if record.state == "awaiting_approval" {
                "Its gate passed and it waits for approval".to_string()
            } else {
                "It is still soaking: an approval given now counts once its gate passes".to_string()
            },
            have,
            need,
            if need == 1 { "" } else { "s" }
        );
        change::forecasts(out, idx, &record.forecasts);
        if !viewer.role.can_approve() {
            let _ = writeln!(
                out,
                "<p class=\"who-may\">{who_may} You are signed in as {} ({}).</p>\n</div>",
                Esc(&viewer.name),
                viewer.role
            );
            continue;
        }
        let me = identity_key(&viewer.name);
        let sealed_off = record.approvals.barred.iter().find(|b| b.who == me);
        let already = record.approvals.granted.iter().find(|a| a.by == me);
        if let Some(barred) = sealed_off {
            let _ = writeln!(
                out,
                "<p class=\"who-may\">Separation of duties: you {}, so someone else must approve it.</p>",
                Esc(barred.why.as_str())
            );
        } else if !phase.approval.allows(&me) {
            let _ = writeln!(
                out,
                "<p class=\"who-may\">{who_may} You are signed in as {}.</p>",
                Esc(&viewer.name)
            );
        } else if let Some(approval) = already {
            let _ = writeln!(
                out,
                "<p>You approved this phase at {}.</p>",
                time(&approval.at)
            );
        } else {
            let _ = writeln!(
                out,
                "<form class=\"approve\" method=\"post\" action=\"{}\">\n{}\n<input type=\"hidden\" name=\"phase\" value=\"{}\">",
                rollout_url(&view.id, "approve"),
                csrf_field(page.csrf),
                Esc(&phase.id)
            );
            // The approval binds to the evidence this page shows: a change before the click
            // makes the machine refuse it and ask again.
            if let Some(digest) = &record.digest {
                let _ = writeln!(
                    out,
                    "<input type=\"hidden\" name=\"digest\" value=\"{}\">",
                    Esc(digest)
                );
            }
            let _ = writeln!(
                out,
                "<p><label for=\"approve-ticket-{idx}\">Change ticket</label>\n<input type=\"text\" id=\"approve-ticket-{idx}\" name=\"ticket\" autocomplete=\"off\"></p>\n\
                 <p><label for=\"approve-comment-{idx}\">Comment</label>\n<textarea id=\"approve-comment-{idx}\" name=\"comment\" rows=\"3\"></textarea></p>"
            );
            confirm_box(
                out,
                &format!("approve-confirm-{idx}"),
                "I have reviewed the evidence",
            );
            let _ = writeln!(
                out,
                "<p><button type=\"submit\" class=\"primary\">Approve <code>{}</code></button></p>\n</form>",
                Esc(&phase.id)
            );
        }
        if REJECTABLE.contains(&view.status.as_str()) {
            let _ = writeln!(
                out,
                "<form class=\"reject\" method=\"post\" action=\"{}\">\n{}\n<input type=\"hidden\" name=\"phase\" value=\"{}\">\n\
                 <p><label for=\"reject-reason-{idx}\">Reason for rejecting</label>\n<textarea id=\"reject-reason-{idx}\" name=\"reason\" rows=\"2\" required></textarea></p>",
                rollout_url(&view.id, "reject"),
                csrf_field(page.csrf),
                Esc(&phase.id)
            );
            confirm_box(
                out,
                &format!("reject-confirm-{idx}"),
                "I have reviewed the evidence",
            );
            let _ = writeln!(
                out,
                "<p><button type=\"submit\" class=\"danger\">Reject the promotion of <code>{}</code></button></p>\n</form>",
                Esc(&phase.id)
            );
        }
        out.push_str("</div>\n");
    }
    out.push_str("</section>\n");
}

fn operator_panel(out: &mut String, page: &RolloutPage<'_>, viewer: &Viewer) {
    let view = page.view;
    let status = view.status.as_str();
    out.push_str(
        "<section id=\"operations\" aria-labelledby=\"operations-h\">\n<h3 id=\"operations-h\">Operations</h3>\n",
    );
    if !viewer.role.can_operate() {
        let _ = writeln!(
            out,
            "<p class=\"who-may\">People with the operator or admin role may pause, resume and roll back, and decide about drift. You are signed in as {} ({}).</p>\n</section>",
            Esc(&viewer.name),
            viewer.role
        );
        return;
    }
    let can_pause = matches!(status, "running" | "waiting_approval" | "held");
    let can_resume = matches!(status, "paused" | "failed" | "rolled_back" | "rejected")
        || (status == "held" && view.phases.iter().any(|p| p.hold_expired));
    let can_roll_back = !matches!(
        status,
        "pending" | "rolling_back" | "aborting" | "aborted" | "drifted"
    ) && view.phases.iter().any(|p| is_applied(&p.state));
    let drifted = !view.drift.is_empty();
    if !(can_pause || can_resume || can_roll_back || drifted) {
        let _ = writeln!(
            out,
            "<p>No operation applies while the rollout is {}.</p>\n</section>",
            Esc(html::status_label(status).to_lowercase().as_str())
        );
        return;
    }
    if drifted {
        let _ = writeln!(
            out,
            "<form class=\"drift\" method=\"post\" action=\"{}\">\n{}\n<fieldset>\n<legend>What to do about the drift</legend>\n\
             <p><input type=\"radio\" id=\"drift-reapply\" name=\"decision\" value=\"reapply\" required> <label for=\"drift-reapply\">Re-apply: write phasegate's values back</label></p>\n\
             <p><input type=\"radio\" id=\"drift-adopt\" name=\"decision\" value=\"adopt\"> <label for=\"drift-adopt\">Adopt: keep the other administrator's values; phasegate stops managing those members</label></p>\n\
             </fieldset>\n<p><label for=\"drift-reason\">Reason</label>\n<textarea id=\"drift-reason\" name=\"reason\" rows=\"2\" required></textarea></p>\n\
             <p><button type=\"submit\">Decide</button></p>\n</form>",
            rollout_url(&view.id, "drift"),
            csrf_field(page.csrf)
        );
    }
    if can_pause {
        let _ = writeln!(
            out,
            "<form class=\"pause\" method=\"post\" action=\"{}\">\n{}\n<p><label for=\"pause-reason\">Reason for pausing</label>\n\
             <input type=\"text\" id=\"pause-reason\" name=\"reason\" autocomplete=\"off\"></p>\n<p><button type=\"submit\">Pause</button></p>\n</form>",
            rollout_url(&view.id, "pause"),
            csrf_field(page.csrf)
        );
    }
    if can_resume {
        let _ = writeln!(
            out,
            "<form class=\"resume\" method=\"post\" action=\"{}\">\n{}\n<p><label for=\"resume-reason\">Reason for resuming</label>\n\
             <input type=\"text\" id=\"resume-reason\" name=\"reason\" autocomplete=\"off\"></p>\n<p><button type=\"submit\">Resume</button></p>\n</form>",
            rollout_url(&view.id, "resume"),
            csrf_field(page.csrf)
        );
    }
    if can_roll_back {
        let mut options = String::from("<option value=\"\">one phase back</option>");
        for &idx in &page.plan.order {
            if let Some(p) = view.phases.get(idx)
                && p.state == "promoted"
            {
                let _ = write!(
                    options,
                    "<option value=\"{}\">back to {}</option>",
                    Esc(&p.id),
                    Esc(&p.id)
                );
            }
        }
        let _ = writeln!(
            out,
            "<form class=\"rollback\" method=\"post\" action=\"{}\">\n{}\n\
             <p><label for=\"rollback-to\">Roll back to</label>\n<select id=\"rollback-to\" name=\"to\">{options}</select></p>\n\
             <p><label for=\"rollback-reason\">Reason for rolling back</label>\n<textarea id=\"rollback-reason\" name=\"reason\" rows=\"2\" required></textarea></p>\n\
             <p><button type=\"submit\" class=\"danger\">Roll back</button></p>\n</form>",
            rollout_url(&view.id, "rollback"),
            csrf_field(page.csrf)
        );
    }
    out.push_str("</section>\n");
}

fn audit_section(out: &mut String, page: &RolloutPage<'_>) {
    out.push_str(
        "<section id=\"audit\" aria-labelledby=\"audit-h\">\n<h2 id=\"audit-h\">Audit trail</h2>\n",
    );
    match &page.verified {
        Ok(n) => {
            let _ = writeln!(
                out,
                "<p class=\"verify ok\">✓ audit trail verified, {n} event{}</p>",
                if *n == 1 { "" } else { "s" }
            );
        }
        Err(error) => {
            let _ = writeln!(
                out,
                "<p class=\"verify broken\" role=\"alert\">✗ audit trail verification failed: {}</p>",
                Esc(error)
            );
        }
    }
    out.push_str(
        "<table class=\"audit\">\n<thead><tr><th scope=\"col\">#</th><th scope=\"col\">Time</th><th scope=\"col\">Event</th>\
         <th scope=\"col\">Trigger</th><th scope=\"col\">Status</th><th scope=\"col\">Notes</th><th scope=\"col\">Hash</th></tr></thead>\n<tbody>\n",
    );
    for record in page.history {
        let trigger = &record.event.trigger;
        let reason = if trigger.reason.is_empty() {
            String::new()
        } else {
            format!(": <span class=\"text\">{}</span>", Esc(&trigger.reason))
        };
        let status = if record.previous_status == record.status {
            status_badge(record.status.as_str())
        } else {
            format!(
                "{} → {}",
                status_badge(record.previous_status.as_str()),
                status_badge(record.status.as_str())
            )
        };
        let notes = if record.notes.is_empty() {
            String::new()
        } else {
            format!(
                "<ul>{}</ul>",
                record
                    .notes
                    .iter()
                    .map(|n| format!("<li class=\"text\">{}</li>", Esc(n)))
                    .collect::<String>()
            )
        };
        let hash = record.hash.get(..8).unwrap_or(&record.hash);
        let _ = writeln!(
            out,
            "<tr class=\"event\" id=\"event-{}\"><td class=\"num\">{}</td><td>{}</td><td><code>{}</code>{}</td>\
             <td><span class=\"source\">{}</span> {}{reason}</td><td>{status}</td><td>{notes}</td>\
             <td><code title=\"{}\">{}</code></td></tr>",
            record.seq,
            record.seq,
            time(&record.at.rfc3339()),
            record.event.kind.name(),
            event_detail(&record.event.kind),
            trigger.source.as_str(),
            Esc(&trigger.actor),
            Esc(&record.hash),
            Esc(hash)
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

/// What an event carries besides its kind, as HTML.
fn event_detail(kind: &EventKind) -> String {
    let detail = match kind {
        EventKind::Observed { observations } => observations
            .iter()
            .map(|o| {
                format!(
                    "<code>{}</code>: {} targeted, {} reported, {} noncompliant ({}), {} blocked",
                    Esc(&o.phase),
                    thousands(o.tally.targeted),
                    thousands(o.tally.reported()),
                    thousands(o.tally.failing()),
                    o.tally
                        .noncompliant_ratio()
                        .map_or("–".to_string(), format_percent),
                    thousands(o.tally.blocked)
                )
            })
            .collect::<Vec<_>>()
            .join("<br>"),
        EventKind::ApprovalGranted {
            phase,
            ticket,
            comment,
            ..
        } => {
            let mut text = format!("approves <code>{}</code>", Esc(phase));
            if let Some(ticket) = ticket {
                let _ = write!(text, ", ticket <code>{}</code>", Esc(ticket));
            }
            if let Some(comment) = comment {
                let _ = write!(text, ": <span class=\"text\">{}</span>", Esc(comment));
            }
            text
        }
        EventKind::ApprovalRejected { phase } => format!("rejects <code>{}</code>", Esc(phase)),
        EventKind::ApprovalRefused { phase, why, .. } => format!(
            "approval of <code>{}</code> refused: {}",
            Esc(phase),
            Esc(why)
        ),
        EventKind::RollbackRequested { to: Some(to) } => format!("to <code>{}</code>", Esc(to)),
        EventKind::RollbackRequested { to: None } => "by one phase".to_string(),
        EventKind::Reconciled { effect, changes } => format!(
            "effect {effect}, {changes} change{}",
            if *changes == 1 { "" } else { "s" }
        ),
        EventKind::BaselineCaptured { effect } => format!("effect {effect}"),
        EventKind::ProviderFailed { effect, error } => format!(
            "{}<span class=\"text\">{}</span>",
            effect.map(|e| format!("effect {e}: ")).unwrap_or_default(),
            Esc(error)
        ),
        EventKind::Delivered { effect, status } => format!("effect {effect}, HTTP {status}"),
        EventKind::RecipientsResolved { effect, recipients } => format!(
            "effect {effect}: {} address{} from the directory{}{}",
            recipients.addresses.len(),
            if recipients.addresses.len() == 1 {
                ""
            } else {
                "es"
            },
            if recipients.without_mail.is_empty() {
                String::new()
            } else {
                format!(", {} without a mail address", recipients.without_mail.len())
            },
            if recipients.disabled.is_empty() {
                String::new()
            } else {
                format!(", {} disabled", recipients.disabled.len())
            }
        ),
        EventKind::ApproversRead { groups } => groups
            .iter()
            .map(|(name, g)| match &g.error {
                Some(error) => format!("{}: <span class=\"text\">{}</span>", Esc(name), Esc(error)),
                None => format!("{}: {} identities", Esc(name), g.members.len()),
            })
            .collect::<Vec<_>>()
            .join("<br>"),
        EventKind::NotificationDropped { effect, reason } => format!(
            "effect {effect}: <span class=\"text\">{}</span>",
            Esc(reason)
        ),
        EventKind::DriftDetected { changes, .. } => changes
            .iter()
            .map(|c| format!("<span class=\"text\">{}</span>", Esc(&c.to_string())))
            .collect::<Vec<_>>()
            .join("<br>"),
        EventKind::DriftResolved { resolution } => resolution.as_str().to_string(),
        EventKind::TenantApprovalPending { request, .. } => format!(
            "<span class=\"text\">{}</span> (request <code>{}</code>)",
            Esc(&request.summary),
            Esc(&request.reference)
        ),
        EventKind::Start { plan_hash }
        | EventKind::PlanChanged { plan_hash }
        | EventKind::PlanChangeApproved { plan_hash, .. }
        | EventKind::PlanChangeRejected { plan_hash }
        | EventKind::PlanFileChanged { plan_hash, .. } => format!(
            "plan <span class=\"hash\">{}</span>",
            Esc(plan_hash.get(..12).unwrap_or(plan_hash))
        ),
        EventKind::PlanChangeProposed { plan_hash, weakens } => format!(
            "plan <span class=\"hash\">{}</span>: <span class=\"text\">{}</span>",
            Esc(plan_hash.get(..12).unwrap_or(plan_hash)),
            Esc(&weakens.join("; "))
        ),
        EventKind::ExceptionGranted {
            name,
            subject,
            until,
        } => format!(
            "exception <code>{}</code>: {} until {}",
            Esc(name),
            Esc(&subject.to_string()),
            match until {
                crate::domain::event::Until::At(at) => at.rfc3339(),
                crate::domain::event::Until::AfterSecs(secs) => format!("{secs} s after"),
            }
        ),
        EventKind::ExceptionRevoked { name } => format!("exception <code>{}</code>", Esc(name)),
        EventKind::ExceptionExpired { names } => {
            format!("exception <code>{}</code>", Esc(&names.join(", ")))
        }
        EventKind::FreezeOverridden
        | EventKind::Tick
        | EventKind::PauseRequested
        | EventKind::ResumeRequested
        | EventKind::AbortRequested => String::new(),
    };
    if detail.is_empty() {
        detail
    } else {
        format!("<div class=\"detail\">{detail}</div>")
    }
}

/// Who may approve a phase, and whom separation of duties bars, in a sentence.
fn who_may_approve(phase: &Phase, approvals: &ApprovalsView) -> String {
    let who = if phase.approval.names_approvers() {
        format!(
            "Only {} may approve (with the approver or admin role)",
            Esc(&phase.approval.who())
        )
    } else {
        "People with the approver or admin role may approve".to_string()
    };
    let barred: Vec<String> = approvals
        .barred
        .iter()
        .map(|b| format!("{} who {}", Esc(&b.who), Esc(&b.why)))
        .collect();
    if barred.is_empty() {
        format!("{who}.")
    } else {
        format!(
            "{who}, except {} (separation of duties).",
            barred.join(" and ")
        )
    }
}
