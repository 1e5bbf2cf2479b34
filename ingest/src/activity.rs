//! The Activity gRPC service: what is running now, what finished, what failed.
//!
//! Thin: requests become [`ListQuery`]s, rows become `Execution` messages. States are computed
//! by the store at query time for the instant of the request, so a late real result always wins
//! over `lost`. Pages are keyset pages: the opaque `page_token` is the last row's
//! `(started_at, result_id)`, so paging stays correct while rows are being inserted.

use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use kanade_shared::{limits, pb, wire::ExecStatus};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    presence,
    store::{
        Cursor, EndpointOrder, EndpointQuery, EndpointRow, ExecutionRow, ListQuery,
        ManifestSummary, ReadStore, RunState, StoreError, SummaryQuery, cut,
    },
};

/// The Activity service.
#[derive(Debug, Clone)]
pub struct ActivityService {
    store: Arc<dyn ReadStore>,
    lost_grace: Duration,
    /// `--presence-every`: how long an endpoint's row stays trusted without a refresh.
    presence_every: std::time::Duration,
}

impl ActivityService {
    pub fn new(
        store: Arc<dyn ReadStore>,
        lost_grace: Duration,
        presence_every: std::time::Duration,
    ) -> ActivityService {
        ActivityService {
            store,
            lost_grace,
            presence_every,
        }
    }
}

/// The one place store errors become gRPC statuses.
pub fn store_status(err: StoreError) -> Status {
    if err.is_transient() {
        Status::unavailable(format!("{err}; retry later"))
    } else {
        tracing::error!(error = %err, "store error");
        Status::internal("the store failed; see ingest's log")
    }
}

fn state_from_proto(value: i32) -> Result<RunState, Status> {
    use pb::ExecutionState as S;
    Ok(match S::try_from(value) {
        Ok(S::Running) => RunState::Running,
        Ok(S::Lost) => RunState::Lost,
        Ok(S::Succeeded) => RunState::Finished(ExecStatus::Succeeded),
        Ok(S::Failed) => RunState::Finished(ExecStatus::Failed),
        Ok(S::TimedOut) => RunState::Finished(ExecStatus::TimedOut),
        Ok(S::Killed) => RunState::Finished(ExecStatus::Killed),
        Ok(S::SpawnFailed) => RunState::Finished(ExecStatus::SpawnFailed),
        Ok(S::Interrupted) => RunState::Finished(ExecStatus::Interrupted),
        Ok(S::Cancelled) => RunState::Finished(ExecStatus::Cancelled),
        Ok(S::Unspecified) => {
            return Err(Status::invalid_argument(
                "states must not contain EXECUTION_STATE_UNSPECIFIED",
            ));
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "states contains unknown value {value}"
            )));
        }
    })
}

/// A run's state as the wire contract names it (also what a `states` filter carries).
pub fn state_to_proto(state: RunState) -> pb::ExecutionState {
    use pb::ExecutionState as S;
    match state {
        RunState::Running => S::Running,
        RunState::Lost => S::Lost,
        RunState::Finished(ExecStatus::Succeeded) => S::Succeeded,
        RunState::Finished(ExecStatus::Failed) => S::Failed,
        RunState::Finished(ExecStatus::TimedOut) => S::TimedOut,
        RunState::Finished(ExecStatus::Killed) => S::Killed,
        RunState::Finished(ExecStatus::SpawnFailed) => S::SpawnFailed,
        RunState::Finished(ExecStatus::Interrupted) => S::Interrupted,
        RunState::Finished(ExecStatus::Cancelled) => S::Cancelled,
    }
}

