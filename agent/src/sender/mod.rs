//! The sender: one bidirectional stream to ingest carrying the outbox, in order.
//!
//! Rooms: [`connect`] reaches ingest and does the handshake; [`window`] bounds what is on the
//! wire; this module runs sessions (reconnecting between them) and dispatches what ingest sends:
//! each message becomes one [`Inbound`] value with one handler, so a new message from ingest is
//! one variant and one arm.
//!
//! `Hello` first, then the `Welcome` limits are honoured: at most `window` events (and
//! `window_bytes` bytes) are unacknowledged at once. An Ack deletes events from the outbox; a
//! Reject dead-letters its event. Any stream error reconnects over a fresh connection with
//! exponential backoff and full jitter, and everything unacknowledged is sent again; ingest
//! ignores duplicates. A stream the server ended cleanly (drain, stream age) reconnects at once.
//! HTTP/2 keepalive notices a dead connection within `keepalive + keepalive_timeout`. The sender
//! sleeps until an event is enqueued (in this process, or another one through the wake socket).
//!
//! Live output ([`crate::live`]) shares the stream but nothing else: ingest's `Tail` is passed
//! to the run, the run's chunks are put on the stream without waiting (a full queue drops one:
//! a gap, never a delayed ack), and when a session ends every run it had asked to send stops
//! (ingest asks again on the next stream if someone still watches).

mod connect;
mod window;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use kanade_shared::{backoff::Backoff, pb};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

pub use connect::with_causes;
use window::Window;

use crate::{
    config::{ClientTls, Secret},
    control::{self, RunMessage},
    outbox::{Outbox, Pending},
};

/// What the sender delivers: the outbox in the agent; an in-memory queue in the benchmark.
pub trait Queue: Send + Sync + 'static {
    /// Up to `limit` events after `after_seq`, in order.
    fn pending(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<Pending>>> + Send;
    /// Forgets acknowledged events.
    fn ack(&self, seqs: &[u64]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Sets aside an event ingest will never accept.
    fn dead_letter(
        &self,
        seq: u64,
        reason: &str,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Records the connection state for operators.
    fn set_connection(&self, state: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Notified when events are enqueued.
    fn wake(&self) -> &tokio::sync::Notify;
    /// What the agent reports about itself (`AgentStatus`); `None`: nothing to report.
    fn report(&self) -> impl Future<Output = anyhow::Result<Option<Report>>> + Send {
        async { Ok(None) }
    }
    /// Passes what ingest says of the run `result_id` (a cancel, a tail) to it if it runs
    /// here; false when it does not.
    fn tell_run(&self, _result_id: &uuid::Uuid, _message: &RunMessage) -> bool {
        false
    }
    /// The live output runs send while ingest watches them; `None`: no run here sends any.
    fn follow_output(&self) -> Option<mpsc::Receiver<pb::OutputChunk>> {
        None
    }
}

/// The figures of an `AgentStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    pub oldest_pending_at: Option<chrono::DateTime<chrono::Utc>>,
    pub dead_letters: u64,
    pub running_runs: u32,
}

impl Report {
    /// Whether the backlog moved enough since `before` to be told at once, not at the next
    /// `status_every`: by half of what it was, and by at least [`BACKLOG_CHANGE`] events.
    fn backlog_moved(&self, before: &Report) -> bool {
        let moved = self.outbox_depth.abs_diff(before.outbox_depth);
        moved >= BACKLOG_CHANGE.max(before.outbox_depth / 2)
    }
}

/// The smallest change of the backlog that is told at once.
const BACKLOG_CHANGE: u64 = 100;
/// The backlog is looked at, for [`Report::backlog_moved`], at most this often, and only while
/// something happens (acks, new events): an idle agent stays idle.
const BACKLOG_CHECK_EVERY: Duration = Duration::from_secs(5);

impl<Q: Queue> Queue for std::sync::Arc<Q> {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        Q::pending(self, after_seq, limit).await
    }
    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        Q::ack(self, seqs).await
    }
    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        Q::dead_letter(self, seq, reason).await
    }
    async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        Q::set_connection(self, state).await
    }
    fn wake(&self) -> &tokio::sync::Notify {
        Q::wake(self)
    }
    async fn report(&self) -> anyhow::Result<Option<Report>> {
        Q::report(self).await
    }
    fn tell_run(&self, result_id: &uuid::Uuid, message: &RunMessage) -> bool {
        Q::tell_run(self, result_id, message)
    }
    fn follow_output(&self) -> Option<mpsc::Receiver<pb::OutputChunk>> {
        Q::follow_output(self)
    }
}

