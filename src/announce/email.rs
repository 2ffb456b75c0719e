//! `channel = "email"`: announcements as plain-text e-mail through an SMTP relay (lettre).
//!
//! Settings: `smtp_host`, `smtp_port` (587), `from`, `tls` (`"starttls"`, the default and the
//! only choice for a relay on another machine; `"none"` only to this machine), `username_env`
//! and `password_env` (both or neither: the names of `PHASEGATE_…` environment variables with
//! the relay's credentials, read when a message is sent and never shown or stored), `ca_file`
//! (a PEM file with the certificate authority of a relay whose certificate no public one signs),
//! `max_recipients` (the most addresses one message may go to, 1 to 500, 500 by default:
//! Exchange Online's limit; set the relay's own when it takes fewer).
//!
//! An announcement's own `addresses` are its To; its groups' members, read from the directory,
//! are Bcc, so a department does not see everyone's address (the sender is the To when the
//! announcement names no address). One message, never batches: a group larger than
//! `max_recipients` is a clear failure (at preflight, and as the message's audit event), not a
//! stream of partial sends.
//!
//! Each message's `Message-ID` is made from its outbox key, so the same announcement sent twice
//! (a crash between the relay's answer and its record) carries the same id. A 4xx answer
//! (transient) is retried; a 5xx (permanent: an unknown recipient, a refused sender) is not.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncTransport, Tokio1Executor};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::Links;
use crate::adapters::{self, ChannelKind};
use crate::domain::directory::MAIL_RECIPIENTS_MAX;
use crate::domain::event::ChannelAddress;
use crate::domain::plan::Diagnostic;
use crate::notifier::{About, Delivery, NotifyError};
use crate::retry::Failure;

pub const NAME: &str = "email";

pub const KIND: ChannelKind = ChannelKind {
    name: NAME,
    check,
    // Nothing secret: credentials are named by their variables, never written in the plan.
    redact: |address| address.clone(),
};

/// How the connection to the relay is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// STARTTLS, required: a relay that does not offer it is not sent to.
    StartTls,
    /// Plain SMTP, only to this machine.
    None,
}

/// An e-mail channel's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailSettings {
    pub host: String,
    pub port: u16,
    pub from: String,
    pub security: Security,
    /// The variables with the user name and password.
    pub credentials: Option<(String, String)>,
    pub ca_file: Option<String>,
    /// The most recipients (To and Bcc) one message may have.
    pub max_recipients: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawEmail {
    channel: Option<toml::Value>,
    on: Option<toml::Value>,
    groups: Option<toml::Value>,
    addresses: Option<Spanned<Vec<toml::Value>>>,
    subject: Option<toml::Value>,
    template: Option<toml::Value>,
    notice: Option<toml::Value>,
    smtp_host: Spanned<String>,
    smtp_port: Option<Spanned<i64>>,
    from: Spanned<String>,
    tls: Option<Spanned<String>>,
    username_env: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    max_recipients: Option<Spanned<i64>>,
}

fn check(source: &str) -> Vec<Diagnostic> {
    let mut problems = parse_all(source).err().unwrap_or_default();
    // A plan's e-mail announcement must reach someone (read here, not at run time: the
    // recipients travel with each message).
    if let Ok(tables) = super::tables_of::<RawEmail>(source, NAME, "an e-mail announcement") {
        for table in tables {
            let raw = table.get_ref();
            let no_addresses = raw
                .addresses
                .as_ref()
                .is_none_or(|a| a.get_ref().is_empty());
            let no_groups = raw.groups.as_ref().is_none_or(|g| match g {
                toml::Value::Array(list) => list.is_empty(),
                _ => false,
            });
            if no_addresses && no_groups {
                problems.push(Diagnostic::new(
                    table.span(),
                    "an e-mail announcement needs `addresses` or `groups` (whose members are \
                     mailed at the addresses the directory has for them)",
                ));
            }
        }
    }
    problems
}

