//! Live output (SPEC §14): `Control/TailExecution` and the console's run page follow a running
//! run's output from whichever replica holds its agent's stream.
//!
//! Every replica plays two parts, each bounded:
//!
//! - **Watching** — watchers here follow run X. One [`Watched`] per run, whatever the number of
//!   watchers: it says `Watching { reply_to: this replica's channel }` on the bus as the first
//!   watcher comes, then again every [`REFRESH`] (sooner, backing off, while no replica answered
//!   that it holds the agent), and `Unwatching` when the last watcher leaves. Output arrives on
//!   this replica's own channel. Offsets dedupe it (the agent sends what it holds whenever it is
//!   asked again: after a reconnect, on another replica), so each byte reaches a watcher once,
//!   in order; the last 64 KiB delivered of each stream are kept for watchers who join later.
//!   Each watcher has its own queue of at most [`WATCHER_BUFFER_BYTES`]: a watcher that reads
//!   too slowly loses chunks (it sees the gap in the offsets), and nobody else waits for it;
//!   when the run ends, each watcher gets the stored end of the output it was not given.
//!   Whether a watched run ended is looked up after commits are announced (and every
//!   [`FINISHED_CHECK_EVERY`]: a read replica may not have the commit yet), and its watchers
//!   get its final row, then the end.
//! - **Holding** — this replica holds the agent stream of a run someone watches. One
//!   [`Tailing`] per run, with the channels that want it (each forgotten when not said again
//!   within [`EXPIRE`]). The first sends `Tail { watch: true }` to the agent, the last leaving
//!   `Tail { watch: false }`. Each chunk from the agent goes to every channel that wants it:
//!   this replica's own straight to its watchers, the others' by `NOTIFY`, cut to fit a
//!   notification and sent in batches every [`FORWARD_EVERY`] from a queue of at most
//!   [`FORWARD_MAX_BYTES`] (more is dropped: a gap). When the stream that carried the output
//!   ends, every channel is told (`Interrupted`) and the holding is forgotten: the watchers ask
//!   again, and whichever replica holds the agent's next stream takes over.
//!
//! Nothing here is written to the database: live output is a view of a run, its result the
//! record.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use chrono::Utc;
use kanade_shared::{limits, pb};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bus::{self, Bus, ControlMessage, OutputMessage, TailHeard, WatchedRun},
    changes::Changes,
    metrics::Metrics,
    outbound::StreamSink,
    presence,
    server::registry::StreamRegistry,
    store::{ExecutionRow, ReadStore, StoreError},
};

/// Watchers say again which runs they watch this often.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Until a replica answers that it holds the run's agent, watchers ask again after this, then
/// twice as long each time, up to [`REFRESH`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// A holding forgets a channel that did not say it still watches within this.
const EXPIRE: Duration = Duration::from_secs(6);
/// Output for other replicas leaves at most this long after it arrived.
const FORWARD_EVERY: Duration = Duration::from_millis(20);
/// Output waiting to be sent to other replicas, at most.
const FORWARD_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Output waiting for one watcher, at most (about a second at an agent's default rate cap).
pub const WATCHER_BUFFER_BYTES: usize = 256 * 1024;
/// Whether watched runs ended is looked up at least this often, and at most every
/// [`FINISHED_CHECK_GAP`] however often commits are announced.
const FINISHED_CHECK_EVERY: Duration = Duration::from_secs(1);
const FINISHED_CHECK_GAP: Duration = Duration::from_millis(200);
/// Watchers are told the agent's stream ended this long after it did, unless the run turned
/// out to have ended (a look whether watched runs ended starts within [`FINISHED_CHECK_EVERY`]).
const INTERRUPTION_TOLD_AFTER: Duration = FINISHED_CHECK_EVERY.saturating_add(FINISHED_CHECK_GAP);
/// How often due work (asking again, expiring holdings) is looked at.
const BEAT: Duration = Duration::from_millis(50);
/// Room in a notification for the text of one output piece, once escaped for JSON (the rest of
/// the message is under 200 bytes).
const PIECE_JSON_BYTES: usize = bus::MAX_PAYLOAD_BYTES - 400;

/// Why a run cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("result_id must be a UUID, got {0:?}")]
    NotAnId(String),
    #[error("no run has result_id {0}")]
    NotFound(Uuid),
    #[error(
        "this replica already follows {max} runs' output for watchers (--max-tails); close one or \
         try again later"
    )]
    TooMany { max: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a watcher receives, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEvent {
    /// Output.
    Chunk(pb::OutputChunk),
    /// What happens to the run's agent.
    Notice {
        agent_connected: bool,
        message: String,
    },
    /// The run ended: its final row. The last event.
    Finished(Box<ExecutionRow>),
}

impl TailEvent {
    fn bytes(&self) -> usize {
        match self {
            TailEvent::Chunk(chunk) => chunk.data.len(),
            _ => 0,
        }
    }
}

/// Limits of live output on one replica.
#[derive(Debug, Clone, Copy)]
pub struct TailLimits {
    /// Watchers at once (`--max-tails`).
    pub max_watchers: usize,
}

/// Live output of this replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Tails {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reads: Arc<dyn ReadStore>,
    bus: Bus,
    registry: Arc<StreamRegistry>,
    changes: Changes,
    lost_grace: chrono::Duration,
    presence_every: Duration,
    limits: TailLimits,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Output waiting to go to other replicas.
    forward: Mutex<Forward>,
    forward_ready: Notify,
    /// Something is due now (a first watcher, an agent back on this replica).
    due: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Runs watched here.
    watched: HashMap<Uuid, Watched>,
    /// Watchers here, over every run.
    watchers: usize,
    next_watcher: u64,
    /// Runs whose output this replica asks of an agent stream it holds.
    held: HashMap<Uuid, Tailing>,
    /// Runs no longer watched here, to say so (by the task that says what is watched, so the
    /// two are said in order).
    unwatched: Vec<Uuid>,
}

