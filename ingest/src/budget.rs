//! One memory budget for every event ingest holds (SPEC §12): `--memory-budget` bytes shared by
//! every agent stream and Publish call, on top of each stream's own window.
//!
//! An event is charged *before its bytes are read*: [`Budgeted`] wraps the Ingest service and
//! reads each request body frame by frame, parsing gRPC's length-prefixed message framing.
//! When a message's 5-byte header shows its length, the body waits for that many bytes of
//! budget before it hands tonic anything of the message; while it waits, nothing is read from
//! the connection, so HTTP/2 flow control holds the agent back (backpressure, never an error).
//! The permit then travels with the event — the stream handler or Publish takes it from the
//! request's [`Credits`] when the decoded message arrives, hands it to the batcher with the
//! event, and the batcher drops it once the event is answered.
//!
//! Why this cannot deadlock: a message is charged whole, at its header, and only then does any
//! of it flow, so every charged message can be read to its end; the bytes before a header (the
//! end of the previous message) are handed over before the body waits. The semaphore is fair,
//! so a large message is not starved by small ones, and a message larger than the whole budget
//! waits for all of it.
//!
//! What stays outside the budget is bounded per connection: HTTP/2's receive window (the
//! bytes a client may send before ingest reads) and one frame.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

/// A message is held twice while ingest has it: in the buffer the gRPC decoder reads it into
/// (which lives until its stream ends: see the stream handler's recycling of streams that
/// carried a large event) and as the decoded event on its way to the database. It is charged
/// for both.
pub const MESSAGE_COPIES: usize = 2;

/// The budget: a fair semaphore of bytes.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// Bytes charged now (a metric).
    used: Gauge,
}

/// Bytes of the budget held by one event until it is answered.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    used: Gauge,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.used.dec_by(self.bytes as i64);
    }
}

impl MemoryBudget {
    pub fn new(total: usize, used: Gauge) -> MemoryBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        MemoryBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            used,
        }
    }

    /// Waits for `bytes` of the budget (all of it when `bytes` is more than the whole budget).
    pub async fn charge(&self, bytes: usize) -> Charge {
        let bytes = self.chargeable(bytes);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(bytes as u32)
            .await
            .expect("the budget's semaphore is never closed");
        self.charged(permit, bytes)
    }

    /// `bytes` of the budget without waiting, when they are free now. Never ahead of a charge
    /// that waits: the semaphore hands what is released to its waiters first.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        let bytes = self.chargeable(bytes);
        let permit = self
            .bytes
            .clone()
            .try_acquire_many_owned(bytes as u32)
            .ok()?;
        Some(self.charged(permit, bytes))
    }

    fn chargeable(&self, bytes: usize) -> usize {
        bytes.min(self.total).min(u32::MAX as usize)
    }

    fn charged(&self, permit: OwnedSemaphorePermit, bytes: usize) -> Charge {
        self.used.inc_by(bytes as i64);
        Charge {
            _permit: permit,
            bytes,
            used: self.used.clone(),
        }
    }
}

/// The charges of one request's messages, in the order their headers were read: the handler
/// takes one per decoded message.
#[derive(Debug, Default)]
pub struct Credits {
    charges: Mutex<VecDeque<Charge>>,
}

impl Credits {
    fn push(&self, charge: Charge) {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(charge);
    }

    /// The charge of the message just decoded.
    pub fn take(&self) -> Option<Charge> {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// The charge of the message just decoded by the request carrying these credits.
    pub fn take_from<T>(request: &tonic::Request<T>) -> Option<Charge> {
        request.extensions().get::<Arc<Credits>>()?.take()
    }
}

/// Where the parser is in gRPC's framing: a 5-byte header (compression flag, u32 big-endian
/// length), then that many bytes of message.
#[derive(Debug)]
enum Framing {
    Header { read: usize, bytes: [u8; 5] },
    Message { left: usize },
}

/// What the parser found in a stretch of bytes.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A header completed `at` bytes into the stretch, for a message of `len` bytes.
    Header { at: usize, len: usize },
    /// The stretch holds no further header end.
    Nothing,
}

impl Framing {
    fn new() -> Framing {
        Framing::Header {
            read: 0,
            bytes: [0; 5],
        }
    }

