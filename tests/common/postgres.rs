//! A real PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl start` on a
//! free loopback port (its unix socket in that directory too), a fresh database per test, and
//! `pg_ctl stop` when the last test holding the server lets go of it.
//!
//! [`Postgres::start_tls`] starts one with TLS on: a CA and a server certificate for
//! `127.0.0.1` and `localhost` made with rcgen, written into the server's directory (the key
//! mode 0600 and owned by the server's account, as PostgreSQL insists), the CA's certificate
//! beside them for the client ([`Postgres::ca_file`]).
//!
//! The binaries are found on PATH or in `/usr/lib/postgresql/<version>/bin` (Debian's
//! `postgresql` package; `tests/support/install-postgres` installs it). `initdb` refuses to run
//! as root, so as root the server runs as the `postgres` account the package creates, and the
//! temporary directory is handed to it.
//!
//! Shared by the library's unit tests and the integration tests (included by path in both).
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A running server; stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    owner: Option<(u32, u32)>,
}

/// How [`Postgres::start_tls`] admits clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// TLS and plain TCP both.
    Both,
    /// TLS only (`hostssl` in pg_hba.conf): a plain connection is refused.
    TlsOnly,
    /// TLS with a client certificate its CA signed, naming the user (`cert` authentication in
    /// pg_hba.conf, `ssl_ca_file` the CA): no password, no plain connection.
    ClientCert,
}

static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The server the tests of this process share while any of them holds it.
pub fn shared() -> Arc<Postgres> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = shared.upgrade() {
        return server;
    }
    let server = Arc::new(Postgres::start(&[]));
    *shared = Arc::downgrade(&server);
    server
}

/// The server's binaries, installed (`tests/support/install-postgres`) on first use when they
/// are missing, as the dashboard tests install their browser.
fn bin_dir() -> PathBuf {
    if let Some(bin) = find_bin_dir().filter(|_| usable_account()) {
        return bin;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/install-postgres"
    );
    let status = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin, and {script} could not install them"
    );
    find_bin_dir().expect("installed just above")
}

/// Not root, or root with a `postgres` account to run the server as.
fn usable_account() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return true;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; only whether it found the account is read.
    !unsafe { libc::getpwnam(name.as_ptr()) }.is_null()
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Debian links only some tools onto PATH: use the directory they point into.
                return Some(
                    std::fs::canonicalize(dir.join("initdb"))
                        .ok()
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .unwrap_or(dir),
                );
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// As root, the `postgres` account's uid and gid (initdb will not run as root).
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the record is read at once, before any other
    // call could reuse its static buffer (tests that start servers hold SHARED's lock).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !entry.is_null(),
        "running as root and there is no `postgres` account to run the server as: run tests/support/install-postgres"
    );
    // SAFETY: non-null, points to a passwd record.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Some((uid, gid))
}

/// A CA (`ca.pem`, readable by the tests) and a server certificate it signed for `127.0.0.1`
/// and `localhost` (`server.crt`, `server.key`: the key mode 0600, owned by the server's
/// account when it runs as one) in `dir`.
fn write_certificates(dir: &Path, owner: Option<(u32, u32)>) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test PostgreSQL CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = server_params.signed_by(&server_key, &issuer).unwrap();
    let ca_file = dir.join("ca.pem");
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert, server.pem()).unwrap();
    std::fs::write(&key, server_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The client's: the user `phasegate` as its common name, for `cert` authentication. Kept by
    // the test's own account, mode 0600 (what libpq, and phasegate, ask of a private key).
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "phasegate");
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    std::fs::write(dir.join("client.crt"), client.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        dir.join("client.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    if let Some((uid, gid)) = owner {
        for file in [&ca_file, &cert, &key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
        }
    }
    (cert, key)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// Starts a server of its own, with these extra `-c name=value` settings. Tests run with
    /// `fsync=off` (their machine's crashes are not what they test) unless `settings` say
    /// otherwise.
    pub fn start(settings: &[&str]) -> Postgres {
        Postgres::start_with(settings, None)
    }

    /// Starts a server of its own with TLS on (`ssl=on`, a certificate its CA signed).
    pub fn start_tls(admit: Admit) -> Postgres {
        Postgres::start_with(&[], Some(admit))
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PEM file of the CA that signed a [`Postgres::start_tls`] server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The client certificate and key a [`Admit::ClientCert`] server admits.
    pub fn client_cert_files(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.crt"),
            self.dir.path().join("client.key"),
        )
    }

    fn start_with(settings: &[&str], tls: Option<Admit>) -> Postgres {
        let bin = bin_dir();
        let owner = unprivileged();
        let dir = tempfile::Builder::new()
            .prefix("phasegate-pg")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let run = |program: &str| {
            let mut command = Command::new(bin.join(program));
            if let Some((uid, gid)) = owner {
                command.uid(uid).gid(gid);
            }
            command.stdin(Stdio::null());
            command
        };
        let data = dir.path().join("data");
        let out = run("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "phasegate", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut options = String::from("-c listen_addresses=127.0.0.1 -c fsync=off");
        if settings.iter().any(|s| s.starts_with("fsync=")) {
            options = "-c listen_addresses=127.0.0.1".into();
        }
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        if let Some(admit) = tls {
            let (cert, key) = write_certificates(dir.path(), owner);
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
            if admit == Admit::ClientCert {
                options.push_str(&format!(
                    " -c ssl_ca_file={}",
                    dir.path().join("ca.pem").display()
                ));
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 cert\nhostnossl all all 127.0.0.1/32 reject\n",
                )
                .unwrap();
            }
            if admit == Admit::TlsOnly {
                // Unix-socket connections stay trusted; TCP ones must be TLS.
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
                )
                .unwrap();
            }
        }
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let out = run("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {port} -k {} {options}", dir.path().display()))
                .arg("start")
                .stdout(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return Postgres {
                    bin,
                    dir,
                    port,
                    owner,
                };
            }
        }
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        panic!("pg_ctl start failed: {log}");
    }

    /// A new, empty database on this server and its URL.
    pub fn database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        // Through the Unix socket, trusted whatever the server asks of TCP clients.
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-U", "phasegate", &name])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://phasegate@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut command = Command::new(self.bin.join("pg_ctl"));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        let _ = command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
