//! The sender: one bidirectional stream to ingest carrying the outbox, in order.
//!
//! `Hello` first, then the `Welcome` limits are honoured: at most `window` events (and
//! `window_bytes` bytes) are unacknowledged at once. An Ack deletes events from the outbox; a
//! Reject dead-letters its event. Any stream error reconnects over a fresh connection with
//! exponential backoff and full jitter, and everything unacknowledged is sent again; ingest
//! ignores duplicates. A stream the server ended cleanly (drain, stream age) reconnects at once.
//! HTTP/2 keepalive notices a dead connection within `keepalive + keepalive_timeout`. The sender
//! sleeps until an event is enqueued (in this process, or another one through the wake socket).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use kanade_shared::{
    backoff::Backoff,
    limits,
    pb::{self, ingest_client::IngestClient},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};
use tracing::Instrument;

use crate::{
    config::{ClientTls, Secret},
    outbox::{Outbox, Pending},
};

/// What the sender delivers: the outbox in the agent; an in-memory queue in the benchmark.
pub trait Queue: Send + Sync + 'static {
    /// Up to `limit` events after `after_seq`, in order.
    fn pending(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<Pending>>> + Send;
    /// Forgets acknowledged events.
    fn ack(&self, seqs: &[u64]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Sets aside an event ingest will never accept.
    fn dead_letter(
        &self,
        seq: u64,
        reason: &str,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Records the connection state for operators.
    fn set_connection(&self, state: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Notified when events are enqueued.
    fn wake(&self) -> &tokio::sync::Notify;
}

impl<Q: Queue> Queue for std::sync::Arc<Q> {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        Q::pending(self, after_seq, limit).await
    }
    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        Q::ack(self, seqs).await
    }
    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        Q::dead_letter(self, seq, reason).await
    }
    async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        Q::set_connection(self, state).await
    }
    fn wake(&self) -> &tokio::sync::Notify {
        Q::wake(self)
    }
}

impl Queue for Outbox {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        Outbox::pending(self, after_seq, limit).await
    }
    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        Outbox::ack(self, seqs).await
    }
    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        Outbox::dead_letter(self, seq, reason).await
    }
    async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        Outbox::set_connection(self, state).await
    }
    fn wake(&self) -> &tokio::sync::Notify {
        &self.wake
    }
}

/// How the sender connects and paces itself.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub ingest: String,
    pub pc_id: String,
    /// TLS towards an `https://` ingest.
    pub tls: Option<ClientTls>,
    /// Sent as `authorization: Bearer …` when set.
    pub token: Option<Secret>,
    pub window: u32,
    pub window_bytes: u64,
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
    pub reconnect: Backoff,
}

/// Refusals at the transport level (e.g. over ingest's message size limit) of the same event
/// after which it is dead-lettered.
const TRANSPORT_REFUSALS_BEFORE_DEAD_LETTER: u32 = 3;

/// How a stream session ended.
enum SessionEnd {
    /// The server ended the stream cleanly: reconnect at once.
    Clean,
    /// Something failed; `progressed` says whether any ack arrived first.
    Failed {
        error: String,
        progressed: bool,
    },
    Shutdown,
}

