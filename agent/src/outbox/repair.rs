//! When the outbox file is damaged: `kanade-agent outbox check` says what is wrong, and
//! `kanade-agent outbox salvage` moves the file aside (`outbox.db.damaged-TIMESTAMP`, its WAL
//! with it: nothing is deleted), starts a fresh outbox, queues again every event that can still
//! be read, reports the runs that were in progress as INTERRUPTED, keeps the dead letters, and
//! says how much it recovered and what it could not read.
//!
//! Both open the damaged file directly and read-only, never through [`Outbox::open`] (whose
//! migrations would write to it). Reading goes table by table in rowid order; where SQLite
//! refuses a stretch of a table (a damaged page), the reader skips ahead in growing steps until
//! it reads again, and reports the stretch it could not read.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use chrono::{SubsecRound, Utc};
use kanade_shared::wire::{Event, EventBody, EventStarted};
use sqlx::{
    Connection, Row, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqliteRow},
};

use super::{Outbox, OutboxError, journal::interrupted, micros_now};
use crate::{config::Synchronous, data_dir::DataDir};

/// Rows read per query while salvaging.
const READ_CHUNK: i64 = 256;
/// Skipping over an unreadable stretch tries rowids up to this far ahead before giving up.
const LONGEST_SKIP: i64 = 1 << 40;
/// Problems `check` lists one by one; beyond this it counts them.
const LISTED_PROBLEMS: usize = 20;

/// What `kanade-agent outbox check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub file: PathBuf,
    /// Empty when the outbox is sound.
    pub problems: Vec<String>,
    pub pending_events: u64,
    pub dead_letters: u64,
    pub runs_in_progress: u64,
}

/// What `kanade-agent outbox salvage` did.
#[derive(Debug)]
pub struct SalvageReport {
    /// Where the damaged file is now.
    pub moved_to: PathBuf,
    /// Events queued again in the fresh outbox.
    pub recovered_events: u64,
    /// Runs that were in progress, reported INTERRUPTED.
    pub interrupted_runs: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Rows readable but not decodable: kept as dead letters.
    pub undecodable: u64,
    /// Stretches of rowids (first, last) of the event queue that could not be read.
    pub unreadable: Vec<(i64, i64)>,
    /// Nothing at all could be read (the file is not a database any more).
    pub nothing_readable: bool,
}

async fn open_read_only(file: &Path) -> Result<SqliteConnection, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(file)
        .read_only(true)
        .create_if_missing(false);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    // Opening is lazy: make SQLite read the header and the schema now.
    sqlx::query("SELECT count(*) FROM sqlite_schema")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Runs SQLite's integrity check and the outbox's own invariants on the outbox of `dir`.
