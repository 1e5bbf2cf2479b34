//! The Ingest gRPC service: thin translation between the wire and the batcher.
//!
//! Rooms: [`stream`] reads one agent stream after its Hello; [`admission`] checks every event
//! (size, wire validation, ownership) whether it came on a stream or by Publish; [`registry`]
//! knows the open streams by endpoint. This module opens streams (credentials, Hello, Welcome)
//! and serves Publish.
//!
//! `Stream` is the agents' channel. Its first message must be `Hello`; ingest answers `Welcome`
//! with the stream's limits, then hands every admitted event to the batcher, which acks after
//! commit, and rejects what can never be accepted with a reason a person can act on.

mod admission;
pub mod registry;
mod stream;

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use kanade_shared::{limits, pb};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};

use self::{
    admission::{admit, event_span},
    registry::{RegistryError, StreamRegistry},
    stream::StreamHandler,
};
use crate::{
    auth,
    batcher::{Outcome, Reply, Submission},
    budget::Credits,
    control::{Cancels, Tails},
    health::Readiness,
    metrics::{Metrics, reject},
    outbound::{self, Next},
    presence::{Presence, StreamInfo},
};

/// Limits and timings of the Ingest service (the stream counts are the registry's).
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_stream_age: Duration,
    pub hello_timeout: Duration,
    pub publish_timeout: Duration,
    pub max_event_bytes: usize,
    pub max_unacked: u32,
    pub max_unacked_bytes: u64,
}

/// Messages queued towards one agent before it counts as not reading.
const OUTBOUND_CAPACITY: usize = 256;

/// The Ingest service: handles shared by every call.
#[derive(Clone)]
pub struct IngestService {
    /// Where admitted events go; answers come back through each event's [`Reply`].
    batcher: mpsc::Sender<Box<Submission>>,
    metrics: Arc<Metrics>,
    limits: Arc<IngestLimits>,
    /// Every open stream, by endpoint.
    registry: Arc<StreamRegistry>,
    /// Where agents' reports go.
    presence: Presence,
    /// Sends a new stream the pending cancels of its endpoint.
    cancels: Cancels,
    /// Where live output from agents goes, and who asks a new stream for it.
    tails: Tails,
    /// Not ready while draining: new streams and Publish calls are refused.
    readiness: Readiness,
    /// Cancelled when ingest begins shutting down: every stream handler stops reading.
    shutdown: CancellationToken,
    /// Owns the stream handlers, so shutdown can wait for each to flush its answers.
    tasks: TaskTracker,
}

/// Everything the Ingest service is built from.
pub struct IngestParts {
    pub batcher: mpsc::Sender<Box<Submission>>,
    pub metrics: Arc<Metrics>,
    pub limits: IngestLimits,
    pub registry: Arc<StreamRegistry>,
    pub presence: Presence,
    pub cancels: Cancels,
    pub tails: Tails,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl IngestService {
    pub fn new(parts: IngestParts) -> IngestService {
        IngestService {
            batcher: parts.batcher,
            metrics: parts.metrics,
            limits: Arc::new(parts.limits),
            registry: parts.registry,
            presence: parts.presence,
            cancels: parts.cancels,
            tails: parts.tails,
            readiness: parts.readiness,
            shutdown: parts.shutdown,
            tasks: parts.tasks,
        }
    }

    fn welcome(&self) -> pb::ingest_message::Msg {
        pb::ingest_message::Msg::Welcome(pb::Welcome {
            max_unacked: self.limits.max_unacked,
            max_unacked_bytes: self.limits.max_unacked_bytes,
            max_event_bytes: self.limits.max_event_bytes as u64,
            accepts_agent_status: true,
        })
    }
}

fn registry_status(err: RegistryError) -> Status {
    Status::resource_exhausted(err.to_string())
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
        let credits = request.extensions().get::<Arc<Credits>>().cloned();
        let held = request.extensions().get::<auth::HeldToken>().cloned();
        let mut registration = self.registry.open().map_err(registry_status)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Hello within {:?}; the first message of a stream must be Hello",
                    self.limits.hello_timeout
                ))
            })??;
        // Hello's own (small) budget charge: answered by being read.
        if let Some(credits) = &credits {
            drop(credits.take());
        }
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
        let overflow = CancellationToken::new();
        let (sink, outbound) =
            outbound::channel(OUTBOUND_CAPACITY, self.limits.max_unacked, overflow.clone());
        let sink = Arc::new(sink);
        let stream = StreamInfo::opened(&pc_id, &hello.agent_version);
        registration
            .claim(stream.clone(), &sink)
            .map_err(registry_status)?;
        let registration = Arc::new(registration);
        tracing::info!(%pc_id, agent_version = %hello.agent_version, stream_id = %stream.stream_id, "agent stream opened");
        sink.send(self.welcome());
        // After every Welcome: what an operator cancelled while this agent was away.
        self.cancels.on_welcome(&pc_id, &sink);
        // And the runs of this endpoint watched here: asked for on this stream.
        self.tails.on_welcome(&pc_id);
        let max_window_bytes = u32::try_from(self.limits.max_unacked_bytes).unwrap_or(u32::MAX);
        let handler = StreamHandler {
            service: self.clone(),
            pc_id,
            stream,
            sink,
            overflow: overflow.clone(),
            window_count: Arc::new(Semaphore::new(self.limits.max_unacked as usize)),
            window_bytes: Arc::new(Semaphore::new(max_window_bytes as usize)),
            max_window_bytes,
            credits,
            held,
            _registration: registration.clone(),
        };
        self.tasks.spawn(handler.run(inbound));

        let responses = async_stream::stream! {
            let _registration = registration;
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
        let read_at = std::time::Instant::now();
        let deadline = caller_deadline(&request, self.limits.publish_timeout);
        let token_pc_id = auth::writer_pc_id(&request)?;
        let charge = Credits::take_from(&request);
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
        let submission = Box::new(Submission {
            write,
            bytes,
            reply: Reply::Once(tx),
            charge,
            span,
            read_at,
        });
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
