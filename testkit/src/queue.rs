//! Simulated agents' queues: what the outbox is to the sender, in memory and without SQLite, so
//! a test or a benchmark can run hundreds of real senders in one process. Every ack is timed
//! from enqueue.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{SubsecRound, Utc};
use kanade_agent::{
    outbox::Pending,
    sender::{Queue, SenderConfig},
};
use kanade_shared::{
    backoff::Backoff,
    pb,
    wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus},
};
use prost::Message;
use tokio::sync::Notify;

/// The run lifecycle of one simulated run.
pub fn run_events(pc_id: &str, output_bytes: usize) -> (EventStarted, ExecResult) {
    let started_at = Utc::now().trunc_subsecs(6);
    let started = EventStarted {
        result_id: uuid::Uuid::now_v7().to_string(),
        request_id: format!("req-{}", fastrand::u32(..)),
        exec_id: uuid::Uuid::now_v7().to_string(),
        pc_id: pc_id.to_string(),
        started_at,
        manifest_id: "inventory".into(),
        version: "3".into(),
        timeout_secs: Some(300),
    };
    let line = "disk / 93% used; 12 packages upgradable; uptime 41 days\n";
    let stdout: String = line.chars().cycle().take(output_bytes).collect();
    let result = ExecResult {
        result_id: started.result_id.clone(),
        request_id: started.request_id.clone(),
        exec_id: started.exec_id.clone(),
        pc_id: pc_id.to_string(),
        manifest_id: started.manifest_id.clone(),
        version: started.version.clone(),
        status: ExecStatus::Succeeded,
        exit_code: Some(0),
        stdout,
        stderr: String::new(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        started_at,
        finished_at: started_at + chrono::Duration::milliseconds(1234),
    };
    (started, result)
}

/// Ack latencies of every event, shared by all agents.
///
/// Every simulated agent records here, so nothing here happens per event: an Ack's latencies are
/// recorded under one lock, and whoever waits for the whole load is woken once, when it is
/// acknowledged, not on every Ack (each wake-up was a futex call and a task switch on the cores
/// the benchmark measures ingest on).
#[derive(Debug)]
pub struct Latencies {
    samples: Mutex<Vec<Duration>>,
    pub acked: AtomicU64,
    /// How many acknowledged events [`Latencies::wait_for`] waits for (`u64::MAX`: nobody waits).
    awaited: AtomicU64,
    reached: Notify,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            samples: Mutex::default(),
            acked: AtomicU64::new(0),
            awaited: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        }
    }
}

impl Latencies {
    /// Records the latencies of one Ack's events.
    pub fn record(&self, latencies: impl IntoIterator<Item = Duration>) {
        let mut samples = self.samples.lock().unwrap();
        let before = samples.len();
        samples.extend(latencies);
        let recorded = (samples.len() - before) as u64;
        drop(samples);
        let acked = self.acked.fetch_add(recorded, Ordering::SeqCst) + recorded;
        if recorded > 0 && acked >= self.awaited.load(Ordering::SeqCst) {
            self.reached.notify_waiters();
        }
    }

    /// Waits until `total` events are acknowledged; fails once `stall` passes with none.
    pub async fn wait_for(&self, total: u64, stall: Duration) -> anyhow::Result<()> {
        self.awaited.store(total, Ordering::SeqCst);
        let mut seen = self.acked.load(Ordering::SeqCst);
        loop {
            // Created before the count is read: a wake-up between the two is not lost.
            let reached = self.reached.notified();
            let acked = self.acked.load(Ordering::SeqCst);
            if acked >= total {
                return Ok(());
            }
            if tokio::time::timeout(stall, reached).await.is_err() {
                let now = self.acked.load(Ordering::SeqCst);
                anyhow::ensure!(
                    now > seen,
                    "no ack for {stall:?} ({now} of {total} events acknowledged): is ingest stuck?"
                );
                seen = now;
            }
        }
    }

    /// (p50, p99, max).
    pub fn summary(&self) -> (Duration, Duration, Duration) {
        let mut s = self.samples.lock().unwrap().clone();
        if s.is_empty() {
            return Default::default();
        }
        s.sort_unstable();
        let at = |q: f64| crate::percentile(&s, q).expect("samples");
        (at(0.5), at(0.99), at(1.0))
    }
}

/// One event waiting for its ack.
struct Queued {
    event: pb::Event,
    bytes: u64,
    enqueued_at: Instant,
}

/// An agent's queue in memory: what the outbox is, without SQLite.
pub struct MemoryQueue {
    /// Boxed: the map shifts its entries on every insert and removal, and an event is a few
    /// hundred bytes where a box is eight.
    events: Mutex<BTreeMap<u64, Box<Queued>>>,
    next_seq: AtomicU64,
    wake: Notify,
    /// Told of every ack (a feeder waiting for its runs' starts to be acknowledged).
    pub acked: Notify,
    latencies: Arc<Latencies>,
}

impl MemoryQueue {
    pub fn new(latencies: Arc<Latencies>) -> MemoryQueue {
        MemoryQueue {
            events: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(1),
            wake: Notify::new(),
            acked: Notify::new(),
            latencies,
        }
    }

    /// Whether every event enqueued was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.events.lock().unwrap().is_empty()
    }

    /// Whether the event with this seq still waits for its ack.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.events.lock().unwrap().contains_key(&seq)
    }

    /// Queues an event; returns its seq.
    pub fn enqueue(&self, body: EventBody) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let event: pb::Event = Event {
            seq,
            body,
            trace_context: Default::default(),
        }
        .into();
        let bytes = event.encoded_len() as u64;
        let queued = Box::new(Queued {
            event,
            bytes,
            enqueued_at: Instant::now(),
        });
        self.events.lock().unwrap().insert(seq, queued);
        self.wake.notify_one();
        seq
    }
}

impl Queue for MemoryQueue {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let events = self.events.lock().unwrap();
        Ok(events
            .range(after_seq + 1..)
            .take(limit)
            .map(|(&seq, queued)| Pending {
                seq,
                event: queued.event.clone(),
                bytes: queued.bytes,
            })
            .collect())
    }

    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut events = self.events.lock().unwrap();
        let answered: Vec<Duration> = seqs
            .iter()
            .filter_map(|seq| events.remove(seq))
            .map(|queued| now - queued.enqueued_at)
            .collect();
        drop(events);
        self.latencies.record(answered);
        self.acked.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        anyhow::bail!("benchmark event {seq} was rejected: {reason}")
    }

    async fn set_connection(&self, _state: &str) -> anyhow::Result<()> {
        Ok(())
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }
}

/// The sender settings of a simulated agent.
pub fn sender_config(ingest: &str, pc_id: &str) -> SenderConfig {
    SenderConfig {
        ingest: ingest.to_string(),
        pc_id: pc_id.to_string(),
        tls: None,
        token: None,
        window: kanade_shared::limits::DEFAULT_MAX_UNACKED,
        window_bytes: kanade_shared::limits::DEFAULT_MAX_UNACKED_BYTES,
        keepalive: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(10),
        reconnect: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        },
        status_every: kanade_agent::config::DEFAULT_STATUS_EVERY,
    }
}
