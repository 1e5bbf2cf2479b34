#![allow(dead_code)] // Shared by the ingest and agent test binaries; each uses a part.

//! The harness every ingest test uses: fresh databases, the real `kanade-ingest` binary started
//! on an ephemeral port, gRPC clients, event builders, and a TCP proxy that can cut connections.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, SubsecRound, Utc};
use kanade_ingest::store::{self, Store};
use kanade_shared::{
    pb::{self, activity_client::ActivityClient, ingest_client::IngestClient},
    wire::{self, EventBody, EventStarted, ExecResult, ExecStatus},
};
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
};
use tonic::transport::Channel;
use uuid::Uuid;

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("KANADE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of its own for one test: a fresh PostgreSQL database (dropped afterwards) or a
/// fresh SQLite file in a temporary directory.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => TestDb::postgres().await,
            Backend::Sqlite => TestDb::sqlite(),
        }
    }

    pub async fn postgres() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("kanade_test_{}", Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need PostgreSQL at {admin}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("creating a test database");
        pool.close().await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        TestDb {
            url: format!("{base}/{name}"),
            pg_name: Some(name),
            _dir: None,
        }
    }

    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("ingest.db").display());
        TestDb {
            url,
            pg_name: None,
            _dir: Some(dir),
        }
    }

    /// The store itself, migrated, for direct inspection.
    pub async fn store(&self) -> Arc<dyn Store> {
        let store = store::open(&self.url).await.expect("opening the store");
        store.migrate().await.expect("migrating");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside any runtime guarantee: use a small one of its own.
        let admin = postgres_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A binary of this workspace: cargo says where for the package under test; the others sit next
/// to it in the target directory (`cargo test --workspace` builds them all).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let path = std::env::current_exe()
        .expect("test executable path")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build -p {name}` first)",
        path.display()
    );
    path
}

/// A free loopback address, for a server that must come back on the same port.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// The real `kanade-ingest` binary, started on an ephemeral port. Killed (SIGKILL) when dropped.
pub struct TestIngest {
    pub addr: SocketAddr,
    pub child: Child,
    pub stderr_log: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
}

impl TestIngest {
    pub async fn start(database_url: &str) -> TestIngest {
        TestIngest::start_with(database_url, &[]).await
    }

    /// Starts ingest with extra flags; waits for its "listening on" line.
    pub async fn start_with(database_url: &str, args: &[&str]) -> TestIngest {
        TestIngest::start_on("127.0.0.1:0", database_url, args).await
    }

    /// Starts ingest on a given address (to restart one where agents expect it).
    pub async fn start_on(listen: &str, database_url: &str, args: &[&str]) -> TestIngest {
        TestIngest::start_full(listen, database_url, args, &[]).await
    }

    /// Starts ingest with extra flags and environment variables.
    pub async fn start_full(
        listen: &str,
        database_url: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> TestIngest {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let stderr_log = log_dir.path().join("stderr.log");
        let mut child = Command::new(workspace_binary("kanade-ingest"))
            .args(["--listen", listen, "--database-url", database_url])
            .args(["--health-check-every", "200ms", "--retry-max", "300ms"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("log file"))
            .spawn()
            .expect("starting kanade-ingest");
        let stdout = child.stdout.take().expect("stdout");
        let addr = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let line = lines
                .next()
                .expect("kanade-ingest exited before listening")
                .expect("reading stdout");
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            line.rsplit_once("listening on ")
                .map(|(_, a)| a.trim().parse::<SocketAddr>().expect("address"))
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        })
        .await
        .expect("reading the listening line");
        TestIngest {
            addr,
            child,
            stderr_log,
            _log_dir: log_dir,
        }
    }

    /// Starts ingest serving TLS with `server`'s certificate and key, plus `args`.
    pub async fn start_tls(database_url: &str, server: &IssuedCert, args: &[&str]) -> TestIngest {
        let mut all = vec![
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        TestIngest::start_with(database_url, &all).await
    }

    /// Starts ingest with mTLS: a server certificate issued by `ca`, and client certificates
    /// required from `ca` (`--client-ca`), plus `args`.
    pub async fn start_mtls(database_url: &str, ca: &TestCa, args: &[&str]) -> TestIngest {
        let ca_path = ca.cert_path();
        let mut all = vec!["--client-ca", ca_path.to_str().unwrap()];
        all.extend_from_slice(args);
        TestIngest::start_tls(database_url, &ca.server("server"), &all).await
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

    /// What ingest logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
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

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- events

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// One run's two events, for building test traffic.
#[derive(Debug, Clone)]
pub struct Run {
    pub result_id: String,
    pub pc_id: String,
    pub started_at: DateTime<Utc>,
}

impl Run {
    pub fn new(pc_id: &str) -> Run {
        Run {
            result_id: Uuid::now_v7().to_string(),
            pc_id: pc_id.to_string(),
            started_at: now(),
        }
    }

    /// This run's row in `store`, if any.
    pub async fn stored_in(&self, store: &dyn Store) -> Option<store::ExecutionRow> {
        let id = Uuid::parse_str(&self.result_id).unwrap();
        store
            .get(id, now(), chrono::Duration::minutes(5))
            .await
            .unwrap()
    }

    pub fn at(pc_id: &str, started_at: DateTime<Utc>) -> Run {
        Run {
            started_at,
            ..Run::new(pc_id)
        }
    }

    pub fn started(&self) -> EventStarted {
        EventStarted {
            result_id: self.result_id.clone(),
            request_id: "req-1".into(),
            exec_id: "exec-1".into(),
            pc_id: self.pc_id.clone(),
            started_at: self.started_at,
            manifest_id: "inventory".into(),
            version: "3".into(),
            timeout_secs: Some(60),
        }
    }

    pub fn result(&self, status: ExecStatus, exit_code: Option<i32>) -> ExecResult {
        ExecResult {
            result_id: self.result_id.clone(),
            request_id: "req-1".into(),
            exec_id: "exec-1".into(),
            pc_id: self.pc_id.clone(),
            manifest_id: "inventory".into(),
            version: "3".into(),
            status,
            exit_code,
            stdout: format!("output of {}\n", self.result_id),
            stderr: String::new(),
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            started_at: self.started_at,
            finished_at: self.started_at + chrono::Duration::milliseconds(1500),
        }
    }

    pub fn started_event(&self, seq: u64) -> pb::Event {
        wire::Event {
            seq,
            body: EventBody::Started(self.started()),
            trace_context: Default::default(),
        }
        .into()
    }

    pub fn result_event(&self, seq: u64) -> pb::Event {
        wire::Event {
            seq,
            body: EventBody::Result(self.result(ExecStatus::Succeeded, Some(0))),
            trace_context: Default::default(),
        }
        .into()
    }
}

// ---------------------------------------------------------------- agent streams

/// A raw agent stream driven by a test: send messages, read answers.
pub struct AgentStream {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::IngestMessage>,
}

pub fn hello(pc_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            pc_id: pc_id.to_string(),
            agent_version: "test".into(),
        })),
    }
}

pub fn event_msg(e: pb::Event) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Event(e)),
    }
}

impl AgentStream {
    /// Opens a stream whose first message is `first` (normally a Hello).
    pub async fn open_with(
        client: &mut IngestClient<Channel>,
        first: Option<pb::AgentMessage>,
    ) -> Result<AgentStream, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        if let Some(first) = first {
            tx.send(first).await.unwrap();
        }
        let response = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok(AgentStream {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Opens a stream for `pc_id` and reads its Welcome.
    pub async fn open(client: &mut IngestClient<Channel>, pc_id: &str) -> AgentStream {
        let mut stream = AgentStream::open_with(client, Some(hello(pc_id)))
            .await
            .expect("opening a stream");
        match stream.next().await {
            Some(pb::ingest_message::Msg::Welcome(_)) => stream,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&self, e: pb::Event) {
        self.tx.send(event_msg(e)).await.expect("stream open");
    }

    /// The next message, or None when the stream ended (panics after 20 s of silence).
    pub async fn next(&mut self) -> Option<pb::ingest_message::Msg> {
        self.try_next().await.expect("stream failed")
    }

    pub async fn try_next(&mut self) -> Result<Option<pb::ingest_message::Msg>, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(20), self.rx.message()).await {
            Ok(r) => r.map(|m| m.and_then(|m| m.msg)),
            Err(_) => panic!("no message from ingest within 20 s"),
        }
    }

    /// Reads until `count` seqs were acked or rejected; returns (acked, rejected with reasons).
    pub async fn answers(&mut self, count: usize) -> (Vec<u64>, Vec<(u64, String)>) {
        let mut acked = Vec::new();
        let mut rejected = Vec::new();
        while acked.len() + rejected.len() < count {
            match self.next().await {
                Some(pb::ingest_message::Msg::Ack(a)) => acked.extend(a.seqs),
                Some(pb::ingest_message::Msg::Reject(r)) => rejected.push((r.seq, r.reason)),
                other => panic!("unexpected {other:?}"),
            }
        }
        acked.sort_unstable();
        (acked, rejected)
    }
}

// ---------------------------------------------------------------- fault injection

/// A TCP proxy between a client and a server that a test can break: `cut()` drops every open
/// connection and refuses new ones; `blackhole()` silently stops forwarding on every connection,
/// open and new (like a dead network path: no FIN, no RST); `heal()` lets NEW connections through
/// again — connections broken before stay broken, so only a client that notices and reconnects
/// recovers.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<tokio::sync::watch::Sender<ProxyState>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyState {
    Forwarding,
    Cut,
    Blackhole,
}

/// Holds a connection open without ever moving a byte again.
async fn hold<T>(held: T) {
    let _held = held;
    std::future::pending::<()>().await
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(tokio::sync::watch::Sender::new(ProxyState::Forwarding));
        let states = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                // Subscribed before anything else, so no state change can slip past.
                let mut state = states.subscribe();
                tokio::spawn(async move {
                    let now = *state.borrow_and_update();
                    let outbound = match now {
                        ProxyState::Cut => return,
                        ProxyState::Blackhole => return hold(inbound).await,
                        ProxyState::Forwarding => TcpStream::connect(upstream).await,
                    };
                    let Ok(mut outbound) = outbound else { return };
                    let broken = tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => return,
                        broken = state.wait_for(|s| *s != ProxyState::Forwarding) => broken.map(|s| *s),
                    };
                    if matches!(broken, Ok(ProxyState::Blackhole)) {
                        hold((inbound, outbound)).await;
                    }
                });
            }
        });
        FaultProxy { addr, state }
    }

    fn set(&self, state: ProxyState) {
        self.state.send_replace(state);
    }

    pub fn cut(&self) {
        self.set(ProxyState::Cut);
    }

    pub fn blackhole(&self) {
        self.set(ProxyState::Blackhole);
    }

    pub fn heal(&self) {
        self.set(ProxyState::Forwarding);
    }
}

// ---------------------------------------------------------------- OpenTelemetry

/// One span as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: std::collections::HashMap<String, String>,
    /// (trace id, span id) of every link.
    pub links: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A real OTLP/gRPC trace receiver on an ephemeral port, collecting every span it is sent.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<std::sync::Mutex<Vec<CollectedSpan>>>,
}

#[derive(Clone)]
struct Collector(Arc<std::sync::Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| any_value(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(CollectedSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), any_value(&a.value)))
                            .collect(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
        let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            Collector(spans.clone()),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        OtlpReceiver { addr, spans }
    }

    /// The environment that points a program at this receiver, exporting quickly.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", self.addr),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ]
    }

    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- certificates

/// A certificate authority made for one test (rcgen), writing PEM files into its own temp dir.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

/// A certificate and key issued by a [`TestCa`], as PEM files.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl IssuedCert {
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).unwrap()
    }

    /// Copies this certificate and key over `to`'s files (as a certificate rotation would).
    pub fn install_over(&self, to: &IssuedCert) {
        std::fs::copy(&self.key, &to.key).unwrap();
        std::fs::copy(&self.cert, &to.cert).unwrap();
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        TestCa { issuer, dir }
    }

    /// The CA certificate (PEM file).
    pub fn cert_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, stem: &str) -> IssuedCert {
        self.issue(
            stem,
            vec!["127.0.0.1".into(), "localhost".into()],
            None,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose identity is `pc_id`: as its DNS name, or (with `in_cn_only`)
    /// as its common name with no subject alternative name at all.
    pub fn client(&self, pc_id: &str, in_cn_only: bool) -> IssuedCert {
        let (sans, cn) = if in_cn_only {
            (Vec::new(), Some(pc_id))
        } else {
            (vec![pc_id.to_string()], None)
        };
        self.issue(pc_id, sans, cn, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        stem: &str,
        sans: Vec<String>,
        cn: Option<&str>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> IssuedCert {
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = IssuedCert {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `client` when given.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &TestCa,
    client: Option<&IssuedCert>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem()));
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(client.cert_pem(), client.key_pem()));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}
