//! Retention: runs first received longer ago than `--retention` are deleted in the background,
//! in small batches so the table is never locked for long and replicas can sweep concurrently.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

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
        let mut deleted = 0u64;
        let Some(cutoff) = Utc::now().checked_sub_signed(retention) else {
            return;
        };
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
