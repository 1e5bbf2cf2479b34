//! kanade-agent's integration tests: real child processes, real SQLite outboxes, the real
//! kanade-ingest binary over real gRPC on loopback.

mod damage;
mod delivery;
mod outbox;
mod runner;
mod traces;
