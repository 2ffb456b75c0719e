//! The emulated tenant: directory, compliance policies, Conditional Access, tokens, the clock,
//! the ledger of writes, and the dispatcher that answers Graph requests over them.
//!
//! Devices and their compliance come from the simulated fleet ([`Fleet`]) with the same seed as
//! `kind = "simulator"`, driven by the configuration phasegate writes through Graph: a device is
//! evaluated once the compliance policy is assigned to its user, its owner is notified once the
//! policy has a `notification` action, and it is blocked once an enabled Conditional Access
//! policy requiring compliant devices covers its user.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::faults::{Fault, fault_for};
use crate::domain::gate::DeviceState;
use crate::domain::plan::{Mode, Platform};
use crate::domain::time::Timestamp;
use crate::graph::{
    ALL_USERS_ID, ActionItem, AssignmentTarget, CaUsers, NIL_GUID, encode_query_value,
    format_inner_date, format_time,
};
use crate::provider::simulator::SIMULATED_EPOCH;
use crate::provider::simulator::fleet::{DetailedReport, Fleet, GROUPS, Membership, ResolvedEntry};

/// How the emulator is set up (`phasegate emulator` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub devices: u32,
    pub seed: u64,
    /// Share of Graph requests that misbehave (0.0 to 1.0).
    pub faults: f64,
    /// Which requests misbehave, and how (the tenant itself comes from `seed`).
    pub fault_seed: u64,
    /// `None`: the clock moves only when a client asks (`POST /_emulator/clock`); `Some(x)`: it
    /// runs x times faster than real time.
    pub time_scale: Option<f64>,
    pub tenant_domain: String,
    pub client_id: String,
    pub client_secret: String,
    pub token_lifetime: Duration,
    /// A token stops working after this many Graph requests (rehearses expiry mid-rollout).
    pub token_uses: Option<u64>,
    /// Conditional Access requests allowed per second (the real service allows 1 per tenant).
    pub ca_requests_per_second: f64,
    pub remediation_half_life: Duration,
}

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// `http://host:port`, for building `@odata.nextLink`.
    pub base_url: String,
}

pub enum Body {
    Empty,
    Json(Value),
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// Close the connection instead of answering (the request may have been applied).
    pub drop_connection: bool,
    /// Answer only after this long.
    pub delay: Option<Duration>,
}

impl Response {
    fn json(status: u16, body: Value) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Json(body),
            drop_connection: false,
            delay: None,
        }
    }

    fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
            drop_connection: false,
            delay: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

enum Clock {
    Manual(Timestamp),
    Scaled {
        started: Instant,
        origin: Timestamp,
        factor: f64,
    },
}

struct Policy {
    id: String,
    name: String,
    odata_type: &'static str,
    platform: Platform,
    created: Timestamp,
    modified: Timestamp,
    version: i64,
    assignments: Vec<AssignmentTarget>,
    actions: Vec<(String, ActionItem)>,
}

struct CaPolicy {
    id: String,
    display_name: String,
    state: String,
    users: CaUsers,
    /// `conditions` without `users`, as given.
    other_conditions: serde_json::Map<String, Value>,
    grant_controls: Value,
    created: Timestamp,
    modified: Option<Timestamp>,
}

struct Group {
    id: String,
    name: &'static str,
    bit: u16,
}

#[derive(Clone)]
struct LedgerEntry {
    sequence: u64,
    at: Timestamp,
    method: String,
    path: String,
    body_sha256: String,
    status: u16,
    connection_dropped: bool,
}

type Statuses = Arc<Vec<(usize, DetailedReport)>>;

pub struct Tenant {
    settings: Settings,
    fleet: Fleet,
    clock: Clock,
    tenant_id: String,
    groups: Vec<Group>,
    policies: Vec<Policy>,
    ca_policies: Vec<CaPolicy>,
    templates: Vec<(String, String)>,
    /// Per platform, every configuration the policy has had, as the fleet model reads it.
    histories: BTreeMap<&'static str, Vec<ResolvedEntry>>,
    config_version: u64,
    /// Issued tokens: when they expire and how many requests they served.
    tokens: BTreeMap<String, (Timestamp, u64)>,
    tokens_issued: u64,
    ledger: Vec<LedgerEntry>,
    /// Webhook deliveries received at `/_emulator/webhook`: (idempotency key, body digest).
    deliveries: Vec<(String, String)>,
    requests: u64,
    /// Every HTTP request answered (Graph, token and control), for request ids.
    answered: u64,
    faults_injected: u64,
    last_ca_request: Option<Instant>,
    status_cache: Option<(String, Timestamp, u64, Statuses)>,
}

/// A GUID derived from the seed and a name: the same tenant every time.
pub fn guid(seed: u64, kind: &str, n: impl std::fmt::Display) -> String {
    let digest = Sha256::digest(format!("{seed}:{kind}:{n}").as_bytes());
    let h = hex::encode(&digest[..16]);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn graph_error(
    status: u16,
    code: &str,
    message: &str,
    now: Timestamp,
    request_id: &str,
) -> Response {
    Response::json(
        status,
        json!({
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": format_inner_date(now),
                    "request-id": request_id,
                    "client-request-id": request_id,
                }
            }
        }),
    )
}

/// Intune wraps its own error document, serialized, inside `error.message`.
fn intune_error(
    status: u16,
    code: &str,
    message: &str,
    now: Timestamp,
    request_id: &str,
) -> Response {
    let inner = json!({
        "_version": 3,
        "Message": format!("{message} - Operation ID (for customer support): 00000000-0000-0000-0000-000000000000 - Activity ID: {request_id} - Url: https://fef.emulator.manage.microsoft.com/StatelessDeviceConfigurationFEService/deviceManagement"),
        "CustomApiErrorPhrase": "",
        "RetryAfter": null,
        "ErrorSourceService": "",
        "HttpHeaders": "{}"
    });
    let text = serde_json::to_string_pretty(&inner)
        .expect("json serializes")
        .replace('\n', "\r\n");
    graph_error(status, code, &text, now, request_id)
}

fn policy_odata_type(platform: Platform) -> &'static str {
    match platform {
        Platform::Windows => "#microsoft.graph.windows10CompliancePolicy",
        Platform::Ios => "#microsoft.graph.iosCompliancePolicy",
        Platform::Android => "#microsoft.graph.androidWorkProfileCompliancePolicy",
        Platform::Macos => "#microsoft.graph.macOSCompliancePolicy",
    }
}

