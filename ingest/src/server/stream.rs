//! One agent stream after its Hello: read a message, turn it into one [`Inbound`] value, handle
//! it; a new message from agents is one variant and one arm.
//!
//! The per-stream window is enforced by backpressure: the handler takes a count permit and a
//! byte permit for each event before it submits it, and the batcher gives both back when it
//! answers the event, so a stream holding `max_unacked` events (or bytes) unanswered is not read
//! further (the one event waiting for its permits is charged to the memory budget). Messages
//! that are not events (status reports, live output) need no permit: they are handled as they
//! arrive, behind the window only when an agent sent more events than its window (one that
//! honours Welcome never does).
//!
//! A stream ends cleanly when the client closes its side or when it reaches its maximum age
//! (after its acks, so the agent reconnects to whichever replica the balancer picks); with
//! UNAVAILABLE when ingest shuts down or the client stops reading its acks; with the status of
//! the violation when the client breaks the protocol.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use kanade_shared::{limits, pb};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::{
    IngestService,
    admission::{Rejection, admit, event_span},
    registry::Registration,
};
use crate::{
    auth::{self, HeldToken},
    batcher::{Reply, Submission},
    budget::{Charge, Credits},
    outbound::StreamSink,
    presence::StreamInfo,
    store::{AgentReport, cut, storable},
};

/// What the agent sent.
// Made and consumed once per message, on the stack: boxing the event would add an allocation per
// event to the hot path for nothing.
#[allow(clippy::large_enum_variant)]
enum Inbound {
    /// A lifecycle event to store.
    Event(pb::Event),
    /// The agent's report on itself (presence).
    Status(pb::AgentStatus),
    /// Output of a run someone watches (live output).
    Output(pb::OutputChunk),
    /// A message of a newer agent this ingest does not know: ignored, as the contract's
    /// additive messages must be.
    Unknown,
    /// Something the protocol does not allow here.
    Violation(&'static str),
    /// The client closed its side.
    Closed,
    /// Reading failed (the connection broke, or a message was over the decoding limit).
    Failed(Status),
}

impl Inbound {
    fn from_message(message: Result<Option<pb::AgentMessage>, Status>) -> Inbound {
        use pb::agent_message::Msg;
        match message {
            Ok(Some(pb::AgentMessage { msg: Some(msg) })) => match msg {
                Msg::Event(event) => Inbound::Event(event),
                Msg::Status(status) => Inbound::Status(status),
                Msg::Output(chunk) => Inbound::Output(chunk),
                Msg::Hello(_) => {
                    Inbound::Violation("Hello may only be the first message of a stream")
                }
            },
            Ok(Some(pb::AgentMessage { msg: None })) => Inbound::Unknown,
            Ok(None) => Inbound::Closed,
            Err(status) => Inbound::Failed(status),
        }
    }
}

/// A stream that carried an event this large is ended cleanly once its events are answered (the
/// agent reconnects at once): the buffer the gRPC decoder grew to hold it belongs to the stream
/// and would otherwise stay allocated for the stream's life, so many streams that each once
/// carried a large output would pin memory outside the budget.
pub const RECYCLE_AFTER_EVENT_BYTES: usize = 64 * 1024;

/// Why a stream handler stopped reading.
enum End {
    /// The stream carried a large event: end it cleanly to free its decode buffer.
    Recycle,
    /// The client closed its side or went away.
    ClientDone,
    /// The stream reached its maximum age.
    Aged,
    /// Ingest is shutting down.
    Shutdown,
    /// The client broke the protocol.
    Violation(Status),
    /// The token the stream was admitted with was withdrawn from the tokens file.
    Withdrawn,
    /// The client does not read its acks; the outbound side ends the stream.
    Overflow,
}

/// Reads one stream until it ends.
pub(super) struct StreamHandler {
    /// Handles to the batcher, limits, metrics and the shutdown signal.
    pub service: IngestService,
    /// The endpoint this stream speaks for (its Hello, checked against its credentials).
    pub pc_id: String,
    /// The stream as presence knows it.
    pub stream: StreamInfo,
    /// Where the stream's answers go (shared with the batcher's replies).
    pub sink: Arc<StreamSink>,
    /// Cancelled when the client stopped reading its answers.
    pub overflow: CancellationToken,
    /// The window in events and in bytes; permits travel with each event to the batcher.
    pub window_count: Arc<Semaphore>,
    pub window_bytes: Arc<Semaphore>,
    pub max_window_bytes: u32,
    /// The memory-budget charges of this stream's messages, one per message read.
    pub credits: Option<Arc<Credits>>,
    /// The token the stream was admitted with (none under mTLS or without tokens): the stream
    /// ends when it is withdrawn.
    pub held: Option<HeldToken>,
    /// Shared with the response stream: the stream keeps its place in the registry until both
    /// its reading and its writing side are gone.
    pub _registration: Arc<Registration>,
}

impl StreamHandler {
    pub async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>) {
        let mut held = self.held.take();
        let age = self
            .service
            .limits
            .max_stream_age
            .mul_f64(0.9 + 0.2 * fastrand::f64());
        let aged = tokio::time::sleep(age);
        tokio::pin!(aged);
        // Made once for the stream's life, like `aged`: not again for every message read.
        let withdrawn = auth::withdrawn(&mut held);
        tokio::pin!(withdrawn);
        let end = loop {
            let stop = async {
                tokio::select! {
                    _ = self.service.shutdown.cancelled() => End::Shutdown,
                    _ = &mut aged => End::Aged,
                    _ = self.overflow.cancelled() => End::Overflow,
                    _ = &mut withdrawn => End::Withdrawn,
                }
            };
            let message = tokio::select! {
                end = stop => break end,
                message = inbound.message() => message,
            };
            // Each message read was charged to the memory budget: the charge goes with it.
            let charge = match &message {
                Ok(Some(_)) => self.credits.as_ref().and_then(|c| c.take()),
                _ => None,
            };
            match Inbound::from_message(message) {
                Inbound::Event(event) => {
                    let large = event.encoded_len() >= RECYCLE_AFTER_EVENT_BYTES;
                    if let Err(end) = self.on_event(event, charge).await {
                        break end;
                    }
                    if large {
                        break End::Recycle;
                    }
                }
                Inbound::Status(status) => self.on_status(status),
                Inbound::Output(chunk) => self.service.tails.from_agent(&self.pc_id, chunk),
                Inbound::Unknown => {
                    tracing::debug!(pc_id = %self.pc_id, "ignored a message this ingest does not know");
                }
                Inbound::Violation(why) => break End::Violation(Status::invalid_argument(why)),
                Inbound::Closed => break End::ClientDone,
                Inbound::Failed(status) => {
                    // A message over the decoding limit lands here too: answer with the
                    // reason, so the agent can tell a refusal from a network failure.
                    tracing::info!(pc_id = %self.pc_id, %status, "stream read failed");
                    break End::Violation(status);
                }
            }
        };
        self.finish(end).await;
    }

