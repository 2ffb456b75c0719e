//! The dashboard's routes: the pages of [`crate::web`] behind a session, and their forms.
//!
//! A person signs in with an API token (the `/login` form); it is kept in an `HttpOnly`,
//! `SameSite=Strict` cookie, so the browser sends it with every request of this origin and never
//! to another. Every form carries a token derived from the session (the CSRF check), every POST
//! checks the role again, and approving or rejecting needs the confirmation box ticked. Pages are
//! sent with a Content-Security-Policy that allows nothing from elsewhere.

use crate::provider;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::{self, SESSION_COOKIE};
use super::{ApiError, ApiState};
use crate::cli::view::rollout_view;
use crate::domain::event::{DriftResolution, EventKind};
use crate::domain::machine;
use crate::engine::{self, EngineError};
use crate::identity::Identity;
use crate::web;

pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/", get(|| async { redirect("/ui/") }))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/ui/", get(index))
        .route("/ui/rollouts/{id}", get(rollout))
        .route("/ui/rollouts/{id}/{action}", post(act))
        .route("/ui/assets/dashboard.css", get(css))
        .route("/ui/assets/dashboard.js", get(js))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to.to_string())]).into_response()
}

fn page(html: String) -> Response {
    let mut response = Html(html).into_response();
    response.headers_mut().insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    );
    response
}

/// The session's identity, or the login page.
fn session(state: &ApiState, parts: &Parts) -> Result<(Identity, String), Box<Response>> {
    let Some(token) = auth::token_of(parts) else {
        return Err(Box::new(redirect("/login")));
    };
    match auth::identify(state, &token) {
        Ok(identity) => Ok((identity, token)),
        Err(e) => Err(Box::new(page(web::login_page(Some(&e.message))))),
    }
}

/// The form token of a session: derived from it, so a page of another origin cannot know it.
fn csrf(token: &str) -> String {
    hex::encode(&Sha256::digest(format!("phasegate-csrf:{token}").as_bytes())[..16])
}

fn viewer(identity: &Identity) -> web::Viewer {
    web::Viewer {
        name: identity.name.clone(),
        role: identity.role,
    }
}

async fn login_form() -> Response {
    page(web::login_page(None))
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(state): State<ApiState>, Form(form): Form<Login>) -> Response {
    match auth::identify(&state, form.token.trim()) {
        Ok(_) => {
            let cookie = format!(
                "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                form.token.trim()
            );
            let mut response = redirect("/ui/");
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(SET_COOKIE, value);
            }
            response
        }
        Err(e) => {
            let mut response = page(web::login_page(Some(&e.message)));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        }
    }
}

