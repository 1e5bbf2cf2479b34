//! Wires ingest together: store, batcher, gRPC services, health, retention, and the ordered
//! shutdown of SPEC §5 (NOT_SERVING, stop accepting, flush and ack in-flight batches, end
//! streams with UNAVAILABLE; hard stop after the shutdown timeout).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use kanade_shared::{backoff::Backoff, limits, pb, telemetry};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::Router},
};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    activity::ActivityService,
    auth::{Access, Authenticator, Tokens},
    batcher::{self, BatchConfig},
    budget::{Budgeted, MemoryBudget},
    bus::{self, Bus},
    changes::{self, Changes},
    config::ServeArgs,
    console::{self, Console, ConsoleConfig, ConsoleParts},
    control::{
        Cancels, ControlService, Tails,
        tail::{TailLimits, TailParts},
    },
    health::{Database, Readiness},
    listen::{self, AcceptLimits, Http1RequestHead, Http2Preface},
    metrics::{self, Metrics},
    presence::{Presence, PresenceTask},
    retention,
    server::{
        IngestLimits, IngestParts, IngestService,
        registry::{RegistryLimits, StreamRegistry},
    },
    store::{self, ReadStore, Store},
    tls::{Served, ServerTls, TlsFiles, TlsHandshake},
};

/// HTTP/2 receive windows: how many bytes a client may send ahead of what ingest has read, per
/// stream and per connection. These bytes sit outside the memory budget (they arrive before
/// ingest reads them), so they are kept small: h2's own default of 64 KiB rather than hyper's
/// 1 MiB, which let 200 agents park 200 MiB in ingest while the budget held them back.
const RECEIVE_WINDOW: u32 = 64 * 1024;
/// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of the migrations while the database is unreachable at start.
const MIGRATE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

/// A running ingest.
pub struct RunningIngest {
    /// Where the gRPC services listen (with the real port when port 0 was asked for).
    pub addr: SocketAddr,
    /// The web console's address (`http://…`, `https://…` under TLS), unless it is off.
    pub console_url: Option<String>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningIngest {
    /// Waits for the ingest to end by itself (it ends only after `shutdown` was triggered).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("ingest task panicked")?
    }

    /// Cancelling this begins the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Binds an optional extra listener; errors name the flag that asked for it.
fn bind_optional(addr: Option<SocketAddr>, flag: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(
            crate::listen::bind(a).with_context(|| format!("listening on {a} ({flag})"))?,
        )),
        None => Ok(None),
    }
}

/// The sockets ingest serves on.
struct Listeners {
    grpc: TcpListener,
    health: Option<TcpListener>,
    metrics: Option<TcpListener>,
    console: Option<TcpListener>,
}

/// The span of one gRPC call. A `traceparent` header makes it part of the caller's trace, so
/// `grpcurl -H 'traceparent: …'` shows up in Jaeger next to the caller's spans.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        rpc.system = "grpc",
        trace_id = tracing::field::Empty,
    );
    telemetry::continue_trace(
        &span,
        request
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
    );
    span
}

/// Opens the store and applies migrations, retrying while the database is unreachable.
async fn open_store(
    url: &str,
    session: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::open(url, session)
        .await
        .with_context(|| format!("opening the database {}", redact(url)))?;
    store.claim_for_serving()?;
    let mut attempt = 0;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(store),
            Err(err) if err.is_transient() => {
                tracing::warn!(error = %err, "database not reachable yet; retrying migrations");
                tokio::select! {
                    _ = tokio::time::sleep(MIGRATE_BACKOFF.next_delay(attempt)) => {}
                    _ = shutdown.cancelled() => anyhow::bail!("shut down before the database answered"),
                }
                attempt += 1;
            }
            Err(err) => {
                return Err(err).with_context(|| format!("migrating the database {}", redact(url)));
            }
        }
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Applies migrations and returns (`kanade-ingest migrate`).
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let store = store::open(url, "kanade-ingest migrate")
        .await
        .with_context(|| format!("opening the database {}", redact(url)))?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating the database {}", redact(url)))
}

