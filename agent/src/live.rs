//! Live output (SPEC §14): a running run's output, sent to ingest while someone watches it.
//!
//! Nothing here touches the outbox or the event window: live output is a view of a run, not a
//! record of it (the result carries the output for good). Two processes take part, because the
//! run and the stream to ingest are often in different ones (`kanade-agent exec` started by cron
//! runs its script itself while the daemon holds the stream):
//!
//! - The run's process. Its [`RunTail`] reads the run's [`RunOutput`] — the capture itself,
//!   which holds at least the last 64 KiB of each stream — when ingest asks for the run's output
//!   (`Tail { watch: true }`, passed on through the run's control socket, [`crate::control`]).
//!   It sends first what it holds, then what is written, coalesced to one send per
//!   [`COALESCE`] and capped at `tail_rate_bytes` per second (output above the cap is skipped:
//!   the offsets show the gap), until `watch: false`, the sending process goes away, or the run
//!   ends (after a last send of what was written up to the end).
//! - The sending process (the daemon, or an `exec --wait` holding the stream). It listens on
//!   `output.sock` in the data dir ([`listen_for_output`]) and puts each chunk on the stream
//!   to ingest without ever waiting: a chunk that finds the stream's queue full is dropped (a
//!   gap), so acks and events never wait for output.
//!
//! Chunks travel between the two as datagrams, each one encoded `OutputChunk`: the wire message
//! itself, so the sending process only forwards it.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use kanade_shared::{limits, pb};
use prost::Message;
use tokio::{net::UnixDatagram, sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    data_dir::DataDir,
    runner::{self, OutputStream, RunOutput},
};

/// At most one send of a run's output per this long: a script printing a line at a time costs
/// a few messages per second, not one per line.
pub const COALESCE: Duration = Duration::from_millis(200);
/// How long a run waits for the sending process to take a chunk before dropping it.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a run that ended waits for its last chunks to be sent.
const LAST_SEND: Duration = Duration::from_secs(1);
/// Chunks waiting in the sending process for the stream to ingest (each at most
/// [`MAX_DATAGRAM_BYTES`]: a few MiB at worst).
const FORWARD_QUEUE: usize = 32;
/// The largest datagram a chunk makes: its bytes read as text (up to three times as long) and
/// the message around them.
const MAX_DATAGRAM_BYTES: usize = 3 * limits::MAX_OUTPUT_CHUNK_BYTES + 1024;

/// Following one run's output for ingest: at most one follower at a time, restarted by every
/// `watch: true` (each watcher that arrives gets what the agent holds; ingest drops what a
/// watcher already has). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RunTail {
    inner: Arc<TailInner>,
}

#[derive(Debug)]
struct TailInner {
    result_id: String,
    output: Arc<RunOutput>,
    /// Where the sending process listens.
    socket: PathBuf,
    rate_bytes: u64,
    following: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl RunTail {
    pub fn new(
        data_dir: &DataDir,
        result_id: &str,
        output: Arc<RunOutput>,
        rate_bytes: u64,
    ) -> RunTail {
        RunTail {
            inner: Arc::new(TailInner {
                result_id: result_id.to_string(),
                output,
                socket: data_dir.output_socket(),
                rate_bytes,
                following: Mutex::new(None),
            }),
        }
    }

    /// Starts sending the run's output (again, from what the agent holds), or stops.
    pub fn watch(&self, watch: bool) {
        let mut following = self
            .inner
            .following
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((stop, _)) = following.take() {
            stop.cancel();
        }
        if watch && !self.inner.output.is_ended() {
            let stop = CancellationToken::new();
            let task = tokio::spawn(follow(self.inner.clone(), stop.clone()));
            *following = Some((stop, task));
        }
    }

    /// The run ended: waits (briefly) until what it wrote last was sent to its watchers.
    pub async fn finish(&self) {
        let task = self
            .inner
            .following
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, task)) = task
            && tokio::time::timeout(LAST_SEND, task).await.is_err()
        {
            stop.cancel();
        }
    }
}

/// Where one stream's sending stands.
#[derive(Debug, Clone, Copy)]
struct Position {
    stream: OutputStream,
    /// The next byte to send.
    next: u64,
    /// Nothing sent yet: `next` may fall inside a character.
    first: bool,
}

