//! The `deviceStatuses` fallback (`observe_through = "device_statuses"`): a policy's
//! `GET /deviceManagement/deviceCompliancePolicies/{id}/deviceStatuses` pages read as typed rows
//! ("List deviceComplianceDeviceStatuses",
//! learn.microsoft.com/graph/api/intune-deviceconfig-devicecompliancedevicestatus-list).
//!
//! A large policy is a hundred pages of a thousand rows. Each page's JSON is parsed straight
//! into the five fields the observation reads (`id`, `status`, `userPrincipalName`,
//! `lastReportedDateTime`, `complianceGracePeriodExpirationDateTime`), their text borrowed from
//! the page where it has no escapes, every other field skipped unread, and each row becomes a
//! compact [`Status`] at once: no `serde_json::Value` tree, and no string per row (a user is a
//! number in [`Users`], one allocation per user).
//!
//! A page that is not the documented shape (not a JSON object, `value` not an array of objects,
//! a field read that is neither a string nor `null`) is an error saying where the text went
//! wrong; nothing of the listing is used. Fields the service adds are ignored, and `null` is
//! "not given" for every field read.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::devices;
use super::export::parse_contact;
use crate::domain::gate::DeviceState;
use crate::domain::time::Timestamp;

/// The user principal name, lowercased, of the rows of device-context check-ins ("System
/// account" in Microsoft's captured `deviceStatuses` responses).
pub const SYSTEM_ACCOUNT: &str = "system account";

/// The most distinct users one observation's statuses may name (ten times a very large
/// tenant's users): beyond, the listing is refused rather than grown without bound.
pub const MAX_USERS: usize = 10_000_000;

/// One device status as the gate needs it: a user–device pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The device, from the row's id where it has the observed `{deviceId}_{policyId}_{userId}`
    /// shape; `None` otherwise (then each row counts as a device of its own).
    pub device: Option<devices::Key>,
    /// The row names the system account: a device-context check-in, no user signed in.
    pub system: bool,
    /// The row's user (its user principal name, lowercased) in the observation's [`Users`].
    pub user: u32,
    pub state: Option<DeviceState>,
    pub last_reported: Option<Timestamp>,
    pub grace_until: Option<Timestamp>,
}

/// The users the statuses name, each once, by their user principal name lowercased (empty for
/// a row without one); a [`Status`] holds its user's number.
#[derive(Debug, Default)]
pub struct Users {
    /// By the [`devices::text_key`] of the name: a row's lookup hashes 16 bytes, not its name,
    /// and the table grows without hashing names again.
    numbers: devices::KeyMap<u32>,
    names: Vec<Box<str>>,
    keys: Vec<devices::Key>,
}

/// The key a user principal name is known by, in any case: the [`devices::text_key`] of its
/// lowercase form (group members are looked up by it).
pub fn user_key(upn: &str) -> devices::Key {
    devices::text_key(&upn.to_lowercase())
}

