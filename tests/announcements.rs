//! Telling the organisation: a plan's `[[announcement]]`s delivered by the real binary to a real
//! SMTP server (Python's aiosmtpd, with STARTTLS and a login, started by the test) and to a
//! Teams Workflows and a Slack webhook receiver on loopback — each exactly once, before the
//! first phase is applied, across a kill -9 in the middle of a delivery; and a channel that is
//! down holds nothing up and gets its message once it is back.
//!
//! The SMTP server needs Python with aiosmtpd (`tests/support/install-smtp-server`, which
//! `.ci/run` runs). `PHASEGATE_PYTHON` names another Python.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Phasegate, code, eventually, stderr, stdout};
use serde_json::Value;

const SMTP_USER: &str = "phasegate-relay";
const SMTP_PASSWORD: &str = "relay-pw-5Tq";

/// A certificate authority and a server certificate it signed for 127.0.0.1, as PEM files.
fn relay_certificates(dir: &std::path::Path) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test relay CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = server_params.signed_by(&server_key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    (
        write("relay-ca.pem", ca.pem()),
        write("relay.pem", server.pem()),
        write("relay-key.pem", server_key.serialize_pem()),
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tests/support/smtp-server.py` on a free loopback port: STARTTLS required, then AUTH.
struct Relay {
    child: Child,
    port: u16,
    mail: Arc<Mutex<Vec<Value>>>,
}

/// Installs aiosmtpd on first use when it is missing (as the dashboard test installs its
/// browser), so `cargo test` on a fresh machine needs no step of its own; once per test process.
fn install_smtp_server() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let script = format!(
            "{}/tests/support/install-smtp-server",
            env!("CARGO_MANIFEST_DIR")
        );
        let status = Command::new("bash")
            .arg(&script)
            .status()
            .unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(
            status.success(),
            "{script} failed: install aiosmtpd (pip install aiosmtpd)"
        );
    });
}

impl Relay {
    fn start(cert: &str, key: &str) -> Relay {
        Relay::start_on(free_port(), cert, key)
    }

    fn start_on(port: u16, cert: &str, key: &str) -> Relay {
        install_smtp_server();
        let python = std::env::var("PHASEGATE_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = format!(
            "{}/tests/support/smtp-server.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut child = Command::new(&python)
            .args([
                script.as_str(),
                &port.to_string(),
                cert,
                key,
                SMTP_USER,
                SMTP_PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{python}: {e} (run tests/support/install-smtp-server)"));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(
            first.trim(),
            "ready",
            "the SMTP server did not start (is aiosmtpd installed? tests/support/install-smtp-server)"
        );
        let mail = Arc::new(Mutex::new(Vec::new()));
        let kept = mail.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Relay { child, port, mail }
    }

    fn mail(&self) -> Vec<Value> {
        self.mail.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request a webhook receiver took.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    key: String,
    body: Value,
    /// Answered (2xx); false for a request held until its sender went away.
    answered: bool,
}

/// A Teams Workflows trigger (`/teams/…`, answers 202) and a Slack incoming webhook
/// (`/slack/…`, answers 200 `ok`) on one loopback port. With `hold` set, the first request to
/// a path starting with it is taken and never answered.
struct Hooks {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Hooks {
    fn start(listener: TcpListener, hold: Option<&str>) -> Hooks {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let kept = hits.clone();
        let hold = Arc::new(Mutex::new(hold.map(str::to_string)));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let kept = kept.clone();
                let hold = hold.clone();
                std::thread::spawn(move || serve_one(stream, &kept, &hold));
            }
        });
        Hooks { url, hits }
    }

    fn hits(&self, prefix: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

fn serve_one(
    mut stream: std::net::TcpStream,
    hits: &Mutex<Vec<Hit>>,
    hold: &Mutex<Option<String>>,
) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 8192];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request).to_string();
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let header = |name: &str| {
        text[..head_end].lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while request.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let body = serde_json::from_slice(&request[head_end..]).unwrap_or(Value::Null);
    let key = header("idempotency-key").unwrap_or_default();
    let held = {
        let mut hold = hold.lock().unwrap();
        match hold.as_deref() {
            Some(prefix) if path.starts_with(prefix) => {
                *hold = None;
                true
            }
            _ => false,
        }
    };
    hits.lock().unwrap().push(Hit {
        path: path.clone(),
        key,
        body,
        answered: !held,
    });
    if held {
        // Never answered: the sender is killed meanwhile, which closes the connection.
        let _ = stream.set_read_timeout(None);
        let _ = stream.read(&mut chunk);
        return;
    }
    let answer = if path.starts_with("/teams") {
        "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
    } else {
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            .to_string()
    };
    let _ = stream.write_all(answer.as_bytes());
}

/// The simulator's Android plan with these tables before its first phase.
fn write_plan(pg: &Phasegate, tables: &str) {
    let text = std::fs::read_to_string(format!(
        "{}/plans/android-guarded.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replacen("[[phase]]", &format!("{tables}\n[[phase]]"), 1);
    std::fs::write(&pg.plan, text).unwrap();
}

fn history(pg: &Phasegate, id: &str) -> Vec<Value> {
    let json = pg.json(&["history", id]);
    json.as_array().cloned().unwrap_or_default()
}

fn kind(event: &Value) -> &str {
    event["event"]["kind"]["type"].as_str().unwrap_or("")
}

/// The header `name` of a raw message.
fn mail_header<'a>(data: &'a str, name: &str) -> Option<&'a str> {
    data.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

on_both_stores! {
    /// issue 10, must show 4.
    fn announcements_go_out_once_each_before_the_first_phase_also_across_a_kill() {
        let pg = Phasegate::offline()
            .with_env("PHASEGATE_SMTP_USER", SMTP_USER)
            .with_env("PHASEGATE_SMTP_PASSWORD", SMTP_PASSWORD)
            .with_env("PHASEGATE_PUBLIC_URL", "https://phasegate.contoso.com");
        let (ca, cert, key) = relay_certificates(pg.dir.path());
        let relay = Relay::start(&cert, &key);
        // The first Teams request is held and never answered: the process is killed meanwhile.
        let hooks = Hooks::start(TcpListener::bind("127.0.0.1:0").unwrap(), Some("/teams"));
        write_plan(
            &pg,
            &format!(
                r#"[[announcement]]
    channel = "email"
    on = ["start"]
    notice = "2h"
    groups = ["Pilot IT"]
    addresses = ["it-staff@contoso.com", "helpdesk@contoso.com"]
    subject = "{{plan}}: compliance checks begin"
    template = "Rollout {{rollout}} of {{plan}} has started. Its first phase is applied from {{first_phase_at}} to {{groups}}."
    smtp_host = "127.0.0.1"
    smtp_port = {smtp}
    from = "Phasegate <phasegate@contoso.com>"
    ca_file = "{ca}"
    username_env = "PHASEGATE_SMTP_USER"
    password_env = "PHASEGATE_SMTP_PASSWORD"

    [[announcement]]
    channel = "teams"
    on = ["start"]
    groups = ["Pilot IT", "Pilot Field"]
    subject = "{{plan}} starts"
    template = "Devices of {{groups}} get the new compliance policy from {{first_phase_at}}."
    url = "{hooks}/teams/workflows/9f1c/triggers/manual/paths/invoke?api-version=2016-06-01&sig=SIG-not-shown"

    [[announcement]]
    channel = "slack"
    on = ["start"]
    template = "{{plan}} ({{rollout}}) has started: first phase from {{first_phase_at}}."
    url = "{hooks}/slack/services/T000/B000/SLACK-not-shown"
    "#,
                smtp = relay.port,
                hooks = hooks.url,
            ),
        );
        let checked = pg.run(&["plan", "check", pg.plan.to_str().unwrap()]);
        assert_eq!(
            code(&checked),
            0,
            "{}{}",
            stdout(&checked),
            stderr(&checked)
        );
        let id = pg.start();

        // Drive it; kill -9 while the Teams delivery is in flight (after the e-mail went out).
        let mut run = pg.spawn(&["run", &id]);
        assert!(
            eventually(Duration::from_secs(60), || !hooks.hits("/teams").is_empty()),
            "no Teams request; mail: {:?}",
            relay.mail()
        );
        run.kill().unwrap();
        let killed = run.wait_with_output().unwrap();
        assert!(!killed.status.success());
        assert!(
            hooks.hits("/slack").is_empty(),
            "the Slack message went out while Teams was held"
        );
        let status = pg.status(&id);
        assert_eq!(
            status["phases"][0]["applied_at"],
            Value::Null,
            "the first phase was applied while announcements were in flight: {status}"
        );

        // Restarted: what was in flight goes out again under the same key, the rest once.
        let rerun = pg.run(&["run", &id]);
        assert!(
            matches!(code(&rerun), 0 | 3),
            "{}{}",
            stdout(&rerun),
            stderr(&rerun)
        );

        // E-mail: one message, over STARTTLS, logged in, to both addresses and every member of
        // Pilot IT with a mailbox (as the directory had them before the first attempt), each once.
        let mail = relay.mail();
        assert_eq!(mail.len(), 1, "{mail:?}");
        let data = mail[0]["data"].as_str().unwrap();
        assert_eq!(mail[0]["tls"], true);
        assert_eq!(mail[0]["login"], true);
        let trail = history(&pg, &id);
        let members = resolved_members(&trail);
        assert!(members.len() > 50, "Pilot IT's members: {members:?}");
        assert!(members.iter().all(|m| m.ends_with("@contoso.com")));
        let mut expected = members.clone();
        expected.extend(["helpdesk@contoso.com".into(), "it-staff@contoso.com".into()]);
        expected.sort();
        assert_eq!(envelope(&mail[0]), expected, "each address once");
        assert_eq!(
            mail_header(data, "Bcc"),
            None,
            "the members see each other's addresses"
        );
        assert_eq!(
            mail_header(data, "Subject"),
            Some("android-guarded: compliance checks begin")
        );
        let message_id = mail_header(data, "Message-ID").unwrap();
        assert!(message_id.ends_with("@contoso.com>"), "{message_id}");
        assert!(data.contains(&format!("Rollout {id} of android-guarded has started")));
        assert!(data.contains("to Pilot IT."), "{data}");
        assert!(data.contains(&format!("https://phasegate.contoso.com/ui/rollouts/{id}")));

        // Teams: the held request and its repeat carry one key; it was answered once.
        let teams = hooks.hits("/teams");
        assert_eq!(teams.len(), 2, "{teams:?}");
        assert_eq!(teams[0].key, teams[1].key, "a repeat under a new key");
        assert!(!teams[0].answered && teams[1].answered);
        assert_eq!(
            teams[0].body, teams[1].body,
            "the same message on every attempt"
        );
        let card = &teams[1].body;
        assert_eq!(card["type"], "message");
        assert_eq!(
            card["attachments"][0]["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["attachments"][0]["content"]["type"], "AdaptiveCard");
        assert!(
            card["attachments"][0]["content"]["body"][1]["text"]
                .as_str()
                .unwrap()
                .starts_with("Devices of Pilot IT, Pilot Field get the new compliance policy from ")
        );

        // Slack: once, with blocks and the text fallback.
        let slack = hooks.hits("/slack");
        assert_eq!(slack.len(), 1, "{slack:?}");
        assert!(slack[0].answered);
        assert!(
            slack[0].body["blocks"]
                .as_array()
                .is_some_and(|b| !b.is_empty())
        );
        assert!(
            slack[0].body["text"]
                .as_str()
                .unwrap()
                .contains(&format!("android-guarded ({id}) has started"))
        );
        let keys: std::collections::BTreeSet<&str> =
            [teams[1].key.as_str(), slack[0].key.as_str()].into();
        assert_eq!(keys.len(), 2, "two messages, two keys");

        // The audit trail: each announcement delivered once, all before the first phase's write,
        // which waited out the notice.
        let delivered: Vec<&Value> = trail.iter().filter(|e| kind(e) == "delivered").collect();
        assert_eq!(delivered.len(), 3, "{delivered:?}");
        let mut effects = BTreeMap::new();
        for event in &delivered {
            let effect = &event["event"]["kind"]["effect"];
            *effects.entry(effect.to_string()).or_insert(0) += 1;
        }
        assert!(effects.values().all(|&n| n == 1), "{effects:?}");
        let first_write = trail
            .iter()
            .find(|e| kind(e) == "reconciled")
            .unwrap_or_else(|| {
                let kinds: Vec<&str> = trail.iter().map(kind).collect();
                panic!(
                    "the first phase was not applied: {kinds:?}\n{}\n{}{}",
                    pg.status(&id),
                    stdout(&rerun),
                    stderr(&rerun)
                )
            });
        let last_delivery = delivered.iter().map(|e| e["seq"].as_u64().unwrap()).max();
        assert!(last_delivery.unwrap() < first_write["seq"].as_u64().unwrap());
        let started_at = trail[0]["at"].as_str().unwrap();
        let status = pg.status(&id);
        let applied_at = status["phases"][0]["applied_at"].as_str().unwrap();
        let seconds = |t: &str| {
            humantime::parse_rfc3339(t)
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert!(
            seconds(applied_at) >= seconds(started_at) + 2 * 3600,
            "the first phase did not wait out the notice: started {started_at}, applied {applied_at}"
        );
        // Nothing secret in the trail or the status.
        let shown = format!("{trail:?}{status}");
        for secret in ["SIG-not-shown", "SLACK-not-shown", SMTP_PASSWORD] {
            assert!(!shown.contains(secret), "{secret} shown");
        }
    }
}

/// The members' addresses an e-mail announcement's `recipients_resolved` event fixed (exactly
/// one such event).
fn resolved_members(trail: &[Value]) -> Vec<String> {
    let resolved: Vec<&Value> = trail
        .iter()
        .filter(|e| kind(e) == "recipients_resolved")
        .collect();
    assert_eq!(resolved.len(), 1, "the directory read once: {resolved:?}");
    resolved[0]["event"]["kind"]["recipients"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// A received message's envelope recipients, sorted.
fn envelope(mail: &Value) -> Vec<String> {
    let mut to: Vec<String> = mail["to"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_lowercase())
        .collect();
    to.sort();
    to
}

on_both_stores! {
    /// An e-mail to a directory group: its members are read once and fixed before the first
    /// attempt; the relay is down at first, the process is killed -9 and started again, and the
    /// message reaches exactly the members first read, once each. Members without a mailbox are
    /// named in the delivery's audit event.
    fn an_email_to_a_group_reaches_its_members_once_across_a_kill_and_restart() {
        let pg = Phasegate::offline()
            .with_env("PHASEGATE_SMTP_USER", SMTP_USER)
            .with_env("PHASEGATE_SMTP_PASSWORD", SMTP_PASSWORD);
        let (ca, cert, key) = relay_certificates(pg.dir.path());
        let port = free_port();
        write_plan(
            &pg,
            &format!(
                r#"[[announcement]]
    channel = "email"
    on = ["start"]
    groups = ["Pilot IT", "Pilot Field"]
    addresses = ["Helpdesk@contoso.com"]
    template = "{{plan}} starts for {{groups}}."
    smtp_host = "127.0.0.1"
    smtp_port = {port}
    from = "phasegate@contoso.com"
    ca_file = "{ca}"
    username_env = "PHASEGATE_SMTP_USER"
    password_env = "PHASEGATE_SMTP_PASSWORD"
    "#
            ),
        );
        let mut serve = pg
            .command(&["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(serve.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let id = pg.start();
        // The relay is down: the members are read and fixed, the message stays in the outbox.
        assert!(
            eventually(Duration::from_secs(60), || {
                history(&pg, &id)
                    .iter()
                    .any(|e| kind(e) == "recipients_resolved")
            }),
            "the group's members were never read: {:?}",
            history(&pg, &id)
        );
        serve.kill().unwrap();
        let _ = serve.wait();
        let members = resolved_members(&history(&pg, &id));
        assert!(members.len() > 100, "{members:?}");

        // The relay is back; a new process sends to the list fixed before, once.
        let relay = Relay::start_on(port, &cert, &key);
        let rerun = pg.run(&["run", &id]);
        assert!(
            matches!(code(&rerun), 0 | 3),
            "{}{}",
            stdout(&rerun),
            stderr(&rerun)
        );
        let mail = relay.mail();
        assert_eq!(mail.len(), 1, "{mail:?}");
        let mut expected: Vec<String> = members.iter().map(|m| m.to_lowercase()).collect();
        expected.push("helpdesk@contoso.com".into());
        expected.sort();
        assert_eq!(envelope(&mail[0]), expected);
        let trail = history(&pg, &id);
        assert_eq!(
            resolved_members(&trail),
            members,
            "read again after the restart"
        );
        let resolved = trail
            .iter()
            .find(|e| kind(e) == "recipients_resolved")
            .unwrap();
        let without: Vec<&str> = resolved["event"]["kind"]["recipients"]["without_mail"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(!without.is_empty(), "the simulated IT has unlicensed users");
        let disabled: Vec<&str> = resolved["event"]["kind"]["recipients"]["disabled"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(
            !disabled.is_empty(),
            "the simulated pilots have people who left"
        );
        // Neither a disabled account nor a user without a mailbox is in the envelope (the
        // simulated directory mails `user{n}` at `user{n}@contoso.com`).
        let sent = envelope(&mail[0]);
        for name in disabled.iter().chain(&without) {
            let address = format!("{name}@contoso.com");
            assert!(!sent.contains(&address), "{address} was mailed");
        }
        let delivered: Vec<&Value> = trail.iter().filter(|e| kind(e) == "delivered").collect();
        assert_eq!(delivered.len(), 1);
        let reason = delivered[0]["event"]["trigger"]["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("{} without a mail address", without.len()))
                && reason.contains(without[0]),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{} disabled, not told", disabled.len()))
                && reason.contains(disabled[0]),
            "{reason}"
        );
        // The delivery names the very list read before the kill, by its digest.
        let read = resolved["event"]["trigger"]["reason"].as_str().unwrap();
        let digest = read.rsplit("digest ").next().unwrap();
        assert_eq!(digest.len(), 16, "{read}");
        assert!(reason.contains(&format!("(digest {digest})")), "{reason}");
    }
}

on_both_stores! {
    /// A channel that is down holds nothing up, and its message goes out once it is back.
    fn a_channel_that_is_down_holds_nothing_up_and_gets_its_message_when_back() {
        let pg = Phasegate::offline();
        let port = free_port();
        write_plan(
            &pg,
            &format!(
                r#"[[announcement]]
    channel = "slack"
    on = ["start"]
    template = "{{plan}} has started."
    url = "http://127.0.0.1:{port}/slack/services/T/B/S"
    "#
            ),
        );
        let mut serve = pg
            .command(&["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(serve.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let id = pg.start();
        // Nothing listens for Slack: the rollout goes on regardless.
        assert!(
            eventually(Duration::from_secs(60), || {
                pg.status(&id)["phases"][0]["applied_at"].is_string()
            }),
            "the rollout waited for a channel that is down: {}",
            pg.status(&id)
        );
        let status = pg.status(&id);
        assert!(
            status["pending_effects"]
                .as_array()
                .is_some_and(|p| !p.is_empty()),
            "the undelivered message is still in the outbox: {status}"
        );
        // Slack is back: the message goes out, once.
        let hooks = Hooks::start(TcpListener::bind(("127.0.0.1", port)).unwrap(), None);
        assert!(
            eventually(Duration::from_secs(120), || !hooks
                .hits("/slack")
                .is_empty()),
            "the message never went out"
        );
        assert!(eventually(Duration::from_secs(30), || {
            history(&pg, &id).iter().any(|e| kind(e) == "delivered")
        }));
        let slack = hooks.hits("/slack");
        assert_eq!(slack.len(), 1, "{slack:?}");
        assert!(
            slack[0].body["text"]
                .as_str()
                .unwrap()
                .contains("android-guarded has started")
        );
        let _ = serve.kill();
        let _ = serve.wait();
    }
}

on_both_stores! {
    /// On Graph: the group is found in the tenant and its users read with their mail addresses
    /// (`transitiveMembers`, served by the emulator); the e-mail reaches exactly the members that
    /// reading fixed, each once.
    fn on_graph_an_email_to_a_group_reaches_the_members_the_tenant_lists() {
        let emulator =
            common::Emulator::spawn(&["--client-secret", common::SECRET, "--devices", "3000"]);
        let certs = tempfile::tempdir().unwrap();
        let (ca, cert, key) = relay_certificates(certs.path());
        let relay = Relay::start(&cert, &key);
        let table = format!(
            r#"[[announcement]]
    channel = "email"
    on = ["start"]
    groups = ["Pilot IT"]
    addresses = ["it-staff@contoso.com"]
    template = "{{plan}} starts for {{groups}}."
    smtp_host = "127.0.0.1"
    smtp_port = {port}
    from = "phasegate@contoso.com"
    ca_file = "{ca}"
    username_env = "PHASEGATE_SMTP_USER"
    password_env = "PHASEGATE_SMTP_PASSWORD"
    "#,
            port = relay.port
        );
        let pg = Phasegate::with_plan(&emulator, "windows-baseline-graph.toml", 20.0, |t| {
            t.replacen("[[phase]]", &format!("{table}\n[[phase]]"), 1)
        })
        .with_env("PHASEGATE_SMTP_USER", SMTP_USER)
        .with_env("PHASEGATE_SMTP_PASSWORD", SMTP_PASSWORD);
        let id = pg.start();
        let mut run = pg.spawn(&["run", &id]);
        let sent = eventually(Duration::from_secs(60), || !relay.mail().is_empty());
        let _ = run.kill();
        let _ = run.wait();
        assert!(sent, "no mail: {:?}", history(&pg, &id));
        let trail = history(&pg, &id);
        let members = resolved_members(&trail);
        assert!(members.len() > 10, "{members:?}");
        assert!(
            members
                .iter()
                .all(|m| m.ends_with("@contoso.onmicrosoft.com")),
            "{members:?}"
        );
        let mail = relay.mail();
        assert_eq!(mail.len(), 1, "{mail:?}");
        let mut expected: Vec<String> = members.iter().map(|m| m.to_lowercase()).collect();
        expected.push("it-staff@contoso.com".into());
        expected.sort();
        assert_eq!(envelope(&mail[0]), expected);
        // The tenant's disabled accounts (`accountEnabled: false`) are named, not mailed.
        let resolved = trail
            .iter()
            .find(|e| kind(e) == "recipients_resolved")
            .unwrap();
        let disabled: Vec<String> = resolved["event"]["kind"]["recipients"]["disabled"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_lowercase)
                    .collect()
            })
            .unwrap_or_default();
        assert!(!disabled.is_empty(), "{resolved}");
        assert!(
            disabled.iter().all(|d| !expected.contains(d)),
            "{disabled:?}"
        );
    }
}

on_both_stores! {
    /// An e-mail to groups with more members than its channel's `max_recipients` is not sent: it
    /// leaves the outbox with an event saying why, and the rollout goes on.
    fn an_email_to_more_members_than_its_channel_allows_is_dropped_and_holds_nothing_up() {
        let pg = Phasegate::offline();
        let port = free_port();
        write_plan(
            &pg,
            &format!(
                r#"[[announcement]]
    channel = "email"
    on = ["start"]
    groups = ["Pilot IT"]
    template = "{{plan}} starts for {{groups}}."
    smtp_host = "127.0.0.1"
    smtp_port = {port}
    tls = "none"
    from = "phasegate@contoso.com"
    max_recipients = 10
    "#
            ),
        );
        // The preflight sees it coming and refuses the start...
        let refused = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        assert_eq!(code(&refused), 5, "{}", stderr(&refused));
        assert!(
            stderr(&refused).contains("more than the 10 one message may have"),
            "{}",
            stderr(&refused)
        );
        // ...and a start past it drops the message at run time.
        let started = pg.run(&[
            "start",
            pg.plan.to_str().unwrap(),
            "--by",
            "alice",
            "--skip-preflight",
            "--reason",
            "the pilots are told in person",
        ]);
        assert_eq!(code(&started), 0, "{}", stderr(&started));
        let id = stdout(&started).trim().to_string();
        let run = pg.run(&["run", &id]);
        assert!(
            matches!(code(&run), 0 | 3),
            "{}{}",
            stdout(&run),
            stderr(&run)
        );
        let trail = history(&pg, &id);
        let dropped: Vec<&Value> = trail
            .iter()
            .filter(|e| kind(e) == "notification_dropped")
            .collect();
        assert_eq!(dropped.len(), 1, "{trail:?}");
        let reason = dropped[0]["event"]["kind"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("more than the 10 one message may have"),
            "{reason}"
        );
        assert!(!trail.iter().any(|e| kind(e) == "delivered"));
        let status = pg.status(&id);
        assert!(status["phases"][0]["applied_at"].is_string(), "{status}");
        assert!(
            status["pending_effects"]
                .as_array()
                .is_none_or(|p| p.is_empty()),
            "{status}"
        );
    }
}
