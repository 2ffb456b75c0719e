//! Live transitions as server-sent events.
//!
//! `GET /api/v1/rollouts/{id}/watch` streams one rollout's transitions as `transition` events
//! whose id is the event's sequence number: a client that reconnects with `Last-Event-ID: N`
//! first gets every event after N from the store, then the live ones, with nothing missed and
//! nothing twice. `GET /api/v1/watch` streams every rollout's (ids `<rollout>/<seq>`, not
//! resumable). Comments keep idle connections alive.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;

use super::{ApiError, ApiState, Caller};
use crate::runner::Announcement;
use crate::store::EventRecord;

fn data(rollout: &str, record: &EventRecord) -> String {
    json!({
        "rollout": rollout,
        "seq": record.seq,
        "at": record.at.rfc3339(),
        "event": record.event.kind.name(),
        "actor": record.event.trigger.actor,
        "previous_status": record.previous_status.as_str(),
        "status": record.status.as_str(),
        "reason": record.reason,
        "notes": record.notes,
    })
    .to_string()
}

fn keep_alive() -> KeepAlive {
    KeepAlive::new()
        .interval(Duration::from_secs(15))
        .text("keep-alive")
}

pub async fn watch_one(
    State(state): State<ApiState>,
    _caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading the store, so nothing committed in between is missed.
    let live = state.handle.subscribe();
    state.store.rollout(&id)?;
    let after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let stored: Vec<EventRecord> = state
        .store
        .events(&id)?
        .into_iter()
        .filter(|e| e.seq > after)
        .collect();
    let last_stored = stored.last().map_or(after, |e| e.seq);
    let rollout = id.clone();
    let replay = stream::iter(stored.into_iter().map(move |record| {
        Ok(Event::default()
            .event("transition")
            .id(record.seq.to_string())
            .data(data(&rollout, &record)))
    }));
    let rollout = id.clone();
    let live = stream::unfold(live, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(announcement) => return Some((announcement, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |a: &Announcement| {
        let keep = a.rollout == rollout && a.record.seq > last_stored;
        async move { keep }
    })
    .map(|a| {
        Ok(Event::default()
            .event("transition")
            .id(a.record.seq.to_string())
            .data(data(&a.rollout, &a.record)))
    });
    let closing = closed(state.closing.clone());
    Ok(Sse::new(replay.chain(live).take_until(closing)).keep_alive(keep_alive()))
}

pub async fn watch_all(
    State(state): State<ApiState>,
    _caller: Caller,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let live = state.handle.subscribe();
    let stream = stream::unfold(live, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(a) => return Some((a, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .map(|a: Announcement| {
        Ok(Event::default()
            .event("transition")
            .id(format!("{}/{}", a.rollout, a.record.seq))
            .data(data(&a.rollout, &a.record)))
    });
    Sse::new(stream.take_until(closed(state.closing.clone()))).keep_alive(keep_alive())
}

/// Completes when the process shuts down, ending the stream it bounds.
async fn closed(mut closing: tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}
