//! The durable outbox: one SQLite database in the data dir ([`crate::data_dir`]), shared by every
//! agent process on that dir. Every event a run produces goes through it; nothing reaches ingest
//! any other way, so nothing is lost across network outages, ingest or agent restarts, or power
//! loss.
//!
//! # Invariants (SPEC §4)
//! - A run's `EventStarted` is committed before its process is spawned, together with a `runs`
//!   row (the journal); its `ExecResult` is committed, and the `runs` row deleted, in one
//!   transaction before the run is forgotten.
//! - Each running run holds the lock `runs/RESULT_ID.lock`. A `runs` row whose lock is free
//!   belongs to a dead process: it is reported once as `INTERRUPTED`. Claiming is one transaction
//!   (delete the row, enqueue the result), so two processes never report a run twice; pids are
//!   never consulted (they are reused).
//! - Events leave only by ack (deleted) or refusal (moved to `dead_letters`); a row that cannot
//!   be decoded moves to `dead_letters` instead of blocking the queue.
//! - The outbox stays under its size cap by cutting queued outputs further; event metadata is
//!   never dropped.
//!
//! # On disk (`migrations/`)
//! - `outbox (seq, result_id, kind, payload, bytes, enqueued_at)`: events waiting for their ack,
//!   in commit order; `payload` is the JSON of [`kanade_shared::wire::Event`], whose `seq` is
//!   the row's.
//! - `dead_letters`: refused or undecodable events, kept with the reason for the operator.
//! - `runs (result_id, started, trace_context)`: the journal of runs in progress.
//! - `agent_state (key, value)`: what `kanade-agent status` shows about the sender.
//!
//! WAL mode, `synchronous=FULL` by default: a commit is on disk when it returns.
//!
//! # Paths
//! - Write ([`journal`]): `begin_run` → spawn → `finish_run`; `recover_interrupted` for runs of
//!   dead processes. Every enqueue goes through [`queue`]'s one insert, which enforces the cap.
//! - Read ([`queue`]): the sender asks for `pending(after_seq, limit)`, in seq order.
//! - Ack ([`queue`]): an Ack deletes, a Reject dead-letters.
//! - Operator ([`admin`]): status, dead letters listed, retried, purged.
//! - Damage ([`repair`]): any sign of corruption (SQLite `CORRUPT`, `NOTADB`) is
//!   [`OutboxError::Damaged`], which names the file and the way out; `check` and `salvage`.

mod admin;
mod journal;
mod queue;
mod repair;

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::Notify;

pub use admin::{DeadLetter, OutboxStatus};
pub use queue::Pending;
pub use repair::{CheckReport, SalvageReport, check, salvage};

use crate::{
    config::Synchronous,
    data_dir::{DataDir, DataDirError, RESERVE_BYTES},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The outbox's one connection closes after this long unused (the daemon's beat reopens it).
const IDLE_CONNECTION: Duration = Duration::from_secs(60);
/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A file or lock of the data dir.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The database failed a statement.
    #[error("outbox database: {0}")]
    Database(#[from] sqlx::Error),
    /// The disk holding the data dir has no room (SQLite says "database or disk is full", or
    /// "disk I/O error" when its `-shm` file cannot grow).
    #[error("the disk holding {} is full ({free_bytes} bytes free)", dir.display())]
    DiskFull {
        dir: std::path::PathBuf,
        free_bytes: u64,
    },
    /// The outbox file is damaged (SQLite `CORRUPT`, `NOTADB`, or a failed check).
    #[error(
        "the outbox {} is damaged ({detail}); nothing more is read from or written to it. See \
         what is wrong with `kanade-agent outbox check`, then run `kanade-agent outbox salvage` \
         (same --config or --data-dir): it moves the file aside (nothing is deleted), starts a \
         fresh outbox and queues again every event that can still be read",
        file.display()
    )]
    Damaged {
        file: std::path::PathBuf,
        detail: String,
    },
    /// A run's result could not be committed, even with its outputs cut.
    #[error(
        "the result of run {result_id} is not recorded ({cause}); the next kanade-agent on this \
         data dir reports the run INTERRUPTED"
    )]
    ResultNotRecorded {
        result_id: String,
        #[source]
        cause: Box<OutboxError>,
    },
    /// The migrations could not be applied.
    #[error("migrating the outbox: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An event could not be written as JSON.
    #[error("encoding an event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The data dir is in use where the operation needs it to itself.
    #[error("{} is in use: {why}", dir.display())]
    Busy {
        dir: std::path::PathBuf,
        why: String,
    },
    /// The operator named a dead letter that does not exist.
    #[error("no dead letter has id {id} (see `kanade-agent dead-letters list`)")]
    NoSuchDeadLetter { id: i64 },
}

