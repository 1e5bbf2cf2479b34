//! `kanade-bench agent`: the agent's footprint on an endpoint — what the idle daemon costs
//! (CPU, resident memory, wake-ups), what `kanade-agent exec` adds to a command, how fast the
//! outbox commits runs with `synchronous=FULL`, and how large the binaries are.
//!
//! Wake-ups are counted as context switches (voluntary and involuntary) summed over the daemon's
//! threads: each time a thread goes back to sleep after waking counts once. A thread that exits
//! during the window takes its count with it, so the thread count is shown at both ends. One
//! wake of the daemon hands work between several threads (tokio workers, sqlx's SQLite worker
//! threads), so it costs many switches; the switch counts are therefore also sampled every
//! [`BURST_SAMPLE`] and each run of samples that saw switches counts as one burst: how often
//! the daemon wakes at all.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use clap::Args;
use kanade_agent::{config::Synchronous, outbox::Outbox};

use crate::{
    load,
    process::{self, BenchDb, IngestProcess},
};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// How long the idle daemon is watched.
    #[arg(long, default_value_t = 60)]
    pub idle_seconds: u64,
    /// `kanade-agent exec -- true` runs timed (and as many `true` run directly).
    #[arg(long, default_value_t = 50)]
    pub execs: usize,
    /// Runs (Started + Result) committed to the outbox for the enqueue rate.
    #[arg(long, default_value_t = 500)]
    pub enqueues: usize,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How often the idle daemon's context switches are sampled to count wake bursts.
const BURST_SAMPLE: Duration = Duration::from_millis(10);

/// Context switches summed over a process's threads, and how many threads it has.
fn context_switches(pid: u32) -> (u64, usize) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut switches = 0;
    let mut threads = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        threads += 1;
        switches += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    (switches, threads)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The idle daemon's figures.
struct Idle {
    cpu_pct: f64,
    rss: u64,
    peak_rss: u64,
    wakeups_per_s: f64,
    bursts_per_s: f64,
    threads: (usize, usize),
    connection: String,
}