fn timestamp(
    field: &str,
    ts: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, Status> {
    ts.map(|ts| {
        u32::try_from(ts.nanos)
            .ok()
            .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
            .ok_or_else(|| Status::invalid_argument(format!("{field} is not a valid timestamp")))
    })
    .transpose()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn decode_page_token(token: &str) -> Result<Cursor, Status> {
    Cursor::from_token(token).ok_or_else(|| {
        Status::invalid_argument(
            "page_token is not one this server issued; pass next_page_token unchanged",
        )
    })
}

/// A run as the wire contract has it; outputs cut to `output_limit` bytes each when given.
pub fn execution_to_proto(row: ExecutionRow, output_limit: Option<usize>) -> pb::Execution {
    let ts = kanade_shared::wire::timestamp_to_proto;
    let mut e = pb::Execution {
        result_id: row.result_id.hyphenated().to_string(),
        request_id: row.request_id,
        exec_id: row.exec_id,
        pc_id: row.pc_id,
        manifest_id: row.manifest_id,
        version: row.version,
        state: state_to_proto(row.state) as i32,
        timeout_secs: row.timeout_secs,
        started_at: Some(ts(row.started_at)),
        received_at: Some(ts(row.received_at)),
        ..Default::default()
    };
    if let Some(cancel) = row.cancel {
        e.cancel_requested_at = Some(ts(cancel.at));
        e.cancel_reason = cancel.reason;
        e.cancel_requested_by = cancel.by;
    }
    if let Some(o) = row.outcome {
        e.status = pb::ExecStatus::from(o.status) as i32;
        e.exit_code = o.exit_code;
        e.stdout = o.stdout;
        e.stderr = o.stderr;
        e.stdout_dropped_bytes = o.stdout_dropped_bytes;
        e.stderr_dropped_bytes = o.stderr_dropped_bytes;
        e.finished_at = Some(ts(o.finished_at));
    }
    if let Some(max) = output_limit {
        e.stdout_truncated = cut(&mut e.stdout, max);
        e.stderr_truncated = cut(&mut e.stderr, max);
    }
    e
}

/// The window SummarizeManifests covers when the request gives no start.
pub const DEFAULT_SUMMARY_WINDOW: Duration = Duration::hours(24);

fn duration_to_proto(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn summary_to_proto(s: ManifestSummary) -> pb::ManifestSummary {
    let ts = kanade_shared::wire::timestamp_to_proto;
    pb::ManifestSummary {
        manifest_id: s.manifest_id,
        runs: s.runs,
        running: s.running,
        succeeded: s.succeeded,
        failed: s.failed,
        lost: s.lost,
        p50_duration: s.p50_duration.map(duration_to_proto),
        p95_duration: s.p95_duration.map(duration_to_proto),
        last_failure_result_id: s
            .last_failure
            .map(|(id, _)| id.hyphenated().to_string())
            .unwrap_or_default(),
        last_failure_at: s.last_failure.map(|(_, at)| ts(at)),
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// An endpoint as the wire contract has it.
pub fn endpoint_to_proto(row: EndpointRow) -> pb::Endpoint {
    let ts = kanade_shared::wire::timestamp_to_proto;
    let mut e = pb::Endpoint {
        pc_id: row.pc_id,
        connected: row.connected,
        replica: row.replica,
        connected_since: Some(ts(row.connected_since)),
        first_seen: Some(ts(row.first_seen)),
        last_seen: Some(ts(row.last_seen)),
        agent_version: row.agent_version,
        ..Default::default()
    };
    if let Some(r) = row.report {
        e.status_at = Some(ts(r.at));
        e.outbox_depth = r.outbox_depth;
        e.outbox_bytes = r.outbox_bytes;
        e.oldest_pending_at = r.oldest_pending_at.map(ts);
        e.dead_letters = r.dead_letters;
        e.running_runs = r.running_runs;
        e.hostname = r.hostname;
        e.os = r.os;
    }
    e
}

/// An endpoint page token: the last pc_id of the page, hex (pc_ids are any text).
fn endpoint_page_token(pc_id: &str) -> String {
    format!(
        "e{}",
        pc_id
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn endpoint_after(token: &str) -> Result<String, Status> {
    let refused = || {
        Status::invalid_argument(
            "page_token is not one this server issued; pass next_page_token unchanged",
        )
    };
    let hex = token.strip_prefix('e').ok_or_else(refused)?;
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return Err(refused());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| refused())?;
    String::from_utf8(bytes).map_err(|_| refused())
}

#[tonic::async_trait]
impl pb::activity_server::Activity for ActivityService {
    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let r = request.into_inner();
        let states = r
            .states
            .iter()
            .map(|&s| state_from_proto(s))
            .collect::<Result<Vec<_>, _>>()?;
        let page_size = match r.page_size {
            0 => limits::DEFAULT_PAGE_SIZE,
            n => n.min(limits::MAX_PAGE_SIZE),
        };
        let after = non_empty(r.page_token)
            .map(|t| decode_page_token(&t))
            .transpose()?;
        let query = ListQuery {
            states,
            pc_id: non_empty(r.pc_id),
            manifest_id: non_empty(r.manifest_id),
            exec_id: non_empty(r.exec_id),
            started_after: timestamp("started_after", r.started_after)?,
            started_before: timestamp("started_before", r.started_before)?,
            after,
            // One row more than the page tells whether another page follows.
            limit: page_size + 1,
            now: now(),
            lost_grace: self.lost_grace,
        };
        let mut rows = self.store.list(&query).await.map_err(store_status)?;
        let next_page_token = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|last| Cursor::after(last).to_token())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let executions = rows
            .into_iter()
            .map(|row| execution_to_proto(row, Some(limits::LIST_OUTPUT_BYTES)))
            .collect();
        Ok(Response::new(pb::ListExecutionsResponse {
            executions,
            next_page_token,
        }))
    }

    async fn summarize_manifests(
        &self,
        request: Request<pb::SummarizeManifestsRequest>,
    ) -> Result<Response<pb::SummarizeManifestsResponse>, Status> {
        let r = request.into_inner();
        let now = now();
        let started_before = timestamp("started_before", r.started_before)?.unwrap_or(now);
        let started_after = timestamp("started_after", r.started_after)?
            .unwrap_or(started_before - DEFAULT_SUMMARY_WINDOW);
        if started_after >= started_before {
            return Err(Status::invalid_argument(
                "started_after must be before started_before",
            ));
        }
        let query = SummaryQuery {
            started_after,
            started_before,
            manifest_id: non_empty(r.manifest_id),
            now,
            lost_grace: self.lost_grace,
        };
        let manifests = self
            .store
            .summarize(&query)
            .await
            .map_err(store_status)?
            .into_iter()
            .map(summary_to_proto)
            .collect();
        Ok(Response::new(pb::SummarizeManifestsResponse { manifests }))
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => limits::DEFAULT_ENDPOINT_PAGE_SIZE,
            n => n.min(limits::MAX_ENDPOINT_PAGE_SIZE),
        };
        let after = non_empty(r.page_token)
            .map(|t| endpoint_after(&t))
            .transpose()?;
        let now = now();
        let query = EndpointQuery {
            connected: r.connected,
            pc_id_prefix: non_empty(r.pc_id_prefix),
            after,
            limit: page_size + 1,
            order: EndpointOrder::PcId,
            connected_after: presence::connected_after(now, self.presence_every),
            backlogged_before: now,
        };
        let mut rows = self
            .store
            .list_endpoints(&query)
            .await
            .map_err(store_status)?;
        let next_page_token = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|last| endpoint_page_token(&last.pc_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEndpointsResponse {
            endpoints: rows.into_iter().map(endpoint_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_endpoint(
        &self,
        request: Request<pb::GetEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let pc_id = request.into_inner().pc_id;
        if pc_id.is_empty() {
            return Err(Status::invalid_argument("pc_id is required"));
        }
        let row = self
            .store
            .get_endpoint(
                &pc_id,
                presence::connected_after(now(), self.presence_every),
            )
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no endpoint has pc_id {pc_id:?}: ingest has never seen its agent connect"
                ))
            })?;
        Ok(Response::new(endpoint_to_proto(row)))
    }

    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let id = request.into_inner().result_id;
        let result_id = Uuid::try_parse(&id).map_err(|_| {
            Status::invalid_argument(format!("result_id must be a UUID, got {id:?}"))
        })?;
        let row = self
            .store
            .get(result_id, now(), self.lost_grace)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no run has result_id {result_id}")))?;
        Ok(Response::new(execution_to_proto(row, None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            started_at: DateTime::from_timestamp_micros(-62_135_596_800_000_000).unwrap(),
            result_id: Uuid::from_u128(0x0192_f0c4_5b1e_7cc2_9a40_3f1d_2b8e_6a01),
        };
        assert_eq!(decode_page_token(&cursor.to_token()).unwrap(), cursor);
        for bad in ["", "zz", &"g".repeat(48), "é".repeat(24).as_str()] {
            assert_eq!(
                decode_page_token(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn endpoint_page_tokens_round_trip_any_pc_id() {
        for pc in ["pc-1", "é x\u{0}", ""] {
            assert_eq!(endpoint_after(&endpoint_page_token(pc)).unwrap(), pc);
        }
        for bad in ["pc-1", "e0", "ezz", "eff"] {
            assert!(endpoint_after(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn outputs_are_cut_on_character_boundaries() {
        let mut s = "é".repeat(3000); // 6000 bytes
        assert!(cut(&mut s, 4096));
        assert_eq!(s.len(), 4096);
        let mut s = "a".repeat(10) + "€"; // 13 bytes
        assert!(cut(&mut s, 12));
        assert_eq!(s, "a".repeat(10));
        let mut short = "ok".to_string();
        assert!(!cut(&mut short, 4096));
    }
}
