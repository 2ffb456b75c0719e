//! The Graph provider's `[provider]` settings: which tenant, which app registration, where the
//! secret is, and the endpoints (Microsoft's by default, `phasegate emulator` in tests). Parsed
//! from the plan's text by this adapter alone.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::adapters::{self, ProviderKind};
use crate::domain::plan::{Diagnostic, DurationRange, ProviderConfig, duration_within};

pub const KIND: ProviderKind = ProviderKind {
    name: "graph",
    check: |source| parse(source).err().unwrap_or_default(),
};

pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";
pub const DEFAULT_LOGIN_URL: &str = "https://login.microsoftonline.com";
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const REQUEST_TIMEOUT_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(1),
    max: Duration::from_secs(600),
};
/// Conditional Access requests per second: from one every 1,000 seconds to a million (the
/// emulator in tests; Microsoft allows about one per tenant).
pub const CA_RATE_RANGE: (f64, f64) = (0.001, 1_000_000.0);

/// A Microsoft 365 tenant through Microsoft Graph (or `phasegate emulator`).
#[derive(Clone, Debug, PartialEq)]
pub struct GraphSettings {
    /// Tenant GUID or verified domain.
    pub tenant: String,
    pub client_id: String,
    /// The environment variable holding the client secret; the secret never sits in a plan.
    pub client_secret_env: String,
    pub graph_url: String,
    pub login_url: String,
    /// Conditional Access requests per second (the service allows 1 per tenant).
    pub ca_requests_per_second: f64,
    pub request_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[allow(dead_code)]
    kind: String,
    tenant: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret_env: Option<Spanned<String>>,
    graph_url: Option<Spanned<String>>,
    login_url: Option<Spanned<String>>,
    ca_requests_per_second: Option<Spanned<f64>>,
    request_timeout: Option<Spanned<String>>,
}

