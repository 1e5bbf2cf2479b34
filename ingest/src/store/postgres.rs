//! The production store: PostgreSQL through sqlx's runtime query API.
//!
//! A batch is one transaction of `INSERT … SELECT FROM UNNEST(arrays) ON CONFLICT DO UPDATE`: one
//! statement whatever the batch size (no bind-parameter limit, one prepared plan), rows in the
//! order given (the batcher sorts by `result_id`, so concurrent batches lock rows in one order
//! and cannot deadlock). A write that would change nothing (a resend) is answered from a
//! primary-key probe and never touches its row: no new row version, no WAL.

use std::{str::FromStr, time::Duration as StdDuration};

use async_trait::async_trait;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use kanade_shared::backoff::Backoff;
use sqlx::{
    AssertSqlSafe, FromRow, Row,
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    CancelOutcome, CancelRequest, ConsoleSession, DroppedDays, EndpointQuery, EndpointRow,
    ExecutionRow, FleetTotals, Heard, ListQuery, ManifestSummary, PendingCancel, PresenceWrite,
    ReadStore, RunWrite, Store, StoreError, SummaryQuery,
    sql::{
        self, Dialect, Param, Params, StoredEndpoint, StoredRun, StoredSummary, StoredTotals,
        bigint,
    },
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections in the pool: up to half of them write the batches in flight
/// ([`crate::config::MAX_COMMITS_IN_FLIGHT`]); the rest serve Activity queries, health,
/// retention and the commit publisher and listener.
const POOL_SIZE: u32 = 8;
/// How long a caller waits for a pooled connection before the store counts as unavailable.
const ACQUIRE_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// Memory PostgreSQL may sort in for a manifest summary.
const SUMMARY_WORK_MEM: &str = "128MB";
/// The advisory lock replicas take turns on to create and drop day partitions.
const PARTITIONS_LOCK: i64 = 0x6b61_6e61_6465_7031; // "kanadep1"
/// Retries of `LISTEN` after the connection it was on was lost.
const LISTEN_BACKOFF: Backoff = Backoff {
    base: StdDuration::from_millis(200),
    cap: StdDuration::from_secs(5),
};
/// How long dropping a day's partition may wait for the queries using `execution_results`.
/// The drop needs the table to itself for a moment, and writers queue behind a waiting drop, so
/// this is the longest retention can hold them up; a busier table keeps the day until the next
/// sweep.
const DROP_LOCK_TIMEOUT: StdDuration = StdDuration::from_millis(500);
/// SQLSTATE `lock_not_available`: `lock_timeout` expired.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// How long the server keeps a transaction of ours that stopped talking (see `connect`).
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 5_000;

const UPSERT: &str = concat!(
    "WITH u AS (
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::int8[], $8::text[], $9::int4[], $10::text[], $11::text[], $12::int8[], $13::int8[],
        $14::timestamptz[], $15::timestamptz[], $17::text[]) WITH ORDINALITY
        AS u(result_id, request_id, exec_id, pc_id, manifest_id, version, timeout_secs, status,
        exit_code, stdout, stderr, stdout_dropped_bytes, stderr_dropped_bytes, started_at,
        finished_at, trace_id, ord)
),
-- The runs already stored, probed once each: whose they are, and whether this write would
-- change anything. A write that would not (a resend of what the row holds) is answered without
-- touching the row, and one for another endpoint's run is left out: neither makes a row
-- version, a row lock or WAL, so a redelivery storm costs reads, not writes. `unchanged`
-- holds exactly when the merge (sql::merge_on_conflict!) would leave every column as it is.
known AS (
    SELECT u.result_id, e.pc_id = u.pc_id AS ours,
        (u.status IS NULL OR e.status IS NOT NULL)
        AND (u.timeout_secs IS NULL OR e.timeout_secs IS NOT NULL)
        AND (u.version = '' OR e.version <> '')
        AND (u.trace_id IS NULL OR e.trace_id IS NOT NULL) AS unchanged
    FROM u, LATERAL (
        -- LIMIT keeps this a primary-key probe per write, never a join over the table.
        SELECT e.pc_id, e.status, e.timeout_secs, e.version, e.trace_id
        FROM execution_results e WHERE e.result_id = u.result_id LIMIT 1) e
),
written AS (
    INSERT INTO execution_results AS r (result_id, request_id, exec_id, pc_id, manifest_id,
        version, timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes,
        stderr_dropped_bytes, started_at, finished_at, received_at, trace_id)
    SELECT u.result_id, u.request_id, u.exec_id, u.pc_id, u.manifest_id, u.version,
        u.timeout_secs, u.status, u.exit_code, u.stdout, u.stderr, u.stdout_dropped_bytes,
        u.stderr_dropped_bytes, u.started_at, u.finished_at, $16, u.trace_id
    FROM u WHERE u.result_id NOT IN (SELECT result_id FROM known WHERE unchanged OR NOT ours)
    ORDER BY u.ord
",
    sql::merge_on_conflict!(),
    "
    RETURNING r.result_id
)
SELECT result_id FROM written
UNION ALL SELECT result_id FROM known WHERE ours AND unchanged"
);

