//! Reaching ingest: the endpoint with its keepalive, TLS and token, then the stream's handshake
//! (`Hello` out, `Welcome` back with the limits the session runs under).

use std::time::Duration;

use kanade_shared::{
    limits,
    pb::{self, ingest_client::IngestClient},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codegen::InterceptedService,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::SenderConfig;
use crate::config::ClientTls;

/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards ingest before the session waits for the transport.
const OUTBOUND_QUEUE: usize = 64;

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client = IngestClient<InterceptedService<Channel, BearerToken>>;

/// An error and its causes, outermost first: tonic's transport errors say only "transport error"
/// themselves; the reason an operator can act on (refused, a certificate problem) is below.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    push_causes(&mut text, error);
    text
}

/// Appends what caused `error` to `text`, each cause after a colon.
fn push_causes(text: &mut String, error: &dyn std::error::Error) {
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

/// Opens a fresh connection to ingest; `Err` says why, in words for `kanade-agent status`.
pub async fn connect(config: &SenderConfig) -> Result<Client, String> {
    let endpoint = Endpoint::from_shared(config.ingest.clone())
        .map_err(|e| format!("bad ingest URL {}: {e}", config.ingest))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(config.keepalive)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let endpoint = match &config.tls {
        Some(tls) => endpoint
            .tls_config(tls_config(tls))
            .map_err(|e| format!("TLS settings for {}: {}", config.ingest, with_causes(&e)))?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to {}: {}", config.ingest, with_causes(&e)))?;
    let authorization = match &config.token {
        Some(token) => Some(
            format!("Bearer {}", token.expose())
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| "the token holds characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    Ok(
        IngestClient::with_interceptor(channel, BearerToken(authorization))
            .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_BYTES),
    )
}

/// An open stream after its handshake.
pub struct Stream {
    /// Messages towards ingest.
    pub outbound: mpsc::Sender<pb::AgentMessage>,
    /// Messages from ingest.
    pub inbound: tonic::Streaming<pb::IngestMessage>,
    /// The window the session runs under: the smaller of the agent's and ingest's.
    pub window_events: u32,
    pub window_bytes: u64,
    /// Ingest keeps `AgentStatus` reports (an older one would end the stream on one).
    pub accepts_agent_status: bool,
}

fn hello(pc_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            pc_id: pc_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    }
}

/// Opens the stream: `Hello`, then waits for `Welcome`.
pub async fn handshake(client: &mut Client, config: &SenderConfig) -> Result<Stream, String> {
    let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let _ = outbound.send(hello(&config.pc_id)).await;
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| format!("opening the stream: {}", refusal(&status, config)))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(pb::IngestMessage {
            msg: Some(pb::ingest_message::Msg::Welcome(w)),
        })) => Ok(Stream {
            outbound,
            inbound,
            window_events: config.window.min(w.max_unacked.max(1)),
            window_bytes: config.window_bytes.min(w.max_unacked_bytes.max(1)),
            accepts_agent_status: w.accepts_agent_status,
        }),
        Ok(other) => Err(format!("expected Welcome, got {other:?}")),
        Err(status) => Err(format!("waiting for Welcome: {}", refusal(&status, config))),
    }
}

/// What ingest's refusal means to whoever runs this agent: refusals of its identity say what to
/// do on which side. The agent keeps trying (a token added to ingest's tokens file applies
/// without a restart of either side).
fn refusal(status: &tonic::Status, config: &SenderConfig) -> String {
    let said = status.message();
    let pc_id = &config.pc_id;
    match status.code() {
        tonic::Code::Unauthenticated if config.token.is_none() => format!(
            "ingest requires a token: create one for this endpoint on the ingest host \
             with `kanade-ingest token add {pc_id} --tokens-file FILE` and give it to this agent \
             with --token-file (token_file in its config)"
        ),
        tonic::Code::Unauthenticated => format!(
            "ingest does not know this agent's token: it is not in ingest's tokens file; \
             create one on the ingest host with `kanade-ingest token add {pc_id} \
             --tokens-file FILE` (ingest rereads its tokens file, no restart needed) and give it to \
             this agent with --token-file"
        ),
        tonic::Code::PermissionDenied => {
            format!("ingest refused this agent as pc_id {pc_id:?}: {said}")
        }
        code => {
            // A transport error says only that; its causes say what an operator can act on.
            let mut text = format!("{code:?}: {said}");
            push_causes(&mut text, status);
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kanade_shared::backoff::Backoff;

    use super::*;

    fn config() -> SenderConfig {
        SenderConfig {
            ingest: "http://127.0.0.1:1".into(),
            pc_id: "pc-1".into(),
            tls: None,
            token: None,
            window: 512,
            window_bytes: 1 << 20,
            keepalive: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            reconnect: Backoff {
                base: Duration::from_millis(200),
                cap: Duration::from_secs(30),
            },
            status_every: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_transport_error_names_its_cause() {
        let mut status = tonic::Status::unknown("transport error");
        status.set_source(Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(
            refusal(&status, &config()),
            "Unknown: transport error: connection reset by peer"
        );
    }
}
