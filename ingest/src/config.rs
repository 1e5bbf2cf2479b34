//! The ingest command line (SPEC §9): every flag has an environment variable and a visible
//! default, so the same settings work from a shell, a systemd unit or a Kubernetes ConfigMap.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use kanade_shared::{limits, telemetry::LogFormat};

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// The shortest `--tls-reload-every` and `--tokens-reload-every`.
const MIN_RELOAD_EVERY: Duration = Duration::from_millis(100);

/// `--console-listen`: an address, or `off`.
fn console_listen(s: &str) -> Result<ConsoleListen, String> {
    if s == "off" {
        return Ok(ConsoleListen(None));
    }
    s.parse()
        .map(|addr| ConsoleListen(Some(addr)))
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:8080, or off"))
}

/// Where the web console listens; `None`: it is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleListen(pub Option<SocketAddr>);

/// A size in bytes as people write it: `1048576`, `64KiB`, `256MiB`, `2GiB` (powers of 1024),
/// `500MB`, `1GB` (powers of 1000).
pub fn bytes(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256MiB, 2GiB or 1048576"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--replica-id` when none is given: the host name.
fn default_replica_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "kanade-ingest".to_string())
}

/// `--memory-budget` when none is given: half the cgroup's memory limit when there is one, else
/// this much.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

/// The memory limit of this process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`),
/// when it has one.
fn cgroup_memory_limit() -> Option<u64> {
    let limited = |text: String| {
        text.trim()
            .parse::<u64>()
            .ok()
            // cgroup v1 says "no limit" with a number near 2^63.
            .filter(|&n| n < 1 << 60)
    };
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    .find_map(|path| std::fs::read_to_string(path).ok().and_then(limited))
}

