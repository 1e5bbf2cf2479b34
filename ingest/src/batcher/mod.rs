//! Group commit: one task collects the events of every stream and Publish call into batches and
//! writes each batch in ONE transaction; outcomes fan out to their senders only after commit.
//!
//! A batch closes at `max_rows` rows (a run's events in one batch are one row; at most
//! [`EVENTS_PER_ROW`] events a row), `max_bytes` bytes, or `linger` after its first event.
//! While batches commit, arrivals gather in [`pending`], and each batch takes the events there in
//! the order that writes PostgreSQL's indexes cheapest (by arrival within a tenth of a second,
//! then by run id).
//! Events of one run in a batch are merged in arrival order first (one upsert per run), and runs
//! are written in `result_id` order so concurrent writers cannot deadlock. Several batches commit
//! at once (`commits_in_flight`): one is built and sent while another waits for its commit. What
//! waits is bounded (`max_pending`, and the queue in front): when the database is slow,
//! submitters wait, streams stop being read, agents stall on their windows, and memory stays
//! flat.
//!
//! Failures (SPEC §3): a transient store error retries the same batch in place with backoff,
//! acking nothing, and turns health NOT_SERVING until a commit succeeds. When the database refuses
//! one event's data, the batch is bisected until that event is isolated and rejected; the rest
//! commit. The batcher never waits on a stream: acks are queued without waiting, and a stream
//! whose outbound queue is full is ended instead.

#![expect(
    clippy::vec_box,
    reason = "a submission is 408 bytes: the queue, the pending order and batches move pointers \
              instead (BENCHMARKS.md, a fourth session)"
)]

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use chrono::{SubsecRound, Utc};
use kanade_shared::{backoff::Backoff, pb, telemetry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

mod pending;

use pending::Pending;

use crate::{
    budget::Charge,
    changes::Changes,
    health::{Database, Readiness},
    metrics::{Metrics, reject},
    outbound::StreamSink,
    store::{RunWrite, Store, StoreError},
};

/// A batch holds at most this many events per row it may write: a run's Started and Result, which
/// merge into one row when a backlog is flushed. A batch of `max_rows` runs written back to back
/// is then one statement of `max_rows` rows, as large as one of runs written separately.
pub const EVENTS_PER_ROW: usize = 2;

/// The first retry of a batch waits up to this long (full jitter), doubling up to `retry_max`.
const RETRY_BASE: Duration = Duration::from_millis(50);

/// Where a batch closes and how failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    /// The longest pause between retries while the store is unavailable.
    pub retry_max: Duration,
    /// Batches committing at once (each its own transaction), at most what the store allows.
    pub commits_in_flight: usize,
    /// Events held waiting for a batch at most; past this the queue in front fills and streams
    /// stop being read.
    pub max_pending: usize,
    /// How long one attempt to commit a batch may take. A connection that went silent (no FIN,
    /// no RST) would otherwise hold the batch forever; past this the outcome is unknown, and the
    /// batch is retried on another connection (the upserts are idempotent).
    pub commit_timeout: Duration,
}

impl BatchConfig {
    /// The most events a batch holds: [`EVENTS_PER_ROW`] for each of its rows.
    pub fn max_events(&self) -> usize {
        EVENTS_PER_ROW.saturating_mul(self.max_rows)
    }
}

/// What became of a submitted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durably committed.
    Committed,
    /// The run belongs to another endpoint; nothing was written.
    NotOwner,
    /// The database refused the event's data; nothing was written.
    Refused(String),
}

impl Outcome {
    /// The reason sent in a `Reject`, in words a person can act on.
    pub fn reject_reason(&self, result_id: impl std::fmt::Display) -> Option<String> {
        match self {
            Outcome::Committed => None,
            Outcome::NotOwner => Some(format!(
                "run {result_id} was first reported by another pc_id; an endpoint may only write \
                 its own runs (check that result_ids are minted per run)"
            )),
            Outcome::Refused(why) => Some(format!("the database refused this event: {why}")),
        }
    }
}

/// Who is waiting for an event's outcome.
#[derive(Debug)]
pub enum Reply {
    /// An event of an agent stream, with the window permits it holds until it is answered
    /// (its place in the window's count, and its bytes).
    Stream {
        sink: Arc<StreamSink>,
        seq: u64,
        permits: [OwnedSemaphorePermit; 2],
    },
    /// A Publish call.
    Once(oneshot::Sender<Outcome>),
}

