//! A real browser for the dashboard tests: Debian's Chromium, headless, driven through
//! ChromeDriver's W3C WebDriver protocol (plain JSON over HTTP, so no client crate is needed).
//!
//! When Chromium or ChromeDriver is missing, `tests/support/install-browser` installs them (as
//! `.ci/run` does before the suite), so a fresh machine needs nothing done by hand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::eventually;

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn chromium() -> PathBuf {
    std::env::var_os("PHASEGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn chromedriver() -> PathBuf {
    std::env::var_os("PHASEGATE_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// Installs the browser when it is missing; panics with what to do when that is impossible.
fn ensure_installed() {
    if chromium().exists() && chromedriver().exists() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/install-browser");
    let status = Command::new("bash").arg(&script).status();
    assert!(
        status.is_ok_and(|s| s.success()) && chromium().exists() && chromedriver().exists(),
        "the dashboard tests need Chromium and ChromeDriver (Debian: `apt-get install chromium \
         chromium-driver`, or set PHASEGATE_CHROMIUM / PHASEGATE_CHROMEDRIVER); {} could not \
         install them",
        script.display()
    );
}

/// One HTTP/1.1 exchange with the driver. ChromeDriver answers `Connection: close` but keeps the
/// socket open, so the body is read by its `Content-Length`, with a deadline.
fn http(method: &str, url: &str, body: &[u8]) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("a driver URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).expect("the driver listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let head = format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("a status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut answer = vec![0; length];
    reader.read_exact(&mut answer).expect("the whole answer");
    (status, String::from_utf8_lossy(&answer).into_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One headless Chromium session, closed (with its driver) when dropped.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A new browser with an empty profile and a laptop-sized window.
    pub fn start(width: u32, height: u32) -> Browser {
        ensure_installed();
        let port = free_port();
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let ready = eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && serde_json::from_str::<Value>(&http("GET", &format!("{base}/status"), b"").1)
                    .is_ok_and(|v| v["value"]["ready"] == true)
        });
        assert!(ready, "chromedriver did not become ready on port {port}");
        let profile = tempfile::tempdir().unwrap();
        // The flags the machine needs: no sandbox as root, and no background connections to
        // hosts a closed network refuses.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium(), "args": args},
        }}});
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            _profile: profile,
        };
        let answer = browser.send("POST", "/session", &capabilities);
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {answer}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`, or a panic naming the command and the error.
    fn send(&self, method: &str, path: &str, body: &Value) -> Value {
        let text = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let (status, answer) = http(method, &format!("{}{path}", self.base), text.as_bytes());
        let answer: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert_eq!(status, 200, "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    fn command(&self, method: &str, what: &str, body: &Value) -> Value {
        self.send(method, &format!("/session/{}/{what}", self.session), body)
    }

    pub fn open(&self, url: &str) {
        self.command("POST", "url", &json!({ "url": url }));
    }

    pub fn url(&self) -> String {
        self.command("GET", "url", &Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let found = self.command(
            "POST",
            "element",
            &json!({"using": "css selector", "value": css}),
        );
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element matches {css}: {found}"))
            .to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.command(
            "POST",
            &format!("element/{element}/value"),
            &json!({ "text": text }),
        );
    }

    pub fn click(&self, css: &str) {
        let element = self.find(css);
        self.command("POST", &format!("element/{element}/click"), &json!({}));
    }

    /// The text of an element as rendered (what a person sees: closed details and hidden parts
    /// are left out). Read in one script, so a live update of the page cannot come in between.
    pub fn text(&self, css: &str) -> String {
        let found = self.command(
            "POST",
            "execute/sync",
            &json!({
                "script": "const e = document.querySelector(arguments[0]); return e ? e.innerText : null",
                "args": [css],
            }),
        );
        found
            .as_str()
            .unwrap_or_else(|| panic!("no element matches {css}"))
            .to_string()
    }

    /// Runs a script in the page and returns its result.
    pub fn script(&self, body: &str) -> Value {
        self.command("POST", "execute/sync", &json!({"script": body, "args": []}))
    }

    /// Saves a PNG of the window, or of one element when `css` is given.
    pub fn screenshot(&self, css: Option<&str>, to: &Path) {
        let what = match css {
            Some(css) => format!("element/{}/screenshot", self.find(css)),
            None => "screenshot".to_string(),
        };
        let encoded = self.command("GET", &what, &Value::Null);
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            encoded.as_str().unwrap_or_default(),
        )
        .expect("a base64 screenshot");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                "DELETE",
                &format!("{}/session/{}", self.base, self.session),
                b"",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
