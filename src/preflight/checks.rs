//! The readiness checks as pure functions: facts gathered from DNS, a certificate, the tenant →
//! findings. Nothing here resolves a name, reads a file or calls Graph; `gather` does, so every
//! rule can be tested with the facts written out.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use super::settings::DeviceAction;
use crate::domain::directory::{MAIL_RECIPIENTS_MAX, Member, Recipients, mail_recipients, reach};
use crate::domain::plan::{Plan, Platform};
use crate::domain::time::{Timestamp, format_span};

/// How bad a finding is. `skipped`: the check could not run here (and says why).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Skipped,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Skipped => "skipped",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One line of the report: which check, how bad, what was found, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// `start`'s own checks find this too, and answer it with their own exit code (a name the
    /// tenant does not have is invalid input, a tenant that refuses the sign-in a failure), so
    /// the preflight before a start leaves it to them.
    #[serde(skip)]
    pub start_checks_it: bool,
}

impl Finding {
    pub fn ok(check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            check,
            level: Level::Ok,
            message: message.into(),
            fix: None,
            start_checks_it: false,
        }
    }

    pub fn skipped(check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            level: Level::Skipped,
            ..Finding::ok(check, message)
        }
    }

    pub fn warning(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            level: Level::Warning,
            message: message.into(),
            fix: Some(fix.into()),
            start_checks_it: false,
        }
    }

    /// Marks a finding `start` answers itself (see [`Finding::start_checks_it`]).
    pub fn checked_by_start(self) -> Finding {
        Finding {
            start_checks_it: true,
            ..self
        }
    }

    pub fn error(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Error,
            ..Finding::warning(check, message, fix)
        }
    }
}

pub const DNS: &str = "enrolment-dns";
pub const APNS: &str = "apns-certificate";
pub const POLICY: &str = "compliance-policy";
pub const TEMPLATE: &str = "notification-template";
pub const GROUPS: &str = "groups";
pub const APPROVERS: &str = "approver-groups";
pub const TENANT: &str = "tenant-settings";
pub const OVERLAP: &str = "conditional-access";
pub const MFA: &str = "mfa";
pub const PERMISSIONS: &str = "permissions";
pub const MAILED: &str = "announcement-groups";

// ---------------------------------------------------------------------------------------------
// Enrolment DNS

/// The enrolment CNAME targets Intune documents (learn.microsoft.com/mem/intune/enrollment/
/// windows-enrollment-create-cname): the `-s` name is current, the other still in use.
pub const ENROLLMENT_TARGETS: [&str; 2] = [
    "enterpriseenrollment-s.manage.microsoft.com",
    "enterpriseenrollment.manage.microsoft.com",
];
pub const REGISTRATION_TARGET: &str = "enterpriseregistration.windows.net";
/// The TTL the same page gives for both records.
pub const EXPECTED_TTL: u32 = 3600;

/// What the resolver answered for one CNAME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CnameAnswer {
    Found {
        target: String,
        ttl: u32,
    },
    /// No such name, or a name without a CNAME.
    Missing,
    /// The question got no usable answer (timeout, refused, server failure).
    Failed(String),
}

/// The two enrolment records of one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRecords {
    pub domain: String,
    pub enrollment: CnameAnswer,
    pub registration: CnameAnswer,
}

/// The record names of a domain: `EnterpriseEnrollment.<domain>`, `EnterpriseRegistration.<domain>`.
pub fn record_names(domain: &str) -> (String, String) {
    (
        format!("EnterpriseEnrollment.{domain}"),
        format!("EnterpriseRegistration.{domain}"),
    )
}

/// Each domain's two records: right (ok), wrong or missing target (error), TTL other than 3600
/// (warning).
pub fn enrolment_dns(domains: &[DomainRecords]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for records in domains {
        let (enrollment, registration) = record_names(&records.domain);
        findings.push(cname(&enrollment, &records.enrollment, &ENROLLMENT_TARGETS));
        findings.push(cname(
            &registration,
            &records.registration,
            &[REGISTRATION_TARGET],
        ));
    }
    findings
}

