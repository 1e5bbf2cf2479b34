//! Commits, announced: whoever shows runs (the console's live pages) learns that runs changed
//! without polling. The batcher announces its own commits ([`Changes::committed`]); with
//! PostgreSQL each replica tells the others on [`CHANNEL`] after its commits ([`tell_others`]:
//! at most every [`PUBLISH_EVERY`], outside the write transactions: a `NOTIFY` in a transaction
//! holds the notification queue's lock through its commit, so notifying commits cannot overlap),
//! and each replica's listener ([`crate::bus`]) announces the commits of the others.
//!
//! An announcement carries no content, only that something changed: listeners re-read what they
//! show, and announcements that arrive while they are busy fold into one (a `watch` channel
//! keeps the latest value only), so a slow page never queues a backlog.

use std::{sync::Arc, time::Duration};

use kanade_shared::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The channel PostgreSQL commits are announced on.
pub const CHANNEL: &str = "kanade_runs";
/// A replica tells the others of its commits at most this often: a page re-reads at most every
/// 500 ms anyway, and a busy replica commits many times as often.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// A handle to announce commits and to follow them; cheap to clone.
#[derive(Debug, Clone)]
pub struct Changes {
    sender: Arc<watch::Sender<u64>>,
    /// Only this process's own commits: what it tells the other replicas of.
    own: Arc<watch::Sender<u64>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            sender: Arc::new(watch::channel(0).0),
            own: Arc::new(watch::channel(0).0),
        }
    }
}

impl Changes {
    /// Runs changed.
    pub fn announce(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// This process committed runs: announced here, and to be told to the other replicas.
    pub fn committed(&self) {
        self.own.send_modify(|n| *n = n.wrapping_add(1));
        self.announce();
    }

    /// Follows this process's own commits from now on.
    pub fn follow_own(&self) -> watch::Receiver<u64> {
        self.own.subscribe()
    }

    /// Follows announcements from now on.
    pub fn follow(&self) -> watch::Receiver<u64> {
        self.sender.subscribe()
    }
}

/// Retries of telling the other replicas after a failed `NOTIFY`.
const RETRY: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

/// Tells every replica on `store` of this one's commits until `stop`: one notification after a
/// commit, at most every [`PUBLISH_EVERY`]; the commits of the last moments before `stop` are
/// still told, once. Does nothing on a store no other replica serves.
pub async fn tell_others(changes: Changes, store: Arc<dyn Store>, stop: CancellationToken) {
    if !store.is_shared() {
        return;
    }
    let mut own = changes.follow_own();
    let mut failures: u32 = 0;
    loop {
        let stopping = tokio::select! {
            changed = own.changed() => changed.is_err(),
            _ = stop.cancelled() => true,
        };
        if stopping && !own.has_changed().unwrap_or(false) {
            return;
        }
        own.borrow_and_update();
        let pause = match store.notify(CHANNEL, "").await {
            Ok(()) => {
                failures = 0;
                PUBLISH_EVERY
            }
            Err(err) => {
                if failures == 0 {
                    tracing::warn!(error = %err, "telling other replicas of commits failed; retrying");
                }
                // Told at the next try, whether or not anything commits meanwhile.
                own.mark_changed();
                failures = failures.saturating_add(1);
                RETRY.next_delay(failures)
            }
        };
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn announcements_while_a_follower_is_busy_fold_into_one() {
        let changes = Changes::default();
        let mut follower = changes.follow();
        for _ in 0..100 {
            changes.announce();
        }
        follower.changed().await.unwrap();
        follower.borrow_and_update();
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), follower.changed());
        assert!(
            again.await.is_err(),
            "one wake-up for a hundred announcements"
        );
        changes.announce();
        follower.changed().await.unwrap();
    }
}
