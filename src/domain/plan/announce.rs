//! Telling the organisation (`[[announcement]]`): to whom, at which moments of a rollout, with
//! which words, and how long the first phase waits after the start is announced. Which channel
//! carries a message and how (an SMTP relay, a Teams or Slack webhook) is the channel adapter's,
//! which reads the rest of the table (`crate::announce`); the domain keeps it as a
//! [`ChannelAddress`] it never reads.
//!
//! A message is rendered here, when the moment is committed, and recorded whole with its outbox
//! effect: every attempt sends the same words, whatever the plan file says later.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::raw::RawAnnouncement;
use super::{Checker, DurationRange, days, duration_within};
use crate::domain::event::ChannelAddress;

/// When an announcement is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// The rollout is started: before its first phase is applied.
    Start,
    /// A phase starts being applied.
    Phase,
    /// A phase passed its gate and waits for approval.
    Approval,
    /// A gate holds a phase.
    Held,
    Completed,
    RolledBack,
    Aborted,
    Failed,
}

impl Moment {
    pub const ALL: [Moment; 8] = [
        Moment::Start,
        Moment::Phase,
        Moment::Approval,
        Moment::Held,
        Moment::Completed,
        Moment::RolledBack,
        Moment::Aborted,
        Moment::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Moment::Start => "start",
            Moment::Phase => "phase",
            Moment::Approval => "approval",
            Moment::Held => "held",
            Moment::Completed => "completed",
            Moment::RolledBack => "rolled_back",
            Moment::Aborted => "aborted",
            Moment::Failed => "failed",
        }
    }
}

/// The moments an announcement is sent at unless its plan says otherwise.
pub const DEFAULT_MOMENTS: [Moment; 4] = [
    Moment::Start,
    Moment::Phase,
    Moment::Completed,
    Moment::RolledBack,
];

/// How long the first phase may be made to wait after the start is announced.
pub const NOTICE_RANGE: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: days(30),
};

/// The longest subject and text a template may have (characters, before rendering).
pub const SUBJECT_MAX: usize = 200;
pub const TEMPLATE_MAX: usize = 8 * 1024;
/// The most recipients (groups and addresses together) one announcement may name.
pub const RECIPIENTS_MAX: usize = 100;

/// The placeholders a template may use, each with what it stands for.
pub const PLACEHOLDERS: [(&str, &str); 9] = [
    ("rollout", "the rollout's id"),
    ("plan", "the plan's name"),
    ("description", "the plan's description"),
    ("moment", "the moment announced (start, phase, ...)"),
    ("status", "the rollout's status"),
    (
        "phase",
        "the phase that starts (a `phase` moment), else the current one",
    ),
    ("groups", "the announcement's groups, comma-separated"),
    ("reason", "why the rollout is in its status"),
    (
        "first_phase_at",
        "when the first phase is applied at the earliest (UTC)",
    ),
];

/// One `[[announcement]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub on: Vec<Moment>,
    /// Groups told (named in the message; whose members a channel reaches is the channel's).
    pub groups: Vec<String>,
    /// E-mail addresses told.
    pub addresses: Vec<String>,
    pub subject: String,
    pub template: String,
    /// With `start`: how long the first phase waits after the start is announced.
    pub notice: Duration,
    pub address: ChannelAddress,
}

/// What a template is filled with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts<'a> {
    pub rollout: &'a str,
    pub plan: &'a str,
    pub description: &'a str,
    pub moment: &'a str,
    pub status: &'a str,
    pub phase: &'a str,
    pub groups: String,
    pub reason: &'a str,
    pub first_phase_at: String,
}

impl Facts<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        Some(match name {
            "rollout" => self.rollout,
            "plan" => self.plan,
            "description" => self.description,
            "moment" => self.moment,
            "status" => self.status,
            "phase" => self.phase,
            "groups" => &self.groups,
            "reason" => self.reason,
            "first_phase_at" => &self.first_phase_at,
            _ => return None,
        })
    }
}

