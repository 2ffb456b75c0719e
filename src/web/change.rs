//! What a decision on the rollout's page would change, and what holds the rollout's plan: the
//! impact forecast beside each approval (an approver sees what the promotion would do before
//! deciding, as `approve` shows it on a terminal), the forecast checked against the outcome once
//! a phase has soaked, a freeze window holding a due promotion, and a plan change waiting for
//! approval or a plan file edited behind phasegate's back, and the exceptions from enforcement
//! in force.

use std::fmt::Write;

use super::html::{Esc, time};
use crate::cli::view::thousands;
use crate::cli::view::{AffectedView, CountView, ForecastCheckView, ForecastView, RolloutView};

/// The forecasts of promoting a phase: one table per phase the promotion would start.
pub(super) fn forecasts(out: &mut String, idx: usize, forecasts: &[ForecastView]) {
    if forecasts.is_empty() {
        out.push_str(
            "<p class=\"forecast none\">No impact forecast yet: it is made from the phase's next observation.</p>\n",
        );
        return;
    }
    for (n, forecast) in forecasts.iter().enumerate() {
        forecast_table(out, &format!("forecast-{idx}-{n}"), forecast);
    }
}

fn forecast_table(out: &mut String, id: &str, forecast: &ForecastView) {
    let _ = writeln!(
        out,
        "<div class=\"forecast\" aria-labelledby=\"{id}\">\n<h5 id=\"{id}\">If approved: <code>{}</code> starts ({})</h5>\n\
         <p class=\"text\">{}</p>\n\
         <table>\n<caption>Forecast of {}, from the observation of {}</caption>\n\
         <thead><tr><th scope=\"col\"></th><th scope=\"col\">Devices</th><th scope=\"col\">Users</th>\
         <th scope=\"col\">By platform</th><th scope=\"col\">Failing settings</th><th scope=\"col\">Largest groups</th></tr></thead>\n<tbody>",
        Esc(&forecast.phase),
        Esc(&forecast.mode),
        Esc(&forecast.summary),
        Esc(&forecast.phase),
        time(&forecast.at),
    );
    affected_row(out, "Newly told", &forecast.notified);
    affected_row(out, "Newly blocked", &forecast.blocked);
    out.push_str("</tbody>\n</table>\n<dl class=\"facts\">\n");
    let _ = writeln!(
        out,
        "<dt>Devices in its scope</dt><dd>{} ({} without a fresh report)</dd>\n\
         <dt>Blocked at once</dt><dd>{}</dd>",
        thousands(forecast.devices),
        thousands(forecast.unknown),
        thousands(forecast.blocked_at_once),
    );
    if let Some(first) = &forecast.first_block {
        let _ = writeln!(out, "<dt>First block</dt><dd>{}</dd>", time(first));
    }
    let _ = writeln!(
        out,
        "<dt>Already told / blocked there</dt><dd>{} / {} devices</dd>\n</dl>\n</div>",
        thousands(forecast.before.notified_devices),
        thousands(forecast.before.blocked_devices),
    );
}

fn affected_row(out: &mut String, what: &str, affected: &AffectedView) {
    let _ = writeln!(
        out,
        "<tr><th scope=\"row\">{what}</th><td>{}</td><td>{}</td><td class=\"text\">{}</td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>",
        thousands(affected.devices),
        thousands(affected.users),
        counts(&affected.by_platform),
        counts(&affected.by_setting),
        counts(&affected.groups),
    );
}