impl Queue for Outbox {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        Ok(Outbox::pending(self, after_seq, limit).await?)
    }
    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        Ok(Outbox::ack(self, seqs).await?)
    }
    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        Ok(Outbox::dead_letter(self, seq, reason).await?)
    }
    async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        Ok(Outbox::set_connection(self, state).await?)
    }
    fn wake(&self) -> &tokio::sync::Notify {
        &self.wake
    }
    async fn report(&self) -> anyhow::Result<Option<Report>> {
        let status = self.status().await?;
        Ok(Some(Report {
            outbox_depth: status.pending_events,
            outbox_bytes: status.pending_bytes,
            oldest_pending_at: status.oldest_pending,
            dead_letters: status.dead_letters,
            running_runs: u32::try_from(status.running_runs).unwrap_or(u32::MAX),
        }))
    }
    fn tell_run(&self, result_id: &uuid::Uuid, message: &RunMessage) -> bool {
        control::tell_run(self.data_dir(), result_id, message)
    }
    fn follow_output(&self) -> Option<mpsc::Receiver<pb::OutputChunk>> {
        match crate::live::listen_for_output(self.data_dir()) {
            Ok(chunks) => Some(chunks),
            Err(err) => {
                tracing::warn!(path = %self.data_dir().output_socket().display(), error = %err,
                    "cannot listen for live output: runs here cannot be followed live");
                None
            }
        }
    }
}

/// How the sender connects and paces itself.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub ingest: String,
    pub pc_id: String,
    /// TLS towards an `https://` ingest.
    pub tls: Option<ClientTls>,
    /// Sent as `authorization: Bearer …` when set.
    pub token: Option<Secret>,
    pub window: u32,
    pub window_bytes: u64,
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
    pub reconnect: Backoff,
    /// How often the agent's status is reported (when ingest accepts it).
    pub status_every: Duration,
}

/// Places of the stream's outbound queue live output never takes: events and status reports
/// always find room.
const OUTBOUND_KEPT_FOR_EVENTS: usize = 16;

/// How long a stopping agent waits for ingest to take its last status and answer what it sent
/// (see `Session::close`).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Refusals at the transport level (e.g. over ingest's message size limit) of the same event
/// after which it is dead-lettered.
const TRANSPORT_REFUSALS_BEFORE_DEAD_LETTER: u32 = 3;

/// How a stream session ended.
enum SessionEnd {
    /// The server ended the stream cleanly: reconnect at once.
    Clean,
    /// Something failed; `progressed` says whether any ack arrived first.
    Failed {
        error: String,
        progressed: bool,
    },
    /// The queue itself is broken (a damaged outbox): reconnecting cannot help.
    QueueBroken(anyhow::Error),
    Shutdown,
}

/// An error from the queue, `doing` something: a damaged outbox ends the sender, anything else
/// ends the session (and is retried).
fn queue_failure(doing: &str, err: anyhow::Error, progressed: bool) -> SessionEnd {
    if crate::outbox::OutboxError::is_damage_in(&err) {
        SessionEnd::QueueBroken(err)
    } else {
        SessionEnd::Failed {
            error: format!("{doing}: {err:#}"),
            progressed,
        }
    }
}

