//! The tenant's sign-in log: `GET /auditLogs/signIns`, and `POST /_emulator/signins` to make
//! the fleet's users sign in.
//!
//! Each sign-in is evaluated when it happens against the Conditional Access policies and the
//! devices' compliance at that moment, and kept as it was judged — a log, not a view: changing a
//! policy later does not rewrite it. What the service documents and the emulator does:
//!
//! - the listing is most recent first, at most and by default 1,000 per page, linked by
//!   `@odata.nextLink`; `$filter` on `createdDateTime` (`ge`, `gt`, `le`, `lt`, joined by `and`)
//!   ("List signIns", learn.microsoft.com/graph/api/signin-list);
//! - it needs `AuditLog.Read.All` (with `Directory.Read.All`) among the app's roles, otherwise
//!   `403 Authorization_RequestDenied` (the same page, "Permissions");
//! - each sign-in lists every Conditional Access policy in `appliedConditionalAccessPolicies` with
//!   its `result`: `success` / `failure` when enabled and applying, `notApplied` when its
//!   conditions leave the sign-in out, `notEnabled` when disabled, and for report-only policies
//!   `reportOnlySuccess` / `reportOnlyFailure` / `reportOnlyNotApplied`, which are only sent with
//!   `Prefer: include-unknown-enum-members` and are `unknownFutureValue` without it
//!   (learn.microsoft.com/graph/api/resources/appliedconditionalaccesspolicy);
//! - a device fails "Require device to be marked as compliant" unless Intune marks it compliant:
//!   a device in its grace period still has access, one noncompliant past it does not
//!   ("complianceState", learn.microsoft.com/graph/api/resources/intune-devices-compliancestate),
//!   and a device no compliance policy is assigned to is as the tenant's "Mark devices with no
//!   compliance policy assigned as" (`secureByDefault`) says
//!   (learn.microsoft.com/graph/api/resources/intune-deviceconfig-devicemanagementsettings);
//! - a blocked sign-in carries error 53000, "Device is not in required device state"
//!   (learn.microsoft.com/entra/identity-platform/reference-error-codes);
//! - the identity and access reports service allows an app five requests per ten seconds in a
//!   tenant, answering `429` with `Retry-After` beyond ("Identity and access reports service
//!   limits", learn.microsoft.com/graph/throttling-limits);
//! - the log keeps 30 days (learn.microsoft.com/entra/identity/monitoring-health/reference-reports-data-retention).
//!
//! Sign-ins are to Office 365 Exchange Online from a browser: a policy covers them when its
//! applications include `All` or `Office365` and its client app types `all` or `browser`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Call, Response, Tenant, ca, decode_skiptoken, graph_error, next_link, throttled};
use crate::domain::time::Timestamp;
use crate::emulator::intune::Status;
use crate::graph::format_time;

/// Requests an app may make to the reports service in [`WINDOW`].
pub const REQUESTS_PER_WINDOW: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(10);
/// The service's largest (and default) page.
pub const MAX_PAGE: usize = 1000;
/// Sign-ins one burst may make.
pub const MAX_BURST: u64 = 100_000;
/// Sign-ins the log holds; older ones go first (besides the 30 days' retention).
pub const MAX_ENTRIES: usize = 2_000_000;
pub const RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// "Office 365 Exchange Online".
const APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";
const APP_NAME: &str = "Office 365 Exchange Online";
const NOT_COMPLIANT: &str = "Device is not in required device state: compliant. Conditional Access policy requires a compliant device, and the device is not compliant. The user must enroll their device with an approved MDM provider like Intune.";

/// One policy's verdict on one sign-in.
#[derive(Clone, Debug)]
struct Applied {
    id: String,
    name: String,
    result: &'static str,
    /// The grant controls it asked for.
    controls: Vec<String>,
}

#[derive(Clone, Debug)]
struct Entry {
    seq: u64,
    at: Timestamp,
    user: u32,
    device: u32,
    compliant: bool,
    policies: Vec<Applied>,
}

/// The log, and the reports service's throttle.
#[derive(Default)]
pub(in crate::emulator) struct Log {
    /// Oldest first.
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// When the app's recent requests came (real time, like the service's limit).
    requests: VecDeque<Instant>,
    bursts: u64,
}

