//! `kanade-bench throughput`: the real ingest (one or several replicas on one database) and N
//! simulated agents using the real sender over real gRPC; events/s committed and acked, ack
//! latency, and who spent the CPU (ingest, PostgreSQL, the simulated agents) per 1,000 events —
//! against PostgreSQL's own ceiling for the same writes, measured in the same run.
//!
//! Two shapes of load:
//! - `separated` (the default, and the realistic one): each agent sends its runs' Started
//!   events, and a run's Result only once its Started was acknowledged, as real jobs, which
//!   outlive a batch, do. A run's two events never share a batch: ingest writes every run twice.
//! - `back-to-back`: each run's Started and Result queued together, as a backlog flushed after
//!   an outage; the batcher merges them into one write.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, ValueEnum};
use kanade_ingest::store::{self, RunWrite, Store};
use kanade_shared::wire::{EventBody, EventStarted, ExecResult};
use tokio_util::sync::CancellationToken;

use crate::{
    ceiling::{self, Ceiling},
    load::{self, Latencies, MemoryQueue, TimedOutbox},
    process::{self, BenchDb, IngestProcess},
};

/// How each agent's runs reach its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// A run's Result only after its Started was acknowledged: the two never share a batch.
    Separated,
    /// A run's Started and Result queued together: they merge into one write.
    BackToBack,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Separated => "separated",
            Shape::BackToBack => "back-to-back",
        }
    }
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// postgres://USER@HOST/DB (a fresh database is created beside it) or sqlite://ANY.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// How runs reach the agents' queues.
    #[arg(long, value_enum, default_value_t = Shape::Separated)]
    pub shape: Shape,
    /// Simulated agents, each with its own stream.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Runs per agent (two events each).
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Ingest replicas on the one database, agents spread over them evenly. With more than one,
    /// the same load is first measured against a single replica, for the ratio.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Bytes of stdout per run.
    #[arg(long, default_value_t = 200)]
    pub output_bytes: usize,
    /// Go through real SQLite outboxes (one per agent, synchronous=FULL) instead of memory
    /// (back-to-back only: the outbox writes a run's two events in one go).
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

/// One agent's runs, generated up front so that generating them costs nothing measured.
type Runs = Vec<(EventStarted, ExecResult)>;

/// Where a simulated agent's runs go before its sender takes them.
enum AgentQueue {
    Memory(Arc<MemoryQueue>),
    Outbox(Arc<TimedOutbox>),
}

impl AgentQueue {
    /// Feeds one agent's runs in the given shape, at `interval` per run when pacing.
    async fn feed(
        &self,
        runs: Runs,
        shape: Shape,
        interval: Option<Duration>,
    ) -> anyhow::Result<()> {
        let mut tick = interval.map(tokio::time::interval);
        match (self, shape) {
            (AgentQueue::Outbox(q), _) => {
                for (started, result) in runs {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    q.enqueue_run(&started, result).await?;
                }
            }
            (AgentQueue::Memory(q), Shape::BackToBack) => {
                for (started, result) in runs {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    q.enqueue(EventBody::Started(started));
                    q.enqueue(EventBody::Result(result));
                }
            }
            (AgentQueue::Memory(q), Shape::Separated) => {
                // Results wait here until their run's Started is acknowledged.
                let mut waiting: VecDeque<(u64, ExecResult)> = VecDeque::new();
                let release = |waiting: &mut VecDeque<(u64, ExecResult)>| {
                    while waiting.front().is_some_and(|(seq, _)| !q.is_pending(*seq)) {
                        let (_, result) = waiting.pop_front().expect("checked");
                        q.enqueue(EventBody::Result(result));
                    }
                };
                for (started, result) in runs {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    waiting.push_back((q.enqueue(EventBody::Started(started)), result));
                    release(&mut waiting);
                }
                while !waiting.is_empty() {
                    let acked = q.acked.notified();
                    release(&mut waiting);
                    if waiting.is_empty() {
                        break;
                    }
                    tokio::time::timeout(Duration::from_secs(60), acked)
                        .await
                        .context("no ack for 60 s: is ingest stuck?")?;
                }
            }
        }
        Ok(())
    }
}

