//! The agent's settings: a TOML file, overridden by environment variables and flags (precedence
//! flag > env > file, SPEC §4), merged here and nowhere else. A bad file gets an error naming
//! the file, the line and the key.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use kanade_shared::{backoff::Backoff, limits, tls::PemFile, wire};
use serde::{Deserialize, Deserializer};

use crate::{cli::CommonArgs, execution::RunRequest};

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a duration like 30s, 5m or 90d: {e}"))
    })
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// How hard the outbox syncs to disk on commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit reaches the disk before it returns: nothing is lost on power loss.
    #[default]
    Full,
    /// Faster; the last commits may be lost on power loss (never on a process crash).
    Normal,
}

/// The config file as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pc_id: Option<String>,
    ingest: Option<String>,
    data_dir: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    output_cap_bytes: Option<usize>,
    tail_rate_bytes: Option<u64>,
    outbox_cap_bytes: Option<u64>,
    outbox_synchronous: Option<Synchronous>,
    send_window: Option<u32>,
    send_window_bytes: Option<u64>,
    #[serde(default, deserialize_with = "optional_duration")]
    keepalive: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    keepalive_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    reconnect_max: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    interrupted_check: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    kill_grace: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    status_every: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    shutdown_grace: Option<Duration>,
    max_concurrent_runs: Option<usize>,
    #[serde(default, rename = "job")]
    jobs: Vec<JobConfig>,
}

/// One `[[job]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobConfig {
    manifest_id: String,
    #[serde(default)]
    version: String,
    command: Option<Vec<String>>,
    shell: Option<String>,
    script: Option<String>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    every: Option<Duration>,
    cron: Option<String>,
    #[serde(default, deserialize_with = "optional_duration")]
    jitter: Option<Duration>,
}

/// What a run executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// A program and its arguments, run directly.
    Command(Vec<String>),
    /// A script run by a shell (`SHELL -c SCRIPT`).
    Shell { shell: String, script: String },
}

impl Program {
    /// The argv the runner spawns.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Program::Command(argv) => argv.clone(),
            Program::Shell { shell, script } => vec![shell.clone(), "-c".into(), script.clone()],
        }
    }
}

/// When a scheduled job fires.
#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

/// A scheduled job, validated.
#[derive(Debug, Clone)]
pub struct Job {
    pub manifest_id: String,
    pub version: String,
    pub program: Program,
    pub timeout: Option<Duration>,
    pub schedule: Schedule,
    pub jitter: Duration,
}

/// Everything the agent runs with, merged from file, env and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pc_id: String,
    pub ingest: String,
    /// Set exactly when `ingest` is an `https://` URL.
    pub tls: Option<ClientTls>,
    /// The bearer token, read from `token_file`.
    pub token: Option<Secret>,
    pub data_dir: PathBuf,
    pub output_cap_bytes: usize,
    /// Live output sent of one run while it is watched, in bytes per second (both outputs).
    pub tail_rate_bytes: u64,
    pub outbox_cap_bytes: u64,
    pub outbox_synchronous: Synchronous,
    pub send_window: u32,
    pub send_window_bytes: u64,
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
    pub reconnect: Backoff,
    pub interrupted_check: Duration,
    pub kill_grace: Duration,
    /// How often the sender reports the agent's status to ingest.
    pub status_every: Duration,
    pub shutdown_grace: Duration,
    pub max_concurrent_runs: usize,
    pub jobs: Vec<Job>,
}

/// A secret value: its `Debug` never shows it, so settings can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the agent speaks TLS to ingest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA(s) that signed ingest's certificate; `None` trusts the system's roots.
    pub ca_cert: Option<PemFile>,
    /// This endpoint's certificate and key, presented when ingest asks (mTLS).
    pub client_certificate: Option<ClientCertificate>,
}

/// A client certificate and its private key (whose contents `Debug` never shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert: PemFile,
    pub key: PemFile,
}

