//! The emulated tenant: directory, compliance policies, Conditional Access, tokens, the clock,
//! the ledger of writes, Multi Admin Approval, and the dispatcher that answers Graph requests
//! over them.
//!
//! Devices and their traits come from the simulated fleet ([`Fleet`]) with the same seed as
//! `kind = "simulator"`. How they report and when they are blocked follows Intune's and
//! Conditional Access's documented rules ([`super::intune`]), driven by the configuration clients
//! write through Graph: a device is evaluated at its check-ins once its platform's policy is
//! assigned to it, its grace and its notifications count from its own first noncompliant
//! evaluation, and it is blocked past its grace while an enabled Conditional Access policy that
//! requires a compliant device covers its user and platform. See docs/emulator.md.

mod exports;
mod readiness;
mod scenario;
mod signins;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::approvals::{self, ApprovalRequest, State as ApprovalState};
use super::ca;
use super::compliance::{self, Version};
use super::credentials::{self, AppCredentials};
use super::faults::{Fault, fault_for};
use super::intune::{Coverage, Enforcer, Intune, Notice, PolicyRules, Row, Rules, platform_index};
use crate::domain::plan::Platform;
use crate::domain::time::Timestamp;
use crate::graph::{ALL_USERS_ID, NIL_GUID, encode_query_value, format_inner_date, format_time};
use crate::provider::simulator::SIMULATED_EPOCH;
use crate::provider::simulator::fleet::{Fleet, GROUPS};

pub use readiness::{ALL_ROLES, Apns, Readiness, UNREADY_WIPE_HOURS, Variant as ReadinessVariant};
pub use scenario::{
    HELPDESK_GROUP, HELPDESK_TEMPLATE_NAME, KIOSK_GROUP, MFA_POLICY_NAME, SCENARIO_FILTER_NAME,
};

/// The metadata service's token path (on the emulator's own socket: one address to point at).
pub const METADATA_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

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
    /// The app's certificate and federated credentials (`--client-certificate`, `--federated-*`).
    pub credentials: AppCredentials,
    pub token_lifetime: Duration,
    /// A token stops working after this many Graph requests (rehearses expiry mid-rollout).
    pub token_uses: Option<u64>,
    /// Conditional Access requests allowed per second (the real service allows 1 per tenant).
    pub ca_requests_per_second: f64,
    pub remediation_half_life: Duration,
}

/// Which tenant the emulator starts with (`--scenario`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scenario {
    /// phasegate's own objects and nothing else: the rollout starts from a clean slate.
    #[default]
    Default,
    /// The same fleet in a tenant other administrators have configured for years.
    LivedIn,
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(text: &str) -> Result<Scenario, String> {
        match text {
            "default" => Ok(Scenario::Default),
            "lived-in" => Ok(Scenario::LivedIn),
            other => Err(format!("unknown scenario {other:?} (default, lived-in)")),
        }
    }
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Default => "default",
            Scenario::LivedIn => "lived-in",
        }
    }
}

/// The state of the `Require compliant device for Office 365` policy (`--ca-state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaState {
    Enabled,
    ReportOnly,
    Disabled,
}

impl FromStr for CaState {
    type Err = String;

    fn from_str(text: &str) -> Result<CaState, String> {
        match text {
            "enabled" => Ok(CaState::Enabled),
            "report-only" => Ok(CaState::ReportOnly),
            "disabled" => Ok(CaState::Disabled),
            other => Err(format!(
                "unknown state {other:?} (enabled, report-only, disabled)"
            )),
        }
    }
}

impl CaState {
    /// `conditionalAccessPolicyState`.
    pub fn graph_state(self) -> &'static str {
        match self {
            CaState::Enabled => "enabled",
            CaState::ReportOnly => "enabledForReportingButNotEnforced",
            CaState::Disabled => "disabled",
        }
    }
}

/// What the tenant holds besides its fleet (`--scenario`, `--ca-state`, `--maa`).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub scenario: Scenario,
    /// `None`: disabled in `default`, enabled in `lived-in`.
    pub ca_state: Option<CaState>,
    /// Multi Admin Approval is required for compliance policies.
    pub maa: bool,
    /// The MDM set-up the readiness preflight reads (`--readiness` and friends).
    pub readiness: Readiness,
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
    pub(super) fn json(status: u16, body: Value) -> Response {
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
    description: Option<String>,
    odata_type: &'static str,
    platform: Platform,
    created: Timestamp,
    modified: Timestamp,
    version: i64,
    /// Targets as stored: `@odata.type`, the id their type has, and (set through beta) the
    /// assignment filter fields.
    assignments: Vec<Value>,
    /// (id, action) with the action's `actionType`, `gracePeriodHours`, `notificationTemplateId`
    /// and `notificationMessageCCList`.
    actions: Vec<(String, Value)>,
}

struct CaPolicy {
    id: String,
    /// Everything but the id, as stored (GET fills the documented defaults).
    raw: Map<String, Value>,
}

struct Group {
    id: String,
    name: String,
    /// The fleet's membership bit; 0 for groups without members.
    bit: u16,
}

impl Group {
    /// Its members are devices ([`super::intune::DEVICE_GROUP`]), not users.
    fn of_devices(&self) -> bool {
        self.bit == super::intune::DEVICE_GROUP_BIT
    }
}

/// Who made a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Actor {
    /// The application, through Graph with a token.
    App,
    /// An interactive administrator (`POST /_emulator/as-admin`).
    Admin,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Actor::App => "app",
            Actor::Admin => "admin",
        }
    }
}

#[derive(Clone)]
struct LedgerEntry {
    sequence: u64,
    at: Timestamp,
    method: String,
    path: String,
    body_sha256: String,
    /// The body as received, for tests that compare writes whose values differ by store.
    body: Option<Value>,
    status: u16,
    connection_dropped: bool,
    actor: Actor,
    /// The approval request it was applied under.
    approval: Option<String>,
}

/// One Graph call being answered.
struct Call<'a> {
    method: &'a str,
    /// Without the version prefix.
    path: &'a str,
    query: &'a [(String, String)],
    headers: &'a BTreeMap<String, String>,
    body: Option<&'a Value>,
    base_url: &'a str,
    request_id: &'a str,
    version: Version,
}

impl<'a> Call<'a> {
    fn q(&self, name: &str) -> Option<&'a str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `http://host/{version}/$metadata`, for `@odata.context`.
    fn metadata(&self) -> String {
        format!(
            "{}/{}/$metadata",
            graph_root(self.base_url),
            self.version.as_str()
        )
    }
}

pub struct Tenant {
    settings: Settings,
    setup: Setup,
    fleet: Fleet,
    clock: Clock,
    tenant_id: String,
    groups: Vec<Group>,
    policies: Vec<Policy>,
    ca_policies: Vec<CaPolicy>,
    templates: Vec<(String, String)>,
    /// Assignment filters: stored and returned, never evaluated.
    filters: Vec<(String, String)>,
    intune: Intune,
    /// User id → user, built the first time a Conditional Access policy names users.
    user_index: Option<HashMap<String, usize>>,
    config_version: u64,
    /// Issued tokens: when they expire and how many requests they served.
    tokens: BTreeMap<String, (Timestamp, u64)>,
    tokens_issued: u64,
    ledger: Vec<LedgerEntry>,
    /// Webhook deliveries received at `/_emulator/webhook`: (idempotency key, body digest).
    deliveries: Vec<(String, String)>,
    approvals: Vec<ApprovalRequest>,
    /// Who the write being routed comes from, and under which approval.
    acting: Actor,
    approving: Option<String>,
    requests: u64,
    /// Every HTTP request answered (Graph, token and control), for request ids.
    answered: u64,
    faults_injected: u64,
    last_ca_request: Option<Instant>,
    /// The sign-in log (`signins.rs`).
    signins: signins::Log,
    /// The reports export API's jobs (`exports.rs`).
    exports: super::reports::Exports,
    /// Where export jobs' blobs are downloaded from (another origin than Graph's).
    blob_origin: String,
}

