//! PostgreSQL's own ceiling for the rows a throughput run wrote: the same Started inserts, then
//! Result upserts, written directly (no gRPC, no batcher) by multi-row `INSERT … ON CONFLICT DO
//! UPDATE` at the best batch size; and the one-row-per-transaction figure a per-message consumer
//! reaches.

use std::time::Instant;

use kanade_ingest::store::RunWrite;
use sqlx::{PgPool, Postgres, QueryBuilder};

const COLUMNS: &str = "INSERT INTO execution_results AS r (result_id, request_id, exec_id, pc_id, \
    manifest_id, version, timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes, \
    stderr_dropped_bytes, started_at, finished_at, received_at) ";

const ON_CONFLICT: &str = " ON CONFLICT (result_id) DO UPDATE SET \
    timeout_secs = COALESCE(r.timeout_secs, EXCLUDED.timeout_secs), \
    status = COALESCE(r.status, EXCLUDED.status), \
    exit_code = COALESCE(r.exit_code, EXCLUDED.exit_code), \
    stdout = COALESCE(r.stdout, EXCLUDED.stdout), \
    stderr = COALESCE(r.stderr, EXCLUDED.stderr), \
    stdout_dropped_bytes = COALESCE(r.stdout_dropped_bytes, EXCLUDED.stdout_dropped_bytes), \
    stderr_dropped_bytes = COALESCE(r.stderr_dropped_bytes, EXCLUDED.stderr_dropped_bytes), \
    finished_at = COALESCE(r.finished_at, EXCLUDED.finished_at) \
    WHERE r.pc_id = EXCLUDED.pc_id";

async fn upsert(pool: &PgPool, rows: &[RunWrite]) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let mut q = QueryBuilder::<Postgres>::new(COLUMNS);
    q.push_values(rows, |mut b, w| {
        let o = w.outcome.as_ref();
        b.push_bind(w.result_id)
            .push_bind(&w.request_id)
            .push_bind(&w.exec_id)
            .push_bind(&w.pc_id)
            .push_bind(&w.manifest_id)
            .push_bind(&w.version)
            .push_bind(w.timeout_secs.map(i64::from))
            .push_bind(o.map(|o| o.status.as_str()))
            .push_bind(o.and_then(|o| o.exit_code))
            .push_bind(o.map(|o| o.stdout.as_str()))
            .push_bind(o.map(|o| o.stderr.as_str()))
            .push_bind(o.map(|o| o.stdout_dropped_bytes as i64))
            .push_bind(o.map(|o| o.stderr_dropped_bytes as i64))
            .push_bind(w.started_at)
            .push_bind(o.map(|o| o.finished_at))
            .push_bind(now);
    });
    q.push(ON_CONFLICT);
    q.build().execute(pool).await?;
    Ok(())
}

/// Rows per second writing `started` then `results` in batches of `batch` rows, each batch one
/// transaction.
pub async fn batched_rows_per_second(
    pool: &PgPool,
    started: &[RunWrite],
    results: &[RunWrite],
    batch: usize,
) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE execution_results")
        .execute(pool)
        .await?;
    let t = Instant::now();
    for rows in started.chunks(batch).chain(results.chunks(batch)) {
        upsert(pool, rows).await?;
    }
    Ok((started.len() + results.len()) as f64 / t.elapsed().as_secs_f64())
}

/// Rows per second writing one row per transaction (the first `sample` rows of each kind).
pub async fn single_rows_per_second(
    pool: &PgPool,
    started: &[RunWrite],
    results: &[RunWrite],
    sample: usize,
) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE execution_results")
        .execute(pool)
        .await?;
    let n = sample.min(started.len());
    let t = Instant::now();
    for row in started[..n].iter().chain(&results[..n]) {
        upsert(pool, std::slice::from_ref(row)).await?;
    }
    Ok((2 * n) as f64 / t.elapsed().as_secs_f64())
}

/// The best batched figure over a few batch sizes: (rows/s, batch size).
pub async fn best_batched(
    pool: &PgPool,
    started: &[RunWrite],
    results: &[RunWrite],
) -> anyhow::Result<(f64, usize)> {
    let mut best = (0.0, 0);
    // 16 parameters per row: 1000 rows stay under PostgreSQL's 65,535.
    for batch in [100, 500, 1000] {
        let rate = batched_rows_per_second(pool, started, results, batch).await?;
        if rate > best.0 {
            best = (rate, batch);
        }
    }
    Ok(best)
}