/// Sends the run's output until `stop`, the sending process going away, or the end of the run.
async fn follow(tail: Arc<TailInner>, stop: CancellationToken) {
    let socket = match UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(error = %err, "cannot send this run's live output");
            return;
        }
    };
    let held = limits::LIVE_OUTPUT_HELD_BYTES as u64;
    let mut positions = OutputStream::BOTH.map(|stream| Position {
        stream,
        next: tail.output.written(stream).saturating_sub(held),
        first: true,
    });
    let mut rate = Rate::new(tail.rate_bytes);
    let mut last_send: Option<Instant> = None;
    loop {
        let changed = tail.output.changes().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let ended = tail.output.is_ended();
        let mut sent_any = false;
        let mut waiting_for_rate = false;
        for position in &mut positions {
            let allowed = rate.available();
            if allowed == 0 {
                waiting_for_rate |= tail.output.written(position.stream) > position.next;
                continue;
            }
            let (start, bytes) = tail.output.since(position.stream, position.next, allowed);
            // Bytes were skipped (the first send, or what fell out of the buffer): the rest of
            // a character cut there is not sent.
            let after_skip = position.first || start > position.next;
            let chunks = split(start, &bytes, after_skip, ended);
            for (offset, piece) in chunks {
                let chunk = pb::OutputChunk {
                    result_id: tail.result_id.clone(),
                    stream: wire_stream(position.stream) as i32,
                    offset,
                    data: String::from_utf8_lossy(piece).into_owned(),
                    length: piece.len() as u64,
                };
                match send(&socket, &tail.socket, &chunk).await {
                    Sent::Yes | Sent::Dropped => {}
                    Sent::NobodyListens => return,
                }
                rate.spend(piece.len());
                position.next = offset + piece.len() as u64;
                position.first = false;
                sent_any = true;
            }
        }
        if ended && !waiting_for_rate {
            return;
        }
        if sent_any {
            last_send = Some(Instant::now());
        }
        // Wait for more output (or for the rate to allow more), then no sooner than COALESCE
        // after the last send.
        let refill = async {
            if waiting_for_rate {
                tokio::time::sleep(COALESCE).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = &mut changed => {}
            _ = refill => {}
            _ = stop.cancelled() => return,
        }
        if let Some(at) = last_send {
            tokio::select! {
                _ = tokio::time::sleep_until(at + COALESCE) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Cuts the bytes that start at `start` into chunks of whole characters: after a skip,
/// continuation bytes at the start (the rest of a character whose start was skipped) are left
/// out, and so are the first bytes of a character cut by the end while more may come (`ended`:
/// nothing will).
fn split(start: u64, bytes: &[u8], after_skip: bool, ended: bool) -> Vec<(u64, &[u8])> {
    let lead = if after_skip {
        runner::leading_continuations(bytes)
    } else {
        0
    };
    let mut rest = &bytes[lead..];
    if !ended {
        rest = &rest[..rest.len() - runner::incomplete_suffix(rest)];
    }
    let mut offset = start + lead as u64;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        let mut end = rest.len().min(limits::MAX_OUTPUT_CHUNK_BYTES);
        if end < rest.len() {
            // Back to a character's first byte, unless none is near (not UTF-8 at all).
            let boundary = (end.saturating_sub(3)..=end)
                .rev()
                .find(|&i| !runner::is_continuation(rest[i]));
            end = boundary.filter(|&b| b > 0).unwrap_or(end);
        }
        chunks.push((offset, &rest[..end]));
        offset += end as u64;
        rest = &rest[end..];
    }
    chunks
}

fn wire_stream(stream: OutputStream) -> pb::OutputStream {
    match stream {
        OutputStream::Stdout => pb::OutputStream::Stdout,
        OutputStream::Stderr => pb::OutputStream::Stderr,
    }
}

enum Sent {
    Yes,
    /// The sending process did not take it in time: its watchers see a gap.
    Dropped,
    /// No process sends this data dir (the daemon stopped): nobody to send to.
    NobodyListens,
}

async fn send(socket: &UnixDatagram, to: &PathBuf, chunk: &pb::OutputChunk) -> Sent {
    let bytes = chunk.encode_to_vec();
    match tokio::time::timeout(SEND_TIMEOUT, socket.send_to(&bytes, to)).await {
        Ok(Ok(_)) => Sent::Yes,
        Ok(Err(err))
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::debug!(error = %err, "no process sends the output: live output stops");
            Sent::NobodyListens
        }
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "a live output chunk was not sent");
            Sent::Dropped
        }
        Err(_) => Sent::Dropped,
    }
}

