//! The `lived-in` scenario: the same fleet, in a tenant other administrators have configured for
//! years, modelled on Microsoft's own templates (see docs/emulator.md and tenant-safety.md §1–§2):
//! an enabled "require compliant device" policy with break-glass, directory-synchronization and
//! guest exclusions, location, platform and session conditions and an authentication strength;
//! an MFA policy for administrators; compliance policies with assignment filters, exclusion
//! targets, a grace, reminders with CC lists and push notifications.

use super::*;

/// The `block` grace of the lived-in Windows policy: 90 days, a pilot nobody is blocked in yet.
pub const LIVED_IN_WINDOWS_GRACE_HOURS: i64 = 2160;

pub const KIOSK_GROUP: &str = "Kiosk Devices";
pub const HELPDESK_GROUP: &str = "Helpdesk";
pub const HELPDESK_TEMPLATE_NAME: &str = "Compliance reminder (helpdesk)";
pub const MFA_POLICY_NAME: &str = "Require MFA for administrators";
/// The assignment filter the Windows policy's pilot assignment uses.
pub const SCENARIO_FILTER_NAME: &str = "Corporate-owned Windows devices";
const CA_DESCRIPTION: &str =
    "Baseline: compliant devices for Office 365 (owned by the identity team)";
const WINDOWS_DESCRIPTION: &str = "Windows baseline v3 (endpoint team)";
/// Role template ids (learn.microsoft.com/entra/identity/role-based-access-control/permissions-reference).
const DIRECTORY_SYNCHRONIZATION_ACCOUNTS: &str = "d29b2b05-8046-44ba-8758-1e26182fcf32";
const GLOBAL_ADMINISTRATOR: &str = "62e90394-69f5-4237-9190-012177145e10";
/// The built-in "Multifactor authentication" strength.
const MFA_STRENGTH: &str = "00000000-0000-0000-0000-000000000002";

/// When the tenant's policies were created: 30 days before the clock starts.
pub(super) fn created() -> Timestamp {
    SIMULATED_EPOCH.minus(Duration::from_secs(30 * 86_400))
}

/// A stored action.
fn action(kind: &str, hours: i64, template: &str, cc: &[&str]) -> Value {
    json!({
        "actionType": kind,
        "gracePeriodHours": hours,
        "notificationTemplateId": template,
        "notificationMessageCCList": cc,
    })
}

/// The `block` action every policy starts with (grace in hours).
pub(super) fn block(hours: i64) -> Value {
    action("block", hours, NIL_GUID, &[])
}

