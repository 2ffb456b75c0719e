//! The announcement channels (`[[announcement]]` `channel = "email" | "teams" | "slack" |
//! "webhook"`): each channel's settings, checked at `plan check` and read back from an outbox
//! record with one parser, and the process's notifier, which hands each outbox delivery to its
//! channel.
//!
//! A delivery carries its effect's durable key (`<store id>/<rollout>:<seq>.<index>`), the same
//! on every attempt: an e-mail's `Message-ID` is made from it, a Teams or Slack POST carries it
//! as `Idempotency-Key`, so a receiver recognises a message sent again after a crash between
//! sending and recording. An announcement that cannot be delivered stays in the outbox and holds
//! nothing up; the runner tries it again with a bounded backoff (`engine::Skips`).
//!
//! With `PHASEGATE_PUBLIC_URL` set (the address people reach `serve` at), each message links to
//! the rollout in the dashboard, and an approval request says where to approve (dashboard and
//! API).

pub mod email;
pub mod slack;
pub mod teams;

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::adapters;
use crate::domain::event::{ChannelAddress, Message};
use crate::domain::plan::{Diagnostic, Moment};
use crate::notifier::{self, Delivery, Notifier, NotifyError, WebhookNotifier};

/// The channels an `[[announcement]]` may name.
pub const CHANNEL_NAMES: [&str; 4] = [email::NAME, teams::NAME, slack::NAME, "webhook"];

/// The environment variable with the address people reach phasegate's dashboard and API at.
pub const PUBLIC_URL_ENV: &str = "PHASEGATE_PUBLIC_URL";

/// The problems of the plan's `[[announcement]]` tables no registered channel kind reports: an
/// unknown channel, and the settings of one that names the webhook (whose own kind checks
/// `[[webhook]]`). E-mail, Teams and Slack check theirs as registered channel kinds (`adapters::CHANNELS`).
pub fn check_channels(source: &str) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    for (span, channel) in channels_of(source) {
        if !CHANNEL_NAMES.contains(&channel.as_str()) {
            let names: Vec<String> = CHANNEL_NAMES.iter().map(|n| format!("\"{n}\"")).collect();
            found.push(Diagnostic::new(
                span,
                format!(
                    "unknown channel `{channel}`: an announcement goes by {}",
                    names.join(", ")
                ),
            ));
        }
    }
    found.extend(webhook_check(source));
    found
}

/// Each `[[announcement]]`'s `channel`, with its place.
fn channels_of(source: &str) -> Vec<(std::ops::Range<usize>, String)> {
    let Ok(root) = DeTable::parse(source) else {
        return Vec::new();
    };
    let root = root.into_inner();
    let Some(items) = root.get("announcement") else {
        return Vec::new();
    };
    let DeValue::Array(items) = items.get_ref() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item.get_ref() {
            DeValue::Table(table) => table.get("channel").and_then(|c| match c.get_ref() {
                DeValue::String(name) => Some((c.span(), name.trim().to_string())),
                _ => None,
            }),
            _ => None,
        })
        .collect()
}

/// The plan's `[[announcement]]` tables of a channel whose only setting is its endpoint's `url`
/// (Teams, Slack): each URL, checked as `label`, or every problem, with the URL shown only as
/// `redact` shows it.
pub fn url_channels(
    source: &str,
    channel: &str,
    whose: &str,
    label: &str,
    redact: fn(&str) -> String,
) -> Result<Vec<String>, Vec<Diagnostic>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct RawUrlChannel {
        channel: Option<toml::Value>,
        on: Option<toml::Value>,
        groups: Option<toml::Value>,
        addresses: Option<toml::Value>,
        subject: Option<toml::Value>,
        template: Option<toml::Value>,
        notice: Option<toml::Value>,
        url: Spanned<String>,
    }
    let tables = tables_of::<RawUrlChannel>(source, channel, whose)?;
    let mut problems = Vec::new();
    let mut urls = Vec::new();
    for table in tables {
        let raw = table.into_inner();
        match adapters::endpoint_url(&raw.url, label) {
            Ok(url) => urls.push(url),
            Err(mut d) => {
                let written = raw.url.get_ref().trim();
                d.message = d.message.replace(written, &redact(written));
                problems.push(d);
            }
        }
    }
    if problems.is_empty() {
        Ok(urls)
    } else {
        Err(problems)
    }
}

