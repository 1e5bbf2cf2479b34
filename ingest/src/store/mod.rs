//! Where runs are kept: one `execution_results` row per run, behind one small trait with two
//! implementations — PostgreSQL for production, SQLite as the embedded default.
//!
//! Both implement the same coalescing rules (SPEC §3) and answer the same queries byte for byte;
//! `tests/conformance.rs` runs one suite against both. Rules that do not depend on SQL (how the
//! events of one run merge inside a batch, NUL replacement, the list query's shape) live here,
//! once.

mod postgres;
mod sql;
mod sqlite;

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use kanade_shared::wire::{EventBody, ExecStatus};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Runs without a timeout count as lost this long after ingest first saw them.
pub const LOST_AFTER_WITHOUT_TIMEOUT: Duration = Duration::hours(24);

/// The store's view of one run's events, merged: what one upsert writes. (`Default` is only a
/// placeholder left behind when a write is moved out of its submission.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunWrite {
    pub result_id: Uuid,
    pub pc_id: String,
    pub request_id: String,
    pub exec_id: String,
    pub manifest_id: String,
    pub version: String,
    pub timeout_secs: Option<u32>,
    pub started_at: DateTime<Utc>,
    /// Present once a result is known; the first one wins.
    pub outcome: Option<RunOutcome>,
    /// The run's W3C trace id (32 hex digits), when its events carried a trace context; the
    /// first one known stays.
    pub trace_id: Option<String>,
}

/// The result part of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExecStatus,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_dropped_bytes: u64,
    pub stderr_dropped_bytes: u64,
    pub finished_at: DateTime<Utc>,
}

/// PostgreSQL `text` cannot hold U+0000, so no stored string ever does (SPEC §3). Moves the
/// string through untouched (no copy) when it holds none.
pub(crate) fn storable(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary; true when something was cut.
pub(crate) fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

impl RunWrite {
    /// The write one validated event asks for; takes the event's strings over (outputs can be
    /// megabytes: they are moved, not copied). `result_id` was validated as a UUID by the wire
    /// conversion; `None` means the caller skipped that conversion.
    pub fn from_event(body: EventBody) -> Option<RunWrite> {
        let result_id = Uuid::try_parse(body.result_id()).ok()?;
        Some(match body {
            EventBody::Started(s) => RunWrite {
                result_id,
                pc_id: storable(s.pc_id),
                request_id: storable(s.request_id),
                exec_id: storable(s.exec_id),
                manifest_id: storable(s.manifest_id),
                version: storable(s.version),
                timeout_secs: s.timeout_secs,
                started_at: s.started_at,
                outcome: None,
                trace_id: None,
            },
            EventBody::Result(r) => RunWrite {
                result_id,
                pc_id: storable(r.pc_id),
                request_id: storable(r.request_id),
                exec_id: storable(r.exec_id),
                manifest_id: storable(r.manifest_id),
                version: storable(r.version),
                timeout_secs: None,
                started_at: r.started_at,
                outcome: Some(RunOutcome {
                    status: r.status,
                    exit_code: r.exit_code,
                    stdout: storable(r.stdout),
                    stderr: storable(r.stderr),
                    stdout_dropped_bytes: r.stdout_dropped_bytes,
                    stderr_dropped_bytes: r.stderr_dropped_bytes,
                    finished_at: r.finished_at,
                }),
                trace_id: None,
            },
        })
    }

    /// Takes the trace id from an event's W3C trace context (`traceparent`
    /// `00-TRACEID-SPANID-FLAGS`), when it holds a valid one.
    pub fn with_trace_context<'a>(
        mut self,
        mut context: impl Iterator<Item = (&'a String, &'a String)>,
    ) -> RunWrite {
        self.trace_id = context
            .find(|(key, _)| key.as_str() == "traceparent")
            .and_then(|(_, value)| value.split('-').nth(1))
            .filter(|id| {
                id.len() == 32
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    && id.bytes().any(|b| b != b'0')
            })
            .map(str::to_string);
        self
    }

    /// Folds a later write for the same run and endpoint into this one, with exactly the rules
    /// the stores' upserts apply to a stored row: columns already set stay, missing ones are
    /// filled (`""` counts as missing: proto3 cannot tell an unset string from an empty one),
    /// and the first result wins.
    pub fn absorb(&mut self, later: RunWrite) {
        debug_assert_eq!(
            (self.result_id, &self.pc_id),
            (later.result_id, &later.pc_id)
        );
        if self.version.is_empty() {
            self.version = later.version;
        }
        if self.timeout_secs.is_none() {
            self.timeout_secs = later.timeout_secs;
        }
        if self.trace_id.is_none() {
            self.trace_id = later.trace_id;
        }
        if self.outcome.is_none() {
            self.outcome = later.outcome;
        }
    }

    /// Bytes this write carries, for batch sizing.
    pub fn approx_bytes(&self) -> usize {
        let outputs = self
            .outcome
            .as_ref()
            .map_or(0, |o| o.stdout.len() + o.stderr.len());
        256 + self.pc_id.len()
            + self.request_id.len()
            + self.exec_id.len()
            + self.manifest_id.len()
            + self.version.len()
            + outputs
    }
}