/// A template's text with every `{name}` replaced; `{{` and `}}` stand for braces. A template
/// was checked at plan time ([`placeholders`]); anything else is kept as written.
pub fn render(template: &str, facts: &Facts<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(end) = tail.find('}').filter(|_| tail.starts_with('{'))
            && let Some(value) = facts.get(&tail[1..end])
        {
            out.push_str(value);
            rest = &tail[end + 1..];
            continue;
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

/// The placeholders a template uses, or what is wrong with it: an unknown name, an unclosed
/// brace.
pub fn placeholders(template: &str) -> Result<BTreeSet<String>, String> {
    let mut used = BTreeSet::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err("a lone `}`: write `}}` for a brace".into());
        }
        let Some(end) = tail.find('}') else {
            return Err("a `{` is not closed: write `{{` for a brace".into());
        };
        let name = &tail[1..end];
        if !PLACEHOLDERS.iter().any(|(known, _)| *known == name) {
            let names: Vec<String> = PLACEHOLDERS
                .iter()
                .map(|(n, _)| format!("{{{n}}}"))
                .collect();
            return Err(format!(
                "unknown placeholder `{{{name}}}`; a template may use {}",
                names.join(", ")
            ));
        }
        used.insert(name.to_string());
        rest = &tail[end + 1..];
    }
    Ok(used)
}

/// A plausible e-mail address: one `@`, something on each side, no spaces or angle brackets,
/// at most 254 characters (RFC 5321's path limit).
pub fn is_address(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    text.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '(' | ')' | ',' | ';' | '"'))
}

