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
pub mod credentials;
pub mod faults;
pub mod intune;
pub mod reports;
pub mod tenant;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

pub use tenant::{Apns, CaState, Readiness, ReadinessVariant, Scenario, Settings, Setup, Tenant};

/// The tenant, and the address Graph answers name (its `@odata.nextLink`s): the emulator's own,
/// never what a request's `Host` header claims — as Graph's links always name Graph.
#[derive(Clone)]
struct Shared {
    tenant: Arc<Mutex<Tenant>>,
    local: SocketAddr,
}

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
    let local = listener.local_addr()?;
    let shared = Shared {
        tenant: Arc::new(Mutex::new(Tenant::with_setup(settings, setup))),
        local,
    };
    // Export jobs' downloads come from a storage origin of their own, as Intune's do.
    let blobs = tokio::net::TcpListener::bind((local.ip(), 0)).await?;
    let blob_ip = if local.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        local.ip()
    };
    let blob_origin = format!(
        "http://{}",
        SocketAddr::new(blob_ip, blobs.local_addr()?.port())
    );
    shared
        .tenant
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .set_blob_origin(blob_origin);
    let blob_app = Router::new().fallback(blob).with_state(shared.clone());
    let blob_server = tokio::spawn(async move { axum::serve(blobs, blob_app).await });
    let app = Router::new().fallback(handle).with_state(shared);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    blob_server.abort();
    served
}

/// `GET /reports/{name}?sv=…&sig=…` on the blob origin: an export job's zip, for the SAS in its
/// URL alone (`emulator/reports.rs`).
async fn blob(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let name = parts.uri.path().strip_prefix("/reports/").unwrap_or("");
    let query = tenant::parse_query(parts.uri.query().unwrap_or(""));
    let authorized = parts.headers.contains_key("authorization");
    let found = {
        let tenant = shared
            .tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if parts.method != axum::http::Method::GET {
            Err((
                405,
                reports::storage_error(
                    "UnsupportedHttpVerb",
                    "The resource doesn't support the specified HTTP verb.",
                ),
            ))
        } else {
            tenant.blob(name, &query, authorized)
        }
    };
    let (status, body, content_type) = match found {
        Ok(bytes) => (200, Body::from(bytes), "application/zip"),
        Err((status, xml)) => (status, Body::from(xml), "application/xml"),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    response
}

/// The base of the links the emulator writes: its listening address; when it listens on every
/// interface, the `Host` a client used if that names this port and is a plain host name or
/// address, otherwise loopback.
fn base_url(local: SocketAddr, host: Option<&str>) -> String {
    if !local.ip().is_unspecified() {
        return format!("http://{local}");
    }
    let plausible = host.filter(|h| {
        h.rsplit_once(':').is_some_and(|(name, port)| {
            port == local.port().to_string()
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        })
    });
    match plausible {
        Some(host) => format!("http://{host}"),
        None => format!("http://127.0.0.1:{}", local.port()),
    }
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
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
    let base_url = base_url(shared.local, headers.get("host").map(String::as_str));
    let raw_query = parts.uri.query().unwrap_or("");
    let emulated = tenant::Request {
        method: parts.method.as_str().to_string(),
        path: tenant::split_url(parts.uri.path()).0,
        query: tenant::parse_query(raw_query),
        headers,
        body: body.to_vec(),
        base_url,
    };
    let answer = {
        // No request may disable the emulator: a panic while answering one is that request's
        // 500, and the tenant stays usable for the next.
        let mut tenant = shared
            .tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tenant.handle(&emulated)))
            .unwrap_or_else(|_| {
                tenant::Response::json(
                    500,
                    serde_json::json!({"error": {"code": "InternalServerError",
                        "message": "the emulator failed to answer this request"}}),
                )
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            devices: 50,
            seed: 7,
            faults: 0.0,
            fault_seed: 7,
            time_scale: None,
            tenant_domain: "contoso.onmicrosoft.com".into(),
            client_id: "app".into(),
            client_secret: "secret".into(),
            credentials: Default::default(),
            token_lifetime: std::time::Duration::from_secs(3600),
            token_uses: None,
            ca_requests_per_second: 1e9,
            remediation_half_life: std::time::Duration::from_secs(2 * 86_400),
        }
    }

    /// Requests that once disabled the emulator for good: each is answered, and the next
    /// ordinary request still is.
    #[tokio::test]
    async fn no_request_disables_the_emulator() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, settings(), std::future::pending()));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let token_url = format!("{url}/contoso.onmicrosoft.com/oauth2/v2.0/token");
        let hostile = http
            .post(&token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&client_id=%a\u{e9}&client_secret=x%&scope=%zz")
            .send()
            .await
            .unwrap();
        assert_eq!(hostile.status(), 400);
        let far = http
            .post(format!("{url}/_emulator/clock"))
            .body(r#"{"advanceTo": "9999-12-31T23:59:59Z"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(far.status(), 200);
        let beyond = http
            .post(format!("{url}/_emulator/clock"))
            .body(r#"{"advanceBySeconds": 18446744073709551615}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(beyond.status(), 400);
        let token = http
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "app"),
                ("client_secret", "secret"),
                ("scope", "https://graph.microsoft.com/.default"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(token.status(), 200, "{:?}", token.text().await);
    }

    /// Links name the emulator, never what a request's `Host` claims.
    #[test]
    fn links_name_the_emulator_not_the_host_header() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            base_url(loopback, Some("evil.example:8080")),
            "http://127.0.0.1:8080"
        );
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(base_url(any, Some("emu.lab:8080")), "http://emu.lab:8080");
        assert_eq!(
            base_url(any, Some("evil.example:9")),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url(any, Some("a/b@evil.example:8080")),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url(any, None), "http://127.0.0.1:8080");
    }
}
