//! What the store writes: versioned JSON values, key layouts, and the hash-chained event record.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FORMAT_VERSION, StoreError};
use crate::domain::event::{Event, PendingEffect};
use crate::domain::rollout::{Rollout, RolloutStatus};
use crate::domain::time::Timestamp;

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    format: u32,
    data: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    format: u32,
    data: T,
}

/// Only the version of a value, for telling why a value did not decode.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&EnvelopeOut {
        format: FORMAT_VERSION,
        data: value,
    })
    .expect("store records always serialize")
}

/// Decodes a value in one typed pass (no intermediate JSON tree: this is on every load and every
/// commit). A value of another format is reported as such, whatever its shape.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.to_string(),
        message,
    };
    let unreadable = |format: u32| {
        corrupt(format!(
            "format {format} is not readable by this phasegate (format {FORMAT_VERSION})"
        ))
    };
    match serde_json::from_slice::<EnvelopeIn<T>>(bytes) {
        Ok(envelope) if envelope.format == FORMAT_VERSION => Ok(envelope.data),
        Ok(envelope) => Err(unreadable(envelope.format)),
        Err(typed) => match serde_json::from_slice::<FormatOnly>(bytes) {
            Ok(only) if only.format != FORMAT_VERSION => Err(unreadable(only.format)),
            _ => Err(corrupt(typed.to_string())),
        },
    }
}

/// A rollout as stored: the aggregate and the hash of its newest event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRollout {
    pub rollout: Rollout,
    pub last_hash: String,
}

/// A plan's text as it was when the rollout used it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// Where the plan was read from (to notice later edits), as given by the user.
    pub path: String,
    pub source: String,
    pub hash: String,
}

/// One entry of the audit trail: the event, the decision it led to, and the chain link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    /// Rollout time (virtual for the simulator).
    pub at: Timestamp,
    /// Wall-clock time of the commit.
    pub recorded_at: Timestamp,
    pub event: Event,
    pub previous_status: RolloutStatus,
    pub status: RolloutStatus,
    /// The rollout's reason after the event.
    pub reason: String,
    /// Decisions the machine took on this event.
    pub notes: Vec<String>,
    /// Effects this transition committed to.
    pub effects: Vec<PendingEffect>,
    pub prev_hash: String,
    pub hash: String,
}

impl EventRecord {
    /// Fixes the sequence number and chains the record to its predecessor.
    pub fn sealed(mut self, seq: u64, prev_hash: &str) -> EventRecord {
        self.seq = seq;
        self.prev_hash = prev_hash.to_string();
        self.hash = self.compute_hash();
        self
    }

    pub fn compute_hash(&self) -> String {
        let unsealed = EventRecord {
            hash: String::new(),
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unsealed).expect("event records always serialize");
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(&bytes);
        hex::encode(hasher.finalize())
    }
}

pub fn event_prefix(id: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key
}

pub fn event_key(id: &str, seq: u64) -> Vec<u8> {
    let mut key = event_prefix(id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn seq_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|start| key[start..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

pub fn plan_key(id: &str, hash: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(hash.as_bytes());
    key
}

/// Checks sequence numbers, links and hashes; `Ok(n)` with the number of events checked.
pub fn verify_chain(events: &[EventRecord], head: &StoredRollout) -> Result<u64, String> {
    let mut prev_hash = String::new();
    for (i, record) in events.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        if record.seq != expected_seq {
            return Err(format!(
                "event {expected_seq}: found sequence number {} (gap or duplicate)",
                record.seq
            ));
        }
        if record.prev_hash != prev_hash {
            return Err(format!(
                "event {}: does not link to event {} (chain broken)",
                record.seq,
                record.seq - 1
            ));
        }
        if record.compute_hash() != record.hash {
            return Err(format!(
                "event {}: content does not match its hash (edited after it was written)",
                record.seq
            ));
        }
        prev_hash = record.hash.clone();
    }
    let n = events.len() as u64;
    if head.rollout.last_seq != n {
        return Err(format!(
            "the rollout is at event {} but the trail has {n} events",
            head.rollout.last_seq
        ));
    }
    if head.last_hash != prev_hash {
        return Err("the rollout's head does not match the last event's hash".into());
    }
    Ok(n)
}
