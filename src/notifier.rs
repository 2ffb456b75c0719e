//! The webhook channel: its plan settings (`[[webhook]]` `url`, `secret_env`) and its deliveries
//! for the outbox.
//!
//! A delivery is a JSON POST with an `Idempotency-Key` header carrying the effect's durable key
//! (`<store id>/<rollout>:<seq>.<index>`), the same on every attempt, so a receiver can drop duplicates:
//! phasegate delivers at least once (again after a crash between sending and recording), never
//! with a new key. The body carries the audit trail's head at the event that sent it (`chainHead`:
//! store, rollout, seq, hash; the same on every attempt), so receivers hold evidence outside the
//! store (`phasegate verify --against`). With `secret_env` set,
//! `X-Phasegate-Signature: sha256=<hex HMAC-SHA256 of the body>` lets the receiver check where it
//! came from.
//!
//! Only a 2xx answer is a delivery. Redirects are not followed: the body (and its signature)
//! goes to the configured address and nowhere else, and a 3xx is, like a 4xx other than 408/429,
//! an answer trying again will not change: the notification stays pending, the warning says why,
//! and a later pass tries once more. No answer, a 408, a 429 or a 5xx is retried in-line first.
//!
//! A webhook URL often carries a credential (`https://user:pass@…`, `?token=…`). It is used as
//! written for the POST and nowhere else: wherever it is shown — logs, error messages, the audit
//! trail, `status`, `history`, the API — it goes through [`redact_url`].

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

use serde::Deserialize;
use toml::Spanned;

use crate::adapters::{self, ChannelKind};
use crate::domain::event::{ChannelAddress, Message};
use crate::domain::plan::Diagnostic;
use crate::domain::rollout::RolloutStatus;
use crate::retry::{self, Failure, parse_retry_after};

pub const WEBHOOK: ChannelKind = ChannelKind {
    name: ChannelAddress::WEBHOOK,
    check: |source| parse_all(source).err().unwrap_or_default(),
    redact,
};

/// Where a webhook delivers, as its `[[webhook]]` table says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookAddress {
    pub url: String,
    /// The environment variable with the key that signs each delivery (HMAC-SHA256).
    pub secret_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    secret_env: Option<Spanned<String>>,
    /// The domain's (which statuses are announced), checked there.
    #[allow(dead_code)]
    events: Option<toml::Value>,
}

/// Every `[[webhook]]` of a plan's text, or every problem with them at its place.
pub fn parse_all(source: &str) -> Result<Vec<WebhookAddress>, Vec<Diagnostic>> {
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        webhook: Vec<RawWebhook>,
    }
    let doc: Doc = toml::from_str(source).map_err(|e| {
        vec![adapters::foreign_key(
            adapters::toml_diagnostic(e),
            "a webhook",
        )]
    })?;
    let mut problems = Vec::new();
    let mut addresses = Vec::new();
    for raw in doc.webhook {
        let url = adapters::endpoint_url(&raw.url, "webhook URL")
            .map_err(|mut d| {
                // The message names the URL: without its credentials.
                let written = raw.url.get_ref().trim();
                d.message = d.message.replace(written, &redact_url(written));
                problems.push(d)
            })
            .unwrap_or_default();
        let secret_env = raw.secret_env.and_then(|env| {
            adapters::secret_variable(&env, "secret_env")
                .map_err(|d| problems.push(d))
                .ok()
        });
        addresses.push(WebhookAddress { url, secret_env });
    }
    if problems.is_empty() {
        Ok(addresses)
    } else {
        Err(problems)
    }
}

/// The webhook an outbox record's address names.
pub fn of(address: &ChannelAddress) -> Result<WebhookAddress, String> {
    if address.kind() != ChannelAddress::WEBHOOK {
        return Err(format!(
            "no notification channel of kind `{}`",
            address.kind()
        ));
    }
    let source = adapters::channel_source(address);
    adapters::reparse("webhook", &source, parse_all)?
        .pop()
        .ok_or_else(|| "a webhook without settings".to_string())
}

