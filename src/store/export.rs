//! Exports: a store's content outside its database, for an auditor to keep and for getting a
//! tenant back when the database is damaged.
//!
//! One JSON document serves both. A full export ([`Store::export`]) holds every tree byte for
//! byte (so [`import`] rebuilds the store, and its hash chains verify), the chain head of every
//! rollout, and per rollout its plan and the provider's record (the baseline and what phasegate
//! last made of the tenant), readable without phasegate. A recovery kit ([`Store::write_kit`],
//! `recovery/<rollout>.json` beside the database, rewritten after every commit that changes the
//! plan or the provider's record) is the same document for one rollout, without trees.
//!
//! `digest` is SHA-256 of the document with `digest` empty, compact: it catches damage to the
//! file, not a forger (anyone can recompute it). What makes an export evidence is that someone
//! other than the store's operator keeps a copy: [`Store::check_heads`] finds any rewrite of
//! history up to the heads it holds.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::records::{self, PlanRecord, StoredRollout};
use super::{FORMAT_VERSION, Store, StoreError};
use crate::domain::time::Timestamp;

/// The version of the export document.
pub const EXPORT_VERSION: u32 = 1;

/// Where one rollout's trail ended: the sequence number and hash of its newest event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub store: String,
    pub rollout: String,
    pub seq: u64,
    pub hash: String,
}

/// What getting a rollout's tenant back needs: its plan and the provider's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutBackup {
    pub id: String,
    pub stored: StoredRollout,
    /// The plan the rollout runs now (the provider it names is the one to restore through).
    pub plan: PlanRecord,
    /// The provider's record: the baseline and what it last made; none before the baseline was
    /// captured (phasegate changed nothing yet).
    pub record: Option<serde_json::Value>,
}

/// One key and value of a tree, byte for byte (the value as text when it is UTF-8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub phasegate_export: u32,
    pub store: String,
    /// The store format the trees are in.
    pub format: u32,
    pub exported_at: String,
    /// Every tree of the database (empty in a recovery kit).
    pub trees: BTreeMap<String, Vec<Entry>>,
    pub heads: Vec<ChainHead>,
    pub rollouts: Vec<RolloutBackup>,
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Export {
    fn digest_of(&self) -> String {
        let unsealed = Export {
            digest: String::new(),
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unsealed).expect("exports always serialize");
        hex::encode(Sha256::digest(&bytes))
    }

    fn sealed(mut self) -> Export {
        self.digest = self.digest_of();
        self
    }

    /// Reads and checks an export (or a recovery kit) written by [`Export::write`].
    pub fn read(path: &Path) -> Result<Export, ExportError> {
        let unreadable = |message: String| ExportError::Unreadable {
            path: path.to_path_buf(),
            message,
        };
        let text = fs::read(path).map_err(|e| unreadable(format!("cannot read: {e}")))?;
        Export::from_json(&text).map_err(unreadable)
    }

    /// Checks an export's bytes (a file's, or a daemon's answer): its version and its digest.
    pub fn from_json(bytes: &[u8]) -> Result<Export, String> {
        let export: Export =
            serde_json::from_slice(bytes).map_err(|e| format!("not a phasegate export: {e}"))?;
        if export.phasegate_export != EXPORT_VERSION {
            return Err(format!(
                "export version {} is not readable by this phasegate (version {EXPORT_VERSION})",
                export.phasegate_export
            ));
        }
        if export.digest != export.digest_of() {
            return Err(
                "its digest does not match its content: the file was damaged or edited".into(),
            );
        }
        Ok(export)
    }

    /// Writes the export durably: beside its final name, synced, renamed into place; readable by
    /// its owner only (it holds the plans and the tenant's recorded configuration).
    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let partial = path.with_extension("partial");
        let bytes = serde_json::to_vec_pretty(self).expect("exports always serialize");
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&partial).map_err(io(&partial))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io(&partial))?;
        fs::rename(&partial, path).map_err(io(path))
    }

    pub fn rollout(&self, id: &str) -> Option<&RolloutBackup> {
        self.rollouts.iter().find(|r| r.id == id)
    }
}