/// The compliance policies every emulated tenant starts with, one per platform.
pub const POLICY_NAMES: [(Platform, &str); 4] = [
    (Platform::Windows, "Windows 10/11 compliance baseline"),
    (Platform::Ios, "iOS compliance baseline"),
    (
        Platform::Android,
        "Android Enterprise work profile baseline",
    ),
    (Platform::Macos, "macOS compliance baseline"),
];
pub const CA_POLICY_NAME: &str = "Require compliant device for Office 365";
pub const TEMPLATE_NAME: &str = "Compliance rollout - action required";

impl Tenant {
    pub fn new(settings: Settings) -> Tenant {
        let seed = settings.seed;
        let fleet = Fleet::new(
            seed,
            settings.devices,
            settings.remediation_half_life,
            SIMULATED_EPOCH,
        );
        let clock = match settings.time_scale {
            None => Clock::Manual(SIMULATED_EPOCH),
            Some(factor) => Clock::Scaled {
                started: Instant::now(),
                origin: SIMULATED_EPOCH,
                factor,
            },
        };
        let created = SIMULATED_EPOCH.minus(Duration::from_secs(30 * 86_400));
        let groups = GROUPS
            .iter()
            .enumerate()
            .skip(1) // "All Users" is the virtual all-users target, not a directory group.
            .map(|(i, name)| Group {
                id: guid(seed, "group", name),
                name,
                bit: 1 << i,
            })
            .collect();
        let policies = POLICY_NAMES
            .iter()
            .map(|(platform, name)| {
                let id = guid(seed, "policy", platform);
                Policy {
                    actions: vec![(
                        guid(seed, "action", &id),
                        stored_action(ActionItem::block(0)),
                    )],
                    id,
                    name: name.to_string(),
                    odata_type: policy_odata_type(*platform),
                    platform: *platform,
                    created,
                    modified: created,
                    version: 1,
                    assignments: Vec::new(),
                }
            })
            .collect();
        let ca_policies = vec![CaPolicy {
            id: guid(seed, "ca", CA_POLICY_NAME),
            display_name: CA_POLICY_NAME.to_string(),
            state: "disabled".into(),
            users: CaUsers {
                include_users: vec!["None".into()],
                ..CaUsers::default()
            },
            other_conditions: json!({
                "clientAppTypes": ["all"],
                "applications": {"includeApplications": ["Office365"], "excludeApplications": []},
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
            grant_controls: json!({"operator": "OR", "builtInControls": ["compliantDevice"]}),
            created,
            modified: None,
        }];
        let templates = vec![(
            guid(seed, "template", TEMPLATE_NAME),
            TEMPLATE_NAME.to_string(),
        )];
        let mut tenant = Tenant {
            tenant_id: guid(seed, "tenant", &settings.tenant_domain),
            settings,
            fleet,
            clock,
            groups,
            policies,
            ca_policies,
            templates,
            histories: BTreeMap::new(),
            config_version: 0,
            tokens: BTreeMap::new(),
            tokens_issued: 0,
            ledger: Vec::new(),
            deliveries: Vec::new(),
            requests: 0,
            answered: 0,
            faults_injected: 0,
            last_ca_request: None,
            status_cache: None,
        };
        tenant.record_configuration();
        tenant
    }

    pub fn now(&self) -> Timestamp {
        match &self.clock {
            Clock::Manual(now) => *now,
            Clock::Scaled {
                started,
                origin,
                factor,
            } => origin.plus(started.elapsed().mul_f64(*factor)),
        }
    }

    fn clock_header(&self) -> String {
        match &self.clock {
            Clock::Manual(_) => "manual".to_string(),
            Clock::Scaled { factor, .. } => format!("scaled; factor={factor}"),
        }
    }

    fn user_id(&self, user: usize) -> String {
        guid(self.settings.seed, "user", user)
    }

    fn user_principal_name(&self, user: usize) -> String {
        let domain = &self.settings.tenant_domain;
        if self.fleet.user_groups(user) & 0b10 != 0 {
            format!("breakglass{}@{domain}", user)
        } else {
            format!("user{user:06}@{domain}")
        }
    }

    fn group_bits(&self, id: &str) -> Option<u16> {
        if id == ALL_USERS_ID {
            return Some(1);
        }
        self.groups.iter().find(|g| g.id == id).map(|g| g.bit)
    }

    /// Turns the current configuration into what the fleet model reads, for every platform.
    fn record_configuration(&mut self) {
        self.config_version += 1;
        let now = self.now();
        let enforced: Vec<Membership> = self
            .ca_policies
            .iter()
            .filter(|ca| {
                ca.state == "enabled"
                    && ca.grant_controls["builtInControls"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|v| v == "compliantDevice"))
            })
            .map(|ca| self.ca_membership(&ca.users))
            .collect();
        for policy in &self.policies {
            let mut include = 0u16;
            let mut exclude = 0u16;
            for target in &policy.assignments {
                match target {
                    AssignmentTarget::Group { group_id } => {
                        include |= self.group_bits(group_id).unwrap_or(0)
                    }
                    AssignmentTarget::Exclusion { group_id } => {
                        exclude |= self.group_bits(group_id).unwrap_or(0)
                    }
                    AssignmentTarget::AllUsers | AssignmentTarget::AllDevices => include |= 1,
                }
            }
            let assigned = Membership { include, exclude };
            let block_grace_ms = policy
                .actions
                .iter()
                .find(|(_, a)| a.action_type == "block")
                .map_or(0, |(_, a)| a.grace_period_hours.max(0) as u64 * 3_600_000);
            let notifies = policy
                .actions
                .iter()
                .any(|(_, a)| a.action_type == "notification");
            let base = if notifies { Mode::Notify } else { Mode::Report };
            let mut assignments = vec![(assigned, base, block_grace_ms)];
            assignments.extend(enforced.iter().map(|m| (*m, Mode::Enforce, block_grace_ms)));
            self.histories
                .entry(policy.platform.as_str())
                .or_default()
                .push(ResolvedEntry {
                    at: now,
                    assignments,
                    assigned: Some(assigned),
                });
        }
        self.status_cache = None;
    }

    fn ca_membership(&self, users: &CaUsers) -> Membership {
        let mut include = 0u16;
        if users.include_users.iter().any(|u| u == "All") {
            include |= 1;
        }
        for id in &users.include_groups {
            include |= self.group_bits(id).unwrap_or(0);
        }
        let exclude = users
            .exclude_groups
            .iter()
            .map(|id| self.group_bits(id).unwrap_or(0))
            .fold(0, |a, b| a | b);
        Membership { include, exclude }
    }

    /// Answers one HTTP request.
    pub fn handle(&mut self, request: &Request) -> Response {
        self.answered += 1;
        let request_id = guid(self.settings.seed, "request", self.answered);
        let now = self.now();
        let mut response = if request.path.starts_with("/_emulator/") {
            self.control(request)
        } else if request.path.ends_with("/oauth2/v2.0/token") {
            self.token(request, now)
        } else if let Some(rest) = request
            .path
            .strip_prefix("/v1.0")
            .or_else(|| request.path.strip_prefix("/beta"))
        {
            self.graph(request, rest, &request_id)
        } else {
            graph_error(404, "NotFound", "unknown endpoint", now, &request_id)
        };
        let now = self.now();
        response = response
            .header("Date", httpdate::fmt_http_date(now.to_system_time()))
            .header("request-id", request_id.clone())
            .header(
                "client-request-id",
                request
                    .headers
                    .get("client-request-id")
                    .cloned()
                    .unwrap_or(request_id),
            )
            .header("X-Phasegate-Emulator-Clock", self.clock_header())
            .header("X-Phasegate-Emulator-Now", format_time(now));
        response
    }

    fn control(&mut self, request: &Request) -> Response {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/_emulator/ledger") => {
                let entries: Vec<Value> = self
                    .ledger
                    .iter()
                    .map(|e| {
                        json!({
                            "sequence": e.sequence,
                            "at": format_time(e.at),
                            "method": e.method,
                            "path": e.path,
                            "bodySha256": e.body_sha256,
                            "status": e.status,
                            "connectionDropped": e.connection_dropped,
                        })
                    })
                    .collect();
                Response::json(200, json!({ "value": entries }))
            }
            ("GET", "/_emulator/state") => Response::json(200, self.state()),
            ("GET", "/_emulator/clock") => Response::json(
                200,
                json!({"now": format_time(self.now()), "clock": self.clock_header()}),
            ),
            ("POST", "/_emulator/clock") => self.set_clock(&request.body),
            ("POST", "/_emulator/webhook") => {
                let key = request
                    .headers
                    .get("idempotency-key")
                    .cloned()
                    .unwrap_or_default();
                self.deliveries
                    .push((key, hex::encode(Sha256::digest(&request.body))));
                Response::empty(204)
            }
            ("GET", "/_emulator/deliveries") => {
                let items: Vec<Value> = self
                    .deliveries
                    .iter()
                    .map(|(key, digest)| json!({"idempotencyKey": key, "bodySha256": digest}))
                    .collect();
                Response::json(200, json!({ "value": items }))
            }
            ("POST", "/_emulator/revoke-tokens") => {
                let revoked = self.tokens.len();
                self.tokens.clear();
                Response::json(200, json!({ "revoked": revoked }))
            }
            _ => Response::json(404, json!({"error": "unknown emulator endpoint"})),
        }
    }

    fn set_clock(&mut self, body: &[u8]) -> Response {
        let Clock::Manual(current) = self.clock else {
            return Response::json(
                409,
                json!({"error": "the clock runs on its own (--time-scale); it cannot be set"}),
            );
        };
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let target = parsed["advanceTo"]
            .as_str()
            .and_then(crate::graph::parse_time)
            .or_else(|| {
                parsed["advanceBySeconds"]
                    .as_u64()
                    .map(|s| current.plus(Duration::from_secs(s)))
            });
        match target {
            Some(at) if at >= current => {
                self.clock = Clock::Manual(at);
                self.status_cache = None;
                Response::json(200, json!({"now": format_time(at)}))
            }
            // The clock never goes back: asking for an earlier time is answered with the present.
            Some(_) => Response::json(200, json!({"now": format_time(current)})),
            None => Response::json(
                400,
                json!({"error": "expected {\"advanceTo\": \"<date>\"} or {\"advanceBySeconds\": n}"}),
            ),
        }
    }

    fn state(&self) -> Value {
        let counts: Vec<Value> = self
            .fleet
            .platform_counts()
            .iter()
            .map(|(p, n)| json!({"platform": p.as_str(), "devices": n}))
            .collect();
        let policies: Vec<Value> = self
            .policies
            .iter()
            .map(|p| {
                let statuses = self.fleet.statuses(
                    p.platform,
                    self.histories
                        .get(p.platform.as_str())
                        .map_or(&[][..], Vec::as_slice),
                    self.now(),
                );
                let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
                for (_, report) in statuses.iter() {
                    *by_state.entry(status_name(report)).or_default() += 1;
                    if report.report.blocked {
                        *by_state.entry("blocked").or_default() += 1;
                    }
                }
                json!({
                    "id": p.id,
                    "displayName": p.name,
                    "platform": p.platform.as_str(),
                    "version": p.version,
                    "assignments": p.assignments,
                    "actions": p.actions.iter().map(|(_, a)| a).collect::<Vec<_>>(),
                    "assignedDevices": statuses.len(),
                    "deviceStatuses": by_state,
                })
            })
            .collect();
        let ca: Vec<Value> = self
            .ca_policies
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "displayName": c.display_name,
                    "state": c.state,
                    "users": c.users,
                })
            })
            .collect();
        json!({
            "now": format_time(self.now()),
            "clock": self.clock_header(),
            "tenantId": self.tenant_id,
            "devices": self.fleet.device_count(),
            "users": self.fleet.user_count(),
            "platforms": counts,
            "groups": self.groups.iter().map(|g| json!({"id": g.id, "displayName": g.name})).collect::<Vec<_>>(),
            "policies": policies,
            "conditionalAccess": ca,
            "requests": self.requests,
            "faultsInjected": self.faults_injected,
            "writes": self.ledger.len(),
        })
    }

    fn token(&mut self, request: &Request, now: Timestamp) -> Response {
        let tenant = request
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let form: BTreeMap<String, String> = url_form(&request.body);
        let oauth_error = |status: u16, error: &str, code: u32, description: &str| {
            let trace = guid(0, "trace", description.len());
            Response::json(
                status,
                json!({
                    "error": error,
                    "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {trace}\r\nTimestamp: {}", now.rfc3339().replace('T', " ")),
                    "error_codes": [code],
                    "timestamp": now.rfc3339().replace('T', " "),
                    "trace_id": trace,
                    "correlation_id": trace,
                }),
            )
        };
        if tenant != self.settings.tenant_domain && tenant != self.tenant_id {
            return oauth_error(
                400,
                "invalid_request",
                90002,
                &format!(
                    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
            );
        }
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return oauth_error(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
        if form.get("scope").map(String::as_str) != Some("https://graph.microsoft.com/.default") {
            return oauth_error(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid.",
            );
        }
        if form.get("client_id") != Some(&self.settings.client_id) {
            return oauth_error(
                400,
                "unauthorized_client",
                700016,
                "Application was not found in the directory.",
            );
        }
        if form.get("client_secret") != Some(&self.settings.client_secret) {
            return oauth_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            );
        }
        self.tokens_issued += 1;
        let token = format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{}.{}",
            guid(self.settings.seed, "token", self.tokens_issued),
            hex::encode(&Sha256::digest(self.tokens_issued.to_be_bytes())[..12])
        );
        let lifetime = self.settings.token_lifetime;
        self.tokens.insert(token.clone(), (now.plus(lifetime), 0));
        Response::json(
            200,
            json!({
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs(),
                "ext_expires_in": lifetime.as_secs(),
                "access_token": token,
            }),
        )
    }

    fn authorized(&mut self, request: &Request) -> bool {
        let now = self.now();
        let uses = self.settings.token_uses;
        let Some(token) = request
            .headers
            .get("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        match self.tokens.get_mut(token) {
            Some((expires, used)) if now < *expires && uses.is_none_or(|max| *used < max) => {
                *used += 1;
                true
            }
            _ => false,
        }
    }

    fn graph(&mut self, request: &Request, rest: &str, request_id: &str) -> Response {
        let now = self.now();
        if !self.authorized(request) {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
                now,
                request_id,
            )
            .header(
                "WWW-Authenticate",
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
            );
        }
        if rest == "/$batch" && request.method == "POST" {
            return self.batch(request, request_id);
        }
        let body: Option<Value> = if request.body.is_empty() {
            None
        } else {
            match serde_json::from_slice(&request.body) {
                Ok(value) => Some(value),
                Err(e) => {
                    return graph_error(
                        400,
                        "BadRequest",
                        &format!("Unable to read JSON request payload: {e}"),
                        now,
                        request_id,
                    );
                }
            }
        };
        self.graph_call(
            &request.method,
            rest,
            &request.query,
            &request.headers,
            body.as_ref(),
            &request.base_url,
            request_id,
        )
    }

    /// One Graph call, through faults and throttling, then routing.
    #[allow(clippy::too_many_arguments)]
    fn graph_call(
        &mut self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        headers: &BTreeMap<String, String>,
        body: Option<&Value>,
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let index = self.requests;
        self.requests += 1;
        let writes = method != "GET";
        let fault = fault_for(
            self.settings.fault_seed,
            self.settings.faults,
            index,
            writes,
        );
        if fault.is_some() {
            self.faults_injected += 1;
        }
        match fault {
            Some(Fault::ThrottledWithRetryAfter(seconds)) => {
                return throttled(now, request_id).header("Retry-After", format!("{seconds}"));
            }
            Some(Fault::ThrottledBare) => return throttled(now, request_id),
            Some(Fault::Unavailable) => {
                return graph_error(
                    503,
                    "ServiceUnavailable",
                    "The service is temporarily unavailable. Please try again later.",
                    now,
                    request_id,
                );
            }
            _ => {}
        }
        if path.starts_with("/identity/conditionalAccess") {
            let min_gap =
                Duration::from_secs_f64(1.0 / self.settings.ca_requests_per_second.max(0.001));
            if self
                .last_ca_request
                .is_some_and(|last| last.elapsed() < min_gap)
            {
                return graph_error(
                    429,
                    "TooManyRequests",
                    "Too many requests.",
                    now,
                    request_id,
                );
            }
            self.last_ca_request = Some(Instant::now());
        }
        let ledger_before = self.ledger.len();
        let mut response = self.route(method, path, query, headers, body, base_url, request_id);
        let applied = self.ledger.len() > ledger_before;
        match fault {
            Some(Fault::Slow(delay)) => response.delay = Some(delay),
            Some(Fault::DropAfterApply) if applied => {
                response.drop_connection = true;
                if let Some(entry) = self.ledger.last_mut() {
                    entry.connection_dropped = true;
                }
            }
            Some(Fault::DropAfterApply) => {
                response.drop_connection = true;
            }
            _ => {}
        }
        response
    }

    fn write(&mut self, method: &str, path: &str, body: Option<&Value>, status: u16) {
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("json serializes"))
            .unwrap_or_default();
        self.ledger.push(LedgerEntry {
            sequence: self.ledger.len() as u64 + 1,
            at: self.now(),
            method: method.to_string(),
            path: path.to_string(),
            body_sha256: hex::encode(Sha256::digest(&bytes)),
            status,
            connection_dropped: false,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        headers: &BTreeMap<String, String>,
        body: Option<&Value>,
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let q = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let filter = match q("$filter").map(parse_display_name_filter) {
            Some(None) => {
                return graph_error(
                    400,
                    "BadRequest",
                    "Invalid filter clause: only displayName eq '...' is supported here",
                    now,
                    request_id,
                );
            }
            Some(Some(name)) => Some(name),
            None => None,
        };
        match (method, segments.as_slice()) {
            ("GET", ["groups"]) => {
                let items: Vec<Value> = self
                    .groups
                    .iter()
                    .filter(|g| {
                        filter
                            .as_deref()
                            .is_none_or(|f| g.name.eq_ignore_ascii_case(f))
                    })
                    .map(|g| json!({"id": g.id, "displayName": g.name}))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#groups", graph_root(base_url)), "value": items}),
                )
            }
            ("GET", ["groups", id]) => match self.groups.iter().find(|g| g.id == *id) {
                Some(g) => Response::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#groups/$entity", graph_root(base_url)), "id": g.id, "displayName": g.name}),
                ),
                None => graph_error(
                    404,
                    "Request_ResourceNotFound",
                    &format!(
                        "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
                    ),
                    now,
                    request_id,
                ),
            },
            ("GET", ["groups", id, "transitiveMembers", cast @ ..]) => {
                self.members(id, cast, q, headers, path, query, base_url, request_id)
            }
            ("GET", ["deviceManagement", "deviceCompliancePolicies"]) => {
                let expand = q("$expand").is_some();
                let items: Vec<Value> = self
                    .policies
                    .iter()
                    .filter(|p| {
                        filter
                            .as_deref()
                            .is_none_or(|f| p.name.eq_ignore_ascii_case(f))
                    })
                    .map(|p| self.policy_json(p, expand, base_url))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies", graph_root(base_url)), "value": items}),
                )
            }
            ("GET", ["deviceManagement", "notificationMessageTemplates"]) => {
                let items: Vec<Value> = self
                    .templates
                    .iter()
                    .filter(|(_, name)| filter.as_deref().is_none_or(|f| name.eq_ignore_ascii_case(f)))
                    .map(|(id, name)| json!({"@odata.type": "#microsoft.graph.notificationMessageTemplate", "id": id, "displayName": name, "defaultLocale": "en-us", "brandingOptions": "includeCompanyLogo,includeCompanyName,includeContactInformation", "roleScopeTagIds": ["0"], "lastModifiedDateTime": format_time(SIMULATED_EPOCH)}))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#deviceManagement/notificationMessageTemplates", graph_root(base_url)), "value": items}),
                )
            }
            (
                _,
                [
                    "deviceManagement",
                    "deviceCompliancePolicies",
                    id,
                    rest @ ..,
                ],
            ) => {
                let Some(idx) = self.policies.iter().position(|p| p.id == *id) else {
                    return intune_error(
                        404,
                        "ResourceNotFound",
                        &format!("Resource not found: deviceCompliancePolicy {id}"),
                        now,
                        request_id,
                    );
                };
                self.policy_route(
                    method, idx, rest, q, body, path, query, base_url, request_id,
                )
            }
            ("GET", ["identity", "conditionalAccess", "policies"]) => {
                let items: Vec<Value> = self
                    .ca_policies
                    .iter()
                    .filter(|c| {
                        filter
                            .as_deref()
                            .is_none_or(|f| c.display_name.eq_ignore_ascii_case(f))
                    })
                    .map(ca_json)
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#identity/conditionalAccess/policies", graph_root(base_url)), "value": items}),
                )
            }
            ("POST", ["identity", "conditionalAccess", "policies"]) => {
                self.create_ca(body, path, base_url, request_id)
            }
            (_, ["identity", "conditionalAccess", "policies", id]) => {
                self.ca_route(method, id, body, path, base_url, request_id)
            }
            _ => graph_error(
                400,
                "No method match route template",
                &format!(
                    "No OData route exists that match template ~/{} with http verb {method} for request {path}.",
                    segments.join("/")
                ),
                now,
                request_id,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn members<'q>(
        &self,
        id: &str,
        cast: &[&str],
        q: impl Fn(&str) -> Option<&'q str>,
        headers: &BTreeMap<String, String>,
        path: &str,
        query: &[(String, String)],
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let Some(group) = self.groups.iter().find(|g| g.id == id) else {
            return graph_error(
                404,
                "Request_ResourceNotFound",
                &format!(
                    "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
                ),
                now,
                request_id,
            );
        };
        let cast_to_user = cast == ["microsoft.graph.user"];
        if !cast.is_empty() && !cast_to_user {
            return graph_error(
                400,
                "Request_BadRequest",
                "Unsupported cast.",
                now,
                request_id,
            );
        }
        let advanced = headers
            .get("consistencylevel")
            .is_some_and(|v| v.eq_ignore_ascii_case("eventual"))
            && q("$count") == Some("true");
        if cast_to_user && !advanced {
            return graph_error(
                400,
                "Request_UnsupportedQuery",
                "The specified filter to the reference property query is currently not supported; casts need ConsistencyLevel: eventual and $count=true.",
                now,
                request_id,
            );
        }
        let top = match q("$top").map(str::parse::<usize>) {
            None => 100,
            Some(Ok(n)) if (1..=999).contains(&n) => n,
            Some(_) => {
                return graph_error(
                    400,
                    "Request_UnsupportedQuery",
                    &format!(
                        "Invalid page size specified: '{}'. Must be between 1 and 999 inclusive.",
                        q("$top").unwrap_or("")
                    ),
                    now,
                    request_id,
                );
            }
        };
        let members: Vec<usize> = (0..self.fleet.user_count())
            .filter(|&u| self.fleet.user_groups(u) & group.bit != 0)
            .collect();
        let offset = q("$skiptoken").and_then(decode_skiptoken).unwrap_or(0);
        let page: Vec<Value> = members
            .iter()
            .skip(offset)
            .take(top)
            .map(|&u| {
                let mut item = json!({"id": self.user_id(u), "userPrincipalName": self.user_principal_name(u), "displayName": format!("User {u}")});
                if !cast_to_user {
                    item["@odata.type"] = json!("#microsoft.graph.user");
                }
                item
            })
            .collect();
        let context = if cast_to_user {
            "users"
        } else {
            "directoryObjects"
        };
        let mut body =
            json!({"@odata.context": format!("{}/v1.0/$metadata#{context}", graph_root(base_url))});
        if advanced && offset == 0 {
            body["@odata.count"] = json!(members.len());
        }
        if offset + top < members.len() {
            body["@odata.nextLink"] = json!(next_link(base_url, path, query, offset + top));
        }
        body["value"] = Value::Array(page);
        Response::json(200, body)
    }

    fn policy_json(&self, p: &Policy, expand: bool, base_url: &str) -> Value {
        let mut v = json!({
            "@odata.type": p.odata_type,
            "id": p.id,
            "createdDateTime": format_time(p.created),
            "description": null,
            "lastModifiedDateTime": format_time(p.modified),
            "displayName": p.name,
            "version": p.version,
        });
        if expand {
            let root = graph_root(base_url);
            let cast = p.odata_type.trim_start_matches('#');
            v["assignments@odata.context"] = json!(format!(
                "{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/{cast}/assignments",
                p.id
            ));
            v["assignments"] = Value::Array(self.assignments_json(p));
            v["scheduledActionsForRule@odata.context"] = json!(format!(
                "{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/{cast}/scheduledActionsForRule(scheduledActionConfigurations())",
                p.id
            ));
            v["scheduledActionsForRule"] = json!([{
                "id": p.id,
                "ruleName": null,
                "scheduledActionConfigurations@odata.context": format!("{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/{cast}/scheduledActionsForRule('{}')/scheduledActionConfigurations", p.id, p.id),
                "scheduledActionConfigurations": p.actions.iter().map(|(id, a)| json!({
                    "id": id,
                    "gracePeriodHours": a.grace_period_hours,
                    "actionType": a.action_type,
                    "notificationTemplateId": match a.notification_template_id.as_deref() {
                        None | Some("") => NIL_GUID.to_string(),
                        Some(t) => t.to_string(),
                    },
                    "notificationMessageCCList": a.notification_message_c_c_list.clone().unwrap_or_default(),
                })).collect::<Vec<_>>(),
            }]);
        }
        v
    }

    fn assignments_json(&self, p: &Policy) -> Vec<Value> {
        p.assignments
            .iter()
            .map(|t| {
                let suffix = match t {
                    AssignmentTarget::Group { group_id }
                    | AssignmentTarget::Exclusion { group_id } => group_id.clone(),
                    AssignmentTarget::AllUsers => ALL_USERS_ID.to_string(),
                    AssignmentTarget::AllDevices => {
                        "adadadad-808e-44e2-905a-0b7873a8a531".to_string()
                    }
                };
                json!({"id": format!("{}_{suffix}", p.id), "target": t})
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn policy_route<'q>(
        &mut self,
        method: &str,
        idx: usize,
        rest: &[&str],
        q: impl Fn(&str) -> Option<&'q str>,
        body: Option<&Value>,
        path: &str,
        query: &[(String, String)],
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let root = graph_root(base_url);
        match (method, rest) {
            ("GET", []) => {
                let expand = q("$expand").is_some_and(|e| {
                    e.contains("assignments") || e.contains("scheduledActionsForRule")
                });
                let mut v = self.policy_json(&self.policies[idx], expand, base_url);
                v["@odata.context"] = json!(format!(
                    "{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies/$entity"
                ));
                Response::json(200, v)
            }
            ("GET", ["assignments"]) => {
                let p = &self.policies[idx];
                Response::json(
                    200,
                    json!({"@odata.context": format!("{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/assignments", p.id), "value": self.assignments_json(p)}),
                )
            }
            ("POST", ["assign"]) => {
                let Some(list) = body
                    .and_then(|b| b.get("assignments"))
                    .and_then(Value::as_array)
                else {
                    return intune_error(
                        400,
                        "BadRequest",
                        "The request body must contain an 'assignments' array",
                        now,
                        request_id,
                    );
                };
                let mut targets: Vec<AssignmentTarget> = Vec::new();
                for item in list {
                    match serde_json::from_value::<AssignmentTarget>(item["target"].clone()) {
                        Ok(target) => {
                            if let AssignmentTarget::Group { group_id }
                            | AssignmentTarget::Exclusion { group_id } = &target
                                && self.group_bits(group_id).is_none()
                            {
                                return intune_error(
                                    400,
                                    "BadRequest",
                                    &format!("Group {group_id} not found"),
                                    now,
                                    request_id,
                                );
                            }
                            if !targets.contains(&target) {
                                targets.push(target);
                            }
                        }
                        Err(e) => {
                            return intune_error(
                                400,
                                "BadRequest",
                                &format!("Invalid OData type specified: {e}"),
                                now,
                                request_id,
                            );
                        }
                    }
                }
                let p = &mut self.policies[idx];
                p.assignments = targets;
                p.modified = now;
                p.version += 1;
                self.record_configuration();
                self.write("POST", path, body, 200);
                let p = &self.policies[idx];
                Response::json(
                    200,
                    json!({"@odata.context": format!("{root}/v1.0/$metadata#Collection(microsoft.graph.deviceCompliancePolicyAssignment)"), "value": self.assignments_json(p).into_iter().map(|mut a| { a["@odata.type"] = json!("#microsoft.graph.deviceCompliancePolicyAssignment"); a }).collect::<Vec<_>>()}),
                )
            }
            ("POST", ["scheduleActionsForRules"]) => {
                let Some(rules) = body
                    .and_then(|b| b.get("deviceComplianceScheduledActionForRules"))
                    .and_then(Value::as_array)
                else {
                    return intune_error(
                        400,
                        "BadRequest",
                        "The request body must contain 'deviceComplianceScheduledActionForRules'",
                        now,
                        request_id,
                    );
                };
                let mut actions = Vec::new();
                for rule in rules {
                    for item in rule["scheduledActionConfigurations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        match serde_json::from_value::<ActionItem>(item.clone()) {
                            Ok(action)
                                if [
                                    "noAction",
                                    "notification",
                                    "block",
                                    "retire",
                                    "wipe",
                                    "removeResourceAccessProfiles",
                                    "pushNotification",
                                ]
                                .contains(&action.action_type.as_str()) =>
                            {
                                actions.push(stored_action(action))
                            }
                            Ok(action) => {
                                return intune_error(
                                    400,
                                    "BadRequest",
                                    &format!(
                                        "Requested value '{}' was not found.",
                                        action.action_type
                                    ),
                                    now,
                                    request_id,
                                );
                            }
                            Err(e) => {
                                return intune_error(
                                    400,
                                    "BadRequest",
                                    &format!("Invalid action: {e}"),
                                    now,
                                    request_id,
                                );
                            }
                        }
                    }
                }
                if actions.iter().filter(|a| a.action_type == "block").count() != 1 {
                    return intune_error(
                        400,
                        "BadRequest",
                        "Compliance policy must have one and only one block scheduled action",
                        now,
                        request_id,
                    );
                }
                let seed = self.settings.seed;
                let version = self.config_version;
                let p = &mut self.policies[idx];
                p.actions = actions
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| (guid(seed, "action", format!("{}:{version}:{i}", p.id)), a))
                    .collect();
                p.modified = now;
                p.version += 1;
                self.record_configuration();
                self.write("POST", path, body, 204);
                Response::empty(204)
            }
            ("GET", ["deviceStatuses"]) => {
                let statuses = self.statuses(idx);
                let top = q("$top")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(1000)
                    .clamp(1, 1000);
                let offset = q("$skiptoken").and_then(decode_skiptoken).unwrap_or(0);
                let p = &self.policies[idx];
                let page: Vec<Value> = statuses
                    .iter()
                    .skip(offset)
                    .take(top)
                    .map(|(device, report)| self.status_json(*device, report, &p.id))
                    .collect();
                let mut body = json!({"@odata.context": format!("{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/deviceStatuses", p.id)});
                body["value"] = Value::Array(page);
                if offset + top < statuses.len() {
                    body["@odata.nextLink"] = json!(next_link(base_url, path, query, offset + top));
                }
                Response::json(200, body)
            }
            ("GET", ["deviceStatusOverview"]) => {
                let statuses = self.statuses(idx);
                let count = |f: &dyn Fn(&DetailedReport) -> bool| {
                    statuses.iter().filter(|(_, r)| f(r)).count()
                };
                let p = &self.policies[idx];
                Response::json(
                    200,
                    json!({
                        "@odata.context": format!("{root}/v1.0/$metadata#deviceManagement/deviceCompliancePolicies('{}')/deviceStatusOverview/$entity", p.id),
                        "id": p.id,
                        "pendingCount": count(&|r| r.report.last_reported.is_none()),
                        "notApplicableCount": 0,
                        "successCount": count(&|r| r.report.last_reported.is_some() && r.report.state == DeviceState::Compliant),
                        "errorCount": count(&|r| r.report.last_reported.is_some() && r.report.state == DeviceState::Error),
                        "failedCount": count(&|r| r.report.last_reported.is_some() && matches!(r.report.state, DeviceState::Noncompliant | DeviceState::InGrace)),
                        "lastUpdateDateTime": crate::domain::time::Timestamp::rfc3339(now),
                        "configurationVersion": p.version,
                    }),
                )
            }
            _ => graph_error(
                400,
                "No method match route template",
                &format!(
                    "No OData route exists that match template ~/singleton/navigation/key/navigation with http verb {method} for request /StatelessDeviceConfigurationFEService{path}."
                ),
                now,
                request_id,
            ),
        }
    }

    fn statuses(&mut self, idx: usize) -> Statuses {
        let now = self.now();
        let p = &self.policies[idx];
        if let Some((id, at, version, cached)) = &self.status_cache
            && *id == p.id
            && *at == now
            && *version == self.config_version
        {
            return cached.clone();
        }
        let history = self
            .histories
            .get(p.platform.as_str())
            .map_or(&[][..], Vec::as_slice);
        let statuses = Arc::new(self.fleet.statuses(p.platform, history, now));
        self.status_cache = Some((p.id.clone(), now, self.config_version, statuses.clone()));
        statuses
    }

    fn status_json(&self, device: usize, report: &DetailedReport, policy_id: &str) -> Value {
        let (user, platform) = self.fleet.device_owner(device);
        let device_id = guid(self.settings.seed, "device", device);
        json!({
            "id": format!("{device_id}_{policy_id}_{}", self.user_id(user)),
            "deviceDisplayName": format!("{}-{device:07}", platform.as_str().to_uppercase()),
            "userName": format!("User {user}"),
            "deviceModel": null,
            "complianceGracePeriodExpirationDateTime": report.grace_until.map_or("9999-12-31T23:59:59.9999999Z".to_string(), format_time),
            "status": status_name(report),
            "lastReportedDateTime": report.report.last_reported.map_or(crate::graph::UNSET_TIME.to_string(), format_time),
            "userPrincipalName": self.user_principal_name(user),
        })
    }

    fn create_ca(
        &mut self,
        body: Option<&Value>,
        path: &str,
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let Some(body) = body.filter(|b| b.is_object()) else {
            return graph_error(
                400,
                "BadRequest",
                "A policy body is required.",
                now,
                request_id,
            );
        };
        let Some(name) = body["displayName"].as_str().filter(|n| !n.is_empty()) else {
            return graph_error(
                400,
                "BadRequest",
                "displayName is required.",
                now,
                request_id,
            );
        };
        let state = body["state"].as_str().unwrap_or("");
        if !["enabled", "disabled", "enabledForReportingButNotEnforced"].contains(&state) {
            return graph_error(
                400,
                "BadRequest",
                &format!("Invalid value '{state}' for property 'state'."),
                now,
                request_id,
            );
        }
        let Ok(users) = serde_json::from_value::<CaUsers>(body["conditions"]["users"].clone())
        else {
            return graph_error(
                400,
                "BadRequest",
                "conditions.users is required.",
                now,
                request_id,
            );
        };
        let mut other = body["conditions"].as_object().cloned().unwrap_or_default();
        other.remove("users");
        let id = guid(
            self.settings.seed,
            "ca",
            format!("{name}:{}", self.ledger.len()),
        );
        self.ca_policies.push(CaPolicy {
            id,
            display_name: name.to_string(),
            state: state.to_string(),
            users,
            other_conditions: other,
            grant_controls: body["grantControls"].clone(),
            created: now,
            modified: None,
        });
        self.record_configuration();
        self.write("POST", path, Some(body), 201);
        let mut v = ca_json(self.ca_policies.last().expect("just pushed"));
        v["@odata.context"] = json!(format!(
            "{}/v1.0/$metadata#identity/conditionalAccess/policies/$entity",
            graph_root(base_url)
        ));
        Response::json(201, v)
    }

    fn ca_route(
        &mut self,
        method: &str,
        id: &str,
        body: Option<&Value>,
        path: &str,
        base_url: &str,
        request_id: &str,
    ) -> Response {
        let now = self.now();
        let Some(idx) = self.ca_policies.iter().position(|c| c.id == id) else {
            return graph_error(
                404,
                "ResourceNotFound",
                &format!("Policy '{id}' was not found."),
                now,
                request_id,
            );
        };
        match method {
            "GET" => {
                let mut v = ca_json(&self.ca_policies[idx]);
                v["@odata.context"] = json!(format!(
                    "{}/v1.0/$metadata#identity/conditionalAccess/policies/$entity",
                    graph_root(base_url)
                ));
                Response::json(200, v)
            }
            "PATCH" => {
                let Some(patch) = body.and_then(Value::as_object) else {
                    return graph_error(
                        400,
                        "BadRequest",
                        "A JSON object is required.",
                        now,
                        request_id,
                    );
                };
                let mut policy_state = None;
                let mut users = None;
                if let Some(state) = patch.get("state") {
                    match state.as_str() {
                        Some(
                            s @ ("enabled" | "disabled" | "enabledForReportingButNotEnforced"),
                        ) => policy_state = Some(s.to_string()),
                        _ => {
                            return graph_error(
                                400,
                                "BadRequest",
                                &format!("Invalid value '{state}' for property 'state'."),
                                now,
                                request_id,
                            );
                        }
                    }
                }
                if let Some(u) = patch.get("conditions").and_then(|c| c.get("users")) {
                    let mut merged = serde_json::to_value(&self.ca_policies[idx].users)
                        .expect("json serializes");
                    for (k, v) in u.as_object().into_iter().flatten() {
                        merged[k] = v.clone();
                    }
                    match serde_json::from_value::<CaUsers>(merged) {
                        Ok(parsed) => users = Some(parsed),
                        Err(e) => {
                            return graph_error(
                                400,
                                "BadRequest",
                                &format!("Invalid users condition: {e}"),
                                now,
                                request_id,
                            );
                        }
                    }
                }
                let policy = &mut self.ca_policies[idx];
                if let Some(name) = patch.get("displayName").and_then(Value::as_str) {
                    policy.display_name = name.to_string();
                }
                if let Some(s) = policy_state {
                    policy.state = s;
                }
                if let Some(u) = users {
                    policy.users = u;
                }
                policy.modified = Some(now);
                self.record_configuration();
                self.write("PATCH", path, body, 204);
                Response::empty(204)
            }
            "DELETE" => {
                self.ca_policies.remove(idx);
                self.record_configuration();
                self.write("DELETE", path, None, 204);
                Response::empty(204)
            }
            _ => graph_error(405, "BadRequest", "Method not allowed.", now, request_id),
        }
    }

    fn batch(&mut self, request: &Request, request_id: &str) -> Response {
        let now = self.now();
        let Ok(parsed) = serde_json::from_slice::<Value>(&request.body) else {
            return graph_error(400, "BadRequest", "Invalid batch payload.", now, request_id);
        };
        let Some(requests) = parsed["requests"].as_array() else {
            return graph_error(
                400,
                "BadRequest",
                "Invalid batch payload: 'requests' is required.",
                now,
                request_id,
            );
        };
        if requests.len() > 20 {
            return graph_error(
                400,
                "BadRequest",
                "Number of requests inside batch exceeds the limit.",
                now,
                request_id,
            );
        }
        let mut responses = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut drop_connection = false;
        let mut delay = Duration::ZERO;
        for sub in requests {
            let id = sub["id"].as_str().unwrap_or("").to_string();
            let depends_failed = sub["dependsOn"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| d.as_str().is_some_and(|d| failed.iter().any(|f| f == d)));
            if depends_failed {
                failed.push(id.clone());
                responses.push(json!({"id": id, "status": 424, "body": {"error": {"code": "FailedDependency", "message": "A request this one depends on failed."}}}));
                continue;
            }
            let url = sub["url"].as_str().unwrap_or("");
            let url = if url.starts_with('/') {
                url.to_string()
            } else {
                format!("/{url}")
            };
            let (path, query) = split_url(&url);
            let mut headers: BTreeMap<String, String> = sub["headers"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.to_lowercase(), v.to_string())))
                .collect();
            headers.extend(
                request
                    .headers
                    .iter()
                    .filter(|(k, _)| *k == "authorization")
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            let method = sub["method"].as_str().unwrap_or("GET").to_uppercase();
            let body = sub.get("body").filter(|b| !b.is_null());
            let sub_id = format!("{request_id}-{id}");
            let response = self.graph_call(
                &method,
                &path,
                &query,
                &headers,
                body,
                &request.base_url,
                &sub_id,
            );
            drop_connection |= response.drop_connection;
            delay = delay.max(response.delay.unwrap_or_default());
            if response.status >= 400 {
                failed.push(id.clone());
            }
            let mut sub_headers = serde_json::Map::new();
            for (k, v) in &response.headers {
                sub_headers.insert(k.clone(), json!(v));
            }
            let mut item = json!({"id": id, "status": response.status, "headers": sub_headers});
            if let Body::Json(b) = response.body {
                item["headers"]["Content-Type"] = json!("application/json");
                item["body"] = b;
            }
            responses.push(item);
        }
        let mut response = Response::json(200, json!({"responses": responses}));
        response.drop_connection = drop_connection;
        response.delay = (delay > Duration::ZERO).then_some(delay);
        response
    }
}