/// `execution_results` in PostgreSQL.
#[derive(Debug)]
pub struct PostgresStore {
    /// Replaced wholesale by [`Store::discard_connections`].
    pool: std::sync::RwLock<PgPool>,
    options: PgConnectOptions,
}

fn lazy_pool(options: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone())
}

impl PostgresStore {
    /// Connects lazily: the store exists even while the database is down, and health reports it.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_as(url, "kanade-ingest", false)
    }

    /// Connects lazily, its sessions named `application_name`. A store for reads only
    /// (`read_only`, on a streaming replica: `--read-database-url`) has read-only sessions
    /// (`default_transaction_read_only`), so even a replica promoted to primary is never written
    /// through it.
    pub fn connect_as(
        url: &str,
        application_name: &str,
        read_only: bool,
    ) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name(application_name)
            // A transaction whose client went silent mid-commit would hold its row locks for as
            // long as the TCP connection looks alive, blocking every retry of the same rows.
            // Kanade's transactions never idle between statements, so the server may end any
            // that does after a few seconds.
            .options([
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT_MS.to_string(),
                ),
                (
                    "default_transaction_read_only",
                    if read_only { "on" } else { "off" }.to_string(),
                ),
            ]);
        Ok(PostgresStore {
            pool: std::sync::RwLock::new(lazy_pool(&options)),
            options,
        })
    }

    /// The plan PostgreSQL runs for a listing, with what it did (`EXPLAIN (ANALYZE, BUFFERS)`),
    /// for the benchmark's report of cases over target.
    pub async fn explain_list(&self, query: &ListQuery) -> Result<String, StoreError> {
        let (sql, params) = sql::list_sql::<Pg>(query);
        self.explain(sql, params, false).await
    }

    /// Like [`PostgresStore::explain_list`], for the manifest summary.
    pub async fn explain_summary(&self, query: &SummaryQuery) -> Result<String, StoreError> {
        let (sql, params) = summary_sql(query);
        self.explain(sql, params, true).await
    }

    async fn explain(
        &self,
        sql: String,
        params: Params,
        summary: bool,
    ) -> Result<String, StoreError> {
        // Under the settings the query itself runs with.
        let mut tx = self.pool().begin().await?;
        if summary {
            summary_settings(&mut tx).await?;
        }
        let rows = bound(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), params)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The pool (a cheap handle), for the operations, tests and the benchmark.
    pub fn pool(&self) -> PgPool {
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The session settings of a manifest summary, for the transaction it runs in.
async fn summary_settings(tx: &mut sqlx::PgTransaction<'_>) -> Result<(), StoreError> {
    // The percentiles sort a day's durations (tens of MB for hundreds of thousands of runs): in
    // memory, not in temporary files (PostgreSQL's default work_mem is 4 MB).
    sqlx::query(AssertSqlSafe(format!(
        "SET LOCAL work_mem = '{SUMMARY_WORK_MEM}'"
    )))
    .execute(&mut **tx)
    .await?;
    // The plan's cost is above jit_above_cost, and compiling it took 450 of a 950 ms summary
    // over a day of 10 million runs (kanade-bench activity's EXPLAIN, JIT "Emission 382 ms"):
    // far more than it saves on a query this short.
    sqlx::query("SET LOCAL jit = off")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Splits writes into rounds in which every key (the row a write touches) appears once:
/// PostgreSQL refuses to touch one row twice in a statement. Almost every batch is a single round.
fn rounds<K: std::hash::Hash + Eq>(keys: impl IntoIterator<Item = K>) -> Vec<Vec<usize>> {
    let keys = keys.into_iter();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen = std::collections::HashMap::with_capacity(keys.size_hint().0);
    for (i, key) in keys.enumerate() {
        let round = seen.entry(key).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    rounds
}

fn read_row(row: &PgRow) -> Result<ExecutionRow, StoreError> {
    StoredRun::<Uuid, DateTime<Utc>>::from_row(row)?.try_into()
}

fn read_endpoint(row: &PgRow) -> Result<EndpointRow, StoreError> {
    StoredEndpoint::<DateTime<Utc>>::from_row(row)?.into_row(Ok)
}

/// The presence upsert: one statement per batch (see [`sql::presence_on_conflict`]).
fn presence_upsert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "INSERT INTO endpoints AS e (pc_id, first_seen, last_seen, connected, stream_id,
                replica, connected_since, agent_version, status_at, outbox_depth, outbox_bytes,
                oldest_pending_at, dead_letters, running_runs, hostname, os)
            SELECT u.pc_id, u.last_seen, u.last_seen, u.connected, u.stream_id, u.replica,
                u.connected_since, u.agent_version, u.status_at, u.outbox_depth, u.outbox_bytes,
                u.oldest_pending_at, u.dead_letters, u.running_runs, u.hostname, u.os
            FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[],
                $6::timestamptz[], $7::bool[], $8::timestamptz[], $9::int8[], $10::int8[],
                $11::timestamptz[], $12::int8[], $13::int4[], $14::text[], $15::text[])
                AS u({})
            {}",
            sql::PRESENCE_COLUMNS,
            sql::presence_on_conflict("$16", "GREATEST")
        )
    })
}

