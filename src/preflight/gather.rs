//! The imperative shell of the preflight: reads the plan's settings, asks DNS, reads the
//! certificate file and the tenant, and hands each set of facts to its pure check. A check whose
//! facts cannot be had on this provider says `skipped` and why.

use std::time::SystemTime;

use super::checks::{self, Finding, Lookup, Scope};
use super::dns::Dns;
use super::settings::{self, PreflightSettings};
use super::{Options, Report, certificate};
use crate::domain::plan::Plan;
use crate::domain::time::Timestamp;
use crate::graph::ALL_USERS_NAME;
use crate::provider::graph::readiness::{self, TenantFacts};
use crate::provider::{graph, simulator};

const SIMULATED: &str = "skipped (simulated provider)";

/// Runs every check for `plan`. An `Err` is a problem with the preflight itself (its settings);
/// everything about the tenant is a finding.
pub async fn run(plan: &Plan, options: &Options) -> Result<Report, String> {
    let settings = settings::of(plan)?;
    let tenant = match plan.provider.kind.as_str() {
        kind if kind == graph::settings::KIND.name => {
            let graph_settings = graph::settings::of(&plan.provider)?;
            Some(readiness::read(graph_settings, plan, settings.domains.is_empty()).await)
        }
        kind if kind == simulator::settings::KIND.name => None,
        other => return Err(format!("no provider of kind `{other}`")),
    };
    let mut findings = Vec::new();
    let tenant = match tenant {
        Some(Ok(facts)) => Some(facts),
        Some(Err(e)) => {
            findings.push(
                Finding::error(
                    "tenant",
                    format!("cannot read the tenant: {}", e.message),
                    "check [provider] (tenant, client_id, the secret's variable) and that the app may sign in",
                )
                .checked_by_start(),
            );
            None
        }
        None => None,
    };
    let graph = plan.provider.kind == graph::settings::KIND.name;
    findings.extend(dns(&settings, options, tenant.as_ref(), graph).await);
    findings.extend(apns(plan, &settings, options, tenant.as_ref(), graph));
    match &tenant {
        Some(facts) => findings.extend(of_tenant(plan, &settings, facts)),
        None if graph => {}
        None => {
            for check in [
                checks::POLICY,
                checks::TEMPLATE,
                checks::GROUPS,
                checks::TENANT,
                checks::OVERLAP,
                checks::MFA,
                checks::PERMISSIONS,
            ] {
                findings.push(Finding::skipped(check, SIMULATED));
            }
            if !plan.directory_approvers.is_empty() {
                findings.push(Finding::skipped(checks::APPROVERS, SIMULATED));
            }
            findings.extend(simulated_mailed_groups(plan)?);
        }
    }
    Ok(Report {
        plan: plan.name.clone(),
        provider: plan.provider.kind.clone(),
        findings,
    })
}

async fn dns(
    settings: &PreflightSettings,
    options: &Options,
    tenant: Option<&TenantFacts>,
    graph: bool,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let domains = if !settings.domains.is_empty() {
        settings.domains.clone()
    } else {
        match tenant.and_then(|t| t.verified_domains.clone()) {
            Some(Ok(domains)) if !domains.is_empty() => {
                let (domains, more) = checkable(domains, &mut findings);
                if more > 0 {
                    findings.push(Finding::skipped(
                        checks::DNS,
                        format!(
                            "{more} more verified domains not checked (at most {} are): list those users sign in with in [preflight] domains",
                            settings::MAX_DOMAINS
                        ),
                    ));
                }
                domains
            }
            Some(Ok(_)) => {
                return vec![Finding::skipped(
                    checks::DNS,
                    "the tenant has no verified domain but its initial one, and [preflight] domains lists none",
                )];
            }
            Some(Err(why)) => {
                return vec![Finding::error(
                    checks::DNS,
                    format!("the tenant's verified domains cannot be read ({why})"),
                    "grant the app Organization.Read.All, or list the domains in [preflight] domains",
                )];
            }
            None if graph => return Vec::new(),
            None => {
                return vec![Finding::skipped(
                    checks::DNS,
                    "skipped (simulated provider): list the domains to check in [preflight] domains",
                )];
            }
        }
    };
    let resolver = match Dns::new(options.resolver.or(settings.resolver)) {
        Ok(resolver) => resolver,
        Err(why) => {
            findings.push(Finding::error(
                checks::DNS,
                why,
                "name a DNS server with --resolver or [preflight] resolver",
            ));
            return findings;
        }
    };
    let mut records = Vec::new();
    for domain in &domains {
        records.push(resolver.enrolment_records(domain).await);
    }
    let mut checked = checks::enrolment_dns(&records);
    checked.append(&mut findings);
    checked
}

/// The tenant's verified domains that are domain names, at most [`settings::MAX_DOMAINS`], and
/// how many more there are; one that is not a name is reported, not asked about.
fn checkable(domains: Vec<String>, findings: &mut Vec<Finding>) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut more = 0;
    for domain in domains {
        match settings::domain_name(&domain) {
            Some(name) if names.len() < settings::MAX_DOMAINS => names.push(name),
            Some(_) => more += 1,
            None => findings.push(Finding::warning(
                checks::DNS,
                format!("the tenant lists `{domain}` as a verified domain, which is not a domain name: not checked"),
                "list the domains users sign in with in [preflight] domains",
            )),
        }
    }
    (names, more)
}