/// One validated event on its way to the store. Boxed on its way (`Box<Submission>`): it is
/// 408 bytes, and the queue, the pending order and the batch would otherwise each copy it.
#[derive(Debug)]
pub struct Submission {
    pub write: RunWrite,
    pub bytes: usize,
    pub reply: Reply,
    /// The event's share of the memory budget, given back when it is answered.
    pub charge: Option<Charge>,
    /// The event's span (a child of the agent's run span): it ends when the event is answered,
    /// and the batch span links to it.
    pub span: tracing::Span,
    /// When ingest read the event: its answer's latency counts from here.
    pub read_at: std::time::Instant,
}

/// The batcher's end of the queue; runs until every submitter is gone, flushing what is queued.
///
/// Up to `commits_in_flight` batches commit at once (each in its own transaction on its own
/// connection), so the next batch is built and sent while one waits for its commit. Runs are
/// locked in `result_id` order in every batch, so concurrent batches cannot deadlock; and no two
/// batches in flight write the same run (an event of a run being written waits for a later
/// batch), so each run's events reach its row in the order they arrived.
pub async fn run(
    queue: mpsc::Receiver<Box<Submission>>,
    store: Arc<dyn Store>,
    config: BatchConfig,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    changes: Changes,
    hard_stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(
        config.commits_in_flight.clamp(1, store.max_writers()),
    ));
    let batcher = Arc::new(Batcher {
        store,
        config,
        readiness,
        metrics,
        changes,
        hard_stop,
    });
    let mut in_flight = InFlight::default();
    let mut commits = tokio::task::JoinSet::new();
    let mut arrivals = Arrivals {
        queue,
        open: true,
        pending: Pending::new(),
        max_pending: config.max_pending.max(1),
    };
    loop {
        // A free slot first. Meanwhile arrivals wait in `pending`, so the next batch is chosen
        // from everything that came while the slots were committing.
        let acquire = slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let slot = loop {
            tokio::select! {
                biased;
                slot = &mut acquire => break slot.expect("the semaphore is never closed"),
                () = arrivals.next(), if arrivals.can_take() => {
                    arrivals.drain();
                    // What waits grows here while every slot commits (a slow database).
                    batcher.metrics.queue_depth.set(arrivals.waiting());
                }
            }
        };
        while let Some(done) = commits.try_join_next() {
            reap(done);
        }
        if !arrivals.gather(&batcher.config).await {
            break;
        }
        if batcher.hard_stop.is_cancelled() {
            break;
        }
        // An event of a run that a batch in flight is writing waits for a later batch. When
        // every event waiting does, so does the batcher, holding its slot: the oldest batch is
        // the likeliest to be done first.
        let batch = loop {
            in_flight.prune();
            let batch = arrivals.pending.take(
                batcher.config.max_rows,
                batcher.config.max_events(),
                batcher.config.max_bytes,
                |run| in_flight.writing(run),
            );
            if !batch.is_empty() {
                break batch;
            }
            in_flight.oldest_done().await;
        };
        batcher.metrics.queue_depth.set(arrivals.waiting());
        if batcher.hard_stop.is_cancelled() {
            break;
        }
        let done = in_flight.admit(&batch);
        let batcher = batcher.clone();
        commits.spawn(async move {
            let _done = done.drop_guard();
            batcher.commit(batch).await;
            drop(slot);
        });
    }
    while let Some(done) = commits.join_next().await {
        reap(done);
    }
    tracing::debug!("batcher: queue closed and flushed");
}

/// The queue from the streams and Publish calls, and the events taken from it that wait for a
/// batch.
struct Arrivals {
    queue: mpsc::Receiver<Box<Submission>>,
    /// False once every submitter is gone and the queue is empty.
    open: bool,
    pending: Pending,
    max_pending: usize,
}

impl Arrivals {
    /// Events waiting for a batch: taken in, and still in the queue.
    fn waiting(&self) -> i64 {
        (self.pending.len() + self.queue.len()) as i64
    }

    /// Whether another event may be taken from the queue now.
    fn can_take(&self) -> bool {
        self.open && self.pending.len() < self.max_pending
    }

    /// Waits for the next event and takes it in (or notes that the queue closed).
    async fn next(&mut self) {
        match self.queue.recv().await {
            Some(s) => self.pending.push(s),
            None => self.open = false,
        }
    }

    /// Takes in what is queued without waiting.
    fn drain(&mut self) {
        while self.can_take() {
            match self.queue.try_recv() {
                Ok(s) => self.pending.push(s),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.open = false,
            }
        }
    }