/// Runs until `shutdown`, delivering the outbox. Ends early, with the error, only when the
/// queue is broken (a damaged outbox): every other failure is retried.
pub async fn run<Q: Queue>(
    outbox: Q,
    config: SenderConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    let mut refusals: HashMap<u64, u32> = HashMap::new();
    let mut outputs = outbox.follow_output();
    loop {
        let span = tracing::info_span!("ingest.stream", ingest = %config.ingest, attempt);
        let end = session(&outbox, &config, &shutdown, &mut refusals, &mut outputs)
            .instrument(span)
            .await;
        let delay = match end {
            SessionEnd::Shutdown => {
                let _ = outbox
                    .set_connection("not connected: the sender stopped")
                    .await;
                return Ok(());
            }
            SessionEnd::QueueBroken(err) => {
                // Whoever runs the sender reports it (the daemon, `exec --wait`).
                tracing::debug!(error = %format!("{err:#}"), "the outbox cannot be read: the sender stops");
                return Err(err);
            }
            SessionEnd::Clean => {
                attempt = 0;
                tracing::info!("ingest ended the stream cleanly; reconnecting");
                Duration::ZERO
            }
            SessionEnd::Failed { error, progressed } => {
                if progressed {
                    attempt = 0;
                }
                let delay = config.reconnect.next_delay(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "stream to ingest failed");
                let _ = outbox
                    .set_connection(&format!("disconnected from {}: {error}", config.ingest))
                    .await;
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// What ingest said on the stream, as the session handles it.
enum Inbound {
    /// These events are committed: forget them.
    Ack(Vec<u64>),
    /// This event will never be accepted: dead-letter it.
    Reject { seq: u64, reason: String },
    /// An operator cancelled this run: end it, if it runs here.
    Cancel(pb::Cancel),
    /// Someone watches this run's output, or nobody does any more.
    Tail(pb::Tail),
    /// Nothing for the session (a repeated Welcome, an empty message, a message this agent does
    /// not know yet).
    Nothing,
    /// The server ended the stream cleanly.
    Ended,
    /// The stream failed.
    Failed(Status),
}

impl Inbound {
    fn from_message(message: Result<Option<pb::IngestMessage>, Status>) -> Inbound {
        use pb::ingest_message::Msg;
        match message {
            Ok(Some(pb::IngestMessage { msg: Some(msg) })) => match msg {
                Msg::Ack(ack) => Inbound::Ack(ack.seqs),
                Msg::Reject(r) => Inbound::Reject {
                    seq: r.seq,
                    reason: r.reason,
                },
                Msg::Cancel(cancel) => Inbound::Cancel(cancel),
                Msg::Tail(tail) => Inbound::Tail(tail),
                Msg::Welcome(_) => Inbound::Nothing,
            },
            Ok(Some(pb::IngestMessage { msg: None })) => Inbound::Nothing,
            Ok(None) => Inbound::Ended,
            Err(status) => Inbound::Failed(status),
        }
    }
}

/// One stream session: from a fresh connection to its end.
struct Session<'a, Q: Queue> {
    outbox: &'a Q,
    outbound: mpsc::Sender<pb::AgentMessage>,
    window: Window,
    /// Transport-level refusals per seq, kept across sessions.
    refusals: &'a mut HashMap<u64, u32>,
    /// Whether any ack arrived (a session that made progress resets the reconnect backoff).
    progressed: bool,
    /// Reports the agent's status, when ingest accepts it.
    status: Option<StatusReporter>,
    /// Runs told to send their output on this session: told to stop when it ends.
    tailing: HashSet<uuid::Uuid>,
}

impl<Q: Queue> Drop for Session<'_, Q> {
    fn drop(&mut self) {
        for result_id in self.tailing.drain() {
            self.outbox
                .tell_run(&result_id, &RunMessage::Tail { watch: false });
        }
    }
}

/// When and what a session reports about the agent.
struct StatusReporter {
    /// The endpoint's host name and operating system, said with every report.
    host: (String, String),
    /// What was last reported.
    last: Option<Report>,
    /// When the backlog was last looked at.
    checked: tokio::time::Instant,
}

async fn session<Q: Queue>(
    outbox: &Q,
    config: &SenderConfig,
    shutdown: &CancellationToken,
    refusals: &mut HashMap<u64, u32>,
    outputs: &mut Option<mpsc::Receiver<pb::OutputChunk>>,
) -> SessionEnd {
    let failed = |error: String| SessionEnd::Failed {
        error,
        progressed: false,
    };
    let opened = async {
        let mut client = connect::connect(config).await?;
        connect::handshake(&mut client, config).await
    };
    let stream = tokio::select! {
        opened = opened => match opened {
            Ok(stream) => stream,
            Err(error) => return failed(error),
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    tracing::info!(ingest = %config.ingest, window = stream.window_events,
        window_bytes = stream.window_bytes, "connected to ingest");
    let _ = outbox
        .set_connection(&format!("connected to {}", config.ingest))
        .await;
    let mut inbound = stream.inbound;
    let mut session = Session {
        outbox,
        outbound: stream.outbound,
        window: Window::new(stream.window_events, stream.window_bytes),
        refusals,
        progressed: false,
        status: stream.accepts_agent_status.then(|| StatusReporter {
            host: host_and_os(),
            last: None,
            checked: tokio::time::Instant::now(),
        }),
        tailing: HashSet::new(),
    };
    // Right after Welcome, then every status_every (the first tick is now).
    let mut status_tick = tokio::time::interval(config.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Output the runs sent before their events were enqueued goes first: a run sends its
        // last output before it records its result.
        while let Some(chunk) = outputs.as_mut().and_then(|o| o.try_recv().ok()) {
            session.forward_output(chunk);
        }
        if let Err(end) = session.fill().await {
            return end;
        }
        let next = tokio::select! {
            m = inbound.message() => Inbound::from_message(m),
            _ = outbox.wake().notified() => {
                session.report_if_backlog_moved().await;
                continue;
            }
            _ = status_tick.tick(), if session.status.is_some() => {
                session.report().await;
                continue;
            }
            Some(chunk) = next_chunk(outputs) => {
                session.forward_output(chunk);
                continue;
            }
            _ = shutdown.cancelled() => {
                session.close(&mut inbound).await;
                return SessionEnd::Shutdown;
            }
        };
        let handled = match next {
            Inbound::Ack(seqs) => session.on_ack(seqs).await,
            Inbound::Reject { seq, reason } => session.on_reject(seq, reason).await,
            Inbound::Cancel(cancel) => {
                session.on_cancel(cancel);
                Ok(())
            }
            Inbound::Tail(tail) => {
                session.on_tail(tail);
                Ok(())
            }
            Inbound::Nothing => Ok(()),
            Inbound::Ended => return SessionEnd::Clean,
            Inbound::Failed(status) => return session.on_failure(status).await,
        };
        if let Err(end) = handled {
            return end;
        }
    }
}

impl<Q: Queue> Session<'_, Q> {
    fn failed(&self, error: String) -> SessionEnd {
        SessionEnd::Failed {
            error,
            progressed: self.progressed,
        }
    }

    /// Sends from the outbox until the window is full or the outbox has nothing more.
    async fn fill(&mut self) -> Result<(), SessionEnd> {
        loop {
            let room = self.window.room();
            if room == 0 {
                return Ok(());
            }
            let batch = self
                .outbox
                .pending(self.window.cursor(), room)
                .await
                .map_err(|e| queue_failure("reading the outbox", e, self.progressed))?;
            if batch.is_empty() {
                return Ok(());
            }
            for p in batch {
                // The first event that does not fit waits for acks; it is read again then.
                if !self.window.admits(p.bytes) {
                    return Ok(());
                }
                self.window.sent(p.seq, p.bytes);
                let msg = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Event(p.event)),
                };
                if self.outbound.send(msg).await.is_err() {
                    // The transport is gone; the stream's own error ends the session.
                    return Ok(());
                }
            }
        }
    }

    async fn on_ack(&mut self, seqs: Vec<u64>) -> Result<(), SessionEnd> {
        self.outbox
            .ack(&seqs)
            .await
            .map_err(|e| queue_failure("recording acks", e, self.progressed))?;
        for seq in seqs {
            self.window.answered(seq);
            self.refusals.remove(&seq);
        }
        self.progressed = true;
        self.report_if_backlog_moved().await;
        Ok(())
    }

    /// Passes an operator's cancel to its run, wherever on this data dir it runs.
    fn on_cancel(&self, cancel: pb::Cancel) {
        let Ok(result_id) = uuid::Uuid::try_parse(&cancel.result_id) else {
            tracing::warn!(result_id = %cancel.result_id, "ignored a cancel for something that is not a run id");
            return;
        };
        let message = RunMessage::Cancel {
            reason: cancel.reason,
            by: cancel.requested_by,
        };
        if self.outbox.tell_run(&result_id, &message) {
            tracing::info!(%result_id, "an operator cancelled a run: told the run");
        } else {
            tracing::info!(%result_id, "ignored a cancel: that run is not running here");
        }
    }

    /// Passes ingest's wish to follow a run's output (or to stop) to the run.
    fn on_tail(&mut self, tail: pb::Tail) {
        let Ok(result_id) = uuid::Uuid::try_parse(&tail.result_id) else {
            tracing::debug!(result_id = %tail.result_id, "ignored a tail of something that is not a run id");
            return;
        };
        let told = self
            .outbox
            .tell_run(&result_id, &RunMessage::Tail { watch: tail.watch });
        match (told, tail.watch) {
            (true, true) => {
                tracing::debug!(%result_id, "someone watches a run: its output follows");
                self.tailing.insert(result_id);
            }
            (_, false) => {
                self.tailing.remove(&result_id);
            }
            (false, true) => {
                tracing::debug!(%result_id, "ignored a tail: that run is not running here")
            }
        }
    }

    /// Puts a run's output on the stream, never waiting and never taking the room events need:
    /// when the stream's queue is nearly full the chunk is dropped (its watchers see a gap)
    /// rather than holding up events, status reports and acks.
    fn forward_output(&self, chunk: pb::OutputChunk) {
        if self.outbound.capacity() <= OUTBOUND_KEPT_FOR_EVENTS {
            tracing::debug!("the stream to ingest is busy: a live output chunk dropped");
            return;
        }
        let message = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Output(chunk)),
        };
        let _ = self.outbound.try_send(message);
    }

    /// Sends the agent's status to ingest (when it accepts it); a failure to read it is logged
    /// and waits for the next time.
    async fn report(&mut self) {
        let Some(status) = &mut self.status else {
            return;
        };
        status.checked = tokio::time::Instant::now();
        let report = match self.outbox.report().await {
            Ok(Some(report)) => report,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "reading the agent's status failed");
                return;
            }
        };
        status.last = Some(report);
        let (hostname, os) = status.host.clone();
        let message = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Status(pb::AgentStatus {
                outbox_depth: report.outbox_depth,
                outbox_bytes: report.outbox_bytes,
                oldest_pending_at: report
                    .oldest_pending_at
                    .map(kanade_shared::wire::timestamp_to_proto),
                dead_letters: report.dead_letters,
                running_runs: report.running_runs,
                hostname,
                os,
            })),
        };
        // A closed transport ends the session through the stream's own error.
        let _ = self.outbound.send(message).await;
    }

    /// Ends the session as the agent stops: ingest's answers to what was sent are taken first
    /// (acks of what it committed meanwhile), then a last status report (the endpoint's row then
    /// shows what the agent leaves behind, not what it had when it connected), then this side of
    /// the stream closes and ingest ends it; for at most [`CLOSE_WAIT`] in all.
    async fn close(&mut self, inbound: &mut tonic::Streaming<pb::IngestMessage>) {
        let closing = async {
            while self.window.oldest().is_some() {
                if !self.take_answer(inbound).await {
                    return;
                }
            }
            self.report().await;
            // Dropping the only sender closes the request stream: ingest drains and ends it.
            let (closed, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut self.outbound, closed));
            while self.take_answer(inbound).await {}
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
    }

    /// Takes one message from ingest while closing: false once the stream is over.
    async fn take_answer(&mut self, inbound: &mut tonic::Streaming<pb::IngestMessage>) -> bool {
        let handled = match Inbound::from_message(inbound.message().await) {
            Inbound::Ack(seqs) => self.on_ack(seqs).await,
            Inbound::Reject { seq, reason } => self.on_reject(seq, reason).await,
            Inbound::Ended | Inbound::Failed(_) => return false,
            // A cancel is sent again after the next Welcome; nobody tails a stopping agent.
            Inbound::Cancel(_) | Inbound::Tail(_) | Inbound::Nothing => Ok(()),
        };
        handled.is_ok()
    }

    /// Reports at once when the backlog moved a lot since the last report (looked at most every
    /// [`BACKLOG_CHECK_EVERY`]).
    async fn report_if_backlog_moved(&mut self) {
        let Some(status) = &self.status else {
            return;
        };
        if status.checked.elapsed() < BACKLOG_CHECK_EVERY {
            return;
        }
        let last = status.last;
        let moved = match self.outbox.report().await {
            Ok(Some(now)) => last.is_none_or(|last| now.backlog_moved(&last)),
            _ => false,
        };
        if let Some(status) = &mut self.status {
            status.checked = tokio::time::Instant::now();
        }
        if moved {
            self.report().await;
        }
    }

    async fn on_reject(&mut self, seq: u64, reason: String) -> Result<(), SessionEnd> {
        tracing::warn!(seq, %reason, "ingest rejected an event; dead-lettered");
        self.outbox
            .dead_letter(seq, &reason)
            .await
            .map_err(|e| queue_failure("dead-lettering", e, self.progressed))?;
        self.window.answered(seq);
        Ok(())
    }

    /// The stream failed. A refusal at the transport level (the event is over a size limit)
    /// counts against the oldest unanswered event, which is dead-lettered after a few.
    async fn on_failure(&mut self, status: Status) -> SessionEnd {
        if matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
            && let Some(seq) = self.window.oldest()
        {
            let n = self.refusals.entry(seq).or_insert(0);
            *n += 1;
            if *n >= TRANSPORT_REFUSALS_BEFORE_DEAD_LETTER {
                let reason = format!(
                    "refused by ingest {n} times in a row at the transport level: {}",
                    status.message()
                );
                tracing::error!(seq, %reason, "dead-lettering an event ingest will not take");
                let _ = self.outbox.dead_letter(seq, &reason).await;
                self.refusals.remove(&seq);
            }
        }
        self.failed(format!("{}: {}", status.code(), status.message()))
    }
}

