//! What a plan change does to a running rollout's safeguards: [`weakenings`] compares the plan a
//! rollout runs with the one someone wants it to run, and lists, in words, every way the new one
//! lets a promotion through more easily, gives people less time, or reaches further — a looser
//! gate, a smaller quorum or wider circle of approvers, a shorter soak, a wider scope, a stronger
//! mode, a looser rollback criterion, a freeze window taken away. A change that weakens nothing
//! (a description, a tighter gate, one more approval, a new freeze) is an empty list.
//!
//! Where two settings cannot be ordered (a ticket pattern, a freeze window's times, the policies
//! rolled out, the backend's settings), any change counts as a weakening: the rules in force
//! decide.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use super::{Mode, Phase, Plan};
use crate::domain::time::format_span;

/// Every way `new` weakens `old`, one sentence each, in plan order; empty if none.
pub fn weakenings(old: &Plan, new: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    if old.separation_of_duties && !new.separation_of_duties {
        out.push("separation of duties is turned off".to_string());
    }
    if let Some(author) = &old.author
        && new.author.as_ref() != Some(author)
    {
        out.push(format!(
            "the plan's author {author} is no longer named, so may approve"
        ));
    }
    if new.observe_every > old.observe_every {
        out.push(format!(
            "observations (and rollback checks) less often: every {} → every {}",
            format_span(old.observe_every),
            format_span(new.observe_every)
        ));
    }
    if new.max_exception > old.max_exception {
        out.push(format!(
            "exceptions from enforcement may run longer: {} → {}",
            format_span(old.max_exception),
            format_span(new.max_exception)
        ));
    }
    if new.policy != old.policy {
        out.push("the policies rolled out change".to_string());
    }
    if new.provider != old.provider {
        out.push("the backend's settings change".to_string());
    }
    for group in &old.emergency_access.groups {
        if !new.emergency_access.groups.contains(group) {
            out.push(format!(
                "emergency access no longer exempts group `{group}`"
            ));
        }
    }
    for user in &old.emergency_access.users {
        if !new.emergency_access.users.contains(user) {
            out.push(format!("emergency access no longer exempts `{user}`"));
        }
    }
    for window in &old.freezes {
        match new.freezes.iter().find(|w| w.name == window.name) {
            None => out.push(format!("freeze window `{}` is removed", window.name)),
            Some(w) if w.times != window.times || w.time_zone_name != window.time_zone_name => {
                out.push(format!("freeze window `{}` changes: {w}", window.name))
            }
            Some(w) => {
                let more: Vec<&str> = w
                    .override_by
                    .difference(&window.override_by)
                    .map(String::as_str)
                    .collect();
                if !more.is_empty() {
                    out.push(format!(
                        "freeze window `{}` may now be overridden by {}",
                        window.name,
                        more.join(", ")
                    ));
                }
            }
        }
    }
    let old_groups: BTreeSet<&String> = old.phases.iter().flat_map(|p| &p.include).collect();
    let strongest = old.phases.iter().map(|p| p.mode).max();
    for phase in &new.phases {
        if old.phase_index(&phase.id).is_some() {
            continue;
        }
        let wider: Vec<&str> = phase
            .include
            .iter()
            .filter(|g| !old_groups.contains(g))
            .map(String::as_str)
            .collect();
        if !wider.is_empty() {
            out.push(format!(
                "new phase `{}` includes `{}`, which no phase did",
                phase.id,
                wider.join("`, `")
            ));
        }
        if strongest.is_some_and(|m| phase.mode > m) {
            out.push(format!(
                "new phase `{}` is in {} mode, stronger than any phase before",
                phase.id, phase.mode
            ));
        }
    }
    for phase in &old.phases {
        match new.phase_index(&phase.id) {
            None => out.push(format!(
                "phase `{}` is removed, with its gate and soak",
                phase.id
            )),
            Some(idx) => phase_weakenings(old, phase, new, &new.phases[idx], &mut out),
        }
    }
    out
}