/// What a run is doing, as the Activity view shows it. Computed when a row is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Running,
    Finished(ExecStatus),
    Lost,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Lost => "lost",
            RunState::Finished(status) => status.as_str(),
        }
    }

    pub fn from_name(name: &str) -> Option<RunState> {
        match name {
            "running" => Some(RunState::Running),
            "lost" => Some(RunState::Lost),
            other => ExecStatus::from_name(other).map(RunState::Finished),
        }
    }
}

/// One stored run with its computed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRow {
    pub result_id: Uuid,
    pub request_id: String,
    pub exec_id: String,
    pub pc_id: String,
    pub manifest_id: String,
    pub version: String,
    pub timeout_secs: Option<u32>,
    pub state: RunState,
    pub outcome: Option<RunOutcome>,
    pub started_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// The run's W3C trace id, when its events carried one.
    pub trace_id: Option<String>,
    /// An operator's request to cancel the run, when one was made.
    pub cancel: Option<CancelRequest>,
}

/// An operator's request to cancel a run (SPEC §14), as kept on the run's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub at: DateTime<Utc>,
    /// Why, in the operator's words.
    pub reason: String,
    /// Who asked: the operator token's name, or how the caller was identified.
    pub by: String,
}

/// What became of a cancel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// No run has this `result_id`.
    NotFound,
    /// The run has a result already; nothing was written.
    Finished(ExecutionRow),
    /// The run carries a cancel request: this one (`first`), or an earlier one still waiting for
    /// the agent (left as it was).
    Requested { run: ExecutionRow, first: bool },
}

/// A cancel still to deliver: its run has no result yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCancel {
    pub pc_id: String,
    pub result_id: Uuid,
    pub reason: String,
    pub by: String,
}

/// What an agent last reported about itself (`AgentStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    /// When ingest received it.
    pub at: DateTime<Utc>,
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    pub oldest_pending_at: Option<DateTime<Utc>>,
    pub dead_letters: u64,
    pub running_runs: u32,
    pub hostname: String,
    pub os: String,
}

/// One endpoint's stream, as one replica knows it now: what a presence write says. Written for
/// a stream that opened, is still open (the replica's refresh), reported (`report`), or closed
/// (`connected: false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceWrite {
    pub pc_id: String,
    /// The stream this write speaks of (unique across replicas).
    pub stream_id: Uuid,
    /// The replica holding the stream (`--replica-id`).
    pub replica: String,
    /// When the stream opened.
    pub connected_since: DateTime<Utc>,
    pub agent_version: String,
    /// When the stream was last known open (its closing, for a closed one).
    pub seen_at: DateTime<Utc>,
    /// False: the stream closed.
    pub connected: bool,
    pub report: Option<AgentReport>,
}

/// One endpoint as ingest knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRow {
    pub pc_id: String,
    /// Its stream is open now: marked connected and refreshed recently enough.
    pub connected: bool,
    pub replica: String,
    pub connected_since: DateTime<Utc>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub agent_version: String,
    /// What its agent last reported; `None` when it never did (an older agent).
    pub report: Option<AgentReport>,
}

