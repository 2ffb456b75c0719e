//! The sign-in log as a measure of a Conditional Access policy's impact.
//!
//! `GET /auditLogs/signIns` (learn.microsoft.com/graph/api/signin-list) lists the tenant's user
//! sign-ins, most recent first, in pages of at most 1,000 linked by `@odata.nextLink`; it needs
//! the application permissions `AuditLog.Read.All` and `Directory.Read.All` and a Microsoft Entra
//! ID P1 or P2 licence (learn.microsoft.com/graph/api/resources/signin). Each sign-in names the
//! Conditional Access policies evaluated for it in `appliedConditionalAccessPolicies`, each with
//! its `id`, `displayName` and `result` — `success`, `failure`, `notApplied`, `notEnabled`,
//! `unknownFutureValue`, and for report-only policies `reportOnlySuccess`, `reportOnlyFailure`,
//! `reportOnlyNotApplied`, `reportOnlyInterrupted`, which the service only sends with
//! `Prefer: include-unknown-enum-members`
//! (learn.microsoft.com/graph/api/resources/appliedconditionalaccesspolicy).
//!
//! The identity and access reports service allows an app five requests per ten seconds per
//! tenant ("Identity and access reports service limits",
//! learn.microsoft.com/graph/throttling-limits): requests are spaced to that here, for every
//! rollout of the process against the same tenant and app, and a `429` is waited out through the
//! client's retry policy (`Retry-After` honoured).
//!
//! One listing per observation covers every phase that asks (the union of their windows, one
//! `createdDateTime` filter); each sign-in is attributed to phases by its `userId` through the
//! phases' group members, emergency-access users never counted. A sign-in counts when the
//! rollout's policy — the plan's Conditional Access policy, or its enforced copy — evaluated it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use reqwest::Method;
use serde_json::Value;

use super::client::{Access, GraphClient, encode};
use super::mapping::{GroupRef, Names, TenantView};
use crate::domain::signins::{SignInCounter, SignInOutcome, SignIns};
use crate::graph::{format_time, parse_time};
use crate::provider::{ErrorKind, ProviderError, SignInQuery};

/// Requests the reports service allows one app per tenant in [`WINDOW`].
pub const REQUESTS_PER_WINDOW: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(10);
/// The most pages one observation reads (1,000 sign-ins each, most recent first): at five
/// requests per ten seconds, about three and a half minutes. Beyond it the counts are marked as a
/// lower bound.
pub const MAX_PAGES: usize = 100;
/// `$top`: the service's maximum page size.
pub const PAGE_SIZE: usize = 1000;
/// Without it the report-only results come as `unknownFutureValue`.
pub const PREFER: (&str, &str) = ("Prefer", "include-unknown-enum-members");

/// The Graph permissions the sign-in log needs.
pub const ROLES: [&str; 2] = ["AuditLog.Read.All", "Directory.Read.All"];

/// The request times of one app in one tenant, shared by every client of the process.
type Slots = Arc<tokio::sync::Mutex<VecDeque<Instant>>>;

fn slots(tenant: &str, client_id: &str) -> Slots {
    static ALL: OnceLock<Mutex<HashMap<String, Slots>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.entry(format!(
        "{}/{}",
        tenant.to_lowercase(),
        client_id.to_lowercase()
    ))
    .or_default()
    .clone()
}

/// How long to wait before the next request, given the times of the earlier ones (oldest
/// first), so that no [`WINDOW`] holds more than [`REQUESTS_PER_WINDOW`]; forgets the ones
/// that left the window.
fn wait_for_slot(sent: &mut VecDeque<Instant>, now: Instant) -> Duration {
    while sent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= WINDOW)
    {
        sent.pop_front();
    }
    if sent.len() < REQUESTS_PER_WINDOW {
        return Duration::ZERO;
    }
    let oldest = sent[sent.len() - REQUESTS_PER_WINDOW];
    // A little margin, so that network jitter never makes two requests look closer.
    (oldest + WINDOW + Duration::from_millis(50)).saturating_duration_since(now)
}