/// A run watched on this replica.
#[derive(Debug)]
struct Watched {
    pc_id: String,
    watchers: Vec<(u64, Arc<WatcherQueue>)>,
    /// Per stream (stdout, stderr): the offset up to which output was delivered.
    delivered: [u64; 2],
    /// Per stream: the last output delivered (up to the agent's 64 KiB), for watchers joining.
    recent: [Recent; 2],
    /// Per stream: a chunk from another replica whose parts are arriving.
    assembling: [Option<Assembly>; 2],
    /// A replica answered that it holds the run's agent, and no interruption came since.
    answered: bool,
    /// Watchers were told the agent is not connected: told again when it is.
    told_disconnected: bool,
    /// When the stream carrying the run's output ended, while its watchers are not told yet:
    /// they are once the run is known not to have ended with it
    /// ([`INTERRUPTION_TOLD_AFTER`]; an `exec --wait` disconnects right after its result), or at
    /// once when its output resumes.
    interrupted_at: Option<Instant>,
    ask_every: Duration,
    next_ask: Instant,
}

/// A chunk from another replica, put back together from its parts.
#[derive(Debug)]
struct Assembly {
    offset: u64,
    length: u64,
    next_part: u32,
    data: String,
}

/// Puts a chunk back together in `slot` from its parts (`part` number, `more` to come), each
/// at the chunk's `offset` and `length`: its whole text once the last part came after every
/// other in order. A part missing or out of place drops the chunk (the watchers see a gap).
fn assemble(
    slot: &mut Option<Assembly>,
    (offset, length): (u64, u64),
    data: String,
    (part, more): (u32, bool),
) -> Option<String> {
    if part == 0 {
        *slot = Some(Assembly {
            offset,
            length,
            next_part: 0,
            data: String::new(),
        });
    }
    let assembly = slot.as_mut()?;
    let fits = assembly.data.len() + data.len() <= 3 * limits::MAX_OUTPUT_CHUNK_BYTES;
    if (assembly.offset, assembly.length, assembly.next_part) != (offset, length, part) || !fits {
        *slot = None;
        return None;
    }
    assembly.data.push_str(&data);
    assembly.next_part += 1;
    if more {
        return None;
    }
    slot.take().map(|a| a.data)
}

/// The last chunks delivered of one stream.
#[derive(Debug, Default)]
struct Recent {
    chunks: VecDeque<pb::OutputChunk>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, chunk: pb::OutputChunk) {
        self.bytes += chunk.data.len();
        self.chunks.push_back(chunk);
        while self.bytes > limits::LIVE_OUTPUT_HELD_BYTES && self.chunks.len() > 1 {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }
}

/// A run whose output this replica asks of its agent.
#[derive(Debug)]
struct Tailing {
    result_id: Uuid,
    pc_id: String,
    /// The channels that want it, and when they last said so.
    wanted_by: HashMap<String, Instant>,
    /// The streams told to send it.
    told: Vec<Weak<StreamSink>>,
}

#[derive(Debug, Default)]
struct Forward {
    messages: Vec<(String, OutputMessage)>,
    bytes: usize,
}

/// One watcher's queue.
#[derive(Debug, Default)]
struct WatcherQueue {
    queue: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<TailEvent>,
    bytes: usize,
    /// Per stream (stdout, stderr): where the output this watcher was given ends. Past it, a
    /// run that ends gives this watcher the stored end of its output (so one that fell behind
    /// sees the gap and still gets the end).
    received: [u64; 2],
    /// The final row was queued: nothing follows it.
    finished: bool,
}

