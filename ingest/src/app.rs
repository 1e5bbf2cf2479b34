//! Wires ingest together: store, batcher, gRPC services, health, retention, and the ordered
//! shutdown of SPEC §5 (NOT_SERVING, stop accepting, flush and ack in-flight batches, end
//! streams with UNAVAILABLE; hard stop after the shutdown timeout).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use kanade_shared::{backoff::Backoff, limits, pb, telemetry};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Server;

use tonic::service::interceptor::InterceptedService;

use crate::{
    activity::ActivityService,
    auth::{Authenticator, Tokens},
    batcher::{self, BatchConfig},
    config::ServeArgs,
    health::Readiness,
    metrics::{self, Metrics},
    retention,
    server::{
        IngestLimits, IngestParts, IngestService,
        registry::{RegistryLimits, StreamRegistry},
    },
    store::{self, Store},
    tls::{self, ServerTls, TlsFiles},
};

/// A running ingest.
pub struct RunningIngest {
    /// Where the gRPC services listen (with the real port when port 0 was asked for).
    pub addr: SocketAddr,
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
async fn bind_optional(
    addr: Option<SocketAddr>,
    flag: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("listening on {a} ({flag})"))?,
        )),
        None => Ok(None),
    }
}

/// The sockets ingest serves on.
struct Listeners {
    grpc: TcpListener,
    health: Option<TcpListener>,
    metrics: Option<TcpListener>,
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
async fn open_store(url: &str, shutdown: &CancellationToken) -> anyhow::Result<Arc<dyn Store>> {
    let backoff = Backoff {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(5),
    };
    let store = store::open(url)
        .await
        .with_context(|| format!("opening the database {}", redact(url)))?;
    let mut attempt = 0;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(store),
            Err(err) if err.is_transient() => {
                tracing::warn!(error = %err, "database not reachable yet; retrying migrations");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay(attempt)) => {}
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
    let store = store::open(url)
        .await
        .with_context(|| format!("opening the database {}", redact(url)))?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating the database {}", redact(url)))
}

/// Starts ingest: returns once it listens.
pub async fn start(args: ServeArgs) -> anyhow::Result<RunningIngest> {
    args.validate().map_err(anyhow::Error::msg)?;
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
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let health_listener = bind_optional(args.health_listen, "--health-listen").await?;
    let metrics_listener = bind_optional(args.metrics_listen, "--metrics-listen").await?;

    let store = open_store(&args.database_url, &shutdown).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness::new(reporter).await;
    readiness.set_store_ok(store.ping().await.is_ok()).await;

    let task = tokio::spawn(serve(
        args,
        tokens,
        tls,
        store,
        readiness,
        health_service,
        Listeners {
            grpc: listener,
            health: health_listener,
            metrics: metrics_listener,
        },
        shutdown.clone(),
    ));
    Ok(RunningIngest {
        addr,
        shutdown,
        task,
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: ServeArgs,
    tokens: Option<Arc<Tokens>>,
    tls: Option<Arc<ServerTls>>,
    store: Arc<dyn Store>,
    readiness: Readiness,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        health: health_listener,
        metrics: metrics_listener,
    } = listeners;
    let hard_stop = CancellationToken::new();
    let background = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let (queue, queue_rx) = mpsc::channel(args.queue_capacity);
    let batch_config = BatchConfig {
        max_rows: args.batch_max_rows,
        max_bytes: args.batch_max_bytes,
        linger: args.batch_linger,
        retry_max: args.retry_max,
        commit_timeout: args.commit_timeout,
    };
    let batcher = tokio::spawn(batcher::run(
        queue_rx,
        store.clone(),
        batch_config,
        readiness.clone(),
        metrics.clone(),
        hard_stop.clone(),
    ));
    let lost_grace =
        chrono::Duration::from_std(args.lost_grace).context("--lost-grace is too long")?;
    let stream_tasks = TaskTracker::new();
    let registry = StreamRegistry::new(
        RegistryLimits {
            max_streams: args.max_streams,
            max_streams_per_pc: args.max_streams_per_pc,
        },
        metrics.clone(),
    );
    let ingest = IngestService::new(IngestParts {
        batcher: queue,
        metrics: metrics.clone(),
        limits: IngestLimits {
            max_stream_age: args.max_stream_age,
            hello_timeout: args.hello_timeout,
            publish_timeout: args.publish_timeout,
            max_event_bytes: args.max_event_bytes,
            max_unacked: args.max_unacked,
            max_unacked_bytes: args.max_unacked_bytes,
        },
        registry,
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        tasks: stream_tasks.clone(),
    });
    let activity = ActivityService::new(store.clone(), lost_grace);

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut background_tasks = tokio::task::JoinSet::new();
    background_tasks.spawn(retention::run(
        store.clone(),
        args.retention,
        args.retention_every,
        background.clone(),
    ));
    background_tasks.spawn(watch_store(
        store.clone(),
        readiness.clone(),
        args.health_check_every,
        background.clone(),
    ));
    if let Some(listener) = metrics_listener {
        background_tasks.spawn(metrics::serve(
            metrics.clone(),
            listener,
            background.clone(),
        ));
    }
    if let Some(tls) = &tls {
        background_tasks.spawn(tls.clone().watch(args.tls_reload_every, background.clone()));
    }
    if let Some(health_listener) = health_listener {
        let health_only = health_service.clone();
        let stop = background.clone();
        background_tasks.spawn(async move {
            if let Err(err) = Server::builder()
                .add_service(health_only)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(health_listener),
                    stop.cancelled_owned(),
                )
                .await
            {
                tracing::error!(error = %err, "health listener failed");
            }
        });
    }

    let router = Server::builder()
        .trace_fn(request_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            pb::ingest_server::IngestServer::new(ingest)
                .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES),
            {
                let auth = Authenticator::new(tokens.clone(), false);
                move |request| auth.check(request)
            },
        ))
        .add_service(InterceptedService::new(
            pb::activity_server::ActivityServer::new(activity),
            {
                let auth = Authenticator::new(tokens, true);
                move |request| auth.check(request)
            },
        ));
    let stop_accepting = {
        let shutdown = shutdown.clone();
        let readiness = readiness.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: draining streams and in-flight batches");
            readiness.set_draining().await;
        }
    };
    let grpc: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls::incoming(listener, tls, args.hello_timeout, background.clone()),
            stop_accepting,
        )),
        None => Box::pin(
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop_accepting),
        ),
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

/// Probes the store so readiness follows it even when no events flow.
async fn watch_store(
    store: Arc<dyn Store>,
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
        readiness.set_store_ok(ok).await;
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
