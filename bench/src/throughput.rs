//! `kanade-bench throughput`: the real ingest and N simulated agents using the real sender over
//! real gRPC; events/s committed and acked, ack latency, ingest CPU and peak RSS — and, in the
//! same run, PostgreSQL's own ceiling for the same rows.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use kanade_ingest::store::{self, RunWrite};
use kanade_shared::wire::{EventBody, EventStarted, ExecResult};
use tokio_util::sync::CancellationToken;

use crate::{
    ceiling,
    load::{self, Latencies, MemoryQueue, TimedOutbox},
    process::{BenchDb, IngestProcess},
};

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// postgres://USER@HOST/DB (a fresh database is created beside it) or sqlite://ANY.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Simulated agents, each with its own stream.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Runs per agent (two events each).
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Bytes of stdout per run.
    #[arg(long, default_value_t = 200)]
    pub output_bytes: usize,
    /// Go through real SQLite outboxes (one per agent, synchronous=FULL) instead of memory.
    #[arg(long)]
    pub outbox: bool,
    /// Offer events at this total rate (events/s) instead of all at once, for latency figures.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Skip the PostgreSQL ceiling measurement.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// RUST_LOG for ingest: `info` is its default (spans on, not exported); `off` disables
    /// tracing entirely, the baseline for what tracing costs.
    #[arg(long, default_value = "info")]
    pub ingest_rust_log: String,
    /// Extra flags for kanade-ingest (e.g. --batch-linger=2ms).
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    pub ingest_args: Vec<String>,
}

/// Where a simulated agent's runs go before its sender takes them.
enum AgentQueue {
    Memory(Arc<MemoryQueue>),
    Outbox(Arc<TimedOutbox>),
}

impl AgentQueue {
    async fn enqueue_run(&self, started: EventStarted, result: ExecResult) -> anyhow::Result<()> {
        match self {
            AgentQueue::Memory(q) => {
                q.enqueue(EventBody::Started(started));
                q.enqueue(EventBody::Result(result));
                Ok(())
            }
            AgentQueue::Outbox(q) => q.enqueue_run(&started, result).await,
        }
    }
}

