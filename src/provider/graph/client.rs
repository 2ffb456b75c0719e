//! An HTTP client for Microsoft Graph that behaves the way the service needs:
//! OAuth2 client credentials with the token cached and renewed before it expires (and once more
//! on a 401), `Retry-After` honoured (fractional seconds or an HTTP date), capped exponential
//! backoff with jitter otherwise, Conditional Access requests spaced to the tenant's rate, a
//! timeout on every request, paging through `@odata.nextLink` (the next page requested while
//! one is read), and `$batch`.
//!
//! The bearer token goes to one origin only, the configured `graph_url`'s (scheme, host, port):
//! every request that carries it is sent to a [`GraphUrl`], which only [`GraphClient::target`]
//! makes, after checking the origin. A path is resolved against `graph_url`; an absolute URL —
//! an `@odata.nextLink`, or any other a server answered with — is refused unless it is on that
//! origin. The client secret goes to `login_url` only. Redirects are never followed (a `3xx` is
//! an error), so no request leaves for a URL the client did not check. A listing follows at most
//! [`MAX_PAGES`] pages and fails on a `nextLink` it has already fetched.
//!
//! Writes are not retried after an ambiguous failure (timeout, dropped connection, 5xx): the
//! caller re-reads the tenant and decides again, so a write that did land is not repeated.
//! A write guard, when one is set (a replica's lease under `serve`), is asked right before every
//! write attempt is sent: Graph cannot refuse a stale writer, so the client must not be one.
//!
//! The client also keeps the tenant's clock: every response's `Date` (or the emulator's precise
//! `X-Phasegate-Emulator-Now`) anchors it, so soak times and staleness are judged in the tenant's
//! time, and a rehearsal against `phasegate emulator` can run on its virtual clock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, Url};

use crate::retry::{self, Backoff, Failure, Patience};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use super::settings::GraphSettings;
use crate::domain::time::Timestamp;
use crate::provider::{ErrorKind, ProviderError, WriteGuard};

use super::credential::TokenRequest;
pub use super::credential::{Credential, Secret};

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

impl ServerClock {
    /// The tenant's time now, from the last answer (this machine's clock before any).
    fn reading(&self) -> Timestamp {
        match self.anchor {
            None => Timestamp::from_system_time(std::time::SystemTime::now()),
            Some((at, _)) if self.manual => at,
            Some((at, seen)) => at.plus(
                // Saturating: a factor too large for the calendar ends at its last instant.
                Duration::try_from_secs_f64(seen.elapsed().as_secs_f64() * self.factor)
                    .unwrap_or(Duration::MAX),
            ),
        }
    }
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

/// The most pages one listing follows. Intune's collections come in pages of up to 1,000 items,
/// the directory's in pages of 100 (up to 999 with `$top`): 10,000 pages hold a million group
/// members at the directory's default page size, ten million device statuses at Intune's.
pub const MAX_PAGES: usize = 10_000;

/// A URL on the configured Graph origin: the only kind of URL a request carrying the bearer
/// token is sent to. Only [`GraphClient::target`] makes one.
struct GraphUrl(Url);

pub struct GraphClient {
    http: reqwest::Client,
    settings: GraphSettings,
    /// `graph_url`, parsed: its origin is the only one that receives the token.
    graph: Url,
    credential: Credential,
    token: tokio::sync::Mutex<Option<Token>>,
    clock: Mutex<ServerClock>,
    ca_slot: tokio::sync::Mutex<Option<Instant>>,
    retry: Backoff,
    jitter: AtomicU64,
    /// Asked right before each write is sent (a replica's lease); none: writes go unasked.
    write_guard: Option<Arc<dyn WriteGuard>>,
}

/// Renew the token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// Entra ID's tokens live about an hour (at most a day); a longer claim is not believed.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// AADSTS700024: "Client assertion is not within its valid time range."
const ASSERTION_OUTSIDE_VALIDITY: u64 = 700024;

/// The first of an Entra ID error's `error_codes`.
fn aadsts_code(body: &str) -> Option<u64> {
    serde_json::from_str::<Value>(body).ok()?["error_codes"][0].as_u64()
}

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

/// Where a `3xx` answer pointed, for its error.
fn redirect_note(status: u16, location: Option<&str>) -> Option<String> {
    (300..400).contains(&status).then(|| {
        format!(
            "redirect to {} not followed",
            location.unwrap_or("an unnamed location")
        )
    })
}

fn short(url: &str) -> &str {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = path.find('/').map_or(path, |i| &path[i..]);
    path.split('?').next().unwrap_or(path)
}

/// The `@odata.nextLink` a page's body ends with (its last member, where Graph writes it),
/// found without parsing the page: a guess, requested early and used only when the page's own
/// reading names the same link.
fn trailing_next_link(body: &str) -> Option<String> {
    const KEY: &str = "\"@odata.nextLink\"";
    let inner = body.trim_end().strip_suffix('}')?;
    let at = inner.rfind(KEY)?;
    let value = inner[at + KEY.len()..].trim_start().strip_prefix(':')?;
    serde_json::from_str(value).ok()
}

impl GraphClient {
    pub fn new(
        settings: GraphSettings,
        credential: impl Into<Credential>,
    ) -> Result<GraphClient, ProviderError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let graph = Url::parse(&settings.graph_url).map_err(|e| {
            ProviderError::permanent(format!("invalid graph_url `{}`: {e}", settings.graph_url))
        })?;
        let http = reqwest::Client::builder()
            // A redirect would send the request (a 307 its body: the client secret, a write) to
            // a URL no check has seen.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::permanent(format!("cannot build the HTTP client: {e}")))?;
        Ok(GraphClient {
            http,
            settings,
            graph,
            credential: credential.into(),
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
            write_guard: None,
        })
    }