pub async fn check(dir: &Path) -> Result<CheckReport, OutboxError> {
    let data_dir = DataDir::create(dir)?;
    let file = data_dir.outbox_file();
    let mut report = CheckReport {
        file: file.clone(),
        problems: Vec::new(),
        pending_events: 0,
        dead_letters: 0,
        runs_in_progress: 0,
    };
    if !file.exists() {
        return Ok(report);
    }
    let mut conn = match open_read_only(&file).await {
        Ok(conn) => conn,
        Err(err) => {
            report
                .problems
                .push(format!("the file cannot be opened as a database: {err}"));
            return Ok(report);
        }
    };
    match sqlx::query_scalar::<_, String>("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
    {
        Ok(lines) if lines == ["ok"] => {}
        Ok(lines) => report
            .problems
            .extend(lines.into_iter().map(|l| format!("integrity check: {l}"))),
        Err(err) => report
            .problems
            .push(format!("integrity check failed: {err}")),
    }
    let mut invalid = Vec::new();
    let read = read_rows(
        &mut conn,
        "outbox",
        "seq, result_id, kind, payload, bytes",
        |row| {
            report.pending_events += 1;
            if let Some(problem) = queued_event_problem(row) {
                invalid.push(problem);
            }
        },
    )
    .await;
    report.problems.extend(invalid);
    report.problems.extend(read.unreadable_problems("outbox"));
    let read = read_rows(&mut conn, "runs", "result_id, started", |row| {
        report.runs_in_progress += 1;
        let started: Option<String> = row.try_get("started").ok();
        if started.is_none_or(|s| serde_json::from_str::<EventStarted>(&s).is_err()) {
            let id: String = row.try_get("result_id").unwrap_or_default();
            report
                .problems
                .push(format!("run journal: entry {id} does not decode"));
        }
    })
    .await;
    report.problems.extend(read.unreadable_problems("runs"));
    let read = read_rows(&mut conn, "dead_letters", "id", |_| {
        report.dead_letters += 1
    })
    .await;
    report
        .problems
        .extend(read.unreadable_problems("dead_letters"));
    if report.problems.len() > LISTED_PROBLEMS {
        let more = report.problems.len() - LISTED_PROBLEMS;
        report.problems.truncate(LISTED_PROBLEMS);
        report.problems.push(format!("… and {more} more"));
    }
    Ok(report)
}

/// What is wrong with one queued row, if anything.
fn queued_event_problem(row: &SqliteRow) -> Option<String> {
    let seq: i64 = row.try_get("seq").ok()?;
    let payload: String = match row.try_get("payload") {
        Ok(p) => p,
        Err(err) => return Some(format!("event {seq}: payload unreadable: {err}")),
    };
    let event = match serde_json::from_str::<Event>(&payload) {
        Ok(e) => e,
        Err(err) => return Some(format!("event {seq}: does not decode: {err}")),
    };
    let kind: String = row.try_get("kind").unwrap_or_default();
    let expected = match event.body {
        EventBody::Started(_) => "started",
        EventBody::Result(_) => "result",
    };
    if kind != expected {
        return Some(format!(
            "event {seq}: kind says {kind:?}, the event is {expected}"
        ));
    }
    let result_id: String = row.try_get("result_id").unwrap_or_default();
    if result_id != event.body.result_id() {
        return Some(format!(
            "event {seq}: result_id column differs from the event's"
        ));
    }
    let bytes: i64 = row.try_get("bytes").unwrap_or(-1);
    if bytes != payload.len() as i64 {
        return Some(format!(
            "event {seq}: size column {bytes}, payload {} bytes",
            payload.len()
        ));
    }
    if let Err(err) = event.validate() {
        return Some(format!("event {seq}: ingest would refuse it: {err}"));
    }
    None
}

/// What reading one table found besides its rows.
#[derive(Debug, Default)]
struct Read {
    /// Stretches of rowids (first, last) that could not be read.
    unreadable: Vec<(i64, i64)>,
    /// The table could not be read at all.
    failed: Option<String>,
}

impl Read {
    fn unreadable_problems(&self, table: &str) -> Vec<String> {
        let mut problems: Vec<String> = self
            .unreadable
            .iter()
            .map(|(a, b)| format!("{table}: rows {a}–{b} cannot be read"))
            .collect();
        if let Some(err) = &self.failed {
            problems.push(format!("{table}: cannot be read: {err}"));
        }
        problems
    }
}

/// Reads every readable row of `table` in rowid order, handing each to `each`; skips over
/// stretches SQLite refuses to read.
async fn read_rows(
    conn: &mut SqliteConnection,
    table: &'static str,
    columns: &'static str,
    mut each: impl FnMut(&SqliteRow),
) -> Read {
    let sql = format!(
        "SELECT rowid AS rowid_, {columns} FROM {table} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2"
    );
    let query = |after: i64, limit: i64| {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(after)
            .bind(limit)
    };
    let rowid = |row: &SqliteRow| row.try_get::<i64, _>("rowid_").unwrap_or(i64::MAX);
    let mut read = Read::default();
    // Every table's rowids start at 1.
    let mut after = 0i64;
    // Rows asked for at once: after a failure one at a time, growing back while reads work.
    let mut limit = READ_CHUNK;
    loop {
        let err = match query(after, limit).fetch_all(&mut *conn).await {
            Ok(rows) if rows.is_empty() => return read,
            Ok(rows) => {
                rows.iter().for_each(&mut each);
                after = rows.last().map_or(i64::MAX, rowid);
                limit = (limit * 2).min(READ_CHUNK);
                continue;
            }
            // A chunk may fail on a damaged page well after rows that read fine.
            Err(_) if limit > 1 => {
                limit = 1;
                continue;
            }
            Err(err) => err,
        };
        // A damaged stretch: look further and further ahead until SQLite reads again.
        let mut step = 1i64;
        loop {
            if step > LONGEST_SKIP {
                read.unreadable.push((after + 1, i64::MAX));
                read.failed = Some(err.to_string());
                return read;
            }
            match query(after.saturating_add(step), 1)
                .fetch_all(&mut *conn)
                .await
            {
                Ok(rows) => match rows.first().map(rowid) {
                    Some(next) => {
                        read.unreadable.push((after + 1, next - 1));
                        after = next - 1;
                        break;
                    }
                    None => {
                        read.unreadable.push((after + 1, after + step));
                        return read;
                    }
                },
                Err(_) => step = step.saturating_mul(2),
            }
        }
    }
}

/// A copy of the damaged file (and its WAL) that salvage reads, so the damaged file itself is
/// never written. In the copy, the header's page count is cleared: SQLite then sizes the
/// database by the file, so a file cut short still reads up to where it was cut (otherwise
/// every read fails once the file is shorter than its header says). Removed when dropped.
struct ReadingCopy {
    path: PathBuf,
}

impl ReadingCopy {
    fn of(damaged: &Path) -> Result<ReadingCopy, OutboxError> {
        use std::io::{Seek, SeekFrom, Write};
        let path = PathBuf::from(format!("{}.reading", damaged.display()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| {
                OutboxError::DataDir(crate::data_dir::DataDirError::Io {
                    doing: "copying for salvage",
                    path,
                    source,
                })
            }
        };
        std::fs::copy(damaged, &path).map_err(io(&path))?;
        let wal = PathBuf::from(format!("{}-wal", damaged.display()));
        if wal.exists() {
            let copy = PathBuf::from(format!("{}-wal", path.display()));
            std::fs::copy(&wal, &copy).map_err(io(&copy))?;
        }
        let copy = ReadingCopy { path };
        // Bytes 28..32 of the header: the database size in pages (0: use the file's size).
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&copy.path)
            .map_err(io(&copy.path))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) >= 32 {
            file.seek(SeekFrom::Start(28))
                .and_then(|_| file.write_all(&[0, 0, 0, 0]))
                .map_err(io(&copy.path))?;
        }
        Ok(copy)
    }
}

