//! The ownership rules on a tenant modelled on Microsoft's templates: what phasegate writes, and
//! above all what it leaves alone.

use std::time::Duration;

use super::*;
use crate::domain::desired::{ChangeNote, DesiredAssignment, PlanGroups};
use crate::domain::plan::EmergencyAccess;
use crate::domain::time::Timestamp;

const POLICY: &str = "p-win";
const TEMPLATE: &str = "t-rollout";
const HELPDESK_TEMPLATE: &str = "t-helpdesk";
const FILTER: &str = "f-corporate";
const BREAK_GLASS_USER: &str = "u-bg1";
const SYNC_ROLE: &str = "d29b2b05-8046-44ba-8758-1e26182fcf32";
const DAY: u64 = 86_400;

fn names() -> Names {
    Names {
        policies: vec![PolicyName {
            id: POLICY.into(),
            name: "Windows baseline".into(),
            platform: Platform::Windows,
        }],
        template_id: Some(TEMPLATE.into()),
        conditional_access: Some(CaNames {
            id: "ca".into(),
            name: "Require compliant device".into(),
        }),
        groups: [
            ("Pilot IT", GroupRef::Id("g-pilot".into())),
            ("Break Glass", GroupRef::Id("g-bg".into())),
            ("Finance", GroupRef::Id("g-fin".into())),
            ("All Users", GroupRef::AllUsers),
        ]
        .into_iter()
        .map(|(n, g)| (n.to_string(), g))
        .collect(),
        emergency_users: vec![(BREAK_GLASS_USER.into(), "bg1@contoso.com".into())],
        exempt_users: vec![("u-carol".into(), "carol@contoso.com".into())],
    }
}

/// The admin's Windows policy: their own pilot with an assignment filter, a kiosk exclusion, a
/// configuration-manager collection, and their own reminder schedule.
fn lived_in_policy() -> PolicyView {
    PolicyView {
        odata_type: "#microsoft.graph.windows10CompliancePolicy".into(),
        description: Some("Windows baseline v3 (endpoint team)".into()),
        assignments: vec![
            json!({"id": "a1", "source": "direct", "sourceId": POLICY, "target": {
                "@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": "g-pilot",
                "deviceAndAppManagementAssignmentFilterId": FILTER,
                "deviceAndAppManagementAssignmentFilterType": "include"}}),
            json!({"id": "a2", "source": "direct", "sourceId": POLICY, "target": {
                "@odata.type": "#microsoft.graph.exclusionGroupAssignmentTarget", "groupId": "g-kiosk",
                "deviceAndAppManagementAssignmentFilterId": null,
                "deviceAndAppManagementAssignmentFilterType": "none"}}),
        ],
        actions: vec![
            json!({"id": "x1", "actionType": "block", "gracePeriodHours": 24, "notificationTemplateId": NIL_GUID, "notificationMessageCCList": []}),
            json!({"id": "x2", "actionType": "notification", "gracePeriodHours": 72, "notificationTemplateId": HELPDESK_TEMPLATE, "notificationMessageCCList": ["g-helpdesk"]}),
            json!({"id": "x3", "actionType": "pushNotification", "gracePeriodHours": 24, "notificationTemplateId": NIL_GUID, "notificationMessageCCList": []}),
        ],
    }
}

