//! The Ingest gRPC service: thin translation between the wire and the batcher.
//!
//! `Stream` is the agents' channel. Its first message must be `Hello`; ingest answers `Welcome`
//! with the stream's limits, then validates every event through the shared wire conversions,
//! rejects what can never be accepted (with a reason a person can act on) and hands the rest to
//! the batcher, which acks after commit. The per-stream window is enforced by backpressure: the
//! handler stops reading while the stream holds `max_unacked` events (or bytes) unanswered.
//!
//! A stream ends cleanly when the client closes its side, when it reaches its maximum age (after
//! its acks, so the agent reconnects to whichever replica the balancer picks), and with
//! UNAVAILABLE when ingest shuts down or the client stops reading its acks.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use kanade_shared::{
    limits, pb, telemetry,
    wire::{self, WireError},
};
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth,
    batcher::{Outcome, Reply, Submission},
    health::Readiness,
    metrics::{Metrics, reject},
    outbound::{self, Next, StreamSink},
    store::RunWrite,
};

/// Limits and timings of the Ingest service.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_streams: usize,
    pub max_streams_per_pc: usize,
    pub max_stream_age: Duration,
    pub hello_timeout: Duration,
    pub publish_timeout: Duration,
    pub max_event_bytes: usize,
    pub max_unacked: u32,
    pub max_unacked_bytes: u64,
}

/// Messages queued towards one agent before it counts as not reading.
const OUTBOUND_CAPACITY: usize = 256;

/// Counts open streams, overall and per endpoint.
#[derive(Debug, Default)]
struct StreamCounts {
    total: usize,
    per_pc: HashMap<String, usize>,
}

/// Releases a stream's place in [`StreamCounts`] when the stream ends, however it ends.
struct StreamSlot {
    counts: Arc<Mutex<StreamCounts>>,
    pc_id: Option<String>,
    metrics: Arc<Metrics>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.metrics.open_streams.dec();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(pc) = &self.pc_id
            && let Some(n) = counts.per_pc.get_mut(pc)
        {
            *n -= 1;
            if *n == 0 {
                counts.per_pc.remove(pc);
            }
        }
    }
}

/// The Ingest service.
#[derive(Clone)]
pub struct IngestService {
    batcher: mpsc::Sender<Submission>,
    metrics: Arc<Metrics>,
    limits: Arc<IngestLimits>,
    counts: Arc<Mutex<StreamCounts>>,
    readiness: Readiness,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl IngestService {
    pub fn new(
        batcher: mpsc::Sender<Submission>,
        metrics: Arc<Metrics>,
        limits: IngestLimits,
        readiness: Readiness,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> IngestService {
        IngestService {
            batcher,
            metrics,
            limits: Arc::new(limits),
            counts: Default::default(),
            readiness,
            shutdown,
            tasks,
        }
    }

    fn open_slot(&self) -> Result<StreamSlot, Status> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.limits.max_streams {
            return Err(Status::resource_exhausted(format!(
                "this ingest replica already serves {} streams (--max-streams); retry later or \
                 on another replica",
                self.limits.max_streams
            )));
        }
        counts.total += 1;
        self.metrics.open_streams.inc();
        Ok(StreamSlot {
            counts: self.counts.clone(),
            pc_id: None,
            metrics: self.metrics.clone(),
        })
    }

    fn claim_pc(&self, slot: &mut StreamSlot, pc_id: &str) -> Result<(), Status> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.per_pc.entry(pc_id.to_string()).or_insert(0);
        if *n >= self.limits.max_streams_per_pc {
            return Err(Status::resource_exhausted(format!(
                "pc_id {pc_id:?} already has {} open streams (--max-streams-per-pc); close the \
                 others or check for two agents configured with the same pc_id",
                self.limits.max_streams_per_pc
            )));
        }
        *n += 1;
        slot.pc_id = Some(pc_id.to_string());
        Ok(())
    }

    fn welcome(&self) -> pb::ingest_message::Msg {
        pb::ingest_message::Msg::Welcome(pb::Welcome {
            max_unacked: self.limits.max_unacked,
            max_unacked_bytes: self.limits.max_unacked_bytes,
            max_event_bytes: self.limits.max_event_bytes as u64,
        })
    }
}