/// Where a notification goes, for logs and the audit trail: the URL, redacted (an e-mail
/// announcement's relay).
pub fn describe(address: &ChannelAddress) -> String {
    use crate::announce::{email, slack, teams};
    let described = match address.kind() {
        email::NAME => email::of(address).map(|e| format!("smtp://{}:{}", e.host, e.port)),
        teams::NAME => teams::of(address).map(|t| teams::redact_url(&t.url)),
        slack::NAME => slack::of(address).map(|t| slack::redact_url(&t.url)),
        _ => of(address).map(|webhook| redact_url(&webhook.url)),
    };
    described.unwrap_or_else(|_| address.kind().to_string())
}

/// A webhook URL as it may be shown (logs, error messages, the audit trail, `status`,
/// `history`, the API): user information becomes `***@`, every query value `***` (a value-less
/// item too), a fragment `#***`; scheme, host, port and path stay, so an operator still
/// recognises the endpoint. A secret in the path itself is not recognised.
///
/// Never fails. Text that does not parse as a URL with a host (it cannot be posted to either)
/// is masked from its first `?` or `#` on, and up to the last `@` before that.
pub fn redact_url(url: &str) -> String {
    let parsed = match url::Url::parse(url) {
        Ok(parsed) if parsed.has_host() => parsed,
        _ => return redact_unparsed(url),
    };
    let mut shown = format!("{}://", parsed.scheme());
    if !parsed.username().is_empty() || parsed.password().is_some() {
        shown.push_str("***@");
    }
    shown.push_str(parsed.host_str().unwrap_or_default());
    if let Some(port) = parsed.port() {
        let _ = write!(shown, ":{port}");
    }
    shown.push_str(parsed.path());
    if let Some(query) = parsed.query() {
        shown.push('?');
        shown.push_str(&redact_query(query));
    }
    if parsed.fragment().is_some() {
        shown.push_str("#***");
    }
    shown
}

/// `a=1&b&c=` → `a=***&***&c=***`: the names stay, the values go.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|item| match item.split_once('=') {
            _ if item.is_empty() => String::new(),
            Some((name, _)) => format!("{name}=***"),
            None => "***".to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn redact_unparsed(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    let cut = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before, after) = rest.split_at(cut);
    let before = match before.rfind('@') {
        Some(at) => format!("***@{}", &before[at + 1..]),
        None => before.to_string(),
    };
    let after = match after.chars().next() {
        Some(mark) => format!("{mark}***"),
        None => String::new(),
    };
    format!("{scheme}{before}{after}")
}

/// A webhook's address as it may be shown: its `url` through [`redact_url`].
fn redact(address: &ChannelAddress) -> ChannelAddress {
    let mut settings = address.settings();
    if let Some(serde_json::Value::String(url)) = settings.get_mut("url") {
        *url = redact_url(url);
    }
    ChannelAddress::new(address.kind(), settings)
}

/// One notification to deliver.
pub struct Delivery<'a> {
    pub key: &'a str,
    pub to: &'a ChannelAddress,
    /// The exact bytes a webhook POSTs (the same on every attempt).
    pub body: Vec<u8>,
    /// An announcement's message and what it is about, for the channels that format their own
    /// payload (e-mail, Teams, Slack).
    pub about: Option<About<'a>>,
}

/// What an announcement tells, and of which rollout.
#[derive(Clone, Copy, Debug)]
pub struct About<'a> {
    pub message: &'a Message,
    pub rollout: &'a str,
    pub plan: &'a str,
    pub status: RolloutStatus,
}

/// A delivery that did not arrive, with what the retry policy needs to know about it.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct NotifyError {
    pub message: String,
    /// How the attempt failed; `None` when trying again cannot help (a missing signing key).
    pub failure: Option<Failure>,
    /// What the receiver asked for.
    pub retry_after: Option<Duration>,
}

impl NotifyError {
    /// A failure trying again will not change.
    pub fn final_(message: String) -> NotifyError {
        NotifyError {
            message,
            failure: None,
            retry_after: None,
        }
    }
}

