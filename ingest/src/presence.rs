//! Fleet presence (SPEC §14): which endpoints hold a stream to some replica now, since when, and
//! what their agents last reported (`AgentStatus`), kept in the `endpoints` table.
//!
//! Every replica writes what it knows of its own streams — one opened, one reported, one closed —
//! never one statement per message: the events are merged per endpoint into [`Pending`] and
//! written in one batch every [`FLUSH_EVERY`]. Every `--presence-every` the replica also
//! refreshes `last_seen` of all its open streams (in the same batches), so an endpoint counts as
//! connected only while its row is marked connected AND was refreshed within
//! [`STALE_AFTER_INTERVALS`] intervals: a replica that died (SIGKILL, a lost node) leaves no
//! endpoint "connected" for longer than that, and nobody needs to clean up after it.
//!
//! An endpoint's row speaks of one stream (`stream_id`): an agent that reconnects elsewhere opens
//! a newer stream, which takes the row over, and the old stream's closing (noticed later by its
//! replica) no longer changes it. See [`crate::store::Store::write_presence`] for the rules.
//!
//! A batch with news (a stream opened or closed, an agent's figures moved) is announced like a commit,
//! so the console's endpoint pages follow. The task also computes the fleet's totals for every
//! replica's metrics.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chrono::{DateTime, SubsecRound, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    changes::Changes,
    metrics::Metrics,
    store::{AgentReport, PresenceWrite, ReadStore, Store},
};

/// Presence events are written at most this often (batched per endpoint meanwhile).
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// An endpoint whose row was not refreshed for this many presence intervals is not connected,
/// whatever the row says.
pub const STALE_AFTER_INTERVALS: u32 = 3;
/// Rows per presence statement.
const WRITE_CHUNK: usize = 1000;
/// An endpoint whose oldest waiting event is older than this is behind (backlogged).
pub const BACKLOG_AGE: Duration = Duration::from_secs(60);

/// When a row marked connected must have been refreshed since, to count as connected at `now`.
pub fn connected_after(now: DateTime<Utc>, every: Duration) -> DateTime<Utc> {
    let stale =
        chrono::Duration::from_std(every * STALE_AFTER_INTERVALS).unwrap_or(chrono::Duration::MAX);
    now.checked_sub_signed(stale)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One open stream, as presence knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub pc_id: String,
    /// Unique across replicas.
    pub stream_id: Uuid,
    pub connected_since: DateTime<Utc>,
    pub agent_version: String,
}

