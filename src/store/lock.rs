//! Advisory file locks that keep two processes apart, with errors that say who holds them.
//!
//! sled takes its own lock, but its error is an opaque I/O message; we take ours first so that a
//! second process gets a clear "store in use" naming the store and the holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs2::FileExt;

use super::StoreError;

/// Held for as long as the value lives; the kernel releases it if the process dies.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Takes the lock at `path`, waiting up to `wait` for another holder to let go.
pub fn acquire(path: &Path, store: &Path, wait: Duration) -> Result<FileLock, StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock_exclusive() {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(StoreError::InUse {
                    store: store.to_path_buf(),
                    holder: holder.trim().to_string(),
                });
            }
        }
    }
    let me = format!(
        "pid {}: {}",
        std::process::id(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.write_all(me.as_bytes());
    Ok(FileLock { _file: file })
}

pub fn lock_path(store: &Path, name: &str) -> PathBuf {
    store.join(name)
}