fn phase_weakenings(
    old_plan: &Plan,
    old: &Phase,
    new_plan: &Plan,
    new: &Phase,
    out: &mut Vec<String>,
) {
    let id = &old.id;
    let mut say = |what: String| out.push(format!("`{id}`: {what}"));
    let before: BTreeSet<&str> = old
        .after
        .iter()
        .map(|&i| old_plan.phases[i].id.as_str())
        .collect();
    let after: BTreeSet<&str> = new
        .after
        .iter()
        .map(|&i| new_plan.phases[i].id.as_str())
        .collect();
    for gone in before.difference(&after) {
        say(format!("no longer waits for `{gone}`"));
    }
    if new.mode > old.mode {
        say(format!("mode {} → {}", old.mode, new.mode));
    }
    for group in new.include.iter().filter(|g| !old.include.contains(g)) {
        say(format!("now includes `{group}`"));
    }
    for group in old.exclude.iter().filter(|g| !new.exclude.contains(g)) {
        say(format!("no longer excludes `{group}`"));
    }
    if new.min_soak < old.min_soak {
        say(format!(
            "soak {} → {}",
            format_span(old.min_soak),
            format_span(new.min_soak)
        ));
    }
    if let Some(grace) = old.grace
        && new.mode == Mode::Notify
        && new.grace.is_none_or(|g| g < grace)
    {
        say(format!(
            "grace {} → {}",
            format_span(grace),
            new.grace.map_or("none".to_string(), format_span)
        ));
    }
    let (g, h) = (&old.gate, &new.gate);
    looser_max(
        "max_noncompliant",
        g.max_noncompliant,
        h.max_noncompliant,
        &mut say,
    );
    looser_max(
        "max_noncompliant_ratio",
        g.max_noncompliant_ratio,
        h.max_noncompliant_ratio,
        &mut say,
    );
    looser_max("max_errors", g.max_errors, h.max_errors, &mut say);
    looser_max(
        "max_error_ratio",
        g.max_error_ratio,
        h.max_error_ratio,
        &mut say,
    );
    if let Some(min) = g.min_reporting
        && h.min_reporting.is_none_or(|m| m < min)
    {
        say(format!(
            "min_reporting {min} → {}",
            h.min_reporting
                .map_or("none".to_string(), |m| m.to_string())
        ));
    }
    longer("stale_after", g.stale_after, h.stale_after, &mut say);
    longer("max_hold", g.max_hold, h.max_hold, &mut say);
    if h.approvals < g.approvals {
        say(format!("approvals {} → {}", g.approvals, h.approvals));
    }
    let (p, q) = (&old.approval, &new.approval);
    if p.names_approvers() {
        if !q.names_approvers() {
            say("anyone may approve, not only the people named".to_string());
        } else {
            let more: Vec<&str> = q
                .eligible
                .difference(&p.eligible)
                .map(String::as_str)
                .collect();
            if !more.is_empty() {
                say(format!("may now be approved by {}", more.join(", ")));
            }
            let directory = |plan: &Plan, group: &String| {
                plan.directory_approvers
                    .get(group)
                    .cloned()
                    .unwrap_or_default()
            };
            for group in &q.directory_groups {
                let was = p.directory_groups.contains(group)
                    && directory(old_plan, group) == directory(new_plan, group);
                if !was {
                    say(format!(
                        "may now be approved by the members of directory group `{}`",
                        directory(new_plan, group)
                    ));
                }
            }
        }
    }
    if let Some(expiry) = p.expires_after
        && q.expires_after.is_none_or(|e| e > expiry)
    {
        say(format!(
            "approvals last {} → {}",
            format_span(expiry),
            q.expires_after.map_or("forever".to_string(), format_span)
        ));
    }
    if p.require_ticket && !q.require_ticket && q.ticket_pattern.is_none() {
        say("no change ticket required".to_string());
    }
    if let Some(pattern) = &p.ticket_pattern
        && q.ticket_pattern.as_ref() != Some(pattern)
    {
        say(format!(
            "ticket_pattern `{}` → {}",
            pattern.as_str(),
            q.ticket_pattern
                .as_ref()
                .map_or("none".to_string(), |t| format!("`{}`", t.as_str()))
        ));
    }
    looser_max(
        "approval_tolerance",
        p.evidence_tolerance,
        q.evidence_tolerance,
        &mut say,
    );
    let (r, s) = (&old.rollback_when, &new.rollback_when);
    looser_max(
        "rollback_when.noncompliant_ratio_above",
        r.noncompliant_ratio_above,
        s.noncompliant_ratio_above,
        &mut say,
    );
    looser_max(
        "rollback_when.noncompliant_above",
        r.noncompliant_above,
        s.noncompliant_above,
        &mut say,
    );
    looser_max(
        "rollback_when.errors_above",
        r.errors_above,
        s.errors_above,
        &mut say,
    );
    looser_max(
        "rollback_when.blocked_ratio_above",
        r.blocked_ratio_above,
        s.blocked_ratio_above,
        &mut say,
    );
}