/// Microsoft's "Require a compliant device" template as a production tenant has it.
fn lived_in_ca(state: &str) -> Value {
    json!({
        "id": "ca",
        "displayName": "Require compliant device",
        "description": "Baseline (identity team)",
        "state": state,
        "createdDateTime": "2024-01-01T00:00:00Z",
        "modifiedDateTime": null,
        "templateId": null,
        "conditions": {
            "users": {
                "includeUsers": ["None"],
                "excludeUsers": [BREAK_GLASS_USER],
                "includeGroups": [],
                "excludeGroups": ["g-bg"],
                "includeRoles": [],
                "excludeRoles": [SYNC_ROLE],
                "includeGuestsOrExternalUsers": null,
                "excludeGuestsOrExternalUsers": {"guestOrExternalUserTypes": "internalGuest,b2bCollaborationGuest", "externalTenants": {"@odata.type": "#microsoft.graph.conditionalAccessAllExternalTenants", "membershipKind": "all"}}
            },
            "applications": {"includeApplications": ["Office365"], "excludeApplications": []},
            "clientAppTypes": ["all"],
            "platforms": {"includePlatforms": ["all"], "excludePlatforms": ["linux"]},
            "locations": {"includeLocations": ["All"], "excludeLocations": ["AllTrusted"]},
            "devices": null
        },
        "grantControls": {"operator": "AND", "builtInControls": ["compliantDevice"], "customAuthenticationFactors": [], "termsOfUse": [],
            "authenticationStrength": {"id": "00000000-0000-0000-0000-000000000002", "displayName": "Multifactor authentication", "allowedCombinations": ["password,sms"]}},
        "sessionControls": {"signInFrequency": {"value": 12, "type": "hours", "isEnabled": true}, "persistentBrowser": {"mode": "never", "isEnabled": true}}
    })
}

fn view(ca_state: &str) -> TenantView {
    TenantView {
        policies: [(POLICY.to_string(), lived_in_policy())]
            .into_iter()
            .collect(),
        conditional_access: Some(lived_in_ca(ca_state)),
        enforced: None,
    }
}

fn phase(id: &str, mode: Mode, include: &[&str], exclude: &[&str]) -> DesiredAssignment {
    DesiredAssignment {
        phase: id.into(),
        mode,
        include: include.iter().map(|s| s.to_string()).collect(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        grace_secs: (mode == Mode::Notify).then_some(7 * DAY),
        margin_secs: 3 * DAY,
    }
}

fn desired(phases: Vec<DesiredAssignment>) -> DesiredState {
    DesiredState {
        rollout: "r-1".into(),
        assignments: phases,
        claim: true,
        emergency_access: EmergencyAccess {
            groups: vec!["Break Glass".into()],
            users: vec!["bg1@contoso.com".into()],
        },
        change: ChangeNote::default(),
        groups: PlanGroups {
            include: vec!["Pilot IT".into(), "All Users".into()],
            exclude: vec!["Break Glass".into()],
        },
        exempt: Default::default(),
    }
}

fn pilot() -> DesiredAssignment {
    phase("pilot", Mode::Report, &["Pilot IT"], &["Break Glass"])
}

fn everyone(mode: Mode) -> DesiredAssignment {
    phase("all", mode, &["All Users"], &["Break Glass"])
}

struct World {
    names: Names,
    include: BTreeSet<GroupRef>,
    exclude: BTreeSet<GroupRef>,
    role: CaRole,
    baseline: TenantView,
}

impl World {
    fn new(ca_state: &str) -> World {
        let role = if ca_state == "enabled" {
            CaRole::Relied
        } else {
            CaRole::Managed
        };
        World {
            names: names(),
            include: [GroupRef::Id("g-pilot".into()), GroupRef::AllUsers]
                .into_iter()
                .collect(),
            exclude: [GroupRef::Id("g-bg".into())].into_iter().collect(),
            role,
            baseline: view(ca_state),
        }
    }

    fn scope(&self) -> Scope<'_> {
        Scope {
            names: &self.names,
            role: self.role,
            include: &self.include,
            exclude: &self.exclude,
        }
    }

    fn members(&self, view: &TenantView) -> Members {
        members(view, &self.scope())
    }

    fn wanted(
        &self,
        desired: &DesiredState,
        current: &TenantView,
        grace: &BTreeMap<String, GraceState>,
    ) -> Members {
        self.try_wanted(desired, current, grace).unwrap()
    }

    fn try_wanted(
        &self,
        desired: &DesiredState,
        current: &TenantView,
        grace: &BTreeMap<String, GraceState>,
    ) -> Result<Members, String> {
        let scope = self.scope();
        let baseline = self.members(&self.baseline);
        let now = self.members(current);
        wanted(&Want {
            desired,
            scope: &scope,
            baseline: &baseline,
            current: &now,
            current_view: current,
            released: &BTreeSet::new(),
            grace,
            marker: &claim_marker("r-1", "s-1"),
            platforms: &[Platform::Windows],
        })
    }

    fn writes(
        &self,
        desired: &DesiredState,
        current: &TenantView,
        grace: &BTreeMap<String, GraceState>,
    ) -> Vec<Write> {
        let wanted = self.wanted(desired, current, grace);
        plan_writes(current, &self.members(current), &wanted, &self.names).unwrap()
    }
}