/// The plan's `[[announcement]]` tables of one channel, each as that channel's settings type
/// (which lists the domain's keys too, unread, and rejects any other), with every problem at
/// its place. `whose` names the channel in a message about a key it does not have.
pub fn tables_of<T: DeserializeOwned>(
    source: &str,
    channel: &str,
    whose: &str,
) -> Result<Vec<Spanned<T>>, Vec<Diagnostic>> {
    let Ok(root) = DeTable::parse(source) else {
        // Not TOML: the domain reports that.
        return Ok(Vec::new());
    };
    let mut root = root.into_inner();
    let Some(items) = root.remove("announcement") else {
        return Ok(Vec::new());
    };
    let DeValue::Array(items) = items.into_inner() else {
        return Ok(Vec::new());
    };
    let mut problems = Vec::new();
    let mut tables = Vec::new();
    for item in items {
        let ours = match item.get_ref() {
            DeValue::Table(table) => table.get("channel").is_some_and(
                |c| matches!(c.get_ref(), DeValue::String(name) if name.trim() == channel),
            ),
            _ => false,
        };
        if !ours {
            continue;
        }
        let span = item.span();
        match Spanned::<T>::deserialize(ValueDeserializer::from(item)) {
            Ok(table) => tables.push(table),
            Err(e) => {
                let mut problem = adapters::foreign_key(adapters::toml_diagnostic(e), whose);
                if problem.span == (0..0) {
                    // A missing key: the table it is missing from.
                    problem.span = span;
                }
                problems.push(problem);
            }
        }
    }
    if problems.is_empty() {
        Ok(tables)
    } else {
        Err(problems)
    }
}

/// A channel address kept in an outbox record, as the `[[announcement]]` text its channel's
/// parser reads.
pub fn announcement_source(address: &ChannelAddress) -> String {
    let mut table: serde_json::Map<String, serde_json::Value> = address
        .settings()
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .collect();
    table.insert("channel".into(), address.kind().into());
    let mut doc = serde_json::Map::new();
    doc.insert(
        "announcement".into(),
        serde_json::Value::Array(vec![serde_json::Value::Object(table)]),
    );
    toml::to_string(&doc).unwrap_or_default()
}

/// The domain's keys of an `[[announcement]]`, as every channel's settings type lists them
/// (checked by the domain, unread here).
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
pub struct DomainKeys {
    channel: Option<toml::Value>,
    on: Option<toml::Value>,
    groups: Option<toml::Value>,
    addresses: Option<toml::Value>,
    subject: Option<toml::Value>,
    template: Option<toml::Value>,
    notice: Option<toml::Value>,
}

/// `channel = "webhook"`: the webhook's own settings (`url`, `secret_env`), delivered by the
/// webhook adapter with the message in its JSON body.
fn webhook_check(source: &str) -> Vec<Diagnostic> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct RawWebhook {
        channel: Option<toml::Value>,
        on: Option<toml::Value>,
        groups: Option<toml::Value>,
        addresses: Option<toml::Value>,
        subject: Option<toml::Value>,
        template: Option<toml::Value>,
        notice: Option<toml::Value>,
        url: Spanned<String>,
        secret_env: Option<Spanned<String>>,
    }
    let tables = match tables_of::<RawWebhook>(source, "webhook", "a webhook announcement") {
        Ok(tables) => tables,
        Err(problems) => return problems,
    };
    let mut problems = Vec::new();
    for table in tables {
        let raw = table.get_ref();
        if let Err(mut d) = adapters::endpoint_url(&raw.url, "webhook URL") {
            let written = raw.url.get_ref().trim();
            d.message = d.message.replace(written, &notifier::redact_url(written));
            problems.push(d);
        }
        if let Some(env) = &raw.secret_env
            && let Err(d) = adapters::secret_variable(env, "secret_env")
        {
            problems.push(d);
        }
    }
    problems
}

