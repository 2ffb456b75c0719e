//! `channel = "teams"`: announcements posted to a Microsoft Teams channel through a Workflows
//! webhook ("Post to a channel when a webhook request is received"), as an Adaptive Card.
//! Office 365 connectors are retired; the Workflows trigger takes the same `message` envelope
//! an incoming webhook did, with the card as its attachment (Microsoft Learn, "Create incoming
//! webhooks with Workflows for Microsoft Teams" and "Send Adaptive Cards using an Incoming
//! Webhook"):
//!
//! `{"type":"message","attachments":[{"contentType":"application/vnd.microsoft.card.adaptive",
//! "content":{"type":"AdaptiveCard","version":"1.4",...}}]}`
//!
//! The trigger answers 202 Accepted. Its URL carries the flow's signature in its query
//! (`sig=…`): it is shown only through [`redact_url`].
//!
//! Settings: `url`.

use serde_json::{Value, json};

use super::Links;
use crate::adapters::ChannelKind;
use crate::domain::event::ChannelAddress;
use crate::domain::plan::{Diagnostic, Moment};
use crate::notifier::About;

pub const NAME: &str = "teams";

pub const KIND: ChannelKind = ChannelKind {
    name: NAME,
    check: |source| parse_all(source).err().unwrap_or_default(),
    redact,
};

/// A Teams channel's settings: the Workflows trigger's URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamsSettings {
    pub url: String,
}

pub fn parse_all(source: &str) -> Result<Vec<TeamsSettings>, Vec<Diagnostic>> {
    let urls = super::url_channels(
        source,
        NAME,
        "a Teams announcement",
        "Teams Workflows URL",
        redact_url,
    )?;
    Ok(urls.into_iter().map(|url| TeamsSettings { url }).collect())
}

pub fn of(address: &ChannelAddress) -> Result<TeamsSettings, String> {
    super::reparse(address, NAME, parse_all)
}

/// The URL as it may be shown: the query (the flow's signature) masked.
pub fn redact_url(url: &str) -> String {
    crate::notifier::redact_url(url)
}

fn redact(address: &ChannelAddress) -> ChannelAddress {
    let mut settings = address.settings();
    if let Some(Value::String(url)) = settings.get_mut("url") {
        *url = redact_url(url);
    }
    ChannelAddress::new(address.kind(), settings)
}

/// The Workflows request: a `message` with the announcement as an Adaptive Card.
pub fn payload(about: &About<'_>, links: Option<&Links>) -> Value {
    let message = about.message;
    let mut facts = vec![
        json!({"title": "Rollout", "value": about.rollout}),
        json!({"title": "Plan", "value": about.plan}),
        json!({"title": "Status", "value": about.status.as_str()}),
    ];
    if let Some(phase) = &message.phase {
        facts.push(json!({"title": "Phase", "value": phase}));
    }
    if !message.groups.is_empty() {
        facts.push(json!({"title": "Groups", "value": message.groups.join(", ")}));
    }
    let mut body = vec![
        json!({"type": "TextBlock", "text": message.subject, "weight": "Bolder", "size": "Medium", "wrap": true}),
        json!({"type": "TextBlock", "text": message.text, "wrap": true}),
        json!({"type": "FactSet", "facts": facts}),
    ];
    let mut actions = Vec::new();
    if let Some(links) = links {
        if message.moment == Moment::Approval {
            actions.push(json!({"type": "Action.OpenUrl", "title": "Review and approve", "url": links.dashboard}));
            body.push(json!({"type": "TextBlock", "text": format!("API: POST {}/approve", links.api), "wrap": true, "isSubtle": true, "size": "Small"}));
        } else {
            actions.push(json!({"type": "Action.OpenUrl", "title": "Open in phasegate", "url": links.dashboard}));
        }
    }
    let mut card = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    });
    if !actions.is_empty() {
        card["actions"] = Value::Array(actions);
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": card,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Message;
    use crate::domain::rollout::RolloutStatus;

    fn message(moment: Moment) -> Message {
        Message {
            moment,
            subject: "Compliance rollout starts".into(),
            text: "Devices in Pilot IT are checked from Monday.".into(),
            groups: vec!["Pilot IT".into()],
            addresses: Vec::new(),
            phase: Some("pilot".into()),
            recipients: None,
        }
    }

    #[test]
    fn the_payload_is_a_message_with_an_adaptive_card_attachment() {
        let m = message(Moment::Start);
        let about = About {
            message: &m,
            rollout: "r-1",
            plan: "android-guarded",
            status: RolloutStatus::Running,
        };
        let body = payload(&about, None);
        assert_eq!(body["type"], "message");
        let attachment = &body["attachments"][0];
        assert_eq!(
            attachment["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        let card = &attachment["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        assert_eq!(card["version"], "1.4");
        assert_eq!(card["body"][0]["text"], "Compliance rollout starts");
        assert_eq!(
            card["body"][1]["text"],
            "Devices in Pilot IT are checked from Monday."
        );
        let facts = card["body"][2]["facts"].as_array().unwrap();
        assert!(
            facts
                .iter()
                .any(|f| f["title"] == "Phase" && f["value"] == "pilot")
        );
        assert!(
            card.get("actions").is_none(),
            "no link without a public URL"
        );
    }

    #[test]
    fn an_approval_request_links_to_the_dashboard() {
        let m = message(Moment::Approval);
        let about = About {
            message: &m,
            rollout: "r-1",
            plan: "p",
            status: RolloutStatus::WaitingApproval,
        };
        let links = super::super::links(Some("https://pg.contoso.com"), "r-1");
        let body = payload(&about, links.as_ref());
        let action = &body["attachments"][0]["content"]["actions"][0];
        assert_eq!(action["type"], "Action.OpenUrl");
        assert_eq!(action["url"], "https://pg.contoso.com/ui/rollouts/r-1");
    }

    #[test]
    fn the_url_is_checked_and_shown_without_its_signature() {
        let source = "[[announcement]]\nchannel = \"teams\"\ntemplate = \"t\"\n\
                      url = \"http://prod.westus.logic.azure.com/workflows/x?api-version=1&sig=SECRET\"\n";
        let problems = parse_all(source).unwrap_err();
        assert!(problems[0].message.contains("plain http"), "{problems:?}");
        assert!(!problems[0].message.contains("SECRET"), "{problems:?}");
        let mut settings = serde_json::Map::new();
        settings.insert(
            "url".into(),
            "https://prod.westus.logic.azure.com/workflows/x?sig=SECRET".into(),
        );
        let shown = crate::adapters::redacted_channel(&ChannelAddress::new(NAME, settings));
        assert_eq!(
            shown.settings()["url"],
            "https://prod.westus.logic.azure.com/workflows/x?sig=***"
        );
    }
}
