//! The durable store: rollouts, their append-only audit trail, plans and baselines, in sled.
//!
//! One transition is one sled transaction over the `rollouts`, `events` and `plans` trees, flushed
//! before `commit` returns; the engine runs effects only after that. Every value carries a format
//! version, and every event carries the hash of the one before it, so the trail is tamper-evident.
//!
//! Opening applies the two start-up mitigations for sled 0.34.7 (see `docs/reliability.md`): a
//! new database is built in `sled.creating` and renamed into place, and leftover
//! `snap.*.generating` files are removed before sled reads its snapshots. A kill at any instant of
//! start-up therefore never leaves a store that cannot be opened.
//!
//! Two locks keep processes apart: `store.lock` is held while the store is open (short commands
//! wait for it briefly), `driver.lock` is held by `run` for its whole life so that only one
//! process ever drives rollouts.

mod export;
mod identity;
mod lock;
mod records;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use thiserror::Error;

pub use export::{ChainHead, Export, ExportError, RolloutBackup, import};
pub use lock::FileLock;
pub use records::{EventRecord, PlanRecord, StoredEvent, StoredRollout};

use crate::domain::rollout::{Rollout, RolloutGlance, RolloutStatus};
use sha2::Digest;

/// The version of every value written; bump it with any change to a persisted shape, and say in
/// [`Store::migrate`] what opening an older store does.
pub const FORMAT_VERSION: u32 = 3;

/// The oldest store format this version opens (and migrates).
pub const OLDEST_READABLE: u32 = 2;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store {} is in use by another phasegate process{}", store.display(), holder_suffix(holder))]
    InUse { store: PathBuf, holder: String },
    #[error("store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {}: {message}", path.display())]
    Database { path: PathBuf, message: String },
    #[error(
        "store {}: the database in sled/ is not this store's (this store is {expected}, the database is {found}): it was swapped or copied in. phasegate will not carry on with another store's trail; put the right database back or restore from a backup (docs/operations.md, \"A damaged store\")",
        path.display()
    )]
    Replaced {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "store {}: the database sled/ of store {id} is missing (deleted or moved). phasegate will not start a fresh, empty store in its place; put it back or restore from a backup (docs/operations.md, \"A damaged store\")",
        path.display()
    )]
    Missing { path: PathBuf, id: String },
    #[error("store record {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("no rollout `{0}` in the store")]
    NotFound(String),
    #[error("a rollout `{0}` already exists")]
    AlreadyExists(String),
    #[error(
        "rollout `{id}` moved on concurrently (expected event {expected}, store is at {found})"
    )]
    Conflict {
        id: String,
        expected: u64,
        found: u64,
    },
}

fn holder_suffix(holder: &str) -> String {
    if holder.is_empty() {
        String::new()
    } else {
        format!(" ({holder})")
    }
}

/// What a commit writes besides the rollout and its event.
#[derive(Clone, Copy, Default)]
pub struct Attached<'a> {
    /// A plan the rollout runs from now on.
    pub plan: Option<&'a PlanRecord>,
    /// The provider's record of the rollout (its baseline and what it last made).
    pub record: Option<&'a serde_json::Value>,
    /// The backend objects the rollout drives.
    pub claims: Option<&'a [String]>,
}

/// An open store. Cheap to share by reference; dropping it releases the store lock.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    rollouts: sled::Tree,
    events: sled::Tree,
    plans: sled::Tree,
    baselines: sled::Tree,
    claims: sled::Tree,
    tokens: sled::Tree,
    meta: sled::Tree,
    id: String,
    /// The `claims` tree inverted, built on the first [`Store::claimant`] question.
    claim_index: Mutex<Option<ClaimIndex>>,
    /// Commits hold it shared; an export holds it alone, so that its snapshot of rollouts,
    /// trails, plans and baselines is one moment's even while a daemon commits.
    commits: RwLock<()>,
    _lock: FileLock,
}

/// Which rollouts claim each backend object. Kept in step with every write to the `claims`
/// tree (this process holds the store alone), so that starting a rollout looks up its objects
/// instead of reading every rollout's claims — which made starting n rollouts O(n²).
#[derive(Default)]
struct ClaimIndex {
    by_object: HashMap<String, BTreeSet<String>>,
    by_rollout: HashMap<String, Vec<String>>,
}

