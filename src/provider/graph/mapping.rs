//! How a rollout's desired state maps onto Intune and Conditional Access, as pure functions.
//!
//! The design (written out with the exact calls in `docs/graph.md`):
//! - the compliance policy is **assigned** to every group of every applied phase (all modes), so
//!   devices evaluate and report; exclusions apply where every applied phase excludes the group;
//! - **notify** adds the policy's `notification` action and sets the `block` action's grace
//!   period to the phase's `grace` (devices stay `inGracePeriod`, with access, until it ends);
//! - the plan's Conditional Access policy is kept in **report-only** over the whole applied scope;
//! - **enforce** is an enabled copy of that policy (`<name> (phasegate enforced)`) scoped to the
//!   enforce phases' groups, as Microsoft's own phased Conditional Access rollout does;
//! - rollback computes the same from fewer phases; abort restores the recorded baseline.
//!
//! Every write is "make it so", derived by comparing what the tenant has with what is wanted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::domain::desired::DesiredState;
use crate::domain::plan::Mode;
use crate::graph::{ActionItem, AssignmentTarget, CaUsers};

pub const ENFORCED_SUFFIX: &str = " (phasegate enforced)";

/// A group as the tenant knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GroupRef {
    Id(String),
    /// The virtual "All users" target.
    AllUsers,
}

/// Ids the plan's names resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub policy_id: String,
    pub template_id: Option<String>,
    pub conditional_access: Option<CaNames>,
    pub groups: BTreeMap<String, GroupRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaNames {
    pub id: String,
    pub name: String,
}

impl CaNames {
    pub fn enforced_name(&self) -> String {
        format!("{}{ENFORCED_SUFFIX}", self.name)
    }
}

/// The state of a Conditional Access policy, in the parts phasegate manages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaState {
    pub state: String,
    pub users: CaUsers,
}

/// What phasegate manages in the tenant. Also the baseline recorded before a rollout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantConfig {
    pub assignments: BTreeSet<AssignmentTarget>,
    pub actions: Vec<ActionItem>,
    /// The plan's Conditional Access policy, if it names one.
    pub conditional_access: Option<CaState>,
    /// The enforced copy; `None` when it does not exist.
    pub enforced: Option<CaState>,
}

/// One change to make in the tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Replace the policy's whole assignment set (`POST .../assign`).
    Assign(Vec<AssignmentTarget>),
    /// Replace the policy's actions for noncompliance (`POST .../scheduleActionsForRules`).
    Actions(Vec<ActionItem>),
    /// `PATCH` the plan's Conditional Access policy with only what changed.
    PatchConditionalAccess {
        state: Option<String>,
        users: Option<CaUsers>,
    },
    /// `POST` the enforced copy.
    CreateEnforced(CaState),
    /// `PATCH` the enforced copy with only what changed.
    PatchEnforced {
        state: Option<String>,
        users: Option<CaUsers>,
    },
    /// `DELETE` the enforced copy (abort, when it did not exist before).
    DeleteEnforced,
}

impl Write {
    pub fn name(&self) -> &'static str {
        match self {
            Write::Assign(_) => "assign",
            Write::Actions(_) => "scheduleActionsForRules",
            Write::PatchConditionalAccess { .. } => "patch conditional access",
            Write::CreateEnforced(_) => "create enforced copy",
            Write::PatchEnforced { .. } => "patch enforced copy",
            Write::DeleteEnforced => "delete enforced copy",
        }
    }
}

fn resolve(names: &Names, group: &str) -> Result<GroupRef, String> {
    names
        .groups
        .get(group)
        .cloned()
        .ok_or_else(|| format!("group `{group}` was not resolved"))
}

fn users_for(include: &BTreeSet<GroupRef>, exclude: &BTreeSet<GroupRef>) -> CaUsers {
    let ids = |set: &BTreeSet<GroupRef>| -> Vec<String> {
        set.iter()
            .filter_map(|g| match g {
                GroupRef::Id(id) => Some(id.clone()),
                GroupRef::AllUsers => None,
            })
            .collect()
    };
    CaUsers {
        include_users: if include.contains(&GroupRef::AllUsers) {
            vec!["All".to_string()]
        } else {
            Vec::new()
        },
        include_groups: ids(include),
        exclude_groups: ids(exclude),
        ..CaUsers::default()
    }
}

/// The union of includes and the intersection of excludes of some phases.
fn scope<'a>(
    names: &Names,
    phases: impl Iterator<Item = &'a crate::domain::desired::DesiredAssignment>,
) -> Result<(BTreeSet<GroupRef>, BTreeSet<GroupRef>), String> {
    let mut include = BTreeSet::new();
    let mut exclude: Option<BTreeSet<GroupRef>> = None;
    for phase in phases {
        for group in &phase.include {
            include.insert(resolve(names, group)?);
        }
        let excluded = phase
            .exclude
            .iter()
            .map(|g| resolve(names, g))
            .collect::<Result<BTreeSet<_>, _>>()?;
        exclude = Some(match exclude {
            None => excluded,
            Some(before) => before.intersection(&excluded).cloned().collect(),
        });
    }
    let mut exclude = exclude.unwrap_or_default();
    exclude.remove(&GroupRef::AllUsers);
    Ok((include, exclude))
}

fn sorted(mut actions: Vec<ActionItem>) -> Vec<ActionItem> {
    actions.sort_by_key(ActionItem::essence);
    actions
}

