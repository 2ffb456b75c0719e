//! The durable store: rollouts, their append-only audit trail, plans and baselines.
//!
//! [`Store`] is the one interface; what keeps the bytes is a backend: sled in a directory
//! (`sled.rs`, the default) or a PostgreSQL database (`postgres.rs`, selected by a
//! `postgres://` location). Both keep the same named trees of keys and values, byte for byte.
//!
//! One transition is one transaction over the `rollouts`, `events`, `plans`, `baselines` and
//! `claims` trees, conditional on the rollout still being at the event it was computed from,
//! and durable before `commit` returns; the engine runs effects only after that. Every value
//! carries a format version, and every event carries the hash of the one before it, so the trail
//! is tamper-evident.
//!
//! Providers keep their own durable state in trees of their own ([`KvTree`]).
//!
//! Two locks keep processes apart on sled: `store.lock` is held while the store is open (short
//! commands wait for it briefly), `driver.lock` is held by `run` for its whole life so that only
//! one process ever drives rollouts. On PostgreSQL there is no store lock (the database
//! serialises commits): `serve` replicas share the rollouts through leases, and every commit of a
//! replica is fenced by the epoch of its lease of the rollout ([`Store::acquire_lease`],
//! [`StoreError::Fenced`]); `run` takes an advisory lock of the database against a second `run`.

mod export;
mod identity;
mod lock;
mod postgres;
mod records;
mod sled;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

pub use export::{ChainHead, Export, ExportError, RolloutBackup, import};
pub use lock::FileLock;
pub use postgres::{SCHEMA_VERSION, is_url as is_postgres, redacted as redacted_url};
pub use records::{EventRecord, PlanRecord, StoredEvent, StoredRollout};

/// A value as a backend hands it back (cheap to clone).
pub type Bytes = ::sled::IVec;

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
    /// The database could not be reached (refused, closed, ended the session): passing, the
    /// same request may be sent again; a commit it carried is conditional on the rollout's
    /// sequence, so sent again it is either made once or refused as a conflict.
    #[error("store {}: the database is not reachable now ({message}); try again", path.display())]
    Unavailable { path: PathBuf, message: String },
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
    /// A commit refused because the committer does not hold the rollout's lease at its epoch
    /// (PostgreSQL): another replica owns it now, or (without a lease) one does.
    #[error(
        "rollout `{id}` is owned by another replica (its lease is at fencing epoch {epoch}): nothing was committed"
    )]
    Fenced { id: String, epoch: u64 },
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

/// A write conditional on a replica still holding a rollout's lease at an epoch (PostgreSQL), as
/// a commit is: what a provider whose backend lives in the store (the simulated tenant) writes
/// under, so that a replica that lost the lease writes nothing there either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFence {
    pub rollout: String,
    pub replica: String,
    pub epoch: u64,
}

/// A rollout's lease as the database has it (see [`Store::leases`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    pub rollout: String,
    /// The replica holding (or last holding) it.
    pub owner: String,
    pub epoch: u64,
    /// How long it still runs on the database's clock; zero or less: expired.
    pub remaining_ms: i64,
}

/// The bounds of a lease's length and its renewal interval.
pub const LEASE_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// An open store. Cheap to share by reference; dropping it releases the store lock.
pub struct Store {
    /// The store's directory, or its PostgreSQL URL without the password.
    path: PathBuf,
    backend: Arc<Backend>,
    id: String,
    /// The `claims` tree inverted, built on the first [`Store::claimant`] question.
    claim_index: Mutex<Option<ClaimIndex>>,
    /// Commits hold it shared; an export holds it alone, so that its snapshot of rollouts,
    /// trails, plans and baselines is one moment's even while a daemon commits.
    commits: RwLock<()>,
    /// On PostgreSQL, this process's replica name and the epoch of each lease it holds: what
    /// its commits are fenced by.
    leases: Mutex<Leases>,
    _lock: Option<FileLock>,
}

#[derive(Default)]
struct Leases {
    replica: Option<String>,
    held: HashMap<String, u64>,
}

/// What keeps a store's trees.
pub(crate) enum Backend {
    Sled(sled::SledBackend),
    Postgres(postgres::PgBackend),
}

