//! Helpers shared by the integration tests that talk to `phasegate emulator`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

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
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    body.to_string()
}
