//! PostgreSQL's own ceiling for the writes a throughput run makes: the same rows written
//! directly, without gRPC and without the batcher, by the statement ingest itself runs
//! (`Store::apply` of kanade-ingest's PostgreSQL store) on the table its migrations create, in
//! 1,000-row statements from two connections at once — the most a perfect ingest could reach.
//!
//! Two shapes, as the throughput benchmark has them:
//! - separated: every run's running row inserted first, then every run's result upserted onto
//!   it (jobs outlive a batch, so ingest writes a run twice);
//! - back to back: each run's Started and Result merged into one finished row, as the batcher
//!   merges a run whose two events arrive in one batch (a backlog flushed after an outage).
//!
//! The separated writes are also measured pipelined, as ingest's batches hold them: each
//! statement finishes the runs started two statements earlier and starts the next ones. That
//! tells whether a statement mixing inserts and updates costs PostgreSQL more than the phases
//! do (it does not, within a few per cent; BENCHMARKS.md).
//!
//! And the separated writes with the results **out of order**: a fleet's runs finish in the
//! order their jobs end, not the order they started, so the results of one statement fall all
//! over the table instead of on one stretch of each index. Ingest's batches are of that kind
//! whenever agents report at different paces; the id-ordered ceiling is the best case.
//!
//! Figures are events per second, so they compare with what ingest acks: a merged row carries
//! two events.

use std::{sync::Arc, time::Instant};

use chrono::{SubsecRound, Utc};
use kanade_ingest::store::{PostgresStore, RunWrite, Store};

/// Rows per statement, as ingest's default batch closes at.
pub const STATEMENT_ROWS: usize = 1000;
/// Connections writing at once.
pub const CONNECTIONS: usize = 2;

/// What one ceiling measurement found.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub events_per_s: f64,
    /// PostgreSQL's CPU (the database's backends and the server's writers) per 1,000 events,
    /// in seconds.
    pub pg_cpu_per_1k: f64,
}

/// Empties the table (and gives back its space) between measurements.
async fn empty(store: &PostgresStore) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE execution_results")
        .execute(&store.pool())
        .await?;
    sqlx::query("CHECKPOINT").execute(&store.pool()).await?;
    Ok(())
}

/// Writes `statements`, shared out over `CONNECTIONS` concurrent writers in turn (statement
/// `i` on writer `i % CONNECTIONS`, each writer's in order); returns when all committed.
async fn write_all(
    store: &Arc<PostgresStore>,
    statements: &Arc<Vec<Vec<RunWrite>>>,
) -> anyhow::Result<()> {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..CONNECTIONS {
        let (store, statements) = (store.clone(), statements.clone());
        writers.spawn(async move {
            for rows in statements.iter().skip(writer).step_by(CONNECTIONS) {
                store.apply(rows, Utc::now().trunc_subsecs(6)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    Ok(())
}

/// `rows` cut into statements of `STATEMENT_ROWS`.
fn statements(rows: &[RunWrite]) -> Arc<Vec<Vec<RunWrite>>> {
    Arc::new(rows.chunks(STATEMENT_ROWS).map(<[_]>::to_vec).collect())
}

/// Times `phases` of statements written one after the other (each phase fully committed
/// before the next starts); `events` is how many events they stand for.
async fn measure(
    store: &Arc<PostgresStore>,
    phases: &[Arc<Vec<Vec<RunWrite>>>],
    events: usize,
) -> anyhow::Result<Ceiling> {
    empty(store).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&store.pool())
        .await?;
    let pg_cpu = crate::process::PgCpu::start(&database);
    let t = Instant::now();
    for rows in phases {
        write_all(store, rows).await?;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let pg = pg_cpu.seconds();
    Ok(Ceiling {
        events_per_s: events as f64 / elapsed,
        pg_cpu_per_1k: 1000.0 * pg / events as f64,
    })
}

/// The separated shape: the running rows, then the results onto them.
pub async fn separated(
    store: &Arc<PostgresStore>,
    started: &[RunWrite],
    results: &[RunWrite],
) -> anyhow::Result<Ceiling> {
    let phases = [statements(started), statements(results)];
    measure(store, &phases, started.len() + results.len()).await
}

/// The separated writes pipelined: statement `j` holds the results of the runs statement
/// `j - 2` started (committed by then: it ran before on the same connection) and the Started
/// of the next runs, in id order; the runs are `started` and `results` in id order.
pub async fn pipelined(
    store: &Arc<PostgresStore>,
    started: &[RunWrite],
    results: &[RunWrite],
) -> anyhow::Result<Ceiling> {
    let per_statement = STATEMENT_ROWS / 2;
    let starting: Vec<&[RunWrite]> = started.chunks(per_statement).collect();
    let finishing: Vec<&[RunWrite]> = results.chunks(per_statement).collect();
    let lag = CONNECTIONS;
    let pipeline = (0..starting.len() + lag)
        .map(|j| {
            let finished = j.checked_sub(lag).and_then(|k| finishing.get(k));
            let mut rows: Vec<RunWrite> = finished
                .into_iter()
                .flat_map(|r| r.iter())
                .cloned()
                .collect();
            rows.extend(starting.get(j).into_iter().flat_map(|r| r.iter()).cloned());
            rows.sort_by_key(|r| r.result_id);
            rows
        })
        .collect();
    measure(store, &[Arc::new(pipeline)], started.len() + results.len()).await
}

/// The seed of the out-of-order shuffle: every measurement shuffles the same way.
const SHUFFLE_SEED: u64 = 0x6b61_6e61_6465;

/// The separated writes with the results in random order (runs finishing out of start order),
/// cut into statements each sorted by id as ingest sorts a batch: the running rows, then the
/// results.
pub async fn out_of_order(
    store: &Arc<PostgresStore>,
    started: &[RunWrite],
    results: &[RunWrite],
) -> anyhow::Result<Ceiling> {
    let mut finishing = results.to_vec();
    fastrand::Rng::with_seed(SHUFFLE_SEED).shuffle(&mut finishing);
    for rows in finishing.chunks_mut(STATEMENT_ROWS) {
        rows.sort_by_key(|r| r.result_id);
    }
    let phases = [statements(started), statements(&finishing)];
    measure(store, &phases, started.len() + results.len()).await
}

/// The back-to-back shape: one merged, finished row per run.
pub async fn back_to_back(
    store: &Arc<PostgresStore>,
    started: &[RunWrite],
    results: &[RunWrite],
) -> anyhow::Result<Ceiling> {
    let merged: Vec<RunWrite> = started
        .iter()
        .zip(results)
        .map(|(s, r)| {
            let mut run = s.clone();
            run.absorb(r.clone());
            run
        })
        .collect();
    measure(store, &[statements(&merged)], started.len() + results.len()).await
}

/// Events per second writing one row per transaction (the first `sample` runs, started then
/// finished): what a consumer that commits each message reaches.
pub async fn one_row_per_transaction(
    store: &PostgresStore,
    started: &[RunWrite],
    results: &[RunWrite],
    sample: usize,
) -> anyhow::Result<f64> {
    empty(store).await?;
    let n = sample.min(started.len());
    let t = Instant::now();
    for row in started[..n].iter().chain(&results[..n]) {
        store
            .apply(std::slice::from_ref(row), Utc::now().trunc_subsecs(6))
            .await?;
    }
    Ok((2 * n) as f64 / t.elapsed().as_secs_f64())
}
