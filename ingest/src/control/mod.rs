//! Operator control of endpoints (SPEC §14): the `Control` gRPC service, thin, over the rooms
//! that do the work — [`cancel`] (commit a cancel on its run, deliver it to the run's agent
//! wherever it is connected) and [`tail`] (follow a run's output live, from whichever replica
//! holds its agent's stream).
//!
//! Control decides who may call per call: cancelling needs an operator, watching a reader.

pub mod cancel;
pub mod tail;

use std::pin::Pin;

use futures::Stream;
use kanade_shared::pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use cancel::{CancelError, Cancels};
pub use tail::{TailError, TailEvent, Tails, Watcher};

use crate::{
    activity,
    auth::{self, Access},
};

/// The one place a failed cancel becomes a gRPC status.
pub fn cancel_status(err: CancelError) -> Status {
    match err {
        CancelError::NotAnId(_) | CancelError::NoReason | CancelError::ReasonTooLong { .. } => {
            Status::invalid_argument(err.to_string())
        }
        CancelError::NotFound(_) => Status::not_found(err.to_string()),
        CancelError::Finished { .. } => Status::failed_precondition(err.to_string()),
        CancelError::Store(err) => activity::store_status(err),
    }
}

/// The one place a refused tail becomes a gRPC status.
pub fn tail_status(err: TailError) -> Status {
    match err {
        TailError::NotAnId(_) => Status::invalid_argument(err.to_string()),
        TailError::NotFound(_) => Status::not_found(err.to_string()),
        TailError::TooMany { .. } => Status::resource_exhausted(err.to_string()),
        TailError::Store(err) => activity::store_status(err),
    }
}

/// A watcher's event as TailExecution sends it.
pub fn tail_response(event: TailEvent) -> pb::TailExecutionResponse {
    use pb::tail_execution_response::Event;
    pb::TailExecutionResponse {
        event: Some(match event {
            TailEvent::Chunk(chunk) => Event::Chunk(chunk),
            TailEvent::Notice {
                agent_connected,
                message,
            } => Event::Notice(pb::TailNotice {
                agent_connected,
                message,
            }),
            TailEvent::Finished(run) => Event::Finished(activity::execution_to_proto(*run, None)),
        }),
    }
}

/// The Control service.
#[derive(Debug, Clone)]
pub struct ControlService {
    cancels: Cancels,
    tails: Tails,
    /// Cancelled when ingest begins shutting down: open tails end, so they do not hold up the
    /// drain (their callers call again, and reach another replica).
    shutdown: CancellationToken,
}

impl ControlService {
    pub fn new(cancels: Cancels, tails: Tails, shutdown: CancellationToken) -> ControlService {
        ControlService {
            cancels,
            tails,
            shutdown,
        }
    }
}

type TailStream = Pin<Box<dyn Stream<Item = Result<pb::TailExecutionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn cancel_execution(
        &self,
        mut request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        auth::permit(&mut request, Access::Act)?;
        let by = auth::actor(&request);
        let r = request.into_inner();
        let run = self
            .cancels
            .cancel(&r.result_id, &r.reason, &by)
            .await
            .map_err(cancel_status)?;
        Ok(Response::new(activity::execution_to_proto(run, None)))
    }

    type TailExecutionStream = TailStream;

    async fn tail_execution(
        &self,
        mut request: Request<pb::TailExecutionRequest>,
    ) -> Result<Response<TailStream>, Status> {
        auth::permit(&mut request, Access::Read)?;
        let mut held = request.extensions().get::<auth::HeldToken>().cloned();
        let result_id = request.into_inner().result_id;
        let mut watcher = self.tails.watch(&result_id).await.map_err(tail_status)?;
        let shutdown = self.shutdown.clone();
        let events = async_stream::stream! {
            let withdrawn = auth::withdrawn(&mut held);
            tokio::pin!(withdrawn);
            loop {
                tokio::select! {
                    event = watcher.next() => match event {
                        Some(event) => yield Ok(tail_response(event)),
                        None => break,
                    },
                    _ = &mut withdrawn => {
                        yield Err(auth::withdrawn_status());
                        break;
                    }
                    _ = shutdown.cancelled() => {
                        yield Err(Status::unavailable(
                            "ingest is shutting down; call again to go on following the run \
                             (offsets show what you have)",
                        ));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(events)))
    }
}
