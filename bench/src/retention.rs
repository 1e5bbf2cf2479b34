//! `kanade-bench retention`: what retention costs for a day of runs (SPEC §15, Storage). Two old
//! days, one of a thousand runs and one of a million, each dropped whole (the day's partition);
//! in the same run, the baseline: the same million rows deleted row by row (the batched
//! `DELETE` the default partition and SQLite use), timed on a copy in the default partition.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use kanade_ingest::store::{PostgresStore, Store};

use crate::{activity::GENERATE, process::BenchDb};

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// The PostgreSQL server (a fresh database is made beside the one in the URL).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Runs in the small day.
    #[arg(long, default_value_t = 1_000)]
    pub small_day: u64,
    /// Runs in the large day.
    #[arg(long, default_value_t = 1_000_000)]
    pub large_day: u64,
}

/// Fills the day ending at `day_end` with `rows` runs (row numbers from `first`).
async fn fill_day(
    store: &PostgresStore,
    first: u64,
    rows: u64,
    day_end: DateTime<Utc>,
) -> anyhow::Result<()> {
    sqlx::query(GENERATE)
        .bind(first as i64)
        .bind((first + rows - 1) as i64)
        .bind(day_end - chrono::Duration::minutes(1))
        .bind(1i64)
        .bind((first + rows - 1) as i64)
        .execute(&store.pool())
        .await
        .context("generating a day of runs")?;
    Ok(())
}

pub async fn run(args: RetentionArgs) -> anyhow::Result<()> {
    let db = BenchDb::fresh(&args.database_url).await?;
    let store = PostgresStore::connect(&db.url).await?;
    store.migrate().await?;
    let today = Utc::now().date_naive();
    let day = |ago: u64| today - chrono::Days::new(ago);
    let end_of = |d: chrono::NaiveDate| {
        d.succ_opt()
            .expect("a next day")
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
    };
    let (small, large) = (day(200), day(199));
    store.prepare_days(small, 1).await?;
    fill_day(&store, 1, args.small_day, end_of(small)).await?;
    fill_day(&store, 1 + args.small_day, args.large_day, end_of(large)).await?;
    sqlx::query("VACUUM ANALYZE execution_results")
        .execute(&store.pool())
        .await?;

    let timed = |cutoff: DateTime<Utc>| {
        let store = &store;
        async move {
            let began = Instant::now();
            let dropped = store.drop_days_before(cutoff).await?;
            anyhow::Ok((began.elapsed(), dropped.len()))
        }
    };
    let (small_took, small_days) = timed(end_of(small)).await?;
    let (large_took, large_days) = timed(end_of(large)).await?;
    anyhow::ensure!(
        small_days == 1 && large_days == 1,
        "each day is one partition"
    );

    // The baseline: a million rows outside any day partition, deleted the row-by-row way.
    let outside = day(500);
    fill_day(&store, 1, args.large_day, end_of(outside)).await?;
    let cutoff = end_of(outside) + chrono::Duration::days(1);
    let began = Instant::now();
    let mut deleted = 0;
    loop {
        let n = store.delete_received_before(cutoff, 1000).await?;
        deleted += n;
        if n == 0 {
            break;
        }
    }
    let rowwise = began.elapsed();
    anyhow::ensure!(deleted == args.large_day, "deleted {deleted} rows");
    store.pool().close().await;
    db.drop_database().await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "drop a day of {} runs: {:.1} ms; a day of {} runs: {:.1} ms ({:.2}× the small day)",
        args.small_day,
        ms(small_took),
        args.large_day,
        ms(large_took),
        large_took.as_secs_f64() / small_took.as_secs_f64()
    );
    println!(
        "baseline, the same {} rows deleted 1,000 at a time: {:.0} ms ({:.0}× dropping their day)",
        args.large_day,
        ms(rowwise),
        rowwise.as_secs_f64() / large_took.as_secs_f64()
    );
    println!(
        "mode=retention small_rows={} small_ms={:.1} large_rows={} large_ms={:.1} rowwise_ms={:.0}",
        args.small_day,
        ms(small_took),
        args.large_day,
        ms(large_took),
        ms(rowwise)
    );
    Ok(())
}
