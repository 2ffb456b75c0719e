//! `cargo bench --bench graph`: the Graph provider's observation against the emulator on
//! loopback, each beside a baseline in the same run:
//! - 100,000 devices through `deviceStatuses` (`observe_through = "device_statuses"`): the whole
//!   `observe` (names, the policy read, group members, every page, attribution to phases)
//!   beside fetching the same pages with bare GETs over the same HTTP and parsing each only as
//!   far as any reader must (rows skipped unread, the next link kept);
//! - 1,000,000 devices through a reports export (`observe_through = "export"`): the provider's
//!   client side (download, streamed unzip and CSV, each device once, attribution to a phase)
//!   beside downloading the same zip and reading its CSV with a bare loop; the whole `observe`
//!   (job, polls, the emulator building the zip) is shown too, with the peak resident memory.
//!
//! Each measurement alternates with its baseline, five times, so both see the same load; the
//! ratio printed is the median of the five runs' ratios, with their range.
//!
//! `cargo bench --bench graph -- device_statuses` or `-- export` runs one of the two.

use std::time::{Duration, Instant};

use phasegate::adapters;
use phasegate::domain::desired::desired_with;
use phasegate::emulator;
use phasegate::provider::graph::GraphProvider;
use phasegate::provider::graph::settings;
use phasegate::provider::{PhaseScope, Provider};

const SECRET: &str = "bench-secret";
/// The emulated fleet; about half of it is Windows, so the Windows policy covers ~100,000.
const FLEET: u32 = 200_000;
/// The fleet of the export benchmark: its Windows policy covers about 1,000,000 devices.
const EXPORT_FLEET: u32 = 2_000_000;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Serves an emulated tenant of `devices` on loopback; its URL.
async fn tenant(devices: u32) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = emulator::Settings {
        devices,
        seed: 7,
        faults: 0.0,
        fault_seed: 7,
        time_scale: None,
        tenant_domain: "contoso.onmicrosoft.com".into(),
        client_id: "00001111-aaaa-2222-bbbb-3333cccc4444".into(),
        client_secret: SECRET.into(),
        credentials: Default::default(),
        token_lifetime: Duration::from_secs(30 * 86_400),
        token_uses: None,
        ca_requests_per_second: 1e6,
        remediation_half_life: Duration::from_secs(2 * 86_400),
    };
    tokio::spawn(emulator::serve(listener, settings, std::future::pending()));
    url
}

/// The Graph example plan on `url`, observing through `through`.
fn plan_text(url: &str, through: &str) -> String {
    include_str!("../../plans/windows-baseline-graph.toml")
        .replace("http://127.0.0.1:8080", url)
        .replace(
            "login_url = ",
            &format!(
                "ca_requests_per_second = 1000000.0\nobserve_through = \"{through}\"\nlogin_url = "
            ),
        )
}

