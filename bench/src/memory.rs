//! `kanade-bench memory`: ingest's resident memory under a burst of large events (SPEC §12, one
//! memory budget). N simulated agents (the real sender, each its own stream) first connect and
//! idle — ingest's RSS then is the base — and then all flush R runs whose results carry
//! `--output-bytes` of stdout at once. Reported: the base, the peak (VmHWM) and the RSS once the
//! burst is over, each against the budget; and how long the median and the slowest agent took
//! to drain (a starved stream shows as a slowest agent far behind the median).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use kanade_shared::wire::EventBody;
use tokio_util::sync::CancellationToken;

use crate::{
    load::{self, Latencies, MemoryQueue},
    process::{BenchDb, IngestProcess},
};

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// postgres://USER@HOST/DB (a fresh database is created beside it) or sqlite://ANY.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Simulated agents, each with its own stream.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// Runs each agent flushes (two events each; the result carries the output).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Bytes of stdout per result.
    #[arg(long, default_value_t = 1 << 20)]
    pub output_bytes: usize,
    /// Ingest's --memory-budget (omitted: ingest's default).
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// How long after the last ack ingest's RSS is read again.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Extra flags for kanade-ingest.
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    pub ingest_args: Vec<String>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub async fn run(args: MemoryArgs) -> anyhow::Result<()> {
    let db = BenchDb::fresh(&args.database_url).await?;
    let mut ingest_args = vec!["--max-streams".to_string(), (args.agents + 100).to_string()];
    if let Some(budget) = &args.memory_budget {
        ingest_args.extend(["--memory-budget".to_string(), budget.clone()]);
    }
    ingest_args.extend(args.ingest_args.iter().cloned());
    let ingest = IngestProcess::start(&db.url, "127.0.0.1:0", &ingest_args)?;
    let url = format!("http://{}", ingest.addr);
    let latencies = Arc::new(Latencies::default());
    let stop = CancellationToken::new();
    let queues: Vec<Arc<MemoryQueue>> = (0..args.agents)
        .map(|_| Arc::new(MemoryQueue::new(latencies.clone())))
        .collect();
    let senders: Vec<_> = queues
        .iter()
        .enumerate()
        .map(|(a, q)| load::spawn_sender(q.clone(), &url, &format!("mem-{a:05}"), &stop))
        .collect();
    // Connected and idle: the base.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base = ingest.rss_bytes();

    let runs: Vec<Vec<_>> = (0..args.agents)
        .map(|a| {
            (0..args.runs)
                .map(|_| load::run_events(&format!("mem-{a:05}"), args.output_bytes))
                .collect()
        })
        .collect();
    let total = (2 * args.agents * args.runs) as u64;
    let started = Instant::now();
    for (queue, agent_runs) in queues.iter().zip(runs) {
        for (s, r) in agent_runs {
            queue.enqueue(EventBody::Started(s));
            queue.enqueue(EventBody::Result(r));
        }
    }
    // Each agent's drain, timed by its own queue's acks.
    let mut drains: tokio::task::JoinSet<anyhow::Result<Duration>> = tokio::task::JoinSet::new();
    for (a, queue) in queues.iter().enumerate() {
        let queue = queue.clone();
        drains.spawn(async move {
            loop {
                let acked = queue.acked.notified();
                if queue.is_empty() {
                    return Ok(started.elapsed());
                }
                tokio::time::timeout(Duration::from_secs(60), acked)
                    .await
                    .with_context(|| {
                        format!("agent mem-{a:05}: no ack for 60 s: is ingest stuck?")
                    })?;
            }
        });
    }
    let mut times: Vec<Duration> = Vec::with_capacity(args.agents);
    while let Some(drained) = drains.join_next().await {
        times.push(drained.context("an agent's drain panicked")??);
    }
    let elapsed = started.elapsed();
    let peak = ingest.peak_rss_bytes();
    tokio::time::sleep(args.settle).await;
    let after = ingest.rss_bytes();
    stop.cancel();
    for s in senders {
        let _ = s.await;
    }
    drop(ingest);
    db.drop_database().await;

    times.sort_unstable();
    let median = times[times.len() / 2];
    let slowest = *times.last().unwrap_or(&Duration::ZERO);
    let budget = args
        .memory_budget
        .as_deref()
        .map(kanade_ingest::config::bytes)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let budget_text = budget.map_or("ingest's default".to_string(), |b| {
        format!("{:.0} MiB", mib(b))
    });
    println!(
        "{} agents × {} runs with {} KiB outputs: {} events ({:.0} MiB) committed in {:.2} s",
        args.agents,
        args.runs,
        args.output_bytes / 1024,
        total,
        mib((args.agents * args.runs * args.output_bytes) as u64),
        elapsed.as_secs_f64()
    );
    println!(
        "ingest RSS: base {:.1} MiB (agents connected, idle); peak {:.1} MiB = base + {:.1} MiB \
         (budget {budget_text}); {:.0?} after the burst {:.1} MiB",
        mib(base),
        mib(peak),
        mib(peak.saturating_sub(base)),
        args.settle,
        mib(after)
    );
    println!(
        "agents drained: median {:.2} s, slowest {:.2} s ({:.2}× the median)",
        median.as_secs_f64(),
        slowest.as_secs_f64(),
        slowest.as_secs_f64() / median.as_secs_f64().max(1e-9)
    );
    let summary = format!(
        "mode=memory agents={} runs={} output_bytes={} budget_mib={} events={} seconds={:.2} base_rss_mib={:.1} peak_rss_mib={:.1} peak_over_base_mib={:.1} after_rss_mib={:.1} median_drain_s={:.2} slowest_drain_s={:.2}",
        args.agents,
        args.runs,
        args.output_bytes,
        budget.map_or("default".to_string(), |b| format!("{:.0}", mib(b))),
        total,
        elapsed.as_secs_f64(),
        mib(base),
        mib(peak),
        mib(peak.saturating_sub(base)),
        mib(after),
        median.as_secs_f64(),
        slowest.as_secs_f64(),
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