/// Applies writes to a view the way the service does (replace semantics for assign and actions,
/// member-wise merge for a Conditional Access PATCH).
fn apply(view: &TenantView, writes: &[Write]) -> TenantView {
    let mut next = view.clone();
    for write in writes {
        match write {
            Write::Assign {
                policy,
                assignments,
            } => {
                next.policies.get_mut(policy).unwrap().assignments = assignments
                    .iter()
                    .map(|t| json!({"source": "direct", "target": t}))
                    .collect();
            }
            Write::Actions { policy, actions } => {
                next.policies.get_mut(policy).unwrap().actions = actions.clone();
            }
            Write::Describe {
                policy,
                description,
                ..
            } => {
                next.policies.get_mut(policy).unwrap().description =
                    description.as_str().map(str::to_string);
            }
            Write::PatchConditionalAccess(body) => {
                merge(next.conditional_access.as_mut().unwrap(), body);
            }
            Write::CreateEnforced(body) => {
                let mut copy = body.clone();
                copy["id"] = json!("enforced");
                next.enforced = Some(copy);
            }
            Write::PatchEnforced(body) => merge(next.enforced.as_mut().unwrap(), body),
            Write::DeleteEnforced => next.enforced = None,
        }
    }
    next
}

fn merge(target: &mut Value, patch: &Value) {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_object() && target[k].is_object() {
            merge(&mut target[k], v);
        } else {
            target[k] = v.clone();
        }
    }
}

/// Brings a view to the desired state the way `converge` does: writes until nothing is left.
fn settle(
    world: &World,
    desired: &DesiredState,
    mut view: TenantView,
    grace: &mut BTreeMap<String, GraceState>,
) -> (TenantView, Vec<Write>) {
    let mut all = Vec::new();
    for _ in 0..5 {
        if world.members(&view)["policy/p-win/notification"] == json!(true) {
            let state = grace.entry(POLICY.into()).or_default();
            state
                .notified_since
                .get_or_insert(Timestamp::from_millis(0));
            state.derived_hours.get_or_insert(240);
        }
        let writes = world.writes(desired, &view, grace);
        if writes.is_empty() {
            return (view, all);
        }
        view = apply(&view, &writes);
        all.extend(writes);
    }
    panic!("did not settle: {all:?}");
}

/// Every member of every object that phasegate does not own, for before/after comparisons.
fn not_owned(view: &TenantView) -> Value {
    let policy = &view.policies[POLICY];
    let targets: Vec<Value> = policy
        .assignments
        .iter()
        .map(|a| canonical_target(&a["target"]))
        .filter(|t| {
            !(t["groupId"] == "g-bg" && t["@odata.type"] == EXCLUSION_TARGET)
                && t["@odata.type"] != ALL_USERS_TARGET
        })
        .collect();
    let actions: Vec<Value> = policy
        .actions
        .iter()
        .filter(|a| !(is_action(a, "notification") && template_of(a) == TEMPLATE))
        .map(|a| {
            let mut a = a.clone();
            a.as_object_mut().unwrap().remove("id");
            if is_action(&a, "block") {
                a["gracePeriodHours"] = json!(null);
            }
            a
        })
        .collect();
    let mut ca = view.conditional_access.clone().unwrap();
    ca["conditions"]["users"]["includeUsers"] = json!(null);
    ca["conditions"]["users"]["includeGroups"] = json!(null);
    ca["state"] = json!(null);
    ca["description"] = json!(with_claim(ca["description"].as_str(), None));
    json!({"targets": targets, "actions": actions, "ca": ca,
           "description": with_claim(policy.description.as_deref(), None)})
}

