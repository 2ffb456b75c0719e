use super::*;
use crate::domain::desired::DesiredAssignment;

fn names() -> Names {
    Names {
        policy_id: "policy".into(),
        template_id: Some("template".into()),
        conditional_access: Some(CaNames {
            id: "ca".into(),
            name: "Require compliant device".into(),
        }),
        groups: [
            ("Pilot IT".to_string(), GroupRef::Id("g-pilot".into())),
            ("Break Glass".to_string(), GroupRef::Id("g-bg".into())),
            ("Finance".to_string(), GroupRef::Id("g-fin".into())),
            ("All Users".to_string(), GroupRef::AllUsers),
        ]
        .into_iter()
        .collect(),
    }
}

fn phase(id: &str, mode: Mode, include: &[&str], exclude: &[&str]) -> DesiredAssignment {
    DesiredAssignment {
        phase: id.into(),
        mode,
        include: include.iter().map(|s| s.to_string()).collect(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        grace_secs: (mode == Mode::Notify).then_some(7 * 86_400),
    }
}

fn baseline() -> TenantConfig {
    TenantConfig {
        assignments: BTreeSet::new(),
        actions: vec![ActionItem::block(0)],
        conditional_access: Some(CaState {
            state: "disabled".into(),
            users: CaUsers {
                include_users: vec!["None".into()],
                ..CaUsers::default()
            },
        }),
        enforced: None,
    }
}

fn desired(phases: Vec<DesiredAssignment>) -> DesiredState {
    DesiredState {
        assignments: phases,
    }
}

fn group(id: &str) -> AssignmentTarget {
    AssignmentTarget::Group {
        group_id: id.into(),
    }
}

#[test]
fn a_report_pilot_assigns_the_pilot_group_and_reports_only() {
    let want = desired_config(
        &desired(vec![phase(
            "pilot",
            Mode::Report,
            &["Pilot IT"],
            &["Break Glass"],
        )]),
        &names(),
        &baseline(),
        &baseline(),
    )
    .unwrap();
    assert_eq!(
        want.assignments,
        BTreeSet::from([
            group("g-pilot"),
            AssignmentTarget::Exclusion {
                group_id: "g-bg".into()
            }
        ])
    );
    assert_eq!(want.actions, vec![ActionItem::block(0)]);
    let ca = want.conditional_access.unwrap();
    assert_eq!(ca.state, "enabledForReportingButNotEnforced");
    assert_eq!(ca.users.include_groups, vec!["g-pilot"]);
    assert_eq!(ca.users.exclude_groups, vec!["g-bg"]);
    assert_eq!(want.enforced, None);
}

#[test]
fn notify_adds_the_notification_and_the_grace_period() {
    let want = desired_config(
        &desired(vec![
            phase("pilot", Mode::Report, &["Pilot IT"], &["Break Glass"]),
            phase("notify", Mode::Notify, &["All Users"], &["Break Glass"]),
        ]),
        &names(),
        &baseline(),
        &baseline(),
    )
    .unwrap();
    assert!(want.assignments.contains(&AssignmentTarget::AllUsers));
    assert_eq!(
        want.actions
            .iter()
            .map(ActionItem::essence)
            .collect::<Vec<_>>(),
        vec![
            ("block".to_string(), 168, String::new()),
            ("notification".to_string(), 0, "template".to_string())
        ]
    );
    assert_eq!(
        want.conditional_access.unwrap().users.include_users,
        vec!["All"]
    );
}

#[test]
fn notify_without_a_template_is_an_error() {
    let mut names = names();
    names.template_id = None;
    let err = desired_config(
        &desired(vec![phase("n", Mode::Notify, &["All Users"], &[])]),
        &names,
        &baseline(),
        &baseline(),
    )
    .unwrap_err();
    assert!(err.contains("notification_template"), "{err}");
}

#[test]
fn enforce_creates_an_enabled_copy_last_and_rollback_disables_it_first() {
    let phases = vec![
        phase("notify", Mode::Notify, &["All Users"], &["Break Glass"]),
        phase("enforce", Mode::Enforce, &["All Users"], &["Break Glass"]),
    ];
    let notify_only = desired(phases[..1].to_vec());
    let both = desired(phases.clone());
    let at_notify = desired_config(&notify_only, &names(), &baseline(), &baseline()).unwrap();
    let at_enforce = desired_config(&both, &names(), &baseline(), &at_notify).unwrap();
    let copy = at_enforce.enforced.clone().unwrap();
    assert_eq!(copy.state, "enabled");
    assert_eq!(copy.users.include_users, vec!["All"]);
    assert_eq!(copy.users.exclude_groups, vec!["g-bg"]);
    let promote = plan_writes(&at_notify, &at_enforce);
    assert!(
        matches!(promote.last(), Some(Write::CreateEnforced(_))),
        "{promote:?}"
    );

    let back = desired_config(&notify_only, &names(), &baseline(), &at_enforce).unwrap();
    assert_eq!(back.enforced.as_ref().unwrap().state, "disabled");
    let rollback = plan_writes(&at_enforce, &back);
    assert_eq!(
        rollback[0],
        Write::PatchEnforced {
            state: Some("disabled".into()),
            users: None
        }
    );
}

#[test]
fn reconciling_what_is_already_there_writes_nothing() {
    let want = desired_config(
        &desired(vec![phase(
            "n",
            Mode::Notify,
            &["All Users", "Finance"],
            &["Break Glass"],
        )]),
        &names(),
        &baseline(),
        &baseline(),
    )
    .unwrap();
    assert!(plan_writes(&want, &want).is_empty());
    let mut reread = want.clone();
    reread.actions.reverse();
    if let Some(ca) = reread.conditional_access.as_mut() {
        ca.users.include_groups.reverse();
    }
    assert!(
        plan_writes(&reread, &want).is_empty(),
        "order does not matter"
    );
}

#[test]
fn exclusions_apply_only_where_every_phase_excludes() {
    let want = desired_config(
        &desired(vec![
            phase(
                "a",
                Mode::Report,
                &["Pilot IT"],
                &["Break Glass", "Finance"],
            ),
            phase("b", Mode::Report, &["All Users"], &["Break Glass"]),
        ]),
        &names(),
        &baseline(),
        &baseline(),
    )
    .unwrap();
    let excluded: Vec<_> = want
        .assignments
        .iter()
        .filter(|t| matches!(t, AssignmentTarget::Exclusion { .. }))
        .collect();
    assert_eq!(
        excluded,
        vec![&AssignmentTarget::Exclusion {
            group_id: "g-bg".into()
        }]
    );
}

#[test]
fn abort_restores_the_baseline_and_deletes_a_copy_it_created() {
    let current = desired_config(
        &desired(vec![phase("e", Mode::Enforce, &["All Users"], &[])]),
        &names(),
        &baseline(),
        &baseline(),
    )
    .unwrap();
    let writes = plan_writes(&current, &restore_config(&baseline()));
    assert_eq!(writes[0], Write::DeleteEnforced);
    assert!(writes.contains(&Write::Assign(vec![])));
    assert!(writes.iter().any(
        |w| matches!(w, Write::PatchConditionalAccess { state: Some(s), .. } if s == "disabled")
    ));
}

#[test]
fn without_conditional_access_enforce_is_the_block_action_alone() {
    let mut names = names();
    names.conditional_access = None;
    let mut base = baseline();
    base.conditional_access = None;
    let want = desired_config(
        &desired(vec![phase("e", Mode::Enforce, &["All Users"], &[])]),
        &names,
        &base,
        &base,
    )
    .unwrap();
    assert_eq!(want.actions, vec![ActionItem::block(0)]);
    assert_eq!(want.enforced, None);
    assert_eq!(want.conditional_access, None);
}
