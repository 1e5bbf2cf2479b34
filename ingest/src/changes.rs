//! Commits, announced: whoever shows runs (the console's live pages) learns that runs changed
//! without polling. The batcher announces its own commits ([`Changes::committed`]); with
//! PostgreSQL each replica tells the others with `NOTIFY kanade_runs` after its commits (at most
//! every [`PUBLISH_EVERY`], outside the write transactions: a `NOTIFY` in a transaction holds
//! the notification queue's lock through its commit, so notifying commits cannot overlap), and each replica's listener
//! ([`crate::store::Store::watch_commits`]) announces the commits of the others.
//!
//! An announcement carries no content, only that something changed: listeners re-read what they
//! show, and announcements that arrive while they are busy fold into one (a `watch` channel
//! keeps the latest value only), so a slow page never queues a backlog.

use std::sync::Arc;

use tokio::sync::watch;

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