async fn bench_device_statuses() {
    let url = tenant(FLEET).await;
    let text = plan_text(&url, "device_statuses");
    let plan = adapters::parse_plan("bench.toml", &text).unwrap();
    let graph = settings::of(&plan.provider).unwrap();
    let mut provider = GraphProvider::with_secret(graph.clone(), SECRET.into(), "bench")
        .await
        .unwrap();
    let baseline = provider.capture_baseline(&plan.policy).await.unwrap();
    let record = match provider
        .reconcile(
            &plan.policy,
            &desired_with(&plan, "bench-1", &[0, 1].into()),
            None,
            &baseline,
        )
        .await
        .unwrap()
    {
        phasegate::provider::Outcome::Done { record, .. } => record,
        other => panic!("the reconcile did not finish: {other:?}"),
    };
    provider
        .advance_to(provider.now().plus(Duration::from_secs(2 * 86_400)))
        .await
        .unwrap();
    let scopes: Vec<PhaseScope> = plan.phases[..2]
        .iter()
        .map(|p| PhaseScope {
            phase: p.id.clone(),
            mode: p.mode,
            include: p.include.clone(),
            exclude: p.exclude.clone(),
            exclude_users: Vec::new(),
        })
        .collect();

    let token = token(&url, &graph.client_id).await;
    let policy = policy_id(&url).await;
    let client = reqwest::Client::new();
    // The bare loop: the same pages over the same HTTP, each read as text and parsed only as
    // far as any reader must (every row skipped unread, the next link kept).
    #[derive(serde::Deserialize)]
    struct BarePage {
        value: Vec<serde::de::IgnoredAny>,
        #[serde(rename = "@odata.nextLink")]
        next: Option<String>,
    }
    let bare = || async {
        let mut next = Some(format!(
            "{url}/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/deviceStatuses"
        ));
        let mut fetched = 0;
        while let Some(page_url) = next {
            let text = client
                .get(&page_url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let page: BarePage = serde_json::from_str(&text).unwrap();
            fetched += page.value.len();
            next = page.next;
        }
        fetched
    };
    // One observation and one bare paging after the other, five times: both see the same load.
    let (mut observed, mut fetched) = (0, 0);
    let (mut observes, mut bares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu_ratios = Vec::new();
    for _ in 0..RUNS {
        let (start, cpu) = (Instant::now(), cpu_time());
        let observation = provider
            .observe(&plan.policy, &scopes, &record)
            .await
            .unwrap();
        let (observe, observe_cpu) = (start.elapsed(), cpu_time() - cpu);
        observed = observation.scopes[1].iter().map(|(_, r)| r.len()).sum();
        let (start, cpu) = (Instant::now(), cpu_time());
        fetched = bare().await;
        let (raw, raw_cpu) = (start.elapsed(), cpu_time() - cpu);
        ratios.push(observe.as_secs_f64() / raw.as_secs_f64());
        cpu_ratios.push(observe_cpu.as_secs_f64() / raw_cpu.as_secs_f64());
        observes.push(observe);
        bares.push(raw);
    }
    println!(
        "observe {observed} devices through the Graph provider   {:>10?}   bare paging of {fetched} statuses   {:>10?}   ratio {}; CPU time (emulator included) {}",
        median(observes),
        median(bares),
        spread(ratios),
        spread(cpu_ratios)
    );
}

/// The CPU time the whole process (emulator included) has used: beside the wall time, a
/// figure other work on the machine hardly moves.
fn cpu_time() -> Duration {
    let mut at = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes the `timespec` it is given, nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut at) };
    Duration::new(at.tv_sec as u64, at.tv_nsec as u32)
}

/// Runs of each measurement, alternating with its baseline's.
const RUNS: usize = 5;