async fn logout() -> Response {
    let mut response = redirect("/login");
    response.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static(
            "phasegate_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    response
}

async fn index(State(state): State<ApiState>, parts: Parts) -> Response {
    let (identity, _) = match session(&state, &parts) {
        Ok(s) => s,
        Err(response) => return *response,
    };
    let views = match state.store.rollouts() {
        Ok(rollouts) => rollouts
            .iter()
            .filter_map(|r| engine::load(&state.store, &r.rollout.id).ok())
            .map(|l| {
                rollout_view(
                    &l.plan,
                    &l.stored.rollout,
                    provider::view_now(&state.store, &l),
                )
            })
            .collect::<Vec<_>>(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    page(web::index_page(&views, &viewer(&identity)))
}

async fn rollout(State(state): State<ApiState>, Path(id): Path<String>, parts: Parts) -> Response {
    let (identity, token) = match session(&state, &parts) {
        Ok(s) => s,
        Err(response) => return *response,
    };
    let render = || -> Result<String, ApiError> {
        let loaded = engine::load(&state.store, &id)?;
        let view = rollout_view(
            &loaded.plan,
            &loaded.stored.rollout,
            provider::view_now(&state.store, &loaded),
        );
        let history = crate::cli::view::audit_trail(state.store.events(&id)?);
        let verified = state.store.verify(&id)?;
        let csrf = csrf(&token);
        Ok(web::rollout_page(
            &web::RolloutPage {
                view: &view,
                plan: &loaded.plan,
                history: &history,
                verified,
                csrf: &csrf,
            },
            &viewer(&identity),
        ))
    };
    match render() {
        Ok(html) => page(html),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize, Default)]
struct ActionForm {
    csrf: Option<String>,
    phase: Option<String>,
    ticket: Option<String>,
    comment: Option<String>,
    reason: Option<String>,
    to: Option<String>,
    decision: Option<String>,
    confirm: Option<String>,
    /// The approval digest of the evidence the page showed (a hidden field of the approve form).
    digest: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

async fn act(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
    parts: Parts,
    Form(form): Form<ActionForm>,
) -> Response {
    let (identity, token) = match session(&state, &parts) {
        Ok(s) => s,
        Err(response) => return *response,
    };
    if form.csrf.as_deref() != Some(csrf(&token).as_str()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "the form is stale or not from this page; reload it",
        )
        .into_response();
    }
    let reason = non_empty(form.reason.clone()).unwrap_or_default();
    let confirmed = form.confirm.as_deref() == Some("yes");
    let kind = match action.as_str() {
        "approve" | "reject" if !identity.role.can_approve() => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "`{}` has the role {}; approving needs approver or admin",
                    identity.name, identity.role
                ),
            )
            .into_response();
        }
        "approve" | "reject" if !confirmed => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "tick the confirmation that you reviewed the evidence",
            )
            .into_response();
        }
        "pause" | "resume" | "rollback" | "drift" if !identity.role.can_operate() => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "`{}` has the role {}; this needs operator or admin",
                    identity.name, identity.role
                ),
            )
            .into_response();
        }
        "approve" | "reject" => {
            let phase = match non_empty(form.phase.clone()) {
                Some(p) => p,
                None => match engine::load(&state.store, &id)
                    .map_err(ApiError::from)
                    .and_then(|l| {
                        machine::default_approval_phase(&l.plan, &l.stored.rollout)
                            .map_err(|e| ApiError::from(EngineError::from(e)))
                    }) {
                    Ok(p) => p,
                    Err(e) => return e.into_response(),
                },
            };
            if action == "approve" {
                EventKind::ApprovalGranted {
                    phase,
                    ticket: non_empty(form.ticket),
                    comment: non_empty(form.comment.clone()),
                    digest: non_empty(form.digest),
                }
            } else {
                if reason.is_empty() {
                    return ApiError::new(StatusCode::BAD_REQUEST, "a rejection needs a reason")
                        .into_response();
                }
                EventKind::ApprovalRejected { phase }
            }
        }
        "pause" => EventKind::PauseRequested,
        "resume" => EventKind::ResumeRequested,
        "rollback" => EventKind::RollbackRequested {
            to: non_empty(form.to),
        },
        "drift" => match form.decision.as_deref() {
            Some("reapply") => EventKind::DriftResolved {
                resolution: DriftResolution::Reapply,
            },
            Some("adopt") => EventKind::DriftResolved {
                resolution: DriftResolution::Adopt,
            },
            _ => {
                return ApiError::new(StatusCode::BAD_REQUEST, "choose reapply or adopt")
                    .into_response();
            }
        },
        other => {
            return ApiError::new(StatusCode::NOT_FOUND, format!("no action `{other}`"))
                .into_response();
        }
    };
    let reason = if reason.is_empty() {
        non_empty(form.comment).unwrap_or_default()
    } else {
        reason
    };
    match state
        .handle
        .command(&id, kind, &identity.name, &reason)
        .await
    {
        Ok(_) => redirect(&format!("/ui/rollouts/{id}")),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn css() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], web::CSS).into_response()
}

async fn js() -> Response {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], web::JS).into_response()
}

/// `/metrics`: the Prometheus text, with the rollouts sampled from the store at each scrape.
async fn metrics(State(state): State<ApiState>, parts: Parts) -> Response {
    let token = auth::token_of(&parts);
    if let Err(e) = token
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))
        .and_then(|t| auth::identify(&state, &t))
    {
        return e.into_response();
    }
    let registry = crate::metrics::global();
    if let Ok(rollouts) = state.store.rollouts() {
        let samples: Vec<_> = rollouts
            .iter()
            .filter_map(|r| engine::load(&state.store, &r.rollout.id).ok())
            .map(|l| {
                crate::metrics::sample(&l.plan, &l.stored.rollout, l.stored.rollout.updated_at)
            })
            .collect();
        registry.set_rollouts(&samples);
    }
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        registry.render(),
    )
        .into_response()
}
