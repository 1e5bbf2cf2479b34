//! The durable outbox: one SQLite database in the data dir, shared by every agent process.
//!
//! Invariants (SPEC §4):
//! - A run's `EventStarted` is committed before its process is spawned, together with a `runs`
//!   row; its `ExecResult` is committed, and the `runs` row deleted, in one transaction before
//!   the run is forgotten.
//! - Each running run holds an exclusive lock on `runs/RESULT_ID.lock`. A `runs` row whose lock
//!   is free belongs to a dead process: [`Outbox::recover_interrupted`] reports it once as
//!   `INTERRUPTED`. Claiming is one transaction (delete the row, enqueue the result), so two
//!   processes never report a run twice; pids are never consulted (they are reused).
//! - Events leave only by ack (deleted) or refusal (moved to `dead_letters`); a row that cannot
//!   be decoded moves to `dead_letters` instead of blocking the queue.
//! - The outbox stays under its size cap by cutting queued outputs further; event metadata is
//!   never dropped.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use chrono::{DateTime, SubsecRound, Utc};
use kanade_shared::{
    pb,
    wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus},
};
use sqlx::{
    Row, SqliteConnection,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use tokio::sync::Notify;

use crate::{config::Synchronous, runner::keep_head_and_tail};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Name of the outbox database in the data dir.
pub const DB_FILE: &str = "outbox.db";
/// The socket other processes poke to wake the sender at once.
pub const WAKE_SOCKET: &str = "wake.sock";
/// The lock the one sending process holds.
pub const SENDER_LOCK: &str = "sender.lock";
const RUNS_DIR: &str = "runs";
const OPEN_LOCK: &str = "open.lock";
/// Retries of a run's result commit before the run is left to be reported INTERRUPTED.
const FINISH_ATTEMPTS: u32 = 8;
/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// When the outbox is over its cap, queued outputs are cut to this many bytes each.
const OVER_CAP_OUTPUT_BYTES: usize = 4 * 1024;

/// The held lock of a running run; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

/// An event waiting for its ack.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    pub event: pb::Event,
    pub bytes: u64,
}

/// A dead-lettered event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub seq: i64,
    pub result_id: String,
    pub kind: String,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
}

/// What `kanade-agent status` reports.
#[derive(Debug, Clone)]
pub struct OutboxStatus {
    pub pending_events: u64,
    pub pending_bytes: u64,
    pub oldest_pending: Option<DateTime<Utc>>,
    pub dead_letters: u64,
    pub running_runs: u64,
    pub connection: Option<String>,
    pub last_ack: Option<String>,
}

/// The outbox of one data dir.
#[derive(Debug, Clone)]
pub struct Outbox {
    pool: SqlitePool,
    dir: PathBuf,
    cap_bytes: u64,
    /// Woken on every enqueue in this process; the daemon also wakes it for other processes.
    pub wake: Arc<Notify>,
}

fn micros_now() -> i64 {
    Utc::now().timestamp_micros()
}

/// Creates `dir` (and parents) readable by its owner only.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))
}

/// Opens (creating, 0600) a file that exists to be locked; its content is never used.
pub fn lock_file(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))
}

fn kind(body: &EventBody) -> &'static str {
    match body {
        EventBody::Started(_) => "started",
        EventBody::Result(_) => "result",
    }
}

