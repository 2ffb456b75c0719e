//! `cargo bench --bench graph`: observing 100,000 devices through the Graph provider against the
//! emulator on loopback, beside a baseline in the same run: fetching the same `deviceStatuses`
//! pages with bare GETs and parsing them, with no attribution to phases.

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

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn bench() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = emulator::Settings {
        devices: FLEET,
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
    let text = include_str!("../../plans/windows-baseline-graph.toml")
        .replace("http://127.0.0.1:8080", &url)
        .replace(
            "login_url = ",
            "ca_requests_per_second = 1000000.0\nlogin_url = ",
        );
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

    let mut observed = 0;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let observation = provider
            .observe(&plan.policy, &scopes, &record)
            .await
            .unwrap();
        samples.push(start.elapsed());
        observed = observation.scopes[1].iter().map(|(_, r)| r.len()).sum();
    }
    let observe = median(samples);

    let token = reqwest::Client::new()
        .post(format!("{url}/contoso.onmicrosoft.com/oauth2/v2.0/token"))
        .form(&[
            ("client_id", graph.client_id.as_str()),
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
        .to_string();
    let state: serde_json::Value = reqwest::get(format!("{url}/_emulator/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let policy = state["policies"][0]["id"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let mut samples = Vec::new();
    let mut fetched = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let mut next = Some(format!(
            "{url}/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/deviceStatuses"
        ));
        fetched = 0;
        while let Some(page_url) = next {
            let page: serde_json::Value = client
                .get(&page_url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            fetched += page["value"].as_array().map_or(0, Vec::len);
            next = page["@odata.nextLink"].as_str().map(str::to_string);
        }
        samples.push(start.elapsed());
    }
    let raw = median(samples);
    println!(
        "observe {observed} devices through the Graph provider   {:>10?}   bare paging of {fetched} statuses   {:>10?}   ratio {:.2}x",
        observe,
        raw,
        observe.as_secs_f64() / raw.as_secs_f64()
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench graph` to measure");
        return;
    }
    println!(
        "phasegate Graph observation benchmark (median of 5; emulator and provider on loopback)"
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}