/// An upper limit (none: no limit) that is raised or dropped.
fn looser_max<T: PartialOrd + Display + Copy>(
    key: &str,
    old: Option<T>,
    new: Option<T>,
    say: &mut impl FnMut(String),
) {
    if let Some(limit) = old
        && new.is_none_or(|n| n > limit)
    {
        say(format!(
            "{key} {limit} → {}",
            new.map_or("none".to_string(), |n| n.to_string())
        ));
    }
}

fn longer(key: &str, old: Duration, new: Duration, say: &mut impl FnMut(String)) {
    if new > old {
        say(format!("{key} {} → {}", format_span(old), format_span(new)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    const BASE: &str = r#"
[rollout]
name = "t"
author = "Paula"
observe_every = "6h"

[policy]
compliance = "Baseline"
platform = "windows"

[provider]
kind = "simulator"
devices = 1000

[emergency_access]
groups = ["Break Glass"]
users = ["bg@contoso.com"]

[approvers]
cab = ["bob", "carol", "erin"]

[[freeze]]
name = "weekend"
time_zone = "Europe/Berlin"
weekly = { from = "fri 12:00", to = "mon 06:00" }
override_by = ["dora"]

[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
exclude = ["Break Glass"]
min_soak = "2d"

[phase.gate]
min_reporting = "85%"
max_error_ratio = "5%"

[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
exclude = ["Break Glass"]
after = ["pilot"]
grace = "7d"
min_soak = "3d"

[phase.gate]
min_reporting = "95%"
max_noncompliant_ratio = "2%"
max_noncompliant = 500
max_errors = 20
stale_after = "3d"
max_hold = "14d"
approvals = 2
approver_groups = ["cab"]
approval_expires_after = "1d"
ticket_pattern = "CHG-[0-9]+"
approval_tolerance = "1%"

[phase.rollback_when]
noncompliant_ratio_above = "10%"
noncompliant_above = 2000
errors_above = 100
blocked_ratio_above = "5%"
"#;

    fn plan(text: &str) -> Plan {
        parse("t.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The weakenings of BASE edited by replacing `from` with `to`.
    fn of(from: &str, to: &str) -> Vec<String> {
        assert!(BASE.contains(from), "{from}");
        weakenings(&plan(BASE), &plan(&BASE.replacen(from, to, 1)))
    }

    fn one(from: &str, to: &str, expected: &str) {
        let found = of(from, to);
        assert_eq!(found, vec![expected.to_string()], "{from} → {to}");
    }

    #[test]
    fn the_same_plan_and_harmless_edits_weaken_nothing() {
        assert!(of("name = \"t\"", "name = \"t\"").is_empty());
        for (from, to) in [
            (
                "name = \"t\"",
                "name = \"t\"\ndescription = \"now described\"",
            ),
            ("approvals = 2", "approvals = 3"),
            ("min_soak = \"3d\"", "min_soak = \"4d\""),
            (
                "max_noncompliant_ratio = \"2%\"",
                "max_noncompliant_ratio = \"1%\"",
            ),
            ("min_reporting = \"95%\"", "min_reporting = \"97%\""),
            ("max_errors = 20", "max_errors = 10"),
            ("stale_after = \"3d\"", "stale_after = \"2d\""),
            ("max_hold = \"14d\"", "max_hold = \"7d\""),
            (
                "approval_expires_after = \"1d\"",
                "approval_expires_after = \"12h\"",
            ),
            (
                "approval_tolerance = \"1%\"",
                "approval_tolerance = \"0.5%\"",
            ),
            (
                "blocked_ratio_above = \"5%\"",
                "blocked_ratio_above = \"4%\"",
            ),
            ("errors_above = 100", "errors_above = 50"),
            (
                "cab = [\"bob\", \"carol\", \"erin\"]",
                "cab = [\"bob\", \"carol\"]",
            ),
            (
                "exclude = [\"Break Glass\"]\nmin_soak = \"2d\"",
                "exclude = [\"Break Glass\", \"Contractors\"]\nmin_soak = \"2d\"",
            ),
            ("grace = \"7d\"", "grace = \"10d\""),
            ("observe_every = \"6h\"", "observe_every = \"3h\""),
            ("override_by = [\"dora\"]", "override_by = []"),
            (
                "[[phase]]\nid = \"pilot\"",
                "[[freeze]]\nname = \"xmas\"\ntime_zone = \"UTC\"\ndates = [\"2026-12-25\"]\n\n[[phase]]\nid = \"pilot\"",
            ),
        ] {
            assert_eq!(of(from, to), Vec::<String>::new(), "{from} → {to}");
        }
    }

    #[test]
    fn a_weaker_mode_weakens_no_safeguard() {
        let report = BASE
            .replace("mode = \"notify\"", "mode = \"report\"")
            .replace("grace = \"7d\"\n", "");
        assert!(weakenings(&plan(BASE), &plan(&report)).is_empty());
    }

    #[test]
    fn each_looser_gate_setting_is_a_weakening() {
        one(
            "approvals = 2",
            "approvals = 1",
            "`notify`: approvals 2 → 1",
        );
        one(
            "max_noncompliant_ratio = \"2%\"",
            "max_noncompliant_ratio = \"3%\"",
            "`notify`: max_noncompliant_ratio 2% → 3%",
        );
        one(
            "max_noncompliant_ratio = \"2%\"\n",
            "",
            "`notify`: max_noncompliant_ratio 2% → none",
        );
        one(
            "max_noncompliant = 500",
            "max_noncompliant = 501",
            "`notify`: max_noncompliant 500 → 501",
        );
        one(
            "max_errors = 20",
            "max_errors = 21",
            "`notify`: max_errors 20 → 21",
        );
        one(
            "max_error_ratio = \"5%\"",
            "max_error_ratio = \"6%\"",
            "`pilot`: max_error_ratio 5% → 6%",
        );
        one(
            "min_reporting = \"95%\"",
            "min_reporting = \"90%\"",
            "`notify`: min_reporting 95% → 90%",
        );
        one(
            "min_reporting = \"85%\"\n",
            "",
            "`pilot`: min_reporting 85% → none",
        );
        one(
            "stale_after = \"3d\"",
            "stale_after = \"5d\"",
            "`notify`: stale_after 3d → 5d",
        );
        one(
            "max_hold = \"14d\"",
            "max_hold = \"20d\"",
            "`notify`: max_hold 14d → 20d",
        );
    }

    #[test]
    fn a_directory_approver_group_added_or_pointed_elsewhere_is_a_weakening() {
        let defined = BASE.replace(
            "cab = [\"bob\", \"carol\", \"erin\"]",
            "cab = [\"bob\", \"carol\", \"erin\"]\n\n[directory_approvers]\nboard = \"Change Advisory Board\"",
        );
        let asked = defined.replace(
            "approver_groups = [\"cab\"]",
            "approver_groups = [\"cab\", \"board\"]",
        );
        assert_eq!(
            weakenings(&plan(&defined), &plan(&asked)),
            [
                "`notify`: may now be approved by the members of directory group `Change Advisory Board`"
            ]
        );
        let elsewhere = asked.replace("Change Advisory Board", "All Staff");
        assert_eq!(
            weakenings(&plan(&asked), &plan(&elsewhere)),
            ["`notify`: may now be approved by the members of directory group `All Staff`"]
        );
        assert!(weakenings(&plan(&asked), &plan(&asked)).is_empty());
        assert!(weakenings(&plan(&asked), &plan(&defined)).is_empty());
    }

    #[test]
    fn each_looser_approval_rule_is_a_weakening() {
        one(
            "approver_groups = [\"cab\"]\n",
            "",
            "`notify`: anyone may approve, not only the people named",
        );
        one(
            "cab = [\"bob\", \"carol\", \"erin\"]",
            "cab = [\"bob\", \"carol\", \"erin\", \"Eve\"]",
            "`notify`: may now be approved by eve",
        );
        one(
            "approval_expires_after = \"1d\"",
            "approval_expires_after = \"2d\"",
            "`notify`: approvals last 1d → 2d",
        );
        one(
            "approval_expires_after = \"1d\"\n",
            "",
            "`notify`: approvals last 1d → forever",
        );
        one(
            "ticket_pattern = \"CHG-[0-9]+\"",
            "ticket_pattern = \"CHG-.*\"",
            "`notify`: ticket_pattern `CHG-[0-9]+` → `CHG-.*`",
        );
        one(
            "ticket_pattern = \"CHG-[0-9]+\"\n",
            "",
            "`notify`: ticket_pattern `CHG-[0-9]+` → none",
        );
        one(
            "approval_tolerance = \"1%\"",
            "approval_tolerance = \"2%\"",
            "`notify`: approval_tolerance 1% → 2%",
        );
        one(
            "approval_tolerance = \"1%\"\n",
            "",
            "`notify`: approval_tolerance 1% → none",
        );
        one(
            "author = \"Paula\"",
            "author = \"Quinn\"",
            "the plan's author paula is no longer named, so may approve",
        );
        one(
            "author = \"Paula\"",
            "author = \"Paula\"\nseparation_of_duties = false",
            "separation of duties is turned off",
        );
        let required = BASE.replace("ticket_pattern = \"CHG-[0-9]+\"", "require_ticket = true");
        assert_eq!(
            weakenings(
                &plan(&required),
                &plan(&required.replace("require_ticket = true\n", ""))
            ),
            vec!["`notify`: no change ticket required".to_string()]
        );
    }

    #[test]
    fn a_shorter_soak_or_grace_and_looser_rollback_criteria_are_weakenings() {
        one(
            "min_soak = \"3d\"",
            "min_soak = \"1d\"",
            "`notify`: soak 3d → 1d",
        );
        one(
            "grace = \"7d\"",
            "grace = \"2d\"",
            "`notify`: grace 7d → 2d",
        );
        one(
            "noncompliant_ratio_above = \"10%\"",
            "noncompliant_ratio_above = \"20%\"",
            "`notify`: rollback_when.noncompliant_ratio_above 10% → 20%",
        );
        one(
            "noncompliant_above = 2000",
            "noncompliant_above = 3000",
            "`notify`: rollback_when.noncompliant_above 2000 → 3000",
        );
        one(
            "errors_above = 100\n",
            "",
            "`notify`: rollback_when.errors_above 100 → none",
        );
        one(
            "blocked_ratio_above = \"5%\"",
            "blocked_ratio_above = \"9%\"",
            "`notify`: rollback_when.blocked_ratio_above 5% → 9%",
        );
        one(
            "observe_every = \"6h\"",
            "observe_every = \"12h\"",
            "observations (and rollback checks) less often: every 6h → every 12h",
        );
        one(
            "observe_every = \"6h\"",
            "observe_every = \"6h\"\nmax_exception = \"120d\"",
            "exceptions from enforcement may run longer: 90d → 120d",
        );
    }

    #[test]
    fn a_wider_scope_or_stronger_mode_is_a_weakening() {
        one(
            "include = [\"Pilot IT\"]",
            "include = [\"Pilot IT\", \"All Users\"]",
            "`pilot`: now includes `All Users`",
        );
        one(
            "exclude = [\"Break Glass\"]\nmin_soak = \"2d\"",
            "exclude = []\nmin_soak = \"2d\"",
            "`pilot`: no longer excludes `Break Glass`",
        );
        one(
            "mode = \"report\"",
            "mode = \"notify\"\ngrace = \"7d\"",
            "`pilot`: mode report → notify",
        );
        one(
            "after = [\"pilot\"]",
            "after = []",
            "`notify`: no longer waits for `pilot`",
        );
        one(
            "users = [\"bg@contoso.com\"]",
            "users = []",
            "emergency access no longer exempts `bg@contoso.com`",
        );
        one(
            "compliance = \"Baseline\"",
            "compliance = \"Other\"",
            "the policies rolled out change",
        );
        one(
            "devices = 1000",
            "devices = 2000",
            "the backend's settings change",
        );
        let dropped = BASE
            .split("[[phase]]\nid = \"notify\"")
            .next()
            .unwrap()
            .to_string();
        assert_eq!(
            weakenings(&plan(BASE), &plan(&dropped)),
            vec!["phase `notify` is removed, with its gate and soak".to_string()]
        );
        let added = format!(
            "{BASE}\n[[phase]]\nid = \"enforce\"\nmode = \"enforce\"\ninclude = [\"All Users\", \"Contractors\"]\nexclude = [\"Break Glass\"]\nafter = [\"notify\"]\n"
        );
        assert_eq!(
            weakenings(&plan(BASE), &plan(&added)),
            vec![
                "new phase `enforce` includes `Contractors`, which no phase did".to_string(),
                "new phase `enforce` is in enforce mode, stronger than any phase before"
                    .to_string(),
            ]
        );
        // A new stage within the old scope and modes is not.
        let staged = format!(
            "{BASE}\n[[phase]]\nid = \"notify-2\"\nmode = \"notify\"\ngrace = \"7d\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\nafter = [\"notify\"]\n"
        );
        assert!(weakenings(&plan(BASE), &plan(&staged)).is_empty());
    }

    #[test]
    fn a_freeze_window_taken_away_changed_or_opened_to_more_people_is_a_weakening() {
        one(
            "weekly = { from = \"fri 12:00\", to = \"mon 06:00\" }",
            "weekly = { from = \"sat 12:00\", to = \"mon 06:00\" }",
            "freeze window `weekend` changes: weekend: every Sat 12:00 to Mon 06:00 (Europe/Berlin)",
        );
        one(
            "time_zone = \"Europe/Berlin\"",
            "time_zone = \"America/New_York\"",
            "freeze window `weekend` changes: weekend: every Fri 12:00 to Mon 06:00 (America/New_York)",
        );
        one(
            "override_by = [\"dora\"]",
            "override_by = [\"dora\", \"ed\"]",
            "freeze window `weekend` may now be overridden by ed",
        );
        let without = BASE.replace(
            "[[freeze]]\nname = \"weekend\"\ntime_zone = \"Europe/Berlin\"\nweekly = { from = \"fri 12:00\", to = \"mon 06:00\" }\noverride_by = [\"dora\"]\n",
            "",
        );
        assert_eq!(
            weakenings(&plan(BASE), &plan(&without)),
            vec!["freeze window `weekend` is removed".to_string()]
        );
    }

    #[test]
    fn several_weakenings_are_all_listed() {
        let found = weakenings(
            &plan(BASE),
            &plan(
                &BASE
                    .replace("approvals = 2", "approvals = 1")
                    .replace("min_soak = \"2d\"", "min_soak = \"1h\""),
            ),
        );
        assert_eq!(
            found,
            vec![
                "`pilot`: soak 2d → 1h".to_string(),
                "`notify`: approvals 2 → 1".to_string()
            ]
        );
    }
}