#[async_trait]
pub trait Notifier: Send + Sync {
    /// Delivers once; `Ok` with the receiver's HTTP status when it took the notification (2xx).
    /// Otherwise `Err`: with a `failure` when trying again may help (no answer, 408, 429, 5xx),
    /// without one when it cannot (a redirect, another 4xx, a missing signing key). Either way
    /// the notification stays pending; the engine retries only the first kind in-line.
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError>;
}

pub struct WebhookNotifier {
    http: reqwest::Client,
}

impl WebhookNotifier {
    pub fn new() -> WebhookNotifier {
        let _ = rustls::crypto::ring::default_provider().install_default();
        WebhookNotifier {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                // A redirect would re-send the body and its signature (307/308) to wherever the
                // receiver points; it is an answer like any other, and not a delivery.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("a client without custom TLS settings always builds"),
        }
    }
}

/// The process's notifier: every channel's adapter, one connection pool for every delivery
/// (`crate::announce::Channels`).
pub fn shared() -> &'static dyn Notifier {
    crate::announce::shared()
}

impl Default for WebhookNotifier {
    fn default() -> WebhookNotifier {
        WebhookNotifier::new()
    }
}

/// `sha256=<hex>` of the body under the key.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends one POST: no answer, or a 408, 429 or 5xx (with its `Retry-After`), is an error that
/// may be retried; any other answer is the caller's to read.
pub async fn send(
    request: reqwest::RequestBuilder,
    shown: &str,
) -> Result<reqwest::Response, NotifyError> {
    let response = request.send().await.map_err(|e| NotifyError {
        message: format!("POST {shown}: {}", retry::describe_transport(&e)),
        failure: Some(retry::transport_failure(&e)),
        retry_after: None,
    })?;
    let status = response.status().as_u16();
    if let Some(failure) = retry::status_failure(status) {
        return Err(NotifyError {
            message: format!("POST {shown}: answered {status}"),
            failure: Some(failure),
            retry_after: response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now())),
        });
    }
    Ok(response)
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError> {
        let result = self.post(delivery).await;
        let delivered = matches!(result, Ok(200..=299));
        crate::metrics::global().notification(if delivered { "delivered" } else { "failed" });
        result
    }
}