/// The configuration the rollout wants, given what was there before it and what is there now.
pub fn desired_config(
    desired: &DesiredState,
    names: &Names,
    baseline: &TenantConfig,
    current: &TenantConfig,
) -> Result<TenantConfig, String> {
    let applied = &desired.assignments;
    let mut wanted = if applied.is_empty() {
        TenantConfig {
            enforced: None,
            ..baseline.clone()
        }
    } else {
        let (include, exclude) = scope(names, applied.iter())?;
        let mut assignments: BTreeSet<AssignmentTarget> = include
            .iter()
            .map(|g| match g {
                GroupRef::Id(id) => AssignmentTarget::Group {
                    group_id: id.clone(),
                },
                GroupRef::AllUsers => AssignmentTarget::AllUsers,
            })
            .collect();
        assignments.extend(exclude.iter().filter_map(|g| match g {
            GroupRef::Id(id) => Some(AssignmentTarget::Exclusion {
                group_id: id.clone(),
            }),
            GroupRef::AllUsers => None,
        }));
        let notify_grace_hours = applied
            .iter()
            .filter(|a| a.mode == Mode::Notify)
            .map(|a| a.grace_secs.unwrap_or(0).div_ceil(3600) as i64)
            .max();
        let actions = match notify_grace_hours {
            Some(hours) => {
                let template = names
                    .template_id
                    .as_deref()
                    .ok_or("a notify phase needs `notification_template` in the plan's [policy]")?;
                vec![ActionItem::block(hours), ActionItem::notification(template)]
            }
            None if applied.iter().any(|a| a.mode == Mode::Enforce) => {
                vec![ActionItem::block(0)]
            }
            None => baseline.actions.clone(),
        };
        let conditional_access = names.conditional_access.as_ref().map(|_| CaState {
            state: "enabledForReportingButNotEnforced".to_string(),
            users: users_for(&include, &exclude),
        });
        TenantConfig {
            assignments,
            actions,
            conditional_access,
            enforced: None,
        }
    };
    wanted.actions = sorted(wanted.actions);
    wanted.enforced = match &names.conditional_access {
        None => None,
        Some(_) => {
            let enforcing: Vec<_> = applied.iter().filter(|a| a.mode == Mode::Enforce).collect();
            if enforcing.is_empty() {
                current.enforced.as_ref().map(|copy| CaState {
                    state: "disabled".to_string(),
                    users: copy.users.clone(),
                })
            } else {
                let (include, exclude) = scope(names, enforcing.into_iter())?;
                Some(CaState {
                    state: "enabled".to_string(),
                    users: users_for(&include, &exclude),
                })
            }
        }
    };
    Ok(wanted)
}

/// Exactly the configuration recorded before the rollout.
pub fn restore_config(baseline: &TenantConfig) -> TenantConfig {
    TenantConfig {
        actions: sorted(baseline.actions.clone()),
        ..baseline.clone()
    }
}

fn normalized(users: &CaUsers) -> CaUsers {
    let mut users = users.clone();
    for list in [
        &mut users.include_users,
        &mut users.exclude_users,
        &mut users.include_groups,
        &mut users.exclude_groups,
        &mut users.include_roles,
        &mut users.exclude_roles,
    ] {
        list.sort();
        list.dedup();
    }
    users
}

fn same_actions(a: &[ActionItem], b: &[ActionItem]) -> bool {
    let mut a: Vec<_> = a.iter().map(ActionItem::essence).collect();
    let mut b: Vec<_> = b.iter().map(ActionItem::essence).collect();
    a.sort();
    b.sort();
    a == b
}

fn patch(current: &CaState, wanted: &CaState) -> (Option<String>, Option<CaUsers>) {
    let state = (current.state != wanted.state).then(|| wanted.state.clone());
    let users = (normalized(&current.users) != normalized(&wanted.users))
        .then(|| normalized(&wanted.users));
    (state, users)
}

/// The writes that turn `current` into `wanted`, least blocking first: anything that unblocks
/// people goes before anything that could block them.
pub fn plan_writes(current: &TenantConfig, wanted: &TenantConfig) -> Vec<Write> {
    let mut writes = Vec::new();
    let enforced_now = current
        .enforced
        .as_ref()
        .is_some_and(|c| c.state == "enabled");
    let enforced_next = wanted
        .enforced
        .as_ref()
        .is_some_and(|c| c.state == "enabled");
    match (&current.enforced, &wanted.enforced) {
        (Some(_), None) => writes.push(Write::DeleteEnforced),
        (Some(now), Some(next)) if enforced_now && !enforced_next => {
            let (state, users) = patch(now, next);
            writes.push(Write::PatchEnforced { state, users });
        }
        _ => {}
    }
    if current.assignments != wanted.assignments {
        writes.push(Write::Assign(wanted.assignments.iter().cloned().collect()));
    }
    if !same_actions(&current.actions, &wanted.actions) {
        writes.push(Write::Actions(wanted.actions.clone()));
    }
    if let (Some(now), Some(next)) = (&current.conditional_access, &wanted.conditional_access) {
        let (state, users) = patch(now, next);
        if state.is_some() || users.is_some() {
            writes.push(Write::PatchConditionalAccess { state, users });
        }
    }
    match (&current.enforced, &wanted.enforced) {
        (None, Some(next)) => writes.push(Write::CreateEnforced(CaState {
            state: next.state.clone(),
            users: normalized(&next.users),
        })),
        (Some(now), Some(next)) if enforced_next || !enforced_now => {
            let (state, users) = patch(now, next);
            if state.is_some() || users.is_some() {
                writes.push(Write::PatchEnforced { state, users });
            }
        }
        _ => {}
    }
    writes
}

#[cfg(test)]
mod tests;
