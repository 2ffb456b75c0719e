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
//! durable (WAL flushed, `synchronous_commit`) when the statement returns.
//!
//! **Leases and fencing.** Replicas of `serve` on one database each own some rollouts through a
//! row of `phasegate.leases (rollout, owner, epoch, expires_at)`: taken when the rollout is
//! unowned or its lease expired (the epoch goes up by one on every change of owner), renewed by
//! its owner, released on a clean shutdown. Expiry is read on the database's clock (`now()`),
//! so the replicas' clocks do not matter. Every commit carries the committer's fence: one more
//! CTE, which locks the committer's lease row (`FOR SHARE`) and yields a row only if the
//! committer still holds the rollout at its epoch; `moved` depends on it. A taking-over replica's
//! `UPDATE` of the lease waits for a commit holding that lock and a commit waits for a takeover
//! in progress (and then reads the new owner), so a commit is either wholly before the takeover
//! or refused ([`StoreError::Fenced`]). A commit without a fence (a CLI command on the store
//! itself) is refused while any replica holds a live lease of the rollout.
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
use std::time::Duration;

use ::postgres::{Client, Config, Statement};

use super::{Bytes, CommitWrite, StoreError};

mod tls;

/// The schema this phasegate creates and reads; bump it with a migration in [`migrate`].
pub const SCHEMA_VERSION: i32 = 2;

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

/// How to connect: the driver's configuration, the TLS connector, and for `sslmode=allow` the
/// configuration of the second attempt (TLS), made when the plain one fails.
pub(crate) struct Dial {
    config: Config,
    tls: tls::Connector,
    then_tls: Option<Config>,
}

impl Dial {
    fn connect(&self) -> Result<Client, ::postgres::Error> {
        match (self.config.connect(self.tls.clone()), &self.then_tls) {
            (Err(plain), Some(then_tls)) => {
                tracing::debug!(error = %plain, "a plain connection failed (sslmode=allow): trying TLS");
                then_tls.connect(self.tls.clone())
            }
            (made, _) => made,
        }
    }
}

fn config_of(url: &str) -> Result<Dial, StoreError> {
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
    config.options(&session_options(config.get_options()));
    let then_tls = tls.tls_after_plain().then(|| {
        let mut then_tls = config.clone();
        then_tls.ssl_mode(::postgres::config::SslMode::Require);
        then_tls
    });
    Ok(Dial {
        config,
        tls: connector,
        then_tls,
    })
}

/// How long the server lets one of phasegate's sessions sit inside an open transaction waiting
/// for its next statement before it ends the session, rolling the transaction back.
///
/// phasegate never waits inside a transaction: it sends a batch's statements back to back. A
/// process that stops between two of them (SIGSTOP, a frozen VM, a partition) would otherwise
/// keep its row locks for as long as it is stopped and block every other replica's commits on
/// those rows, lease or no lease. `idle_in_transaction_session_timeout` is PostgreSQL's bound on
/// exactly that ("Terminate any session that has been idle ... within an open transaction for
/// longer than the specified amount of time", postgresql.org/docs/current/runtime-config-client.html);
/// the stopped process finds its connection gone when it wakes and makes a new one.
const IDLE_IN_TRANSACTION: &str = "2s";

/// The server options of every session: the URL's own `options`, then the idle-in-transaction
/// bound (unless the URL sets one).
fn session_options(url_options: Option<&str>) -> String {
    let own = url_options.unwrap_or("").trim();
    if own.contains("idle_in_transaction_session_timeout") {
        return own.to_string();
    }
    let bound = format!("-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}");
    if own.is_empty() {
        bound
    } else {
        format!("{own} {bound}")
    }
}

