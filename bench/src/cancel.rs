//! `kanade-bench cancel`: how long an operator's cancel takes to end a run (SPEC §14's target:
//! process gone within 1 s p99, whether the agent's stream is on the replica the cancel was sent
//! to or on another).
//!
//! Two real ingest replicas share one fresh PostgreSQL database; a real agent daemon holds its
//! stream to one of them ("near"). For each sample a real `kanade-agent exec` starts a run that
//! writes its pid and sleeps (the daemon delivers its Started), the benchmark waits until ingest
//! lists it as running, then sends `Control/CancelExecution` alternately to the near replica and
//! to the other one, and watches `/proc` (every millisecond) until the run's process is gone.
//! The latency is request sent → process gone: the commit of the request, the cross-replica
//! `NOTIFY` (other replica only), the agent's stream, its run's control socket, and the TERM.
//!
//! The baseline, measured in the same run between samples, is one unary call (`GetExecution`)
//! to the same replicas: what any request costs here, so a reader sees how many round trips a
//! cancel is.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use kanade_shared::pb::{self, activity_client::ActivityClient, control_client::ControlClient};
use kanade_testkit::percentile;

use crate::{
    process::{Guard, TwoReplicas, running},
    report,
};

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// postgres://USER@HOST/DB: a fresh database is created beside it, shared by two replicas.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Cancels timed, half through the replica holding the agent's stream, half through the
    /// other.
    #[arg(long, default_value_t = 100)]
    pub cancels: usize,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// Whether process `pid` still exists (and is no zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// Waits (bounded) until `check` holds, polling every millisecond.
async fn until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

pub async fn run(args: CancelArgs) -> anyhow::Result<()> {
    let setting = TwoReplicas::start(&args.database_url, "bench-cancel", "a cancel").await?;
    let (near_channel, other_channel) =
        (setting.near_channel.clone(), setting.other_channel.clone());
    let (config, agent) = (setting.config.clone(), setting.agent.clone());
    let dir = setting.dir().to_path_buf();
    let mut activity = ActivityClient::new(near_channel.clone());

    let (mut same, mut across, mut rpc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.cancels {
        let pid_file = dir.join(format!("pid-{i}"));
        let manifest = format!("nap-{i}");
        let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
        let mut exec = Guard(
            Command::new(&agent)
                .args(["exec", "--config"])
                .arg(&config)
                .args([
                    "--quiet",
                    "--manifest",
                    &manifest,
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting kanade-agent exec")?,
        );
        let mut pid = None;
        until("the run's pid", Duration::from_secs(30), || {
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            pid.is_some()
        })
        .await?;
        let pid = pid.expect("read");
        let result_id = running(&mut activity, &manifest).await?;
        let through_other = i % 2 == 1;
        let channel = if through_other {
            &other_channel
        } else {
            &near_channel
        };
        // The baseline: one unary call to the same replica.
        let asked = Instant::now();
        ActivityClient::new(channel.clone())
            .get_execution(pb::GetExecutionRequest {
                result_id: result_id.clone(),
            })
            .await?;
        rpc.push(asked.elapsed());

        let asked = Instant::now();
        ControlClient::new(channel.clone())
            .cancel_execution(pb::CancelExecutionRequest {
                result_id,
                reason: "kanade-bench cancel".into(),
            })
            .await?;
        until(
            "the cancelled run's process to end",
            Duration::from_secs(30),
            || !alive(pid),
        )
        .await?;
        let took = asked.elapsed();
        if through_other {
            across.push(took);
        } else {
            same.push(took);
        }
        let _ = exec.0.wait();
    }
    setting.finish().await;

    for samples in [&mut same, &mut across, &mut rpc] {
        samples.sort();
    }
    let ms = |samples: &[Duration], q: f64| {
        percentile(samples, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "cancel → process gone, {} through the replica holding the agent's stream: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        same.len(),
        ms(&same, 0.5),
        ms(&same, 0.99),
        ms(&same, 1.0)
    );
    println!(
        "cancel → process gone, {} through the other replica: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        across.len(),
        ms(&across, 0.5),
        ms(&across, 0.99),
        ms(&across, 1.0)
    );
    println!(
        "baseline, one unary call (GetExecution) to the same replicas: p50 {:.2} ms, p99 {:.2} ms",
        ms(&rpc, 0.5),
        ms(&rpc, 0.99)
    );
    let summary = format!(
        "mode=cancel cancels={} same_p50_ms={:.1} same_p99_ms={:.1} other_p50_ms={:.1} \
         other_p99_ms={:.1} rpc_p50_ms={:.2} rpc_p99_ms={:.2} target_p99_ms=1000",
        args.cancels,
        ms(&same, 0.5),
        ms(&same, 0.99),
        ms(&across, 0.5),
        ms(&across, 0.99),
        ms(&rpc, 0.5),
        ms(&rpc, 0.99)
    );
    if let Some(csv) = &args.csv {
        report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
