//! Conditional Access policies stored whole: their JSON, PATCH merging, the documented defaults
//! GET fills in, built-in authentication strengths, and which policies enforce compliance.
//!
//! Sources: microsoft-graph-docs-contrib `api-reference/v1.0/resources/conditionalaccesspolicy.md`,
//! `conditionalaccesspolicy-update.md` ("properties not included in the request body keep their
//! previous values"; arrays are replaced wholesale), `authenticationstrengthroot-list-policies.md`
//! (the built-in strengths), and tenant-safety.md §1.

use serde_json::{Map, Value, json};

use crate::domain::plan::Platform;

pub const STATES: [&str; 3] = ["enabled", "disabled", "enabledForReportingButNotEnforced"];

/// `conditionalAccessGrantControl`.
const GRANT_CONTROLS: [&str; 9] = [
    "block",
    "mfa",
    "compliantDevice",
    "domainJoinedDevice",
    "approvedApplication",
    "compliantApplication",
    "passwordChange",
    "unknownFutureValue",
    "riskRemediation",
];

/// The three built-in authentication strengths, as `GET /policies/authenticationStrengthPolicies`
/// documents them. (The list page's example spells the third "Phishing resistant MFA"; the admin
/// center and the CA documentation call it "Phishing-resistant MFA".)
pub fn built_in_strength(id: &str) -> Option<Value> {
    let (name, description, combinations): (&str, &str, &[&str]) = match id {
        "00000000-0000-0000-0000-000000000002" => (
            "Multifactor authentication",
            "Combinations of methods that satisfy strong authentication, such as a password + SMS",
            &[
                "windowsHelloForBusiness",
                "fido2",
                "x509CertificateMultiFactor",
                "deviceBasedPush",
                "temporaryAccessPassOneTime",
                "temporaryAccessPassMultiUse",
                "password,microsoftAuthenticatorPush",
                "password,softwareOath",
                "password,hardwareOath",
                "password,x509CertificateSingleFactor",
                "password,x509CertificateMultiFactor",
                "password,sms",
                "password,voice",
                "federatedMultiFactor",
                "microsoftAuthenticatorPush,federatedSingleFactor",
                "softwareOath,federatedSingleFactor",
                "hardwareOath,federatedSingleFactor",
                "sms,federatedSingleFactor",
                "voice,federatedSingleFactor",
            ],
        ),
        "00000000-0000-0000-0000-000000000003" => (
            "Passwordless MFA",
            "Passwordless methods that satisfy strong authentication, such as Passwordless sign-in with the Microsoft Authenticator",
            &[
                "windowsHelloForBusiness",
                "fido2",
                "x509CertificateMultiFactor",
                "deviceBasedPush",
            ],
        ),
        "00000000-0000-0000-0000-000000000004" => (
            "Phishing-resistant MFA",
            "Phishing-resistant, Passwordless methods for the strongest authentication, such as a FIDO2 security key",
            &[
                "windowsHelloForBusiness",
                "fido2",
                "x509CertificateMultiFactor",
            ],
        ),
        _ => return None,
    };
    Some(json!({
        "id": id,
        "createdDateTime": "2021-12-01T00:00:00Z",
        "modifiedDateTime": "2021-12-01T00:00:00Z",
        "displayName": name,
        "description": description,
        "policyType": "builtIn",
        "requirementsSatisfied": "mfa",
        "allowedCombinations": combinations,
    }))
}

/// PATCH semantics: a complex value sent is merged member by member, recursively; an array or a
/// scalar (or null) sent replaces the old value.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, value) in new {
                match old.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        old.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// Checks a policy as it would be stored; the message names what is wrong.
