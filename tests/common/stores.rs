//! The store backend a test runs on, so one test body covers both: `on_both_stores!` turns each
//! test into `name` (sled, the default) and `name::on_postgres` (a database of its own on the
//! test process's PostgreSQL server, [`super::postgres::shared`]). `cargo test NAME` runs both.
//!
//! The backend is chosen per test thread, before the body runs, and every [`super::Phasegate`]
//! the body makes reads it; a test that reads sled's files (`store_dir`) stays sled-only.

use std::cell::Cell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::postgres::{Postgres, shared};

/// Where a test's stores live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Postgres,
}

thread_local! {
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Sled) };
}

/// The backend of the test running on this thread.
pub fn backend() -> Backend {
    BACKEND.with(Cell::get)
}

/// Runs `test` with the stores it makes on `backend`.
pub fn on(backend: Backend, test: impl FnOnce()) {
    BACKEND.with(|b| b.set(backend));
    test();
}

/// One store's location.
pub enum Location {
    /// `store/` in the binary's directory.
    Sled(PathBuf),
    /// A database of its own; the server is kept running while the store is used.
    Postgres { url: String, _server: Arc<Postgres> },
}

impl Location {
    /// A new store of the running test's backend, for a binary whose files are in `dir`.
    pub fn new(dir: &Path) -> Location {
        match backend() {
            Backend::Sled => Location::Sled(dir.join("store")),
            Backend::Postgres => {
                let server = shared();
                Location::Postgres {
                    url: server.database(),
                    _server: server,
                }
            }
        }
    }

    /// The sled directory.
    pub fn dir(&self) -> PathBuf {
        match self {
            Location::Sled(dir) => dir.clone(),
            Location::Postgres { url, .. } => {
                panic!("this test reads sled's files, but its store is {url}: keep it sled-only")
            }
        }
    }

    /// Where the store's local files are (`daemon.json`, the recovery kits): the store's
    /// directory on sled, the account's data directory on PostgreSQL.
    pub fn local_dir(&self) -> PathBuf {
        phasegate::store::local_dir(Path::new(self))
    }
}

impl Location {
    /// The daemon files of processes serving this store on this machine (`daemon.json` on
    /// sled, `daemon-<pid>.json` per replica on PostgreSQL).
    pub fn daemon_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.local_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("daemon") && n.ends_with(".json"))
            })
            .collect()
    }
}

impl Location {
    /// Everything the store holds, as bytes with where each came from: on sled every file of
    /// its directory, on PostgreSQL every row of its schema; on both the store's local files.
    /// For tests that check what must never be stored (a secret, a private key).
    pub fn contents(&self) -> Vec<(String, Vec<u8>)> {
        let mut found = files(&self.local_dir());
        match self {
            Location::Sled(dir) => found.extend(files(dir)),
            Location::Postgres { url, .. } => {
                let mut client = postgres::Client::connect(url, postgres::NoTls)
                    .unwrap_or_else(|err| panic!("connecting to {url}: {err}"));
                let rows = client
                    .query(
                        "SELECT 'entries ' || tree, key || '\\x00'::bytea || value
                             FROM phasegate.entries
                         UNION ALL SELECT 'leases', convert_to(l::text, 'UTF8')
                             FROM phasegate.leases AS l",
                        &[],
                    )
                    .unwrap();
                found.extend(rows.iter().map(|row| (row.get(0), row.get(1))));
            }
        }
        found
    }
}

/// Every file under `dir` (none when it does not exist), with its path.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push((path.display().to_string(), bytes));
        }
    }
    found
}

impl AsRef<OsStr> for Location {
    fn as_ref(&self) -> &OsStr {
        match self {
            Location::Sled(dir) => dir.as_os_str(),
            Location::Postgres { url, .. } => OsStr::new(url),
        }
    }
}

impl Drop for Location {
    /// A PostgreSQL store's local files are left in the account's data directory by the
    /// processes; they go with the test's database.
    fn drop(&mut self) {
        if let Location::Postgres { .. } = self {
            let _ = std::fs::remove_dir_all(self.local_dir());
        }
    }
}

/// Each test function twice: `name` on sled and `name::on_postgres` on PostgreSQL. Attributes
/// (`#[ignore]`, …) apply to both.
#[macro_export]
macro_rules! on_both_stores {
    ($( $(#[$meta:meta])* fn $name:ident() $body:block )*) => {$(
        $(#[$meta])*
        #[test]
        fn $name() {
            common::stores::on(common::stores::Backend::Sled, || $body)
        }

        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            #[test]
            fn on_postgres() {
                common::stores::on(common::stores::Backend::Postgres, || $body)
            }
        }
    )*};
}
