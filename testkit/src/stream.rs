//! A raw agent stream a test drives message by message.
use std::time::Duration;

use kanade_shared::pb::{self, ingest_client::IngestClient};
use tonic::transport::Channel;

/// A raw agent stream driven by a test: send messages, read answers.
pub struct AgentStream {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::IngestMessage>,
}

pub fn hello(pc_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            pc_id: pc_id.to_string(),
            agent_version: "test".into(),
        })),
    }
}

pub fn event_msg(e: pb::Event) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Event(e)),
    }
}

impl AgentStream {
    /// Opens a stream whose first message is `first` (normally a Hello).
    pub async fn open_with(
        client: &mut IngestClient<Channel>,
        first: Option<pb::AgentMessage>,
    ) -> Result<AgentStream, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        if let Some(first) = first {
            tx.send(first).await.unwrap();
        }
        let response = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok(AgentStream {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Opens a stream for `pc_id` and reads its Welcome.
    pub async fn open(client: &mut IngestClient<Channel>, pc_id: &str) -> AgentStream {
        let mut stream = AgentStream::open_with(client, Some(hello(pc_id)))
            .await
            .expect("opening a stream");
        match stream.next().await {
            Some(pb::ingest_message::Msg::Welcome(_)) => stream,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&self, e: pb::Event) {
        self.tx.send(event_msg(e)).await.expect("stream open");
    }

    /// The next message, or None when the stream ended (panics after 20 s of silence).
    pub async fn next(&mut self) -> Option<pb::ingest_message::Msg> {
        self.try_next().await.expect("stream failed")
    }

    pub async fn try_next(&mut self) -> Result<Option<pb::ingest_message::Msg>, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(20), self.rx.message()).await {
            Ok(r) => r.map(|m| m.and_then(|m| m.msg)),
            Err(_) => panic!("no message from ingest within 20 s"),
        }
    }

    /// Reads until `count` seqs were acked or rejected; returns (acked, rejected with reasons).
    pub async fn answers(&mut self, count: usize) -> (Vec<u64>, Vec<(u64, String)>) {
        let mut acked = Vec::new();
        let mut rejected = Vec::new();
        while acked.len() + rejected.len() < count {
            match self.next().await {
                Some(pb::ingest_message::Msg::Ack(a)) => acked.extend(a.seqs),
                Some(pb::ingest_message::Msg::Reject(r)) => rejected.push((r.seq, r.reason)),
                other => panic!("unexpected {other:?}"),
            }
        }
        acked.sort_unstable();
        (acked, rejected)
    }
}