    /// Advances over `data` until a header completes (returning where) or `data` ends.
    fn advance(&mut self, data: &[u8]) -> Found {
        let mut at = 0;
        while at < data.len() {
            match self {
                Framing::Header { read, bytes } => {
                    let take = (5 - *read).min(data.len() - at);
                    bytes[*read..*read + take].copy_from_slice(&data[at..at + take]);
                    *read += take;
                    at += take;
                    if *read == 5 {
                        let len =
                            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                        *self = Framing::Message { left: len };
                        if len == 0 {
                            *self = Framing::new();
                        }
                        return Found::Header { at, len };
                    }
                }
                Framing::Message { left } => {
                    let take = (*left).min(data.len() - at);
                    *left -= take;
                    at += take;
                    if *left == 0 {
                        *self = Framing::new();
                    }
                }
            }
        }
        Found::Nothing
    }
}

type Charging = Pin<Box<dyn Future<Output = Charge> + Send>>;

/// A request body that charges the budget for each message before letting it through.
struct BudgetedBody {
    inner: Body,
    budget: MemoryBudget,
    credits: Arc<Credits>,
    framing: Framing,
    /// Data read from the connection and not handed on yet, and how many of its first bytes
    /// the framing has already parsed (the header of the message it starts with, charged or
    /// waiting for its charge: earlier messages have been handed on).
    held: Option<(Bytes, usize)>,
    charging: Option<Charging>,
}

impl http_body::Body for BudgetedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            if let Some(charging) = &mut this.charging {
                let charge = std::task::ready!(charging.as_mut().poll(cx));
                this.credits.push(charge);
                this.charging = None;
            }
            if let Some((mut data, parsed)) = this.held.take() {
                match this.framing.advance(&data[parsed..]) {
                    Found::Nothing => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Found::Header { at, len } => {
                        let header_end = parsed + at;
                        let charged = MESSAGE_COPIES * (len + 5);
                        // Most messages find their bytes free and are charged now, with no
                        // future boxed for them; the others wait here for their charge.
                        match this.budget.try_charge(charged) {
                            Some(charge) => this.credits.push(charge),
                            None => {
                                let budget = this.budget.clone();
                                this.charging =
                                    Some(Box::pin(async move { budget.charge(charged).await }));
                            }
                        }
                        // What precedes the header belongs to earlier messages (charged
                        // already) and goes on now, without this one: while its charge waits,
                        // and also when it is charged, because tonic's decoder keeps a buffer
                        // as large as the most it was ever handed at once for the stream's
                        // life, so it is handed one message at a time. (A header split across
                        // frames had its first bytes go on earlier: without the rest, nothing
                        // of its message can be decoded.)
                        let header_start = header_end.saturating_sub(5);
                        let before = data.split_to(header_start);
                        this.held = Some((data, header_end - header_start));
                        if !before.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(before))));
                        }
                    }
                }
                continue;
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.held = Some((data, 0)),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.charging.is_none() && self.inner.is_end_stream()
    }
}

