//! The phase graph as inline SVG: one box per phase (id, mode, state), columns by depth in the
//! `after` graph, an arrow per `after` edge.

use std::fmt::Write;

use super::chart::FONT;
use super::html::{Esc, segment};
use crate::cli::view::PhaseView;
use crate::domain::plan::Plan;

const NODE_W: f64 = 190.0;
const NODE_H: f64 = 58.0;
const GAP_X: f64 = 56.0;
const GAP_Y: f64 = 18.0;
const MARGIN: f64 = 8.0;
/// More layers than this are drawn top to bottom.
const MAX_COLUMNS: usize = 5;
/// Longer ids are cut in the box (the full id is in its title and the page's text).
const MAX_LABEL: usize = 22;

fn label(text: &str) -> String {
    if text.chars().count() <= MAX_LABEL {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX_LABEL - 1).collect();
        format!("{cut}…")
    }
}

/// The graph of `plan`'s phases in `plan.order`, each box naming phase id, mode and state (from
/// `phases`, the view's records in plan order).
pub(crate) fn phase_graph(plan: &Plan, phases: &[PhaseView]) -> String {
    let n = plan.phases.len();
    // Column: the longest path from a phase without predecessors; `order` is topological.
    let mut column = vec![0usize; n];
    for &idx in &plan.order {
        column[idx] = plan.phases[idx]
            .after
            .iter()
            .map(|&p| column[p] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut row = vec![0usize; n];
    let columns = column.iter().max().map_or(0, |c| c + 1);
    let mut filled = vec![0usize; columns];
    for &idx in &plan.order {
        row[idx] = filled[column[idx]];
        filled[column[idx]] += 1;
    }
    let rows = filled.iter().copied().max().unwrap_or(0);
    // Left to right while it fits a laptop screen; a longer chain runs top to bottom instead, so
    // the boxes never shrink to unreadable text.
    let across = columns <= MAX_COLUMNS;
    let (layers, breadth) = if across {
        (columns, rows)
    } else {
        (rows, columns)
    };
    let (gap_x, gap_y) = if across {
        (GAP_X, GAP_Y)
    } else {
        (GAP_Y * 2.0, GAP_X * 0.7)
    };
    let width = MARGIN * 2.0 + layers as f64 * NODE_W + layers.saturating_sub(1) as f64 * gap_x;
    let height = MARGIN * 2.0 + breadth as f64 * NODE_H + breadth.saturating_sub(1) as f64 * gap_y;
    let (x_slot, y_slot) = if across {
        (&column, &row)
    } else {
        (&row, &column)
    };
    let x = |idx: usize| MARGIN + x_slot[idx] as f64 * (NODE_W + gap_x);
    let y = |idx: usize| MARGIN + y_slot[idx] as f64 * (NODE_H + gap_y);
    let state = |idx: usize| phases.get(idx).map_or("unknown", |p| p.state.as_str());

    let mut description: Vec<String> = Vec::new();
    for &idx in &plan.order {
        let phase = &plan.phases[idx];
        let after: Vec<&str> = phase
            .after
            .iter()
            .map(|&p| plan.phases[p].id.as_str())
            .collect();
        let after = if after.is_empty() {
            String::new()
        } else {
            format!(", after {}", after.join(" and "))
        };
        description.push(format!(
            "{} ({}, {}{after})",
            phase.id,
            phase.mode,
            state(idx).replace('_', " ")
        ));
    }
    let description = format!("Phase graph: {}.", description.join("; "));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg class=\"phase-graph\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width:.0} {height:.0}\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"{FONT}\" role=\"img\" aria-label=\"{}\">",
        Esc(&description)
    );
    let _ = writeln!(out, "<title>{}</title>", Esc(&description));
    out.push_str(
        "<defs><marker id=\"phase-arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" \
         markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#57606a\"/></marker></defs>\n",
    );
    for &idx in &plan.order {
        for &pred in &plan.phases[idx].after {
            let d = if across {
                let (x1, y1) = (x(pred) + NODE_W, y(pred) + NODE_H / 2.0);
                let (x2, y2) = (x(idx) - 2.0, y(idx) + NODE_H / 2.0);
                let mid = (x1 + x2) / 2.0;
                format!("M {x1:.1} {y1:.1} C {mid:.1} {y1:.1}, {mid:.1} {y2:.1}, {x2:.1} {y2:.1}")
            } else {
                let (x1, y1) = (x(pred) + NODE_W / 2.0, y(pred) + NODE_H);
                let (x2, y2) = (x(idx) + NODE_W / 2.0, y(idx) - 2.0);
                let mid = (y1 + y2) / 2.0;
                format!("M {x1:.1} {y1:.1} C {x1:.1} {mid:.1}, {x2:.1} {mid:.1}, {x2:.1} {y2:.1}")
            };
            let _ = writeln!(
                out,
                "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" d=\"{d}\" fill=\"none\" stroke=\"#57606a\" stroke-width=\"1.5\" marker-end=\"url(#phase-arrow)\"/>",
                Esc(&plan.phases[pred].id),
                Esc(&plan.phases[idx].id)
            );
        }
    }
    for &idx in &plan.order {
        let phase = &plan.phases[idx];
        let state = state(idx);
        let current = phases.get(idx).is_some_and(|p| {
            matches!(
                p.state.as_str(),
                "applying" | "soaking" | "awaiting_approval"
            )
        });
        let (px, py) = (x(idx), y(idx));
        let _ = writeln!(
            out,
            "<g class=\"node state-{}{}\" data-phase=\"{}\" data-state=\"{}\">",
            segment(state),
            if current { " current" } else { "" },
            Esc(&phase.id),
            Esc(state)
        );
        let _ = writeln!(
            out,
            "<title>{} ({}): {}</title>",
            Esc(&phase.id),
            phase.mode,
            Esc(&state.replace('_', " "))
        );
        let (fill, stroke) = colours(state);
        let _ = writeln!(
            out,
            "<rect x=\"{px:.1}\" y=\"{py:.1}\" width=\"{NODE_W:.0}\" height=\"{NODE_H:.0}\" rx=\"6\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{}\"/>",
            if current { 3 } else { 1 }
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-weight=\"700\" font-size=\"14\" fill=\"#1f2328\">{}</text>",
            px + 10.0,
            py + 23.0,
            Esc(&label(&phase.id))
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12.5\" fill=\"#1f2328\">{} · {}</text>",
            px + 10.0,
            py + 44.0,
            phase.mode,
            Esc(&state.replace('_', " "))
        );
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

/// Fill and border per state; the words are always in the box too, so colour is never the only
/// cue, and the text (#1f2328) has well over 4.5:1 contrast on every fill.
fn colours(state: &str) -> (&'static str, &'static str) {
    match state {
        "applying" | "soaking" => ("#ddf4ff", "#0969da"),
        "awaiting_approval" => ("#fff8c5", "#9a6700"),
        "promoted" => ("#dafbe1", "#1a7f37"),
        "rolled_back" => ("#ffebe9", "#cf222e"),
        _ => ("#f6f8fa", "#57606a"),
    }
}