/// Every e-mail announcement's settings in a plan's text, or every problem at its place.
pub fn parse_all(source: &str) -> Result<Vec<EmailSettings>, Vec<Diagnostic>> {
    let tables = super::tables_of::<RawEmail>(source, NAME, "an e-mail announcement")?;
    let mut problems = Vec::new();
    let mut all = Vec::new();
    for table in tables {
        let raw = table.into_inner();
        let host = raw.smtp_host.get_ref().trim().to_string();
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !host_ok {
            problems.push(Diagnostic::new(
                raw.smtp_host.span(),
                format!("`smtp_host` must be a host name or address, found `{host}`"),
            ));
        }
        let port = match &raw.smtp_port {
            None => 587,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(port) if port > 0 => port,
                _ => {
                    problems.push(Diagnostic::new(
                        p.span(),
                        format!("`smtp_port` must be from 1 to 65535, found {}", p.get_ref()),
                    ));
                    0
                }
            },
        };
        let from = raw.from.get_ref().trim().to_string();
        if from.parse::<Mailbox>().is_err()
            || !crate::domain::plan::announce::is_address(bare_address(&from))
        {
            problems.push(Diagnostic::new(
                raw.from.span(),
                format!("`from` must be an address (phasegate@contoso.com), found `{from}`"),
            ));
        }
        let security = match raw.tls.as_ref().map(|t| t.get_ref().trim()) {
            None | Some("starttls") => Security::StartTls,
            Some("none") if is_local(&host) => Security::None,
            Some("none") => {
                problems.push(Diagnostic::new(
                    raw.tls.as_ref().map_or(0..0, Spanned::span),
                    format!(
                        "`tls = \"none\"` sends mail and credentials in the clear: allowed only \
                         to this machine (127.0.0.1, ::1, localhost), not to `{host}`"
                    ),
                ));
                Security::StartTls
            }
            Some(other) => {
                problems.push(Diagnostic::new(
                    raw.tls.as_ref().map_or(0..0, Spanned::span),
                    format!("`tls` is \"starttls\" or \"none\", found `{other}`"),
                ));
                Security::StartTls
            }
        };
        let username = raw.username_env.as_ref().and_then(|v| {
            adapters::secret_variable(v, "username_env")
                .map_err(|d| problems.push(d))
                .ok()
        });
        let password = raw.password_env.as_ref().and_then(|v| {
            adapters::secret_variable(v, "password_env")
                .map_err(|d| problems.push(d))
                .ok()
        });
        let credentials = if raw.username_env.is_some() == raw.password_env.is_some() {
            username.zip(password)
        } else {
            problems.push(Diagnostic::new(
                table_span(&raw),
                "set both `username_env` and `password_env`, or neither",
            ));
            None
        };
        let ca_file = raw.ca_file.as_ref().map(|f| f.get_ref().trim().to_string());
        if let (Some(file), Some(spanned)) = (&ca_file, &raw.ca_file)
            && file.is_empty()
        {
            problems.push(Diagnostic::new(
                spanned.span(),
                "`ca_file` must not be empty",
            ));
        }
        let max_recipients = match &raw.max_recipients {
            None => MAIL_RECIPIENTS_MAX,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if (1..=MAIL_RECIPIENTS_MAX).contains(&n) => n,
                _ => {
                    problems.push(Diagnostic::new(
                        n.span(),
                        format!(
                            "`max_recipients` must be from 1 to {MAIL_RECIPIENTS_MAX} (recipients \
                             of one message), found {}",
                            n.get_ref()
                        ),
                    ));
                    MAIL_RECIPIENTS_MAX
                }
            },
        };
        all.push(EmailSettings {
            host,
            port,
            from,
            security,
            credentials,
            ca_file,
            max_recipients,
        });
    }
    if problems.is_empty() {
        Ok(all)
    } else {
        Err(problems)
    }
}

fn table_span(raw: &RawEmail) -> std::ops::Range<usize> {
    raw.username_env
        .as_ref()
        .or(raw.password_env.as_ref())
        .map_or(raw.smtp_host.span(), Spanned::span)
}

fn bare_address(from: &str) -> &str {
    match (from.rfind('<'), from.rfind('>')) {
        (Some(open), Some(close)) if open < close => &from[open + 1..close],
        _ => from,
    }
}