impl StreamInfo {
    /// A stream that opens now.
    pub fn opened(pc_id: &str, agent_version: &str) -> StreamInfo {
        StreamInfo {
            pc_id: pc_id.to_string(),
            stream_id: Uuid::new_v4(),
            connected_since: now(),
            agent_version: agent_version.to_string(),
        }
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The writes waiting for the next batch, one per endpoint.
#[derive(Debug, Default)]
struct Pending {
    writes: HashMap<String, PresenceWrite>,
    /// Something besides refreshes: a stream opened or closed, an agent's figures moved.
    news: bool,
    /// The figures each endpoint connected here last reported: a report that repeats them
    /// (an idle agent's, every `status_every`) is written, but is no news.
    figures: HashMap<String, Figures>,
}

/// What a report says that people watch for.
type Figures = (u64, u64, u32);

fn figures(report: &AgentReport) -> Figures {
    (
        report.outbox_depth,
        report.dead_letters,
        report.running_runs,
    )
}

/// Folds `later` into `earlier`, both about one endpoint: a newer stream takes over, a stream's
/// closing counts only for that stream, and the latest report stays.
fn merge(earlier: &mut PresenceWrite, later: PresenceWrite) {
    let same_stream = earlier.stream_id == later.stream_id;
    let takes_over = same_stream
        || !earlier.connected
        || (later.connected && later.connected_since >= earlier.connected_since);
    let report = match (earlier.report.take(), later.report.clone()) {
        (Some(a), Some(b)) => Some(if b.at >= a.at { b } else { a }),
        (a, b) => b.or(a),
    };
    if takes_over {
        let seen_at = if same_stream {
            earlier.seen_at.max(later.seen_at)
        } else {
            later.seen_at
        };
        *earlier = PresenceWrite { seen_at, ..later };
    }
    earlier.report = report;
}

/// A replica's presence writer: streams tell it what happens; it writes in batches.
#[derive(Debug, Clone)]
pub struct Presence {
    replica: Arc<str>,
    pending: Arc<Mutex<Pending>>,
}

impl Presence {
    pub fn new(replica: &str) -> Presence {
        Presence {
            replica: replica.into(),
            pending: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, stream: &StreamInfo, connected: bool, report: Option<AgentReport>, news: bool) {
        let write = PresenceWrite {
            pc_id: stream.pc_id.clone(),
            stream_id: stream.stream_id,
            replica: self.replica.to_string(),
            connected_since: stream.connected_since,
            agent_version: stream.agent_version.clone(),
            seen_at: now(),
            connected,
            report,
        };
        let mut pending = self.lock();
        pending.news |= news;
        match pending.writes.get_mut(&write.pc_id) {
            Some(earlier) => merge(earlier, write),
            None => {
                pending.writes.insert(write.pc_id.clone(), write);
            }
        }
    }

    /// A stream opened (or is the endpoint's stream again).
    pub fn open(&self, stream: &StreamInfo) {
        self.note(stream, true, None, true);
    }

    /// A stream is still open (the periodic refresh).
    fn still_open(&self, stream: &StreamInfo) {
        self.note(stream, true, None, false);
    }

    /// The agent on `stream` reported.
    pub fn reported(&self, stream: &StreamInfo, report: AgentReport) {
        let moved = self
            .lock()
            .figures
            .insert(stream.pc_id.clone(), figures(&report))
            != Some(figures(&report));
        self.note(stream, true, Some(report), moved);
    }

    /// A stream closed.
    pub fn closed(&self, stream: &StreamInfo) {
        self.lock().figures.remove(&stream.pc_id);
        self.note(stream, false, None, true);
    }

    /// Takes what waits, for one batch, and whether it holds news (beyond refreshes).
    fn take(&self) -> (Vec<PresenceWrite>, bool) {
        let mut pending = self.lock();
        let news = std::mem::take(&mut pending.news);
        (pending.writes.drain().map(|(_, w)| w).collect(), news)
    }

    /// Puts back writes that could not be written, under anything that came meanwhile.
    fn put_back(&self, writes: Vec<PresenceWrite>, news: bool) {
        let mut pending = self.lock();
        pending.news |= news;
        for mut write in writes {
            if let Some(later) = pending.writes.remove(&write.pc_id) {
                merge(&mut write, later);
            }
            pending.writes.insert(write.pc_id.clone(), write);
        }
    }
}

/// What the presence task needs.
pub struct PresenceTask {
    pub presence: Presence,
    pub store: Arc<dyn Store>,
    pub reads: Arc<dyn ReadStore>,
    /// The streams open on this replica now (the registry's view), for the refresh.
    pub open_streams: Box<dyn Fn() -> Vec<StreamInfo> + Send + Sync>,
    /// `--presence-every`.
    pub every: Duration,
    pub metrics: Arc<Metrics>,
    /// Told when a batch held news, so the console's endpoint pages follow.
    pub changes: Changes,
}

impl PresenceTask {
    /// Writes presence until `stop`, then once more (the streams closed by the shutdown).
    pub async fn run(self, stop: CancellationToken) {
        let flush_every = FLUSH_EVERY.min(self.every / STALE_AFTER_INTERVALS);
        let mut flush = tokio::time::interval(flush_every);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(self.every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = flush.tick() => self.flush().await,
                _ = refresh.tick() => {
                    for stream in (self.open_streams)() {
                        self.presence.still_open(&stream);
                    }
                    self.count_fleet().await;
                }
                _ = stop.cancelled() => break,
            }
        }
        self.flush().await;
    }

    async fn flush(&self) {
        let (writes, news) = self.presence.take();
        if writes.is_empty() {
            return;
        }
        let stale_before = connected_after(now(), self.every);
        for (i, chunk) in writes.chunks(WRITE_CHUNK).enumerate() {
            match self.store.write_presence(chunk, stale_before).await {
                Ok(()) => {
                    self.metrics.presence_statements.inc();
                    self.metrics.presence_rows.inc_by(chunk.len() as u64);
                }
                Err(err) => {
                    tracing::warn!(error = %err, endpoints = writes.len(), "writing presence failed; will try again");
                    self.presence
                        .put_back(writes[i * WRITE_CHUNK..].to_vec(), news);
                    return;
                }
            }
        }
        if news {
            self.changes.committed();
        }
    }

    async fn count_fleet(&self) {
        match self
            .reads
            .fleet_totals(connected_after(now(), self.every))
            .await
        {
            Ok(totals) => self.metrics.fleet(&totals),
            Err(err) => tracing::debug!(error = %err, "counting the fleet failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(stream: u128, since: i64, connected: bool, report_at: Option<i64>) -> PresenceWrite {
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        PresenceWrite {
            pc_id: "pc-1".into(),
            stream_id: Uuid::from_u128(stream),
            replica: "r".into(),
            connected_since: at(since),
            agent_version: "1".into(),
            seen_at: at(since + 1),
            connected,
            report: report_at.map(|s| AgentReport {
                at: at(s),
                outbox_depth: s as u64,
                outbox_bytes: 0,
                oldest_pending_at: None,
                dead_letters: 0,
                running_runs: 0,
                hostname: "h".into(),
                os: "linux".into(),
            }),
        }
    }

    #[test]
    fn a_newer_stream_takes_over_and_an_older_ones_closing_does_not_undo_it() {
        let mut w = write(1, 10, true, Some(11));
        merge(&mut w, write(2, 20, true, None));
        assert_eq!((w.stream_id.as_u128(), w.connected), (2, true));
        assert_eq!(
            w.report.as_ref().unwrap().outbox_depth,
            11,
            "the report stays"
        );
        merge(&mut w, write(1, 10, false, None));
        assert_eq!((w.stream_id.as_u128(), w.connected), (2, true));
        merge(&mut w, write(2, 20, false, Some(25)));
        assert_eq!((w.stream_id.as_u128(), w.connected), (2, false));
        assert_eq!(w.report.as_ref().unwrap().outbox_depth, 25);
    }

    #[test]
    fn the_latest_report_stays_whatever_order_writes_are_folded_in() {
        let mut w = write(1, 10, true, Some(30));
        merge(&mut w, write(1, 10, true, Some(20)));
        assert_eq!(w.report.unwrap().outbox_depth, 30);
    }

    #[test]
    fn writes_put_back_keep_what_came_meanwhile() {
        let presence = Presence::new("r");
        let stream = StreamInfo {
            pc_id: "pc-1".into(),
            stream_id: Uuid::from_u128(1),
            connected_since: Utc::now(),
            agent_version: "1".into(),
        };
        presence.open(&stream);
        let (failed, news) = presence.take();
        assert!(news);
        presence.still_open(&stream);
        assert!(!presence.take().1, "a refresh is no news");
        let report = AgentReport {
            at: Utc::now(),
            outbox_depth: 3,
            outbox_bytes: 300,
            oldest_pending_at: None,
            dead_letters: 0,
            running_runs: 1,
            hostname: "h".into(),
            os: "linux".into(),
        };
        presence.reported(&stream, report.clone());
        assert!(presence.take().1, "a first report is news");
        presence.reported(&stream, report.clone());
        assert!(!presence.take().1, "the same figures again are not");
        presence.closed(&stream);
        presence.put_back(failed, news);
        let (again, news) = presence.take();
        assert_eq!(again.len(), 1);
        assert!(
            !again[0].connected,
            "the closing came after the failed write"
        );
        assert!(news);
    }
}