fn display_target(target: &str) -> String {
    match target {
        "enterpriseenrollment-s.manage.microsoft.com" => {
            "EnterpriseEnrollment-s.manage.microsoft.com".into()
        }
        "enterpriseenrollment.manage.microsoft.com" => {
            "EnterpriseEnrollment.manage.microsoft.com".into()
        }
        "enterpriseregistration.windows.net" => "EnterpriseRegistration.windows.net".into(),
        other => other.to_string(),
    }
}

fn cname(record: &str, answer: &CnameAnswer, expected: &[&str]) -> Finding {
    let wanted = expected
        .iter()
        .map(|t| display_target(t))
        .collect::<Vec<_>>()
        .join(" or ");
    let fix =
        format!("in the domain's DNS zone, set {record} CNAME {wanted} with TTL {EXPECTED_TTL}");
    match answer {
        CnameAnswer::Missing => Finding::error(
            DNS,
            format!("{record}: no CNAME found; expected a CNAME to {wanted}"),
            fix,
        ),
        CnameAnswer::Failed(why) => Finding::error(
            DNS,
            format!("{record}: the lookup failed ({why}); expected a CNAME to {wanted}"),
            format!("check that the resolver answers for this domain, then: {fix}"),
        ),
        CnameAnswer::Found { target, ttl } => {
            let found = target.trim_end_matches('.').to_ascii_lowercase();
            if !expected.contains(&found.as_str()) {
                Finding::error(
                    DNS,
                    format!(
                        "{record}: CNAME points to {}, expected {wanted}",
                        target.trim_end_matches('.')
                    ),
                    fix,
                )
            } else if *ttl != EXPECTED_TTL {
                Finding::warning(
                    DNS,
                    format!(
                        "{record}: CNAME {} has TTL {ttl}, expected {EXPECTED_TTL}",
                        display_target(&found)
                    ),
                    format!(
                        "set the record's TTL to {EXPECTED_TTL} (a caching resolver shows the time \
                         left: ask the domain's own name server with --resolver to see the TTL as set)"
                    ),
                )
            } else {
                Finding::ok(DNS, format!("{record}: CNAME {}", display_target(&found)))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Apple push certificate

/// When the Apple MDM push certificate expires, and where that was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateExpiry {
    pub source: String,
    pub expires: Timestamp,
}

/// A certificate expiring within this is a warning even when it outlives the rollout.
pub const CERTIFICATE_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// Whether the plan manages iOS/iPadOS devices, the only ones that need the push certificate.
pub fn targets_apple_mobile(plan: &Plan) -> bool {
    plan.policy.platforms().contains(&Platform::Ios)
}

/// The shortest the rollout can take: the longest chain of phases' minimum soaks through the
/// phase graph (parallel phases soak side by side).
pub fn planned_length(plan: &Plan) -> Duration {
    let mut ends = vec![Duration::ZERO; plan.phases.len()];
    for &phase in &plan.order {
        let start = plan.phases[phase]
            .after
            .iter()
            .map(|&p| ends[p])
            .max()
            .unwrap_or_default();
        ends[phase] = start.saturating_add(plan.phases[phase].min_soak);
    }
    ends.into_iter().max().unwrap_or_default()
}

/// Expired, or expiring before the rollout's planned end plus `margin`: an error (iOS devices
/// stop being managed: no check-in, no compliance); within 30 days: a warning.
pub fn apns_certificate(
    expiry: &Result<CertificateExpiry, String>,
    now: Timestamp,
    rollout: Duration,
    margin: Duration,
) -> Finding {
    let renew = "renew the Apple MDM push certificate with the same Apple ID (Intune admin center: \
                 Devices > Enrollment > Apple > Apple MDM Push certificate), before it expires";
    let expiry = match expiry {
        Ok(expiry) => expiry,
        Err(why) => return Finding::error(APNS, why.clone(), renew),
    };
    let at = expiry.expires.rfc3339();
    let source = &expiry.source;
    if expiry.expires <= now {
        return Finding::error(
            APNS,
            format!(
                "the Apple push certificate ({source}) expired at {at}: iOS/iPadOS devices cannot be managed"
            ),
            renew,
        );
    }
    let left = expiry.expires.since(now);
    let needed = now.plus(rollout).plus(margin);
    if expiry.expires < needed {
        return Finding::error(
            APNS,
            format!(
                "the Apple push certificate ({source}) expires at {at}, in {}: before the rollout's \
                 planned end ({} from now) plus the margin of {}",
                format_span(left),
                format_span(rollout),
                format_span(margin)
            ),
            renew,
        );
    }
    if left < CERTIFICATE_WARNING {
        return Finding::warning(
            APNS,
            format!(
                "the Apple push certificate ({source}) expires at {at}, in {}",
                format_span(left)
            ),
            renew,
        );
    }
    Finding::ok(
        APNS,
        format!(
            "the Apple push certificate ({source}) is valid until {at} ({} left)",
            format_span(left)
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// The compliance policies, the template, the groups

/// An object looked up by name (or id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    Missing,
    /// So many objects share the name.
    Ambiguous(usize),
    /// The lookup itself failed (permission, service).
    Failed(String),
}

/// One action of a policy's schedule (`scheduledActionConfigurations`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledAction {
    pub action_type: String,
    pub grace_period_hours: i64,
}

/// A compliance policy as the tenant has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundPolicy {
    /// `@odata.type` (empty when the type exists only in beta).
    pub odata_type: String,
    /// Every action of every `scheduledActionsForRule` entry; empty when there is no schedule.
    pub actions: Vec<ScheduledAction>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFacts {
    pub name: String,
    pub platform: Platform,
    pub found: Lookup<FoundPolicy>,
}

/// Whether a policy's `@odata.type` is of a platform (an empty one — a beta-only type seen
/// through v1.0 — is not contradicted).
pub fn of_platform(platform: Platform, odata_type: &str) -> bool {
    odata_type.is_empty() || crate::provider::graph::compatible(platform, odata_type)
}

/// Each policy exists once, is of the plan's platform and has an action schedule; a `retire` or
/// `wipe` action in it is an error unless the plan allows that action.
pub fn compliance_policies(policies: &[PolicyFacts], allowed: &[DeviceAction]) -> Vec<Finding> {
    policies
        .iter()
        .flat_map(|policy| compliance_policy(policy, allowed))
        .collect()
}

fn compliance_policy(policy: &PolicyFacts, allowed: &[DeviceAction]) -> Vec<Finding> {
    let name = &policy.name;
    let found = match &policy.found {
        Lookup::Found(found) => found,
        Lookup::Missing => {
            return vec![Finding::error(
                POLICY,
                format!("compliance policy `{name}` not found"),
                format!(
                    "create the {} compliance policy `{name}` in Intune, or correct [policy] compliance",
                    policy.platform
                ),
            )
            .checked_by_start()];
        }
        Lookup::Ambiguous(n) => {
            return vec![
                Finding::error(
                    POLICY,
                    format!("compliance policy `{name}` is ambiguous: {n} policies share the name"),
                    "name the policy by its id in [policy] compliance",
                )
                .checked_by_start(),
            ];
        }
        Lookup::Failed(why) => {
            return vec![Finding::error(
                POLICY,
                format!("compliance policy `{name}`: cannot be read ({why})"),
                "grant the app DeviceManagementConfiguration.ReadWrite.All (see docs/graph.md)",
            )];
        }
    };
    let mut findings = Vec::new();
    if !of_platform(policy.platform, &found.odata_type) {
        findings.push(Finding::error(
            POLICY,
            format!(
                "compliance policy `{name}` is a {}, but the plan says it is for {}",
                found.odata_type.trim_start_matches("#microsoft.graph."),
                policy.platform
            ),
            "name the policy of that platform in [policy] compliance, or correct its platform",
        ));
    }
    if found.actions.is_empty() {
        findings.push(Finding::error(
            POLICY,
            format!("compliance policy `{name}` has no actions for noncompliance"),
            "give the policy its action schedule in Intune (at least \"Mark device noncompliant\")",
        ));
        return findings;
    }
    let destructive: BTreeSet<DeviceAction> = found
        .actions
        .iter()
        .filter_map(|a| DeviceAction::of_graph(&a.action_type))
        .collect();
    for action in &destructive {
        if !allowed.contains(action) {
            let what = match action {
                DeviceAction::Wipe => {
                    "a wipe resets devices and deletes their owners' personal data"
                }
                DeviceAction::Retire => "a retire removes company data and management from devices",
            };
            findings.push(Finding::error(
                POLICY,
                format!(
                    "compliance policy `{name}` schedules a `{}` action: {what}",
                    action.as_str()
                ),
                format!(
                    "remove the {} action from the policy's schedule, or accept it in the plan \
                     with [preflight] allow_device_actions = [\"{}\"]",
                    action.as_str(),
                    action.as_str()
                ),
            ));
        }
    }
    if findings.is_empty() {
        let actions: Vec<String> = found
            .actions
            .iter()
            .map(|a| format!("{} after {}h", a.action_type, a.grace_period_hours))
            .collect();
        findings.push(Finding::ok(
            POLICY,
            format!(
                "compliance policy `{name}` ({}): {}",
                policy.platform,
                actions.join(", ")
            ),
        ));
    }
    findings
}

/// A notification message template and its localized messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundTemplate {
    pub default_locale: Option<String>,
    /// `(locale, isDefault, subject and body both non-empty)`.
    pub messages: Vec<(String, bool, bool)>,
}

/// The template exists and has a message in its default locale.
pub fn notification_template(name: &str, found: &Lookup<FoundTemplate>) -> Finding {
    let template = match found {
        Lookup::Found(template) => template,
        Lookup::Missing => {
            return Finding::error(
                TEMPLATE,
                format!("notification message template `{name}` not found"),
                "create it in Intune (Endpoint security > Device compliance > Notifications), or correct [policy] notification_template",
            )
            .checked_by_start();
        }
        Lookup::Ambiguous(n) => {
            return Finding::error(
                TEMPLATE,
                format!("notification message template `{name}` is ambiguous: {n} share the name"),
                "name the template by its id in [policy] notification_template",
            )
            .checked_by_start();
        }
        Lookup::Failed(why) => {
            return Finding::error(
                TEMPLATE,
                format!("notification message template `{name}`: cannot be read ({why})"),
                "grant the app DeviceManagementServiceConfig.Read.All (see docs/graph.md)",
            );
        }
    };
    let locale = template.default_locale.clone().unwrap_or_default();
    let message = template.messages.iter().find(|(l, is_default, _)| {
        (!locale.is_empty() && l.eq_ignore_ascii_case(&locale))
            || (locale.is_empty() && *is_default)
    });
    match message {
        Some((l, _, true)) => Finding::ok(
            TEMPLATE,
            format!(
                "notification message template `{name}` has a message in its default locale {l}"
            ),
        ),
        Some((l, _, false)) => Finding::error(
            TEMPLATE,
            format!(
                "notification message template `{name}`: the message in its default locale {l} has no subject or no text"
            ),
            "write the subject and message of the default locale's message in Intune",
        ),
        None => Finding::error(
            TEMPLATE,
            format!(
                "notification message template `{name}` has no message in its default locale{}",
                if locale.is_empty() {
                    String::new()
                } else {
                    format!(" {locale}")
                }
            ),
            "add a localized message for the template's default locale in Intune",
        ),
    }
}

/// A group the plan names, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundGroup {
    pub id: String,
    /// Whether it has at least one member (transitively).
    pub has_members: bool,
}

/// Every group the plan's phases include exists and has members.
pub fn groups(groups: &[(String, Lookup<FoundGroup>)]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut fine = Vec::new();
    for (name, found) in groups {
        match found {
            Lookup::Found(group) if group.has_members => fine.push(name.as_str()),
            Lookup::Found(_) => findings.push(Finding::error(
                GROUPS,
                format!(
                    "group `{name}` has no members: the phase that includes it would cover nobody"
                ),
                format!("add the phase's users to `{name}`, or name another group"),
            )),
            Lookup::Missing => findings.push(Finding::error(
                GROUPS,
                format!("group `{name}` not found"),
                format!(
                    "create the group `{name}` in Entra ID, or correct the plan's include/exclude"
                ),
            )
            .checked_by_start()),
            Lookup::Ambiguous(n) => findings.push(Finding::error(
                GROUPS,
                format!("group `{name}` is ambiguous: {n} groups share the name"),
                "name the group by its object id in the plan",
            )
            .checked_by_start()),
            Lookup::Failed(why) => findings.push(Finding::error(
                GROUPS,
                format!("group `{name}`: cannot be read ({why})"),
                "grant the app GroupMember.Read.All (see docs/graph.md)",
            )),
        }
    }
    if !fine.is_empty() {
        findings.insert(
            0,
            Finding::ok(GROUPS, format!("groups with members: {}", fine.join(", "))),
        );
    }
    findings
}

/// Every directory group the plan's `[directory_approvers]` names exists and has members:
/// otherwise nobody in it could ever approve, and the phases that ask it would wait for good.
/// Each entry is (approver group, directory group, what was found).
pub fn approver_groups(groups: &[(String, String, Lookup<FoundGroup>)]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut fine = Vec::new();
    for (group, directory, found) in groups {
        let fix_name = format!(
            "create the group `{directory}` in Entra ID, or point `[directory_approvers]` {group} at an existing group (display name or object id)"
        );
        match found {
            Lookup::Found(g) if g.has_members => fine.push(format!("{group} (`{directory}`)")),
            Lookup::Found(_) => findings.push(Finding::error(
                APPROVERS,
                format!(
                    "directory group `{directory}` (approver group `{group}`) has no members: nobody could approve the phases that ask it"
                ),
                format!("add the approvers to `{directory}` in Entra ID, or name another group"),
            )),
            Lookup::Missing => findings.push(Finding::error(
                APPROVERS,
                format!(
                    "directory group `{directory}` (approver group `{group}`) not found in the tenant"
                ),
                fix_name,
            )),
            Lookup::Ambiguous(n) => findings.push(Finding::error(
                APPROVERS,
                format!(
                    "directory group `{directory}` (approver group `{group}`) is ambiguous: {n} groups share the name"
                ),
                format!("name the group by its object id in `[directory_approvers]` {group}"),
            )),
            Lookup::Failed(why) => findings.push(Finding::error(
                APPROVERS,
                format!(
                    "directory group `{directory}` (approver group `{group}`): cannot be read ({why})"
                ),
                "grant the app GroupMember.Read.All and User.Read.All (see docs/graph.md)",
            )),
        }
    }
    if !fine.is_empty() {
        findings.insert(
            0,
            Finding::ok(
                APPROVERS,
                format!(
                    "directory approver groups with members: {}",
                    fine.join(", ")
                ),
            ),
        );
    }
    findings
}

// ---------------------------------------------------------------------------------------------
// Announcement groups

/// An e-mail announcement that mails groups: its own addresses, its groups, and its channel's
/// `max_recipients`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailing {
    pub addresses: Vec<String>,
    pub groups: Vec<String>,
    pub max_recipients: usize,
}

/// The plan's e-mail announcements that mail groups.
pub fn mailings(plan: &Plan) -> Vec<Mailing> {
    plan.announcements
        .iter()
        .filter(|a| a.address.kind() == crate::announce::email::NAME && !a.groups.is_empty())
        .map(|a| Mailing {
            addresses: a.addresses.clone(),
            groups: a.groups.clone(),
            max_recipients: crate::announce::email::of(&a.address)
                .map_or(MAIL_RECIPIENTS_MAX, |s| s.max_recipients),
        })
        .collect()
}

/// Every group an e-mail announcement mails can be read and reaches someone, and every
/// announcement fits in one message: a missing, unreadable or empty group, one whose members
/// all lack a mail address or are disabled, or more recipients than the channel's
/// `max_recipients` is an error (at run time such a message would be dropped, the rollout going
/// on untold). `found` holds each group's members as the directory has them.
pub fn mailed_groups(
    mailings: &[Mailing],
    found: &[(String, Lookup<Vec<Member>>)],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut fine = Vec::new();
    for (name, lookup) in found {
        match lookup {
            Lookup::Found(members) if members.is_empty() => findings.push(Finding::error(
                MAILED,
                format!("group `{name}`, which an e-mail announcement mails, has no members"),
                format!("add the people to tell to `{name}`, or mail another group or address"),
            )),
            Lookup::Found(members) => {
                let reach = reach(&[], members);
                let left_out = left_out(&reach);
                if reach.addresses.is_empty() {
                    findings.push(Finding::error(
                        MAILED,
                        format!(
                            "nobody in group `{name}` can be mailed: {} member{}{left_out}",
                            members.len(),
                            if members.len() == 1 { "" } else { "s" }
                        ),
                        format!(
                            "give the members of `{name}` a mailbox, or mail another group or address"
                        ),
                    ));
                } else {
                    fine.push(format!(
                        "`{name}` ({} of {} member{}{left_out})",
                        reach.addresses.len(),
                        members.len(),
                        if members.len() == 1 { "" } else { "s" }
                    ));
                }
            }
            Lookup::Missing => findings.push(Finding::error(
                MAILED,
                format!("group `{name}`, which an e-mail announcement mails, not found"),
                format!(
                    "create the group `{name}` in Entra ID, or correct the announcement's groups"
                ),
            )),
            Lookup::Ambiguous(n) => findings.push(Finding::error(
                MAILED,
                format!("group `{name}` is ambiguous: {n} groups share the name"),
                "name the group by its object id in the plan",
            )),
            Lookup::Failed(why) => findings.push(Finding::error(
                MAILED,
                format!("the members of group `{name}` cannot be read ({why})"),
                "grant the app GroupMember.Read.All and User.Read.All (see docs/graph.md)",
            )),
        }
    }
    for mailing in mailings {
        let members: Vec<Member> = mailing
            .groups
            .iter()
            .filter_map(|g| found.iter().find(|(name, _)| name == g))
            .filter_map(|(_, lookup)| match lookup {
                Lookup::Found(members) => Some(members.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        if let Err(why) = mail_recipients(&mailing.addresses, &members, mailing.max_recipients) {
            findings.push(Finding::error(
                MAILED,
                format!("the e-mail announcement to {}: {why}", mailing.groups.join(", ")),
                "name smaller groups, a distribution list's address, or raise the channel's max_recipients (at most 500)",
            ));
        }
    }
    if !fine.is_empty() {
        findings.insert(
            0,
            Finding::ok(
                MAILED,
                format!("announcement groups reach by mail: {}", fine.join(", ")),
            ),
        );
    }
    findings
}

/// `, 2 without a mail address, 1 disabled`: who a group's e-mail leaves out.
fn left_out(reach: &Recipients) -> String {
    let mut text = String::new();
    if !reach.without_mail.is_empty() {
        text.push_str(&format!(
            ", {} without a mail address",
            reach.without_mail.len()
        ));
    }
    if !reach.disabled.is_empty() {
        text.push_str(&format!(", {} disabled", reach.disabled.len()));
    }
    text
}

/// The tenant's compliance settings (`deviceManagementSettings`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSettings {
    /// "Mark devices with no compliance policy assigned as": noncompliant when true.
    pub secure_by_default: Option<bool>,
    /// "Compliance status validity period (days)".
    pub checkin_threshold_days: Option<i64>,
}

/// Reports the two settings that decide what devices outside a policy, or silent ones, count as
/// (reported, not judged: either choice can be right for a tenant).
pub fn tenant_settings(settings: &Result<TenantSettings, String>) -> Vec<Finding> {
    let settings = match settings {
        Ok(s) => s,
        Err(why) => {
            return vec![Finding::warning(
                TENANT,
                format!("the tenant's compliance settings cannot be read ({why})"),
                "grant the app DeviceManagementConfiguration.ReadWrite.All (see docs/graph.md)",
            )];
        }
    };
    let marked = match settings.secure_by_default {
        Some(true) => "Not compliant",
        Some(false) => "Compliant",
        None => "not reported",
    };
    let validity = settings
        .checkin_threshold_days
        .map_or("not reported".to_string(), |d| format!("{d} days"));
    vec![Finding::ok(
        TENANT,
        format!(
            "devices with no compliance policy assigned are marked: {marked}; compliance status validity period: {validity}"
        ),
    )]
}

// ---------------------------------------------------------------------------------------------
// Conditional Access: overlapping compliance policies, MFA

/// An enabled-or-not Conditional Access policy, as much as the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPolicy {
    pub id: String,
    pub name: String,
    pub state: String,
    pub requires_compliance: bool,
    /// `mfa` among the grant controls, or an authentication strength.
    pub requires_mfa: bool,
    pub include_users: Vec<String>,
    pub include_groups: Vec<String>,
    pub exclude_groups: Vec<String>,
    /// `conditions.platforms`, as Conditional Access names them (`iOS`, `windows`, `all`);
    /// both empty: no platform condition.
    pub include_platforms: Vec<String>,
    pub exclude_platforms: Vec<String>,
}

impl CaPolicy {
    /// Whether the policy applies to devices of one of `platforms`.
    fn covers_a_platform(&self, platforms: &[Platform]) -> bool {
        if self.include_platforms.is_empty() {
            return true;
        }
        let named = |list: &[String], p: &str| list.iter().any(|x| x.eq_ignore_ascii_case(p));
        platforms.iter().any(|&platform| {
            let name = crate::provider::graph::mapping::ca_platform(platform);
            (named(&self.include_platforms, "all") || named(&self.include_platforms, name))
                && !named(&self.exclude_platforms, name)
        })
    }

    fn covers_group(&self, group_id: Option<&str>) -> bool {
        if let Some(id) = group_id
            && self.exclude_groups.iter().any(|g| g == id)
        {
            return false;
        }
        self.include_users.iter().any(|u| u == "All")
            || group_id.is_some_and(|id| self.include_groups.iter().any(|g| g == id))
    }
}

/// The groups a rollout reaches: by name, with their ids (`None` for All Users).
pub type Scope = Vec<(String, Option<String>)>;

/// Other enabled policies requiring a compliant device that already reach the rollout's users on
/// one of its platforms: they block noncompliant devices before the plan's enforce phase does.
pub fn overlapping_policies(
    policies: &[CaPolicy],
    own: Option<&str>,
    scope: &Scope,
    platforms: &[Platform],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for policy in policies {
        if policy.state != "enabled"
            || !policy.requires_compliance
            || !policy.covers_a_platform(platforms)
            || own.is_some_and(|o| o == policy.id || o.eq_ignore_ascii_case(&policy.name))
        {
            continue;
        }
        let reached: Vec<&str> = scope
            .iter()
            .filter(|(_, id)| match id {
                Some(id) => policy.covers_group(Some(id)),
                None => true,
            })
            .map(|(name, _)| name.as_str())
            .collect();
        if !reached.is_empty() {
            findings.push(Finding::warning(
                OVERLAP,
                format!(
                    "enabled Conditional Access policy `{}` already requires a compliant device for {}: noncompliant devices there are blocked from the first phase",
                    policy.name,
                    reached.join(", ")
                ),
                "this protection is already on: keep it, and expect these groups' noncompliant devices to be blocked whatever the phase (agree with its owner how the rollout's gates read with it)",
            ));
        }
    }
    if findings.is_empty() {
        findings.push(Finding::ok(
            OVERLAP,
            "no other enabled Conditional Access policy requiring a compliant device reaches the rollout's groups",
        ));
    }
    findings
}

/// A warning naming the groups no enabled policy requiring MFA covers.
pub fn mfa(policies: &[CaPolicy], scope: &Scope) -> Finding {
    let uncovered: Vec<&str> = scope
        .iter()
        .filter(|(_, id)| {
            !policies
                .iter()
                .any(|p| p.state == "enabled" && p.requires_mfa && p.covers_group(id.as_deref()))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if uncovered.is_empty() {
        Finding::ok(
            MFA,
            "an enabled Conditional Access policy requires MFA for every group the rollout targets",
        )
    } else {
        Finding::warning(
            MFA,
            format!(
                "no enabled Conditional Access policy requires multifactor authentication for {}",
                uncovered.join(", ")
            ),
            "require MFA for these users first (Microsoft's template \"Require multifactor authentication for all users\"), so that device compliance is not their only control",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Permissions

/// The application permissions a plan needs, with what each is for.
pub fn needed_roles(plan: &Plan, reads_domains: bool) -> Vec<(&'static str, &'static str)> {
    let mut roles = vec![
        (
            "DeviceManagementConfiguration.ReadWrite.All",
            "compliance policies, their assignments and actions",
        ),
        (
            "GroupMember.Read.All",
            "the plan's groups and their members",
        ),
    ];
    if plan.policy.notification_template.is_some() || targets_apple_mobile(plan) {
        roles.push((
            "DeviceManagementServiceConfig.Read.All",
            "the notification template and the Apple push certificate",
        ));
    }
    roles.push(("Policy.Read.All", "Conditional Access policies"));
    if plan.policy.conditional_access.is_some() {
        roles.push((
            "Policy.ReadWrite.ConditionalAccess",
            "the plan's Conditional Access policy",
        ));
        roles.push((
            "Application.Read.All",
            "Conditional Access writes (Graph requires it with the two above)",
        ));
    }
    if !plan.emergency_access.users.is_empty() {
        roles.push(("User.Read.All", "the emergency-access users"));
    } else if !plan.directory_approvers.is_empty() {
        roles.push((
            "User.Read.All",
            "the names of the directory approver groups' members",
        ));
    } else if !mailings(plan).is_empty() {
        roles.push((
            "User.Read.All",
            "the mail addresses of the groups e-mail announcements mail",
        ));
    }
    if reads_domains {
        roles.push(("Organization.Read.All", "the tenant's verified domains"));
    }
    // A sign-in criterion the plan requires (`signin_data = "required"`, the default) needs the
    // sign-in log; an optional one is judged without it when it cannot be read.
    if plan.phases.iter().any(|p| {
        crate::domain::signins::wanted(&p.gate, &p.rollback_when)
            && p.gate.signin_data == crate::domain::signins::SignInData::Required
    }) {
        roles.push((
            "AuditLog.Read.All",
            "the sign-in log the plan's sign-in criteria read",
        ));
        roles.push((
            "Directory.Read.All",
            "the sign-in log (Graph requires it with AuditLog.Read.All)",
        ));
    }
    roles
}

/// Each needed role granted (a `.ReadWrite.` role covers its `.Read.` one): a missing one is an
/// error naming it.
pub fn permissions(needed: &[(&str, &str)], granted: &Result<Vec<String>, String>) -> Vec<Finding> {
    let granted = match granted {
        Ok(roles) => roles,
        Err(why) => {
            return vec![Finding::warning(
                PERMISSIONS,
                format!("the access token's roles cannot be read ({why})"),
                "check the app registration's API permissions against docs/graph.md",
            )];
        }
    };
    let has = |role: &str| {
        granted.iter().any(|g| g.eq_ignore_ascii_case(role))
            || granted
                .iter()
                .any(|g| g.eq_ignore_ascii_case(&role.replace(".Read.", ".ReadWrite.")))
    };
    let mut findings: Vec<Finding> = needed
        .iter()
        .filter(|(role, _)| !has(role))
        .map(|(role, why)| {
            Finding::error(
                PERMISSIONS,
                format!("the app lacks the application permission {role} (for {why})"),
                format!("add Microsoft Graph application permission {role} to the app registration and grant admin consent"),
            )
        })
        .collect();
    if findings.is_empty() {
        let names: Vec<&str> = needed.iter().map(|(r, _)| *r).collect();
        findings.push(Finding::ok(
            PERMISSIONS,
            format!(
                "the app has every permission the plan needs: {}",
                names.join(", ")
            ),
        ));
    }
    findings
}

#[cfg(test)]
mod tests;
