//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so an acknowledged
//! event survives power loss here too.
//!
//! Timestamps are INTEGER microseconds since the Unix epoch and ids lowercase hyphenated text,
//! which sort exactly like PostgreSQL's `timestamptz` and `uuid`. A batch is one transaction of
//! single-row upserts: statements are cheap in-process, and a row may be touched twice.

use std::{str::FromStr, time::Duration as StdDuration};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::{
    AssertSqlSafe, FromRow,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
};
use uuid::Uuid;

use super::{
    CancelOutcome, CancelRequest, ConsoleSession, EndpointQuery, EndpointRow, ExecutionRow,
    FleetTotals, ListQuery, ManifestSummary, PendingCancel, PresenceWrite, ReadStore, RunWrite,
    Store, StoreError, SummaryQuery,
    sql::{
        self, Dialect, Param, Params, StoredEndpoint, StoredRun, StoredSummary, StoredTotals,
        bigint,
    },
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const POOL_SIZE: u32 = 4;
/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: StdDuration = StdDuration::from_secs(5);

const UPSERT: &str = concat!(
    "INSERT INTO execution_results AS r (result_id, request_id, exec_id, pc_id, manifest_id,
    version, timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes,
    stderr_dropped_bytes, started_at, finished_at, received_at, trace_id)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
",
    sql::merge_on_conflict!(),
    "
RETURNING result_id"
);

/// `execution_results` in an SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: std::path::PathBuf,
    /// An exclusive `flock` on the database file while this process serves it. SQLite's own
    /// locks are `fcntl` locks, which are independent of `flock`, so this never gets in SQLite's
    /// way; other processes only reading the file (tests, tools) are not affected.
    serving: std::sync::Mutex<Option<std::fs::File>>,
}

impl SqliteStore {
    /// Opens (creating when missing) the database a `sqlite://PATH` URL names.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let path = options.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            pool,
            path,
            serving: std::sync::Mutex::new(None),
        })
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| {
        StoreError::Other(sqlx::Error::Decode(
            format!("timestamp {us} µs is out of range").into(),
        ))
    })
}

fn read_endpoint(row: &SqliteRow) -> Result<EndpointRow, StoreError> {
    StoredEndpoint::<i64>::from_row(row)?.into_row(from_micros)
}

/// The presence upsert, one row per statement (see [`sql::presence_on_conflict`]).
fn presence_upsert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "INSERT INTO endpoints AS e (pc_id, first_seen, last_seen, connected, stream_id,
                replica, connected_since, agent_version, status_at, outbox_depth, outbox_bytes,
                oldest_pending_at, dead_letters, running_runs, hostname, os)
            VALUES (?1, ?6, ?6, ?7, ?2, ?3, ?4, ?5, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
            {}",
            sql::presence_on_conflict("?16", "max")
        )
    })
}

fn read_row(row: &SqliteRow) -> Result<ExecutionRow, StoreError> {
    StoredRun::<String, i64>::from_row(row)?
        .map(parse_id, from_micros)?
        .try_into()
}

/// SQLite's way of writing what differs between the stores.
struct Lite;

impl Dialect for Lite {
    fn placeholder(n: usize) -> String {
        format!("?{n}")
    }

    fn time_plus_micros(time: &str, micros: &str) -> String {
        format!("{time} + ({micros})")
    }

    fn micros_between(from: &str, to: &str) -> String {
        format!("({to} - {from})")
    }
}

/// A query with its parameters bound in SQLite's types.
fn bound(
    sql: String,
    params: Params,
) -> sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for p in params.values {
        q = match p {
            Param::Text(s) => q.bind(s),
            Param::Time(t) => q.bind(micros(t)),
            Param::Id(id) => q.bind(id.hyphenated().to_string()),
            Param::Int(n) => q.bind(n),
        };
    }
    q
}

fn parse_id(text: String) -> Result<Uuid, StoreError> {
    Uuid::try_parse(&text).map_err(|e| StoreError::Other(sqlx::Error::Decode(Box::new(e))))
}

