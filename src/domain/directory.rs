//! The directory's people, as a provider reads them from a group: who an e-mail announcement
//! to a group reaches. Pure: the shell asks the provider for a group's members and hands them
//! here; what comes out is recorded before anything is sent, so every attempt (and a restart
//! after a crash) mails the very same list.

use serde::{Deserialize, Serialize};

use super::plan::announce::is_address;

/// The most recipients one e-mail announcement may have, its addresses and its groups' members
/// together: Exchange Online's limit of recipients per message (other relays take fewer, never
/// fewer than the 100 RFC 5321 requires). An announcement whose groups have more fails with an
/// audit event saying so, rather than mailing thousands.
pub const MAIL_RECIPIENTS_MAX: usize = 500;

/// A user of a directory group (members of nested groups included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The directory's id of the user.
    pub id: String,
    /// How people know the user (the user principal name).
    pub name: String,
    /// The user's e-mail address; `None` for a user without a mailbox.
    pub mail: Option<String>,
}

/// Who an e-mail announcement's groups reach, fixed before its first attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipients {
    /// The members' addresses, each once, none of the announcement's own `addresses` again.
    pub addresses: Vec<String>,
    /// The members who have no usable address (by name): told nothing, and reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub without_mail: Vec<String>,
}

/// The recipients of an announcement naming `addresses` whose groups have `members`:
/// deduplicated case-insensitively (against `addresses` too), in the order read; or why it
/// cannot be sent (more than [`MAIL_RECIPIENTS_MAX`] in all).
pub fn mail_recipients(addresses: &[String], members: &[Member]) -> Result<Recipients, String> {
    let mut seen: std::collections::HashSet<String> =
        addresses.iter().map(|a| a.to_lowercase()).collect();
    let mut named = std::collections::HashSet::new();
    let mut found = Recipients::default();
    for member in members {
        match member.mail.as_deref().map(str::trim) {
            Some(mail) if is_address(mail) => {
                if seen.insert(mail.to_lowercase()) {
                    found.addresses.push(mail.to_string());
                }
            }
            _ => {
                if named.insert(member.name.to_lowercase()) {
                    found.without_mail.push(member.name.clone());
                }
            }
        }
    }
    let total = addresses.len() + found.addresses.len();
    if total > MAIL_RECIPIENTS_MAX {
        return Err(format!(
            "the announcement would go to {total} addresses, more than the {MAIL_RECIPIENTS_MAX} \
             one message may have: name smaller groups, or a distribution list's address"
        ));
    }
    Ok(found)
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
        let found = mail_recipients(&addresses, &members).unwrap();
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
        let found = mail_recipients(&[], &members).unwrap();
        assert_eq!(found.addresses, ["ok@contoso.com"]);
        assert_eq!(found.without_mail, ["kiosk@contoso.com", "odd@contoso.com"]);
    }

    #[test]
    fn more_recipients_than_one_message_may_have_is_refused_saying_so() {
        let members: Vec<Member> = (0..MAIL_RECIPIENTS_MAX)
            .map(|i| member(&format!("u{i}"), Some(&format!("u{i}@contoso.com"))))
            .collect();
        assert!(mail_recipients(&[], &members).is_ok());
        let error = mail_recipients(&["it@contoso.com".into()], &members).unwrap_err();
        assert!(error.contains("501 addresses"), "{error}");
        assert!(error.contains("more than the 500"), "{error}");
    }

    #[test]
    fn a_few_names_stand_for_a_long_list() {
        let names: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
        assert_eq!(some_of(&names, 3), "u0, u1, u2 and 2 more");
        assert_eq!(some_of(&names[..2], 3), "u0, u1");
    }
}
