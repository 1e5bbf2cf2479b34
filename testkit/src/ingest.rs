//! The real `kanade-ingest` binary, started by a test on an ephemeral port.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use kanade_shared::pb::{
    activity_client::ActivityClient, control_client::ControlClient, ingest_client::IngestClient,
};
use tonic::transport::Channel;

use crate::{
    ca::{IssuedCert, TestCa},
    workspace_binary,
};

/// A running `kanade-ingest`. Killed (SIGKILL) when dropped.
pub struct TestIngest {
    /// Where its gRPC services listen.
    pub addr: SocketAddr,
    /// Where its web console listens (on a free loopback port unless the test said otherwise),
    /// `None` when it is off.
    pub console_addr: Option<SocketAddr>,
    /// The console's URL as ingest printed it (`http://…`, or `https://…` under TLS).
    console_url: Option<String>,
    pub child: Child,
    /// Its stderr (the log), kept in a file of its own.
    pub stderr_log: PathBuf,
    _log_dir: tempfile::TempDir,
}

/// How a [`TestIngest`] is started: on loopback port 0 with test timings unless told otherwise.
#[must_use]
pub struct TestIngestBuilder {
    database_url: String,
    listen: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    fd_limit: Option<u64>,
}

impl TestIngestBuilder {
    /// Runs the process with at most this many open files (soft and hard: `prlimit`).
    pub fn fd_limit(mut self, limit: u64) -> Self {
        self.fd_limit = Some(limit);
        self
    }

    /// Listens on this address instead of a fresh port (to restart ingest where agents expect it).
    pub fn listen(mut self, addr: impl ToString) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// Adds command-line flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds environment variables.
    pub fn envs<K: ToString, V: ToString>(mut self, envs: &[(K, V)]) -> Self {
        self.envs
            .extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Serves TLS with `server`'s certificate and key.
    pub fn tls(self, server: &IssuedCert) -> Self {
        let (cert, key) = (server.cert.display(), server.key.display());
        self.args(&[
            "--tls-cert",
            &cert.to_string(),
            "--tls-key",
            &key.to_string(),
        ])
    }

    /// mTLS: a server certificate issued by `ca`, and client certificates required from `ca`.
    pub fn mtls(self, ca: &TestCa) -> Self {
        let ca_path = ca.cert_path().display().to_string();
        self.tls(&ca.server("server"))
            .args(&["--client-ca", &ca_path])
    }

    /// Starts the process and waits for its "listening on" line.
    pub async fn start(self) -> TestIngest {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let stderr_log = log_dir.path().join("stderr.log");
        let binary = workspace_binary("kanade-ingest");
        let mut command = match self.fd_limit {
            // prlimit sets the limits and then execs the binary: same process.
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limit}")).arg("--").arg(binary);
                c
            }
            None => Command::new(binary),
        };
        // The console on a free port (never the default 8080 that concurrent tests would share),
        // unless the test chose.
        // Under mTLS without tokens nobody could sign in: such an ingest serves no console.
        let has = |flag: &str| self.args.iter().any(|a| a == flag);
        let console_chosen = self.args.iter().position(|a| a == "--console-listen");
        let console_default: &[&str] = match console_chosen {
            Some(_) => &[],
            None if has("--client-ca") && !has("--tokens-file") => &["--console-listen", "off"],
            None => &["--console-listen", "127.0.0.1:0"],
        };
        let console_on = match console_chosen {
            Some(i) => self.args.get(i + 1).is_some_and(|v| v != "off"),
            None => console_default[1] != "off",
        };
        let mut child = command
            .args([
                "--listen",
                &self.listen,
                "--database-url",
                &self.database_url,
            ])
            .args(console_default)
            .args(["--health-check-every", "200ms", "--retry-max", "300ms"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.envs)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("log file"))
            .spawn()
            .expect("starting kanade-ingest");
        let stdout = child.stdout.take().expect("stdout");
        let (addr, console) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut next_line = |what: &str| {
                lines
                    .next()
                    .unwrap_or_else(|| panic!("kanade-ingest exited before printing {what}"))
                    .expect("reading stdout")
            };
            let line = next_line("where it listens");
            let addr = line
                .rsplit_once("listening on ")
                .map(|(_, a)| a.trim().parse::<SocketAddr>().expect("address"))
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
            let console = console_on.then(|| {
                let line = next_line("where the console listens");
                let url = line
                    .strip_prefix("console on ")
                    .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                    .trim()
                    .to_string();
                let addr = url
                    .split_once("://")
                    .and_then(|(_, a)| a.parse::<SocketAddr>().ok())
                    .unwrap_or_else(|| panic!("no address in {line:?}"));
                (addr, url)
            });
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            (addr, console)
        })
        .await
        .expect("reading the listening lines");
        let (console_addr, console_url) = console.unzip();
        TestIngest {
            addr,
            console_addr,
            console_url,
            child,
            stderr_log,
            _log_dir: log_dir,
        }
    }
}