fn encode(event: &Event) -> anyhow::Result<String> {
    serde_json::to_string(event).context("encoding an event")
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`: directory 0700, database 0600, WAL.
    pub async fn open(
        dir: &Path,
        synchronous: Synchronous,
        cap_bytes: u64,
    ) -> anyhow::Result<Outbox> {
        private_dir(dir)?;
        private_dir(&dir.join(RUNS_DIR))?;
        let db = dir.join(DB_FILE);
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .with_context(|| format!("creating {}", db.display()))?;
        fs::set_permissions(&db, fs::Permissions::from_mode(0o600))?;
        // Several processes may open a fresh data dir at once. Switching it to WAL and migrating
        // are not safe to race (sqlx does not lock SQLite migrations across processes, and a
        // journal-mode switch does not wait for a busy database), so opening is serialised by a
        // lock file.
        let open_lock = dir.join(OPEN_LOCK);
        let lock = tokio::task::spawn_blocking(move || -> anyhow::Result<File> {
            let file = lock_file(&open_lock)?;
            file.lock()
                .with_context(|| format!("locking {}", open_lock.display()))?;
            Ok(file)
        })
        .await??;
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
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_with(options)
            .await
            .with_context(|| format!("opening the outbox {}", db.display()))?;
        MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("migrating the outbox {}", db.display()))?;
        drop(lock);
        Ok(Outbox {
            pool,
            dir: dir.to_path_buf(),
            cap_bytes,
            wake: Arc::new(Notify::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_path(&self, result_id: &str) -> PathBuf {
        self.dir.join(RUNS_DIR).join(format!("{result_id}.lock"))
    }

    /// Wakes the sender: this process's at once, another process's through its socket.
    pub fn wake_sender(&self) {
        self.wake.notify_one();
        let socket = self.dir.join(WAKE_SOCKET);
        if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
            // No daemon listening is normal (it will find the events when it starts).
            let _ = s.send_to(b"!", socket);
        }
    }

    /// Journals a run and commits its Started event: call before spawning.
    #[tracing::instrument(name = "outbox.begin_run", skip_all)]
    pub async fn begin_run(
        &self,
        started: &EventStarted,
        trace_context: &BTreeMap<String, String>,
    ) -> anyhow::Result<(RunLock, u64)> {
        let path = self.lock_path(&started.result_id);
        let file = lock_file(&path)?;
        file.try_lock()
            .with_context(|| format!("locking {} (result_id reused?)", path.display()))?;
        let event = Event {
            seq: 0,
            body: EventBody::Started(started.clone()),
            trace_context: trace_context.clone(),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO runs (result_id, started, trace_context) VALUES (?1, ?2, ?3)")
            .bind(&started.result_id)
            .bind(serde_json::to_string(started)?)
            .bind(serde_json::to_string(trace_context)?)
            .execute(&mut *tx)
            .await?;
        let seq = self.enqueue_in(&mut tx, event).await?;
        tx.commit().await.context("committing the Started event")?;
        self.wake_sender();
        Ok((RunLock { file, path }, seq))
    }

    /// Commits a run's result and forgets the run: call when it ended.
    #[tracing::instrument(name = "outbox.finish_run", skip_all)]
    pub async fn finish_run(
        &self,
        lock: RunLock,
        result: ExecResult,
        trace_context: &BTreeMap<String, String>,
    ) -> anyhow::Result<u64> {
        // The run's lock is held until the result is committed, so no other process reports it
        // INTERRUPTED meanwhile; a busy or briefly failing disk gets a few more tries.
        let backoff = kanade_shared::backoff::Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        let mut attempt = 0;
        let seq = loop {
            match self.commit_result(&result, trace_context).await {
                Ok(seq) => break seq,
                Err(err) if attempt < FINISH_ATTEMPTS => {
                    tracing::warn!(result_id = %result.result_id, error = %format!("{err:#}"),
                        "committing the result failed; retrying");
                    tokio::time::sleep(backoff.next_delay(attempt)).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        };
        let _ = fs::remove_file(&lock.path);
        drop(lock.file);
        self.wake_sender();
        Ok(seq)
    }

    async fn commit_result(
        &self,
        result: &ExecResult,
        trace_context: &BTreeMap<String, String>,
    ) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM runs WHERE result_id = ?1")
            .bind(&result.result_id)
            .execute(&mut *tx)
            .await?;
        let seq = self
            .enqueue_in(
                &mut tx,
                Event {
                    seq: 0,
                    body: EventBody::Result(result.clone()),
                    trace_context: trace_context.clone(),
                },
            )
            .await?;
        tx.commit().await.context("committing the result")?;
        Ok(seq)
    }

    /// Inserts one event, first making room under the cap.
    async fn enqueue_in(
        &self,
        conn: &mut SqliteConnection,
        mut event: Event,
    ) -> anyhow::Result<u64> {
        let mut payload = encode(&event)?;
        let queued: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(bytes), 0) FROM outbox")
            .fetch_one(&mut *conn)
            .await?;
        if queued as u64 + payload.len() as u64 > self.cap_bytes {
            if let EventBody::Result(r) = &mut event.body {
                let cut = cut_outputs(r);
                if cut > 0 {
                    tracing::warn!(cap_bytes = self.cap_bytes, result_id = %r.result_id, cut_bytes = cut,
                        "outbox is at its cap: cut this result's outputs");
                    payload = encode(&event)?;
                }
            }
            self.shrink_queued(conn, queued as u64 + payload.len() as u64)
                .await?;
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (result_id, kind, payload, bytes, enqueued_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
        )
        .bind(event.body.result_id())
        .bind(kind(&event.body))
        .bind(&payload)
        .bind(payload.len() as i64)
        .bind(micros_now())
        .fetch_one(&mut *conn)
        .await?;
        Ok(seq as u64)
    }

    /// Cuts the outputs of queued results, largest first, until the outbox fits its cap.
    async fn shrink_queued(
        &self,
        conn: &mut SqliteConnection,
        mut total: u64,
    ) -> anyhow::Result<()> {
        let rows = sqlx::query(
            "SELECT seq, payload FROM outbox WHERE kind = 'result' AND bytes > ?1 ORDER BY bytes DESC",
        )
        .bind((2 * OVER_CAP_OUTPUT_BYTES + 4096) as i64)
        .fetch_all(&mut *conn)
        .await?;
        let mut cut_total = 0u64;
        for row in rows {
            if total <= self.cap_bytes {
                break;
            }
            let seq: i64 = row.try_get("seq")?;
            let payload: String = row.try_get("payload")?;
            let Ok(mut event) = serde_json::from_str::<Event>(&payload) else {
                continue;
            };
            let EventBody::Result(r) = &mut event.body else {
                continue;
            };
            cut_outputs(r);
            let shorter = encode(&event)?;
            total -= (payload.len() - shorter.len()) as u64;
            cut_total += (payload.len() - shorter.len()) as u64;
            sqlx::query("UPDATE outbox SET payload = ?1, bytes = ?2 WHERE seq = ?3")
                .bind(&shorter)
                .bind(shorter.len() as i64)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
        }
        if cut_total > 0 {
            tracing::warn!(
                cap_bytes = self.cap_bytes,
                cut_bytes = cut_total,
                "outbox is at its cap: cut queued outputs (event metadata is kept)"
            );
        }
        if total > self.cap_bytes {
            tracing::error!(
                cap_bytes = self.cap_bytes,
                bytes = total,
                "outbox is over its cap with nothing left to cut; keeping every event"
            );
        }
        Ok(())
    }

    /// Up to `limit` events after `after_seq`, in order. Rows that cannot be decoded are moved
    /// to the dead letters on the way, and never make the answer look empty while valid events
    /// follow them.
    pub async fn pending(&self, mut after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.is_empty() {
            let rows = sqlx::query(
                "SELECT seq, payload, bytes FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .bind(after_seq as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let seq: i64 = row.try_get("seq")?;
                after_seq = seq as u64;
                let payload: String = row.try_get("payload")?;
                match serde_json::from_str::<Event>(&payload) {
                    Ok(mut event) => {
                        event.seq = seq as u64;
                        out.push(Pending {
                            seq: seq as u64,
                            event: event.into(),
                            bytes: row.try_get::<i64, _>("bytes")? as u64,
                        });
                    }
                    Err(err) => {
                        let reason = format!("undecodable outbox row: {err}");
                        tracing::error!(seq, %reason, "moving an outbox row to the dead letters");
                        self.dead_letter(seq as u64, &reason).await?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Forgets acknowledged events.
    pub async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for seq in seqs {
            sqlx::query("DELETE FROM outbox WHERE seq = ?1")
                .bind(*seq as i64)
                .execute(&mut *tx)
                .await?;
        }
        set_state(&mut tx, "last_ack", &Utc::now().to_rfc3339()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves an event to the dead letters with the reason it can never be delivered.
    pub async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO dead_letters (seq, result_id, kind, payload, reason, enqueued_at, dead_at) \
             SELECT seq, result_id, kind, payload, ?2, enqueued_at, ?3 FROM outbox WHERE seq = ?1",
        )
        .bind(seq as i64)
        .bind(reason)
        .bind(micros_now())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox WHERE seq = ?1")
            .bind(seq as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether an event is still waiting (neither acked nor dead-lettered).
    pub async fn is_pending(&self, seq: u64) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE seq = ?1")
            .bind(seq as i64)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Whether an event was dead-lettered.
    pub async fn is_dead(&self, seq: u64) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters WHERE seq = ?1")
            .bind(seq as i64)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Reports every run whose owning process died as INTERRUPTED, once. Returns how many.
    pub async fn recover_interrupted(&self) -> anyhow::Result<usize> {
        let rows = sqlx::query("SELECT result_id, started, trace_context FROM runs")
            .fetch_all(&self.pool)
            .await?;
        let mut recovered = 0;
        for row in rows {
            let result_id: String = row.try_get("result_id")?;
            let path = self.lock_path(&result_id);
            let Ok(file) = lock_file(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // Its process is alive and running it.
            }
            let started: EventStarted = match serde_json::from_str(
                &row.try_get::<String, _>("started")?,
            ) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(%result_id, error = %err, "undecodable run journal entry; dropping it");
                    sqlx::query("DELETE FROM runs WHERE result_id = ?1")
                        .bind(&result_id)
                        .execute(&self.pool)
                        .await?;
                    continue;
                }
            };
            let trace_context: BTreeMap<String, String> =
                serde_json::from_str(&row.try_get::<String, _>("trace_context")?)
                    .unwrap_or_default();
            let mut tx = self.pool.begin().await?;
            let claimed = sqlx::query("DELETE FROM runs WHERE result_id = ?1")
                .bind(&result_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if claimed == 1 {
                let finished_at = Utc::now().trunc_subsecs(6).max(started.started_at);
                let result = ExecResult {
                    result_id: started.result_id.clone(),
                    request_id: started.request_id.clone(),
                    exec_id: started.exec_id.clone(),
                    pc_id: started.pc_id.clone(),
                    manifest_id: started.manifest_id.clone(),
                    version: started.version.clone(),
                    status: ExecStatus::Interrupted,
                    exit_code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    stdout_dropped_bytes: 0,
                    stderr_dropped_bytes: 0,
                    started_at: started.started_at,
                    finished_at,
                };
                self.enqueue_in(
                    &mut tx,
                    Event {
                        seq: 0,
                        body: EventBody::Result(result),
                        trace_context,
                    },
                )
                .await?;
                tx.commit().await?;
                tracing::warn!(%result_id, manifest_id = %started.manifest_id,
                    "run's agent process died: reported INTERRUPTED");
                recovered += 1;
            }
            let _ = fs::remove_file(&path);
        }
        if recovered > 0 {
            self.wake_sender();
        }
        Ok(recovered)
    }

    /// Records what the sender is doing, for `status`.
    pub async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        set_state(&mut conn, "connection", state).await
    }

    pub async fn status(&self) -> anyhow::Result<OutboxStatus> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes, MIN(enqueued_at) AS oldest FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await?;
        let running: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
            .fetch_one(&self.pool)
            .await?;
        let state = |key: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT value FROM agent_state WHERE key = ?1")
                    .bind(key)
                    .fetch_optional(&pool)
                    .await
            }
        };
        Ok(OutboxStatus {
            pending_events: row.try_get::<i64, _>("n")? as u64,
            pending_bytes: row.try_get::<i64, _>("bytes")? as u64,
            oldest_pending: row
                .try_get::<Option<i64>, _>("oldest")?
                .and_then(DateTime::from_timestamp_micros),
            dead_letters: dead as u64,
            running_runs: running as u64,
            connection: state("connection").await?,
            last_ack: state("last_ack").await?,
        })
    }

    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, seq, result_id, kind, reason, dead_at FROM dead_letters ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get("id")?,
                    seq: r.try_get("seq")?,
                    result_id: r.try_get("result_id")?,
                    kind: r.try_get("kind")?,
                    reason: r.try_get("reason")?,
                    dead_at: DateTime::from_timestamp_micros(r.try_get("dead_at")?)
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Puts a dead letter back at the end of the queue.
    pub async fn retry_dead_letter(&self, id: i64) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "INSERT INTO outbox (result_id, kind, payload, bytes, enqueued_at) \
             SELECT result_id, kind, payload, length(CAST(payload AS BLOB)), ?2 FROM dead_letters WHERE id = ?1",
        )
        .bind(id)
        .bind(micros_now())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            bail!("no dead letter has id {id} (see `kanade-agent dead-letters list`)");
        }
        sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.wake_sender();
        Ok(())
    }

    pub async fn purge_dead_letter(&self, id: i64) -> anyhow::Result<()> {
        let gone = sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if gone == 0 {
            bail!("no dead letter has id {id} (see `kanade-agent dead-letters list`)");
        }
        Ok(())
    }
}

async fn set_state(conn: &mut SqliteConnection, key: &str, value: &str) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO agent_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(key)
        .bind(value)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Cuts a result's outputs to the over-cap size; returns the bytes cut.
fn cut_outputs(r: &mut ExecResult) -> u64 {
    let (stdout, a) = keep_head_and_tail(&r.stdout, OVER_CAP_OUTPUT_BYTES);
    let (stderr, b) = keep_head_and_tail(&r.stderr, OVER_CAP_OUTPUT_BYTES);
    r.stdout = stdout;
    r.stderr = stderr;
    r.stdout_dropped_bytes = r.stdout_dropped_bytes.saturating_add(a);
    r.stderr_dropped_bytes = r.stderr_dropped_bytes.saturating_add(b);
    a + b
}
