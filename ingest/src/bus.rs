//! What one ingest replica tells the others — and itself — when several serve one database:
//! commits ([`crate::changes`]) and control messages, such as "deliver this cancel to its
//! endpoint's stream, wherever that is open" or "this replica watches these runs' output"
//! ([`ControlMessage`]), and the live output of runs, which the replica holding a run's agent
//! stream sends to each replica watching it on that replica's own channel ([`OutputMessage`],
//! [`Bus::tail_channel`]: only replicas that watch a run receive its output). PostgreSQL
//! carries them (`NOTIFY`, and one `LISTEN`ing connection per replica); on a store no other
//! process serves (SQLite) a control message goes straight to this process's own consumers.
//!
//! Notifications are not durable: a replica that was not listening when one was sent never sees
//! it. So every consumer has a way back to the truth: taken whenever the listener (re)connects
//! ([`Control::Missed`]) and on a timer: pages re-read, pending cancels are looked up again,
//! watchers say again which runs they watch.
//!
//! A notification carries at most 8,000 bytes: every message here is made to fit (output is
//! cut into pieces, lists of runs into several messages).

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    changes::{self, Changes},
    store::{self, PendingCancel, Store},
};

/// The channel control messages travel on (JSON of [`ControlMessage`]).
pub const CONTROL_CHANNEL: &str = "kanade_control";
/// Control messages waiting for this replica's consumer.
const CONTROL_QUEUE: usize = 1024;
/// Live output messages heard and waiting for this replica's watchers; more are dropped (the
/// watchers see a gap), never waited for: the listener also carries commits and cancels.
const OUTPUT_QUEUE: usize = 1024;
/// PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
pub const MAX_PAYLOAD_BYTES: usize = 7999;
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
    /// The replica listening on `reply_to` watches these runs' output (said again every few
    /// seconds while it does): the replica holding a run's agent stream asks the agent for it
    /// and sends it there.
    Watching {
        reply_to: String,
        runs: Vec<WatchedRun>,
    },
    /// The replica listening on `reply_to` no longer watches these runs.
    Unwatching { reply_to: String, runs: Vec<Uuid> },
}

/// A run someone watches, and its endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedRun {
    pub pc_id: String,
    pub result_id: Uuid,
}

/// What the replica holding a watched run's agent stream sends to a replica watching it, on
/// that replica's own channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMessage {
    /// A piece of a chunk of the run's output ([`kanade_shared::pb::OutputChunk`]'s fields): a
    /// chunk too long for one notification goes in parts, numbered from 0, each carrying the
    /// chunk's offset and length, all but the last marked `more`; the receiver puts them back
    /// together (they are sent in order, in one statement).
    Chunk {
        result_id: Uuid,
        stdout: bool,
        offset: u64,
        length: u64,
        data: String,
        #[serde(default)]
        part: u32,
        #[serde(default)]
        more: bool,
    },
    /// The agent was asked for the run's output: it flows now.
    Tailing { result_id: Uuid },
    /// The agent's stream that carried the run's output ended.
    Interrupted { result_id: Uuid },
}

/// What reaches a replica's consumer of cancels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Deliver this cancel to its endpoint's streams here.
    Cancel(PendingCancel),
    /// Messages may have been missed (the listener was not listening): look at the database.
    Missed,
}

/// What reaches a replica's live output ([`crate::control::tail`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailHeard {
    /// Another replica (or this one) watches, or stops watching, runs.
    Control(ControlMessage),
    /// Output of a run this replica watches.
    Output(OutputMessage),
}

/// The receiving ends of this replica's consumers.
#[derive(Debug)]
pub struct Heard {
    /// Cancels, for [`crate::control::Cancels`].
    pub cancels: mpsc::Receiver<Control>,
    /// Watching and output, for [`crate::control::Tails`].
    pub tails: mpsc::Receiver<TailHeard>,
}

/// A handle to tell every replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    store: Arc<dyn Store>,
    /// This replica's consumers.
    cancels: mpsc::Sender<Control>,
    tails: mpsc::Sender<TailHeard>,
    /// Where this replica hears the output of runs it watches.
    tail_channel: Arc<str>,
}

impl Bus {
    /// The bus, and the receiving ends of this replica's consumers.
    pub fn new(store: Arc<dyn Store>) -> (Bus, Heard) {
        let (cancels, cancels_rx) = mpsc::channel(CONTROL_QUEUE);
        let (tails, tails_rx) = mpsc::channel(OUTPUT_QUEUE);
        // Unique to this process, whatever the replica ids (two replicas on one host may
        // share a host name).
        let tail_channel = format!("kanade_tail_{}", Uuid::new_v4().simple()).into();
        (
            Bus {
                store,
                cancels,
                tails,
                tail_channel,
            },
            Heard {
                cancels: cancels_rx,
                tails: tails_rx,
            },
        )
    }