/// The process's notifier: each delivery to its channel's adapter.
pub struct Channels {
    webhook: WebhookNotifier,
    http: reqwest::Client,
    /// `PHASEGATE_PUBLIC_URL`, checked (https, or http to this machine), without a trailing `/`.
    public_url: Option<String>,
}

impl Channels {
    pub fn new(public_url: Option<String>) -> Channels {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Channels {
            webhook: WebhookNotifier::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                // A redirect would send the message somewhere the plan did not name.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("phasegate/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("a client without custom TLS settings always builds"),
            public_url,
        }
    }

    /// From the environment: `PHASEGATE_PUBLIC_URL` when set and well-formed (a malformed one
    /// is reported once and not used: links are a convenience, not worth refusing to run).
    pub fn from_env() -> Channels {
        let public_url = std::env::var(PUBLIC_URL_ENV).ok().and_then(|text| {
            let spanned = Spanned::new(0..0, text);
            match adapters::endpoint_url(&spanned, PUBLIC_URL_ENV) {
                Ok(url) => Some(url),
                Err(d) => {
                    tracing::warn!(problem = %d.message, "announcements are sent without links");
                    None
                }
            }
        });
        Channels::new(public_url)
    }
}

/// Where people see a rollout, when phasegate knows its public address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Links {
    pub dashboard: String,
    pub api: String,
}

pub fn links(public_url: Option<&str>, rollout: &str) -> Option<Links> {
    let base = public_url?;
    let id: String = url::form_urlencoded::byte_serialize(rollout.as_bytes()).collect();
    Some(Links {
        dashboard: format!("{base}/ui/rollouts/{id}"),
        api: format!("{base}/api/v1/rollouts/{id}"),
    })
}

/// The text of a message as a plain-text channel shows it: the rendered text, then where to
/// act or look.
pub fn plain_text(message: &Message, links: Option<&Links>) -> String {
    let mut text = message.text.clone();
    if let Some(links) = links {
        if message.moment == Moment::Approval {
            text.push_str(&format!(
                "\n\nApprove or reject: {}\n(API: POST {}/approve)",
                links.dashboard, links.api
            ));
        } else {
            text.push_str(&format!("\n\nDetails: {}", links.dashboard));
        }
    }
    text
}

#[async_trait]
impl Notifier for Channels {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<u16, NotifyError> {
        let kind = delivery.to.kind();
        if kind == ChannelAddress::WEBHOOK {
            return self.webhook.deliver(delivery).await;
        }
        let Some(about) = &delivery.about else {
            return Err(NotifyError::final_(format!(
                "a `{kind}` notification without a message"
            )));
        };
        let links = links(self.public_url.as_deref(), about.rollout);
        let result = match kind {
            email::NAME => email::send(delivery, about, links.as_ref()).await,
            teams::NAME => {
                let to = teams::of(delivery.to).map_err(NotifyError::final_)?;
                let body = teams::payload(about, links.as_ref());
                post_json(
                    &self.http,
                    &to.url,
                    &teams::redact_url(&to.url),
                    delivery.key,
                    &body,
                )
                .await
            }
            slack::NAME => {
                let to = slack::of(delivery.to).map_err(NotifyError::final_)?;
                let body = slack::payload(about, links.as_ref());
                post_json(
                    &self.http,
                    &to.url,
                    &slack::redact_url(&to.url),
                    delivery.key,
                    &body,
                )
                .await
            }
            other => Err(NotifyError::final_(format!(
                "no notification channel of kind `{other}`"
            ))),
        };
        let delivered = result.is_ok();
        crate::metrics::global().notification(if delivered { "delivered" } else { "failed" });
        result
    }
}

