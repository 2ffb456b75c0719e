//! What phasegate owns in a tenant, and the writes that change only that, as pure functions.
//!
//! A production tenant was configured by other people; phasegate changes **members**, never whole
//! objects. [`members`] projects what was read of the tenant ([`TenantView`], every object kept
//! whole, as the service returned it) onto the members a rollout manages, each under a stable key:
//!
//! | key | member |
//! |---|---|
//! | `policy/<id>/include/<group>` | the assignment target for a plan group (`allUsers` for All users) |
//! | `policy/<id>/exclude/<group>` | the exclusion target for a plan group |
//! | `policy/<id>/grace` | the `block` action's `gracePeriodHours` |
//! | `policy/<id>/notification` | a `notification` action with the plan's template |
//! | `policy/<id>/claim` | the ownership line in the policy's description |
//! | `ca/includeUsers/All`, `ca/includeGroups/<group>` | the plan's users in the Conditional Access policy |
//! | `ca/state`, `ca/claim` | its state (only while it is not enabled) and ownership line |
//! | `ca/relied/<member>` | members of an **enabled** policy the rollout relies on: watched, never written |
//! | `enforced` | the enforced copy, which phasegate creates and owns whole |
//!
//! [`wanted`] says what each member should be for a desired state, [`drift`] finds members someone
//! else changed, [`restored`] what abort puts back, and [`plan_writes`] turns the differences into
//! the fewest writes, each carrying every other member of its object through unchanged, ordered so
//! that whatever unblocks people goes first.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::domain::desired::DesiredState;
use crate::domain::event::DriftChange;
use crate::domain::plan::{Mode, Platform};
use crate::graph::NIL_GUID;

pub const ENFORCED_SUFFIX: &str = " (phasegate enforced)";
/// The longest grace Intune accepts (365 days): report phases hold failing devices in it.
pub const REPORT_HOLD_HOURS: i64 = 8760;

const GROUP_TARGET: &str = "#microsoft.graph.groupAssignmentTarget";
const EXCLUSION_TARGET: &str = "#microsoft.graph.exclusionGroupAssignmentTarget";
const ALL_USERS_TARGET: &str = "#microsoft.graph.allLicensedUsersAssignmentTarget";
const ALL_USERS_KEY: &str = "allUsers";

/// A group as the tenant knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GroupRef {
    Id(String),
    /// The virtual "All users" target.
    AllUsers,
}

impl GroupRef {
    fn key(&self) -> &str {
        match self {
            GroupRef::Id(id) => id,
            GroupRef::AllUsers => ALL_USERS_KEY,
        }
    }
}

/// A compliance policy the plan names, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyName {
    pub id: String,
    pub name: String,
    pub platform: Platform,
}

/// Ids the plan's names resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub policies: Vec<PolicyName>,
    pub template_id: Option<String>,
    pub conditional_access: Option<CaNames>,
    pub groups: BTreeMap<String, GroupRef>,
    /// Emergency-access users as `(object id, user principal name)`.
    pub emergency_users: Vec<(String, String)>,
    /// Users an exception exempts, as `(object id, user principal name)`.
    pub exempt_users: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaNames {
    pub id: String,
    pub name: String,
}

impl CaNames {
    pub fn enforced_name(&self) -> String {
        format!("{}{ENFORCED_SUFFIX}", self.name)
    }
}

impl Names {
    fn policy_name<'a>(&'a self, id: &'a str) -> &'a str {
        self.policies
            .iter()
            .find(|p| p.id == id)
            .map_or(id, |p| p.name.as_str())
    }

    fn group_name(&self, key: &str) -> String {
        if key == ALL_USERS_KEY {
            return "All users".into();
        }
        self.groups
            .iter()
            .find(|(_, g)| g.key() == key)
            .map_or_else(|| key.to_string(), |(name, _)| name.clone())
    }

    /// The object id of a user an exception exempts, by UPN.
    pub fn exempt_user(&self, upn: &str) -> Result<&str, String> {
        self.exempt_users
            .iter()
            .find(|(_, known)| known.eq_ignore_ascii_case(upn))
            .map(|(id, _)| id.as_str())
            .ok_or_else(|| format!("user {upn} of an exception was not resolved"))
    }

    pub fn resolve(&self, name: &str) -> Result<GroupRef, String> {
        self.groups
            .get(name)
            .cloned()
            .ok_or_else(|| format!("group `{name}` was not resolved"))
    }
}

/// What the plan's Conditional Access policy is to the rollout, decided from the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaRole {
    /// The plan names none.
    None,
    /// It was not enabled: phasegate puts the rollout's users in it (report-only) and enforces
    /// through an enabled copy.
    Managed,
    /// It was already enabled: it *is* the enforcement. phasegate never writes it, relies on it,
    /// and watches what it relies on.
    Relied,
}

/// One compliance policy as read, whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub odata_type: String,
    pub description: Option<String>,
    /// Every assignment as the service returned it (beta: with filter fields and source).
    pub assignments: Vec<Value>,
    /// Every action for noncompliance, as returned.
    pub actions: Vec<Value>,
}

