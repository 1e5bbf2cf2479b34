//! Readiness as the gRPC health service reports it (SPEC §5): `""`, `kanade.v1.Ingest` and
//! `kanade.v1.Activity` are SERVING only while the store answers and ingest is not draining;
//! `liveness` is SERVING for as long as the process runs.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tonic_health::{ServingStatus, server::HealthReporter};

/// Services whose status follows readiness.
const READINESS_SERVICES: [&str; 3] = ["", "kanade.v1.Ingest", "kanade.v1.Activity"];
/// The service that only says the process is alive.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Shared readiness state; every change is pushed to the health service at once.
#[derive(Debug, Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    store_ok: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Starts NOT_SERVING until the store has answered once.
    pub async fn new(reporter: HealthReporter) -> Readiness {
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let readiness = Readiness {
            reporter,
            store_ok: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
        };
        readiness.publish().await;
        readiness
    }

    /// Records whether the store answered its last request.
    pub async fn set_store_ok(&self, ok: bool) {
        if self.store_ok.swap(ok, Ordering::SeqCst) != ok {
            if ok {
                tracing::info!("store is answering: ready");
            } else {
                tracing::warn!("store is unavailable: not ready");
            }
            self.publish().await;
        }
    }

    /// Ingest is shutting down: never ready again.
    pub async fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish().await;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    async fn publish(&self) {
        let ready = self.store_ok.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in READINESS_SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
    }
}
