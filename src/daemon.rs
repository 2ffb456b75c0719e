//! A process that owns a store: `phasegate serve`, and `phasegate run` while it drives.
//!
//! Only one process can open a sled store, so a process that drives rollouts keeps it and lets
//! every other command in through its API: it writes `daemon.json` in the store directory (its
//! address and a token of its own, readable only by the user), and the CLI on the same machine
//! finds it there. The file goes when the process ends; a stale one (its process is gone) is
//! ignored. On PostgreSQL several replicas may run on one machine: each writes a file of its own,
//! `daemon-<pid>.json` in the store's local directory, and the CLI takes any live one (every
//! replica answers for every rollout).
//!
//! SIGTERM and SIGINT finish the work in flight, commit its outcome, flush, and exit 0; a restart
//! resumes where the store says.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::identity;
use crate::runner::Handle;
use crate::store::Store;

/// What `daemon.json` says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonFile {
    /// Where the API answers, for this machine.
    pub url: String,
    /// The daemon's own token (role admin; may name the acting person).
    pub token: String,
    pub pid: u32,
    /// `serve` or `run`.
    pub kind: String,
}

/// This process's daemon file: `daemon.json` in a sled store's directory (one process drives
/// it); `daemon-<pid>.json` in a PostgreSQL store's local directory
/// ([`crate::store::local_dir`]), one per replica on this machine.
pub fn daemon_path(store: &Path) -> PathBuf {
    let dir = crate::store::local_dir(store);
    if crate::store::is_postgres(store) {
        dir.join(format!("daemon-{}.json", std::process::id()))
    } else {
        dir.join("daemon.json")
    }
}

/// The most daemon files of replicas on one machine `find` reads.
const MAX_LOCAL_REPLICAS: usize = 64;

/// A daemon holding (a sled store) or serving (a PostgreSQL store) the store on this machine,
/// if one is running: on PostgreSQL the live replica with the lowest pid.
pub fn find(store: &Path) -> Option<DaemonFile> {
    let dir = crate::store::local_dir(store);
    if !crate::store::is_postgres(store) {
        return read_live(&dir.join("daemon.json"));
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid = name
                .to_str()?
                .strip_prefix("daemon-")?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            Some((pid, entry.path()))
        })
        .take(MAX_LOCAL_REPLICAS)
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .find_map(|(pid, path)| read_live(&path).filter(|file| file.pid == pid))
}

fn read_live(path: &Path) -> Option<DaemonFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: DaemonFile = serde_json::from_str(&text).ok()?;
    alive(file.pid).then_some(file)
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists; it sends nothing.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The daemon file, removed when dropped.
pub struct Published {
    path: PathBuf,
}

impl Drop for Published {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `daemon.json` (mode 0600) naming this process's API.
pub fn publish(store_dir: &Path, file: &DaemonFile) -> std::io::Result<Published> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = daemon_path(store_dir);
    let dir = crate::store::local_dir(store_dir);
    std::fs::create_dir_all(&dir)?;
    let partial = path.with_extension("json.partial");
    {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        out.write_all(serde_json::to_string(file)?.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&partial, &path)?;
    Ok(Published { path })
}

/// A signal to shut down on: SIGTERM, SIGINT (Ctrl-C), or `stop`. The signals are taken over
/// when this is called, not when the future is first polled: a SIGTERM that arrives while the
/// runner still lists and loads the store shuts down cleanly too, instead of killing the process.
pub fn shutdown_signal(mut stop: watch::Receiver<bool>) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let (mut terminate, mut interrupt) = match (terminate, interrupt) {
            (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM and SIGINT");
                let _ = stop.wait_for(|s| *s).await;
                return;
            }
        };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// Serves the API (and whatever `extra` routes) on `listener` until `closing` turns true.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    handle: Handle,
    store: Arc<Store>,
    local_token: String,
    dashboard: bool,
    mut closing: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let state = ApiState {
        handle,
        store,
        local_token_hash: Arc::new(identity::hash(&local_token)),
        closing: closing.clone(),
    };
    let mut app = api::router(state.clone());
    if dashboard {
        app = app.merge(api::ui::routes(state));
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = closing.wait_for(|c| *c).await;
        })
        .await
}

/// The address to write in `daemon.json` for a listener bound to `addr`: loopback when it listens
/// on every interface.
pub fn local_url(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}", addr.port())
}