#[test]
fn a_pilot_changes_only_phasegates_members_and_carries_filters_and_the_admins_actions() {
    let world = World::new("disabled");
    let mut grace = BTreeMap::new();
    let (after, writes) = settle(
        &world,
        &desired(vec![pilot()]),
        world.baseline.clone(),
        &mut grace,
    );
    assert_eq!(not_owned(&after), not_owned(&world.baseline));
    let names: Vec<&str> = writes.iter().map(Write::name).collect();
    // Claim first, then grace raised before anything widens, then the assignment, then CA.
    assert_eq!(
        names,
        [
            "describe policy",
            "scheduleActionsForRules",
            "assign",
            "patch conditional access"
        ]
    );
    let policy = &after.policies[POLICY];
    let pilot = policy
        .assignments
        .iter()
        .find(|a| a["target"]["groupId"] == "g-pilot")
        .unwrap();
    assert_eq!(
        pilot["target"]["deviceAndAppManagementAssignmentFilterId"],
        FILTER
    );
    let block = policy
        .actions
        .iter()
        .find(|a| is_action(a, "block"))
        .unwrap();
    assert_eq!(block["gracePeriodHours"], REPORT_HOLD_HOURS);
    assert!(
        policy
            .assignments
            .iter()
            .any(|a| a["target"]["groupId"] == "g-kiosk")
    );
    assert!(
        claim_in(policy.description.as_deref())
            .unwrap()
            .contains("r-1")
    );
    assert!(
        policy
            .description
            .as_deref()
            .unwrap()
            .starts_with("Windows baseline v3")
    );
}

#[test]
fn no_conditional_access_patch_ever_carries_an_exclusion() {
    let world = World::new("disabled");
    let mut grace = BTreeMap::new();
    let mut view = world.baseline.clone();
    let steps = [
        vec![pilot()],
        vec![pilot(), everyone(Mode::Report)],
        vec![pilot(), everyone(Mode::Report), everyone(Mode::Notify)],
        vec![
            pilot(),
            everyone(Mode::Report),
            everyone(Mode::Notify),
            everyone(Mode::Enforce),
        ],
        vec![pilot()],
    ];
    for step in steps {
        let (next, writes) = settle(&world, &desired(step), view, &mut grace);
        for write in &writes {
            if let Write::PatchConditionalAccess(body) = write {
                let users = &body["conditions"]["users"];
                for key in [
                    "excludeUsers",
                    "excludeGroups",
                    "excludeRoles",
                    "excludeGuestsOrExternalUsers",
                ] {
                    assert!(users.get(key).is_none(), "{body}");
                }
            }
        }
        assert_eq!(not_owned(&next), not_owned(&world.baseline));
        view = next;
    }
}