/// Adds the lived-in tenant's objects to a default tenant.
pub(super) fn furnish(tenant: &mut Tenant) {
    let seed = tenant.settings.seed;
    for name in [KIOSK_GROUP, HELPDESK_GROUP] {
        tenant.groups.push(Group {
            id: guid(seed, "group", name),
            name: name.to_string(),
            bit: 0,
        });
    }
    let filter = guid(seed, "filter", SCENARIO_FILTER_NAME);
    tenant
        .filters
        .push((filter.clone(), SCENARIO_FILTER_NAME.to_string()));
    let reminder = guid(seed, "template", HELPDESK_TEMPLATE_NAME);
    tenant
        .templates
        .push((reminder.clone(), HELPDESK_TEMPLATE_NAME.to_string()));
    let pilot = tenant.group_id("Pilot IT");
    let kiosk = tenant.group_id(KIOSK_GROUP);
    let helpdesk = tenant.group_id(HELPDESK_GROUP);
    let break_glass_group = tenant.group_id("Break Glass");
    let break_glass: Vec<String> = (0..tenant.fleet.user_count())
        .filter(|&u| tenant.fleet.user_groups(u) & 0b10 != 0)
        .map(|u| tenant.user_id(u))
        .collect();
    let created = format_time(created());
    let state = tenant
        .setup
        .ca_state
        .unwrap_or(CaState::Enabled)
        .graph_state();
    tenant.ca_policies[0].raw = object(json!({
        "displayName": CA_POLICY_NAME,
        "description": CA_DESCRIPTION,
        "state": state,
        "templateId": null,
        "conditions": {
            "users": {
                "includeUsers": ["All"],
                "excludeUsers": break_glass,
                "includeGroups": [],
                "excludeGroups": [break_glass_group],
                "includeRoles": [],
                "excludeRoles": [DIRECTORY_SYNCHRONIZATION_ACCOUNTS],
                "includeGuestsOrExternalUsers": null,
                "excludeGuestsOrExternalUsers": {
                    "guestOrExternalUserTypes": "internalGuest,b2bCollaborationGuest,b2bCollaborationMember,b2bDirectConnectUser,otherExternalUser,serviceProvider",
                    "externalTenants": {
                        "@odata.type": "#microsoft.graph.conditionalAccessAllExternalTenants",
                        "membershipKind": "all"
                    }
                }
            },
            "applications": {"includeApplications": ["Office365"]},
            "clientAppTypes": ["all"],
            "platforms": {"includePlatforms": ["all"], "excludePlatforms": ["linux"]},
            "locations": {"includeLocations": ["All"], "excludeLocations": ["AllTrusted"]}
        },
        "grantControls": {
            "operator": "AND",
            "builtInControls": ["compliantDevice"],
            "authenticationStrength": {"id": MFA_STRENGTH}
        },
        "sessionControls": {
            "signInFrequency": {
                "value": 12,
                "type": "hours",
                "isEnabled": true,
                "authenticationType": "primaryAndSecondaryAuthentication",
                "frequencyInterval": "timeBased"
            },
            "persistentBrowser": {"mode": "never", "isEnabled": true}
        },
        "createdDateTime": created,
        "modifiedDateTime": null,
    }));
    tenant.ca_policies.push(CaPolicy {
        id: guid(seed, "ca", MFA_POLICY_NAME),
        raw: object(json!({
            "displayName": MFA_POLICY_NAME,
            "state": "enabled",
            "templateId": null,
            "conditions": {
                "users": {
                    "includeRoles": [GLOBAL_ADMINISTRATOR],
                    "excludeUsers": break_glass,
                },
                "applications": {"includeApplications": ["All"]},
                "clientAppTypes": ["all"],
            },
            "grantControls": {"operator": "OR", "builtInControls": ["mfa"]},
            "createdDateTime": created,
            "modifiedDateTime": null,
        })),
    });
    for policy in &mut tenant.policies {
        match policy.platform {
            Platform::Windows => {
                policy.description = Some(WINDOWS_DESCRIPTION.to_string());
                policy.assignments = vec![
                    json!({
                        "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                        "groupId": pilot,
                        "deviceAndAppManagementAssignmentFilterId": filter,
                        "deviceAndAppManagementAssignmentFilterType": "include",
                    }),
                    json!({"@odata.type": "#microsoft.graph.exclusionGroupAssignmentTarget", "groupId": kiosk}),
                ];
                // The endpoint team pilots with a long grace, so nobody is locked out yet.
                policy.actions = vec![
                    block(LIVED_IN_WINDOWS_GRACE_HOURS),
                    action("notification", 72, &reminder, &[&helpdesk]),
                    action("pushNotification", 24, NIL_GUID, &[]),
                ]
                .into_iter()
                .enumerate()
                .map(|(i, a)| {
                    (
                        guid(seed, "action", format!("{}:lived-in:{i}", policy.id)),
                        a,
                    )
                })
                .collect();
                policy.version = 3;
            }
            Platform::Ios => {
                policy.assignments = vec![
                    json!({"@odata.type": "#microsoft.graph.exclusionGroupAssignmentTarget", "groupId": kiosk}),
                ];
                policy.actions = vec![block(0), action("notification", 0, &reminder, &[])]
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| {
                        (
                            guid(seed, "action", format!("{}:lived-in:{i}", policy.id)),
                            a,
                        )
                    })
                    .collect();
                policy.version = 2;
            }
            Platform::Android | Platform::Macos => {}
        }
    }
}
