//! `kanade-agent run`: the daemon. It holds the data dir's sender lock, delivers the outbox,
//! runs scheduled jobs, reports runs of dead agent processes as INTERRUPTED (at start and every
//! `interrupted_check`), and listens on the wake socket so `exec` processes get their events
//! sent at once.
//!
//! Shutdown (SIGTERM/SIGINT): no new firings; running runs get `shutdown_grace` to finish, then
//! their process groups are killed (reported KILLED); their results are committed before exit.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Job, Settings},
    execution::{self, RunRequest},
    outbox::Outbox,
    schedule::Firings,
    sender::{self, SenderConfig},
};

pub fn sender_config(settings: &Settings) -> SenderConfig {
    SenderConfig {
        ingest: settings.ingest.clone(),
        pc_id: settings.pc_id.clone(),
        tls: settings.tls.clone(),
        token: settings.token.clone(),
        window: settings.send_window,
        window_bytes: settings.send_window_bytes,
        keepalive: settings.keepalive,
        keepalive_timeout: settings.keepalive_timeout,
        reconnect: settings.reconnect,
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let outbox = Outbox::open(
        &settings.data_dir,
        settings.outbox_synchronous,
        settings.outbox_cap_bytes,
    )
    .await?;
    let _sender_lock = outbox.data_dir().try_sender_lock()?.with_context(|| {
        format!(
            "another kanade-agent is already sending from {} (a daemon, or `exec --wait`)",
            settings.data_dir.display()
        )
    })?;
    let stop_sender = CancellationToken::new();
    outbox
        .data_dir()
        .listen_for_pokes(outbox.wake.clone(), stop_sender.clone())?;
    tracing::info!(pc_id = %settings.pc_id, ingest = %settings.ingest, data_dir = %settings.data_dir.display(),
        jobs = settings.jobs.len(), "kanade-agent daemon started");

    let sender = tokio::spawn(sender::run(
        outbox.clone(),
        sender_config(&settings),
        stop_sender.clone(),
    ));
    let runs = TaskTracker::new();
    let kill_runs = CancellationToken::new();
    let concurrency = Arc::new(Semaphore::new(settings.max_concurrent_runs));
    let settings = Arc::new(settings);
    let mut schedulers = tokio::task::JoinSet::new();
    for job in settings.jobs.clone() {
        schedulers.spawn(schedule_job(
            job,
            outbox.clone(),
            settings.clone(),
            concurrency.clone(),
            runs.clone(),
            kill_runs.clone(),
            shutdown.clone(),
        ));
    }

    let mut beat = tokio::time::interval(settings.interrupted_check);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => check_outbox(&outbox).await,
            _ = shutdown.cancelled() => break,
        }
    }

    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: waiting for running runs");
    while schedulers.join_next().await.is_some() {}
    runs.close();
    if tokio::time::timeout(settings.shutdown_grace, runs.wait())
        .await
        .is_err()
    {
        tracing::warn!("runs still going after the shutdown grace: killing them");
        kill_runs.cancel();
        runs.wait().await;
    }
    stop_sender.cancel();
    let _ = sender.await;
    Ok(())
}

/// The daemon's beat: interrupted runs, and a word about the backlog when there is one.
async fn check_outbox(outbox: &Outbox) {
    match outbox.recover_interrupted().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "reported runs of dead agent processes as INTERRUPTED"
        ),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "checking for interrupted runs failed")
        }
    }
    if let Ok(status) = outbox.status().await
        && status.pending_events > 0
    {
        let oldest_age = status
            .oldest_pending
            .map(|t| (chrono::Utc::now() - t).num_seconds());
        tracing::info!(pending = status.pending_events, bytes = status.pending_bytes,
            oldest_age_secs = ?oldest_age, dead_letters = status.dead_letters, "outbox backlog");
    }
}

async fn schedule_job(
    job: Job,
    outbox: Outbox,
    settings: Arc<Settings>,
    concurrency: Arc<Semaphore>,
    runs: TaskTracker,
    kill_runs: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut firings = Firings::new(job.schedule.clone(), job.jitter);
    let running = Arc::new(AtomicBool::new(false));
    loop {
        let Some(at) = firings.next_firing() else {
            tracing::warn!(manifest_id = %job.manifest_id, "cron expression never fires again");
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = shutdown.cancelled() => return,
        }
        if running.swap(true, Ordering::SeqCst) {
            tracing::warn!(manifest_id = %job.manifest_id, "previous run still going: this firing is skipped");
            continue;
        }
        let request = RunRequest::scheduled(&job);
        let (outbox, settings, concurrency, kill, running) = (
            outbox.clone(),
            settings.clone(),
            concurrency.clone(),
            kill_runs.clone(),
            running.clone(),
        );
        let shutdown = shutdown.clone();
        runs.spawn(async move {
            // A firing waiting for a free slot when shutdown begins never starts.
            let permit = tokio::select! {
                permit = concurrency.acquire() => permit.ok(),
                _ = shutdown.cancelled() => None,
            };
            if let Some(_permit) = permit
                && let Err(err) = execution::execute(&outbox, &settings, request, &kill).await
            {
                tracing::error!(error = %format!("{err:#}"), "run could not be recorded");
            }
            running.store(false, Ordering::SeqCst);
        });
    }
}