/// What `start` prepared before anything is served.
struct Prepared {
    args: ServeArgs,
    metrics: Arc<Metrics>,
    tokens: Option<Arc<Tokens>>,
    tls: Option<Arc<ServerTls>>,
    store: Arc<dyn Store>,
    /// Where Activity reads: the read replica, or the primary `store` itself.
    reads: Arc<dyn ReadStore>,
    readiness: Readiness,
    health: HealthServer<HealthService>,
    listeners: Listeners,
    /// Where gRPC listens (the console shows it in grpcurl commands).
    grpc_addr: SocketAddr,
}

/// Starts ingest: returns once it listens.
pub async fn start(args: ServeArgs) -> anyhow::Result<RunningIngest> {
    args.validate().map_err(anyhow::Error::msg)?;
    // Every connection is a file descriptor: take all the system allows this process.
    match listen::raise_fd_limit() {
        Ok(limit) => tracing::info!(fd_limit = limit, "file descriptor limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the file descriptor limit"),
    }
    let tokens = match &args.tokens_file {
        Some(path) => Some(Arc::new(Tokens::load(path)?)),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        })?),
        _ => None,
    };
    if let Some(warning) = args.exposure_warning() {
        tracing::warn!(listen = %args.listen, "{warning}");
    }
    let shutdown = CancellationToken::new();
    let listeners = Listeners {
        grpc: crate::listen::bind(args.listen)
            .with_context(|| format!("listening on {}", args.listen))?,
        health: bind_optional(args.health_listen, "--health-listen")?,
        metrics: bind_optional(args.metrics_listen, "--metrics-listen")?,
        console: bind_optional(args.console_listen.0, "--console-listen")?,
    };
    let addr = listeners.grpc.local_addr()?;
    let console_scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let console_url = listeners
        .console
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?
        .map(|addr| format!("{console_scheme}://{addr}"));

    let store = open_store(
        &args.database_url,
        &format!("kanade-ingest {}", args.replica_id),
        &shutdown,
    )
    .await?;
    let reads: Arc<dyn ReadStore> = match &args.read_database_url {
        Some(url) => store::open_reader(url, &format!("kanade-ingest-reads {}", args.replica_id))
            .await
            .with_context(|| format!("opening the read replica {}", redact(url)))?,
        None => store.clone(),
    };
    let reporter = HealthReporter::new();
    let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::new(
        reporter,
        args.read_database_url.is_some(),
        (metrics.ready.clone(), metrics.reads_ready.clone()),
    )
    .await;
    readiness
        .set_ok(Database::Primary, store.ping().await.is_ok())
        .await;
    if args.read_database_url.is_some() {
        let answered = reads.ping().await;
        if let Err(err) = &answered {
            tracing::warn!(error = %err, "the read replica does not answer yet: Activity is NOT_SERVING until it does");
        }
        readiness
            .set_ok(Database::ReadReplica, answered.is_ok())
            .await;
    }

    let prepared = Prepared {
        args,
        metrics,
        tokens,
        tls,
        store,
        reads,
        readiness,
        health,
        listeners,
        grpc_addr: addr,
    };
    let task = tokio::spawn(serve(prepared, shutdown.clone()));
    Ok(RunningIngest {
        addr,
        console_url,
        shutdown,
        task,
    })
}

impl From<&ServeArgs> for BatchConfig {
    fn from(args: &ServeArgs) -> BatchConfig {
        BatchConfig {
            max_rows: args.batch_max_rows,
            max_bytes: args.batch_max_bytes,
            linger: args.batch_linger,
            commits_in_flight: args.commits_in_flight,
            max_pending: args.queue_capacity,
            retry_max: args.retry_max,
            commit_timeout: args.commit_timeout,
        }
    }
}

impl From<&ServeArgs> for IngestLimits {
    fn from(args: &ServeArgs) -> IngestLimits {
        IngestLimits {
            max_stream_age: args.max_stream_age,
            hello_timeout: args.hello_timeout,
            publish_timeout: args.publish_timeout,
            max_event_bytes: args.max_event_bytes,
            max_unacked: args.max_unacked,
            max_unacked_bytes: args.max_unacked_bytes,
        }
    }
}

impl From<&ServeArgs> for AcceptLimits {
    fn from(args: &ServeArgs) -> AcceptLimits {
        AcceptLimits {
            proof_timeout: args.hello_timeout,
            max_unproven: args.max_pending_connections,
        }
    }
}

impl From<&ServeArgs> for RegistryLimits {
    fn from(args: &ServeArgs) -> RegistryLimits {
        RegistryLimits {
            max_streams: args.max_streams,
            max_streams_per_pc: args.max_streams_per_pc,
        }
    }
}

