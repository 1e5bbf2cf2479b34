//! `kanade-bench retention`: what retention costs for a day of runs (SPEC §15, Storage). Two old
//! days, one of a thousand runs and one of a million, each dropped whole (the day's partition)
//! while a writer keeps inserting runs one statement at a time, as ingest does: the benchmark
//! reports each drop's time and the longest the writer waited during it, against the longest
//! wait of the same writer over the same time with no retention running. In the same run, the
//! baseline: the same million rows deleted row by row (the batched `DELETE` the default
//! partition and SQLite use), timed on a copy in the default partition.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use kanade_ingest::store::{PostgresStore, RunWrite, Store};
use kanade_shared::wire::EventBody;
use tokio_util::sync::CancellationToken;

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
    let store = Arc::new(PostgresStore::connect(&db.url).await?);
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

    let writer = Writer::start(store.clone());
    let swept_one = |cutoff: DateTime<Utc>| {
        let store = &store;
        async move {
            let swept = store.drop_days_before(cutoff).await?;
            anyhow::ensure!(
                swept.dropped.len() == 1 && swept.postponed.is_empty(),
                "each day is one partition, dropped at once: {swept:?}"
            );
            anyhow::Ok(())
        }
    };
    let small_drop = writer.watch(swept_one(end_of(small))).await?;
    let large_drop = writer.watch(swept_one(end_of(large))).await?;
    let writes = writer.stop().await?;

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
    for (rows, dropped) in [(args.small_day, &small_drop), (args.large_day, &large_drop)] {
        println!(
            "drop a day of {rows} runs: {:.1} ms; the writer's longest wait meanwhile {:.1} ms \
             (with no retention running: {:.1} ms)",
            ms(dropped.took),
            ms(dropped.stalled),
            ms(dropped.quiet)
        );
    }
    println!(
        "large ÷ small day: the drop {:.2}×, the writer's longest wait {:.2}× ({writes} single-run \
         writes in all)",
        large_drop.took.as_secs_f64() / small_drop.took.as_secs_f64(),
        large_drop.stalled.as_secs_f64() / small_drop.stalled.as_secs_f64(),
    );
    println!(
        "baseline, the same {} rows deleted 1,000 at a time: {:.0} ms ({:.0}× dropping their day)",
        args.large_day,
        ms(rowwise),
        rowwise.as_secs_f64() / large_drop.took.as_secs_f64()
    );
    println!(
        "mode=retention small_rows={} small_ms={:.1} small_stall_ms={:.1} large_rows={} \
         large_ms={:.1} large_stall_ms={:.1} quiet_stall_ms={:.1} rowwise_ms={:.0}",
        args.small_day,
        ms(small_drop.took),
        ms(small_drop.stalled),
        args.large_day,
        ms(large_drop.took),
        ms(large_drop.stalled),
        ms(small_drop.quiet.max(large_drop.quiet)),
        ms(rowwise)
    );
    Ok(())
}

/// How long the writer's baseline is watched with no retention running.
const QUIET_WINDOW: Duration = Duration::from_millis(500);

/// One day dropped, seen from the side.
struct Dropped {
    /// The drop from call to answer.
    took: Duration,
    /// The longest a single-run write waited while it ran.
    stalled: Duration,
    /// The longest a write waited over [`QUIET_WINDOW`] just before, with no retention running.
    quiet: Duration,
}

/// A writer that inserts one running run per statement through the store, back to back, as live
/// traffic does, and keeps the longest wait of each write since a mark.
struct Writer {
    /// The longest wait (µs) of any write that ended since the last mark, and of the one running.
    longest_us: Arc<AtomicU64>,
    /// When the write in progress began (µs since `epoch`), 0 between writes.
    current_since_us: Arc<AtomicU64>,
    epoch: Instant,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

/// The waits since [`Writer::waits`] was called.
struct Waits<'a>(&'a Writer);

impl Waits<'_> {
    /// The longest wait so far, counting the write still in progress.
    fn longest(&self) -> Duration {
        let writer = self.0;
        let ended = writer.longest_us.load(Ordering::SeqCst);
        let since = writer.current_since_us.load(Ordering::SeqCst);
        let running = if since == 0 {
            0
        } else {
            (writer.epoch.elapsed().as_micros() as u64).saturating_sub(since)
        };
        Duration::from_micros(ended.max(running))
    }
}

impl Writer {
    fn start(store: Arc<PostgresStore>) -> Writer {
        let longest_us = Arc::new(AtomicU64::new(0));
        let current_since_us = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (longest_us, current_since_us, stop) =
                (longest_us.clone(), current_since_us.clone(), stop.clone());
            async move {
                let mut writes = 0u64;
                while !stop.is_cancelled() {
                    let run = kanade_testkit::Run::new("pc-retention-bench");
                    let write = RunWrite::from_event(EventBody::Started(run.started()))
                        .expect("a valid run");
                    let began = epoch.elapsed().as_micros() as u64;
                    current_since_us.store(began.max(1), Ordering::SeqCst);
                    store.apply(&[write], Utc::now()).await?;
                    let waited = (epoch.elapsed().as_micros() as u64).saturating_sub(began);
                    current_since_us.store(0, Ordering::SeqCst);
                    longest_us.fetch_max(waited, Ordering::SeqCst);
                    writes += 1;
                }
                anyhow::Ok(writes)
            }
        });
        Writer {
            longest_us,
            current_since_us,
            epoch,
            stop,
            task,
        }
    }

    /// Runs `drop` while writing: how long it took, the longest write meanwhile, and the longest
    /// write over [`QUIET_WINDOW`] just before.
    async fn watch(
        &self,
        drop: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Dropped> {
        let quiet = self.longest_wait_over(QUIET_WINDOW).await;
        let waits = self.waits();
        let began = Instant::now();
        drop.await?;
        let took = began.elapsed();
        // The write that was waiting when the drop ended counts too.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Dropped {
            took,
            stalled: waits.longest(),
            quiet,
        })
    }

    /// Marks now: [`Waits::longest`] counts only writes from here on.
    fn waits(&self) -> Waits<'_> {
        self.longest_us.store(0, Ordering::SeqCst);
        Waits(self)
    }

    /// The longest wait over the next `window`.
    async fn longest_wait_over(&self, window: Duration) -> Duration {
        let waits = self.waits();
        tokio::time::sleep(window).await;
        waits.longest()
    }

    /// Stops writing; returns how many writes were made.
    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.cancel();
        self.task.await.context("the writer task")?
    }
}
