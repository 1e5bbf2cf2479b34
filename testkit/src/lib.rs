//! The harness every Kanade integration test uses, by concern: fresh databases ([`db`]), the
//! real `kanade-ingest` ([`ingest`]) and `kanade-agent` ([`agent`]) binaries, test traffic
//! ([`events`]), the real grpcurl ([`grpcurl`]), raw agent streams ([`stream`]) and in-memory
//! queues for real senders ([`queue`]), fault injection and a round-robin front over replicas
//! ([`proxy`]), a streaming standby of the test server ([`standby`]), an OTLP receiver
//! ([`otlp`]), a test CA ([`ca`]), a headless browser ([`browser`]) and what `/proc` says about a
//! server ([`procfs`]). Everything talks to the real thing: PostgreSQL, SQLite files, gRPC over
//! loopback, child processes.

pub mod agent;
pub mod browser;
pub mod ca;
pub mod db;
pub mod events;
pub mod grpcurl;
pub mod ingest;
pub mod otlp;
pub mod procfs;
pub mod proxy;
pub mod queue;
pub mod standby;
pub mod stream;

use std::{net::SocketAddr, time::Duration};

pub use agent::{AgentHome, Daemon, SmallDisk};
pub use browser::Browser;
pub use ca::{IssuedCert, TestCa, tls_channel};
pub use db::{Backend, StoredRun, TestDb, postgres_admin_url};
pub use events::{Run, now};
pub use ingest::{NOT_SERVING, SERVING, TestIngest, TestIngestBuilder, add_token, health};
pub use otlp::{CollectedSpan, OtlpReceiver};
pub use proxy::{FaultProxy, RoundRobin};
pub use standby::Standby;
pub use stream::{AgentStream, event_msg, hello};

/// A binary of this workspace: cargo says where for the package under test; the others sit next
/// to it in the target directory (`cargo test --workspace` builds them all).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let path = std::env::current_exe()
        .expect("test executable path")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build -p {name}` first)",
        path.display()
    );
    path
}

/// The `q` quantile (0.0 ..= 1.0) of samples sorted ascending, by the nearest rank; `None` when
/// there are none.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last as f64 * q).round() as usize).copied()
}

/// A free loopback address for a server started with it (one that must come back on the same
/// port, or a second listener), outside the ephemeral range: a port picked from that range can be
/// taken as another connection's source port before the server binds it.
pub fn free_addr() -> SocketAddr {
    let port = free_port_outside_ephemeral_range().expect("a free port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A free port on 127.0.0.1 outside the kernel's ephemeral range, for a server that is down
/// while clients keep trying to reach it and must then come up on that port. Each failed
/// connect takes a source port from the ephemeral range; when one is the target port itself, the
/// socket can connect to itself (TCP simultaneous open) and holds the port, and the server's bind
/// fails. A port the kernel never hands out as a source port cannot be taken that way either by
/// the many client connections tests run beside each other.
pub fn free_port_outside_ephemeral_range() -> anyhow::Result<u16> {
    use anyhow::{Context, bail};
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading /proc/sys/net/ipv4/ip_local_port_range")?;
    let bounds: Vec<u16> = range
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let [low, high] = bounds[..] else {
        bail!("unexpected ip_local_port_range: {range:?}");
    };
    // Registered ports below the range, else the few above it.
    let candidates = if low > 11_000 {
        10_000..low
    } else {
        high.saturating_add(1)..u16::MAX
    };
    anyhow::ensure!(
        !candidates.is_empty(),
        "the ephemeral range {low}-{high} leaves no port outside it"
    );
    for _ in 0..200 {
        let port = fastrand::u16(candidates.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1 between {candidates:?} after 200 tries")
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