/// The Ingest service with every request body charged against the budget.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: MemoryBudget,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, budget: MemoryBudget) -> Budgeted<S> {
        Budgeted { inner, budget }
    }
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Budgeted<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let credits = Arc::new(Credits::default());
        let (mut parts, inner) = request.into_parts();
        parts.extensions.insert(credits.clone());
        let body = BudgetedBody {
            inner,
            budget: self.budget.clone(),
            credits,
            framing: Framing::new(),
            held: None,
            charging: None,
        };
        self.inner
            .call(http::Request::from_parts(parts, Body::new(body)))
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn headers_are_found_wherever_the_frames_split_them() {
        let mut stream = message(3);
        stream.extend(message(0));
        stream.extend(message(2));
        for split in 1..stream.len() {
            let mut framing = Framing::new();
            let mut found = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                let mut at = 0;
                while let Found::Header { at: end, len } = framing.advance(&piece[at..]) {
                    found.push(len);
                    at += end;
                }
            }
            assert_eq!(found, [3, 0, 2], "split at {split}");
        }
    }

    async fn drain(mut body: BudgetedBody) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        out
    }

    /// Polls the body once, without waiting.
    async fn poll_once(
        body: &mut BudgetedBody,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    }

    fn body_of(
        chunks: Vec<Vec<u8>>,
        budget: &MemoryBudget,
        credits: &Arc<Credits>,
    ) -> BudgetedBody {
        let frames = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, tonic::Status>(Frame::data(Bytes::from(c)))),
        );
        BudgetedBody {
            inner: Body::new(http_body_util::StreamBody::new(frames)),
            budget: budget.clone(),
            credits: credits.clone(),
            framing: Framing::new(),
            held: None,
            charging: None,
        }
    }

    #[tokio::test]
    async fn every_message_is_charged_in_order_and_the_bytes_pass_unchanged() {
        let budget = MemoryBudget::new(1 << 20, Gauge::default());
        let credits = Arc::new(Credits::default());
        let mut stream = message(100);
        stream.extend(message(5000));
        stream.extend(message(1));
        let chunks: Vec<Vec<u8>> = stream.chunks(777).map(<[u8]>::to_vec).collect();
        let out = drain(body_of(chunks, &budget, &credits)).await;
        assert_eq!(out, stream);
        let charged: Vec<usize> = std::iter::from_fn(|| credits.take().map(|c| c.bytes)).collect();
        assert_eq!(
            charged,
            [105, 5005, 6].map(|n| n * MESSAGE_COPIES),
            "each message charged for its copies"
        );
    }

    #[tokio::test]
    async fn a_message_waits_for_budget_and_goes_when_it_is_freed() {
        let budget = MemoryBudget::new(1000, Gauge::default());
        let held = budget.charge(900).await;
        let credits = Arc::new(Credits::default());
        let body = body_of(vec![message(200)], &budget, &credits);
        let reading = tokio::spawn(drain(body));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reading.is_finished(), "not read while the budget is spent");
        drop(held);
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), reading)
            .await
            .expect("read once the budget was freed")
            .unwrap();
        assert_eq!(out.len(), 205);
        drop(credits.take().expect("charged")); // answered: its bytes are free again
        // Larger than the whole budget: it waits for all of it, and still goes.
        let big = body_of(vec![message(5000)], &budget, &credits);
        assert_eq!(drain(big).await.len(), 5005);
    }

    #[tokio::test]
    async fn a_frame_of_several_messages_goes_on_one_message_at_a_time() {
        // tonic's decoder keeps, for the stream's life, a buffer as large as the most it was
        // handed at once: a burst of small events in one frame must not leave every stream that
        // sent one holding a frame-sized buffer.
        let budget = MemoryBudget::new(1 << 20, Gauge::default());
        let credits = Arc::new(Credits::default());
        let messages = [message(300), message(0), message(500)];
        let mut body = body_of(vec![messages.concat()], &budget, &credits);
        for expected in &messages {
            let Poll::Ready(Some(Ok(went))) = poll_once(&mut body).await else {
                panic!("every message has its budget");
            };
            assert_eq!(&went.into_data().unwrap(), expected);
        }
        assert!(matches!(poll_once(&mut body).await, Poll::Ready(None)));
        assert_eq!(
            std::iter::from_fn(|| credits.take()).count(),
            3,
            "each message charged"
        );
    }

    #[tokio::test]
    async fn what_precedes_a_message_that_waits_goes_on_without_it() {
        // One frame: a message the budget has room for, then one it has not (yet).
        let budget = MemoryBudget::new(1000, Gauge::default());
        let credits = Arc::new(Credits::default());
        let first = message(100);
        let mut frame = first.clone();
        frame.extend(message(400));
        let mut body = body_of(vec![frame], &budget, &credits);
        let Poll::Ready(Some(Ok(went))) = poll_once(&mut body).await else {
            panic!("the first message goes on at once");
        };
        assert_eq!(went.into_data().unwrap(), first);
        assert!(
            poll_once(&mut body).await.is_pending(),
            "the second waits for its charge"
        );
        // The first is decoded and answered: its charge is given back, and the second goes.
        drop(credits.take().expect("the first was charged"));
        let rest = tokio::time::timeout(std::time::Duration::from_secs(5), drain(body))
            .await
            .expect("the second goes once the budget has room");
        assert_eq!(rest, message(400));
    }
}
