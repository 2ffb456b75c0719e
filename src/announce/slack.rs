//! `channel = "slack"`: announcements posted through a Slack incoming webhook, as Block Kit
//! blocks with a `text` fallback (what notifications and clients without blocks show).
//! Slack answers 200 `ok`; a 4xx names what is wrong (`invalid_payload`, `no_service`,
//! `channel_is_archived`) and is not retried; 429 and 5xx are. The webhook's secret is its path
//! (`https://hooks.slack.com/services/T…/B…/secret`): it is shown only through [`redact_url`].
//!
//! Settings: `url`.

use serde_json::{Value, json};

use super::Links;
use crate::adapters::ChannelKind;
use crate::domain::event::ChannelAddress;
use crate::domain::plan::{Diagnostic, Moment};
use crate::notifier::About;

pub const NAME: &str = "slack";

pub const KIND: ChannelKind = ChannelKind {
    name: NAME,
    check: |source| parse_all(source).err().unwrap_or_default(),
    redact,
};

/// The longest text Slack takes in one section block.
const SECTION_MAX: usize = 3000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlackSettings {
    pub url: String,
}

pub fn parse_all(source: &str) -> Result<Vec<SlackSettings>, Vec<Diagnostic>> {
    let urls = super::url_channels(
        source,
        NAME,
        "a Slack announcement",
        "Slack webhook URL",
        redact_url,
    )?;
    Ok(urls.into_iter().map(|url| SlackSettings { url }).collect())
}

pub fn of(address: &ChannelAddress) -> Result<SlackSettings, String> {
    super::reparse(address, NAME, parse_all)
}

/// The URL as it may be shown: scheme, host and the first segment of the path; the rest (the
/// webhook's secret) and any query masked.
pub fn redact_url(url: &str) -> String {
    let shown = crate::notifier::redact_url(url);
    let Some((scheme, rest)) = shown.split_once("://") else {
        return shown;
    };
    let mut parts = rest.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    match (parts.next(), parts.next()) {
        (Some(first), Some(_)) => format!("{scheme}://{host}/{first}/***"),
        (Some(first), None) if !first.is_empty() => format!("{scheme}://{host}/***"),
        _ => format!("{scheme}://{host}"),
    }
}

fn redact(address: &ChannelAddress) -> ChannelAddress {
    let mut settings = address.settings();
    if let Some(Value::String(url)) = settings.get_mut("url") {
        *url = redact_url(url);
    }
    ChannelAddress::new(address.kind(), settings)
}

/// Text for Slack's mrkdwn: `&`, `<` and `>` escaped, as Slack asks.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}

/// The webhook's request: blocks, and the same announcement as plain `text`.
pub fn payload(about: &About<'_>, links: Option<&Links>) -> Value {
    let message = about.message;
    let mut context = format!(
        "Rollout `{}` ({}) · {}",
        escape(about.rollout),
        escape(about.plan),
        about.status.as_str()
    );
    if let Some(phase) = &message.phase {
        context.push_str(&format!(" · phase `{}`", escape(phase)));
    }
    if !message.groups.is_empty() {
        context.push_str(&format!(" · {}", escape(&message.groups.join(", "))));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": cut(&message.subject, 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": cut(&escape(&message.text), SECTION_MAX)}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]}),
    ];
    if let Some(links) = links {
        let label = if message.moment == Moment::Approval {
            "Review and approve"
        } else {
            "Open in phasegate"
        };
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button",
            "text": {"type": "plain_text", "text": label},
            "url": links.dashboard,
        }]}));
    }
    json!({
        "text": format!("{}: {}", message.subject, super::plain_text(message, links)),
        "blocks": blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Message;
    use crate::domain::rollout::RolloutStatus;

    #[test]
    fn the_payload_has_blocks_and_a_text_fallback() {
        let m = Message {
            moment: Moment::Approval,
            subject: "pilot needs approval".into(),
            text: "Gate <passed> & waiting".into(),
            groups: vec!["Pilot IT".into()],
            addresses: Vec::new(),
            phase: Some("pilot".into()),
            recipients: None,
        };
        let about = About {
            message: &m,
            rollout: "r-1",
            plan: "p",
            status: RolloutStatus::WaitingApproval,
        };
        let links = super::super::links(Some("https://pg.contoso.com"), "r-1");
        let body = payload(&about, links.as_ref());
        assert!(
            body["text"]
                .as_str()
                .unwrap()
                .starts_with("pilot needs approval: Gate <passed> & waiting")
        );
        assert_eq!(body["blocks"][0]["type"], "header");
        assert_eq!(
            body["blocks"][1]["text"]["text"],
            "Gate &lt;passed&gt; &amp; waiting"
        );
        assert_eq!(
            body["blocks"][3]["elements"][0]["url"],
            "https://pg.contoso.com/ui/rollouts/r-1"
        );
        assert_eq!(
            body["blocks"][3]["elements"][0]["text"]["text"],
            "Review and approve"
        );
    }

    #[test]
    fn the_webhook_secret_in_the_path_is_never_shown() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET"),
            "https://hooks.slack.com/services/***"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:9/slack"),
            "http://127.0.0.1:9/***"
        );
        assert_eq!(redact_url("http://127.0.0.1:9"), "http://127.0.0.1:9");
        let source = "[[announcement]]\nchannel = \"slack\"\ntemplate = \"t\"\n\
                      url = \"http://hooks.slack.com/services/T/B/SECRET\"\n";
        let problems = parse_all(source).unwrap_err();
        assert!(!problems[0].message.contains("SECRET"), "{problems:?}");
    }
}