impl TestIngest {
    /// How to start one on `database_url`.
    pub fn builder(database_url: &str) -> TestIngestBuilder {
        TestIngestBuilder {
            database_url: database_url.to_string(),
            listen: "127.0.0.1:0".to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            fd_limit: None,
        }
    }

    /// Starts one with the test defaults.
    pub async fn start(database_url: &str) -> TestIngest {
        TestIngest::builder(database_url).start().await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn ingest(&self) -> IngestClient<Channel> {
        IngestClient::connect(self.url()).await.expect("connecting")
    }

    pub async fn activity(&self) -> ActivityClient<Channel> {
        ActivityClient::connect(self.url())
            .await
            .expect("connecting")
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::connect(self.url())
            .await
            .expect("connecting")
    }

    /// The result_id of the newest run this ingest lists as running, once there is one (15 s at
    /// most).
    pub async fn running_run(&self) -> String {
        let mut activity = self.activity().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let page = activity
                .list_executions(kanade_shared::pb::ListExecutionsRequest {
                    states: vec![kanade_shared::pb::ExecutionState::Running as i32],
                    ..Default::default()
                })
                .await
                .expect("listing runs");
            if let Some(run) = page.into_inner().executions.first() {
                return run.result_id.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no run was listed as running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes one event through the Ingest service's unary `Publish`; panics unless it is
    /// committed.
    pub async fn publish(&self, body: kanade_shared::wire::EventBody) {
        self.ingest()
            .await
            .publish(kanade_shared::pb::Event::from(kanade_shared::wire::Event {
                seq: 0,
                body,
                trace_context: Default::default(),
            }))
            .await
            .expect("published");
    }

    /// The console's base URL as ingest printed it (`http://127.0.0.1:PORT`, `https://…` under
    /// TLS); panics when the console is off.
    pub fn console_url(&self) -> String {
        self.console_url
            .clone()
            .expect("this ingest serves no console")
    }

    /// What ingest logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The lines ingest logged so far at `level` (`"ERROR"`, `"WARN"`, …: the text format's
    /// second field, after the timestamp).
    pub fn log_lines_at(&self, level: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.split_whitespace().nth(1) == Some(level))
            .map(str::to_string)
            .collect()
    }

    /// SIGKILL, as a crash or the OOM killer would; waits until the process is gone.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping ingest");
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub async fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ingest ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestIngest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Health of one service as seen through gRPC.
pub async fn health(addr: SocketAddr, service: &str) -> i32 {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// `kanade-ingest token add ARGS --tokens-file FILE` (ARGS: a pc_id, or `--reader`): the token it
/// printed.
pub fn add_token(tokens_file: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(workspace_binary("kanade-ingest"))
        .args(["token", "add"])
        .args(args)
        .arg("--tokens-file")
        .arg(tokens_file)
        .output()
        .expect("running kanade-ingest token add");
    assert!(out.status.success(), "token add failed: {out:?}");
    String::from_utf8(out.stdout)
        .expect("a printable token")
        .trim()
        .to_string()
}