/// Receives run lifecycle events from kanade agents, stores one row per run, and answers
/// Activity queries. Without a subcommand it serves.
#[derive(Debug, Parser)]
#[command(
    name = "kanade-ingest",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the Ingest and Activity gRPC services (the default).
    Serve(Box<ServeArgs>),
    /// Applies the database migrations and exits.
    Migrate(MigrateArgs),
    /// Manages bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token, prints it once, and stores only its SHA-256 in the tokens file.
    Add(TokenAddArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TokenAddArgs {
    /// The endpoint the token may write for (omit with --reader or --operator).
    #[arg(required_unless_present_any = ["reader", "operator"], conflicts_with_all = ["reader", "operator", "name"])]
    pub pc_id: Option<String>,
    /// A token that may read Activity and the console instead.
    #[arg(long, conflicts_with = "operator")]
    pub reader: bool,
    /// A token that may read, and act on runs (cancel them from grpcurl or the console).
    #[arg(long)]
    pub operator: bool,
    /// Whose token it is (a reader's or an operator's), e.g. alice: what an operator does is
    /// recorded under this name. Without it, the token is known by the start of its SHA-256.
    #[arg(long)]
    pub name: Option<String>,
    /// The tokens file (created 0600 when missing).
    #[arg(long, env = "KANADE_INGEST_TOKENS_FILE")]
    pub tokens_file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Database: postgres://USER@HOST/DB or sqlite://PATH (created when missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://kanade-ingest.db"
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC services listen on (port 0 picks a free port).
    #[arg(long, env = "KANADE_INGEST_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database: postgres://USER@HOST/DB or sqlite://PATH (created when missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://kanade-ingest.db"
    )]
    pub database_url: String,

    /// A PostgreSQL streaming replica of --database-url for reads: Activity's and the console's
    /// queries go there (and lag behind the primary by the replica's replay delay); writes,
    /// migrations, retention and console sign-ins never do. Unset: reads go to --database-url.
    #[arg(long, env = "KANADE_INGEST_READ_DATABASE_URL")]
    pub read_database_url: Option<String>,

    /// This replica's name, shown with each endpoint it holds the stream of (Activity's
    /// Endpoint.replica, the console's /endpoints) and in its database sessions. Default: the
    /// host name (the Kubernetes manifests pass the pod's name).
    #[arg(long, env = "KANADE_INGEST_REPLICA_ID", default_value_t = default_replica_id())]
    pub replica_id: String,

    /// Each replica writes that its agents' streams are still open this often; an endpoint
    /// whose replica stopped writing (killed, cut off) counts as not connected after three of
    /// these. Agents' reports and connections are written within a second, in batches.
    #[arg(long, env = "KANADE_INGEST_PRESENCE_EVERY", default_value = "30s", value_parser = duration)]
    pub presence_every: Duration,

    /// Require bearer tokens (TOML `[[token]]` entries of SHA-256 hashes bound to a pc_id, or to
    /// role = "reader" or "operator"; create them with `kanade-ingest token add`). The file is
    /// read again every --tokens-reload-every: tokens added or removed apply without a restart.
    #[arg(long, env = "KANADE_INGEST_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// How often the tokens file is checked for changes.
    #[arg(long, env = "KANADE_INGEST_TOKENS_RELOAD_EVERY", default_value = "10s", value_parser = duration)]
    pub tokens_reload_every: Duration,

    /// Serve TLS with this certificate chain (PEM). The files are checked every
    /// --tls-reload-every and reloaded when they change, so certificates rotate without a restart.
    #[arg(long, env = "KANADE_INGEST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "KANADE_INGEST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates issued by these CAs (PEM) — mTLS. A certificate's identity
    /// (its DNS subject alternative name, else its common name) is the only pc_id its
    /// connection may write. Needs --tls-cert.
    #[arg(long, env = "KANADE_INGEST_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes.
    #[arg(long, env = "KANADE_INGEST_TLS_RELOAD_EVERY", default_value = "10s", value_parser = duration)]
    pub tls_reload_every: Duration,

    /// Accept plaintext connections without authentication on a non-loopback --listen address.
    /// Anyone who can reach the port can then write runs for any pc_id and read every output:
    /// only on a network you trust completely.
    #[arg(long, env = "KANADE_INGEST_ALLOW_INSECURE")]
    pub allow_insecure: bool,

    /// Also serve grpc.health.v1.Health alone on this plaintext address (for Kubernetes probes).
    #[arg(long, env = "KANADE_INGEST_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Serve the web console (Activity in a browser) on this address (port 0 picks a free port),
    /// or `off`.
    /// Beyond loopback it follows the same rule as --listen: TLS or tokens, or --allow-insecure.
    #[arg(long, env = "KANADE_INGEST_CONSOLE_LISTEN", default_value = "127.0.0.1:8080", value_parser = console_listen)]
    pub console_listen: ConsoleListen,

    /// The console links a run's trace id here: a URL template with {trace_id}, such as
    /// http://jaeger:16686/trace/{trace_id}.
    #[arg(long, env = "KANADE_INGEST_TRACE_URL")]
    pub trace_url: Option<String>,

    /// A console sign-in lasts this long.
    #[arg(long, env = "KANADE_INGEST_SESSION_TTL", default_value = "12h", value_parser = duration)]
    pub session_ttl: Duration,

    /// Serve Prometheus metrics on this address at /metrics.
    #[arg(long, env = "KANADE_INGEST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log line format; filter with RUST_LOG (e.g. RUST_LOG=kanade_ingest=debug).
    #[arg(long, env = "KANADE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Delete runs first received longer ago than this.
    #[arg(long, env = "KANADE_INGEST_RETENTION", default_value = "90d", value_parser = duration)]
    pub retention: Duration,

    /// How often the retention sweep runs.
    #[arg(long, env = "KANADE_INGEST_RETENTION_EVERY", default_value = "10m", value_parser = duration)]
    pub retention_every: Duration,

    /// A run without a result counts as lost this long after its timeout would have ended it.
    #[arg(long, env = "KANADE_INGEST_LOST_GRACE", default_value = "5m", value_parser = duration)]
    pub lost_grace: Duration,

    /// Most concurrent agent streams on this replica; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "KANADE_INGEST_MAX_STREAMS", default_value_t = 20_000)]
    pub max_streams: usize,

    /// Most concurrent streams of one pc_id; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "KANADE_INGEST_MAX_STREAMS_PER_PC", default_value_t = 4)]
    pub max_streams_per_pc: usize,

    /// Most watchers of runs' live output at once on this replica (Control/TailExecution calls
    /// and console run pages; any number of them share one request to the agent per run);
    /// more get RESOURCE_EXHAUSTED. A watcher that does not read holds up to 256 KiB of output
    /// queued here plus what HTTP/2 buffers for it (up to about 460 KiB), and, once its run
    /// ends, up to 64 KiB more of each output's stored end; each run watched here holds the
    /// last 64 KiB of each of its outputs.
    #[arg(long, env = "KANADE_INGEST_MAX_TAILS", default_value_t = 128)]
    pub max_tails: usize,

    /// Streams older than this (±10 % jitter) are ended cleanly so agents spread over replicas.
    #[arg(long, env = "KANADE_INGEST_MAX_STREAM_AGE", default_value = "30m", value_parser = duration)]
    pub max_stream_age: Duration,

    /// A connection must prove it speaks the protocol within this long — the HTTP/2 preface
    /// (gRPC), a request head (HTTP/1.1: console, metrics; also between requests on a kept-alive
    /// connection) or the TLS handshake — or it is closed; a stream that sends no Hello within
    /// this long is ended with DEADLINE_EXCEEDED.
    #[arg(long, env = "KANADE_INGEST_HELLO_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub hello_timeout: Duration,

    /// Connections accepted on one listener but not yet proven (see --hello-timeout), at most;
    /// further connections wait in the kernel's backlog until places free up.
    #[arg(long, env = "KANADE_INGEST_MAX_PENDING_CONNECTIONS", default_value_t = crate::listen::DEFAULT_MAX_UNPROVEN)]
    pub max_pending_connections: usize,

    /// On SIGTERM/SIGINT, stop after at most this long even if batches are still pending.
    #[arg(long, env = "KANADE_INGEST_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// How long Publish waits for its commit when the caller sets no deadline.
    #[arg(long, env = "KANADE_INGEST_PUBLISH_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub publish_timeout: Duration,

    /// How often the store is probed for the health service.
    #[arg(long, env = "KANADE_INGEST_HEALTH_CHECK_EVERY", default_value = "5s", value_parser = duration)]
    pub health_check_every: Duration,

    /// Largest encoded event accepted; larger ones are rejected with the size in the reason.
    #[arg(long, env = "KANADE_INGEST_MAX_EVENT_BYTES", default_value_t = limits::MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,

    /// Per-stream window: unacknowledged events held for one stream before ingest stops reading it.
    #[arg(long, env = "KANADE_INGEST_MAX_UNACKED", default_value_t = limits::DEFAULT_MAX_UNACKED)]
    pub max_unacked: u32,

    /// Per-stream window in bytes of unacknowledged events.
    #[arg(long, env = "KANADE_INGEST_MAX_UNACKED_BYTES", default_value_t = limits::DEFAULT_MAX_UNACKED_BYTES)]
    pub max_unacked_bytes: u64,

    /// A batch closes once it writes this many rows (a run's events in one batch are one row),
    /// or at twice as many events.
    #[arg(long, env = "KANADE_INGEST_BATCH_MAX_ROWS", default_value_t = 1000)]
    pub batch_max_rows: usize,

    /// A batch closes at this many bytes of events.
    #[arg(long, env = "KANADE_INGEST_BATCH_MAX_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub batch_max_bytes: usize,

    /// A batch closes this long after its first event arrived.
    #[arg(long, env = "KANADE_INGEST_BATCH_LINGER", default_value = "5ms", value_parser = duration)]
    pub batch_linger: Duration,

    /// Batches committing at once, each in its own transaction: the next batch is built and
    /// sent while one waits for its commit (PostgreSQL, 1 to 4; SQLite has one writer and
    /// commits one at a time).
    #[arg(long, env = "KANADE_INGEST_COMMITS_IN_FLIGHT", default_value_t = 3)]
    pub commits_in_flight: usize,

    /// One attempt to commit a batch may take this long before it counts as failed and is
    /// retried on another connection.
    #[arg(long, env = "KANADE_INGEST_COMMIT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub commit_timeout: Duration,

    /// Bytes of events ingest holds at most, across every stream and Publish call (read and not
    /// yet answered); when it is spent, streams stop being read until commits free it. Written
    /// like 256MiB or 2GiB. Default: half the cgroup's memory limit when there is one, else 1GiB.
    #[arg(long, env = "KANADE_INGEST_MEMORY_BUDGET", value_parser = bytes)]
    pub memory_budget: Option<u64>,

    /// Events waiting for a batch across all streams and Publish calls; when full, streams stop
    /// being read. Each batch takes the waiting events lowest run id first (within each tenth of
    /// a second of arrival), so a batch writes a narrow stretch of the indexes.
    #[arg(long, env = "KANADE_INGEST_QUEUE_CAPACITY", default_value_t = 65536)]
    pub queue_capacity: usize,

    /// Longest pause between retries of a batch while the database is unavailable.
    #[arg(long, env = "KANADE_INGEST_RETRY_MAX", default_value = "5s", value_parser = duration)]
    pub retry_max: Duration,
}

