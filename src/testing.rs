//! Helpers for unit tests that talk HTTP: a scripted server on a real loopback socket, and the
//! lock for tests whose Graph requests count in the process-wide metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `script(method, path, nth)`: the status, extra headers and body answering the `nth` request
/// (from 0) for that method and path (with its query), or `None` to drop the connection
/// unanswered.
pub type Script =
    dyn Fn(&str, &str, u32) -> Option<(u16, Vec<(&'static str, String)>, String)> + Send + Sync;

/// Held by every unit test that sends Graph requests: they count in the process-wide metrics,
/// and the test of those counts must see only its own.
pub static GRAPH_TRAFFIC: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A listener on a free loopback port and its `http://127.0.0.1:port`, for a script that needs
/// its own address (to answer with links to itself).
pub async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// A scripted server on a free loopback port; returns its `http://127.0.0.1:port`.
pub async fn scripted_server(script: Arc<Script>) -> String {
    let (listener, url) = bind().await;
    serve(listener, script);
    url
}

/// `raw(method, path, nth)`: the bytes answering the `nth` request (from 0) for that method and
/// path, written exactly as given (status line, headers, body: anything, well-formed or not), or
/// `None` to drop the connection unanswered.
pub type RawScript = dyn Fn(&str, &str, u32) -> Option<Vec<u8>> + Send + Sync;

/// Serves one request per connection on `listener`, answered by `script`; counts the
/// connections it accepts, whether or not a request follows.
pub fn serve(listener: TcpListener, script: Arc<Script>) -> Arc<AtomicUsize> {
    let raw: Arc<RawScript> = Arc::new(move |method: &str, path: &str, nth| {
        let (status, headers, body) = script(method, path, nth)?;
        let mut reply = format!(
            "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\nConnection: close\r\nContent-Type: application/json\r\n",
            body.len()
        );
        for (name, value) in headers {
            reply.push_str(&format!("{name}: {value}\r\n"));
        }
        reply.push_str("\r\n");
        reply.push_str(&body);
        Some(reply.into_bytes())
    });
    serve_raw(listener, raw)
}

/// [`serve`] with answers written byte for byte as the script gives them.
pub fn serve_raw(listener: TcpListener, script: Arc<RawScript>) -> Arc<AtomicUsize> {
    let seen = Arc::new(Mutex::new(BTreeMap::<String, u32>::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buffer.len() < head_end + length {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                let mut request_line = head.lines().next().unwrap_or("").split(' ');
                let method = request_line.next().unwrap_or("").to_string();
                let path = request_line.next().unwrap_or("").to_string();
                let nth = {
                    let mut seen = seen.lock().unwrap();
                    let count = seen.entry(format!("{method} {path}")).or_insert(0);
                    *count += 1;
                    *count - 1
                };
                let Some(reply) = script(&method, &path, nth) else {
                    return;
                };
                let _ = socket.write_all(&reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    connections
}

/// The cases a fuzz target runs: `PHASEGATE_FUZZ_CASES` when it is set, else its default.
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("PHASEGATE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(default)
}