/// Reads and checks the TLS files now, so a bad path or file fails at start with its name,
/// not at every reconnect.
fn client_tls(
    ingest: &str,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
) -> anyhow::Result<Option<ClientTls>> {
    if !ingest.starts_with("https://") {
        if ca_cert.is_some() || client_cert.is_some() || client_key.is_some() {
            bail!(
                "ca_cert, client_cert and client_key are for TLS, but the ingest URL {ingest:?} \
                 is plaintext: use an https:// URL"
            );
        }
        return Ok(None);
    }
    let ca_cert = match ca_cert {
        Some(path) => {
            let file = PemFile::read(&path, "ca_cert")?;
            file.certificates()?;
            Some(file)
        }
        None => None,
    };
    let client_certificate = match (client_cert, client_key) {
        (Some(cert), Some(key)) => {
            let cert = PemFile::read(&cert, "client_cert")?;
            cert.certificates()?;
            let key = PemFile::read(&key, "client_key")?;
            key.private_key()?;
            Some(ClientCertificate { cert, key })
        }
        (None, None) => None,
        _ => bail!("client_cert and client_key go together: give both or neither"),
    };
    Ok(Some(ClientTls {
        ca_cert,
        client_certificate,
    }))
}

/// Reads a token file: the token is its content without surrounding whitespace.
fn read_token(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "the token file {} must hold exactly one token",
            path.display()
        );
    }
    Ok(Secret(token.to_string()))
}

/// `ingest`: a local ingest, as `cargo run -p kanade-ingest` serves it.
pub const DEFAULT_INGEST: &str = "http://127.0.0.1:50051";
/// `data_dir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kanade-agent";
/// `outbox_cap_bytes`: past this, queued outputs are cut (never event metadata).
pub const DEFAULT_OUTBOX_CAP_BYTES: u64 = 512 * 1024 * 1024;
/// `keepalive`: an HTTP/2 ping this often on an idle stream notices a dead connection.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
/// `keepalive_timeout`: a ping unanswered this long ends the connection.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first reconnect waits up to this long (full jitter), doubling up to `reconnect_max`.
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// `reconnect_max`: the longest wait between reconnects.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// `interrupted_check`: how often the daemon looks for runs of dead agent processes (its beat).
pub const DEFAULT_INTERRUPTED_CHECK: Duration = Duration::from_secs(10);
/// `kill_grace`: between TERM and KILL when a run is ended.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// `status_every`: how often the agent reports its backlog, dead letters and runs to ingest
/// (also right after connecting, and when its backlog changes a lot).
pub const DEFAULT_STATUS_EVERY: Duration = Duration::from_secs(60);
/// `shutdown_grace`: how long the daemon's shutdown lets running runs finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// `max_concurrent_runs`: scheduled runs at once; more wait for a slot.
pub const DEFAULT_MAX_CONCURRENT_RUNS: usize = 4;

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    // toml's message carries the line, the column and the offending key.
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

fn job(path: &str, index: usize, j: JobConfig, pc_id: &str) -> anyhow::Result<Job> {
    let at = format!("{path}: job #{} ({:?})", index + 1, j.manifest_id);
    let program = match (j.command, j.shell, j.script) {
        (Some(command), None, None) if !command.is_empty() => Program::Command(command),
        (None, shell, Some(script)) => Program::Shell {
            shell: shell.unwrap_or_else(|| "/bin/sh".into()),
            script,
        },
        _ => bail!(
            "{at}: give either `command = [\"prog\", \"arg\"]` or `script` (with an optional `shell`)"
        ),
    };
    let schedule = match (j.every, j.cron) {
        (Some(every), None) if !every.is_zero() => Schedule::Every(every),
        (None, Some(cron)) => {
            Schedule::Cron(Box::new(parse_cron(&cron).with_context(|| at.clone())?))
        }
        _ => bail!("{at}: give either `every = \"5m\"` or `cron = \"*/5 * * * *\"`"),
    };
    let job = Job {
        manifest_id: j.manifest_id,
        version: j.version,
        program,
        timeout: j.timeout,
        schedule,
        jitter: j.jitter.unwrap_or_default(),
    };
    // Every firing's events must be acceptable to ingest, ids derived from the job included
    // (request_id is `schedule:MANIFEST_ID`); the job's own id is named first.
    wire::check_required_id("manifest_id", &job.manifest_id)
        .and_then(|()| RunRequest::scheduled(&job).check(pc_id))
        .map_err(|e| anyhow::anyhow!("{at}: its runs would be refused by ingest: {e}"))?;
    Ok(job)
}