/// One JSON POST with the delivery's idempotency key. Only a 2xx is a delivery; no answer, a
/// 408, 429 or 5xx may be retried; a redirect or another 4xx is final.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    shown: &str,
    key: &str,
    body: &serde_json::Value,
) -> Result<u16, NotifyError> {
    let request = http
        .post(url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key)
        .body(serde_json::to_vec(body).expect("json serializes"));
    let response = notifier::send(request, shown).await?;
    let status = response.status().as_u16();
    match status {
        200..=299 => Ok(status),
        300..=399 => Err(NotifyError::final_(format!(
            "POST {shown}: answered {status}, a redirect; redirects are not followed: put the \
             address that takes the message in the announcement's url"
        ))),
        _ => {
            let said = response.text().await.unwrap_or_default();
            let said: String = said.chars().take(200).collect();
            Err(NotifyError::final_(format!(
                "POST {shown}: answered {status} ({}), which trying again will not change",
                if said.trim().is_empty() {
                    "no body"
                } else {
                    said.trim()
                }
            )))
        }
    }
}

/// The process's notifier (one connection pool for every delivery).
pub fn shared() -> &'static Channels {
    static CHANNELS: std::sync::OnceLock<Channels> = std::sync::OnceLock::new();
    CHANNELS.get_or_init(Channels::from_env)
}

/// Settings read back from an outbox record with the channel's plan parser.
pub(crate) fn reparse<T>(
    address: &ChannelAddress,
    name: &str,
    parse: impl FnOnce(&str) -> Result<Vec<T>, Vec<Diagnostic>>,
) -> Result<T, String> {
    if address.kind() != name {
        return Err(format!(
            "no {name} channel in a `{}` address",
            address.kind()
        ));
    }
    let source = announcement_source(address);
    adapters::reparse(name, &source, parse)?
        .pop()
        .ok_or_else(|| format!("a {name} announcement without settings"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_point_at_the_dashboard_and_the_api_with_the_id_encoded() {
        assert_eq!(links(None, "r-1"), None);
        let l = links(Some("https://phasegate.contoso.com"), "r 1/x").unwrap();
        assert_eq!(
            l.dashboard,
            "https://phasegate.contoso.com/ui/rollouts/r+1%2Fx"
        );
        assert_eq!(
            l.api,
            "https://phasegate.contoso.com/api/v1/rollouts/r+1%2Fx"
        );
    }

    #[test]
    fn an_approval_request_says_where_to_approve() {
        let mut message = Message {
            moment: Moment::Approval,
            subject: "s".into(),
            text: "pilot passed".into(),
            groups: Vec::new(),
            addresses: Vec::new(),
            phase: Some("pilot".into()),
            recipients: None,
        };
        let l = links(Some("https://pg.example"), "r-1");
        let text = plain_text(&message, l.as_ref());
        assert!(text.contains("Approve or reject: https://pg.example/ui/rollouts/r-1"));
        assert!(text.contains("POST https://pg.example/api/v1/rollouts/r-1/approve"));
        message.moment = Moment::Start;
        assert!(
            plain_text(&message, l.as_ref())
                .ends_with("Details: https://pg.example/ui/rollouts/r-1")
        );
        assert_eq!(plain_text(&message, None), "pilot passed");
    }

    #[test]
    fn an_unknown_channel_is_named_at_its_place() {
        let source = "[[announcement]]\nchannel = \"pigeon\"\ntemplate = \"x\"\n";
        let problems = check_channels(source);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("unknown channel `pigeon`"));
        assert_eq!(&source[problems[0].span.clone()], "\"pigeon\"");
    }

    #[test]
    fn a_webhook_announcement_is_checked_as_a_webhook() {
        let source = "[[announcement]]\nchannel = \"webhook\"\ntemplate = \"x\"\n\
                      url = \"http://hooks.example.org/x\"\nsecret_env = \"HOME\"\n";
        let problems = check_channels(source);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let typo = "[[announcement]]\nchannel = \"webhook\"\ntemplate = \"x\"\nulr = \"x\"\n";
        let problems = check_channels(typo);
        assert!(
            problems.iter().any(|p| p
                .message
                .contains("`ulr` is not a setting of a webhook announcement")),
            "{problems:?}"
        );
    }
}
