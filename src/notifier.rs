//! The webhook channel: its plan settings (`[[webhook]]` `url`, `secret_env`) and its deliveries
//! for the outbox.
//!
//! A delivery is a JSON POST with an `Idempotency-Key` header carrying the effect's durable key
//! (`<rollout>:<seq>.<index>`), the same on every attempt, so a receiver can drop duplicates:
//! phasegate delivers at least once (again after a crash between sending and recording), never
//! with a new key. With `secret_env` set, `X-Phasegate-Signature: sha256=<hex HMAC-SHA256 of the
//! body>` lets the receiver check where it came from.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

use serde::Deserialize;
use toml::Spanned;

use crate::adapters::{self, ChannelKind};
use crate::domain::event::ChannelAddress;
use crate::domain::plan::Diagnostic;
use crate::retry::{self, Failure, parse_retry_after};

pub const WEBHOOK: ChannelKind = ChannelKind {
    name: ChannelAddress::WEBHOOK,
    check: |source| parse_all(source).err().unwrap_or_default(),
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
            .map_err(|d| problems.push(d))
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

/// Where a notification goes, for logs and the audit trail.
pub fn describe(address: &ChannelAddress) -> String {
    match of(address) {
        Ok(webhook) => webhook.url,
        Err(_) => address.kind().to_string(),
    }
}

/// One notification to deliver.
pub struct Delivery<'a> {
    pub key: &'a str,
    pub to: &'a ChannelAddress,
    /// The exact bytes to POST (the same on every attempt).
    pub body: Vec<u8>,
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
    fn final_(message: String) -> NotifyError {
        NotifyError {
            message,
            failure: None,
            retry_after: None,
        }
    }
}

#[async_trait]
pub trait Notifier: Send + Sync {
    /// Delivers once; `Ok` with the receiver's HTTP status when it answered for good (2xx, or a
    /// 4xx other than 408/429 that no retry will change), `Err` when it is worth trying again.
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
                .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("a client without custom TLS settings always builds"),
        }
    }
}

/// The process's webhook client (one connection pool for every delivery).
pub fn shared() -> &'static WebhookNotifier {
    static NOTIFIER: std::sync::OnceLock<WebhookNotifier> = std::sync::OnceLock::new();
    NOTIFIER.get_or_init(WebhookNotifier::new)
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

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError> {
        let result = self.post(delivery).await;
        // Only a 2xx answer is delivered; a final 4xx is done with, but did not arrive.
        let delivered = matches!(result, Ok(200..=299));
        crate::metrics::global().notification(if delivered { "delivered" } else { "failed" });
        result
    }
}

impl WebhookNotifier {
    /// One attempt, as `deliver` describes.
    async fn post(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError> {
        let to = of(delivery.to).map_err(NotifyError::final_)?;
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
        let response = request.send().await.map_err(|e| NotifyError {
            message: format!("POST {}: {}", to.url, retry::describe_transport(&e)),
            failure: Some(retry::transport_failure(&e)),
            retry_after: None,
        })?;
        let status = response.status().as_u16();
        match retry::status_failure(status) {
            Some(failure) => Err(NotifyError {
                message: format!("POST {}: answered {status}", to.url),
                failure: Some(failure),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now())),
            }),
            None => Ok(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