impl Store {
    /// A consistent snapshot of the whole store: this process holds the store, and no commit
    /// runs while it is read (a daemon's commits wait for it). Provider journals are copied as
    /// they are at that moment; each entry of theirs stands on its own.
    pub fn export(&self, at: Timestamp) -> Result<Export, StoreError> {
        let _quiet = self
            .commits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut trees = BTreeMap::new();
        for name in self.backend.tree_names()? {
            if name == "meta" {
                continue;
            }
            let entries = self
                .backend
                .scan(&name, b"")?
                .iter()
                .map(|(key, value)| entry_of(key, value))
                .collect();
            trees.insert(name, entries);
        }
        let mut heads = Vec::new();
        let mut rollouts = Vec::new();
        for stored in self.rollouts()? {
            heads.push(self.head_of(&stored));
            rollouts.push(self.backup_of(stored)?);
        }
        Ok(Export {
            phasegate_export: EXPORT_VERSION,
            store: self.id.clone(),
            format: FORMAT_VERSION,
            exported_at: at.rfc3339(),
            trees,
            heads,
            rollouts,
            digest: String::new(),
        }
        .sealed())
    }

    pub(super) fn head_of(&self, stored: &StoredRollout) -> ChainHead {
        ChainHead {
            store: self.id.clone(),
            rollout: stored.rollout.id.clone(),
            seq: stored.rollout.last_seq,
            hash: stored.last_hash.clone(),
        }
    }

    fn backup_of(&self, stored: StoredRollout) -> Result<RolloutBackup, StoreError> {
        let id = stored.rollout.id.clone();
        Ok(RolloutBackup {
            plan: self.plan(&id, &stored.rollout.plan_hash)?,
            record: self.record(&id)?,
            id,
            stored,
        })
    }

    /// Where the recovery kit of `id` is kept.
    pub fn kit_path(&self, id: &str) -> PathBuf {
        super::local_dir(&self.path)
            .join("recovery")
            .join(format!("{id}.json"))
    }

    /// Rewrites the recovery kit of `id`. The commit it follows is durable already: a kit that
    /// cannot be written is a warning, and a kit one commit old is safe to restore from (the
    /// provider stops at anything that differs from what its record says it made).
    pub fn write_kit(&self, id: &str, at: Timestamp) {
        let kit = self.rollout(id).and_then(|stored| {
            let head = self.head_of(&stored);
            let backup = self.backup_of(stored)?;
            let kit = Export {
                phasegate_export: EXPORT_VERSION,
                store: self.id.clone(),
                format: FORMAT_VERSION,
                exported_at: at.rfc3339(),
                trees: BTreeMap::new(),
                heads: vec![head],
                rollouts: vec![backup],
                digest: String::new(),
            }
            .sealed();
            let path = self.kit_path(id);
            if let Some(dir) = path.parent() {
                super::ensure_dir(dir)?;
            }
            kit.write(&path)
        });
        if let Err(err) = kit {
            tracing::warn!(rollout = %id, error = %err, "the rollout's recovery kit was not written");
        }
    }