macro_rules! each {
    ($backend:expr, $b:ident => $call:expr) => {
        match $backend {
            Backend::Sled($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

impl Backend {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        each!(self, b => b.get(tree, key))
    }
    fn contains(&self, tree: &str, key: &[u8]) -> Result<bool, StoreError> {
        each!(self, b => b.contains(tree, key))
    }
    fn insert(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        each!(self, b => b.insert(tree, key, value))
    }
    fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        each!(self, b => b.remove(tree, key))
    }
    fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        each!(self, b => b.scan(tree, prefix))
    }
    fn apply(&self, tree: &str, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        each!(self, b => b.apply(tree, ops))
    }
    fn swap(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        fence: Option<&WriteFence>,
    ) -> Result<bool, StoreError> {
        match self {
            // One process holds a sled store: no lease to check.
            Backend::Sled(b) => b.swap(tree, key, expected, value),
            Backend::Postgres(b) => b.swap(tree, key, expected, value, fence),
        }
    }
    fn flush(&self) -> Result<(), StoreError> {
        each!(self, b => b.flush())
    }
    fn commit(&self, write: &CommitWrite) -> Result<(), StoreError> {
        each!(self, b => b.commit(write))
    }
    fn tree_names(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Backend::Sled(b) => Ok(b.tree_names()),
            Backend::Postgres(b) => b.tree_names(),
        }
    }
    fn unique(&self) -> u64 {
        each!(self, b => b.unique())
    }
}

/// Everything one transition writes, encoded: the rollout moves from event `seq - 1` to `seq`.
/// A backend writes all of it in one transaction, or nothing if the rollout is no longer at
/// `seq - 1` ([`StoreError::Conflict`]) or, on PostgreSQL, if the committer's fence (its
/// replica's name and the epoch of its lease of the rollout; none: no replica may hold a live
/// lease) no longer holds ([`StoreError::Fenced`]).
pub(crate) struct CommitWrite {
    pub fence: Option<(String, u64)>,
    pub id: String,
    pub seq: u64,
    pub rollout: Vec<u8>,
    pub event_key: Vec<u8>,
    pub event: Vec<u8>,
    pub plan: Option<(Vec<u8>, Vec<u8>)>,
    pub baseline: Option<Vec<u8>>,
    pub claims: Option<Vec<u8>>,
}

/// A tree of the store for a provider's own durable state: keys and values of bytes, on whichever
/// backend the store is. A write is durable once [`KvTree::flush`] returns (on PostgreSQL, once
/// the write returns).
#[derive(Clone)]
pub struct KvTree {
    backend: Arc<Backend>,
    name: String,
}

impl KvTree {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, StoreError> {
        self.backend.get(&self.name, key.as_ref())
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StoreError> {
        self.backend
            .insert(&self.name, key.as_ref(), value.as_ref())
    }

    /// Removes a key; returns what it held.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, StoreError> {
        self.backend.remove(&self.name, key.as_ref())
    }

    /// Every key starting with `prefix` and its value, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.backend.scan(&self.name, prefix.as_ref())
    }

    /// Writes (`Some`) and removes (`None`) keys atomically: all or none.
    pub fn apply_batch(&self, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        self.backend.apply(&self.name, ops)
    }

    /// Writes `value` at `key` only if the key still holds `expected` (`None`: no value), in one
    /// atomic step; `false` if it holds something else (nothing was written). For state that two
    /// processes may update at once: read, change, and write back only over what was read.
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<bool, StoreError> {
        self.backend
            .swap(&self.name, key.as_ref(), expected, value.as_ref(), None)
    }

    /// [`KvTree::compare_and_swap`], and on PostgreSQL only while `fence` holds (the replica
    /// still holds the rollout's lease at that epoch), in the same statement.
    pub fn compare_and_swap_fenced(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        value: impl AsRef<[u8]>,
        fence: Option<&WriteFence>,
    ) -> Result<bool, StoreError> {
        self.backend
            .swap(&self.name, key.as_ref(), expected, value.as_ref(), fence)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }
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

/// The lock held by the one process that drives a store's rollouts.
pub enum DriverLock {
    File(FileLock),
    Postgres(postgres::DriverLock),
}

