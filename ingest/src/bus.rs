//! What one ingest replica tells the others — and itself — when several serve one database:
//! commits ([`crate::changes`]) and control messages, such as "deliver this cancel to its
//! endpoint's stream, wherever that is open" ([`ControlMessage`]). PostgreSQL carries them
//! (`NOTIFY`, and one `LISTEN`ing connection per replica); on a store no other process serves
//! (SQLite) a control message goes straight to this process's own consumer.
//!
//! Notifications are not durable: a replica that was not listening when one was sent never sees
//! it. So every consumer has a way back to the truth in the database, taken whenever the
//! listener (re)connects ([`Control::Missed`]) and on a timer: pages re-read, pending cancels
//! are looked up again.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    changes::{self, Changes},
    store::{Heard, Store},
};

/// The channel control messages travel on (JSON of [`ControlMessage`]).
pub const CONTROL_CHANNEL: &str = "kanade_control";
/// Control messages waiting for this replica's consumer.
const CONTROL_QUEUE: usize = 1024;
/// Tries to notify the other replicas before a control message is left to the consumers' next
/// look at the database.
const NOTIFY_ATTEMPTS: u32 = 3;
const NOTIFY_RETRY: Duration = Duration::from_millis(100);

/// What one replica tells every replica (itself included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// An operator cancelled a run: the replica holding its endpoint's stream tells the agent.
    Cancel {
        pc_id: String,
        result_id: Uuid,
        reason: String,
        by: String,
    },
}

/// What reaches a replica's consumer of control messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Message(ControlMessage),
    /// Messages may have been missed (the listener was not listening): look at the database.
    Missed,
}

/// A handle to tell every replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    store: Arc<dyn Store>,
    /// This replica's consumer.
    local: mpsc::Sender<Control>,
}

impl Bus {
    /// The bus, and the receiving end of this replica's control messages.
    pub fn new(store: Arc<dyn Store>) -> (Bus, mpsc::Receiver<Control>) {
        let (local, received) = mpsc::channel(CONTROL_QUEUE);
        (Bus { store, local }, received)
    }

    /// Tells every replica (this one through its listener, like the others). When the
    /// database cannot be told, the message is left to the consumers' next look at the
    /// database (what it says is committed there before it is published).
    pub async fn publish(&self, message: ControlMessage) {
        if !self.store.is_shared() {
            let _ = self.local.send(Control::Message(message)).await;
            return;
        }
        let payload = serde_json::to_string(&message).expect("control messages serialize");
        for attempt in 1..=NOTIFY_ATTEMPTS {
            match self.store.notify(CONTROL_CHANNEL, &payload).await {
                Ok(()) => return,
                Err(err) if attempt == NOTIFY_ATTEMPTS => {
                    tracing::warn!(error = %err, ?message,
                        "telling the replicas failed; it is delivered at their next look at the database");
                }
                Err(_) => tokio::time::sleep(NOTIFY_RETRY).await,
            }
        }
    }

    /// Listens to every replica until `stop`: commits are announced on `changes`, control
    /// messages passed to this replica's consumer. Returns at once on a store no other process
    /// serves (this process's own commits and messages reach it directly).
    pub async fn listen(self, changes: Changes, stop: CancellationToken) {
        if !self.store.is_shared() {
            return;
        }
        let (heard_tx, mut heard) = mpsc::channel(CONTROL_QUEUE);
        let listening = self
            .store
            .listen(&[changes::CHANNEL, CONTROL_CHANNEL], heard_tx, stop);
        let dispatching = async {
            while let Some(said) = heard.recv().await {
                match said {
                    Heard::Listening => {
                        // Whatever was said while nobody listened is gone: look again.
                        changes.announce();
                        let _ = self.local.send(Control::Missed).await;
                    }
                    Heard::Notified { channel, .. } if channel == changes::CHANNEL => {
                        changes.announce();
                    }
                    Heard::Notified { channel, payload } if channel == CONTROL_CHANNEL => {
                        match serde_json::from_str::<ControlMessage>(&payload) {
                            Ok(message) => {
                                let _ = self.local.send(Control::Message(message)).await;
                            }
                            // A newer replica's message this one does not know: its effect
                            // is in the database, where the consumers look again anyway.
                            Err(err) => {
                                tracing::debug!(error = %err, %payload, "unknown control message")
                            }
                        }
                    }
                    Heard::Notified { channel, .. } => {
                        tracing::debug!(%channel, "notification on a channel nobody listens to")
                    }
                }
            }
        };
        tokio::join!(listening, dispatching);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_fits_a_notification_whatever_its_text() {
        // PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more. The longest cancel: ids of
        // 128 bytes and a reason of 1,024 bytes, all characters JSON escapes six bytes wide.
        let escaped = "\u{1}";
        let message = ControlMessage::Cancel {
            pc_id: escaped.repeat(kanade_shared::limits::MAX_ID_BYTES),
            result_id: Uuid::nil(),
            reason: escaped.repeat(kanade_shared::limits::MAX_CANCEL_REASON_BYTES),
            by: escaped.repeat(crate::auth::MAX_TOKEN_NAME_BYTES),
        };
        let payload = serde_json::to_string(&message).unwrap();
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        assert_eq!(
            serde_json::from_str::<ControlMessage>(&payload).unwrap(),
            message
        );
    }
}
