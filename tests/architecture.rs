//! Architecture invariants that a compiler does not check, checked on the source.
//!
//! The functional core (`src/domain`) does no I/O, reads no clock, spawns nothing and never
//! waits: that is what makes its tests exhaustive and its behaviour replayable
//! (docs/ARCHITECTURE.md). A use of a runtime, a store, a network or file API, or a clock there
//! fails this test, naming the line.

use std::path::{Path, PathBuf};

/// What the core may not name, and why.
const FORBIDDEN: [(&str, &str); 14] = [
    ("tokio", "an async runtime"),
    ("sled", "the store"),
    ("reqwest", "HTTP"),
    ("axum", "HTTP"),
    ("hyper", "HTTP"),
    ("std::fs", "files"),
    ("std::net", "the network"),
    ("std::process", "processes"),
    ("std::thread", "threads"),
    ("std::env", "the environment"),
    ("SystemTime::now", "the clock"),
    ("Instant::now", "the clock"),
    ("async fn", "waiting"),
    (".await", "waiting"),
];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The code of a line, without a trailing `//` comment (doc comments are not code either).
fn code(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    line.split(" //").next().unwrap_or(line)
}

/// The first forbidden name a line of code uses (as a word of its own, not inside another).
fn offending(line: &str) -> Option<(&'static str, &'static str)> {
    let code = code(line);
    FORBIDDEN.into_iter().find(|(name, _)| {
        code.match_indices(name).any(|(i, _)| {
            name.starts_with('.')
                || !code[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

#[test]
fn the_domain_does_no_io_reads_no_clock_and_never_waits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() >= 10, "src/domain has {} files", files.len());
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if let Some((name, what)) = offending(line) {
                found.push(format!(
                    "{}:{}: `{name}` ({what}) in the functional core: {}",
                    file.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                        .unwrap()
                        .display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_finds_what_it_looks_for() {
    assert_eq!(offending("use tokio::sync::mpsc;").unwrap().0, "tokio");
    assert_eq!(
        offending("    let now = std::time::SystemTime::now();")
            .unwrap()
            .0,
        "SystemTime::now"
    );
    assert_eq!(offending("    store.flush().await?;").unwrap().0, ".await");
    assert_eq!(offending("    future.await").unwrap().0, ".await");
    assert!(offending("    // tokio is named in a comment").is_none());
    assert!(offending("let x = 1; // std::fs in a trailing comment").is_none());
    assert!(offending("let mytokio = 1;").is_none());
    assert!(offending("use std::time::{Duration, SystemTime, UNIX_EPOCH};").is_none());
}