impl ClaimIndex {
    fn set(&mut self, id: &str, resources: &[String]) {
        for old in self.by_rollout.remove(id).unwrap_or_default() {
            if let Some(ids) = self.by_object.get_mut(&old) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_object.remove(&old);
                }
            }
        }
        for resource in resources {
            self.by_object
                .entry(resource.clone())
                .or_default()
                .insert(id.to_string());
        }
        self.by_rollout.insert(id.to_string(), resources.to_vec());
    }
}

/// How long a command waits for another process to release the store.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes the driver lock of the store at `dir` without waiting: only one `run` at a time.
pub fn lock_driver(dir: &Path) -> Result<FileLock, StoreError> {
    ensure_dir(dir)?;
    lock::acquire(&lock::lock_path(dir, "driver.lock"), dir, Duration::ZERO)
}

fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, waiting up to `wait` for its lock.
    ///
    /// The store's identity is kept twice: in the database and in `store.id` beside it. A
    /// database whose identity differs from the file's was swapped in; a missing database where
    /// the file says there was one was deleted or moved. Both are errors: phasegate never
    /// carries on with another store's trail, nor with a fresh, empty one.
    pub fn open(dir: &Path, wait: Duration) -> Result<Store, StoreError> {
        ensure_dir(dir)?;
        let lock = lock::acquire(&lock::lock_path(dir, "store.lock"), dir, wait)?;
        crate::crash::point("store.locked");
        let marker = identity::read(dir)?;
        let db_dir = dir.join("sled");
        if !db_dir.exists() {
            if let Some(id) = marker {
                return Err(StoreError::Missing {
                    path: dir.to_path_buf(),
                    id,
                });
            }
            create_database(dir, &db_dir)?;
        }
        remove_unfinished_snapshots(&db_dir)?;
        let db = open_database(dir, &db_dir)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| map_sled(dir, e));
        let mut store = Store {
            rollouts: tree("rollouts")?,
            events: tree("events")?,
            plans: tree("plans")?,
            baselines: tree("baselines")?,
            claims: tree("claims")?,
            tokens: tree("tokens")?,
            meta: tree("meta")?,
            id: String::new(),
            claim_index: Mutex::new(None),
            commits: RwLock::new(()),
            path: dir.to_path_buf(),
            db,
            _lock: lock,
        };
        store.id = store.identity(marker)?;
        store.check_format()?;
        crate::crash::point("store.opened");
        Ok(store)
    }

    /// This store's identity: made once, when the store is first opened, and never changed.
    /// Providers name it in what they leave in a tenant, so rollouts of different stores can
    /// tell each other apart; notification keys and chain heads carry it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The database's identity, checked against `store.id` (`marker`): made and written to both
    /// on first opening. A store from before `store.id` existed gets the file now.
    fn identity(&self, marker: Option<String>) -> Result<String, StoreError> {
        let inner = self
            .meta
            .get(b"store_id")
            .map_err(|e| self.db_error(e))?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        match (inner, marker) {
            (Some(inner), Some(marker)) if inner == marker => Ok(inner),
            (found, Some(expected)) => Err(StoreError::Replaced {
                path: self.path.clone(),
                expected,
                found: found.unwrap_or_else(|| "none: a new, empty database".into()),
            }),
            (Some(inner), None) => {
                identity::write(&self.path, &inner)?;
                Ok(inner)
            }
            (None, None) => {
                let seed = format!(
                    "{}:{}:{:?}:{}",
                    std::process::id(),
                    self.path.display(),
                    std::time::SystemTime::now(),
                    self.db.generate_id().unwrap_or(0)
                );
                let id = hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..8]);
                self.meta
                    .insert(b"store_id", id.as_bytes())
                    .map_err(|e| self.db_error(e))?;
                self.flush()?;
                identity::write(&self.path, &id)?;
                Ok(id)
            }
        }
    }

    /// The rollout of this store, other than `except`, that is not finished and claims one of
    /// `resources`: at most one rollout drives a backend object at a time.
    pub fn claimant(
        &self,
        resources: &[String],
        except: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        // The candidates in id order, each with the first of its objects asked about: what a
        // scan of the `claims` tree in key order finds.
        let candidates: Vec<(String, String)> = {
            let mut guard = self
                .claim_index
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if guard.is_none() {
                *guard = Some(self.read_claims()?);
            }
            let Some(index) = guard.as_ref() else {
                return Ok(None);
            };
            let ids: BTreeSet<&String> = resources
                .iter()
                .filter_map(|r| index.by_object.get(r))
                .flatten()
                .filter(|id| id.as_str() != except)
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let claimed = index.by_rollout.get(id)?;
                    let shared = claimed.iter().find(|r| resources.contains(r))?;
                    Some((id.clone(), shared.clone()))
                })
                .collect()
        };
        for (id, shared) in candidates {
            let status = self.rollout(&id)?.rollout.status;
            if !matches!(status, RolloutStatus::Aborted | RolloutStatus::Completed) {
                return Ok(Some((id, shared)));
            }
        }
        Ok(None)
    }

    fn read_claims(&self) -> Result<ClaimIndex, StoreError> {
        let mut index = ClaimIndex::default();
        for entry in self.claims.iter() {
            let (key, value) = entry.map_err(|e| self.db_error(e))?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let claimed: Vec<String> = records::decode(&format!("claims/{id}"), &value)?;
            index.set(&id, &claimed);
        }
        Ok(index)
    }

    /// Brings the claim index (if built) in step with a write to the `claims` tree.
    fn claims_written(&self, id: &str, resources: &[String]) {
        let mut guard = self
            .claim_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = guard.as_mut() {
            index.set(id, resources);
        }
    }

    /// Keeps an API token's record (by its hash), durably.
    pub fn put_token(&self, token: &crate::identity::TokenRecord) -> Result<(), StoreError> {
        self.tokens
            .insert(token.hash.as_bytes(), records::encode(token))
            .map_err(|e| self.db_error(e))?;
        self.flush()
    }

    /// The token whose hash this is, if it exists.
    pub fn token(&self, hash: &str) -> Result<Option<crate::identity::TokenRecord>, StoreError> {
        match self
            .tokens
            .get(hash.as_bytes())
            .map_err(|e| self.db_error(e))?
        {
            Some(bytes) => records::decode("tokens", &bytes).map(Some),
            None => Ok(None),
        }
    }

    pub fn tokens(&self) -> Result<Vec<crate::identity::TokenRecord>, StoreError> {
        self.tokens
            .iter()
            .map(|entry| {
                let (_, value) = entry.map_err(|e| self.db_error(e))?;
                records::decode("tokens", &value)
            })
            .collect()
    }

    /// Records which backend objects a rollout drives (see [`Store::claimant`]).
    pub fn set_claims(&self, id: &str, resources: &[String]) -> Result<(), StoreError> {
        self.claims
            .insert(id.as_bytes(), records::encode(&resources))
            .map_err(|e| self.db_error(e))?;
        self.claims_written(id, resources);
        Ok(())
    }

    pub fn claims(&self, id: &str) -> Result<Vec<String>, StoreError> {
        match self
            .claims
            .get(id.as_bytes())
            .map_err(|e| self.db_error(e))?
        {
            Some(bytes) => records::decode(&format!("claims/{id}"), &bytes),
            None => Ok(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tree for a provider's own durable state (the simulated tenant lives in one).
    pub fn provider_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(format!("provider:{name}"))
            .map_err(|e| self.db_error(e))
    }

    /// Flushes everything written so far (providers call it after changing their state).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.db_error(e))
    }

    fn db_error(&self, e: sled::Error) -> StoreError {
        map_sled(&self.path, e)
    }

    /// Reads the database's format, migrating an older one: a database of a newer phasegate is
    /// refused, and one older than [`OLDEST_READABLE`] too.
    fn check_format(&self) -> Result<(), StoreError> {
        let key = b"format";
        let Some(bytes) = self.meta.get(key).map_err(|e| self.db_error(e))? else {
            return self.set_format(FORMAT_VERSION);
        };
        let found =
            u32::from_be_bytes(bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                key: "meta/format".into(),
                message: "not a version number".into(),
            })?);
        if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&found) {
            let who = if found > FORMAT_VERSION {
                "a newer"
            } else {
                "a much older"
            };
            return Err(StoreError::Database {
                path: self.path.clone(),
                message: format!(
                    "written by {who} phasegate (format {found}; this one reads formats {OLDEST_READABLE} to {FORMAT_VERSION})"
                ),
            });
        }
        if found < FORMAT_VERSION {
            self.migrate(found)?;
        }
        Ok(())
    }

    /// Brings a database of format `from` to [`FORMAT_VERSION`].
    ///
    /// 2 → 3: events are hashed over their stored bytes from now on (see `records`). Nothing is
    /// rewritten: the events already written keep format 2 and are verified by its rule, and
    /// other values have the same shape in both formats. The identity file was written by
    /// [`Store::identity`] just before.
    fn migrate(&self, from: u32) -> Result<(), StoreError> {
        tracing::info!(
            store = %self.path.display(),
            from,
            to = FORMAT_VERSION,
            "migrating the store's format"
        );
        self.meta
            .insert(b"migrated_from", &from.to_be_bytes())
            .map_err(|e| self.db_error(e))?;
        self.set_format(FORMAT_VERSION)
    }

    fn set_format(&self, format: u32) -> Result<(), StoreError> {
        self.meta
            .insert(b"format", &format.to_be_bytes())
            .map_err(|e| self.db_error(e))?;
        self.flush()
    }

    /// The next free id for a rollout of `plan_name`: `<plan_name>-<n>`.
    pub fn next_rollout_id(&self, plan_name: &str) -> Result<String, StoreError> {
        let mut n = 1u64;
        loop {
            let id = format!("{plan_name}-{n}");
            if !self
                .rollouts
                .contains_key(id.as_bytes())
                .map_err(|e| self.db_error(e))?
            {
                return Ok(id);
            }
            n += 1;
        }
    }

    pub fn rollout(&self, id: &str) -> Result<StoredRollout, StoreError> {
        let bytes = self
            .rollouts
            .get(id.as_bytes())
            .map_err(|e| self.db_error(e))?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        records::decode(&format!("rollouts/{id}"), &bytes)
    }

    pub fn rollouts(&self) -> Result<Vec<StoredRollout>, StoreError> {
        self.rollouts
            .iter()
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.db_error(e))?;
                records::decode(
                    &format!("rollouts/{}", String::from_utf8_lossy(&key)),
                    &value,
                )
            })
            .collect()
    }

    /// Every rollout at a glance ([`RolloutGlance`]), each with its stored record still undecoded:
    /// the runner sorts a whole store by the glance and decodes in full only the rollouts it
    /// drives ([`Glanced::decode`]), a fraction of the cost of [`Store::rollouts`] for the rest.
    /// The records are read in one pass and glanced at on a few threads.
    pub fn glances(&self) -> Result<Vec<Glanced>, StoreError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
        self.glances_on(threads, GLANCES_PER_THREAD)
    }

    /// [`Store::glances`] on at most `threads` threads, each given `at_least` records.
    fn glances_on(&self, threads: usize, at_least: usize) -> Result<Vec<Glanced>, StoreError> {
        let listed = self
            .rollouts
            .iter()
            .map(|entry| entry.map_err(|e| self.db_error(e)))
            .collect::<Result<Vec<_>, _>>()?;
        let chunk = listed.len().div_ceil(threads.max(1)).max(at_least.max(1));
        std::thread::scope(|scope| {
            let parts: Vec<_> = listed
                .chunks(chunk)
                .map(|part| scope.spawn(|| part.iter().map(glance).collect::<Vec<_>>()))
                .collect();
            let mut glanced = Vec::with_capacity(listed.len());
            for part in parts {
                glanced.extend(
                    part.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            glanced.into_iter().collect()
        })
    }

    pub fn plan(&self, id: &str, hash: &str) -> Result<PlanRecord, StoreError> {
        let key = records::plan_key(id, hash);
        let bytes = self
            .plans
            .get(&key)
            .map_err(|e| self.db_error(e))?
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("plans/{id}/{hash}"),
                message: "the rollout's plan is missing".into(),
            })?;
        records::decode(&format!("plans/{id}"), &bytes)
    }

    /// The provider's record of a rollout: its baseline and what it last made of the backend.
    pub fn record(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(bytes) = self
            .baselines
            .get(id.as_bytes())
            .map_err(|e| self.db_error(e))?
        else {
            return Ok(None);
        };
        records::decode(&format!("baselines/{id}"), &bytes).map(Some)
    }

    pub fn events(&self, id: &str) -> Result<Vec<EventRecord>, StoreError> {
        Ok(self
            .stored_events(id)?
            .into_iter()
            .map(|stored| stored.record)
            .collect())
    }

    /// The events of a rollout with the hash of their stored bytes, for verification.
    pub fn stored_events(&self, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.events
            .scan_prefix(records::event_prefix(id))
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.db_error(e))?;
                records::decode_event(&format!("events/{id}/{}", records::seq_of(&key)), &value)
            })
            .collect()
    }

    /// Creates a rollout with its first event, its plan and the backend objects it claims,
    /// durably.
    pub fn create(
        &self,
        rollout: &Rollout,
        event: EventRecord,
        plan: &PlanRecord,
        claims: &[String],
    ) -> Result<EventRecord, StoreError> {
        if self
            .rollouts
            .contains_key(rollout.id.as_bytes())
            .map_err(|e| self.db_error(e))?
        {
            return Err(StoreError::AlreadyExists(rollout.id.clone()));
        }
        self.commit(
            &StoredRollout {
                rollout: Rollout {
                    last_seq: 0,
                    ..rollout.clone()
                },
                last_hash: String::new(),
            },
            rollout,
            event,
            Attached {
                plan: Some(plan),
                record: None,
                claims: Some(claims),
            },
        )
    }

    /// Appends `event` and replaces the rollout by `next`, atomically and durably. `current` is the
    /// record the transition was computed from; if the store moved on since, nothing is written.
    /// What `attached` carries is written in the same transaction.
    pub fn commit(
        &self,
        current: &StoredRollout,
        next: &Rollout,
        event: EventRecord,
        attached: Attached<'_>,
    ) -> Result<EventRecord, StoreError> {
        let id = next.id.clone();
        let seq = current.rollout.last_seq + 1;
        let (event, event_bytes) = records::seal(event, seq, &current.last_hash);
        let stored = StoredRollout {
            rollout: Rollout {
                last_seq: seq,
                ..next.clone()
            },
            last_hash: event.hash.clone(),
        };
        let rollout_bytes = records::encode(&stored);
        let event_key = records::event_key(&id, seq);
        let plan_entry = attached
            .plan
            .map(|p| (records::plan_key(&id, &p.hash), records::encode(p)));
        let baseline_bytes = attached.record.map(records::encode);
        let claim_bytes = attached.claims.map(|c| records::encode(&c));
        let trees = (
            &self.rollouts,
            &self.events,
            &self.plans,
            &self.baselines,
            &self.claims,
        );
        let committing = self.commits.read().unwrap_or_else(PoisonError::into_inner);
        let result = trees.transaction(|(rollouts, events, plans, baselines, claims)| {
            let found = match rollouts.get(id.as_bytes())? {
                Some(bytes) => records::decode::<StoredRollout>("rollouts", &bytes)
                    .map(|r| r.rollout.last_seq)
                    .map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            };
            if found + 1 != seq {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                    id: id.clone(),
                    expected: seq,
                    found,
                }));
            }
            rollouts.insert(id.as_bytes(), rollout_bytes.as_slice())?;
            events.insert(event_key.as_slice(), event_bytes.as_slice())?;
            if let Some((key, bytes)) = &plan_entry {
                plans.insert(key.as_slice(), bytes.as_slice())?;
            }
            if let Some(bytes) = &baseline_bytes {
                baselines.insert(id.as_bytes(), bytes.as_slice())?;
            }
            if let Some(bytes) = &claim_bytes {
                claims.insert(id.as_bytes(), bytes.as_slice())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(err)) => return Err(err),
            Err(TransactionError::Storage(err)) => return Err(self.db_error(err)),
        }
        if let Some(claims) = attached.claims {
            self.claims_written(&id, claims);
        }
        crate::crash::point("commit.unflushed");
        if !crate::crash::mutation("skip-flush") {
            self.flush()?;
        }
        crate::crash::point("commit.after");
        drop(committing);
        // The head, outside the store: a log kept elsewhere can later show a rewrite.
        tracing::info!(store = %self.id, rollout = %id, seq, hash = %event.hash, "chain head");
        if attached.plan.is_some() || attached.record.is_some() {
            self.write_kit(&id, event.recorded_at);
        }
        Ok(event)
    }

    /// The chain head of rollout `id` as it was at event `seq`.
    pub fn head_at(&self, id: &str, seq: u64) -> Result<ChainHead, StoreError> {
        let key = format!("events/{id}/{seq}");
        let bytes = self
            .events
            .get(records::event_key(id, seq))
            .map_err(|e| self.db_error(e))?
            .ok_or_else(|| StoreError::Corrupt {
                key: key.clone(),
                message: "the event is missing".into(),
            })?;
        let event = records::decode_event(&key, &bytes)?;
        Ok(ChainHead {
            store: self.id.clone(),
            rollout: id.to_string(),
            seq,
            hash: event.record.hash,
        })
    }

    /// The chain head of every rollout.
    pub fn heads(&self) -> Result<Vec<ChainHead>, StoreError> {
        Ok(self
            .rollouts()?
            .iter()
            .map(|stored| self.head_of(stored))
            .collect())
    }

    /// Checks the audit trail of a rollout: contiguous sequence numbers from 1 and an unbroken
    /// hash chain ending at the rollout's recorded head. Returns the number of events checked.
    pub fn verify(&self, id: &str) -> Result<Result<u64, String>, StoreError> {
        let head = self.rollout(id)?;
        let events = match self.stored_events(id) {
            Ok(events) => events,
            Err(StoreError::Corrupt { key, message }) => {
                return Ok(Err(format!("{key} cannot be read: {message}")));
            }
            Err(err) => return Err(err),
        };
        Ok(records::verify_chain(&events, &head))
    }
}