pub fn validate(policy: &Map<String, Value>) -> Result<(), String> {
    if policy
        .get("displayName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("displayName is required.".into());
    }
    let state = policy.get("state").cloned().unwrap_or(Value::Null);
    if !state.as_str().is_some_and(|s| STATES.contains(&s)) {
        let shown = state.as_str().map_or(state.to_string(), str::to_string);
        return Err(format!("Invalid value '{shown}' for property 'state'."));
    }
    let Some(users) = policy
        .get("conditions")
        .and_then(|c| c.get("users"))
        .and_then(Value::as_object)
    else {
        return Err("conditions.users is required.".into());
    };
    for key in [
        "includeUsers",
        "excludeUsers",
        "includeGroups",
        "excludeGroups",
        "includeRoles",
        "excludeRoles",
    ] {
        match users.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
            Some(_) => {
                return Err(format!(
                    "Invalid users condition: {key} must be a collection of strings."
                ));
            }
        }
    }
    if let Some(grant) = policy.get("grantControls").filter(|g| !g.is_null()) {
        if let Some(op) = grant.get("operator").filter(|o| !o.is_null())
            && !matches!(op.as_str(), Some("AND" | "OR"))
        {
            return Err(format!("Invalid value '{op}' for property 'operator'."));
        }
        for control in grant["builtInControls"].as_array().into_iter().flatten() {
            if !control
                .as_str()
                .is_some_and(|c| GRANT_CONTROLS.contains(&c))
            {
                return Err(format!(
                    "Requested value '{control}' was not found for 'builtInControls'."
                ));
            }
        }
        if let Some(strength) = grant.get("authenticationStrength").filter(|s| !s.is_null()) {
            let id = strength["id"].as_str().unwrap_or("");
            if built_in_strength(id).is_none() {
                return Err(format!(
                    "Authentication strength policy '{id}' was not found."
                ));
            }
        }
    }
    Ok(())
}

/// What is stored: clients send `authenticationStrength` as `{"id": ...}` (and may send back the
/// full object they read); only the reference is kept.
pub fn normalize(policy: &mut Map<String, Value>) {
    if let Some(strength) = policy
        .get_mut("grantControls")
        .and_then(|g| g.get_mut("authenticationStrength"))
        .filter(|s| s.is_object())
    {
        *strength = json!({"id": strength["id"].clone()});
    }
}

fn fill(object: &mut Value, empty_lists: &[&str], nulls: &[&str]) {
    if !object.is_object() {
        return;
    }
    for key in empty_lists {
        if object.get(*key).is_none_or(Value::is_null) {
            object[*key] = json!([]);
        }
    }
    for key in nulls {
        if object.get(*key).is_none() {
            object[*key] = Value::Null;
        }
    }
}

/// The policy as GET returns it: the stored JSON with the documented empty collections and nulls
/// filled in, and the authentication strength expanded.
pub fn to_json(id: &str, policy: &Map<String, Value>) -> Value {
    let field = |key: &str| policy.get(key).cloned().unwrap_or(Value::Null);
    let mut conditions = field("conditions");
    if !conditions.is_object() {
        conditions = json!({});
    }
    fill(
        &mut conditions,
        &["userRiskLevels", "signInRiskLevels", "clientAppTypes"],
        &["platforms", "locations", "devices", "clientApplications"],
    );
    fill(
        &mut conditions["users"],
        &[
            "includeUsers",
            "excludeUsers",
            "includeGroups",
            "excludeGroups",
            "includeRoles",
            "excludeRoles",
        ],
        &[
            "includeGuestsOrExternalUsers",
            "excludeGuestsOrExternalUsers",
        ],
    );
    if conditions.get("applications").is_some_and(Value::is_object) {
        fill(
            &mut conditions["applications"],
            &[
                "includeApplications",
                "excludeApplications",
                "includeUserActions",
                "includeAuthenticationContextClassReferences",
            ],
            &["applicationFilter"],
        );
    }
    fill(
        &mut conditions["platforms"],
        &["includePlatforms", "excludePlatforms"],
        &[],
    );
    fill(
        &mut conditions["locations"],
        &["includeLocations", "excludeLocations"],
        &[],
    );
    let mut grant = field("grantControls");
    fill(
        &mut grant,
        &[
            "builtInControls",
            "customAuthenticationFactors",
            "termsOfUse",
        ],
        &["authenticationStrength"],
    );
    if let Some(strength) = grant
        .get("authenticationStrength")
        .and_then(|s| s["id"].as_str())
        .and_then(built_in_strength)
    {
        grant["authenticationStrength"] = strength;
    }
    json!({
        "id": id,
        "templateId": field("templateId"),
        "displayName": field("displayName"),
        "description": field("description"),
        "createdDateTime": field("createdDateTime"),
        "modifiedDateTime": field("modifiedDateTime"),
        "state": field("state"),
        "sessionControls": field("sessionControls"),
        "conditions": conditions,
        "grantControls": grant,
    })
}

