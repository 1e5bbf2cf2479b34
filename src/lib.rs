//! Kanade's wire contract, shared by `kanade-agent` and `kanade-ingest`.
//!
//! - [`pb`]: the protobuf messages and gRPC services generated from `proto/kanade/v1`. Only the
//!   edges of the programs (gRPC handlers, the sender) touch these types.
//! - [`wire`]: the serde structs the rest of the code works with, and the conversions between
//!   them and [`pb`]. Converting from protobuf is the one place where wire input is validated.
//! - [`limits`]: sizes both programs must agree on.
//! - [`tls`]: the one rustls crypto provider and PEM file reading.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod backoff;
pub mod codec;
pub mod limits;
pub mod pb;
pub mod telemetry;
pub mod tls;
pub mod wire;
