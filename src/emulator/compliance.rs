//! Compliance policies' assignment targets and actions for noncompliance, stored as the raw JSON
//! the client sent (every field the version's schema has), and served per version.
//!
//! Sources: graph-api.md §2.6, §2.7, §3 and §9; the v1.0 CSDL (`deviceAndAppManagementAssignmentTarget`
//! has no properties in v1.0; the filter fields are in beta's type mappings) and the beta
//! `deviceCompliancePolicyAssignment` (`source`, `sourceId`).

use serde_json::{Map, Value, json};

use crate::graph::{ALL_USERS_ID, NIL_GUID, is_guid};

/// The virtual "All devices" target id.
pub const ALL_DEVICES_ID: &str = "adadadad-808e-44e2-905a-0b7873a8a531";

const FILTER_ID: &str = "deviceAndAppManagementAssignmentFilterId";
const FILTER_TYPE: &str = "deviceAndAppManagementAssignmentFilterType";

/// The Graph version a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    Beta,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1.0",
            Version::Beta => "beta",
        }
    }
}

/// The assignment target types of the CSDL, with the property naming what they target.
const TARGET_TYPES: [(&str, Option<&str>); 5] = [
    ("groupAssignmentTarget", Some("groupId")),
    ("exclusionGroupAssignmentTarget", Some("groupId")),
    ("allLicensedUsersAssignmentTarget", None),
    ("allDevicesAssignmentTarget", None),
    (
        "configurationManagerCollectionAssignmentTarget",
        Some("collectionId"),
    ),
];

/// `#microsoft.graph.x` for `#microsoft.graph.x` or `microsoft.graph.x`; `None` if malformed.
pub fn odata_type(text: &str) -> Option<String> {
    let name = text
        .strip_prefix('#')
        .unwrap_or(text)
        .strip_prefix("microsoft.graph.")?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| format!("#microsoft.graph.{name}"))
}

