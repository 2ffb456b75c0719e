//! The evidence over time as inline SVG: for every phase observed, its noncompliant share, its
//! reporting coverage and its blocked devices, from the `observed` events of the audit trail.
//!
//! Three panels share the time axis, one per measure, each with its own scale (a 2% noncompliance
//! limit would be invisible on the 0–100% scale that coverage needs); every phase is one line in
//! each panel, told apart by colour *and* dash pattern, named in the legend.

use std::fmt::Write;

use super::html::{Esc, readable_time};
use crate::cli::view::thousands;
use crate::domain::event::EventKind;
use crate::domain::plan::format_percent;
use crate::domain::time::Timestamp;
use crate::store::EventRecord;

/// One phase's counts at one observation.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub phase: String,
    pub at: Timestamp,
    /// Failing devices among those that reported (`None`: none reported).
    pub noncompliant_ratio: Option<f64>,
    /// Devices that reported among those targeted (`None`: none targeted).
    pub coverage: Option<f64>,
    pub blocked: u64,
}

/// Every phase's observations in the audit trail, in trail order.
pub fn chart_points(history: &[EventRecord]) -> Vec<Point> {
    history
        .iter()
        .filter_map(|record| match &record.event.kind {
            EventKind::Observed { observations } => Some(observations),
            _ => None,
        })
        .flatten()
        .map(|o| Point {
            phase: o.phase.clone(),
            at: o.at,
            noncompliant_ratio: o.tally.noncompliant_ratio(),
            coverage: o.tally.coverage(),
            blocked: o.tally.blocked,
        })
        .collect()
}

pub(crate) const WIDTH: f64 = 760.0;
pub(crate) const PLOT_LEFT: f64 = 68.0;
pub(crate) const PLOT_RIGHT: f64 = WIDTH - 24.0;
const TOP: f64 = 6.0;
const PANEL_TITLE: f64 = 22.0;
const PANEL_H: f64 = 116.0;
const PANEL_GAP: f64 = 14.0;
const INSET: f64 = 8.0;
const HOUR_MS: i64 = 3_600_000;

pub(crate) const FONT: &str = "system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif";

/// Colours with at least 4.5:1 contrast on white, and a dash pattern each.
const STYLES: [(&str, &str); 6] = [
    ("#0550ae", ""),
    ("#a40e26", "8 4"),
    ("#116329", "2 3"),
    ("#8250df", "10 3 2 3"),
    ("#953800", "4 2"),
    ("#1b7c83", "1 3"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Measure {
    Noncompliant,
    Coverage,
    Blocked,
}

impl Measure {
    pub(crate) const ALL: [Measure; 3] =
        [Measure::Noncompliant, Measure::Coverage, Measure::Blocked];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Measure::Noncompliant => "noncompliant",
            Measure::Coverage => "coverage",
            Measure::Blocked => "blocked",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Measure::Noncompliant => "Noncompliant share of reporting devices",
            Measure::Coverage => "Reporting coverage",
            Measure::Blocked => "Blocked devices",
        }
    }

    /// Percent (0–100) for the ratios, a count for blocked.
    fn value(self, point: &Point) -> Option<f64> {
        match self {
            Measure::Noncompliant => point.noncompliant_ratio.map(|r| r * 100.0),
            Measure::Coverage => point.coverage.map(|r| r * 100.0),
            Measure::Blocked => Some(point.blocked as f64),
        }
    }

    fn label(self, value: f64) -> String {
        match self {
            Measure::Blocked => thousands(value.round().max(0.0) as u64),
            _ => format_percent(value / 100.0),
        }
    }
}

/// Top and bottom of a measure's plot area.
pub(crate) fn panel_bounds(index: usize) -> (f64, f64) {
    let top = TOP + index as f64 * (PANEL_TITLE + PANEL_H + PANEL_GAP) + PANEL_TITLE;
    (top, top + PANEL_H)
}

/// A step of 1, 2, 2.5 or 5 times a power of ten, at least `raw` (whole numbers for counts).
fn nice_step(raw: f64, whole: bool) -> f64 {
    let raw = if raw.is_finite() && raw > 0.0 {
        raw
    } else {
        1.0
    };
    let magnitude = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        let step = m * magnitude;
        if whole && (step < 1.0 || step.fract() != 0.0) {
            continue;
        }
        if step >= raw {
            return step;
        }
    }
    10.0 * magnitude
}

