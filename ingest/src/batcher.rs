//! Group commit: one task collects the events of every stream and Publish call into batches and
//! writes each batch in ONE transaction; outcomes fan out to their senders only after commit.
//!
//! A batch closes at `max_rows` events, `max_bytes` bytes, or `linger` after its first event.
//! Events of one run in a batch are merged in arrival order first (one upsert per run), and runs
//! are written in `result_id` order so concurrent writers cannot deadlock. Several batches commit
//! at once (`commits_in_flight`): one is built and sent while another waits for its commit. The
//! queue in front is bounded: when the database is slow, submitters wait, streams stop being
//! read, agents stall on their windows, and memory stays flat.
//!
//! Failures (SPEC §3): a transient store error retries the same batch in place with backoff,
//! acking nothing, and turns health NOT_SERVING until a commit succeeds. When the database refuses
//! one event's data, the batch is bisected until that event is isolated and rejected; the rest
//! commit. The batcher never waits on a stream: acks are queued without waiting, and a stream
//! whose outbound queue is full is ended instead.

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

use crate::{
    budget::Charge,
    changes::Changes,
    health::{Database, Readiness},
    metrics::{Metrics, reject},
    outbound::StreamSink,
    store::{RunWrite, Store, StoreError},
};

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
    /// How long one attempt to commit a batch may take. A connection that went silent (no FIN,
    /// no RST) would otherwise hold the batch forever; past this the outcome is unknown, and the
    /// batch is retried on another connection (the upserts are idempotent).
    pub commit_timeout: Duration,
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
    pub fn reject_reason(&self, result_id: &str) -> Option<String> {
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
    /// An event of an agent stream, with the window permits it holds until it is answered.
    Stream {
        sink: Arc<StreamSink>,
        seq: u64,
        permits: Vec<OwnedSemaphorePermit>,
    },
    /// A Publish call.
    Once(oneshot::Sender<Outcome>),
}

/// One validated event on its way to the store.
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
/// batches in flight write the same run (an event of a run being written waits for the next
/// batch), so each run's events reach its row in the order they arrived.
pub async fn run(
    mut queue: mpsc::Receiver<Submission>,
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
    // Events held back from the last batch: their runs were still being written.
    let mut held = Vec::new();
    loop {
        // A free slot first: while every slot is committing, events gather in the queue and
        // the next batch starts out full.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        while let Some(done) = commits.try_join_next() {
            reap(done);
        }
        let Some(mut batch) = gather(&mut queue, &batcher.config, std::mem::take(&mut held)).await
        else {
            break;
        };
        batcher.metrics.queue_depth.set(queue.len() as i64);
        if batcher.hard_stop.is_cancelled() {
            break;
        }
        // An event of a run that a batch in flight is writing waits for that batch: it goes
        // into the next one, ahead of newer events, so each run's events reach its row in the
        // order they arrived. When every event gathered waits, so does the batcher.
        loop {
            let (ready, waiting) = in_flight.split(batch);
            if !ready.is_empty() {
                (batch, held) = (ready, waiting);
                break;
            }
            // Holding a slot and reading nothing meanwhile: the held events go first, and the
            // oldest batch is the likeliest to be done first.
            in_flight.oldest_done().await;
            batch = waiting;
        }
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

/// The batches committing, by the runs they write, each with a token cancelled when it is
/// answered.
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(HashSet<uuid::Uuid>, CancellationToken)>,
}

impl InFlight {
    /// Splits `batch` into the events no batch in flight is writing the run of, and those that
    /// must wait (arrival order kept in both).
    fn split(&mut self, batch: Vec<Submission>) -> (Vec<Submission>, Vec<Submission>) {
        self.batches.retain(|(_, done)| !done.is_cancelled());
        if self.batches.is_empty() {
            return (batch, Vec::new());
        }
        batch.into_iter().partition(|s| {
            !self
                .batches
                .iter()
                .any(|(runs, _)| runs.contains(&s.write.result_id))
        })
    }

