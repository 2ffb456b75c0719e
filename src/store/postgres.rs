//! The PostgreSQL backend: the store in one database, selected by a `postgres://` or
//! `postgresql://` URL (see docs/operations.md, "Running on PostgreSQL").
//!
//! The store's trees are rows of one table, `phasegate.entries (tree, key, value, seq)`, keys and
//! values the same bytes the sled backend writes, so the hash chains, the export and a copy
//! between backends are byte for byte. `seq` is the event a rollout's row is at (null for other
//! trees): it is what a commit is conditional on.
//!
//! One commit is ONE SQL statement (a chain of data-modifying CTEs, one implicit transaction):
//! the rollout's row moves from event `seq - 1` to `seq` only if it is still at `seq - 1`, and
//! the event, plan, baseline and claims are inserted only if it moved. The server has made it
//! durable (WAL flushed, `synchronous_commit`) when the statement returns. A later condition
//! (an owner's fencing epoch) is one more CTE the `moved` row depends on.
//!
//! The `Store` API is synchronous and is called from tokio worker threads. The synchronous
//! `postgres` client runs a runtime of its own and must never be driven from inside another,
//! so each open store has one OS thread that owns its connection and runs the requests sent to
//! it over a channel, one at a time, in order. A broken connection is made again on the next
//! request.
//!
//! Credentials come from the URL or `PGPASSWORD`; the URL is never shown with its password
//! (errors name [`redacted`]). TLS follows libpq's `sslmode` and `sslrootcert` (`tls.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;
use std::thread::JoinHandle;

use ::postgres::{Client, Config, Statement};

use super::{Bytes, CommitWrite, StoreError};

mod tls;

/// The schema this phasegate creates and reads; bump it with a migration in [`migrate`].
pub const SCHEMA_VERSION: i32 = 1;

/// Whether a store location is a PostgreSQL URL.
pub fn is_url(location: &Path) -> bool {
    location
        .to_str()
        .is_some_and(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
}

/// The URL without its password (for messages and logs).
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        // Not a URL the parser reads: show only its scheme.
        Err(_) => url.split("://").next().unwrap_or("postgres").to_string() + "://…",
    }
}

fn config_of(url: &str) -> Result<(Config, tls::Connector), StoreError> {
    let refused = |message: String| StoreError::Database {
        path: PathBuf::from(redacted(url)),
        message,
    };
    let (driver_url, tls) = tls::split(url, |name| std::env::var(name).ok()).map_err(refused)?;
    let connector = tls.connector().map_err(refused)?;
    let mut config = Config::from_str(&driver_url).map_err(|e| StoreError::Database {
        path: PathBuf::from(redacted(url)),
        message: format!("not a PostgreSQL URL the driver reads: {e}"),
    })?;
    config.ssl_mode(tls.driver_mode());
    if config.get_password().is_none()
        && let Ok(password) = std::env::var("PGPASSWORD")
    {
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name("phasegate");
    }
    config.connect_timeout(std::time::Duration::from_secs(10));
    Ok((config, connector))
}