impl Users {
    /// The number of `upn` (any case), added when new.
    fn number(&mut self, upn: &str, lowered: &mut String) -> Result<u32, String> {
        let name = if upn.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
            lowered.clear();
            if upn.is_ascii() {
                lowered.push_str(upn);
                lowered.make_ascii_lowercase();
            } else {
                lowered.push_str(&upn.to_lowercase());
            }
            lowered.as_str()
        } else {
            upn
        };
        let key = devices::text_key(name);
        if let Some(&n) = self.numbers.get(&key) {
            return Ok(n);
        }
        if self.names.len() >= MAX_USERS {
            return Err(format!(
                "more than {MAX_USERS} users in the device statuses"
            ));
        }
        let n = self.names.len() as u32;
        self.numbers.insert(key, n);
        self.names.push(name.into());
        self.keys.push(key);
        Ok(n)
    }

    /// The user principal name (lowercased) of user `n`.
    pub fn name(&self, n: u32) -> &str {
        self.names.get(n as usize).map_or("", |name| name)
    }

    /// The [`user_key`] of user `n`.
    pub fn key(&self, n: u32) -> devices::Key {
        self.keys
            .get(n as usize)
            .copied()
            .unwrap_or_else(|| devices::text_key(""))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A policy's statuses as the pages of one listing arrive: [`Reader::page`] reads a page's
/// body into them and answers its next link.
#[derive(Debug, Default)]
pub struct Reader {
    pub statuses: Vec<Status>,
    lowered: String,
}

impl Reader {
    /// Reads one page's body: its rows appended to `self.statuses` (their users numbered in
    /// `users`); its `@odata.nextLink`, if any.
    pub fn page(&mut self, body: &str, users: &mut Users) -> Result<Option<String>, String> {
        let mut page = PageSeed {
            rows: RowsSeed {
                statuses: &mut self.statuses,
                users,
                lowered: &mut self.lowered,
            },
        };
        let mut parser = serde_json::Deserializer::from_str(body);
        let next = (&mut page)
            .deserialize(&mut parser)
            .and_then(|next| parser.end().map(|()| next))
            .map_err(|e| format!("unreadable device statuses page: {e}"))?;
        Ok(next)
    }
}

/// A string field, borrowed from the page when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// The page object: `value` read row by row through [`RowsSeed`], `@odata.nextLink` kept, any
/// other member skipped.
struct PageSeed<'r> {
    rows: RowsSeed<'r>,
}

impl<'de> DeserializeSeed<'de> for &mut PageSeed<'_> {
    type Value = Option<String>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut PageSeed<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a page of device statuses (an object with `value`)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut next = None;
        let mut value = false;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.as_str() {
                "value" if value => return Err(de::Error::duplicate_field("value")),
                "value" => {
                    value = true;
                    map.next_value_seed(&mut self.rows)?;
                }
                "@odata.nextLink" => {
                    next = map
                        .next_value::<Option<Text<'de>>>()?
                        .map(|t| t.0.into_owned());
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(next)
    }
}

/// `value`: an array of rows, each turned into a [`Status`] as it is read (`null`: no rows).
struct RowsSeed<'r> {
    statuses: &'r mut Vec<Status>,
    users: &'r mut Users,
    lowered: &'r mut String,
}

impl<'de> DeserializeSeed<'de> for &mut RowsSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for &mut RowsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of device statuses")
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<Row<'de>>()? {
            let status = row
                .status(self.users, self.lowered)
                .map_err(de::Error::custom)?;
            self.statuses.push(status);
        }
        Ok(())
    }
}

/// The fields of a row the observation reads; `None`: absent or `null`.
#[derive(Default)]
struct Row<'a> {
    id: Option<Text<'a>>,
    status: Option<Text<'a>>,
    user_principal_name: Option<Text<'a>>,
    last_reported: Option<Text<'a>>,
    grace_end: Option<Text<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Row<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = Row<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a device status object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row<'de>, A::Error> {
                let mut row = Row::default();
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    let (slot, name) = match key.as_str() {
                        "id" => (&mut row.id, "id"),
                        "status" => (&mut row.status, "status"),
                        "userPrincipalName" => (&mut row.user_principal_name, "userPrincipalName"),
                        "lastReportedDateTime" => (&mut row.last_reported, "lastReportedDateTime"),
                        "complianceGracePeriodExpirationDateTime" => (
                            &mut row.grace_end,
                            "complianceGracePeriodExpirationDateTime",
                        ),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(de::Error::duplicate_field(name));
                    }
                    *slot = map.next_value()?;
                }
                Ok(row)
            }
        }
        deserializer.deserialize_map(RowVisitor)
    }
}

