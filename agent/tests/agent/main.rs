//! kanade-agent's integration tests: real child processes, real SQLite outboxes, the real
//! kanade-ingest binary over real gRPC on loopback.

// The ingest tests' harness (TestIngest, TestDb, FaultProxy, …) serves here too.
#[path = "../../../ingest/tests/api/helpers.rs"]
mod helpers;

mod delivery;
mod harness;
mod outbox;
mod runner;
mod traces;
