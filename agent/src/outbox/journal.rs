//! The run journal: a run is journalled (and its Started committed) before its process spawns,
//! and forgotten in the transaction that commits its result. A journalled run whose lock is free
//! belongs to a process that died, and is reported once as `INTERRUPTED`.

use std::{collections::BTreeMap, time::Duration};

use chrono::{SubsecRound, Utc};
use kanade_shared::{
    backoff::Backoff,
    wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus},
};
use sqlx::{Acquire, Row};

use super::{Outbox, OutboxError};
use crate::data_dir::RunLock;

/// Retries of a run's result commit before the run is left to be reported INTERRUPTED.
const FINISH_ATTEMPTS: u32 = 8;
/// Pauses between those retries.
const FINISH_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Duration::from_secs(5),
};

impl Outbox {
    /// Journals a run and commits its Started event: call before spawning. Refuses (with
    /// [`OutboxError::DiskFull`]) when the reserve for its result cannot be kept: a run that
    /// starts can always record how it ended.
    #[tracing::instrument(name = "outbox.begin_run", skip_all)]
    pub async fn begin_run(
        &self,
        started: &EventStarted,
        trace_context: &BTreeMap<String, String>,
    ) -> Result<(RunLock, u64), OutboxError> {
        self.guard(async {
            if !self.dir.ensure_reserve() {
                return Err(OutboxError::DiskFull {
                    dir: self.dir.path().to_path_buf(),
                    free_bytes: self.dir.free_bytes().unwrap_or(0),
                });
            }
            let lock = self.dir.lock_run(&started.result_id)?;
            let event = Event {
                seq: 0,
                body: EventBody::Started(started.clone()),
                trace_context: trace_context.clone(),
            };
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT INTO runs (result_id, started, trace_context) VALUES (?1, ?2, ?3)")
                .bind(&started.result_id)
                .bind(serde_json::to_string(started)?)
                .bind(serde_json::to_string(trace_context)?)
                .execute(&mut *tx)
                .await?;
            let seq = self.enqueue_in(&mut tx, event).await?;
            tx.commit().await?;
            self.wake_sender();
            Ok((lock, seq))
        })
        .await
    }

    /// Commits a run's result and forgets the run: call when it ended. A busy or briefly failing
    /// disk gets a few more tries; a full one gets the reserve's room and the result's outputs
    /// cut further (the dropped bytes recorded), then empty. Only if even that does not fit is
    /// the result lost, and the error says the run will be reported INTERRUPTED.
    #[tracing::instrument(name = "outbox.finish_run", skip_all)]
    pub async fn finish_run(
        &self,
        lock: RunLock,
        mut result: ExecResult,
        trace_context: &BTreeMap<String, String>,
    ) -> Result<u64, OutboxError> {
        // The run's lock is held until the result is committed, so no other process reports it
        // INTERRUPTED meanwhile.
        let mut attempt = 0;
        let mut released_reserve = false;
        let seq = loop {
            let err = match self.guard(self.commit_result(&result, trace_context)).await {
                Ok(seq) => break seq,
                Err(err) => err,
            };
            let full = matches!(err, OutboxError::DiskFull { .. });
            if full && !released_reserve {
                released_reserve = self.dir.release_reserve();
                tracing::warn!(result_id = %result.result_id, error = %err,
                    "disk full: giving the outbox's reserve back to record the result");
                if released_reserve {
                    continue;
                }
            }
            if full && cut_further(&mut result) {
                tracing::warn!(result_id = %result.result_id, error = %err,
                    "disk full: cutting the result's outputs to record it");
                continue;
            }
            if full || attempt >= FINISH_ATTEMPTS {
                return Err(OutboxError::ResultNotRecorded {
                    result_id: result.result_id.clone(),
                    cause: Box::new(err),
                });
            }
            tracing::warn!(result_id = %result.result_id, error = %err,
                "committing the result failed; retrying");
            tokio::time::sleep(FINISH_BACKOFF.next_delay(attempt)).await;
            attempt += 1;
        };
        lock.release();
        if released_reserve && !self.dir.ensure_reserve() {
            tracing::warn!(dir = %self.dir.path().display(),
                "the disk is still full: no run starts until there is room again");
        }
        self.wake_sender();
        Ok(seq)
    }

