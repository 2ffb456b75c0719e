//! The HTTP API under `/api/v1`, served by `phasegate serve` (and, on loopback for the CLI on the
//! same machine, by `phasegate run`).
//!
//! JSON in and out, the same rollout object as `status --output json`; every change goes through
//! the runner's [`Handle`], so it is recorded at once whatever the backend is doing. Callers
//! authenticate with a bearer token; its role decides what it may do, and its name is what the
//! audit trail records (only the daemon's own local token may name another person, as direct
//! access to the store can). Transitions stream as server-sent events, resumable with
//! `Last-Event-ID`. The contract is `docs/openapi.json`, served at `/api/v1/openapi.json`.

pub mod auth;
mod exception;
pub mod sse;
pub mod ui;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cli::view::{audit_trail, rollout_view};
use crate::domain::event::{DriftResolution, EventKind};
use crate::domain::machine;
use crate::domain::plan::Strictness;
use crate::engine::{self, Engine, EngineError};
use crate::identity::{Identity, Role, Source};
use crate::runner::Handle;
use crate::store::{EventRecord, PlanRecord, Store, StoreError};

pub use auth::Caller;

/// The OpenAPI document of this API (also in `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub handle: Handle,
    pub store: Arc<Store>,
    /// Hash of the daemon's own token, for the CLI on this machine.
    pub local_token_hash: Arc<String>,
    /// Turns true when the process shuts down: live streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// The API's routes. The dashboard and `/metrics` are added beside them by `serve`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/rollouts", get(list).post(start))
        .route("/api/v1/rollouts/{id}", get(one))
        .route("/api/v1/rollouts/{id}/history", get(history))
        .route("/api/v1/rollouts/{id}/watch", get(sse::watch_one))
        .route("/api/v1/watch", get(sse::watch_all))
        .route("/api/v1/approvals", get(approvals))
        .route("/api/v1/rollouts/{id}/approvals", get(rollout_approvals))
        .route("/api/v1/rollouts/{id}/approve", post(approve))
        .route("/api/v1/rollouts/{id}/reject", post(reject))
        .route("/api/v1/rollouts/{id}/pause", post(pause))
        .route("/api/v1/rollouts/{id}/resume", post(resume))
        .route("/api/v1/rollouts/{id}/rollback", post(rollback))
        .route("/api/v1/rollouts/{id}/abort", post(abort))
        .route("/api/v1/rollouts/{id}/drift", post(drift))
        .route("/api/v1/rollouts/{id}/plan", post(apply_plan))
        .route("/api/v1/rollouts/{id}/plan/approve", post(approve_plan))
        .route("/api/v1/rollouts/{id}/plan/reject", post(reject_plan))
        .route(
            "/api/v1/rollouts/{id}/freeze-override",
            post(override_freeze),
        )
        .route("/api/v1/rollouts/{id}/exceptions", post(exception::grant))
        .route(
            "/api/v1/rollouts/{id}/exceptions/{name}",
            axum::routing::delete(exception::revoke),
        )
        .route("/api/v1/plans/check", post(check_plan))
        .route("/api/v1/export", get(export))
        .route("/api/v1/tokens", get(tokens).post(create_token))
        .route("/api/v1/tokens/{name}/revoke", post(revoke_token))
        .with_state(state)
}

/// An API failure: a status and one line saying what is wrong.
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