/// Why an event was refused: a reason class for metrics and words for the agent.
struct Rejection {
    class: &'static str,
    reason: String,
}

/// Validates one wire event for `pc_id` (the stream's, when there is one).
fn admit(
    event: pb::Event,
    pc_id: Option<&str>,
    max_event_bytes: usize,
) -> Result<(RunWrite, usize), Rejection> {
    let size = event.encoded_len();
    if size > max_event_bytes {
        return Err(Rejection {
            class: reject::TOO_LARGE,
            reason: format!(
                "event is {size} bytes, larger than this ingest's limit of {max_event_bytes} \
                 bytes (cut the outputs further)"
            ),
        });
    }
    let invalid = |e: WireError| Rejection {
        class: reject::INVALID,
        reason: format!("invalid event: {e}"),
    };
    let event = wire::Event::try_from(event).map_err(invalid)?;
    if let Some(pc_id) = pc_id
        && event.body.pc_id() != pc_id
    {
        return Err(Rejection {
            class: reject::WRONG_PC,
            reason: format!(
                "event pc_id {:?} does not match this stream's pc_id {pc_id:?}; an agent may \
                 only report its own runs",
                event.body.pc_id()
            ),
        });
    }
    let write = RunWrite::from_event(&event.body).ok_or_else(|| {
        invalid(WireError::NotAUuid {
            field: "result_id",
            value: event.body.result_id().to_string(),
        })
    })?;
    Ok((write, size))
}

/// The span of one event, continuing the trace its agent carried. Only while traces are
/// exported: a span per event is the one per-event cost tracing would add, so without an
/// endpoint there is none (batch and database spans, one per batch, stay).
fn event_span(event: &pb::Event) -> tracing::Span {
    if !telemetry::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "ingest.event",
        seq = event.seq,
        trace_id = tracing::field::Empty,
    );
    telemetry::continue_trace(
        &span,
        event
            .trace_context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    span
}

fn hello_pc_id(hello: &pb::Hello) -> Result<String, Status> {
    if hello.pc_id.is_empty() {
        return Err(Status::invalid_argument("Hello.pc_id must not be empty"));
    }
    if hello.pc_id.len() > limits::MAX_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "Hello.pc_id is {} bytes long, at most {} are allowed",
            hello.pc_id.len(),
            limits::MAX_ID_BYTES
        )));
    }
    Ok(hello.pc_id.clone())
}

/// How long the caller of a unary RPC is willing to wait: its `grpc-timeout`, else `default`.
fn caller_deadline<T>(request: &Request<T>, default: Duration) -> Duration {
    let Some(value) = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
    else {
        return default;
    };
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    let Ok(n) = digits.parse::<u64>() else {
        return default;
    };
    let given = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return default,
    };
    given.min(default)
}

