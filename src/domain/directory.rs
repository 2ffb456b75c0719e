//! The directory's people, as a provider reads them from a group: who an e-mail announcement
//! to a group reaches, and who is in a directory approver group. Pure: the shell asks the
//! provider for a group's members and hands them here; what comes out is recorded (before an
//! e-mail is sent, so every attempt and a restart after a crash mails the very same list; as the
//! rollout's snapshot of an approver group, which approvals are judged against without asking
//! the directory again).

use serde::{Deserialize, Serialize};

use super::plan::announce::is_address;
use super::plan::identity_key;
use super::time::Timestamp;

/// The most members a directory approver group may have: approving is for a board, not a
/// department. A larger group is recorded as not readable, which refuses its approvals.
pub const APPROVER_MEMBERS_MAX: usize = 1000;

/// An approver group as the directory had it when the shell last read it: the identities of its
/// members (each user's principal name and mail address, as [`identity_key`]s), or why it could
/// not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverSnapshot {
    /// The directory group's name.
    pub directory: String,
    pub read_at: Timestamp,
    /// Which directory said so (the provider, as the audit trail names it).
    pub source: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Why the group could not be read; its approvals are refused while this is the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The latest observation of the rollout's phases when this reading was recorded (set by
    /// the machine): the next reading is due after a newer one, whatever the clocks say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<Timestamp>,
}

impl ApproverSnapshot {
    /// The snapshot of a group read with these members (at most [`APPROVER_MEMBERS_MAX`]).
    pub fn read(directory: &str, source: &str, at: Timestamp, found: &[Member]) -> Self {
        let mut snapshot = ApproverSnapshot {
            directory: directory.to_string(),
            read_at: at,
            source: source.to_string(),
            members: Vec::new(),
            error: None,
            follows: None,
        };
        if found.len() > APPROVER_MEMBERS_MAX {
            snapshot.error = Some(format!(
                "it has more than {APPROVER_MEMBERS_MAX} members, too many to approve from"
            ));
            return snapshot;
        }
        let mut keys: Vec<String> = found
            .iter()
            .flat_map(|m| [Some(m.name.as_str()), m.mail.as_deref()])
            .flatten()
            .map(identity_key)
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys.dedup();
        snapshot.members = keys;
        snapshot
    }

    /// The snapshot of a group that could not be read.
    pub fn unreadable(directory: &str, source: &str, at: Timestamp, why: &str) -> Self {
        ApproverSnapshot {
            directory: directory.to_string(),
            read_at: at,
            source: source.to_string(),
            members: Vec::new(),
            error: Some(why.to_string()),
            follows: None,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.error.is_none()
            && self
                .members
                .binary_search_by(|m| m.as_str().cmp(key))
                .is_ok()
    }

    /// Where and when it was read, in words: `Change Advisory Board as read 2h ago from graph
    /// contoso (2026-01-05T09:00:00Z)`.
    pub fn provenance(&self, now: Timestamp) -> String {
        format!(
            "`{}` as read {} ago from {} ({})",
            self.directory,
            super::time::format_span(now.since(self.read_at)),
            self.source,
            self.read_at
        )
    }
}

/// The most recipients one e-mail announcement may have, its addresses and its groups' members
/// together: Exchange Online's limit of recipients per message (other relays take fewer, never
/// fewer than the 100 RFC 5321 requires; an e-mail channel may set a lower `max_recipients`).
/// An announcement whose groups have more fails with an audit event saying so, rather than
/// mailing thousands.
pub const MAIL_RECIPIENTS_MAX: usize = 500;

/// The most members of an e-mail announcement's groups the shell reads (disabled accounts and
/// users without a mailbox included): beyond that the announcement is dropped as too large
/// without reading on.
pub const MEMBERS_READ_MAX: usize = 10_000;

/// A user of a directory group (members of nested groups included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The directory's id of the user.
    pub id: String,
    /// How people know the user (the user principal name).
    pub name: String,
    /// The user's e-mail address; `None` for a user without a mailbox.
    pub mail: Option<String>,
    /// Whether the account may sign in; a disabled one is told nothing.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn enabled() -> bool {
    true
}

/// Who an e-mail announcement's groups reach, fixed before its first attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipients {
    /// The members' addresses, each once, none of the announcement's own `addresses` again.
    pub addresses: Vec<String>,
    /// The members who have no usable address (by name): told nothing, and reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub without_mail: Vec<String>,
    /// The members whose account is disabled (by name): told nothing, and reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled: Vec<String>,
}

impl Recipients {
    /// A short fingerprint of the addresses mailed (SHA-256 of the lowercase addresses, sorted,
    /// one per line; its first 16 hex digits): two deliveries with the same digest went to the
    /// same people.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut sorted: Vec<String> = self.addresses.iter().map(|a| a.to_lowercase()).collect();
        sorted.sort();
        let mut hash = Sha256::new();
        for address in &sorted {
            hash.update(address.as_bytes());
            hash.update(b"\n");
        }
        hex::encode(&hash.finalize()[..8])
    }
}

/// The recipients of an announcement naming `addresses` whose groups have `members`:
/// deduplicated case-insensitively (against `addresses` too), in the order read, disabled
/// accounts and members without a usable address left out and named; or why it cannot be sent
/// (more than `max` addresses in all, `max` at most [`MAIL_RECIPIENTS_MAX`]).
pub fn mail_recipients(
    addresses: &[String],
    members: &[Member],
    max: usize,
) -> Result<Recipients, String> {
    let max = max.clamp(1, MAIL_RECIPIENTS_MAX);
    let found = reach(addresses, members);
    let total = addresses.len() + found.addresses.len();
    if total > max {
        return Err(format!(
            "the announcement would go to {total} addresses, more than the {max} one message \
             may have: name smaller groups, or a distribution list's address"
        ));
    }
    Ok(found)
}

