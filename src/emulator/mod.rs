//! `phasegate emulator`: a Graph-compatible tenant on a real socket, for rehearsing plans and for
//! testing the Graph provider end to end.
//!
//! It serves the token endpoint and the Graph subset the provider uses, byte-compatible with the
//! service's documented and observed behaviour (see `docs/graph.md`), plus a few endpoints of its
//! own under `/_emulator/`: the ledger of accepted writes, the tenant's state, its clock, token
//! revocation, the notifications and blocks of its devices, Multi Admin Approval requests, and a
//! second administrator (see `docs/emulator.md`). Requests are answered one at a time against one
//! tenant; faults are injected by seed.

pub mod approvals;
pub mod ca;
pub mod compliance;
pub mod faults;
pub mod intune;
pub mod tenant;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

pub use tenant::{CaState, Scenario, Settings, Setup, Tenant};

type Shared = Arc<Mutex<Tenant>>;

/// Serves the default tenant on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, settings, Setup::default(), shutdown).await
}

/// Serves the tenant `setup` describes on `listener` until `shutdown` completes.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    settings: Settings,
    setup: Setup,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tenant: Shared = Arc::new(Mutex::new(Tenant::with_setup(settings, setup)));
    let app = Router::new().fallback(handle).with_state(tenant);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn handle(State(tenant): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_lowercase(), v.to_string()))
        })
        .collect();
    let host = headers
        .get("host")
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    let raw_query = parts.uri.query().unwrap_or("");
    let emulated = tenant::Request {
        method: parts.method.as_str().to_string(),
        path: tenant::split_url(parts.uri.path()).0,
        query: tenant::parse_query(raw_query),
        headers,
        body: body.to_vec(),
        base_url: format!("http://{host}"),
    };
    let answer = {
        let mut tenant = tenant
            .lock()
            .expect("a handler never panics while holding the tenant");
        tenant.handle(&emulated)
    };
    tracing::debug!(method = %emulated.method, path = %emulated.path, status = answer.status, "emulator");
    if let Some(delay) = answer.delay {
        tokio::time::sleep(delay).await;
    }
    into_http(answer)
}

fn into_http(answer: tenant::Response) -> Response {
    let body = if answer.drop_connection {
        // A body that fails after the headers makes hyper abort the connection: the client sees
        // the request fail although it was applied.
        let stream = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other(
                "connection dropped by fault injection",
            ))
        });
        Body::from_stream(stream)
    } else {
        match &answer.body {
            tenant::Body::Empty => Body::empty(),
            tenant::Body::Json(value) => {
                Body::from(serde_json::to_vec(value).expect("json serializes"))
            }
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    if matches!(answer.body, tenant::Body::Json(_)) {
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"),
        );
    }
    if answer.drop_connection {
        headers.insert("content-length", HeaderValue::from_static("1024"));
    }
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    response
}

/// Binds, serves and prints where; used by `phasegate emulator`.
pub async fn run(listen: SocketAddr, settings: Settings, setup: Setup) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    let clock = match settings.time_scale {
        None => "moves when the client asks (instant rehearsals)".to_string(),
        Some(x) => format!("{x}× real time"),
    };
    let faults = if settings.faults > 0.0 {
        format!(
            "  faults:     {:.0}% of Graph requests\n",
            settings.faults * 100.0
        )
    } else {
        String::new()
    };
    let maa = if setup.maa {
        format!(
            "  approvals:  Multi Admin Approval on; approve at http://{local}/_emulator/approvals\n"
        )
    } else {
        String::new()
    };
    let banner = format!(
        "phasegate emulator listening on http://{local}\n  tenant:     {} ({} scenario)\n  client id:  {}\n  devices:    {} (seed {})\n  clock:      {clock}\n{faults}{maa}  ledger:     http://{local}/_emulator/ledger   state: http://{local}/_emulator/state\n",
        settings.tenant_domain,
        setup.scenario.as_str(),
        settings.client_id,
        settings.devices,
        settings.seed
    );
    // Whoever started us may stop reading after the first line; that must not stop the tenant.
    use std::io::Write;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(banner.as_bytes());
    let _ = stdout.flush();
    serve_with(listener, settings, setup, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
