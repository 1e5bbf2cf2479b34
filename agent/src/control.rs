//! What reaches a running run from outside its process: an operator's cancel, and ingest asking
//! to follow its output (SPEC §14).
//!
//! The process holding the stream to ingest (the daemon, or an `exec --wait`) is often not the
//! one running the run: `kanade-agent exec` started by cron runs its script in its own process.
//! So every running run listens on a datagram socket of its own, `runs/RESULT_ID.sock` in the
//! data dir (next to its lock; only the data dir's owner can reach it, 0700), and the sending
//! process passes on there what ingest says about that run ([`tell_run`]). A run that is not
//! running here has no socket: a message for it is dropped, as the contract says.
//!
//! Messages are small JSON datagrams ([`RunMessage`]); an unknown one (from a newer agent) is
//! ignored.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

use crate::{data_dir::DataDir, live::RunTail};

/// Largest datagram a run reads.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// What the sending process tells a running run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMessage {
    /// An operator cancelled the run: end it and report it cancelled.
    Cancel { reason: String, by: String },
    /// Someone watches the run's output (`watch`), or nobody does any more: send it live, or
    /// stop ([`crate::live`]).
    Tail { watch: bool },
}

/// An operator's cancel, as the run reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelNote {
    pub reason: String,
    pub by: String,
}

impl CancelNote {
    /// The line the agent adds to the run's stderr.
    pub fn stderr_line(&self) -> String {
        format!(
            "kanade-agent: run cancelled by {}: {}\n",
            self.by.trim(),
            self.reason.trim()
        )
    }
}

/// One running run's end of its control socket; dropping it stops listening and removes the
/// socket.
#[derive(Debug)]
pub struct RunControl {
    path: Option<PathBuf>,
    cancelled: CancellationToken,
    note: Arc<Mutex<Option<CancelNote>>>,
    stop: CancellationToken,
}

impl RunControl {
    /// Listens for messages to the run `result_id`; `tail` follows its output when asked. When
    /// the socket cannot be made (a data dir path too long for a socket address, say), the run
    /// goes on without it: it cannot be cancelled or followed, and the warning says why.
    pub fn listen(data_dir: &DataDir, result_id: &str, tail: RunTail) -> RunControl {
        let mut control = RunControl {
            path: None,
            cancelled: CancellationToken::new(),
            note: Arc::default(),
            stop: CancellationToken::new(),
        };
        let path = data_dir.run_socket(result_id);
        let socket = match UnixDatagram::bind(&path) {
            Ok(socket) => socket,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err,
                    "cannot listen for cancels of this run: it runs, but cannot be cancelled or followed live");
                return control;
            }
        };
        control.path = Some(path);
        let (cancelled, note, stop) = (
            control.cancelled.clone(),
            control.note.clone(),
            control.stop.clone(),
        );
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_MESSAGE_BYTES];
            loop {
                let n = tokio::select! {
                    read = socket.recv(&mut buffer) => match read {
                        Ok(n) => n,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                match serde_json::from_slice::<RunMessage>(&buffer[..n]) {
                    Ok(RunMessage::Cancel { reason, by }) => {
                        let mut first = note.lock().unwrap_or_else(|e| e.into_inner());
                        if first.is_none() {
                            tracing::info!(%by, %reason, "run cancelled by an operator");
                            *first = Some(CancelNote { reason, by });
                        }
                        cancelled.cancel();
                    }
                    Ok(RunMessage::Tail { watch }) => tail.watch(watch),
                    Err(err) => tracing::debug!(error = %err, "ignored an unknown run message"),
                }
            }
        });
        control
    }

    /// Cancelled when an operator cancelled the run.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    /// The operator's cancel, when there was one.
    pub fn cancel_note(&self) -> Option<CancelNote> {
        self.note.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RunControl {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Passes `message` to the run `result_id` if it is running on this data dir (in any process);
/// false when it is not.
pub fn tell_run(data_dir: &DataDir, result_id: &uuid::Uuid, message: &RunMessage) -> bool {
    let path = data_dir.run_socket(&result_id.hyphenated().to_string());
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = serde_json::to_vec(message).expect("run messages serialize");
    socket.send_to(&bytes, &path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_reaches_the_run_through_the_data_dir_and_the_first_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::create(tmp.path()).unwrap();
        let id = uuid::Uuid::now_v7();
        let other = uuid::Uuid::now_v7();
        let result_id = id.hyphenated().to_string();
        let output = crate::runner::RunOutput::new(1024);
        let control = RunControl::listen(
            &dir,
            &result_id,
            RunTail::new(&dir, &result_id, output, 1024),
        );
        let cancel = |reason: &str| RunMessage::Cancel {
            reason: reason.into(),
            by: "alice".into(),
        };
        assert!(!tell_run(&dir, &other, &cancel("x")), "not running here");
        assert!(tell_run(&dir, &id, &cancel("stuck")));
        assert!(tell_run(&dir, &id, &cancel("again")));
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            control.cancelled().cancelled(),
        )
        .await
        .expect("cancelled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            control.cancel_note(),
            Some(CancelNote {
                reason: "stuck".into(),
                by: "alice".into()
            })
        );
        let socket = dir.run_socket(&id.hyphenated().to_string());
        drop(control);
        assert!(!socket.exists(), "the socket goes with the run");
        assert!(!tell_run(&dir, &id, &cancel("late")));
    }
}