/// Takes the driver lock of the store at `location` without waiting: only one `run` at a time.
/// On sled, `driver.lock` in its directory; on PostgreSQL, an advisory lock of the database.
pub fn lock_driver(location: &Path) -> Result<DriverLock, StoreError> {
    if let Some(url) = postgres_url(location) {
        return postgres::lock_driver(url).map(DriverLock::Postgres);
    }
    ensure_dir(location)?;
    lock::acquire(
        &lock::lock_path(location, "driver.lock"),
        location,
        Duration::ZERO,
    )
    .map(DriverLock::File)
}

/// The PostgreSQL URL a store location is, if it is one.
fn postgres_url(location: &Path) -> Option<&str> {
    postgres::is_url(location)
        .then(|| location.to_str())
        .flatten()
}

/// Where files of a store live on this machine (the daemon file, recovery kits): its directory
/// on sled; for a PostgreSQL store, a directory of its own under the user's data directory, named
/// after the URL (without its password).
pub fn local_dir(location: &Path) -> PathBuf {
    match postgres_url(location) {
        None => location.to_path_buf(),
        Some(url) => {
            let name = hex::encode(&sha2::Sha256::digest(postgres::redacted(url).as_bytes())[..8]);
            dirs::data_dir()
                .unwrap_or_else(|| PathBuf::from(".phasegate"))
                .join("phasegate")
                .join(format!("postgres-{name}"))
        }
    }
}

/// How a store location is shown: a PostgreSQL URL without its password.
pub fn display_location(location: &Path) -> String {
    match postgres_url(location) {
        Some(url) => postgres::redacted(url),
        None => location.display().to_string(),
    }
}

fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

impl Store {
    /// Opens (creating if needed) the store at `location`: a directory (sled), waiting up to
    /// `wait` for its lock, or a `postgres://` URL.
    ///
    /// On sled the store's identity is kept twice: in the database and in `store.id` beside it.
    /// A database whose identity differs from the file's was swapped in; a missing database where
    /// the file says there was one was deleted or moved. Both are errors: phasegate never
    /// carries on with another store's trail, nor with a fresh, empty one. On PostgreSQL the
    /// identity is kept in the database.
    pub fn open(location: &Path, wait: Duration) -> Result<Store, StoreError> {
        if let Some(url) = postgres_url(location) {
            let backend = postgres::PgBackend::open(url)?;
            let mut store = Store {
                path: backend.path().to_path_buf(),
                backend: Arc::new(Backend::Postgres(backend)),
                id: String::new(),
                claim_index: Mutex::new(None),
                commits: RwLock::new(()),
                leases: Mutex::new(Leases::default()),
                _lock: None,
            };
            store.id = store.identity(None, false)?;
            store.check_format()?;
            return Ok(store);
        }
        let dir = location;
        ensure_dir(dir)?;
        let lock = lock::acquire(&lock::lock_path(dir, "store.lock"), dir, wait)?;
        crate::crash::point("store.locked");
        let marker = identity::read(dir)?;
        if !dir.join("sled").exists()
            && let Some(id) = marker
        {
            return Err(StoreError::Missing {
                path: dir.to_path_buf(),
                id,
            });
        }
        let backend = sled::SledBackend::open(dir)?;
        let mut store = Store {
            backend: Arc::new(Backend::Sled(backend)),
            id: String::new(),
            claim_index: Mutex::new(None),
            commits: RwLock::new(()),
            leases: Mutex::new(Leases::default()),
            path: dir.to_path_buf(),
            _lock: Some(lock),
        };
        store.id = store.identity(marker, true)?;
        store.check_format()?;
        crate::crash::point("store.opened");
        Ok(store)
    }

