//! `kanade-bench indexes`: what each index of `execution_results` costs the write path (SPEC
//! §15). The same rows as the separated throughput ceiling (Started inserts, then Result
//! upserts, by ingest's own statement in 1,000-row statements from two connections, 2 % of runs
//! failed) are written with every index, then once without each
//! secondary index in turn, then with none; every configuration is measured `--repeat` times,
//! interleaved, and the median is kept. An index's cost is how much faster the writes go
//! without it.

use anyhow::Context;
use clap::Args;
use kanade_ingest::store::{PostgresStore, RunWrite, Store};
use kanade_shared::wire::{EventBody, ExecStatus};
use sqlx::AssertSqlSafe;

use crate::{ceiling, load, process::BenchDb};

#[derive(Debug, Args)]
pub struct IndexesArgs {
    /// The PostgreSQL server (a fresh database is made beside the one in the URL).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Runs written per measurement (two rows each: Started, then Result).
    #[arg(long, default_value_t = 50_000)]
    pub runs: usize,
    /// Measurements per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// The secondary indexes of the partitioned table (the primary key is the upsert's own).
async fn secondary_indexes(store: &PostgresStore) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(c.oid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid IN ('execution_results'::regclass, 'execution_results_default'::regclass) \
         AND NOT i.indisprimary \
         AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = c.oid) ORDER BY 1",
    )
    .fetch_all(&store.pool())
    .await?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(args: IndexesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.repeat >= 1 && args.runs >= 1,
        "--runs and --repeat must be at least 1"
    );
    let db = BenchDb::fresh(&args.database_url).await?;
    let store = PostgresStore::connect(&db.url).await?;
    store.migrate().await?;
    // Today's partition, as a serving ingest makes it (the rows' ids are minted now).
    store
        .prepare_days(chrono::Utc::now().date_naive(), 1)
        .await?;
    let to_write = |body: EventBody| RunWrite::from_event(body).expect("valid ids");
    let (mut started, mut results) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let (s, mut r) = load::run_events(&format!("bench-{:05}", i % 10_000), 200);
        if i % 50 == 0 {
            r.status = ExecStatus::Failed;
            r.exit_code = Some(1);
        }
        started.push(to_write(EventBody::Started(s)));
        results.push(to_write(EventBody::Result(r)));
    }
    let indexes = secondary_indexes(&store).await?;
    let pool = store.pool();
    let store = std::sync::Arc::new(store);
    // Each measurement starts from a clean slate (the ceiling empties the table and writes the
    // previous one's, and an index rebuild's, dirty pages out first), in events per second.
    let measure = || async {
        ceiling::separated(&store, &started, &results)
            .await
            .map(|c| c.events_per_s)
            .context("writing the rows")
    };
    // Configurations: every index, each one left out, none.
    let mut configs: Vec<Option<usize>> = vec![None];
    configs.extend((0..indexes.len()).map(Some));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); configs.len() + 1];
    for _ in 0..args.repeat {
        for (slot, config) in configs.iter().enumerate() {
            if let Some(left_out) = config {
                let name = &indexes[*left_out].0;
                sqlx::query(AssertSqlSafe(format!("DROP INDEX {name}")))
                    .execute(&pool)
                    .await?;
                rates[slot].push(measure().await?);
                sqlx::query(AssertSqlSafe(indexes[*left_out].1.clone()))
                    .execute(&pool)
                    .await?;
            } else {
                rates[slot].push(measure().await?);
            }
        }
        for (name, _) in &indexes {
            sqlx::query(AssertSqlSafe(format!("DROP INDEX {name}")))
                .execute(&pool)
                .await?;
        }
        rates[configs.len()].push(measure().await?);
        for (_, definition) in &indexes {
            sqlx::query(AssertSqlSafe(definition.clone()))
                .execute(&pool)
                .await?;
        }
    }
    let all = median(rates[0].clone());
    println!(
        "{} runs ({} rows) per measurement, 1,000-row statements, median of {}",
        args.runs,
        2 * args.runs,
        args.repeat
    );
    println!(
        "{:<44} {:>10} {:>14}",
        "configuration", "rows/s", "vs every index"
    );
    println!("{:<44} {:>10.0} {:>14}", "every index", all, "1.00");
    let mut summary = format!("all={all:.0}");
    for (slot, config) in configs.iter().enumerate().skip(1) {
        let name = &indexes[config.expect("a left-out index")].0;
        let rate = median(rates[slot].clone());
        println!(
            "{:<44} {:>10.0} {:>14.2}",
            format!("without {name}"),
            rate,
            rate / all
        );
        summary.push_str(&format!(" {name}={rate:.0}"));
    }
    let none = median(rates[configs.len()].clone());
    println!(
        "{:<44} {:>10.0} {:>14.2}",
        "no secondary index",
        none,
        none / all
    );
    summary.push_str(&format!(" none={none:.0}"));
    pool.close().await;
    db.drop_database().await;
    println!("{summary}");
    Ok(())
}
