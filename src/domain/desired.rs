//! The backend configuration a rollout wants, as a pure function of the plan and the rollout.
//!
//! Providers never receive "apply phase 3"; they receive the whole desired state and reconcile
//! toward it (read what is there, change only what differs). Re-applying after a crash is
//! therefore harmless, and rollback is just another desired state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::plan::{EmergencyAccess, Mode, Plan};
use super::rollout::{Exception, PhaseState, Rollout, Subject};

/// Which groups get the policies, in which mode. Where assignments overlap, a device gets the
/// strongest mode of the assignments that cover it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The rollout that wants this; a provider marks the objects it writes as this rollout's.
    pub rollout: String,
    pub assignments: Vec<DesiredAssignment>,
    /// The rollout still owns what it writes; false once it completed, when the configuration
    /// stays and the claim on the objects goes.
    pub claim: bool,
    /// Accounts every enforcement scope excludes.
    pub emergency_access: EmergencyAccess,
    /// Why the change is made, for a tenant that asks for a justification.
    pub change: ChangeNote,
    /// Every group any phase of the plan includes or excludes, applied or not: the members a
    /// provider manages (and watches for drift) for the whole rollout.
    pub groups: PlanGroups,
    /// Users and groups exempt from enforcement by an active exception.
    #[serde(default, skip_serializing_if = "Exempt::is_empty")]
    pub exempt: Exempt,
}

/// The subjects of a rollout's active exceptions: users by UPN (identity keys), groups by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exempt {
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl Exempt {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }

    pub fn of(exceptions: &[Exception]) -> Exempt {
        let mut users = BTreeSet::new();
        let mut groups = BTreeSet::new();
        for exception in exceptions {
            match &exception.subject {
                Subject::User(upn) => users.insert(upn.clone()),
                Subject::Group(name) => groups.insert(name.clone()),
            };
        }
        Exempt {
            users: users.into_iter().collect(),
            groups: groups.into_iter().collect(),
        }
    }
}

/// The groups of a plan's phases, by the names the plan uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGroups {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl PlanGroups {
    pub fn of(plan: &Plan) -> PlanGroups {
        let mut include: BTreeSet<String> = BTreeSet::new();
        let mut exclude: BTreeSet<String> = BTreeSet::new();
        for phase in &plan.phases {
            include.extend(phase.include.iter().cloned());
            exclude.extend(phase.exclude.iter().cloned());
        }
        exclude.extend(plan.emergency_access.groups.iter().cloned());
        PlanGroups {
            include: include.into_iter().collect(),
            exclude: exclude.into_iter().collect(),
        }
    }
}

/// The phases a change applies and the change ticket behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeNote {
    pub phases: Vec<String>,
    pub ticket: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredAssignment {
    pub phase: String,
    pub mode: Mode,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Grace period of a notify phase, in seconds.
    pub grace_secs: Option<u64>,
    /// How long a device may go without reporting and still count (the gate's `stale_after`):
    /// the time a notification may take to reach a device that checks in.
    pub margin_secs: u64,
}

/// The desired state for exactly these phases (indices into the plan), in plan order.
pub fn desired_with(plan: &Plan, rollout: &str, phases: &BTreeSet<usize>) -> DesiredState {
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
                margin_secs: phase.gate.stale_after.as_secs(),
            }
        })
        .collect();
    DesiredState {
        rollout: rollout.to_string(),
        assignments,
        claim: true,
        emergency_access: plan.emergency_access.clone(),
        change: ChangeNote::default(),
        groups: PlanGroups::of(plan),
        exempt: Exempt::default(),
    }
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
    let mut desired = desired_with(plan, &rollout.id, &applied);
    desired.exempt = Exempt::of(&rollout.exceptions);
    desired.claim = rollout
        .phases
        .iter()
        .any(|p| p.state != PhaseState::Promoted);
    desired.change = ChangeNote {
        phases: rollout
            .phases
            .iter()
            .filter(|p| p.state == PhaseState::Applying)
            .map(|p| p.id.clone())
            .collect(),
        ticket: rollout
            .phases
            .iter()
            .flat_map(|p| &p.approvals)
            .filter(|a| a.ticket.is_some())
            .max_by_key(|a| a.at)
            .and_then(|a| a.ticket.clone()),
    };
    desired
}

/// What the backend looks like while `phases` are the current phases: they and everything before
/// them. Rolling back to a phase must produce exactly this.
pub fn desired_for_phases(plan: &Plan, rollout: &str, phases: &BTreeSet<usize>) -> DesiredState {
    let mut with_ancestors = phases.clone();
    for &idx in phases {
        with_ancestors.extend(plan.ancestors(idx));
    }
    desired_with(plan, rollout, &with_ancestors)
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