#[test]
fn an_exception_adds_its_user_and_group_to_the_enforced_copys_exclusions_and_keeps_the_rest() {
    let world = World::new("enabledForReportingButNotEnforced");
    let mut grace = BTreeMap::new();
    let phases = vec![
        pilot(),
        everyone(Mode::Report),
        everyone(Mode::Notify),
        everyone(Mode::Enforce),
    ];
    let mut exempt = desired(phases.clone());
    exempt.exempt.users = vec!["carol@contoso.com".into()];
    exempt.exempt.groups = vec!["Finance".into()];
    let (granted, writes) = settle(&world, &exempt, world.baseline.clone(), &mut grace);
    let users = &granted.enforced.as_ref().expect("the copy exists")["conditions"]["users"];
    assert_eq!(users["excludeUsers"], json!([BREAK_GLASS_USER, "u-carol"]));
    assert_eq!(users["excludeGroups"], json!(["g-bg", "g-fin"]));
    assert_eq!(users["excludeRoles"], json!([SYNC_ROLE]));
    // The original, which phasegate does not own, is never given an exclusion.
    for write in &writes {
        if let Write::PatchConditionalAccess(body) = write {
            assert!(
                body["conditions"]["users"].get("excludeUsers").is_none(),
                "{body}"
            );
        }
    }
    // The exception ends: the copy's exclusions are the emergency access again.
    let (ended, _) = settle(&world, &desired(phases), granted, &mut grace);
    let users = &ended.enforced.as_ref().unwrap()["conditions"]["users"];
    assert_eq!(users["excludeUsers"], json!([BREAK_GLASS_USER]));
    assert_eq!(users["excludeGroups"], json!(["g-bg"]));
    // An exception cannot exempt everyone, nor a user nobody resolved.
    let mut everyone_exempt = desired(vec![everyone(Mode::Enforce)]);
    everyone_exempt.exempt.groups = vec!["All Users".into()];
    let unknown_user = DesiredState {
        exempt: crate::domain::desired::Exempt {
            users: vec!["dave@contoso.com".into()],
            groups: Vec::new(),
        },
        ..desired(vec![everyone(Mode::Enforce)])
    };
    for (wanted, why) in [
        (everyone_exempt, "cannot exempt `All Users`"),
        (unknown_user, "dave@contoso.com"),
    ] {
        let err = world
            .try_wanted(&wanted, &world.baseline, &grace)
            .unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn the_enforced_copy_keeps_every_control_and_exclusion_and_covers_only_managed_platforms() {
    let world = World::new("enabledForReportingButNotEnforced");
    let mut grace = BTreeMap::new();
    let phases = vec![
        pilot(),
        everyone(Mode::Report),
        everyone(Mode::Notify),
        everyone(Mode::Enforce),
    ];
    let (after, _) = settle(&world, &desired(phases), world.baseline.clone(), &mut grace);
    let copy = after.enforced.as_ref().expect("the copy exists");
    assert_eq!(copy["state"], "enabled");
    assert_eq!(
        copy["displayName"],
        "Require compliant device (phasegate enforced)"
    );
    let users = &copy["conditions"]["users"];
    assert_eq!(users["includeUsers"], json!(["All"]));
    assert_eq!(users["excludeUsers"], json!([BREAK_GLASS_USER]));
    assert_eq!(users["excludeGroups"], json!(["g-bg"]));
    assert_eq!(users["excludeRoles"], json!([SYNC_ROLE]));
    assert_eq!(
        users["excludeGuestsOrExternalUsers"]["externalTenants"]["membershipKind"],
        "all"
    );
    assert_eq!(
        copy["conditions"]["platforms"],
        json!({"includePlatforms": ["windows"], "excludePlatforms": ["linux"]})
    );
    assert_eq!(
        copy["conditions"]["locations"]["excludeLocations"],
        json!(["AllTrusted"])
    );
    assert_eq!(copy["grantControls"]["operator"], "AND");
    assert_eq!(
        copy["grantControls"]["authenticationStrength"],
        json!({"id": "00000000-0000-0000-0000-000000000002"})
    );
    assert_eq!(copy["sessionControls"]["signInFrequency"]["value"], 12);
    // The original stays report-only.
    assert_eq!(
        after.conditional_access.as_ref().unwrap()["state"],
        "enabledForReportingButNotEnforced"
    );
}

#[test]
fn an_enabled_policy_is_never_written_and_its_changes_are_drift() {
    let world = World::new("enabled");
    let mut grace = BTreeMap::new();
    let mut view = world.baseline.clone();
    for step in [
        vec![pilot()],
        vec![pilot(), everyone(Mode::Report)],
        vec![
            pilot(),
            everyone(Mode::Report),
            everyone(Mode::Notify),
            everyone(Mode::Enforce),
        ],
        vec![],
    ] {
        let (next, writes) = settle(&world, &desired(step), view, &mut grace);
        assert!(
            writes.iter().all(|w| !matches!(
                w,
                Write::PatchConditionalAccess(_) | Write::CreateEnforced(_)
            )),
            "{writes:?}"
        );
        assert_eq!(next.conditional_access, world.baseline.conditional_access);
        view = next;
    }
    // Another admin excludes Finance from it: phasegate relied on its scope, so that is drift.
    let last = world.members(&view);
    let mut narrowed = view.clone();
    narrowed.conditional_access.as_mut().unwrap()["conditions"]["users"]["excludeGroups"] =
        json!(["g-bg", "g-fin"]);
    let current = world.members(&narrowed);
    let changes = drift(&last, &current, &current, &BTreeSet::new(), &world.names);
    assert_eq!(changes.len(), 1, "{changes:?}");
    let change = &changes[0].1;
    assert_eq!(
        change.object,
        "Conditional Access policy `Require compliant device`"
    );
    assert_eq!(change.field, "conditions.users");
    assert!(
        change.found.contains("g-fin") && !change.expected.contains("g-fin"),
        "{change:?}"
    );
}

#[test]
fn report_phases_hold_failing_devices_in_grace_and_notify_first_notifies_then_lowers_the_grace() {
    let world = World::new("enabled");
    let mut grace = BTreeMap::new();
    let report = desired(vec![pilot(), everyone(Mode::Report)]);
    let (reported, _) = settle(&world, &report, world.baseline.clone(), &mut grace);
    assert_eq!(
        world.members(&reported)["policy/p-win/grace"],
        json!(REPORT_HOLD_HOURS)
    );
    let notify = desired(vec![
        pilot(),
        everyone(Mode::Report),
        everyone(Mode::Notify),
    ]);
    // Round one: the notification goes in while the grace stays held.
    let first = world.writes(&notify, &reported, &BTreeMap::new());
    assert_eq!(first.len(), 1);
    let Write::Actions { actions, .. } = &first[0] else {
        panic!("{first:?}")
    };
    assert!(
        actions
            .iter()
            .any(|a| is_action(a, "notification") && template_of(a) == TEMPLATE)
    );
    assert!(
        actions
            .iter()
            .any(|a| is_action(a, "block") && a["gracePeriodHours"] == REPORT_HOLD_HOURS)
    );
    // Round two, once it is on: the derived grace.
    let notified = apply(&reported, &first);
    let derived = [(
        POLICY.to_string(),
        GraceState {
            notified_since: Some(Timestamp::from_millis(0)),
            derived_hours: Some(240),
        },
    )]
    .into_iter()
    .collect();
    let second = world.writes(&notify, &notified, &derived);
    let Write::Actions { actions, .. } = &second[0] else {
        panic!("{second:?}")
    };
    assert!(
        actions
            .iter()
            .any(|a| is_action(a, "block") && a["gracePeriodHours"] == 240)
    );
    // The admin's own reminder and CC list went through untouched both times.
    assert!(actions.iter().any(|a| template_of(a) == HELPDESK_TEMPLATE
        && a["notificationMessageCCList"] == json!(["g-helpdesk"])));
    // Rolling back to report-only takes phasegate's notification away and holds again, first.
    let back = apply(&notified, &second);
    let rollback = world.writes(&report, &back, &BTreeMap::new());
    let Write::Actions { actions, .. } = &rollback[0] else {
        panic!("{rollback:?}")
    };
    assert!(!actions.iter().any(|a| template_of(a) == TEMPLATE));
    assert!(
        actions
            .iter()
            .any(|a| is_action(a, "block") && a["gracePeriodHours"] == REPORT_HOLD_HOURS)
    );
    assert!(actions.iter().any(|a| template_of(a) == HELPDESK_TEMPLATE));
}

#[test]
fn the_derived_grace_keeps_the_promise_for_the_earliest_failing_device() {
    let t0 = Timestamp::from_millis(1_800_000_000_000);
    let notified = t0.plus(Duration::from_secs(6 * DAY));
    // Failing since day 0, told on day 6, promised 7 days, 3 days for a check-in: 16 days.
    assert_eq!(derive_grace(notified, Some(t0), 7 * DAY, 3 * DAY), 16 * 24);
    // Nobody failing yet: devices that fail later are told at once and get the promise.
    assert_eq!(derive_grace(notified, None, 7 * DAY, 3 * DAY), 10 * 24);
    // Never more than Intune accepts.
    assert_eq!(
        derive_grace(
            notified,
            Some(t0.minus(Duration::from_secs(900 * DAY))),
            7 * DAY,
            0
        ),
        REPORT_HOLD_HOURS
    );
}

#[test]
fn drift_is_a_change_that_is_neither_the_last_write_nor_the_next() {
    let world = World::new("disabled");
    let mut grace = BTreeMap::new();
    let d = desired(vec![pilot(), everyone(Mode::Report)]);
    let (settled, _) = settle(&world, &d, world.baseline.clone(), &mut grace);
    let last = world.members(&settled);
    // phasegate's own write that landed before a crash is not drift.
    let (landed, _) = settle(
        &world,
        &desired(vec![
            pilot(),
            everyone(Mode::Report),
            everyone(Mode::Notify),
        ]),
        settled.clone(),
        &mut grace,
    );
    let wanted = world.wanted(
        &desired(vec![
            pilot(),
            everyone(Mode::Report),
            everyone(Mode::Notify),
        ]),
        &landed,
        &grace,
    );
    assert!(
        drift(
            &last,
            &world.members(&landed),
            &wanted,
            &BTreeSet::new(),
            &world.names
        )
        .is_empty()
    );
    // Someone removing the All users target is.
    let mut edited = settled.clone();
    edited
        .policies
        .get_mut(POLICY)
        .unwrap()
        .assignments
        .retain(|a| a["target"]["@odata.type"] != ALL_USERS_TARGET);
    let wanted = world.wanted(&d, &edited, &grace);
    let changes = drift(
        &last,
        &world.members(&edited),
        &wanted,
        &BTreeSet::new(),
        &world.names,
    );
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].1.field,
        "assignments (include target for `All users`)"
    );
    assert_eq!(
        (changes[0].1.expected.as_str(), changes[0].1.found.as_str()),
        (
            "{\"@odata.type\":\"#microsoft.graph.allLicensedUsersAssignmentTarget\"}",
            "absent"
        )
    );
    // So is a change to a member phasegate does not write yet but will (a later phase's group).
    let mut early = settled.clone();
    early.conditional_access.as_mut().unwrap()["state"] = json!("disabled");
    let wanted = world.wanted(&d, &early, &grace);
    assert_eq!(
        drift(
            &last,
            &world.members(&early),
            &wanted,
            &BTreeSet::new(),
            &world.names
        )
        .len(),
        1
    );
}