/// The service stores "no template" as the nil GUID, whatever the client sent.
fn stored_action(mut action: ActionItem) -> ActionItem {
    if action
        .notification_template_id
        .as_deref()
        .is_none_or(str::is_empty)
    {
        action.notification_template_id = Some(NIL_GUID.to_string());
    }
    action
        .notification_message_c_c_list
        .get_or_insert_with(Vec::new);
    action
}

fn throttled(now: Timestamp, request_id: &str) -> Response {
    Response::json(
        429,
        json!({
            "error": {
                "code": "TooManyRequests",
                "innerError": {
                    "code": "429",
                    "date": format_inner_date(now),
                    "message": "Please retry after",
                    "request-id": request_id,
                    "status": "429"
                },
                "message": "Please retry again later."
            }
        }),
    )
}

fn status_name(report: &DetailedReport) -> &'static str {
    if report.report.last_reported.is_none() {
        return "unknown";
    }
    match report.report.state {
        DeviceState::Compliant => "compliant",
        DeviceState::Noncompliant | DeviceState::InGrace => "nonCompliant",
        DeviceState::Error => "error",
        DeviceState::Conflict => "conflict",
        DeviceState::Unknown => "unknown",
    }
}

fn ca_json(c: &CaPolicy) -> Value {
    let mut conditions = Value::Object(c.other_conditions.clone());
    for key in ["userRiskLevels", "signInRiskLevels", "clientAppTypes"] {
        if conditions.get(key).is_none() {
            conditions[key] = json!([]);
        }
    }
    for key in ["platforms", "locations", "devices", "clientApplications"] {
        if conditions.get(key).is_none() {
            conditions[key] = Value::Null;
        }
    }
    let mut users = serde_json::to_value(&c.users).expect("json serializes");
    users["includeGuestsOrExternalUsers"] = Value::Null;
    users["excludeGuestsOrExternalUsers"] = Value::Null;
    conditions["users"] = users;
    let mut grant = c.grant_controls.clone();
    if grant.is_object() {
        for key in ["customAuthenticationFactors", "termsOfUse"] {
            if grant.get(key).is_none() {
                grant[key] = json!([]);
            }
        }
    }
    json!({
        "id": c.id,
        "templateId": null,
        "displayName": c.display_name,
        "createdDateTime": format_time(c.created),
        "modifiedDateTime": c.modified.map(format_time),
        "state": c.state,
        "sessionControls": null,
        "conditions": conditions,
        "grantControls": grant,
    })
}

