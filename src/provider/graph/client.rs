//! An HTTP client for Microsoft Graph that behaves the way the service needs:
//! OAuth2 client credentials with the token cached and renewed before it expires (and once more
//! on a 401), `Retry-After` honoured (fractional seconds or an HTTP date), capped exponential
//! backoff with jitter otherwise, Conditional Access requests spaced to the tenant's rate, a
//! timeout on every request, paging through `@odata.nextLink`, and `$batch`.
//!
//! Writes are not retried after an ambiguous failure (timeout, dropped connection, 5xx): the
//! caller re-reads the tenant and decides again, so a write that did land is not repeated.
//!
//! The client also keeps the tenant's clock: every response's `Date` (or the emulator's precise
//! `X-Phasegate-Emulator-Now`) anchors it, so soak times and staleness are judged in the tenant's
//! time, and a rehearsal against `phasegate emulator` can run on its virtual clock.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;

use crate::retry::{self, Backoff, Failure};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use super::settings::GraphSettings;
use crate::domain::time::Timestamp;
use crate::provider::{ErrorKind, ProviderError};

/// The client secret; never printed.
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

struct Token {
    value: String,
    expires_at: Timestamp,
}

/// The tenant's time as last seen in a response, and how it moves between responses.
struct ServerClock {
    anchor: Option<(Timestamp, Instant)>,
    /// The emulator's clock only moves when asked.
    manual: bool,
    factor: f64,
    floor: Timestamp,
}

/// Whether a request changes the tenant; writes are never blindly repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

pub struct BatchRequest {
    pub id: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

pub struct GraphClient {
    http: reqwest::Client,
    settings: GraphSettings,
    secret: Secret,
    token: tokio::sync::Mutex<Option<Token>>,
    clock: Mutex<ServerClock>,
    ca_slot: tokio::sync::Mutex<Option<Instant>>,
    retry: Backoff,
    jitter: AtomicU64,
}

/// Renew the token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

pub use crate::graph::encode_query_value as encode;

pub use crate::retry::parse_retry_after;

/// One readable line from a Graph error body, including Intune's JSON-inside-`message` envelope
/// and the OAuth error shape of the token endpoint.
pub fn describe_error(body: &str) -> String {
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        let text = body.trim();
        return if text.is_empty() {
            "no details".to_string()
        } else {
            text.chars().take(300).collect()
        };
    };
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        let description = json["error_description"]
            .as_str()
            .and_then(|d| d.lines().next())
            .unwrap_or("");
        return format!("{error}: {description}")
            .trim_end_matches(": ")
            .to_string();
    }
    let error = &json["error"];
    let code = error["code"].as_str().unwrap_or("error");
    let message = error["message"].as_str().unwrap_or("");
    let message = if message.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(message)
            .ok()
            .and_then(|inner| inner["Message"].as_str().map(str::to_string))
            .map(|m| m.split(" - Operation ID").next().unwrap_or(&m).to_string())
            .unwrap_or_else(|| message.to_string())
    } else {
        message.to_string()
    };
    format!("{code}: {message}")
        .trim_end_matches(": ")
        .to_string()
}

/// The approval code an Intune `ApprovalRequired` answer names in its message, when the header
/// is missing.
fn approval_code_in(body: &str) -> Option<String> {
    let json: Value = serde_json::from_str(body).ok()?;
    let error = &json["error"];
    let message = error["message"].as_str()?;
    let code = message.split("x-msft-approval-code:").nth(1)?.trim();
    let code: String = code
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
        .collect();
    (error["code"] == "ApprovalRequired" && !code.is_empty()).then_some(code)
}

fn short(url: &str) -> &str {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = path.find('/').map_or(path, |i| &path[i..]);
    path.split('?').next().unwrap_or(path)
}

