//! kanade-bench: Kanade's benchmarks. Each mode prints human-readable figures and, as its final
//! line, one machine-readable `key=value …` summary. Build with `cargo build --release
//! --workspace` first: the benchmark runs the real binaries next to it.

#![forbid(unsafe_code)]

mod activity;
mod agent;
mod cancel;
mod ceiling;
mod connections;
mod indexes;
mod load;
mod memory;
mod presence;
mod process;
mod report;
mod retention;
mod storm;
mod tail;
mod throughput;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kanade-bench", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The read path on a table of N runs: every Activity filter and state, deep pages, the
    /// manifest summary; p50/p99 and the plans of cases over target.
    Activity(activity::ActivityArgs),
    /// What each index of execution_results costs the writes: the ceiling's rows written with
    /// every index, without each one in turn, and with none.
    Indexes(indexes::IndexesArgs),
    /// Events/s through the real ingest from N agents, against PostgreSQL's own ceiling.
    Throughput(throughput::ThroughputArgs),
    /// Ingest memory per idle stream for K streams, then the reconnect storm after a SIGKILL.
    Connections(connections::ConnectionsArgs),
    /// N agents with a backlog each reconnect after an ingest outage: time until every event is
    /// committed, and each agent's drain time (median, slowest), with what the reconnect
    /// backoff and what ingest contribute to it.
    Storm(storm::StormArgs),
    /// The agent's footprint: idle daemon CPU, RSS and wake-ups, exec overhead, outbox enqueue
    /// rate, binary sizes.
    Agent(agent::AgentArgs),
    /// Ingest's memory under a burst of large events from many agents, against its budget.
    Memory(memory::MemoryArgs),
    /// What retention costs for a day of runs: a small and a large day dropped whole, against
    /// deleting the large day's rows one batch at a time.
    Retention(retention::RetentionArgs),
    /// How long an operator's cancel takes to end a run's process, through the replica holding
    /// the agent's stream and through another.
    Cancel(cancel::CancelArgs),
    /// What fleet presence costs the database with many idle agents: statements and rows per
    /// second.
    Presence(presence::PresenceArgs),
    /// Live output: a script's write to its watcher on the agent's replica and on another
    /// (p50/p99), the agent's CPU with a run watched and not, ingest's memory with many watched
    /// runs.
    Tail(tail::TailArgs),
    /// Draws throughput and p99 latency against agents from a throughput CSV.
    Plot {
        /// CSV written by `throughput --csv`.
        #[arg(long)]
        csv: PathBuf,
        /// PNG to write.
        #[arg(long)]
        png: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Activity(args) => activity::run(args).await,
        Mode::Indexes(args) => indexes::run(args).await,
        Mode::Throughput(args) => throughput::run(args).await,
        Mode::Connections(args) => connections::run(args).await,
        Mode::Storm(args) => storm::run(args).await,
        Mode::Agent(args) => agent::run(args).await,
        Mode::Memory(args) => memory::run(args).await,
        Mode::Retention(args) => retention::run(args).await,
        Mode::Cancel(args) => cancel::run(args).await,
        Mode::Presence(args) => presence::run(args).await,
        Mode::Tail(args) => tail::run(args).await,
        Mode::Plot { csv, png } => {
            report::plot(&csv, &png)?;
            println!("mode=plot png={}", png.display());
            Ok(())
        }
    }
}
