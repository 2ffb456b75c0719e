//! Intune Multi Admin Approval: the requests an app's intercepted writes become.
//!
//! Sources: learn.microsoft.com/intune/fundamentals/role-based-access-control/multi-admin-approval-graph-api
//! (MicrosoftDocs/memdocs `intune/fundamentals/role-based-access-control/multi-admin-approval-graph-api.md`)
//! and the beta `operationApprovalRequest` resource
//! (microsoft-graph-docs-contrib `api-reference/beta/resources/intune-rbac-operationapprovalrequest.md`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::domain::time::Timestamp;
use crate::graph::format_time;

/// How long a request can be acted on.
pub const LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// `operationApprovalRequestStatus`, as stored (`expired` is derived from the clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    NeedsApproval,
    Approved,
    Rejected,
    Cancelled,
    Completed,
}

/// One `operationApprovalRequest`, with the operation it stands for.
#[derive(Clone, Debug)]
pub struct ApprovalRequest {
    pub id: String,
    pub method: String,
    /// Without the version prefix.
    pub path: String,
    pub body_sha256: String,
    pub state: State,
    pub requested: Timestamp,
    pub modified: Timestamp,
    pub justification: String,
    /// The approving (or rejecting) administrator's user id.
    pub approver: Option<String>,
    pub approval_justification: Option<String>,
    /// The requesting application's client id.
    pub application: String,
}

/// Who approves in the emulated admin center.
pub const APPROVER_NAME: &str = "Second Admin";

impl ApprovalRequest {
    pub fn expires(&self) -> Timestamp {
        self.requested.plus(LIFETIME)
    }

    /// The status as the service reads it at `now`: an open request past its expiry is expired.
    pub fn status(&self, now: Timestamp) -> &'static str {
        let open = matches!(self.state, State::NeedsApproval | State::Approved);
        if open && now > self.expires() {
            return "expired";
        }
        match self.state {
            State::NeedsApproval => "needsApproval",
            State::Approved => "approved",
            State::Rejected => "rejected",
            State::Cancelled => "cancelled",
            State::Completed => "completed",
        }
    }

    /// The documented `operationApprovalRequest` shape.
    pub fn to_json(&self, now: Timestamp) -> Value {
        json!({
            "@odata.type": "#microsoft.graph.operationApprovalRequest",
            "id": self.id,
            "requestDateTime": format_time(self.requested),
            "expirationDateTime": format_time(self.expires()),
            "lastModifiedDateTime": format_time(self.modified),
            "requestor": {"application": {"id": self.application, "displayName": "phasegate"}},
            "approver": self.approver.as_ref().map(|id| json!({"user": {"displayName": APPROVER_NAME, "id": id}})),
            "status": self.status(now),
            "requestJustification": self.justification,
            "approvalJustification": self.approval_justification,
            "requiredOperationApprovalPolicyTypes": ["deviceCompliancePolicy"],
        })
    }
}

/// Decodes standard Base64 (RFC 4648 §4), padded or not; `None` if it is not Base64.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    let unpadded = text.trim_end_matches('=');
    if text.len() - unpadded.len() > 2 || unpadded.len() % 4 == 1 {
        return None;
    }
    if text.len() != unpadded.len() && !text.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    for chunk in unpadded.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    Some(out)
}

/// Encodes standard, padded Base64 (for tests and examples).
pub fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_refuses_what_is_not_base64() {
        for text in [
            "",
            "a",
            "ab",
            "abc",
            "Rollout of the Windows baseline, phase 2",
        ] {
            let encoded = encode_base64(text.as_bytes());
            assert_eq!(
                decode_base64(&encoded).unwrap(),
                text.as_bytes(),
                "{encoded}"
            );
            let bare = encoded.trim_end_matches('=');
            assert_eq!(decode_base64(bare).unwrap(), text.as_bytes());
        }
        assert_eq!(encode_base64(b"Man"), "TWFu");
        assert_eq!(decode_base64("not base64!"), None);
        assert_eq!(decode_base64("abcde"), None);
        assert_eq!(decode_base64("ab=c"), None);
    }

    #[test]
    fn open_requests_expire_after_thirty_days() {
        let t0 = Timestamp::from_millis(1_767_600_000_000);
        let mut request = ApprovalRequest {
            id: "r".into(),
            method: "POST".into(),
            path: "/x".into(),
            body_sha256: String::new(),
            state: State::NeedsApproval,
            requested: t0,
            modified: t0,
            justification: "j".into(),
            approver: None,
            approval_justification: None,
            application: "app".into(),
        };
        assert_eq!(request.status(t0.plus(LIFETIME)), "needsApproval");
        assert_eq!(
            request.status(t0.plus(LIFETIME + Duration::from_secs(1))),
            "expired"
        );
        request.state = State::Completed;
        assert_eq!(
            request.status(t0.plus(LIFETIME * 2)),
            "completed",
            "a finished request stays as it ended"
        );
        assert_eq!(request.to_json(t0)["approver"], Value::Null);
    }
}