/// What phasegate read of the objects it may write, each kept whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantView {
    /// By policy id.
    pub policies: BTreeMap<String, PolicyView>,
    /// The plan's Conditional Access policy, as returned.
    pub conditional_access: Option<Value>,
    /// The enforced copy, if it exists.
    pub enforced: Option<Value>,
}

/// Managed members by key (see the module documentation).
pub type Members = BTreeMap<String, Value>;

/// Everything the projection needs besides the view.
pub struct Scope<'a> {
    pub names: &'a Names,
    pub role: CaRole,
    /// The plan's groups, resolved: the members managed for the whole rollout.
    pub include: &'a BTreeSet<GroupRef>,
    pub exclude: &'a BTreeSet<GroupRef>,
}

fn target_type(target: &Value) -> String {
    let t = target["@odata.type"].as_str().unwrap_or("");
    if t.starts_with('#') {
        t.to_string()
    } else {
        format!("#{t}")
    }
}

/// The member a target is, if phasegate can manage it: `(exclusion?, group key)`.
fn target_member(target: &Value) -> Option<(bool, String)> {
    match target_type(target).as_str() {
        GROUP_TARGET => Some((false, target["groupId"].as_str()?.to_string())),
        EXCLUSION_TARGET => Some((true, target["groupId"].as_str()?.to_string())),
        ALL_USERS_TARGET => Some((false, ALL_USERS_KEY.to_string())),
        _ => None,
    }
}