async fn idle_daemon(agent: &Path, idle: Duration) -> anyhow::Result<Idle> {
    let db = BenchDb::fresh("sqlite://bench").await?;
    let ingest = {
        let url = db.url.clone();
        tokio::task::spawn_blocking(move || IngestProcess::start(&url, "127.0.0.1:0", &[]))
            .await??
    };
    let data_dir = tempfile::tempdir()?;
    let ingest_url = format!("http://{}", ingest.addr);
    let daemon = Guard(
        Command::new(agent)
            .arg("run")
            .args(["--ingest", &ingest_url, "--pc-id", "idle", "--data-dir"])
            .arg(data_dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting kanade-agent run")?,
    );
    let pid = daemon.0.id();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (cpu0, (switches0, threads0)) = (process::cpu_seconds(pid), context_switches(pid));
    let t = Instant::now();
    let bursts = tokio::task::spawn_blocking(move || {
        let (mut last, mut was_active, mut bursts) = (switches0, false, 0u64);
        while t.elapsed() < idle {
            std::thread::sleep(BURST_SAMPLE);
            let (now, _) = context_switches(pid);
            // A sum that dropped means a thread exited, which is activity too.
            let active = now != last;
            if active && !was_active {
                bursts += 1;
            }
            (last, was_active) = (now, active);
        }
        bursts
    })
    .await?;
    let (cpu1, (switches1, threads1)) = (process::cpu_seconds(pid), context_switches(pid));
    let secs = t.elapsed().as_secs_f64();
    let rss = process::status_kib(pid, "VmRSS:") * 1024;
    let peak_rss = process::status_kib(pid, "VmHWM:") * 1024;

    // Proof that the daemon was idle while connected, not idle because it failed to connect.
    let status = Command::new(agent)
        .arg("status")
        .arg("--data-dir")
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .context("running kanade-agent status")?;
    let connection = String::from_utf8_lossy(&status.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("connection:"))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    drop(daemon);
    drop(ingest);
    Ok(Idle {
        cpu_pct: 100.0 * (cpu1 - cpu0) / secs,
        rss,
        peak_rss,
        wakeups_per_s: switches1.saturating_sub(switches0) as f64 / secs,
        bursts_per_s: bursts as f64 / secs,
        threads: (threads0, threads1),
        connection,
    })
}

/// Mean wall time of running `command` `n` times, after one untimed warm-up run.
fn mean_run(mut command: Command, n: usize) -> anyhow::Result<Duration> {
    command.stdout(Stdio::null());
    let mut once = || -> anyhow::Result<()> {
        let status = command
            .status()
            .with_context(|| format!("running {command:?}"))?;
        ensure!(status.success(), "{command:?} exited with {status}");
        Ok(())
    };
    once()?;
    let t = Instant::now();
    for _ in 0..n {
        once()?;
    }
    Ok(t.elapsed() / n.max(1) as u32)
}

/// Runs per second through `begin_run` + `finish_run` of a real outbox, synchronous=FULL.
async fn enqueue_rate(n: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(dir.path(), Synchronous::Full, 512 * 1024 * 1024).await?;
    let runs: Vec<_> = (0..n).map(|_| load::run_events("enqueue", 200)).collect();
    let t = Instant::now();
    for (started, result) in runs {
        let (lock, _) = outbox.begin_run(&started, &Default::default()).await?;
        outbox.finish_run(lock, result, &Default::default()).await?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let agent = process::workspace_binary("kanade-agent")?;
    let ingest_binary = process::workspace_binary("kanade-ingest")?;

    println!(
        "idle daemon: watching `kanade-agent run` for {} s (after 3 s to connect)",
        args.idle_seconds
    );
    let idle = idle_daemon(&agent, Duration::from_secs(args.idle_seconds)).await?;
    println!(
        "idle daemon: {:.3} % of one core, RSS {:.1} MiB (peak {:.1} MiB), {:.2} wake-ups \
         (context switches)/s in {:.2} bursts/s over {}→{} threads; connection: {}",
        idle.cpu_pct,
        mib(idle.rss),
        mib(idle.peak_rss),
        idle.wakeups_per_s,
        idle.bursts_per_s,
        idle.threads.0,
        idle.threads.1,
        idle.connection,
    );

    // `exec` without --wait and without a daemon: open the outbox, commit Started, spawn, wait,
    // commit the Result. The ingest URL is never dialled.
    let (exec, direct) = {
        let (agent, n) = (agent.clone(), args.execs);
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Duration, Duration)> {
            let data_dir = tempfile::tempdir()?;
            let mut exec = Command::new(&agent);
            exec.arg("exec")
                .arg("--data-dir")
                .arg(data_dir.path())
                .args(["--ingest", "http://127.0.0.1:1", "--pc-id", "x"])
                .args(["--manifest", "m", "--", "true"])
                .env("RUST_LOG", "warn");
            Ok((mean_run(exec, n)?, mean_run(Command::new("true"), n)?))
        })
        .await??
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "exec: `kanade-agent exec -- true` {:.2} ms, `true` directly {:.2} ms: {:.2} ms of \
         overhead (mean of {} runs each)",
        ms(exec),
        ms(direct),
        ms(exec) - ms(direct),
        args.execs
    );

    let runs_per_s = enqueue_rate(args.enqueues).await?;
    println!(
        "outbox: {runs_per_s:.0} runs/s ({:.0} events/s) committed with synchronous=FULL ({} runs)",
        2.0 * runs_per_s,
        args.enqueues
    );

    let size = |p: &Path| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("reading {}", p.display()))?
            .len())
    };
    let (agent_size, ingest_size) = (size(&agent)?, size(&ingest_binary)?);
    println!(
        "binaries: {} {:.1} MiB, {} {:.1} MiB",
        agent.display(),
        mib(agent_size),
        ingest_binary.display(),
        mib(ingest_size)
    );

    let summary = format!(
        "mode=agent idle_cpu_pct={:.3} idle_rss_mib={:.1} wakeups_per_s={:.2} exec_ms={:.2} \
         direct_ms={:.2} exec_overhead_ms={:.2} enqueue_runs_per_s={runs_per_s:.0} \
         enqueue_events_per_s={:.0} agent_binary_mib={:.1} ingest_binary_mib={:.1} \
         wake_bursts_per_s={:.2} idle_seconds={} execs={} enqueues={}",
        idle.cpu_pct,
        mib(idle.rss),
        idle.wakeups_per_s,
        ms(exec),
        ms(direct),
        ms(exec) - ms(direct),
        2.0 * runs_per_s,
        mib(agent_size),
        mib(ingest_size),
        idle.bursts_per_s,
        args.idle_seconds,
        args.execs,
        args.enqueues,
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