impl OutboxError {
    /// The outbox file itself is damaged: retrying cannot help.
    pub fn is_damage(&self) -> bool {
        matches!(self, OutboxError::Damaged { .. })
    }

    /// Whether `err` (from anywhere in the agent) is, underneath, a damaged outbox.
    pub fn is_damage_in(err: &anyhow::Error) -> bool {
        err.chain().any(|e| {
            e.downcast_ref::<OutboxError>()
                .is_some_and(OutboxError::is_damage)
        })
    }
}

/// The outbox of one data dir.
#[derive(Debug, Clone)]
pub struct Outbox {
    pool: SqlitePool,
    dir: DataDir,
    cap_bytes: u64,
    /// Woken on every enqueue in this process; the sending process also wakes it for pokes from
    /// other processes.
    pub wake: Arc<Notify>,
    /// Notified (all waiters) whenever this process forgets events: acked or dead-lettered.
    pub answered: Arc<Notify>,
}

/// SQLite's primary result codes the outbox tells people about.
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_NOTADB: i32 = 26;

/// The primary SQLite result code behind an error, if SQLite gave one (anywhere in its chain).
fn sqlite_code(err: &OutboxError) -> Option<i32> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
            return db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
        }
        cause = e.source();
    }
    None
}

/// Puts SQLite's words into the operator's: a full disk says so, with the directory and what
/// is left (an I/O error counts as a full disk when less than the reserve is free); any sign
/// of corruption names the file and what to do next.
fn translate(dir: &DataDir, err: OutboxError) -> OutboxError {
    let free_bytes = || dir.free_bytes().unwrap_or(0);
    match sqlite_code(&err) {
        Some(SQLITE_FULL) => OutboxError::DiskFull {
            dir: dir.path().to_path_buf(),
            free_bytes: free_bytes(),
        },
        Some(SQLITE_IOERR) if free_bytes() < RESERVE_BYTES as u64 => OutboxError::DiskFull {
            dir: dir.path().to_path_buf(),
            free_bytes: free_bytes(),
        },
        Some(SQLITE_CORRUPT | SQLITE_NOTADB) => OutboxError::Damaged {
            file: dir.outbox_file(),
            detail: sqlite_message(&err),
        },
        _ => err,
    }
}

/// SQLite's own words for an error ("database disk image is malformed").
fn sqlite_message(err: &OutboxError) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
            return db.message().to_string();
        }
        cause = e.source();
    }
    err.to_string()
}

impl Outbox {
    /// Runs one operation of the outbox, its errors translated for people.
    async fn guard<T>(
        &self,
        operation: impl Future<Output = Result<T, OutboxError>>,
    ) -> Result<T, OutboxError> {
        operation.await.map_err(|e| translate(&self.dir, e))
    }

    /// Opens (creating) the outbox in `dir`: directory 0700, database 0600, WAL.
    pub async fn open(
        dir: &Path,
        synchronous: Synchronous,
        cap_bytes: u64,
    ) -> Result<Outbox, OutboxError> {
        let dir = DataDir::create(dir)?;
        let opened = Outbox::open_in(&dir, synchronous, cap_bytes).await;
        opened.map_err(|e| translate(&dir, e))
    }

    async fn open_in(
        dir: &DataDir,
        synchronous: Synchronous,
        cap_bytes: u64,
    ) -> Result<Outbox, OutboxError> {
        let db = dir.create_outbox_file()?;
        // Several processes may open a fresh data dir at once. Switching it to WAL and migrating
        // are not safe to race (sqlx does not lock SQLite migrations across processes, and a
        // journal-mode switch does not wait for a busy database), so opening is serialised.
        let opening = dir.clone();
        let lock = tokio::task::spawn_blocking(move || opening.lock_for_opening())
            .await
            .expect("taking the open lock does not panic")?;
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT);
        // One connection: SQLite writes one at a time anyway, and each connection costs a
        // worker thread and a page cache on a machine where the agent should be invisible.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(Some(IDLE_CONNECTION))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        drop(lock);
        // Best effort here: a run only starts once the reserve exists (`begin_run`).
        dir.ensure_reserve();
        Ok(Outbox {
            pool,
            dir: dir.clone(),
            cap_bytes,
            wake: Arc::new(Notify::new()),
            answered: Arc::new(Notify::new()),
        })
    }

    /// The data dir this outbox lives in.
    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    /// Wakes the sender: this process's at once, another process's through the wake socket.
    pub fn wake_sender(&self) {
        self.wake.notify_one();
        self.dir.poke_sender();
    }
}

fn micros_now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
