//! `kanade-agent run`: the daemon. It holds the data dir's sender lock, delivers the outbox,
//! runs scheduled jobs, reports runs of dead agent processes as INTERRUPTED (at start and every
//! `interrupted_check`), and listens on the wake socket so `exec` processes get their events
//! sent at once.
//!
//! Shutdown (SIGTERM/SIGINT): no new firings; running runs get `shutdown_grace` to finish, then
//! their process groups are killed (reported KILLED); their results are committed before exit.
//!
//! A damaged outbox (seen by the sender, the beat or a run) is logged once as an error and ends
//! the daemon the same orderly way, with its own exit status (65): retrying would change
//! nothing, and nothing could be recorded or sent until `kanade-agent outbox salvage`.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Job, Settings},
    execution::{self, RunRequest},
    outbox::{Outbox, OutboxError},
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
        status_every: settings.status_every,
    }
}

/// The first sign of a damaged outbox, seen by any of the daemon's tasks: the daemon stops
/// (nothing could be recorded or sent) instead of looping on it.
#[derive(Debug, Clone, Default)]
struct Damage {
    seen: CancellationToken,
    first: Arc<OnceLock<(std::path::PathBuf, String)>>,
}

impl Damage {
    /// Records `err` when it is damage (logging it once, as an error); true when it was.
    fn report(&self, err: &anyhow::Error) -> bool {
        let Some((file, detail)) = err.chain().find_map(|e| match e.downcast_ref() {
            Some(OutboxError::Damaged { file, detail }) => Some((file.clone(), detail.clone())),
            _ => None,
        }) else {
            return false;
        };
        if self.first.set((file, detail)).is_ok() {
            tracing::error!(error = %format!("{err:#}"),
                "the outbox is damaged: the daemon stops sending and starting runs, and exits");
        }
        self.seen.cancel();
        true
    }

    /// The damage seen, as the error the daemon ends with.
    fn error(&self) -> Option<OutboxError> {
        self.first.get().map(|(file, detail)| OutboxError::Damaged {
            file: file.clone(),
            detail: detail.clone(),
        })
    }
}

/// What every scheduled firing shares.
#[derive(Clone)]
struct Scheduler {
    outbox: Outbox,
    settings: Arc<Settings>,
    /// Bounds the runs going at once.
    concurrency: Arc<Semaphore>,
    /// Owns the running runs, so shutdown waits for them.
    runs: TaskTracker,
    /// Cancelled when the shutdown grace is over: running runs are killed.
    kill_runs: CancellationToken,
    /// Cancelled on shutdown or damage: no new firing.
    stop_firing: CancellationToken,
    damage: Damage,
}

/// Runs the daemon until `shutdown` is cancelled, or until its outbox turns out damaged (an
/// [`OutboxError::Damaged`] then ends it).
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

    let damage = Damage::default();
    let sender = tokio::spawn({
        let (outbox, config, stop, damage) = (
            outbox.clone(),
            sender_config(&settings),
            stop_sender.clone(),
            damage.clone(),
        );
        async move {
            if let Err(err) = sender::run(outbox, config, stop).await {
                damage.report(&err);
            }
        }
    });
    let scheduler = Scheduler {
        outbox: outbox.clone(),
        concurrency: Arc::new(Semaphore::new(settings.max_concurrent_runs)),
        settings: Arc::new(settings),
        runs: TaskTracker::new(),
        kill_runs: CancellationToken::new(),
        stop_firing: shutdown.child_token(),
        damage: damage.clone(),
    };
    let mut schedulers = tokio::task::JoinSet::new();
    for job in scheduler.settings.jobs.clone() {
        schedulers.spawn(scheduler.clone().fire(job));
    }

    let settings = scheduler.settings.clone();
    let mut beat = tokio::time::interval(settings.interrupted_check);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => check_outbox(&outbox, &damage).await,
            _ = shutdown.cancelled() => break,
            _ = damage.seen.cancelled() => break,
        }
    }

    scheduler.stop_firing.cancel();
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: waiting for running runs");
    while schedulers.join_next().await.is_some() {}
    scheduler.runs.close();
    if tokio::time::timeout(settings.shutdown_grace, scheduler.runs.wait())
        .await
        .is_err()
    {
        tracing::warn!("runs still going after the shutdown grace: killing them");
        scheduler.kill_runs.cancel();
        scheduler.runs.wait().await;
    }
    stop_sender.cancel();
    let _ = sender.await;
    match damage.error() {
        Some(err) => Err(anyhow::Error::from(err).context("the daemon stopped")),
        None => Ok(()),
    }
}

/// The daemon's beat: interrupted runs, and a word about the backlog when there is one.
async fn check_outbox(outbox: &Outbox, damage: &Damage) {
    match outbox.recover_interrupted().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "reported runs of dead agent processes as INTERRUPTED"
        ),
        Err(err) => {
            let err = anyhow::Error::from(err);
            if !damage.report(&err) {
                tracing::warn!(error = %format!("{err:#}"), "checking for interrupted runs failed");
            }
        }
    }
    match outbox.status().await {
        Ok(status) if status.pending_events > 0 => {
            let oldest_age = status
                .oldest_pending
                .map(|t| (chrono::Utc::now() - t).num_seconds());
            tracing::info!(pending = status.pending_events, bytes = status.pending_bytes,
                oldest_age_secs = ?oldest_age, dead_letters = status.dead_letters, "outbox backlog");
        }
        Ok(_) => {}
        Err(err) => {
            damage.report(&err.into());
        }
    }
}

impl Scheduler {
    /// Fires `job` on its schedule until shutdown or damage.
    async fn fire(self, job: Job) {
        let mut firings = Firings::new(job.schedule.clone(), job.jitter);
        let running = Arc::new(AtomicBool::new(false));
        loop {
            let Some(at) = firings.next_firing() else {
                tracing::warn!(manifest_id = %job.manifest_id, "cron expression never fires again");
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.stop_firing.cancelled() => return,
            }
            if running.swap(true, Ordering::SeqCst) {
                tracing::warn!(manifest_id = %job.manifest_id, "previous run still going: this firing is skipped");
                continue;
            }
            let (this, request, running) =
                (self.clone(), RunRequest::scheduled(&job), running.clone());
            self.runs.spawn(async move {
                // A firing waiting for a free slot when shutdown begins never starts.
                let permit = tokio::select! {
                    permit = this.concurrency.acquire() => permit.ok(),
                    _ = this.stop_firing.cancelled() => None,
                };
                if let Some(_permit) = permit
                    && let Err(err) =
                        execution::execute(&this.outbox, &this.settings, request, &this.kill_runs)
                            .await
                    && !this.damage.report(&err)
                {
                    tracing::error!(error = %format!("{err:#}"), "run could not be recorded");
                }
                running.store(false, Ordering::SeqCst);
            });
        }
    }
}