/// Parses a five-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse_cron(expr: &str) -> anyhow::Result<croner::Cron> {
    use croner::parser::{CronParser, Seconds};
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| anyhow::anyhow!("cron {expr:?} is not a five-field cron expression: {e}"))
}

impl Settings {
    /// Merges the config file (if any) with env and flags, which clap already merged.
    pub fn load(args: &CommonArgs) -> anyhow::Result<Settings> {
        let (file, path) = match &args.config {
            Some(path) => (read_file(path)?, path.display().to_string()),
            None => (FileConfig::default(), "(no config file)".to_string()),
        };
        let token = match args.token_file.clone().or(file.token_file) {
            Some(path) => Some(read_token(&path)?),
            None => None,
        };
        let ingest = args
            .ingest
            .clone()
            .or(file.ingest)
            .unwrap_or_else(|| DEFAULT_INGEST.to_string());
        if !(ingest.starts_with("http://") || ingest.starts_with("https://")) {
            bail!("ingest URL {ingest:?} must start with http:// or https://");
        }
        let tls = client_tls(
            &ingest,
            args.ca_cert.clone().or(file.ca_cert),
            args.client_cert.clone().or(file.client_cert),
            args.client_key.clone().or(file.client_key),
        )?;
        let pc_id = args.pc_id.clone().or(file.pc_id).unwrap_or_else(hostname);
        wire::check_required_id("pc_id", &pc_id)
            .map_err(|e| anyhow::anyhow!("pc_id {pc_id:?} is not usable: {e}"))?;
        let jobs = file
            .jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| job(&path, i, j, &pc_id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let settings = Settings {
            pc_id,
            ingest,
            tls,
            token,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            output_cap_bytes: file
                .output_cap_bytes
                .unwrap_or(limits::DEFAULT_OUTPUT_CAP_BYTES),
            tail_rate_bytes: file
                .tail_rate_bytes
                .unwrap_or(limits::DEFAULT_TAIL_RATE_BYTES),
            outbox_cap_bytes: file.outbox_cap_bytes.unwrap_or(DEFAULT_OUTBOX_CAP_BYTES),
            outbox_synchronous: file.outbox_synchronous.unwrap_or_default(),
            send_window: file.send_window.unwrap_or(limits::DEFAULT_MAX_UNACKED),
            send_window_bytes: file
                .send_window_bytes
                .unwrap_or(limits::DEFAULT_MAX_UNACKED_BYTES),
            keepalive: file.keepalive.unwrap_or(DEFAULT_KEEPALIVE),
            keepalive_timeout: file.keepalive_timeout.unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT),
            reconnect: Backoff {
                base: RECONNECT_BASE,
                cap: file.reconnect_max.unwrap_or(DEFAULT_RECONNECT_MAX),
            },
            interrupted_check: file.interrupted_check.unwrap_or(DEFAULT_INTERRUPTED_CHECK),
            kill_grace: file.kill_grace.unwrap_or(DEFAULT_KILL_GRACE),
            status_every: file.status_every.unwrap_or(DEFAULT_STATUS_EVERY),
            shutdown_grace: file.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            max_concurrent_runs: file
                .max_concurrent_runs
                .unwrap_or(DEFAULT_MAX_CONCURRENT_RUNS),
            jobs,
        };
        if settings.output_cap_bytes * 2 + 64 * 1024 > limits::MAX_EVENT_BYTES {
            bail!(
                "output_cap_bytes {} is too large: two outputs must fit an event of {} bytes",
                settings.output_cap_bytes,
                limits::MAX_EVENT_BYTES
            );
        }
        if settings.send_window == 0 || settings.max_concurrent_runs == 0 {
            bail!("send_window and max_concurrent_runs must be at least 1");
        }
        if settings.tail_rate_bytes == 0 {
            bail!(
                "{path}: tail_rate_bytes must be at least 1 (the live output of a watched run, in \
                 bytes per second; default {})",
                limits::DEFAULT_TAIL_RATE_BYTES
            );
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn args(config: Option<PathBuf>) -> CommonArgs {
        CommonArgs {
            config,
            ingest: None,
            pc_id: None,
            data_dir: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            token_file: None,
        }
    }

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let f = file_with(
            "pc_id = \"from-file\"\ningest = \"http://file:1\"\nkeepalive = \"3s\"\n\
             [[job]]\nmanifest_id = \"inv\"\ncommand = [\"true\"]\nevery = \"5m\"\n\
             [[job]]\nmanifest_id = \"cron\"\nscript = \"echo hi\"\ncron = \"*/5 * * * *\"\njitter = \"10s\"\n",
        );
        let mut a = args(Some(f.path().to_path_buf()));
        a.pc_id = Some("from-flag".into());
        let s = Settings::load(&a).unwrap();
        assert_eq!(s.pc_id, "from-flag");
        assert_eq!(s.ingest, "http://file:1");
        assert_eq!(s.keepalive, Duration::from_secs(3));
        assert_eq!(s.send_window, 512);
        assert_eq!(s.jobs.len(), 2);
        assert_eq!(
            s.jobs[1].program,
            Program::Shell {
                shell: "/bin/sh".into(),
                script: "echo hi".into()
            }
        );
        assert_eq!(s.jobs[1].jitter, Duration::from_secs(10));
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let s = Settings::load(&args(Some(example))).unwrap();
        assert_eq!(s.pc_id, "web-01");
        assert_eq!(s.jobs.len(), 2);
        assert_eq!(s.outbox_synchronous, Synchronous::Full);
    }

    #[test]
    fn the_token_is_read_from_its_file_and_never_shown() {
        let token = file_with("  s3cret-token\n");
        let mut a = args(None);
        a.token_file = Some(token.path().to_path_buf());
        let s = Settings::load(&a).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("s3cret-token"));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn tls_settings_need_an_https_url_readable_files_and_come_in_pairs() {
        let pem = rcgen::generate_simple_self_signed(vec!["pc-1".to_string()]).unwrap();
        let cert = file_with(&pem.cert.pem());
        let key = file_with(&pem.signing_key.serialize_pem());
        let path = |f: &tempfile::NamedTempFile| Some(f.path().to_path_buf());
        let load = |ingest: &str, ca, client_cert, client_key| {
            let mut a = args(None);
            a.ingest = Some(ingest.into());
            (a.ca_cert, a.client_cert, a.client_key) = (ca, client_cert, client_key);
            Settings::load(&a)
        };

        let s = load("https://ingest:443", path(&cert), path(&cert), path(&key)).unwrap();
        let tls = s.tls.clone().unwrap();
        assert_eq!(tls.ca_cert.unwrap().contents(), pem.cert.pem().as_bytes());
        let client = tls.client_certificate.unwrap();
        assert_eq!(
            client.key.contents(),
            pem.signing_key.serialize_pem().as_bytes()
        );
        let key_line = pem
            .signing_key
            .serialize_pem()
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        assert!(
            !format!("{s:?}").contains(&key_line),
            "Debug never shows the key"
        );
        // https alone trusts the system's roots.
        assert_eq!(
            load("https://ingest:443", None, None, None).unwrap().tls,
            Some(ClientTls::default())
        );
        assert_eq!(
            load("http://ingest:80", None, None, None).unwrap().tls,
            None
        );

        let err = |r: anyhow::Result<Settings>| format!("{:#}", r.unwrap_err());
        assert!(err(load("http://ingest:80", path(&cert), None, None)).contains("https://"));
        assert!(err(load("https://ingest:443", None, path(&cert), None)).contains("go together"));
        let e = err(load("https://ingest:443", path(&key), None, None));
        assert!(
            e.contains("ca_cert") && e.contains("no `-----BEGIN CERTIFICATE"),
            "{e}"
        );
        let e = err(load("https://ingest:443", None, path(&cert), path(&cert)));
        assert!(e.contains("client_key") && e.contains("private key"), "{e}");
    }

    #[test]
    fn a_bad_config_names_the_file_the_line_and_the_key() {
        let f = file_with("pc_id = \"a\"\n\nkeepalive = \"soon\"\n");
        let err = format!(
            "{:#}",
            Settings::load(&args(Some(f.path().to_path_buf()))).unwrap_err()
        );
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("keepalive"), "{err}");

        let f = file_with("pc_id = \"a\"\nsend_windw = 3\n");
        let err = format!(
            "{:#}",
            Settings::load(&args(Some(f.path().to_path_buf()))).unwrap_err()
        );
        assert!(
            err.contains("line 2") && err.contains("send_windw"),
            "{err}"
        );
    }