impl WebhookNotifier {
    /// One attempt, as `deliver` describes.
    async fn post(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError> {
        let to = of(delivery.to).map_err(NotifyError::final_)?;
        let shown = redact_url(&to.url);
        let mut request = self
            .http
            .post(&to.url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", delivery.key)
            .body(delivery.body.clone());
        if let Some(env) = &to.secret_env {
            let secret = std::env::var(env).map_err(|_| {
                NotifyError::final_(format!(
                    "the webhook signing key is not set: put it in {env}"
                ))
            })?;
            request = request.header(
                "X-Phasegate-Signature",
                signature(secret.as_bytes(), &delivery.body),
            );
        }
        let response = send(request, &shown).await?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(status),
            300..=399 => {
                let target = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(|location| {
                        let resolved =
                            url::Url::parse(&to.url).and_then(|base| base.join(location));
                        match resolved {
                            Ok(target) => redact_url(target.as_str()),
                            Err(_) => redact_url(location),
                        }
                    });
                Err(NotifyError::final_(format!(
                    "POST {shown}: answered {status}, a redirect{}; redirects are not followed: \
                     put the address that takes the notification in the webhook's url",
                    target.map(|t| format!(" to {t}")).unwrap_or_default()
                )))
            }
            _ => Err(NotifyError::final_(format!(
                "POST {shown}: answered {status}, which trying again will not change"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A receiver on loopback that answers every request with `answer`; its address, and how
    /// many connections it accepted. A plain thread: the client under test runs on the test's
    /// runtime.
    fn receiver(answer: String) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as much body as it announces.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request).to_lowercase();
                let head_end = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        (url, accepted)
    }

    fn webhook(url: &str) -> ChannelAddress {
        let mut settings = serde_json::Map::new();
        settings.insert("url".into(), url.into());
        ChannelAddress::new(ChannelAddress::WEBHOOK, settings)
    }

    fn answer(status: u16, headers: &str) -> String {
        format!(
            "HTTP/1.1 {status} Answer\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    }

    // These call `post`, not `deliver`: the metrics tests count this binary's deliveries.
    #[tokio::test]
    async fn a_redirect_is_not_followed_and_is_not_a_delivery() {
        let notifier = WebhookNotifier::new();
        for status in [301, 302, 303, 307, 308] {
            let (elsewhere, reached) = receiver(answer(200, ""));
            let (url, asked) =
                receiver(answer(status, &format!("Location: {elsewhere}/stolen\r\n")));
            let to = webhook(&format!("{url}/hook"));
            let delivery = Delivery {
                key: "r:1.0",
                to: &to,
                body: br#"{"status":"held"}"#.to_vec(),
                about: None,
            };
            let result = notifier.post(&delivery).await;
            assert_eq!(asked.load(Ordering::SeqCst), 1, "{status}");
            assert_eq!(
                reached.load(Ordering::SeqCst),
                0,
                "{status}: the body and signature went to the redirect's target"
            );
            let e = result.expect_err(&format!("{status} is not a delivery"));
            assert_eq!(
                e.failure, None,
                "{status}: a redirect does not change on retry"
            );
            assert!(
                e.message.contains(&format!("answered {status}"))
                    && e.message.contains("redirect")
                    && e.message.contains(&format!("{elsewhere}/stolen")),
                "{}",
                e.message
            );
        }
    }

    #[tokio::test]
    async fn only_a_2xx_is_a_delivery_and_a_final_answer_is_not_retried() {
        let notifier = WebhookNotifier::new();
        for status in [200, 202, 204, 400, 401, 404, 410, 503, 408, 429] {
            let (url, _) = receiver(answer(status, ""));
            let to = webhook(&format!("{url}/hook"));
            let delivery = Delivery {
                key: "r:1.0",
                to: &to,
                body: b"{}".to_vec(),
                about: None,
            };
            let result = notifier.post(&delivery).await;
            match status {
                200..=299 => assert_eq!(result.ok(), Some(status)),
                408 | 429 | 500..=599 => {
                    let e = result.expect_err("not a delivery");
                    assert!(
                        e.failure.is_some(),
                        "{status} is worth retrying: {}",
                        e.message
                    );
                }
                _ => {
                    let e = result.expect_err("not a delivery");
                    assert_eq!(e.failure, None, "{status} is final: {}", e.message);
                    assert!(
                        e.message.contains(&format!("answered {status}")),
                        "{}",
                        e.message
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failed_delivery_names_the_endpoint_without_its_credentials() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let to = webhook(&format!(
            "http://hooks:hunter2@127.0.0.1:{port}/in?token=tok-123&x=1"
        ));
        let delivery = Delivery {
            key: "r:1.0",
            to: &to,
            body: b"{}".to_vec(),
            about: None,
        };
        let e = WebhookNotifier::new().post(&delivery).await.unwrap_err();
        assert!(
            e.message.starts_with(&format!(
                "POST http://***@127.0.0.1:{port}/in?token=***&x=***: "
            )),
            "{}",
            e.message
        );
        assert!(!e.message.contains("hunter2") && !e.message.contains("tok-123"));
        assert_eq!(
            describe(&to),
            format!("http://***@127.0.0.1:{port}/in?token=***&x=***")
        );
    }

    #[test]
    fn redaction_masks_user_information() {
        assert_eq!(
            redact_url("https://user:pass@hooks.example.com/phasegate"),
            "https://***@hooks.example.com/phasegate"
        );
        assert_eq!(
            redact_url("https://only-a-user@hooks.example.com:8443/in"),
            "https://***@hooks.example.com:8443/in"
        );
        assert_eq!(
            redact_url("http://:pass@[::1]:9000/in"),
            "http://***@[::1]:9000/in"
        );
    }

    #[test]
    fn redaction_masks_every_query_value_and_keeps_the_names() {
        assert_eq!(
            redact_url("https://hooks.example.com/in?token=secret&team=ops"),
            "https://hooks.example.com/in?token=***&team=***"
        );
        assert_eq!(
            redact_url("https://u:p@hooks.example.com/in?sig=abc%3D%3D&&bare&empty="),
            "https://***@hooks.example.com/in?sig=***&&***&empty=***"
        );
    }

    #[test]
    fn redaction_masks_a_fragment() {
        assert_eq!(
            redact_url("https://hooks.example.com/in#access_token=secret"),
            "https://hooks.example.com/in#***"
        );
        assert_eq!(
            redact_url("https://hooks.example.com/in?token=secret#x"),
            "https://hooks.example.com/in?token=***#***"
        );
    }

    #[test]
    fn a_url_without_credentials_is_shown_as_written() {
        for url in [
            "https://hooks.example.com/phasegate",
            "http://127.0.0.1:8080/hook",
            "https://hooks.example.com/a/b/c/",
            "http://[::1]:9000/in",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn redacting_twice_changes_nothing_more() {
        for url in [
            "https://user:pass@hooks.example.com/in?token=secret&x#frag",
            "user:pass@hooks.example.com/in?token=secret",
        ] {
            let once = redact_url(url);
            assert_eq!(redact_url(&once), once, "{url}");
        }
    }

    #[test]
    fn text_that_is_not_a_url_is_masked_without_panicking() {
        let cases = [
            ("", ""),
            ("not a url", "not a url"),
            ("://", "://"),
            ("http://", "http://"),
            (
                "http://user:pass@exa mple.com/in?token=secret",
                "http://***@exa mple.com/in?***",
            ),
            (
                "user:pass@hooks.example.com/in?token=secret",
                "***@hooks.example.com/in?***",
            ),
            ("http://[::1/in#secret", "http://[::1/in#***"),
            ("http://a@b@c:99999/x?secret", "http://***@c:99999/x?***"),
            ("mailto:pass@example.com", "***@example.com"),
            (
                "ünïcødé://pässword@høst/?sécret=1",
                "ünïcødé://***@høst/?***",
            ),
        ];
        for (text, shown) in cases {
            assert_eq!(redact_url(text), shown, "{text:?}");
        }
        // Nothing goes wrong on any cut of a tricky address either.
        let tricky = "https://us%40er:p@ss@hooks.example.com:443/a%2Fb?t=1&u#f";
        for end in tricky.char_indices().map(|(i, _)| i) {
            let _ = redact_url(&tricky[..end]);
        }
    }

    #[test]
    fn a_shown_webhook_address_has_its_url_redacted_and_keeps_the_rest() {
        let mut settings = serde_json::Map::new();
        settings.insert("url".into(), "https://u:p@h.example/in?token=t".into());
        settings.insert("secret_env".into(), "PHASEGATE_HOOK_KEY".into());
        let address = ChannelAddress::new(ChannelAddress::WEBHOOK, settings);
        let shown = crate::adapters::redacted_channel(&address).settings();
        assert_eq!(shown["url"], "https://***@h.example/in?token=***");
        assert_eq!(shown["secret_env"], "PHASEGATE_HOOK_KEY");
        assert_eq!(describe(&address), "https://***@h.example/in?token=***");
    }

    #[test]
    fn a_plan_error_about_a_webhook_url_does_not_repeat_its_credentials() {
        let problems =
            parse_all("[[webhook]]\nurl = \"ftp://u:hunter2@h.example/x?token=tok-1\"\n")
                .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .message
                .contains("ftp://***@h.example/x?token=***"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn plan(webhook: &str) -> String {
        format!("[rollout]\nname = \"x\"\n\n[[webhook]]\n{webhook}\n")
    }

    #[test]
    fn a_webhook_signs_with_a_phasegate_variable_and_posts_over_https_or_locally() {
        let source = plan("url = \"http://hooks.example.org/x\"\nsecret_env = \"HOME\"");
        let problems = parse_all(&source).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].message.contains("plain http"), "{problems:?}");
        assert!(problems[1].message.contains("starting with PHASEGATE_"));
        let ok = parse_all(&plan(
            "url = \"https://hooks.example.org/x\"\nsecret_env = \"PHASEGATE_WEBHOOK_KEY\"",
        ))
        .unwrap();
        assert_eq!(ok[0].secret_env.as_deref(), Some("PHASEGATE_WEBHOOK_KEY"));
        assert!(parse_all(&plan("url = \"http://127.0.0.1:9/hook\"")).is_ok());
    }
}
