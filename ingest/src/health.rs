//! Readiness as the gRPC health service reports it (SPEC §5): `""` and `kanade.v1.Ingest` are
//! SERVING only while the primary database answers and ingest is not draining (and
//! `kanade.v1.Control`, whose requests are written there);
//! `kanade.v1.Activity` follows the database its reads go to (the read replica when
//! `--read-database-url` names one, else the primary); `liveness` is SERVING for as long as the
//! process runs.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use prometheus_client::metrics::gauge::Gauge;
use tonic_health::{ServingStatus, server::HealthReporter};

/// Services whose status follows the primary database.
const WRITE_SERVICES: [&str; 3] = ["", "kanade.v1.Ingest", "kanade.v1.Control"];
/// Services whose status follows the database reads go to.
const READ_SERVICES: [&str; 1] = ["kanade.v1.Activity"];
/// The service that only says the process is alive.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Which database a probe's answer is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// `--database-url`: writes, and reads when there is no replica.
    Primary,
    /// `--read-database-url`.
    ReadReplica,
}

impl Database {
    fn name(self) -> &'static str {
        match self {
            Database::Primary => "database",
            Database::ReadReplica => "read replica",
        }
    }
}

/// Shared readiness state; every change is pushed to the health service at once.
#[derive(Debug, Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    primary_ok: Arc<AtomicBool>,
    /// `None`: reads go to the primary.
    replica_ok: Option<Arc<AtomicBool>>,
    draining: Arc<AtomicBool>,
    /// The metrics saying the same: 1 while `""` (writes) and `kanade.v1.Activity` (reads) are
    /// SERVING.
    ready: Gauge,
    reads_ready: Gauge,
}

impl Readiness {
    /// Starts NOT_SERVING until the databases have answered once; `read_replica` says whether
    /// reads have a database of their own.
    pub async fn new(
        reporter: HealthReporter,
        read_replica: bool,
        (ready, reads_ready): (Gauge, Gauge),
    ) -> Readiness {
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let readiness = Readiness {
            reporter,
            primary_ok: Arc::new(AtomicBool::new(false)),
            replica_ok: read_replica.then(|| Arc::new(AtomicBool::new(false))),
            draining: Arc::new(AtomicBool::new(false)),
            ready,
            reads_ready,
        };
        readiness.publish().await;
        readiness
    }

    /// Records whether `database` answered its last request.
    pub async fn set_ok(&self, database: Database, ok: bool) {
        let flag = match (database, &self.replica_ok) {
            (Database::Primary, _) => &self.primary_ok,
            (Database::ReadReplica, Some(replica)) => replica,
            (Database::ReadReplica, None) => return,
        };
        if flag.swap(ok, Ordering::SeqCst) != ok {
            let name = database.name();
            if ok {
                tracing::info!("{name} is answering: ready");
            } else {
                tracing::warn!("{name} is unavailable: not ready");
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
        let draining = self.draining.load(Ordering::SeqCst);
        let primary = self.primary_ok.load(Ordering::SeqCst);
        let reads = match &self.replica_ok {
            Some(replica) => replica.load(Ordering::SeqCst),
            None => primary,
        };
        let status = |ok: bool| {
            if ok && !draining {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for service in WRITE_SERVICES {
            self.reporter
                .set_service_status(service, status(primary))
                .await;
        }
        for service in READ_SERVICES {
            self.reporter
                .set_service_status(service, status(reads))
                .await;
        }
        self.ready.set(i64::from(primary && !draining));
        self.reads_ready.set(i64::from(reads && !draining));
    }
}