fn apns(
    plan: &Plan,
    settings: &PreflightSettings,
    options: &Options,
    tenant: Option<&TenantFacts>,
    graph: bool,
) -> Vec<Finding> {
    if !checks::targets_apple_mobile(plan) {
        return Vec::new();
    }
    let length = checks::planned_length(plan);
    let (expiry, now) = if let Some(file) = &settings.apns_certificate {
        let path = options.plan_dir.join(file);
        let now = Timestamp::from_system_time(SystemTime::now());
        (
            certificate::expiry(&path, settings.apns_certificate_password_env.as_deref()),
            now,
        )
    } else {
        match tenant.and_then(|t| t.apns.clone().map(|a| (a, t.now))) {
            Some(found) => found,
            None if graph => return Vec::new(),
            None => {
                return vec![Finding::skipped(
                    checks::APNS,
                    "skipped (simulated provider): name the certificate file in [preflight] apns_certificate",
                )];
            }
        }
    };
    vec![checks::apns_certificate(
        &expiry,
        now,
        length,
        settings.certificate_margin,
    )]
}

fn of_tenant(plan: &Plan, settings: &PreflightSettings, facts: &TenantFacts) -> Vec<Finding> {
    let mut findings = checks::compliance_policies(&facts.policies, &settings.allow_device_actions);
    if let Some((name, template)) = &facts.template {
        findings.push(checks::notification_template(name, template));
    }
    findings.extend(checks::groups(&facts.groups));
    findings.extend(checks::approver_groups(&facts.approver_groups));
    findings.extend(checks::mailed_groups(
        &checks::mailings(plan),
        &facts.mailed_groups,
    ));
    findings.extend(checks::tenant_settings(&facts.settings));
    let scope = scope(plan, facts);
    match &facts.conditional_access {
        Ok(policies) => {
            findings.extend(checks::overlapping_policies(
                policies,
                plan.policy.conditional_access.as_deref(),
                &scope,
                &plan.policy.platforms(),
            ));
            findings.push(checks::mfa(policies, &scope));
        }
        Err(why) => {
            for check in [checks::OVERLAP, checks::MFA] {
                findings.push(Finding::warning(
                    check,
                    format!("Conditional Access policies cannot be read ({why})"),
                    "grant the app Policy.Read.All (see docs/graph.md)",
                ));
            }
        }
    }
    let needed = checks::needed_roles(plan, settings.domains.is_empty());
    findings.extend(checks::permissions(&needed, &facts.roles));
    findings
}

/// The mailed groups' members as the simulated directory has them: the same answer a delivery
/// gets (`simulator::directory_members`).
fn simulated_mailed_groups(plan: &Plan) -> Result<Vec<Finding>, String> {
    let mailings = checks::mailings(plan);
    if mailings.is_empty() {
        return Ok(Vec::new());
    }
    let settings = simulator::settings::of(&plan.provider)?;
    let fleet = simulator::Fleet::new(
        settings.seed,
        settings.devices,
        settings.remediation_half_life,
        simulator::SIMULATED_EPOCH,
    );
    let names: std::collections::BTreeSet<&String> =
        mailings.iter().flat_map(|m| &m.groups).collect();
    let found: Vec<_> = names
        .into_iter()
        .map(|name| {
            let lookup = match simulator::directory_members(
                &fleet,
                name,
                crate::domain::directory::MEMBERS_READ_MAX,
            ) {
                Ok(members) => Lookup::Found(members),
                Err(_) => Lookup::Missing,
            };
            (name.clone(), lookup)
        })
        .collect();
    Ok(checks::mailed_groups(&mailings, &found))
}

/// The groups the phases include, with their ids where found (`None`: All Users).
fn scope(plan: &Plan, facts: &TenantFacts) -> Scope {
    let mut scope: Scope = Vec::new();
    let all_users = plan
        .phases
        .iter()
        .flat_map(|p| &p.include)
        .any(|g| g.eq_ignore_ascii_case(ALL_USERS_NAME));
    if all_users {
        scope.push((ALL_USERS_NAME.to_string(), None));
    }
    for (name, found) in &facts.groups {
        if let Lookup::Found(group) = found {
            scope.push((name.clone(), Some(group.id.clone())));
        }
    }
    scope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_verified_domains_are_asked_about_and_at_most_so_many() {
        let mut findings = Vec::new();
        let (names, more) = checkable(
            vec!["Contoso.com".into(), "not a domain".into()],
            &mut findings,
        );
        assert_eq!(names, ["contoso.com"]);
        assert_eq!(more, 0);
        assert_eq!(findings.len(), 1);
        assert!(findings[0].message.contains("`not a domain`"));
        let many: Vec<String> = (0..settings::MAX_DOMAINS + 3)
            .map(|i| format!("d{i}.example"))
            .collect();
        let (names, more) = checkable(many, &mut Vec::new());
        assert_eq!(names.len(), settings::MAX_DOMAINS);
        assert_eq!(more, 3);
    }
}
