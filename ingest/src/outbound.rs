//! The queue of messages towards one agent stream (Welcome, Acks, Rejects, and how the stream
//! ends). The batcher and the stream's handler put messages in without ever waiting; the response
//! stream takes them out as fast as the client reads.
//!
//! Bounded: a client that lets `capacity` messages pile up has stopped reading, and its stream is
//! ended instead of holding more. Light when idle, because ingest holds one per open stream (SPEC
//! §5: an idle stream costs little): an empty deque and a `Notify`, where a tokio mpsc channel
//! would hold a 32-slot block and cache-padded counters for every idle agent.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use kanade_shared::pb::ingest_message::Msg;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// A drained queue keeps at most this much room, so a burst of acks does not stay allocated for
/// the life of an idle stream.
const RETAINED_CAPACITY: usize = 4;

#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Msg>,
    /// Every [`StreamSink`] is gone: nothing more will be queued.
    closed: bool,
    /// Sent after the last message, when set.
    ending: Option<Status>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    capacity: usize,
    /// Acks the client has not read yet are merged into one message of at most this many
    /// sequence numbers (the stream's window): a stream answered by several batches before it
    /// is written to gets one Ack, not one per batch, and no message holds more than a window.
    max_seqs_per_ack: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending end, shared (in an `Arc`) by the stream's handler and the batcher's replies.
/// When the last one is dropped the queue closes.
#[derive(Debug)]
pub struct StreamSink {
    shared: Arc<Shared>,
    /// Cancelled when the client stopped reading: its stream is ended with UNAVAILABLE.
    overflow: CancellationToken,
}

/// The receiving end, owned by the response stream.
#[derive(Debug)]
pub struct OutboundReceiver {
    shared: Arc<Shared>,
}

/// What the response stream sends next.
#[derive(Debug)]
pub enum Next {
    Message(Msg),
    /// Nothing more will come: end the stream, with this status if any.
    End(Option<Status>),
}

/// A queue holding at most `capacity` messages, each Ack at most `window` sequence numbers;
/// `overflow` is cancelled when it would hold more.
pub fn channel(
    capacity: usize,
    window: u32,
    overflow: CancellationToken,
) -> (StreamSink, OutboundReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
        capacity,
        max_seqs_per_ack: window.max(1) as usize,
    });
    (
        StreamSink {
            shared: shared.clone(),
            overflow,
        },
        OutboundReceiver { shared },
    )
}

impl StreamSink {
    /// Queues a message without waiting; a client that does not read its stream is cut off.
    pub fn send(&self, msg: Msg) {
        let mut queue = self.shared.lock();
        if let (Msg::Ack(ack), Some(Msg::Ack(waiting))) = (&msg, queue.messages.back_mut())
            && waiting.seqs.len() + ack.seqs.len() <= self.shared.max_seqs_per_ack
        {
            waiting.seqs.extend_from_slice(&ack.seqs);
            return;
        }
        if queue.messages.len() >= self.shared.capacity {
            drop(queue);
            if !self.overflow.is_cancelled() {
                tracing::warn!("agent is not reading its acks: ending its stream");
                self.overflow.cancel();
            }
            return;
        }
        queue.messages.push_back(msg);
        drop(queue);
        self.shared.ready.notify_one();
    }

    pub fn reject(&self, seq: u64, reason: String) {
        self.send(Msg::Reject(kanade_shared::pb::Reject { seq, reason }));
    }

    /// The status the stream ends with once every queued message is out.
    pub fn end_with(&self, status: Option<Status>) {
        self.shared.lock().ending = status;
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
    }
}

impl OutboundReceiver {
    /// The next message, or the end once the queue is closed and empty.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut queue = self.shared.lock();
                if let Some(msg) = queue.messages.pop_front() {
                    if queue.messages.is_empty() {
                        queue.messages.shrink_to(RETAINED_CAPACITY);
                    }
                    return Next::Message(msg);
                }
                if queue.closed {
                    return Next::End(queue.ending.take());
                }
            }
            // `notify_one` leaves a permit when nobody waits, so a message queued between the
            // check above and this wait is not missed.
            self.shared.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use kanade_shared::pb;

    use super::*;

    fn ack(seq: u64) -> Msg {
        Msg::Ack(pb::Ack { seqs: vec![seq] })
    }

    #[tokio::test]
    async fn messages_come_out_in_order_then_the_ending() {
        let overflow = CancellationToken::new();
        let (sink, receiver) = channel(8, 512, overflow.clone());
        let sink = Arc::new(sink);
        let batcher = sink.clone();
        let waiting = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                match receiver.next().await {
                    Next::Message(Msg::Ack(a)) => seen.extend(a.seqs),
                    Next::Message(other) => panic!("{other:?}"),
                    Next::End(status) => return (seen, status),
                }
            }
        });
        sink.send(ack(1));
        sink.end_with(Some(Status::unavailable("bye")));
        drop(sink);
        tokio::task::yield_now().await;
        batcher.send(ack(2)); // a reply still in flight when the handler ended
        drop(batcher);
        let (seen, status) = waiting.await.unwrap();
        assert_eq!(seen, [1, 2]);
        assert_eq!(status.unwrap().message(), "bye");
        assert!(!overflow.is_cancelled());
    }

    #[tokio::test]
    async fn a_full_queue_cancels_overflow_and_keeps_what_it_holds() {
        let overflow = CancellationToken::new();
        let (sink, receiver) = channel(2, 512, overflow.clone());
        for seq in 1..=3 {
            sink.reject(seq, "refused".into());
        }
        assert!(overflow.is_cancelled());
        drop(sink);
        let mut seen = Vec::new();
        while let Next::Message(Msg::Reject(r)) = receiver.next().await {
            seen.push(r.seq);
        }
        assert_eq!(seen, [1, 2]);
    }

    #[tokio::test]
    async fn acks_waiting_to_be_read_go_out_as_one_message_in_order() {
        let window = 8;
        let (sink, receiver) = channel(4, window, CancellationToken::new());
        sink.send(ack(1));
        sink.send(Msg::Ack(pb::Ack { seqs: vec![2, 3] }));
        sink.reject(4, "refused".into());
        sink.send(ack(5));
        // Merged up to a window's worth of seqs, then a new message.
        let full: Vec<u64> = (6..6 + window as u64 - 1).collect();
        sink.send(Msg::Ack(pb::Ack { seqs: full }));
        let after_full = 6 + window as u64 - 1;
        sink.send(ack(after_full));
        drop(sink);
        let mut seen = Vec::new();
        loop {
            match receiver.next().await {
                Next::Message(Msg::Ack(a)) => seen.push(("ack", a.seqs.len(), a.seqs[0])),
                Next::Message(Msg::Reject(r)) => seen.push(("reject", 1, r.seq)),
                Next::Message(other) => panic!("{other:?}"),
                Next::End(_) => break,
            }
        }
        assert_eq!(
            seen,
            [
                ("ack", 3, 1),
                ("reject", 1, 4),
                ("ack", window as usize, 5),
                ("ack", 1, after_full)
            ]
        );
    }
}