/// The scale of a measure: low end, high end, tick step.
fn scale(measure: Measure, values: &[f64]) -> (f64, f64, f64) {
    let max = values.iter().copied().fold(0.0, f64::max);
    match measure {
        Measure::Noncompliant => {
            let want = (max * 1.1).max(1.0);
            let step = nice_step(want / 4.0, false);
            ((0.0), ((want / step).ceil() * step).min(100.0), step)
        }
        Measure::Coverage => {
            let min = values.iter().copied().fold(100.0, f64::min);
            let low = (((min - 5.0) / 10.0).floor() * 10.0).clamp(0.0, 90.0);
            (low, 100.0, nice_step((100.0 - low) / 4.0, false))
        }
        Measure::Blocked => {
            let want = (max * 1.1).max(4.0);
            let step = nice_step(want / 4.0, true);
            (0.0, (want / step).ceil() * step, step)
        }
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Jan 5`, or `Jan 5 06:00` when ticks are less than a day apart.
fn tick_label(at: Timestamp, with_time: bool) -> String {
    let text = at.rfc3339();
    let month: usize = text.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
    let day: u32 = text.get(8..10).and_then(|d| d.parse().ok()).unwrap_or(1);
    let name = MONTHS[month.clamp(1, 12) - 1];
    if with_time {
        format!("{name} {day} {}", text.get(11..16).unwrap_or(""))
    } else {
        format!("{name} {day}")
    }
}

/// Instants for the time axis, at most about seven, on whole hours or days (UTC).
fn time_ticks(t0: i64, t1: i64) -> (Vec<i64>, bool) {
    let span_hours = (t1 - t0) as f64 / HOUR_MS as f64;
    let step_hours = [1, 2, 3, 6, 12, 24, 48, 168, 336, 720]
        .into_iter()
        .find(|&h| span_hours / h as f64 <= 7.0)
        .unwrap_or_else(|| ((span_hours / 7.0 / 720.0).ceil() as i64).max(1) * 720);
    let step = step_hours * HOUR_MS;
    let mut ticks = Vec::new();
    let mut at = t0.div_euclid(step) * step;
    if at < t0 {
        at += step;
    }
    while at <= t1 {
        ticks.push(at);
        at += step;
    }
    (ticks, step_hours < 24)
}

fn number(v: f64) -> String {
    format!("{v:.1}")
}

/// Renders `series` (any phases, any order) as an accessible inline SVG chart.
pub fn chart_svg(series: &[Point]) -> String {
    if series.is_empty() {
        return "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 760 40\" font-family=\"system-ui, sans-serif\" \
                width=\"760\" height=\"40\" role=\"img\" aria-label=\"No observations yet\">\
                <title>No observations yet</title>\
                <text x=\"8\" y=\"24\" font-size=\"14\" fill=\"#1f2328\">No observations yet.</text></svg>\n"
            .to_string();
    }
    // Phases in the order they were first observed; each one's points in time order.
    let mut phases: Vec<&str> = Vec::new();
    for point in series {
        if !phases.contains(&point.phase.as_str()) {
            phases.push(&point.phase);
        }
    }
    let by_phase: Vec<Vec<&Point>> = phases
        .iter()
        .map(|phase| {
            let mut points: Vec<&Point> = series.iter().filter(|p| p.phase == *phase).collect();
            points.sort_by_key(|p| p.at);
            points
        })
        .collect();

    let (mut t0, mut t1) = series.iter().fold((i64::MAX, i64::MIN), |(lo, hi), p| {
        (lo.min(p.at.as_millis()), hi.max(p.at.as_millis()))
    });
    if t1 <= t0 {
        t0 -= 12 * HOUR_MS;
        t1 += 12 * HOUR_MS;
    }
    // A little room inside the frame, so the first and last points do not sit on it.
    let (left, right) = (PLOT_LEFT + INSET, PLOT_RIGHT - INSET);
    let x = |at: Timestamp| left + (at.as_millis() - t0) as f64 / (t1 - t0) as f64 * (right - left);
    let (ticks, with_time) = time_ticks(t0, t1);

    // The legend: one entry per phase, flowing in rows under the panels.
    let (_, last_bottom) = panel_bounds(Measure::ALL.len() - 1);
    let legend_top = last_bottom + 52.0;
    let mut legend = Vec::new();
    let (mut lx, mut ly) = (PLOT_LEFT, legend_top);
    for phase in &phases {
        let w = 44.0 + 7.5 * phase.chars().count() as f64;
        if lx + w > PLOT_RIGHT && lx > PLOT_LEFT {
            lx = PLOT_LEFT;
            ly += 22.0;
        }
        legend.push((lx, ly));
        lx += w + 16.0;
    }
    let height = ly + 18.0;

    let first = Timestamp::from_millis(series.iter().map(|p| p.at.as_millis()).min().unwrap_or(0));
    let last = Timestamp::from_millis(series.iter().map(|p| p.at.as_millis()).max().unwrap_or(0));
    let latest: Vec<String> = phases
        .iter()
        .zip(&by_phase)
        .filter_map(|(phase, points)| {
            let p = points.last()?;
            Some(format!(
                "{phase} {} noncompliant, {} coverage, {} blocked",
                p.noncompliant_ratio
                    .map_or_else(|| "no data for".to_string(), format_percent),
                p.coverage
                    .map_or_else(|| "no data for".to_string(), format_percent),
                thousands(p.blocked)
            ))
        })
        .collect();
    let summary = format!(
        "Chart of the noncompliant share, reporting coverage and blocked devices of {} over time, from {} to {}. Latest: {}.",
        phases.join(", "),
        readable_time(&first.rfc3339()),
        readable_time(&last.rfc3339()),
        latest.join("; ")
    );

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH:.0} {height:.0}\" width=\"{WIDTH:.0}\" height=\"{height:.0}\" font-family=\"{FONT}\" role=\"img\" aria-label=\"{}\">",
        Esc(&summary)
    );
    let _ = writeln!(out, "<title>{}</title>", Esc(&summary));

    for (index, measure) in Measure::ALL.into_iter().enumerate() {
        let (top, bottom) = panel_bounds(index);
        let values: Vec<f64> = series.iter().filter_map(|p| measure.value(p)).collect();
        let (lo, hi, step) = scale(measure, &values);
        let y = |v: f64| (bottom - (v - lo) / (hi - lo) * (bottom - top)).clamp(top, bottom);
        let _ = writeln!(
            out,
            "<g class=\"panel\" data-measure=\"{}\">",
            measure.name()
        );
        let _ = writeln!(
            out,
            "<text x=\"{PLOT_LEFT:.0}\" y=\"{:.1}\" font-size=\"13\" font-weight=\"700\" fill=\"#1f2328\">{}</text>",
            top - 8.0,
            measure.title()
        );
        let _ = writeln!(
            out,
            "<rect class=\"plot\" x=\"{PLOT_LEFT:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{PANEL_H:.1}\" fill=\"#ffffff\" stroke=\"#8c959f\"/>",
            PLOT_RIGHT - PLOT_LEFT
        );
        let mut v = lo;
        while v <= hi + step / 1000.0 {
            let ty = y(v);
            let _ = writeln!(
                out,
                "<line x1=\"{PLOT_LEFT:.1}\" x2=\"{PLOT_RIGHT:.1}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"#d0d7de\" stroke-width=\"1\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\" fill=\"#1f2328\">{}</text>",
                PLOT_LEFT - 6.0,
                ty + 4.0,
                measure.label(v)
            );
            v += step;
        }
        for &tick in &ticks {
            let tx = x(Timestamp::from_millis(tick));
            let _ = writeln!(
                out,
                "<line x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{top:.1}\" y2=\"{bottom:.1}\" stroke=\"#d0d7de\" stroke-width=\"1\"/>"
            );
        }
        for (n, points) in by_phase.iter().enumerate() {
            let (colour, dash) = STYLES[n % STYLES.len()];
            let mut d = String::new();
            let mut drawing = false;
            let mut markers = String::new();
            for point in points {
                match measure.value(point) {
                    Some(value) => {
                        let (px, py) = (x(point.at), y(value));
                        let _ = write!(
                            d,
                            "{}{} {} ",
                            if drawing { "L " } else { "M " },
                            number(px),
                            number(py)
                        );
                        drawing = true;
                        let _ = writeln!(
                            markers,
                            "<circle class=\"marker\" cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{colour}\"><title>{}: {} {} at {}</title></circle>",
                            number(px),
                            number(py),
                            Esc(&point.phase),
                            measure.label(value),
                            measure.name(),
                            Esc(&readable_time(&point.at.rfc3339()))
                        );
                    }
                    None => drawing = false,
                }
            }
            if d.is_empty() {
                continue;
            }
            let dash = if dash.is_empty() {
                String::new()
            } else {
                format!(" stroke-dasharray=\"{dash}\"")
            };
            let _ = writeln!(
                out,
                "<path class=\"series\" data-phase=\"{}\" data-measure=\"{}\" d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>",
                Esc(phases[n]),
                measure.name(),
                d.trim_end()
            );
            out.push_str(&markers);
        }
        out.push_str("</g>\n");
    }

    // The time axis, under the last panel.
    out.push_str("<g class=\"time-axis\">\n");
    for &tick in &ticks {
        let tx = x(Timestamp::from_millis(tick));
        let _ = writeln!(
            out,
            "<line x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{last_bottom:.1}\" y2=\"{:.1}\" stroke=\"#57606a\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#1f2328\">{}</text>",
            last_bottom + 5.0,
            last_bottom + 18.0,
            tick_label(Timestamp::from_millis(tick), with_time)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{PLOT_LEFT:.0}\" y=\"{:.1}\" font-size=\"12\" fill=\"#1f2328\">From {} to {}</text>",
        last_bottom + 36.0,
        Esc(&readable_time(&first.rfc3339())),
        Esc(&readable_time(&last.rfc3339()))
    );
    out.push_str("</g>\n<g class=\"legend\">\n");
    for (n, (phase, (lx, ly))) in phases.iter().zip(&legend).enumerate() {
        let (colour, dash) = STYLES[n % STYLES.len()];
        let dash = if dash.is_empty() {
            String::new()
        } else {
            format!(" stroke-dasharray=\"{dash}\"")
        };
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"2.5\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12.5\" fill=\"#1f2328\">{}</text>",
            lx + 30.0,
            lx + 36.0,
            ly + 4.0,
            Esc(phase)
        );
    }
    out.push_str("</g>\n</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(nice_step(0.3, true), 1.0);
        assert_eq!(nice_step(1.2, true), 2.0);
        assert_eq!(nice_step(2.2, true), 5.0);
        assert_eq!(nice_step(22.0, true), 25.0);
        assert_eq!(nice_step(0.3, false), 0.5);
        assert_eq!(nice_step(2.2, false), 2.5);
    }

    #[test]
    fn scales_cover_their_values() {
        let (lo, hi, _) = scale(Measure::Noncompliant, &[0.4, 5.4]);
        assert!(lo == 0.0 && (5.4..=10.0).contains(&hi), "{hi}");
        let (lo, hi, _) = scale(Measure::Coverage, &[97.4, 83.0]);
        assert_eq!((lo, hi), (70.0, 100.0));
        let (lo, hi, step) = scale(Measure::Blocked, &[0.0, 0.0]);
        assert_eq!((lo, hi, step), (0.0, 4.0, 1.0));
    }

    #[test]
    fn time_ticks_fall_on_whole_days_within_the_range() {
        let day = 24 * HOUR_MS;
        let t0 = 1_800_000_000_000;
        let (ticks, with_time) = time_ticks(t0, t0 + 9 * day);
        assert!(!with_time);
        assert!(ticks.len() <= 8 && ticks.len() >= 4, "{ticks:?}");
        assert!(ticks.iter().all(|&t| t >= t0 && t <= t0 + 9 * day));
        assert!(ticks.iter().all(|t| t % (48 * HOUR_MS) == 0));
        let (hourly, with_time) = time_ticks(t0, t0 + 10 * HOUR_MS);
        assert!(with_time && !hourly.is_empty());
    }
}
