//! `kanade-bench tail`: live output (SPEC §14's target: a script's write reaches its watcher
//! within 500 ms p99, on the replica holding the agent's stream and on another; an untailed run
//! costs the agent nothing beyond its capture).
//!
//! Two real ingest replicas share one fresh PostgreSQL database; a real agent daemon holds its
//! stream to one of them ("near").
//!
//! - **Latency.** A real `kanade-agent exec` run prints the wall clock (`date +%s%N`) every
//!   200 ms; a `Control/TailExecution` watcher on the near replica, then one on the other,
//!   reads the lines and subtracts each printed instant from the instant it arrived (one clock:
//!   the same machine). Lines written before the watcher's first chunk (what the agent held)
//!   are left out. Baseline: one unary call (`GetExecution`) to the same replica.
//! - **Agent CPU.** A run printing 1 KiB lines every 10 ms, once with nobody watching and once
//!   watched, and the CPU time of the run's `exec` process and of the daemon (which forwards
//!   the output) over each. With `--baseline-agent`, the unwatched run also with that binary (an
//!   agent built before live output existed), in the same invocation.
//! - **Ingest memory.** `--watched` simulated agents (each one run, answering `Tail` with a
//!   chunk of `--chunk-bytes` every 200 ms) watched through the other replica, so every byte
//!   crosses replicas: both replicas' resident memory before, while every watcher reads, and
//!   while none reads (each watcher's queue is bounded).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::Args;
use kanade_shared::pb::{
    self, activity_client::ActivityClient, control_client::ControlClient,
    ingest_client::IngestClient, tail_execution_response::Event,
};
use kanade_testkit::{AgentStream, Run, percentile};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    process::{self, Guard, IngestProcess, TwoReplicas, running},
    report,
};

