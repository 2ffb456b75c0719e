//! The plan's `[preflight]` table: which domains must carry the enrolment records, which DNS
//! server to ask, the Apple push certificate file (and the variable holding its password), how
//! long it must outlive the rollout, and which destructive device actions the plan accepts in a
//! compliance policy's schedule. Parsed from the plan's text by this module alone (`plan check`
//! reports its problems at their place) and from the settings a plan carries at run time, with
//! the same parser.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::adapters;
use crate::domain::plan::{Diagnostic, DurationRange, Plan, duration_within};

/// The margin a certificate must outlive the rollout's planned end by, unless the plan says.
pub const DEFAULT_CERTIFICATE_MARGIN: Duration = Duration::from_secs(14 * 24 * 3600);
pub const CERTIFICATE_MARGIN_RANGE: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: Duration::from_secs(365 * 24 * 3600),
};
/// Domains one plan may list: a tenant has a handful of verified domains.
pub const MAX_DOMAINS: usize = 100;

/// A device action that takes a device (or its data) away from its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceAction {
    /// Removes company data and management from the device.
    Retire,
    /// Resets the device to factory settings: every personal file, photo and app is gone.
    Wipe,
}

impl DeviceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceAction::Retire => "retire",
            DeviceAction::Wipe => "wipe",
        }
    }

    /// The action by its name in Graph's `deviceComplianceActionType` (and in plans).
    pub fn of_graph(action_type: &str) -> Option<DeviceAction> {
        match action_type {
            "retire" => Some(DeviceAction::Retire),
            "wipe" => Some(DeviceAction::Wipe),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreflightSettings {
    /// Domains whose enrolment CNAMEs are checked; empty: the tenant's verified domains (Graph).
    pub domains: Vec<String>,
    /// The DNS server asked (UDP and TCP); none: the system's resolver configuration.
    pub resolver: Option<SocketAddr>,
    /// An Apple MDM push certificate file (PEM, DER or PKCS#12), relative to the plan's file.
    pub apns_certificate: Option<String>,
    /// The `PHASEGATE_…` variable holding a PKCS#12 file's password.
    pub apns_certificate_password_env: Option<String>,
    /// How long the certificate must still be valid after the rollout's planned end.
    pub certificate_margin: Duration,
    /// Destructive actions the plan accepts in a policy's schedule.
    pub allow_device_actions: Vec<DeviceAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    domains: Option<Spanned<Vec<Spanned<String>>>>,
    resolver: Option<Spanned<String>>,
    apns_certificate: Option<Spanned<String>>,
    apns_certificate_password_env: Option<Spanned<String>>,
    certificate_margin: Option<Spanned<String>>,
    allow_device_actions: Option<Spanned<Vec<Spanned<String>>>>,
}

/// The problems of a plan's `[preflight]` table, located in the plan's text.
pub fn check(source: &str) -> Vec<Diagnostic> {
    parse(source).err().unwrap_or_default()
}

/// The settings in a plan's text (the defaults when it has no `[preflight]`), or every problem
/// with them at its place.
pub fn parse(source: &str) -> Result<PreflightSettings, Vec<Diagnostic>> {
    #[derive(Deserialize)]
    struct Doc {
        preflight: Option<Spanned<Raw>>,
    }
    let doc = match toml::from_str::<Doc>(source) {
        Ok(doc) => doc,
        // Not TOML at all is the domain's to report; a `[preflight]` of the wrong shape is ours.
        Err(err) if err.span().is_some() && toml::from_str::<toml::Table>(source).is_ok() => {
            return Err(vec![adapters::toml_diagnostic(err)]);
        }
        Err(_) => return Ok(defaults()),
    };
    let Some(raw) = doc.preflight else {
        return Ok(defaults());
    };
    let raw = raw.into_inner();
    let mut problems = Vec::new();
    let mut settings = defaults();
    if let Some(domains) = raw.domains {
        if domains.get_ref().len() > MAX_DOMAINS {
            problems.push(Diagnostic::new(
                domains.span(),
                format!("`domains` lists at most {MAX_DOMAINS} domains"),
            ));
        }
        for domain in domains.into_inner() {
            match domain_name(domain.get_ref()) {
                Some(name) if !settings.domains.contains(&name) => settings.domains.push(name),
                Some(_) => {}
                None => problems.push(Diagnostic::new(
                    domain.span(),
                    format!(
                        "`{}` is not a domain name (letters, digits and `-` in labels of at most \
                         63 characters, separated by dots, such as contoso.com)",
                        domain.get_ref()
                    ),
                )),
            }
        }
    }
    if let Some(resolver) = raw.resolver {
        match parse_resolver(resolver.get_ref()) {
            Ok(addr) => settings.resolver = Some(addr),
            Err(message) => problems.push(Diagnostic::new(resolver.span(), message)),
        }
    }
    if let Some(file) = raw.apns_certificate {
        if file.get_ref().trim().is_empty() {
            problems.push(Diagnostic::new(
                file.span(),
                "`apns_certificate` must name a file",
            ));
        } else {
            settings.apns_certificate = Some(file.get_ref().trim().to_string());
        }
    }
    if let Some(env) = raw.apns_certificate_password_env {
        match adapters::secret_variable(&env, "apns_certificate_password_env") {
            Ok(name) => settings.apns_certificate_password_env = Some(name),
            Err(problem) => problems.push(problem),
        }
    }
    if let Some(margin) = raw.certificate_margin {
        match duration_within(&margin, "certificate_margin", CERTIFICATE_MARGIN_RANGE) {
            Ok(margin) => settings.certificate_margin = margin,
            Err(problem) => problems.push(problem),
        }
    }
    if let Some(actions) = raw.allow_device_actions {
        for action in actions.into_inner() {
            match DeviceAction::of_graph(action.get_ref()) {
                Some(known) => settings.allow_device_actions.push(known),
                None => problems.push(Diagnostic::new(
                    action.span(),
                    format!(
                        "`{}` is not a destructive device action: `allow_device_actions` takes \"retire\" and \"wipe\"",
                        action.get_ref()
                    ),
                )),
            }
        }
        settings.allow_device_actions.sort();
        settings.allow_device_actions.dedup();
    }
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(problems)
    }
}

fn defaults() -> PreflightSettings {
    PreflightSettings {
        certificate_margin: DEFAULT_CERTIFICATE_MARGIN,
        ..PreflightSettings::default()
    }
}

/// The settings a checked plan carries.
pub fn of(plan: &Plan) -> Result<PreflightSettings, String> {
    let mut doc = serde_json::Map::new();
    doc.insert(
        "preflight".to_string(),
        serde_json::Value::Object(plan.preflight.clone()),
    );
    let source = toml::to_string(&doc).unwrap_or_default();
    adapters::reparse("preflight", &source, parse)
}

/// `host:port` or a bare IP address (port 53), as `--resolver` and `resolver` take it.
pub fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "invalid resolver `{text}`: expected an IP address, optionally with a port \
         (\"127.0.0.1:5353\", \"[::1]:53\", \"10.0.0.2\")"
    ))
}