    #[test]
    fn jobs_whose_runs_ingest_would_refuse_are_refused_at_load_with_the_rule() {
        for (manifest, needle) in [
            (
                "m".repeat(129),
                "manifest_id is 129 bytes long, at most 128",
            ),
            // request_id is derived as schedule:MANIFEST_ID: 9 + 120 bytes.
            ("m".repeat(120), "request_id is 129 bytes long, at most 128"),
        ] {
            let f = file_with(&format!(
                "[[job]]\nmanifest_id = \"{manifest}\"\ncommand = [\"true\"]\nevery = \"1m\"\n"
            ));
            let err = format!(
                "{:#}",
                Settings::load(&args(Some(f.path().to_path_buf()))).unwrap_err()
            );
            assert!(
                err.contains("job #1") && err.contains(needle),
                "{needle}: {err}"
            );
        }
        let f = file_with(
            "[[job]]\nmanifest_id = \"inventory\"\ncommand = [\"true\"]\nevery = \"1m\"\n",
        );
        let mut a = args(Some(f.path().to_path_buf()));
        a.pc_id = Some("p".repeat(129));
        let err = format!("{:#}", Settings::load(&a).unwrap_err());
        assert!(err.contains("pc_id is 129 bytes long"), "{err}");
        a.pc_id = Some("pc-1".into());
        assert!(Settings::load(&a).is_ok());
    }

    #[test]
    fn jobs_need_exactly_one_program_and_one_schedule() {
        for (text, needle) in [
            (
                "[[job]]\nmanifest_id = \"x\"\nevery = \"1m\"\n",
                "either `command",
            ),
            (
                "[[job]]\nmanifest_id = \"x\"\ncommand = [\"true\"]\n",
                "either `every",
            ),
            (
                "[[job]]\nmanifest_id = \"x\"\ncommand = [\"true\"]\ncron = \"* * *\"\n",
                "five-field",
            ),
            (
                "[[job]]\nmanifest_id = \"x\"\ncommand = [\"true\"]\ncron = \"0 * * * * *\"\n",
                "five-field",
            ),
        ] {
            let f = file_with(text);
            let err = format!(
                "{:#}",
                Settings::load(&args(Some(f.path().to_path_buf()))).unwrap_err()
            );
            assert!(
                err.contains(needle) && err.contains("job #1"),
                "{text}: {err}"
            );
        }
    }
}