#[derive(Debug, Args)]
pub struct TailArgs {
    /// postgres://USER@HOST/DB: a fresh database is created beside it, shared by two replicas.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Lines timed per replica (one every 200 ms).
    #[arg(long, default_value_t = 150)]
    pub lines: usize,
    /// Seconds of output for each agent CPU measurement.
    #[arg(long, default_value_t = 10)]
    pub cpu_seconds: u64,
    /// An older kanade-agent binary: its unwatched run is measured too, as the baseline.
    #[arg(long)]
    pub baseline_agent: Option<PathBuf>,
    /// Runs watched at once for the memory measurement (simulated agents).
    #[arg(long, default_value_t = 100)]
    pub watched: usize,
    /// Bytes each simulated run writes every 200 ms.
    #[arg(long, default_value_t = 4096)]
    pub chunk_bytes: usize,
    /// How long the memory measurement reads (nobody reads for three times as long after).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub measure: Duration,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// `kanade-agent exec` of `script` (manifest `manifest`), writing into the daemon's data dir.
fn exec(agent: &Path, config: &Path, manifest: &str, script: &str) -> anyhow::Result<Guard> {
    Ok(Guard(
        Command::new(agent)
            .args(["exec", "--config"])
            .arg(config)
            .args(["--quiet", "--manifest", manifest, "--", "sh", "-c", script])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting kanade-agent exec")?,
    ))
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Follows `result_id` through `channel` to its end: write → arrival of each line printed
/// after the first chunk arrived.
async fn line_latencies(channel: &Channel, result_id: &str) -> anyhow::Result<Vec<Duration>> {
    let mut stream = ControlClient::new(channel.clone())
        .tail_execution(pb::TailExecutionRequest {
            result_id: result_id.to_string(),
        })
        .await?
        .into_inner();
    let mut first_chunk_ns = None;
    let mut partial = String::new();
    let mut latencies = Vec::new();
    while let Some(message) = stream.message().await? {
        let arrived = now_ns();
        match message.event {
            Some(Event::Chunk(chunk)) if chunk.stream() == pb::OutputStream::Stdout => {
                let first = *first_chunk_ns.get_or_insert(arrived);
                partial.push_str(&chunk.data);
                while let Some(end) = partial.find('\n') {
                    let line: String = partial.drain(..=end).collect();
                    if let Ok(written) = line.trim().parse::<u128>()
                        && written > first
                    {
                        latencies
                            .push(Duration::from_nanos(arrived.saturating_sub(written) as u64));
                    }
                }
            }
            Some(Event::Finished(_)) => break,
            _ => {}
        }
    }
    Ok(latencies)
}

/// CPU seconds of `pid` and of `daemon` while `pid` runs to its end.
fn cpu_while_running(exec: &mut Guard, daemon: u32) -> anyhow::Result<(f64, f64)> {
    let pid = exec.0.id();
    let daemon_before = process::cpu_seconds(daemon);
    let mut last = 0.0;
    loop {
        // Read while it runs: once reaped, /proc no longer has it.
        let now = process::cpu_seconds(pid);
        if exec.0.try_wait()?.is_some() {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((last, process::cpu_seconds(daemon) - daemon_before))
}

/// A script printing 10 KiB lines as fast as a shell loop with a 10 ms pause goes, for
/// `seconds` (several hundred KiB/s: above the agent's live output cap).
fn busy_script(seconds: u64) -> String {
    format!(
        "end=$(($(date +%s) + {seconds})); while [ $(date +%s) -lt $end ]; do \
         head -c 10239 /dev/zero | tr '\\0' x; echo; sleep 0.01; done"
    )
}

/// A simulated agent with one running run that answers `Tail` with `chunk_bytes` every 200 ms.
async fn simulated_agent(
    ingest: std::net::SocketAddr,
    pc_id: String,
    chunk_bytes: usize,
    stop: CancellationToken,
) -> anyhow::Result<String> {
    let mut client = IngestClient::connect(format!("http://{ingest}")).await?;
    let mut stream = AgentStream::open(&mut client, &pc_id).await;
    let run = Run::new(&pc_id);
    stream.send(run.started_event(1)).await;
    let result_id = run.result_id.clone();
    let id = result_id.clone();
    tokio::spawn(async move {
        let data = format!("{}\n", "o".repeat(chunk_bytes.saturating_sub(1)));
        let mut watched = false;
        let mut offset = 0u64;
        let mut beat = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(pb::ingest_message::Msg::Tail(tail)) if tail.result_id == id => watched = tail.watch,
                    Some(_) => {}
                    None => return,
                },
                _ = beat.tick() => {
                    if watched {
                        let chunk = pb::OutputChunk {
                            result_id: id.clone(),
                            stream: pb::OutputStream::Stdout as i32,
                            offset,
                            data: data.clone(),
                            length: data.len() as u64,
                        };
                        offset += data.len() as u64;
                        let message = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Output(chunk)) };
                        if stream.tx.send(message).await.is_err() { return }
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    });
    Ok(result_id)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let mut setting = TwoReplicas::start(&args.database_url, "bench-tail", "a watcher").await?;
    let (near_channel, other_channel) =
        (setting.near_channel.clone(), setting.other_channel.clone());
    let (config, agent) = (setting.config.clone(), setting.agent.clone());
    let daemon_pid = setting.daemon.as_ref().map_or(0, |d| d.0.id());
    let mut activity = ActivityClient::new(near_channel.clone());

    // Latency: write → watcher, on each replica, against one unary call.
    let mut results = Vec::new();
    for (name, channel) in [("same", &near_channel), ("other", &other_channel)] {
        let manifest = format!("clock-{name}");
        let script = format!(
            "i=0; while [ $i -lt {} ]; do date +%s%N; i=$((i+1)); sleep 0.2; done",
            args.lines + 5
        );
        let mut run = exec(&agent, &config, &manifest, &script)?;
        let result_id = running(&mut activity, &manifest).await?;
        let mut rpc = Vec::new();
        for _ in 0..20 {
            let asked = Instant::now();
            ActivityClient::new(channel.clone())
                .get_execution(pb::GetExecutionRequest {
                    result_id: result_id.clone(),
                })
                .await?;
            rpc.push(asked.elapsed());
        }
        let mut latencies = line_latencies(channel, &result_id).await?;
        let _ = run.0.wait();
        latencies.sort();
        rpc.sort();
        results.push((name, latencies, rpc));
    }

    // Agent CPU: a busy run unwatched, then watched (and unwatched with an older agent).
    let script = busy_script(args.cpu_seconds);
    let mut cpu = Vec::new();
    let mut cases: Vec<(&str, PathBuf, bool)> = vec![
        ("unwatched", agent.clone(), false),
        ("watched", agent.clone(), true),
    ];
    if let Some(baseline) = &args.baseline_agent {
        cases.insert(0, ("unwatched, baseline agent", baseline.clone(), false));
    }
    for (i, (case, binary, watched)) in cases.into_iter().enumerate() {
        let manifest = format!("busy-{i}");
        let mut run = exec(&binary, &config, &manifest, &script)?;
        let result_id = running(&mut activity, &manifest).await?;
        let running_id = result_id.clone();
        let watcher = watched.then(|| {
            let channel = near_channel.clone();
            tokio::spawn(async move {
                let mut bytes = 0u64;
                let mut stream = ControlClient::new(channel)
                    .tail_execution(pb::TailExecutionRequest { result_id })
                    .await?
                    .into_inner();
                while let Some(message) = stream.message().await? {
                    if let Some(Event::Chunk(chunk)) = message.event {
                        bytes += chunk.length;
                    }
                }
                anyhow::Ok(bytes)
            })
        });
        let (exec_cpu, daemon_cpu) = cpu_while_running(&mut run, daemon_pid)?;
        let followed = match watcher {
            Some(watcher) => watcher.await??,
            None => 0,
        };
        // The run's result reaches ingest through the daemon a moment after exec ends.
        let stored = loop {
            let stored = activity
                .get_execution(pb::GetExecutionRequest {
                    result_id: running_id.clone(),
                })
                .await?
                .into_inner();
            if stored.finished_at.is_some() {
                break stored;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let written = stored.stdout.len() as u64 + stored.stdout_dropped_bytes;
        cpu.push((case, exec_cpu, daemon_cpu, written, followed));
    }
    setting.stop_daemon();
    let (near, other) = (&setting.near, &setting.other);

    // Ingest memory with many watched runs, every byte crossing replicas.
    let stop = CancellationToken::new();
    let rss = |p: &IngestProcess| p.rss_bytes();
    let before = (rss(near), rss(other));
    let mut ids = Vec::new();
    for i in 0..args.watched {
        ids.push(
            simulated_agent(
                near.addr,
                format!("bench-tail-{i}"),
                args.chunk_bytes,
                stop.clone(),
            )
            .await?,
        );
    }
    let mut activity_other = ActivityClient::new(other_channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        while activity_other
            .get_execution(pb::GetExecutionRequest {
                result_id: id.clone(),
            })
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("run {id} never became visible");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut watchers = Vec::new();
    for id in &ids {
        let stream = ControlClient::new(other_channel.clone())
            .tail_execution(pb::TailExecutionRequest {
                result_id: id.clone(),
            })
            .await?
            .into_inner();
        let (received, reading, stop) = (received.clone(), reading.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            let mut stream = stream;
            loop {
                while !reading.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(pb::TailExecutionResponse { event: Some(Event::Chunk(c)) })) => {
                            received.fetch_add(c.length, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        }));
    }
    let measure = args.measure;
    let cpu_before = (near.cpu_seconds(), other.cpu_seconds());
    let pg = process::PgCpu::start(setting.db.name());
    let received_before = received.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(measure).await;
    let flowing = received.load(std::sync::atomic::Ordering::Relaxed) - received_before;
    let reading_rss = (rss(near), rss(other));
    let cpu_reading = (
        near.cpu_seconds() - cpu_before.0,
        other.cpu_seconds() - cpu_before.1,
        pg.seconds(),
    );
    // Nobody reads: each watcher's queue fills to its bound (256 KiB), and so do the HTTP/2
    // buffers in front of it; then memory holds still.
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let stall_began = Instant::now();
    let mut stalled = Vec::new();
    for after in [1, 3, 6] {
        tokio::time::sleep_until((stall_began + measure * after).into()).await;
        stalled.push((measure * after, rss(near), rss(other)));
    }
    let peak = (near.peak_rss_bytes(), other.peak_rss_bytes());
    stop.cancel();
    for watcher in watchers {
        let _ = watcher.await;
    }
    setting.finish().await;

    let ms = |samples: &[Duration], q: f64| {
        percentile(samples, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    for (name, latencies, rpc) in &results {
        println!(
            "script write → watcher, {} lines, watcher on the {} replica: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (one unary call there: p50 {:.2} ms)",
            latencies.len(),
            if *name == "same" { "agent's" } else { "other" },
            ms(latencies, 0.5),
            ms(latencies, 0.99),
            ms(latencies, 1.0),
            ms(rpc, 0.5),
        );
    }
    for (case, exec_cpu, daemon_cpu, written, followed) in &cpu {
        println!(
            "agent CPU over a {} s run writing {} KiB/s, {case}: exec {exec_cpu:.2} s, daemon {daemon_cpu:.2} s{}",
            args.cpu_seconds,
            written / 1024 / args.cpu_seconds.max(1),
            if *followed > 0 {
                format!(
                    " ({} KiB/s followed live)",
                    followed / 1024 / args.cpu_seconds.max(1)
                )
            } else {
                String::new()
            }
        );
    }
    let stalled_text: Vec<String> = stalled
        .iter()
        .map(|(after, holder, watchers)| {
            format!(
                "{:.1} / {:.1} MiB after {} s",
                mib(*holder),
                mib(*watchers),
                after.as_secs()
            )
        })
        .collect();
    println!(
        "ingest with {} watched runs ({} B every 200 ms each, watched on the other replica): \
         holder {:.1} → {:.1} MiB, watchers' replica {:.1} → {:.1} MiB while reading \
         ({:.0} KiB/s arrived; CPU holder {:.2} s, watchers' replica {:.2} s, PostgreSQL {:.2} s \
         over {} s); nobody reading: {}; peak {:.1} / {:.1} MiB",
        args.watched,
        args.chunk_bytes,
        mib(before.0),
        mib(reading_rss.0),
        mib(before.1),
        mib(reading_rss.1),
        flowing as f64 / 1024.0 / measure.as_secs_f64(),
        cpu_reading.0,
        cpu_reading.1,
        cpu_reading.2,
        measure.as_secs(),
        stalled_text.join(", "),
        mib(peak.0),
        mib(peak.1),
    );
    let cpu_of = |case: &str| cpu.iter().find(|c| c.0 == case).map(|c| (c.1, c.2));
    let pg_cpu = cpu_reading.2;
    let (unwatched, watched) = (
        cpu_of("unwatched").unwrap_or_default(),
        cpu_of("watched").unwrap_or_default(),
    );
    let summary = format!(
        "mode=tail lines={} same_p50_ms={:.1} same_p99_ms={:.1} other_p50_ms={:.1} \
         other_p99_ms={:.1} rpc_p50_ms={:.2} target_p99_ms=500 exec_cpu_unwatched_s={:.2} \
         exec_cpu_watched_s={:.2} daemon_cpu_unwatched_s={:.2} daemon_cpu_watched_s={:.2}{} \
         watched_runs={} holder_rss_mib={:.1}/{:.1}/{:.1} watcher_rss_mib={:.1}/{:.1}/{} \
         crossing_kib_s={:.0} pg_cpu_s={pg_cpu:.2}",
        args.lines,
        ms(&results[0].1, 0.5),
        ms(&results[0].1, 0.99),
        ms(&results[1].1, 0.5),
        ms(&results[1].1, 0.99),
        ms(&results[0].2, 0.5),
        unwatched.0,
        watched.0,
        unwatched.1,
        watched.1,
        cpu_of("unwatched, baseline agent")
            .map(|c| format!(" exec_cpu_baseline_agent_s={:.2}", c.0))
            .unwrap_or_default(),
        args.watched,
        mib(before.0),
        mib(reading_rss.0),
        mib(stalled.last().map_or(0, |s| s.1)),
        mib(before.1),
        mib(reading_rss.1),
        stalled
            .iter()
            .map(|s| format!("{:.1}", mib(s.2)))
            .collect::<Vec<_>>()
            .join("/"),
        flowing as f64 / 1024.0 / measure.as_secs_f64(),
    );
    if let Some(csv) = &args.csv {
        report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