#[async_trait]
impl ReadStore for SqliteStore {
    fn system(&self) -> &'static str {
        "sqlite"
    }

    async fn get(
        &self,
        result_id: Uuid,
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<Option<ExecutionRow>, StoreError> {
        let (sql, params) = sql::get_sql::<Lite>(result_id, now, lost_grace);
        let row = bound(sql, params).fetch_optional(&self.pool).await?;
        row.as_ref().map(read_row).transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<ExecutionRow>, StoreError> {
        let (sql, params) = sql::list_sql::<Lite>(query);
        let rows = bound(sql, params).fetch_all(&self.pool).await?;
        rows.iter().map(read_row).collect()
    }

    async fn finished_among(
        &self,
        result_ids: &[Uuid],
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<Vec<ExecutionRow>, StoreError> {
        if result_ids.is_empty() {
            return Ok(Vec::new());
        }
        let (sql, params) = sql::finished_among_sql::<Lite>(result_ids, now, lost_grace);
        let rows = bound(sql, params).fetch_all(&self.pool).await?;
        rows.iter().map(read_row).collect()
    }

    async fn summarize(&self, query: &SummaryQuery) -> Result<Vec<ManifestSummary>, StoreError> {
        let (sql, params) = sql::summary_sql::<Lite>(query);
        let rows = bound(sql, params).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let stored = StoredSummary::<String, i64>::from_row(row)?;
                Ok(StoredSummary {
                    last_failure_result_id: stored
                        .last_failure_result_id
                        .map(parse_id)
                        .transpose()?,
                    last_failure_at: stored.last_failure_at.map(from_micros).transpose()?,
                    manifest_id: stored.manifest_id,
                    runs: stored.runs,
                    running: stored.running,
                    succeeded: stored.succeeded,
                    failed: stored.failed,
                    lost: stored.lost,
                    p50: stored.p50,
                    p95: stored.p95,
                }
                .into_summary())
            })
            .collect()
    }

    async fn list_endpoints(&self, query: &EndpointQuery) -> Result<Vec<EndpointRow>, StoreError> {
        let (sql, params) = sql::endpoints_sql::<Lite>(query);
        let rows = bound(sql, params).fetch_all(&self.pool).await?;
        rows.iter().map(read_endpoint).collect()
    }

    async fn get_endpoint(
        &self,
        pc_id: &str,
        connected_after: DateTime<Utc>,
    ) -> Result<Option<EndpointRow>, StoreError> {
        let (sql, params) = sql::endpoint_sql::<Lite>(pc_id, connected_after);
        let row = bound(sql, params).fetch_optional(&self.pool).await?;
        row.as_ref().map(read_endpoint).transpose()
    }

    async fn fleet_totals(
        &self,
        connected_after: DateTime<Utc>,
    ) -> Result<FleetTotals, StoreError> {
        let (sql, params) = sql::fleet_totals_sql::<Lite>(connected_after);
        let row = bound(sql, params).fetch_one(&self.pool).await?;
        Ok(StoredTotals::from_row(&row)?.into())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn apply(
        &self,
        writes: &[RunWrite],
        received_at: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut applied = Vec::with_capacity(writes.len());
        let mut tx = self.pool.begin().await?;
        for w in writes {
            let o = w.outcome.as_ref();
            let returned = sqlx::query(UPSERT)
                .bind(w.result_id.hyphenated().to_string())
                .bind(&w.request_id)
                .bind(&w.exec_id)
                .bind(&w.pc_id)
                .bind(&w.manifest_id)
                .bind(&w.version)
                .bind(w.timeout_secs.map(i64::from))
                .bind(o.map(|o| o.status.as_str()))
                .bind(o.and_then(|o| o.exit_code))
                .bind(o.map(|o| o.stdout.as_str()))
                .bind(o.map(|o| o.stderr.as_str()))
                .bind(o.map(|o| bigint(o.stdout_dropped_bytes)))
                .bind(o.map(|o| bigint(o.stderr_dropped_bytes)))
                .bind(micros(w.started_at))
                .bind(o.map(|o| micros(o.finished_at)))
                .bind(micros(received_at))
                .bind(w.trace_id.as_deref())
                .fetch_optional(&mut *tx)
                .await?;
            applied.push(returned.is_some());
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn request_cancel(
        &self,
        result_id: Uuid,
        request: &CancelRequest,
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<CancelOutcome, StoreError> {
        let id = result_id.hyphenated().to_string();
        let mut tx = self.pool.begin().await?;
        let requested: Option<String> =
            sqlx::query_scalar(AssertSqlSafe(sql::cancel_sql::<Lite>()))
                .bind(&id)
                .bind(micros(request.at))
                .bind(&request.reason)
                .bind(&request.by)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(pc_id) = &requested {
            sqlx::query(
                "INSERT INTO pending_cancels (result_id, pc_id) VALUES (?1, ?2) \
                 ON CONFLICT (result_id) DO NOTHING",
            )
            .bind(&id)
            .bind(pc_id)
            .execute(&mut *tx)
            .await?;
        }
        let (sql, params) = sql::get_sql::<Lite>(result_id, now, lost_grace);
        let row = bound(sql, params).fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        let Some(run) = row.as_ref().map(read_row).transpose()? else {
            return Ok(CancelOutcome::NotFound);
        };
        Ok(match (requested, &run.outcome) {
            (Some(_), _) => CancelOutcome::Requested { run, first: true },
            (None, None) => CancelOutcome::Requested { run, first: false },
            (None, Some(_)) => CancelOutcome::Finished(run),
        })
    }

    async fn pending_cancels(&self, pc_ids: &[String]) -> Result<Vec<PendingCancel>, StoreError> {
        // A JSON array of the endpoints: one parameter however many there are.
        let wanted = serde_json::to_string(pc_ids).expect("strings always serialize");
        let rows: Vec<(String, String, Option<String>, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(sql::pending_cancels_sql(
                "AND p.pc_id IN (SELECT value FROM json_each(?1))",
            )))
            .bind(wanted)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(pc_id, result_id, reason, by)| {
                Ok(PendingCancel {
                    pc_id,
                    result_id: parse_id(result_id)?,
                    reason: reason.unwrap_or_default(),
                    by: by.unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn forget_settled_cancels(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(sql::FORGET_SETTLED_CANCELS)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn write_presence(
        &self,
        writes: &[PresenceWrite],
        stale_before: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for w in writes {
            let r = w.report.as_ref();
            sqlx::query(presence_upsert())
                .bind(&w.pc_id)
                .bind(w.stream_id.hyphenated().to_string())
                .bind(&w.replica)
                .bind(micros(w.connected_since))
                .bind(&w.agent_version)
                .bind(micros(w.seen_at))
                .bind(w.connected)
                .bind(r.map(|r| micros(r.at)))
                .bind(r.map(|r| bigint(r.outbox_depth)))
                .bind(r.map(|r| bigint(r.outbox_bytes)))
                .bind(r.and_then(|r| r.oldest_pending_at).map(micros))
                .bind(r.map(|r| bigint(r.dead_letters)))
                .bind(r.map(|r| i64::from(r.running_runs)))
                .bind(r.map(|r| r.hostname.as_str()))
                .bind(r.map(|r| r.os.as_str()))
                .bind(micros(stale_before))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn forget_endpoints_seen_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM endpoints WHERE last_seen < ?1")
            .bind(micros(cutoff))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn delete_received_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM execution_results WHERE result_id IN \
             (SELECT result_id FROM execution_results WHERE received_at < ?1 LIMIT ?2)",
        )
        .bind(micros(cutoff))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn open_session(&self, session: &ConsoleSession) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, token_sha256, csrf, expires_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&session.id_sha256)
        .bind(&session.token_sha256)
        .bind(&session.csrf)
        .bind(micros(session.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session(
        &self,
        id_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT id_sha256, token_sha256, csrf, expires_at FROM console_sessions \
             WHERE id_sha256 = ?1 AND expires_at > ?2",
        )
        .bind(id_sha256)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(id_sha256, token_sha256, csrf, expires_at)| {
            Ok(ConsoleSession {
                id_sha256,
                token_sha256,
                csrf,
                expires_at: from_micros(expires_at)?,
            })
        })
        .transpose()
    }

    async fn end_session(&self, id_sha256: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = ?1")
            .bind(id_sha256)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_expired_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE expires_at <= ?1")
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    fn claim_for_serving(&self) -> Result<(), StoreError> {
        let path = self.path.display().to_string();
        let file = std::fs::File::open(&self.path).map_err(|source| StoreError::Lock {
            path: path.clone(),
            source,
        })?;
        match file.try_lock() {
            Ok(()) => {
                *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path }),
            Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Lock { path, source }),
        }
    }
}
