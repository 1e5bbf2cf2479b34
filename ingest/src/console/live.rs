//! Live pages (SPEC §13): `/events` is a Server-Sent Events stream that says `changed` when runs
//! were committed — by this replica or, through PostgreSQL `NOTIFY`, by any other. The page's
//! script then re-reads its own URL and swaps in the fresh view. Announcements are coalesced: at
//! most one event per [`COALESCE`], and announcements that arrive meanwhile fold into the next
//! (nothing queues behind a slow page).
//!
//! `/runs/{result_id}/live` carries a running run's output to its page (SPEC §14): the same
//! watcher as `Control/TailExecution` ([`crate::control::Tails`]), as `chunk` events (JSON:
//! `stream`, `offset`, `length`, `data`), `notice` events (`connected`, `message`) and one
//! `finished` when the run has its result (the page then re-reads its final view). The script
//! writes every text as text, never as markup.
//!
//! Both end when the token the session was signed in with leaves the tokens file.

use std::{convert::Infallible, time::Duration};

use axum::{
    Extension,
    extract::{Path, State},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use kanade_shared::pb;
use serde_json::json;

use super::{Console, PageError, not_yet, parse_result_id, session::Visitor};
use crate::{
    auth,
    control::{TailError, TailEvent},
};

/// The shortest gap between two events on one page.
const COALESCE: Duration = Duration::from_millis(500);
/// With a read replica, a change is announced once more this much later: the replica may not
/// have replayed the commit when the page first re-reads.
const REPLICA_CATCH_UP: Duration = Duration::from_secs(1);
/// A comment line this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub async fn events(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
) -> impl axum::response::IntoResponse {
    let mut held = visitor.held;
    let mut changes = console.inner.changes.follow();
    let catch_up = console.inner.config.read_replica;
    let stop = console.inner.stop.clone();
    let stream = async_stream::stream! {
        let withdrawn = auth::withdrawn(&mut held);
        tokio::pin!(withdrawn);
        // Tells the page the stream is open (its script shows "live" and re-reads once: what
        // was committed between rendering the page and opening this stream, or while the
        // browser was reconnecting, was announced to nobody).
        yield Ok::<_, Infallible>(Event::default().event("ready").data("ready"));
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
                // Signed out by the tokens file: the page's next request meets the sign-in.
                _ = &mut withdrawn => return,
            }
            changes.borrow_and_update();
            yield Ok(Event::default().event("changed").data("changed"));
            tokio::time::sleep(COALESCE).await;
            if catch_up && !changes.has_changed().unwrap_or(false) {
                tokio::time::sleep(REPLICA_CATCH_UP.saturating_sub(COALESCE)).await;
                yield Ok(Event::default().event("changed").data("changed"));
            }
        }
    };
    (
        // Proxies that buffer responses (nginx) would hold the events back.
        [("x-accel-buffering", "no")],
        Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
}

/// `/runs/{result_id}/live`: the run's output as it is written, then `finished`.
pub async fn run_output(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    Path(result_id): Path<String>,
) -> Result<Response, PageError> {
    let mut held = visitor.held;
    let id = parse_result_id(&result_id)?;
    let inner = &console.inner;
    let mut watcher = inner
        .tails
        .watch(&result_id)
        .await
        .map_err(|err| match err {
            TailError::NotFound(_) => not_yet(id, inner.config.read_replica),
            TailError::TooMany { .. } => PageError::Unavailable(err.to_string()),
            TailError::NotAnId(_) => PageError::BadRequest(err.to_string()),
            TailError::Store(err) => PageError::from(err),
        })?;
    let stop = inner.stop.clone();
    let stream = async_stream::stream! {
        let withdrawn = auth::withdrawn(&mut held);
        tokio::pin!(withdrawn);
        loop {
            let event = tokio::select! {
                event = watcher.next() => match event {
                    Some(event) => event,
                    None => return,
                },
                _ = stop.cancelled() => return,
                _ = &mut withdrawn => return,
            };
            yield Ok::<_, Infallible>(match event {
                TailEvent::Chunk(chunk) => {
                    let stream = match chunk.stream() {
                        pb::OutputStream::Stderr => "stderr",
                        _ => "stdout",
                    };
                    Event::default().event("chunk").data(json!({
                        "stream": stream,
                        "offset": chunk.offset,
                        "length": chunk.length,
                        "data": chunk.data,
                    }).to_string())
                }
                TailEvent::Notice { agent_connected, message } => Event::default()
                    .event("notice")
                    .data(json!({"connected": agent_connected, "message": message}).to_string()),
                TailEvent::Finished(_) => Event::default().event("finished").data("finished"),
            });
        }
    };
    Ok((
        [("x-accel-buffering", "no")],
        Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
        .into_response())
}
