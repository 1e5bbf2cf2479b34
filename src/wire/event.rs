use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A run is about to start. Committed to the agent's outbox before the process is spawned.
///
/// The first seven fields, their order and their types are those of the original system and must
/// not change: JSON written by either system reads in the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStarted {
    /// Agent-minted id shared with the run's [`ExecResult`]; the upsert key.
    pub result_id: String,
    /// The request that caused the run (opaque token, not necessarily a UUID).
    pub request_id: String,
    /// The deployment or schedule firing (opaque, usually a UUID).
    pub exec_id: String,
    /// The endpoint reporting.
    pub pc_id: String,
    /// Wall clock just before spawn; RFC 3339 in JSON.
    pub started_at: DateTime<Utc>,
    /// What is running.
    pub manifest_id: String,
    /// Pinned manifest version.
    pub version: String,
    /// The run's timeout, if it has one (Kanade's addition).
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    /// Exited with code 0.
    Succeeded,
    /// Exited with a non-zero code.
    Failed,
    /// Killed by the agent for its timeout.
    TimedOut,
    /// Ended by any other signal.
    Killed,
    /// Could not be started.
    SpawnFailed,
    /// The agent died while the run was in progress.
    Interrupted,
    /// An operator cancelled the run; the agent ended its process group.
    Cancelled,
}

impl ExecStatus {
    /// Every status, in protobuf order.
    pub const ALL: [ExecStatus; 7] = [
        ExecStatus::Succeeded,
        ExecStatus::Failed,
        ExecStatus::TimedOut,
        ExecStatus::Killed,
        ExecStatus::SpawnFailed,
        ExecStatus::Interrupted,
        ExecStatus::Cancelled,
    ];

    /// The status's name as stored in databases and written in JSON (`"timed_out"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Succeeded => "succeeded",
            ExecStatus::Failed => "failed",
            ExecStatus::TimedOut => "timed_out",
            ExecStatus::Killed => "killed",
            ExecStatus::SpawnFailed => "spawn_failed",
            ExecStatus::Interrupted => "interrupted",
            ExecStatus::Cancelled => "cancelled",
        }
    }

    /// The inverse of [`ExecStatus::as_str`].
    pub fn from_name(name: &str) -> Option<ExecStatus> {
        ExecStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A run has ended. Committed to the agent's outbox before the run is forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The run's id, as in its [`EventStarted`].
    pub result_id: String,
    pub request_id: String,
    pub exec_id: String,
    pub pc_id: String,
    pub manifest_id: String,
    pub version: String,
    pub status: ExecStatus,
    /// Absent when the process never exited by itself (killed, timed out, never spawned).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Lossy UTF-8, cut to the agent's cap (head and tail kept).
    pub stdout: String,
    pub stderr: String,
    /// Bytes cut from the middle of `stdout`.
    #[serde(default)]
    pub stdout_dropped_bytes: u64,
    #[serde(default)]
    pub stderr_dropped_bytes: u64,
    pub started_at: DateTime<Utc>,
    /// `started_at` plus the elapsed time on a monotonic clock.
    pub finished_at: DateTime<Utc>,
}

/// One lifecycle event with its delivery envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the sending agent's outbox; acks and rejects name it.
    pub seq: u64,
    pub body: EventBody,
    /// W3C trace context of the run's span.
    #[serde(default)]
    pub trace_context: BTreeMap<String, String>,
}

/// The two lifecycle events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventBody {
    Started(EventStarted),
    Result(ExecResult),
}

impl EventBody {
    /// The run this event belongs to.
    pub fn result_id(&self) -> &str {
        match self {
            EventBody::Started(s) => &s.result_id,
            EventBody::Result(r) => &r.result_id,
        }
    }

    /// The endpoint that reports this event.
    pub fn pc_id(&self) -> &str {
        match self {
            EventBody::Started(s) => &s.pc_id,
            EventBody::Result(r) => &r.pc_id,
        }
    }
}
