//! Read-only queries for the readiness preflight: what the tenant has set up for a plan, as the
//! facts `crate::preflight::checks` judges. Nothing here writes; each read that fails is kept as
//! that fact's failure, so one missing permission does not hide the other findings.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::Value;

use super::client::{Access, Credential, GraphClient, encode};
use super::mapping::{scheduled_actions, str_list};
use super::settings::GraphSettings;
use crate::domain::directory::{MEMBERS_READ_MAX, Member};
use crate::domain::plan::Plan;
use crate::domain::time::Timestamp;
use crate::graph::{ALL_USERS_NAME, is_guid, odata_quote, parse_time};
use crate::preflight::checks::{
    CaPolicy, CertificateExpiry, FoundGroup, FoundPolicy, FoundTemplate, Lookup, PolicyFacts,
    ScheduledAction, TenantSettings, mailings, targets_apple_mobile,
};
use crate::provider::{ErrorKind, ProviderError};

/// What the preflight reads from the tenant.
pub struct TenantFacts {
    pub tenant: String,
    pub now: Timestamp,
    pub roles: Result<Vec<String>, String>,
    /// Custom verified domains (not the initial `*.onmicrosoft.com`), when asked for.
    pub verified_domains: Option<Result<Vec<String>, String>>,
    /// Only when the plan targets iOS/iPadOS.
    pub apns: Option<Result<CertificateExpiry, String>>,
    pub policies: Vec<PolicyFacts>,
    pub template: Option<(String, Lookup<FoundTemplate>)>,
    /// The groups the phases include (All Users aside), with what was found.
    pub groups: Vec<(String, Lookup<FoundGroup>)>,
    /// The plan's `[directory_approvers]`: approver group, the directory group it names, and what
    /// was found of it.
    pub approver_groups: Vec<(String, String, Lookup<FoundGroup>)>,
    /// The groups the plan's e-mail announcements mail, with their users as the directory has
    /// them.
    pub mailed_groups: Vec<(String, Lookup<Vec<Member>>)>,
    pub settings: Result<TenantSettings, String>,
    pub conditional_access: Result<Vec<CaPolicy>, String>,
}

/// Signs in with the plan's credential and reads everything the checks need.
pub async fn read(
    settings: GraphSettings,
    plan: &Plan,
    wants_domains: bool,
) -> Result<TenantFacts, ProviderError> {
    let credential = Credential::load(&settings.credential, &settings.tenant)?;
    let tenant = settings.tenant.clone();
    let client = GraphClient::new(settings, credential)?;
    client.sign_in().await?;
    let reader = Reader { client: &client };
    Ok(TenantFacts {
        tenant,
        now: client.now(),
        roles: client.granted_roles().await.map_err(|e| e.message),
        verified_domains: if wants_domains {
            Some(reader.verified_domains().await)
        } else {
            None
        },
        apns: if targets_apple_mobile(plan) {
            Some(reader.apns().await)
        } else {
            None
        },
        policies: reader.policies(plan).await,
        template: match &plan.policy.notification_template {
            Some(name) => Some((name.clone(), reader.template(name).await)),
            None => None,
        },
        groups: reader.groups(plan).await,
        approver_groups: reader.approver_groups(plan).await,
        mailed_groups: reader.mailed_groups(plan).await,
        settings: reader.settings().await,
        conditional_access: reader.conditional_access().await,
    })
}

struct Reader<'c> {
    client: &'c GraphClient,
}