impl WatcherQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `event`; output that does not fit is dropped (false), anything else always fits.
    fn push(&self, event: TailEvent) -> bool {
        let mut queue = self.lock();
        if queue.finished {
            return false;
        }
        let bytes = event.bytes();
        if bytes > 0 && queue.bytes + bytes > WATCHER_BUFFER_BYTES {
            return false;
        }
        queue.finished = matches!(event, TailEvent::Finished(_));
        if let TailEvent::Chunk(chunk) = &event {
            let stream = slot(chunk.stream == pb::OutputStream::Stdout as i32);
            queue.received[stream] = queue.received[stream].max(chunk.offset + chunk.length);
        }
        queue.bytes += bytes;
        queue.events.push_back(event);
        drop(queue);
        self.ready.notify_one();
        true
    }

    /// Queues a stored output or a final row: a finished run's whole answer, not held to the
    /// bound of live output (its watcher counts against --max-tails like any other).
    fn push_stored(&self, event: TailEvent) {
        let mut queue = self.lock();
        queue.bytes += event.bytes();
        queue.events.push_back(event);
    }

    /// Per stream: where the output this watcher was given ends.
    fn received(&self) -> [u64; 2] {
        self.lock().received
    }

    /// Ends this watcher's run: the stored end of `row`'s output it was not given (at most what
    /// an agent holds of each stream, past its own bound: a gap in the offsets tells what it
    /// lost), then the row.
    fn finish(&self, row: &ExecutionRow) {
        if let Some(o) = &row.outcome {
            let received = self.received();
            for (stdout, text, dropped) in [
                (true, &o.stdout, o.stdout_dropped_bytes),
                (false, &o.stderr, o.stderr_dropped_bytes),
            ] {
                let from = received[slot(stdout)];
                for chunk in stored_rest(from, row.result_id, stdout, text, dropped) {
                    self.push_stored(TailEvent::Chunk(chunk));
                }
            }
        }
        self.push(TailEvent::Finished(Box::new(row.clone())));
    }

    async fn next(&self) -> TailEvent {
        loop {
            {
                let mut queue = self.lock();
                if let Some(event) = queue.events.pop_front() {
                    queue.bytes -= event.bytes();
                    return event;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// One watcher of one run: its events, in order, until the run's final row. Dropping it
/// leaves.
#[derive(Debug)]
pub struct Watcher {
    queue: Arc<WatcherQueue>,
    leave: Option<Leave>,
    done: bool,
}

/// What a watcher gives back when it is dropped: its place among the replica's `--max-tails`,
/// and, following a running run, its place among that run's watchers.
#[derive(Debug)]
struct Leave {
    tails: Tails,
    watching: Option<(Uuid, u64)>,
}

impl Watcher {
    /// The next event; `None` after the final row.
    pub async fn next(&mut self) -> Option<TailEvent> {
        if self.done {
            return None;
        }
        let event = self.queue.next().await;
        self.done = matches!(event, TailEvent::Finished(_));
        Some(event)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(Leave { tails, watching }) = self.leave.take() {
            tails.leave(watching);
        }
    }
}

/// Everything live output is built from.
#[derive(Debug)]
pub struct TailParts {
    pub reads: Arc<dyn ReadStore>,
    pub bus: Bus,
    pub registry: Arc<StreamRegistry>,
    pub changes: Changes,
    pub lost_grace: chrono::Duration,
    pub presence_every: Duration,
    pub limits: TailLimits,
    pub metrics: Arc<Metrics>,
}

impl Tails {
    pub fn new(parts: TailParts) -> Tails {
        Tails {
            inner: Arc::new(Inner {
                reads: parts.reads,
                bus: parts.bus,
                registry: parts.registry,
                changes: parts.changes,
                lost_grace: parts.lost_grace,
                presence_every: parts.presence_every,
                limits: parts.limits,
                metrics: parts.metrics,
                state: Mutex::default(),
                forward: Mutex::default(),
                forward_ready: Notify::new(),
                due: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the run `result_id`: for a running run, what its agent holds then what it writes,
    /// then its final row; for a finished run, its stored outputs then its row.
    pub async fn watch(&self, result_id: &str) -> Result<Watcher, TailError> {
        let id =
            Uuid::try_parse(result_id).map_err(|_| TailError::NotAnId(result_id.to_string()))?;
        let now = Utc::now();
        let run = self
            .inner
            .reads
            .get(id, now, self.inner.lost_grace)
            .await?
            .ok_or(TailError::NotFound(id))?;
        let watcher_id = {
            let mut state = self.state();
            if state.watchers >= self.inner.limits.max_watchers {
                return Err(TailError::TooMany {
                    max: self.inner.limits.max_watchers,
                });
            }
            state.watchers += 1;
            state.next_watcher += 1;
            self.inner.metrics.tail_watchers.set(state.watchers as i64);
            state.next_watcher
        };
        if run.outcome.is_some() {
            let leave = Leave {
                tails: self.clone(),
                watching: None,
            };
            return Ok(finished_watcher(run, leave));
        }
        let pc_id = run.pc_id.clone();
        let queue = Arc::new(WatcherQueue::default());
        let first = {
            let mut state = self.state();
            let first = !state.watched.contains_key(&id);
            let watched = state.watched.entry(id).or_insert_with(|| Watched {
                pc_id: pc_id.clone(),
                watchers: Vec::new(),
                delivered: [0, 0],
                recent: Default::default(),
                assembling: Default::default(),
                answered: false,
                told_disconnected: false,
                interrupted_at: None,
                ask_every: FIRST_RETRY,
                next_ask: Instant::now(),
            });
            for recent in &watched.recent {
                for chunk in &recent.chunks {
                    queue.push(TailEvent::Chunk(chunk.clone()));
                }
            }
            watched.watchers.push((watcher_id, queue.clone()));
            first
        };
        let watcher = Watcher {
            queue: queue.clone(),
            leave: Some(Leave {
                tails: self.clone(),
                watching: Some((id, watcher_id)),
            }),
            done: false,
        };
        if first {
            self.inner.due.notify_one();
        }
        if !self.agent_connected(&pc_id).await {
            queue.push(TailEvent::Notice {
                agent_connected: false,
                message: format!(
                    "the agent of {pc_id} is not connected to ingest: its output shows when it \
                     reconnects (the run's result arrives then too)"
                ),
            });
            if let Some(watched) = self.state().watched.get_mut(&id) {
                watched.told_disconnected = true;
            }
        }
        Ok(watcher)
    }

    /// Whether `pc_id`'s agent has a stream open here or, as presence says, on any replica.
    async fn agent_connected(&self, pc_id: &str) -> bool {
        if !self.inner.registry.sinks(pc_id).is_empty() {
            return true;
        }
        let connected_after = presence::connected_after(Utc::now(), self.inner.presence_every);
        match self.inner.reads.get_endpoint(pc_id, connected_after).await {
            Ok(Some(endpoint)) => endpoint.connected,
            Ok(None) => false,
            // Not knowing is no reason to alarm the watcher.
            Err(_) => true,
        }
    }

    /// A watcher left: its place is free, and a run it was the last to watch is said to be
    /// watched no more.
    fn leave(&self, watching: Option<(Uuid, u64)>) {
        let mut state = self.state();
        state.watchers -= 1;
        self.inner.metrics.tail_watchers.set(state.watchers as i64);
        let Some((result_id, watcher_id)) = watching else {
            return;
        };
        let Some(watched) = state.watched.get_mut(&result_id) else {
            return;
        };
        watched.watchers.retain(|(id, _)| *id != watcher_id);
        if watched.watchers.is_empty() {
            state.watched.remove(&result_id);
            state.unwatched.push(result_id);
            drop(state);
            self.inner.due.notify_one();
        }
    }

    /// A chunk of output from the agent stream of `pc_id`: to every channel that wants it.
    pub fn from_agent(&self, pc_id: &str, chunk: pb::OutputChunk) {
        let Some((result_id, stdout)) = checked(&chunk) else {
            tracing::debug!(%pc_id, "ignored a malformed output chunk");
            return;
        };
        let wanted: Vec<String> = {
            let state = self.state();
            match state.held.get(&result_id) {
                Some(tailing) if tailing.pc_id == pc_id => {
                    tailing.wanted_by.keys().cloned().collect()
                }
                _ => Vec::new(),
            }
        };
        if wanted.is_empty() {
            // Nobody (any more): the agent stops sending.
            stop_sending(result_id, self.inner.registry.sinks(pc_id));
            return;
        }
        let own = self.inner.bus.tail_channel();
        let mut parts = None;
        for channel in wanted {
            if channel == own {
                self.deliver(result_id, stdout, chunk.offset, chunk.length, &chunk.data);
            } else {
                let parts = parts.get_or_insert_with(|| pieces(result_id, stdout, &chunk));
                self.queue_forward(&channel, parts);
            }
        }
    }

    /// Queues `messages` for the replica listening on `channel`: all of them, or none when the
    /// queue has no room (the watchers there see a gap).
    fn queue_forward(&self, channel: &str, messages: &[OutputMessage]) {
        let bytes: usize = messages
            .iter()
            .map(|m| match m {
                OutputMessage::Chunk { data, .. } => data.len() + 100,
                _ => 100,
            })
            .sum();
        let mut forward = self.inner.forward.lock().unwrap_or_else(|e| e.into_inner());
        if forward.bytes + bytes > FORWARD_MAX_BYTES {
            drop(forward);
            self.inner.metrics.tail_chunk("dropped");
            return;
        }
        forward.bytes += bytes;
        forward
            .messages
            .extend(messages.iter().map(|m| (channel.to_string(), m.clone())));
        drop(forward);
        self.inner.forward_ready.notify_one();
    }

    /// Output of a run watched here: what watchers do not have yet goes to each of them.
    fn deliver(&self, result_id: Uuid, stdout: bool, offset: u64, length: u64, data: &str) {
        let mut state = self.state();
        let Some(watched) = state.watched.get_mut(&result_id) else {
            return;
        };
        let stream = slot(stdout);
        let Some(chunk) = unseen(
            watched.delivered[stream],
            result_id,
            stdout,
            offset,
            length,
            data,
        ) else {
            return;
        };
        watched.delivered[stream] = chunk.offset + chunk.length;
        watched.answered = true;
        tell_interrupted(watched);
        for (_, queue) in &watched.watchers {
            let delivered = queue.push(TailEvent::Chunk(chunk.clone()));
            self.inner
                .metrics
                .tail_chunk(if delivered { "delivered" } else { "dropped" });
        }
        watched.recent[stream].push(chunk);
    }

    /// What the bus brought for live output.
    fn on_heard(&self, heard: TailHeard) {
        match heard {
            TailHeard::Control(ControlMessage::Watching { reply_to, runs }) => {
                self.on_watching(reply_to, runs)
            }
            TailHeard::Control(ControlMessage::Unwatching { reply_to, runs }) => {
                for result_id in runs {
                    self.unwant(result_id, &reply_to);
                }
            }
            TailHeard::Control(ControlMessage::Cancel { .. }) => {}
            TailHeard::Output(OutputMessage::Chunk {
                result_id,
                stdout,
                offset,
                length,
                data,
                part,
                more,
            }) => {
                let whole = if part == 0 && !more {
                    Some(data)
                } else {
                    self.assemble(result_id, stdout, (offset, length), data, (part, more))
                };
                if let Some(data) = whole {
                    self.deliver(result_id, stdout, offset, length, &data);
                }
            }
            TailHeard::Output(OutputMessage::Tailing { result_id }) => self.on_tailing(result_id),
            TailHeard::Output(OutputMessage::Interrupted { result_id }) => {
                self.on_interrupted(result_id)
            }
        }
    }

    /// A part of a chunk from another replica: the chunk's whole text once its last part came.
    fn assemble(
        &self,
        result_id: Uuid,
        stdout: bool,
        place: (u64, u64),
        data: String,
        part: (u32, bool),
    ) -> Option<String> {
        let mut state = self.state();
        let watched = state.watched.get_mut(&result_id)?;
        assemble(&mut watched.assembling[slot(stdout)], place, data, part)
    }

    /// The replica listening on `reply_to` watches `runs`: those whose agent streams are here
    /// are asked for.
    fn on_watching(&self, reply_to: String, runs: Vec<WatchedRun>) {
        let now = Instant::now();
        let mut answers = Vec::new();
        {
            let mut state = self.state();
            for run in runs {
                let sinks = self.inner.registry.sinks(&run.pc_id);
                if sinks.is_empty() {
                    continue;
                }
                let tailing = state.held.entry(run.result_id).or_insert_with(|| Tailing {
                    result_id: run.result_id,
                    pc_id: run.pc_id.clone(),
                    wanted_by: HashMap::new(),
                    told: Vec::new(),
                });
                if tailing.pc_id != run.pc_id {
                    continue;
                }
                let new = tailing.wanted_by.insert(reply_to.clone(), now).is_none();
                // A replica that starts wanting the run needs what the agent holds: the agent
                // is asked (again: it sends what it holds first, and the replicas that have it
                // already drop it by its offsets). So is a stream of its agent not asked yet
                // (it reconnected while its old stream is still ending).
                let told = |sink: &Arc<StreamSink>| {
                    tailing
                        .told
                        .iter()
                        .any(|t| std::ptr::eq(t.as_ptr(), Arc::as_ptr(sink)))
                };
                let asked: Vec<&Arc<StreamSink>> =
                    sinks.iter().filter(|s| new || !told(s)).collect();
                for sink in &asked {
                    sink.send(tail_message(run.result_id, true));
                }
                if !asked.is_empty() {
                    tailing.told = sinks.iter().map(Arc::downgrade).collect();
                    tracing::debug!(result_id = %run.result_id, pc_id = %run.pc_id,
                        "asked an agent for a run's output");
                }
                if new {
                    answers.push(OutputMessage::Tailing {
                        result_id: run.result_id,
                    });
                }
            }
            self.inner.metrics.tails_held.set(state.held.len() as i64);
        }
        for answer in answers {
            self.send_to(&reply_to, answer);
        }
    }

    /// Sends `message` to the replica listening on `channel` (this one's straight in).
    fn send_to(&self, channel: &str, message: OutputMessage) {
        if channel == self.inner.bus.tail_channel() {
            self.on_heard(TailHeard::Output(message));
        } else {
            self.queue_forward(channel, &[message]);
        }
    }

    /// `channel` no longer wants `result_id`; the agent stops when nobody does.
    fn unwant(&self, result_id: Uuid, channel: &str) {
        self.forget_held(|tailing| {
            if tailing.result_id == result_id {
                tailing.wanted_by.remove(channel);
            }
        });
    }

    fn on_tailing(&self, result_id: Uuid) {
        let mut state = self.state();
        let Some(watched) = state.watched.get_mut(&result_id) else {
            return;
        };
        watched.answered = true;
        watched.ask_every = REFRESH;
        watched.next_ask = watched.next_ask.max(Instant::now() + REFRESH);
        tell_interrupted(watched);
        if std::mem::take(&mut watched.told_disconnected) {
            notify(
                watched,
                true,
                "the agent is connected: its output follows".to_string(),
            );
        }
    }

    fn on_interrupted(&self, result_id: Uuid) {
        let mut state = self.state();
        let Some(watched) = state.watched.get_mut(&result_id) else {
            return;
        };
        watched.answered = false;
        watched.ask_every = FIRST_RETRY;
        watched.next_ask = Instant::now() + FIRST_RETRY;
        if !watched.told_disconnected && watched.interrupted_at.is_none() {
            watched.interrupted_at = Some(Instant::now());
        }
    }

    /// Tells the watchers of runs whose agent's stream ended a while ago, and that did not end.
    fn tell_interrupted_due(&self) {
        let mut state = self.state();
        for watched in state.watched.values_mut() {
            if watched
                .interrupted_at
                .is_some_and(|at| at.elapsed() >= INTERRUPTION_TOLD_AFTER)
            {
                tell_interrupted(watched);
            }
        }
    }

    /// A stream of `pc_id` said Hello here: runs of it watched here are asked for at once.
    pub fn on_welcome(&self, pc_id: &str) {
        let mut state = self.state();
        let mut any = false;
        for watched in state.watched.values_mut().filter(|w| w.pc_id == pc_id) {
            watched.next_ask = Instant::now();
            any = true;
        }
        drop(state);
        if any {
            self.inner.due.notify_one();
        }
    }

    /// A stream of `pc_id` ended: the output it carried stops, and whoever wanted it is told.
    pub fn on_stream_ended(&self, pc_id: &str, sink: &Arc<StreamSink>) {
        self.forget_held(|tailing| {
            if tailing.pc_id == pc_id {
                tailing
                    .told
                    .retain(|s| !std::ptr::eq(s.as_ptr(), Arc::as_ptr(sink)));
            }
        });
    }

    /// Applies `update` to every holding, then forgets those nobody wants any more (their
    /// agent stops sending) and those whose agent streams are all gone (whoever wanted them is
    /// told the output stopped, and asks again).
    fn forget_held(&self, mut update: impl FnMut(&mut Tailing)) {
        let mut interrupted = Vec::new();
        {
            let mut state = self.state();
            state.held.retain(|result_id, tailing| {
                update(tailing);
                tailing.told.retain(|s| s.strong_count() > 0);
                if tailing.wanted_by.is_empty() {
                    stop_sending(*result_id, tailing.told.iter().filter_map(Weak::upgrade));
                    return false;
                }
                if tailing.told.is_empty() {
                    let channels: Vec<String> = tailing.wanted_by.keys().cloned().collect();
                    interrupted.push((*result_id, channels));
                    return false;
                }
                true
            });
            self.inner.metrics.tails_held.set(state.held.len() as i64);
        }
        for (result_id, channels) in interrupted {
            for channel in channels {
                self.send_to(&channel, OutputMessage::Interrupted { result_id });
            }
        }
    }

    /// Keeps live output going until `stop`: what the bus brings, asking again, expiring what is
    /// no longer wanted, ending watchers of runs that ended, sending output to other replicas.
    pub async fn run(self, mut heard: mpsc::Receiver<TailHeard>, stop: CancellationToken) {
        let forwarding = self.clone().forward(stop.clone());
        let main = async {
            let mut beat = tokio::time::interval(BEAT);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut commits = self.inner.changes.follow();
            let mut last_check = Instant::now();
            let mut check_wanted = false;
            loop {
                // Nothing watched here and nothing held: nothing is due until a message or a
                // watcher comes.
                let busy = {
                    let state = self.state();
                    !state.watched.is_empty() || !state.held.is_empty()
                };
                tokio::select! {
                    message = heard.recv() => match message {
                        Some(message) => self.on_heard(message),
                        None => return,
                    },
                    _ = beat.tick(), if busy => {}
                    _ = self.inner.due.notified() => {}
                    changed = commits.changed(), if busy => {
                        if changed.is_err() { return }
                        check_wanted = true;
                    }
                    _ = stop.cancelled() => return,
                }
                self.ask_due().await;
                self.expire();
                let since = last_check.elapsed();
                if (check_wanted && since >= FINISHED_CHECK_GAP) || since >= FINISHED_CHECK_EVERY {
                    check_wanted = false;
                    last_check = Instant::now();
                    self.end_finished().await;
                }
                self.tell_interrupted_due();
            }
        };
        tokio::join!(main, forwarding);
    }

    /// Says which runs are watched here, for those due.
    async fn ask_due(&self) {
        let now = Instant::now();
        let (due, unwatched) = {
            let mut state = self.state();
            let mut unwatched = std::mem::take(&mut state.unwatched);
            // Watched again meanwhile: nothing to say.
            unwatched.retain(|id| !state.watched.contains_key(id));
            let due: Vec<WatchedRun> = state
                .watched
                .iter_mut()
                .filter(|(_, w)| w.next_ask <= now)
                .map(|(id, w)| {
                    w.next_ask = now + w.ask_every;
                    if !w.answered {
                        w.ask_every = (w.ask_every * 2).min(REFRESH);
                    }
                    WatchedRun {
                        pc_id: w.pc_id.clone(),
                        result_id: *id,
                    }
                })
                .collect();
            (due, unwatched)
        };
        self.say_unwatched(unwatched).await;
        if due.is_empty() {
            return;
        }
        let reply_to = self.inner.bus.tail_channel().to_string();
        self.inner
            .bus
            .publish_all(watching_messages(&reply_to, due))
            .await;
    }

    /// Tells the replicas holding `runs` that nobody here watches them any more.
    async fn say_unwatched(&self, runs: Vec<Uuid>) {
        if runs.is_empty() {
            return;
        }
        let reply_to = self.inner.bus.tail_channel().to_string();
        self.inner
            .bus
            .publish(ControlMessage::Unwatching { reply_to, runs })
            .await;
    }

    /// Forgets the channels that stopped saying they watch, and the holdings whose streams went
    /// away.
    fn expire(&self) {
        let now = Instant::now();
        self.forget_held(|tailing| {
            tailing
                .wanted_by
                .retain(|_, said| now.duration_since(*said) < EXPIRE);
        });
    }

    /// Gives the watchers of runs that ended their final row.
    async fn end_finished(&self) {
        let ids: Vec<Uuid> = self.state().watched.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let rows = match self
            .inner
            .reads
            .finished_among(&ids, Utc::now(), self.inner.lost_grace)
            .await
        {
            Ok(rows) => rows,
            Err(err) => {
                tracing::debug!(error = %err, "looking up whether watched runs ended failed");
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let mut ended = Vec::new();
        {
            let mut state = self.state();
            for row in rows {
                let Some(watched) = state.watched.remove(&row.result_id) else {
                    continue;
                };
                ended.push(row.result_id);
                for (_, queue) in &watched.watchers {
                    queue.finish(&row);
                }
            }
        }
        self.say_unwatched(ended).await;
    }

    /// Sends output to other replicas, in batches, until `stop`.
    async fn forward(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.inner.forward_ready.notified() => {}
                _ = stop.cancelled() => return,
            }
            tokio::time::sleep(FORWARD_EVERY).await;
            let batch = {
                let mut forward = self.inner.forward.lock().unwrap_or_else(|e| e.into_inner());
                forward.bytes = 0;
                std::mem::take(&mut forward.messages)
            };
            let chunks = batch
                .iter()
                .filter(|(_, m)| matches!(m, OutputMessage::Chunk { .. }))
                .count();
            self.inner.bus.send_output(batch).await;
            self.inner
                .metrics
                .tail_chunks
                .get_or_create(&vec![("outcome", "forwarded")])
                .inc_by(chunks as u64);
        }
    }
}

/// The agent's `streams` are told to stop sending `result_id`: nobody watches it any more.
fn stop_sending(result_id: Uuid, streams: impl IntoIterator<Item = Arc<StreamSink>>) {
    for sink in streams {
        sink.send(tail_message(result_id, false));
    }
    tracing::debug!(%result_id, "nobody watches a run any more: its agent stops sending");
}

fn tail_message(result_id: Uuid, watch: bool) -> pb::ingest_message::Msg {
    pb::ingest_message::Msg::Tail(pb::Tail {
        result_id: result_id.hyphenated().to_string(),
        watch,
    })
}

/// Tells `watched`'s watchers that the agent's stream ended, if that is pending.
fn tell_interrupted(watched: &mut Watched) {
    if watched.interrupted_at.take().is_some() {
        watched.told_disconnected = true;
        notify(
            watched,
            false,
            "the agent's stream ended (it reconnects): its output resumes then; what it writes \
             meanwhile shows once it is back, as far as the agent still holds it"
                .to_string(),
        );
    }
}

fn notify(watched: &Watched, agent_connected: bool, message: String) {
    for (_, queue) in &watched.watchers {
        queue.push(TailEvent::Notice {
            agent_connected,
            message: message.clone(),
        });
    }
}

/// The run and stream of an agent's chunk, when it is well formed.
fn checked(chunk: &pb::OutputChunk) -> Option<(Uuid, bool)> {
    let result_id = Uuid::try_parse(&chunk.result_id).ok()?;
    let stdout = match pb::OutputStream::try_from(chunk.stream).ok()? {
        pb::OutputStream::Stdout => true,
        pb::OutputStream::Stderr => false,
        pb::OutputStream::Unspecified => return None,
    };
    let fits = chunk.length as usize <= limits::MAX_OUTPUT_CHUNK_BYTES
        && chunk.data.len() <= 3 * limits::MAX_OUTPUT_CHUNK_BYTES
        && chunk.offset.checked_add(chunk.length).is_some();
    fits.then_some((result_id, stdout))
}

/// A stream's place in per-stream arrays: 0 for stdout, 1 for stderr.
fn slot(stdout: bool) -> usize {
    usize::from(!stdout)
}

/// What of a chunk starting at `offset` comes after `delivered`: `None` when nothing does. A
/// chunk that overlaps is cut at a character boundary (or dropped when its text does not map
/// byte for byte onto the stream: invalid UTF-8 was replaced).
fn unseen(
    delivered: u64,
    result_id: Uuid,
    stdout: bool,
    offset: u64,
    length: u64,
    data: &str,
) -> Option<pb::OutputChunk> {
    let end = offset + length;
    if end <= delivered || length == 0 {
        return None;
    }
    let (offset, data) = if offset >= delivered {
        (offset, data)
    } else {
        if data.len() as u64 != length {
            return None;
        }
        let mut skip = (delivered - offset) as usize;
        while !data.is_char_boundary(skip) {
            skip += 1;
        }
        (offset + skip as u64, &data[skip..])
    };
    Some(pb::OutputChunk {
        result_id: result_id.hyphenated().to_string(),
        stream: if stdout {
            pb::OutputStream::Stdout
        } else {
            pb::OutputStream::Stderr
        } as i32,
        offset,
        length: end - offset,
        data: data.to_string(),
    })
}

/// Bytes `c` takes in a JSON string.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// A chunk cut into messages that each fit a notification.
fn pieces(result_id: Uuid, stdout: bool, chunk: &pb::OutputChunk) -> Vec<OutputMessage> {
    let data = &chunk.data;
    let mut cuts = Vec::new();
    let (mut start, mut json) = (0, 0);
    for (i, c) in data.char_indices() {
        let n = json_len(c);
        if json + n > PIECE_JSON_BYTES {
            cuts.push((start, i));
            start = i;
            json = 0;
        }
        json += n;
    }
    cuts.push((start, data.len()));
    let last = cuts.len() - 1;
    cuts.into_iter()
        .enumerate()
        .map(|(part, (from, to))| OutputMessage::Chunk {
            result_id,
            stdout,
            offset: chunk.offset,
            length: chunk.length,
            data: data[from..to].to_string(),
            part: part as u32,
            more: part < last,
        })
        .collect()
}

/// `runs` said in as many `Watching` messages as notifications need.
fn watching_messages(reply_to: &str, runs: Vec<WatchedRun>) -> Vec<ControlMessage> {
    let room = bus::MAX_PAYLOAD_BYTES - 100 - reply_to.len();
    let mut messages = Vec::new();
    let mut batch = Vec::new();
    let mut used = 0;
    for run in runs {
        let n = serde_json::to_string(&run)
            .map(|s| s.len() + 1)
            .unwrap_or(room);
        if used + n > room && !batch.is_empty() {
            messages.push(ControlMessage::Watching {
                reply_to: reply_to.to_string(),
                runs: std::mem::take(&mut batch),
            });
            used = 0;
        }
        used += n;
        batch.push(run);
    }
    if !batch.is_empty() {
        messages.push(ControlMessage::Watching {
            reply_to: reply_to.to_string(),
            runs: batch,
        });
    }
    messages
}

/// `text`, which starts at `offset` of its stream, as chunks of whole characters.
fn text_chunks(result_id: Uuid, stdout: bool, mut offset: u64, text: &str) -> Vec<pb::OutputChunk> {
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(limits::MAX_OUTPUT_CHUNK_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, after) = rest.split_at(end);
        chunks.extend(unseen(
            0,
            result_id,
            stdout,
            offset,
            piece.len() as u64,
            piece,
        ));
        offset += piece.len() as u64;
        rest = after;
    }
    chunks
}

/// The end of a finished run's stored output (`text`, with `dropped` bytes cut from its
/// middle) that watchers did not get live, past `delivered`, at most what the agent holds of a
/// stream: the live stream can miss the last writes (the agent's stream ends after a result
/// with a large output, a chunk was dropped) and an agent adds a line when a run is cancelled.
fn stored_rest(
    delivered: u64,
    result_id: Uuid,
    stdout: bool,
    text: &str,
    dropped: u64,
) -> Vec<pb::OutputChunk> {
    // Replaced bytes (U+FFFD) make the stored text longer than the stream: no byte offset
    // can be trusted then, and the final row has the output anyway.
    let written = text.len() as u64 + dropped;
    if delivered >= written || text.contains('\u{FFFD}') {
        return Vec::new();
    }
    // With bytes cut, the stored text's second half is the stream's end.
    let stored_end = if dropped > 0 {
        text.len() / 2
    } else {
        text.len()
    };
    let wanted = ((written - delivered) as usize)
        .min(stored_end)
        .min(limits::LIVE_OUTPUT_HELD_BYTES);
    let mut start = text.len() - wanted;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text_chunks(
        result_id,
        stdout,
        written - (text.len() - start) as u64,
        &text[start..],
    )
}

/// The watcher of a run that had ended: its stored outputs, then its row.
fn finished_watcher(run: ExecutionRow, leave: Leave) -> Watcher {
    let queue = Arc::new(WatcherQueue::default());
    if let Some(outcome) = &run.outcome {
        for (stdout, text, dropped) in [
            (true, &outcome.stdout, outcome.stdout_dropped_bytes),
            (false, &outcome.stderr, outcome.stderr_dropped_bytes),
        ] {
            // With bytes cut from the middle, the stored text's second half starts that much
            // further on (its head and tail were kept half and half).
            let mut half = if dropped > 0 {
                text.len() / 2
            } else {
                text.len()
            };
            while !text.is_char_boundary(half) {
                half -= 1;
            }
            let (head, tail) = text.split_at(half);
            let chunks = text_chunks(run.result_id, stdout, 0, head)
                .into_iter()
                .chain(text_chunks(
                    run.result_id,
                    stdout,
                    (half as u64) + dropped,
                    tail,
                ));
            for chunk in chunks {
                queue.push_stored(TailEvent::Chunk(chunk));
            }
        }
    }
    queue.push_stored(TailEvent::Finished(Box::new(run)));
    Watcher {
        queue,
        leave: Some(leave),
        done: false,
    }
}

#[cfg(test)]
mod tests {
    use kanade_shared::wire::ExecStatus;

    use super::*;

    fn chunk(offset: u64, data: &str) -> pb::OutputChunk {
        pb::OutputChunk {
            result_id: Uuid::nil().to_string(),
            stream: pb::OutputStream::Stdout as i32,
            offset,
            length: data.len() as u64,
            data: data.to_string(),
        }
    }

    #[test]
    fn output_a_watcher_has_is_not_delivered_again() {
        let id = Uuid::nil();
        assert_eq!(unseen(10, id, true, 0, 10, "0123456789"), None);
        let rest = unseen(10, id, true, 5, 10, "56789abcde").unwrap();
        assert_eq!(
            (rest.offset, rest.length, rest.data.as_str()),
            (10, 5, "abcde")
        );
        // Cut inside a character: the cut moves past it.
        let rest = unseen(12, id, true, 10, 4, "aé!").unwrap();
        assert_eq!((rest.offset, rest.data.as_str()), (13, "!"));
        // Beyond what was delivered: a gap, passed on as it is.
        assert_eq!(unseen(10, id, true, 50, 2, "xy").unwrap().offset, 50);
        // Text that does not map byte for byte cannot be cut: dropped when it overlaps.
        assert_eq!(
            unseen(10, id, true, 5, 10, "\u{fffd}\u{fffd}\u{fffd}\u{fffd}"),
            None
        );
    }

    #[test]
    fn a_chunk_crosses_replicas_in_notifications_that_fit_and_is_put_back_together() {
        let id = Uuid::now_v7();
        for (data, length) in [
            ("line\n".repeat(6000), 30_000),
            ("\u{1}".repeat(limits::MAX_OUTPUT_CHUNK_BYTES), 32_768),
            ("é\"\\".repeat(5000), 20_000),
            // Binary output: the text (U+FFFD for each invalid byte) is longer than the bytes.
            ("\u{fffd}".repeat(10_000), 10_000),
        ] {
            let mut chunk = chunk(1000, &data);
            chunk.length = length;
            let pieces = pieces(id, true, &chunk);
            assert!(pieces.len() > 1);
            let mut slot = None;
            let mut whole = None;
            for (i, piece) in pieces.iter().enumerate() {
                let payload = serde_json::to_string(piece).unwrap();
                assert!(payload.len() <= bus::MAX_PAYLOAD_BYTES, "{}", payload.len());
                let OutputMessage::Chunk {
                    offset,
                    length,
                    data,
                    part,
                    more,
                    ..
                } = piece.clone()
                else {
                    panic!("{piece:?}")
                };
                assert_eq!((offset, length, part as usize), (1000, chunk.length, i));
                whole = assemble(&mut slot, (offset, length), data, (part, more));
                assert_eq!(whole.is_some(), i == pieces.len() - 1);
            }
            assert_eq!(whole.unwrap(), data);

            // A part lost on the way: the chunk is dropped, not shown with a hole.
            let mut slot = None;
            let mut shown = Vec::new();
            for piece in pieces
                .iter()
                .filter(|p| !matches!(p, OutputMessage::Chunk { part: 1, .. }))
            {
                let OutputMessage::Chunk {
                    offset,
                    length,
                    data,
                    part,
                    more,
                    ..
                } = piece.clone()
                else {
                    panic!()
                };
                shown.extend(assemble(&mut slot, (offset, length), data, (part, more)));
            }
            assert!(shown.is_empty());
        }
    }

    #[test]
    fn watched_runs_are_said_in_messages_that_fit() {
        let runs: Vec<WatchedRun> = (0..300)
            .map(|i| WatchedRun {
                pc_id: format!("{}{i}", "\u{1}".repeat(100)),
                result_id: Uuid::now_v7(),
            })
            .collect();
        let reply_to = format!("kanade_tail_{}", Uuid::new_v4().simple());
        let messages = watching_messages(&reply_to, runs.clone());
        assert!(messages.len() > 1);
        let mut said = Vec::new();
        for message in messages {
            assert!(serde_json::to_string(&message).unwrap().len() <= bus::MAX_PAYLOAD_BYTES);
            let ControlMessage::Watching { runs, .. } = message else {
                panic!()
            };
            said.extend(runs);
        }
        assert_eq!(said, runs);
    }

    #[test]
    fn the_stored_end_of_a_run_completes_what_watchers_missed() {
        let id = Uuid::nil();
        let text = "line 1\nline 2\nline 3\n";
        let rest = stored_rest(7, id, true, text, 0);
        assert_eq!(rest.len(), 1);
        assert_eq!(
            (rest[0].offset, rest[0].data.as_str()),
            (7, "line 2\nline 3\n")
        );
        assert!(stored_rest(text.len() as u64, id, true, text, 0).is_empty());
        // With bytes cut from the middle, only the stored end is the stream's end.
        let rest = stored_rest(0, id, true, "headtail", 100);
        assert_eq!((rest[0].offset, rest[0].data.as_str()), (104, "tail"));
    }

    fn finished_row(stdout: &str) -> ExecutionRow {
        ExecutionRow {
            result_id: Uuid::nil(),
            request_id: "r".into(),
            exec_id: "e".into(),
            pc_id: "pc".into(),
            manifest_id: "m".into(),
            version: String::new(),
            timeout_secs: None,
            state: crate::store::RunState::Finished(ExecStatus::Succeeded),
            outcome: Some(crate::store::RunOutcome {
                status: ExecStatus::Succeeded,
                exit_code: Some(0),
                stdout: stdout.into(),
                stderr: String::new(),
                stdout_dropped_bytes: 0,
                stderr_dropped_bytes: 0,
                finished_at: Utc::now(),
            }),
            started_at: Utc::now(),
            received_at: Utc::now(),
            trace_id: None,
            cancel: None,
        }
    }

    #[tokio::test]
    async fn a_watcher_that_fell_behind_gets_the_end_of_the_output_after_a_gap() {
        let output = "y".repeat(4 * WATCHER_BUFFER_BYTES);
        let behind = WatcherQueue::default();
        let caught_up = WatcherQueue::default();
        let piece = WATCHER_BUFFER_BYTES / 2;
        for start in (0..output.len()).step_by(piece) {
            let chunk = chunk(start as u64, &output[start..start + piece]);
            behind.push(TailEvent::Chunk(chunk.clone()));
            caught_up.push(TailEvent::Chunk(chunk));
            caught_up.next().await;
        }
        let row = finished_row(&output);
        behind.finish(&row);
        caught_up.finish(&row);

        // Spans of contiguous output, in the order received.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        loop {
            match behind.next().await {
                TailEvent::Chunk(c) => match spans.last_mut() {
                    Some((_, end)) if *end == c.offset => *end += c.length,
                    _ => spans.push((c.offset, c.offset + c.length)),
                },
                TailEvent::Finished(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let end = output.len() as u64;
        let held = limits::LIVE_OUTPUT_HELD_BYTES as u64;
        assert_eq!(
            spans,
            [(0, 2 * piece as u64), (end - held, end)],
            "what fit, then a gap, then the stored end"
        );
        assert!(
            matches!(caught_up.next().await, TailEvent::Finished(_)),
            "a watcher that has everything gets the row alone"
        );
    }

    #[tokio::test]
    async fn a_slow_watcher_loses_output_but_never_the_final_row() {
        let queue = WatcherQueue::default();
        let big = "x".repeat(WATCHER_BUFFER_BYTES / 2 + 1);
        assert!(queue.push(TailEvent::Chunk(chunk(0, &big))));
        assert!(
            !queue.push(TailEvent::Chunk(chunk(big.len() as u64, &big))),
            "over its bound"
        );
        assert!(queue.push(TailEvent::Notice {
            agent_connected: false,
            message: "x".into()
        }));
        assert!(matches!(queue.next().await, TailEvent::Chunk(c) if c.offset == 0));
        assert!(queue.push(TailEvent::Chunk(chunk(2 * big.len() as u64, &big))));
        assert!(matches!(queue.next().await, TailEvent::Notice { .. }));
        assert!(
            matches!(queue.next().await, TailEvent::Chunk(c) if c.offset == 2 * big.len() as u64)
        );
        // Full again: output is dropped, the final row is not, and nothing follows it.
        assert!(queue.push(TailEvent::Chunk(chunk(0, &big))));
        assert!(!queue.push(TailEvent::Chunk(chunk(0, &big))));
        assert!(queue.push(TailEvent::Finished(Box::new(finished_row("")))));
        assert!(!queue.push(TailEvent::Notice {
            agent_connected: true,
            message: "late".into()
        }));
    }
}