impl Row<'_> {
    fn status(&self, users: &mut Users, lowered: &mut String) -> Result<Status, String> {
        let state = match self.status.as_ref().map_or("unknown", Text::as_str) {
            "compliant" | "remediated" => Some(DeviceState::Compliant),
            "nonCompliant" => Some(DeviceState::Noncompliant),
            "error" => Some(DeviceState::Error),
            "conflict" => Some(DeviceState::Conflict),
            "notApplicable" | "notAssigned" => None,
            _ => Some(DeviceState::Unknown),
        };
        let upn = self.user_principal_name.as_ref().map_or("", Text::as_str);
        let user = users.number(upn, lowered)?;
        let date = |t: &Option<Text>| t.as_ref().and_then(|t| parse_contact(t.as_str()));
        Ok(Status {
            device: self.id.as_ref().and_then(|id| device_of(id.as_str())),
            system: users.name(user) == SYSTEM_ACCOUNT,
            user,
            state,
            last_reported: date(&self.last_reported),
            grace_until: date(&self.grace_end),
        })
    }
}

/// The device key of a `deviceStatuses` row id of the shape `{deviceId}_{policyId}_{userId}`
/// (three GUIDs), as Microsoft's responses have been captured with; Microsoft documents the id
/// only as the entity's key, so any other shape is no device.
pub fn device_of(id: &str) -> Option<devices::Key> {
    // The device part is a canonical GUID, 36 bytes, then exactly two more parts.
    let b = id.as_bytes();
    if b.get(36) != Some(&b'_') || b[37..].iter().filter(|&&c| c == b'_').count() != 1 {
        return None;
    }
    devices::canonical_guid(&b[..36])
}

/// The devices of a policy's statuses that only the system account reports (no user places
/// them in a phase), each by its first row; a device a user also reports from is not one.
pub fn system_only(rows: &[Status]) -> Vec<&Status> {
    if !rows.iter().any(|s| s.system) {
        return Vec::new();
    }
    let mut with_user = devices::KeySet::with_capacity_and_hasher(rows.len(), Default::default());
    with_user.extend(rows.iter().filter(|s| !s.system).filter_map(|s| s.device));
    let mut seen = devices::KeySet::default();
    rows.iter()
        .filter(|s| s.system && s.state.is_some())
        .filter(|s| {
            s.device
                .is_none_or(|d| !with_user.contains(&d) && seen.insert(d))
        })
        .collect()
}