/// The users condition as GET returns it.
pub fn users_json(policy: &Map<String, Value>) -> Value {
    to_json("", policy)["conditions"]["users"].clone()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// True when the policy requires a compliant device of everyone it covers: enabled, and
/// `compliantDevice` mandatory — the operator is AND, or it is the only control. With OR and
/// another control (MFA, an authentication strength, terms of use) users satisfy the other one
/// (tenant-safety.md §1).
pub fn enforces_compliance(policy: &Map<String, Value>) -> bool {
    let grant = policy.get("grantControls").cloned().unwrap_or(Value::Null);
    let built_in = strings(&grant["builtInControls"]);
    if policy.get("state").and_then(Value::as_str) != Some("enabled")
        || !built_in.contains(&"compliantDevice")
    {
        return false;
    }
    let controls = built_in.len()
        + usize::from(!grant["authenticationStrength"].is_null())
        + strings(&grant["termsOfUse"]).len()
        + strings(&grant["customAuthenticationFactors"]).len();
    grant["operator"].as_str() == Some("AND") || controls == 1
}

/// The Conditional Access name of a platform (`conditionalAccessDevicePlatform`).
pub fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Windows => "windows",
        Platform::Ios => "iOS",
        Platform::Android => "android",
        Platform::Macos => "macOS",
    }
}

/// Whether the policy's platform condition covers each platform (in `Platform::ALL` order): no
/// condition covers all; otherwise `includePlatforms` has `all` or the platform, and
/// `excludePlatforms` has not.
pub fn platforms_covered(policy: &Map<String, Value>) -> [bool; 4] {
    let platforms = policy
        .get("conditions")
        .map(|c| c["platforms"].clone())
        .unwrap_or(Value::Null);
    if platforms.is_null() {
        return [true; 4];
    }
    let include = strings(&platforms["includePlatforms"]);
    let exclude = strings(&platforms["excludePlatforms"]);
    Platform::ALL.map(|p| {
        let name = platform_name(p);
        let has = |list: &[&str], n: &str| list.iter().any(|x| x.eq_ignore_ascii_case(n));
        (has(&include, "all") || has(&include, name)) && !has(&exclude, name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_merges_objects_and_replaces_arrays() {
        let mut policy = json!({"state": "enabled", "conditions": {"users": {"includeUsers": ["All"], "excludeUsers": ["bg"]}, "clientAppTypes": ["all"]}});
        merge(
            &mut policy,
            &json!({"conditions": {"users": {"includeGroups": ["g"]}}}),
        );
        assert_eq!(policy["conditions"]["users"]["excludeUsers"], json!(["bg"]));
        assert_eq!(policy["conditions"]["users"]["includeGroups"], json!(["g"]));
        assert_eq!(policy["conditions"]["clientAppTypes"], json!(["all"]));
        merge(
            &mut policy,
            &json!({"conditions": {"users": {"excludeUsers": []}}, "state": "disabled"}),
        );
        assert_eq!(policy["conditions"]["users"]["excludeUsers"], json!([]));
        assert_eq!(policy["state"], "disabled");
    }

    #[test]
    fn only_mandatory_compliance_enforces() {
        let policy = |state: &str, grant: Value| {
            json!({"state": state, "grantControls": grant})
                .as_object()
                .cloned()
                .unwrap()
        };
        let only = json!({"operator": "OR", "builtInControls": ["compliantDevice"]});
        let or_mfa = json!({"operator": "OR", "builtInControls": ["mfa", "compliantDevice"]});
        let and_mfa = json!({"operator": "AND", "builtInControls": ["mfa", "compliantDevice"]});
        let or_strength = json!({"operator": "OR", "builtInControls": ["compliantDevice"], "authenticationStrength": {"id": "00000000-0000-0000-0000-000000000002"}});
        assert!(enforces_compliance(&policy("enabled", only.clone())));
        assert!(!enforces_compliance(&policy(
            "enabledForReportingButNotEnforced",
            only
        )));
        assert!(!enforces_compliance(&policy("enabled", or_mfa)));
        assert!(enforces_compliance(&policy("enabled", and_mfa)));
        assert!(!enforces_compliance(&policy("enabled", or_strength)));
    }

    #[test]
    fn platform_conditions_include_and_exclude() {
        let policy = |platforms: Value| {
            json!({"conditions": {"platforms": platforms}})
                .as_object()
                .cloned()
                .unwrap()
        };
        assert_eq!(platforms_covered(&policy(Value::Null)), [true; 4]);
        assert_eq!(
            platforms_covered(&policy(
                json!({"includePlatforms": ["all"], "excludePlatforms": ["iOS"]})
            )),
            [true, false, true, true]
        );
        assert_eq!(
            platforms_covered(&policy(json!({"includePlatforms": ["windows", "macOS"]}))),
            [true, false, false, true]
        );
    }
}
