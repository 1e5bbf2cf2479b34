//! kanade-ingest's integration tests: one binary, one module per concern, all driving the real
//! server (or the real stores) through `kanade_testkit`.

mod activity;
mod auth;
mod conformance;
mod console;
mod control;
mod deploy;
mod faults;
mod grpcurl;
mod listeners;
mod memory;
mod partitions;
mod presence;
mod replica;
mod replicas;
mod stream;
mod tail;
mod telemetry;
mod tls;