/// A listing of endpoints. Every filter given must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointQuery {
    pub connected: Option<bool>,
    pub pc_id_prefix: Option<String>,
    /// Strictly after this pc_id (keyset paging; ordered by pc_id only).
    pub after: Option<String>,
    pub limit: u32,
    pub order: EndpointOrder,
    /// An endpoint marked connected counts as connected only when last seen at or after this:
    /// a replica that died stopped refreshing its streams.
    pub connected_after: DateTime<Utc>,
    /// An endpoint whose oldest waiting event is older than this is behind (backlogged).
    pub backlogged_before: DateTime<Utc>,
}

/// How endpoints are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointOrder {
    /// By pc_id (byte order), for paging through all of them.
    PcId,
    /// Only those needing attention: disconnected ones (most recently lost first), then
    /// connected ones whose backlog is old (oldest first).
    AttentionFirst,
}

/// The fleet in figures (the metrics of every replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FleetTotals {
    pub connected: u64,
    pub disconnected: u64,
    /// Events waiting in the outboxes of every endpoint, as last reported.
    pub backlog_events: u64,
    pub dead_letters: u64,
}

/// Where a page of a listing starts: strictly after this row in listing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub started_at: DateTime<Utc>,
    pub result_id: Uuid,
}

impl Cursor {
    /// The cursor as an opaque page token (Activity's `page_token`, the console's `page`): 8
    /// bytes of `started_at` microseconds and the 16 bytes of `result_id`, hex.
    pub fn to_token(self) -> String {
        let mut bytes = self.started_at.timestamp_micros().to_be_bytes().to_vec();
        bytes.extend_from_slice(self.result_id.as_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A token [`Cursor::to_token`] made; `None` for anything else.
    pub fn from_token(token: &str) -> Option<Cursor> {
        if token.len() != 48 || !token.is_ascii() {
            return None;
        }
        let bytes: Vec<u8> = (0..48)
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .ok()?;
        let micros = i64::from_be_bytes(bytes[..8].try_into().ok()?);
        Some(Cursor {
            started_at: DateTime::from_timestamp_micros(micros)?,
            result_id: Uuid::from_slice(&bytes[8..]).ok()?,
        })
    }

    /// Where the page after `row` starts.
    pub fn after(row: &ExecutionRow) -> Cursor {
        Cursor {
            started_at: row.started_at,
            result_id: row.result_id,
        }
    }
}

/// A listing of runs, newest first by `(started_at, result_id)`. Every filter given must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Empty: every state.
    pub states: Vec<RunState>,
    pub pc_id: Option<String>,
    pub manifest_id: Option<String>,
    pub exec_id: Option<String>,
    /// Inclusive.
    pub started_after: Option<DateTime<Utc>>,
    /// Exclusive.
    pub started_before: Option<DateTime<Utc>>,
    pub after: Option<Cursor>,
    pub limit: u32,
    /// The instant states are computed for.
    pub now: DateTime<Utc>,
    /// How long past its timeout a run without a result still counts as running.
    pub lost_grace: Duration,
}

impl ListQuery {
    /// Every run, newest first, `limit` at a time.
    pub fn all(now: DateTime<Utc>, lost_grace: Duration, limit: u32) -> ListQuery {
        ListQuery {
            states: Vec::new(),
            pc_id: None,
            manifest_id: None,
            exec_id: None,
            started_after: None,
            started_before: None,
            after: None,
            limit,
            now,
            lost_grace,
        }
    }
}

/// A summary of runs per manifest over a window of `started_at` (`SummarizeManifests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryQuery {
    /// Inclusive.
    pub started_after: DateTime<Utc>,
    /// Exclusive.
    pub started_before: DateTime<Utc>,
    /// Only this manifest.
    pub manifest_id: Option<String>,
    /// The instant states are computed for.
    pub now: DateTime<Utc>,
    pub lost_grace: Duration,
}

