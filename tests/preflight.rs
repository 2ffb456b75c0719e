//! `phasegate preflight` and the preflight before `start`, driving the real binary: against a
//! real DNS server on loopback (hickory-server in this process, serving right, wrong and missing
//! enrolment records), certificate files made here (rcgen, PEM and PKCS#12), and the Graph
//! emulator's ready and unready tenants.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::str::FromStr;
use std::sync::Arc;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use serde_json::Value;

use common::{BIN, Emulator, SECRET, code, stderr, stdout};

const ENROLLMENT: &str = "EnterpriseEnrollment-s.manage.microsoft.com.";
const REGISTRATION: &str = "EnterpriseRegistration.windows.net.";

/// One zone: its origin and its CNAMEs as (name within the zone, target, TTL).
type Zone<'a> = (&'a str, &'a [(&'a str, &'a str, u32)]);
/// A CNAME, owned: (name within the zone, target, TTL).
type Cname = (String, String, u32);

/// An authoritative DNS server on a free loopback port (UDP and TCP), stopped when dropped.
struct DnsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    fn start(zones: &[Zone<'_>]) -> DnsServer {
        let zones: Vec<(String, Vec<Cname>)> = zones
            .iter()
            .map(|(origin, records)| {
                (
                    origin.to_string(),
                    records
                        .iter()
                        .map(|(n, t, ttl)| (n.to_string(), t.to_string(), *ttl))
                        .collect(),
                )
            })
            .collect();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut catalog = Catalog::new();
                for (origin, records) in &zones {
                    let (name, handler) = zone(origin, records);
                    catalog.upsert(name, vec![handler]);
                }
                let (udp, tcp) = udp_and_tcp_on_one_port().await;
                let addr = udp.local_addr().unwrap();
                let mut server = Server::new(catalog);
                server.register_socket(udp);
                server.register_listener(tcp, std::time::Duration::from_secs(5), 64);
                addr_tx.send(addr).unwrap();
                let _ = stopped.await;
                let _ = server.shutdown_gracefully().await;
            });
        });
        let addr = addr_rx.recv().unwrap();
        DnsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn resolver(&self) -> String {
        self.addr.to_string()
    }
}

/// A UDP socket and a TCP listener on the same free loopback port, as a DNS server answers on
/// both. The port the system picks for UDP may be taken for TCP (by another test's connection):
/// then another port is tried, a bounded number of times.
async fn udp_and_tcp_on_one_port() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    let mut last = None;
    for _ in 0..64 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        match tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last = Some(e),
        }
    }
    panic!("no loopback port free for both UDP and TCP: {last:?}");
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn zone(origin: &str, records: &[Cname]) -> (LowerName, Arc<dyn ZoneHandler>) {
    let origin = Name::from_str(&format!("{origin}.")).unwrap();
    let mut handler: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        Name::from_str("ns.example.").unwrap(),
        Name::from_str("hostmaster.example.").unwrap(),
        1,
        3600,
        600,
        86_400,
        300,
    );
    assert!(handler.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1));
    for (name, target, ttl) in records {
        let name = Name::from_str(name)
            .unwrap()
            .append_domain(&origin)
            .unwrap();
        let target = Name::from_str(target).unwrap();
        assert!(handler.upsert_mut(
            Record::from_rdata(name, *ttl, RData::CNAME(CNAME(target))),
            1
        ));
    }
    (LowerName::from(origin), Arc::new(handler))
}

/// A simulator plan, with `extra` appended (a `[preflight]` table).
fn simulator_plan(dir: &Path, platform: &str, soak: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[rollout]\nname = \"readiness\"\n\n[policy]\ncompliance = \"Baseline\"\nplatform = \"{platform}\"\n\n\
         [emergency_access]\ngroups = [\"Break Glass\"]\n\n\
         [provider]\nkind = \"simulator\"\ndevices = 200\nseed = 3\n\n\
         [[phase]]\nid = \"pilot\"\nmode = \"report\"\ninclude = [\"Pilot IT\"]\nmin_soak = \"{soak}\"\n\n\
         [[phase]]\nid = \"notify\"\nmode = \"notify\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\ngrace = \"3d\"\nmin_soak = \"{soak}\"\n\n\
         [[phase]]\nid = \"enforce\"\nmode = \"enforce\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\nmin_soak = \"{soak}\"\n\n\
         {extra}\n"
    );
    let path = dir.join("plan.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn phasegate(store: &Path, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env("PHASEGATE_STORE", store.join("store"))
        .env("PHASEGATE_GRAPH_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(out), stderr(out)))
}

fn findings<'a>(report: &'a Value, check: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == check)
        .collect()
}

