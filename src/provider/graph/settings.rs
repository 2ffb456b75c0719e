//! The Graph provider's `[provider]` settings: which tenant, which app registration, how it
//! proves who it is (a secret, a certificate, a managed identity, a federated token), and the
//! endpoints (Microsoft's by default, `phasegate emulator` in tests). Parsed from the plan's text
//! by this adapter alone. A plan names where credential material is, never the material.

use std::path::PathBuf;
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

/// The Azure instance metadata service's token endpoint (plain http on a link-local address, by
/// design: it never leaves the machine).
pub const DEFAULT_IDENTITY_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// Where Azure's workload identity webhook tells a pod its federated token file is.
pub const FEDERATED_TOKEN_FILE_VARIABLE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// How phasegate signs in: exactly one per plan.
#[derive(Clone, Debug, PartialEq)]
pub enum CredentialSettings {
    /// The environment variable holding the client secret (rehearsals, small set-ups).
    ClientSecret { env: String },
    /// A certificate with its private key: PEM, or PKCS#12 (`.pfx`/`.p12`) whose password is in
    /// the environment variable `password_env`.
    Certificate {
        path: PathBuf,
        password_env: Option<String>,
    },
    /// The managed identity of the machine phasegate runs on (`client_id` names which one).
    ManagedIdentity { endpoint: String },
    /// A token another identity provider issued (a Kubernetes service account's), exchanged
    /// through the app's federated credential; `None`: the file `AZURE_FEDERATED_TOKEN_FILE` names.
    WorkloadIdentity { token_file: Option<PathBuf> },
}

impl CredentialSettings {
    /// What the credential is, for messages (never its material).
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSettings::ClientSecret { .. } => "client secret",
            CredentialSettings::Certificate { .. } => "certificate",
            CredentialSettings::ManagedIdentity { .. } => "managed identity",
            CredentialSettings::WorkloadIdentity { .. } => "workload identity federation",
        }
    }
}

/// A Microsoft 365 tenant through Microsoft Graph (or `phasegate emulator`).
#[derive(Clone, Debug, PartialEq)]
pub struct GraphSettings {
    /// Tenant GUID or verified domain.
    pub tenant: String,
    /// The app registration's client id (with a managed identity: the identity's).
    pub client_id: String,
    /// How phasegate proves it is that app; the material itself never sits in a plan.
    pub credential: CredentialSettings,
    pub graph_url: String,
    pub login_url: String,
    /// Conditional Access requests per second (the service allows 1 per tenant).
    pub ca_requests_per_second: f64,
    pub request_timeout: Duration,
    /// How devices are observed (`observe_through`).
    pub observe_through: ObserveThrough,
}

/// How the provider reads each policy's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ObserveThrough {
    /// An Intune reports export job per policy: device ids and user ids, each device once
    /// (`provider/graph/export.rs`). Microsoft's route for large tenants.
    #[default]
    Export,
    /// `deviceCompliancePolicies/{id}/deviceStatuses`: user–device pairs attributed by user
    /// principal name, paged; for tenants where the export API is not available to the app.
    DeviceStatuses,
}

