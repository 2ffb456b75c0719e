//! Who is asking, and what they may do.
//!
//! Every command that reaches phasegate through its API carries an [`Identity`]: the name the
//! audit trail records, and a [`Role`] that decides what it may do. Today an identity comes from a
//! bearer token (created with `phasegate token create`, shown once, stored as a SHA-256 hash) or
//! from the local machine (the daemon's own token, readable only by the user who runs it). A
//! sign-in through Microsoft Entra ID would be one more [`Source`]: everything after
//! authentication sees only `Identity`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::time::Timestamp;

/// What an identity may do. Roles are not a ladder: approving and operating are separate duties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads rollouts, history, evidence.
    Viewer,
    /// Also approves and rejects promotions.
    Approver,
    /// Also starts, pauses, resumes, rolls back, aborts, and decides about drift.
    Operator,
    /// Everything, and manages tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Approver, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    pub fn can_approve(self) -> bool {
        matches!(self, Role::Approver | Role::Admin)
    }

    pub fn can_operate(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }

    pub fn can_administer(self) -> bool {
        self == Role::Admin
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an identity was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A bearer token from `phasegate token create`.
    Token,
    /// The daemon's own token, for the CLI on the same machine: it may name the person acting
    /// (`--by`), as direct access to the store does.
    Local,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    pub source: Source,
}

/// A token as the store keeps it: never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// Prefix of every token, so a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "pgt_";

/// A new random token: 32 bytes from the operating system, hex.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the system: {e}"))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A token name: what the audit trail records. Letters, digits, `.`, `-`, `_`, `@`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_stored_only_as_hashes() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(hash(&a), hash(&format!(" {a}\n")));
        assert!(!hash(&a).contains(&a[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn approving_and_operating_are_separate_duties() {
        assert!(Role::Approver.can_approve() && !Role::Approver.can_operate());
        assert!(Role::Operator.can_operate() && !Role::Operator.can_approve());
        assert!(!Role::Viewer.can_approve() && !Role::Viewer.can_operate());
        assert!(
            Role::Admin.can_approve() && Role::Admin.can_operate() && Role::Admin.can_administer()
        );
        assert_eq!(Role::parse("approver"), Some(Role::Approver));
        assert_eq!(Role::parse("root"), None);
        assert!(valid_name("bob@contoso.com") && !valid_name("bob smith") && !valid_name(""));
    }
}