    /// Records `batch` as in flight; cancel the token returned once it is answered.
    fn admit(&mut self, batch: &[Submission]) -> CancellationToken {
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

/// The next batch: the events `held` back from the last one, or else the first event to come;
/// then more until `max_rows`, `max_bytes` or `linger` after that. `None`: every submitter is
/// gone and nothing is queued or held.
async fn gather(
    queue: &mut mpsc::Receiver<Submission>,
    config: &BatchConfig,
    held: Vec<Submission>,
) -> Option<Vec<Submission>> {
    let mut batch = held;
    if batch.is_empty() {
        batch.push(queue.recv().await?);
    }
    let mut bytes: usize = batch.iter().map(|s| s.bytes).sum();
    let linger = tokio::time::sleep(config.linger);
    tokio::pin!(linger);
    while batch.len() < config.max_rows && bytes < config.max_bytes {
        let next = match queue.try_recv() {
            Ok(s) => Some(s),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                s = queue.recv() => s,
                _ = &mut linger => None,
            },
        };
        let Some(s) = next else { break };
        bytes += s.bytes;
        batch.push(s);
    }
    Some(batch)
}

/// Merges a batch into one write per (run, endpoint), in arrival order; returns the writes sorted
/// by `result_id` and, for each submission, the index of the write that carries it. The writes
/// are moved out of the submissions, not copied: a batch of large outputs is held once.
fn merge(batch: &mut [Submission]) -> (Vec<RunWrite>, Vec<usize>) {
    let mut writes: Vec<RunWrite> = Vec::new();
    let mut index: HashMap<(uuid::Uuid, String), usize> = HashMap::new();
    let mut carrier = Vec::with_capacity(batch.len());
    for s in batch.iter_mut() {
        let write = std::mem::take(&mut s.write);
        match index.entry((write.result_id, write.pc_id.clone())) {
            std::collections::hash_map::Entry::Occupied(at) => {
                writes[*at.get()].absorb(write);
                carrier.push(*at.get());
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(writes.len());
                carrier.push(writes.len());
                writes.push(write);
            }
        }
    }
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by_key(|&i| writes[i].result_id);
    let mut position = vec![0; writes.len()];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos;
    }
    let mut slots: Vec<Option<RunWrite>> = writes.into_iter().map(Some).collect();
    let sorted = order
        .iter()
        .map(|&i| slots[i].take().expect("each write is placed once"))
        .collect();
    (sorted, carrier.into_iter().map(|i| position[i]).collect())
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
    async fn commit(&self, mut batch: Vec<Submission>) {
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
    batch: Vec<Submission>,
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
        match s.reply {
            Reply::Stream { sink, seq, permits } => {
                match outcome.reject_reason(&writes[w].result_id.to_string()) {
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

    fn submission(id: u128, pc: &str, finished: bool) -> Submission {
        let (tx, _rx) = oneshot::channel();
        Submission {
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
        }
    }

    #[tokio::test]
    async fn events_of_runs_in_flight_wait_for_the_next_batch_in_arrival_order() {
        let mut in_flight = InFlight::default();
        let first = in_flight.admit(&[submission(1, "a", false), submission(2, "a", false)]);
        let second = in_flight.admit(&[submission(3, "a", false)]);
        let batch = vec![
            submission(2, "a", true),
            submission(4, "a", false),
            submission(3, "a", true),
            submission(2, "a", true),
            submission(5, "a", false),
        ];
        let ids = |b: &[Submission]| -> Vec<u128> {
            b.iter().map(|s| s.write.result_id.as_u128()).collect()
        };
        let (ready, waiting) = in_flight.split(batch);
        assert_eq!(ids(&ready), [4, 5], "runs no batch in flight writes go now");
        assert_eq!(
            ids(&waiting),
            [2, 3, 2],
            "the others wait, in arrival order"
        );

        first.cancel();
        in_flight.oldest_done().await;
        let (ready, waiting) = in_flight.split(waiting);
        assert_eq!(ids(&ready), [2, 2], "run 2's batch is answered");
        assert_eq!(ids(&waiting), [3], "run 3's is not");
        second.cancel();
        let (ready, waiting) = in_flight.split(waiting);
        assert_eq!((ids(&ready), waiting.len()), (vec![3], 0));
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
        let ids: Vec<(u128, &str)> = writes
            .iter()
            .map(|w| (w.result_id.as_u128(), w.pc_id.as_str()))
            .collect();
        assert_eq!(ids, [(3, "a"), (9, "a"), (9, "b")]);
        assert_eq!(carrier, [1, 0, 1, 2]);
        // Started then Result of run 9 on pc a: one running-then-finished write.
        assert_eq!(writes[1].timeout_secs, Some(60));
        assert!(writes[1].outcome.is_some());
    }
}