/// What a request gets: the connection, made (again) if needed, and its prepared statements.
pub(crate) struct Conn {
    config: Config,
    tls: tls::Connector,
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, ::postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.statements.clear();
            self.client = Some(self.config.connect(self.tls.clone())?);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }

    /// `sql` prepared once per connection.
    fn prepared(
        &mut self,
        sql: &'static str,
    ) -> Result<(&mut Client, Statement), ::postgres::Error> {
        self.client()?;
        let client = self.client.as_mut().expect("connected just above");
        let statement = match self.statements.get(sql) {
            Some(statement) => statement.clone(),
            None => {
                let statement = client.prepare(sql)?;
                self.statements.insert(sql, statement.clone());
                statement
            }
        };
        Ok((client, statement))
    }
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// A tree's keys and values.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// One OS thread owning one connection, running the requests sent to it in order.
pub(crate) struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Worker {
    /// Connects (so that a wrong URL or password is an error now, not at the first commit).
    pub fn connect(url: &str) -> Result<Worker, StoreError> {
        let (config, tls) = config_of(url)?;
        let path = PathBuf::from(redacted(url));
        let (jobs, receive) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("phasegate-postgres".into())
            .spawn(move || {
                let mut conn = Conn {
                    config,
                    tls,
                    client: None,
                    statements: HashMap::new(),
                };
                for job in receive {
                    job(&mut conn);
                }
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        let worker = Worker {
            jobs: Some(jobs),
            thread: Some(thread),
            path,
        };
        worker.call(|conn| conn.client().map(|_| ()))?;
        Ok(worker)
    }

    /// Runs `job` on the connection's thread and waits for its answer.
    pub fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Conn) -> Result<R, ::postgres::Error> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.call_store(move |conn| job(conn).map_err(Failure::Driver))
    }

    fn call_store<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Conn) -> Result<R, Failure> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (answer, answered) = mpsc::sync_channel(1);
        let gone = || StoreError::Database {
            path: self.path.clone(),
            message: "the connection's thread has stopped".into(),
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(Box::new(move |conn: &mut Conn| {
                let _ = answer.send(job(conn));
            }))
            .map_err(|_| gone())?;
        match answered.recv().map_err(|_| gone())? {
            Ok(value) => Ok(value),
            Err(Failure::Store(err)) => Err(err),
            Err(Failure::Driver(err)) => Err(self.error(&err)),
        }
    }

    fn error(&self, err: &::postgres::Error) -> StoreError {
        // The driver's messages name the server's error and the host, never the password.
        let mut message = match err.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => tls::describe(err),
        };
        if message.contains("TLS") {
            message.push_str(" (see docs/operations.md, \"Running on PostgreSQL\", TLS)");
        }
        StoreError::Database {
            path: self.path.clone(),
            message,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Failure {
    Driver(::postgres::Error),
    Store(StoreError),
}

impl From<::postgres::Error> for Failure {
    fn from(err: ::postgres::Error) -> Failure {
        Failure::Driver(err)
    }
}

/// Serialises schema changes of concurrent openers (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x7068_6173_6567_0001;
/// Held by the one process that drives rollouts (`pg_try_advisory_lock`).
const DRIVER_LOCK: i64 = 0x7068_6173_6567_0002;

/// Creates or brings the schema to [`SCHEMA_VERSION`], in one transaction.
///
/// Version 1: schema `phasegate`, `schema_version (version, applied_at)` and
/// `entries (tree, key, value, seq)` with primary key `(tree, key)`.
fn migrate(conn: &mut Conn, path: PathBuf) -> Result<(), Failure> {
    let client = conn.client()?;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS phasegate;
         CREATE TABLE IF NOT EXISTS phasegate.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )?;
    let found: Option<i32> = tx
        .query_one("SELECT max(version) FROM phasegate.schema_version", &[])?
        .get(0);
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(Failure::Store(StoreError::Database {
            path,
            message: format!(
                "the database's schema is version {found}, written by a newer phasegate (this one reads version {SCHEMA_VERSION})"
            ),
        }));
    }
    if found < 1 {
        tx.batch_execute(
            "CREATE TABLE phasegate.entries (
                 tree text NOT NULL,
                 key bytea NOT NULL,
                 value bytea NOT NULL,
                 seq bigint,
                 PRIMARY KEY (tree, key)
             );
             INSERT INTO phasegate.schema_version (version) VALUES (1);",
        )?;
        tracing::info!(store = %path.display(), version = 1, "created the store's schema");
    }
    tx.commit()?;
    Ok(())
}

const GET: &str = "SELECT value FROM phasegate.entries WHERE tree = $1 AND key = $2";
const PUT: &str = "INSERT INTO phasegate.entries (tree, key, value, seq) VALUES ($1, $2, $3, $4)
     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value, seq = EXCLUDED.seq";
const DELETE: &str = "DELETE FROM phasegate.entries WHERE tree = $1 AND key = $2 RETURNING value";
const SCAN: &str = "SELECT key, value FROM phasegate.entries
     WHERE tree = $1 AND key >= $2 AND ($3::bytea IS NULL OR key < $3) ORDER BY key";
const SEQ: &str = "SELECT seq FROM phasegate.entries WHERE tree = 'rollouts' AND key = $1";