impl Prepared {
    /// The tasks that run beside the gRPC services until `stop`: retention, the store probe,
    /// certificate reloads, the health and metrics listeners, presence, delivering cancels,
    /// and talking with the other replicas (this one's commits told, theirs and their control
    /// messages heard).
    fn spawn_background(
        &mut self,
        shared: &Shared,
        heard: bus::Heard,
        stop: &CancellationToken,
    ) -> tokio::task::JoinSet<()> {
        let Shared {
            metrics,
            changes,
            registry,
            presence,
            bus,
            cancels,
            tails,
        } = shared;
        let args = &self.args;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(
            PresenceTask {
                presence: presence.clone(),
                store: self.store.clone(),
                reads: self.reads.clone(),
                open_streams: Box::new({
                    let registry = registry.clone();
                    move || registry.open_streams()
                }),
                every: args.presence_every,
                metrics: metrics.clone(),
                changes: changes.clone(),
            }
            .run(stop.clone()),
        );
        tasks.spawn(
            cancels
                .clone()
                .deliver(heard.cancels, args.presence_every, stop.clone()),
        );
        tasks.spawn(tails.clone().run(heard.tails, stop.clone()));
        tasks.spawn(bus.clone().listen(changes.clone(), stop.clone()));
        tasks.spawn(changes::tell_others(
            changes.clone(),
            self.store.clone(),
            stop.clone(),
        ));
        tasks.spawn(retention::run(
            self.store.clone(),
            args.retention,
            args.retention_every,
            stop.clone(),
        ));
        tasks.spawn(watch_store(
            self.store.clone(),
            Database::Primary,
            self.readiness.clone(),
            args.health_check_every,
            stop.clone(),
        ));
        if args.read_database_url.is_some() {
            tasks.spawn(watch_store(
                self.reads.clone(),
                Database::ReadReplica,
                self.readiness.clone(),
                args.health_check_every,
                stop.clone(),
            ));
        }
        let limits = AcceptLimits::from(args);
        if let Some(listener) = self.listeners.metrics.take() {
            tasks.spawn(listen::serve_http1(
                metrics::router(metrics.clone()),
                listen::incoming(listener, "metrics", Http1RequestHead, limits, stop.clone()),
                args.hello_timeout,
                stop.clone(),
            ));
        }
        if let Some(tls) = self.tls.clone() {
            let reread = move || tls.reload_if_changed();
            tasks.spawn(reread_every(args.tls_reload_every, stop.clone(), reread));
        }
        if let Some(tokens) = self.tokens.clone() {
            let reread = move || tokens.reload_if_changed();
            tasks.spawn(reread_every(args.tokens_reload_every, stop.clone(), reread));
        }
        if let Some(listener) = self.listeners.console.take() {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let console = Console::new(ConsoleParts {
                reads: self.reads.clone(),
                store: self.store.clone(),
                tokens: self.tokens.clone(),
                changes: changes.clone(),
                cancels: cancels.clone(),
                tails: tails.clone(),
                config: ConsoleConfig {
                    lost_grace: chrono::Duration::from_std(args.lost_grace)
                        .unwrap_or(chrono::Duration::MAX),
                    trace_url: args.trace_url.clone(),
                    session_ttl: args.session_ttl,
                    tls: self.tls.is_some(),
                    grpc_addr: self.grpc_addr.to_string(),
                    read_replica: args.read_database_url.is_some(),
                    presence_every: args.presence_every,
                },
                stop: stop.clone(),
            });
            tracing::info!(%addr, tls = self.tls.is_some(), "console listening");
            let router = console::router(console);
            match &self.tls {
                Some(tls) => {
                    let handshake = TlsHandshake {
                        tls: tls.clone(),
                        served: Served::Console,
                    };
                    tasks.spawn(listen::serve_http1(
                        router,
                        listen::incoming(listener, "console", handshake, limits, stop.clone()),
                        args.hello_timeout,
                        stop.clone(),
                    ));
                }
                None => {
                    tasks.spawn(listen::serve_http1(
                        router,
                        listen::incoming(
                            listener,
                            "console",
                            Http1RequestHead,
                            limits,
                            stop.clone(),
                        ),
                        args.hello_timeout,
                        stop.clone(),
                    ));
                }
            }
        }
        if let Some(listener) = self.listeners.health.take() {
            tasks.spawn(serve_health_only(
                self.health.clone(),
                listen::incoming(listener, "health", Http2Preface, limits, stop.clone()),
                stop.clone(),
            ));
        }
        tasks
    }