impl ObserveThrough {
    pub fn as_str(self) -> &'static str {
        match self {
            ObserveThrough::Export => "export",
            ObserveThrough::DeviceStatuses => "device_statuses",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[allow(dead_code)]
    kind: String,
    tenant: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret_env: Option<Spanned<String>>,
    client_certificate: Option<Spanned<String>>,
    client_certificate_password_env: Option<Spanned<String>>,
    managed_identity: Option<Spanned<bool>>,
    identity_endpoint: Option<Spanned<String>>,
    workload_identity: Option<Spanned<bool>>,
    federated_token_file: Option<Spanned<String>>,
    graph_url: Option<Spanned<String>>,
    login_url: Option<Spanned<String>>,
    ca_requests_per_second: Option<Spanned<f64>>,
    request_timeout: Option<Spanned<String>>,
    observe_through: Option<Spanned<String>>,
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
    let credential = credential(&raw, at.clone()).map_err(|mut d| problems.append(&mut d));
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
    let observe_through = match &raw.observe_through {
        None => Some(ObserveThrough::default()),
        Some(v) => match v.get_ref().as_str() {
            "export" => Some(ObserveThrough::Export),
            "device_statuses" => Some(ObserveThrough::DeviceStatuses),
            other => {
                problems.push(Diagnostic::new(
                    v.span(),
                    format!(
                        "`observe_through` is \"export\" or \"device_statuses\", found \"{other}\""
                    ),
                ));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let observe_through = observe_through.unwrap_or_default();
    match (
        tenant,
        client_id,
        credential.ok(),
        graph_url,
        login_url,
        rate,
        timeout,
    ) {
        (
            Some(tenant),
            Some(client_id),
            Some(credential),
            Some(graph_url),
            Some(login_url),
            Some(ca_requests_per_second),
            Some(request_timeout),
        ) => Ok(GraphSettings {
            tenant,
            client_id,
            credential,
            graph_url,
            login_url,
            ca_requests_per_second,
            request_timeout,
            observe_through,
        }),
        _ => Err(problems),
    }
}

/// The one credential the settings give, or why there is none.
fn credential(
    raw: &Raw,
    table: std::ops::Range<usize>,
) -> Result<CredentialSettings, Vec<Diagnostic>> {
    let given: Vec<(&str, std::ops::Range<usize>)> = [
        (
            "client_secret_env",
            raw.client_secret_env.as_ref().map(Spanned::span),
        ),
        (
            "client_certificate",
            raw.client_certificate.as_ref().map(Spanned::span),
        ),
        (
            "managed_identity",
            raw.managed_identity.as_ref().map(Spanned::span),
        ),
        (
            "workload_identity",
            raw.workload_identity.as_ref().map(Spanned::span),
        ),
    ]
    .into_iter()
    .filter_map(|(key, span)| Some((key, span?)))
    .collect();
    let mut problems = Vec::new();
    let stray = |key: &str, span: std::ops::Range<usize>, belongs: &str| {
        Diagnostic::new(
            span,
            format!("`{key}` is a setting of `{belongs}`, which is not given"),
        )
    };
    let chosen = match given.as_slice() {
        [] => {
            return Err(vec![Diagnostic::new(
                table,
                "the graph provider needs a credential: `client_secret_env`, `client_certificate`, \
                 `managed_identity = true` or `workload_identity = true`",
            )]);
        }
        [(key, _)] => *key,
        [_, (second, span), ..] => {
            return Err(vec![Diagnostic::new(
                span.clone(),
                format!(
                    "`{second}` is a second credential: give exactly one of `client_secret_env`, \
                     `client_certificate`, `managed_identity`, `workload_identity`"
                ),
            )]);
        }
    };
    if chosen != "client_certificate"
        && let Some(v) = &raw.client_certificate_password_env
    {
        problems.push(stray(
            "client_certificate_password_env",
            v.span(),
            "client_certificate",
        ));
    }
    if chosen != "managed_identity"
        && let Some(v) = &raw.identity_endpoint
    {
        problems.push(stray("identity_endpoint", v.span(), "managed_identity"));
    }
    if chosen != "workload_identity"
        && let Some(v) = &raw.federated_token_file
    {
        problems.push(stray("federated_token_file", v.span(), "workload_identity"));
    }
    let chosen = match chosen {
        "client_secret_env" => secret(raw.client_secret_env.as_ref().expect("given")),
        "client_certificate" => certificate(raw),
        "managed_identity" => managed_identity(raw),
        _ => workload_identity(raw),
    };
    match chosen {
        Ok(credential) if problems.is_empty() => Ok(credential),
        Ok(_) => Err(problems),
        Err(mut more) => {
            problems.append(&mut more);
            Err(problems)
        }
    }
}

fn secret(value: &Spanned<String>) -> Result<CredentialSettings, Vec<Diagnostic>> {
    if value.get_ref().trim().is_empty() {
        return Err(vec![Diagnostic::new(
            value.span(),
            "`client_secret_env` must not be empty",
        )]);
    }
    let env = adapters::secret_variable(value, "client_secret_env").map_err(|d| vec![d])?;
    Ok(CredentialSettings::ClientSecret { env })
}

fn certificate(raw: &Raw) -> Result<CredentialSettings, Vec<Diagnostic>> {
    let path = absolute_path(
        raw.client_certificate.as_ref().expect("given"),
        "client_certificate",
    );
    let password_env = raw
        .client_certificate_password_env
        .as_ref()
        .map(|v| adapters::secret_variable(v, "client_certificate_password_env"))
        .transpose();
    match (path, password_env) {
        (Ok(path), Ok(password_env)) => Ok(CredentialSettings::Certificate { path, password_env }),
        (path, password_env) => Err(path.err().into_iter().chain(password_env.err()).collect()),
    }
}

fn managed_identity(raw: &Raw) -> Result<CredentialSettings, Vec<Diagnostic>> {
    let flag = raw.managed_identity.as_ref().expect("given");
    if !flag.get_ref() {
        return Err(vec![Diagnostic::new(
            flag.span(),
            "`managed_identity = false` chooses no credential: remove it, or give another",
        )]);
    }
    let endpoint = match &raw.identity_endpoint {
        None => DEFAULT_IDENTITY_ENDPOINT.to_string(),
        Some(v) if is_metadata_service(v.get_ref()) => v.get_ref().trim().to_string(),
        Some(v) => adapters::endpoint_url(v, "identity_endpoint").map_err(|d| vec![d])?,
    };
    Ok(CredentialSettings::ManagedIdentity { endpoint })
}

/// The instance metadata service answers plain http on its link-local address only.
fn is_metadata_service(url: &str) -> bool {
    reqwest::Url::parse(url.trim())
        .is_ok_and(|u| u.scheme() == "http" && u.host_str() == Some("169.254.169.254"))
}

fn workload_identity(raw: &Raw) -> Result<CredentialSettings, Vec<Diagnostic>> {
    let flag = raw.workload_identity.as_ref().expect("given");
    if !flag.get_ref() {
        return Err(vec![Diagnostic::new(
            flag.span(),
            "`workload_identity = false` chooses no credential: remove it, or give another",
        )]);
    }
    let token_file = raw
        .federated_token_file
        .as_ref()
        .map(|v| absolute_path(v, "federated_token_file"))
        .transpose()
        .map_err(|d| vec![d])?;
    Ok(CredentialSettings::WorkloadIdentity { token_file })
}

/// A file a long-running daemon reads: relative to nothing but the file system's root.
fn absolute_path(value: &Spanned<String>, key: &str) -> Result<PathBuf, Diagnostic> {
    let path = PathBuf::from(value.get_ref().trim());
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(Diagnostic::new(
            value.span(),
            format!(
                "`{key}` must be an absolute path, found `{}`: phasegate may run from any \
                 directory (a daemon, a pipeline)",
                value.get_ref()
            ),
        ))
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
    fn observation_goes_through_exports_unless_the_plan_says_device_statuses() {
        assert_eq!(
            parse(&plan(FULL)).unwrap().observe_through,
            ObserveThrough::Export
        );
        let through = |value: &str| parse(&plan(&format!("{FULL}\nobserve_through = \"{value}\"")));
        assert_eq!(
            through("device_statuses").unwrap().observe_through,
            ObserveThrough::DeviceStatuses
        );
        let errors = through("pages").unwrap_err();
        assert!(errors[0].message.contains("observe_through"), "{errors:?}");
    }

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
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("the graph provider needs a credential")),
            "{messages:?}"
        );
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

    const APP: &str = "tenant = \"t\"\nclient_id = \"c\"";

    fn credential_of(lines: &str) -> Result<CredentialSettings, Vec<String>> {
        parse(&plan(&format!("{APP}\n{lines}")))
            .map(|s| s.credential)
            .map_err(|p| p.into_iter().map(|d| d.message).collect())
    }

    #[test]
    fn each_credential_reads_its_own_settings() {
        assert_eq!(
            credential_of(
                "client_certificate = \"/etc/pg/app.p12\"\nclient_certificate_password_env = \"PHASEGATE_P12\""
            ),
            Ok(CredentialSettings::Certificate {
                path: PathBuf::from("/etc/pg/app.p12"),
                password_env: Some("PHASEGATE_P12".into())
            })
        );
        assert_eq!(
            credential_of("managed_identity = true"),
            Ok(CredentialSettings::ManagedIdentity {
                endpoint: DEFAULT_IDENTITY_ENDPOINT.into()
            })
        );
        assert_eq!(
            credential_of("workload_identity = true"),
            Ok(CredentialSettings::WorkloadIdentity { token_file: None })
        );
        assert_eq!(
            credential_of("workload_identity = true\nfederated_token_file = \"/var/run/token\""),
            Ok(CredentialSettings::WorkloadIdentity {
                token_file: Some(PathBuf::from("/var/run/token"))
            })
        );
    }

    #[test]
    fn exactly_one_credential_with_only_its_own_settings() {
        let none = credential_of("").unwrap_err();
        assert!(
            none[0].starts_with("the graph provider needs a credential"),
            "{none:?}"
        );
        let two =
            credential_of("client_secret_env = \"PHASEGATE_S\"\nclient_certificate = \"/a.pem\"")
                .unwrap_err();
        assert!(
            two[0].contains("`client_certificate` is a second credential"),
            "{two:?}"
        );
        let stray = credential_of(
            "client_secret_env = \"PHASEGATE_S\"\nclient_certificate_password_env = \"PHASEGATE_P\"",
        )
        .unwrap_err();
        assert_eq!(
            stray,
            [
                "`client_certificate_password_env` is a setting of `client_certificate`, which is not given"
            ]
        );
        let relative = credential_of("client_certificate = \"certs/app.pem\"").unwrap_err();
        assert!(
            relative[0].contains("must be an absolute path"),
            "{relative:?}"
        );
        let password = credential_of(
            "client_certificate = \"/a.p12\"\nclient_certificate_password_env = \"HOME\"",
        )
        .unwrap_err();
        assert!(
            password[0].contains("starting with PHASEGATE_"),
            "{password:?}"
        );
        let off = credential_of("managed_identity = false").unwrap_err();
        assert!(off[0].contains("chooses no credential"), "{off:?}");
    }

    #[test]
    fn the_metadata_service_is_plain_http_on_its_link_local_address_only() {
        for allowed in [
            "http://169.254.169.254/metadata/identity/oauth2/token",
            "http://127.0.0.1:8080/metadata/identity/oauth2/token",
            "https://identity.example/token",
        ] {
            let found = credential_of(&format!(
                "managed_identity = true\nidentity_endpoint = \"{allowed}\""
            ));
            assert!(found.is_ok(), "{allowed}: {found:?}");
        }
        let elsewhere = credential_of(
            "managed_identity = true\nidentity_endpoint = \"http://metadata.example/token\"",
        )
        .unwrap_err();
        assert!(elsewhere[0].contains("plain http"), "{elsewhere:?}");
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