/// The next chunk of live output; never, when nothing here sends any.
async fn next_chunk(
    outputs: &mut Option<mpsc::Receiver<pb::OutputChunk>>,
) -> Option<pb::OutputChunk> {
    match outputs {
        Some(chunks) => chunks.recv().await,
        None => std::future::pending().await,
    }
}

/// The endpoint's host name and operating system, as reports say them
/// (`linux x86_64 (Debian GNU/Linux 12 (bookworm))`).
fn host_and_os() -> (String, String) {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let mut os = format!("{} {}", std::env::consts::OS, std::env::consts::ARCH);
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    if let Some(pretty) = pretty.filter(|p| !p.is_empty()) {
        os.push_str(&format!(" ({pretty})"));
    }
    (hostname, os)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_told_at_once_when_it_moved_by_half_and_by_a_hundred_events() {
        let depth = |outbox_depth| Report {
            outbox_depth,
            ..Report::default()
        };
        assert!(
            !depth(99).backlog_moved(&depth(0)),
            "a few events are normal traffic"
        );
        assert!(depth(100).backlog_moved(&depth(0)));
        assert!(depth(400).backlog_moved(&depth(1000)));
        assert!(!depth(600).backlog_moved(&depth(1000)));
        assert!(depth(0).backlog_moved(&depth(150)), "drained");
        assert!(!depth(1100).backlog_moved(&depth(1000)));
    }
}
