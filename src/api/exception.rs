//! `POST /api/v1/rollouts/{id}/exceptions` and `DELETE /api/v1/rollouts/{id}/exceptions/{name}`:
//! an exception from enforcement weakens a safeguard the way a promotion does, so it takes the
//! approver (or admin) role; the actor recorded is the token's.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::auth::Caller;
use super::{ApiError, ApiResult, ApiState, Body, actor, command, require};
use crate::domain::event::EventKind;
use crate::domain::machine::{self, Rejection};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    name: String,
    user: Option<String>,
    group: Option<String>,
    /// An RFC 3339 time, or a span from when it is recorded (`3d`).
    until: String,
    #[serde(default)]
    reason: String,
    by: Option<String>,
}

fn invalid(rejection: Rejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, rejection.to_string())
}

pub(super) async fn grant(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "granting an exception",
        "approver or admin",
    )?;
    let body: GrantBody = body.required()?;
    let by = actor(&caller, body.by.as_deref())?;
    let subject = machine::subject(body.user.as_deref(), body.group.as_deref()).map_err(invalid)?;
    let until = machine::parse_until(&body.until).map_err(invalid)?;
    let kind = EventKind::ExceptionGranted {
        name: body.name,
        subject,
        until,
    };
    command(&state, &id, kind, &by, &body.reason).await
}

pub(super) async fn revoke(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path((id, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    require(
        &caller,
        caller.role.can_approve(),
        "revoking an exception",
        "approver or admin",
    )?;
    let d = body.decision()?;
    let by = actor(&caller, d.by.as_deref())?;
    command(
        &state,
        &id,
        EventKind::ExceptionRevoked { name },
        &by,
        &d.reason,
    )
    .await
}