#[test]
fn abort_puts_back_phasegates_members_and_keeps_what_others_changed() {
    let world = World::new("disabled");
    let mut grace = BTreeMap::new();
    let phases = vec![
        pilot(),
        everyone(Mode::Report),
        everyone(Mode::Notify),
        everyone(Mode::Enforce),
    ];
    let (after, _) = settle(&world, &desired(phases), world.baseline.clone(), &mut grace);
    let last = world.members(&after);
    // Another admin adds a CC address to their reminder and a Finance group to the CA scope.
    let mut edited = after.clone();
    edited.policies.get_mut(POLICY).unwrap().actions[1]["notificationMessageCCList"] =
        json!(["g-helpdesk", "g-fin"]);
    let users = &mut edited.conditional_access.as_mut().unwrap()["conditions"]["users"];
    users["includeGroups"] = json!(["g-pilot", "g-fin"]);
    let baseline = world.members(&world.baseline);
    let wanted = restored(&baseline, &last, &world.members(&edited), &BTreeSet::new());
    let writes = plan_writes(&edited, &world.members(&edited), &wanted, &world.names).unwrap();
    assert_eq!(writes[0], Write::DeleteEnforced, "enforcement goes first");
    let restored_view = apply(&edited, &writes);
    let policy = &restored_view.policies[POLICY];
    assert_eq!(policy.assignments.len(), 2, "{:?}", policy.assignments);
    assert_eq!(
        policy.actions[1]["notificationMessageCCList"],
        json!(["g-helpdesk", "g-fin"])
    );
    assert_eq!(policy.actions[0]["gracePeriodHours"], 24);
    assert_eq!(
        policy.description.as_deref(),
        Some("Windows baseline v3 (endpoint team)")
    );
    let ca = restored_view.conditional_access.as_ref().unwrap();
    assert_eq!(ca["state"], "disabled");
    assert_eq!(ca["conditions"]["users"]["includeGroups"], json!(["g-fin"]));
    assert_eq!(ca["conditions"]["users"]["includeUsers"], json!([]));
    assert_eq!(ca["description"], "Baseline (identity team)");
    assert!(restored_view.enforced.is_none());
}

