//! Prometheus metrics in the text exposition format, served on `--metrics-listen` at `/metrics`.

use std::sync::Arc;

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric ingest keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events read from streams and Publish calls, valid or not.
    pub events_received: Counter,
    /// Events whose transaction committed (and were acked).
    pub events_committed: Counter,
    /// Events refused, by reason class.
    pub events_rejected: Family<Labels, Counter>,
    /// Events per committed batch.
    pub batch_size: Histogram,
    /// Seconds from the start of a batch's transaction to its commit.
    pub commit_seconds: Histogram,
    /// Agent streams open now.
    pub open_streams: Gauge,
    /// Failed commit attempts, by kind.
    pub store_errors: Family<Labels, Counter>,
    /// Events waiting for the batcher.
    pub queue_depth: Gauge,
    /// The memory budget, and how much of it events hold now.
    pub memory_budget: Gauge,
    pub memory_budget_used: Gauge,
}

/// Reason classes of `kanade_ingest_events_rejected_total`.
pub mod reject {
    pub const INVALID: &str = "invalid";
    pub const TOO_LARGE: &str = "too_large";
    pub const WRONG_PC: &str = "wrong_pc";
    pub const NOT_OWNER: &str = "not_owner";
    pub const REFUSED_BY_DATABASE: &str = "refused_by_database";
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kanade_ingest");
        let events_received = Counter::default();
        let events_committed = Counter::default();
        let events_rejected = Family::<Labels, Counter>::default();
        let batch_size =
            Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let open_streams = Gauge::default();
        let store_errors = Family::<Labels, Counter>::default();
        let queue_depth = Gauge::default();
        let memory_budget = Gauge::default();
        let memory_budget_used = Gauge::default();
        let r = &mut registry;
        r.register(
            "events_received",
            "Events read from agent streams and Publish calls, valid or not",
            events_received.clone(),
        );
        r.register(
            "events_committed",
            "Events whose transaction committed",
            events_committed.clone(),
        );
        r.register(
            "events_rejected",
            "Events refused, by reason class",
            events_rejected.clone(),
        );
        r.register(
            "batch_size",
            "Events per committed batch",
            batch_size.clone(),
        );
        r.register(
            "commit_seconds",
            "Time from the start of a batch's transaction to its commit",
            commit_seconds.clone(),
        );
        r.register(
            "open_streams",
            "Agent streams open now",
            open_streams.clone(),
        );
        r.register(
            "store_errors",
            "Failed attempts to commit a batch, by kind",
            store_errors.clone(),
        );
        r.register(
            "queue_depth",
            "Events waiting for the batcher",
            queue_depth.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "Bytes of events ingest may hold at once (--memory-budget)",
            memory_budget.clone(),
        );
        r.register(
            "memory_budget_used_bytes",
            "Bytes of events read and not yet answered",
            memory_budget_used.clone(),
        );
        Metrics {
            registry,
            events_received,
            events_committed,
            events_rejected,
            batch_size,
            commit_seconds,
            open_streams,
            store_errors,
            queue_depth,
            memory_budget,
            memory_budget_used,
        }
    }
}

impl Metrics {
    pub fn rejected(&self, reason: &'static str) {
        self.events_rejected
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The `/metrics` endpoint.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }
        }),
    )
}
