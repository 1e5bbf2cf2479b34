//! The agent's command line (SPEC §9). Flags override environment variables, which override the
//! config file.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use kanade_shared::telemetry::LogFormat;

/// Runs scripts on this endpoint and streams what they did to kanade-ingest, through a durable
/// outbox in the data dir.
#[derive(Debug, Parser)]
#[command(name = "kanade-agent", version)]
pub struct Cli {
    /// Log line format; filter with RUST_LOG (e.g. RUST_LOG=kanade_agent=debug).
    #[arg(
        long,
        global = true,
        env = "KANADE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: runs scheduled jobs from the config file and streams events to ingest.
    Run {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Runs one command now through the outbox and exits with the command's exit code (128+N
    /// when it died of signal N; 127 not found, 126 not executable, 125 agent error, 75 when
    /// --wait timed out). The command's stdout and stderr pass through as they are written
    /// (while they are captured), unless --quiet.
    Exec(ExecArgs),
    /// Shows outbox depth, oldest pending event, dead letters, connection state and last ack.
    Status {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Lists, retries or purges events ingest refused.
    DeadLetters {
        #[command(flatten)]
        common: CommonArgs,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Checks the outbox for damage, or salvages a damaged one.
    Outbox {
        #[command(flatten)]
        common: CommonArgs,
        #[command(subcommand)]
        action: OutboxAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// Runs SQLite's integrity check and the outbox's own invariants (every queued event
    /// decodes and is one ingest would accept, the journal decodes); exits 1 when damaged.
    Check,
    /// Moves a damaged outbox aside (outbox.db.damaged-TIMESTAMP: nothing is deleted), starts a
    /// fresh one, queues again every event that can still be read, reports the runs that were
    /// in progress as INTERRUPTED, and says how many events it recovered and what it could not
    /// read. Stop the daemon first.
    Salvage,
}

impl Command {
    /// The log filter when `RUST_LOG` is not set: `exec` stays quiet so its output is the
    /// command's; the others tell what they do.
    pub fn log_filter(&self) -> &'static str {
        match self {
            Command::Exec(args) => match args.verbose {
                0 => "warn",
                1 => "info",
                _ => "debug",
            },
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// Lists dead-lettered events with the reason they were refused.
    List,
    /// Puts one dead-lettered event back into the outbox.
    Retry { id: i64 },
    /// Deletes one dead-lettered event for good.
    Purge { id: i64 },
}

/// Settings shared by every command (also accepted after a subcommand's action:
/// `kanade-agent outbox check --data-dir D`).
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML config file.
    #[arg(long, env = "KANADE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Ingest URL (http://host:port or https://host:port).
    #[arg(long, env = "KANADE_INGEST", global = true)]
    pub ingest: Option<String>,
    /// This endpoint's id [default: the hostname].
    #[arg(long, env = "KANADE_PC_ID", global = true)]
    pub pc_id: Option<String>,
    /// Directory holding the outbox and locks.
    #[arg(long, env = "KANADE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// CA certificate (PEM) that signed ingest's certificate.
    #[arg(long, env = "KANADE_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, env = "KANADE_CLIENT_CERT", global = true)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, env = "KANADE_CLIENT_KEY", global = true)]
    pub client_key: Option<PathBuf>,
    /// File holding the bearer token (never pass a token as a flag value).
    #[arg(long, env = "KANADE_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Also wait until both events of the run are acknowledged by ingest.
    #[arg(long)]
    pub wait: bool,
    /// Log the agent's own work (-v: info, -vv: debug); by default only warnings and errors, so
    /// what exec prints is the command's output.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Pass nothing of the command's output through (it is still captured and reported).
    #[arg(short, long)]
    pub quiet: bool,
    /// How long --wait waits before exiting with status 75 (e.g. 30s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
    /// Manifest id the run is reported under.
    #[arg(long)]
    pub manifest: String,
    /// Manifest version the run is reported under.
    #[arg(long, default_value = "")]
    pub version: String,
    /// Kill the command's process group after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// The request this run answers [default: a fresh UUIDv7].
    #[arg(long)]
    pub request_id: Option<String>,
    /// The deployment this run belongs to [default: a fresh UUIDv7].
    #[arg(long)]
    pub exec_id: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_its_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "kanade-agent",
            "exec",
            "--manifest",
            "m",
            "--version",
            "2",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(exec.version, "2");
        assert_eq!(exec.command, ["sh", "-c", "exit 3"]);
    }
}