impl Log {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// `createdDateTime ge 2026-01-01T00:00:00Z and createdDateTime lt ...` → the bounds, or `None`
/// for any other filter.
fn parse_filter(filter: &str) -> Option<(Option<Timestamp>, Option<Timestamp>)> {
    let (mut from, mut to): (Option<Timestamp>, Option<Timestamp>) = (None, None);
    for term in filter.split(" and ") {
        let mut words = term.split_whitespace();
        let (Some("createdDateTime"), Some(op), Some(value), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        let at = crate::graph::parse_time(value.trim_matches('\''))?;
        let one_ms = Duration::from_millis(1);
        match op {
            "ge" => from = Some(from.map_or(at, |f| f.max(at))),
            "gt" => {
                let at = at.plus(one_ms);
                from = Some(from.map_or(at, |f| f.max(at)));
            }
            "le" => to = Some(to.map_or(at, |t| t.min(at))),
            "lt" => {
                let at = at.minus(one_ms);
                to = Some(to.map_or(at, |t| t.min(at)));
            }
            _ => return None,
        }
    }
    Some((from, to))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

impl Tenant {
    /// Whether Intune marks `device` compliant for Conditional Access now.
    fn compliant_for_access(&self, device: usize) -> bool {
        let (_, platform) = self.fleet.device_owner(device);
        let covered = self
            .intune
            .listed(platform)
            .binary_search(&(device as u32))
            .is_ok();
        if covered {
            !self.intune.noncompliant_past_grace(device)
        } else {
            !self.secure_by_default()
        }
    }

    /// The result of one Conditional Access policy for a sign-in by `user` from `device`.
    fn evaluate(
        &self,
        raw: &serde_json::Map<String, Value>,
        user: usize,
        device: usize,
    ) -> Applied {
        let state = raw
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("disabled");
        let conditions = raw.get("conditions").cloned().unwrap_or(Value::Null);
        let users = &conditions["users"];
        let user_id = self.user_id(user);
        let bits = self.fleet.user_groups(user);
        let group_bits = |key: &str| {
            strings(&users[key])
                .iter()
                .map(|id| self.group_bits(id).unwrap_or(0))
                .fold(0u16, |a, b| a | b)
        };
        let include_users = strings(&users["includeUsers"]);
        let exclude_users = strings(&users["excludeUsers"]);
        let in_users = (include_users.contains(&"All")
            || include_users.contains(&user_id.as_str())
            || bits & group_bits("includeGroups") != 0)
            && !exclude_users.contains(&user_id.as_str())
            && bits & group_bits("excludeGroups") == 0;
        let apps = strings(&conditions["applications"]["includeApplications"]);
        let excluded_apps = strings(&conditions["applications"]["excludeApplications"]);
        let in_apps =
            (apps.contains(&"All") || apps.contains(&"Office365") || apps.contains(&APP_ID))
                && !excluded_apps.contains(&"Office365")
                && !excluded_apps.contains(&APP_ID);
        let client_apps = strings(&conditions["clientAppTypes"]);
        let in_clients = client_apps.is_empty()
            || client_apps.contains(&"all")
            || client_apps.contains(&"browser");
        let (_, platform) = self.fleet.device_owner(device);
        let in_platforms = ca::platforms_covered(raw)[super::platform_index(platform)];
        let applies = in_users && in_apps && in_clients && in_platforms;
        let grant = raw.get("grantControls").cloned().unwrap_or(Value::Null);
        let built_in = strings(&grant["builtInControls"]);
        // The compliance requirement as if enabled: the same rule `ca::enforces_compliance`
        // applies (mandatory unless another control can satisfy an OR).
        let mut as_enabled = raw.clone();
        as_enabled.insert("state".into(), json!("enabled"));
        let satisfied = if built_in.contains(&"block") {
            false
        } else if ca::enforces_compliance(&as_enabled) {
            self.compliant_for_access(device)
        } else {
            // Other controls (MFA, terms of use) are not modelled: users satisfy them.
            true
        };
        let result = match (state, applies, satisfied) {
            ("disabled", _, _) => "notEnabled",
            ("enabled", false, _) => "notApplied",
            ("enabled", true, true) => "success",
            ("enabled", true, false) => "failure",
            (_, false, _) => "reportOnlyNotApplied",
            (_, true, true) => "reportOnlySuccess",
            (_, true, false) => "reportOnlyFailure",
        };
        Applied {
            id: String::new(),
            name: raw
                .get("displayName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            result,
            controls: built_in
                .iter()
                .map(|c| match *c {
                    "compliantDevice" => "RequireCompliantDevice".to_string(),
                    "mfa" => "Mfa".to_string(),
                    "block" => "Block".to_string(),
                    other => other.to_string(),
                })
                .collect(),
        }
    }

    /// One sign-in now by `device`'s owner, evaluated and logged.
    fn sign_in(&mut self, device: usize, now: Timestamp) -> &Entry {
        let (user, _) = self.fleet.device_owner(device);
        let policies: Vec<Applied> = self
            .ca_policies
            .iter()
            .map(|p| Applied {
                id: p.id.clone(),
                ..self.evaluate(&p.raw, user, device)
            })
            .collect();
        let compliant = self.compliant_for_access(device);
        let log = &mut self.signins;
        let horizon = now.minus(RETENTION);
        while log
            .entries
            .front()
            .is_some_and(|e| e.at < horizon || log.entries.len() >= MAX_ENTRIES)
        {
            log.entries.pop_front();
        }
        log.entries.push_back(Entry {
            seq: log.next_seq,
            at: now,
            user: user as u32,
            device: device as u32,
            compliant,
            policies,
        });
        log.next_seq += 1;
        self.signins.entries.back().expect("just pushed")
    }

    /// `POST /_emulator/signins` `{"count": N, "group": "<display name>", "devices":
    /// "any"|"noncompliant"}`: N sign-ins now by the owners of the group's devices (every user's
    /// without a group), taken in turn, only devices Intune reports noncompliant if asked.
    pub(super) fn sign_in_burst(&mut self, body: &[u8]) -> Response {
        let usage = || {
            Response::json(
                400,
                json!({"error": format!("expected {{\"count\": 1..{MAX_BURST}, \"group\": \"<display name>\", \"devices\": \"any\" | \"noncompliant\"}}")}),
            )
        };
        let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
            return usage();
        };
        let Some(count) = parsed["count"]
            .as_u64()
            .filter(|n| (1..=MAX_BURST).contains(n))
        else {
            return usage();
        };
        let bit = match parsed["group"].as_str() {
            None => None,
            Some(name) => match self.groups.iter().find(|g| g.name == name) {
                Some(group) => Some(group.bit),
                None => {
                    return Response::json(404, json!({"error": format!("no group {name:?}")}));
                }
            },
        };
        let only_noncompliant = match parsed["devices"].as_str() {
            None | Some("any") => false,
            Some("noncompliant") => true,
            Some(_) => return usage(),
        };
        let candidates: Vec<usize> = (0..self.fleet.device_count())
            .filter(|&d| {
                let (user, platform) = self.fleet.device_owner(d);
                bit.is_none_or(|b| self.fleet.user_groups(user) & b != 0)
                    && (!only_noncompliant
                        || (self
                            .intune
                            .listed(platform)
                            .binary_search(&(d as u32))
                            .is_ok()
                            && self.intune.row(platform, d).status == Status::NonCompliant))
            })
            .collect();
        if candidates.is_empty() {
            return Response::json(409, json!({"error": "no device matches: nobody signs in"}));
        }
        let now = self.now();
        let start = (self.signins.bursts as usize).wrapping_mul(7919) % candidates.len();
        self.signins.bursts += 1;
        let mut results: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for i in 0..count as usize {
            let device = candidates[(start + i) % candidates.len()];
            let entry = self.sign_in(device, now);
            for applied in &entry.policies {
                *results.entry(applied.result).or_default() += 1;
            }
        }
        Response::json(
            200,
            json!({"created": count, "at": format_time(now), "results": results, "logged": self.signins.len()}),
        )
    }

    /// `GET /auditLogs/signIns`.
    pub(super) fn list_signins(&mut self, call: &Call) -> Response {
        let now = self.now();
        let request_id = call.request_id;
        if call.method != "GET" || call.path.trim_end_matches('/') != "/auditLogs/signIns" {
            return graph_error(
                400,
                "BadRequest",
                &format!("Resource not found for the segment '{}'.", call.path),
                now,
                request_id,
            );
        }
        // The reports service's limit, counted per app in this tenant.
        let clock = Instant::now();
        let log = &mut self.signins;
        while log
            .requests
            .front()
            .is_some_and(|t| clock.duration_since(*t) >= WINDOW)
        {
            log.requests.pop_front();
        }
        if log.requests.len() >= REQUESTS_PER_WINDOW {
            let oldest = log.requests[log.requests.len() - REQUESTS_PER_WINDOW];
            let wait = (oldest + WINDOW).saturating_duration_since(clock);
            return throttled(now, request_id).header(
                "Retry-After",
                format!("{}", wait.as_secs_f64().ceil().max(1.0)),
            );
        }
        log.requests.push_back(clock);
        let roles = self.setup.readiness.roles();
        if !roles
            .iter()
            .any(|r| r.eq_ignore_ascii_case("AuditLog.Read.All"))
        {
            return graph_error(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
                now,
                request_id,
            );
        }
        let (from, to) = match call.q("$filter").map(parse_filter) {
            None => (None, None),
            Some(Some(bounds)) => bounds,
            Some(None) => {
                return graph_error(
                    400,
                    "BadRequest",
                    "Invalid filter clause: the emulator filters sign-ins on createdDateTime (ge, gt, le, lt) only",
                    now,
                    request_id,
                );
            }
        };
        let top = match call.q("$top").map(str::parse::<usize>) {
            None => MAX_PAGE,
            Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
            Some(_) => {
                return graph_error(
                    400,
                    "BadRequest",
                    &format!("Invalid $top value: the page size is 1 to {MAX_PAGE}"),
                    now,
                    request_id,
                );
            }
        };
        // Keyset paging: the token is the sequence number the next page starts below, so new
        // sign-ins never shift a listing under way.
        let below = call
            .q("$skiptoken")
            .and_then(decode_skiptoken)
            .map(|s| s as u64);
        let unknown_enums = call.headers.get("prefer").is_some_and(|p| {
            p.split(',').any(|v| {
                v.trim()
                    .eq_ignore_ascii_case("include-unknown-enum-members")
            })
        });
        let mut page = Vec::new();
        let mut more = None;
        for entry in self.signins.entries.iter().rev() {
            if below.is_some_and(|b| entry.seq >= b)
                || from.is_some_and(|f| entry.at < f)
                || to.is_some_and(|t| entry.at > t)
            {
                continue;
            }
            if page.len() == top {
                more = Some(page_end(&page));
                break;
            }
            page.push(entry);
        }
        let items: Vec<Value> = page
            .iter()
            .map(|e| self.signin_json(e, unknown_enums))
            .collect();
        let mut body = json!({
            "@odata.context": format!("{}#auditLogs/signIns", call.metadata()),
            "value": items,
        });
        if let Some(seq) = more {
            body["@odata.nextLink"] = json!(next_link(call, seq as usize));
        }
        Response::json(200, body)
    }

    fn signin_json(&self, e: &Entry, unknown_enums: bool) -> Value {
        let user = e.user as usize;
        let device = e.device as usize;
        let (_, platform) = self.fleet.device_owner(device);
        let failed = e.policies.iter().any(|p| p.result == "failure");
        let succeeded = e.policies.iter().any(|p| p.result == "success");
        let applied: Vec<Value> = e
            .policies
            .iter()
            .map(|p| {
                let result = if !unknown_enums && p.result.starts_with("reportOnly") {
                    "unknownFutureValue"
                } else {
                    p.result
                };
                let enforced = matches!(p.result, "success" | "failure");
                json!({
                    "id": p.id,
                    "displayName": p.name,
                    "enforcedGrantControls": if enforced { p.controls.clone() } else { Vec::new() },
                    "enforcedSessionControls": [],
                    "result": result,
                })
            })
            .collect();
        json!({
            "id": super::guid(self.settings.seed, "signin", e.seq),
            "createdDateTime": format_time(e.at),
            "userDisplayName": format!("User {user}"),
            "userPrincipalName": self.user_principal_name(user),
            "userId": self.user_id(user),
            "appId": APP_ID,
            "appDisplayName": APP_NAME,
            "clientAppUsed": "Browser",
            "isInteractive": true,
            "conditionalAccessStatus": if failed { "failure" } else if succeeded { "success" } else { "notApplied" },
            "status": if failed {
                json!({"errorCode": 53000, "failureReason": NOT_COMPLIANT, "additionalDetails": null})
            } else {
                json!({"errorCode": 0, "failureReason": "Other.", "additionalDetails": null})
            },
            "deviceDetail": {
                "deviceId": super::guid(self.settings.seed, "device", device),
                "displayName": format!("device-{device:07}"),
                "operatingSystem": ca::platform_name(platform),
                "isCompliant": e.compliant,
                "isManaged": true,
                "trustType": "Azure AD joined",
            },
            "appliedConditionalAccessPolicies": applied,
        })
    }
}

/// The token for the page after `page` (most recent first): below its last entry.
fn page_end(page: &[&Entry]) -> u64 {
    page.last().map_or(0, |e| e.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_takes_created_date_time_bounds_only() {
        let at = |s| crate::graph::parse_time(s).unwrap();
        assert_eq!(
            parse_filter(
                "createdDateTime ge 2026-01-01T00:00:00Z and createdDateTime le 2026-01-02T00:00:00Z"
            ),
            Some((
                Some(at("2026-01-01T00:00:00Z")),
                Some(at("2026-01-02T00:00:00Z"))
            ))
        );
        assert_eq!(
            parse_filter("createdDateTime gt 2026-01-01T00:00:00Z"),
            Some((Some(at("2026-01-01T00:00:00.001Z")), None))
        );
        assert_eq!(parse_filter("userId eq 'x'"), None);
        assert_eq!(
            parse_filter("createdDateTime eq 2026-01-01T00:00:00Z"),
            None
        );
        assert_eq!(parse_filter("createdDateTime ge yesterday"), None);
    }
}