/// `displayName eq 'X'` → `Some("X")`; anything else → `None`.
fn parse_display_name_filter(filter: &str) -> Option<String> {
    let rest = filter.trim().strip_prefix("displayName")?.trim_start();
    let rest = rest.strip_prefix("eq")?.trim();
    let inner = rest.strip_prefix('\'')?.strip_suffix('\'')?;
    Some(inner.replace("''", "'"))
}

fn graph_root(base_url: &str) -> String {
    base_url.trim_end_matches('/').to_string()
}

fn next_link(base_url: &str, path: &str, query: &[(String, String)], offset: usize) -> String {
    let mut parts: Vec<String> = query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("$skiptoken"))
        .map(|(k, v)| format!("{}={}", k, encode_query_value(v)))
        .collect();
    parts.push(format!("$skiptoken={}", encode_skiptoken(offset)));
    format!("{}/v1.0{}?{}", graph_root(base_url), path, parts.join("&"))
}

fn encode_skiptoken(offset: usize) -> String {
    format!("RFNwdAIA{}", hex::encode((offset as u64).to_be_bytes()))
}

fn decode_skiptoken(token: &str) -> Option<usize> {
    let bytes = hex::decode(token.strip_prefix("RFNwdAIA")?).ok()?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?) as usize)
}

/// Splits `/path?a=b&c=d` into the path and decoded query pairs.
pub fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    (percent_decode(path), parse_query(query))
}

pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(&v.replace('+', " ")))
        })
        .collect()
}

fn url_form(body: &[u8]) -> BTreeMap<String, String> {
    parse_query(&String::from_utf8_lossy(body))
        .into_iter()
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