/// What one measurement of ingest found.
#[derive(Debug, Clone, Copy)]
struct Measured {
    events: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// CPU seconds per 1,000 events.
    ingest_cpu_per_1k: f64,
    pg_cpu_per_1k: f64,
    agents_cpu_per_1k: f64,
    /// Of the busiest replica, in MiB.
    peak_rss_mib: f64,
    /// How busy the whole machine was (every core, every process), in %.
    machine_busy_pct: f64,
}

impl Measured {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs the load once against `replicas` ingest processes on a fresh database.
async fn measure(
    args: &ThroughputArgs,
    runs: &[Runs],
    replicas: usize,
) -> anyhow::Result<Measured> {
    let db = BenchDb::fresh(&args.database_url).await?;
    let per_replica = args.agents.div_ceil(replicas);
    let mut ingest_args = vec!["--max-streams".to_string(), (per_replica + 100).to_string()];
    ingest_args.extend(args.ingest_args.iter().cloned());
    let ingests = (0..replicas)
        .map(|_| {
            IngestProcess::start_logging(
                &db.url,
                "127.0.0.1:0",
                &ingest_args,
                &args.ingest_rust_log,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let urls: Vec<String> = ingests
        .iter()
        .map(|i| format!("http://{}", i.addr))
        .collect();
    let total_events = (2 * args.agents * args.runs) as u64;
    let latencies = Arc::new(Latencies::default());
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir()?;
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(2.0 * args.agents as f64 / r));

    let ingest_cpu = || ingests.iter().map(IngestProcess::cpu_seconds).sum::<f64>();
    let cpu_before = (
        ingest_cpu(),
        process::own_cpu_seconds(),
        process::machine_cpu_ticks(),
    );
    let pg_cpu = process::PgCpu::start(db.name());
    let started = Instant::now();
    let mut senders = Vec::new();
    let mut feeders = tokio::task::JoinSet::new();
    for (a, agent_runs) in runs.iter().enumerate() {
        let pc = format!("bench-{a:05}");
        let url = &urls[a % replicas];
        let queue = if args.outbox {
            let outbox = TimedOutbox::open(&dir.path().join(&pc), latencies.clone()).await?;
            let outbox = Arc::new(outbox);
            senders.push(load::spawn_sender(outbox.clone(), url, &pc, &stop));
            AgentQueue::Outbox(outbox)
        } else {
            let queue = Arc::new(MemoryQueue::new(latencies.clone()));
            senders.push(load::spawn_sender(queue.clone(), url, &pc, &stop));
            AgentQueue::Memory(queue)
        };
        let (agent_runs, shape) = (agent_runs.clone(), args.shape);
        feeders.spawn(async move { queue.feed(agent_runs, shape, interval).await });
    }
    while let Some(fed) = feeders.join_next().await {
        fed??;
    }
    latencies
        .wait_for(total_events, Duration::from_secs(60))
        .await?;
    let elapsed = started.elapsed();
    let machine = process::machine_cpu_ticks();
    let per_1k = |seconds: f64| 1000.0 * seconds / total_events as f64;
    let (p50, p99, max) = latencies.summary();
    let measured = Measured {
        events: total_events,
        elapsed,
        p50,
        p99,
        max,
        ingest_cpu_per_1k: per_1k(ingest_cpu() - cpu_before.0),
        pg_cpu_per_1k: per_1k(pg_cpu.seconds()),
        agents_cpu_per_1k: per_1k(process::own_cpu_seconds() - cpu_before.1),
        peak_rss_mib: ingests
            .iter()
            .map(|i| i.peak_rss_bytes() as f64 / 1048576.0)
            .fold(0.0, f64::max),
        machine_busy_pct: 100.0 * (machine.0 - cpu_before.2.0) as f64
            / (machine.1 - cpu_before.2.1).max(1) as f64,
    };
    stop.cancel();
    for s in senders {
        let _ = s.await;
    }
    drop(ingests);
    db.drop_database().await;
    Ok(measured)
}

/// PostgreSQL's ceilings for one set of runs, measured on a fresh database.
#[derive(Debug, Clone, Copy)]
struct Ceilings {
    /// All running rows, then all results: the separated shape's ceiling.
    separated: Ceiling,
    /// The same writes pipelined, as ingest's batches carry them.
    pipelined: Ceiling,
    /// The same writes with the results out of order, as a fleet finishes its runs.
    out_of_order: Ceiling,
    /// One merged, finished row per run.
    back_to_back: Ceiling,
    /// Events per second at one row per transaction.
    single_row_per_s: f64,
}

/// PostgreSQL's ceilings for the same runs; `None` for SQLite, which has none.
async fn measure_ceilings(
    args: &ThroughputArgs,
    runs: &[Runs],
) -> anyhow::Result<Option<Ceilings>> {
    let baseline = BenchDb::fresh(&args.database_url).await?;
    if !baseline.is_postgres() {
        return Ok(None);
    }
    let store = Arc::new(store::PostgresStore::connect(&baseline.url).await?);
    store.migrate().await?;
    // Today's partition, as a serving ingest creates it (the runs' ids were minted now).
    store
        .prepare_days(chrono::Utc::now().date_naive(), 1)
        .await?;
    let to_write = |body: EventBody| RunWrite::from_event(body).expect("valid ids");
    // In id order: each statement writes one stretch of the index, the best case.
    let mut all: Vec<&(EventStarted, ExecResult)> = runs.iter().flatten().collect();
    all.sort_by(|a, b| a.0.result_id.cmp(&b.0.result_id));
    let (started, results): (Vec<RunWrite>, Vec<RunWrite>) = all
        .into_iter()
        .map(|(s, r)| {
            (
                to_write(EventBody::Started(s.clone())),
                to_write(EventBody::Result(r.clone())),
            )
        })
        .unzip();
    let ceilings = Ceilings {
        separated: ceiling::separated(&store, &started, &results).await?,
        pipelined: ceiling::pipelined(&store, &started, &results).await?,
        out_of_order: ceiling::out_of_order(&store, &started, &results).await?,
        back_to_back: ceiling::back_to_back(&store, &started, &results).await?,
        single_row_per_s: ceiling::one_row_per_transaction(&store, &started, &results, 1500)
            .await?,
    };
    store.pool().close().await;
    baseline.drop_database().await;
    Ok(Some(ceilings))
}

pub async fn run(args: ThroughputArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.agents >= 1 && args.runs >= 1 && args.replicas >= 1,
        "--agents, --runs and --replicas must be at least 1"
    );
    anyhow::ensure!(
        !(args.outbox && args.shape == Shape::Separated),
        "--outbox writes a run's Started and Result in one go: use it with --shape back-to-back"
    );
    // Minted round by round (every agent's first run, then every agent's second…), so the ids
    // (UUIDv7, minted when a run starts) rise in the order the runs are sent, as a fleet's do.
    // Minted agent by agent, each agent's runs would be one stretch of the index, which
    // PostgreSQL writes faster than a fleet's order (BENCHMARKS.md).
    let mut runs: Vec<Runs> = vec![Vec::with_capacity(args.runs); args.agents];
    for _ in 0..args.runs {
        for (a, agent_runs) in runs.iter_mut().enumerate() {
            agent_runs.push(load::run_events(
                &format!("bench-{a:05}"),
                args.output_bytes,
            ));
        }
    }
    let one_replica = if args.replicas > 1 {
        Some(measure(&args, &runs, 1).await?)
    } else {
        None
    };
    let kanade = measure(&args, &runs, args.replicas).await?;
    let ceilings = if args.no_ceiling {
        None
    } else {
        measure_ceilings(&args, &runs).await?
    };

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let events_per_s = kanade.events_per_s();
    println!(
        "kanade ({} shape): {events_per_s:.0} events/s committed and acked ({} agents × {} runs over {} replica{}, {} events in {:.2} s{})",
        args.shape.name(),
        args.agents,
        args.runs,
        args.replicas,
        if args.replicas == 1 { "" } else { "s" },
        kanade.events,
        kanade.elapsed.as_secs_f64(),
        if args.outbox {
            ", through SQLite outboxes"
        } else {
            ""
        }
    );
    println!(
        "ack latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(kanade.p50),
        ms(kanade.p99),
        ms(kanade.max)
    );
    println!(
        "CPU per 1,000 events: ingest {:.4} s, PostgreSQL {:.4} s, simulated agents {:.4} s; the machine was {:.0} % busy; ingest peak RSS {:.1} MiB",
        kanade.ingest_cpu_per_1k,
        kanade.pg_cpu_per_1k,
        kanade.agents_cpu_per_1k,
        kanade.machine_busy_pct,
        kanade.peak_rss_mib
    );
    if let Some(one) = &one_replica {
        println!(
            "one replica, same load: {:.0} events/s; {} replicas / one = {:.2}",
            one.events_per_s(),
            args.replicas,
            events_per_s / one.events_per_s()
        );
    }
    let own_ceiling = ceilings.map(|c| match args.shape {
        Shape::Separated => c.separated,
        Shape::BackToBack => c.back_to_back,
    });
    if let (Some(c), Some(own)) = (&ceilings, &own_ceiling) {
        println!(
            "PostgreSQL ceiling (ingest's statement, {}-row statements, {} connections): separated {:.0} events/s ({:.3} s CPU per 1,000), back to back {:.0} events/s ({:.3} s CPU per 1,000); one row per transaction {:.0} events/s",
            ceiling::STATEMENT_ROWS,
            ceiling::CONNECTIONS,
            c.separated.events_per_s,
            c.separated.pg_cpu_per_1k,
            c.back_to_back.events_per_s,
            c.back_to_back.pg_cpu_per_1k,
            c.single_row_per_s,
        );
        println!(
            "the separated writes pipelined (each statement finishing the runs started two statements earlier and starting new ones, in id order): {:.0} events/s ({:.3} s CPU per 1,000)",
            c.pipelined.events_per_s, c.pipelined.pg_cpu_per_1k,
        );
        println!(
            "the separated writes with the results out of order (shuffled, as runs of different lengths finish; each statement sorted by id, as ingest sorts a batch): {:.0} events/s ({:.3} s CPU per 1,000)",
            c.out_of_order.events_per_s, c.out_of_order.pg_cpu_per_1k,
        );
        println!(
            "ratio = kanade / its shape's ceiling = {:.2}; kanade / separated ceiling = {:.2}",
            events_per_s / own.events_per_s,
            events_per_s / c.separated.events_per_s
        );
    }
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("na".to_string(), |v| format!("{v:.digits$}"));
    let summary = format!(
        "mode=throughput shape={} agents={} runs={} replicas={} outbox={} rate={} rust_log={} events={} events_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} ingest_cpu_s_per_1k={:.4} pg_cpu_s_per_1k={:.4} agents_cpu_s_per_1k={:.4} machine_busy_pct={:.0} ingest_peak_rss_mib={:.1} one_replica_events_per_s={} replicas_ratio={} ceiling_separated={} ceiling_back_to_back={} ceiling_pg_cpu_s_per_1k={} ceiling_pipelined={} ceiling_pipelined_pg_cpu_s_per_1k={} ceiling_out_of_order={} ceiling_out_of_order_pg_cpu_s_per_1k={} single_row_per_s={} ratio={} ratio_vs_separated={}",
        args.shape.name(),
        args.agents,
        args.runs,
        args.replicas,
        args.outbox,
        args.rate.map_or("max".into(), |r| format!("{r:.0}")),
        args.ingest_rust_log,
        kanade.events,
        events_per_s,
        ms(kanade.p50),
        ms(kanade.p99),
        ms(kanade.max),
        kanade.ingest_cpu_per_1k,
        kanade.pg_cpu_per_1k,
        kanade.agents_cpu_per_1k,
        kanade.machine_busy_pct,
        kanade.peak_rss_mib,
        opt(one_replica.map(|o| o.events_per_s()), 0),
        opt(one_replica.map(|o| events_per_s / o.events_per_s()), 3),
        opt(ceilings.map(|c| c.separated.events_per_s), 0),
        opt(ceilings.map(|c| c.back_to_back.events_per_s), 0),
        opt(own_ceiling.map(|c| c.pg_cpu_per_1k), 4),
        opt(ceilings.map(|c| c.pipelined.events_per_s), 0),
        opt(ceilings.map(|c| c.pipelined.pg_cpu_per_1k), 4),
        opt(ceilings.map(|c| c.out_of_order.events_per_s), 0),
        opt(ceilings.map(|c| c.out_of_order.pg_cpu_per_1k), 4),
        opt(ceilings.map(|c| c.single_row_per_s), 0),
        opt(own_ceiling.map(|c| events_per_s / c.events_per_s), 3),
        opt(ceilings.map(|c| events_per_s / c.separated.events_per_s), 3),
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