/// One manifest's runs over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSummary {
    pub manifest_id: String,
    pub runs: u64,
    pub running: u64,
    pub succeeded: u64,
    /// Every finished state but succeeded.
    pub failed: u64,
    pub lost: u64,
    /// Of finished runs (`percentile_disc`); `None` when none finished.
    pub p50_duration: Option<std::time::Duration>,
    pub p95_duration: Option<std::time::Duration>,
    /// The newest failure: its run and when it finished.
    pub last_failure: Option<(Uuid, DateTime<Utc>)>,
}

/// What a listener hears ([`Store::listen`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Listening (again): notifications sent while not listening were missed.
    Listening,
    /// A notification on `channel`.
    Notified { channel: String, payload: String },
}

/// A signed-in console session (SPEC §13), as stored: never the session id itself, never a
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 (hex) of the random id the browser's cookie holds.
    pub id_sha256: String,
    /// SHA-256 (hex) of the token the session was opened with, as the tokens file lists it.
    pub token_sha256: String,
    /// The token forms that change anything must carry.
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// Why the store could not do what was asked, sorted by what the caller should do about it.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store cannot commit now (connection refused or lost, shutting down, serialization
    /// failure, deadlock, timeout). Retry later; nothing was applied, or the retry is harmless.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A commit did not answer in time; its outcome is unknown.
    #[error("no answer from the database within {0:?}")]
    CommitTimedOut(std::time::Duration),
    /// The database refused the data itself (SQLSTATE class 22 or 23). Retrying the same data
    /// fails the same way; isolate the event and reject it.
    #[error("database refused the data: {0}")]
    Refused(#[source] sqlx::Error),
    /// Anything else: a bug or a misconfigured database.
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
    /// Migrations could not be applied.
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no store Kanade knows.
    #[error(
        "unsupported database URL {0:?}: use postgres://… (or postgresql://…) or sqlite://PATH"
    )]
    UnsupportedUrl(String),
    /// A read replica must be PostgreSQL.
    #[error(
        "unsupported read database URL {0:?}: a read replica is a PostgreSQL streaming replica, \
         postgres://… (or postgresql://…)"
    )]
    UnsupportedReadUrl(String),
    /// Another process serves this SQLite database already.
    #[error(
        "another kanade-ingest already serves {path}: an SQLite database is for one ingest \
         process (stop the other one, or give this one its own --database-url); several \
         replicas need PostgreSQL (--database-url postgres://…)"
    )]
    InUse { path: String },
    /// The exclusive lock on an SQLite database could not be taken.
    #[error("locking {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &err {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                StoreError::Unavailable(err)
            }
            E::Protocol(_) => StoreError::Unavailable(err),
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let class = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    sqlite_class(&code)
                } else {
                    sqlstate_class(&code)
                };
                match class {
                    ErrorClass::Transient => StoreError::Unavailable(err),
                    ErrorClass::Data => StoreError::Refused(err),
                    ErrorClass::Other => StoreError::Other(err),
                }
            }
            _ => StoreError::Other(err),
        }
    }
}

/// What one retention pass did to the day partitions ([`Store::drop_days_before`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DroppedDays {
    /// Days whose runs are gone, oldest first.
    pub dropped: Vec<NaiveDate>,
    /// Expired days left for the next sweep: the table was busy with other queries for longer
    /// than the retention may make the writers wait.
    pub postponed: Vec<NaiveDate>,
}

/// What a database error says about retrying.
enum ErrorClass {
    /// Not now: retry later.
    Transient,
    /// Never, for this data: isolate and reject it.
    Data,
    /// Neither: a bug or a misconfigured database.
    Other,
}

/// PostgreSQL's SQLSTATE classes (SPEC §3).
fn sqlstate_class(code: &str) -> ErrorClass {
    if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
    {
        ErrorClass::Transient
    } else if code.starts_with("22") || code.starts_with("23") {
        ErrorClass::Data
    } else {
        ErrorClass::Other
    }
}

/// SQLite's result codes (extended codes carry the primary one in their low byte).
fn sqlite_class(code: &str) -> ErrorClass {
    const BUSY: i32 = 5;
    const LOCKED: i32 = 6;
    const IOERR: i32 = 10;
    const FULL: i32 = 13;
    const CONSTRAINT: i32 = 19;
    const TOOBIG: i32 = 18;
    match code.parse::<i32>().map(|c| c & 0xff) {
        Ok(BUSY | LOCKED | IOERR | FULL) => ErrorClass::Transient,
        Ok(CONSTRAINT | TOOBIG) => ErrorClass::Data,
        _ => ErrorClass::Other,
    }
}

