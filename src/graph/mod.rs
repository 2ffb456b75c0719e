//! Microsoft Graph wire formats shared by the Graph provider (client) and the emulator (server).
//!
//! Only the subset phasegate touches is modelled, exactly as the service sends it (see
//! `docs/graph.md`): enums are camelCase strings, single entities are not wrapped in `value`,
//! dates have seven fractional digits (or none), and unknown fields are ignored when reading.

use serde::{Deserialize, Serialize};

use crate::domain::time::Timestamp;

/// The virtual "All users" assignment target id Intune reports for `allLicensedUsersAssignmentTarget`.
pub const ALL_USERS_ID: &str = "acacacac-9df4-4c7d-9d50-4ef0226f57a9";
/// The nil GUID Intune puts in a block action's `notificationTemplateId`.
pub const NIL_GUID: &str = "00000000-0000-0000-0000-000000000000";
/// Where plans say "everyone": the virtual All users target (CA: `includeUsers: ["All"]`).
pub const ALL_USERS_NAME: &str = "All Users";

/// Who a compliance policy is assigned to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "@odata.type")]
pub enum AssignmentTarget {
    #[serde(rename = "#microsoft.graph.groupAssignmentTarget")]
    Group {
        #[serde(rename = "groupId")]
        group_id: String,
    },
    #[serde(rename = "#microsoft.graph.exclusionGroupAssignmentTarget")]
    Exclusion {
        #[serde(rename = "groupId")]
        group_id: String,
    },
    #[serde(rename = "#microsoft.graph.allLicensedUsersAssignmentTarget")]
    AllUsers,
    #[serde(rename = "#microsoft.graph.allDevicesAssignmentTarget")]
    AllDevices,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub target: AssignmentTarget,
}

/// One action for noncompliance (`deviceComplianceActionItem`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionItem {
    pub action_type: String,
    pub grace_period_hours: i64,
    #[serde(default)]
    pub notification_template_id: Option<String>,
    #[serde(default)]
    pub notification_message_c_c_list: Option<Vec<String>>,
}

impl ActionItem {
    pub fn block(grace_period_hours: i64) -> ActionItem {
        ActionItem {
            action_type: "block".into(),
            grace_period_hours,
            notification_template_id: Some(String::new()),
            notification_message_c_c_list: Some(vec![]),
        }
    }

    pub fn notification(template_id: &str) -> ActionItem {
        ActionItem {
            action_type: "notification".into(),
            grace_period_hours: 0,
            notification_template_id: Some(template_id.to_string()),
            notification_message_c_c_list: Some(vec![]),
        }
    }

    /// The parts that matter when comparing what is configured with what is wanted: the service
    /// returns the nil GUID where clients send `""` for "no template".
    pub fn essence(&self) -> (String, i64, String) {
        let template = match self.notification_template_id.as_deref() {
            None | Some("") | Some(NIL_GUID) => String::new(),
            Some(id) => id.to_lowercase(),
        };
        (self.action_type.clone(), self.grace_period_hours, template)
    }
}

/// `conditionalAccessUsers`, the scope of a Conditional Access policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaUsers {
    #[serde(default)]
    pub include_users: Vec<String>,
    #[serde(default)]
    pub exclude_users: Vec<String>,
    #[serde(default)]
    pub include_groups: Vec<String>,
    #[serde(default)]
    pub exclude_groups: Vec<String>,
    #[serde(default)]
    pub include_roles: Vec<String>,
    #[serde(default)]
    pub exclude_roles: Vec<String>,
}

/// Formats a time as Intune does: UTC with seven fractional digits.
pub fn format_time(at: Timestamp) -> String {
    let seconds = at.rfc3339();
    let fraction = at.as_millis().rem_euclid(1000) * 10_000;
    format!("{}.{fraction:07}Z", seconds.trim_end_matches('Z'))
}

/// The "never" sentinel Intune uses for unset dates.
pub const UNSET_TIME: &str = "0001-01-01T00:00:00Z";

/// `innerError.date`: no fractional digits and no zone suffix.
pub fn format_inner_date(at: Timestamp) -> String {
    at.rfc3339().trim_end_matches('Z').to_string()
}

/// Parses a Graph date; the `0001-01-01` sentinel and unparseable values are `None`.
pub fn parse_time(text: &str) -> Option<Timestamp> {
    if text.starts_with("0001-01-01") {
        return None;
    }
    Timestamp::parse_rfc3339(text)
}

/// Percent-encodes a query value as Graph expects it (spaces as `%20`; OData's `$`, `(`, `)`,
/// `,` and `'` kept readable).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => out.push(b as char),
            b'-' | b'_' | b'.' | b'~' | b'$' | b'(' | b')' | b',' | b'\'' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Quotes a value for an OData `$filter` string literal.
pub fn odata_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// True for `00000000-0000-0000-0000-000000000000`-shaped strings.
pub fn is_guid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(len, part)| part.len() == *len && part.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_have_seven_fractional_digits() {
        let at = Timestamp::parse_rfc3339("2026-01-08T08:35:03.794Z").unwrap();
        assert_eq!(format_time(at), "2026-01-08T08:35:03.7940000Z");
        assert_eq!(parse_time(&format_time(at)), Some(at));
        assert_eq!(parse_time(UNSET_TIME), None);
        assert_eq!(format_inner_date(at), "2026-01-08T08:35:03");
    }

    #[test]
    fn targets_use_odata_types() {
        let target = AssignmentTarget::Group {
            group_id: "g1".into(),
        };
        let json = serde_json::to_value(&target).unwrap();
        assert_eq!(
            json["@odata.type"],
            "#microsoft.graph.groupAssignmentTarget"
        );
        assert_eq!(json["groupId"], "g1");
        let all: AssignmentTarget = serde_json::from_value(
            serde_json::json!({"@odata.type": "#microsoft.graph.allLicensedUsersAssignmentTarget"}),
        )
        .unwrap();
        assert_eq!(all, AssignmentTarget::AllUsers);
    }

    #[test]
    fn template_ids_compare_by_meaning() {
        let sent = ActionItem::block(0);
        let read = ActionItem {
            notification_template_id: Some(NIL_GUID.into()),
            ..ActionItem::block(0)
        };
        assert_eq!(sent.essence(), read.essence());
    }

    #[test]
    fn guids_and_quotes() {
        assert!(is_guid("93d20a3f-d668-450f-b5e1-9a84b84e0c08"));
        assert!(!is_guid("Pilot IT"));
        assert_eq!(odata_quote("O'Brien"), "'O''Brien'");
    }
}