    /// Waits until a batch can close: at least one event waiting, then more until a batch's
    /// worth of rows, events or bytes, or `linger` after the wait began. `false`: every
    /// submitter is gone and nothing waits.
    async fn gather(&mut self, config: &BatchConfig) -> bool {
        if self.pending.is_empty() {
            if !self.open {
                return false;
            }
            self.next().await;
            if self.pending.is_empty() {
                return false;
            }
        }
        let linger = tokio::time::sleep(config.linger);
        tokio::pin!(linger);
        loop {
            self.drain();
            let full =
                self.pending
                    .fills_a_batch(config.max_rows, config.max_events(), config.max_bytes);
            if full || !self.can_take() {
                return true;
            }
            tokio::select! {
                () = self.next() => {}
                _ = &mut linger => return true,
            }
        }
    }
}

/// The batches committing, by the runs they write, each with a token cancelled when it is
/// answered.
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(HashSet<uuid::Uuid>, CancellationToken)>,
}

impl InFlight {
    /// Forgets the batches that were answered.
    fn prune(&mut self) {
        self.batches.retain(|(_, done)| !done.is_cancelled());
    }

    /// Whether a batch in flight writes `run`.
    fn writing(&self, run: &uuid::Uuid) -> bool {
        self.batches.iter().any(|(runs, _)| runs.contains(run))
    }

    /// Records `batch` as in flight; cancel the token returned once it is answered.
    fn admit(&mut self, batch: &[Box<Submission>]) -> CancellationToken {
        let done = CancellationToken::new();
        let runs = batch.iter().map(|s| s.write.result_id).collect();
        self.batches.push_back((runs, done.clone()));
        done
    }

    /// Waits until the oldest batch in flight is answered.
    async fn oldest_done(&self) {
        if let Some((_, done)) = self.batches.front() {
            done.cancelled().await;
        }
    }
}

/// A commit task's end: a panic in one is the batcher's panic.
fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(err) = done
        && err.is_panic()
    {
        std::panic::resume_unwind(err.into_panic());
    }
}

/// Merges a batch into one write per (run, endpoint), in arrival order; returns the writes sorted
/// by `result_id` and, for each submission, the index of the write that carries it. The writes
/// are moved out of the submissions, not copied: a batch of large outputs is held once.
fn merge(batch: &mut [Box<Submission>]) -> (Vec<RunWrite>, Vec<usize>) {
    // A stable sort: the events of one run stay in the order the batch has them, their arrival
    // order.
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].write.result_id);
    let mut writes: Vec<RunWrite> = Vec::with_capacity(batch.len());
    let mut carrier = vec![0; batch.len()];
    // Where the writes of the run being merged begin: one per endpoint, in the order each
    // endpoint's first event arrived, so that the first to report a new run owns it (a run
    // almost always has one endpoint).
    let mut run_start = 0;
    for i in order {
        let write = std::mem::take(&mut batch[i].write);
        if writes
            .get(run_start)
            .is_none_or(|first| first.result_id != write.result_id)
        {
            run_start = writes.len();
        }
        match writes[run_start..]
            .iter()
            .position(|w| w.pc_id == write.pc_id)
        {
            Some(at) => {
                writes[run_start + at].absorb(write);
                carrier[i] = run_start + at;
            }
            None => {
                carrier[i] = writes.len();
                writes.push(write);
            }
        }
    }
    (writes, carrier)
}

/// What committing a batch needs, shared by the batches in flight.
struct Batcher {
    store: Arc<dyn Store>,
    config: BatchConfig,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    /// Told of every commit (the console's live pages).
    changes: Changes,
    hard_stop: CancellationToken,
}

