//! The table over time: days ahead get their partitions before their runs arrive, and runs older
//! than `--retention` go. On PostgreSQL a day of runs is one partition, dropped whole, one day per
//! transaction: the moment the table is the sweep's alone is a catalog change, the same for a
//! thousand runs as for a million, and it waits for busy queries at most briefly (the day's files
//! are removed after, when no reader or writer waits for them); rows outside the day partitions
//! (and every row on SQLite) are deleted by `received_at` in small batches, so the table is never
//! locked for long and replicas can sweep concurrently. Replicas take turns on the partitions (an
//! advisory lock).
//! Endpoints not seen for as long go too, and cancels whose run has a result.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::store::{DroppedDays, Store};

/// Day partitions kept ready ahead of today (the first sweep runs at start).
const DAYS_AHEAD: u32 = 3;
/// Rows deleted per statement.
const DELETE_BATCH: u32 = 1000;
/// Pause between two deleting statements of one sweep, so live traffic goes first.
const PAUSE_BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Sweeps every `every` until `shutdown`.
pub async fn run(
    store: Arc<dyn Store>,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        tracing::warn!(
            ?retention,
            "retention is too long to compute; nothing is deleted"
        );
        return;
    };
    loop {
        let now = Utc::now();
        match store.prepare_days(now.date_naive(), DAYS_AHEAD).await {
            Ok(0) => {}
            Ok(created) => tracing::info!(created, "day partitions created ahead"),
            Err(err) => {
                tracing::warn!(error = %err, "creating day partitions failed; will try again")
            }
        }
        let mut deleted = 0u64;
        let Some(cutoff) = now.checked_sub_signed(retention) else {
            return;
        };
        if let Err(err) = store.delete_expired_sessions(now).await {
            tracing::warn!(error = %err, "retention: deleting expired console sessions failed; will try again");
        }
        // Cancels whose run has a result need no more delivering.
        if let Err(err) = store.forget_settled_cancels().await {
            tracing::warn!(error = %err, "retention: forgetting delivered cancels failed; will try again");
        }
        // An endpoint not seen for as long as runs are kept is gone (decommissioned, renamed).
        match store.forget_endpoints_seen_before(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(endpoints = n, %cutoff, "retention: forgot endpoints not seen since")
            }
            Err(err) => {
                tracing::warn!(error = %err, "retention: forgetting old endpoints failed; will try again")
            }
        }
        match store.drop_days_before(cutoff).await {
            Ok(DroppedDays { dropped, postponed }) => {
                if !dropped.is_empty() {
                    tracing::info!(days = ?dropped, %cutoff, "retention: dropped days of runs");
                }
                if !postponed.is_empty() {
                    tracing::warn!(
                        days = ?postponed,
                        "retention: execution_results stayed busy with other queries, so these \
                         days are dropped at the next sweep (long Activity queries hold it; \
                         pg_stat_activity shows them)"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "retention: dropping old days failed; will try again")
            }
        }
        loop {
            match store.delete_received_before(cutoff, DELETE_BATCH).await {
                Ok(n) => {
                    deleted += n;
                    if n < u64::from(DELETE_BATCH) {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retention sweep failed; will try again");
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PAUSE_BETWEEN_BATCHES) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, %cutoff, "retention: deleted old runs");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
