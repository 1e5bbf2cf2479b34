//! Simulated agents: the real sender (`kanade_agent::sender`) over real gRPC, fed by an
//! in-memory queue (`kanade_testkit::queue`) or by real SQLite outboxes, timing every event from
//! enqueue to ack.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kanade_agent::{
    config::{DEFAULT_KEEPALIVE, DEFAULT_KEEPALIVE_TIMEOUT, RECONNECT_BASE, Synchronous},
    outbox::{Outbox, Pending},
    sender::{self, Queue, SenderConfig},
};
use kanade_shared::{
    backoff::Backoff,
    wire::{EventStarted, ExecResult},
};
pub use kanade_testkit::queue::{Latencies, MemoryQueue, run_events, sender_config};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A real outbox, timed: enqueue instants are remembered per seq until the ack.
pub struct TimedOutbox {
    pub outbox: Outbox,
    enqueued: Mutex<BTreeMap<u64, Instant>>,
    latencies: Arc<Latencies>,
}

impl TimedOutbox {
    pub async fn open(dir: &std::path::Path, latencies: Arc<Latencies>) -> anyhow::Result<Self> {
        Ok(TimedOutbox {
            outbox: Outbox::open(dir, Synchronous::Full, 512 * 1024 * 1024).await?,
            enqueued: Mutex::new(BTreeMap::new()),
            latencies,
        })
    }

    /// One run through the real outbox path (Started committed, then Result).
    pub async fn enqueue_run(
        &self,
        started: &EventStarted,
        result: ExecResult,
    ) -> anyhow::Result<()> {
        let at = Instant::now();
        let (lock, started_seq) = self.outbox.begin_run(started, &Default::default()).await?;
        self.enqueued.lock().unwrap().insert(started_seq, at);
        let at = Instant::now();
        let result_seq = self
            .outbox
            .finish_run(lock, result, &Default::default())
            .await?;
        self.enqueued.lock().unwrap().insert(result_seq, at);
        Ok(())
    }
}

impl Queue for TimedOutbox {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        Ok(self.outbox.pending(after_seq, limit).await?)
    }

    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        self.outbox.ack(seqs).await?;
        let now = Instant::now();
        let mut enqueued = self.enqueued.lock().unwrap();
        let answered: Vec<Duration> = seqs
            .iter()
            .filter_map(|seq| enqueued.remove(seq))
            .map(|at| now - at)
            .collect();
        drop(enqueued);
        self.latencies.record(answered);
        Ok(())
    }

    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        anyhow::bail!("benchmark event {seq} was rejected: {reason}")
    }

    async fn set_connection(&self, _state: &str) -> anyhow::Result<()> {
        Ok(())
    }

    fn wake(&self) -> &Notify {
        &self.outbox.wake
    }
}

/// The sender settings of a real agent left at its defaults (keepalive, and the reconnect
/// backoff's base), with its `reconnect_max`: for benchmarks that measure reconnecting, where
/// [`sender_config`]'s short test cap would flatter the fleet.
pub fn agent_sender_config(ingest: &str, pc_id: &str, reconnect_max: Duration) -> SenderConfig {
    SenderConfig {
        keepalive: DEFAULT_KEEPALIVE,
        keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        reconnect: Backoff {
            base: RECONNECT_BASE,
            cap: reconnect_max,
        },
        ..sender_config(ingest, pc_id)
    }
}

/// Starts the real sender for one agent.
pub fn spawn_sender<Q: Queue>(
    queue: Q,
    ingest: &str,
    pc_id: &str,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_sender_with(queue, sender_config(ingest, pc_id), stop)
}

/// Starts the real sender for one agent with the given settings.
pub fn spawn_sender_with<Q: Queue>(
    queue: Q,
    config: SenderConfig,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let stop = stop.clone();
    tokio::spawn(async move {
        if let Err(err) = sender::run(queue, config, stop).await {
            eprintln!("kanade-bench: a sender stopped: {err:#}");
        }
    })
}
