//! Conversions between the serde structs and the generated protobuf messages.
//!
//! serde → protobuf cannot fail. protobuf → serde validates every rule of the contract (SPEC §2)
//! and normalises what has more than one spelling: `result_id` becomes the lowercase hyphenated
//! UUID form, timestamps are truncated to microseconds (what PostgreSQL stores).

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use super::{
    Event, EventBody, EventStarted, ExecResult, ExecStatus, WireError,
    validate::{check_result_id, check_trace_context},
};
use crate::pb;

/// 0001-01-01T00:00:00Z in Unix seconds.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in Unix seconds.
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A timestamp as protobuf has it (leap seconds folded into the last nanosecond).
pub fn timestamp_to_proto(at: DateTime<Utc>) -> Timestamp {
    // chrono encodes a leap second as nanos ≥ 1e9; protobuf has no leap seconds.
    let nanos = at.timestamp_subsec_nanos().min(999_999_999);
    Timestamp {
        seconds: at.timestamp(),
        nanos: nanos as i32,
    }
}

fn timestamp_from_proto(
    field: &'static str,
    at: Option<Timestamp>,
) -> Result<DateTime<Utc>, WireError> {
    let at = at.ok_or(WireError::Missing { field })?;
    let out_of_range = WireError::TimestampOutOfRange {
        field,
        seconds: at.seconds,
        nanos: at.nanos,
    };
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&at.seconds)
        || !(0..1_000_000_000).contains(&at.nanos)
    {
        return Err(out_of_range);
    }
    let micros_as_nanos = (at.nanos / 1_000) * 1_000;
    DateTime::from_timestamp(at.seconds, micros_as_nanos as u32).ok_or(out_of_range)
}

/// `result_id` checked and normalised to the lowercase hyphenated form (kept as it came when it
/// already is, as agents send it: no second string per event).
fn normalised_result_id(value: String) -> Result<String, WireError> {
    let id = check_result_id(&value)?;
    let mut buf = uuid::Uuid::encode_buffer();
    let normal = id.hyphenated().encode_lower(&mut buf);
    Ok(if *normal == *value {
        value
    } else {
        normal.to_string()
    })
}

impl From<ExecStatus> for pb::ExecStatus {
    fn from(status: ExecStatus) -> Self {
        match status {
            ExecStatus::Succeeded => pb::ExecStatus::Succeeded,
            ExecStatus::Failed => pb::ExecStatus::Failed,
            ExecStatus::TimedOut => pb::ExecStatus::TimedOut,
            ExecStatus::Killed => pb::ExecStatus::Killed,
            ExecStatus::SpawnFailed => pb::ExecStatus::SpawnFailed,
            ExecStatus::Interrupted => pb::ExecStatus::Interrupted,
            ExecStatus::Cancelled => pb::ExecStatus::Cancelled,
        }
    }
}

impl ExecStatus {
    /// Reads the protobuf enum's number; `field` names it in the error.
    pub fn from_proto(field: &'static str, value: i32) -> Result<ExecStatus, WireError> {
        match pb::ExecStatus::try_from(value) {
            Ok(pb::ExecStatus::Unspecified) => Err(WireError::Unspecified { field }),
            Ok(pb::ExecStatus::Succeeded) => Ok(ExecStatus::Succeeded),
            Ok(pb::ExecStatus::Failed) => Ok(ExecStatus::Failed),
            Ok(pb::ExecStatus::TimedOut) => Ok(ExecStatus::TimedOut),
            Ok(pb::ExecStatus::Killed) => Ok(ExecStatus::Killed),
            Ok(pb::ExecStatus::SpawnFailed) => Ok(ExecStatus::SpawnFailed),
            Ok(pb::ExecStatus::Interrupted) => Ok(ExecStatus::Interrupted),
            Ok(pb::ExecStatus::Cancelled) => Ok(ExecStatus::Cancelled),
            Err(_) => Err(WireError::UnknownEnumValue { field, value }),
        }
    }
}

impl From<EventStarted> for pb::EventStarted {
    fn from(e: EventStarted) -> Self {
        pb::EventStarted {
            result_id: e.result_id,
            request_id: e.request_id,
            exec_id: e.exec_id,
            pc_id: e.pc_id,
            started_at: Some(timestamp_to_proto(e.started_at)),
            manifest_id: e.manifest_id,
            version: e.version,
            timeout_secs: e.timeout_secs,
        }
    }
}

impl TryFrom<pb::EventStarted> for EventStarted {
    type Error = WireError;

    fn try_from(e: pb::EventStarted) -> Result<Self, WireError> {
        let started = EventStarted {
            result_id: normalised_result_id(e.result_id)?,
            request_id: e.request_id,
            exec_id: e.exec_id,
            pc_id: e.pc_id,
            started_at: timestamp_from_proto("started_at", e.started_at)?,
            manifest_id: e.manifest_id,
            version: e.version,
            timeout_secs: e.timeout_secs,
        };
        started.validate()?;
        Ok(started)
    }
}

impl From<ExecResult> for pb::ExecResult {
    fn from(r: ExecResult) -> Self {
        pb::ExecResult {
            result_id: r.result_id,
            request_id: r.request_id,
            exec_id: r.exec_id,
            pc_id: r.pc_id,
            manifest_id: r.manifest_id,
            version: r.version,
            status: pb::ExecStatus::from(r.status) as i32,
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_dropped_bytes: r.stdout_dropped_bytes,
            stderr_dropped_bytes: r.stderr_dropped_bytes,
            started_at: Some(timestamp_to_proto(r.started_at)),
            finished_at: Some(timestamp_to_proto(r.finished_at)),
        }
    }
}

impl TryFrom<pb::ExecResult> for ExecResult {
    type Error = WireError;

    fn try_from(r: pb::ExecResult) -> Result<Self, WireError> {
        let started_at = timestamp_from_proto("started_at", r.started_at)?;
        let finished_at = timestamp_from_proto("finished_at", r.finished_at)?;
        let result = ExecResult {
            status: ExecStatus::from_proto("status", r.status)?,
            result_id: r.result_id,
            request_id: r.request_id,
            exec_id: r.exec_id,
            pc_id: r.pc_id,
            manifest_id: r.manifest_id,
            version: r.version,
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_dropped_bytes: r.stdout_dropped_bytes,
            stderr_dropped_bytes: r.stderr_dropped_bytes,
            started_at,
            finished_at,
        };
        result.validate()?;
        Ok(ExecResult {
            result_id: normalised_result_id(result.result_id)?,
            ..result
        })
    }
}

impl From<EventBody> for pb::event::Body {
    fn from(body: EventBody) -> Self {
        match body {
            EventBody::Started(s) => pb::event::Body::Started(s.into()),
            EventBody::Result(r) => pb::event::Body::Result(r.into()),
        }
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        pb::Event {
            seq: e.seq,
            body: Some(e.body.into()),
            trace_context: e.trace_context.into_iter().collect(),
        }
    }
}

impl TryFrom<pb::Event> for Event {
    type Error = WireError;

    fn try_from(e: pb::Event) -> Result<Self, WireError> {
        let body = match e.body {
            Some(pb::event::Body::Started(s)) => EventBody::Started(s.try_into()?),
            Some(pb::event::Body::Result(r)) => EventBody::Result(r.try_into()?),
            None => return Err(WireError::Missing { field: "body" }),
        };
        check_trace_context(e.trace_context.iter())?;
        Ok(Event {
            seq: e.seq,
            body,
            trace_context: e.trace_context.into_iter().collect(),
        })
    }
}