async fn pace(slots: &Slots) {
    let mut sent = slots.lock().await;
    let wait = wait_for_slot(&mut sent, Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    sent.push_back(Instant::now());
}

/// What the rollout's policies made of one sign-in: the strongest result among them.
pub fn outcome(signin: &Value, policies: &BTreeSet<String>) -> Option<SignInOutcome> {
    let mut seen = None;
    for applied in signin["appliedConditionalAccessPolicies"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if !applied["id"]
            .as_str()
            .is_some_and(|id| policies.contains(id))
        {
            continue;
        }
        let this = match applied["result"].as_str() {
            Some("failure") => SignInOutcome::Blocked,
            Some("reportOnlyFailure" | "reportOnlyInterrupted") => SignInOutcome::WouldBlock,
            Some("success" | "reportOnlySuccess") => SignInOutcome::Passed,
            // Not applied, not enabled, or a value this version does not know: not evaluated.
            _ => continue,
        };
        seen = Some(match (seen, this) {
            (Some(SignInOutcome::Blocked), _) | (_, SignInOutcome::Blocked) => {
                SignInOutcome::Blocked
            }
            (Some(SignInOutcome::WouldBlock), _) | (_, SignInOutcome::WouldBlock) => {
                SignInOutcome::WouldBlock
            }
            _ => SignInOutcome::Passed,
        });
    }
    seen
}

/// The ids of the policies whose results count: the plan's policy and its enforced copy.
pub fn watched(names: &Names, applied: &TenantView) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    if let Some(ca) = &names.conditional_access {
        ids.insert(ca.id.clone());
    }
    for view in [&applied.conditional_access, &applied.enforced]
        .into_iter()
        .flatten()
    {
        if let Some(id) = view["id"].as_str() {
            ids.insert(id.to_string());
        }
    }
    ids
}

/// Whether an error means the log cannot be read by this app at all (permission, licence),
/// rather than that reading it failed this time.
fn unavailable(error: &ProviderError) -> bool {
    matches!(error.kind, ErrorKind::Auth | ErrorKind::NotFound)
}

/// Reads the log once for every query and counts each query's users' sign-ins.
pub async fn read(
    client: &GraphClient,
    names: &Names,
    applied: &TenantView,
    queries: &[SignInQuery],
) -> Result<Vec<SignIns>, ProviderError> {
    let policies = watched(names, applied);
    if policies.is_empty() {
        let reason =
            "the plan names no Conditional Access policy, whose results the sign-in log would show"
                .to_string();
        return Ok(queries
            .iter()
            .map(|_| SignIns::Unavailable {
                reason: reason.clone(),
            })
            .collect());
    }
    let (Some(since), Some(until)) = (
        queries.iter().map(|q| q.since).min(),
        queries.iter().map(|q| q.until).max(),
    ) else {
        return Ok(Vec::new());
    };
    let members = members(client, names, queries).await?;
    let emergency: HashSet<&str> = names
        .emergency_users
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    let in_group = |group: &GroupRef, user: &str| match group {
        GroupRef::AllUsers => true,
        GroupRef::Id(id) => members.get(id).is_some_and(|m| m.contains(user)),
    };
    let scopes: Vec<(Vec<GroupRef>, Vec<GroupRef>)> = queries
        .iter()
        .map(|q| {
            let resolve = |list: &[String]| -> Vec<GroupRef> {
                list.iter()
                    .filter_map(|g| names.groups.get(g).cloned())
                    .collect()
            };
            (resolve(&q.scope.include), resolve(&q.scope.exclude))
        })
        .collect();
    let mut counters: Vec<SignInCounter> = queries
        .iter()
        .map(|q| SignInCounter::new(q.since, q.until))
        .collect();
    let filter = format!(
        "createdDateTime ge {} and createdDateTime le {}",
        format_time(since),
        format_time(until)
    );
    let first = format!(
        "/auditLogs/signIns?$filter={}&$top={PAGE_SIZE}",
        encode(&filter)
    );
    let slots = slots(&client.settings().tenant, &client.settings().client_id);
    let mut fetched: HashSet<String> = HashSet::new();
    let mut next = Some(first);
    let mut truncated = false;
    while let Some(url) = next.take() {
        if fetched.len() >= MAX_PAGES {
            truncated = true;
            break;
        }
        pace(&slots).await;
        let page = match client
            .call(Method::GET, &url, None, &[PREFER], Access::Read)
            .await
        {
            Ok(page) => page,
            Err(e) if unavailable(&e) => {
                let reason = format!(
                    "the app cannot read the sign-in log (it needs {} and a Microsoft Entra ID P1 or P2 licence): {}",
                    ROLES.join(" and "),
                    e.message
                );
                return Ok(queries
                    .iter()
                    .map(|_| SignIns::Unavailable {
                        reason: reason.clone(),
                    })
                    .collect());
            }
            Err(e) => return Err(e),
        };
        fetched.insert(url);
        for signin in page["value"].as_array().into_iter().flatten() {
            let (Some(user), Some(at)) = (
                signin["userId"].as_str(),
                signin["createdDateTime"].as_str().and_then(parse_time),
            ) else {
                continue;
            };
            if emergency.contains(user) {
                continue;
            }
            let Some(outcome) = outcome(signin, &policies) else {
                continue;
            };
            for ((include, exclude), counter) in scopes.iter().zip(&mut counters) {
                if include.iter().any(|g| in_group(g, user))
                    && !exclude.iter().any(|g| in_group(g, user))
                {
                    counter.add(user, at, outcome);
                }
            }
        }
        if let Some(link) = page["@odata.nextLink"].as_str() {
            if fetched.contains(link) {
                return Err(ProviderError::permanent(format!(
                    "GET /auditLogs/signIns: paging loop: @odata.nextLink {link} was already fetched in this listing"
                )));
            }
            next = Some(link.to_string());
        }
    }
    Ok(counters
        .into_iter()
        .map(|c| SignIns::Observed(c.finish(truncated)))
        .collect())
}