/// The median of per-run ratios, and their range.
fn spread(mut ratios: Vec<f64>) -> String {
    ratios.sort_by(f64::total_cmp);
    format!(
        "{:.2}x (runs {:.2}-{:.2}x)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    )
}

/// The process's peak resident set (`VmHWM`) and current one (`VmRSS`), in MiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak resident set to the current one (Linux: `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn bench_export() {
    use phasegate::provider::graph::devices::attribute;
    use phasegate::provider::graph::export;
    let url = tenant(EXPORT_FLEET).await;
    let text = plan_text(&url, "export");
    let plan = adapters::parse_plan("bench.toml", &text).unwrap();
    let graph = settings::of(&plan.provider).unwrap();
    let mut provider = GraphProvider::with_secret(graph.clone(), SECRET.into(), "bench")
        .await
        .unwrap();
    let baseline = provider.capture_baseline(&plan.policy).await.unwrap();
    let record = match provider
        .reconcile(
            &plan.policy,
            &desired_with(&plan, "bench-1", &[0, 1].into()),
            None,
            &baseline,
        )
        .await
        .unwrap()
    {
        phasegate::provider::Outcome::Done { record, .. } => record,
        other => panic!("the reconcile did not finish: {other:?}"),
    };
    provider
        .advance_to(provider.now().plus(Duration::from_secs(2 * 86_400)))
        .await
        .unwrap();
    let scopes: Vec<PhaseScope> = plan.phases[1..2]
        .iter()
        .map(|p| PhaseScope {
            phase: p.id.clone(),
            mode: p.mode,
            include: p.include.clone(),
            exclude: p.exclude.clone(),
            exclude_users: Vec::new(),
        })
        .collect();
    // The whole observation: job, polls, the emulator building the zip, download, counting.
    let mut samples = Vec::new();
    let mut observed = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let observation = provider
            .observe(&plan.policy, &scopes, &record)
            .await
            .unwrap();
        samples.push(start.elapsed());
        observed = observation.scopes[0]
            .iter()
            .map(|(_, r)| r.len())
            .sum::<usize>();
    }
    let whole = median(samples);

    // The zip the last observation read, by its job's URL.
    let token = token(&url, &graph.client_id).await;
    let http = reqwest::Client::new();
    let policy = policy_id(&url).await;
    let job: serde_json::Value = http
        .post(format!("{url}/v1.0/deviceManagement/reports/exportJobs"))
        .bearer_auth(&token)
        .json(&export::job_request(&policy))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let blob = loop {
        let _ = http
            .post(format!("{url}/_emulator/clock"))
            .json(&serde_json::json!({"advanceBySeconds": 60}))
            .send()
            .await
            .unwrap();
        let job: serde_json::Value = http
            .get(format!(
                "{url}/v1.0/deviceManagement/reports/exportJobs('{id}')"
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(blob) = job["url"].as_str() {
            break blob.to_string();
        }
    };
    let download = |http: reqwest::Client, blob: String| async move {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        let mut response = http.get(&blob).send().await.unwrap();
        while let Some(chunk) = response.chunk().await.unwrap() {
            file.write_all(&chunk).unwrap();
        }
        std::io::Seek::rewind(&mut file).unwrap();
        file
    };
    let client_side = || async {
        let file = download(http.clone(), blob.clone()).await;
        let devices = export::read_zip(file, &policy, false).unwrap();
        let phase = attribute(
            &devices,
            phasegate::domain::time::Timestamp::from_millis(i64::MAX / 2),
            None,
            |user| user != 0,
            |_| None,
            |_, state, at, _| (state, at),
        );
        (phase.reports.len(), phase.userless)
    };
    let bare = || async {
        let file = download(http.clone(), blob.clone()).await;
        let mut archive = zip::ZipArchive::new(file).unwrap();
        let entry = archive.by_index(0).unwrap();
        let mut reader = csv::Reader::from_reader(entry);
        let mut record = csv::ByteRecord::new();
        let mut rows = 0u64;
        while reader.read_byte_record(&mut record).unwrap() {
            rows += u64::from(!record.is_empty());
        }
        rows
    };
    let (_, before) = memory();
    reset_peak();
    // The client side and the bare loop one after the other, five times: both see the same
    // load.
    let (mut counted, mut userless, mut rows) = (0, 0, 0);
    let (mut clients, mut bares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu_ratios = Vec::new();
    for _ in 0..RUNS {
        let (start, cpu) = (Instant::now(), cpu_time());
        (counted, userless) = client_side().await;
        let (client, client_cpu) = (start.elapsed(), cpu_time() - cpu);
        let (start, cpu) = (Instant::now(), cpu_time());
        rows = bare().await;
        let (raw, raw_cpu) = (start.elapsed(), cpu_time() - cpu);
        ratios.push(client.as_secs_f64() / raw.as_secs_f64());
        cpu_ratios.push(client_cpu.as_secs_f64() / raw_cpu.as_secs_f64());
        clients.push(client);
        bares.push(raw);
    }
    let (peak, _) = memory();
    let (client_side, bare) = (median(clients), median(bares));
    println!(
        "observe {observed} devices through an export (whole observe, the emulator building the zip included)   {whole:>10?}"
    );
    println!(
        "client side: download, unzip, CSV, {counted} devices once + {userless} userless   {client_side:>10?}   bare download + unzip + CSV loop of {rows} rows   {bare:>10?}   ratio {}; CPU time {}",
        spread(ratios),
        spread(cpu_ratios)
    );
    println!(
        "peak resident memory while reading the export: {peak} MiB (the process, emulator included; {before} MiB before, +{} MiB)",
        peak.saturating_sub(before)
    );
}

async fn token(url: &str, client_id: &str) -> String {
    reqwest::Client::new()
        .post(format!("{url}/contoso.onmicrosoft.com/oauth2/v2.0/token"))
        .form(&[
            ("client_id", client_id),
            ("scope", "https://graph.microsoft.com/.default"),
            ("client_secret", SECRET),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn policy_id(url: &str) -> String {
    let state: serde_json::Value = reqwest::get(format!("{url}/_emulator/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    state["policies"][0]["id"].as_str().unwrap().to_string()
}

/// Both by default; `-- device_statuses` or `-- export` runs one.
async fn bench() {
    let only = |name: &str| {
        let named: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with("--"))
            .collect();
        named.is_empty() || named.iter().any(|a| a == name)
    };
    if only("device_statuses") {
        bench_device_statuses().await;
    }
    if only("export") {
        bench_export().await;
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench graph` to measure");
        return;
    }
    // `RUST_LOG=phasegate::emulator=debug` lists the requests each observation makes.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    println!(
        "phasegate Graph observation benchmark (medians of 5, each run beside its baseline; emulator and provider on loopback)"
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}