/// A policy's device statuses placed in one phase: by the phase's device groups (`by_device`:
/// `Some(true)` placed, `Some(false)` kept out, the system account's rows too) or else by a
/// user in scope; each device once (its first row placed, where rows name their device).
pub fn in_scope(
    rows: &[Status],
    user_in_scope: impl Fn(&Status) -> bool,
    by_device: impl Fn(&Status) -> devices::DevicePlacement,
) -> Vec<&Status> {
    let mut seen = devices::KeySet::with_capacity_and_hasher(rows.len(), Default::default());
    rows.iter()
        .filter(|s| by_device(s).unwrap_or_else(|| !s.system && user_in_scope(s)))
        .filter(|s| s.device.is_none_or(|d| seen.insert(d)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0385114b-b48f-4800-a046-f249eaba24b1";

    fn d(n: u8) -> String {
        format!("00000000-0000-4000-a000-0000000000{n:02}")
    }

    fn u(n: u8) -> String {
        format!("10000000-0000-4000-a000-0000000000{n:02}")
    }

    fn row(device: &str, user: &str, upn: &str) -> serde_json::Value {
        serde_json::json!({
            "id": format!("{device}_{P}_{user}"),
            "status": "nonCompliant",
            "userPrincipalName": upn,
            "lastReportedDateTime": "2026-11-30T10:00:00Z",
        })
    }

    /// The statuses of one page of `rows`, and its next link.
    fn read(body: &str) -> Result<(Vec<Status>, Users, Option<String>), String> {
        let (mut reader, mut users) = (Reader::default(), Users::default());
        let next = reader.page(body, &mut users)?;
        Ok((reader.statuses, users, next))
    }

    fn page(rows: Vec<serde_json::Value>) -> String {
        serde_json::json!({"@odata.context": "x", "value": rows}).to_string()
    }

    #[test]
    fn a_shared_device_counts_once_and_a_system_account_one_as_userless() {
        let body = page(vec![
            // A shared device: Alice's and Bob's rows.
            row(&d(1), &u(1), "alice@contoso.com"),
            row(&d(1), &u(2), "Bob@contoso.com"),
            // Userless: only the system account reports it.
            row(&d(2), crate::graph::NIL_GUID, "System account"),
            // A device-context check-in of a device whose user also reports: not userless.
            row(&d(3), &u(3), "carol@contoso.com"),
            row(&d(3), crate::graph::NIL_GUID, "System account"),
            // An id of another shape: a device of its own per row.
            serde_json::json!({"id": "opaque", "status": "compliant", "userPrincipalName": "bob@contoso.com"}),
        ]);
        let (rows, users, next) = read(&body).unwrap();
        assert_eq!(next, None);
        assert!(rows[2].system && !rows[0].system);
        assert_eq!(rows[0].device, rows[1].device);
        assert_eq!(rows[5].device, None);
        // Bob's two rows are one user, whatever the case of his name.
        assert_eq!(rows[1].user, rows[5].user);
        assert_eq!(users.name(rows[1].user), "bob@contoso.com");
        assert_eq!(users.len(), 4);
        assert_eq!(system_only(&rows).len(), 1);
        assert_eq!(in_scope(&rows, |_| true, |_| None).len(), 3);
        let bob = in_scope(&rows, |s| users.name(s.user) == "bob@contoso.com", |_| None);
        assert_eq!(bob.len(), 2);
        assert_eq!(users.name(bob[0].user), "bob@contoso.com");
        // A device group holding the userless device places it; one excluding the shared
        // device keeps it out whoever its users are.
        let (userless, shared) = (rows[2].device, rows[0].device);
        let grouped = in_scope(
            &rows,
            |_| true,
            |s| {
                if s.device == userless {
                    Some(true)
                } else if s.device == shared {
                    Some(false)
                } else {
                    None
                }
            },
        );
        assert_eq!(grouped.len(), 3);
        assert!(grouped.iter().any(|s| s.system) && grouped.iter().all(|s| s.device != shared));
        assert_eq!(device_of("a_b_c"), None);
        assert_eq!(device_of(&format!("{}_{P}", d(1))), None);
    }

    #[test]
    fn rows_read_their_five_fields_whatever_else_the_service_sends() {
        let body = format!(
            r#"{{"@odata.context":"https://graph.microsoft.com/v1.0/$metadata#x",
                "@odata.count": 2,
                "value":[
                  {{"id":"{}_{P}_{}","deviceDisplayName":"WIN-1","userName":"Alice",
                    "deviceModel":null,"platform":{{"nested":[1,2,{{"x":null}}]}},
                    "complianceGracePeriodExpirationDateTime":"2026-12-01T10:00:00.1234567Z",
                    "status":"nonCompliant","lastReportedDateTime":"2026-11-30T10:00:00Z",
                    "userPrincipalName":"Al\u00efce@contoso.com","newField":true}},
                  {{"id":null,"status":null,"userPrincipalName":null,
                    "lastReportedDateTime":null,"complianceGracePeriodExpirationDateTime":null}},
                  {{}},
                  {{"status":"notApplicable","userPrincipalName":"x\/y@contoso.com"}},
                  {{"status":"somethingNew"}}
                ],
                "@odata.nextLink":"https://graph.microsoft.com/v1.0/next?$skiptoken=a%2Fb"}}"#,
            d(1),
            u(1)
        );
        let (rows, users, next) = read(&body).unwrap();
        assert_eq!(
            next.as_deref(),
            Some("https://graph.microsoft.com/v1.0/next?$skiptoken=a%2Fb")
        );
        assert_eq!(rows.len(), 5);
        let first = rows[0];
        assert_eq!(first.device, devices::key(&d(1)));
        assert_eq!(first.state, Some(DeviceState::Noncompliant));
        // An escaped name is read (unescaped, lowercased) like any other.
        assert_eq!(users.name(first.user), "alïce@contoso.com");
        assert_eq!(
            first.last_reported,
            Timestamp::parse_rfc3339("2026-11-30T10:00:00Z")
        );
        assert_eq!(
            first.grace_until.map(Timestamp::as_millis),
            Timestamp::parse_rfc3339("2026-12-01T10:00:00Z").map(|t| t.as_millis() + 123)
        );
        // `null` and absent fields are not given: an unknown status, no user, no dates.
        for nothing in &rows[1..3] {
            assert_eq!(nothing.device, None);
            assert_eq!(nothing.state, Some(DeviceState::Unknown));
            assert_eq!(users.name(nothing.user), "");
            assert!(!nothing.system);
            assert_eq!((nothing.last_reported, nothing.grace_until), (None, None));
        }
        assert_eq!(rows[3].state, None);
        assert_eq!(users.name(rows[3].user), "x/y@contoso.com");
        assert_eq!(rows[4].state, Some(DeviceState::Unknown));
        // A page without rows, or with `value: null`, is a page of none.
        assert_eq!(read(r#"{"value":[]}"#).unwrap().0, vec![]);
        assert_eq!(read(r#"{"value":null}"#).unwrap().0, vec![]);
        assert_eq!(read("{}").unwrap().0, vec![]);
    }

    #[test]
    fn a_malformed_page_is_an_error_saying_what_and_where() {
        let long = format!(
            "{{\"value\":[{}]}}",
            "{\"status\":\"compliant\"},".repeat(3)
        );
        for (body, says) in [
            ("", "EOF while parsing"),
            ("[]", "expected a page of device statuses"),
            ("null", "expected a page of device statuses"),
            (r#"{"value":{}}"#, "expected an array of device statuses"),
            (
                r#"{"value":"rows"}"#,
                "expected an array of device statuses",
            ),
            (r#"{"value":[1]}"#, "expected a device status object"),
            (
                r#"{"value":[["id","status"]]}"#,
                "expected a device status object",
            ),
            (r#"{"value":[{"status":4}]}"#, "expected a string"),
            (r#"{"value":[{"id":{"a":1}}]}"#, "expected a string"),
            (
                r#"{"value":[{"status":"compliant","status":"error"}]}"#,
                "duplicate field `status`",
            ),
            (r#"{"value":[],"value":[]}"#, "duplicate field `value`"),
            (r#"{"value":[],"@odata.nextLink":7}"#, "expected a string"),
            (r#"{"value":[{"id":"x"}]"#, "EOF while parsing"),
            (r#"{"value":[]} trailing"#, "trailing characters"),
            (r#"{"value":[{"id":"\ud800"}]}"#, "escape"),
            (long.as_str(), "trailing comma"),
        ] {
            let error = read(body)
                .err()
                .unwrap_or_else(|| panic!("{body} was read"));
            assert!(
                error.starts_with("unreadable device statuses page: ") && error.contains(says),
                "{body}: {error}"
            );
            assert!(error.contains("line "), "{body}: {error}");
        }
        // Invalid UTF-8 never reaches the reader: the client's text is a `String`.
    }

    #[test]
    fn users_are_numbered_once_by_their_name_in_any_case() {
        let mut users = Users::default();
        let mut lowered = String::new();
        let a = users.number("Alice@Contoso.com", &mut lowered).unwrap();
        assert_eq!(users.number("alice@contoso.com", &mut lowered), Ok(a));
        assert_eq!(users.number("ALICE@CONTOSO.COM", &mut lowered), Ok(a));
        let e = users.number("ÉLODIE@contoso.com", &mut lowered).unwrap();
        assert_ne!(a, e);
        assert_eq!(users.name(e), "élodie@contoso.com");
        assert_eq!(users.number("élodie@contoso.com", &mut lowered), Ok(e));
        assert_eq!(users.len(), 2);
        assert_eq!(users.name(99), "");
        // Group members are looked up by the same key.
        assert_eq!(users.key(a), user_key("ALICE@contoso.COM"));
        assert_eq!(users.key(e), user_key("Élodie@Contoso.com"));
        assert_ne!(users.key(a), users.key(e));
    }
}