/// The transition: conditional on the rollout's row being at `$3 - 1` (no row yet: only the first
/// event, `$3 = 1`, creates it; a row that appears meanwhile is a conflict). Every
/// data-modifying CTE runs to completion whether or not the final SELECT reads it; those that
/// select `FROM moved` write nothing when the rollout did not move.
const COMMIT: &str = "WITH moved AS (
         INSERT INTO phasegate.entries AS e (tree, key, value, seq)
             SELECT 'rollouts', $1::bytea, $2::bytea, $3::bigint
             WHERE $3::bigint = 1 OR EXISTS (
                 SELECT 1 FROM phasegate.entries WHERE tree = 'rollouts' AND key = $1::bytea
             )
         ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value, seq = EXCLUDED.seq
             WHERE e.seq = $3::bigint - 1
         RETURNING 1
     ), event AS (
         INSERT INTO phasegate.entries (tree, key, value)
             SELECT 'events', $4::bytea, $5::bytea FROM moved
         RETURNING 1
     ), plan AS (
         INSERT INTO phasegate.entries (tree, key, value)
             SELECT 'plans', $6::bytea, $7::bytea FROM moved WHERE $7::bytea IS NOT NULL
         ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value
     ), baseline AS (
         INSERT INTO phasegate.entries (tree, key, value)
             SELECT 'baselines', $1::bytea, $8::bytea FROM moved WHERE $8::bytea IS NOT NULL
         ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value
     ), claim AS (
         INSERT INTO phasegate.entries (tree, key, value)
             SELECT 'claims', $1::bytea, $9::bytea FROM moved WHERE $9::bytea IS NOT NULL
         ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value
     )
     SELECT (SELECT count(*) FROM moved) + (SELECT count(*) FROM event)";

/// The first key after every key that starts with `prefix` (none for an empty prefix or one of
/// 0xff bytes only).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The event a rollout's stored record is at, for the `seq` column of a row written outside a
/// commit (a copy, an import).
fn seq_of_rollout(tree: &str, value: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        last_seq: u64,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        rollout: Seq,
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        data: Data,
    }
    if tree != "rollouts" {
        return None;
    }
    serde_json::from_slice::<Envelope>(value)
        .ok()
        .and_then(|e| i64::try_from(e.data.rollout.last_seq).ok())
}

fn to_i64(seq: u64, id: &str) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt {
        key: format!("rollouts/{id}"),
        message: format!("event number {seq} is out of range"),
    })
}

pub(crate) struct PgBackend {
    worker: Worker,
    /// The URL without its password: what messages name.
    path: PathBuf,
}

impl PgBackend {
    pub fn open(url: &str) -> Result<PgBackend, StoreError> {
        let worker = Worker::connect(url)?;
        let path = worker.path.clone();
        let migrating = path.clone();
        worker.call_store(move |conn| migrate(conn, migrating))?;
        Ok(PgBackend { worker, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let (tree, key) = (tree.to_string(), key.to_vec());
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(GET)?;
            let row = client.query_opt(&statement, &[&tree, &key])?;
            Ok(row.map(|row| Bytes::from(row.get::<_, Vec<u8>>(0))))
        })
    }

    pub fn contains(&self, tree: &str, key: &[u8]) -> Result<bool, StoreError> {
        self.get(tree, key).map(|found| found.is_some())
    }

    pub fn insert(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.apply(tree, &[(key.to_vec(), Some(value.to_vec()))])
    }