impl Reader<'_> {
    async fn get(&self, path: &str) -> Result<Value, ProviderError> {
        self.client
            .call(Method::GET, path, None, &[], Access::Read)
            .await
    }

    /// The items of a collection filtered by `displayName` (or the one object, by id).
    async fn named(&self, collection: &str, name: &str, query: &str) -> Lookup<Value> {
        let path = if is_guid(name) {
            format!(
                "{collection}/{name}{}",
                if query.is_empty() {
                    String::new()
                } else {
                    format!("?{query}")
                }
            )
        } else {
            let filter = encode(&format!("displayName eq {}", odata_quote(name)));
            let sep = if query.is_empty() { "" } else { "&" };
            format!("{collection}?{query}{sep}$filter={filter}")
        };
        match self.get(&path).await {
            Ok(body) if body.get("value").is_some() => {
                let items = body["value"].as_array().cloned().unwrap_or_default();
                match items.len() {
                    0 => Lookup::Missing,
                    1 => Lookup::Found(items.into_iter().next().expect("one item")),
                    n => Lookup::Ambiguous(n),
                }
            }
            Ok(body) => Lookup::Found(body),
            Err(e) if e.kind == ErrorKind::NotFound => Lookup::Missing,
            Err(e) => Lookup::Failed(e.message),
        }
    }

    /// `GET /organization` (learn.microsoft.com/graph/api/organization-list): the tenant's
    /// `verifiedDomains`; the initial `*.onmicrosoft.com` one needs no enrolment records.
    async fn verified_domains(&self) -> Result<Vec<String>, String> {
        let body = self
            .get("/organization?$select=id,verifiedDomains")
            .await
            .map_err(|e| e.message)?;
        let mut domains = Vec::new();
        for org in body["value"].as_array().into_iter().flatten() {
            for domain in org["verifiedDomains"].as_array().into_iter().flatten() {
                let initial = domain["isInitial"].as_bool().unwrap_or(false);
                if let Some(name) = domain["name"].as_str()
                    && !initial
                    && !domains
                        .iter()
                        .any(|d: &String| d.eq_ignore_ascii_case(name))
                {
                    domains.push(name.to_ascii_lowercase());
                }
            }
        }
        Ok(domains)
    }

    /// `GET /deviceManagement/applePushNotificationCertificate`, `expirationDateTime`
    /// (learn.microsoft.com/graph/api/intune-devices-applepushnotificationcertificate-get); a
    /// tenant without one answers 404.
    async fn apns(&self) -> Result<CertificateExpiry, String> {
        match self
            .get("/deviceManagement/applePushNotificationCertificate")
            .await
        {
            Ok(body) => {
                let text = body["expirationDateTime"].as_str().unwrap_or_default();
                let expires = parse_time(text).ok_or_else(|| {
                    format!("the tenant's Apple push certificate has no readable expirationDateTime (`{text}`)")
                })?;
                let who = body["appleIdentifier"].as_str().unwrap_or("");
                Ok(CertificateExpiry {
                    source: if who.is_empty() {
                        "the tenant's".to_string()
                    } else {
                        format!("the tenant's, Apple ID {who}")
                    },
                    expires,
                })
            }
            Err(e) if e.kind == ErrorKind::NotFound => Err(
                "the tenant has no Apple MDM push certificate: iOS/iPadOS devices cannot enrol or be managed"
                    .to_string(),
            ),
            Err(e) => Err(format!(
                "the tenant's Apple push certificate cannot be read ({})",
                e.message
            )),
        }
    }

    /// Each compliance policy with its actions (`$expand`: the collection routes do not exist).
    async fn policies(&self, plan: &Plan) -> Vec<PolicyFacts> {
        let mut facts = Vec::new();
        for policy in &plan.policy.compliance {
            let found = self
                .named(
                    "/deviceManagement/deviceCompliancePolicies",
                    &policy.name,
                    "$expand=scheduledActionsForRule($expand=scheduledActionConfigurations)",
                )
                .await;
            facts.push(PolicyFacts {
                name: policy.name.clone(),
                platform: policy.platform,
                found: map(found, |body| FoundPolicy {
                    odata_type: body["@odata.type"].as_str().unwrap_or("").to_string(),
                    actions: scheduled_actions(&body)
                        .iter()
                        .map(|action| ScheduledAction {
                            action_type: action["actionType"].as_str().unwrap_or("").to_string(),
                            grace_period_hours: action["gracePeriodHours"].as_i64().unwrap_or(0),
                        })
                        .collect(),
                }),
            });
        }
        facts
    }

    /// The template and its localized messages
    /// (learn.microsoft.com/graph/api/intune-notification-localizednotificationmessage-list).
    async fn template(&self, name: &str) -> Lookup<FoundTemplate> {
        let found = self
            .named("/deviceManagement/notificationMessageTemplates", name, "")
            .await;
        let template = match found {
            Lookup::Found(t) => t,
            Lookup::Missing => return Lookup::Missing,
            Lookup::Ambiguous(n) => return Lookup::Ambiguous(n),
            Lookup::Failed(why) => return Lookup::Failed(why),
        };
        let id = template["id"].as_str().unwrap_or_default();
        let path = format!(
            "/deviceManagement/notificationMessageTemplates/{}/localizedNotificationMessages",
            encode(id)
        );
        let mut messages = Vec::new();
        let listed = self
            .client
            .for_each_page(&path, &[], |page| {
                for m in page {
                    let filled = |key: &str| m[key].as_str().is_some_and(|t| !t.trim().is_empty());
                    messages.push((
                        m["locale"].as_str().unwrap_or("").to_string(),
                        m["isDefault"].as_bool().unwrap_or(false),
                        filled("subject") && filled("messageTemplate"),
                    ));
                }
            })
            .await;
        match listed {
            Ok(()) => Lookup::Found(FoundTemplate {
                default_locale: template["defaultLocale"].as_str().map(str::to_string),
                messages,
            }),
            Err(e) => Lookup::Failed(e.message),
        }
    }

    /// The groups the phases include, each with whether it has any member.
    async fn groups(&self, plan: &Plan) -> Vec<(String, Lookup<FoundGroup>)> {
        let names: BTreeSet<&str> = plan
            .phases
            .iter()
            .flat_map(|p| p.include.iter().map(String::as_str))
            .filter(|g| !g.eq_ignore_ascii_case(ALL_USERS_NAME))
            .collect();
        let mut facts = Vec::new();
        for name in names {
            facts.push((name.to_string(), self.group(name).await));
        }
        facts
    }

    /// The directory groups the plan's `[directory_approvers]` name, each with whether it has
    /// any member: a group the tenant lacks, or an empty one, leaves nobody able to approve.
    async fn approver_groups(&self, plan: &Plan) -> Vec<(String, String, Lookup<FoundGroup>)> {
        let mut facts = Vec::new();
        for (group, directory) in &plan.directory_approvers {
            let found = self.group(directory).await;
            facts.push((group.clone(), directory.clone(), found));
        }
        facts
    }

    /// The users of each group the plan's e-mail announcements mail, read as a delivery reads
    /// them (`super::directory::group_users`).
    async fn mailed_groups(&self, plan: &Plan) -> Vec<(String, Lookup<Vec<Member>>)> {
        let names: BTreeSet<String> = mailings(plan).into_iter().flat_map(|m| m.groups).collect();
        let mut facts = Vec::new();
        for name in names {
            let found = if name.eq_ignore_ascii_case(ALL_USERS_NAME) {
                Lookup::Failed(format!(
                    "`{ALL_USERS_NAME}` is Intune's virtual group, not a directory group whose members can be listed"
                ))
            } else {
                match self.named("/groups", &name, "$select=id,displayName").await {
                    Lookup::Found(group) => {
                        let id = group["id"].as_str().unwrap_or_default();
                        match super::directory::group_users(
                            self.client,
                            id,
                            &name,
                            MEMBERS_READ_MAX,
                        )
                        .await
                        {
                            Ok(members) => Lookup::Found(members),
                            Err(e) if e.kind == ErrorKind::NotFound => Lookup::Missing,
                            Err(e) => Lookup::Failed(e.message),
                        }
                    }
                    Lookup::Missing => Lookup::Missing,
                    Lookup::Ambiguous(n) => Lookup::Ambiguous(n),
                    Lookup::Failed(why) => Lookup::Failed(why),
                }
            };
            facts.push((name, found));
        }
        facts
    }

    /// One group by display name or id (`GET /groups?$filter=displayName eq '…'`, or
    /// `GET /groups/{id}`, https://learn.microsoft.com/graph/api/group-list and
    /// https://learn.microsoft.com/graph/api/group-get), and whether it has a member.
    async fn group(&self, name: &str) -> Lookup<FoundGroup> {
        match self.named("/groups", name, "$select=id,displayName").await {
            Lookup::Found(group) => {
                let id = group["id"].as_str().unwrap_or_default().to_string();
                let path = format!(
                    "/groups/{}/transitiveMembers?$select=id&$top=1",
                    encode(&id)
                );
                match self.get(&path).await {
                    Ok(body) => Lookup::Found(FoundGroup {
                        has_members: body["value"].as_array().is_some_and(|v| !v.is_empty()),
                        id,
                    }),
                    Err(e) => Lookup::Failed(e.message),
                }
            }
            Lookup::Missing => Lookup::Missing,
            Lookup::Ambiguous(n) => Lookup::Ambiguous(n),
            Lookup::Failed(why) => Lookup::Failed(why),
        }
    }

    /// `deviceManagement`'s `settings` (learn.microsoft.com/graph/api/resources/
    /// intune-deviceconfig-devicemanagementsettings): `secureByDefault` is "Mark devices with no
    /// compliance policy assigned as", `deviceComplianceCheckinThresholdDays` the validity period.
    async fn settings(&self) -> Result<TenantSettings, String> {
        let body = self
            .get("/deviceManagement?$select=settings")
            .await
            .map_err(|e| e.message)?;
        let settings = &body["settings"];
        Ok(TenantSettings {
            secure_by_default: settings["secureByDefault"].as_bool(),
            checkin_threshold_days: settings["deviceComplianceCheckinThresholdDays"].as_i64(),
        })
    }

    async fn conditional_access(&self) -> Result<Vec<CaPolicy>, String> {
        let mut policies = Vec::new();
        self.client
            .for_each_page("/identity/conditionalAccess/policies", &[], |page| {
                policies.extend(page.iter().map(ca_policy));
            })
            .await
            .map_err(|e| e.message)?;
        Ok(policies)
    }
}