    /// Every gRPC service of the main port, each behind the authentication it needs.
    fn grpc_router(
        &self,
        ingest: IngestService,
        activity: ActivityService,
        control: ControlService,
        budget: MemoryBudget,
    ) -> anyhow::Result<Router> {
        let authenticated = |access| {
            let auth = Authenticator::new(self.tokens.clone(), access);
            move |request| auth.check(request)
        };
        Ok(Server::builder()
            .trace_fn(request_span)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .initial_stream_window_size(RECEIVE_WINDOW)
            .initial_connection_window_size(RECEIVE_WINDOW)
            .tcp_nodelay(true)
            .add_service(self.health.clone())
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(Budgeted::new(
                InterceptedService::new(
                    pb::ingest_server::IngestServer::new(ingest)
                        .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES),
                    authenticated(Access::Write),
                ),
                budget,
            ))
            .add_service(InterceptedService::new(
                pb::activity_server::ActivityServer::new(activity),
                authenticated(Access::Read),
            ))
            .add_service(InterceptedService::new(
                pb::control_server::ControlServer::new(control),
                authenticated(Access::PerCall),
            )))
    }
}

/// What the gRPC services, the console and the background tasks share.
struct Shared {
    metrics: Arc<Metrics>,
    changes: Changes,
    registry: Arc<StreamRegistry>,
    presence: Presence,
    bus: Bus,
    cancels: Cancels,
    tails: Tails,
}

impl Shared {
    /// What is shared, and the receiving end of this replica's control messages.
    fn new(
        prepared: &Prepared,
        metrics: Arc<Metrics>,
        lost_grace: chrono::Duration,
    ) -> (Shared, bus::Heard) {
        let args = &prepared.args;
        let presence = Presence::new(&args.replica_id);
        let registry = StreamRegistry::new(
            RegistryLimits::from(args),
            metrics.clone(),
            presence.clone(),
        );
        let (bus, heard) = Bus::new(prepared.store.clone());
        let cancels = Cancels::new(
            prepared.store.clone(),
            bus.clone(),
            registry.clone(),
            lost_grace,
            metrics.clone(),
        );
        let changes = Changes::default();
        let tails = Tails::new(TailParts {
            reads: prepared.reads.clone(),
            bus: bus.clone(),
            registry: registry.clone(),
            changes: changes.clone(),
            lost_grace,
            presence_every: args.presence_every,
            limits: TailLimits {
                max_watchers: args.max_tails,
            },
            metrics: metrics.clone(),
        });
        let shared = Shared {
            metrics,
            changes,
            registry,
            presence,
            bus,
            cancels,
            tails,
        };
        (shared, heard)
    }
}