impl Batcher {
    /// Writes one batch and answers every submission in it. When the hard stop comes first,
    /// nothing more can be committed: the batch is dropped unanswered (its agents resend it).
    async fn commit(&self, mut batch: Vec<Box<Submission>>) {
        let span = tracing::info_span!(
            "ingest.batch",
            batch.size = batch.len(),
            commit_ms = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if telemetry::exporting() {
            use opentelemetry::trace::TraceContextExt;
            for s in &batch {
                span.add_link(s.span.context().span().span_context().clone());
            }
            telemetry::record_trace_id(&span);
        }
        let (writes, carrier) = merge(&mut batch);
        let started = std::time::Instant::now();
        let Some(outcomes) = self.write_isolating(&writes).instrument(span.clone()).await else {
            return;
        };
        let elapsed = started.elapsed();
        span.record("commit_ms", elapsed.as_secs_f64() * 1000.0);
        self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
        self.metrics.batch_size.observe(batch.len() as f64);
        deliver(batch, &writes, &carrier, &outcomes, &self.metrics);
    }

    /// Applies `writes` in one transaction, retrying transient failures; when the database
    /// refuses the data, bisects so that only the refused writes fail. `None`: hard stop.
    async fn write_isolating(&self, writes: &[RunWrite]) -> Option<Vec<Outcome>> {
        let backoff = Backoff {
            base: RETRY_BASE,
            cap: self.config.retry_max,
        };
        let mut attempt = 0;
        loop {
            let received_at = Utc::now().trunc_subsecs(6);
            // Named and attributed after the OpenTelemetry database conventions.
            let db_span = tracing::info_span!(
                "UPSERT execution_results",
                otel.kind = "client",
                db.system.name = self.store.system(),
                db.operation.name = "UPSERT",
                db.collection.name = "execution_results",
                db.operation.batch.size = writes.len(),
                error.type = tracing::field::Empty,
            );
            let attempt_result = tokio::time::timeout(
                self.config.commit_timeout,
                self.store.apply(writes, received_at),
            )
            .instrument(db_span.clone())
            .await
            .unwrap_or(Err(StoreError::CommitTimedOut(self.config.commit_timeout)));
            if let Err(err) = &attempt_result {
                db_span.record("error.type", err.kind());
                self.metrics.store_error(err.kind());
                if matches!(err, StoreError::CommitTimedOut(_)) {
                    self.store.discard_connections();
                }
            }
            drop(db_span);
            match attempt_result {
                Ok(applied) => {
                    self.readiness.set_ok(Database::Primary, true).await;
                    self.changes.committed();
                    return Some(
                        applied
                            .into_iter()
                            .map(|ok| {
                                if ok {
                                    Outcome::Committed
                                } else {
                                    Outcome::NotOwner
                                }
                            })
                            .collect(),
                    );
                }
                Err(StoreError::Refused(err)) => {
                    self.readiness.set_ok(Database::Primary, true).await;
                    if writes.len() == 1 {
                        tracing::warn!(result_id = %writes[0].result_id, error = %err, "database refused an event");
                        return Some(vec![Outcome::Refused(database_message(&err))]);
                    }
                    let (left, right) = writes.split_at(writes.len() / 2);
                    let mut outcomes = Box::pin(self.write_isolating(left)).await?;
                    outcomes.extend(Box::pin(self.write_isolating(right)).await?);
                    return Some(outcomes);
                }
                Err(err) => {
                    // Nothing commits while this lasts: not ready, whatever the cause.
                    self.readiness.set_ok(Database::Primary, false).await;
                    if err.is_transient() {
                        tracing::warn!(error = %err, rows = writes.len(), attempt, "batch not committed; retrying");
                    } else {
                        tracing::error!(error = %err, rows = writes.len(), attempt, "batch failed unexpectedly; retrying");
                    }
                    let delay = backoff.next_delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.hard_stop.cancelled() => return None,
                    }
                }
            }
        }
    }
}