fn map<T>(found: Lookup<Value>, f: impl FnOnce(Value) -> T) -> Lookup<T> {
    match found {
        Lookup::Found(v) => Lookup::Found(f(v)),
        Lookup::Missing => Lookup::Missing,
        Lookup::Ambiguous(n) => Lookup::Ambiguous(n),
        Lookup::Failed(why) => Lookup::Failed(why),
    }
}

/// A Conditional Access policy as the checks see it: MFA is the `mfa` control or an
/// authentication strength (every built-in strength is multifactor).
fn ca_policy(raw: &Value) -> CaPolicy {
    let controls = str_list(&raw["grantControls"]["builtInControls"]);
    let strength = !raw["grantControls"]["authenticationStrength"].is_null();
    let users = &raw["conditions"]["users"];
    CaPolicy {
        id: raw["id"].as_str().unwrap_or("").to_string(),
        name: raw["displayName"].as_str().unwrap_or("").to_string(),
        state: raw["state"].as_str().unwrap_or("").to_string(),
        requires_compliance: super::mapping::requires_compliance(raw),
        requires_mfa: controls.iter().any(|c| c == "mfa") || strength,
        include_users: str_list(&users["includeUsers"]),
        include_groups: str_list(&users["includeGroups"]),
        exclude_groups: str_list(&users["excludeGroups"]),
        include_platforms: str_list(&raw["conditions"]["platforms"]["includePlatforms"]),
        exclude_platforms: str_list(&raw["conditions"]["platforms"]["excludePlatforms"]),
    }
}