    pub fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let (tree, key) = (tree.to_string(), key.to_vec());
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(DELETE)?;
            let row = client.query_opt(&statement, &[&tree, &key])?;
            Ok(row.map(|row| Bytes::from(row.get::<_, Vec<u8>>(0))))
        })
    }

    pub fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        let (tree, prefix) = (tree.to_string(), prefix.to_vec());
        let end = successor(&prefix);
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(SCAN)?;
            let rows = client.query(&statement, &[&tree, &prefix, &end])?;
            Ok(rows
                .into_iter()
                .map(|row| {
                    (
                        Bytes::from(row.get::<_, Vec<u8>>(0)),
                        Bytes::from(row.get::<_, Vec<u8>>(1)),
                    )
                })
                .collect())
        })
    }

    /// Writes and removes `ops` in one transaction.
    pub fn apply(&self, tree: &str, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let tree = tree.to_string();
        let ops = ops.to_vec();
        self.worker.call(move |conn| {
            let (_, put) = conn.prepared(PUT)?;
            let (client, delete) = conn.prepared(DELETE)?;
            let mut tx = client.transaction()?;
            for (key, value) in &ops {
                match value {
                    Some(value) => {
                        let seq = seq_of_rollout(&tree, value);
                        tx.execute(&put, &[&tree, key, value, &seq])?;
                    }
                    None => {
                        tx.query_opt(&delete, &[&tree, key])?;
                    }
                }
            }
            tx.commit()
        })
    }

    /// Every write is committed when it returns: nothing to flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    pub fn tree_names(&self) -> Result<Vec<String>, StoreError> {
        self.worker.call(|conn| {
            let rows = conn.client()?.query(
                "SELECT DISTINCT tree FROM phasegate.entries ORDER BY tree",
                &[],
            )?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    pub fn commit(&self, write: &CommitWrite) -> Result<(), StoreError> {
        let id = write.id.clone();
        let seq = to_i64(write.seq, &id)?;
        let (rollout, event_key, event) = (
            write.rollout.clone(),
            write.event_key.clone(),
            write.event.clone(),
        );
        let (plan_key, plan) = match &write.plan {
            Some((key, value)) => (key.clone(), Some(value.clone())),
            None => (Vec::new(), None),
        };
        let (baseline, claims) = (write.baseline.clone(), write.claims.clone());
        let expected = write.seq;
        self.worker.call_store(move |conn| {
            let (client, statement) = conn.prepared(COMMIT)?;
            let key = id.as_bytes().to_vec();
            let written: i64 = client
                .query_one(
                    &statement,
                    &[
                        &key, &rollout, &seq, &event_key, &event, &plan_key, &plan, &baseline,
                        &claims,
                    ],
                )?
                .get(0);
            if written == 2 {
                return Ok(());
            }
            let (client, statement) = conn.prepared(SEQ)?;
            let found: Option<i64> = client
                .query_opt(&statement, &[&key])?
                .and_then(|row| row.get(0));
            Err(Failure::Store(StoreError::Conflict {
                id,
                expected,
                found: found.and_then(|f| u64::try_from(f).ok()).unwrap_or(0),
            }))
        })
    }

    /// Writes whole trees into an empty store, in one transaction: a database that holds
    /// anything of a store already is refused, and an interrupted load leaves nothing.
    pub fn load(&self, trees: Vec<(String, Rows)>) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.worker.call_store(move |conn| {
            let (client, put) = conn.prepared(PUT)?;
            let mut tx = client.transaction()?;
            tx.batch_execute("LOCK TABLE phasegate.entries IN EXCLUSIVE MODE")?;
            let held: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM phasegate.entries WHERE tree <> 'meta' OR key = 'store_id'::bytea)",
                    &[],
                )?
                .get(0);
            if held {
                return Err(Failure::Store(StoreError::Database {
                    path,
                    message: "the database holds a store already: copy into an empty database"
                        .into(),
                }));
            }
            for (tree, rows) in &trees {
                for (key, value) in rows {
                    let seq = seq_of_rollout(tree, value);
                    tx.execute(&put, &[tree, key, value, &seq])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// A number for seeding the store's identity: the server's own.
    pub fn unique(&self) -> u64 {
        self.worker
            .call(|conn| {
                let row = conn
                    .client()?
                    .query_one("SELECT (random() * 9007199254740991)::bigint", &[])?;
                Ok(row.get::<_, i64>(0))
            })
            .map_or(0, |n| n.unsigned_abs())
    }
}

/// The one driver of a PostgreSQL store: a session-level advisory lock held on a connection of
/// its own for as long as the value lives (the server releases it if the process dies).
pub struct DriverLock {
    _worker: Worker,
}

pub fn lock_driver(url: &str) -> Result<DriverLock, StoreError> {
    let worker = Worker::connect(url)?;
    let taken = worker.call(|conn| {
        let row = conn
            .client()?
            .query_one("SELECT pg_try_advisory_lock($1)", &[&DRIVER_LOCK])?;
        Ok(row.get::<_, bool>(0))
    })?;
    if !taken {
        return Err(StoreError::InUse {
            store: worker.path.clone(),
            holder: "another phasegate process drives this database's rollouts".into(),
        });
    }
    Ok(DriverLock { _worker: worker })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        let shown = redacted("postgres://phasegate:s3cret@db.example:5432/rollouts");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("db.example"), "{shown}");
        assert!(!redacted("postgres://a:s3cret@[bad").contains("s3cret"));
    }

    #[test]
    fn a_prefix_scan_ends_after_the_last_key_with_the_prefix() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(successor(&[0xff, 0xff]), None);
        assert_eq!(successor(b""), None);
    }
}
