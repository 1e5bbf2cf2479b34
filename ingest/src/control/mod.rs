//! Operator control of endpoints (SPEC §14): the `Control` gRPC service, thin, over the rooms
//! that do the work — [`cancel`] (commit a cancel on its run, deliver it to the run's agent
//! wherever it is connected).

pub mod cancel;

use kanade_shared::pb;
use tonic::{Request, Response, Status};

pub use cancel::{CancelError, Cancels};

use crate::{activity, auth};

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

/// The Control service.
#[derive(Debug, Clone)]
pub struct ControlService {
    cancels: Cancels,
}

impl ControlService {
    pub fn new(cancels: Cancels) -> ControlService {
        ControlService { cancels }
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let by = auth::actor(&request);
        let r = request.into_inner();
        let run = self
            .cancels
            .cancel(&r.result_id, &r.reason, &by)
            .await
            .map_err(cancel_status)?;
        Ok(Response::new(activity::execution_to_proto(run, None)))
    }
}