/// A target without the members that say nothing (a null filter, filter type `none`), so what
/// the service returns compares equal to what phasegate sent.
fn canonical_target(target: &Value) -> Value {
    let mut out = Map::new();
    for (k, v) in target.as_object().into_iter().flatten() {
        let says_nothing = v.is_null()
            || (k == "deviceAndAppManagementAssignmentFilterType" && v == "none")
            || k == "@odata.type";
        if !says_nothing {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("@odata.type".into(), json!(target_type(target)));
    Value::Object(out)
}

fn our_target(exclusion: bool, group: &GroupRef) -> Value {
    match (exclusion, group) {
        (false, GroupRef::AllUsers) => json!({"@odata.type": ALL_USERS_TARGET}),
        (false, GroupRef::Id(id)) => json!({"@odata.type": GROUP_TARGET, "groupId": id}),
        (true, group) => json!({"@odata.type": EXCLUSION_TARGET, "groupId": group.key()}),
    }
}

/// Whether the policy sends its noncompliance e-mail: Intune's "Send email to end user" action
/// applies to every noncompliant device the policy is assigned to ("Configure actions for
/// noncompliant devices in Intune", learn.microsoft.com/intune/intune-service/protect/actions-for-noncompliance).
pub fn sends_notification(policy: &PolicyView) -> bool {
    policy.actions.iter().any(|a| is_action(a, "notification"))
}

fn is_action(action: &Value, kind: &str) -> bool {
    action["actionType"].as_str() == Some(kind)
}

fn template_of(action: &Value) -> String {
    match action["notificationTemplateId"].as_str() {
        None | Some("") | Some(NIL_GUID) => String::new(),
        Some(id) => id.to_lowercase(),
    }
}

/// The line in a description that says which rollout owns an object.
pub fn claim_marker(rollout: &str, store: &str) -> String {
    format!("phasegate: rollout {rollout} (store {store}) manages this policy's staged rollout")
}

/// The ownership line of a description, if it has one.
pub fn claim_in(description: Option<&str>) -> Option<String> {
    description?
        .lines()
        .find(|l| l.starts_with("phasegate: rollout "))
        .map(str::to_string)
}

/// The rollout and store a marker names.
pub fn claimant(marker: &str) -> Option<(String, String)> {
    let rest = marker.strip_prefix("phasegate: rollout ")?;
    let (rollout, rest) = rest.split_once(" (store ")?;
    let (store, _) = rest.split_once(')')?;
    Some((rollout.to_string(), store.to_string()))
}

fn with_claim(description: Option<&str>, claim: Option<&str>) -> Value {
    let kept: Vec<&str> = description
        .unwrap_or("")
        .lines()
        .filter(|l| !l.starts_with("phasegate: rollout "))
        .collect();
    let mut lines = kept;
    if let Some(claim) = claim {
        lines.push(claim);
    }
    if lines.is_empty() {
        // An empty description is what the service keeps for none.
        return match description {
            None => Value::Null,
            Some(_) => json!(""),
        };
    }
    json!(lines.join("\n"))
}

/// The action items of a compliance policy read with
/// `$expand=scheduledActionsForRule($expand=scheduledActionConfigurations)`, all rules together.
pub fn scheduled_actions(policy: &Value) -> Vec<Value> {
    policy["scheduledActionsForRule"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| {
            rule["scheduledActionConfigurations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// The strings of a JSON array (nothing for anything else).
pub fn str_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// A Conditional Access policy requires a compliant device when `compliantDevice` cannot be
/// side-stepped: the operator is AND, or it is the only control.
pub fn requires_compliance(policy: &Value) -> bool {
    let controls = str_list(&policy["grantControls"]["builtInControls"]);
    let operator = policy["grantControls"]["operator"].as_str().unwrap_or("OR");
    controls.iter().any(|c| c == "compliantDevice")
        && (operator.eq_ignore_ascii_case("AND") || controls.len() == 1)
}

/// The platform names Conditional Access uses.
pub fn ca_platform(platform: Platform) -> &'static str {
    match platform {
        Platform::Windows => "windows",
        Platform::Ios => "iOS",
        Platform::Android => "android",
        Platform::Macos => "macOS",
    }
}

/// Nulls and empty collections removed, lists of strings sorted: two policies that mean the
/// same compare equal whatever defaults the service filled in.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = canonical(v);
                let empty = v.is_null()
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(Map::is_empty);
                if !empty && !k.starts_with("@odata.context") {
                    out.insert(k.clone(), v);
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(canonical).collect();
            if items.iter().all(Value::is_string) {
                items.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                items.dedup();
            }
            Value::Array(items)
        }
        other => other.clone(),
    }
}

/// The parts of an enforced copy that decide what it does.
fn enforced_member(policy: &Value) -> Value {
    let mut grant = policy["grantControls"].clone();
    if let Some(strength) = grant.get_mut("authenticationStrength")
        && let Some(id) = strength["id"].as_str()
    {
        *strength = json!({"id": id});
    }
    canonical(&json!({
        "displayName": policy["displayName"],
        "state": policy["state"],
        "conditions": policy["conditions"],
        "grantControls": grant,
        "sessionControls": policy["sessionControls"],
    }))
}

/// The managed members of a view.
pub fn members(view: &TenantView, scope: &Scope) -> Members {
    let mut out = Members::new();
    for policy in &scope.names.policies {
        let Some(p) = view.policies.get(&policy.id) else {
            continue;
        };
        let base = format!("policy/{}", policy.id);
        let targets: Vec<(bool, String, Value)> = p
            .assignments
            .iter()
            .filter_map(|a| {
                let (exclusion, key) = target_member(&a["target"])?;
                Some((exclusion, key, canonical_target(&a["target"])))
            })
            .collect();
        let find = |exclusion: bool, group: &GroupRef| {
            targets
                .iter()
                .find(|(e, k, _)| *e == exclusion && k == group.key())
                .map_or(Value::Null, |(_, _, t)| t.clone())
        };
        for group in scope.include {
            out.insert(
                format!("{base}/include/{}", group.key()),
                find(false, group),
            );
        }
        for group in scope.exclude.iter().filter(|g| **g != GroupRef::AllUsers) {
            out.insert(format!("{base}/exclude/{}", group.key()), find(true, group));
        }
        let grace = p
            .actions
            .iter()
            .find(|a| is_action(a, "block"))
            .map_or(json!(0), |a| {
                json!(a["gracePeriodHours"].as_i64().unwrap_or(0))
            });
        out.insert(format!("{base}/grace"), grace);
        let template = scope.names.template_id.as_deref().map(str::to_lowercase);
        let notifies = template.as_ref().is_some_and(|t| {
            p.actions
                .iter()
                .any(|a| is_action(a, "notification") && template_of(a) == *t)
        });
        out.insert(format!("{base}/notification"), json!(notifies));
        out.insert(
            format!("{base}/claim"),
            claim_in(p.description.as_deref()).map_or(Value::Null, Value::String),
        );
    }
    if let Some(ca) = &view.conditional_access {
        let users = &ca["conditions"]["users"];
        match scope.role {
            CaRole::Managed => {
                let include_users = str_list(&users["includeUsers"]);
                let include_groups = str_list(&users["includeGroups"]);
                for group in scope.include {
                    let (key, present) = match group {
                        GroupRef::AllUsers => (
                            "ca/includeUsers/All".to_string(),
                            include_users.iter().any(|u| u == "All"),
                        ),
                        GroupRef::Id(id) => (
                            format!("ca/includeGroups/{id}"),
                            include_groups.contains(id),
                        ),
                    };
                    out.insert(key, json!(present));
                }
                out.insert("ca/state".into(), ca["state"].clone());
                out.insert(
                    "ca/claim".into(),
                    claim_in(ca["description"].as_str()).map_or(Value::Null, Value::String),
                );
            }
            CaRole::Relied => {
                out.insert("ca/relied/state".into(), ca["state"].clone());
                out.insert("ca/relied/users".into(), canonical(users));
                out.insert(
                    "ca/relied/platforms".into(),
                    canonical(&ca["conditions"]["platforms"]),
                );
                out.insert(
                    "ca/relied/grantControls".into(),
                    enforced_member(ca)["grantControls"].clone(),
                );
            }
            CaRole::None => {}
        }
    }
    if scope.role == CaRole::Managed {
        out.insert(
            "enforced".into(),
            view.enforced.as_ref().map_or(Value::Null, enforced_member),
        );
    }
    out
}

/// What the derived grace of a notify phase was computed from, kept per policy while the
/// notification is on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraceState {
    /// When phasegate first saw its notification action in place (an upper bound of when
    /// owners began to be told).
    pub notified_since: Option<crate::domain::time::Timestamp>,
    /// The `block` grace derived for this notification, in hours.
    pub derived_hours: Option<i64>,
}

/// The inputs of [`wanted`].
pub struct Want<'a> {
    pub desired: &'a DesiredState,
    pub scope: &'a Scope<'a>,
    pub baseline: &'a Members,
    pub current: &'a Members,
    pub current_view: &'a TenantView,
    /// Members a person adopted: phasegate no longer writes them.
    pub released: &'a BTreeSet<String>,
    pub grace: &'a BTreeMap<String, GraceState>,
    pub marker: &'a str,
    pub platforms: &'a [Platform],
}

fn flag(members: &Members, key: &str) -> bool {
    members.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn hours(members: &Members, key: &str) -> i64 {
    members.get(key).and_then(Value::as_i64).unwrap_or(0)
}

/// Each managed member as the desired state wants it. Members that were there before the
/// rollout stay; phasegate only adds and takes away its own.
pub fn wanted(w: &Want) -> Result<Members, String> {
    let names = w.scope.names;
    let applied = &w.desired.assignments;
    let resolve = |name: &String| names.resolve(name);
    let mut included: BTreeSet<GroupRef> = BTreeSet::new();
    for a in applied {
        for g in &a.include {
            included.insert(resolve(g)?);
        }
    }
    // Intune has one exclusion list per policy: a group is excluded where every applied phase
    // excludes it.
    let mut excluded: Option<BTreeSet<GroupRef>> = None;
    for a in applied {
        let this = a
            .exclude
            .iter()
            .map(resolve)
            .collect::<Result<BTreeSet<_>, _>>()?;
        excluded = Some(match excluded {
            None => this,
            Some(before) => before.intersection(&this).cloned().collect(),
        });
    }
    let excluded = excluded.unwrap_or_default();
    let notify = applied.iter().any(|a| a.mode == Mode::Notify);
    let enforce = applied.iter().any(|a| a.mode == Mode::Enforce);
    let mut out = Members::new();
    let keep = |key: &str| w.current.get(key).cloned().unwrap_or(Value::Null);
    let base = |key: &str| w.baseline.get(key).cloned().unwrap_or(Value::Null);
    for (key, _) in w.current.iter() {
        let mut parts = key.splitn(4, '/');
        let value = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            _ if w.released.contains(key) => keep(key),
            (Some("policy"), Some(pid), Some("include"), Some(group)) => {
                let ours = included.iter().any(|g| g.key() == group);
                if !base(key).is_null() {
                    base(key)
                } else if ours {
                    let group = included.iter().find(|g| g.key() == group).expect("ours");
                    canonical_target(&our_target(false, group))
                } else {
                    let _ = pid;
                    Value::Null
                }
            }
            (Some("policy"), Some(_), Some("exclude"), Some(group)) => {
                if !base(key).is_null() {
                    base(key)
                } else if let Some(g) = excluded.iter().find(|g| g.key() == group) {
                    canonical_target(&our_target(true, g))
                } else {
                    Value::Null
                }
            }
            (Some("policy"), Some(pid), Some("grace"), None) => {
                json!(grace_hours(w, pid, applied.is_empty(), notify, enforce))
            }
            (Some("policy"), Some(_), Some("notification"), None) => {
                json!(flag(w.baseline, key) || notify)
            }
            (Some("policy"), Some(_), Some("claim"), None) | (Some("ca"), Some("claim"), _, _) => {
                if w.desired.claim {
                    json!(w.marker)
                } else {
                    base(key)
                }
            }
            (Some("ca"), Some("includeUsers"), Some("All"), None) => {
                json!(flag(w.baseline, key) || included.contains(&GroupRef::AllUsers))
            }
            (Some("ca"), Some("includeGroups"), Some(id), None) => {
                json!(flag(w.baseline, key) || included.contains(&GroupRef::Id(id.to_string())))
            }
            (Some("ca"), Some("state"), None, None) => {
                let before = base(key);
                if before == "disabled" && !applied.is_empty() {
                    json!("enabledForReportingButNotEnforced")
                } else {
                    before
                }
            }
            (Some("ca"), Some("relied"), _, _) => keep(key),
            (Some("enforced"), None, None, None) => {
                enforced_wanted(w, applied, enforce)?.unwrap_or(Value::Null)
            }
            _ => keep(key),
        };
        out.insert(key.clone(), value);
    }
    Ok(out)
}

/// The `block` grace, in hours, for one policy:
/// - nothing applied: what the admin had;
/// - report phases only: held at the maximum, so failing devices stay in grace (Conditional
///   Access treats them as compliant) while the gate still counts them;
/// - notify: first held (while the notification action goes in), then derived per device so
///   that nobody is blocked before being told plus the phase's grace ([`derive_grace`]) — the
///   plan's promise, also where the admin had a longer grace;
/// - enforce without notify: what the admin had.
fn grace_hours(w: &Want, pid: &str, nothing: bool, notify: bool, enforce: bool) -> i64 {
    let key = format!("policy/{pid}/grace");
    let before = hours(w.baseline, &key);
    if nothing {
        return before;
    }
    if notify {
        let on = flag(w.current, &format!("policy/{pid}/notification"));
        return match w.grace.get(pid).and_then(|g| g.derived_hours) {
            // What the plan promises, even where the admin had given more.
            Some(derived) if on => derived,
            _ => REPORT_HOLD_HOURS.max(before),
        };
    }
    if enforce {
        return before;
    }
    REPORT_HOLD_HOURS.max(before)
}

/// The grace (hours) that keeps the notify promise for every device: a device is blocked at
/// `first noncompliant + grace`; it was told no earlier than `notified_since` (plus the time a
/// check-in may take, `margin`); so `grace >= notified_since + margin + promised - first
/// noncompliant` for the earliest first noncompliance among the policy's devices.
pub fn derive_grace(
    notified_since: crate::domain::time::Timestamp,
    earliest_noncompliant: Option<crate::domain::time::Timestamp>,
    promised_secs: u64,
    margin_secs: u64,
) -> i64 {
    let ahead = promised_secs.saturating_add(margin_secs);
    let behind = earliest_noncompliant
        .map(|first| notified_since.since(first).as_secs())
        .unwrap_or(0);
    let secs = ahead.saturating_add(behind);
    (secs.div_ceil(3600) as i64).min(REPORT_HOLD_HOURS)
}

/// PATCH leaves out what is not sent, so a user list of the copy that is to become empty (the
/// last exception ended) is sent as `[]`; canonical values leave empty lists out.
fn clear_emptied_users(now: &Value, patch: &mut Map<String, Value>) {
    let Some(users) = patch
        .get_mut("conditions")
        .and_then(|c| c.get_mut("users"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for key in [
        "includeUsers",
        "includeGroups",
        "excludeUsers",
        "excludeGroups",
    ] {
        let had = now["conditions"]["users"][key]
            .as_array()
            .is_some_and(|list| !list.is_empty());
        if had && !users.contains_key(key) {
            users.insert(key.into(), json!([]));
        }
    }
}

/// The enforced copy the applied phases want: the plan's policy whole, scoped to the enforce
/// phases and to the platforms whose compliance the rollout manages, with every exclusion of the
/// original plus the phases' and emergency access. Disabled (kept) when no enforce phase is
/// applied; `None` when it should not exist.
fn enforced_wanted(
    w: &Want,
    applied: &[crate::domain::desired::DesiredAssignment],
    enforce: bool,
) -> Result<Option<Value>, String> {
    let current = w.current_view.enforced.as_ref();
    if !enforce {
        return Ok(current.map(|copy| {
            let mut copy = enforced_member(copy);
            copy["state"] = json!("disabled");
            canonical(&copy)
        }));
    }
    let Some(original) = &w.current_view.conditional_access else {
        return Ok(None);
    };
    let names = w.scope.names;
    let ca = names
        .conditional_access
        .as_ref()
        .ok_or("the plan names no Conditional Access policy")?;
    let enforcing: Vec<_> = applied.iter().filter(|a| a.mode == Mode::Enforce).collect();
    let mut include_all = false;
    let mut include_groups = BTreeSet::new();
    for a in &enforcing {
        for g in &a.include {
            match names.resolve(g)? {
                GroupRef::AllUsers => include_all = true,
                GroupRef::Id(id) => {
                    include_groups.insert(id);
                }
            }
        }
    }
    let users = &original["conditions"]["users"];
    let mut exclude_groups: BTreeSet<String> =
        str_list(&users["excludeGroups"]).into_iter().collect();
    for a in &enforcing {
        for g in &a.exclude {
            if let GroupRef::Id(id) = names.resolve(g)? {
                exclude_groups.insert(id);
            }
        }
    }
    for g in &w.desired.emergency_access.groups {
        if let GroupRef::Id(id) = names.resolve(g)? {
            exclude_groups.insert(id);
        }
    }
    let mut exclude_users: BTreeSet<String> =
        str_list(&users["excludeUsers"]).into_iter().collect();
    exclude_users.extend(names.emergency_users.iter().map(|(id, _)| id.clone()));
    // Exceptions: exempt users and groups are excluded from the copy phasegate owns, like
    // emergency access; Conditional Access lets exclusions win over inclusions.
    for g in &w.desired.exempt.groups {
        match names.resolve(g)? {
            GroupRef::Id(id) => {
                exclude_groups.insert(id);
            }
            GroupRef::AllUsers => {
                return Err(format!(
                    "an exception cannot exempt `{g}`: that is everyone the rollout enforces"
                ));
            }
        }
    }
    for upn in &w.desired.exempt.users {
        exclude_users.insert(names.exempt_user(upn)?.to_string());
    }
    let mut new_users = json!({
        "includeUsers": if include_all { json!(["All"]) } else { json!([]) },
        "includeGroups": include_groups.into_iter().collect::<Vec<_>>(),
        "excludeUsers": exclude_users.into_iter().collect::<Vec<_>>(),
        "excludeGroups": exclude_groups.into_iter().collect::<Vec<_>>(),
        "excludeRoles": users["excludeRoles"],
    });
    if !users["excludeGuestsOrExternalUsers"].is_null() {
        new_users["excludeGuestsOrExternalUsers"] = users["excludeGuestsOrExternalUsers"].clone();
    }
    let mut conditions = original["conditions"].clone();
    conditions["users"] = new_users;
    let managed: Vec<&str> = w.platforms.iter().map(|p| ca_platform(*p)).collect();
    let platforms = &original["conditions"]["platforms"];
    let allowed: Vec<String> = if platforms.is_null() {
        managed.iter().map(|p| p.to_string()).collect()
    } else {
        let include = str_list(&platforms["includePlatforms"]);
        let all = include.iter().any(|p| p == "all");
        managed
            .iter()
            .filter(|p| all || include.iter().any(|i| i.eq_ignore_ascii_case(p)))
            .map(|p| p.to_string())
            .collect()
    };
    if allowed.is_empty() {
        return Err(format!(
            "Conditional Access policy `{}` covers none of the platforms this rollout manages",
            ca.name
        ));
    }
    conditions["platforms"] = json!({
        "includePlatforms": allowed,
        "excludePlatforms": if platforms.is_null() { json!([]) } else { platforms["excludePlatforms"].clone() },
    });
    let mut copy = original.clone();
    copy["displayName"] = json!(ca.enforced_name());
    copy["state"] = json!("enabled");
    copy["conditions"] = conditions;
    Ok(Some(enforced_member(&copy)))
}

/// Members that are neither what phasegate last made them nor what it is about to make them:
/// someone else changed them. Members it only relies on drift whenever they change.
pub fn drift(
    last: &Members,
    current: &Members,
    wanted: &Members,
    released: &BTreeSet<String>,
    names: &Names,
) -> Vec<(String, DriftChange)> {
    current
        .iter()
        .filter(|(key, _)| !released.contains(*key))
        .filter_map(|(key, now)| {
            let before = last.get(key)?;
            let next = if key.starts_with("ca/relied/") {
                before
            } else {
                wanted.get(key).unwrap_or(before)
            };
            (now != before && now != next).then(|| (key.clone(), describe(key, before, now, names)))
        })
        .collect()
}

/// What abort wants: every member phasegate changed back as the baseline had it, unless someone
/// else changed it since (then theirs stays); the claim goes; the enforced copy goes.
pub fn restored(
    baseline: &Members,
    last: &Members,
    current: &Members,
    released: &BTreeSet<String>,
) -> Members {
    current
        .iter()
        .map(|(key, now)| {
            let untouched = last.get(key).is_none_or(|before| before == now);
            let value = if key.ends_with("/claim") || key == "ca/claim" || key == "enforced" {
                baseline.get(key).cloned().unwrap_or(Value::Null)
            } else if untouched && !released.contains(key) {
                baseline.get(key).cloned().unwrap_or_else(|| now.clone())
            } else {
                now.clone()
            };
            (key.clone(), value)
        })
        .collect()
}

fn show(value: &Value) -> String {
    match value {
        Value::Null => "absent".into(),
        Value::Bool(true) => "present".into(),
        Value::Bool(false) => "absent".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A drifted member in words: object, field, old and new value.
fn describe(key: &str, before: &Value, now: &Value, names: &Names) -> DriftChange {
    let parts: Vec<&str> = key.splitn(4, '/').collect();
    let ca = names
        .conditional_access
        .as_ref()
        .map_or("the Conditional Access policy".to_string(), |c| {
            format!("Conditional Access policy `{}`", c.name)
        });
    let (object, field, expected, found) = match parts.as_slice() {
        ["policy", pid, kind @ ("include" | "exclude"), group] => (
            format!("compliance policy `{}`", names.policy_name(pid)),
            format!(
                "assignments ({} target for `{}`)",
                if *kind == "include" {
                    "include"
                } else {
                    "exclusion"
                },
                names.group_name(group)
            ),
            show(before),
            show(now),
        ),
        ["policy", pid, "grace"] => (
            format!("compliance policy `{}`", names.policy_name(pid)),
            "scheduledActionsForRule (block gracePeriodHours)".into(),
            before.to_string(),
            now.to_string(),
        ),
        ["policy", pid, "notification"] => (
            format!("compliance policy `{}`", names.policy_name(pid)),
            "scheduledActionsForRule (notification with the plan's template)".into(),
            show(before),
            show(now),
        ),
        ["policy", pid, "claim"] => (
            format!("compliance policy `{}`", names.policy_name(pid)),
            "description (ownership line)".into(),
            show(before),
            show(now),
        ),
        ["ca", "includeUsers", _] => (
            ca,
            "conditions.users.includeUsers (All)".into(),
            show(before),
            show(now),
        ),
        ["ca", "includeGroups", group] => (
            ca,
            format!(
                "conditions.users.includeGroups (`{}`)",
                names.group_name(group)
            ),
            show(before),
            show(now),
        ),
        ["ca", "state"] => (ca, "state".into(), show(before), show(now)),
        ["ca", "claim"] => (
            ca,
            "description (ownership line)".into(),
            show(before),
            show(now),
        ),
        ["ca", "relied", member] => {
            let field = match *member {
                "users" => "conditions.users",
                "platforms" => "conditions.platforms",
                other => other,
            };
            (ca, field.to_string(), show(before), show(now))
        }
        _ => (
            "the enforced copy".into(),
            key.to_string(),
            show(before),
            show(now),
        ),
    };
    DriftChange {
        object,
        field,
        expected,
        found,
    }
}

/// One change to make in the tenant.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Replace the policy's assignment set (`POST .../assign`, beta): every target it had, with
    /// phasegate's members set.
    Assign {
        policy: String,
        assignments: Vec<Value>,
    },
    /// Replace the policy's actions (`POST .../scheduleActionsForRules`, beta): every action it
    /// had, with the block grace and phasegate's notification set.
    Actions { policy: String, actions: Vec<Value> },
    /// `PATCH` the policy's description (its ownership line).
    Describe {
        policy: String,
        odata_type: String,
        description: Value,
    },
    /// `PATCH` the plan's Conditional Access policy with only the members that change.
    PatchConditionalAccess(Value),
    /// `POST` the enforced copy.
    CreateEnforced(Value),
    /// `PATCH` the enforced copy.
    PatchEnforced(Value),
    /// `DELETE` the enforced copy.
    DeleteEnforced,
}

impl Write {
    pub fn name(&self) -> &'static str {
        match self {
            Write::Assign { .. } => "assign",
            Write::Actions { .. } => "scheduleActionsForRules",
            Write::Describe { .. } => "describe policy",
            Write::PatchConditionalAccess(_) => "patch conditional access",
            Write::CreateEnforced(_) => "create enforced copy",
            Write::PatchEnforced(_) => "patch enforced copy",
            Write::DeleteEnforced => "delete enforced copy",
        }
    }

    /// Writes to Intune compliance policies (the ones Multi Admin Approval can hold).
    pub fn is_intune(&self) -> bool {
        matches!(
            self,
            Write::Assign { .. } | Write::Actions { .. } | Write::Describe { .. }
        )
    }
}

fn differs(current: &Members, wanted: &Members, key: &str) -> bool {
    current.get(key) != wanted.get(key)
}

/// The writes that turn `current` into `wanted`, least blocking first: turning enforcement off,
/// then raising grace, then assignments, then lowering grace and notifying, then the report-only
/// policy, then turning enforcement on, and letting go of claims last.
pub fn plan_writes(
    view: &TenantView,
    current: &Members,
    wanted: &Members,
    names: &Names,
) -> Result<Vec<Write>, String> {
    let mut unblock = Vec::new();
    let mut raise = Vec::new();
    let mut assign = Vec::new();
    let mut lower = Vec::new();
    let mut report = Vec::new();
    let mut enforce = Vec::new();
    let mut release = Vec::new();
    let mut claim = Vec::new();
    for policy in &names.policies {
        let Some(p) = view.policies.get(&policy.id) else {
            continue;
        };
        let base = format!("policy/{}/", policy.id);
        let target_keys: Vec<&String> = wanted
            .keys()
            .filter(|k| {
                k.starts_with(&base) && (k.contains("/include/") || k.contains("/exclude/"))
            })
            .filter(|k| differs(current, wanted, k))
            .collect();
        if !target_keys.is_empty() {
            assign.push(Write::Assign {
                policy: policy.id.clone(),
                assignments: assignments_with(p, &target_keys, wanted, &policy.name)?,
            });
        }
        let grace_key = format!("{base}grace");
        let note_key = format!("{base}notification");
        if differs(current, wanted, &grace_key) || differs(current, wanted, &note_key) {
            let grace = hours(wanted, &grace_key);
            let notify = flag(wanted, &note_key);
            let actions = actions_with(p, grace, notify, names.template_id.as_deref())?;
            let write = Write::Actions {
                policy: policy.id.clone(),
                actions,
            };
            let adds_notification = notify && !flag(current, &note_key);
            if grace >= hours(current, &grace_key) && !adds_notification {
                raise.push(write);
            } else {
                lower.push(write);
            }
        }
        let claim_key = format!("{base}claim");
        if differs(current, wanted, &claim_key) {
            let marker = wanted.get(&claim_key).and_then(Value::as_str);
            let write = Write::Describe {
                policy: policy.id.clone(),
                odata_type: p.odata_type.clone(),
                description: with_claim(p.description.as_deref(), marker),
            };
            if marker.is_some() {
                claim.push(write);
            } else {
                release.push(write);
            }
        }
    }
    if let Some(ca) = &view.conditional_access {
        let mut body = Map::new();
        let users = &ca["conditions"]["users"];
        let ca_keys: Vec<&String> = wanted
            .keys()
            .filter(|k| k.starts_with("ca/") && !k.starts_with("ca/relied/"))
            .filter(|k| differs(current, wanted, k))
            .collect();
        let touches = |prefix: &str| ca_keys.iter().any(|k| k.starts_with(prefix));
        let mut user_patch = Map::new();
        if touches("ca/includeUsers/") {
            let mut list: Vec<String> = str_list(&users["includeUsers"])
                .into_iter()
                .filter(|u| u != "All" && u != "None")
                .collect();
            if flag(wanted, "ca/includeUsers/All") {
                list.insert(0, "All".into());
            }
            user_patch.insert("includeUsers".into(), json!(list));
        }
        if touches("ca/includeGroups/") {
            let mut list: Vec<String> = str_list(&users["includeGroups"]);
            for key in ca_keys
                .iter()
                .filter(|k| k.starts_with("ca/includeGroups/"))
            {
                let id = key.trim_start_matches("ca/includeGroups/").to_string();
                list.retain(|g| *g != id);
                if flag(wanted, key) {
                    list.push(id);
                }
            }
            user_patch.insert("includeGroups".into(), json!(list));
        }
        if !user_patch.is_empty() {
            // "None" is the service's way to include nobody; it cannot stand beside anything.
            let include_users = user_patch
                .get("includeUsers")
                .map_or_else(|| str_list(&users["includeUsers"]), str_list);
            let include_groups = user_patch
                .get("includeGroups")
                .map_or_else(|| str_list(&users["includeGroups"]), str_list);
            let nobody = include_users.iter().all(|u| u == "None")
                && include_groups.is_empty()
                && str_list(&users["includeRoles"]).is_empty();
            if nobody {
                user_patch.insert("includeUsers".into(), json!(["None"]));
            } else if include_users.iter().any(|u| u == "None") {
                let rest: Vec<String> = include_users.into_iter().filter(|u| u != "None").collect();
                user_patch.insert("includeUsers".into(), json!(rest));
            }
            body.insert(
                "conditions".into(),
                json!({"users": Value::Object(user_patch)}),
            );
        }
        if touches("ca/state") {
            body.insert("state".into(), wanted["ca/state"].clone());
        }
        if touches("ca/claim") {
            body.insert(
                "description".into(),
                with_claim(ca["description"].as_str(), wanted["ca/claim"].as_str()),
            );
        }
        if !body.is_empty() {
            let releasing = touches("ca/claim") && wanted["ca/claim"].is_null() && body.len() == 1;
            let write = Write::PatchConditionalAccess(Value::Object(body));
            if releasing {
                release.push(write);
            } else {
                report.push(write);
            }
        }
    }
    if differs(current, wanted, "enforced") {
        let now = current.get("enforced").cloned().unwrap_or(Value::Null);
        let next = wanted.get("enforced").cloned().unwrap_or(Value::Null);
        let enabled = |v: &Value| v["state"] == "enabled";
        match (now.is_null(), next.is_null()) {
            (true, false) => enforce.push(Write::CreateEnforced(next)),
            (false, true) => unblock.push(Write::DeleteEnforced),
            (false, false) => {
                let mut patch = Map::new();
                for field in [
                    "displayName",
                    "state",
                    "conditions",
                    "grantControls",
                    "sessionControls",
                ] {
                    if now.get(field) != next.get(field) {
                        patch.insert(
                            field.into(),
                            next.get(field).cloned().unwrap_or(Value::Null),
                        );
                    }
                }
                clear_emptied_users(&now, &mut patch);
                let write = Write::PatchEnforced(Value::Object(patch));
                if enabled(&now) && !enabled(&next) {
                    unblock.push(write);
                } else {
                    enforce.push(write);
                }
            }
            (true, true) => {}
        }
    }
    Ok([
        unblock, claim, raise, assign, lower, report, enforce, release,
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The policy's assignments with phasegate's members set as wanted and everything else carried
/// through as it was read. Refuses what cannot be written back unchanged.
fn assignments_with(
    policy: &PolicyView,
    keys: &[&String],
    wanted: &Members,
    name: &str,
) -> Result<Vec<Value>, String> {
    let member_of = |key: &str| -> Option<(bool, String)> {
        let rest = key.splitn(4, '/').collect::<Vec<_>>();
        Some((rest.get(2)? == &"exclude", rest.get(3)?.to_string()))
    };
    let changing: Vec<(bool, String)> = keys.iter().filter_map(|k| member_of(k)).collect();
    let mut out = Vec::new();
    for assignment in &policy.assignments {
        if let Some(source) = assignment["source"].as_str()
            && source != "direct"
        {
            return Err(format!(
                "compliance policy `{name}` has an assignment from {source} (`{}`); assign would turn it into a direct assignment, so phasegate will not write this policy's assignments",
                assignment["sourceId"].as_str().unwrap_or("?")
            ));
        }
        let target = &assignment["target"];
        if let Some(member) = target_member(target)
            && changing.contains(&member)
        {
            continue; // replaced below as wanted
        }
        out.push(target.clone());
    }
    for key in keys {
        if let Some(target) = wanted.get(*key).filter(|v| !v.is_null()) {
            out.push(target.clone());
        }
    }
    Ok(out)
}

/// The policy's actions with the block grace and phasegate's notification set, every other
/// action carried through as read.
fn actions_with(
    policy: &PolicyView,
    grace: i64,
    notify: bool,
    template: Option<&str>,
) -> Result<Vec<Value>, String> {
    let template = template.map(str::to_lowercase);
    let mut out: Vec<Value> = Vec::new();
    let mut has_ours = false;
    let mut removed = false;
    for action in &policy.actions {
        let mut action = action.clone();
        if let Some(map) = action.as_object_mut() {
            map.remove("id");
            map.retain(|k, _| !k.starts_with("@odata."));
        }
        if is_action(&action, "block") {
            action["gracePeriodHours"] = json!(grace);
        }
        let ours = template
            .as_ref()
            .is_some_and(|t| is_action(&action, "notification") && template_of(&action) == *t);
        if ours {
            if !notify && !removed {
                removed = true;
                continue;
            }
            has_ours = true;
        }
        out.push(action);
    }
    if notify && !has_ours {
        let template =
            template.ok_or("a notify phase needs `notification_template` in [policy]")?;
        out.push(json!({
            "actionType": "notification",
            "gracePeriodHours": 0,
            "notificationTemplateId": template,
            "notificationMessageCCList": [],
        }));
    }
    if !out.iter().any(|a| is_action(a, "block")) {
        out.insert(
            0,
            json!({"actionType": "block", "gracePeriodHours": grace, "notificationTemplateId": "", "notificationMessageCCList": []}),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