    /// The channel this replica hears the output of the runs it watches on.
    pub fn tail_channel(&self) -> &str {
        &self.tail_channel
    }

    /// Hands a control message to this replica's consumer of its kind.
    async fn deliver(&self, message: ControlMessage) {
        match message {
            ControlMessage::Cancel {
                pc_id,
                result_id,
                reason,
                by,
            } => {
                let cancel = PendingCancel {
                    pc_id,
                    result_id,
                    reason,
                    by,
                };
                let _ = self.cancels.send(Control::Cancel(cancel)).await;
            }
            // Never waited for (the queue also carries output, and its consumer publishes
            // through here): watchers say what they watch again every few seconds, and a
            // holding nobody confirms expires.
            ControlMessage::Watching { .. } | ControlMessage::Unwatching { .. } => {
                if self.tails.try_send(TailHeard::Control(message)).is_err() {
                    tracing::debug!("live output is busy: a watching message dropped");
                }
            }
        }
    }

    /// Tells every replica (this one through its listener, like the others). When the
    /// database cannot be told, the message is left to the consumers' next look at the
    /// database (what it says is committed there before it is published).
    pub async fn publish(&self, message: ControlMessage) {
        self.publish_all(vec![message]).await
    }

    /// Tells every replica `messages`, in one statement.
    pub async fn publish_all(&self, messages: Vec<ControlMessage>) {
        if !self.store.is_shared() {
            for message in messages {
                self.deliver(message).await;
            }
            return;
        }
        let notices: Vec<(String, String)> = messages
            .iter()
            .map(|m| {
                let payload = serde_json::to_string(m).expect("control messages serialize");
                (CONTROL_CHANNEL.to_string(), payload)
            })
            .collect();
        for attempt in 1..=NOTIFY_ATTEMPTS {
            match self.store.notify_all(&notices).await {
                Ok(()) => return,
                Err(err) if attempt == NOTIFY_ATTEMPTS => {
                    tracing::warn!(error = %err, ?messages,
                        "telling the replicas failed; it is delivered at their next look at the database");
                }
                Err(_) => tokio::time::sleep(NOTIFY_RETRY).await,
            }
        }
    }

    /// Sends live output to the replicas watching it, each `(channel, message)` to the replica
    /// listening on that channel; this replica's own go straight to its consumer. Once: output
    /// that cannot be sent now is gone (its watchers see a gap).
    pub async fn send_output(&self, messages: Vec<(String, OutputMessage)>) {
        let mut notices = Vec::with_capacity(messages.len());
        for (channel, message) in messages {
            if channel == *self.tail_channel {
                let _ = self.tails.try_send(TailHeard::Output(message));
            } else {
                let payload = serde_json::to_string(&message).expect("output messages serialize");
                notices.push((channel, payload));
            }
        }
        if notices.is_empty() || !self.store.is_shared() {
            return;
        }
        if let Err(err) = self.store.notify_all(&notices).await {
            tracing::debug!(error = %err, messages = notices.len(),
                "live output could not be sent to the replicas watching it");
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
        let channels = [
            changes::CHANNEL.to_string(),
            CONTROL_CHANNEL.to_string(),
            self.tail_channel.to_string(),
        ];
        let listening = self.store.listen(&channels, heard_tx, stop);
        let dispatching = async {
            while let Some(said) = heard.recv().await {
                match said {
                    store::Heard::Listening => {
                        // Whatever was said while nobody listened is gone: look again.
                        changes.announce();
                        let _ = self.cancels.send(Control::Missed).await;
                    }
                    store::Heard::Notified { channel, .. } if channel == changes::CHANNEL => {
                        changes.announce();
                    }
                    store::Heard::Notified { channel, payload } if channel == CONTROL_CHANNEL => {
                        match serde_json::from_str::<ControlMessage>(&payload) {
                            Ok(message) => self.deliver(message).await,
                            // A newer replica's message this one does not know: its effect
                            // is in the database, where the consumers look again anyway.
                            Err(err) => {
                                tracing::debug!(error = %err, %payload, "unknown control message")
                            }
                        }
                    }
                    store::Heard::Notified { channel, payload }
                        if channel == *self.tail_channel =>
                    {
                        match serde_json::from_str::<OutputMessage>(&payload) {
                            Ok(message) => {
                                if self.tails.try_send(TailHeard::Output(message)).is_err() {
                                    tracing::debug!(
                                        "live output arrives faster than it is passed on: dropped"
                                    );
                                }
                            }
                            Err(err) => {
                                tracing::debug!(error = %err, "unknown output message")
                            }
                        }
                    }
                    store::Heard::Notified { channel, .. } => {
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
