//! The Microsoft Graph provider: Intune compliance policies and Conditional Access in a tenant
//! that other administrators configured, driven through the mapping in [`mapping`] and the
//! client in [`client`].
//!
//! phasegate owns **members**, not objects (see [`mapping`]): every write carries everything
//! else of its object through as it was read. Every operation reads before it writes:
//! `reconcile` and `restore` loop — read the objects whole, project them onto the managed
//! members, compare with what phasegate last made them (someone else's change is drift: stop and
//! let a person decide), compute the writes, make them, read again. After a write whose outcome
//! is unknown (a timeout, a dropped connection, a 5xx) the loop re-reads instead of repeating the
//! write, so a change that landed is never made twice. A write Intune holds for Multi Admin
//! Approval is remembered (with the digest of its body) and resubmitted once, with the approval
//! code, when the request is approved.
//!
//! Versions: compliance policies' assignments and actions are read and written through **beta**,
//! because v1.0 drops assignment filters (and knows no `remoteLock` action) and a write back
//! through v1.0 would delete them; everything else is v1.0.

pub mod client;
pub mod credential;
pub mod devices;
pub mod directory;
pub mod export;
pub mod mapping;
pub mod readiness;
pub mod settings;
pub mod signins;
pub mod statuses;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::future::try_join_all;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use self::client::{Access, BatchRequest, GraphClient, encode};
use self::credential::{Credential, Secret};
use self::mapping::{
    CaNames, CaRole, GraceState, GroupRef, Members, Names, PolicyName, PolicyView, Scope,
    TenantView, Want, Write,
};
use self::statuses::{Status, Users};
use super::{
    ErrorKind, Observation, Outcome, PhaseScope, Preflight, Provider, ProviderError, Record,
    SignInQuery,
};
use crate::domain::desired::{DesiredState, PlanGroups};
use crate::domain::event::{DriftChange, DriftResolution, TenantRequest};
use crate::domain::forecast::{DeviceFacts, Labels, MAX_LABELS};
use crate::domain::gate::{DeviceReport, DeviceState};
use crate::domain::plan::{Mode, Plan, Platform, PolicyTarget};
use crate::domain::signins::SignIns;
use crate::domain::time::Timestamp;
use crate::graph::{ALL_USERS_NAME, is_guid, odata_quote, parse_time};
pub use settings::GraphSettings;
use settings::ObserveThrough;

/// How many read-compare-write rounds a reconcile may take before giving up.
const ROUNDS: u32 = 10;

/// How long to wait before reading the tenant again after a write that may or may not have
/// landed in round `round`: what the tenant asked for, or a growing pause. `None` when the
/// tenant asked for longer than a request waits in-line (`Backoff::GRAPH`): the write fails with
/// the asked delay instead of holding its rollout's work for as long as a server cares to name.
fn settle_delay(e: &ProviderError, round: u32) -> Option<Duration> {
    let delay = e
        .retry_after
        .unwrap_or(Duration::from_millis(250 << round.min(6)));
    (delay <= crate::retry::Backoff::GRAPH.longest_wait).then_some(delay)
}

pub struct GraphProvider {
    client: GraphClient,
    /// The store this process works for: named in the ownership line it writes.
    store_id: String,
    /// Facts the provider settles on before it writes them (a derived grace), flushed first, so
    /// that after a crash it recognises its own write instead of taking it for drift.
    journal: Option<crate::store::KvTree>,
    /// Names resolved so far (they do not change during a run).
    names: Option<Names>,
    resolved_for: Option<PolicyTarget>,
}

/// What the provider keeps about one rollout (the engine stores it with each outcome).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct GraphRecord {
    /// The objects as they were before the rollout's first change.
    baseline: TenantView,
    /// The objects as phasegate last left them (or, after `adopt`, as it accepted them).
    applied: TenantView,
    role: Option<CaRole>,
    #[serde(default)]
    rollout: String,
    /// The plan's groups: the members managed for the whole rollout.
    #[serde(default)]
    groups: PlanGroups,
    #[serde(default)]
    emergency_users: Vec<String>,
    /// Members a person adopted; phasegate no longer writes them.
    #[serde(default)]
    released: BTreeSet<String>,
    #[serde(default)]
    grace: BTreeMap<String, GraceState>,
    /// A write the tenant holds for approval.
    #[serde(default)]
    held: Option<HeldWrite>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct HeldWrite {
    reference: String,
    /// SHA-256 of method, path and body: the approval is for exactly this write.
    digest: String,
    summary: String,
}

impl GraphRecord {
    fn parse(record: &Record) -> Result<GraphRecord, ProviderError> {
        serde_json::from_value(record.clone()).map_err(|e| {
            ProviderError::permanent(format!("the recorded baseline is unreadable: {e}"))
        })
    }

    fn to_value(&self) -> Record {
        serde_json::to_value(self).expect("records serialize")
    }

    fn role(&self) -> CaRole {
        self.role.unwrap_or(CaRole::None)
    }
}

/// What a converge does.
enum Job<'a> {
    Reconcile {
        desired: &'a DesiredState,
        resolution: Option<DriftResolution>,
    },
    /// The rollout completed: the ownership lines go, nothing else changes.
    Release,
    /// Abort: back to the baseline, keeping what others changed since.
    Restore,
}

/// Whether a compliance policy's `@odata.type` is of `platform`.
pub fn compatible(platform: Platform, odata_type: &str) -> bool {
    let t = odata_type.to_ascii_lowercase();
    match platform {
        Platform::Windows => t.contains("windows"),
        Platform::Ios => t.contains("ios"),
        Platform::Android => t.contains("android") || t.contains("aosp"),
        Platform::Macos => t.contains("macos"),
    }
}

fn role_of(view: &TenantView, named: bool) -> CaRole {
    match &view.conditional_access {
        _ if !named => CaRole::None,
        Some(ca) if ca["state"] == "enabled" => CaRole::Relied,
        _ => CaRole::Managed,
    }
}