const DOMAINS: &str = "[preflight]\ndomains = [\"contoso.com\"]";

fn right() -> DnsServer {
    DnsServer::start(&[(
        "contoso.com",
        &[
            ("EnterpriseEnrollment", ENROLLMENT, 3600),
            ("EnterpriseRegistration", REGISTRATION, 3600),
        ],
    )])
}

#[test]
fn right_records_pass_and_one_wrong_cname_fails_naming_record_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let plan = simulator_plan(dir.path(), "windows", "1d", DOMAINS);
    let plan = plan.to_str().unwrap();

    let dns = right();
    let out = phasegate(
        dir.path(),
        &["preflight", plan, "--resolver", &dns.resolver()],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("ok       enrolment-dns          EnterpriseEnrollment.contoso.com: CNAME EnterpriseEnrollment-s.manage.microsoft.com"),
        "{text}"
    );
    assert!(
        text.contains(
            "EnterpriseRegistration.contoso.com: CNAME EnterpriseRegistration.windows.net"
        )
    );
    assert!(text.contains("0 errors"), "{text}");
    drop(dns);

    let wrong = DnsServer::start(&[(
        "contoso.com",
        &[
            ("EnterpriseEnrollment", "enroll.contoso-mdm.example.", 3600),
            ("EnterpriseRegistration", REGISTRATION, 3600),
        ],
    )]);
    let out = phasegate(
        dir.path(),
        &["preflight", plan, "--resolver", &wrong.resolver()],
    );
    assert_eq!(code(&out), 5, "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("EnterpriseEnrollment.contoso.com"), "{line}");
    assert!(
        line.contains("points to enroll.contoso-mdm.example"),
        "{line}"
    );
    assert!(
        line.contains("expected EnterpriseEnrollment-s.manage.microsoft.com or EnterpriseEnrollment.manage.microsoft.com"),
        "{line}"
    );
    assert!(
        text.contains("fix: in the domain's DNS zone, set EnterpriseEnrollment.contoso.com CNAME")
    );
    assert!(text.contains("1 error"), "{text}");

    // The same through JSON, and the resolver named in the plan instead of on the command line.
    let in_plan = format!("{DOMAINS}\nresolver = \"{}\"", wrong.resolver());
    let plan = simulator_plan(dir.path(), "windows", "1d", &in_plan);
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 5);
    let report = json(&out);
    let dns = findings(&report, "enrolment-dns");
    assert_eq!(dns[0]["level"], "error");
    assert_eq!(dns[1]["level"], "ok");
    // The simulator has no tenant: the tenant's checks say so.
    assert_eq!(
        findings(&report, "compliance-policy")[0]["level"],
        "skipped"
    );
    assert_eq!(
        findings(&report, "compliance-policy")[0]["message"],
        "skipped (simulated provider)"
    );
}

