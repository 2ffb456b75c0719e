//! The Microsoft Graph provider: Intune compliance policies and Conditional Access, driven
//! through the mapping in [`mapping`] and the client in [`client`].
//!
//! Every operation reads before it writes. `reconcile` and `restore` loop: read the tenant (one
//! `$batch`), compute the writes that would make it match, make them, and read again; after a
//! write whose outcome is unknown (a timeout, a dropped connection, a 5xx) the loop re-reads
//! instead of repeating the write, so a change that landed is never made twice.

pub mod client;
pub mod mapping;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use reqwest::Method;
use serde_json::{Value, json};

use self::client::{Access, BatchRequest, GraphClient, Secret, encode};
use self::mapping::{CaNames, CaState, GroupRef, Names, TenantConfig, Write};
use super::{ErrorKind, PhaseScope, Provider, ProviderError};
use crate::domain::desired::DesiredState;
use crate::domain::gate::{DeviceReport, DeviceState};
use crate::domain::plan::{GraphSettings, Mode, Plan, Platform, PolicyTarget};
use crate::domain::time::Timestamp;
use crate::graph::{
    ALL_USERS_NAME, ActionItem, Assignment, CaUsers, is_guid, odata_quote, parse_time,
};

/// How many read-compare-write rounds a reconcile may take before giving up.
const ROUNDS: u32 = 8;

pub struct GraphProvider {
    client: GraphClient,
    /// Names resolved so far (they do not change during a run).
    names: Option<Names>,
    resolved_for: Option<PolicyTarget>,
}

/// What a read learns besides the configuration: what is needed to write.
struct Extras {
    enforced_id: Option<String>,
    conditional_access_raw: Option<Value>,
}

fn compatible(platform: Platform, odata_type: &str) -> bool {
    let t = odata_type.to_ascii_lowercase();
    match platform {
        Platform::Windows => t.contains("windows"),
        Platform::Ios => t.contains("ios"),
        Platform::Android => t.contains("android") || t.contains("aosp"),
        Platform::Macos => t.contains("macos"),
    }
}