/// How a stream whose client stopped reading its acks ends (after the acks already queued).
fn acks_not_read() -> Status {
    Status::unavailable("acks were not read in time; reconnect and resend what is unacknowledged")
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<pb::IngestMessage, Status>> + Send>>;

/// Why a stream handler stopped reading.
enum End {
    /// The client closed its side or went away.
    ClientDone,
    /// The stream reached its maximum age.
    Aged,
    /// Ingest is shutting down.
    Shutdown,
    /// The client broke the protocol.
    Violation(Status),
    /// The client does not read its acks; the outbound side ends the stream.
    Overflow,
}

struct StreamHandler {
    service: IngestService,
    pc_id: String,
    sink: Arc<StreamSink>,
    overflow: CancellationToken,
    window_count: Arc<Semaphore>,
    window_bytes: Arc<Semaphore>,
    max_window_bytes: u32,
    /// Shared with the response stream: a stream counts against the limits until both its
    /// reading and its writing side are gone, so a client that never reads its acks holds its
    /// slot (and the memory behind it) within `--max-streams-per-pc`.
    _slot: Arc<StreamSlot>,
}

impl StreamHandler {
    async fn run(self, mut inbound: Streaming<pb::AgentMessage>) {
        let age = self
            .service
            .limits
            .max_stream_age
            .mul_f64(0.9 + 0.2 * fastrand::f64());
        let aged = tokio::time::sleep(age);
        tokio::pin!(aged);
        let end = loop {
            let stop = async {
                tokio::select! {
                    _ = self.service.shutdown.cancelled() => End::Shutdown,
                    _ = &mut aged => End::Aged,
                    _ = self.overflow.cancelled() => End::Overflow,
                }
            };
            let next = async {
                let count = self
                    .window_count
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("window semaphore is never closed");
                (count, inbound.message().await)
            };
            let (count_permit, message) = tokio::select! {
                end = stop => break end,
                next = next => next,
            };
            let msg = match message {
                Ok(Some(pb::AgentMessage { msg: Some(msg) })) => msg,
                Ok(Some(pb::AgentMessage { msg: None })) => {
                    break End::Violation(Status::invalid_argument(
                        "AgentMessage must carry a Hello or an Event",
                    ));
                }
                Ok(None) => break End::ClientDone,
                Err(status) => {
                    // A message over the decoding limit lands here too: answer with the
                    // reason, so the agent can tell a refusal from a network failure.
                    tracing::info!(pc_id = %self.pc_id, %status, "stream read failed");
                    break End::Violation(status);
                }
            };
            let event = match msg {
                pb::agent_message::Msg::Event(event) => event,
                pb::agent_message::Msg::Hello(_) => {
                    break End::Violation(Status::invalid_argument(
                        "Hello may only be the first message of a stream",
                    ));
                }
            };
            let seq = event.seq;
            self.service.metrics.events_received.inc();
            let span = event_span(&event);
            match admit(
                event,
                Some(&self.pc_id),
                self.service.limits.max_event_bytes,
            ) {
                Err(Rejection { class, reason }) => {
                    tracing::info!(parent: &span, pc_id = %self.pc_id, seq, %reason, "event rejected");
                    self.service.metrics.rejected(class);
                    self.sink.reject(seq, reason);
                }
                Ok((write, bytes)) => {
                    tracing::debug!(parent: &span, result_id = %write.result_id, "event accepted");
                    let wanted = u32::try_from(bytes)
                        .unwrap_or(u32::MAX)
                        .min(self.max_window_bytes);
                    let bytes_permit = self
                        .window_bytes
                        .clone()
                        .acquire_many_owned(wanted)
                        .await
                        .expect("window semaphore is never closed");
                    let submission = Submission {
                        write,
                        bytes,
                        reply: Reply::Stream {
                            sink: self.sink.clone(),
                            seq,
                            permits: vec![count_permit, bytes_permit],
                        },
                        span,
                    };
                    if self.service.batcher.send(submission).await.is_err() {
                        break End::Shutdown;
                    }
                }
            }
        };
        self.finish(end).await;
    }

    /// Waits until every event this stream handed over is answered, then ends the stream.
    async fn finish(self, end: End) {
        let status = match end {
            End::Overflow => return,
            End::Violation(status) => Some(status),
            End::Shutdown => Some(Status::unavailable(
                "ingest is shutting down; reconnect to resend anything unacknowledged",
            )),
            End::ClientDone | End::Aged => None,
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

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    type StreamStream = OutboundStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<OutboundStream>, Status> {
        if self.readiness.is_draining() {
            return Err(Status::unavailable("ingest is shutting down"));
        }
        let token_pc_id = auth::writer_pc_id(&request)?;
        let mut slot = self.open_slot()?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Hello within {:?}; the first message of a stream must be Hello",
                    self.limits.hello_timeout
                ))
            })??;
        let hello = match first {
            Some(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(hello)),
            }) => hello,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be Hello",
                ));
            }
            None => return Err(Status::cancelled("stream closed before Hello")),
        };
        let pc_id = hello_pc_id(&hello)?;
        if let Some(allowed) = token_pc_id
            && allowed != pc_id
        {
            return Err(Status::permission_denied(format!(
                "this caller may only write for pc_id {allowed:?} (its token or client certificate \
                 says so), but Hello says {pc_id:?}"
            )));
        }
        self.claim_pc(&mut slot, &pc_id)?;
        let slot = Arc::new(slot);
        tracing::info!(%pc_id, agent_version = %hello.agent_version, "agent stream opened");

        let overflow = CancellationToken::new();
        let (sink, outbound) = outbound::channel(OUTBOUND_CAPACITY, overflow.clone());
        sink.send(self.welcome());
        let max_window_bytes = u32::try_from(self.limits.max_unacked_bytes).unwrap_or(u32::MAX);
        let handler = StreamHandler {
            service: self.clone(),
            pc_id,
            sink: Arc::new(sink),
            overflow: overflow.clone(),
            window_count: Arc::new(Semaphore::new(self.limits.max_unacked as usize)),
            window_bytes: Arc::new(Semaphore::new(max_window_bytes as usize)),
            max_window_bytes,
            _slot: slot.clone(),
        };
        self.tasks.spawn(handler.run(inbound));

        let responses = async_stream::stream! {
            let _slot = slot;
            loop {
                tokio::select! {
                    biased;
                    next = outbound.next() => match next {
                        Next::Message(msg) => yield Ok(pb::IngestMessage { msg: Some(msg) }),
                        Next::End(ending) => {
                            if let Some(status) = ending {
                                yield Err(status);
                            } else if overflow.is_cancelled() {
                                yield Err(acks_not_read());
                            }
                            break;
                        }
                    },
                    _ = overflow.cancelled() => {
                        yield Err(acks_not_read());
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(responses)))
    }

    async fn publish(
        &self,
        request: Request<pb::Event>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        if self.readiness.is_draining() {
            return Err(Status::unavailable("ingest is shutting down"));
        }
        let deadline = caller_deadline(&request, self.limits.publish_timeout);
        let token_pc_id = auth::writer_pc_id(&request)?;
        let event = request.into_inner();
        self.metrics.events_received.inc();
        // Without a carried context the event joins the call's own trace (its traceparent).
        let span = if event.trace_context.is_empty() {
            tracing::info_span!(
                "ingest.event",
                seq = event.seq,
                trace_id = tracing::field::Empty
            )
        } else {
            event_span(&event)
        };
        let (write, bytes) = admit(event, token_pc_id.as_deref(), self.limits.max_event_bytes)
            .map_err(|rejection| {
                if rejection.class == reject::WRONG_PC {
                    self.metrics.rejected(rejection.class);
                    return Status::permission_denied(rejection.reason);
                }
                self.metrics.rejected(rejection.class);
                Status::invalid_argument(rejection.reason)
            })?;
        let result_id = write.result_id.hyphenated().to_string();
        tracing::debug!(parent: &span, %result_id, "event accepted");
        let (tx, rx) = oneshot::channel();
        let submission = Submission {
            write,
            bytes,
            reply: Reply::Once(tx),
            span,
        };
        let answered = tokio::time::timeout(deadline, async {
            self.batcher
                .send(submission)
                .await
                .map_err(|_| Status::unavailable("ingest is shutting down"))?;
            rx.await
                .map_err(|_| Status::unavailable("ingest stopped before the commit"))
        })
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "the event was not committed within {deadline:?} (database unavailable?); \
                 retrying is safe"
            ))
        })??;
        match answered {
            Outcome::Committed => Ok(Response::new(pb::PublishResponse { result_id })),
            Outcome::NotOwner => Err(Status::permission_denied(
                answered.reject_reason(&result_id).unwrap_or_default(),
            )),
            Outcome::Refused(_) => Err(Status::invalid_argument(
                answered.reject_reason(&result_id).unwrap_or_default(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_shortens_the_default_deadline() {
        let default = Duration::from_secs(30);
        let mut request = Request::new(());
        assert_eq!(caller_deadline(&request, default), default);
        for (header, expected) in [
            ("2S", Duration::from_secs(2)),
            ("1500m", Duration::from_millis(1500)),
            ("5M", default),
            ("garbage", default),
        ] {
            request
                .metadata_mut()
                .insert("grpc-timeout", header.parse().unwrap());
            assert_eq!(caller_deadline(&request, default), expected, "{header}");
        }
    }
}