/// The user ids of every group the queries name.
async fn members(
    client: &GraphClient,
    names: &Names,
    queries: &[SignInQuery],
) -> Result<HashMap<String, HashSet<String>>, ProviderError> {
    let ids: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| q.scope.include.iter().chain(&q.scope.exclude))
        .filter_map(|g| match names.groups.get(g) {
            Some(GroupRef::Id(id)) => Some(id.clone()),
            _ => None,
        })
        .collect();
    let read = try_join_all(ids.iter().map(|id| async move {
        let mut users = HashSet::new();
        let url = format!(
            "/groups/{id}/transitiveMembers/microsoft.graph.user?$select=id&$top=999&$count=true"
        );
        client
            .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
                users.extend(
                    page.iter()
                        .filter_map(|u| u["id"].as_str())
                        .map(str::to_string),
                );
            })
            .await?;
        Ok::<_, ProviderError>((id.clone(), users))
    }))
    .await?;
    Ok(read.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn no_more_than_five_requests_leave_in_ten_seconds() {
        let start = Instant::now();
        let mut sent = VecDeque::new();
        for i in 0..5 {
            let now = start + Duration::from_millis(i * 100);
            assert_eq!(wait_for_slot(&mut sent, now), Duration::ZERO);
            sent.push_back(now);
        }
        let sixth = start + Duration::from_millis(500);
        let wait = wait_for_slot(&mut sent, sixth);
        // The first went at 0 ms: the sixth may go 10 s after it (and a little margin).
        assert_eq!(wait, Duration::from_millis(9_550));
        // Once the oldest has left the window, the next goes at once.
        let later = start + Duration::from_millis(10_050);
        assert_eq!(wait_for_slot(&mut sent, later), Duration::ZERO);
        assert_eq!(sent.len(), 4);
    }

    #[test]
    fn the_strongest_result_of_the_rollouts_policies_counts() {
        let ours: BTreeSet<String> = ["ca".to_string(), "copy".to_string()].into();
        let signin = |results: &[(&str, &str)]| json!({"appliedConditionalAccessPolicies": results.iter().map(|(id, r)| json!({"id": id, "displayName": "x", "result": r})).collect::<Vec<_>>()});
        assert_eq!(
            outcome(&signin(&[("ca", "reportOnlyFailure")]), &ours),
            Some(SignInOutcome::WouldBlock)
        );
        assert_eq!(
            outcome(&signin(&[("ca", "reportOnlyInterrupted")]), &ours),
            Some(SignInOutcome::WouldBlock)
        );
        assert_eq!(
            outcome(
                &signin(&[("ca", "reportOnlySuccess"), ("copy", "failure")]),
                &ours
            ),
            Some(SignInOutcome::Blocked)
        );
        assert_eq!(
            outcome(&signin(&[("ca", "success")]), &ours),
            Some(SignInOutcome::Passed)
        );
        // Someone else's policy, or ours not applying, is not an evaluation.
        assert_eq!(outcome(&signin(&[("other", "failure")]), &ours), None);
        for result in [
            "notApplied",
            "notEnabled",
            "reportOnlyNotApplied",
            "unknownFutureValue",
        ] {
            assert_eq!(outcome(&signin(&[("ca", result)]), &ours), None, "{result}");
        }
        assert_eq!(outcome(&json!({}), &ours), None);
    }
}