    /// Checks this store against chain heads kept outside it: each rollout's trail must verify
    /// and still hold the event a head names, with the same hash. One line per divergence.
    pub fn check_heads(&self, heads: &[ChainHead]) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        for head in heads {
            if head.store != self.id {
                found.push(format!(
                    "{}: the head is of store {}, this store is {}",
                    head.rollout, head.store, self.id
                ));
                continue;
            }
            let events = match self.rollout(&head.rollout) {
                Ok(stored) => match self.stored_events(&head.rollout) {
                    Ok(events) => match records::verify_chain(&events, &stored) {
                        Ok(_) => events,
                        Err(e) => {
                            found.push(format!("{}: audit trail is broken: {e}", head.rollout));
                            continue;
                        }
                    },
                    Err(StoreError::Corrupt { key, message }) => {
                        found.push(format!("{}: {key} cannot be read: {message}", head.rollout));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Err(StoreError::NotFound(_)) => {
                    found.push(format!(
                        "{}: missing from the store (it had {} events)",
                        head.rollout, head.seq
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let at = usize::try_from(head.seq)
                .ok()
                .and_then(|n| n.checked_sub(1));
            match at.and_then(|i| events.get(i)) {
                None => found.push(format!(
                    "{}: the trail has {} events, the head names event {}: history was cut",
                    head.rollout,
                    events.len(),
                    head.seq
                )),
                Some(event) if event.record.hash != head.hash => found.push(format!(
                    "{}: event {} has hash {} in the store, {} in the head: history was rewritten",
                    head.rollout, head.seq, event.record.hash, head.hash
                )),
                Some(_) => {}
            }
        }
        Ok(found)
    }
}

fn entry_of(key: &[u8], value: &[u8]) -> Entry {
    match std::str::from_utf8(value) {
        Ok(text) => Entry {
            key: hex::encode(key),
            text: Some(text.to_string()),
            hex: None,
        },
        Err(_) => Entry {
            key: hex::encode(key),
            text: None,
            hex: Some(hex::encode(value)),
        },
    }
}

fn bytes_of(entry: &Entry) -> Option<(Vec<u8>, Vec<u8>)> {
    let key = hex::decode(&entry.key).ok()?;
    let value = match (&entry.text, &entry.hex) {
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(hex)) => hex::decode(hex).ok()?,
        _ => return None,
    };
    Some((key, value))
}

/// Rebuilds a store in `dir` from a full export: its trees byte for byte, its identity and
/// format. `dir` must hold no store (move a damaged one aside first). Built in
/// `sled.importing` and renamed into place, so an interrupted import leaves no store.
pub fn import(dir: &Path, export: &Export) -> Result<(), ExportError> {
    let refuse = |message: String| ExportError::Unreadable {
        path: dir.to_path_buf(),
        message,
    };
    if export.trees.is_empty() {
        return Err(refuse(
            "the file is a recovery kit, not a full export: it restores a tenant (`restore-tenant`), not a store".into(),
        ));
    }
    if let Some(url) = super::postgres_url(dir) {
        let mut trees = Vec::new();
        for (name, entries) in &export.trees {
            let mut rows = Vec::new();
            for entry in entries {
                rows.push(
                    bytes_of(entry).ok_or_else(|| {
                        refuse(format!("an entry of tree {name} is not readable"))
                    })?,
                );
            }
            trees.push((name.clone(), rows));
        }
        trees.push((
            "meta".into(),
            vec![
                (b"store_id".to_vec(), export.store.as_bytes().to_vec()),
                (b"format".to_vec(), export.format.to_be_bytes().to_vec()),
            ],
        ));
        return super::postgres::PgBackend::open(url)?
            .load(trees)
            .map_err(ExportError::from);
    }
    if dir.join("sled").exists() || super::identity::read(dir)?.is_some() {
        return Err(refuse(
            "a store is already here: move it aside (or choose another --store) first".into(),
        ));
    }
    super::ensure_dir(dir)?;
    let _lock = super::lock::acquire(
        &super::lock::lock_path(dir, "store.lock"),
        dir,
        super::DEFAULT_LOCK_WAIT,
    )?;
    let building = dir.join("sled.importing");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    if building.exists() {
        fs::remove_dir_all(&building).map_err(io(&building))?;
    }
    {
        let db = super::sled::sled_config(&building)
            .open()
            .map_err(|e| super::sled::map_sled(dir, e))?;
        let fail = |e| ExportError::from(super::sled::map_sled(dir, e));
        for (name, entries) in &export.trees {
            let tree = db.open_tree(name).map_err(fail)?;
            for entry in entries {
                let (key, value) = bytes_of(entry)
                    .ok_or_else(|| refuse(format!("an entry of tree {name} is not readable")))?;
                tree.insert(key, value).map_err(fail)?;
            }
        }
        let meta = db.open_tree("meta").map_err(fail)?;
        meta.insert(b"store_id", export.store.as_bytes())
            .map_err(fail)?;
        meta.insert(b"format", &export.format.to_be_bytes())
            .map_err(fail)?;
        db.flush().map_err(fail)?;
    }
    super::sync_dir(&building)?;
    fs::rename(&building, dir.join("sled")).map_err(io(&dir.join("sled")))?;
    super::sync_dir(dir)?;
    super::identity::write(dir, &export.store)?;
    Ok(())
}