impl Drop for ReadingCopy {
    fn drop(&mut self) {
        for companion in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{companion}", self.path.display()));
        }
    }
}

/// A stamp for the damaged file's new name, sortable and free of ':' (`20261201T170830Z`).
fn stamp() -> String {
    Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

impl Outbox {
    /// Queues an event read from a damaged outbox again (a new seq; ingest ignores duplicates).
    async fn requeue(&self, event: Event) -> Result<(), OutboxError> {
        let mut tx = self.pool.begin().await?;
        self.enqueue_in(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps a dead letter (or an undecodable row) read from a damaged outbox.
    async fn keep_dead_letter(
        &self,
        seq: i64,
        result_id: &str,
        kind: &str,
        payload: &str,
        reason: &str,
    ) -> Result<(), OutboxError> {
        sqlx::query(
            "INSERT INTO dead_letters (seq, result_id, kind, payload, reason, enqueued_at, dead_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )
        .bind(seq)
        .bind(result_id)
        .bind(kind)
        .bind(payload)
        .bind(reason)
        .bind(micros_now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Why salvage will not start now.
fn busy(dir: &DataDir, why: String) -> OutboxError {
    OutboxError::Busy {
        dir: dir.path().to_path_buf(),
        why,
    }
}

/// Moves the damaged outbox of `dir` aside and starts a fresh one holding everything that can
/// still be read (see the module's documentation).
pub async fn salvage(
    dir: &Path,
    synchronous: Synchronous,
    cap_bytes: u64,
) -> Result<SalvageReport, OutboxError> {
    let data_dir = DataDir::create(dir)?;
    // No other agent process may use the file meanwhile: not a sender, not a running run.
    let _sending = data_dir.try_sender_lock()?.ok_or_else(|| {
        busy(
            &data_dir,
            "a kanade-agent process is sending from it (the daemon?): stop it first".into(),
        )
    })?;
    let running = data_dir.runs_in_progress()?;
    if !running.is_empty() {
        return Err(busy(
            &data_dir,
            format!(
                "{} run(s) are still running in agent processes on it: let them end or stop them",
                running.len()
            ),
        ));
    }
    let moved_to = data_dir.move_outbox_aside(&format!("damaged-{}", stamp()))?;
    let fresh = Outbox::open(dir, synchronous, cap_bytes).await?;
    let mut report = SalvageReport {
        moved_to: moved_to.clone(),
        recovered_events: 0,
        interrupted_runs: 0,
        dead_letters: 0,
        undecodable: 0,
        unreadable: Vec::new(),
        nothing_readable: false,
    };
    let copy = ReadingCopy::of(&moved_to)?;
    let Ok(mut damaged) = open_read_only(&copy.path).await else {
        report.nothing_readable = true;
        return Ok(report);
    };

    // The queue: decodable events are queued again, the rest kept as dead letters.
    let mut events = Vec::new();
    let mut undecodable = Vec::new();
    let read = read_rows(
        &mut damaged,
        "outbox",
        "seq, result_id, kind, payload",
        |row| {
            let payload: String = row.try_get("payload").unwrap_or_default();
            match serde_json::from_str::<Event>(&payload) {
                Ok(event) => events.push(event),
                Err(err) => undecodable.push((
                    row.try_get::<i64, _>("seq").unwrap_or_default(),
                    row.try_get::<String, _>("result_id").unwrap_or_default(),
                    row.try_get::<String, _>("kind").unwrap_or_default(),
                    payload,
                    format!("undecodable in the damaged outbox: {err}"),
                )),
            }
        },
    )
    .await;
    report.unreadable = read.unreadable;
    report.nothing_readable = events.is_empty() && undecodable.is_empty() && read.failed.is_some();
    for event in events {
        fresh.requeue(event).await?;
        report.recovered_events += 1;
    }
    for (seq, result_id, kind, payload, reason) in &undecodable {
        fresh
            .keep_dead_letter(*seq, result_id, kind, payload, reason)
            .await?;
        report.undecodable += 1;
    }

    // Runs in progress: their processes are gone (no run lock is held), so they are reported
    // INTERRUPTED, as the next agent would have.
    let mut journal = Vec::new();
    read_rows(&mut damaged, "runs", "started, trace_context", |row| {
        let started = row.try_get::<String, _>("started").ok();
        let trace: BTreeMap<String, String> = row
            .try_get::<String, _>("trace_context")
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if let Some(started) = started.and_then(|s| serde_json::from_str::<EventStarted>(&s).ok()) {
            journal.push((started, trace));
        }
    })
    .await;
    let noticed_at = Utc::now().trunc_subsecs(6);
    for (started, trace_context) in journal {
        fresh
            .requeue(Event {
                seq: 0,
                body: EventBody::Result(interrupted(&started, noticed_at)),
                trace_context,
            })
            .await?;
        report.interrupted_runs += 1;
    }

    // Dead letters stay dead letters.
    let mut letters = Vec::new();
    read_rows(
        &mut damaged,
        "dead_letters",
        "seq, result_id, kind, payload, reason",
        |row| {
            let text = |c: &str| row.try_get::<String, _>(c).unwrap_or_default();
            letters.push((
                row.try_get::<i64, _>("seq").unwrap_or_default(),
                text("result_id"),
                text("kind"),
                text("payload"),
                text("reason"),
            ));
        },
    )
    .await;
    for (seq, result_id, kind, payload, reason) in &letters {
        fresh
            .keep_dead_letter(*seq, result_id, kind, payload, reason)
            .await?;
        report.dead_letters += 1;
    }
    fresh.wake_sender();
    Ok(report)
}