    /// One attempt to commit a result, on a connection of its own: a commit that failed can
    /// leave SQLite's transaction state behind, and the next attempt must not build on it (it
    /// would "succeed" into a transaction that is never committed).
    async fn commit_result(
        &self,
        result: &ExecResult,
        trace_context: &BTreeMap<String, String>,
    ) -> Result<u64, OutboxError> {
        let mut conn = self.pool.acquire().await?;
        let committed = async {
            let mut tx = conn.begin().await?;
            sqlx::query("DELETE FROM runs WHERE result_id = ?1")
                .bind(&result.result_id)
                .execute(&mut *tx)
                .await?;
            let seq = self
                .enqueue_in(
                    &mut tx,
                    Event {
                        seq: 0,
                        body: EventBody::Result(result.clone()),
                        trace_context: trace_context.clone(),
                    },
                )
                .await?;
            tx.commit().await?;
            Ok::<_, OutboxError>(seq)
        }
        .await;
        if committed.is_err() {
            let _ = conn.close().await;
        }
        committed
    }

    /// Reports every run whose owning process died as INTERRUPTED, once. Returns how many.
    pub async fn recover_interrupted(&self) -> Result<usize, OutboxError> {
        self.guard(async {
            let rows = sqlx::query("SELECT result_id, started, trace_context FROM runs")
                .fetch_all(&self.pool)
                .await?;
            let mut recovered = 0;
            for row in rows {
                let result_id: String = row.try_get("result_id")?;
                let Some(lock) = self.dir.claim_orphaned_run(&result_id) else {
                    continue; // Its process is alive and running it.
                };
                let started: EventStarted = match serde_json::from_str(
                    &row.try_get::<String, _>("started")?,
                ) {
                    Ok(s) => s,
                    Err(err) => {
                        tracing::error!(%result_id, error = %err, "undecodable run journal entry; dropping it");
                        sqlx::query("DELETE FROM runs WHERE result_id = ?1")
                            .bind(&result_id)
                            .execute(&self.pool)
                            .await?;
                        continue;
                    }
                };
                let trace_context: BTreeMap<String, String> =
                    serde_json::from_str(&row.try_get::<String, _>("trace_context")?)
                        .unwrap_or_default();
                let mut tx = self.pool.begin().await?;
                let claimed = sqlx::query("DELETE FROM runs WHERE result_id = ?1")
                    .bind(&result_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed == 1 {
                    let result = interrupted(&started, Utc::now().trunc_subsecs(6));
                    self.enqueue_in(
                        &mut tx,
                        Event {
                            seq: 0,
                            body: EventBody::Result(result),
                            trace_context,
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    tracing::warn!(%result_id, manifest_id = %started.manifest_id,
                        "run's agent process died: reported INTERRUPTED");
                    recovered += 1;
                }
                lock.release();
            }
            if recovered > 0 {
                self.wake_sender();
            }
            Ok(recovered)
        })
        .await
    }
}

/// Cuts a result's outputs one step further for a full disk: to the over-cap size, then to
/// nothing (the dropped bytes counted). False when nothing is left to cut.
fn cut_further(result: &mut ExecResult) -> bool {
    if result.stdout.is_empty() && result.stderr.is_empty() {
        return false;
    }
    if super::queue::cut_outputs(result) > 0 {
        return true;
    }
    result.stdout_dropped_bytes = result
        .stdout_dropped_bytes
        .saturating_add(result.stdout.len() as u64);
    result.stderr_dropped_bytes = result
        .stderr_dropped_bytes
        .saturating_add(result.stderr.len() as u64);
    result.stdout.clear();
    result.stderr.clear();
    true
}

/// The result reporting that a run's process died, noticed at `noticed_at`.
pub(super) fn interrupted(started: &EventStarted, noticed_at: chrono::DateTime<Utc>) -> ExecResult {
    ExecResult {
        result_id: started.result_id.clone(),
        request_id: started.request_id.clone(),
        exec_id: started.exec_id.clone(),
        pc_id: started.pc_id.clone(),
        manifest_id: started.manifest_id.clone(),
        version: started.version.clone(),
        status: ExecStatus::Interrupted,
        exit_code: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        started_at: started.started_at,
        finished_at: noticed_at.max(started.started_at),
    }
}
