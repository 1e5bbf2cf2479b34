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
    /// Seconds from reading an event to answering it (its Ack, Reject or Publish answer):
    /// queueing, batching and the commit, what an agent waits for.
    pub answer_seconds: Histogram,
    /// Agent streams open now.
    pub open_streams: Gauge,
    /// 1 while this replica is ready (its database answers, it is not draining), else 0.
    pub ready: Gauge,
    /// 1 while its reads (Activity, the console) are served, else 0.
    pub reads_ready: Gauge,
    /// Failed commit attempts, by kind.
    pub store_errors: Family<Labels, Counter>,
    /// Events waiting for the batcher.
    pub queue_depth: Gauge,
    /// The memory budget, and how much of it events hold now.
    pub memory_budget: Gauge,
    pub memory_budget_used: Gauge,
    /// Endpoints with a stream open on this replica.
    pub connected_endpoints: Gauge,
    /// Presence statements written, and the endpoint rows they carried.
    pub presence_statements: Counter,
    pub presence_rows: Counter,
    /// The whole fleet as the database says (the same figure on every replica: aggregate with
    /// max): endpoints by state, and what their agents hold back.
    pub fleet_endpoints: Family<Labels, Gauge>,
    pub fleet_backlog_events: Gauge,
    pub fleet_dead_letters: Gauge,
    /// Cancel requests answered, by outcome.
    pub cancel_requests: Family<Labels, Counter>,
    /// Cancels sent to agent streams on this replica.
    pub cancels_sent: Counter,
    /// Watchers following runs' live output on this replica (TailExecution calls, console
    /// pages).
    pub tail_watchers: Gauge,
    /// Runs whose live output this replica asks of an agent stream it holds, for watchers here
    /// or on other replicas.
    pub tails_held: Gauge,
    /// Live output chunks, by what became of them (`delivered` to a watcher here, `forwarded`
    /// to another replica, `dropped` for a watcher too slow or a replica out of room).
    pub tail_chunks: Family<Labels, Counter>,
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
        let answer_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let open_streams = Gauge::default();
        let ready = Gauge::default();
        let reads_ready = Gauge::default();
        let store_errors = Family::<Labels, Counter>::default();
        let queue_depth = Gauge::default();
        let memory_budget = Gauge::default();
        let memory_budget_used = Gauge::default();
        let connected_endpoints = Gauge::default();
        let presence_statements = Counter::default();
        let presence_rows = Counter::default();
        let fleet_endpoints = Family::<Labels, Gauge>::default();
        let fleet_backlog_events = Gauge::default();
        let fleet_dead_letters = Gauge::default();
        let cancel_requests = Family::<Labels, Counter>::default();
        let cancels_sent = Counter::default();
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
            "answer_seconds",
            "Time from reading an event to answering it (Ack, Reject, Publish): what an agent waits",
            answer_seconds.clone(),
        );
        r.register(
            "open_streams",
            "Agent streams open now",
            open_streams.clone(),
        );
        r.register(
            "ready",
            "1 while this replica is ready: its database answers and it is not draining",
            ready.clone(),
        );
        r.register(
            "reads_ready",
            "1 while this replica serves reads (Activity, the console): their database answers",
            reads_ready.clone(),
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
        r.register(
            "connected_endpoints",
            "Endpoints with a stream open on this replica",
            connected_endpoints.clone(),
        );
        r.register(
            "presence_statements",
            "Presence statements written to the database",
            presence_statements.clone(),
        );
        r.register(
            "presence_rows",
            "Endpoint rows written by presence statements",
            presence_rows.clone(),
        );
        r.register(
            "fleet_endpoints",
            "Endpoints known to the database, by state (the same on every replica)",
            fleet_endpoints.clone(),
        );
        r.register(
            "fleet_backlog_events",
            "Events waiting in the outboxes of every endpoint, as their agents last reported",
            fleet_backlog_events.clone(),
        );
        r.register(
            "fleet_dead_letters",
            "Dead letters kept by every endpoint, as their agents last reported",
            fleet_dead_letters.clone(),
        );
        r.register(
            "cancel_requests",
            "Cancel requests answered, by outcome",
            cancel_requests.clone(),
        );
        r.register(
            "cancels_sent",
            "Cancels sent to agent streams on this replica",
            cancels_sent.clone(),
        );
        let tail_watchers = Gauge::default();
        r.register(
            "tail_watchers",
            "Watchers following runs' live output on this replica",
            tail_watchers.clone(),
        );
        let tails_held = Gauge::default();
        r.register(
            "tails_held",
            "Runs whose live output this replica asks of an agent stream it holds",
            tails_held.clone(),
        );
        let tail_chunks = Family::<Labels, Counter>::default();
        r.register(
            "tail_chunks",
            "Live output chunks, by what became of them",
            tail_chunks.clone(),
        );
        Metrics {
            registry,
            events_received,
            events_committed,
            events_rejected,
            batch_size,
            commit_seconds,
            answer_seconds,
            open_streams,
            ready,
            reads_ready,
            store_errors,
            queue_depth,
            memory_budget,
            memory_budget_used,
            connected_endpoints,
            presence_statements,
            presence_rows,
            fleet_endpoints,
            fleet_backlog_events,
            fleet_dead_letters,
            cancel_requests,
            cancels_sent,
            tail_watchers,
            tails_held,
            tail_chunks,
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

    /// The fleet's totals, as the database last said.
    pub fn fleet(&self, totals: &crate::store::FleetTotals) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in [
            ("connected", totals.connected),
            ("disconnected", totals.disconnected),
        ] {
            self.fleet_endpoints
                .get_or_create(&vec![("state", state)])
                .set(gauge(n));
        }
        self.fleet_backlog_events.set(gauge(totals.backlog_events));
        self.fleet_dead_letters.set(gauge(totals.dead_letters));
    }

    /// A cancel request was answered with `outcome`.
    pub fn cancel_request(&self, outcome: &'static str) {
        self.cancel_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// A live output chunk became `outcome` (delivered, forwarded, dropped).
    pub fn tail_chunk(&self, outcome: &'static str) {
        self.tail_chunks
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
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