impl StoreError {
    /// A short name of the error's kind, for metrics and span attributes.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::CommitTimedOut(_) => "timeout",
            StoreError::Refused(_) => "refused",
            StoreError::Other(_) => "other",
            StoreError::Migrate(_) => "migrate",
            StoreError::UnsupportedUrl(_) | StoreError::UnsupportedReadUrl(_) => "unsupported_url",
            StoreError::InUse { .. } | StoreError::Lock { .. } => "in_use",
        }
    }

    /// True when retrying the same operation later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::CommitTimedOut(_)
        )
    }
}

/// What readers may ask of a store: queries and a probe, nothing that writes. Activity (and every
/// other reader) holds one of these, so a read replica (`--read-database-url`) can only ever be
/// asked to read. Implementations must be safe to share across tasks.
#[async_trait]
pub trait ReadStore: Send + Sync + fmt::Debug {
    /// The database system, as OpenTelemetry's `db.system.name` names it.
    fn system(&self) -> &'static str;

    /// One run, with outputs whole.
    async fn get(
        &self,
        result_id: Uuid,
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<Option<ExecutionRow>, StoreError>;

    /// A page of runs.
    async fn list(&self, query: &ListQuery) -> Result<Vec<ExecutionRow>, StoreError>;

    /// The runs among `result_ids` (a few hundred at most) that have a result, outputs whole,
    /// in no particular order: which followed runs ended.
    async fn finished_among(
        &self,
        result_ids: &[Uuid],
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<Vec<ExecutionRow>, StoreError>;

    /// Runs per manifest over a window, ordered by manifest id.
    async fn summarize(&self, query: &SummaryQuery) -> Result<Vec<ManifestSummary>, StoreError>;

    /// A page of endpoints.
    async fn list_endpoints(&self, query: &EndpointQuery) -> Result<Vec<EndpointRow>, StoreError>;

    /// One endpoint; `connected_after` as in [`EndpointQuery`].
    async fn get_endpoint(
        &self,
        pc_id: &str,
        connected_after: DateTime<Utc>,
    ) -> Result<Option<EndpointRow>, StoreError>;

    /// How many endpoints are connected and not, and what they hold back.
    async fn fleet_totals(&self, connected_after: DateTime<Utc>)
    -> Result<FleetTotals, StoreError>;

    /// Answers when the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Drops every pooled connection: called when a request got no answer in time, because a
    /// connection that went silent would otherwise be handed out again.
    fn discard_connections(&self) {}
}

/// Everything ingest does to its primary database: the reads, and the writes, migrations and
/// retention that only the primary may see.
#[async_trait]
pub trait Store: ReadStore {
    /// Applies the embedded migrations; safe when several replicas start at once.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Applies `writes` in ONE transaction, in the given order, with the coalescing rules of
    /// SPEC §3; `received_at` is recorded on rows this inserts. A `result_id` may appear more than
    /// once only with different `pc_id`s. Returns, for each write, whether it was applied
    /// (`false`: the run belongs to another endpoint and was left untouched).
    async fn apply(
        &self,
        writes: &[RunWrite],
        received_at: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError>;

    /// Records an operator's request to cancel a run that has no result yet, on its row (and
    /// among the cancels to deliver), in one transaction; a run already carrying a request is
    /// left as it is.
    async fn request_cancel(
        &self,
        result_id: Uuid,
        request: &CancelRequest,
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<CancelOutcome, StoreError>;

    /// The cancels still to deliver to these endpoints: requested, and their run has no result.
    async fn pending_cancels(&self, pc_ids: &[String]) -> Result<Vec<PendingCancel>, StoreError>;

    /// Forgets the cancels whose run has a result (or is gone); returns how many.
    async fn forget_settled_cancels(&self) -> Result<u64, StoreError>;

    /// Applies presence writes in one transaction (in order). A write for the stream an
    /// endpoint's row names updates it; a write for a newer stream takes the row over, as does
    /// one for any open stream when the row is disconnected or was last seen before
    /// `stale_before` (its replica stopped refreshing it); a closed stream's write changes only
    /// the row that names it. Reports apply when newer than the row's.
    async fn write_presence(
        &self,
        writes: &[PresenceWrite],
        stale_before: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Deletes the endpoints last seen before `cutoff` (decommissioned); returns how many.
    async fn forget_endpoints_seen_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Deletes at most `limit` rows first received before `cutoff` that are not in a day
    /// partition (those go whole, [`Store::drop_days_before`]); returns how many went.
    async fn delete_received_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Makes sure the days from `today` to `days_ahead` days later have their partitions
    /// (PostgreSQL); returns how many were created. Safe with several replicas.
    async fn prepare_days(&self, _today: NaiveDate, _days_ahead: u32) -> Result<u32, StoreError> {
        Ok(0)
    }

    /// Drops the partitions of days that ended before `cutoff` whole (PostgreSQL), whatever
    /// they hold. A day whose partition could not be taken out of the table quickly (other
    /// queries held it) is left for the next sweep, never waited for at the writers' expense.
    async fn drop_days_before(&self, _cutoff: DateTime<Utc>) -> Result<DroppedDays, StoreError> {
        Ok(DroppedDays::default())
    }

    /// Whether other processes serve this database too (PostgreSQL: several replicas), so that
    /// what one of them does must be told to the others ([`Store::notify`], [`Store::listen`]).
    /// An SQLite database has one serving process.
    fn is_shared(&self) -> bool {
        false
    }

    /// Tells every process listening on `channel` (itself included) `payload` (PostgreSQL
    /// `NOTIFY`: at most 8,000 bytes, delivered after this call's own transaction). Does nothing
    /// on a store no other process serves.
    async fn notify(&self, _channel: &str, _payload: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Tells each `(channel, payload)` at once (one statement, one transaction: PostgreSQL
    /// delivers them in order), as [`Store::notify`] does one.
    async fn notify_all(&self, _notices: &[(String, String)]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Passes what is notified on `channels` to `heard` until `stop` (PostgreSQL `LISTEN`),
    /// reconnecting when the connection is lost; each (re)connection is announced first with
    /// [`Heard::Listening`], since whatever was sent meanwhile is gone. The default waits for
    /// `stop`: nobody else notifies.
    async fn listen(
        &self,
        _channels: &[String],
        _heard: tokio::sync::mpsc::Sender<Heard>,
        stop: CancellationToken,
    ) {
        stop.cancelled().await;
    }

    /// How many transactions may write at once (the batcher's commits in flight): SQLite has
    /// one writer.
    fn max_writers(&self) -> usize {
        1
    }

    /// Opens a console session.
    async fn open_session(&self, session: &ConsoleSession) -> Result<(), StoreError>;

    /// The session whose id hashes to `id_sha256`, if it exists and has not expired at `now`.
    async fn session(
        &self,
        id_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, StoreError>;

    /// Ends a session (sign-out); ending one that does not exist is not an error.
    async fn end_session(&self, id_sha256: &str) -> Result<(), StoreError>;

    /// Deletes the sessions expired at `now`; returns how many.
    async fn delete_expired_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Claims the database for this serving process where only one may serve it (SQLite);
    /// fails, saying so, when another process holds it. The claim lasts as long as the store.
    fn claim_for_serving(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Opens the store a database URL names: `postgres://…`/`postgresql://…` or `sqlite://PATH`
/// (created when missing). PostgreSQL sessions carry `session` as their `application_name`, so
/// `pg_stat_activity` tells replicas apart.
pub async fn open(url: &str, session: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_as(url, session, false)?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}

/// Opens the read replica `--read-database-url` names: PostgreSQL only (a streaming replica of
/// the primary), connected lazily and read-only, its sessions named `session`.
pub async fn open_reader(url: &str, session: &str) -> Result<Arc<dyn ReadStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_as(url, session, true)?))
    } else {
        Err(StoreError::UnsupportedReadUrl(url.to_string()))
    }
}
