//! The contract's rules on values (SPEC §2), in one place: ingest applies them to every event it
//! decodes, and the agent to every event it creates before anything is enqueued, so the agent
//! never queues what ingest would reject.

use chrono::{DateTime, Datelike, Utc};

use super::{Event, EventBody, EventStarted, ExecResult, WireError};
use crate::limits;

/// An id of at most [`limits::MAX_ID_BYTES`]; may be empty.
pub fn check_id(field: &'static str, value: &str) -> Result<(), WireError> {
    if value.len() > limits::MAX_ID_BYTES {
        return Err(WireError::TooLong {
            field,
            len: value.len(),
            max: limits::MAX_ID_BYTES,
        });
    }
    Ok(())
}

/// A non-empty id of at most [`limits::MAX_ID_BYTES`].
pub fn check_required_id(field: &'static str, value: &str) -> Result<(), WireError> {
    if value.is_empty() {
        return Err(WireError::Empty { field });
    }
    check_id(field, value)
}

/// `result_id`: a UUID (any version); returns it parsed.
pub(super) fn check_result_id(value: &str) -> Result<uuid::Uuid, WireError> {
    let field = "result_id";
    check_required_id(field, value)?;
    uuid::Uuid::try_parse(value).map_err(|_| WireError::NotAUuid {
        field,
        value: value.to_string(),
    })
}

/// An instant within years 0001 to 9999.
pub(super) fn check_time(field: &'static str, at: DateTime<Utc>) -> Result<(), WireError> {
    if !(1..=9999).contains(&at.year()) {
        return Err(WireError::TimestampOutOfRange {
            field,
            seconds: at.timestamp(),
            nanos: at.timestamp_subsec_nanos() as i32,
        });
    }
    Ok(())
}

impl EventStarted {
    /// Checks every rule of the contract on this event.
    pub fn validate(&self) -> Result<(), WireError> {
        check_result_id(&self.result_id)?;
        check_required_id("request_id", &self.request_id)?;
        check_required_id("exec_id", &self.exec_id)?;
        check_required_id("pc_id", &self.pc_id)?;
        check_time("started_at", self.started_at)?;
        check_required_id("manifest_id", &self.manifest_id)?;
        check_id("version", &self.version)
    }
}

impl ExecResult {
    /// Checks every rule of the contract on this event.
    pub fn validate(&self) -> Result<(), WireError> {
        check_time("started_at", self.started_at)?;
        check_time("finished_at", self.finished_at)?;
        if self.finished_at < self.started_at {
            return Err(WireError::FinishedBeforeStarted {
                started_at: self.started_at.to_rfc3339(),
                finished_at: self.finished_at.to_rfc3339(),
            });
        }
        check_result_id(&self.result_id)?;
        check_required_id("request_id", &self.request_id)?;
        check_required_id("exec_id", &self.exec_id)?;
        check_required_id("pc_id", &self.pc_id)?;
        check_required_id("manifest_id", &self.manifest_id)?;
        check_id("version", &self.version)
    }
}

/// An event's trace context: at most [`limits::MAX_TRACE_CONTEXT_ENTRIES`] entries of at most
/// [`limits::MAX_TRACE_CONTEXT_ENTRY_BYTES`] each.
pub(super) fn check_trace_context<'a>(
    entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), WireError> {
    let field = "trace_context";
    if entries.len() > limits::MAX_TRACE_CONTEXT_ENTRIES {
        return Err(WireError::TooManyEntries {
            field,
            count: entries.len(),
            max: limits::MAX_TRACE_CONTEXT_ENTRIES,
        });
    }
    for (k, v) in entries {
        let len = k.len().max(v.len());
        if len > limits::MAX_TRACE_CONTEXT_ENTRY_BYTES {
            return Err(WireError::TooLong {
                field,
                len,
                max: limits::MAX_TRACE_CONTEXT_ENTRY_BYTES,
            });
        }
    }
    Ok(())
}

impl Event {
    /// Checks every rule of the contract on this event and its envelope.
    pub fn validate(&self) -> Result<(), WireError> {
        match &self.body {
            EventBody::Started(s) => s.validate()?,
            EventBody::Result(r) => r.validate()?,
        }
        check_trace_context(self.trace_context.iter())
    }
}