fn is_local(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The e-mail channel an outbox record's address names.
pub fn of(address: &ChannelAddress) -> Result<EmailSettings, String> {
    super::reparse(address, NAME, parse_all)
}

/// The `Message-ID` of the message with this outbox key: the same on every attempt.
pub fn message_id(key: &str, from: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let domain = bare_address(from)
        .rsplit_once('@')
        .map_or("phasegate.invalid", |(_, d)| d);
    format!("<{}.phasegate@{domain}>", &digest[..32])
}

fn from_mailbox(settings: &EmailSettings) -> Result<Mailbox, String> {
    settings
        .from
        .parse()
        .map_err(|e| format!("the sender `{}`: {e}", settings.from))
}

/// The message as sent: plain text, from the channel's sender to the announcement's addresses
/// (To) and its groups' members as the directory had them (Bcc, so they do not see each
/// other's addresses).
pub fn compose(
    settings: &EmailSettings,
    key: &str,
    about: &About<'_>,
    links: Option<&Links>,
) -> Result<Message, String> {
    let from = from_mailbox(settings)?;
    let mut builder = Message::builder()
        .from(from)
        .subject(about.message.subject.clone())
        .message_id(Some(message_id(key, &settings.from)))
        .header(ContentType::TEXT_PLAIN);
    let members = match &about.message.recipients {
        Some(recipients) => recipients.addresses.as_slice(),
        None if !about.message.groups.is_empty() => {
            return Err("the members of the announcement's groups were not read".into());
        }
        None => &[],
    };
    if about.message.addresses.is_empty() && members.is_empty() {
        return Err(
            "the announcement reaches nobody: no addresses, and no group member \
                    with a mail address"
                .into(),
        );
    }
    let total = about.message.addresses.len() + members.len();
    if total > settings.max_recipients {
        return Err(format!(
            "the message would go to {total} addresses, more than the channel's max_recipients \
             ({})",
            settings.max_recipients
        ));
    }
    let mailbox = |address: &String| {
        address
            .parse::<Mailbox>()
            .map_err(|e| format!("the recipient `{address}`: {e}"))
    };
    for address in &about.message.addresses {
        builder = builder.to(mailbox(address)?);
    }
    // The groups' members do not see each other's addresses.
    for address in members {
        builder = builder.bcc(mailbox(address)?);
    }
    if about.message.addresses.is_empty() {
        // A message needs a To: the sender, as for any list mailed by Bcc.
        builder = builder.to(from_mailbox(settings)?);
    }
    let mut text = super::plain_text(about.message, links);
    text.push_str(&format!(
        "\n\n-- \nphasegate rollout {} ({}), {}\n",
        about.rollout,
        about.plan,
        about.status.as_str()
    ));
    builder.body(text).map_err(|e| e.to_string())
}

/// One attempt at handing the message to the relay: `Ok` with its answer's code (250).
pub async fn send(
    delivery: &Delivery<'_>,
    about: &About<'_>,
    links: Option<&Links>,
) -> Result<u16, NotifyError> {
    let settings = of(delivery.to).map_err(NotifyError::final_)?;
    let shown = format!("smtp://{}:{}", settings.host, settings.port);
    let message = compose(&settings, delivery.key, about, links)
        .map_err(|e| NotifyError::final_(format!("{shown}: {e}")))?;
    let transport =
        transport(&settings).map_err(|e| NotifyError::final_(format!("{shown}: {e}")))?;
    match transport.send(message).await {
        Ok(answer) => Ok(answer.code().to_string().parse().unwrap_or(250)),
        Err(e) => Err(classify(&shown, &e)),
    }
}

fn transport(settings: &EmailSettings) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let mut builder =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.clone())
            .port(settings.port)
            .timeout(Some(Duration::from_secs(20)));
    builder = match settings.security {
        Security::None => builder.tls(Tls::None),
        Security::StartTls => {
            let host = settings.host.trim_start_matches('[').trim_end_matches(']');
            let mut parameters = TlsParameters::builder(host.to_string());
            if let Some(file) = &settings.ca_file {
                let pem = std::fs::read(file)
                    .map_err(|e| format!("cannot read the relay's CA file {file}: {e}"))?;
                let certificate = Certificate::from_pem(&pem)
                    .map_err(|e| format!("the relay's CA file {file}: {e}"))?;
                parameters = parameters.add_root_certificate(certificate);
            }
            let parameters = parameters
                .build_rustls()
                .map_err(|e| format!("TLS settings: {e}"))?;
            builder.tls(Tls::Required(parameters))
        }
    };
    if let Some((user_env, password_env)) = &settings.credentials {
        let user = std::env::var(user_env)
            .map_err(|_| format!("the relay's user name is not set: put it in {user_env}"))?;
        let password = std::env::var(password_env)
            .map_err(|_| format!("the relay's password is not set: put it in {password_env}"))?;
        builder = builder.credentials(Credentials::new(user, password));
    }
    Ok(builder.build())
}

