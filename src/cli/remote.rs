//! The CLI through a daemon's API: when `serve` or `run` holds the store (found from
//! `daemon.json`), or when `--server URL` names a remote one (with `PHASEGATE_TOKEN`).

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::{Failure, exit};
use crate::daemon;

/// A daemon to talk to.
pub struct Remote {
    url: String,
    token: String,
    /// The daemon's own token: it may name the acting person.
    pub local: bool,
    http: reqwest::Client,
    /// For event streams: no limit on the whole answer, which lasts as long as the watch, but
    /// one on the silence between reads (the server sends a keep-alive every 15 s).
    stream: reqwest::Client,
}

fn client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, Failure> {
    builder
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("cannot build the HTTP client: {e}"),
        })
}

impl Remote {
    /// The daemon for this CLI call: `--server` (with `PHASEGATE_TOKEN`), or the one holding the
    /// store.
    pub fn find(store_dir: &Path, server: Option<&str>) -> Result<Option<Remote>, Failure> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = client(reqwest::Client::builder().timeout(Duration::from_secs(30)))?;
        let stream = client(reqwest::Client::builder().read_timeout(Duration::from_secs(60)))?;
        if let Some(url) = server {
            let token = std::env::var("PHASEGATE_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    Failure::invalid(
                        "--server needs a token in PHASEGATE_TOKEN (create one with `phasegate token create`)",
                    )
                })?;
            return Ok(Some(Remote {
                url: url.trim_end_matches('/').to_string(),
                token,
                local: false,
                http,
                stream,
            }));
        }
        Ok(daemon::find(store_dir).map(|file| Remote {
            url: file.url,
            token: file.token,
            local: true,
            http,
            stream,
        }))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.call(Method::DELETE, path, Some(body)).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("phasegate at {} did not answer: {e}", self.url),
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let message = json["error"]
            .as_str()
            .map_or_else(|| format!("{status}: {text}"), str::to_string);
        let code = match status {
            422 if message.starts_with(crate::preflight::REFUSED) => exit::NOT_READY,
            400 | 404 | 409 => exit::INVALID,
            _ => exit::FAILURE,
        };
        Err(Failure { code, message })
    }

    /// Follows a server-sent event stream, calling `each` with every event's data; returns when
    /// the stream ends or `each` says stop.
    pub async fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(&Value) -> bool,
    ) -> Result<(), Failure> {
        let mut response = self
            .stream
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| Failure {
                code: exit::FAILURE,
                message: format!("phasegate at {} did not answer: {e}", self.url),
            })?;
        if !response.status().is_success() {
            return Err(Failure {
                code: exit::FAILURE,
                message: format!("watching {path}: {}", response.status()),
            });
        }
        let mut buffer = String::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("the watch ended: {e}"),
        })? {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if !each(&value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