impl ServeArgs {
    /// The memory budget in bytes, and where the figure comes from (for the log).
    pub fn memory_budget(&self) -> (u64, &'static str) {
        match (self.memory_budget, cgroup_memory_limit()) {
            (Some(given), _) => (given, "--memory-budget"),
            (None, Some(limit)) => (limit / 2, "half the cgroup memory limit"),
            (None, None) => (DEFAULT_MEMORY_BUDGET, "the default"),
        }
    }

    /// What an operator must know, loudly, about how exposed this configuration leaves ingest
    /// (after [`ServeArgs::validate`] accepted it).
    pub fn exposure_warning(&self) -> Option<&'static str> {
        let tls = self.tls_cert.is_some();
        let tokens = self.tokens_file.is_some();
        if self.listen.ip().is_loopback() {
            None
        } else if !tls && tokens {
            Some(
                "tokens travel in plaintext without TLS: anyone on the path can read and reuse \
                 them (serve TLS with --tls-cert and --tls-key)",
            )
        } else if !tls {
            Some(
                "SERVING PLAINTEXT WITHOUT AUTHENTICATION (--allow-insecure): anyone who can \
                 reach this port can write runs for any endpoint and read every output",
            )
        } else if self.client_ca.is_none() && !tokens {
            Some(
                "TLS without --client-ca or --tokens-file: connections are encrypted, but anyone \
                 who can reach this port can write runs for any endpoint and read every output",
            )
        } else {
            None
        }
    }

    /// Checks what clap cannot: relations between values.
    pub fn validate(&self) -> Result<(), String> {
        let open = |addr: SocketAddr| {
            !addr.ip().is_loopback()
                && !self.allow_insecure
                && self.tokens_file.is_none()
                && self.tls_cert.is_none()
        };
        if let Some(console) = self.console_listen.0.filter(|&addr| open(addr)) {
            return Err(format!(
                "refusing to serve the console without authentication on {console}: anyone who \
                 can reach it could read every run's output. Require sign-in with --tokens-file, \
                 serve TLS with --tls-cert and --tls-key, listen on a loopback address (e.g. \
                 --console-listen 127.0.0.1:8080), turn it off with --console-listen off, or \
                 pass --allow-insecure if this network is fully trusted"
            ));
        }
        if self.console_listen.0.is_some() && self.client_ca.is_some() && self.tokens_file.is_none()
        {
            return Err(
                "ingest requires client certificates (--client-ca), but browsers have none: the \
                 console signs people in with reader tokens, so it needs --tokens-file (create \
                 one with kanade-ingest token add --reader), or turn it off with \
                 --console-listen off"
                    .to_string(),
            );
        }
        for (flag, every) in [
            ("--tls-reload-every", self.tls_reload_every),
            ("--tokens-reload-every", self.tokens_reload_every),
        ] {
            if every < MIN_RELOAD_EVERY {
                return Err(format!(
                    "{flag} {} is too short: files are read again at most every {}",
                    humantime::format_duration(every),
                    humantime::format_duration(MIN_RELOAD_EVERY)
                ));
            }
        }
        if let Some(template) = &self.trace_url
            && !template.contains("{trace_id}")
        {
            return Err(format!(
                "--trace-url {template:?} has no {{trace_id}} to fill in (e.g. \
                 http://jaeger:16686/trace/{{trace_id}})"
            ));
        }
        if open(self.listen) {
            return Err(format!(
                "refusing to serve plaintext without authentication on {}: anyone who can reach \
                 it could write runs for any endpoint and read every output. Serve TLS with \
                 --tls-cert and --tls-key (add --client-ca for client certificates), or require \
                 tokens with --tokens-file, or listen on a loopback address (e.g. --listen \
                 127.0.0.1:50051), or pass --allow-insecure if this network is fully trusted",
                self.listen
            ));
        }
        if let Some(read_url) = &self.read_database_url {
            let postgres =
                |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
            if !postgres(&self.database_url) {
                return Err(
                    "--read-database-url needs a PostgreSQL --database-url: a read replica is a \
                     streaming replica of the primary (SQLite has none; leave it unset)"
                        .to_string(),
                );
            }
            if !postgres(read_url) {
                return Err(
                    "--read-database-url must be a postgres://… URL of a streaming replica of \
                     --database-url"
                        .to_string(),
                );
            }
        }
        if self.max_event_bytes > limits::MAX_DECODING_MESSAGE_BYTES - 64 * 1024 {
            return Err(format!(
                "--max-event-bytes {} is above the largest supported value {}",
                self.max_event_bytes,
                limits::MAX_DECODING_MESSAGE_BYTES - 64 * 1024
            ));
        }
        let (budget, _) = self.memory_budget();
        if budget < self.max_event_bytes as u64 {
            return Err(format!(
                "--memory-budget {budget} bytes is less than one event may be \
                 (--max-event-bytes {}): give at least that, better many times it",
                self.max_event_bytes
            ));
        }
        for (flag, value) in [
            ("--max-streams", self.max_streams),
            ("--max-streams-per-pc", self.max_streams_per_pc),
            ("--max-tails", self.max_tails),
            ("--max-pending-connections", self.max_pending_connections),
            ("--batch-max-rows", self.batch_max_rows),
            ("--batch-max-bytes", self.batch_max_bytes),
            ("--commits-in-flight", self.commits_in_flight),
            ("--queue-capacity", self.queue_capacity),
            ("--max-unacked", self.max_unacked as usize),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.commits_in_flight > MAX_COMMITS_IN_FLIGHT {
            return Err(format!(
                "--commits-in-flight {} is more than {MAX_COMMITS_IN_FLIGHT}: each batch in flight \
                 takes a database connection, and half of them serve reads",
                self.commits_in_flight
            ));
        }
        Ok(())
    }
}