/// A relay's refusal as the retry policy sees it: a transient (4xx) answer or no answer may
/// change; a permanent (5xx) answer, a TLS failure or a refused login will not.
fn classify(shown: &str, e: &lettre::transport::smtp::Error) -> NotifyError {
    let message = format!("{shown}: {e}");
    let failure = if e.is_transient() {
        Some(Failure::Unavailable)
    } else if e.is_permanent() || e.is_tls() {
        None
    } else {
        // No answer: could not connect, a timeout, a broken connection.
        Some(Failure::Transport)
    };
    NotifyError {
        message,
        failure,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(table: &str) -> String {
        format!("[[announcement]]\nchannel = \"email\"\ntemplate = \"t\"\n{table}\n")
    }

    #[test]
    fn settings_are_read_with_their_defaults() {
        let all = parse_all(&plan(
            "addresses = [\"it@contoso.com\"]\nsmtp_host = \"smtp.contoso.com\"\n\
             from = \"Phasegate <phasegate@contoso.com>\"\n\
             username_env = \"PHASEGATE_SMTP_USER\"\npassword_env = \"PHASEGATE_SMTP_PASSWORD\"",
        ))
        .unwrap();
        assert_eq!(
            all,
            vec![EmailSettings {
                host: "smtp.contoso.com".into(),
                port: 587,
                from: "Phasegate <phasegate@contoso.com>".into(),
                security: Security::StartTls,
                credentials: Some((
                    "PHASEGATE_SMTP_USER".into(),
                    "PHASEGATE_SMTP_PASSWORD".into()
                )),
                ca_file: None,
                max_recipients: 500,
            }]
        );
        let table = |n: &str| {
            plan(&format!(
                "addresses = [\"it@contoso.com\"]\nsmtp_host = \"smtp.contoso.com\"\n\
                 from = \"pg@contoso.com\"\nmax_recipients = {n}"
            ))
        };
        assert_eq!(parse_all(&table("100")).unwrap()[0].max_recipients, 100);
        for bad in ["0", "501", "-1"] {
            let problems = check(&table(bad));
            assert!(
                problems[0]
                    .message
                    .contains("`max_recipients` must be from 1 to 500"),
                "{bad}: {problems:?}"
            );
        }
    }

    #[test]
    fn plain_smtp_only_to_this_machine_and_credentials_only_from_phasegate_variables() {
        let problems = check(&plan(
            "addresses = [\"it@contoso.com\"]\nsmtp_host = \"smtp.contoso.com\"\nfrom = \"pg@contoso.com\"\n\
             tls = \"none\"\nusername_env = \"HOME\"\npassword_env = \"PHASEGATE_P\"\nsmtp_port = 70000",
        ));
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(problems.len(), 3, "{messages:?}");
        assert!(
            messages
                .iter()
                .any(|m| m.contains("allowed only to this machine"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("starting with PHASEGATE_"))
        );
        assert!(messages.iter().any(|m| m.contains("1 to 65535")));
        let local = parse_all(&plan(
            "addresses = [\"it@contoso.com\"]\nsmtp_host = \"127.0.0.1\"\nfrom = \"pg@contoso.com\"\ntls = \"none\"",
        ))
        .unwrap();
        assert_eq!(local[0].security, Security::None);
    }

    #[test]
    fn an_email_announcement_needs_addresses_and_names_its_own_keys() {
        let problems = check(&plan(
            "smtp_host = \"h.example\"\nfrom = \"pg@contoso.com\"\nsmpt_port = 25",
        ));
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("`smpt_port` is not a setting of an e-mail announcement")),
            "{messages:?}"
        );
        let problems = check(&plan(
            "smtp_host = \"h.example\"\nfrom = \"pg@contoso.com\"",
        ));
        assert!(
            problems[0]
                .message
                .contains("needs `addresses` or `groups`"),
            "{problems:?}"
        );
        assert!(check(&plan("smtp_host = \"h.example\"\nfrom = \"pg@contoso.com\"\nusername_env = \"PHASEGATE_U\"\naddresses = [\"a@b.co\"]"))
            [0]
            .message
            .contains("both"));
    }

    #[test]
    fn the_message_id_is_the_same_for_the_same_key_and_differs_between_keys() {
        let a = message_id("store/r-1:1.2", "pg@contoso.com");
        assert_eq!(a, message_id("store/r-1:1.2", "Phasegate <pg@contoso.com>"));
        assert_ne!(a, message_id("store/r-1:1.3", "pg@contoso.com"));
        assert!(a.starts_with('<') && a.ends_with("@contoso.com>"), "{a}");
    }

    #[test]
    fn settings_read_back_from_a_record_as_they_were_checked() {
        let source = plan(
            "addresses = [\"it@contoso.com\"]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 2525\nfrom = \"pg@contoso.com\"\ntls = \"none\"",
        );
        let mut settings = serde_json::Map::new();
        settings.insert("smtp_host".into(), "127.0.0.1".into());
        settings.insert("smtp_port".into(), 2525.into());
        settings.insert("from".into(), "pg@contoso.com".into());
        settings.insert("tls".into(), "none".into());
        let address = ChannelAddress::new(NAME, settings);
        assert_eq!(of(&address).unwrap(), parse_all(&source).unwrap()[0]);
    }
}