/// The settings in a plan's text, or every problem with them at its place.
pub fn parse(source: &str) -> Result<GraphSettings, Vec<Diagnostic>> {
    let table = adapters::provider_table::<Raw>(source)
        .map_err(|d| vec![adapters::foreign_key(d, "the graph provider")])?;
    let at = table.span();
    let raw = table.into_inner();
    let mut problems = Vec::new();
    let mut required = |value: &Option<Spanned<String>>, key: &str| match value {
        Some(v) if !v.get_ref().trim().is_empty() => Some(v.get_ref().trim().to_string()),
        Some(v) => {
            problems.push(Diagnostic::new(
                v.span(),
                format!("`{key}` must not be empty"),
            ));
            None
        }
        None => {
            problems.push(Diagnostic::new(
                at.clone(),
                format!("the graph provider needs `{key}`"),
            ));
            None
        }
    };
    let tenant = required(&raw.tenant, "tenant");
    let client_id = required(&raw.client_id, "client_id");
    let client_secret_env = required(&raw.client_secret_env, "client_secret_env");
    let client_secret_env = match (&raw.client_secret_env, client_secret_env) {
        (Some(value), Some(_)) => adapters::secret_variable(value, "client_secret_env")
            .map_err(|d| problems.push(d))
            .ok(),
        _ => None,
    };
    let mut url = |value: &Option<Spanned<String>>, default: &str, what: &str| match value {
        None => Some(default.to_string()),
        Some(v) => adapters::endpoint_url(v, what)
            .map_err(|d| problems.push(d))
            .ok(),
    };
    let graph_url = url(&raw.graph_url, DEFAULT_GRAPH_URL, "graph_url");
    let login_url = url(&raw.login_url, DEFAULT_LOGIN_URL, "login_url");
    let rate = match &raw.ca_requests_per_second {
        None => Some(1.0),
        Some(v) if (CA_RATE_RANGE.0..=CA_RATE_RANGE.1).contains(v.get_ref()) => Some(*v.get_ref()),
        Some(v) => {
            problems.push(Diagnostic::new(
                v.span(),
                format!(
                    "`ca_requests_per_second` must be from {} to {}, found {}",
                    CA_RATE_RANGE.0,
                    CA_RATE_RANGE.1,
                    v.get_ref()
                ),
            ));
            None
        }
    };
    let timeout = match &raw.request_timeout {
        None => Some(DEFAULT_REQUEST_TIMEOUT),
        Some(text) => match duration_within(text, "request_timeout", REQUEST_TIMEOUT_RANGE) {
            Ok(d) => Some(d),
            Err(d) => {
                problems.push(d);
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    match (
        tenant,
        client_id,
        client_secret_env,
        graph_url,
        login_url,
        rate,
        timeout,
    ) {
        (
            Some(tenant),
            Some(client_id),
            Some(client_secret_env),
            Some(graph_url),
            Some(login_url),
            Some(ca_requests_per_second),
            Some(request_timeout),
        ) => Ok(GraphSettings {
            tenant,
            client_id,
            client_secret_env,
            graph_url,
            login_url,
            ca_requests_per_second,
            request_timeout,
        }),
        _ => Err(problems),
    }
}

/// The settings a checked plan carries.
pub fn of(config: &ProviderConfig) -> Result<GraphSettings, String> {
    adapters::reparse("graph", &adapters::provider_source(config), parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(provider: &str) -> String {
        format!("[rollout]\nname = \"x\"\n\n[provider]\nkind = \"graph\"\n{provider}\n")
    }

    const FULL: &str = "tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app\"\n\
                        client_secret_env = \"PHASEGATE_GRAPH_SECRET\"";

    #[test]
    fn defaults_are_microsofts_endpoints() {
        let settings = parse(&plan(FULL)).unwrap();
        assert_eq!(settings.graph_url, DEFAULT_GRAPH_URL);
        assert_eq!(settings.login_url, DEFAULT_LOGIN_URL);
        assert_eq!(settings.ca_requests_per_second, 1.0);
        assert_eq!(settings.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    }

    #[test]
    fn missing_and_wrong_settings_each_reported() {
        let source =
            plan("client_id = \"\"\ngraph_url = \"ftp://x\"\nca_requests_per_second = 0.0");
        let problems = parse(&source).unwrap_err();
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages.contains(&"the graph provider needs `tenant`"),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"`client_id` must not be empty"),
            "{messages:?}"
        );
        assert!(messages.contains(&"the graph provider needs `client_secret_env`"));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("invalid graph_url `ftp://x`: expected https://")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("`ca_requests_per_second` must be from 0.001")),
            "{messages:?}"
        );
    }

    /// A plan may not pick which of the machine's secrets is sent, nor send it in clear text to
    /// another machine.
    #[test]
    fn the_secret_is_a_phasegate_variable_sent_over_https_or_to_this_machine_only() {
        let source = plan(
            "tenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"AWS_SECRET_ACCESS_KEY\"\n\
             login_url = \"http://login.example.net\"",
        );
        let problems = parse(&source).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(
            &source[problems[0].span.clone()],
            "\"AWS_SECRET_ACCESS_KEY\""
        );
        assert!(problems[0].message.contains("starting with PHASEGATE_"));
        assert_eq!(
            &source[problems[1].span.clone()],
            "\"http://login.example.net\""
        );
        assert!(problems[1].message.contains("plain http"));
        for local in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080/",
            "http://localhost:9",
            "https://login.example.net",
        ] {
            let ok = parse(&plan(&format!("{FULL}\nlogin_url = \"{local}\"")));
            assert!(ok.is_ok(), "{local}: {ok:?}");
        }
        for bad in ["PHASEGATE_", "phasegate_secret", "PHASEGATE_A-B", "HOME"] {
            let source = plan(&format!(
                "tenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"{bad}\""
            ));
            assert!(parse(&source).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_simulator_setting_is_not_one_of_graph() {
        let source = plan(&format!("{FULL}\ndevices = 3"));
        let problems = parse(&source).unwrap_err();
        assert_eq!(
            problems[0].message,
            "`devices` is not a setting of the graph provider"
        );
        assert_eq!(&source[problems[0].span.clone()], "devices");
    }

    #[test]
    fn settings_kept_in_a_plan_read_back_the_same() {
        let source = plan(&format!(
            "{FULL}\nrequest_timeout = \"5s\"\ngraph_url = \"http://127.0.0.1:9/\""
        ));
        let parsed = parse(&source).unwrap();
        let plan = crate::adapters::parse_plan(
            "p.toml",
            &format!(
                "{source}\n[policy]\ncompliance = \"c\"\nplatform = \"windows\"\n\n[[phase]]\nid = \"a\"\nmode = \"report\"\ninclude = [\"G\"]\n"
            ),
        );
        let plan = plan.unwrap_or_else(|e| panic!("{}", e.headlines().join("\n")));
        assert_eq!(of(&plan.provider).unwrap(), parsed);
        assert_eq!(parsed.graph_url, "http://127.0.0.1:9");
    }
}
