//! The list of every rollout, grouped by status, those that need a person first.

use std::fmt::Write;

use super::Viewer;
use super::html::{Esc, page, rollout_url, segment, status_badge, status_label, time};
use crate::cli::view::RolloutView;

/// The order of the groups: what needs a person first (a failure before everything, as the CLI's
/// exit code does), then what automation is busy with, then what is over.
const ORDER: [&str; 14] = [
    "failed",
    "drifted",
    "waiting_tenant_approval",
    "held",
    "waiting_approval",
    "rejected",
    "rolled_back",
    "aborted",
    "paused",
    "running",
    "rolling_back",
    "aborting",
    "pending",
    "completed",
];

/// Where a status's group goes: the attention statuses (and `failed`) first, in [`ORDER`]; any
/// status this build does not know after the others.
fn rank(view: &RolloutView) -> (bool, usize) {
    let known = ORDER.iter().position(|s| *s == view.status);
    let attention = view.needs_attention || view.status == "failed";
    (!attention, known.unwrap_or(ORDER.len()))
}

/// Every rollout grouped by status, needs-attention statuses first; each with its current phases,
/// reason, last update and a link to its page.
pub fn index_page(rollouts: &[RolloutView], viewer: &Viewer) -> String {
    let mut sorted: Vec<&RolloutView> = rollouts.iter().collect();
    sorted.sort_by(|a, b| {
        (rank(a), &a.status)
            .cmp(&(rank(b), &b.status))
            .then_with(|| b.updated_at.cmp(&a.updated_at))
            .then_with(|| a.id.cmp(&b.id))
    });
    let attention = rollouts
        .iter()
        .filter(|r| r.needs_attention || r.status == "failed")
        .count();

    let mut main = String::new();
    main.push_str("<h1>Rollouts</h1>\n");
    main.push_str(
        "<p id=\"live-status\" class=\"live\" role=\"status\" aria-live=\"polite\"></p>\n",
    );
    main.push_str("<div id=\"rollouts\">\n");
    if rollouts.is_empty() {
        main.push_str(
            "<p>No rollouts yet. Start one with <code>phasegate start PLAN</code>.</p>\n",
        );
    } else {
        let _ = writeln!(
            main,
            "<p class=\"summary\">{} rollout{}, {} need{} attention.</p>",
            rollouts.len(),
            plural(rollouts.len()),
            attention,
            if attention == 1 { "s" } else { "" }
        );
    }
    let mut groups: Vec<(&str, Vec<&RolloutView>)> = Vec::new();
    for view in sorted {
        match groups.last_mut() {
            Some((status, members)) if *status == view.status => members.push(view),
            _ => groups.push((&view.status, vec![view])),
        }
    }
    for (status, members) in groups {
        let heading = format!("group-{}", segment(status));
        let attention = members[0].needs_attention || status == "failed";
        let _ = writeln!(
            main,
            "<section class=\"group{}\" aria-labelledby=\"{heading}\">\n<h2 id=\"{heading}\">{} <span class=\"count\">({})</span>{}</h2>",
            if attention { " attention" } else { "" },
            status_badge(status),
            members.len(),
            if attention {
                " <span class=\"flag\">needs attention</span>"
            } else {
                ""
            }
        );
        let _ = writeln!(
            main,
            "<table class=\"rollouts\">\n<caption class=\"visually-hidden\">Rollouts {}</caption>\n\
             <thead><tr><th scope=\"col\">Rollout</th><th scope=\"col\">Plan</th>\
             <th scope=\"col\">Current phases</th><th scope=\"col\">Reason</th>\
             <th scope=\"col\">Updated</th></tr></thead>\n<tbody>",
            Esc(&status_label(status).to_lowercase())
        );
        for view in members {
            let phases = if view.current_phases.is_empty() {
                "<span class=\"none\">none</span>".to_string()
            } else {
                view.current_phases
                    .iter()
                    .map(|p| format!("<code>{}</code>", Esc(p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                main,
                "<tr><th scope=\"row\"><a href=\"{}\">{}</a></th><td>{}</td><td>{phases}</td>\
                 <td class=\"text\">{}</td><td>{}</td></tr>",
                rollout_url(&view.id, ""),
                Esc(&view.id),
                Esc(&view.plan),
                Esc(&view.reason),
                time(&view.updated_at)
            );
        }
        main.push_str("</tbody>\n</table>\n</section>\n");
    }
    main.push_str("</div>\n");
    page("Rollouts", Some(viewer), &main)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