/// The most batches that may commit at once: half of the PostgreSQL store's pool of eight.
pub const MAX_COMMITS_IN_FLIGHT: usize = 4;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bare_invocation_serves_with_the_documented_defaults() {
        let cli = Cli::try_parse_from(["kanade-ingest"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(cli.serve.database_url, "sqlite://kanade-ingest.db");
        assert_eq!(cli.serve.retention, Duration::from_secs(90 * 86_400));
        assert_eq!(cli.serve.max_stream_age, Duration::from_secs(30 * 60));
        assert!(cli.serve.validate().is_ok());
    }

    #[test]
    fn plaintext_beyond_loopback_needs_allow_insecure() {
        let open = Cli::try_parse_from(["kanade-ingest", "--listen", "0.0.0.0:50051"]).unwrap();
        let err = open.serve.validate().unwrap_err();
        assert!(
            err.contains("--allow-insecure") && err.contains("0.0.0.0:50051"),
            "{err}"
        );
        let allowed = Cli::try_parse_from([
            "kanade-ingest",
            "--listen",
            "[::]:50051",
            "--allow-insecure",
        ])
        .unwrap();
        assert!(allowed.serve.validate().is_ok());
        let v6_loopback = Cli::try_parse_from(["kanade-ingest", "--listen", "[::1]:0"]).unwrap();
        assert!(v6_loopback.serve.validate().is_ok());
    }

    fn serve(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(["kanade-ingest"].iter().chain(args))
            .unwrap()
            .serve
    }

    #[test]
    fn tls_or_tokens_open_a_public_address_and_say_what_is_left_exposed() {
        let public = |more: &[&'static str]| {
            let mut args = vec!["--listen", "0.0.0.0:1"];
            args.extend_from_slice(more);
            serve(&args)
        };
        const TLS: [&str; 4] = ["--tls-cert", "c", "--tls-key", "k"];
        const TOKENS: [&str; 2] = ["--tokens-file", "t.toml"];
        const CLIENT_CA: [&str; 2] = ["--client-ca", "ca"];
        for args in [&TOKENS[..], &TLS] {
            assert_eq!(public(args).validate(), Ok(()), "{args:?}");
        }
        for (args, part) in [
            (
                vec!["--allow-insecure"],
                "SERVING PLAINTEXT WITHOUT AUTHENTICATION",
            ),
            (TOKENS.to_vec(), "tokens travel in plaintext"),
            (TLS.to_vec(), "TLS without --client-ca or --tokens-file"),
        ] {
            let warning = public(&args).exposure_warning();
            assert!(
                warning.is_some_and(|w| w.contains(part)),
                "{args:?}: {warning:?}"
            );
        }
        assert_eq!(serve(&[]).exposure_warning(), None);
        for args in [
            [&TLS[..], &CLIENT_CA].concat(),
            [&TLS[..], &TOKENS].concat(),
        ] {
            assert_eq!(public(&args).exposure_warning(), None, "{args:?}");
        }
    }

    #[test]
    fn tls_flags_come_in_their_pairs() {
        for args in [
            &["--tls-cert", "c"][..],
            &["--tls-key", "k"],
            &["--client-ca", "ca"],
        ] {
            assert!(
                Cli::try_parse_from(["kanade-ingest"].iter().chain(args)).is_err(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("2GiB"), Ok(2 << 30));
        assert_eq!(bytes("500MB"), Ok(500_000_000));
        assert!(bytes("2 lots").unwrap_err().contains("unknown unit"));
        assert!(bytes("MiB").unwrap_err().contains("not a size"));
        assert!(bytes("99999999999TiB").unwrap_err().contains("too large"));
        let given = serve(&["--memory-budget", "64MiB"]);
        assert_eq!(given.memory_budget(), (64 << 20, "--memory-budget"));
    }

    #[test]
    fn zero_limits_are_refused_with_the_flag_name() {
        let cli = Cli::try_parse_from(["kanade-ingest", "--max-streams", "0"]).unwrap();
        assert_eq!(
            cli.serve.validate().unwrap_err(),
            "--max-streams must be at least 1"
        );
        let cli = Cli::try_parse_from(["kanade-ingest", "--commits-in-flight", "9"]).unwrap();
        assert!(
            cli.serve
                .validate()
                .unwrap_err()
                .starts_with("--commits-in-flight 9 is more than 4"),
        );
    }

    #[test]
    fn a_read_replica_is_postgresql_beside_a_postgresql_primary() {
        let pg = "postgres://kanade@db/kanade";
        let replica = "postgres://kanade@db-replica/kanade";
        assert!(
            serve(&["--database-url", pg, "--read-database-url", replica])
                .validate()
                .is_ok()
        );
        let beside_sqlite = serve(&["--read-database-url", replica])
            .validate()
            .unwrap_err();
        assert!(
            beside_sqlite.contains("needs a PostgreSQL --database-url"),
            "{beside_sqlite}"
        );
        let sqlite_replica = serve(&["--database-url", pg, "--read-database-url", "sqlite://r.db"])
            .validate()
            .unwrap_err();
        assert!(
            sqlite_replica.contains("must be a postgres://"),
            "{sqlite_replica}"
        );
    }

    #[test]
    fn the_console_follows_the_exposure_rule_and_needs_tokens_under_mtls() {
        let open = serve(&["--console-listen", "0.0.0.0:8080"])
            .validate()
            .unwrap_err();
        assert!(
            open.contains("console without authentication on 0.0.0.0:8080"),
            "{open}"
        );
        assert!(
            serve(&[
                "--console-listen",
                "0.0.0.0:8080",
                "--tokens-file",
                "t.toml"
            ])
            .validate()
            .is_ok()
        );
        assert!(
            serve(&["--console-listen", "off", "--listen", "127.0.0.1:1"])
                .validate()
                .is_ok()
        );
        let mtls = serve(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--client-ca",
            "ca.pem",
        ])
        .validate()
        .unwrap_err();
        assert!(mtls.contains("needs --tokens-file"), "{mtls}");
        let bad =
            Cli::try_parse_from(["kanade-ingest", "--console-listen", "nowhere"]).unwrap_err();
        assert!(
            bad.to_string()
                .contains("\"nowhere\" is not an address like 127.0.0.1:8080, or off"),
            "{bad}"
        );
    }
}