/// Runs until `shutdown`, delivering the outbox.
pub async fn run<Q: Queue>(outbox: Q, config: SenderConfig, shutdown: CancellationToken) {
    let mut attempt = 0u32;
    let mut refusals: HashMap<u64, u32> = HashMap::new();
    loop {
        let span = tracing::info_span!("ingest.stream", ingest = %config.ingest, attempt);
        let end = session(&outbox, &config, &shutdown, &mut refusals)
            .instrument(span)
            .await;
        let delay = match end {
            SessionEnd::Shutdown => {
                let _ = outbox
                    .set_connection(&format!(
                        "not connected: the sender stopped at {}",
                        chrono::Utc::now().to_rfc3339()
                    ))
                    .await;
                return;
            }
            SessionEnd::Clean => {
                attempt = 0;
                tracing::info!("ingest ended the stream cleanly; reconnecting");
                Duration::ZERO
            }
            SessionEnd::Failed { error, progressed } => {
                if progressed {
                    attempt = 0;
                }
                let delay = config.reconnect.next_delay(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(%error, retry_in = ?delay, "stream to ingest failed");
                let _ = outbox
                    .set_connection(&format!(
                        "disconnected from {} at {}: {error}",
                        config.ingest,
                        chrono::Utc::now().to_rfc3339()
                    ))
                    .await;
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// An error and its causes, outermost first: tonic's transport errors say only "transport error"
/// themselves; the reason an operator can act on (refused, a certificate problem) is below.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        // Wrappers often repeat their source's words; say them once.
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

fn tls_config(tls: &ClientTls) -> ClientTlsConfig {
    let config = ClientTlsConfig::new();
    let config = match &tls.ca_cert {
        Some(ca) => config.ca_certificate(Certificate::from_pem(ca.contents())),
        None => config.with_native_roots(),
    };
    match &tls.client_certificate {
        Some(c) => config.identity(Identity::from_pem(c.cert.contents(), c.key.contents())),
        None => config,
    }
}

fn hello(pc_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            pc_id: pc_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    }
}

async fn session<Q: Queue>(
    outbox: &Q,
    config: &SenderConfig,
    shutdown: &CancellationToken,
    refusals: &mut HashMap<u64, u32>,
) -> SessionEnd {
    let failed = |error: String| SessionEnd::Failed {
        error,
        progressed: false,
    };
    let endpoint = match Endpoint::from_shared(config.ingest.clone()) {
        Ok(e) => e,
        Err(e) => return failed(format!("bad ingest URL {}: {e}", config.ingest)),
    }
    .connect_timeout(Duration::from_secs(10))
    .http2_keep_alive_interval(config.keepalive)
    .keep_alive_timeout(config.keepalive_timeout)
    .keep_alive_while_idle(true)
    .tcp_nodelay(true);
    let endpoint = match &config.tls {
        Some(tls) => match endpoint.tls_config(tls_config(tls)) {
            Ok(e) => e,
            Err(e) => {
                return failed(format!(
                    "TLS settings for {}: {}",
                    config.ingest,
                    with_causes(&e)
                ));
            }
        },
        None => endpoint,
    };
    let channel = tokio::select! {
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return failed(format!("connecting to {}: {}", config.ingest, with_causes(&e))),
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    let authorization = match &config.token {
        Some(token) => match format!("Bearer {}", token.expose()).parse::<MetadataValue<Ascii>>() {
            Ok(value) => Some(value),
            Err(_) => return failed("the token holds characters a header cannot carry".into()),
        },
        None => None,
    };
    let mut client =
        IngestClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        })
        .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(64);
    let _ = tx.send(hello(&config.pc_id)).await;
    let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return failed(format!("opening the stream: {status}")),
    };
    let (window, window_bytes) = match inbound.message().await {
        Ok(Some(pb::IngestMessage {
            msg: Some(pb::ingest_message::Msg::Welcome(w)),
        })) => (
            config.window.min(w.max_unacked.max(1)),
            config.window_bytes.min(w.max_unacked_bytes.max(1)),
        ),
        Ok(other) => return failed(format!("expected Welcome, got {other:?}")),
        Err(status) => return failed(format!("waiting for Welcome: {status}")),
    };
    tracing::info!(ingest = %config.ingest, window, window_bytes, "connected to ingest");
    let _ = outbox
        .set_connection(&format!(
            "connected to {} since {}",
            config.ingest,
            chrono::Utc::now().to_rfc3339()
        ))
        .await;

    let mut inflight: BTreeMap<u64, u64> = BTreeMap::new();
    let mut inflight_bytes = 0u64;
    let mut cursor = 0u64;
    let mut progressed = false;
    loop {
        // Fill the window from the outbox; stop at the first event that does not fit.
        'fill: while (inflight.len() as u32) < window && inflight_bytes < window_bytes {
            let room = (window as usize) - inflight.len();
            let batch = match outbox.pending(cursor, room).await {
                Ok(b) => b,
                Err(e) => {
                    return SessionEnd::Failed {
                        error: format!("reading the outbox: {e:#}"),
                        progressed,
                    };
                }
            };
            if batch.is_empty() {
                break;
            }
            for p in batch {
                if !inflight.is_empty() && inflight_bytes + p.bytes > window_bytes {
                    break 'fill;
                }
                cursor = p.seq;
                inflight.insert(p.seq, p.bytes);
                inflight_bytes += p.bytes;
                let msg = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Event(p.event)),
                };
                if tx.send(msg).await.is_err() {
                    break 'fill;
                }
            }
        }

        let message = tokio::select! {
            m = inbound.message() => m,
            _ = outbox.wake().notified() => continue,
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        };
        match message {
            Ok(Some(pb::IngestMessage { msg: Some(msg) })) => match msg {
                pb::ingest_message::Msg::Ack(ack) => {
                    if let Err(e) = outbox.ack(&ack.seqs).await {
                        return SessionEnd::Failed {
                            error: format!("recording acks: {e:#}"),
                            progressed,
                        };
                    }
                    for seq in ack.seqs {
                        if let Some(bytes) = inflight.remove(&seq) {
                            inflight_bytes -= bytes;
                        }
                        refusals.remove(&seq);
                    }
                    progressed = true;
                }
                pb::ingest_message::Msg::Reject(reject) => {
                    tracing::warn!(seq = reject.seq, reason = %reject.reason, "ingest rejected an event; dead-lettered");
                    if let Err(e) = outbox.dead_letter(reject.seq, &reject.reason).await {
                        return SessionEnd::Failed {
                            error: format!("dead-lettering: {e:#}"),
                            progressed,
                        };
                    }
                    if let Some(bytes) = inflight.remove(&reject.seq) {
                        inflight_bytes -= bytes;
                    }
                }
                pb::ingest_message::Msg::Welcome(_) => {}
            },
            Ok(Some(pb::IngestMessage { msg: None })) => {}
            Ok(None) => return SessionEnd::Clean,
            Err(status) => {
                if matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
                    && let Some((&seq, _)) = inflight.first_key_value()
                {
                    let n = refusals.entry(seq).or_insert(0);
                    *n += 1;
                    if *n >= TRANSPORT_REFUSALS_BEFORE_DEAD_LETTER {
                        let reason = format!(
                            "refused by ingest {n} times in a row at the transport level: {}",
                            status.message()
                        );
                        tracing::error!(seq, %reason, "dead-lettering an event ingest will not take");
                        let _ = outbox.dead_letter(seq, &reason).await;
                        refusals.remove(&seq);
                    }
                }
                return SessionEnd::Failed {
                    error: format!("{}: {}", status.code(), status.message()),
                    progressed,
                };
            }
        }
    }
}
