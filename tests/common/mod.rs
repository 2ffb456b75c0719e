//! Helpers shared by the integration tests: the `phasegate` binary on a store of its own (with
//! the simulator's example plans or a Graph plan), `phasegate emulator` on a free port, the
//! daemon, plain HTTP and SSE, and a webhook receiver. Each test binary uses a part.
#![allow(dead_code)]

pub mod browser;
pub mod postgres;
pub mod rng;
pub mod stores;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_phasegate");

/// A running `phasegate emulator` on a free loopback port, stopped when dropped.
pub struct Emulator {
    child: Child,
    pub url: String,
}

impl Emulator {
    /// Starts the emulator with these extra arguments and waits for its address.
    pub fn spawn(args: &[&str]) -> Emulator {
        let mut child = Command::new(BIN)
            .args(["emulator", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Emulator { child, url }
    }

    /// GETs one of the emulator's JSON endpoints (`/_emulator/ledger`, ...).
    pub fn get(&self, path: &str) -> Value {
        serde_json::from_str(&http_get(&format!("{}{path}", self.url))).unwrap()
    }

    /// POSTs JSON to one of the emulator's endpoints; returns the JSON answer (`Null` if none).
    pub fn post(&self, path: &str, body: &Value) -> Value {
        let (_, text) = http(
            "POST",
            &format!("{}{path}", self.url),
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A Graph read as the application: a token from the emulator's token endpoint, then GET.
    pub fn graph(&self, secret: &str, path: &str) -> Value {
        let form = format!(
            "client_id=00001111-aaaa-2222-bbbb-3333cccc4444&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret={secret}&grant_type=client_credentials"
        );
        let (_, token) = http(
            "POST",
            &format!("{}/contoso.onmicrosoft.com/oauth2/v2.0/token", self.url),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form.as_bytes(),
        );
        let token: Value = serde_json::from_str(&token).unwrap();
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        // Conditional Access allows so many requests a second, with no Retry-After: try again.
        for _ in 0..50 {
            let (status, text) = http(
                "GET",
                &format!("{}{path}", self.url),
                &[("Authorization", bearer.as_str())],
                b"",
            );
            if status == 429 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            assert_eq!(status, 200, "GET {path}: {text}");
            return serde_json::from_str(&text).unwrap();
        }
        panic!("GET {path}: throttled 50 times");
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET over a plain socket, so the tests need no HTTP client of their own.
/// Blocking: never call it from the thread an in-process emulator runs on.
pub fn http_get(url: &str) -> String {
    http("GET", url, &[], b"").1
}

/// One HTTP/1.1 request over a plain socket; returns the status and the body. Blocking.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    let mut head = format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The client secret the tests' emulators accept.
pub const SECRET: &str = "s3cr3t-for-tests-7Qx";

/// The `phasegate` binary with a directory of its own: the store (`store/`) and any plan files
/// the test writes beside it.
pub struct Phasegate {
    pub dir: tempfile::TempDir,
    /// The plan `start` starts (written by `with_plan`; `offline` leaves it unwritten).
    pub plan: PathBuf,
    /// Environment variables set (`Some`) or removed (`None`) for every command.
    env: Vec<(String, Option<String>)>,
    /// Where the store is: `store/` in `dir` on sled, a database of its own on PostgreSQL
    /// (the backend the running test asked for, [`stores::backend`]).
    store: stores::Location,
}

impl Phasegate {
    /// A store of its own and no plan yet, for the simulator's example plans, which commands
    /// read relative to the package as a user in a checkout would (`plans/…`).
    pub fn offline() -> Phasegate {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.toml");
        Phasegate::in_dir(dir, plan)
    }

    /// A store of the running test's backend for the binary with its files in `dir`.
    fn in_dir(dir: tempfile::TempDir, plan: PathBuf) -> Phasegate {
        let store = stores::Location::new(dir.path());
        Phasegate {
            dir,
            plan,
            env: Vec::new(),
            store,
        }
    }

    /// The same store and plan, with `name=value` in every command's environment.
    pub fn with_env(mut self, name: &str, value: &str) -> Phasegate {
        self.env.push((name.to_string(), Some(value.to_string())));
        self
    }

    /// The same store and plan, with `name` removed from every command's environment.
    pub fn without_env(mut self, name: &str) -> Phasegate {
        self.env.push((name.to_string(), None));
        self
    }

    /// The store's directory (a test that reads sled's files runs on sled only).
    pub fn store_dir(&self) -> PathBuf {
        self.store.dir()
    }

    /// The store as `PHASEGATE_STORE` names it: the directory on sled, the URL on PostgreSQL.
    pub fn store(&self) -> &stores::Location {
        &self.store
    }

    /// `phasegate serve` on this store, with this binary's environment.
    pub fn serve(&self) -> Serve {
        self.serve_with(&[], &[])
    }

    /// [`Phasegate::serve`] with these arguments and environment variables too.
    pub fn serve_with(&self, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut all: Vec<(&str, &str)> = self
            .env
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.as_deref()?)))
            .collect();
        all.extend_from_slice(env);
        Serve::start_with(&self.store, args, &all)
    }

    /// The Graph example plan, with Conditional Access paced at `ca_rate`.
    pub fn new(emulator: &Emulator, ca_rate: f64) -> Phasegate {
        Phasegate::with_plan(emulator, "windows-baseline-graph.toml", ca_rate, |t| t)
    }

    /// An example plan from `plans/`, edited by `edit`, pointed at `emulator`.
    pub fn with_plan(
        emulator: &Emulator,
        name: &str,
        ca_rate: f64,
        edit: impl FnOnce(String) -> String,
    ) -> Phasegate {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(format!("{}/plans/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .replace("http://127.0.0.1:8080", &emulator.url)
            .replace(
                "login_url = ",
                &format!(
                    "ca_requests_per_second = {ca_rate}\nrequest_timeout = \"5s\"\nlogin_url = "
                ),
            );
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, edit(text)).unwrap();
        Phasegate::in_dir(dir, plan)
    }

    /// Another store driving the same plan file.
    pub fn second_store(&self) -> Phasegate {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.toml");
        std::fs::copy(&self.plan, &plan).unwrap();
        Phasegate::in_dir(dir, plan)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("PHASEGATE_STORE", &self.store)
            .env("PHASEGATE_GRAPH_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `args` with `--output json`, its standard output parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.run(&all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}\n{}",
                stdout(&out),
                stderr(&out)
            )
        })
    }

    /// `args` running in the background, its output piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `phasegate status ID --output json`.
    pub fn status(&self, id: &str) -> Value {
        let out = self.run(&["status", id, "--output", "json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status of {id}: {e}: {}", stderr(&out)))
    }

    pub fn start(&self) -> String {
        let out = self.run(&["start", self.plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim().to_string()
    }

    /// Runs, approves when asked, until the rollout completes.
    pub fn complete(&self, id: &str) {
        for _ in 0..8 {
            let out = self.run(&["run", id]);
            match code(&out) {
                0 => return,
                3 if self.status(id)["status"] == "waiting_approval" => {
                    let approve = self.run(&["approve", id, "--by", "bob"]);
                    assert_eq!(code(&approve), 0, "{}", stderr(&approve));
                }
                other => panic!(
                    "run exited {other} ({}):\n{}\n{}",
                    self.status(id)["reason"],
                    stdout(&out),
                    stderr(&out)
                ),
            }
        }
        panic!("the rollout did not complete: {}", self.status(id));
    }
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The application's writes in an emulator's ledger as (method, path, body digest), with the
/// store named in ownership lines blanked: two stores making the same changes compare equal.
pub fn writes_of(ledger: &Value) -> Vec<(String, String, String)> {
    use sha2::Digest;
    ledger["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] != "admin")
        .map(|e| {
            let body = e["body"].to_string();
            let body = match body.find("(store ") {
                Some(start) => {
                    let end = body[start..].find(')').map_or(body.len(), |e| start + e);
                    format!("{}(store *){}", &body[..start], &body[end + 1..])
                }
                None => body,
            };
            (
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
                hex::encode(sha2::Sha256::digest(body.as_bytes())),
            )
        })
        .collect()
}

/// A running `phasegate serve` on a free loopback port over a store, stopped when dropped. Its
/// output is drained as it comes, so a chatty daemon never blocks on a full pipe.
pub struct Serve {
    pub child: Child,
    pub url: String,
    pub store: PathBuf,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

fn drain(
    from: impl std::io::Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let mut log = into.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

impl Serve {
    /// `store` is what `PHASEGATE_STORE` says: a directory or a PostgreSQL URL.
    pub fn start(store: impl AsRef<std::ffi::OsStr>) -> Serve {
        Serve::start_with_env(store, &[])
    }

    /// [`Serve::start`] with these variables in its environment too.
    pub fn start_with_env(store: impl AsRef<std::ffi::OsStr>, env: &[(&str, &str)]) -> Serve {
        Serve::start_with(store, &[], env)
    }

    /// [`Serve::start_with_env`] with these arguments of `serve` too.
    pub fn start_with(
        store: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Serve {
        let store = store.as_ref();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("PHASEGATE_STORE", store)
            .env("PHASEGATE_GRAPH_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        let log = std::sync::Arc::new(std::sync::Mutex::new(first));
        drain(out, log.clone());
        drain(child.stderr.take().unwrap(), log.clone());
        Serve {
            child,
            url,
            store: PathBuf::from(store),
            log,
        }
    }

    /// Everything the daemon printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// An API call with a token: (status, JSON body).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let bearer = format!("Bearer {token}");
        let text = body.map(Value::to_string).unwrap_or_default();
        let (status, answer) = http(
            method,
            &format!("{}{path}", self.url),
            &[
                ("Authorization", bearer.as_str()),
                ("Content-Type", "application/json"),
            ],
            text.as_bytes(),
        );
        (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        // SAFETY: kill only sends a signal to the child this struct owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status.code()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a server-sent event stream until `done` says so (or `limit` passes): the `data` of
/// every event, in order, with its `id`.
pub fn sse_until(
    url: &str,
    token: &str,
    last_event_id: Option<&str>,
    limit: std::time::Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Vec<(String, Value)> {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut head = format!(
        "GET /{path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n"
    );
    if let Some(id) = last_event_id {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let started = std::time::Instant::now();
    let mut reader = BufReader::new(stream);
    let mut events = Vec::new();
    let (mut id, mut data) = (String::new(), String::new());
    let mut line = String::new();
    while started.elapsed() < limit {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = line.trim_end_matches(['\r', '\n']);
        // Chunked transfer: chunk-size lines are hex numbers, skipped.
        if let Some(value) = text.strip_prefix("data:") {
            data.push_str(value.trim_start());
        } else if let Some(value) = text.strip_prefix("id:") {
            id = value.trim().to_string();
        } else if text.is_empty() && !data.is_empty() {
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            let stop = done(&value);
            events.push((std::mem::take(&mut id), value));
            data.clear();
            if stop {
                break;
            }
        }
    }
    events
}

/// Polls `check` until it holds or `limit` passes; true if it held.
pub fn eventually(limit: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    check()
}

/// A webhook receiver on loopback answering every request with `answer`; keeps each request
/// (head and body) it received.
pub struct Receiver {
    pub url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn start(answer: String) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request).to_string();
                let head_end = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
                let length: usize = text
                    .to_lowercase()
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(str::to_string))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request).to_string());
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Receiver { url, got }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }
}

/// A bodiless HTTP answer with these extra header lines (each ending in `\r\n`).
pub fn answer(status: u16, headers: &str) -> String {
    format!("HTTP/1.1 {status} Answer\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}