/// What a 503 asks a client to wait before sending the same request again (`Retry-After`, in
/// seconds): a driver that just stopped is replaced, and a database session re-made, within it.
pub const RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.message}));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = [(
                axum::http::header::RETRY_AFTER,
                RETRY_AFTER_SECS.to_string(),
            )];
            return (self.status, retry_after, body).into_response();
        }
        (self.status, body).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> ApiError {
        let status = match &err {
            EngineError::Store(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            EngineError::Store(
                StoreError::AlreadyExists(_)
                | StoreError::Conflict { .. }
                | StoreError::Fenced { .. },
            ) => StatusCode::CONFLICT,
            EngineError::Rejected(_) | EngineError::Claimed(_) => StatusCode::CONFLICT,
            EngineError::Plan(_) => StatusCode::BAD_REQUEST,
            EngineError::Provider(e)
                if matches!(
                    e.kind,
                    crate::provider::ErrorKind::NotFound | crate::provider::ErrorKind::Conflict
                ) =>
            {
                StatusCode::CONFLICT
            }
            EngineError::Provider(_) => StatusCode::BAD_GATEWAY,
            EngineError::Unavailable(_) | EngineError::Store(StoreError::Unavailable { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        ApiError::from(EngineError::Store(err))
    }
}

type ApiResult = Result<Response, ApiError>;

fn view_of(store: &Store, id: &str) -> Result<Value, ApiError> {
    let loaded = engine::load(store, id)?;
    Ok(serde_json::to_value(rollout_view(
        &loaded.plan,
        &loaded.stored.rollout,
        crate::provider::view_now(store, &loaded),
    ))
    .expect("views serialize"))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({"name": caller.0.name, "role": caller.0.role.as_str()}))
}

/// `?format=text`: the same text `phasegate status` prints, for the CLI through the API.
#[derive(Deserialize, Default)]
struct Format {
    format: Option<String>,
}

fn text_wanted(format: &Format) -> bool {
    format.format.as_deref() == Some("text")
}

async fn list(
    State(state): State<ApiState>,
    _caller: Caller,
    axum::extract::Query(format): axum::extract::Query<Format>,
) -> ApiResult {
    if text_wanted(&format) {
        let text = crate::cli::status_text(&state.store, None, state.store.path())?;
        return Ok(Json(json!({"text": text})).into_response());
    }
    let rollouts = state.store.rollouts()?;
    let views: Vec<Value> = rollouts
        .iter()
        .map(|r| view_of(&state.store, &r.rollout.id))
        .collect::<Result<_, _>>()?;
    Ok(Json(views).into_response())
}

async fn one(
    State(state): State<ApiState>,
    _caller: Caller,
    Path(id): Path<String>,
    axum::extract::Query(format): axum::extract::Query<Format>,
) -> ApiResult {
    let mut view = view_of(&state.store, &id)?;
    if text_wanted(&format) {
        view["text"] = json!(crate::cli::status_text(
            &state.store,
            Some(&id),
            state.store.path()
        )?);
    }
    Ok(Json(view).into_response())
}

/// The promotions waiting for approval, with their forecasts and digests (`phasegate approvals`).
async fn approvals(State(state): State<ApiState>, _caller: Caller) -> ApiResult {
    let pending = crate::cli::commands::pending_approvals(&state.store, None)?;
    Ok(Json(pending).into_response())
}

async fn rollout_approvals(
    State(state): State<ApiState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    state.store.rollout(&id)?;
    let pending = crate::cli::commands::pending_approvals(&state.store, Some(&id))?;
    Ok(Json(pending).into_response())
}

async fn history(
    State(state): State<ApiState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    state.store.rollout(&id)?;
    let events = audit_trail(state.store.events(&id)?);
    let verdict = state.store.verify(&id)?;
    Ok(Json(json!({
        "id": id,
        "verified": verdict.is_ok(),
        "verification": match &verdict {
            Ok(n) => format!("audit trail verified, {n} events, hash chain intact"),
            Err(e) => format!("audit trail is broken: {e}"),
        },
        "events": crate::cli::view::history_json(&events),
    }))
    .into_response())
}

/// A consistent export of the whole store (what `phasegate export` writes), for an admin: taken
/// while the daemon keeps running, its commits waiting for the snapshot.
async fn export(State(state): State<ApiState>, Caller(caller): Caller) -> ApiResult {
    require(
        &caller,
        caller.role.can_administer(),
        "exporting the store",
        "admin",
    )?;
    let store = state.store.clone();
    let now = crate::domain::time::Timestamp::from_system_time(std::time::SystemTime::now());
    let export = tokio::task::spawn_blocking(move || store.export(now))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(export).into_response())
}

fn require(caller: &Identity, allowed: bool, what: &str, roles: &str) -> Result<(), ApiError> {
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{}` has the role {}; {what} needs {roles}",
                caller.name, caller.role
            ),
        ))
    }
}

/// The person a command is recorded for: the token's name, or — for the daemon's local token
/// only — the `by` the CLI passes along.
fn actor(caller: &Identity, by: Option<&str>) -> Result<String, ApiError> {
    match (caller.source, by.map(str::trim)) {
        (Source::Local, Some(by)) if !by.is_empty() => Ok(by.to_string()),
        (Source::Local, Some(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`by` must not be empty",
        )),
        (Source::Token, Some(by)) if by != caller.name => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "the token `{}` acts as itself; it cannot record `{by}` as the actor",
                caller.name
            ),
        )),
        _ => Ok(caller.name.clone()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Decision {
    phase: Option<String>,
    ticket: Option<String>,
    comment: Option<String>,
    #[serde(default)]
    reason: String,
    to: Option<String>,
    decision: Option<String>,
    by: Option<String>,
    /// The plan change decided on (its hash, or the start of it); default: the one waiting.
    plan: Option<String>,
    /// The approval digest the approver was shown (`GET …/approvals`): the approval is refused
    /// if the rollout's evidence has moved since.
    digest: Option<String>,
}

/// `POST /rollouts/{id}/plan`: a plan to apply to a running rollout.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanApply {
    plan: String,
    file: Option<String>,
    #[serde(default)]
    reason: String,
    by: Option<String>,
}

/// A request body, read only once the caller is known to be allowed to ask (so a viewer hears
/// "forbidden", not what is wrong with its JSON). Every problem is a JSON error like the rest:
/// a body too large (413), not JSON (415), not well-formed (400), not the expected shape (422).
struct Body {
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
}

impl Body {
    fn is_empty(&self) -> bool {
        self.bytes
            .as_ref()
            .is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace))
    }

    /// The body as `T`; `None` when there is none.
    fn json<T: DeserializeOwned>(&self) -> Result<Option<T>, ApiError> {
        let bytes = match &self.bytes {
            Ok(bytes) => bytes,
            Err(rejection) => {
                return Err(ApiError::new(rejection.status(), rejection.body_text()));
            }
        };
        if self.is_empty() {
            return Ok(None);
        }
        let content_type = self
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "send the body as JSON with `Content-Type: application/json` (it was {})",
                    if content_type.is_empty() {
                        "not given".to_string()
                    } else {
                        format!("`{content_type}`")
                    }
                ),
            ));
        }
        serde_json::from_slice(bytes).map(Some).map_err(|e| {
            let status = match e.classify() {
                serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, format!("invalid request body: {e}"))
        })
    }

    /// A body the request must have.
    fn required<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        self.json()?.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "this request needs a JSON body (see /api/v1/openapi.json)",
            )
        })
    }

    /// A decision's body: all its fields are optional, so no body is an empty decision.
    fn decision(&self) -> Result<Decision, ApiError> {
        Ok(self.json()?.unwrap_or_default())
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Body, Self::Rejection> {
        let headers = request.headers().clone();
        let bytes = Bytes::from_request(request, state).await;
        Ok(Body { headers, bytes })
    }
}

async fn command(state: &ApiState, id: &str, kind: EventKind, by: &str, reason: &str) -> ApiResult {
    state.store.rollout(id)?;
    let record = state.handle.command(id, kind, by, reason).await?;
    recorded(state, id, record)
}

/// The rollout's view after a command, with what the command recorded (if anything).
fn recorded(state: &ApiState, id: &str, record: Option<EventRecord>) -> ApiResult {
    let mut view = view_of(&state.store, id)?;
    view["recorded"] = json!(record.map(|r| json!({"seq": r.seq, "notes": r.notes})));
    Ok(Json(view).into_response())
}

async fn approve(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "approving",
        "approver or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    let loaded = engine::load(&state.store, &id)?;
    let phase = match d.phase {
        Some(p) => p,
        None => machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)
            .map_err(EngineError::from)?,
    };
    let reason = d.comment.clone().unwrap_or_default();
    let kind = EventKind::ApprovalGranted {
        phase,
        ticket: d.ticket,
        comment: d.comment,
        digest: d.digest,
    };
    command(&state, &id, kind, &by, &reason).await
}

async fn reject(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "rejecting",
        "approver or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    let loaded = engine::load(&state.store, &id)?;
    if d.reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a rejection needs a `reason`",
        ));
    }
    let phase = match d.phase {
        Some(p) => p,
        None => machine::default_approval_phase(&loaded.plan, &loaded.stored.rollout)
            .map_err(EngineError::from)?,
    };
    command(
        &state,
        &id,
        EventKind::ApprovalRejected { phase },
        &by,
        &d.reason,
    )
    .await
}

async fn operate(
    state: ApiState,
    caller: Identity,
    id: String,
    body: Body,
    what: &str,
    kind: impl FnOnce(&Decision) -> Result<EventKind, ApiError>,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_operate(),
        what,
        "operator or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    state.store.rollout(&id)?;
    let kind = kind(&d)?;
    command(&state, &id, kind, &by, &d.reason).await
}

async fn pause(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    operate(state, caller, id, body, "pausing", |_| {
        Ok(EventKind::PauseRequested)
    })
    .await
}

async fn resume(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    operate(state, caller, id, body, "resuming", |_| {
        Ok(EventKind::ResumeRequested)
    })
    .await
}

async fn rollback(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    operate(state, caller, id, body, "rolling back", |d| {
        Ok(EventKind::RollbackRequested { to: d.to.clone() })
    })
    .await
}

async fn abort(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    operate(state, caller, id, body, "aborting", |_| {
        Ok(EventKind::AbortRequested)
    })
    .await
}

async fn drift(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    operate(state, caller, id, body, "deciding about drift", |d| {
        let resolution = match d.decision.as_deref() {
            Some("reapply") => DriftResolution::Reapply,
            Some("adopt") => DriftResolution::Adopt,
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("`decision` must be \"reapply\" or \"adopt\", not {other:?}"),
                ));
            }
        };
        Ok(EventKind::DriftResolved { resolution })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanText {
    /// The plan's TOML.
    plan: String,
    /// A name for it in errors and in the trail (default `plan.toml`).
    file: Option<String>,
    id: Option<String>,
    by: Option<String>,
    /// Warnings are errors, as with `plan check --strict`.
    strict: Option<bool>,
    /// Start without the readiness preflight, for this reason (recorded with the start).
    skip_preflight: Option<String>,
    /// The DNS resolver the preflight asks (`IP` or `IP:PORT`), over the plan's.
    preflight_resolver: Option<String>,
}

/// `strict`: the plan's warnings are errors; otherwise, as the plan says.
fn strictness(strict: Option<bool>) -> Strictness {
    if strict == Some(true) {
        Strictness::Strict
    } else {
        Strictness::AsWritten
    }
}

fn checked(file: &str, text: &str, strictness: Strictness) -> Value {
    let checked = crate::adapters::check_plan(file, text, strictness);
    json!(crate::cli::view::plan_check(file, text, &checked))
}

async fn apply_plan(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_operate(),
        "applying a plan",
        "operator or admin",
    )?;
    let body: PlanApply = body.required()?;
    let by = actor(&caller, body.by.as_deref())?;
    state.store.rollout(&id)?;
    let file = body.file.unwrap_or_else(|| "plan.toml".into());
    let record = state
        .handle
        .apply_plan(&id, &file, body.plan, &by, &body.reason)
        .await?;
    recorded(&state, &id, record)
}

async fn approve_plan(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "approving a plan change",
        "approver or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    let loaded = engine::load(&state.store, &id)?;
    let plan_hash = machine::waiting_plan_change(&loaded.stored.rollout, d.plan.as_deref())
        .map_err(EngineError::from)?;
    let reason = d.comment.clone().unwrap_or_default();
    let kind = EventKind::PlanChangeApproved {
        plan_hash,
        ticket: d.ticket,
        comment: d.comment,
    };
    command(&state, &id, kind, &by, &reason).await
}

async fn reject_plan(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve() || caller.role.can_operate(),
        "turning down a plan change",
        "approver, operator or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    let loaded = engine::load(&state.store, &id)?;
    if d.reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "turning down a plan change needs a `reason`",
        ));
    }
    let plan_hash = machine::waiting_plan_change(&loaded.stored.rollout, d.plan.as_deref())
        .map_err(EngineError::from)?;
    let kind = EventKind::PlanChangeRejected { plan_hash };
    command(&state, &id, kind, &by, &d.reason).await
}

async fn override_freeze(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "overriding a freeze",
        "approver or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    state.store.rollout(&id)?;
    command(&state, &id, EventKind::FreezeOverridden, &by, &d.reason).await
}

async fn check_plan(_caller: Caller, body: Body) -> ApiResult {
    let body: PlanText = body.required()?;
    let file = body.file.unwrap_or_else(|| "plan.toml".into());
    Ok(Json(checked(&file, &body.plan, strictness(body.strict))).into_response())
}

async fn start(State(state): State<ApiState>, Caller(caller): Caller, body: Body) -> ApiResult {
    require(
        &caller,
        caller.role.can_operate(),
        "starting a rollout",
        "operator or admin",
    )?;
    let body: PlanText = body.required()?;
    let by = actor(&caller, body.by.as_deref())?;
    let file = body.file.clone().unwrap_or_else(|| "plan.toml".into());
    let plan = crate::adapters::check_plan(&file, &body.plan, strictness(body.strict)).map_err(
        |errors| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the plan is invalid:\n{errors}"),
            )
        },
    )?;
    let id = match body.id {
        Some(id) => id,
        None => state.store.next_rollout_id(&plan.name)?,
    };
    if !crate::cli::valid_rollout_id(&id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid rollout id `{id}`: use letters, digits, `-`, `_` and `.`"),
        ));
    }
    let resolver = body
        .preflight_resolver
        .as_deref()
        .map(|text| {
            crate::preflight::settings::parse_resolver(text).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("`preflight_resolver`: {e}"),
                )
            })
        })
        .transpose()?;
    let options = crate::preflight::Options {
        resolver,
        plan_dir: std::path::Path::new(&file)
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
    };
    let gate = crate::preflight::before_start(&plan, &options, body.skip_preflight.as_deref())
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let (reason, shown) = match gate {
        crate::preflight::StartGate::Start { reason, shown } => (reason, shown),
        crate::preflight::StartGate::Refused { errors } => {
            let lines: Vec<String> = errors
                .iter()
                .map(|f| format!("{}: {}", f.check, f.message))
                .collect();
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{}; or start with `skip_preflight` and a reason:\n{}",
                    crate::cli::commands::not_started(errors.len(), "phasegate preflight PLAN"),
                    lines.join("\n")
                ),
            ));
        }
    };
    let mut provider = crate::provider::connect(&plan.provider, &state.store)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let record = PlanRecord {
        path: file,
        source: body.plan.clone(),
        hash: plan.hash.clone(),
    };
    let engine = Engine {
        store: &state.store,
        notifier: crate::notifier::shared(),
        actor: "api".into(),
        delivery: crate::retry::Backoff::WEBHOOK,
        limits: engine::Limits::default(),
    };
    let (_, warnings) = engine
        .start_because(&plan, record, &id, &by, &reason, provider.as_mut())
        .await?;
    state.handle.watch(&id).await;
    let mut view = view_of(&state.store, &id)?;
    view["warnings"] = json!(warnings);
    view["preflight"] = json!(shown);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

async fn tokens(State(state): State<ApiState>, Caller(caller): Caller) -> ApiResult {
    require(
        &caller,
        caller.role.can_administer(),
        "listing tokens",
        "admin",
    )?;
    let list: Vec<Value> = state
        .store
        .tokens()?
        .iter()
        .map(|t| {
            json!({"name": t.name, "role": t.role.as_str(), "created_at": t.created_at.rfc3339(),
                   "revoked_at": t.revoked_at.map(|r| r.rfc3339())})
        })
        .collect();
    Ok(Json(list).into_response())
}

async fn create_token(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_administer(),
        "creating tokens",
        "admin",
    )?;
    let body: NewToken = body.required()?;
    let role = Role::parse(&body.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown role `{}`: expected viewer, approver, operator or admin",
                body.role
            ),
        )
    })?;
    let token = auth::create(&state.store, &body.name, role).map_err(|e| {
        let status = match e {
            auth::TokenError::Invalid(_) => StatusCode::BAD_REQUEST,
            auth::TokenError::Exists(_) => StatusCode::CONFLICT,
            auth::TokenError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": body.name, "role": role.as_str(), "token": token})),
    )
        .into_response())
}

async fn revoke_token(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_administer(),
        "revoking tokens",
        "admin",
    )?;
    let revoked = auth::revoke(&state.store, &name).map_err(ApiError::from)?;
    if revoked == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no active token named `{name}`"),
        ));
    }
    Ok(Json(json!({"name": name, "revoked": revoked})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing done for a passing reason is a 503 that says when to ask again; a refusal by the
    /// rollout's state stays a 409, to be read, not retried.
    #[test]
    fn a_passing_refusal_is_a_503_with_retry_after_and_a_conflict_is_not() {
        let passing = ApiError::from(EngineError::Unavailable("not being driven now".into()));
        let response = passing.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[axum::http::header::RETRY_AFTER],
            RETRY_AFTER_SECS.to_string()
        );
        let unreachable = ApiError::from(StoreError::Unavailable {
            path: "postgres://db".into(),
            message: "connection closed".into(),
        });
        assert_eq!(unreachable.status, StatusCode::SERVICE_UNAVAILABLE);
        let conflict = ApiError::from(EngineError::Claimed("owned elsewhere".into()));
        let response = conflict.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert!(
            response
                .headers()
                .get(axum::http::header::RETRY_AFTER)
                .is_none()
        );
    }
}