/// A domain name, lowercased and without a trailing dot, or `None` when it is not one.
pub fn domain_name(text: &str) -> Option<String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let well_formed = !name.is_empty()
        && name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    well_formed.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(preflight: &str) -> String {
        format!("[rollout]\nname = \"x\"\n\n[preflight]\n{preflight}\n")
    }

    #[test]
    fn no_table_is_the_defaults() {
        let settings = parse("[rollout]\nname = \"x\"\n").unwrap();
        assert_eq!(settings, defaults());
        assert_eq!(settings.certificate_margin, DEFAULT_CERTIFICATE_MARGIN);
    }

    #[test]
    fn reads_every_setting() {
        let settings = parse(&plan(
            "domains = [\"Contoso.com.\", \"fabrikam.com\", \"contoso.com\"]\n\
             resolver = \"127.0.0.1:5353\"\n\
             apns_certificate = \"apns.p12\"\n\
             apns_certificate_password_env = \"PHASEGATE_APNS_PASSWORD\"\n\
             certificate_margin = \"7d\"\n\
             allow_device_actions = [\"wipe\", \"retire\", \"wipe\"]",
        ))
        .unwrap();
        assert_eq!(settings.domains, ["contoso.com", "fabrikam.com"]);
        assert_eq!(settings.resolver, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(settings.apns_certificate.as_deref(), Some("apns.p12"));
        assert_eq!(
            settings.apns_certificate_password_env.as_deref(),
            Some("PHASEGATE_APNS_PASSWORD")
        );
        assert_eq!(settings.certificate_margin, Duration::from_secs(7 * 86400));
        assert_eq!(
            settings.allow_device_actions,
            [DeviceAction::Retire, DeviceAction::Wipe]
        );
    }

    #[test]
    fn every_problem_is_reported_at_its_place() {
        let source = plan(
            "domains = [\"not a domain\"]\nresolver = \"dns.example\"\n\
             apns_certificate_password_env = \"HOME\"\ncertificate_margin = \"400d\"",
        );
        let problems = parse(&source).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].message.contains("not a domain name"));
        assert_eq!(&source[problems[0].span.clone()], "\"not a domain\"");
        assert!(problems[1].message.contains("invalid resolver"));
        assert!(problems[2].message.contains("PHASEGATE_"));
        assert!(problems[3].message.contains("certificate_margin"));
    }

    #[test]
    fn unknown_keys_and_actions_are_refused() {
        let problems = parse(&plan("allow_wipe = true")).unwrap_err();
        assert!(problems[0].message.contains("allow_wipe"), "{problems:?}");
        let problems = parse(&plan("allow_device_actions = [\"block\"]")).unwrap_err();
        assert!(
            problems[0]
                .message
                .contains("`block` is not a destructive device action"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_resolver_without_a_port_uses_53() {
        assert_eq!(parse_resolver("10.0.0.2").unwrap().port(), 53);
        assert_eq!(parse_resolver("[::1]:5353").unwrap().port(), 5353);
    }

    #[test]
    fn domain_names_are_checked() {
        assert_eq!(domain_name("Contoso.COM."), Some("contoso.com".into()));
        assert_eq!(domain_name("localhost"), None);
        assert_eq!(domain_name("-bad.com"), None);
        assert_eq!(domain_name(&format!("{}.com", "a".repeat(64))), None);
    }
}