/// PostgreSQL's way of writing what differs between the stores.
struct Pg;

impl Dialect for Pg {
    fn placeholder(n: usize) -> String {
        format!("${n}")
    }

    fn time_plus_micros(time: &str, micros: &str) -> String {
        format!("{time} + ({micros}) * interval '1 microsecond'")
    }

    fn micros_between(from: &str, to: &str) -> String {
        format!("(EXTRACT(EPOCH FROM ({to} - {from})) * 1000000)::bigint")
    }
}

/// The manifest summary the way PostgreSQL computes it fastest: one pass of hashed aggregates
/// with `FILTER`, each manifest's durations gathered into an array, both percentiles from one
/// ordered-set aggregate over that array (`percentile_disc`: the same definition SQLite's window
/// functions compute in [`sql::summary_sql`], so both stores answer the same), and the newest
/// failures from the few failed rows. An ordered-set aggregate straight over the rows would make
/// PostgreSQL sort the whole window by manifest first (a day of 10 million runs: 334,000 rows,
/// 43 MB, about 40 % of the query); sorting each manifest's durations on its own is cheap.
fn summary_sql(query: &SummaryQuery) -> (String, Params) {
    let (filters, deadline, params) = sql::summary_window::<Pg>(query);
    let now = &params.now;
    let sql = format!(
        "WITH counts AS (
            SELECT manifest_id, count(*) AS runs,
                count(*) FILTER (WHERE status IS NULL AND {deadline} >= {now}) AS running,
                count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                count(*) FILTER (WHERE status IS NOT NULL AND status <> 'succeeded') AS failed,
                count(*) FILTER (WHERE status IS NULL AND {deadline} < {now}) AS lost,
                array_agg(finished_at - started_at) FILTER (WHERE status IS NOT NULL)
                    AS durations
            FROM execution_results WHERE {filters} GROUP BY manifest_id
        ),
        failures AS (
            SELECT DISTINCT ON (manifest_id) manifest_id, result_id, finished_at
            FROM execution_results
            WHERE {filters} AND status IS NOT NULL AND status <> 'succeeded'
            ORDER BY manifest_id, finished_at DESC, result_id DESC
        )
        SELECT c.manifest_id, c.runs, c.running, c.succeeded, c.failed, c.lost,
            (EXTRACT(EPOCH FROM p.percentiles[1]) * 1000000)::bigint AS p50,
            (EXTRACT(EPOCH FROM p.percentiles[2]) * 1000000)::bigint AS p95,
            f.result_id AS last_failure_result_id, f.finished_at AS last_failure_at
        FROM counts c
        CROSS JOIN LATERAL (
            SELECT percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d) AS percentiles
            FROM unnest(c.durations) d
        ) p
        LEFT JOIN failures f ON f.manifest_id = c.manifest_id
        ORDER BY c.manifest_id",
        filters = filters.join(" AND "),
    );
    (sql, params.values)
}

