//! kanade-agent: runs scripts on an endpoint and streams their lifecycle events to ingest.
//!
//! Only the command line exists so far; the runner, outbox and sender are the agent issue's work.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;

/// Exit status for an agent error (SPEC §4).
pub const EXIT_AGENT_ERROR: u8 = 125;

/// Runs one parsed command line.
pub fn run(cli: cli::Cli) -> anyhow::Result<u8> {
    let name = match cli.command {
        cli::Command::Run { .. } => "run",
        cli::Command::Exec(_) => "exec",
        cli::Command::Status { .. } => "status",
        cli::Command::DeadLetters { .. } => "dead-letters",
    };
    anyhow::bail!("`kanade-agent {name}` is not implemented in this build yet")
}
