//! `store.id`: the store's identity beside its database, so that a database swapped for another
//! store's, or deleted, is noticed instead of trusted (the database holds the same identity).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::StoreError;

const FILE: &str = "store.id";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The identity recorded beside the database, if any.
pub fn read(dir: &Path) -> Result<Option<String>, StoreError> {
    let file = path(dir);
    match fs::read_to_string(&file) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(StoreError::Corrupt {
                    key: FILE.into(),
                    message: format!("{} does not hold a store identity", file.display()),
                });
            }
            Ok(Some(id.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&file)(e)),
    }
}

/// Records the identity durably: written beside, synced, renamed into place.
pub fn write(dir: &Path, id: &str) -> Result<(), StoreError> {
    let file = path(dir);
    let partial = dir.join(format!("{FILE}.partial"));
    let mut out = fs::File::create(&partial).map_err(io(&partial))?;
    out.write_all(format!("{id}\n").as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(io(&partial))?;
    fs::rename(&partial, &file).map_err(io(&file))?;
    super::sync_dir(dir)
}