/// Bytes per second, with a second's worth of burst (what the agent holds fits it at the
/// default rate).
#[derive(Debug)]
struct Rate {
    per_second: f64,
    available: f64,
    at: Instant,
}

impl Rate {
    fn new(per_second: u64) -> Rate {
        Rate {
            per_second: per_second as f64,
            available: per_second as f64,
            at: Instant::now(),
        }
    }

    fn available(&mut self) -> usize {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.available = (self.available + refill).min(self.per_second);
        self.at = now;
        self.available as usize
    }

    fn spend(&mut self, bytes: usize) {
        self.available -= bytes as f64;
    }
}

/// Listens on the data dir's output socket (the sending process only: hold the sender lock
/// first) and passes each chunk that runs send on, until the receiver is dropped. A chunk
/// that finds the queue full is dropped.
pub fn listen_for_output(data_dir: &DataDir) -> io::Result<mpsc::Receiver<pb::OutputChunk>> {
    let path = data_dir.output_socket();
    // A socket file left by a dead sender; we hold the sender lock, so it is not in use.
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path)?;
    let (chunks, received) = mpsc::channel(FORWARD_QUEUE);
    tokio::spawn(async move {
        let mut buffer = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let n = tokio::select! {
                read = socket.recv(&mut buffer) => match read {
                    Ok(n) => n,
                    Err(_) => return,
                },
                _ = chunks.closed() => return,
            };
            match pb::OutputChunk::decode(&buffer[..n]) {
                Ok(chunk) => {
                    if chunks.try_send(chunk).is_err() {
                        tracing::debug!("live output is not taken fast enough: a chunk dropped");
                    }
                }
                Err(err) => tracing::debug!(error = %err, "ignored a datagram that is no chunk"),
            }
        }
    });
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_whole_characters_and_cover_every_byte() {
        let text = "é".repeat(limits::MAX_OUTPUT_CHUNK_BYTES); // two bytes each
        let bytes = text.as_bytes();
        let chunks = split(100, bytes, false, true);
        assert!(chunks.len() >= 2);
        let mut next = 100;
        for (offset, piece) in &chunks {
            assert_eq!(*offset, next, "no gap, no overlap");
            assert!(std::str::from_utf8(piece).is_ok());
            assert!(piece.len() <= limits::MAX_OUTPUT_CHUNK_BYTES);
            next += piece.len() as u64;
        }
        assert_eq!(next, 100 + bytes.len() as u64);
    }

    #[test]
    fn a_character_cut_at_either_edge_is_not_sent_in_pieces() {
        let bytes = "aé€".as_bytes(); // 1 + 2 + 3 bytes
        // The end cuts '€' after its first byte: it waits for the rest while the run goes.
        let chunks = split(0, &bytes[..4], false, false);
        assert_eq!(chunks, [(0, "aé".as_bytes())]);
        // Once the run ended nothing more comes: the bytes go as they are.
        assert_eq!(split(0, &bytes[..4], false, true), [(0, &bytes[..4])]);
        // Starting inside 'é' after a skip (its first byte fell out): the rest of it is left out.
        assert_eq!(split(2, &bytes[2..], true, false), [(3, "€".as_bytes())]);
        // Without a skip, stray continuation bytes (binary output) are sent like any other.
        assert_eq!(split(2, &bytes[2..], false, false), [(2, &bytes[2..])]);
    }

    #[test]
    fn the_rate_allows_a_seconds_worth_then_refills() {
        let mut rate = Rate::new(1000);
        assert_eq!(rate.available(), 1000);
        rate.spend(1000);
        assert_eq!(rate.available(), 0);
        rate.at -= Duration::from_millis(500);
        let half = rate.available();
        assert!((450..=550).contains(&half), "{half}");
    }
}
