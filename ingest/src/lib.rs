//! kanade-ingest: receives run lifecycle events from agents, coalesces them into one row per run,
//! acknowledges only after commit, and answers Activity queries.
//!
//! - [`server`]: the Ingest gRPC service (agent streams, Publish).
//! - [`batcher`]: group commit of every stream's events into one transaction per batch.
//! - [`budget`]: the one memory budget every event is charged against before it is read.
//! - [`outbound`]: the bounded queue of acks towards one agent stream.
//! - [`store`]: `execution_results` in PostgreSQL or SQLite, behind one trait.
//! - [`activity`]: the Activity gRPC service (listing and reading runs).
//! - [`console`]: the web console for people (the Activity view in a browser), kept live by
//!   [`changes`], the announcements of commits.
//! - [`presence`]: which endpoints are connected, where, and what their agents report.
//! - [`control`]: the Control gRPC service (operators cancel runs) and delivering its requests
//!   to agents, wherever they are connected.
//! - [`bus`]: what replicas sharing one database tell each other (commits, control messages).
//! - [`auth`], [`tls`]: tokens, TLS with reloaded certificates, mTLS identities.
//! - [`listen`]: accepting connections on every listener (nodelay, proof of protocol, limits).
//! - [`health`], [`retention`]: readiness, deleting old runs.
//! - [`app`]: wires it all together and shuts it down in order; [`config`]: the command line.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod activity;
pub mod app;
pub mod auth;
pub mod batcher;
pub mod budget;
pub mod bus;
pub mod changes;
pub mod config;
pub mod console;
pub mod control;
pub mod health;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod retention;
pub mod server;
pub mod store;
pub mod tls;