impl GraphProvider {
    /// Reads the secret from the environment and signs in (which also learns the tenant's time).
    pub async fn connect(settings: GraphSettings) -> Result<GraphProvider, ProviderError> {
        let secret = std::env::var(&settings.client_secret_env)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Auth,
                    format!(
                        "the client secret for tenant {} is not set: put it in the environment variable {}",
                        settings.tenant, settings.client_secret_env
                    ),
                )
            })?;
        GraphProvider::with_secret(settings, secret).await
    }

    /// Signs in with a secret the caller already has.
    pub async fn with_secret(
        settings: GraphSettings,
        secret: String,
    ) -> Result<GraphProvider, ProviderError> {
        let client = GraphClient::new(settings, Secret::new(secret))?;
        match client.sign_in().await {
            Ok(()) => {}
            Err(e) if e.retryable() => {
                tracing::warn!(error = %e, "cannot reach the tenant now; using the local clock");
            }
            Err(e) => return Err(e),
        }
        Ok(GraphProvider {
            client,
            names: None,
            resolved_for: None,
        })
    }

    fn tenant(&self) -> &str {
        &self.client.settings().tenant
    }

    /// Resolves the policy, template, Conditional Access policy and `groups` to ids, in one
    /// `$batch` for everything not resolved yet.
    async fn resolve(
        &mut self,
        target: &PolicyTarget,
        groups: &BTreeSet<String>,
    ) -> Result<Names, ProviderError> {
        if self.resolved_for.as_ref() != Some(target) {
            self.names = None;
        }
        let mut requests = Vec::new();
        let by_name = |kind: &str, collection: &str, name: &str, select: &str| BatchRequest {
            id: format!("{kind}:{name}"),
            url: if is_guid(name) {
                format!("{collection}/{name}{select}")
            } else {
                let sep = if select.is_empty() { "?" } else { "&" };
                format!(
                    "{collection}{}{sep}$filter={}",
                    if select.is_empty() {
                        String::new()
                    } else {
                        select.to_string()
                    },
                    encode(&format!("displayName eq {}", odata_quote(name)))
                )
            },
            headers: Vec::new(),
        };
        if self.names.is_none() {
            requests.push(by_name(
                "policy",
                "/deviceManagement/deviceCompliancePolicies",
                &target.compliance,
                "",
            ));
            if let Some(template) = &target.notification_template {
                requests.push(by_name(
                    "template",
                    "/deviceManagement/notificationMessageTemplates",
                    template,
                    "",
                ));
            }
            if let Some(ca) = &target.conditional_access {
                requests.push(by_name(
                    "ca",
                    "/identity/conditionalAccess/policies",
                    ca,
                    "",
                ));
            }
        }
        let known = self
            .names
            .as_ref()
            .map(|n| n.groups.clone())
            .unwrap_or_default();
        for group in groups.iter().filter(|g| !known.contains_key(*g)) {
            requests.push(by_name(
                "group",
                "/groups",
                group,
                "?$select=id,displayName",
            ));
        }
        let mut names = self.names.clone().unwrap_or_default();
        if requests.is_empty() {
            return Ok(names);
        }
        let answers = self.client.batch_get(&requests).await?;
        let tenant = self.tenant().to_string();
        for (request, answer) in requests.iter().zip(answers) {
            let (kind, name) = request.id.split_once(':').expect("ids are kind:name");
            let found: Vec<Value> = match answer {
                Ok(body) if body.get("value").is_some() => {
                    body["value"].as_array().cloned().unwrap_or_default()
                }
                Ok(body) => vec![body],
                Err(e) if e.kind == ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            let what = match kind {
                "policy" => "compliance policy",
                "template" => "notification message template",
                "ca" => "Conditional Access policy",
                _ => "group",
            };
            if kind == "group" && found.is_empty() && name.eq_ignore_ascii_case(ALL_USERS_NAME) {
                names.groups.insert(name.to_string(), GroupRef::AllUsers);
                continue;
            }
            let one = match found.as_slice() {
                [one] => one,
                [] => {
                    return Err(ProviderError::not_found(format!(
                        "{what} `{name}` not found in tenant {tenant}"
                    )));
                }
                many => {
                    let ids: Vec<&str> = many.iter().filter_map(|v| v["id"].as_str()).collect();
                    return Err(ProviderError::not_found(format!(
                        "{what} `{name}` is ambiguous in tenant {tenant}: {} share the name (ids {}); name it by id",
                        many.len(),
                        ids.join(", ")
                    )));
                }
            };
            let id = one["id"].as_str().unwrap_or_default().to_string();
            match kind {
                "policy" => {
                    let odata_type = one["@odata.type"].as_str().unwrap_or("");
                    if !odata_type.is_empty() && !compatible(target.platform, odata_type) {
                        return Err(ProviderError::permanent(format!(
                            "compliance policy `{name}` is a {}, but the plan's platform is {}",
                            odata_type.trim_start_matches("#microsoft.graph."),
                            target.platform
                        )));
                    }
                    names.policy_id = id;
                }
                "template" => names.template_id = Some(id),
                "ca" => {
                    let requires_compliance = one["grantControls"]["builtInControls"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|v| v == "compliantDevice"));
                    if !requires_compliance {
                        return Err(ProviderError::permanent(format!(
                            "Conditional Access policy `{name}` does not require a compliant device (grantControls.builtInControls has no compliantDevice)"
                        )));
                    }
                    names.conditional_access = Some(CaNames {
                        id,
                        name: one["displayName"].as_str().unwrap_or(name).to_string(),
                    });
                }
                _ => {
                    names.groups.insert(name.to_string(), GroupRef::Id(id));
                }
            }
        }
        self.names = Some(names.clone());
        self.resolved_for = Some(target.clone());
        Ok(names)
    }

    /// Reads what phasegate manages, in one `$batch`.
    async fn read(&self, names: &Names) -> Result<(TenantConfig, Extras), ProviderError> {
        let mut requests = vec![BatchRequest {
            id: "policy".into(),
            url: format!(
                "/deviceManagement/deviceCompliancePolicies/{}?$expand={}",
                names.policy_id,
                encode(
                    "assignments,scheduledActionsForRule($expand=scheduledActionConfigurations)"
                )
            ),
            headers: Vec::new(),
        }];
        if names.conditional_access.is_some() {
            requests.push(BatchRequest {
                id: "ca".into(),
                url: "/identity/conditionalAccess/policies".into(),
                headers: Vec::new(),
            });
        }
        let mut answers = self.client.batch_get(&requests).await?.into_iter();
        let policy = answers.next().expect("one answer per request")?;
        let assignments = policy["assignments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| serde_json::from_value::<Assignment>(a.clone()).ok())
            .map(|a| a.target)
            .collect();
        let actions: Vec<ActionItem> = policy["scheduledActionsForRule"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|rule| {
                rule["scheduledActionConfigurations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|a| serde_json::from_value(a).ok())
            .collect();
        let mut config = TenantConfig {
            assignments,
            actions,
            conditional_access: None,
            enforced: None,
        };
        let mut extras = Extras {
            enforced_id: None,
            conditional_access_raw: None,
        };
        if let Some(ca) = &names.conditional_access {
            let list = answers.next().expect("one answer per request")?;
            let policies = list["value"].as_array().cloned().unwrap_or_default();
            let state_of = |p: &Value| CaState {
                state: p["state"].as_str().unwrap_or("").to_string(),
                users: serde_json::from_value::<CaUsers>(p["conditions"]["users"].clone())
                    .unwrap_or_default(),
            };
            let named = policies
                .iter()
                .find(|p| p["id"] == ca.id.as_str())
                .ok_or_else(|| {
                    ProviderError::not_found(format!(
                        "Conditional Access policy `{}` disappeared from the tenant",
                        ca.name
                    ))
                })?;
            config.conditional_access = Some(state_of(named));
            extras.conditional_access_raw = Some(named.clone());
            let copies: Vec<&Value> = policies
                .iter()
                .filter(|p| p["displayName"] == ca.enforced_name().as_str())
                .collect();
            if copies.len() > 1 {
                tracing::warn!(count = copies.len(), name = %ca.enforced_name(), "several enforced copies exist; managing the first");
            }
            if let Some(copy) = copies.first() {
                config.enforced = Some(state_of(copy));
                extras.enforced_id = copy["id"].as_str().map(str::to_string);
            }
        }
        Ok((config, extras))
    }

    async fn execute(
        &self,
        names: &Names,
        extras: &Extras,
        write: &Write,
    ) -> Result<(), ProviderError> {
        let policy = format!(
            "/deviceManagement/deviceCompliancePolicies/{}",
            names.policy_id
        );
        let ca_path = |id: &str| format!("/identity/conditionalAccess/policies/{id}");
        let users_json = |users: &CaUsers| serde_json::to_value(users).expect("json serializes");
        let patch_body = |state: &Option<String>, users: &Option<CaUsers>| {
            let mut body = json!({});
            if let Some(state) = state {
                body["state"] = json!(state);
            }
            if let Some(users) = users {
                body["conditions"] = json!({"users": users_json(users)});
            }
            body
        };
        let (method, path, body) = match write {
            Write::Assign(targets) => (
                Method::POST,
                format!("{policy}/assign"),
                json!({"assignments": targets.iter().map(|t| json!({
                    "@odata.type": "#microsoft.graph.deviceCompliancePolicyAssignment",
                    "target": t,
                })).collect::<Vec<_>>()}),
            ),
            Write::Actions(actions) => (
                Method::POST,
                format!("{policy}/scheduleActionsForRules"),
                json!({"deviceComplianceScheduledActionForRules": [{
                    "ruleName": "PasswordRequired",
                    "scheduledActionConfigurations": actions,
                }]}),
            ),
            Write::PatchConditionalAccess { state, users } => {
                let id = &names
                    .conditional_access
                    .as_ref()
                    .expect("only written when named")
                    .id;
                (Method::PATCH, ca_path(id), patch_body(state, users))
            }
            Write::PatchEnforced { state, users } => {
                let id = extras
                    .enforced_id
                    .as_deref()
                    .expect("only patched when it exists");
                (Method::PATCH, ca_path(id), patch_body(state, users))
            }
            Write::DeleteEnforced => {
                let id = extras
                    .enforced_id
                    .as_deref()
                    .expect("only deleted when it exists");
                (Method::DELETE, ca_path(id), Value::Null)
            }
            Write::CreateEnforced(copy) => {
                let ca = names
                    .conditional_access
                    .as_ref()
                    .expect("only created when named");
                let raw = extras.conditional_access_raw.clone().unwrap_or(Value::Null);
                let mut conditions = strip_nulls(raw["conditions"].clone());
                conditions["users"] = users_json(&copy.users);
                let grant = &raw["grantControls"];
                (
                    Method::POST,
                    "/identity/conditionalAccess/policies".to_string(),
                    json!({
                        "displayName": ca.enforced_name(),
                        "state": copy.state,
                        "conditions": conditions,
                        "grantControls": {
                            "operator": grant["operator"].as_str().unwrap_or("OR"),
                            "builtInControls": grant["builtInControls"].clone(),
                        },
                    }),
                )
            }
        };
        tracing::info!(write = write.name(), %method, %path, "changing the tenant");
        let body = (!body.is_null()).then_some(&body);
        self.client
            .call(method, &path, body, &[], Access::Write)
            .await
            .map(|_| ())
    }

    /// Read, compare, write the difference, until the tenant matches what `wanted` says.
    async fn converge(
        &self,
        names: &Names,
        wanted: impl Fn(&TenantConfig) -> Result<TenantConfig, String>,
    ) -> Result<u64, ProviderError> {
        let mut changes = 0;
        'rounds: for round in 0..ROUNDS {
            let (current, extras) = self.read(names).await?;
            let target = wanted(&current).map_err(ProviderError::permanent)?;
            let writes = mapping::plan_writes(&current, &target);
            if writes.is_empty() {
                return Ok(changes);
            }
            for write in &writes {
                crate::crash::point("write.before");
                let outcome = self.execute(names, &extras, write).await;
                crate::crash::point("write.after");
                match outcome {
                    Ok(()) => changes += 1,
                    Err(e) if e.retryable() => {
                        let delay = e
                            .retry_after
                            .unwrap_or(Duration::from_millis(250 << round.min(6)));
                        tracing::warn!(write = write.name(), error = %e, ?delay, "a write may or may not have landed; reading the tenant again before deciding");
                        tokio::time::sleep(delay).await;
                        continue 'rounds;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(ProviderError::transient(format!(
            "tenant {} did not settle after {ROUNDS} read-compare-write rounds",
            self.tenant()
        )))
    }
}

fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

fn groups_of(desired: &DesiredState) -> BTreeSet<String> {
    desired
        .assignments
        .iter()
        .flat_map(|a| a.include.iter().chain(&a.exclude).cloned())
        .collect()
}

fn baseline_config(baseline: &Value) -> Result<TenantConfig, ProviderError> {
    serde_json::from_value(baseline.clone())
        .map_err(|e| ProviderError::permanent(format!("the recorded baseline is unreadable: {e}")))
}

/// One device status as the gate needs it.
struct Status {
    user: String,
    state: Option<DeviceState>,
    last_reported: Option<Timestamp>,
    grace_until: Option<Timestamp>,
}

fn status_of(item: &Value) -> Status {
    let state = match item["status"].as_str().unwrap_or("unknown") {
        "compliant" | "remediated" => Some(DeviceState::Compliant),
        "nonCompliant" => Some(DeviceState::Noncompliant),
        "error" => Some(DeviceState::Error),
        "conflict" => Some(DeviceState::Conflict),
        "notApplicable" | "notAssigned" => None,
        _ => Some(DeviceState::Unknown),
    };
    Status {
        user: item["userPrincipalName"]
            .as_str()
            .unwrap_or("")
            .to_lowercase(),
        state,
        last_reported: item["lastReportedDateTime"].as_str().and_then(parse_time),
        grace_until: item["complianceGracePeriodExpirationDateTime"]
            .as_str()
            .and_then(parse_time),
    }
}

#[async_trait]
impl Provider for GraphProvider {
    fn describe(&self) -> String {
        format!("graph {}", self.tenant())
    }

    fn now(&self) -> Timestamp {
        self.client.now()
    }

    fn is_virtual(&self) -> bool {
        self.client.is_manual_clock()
    }

    fn real_time_until(&self, at: Timestamp) -> Duration {
        let factor = self.client.clock_factor();
        let ahead = at.since(self.now());
        if factor > 0.0 {
            ahead.div_f64(factor)
        } else {
            ahead
        }
    }

    async fn advance_to(&mut self, at: Timestamp) -> Result<(), ProviderError> {
        self.client.advance_clock(at).await
    }

    async fn preflight(&mut self, plan: &Plan) -> Result<(), ProviderError> {
        let groups: BTreeSet<String> = plan
            .phases
            .iter()
            .flat_map(|p| p.include.iter().chain(&p.exclude).cloned())
            .collect();
        let names = self.resolve(&plan.policy, &groups).await?;
        if plan.phases.iter().any(|p| p.mode == Mode::Notify) && names.template_id.is_none() {
            return Err(ProviderError::not_found(
                "a notify phase needs `notification_template` in the plan's [policy]: the Graph provider notifies owners through the policy's notification action",
            ));
        }
        Ok(())
    }

    async fn capture_baseline(&mut self, target: &PolicyTarget) -> Result<Value, ProviderError> {
        let names = self.resolve(target, &BTreeSet::new()).await?;
        let (config, _) = self.read(&names).await?;
        Ok(serde_json::to_value(config).expect("json serializes"))
    }

    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        baseline: &Value,
    ) -> Result<u64, ProviderError> {
        let names = self.resolve(target, &groups_of(desired)).await?;
        let baseline = baseline_config(baseline)?;
        self.converge(&names, |current| {
            mapping::desired_config(desired, &names, &baseline, current)
        })
        .await
    }

    async fn restore(
        &mut self,
        target: &PolicyTarget,
        baseline: &Value,
    ) -> Result<u64, ProviderError> {
        let names = self.resolve(target, &BTreeSet::new()).await?;
        let baseline = baseline_config(baseline)?;
        self.converge(&names, |_| Ok(mapping::restore_config(&baseline)))
            .await
    }

    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
    ) -> Result<Vec<Vec<DeviceReport>>, ProviderError> {
        let groups: BTreeSet<String> = scopes
            .iter()
            .flat_map(|s| s.include.iter().chain(&s.exclude).cloned())
            .collect();
        let names = self.resolve(target, &groups).await?;
        let group_ids: BTreeSet<String> = names
            .groups
            .iter()
            .filter(|(name, _)| groups.contains(*name))
            .filter_map(|(_, g)| match g {
                GroupRef::Id(id) => Some(id.clone()),
                GroupRef::AllUsers => None,
            })
            .collect();
        let client = &self.client;
        let statuses = async {
            let mut statuses = Vec::new();
            let url = format!(
                "/deviceManagement/deviceCompliancePolicies/{}/deviceStatuses",
                names.policy_id
            );
            client
                .for_each_page(&url, &[], |page| {
                    statuses.extend(page.iter().map(status_of))
                })
                .await?;
            Ok::<_, ProviderError>(statuses)
        };
        let members = try_join_all(group_ids.iter().map(|id| async move {
            let mut users = HashSet::new();
            let url = format!(
                "/groups/{id}/transitiveMembers/microsoft.graph.user?$select=id,userPrincipalName&$top=999&$count=true"
            );
            client
                .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
                    users.extend(page.iter().filter_map(|u| u["userPrincipalName"].as_str()).map(str::to_lowercase));
                })
                .await?;
            Ok::<_, ProviderError>((id.clone(), users))
        }));
        let (statuses, members) = tokio::try_join!(statuses, members)?;
        let members: BTreeMap<String, HashSet<String>> = members.into_iter().collect();
        let now = self.client.now();
        let enforcing = names.conditional_access.is_some();
        let in_group = |group: &GroupRef, user: &str| match group {
            GroupRef::AllUsers => true,
            GroupRef::Id(id) => members.get(id).is_some_and(|m| m.contains(user)),
        };
        let resolve = |name: &String| names.groups.get(name).cloned();
        Ok(scopes
            .iter()
            .map(|scope| {
                let include: Vec<GroupRef> = scope.include.iter().filter_map(resolve).collect();
                let exclude: Vec<GroupRef> = scope.exclude.iter().filter_map(resolve).collect();
                statuses
                    .iter()
                    .filter(|s| {
                        include.iter().any(|g| in_group(g, &s.user))
                            && !exclude.iter().any(|g| in_group(g, &s.user))
                    })
                    .filter_map(|s| {
                        let mut state = s.state?;
                        if state == DeviceState::Noncompliant
                            && s.grace_until.is_some_and(|g| g > now)
                        {
                            state = DeviceState::InGrace;
                        }
                        let last_reported =
                            s.last_reported.filter(|_| state != DeviceState::Unknown);
                        Some(DeviceReport {
                            state,
                            last_reported,
                            blocked: state == DeviceState::Noncompliant
                                && scope.mode == Mode::Enforce
                                && enforcing,
                        })
                    })
                    .collect()
            })
            .collect())
    }
}