    /// Whether the store is in a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(*self.backend, Backend::Postgres(_))
    }

    /// This store's identity: made once, when the store is first opened, and never changed.
    /// Providers name it in what they leave in a tenant, so rollouts of different stores can
    /// tell each other apart; notification keys and chain heads carry it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The database's identity, checked against `store.id` (`marker`) when the store has the
    /// file (`with_file`): made and written to both on first opening. A store from before
    /// `store.id` existed gets the file now.
    fn identity(&self, marker: Option<String>, with_file: bool) -> Result<String, StoreError> {
        let inner = self
            .backend
            .get("meta", b"store_id")?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        match (inner, marker) {
            (Some(inner), Some(marker)) if inner == marker => Ok(inner),
            (found, Some(expected)) => Err(StoreError::Replaced {
                path: self.path.clone(),
                expected,
                found: found.unwrap_or_else(|| "none: a new, empty database".into()),
            }),
            (Some(inner), None) => {
                if with_file {
                    identity::write(&self.path, &inner)?;
                }
                Ok(inner)
            }
            (None, None) => {
                let seed = format!(
                    "{}:{}:{:?}:{}",
                    std::process::id(),
                    self.path.display(),
                    std::time::SystemTime::now(),
                    self.backend.unique()
                );
                let id = hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..8]);
                self.backend.insert("meta", b"store_id", id.as_bytes())?;
                self.flush()?;
                if with_file {
                    identity::write(&self.path, &id)?;
                }
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
        for (key, value) in self.backend.scan("claims", b"")? {
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
        self.backend
            .insert("tokens", token.hash.as_bytes(), &records::encode(token))?;
        self.flush()
    }

    /// The token whose hash this is, if it exists.
    pub fn token(&self, hash: &str) -> Result<Option<crate::identity::TokenRecord>, StoreError> {
        match self.backend.get("tokens", hash.as_bytes())? {
            Some(bytes) => records::decode("tokens", &bytes).map(Some),
            None => Ok(None),
        }
    }

    pub fn tokens(&self) -> Result<Vec<crate::identity::TokenRecord>, StoreError> {
        self.backend
            .scan("tokens", b"")?
            .iter()
            .map(|(_, value)| records::decode("tokens", value))
            .collect()
    }

    /// Records which backend objects a rollout drives (see [`Store::claimant`]).
    pub fn set_claims(&self, id: &str, resources: &[String]) -> Result<(), StoreError> {
        self.backend
            .insert("claims", id.as_bytes(), &records::encode(&resources))?;
        self.claims_written(id, resources);
        Ok(())
    }

    pub fn claims(&self, id: &str) -> Result<Vec<String>, StoreError> {
        match self.backend.get("claims", id.as_bytes())? {
            Some(bytes) => records::decode(&format!("claims/{id}"), &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// The store's directory, or its PostgreSQL URL without the password.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tree for a provider's own durable state (the simulated tenant lives in one).
    pub fn provider_tree(&self, name: &str) -> Result<KvTree, StoreError> {
        Ok(self.tree(&format!("provider:{name}")))
    }

    /// Any tree of the store by name (for copies, exports and tests).
    pub(crate) fn tree(&self, name: &str) -> KvTree {
        KvTree {
            backend: self.backend.clone(),
            name: name.to_string(),
        }
    }

    /// Flushes everything written so far (providers call it after changing their state).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }

    /// Reads the database's format, migrating an older one: a database of a newer phasegate is
    /// refused, and one older than [`OLDEST_READABLE`] too.
    fn check_format(&self) -> Result<(), StoreError> {
        let Some(bytes) = self.backend.get("meta", b"format")? else {
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
        self.backend
            .insert("meta", b"migrated_from", &from.to_be_bytes())?;
        self.set_format(FORMAT_VERSION)
    }

    fn set_format(&self, format: u32) -> Result<(), StoreError> {
        self.backend
            .insert("meta", b"format", &format.to_be_bytes())?;
        self.flush()
    }

    /// The next free id for a rollout of `plan_name`: `<plan_name>-<n>`.
    pub fn next_rollout_id(&self, plan_name: &str) -> Result<String, StoreError> {
        let mut n = 1u64;
        loop {
            let id = format!("{plan_name}-{n}");
            if !self.backend.contains("rollouts", id.as_bytes())? {
                return Ok(id);
            }
            n += 1;
        }
    }

    pub fn rollout(&self, id: &str) -> Result<StoredRollout, StoreError> {
        let bytes = self
            .backend
            .get("rollouts", id.as_bytes())?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        records::decode(&format!("rollouts/{id}"), &bytes)
    }

    pub fn rollouts(&self) -> Result<Vec<StoredRollout>, StoreError> {
        self.backend
            .scan("rollouts", b"")?
            .iter()
            .map(|(key, value)| {
                records::decode(&format!("rollouts/{}", String::from_utf8_lossy(key)), value)
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
        let listed = self.backend.scan("rollouts", b"")?;
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
            .backend
            .get("plans", &key)?
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("plans/{id}/{hash}"),
                message: "the rollout's plan is missing".into(),
            })?;
        records::decode(&format!("plans/{id}"), &bytes)
    }

    /// The provider's record of a rollout: its baseline and what it last made of the backend.
    pub fn record(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(bytes) = self.backend.get("baselines", id.as_bytes())? else {
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
        self.backend
            .scan("events", &records::event_prefix(id))?
            .iter()
            .map(|(key, value)| {
                records::decode_event(&format!("events/{id}/{}", records::seq_of(key)), value)
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
        if self.backend.contains("rollouts", rollout.id.as_bytes())? {
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
        let fence = {
            let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            match (&leases.replica, leases.held.get(&id)) {
                (Some(replica), Some(epoch)) => Some((replica.clone(), *epoch)),
                // A replica commits a rollout's transitions only under a lease it holds; only
                // the first event (the creation, which no lease can cover yet) needs none. A
                // lease it lost (and forgot) stays lost however the lease stands now: without
                // this, a stale actor would commit as an unleased committer once the new
                // owner's lease had lapsed too. No lease is ever at epoch 0: the fence refuses.
                (Some(replica), None) if seq > 1 => Some((replica.clone(), 0)),
                _ => None,
            }
        };
        let write = CommitWrite {
            fence,
            rollout: records::encode(&stored),
            event_key: records::event_key(&id, seq),
            event: event_bytes,
            plan: attached
                .plan
                .map(|p| (records::plan_key(&id, &p.hash), records::encode(p))),
            baseline: attached.record.map(records::encode),
            claims: attached.claims.map(|c| records::encode(&c)),
            id: id.clone(),
            seq,
        };
        let committing = self.commits.read().unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = self.backend.commit(&write) {
            if let StoreError::Fenced { .. } = err {
                crate::metrics::global().fenced(write.fence.is_some());
                if write.fence.is_some() {
                    self.lease_lost(&id);
                }
            }
            return Err(err);
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

    /// Names this process as a replica: its commits are fenced by the leases it takes from now
    /// on (PostgreSQL only).
    pub fn set_replica(&self, replica: &str) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replica = Some(replica.to_string());
    }

    fn postgres(&self) -> Result<&postgres::PgBackend, StoreError> {
        match &*self.backend {
            Backend::Postgres(b) => Ok(b),
            Backend::Sled(_) => Err(StoreError::Database {
                path: self.path.clone(),
                message: "leases are kept only by a PostgreSQL store".into(),
            }),
        }
    }

    fn replica(&self) -> Result<String, StoreError> {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replica
            .clone()
            .ok_or_else(|| StoreError::Database {
                path: self.path.clone(),
                message: "this process is not a replica (no replica name set)".into(),
            })
    }

    /// Takes the lease of rollout `id` for `ttl` (on the database's clock) if it is unowned or
    /// its lease expired, or renews this replica's own: its epoch if this replica holds it now,
    /// `None` if another replica does. This replica's commits of `id` are fenced by it from now on.
    pub fn acquire_lease(&self, id: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let replica = self.replica()?;
        let epoch = self.postgres()?.acquire(id, &replica, ttl)?;
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        match epoch {
            Some(epoch) => leases.held.insert(id.to_string(), epoch),
            None => leases.held.remove(id),
        };
        Ok(epoch)
    }

    /// Renews every lease this replica holds for `ttl`; returns those it no longer holds (taken
    /// by another replica after they expired), which it forgets.
    pub fn renew_leases(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let replica = self.replica()?;
        let held: Vec<(String, u64)> = {
            let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            leases.held.iter().map(|(id, e)| (id.clone(), *e)).collect()
        };
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let kept: BTreeSet<String> = self
            .postgres()?
            .renew(&replica, &held, ttl)?
            .into_iter()
            .collect();
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lost = Vec::new();
        for (id, epoch) in held {
            if !kept.contains(&id) && leases.held.get(&id) == Some(&epoch) {
                leases.held.remove(&id);
                lost.push(id);
            }
        }
        Ok(lost)
    }

    /// Renews this replica's lease of `id` for `ttl` if it still holds it at the epoch it took
    /// it at (nobody took it since, expired or not): what an owner checks right before it acts on
    /// the tenant, so that a replica woken from a pause does not write on the strength of a lease
    /// it lost meanwhile (its commits would be fenced, its writes would not be). `false`: lost,
    /// and forgotten.
    pub fn confirm_lease(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let replica = self.replica()?;
        let epoch = self
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .get(id)
            .copied();
        let Some(epoch) = epoch else {
            return Ok(false);
        };
        let kept = self
            .postgres()?
            .renew(&replica, &[(id.to_string(), epoch)], ttl)?;
        if kept.iter().any(|k| k == id) {
            return Ok(true);
        }
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.held.get(id) == Some(&epoch) {
            leases.held.remove(id);
        }
        Ok(false)
    }

    /// Gives up this replica's lease of `id` (a clean stop): another replica may take it at once.
    pub fn release_lease(&self, id: &str) -> Result<(), StoreError> {
        let replica = self.replica()?;
        let epoch = self
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .remove(id);
        match epoch {
            Some(epoch) => self.postgres()?.release(id, &replica, epoch),
            None => Ok(()),
        }
    }

    fn lease_lost(&self, id: &str) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .remove(id);
    }

    /// The rollouts this replica holds the lease of, with their epochs.
    pub fn held_leases(&self) -> Vec<(String, u64)> {
        let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held: Vec<_> = leases.held.iter().map(|(id, e)| (id.clone(), *e)).collect();
        held.sort();
        held
    }

    /// Whether this replica holds the lease of `id`.
    pub fn holds_lease(&self, id: &str) -> bool {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .contains_key(id)
    }

    /// The replica holding a live lease of rollout `id` now (on the database's clock), if any
    /// (PostgreSQL; none on sled).
    pub fn lease_holder(&self, id: &str) -> Result<Option<String>, StoreError> {
        match &*self.backend {
            Backend::Postgres(b) => b.live_owner(id),
            Backend::Sled(_) => Ok(None),
        }
    }

    /// The rollouts whose lease is live now (PostgreSQL; none on sled).
    pub fn live_leases(&self) -> Result<Vec<String>, StoreError> {
        match &*self.backend {
            Backend::Postgres(b) => b.live_leases(),
            Backend::Sled(_) => Ok(Vec::new()),
        }
    }

    /// Every rollout's id with the event its record is at: what tells a reader which records
    /// changed since it last looked, without reading them. On PostgreSQL from the `seq` column
    /// alone; a row without one is listed as `u64::MAX`, to be read every time.
    pub fn rollout_seqs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let listed = match &*self.backend {
            Backend::Postgres(b) => b.rollout_seqs()?,
            Backend::Sled(b) => b
                .scan("rollouts", b"")?
                .into_iter()
                .map(|(key, value)| {
                    let seq = postgres::seq_of_rollout("rollouts", &value);
                    (key, seq)
                })
                .collect(),
        };
        Ok(listed
            .into_iter()
            .map(|(key, seq)| {
                let seq = seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(u64::MAX);
                (String::from_utf8_lossy(&key).into_owned(), seq)
            })
            .collect())
    }

    /// The rollouts `ids` at a glance, as [`Store::glances`] has them (those that exist).
    pub fn glances_of(&self, ids: &[String]) -> Result<Vec<Glanced>, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        let records = match &*self.backend {
            Backend::Postgres(b) => b.rollouts_of(keys)?,
            Backend::Sled(b) => {
                let mut found = Vec::with_capacity(keys.len());
                for key in keys {
                    if let Some(value) = b.get("rollouts", &key)? {
                        found.push((Bytes::from(key), value));
                    }
                }
                found
            }
        };
        records.iter().map(glance).collect()
    }

    /// Every rollout's lease as the database has it (PostgreSQL; none on sled).
    pub fn leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        match &*self.backend {
            Backend::Postgres(b) => b.leases(),
            Backend::Sled(_) => Ok(Vec::new()),
        }
    }

    /// The chain head of rollout `id` as it was at event `seq`.
    pub fn head_at(&self, id: &str, seq: u64) -> Result<ChainHead, StoreError> {
        let key = format!("events/{id}/{seq}");
        let bytes = self
            .backend
            .get("events", &records::event_key(id, seq))?
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

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
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
fn glance((key, bytes): &(Bytes, Bytes)) -> Result<Glanced, StoreError> {
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
    bytes: Bytes,
}

impl Glanced {
    /// The whole record.
    pub fn decode(&self) -> Result<StoredRollout, StoreError> {
        records::decode(&self.key, &self.bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests;
