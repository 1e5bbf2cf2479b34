//! What every event goes through before the batcher sees it, whether it came on a stream or by
//! Publish: the size limit, the wire validation shared with the agent, and ownership.

use kanade_shared::{
    pb, telemetry,
    wire::{self, WireError},
};
use prost::Message;

use crate::{metrics::reject, store::RunWrite};

/// Why an event was refused: a reason class for metrics and words for the agent.
pub struct Rejection {
    pub class: &'static str,
    pub reason: String,
}

/// Validates one wire event for `pc_id` (the stream's, or the caller's identity, when there is
/// one); returns the write it asks for and its encoded size.
pub fn admit(
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
    // The wire conversion checked the id; this only reads it back.
    let write = RunWrite::from_event(event.body)
        .expect("a valid event's result_id is a UUID")
        .with_trace_context(event.trace_context.iter());
    Ok((write, size))
}

/// The span of one event, continuing the trace its agent carried. Only while traces are
/// exported: a span per event is the one per-event cost tracing would add, so without an
/// endpoint there is none (batch and database spans, one per batch, stay).
pub fn event_span(event: &pb::Event) -> tracing::Span {
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