/// The short type name of a stored target (`groupAssignmentTarget`, ...).
pub fn target_kind(target: &Value) -> &str {
    target["@odata.type"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("#microsoft.graph.")
}

/// The id of what a target names: its group or collection, or the virtual all-users/all-devices
/// id. Assignment ids are `{policyId}_{this}`.
pub fn target_ref(target: &Value) -> String {
    match target_kind(target) {
        "allLicensedUsersAssignmentTarget" => ALL_USERS_ID.to_string(),
        "allDevicesAssignmentTarget" => ALL_DEVICES_ID.to_string(),
        "configurationManagerCollectionAssignmentTarget" => {
            target["collectionId"].as_str().unwrap_or("").to_string()
        }
        _ => target["groupId"].as_str().unwrap_or("").to_string(),
    }
}

/// Validates one target of an `assign` body and returns what is stored: its type (normalized),
/// the id property its type has, and, through beta, the filter fields.
pub fn parse_target(
    raw: &Value,
    version: Version,
    group_exists: impl Fn(&str) -> bool,
) -> Result<Value, String> {
    let Some(object) = raw.as_object() else {
        return Err("Invalid OData type specified: an assignment needs a target".into());
    };
    let sent = object
        .get("@odata.type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let normalized = odata_type(sent);
    let Some((kind, id_property)) = normalized.as_deref().and_then(|t| {
        let name = t.trim_start_matches("#microsoft.graph.");
        TARGET_TYPES.iter().find(|(k, _)| *k == name).copied()
    }) else {
        return Err(format!("Invalid OData type specified: \"{sent}\""));
    };
    let mut stored = Map::new();
    stored.insert(
        "@odata.type".into(),
        json!(format!("#microsoft.graph.{kind}")),
    );
    if let Some(property) = id_property {
        let Some(id) = object.get(property).and_then(Value::as_str) else {
            return Err(format!(
                "The property '{property}' is required on '{kind}'."
            ));
        };
        if property == "groupId" && !group_exists(id) {
            return Err(format!("Group {id} not found"));
        }
        stored.insert(property.into(), json!(id));
    }
    let has_filter = object.contains_key(FILTER_ID) || object.contains_key(FILTER_TYPE);
    match version {
        Version::V1 if has_filter => {
            let property = if object.contains_key(FILTER_ID) {
                FILTER_ID
            } else {
                FILTER_TYPE
            };
            return Err(format!(
                "The property '{property}' does not exist on type 'microsoft.graph.{kind}'. Make sure to only use property names that are defined by the type."
            ));
        }
        Version::V1 => {}
        Version::Beta => {
            let filter_type = object.get(FILTER_TYPE).cloned().unwrap_or(Value::Null);
            let filter_id = object.get(FILTER_ID).cloned().unwrap_or(Value::Null);
            let filter_type = match filter_type.as_str() {
                None if filter_type.is_null() => "none",
                Some(t @ ("none" | "include" | "exclude")) => t,
                _ => {
                    return Err(format!(
                        "Requested value '{filter_type}' was not found for '{FILTER_TYPE}'."
                    ));
                }
            };
            match filter_id.as_str() {
                None if filter_id.is_null() => {}
                Some(id) if is_guid(id) => {}
                _ => return Err(format!("Invalid assignment filter id {filter_id}")),
            }
            if filter_type != "none" && filter_id.is_null() {
                return Err(format!(
                    "An assignment filter of type '{filter_type}' needs a filter id"
                ));
            }
            stored.insert(FILTER_ID.into(), filter_id);
            stored.insert(FILTER_TYPE.into(), json!(filter_type));
        }
    }
    Ok(Value::Object(stored))
}

/// One item of `.../assignments`, in the version's shape.
pub fn assignment_json(policy_id: &str, target: &Value, version: Version) -> Value {
    let id = format!("{policy_id}_{}", target_ref(target));
    let mut shown = Map::new();
    shown.insert("@odata.type".into(), target["@odata.type"].clone());
    if version == Version::Beta {
        shown.insert(
            FILTER_ID.into(),
            target.get(FILTER_ID).cloned().unwrap_or(Value::Null),
        );
        shown.insert(
            FILTER_TYPE.into(),
            target
                .get(FILTER_TYPE)
                .cloned()
                .unwrap_or_else(|| json!("none")),
        );
    }
    for property in ["groupId", "collectionId"] {
        if let Some(v) = target.get(property) {
            shown.insert(property.into(), v.clone());
        }
    }
    match version {
        Version::V1 => json!({"id": id, "target": shown}),
        Version::Beta => {
            json!({"id": id, "source": "direct", "sourceId": policy_id, "target": shown})
        }
    }
}

/// `deviceComplianceActionType` in v1.0; beta adds `remoteLock`.
const ACTION_TYPES: [&str; 7] = [
    "noAction",
    "notification",
    "block",
    "retire",
    "wipe",
    "removeResourceAccessProfiles",
    "pushNotification",
];

/// Validates one `scheduledActionConfigurations` item and returns what is stored.
pub fn parse_action(raw: &Value, version: Version) -> Result<Value, String> {
    let action_type = raw["actionType"].as_str().unwrap_or("");
    let known = ACTION_TYPES.contains(&action_type)
        || (version == Version::Beta && action_type == "remoteLock");
    if !known {
        return Err(format!("Requested value '{action_type}' was not found."));
    }
    let Some(hours) = raw["gracePeriodHours"].as_i64() else {
        return Err("Invalid action: gracePeriodHours must be an integer".into());
    };
    // 0 to 365 days (tenant-safety.md §2).
    if !(0..=8760).contains(&hours) {
        return Err(format!(
            "gracePeriodHours must be between 0 and 8760, not {hours}"
        ));
    }
    let template = match &raw["notificationTemplateId"] {
        Value::Null => NIL_GUID.to_string(),
        Value::String(t) if t.is_empty() => NIL_GUID.to_string(),
        Value::String(t) => t.clone(),
        other => return Err(format!("Invalid notificationTemplateId {other}")),
    };
    let cc = match &raw["notificationMessageCCList"] {
        Value::Null => Vec::new(),
        Value::Array(items) if items.iter().all(Value::is_string) => items.clone(),
        other => return Err(format!("Invalid notificationMessageCCList {other}")),
    };
    Ok(json!({
        "actionType": action_type,
        "gracePeriodHours": hours,
        "notificationTemplateId": template,
        "notificationMessageCCList": cc,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odata_types_with_or_without_hash() {
        assert_eq!(
            odata_type("microsoft.graph.groupAssignmentTarget").as_deref(),
            Some("#microsoft.graph.groupAssignmentTarget")
        );
        assert_eq!(
            odata_type("microsoft.graph.#microsoft.graph.exclusionGroupAssignmentTarget"),
            None
        );
    }

    #[test]
    fn targets_keep_what_the_version_has() {
        let exists = |_: &str| true;
        let filtered = json!({"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": "g", "deviceAndAppManagementAssignmentFilterId": "93d20a3f-d668-450f-b5e1-9a84b84e0c08", "deviceAndAppManagementAssignmentFilterType": "include", "extra": 1});
        assert!(parse_target(&filtered, Version::V1, exists).is_err());
        let stored = parse_target(&filtered, Version::Beta, exists).unwrap();
        assert_eq!(stored[FILTER_TYPE], "include");
        assert!(stored.get("extra").is_none());
        let v1 = assignment_json("p", &stored, Version::V1);
        assert_eq!(
            v1,
            json!({"id": "p_g", "target": {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": "g"}})
        );
        let beta = assignment_json("p", &stored, Version::Beta);
        assert_eq!(beta["source"], "direct");
        assert_eq!(beta["sourceId"], "p");
        assert_eq!(beta["target"][FILTER_TYPE], "include");
        let all = parse_target(
            &json!({"@odata.type": "microsoft.graph.allDevicesAssignmentTarget"}),
            Version::V1,
            exists,
        )
        .unwrap();
        assert_eq!(
            assignment_json("p", &all, Version::Beta)["target"][FILTER_TYPE],
            "none"
        );
        assert_eq!(target_ref(&all), ALL_DEVICES_ID);
        assert!(
            parse_target(
                &json!({"@odata.type": "#microsoft.graph.scopeTagGroupAssignmentTarget"}),
                Version::Beta,
                exists
            )
            .unwrap_err()
            .starts_with("Invalid OData type specified")
        );
    }

    #[test]
    fn actions_are_checked() {
        let ok =
            json!({"actionType": "block", "gracePeriodHours": 72, "notificationTemplateId": ""});
        assert_eq!(
            parse_action(&ok, Version::V1).unwrap()["notificationTemplateId"],
            NIL_GUID
        );
        let long = json!({"actionType": "block", "gracePeriodHours": 8761});
        assert!(parse_action(&long, Version::V1).is_err());
        let lock = json!({"actionType": "remoteLock", "gracePeriodHours": 0});
        assert!(parse_action(&lock, Version::V1).is_err());
        assert!(parse_action(&lock, Version::Beta).is_ok());
    }
}
