//! Test traffic: runs and their two events.
use chrono::{DateTime, SubsecRound, Utc};
use kanade_ingest::store::{self, Store};
use kanade_shared::{
    pb,
    wire::{self, EventBody, EventStarted, ExecResult, ExecStatus},
};
use uuid::Uuid;

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// One run's two events, for building test traffic.
#[derive(Debug, Clone)]
pub struct Run {
    pub result_id: String,
    pub pc_id: String,
    pub started_at: DateTime<Utc>,
}

impl Run {
    pub fn new(pc_id: &str) -> Run {
        Run {
            result_id: Uuid::now_v7().to_string(),
            pc_id: pc_id.to_string(),
            started_at: now(),
        }
    }

    /// This run's row in `store`, if any.
    pub async fn stored_in(&self, store: &dyn Store) -> Option<store::ExecutionRow> {
        let id = Uuid::parse_str(&self.result_id).unwrap();
        store
            .get(id, now(), chrono::Duration::minutes(5))
            .await
            .unwrap()
    }

    pub fn at(pc_id: &str, started_at: DateTime<Utc>) -> Run {
        Run {
            started_at,
            ..Run::new(pc_id)
        }
    }

    /// A run started at `at` whose result_id was minted then too (UUIDv7 of `at`), as an agent
    /// running at that time would have made it.
    pub fn minted_at(pc_id: &str, at: DateTime<Utc>) -> Run {
        let minted = uuid::Timestamp::from_unix(
            uuid::NoContext,
            at.timestamp() as u64,
            at.timestamp_subsec_nanos(),
        );
        Run {
            result_id: Uuid::new_v7(minted).to_string(),
            pc_id: pc_id.to_string(),
            started_at: at,
        }
    }

    pub fn started(&self) -> EventStarted {
        EventStarted {
            result_id: self.result_id.clone(),
            request_id: "req-1".into(),
            exec_id: "exec-1".into(),
            pc_id: self.pc_id.clone(),
            started_at: self.started_at,
            manifest_id: "inventory".into(),
            version: "3".into(),
            timeout_secs: Some(60),
        }
    }

    pub fn result(&self, status: ExecStatus, exit_code: Option<i32>) -> ExecResult {
        ExecResult {
            result_id: self.result_id.clone(),
            request_id: "req-1".into(),
            exec_id: "exec-1".into(),
            pc_id: self.pc_id.clone(),
            manifest_id: "inventory".into(),
            version: "3".into(),
            status,
            exit_code,
            stdout: format!("output of {}\n", self.result_id),
            stderr: String::new(),
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            started_at: self.started_at,
            finished_at: self.started_at + chrono::Duration::milliseconds(1500),
        }
    }

    pub fn started_event(&self, seq: u64) -> pb::Event {
        wire::Event {
            seq,
            body: EventBody::Started(self.started()),
            trace_context: Default::default(),
        }
        .into()
    }

    pub fn result_event(&self, seq: u64) -> pb::Event {
        wire::Event {
            seq,
            body: EventBody::Result(self.result(ExecStatus::Succeeded, Some(0))),
            trace_context: Default::default(),
        }
        .into()
    }
}
