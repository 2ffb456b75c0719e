//! The registered adapters: the provider kinds a plan may name in `[provider]`, and the channel
//! kinds that carry its notifications (`[[webhook]]`).
//!
//! The domain knows an adapter only by its kind and hands it the rest of its table untouched
//! ([`ProviderConfig`], [`ChannelAddress`]). Each adapter parses its own settings, with the same
//! parser for `plan check` (from the plan's text, so every problem has its line and column) and
//! at run time (from the settings a plan or an outbox record carries). [`parse_plan`] is what the
//! shell uses to read a plan: the domain's checks and every adapter's, reported together.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;

use crate::domain::event::ChannelAddress;
use crate::domain::plan::{self, Diagnostic, Plan, PlanErrors, ProviderConfig, Strictness};
use crate::notifier;
use crate::provider::{graph, simulator};

/// A provider kind: its name in `[provider] kind`, and the check of its settings.
pub struct ProviderKind {
    pub name: &'static str,
    /// The problems of a plan's `[provider]` table, located in the plan's text.
    pub check: fn(&str) -> Vec<Diagnostic>,
}

/// A channel kind: the name its addresses carry (and its plan tables, `[[name]]`), the check
/// of those tables, and how its addresses are shown.
pub struct ChannelKind {
    pub name: &'static str,
    /// The problems of every `[[name]]` table in a plan's text.
    pub check: fn(&str) -> Vec<Diagnostic>,
    /// An address as it may be shown (the audit trail, `history`, the API), with the
    /// credentials it carries masked.
    pub redact: fn(&ChannelAddress) -> ChannelAddress,
}

/// Every provider kind phasegate can drive.
pub const PROVIDERS: [ProviderKind; 2] = [simulator::settings::KIND, graph::settings::KIND];

/// Every channel kind phasegate can notify through.
pub const CHANNELS: [ChannelKind; 4] = [
    notifier::WEBHOOK,
    crate::announce::email::KIND,
    crate::announce::teams::KIND,
    crate::announce::slack::KIND,
];

/// A notification's address as it may be shown: masked by its channel's adapter; one of a kind
/// no adapter claims is shown without its settings.
pub fn redacted_channel(address: &ChannelAddress) -> ChannelAddress {
    match CHANNELS.iter().find(|c| c.name == address.kind()) {
        Some(channel) => (channel.redact)(address),
        None => ChannelAddress::new(address.kind(), serde_json::Map::new()),
    }
}

/// Reads and checks a plan: the domain's rules and those of the adapters it names. The plan's
/// warnings are in [`Plan::warnings`] (errors, if the plan sets `strict`).
pub fn parse_plan(file: &str, source: &str) -> Result<Plan, PlanErrors> {
    check_plan(file, source, Strictness::AsWritten)
}

/// [`parse_plan`], with the plan's warnings weighed as `strictness` says (`plan check --strict`
/// makes them errors; a plan read back from the store is [`Strictness::Lenient`]).
pub fn check_plan(file: &str, source: &str, strictness: Strictness) -> Result<Plan, PlanErrors> {
    let parsed = plan::check(file, source, strictness);
    let adapters = check(source);
    match parsed {
        Ok(plan) if adapters.is_empty() => Ok(plan),
        Ok(_) => Err(PlanErrors {
            file: file.to_string(),
            source: source.to_string(),
            diagnostics: sorted(adapters),
        }),
        Err(mut errors) => {
            errors.diagnostics.extend(adapters);
            errors.diagnostics = sorted(std::mem::take(&mut errors.diagnostics));
            Err(errors)
        }
    }
}

fn sorted(mut diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
    diagnostics.dedup();
    diagnostics
}

/// The adapters' problems with a plan's text. A text that is not TOML, or has no `[provider]`,
/// has none here: the domain reports that.
fn check(source: &str) -> Vec<Diagnostic> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Spanned<String>,
    }
    #[derive(Deserialize)]
    struct Doc {
        provider: Kind,
    }
    let Ok(doc) = toml::from_str::<Doc>(source) else {
        return Vec::new();
    };
    let kind = doc.provider.kind;
    let mut found = match PROVIDERS.iter().find(|p| p.name == kind.get_ref()) {
        Some(provider) => (provider.check)(source),
        None => {
            let names: Vec<String> = PROVIDERS
                .iter()
                .map(|p| format!("\"{}\"", p.name))
                .collect();
            vec![Diagnostic::new(
                kind.span(),
                format!(
                    "unknown provider kind `{}`: expected {}",
                    kind.get_ref(),
                    names.join(" or ")
                ),
            )]
        }
    };
    for channel in &CHANNELS {
        found.extend((channel.check)(source));
    }
    found.extend(crate::preflight::settings::check(source));
    // An `[[announcement]]`'s channel, and the webhook adapter's keys of one that names it.
    found.extend(crate::announce::check_channels(source));
    found
}