fn counts(counts: &[CountView]) -> String {
    if counts.is_empty() {
        return "—".into();
    }
    counts
        .iter()
        .map(|c| format!("{} {}", Esc(&c.name), thousands(c.devices)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The forecast a phase was started on, against what happened once it had soaked.
pub(super) fn forecast_check(out: &mut String, check: &ForecastCheckView) {
    let _ = writeln!(
        out,
        "<p class=\"forecast-check text\">Forecast of {} checked at {}: told {} forecast, {} actual; \
         blocked {} forecast, {} actual — error {:.1}% of {} reporting devices.</p>",
        time(&check.forecast_at),
        time(&check.at),
        thousands(check.notified.forecast_devices),
        thousands(check.notified.actual_devices),
        thousands(check.blocked.forecast_devices),
        thousands(check.blocked.actual_devices),
        check.error * 100.0,
        thousands(check.reporting),
    );
}

/// A freeze holding a due promotion, and the plan's windows.
pub(super) fn freeze(out: &mut String, view: &RolloutView) {
    if let Some(frozen) = &view.frozen {
        let _ = writeln!(
            out,
            "<section class=\"frozen\" aria-labelledby=\"frozen-h\">\n<h3 id=\"frozen-h\">Frozen</h3>\n\
             <p>The promotion of {} is due and waits for the freeze window <code>{}</code> to end at {} ({}). \
             Rollback and abort are always allowed.</p>\n</section>",
            phase_list(&frozen.phases),
            Esc(&frozen.window),
            time(&frozen.until),
            Esc(&frozen.until_local),
        );
    }
    if !view.freeze_windows.is_empty() {
        out.push_str("<details class=\"freeze-windows\"><summary>Freeze windows of the plan</summary>\n<ul>\n");
        for window in &view.freeze_windows {
            let _ = writeln!(out, "<li class=\"text\">{}</li>", Esc(window));
        }
        out.push_str("</ul>\n</details>\n");
    }
}

/// The rollout's active exceptions from enforcement: who or what is exempt, why, who granted
/// it and until when (each ends on its own then).
pub(super) fn exceptions(out: &mut String, view: &RolloutView) {
    if view.exceptions.is_empty() {
        return;
    }
    out.push_str(
        "<section class=\"exceptions\" aria-labelledby=\"exceptions-h\">\n<h3 id=\"exceptions-h\">Exceptions from enforcement</h3>\n\
         <p>Enforcement does not block these users and groups until the exception ends; owners are still told, and their devices still count in the gates.</p>\n\
         <table>\n<thead><tr><th scope=\"col\">Exception</th><th scope=\"col\">Exempt</th><th scope=\"col\">Reason</th>\
         <th scope=\"col\">Granted by</th><th scope=\"col\">Until</th></tr></thead>\n<tbody>\n",
    );
    for exception in &view.exceptions {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td>{} <span class=\"text\">{}</span></td><td class=\"text\">{}</td>\
             <td class=\"text\">{} at {}</td><td>{}</td></tr>",
            Esc(&exception.name),
            exception.kind,
            Esc(&exception.subject),
            Esc(&exception.reason),
            Esc(&exception.granted_by),
            time(&exception.granted_at),
            time(&exception.until),
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

/// A plan change waiting for approval, and a plan file that holds a plan nobody applied.
pub(super) fn plan_changes(out: &mut String, view: &RolloutView) {
    if let Some(change) = &view.plan_change {
        let _ = writeln!(
            out,
            "<section class=\"plan-change\" aria-labelledby=\"plan-change-h\">\n<h3 id=\"plan-change-h\">Plan change waiting for approval</h3>\n\
             <p>{} applied plan <span class=\"hash\" title=\"{}\">{}</span> at {}. It weakens the plan in force, \
             so it takes effect only once approved under the rules of <code>{}</code>: {} of {} approval{} ({}).</p>\n<ul>",
            Esc(&change.by),
            Esc(&change.plan_hash),
            Esc(change.plan_hash.get(..12).unwrap_or(&change.plan_hash)),
            time(&change.at),
            Esc(&change.rules_of),
            change.approved_by.len(),
            change.required,
            if change.required == 1 { "" } else { "s" },
            Esc(&change.approvers),
        );
        for weakening in &change.weakens {
            let _ = writeln!(out, "<li class=\"text\">{}</li>", Esc(weakening));
        }
        let _ = writeln!(
            out,
            "</ul>\n<p>Decide with <code>phasegate plan approve {id}</code> or <code>phasegate plan reject {id}</code>.</p>\n</section>",
            id = Esc(&view.id)
        );
    }
    if let Some(file) = &view.plan_file_changed {
        let _ = writeln!(
            out,
            "<section class=\"plan-file\" aria-labelledby=\"plan-file-h\">\n<h3 id=\"plan-file-h\">Plan file changed outside phasegate</h3>\n\
             <p>Since {}, <code>{}</code> holds plan <span class=\"hash\" title=\"{}\">{}</span>, which nobody applied: \
             the rollout runs on under its stored plan. Apply the file with <code>phasegate plan apply {}</code> to propose it.</p>\n</section>",
            time(&file.seen_at),
            Esc(&file.path),
            Esc(&file.plan_hash),
            Esc(file.plan_hash.get(..12).unwrap_or(&file.plan_hash)),
            Esc(&view.id),
        );
    }
}

fn phase_list(phases: &[String]) -> String {
    phases
        .iter()
        .map(|p| format!("<code>{}</code>", Esc(p)))
        .collect::<Vec<_>>()
        .join(", ")
}
