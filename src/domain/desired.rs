//! The backend configuration a rollout wants, as a pure function of the plan and the rollout.
//!
//! Providers never receive "apply phase 3"; they receive the whole desired state and reconcile
//! toward it (read what is there, change only what differs). Re-applying after a crash is
//! therefore harmless, and rollback is just another desired state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::plan::{Mode, Plan};
use super::rollout::{PhaseState, Rollout};

/// Which groups get the policy, in which mode. Where assignments overlap, a device gets the
/// strongest mode of the assignments that cover it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub assignments: Vec<DesiredAssignment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredAssignment {
    pub phase: String,
    pub mode: Mode,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Grace period of a notify phase, in seconds.
    pub grace_secs: Option<u64>,
}

/// The desired state for exactly these phases (indices into the plan), in plan order.
pub fn desired_with(plan: &Plan, phases: &BTreeSet<usize>) -> DesiredState {
    let assignments = phases
        .iter()
        .map(|&idx| {
            let phase = &plan.phases[idx];
            DesiredAssignment {
                phase: phase.id.clone(),
                mode: phase.mode,
                include: phase.include.clone(),
                exclude: phase.exclude.clone(),
                grace_secs: phase.grace.map(|g| g.as_secs()),
            }
        })
        .collect();
    DesiredState { assignments }
}

/// What the backend should look like for the rollout as it stands: every phase that is being
/// applied, running or promoted.
pub fn desired_state(plan: &Plan, rollout: &Rollout) -> DesiredState {
    let applied: BTreeSet<usize> = rollout
        .phases
        .iter()
        .enumerate()
        .filter(|(_, p)| p.state.is_applied())
        .map(|(idx, _)| idx)
        .collect();
    desired_with(plan, &applied)
}

/// What the backend looks like while `phases` are the current phases: they and everything before
/// them. Rolling back to a phase must produce exactly this.
pub fn desired_for_phases(plan: &Plan, phases: &BTreeSet<usize>) -> DesiredState {
    let mut with_ancestors = phases.clone();
    for &idx in phases {
        with_ancestors.extend(plan.ancestors(idx));
    }
    desired_with(plan, &with_ancestors)
}

impl PhaseState {
    /// The phase's configuration is (or is being) in the backend.
    pub fn is_applied(self) -> bool {
        matches!(
            self,
            PhaseState::Applying
                | PhaseState::Soaking
                | PhaseState::AwaitingApproval
                | PhaseState::Promoted
        )
    }
}
