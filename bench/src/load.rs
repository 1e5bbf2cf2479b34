//! Simulated agents: the real sender (`kanade_agent::sender`) over real gRPC, fed by an
//! in-memory queue or by real SQLite outboxes, timing every event from enqueue to ack.

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
    config::Synchronous,
    outbox::{Outbox, Pending},
    sender::{self, Queue, SenderConfig},
};
use kanade_shared::{
    backoff::Backoff,
    pb,
    wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus},
};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Mutex<Vec<Duration>>,
    pub acked: AtomicU64,
    pub all_acked: Notify,
}

impl Latencies {
    fn record(&self, latency: Duration) {
        self.samples.lock().unwrap().push(latency);
        self.acked.fetch_add(1, Ordering::SeqCst);
        self.all_acked.notify_waiters();
    }

    /// (p50, p99, max).
    pub fn summary(&self) -> (Duration, Duration, Duration) {
        let mut s = self.samples.lock().unwrap().clone();
        if s.is_empty() {
            return Default::default();
        }
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99), *s.last().unwrap())
    }
}

/// An agent's queue in memory: what the outbox is, without SQLite.
pub struct MemoryQueue {
    events: Mutex<BTreeMap<u64, (pb::Event, u64, Instant)>>,
    next_seq: AtomicU64,
    wake: Notify,
    latencies: Arc<Latencies>,
}

impl MemoryQueue {
    pub fn new(latencies: Arc<Latencies>) -> MemoryQueue {
        MemoryQueue {
            events: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(1),
            wake: Notify::new(),
            latencies,
        }
    }

    pub fn enqueue(&self, body: EventBody) {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let event: pb::Event = Event {
            seq,
            body,
            trace_context: Default::default(),
        }
        .into();
        let bytes = event.encoded_len() as u64;
        self.events
            .lock()
            .unwrap()
            .insert(seq, (event, bytes, Instant::now()));
        self.wake.notify_one();
    }
}

impl Queue for MemoryQueue {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let events = self.events.lock().unwrap();
        Ok(events
            .range(after_seq + 1..)
            .take(limit)
            .map(|(&seq, (event, bytes, _))| Pending {
                seq,
                event: event.clone(),
                bytes: *bytes,
            })
            .collect())
    }

    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let mut events = self.events.lock().unwrap();
        for seq in seqs {
            if let Some((_, _, at)) = events.remove(seq) {
                self.latencies.record(at.elapsed());
            }
        }
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
        let mut enqueued = self.enqueued.lock().unwrap();
        for seq in seqs {
            if let Some(at) = enqueued.remove(seq) {
                self.latencies.record(at.elapsed());
            }
        }
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
    }
}

/// Starts the real sender for one agent.
pub fn spawn_sender<Q: Queue>(
    queue: Q,
    ingest: &str,
    pc_id: &str,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (config, stop) = (sender_config(ingest, pc_id), stop.clone());
    tokio::spawn(async move {
        if let Err(err) = sender::run(queue, config, stop).await {
            eprintln!("kanade-bench: a sender stopped: {err:#}");
        }
    })
}
