use thiserror::Error;

/// Why a protobuf event is not acceptable. Every variant names the field at fault, in the
/// protobuf's own field names, so a `Reject` reason tells a person exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// A required field (a timestamp, the event body) is absent.
    #[error("{field} is missing")]
    Missing { field: &'static str },
    /// A required string is empty.
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    /// `result_id` does not parse as a UUID.
    #[error("{field} must be a UUID, got {value:?}")]
    NotAUuid { field: &'static str, value: String },
    /// A string or map entry is longer than the contract allows.
    #[error("{field} is {len} bytes long, at most {max} are allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A map has more entries than the contract allows.
    #[error("{field} has {count} entries, at most {max} are allowed")]
    TooManyEntries {
        field: &'static str,
        count: usize,
        max: usize,
    },
    /// A timestamp is not a valid instant within years 0001 to 9999.
    #[error(
        "{field} must be a valid instant between 0001-01-01 and 9999-12-31 (got seconds={seconds}, nanos={nanos})"
    )]
    TimestampOutOfRange {
        field: &'static str,
        seconds: i64,
        nanos: i32,
    },
    /// `finished_at` lies before `started_at`.
    #[error("finished_at ({finished_at}) is before started_at ({started_at})")]
    FinishedBeforeStarted {
        started_at: String,
        finished_at: String,
    },
    /// An enum field holds a number this version of the contract does not know.
    #[error("{field} has unknown value {value}")]
    UnknownEnumValue { field: &'static str, value: i32 },
    /// An enum field holds its `UNSPECIFIED` value.
    #[error("{field} must be set (it is UNSPECIFIED)")]
    Unspecified { field: &'static str },
}

impl WireError {
    /// The protobuf field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            WireError::Missing { field }
            | WireError::Empty { field }
            | WireError::NotAUuid { field, .. }
            | WireError::TooLong { field, .. }
            | WireError::TooManyEntries { field, .. }
            | WireError::TimestampOutOfRange { field, .. }
            | WireError::UnknownEnumValue { field, .. }
            | WireError::Unspecified { field } => field,
            WireError::FinishedBeforeStarted { .. } => "finished_at",
        }
    }
}