/// A device's Entra device id (`deviceId` of the directory's device, `azureADDeviceId` of
/// Intune's managed device, `AadDeviceId` in reports): another id than its Intune one.
pub fn aad_device_id(seed: u64, device: usize) -> String {
    guid(seed, "aad-device", device)
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

fn body_digest(body: Option<&Value>) -> String {
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("json serializes"))
        .unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Writes under this path are Intune compliance-policy writes (Multi Admin Approval covers them).
fn is_compliance_policy_path(path: &str) -> bool {
    path == "/deviceManagement/deviceCompliancePolicies"
        || path.starts_with("/deviceManagement/deviceCompliancePolicies/")
}

/// `/v1.0/x` → (v1.0, `/x`); `/beta/x` → (beta, `/x`).
fn split_version(path: &str) -> Option<(Version, &str)> {
    path.strip_prefix("/v1.0")
        .map(|rest| (Version::V1, rest))
        .or_else(|| path.strip_prefix("/beta").map(|rest| (Version::Beta, rest)))
        .filter(|(_, rest)| rest.is_empty() || rest.starts_with('/'))
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
/// The user a `deviceStatuses` row names when no user signed in to the device: Intune reports
/// device-context check-ins under the System Account ("Monitor results of your Intune Device
/// compliance policies", learn.microsoft.com/mem/intune/protect/compliance-policy-monitor: a
/// device may show the System Account as a user), spelt "System account" in `userName` and
/// `userPrincipalName` in Microsoft's captured `deviceStatuses` responses.
pub const SYSTEM_ACCOUNT: &str = "System account";
pub const CA_POLICY_NAME: &str = "Require compliant device for Office 365";
pub const TEMPLATE_NAME: &str = "Compliance rollout - action required";
/// The interactive administrator who approves requests and acts through `/_emulator/as-admin`.
pub const SECOND_ADMIN: &str = approvals::APPROVER_NAME;

impl Tenant {
    pub fn new(settings: Settings) -> Tenant {
        Tenant::with_setup(settings, Setup::default())
    }

    pub fn with_setup(settings: Settings, setup: Setup) -> Tenant {
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
        let created = scenario::created();
        let groups = GROUPS
            .iter()
            .enumerate()
            .skip(1) // "All Users" is the virtual all-users target, not a directory group.
            .map(|(i, name)| Group {
                id: guid(seed, "group", name),
                name: name.to_string(),
                bit: 1 << i,
            })
            .chain(std::iter::once(Group {
                id: guid(seed, "group", super::intune::DEVICE_GROUP),
                name: super::intune::DEVICE_GROUP.to_string(),
                bit: super::intune::DEVICE_GROUP_BIT,
            }))
            .collect();
        let policies = POLICY_NAMES
            .iter()
            .map(|(platform, name)| {
                let id = guid(seed, "policy", platform);
                Policy {
                    actions: vec![(guid(seed, "action", &id), scenario::block(0))],
                    id,
                    name: name.to_string(),
                    description: None,
                    odata_type: policy_odata_type(*platform),
                    platform: *platform,
                    created,
                    modified: created,
                    version: 1,
                    assignments: Vec::new(),
                }
            })
            .collect();
        let state = setup.ca_state.unwrap_or(CaState::Disabled).graph_state();
        let ca_policies = vec![CaPolicy {
            id: guid(seed, "ca", CA_POLICY_NAME),
            raw: object(json!({
                "displayName": CA_POLICY_NAME,
                "state": state,
                "conditions": {
                    "users": {"includeUsers": ["None"]},
                    "clientAppTypes": ["all"],
                    "applications": {"includeApplications": ["Office365"], "excludeApplications": []},
                },
                "grantControls": {"operator": "OR", "builtInControls": ["compliantDevice"]},
                "createdDateTime": format_time(created),
                "modifiedDateTime": null,
            })),
        }];
        let templates = vec![(
            guid(seed, "template", TEMPLATE_NAME),
            TEMPLATE_NAME.to_string(),
        )];
        let intune = Intune::new(&fleet, created);
        let mut tenant = Tenant {
            tenant_id: guid(seed, "tenant", &settings.tenant_domain),
            settings,
            setup,
            fleet,
            clock,
            groups,
            policies,
            ca_policies,
            templates,
            filters: Vec::new(),
            intune,
            user_index: None,
            config_version: 0,
            tokens: BTreeMap::new(),
            tokens_issued: 0,
            ledger: Vec::new(),
            deliveries: Vec::new(),
            approvals: Vec::new(),
            acting: Actor::App,
            approving: None,
            requests: 0,
            answered: 0,
            faults_injected: 0,
            last_ca_request: None,
            signins: signins::Log::default(),
            exports: Default::default(),
            blob_origin: "http://127.0.0.1:0".to_string(),
        };
        if tenant.setup.scenario == Scenario::LivedIn {
            scenario::furnish(&mut tenant);
        }
        readiness::seed(&mut tenant);
        // The configuration has been in force since the policies were created: the tenant's
        // devices have a history when the clock starts.
        tenant.reconfigure_at(created);
        let now = tenant.now();
        tenant.intune.advance(&tenant.fleet, now);
        tenant
    }

    /// The emulator's clock never passes the last instant HTTP dates and RFC 3339 can write.
    pub fn now(&self) -> Timestamp {
        match &self.clock {
            Clock::Manual(now) => *now,
            Clock::Scaled {
                started,
                origin,
                factor,
            } => {
                let scaled = Duration::try_from_secs_f64(started.elapsed().as_secs_f64() * factor)
                    .unwrap_or(Duration::MAX);
                origin.plus(scaled).min(LAST_INSTANT)
            }
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

    /// The user an object id or a user principal name (any case) names.
    fn user_by_key(&self, key: &str) -> Option<usize> {
        (0..self.fleet.user_count()).find(|&u| {
            self.user_id(u).eq_ignore_ascii_case(key)
                || self.user_principal_name(u).eq_ignore_ascii_case(key)
        })
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

    fn group_id(&self, name: &str) -> String {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.id.clone())
            .unwrap_or_default()
    }

    /// Puts the current configuration in force now.
    fn reconfigure(&mut self) {
        let now = self.now();
        self.reconfigure_at(now);
    }

    fn reconfigure_at(&mut self, at: Timestamp) {
        self.config_version += 1;
        let rules = self.rules();
        self.intune.reconfigure(&self.fleet, rules, at);
    }

    /// The configuration as the device model reads it.
    fn rules(&mut self) -> Rules {
        let names_users =
            |ca: &CaPolicy| {
                let users = &ca.raw["conditions"]["users"];
                ["includeUsers", "excludeUsers"].iter().any(|key| {
                    users[*key].as_array().into_iter().flatten().any(|u| {
                        !matches!(u.as_str(), Some("All" | "None" | "GuestsOrExternalUsers"))
                    })
                })
            };
        if self.user_index.is_none()
            && self
                .ca_policies
                .iter()
                .any(|c| ca::enforces_compliance(&c.raw) && names_users(c))
        {
            self.user_index = Some(
                (0..self.fleet.user_count())
                    .map(|u| (self.user_id(u), u))
                    .collect(),
            );
        }
        let mut rules = Rules {
            seed: self.settings.seed,
            ..Rules::default()
        };
        for policy in &self.policies {
            let mut coverage = Coverage::default();
            for target in &policy.assignments {
                let bits = || {
                    self.group_bits(&compliance::target_ref(target))
                        .unwrap_or(0)
                };
                match compliance::target_kind(target) {
                    "groupAssignmentTarget" => coverage.include |= bits(),
                    "exclusionGroupAssignmentTarget" => coverage.exclude |= bits(),
                    "allLicensedUsersAssignmentTarget" => coverage.all_users = true,
                    "allDevicesAssignmentTarget" => coverage.all_devices = true,
                    // The fleet has no Configuration Manager clients; filters are not evaluated.
                    _ => {}
                }
            }
            let action = |kind: &'static str| {
                policy
                    .actions
                    .iter()
                    .map(|(_, a)| a)
                    .filter(move |a| a["actionType"] == kind)
            };
            rules.policies[platform_index(policy.platform)] = Some(PolicyRules {
                coverage,
                grace_hours: action("block")
                    .next()
                    .and_then(|a| a["gracePeriodHours"].as_i64())
                    .unwrap_or(0),
                notices: action("notification")
                    .map(|a| Notice {
                        template_id: a["notificationTemplateId"]
                            .as_str()
                            .unwrap_or(NIL_GUID)
                            .to_string(),
                        delay_hours: a["gracePeriodHours"].as_i64().unwrap_or(0),
                    })
                    .collect(),
            });
        }
        let no_users = HashMap::new();
        let index = self.user_index.as_ref().unwrap_or(&no_users);
        for policy in self
            .ca_policies
            .iter()
            .filter(|c| ca::enforces_compliance(&c.raw))
        {
            let users = &policy.raw["conditions"]["users"];
            let list = |key: &str| -> Vec<&str> {
                users[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect()
            };
            let resolve = |key: &str| -> Vec<usize> {
                list(key)
                    .iter()
                    .filter_map(|id| index.get(*id).copied())
                    .collect()
            };
            let bits = |key: &str| -> u16 {
                list(key)
                    .iter()
                    .map(|id| self.group_bits(id).unwrap_or(0))
                    .fold(0, |a, b| a | b)
            };
            // Roles and guests: the fleet has no role holders and no guests, so role and guest
            // conditions include and exclude nobody.
            rules.enforcers.push(Enforcer {
                all_users: list("includeUsers").contains(&"All"),
                include_users: resolve("includeUsers"),
                include_groups: bits("includeGroups"),
                exclude_users: resolve("excludeUsers"),
                exclude_groups: bits("excludeGroups"),
                platforms: ca::platforms_covered(&policy.raw),
            });
        }
        rules
    }

    /// Answers one HTTP request.
    pub fn handle(&mut self, request: &Request) -> Response {
        self.answered += 1;
        let request_id = guid(self.settings.seed, "request", self.answered);
        let now = self.now();
        // Every read and every change sees the devices evaluated up to the present.
        self.intune.advance(&self.fleet, now);
        let mut response = if request.path.starts_with("/_emulator/") {
            self.control(request, &request_id)
        } else if request.path.ends_with("/oauth2/v2.0/token") {
            self.token(request, now)
        } else if request.path == METADATA_TOKEN_PATH {
            self.metadata_token(request, now)
        } else if let Some((version, rest)) = split_version(&request.path) {
            self.graph(request, rest, version, &request_id)
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

    fn control(&mut self, request: &Request, request_id: &str) -> Response {
        let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        match (request.method.as_str(), segments.as_slice()) {
            ("GET", ["_emulator", "ledger"]) => {
                let entries: Vec<Value> = self
                    .ledger
                    .iter()
                    .map(|e| {
                        let mut entry = json!({
                            "sequence": e.sequence,
                            "at": format_time(e.at),
                            "method": e.method,
                            "path": e.path,
                            "bodySha256": e.body_sha256,
                            "body": e.body,
                            "status": e.status,
                            "connectionDropped": e.connection_dropped,
                            "actor": e.actor.as_str(),
                        });
                        if let Some(approval) = &e.approval {
                            entry["approval"] = json!(approval);
                        }
                        entry
                    })
                    .collect();
                Response::json(200, json!({ "value": entries }))
            }
            ("GET", ["_emulator", "state"]) => Response::json(200, self.state()),
            ("GET", ["_emulator", "clock"]) => Response::json(
                200,
                json!({"now": format_time(self.now()), "clock": self.clock_header()}),
            ),
            ("POST", ["_emulator", "clock"]) => self.set_clock(&request.body),
            ("POST", ["_emulator", "webhook"]) => {
                let key = request
                    .headers
                    .get("idempotency-key")
                    .cloned()
                    .unwrap_or_default();
                self.deliveries
                    .push((key, hex::encode(Sha256::digest(&request.body))));
                Response::empty(204)
            }
            ("GET", ["_emulator", "deliveries"]) => {
                let items: Vec<Value> = self
                    .deliveries
                    .iter()
                    .map(|(key, digest)| json!({"idempotencyKey": key, "bodySha256": digest}))
                    .collect();
                Response::json(200, json!({ "value": items }))
            }
            ("POST", ["_emulator", "revoke-tokens"]) => {
                let revoked = self.tokens.len();
                self.tokens.clear();
                Response::json(200, json!({ "revoked": revoked }))
            }
            ("GET", ["_emulator", "notifications"]) => {
                let items: Vec<Value> = self
                    .intune
                    .notifications()
                    .iter()
                    .map(|n| {
                        let (user, _) = self.fleet.device_owner(n.device);
                        json!({
                            "device": n.device,
                            "userPrincipalName": self.user_principal_name(user),
                            "templateId": n.template_id,
                            "at": format_time(n.at),
                        })
                    })
                    .collect();
                Response::json(200, json!({ "value": items }))
            }
            ("GET", ["_emulator", "blocks"]) => {
                let items: Vec<Value> = self
                    .intune
                    .blocks()
                    .iter()
                    .map(|b| {
                        let (user, _) = self.fleet.device_owner(b.device);
                        json!({
                            "device": b.device,
                            "userPrincipalName": self.user_principal_name(user),
                            "from": format_time(b.from),
                            "until": b.until.map(format_time),
                        })
                    })
                    .collect();
                Response::json(200, json!({ "value": items }))
            }
            ("GET", ["_emulator", "approvals"]) => {
                let now = self.now();
                let items: Vec<Value> = self
                    .approvals
                    .iter()
                    .map(|a| {
                        let mut item = a.to_json(now);
                        item["method"] = json!(a.method);
                        item["path"] = json!(a.path);
                        item["bodySha256"] = json!(a.body_sha256);
                        item
                    })
                    .collect();
                Response::json(200, json!({ "value": items }))
            }
            (
                "POST",
                [
                    "_emulator",
                    "approvals",
                    id,
                    decision @ ("approve" | "reject"),
                ],
            ) => self.decide(id, decision, &request.body),
            ("POST", ["_emulator", "as-admin"]) => self.as_admin(request, request_id),
            ("POST", ["_emulator", "signins"]) => self.sign_in_burst(&request.body),
            ("GET", ["_emulator", "exportJobs", id, "truth"]) => self.export_truth(id, request),
            _ => Response::json(404, json!({"error": "unknown emulator endpoint"})),
        }
    }

    /// Another administrator approves or rejects a request in the admin center.
    fn decide(&mut self, id: &str, decision: &str, body: &[u8]) -> Response {
        let now = self.now();
        let approver = guid(self.settings.seed, "admin", SECOND_ADMIN);
        let justification = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|b| b["justification"].as_str().map(str::to_string));
        let Some(request) = self.approvals.iter_mut().find(|a| a.id == id) else {
            return Response::json(404, json!({"error": format!("no approval request {id}")}));
        };
        let status = request.status(now);
        if status != "needsApproval" {
            return Response::json(
                409,
                json!({"error": format!("approval request {id} is {status}")}),
            );
        }
        request.state = if decision == "approve" {
            ApprovalState::Approved
        } else {
            ApprovalState::Rejected
        };
        request.approver = Some(approver);
        request.approval_justification = justification;
        request.modified = now;
        Response::json(200, request.to_json(now))
    }

    /// Dispatches a call as an interactive administrator would make it in an admin center: no
    /// token, no injected faults, no Conditional Access rate limit, no Multi Admin Approval.
    fn as_admin(&mut self, request: &Request, request_id: &str) -> Response {
        let parsed: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let (Some(method), Some(target)) = (parsed["method"].as_str(), parsed["path"].as_str())
        else {
            return Response::json(
                400,
                json!({"error": "expected {\"method\": \"PATCH\", \"path\": \"/identity/...\", \"body\": {...}}"}),
            );
        };
        let (path, query) = split_url(target);
        let requested = match parsed["version"].as_str() {
            Some("v1.0") => Version::V1,
            // The admin centers call Graph beta.
            _ => Version::Beta,
        };
        let (version, path) = match split_version(&path) {
            Some((v, rest)) => (v, rest.to_string()),
            None => (requested, path.clone()),
        };
        let method = method.to_uppercase();
        let body = parsed.get("body").filter(|b| !b.is_null());
        let headers = BTreeMap::new();
        let call = Call {
            method: &method,
            path: &path,
            query: &query,
            headers: &headers,
            body,
            base_url: &request.base_url,
            request_id,
            version,
        };
        self.acting = Actor::Admin;
        let response = self.route(&call);
        self.acting = Actor::App;
        let body = match response.body {
            Body::Json(v) => v,
            Body::Empty => Value::Null,
        };
        Response::json(200, json!({"status": response.status, "body": body}))
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
            Some(at) if at > LAST_INSTANT => Response::json(
                400,
                json!({"error": "the clock goes up to 9999-12-31T23:59:59Z"}),
            ),
            Some(at) if at >= current => {
                self.clock = Clock::Manual(at);
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
                let listed = self.intune.listed(p.platform);
                let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
                for &device in listed {
                    let row = self.intune.row(p.platform, device as usize);
                    *by_state.entry(row.status.as_str()).or_default() += 1;
                }
                by_state.insert(
                    "blocked",
                    self.intune.blocked_now(&self.fleet, p.platform) as u64,
                );
                json!({
                    "id": p.id,
                    "displayName": p.name,
                    "description": p.description,
                    "platform": p.platform.as_str(),
                    "version": p.version,
                    "assignments": p.assignments,
                    "actions": p.actions.iter().map(|(_, a)| a).collect::<Vec<_>>(),
                    "assignedDevices": listed.len(),
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
                    "displayName": c.raw["displayName"],
                    "state": c.raw["state"],
                    "users": ca::users_json(&c.raw),
                })
            })
            .collect();
        json!({
            "now": format_time(self.now()),
            "clock": self.clock_header(),
            "scenario": self.setup.scenario.as_str(),
            "multiAdminApproval": self.setup.maa,
            "tenantId": self.tenant_id,
            "devices": self.fleet.device_count(),
            "users": self.fleet.user_count(),
            "platforms": counts,
            "groups": self.groups.iter().map(|g| json!({"id": g.id, "displayName": g.name})).collect::<Vec<_>>(),
            "assignmentFilters": self.filters.iter().map(|(id, name)| json!({"id": id, "displayName": name})).collect::<Vec<_>>(),
            "templates": self.templates.iter().map(|(id, name)| json!({"id": id, "displayName": name})).collect::<Vec<_>>(),
            "policies": policies,
            "conditionalAccess": ca,
            "requests": self.requests,
            "faultsInjected": self.faults_injected,
            "writes": self.ledger.len(),
            "notifications": self.intune.notification_count(),
            "approvals": self.approvals.len(),
            "signIns": self.signins.len(),
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
        match (form.get("client_secret"), form.get("client_assertion")) {
            (Some(secret), None) if *secret == self.settings.client_secret => {}
            (Some(_), None) => {
                return oauth_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                );
            }
            (None, Some(assertion)) => {
                if form.get("client_assertion_type").map(String::as_str)
                    != Some(crate::provider::graph::credential::JWT_BEARER)
                {
                    return oauth_error(
                        400,
                        "invalid_request",
                        50027,
                        "JWT token is invalid or malformed: 'client_assertion_type' must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                    );
                }
                let audience = format!("{}{}", request.base_url, request.path);
                if let Err((status, error, code, description)) = credentials::check_assertion(
                    &self.settings.credentials,
                    assertion,
                    &audience,
                    &self.settings.client_id,
                    now,
                ) {
                    return oauth_error(status, error, code, &description);
                }
            }
            (Some(_), Some(_)) => {
                return oauth_error(
                    400,
                    "invalid_request",
                    7000216,
                    "Only one of 'client_assertion', 'client_secret' may be given for the 'client_credentials' grant type.",
                );
            }
            (None, None) => {
                return oauth_error(
                    401,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
        }
        let (token, lifetime) = self.issue_token(now);
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

    /// A new access token for the app, valid for the configured lifetime of tenant time.
    fn issue_token(&mut self, now: Timestamp) -> (String, Duration) {
        self.tokens_issued += 1;
        let lifetime = self.settings.token_lifetime;
        let claims = self.token_claims(self.tokens_issued, now, now.plus(lifetime));
        let token = format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{}.{}",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                claims.to_string()
            ),
            hex::encode(&Sha256::digest(self.tokens_issued.to_be_bytes())[..12])
        );
        self.tokens.insert(token.clone(), (now.plus(lifetime), 0));
        (token, lifetime)
    }

    /// The instance metadata service's token endpoint, for the machine's managed identity (the
    /// emulated app's own client id). See `credentials` for the documented behaviour.
    fn metadata_token(&mut self, request: &Request, now: Timestamp) -> Response {
        let refuse = |description: &str| {
            Response::json(
                400,
                json!({"error": "invalid_request", "error_description": description}),
            )
        };
        if request.method != "GET" {
            return Response::json(405, json!({"error": "method_not_allowed"}));
        }
        if request.headers.get("metadata").map(String::as_str) != Some("true") {
            return refuse("Required metadata header not specified");
        }
        let query = |name: &str| {
            request
                .query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if query("api-version").is_none() {
            return refuse("Required query variable 'api-version' is missing");
        }
        let resource = query("resource").unwrap_or("");
        if resource.trim_end_matches('/') != "https://graph.microsoft.com" {
            return refuse(&format!(
                "Required audience parameter not specified or not a resource this identity can get a token for: '{resource}'"
            ));
        }
        if query("client_id").is_some_and(|id| id != self.settings.client_id) {
            return refuse("Identity not found");
        }
        let (token, lifetime) = self.issue_token(now);
        let expires_on = now.plus(lifetime).as_millis().div_euclid(1000);
        let issued = now.as_millis().div_euclid(1000);
        Response::json(
            200,
            json!({
                "access_token": token,
                "refresh_token": "",
                "expires_in": lifetime.as_secs().to_string(),
                "expires_on": expires_on.to_string(),
                "not_before": issued.to_string(),
                "resource": resource,
                "token_type": "Bearer",
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

    fn graph(
        &mut self,
        request: &Request,
        rest: &str,
        version: Version,
        request_id: &str,
    ) -> Response {
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
            return self.batch(request, version, request_id);
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
        self.graph_call(&Call {
            method: &request.method,
            path: rest,
            query: &request.query,
            headers: &request.headers,
            body: body.as_ref(),
            base_url: &request.base_url,
            request_id,
            version,
        })
    }

    /// One Graph call by the application, through faults, throttling and Multi Admin Approval,
    /// then routing.
    fn graph_call(&mut self, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let index = self.requests;
        self.requests += 1;
        let writes = call.method != "GET";
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
        if call.path.starts_with("/identity/conditionalAccess") {
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
        if call.path.starts_with("/auditLogs/") {
            return self.list_signins(call);
        }
        let approval = if self.setup.maa && writes && is_compliance_policy_path(call.path) {
            match self.approval_gate(call) {
                Ok(id) => Some(id),
                Err(refused) => return refused,
            }
        } else {
            None
        };
        let ledger_before = self.ledger.len();
        self.approving = approval.clone();
        let mut response = self.route(call);
        self.approving = None;
        let applied = self.ledger.len() > ledger_before;
        if let Some(id) = approval
            && applied
            && let Some(request) = self.approvals.iter_mut().find(|a| a.id == id)
        {
            request.state = ApprovalState::Completed;
            request.modified = now;
        }
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

    /// Multi Admin Approval for an app's write to a compliance policy: `Ok(id)` when it resubmits
    /// an approved request unchanged, otherwise the answer (a new request, or a refusal).
    /// Observed messages: Micke-K/IntuneManagement discussion #426, Microsoft365DSC #7236.
    fn approval_gate(&mut self, call: &Call) -> Result<String, Response> {
        let now = self.now();
        let request_id = call.request_id;
        let bad = |message: &str| intune_error(400, "BadRequest", message, now, request_id);
        let approval_required = |id: &str, message: String| {
            graph_error(403, "ApprovalRequired", &message, now, request_id)
                .header("x-msft-approval-code", id)
        };
        let digest = body_digest(call.body);
        if let Some(code) = call.headers.get("x-msft-approval-code") {
            let code = code.trim();
            let Some(request) = self.approvals.iter().find(|a| a.id == code) else {
                return Err(bad("Invalid approval code"));
            };
            return match request.status(now) {
                "needsApproval" => Err(approval_required(
                    code,
                    format!(
                        "Approval Required. The request {code} is not approved yet. x-msft-approval-code: {code}"
                    ),
                )),
                "approved"
                    if request.method == call.method
                        && request.path == call.path
                        && request.body_sha256 == digest =>
                {
                    Ok(code.to_string())
                }
                "approved" => Err(bad(&format!(
                    "The request does not match the approved request {code}"
                ))),
                status => Err(bad(&format!("The approval request {code} is {status}"))),
            };
        }
        let Some(header) = call.headers.get("x-msft-approval-justification") else {
            return Err(bad(
                "Header 'x-msft-approval-justification' is required to request approval",
            ));
        };
        let Some(justification) =
            approvals::decode_base64(header).and_then(|b| String::from_utf8(b).ok())
        else {
            return Err(bad(
                "Header 'x-msft-approval-justification' must be Base64-encoded text",
            ));
        };
        let id = guid(self.settings.seed, "approval", self.approvals.len() + 1);
        self.approvals.push(ApprovalRequest {
            id: id.clone(),
            method: call.method.to_string(),
            path: call.path.to_string(),
            body_sha256: digest,
            state: ApprovalState::NeedsApproval,
            requested: now,
            modified: now,
            justification,
            approver: None,
            approval_justification: None,
            application: self.settings.client_id.clone(),
        });
        Err(approval_required(
            &id,
            format!(
                "Approval Required. Request Approval using the request ID returned as part of the x-msft-approval-code response header. x-msft-approval-code: {id}"
            ),
        ))
    }

    fn write(&mut self, method: &str, path: &str, body: Option<&Value>, status: u16) {
        self.ledger.push(LedgerEntry {
            sequence: self.ledger.len() as u64 + 1,
            at: self.now(),
            method: method.to_string(),
            path: path.to_string(),
            body_sha256: body_digest(body),
            body: body.cloned(),
            status,
            connection_dropped: false,
            actor: self.acting,
            approval: self.approving.clone(),
        });
    }

    fn route(&mut self, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let path = call.path;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let invalid_filter = || {
            graph_error(
                400,
                "BadRequest",
                "Invalid filter clause: only displayName eq '...' is supported here",
                now,
                request_id,
            )
        };
        let filter = match call.q("$filter").map(parse_eq_filter) {
            Some(None) => return invalid_filter(),
            Some(Some(filter)) => Some(filter),
            None => None,
        };
        let approvals_route =
            segments.starts_with(&["deviceManagement", "operationApprovalRequests"]);
        if let Some((property, _)) = &filter
            && property != "displayName"
            && !approvals_route
        {
            return invalid_filter();
        }
        let name_filter = filter
            .as_ref()
            .filter(|(p, _)| p == "displayName")
            .map(|(_, v)| v.clone());
        let named = |name: &str| {
            name_filter
                .as_deref()
                .is_none_or(|f| name.eq_ignore_ascii_case(f))
        };
        if let Some(answer) = self.export_route(call, &segments) {
            return answer;
        }
        let meta = call.metadata();
        match (call.method, segments.as_slice()) {
            // "List groups" with `$filter=displayName eq '…'`: the matching groups in `value`,
            // an empty `value` when none matches (https://learn.microsoft.com/graph/api/group-list);
            // "Get group" by id: 404 `Request_ResourceNotFound` for an id the directory lacks
            // (https://learn.microsoft.com/graph/api/group-get).
            ("GET", ["groups"]) => {
                let items: Vec<Value> = self
                    .groups
                    .iter()
                    .filter(|g| named(&g.name))
                    .map(|g| json!({"id": g.id, "displayName": g.name}))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#groups"), "value": items}),
                )
            }
            ("GET", ["groups", id]) => match self.groups.iter().find(|g| g.id == *id) {
                Some(g) => Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#groups/$entity"), "id": g.id, "displayName": g.name}),
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
            ("GET", ["groups", id, "transitiveMembers", cast @ ..]) => self.members(id, cast, call),
            // "Get user": `GET /users/{id | userPrincipalName}`, a UPN compared without case;
            // 404 `Request_ResourceNotFound` for nobody
            // (https://learn.microsoft.com/graph/api/user-get).
            ("GET", ["users", key]) => match self.user_by_key(key) {
                Some(u) => Response::json(
                    200,
                    json!({
                        "@odata.context": format!("{meta}#users/$entity"),
                        "id": self.user_id(u),
                        "userPrincipalName": self.user_principal_name(u),
                        "displayName": format!("User {u}"),
                    }),
                ),
                None => graph_error(
                    404,
                    "Request_ResourceNotFound",
                    &format!(
                        "Resource '{key}' does not exist or one of its queried reference-property objects are not present."
                    ),
                    now,
                    request_id,
                ),
            },
            ("GET", ["deviceManagement", "deviceCompliancePolicies"]) => {
                let (assignments, actions) = expansions(call.q("$expand"));
                let items: Vec<Value> = self
                    .policies
                    .iter()
                    .filter(|p| named(&p.name))
                    .map(|p| self.policy_json(p, assignments, actions, call))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#deviceManagement/deviceCompliancePolicies"), "value": items}),
                )
            }
            // "List managedDevices" (learn.microsoft.com/graph/api/intune-devices-manageddevice-list):
            // every enrolled device, 1,000 a page at most, with `id` (Intune's, the device part
            // of a `deviceStatuses` row id), `azureADDeviceId` (its Entra device id), the
            // primary user's `userPrincipalName` (empty for a userless device); `$select` keeps
            // the properties named.
            ("GET", ["deviceManagement", "managedDevices"]) => {
                let total = self.fleet.device_count();
                let top = call
                    .q("$top")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(1000)
                    .clamp(1, 1000);
                let offset = call.q("$skiptoken").and_then(decode_skiptoken).unwrap_or(0);
                let seed = self.settings.seed;
                let users = self.fleet.user_count();
                let page: Vec<Value> = (offset.min(total)..(offset + top).min(total))
                    .map(|device| {
                        let (owner, platform) = self.fleet.device_owner(device);
                        let who = super::intune::device_users(seed, owner, users, device);
                        let all = json!({
                            "id": guid(seed, "device", device),
                            "azureADDeviceId": aad_device_id(seed, device),
                            "deviceName": format!("{}-{device:07}", platform.as_str().to_uppercase()),
                            "operatingSystem": ca::platform_name(platform),
                            "userPrincipalName": who.primary.map_or(String::new(), |u| self.user_principal_name(u)),
                        });
                        match call.q("$select").filter(|s| !s.trim().is_empty()) {
                            None => all,
                            Some(select) => Value::Object(
                                select
                                    .split(',')
                                    .map(str::trim)
                                    .filter(|n| !n.is_empty())
                                    .map(|n| (n.to_string(), all.get(n).cloned().unwrap_or(Value::Null)))
                                    .collect(),
                            ),
                        }
                    })
                    .collect();
                let mut body = json!({"@odata.context": format!("{meta}#deviceManagement/managedDevices"), "value": page});
                if offset + top < total {
                    body["@odata.nextLink"] = json!(next_link(call, offset + top));
                }
                Response::json(200, body)
            }
            // managedDeviceOverview (v1.0): enrolled devices by operating system.
            ("GET", ["deviceManagement", "managedDeviceOverview"]) => {
                let count = |p: Platform| {
                    self.fleet
                        .platform_counts()
                        .iter()
                        .find(|(q, _)| *q == p)
                        .map_or(0, |(_, n)| *n)
                };
                let total = self.fleet.device_count();
                Response::json(
                    200,
                    json!({
                        "@odata.context": format!("{meta}#deviceManagement/managedDeviceOverview/$entity"),
                        "id": guid(self.settings.seed, "overview", "devices"),
                        "enrolledDeviceCount": total,
                        "mdmEnrolledCount": total,
                        "dualEnrolledDeviceCount": 0,
                        "deviceOperatingSystemSummary": {
                            "androidCount": count(Platform::Android),
                            "iosCount": count(Platform::Ios),
                            "macOSCount": count(Platform::Macos),
                            "windowsMobileCount": 0,
                            "windowsCount": count(Platform::Windows),
                            "unknownCount": 0,
                        },
                        "deviceExchangeAccessStateSummary": {
                            "allowedDeviceCount": 0,
                            "blockedDeviceCount": 0,
                            "quarantinedDeviceCount": 0,
                            "unknownDeviceCount": 0,
                            "unavailableDeviceCount": 0,
                        },
                    }),
                )
            }
            ("GET", ["deviceManagement", "notificationMessageTemplates"]) => {
                let items: Vec<Value> = self
                    .templates
                    .iter()
                    .filter(|(_, name)| named(name))
                    .map(|(id, name)| json!({"@odata.type": "#microsoft.graph.notificationMessageTemplate", "id": id, "displayName": name, "defaultLocale": "en-us", "brandingOptions": "includeCompanyLogo,includeCompanyName,includeContactInformation", "roleScopeTagIds": ["0"], "lastModifiedDateTime": format_time(SIMULATED_EPOCH)}))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#deviceManagement/notificationMessageTemplates"), "value": items}),
                )
            }
            ("GET", ["deviceManagement", "operationApprovalRequests"]) => {
                // The documentation's example filters on `requestId`; `id` is the key.
                let wanted = match &filter {
                    Some((p, v)) if p == "requestId" || p == "id" => Some(v.as_str()),
                    Some(_) => {
                        return graph_error(
                            400,
                            "BadRequest",
                            "Invalid filter clause: only requestId eq '...' or id eq '...' is supported here",
                            now,
                            request_id,
                        );
                    }
                    None => None,
                };
                let items: Vec<Value> = self
                    .approvals
                    .iter()
                    .filter(|a| wanted.is_none_or(|w| a.id.eq_ignore_ascii_case(w)))
                    .map(|a| a.to_json(now))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#deviceManagement/operationApprovalRequests"), "value": items}),
                )
            }
            ("GET", ["deviceManagement", "operationApprovalRequests", id]) => {
                match self
                    .approvals
                    .iter()
                    .find(|a| a.id.eq_ignore_ascii_case(id))
                {
                    Some(a) => {
                        let mut v = json!({"@odata.context": format!("{meta}#deviceManagement/operationApprovalRequests/$entity")});
                        for (k, value) in a.to_json(now).as_object().into_iter().flatten() {
                            v[k] = value.clone();
                        }
                        Response::json(200, v)
                    }
                    None => intune_error(
                        404,
                        "ResourceNotFound",
                        &format!("Resource not found: operationApprovalRequest {id}"),
                        now,
                        request_id,
                    ),
                }
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
                self.policy_route(idx, rest, call)
            }
            ("GET", ["identity", "conditionalAccess", "policies"]) => {
                let items: Vec<Value> = self
                    .ca_policies
                    .iter()
                    .filter(|c| named(c.raw["displayName"].as_str().unwrap_or("")))
                    .map(|c| ca::to_json(&c.id, &c.raw))
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#identity/conditionalAccess/policies"), "value": items}),
                )
            }
            ("POST", ["identity", "conditionalAccess", "policies"]) => self.create_ca(call),
            (_, ["identity", "conditionalAccess", "policies", id]) => self.ca_route(id, call),
            ("GET", ["organization"]) => self.organization(&meta),
            ("GET", ["deviceManagement"]) => self.device_management(&meta, call.q("$select")),
            ("GET", ["deviceManagement", "applePushNotificationCertificate"]) => {
                self.apns_certificate(&meta, request_id)
            }
            (
                "GET",
                [
                    "deviceManagement",
                    "notificationMessageTemplates",
                    id,
                    "localizedNotificationMessages",
                ],
            ) => self.localized_messages(id, &meta, request_id),
            _ => graph_error(
                400,
                "No method match route template",
                &format!(
                    "No OData route exists that match template ~/{} with http verb {} for request {path}.",
                    segments.join("/"),
                    call.method
                ),
                now,
                request_id,
            ),
        }
    }

    fn members(&self, id: &str, cast: &[&str], call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
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
        let cast_to_device = cast == ["microsoft.graph.device"];
        if !cast.is_empty() && !cast_to_user && !cast_to_device {
            return graph_error(
                400,
                "Request_BadRequest",
                "Unsupported cast.",
                now,
                request_id,
            );
        }
        let advanced = call
            .headers
            .get("consistencylevel")
            .is_some_and(|v| v.eq_ignore_ascii_case("eventual"))
            && call.q("$count") == Some("true");
        if (cast_to_user || cast_to_device) && !advanced {
            return graph_error(
                400,
                "Request_UnsupportedQuery",
                "The specified filter to the reference property query is currently not supported; casts need ConsistencyLevel: eventual and $count=true.",
                now,
                request_id,
            );
        }
        let top = match call.q("$top").map(str::parse::<usize>) {
            None => 100,
            Some(Ok(n)) if (1..=999).contains(&n) => n,
            Some(_) => {
                return graph_error(
                    400,
                    "Request_UnsupportedQuery",
                    &format!(
                        "Invalid page size specified: '{}'. Must be between 1 and 999 inclusive.",
                        call.q("$top").unwrap_or("")
                    ),
                    now,
                    request_id,
                );
            }
        };
        // A group's members are users or, for the device group, devices: a cast to the other
        // type lists none.
        let members: Vec<usize> = if group.of_devices() {
            if cast_to_user {
                Vec::new()
            } else {
                let seed = self.settings.seed;
                (0..self.fleet.device_count())
                    .filter(|&d| {
                        super::intune::device_groups(seed, &self.fleet, d) & group.bit != 0
                    })
                    .collect()
            }
        } else if cast_to_device {
            Vec::new()
        } else {
            (0..self.fleet.user_count())
                .filter(|&u| self.fleet.user_groups(u) & group.bit != 0)
                .collect()
        };
        let offset = call.q("$skiptoken").and_then(decode_skiptoken).unwrap_or(0);
        let page: Vec<Value> = members
            .iter()
            .skip(offset)
            .take(top)
            .map(|&m| {
                let (mut item, kind) = if group.of_devices() {
                    (
                        self.device_json(m, call.q("$select")),
                        "#microsoft.graph.device",
                    )
                } else {
                    (
                        self.member_json(m, call.q("$select")),
                        "#microsoft.graph.user",
                    )
                };
                if cast.is_empty() {
                    item["@odata.type"] = json!(kind);
                }
                item
            })
            .collect();
        let context = if cast_to_user {
            "users"
        } else if cast_to_device {
            "devices"
        } else {
            "directoryObjects"
        };
        let mut body = json!({"@odata.context": format!("{}#{context}", call.metadata())});
        if advanced && offset == 0 {
            body["@odata.count"] = json!(members.len());
        }
        if offset + top < members.len() {
            body["@odata.nextLink"] = json!(next_link(call, offset + top));
        }
        body["value"] = Value::Array(page);
        Response::json(200, body)
    }

    /// A user as a member listing shows it. `mail` is the user's SMTP address, null for a user
    /// without a mailbox (here the break-glass accounts and a share of unlicensed users);
    /// `accountEnabled` (false for a share of people who left) is "returned only on $select";
    /// with `$select` only the properties named (an unknown one is null), without it the default
    /// set ("user resource type", https://learn.microsoft.com/graph/api/resources/user: `mail`,
    /// nullable, `accountEnabled`, returned only on `$select`; "Use the $select query
    /// parameter", https://learn.microsoft.com/graph/query-parameters#select).
    fn member_json(&self, user: usize, select: Option<&str>) -> Value {
        let upn = self.user_principal_name(user);
        let mut all = json!({
            "id": self.user_id(user),
            "userPrincipalName": upn,
            "displayName": format!("User {user}"),
            "mail": if self.fleet.has_mailbox(user) { json!(upn) } else { Value::Null },
        });
        let Some(select) = select.filter(|s| !s.trim().is_empty()) else {
            return all;
        };
        all["accountEnabled"] = json!(self.fleet.account_enabled(user));
        let mut item = serde_json::Map::new();
        for name in select.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            item.insert(
                name.to_string(),
                all.get(name).cloned().unwrap_or(Value::Null),
            );
        }
        Value::Object(item)
    }

    /// A device as a member listing shows it ("device resource type",
    /// learn.microsoft.com/graph/api/resources/device): `id`, its directory object id, and
    /// `deviceId`, the id the Azure Device Registration Service set — the same id Intune's managed
    /// device carries as `azureADDeviceId` (learn.microsoft.com/graph/api/resources/
    /// intune-devices-manageddevice) and its reports as `AadDeviceId`.
    fn device_json(&self, device: usize, select: Option<&str>) -> Value {
        let (_, platform) = self.fleet.device_owner(device);
        let all = json!({
            "id": guid(self.settings.seed, "device-object", device),
            "deviceId": aad_device_id(self.settings.seed, device),
            "displayName": format!("{}-{device:07}", platform.as_str().to_uppercase()),
            "operatingSystem": ca::platform_name(platform),
        });
        let Some(select) = select.filter(|s| !s.trim().is_empty()) else {
            return all;
        };
        let mut item = serde_json::Map::new();
        for name in select.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            item.insert(
                name.to_string(),
                all.get(name).cloned().unwrap_or(Value::Null),
            );
        }
        Value::Object(item)
    }

    fn policy_json(&self, p: &Policy, assignments: bool, actions: bool, call: &Call) -> Value {
        let mut v = json!({
            "@odata.type": p.odata_type,
            "id": p.id,
            "createdDateTime": format_time(p.created),
            "description": p.description,
            "lastModifiedDateTime": format_time(p.modified),
            "displayName": p.name,
            "version": p.version,
        });
        let meta = call.metadata();
        let cast = p.odata_type.trim_start_matches('#');
        if assignments {
            v["assignments@odata.context"] = json!(format!(
                "{meta}#deviceManagement/deviceCompliancePolicies('{}')/{cast}/assignments",
                p.id
            ));
            v["assignments"] = Value::Array(self.assignments_json(p, call.version));
        }
        if actions {
            v["scheduledActionsForRule@odata.context"] = json!(format!(
                "{meta}#deviceManagement/deviceCompliancePolicies('{}')/{cast}/scheduledActionsForRule(scheduledActionConfigurations())",
                p.id
            ));
            v["scheduledActionsForRule"] = json!([{
                "id": p.id,
                "ruleName": null,
                "scheduledActionConfigurations@odata.context": format!("{meta}#deviceManagement/deviceCompliancePolicies('{}')/{cast}/scheduledActionsForRule('{}')/scheduledActionConfigurations", p.id, p.id),
                "scheduledActionConfigurations": p.actions.iter().map(|(id, a)| json!({
                    "id": id,
                    "gracePeriodHours": a["gracePeriodHours"],
                    "actionType": a["actionType"],
                    "notificationTemplateId": a["notificationTemplateId"],
                    "notificationMessageCCList": a["notificationMessageCCList"],
                })).collect::<Vec<_>>(),
            }]);
        }
        v
    }

    fn assignments_json(&self, p: &Policy, version: Version) -> Vec<Value> {
        p.assignments
            .iter()
            .map(|t| compliance::assignment_json(&p.id, t, version))
            .collect()
    }

    fn policy_route(&mut self, idx: usize, rest: &[&str], call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let meta = call.metadata();
        let bad = |message: &str| intune_error(400, "BadRequest", message, now, request_id);
        match (call.method, rest) {
            ("GET", []) => {
                let (assignments, actions) = expansions(call.q("$expand"));
                let mut v = self.policy_json(&self.policies[idx], assignments, actions, call);
                v["@odata.context"] = json!(format!(
                    "{meta}#deviceManagement/deviceCompliancePolicies/$entity"
                ));
                Response::json(200, v)
            }
            ("PATCH", []) => self.patch_policy(idx, call),
            ("GET", ["assignments"]) => {
                let p = &self.policies[idx];
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#deviceManagement/deviceCompliancePolicies('{}')/assignments", p.id), "value": self.assignments_json(p, call.version)}),
                )
            }
            ("POST", ["assign"]) => {
                let Some(list) = call
                    .body
                    .and_then(|b| b.get("assignments"))
                    .and_then(Value::as_array)
                else {
                    return bad("The request body must contain an 'assignments' array");
                };
                let mut targets: Vec<Value> = Vec::new();
                for item in list {
                    let target =
                        match compliance::parse_target(&item["target"], call.version, |id| {
                            self.group_bits(id).is_some()
                        }) {
                            Ok(target) => target,
                            Err(message) => return bad(&message),
                        };
                    // A duplicate target (same type and id) is ignored (Intune-Toolkit #57).
                    let key = |t: &Value| {
                        (
                            compliance::target_kind(t).to_string(),
                            compliance::target_ref(t),
                        )
                    };
                    if !targets.iter().any(|t| key(t) == key(&target)) {
                        targets.push(target);
                    }
                }
                let p = &mut self.policies[idx];
                p.assignments = targets;
                p.modified = now;
                p.version += 1;
                self.reconfigure();
                self.write("POST", call.path, call.body, 200);
                let p = &self.policies[idx];
                let items: Vec<Value> = self
                    .assignments_json(p, call.version)
                    .into_iter()
                    .map(|mut a| {
                        a["@odata.type"] =
                            json!("#microsoft.graph.deviceCompliancePolicyAssignment");
                        a
                    })
                    .collect();
                Response::json(
                    200,
                    json!({"@odata.context": format!("{meta}#Collection(microsoft.graph.deviceCompliancePolicyAssignment)"), "value": items}),
                )
            }
            ("POST", ["scheduleActionsForRules"]) => {
                let Some(rules) = call
                    .body
                    .and_then(|b| b.get("deviceComplianceScheduledActionForRules"))
                    .and_then(Value::as_array)
                else {
                    return bad(
                        "The request body must contain 'deviceComplianceScheduledActionForRules'",
                    );
                };
                let mut actions = Vec::new();
                for rule in rules {
                    for item in rule["scheduledActionConfigurations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        match compliance::parse_action(item, call.version) {
                            Ok(action) => actions.push(action),
                            Err(message) => return bad(&message),
                        }
                    }
                }
                if actions
                    .iter()
                    .filter(|a| a["actionType"] == "block")
                    .count()
                    != 1
                {
                    return bad(
                        "Compliance policy must have one and only one block scheduled action",
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
                self.reconfigure();
                self.write("POST", call.path, call.body, 204);
                Response::empty(204)
            }
            ("GET", ["deviceStatuses"]) => {
                // Rows are user–device pairs (`status_rows`): the skip token counts pairs, two
                // slots per listed device (its primary user or the system account, then a second
                // user).
                let p = &self.policies[idx];
                let listed = self.intune.listed(p.platform);
                let top = call
                    .q("$top")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(1000)
                    .clamp(1, 1000);
                let mut slot = call.q("$skiptoken").and_then(decode_skiptoken).unwrap_or(0);
                let seed = self.settings.seed;
                let users = self.fleet.user_count();
                let mut page: Vec<Value> = Vec::with_capacity(top);
                while page.len() < top && slot / 2 < listed.len() {
                    let device = listed[slot / 2] as usize;
                    let (owner, _) = self.fleet.device_owner(device);
                    let who = super::intune::device_users(seed, owner, users, device);
                    let user = if slot.is_multiple_of(2) {
                        Some(who.primary)
                    } else {
                        who.second.map(Some)
                    };
                    if let Some(user) = user {
                        let row = self.intune.row(p.platform, device);
                        page.push(self.status_json(device, user, &row, &p.id));
                    }
                    slot += 1;
                }
                let mut body = json!({"@odata.context": format!("{meta}#deviceManagement/deviceCompliancePolicies('{}')/deviceStatuses", p.id)});
                body["value"] = Value::Array(page);
                if slot / 2 < listed.len() {
                    body["@odata.nextLink"] = json!(next_link(call, slot));
                }
                Response::json(200, body)
            }
            ("GET", ["deviceStatusOverview"]) => {
                let p = &self.policies[idx];
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for &device in self.intune.listed(p.platform) {
                    *counts
                        .entry(self.intune.row(p.platform, device as usize).status.as_str())
                        .or_default() += 1;
                }
                let count = |status: &str| counts.get(status).copied().unwrap_or(0);
                Response::json(
                    200,
                    json!({
                        "@odata.context": format!("{meta}#deviceManagement/deviceCompliancePolicies('{}')/deviceStatusOverview/$entity", p.id),
                        "id": p.id,
                        "pendingCount": count("unknown"),
                        "notApplicableCount": 0,
                        "successCount": count("compliant"),
                        "errorCount": count("error"),
                        "failedCount": count("nonCompliant"),
                        "lastUpdateDateTime": now.rfc3339(),
                        "configurationVersion": p.version,
                    }),
                )
            }
            _ => graph_error(
                400,
                "No method match route template",
                &format!(
                    "No OData route exists that match template ~/singleton/navigation/key/navigation with http verb {} for request /StatelessDeviceConfigurationFEService{}.",
                    call.method, call.path
                ),
                now,
                request_id,
            ),
        }
    }

    /// `PATCH .../deviceCompliancePolicies/{id}` (graph-api.md §2.5): the body names the
    /// policy's type; navigation properties cannot be patched.
    fn patch_policy(&mut self, idx: usize, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let bad = |message: &str| intune_error(400, "BadRequest", message, now, request_id);
        let Some(patch) = call.body.and_then(Value::as_object) else {
            return bad("A JSON object is required.");
        };
        let expected = self.policies[idx].odata_type;
        let Some(sent) = patch.get("@odata.type").and_then(Value::as_str) else {
            return bad(&format!(
                "The request body must carry \"@odata.type\": \"{expected}\""
            ));
        };
        if compliance::odata_type(sent).as_deref() != Some(expected) {
            return intune_error(
                400,
                "ModelValidationFailure",
                &format!(
                    "An entry with type '{sent}' was found, but it is not assignable to the expected type '{}'.",
                    expected.trim_start_matches('#')
                ),
                now,
                request_id,
            );
        }
        for navigation in ["scheduledActionsForRule", "assignments"] {
            if patch.contains_key(navigation) {
                return bad(&format!(
                    "The navigation property '{navigation}' cannot be updated with PATCH; use {}",
                    if navigation == "assignments" {
                        "assign"
                    } else {
                        "scheduleActionsForRules"
                    }
                ));
            }
        }
        let name = match patch.get("displayName") {
            None => None,
            Some(Value::String(n)) if !n.is_empty() => Some(n.clone()),
            Some(_) => return bad("displayName must be a non-empty string."),
        };
        let description = match patch.get("description") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(Value::String(d)) => Some(Some(d.clone())),
            Some(_) => return bad("description must be a string or null."),
        };
        let p = &mut self.policies[idx];
        if let Some(name) = name {
            p.name = name;
        }
        if let Some(description) = description {
            p.description = description;
        }
        p.version += 1;
        p.modified = now;
        self.reconfigure();
        self.write("PATCH", call.path, call.body, 200);
        let mut v = self.policy_json(&self.policies[idx], false, false, call);
        v["@odata.context"] = json!(format!(
            "{}#deviceManagement/deviceCompliancePolicies/$entity",
            call.metadata()
        ));
        Response::json(200, v)
    }

    /// One `deviceStatuses` row: a user–device pair. A shared device has a row for each user who
    /// signs in to it; a device without a primary user reports as the system account. The id is
    /// `{deviceId}_{policyId}_{userId}` as in Microsoft's captured responses (the system account
    /// with the nil GUID); clients are told to treat it as opaque.
    fn status_json(&self, device: usize, user: Option<usize>, row: &Row, policy_id: &str) -> Value {
        let (_, platform) = self.fleet.device_owner(device);
        let device_id = guid(self.settings.seed, "device", device);
        let (user_id, name, upn) = match user {
            Some(user) => (
                self.user_id(user),
                format!("User {user}"),
                self.user_principal_name(user),
            ),
            None => (
                NIL_GUID.to_string(),
                SYSTEM_ACCOUNT.to_string(),
                SYSTEM_ACCOUNT.to_string(),
            ),
        };
        json!({
            "id": format!("{device_id}_{policy_id}_{user_id}"),
            "deviceDisplayName": format!("{}-{device:07}", platform.as_str().to_uppercase()),
            "userName": name,
            "deviceModel": null,
            "complianceGracePeriodExpirationDateTime": row.grace_end.map_or("9999-12-31T23:59:59.9999999Z".to_string(), format_time),
            "status": row.status.as_str(),
            "lastReportedDateTime": row.last_reported.map_or(crate::graph::UNSET_TIME.to_string(), format_time),
            "userPrincipalName": upn,
        })
    }

    fn create_ca(&mut self, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let Some(body) = call.body.and_then(Value::as_object) else {
            return graph_error(
                400,
                "BadRequest",
                "A policy body is required.",
                now,
                request_id,
            );
        };
        let mut raw = writable(body);
        raw.insert("createdDateTime".into(), json!(format_time(now)));
        raw.insert("modifiedDateTime".into(), Value::Null);
        if let Err(message) = ca::validate(&raw) {
            return graph_error(400, "BadRequest", &message, now, request_id);
        }
        ca::normalize(&mut raw);
        let name = raw["displayName"].as_str().unwrap_or("").to_string();
        let id = guid(
            self.settings.seed,
            "ca",
            format!("{name}:{}", self.ledger.len()),
        );
        self.ca_policies.push(CaPolicy { id, raw });
        self.reconfigure();
        self.write("POST", call.path, call.body, 201);
        let created = self.ca_policies.last().expect("just pushed");
        let mut v = ca::to_json(&created.id, &created.raw);
        v["@odata.context"] = json!(format!(
            "{}#identity/conditionalAccess/policies/$entity",
            call.metadata()
        ));
        Response::json(201, v)
    }

    fn ca_route(&mut self, id: &str, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        let Some(idx) = self.ca_policies.iter().position(|c| c.id == id) else {
            return graph_error(
                404,
                "ResourceNotFound",
                &format!("Policy '{id}' was not found."),
                now,
                request_id,
            );
        };
        match call.method {
            "GET" => {
                let policy = &self.ca_policies[idx];
                let mut v = ca::to_json(&policy.id, &policy.raw);
                v["@odata.context"] = json!(format!(
                    "{}#identity/conditionalAccess/policies/$entity",
                    call.metadata()
                ));
                Response::json(200, v)
            }
            "PATCH" => {
                let Some(patch) = call.body.and_then(Value::as_object) else {
                    return graph_error(
                        400,
                        "BadRequest",
                        "A JSON object is required.",
                        now,
                        request_id,
                    );
                };
                // Properties not sent keep their values; complex values merge member by member;
                // arrays and scalars sent replace (tenant-safety.md §1).
                let mut merged = Value::Object(self.ca_policies[idx].raw.clone());
                ca::merge(&mut merged, &Value::Object(writable(patch)));
                let Value::Object(mut merged) = merged else {
                    unreachable!("merging objects gives an object")
                };
                if let Err(message) = ca::validate(&merged) {
                    return graph_error(400, "BadRequest", &message, now, request_id);
                }
                ca::normalize(&mut merged);
                merged.insert("modifiedDateTime".into(), json!(format_time(now)));
                self.ca_policies[idx].raw = merged;
                self.reconfigure();
                self.write("PATCH", call.path, call.body, 204);
                Response::empty(204)
            }
            "DELETE" => {
                self.ca_policies.remove(idx);
                self.reconfigure();
                self.write("DELETE", call.path, None, 204);
                Response::empty(204)
            }
            _ => graph_error(405, "BadRequest", "Method not allowed.", now, request_id),
        }
    }

    fn batch(&mut self, request: &Request, version: Version, request_id: &str) -> Response {
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
            let response = self.graph_call(&Call {
                method: &method,
                path: &path,
                query: &query,
                headers: &headers,
                body,
                base_url: &request.base_url,
                request_id: &sub_id,
                version,
            });
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

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// A Conditional Access body without what clients cannot set: `id`, the timestamps and OData
/// annotations are read-only.
fn writable(body: &Map<String, Value>) -> Map<String, Value> {
    body.iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "id" | "createdDateTime" | "modifiedDateTime")
                && !k.starts_with("@odata.")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Which navigation properties `$expand` asks for: (assignments, scheduledActionsForRule).
fn expansions(expand: Option<&str>) -> (bool, bool) {
    let expand = expand.unwrap_or("");
    (
        expand.contains("assignments"),
        expand.contains("scheduledActionsForRule"),
    )
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

/// `prop eq 'X'` → `Some(("prop", "X"))`; anything else → `None`.
fn parse_eq_filter(filter: &str) -> Option<(String, String)> {
    let filter = filter.trim();
    let split = filter.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
    let (property, rest) = filter.split_at(split);
    if property.is_empty() {
        return None;
    }
    let rest = rest.trim_start().strip_prefix("eq")?.trim();
    let inner = rest.strip_prefix('\'')?.strip_suffix('\'')?;
    Some((property.to_string(), inner.replace("''", "'")))
}

/// `displayName eq 'X'` → `Some("X")`; anything else → `None`.
#[cfg(test)]
fn parse_display_name_filter(filter: &str) -> Option<String> {
    parse_eq_filter(filter)
        .filter(|(property, _)| property == "displayName")
        .map(|(_, value)| value)
}

fn graph_root(base_url: &str) -> String {
    base_url.trim_end_matches('/').to_string()
}

fn next_link(call: &Call, offset: usize) -> String {
    let mut parts: Vec<String> = call
        .query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("$skiptoken"))
        .map(|(k, v)| format!("{}={}", k, encode_query_value(v)))
        .collect();
    parts.push(format!("$skiptoken={}", encode_skiptoken(offset)));
    format!(
        "{}/{}{}?{}",
        graph_root(call.base_url),
        call.version.as_str(),
        call.path,
        parts.join("&")
    )
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

/// Decodes `%XX` escapes byte by byte; anything else (a lone `%`, `%` before non-hex or
/// non-ASCII text) is kept as written.
/// 9999-12-31T23:59:59Z.
const LAST_INSTANT: Timestamp = Timestamp::from_millis(253_402_300_799_000);

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((high, low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