/// Opens sled, waiting briefly if its own lock is still held. We hold `store.lock`, so no other
/// phasegate process can have the database open: a held sled lock is a handle of this process
/// still closing (sled releases its file lock only when its background threads let go, which
/// happens just after `create_database` drops its handle).
fn open_database(dir: &Path, db_dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match sled_config(db_dir).open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(map_sled(dir, e)),
        }
    }
}

fn is_lock_error(err: &sled::Error) -> bool {
    err.to_string().contains("could not acquire lock")
}

fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(Some(500))
}

/// Builds a fresh database beside its final place and renames it in, so a kill during creation
/// leaves either nothing or a complete database (sled writes its `conf` in place on creation).
fn create_database(dir: &Path, db_dir: &Path) -> Result<(), StoreError> {
    let creating = dir.join("sled.creating");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    if creating.exists() {
        tracing::warn!(dir = %creating.display(), "removing a half-created store left by an interrupted start");
        fs::remove_dir_all(&creating).map_err(io(&creating))?;
    }
    {
        let db = sled_config(&creating)
            .open()
            .map_err(|e| map_sled(dir, e))?;
        db.flush().map_err(|e| map_sled(dir, e))?;
    }
    sync_dir(&creating)?;
    fs::rename(&creating, db_dir).map_err(io(db_dir))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// sled 0.34.7 mistakes a half-written `snap.<lsn>.generating` for a snapshot and then refuses
/// to open forever. Such a file only becomes a snapshot after it is synced and renamed, so a
/// leftover one is always garbage.
fn remove_unfinished_snapshots(db_dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(db_dir).map_err(|source| StoreError::Io {
        path: db_dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing an unfinished sled snapshot");
            fs::remove_file(entry.path()).map_err(|source| StoreError::Io {
                path: entry.path(),
                source,
            })?;
        }
    }
    Ok(())
}

fn map_sled(store: &Path, err: sled::Error) -> StoreError {
    if let sled::Error::Corruption { .. } = err {
        return StoreError::Database {
            path: store.to_path_buf(),
            message: format!(
                "the database is damaged and cannot be read. Nothing was changed. To get the tenant back, restore from an export or the recovery kits in {}: see docs/operations.md, \"A damaged store\"",
                store.join("recovery").display()
            ),
        };
    }
    let message = err.to_string();
    if is_lock_error(&err) {
        return StoreError::InUse {
            store: store.to_path_buf(),
            holder: String::new(),
        };
    }
    StoreError::Database {
        path: store.to_path_buf(),
        message,
    }
}

pub(crate) fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    records::encode(value)
}

pub(crate) fn decode_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    records::decode(key, bytes)
}

/// Below this many records a second thread costs more than it saves.
const GLANCES_PER_THREAD: usize = 512;

/// One listed record at a glance (a record the glance cannot read is decoded whole, which says
/// what is wrong with it).
fn glance((key, bytes): &(sled::IVec, sled::IVec)) -> Result<Glanced, StoreError> {
    #[derive(serde::Deserialize)]
    struct Data {
        rollout: RolloutGlance,
    }
    let key = format!("rollouts/{}", String::from_utf8_lossy(key));
    let glance = match records::decode::<Data>(&key, bytes) {
        Ok(data) => data.rollout,
        Err(_) => {
            let stored: StoredRollout = records::decode(&key, bytes)?;
            RolloutGlance::from(&stored.rollout)
        }
    };
    Ok(Glanced {
        glance,
        key,
        bytes: bytes.clone(),
    })
}

/// A rollout listed by [`Store::glances`]: its glance, and its record as stored.
pub struct Glanced {
    pub glance: RolloutGlance,
    key: String,
    bytes: sled::IVec,
}

impl Glanced {
    /// The whole record.
    pub fn decode(&self) -> Result<StoredRollout, StoreError> {
        records::decode(&self.key, &self.bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests;