pub async fn run(args: ThroughputArgs) -> anyhow::Result<()> {
    let db = BenchDb::fresh(&args.database_url).await?;
    let mut ingest_args = vec!["--max-streams".to_string(), (args.agents + 100).to_string()];
    ingest_args.extend(args.ingest_args.iter().cloned());
    let ingest =
        IngestProcess::start_logging(&db.url, "127.0.0.1:0", &ingest_args, &args.ingest_rust_log)?;
    let url = format!("http://{}", ingest.addr);
    let total_events = (2 * args.agents * args.runs) as u64;
    let latencies = Arc::new(Latencies::default());
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir()?;

    // The runs, generated up front so that generating them costs nothing during the measurement.
    let runs: Vec<Vec<_>> = (0..args.agents)
        .map(|a| {
            (0..args.runs)
                .map(|_| load::run_events(&format!("bench-{a:05}"), args.output_bytes))
                .collect()
        })
        .collect();

    let cpu_before = ingest.cpu_seconds();
    let started = Instant::now();
    let mut senders = Vec::new();
    let mut feeders = tokio::task::JoinSet::new();
    let per_agent_interval = args
        .rate
        .map(|r| Duration::from_secs_f64(2.0 * args.agents as f64 / r));
    for (a, agent_runs) in runs.iter().enumerate() {
        let pc = format!("bench-{a:05}");
        let queue = if args.outbox {
            let outbox = TimedOutbox::open(&dir.path().join(&pc), latencies.clone()).await?;
            AgentQueue::Outbox(Arc::new(outbox))
        } else {
            AgentQueue::Memory(Arc::new(MemoryQueue::new(latencies.clone())))
        };
        senders.push(match &queue {
            AgentQueue::Outbox(q) => load::spawn_sender(q.clone(), &url, &pc, &stop),
            AgentQueue::Memory(q) => load::spawn_sender(q.clone(), &url, &pc, &stop),
        });
        let agent_runs = agent_runs.clone();
        feeders.spawn(async move {
            let mut tick = per_agent_interval.map(tokio::time::interval);
            for (s, r) in agent_runs {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                queue.enqueue_run(s, r).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(fed) = feeders.join_next().await {
        fed??;
    }
    while latencies.acked.load(std::sync::atomic::Ordering::SeqCst) < total_events {
        let waiting = latencies.all_acked.notified();
        if latencies.acked.load(std::sync::atomic::Ordering::SeqCst) >= total_events {
            break;
        }
        tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .context("no ack for 60 s: is ingest stuck?")?;
    }
    let elapsed = started.elapsed();
    let cpu = ingest.cpu_seconds() - cpu_before;
    let peak_rss = ingest.peak_rss_bytes();
    stop.cancel();
    for s in senders {
        let _ = s.await;
    }
    let events_per_s = total_events as f64 / elapsed.as_secs_f64();
    let (p50, p99, max) = latencies.summary();

    // The same rows, written by PostgreSQL directly.
    let (ceiling, ceiling_batch, single) = if db.is_postgres() && !args.no_ceiling {
        let baseline = BenchDb::fresh(&args.database_url).await?;
        let store = store::PostgresStore::connect(&baseline.url).await?;
        store::Store::migrate(&store).await?;
        let to_writes = |body: EventBody| RunWrite::from_event(body).expect("valid ids");
        let started_rows: Vec<RunWrite> = runs
            .iter()
            .flatten()
            .map(|(s, _)| to_writes(EventBody::Started(s.clone())))
            .collect();
        let result_rows: Vec<RunWrite> = runs
            .iter()
            .flatten()
            .map(|(_, r)| to_writes(EventBody::Result(r.clone())))
            .collect();
        let (best, batch) =
            ceiling::best_batched(&store.pool(), &started_rows, &result_rows).await?;
        let single =
            ceiling::single_rows_per_second(&store.pool(), &started_rows, &result_rows, 1500)
                .await?;
        store.pool().close().await;
        baseline.drop_database().await;
        (Some(best), Some(batch), Some(single))
    } else {
        (None, None, None)
    };
    drop(ingest);
    db.drop_database().await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "kanade: {events_per_s:.0} events/s committed and acked ({} agents × {} runs, {} events in {:.2} s{})",
        args.agents,
        args.runs,
        total_events,
        elapsed.as_secs_f64(),
        if args.outbox {
            ", through SQLite outboxes"
        } else {
            ""
        }
    );
    println!(
        "ack latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
    println!(
        "ingest: {:.0} % of one core, peak RSS {:.1} MiB",
        100.0 * cpu / elapsed.as_secs_f64(),
        peak_rss as f64 / 1048576.0
    );
    if let (Some(c), Some(b), Some(s)) = (ceiling, ceiling_batch, single) {
        println!(
            "postgres ceiling: {c:.0} rows/s (multi-row upserts of {b}); one row per transaction: {s:.0} rows/s"
        );
        println!(
            "ratio = kanade / ceiling = {:.2}; kanade / one-row = {:.1}×",
            events_per_s / c,
            events_per_s / s
        );
    }
    let fmt_opt = |v: Option<f64>| v.map_or("na".to_string(), |v| format!("{v:.0}"));
    let ratio = ceiling.map_or("na".to_string(), |c| format!("{:.3}", events_per_s / c));
    let summary = format!(
        "mode=throughput agents={} runs={} outbox={} rate={} rust_log={} events={} events_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} ingest_cpu_pct={:.0} ingest_cpu_us_per_event={:.2} ingest_peak_rss_mib={:.1} ceiling_rows_per_s={} ceiling_batch={} single_row_per_s={} ratio={}",
        args.agents,
        args.runs,
        args.outbox,
        args.rate.map_or("max".into(), |r| format!("{r:.0}")),
        args.ingest_rust_log,
        total_events,
        events_per_s,
        ms(p50),
        ms(p99),
        ms(max),
        100.0 * cpu / elapsed.as_secs_f64(),
        1e6 * cpu / total_events as f64,
        peak_rss as f64 / 1048576.0,
        fmt_opt(ceiling),
        ceiling_batch.map_or("na".into(), |b| b.to_string()),
        fmt_opt(single),
        ratio,
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
