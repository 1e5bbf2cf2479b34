//! Operator cancel (SPEC §14): the request is committed on the run's row first, so nothing is
//! lost if a replica dies, then delivered to the run's endpoint over its stream, whichever replica
//! holds it ([`crate::bus`]), and again whenever that endpoint's agent says Hello, until the run
//! has a result. The streams that said Hello are looked up together, a few times a second (one
//! query for a whole reconnect storm's worth of endpoints, not one per stream). Every replica also looks at the pending cancels of its connected endpoints when
//! its listener (re)connects and every `--presence-every`, so a notification lost between
//! replicas delays a cancel, never loses it. Delivery is idempotent: the agent ignores a cancel
//! for a run it does not have running, or is already ending.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use chrono::{SubsecRound, Utc};
use kanade_shared::{limits, pb};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bus::{Bus, Control, ControlMessage},
    metrics::Metrics,
    outbound::StreamSink,
    server::registry::StreamRegistry,
    store::{
        CancelOutcome, CancelRequest, ExecutionRow, PendingCancel, RunState, Store, StoreError,
    },
};

/// Why a run could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("result_id must be a UUID, got {0:?}")]
    NotAnId(String),
    #[error("say why the run is cancelled: the reason is required (it is kept with the run)")]
    NoReason,
    #[error("the reason is {len} bytes long; at most {max} are kept", max = limits::MAX_CANCEL_REASON_BYTES)]
    ReasonTooLong { len: usize },
    #[error("no run has result_id {0}")]
    NotFound(Uuid),
    #[error(
        "run {result_id} already finished ({}): only a run without a result can be cancelled",
        state.as_str().replace('_', " ")
    )]
    Finished { result_id: Uuid, state: RunState },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The streams that said Hello are looked up for pending cancels together, this long after the
/// first of them.
const WELCOMES_GATHER: Duration = Duration::from_millis(50);

/// Cancels runs and delivers the cancels; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cancels {
    store: Arc<dyn Store>,
    bus: Bus,
    registry: Arc<StreamRegistry>,
    lost_grace: chrono::Duration,
    metrics: Arc<Metrics>,
    welcomed: Arc<Welcomed>,
}

/// Streams that said Hello and were not yet looked up for pending cancels.
#[derive(Debug, Default)]
struct Welcomed {
    streams: Mutex<Vec<(String, Weak<StreamSink>)>>,
    arrived: Notify,
}

