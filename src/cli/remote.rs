//! The CLI through a daemon's API: when `serve` or `run` holds the store (found from
//! `daemon.json`), or when `--server URL` names a remote one (with `PHASEGATE_TOKEN`).

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::{Failure, exit};
use crate::daemon;
use crate::retry::{self, Backoff};

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

    /// One request; a 503 (nothing was done, for a passing reason) is sent again as the answer's
    /// `Retry-After` and [`Backoff::API`] allow, and its message is the failure once they do not.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let policy = Backoff::API;
        let mut patience = policy.patience();
        let mut failed = 0;
        loop {
            let (status, retry_after, text) = self.send(method.clone(), path, body).await?;
            let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                return Ok(json);
            }
            let message = json["error"]
                .as_str()
                .map_or_else(|| format!("{status}: {text}"), str::to_string);
            failed += 1;
            if status == 503
                && let Some(wait) = policy.wait(
                    failed,
                    retry::Failure::Unavailable,
                    retry_after,
                    failed as u64,
                )
                && patience.spend(wait)
            {
                tracing::info!(%path, %message, ?wait, "phasegate answered 503: sending the request again");
                tokio::time::sleep(wait).await;
                continue;
            }
            let code = match status {
                422 if message.starts_with(crate::preflight::REFUSED) => exit::NOT_READY,
                400 | 404 | 409 => exit::INVALID,
                _ => exit::FAILURE,
            };
            return Err(Failure { code, message });
        }
    }

    /// Sends one request: the answer's status, `Retry-After` and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Option<Duration>, String), Failure> {
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
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
        let text = response.text().await.unwrap_or_default();
        Ok((status, retry_after, text))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    use super::*;

    /// A daemon on loopback that answers 503 (`Retry-After: 0`) to the first `busy` requests and
    /// 200 after; the requests it saw.
    async fn daemon(busy: u32) -> (Remote, Arc<AtomicU32>) {
        let seen = Arc::new(AtomicU32::new(0));
        let counter = seen.clone();
        let app = axum::Router::new().route(
            "/api/v1/rollouts/w-1/pause",
            axum::routing::post(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < busy {
                        let body = r#"{"error":"rollout `w-1` is not being driven now"}"#;
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(header::RETRY_AFTER, "0")],
                            body,
                        )
                            .into_response()
                    } else {
                        axum::Json(serde_json::json!({"paused": true})).into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let remote = Remote {
            url,
            token: "t".into(),
            local: false,
            http: reqwest::Client::new(),
            stream: reqwest::Client::new(),
        };
        (remote, seen)
    }

    #[tokio::test]
    async fn a_503_is_sent_again_until_the_daemon_takes_the_command() {
        let (remote, seen) = daemon(2).await;
        let answer = remote
            .post("/api/v1/rollouts/w-1/pause", &Value::Null)
            .await
            .unwrap_or_else(|f| panic!("{}", f.message));
        assert_eq!(answer["paused"], true);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_daemon_that_stays_unavailable_is_given_up_on_with_its_message() {
        let (remote, seen) = daemon(u32::MAX).await;
        let failure = remote
            .post("/api/v1/rollouts/w-1/pause", &Value::Null)
            .await
            .unwrap_err();
        assert_eq!(failure.code, exit::FAILURE);
        assert!(
            failure.message.contains("not being driven now"),
            "{}",
            failure.message
        );
        assert_eq!(seen.load(Ordering::SeqCst), Backoff::API.attempts);
    }
}