/// What a request gets: the connection, made (again) if needed, and its prepared statements.
pub(crate) struct Conn {
    dial: Dial,
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, ::postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.statements.clear();
            self.client = Some(self.dial.connect()?);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }

    /// Drops the session, so the next request makes a new one.
    fn forget(&mut self) {
        self.statements.clear();
        self.client = None;
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
        let dial = config_of(url)?;
        let path = PathBuf::from(redacted(url));
        let (jobs, receive) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("phasegate-postgres".into())
            .spawn(move || {
                let mut conn = Conn {
                    dial,
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
        mut job: impl FnMut(&mut Conn) -> Result<R, ::postgres::Error> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.call_store(move |conn| job(conn).map_err(Failure::Driver))
    }

    /// Runs `job` on the connection's thread; once more on a new session when the server had
    /// ended the old one before `job` reached it ([`session_ended`]): nothing of the first run
    /// was done then, and the caller never sees a session it could not have known was gone.
    fn call_store<R: Send + 'static>(
        &self,
        mut job: impl FnMut(&mut Conn) -> Result<R, Failure> + Send + 'static,
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
                let mut outcome = job(conn);
                if let Err(Failure::Driver(err)) = &outcome
                    && session_ended(err)
                {
                    tracing::info!(error = %err, "the database ended the session: running the request again on a new one");
                    conn.forget();
                    outcome = job(conn);
                }
                let _ = answer.send(outcome);
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
        let path = self.path.clone();
        if unreachable(err) {
            StoreError::Unavailable { path, message }
        } else {
            StoreError::Database { path, message }
        }
    }
}

/// The server ended the session before the request was run: it says so (an idle transaction
/// past `idle_in_transaction_session_timeout`, 25P03, or a server shutting down, 57P01/57P02,
/// both sent as FATAL before the server closes the connection; PostgreSQL's "Errcodes" appendix).
/// The transaction such a session had open is rolled back by the server.
fn session_ended(err: &::postgres::Error) -> bool {
    use ::postgres::error::SqlState;
    err.code().is_some_and(|code| {
        [
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
        ]
        .contains(code)
    })
}

/// The database is not reachable now: the connection closed or could not be made, or the server
/// is starting, stopping or refusing connections (SQLSTATE class 08, 57P01–57P03).
fn unreachable(err: &::postgres::Error) -> bool {
    use ::postgres::error::SqlState;
    if session_ended(err) || err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => code.code().starts_with("08") || *code == SqlState::CANNOT_CONNECT_NOW,
        // No answer from a server at all: refused, reset, timed out.
        None => std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>()),
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
/// Version 2: `leases (rollout, owner, epoch, expires_at)` with primary key `rollout`.
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
    if found < 2 {
        tx.batch_execute(
            "CREATE TABLE phasegate.leases (
                 rollout text PRIMARY KEY,
                 owner text NOT NULL,
                 epoch bigint NOT NULL,
                 expires_at timestamptz NOT NULL
             );
             INSERT INTO phasegate.schema_version (version) VALUES (2);",
        )?;
        tracing::info!(store = %path.display(), version = 2, "added the rollouts' leases to the store's schema");
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
/// A value written only over the one expected (`SWAP`), or only where there is none (`CREATE`).
/// Both under a fence when `$5` (rollout), `$6` (owner), `$7` (epoch) are given: the lease row
/// locked `FOR SHARE`, as a commit locks it.
const SWAP: &str = "UPDATE phasegate.entries SET value = $4
     WHERE tree = $1 AND key = $2 AND value = $3 AND ($5::text IS NULL OR EXISTS (
         SELECT 1 FROM phasegate.leases
             WHERE rollout = $5::text AND owner = $6::text AND epoch = $7::bigint FOR SHARE))";
const CREATE: &str = "INSERT INTO phasegate.entries (tree, key, value)
     SELECT $1, $2, $3 WHERE $4::text IS NULL OR EXISTS (
         SELECT 1 FROM phasegate.leases
             WHERE rollout = $4::text AND owner = $5::text AND epoch = $6::bigint FOR SHARE)
     ON CONFLICT (tree, key) DO NOTHING";

/// The transition: conditional on the rollout's row being at `$3 - 1` (no row yet: only the first
/// event, `$3 = 1`, creates it; a row that appears meanwhile is a conflict). Every
/// data-modifying CTE runs to completion whether or not the final SELECT reads it; those that
/// select `FROM moved` write nothing when the rollout did not move.
///
/// The fence (`$10` owner, `$11` epoch, `$12` the rollout's id as text): with an owner, its lease
/// row locked and still at that owner and epoch; without one, no live lease of the rollout.
const COMMIT: &str = "WITH held AS (
         SELECT 1 FROM phasegate.leases
             WHERE rollout = $12::text AND owner = $10::text AND epoch = $11::bigint
         FOR SHARE
     ), fence AS (
         SELECT 1 WHERE CASE WHEN $10::text IS NULL
             THEN NOT EXISTS (
                 SELECT 1 FROM phasegate.leases WHERE rollout = $12::text AND expires_at > now()
             )
             ELSE EXISTS (SELECT 1 FROM held)
         END
     ), moved AS (
         INSERT INTO phasegate.entries AS e (tree, key, value, seq)
             SELECT 'rollouts', $1::bytea, $2::bytea, $3::bigint
             WHERE EXISTS (SELECT 1 FROM fence) AND ($3::bigint = 1 OR EXISTS (
                 SELECT 1 FROM phasegate.entries WHERE tree = 'rollouts' AND key = $1::bytea
             ))
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
     SELECT (SELECT count(*) FROM moved) + (SELECT count(*) FROM event),
         (SELECT count(*) FROM fence)";

/// Takes the lease of rollout `$1` for owner `$2` for `$3` milliseconds of the database's clock:
/// when there is none, when it expired, or when it is the owner's own (renewed). The epoch goes
/// up by one whenever the owner changes or an expired lease is taken again.
const ACQUIRE: &str = "INSERT INTO phasegate.leases AS l (rollout, owner, epoch, expires_at)
     VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
     ON CONFLICT (rollout) DO UPDATE SET
         owner = EXCLUDED.owner,
         epoch = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > now()
             THEN l.epoch ELSE l.epoch + 1 END,
         expires_at = EXCLUDED.expires_at
     WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner
     RETURNING epoch";

/// Renews the leases owner `$2` still holds of rollouts `$1` at their epochs `$4`.
const RENEW: &str = "UPDATE phasegate.leases AS l
     SET expires_at = now() + $3::bigint * interval '1 millisecond'
     FROM unnest($1::text[], $4::bigint[]) AS held (rollout, epoch)
     WHERE l.rollout = held.rollout AND l.epoch = held.epoch AND l.owner = $2
     RETURNING l.rollout";

/// Gives a lease up (it expires now; the row and its epoch stay, so epochs only grow).
const RELEASE: &str = "UPDATE phasegate.leases SET expires_at = now()
     WHERE rollout = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()";

const LEASE_OF: &str =
    "SELECT owner, epoch, expires_at > now() FROM phasegate.leases WHERE rollout = $1";

const LIVE_LEASES: &str = "SELECT rollout FROM phasegate.leases WHERE expires_at > now()";

/// Each rollout's event sequence: the `seq` column commits keep, no record read.
const ROLLOUT_SEQS: &str = "SELECT key, seq FROM phasegate.entries WHERE tree = 'rollouts'";

const ROLLOUTS_OF: &str =
    "SELECT key, value FROM phasegate.entries WHERE tree = 'rollouts' AND key = ANY($1::bytea[])";

const LEASES: &str = "SELECT rollout, owner, epoch,
         (extract(epoch FROM (expires_at - now())) * 1000)::bigint
     FROM phasegate.leases ORDER BY rollout";

/// Rows of `key, value` as the store hands them out.
fn key_values(rows: Vec<::postgres::Row>) -> Vec<(Bytes, Bytes)> {
    rows.into_iter()
        .map(|row| {
            (
                Bytes::from(row.get::<_, Vec<u8>>(0)),
                Bytes::from(row.get::<_, Vec<u8>>(1)),
            )
        })
        .collect()
}

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
pub(crate) fn seq_of_rollout(tree: &str, value: &[u8]) -> Option<i64> {
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

/// A lease length in milliseconds, as the statements take it (bounded by the caller).
fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
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
        worker.call_store(move |conn| migrate(conn, migrating.clone()))?;
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
            Ok(key_values(rows))
        })
    }

    /// Writes `value` at `key` if it still holds `expected` (none: if it holds nothing), in one
    /// statement; whether it was written.
    pub fn swap(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        fence: Option<&super::WriteFence>,
    ) -> Result<bool, StoreError> {
        let (tree, key, value) = (tree.to_string(), key.to_vec(), value.to_vec());
        let expected = expected.map(<[u8]>::to_vec);
        let rollout = fence.map(|f| f.rollout.clone());
        let owner = fence.map(|f| f.replica.clone());
        let epoch = fence.map(|f| i64::try_from(f.epoch).unwrap_or(i64::MAX));
        self.worker.call(move |conn| {
            let written = match &expected {
                Some(expected) => {
                    let (client, statement) = conn.prepared(SWAP)?;
                    client.execute(
                        &statement,
                        &[&tree, &key, expected, &value, &rollout, &owner, &epoch],
                    )?
                }
                None => {
                    let (client, statement) = conn.prepared(CREATE)?;
                    client.execute(&statement, &[&tree, &key, &value, &rollout, &owner, &epoch])?
                }
            };
            Ok(written == 1)
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
        let (owner, epoch) = match &write.fence {
            Some((owner, epoch)) => (Some(owner.clone()), Some(to_i64(*epoch, &id)?)),
            None => (None, None),
        };
        self.worker.call_store(move |conn| {
            let (client, statement) = conn.prepared(COMMIT)?;
            let key = id.as_bytes().to_vec();
            let row = client.query_one(
                &statement,
                &[
                    &key, &rollout, &seq, &event_key, &event, &plan_key, &plan, &baseline, &claims,
                    &owner, &epoch, &id,
                ],
            )?;
            let (written, fenced): (i64, i64) = (row.get(0), row.get(1));
            if written == 2 {
                return Ok(());
            }
            if fenced == 0 {
                let (client, statement) = conn.prepared(LEASE_OF)?;
                let lease = client.query_opt(&statement, &[&id])?;
                let epoch = lease.map_or(0, |row| row.get::<_, i64>(1));
                return Err(Failure::Store(StoreError::Fenced {
                    id: id.clone(),
                    epoch: u64::try_from(epoch).unwrap_or(0),
                }));
            }
            let (client, statement) = conn.prepared(SEQ)?;
            let found: Option<i64> = client
                .query_opt(&statement, &[&key])?
                .and_then(|row| row.get(0));
            Err(Failure::Store(StoreError::Conflict {
                id: id.clone(),
                expected,
                found: found.and_then(|f| u64::try_from(f).ok()).unwrap_or(0),
            }))
        })
    }

    /// Takes (or renews) the lease of rollout `id` for `owner`: its epoch if `owner` holds it now,
    /// `None` if another owner's lease is live.
    pub fn acquire(&self, id: &str, owner: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let (id, owner, ttl) = (id.to_string(), owner.to_string(), millis(ttl));
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(ACQUIRE)?;
            let row = client.query_opt(&statement, &[&id, &owner, &ttl])?;
            Ok(row.and_then(|row| u64::try_from(row.get::<_, i64>(0)).ok()))
        })
    }

    /// Renews the leases `owner` holds (`held`: rollout and epoch), in one statement; returns the
    /// rollouts whose lease it still holds.
    pub fn renew(
        &self,
        owner: &str,
        held: &[(String, u64)],
        ttl: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let owner = owner.to_string();
        let ids: Vec<String> = held.iter().map(|(id, _)| id.clone()).collect();
        let epochs: Vec<i64> = held
            .iter()
            .map(|(_, epoch)| i64::try_from(*epoch).unwrap_or(i64::MAX))
            .collect();
        let ttl = millis(ttl);
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(RENEW)?;
            let rows = client.query(&statement, &[&ids, &owner, &ttl, &epochs])?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    /// Gives up `owner`'s lease of `id` at `epoch` (if it still holds it).
    pub fn release(&self, id: &str, owner: &str, epoch: u64) -> Result<(), StoreError> {
        let (id, owner) = (id.to_string(), owner.to_string());
        let epoch = to_i64(epoch, &id)?;
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(RELEASE)?;
            client.execute(&statement, &[&id, &owner, &epoch])?;
            Ok(())
        })
    }

    /// The owner of rollout `id`'s lease if it is live (on the database's clock).
    pub fn live_owner(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(LEASE_OF)?;
            let row = client.query_opt(&statement, &[&id])?;
            Ok(row
                .filter(|row| row.get::<_, bool>(2))
                .map(|row| row.get::<_, String>(0)))
        })
    }

    /// The rollouts whose lease is live now, on the database's clock.
    pub fn live_leases(&self) -> Result<Vec<String>, StoreError> {
        self.worker.call(|conn| {
            let (client, statement) = conn.prepared(LIVE_LEASES)?;
            let rows = client.query(&statement, &[])?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    /// Every rollout's id and the event its record is at (`None`: not kept for that row).
    pub fn rollout_seqs(&self) -> Result<Vec<(Bytes, Option<i64>)>, StoreError> {
        self.worker.call(|conn| {
            let (client, statement) = conn.prepared(ROLLOUT_SEQS)?;
            let rows = client.query(&statement, &[])?;
            Ok(rows
                .into_iter()
                .map(|row| (Bytes::from(row.get::<_, Vec<u8>>(0)), row.get(1)))
                .collect())
        })
    }

    /// The records of the rollouts `keys`, in one query (those that exist).
    pub fn rollouts_of(&self, keys: Vec<Vec<u8>>) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.worker.call(move |conn| {
            let (client, statement) = conn.prepared(ROLLOUTS_OF)?;
            let rows = client.query(&statement, &[&keys])?;
            Ok(key_values(rows))
        })
    }

    /// Every lease, with how long it still runs on the database's clock (negative: expired).
    pub fn leases(&self) -> Result<Vec<super::LeaseInfo>, StoreError> {
        self.worker.call(|conn| {
            let (client, statement) = conn.prepared(LEASES)?;
            let rows = client.query(&statement, &[])?;
            Ok(rows
                .into_iter()
                .map(|row| super::LeaseInfo {
                    rollout: row.get(0),
                    owner: row.get(1),
                    epoch: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                    remaining_ms: row.get::<_, Option<i64>>(3).unwrap_or(0),
                })
                .collect())
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
                    path: path.clone(),
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
    fn every_session_bounds_an_idle_transaction_unless_the_url_sets_it() {
        assert_eq!(
            session_options(None),
            "-c idle_in_transaction_session_timeout=2s"
        );
        assert_eq!(
            session_options(Some("-c search_path=x")),
            "-c search_path=x -c idle_in_transaction_session_timeout=2s"
        );
        let own = "-c idle_in_transaction_session_timeout=10s";
        assert_eq!(session_options(Some(own)), own);
    }

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
