//! The embedded backend: the store in a sled database in `<dir>/sled`.
//!
//! Every tree of the store is a sled tree of the same name. One commit is one sled transaction
//! over the `rollouts`, `events`, `plans`, `baselines` and `claims` trees, flushed by the caller
//! before `commit` returns.
//!
//! Opening applies the two start-up mitigations for sled 0.34.7 (see `docs/reliability.md`): a
//! new database is built in `sled.creating` and renamed into place, and leftover
//! `snap.*.generating` files are removed before sled reads its snapshots. A kill at any instant of
//! start-up therefore never leaves a store that cannot be opened.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};

use super::records::{self, StoredRollout};
use super::{Bytes, CommitWrite, StoreError};

pub(crate) struct SledBackend {
    path: PathBuf,
    db: ::sled::Db,
    rollouts: ::sled::Tree,
    events: ::sled::Tree,
    plans: ::sled::Tree,
    baselines: ::sled::Tree,
    claims: ::sled::Tree,
    /// Every other tree, opened on first use.
    others: Mutex<HashMap<String, ::sled::Tree>>,
}

impl SledBackend {
    /// Opens (creating if needed) the database of the store in `dir`. The caller holds
    /// `store.lock` and has checked the identity file (a missing database is made only where
    /// `store.id` does not say there was one).
    pub fn open(dir: &Path) -> Result<SledBackend, StoreError> {
        let db_dir = dir.join("sled");
        if !db_dir.exists() {
            create_database(dir, &db_dir)?;
        }
        remove_unfinished_snapshots(&db_dir)?;
        let db = open_database(dir, &db_dir)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| map_sled(dir, e));
        Ok(SledBackend {
            rollouts: tree("rollouts")?,
            events: tree("events")?,
            plans: tree("plans")?,
            baselines: tree("baselines")?,
            claims: tree("claims")?,
            others: Mutex::new(HashMap::new()),
            path: dir.to_path_buf(),
            db,
        })
    }

    fn error(&self, e: ::sled::Error) -> StoreError {
        map_sled(&self.path, e)
    }

    fn tree(&self, name: &str) -> Result<::sled::Tree, StoreError> {
        match name {
            "rollouts" => return Ok(self.rollouts.clone()),
            "events" => return Ok(self.events.clone()),
            "plans" => return Ok(self.plans.clone()),
            "baselines" => return Ok(self.baselines.clone()),
            "claims" => return Ok(self.claims.clone()),
            _ => {}
        }
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tree) = others.get(name) {
            return Ok(tree.clone());
        }
        let tree = self.db.open_tree(name).map_err(|e| self.error(e))?;
        others.insert(name.to_string(), tree.clone());
        Ok(tree)
    }

    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        self.tree(tree)?.get(key).map_err(|e| self.error(e))
    }

    pub fn contains(&self, tree: &str, key: &[u8]) -> Result<bool, StoreError> {
        self.tree(tree)?
            .contains_key(key)
            .map_err(|e| self.error(e))
    }

    pub fn insert(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?
            .insert(key, value)
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    pub fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        self.tree(tree)?.remove(key).map_err(|e| self.error(e))
    }

    pub fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|entry| entry.map_err(|e| self.error(e)))
            .collect()
    }

    pub fn swap(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        self.tree(tree)?
            .compare_and_swap(key, expected, Some(value))
            .map(|swapped| swapped.is_ok())
            .map_err(|e| self.error(e))
    }

    pub fn apply(&self, tree: &str, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for (key, value) in ops {
            match value {
                Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                None => batch.remove(key.as_slice()),
            }
        }
        self.tree(tree)?
            .apply_batch(batch)
            .map_err(|e| self.error(e))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.error(e))
    }

    pub fn tree_names(&self) -> Vec<String> {
        self.db
            .tree_names()
            .into_iter()
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .filter(|name| !name.starts_with("__sled__"))
            .collect()
    }

    /// One sled transaction: the rollout moves from event `seq - 1` to `seq` only if the store
    /// is still at `seq - 1`.
    pub fn commit(&self, write: &CommitWrite) -> Result<(), StoreError> {
        let trees = (
            &self.rollouts,
            &self.events,
            &self.plans,
            &self.baselines,
            &self.claims,
        );
        let id = write.id.as_str();
        let result = trees.transaction(|(rollouts, events, plans, baselines, claims)| {
            let found = match rollouts.get(id.as_bytes())? {
                Some(bytes) => records::decode::<StoredRollout>("rollouts", &bytes)
                    .map(|r| r.rollout.last_seq)
                    .map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            };
            if found + 1 != write.seq {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                    id: id.to_string(),
                    expected: write.seq,
                    found,
                }));
            }
            rollouts.insert(id.as_bytes(), write.rollout.as_slice())?;
            events.insert(write.event_key.as_slice(), write.event.as_slice())?;
            if let Some((key, bytes)) = &write.plan {
                plans.insert(key.as_slice(), bytes.as_slice())?;
            }
            if let Some(bytes) = &write.baseline {
                baselines.insert(id.as_bytes(), bytes.as_slice())?;
            }
            if let Some(bytes) = &write.claims {
                claims.insert(id.as_bytes(), bytes.as_slice())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(err)) => Err(err),
            Err(TransactionError::Storage(err)) => Err(self.error(err)),
        }
    }

    /// A number sled has not handed out before (seeds the store's identity).
    pub fn unique(&self) -> u64 {
        self.db.generate_id().unwrap_or(0)
    }
}

/// Opens sled, waiting briefly if its own lock is still held. We hold `store.lock`, so no other
/// phasegate process can have the database open: a held sled lock is a handle of this process
/// still closing (sled releases its file lock only when its background threads let go, which
/// happens just after `create_database` drops its handle).
fn open_database(dir: &Path, db_dir: &Path) -> Result<::sled::Db, StoreError> {
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

fn is_lock_error(err: &::sled::Error) -> bool {
    err.to_string().contains("could not acquire lock")
}

pub(super) fn sled_config(path: &Path) -> ::sled::Config {
    ::sled::Config::new()
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
    super::sync_dir(&creating)?;
    fs::rename(&creating, db_dir).map_err(io(db_dir))?;
    super::sync_dir(dir)
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

pub(super) fn map_sled(store: &Path, err: ::sled::Error) -> StoreError {
    if let ::sled::Error::Corruption { .. } = err {
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