    /// From now on, every write (each attempt of it) is sent only if `guard` allows it, asked
    /// after the token and the Conditional Access pacing were waited for: as close to the
    /// sending as the client can ask.
    pub fn guard_writes(&mut self, guard: Arc<dyn WriteGuard>) {
        self.write_guard = Some(guard);
    }

    pub fn settings(&self) -> &GraphSettings {
        &self.settings
    }

    /// The tenant's current time.
    pub fn now(&self) -> Timestamp {
        let mut clock = self.clock.lock().expect("clock lock");
        let now = clock.reading().max(clock.floor);
        clock.floor = now;
        now
    }

    /// The tenant's clock as its last answer set it, even where that is behind a moment already
    /// reported by `now` (which never goes back): what the tenant checks an assertion's times
    /// against.
    fn tenant_clock(&self) -> Timestamp {
        self.clock.lock().expect("clock lock").reading()
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
                // A factor that is not a finite, non-negative number is no factor at all.
                clock.factor = scaled
                    .split("factor=")
                    .nth(1)
                    .and_then(|f| f.trim().parse::<f64>().ok())
                    .filter(|f| f.is_finite() && *f >= 0.0)
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

    /// Whether (and after how long) to try again after `failed` failed attempts, the wait taken
    /// from the operation's `patience`.
    fn wait(
        &self,
        patience: &mut Patience,
        failed: u32,
        failure: Failure,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        self.delay(failed, failure, retry_after)
            .filter(|&delay| patience.spend(delay))
    }

    /// The policy's answer alone, for a decision whose wait is taken later.
    fn delay(
        &self,
        failed: u32,
        failure: Failure,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        self.retry
            .wait(failed, failure, retry_after, self.next_jitter())
    }

    /// A valid access token, renewed when it is about to expire (in tenant time) or when asked.
    async fn bearer(&self, renew: bool, patience: &mut Patience) -> Result<String, ProviderError> {
        let mut token = self.token.lock().await;
        if !renew
            && let Some(current) = token.as_ref()
            && self.now().plus(TOKEN_MARGIN) < current.expires_at
        {
            return Ok(current.value.clone());
        }
        let fresh = self.fetch_token(patience).await?;
        let value = fresh.value.clone();
        *token = Some(fresh);
        Ok(value)
    }

    async fn fetch_token(&self, patience: &mut Patience) -> Result<Token, ProviderError> {
        let scope = graph_scope(&self.settings.graph_url);
        let metrics = crate::metrics::global();
        let mut failed = 0;
        // A certificate's assertion carries the time; one refused as outside its validity is
        // made again once, from the tenant's clock the refusal's `Date` just told.
        let mut reclocked = false;
        loop {
            let request = self
                .credential
                .request(&self.settings, &scope, self.tenant_clock())?;
            let method = request.method();
            let sending = match &request {
                TokenRequest::Form { url, form } => self.http.post(url).form(form),
                TokenRequest::Metadata { url } => self.http.get(url).header("Metadata", "true"),
            };
            // An answer whose body never arrived is a transport failure, like no answer at all.
            let sent = match sending.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    response.text().await.map(|body| (status, headers, body))
                }
                Err(e) => Err(e),
            };
            let (status, headers, body) = match sent {
                Ok(answer) => answer,
                Err(e) => {
                    metrics.provider_request("graph", method, crate::metrics::TRANSPORT);
                    failed += 1;
                    let error = format!(
                        "signing in to tenant {}: {}",
                        self.settings.tenant,
                        retry::describe_transport(&e)
                    );
                    let Some(delay) =
                        self.wait(patience, failed, retry::transport_failure(&e), None)
                    else {
                        return Err(ProviderError::transient(error));
                    };
                    metrics.provider_retry("graph");
                    tracing::warn!(%error, ?delay, "token request failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let retry_after = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            let redirect = redirect_note(
                status.as_u16(),
                headers.get("location").and_then(|v| v.to_str().ok()),
            );
            self.observe_clock(&headers);
            metrics.provider_request(
                "graph",
                method,
                crate::metrics::status_class(status.as_u16()),
            );
            if status.as_u16() == 429 {
                metrics.provider_throttled("graph");
            }
            if !reclocked
                && matches!(self.credential, Credential::Certificate(_))
                && aadsts_code(&body) == Some(ASSERTION_OUTSIDE_VALIDITY)
            {
                reclocked = true;
                tracing::info!(
                    "the tenant's clock differs from this machine's; signing again on its time"
                );
                continue;
            }
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
                // The metadata service writes `expires_in` as a string, Entra ID as a number.
                let lifetime = json["expires_in"]
                    .as_u64()
                    .or_else(|| json["expires_in"].as_str().and_then(|t| t.parse().ok()))
                    .unwrap_or(3599)
                    .min(MAX_TOKEN_LIFETIME.as_secs());
                tracing::debug!(lifetime, "signed in to Microsoft Graph");
                return Ok(Token {
                    value,
                    expires_at: self.now().plus(Duration::from_secs(lifetime)),
                });
            }
            if let Some(failure) = retry::status_failure(status.as_u16()) {
                failed += 1;
                if let Some(delay) = self.wait(patience, failed, failure, retry_after) {
                    metrics.provider_retry("graph");
                    tracing::warn!(%status, ?delay, "token endpoint unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            let kind = if retry::status_failure(status.as_u16()).is_some() {
                ErrorKind::Transient
            } else if redirect.is_some() {
                ErrorKind::Permanent
            } else {
                ErrorKind::Auth
            };
            return Err(ProviderError {
                retry_after,
                ..ProviderError::new(
                    kind,
                    format!(
                        "signing in to tenant {} as application {} with its {} failed: {}",
                        self.settings.tenant,
                        self.settings.client_id,
                        self.settings.credential.kind(),
                        redirect.unwrap_or_else(|| describe_error(&body))
                    ),
                )
            });
        }
    }

    /// Where a request carrying the token may go: a path (starting with `/`, relative to v1.0
    /// unless it starts with `/beta/`) on `graph_url`, or an absolute URL on `graph_url`'s origin.
    /// The one check between the token and the network: anything else is refused, whoever
    /// supplied it.
    fn target(&self, path_or_url: &str) -> Result<GraphUrl, ProviderError> {
        let text = if path_or_url.starts_with("/beta/") {
            format!("{}{}", self.settings.graph_url, path_or_url)
        } else if path_or_url.starts_with('/') {
            format!("{}/v1.0{}", self.settings.graph_url, path_or_url)
        } else {
            path_or_url.to_string()
        };
        let url = Url::parse(&text).map_err(|e| {
            ProviderError::permanent(format!("invalid Graph URL `{}`: {e}", short(&text)))
        })?;
        if url.origin() != self.graph.origin() {
            return Err(ProviderError::permanent(format!(
                "refusing to send the Graph token to {}: the configured Graph host is {}",
                url.origin().ascii_serialization(),
                self.graph.origin().ascii_serialization()
            )));
        }
        Ok(GraphUrl(url))
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
        let url = self.target(path_or_url)?;
        let mut patience = self.retry.patience();
        self.send(method, &url, body, headers, access, &mut patience)
            .await
    }

    /// [`call`](Self::call) to a checked URL: the only place the token is attached. Its waits
    /// (and those of a sign-in it needs) are taken from `patience`.
    async fn send(
        &self,
        method: Method,
        url: &GraphUrl,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        access: Access,
        patience: &mut Patience,
    ) -> Result<Value, ProviderError> {
        let what = || format!("{method} {}", short(url.0.as_str()));
        let text = self
            .send_text(method.clone(), url, body, headers, access, patience)
            .await?;
        if text.trim().is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str(&text).map_err(|e| {
                ProviderError::transient(format!("{}: unreadable response: {e}", what()))
            })
        }
    }

    /// [`send`](Self::send), answering a success's body as its text, unparsed.
    async fn send_text(
        &self,
        method: Method,
        url: &GraphUrl,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        access: Access,
        patience: &mut Patience,
    ) -> Result<String, ProviderError> {
        let GraphUrl(url) = url;
        let url = url.as_str();
        let what = format!("{method} {}", short(url));
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
            let token = self.bearer(false, patience).await?;
            let mut request = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token)
                .header("client-request-id", self.request_id());
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if access == Access::Write
                && let Some(guard) = &self.write_guard
            {
                guard.before_write()?;
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
                    let redirect = redirect_note(
                        status,
                        response
                            .headers()
                            .get("location")
                            .and_then(|v| v.to_str().ok()),
                    );
                    response
                        .text()
                        .await
                        .map(|text| (status, retry_after, approval, redirect, text))
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
            let (status, retry_after, approval, redirect, text) = match outcome {
                Ok(reply) => reply,
                Err(e) => {
                    let error = format!("{what}: {}", retry::describe_transport(&e));
                    failed += 1;
                    // A write that got no answer may have been made: the caller reads back.
                    let again = match access {
                        Access::Read => {
                            self.wait(patience, failed, retry::transport_failure(&e), None)
                        }
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
                200..=299 => return Ok(text),
                401 if !renewed => {
                    tracing::info!(%what, "access token rejected; signing in again");
                    metrics.provider_retry("graph");
                    renewed = true;
                    self.bearer(true, patience).await?;
                    continue;
                }
                429 | 500..=599 => {
                    // A throttled request was not carried out; a failed write may have been.
                    let failure = retry::status_failure(status).unwrap_or(Failure::Unavailable);
                    failed += 1;
                    let again = match (failure, access) {
                        (Failure::Unavailable, Access::Write) => None,
                        _ => self.wait(patience, failed, failure, retry_after),
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
            let detail = redirect.unwrap_or_else(|| describe_error(&text));
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

    /// Follows `@odata.nextLink` and hands each page's items to `page`: at most [`MAX_PAGES`]
    /// pages, only on the configured Graph origin, never a link already fetched. The next page
    /// is requested while a page is read, when the page ends with its link (as Graph writes
    /// it).
    pub async fn for_each_page(
        &self,
        path_or_url: &str,
        headers: &[(&str, &str)],
        page: impl FnMut(&[Value]),
    ) -> Result<(), ProviderError> {
        self.for_each_page_bounded(path_or_url, headers, MAX_PAGES, page)
            .await
    }

    async fn for_each_page_bounded(
        &self,
        path_or_url: &str,
        headers: &[(&str, &str)],
        max_pages: usize,
        mut page: impl FnMut(&[Value]),
    ) -> Result<(), ProviderError> {
        self.for_each_page_text_bounded(path_or_url, headers, max_pages, |text| {
            let body: Value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(text).map_err(|e| format!("unreadable response: {e}"))?
            };
            page(body["value"].as_array().map_or(&[][..], Vec::as_slice));
            Ok(body["@odata.nextLink"].as_str().map(str::to_string))
        })
        .await
    }

    /// Pages as [`for_each_page`](Self::for_each_page) does, with the same bounds and checks,
    /// handing each page's body to `page` as text: for a listing large enough that its rows are
    /// parsed straight into the caller's own types, never into a `Value` tree. `page` answers
    /// the page's `@odata.nextLink`, or why it cannot read the page (a transient failure:
    /// nothing of a half-read listing is used).
    pub async fn for_each_page_text(
        &self,
        path_or_url: &str,
        headers: &[(&str, &str)],
        page: impl FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<(), ProviderError> {
        self.for_each_page_text_bounded(path_or_url, headers, MAX_PAGES, page)
            .await
    }

    async fn for_each_page_text_bounded(
        &self,
        path_or_url: &str,
        headers: &[(&str, &str)],
        max_pages: usize,
        mut page: impl FnMut(&str) -> Result<Option<String>, String>,
    ) -> Result<(), ProviderError> {
        let mut url = self.target(path_or_url)?;
        let what = format!("GET {}", short(url.0.as_str()));
        let mut fetched = HashSet::new();
        let mut body = self.page_text(&url, headers).await?;
        loop {
            fetched.insert(url.0.clone());
            // The link the page ends with, if it passes every check a link must, is requested
            // while the page is read.
            let ahead = trailing_next_link(&body).and_then(|link| {
                let url = self.target(&link).ok()?;
                (!fetched.contains(&url.0) && fetched.len() < max_pages).then_some((link, url))
            });
            let (link, ahead) = self
                .read_while_fetching(&body, ahead, headers, &mut page)
                .await;
            let link = link.map_err(|e| {
                ProviderError::transient(format!("GET {}: {e}", short(url.0.as_str())))
            })?;
            let Some(link) = link else {
                break;
            };
            let link = self.target(&link).map_err(|e| {
                ProviderError::permanent(format!(
                    "{what}: @odata.nextLink not followed: {}",
                    e.message
                ))
            })?;
            if fetched.contains(&link.0) {
                return Err(ProviderError::permanent(format!(
                    "{what}: paging loop: @odata.nextLink {} was already fetched in this listing",
                    link.0
                )));
            }
            if fetched.len() >= max_pages {
                return Err(ProviderError::permanent(format!(
                    "{what}: more than {max_pages} pages; stopped paging"
                )));
            }
            body = match ahead {
                Some(ahead) => ahead?,
                None => self.page_text(&link, headers).await?,
            };
            url = link;
        }
        Ok(())
    }

    /// One page of a listing, as text, retried as any read is.
    async fn page_text(
        &self,
        url: &GraphUrl,
        headers: &[(&str, &str)],
    ) -> Result<String, ProviderError> {
        let mut patience = self.retry.patience();
        self.send_text(Method::GET, url, None, headers, Access::Read, &mut patience)
            .await
    }

    /// `page` of `body`, while the page `ahead` (a link, already checked, and its URL) is
    /// requested: the service builds the next page while this one is read. Answers `page`'s
    /// verdict and, when that names the same link, the next page; a guess `page` does not confirm
    /// is dropped unread.
    async fn read_while_fetching(
        &self,
        body: &str,
        ahead: Option<(String, GraphUrl)>,
        headers: &[(&str, &str)],
        page: &mut impl FnMut(&str) -> Result<Option<String>, String>,
    ) -> (
        Result<Option<String>, String>,
        Option<Result<String, ProviderError>>,
    ) {
        use futures_util::future::{Either, select};
        let Some((guess, url)) = ahead else {
            return (page(body), None);
        };
        let confirmed =
            |link: &Result<Option<String>, String>| matches!(link, Ok(Some(l)) if *l == guess);
        let fetch = std::pin::pin!(self.page_text(&url, headers));
        // The request is polled first; the read yields once, so the connection's task gets to
        // send it, and then reads on a thread of its own where the runtime has several, so
        // tasks woken meanwhile (the connection's, answering) do not wait for the read to end.
        let read = std::pin::pin!(async {
            tokio::task::yield_now().await;
            let threaded = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
                runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            });
            if threaded {
                tokio::task::block_in_place(|| page(body))
            } else {
                page(body)
            }
        });
        match select(fetch, read).await {
            Either::Left((next, read)) => {
                let link = read.await;
                let next = confirmed(&link).then_some(next);
                (link, next)
            }
            Either::Right((link, fetch)) => {
                let next = if confirmed(&link) {
                    Some(fetch.await)
                } else {
                    None
                };
                (link, next)
            }
        }
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
        let url = self.target(endpoint)?;
        let mut results: Vec<Option<Result<Value, ProviderError>>> = vec![None; requests.len()];
        for (chunk_index, chunk) in requests.chunks(20).enumerate() {
            let mut pending: Vec<usize> = (0..chunk.len()).collect();
            let mut attempt = 0;
            // One `$batch` of up to 20: its rounds and their requests' retries wait together.
            let mut patience = self.retry.patience();
            while !pending.is_empty() {
                let body = json!({
                    "requests": pending.iter().map(|&i| {
                        let r = &chunk[i];
                        let headers: serde_json::Map<String, Value> = r.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                        json!({"id": r.id, "method": "GET", "url": r.url, "headers": headers})
                    }).collect::<Vec<_>>()
                });
                let reply = self
                    .send(
                        Method::POST,
                        &url,
                        Some(&body),
                        &[],
                        Access::Read,
                        &mut patience,
                    )
                    .await?;
                // This round's answers replace the last round's.
                for &i in &pending {
                    results[chunk_index * 20 + i] = None;
                }
                let mut throttled = Vec::new();
                let mut wait = Duration::ZERO;
                for item in reply["responses"].as_array().into_iter().flatten() {
                    let id = item["id"].as_str().unwrap_or("");
                    let Some(i) = pending.iter().copied().find(|&i| chunk[i].id == id) else {
                        continue;
                    };
                    // A status that is not one (`70000`, `"200"`) is a failure, not a truncation.
                    let status = item["status"]
                        .as_u64()
                        .and_then(|status| u16::try_from(status).ok())
                        .unwrap_or(500);
                    if status == 429 {
                        crate::metrics::global().provider_throttled("graph");
                    }
                    let retry_after = item["headers"]["Retry-After"]
                        .as_str()
                        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                    if let Some(failure) = retry::status_failure(status)
                        && let Some(delay) = self.delay(attempt + 1, failure, retry_after)
                    {
                        throttled.push(i);
                        wait = wait.max(delay);
                    }
                    // Kept as the answer if it is not asked again.
                    results[chunk_index * 20 + i] = Some(if (200..300).contains(&status) {
                        Ok(item["body"].clone())
                    } else {
                        let kind = match status {
                            401 | 403 => ErrorKind::Auth,
                            404 => ErrorKind::NotFound,
                            429 | 500..=599 => ErrorKind::Transient,
                            _ => ErrorKind::Permanent,
                        };
                        Err(ProviderError {
                            retry_after,
                            ..ProviderError::new(
                                kind,
                                format!(
                                    "GET {}: {status} {}",
                                    chunk[i].url.split('?').next().unwrap_or(""),
                                    describe_error(&item["body"].to_string())
                                ),
                            )
                        })
                    });
                }
                pending
                    .retain(|i| results[chunk_index * 20 + i].is_none() || throttled.contains(i));
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
                if !patience.spend(wait) {
                    break;
                }
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

    /// Downloads a pre-authenticated URL (an export job's Azure Storage blob, its shared access
    /// signature in the query) into `into`, at most `max_bytes`. The request carries no token
    /// and no credential: the URL authorizes itself, and it is on another origin than Graph's,
    /// which is the only one the token goes to (`target`). Only `https` is accepted, or `http` to
    /// a loopback address (the emulator). Messages name the URL without its query, which holds
    /// the signature. Retried through the client's retry policy; each try starts the file anew.
    pub async fn download(
        &self,
        url: &str,
        into: &mut std::fs::File,
        max_bytes: u64,
    ) -> Result<u64, ProviderError> {
        use std::io::{Seek, Write};
        let parsed = Url::parse(url)
            .map_err(|e| ProviderError::permanent(format!("invalid download URL: {e}")))?;
        let loopback = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        let shown = format!("{}{}", parsed.origin().ascii_serialization(), parsed.path());
        if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
            return Err(ProviderError::permanent(format!(
                "refusing to download {shown}: only https URLs are downloaded"
            )));
        }
        let what = format!("GET {shown}");
        let io = |e: std::io::Error| ProviderError::transient(format!("{what}: {e}"));
        let mut patience = self.retry.patience();
        let mut failed = 0;
        let metrics = crate::metrics::global();
        loop {
            into.set_len(0).map_err(io)?;
            into.rewind().map_err(io)?;
            let sent = self
                .http
                .get(parsed.clone())
                .timeout(self.settings.request_timeout.max(Duration::from_secs(600)))
                .send()
                .await;
            let (failure, retry_after, error) = match sent {
                Err(e) => (
                    retry::transport_failure(&e),
                    None,
                    format!("{what}: {}", retry::describe_transport(&e)),
                ),
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    metrics.provider_request("graph", "GET", crate::metrics::status_class(status));
                    if status == 200 {
                        let mut total: u64 = 0;
                        let streamed = loop {
                            match response.chunk().await {
                                Ok(Some(chunk)) => {
                                    total += chunk.len() as u64;
                                    if total > max_bytes {
                                        return Err(ProviderError::permanent(format!(
                                            "{what}: larger than {max_bytes} bytes; not downloaded"
                                        )));
                                    }
                                    into.write_all(&chunk).map_err(io)?;
                                }
                                Ok(None) => break Ok(total),
                                Err(e) => break Err(e),
                            }
                        };
                        match streamed {
                            Ok(total) => {
                                into.flush().map_err(io)?;
                                return Ok(total);
                            }
                            Err(e) => (
                                retry::transport_failure(&e),
                                None,
                                format!("{what}: {}", retry::describe_transport(&e)),
                            ),
                        }
                    } else {
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                        let body = response.text().await.unwrap_or_default();
                        let code = body
                            .split_once("<Code>")
                            .and_then(|(_, rest)| rest.split_once("</Code>"))
                            .map_or("", |(code, _)| code);
                        let error = format!("{what}: {status} {code}").trim_end().to_string();
                        match retry::status_failure(status) {
                            Some(failure) => (failure, retry_after, error),
                            None => {
                                let kind = if status == 403 {
                                    ErrorKind::Auth
                                } else {
                                    ErrorKind::Permanent
                                };
                                return Err(ProviderError {
                                    message: error,
                                    kind,
                                    retry_after: None,
                                    reference: None,
                                });
                            }
                        }
                    }
                }
            };
            failed += 1;
            let Some(delay) = self.wait(&mut patience, failed, failure, retry_after) else {
                return Err(ProviderError::transient(error));
            };
            metrics.provider_retry("graph");
            tracing::warn!(%what, attempt = failed, ?delay, %error, "download failed; retrying");
            tokio::time::sleep(delay).await;
        }
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
        let mut patience = self.retry.patience();
        self.bearer(false, &mut patience).await.map(|_| ())
    }

    /// The application roles granted to the app, as its access token's `roles` claim lists them
    /// (learn.microsoft.com/entra/identity-platform/access-token-claims-reference: an app-only
    /// token carries the admin-consented application permissions there). Only read, never
    /// verified: the token's signature is Graph's business, what it says is what Graph enforces.
    pub async fn granted_roles(&self) -> Result<Vec<String>, ProviderError> {
        let mut patience = self.retry.patience();
        let token = self.bearer(false, &mut patience).await?;
        token_roles(&token).map_err(ProviderError::permanent)
    }
}

/// The `roles` claim of a JWT access token (none: an empty list).
pub fn token_roles(token: &str) -> Result<Vec<String>, String> {
    use base64::Engine as _;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("the access token is not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("the access token's claims are not base64url: {e}"))?;
    let claims: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the access token's claims are not JSON: {e}"))?;
    Ok(claims["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect())
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
mod fuzz;

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

    // ---- where the token goes, and paging: real sockets on loopback ----

    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use crate::testing::{GRAPH_TRAFFIC, Script, bind, serve};

    type Answer = Option<(u16, Vec<(&'static str, String)>, String)>;

    const TOKEN_PATH: &str = "/tenant/oauth2/v2.0/token";

    fn token() -> Answer {
        Some((
            200,
            Vec::new(),
            json!({"access_token": "t", "expires_in": 3600}).to_string(),
        ))
    }

    fn page(items: &[u32], next: Option<String>) -> Answer {
        let mut body = json!({ "value": items });
        if let Some(next) = next {
            body["@odata.nextLink"] = json!(next);
        }
        Some((200, Vec::new(), body.to_string()))
    }

    fn not_found() -> Answer {
        Some((404, Vec::new(), String::new()))
    }

    /// A client whose Graph and login hosts are `graph` and `login`.
    fn client(graph: &str, login: &str) -> GraphClient {
        let settings = GraphSettings {
            tenant: "tenant".into(),
            client_id: "client".into(),
            credential: crate::provider::graph::settings::CredentialSettings::ClientSecret {
                env: "UNUSED".into(),
            },
            graph_url: graph.into(),
            login_url: login.into(),
            ca_requests_per_second: 1.0,
            request_timeout: Duration::from_secs(10),
            observe_through: Default::default(),
        };
        GraphClient::new(settings, Secret::new("s".into())).unwrap()
    }

    /// A host that is not the client's: counts every connection, answers an empty page.
    async fn another_host() -> (String, Arc<AtomicUsize>) {
        let (listener, url) = bind().await;
        let script: Arc<Script> = Arc::new(|_: &str, _: &str, _| page(&[], None));
        (url, serve(listener, script))
    }

    /// The Graph (and login) host: the token endpoint, and `answer(own address, path, nth)` for
    /// every GET.
    async fn graph_host(
        answer: impl Fn(&str, &str, u32) -> Answer + Send + Sync + 'static,
    ) -> String {
        let (listener, url) = bind().await;
        let own = url.clone();
        let script: Arc<Script> =
            Arc::new(move |method: &str, path: &str, nth| match (method, path) {
                ("POST", TOKEN_PATH) => token(),
                ("GET", _) => answer(&own, path, nth),
                _ => not_found(),
            });
        serve(listener, script);
        url
    }

    fn host_of(url: &str) -> &str {
        url.trim_start_matches("http://")
    }

    #[tokio::test]
    async fn a_next_link_to_another_host_is_refused_and_that_host_never_hears_from_us() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let (other, other_connections) = another_host().await;
        let link = format!("{other}/v1.0/list?$skiptoken=2");
        let graph = graph_host(move |_, path, _| match path {
            "/v1.0/list" => page(&[1, 2], Some(link.clone())),
            _ => not_found(),
        })
        .await;
        let client = client(&graph, &graph);
        let mut items = Vec::new();
        let listed = client
            .for_each_page("/list", &[], |p| items.extend_from_slice(p))
            .await;
        // Any absolute URL, not only a nextLink, meets the same check.
        let called = client
            .call(
                Method::GET,
                &format!("{other}/v1.0/list"),
                None,
                &[],
                Access::Read,
            )
            .await;
        assert_eq!(other_connections.load(Ordering::SeqCst), 0);
        let error = listed.unwrap_err();
        assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
        assert!(
            error.message.contains("@odata.nextLink not followed")
                && error.message.contains(host_of(&other))
                && error.message.contains(host_of(&graph)),
            "{}",
            error.message
        );
        assert_eq!(items.len(), 2, "the first page was handed over");
        let error = called.unwrap_err();
        assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
        assert!(error.message.contains(host_of(&other)), "{}", error.message);
    }

    #[tokio::test]
    async fn a_page_linking_to_itself_is_a_loop_found_at_once() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        // Links to itself a hundred times, then ends: what endless paging would have fetched.
        let graph = graph_host(move |own, path, nth| {
            counted.fetch_add(1, Ordering::SeqCst);
            match path {
                "/v1.0/list" if nth < 100 => page(&[1], Some(format!("{own}/v1.0/list"))),
                "/v1.0/list" => page(&[], None),
                _ => not_found(),
            }
        })
        .await;
        let error = client(&graph, &graph)
            .for_each_page("/list", &[], |_| {})
            .await
            .unwrap_err();
        assert!(fetches.load(Ordering::SeqCst) <= 2, "{fetches:?} fetches");
        assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
        assert!(error.message.contains("paging loop"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_loop_through_several_pages_is_found_when_it_comes_round() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        // 1 → 2 → 3 → 1 → …, a hundred times round, then ends.
        let graph = graph_host(move |own, path, nth| {
            counted.fetch_add(1, Ordering::SeqCst);
            let next = |n: u32| (nth < 100).then(|| format!("{own}/v1.0/list?$skiptoken={n}"));
            match path {
                "/v1.0/list?$skiptoken=1" => page(&[1], next(2)),
                "/v1.0/list?$skiptoken=2" => page(&[2], next(3)),
                "/v1.0/list?$skiptoken=3" => page(&[3], next(1)),
                _ => not_found(),
            }
        })
        .await;
        let error = client(&graph, &graph)
            .for_each_page("/list?$skiptoken=1", &[], |_| {})
            .await
            .unwrap_err();
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(error.message.contains("paging loop"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_listing_longer_than_the_bound_stops_there() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        // Every page links to a new one, up to 1,000.
        let graph = graph_host(move |own, path, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            let n: u32 = path
                .strip_prefix("/v1.0/list?$skiptoken=")
                .and_then(|n| n.parse().ok())?;
            page(
                &[n],
                (n < 1000).then(|| format!("{own}/v1.0/list?$skiptoken={}", n + 1)),
            )
        })
        .await;
        let client = client(&graph, &graph);
        let mut items = Vec::new();
        let error = client
            .for_each_page_bounded("/list?$skiptoken=1", &[], 5, |p| items.extend_from_slice(p))
            .await
            .unwrap_err();
        assert_eq!(fetches.load(Ordering::SeqCst), 5);
        assert_eq!(items.len(), 5);
        assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
        assert!(
            error.message.contains("more than 5 pages"),
            "{}",
            error.message
        );
    }

    #[test]
    fn the_next_link_a_page_ends_with_is_found_without_parsing_the_page() {
        let link = "http://127.0.0.1:1/v1.0/list?$skiptoken=a%2Fb";
        let page = json!({"value": [{"@odata.nextLink": "inner"}], "@odata.nextLink": link});
        assert_eq!(trailing_next_link(&page.to_string()).as_deref(), Some(link));
        let spaced = "{\"value\": [],\n  \"@odata.nextLink\" :\n \"http:\\/\\/h\\/x\" }\n";
        assert_eq!(trailing_next_link(spaced).as_deref(), Some("http://h/x"));
        // Not the page's last member, in a row, not a string, or the page cut short: no guess.
        for body in [
            r#"{"@odata.nextLink":"http://h/x","value":[]}"#,
            r#"{"value":[{"@odata.nextLink":"http://h/x"}]}"#,
            r#"{"value":[],"@odata.nextLink":null}"#,
            r#"{"value":[],"@odata.nextLink":"http://h/x","#,
            "",
        ] {
            assert_eq!(trailing_next_link(body), None, "{body}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_page_is_requested_while_a_page_is_read_and_used_only_when_confirmed() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let asked = Arc::new(Mutex::new(Vec::<String>::new()));
        let log = asked.clone();
        // A host that keeps its connections open, as Graph does (the scripted hosts above
        // close each one). Page 1 ends with a link to page 2, which ends with one to a decoy
        // the reader does not confirm: it names page 3 instead.
        let (listener, graph) = bind().await;
        let own = graph.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let (log, own) = (log.clone(), own.clone());
            async move {
                let path = uri.to_string();
                log.lock().unwrap().push(path.clone());
                let link = |to: &str| Some(format!("{own}/v1.0/list?$skiptoken={to}"));
                let (_, _, body) = match path.as_str() {
                    TOKEN_PATH => token(),
                    "/v1.0/list" => page(&[1], link("2")),
                    "/v1.0/list?$skiptoken=2" => page(&[2], link("decoy")),
                    "/v1.0/list?$skiptoken=decoy" => page(&[666], None),
                    "/v1.0/list?$skiptoken=3" => page(&[3], None),
                    _ => page(&[], None),
                }
                .unwrap();
                ([("content-type", "application/json")], body)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = client(&graph, &graph);
        let mut items = Vec::new();
        let requested = |path: &str| asked.lock().unwrap().iter().any(|p| p == path);
        client
            .for_each_page_text("/list", &[], |text| {
                let body: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                let item = body["value"][0].as_u64().unwrap_or_default();
                items.push(item);
                let next = match item {
                    1 => "2",
                    2 => "3",
                    _ => return Ok(None),
                };
                // Polled, not slept on: page 1's next page is asked for before page 1 is read.
                if item == 1 {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !requested("/v1.0/list?$skiptoken=2") && Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                    assert!(
                        requested("/v1.0/list?$skiptoken=2"),
                        "page 2 was not asked for"
                    );
                }
                Ok(Some(format!("{graph}/v1.0/list?$skiptoken={next}")))
            })
            .await
            .unwrap();
        assert_eq!(items, [1, 2, 3], "the decoy's page was not read");
        assert!(requested("/v1.0/list?$skiptoken=3"));
    }

    #[tokio::test]
    async fn a_guessed_page_that_fails_fails_nothing_unless_the_listing_needs_it() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        // The pages end with links to a page that is not found; the reader names none.
        let graph = graph_host(move |own, path, _| match path {
            "/v1.0/list" => page(&[1], Some(format!("{own}/v1.0/gone"))),
            _ => not_found(),
        })
        .await;
        let client = client(&graph, &graph);
        client
            .for_each_page_text("/list", &[], |_| Ok(None))
            .await
            .unwrap();
        // Where the reader names it, its failure is the listing's.
        let error = client
            .for_each_page("/list", &[], |_| {})
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorKind::NotFound, "{error:?}");
    }

    #[tokio::test]
    async fn a_listing_of_several_pages_on_the_graph_host_is_read_whole() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let graph = graph_host(|own, path, _| match path {
            "/v1.0/list" => page(&[1, 2], Some(format!("{own}/v1.0/list?$skiptoken=2"))),
            "/v1.0/list?$skiptoken=2" => {
                page(&[3, 4], Some(format!("{own}/v1.0/list?$skiptoken=3")))
            }
            "/v1.0/list?$skiptoken=3" => page(&[5], None),
            _ => not_found(),
        })
        .await;
        let client = client(&graph, &graph);
        let mut items = Vec::new();
        // Exactly as many pages as the bound allows.
        client
            .for_each_page_bounded("/list", &[], 3, |p| items.extend_from_slice(p))
            .await
            .unwrap();
        assert_eq!(items, [1, 2, 3, 4, 5].map(|n| json!(n)));
        items.clear();
        client
            .for_each_page("/list", &[], |p| items.extend_from_slice(p))
            .await
            .unwrap();
        assert_eq!(items.len(), 5);
    }

    #[tokio::test]
    async fn a_redirect_to_another_host_is_never_followed() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let (other, other_connections) = another_host().await;
        let elsewhere = format!("{other}/somewhere");
        // The login host sends the token request (with the client secret) on; the Graph host
        // its reads.
        let (listener, login) = bind().await;
        let to = elsewhere.clone();
        let login_script: Arc<Script> = Arc::new(move |_: &str, _: &str, _| {
            Some((307, vec![("Location", to.clone())], String::new()))
        });
        serve(listener, login_script);
        let to = elsewhere.clone();
        let graph =
            graph_host(move |_, _, _| Some((307, vec![("Location", to.clone())], String::new())))
                .await;

        let signing_in = client(&graph, &login).sign_in().await;
        let reading = client(&graph, &graph)
            .call(Method::GET, "/list", None, &[], Access::Read)
            .await;
        assert_eq!(other_connections.load(Ordering::SeqCst), 0);
        for error in [signing_in.unwrap_err(), reading.unwrap_err()] {
            assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
            assert!(
                error
                    .message
                    .contains(&format!("redirect to {elsewhere} not followed")),
                "{}",
                error.message
            );
        }
    }

    // ---- what the fuzz target (client/fuzz.rs) found ----

    #[test]
    fn a_clock_factor_that_is_no_number_leaves_the_clock_running() {
        for factor in ["NaN", "-1", "inf", "1e300"] {
            let client = client("http://127.0.0.1:9", "http://127.0.0.1:9");
            let mut headers = HeaderMap::new();
            headers.insert("date", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
            let clock = format!("scaled; factor={factor}");
            headers.insert("x-phasegate-emulator-clock", clock.parse().unwrap());
            client.observe_clock(&headers);
            let (first, second) = (client.now(), client.now());
            assert!(second >= first, "{factor}");
            assert!(client.clock_factor().is_finite(), "{factor}");
        }
    }

    #[tokio::test]
    async fn retry_after_at_the_longest_wait_is_waited_once_per_call_not_per_attempt() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let graph = graph_host(move |_, _, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Some((429, vec![("Retry-After", "0.05".into())], String::new()))
        })
        .await;
        let mut client = client(&graph, &graph);
        client.retry = Backoff {
            longest_wait: Duration::from_millis(50),
            ..Backoff::GRAPH
        };
        let error = client
            .call(Method::GET, "/list", None, &[], Access::Read)
            .await
            .unwrap_err();
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "one wait, then given up");
        assert_eq!(error.kind, ErrorKind::Transient, "{error:?}");
        assert_eq!(error.retry_after, Some(Duration::from_millis(50)));
    }

    #[tokio::test]
    async fn a_token_answer_cut_short_is_a_transport_failure_tried_again() {
        use crate::testing::{RawScript, serve_raw};
        let _serial = GRAPH_TRAFFIC.lock().await;
        let (listener, url) = bind().await;
        let token = r#"{"access_token":"t","expires_in":3600}"#;
        let script: Arc<RawScript> = Arc::new(move |_: &str, _: &str, nth| {
            // The first answer promises more body than it sends.
            let declared = if nth == 0 {
                token.len() + 10
            } else {
                token.len()
            };
            Some(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n{token}")
                    .into_bytes(),
            )
        });
        let connections = serve_raw(listener, script);
        client(&url, &url).sign_in().await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_batch_status_that_is_no_status_is_a_failure() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let (listener, url) = bind().await;
        let script: Arc<Script> = Arc::new(|method: &str, path: &str, _| match (method, path) {
            ("POST", TOKEN_PATH) => token(),
            ("POST", "/v1.0/$batch") => Some((
                200,
                Vec::new(),
                json!({"responses": [
                    {"id": "0", "status": 65736, "body": {"value": []}},
                    {"id": "1", "status": "200", "body": {}},
                    {"id": "2", "status": 200, "body": {"ok": true}},
                ]})
                .to_string(),
            )),
            _ => not_found(),
        });
        serve(listener, script);
        let mut client = client(&url, &url);
        client.retry = Backoff {
            attempts: 2,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(1),
            longest_wait: Duration::from_millis(10),
        };
        let requests: Vec<BatchRequest> = (0..3)
            .map(|i| BatchRequest {
                id: i.to_string(),
                url: format!("/item/{i}"),
                headers: Vec::new(),
            })
            .collect();
        let answers = client.batch_get(&requests).await.unwrap();
        // 65736 is not 200 (65736 mod 2^16); a status as a string is not one either.
        assert!(answers[0].is_err(), "{:?}", answers[0]);
        assert!(answers[1].is_err(), "{:?}", answers[1]);
        assert_eq!(answers[2].as_ref().unwrap(), &json!({"ok": true}));
    }

    /// A guard that allows the first `allowed` writes and counts how often it was asked.
    struct Countdown {
        allowed: AtomicUsize,
        asked: AtomicUsize,
    }

    impl WriteGuard for Countdown {
        fn before_write(&self) -> Result<(), ProviderError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let left = self.allowed.load(Ordering::SeqCst);
            if left == 0 {
                return Err(ProviderError::transient("the lease was lost"));
            }
            self.allowed.store(left - 1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_write_the_guard_refuses_is_never_sent_and_reads_do_not_ask_it() {
        let _serial = GRAPH_TRAFFIC.lock().await;
        let patches = Arc::new(AtomicUsize::new(0));
        let counted = patches.clone();
        let (listener, graph) = bind().await;
        let script: Arc<Script> = Arc::new(move |method: &str, path: &str, _| match method {
            "POST" if path == TOKEN_PATH => token(),
            "PATCH" => {
                counted.fetch_add(1, Ordering::SeqCst);
                Some((204, Vec::new(), String::new()))
            }
            "GET" => page(&[1], None),
            _ => not_found(),
        });
        serve(listener, script);
        let mut client = client(&graph, &graph);
        let guard = Arc::new(Countdown {
            allowed: AtomicUsize::new(1),
            asked: AtomicUsize::new(0),
        });
        client.guard_writes(guard.clone());
        let body = json!({"description": "d"});
        let write = || {
            client.call(
                Method::PATCH,
                "/deviceManagement/deviceCompliancePolicies/p",
                Some(&body),
                &[],
                Access::Write,
            )
        };
        write().await.unwrap();
        client
            .call(Method::GET, "/list", None, &[], Access::Read)
            .await
            .unwrap();
        let refused = write().await.unwrap_err();
        assert_eq!(refused.message, "the lease was lost");
        assert_eq!(
            patches.load(Ordering::SeqCst),
            1,
            "the refused write was sent"
        );
        assert_eq!(
            guard.asked.load(Ordering::SeqCst),
            2,
            "asked once per write"
        );
    }
}