impl GraphClient {
    pub fn new(settings: GraphSettings, secret: Secret) -> Result<GraphClient, ProviderError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::permanent(format!("cannot build the HTTP client: {e}")))?;
        Ok(GraphClient {
            http,
            settings,
            secret,
            token: tokio::sync::Mutex::new(None),
            clock: Mutex::new(ServerClock {
                anchor: None,
                manual: false,
                factor: 1.0,
                floor: Timestamp::from_millis(0),
            }),
            ca_slot: tokio::sync::Mutex::new(None),
            retry: Backoff::GRAPH,
            jitter: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &GraphSettings {
        &self.settings
    }

    /// The tenant's current time.
    pub fn now(&self) -> Timestamp {
        let mut clock = self.clock.lock().expect("clock lock");
        let now = match clock.anchor {
            None => Timestamp::from_system_time(std::time::SystemTime::now()),
            Some((_, _)) if clock.manual => clock.anchor.expect("checked").0,
            Some((at, seen)) => at.plus(seen.elapsed().mul_f64(clock.factor)),
        };
        let now = now.max(clock.floor);
        clock.floor = now;
        now
    }

    /// True when the tenant's clock only moves when asked (the emulator's default).
    pub fn is_manual_clock(&self) -> bool {
        self.clock.lock().expect("clock lock").manual
    }

    /// How fast the tenant's time runs compared with real time.
    pub fn clock_factor(&self) -> f64 {
        self.clock.lock().expect("clock lock").factor
    }

    fn observe_clock(&self, headers: &HeaderMap) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let precise = header("x-phasegate-emulator-now").and_then(crate::graph::parse_time);
        let dated = header("date")
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .map(Timestamp::from_system_time);
        let Some(server_now) = precise.or(dated) else {
            return;
        };
        let mut clock = self.clock.lock().expect("clock lock");
        match header("x-phasegate-emulator-clock") {
            Some("manual") => {
                clock.manual = true;
                clock.factor = 0.0;
            }
            Some(scaled) => {
                clock.manual = false;
                clock.factor = scaled
                    .split("factor=")
                    .nth(1)
                    .and_then(|f| f.trim().parse().ok())
                    .unwrap_or(1.0);
            }
            None => {
                clock.manual = false;
                clock.factor = 1.0;
            }
        }
        clock.anchor = Some((server_now, Instant::now()));
    }

    /// A fresh `client-request-id` (GUID-shaped; Graph echoes it for support cases).
    fn request_id(&self) -> String {
        let n = self.jitter.fetch_add(1, Ordering::Relaxed);
        let a = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let b = std::process::id() as u64 ^ a.rotate_left(17);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b & 0xfff,
            b >> 16 & 0xffff_ffff_ffff
        )
    }

    fn next_jitter(&self) -> u64 {
        let n = self.jitter.fetch_add(1, Ordering::Relaxed);
        (n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % 1000
    }

    /// Whether (and after how long) to try again after `failed` failed attempts.
    fn wait(
        &self,
        failed: u32,
        failure: Failure,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        self.retry
            .wait(failed, failure, retry_after, self.next_jitter())
    }

    /// A valid access token, renewed when it is about to expire (in tenant time) or when asked.
    async fn bearer(&self, renew: bool) -> Result<String, ProviderError> {
        let mut token = self.token.lock().await;
        if !renew
            && let Some(current) = token.as_ref()
            && self.now().plus(TOKEN_MARGIN) < current.expires_at
        {
            return Ok(current.value.clone());
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *token = Some(fresh);
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<Token, ProviderError> {
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.settings.login_url, self.settings.tenant
        );
        let scope = graph_scope(&self.settings.graph_url);
        let form = [
            ("client_id", self.settings.client_id.as_str()),
            ("scope", scope.as_str()),
            ("client_secret", self.secret.0.as_str()),
            ("grant_type", "client_credentials"),
        ];
        let metrics = crate::metrics::global();
        let mut failed = 0;
        loop {
            let sent = self.http.post(&url).form(&form).send().await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => {
                    metrics.provider_request("graph", "POST", crate::metrics::TRANSPORT);
                    failed += 1;
                    let error = format!(
                        "signing in to tenant {}: {}",
                        self.settings.tenant,
                        retry::describe_transport(&e)
                    );
                    let Some(delay) = self.wait(failed, retry::transport_failure(&e), None) else {
                        return Err(ProviderError::transient(error));
                    };
                    metrics.provider_retry("graph");
                    tracing::warn!(%error, ?delay, "token request failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            self.observe_clock(response.headers());
            let status = response.status();
            metrics.provider_request(
                "graph",
                "POST",
                crate::metrics::status_class(status.as_u16()),
            );
            if status.as_u16() == 429 {
                metrics.provider_throttled("graph");
            }
            let body = response.text().await.unwrap_or_default();
            if status.is_success() {
                let json: Value = serde_json::from_str(&body).map_err(|e| {
                    ProviderError::permanent(format!("unreadable token response: {e}"))
                })?;
                let value = json["access_token"]
                    .as_str()
                    .ok_or_else(|| {
                        ProviderError::permanent("the token response has no access_token")
                    })?
                    .to_string();
                let lifetime = json["expires_in"].as_u64().unwrap_or(3599);
                tracing::debug!(lifetime, "signed in to Microsoft Graph");
                return Ok(Token {
                    value,
                    expires_at: self.now().plus(Duration::from_secs(lifetime)),
                });
            }
            if let Some(failure) = retry::status_failure(status.as_u16()) {
                failed += 1;
                if let Some(delay) = self.wait(failed, failure, retry_after) {
                    metrics.provider_retry("graph");
                    tracing::warn!(%status, ?delay, "token endpoint unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            let kind = if retry::status_failure(status.as_u16()).is_some() {
                ErrorKind::Transient
            } else {
                ErrorKind::Auth
            };
            return Err(ProviderError {
                retry_after,
                ..ProviderError::new(
                    kind,
                    format!(
                        "signing in to tenant {} as application {} failed: {}",
                        self.settings.tenant,
                        self.settings.client_id,
                        describe_error(&body)
                    ),
                )
            });
        }
    }

    /// A path is relative to v1.0 unless it starts with `/beta/`.
    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else if path_or_url.starts_with("/beta/") {
            format!("{}{}", self.settings.graph_url, path_or_url)
        } else {
            format!("{}/v1.0{}", self.settings.graph_url, path_or_url)
        }
    }

    /// Waits for the tenant's Conditional Access request slot.
    async fn ca_pace(&self) {
        let mut slot = self.ca_slot.lock().await;
        // A little over the tenant's rate, so network jitter never makes two requests look closer.
        let gap = Duration::from_secs_f64(1.05 / self.settings.ca_requests_per_second)
            + Duration::from_millis(10);
        if let Some(last) = *slot {
            let since = last.elapsed();
            if since < gap {
                tokio::time::sleep(gap - since).await;
            }
        }
        *slot = Some(Instant::now());
    }

    /// One Graph request with retries; returns the JSON body (`Null` when there is none).
    pub async fn call(
        &self,
        method: Method,
        path_or_url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        access: Access,
    ) -> Result<Value, ProviderError> {
        let url = self.url(path_or_url);
        let what = format!("{method} {}", short(&url));
        let conditional_access = url.contains("/identity/conditionalAccess")
            || url.ends_with("/$batch")
                && body.is_some_and(|b| b.to_string().contains("/identity/conditionalAccess"));
        let metrics = crate::metrics::global();
        let mut failed = 0;
        let mut renewed = false;
        loop {
            if conditional_access {
                self.ca_pace().await;
            }
            let token = self.bearer(false).await?;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token)
                .header("client-request-id", self.request_id());
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = match request.send().await {
                Ok(response) => {
                    self.observe_clock(response.headers());
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                    let approval = response
                        .headers()
                        .get("x-msft-approval-code")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    response
                        .text()
                        .await
                        .map(|text| (status, retry_after, approval, text))
                }
                Err(e) => Err(e),
            };
            // One per attempt: an answer whose body never arrived counts as a transport failure.
            metrics.provider_request(
                "graph",
                method.as_str(),
                match &outcome {
                    Ok((status, ..)) => crate::metrics::status_class(*status),
                    Err(_) => crate::metrics::TRANSPORT,
                },
            );
            if matches!(outcome, Ok((429, ..))) {
                metrics.provider_throttled("graph");
            }
            let (status, retry_after, approval, text) = match outcome {
                Ok(reply) => reply,
                Err(e) => {
                    let error = format!("{what}: {}", retry::describe_transport(&e));
                    failed += 1;
                    // A write that got no answer may have been made: the caller reads back.
                    let again = match access {
                        Access::Read => self.wait(failed, retry::transport_failure(&e), None),
                        Access::Write => None,
                    };
                    let Some(delay) = again else {
                        return Err(ProviderError::transient(error));
                    };
                    metrics.provider_retry("graph");
                    tracing::warn!(%what, attempt = failed, ?delay, %error, "graph request failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            match status {
                200..=299 => {
                    return if text.trim().is_empty() {
                        Ok(Value::Null)
                    } else {
                        serde_json::from_str(&text).map_err(|e| {
                            ProviderError::transient(format!("{what}: unreadable response: {e}"))
                        })
                    };
                }
                401 if !renewed => {
                    tracing::info!(%what, "access token rejected; signing in again");
                    metrics.provider_retry("graph");
                    renewed = true;
                    self.bearer(true).await?;
                    continue;
                }
                429 | 500..=599 => {
                    // A throttled request was not carried out; a failed write may have been.
                    let failure = retry::status_failure(status).unwrap_or(Failure::Unavailable);
                    failed += 1;
                    let again = match (failure, access) {
                        (Failure::Unavailable, Access::Write) => None,
                        _ => self.wait(failed, failure, retry_after),
                    };
                    if let Some(delay) = again {
                        metrics.provider_retry("graph");
                        tracing::warn!(%what, status, attempt = failed, ?delay, ?retry_after, "graph did not serve the request; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
                _ => {}
            }
            let detail = describe_error(&text);
            if status == 403
                && let Some(reference) = approval.or_else(|| approval_code_in(&text))
            {
                return Err(ProviderError {
                    message: format!("{what}: held for Multi Admin Approval (request {reference})"),
                    kind: ErrorKind::Held,
                    retry_after: None,
                    reference: Some(reference),
                });
            }
            let kind = match status {
                401 | 403 => ErrorKind::Auth,
                404 => ErrorKind::NotFound,
                429 | 500..=599 => ErrorKind::Transient,
                _ => ErrorKind::Permanent,
            };
            let hint = if status == 403 {
                " (check the application permissions in docs/graph.md)"
            } else {
                ""
            };
            return Err(ProviderError {
                message: format!("{what}: {status} {detail}{hint}"),
                kind,
                retry_after,
                reference: None,
            });
        }
    }

    /// Follows `@odata.nextLink` and hands each page's items to `page`.
    pub async fn for_each_page(
        &self,
        path_or_url: &str,
        headers: &[(&str, &str)],
        mut page: impl FnMut(&[Value]),
    ) -> Result<(), ProviderError> {
        let mut next = Some(path_or_url.to_string());
        while let Some(url) = next {
            let body = self
                .call(Method::GET, &url, None, headers, Access::Read)
                .await?;
            page(body["value"].as_array().map_or(&[][..], Vec::as_slice));
            next = body["@odata.nextLink"].as_str().map(str::to_string);
        }
        Ok(())
    }

    /// GETs in `$batch`es of up to 20 (v1.0); answers in request order. Throttled items are
    /// retried.
    pub async fn batch_get(
        &self,
        requests: &[BatchRequest],
    ) -> Result<Vec<Result<Value, ProviderError>>, ProviderError> {
        self.batch_get_at("/$batch", requests).await
    }

    /// The same through beta's `$batch`, whose items are beta paths.
    pub async fn batch_get_beta(
        &self,
        requests: &[BatchRequest],
    ) -> Result<Vec<Result<Value, ProviderError>>, ProviderError> {
        self.batch_get_at("/beta/$batch", requests).await
    }

    async fn batch_get_at(
        &self,
        endpoint: &str,
        requests: &[BatchRequest],
    ) -> Result<Vec<Result<Value, ProviderError>>, ProviderError> {
        let mut results: Vec<Option<Result<Value, ProviderError>>> = vec![None; requests.len()];
        for (chunk_index, chunk) in requests.chunks(20).enumerate() {
            let mut pending: Vec<usize> = (0..chunk.len()).collect();
            let mut attempt = 0;
            while !pending.is_empty() {
                let body = json!({
                    "requests": pending.iter().map(|&i| {
                        let r = &chunk[i];
                        let headers: serde_json::Map<String, Value> = r.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                        json!({"id": r.id, "method": "GET", "url": r.url, "headers": headers})
                    }).collect::<Vec<_>>()
                });
                let reply = self
                    .call(Method::POST, endpoint, Some(&body), &[], Access::Read)
                    .await?;
                let mut throttled = Vec::new();
                let mut wait = Duration::ZERO;
                for item in reply["responses"].as_array().into_iter().flatten() {
                    let id = item["id"].as_str().unwrap_or("");
                    let Some(i) = pending.iter().copied().find(|&i| chunk[i].id == id) else {
                        continue;
                    };
                    let status = item["status"].as_u64().unwrap_or(500) as u16;
                    if status == 429 {
                        crate::metrics::global().provider_throttled("graph");
                    }
                    let retry_after = item["headers"]["Retry-After"]
                        .as_str()
                        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                    if let Some(failure) = retry::status_failure(status)
                        && let Some(delay) = self.wait(attempt + 1, failure, retry_after)
                    {
                        throttled.push(i);
                        wait = wait.max(delay);
                        continue;
                    }
                    results[chunk_index * 20 + i] = Some(if (200..300).contains(&status) {
                        Ok(item["body"].clone())
                    } else {
                        let kind = match status {
                            401 | 403 => ErrorKind::Auth,
                            404 => ErrorKind::NotFound,
                            429 | 500..=599 => ErrorKind::Transient,
                            _ => ErrorKind::Permanent,
                        };
                        Err(ProviderError::new(
                            kind,
                            format!(
                                "GET {}: {status} {}",
                                chunk[i].url.split('?').next().unwrap_or(""),
                                describe_error(&item["body"].to_string())
                            ),
                        ))
                    });
                }
                pending.retain(|i| results[chunk_index * 20 + i].is_none());
                attempt += 1;
                if pending.is_empty() || attempt >= self.retry.attempts {
                    break;
                }
                // Throttled, failed, or (should never happen) left unanswered: try those again.
                let wait = if wait.is_zero() {
                    self.retry.step(attempt, self.next_jitter())
                } else {
                    wait
                };
                for _ in &pending {
                    crate::metrics::global().provider_retry("graph");
                }
                tracing::warn!(
                    requests = pending.len(),
                    throttled = throttled.len(),
                    ?wait,
                    "part of a graph batch must be retried"
                );
                tokio::time::sleep(wait).await;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ProviderError::transient("a batched request got no answer"))
                })
            })
            .collect())
    }

    /// Moves the emulator's manual clock (rehearsals only).
    pub async fn advance_clock(&self, at: Timestamp) -> Result<(), ProviderError> {
        if at <= self.now() {
            return Ok(());
        }
        let url = format!("{}/_emulator/clock", self.settings.graph_url);
        let response = self
            .http
            .post(&url)
            .json(&json!({"advanceTo": crate::graph::format_time(at)}))
            .send()
            .await
            .map_err(|e| ProviderError::transient(format!("moving the emulator clock: {e}")))?;
        self.observe_clock(response.headers());
        if !response.status().is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(ProviderError::permanent(format!(
                "moving the emulator clock: {body}"
            )));
        }
        Ok(())
    }

    /// Signs in, which also learns the tenant's clock.
    pub async fn sign_in(&self) -> Result<(), ProviderError> {
        self.bearer(false).await.map(|_| ())
    }
}

/// The token scope for a Graph endpoint: the national cloud's own (`https://graph.microsoft.us`
/// → `https://graph.microsoft.us/.default`), the global one otherwise (also for the emulator).
pub fn graph_scope(graph_url: &str) -> String {
    match graph_url.strip_prefix("https://") {
        Some(host) if !host.is_empty() => {
            format!("https://{}/.default", host.trim_end_matches('/'))
        }
        _ => "https://graph.microsoft.com/.default".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_may_be_fractional_or_a_date() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_retry_after("2.128", now),
            Some(Duration::from_millis(2128))
        );
        assert_eq!(parse_retry_after("10", now), Some(Duration::from_secs(10)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn errors_become_one_line() {
        let graph = r#"{"error":{"code":"BadRequest","message":"Invalid filter clause","innerError":{"date":"2020-08-18T12:51:51"}}}"#;
        assert_eq!(describe_error(graph), "BadRequest: Invalid filter clause");
        let intune = r#"{"error":{"code":"BadRequest","message":"{\r\n  \"_version\": 3,\r\n  \"Message\": \"Compliance policy must have one and only one block scheduled action - Operation ID (for customer support): 0000 - Activity ID: 13c1\",\r\n  \"RetryAfter\": null\r\n}"}}"#;
        assert_eq!(
            describe_error(intune),
            "BadRequest: Compliance policy must have one and only one block scheduled action"
        );
        let oauth = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#;
        assert_eq!(
            describe_error(oauth),
            "invalid_client: AADSTS7000215: Invalid client secret provided."
        );
    }

    #[test]
    fn query_values_are_encoded_for_odata() {
        assert_eq!(
            encode("displayName eq 'Pilot IT'"),
            "displayName%20eq%20'Pilot%20IT'"
        );
        assert_eq!(encode("a&b=c"), "a%26b%3Dc");
    }

    #[test]
    fn national_clouds_get_their_own_scope() {
        assert_eq!(
            graph_scope("https://graph.microsoft.com"),
            "https://graph.microsoft.com/.default"
        );
        assert_eq!(
            graph_scope("https://graph.microsoft.us"),
            "https://graph.microsoft.us/.default"
        );
        assert_eq!(
            graph_scope("https://microsoftgraph.chinacloudapi.cn/"),
            "https://microsoftgraph.chinacloudapi.cn/.default"
        );
        assert_eq!(
            graph_scope("http://127.0.0.1:8080"),
            "https://graph.microsoft.com/.default"
        );
    }

    #[test]
    fn the_secret_is_never_printed() {
        assert_eq!(format!("{:?}", Secret::new("hunter2".into())), "[redacted]");
    }
}
