//! Bearer tokens: who is calling.
//!
//! `Authorization: Bearer <token>` (or, for the dashboard in a browser, the `phasegate_session`
//! cookie holding the same token) is hashed and looked up; a revoked or unknown token is refused
//! with 401 saying so, a missing one with 401 saying how to get one.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::{ApiError, ApiState};
use crate::domain::time::Timestamp;
use crate::identity::{self, Identity, Role, Source, TokenRecord};
use crate::store::{Store, StoreError};

/// The cookie the dashboard keeps the token in.
pub const SESSION_COOKIE: &str = "phasegate_session";

/// An authenticated caller (an extractor: handlers that take it require a valid token).
pub struct Caller(pub Identity);

/// The token a request carries, from the `Authorization` header or the session cookie.
pub fn token_of(parts: &Parts) -> Option<String> {
    if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let text = header.to_str().ok()?;
        let (scheme, token) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    let cookies = parts
        .headers
        .get(axum::http::header::COOKIE)?
        .to_str()
        .ok()?;
    cookies.split(';').find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == SESSION_COOKIE).then(|| value.to_string())
    })
}

/// Who a token belongs to.
pub fn identify(state: &ApiState, token: &str) -> Result<Identity, ApiError> {
    let hash = identity::hash(token);
    if hash == *state.local_token_hash {
        return Ok(Identity {
            name: "local".into(),
            role: Role::Admin,
            source: Source::Local,
        });
    }
    match state.store.token(&hash)? {
        Some(record) if record.revoked_at.is_none() => Ok(Identity {
            name: record.name,
            role: record.role,
            source: Source::Token,
        }),
        Some(record) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the token `{}` was revoked", record.name),
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unknown token: create one with `phasegate token create --name NAME --role ROLE`",
        )),
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, ApiError> {
        let state = ApiState::from_ref(state);
        let token = token_of(parts).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token: send `Authorization: Bearer <token>` (create one with `phasegate token create --name NAME --role ROLE`)",
            )
        })?;
        identify(&state, &token).map(Caller)
    }
}

/// Why a token was not created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Store(String),
}

/// Creates a token for `name` with `role`; returns the token, which is shown once and stored
/// only as its hash.
pub fn create(store: &Store, name: &str, role: Role) -> Result<String, TokenError> {
    if !identity::valid_name(name) {
        return Err(TokenError::Invalid(format!(
            "invalid token name `{name}`: 1 to 64 letters, digits, `.`, `-`, `_` or `@`"
        )));
    }
    let active = store
        .tokens()
        .map_err(|e| TokenError::Store(e.to_string()))?
        .into_iter()
        .any(|t| t.name == name && t.revoked_at.is_none());
    if active {
        return Err(TokenError::Exists(format!(
            "a token named `{name}` exists; revoke it first (`phasegate token revoke {name}`)"
        )));
    }
    let token = identity::new_token().map_err(TokenError::Store)?;
    let record = TokenRecord {
        name: name.to_string(),
        role,
        hash: identity::hash(&token),
        created_at: Timestamp::from_system_time(std::time::SystemTime::now()),
        revoked_at: None,
    };
    store
        .put_token(&record)
        .map_err(|e| TokenError::Store(e.to_string()))?;
    Ok(token)
}

pub fn revoke(store: &Store, name: &str) -> Result<usize, StoreError> {
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let mut revoked = 0;
    for mut token in store.tokens()? {
        if token.name == name && token.revoked_at.is_none() {
            token.revoked_at = Some(now);
            store.put_token(&token)?;
            revoked += 1;
        }
    }
    Ok(revoked)
}
