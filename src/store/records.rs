//! What the store writes: versioned JSON values, key layouts, and the hash-chained event record.
//!
//! Every value is an envelope `{"format":N,"data":…}`. Values of every format from
//! [`OLDEST_READABLE`] on decode (their `data` has kept its shape; a field added later must be
//! `#[serde(default)]`).
//!
//! Events are hashed over the bytes the store wrote, never over a re-serialisation of today's
//! struct, so a trail stays verifiable whatever fields later versions add:
//! - format 3 and later: the value is `{"format":3,"data":{…}` followed by `,"hash":"<64 hex>"}`,
//!   and the hash is SHA-256 of the event's `prev_hash` followed by the value up to the hash
//!   field, closed by `}` — i.e. of the envelope `{"format":3,"data":{…}}` exactly as stored.
//! - format 2: the value is `{"format":2,"data":{…,"hash":"<hex>"}}`, and the hash is SHA-256 of
//!   `prev_hash` followed by `data` as written with its `hash` set to `""` (the stored JSON, its
//!   keys in their written order, compact). That is what format 2 hashed, read from the stored
//!   bytes rather than from a struct.
//!
//! Events are never rewritten: an old trail keeps its old events, each checked by the rule of
//! its own format, and new events link to them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FORMAT_VERSION, OLDEST_READABLE, StoreError};
use crate::domain::event::{Event, PendingEffect};
use crate::domain::forecast::ImpactRecord;
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
            "format {format} is not readable by this phasegate (formats {OLDEST_READABLE} to {FORMAT_VERSION})"
        ))
    };
    let readable = |format: u32| (OLDEST_READABLE..=FORMAT_VERSION).contains(&format);
    match serde_json::from_slice::<EnvelopeIn<T>>(bytes) {
        Ok(envelope) if readable(envelope.format) => Ok(envelope.data),
        Ok(envelope) => Err(unreadable(envelope.format)),
        Err(typed) => match serde_json::from_slice::<FormatOnly>(bytes) {
            Ok(only) if !readable(only.format) => Err(unreadable(only.format)),
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
    /// The impact forecasts a promotion on this event was decided on, and forecasts checked
    /// against the outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub impact: Vec<ImpactRecord>,
    pub prev_hash: String,
    /// Not part of the stored `data` from format 3 on (it follows it); filled in on reading.
    #[serde(default)]
    pub hash: String,
}

impl EventRecord {
    /// Fixes the sequence number and chains the record to its predecessor.
    pub fn sealed(self, seq: u64, prev_hash: &str) -> EventRecord {
        seal(self, seq, prev_hash).0
    }

    /// The hash this record gets when the store writes it now.
    pub fn compute_hash(&self) -> String {
        let body = event_body(self);
        chain_hash(&self.prev_hash, &body)
    }
}

/// An event as read back: the record (its `hash` the one stored) and the hash its stored bytes
/// have by the rule of their format, which verification compares.
pub struct StoredEvent {
    pub record: EventRecord,
    pub content_hash: String,
}

/// The length of `,"hash":"<64 hex>"}`, which ends every event value of format 3.
const HASH_TAIL: usize = 9 + 64 + 2;

/// Fixes the sequence number, chains the record to `prev_hash`, and encodes it: the record
/// with its hash and the bytes to store.
pub fn seal(mut record: EventRecord, seq: u64, prev_hash: &str) -> (EventRecord, Vec<u8>) {
    record.seq = seq;
    record.prev_hash = prev_hash.to_string();
    let mut bytes = event_body(&record);
    record.hash = chain_hash(prev_hash, &bytes);
    bytes.pop();
    bytes.extend_from_slice(format!(",\"hash\":\"{}\"}}", record.hash).as_bytes());
    (record, bytes)
}

/// `{"format":N,"data":{…}}`: the record without its hash, as format 3 stores and hashes it.
fn event_body(record: &EventRecord) -> Vec<u8> {
    let mut data = serde_json::to_value(record).expect("event records always serialize");
    if let Some(fields) = data.as_object_mut() {
        fields.remove("hash");
    }
    encode(&data)
}

pub fn chain_hash(prev_hash: &str, bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(bytes);
    hex::encode(hasher.finalize())
}

/// Decodes an event value of any readable format, with the hash of its stored bytes.
pub fn decode_event(key: &str, bytes: &[u8]) -> Result<StoredEvent, StoreError> {
    let corrupt = |message: &str| StoreError::Corrupt {
        key: key.to_string(),
        message: message.to_string(),
    };
    let only: FormatOnly = serde_json::from_slice(bytes).map_err(|e| corrupt(&e.to_string()))?;
    if only.format == 2 {
        let record: EventRecord = decode(key, bytes)?;
        let content_hash = legacy_hash(bytes).ok_or_else(|| corrupt("not an event of format 2"))?;
        return Ok(StoredEvent {
            record,
            content_hash,
        });
    }
    #[derive(Deserialize)]
    struct Hashed {
        hash: String,
    }
    let mut record: EventRecord = decode(key, bytes)?;
    let Hashed { hash } = serde_json::from_slice(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let split = bytes
        .len()
        .checked_sub(HASH_TAIL)
        .filter(|&at| bytes[at..].starts_with(b",\"hash\":\"") && bytes.ends_with(b"\"}"))
        .ok_or_else(|| corrupt("the event's hash is not where the store writes it"))?;
    let mut body = bytes[..split].to_vec();
    body.push(b'}');
    let content_hash = chain_hash(&record.prev_hash, &body);
    record.hash = hash;
    Ok(StoredEvent {
        record,
        content_hash,
    })
}

/// What format 2 hashed: `data` as written, with `hash` set to `""`.
fn legacy_hash(bytes: &[u8]) -> Option<String> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let data = value.get_mut("data")?.as_object_mut()?;
    let prev_hash = data.get("prev_hash")?.as_str()?.to_string();
    *data.get_mut("hash")? = serde_json::Value::String(String::new());
    let unsealed = serde_json::to_vec(data).ok()?;
    Some(chain_hash(&prev_hash, &unsealed))
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
pub fn verify_chain(events: &[StoredEvent], head: &StoredRollout) -> Result<u64, String> {
    let mut prev_hash = String::new();
    for (i, stored) in events.iter().enumerate() {
        let record = &stored.record;
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
        if stored.content_hash != record.hash {
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