/// A query with its parameters bound in PostgreSQL's types.
fn bound(
    sql: String,
    params: Params,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for p in params.values {
        q = match p {
            Param::Text(s) => q.bind(s),
            Param::Time(t) => q.bind(t),
            Param::Id(id) => q.bind(id),
            Param::Int(n) => q.bind(n),
        };
    }
    q
}

#[async_trait]
impl ReadStore for PostgresStore {
    fn system(&self) -> &'static str {
        "postgresql"
    }

    async fn get(
        &self,
        result_id: Uuid,
        now: DateTime<Utc>,
        lost_grace: Duration,
    ) -> Result<Option<ExecutionRow>, StoreError> {
        let (sql, params) = sql::get_sql::<Pg>(result_id, now, lost_grace);
        let row = bound(sql, params).fetch_optional(&self.pool()).await?;
        row.as_ref().map(read_row).transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<ExecutionRow>, StoreError> {
        let (sql, params) = sql::list_sql::<Pg>(query);
        let rows = bound(sql, params).fetch_all(&self.pool()).await?;
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
        let (sql, params) = sql::finished_among_sql::<Pg>(result_ids, now, lost_grace);
        let rows = bound(sql, params).fetch_all(&self.pool()).await?;
        rows.iter().map(read_row).collect()
    }

    async fn summarize(&self, query: &SummaryQuery) -> Result<Vec<ManifestSummary>, StoreError> {
        let (sql, params) = summary_sql(query);
        let mut tx = self.pool().begin().await?;
        summary_settings(&mut tx).await?;
        let rows = bound(sql, params).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| Ok(StoredSummary::<Uuid, DateTime<Utc>>::from_row(row)?.into_summary()))
            .collect()
    }

    async fn list_endpoints(&self, query: &EndpointQuery) -> Result<Vec<EndpointRow>, StoreError> {
        let (sql, params) = sql::endpoints_sql::<Pg>(query);
        let rows = bound(sql, params).fetch_all(&self.pool()).await?;
        rows.iter().map(read_endpoint).collect()
    }

    async fn get_endpoint(
        &self,
        pc_id: &str,
        connected_after: DateTime<Utc>,
    ) -> Result<Option<EndpointRow>, StoreError> {
        let (sql, params) = sql::endpoint_sql::<Pg>(pc_id, connected_after);
        let row = bound(sql, params).fetch_optional(&self.pool()).await?;
        row.as_ref().map(read_endpoint).transpose()
    }

    async fn fleet_totals(
        &self,
        connected_after: DateTime<Utc>,
    ) -> Result<FleetTotals, StoreError> {
        let (sql, params) = sql::fleet_totals_sql::<Pg>(connected_after);
        let row = bound(sql, params).fetch_one(&self.pool()).await?;
        Ok(StoredTotals::from_row(&row)?.into())
    }

    fn discard_connections(&self) {
        // Connections that went silent stay "open" forever (no FIN, no RST); the pool would keep
        // handing them out. A fresh pool connects anew; the old one's connections close as the
        // last handles to them drop.
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = lazy_pool(&self.options);
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool()).await?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx holds a PostgreSQL advisory lock while it migrates, so replicas starting together
        // take turns and all but the first find nothing to do.
        MIGRATOR.run(&self.pool()).await?;
        Ok(())
    }

    async fn apply(
        &self,
        writes: &[RunWrite],
        received_at: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut applied = vec![false; writes.len()];
        let mut tx = self.pool().begin().await?;
        for round in rounds(writes.iter().map(|w| w.result_id)) {
            let rows: Vec<&RunWrite> = round.iter().map(|&i| &writes[i]).collect();
            let outcome =
                |f: &dyn for<'o> Fn(&'o super::RunOutcome) -> &'o str| -> Vec<Option<&str>> {
                    rows.iter().map(|w| w.outcome.as_ref().map(f)).collect()
                };
            let returned: Vec<Uuid> = sqlx::query_scalar(UPSERT)
                .bind(rows.iter().map(|w| w.result_id).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.request_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(rows.iter().map(|w| w.exec_id.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|w| w.pc_id.as_str()).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.manifest_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(rows.iter().map(|w| w.version.as_str()).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.timeout_secs.map(i64::from))
                        .collect::<Vec<_>>(),
                )
                .bind(outcome(&|o| o.status.as_str()))
                .bind(
                    rows.iter()
                        .map(|w| w.outcome.as_ref().and_then(|o| o.exit_code))
                        .collect::<Vec<_>>(),
                )
                .bind(outcome(&|o| o.stdout.as_str()))
                .bind(outcome(&|o| o.stderr.as_str()))
                .bind(
                    rows.iter()
                        .map(|w| w.outcome.as_ref().map(|o| bigint(o.stdout_dropped_bytes)))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|w| w.outcome.as_ref().map(|o| bigint(o.stderr_dropped_bytes)))
                        .collect::<Vec<_>>(),
                )
                .bind(rows.iter().map(|w| w.started_at).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.outcome.as_ref().map(|o| o.finished_at))
                        .collect::<Vec<_>>(),
                )
                .bind(received_at)
                .bind(
                    rows.iter()
                        .map(|w| w.trace_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await?;
            let returned: std::collections::HashSet<Uuid> = returned.into_iter().collect();
            for &i in &round {
                applied[i] = returned.contains(&writes[i].result_id);
            }
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
        let mut tx = self.pool().begin().await?;
        let requested: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql::cancel_sql::<Pg>()))
            .bind(result_id)
            .bind(request.at)
            .bind(&request.reason)
            .bind(&request.by)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(pc_id) = &requested {
            sqlx::query(
                "INSERT INTO pending_cancels (result_id, pc_id) VALUES ($1, $2) \
                 ON CONFLICT (result_id) DO NOTHING",
            )
            .bind(result_id)
            .bind(pc_id)
            .execute(&mut *tx)
            .await?;
        }
        let (sql, params) = sql::get_sql::<Pg>(result_id, now, lost_grace);
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
        let rows: Vec<(String, Uuid, Option<String>, Option<String>)> = sqlx::query_as(
            AssertSqlSafe(sql::pending_cancels_sql("AND p.pc_id = ANY($1)")),
        )
        .bind(pc_ids)
        .fetch_all(&self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(pc_id, result_id, reason, by)| PendingCancel {
                pc_id,
                result_id,
                reason: reason.unwrap_or_default(),
                by: by.unwrap_or_default(),
            })
            .collect())
    }

    async fn forget_settled_cancels(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(sql::FORGET_SETTLED_CANCELS)
            .execute(&self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    async fn write_presence(
        &self,
        writes: &[PresenceWrite],
        stale_before: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        for round in rounds(writes.iter().map(|w| w.pc_id.as_str())) {
            let rows: Vec<&PresenceWrite> = round.iter().map(|&i| &writes[i]).collect();
            let column = |f: &dyn Fn(&PresenceWrite) -> Option<i64>| -> Vec<Option<i64>> {
                rows.iter().map(|w| f(w)).collect()
            };
            sqlx::query(presence_upsert())
                .bind(rows.iter().map(|w| w.pc_id.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|w| w.stream_id).collect::<Vec<_>>())
                .bind(rows.iter().map(|w| w.replica.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|w| w.connected_since).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.agent_version.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(rows.iter().map(|w| w.seen_at).collect::<Vec<_>>())
                .bind(rows.iter().map(|w| w.connected).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|w| w.report.as_ref().map(|r| r.at))
                        .collect::<Vec<_>>(),
                )
                .bind(column(&|w| {
                    w.report.as_ref().map(|r| bigint(r.outbox_depth))
                }))
                .bind(column(&|w| {
                    w.report.as_ref().map(|r| bigint(r.outbox_bytes))
                }))
                .bind(
                    rows.iter()
                        .map(|w| w.report.as_ref().and_then(|r| r.oldest_pending_at))
                        .collect::<Vec<_>>(),
                )
                .bind(column(&|w| {
                    w.report.as_ref().map(|r| bigint(r.dead_letters))
                }))
                .bind(
                    rows.iter()
                        .map(|w| {
                            w.report
                                .as_ref()
                                .map(|r| i32::try_from(r.running_runs).unwrap_or(i32::MAX))
                        })
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|w| w.report.as_ref().map(|r| r.hostname.as_str()))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|w| w.report.as_ref().map(|r| r.os.as_str()))
                        .collect::<Vec<_>>(),
                )
                .bind(stale_before)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn forget_endpoints_seen_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM endpoints WHERE last_seen < $1")
            .bind(cutoff)
            .execute(&self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    async fn delete_received_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // The day partitions are dropped whole; only the default partition goes row by row.
        let done = sqlx::query(
            "DELETE FROM execution_results_default WHERE result_id IN \
             (SELECT result_id FROM execution_results_default WHERE received_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        self.notify_all(&[(channel.to_string(), payload.to_string())])
            .await
    }

    async fn notify_all(&self, notices: &[(String, String)]) -> Result<(), StoreError> {
        let (channels, payloads): (Vec<&str>, Vec<&str>) = notices
            .iter()
            .map(|(c, p)| (c.as_str(), p.as_str()))
            .unzip();
        // Bounded like every other call on the pool: a connection gone silent must not hold
        // the caller (or shutdown) forever.
        let sent = tokio::time::timeout(
            ACQUIRE_TIMEOUT,
            sqlx::query(
                "SELECT pg_notify(n.channel, n.payload) \
                 FROM unnest($1::text[], $2::text[]) AS n(channel, payload)",
            )
            .bind(channels)
            .bind(payloads)
            .execute(&self.pool()),
        )
        .await;
        match sent {
            Ok(done) => {
                done?;
                Ok(())
            }
            Err(_) => {
                self.discard_connections();
                Err(StoreError::CommitTimedOut(ACQUIRE_TIMEOUT))
            }
        }
    }

    async fn listen(
        &self,
        channels: &[String],
        heard: tokio::sync::mpsc::Sender<Heard>,
        stop: CancellationToken,
    ) {
        let mut attempt = 0;
        loop {
            let listened = async {
                let mut listener = PgListener::connect_with(&self.pool()).await?;
                listener
                    .listen_all(channels.iter().map(String::as_str))
                    .await?;
                if heard.send(Heard::Listening).await.is_err() {
                    return Ok(());
                }
                loop {
                    // `Ok(None)`: the connection was lost and is re-established at the next
                    // call; what was sent meanwhile is gone.
                    let said = match listener.try_recv().await? {
                        Some(n) => Heard::Notified {
                            channel: n.channel().to_string(),
                            payload: n.payload().to_string(),
                        },
                        None => Heard::Listening,
                    };
                    if heard.send(said).await.is_err() {
                        return Ok(());
                    }
                }
            };
            tokio::select! {
                ended = listened => match ended {
                    Ok(()) => return,
                    Err(err) => {
                        let err: sqlx::Error = err;
                        tracing::warn!(error = %err, "listening to other replicas failed; retrying");
                    }
                },
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(LISTEN_BACKOFF.next_delay(attempt)) => {}
                _ = stop.cancelled() => return,
            }
            attempt += 1;
        }
    }

    fn max_writers(&self) -> usize {
        crate::config::MAX_COMMITS_IN_FLIGHT
    }

    async fn open_session(&self, session: &ConsoleSession) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, token_sha256, csrf, expires_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&session.id_sha256)
        .bind(&session.token_sha256)
        .bind(&session.csrf)
        .bind(session.expires_at)
        .execute(&self.pool())
        .await?;
        Ok(())
    }

    async fn session(
        &self,
        id_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        let row: Option<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id_sha256, token_sha256, csrf, expires_at FROM console_sessions \
             WHERE id_sha256 = $1 AND expires_at > $2",
        )
        .bind(id_sha256)
        .bind(now)
        .fetch_optional(&self.pool())
        .await?;
        Ok(row.map(
            |(id_sha256, token_sha256, csrf, expires_at)| ConsoleSession {
                id_sha256,
                token_sha256,
                csrf,
                expires_at,
            },
        ))
    }

    async fn end_session(&self, id_sha256: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
            .bind(id_sha256)
            .execute(&self.pool())
            .await?;
        Ok(())
    }

    async fn delete_expired_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    async fn prepare_days(&self, today: NaiveDate, days_ahead: u32) -> Result<u32, StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITIONS_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut created = 0;
        for ahead in 0..=days_ahead {
            let day = today + chrono::Days::new(u64::from(ahead));
            let new: bool = sqlx::query_scalar("SELECT kanade_ensure_day_partition($1)")
                .bind(day)
                .fetch_one(&mut *tx)
                .await?;
            created += u32::from(new);
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn drop_days_before(&self, cutoff: DateTime<Utc>) -> Result<DroppedDays, StoreError> {
        let pool = self.pool();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'execution_results'::regclass \
             AND c.relname LIKE 'execution_results_p%' ORDER BY c.relname",
        )
        .fetch_all(&pool)
        .await?;
        let mut days = DroppedDays::default();
        for (name, day) in names
            .iter()
            .filter_map(|name| Some((name, day_of_partition(name)?)))
            // Whole days only: the day's last instant is before the cutoff.
            .filter(|(_, day)| {
                day.succ_opt()
                    .is_some_and(|next| next <= cutoff.date_naive())
            })
        {
            // A busy table is not tried again in the same sweep: each try could hold the
            // writers up once more.
            if !days.postponed.is_empty() {
                days.postponed.push(day);
                continue;
            }
            // One transaction per day: the table is the sweep's alone only for one day's
            // catalog change, the same for a day of any size (the day's files are removed
            // after the commit, when nothing waits for them).
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PARTITIONS_LOCK)
                .execute(&mut *tx)
                .await?;
            // Another replica may have dropped it between the listing and the lock.
            let still_there: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if !still_there {
                continue;
            }
            sqlx::query(AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = '{}ms'",
                DROP_LOCK_TIMEOUT.as_millis()
            )))
            .execute(&mut *tx)
            .await?;
            let dropped = sqlx::query(AssertSqlSafe(format!("DROP TABLE {name}")))
                .execute(&mut *tx)
                .await;
            match dropped {
                Ok(_) => {
                    tx.commit().await?;
                    days.dropped.push(day);
                }
                Err(sqlx::Error::Database(db))
                    if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                {
                    days.postponed.push(day);
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(days)
    }
}

/// The day (UTC) a day partition of `execution_results` holds, from its name.
fn day_of_partition(name: &str) -> Option<NaiveDate> {
    name.strip_prefix("execution_results_p")
        .and_then(|day| NaiveDate::parse_from_str(day, "%Y%m%d").ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: u128, pc: &str) -> RunWrite {
        RunWrite {
            result_id: Uuid::from_u128(id),
            pc_id: pc.into(),
            request_id: "r".into(),
            exec_id: "e".into(),
            manifest_id: "m".into(),
            version: String::new(),
            timeout_secs: None,
            started_at: Utc::now(),
            outcome: None,
            trace_id: None,
        }
    }

    #[test]
    fn a_run_written_by_two_endpoints_goes_into_two_rounds() {
        let writes = [write(1, "a"), write(2, "a"), write(1, "b"), write(3, "a")];
        assert_eq!(
            rounds(writes.iter().map(|w| w.result_id)),
            vec![vec![0, 1, 3], vec![2]]
        );
    }
}
