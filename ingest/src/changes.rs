//! Commits, announced: whoever shows runs (the console's live pages) learns that runs changed
//! without polling. The batcher announces its own commits; with PostgreSQL every commit also
//! sends `NOTIFY kanade_runs` in its transaction, and each replica's listener
//! ([`crate::store::Store::watch_commits`]) announces the commits of the others.
//!
//! An announcement carries no content, only that something changed: listeners re-read what they
//! show, and announcements that arrive while they are busy fold into one (a `watch` channel
//! keeps the latest value only), so a slow page never queues a backlog.

use std::sync::Arc;

use tokio::sync::watch;

/// The channel PostgreSQL commits are announced on.
pub const CHANNEL: &str = "kanade_runs";

/// A handle to announce commits and to follow them; cheap to clone.
#[derive(Debug, Clone)]
pub struct Changes {
    sender: Arc<watch::Sender<u64>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            sender: Arc::new(watch::channel(0).0),
        }
    }
}

impl Changes {
    /// Runs changed.
    pub fn announce(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
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
