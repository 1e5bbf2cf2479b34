//! One run, start to finish: mint its ids, commit `EventStarted` (and the run's journal entry)
//! before spawning, run the process, commit `ExecResult` before forgetting the run.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{SubsecRound, Utc};
use kanade_shared::{
    telemetry,
    wire::{EventStarted, ExecResult, WireError},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};
use uuid::Uuid;

use crate::{
    config::{Job, Program, Settings},
    control::{CancelNote, RunControl},
    live::RunTail,
    outbox::Outbox,
    runner::{self, Echo, ProcessOutcome, ProcessSpec, RunOutput, Stops},
};

/// What to run and under which names.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub manifest_id: String,
    pub version: String,
    pub program: Program,
    pub timeout: Option<Duration>,
    /// The request that caused the run.
    pub request_id: String,
    /// The deployment or schedule firing.
    pub exec_id: String,
    /// Where the output goes besides the result.
    pub echo: Echo,
}

/// A fresh id for a run, a request or a firing.
pub fn mint_id() -> String {
    Uuid::now_v7().hyphenated().to_string()
}

impl RunRequest {
    /// The request of one firing of a scheduled job.
    pub fn scheduled(job: &Job) -> RunRequest {
        RunRequest {
            manifest_id: job.manifest_id.clone(),
            version: job.version.clone(),
            program: job.program.clone(),
            timeout: job.timeout,
            request_id: format!("schedule:{}", job.manifest_id),
            exec_id: mint_id(),
            echo: Echo::Nothing,
        }
    }

    /// The run's `EventStarted`, as `pc_id` reports it now.
    fn started(&self, pc_id: &str) -> EventStarted {
        EventStarted {
            result_id: mint_id(),
            request_id: self.request_id.clone(),
            exec_id: self.exec_id.clone(),
            pc_id: pc_id.to_string(),
            started_at: Utc::now().trunc_subsecs(6),
            manifest_id: self.manifest_id.clone(),
            version: self.version.clone(),
            timeout_secs: self
                .timeout
                .map(|t| u32::try_from(t.as_secs().max(1)).unwrap_or(u32::MAX)),
        }
    }

    /// Checks the events this request would produce against the contract's rules (the ones
    /// ingest applies), so nothing ingest would refuse is ever enqueued.
    pub fn check(&self, pc_id: &str) -> Result<(), WireError> {
        self.started(pc_id).validate()
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Finished {
    pub result: ExecResult,
    pub outcome: ProcessOutcome,
    /// The operator's cancel that ended it, if one did.
    pub cancelled: Option<CancelNote>,
    /// Outbox seqs of the run's two events.
    pub started_seq: u64,
    pub result_seq: u64,
}

/// Runs `request` through the outbox. `kill` ends the process (reported KILLED); so does an
/// operator's cancel reaching the run's control socket (reported CANCELLED).
pub async fn execute(
    outbox: &Outbox,
    settings: &Settings,
    request: RunRequest,
    kill: &CancellationToken,
) -> anyhow::Result<Finished> {
    // The moment of `started_at` on the monotonic clock (taken just before it, so finished_at
    // is never early): the run's duration is measured from it, so finished_at - started_at is
    // the whole run (outbox write and spawn included) and a wall-clock step meanwhile changes
    // nothing.
    let began = Instant::now();
    let started = request.started(&settings.pc_id);
    started
        .validate()
        .map_err(|e| anyhow::anyhow!("refusing to record run of {}: {e}", request.manifest_id))?;
    let result_id = started.result_id.clone();
    // The run's span: its context travels with both events, so ingest's spans join this trace,
    // and into the script's environment as TRACEPARENT.
    let span = tracing::info_span!(
        "run",
        otel.name = %format!("run {}", request.manifest_id),
        manifest_id = %request.manifest_id,
        result_id = %result_id,
        exec_id = %request.exec_id,
        status = Empty,
        exit_code = Empty,
        trace_id = Empty,
    );
    telemetry::record_trace_id(&span);
    let trace_context = telemetry::inject(&span);
    run(
        outbox,
        settings,
        request,
        kill,
        started,
        began,
        trace_context,
    )
    .instrument(span)
    .await
}

async fn run(
    outbox: &Outbox,
    settings: &Settings,
    request: RunRequest,
    kill: &CancellationToken,
    started: EventStarted,
    began: Instant,
    trace_context: BTreeMap<String, String>,
) -> anyhow::Result<Finished> {
    let result_id = started.result_id.clone();
    let output = RunOutput::new(settings.output_cap_bytes);
    let tail = RunTail::new(
        outbox.data_dir(),
        &result_id,
        output.clone(),
        settings.tail_rate_bytes,
    );
    // Listening before ingest can know of the run, so no cancel arrives before the socket.
    let control = RunControl::listen(outbox.data_dir(), &result_id, tail.clone());
    let (lock, started_seq) = outbox
        .begin_run(&started, &trace_context)
        .await
        .context("the run is not started")?;
    tracing::info!("run started");

    let mut env = vec![
        ("KANADE_RESULT_ID".to_string(), result_id.clone()),
        (
            "KANADE_MANIFEST_ID".to_string(),
            request.manifest_id.clone(),
        ),
    ];
    if let Some(traceparent) = trace_context.get("traceparent") {
        env.push(("TRACEPARENT".to_string(), traceparent.clone()));
    }
    let argv = request.program.argv();
    let spec = ProcessSpec {
        argv: &argv,
        env: &env,
        timeout: request.timeout,
        output,
        kill_grace: settings.kill_grace,
        echo: request.echo,
    };
    let stops = Stops {
        kill,
        cancel: control.cancelled(),
    };
    let mut outcome = runner::run_process(spec, stops).await;
    // Whoever watches gets the last output before the result is recorded.
    tail.finish().await;
    let cancelled = (outcome.status == kanade_shared::wire::ExecStatus::Cancelled)
        .then(|| control.cancel_note())
        .flatten();
    drop(control);
    if let Some(note) = &cancelled {
        // Who ended the run and why, where people read what happened to it.
        let stderr = &mut outcome.stderr.text;
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&note.stderr_line());
    }
    let elapsed = chrono::Duration::from_std(outcome.ended.saturating_duration_since(began))
        .unwrap_or(chrono::Duration::MAX);
    let finished_at = started
        .started_at
        .checked_add_signed(elapsed)
        .unwrap_or(started.started_at)
        .trunc_subsecs(6);
    let result = ExecResult {
        result_id: result_id.clone(),
        request_id: request.request_id,
        exec_id: request.exec_id,
        pc_id: settings.pc_id.clone(),
        manifest_id: request.manifest_id,
        version: request.version,
        status: outcome.status,
        exit_code: outcome.exit_code,
        stdout: outcome.stdout.text.clone(),
        stderr: outcome.stderr.text.clone(),
        stdout_dropped_bytes: outcome.stdout.dropped_bytes,
        stderr_dropped_bytes: outcome.stderr.dropped_bytes,
        started_at: started.started_at,
        finished_at,
    };
    let result_seq = outbox
        .finish_run(lock, result.clone(), &trace_context)
        .await?;
    let span = tracing::Span::current();
    span.record("status", result.status.as_str());
    if let Some(code) = result.exit_code {
        span.record("exit_code", code);
    }
    tracing::info!(status = result.status.as_str(), exit_code = ?result.exit_code, "run finished");
    Ok(Finished {
        result,
        outcome,
        cancelled,
        started_seq,
        result_seq,
    })
}
