//! What is valid but dangerous in a plan: each warning at its place in the file, with why it
//! matters. A plan with warnings runs as written; one checked strictly is refused for them.
//!
//! What is always wrong is an error elsewhere, not a warning here: an enforce phase that does not
//! exclude an emergency-access group, a phase that includes one, a plan that enforces without
//! naming its emergency access.

use toml::Spanned;

use super::raw::{RawPhase, RawPlan};
use super::{Diagnostic, Mode, Phase, Plan};

/// The name plans give everyone: the All users target of Intune and Conditional Access (Graph),
/// every user of the simulated fleet.
pub const EVERYONE: &str = "All Users";

/// Every warning about a validated plan, in file order. `raw` is the file `plan` was built from.
pub(super) fn of(raw: &RawPlan, plan: &Plan) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    for (idx, (phase, written)) in plan.phases.iter().zip(&raw.phase).enumerate() {
        let written = written.get_ref();
        if phase.mode == Mode::Enforce {
            enforces_unobserved(plan, idx, written, &mut found);
            gate_without_criteria(phase, written, &mut found);
        }
        soak_without_time(plan, idx, written, &mut found);
        criteria_that_cannot_hold(phase, written, &mut found);
        emergency_users_in_scope(plan, phase, written, &mut found);
    }
    found.sort_by_key(|d| (d.span.start, d.span.end));
    found
}

/// (a) An enforce phase on a broad scope that no report or notify phase comes before: devices
/// are blocked before anyone has seen how many fail. A scope is broad when it names
/// [`EVERYONE`], or a group another phase of the plan also includes (the plan stages that group
/// and this phase skips the stages).
fn enforces_unobserved(plan: &Plan, idx: usize, written: &RawPhase, found: &mut Vec<Diagnostic>) {
    let phase = &plan.phases[idx];
    let observed = plan
        .ancestors(idx)
        .iter()
        .any(|&a| plan.phases[a].mode < Mode::Enforce);
    if observed {
        return;
    }
    let everyone = phase
        .include
        .iter()
        .find(|g| g.eq_ignore_ascii_case(EVERYONE));
    let shared = || {
        phase.include.iter().find_map(|group| {
            plan.phases
                .iter()
                .enumerate()
                .find(|&(other, p)| {
                    other != idx && p.include.iter().any(|g| g.eq_ignore_ascii_case(group))
                })
                .map(|(_, p)| (group, p))
        })
    };
    let scope = match (everyone, shared()) {
        (Some(group), _) => format!("`{group}`"),
        (None, Some((group, other))) => {
            format!("`{group}`, which phase `{}` also includes,", other.id)
        }
        (None, None) => return,
    };
    let when = if phase.after.is_empty() {
        "from the start of the rollout"
    } else {
        "after enforce phases only"
    };
    found.push(
        Diagnostic::new(
            written.mode.span(),
            format!(
                "phase `{}` enforces on {scope} {when}, with no report or notify phase before it",
                phase.id
            ),
        )
        .because(
            "devices are blocked before anyone has seen how many fail the policy; make it wait \
             for a report or notify phase on the same scope (`after`)",
        ),
    );
}

/// (a) An enforce phase whose gate has no criterion: it passes whatever is blocked.
fn gate_without_criteria(phase: &Phase, written: &RawPhase, found: &mut Vec<Diagnostic>) {
    let gate = &phase.gate;
    let criteria = gate.max_noncompliant.is_some()
        || gate.max_noncompliant_ratio.is_some()
        || gate.min_reporting.is_some()
        || gate.max_errors.is_some()
        || gate.max_error_ratio.is_some()
        || gate.approvals > 0;
    if criteria {
        return;
    }
    let (span, message) = match &written.gate {
        Some(table) => (
            table.span(),
            format!("the gate of enforce phase `{}` has no criteria", phase.id),
        ),
        None => (
            written.mode.span(),
            format!("enforce phase `{}` has no gate", phase.id),
        ),
    };
    found.push(Diagnostic::new(span, message).because(
        "it passes as soon as any device reports after the soak, however many are blocked; set \
         `max_noncompliant_ratio`, `min_reporting` or `approvals` in [phase.gate]",
    ));
}