fn digest(method: &Method, path: &str, body: &Value) -> String {
    let text = format!("{method} {path} {body}");
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl GraphProvider {
    /// Reads the credential (a secret from the environment, a certificate from its file, ...)
    /// and signs in, which also learns the tenant's time.
    pub async fn connect(
        settings: GraphSettings,
        store_id: &str,
        journal: Option<crate::store::KvTree>,
    ) -> Result<GraphProvider, ProviderError> {
        let credential = Credential::load(&settings.credential, &settings.tenant)?;
        let mut provider = GraphProvider::with_credential(settings, credential, store_id).await?;
        provider.journal = journal;
        Ok(provider)
    }

    /// Signs in with a secret the caller already has.
    pub async fn with_secret(
        settings: GraphSettings,
        secret: String,
        store_id: &str,
    ) -> Result<GraphProvider, ProviderError> {
        GraphProvider::with_credential(settings, Secret::new(secret).into(), store_id).await
    }

    /// Signs in with a credential already loaded.
    pub async fn with_credential(
        settings: GraphSettings,
        credential: Credential,
        store_id: &str,
    ) -> Result<GraphProvider, ProviderError> {
        let client = GraphClient::new(settings, credential)?;
        match client.sign_in().await {
            Ok(()) => {}
            Err(e) if e.retryable() => {
                tracing::warn!(error = %e, "cannot reach the tenant now; using the local clock");
            }
            Err(e) => return Err(e),
        }
        Ok(GraphProvider {
            client,
            store_id: store_id.to_string(),
            journal: None,
            names: None,
            resolved_for: None,
        })
    }

    fn tenant(&self) -> &str {
        &self.client.settings().tenant
    }

    /// Resolves the policies, template, Conditional Access policy, `groups` and emergency
    /// `users` to ids, in one `$batch` for everything not resolved yet.
    async fn resolve(
        &mut self,
        target: &PolicyTarget,
        groups: &BTreeSet<String>,
        users: &[String],
    ) -> Result<Names, ProviderError> {
        if self.resolved_for.as_ref() != Some(target) {
            self.names = None;
        }
        let by_name = |kind: &str, collection: &str, name: &str, select: &str| BatchRequest {
            id: format!("{kind}:{name}"),
            url: if is_guid(name) {
                format!("{collection}/{name}{select}")
            } else {
                let sep = if select.is_empty() { "?" } else { "&" };
                format!(
                    "{collection}{select}{sep}$filter={}",
                    encode(&format!("displayName eq {}", odata_quote(name)))
                )
            },
            headers: Vec::new(),
        };
        let mut requests = Vec::new();
        if self.names.is_none() {
            for (i, policy) in target.compliance.iter().enumerate() {
                requests.push(by_name(
                    &format!("policy{i}"),
                    "/deviceManagement/deviceCompliancePolicies",
                    &policy.name,
                    "",
                ));
            }
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
        let mut names = self.names.clone().unwrap_or_default();
        for group in groups.iter().filter(|g| !names.groups.contains_key(*g)) {
            requests.push(by_name(
                "group",
                "/groups",
                group,
                "?$select=id,displayName",
            ));
        }
        for user in users {
            let known = names
                .emergency_users
                .iter()
                .any(|(id, upn)| id == user || upn.eq_ignore_ascii_case(user));
            if !known {
                requests.push(BatchRequest {
                    id: format!("user:{user}"),
                    url: format!("/users/{}?$select=id,userPrincipalName", encode(user)),
                    headers: Vec::new(),
                });
            }
        }
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
                k if k.starts_with("policy") => "compliance policy",
                "template" => "notification message template",
                "ca" => "Conditional Access policy",
                "user" => "emergency-access user",
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
                k if k.starts_with("policy") => {
                    let index: usize = k.trim_start_matches("policy").parse().unwrap_or(0);
                    let wanted = &target.compliance[index];
                    let odata_type = one["@odata.type"].as_str().unwrap_or("");
                    if !odata_type.is_empty() && !compatible(wanted.platform, odata_type) {
                        return Err(ProviderError::permanent(format!(
                            "compliance policy `{name}` is a {}, but the plan says it is for {}",
                            odata_type.trim_start_matches("#microsoft.graph."),
                            wanted.platform
                        )));
                    }
                    names.policies.push(PolicyName {
                        id,
                        name: one["displayName"].as_str().unwrap_or(name).to_string(),
                        platform: wanted.platform,
                    });
                }
                "template" => names.template_id = Some(id),
                "ca" => {
                    if !mapping::requires_compliance(one) {
                        return Err(ProviderError::permanent(format!(
                            "Conditional Access policy `{name}` does not require a compliant device: its grant controls need `compliantDevice`, alone or with the AND operator"
                        )));
                    }
                    names.conditional_access = Some(CaNames {
                        id,
                        name: one["displayName"].as_str().unwrap_or(name).to_string(),
                    });
                }
                "user" => {
                    let upn = one["userPrincipalName"].as_str().unwrap_or(name);
                    names.emergency_users.push((id, upn.to_lowercase()));
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

    /// Reads every object phasegate may write, whole: the compliance policies through beta (one
    /// `$batch`), the Conditional Access policies through v1.0.
    async fn read(&self, names: &Names) -> Result<TenantView, ProviderError> {
        let requests: Vec<BatchRequest> = names
            .policies
            .iter()
            .map(|p| BatchRequest {
                id: p.id.clone(),
                url: format!(
                    "/deviceManagement/deviceCompliancePolicies/{}?$expand={}",
                    p.id,
                    encode(
                        "assignments,scheduledActionsForRule($expand=scheduledActionConfigurations)"
                    )
                ),
                headers: Vec::new(),
            })
            .collect();
        let answers = self.client.batch_get_beta(&requests).await?;
        let mut view = TenantView::default();
        for (request, answer) in requests.iter().zip(answers) {
            let policy = answer?;
            let actions = mapping::scheduled_actions(&policy);
            view.policies.insert(
                request.id.clone(),
                PolicyView {
                    odata_type: policy["@odata.type"].as_str().unwrap_or("").to_string(),
                    description: policy["description"].as_str().map(str::to_string),
                    assignments: policy["assignments"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    actions,
                },
            );
        }
        if let Some(ca) = &names.conditional_access {
            let list = self
                .client
                .call(
                    Method::GET,
                    "/identity/conditionalAccess/policies",
                    None,
                    &[],
                    Access::Read,
                )
                .await?;
            let policies = list["value"].as_array().cloned().unwrap_or_default();
            let named = policies
                .iter()
                .find(|p| p["id"] == ca.id.as_str())
                .ok_or_else(|| {
                    ProviderError::not_found(format!(
                        "Conditional Access policy `{}` disappeared from the tenant",
                        ca.name
                    ))
                })?;
            view.conditional_access = Some(named.clone());
            let copies: Vec<&Value> = policies
                .iter()
                .filter(|p| p["displayName"] == ca.enforced_name().as_str())
                .collect();
            if copies.len() > 1 {
                tracing::warn!(count = copies.len(), name = %ca.enforced_name(), "several enforced copies exist; managing the first");
            }
            view.enforced = copies.first().map(|c| (*c).clone());
        }
        Ok(view)
    }

    fn scope_sets(
        names: &Names,
        groups: &PlanGroups,
    ) -> Result<(BTreeSet<GroupRef>, BTreeSet<GroupRef>), ProviderError> {
        let resolve = |list: &[String]| -> Result<BTreeSet<GroupRef>, ProviderError> {
            list.iter()
                .map(|g| names.resolve(g).map_err(ProviderError::permanent))
                .collect()
        };
        Ok((resolve(&groups.include)?, resolve(&groups.exclude)?))
    }

    fn marker(&self, rollout: &str) -> String {
        mapping::claim_marker(rollout, &self.store_id)
    }

    /// The earliest first noncompliance among the policy's devices, from their grace ends: Intune
    /// reports `complianceGracePeriodExpirationDateTime` = first noncompliant evaluation + grace.
    async fn earliest_noncompliant(
        &self,
        policy: &str,
        grace_hours: i64,
    ) -> Result<Option<Timestamp>, ProviderError> {
        let mut earliest: Option<Timestamp> = None;
        let url = format!("/deviceManagement/deviceCompliancePolicies/{policy}/deviceStatuses");
        let grace = Duration::from_secs(grace_hours.max(0) as u64 * 3600);
        self.client
            .for_each_page(&url, &[], |page| {
                for row in page {
                    if row["status"] != "nonCompliant" {
                        continue;
                    }
                    let Some(end) = row["complianceGracePeriodExpirationDateTime"]
                        .as_str()
                        .filter(|d| !d.starts_with("9999"))
                        .and_then(parse_time)
                    else {
                        continue;
                    };
                    let first = end.minus(grace);
                    earliest = Some(earliest.map_or(first, |e| e.min(first)));
                }
            })
            .await?;
        Ok(earliest)
    }

    /// Keeps the derived grace of each policy whose notification is on: when it was first seen
    /// on, and (with `derive`) the grace that keeps the promise from then on. Forgotten when it
    /// goes off. Returns whether a grace is still to be derived.
    async fn update_grace(
        &self,
        record: &mut GraphRecord,
        desired: &DesiredState,
        current: &Members,
        derive: bool,
    ) -> Result<bool, ProviderError> {
        let notify: Vec<_> = desired
            .assignments
            .iter()
            .filter(|a| a.mode == Mode::Notify)
            .collect();
        let promised = notify
            .iter()
            .filter_map(|a| a.grace_secs)
            .max()
            .unwrap_or(0);
        let margin = notify.iter().map(|a| a.margin_secs).max().unwrap_or(0);
        let now = self.client.now();
        let ids: Vec<String> = record.baseline.policies.keys().cloned().collect();
        let mut pending = false;
        for id in ids {
            let on = current
                .get(&format!("policy/{id}/notification"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if !on || notify.is_empty() {
                record.grace.remove(&id);
                self.journal(&record.rollout, &id, None)?;
                continue;
            }
            let journaled = self.journaled(&record.rollout, &id);
            let state = record.grace.entry(id.clone()).or_default();
            if let Some(journaled) = journaled {
                // Settled on before a write whose outcome the record does not know yet.
                if state.derived_hours.is_none() {
                    *state = journaled;
                }
            }
            if state.notified_since.is_none() {
                state.notified_since = Some(now);
                let state = state.clone();
                self.journal(&record.rollout, &id, Some(&state))?;
            }
            let since = state.notified_since.expect("set above");
            if state.derived_hours.is_some() {
                continue;
            }
            if !derive {
                pending = true;
                continue;
            }
            let grace = current
                .get(&format!("policy/{id}/grace"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let earliest = self.earliest_noncompliant(&id, grace).await?;
            let hours = mapping::derive_grace(since, earliest, promised, margin);
            tracing::info!(policy = %id, hours, "derived the block grace that keeps the notify promise");
            let state = record.grace.get_mut(&id).expect("inserted above");
            state.derived_hours = Some(hours);
            let state = state.clone();
            self.journal(&record.rollout, &id, Some(&state))?;
        }
        Ok(pending)
    }

    /// A request the tenant holds, remembered durably so a crash does not make a second one.
    fn journaled_hold(&self, rollout: &str) -> Option<HeldWrite> {
        let bytes = self
            .journal
            .as_ref()?
            .get(format!("held/{rollout}"))
            .ok()
            .flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn journal_hold(&self, rollout: &str, held: Option<&HeldWrite>) -> Result<(), ProviderError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let fail = |e: crate::store::StoreError| {
            ProviderError::permanent(format!("cannot record the provider's journal: {e}"))
        };
        let key = format!("held/{rollout}");
        match held {
            Some(held) => {
                journal
                    .insert(key, serde_json::to_vec(held).expect("holds serialize"))
                    .map_err(fail)?;
            }
            None => {
                journal.remove(key).map_err(fail)?;
            }
        }
        journal.flush().map_err(fail)?;
        Ok(())
    }

    fn journal_key(rollout: &str, policy: &str) -> String {
        format!("grace/{rollout}/{policy}")
    }

    fn journaled(&self, rollout: &str, policy: &str) -> Option<GraceState> {
        let journal = self.journal.as_ref()?;
        let bytes = journal
            .get(Self::journal_key(rollout, policy))
            .ok()
            .flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records (or forgets) a policy's grace state durably before it is acted on.
    fn journal(
        &self,
        rollout: &str,
        policy: &str,
        state: Option<&GraceState>,
    ) -> Result<(), ProviderError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let key = Self::journal_key(rollout, policy);
        let fail = |e: crate::store::StoreError| {
            ProviderError::permanent(format!("cannot record the provider's journal: {e}"))
        };
        match state {
            Some(state) => {
                let bytes = serde_json::to_vec(state).expect("grace states serialize");
                if journal.get(&key).map_err(fail)?.as_deref() == Some(bytes.as_slice()) {
                    return Ok(());
                }
                journal.insert(key, bytes).map_err(fail)?;
            }
            None => {
                if journal.remove(key).map_err(fail)?.is_none() {
                    return Ok(());
                }
            }
        }
        journal.flush().map_err(fail)?;
        Ok(())
    }

    /// Read, compare, write the difference, until the tenant matches what the job wants.
    async fn converge(
        &mut self,
        names: &Names,
        record: &mut GraphRecord,
        job: Job<'_>,
    ) -> Result<Outcome, ProviderError> {
        let (include, exclude) = Self::scope_sets(names, &record.groups)?;
        let mut changes = 0;
        let platforms: Vec<Platform> = names.policies.iter().map(|p| p.platform).collect();
        'rounds: for round in 0..ROUNDS {
            let view = self.read(names).await?;
            let scope = Scope {
                names,
                role: record.role(),
                include: &include,
                exclude: &exclude,
            };
            let current = mapping::members(&view, &scope);
            let baseline = mapping::members(&record.baseline, &scope);
            let last = mapping::members(&record.applied, &scope);
            let wanted = match &job {
                Job::Restore => mapping::restored(&baseline, &last, &current, &record.released),
                Job::Release => current
                    .iter()
                    .map(|(k, v)| {
                        let value = if k.ends_with("claim") {
                            baseline.get(k).cloned().unwrap_or(Value::Null)
                        } else {
                            v.clone()
                        };
                        (k.clone(), value)
                    })
                    .collect(),
                Job::Reconcile {
                    desired,
                    resolution,
                } => {
                    let derive_later = self.update_grace(record, desired, &current, false).await?;
                    let marker = self.marker(&desired.rollout);
                    let want =
                        |released: &BTreeSet<String>, grace: &BTreeMap<String, GraceState>| {
                            mapping::wanted(&Want {
                                desired,
                                scope: &scope,
                                baseline: &baseline,
                                current: &current,
                                current_view: &view,
                                released,
                                grace,
                                marker: &marker,
                                platforms: &platforms,
                            })
                            .map_err(ProviderError::permanent)
                        };
                    let mut wanted = want(&record.released, &record.grace)?;
                    if *resolution != Some(DriftResolution::Reapply) {
                        let drifted =
                            mapping::drift(&last, &current, &wanted, &record.released, names);
                        if !drifted.is_empty() {
                            if *resolution != Some(DriftResolution::Adopt) {
                                return Ok(Outcome::Drifted {
                                    changes: drifted.into_iter().map(|(_, c)| c).collect(),
                                });
                            }
                            for (key, change) in drifted {
                                tracing::info!(%change, "adopting another administrator's change");
                                if !key.starts_with("ca/relied/") {
                                    record.released.insert(key);
                                }
                            }
                            record.applied = view.clone();
                            wanted = want(&record.released, &record.grace)?;
                        }
                    }
                    // The grace is lowered last, once everything else is in place: the order
                    // of writes is the same whether or not a crash came in between.
                    let nothing_else = mapping::plan_writes(&view, &current, &wanted, names)
                        .map_err(ProviderError::conflict)?
                        .is_empty();
                    if derive_later && nothing_else {
                        self.update_grace(record, desired, &current, true).await?;
                        wanted = want(&record.released, &record.grace)?;
                    }
                    wanted
                }
            };
            let writes = mapping::plan_writes(&view, &current, &wanted, names)
                .map_err(ProviderError::conflict)?;
            if writes.is_empty() {
                record.applied = view;
                record.held = None;
                return Ok(Outcome::Done {
                    changes,
                    record: record.to_value(),
                });
            }
            for write in &writes {
                crate::crash::point("write.before");
                let outcome = self.execute(names, &view, write, record, &job).await;
                crate::crash::point("write.after");
                match outcome {
                    Ok(Some(request)) => {
                        return Ok(Outcome::Held {
                            request,
                            record: record.to_value(),
                        });
                    }
                    Ok(None) => changes += 1,
                    Err(e) if e.retryable() => {
                        let Some(delay) = settle_delay(&e, round) else {
                            return Err(e);
                        };
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

    /// Why a write is made, for the tenant's change approval.
    fn justification(record: &GraphRecord, job: &Job<'_>, summary: &str) -> String {
        let context = match job {
            Job::Reconcile { desired, .. } => {
                let phases = if desired.change.phases.is_empty() {
                    String::new()
                } else {
                    format!(", phase {}", desired.change.phases.join(", "))
                };
                let ticket = desired
                    .change
                    .ticket
                    .as_ref()
                    .map(|t| format!(", ticket {t}"))
                    .unwrap_or_default();
                format!("phasegate rollout {}{phases}{ticket}", desired.rollout)
            }
            Job::Release => format!("phasegate rollout {} completed", record.rollout),
            Job::Restore => format!("phasegate rollout {} aborted", record.rollout),
        };
        let text = format!("{context}: {summary}");
        text.chars().take(1024).collect()
    }

    fn request_for(
        names: &Names,
        view: &TenantView,
        write: &Write,
    ) -> Result<(Method, String, Value, String), ProviderError> {
        let policy_name = |id: &str| {
            names
                .policies
                .iter()
                .find(|p| p.id == id)
                .map_or(id.to_string(), |p| p.name.clone())
        };
        let ca_path = |id: &str| format!("/identity/conditionalAccess/policies/{id}");
        let enforced_id = || {
            view.enforced
                .as_ref()
                .and_then(|e| e["id"].as_str())
                .map(str::to_string)
                .ok_or_else(|| ProviderError::permanent("the enforced copy has no id"))
        };
        Ok(match write {
            Write::Assign {
                policy,
                assignments,
            } => (
                Method::POST,
                format!("/beta/deviceManagement/deviceCompliancePolicies/{policy}/assign"),
                json!({"assignments": assignments.iter().map(|t| json!({
                    "@odata.type": "#microsoft.graph.deviceCompliancePolicyAssignment",
                    "target": t,
                })).collect::<Vec<_>>()}),
                format!(
                    "set the assignments of compliance policy `{}`",
                    policy_name(policy)
                ),
            ),
            Write::Actions { policy, actions } => (
                Method::POST,
                format!(
                    "/beta/deviceManagement/deviceCompliancePolicies/{policy}/scheduleActionsForRules"
                ),
                json!({"deviceComplianceScheduledActionForRules": [{
                    "ruleName": "PasswordRequired",
                    "scheduledActionConfigurations": actions,
                }]}),
                format!(
                    "set the actions for noncompliance of compliance policy `{}`",
                    policy_name(policy)
                ),
            ),
            Write::Describe {
                policy,
                odata_type,
                description,
            } => (
                Method::PATCH,
                format!("/deviceManagement/deviceCompliancePolicies/{policy}"),
                json!({"@odata.type": odata_type, "description": description}),
                format!(
                    "mark compliance policy `{}` as managed by this rollout",
                    policy_name(policy)
                ),
            ),
            Write::PatchConditionalAccess(body) => {
                let ca = names
                    .conditional_access
                    .as_ref()
                    .expect("only written when named");
                (
                    Method::PATCH,
                    ca_path(&ca.id),
                    body.clone(),
                    format!("change Conditional Access policy `{}`", ca.name),
                )
            }
            Write::CreateEnforced(body) => (
                Method::POST,
                "/identity/conditionalAccess/policies".to_string(),
                body.clone(),
                "create the enforced copy".to_string(),
            ),
            Write::PatchEnforced(body) => (
                Method::PATCH,
                ca_path(&enforced_id()?),
                body.clone(),
                "change the enforced copy".to_string(),
            ),
            Write::DeleteEnforced => (
                Method::DELETE,
                ca_path(&enforced_id()?),
                Value::Null,
                "delete the enforced copy".to_string(),
            ),
        })
    }

    /// Makes one write. `Ok(Some(request))` when the tenant holds it for approval; a held write
    /// is asked about, and resubmitted with its approval code once approved, never sent anew.
    async fn execute(
        &self,
        names: &Names,
        view: &TenantView,
        write: &Write,
        record: &mut GraphRecord,
        job: &Job<'_>,
    ) -> Result<Option<TenantRequest>, ProviderError> {
        let (method, path, body, summary) = Self::request_for(names, view, write)?;
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut approved = None;
        if write.is_intune() {
            let digest = digest(&method, &path, &body);
            if record.held.is_none() {
                record.held = self.journaled_hold(&record.rollout);
            }
            match record.held.clone() {
                Some(held) if held.digest == digest => {
                    match self.approval_status(&held.reference).await?.as_str() {
                        "approved" => {
                            headers.push(("x-msft-approval-code".into(), held.reference.clone()));
                            approved = Some(held.reference.clone());
                        }
                        "completed" => {
                            record.held = None;
                            self.journal_hold(&record.rollout, None)?;
                            return Ok(None);
                        }
                        "needsApproval" | "unknown" => {
                            return Ok(Some(TenantRequest {
                                reference: held.reference,
                                summary: held.summary,
                            }));
                        }
                        other => {
                            record.held = None;
                            self.journal_hold(&record.rollout, None)?;
                            return Err(ProviderError::permanent(format!(
                                "Multi Admin Approval request {} ({}) was {other}; resume the rollout to ask again",
                                held.reference, held.summary
                            )));
                        }
                    }
                }
                _ => {
                    let text = Self::justification(record, job, &summary);
                    headers.push((
                        "x-msft-approval-justification".into(),
                        base64::engine::general_purpose::STANDARD.encode(text),
                    ));
                }
            }
            tracing::debug!(%digest, "intune write");
        }
        tracing::info!(write = write.name(), %method, %path, "changing the tenant");
        let header_refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sent = (!body.is_null()).then_some(&body);
        match self
            .client
            .call(method.clone(), &path, sent, &header_refs, Access::Write)
            .await
        {
            Ok(_) => {
                if approved.is_some() {
                    record.held = None;
                    self.journal_hold(&record.rollout, None)?;
                }
                Ok(None)
            }
            Err(e) if e.kind == ErrorKind::Held => {
                let reference = e.reference.unwrap_or_default();
                tracing::info!(%reference, %summary, "the tenant holds the write for Multi Admin Approval");
                let held = HeldWrite {
                    reference: reference.clone(),
                    digest: digest(&method, &path, &body),
                    summary: summary.clone(),
                };
                self.journal_hold(&record.rollout, Some(&held))?;
                record.held = Some(held);
                Ok(Some(TenantRequest { reference, summary }))
            }
            Err(e) => Err(e),
        }
    }

    /// The status of a Multi Admin Approval request (beta `operationApprovalRequests`).
    async fn approval_status(&self, reference: &str) -> Result<String, ProviderError> {
        let url = format!(
            "/beta/deviceManagement/operationApprovalRequests?$filter={}",
            encode(&format!("requestId eq {}", odata_quote(reference)))
        );
        let answer = self
            .client
            .call(Method::GET, &url, None, &[], Access::Read)
            .await?;
        Ok(answer["value"][0]["status"]
            .as_str()
            .unwrap_or("unknown")
            .to_string())
    }

    /// Checks that starting is safe on this tenant; returns the objects the rollout would own,
    /// and what a person should know.
    async fn check_tenant(
        &self,
        plan: &Plan,
        names: &Names,
        view: &TenantView,
    ) -> Result<Preflight, ProviderError> {
        let mut resources: Vec<String> = names
            .policies
            .iter()
            .map(|p| {
                format!(
                    "compliance policy `{}` (graph/{}/deviceCompliancePolicies/{})",
                    p.name,
                    self.tenant(),
                    p.id
                )
            })
            .collect();
        let groups = PlanGroups::of(plan);
        let (include, _) = Self::scope_sets(names, &groups)?;
        for policy in &names.policies {
            let p = &view.policies[&policy.id];
            if let Some(claim) = mapping::claim_in(p.description.as_deref())
                && let Some((rollout, store)) = mapping::claimant(&claim)
                && store != self.store_id
            {
                return Err(ProviderError::conflict(format!(
                    "compliance policy `{}` is managed by rollout `{rollout}` of another phasegate store ({store}), as its description says; finish or abort that rollout first (or, if that store is gone, remove the line from the description)",
                    policy.name
                )));
            }
            for assignment in &p.assignments {
                if let Some(source) = assignment["source"].as_str()
                    && source != "direct"
                {
                    return Err(ProviderError::conflict(format!(
                        "compliance policy `{}` has an assignment from {source} `{}`: phasegate would turn it into a direct assignment, so it will not write this policy",
                        policy.name,
                        assignment["sourceId"].as_str().unwrap_or("?")
                    )));
                }
                let target = &assignment["target"];
                let t = target["@odata.type"].as_str().unwrap_or("");
                if t.contains("exclusionGroupAssignmentTarget") {
                    continue;
                }
                let planned = match target["groupId"].as_str() {
                    Some(id) if t.contains("groupAssignmentTarget") => {
                        include.contains(&GroupRef::Id(id.to_string()))
                    }
                    _ if t.contains("allLicensedUsersAssignmentTarget") => {
                        include.contains(&GroupRef::AllUsers)
                    }
                    _ => false,
                };
                if !planned {
                    return Err(ProviderError::conflict(format!(
                        "compliance policy `{}` is already assigned to {} outside the plan: its block grace is shared by every assignment, so the report phases would lift enforcement there; put that group in a phase, remove the assignment, or roll out a copy of the policy",
                        policy.name,
                        describe_target(target, names)
                    )));
                }
            }
        }
        self.check_nobody_is_let_in(names, view).await?;
        let mut warnings = Vec::new();
        if let (Some(ca), Some(names_ca)) = (&view.conditional_access, &names.conditional_access) {
            match role_of(view, true) {
                CaRole::Managed => {
                    resources.push(format!(
                        "Conditional Access policy `{}` (graph/{}/conditionalAccess/policies/{})",
                        names_ca.name,
                        self.tenant(),
                        names_ca.id
                    ));
                    if let Some(claim) = mapping::claim_in(ca["description"].as_str())
                        && let Some((rollout, store)) = mapping::claimant(&claim)
                        && store != self.store_id
                    {
                        return Err(ProviderError::conflict(format!(
                            "Conditional Access policy `{}` is managed by rollout `{rollout}` of another phasegate store ({store})",
                            names_ca.name
                        )));
                    }
                }
                CaRole::Relied => {
                    self.check_enforcement(plan, names, ca, &names_ca.name)?;
                    warnings.push(format!(
                        "Conditional Access policy `{}` is already enabled: phasegate never changes it; it is the enforcement, and the rollout stages the compliance {} through grace periods",
                        names_ca.name,
                        if names.policies.len() == 1 { "policy" } else { "policies" }
                    ));
                }
                CaRole::None => {}
            }
            warnings.extend(self.unmanaged_platforms(plan).await);
        }
        Ok(Preflight {
            resources,
            warnings,
        })
    }

    /// A policy already in force under Conditional Access blocks devices past their grace;
    /// holding its (shared) grace for the report phases would let them in again. Refused.
    async fn check_nobody_is_let_in(
        &self,
        names: &Names,
        view: &TenantView,
    ) -> Result<(), ProviderError> {
        let list = self
            .client
            .call(
                Method::GET,
                "/identity/conditionalAccess/policies",
                None,
                &[],
                Access::Read,
            )
            .await?;
        let enforcing: Vec<String> = list["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "enabled" && mapping::requires_compliance(p))
            .filter_map(|p| p["displayName"].as_str().map(str::to_string))
            .collect();
        if enforcing.is_empty() {
            return Ok(());
        }
        let now = self.client.now();
        for policy in &names.policies {
            let p = &view.policies[&policy.id];
            let in_force = p.assignments.iter().any(|a| {
                !a["target"]["@odata.type"]
                    .as_str()
                    .unwrap_or("")
                    .contains("exclusion")
            });
            if !in_force {
                continue;
            }
            let mut past_grace = 0u64;
            let url = format!(
                "/deviceManagement/deviceCompliancePolicies/{}/deviceStatuses",
                policy.id
            );
            let (mut reader, mut users) = (statuses::Reader::default(), Users::default());
            self.client
                .for_each_page_text(&url, &[], |body| {
                    reader.statuses.clear();
                    let next = reader.page(body, &mut users)?;
                    past_grace += reader
                        .statuses
                        .iter()
                        .filter(|s| {
                            s.state == Some(DeviceState::Noncompliant)
                                && s.grace_until.is_some_and(|g| g <= now)
                        })
                        .count() as u64;
                    Ok(next)
                })
                .await?;
            if past_grace > 0 {
                return Err(ProviderError::conflict(format!(
                    "compliance policy `{}` is already in force: {past_grace} of its devices are noncompliant past their grace, so `{}` blocks them; its block grace is shared by every assignment, and holding it for the report phases would let them in again. Roll out a copy of the policy, or let those devices become compliant first",
                    policy.name,
                    enforcing.join("`, `")
                )));
            }
        }
        Ok(())
    }

    /// With an enabled policy as the enforcement: it must cover what the plan enforces and
    /// exclude the emergency access.
    fn check_enforcement(
        &self,
        plan: &Plan,
        names: &Names,
        ca: &Value,
        name: &str,
    ) -> Result<(), ProviderError> {
        let users = &ca["conditions"]["users"];
        let list = |k: &str| -> Vec<String> {
            users[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let all = list("includeUsers").iter().any(|u| u == "All");
        let mut problems = Vec::new();
        for phase in plan.phases.iter().filter(|p| p.mode == Mode::Enforce) {
            for group in &phase.include {
                let covered = match names.resolve(group).map_err(ProviderError::permanent)? {
                    GroupRef::AllUsers => all,
                    GroupRef::Id(id) => {
                        (all || list("includeGroups").contains(&id))
                            && !list("excludeGroups").contains(&id)
                    }
                };
                if !covered {
                    problems.push(format!(
                        "it does not cover `{group}`, which phase `{}` enforces",
                        phase.id
                    ));
                }
            }
        }
        let platforms = &ca["conditions"]["platforms"];
        if !platforms.is_null() {
            let include: Vec<String> = platforms["includePlatforms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_lowercase))
                .collect();
            let exclude: Vec<String> = platforms["excludePlatforms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_lowercase))
                .collect();
            for policy in &names.policies {
                let p = mapping::ca_platform(policy.platform).to_lowercase();
                let covered = (include.contains(&"all".to_string()) || include.contains(&p))
                    && !exclude.contains(&p);
                if !covered {
                    problems.push(format!("it does not apply to {}", policy.platform));
                }
            }
        }
        for group in &plan.emergency_access.groups {
            if let GroupRef::Id(id) = names.resolve(group).map_err(ProviderError::permanent)?
                && !list("excludeGroups").contains(&id)
            {
                problems.push(format!(
                    "it does not exclude the emergency-access group `{group}`"
                ));
            }
        }
        for (id, upn) in &names.emergency_users {
            if !list("excludeUsers").contains(id) {
                problems.push(format!(
                    "it does not exclude the emergency-access user {upn}"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::conflict(format!(
                "Conditional Access policy `{name}` is enabled and is the rollout's enforcement, but {}; phasegate does not change an enabled policy — fix it in the tenant or name another",
                problems.join("; ")
            )))
        }
    }

    /// Platforms with enrolled devices that the rollout manages no compliance policy for.
    async fn unmanaged_platforms(&self, plan: &Plan) -> Vec<String> {
        let managed = plan.policy.platforms();
        let overview = match self
            .client
            .call(
                Method::GET,
                "/deviceManagement/managedDeviceOverview",
                None,
                &[],
                Access::Read,
            )
            .await
        {
            Ok(overview) => overview,
            Err(e) => {
                tracing::debug!(error = %e, "no device overview; platforms not checked");
                return Vec::new();
            }
        };
        let summary = &overview["deviceOperatingSystemSummary"];
        let counts = [
            (Platform::Windows, summary["windowsCount"].as_u64()),
            (Platform::Ios, summary["iosCount"].as_u64()),
            (Platform::Android, summary["androidCount"].as_u64()),
            (Platform::Macos, summary["macOSCount"].as_u64()),
        ];
        counts
            .iter()
            .filter(|(p, n)| !managed.contains(p) && n.unwrap_or(0) > 0)
            .map(|(p, n)| {
                format!(
                    "the tenant has {} {p} devices and this rollout manages no {p} compliance policy: Conditional Access judges them by other policies or by the tenant's \"mark devices with no compliance policy as\" setting",
                    n.unwrap_or(0)
                )
            })
            .collect()
    }

    /// Resolves the users of the rollout's exceptions from UPN to object id (one `$batch` for
    /// those not known yet), as the emergency-access users are.
    async fn resolve_exempt_users(
        &mut self,
        users: &[String],
        mut names: Names,
    ) -> Result<Names, ProviderError> {
        let requests: Vec<BatchRequest> = users
            .iter()
            .filter(|upn| names.exempt_user(upn).is_err())
            .map(|upn| BatchRequest {
                id: upn.clone(),
                url: format!("/users/{}?$select=id,userPrincipalName", encode(upn)),
                headers: Vec::new(),
            })
            .collect();
        if requests.is_empty() {
            return Ok(names);
        }
        let answers = self.client.batch_get(&requests).await?;
        let tenant = self.tenant().to_string();
        for (request, answer) in requests.iter().zip(answers) {
            let upn = &request.id;
            let body = match answer {
                Ok(body) => body,
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(ProviderError::not_found(format!(
                        "user {upn} of an exception not found in tenant {tenant}"
                    )));
                }
                Err(e) => return Err(e),
            };
            let Some(id) = body["id"].as_str().filter(|id| !id.is_empty()) else {
                return Err(ProviderError::permanent(format!(
                    "user {upn} of an exception: the tenant answered without an id"
                )));
            };
            names
                .exempt_users
                .push((id.to_string(), upn.to_lowercase()));
        }
        self.names = Some(names.clone());
        Ok(names)
    }

    fn groups_and_users(groups: &PlanGroups, users: &[String]) -> (BTreeSet<String>, Vec<String>) {
        let all: BTreeSet<String> = groups
            .include
            .iter()
            .chain(&groups.exclude)
            .cloned()
            .collect();
        (all, users.to_vec())
    }
}

/// Exceptions are honoured by excluding their subjects from the enforced copy phasegate owns.
/// When enforcement is an enabled policy someone else owns (or no Conditional Access policy at
/// all), phasegate has nothing of its own to exclude them from and never writes the other: the
/// reconcile fails, naming the policy, rather than block people it promised to spare.
fn exceptions_honoured(
    role: CaRole,
    desired: &DesiredState,
    names: &Names,
) -> Result<(), ProviderError> {
    let enforcing = desired.assignments.iter().any(|a| a.mode == Mode::Enforce);
    let policy = names
        .conditional_access
        .as_ref()
        .map_or_else(|| "none".to_string(), |ca| format!("`{}`", ca.name));
    match role {
        CaRole::Managed => Ok(()),
        _ if !enforcing => Ok(()),
        CaRole::Relied => Err(ProviderError::permanent(format!(
            "exceptions cannot be honoured: enforcement is Conditional Access policy {policy}, enabled before the rollout and not phasegate's, which it never writes; revoke the exceptions or exclude their users in that policy yourself"
        ))),
        CaRole::None => Err(ProviderError::permanent(
            "exceptions cannot be honoured: the plan names no Conditional Access policy, so phasegate has no enforced copy to exclude them from",
        )),
    }
}

fn describe_target(target: &Value, names: &Names) -> String {
    let t = target["@odata.type"]
        .as_str()
        .unwrap_or("?")
        .trim_start_matches('#')
        .trim_start_matches("microsoft.graph.");
    match target["groupId"].as_str() {
        Some(id) => {
            let name = names
                .groups
                .iter()
                .find(|(_, g)| **g == GroupRef::Id(id.to_string()))
                .map_or(id.to_string(), |(n, _)| format!("`{n}`"));
            format!("group {name} ({t})")
        }
        None => t.to_string(),
    }
}

/// The Entra device ids of a group's device members (none for a group of users): the
/// `deviceId` of each `microsoft.graph.device` it holds, directly or through nested groups.
async fn group_devices(
    client: &GraphClient,
    id: &str,
) -> Result<HashSet<devices::Key>, ProviderError> {
    let mut devices = HashSet::new();
    let url = format!(
        "/groups/{id}/transitiveMembers/microsoft.graph.device?$select=id,deviceId&$top=999&$count=true"
    );
    client
        .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
            devices.extend(
                page.iter()
                    .filter_map(|d| d["deviceId"].as_str())
                    .filter_map(devices::key),
            );
        })
        .await?;
    Ok(devices)
}

/// Every managed device's Entra device id, by its Intune id (the device part of a
/// `deviceStatuses` row id): `GET /deviceManagement/managedDevices?$select=id,azureADDeviceId`
/// ("List managedDevices", learn.microsoft.com/graph/api/intune-devices-manageddevice-list;
/// `DeviceManagementManagedDevices.Read.All`), read only when a phase's group has devices.
async fn entra_ids(
    client: &GraphClient,
) -> Result<HashMap<devices::Key, devices::Key>, ProviderError> {
    let mut ids = HashMap::new();
    client
        .for_each_page(
            "/deviceManagement/managedDevices?$select=id,azureADDeviceId&$top=1000",
            &[],
            |page| {
                ids.extend(page.iter().filter_map(|d| {
                    let intune = d["id"].as_str().and_then(devices::key)?;
                    let entra = d["azureADDeviceId"]
                        .as_str()
                        .filter(|a| *a != crate::graph::NIL_GUID)
                        .and_then(devices::key)?;
                    Some((intune, entra))
                }));
            },
        )
        .await?;
    Ok(ids)
}

impl GraphProvider {
    /// `observe` through one reports export per policy (`export.rs`): each device once, by
    /// device id, placed in a phase by the phase's device groups (by Entra device id) or its
    /// users' ids (`devices.rs`); devices without a primary user that no device group places
    /// counted apart, per scope.
    async fn observe_exports(
        &self,
        names: &Names,
        view: &TenantView,
        record: &GraphRecord,
        scopes: &[PhaseScope],
        groups: &BTreeSet<String>,
        group_ids: &BTreeSet<String>,
    ) -> Result<Observation, ProviderError> {
        use self::devices::{Key, attribute, key};
        let client = &self.client;
        let downloads = try_join_all(names.policies.iter().map(|policy| async move {
            let file = export::download_policy(client, &policy.id).await?;
            Ok::<_, ProviderError>((policy.platform, policy.id.clone(), file))
        }));
        // Each group's members: its users by id and its devices by Entra device id (a group
        // holds users or devices; "List group transitive members",
        // learn.microsoft.com/graph/api/group-list-transitivemembers, casts to either type).
        let members = try_join_all(group_ids.iter().map(|id| async move {
            let mut users: HashSet<Key> = HashSet::new();
            let url = format!(
                "/groups/{id}/transitiveMembers/microsoft.graph.user?$select=id&$top=999&$count=true"
            );
            client
                .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
                    users.extend(page.iter().filter_map(|u| u["id"].as_str()).filter_map(key));
                })
                .await?;
            let devices = group_devices(client, id).await?;
            Ok::<_, ProviderError>((id.clone(), (users, devices)))
        }));
        let (downloads, members, validity) = tokio::try_join!(downloads, members, async {
            Ok(self.validity_period().await)
        })?;
        let members: BTreeMap<String, (HashSet<Key>, HashSet<Key>)> = members.into_iter().collect();
        // The Entra device ids are read only when a group has devices.
        let with_aad = members.values().any(|(_, d)| !d.is_empty());
        let exports = try_join_all(
            downloads
                .into_iter()
                .map(|(platform, id, file)| async move {
                    let devices = export::read_policy(file, &id, with_aad).await?;
                    Ok::<_, ProviderError>((platform, id, devices))
                }),
        )
        .await?;
        // The moment the policies' reports describe; the grace ends are read after it.
        let now = self.client.now();
        let (policies, devices): (Vec<_>, Vec<_>) = exports
            .into_iter()
            .map(|(platform, id, devices)| ((platform, id), devices))
            .unzip();
        let devices = export::join_grace_ends(client, devices).await?;
        let exports: Vec<_> = policies
            .into_iter()
            .zip(devices)
            .map(|((platform, id), devices)| (platform, id, devices))
            .collect();
        let relied_enforces = record.role() == CaRole::Relied
            && view
                .conditional_access
                .as_ref()
                .is_some_and(|ca| ca["state"] == "enabled" && mapping::requires_compliance(ca));
        let copy_enforces = view
            .enforced
            .as_ref()
            .is_some_and(|e| e["state"] == "enabled");
        let emergency: HashSet<Key> = names
            .emergency_users
            .iter()
            .filter_map(|(id, _)| key(id))
            .collect();
        let in_group = |group: &GroupRef, user: Key| match group {
            GroupRef::AllUsers => true,
            GroupRef::Id(id) => members.get(id).is_some_and(|(m, _)| m.contains(&user)),
        };
        let device_in = |group: &GroupRef, aad: Key| match group {
            GroupRef::AllUsers => false,
            GroupRef::Id(id) => members.get(id).is_some_and(|(_, d)| d.contains(&aad)),
        };
        let resolve = |name: &String| names.groups.get(name).cloned();
        let (label_names, label_groups): (Vec<String>, Vec<GroupRef>) = groups
            .iter()
            .filter_map(|name| resolve(name).map(|g| (name.clone(), g)))
            .take(MAX_LABELS)
            .unzip();
        let mut owners: HashMap<Key, u32> = HashMap::new();
        let mut userless = Vec::with_capacity(scopes.len());
        let mut observed = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let include: Vec<GroupRef> = scope.include.iter().filter_map(resolve).collect();
            let exclude: Vec<GroupRef> = scope.exclude.iter().filter_map(resolve).collect();
            let enforcing = relied_enforces || (scope.mode == Mode::Enforce && copy_enforces);
            let in_scope = |user: Key| {
                !emergency.contains(&user)
                    && include.iter().any(|g| in_group(g, user))
                    && !exclude.iter().any(|g| in_group(g, user))
            };
            let mut without_user = 0;
            let mut platforms = Vec::with_capacity(exports.len());
            for (platform, id, devices) in &exports {
                let tells = view
                    .policies
                    .get(id)
                    .is_some_and(mapping::sends_notification);
                // A device group of the phase places a device whoever its users are.
                let by_device = |aad: Key| {
                    if exclude.iter().any(|g| device_in(g, aad)) {
                        Some(false)
                    } else if include.iter().any(|g| device_in(g, aad)) {
                        Some(true)
                    } else {
                        None
                    }
                };
                let phase = attribute(
                    devices,
                    now,
                    validity,
                    in_scope,
                    by_device,
                    |device, state, at, placed| {
                        let user = placed.user;
                        let owner = user.map(|user| {
                            let next = owners.len() as u32;
                            *owners.entry(user).or_insert(next)
                        });
                        let groups = label_groups
                            .iter()
                            .enumerate()
                            .filter(|(_, g)| {
                                user.is_some_and(|u| in_group(g, u))
                                    || placed.aad.is_some_and(|a| device_in(g, a))
                            })
                            .fold(0u64, |bits, (i, _)| bits | 1 << i);
                        DeviceReport {
                            state,
                            last_reported: at,
                            blocked: state == DeviceState::Noncompliant && enforcing,
                            // From the grace report (`export::join_grace_ends`).
                            grace_until: device
                                .grace_until()
                                .filter(|_| state == DeviceState::InGrace),
                            facts: DeviceFacts {
                                owner,
                                groups,
                                failing: 0,
                                notified: tells
                                    && matches!(
                                        state,
                                        DeviceState::Noncompliant | DeviceState::InGrace
                                    ),
                            },
                        }
                    },
                );
                without_user += phase.userless;
                platforms.push((*platform, phase.reports));
            }
            userless.push(without_user);
            observed.push(platforms);
        }
        Ok(Observation {
            scopes: observed,
            drift: Vec::new(),
            labels: Labels {
                groups: label_names,
                settings: Vec::new(),
            },
            userless,
        })
    }

    /// The tenant's compliance status validity period (`deviceComplianceCheckinThresholdDays`,
    /// 1 to 120 days; learn.microsoft.com/graph/api/resources/
    /// intune-deviceconfig-devicemanagementsettings), or `None` when it cannot be read: then
    /// only the report's own status counts.
    async fn validity_period(&self) -> Option<Duration> {
        let body = self
            .client
            .call(
                Method::GET,
                "/deviceManagement?$select=settings",
                None,
                &[],
                Access::Read,
            )
            .await
            .ok()?;
        let days = body["settings"]["deviceComplianceCheckinThresholdDays"].as_u64()?;
        (1..=120)
            .contains(&days)
            .then(|| Duration::from_secs(days * 86_400))
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

    fn guard_writes(&mut self, guard: std::sync::Arc<dyn crate::provider::WriteGuard>) {
        self.client.guard_writes(guard);
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

    async fn preflight(&mut self, plan: &Plan) -> Result<Preflight, ProviderError> {
        let (groups, users) =
            Self::groups_and_users(&PlanGroups::of(plan), &plan.emergency_access.users);
        let names = self.resolve(&plan.policy, &groups, &users).await?;
        if plan.phases.iter().any(|p| p.mode == Mode::Notify) && names.template_id.is_none() {
            return Err(ProviderError::not_found(
                "a notify phase needs `notification_template` in the plan's [policy]: the Graph provider notifies owners through the policy's notification action",
            ));
        }
        let view = self.read(&names).await?;
        self.check_tenant(plan, &names, &view).await
    }

    async fn capture_baseline(&mut self, target: &PolicyTarget) -> Result<Record, ProviderError> {
        let names = self.resolve(target, &BTreeSet::new(), &[]).await?;
        let view = self.read(&names).await?;
        let record = GraphRecord {
            role: Some(role_of(&view, target.conditional_access.is_some())),
            baseline: view.clone(),
            applied: view,
            ..GraphRecord::default()
        };
        Ok(record.to_value())
    }

    async fn reconcile(
        &mut self,
        target: &PolicyTarget,
        desired: &DesiredState,
        resolution: Option<DriftResolution>,
        record: &Record,
    ) -> Result<Outcome, ProviderError> {
        let mut record = GraphRecord::parse(record)?;
        record.rollout = desired.rollout.clone();
        record.groups = desired.groups.clone();
        record.emergency_users = desired.emergency_access.users.clone();
        let (mut groups, users) = Self::groups_and_users(&record.groups, &record.emergency_users);
        groups.extend(desired.exempt.groups.iter().cloned());
        let mut names = self.resolve(target, &groups, &users).await?;
        if !desired.exempt.is_empty() {
            exceptions_honoured(record.role(), desired, &names)?;
            names = self
                .resolve_exempt_users(&desired.exempt.users, names)
                .await?;
        }
        let job = if desired.claim {
            Job::Reconcile {
                desired,
                resolution,
            }
        } else {
            Job::Release
        };
        self.converge(&names, &mut record, job).await
    }

    async fn restore(
        &mut self,
        target: &PolicyTarget,
        record: &Record,
    ) -> Result<Outcome, ProviderError> {
        let mut record = GraphRecord::parse(record)?;
        let (groups, users) = Self::groups_and_users(&record.groups, &record.emergency_users);
        let names = self.resolve(target, &groups, &users).await?;
        self.converge(&names, &mut record, Job::Restore).await
    }

    async fn observe(
        &mut self,
        target: &PolicyTarget,
        scopes: &[PhaseScope],
        record: &Record,
    ) -> Result<Observation, ProviderError> {
        let record = GraphRecord::parse(record)?;
        let mut groups: BTreeSet<String> = scopes
            .iter()
            .flat_map(|s| s.include.iter().chain(&s.exclude).cloned())
            .collect();
        let (plan_groups, users) = Self::groups_and_users(&record.groups, &record.emergency_users);
        groups.extend(plan_groups);
        let names = self.resolve(target, &groups, &users).await?;
        // Re-read what phasegate manages: someone else's change stops the rollout.
        let view = self.read(&names).await?;
        let (include, exclude) = Self::scope_sets(&names, &record.groups)?;
        let scope = Scope {
            names: &names,
            role: record.role(),
            include: &include,
            exclude: &exclude,
        };
        let current = mapping::members(&view, &scope);
        let last = mapping::members(&record.applied, &scope);
        let drift: Vec<DriftChange> =
            mapping::drift(&last, &current, &last, &record.released, &names)
                .into_iter()
                .map(|(_, c)| c)
                .collect();
        if !drift.is_empty() {
            return Ok(Observation {
                scopes: Vec::new(),
                drift,
                labels: Labels::default(),
                userless: Vec::new(),
            });
        }
        let group_ids: BTreeSet<String> = names
            .groups
            .iter()
            .filter(|(name, _)| groups.contains(*name))
            .filter_map(|(_, g)| match g {
                GroupRef::Id(id) => Some(id.clone()),
                GroupRef::AllUsers => None,
            })
            .collect();
        if self.client.settings().observe_through == ObserveThrough::Export {
            return self
                .observe_exports(&names, &view, &record, scopes, &groups, &group_ids)
                .await;
        }
        let client = &self.client;
        // Every policy's rows number their users in one table (the pages of several policies
        // arrive in turns on this task; the table is locked only while a page is read).
        let users = std::sync::Mutex::new(Users::default());
        let users = &users;
        let statuses = try_join_all(names.policies.iter().map(|policy| async move {
            let mut reader = statuses::Reader::default();
            let url = format!(
                "/deviceManagement/deviceCompliancePolicies/{}/deviceStatuses",
                policy.id
            );
            client
                .for_each_page_text(&url, &[], |body| {
                    let mut users = users.lock().unwrap_or_else(|e| e.into_inner());
                    reader.page(body, &mut users)
                })
                .await?;
            Ok::<_, ProviderError>((policy.platform, policy.id.clone(), reader.statuses))
        }));
        let members = try_join_all(group_ids.iter().map(|id| async move {
            // By the key the statuses number their users by.
            let mut users = devices::KeySet::default();
            let url = format!(
                "/groups/{id}/transitiveMembers/microsoft.graph.user?$select=id,userPrincipalName&$top=999&$count=true"
            );
            client
                .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
                    users.extend(page.iter().filter_map(|u| u["userPrincipalName"].as_str()).map(statuses::user_key));
                })
                .await?;
            let devices = group_devices(client, id).await?;
            Ok::<_, ProviderError>((id.clone(), (users, devices)))
        }));
        let (statuses, members) = tokio::try_join!(statuses, members)?;
        let users = std::mem::take(&mut *users.lock().unwrap_or_else(|e| e.into_inner()));
        // Device groups name Entra device ids, the rows Intune ones: mapped through the managed
        // devices, only when a group has devices.
        let entra = if members.iter().any(|(_, (_, d))| !d.is_empty()) {
            entra_ids(client).await?
        } else {
            HashMap::new()
        };
        // A policy whose e-mail action is in place has told the owner of each of its
        // noncompliant devices.
        let statuses: Vec<(Platform, bool, Vec<Status>)> = statuses
            .into_iter()
            .map(|(platform, id, rows)| {
                let tells = view
                    .policies
                    .get(&id)
                    .is_some_and(mapping::sends_notification);
                (platform, tells, rows)
            })
            .collect();
        let members: BTreeMap<String, (devices::KeySet, HashSet<devices::Key>)> =
            members.into_iter().collect();
        let now = self.client.now();
        let relied_enforces = record.role() == CaRole::Relied
            && view
                .conditional_access
                .as_ref()
                .is_some_and(|ca| ca["state"] == "enabled" && mapping::requires_compliance(ca));
        let copy_enforces = view
            .enforced
            .as_ref()
            .is_some_and(|e| e["state"] == "enabled");
        let emergency: devices::KeySet = names
            .emergency_users
            .iter()
            .map(|(_, upn)| statuses::user_key(upn))
            .collect();
        // A row's user in a group, by the user's key.
        let in_group = |group: &GroupRef, s: &Status| match group {
            GroupRef::AllUsers => true,
            GroupRef::Id(id) => members
                .get(id)
                .is_some_and(|(m, _)| m.contains(&users.key(s.user))),
        };
        // A row's device in a device group, by its Entra id.
        let device_in = |group: &GroupRef, s: &Status| match group {
            GroupRef::AllUsers => false,
            GroupRef::Id(id) => members.get(id).is_some_and(|(_, d)| {
                !d.is_empty()
                    && s.device
                        .and_then(|k| entra.get(&k))
                        .is_some_and(|a| d.contains(a))
            }),
        };
        let resolve = |name: &String| names.groups.get(name).cloned();
        // The facts the impact forecast counts by: each user numbered once, the plan's groups
        // the user is in. Graph's device statuses do not name the failing settings.
        let (label_names, label_groups): (Vec<String>, Vec<GroupRef>) = groups
            .iter()
            .filter_map(|name| resolve(name).map(|g| (name.clone(), g)))
            .take(MAX_LABELS)
            .unzip();
        let labels = Labels {
            groups: label_names,
            settings: Vec::new(),
        };
        let mut userless = Vec::with_capacity(scopes.len());
        // Per policy, the devices only the system account reports.
        let system_of: Vec<Vec<&Status>> = statuses
            .iter()
            .map(|(_, _, rows)| statuses::system_only(rows))
            .collect();
        let scopes = scopes
            .iter()
            .map(|scope| {
                let include: Vec<GroupRef> = scope.include.iter().filter_map(resolve).collect();
                let exclude: Vec<GroupRef> = scope.exclude.iter().filter_map(resolve).collect();
                let enforcing = relied_enforces || (scope.mode == Mode::Enforce && copy_enforces);
                let mut without_user = 0;
                let platforms = statuses
                    .iter()
                    .enumerate()
                    .map(|(i, (platform, tells, rows))| {
                        let by_device = |s: &Status| {
                            if exclude.iter().any(|g| device_in(g, s)) {
                                Some(false)
                            } else if include.iter().any(|g| device_in(g, s)) {
                                Some(true)
                            } else {
                                None
                            }
                        };
                        let placed = statuses::in_scope(
                            rows,
                            |s| {
                                !emergency.contains(&users.key(s.user))
                                    && include.iter().any(|g| in_group(g, s))
                                    && !exclude.iter().any(|g| in_group(g, s))
                            },
                            by_device,
                        );
                        // Userless: no device group of the phase places or excludes it.
                        without_user += system_of[i]
                            .iter()
                            .filter(|s| by_device(s).is_none())
                            .count() as u64;
                        let reports = placed
                            .into_iter()
                            .filter_map(|s| {
                                let mut state = s.state?;
                                let in_grace = s.grace_until.is_some_and(|g| g > now);
                                if state == DeviceState::Noncompliant && in_grace {
                                    state = DeviceState::InGrace;
                                }
                                let last_reported =
                                    s.last_reported.filter(|_| state != DeviceState::Unknown);
                                let groups = label_groups
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, g)| {
                                        (!s.system && in_group(g, s)) || device_in(g, s)
                                    })
                                    .fold(0u64, |bits, (i, _)| bits | 1 << i);
                                Some(DeviceReport {
                                    state,
                                    last_reported,
                                    blocked: state == DeviceState::Noncompliant && enforcing,
                                    grace_until: s.grace_until.filter(|_| in_grace),
                                    facts: DeviceFacts {
                                        // Each user's number, once for all its devices.
                                        owner: (!s.system).then_some(s.user),
                                        groups,
                                        failing: 0,
                                        notified: *tells
                                            && matches!(
                                                state,
                                                DeviceState::Noncompliant | DeviceState::InGrace
                                            ),
                                    },
                                })
                            })
                            .collect();
                        (*platform, reports)
                    })
                    .collect();
                userless.push(without_user);
                platforms
            })
            .collect();
        Ok(Observation {
            scopes,
            drift: Vec::new(),
            labels,
            userless,
        })
    }

    async fn group_members(
        &mut self,
        target: &PolicyTarget,
        group: &str,
        limit: usize,
    ) -> Result<Vec<crate::domain::directory::Member>, ProviderError> {
        self.directory_members(target, group, limit).await
    }

    async fn observe_signins(
        &mut self,
        target: &PolicyTarget,
        queries: &[SignInQuery],
        record: &Record,
    ) -> Result<Vec<SignIns>, ProviderError> {
        let record = GraphRecord::parse(record)?;
        let mut groups: BTreeSet<String> = queries
            .iter()
            .flat_map(|q| q.scope.include.iter().chain(&q.scope.exclude).cloned())
            .collect();
        let (plan_groups, users) = Self::groups_and_users(&record.groups, &record.emergency_users);
        groups.extend(plan_groups);
        let names = self.resolve(target, &groups, &users).await?;
        signins::read(&self.client, &names, &record.applied, queries).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_asked_to_wait_longer_than_a_request_waits_fails_instead() {
        let throttled = |seconds| ProviderError {
            retry_after: Some(Duration::from_secs(seconds)),
            ..ProviderError::transient("PATCH /x: 429")
        };
        assert_eq!(settle_delay(&throttled(3), 0), Some(Duration::from_secs(3)));
        assert_eq!(
            settle_delay(&throttled(120), 0),
            Some(Duration::from_secs(120))
        );
        // `Retry-After: 3e9` (95 years) or a date in 9999 used to be slept on in-line.
        assert_eq!(settle_delay(&throttled(121), 0), None);
        assert_eq!(settle_delay(&throttled(3_000_000_000), 0), None);
        let unanswered = ProviderError::transient("PATCH /x: timed out");
        assert_eq!(
            settle_delay(&unanswered, 2),
            Some(Duration::from_millis(1000))
        );
        assert_eq!(
            settle_delay(&unanswered, 9),
            Some(Duration::from_millis(16_000))
        );
    }
}
