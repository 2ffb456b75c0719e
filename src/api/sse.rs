//! Live transitions as server-sent events.
//!
//! `GET /api/v1/rollouts/{id}/watch` streams one rollout's transitions as `transition` events
//! whose id is the event's sequence number: a client that reconnects with `Last-Event-ID: N`
//! first gets every event after N from the store, then the live ones, with nothing missed and
//! nothing twice — also when the client is too slow for the live broadcast (it then reads what it
//! missed from the store). `GET /api/v1/watch` streams every rollout's (ids `<rollout>/<seq>`, not
//! resumable; a client that falls behind gets `lagged` and the stream ends). Comments keep idle
//! connections alive.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use std::collections::VecDeque;

use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio::sync::broadcast;

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

/// The sequence number after which a client resumes: `Last-Event-ID`, when it sent one.
fn resume_after(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID must be the sequence number of an event of this rollout",
            )
        })
}

fn transition(rollout: &str, record: &EventRecord) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("transition")
        .id(record.seq.to_string())
        .data(data(rollout, record)))
}

/// What one rollout's stream has to do: the events not yet sent, in order, and where it is.
struct Follow {
    live: broadcast::Receiver<Announcement>,
    store: std::sync::Arc<crate::store::Store>,
    rollout: String,
    sent: u64,
    due: VecDeque<EventRecord>,
}

impl Follow {
    /// The next event to send: what is due, else the next live one of this rollout. A receiver
    /// that fell behind the broadcast reads what it missed from the store, so a slow client
    /// misses nothing and gets nothing twice.
    async fn next(mut self) -> Option<(EventRecord, Follow)> {
        loop {
            if let Some(record) = self.due.pop_front() {
                if record.seq > self.sent {
                    self.sent = record.seq;
                    return Some((record, self));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(a) if a.rollout == self.rollout => self.due.push_back(a.record),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let missed = self.store.events(&self.rollout).ok()?;
                    self.due
                        .extend(missed.into_iter().filter(|e| e.seq > self.sent));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
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
    let after = resume_after(&headers)?;
    let due: VecDeque<EventRecord> = state
        .store
        .events(&id)?
        .into_iter()
        .filter(|e| e.seq > after)
        .collect();
    let follow = Follow {
        live,
        store: state.store.clone(),
        rollout: id.clone(),
        sent: after,
        due,
    };
    let stream = stream::unfold(follow, Follow::next).map(move |record| transition(&id, &record));
    let closing = closed(state.closing.clone());
    Ok(Sse::new(stream.take_until(closing)).keep_alive(keep_alive()))
}

/// Every rollout's transitions as they are committed. A client too slow for the broadcast gets a
/// `lagged` event (with how many it missed) and the stream ends: it re-reads the state and
/// watches again (the dashboard's index reloads).
pub async fn watch_all(
    State(state): State<ApiState>,
    _caller: Caller,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let live = state.handle.subscribe();
    let stream = stream::unfold(Some(live), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(a) => Some((
                Event::default()
                    .event("transition")
                    .id(format!("{}/{}", a.rollout, a.record.seq))
                    .data(data(&a.rollout, &a.record)),
                Some(rx),
            )),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                Event::default()
                    .event("lagged")
                    .data(json!({ "missed": missed }).to_string()),
                None,
            )),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    })
    .map(Ok);
    Sse::new(stream.take_until(closed(state.closing.clone()))).keep_alive(keep_alive())
}

/// Completes when the process shuts down, ending the stream it bounds.
async fn closed(mut closing: tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::EventKind;
    use crate::domain::rollout::Rollout;
    use crate::domain::time::Timestamp;
    use crate::store::tests::record;
    use crate::store::{Attached, DEFAULT_LOCK_WAIT, PlanRecord, Store};

    const PLAN: &str = include_str!("../../plans/windows-baseline.toml");

    /// A watcher too slow for the broadcast reads what it missed from the store: every event
    /// once, in order.
    #[tokio::test]
    async fn a_watcher_that_lags_catches_up_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), DEFAULT_LOCK_WAIT).unwrap());
        let plan = crate::adapters::parse_plan("w", PLAN).unwrap();
        let rollout = Rollout::new("w-1", &plan, "alice", Timestamp::from_millis(1));
        let start = record(
            &rollout,
            EventKind::Start {
                plan_hash: plan.hash.clone(),
            },
        );
        let plan_record = PlanRecord {
            path: "w.toml".into(),
            source: PLAN.into(),
            hash: plan.hash.clone(),
        };
        store.create(&rollout, start, &plan_record, &[]).unwrap();
        let (sender, live) = broadcast::channel(1);
        for _ in 0..3 {
            let current = store.rollout("w-1").unwrap();
            let next = current.rollout.clone();
            let committed = store
                .commit(
                    &current,
                    &next,
                    record(&next, EventKind::Tick),
                    Attached::default(),
                )
                .unwrap();
            let _ = sender.send(Announcement {
                rollout: "w-1".into(),
                record: committed,
                status: next.status,
            });
        }
        let first = store.events("w-1").unwrap().into_iter().take(1).collect();
        let mut follow = Follow {
            live,
            store,
            rollout: "w-1".into(),
            sent: 0,
            due: first,
        };
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (record, next) = follow.next().await.expect("an event");
            seen.push(record.seq);
            follow = next;
        }
        assert_eq!(seen, [1, 2, 3, 4]);
    }
}