/// (c) No soak on a phase that has a successor: the next phase starts on the first observation.
fn soak_without_time(plan: &Plan, idx: usize, written: &RawPhase, found: &mut Vec<Diagnostic>) {
    let phase = &plan.phases[idx];
    let Some(soak) = &written.min_soak else {
        return;
    };
    if !phase.min_soak.is_zero() {
        return;
    }
    let Some(next) = plan.phases.iter().find(|p| p.after.contains(&idx)) else {
        return;
    };
    found.push(
        Diagnostic::new(
            soak.span(),
            format!(
                "phase `{}` has no soak (`min_soak = \"{}\"`) before `{}` starts",
                phase.id,
                soak.get_ref(),
                next.id
            ),
        )
        .because(
            "its gate is judged on the first observation after the change, before devices have \
             checked in under it: there is no time to see what it does",
        ),
    );
}

/// (b) `min_reporting = "0%"`, (d) a share limit of 100%: criteria that cannot do their job.
fn criteria_that_cannot_hold(phase: &Phase, written: &RawPhase, found: &mut Vec<Diagnostic>) {
    let id = &phase.id;
    let gate = &phase.gate;
    let mut warn = |value: Option<&Spanned<String>>, message: String, why: &str| {
        if let Some(value) = value {
            found.push(Diagnostic::new(value.span(), message).because(why));
        }
    };
    let raw_gate = written.gate.as_ref().map(|g| g.get_ref());
    if gate.min_reporting.is_some_and(|r| r.fraction() == 0.0) {
        let value = raw_gate.and_then(|g| g.min_reporting.as_ref());
        warn(
            value,
            format!(
                "`min_reporting = \"{}\"` in phase `{id}` asks for no coverage",
                value.map_or("", |v| v.get_ref())
            ),
            "the gate judges the whole scope on however few devices report — one is enough, \
             and silence is never counted as failing",
        );
    }
    let all = |ratio: Option<super::Ratio>| ratio.is_some_and(|r| r.fraction() >= 1.0);
    for (key, ratio, value) in [
        (
            "max_noncompliant_ratio",
            gate.max_noncompliant_ratio,
            raw_gate.and_then(|g| g.max_noncompliant_ratio.as_ref()),
        ),
        (
            "max_error_ratio",
            gate.max_error_ratio,
            raw_gate.and_then(|g| g.max_error_ratio.as_ref()),
        ),
    ] {
        if all(ratio) {
            warn(
                value,
                format!(
                    "`{key} = \"{}\"` in the gate of phase `{id}` cannot fail",
                    value.map_or("", |v| v.get_ref())
                ),
                "a share of devices is never above 100%, so this criterion never holds the \
                 rollout; lower it, or remove it if it is not meant to be checked",
            );
        }
    }
    let rollback = &phase.rollback_when;
    let raw_rollback = written.rollback_when.as_ref().map(|r| r.get_ref());
    for (key, ratio, value) in [
        (
            "noncompliant_ratio_above",
            rollback.noncompliant_ratio_above,
            raw_rollback.and_then(|r| r.noncompliant_ratio_above.as_ref()),
        ),
        (
            "blocked_ratio_above",
            rollback.blocked_ratio_above,
            raw_rollback.and_then(|r| r.blocked_ratio_above.as_ref()),
        ),
    ] {
        if all(ratio) {
            warn(
                value,
                format!(
                    "`{key} = \"{}\"` in the rollback_when of phase `{id}` can never trip",
                    value.map_or("", |v| v.get_ref())
                ),
                "a share of devices is never above 100%, so this never rolls the phase back; \
                 lower it, or remove it if it is not meant to be checked",
            );
        }
    }
}

/// (e) An emergency-access user named in a phase's `include` (an emergency-access group there is
/// an error, reported by the validation).
fn emergency_users_in_scope(
    plan: &Plan,
    phase: &Phase,
    written: &RawPhase,
    found: &mut Vec<Diagnostic>,
) {
    for group in written.include.get_ref() {
        let name = group.get_ref().trim();
        if plan
            .emergency_access
            .users
            .iter()
            .any(|u| u.eq_ignore_ascii_case(name))
        {
            found.push(
                Diagnostic::new(
                    group.span(),
                    format!(
                        "phase `{}` includes `{name}`, an emergency-access user",
                        phase.id
                    ),
                )
                .because(
                    "emergency access is never in scope: the accounts that must never be locked \
                     out belong in [emergency_access] only, not in a phase's `include`",
                ),
            );
        }
    }
}
