//! Sizes the agent and ingest must agree on. Everything that bounds wire input lives here, so the
//! validation in [`crate::wire`], the agent's output cutting and ingest's gRPC limits cannot drift
//! apart.

/// Largest encoded `Event` ingest accepts by default; the agent cuts outputs so an event fits.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Ingest's gRPC decoding limit: a little above [`MAX_EVENT_BYTES`] so that the envelope around
/// a maximal event (`AgentMessage`, field tags, lengths) still decodes.
pub const MAX_DECODING_MESSAGE_BYTES: usize = MAX_EVENT_BYTES + 64 * 1024;

/// Longest id (`result_id`, `request_id`, `exec_id`, `pc_id`, `manifest_id`, `version`), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Most entries in an event's `trace_context`.
pub const MAX_TRACE_CONTEXT_ENTRIES: usize = 16;

/// Longest key or value in an event's `trace_context`, in bytes.
pub const MAX_TRACE_CONTEXT_ENTRY_BYTES: usize = 256;

/// Default cap on each captured output stream of a run (head and tail kept).
pub const DEFAULT_OUTPUT_CAP_BYTES: usize = 1024 * 1024;

/// Outputs in an `Activity/ListExecutions` page are cut to this many bytes each.
pub const LIST_OUTPUT_BYTES: usize = 4 * 1024;

/// Default and maximum `page_size` of `Activity/ListExecutions`.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// See [`DEFAULT_PAGE_SIZE`].
pub const MAX_PAGE_SIZE: u32 = 500;

/// Default per-stream window: unacknowledged events an agent may have in flight.
pub const DEFAULT_MAX_UNACKED: u32 = 512;
/// Default per-stream window in bytes.
pub const DEFAULT_MAX_UNACKED_BYTES: u64 = 16 * 1024 * 1024;

/// Longest reason an operator may give for cancelling a run, in bytes.
pub const MAX_CANCEL_REASON_BYTES: usize = 1024;

/// Default and maximum `page_size` of `Activity/ListEndpoints`.
pub const DEFAULT_ENDPOINT_PAGE_SIZE: u32 = 100;
/// See [`DEFAULT_ENDPOINT_PAGE_SIZE`].
pub const MAX_ENDPOINT_PAGE_SIZE: u32 = 1000;

/// Live output (SPEC §14): what the agent keeps of each output stream of a running run for
/// watchers joining late (the last bytes written), in bytes.
pub const LIVE_OUTPUT_HELD_BYTES: usize = 64 * 1024;

/// Most bytes of a stream one `OutputChunk` covers; a chunk's text is at most three times
/// that (invalid bytes read as U+FFFD).
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 32 * 1024;

/// Default cap on the live output the agent sends of one run, in bytes per second (both
/// streams together); output above it is skipped (watchers see a gap).
pub const DEFAULT_TAIL_RATE_BYTES: u64 = 256 * 1024;
