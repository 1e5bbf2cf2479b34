//! Every listener, every connection (SPEC §12), against the real binary: TCP_NODELAY on the
//! server's side of every accepted socket, connections that never prove their protocol closed
//! at the deadline, and running out of file descriptors survived without spinning.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use kanade_shared::pb::ingest_client::IngestClient;
use kanade_testkit::{Run, TestCa, TestDb, TestIngest, eventually, free_addr, procfs, tls_channel};

/// Connects to `addr`, sends `first_bytes`, and asks the real server (through pidfd_getfd)
/// whether its side of the connection has TCP_NODELAY.
async fn server_nodelay(ingest: &TestIngest, addr: SocketAddr, first_bytes: &[u8]) -> bool {
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(first_bytes).unwrap();
    let local = client.local_addr().unwrap();
    let pid = ingest.child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(nodelay) = procfs::server_side_nodelay(pid, addr.port(), local) {
            return nodelay;
        }
        assert!(
            Instant::now() < deadline,
            "the server never accepted {local}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn every_listener_sets_tcp_nodelay_on_the_servers_side() {
    let db = TestDb::sqlite();
    let (health, metrics) = (free_addr(), free_addr());
    let ingest = TestIngest::builder(&db.url)
        .args(&[
            "--health-listen",
            &health.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .start()
        .await;
    assert!(
        server_nodelay(&ingest, ingest.addr, HTTP2_PREFACE).await,
        "gRPC"
    );
    assert!(
        server_nodelay(&ingest, health, HTTP2_PREFACE).await,
        "health"
    );
    let get = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n";
    assert!(server_nodelay(&ingest, metrics, get).await, "metrics");

    let ca = TestCa::new("kanade test CA");
    let tls_db = TestDb::sqlite();
    let tls = TestIngest::builder(&tls_db.url)
        .tls(&ca.server("server"))
        .start()
        .await;
    // A TLS ClientHello's first bytes; the socket option is set before the handshake.
    assert!(
        server_nodelay(&tls, tls.addr, b"\x16\x03\x01").await,
        "gRPC over TLS"
    );
    // And the services answer on it.
    tls_channel(tls.addr, &ca, None)
        .await
        .expect("TLS still serves");
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a server's SETTINGS frame: keep reading
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[tokio::test]
async fn connections_that_never_speak_are_closed_at_the_deadline_on_every_listener() {
    let db = TestDb::sqlite();
    let (health, metrics) = (free_addr(), free_addr());
    let ingest = TestIngest::builder(&db.url)
        .args(&[
            "--hello-timeout",
            "500ms",
            "--health-listen",
            &health.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .start()
        .await;
    for (name, addr) in [
        ("gRPC", ingest.addr),
        ("health", health),
        ("metrics", metrics),
    ] {
        let mut idle: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Half of the preface is not the preface.
        idle[0].write_all(&HTTP2_PREFACE[..10]).unwrap();
        let started = Instant::now();
        for (i, stream) in idle.iter_mut().enumerate() {
            assert!(
                closed_by_server(stream, Duration::from_secs(5)),
                "{name}: idle connection {i} still open after {:?}",
                started.elapsed()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: closed only after {:?}",
            started.elapsed()
        );
    }
    // A kept-alive HTTP/1.1 connection that goes idle after its request is closed too.
    let mut kept = TcpStream::connect(metrics).unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_server(&mut kept, Duration::from_secs(5)),
        "idle keep-alive"
    );
    // Meanwhile the server serves whoever speaks.
    ingest
        .ingest()
        .await
        .publish(Run::new("pc-a").started_event(0))
        .await
        .unwrap();
    assert!(
        ingest
            .log()
            .contains("HTTP/2 preface not completed in time")
    );
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_survived_and_never_spun_on() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .fd_limit(256)
        .args(&["--hello-timeout", "4s"])
        .start()
        .await;
    let pid = ingest.child.id();
    // More idle connections than the process may hold files: accepts fail with EMFILE until
    // the deadline closes the idle ones.
    let idle: Vec<TcpStream> = (0..400)
        .map(|_| TcpStream::connect(ingest.addr).unwrap())
        .collect();
    eventually(Duration::from_secs(5), "the exhaustion logged", || async {
        ingest.log().contains("out of file descriptors")
    })
    .await;
    let cpu_before = procfs::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu = procfs::cpu_seconds(pid) - cpu_before;
    assert!(
        cpu < 0.5,
        "ingest used {cpu:.2} s of CPU in 1.5 s while out of file descriptors: it spins"
    );
    // A real client is served once the silent ones are gone, without restarting anything.
    let publish = async {
        loop {
            let attempt = async {
                let mut client = IngestClient::connect(ingest.url()).await.ok()?;
                client.publish(Run::new("pc-a").started_event(0)).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), publish)
        .await
        .expect("a legitimate client was served again after the exhaustion");
    drop(idle);
    let log = ingest.log();
    let reports = log.matches("out of file descriptors").count();
    assert!(
        reports <= 2,
        "the exhaustion is logged at most every 10 s, got {reports} lines:\n{log}"
    );
    assert!(log.contains("fd_limit=256"), "the limit is named: {log}");
}