fn database_message(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

/// Answers every submission: one Ack message per stream for the whole batch, a Reject per
/// refused event, and each Publish caller its outcome. Dropping the submissions releases the
/// window permits, so their streams are read again.
fn deliver(
    batch: Vec<Box<Submission>>,
    writes: &[RunWrite],
    carrier: &[usize],
    outcomes: &[Outcome],
    metrics: &Metrics,
) {
    let mut acks: HashMap<*const StreamSink, (Arc<StreamSink>, Vec<u64>)> = HashMap::new();
    for (s, &w) in batch.into_iter().zip(carrier) {
        let outcome = &outcomes[w];
        metrics
            .answer_seconds
            .observe(s.read_at.elapsed().as_secs_f64());
        match outcome {
            Outcome::Committed => {
                metrics.events_committed.inc();
            }
            Outcome::NotOwner => metrics.rejected(reject::NOT_OWNER),
            Outcome::Refused(_) => metrics.rejected(reject::REFUSED_BY_DATABASE),
        };
        let Submission { reply, .. } = *s;
        match reply {
            Reply::Stream { sink, seq, permits } => {
                match outcome.reject_reason(writes[w].result_id) {
                    None => {
                        acks.entry(Arc::as_ptr(&sink))
                            .or_insert_with(|| (sink.clone(), Vec::new()))
                            .1
                            .push(seq);
                    }
                    Some(reason) => sink.reject(seq, reason),
                }
                drop(permits);
            }
            Reply::Once(tx) => {
                // The caller may have given up (deadline); the commit stands either way.
                let _ = tx.send(outcome.clone());
            }
        }
    }
    for (_, (sink, seqs)) in acks {
        sink.send(pb::ingest_message::Msg::Ack(pb::Ack { seqs }));
    }
}

#[cfg(test)]
mod tests {
    use kanade_shared::wire::ExecStatus;
    use uuid::Uuid;

    use super::*;
    use crate::store::RunOutcome;

    fn submission(id: u128, pc: &str, finished: bool) -> Box<Submission> {
        let (tx, _rx) = oneshot::channel();
        Box::new(Submission {
            write: RunWrite {
                result_id: Uuid::from_u128(id),
                pc_id: pc.into(),
                request_id: "r".into(),
                exec_id: "e".into(),
                manifest_id: "m".into(),
                version: "1".into(),
                timeout_secs: (!finished).then_some(60),
                started_at: Utc::now(),
                outcome: finished.then(|| RunOutcome {
                    status: ExecStatus::Succeeded,
                    exit_code: Some(0),
                    stdout: String::new(),
                    stderr: String::new(),
                    stdout_dropped_bytes: 0,
                    stderr_dropped_bytes: 0,
                    finished_at: Utc::now(),
                }),
                trace_id: None,
            },
            bytes: 1,
            reply: Reply::Once(tx),
            charge: None,
            span: tracing::Span::none(),
            read_at: std::time::Instant::now(),
        })
    }

    fn ids(batch: &[Box<Submission>]) -> Vec<u128> {
        batch.iter().map(|s| s.write.result_id.as_u128()).collect()
    }

    fn finished(batch: &[Box<Submission>]) -> Vec<bool> {
        batch.iter().map(|s| s.write.outcome.is_some()).collect()
    }

    fn runs_and_endpoints(writes: &[RunWrite]) -> Vec<(u128, &str)> {
        writes
            .iter()
            .map(|w| (w.result_id.as_u128(), w.pc_id.as_str()))
            .collect()
    }

    #[test]
    fn a_batch_takes_the_lowest_runs_first_and_a_runs_events_in_arrival_order() {
        let mut pending = Pending::new();
        for (id, done) in [
            (7, false),
            (3, false),
            (9, false),
            (3, true),
            (1, false),
            (7, true),
        ] {
            pending.push(submission(id, "a", done));
        }
        let batch = pending.take(usize::MAX, 4, usize::MAX, |_| false);
        assert_eq!(ids(&batch), [1, 3, 3, 7]);
        assert_eq!(
            finished(&batch),
            [false, false, true, false],
            "run 3's Started before its Result"
        );
        let rest = pending.take(usize::MAX, 4, usize::MAX, |_| false);
        assert_eq!(
            (ids(&rest), finished(&rest)),
            (vec![7, 9], vec![true, false])
        );
        assert!(pending.is_empty());
        assert_eq!(pending.bytes(), 0);
    }

    #[test]
    fn a_batch_counts_a_runs_events_as_one_row_and_holds_at_most_max_events() {
        let mut pending = Pending::new();
        for (id, done) in [(1, false), (1, true), (2, false), (2, true), (3, false)] {
            pending.push(submission(id, "a", done));
        }
        // Runs written back to back: two rows are four events.
        let batch = pending.take(2, 2 * 2, usize::MAX, |_| false);
        assert_eq!(ids(&batch), [1, 1, 2, 2]);
        assert_eq!(pending.len(), 1);

        // A run with more events than a row's share (a Result resent while it waited): the
        // events bound the batch, and what is left keeps its order for the next.
        let mut pending = Pending::new();
        for (id, done) in [(5, false), (5, true), (5, true), (6, false)] {
            pending.push(submission(id, "a", done));
        }
        let batch = pending.take(1, 2, usize::MAX, |_| false);
        assert_eq!(
            (ids(&batch), finished(&batch)),
            (vec![5, 5], vec![false, true])
        );
        let batch = pending.take(1, 2, usize::MAX, |_| false);
        assert_eq!(ids(&batch), [5], "one row: run 6 waits for the next batch");
        assert_eq!(ids(&pending.take(1, 2, usize::MAX, |_| false)), [6]);
    }

    #[test]
    fn what_waits_fills_a_batch_at_the_rows_events_or_bytes_a_batch_takes() {
        let mut pending = Pending::new();
        for (id, done) in [(1, false), (1, true), (2, false)] {
            pending.push(submission(id, "a", done));
        }
        // Three events, two rows: a batch of three rows is not full yet, one of two is.
        assert!(!pending.fills_a_batch(3, 6, usize::MAX));
        assert!(pending.fills_a_batch(2, 4, usize::MAX));
        assert!(pending.fills_a_batch(3, 3, usize::MAX), "at max_events");
        assert!(
            pending.fills_a_batch(3, 6, 3),
            "at max_bytes (one byte each)"
        );

        // What a batch took no longer counts; a run with an event left still does.
        pending.push(submission(1, "a", true));
        let batch = pending.take(1, 2, usize::MAX, |_| false);
        assert_eq!(ids(&batch), [1, 1]);
        assert!(!pending.fills_a_batch(3, 6, usize::MAX));
        assert!(pending.fills_a_batch(2, 6, usize::MAX), "runs 1 and 2 wait");
        let batch = pending.take(2, 4, usize::MAX, |_| false);
        assert_eq!(ids(&batch), [1, 2]);
        assert!(!pending.fills_a_batch(1, 1, 1), "nothing waits");
    }

    #[test]
    fn events_of_runs_in_flight_stay_in_order_for_a_later_batch() {
        let mut in_flight = InFlight::default();
        let first = in_flight.admit(&[submission(2, "a", false)]);
        let _second = in_flight.admit(&[submission(3, "a", false)]);
        let mut pending = Pending::new();
        for (id, done) in [(2, true), (4, false), (3, true), (2, true), (5, false)] {
            pending.push(submission(id, "a", done));
        }
        let batch = pending.take(10, usize::MAX, usize::MAX, |run| in_flight.writing(run));
        assert_eq!(ids(&batch), [4, 5], "runs no batch in flight writes go now");

        first.cancel();
        in_flight.prune();
        let batch = pending.take(10, usize::MAX, usize::MAX, |run| in_flight.writing(run));
        assert_eq!(
            ids(&batch),
            [2, 2],
            "run 2's batch is answered; run 3's is not"
        );
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn an_earlier_arrival_window_goes_before_a_lower_id_so_no_clock_starves_anyone() {
        let mut pending = Pending::new();
        let mut late = submission(1, "behind", false);
        late.read_at += pending::ARRIVAL_WINDOW;
        pending.push(late);
        pending.push(submission(9, "a", false));
        let batch = pending.take(1, usize::MAX, usize::MAX, |_| false);
        assert_eq!(
            ids(&batch),
            [9],
            "run 9 came a window earlier than run 1, whose agent's clock is behind"
        );
    }

    #[test]
    fn a_batch_closes_once_its_events_reach_max_bytes() {
        let mut pending = Pending::new();
        for id in 1..=5 {
            let mut s = submission(id, "a", false);
            s.bytes = 400;
            pending.push(s);
        }
        assert_eq!(pending.bytes(), 2000);
        let batch = pending.take(100, usize::MAX, 1000, |_| false);
        assert_eq!(
            ids(&batch),
            [1, 2, 3],
            "the event that reaches the limit is the last"
        );
        assert_eq!(pending.bytes(), 800);
    }

    #[test]
    fn events_of_one_run_merge_and_runs_are_sorted_by_result_id() {
        let mut batch = vec![
            submission(9, "a", false),
            submission(3, "a", false),
            submission(9, "a", true),
            submission(9, "b", true),
        ];
        let (writes, carrier) = merge(&mut batch);
        let ids = runs_and_endpoints(&writes);
        assert_eq!(ids, [(3, "a"), (9, "a"), (9, "b")]);
        assert_eq!(carrier, [1, 0, 1, 2]);
        // Started then Result of run 9 on pc a: one running-then-finished write.
        assert_eq!(writes[1].timeout_secs, Some(60));
        assert!(writes[1].outcome.is_some());
    }

    #[test]
    fn the_endpoint_that_reported_a_run_first_is_written_first() {
        // Two endpoints claim one new run in one batch: the store lets the first write own it,
        // so the first to report it must come first, whatever its pc_id sorts as.
        let mut batch = vec![
            submission(9, "b", false),
            submission(9, "a", false),
            submission(9, "b", true),
        ];
        let (writes, carrier) = merge(&mut batch);
        let ids = runs_and_endpoints(&writes);
        assert_eq!(ids, [(9, "b"), (9, "a")]);
        assert_eq!(carrier, [0, 1, 0]);
        assert!(
            writes[0].outcome.is_some(),
            "b's Result merged into b's write"
        );
    }
}