impl Cancels {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Bus,
        registry: Arc<StreamRegistry>,
        lost_grace: chrono::Duration,
        metrics: Arc<Metrics>,
    ) -> Cancels {
        Cancels {
            store,
            bus,
            registry,
            lost_grace,
            metrics,
            welcomed: Arc::default(),
        }
    }

    /// Cancels the run `result_id` names on behalf of `by`: commits the request on its row and
    /// has it delivered. Returns the run as it stands; asking again while a request is pending
    /// changes nothing (the first request's reason and author stay) and delivers it again.
    pub async fn cancel(
        &self,
        result_id: &str,
        reason: &str,
        by: &str,
    ) -> Result<ExecutionRow, CancelError> {
        let id =
            Uuid::try_parse(result_id).map_err(|_| CancelError::NotAnId(result_id.to_string()))?;
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(CancelError::NoReason);
        }
        if reason.len() > limits::MAX_CANCEL_REASON_BYTES {
            return Err(CancelError::ReasonTooLong { len: reason.len() });
        }
        let now = Utc::now().trunc_subsecs(6);
        let request = CancelRequest {
            at: now,
            reason: crate::store::storable(reason.to_string()),
            by: by.to_string(),
        };
        let outcome = self
            .store
            .request_cancel(id, &request, now, self.lost_grace)
            .await?;
        let (run, first) = match outcome {
            CancelOutcome::NotFound => {
                self.metrics.cancel_request("not_found");
                return Err(CancelError::NotFound(id));
            }
            CancelOutcome::Finished(run) => {
                self.metrics.cancel_request("finished");
                return Err(CancelError::Finished {
                    result_id: id,
                    state: run.state,
                });
            }
            CancelOutcome::Requested { run, first } => (run, first),
        };
        self.metrics
            .cancel_request(if first { "requested" } else { "repeated" });
        let pending = run.cancel.clone().unwrap_or(request);
        tracing::info!(result_id = %id, pc_id = %run.pc_id, by = %pending.by, first,
            reason = %pending.reason, "run cancel requested");
        self.bus
            .publish(ControlMessage::Cancel {
                pc_id: run.pc_id.clone(),
                result_id: id,
                reason: pending.reason,
                by: pending.by,
            })
            .await;
        Ok(run)
    }

    /// Sends `cancel` to its endpoint's streams open on this replica (none: another replica
    /// holds it, or the agent is offline).
    fn send(&self, cancel: &PendingCancel) {
        for sink in self.registry.sinks(&cancel.pc_id) {
            send_to(&sink, cancel);
            self.metrics.cancels_sent.inc();
        }
    }

    /// A stream said Hello: its endpoint's pending cancels follow its Welcome (looked up with
    /// the other streams that said Hello meanwhile).
    pub fn on_welcome(&self, pc_id: &str, sink: &Arc<StreamSink>) {
        self.welcomed
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pc_id.to_string(), Arc::downgrade(sink)));
        self.welcomed.arrived.notify_one();
    }

    /// Sends the streams that said Hello their endpoints' pending cancels.
    async fn serve_welcomed(&self) {
        let welcomed = std::mem::take(
            &mut *self
                .welcomed
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let mut sinks: HashMap<String, Vec<Weak<StreamSink>>> = HashMap::new();
        for (pc_id, sink) in welcomed {
            sinks.entry(pc_id).or_default().push(sink);
        }
        let pcs: Vec<String> = sinks.keys().cloned().collect();
        match self.store.pending_cancels(&pcs).await {
            Ok(pending) => {
                for cancel in &pending {
                    for sink in sinks[&cancel.pc_id].iter().filter_map(Weak::upgrade) {
                        send_to(&sink, cancel);
                        self.metrics.cancels_sent.inc();
                    }
                }
            }
            Err(err) => {
                // The sweep delivers them a little later.
                tracing::warn!(error = %err, endpoints = pcs.len(),
                    "reading the pending cancels of new streams failed");
            }
        }
    }

    /// Sends the pending cancels of every endpoint connected here.
    async fn sweep(&self) {
        let connected = self.registry.connected();
        if connected.is_empty() {
            return;
        }
        match self.store.pending_cancels(&connected).await {
            Ok(pending) => pending.iter().for_each(|c| self.send(c)),
            Err(err) => {
                tracing::warn!(error = %err, "reading pending cancels failed; will try again")
            }
        }
    }

    /// Delivers what the bus brings, the pending cancels of streams that said Hello, and every
    /// `every` looks at what is pending, until `stop`.
    pub async fn deliver(
        self,
        mut controls: mpsc::Receiver<Control>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut look = tokio::time::interval(every);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        look.tick().await;
        loop {
            tokio::select! {
                control = controls.recv() => match control {
                    Some(Control::Cancel(cancel)) => self.send(&cancel),
                    Some(Control::Missed) => self.sweep().await,
                    None => return,
                },
                _ = self.welcomed.arrived.notified() => {
                    tokio::time::sleep(WELCOMES_GATHER).await;
                    self.serve_welcomed().await;
                }
                _ = look.tick() => self.sweep().await,
                _ = stop.cancelled() => return,
            }
        }
    }
}

fn send_to(sink: &StreamSink, cancel: &PendingCancel) {
    sink.send(pb::ingest_message::Msg::Cancel(pb::Cancel {
        result_id: cancel.result_id.hyphenated().to_string(),
        reason: cancel.reason.clone(),
        requested_by: cancel.by.clone(),
    }));
}