/// Whom `members` reach by mail beside `addresses`, however many: see [`mail_recipients`].
pub fn reach(addresses: &[String], members: &[Member]) -> Recipients {
    let mut seen: std::collections::HashSet<String> =
        addresses.iter().map(|a| a.to_lowercase()).collect();
    let mut named = std::collections::HashSet::new();
    let mut found = Recipients::default();
    for member in members {
        if !named.insert(member.name.to_lowercase()) {
            // The same user through two groups: judged once.
            if let Some(mail) = usable(member) {
                seen.insert(mail.to_lowercase());
            }
            continue;
        }
        if !member.enabled {
            found.disabled.push(member.name.clone());
            continue;
        }
        match usable(member) {
            Some(mail) => {
                if seen.insert(mail.to_lowercase()) {
                    found.addresses.push(mail.to_string());
                }
            }
            None => found.without_mail.push(member.name.clone()),
        }
    }
    found
}

/// A member's address, if it is one.
fn usable(member: &Member) -> Option<&str> {
    member
        .mail
        .as_deref()
        .map(str::trim)
        .filter(|mail| is_address(mail))
}

/// A few names of a list, for a line of the audit trail: `a, b, c and 7 more`.
pub fn some_of(names: &[String], shown: usize) -> String {
    let mut text = names
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > shown {
        text.push_str(&format!(" and {} more", names.len() - shown));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, mail: Option<&str>) -> Member {
        Member {
            id: format!("id-{name}"),
            name: name.into(),
            mail: mail.map(Into::into),
            enabled: true,
        }
    }

    #[test]
    fn members_are_mailed_once_whatever_the_case_and_the_announcements_own_addresses_are_kept() {
        let addresses = vec!["It-Staff@contoso.com".to_string()];
        let members = [
            member("ann@contoso.com", Some("Ann@contoso.com")),
            member("it@contoso.com", Some("it-staff@CONTOSO.com")),
            member("ann2@contoso.com", Some("ann@contoso.com")),
            member("bob@contoso.com", Some("bob@contoso.com")),
        ];
        let found = mail_recipients(&addresses, &members, MAIL_RECIPIENTS_MAX).unwrap();
        assert_eq!(found.addresses, ["Ann@contoso.com", "bob@contoso.com"]);
        assert!(found.without_mail.is_empty());
    }

    #[test]
    fn members_without_a_usable_address_are_reported_once() {
        let members = [
            member("kiosk@contoso.com", None),
            member("KIOSK@contoso.com", None),
            member("odd@contoso.com", Some("not an address")),
            member("ok@contoso.com", Some("ok@contoso.com")),
        ];
        let found = mail_recipients(&[], &members, MAIL_RECIPIENTS_MAX).unwrap();
        assert_eq!(found.addresses, ["ok@contoso.com"]);
        assert_eq!(found.without_mail, ["kiosk@contoso.com", "odd@contoso.com"]);
    }

    #[test]
    fn more_recipients_than_one_message_may_have_is_refused_saying_so() {
        let members: Vec<Member> = (0..MAIL_RECIPIENTS_MAX)
            .map(|i| member(&format!("u{i}"), Some(&format!("u{i}@contoso.com"))))
            .collect();
        assert!(mail_recipients(&[], &members, MAIL_RECIPIENTS_MAX).is_ok());
        let error =
            mail_recipients(&["it@contoso.com".into()], &members, MAIL_RECIPIENTS_MAX).unwrap_err();
        assert!(error.contains("501 addresses"), "{error}");
        assert!(error.contains("more than the 500"), "{error}");
        // A channel's lower limit is kept; a higher one is held to the bound.
        let error = mail_recipients(&[], &members[..11], 10).unwrap_err();
        assert!(error.contains("11 addresses, more than the 10"), "{error}");
        assert!(mail_recipients(&[], &members[..10], 10).is_ok());
        assert!(mail_recipients(&["it@contoso.com".into()], &members, 100_000).is_err());
        assert!(mail_recipients(&[], &members[..1], 0).is_ok());
    }

    #[test]
    fn disabled_accounts_are_told_nothing_and_named_once() {
        let mut off = member("gone@contoso.com", Some("gone@contoso.com"));
        off.enabled = false;
        let members = [
            off.clone(),
            member("ok@contoso.com", Some("ok@contoso.com")),
            off,
            member("nomail@contoso.com", None),
            member("ok@contoso.com", Some("ok@contoso.com")),
        ];
        let found = mail_recipients(&[], &members, MAIL_RECIPIENTS_MAX).unwrap();
        assert_eq!(found.addresses, ["ok@contoso.com"]);
        assert_eq!(found.disabled, ["gone@contoso.com"]);
        assert_eq!(found.without_mail, ["nomail@contoso.com"]);
    }

    #[test]
    fn the_digest_names_the_set_of_addresses_whatever_their_order_and_case() {
        let a = Recipients {
            addresses: vec!["Ann@contoso.com".into(), "bob@contoso.com".into()],
            ..Recipients::default()
        };
        let b = Recipients {
            addresses: vec!["bob@contoso.com".into(), "ann@CONTOSO.com".into()],
            ..Recipients::default()
        };
        let c = Recipients {
            addresses: vec!["bob@contoso.com".into()],
            ..Recipients::default()
        };
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert_eq!(a.digest().len(), 16);
    }

    #[test]
    fn a_few_names_stand_for_a_long_list() {
        let names: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
        assert_eq!(some_of(&names, 3), "u0, u1, u2 and 2 more");
        assert_eq!(some_of(&names[..2], 3), "u0, u1");
    }
}