impl Checker<'_> {
    /// The plan's `[[announcement]]` tables, each with its adapter's part of the table; `groups`
    /// are the groups the plan names anywhere (a phase's include or exclude lists).
    pub(super) fn announcements(
        &mut self,
        raw: &[Spanned<RawAnnouncement>],
        tables: Option<Vec<toml::Table>>,
        known_groups: &BTreeSet<String>,
    ) -> Option<Vec<Announcement>> {
        let mut tables = tables.map(Vec::into_iter);
        let mut all = Some(Vec::with_capacity(raw.len()));
        for announcement in raw {
            let table = tables.as_mut().and_then(Iterator::next);
            let built = self.announcement(announcement, table, known_groups);
            match (built, all.as_mut()) {
                (Some(built), Some(all)) => all.push(built),
                _ => all = None,
            }
        }
        all
    }

    fn announcement(
        &mut self,
        spanned: &Spanned<RawAnnouncement>,
        table: Option<toml::Table>,
        known_groups: &BTreeSet<String>,
    ) -> Option<Announcement> {
        let raw = spanned.get_ref();
        let before = self.diagnostics.len();
        let channel = raw.channel.get_ref().trim().to_string();
        if channel.is_empty() {
            self.error(
                raw.channel.span(),
                "an announcement's `channel` must not be empty",
            );
        }
        let on = match &raw.on {
            None => DEFAULT_MOMENTS.to_vec(),
            Some(list) => {
                let mut on = Vec::new();
                for name in list.get_ref() {
                    match Moment::ALL.iter().find(|m| m.as_str() == name.get_ref()) {
                        Some(moment) if on.contains(moment) => self.error(
                            name.span(),
                            format!("`{}` is listed twice", moment.as_str()),
                        ),
                        Some(moment) => on.push(*moment),
                        None => {
                            let names: Vec<&str> = Moment::ALL.iter().map(|m| m.as_str()).collect();
                            self.error(
                                name.span(),
                                format!(
                                    "unknown moment `{}`; an announcement is sent at {}",
                                    name.get_ref(),
                                    names.join(", ")
                                ),
                            );
                        }
                    }
                }
                if list.get_ref().is_empty() {
                    self.error(list.span(), "`on` must name at least one moment");
                }
                on
            }
        };
        let mut groups = Vec::new();
        for group in &raw.groups {
            let name = group.get_ref().trim();
            if !known_groups.contains(name) {
                let mut known: Vec<&str> = known_groups.iter().map(String::as_str).collect();
                known.truncate(20);
                self.error(
                    group.span(),
                    format!(
                        "`{name}` is not a group this plan names; an announcement tells groups of \
                         its phases: {}",
                        known.join(", ")
                    ),
                );
            } else if groups.iter().any(|g| g == name) {
                self.error(group.span(), format!("`{name}` is listed twice"));
            } else {
                groups.push(name.to_string());
            }
        }
        let mut addresses = Vec::new();
        for address in &raw.addresses {
            let text = address.get_ref().trim();
            if !is_address(text) {
                self.error(
                    address.span(),
                    format!("`{text}` is not an e-mail address (name@example.com)"),
                );
            } else if addresses
                .iter()
                .any(|a: &String| a.eq_ignore_ascii_case(text))
            {
                self.error(address.span(), format!("`{text}` is listed twice"));
            } else {
                addresses.push(text.to_string());
            }
        }
        if raw.groups.len() + raw.addresses.len() > RECIPIENTS_MAX {
            self.error(
                spanned.span(),
                format!("an announcement names at most {RECIPIENTS_MAX} groups and addresses"),
            );
        }
        let subject = raw
            .subject
            .as_ref()
            .map_or_else(|| "{plan}: {moment}".to_string(), |s| s.get_ref().clone());
        if let Some(written) = &raw.subject {
            self.template_text(written, "subject", SUBJECT_MAX);
            if written.get_ref().contains(['\r', '\n']) {
                self.error(written.span(), "a `subject` is one line");
            }
        }
        self.template_text(&raw.template, "template", TEMPLATE_MAX);
        let notice = match &raw.notice {
            None => Duration::ZERO,
            Some(value) => {
                if !on.contains(&Moment::Start) {
                    self.error(
                        value.span(),
                        "`notice` is how long the first phase waits after the start is \
                         announced: add \"start\" to `on`",
                    );
                }
                duration_within(value, "notice", NOTICE_RANGE)
                    .map_err(|d| self.diagnostics.push(d))
                    .unwrap_or_default()
            }
        };
        if self.diagnostics.len() > before {
            return None;
        }
        let mut settings = super::adapter_settings(table?);
        for key in RawAnnouncement::DOMAIN_KEYS {
            settings.remove(*key);
        }
        Some(Announcement {
            on,
            groups,
            addresses,
            subject,
            template: raw.template.get_ref().clone(),
            notice,
            address: ChannelAddress::new(&channel, settings),
        })
    }

    fn template_text(&mut self, value: &Spanned<String>, key: &str, max: usize) {
        let text = value.get_ref();
        if text.trim().is_empty() {
            self.error(value.span(), format!("`{key}` must not be empty"));
        } else if text.chars().count() > max {
            self.error(
                value.span(),
                format!("`{key}` is longer than {max} characters"),
            );
        } else if let Err(problem) = placeholders(text) {
            self.error(value.span(), format!("`{key}`: {problem}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts<'static> {
        Facts {
            rollout: "r-1",
            plan: "android-guarded",
            description: "work profile",
            moment: "start",
            status: "running",
            phase: "pilot",
            groups: "Pilot IT, Pilot Field".into(),
            reason: "started by alice",
            first_phase_at: "2026-01-02 09:00 UTC".into(),
        }
    }

    #[test]
    fn a_template_is_filled_and_braces_can_be_written() {
        let text = "{plan} ({rollout}) starts {first_phase_at} for {groups}; {{literal}} }}";
        assert_eq!(placeholders(text).unwrap().len(), 4);
        assert_eq!(
            render(text, &facts()),
            "android-guarded (r-1) starts 2026-01-02 09:00 UTC for Pilot IT, Pilot Field; \
             {literal} }"
        );
    }

    #[test]
    fn an_unknown_or_unclosed_placeholder_is_refused() {
        assert!(
            placeholders("{nope}")
                .unwrap_err()
                .contains("unknown placeholder `{nope}`")
        );
        assert!(
            placeholders("open {plan")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(placeholders("close }").unwrap_err().contains("lone"));
        assert!(placeholders("").unwrap().is_empty());
    }

    #[test]
    fn rendering_never_panics_on_odd_text() {
        for text in [
            "{",
            "}",
            "{}",
            "{{",
            "}}}",
            "{plan",
            "é{plan}ü{",
            "{{plan}}",
            "{ plan }",
        ] {
            let _ = render(text, &facts());
        }
        assert_eq!(render("{{plan}}", &facts()), "{plan}");
        assert_eq!(render("{unknown}", &facts()), "{unknown}");
    }

    #[test]
    fn addresses_are_checked_for_shape() {
        for ok in ["it@contoso.com", "first.last+tag@mail.contoso.co.uk"] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in [
            "",
            "contoso.com",
            "@contoso.com",
            "it@",
            "it@contoso",
            "it@@contoso.com",
            "it me@contoso.com",
            "<it@contoso.com>",
            "a,b@contoso.com",
            "it@.contoso.com",
        ] {
            assert!(!is_address(bad), "{bad}");
        }
        assert!(!is_address(&format!("{}@contoso.com", "a".repeat(65))));
    }
}