#[test]
fn an_assignment_from_a_policy_set_is_refused_not_rewritten() {
    let world = World::new("disabled");
    let mut view = world.baseline.clone();
    view.policies.get_mut(POLICY).unwrap().assignments.push(
        json!({"source": "policySets", "sourceId": "ps-1", "target": {"@odata.type": GROUP_TARGET, "groupId": "g-other"}}),
    );
    let wanted = world.wanted(&desired(vec![pilot()]), &view, &BTreeMap::new());
    let error = plan_writes(&view, &world.members(&view), &wanted, &world.names).unwrap_err();
    assert!(
        error.contains("policySets") && error.contains("ps-1"),
        "{error}"
    );
}

#[test]
fn completing_lets_go_of_the_claims_and_nothing_else() {
    let world = World::new("disabled");
    let mut grace = BTreeMap::new();
    let phases = vec![pilot(), everyone(Mode::Report)];
    let (after, _) = settle(&world, &desired(phases), world.baseline.clone(), &mut grace);
    let current = world.members(&after);
    let baseline = world.members(&world.baseline);
    let wanted: Members = current
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if k.ends_with("claim") {
                    baseline[k].clone()
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    let writes = plan_writes(&after, &current, &wanted, &world.names).unwrap();
    let names: Vec<&str> = writes.iter().map(Write::name).collect();
    assert_eq!(names, ["describe policy", "patch conditional access"]);
    let Write::PatchConditionalAccess(body) = &writes[1] else {
        unreachable!()
    };
    assert_eq!(body, &json!({"description": "Baseline (identity team)"}));
}

#[test]
fn markers_name_their_rollout_and_store() {
    let marker = claim_marker("windows-1", "abc123");
    assert_eq!(
        claimant(&marker),
        Some(("windows-1".into(), "abc123".into()))
    );
    let described = with_claim(Some("Owned by the endpoint team"), Some(&marker));
    assert_eq!(claim_in(described.as_str()), Some(marker.clone()));
    assert_eq!(
        with_claim(described.as_str(), None),
        json!("Owned by the endpoint team")
    );
    assert_eq!(with_claim(None, None), Value::Null);
}

#[test]
fn compliance_is_only_required_when_it_cannot_be_side_stepped() {
    let grant = |operator: &str, controls: &[&str]| json!({"grantControls": {"operator": operator, "builtInControls": controls}});
    assert!(requires_compliance(&grant("OR", &["compliantDevice"])));
    assert!(requires_compliance(&grant(
        "AND",
        &["mfa", "compliantDevice"]
    )));
    assert!(!requires_compliance(&grant(
        "OR",
        &["mfa", "compliantDevice"]
    )));
    assert!(!requires_compliance(&grant("AND", &["mfa"])));
}