#[test]
fn missing_records_are_errors_and_a_ttl_other_than_3600_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let plan = simulator_plan(
        dir.path(),
        "windows",
        "1d",
        "[preflight]\ndomains = [\"contoso.com\", \"fabrikam.com\"]",
    );
    let dns = DnsServer::start(&[
        (
            "contoso.com",
            &[
                (
                    "EnterpriseEnrollment",
                    "EnterpriseEnrollment.manage.microsoft.com.",
                    300,
                ),
                ("EnterpriseRegistration", REGISTRATION, 3600),
            ],
        ),
        // fabrikam.com's zone has neither record.
        ("fabrikam.com", &[]),
    ]);
    let out = phasegate(
        dir.path(),
        &[
            "--output",
            "json",
            "preflight",
            plan.to_str().unwrap(),
            "--resolver",
            &dns.resolver(),
        ],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let report = json(&out);
    let found = findings(&report, "enrolment-dns");
    let levels: Vec<&str> = found.iter().map(|f| f["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["warning", "ok", "error", "error"]);
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("TTL 300, expected 3600")
    );
    let missing = found[2]["message"].as_str().unwrap();
    assert!(
        missing.starts_with("EnterpriseEnrollment.fabrikam.com: no CNAME found"),
        "{missing}"
    );
}

#[test]
fn start_runs_the_preflight_and_skipping_it_is_recorded_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = DnsServer::start(&[(
        "contoso.com",
        &[("EnterpriseRegistration", "registration.example.", 3600)],
    )]);
    let plan = simulator_plan(dir.path(), "windows", "1d", DOMAINS);
    let plan = plan.to_str().unwrap();
    let resolver = wrong.resolver();

    let out = phasegate(dir.path(), &["start", plan, "--resolver", &resolver]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "preflight error: enrolment-dns: EnterpriseEnrollment.contoso.com: no CNAME found"
        ),
        "{err}"
    );
    assert!(err.contains("nothing was started"), "{err}");
    assert!(err.contains("--skip-preflight --reason"), "{err}");
    assert!(stdout(&out).is_empty());
    let status = phasegate(dir.path(), &["--output", "json", "status"]);
    assert_eq!(json(&status).as_array().map(Vec::len), Some(0));

    // Skipping needs a reason; with one, the start goes ahead and the trail says why.
    let out = phasegate(dir.path(), &["start", plan, "--skip-preflight"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = phasegate(
        dir.path(),
        &[
            "start",
            plan,
            "--by",
            "alice",
            "--skip-preflight",
            "--reason",
            "DNS change CHG-42 is scheduled before the first phase",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let history = json(&phasegate(
        dir.path(),
        &["--output", "json", "history", &id],
    ));
    let trigger = &history[0]["event"]["trigger"];
    assert_eq!(trigger["actor"], "alice");
    assert_eq!(
        trigger["reason"],
        "rollout started; preflight skipped: DNS change CHG-42 is scheduled before the first phase"
    );

    // With the records right, start runs the preflight and goes ahead (in a store of its own:
    // one rollout at a time drives the policy).
    drop(wrong);
    let dns = right();
    let other = tempfile::tempdir().unwrap();
    let out = phasegate(
        other.path(),
        &[
            "start",
            plan,
            "--id",
            "second",
            "--resolver",
            &dns.resolver(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let history = json(&phasegate(
        other.path(),
        &["--output", "json", "history", "second"],
    ));
    assert_eq!(history[0]["event"]["trigger"]["reason"], "rollout started");
}

/// A self-signed certificate valid from yesterday for `days` more days, as (PEM, DER, key DER).
fn certificate(days: i64) -> (String, Vec<u8>, Vec<u8>) {
    let mut params = rcgen::CertificateParams::new(vec!["APSP:apns.example".to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), cert.der().to_vec(), key.serialize_der())
}

#[test]
fn an_apns_certificate_expiring_in_ten_days_fails_a_three_week_ios_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, _, _) = certificate(10);
    std::fs::write(dir.path().join("apns.pem"), pem).unwrap();
    // Three phases of seven days: a rollout of three weeks.
    // No margin: only the rollout's length counts.
    let settings = "[preflight]\napns_certificate = \"apns.pem\"\ncertificate_margin = \"0s\"";
    let plan = simulator_plan(dir.path(), "ios", "7d", settings);
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let report = json(&out);
    let apns = findings(&report, "apns-certificate");
    assert_eq!(apns.len(), 1);
    assert_eq!(apns[0]["level"], "error");
    let message = apns[0]["message"].as_str().unwrap();
    assert!(
        message.contains("before the rollout's planned end (21d from now)"),
        "{message}"
    );
    assert!(
        apns[0]["fix"]
            .as_str()
            .unwrap()
            .contains("renew the Apple MDM push certificate")
    );

    // A rollout of three days ends before it: a warning (it expires within 30 days), exit 0.
    let plan = simulator_plan(dir.path(), "ios", "1d", settings);
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        findings(&json(&out), "apns-certificate")[0]["level"],
        "warning"
    );

    // The same plan for Windows has no use for the certificate.
    let plan = simulator_plan(
        dir.path(),
        "windows",
        "7d",
        "[preflight]\napns_certificate = \"apns.pem\"",
    );
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(findings(&json(&out), "apns-certificate").is_empty());
}

#[test]
fn a_pkcs12_certificate_is_read_with_its_password_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (_, der, key) = certificate(400);
    let chain = p12_keystore::PrivateKeyChain::new(
        vec![1u8; 20],
        p12_keystore::PrivateKey::from_der(&key).unwrap(),
        [p12_keystore::Certificate::from_der(&der).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("apns", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let p12 = store.writer("correct horse").write().unwrap();
    std::fs::write(dir.path().join("apns.p12"), p12).unwrap();
    let plan = simulator_plan(
        dir.path(),
        "ios",
        "7d",
        "[preflight]\napns_certificate = \"apns.p12\"\napns_certificate_password_env = \"PHASEGATE_APNS_PASSWORD\"",
    );
    let run = |password: Option<&str>| {
        let mut command = std::process::Command::new(BIN);
        command
            .args(["--output", "json", "preflight", plan.to_str().unwrap()])
            .env_remove("PHASEGATE_APNS_PASSWORD");
        if let Some(p) = password {
            command.env("PHASEGATE_APNS_PASSWORD", p);
        }
        command.output().unwrap()
    };
    let out = run(Some("correct horse"));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let report = json(&out);
    let apns = findings(&report, "apns-certificate");
    assert_eq!(apns[0]["level"], "ok", "{apns:?}");
    assert!(apns[0]["message"].as_str().unwrap().contains("apns.p12"));

    let out = run(Some("wrong"));
    assert_eq!(code(&out), 5);
    let report = json(&out);
    let message = findings(&report, "apns-certificate")[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("cannot open the PKCS#12 file"),
        "{message}"
    );
    let out = run(None);
    let report = json(&out);
    let message = findings(&report, "apns-certificate")[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("PHASEGATE_APNS_PASSWORD"), "{message}");
}

/// An example Graph plan pointed at `emulator`, with `extra` appended.
fn graph_plan(dir: &Path, emulator: &Emulator, name: &str, extra: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("{}/plans/{name}", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
        .replace("http://127.0.0.1:8080", &emulator.url)
        .replace(
            "login_url = ",
            "ca_requests_per_second = 1000000\nrequest_timeout = \"5s\"\nlogin_url = ",
        );
    let path = dir.join("plan.toml");
    std::fs::write(&path, format!("{text}\n{extra}\n")).unwrap();
    path
}

#[test]
fn a_ready_tenant_passes_and_its_verified_domains_are_checked() {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "300",
        "--verified-domain",
        "contoso.com",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let plan = graph_plan(dir.path(), &emulator, "multi-platform-graph.toml", "");
    let dns = right();
    let out = phasegate(
        dir.path(),
        &[
            "--output",
            "json",
            "preflight",
            plan.to_str().unwrap(),
            "--resolver",
            &dns.resolver(),
        ],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let report = json(&out);
    let levels: BTreeMap<String, Vec<String>> =
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .fold(BTreeMap::new(), |mut all, f| {
                all.entry(f["check"].as_str().unwrap().to_string())
                    .or_insert_with(Vec::new)
                    .push(f["level"].as_str().unwrap().to_string());
                all
            });
    assert_eq!(levels["enrolment-dns"], ["ok", "ok"], "{report}");
    assert_eq!(levels["apns-certificate"], ["ok"]);
    assert_eq!(levels["compliance-policy"], ["ok", "ok", "ok"]);
    assert_eq!(levels["notification-template"], ["ok"]);
    assert_eq!(levels["groups"], ["ok"]);
    assert_eq!(levels["tenant-settings"], ["ok"]);
    assert_eq!(levels["conditional-access"], ["ok"]);
    assert_eq!(levels["permissions"], ["ok"]);
    // The default tenant has no MFA policy: a warning naming the groups.
    let mfa = findings(&report, "mfa");
    assert_eq!(mfa[0]["level"], "warning");
    assert!(
        mfa[0]["message"]
            .as_str()
            .unwrap()
            .contains("All Users, Pilot IT")
    );
}

/// A directory approver group (`[directory_approvers]`) must exist in the tenant: one the tenant
/// lacks is an error naming it and how to fix it, and `start` refuses the plan; one it has is ok.
#[test]
fn a_directory_approver_group_the_tenant_lacks_is_an_error_and_refuses_the_start() {
    let emulator = Emulator::spawn(&["--client-secret", SECRET, "--devices", "300"]);
    let dir = tempfile::tempdir().unwrap();
    let plan_with = |directory: &str| {
        let path = graph_plan(dir.path(), &emulator, "windows-baseline-graph.toml", "");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replacen(
                "[[phase]]",
                &format!("[directory_approvers]\nboard = \"{directory}\"\n\n[[phase]]"),
                1,
            )
            .replacen(
                "approvals = 1",
                "approvals = 1\napprover_groups = [\"board\"]",
                1,
            );
        std::fs::write(&path, text).unwrap();
        path
    };
    let preflight = |plan: &Path| {
        let out = phasegate(
            dir.path(),
            &["--output", "json", "preflight", plan.to_str().unwrap()],
        );
        (code(&out), json(&out))
    };

    let plan = plan_with("Change Advisory Board");
    let (exit, report) = preflight(&plan);
    assert_eq!(exit, 5, "{report}");
    let found = findings(&report, "approver-groups");
    assert_eq!(found.len(), 1, "{report}");
    assert_eq!(found[0]["level"], "error");
    let message = found[0]["message"].as_str().unwrap();
    assert!(
        message.contains("`Change Advisory Board` (approver group `board`) not found"),
        "{message}"
    );
    assert!(
        found[0]["fix"]
            .as_str()
            .unwrap()
            .contains("create the group `Change Advisory Board` in Entra ID"),
        "{}",
        found[0]
    );
    // `start` runs the preflight and refuses, writing nothing to the tenant.
    let out = phasegate(dir.path(), &["start", plan.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`Change Advisory Board` (approver group `board`) not found"),
        "{}",
        stderr(&out)
    );
    let ledger = emulator.get("/_emulator/ledger");
    assert_eq!(ledger["value"].as_array().unwrap().len(), 0);

    // The same group named by display name in another case, as Graph compares it, is found.
    let plan = plan_with("it");
    let (exit, report) = preflight(&plan);
    let found = findings(&report, "approver-groups");
    assert_eq!(found.len(), 1, "{report}");
    assert_eq!(found[0]["level"], "ok", "{report}");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("board (`it`)")
    );
    assert_eq!(exit, 0, "{report}");
}

#[test]
fn a_wipe_in_the_schedule_is_refused_unless_the_plan_allows_it() {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "300",
        "--readiness",
        "unready",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let plan = graph_plan(dir.path(), &emulator, "windows-baseline-graph.toml", "");
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let report = json(&out);
    let policy = findings(&report, "compliance-policy");
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0]["level"], "error");
    assert!(
        policy[0]["message"]
            .as_str()
            .unwrap()
            .contains("`Windows 10/11 compliance baseline` schedules a `wipe` action")
    );
    // The unready tenant's other mistakes are found too.
    assert_eq!(
        findings(&report, "notification-template")[0]["level"],
        "error"
    );
    let permissions = findings(&report, "permissions");
    assert!(
        permissions[0]["message"]
            .as_str()
            .unwrap()
            .contains("Policy.ReadWrite.ConditionalAccess")
    );
    // `start` refuses the plan, and writes nothing.
    let out = phasegate(dir.path(), &["start", plan.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("schedules a `wipe` action"));
    let ledger = emulator.get("/_emulator/ledger");
    assert_eq!(ledger["value"].as_array().unwrap().len(), 0);

    // A plan that accepts wipes has no such error.
    let plan = graph_plan(
        dir.path(),
        &emulator,
        "windows-baseline-graph.toml",
        "[preflight]\nallow_device_actions = [\"wipe\"]",
    );
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    let report = json(&out);
    let policy = findings(&report, "compliance-policy");
    assert_eq!(policy[0]["level"], "ok", "{policy:?}");
    assert!(
        policy[0]["message"]
            .as_str()
            .unwrap()
            .contains("wipe after 720h")
    );
}

#[test]
fn the_tenants_apns_certificate_is_judged_against_the_rollout() {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "300",
        "--apns-expiry",
        "10d",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let plan = graph_plan(dir.path(), &emulator, "multi-platform-graph.toml", "");
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let report = json(&out);
    let apns = findings(&report, "apns-certificate");
    assert_eq!(apns[0]["level"], "error");
    assert!(
        apns[0]["message"]
            .as_str()
            .unwrap()
            .contains("Apple ID mdm-admin@contoso.com")
    );
}

#[test]
fn plan_check_reports_a_bad_preflight_table_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let plan = simulator_plan(
        dir.path(),
        "windows",
        "1d",
        "[preflight]\ndomains = [\"contoso com\"]\nallow_device_actions = [\"block\"]",
    );
    let out = phasegate(dir.path(), &["plan", "check", plan.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("plan.toml:"), "{err}");
    assert!(err.contains("`contoso com` is not a domain name"), "{err}");
    assert!(
        err.contains("`block` is not a destructive device action"),
        "{err}"
    );
    // The preflight itself refuses the plan the same way, before asking anything.
    let out = phasegate(dir.path(), &["preflight", plan.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn another_enabled_compliance_policy_reaching_the_rollout_is_listed() {
    let emulator = Emulator::spawn(&[
        "--client-secret",
        SECRET,
        "--devices",
        "300",
        "--scenario",
        "lived-in",
    ]);
    let dir = tempfile::tempdir().unwrap();
    // A plan that does not manage the tenant's enabled "Require compliant device" policy.
    let plan = graph_plan(dir.path(), &emulator, "windows-baseline-graph.toml", "");
    let text = std::fs::read_to_string(&plan).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("conditional_access"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&plan, text).unwrap();
    let out = phasegate(
        dir.path(),
        &["--output", "json", "preflight", plan.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let report = json(&out);
    let overlap = findings(&report, "conditional-access");
    assert_eq!(overlap.len(), 1);
    assert_eq!(overlap[0]["level"], "warning");
    let message = overlap[0]["message"].as_str().unwrap();
    assert!(
        message.contains("`Require compliant device for Office 365` already requires a compliant device for All Users, Pilot IT"),
        "{message}"
    );
    // Its grant is compliance AND the MFA strength: every targeted group has MFA.
    assert_eq!(findings(&report, "mfa")[0]["level"], "ok");
}

/// Through a daemon, `start` is refused by the same preflight (exit 5), and a skip's reason is
/// recorded by the daemon.
#[test]
fn through_the_daemon_start_runs_the_preflight_and_records_a_skip() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = DnsServer::start(&[(
        "contoso.com",
        &[("EnterpriseRegistration", "registration.example.", 3600)],
    )]);
    let plan = simulator_plan(dir.path(), "windows", "1d", DOMAINS);
    let plan = plan.to_str().unwrap();
    let resolver = wrong.resolver();
    let serve = common::Serve::start(dir.path().join("store"));
    let out = phasegate(
        dir.path(),
        &["start", plan, "--by", "alice", "--resolver", &resolver],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("EnterpriseEnrollment.contoso.com: no CNAME found"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("nothing was started"),
        "{}",
        stderr(&out)
    );
    let out = phasegate(
        dir.path(),
        &[
            "start",
            plan,
            "--by",
            "alice",
            "--resolver",
            &resolver,
            "--skip-preflight",
            "--reason",
            "records change in CHG-7",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let history = json(&phasegate(
        dir.path(),
        &["--output", "json", "history", &id],
    ));
    assert_eq!(
        history[0]["event"]["trigger"]["reason"],
        "rollout started; preflight skipped: records change in CHG-7"
    );
    assert_eq!(serve.terminate(), Some(0));
}

/// The `[[announcement]]` table of an e-mail to `groups`.
fn mail_to(groups: &str) -> String {
    format!(
        "[[announcement]]\nchannel = \"email\"\non = [\"start\"]\ngroups = [{groups}]\n\
         template = \"{{plan}} starts\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 2525\n\
         from = \"phasegate@contoso.com\"\n"
    )
}

/// An e-mail announcement to a group the tenant lacks, or to one whose members have no mail
/// address (the break-glass accounts), is an error naming the group, and `start` refuses the
/// plan; the app must be allowed to read users (their addresses); a group whose members have
/// mail is ok, with who is left out.
#[test]
fn a_mailed_group_the_tenant_lacks_or_that_reaches_nobody_is_an_error() {
    let emulator = Emulator::spawn(&["--client-secret", SECRET, "--devices", "300"]);
    let dir = tempfile::tempdir().unwrap();
    let plan_mailing = |groups: &str| {
        let path = graph_plan(dir.path(), &emulator, "windows-baseline-graph.toml", "");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replacen("[[phase]]", &format!("{}\n[[phase]]", mail_to(groups)), 1)
            .replace(
                "exclude = [\"Break Glass\"]",
                "exclude = [\"Break Glass\", \"Contractors\"]",
            );
        std::fs::write(&path, text).unwrap();
        path
    };
    let preflight = |plan: &Path| {
        let out = phasegate(
            dir.path(),
            &["--output", "json", "preflight", plan.to_str().unwrap()],
        );
        (code(&out), json(&out))
    };

    let plan = plan_mailing("\"Break Glass\", \"Contractors\"");
    let (exit, report) = preflight(&plan);
    assert_eq!(exit, 5, "{report}");
    let found = findings(&report, "announcement-groups");
    let messages: Vec<&str> = found
        .iter()
        .map(|f| f["message"].as_str().unwrap())
        .collect();
    assert!(found.iter().all(|f| f["level"] == "error"), "{report}");
    assert!(
        messages.iter().any(|m| m.contains(
            "nobody in group `Break Glass` can be mailed: 2 members, 2 without a mail address"
        )),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m
                .contains("group `Contractors`, which an e-mail announcement mails, not found")),
        "{messages:?}"
    );
    let out = phasegate(dir.path(), &["start", plan.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nobody in group `Break Glass` can be mailed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        emulator.get("/_emulator/ledger")["value"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let plan = plan_mailing("\"Pilot IT\"");
    let (exit, report) = preflight(&plan);
    let found = findings(&report, "announcement-groups");
    assert_eq!(found.len(), 1, "{report}");
    assert_eq!(found[0]["level"], "ok", "{report}");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("announcement groups reach by mail: `Pilot IT` ("),
        "{}",
        found[0]
    );
    assert_eq!(exit, 0, "{report}");
    assert_eq!(
        findings(&report, "permissions")[0]["level"],
        "ok",
        "{report}"
    );
}

/// On the simulated provider the simulated directory answers the same question.
#[test]
fn on_the_simulator_a_mailed_group_that_reaches_nobody_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |groups: &str| {
        let plan = simulator_plan(
            dir.path(),
            "windows",
            "1h",
            &format!("{DOMAINS}\n\n{}", mail_to(groups)),
        );
        let dns = right();
        let out = phasegate(
            dir.path(),
            &[
                "--output",
                "json",
                "preflight",
                plan.to_str().unwrap(),
                "--resolver",
                &dns.resolver(),
            ],
        );
        (code(&out), json(&out))
    };
    let (exit, report) = run("\"Break Glass\"");
    assert_eq!(exit, 5, "{report}");
    let found = findings(&report, "announcement-groups");
    assert_eq!(found[0]["level"], "error", "{report}");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("nobody in group `Break Glass` can be mailed"),
        "{report}"
    );
    let (exit, report) = run("\"Pilot IT\"");
    assert_eq!(
        findings(&report, "announcement-groups")[0]["level"],
        "ok",
        "{report}"
    );
    assert_eq!(exit, 0, "{report}");
}