    /// Rejects an event that can never be accepted, or hands it to the batcher with its window
    /// permits (waiting for them while the window is full). `Err` when the stream must end.
    async fn on_event(&self, event: pb::Event, charge: Option<Charge>) -> Result<(), End> {
        let read_at = std::time::Instant::now();
        let seq = event.seq;
        let metrics = &self.service.metrics;
        metrics.events_received.inc();
        let span = event_span(&event);
        match admit(
            event,
            Some(&self.pc_id),
            self.service.limits.max_event_bytes,
        ) {
            Err(Rejection { class, reason }) => {
                tracing::info!(parent: &span, pc_id = %self.pc_id, seq, %reason, "event rejected");
                metrics.rejected(class);
                self.sink.reject(seq, reason);
                Ok(())
            }
            Ok((write, bytes)) => {
                tracing::debug!(parent: &span, result_id = %write.result_id, "event accepted");
                let count_permit = self.window_permit().await?;
                let wanted = u32::try_from(bytes)
                    .unwrap_or(u32::MAX)
                    .min(self.max_window_bytes);
                let bytes_permit = self
                    .window_bytes
                    .clone()
                    .acquire_many_owned(wanted)
                    .await
                    .expect("window semaphore is never closed");
                let submission = Box::new(Submission {
                    write,
                    bytes,
                    reply: Reply::Stream {
                        sink: self.sink.clone(),
                        seq,
                        permits: [count_permit, bytes_permit],
                    },
                    charge,
                    span,
                    read_at,
                });
                self.service
                    .batcher
                    .send(submission)
                    .await
                    .map_err(|_| End::Shutdown)
            }
        }
    }

    /// One event's place in the window, once the window has room (or the stream must end).
    async fn window_permit(&self) -> Result<OwnedSemaphorePermit, End> {
        let permit = self.window_count.clone().acquire_owned();
        tokio::select! {
            permit = permit => Ok(permit.expect("window semaphore is never closed")),
            _ = self.service.shutdown.cancelled() => Err(End::Shutdown),
            _ = self.overflow.cancelled() => Err(End::Overflow),
        }
    }

    /// Keeps the agent's report as its endpoint's presence.
    fn on_status(&self, status: pb::AgentStatus) {
        // Shown, not kept whole: a report's texts are cut like ids are.
        let text = |mut s: String| {
            cut(&mut s, limits::MAX_ID_BYTES * 2);
            storable(s)
        };
        let report = AgentReport {
            at: Utc::now().trunc_subsecs(6),
            outbox_depth: status.outbox_depth,
            outbox_bytes: status.outbox_bytes,
            oldest_pending_at: status
                .oldest_pending_at
                .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
                .map(|t| t.trunc_subsecs(6)),
            dead_letters: status.dead_letters,
            running_runs: status.running_runs,
            hostname: text(status.hostname),
            os: text(status.os),
        };
        self.service.presence.reported(&self.stream, report);
    }

    /// Waits until every event this stream handed over is answered, then ends the stream.
    async fn finish(self, end: End) {
        // Whatever output this stream carried stops with it.
        self.service.tails.on_stream_ended(&self.pc_id, &self.sink);
        let status = match end {
            End::Overflow => return,
            End::Violation(status) => Some(status),
            End::Withdrawn => Some(auth::withdrawn_status()),
            End::Shutdown => Some(Status::unavailable(
                "ingest is shutting down; reconnect to resend anything unacknowledged",
            )),
            End::ClientDone | End::Aged | End::Recycle => None,
        };
        let all = self.service.limits.max_unacked;
        let drained = async {
            let _ = self.window_count.acquire_many(all).await;
        };
        tokio::select! {
            _ = drained => {}
            _ = self.overflow.cancelled() => return,
        }
        // Sent once every queued message is out: the batcher may still hold an Ack for us.
        self.sink.end_with(status);
        tracing::debug!(pc_id = %self.pc_id, "stream finished");
    }
}