/// The plan's `[provider]` table as an adapter's own type, with spans.
pub fn provider_table<T: DeserializeOwned>(source: &str) -> Result<Spanned<T>, Diagnostic> {
    #[derive(Deserialize)]
    #[serde(bound = "T: DeserializeOwned")]
    struct Doc<T> {
        provider: Spanned<T>,
    }
    toml::from_str::<Doc<T>>(source)
        .map(|doc| doc.provider)
        .map_err(toml_diagnostic)
}

/// Says an unknown key is not one of `whose` settings (serde's message lists the keys expected,
/// which reads as noise next to a key of another kind).
pub fn foreign_key(diagnostic: Diagnostic, whose: &str) -> Diagnostic {
    let key = diagnostic
        .message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key.to_string());
    match key {
        Some(key) => Diagnostic::new(
            diagnostic.span,
            format!("`{key}` is not a setting of {whose}"),
        ),
        None => diagnostic,
    }
}

/// The prefix of every environment variable a plan may name for a secret: a plan chooses which
/// variable is read and where its value is sent, so it must not be able to pick another secret of
/// the machine (`AWS_SECRET_ACCESS_KEY`, say).
pub const SECRET_PREFIX: &str = "PHASEGATE_";

/// A plan's `*_env` setting: the name of a `PHASEGATE_…` environment variable.
pub fn secret_variable(value: &Spanned<String>, key: &str) -> Result<String, Diagnostic> {
    let name = value.get_ref().trim();
    let well_formed = name.len() > SECRET_PREFIX.len()
        && name.len() <= 128
        && name.starts_with(SECRET_PREFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if well_formed {
        Ok(name.to_string())
    } else {
        Err(Diagnostic::new(
            value.span(),
            format!(
                "`{key}` must name an environment variable starting with {SECRET_PREFIX} \
                 (capitals, digits, `_`), such as {SECRET_PREFIX}GRAPH_SECRET, found `{name}`: \
                 a plan may not choose another secret of this machine"
            ),
        ))
    }
}

/// An endpoint phasegate sends credentials or signed data to: `https://`, or plain `http://` only
/// to this machine (an emulator, a local receiver). Returned without a trailing `/`.
pub fn endpoint_url(value: &Spanned<String>, what: &str) -> Result<String, Diagnostic> {
    let text = value.get_ref().trim();
    let problem = |message: String| Err(Diagnostic::new(value.span(), message));
    let Ok(url) = reqwest::Url::parse(text) else {
        return problem(format!("invalid {what} `{text}`: expected an https:// URL"));
    };
    if url.host().is_none() {
        return problem(format!("invalid {what} `{text}`: it names no host"));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return problem(format!(
                "{what} `{text}` is plain http: use https:// (plain http is allowed only to \
                 this machine, 127.0.0.1, ::1 or localhost)"
            ));
        }
        other => {
            return problem(format!(
                "invalid {what} `{text}`: expected https://, not {other}://"
            ));
        }
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A TOML error as a plan diagnostic.
pub fn toml_diagnostic(err: toml::de::Error) -> Diagnostic {
    Diagnostic::new(
        err.span().unwrap_or(0..0),
        err.message().trim().replace('\n', "; "),
    )
}

/// Settings without their nulls, which TOML lacks (older records hold them for absent values).
fn without_nulls(
    settings: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    settings.into_iter().filter(|(_, v)| !v.is_null()).collect()
}

/// Settings an adapter keeps (a plan's [`ProviderConfig`], an outbox record's
/// [`ChannelAddress`]) as TOML text under `key`, so that the adapter reads them with the very
/// parser that checked the plan.
fn settings_source(key: &str, table: serde_json::Value) -> String {
    let mut doc = serde_json::Map::new();
    doc.insert(key.to_string(), table);
    toml::to_string(&doc).unwrap_or_default()
}

/// Reads settings kept by [`provider_source`] or [`channel_source`] with an adapter's plan parser; a failure means the
/// settings did not come from a checked plan, and says what is wrong.
pub fn reparse<T>(
    what: &str,
    source: &str,
    parse: impl FnOnce(&str) -> Result<T, Vec<Diagnostic>>,
) -> Result<T, String> {
    parse(source).map_err(|diagnostics| {
        let messages: Vec<String> = diagnostics.into_iter().map(|d| d.message).collect();
        format!("invalid {what} settings: {}", messages.join("; "))
    })
}

/// The provider settings of a plan, for its adapter (as its `[provider]` table).
pub fn provider_source(config: &ProviderConfig) -> String {
    let mut settings = without_nulls(config.settings.clone());
    settings.insert("kind".into(), config.kind.clone().into());
    settings_source("provider", serde_json::Value::Object(settings))
}

/// A channel address, for its adapter (as the `[[webhook]]`-style table of its kind).
pub fn channel_source(address: &ChannelAddress) -> String {
    let table = serde_json::Value::Object(without_nulls(address.settings()));
    settings_source(address.kind(), serde_json::Value::Array(vec![table]))
}