/// Serves until `shutdown`, then shuts down in order: stop accepting, let every stream flush its
/// answers, let the batcher commit what is queued; a hard stop after the shutdown timeout.
async fn serve(mut prepared: Prepared, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hard_stop = CancellationToken::new();
    let background = CancellationToken::new();
    let metrics = prepared.metrics.clone();
    let args = prepared.args.clone();
    // One batch's worth in transit: the batcher takes events in as they come and holds up to
    // --queue-capacity of them (BatchConfig::max_pending).
    let (queue, queue_rx) = mpsc::channel(args.batch_max_rows.max(1));
    let lost_grace =
        chrono::Duration::from_std(args.lost_grace).context("--lost-grace is too long")?;
    let (shared, heard) = Shared::new(&prepared, metrics.clone(), lost_grace);
    let batcher = tokio::spawn(batcher::run(
        queue_rx,
        prepared.store.clone(),
        BatchConfig::from(&args),
        prepared.readiness.clone(),
        metrics.clone(),
        shared.changes.clone(),
        hard_stop.clone(),
    ));
    let stream_tasks = TaskTracker::new();
    let ingest = IngestService::new(IngestParts {
        batcher: queue,
        metrics: metrics.clone(),
        limits: IngestLimits::from(&args),
        registry: shared.registry.clone(),
        presence: shared.presence.clone(),
        cancels: shared.cancels.clone(),
        tails: shared.tails.clone(),
        readiness: prepared.readiness.clone(),
        shutdown: shutdown.clone(),
        tasks: stream_tasks.clone(),
    });
    let activity = ActivityService::new(prepared.reads.clone(), lost_grace, args.presence_every);
    let control = ControlService::new(
        shared.cancels.clone(),
        shared.tails.clone(),
        shutdown.clone(),
    );
    tracing::info!(replica = %args.replica_id, "replica id");
    let mut background_tasks = prepared.spawn_background(&shared, heard, &background);
    let (budget_bytes, budget_from) = args.memory_budget();
    tracing::info!(
        bytes = budget_bytes,
        from = budget_from,
        "memory budget for events"
    );
    metrics.memory_budget.set(budget_bytes as i64);
    let budget = MemoryBudget::new(
        usize::try_from(budget_bytes).unwrap_or(usize::MAX),
        metrics.memory_budget_used.clone(),
    );
    let router = prepared.grpc_router(ingest, activity, control, budget)?;

    let stop_accepting = {
        let shutdown = shutdown.clone();
        let readiness = prepared.readiness.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: draining streams and in-flight batches");
            readiness.set_draining().await;
        }
    };
    let (listener, limits) = (prepared.listeners.grpc, AcceptLimits::from(&args));
    let grpc: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match prepared.tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            listen::incoming(
                listener,
                "gRPC",
                TlsHandshake {
                    tls,
                    served: Served::Grpc,
                },
                limits,
                background.clone(),
            ),
            stop_accepting,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(
            listen::incoming(listener, "gRPC", Http2Preface, limits, background.clone()),
            stop_accepting,
        )),
    };

    let drained = async {
        let served = grpc.await;
        stream_tasks.close();
        stream_tasks.wait().await;
        // Every submitter is gone now: the batcher flushes what is queued and ends.
        let _ = batcher.await;
        served
    };
    let hard_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(args.shutdown_timeout).await;
    };
    let result = tokio::select! {
        served = drained => served.context("serving gRPC"),
        _ = hard_deadline => {
            tracing::warn!(timeout = ?args.shutdown_timeout, "shutdown timeout reached; stopping with batches still pending (their agents will resend)");
            hard_stop.cancel();
            Ok(())
        }
    };
    background.cancel();
    while background_tasks.join_next().await.is_some() {}
    result
}

/// The health service alone on a plaintext port of its own (Kubernetes probes), with reflection
/// of just that service so `grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check` works there.
async fn serve_health_only(
    health: HealthServer<HealthService>,
    incoming: impl tokio_stream::Stream<Item = Result<listen::Replayed, std::convert::Infallible>>
    + Send
    + 'static,
    stop: CancellationToken,
) {
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false)
    };
    let configure = tonic_reflection::server::Builder::configure;
    let served = async {
        Server::builder()
            .add_service(health)
            .add_service(reflection(configure()).build_v1()?)
            .add_service(reflection(configure()).build_v1alpha()?)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await?;
        anyhow::Ok(())
    };
    if let Err(err) = served.await {
        tracing::error!(error = %format!("{err:#}"), "health listener failed");
    }
}

/// Reflection over every service on the port. Each reflection version also lists the other, so
/// a client of either sees everything that is served.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
}

/// Probes a database so readiness follows it even when no events flow.
async fn watch_store(
    store: Arc<dyn ReadStore>,
    database: Database,
    readiness: Readiness,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let ok = match tokio::time::timeout(every, store.ping()).await {
            Ok(answer) => answer.is_ok(),
            Err(_) => {
                // No answer at all: the connection may have gone silent; do not reuse it.
                store.discard_connections();
                false
            }
        };
        readiness.set_ok(database, ok).await;
    }
}

/// Rereads files that may change while ingest runs (TLS certificates, the tokens file) every
/// `every` until `stop`, off the async workers (file reads and parsing block).
async fn reread_every(
    every: Duration,
    stop: CancellationToken,
    reread: impl Fn() + Clone + Send + 'static,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let _ = tokio::task::spawn_blocking(reread.clone()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://kanade:s3cret@db:5432/kanade"),
            "postgres://kanade:***@db:5432/kanade"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(
            redact("sqlite://kanade-ingest.db"),
            "sqlite://kanade-ingest.db"
        );
    }
}
