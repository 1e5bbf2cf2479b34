//! The serde side of the wire contract.
//!
//! A run produces two events that share one `result_id`. [`EventStarted`] exists apart from
//! [`ExecResult`] because a run can take hours: the Started event is committed to the agent's
//! outbox before the process is spawned, so "what is running right now" is known (and survives
//! an agent crash) long before any result exists. Ingest coalesces both into one row keyed by
//! `result_id`, in whatever order and however often they arrive — the outbox delivers at least
//! once, across network outages and restarts, so redelivery is normal, not an error.
//!
//! [`EventStarted`] keeps the field names, order and types of the system it comes from, so JSON
//! written by either reads in the other; Kanade's additions are optional and `#[serde(default)]`.
//!
//! Conversions: serde → protobuf is infallible (`From`); protobuf → serde is fallible
//! (`TryFrom`, error [`WireError`]) and validates every rule of the contract. The rules live in
//! one place (`validate`: [`Event::validate`], [`EventStarted::validate`],
//! [`ExecResult::validate`]): ingest applies them through the conversion, the agent to every
//! event it creates before enqueueing it, so the agent never queues what ingest would refuse.

mod convert;
mod error;
mod event;
mod validate;

pub use convert::timestamp_to_proto;
pub use error::WireError;
pub use event::{Event, EventBody, EventStarted, ExecResult, ExecStatus};
pub use validate::{check_id, check_required_id};
