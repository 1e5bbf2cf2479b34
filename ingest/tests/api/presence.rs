//! Fleet presence end to end (SPEC §14): which endpoints are connected, to which replica, and
//! what their agents report — with real agents, and a replica SIGKILLed under its streams.

use std::time::{Duration, Instant};

use kanade_shared::pb;
use serde_json::json;

use kanade_testkit::{
    AgentHome, AgentStream, Browser, TestDb, TestIngest, free_addr, grpcurl::grpcurl,
};

/// Endpoint `pc_id` as ingest says it, once `check` holds (panics after `within`).
async fn endpoint_when(
    ingest: &TestIngest,
    pc_id: &str,
    within: Duration,
    check: impl Fn(&pb::Endpoint) -> bool,
) -> (pb::Endpoint, Duration) {
    let mut activity = ingest.activity().await;
    let began = Instant::now();
    loop {
        let seen = activity
            .get_endpoint(pb::GetEndpointRequest {
                pc_id: pc_id.to_string(),
            })
            .await;
        if let Ok(endpoint) = &seen
            && check(endpoint.get_ref())
        {
            return (seen.unwrap().into_inner(), began.elapsed());
        }
        assert!(
            began.elapsed() < within,
            "{pc_id} never got there; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One GET of the metrics page.
async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn an_endpoint_is_connected_while_its_agent_runs_and_disconnected_once_it_stops() {
    let db = TestDb::sqlite();
    let metrics_addr = free_addr();
    let ingest = TestIngest::builder(&db.url)
        .args(&[
            "--replica-id",
            "ingest-a",
            "--presence-every",
            "500ms",
            "--metrics-listen",
            &metrics_addr.to_string(),
        ])
        .start()
        .await;
    assert!(
        grpcurl(&ingest, None, &["kanade.v1.Activity/GetEndpoint"])
            .await
            .status()
            .1
            .contains("pc_id is required")
    );
    let (code, message) = grpcurl(
        &ingest,
        Some(&json!({"pc_id": "pc-test"})),
        &["kanade.v1.Activity/GetEndpoint"],
    )
    .await
    .status();
    assert_eq!(code, "NotFound");
    assert!(message.contains("never seen"), "{message}");

    let home = AgentHome::new(&ingest.url(), "status_every = \"1s\"\n");
    let mut daemon = home.daemon();
    let (e, _) = endpoint_when(&ingest, "pc-test", Duration::from_secs(10), |e| {
        e.connected && e.status_at.is_some()
    })
    .await;
    assert_eq!(e.replica, "ingest-a");
    assert_eq!(e.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!e.hostname.is_empty() && e.os.starts_with("linux"), "{e:?}");
    assert_eq!((e.outbox_depth, e.dead_letters, e.running_runs), (0, 0, 0));
    let since = e.connected_since;

    // grpcurl, as the README shows it.
    let listed = grpcurl(
        &ingest,
        Some(&json!({"connected": true})),
        &["kanade.v1.Activity/ListEndpoints"],
    )
    .await
    .json();
    assert_eq!(listed["endpoints"][0]["pcId"], "pc-test", "{listed}");
    let none = grpcurl(
        &ingest,
        Some(&json!({"connected": false})),
        &["kanade.v1.Activity/ListEndpoints"],
    )
    .await
    .json();
    assert_eq!(none, json!({}), "nothing disconnected");
    let page = metrics(metrics_addr).await;
    assert!(
        page.contains("kanade_ingest_connected_endpoints 1"),
        "{page}"
    );
    assert!(
        page.contains("kanade_ingest_presence_statements_total"),
        "{page}"
    );

    // The console lists it, with a link to its runs.
    let browser = Browser::start(1280, 700).await;
    browser
        .client
        .goto(&format!("{}/endpoints", ingest.console_url()))
        .await
        .unwrap();
    browser
        .wait_for_text(
            "Every endpoint is connected and keeping up.",
            Duration::from_secs(5),
        )
        .await;
    assert!(browser.text().await.contains("pc-test"));
    browser.screenshot("endpoints").await;

    // The agent stops: disconnected, and its connection's start is kept.
    assert!(daemon.terminate().success());
    let (e, took) =
        endpoint_when(&ingest, "pc-test", Duration::from_secs(5), |e| !e.connected).await;
    assert_eq!(e.connected_since, since);
    eprintln!("disconnected {took:?} after the agent stopped");
    browser
        .wait_for_text("Needs attention (1)", Duration::from_secs(5))
        .await;
    assert!(browser.text().await.contains("disconnected"));
    browser.screenshot("endpoints-disconnected").await;
    browser.close().await;
}

#[tokio::test]
async fn an_agent_that_stops_leaves_its_last_figures_not_those_it_connected_with() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = std::sync::Arc::new(AgentHome::new(&ingest.url(), ""));
    // `exec --wait` connects while its run runs (one event waiting, one run running), and
    // disconnects once the result is acknowledged: its last report says it left nothing.
    let exec = {
        let home = home.clone();
        tokio::task::spawn_blocking(move || home.exec(&["--wait"], "nap", &["sleep", "3"]))
    };
    let (e, _) = endpoint_when(&ingest, "pc-test", Duration::from_secs(10), |e| {
        e.connected && e.running_runs == 1
    })
    .await;
    let connected_at = e.status_at.unwrap();
    assert!(e.outbox_depth >= 1, "{e:?}");
    let out = exec.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let (e, _) = endpoint_when(&ingest, "pc-test", Duration::from_secs(5), |e| !e.connected).await;
    assert_eq!((e.outbox_depth, e.running_runs), (0, 0), "{e:?}");
    let left_at = e.status_at.unwrap();
    assert!(
        (left_at.seconds, left_at.nanos) > (connected_at.seconds, connected_at.nanos),
        "{e:?}"
    );
}

#[tokio::test]
async fn what_an_agent_reports_is_kept_and_a_backlogged_one_comes_first() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let mut quiet = AgentStream::open(&mut client, "pc-quiet").await;
    let mut behind = AgentStream::open_with(&mut client, Some(kanade_testkit::hello("pc-behind")))
        .await
        .unwrap();
    match behind.next().await {
        Some(pb::ingest_message::Msg::Welcome(w)) => assert!(w.accepts_agent_status),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let status = |depth, oldest: Option<chrono::DateTime<chrono::Utc>>| pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Status(pb::AgentStatus {
            outbox_depth: depth,
            outbox_bytes: depth * 1000,
            oldest_pending_at: oldest.map(kanade_shared::wire::timestamp_to_proto),
            dead_letters: 3,
            running_runs: 2,
            hostname: "web-7".into(),
            os: "linux x86_64 (<b>bold</b>)".into(),
        })),
    };
    let hour_ago = kanade_testkit::now() - chrono::Duration::hours(1);
    behind.tx.send(status(5000, Some(hour_ago))).await.unwrap();
    quiet.tx.send(status(0, None)).await.unwrap();
    // A message this ingest does not know (a newer agent's) is ignored, the stream goes on.
    quiet.tx.send(pb::AgentMessage { msg: None }).await.unwrap();
    let (e, _) = endpoint_when(&ingest, "pc-behind", Duration::from_secs(5), |e| {
        e.status_at.is_some()
    })
    .await;
    assert_eq!(
        (
            e.outbox_depth,
            e.outbox_bytes,
            e.dead_letters,
            e.running_runs
        ),
        (5000, 5_000_000, 3, 2)
    );
    assert_eq!(
        e.oldest_pending_at.map(|t| t.seconds),
        Some(hour_ago.timestamp())
    );
    assert_eq!(e.hostname, "web-7");

    let browser = Browser::start(1280, 700).await;
    browser
        .client
        .goto(&format!("{}/endpoints", ingest.console_url()))
        .await
        .unwrap();
    browser
        .wait_for_text("Needs attention (1)", Duration::from_secs(5))
        .await;
    let attention = browser.text_of("section.attention").await;
    assert!(
        attention.contains("pc-behind") && attention.contains("5000 events"),
        "{attention}"
    );
    assert!(!attention.contains("pc-quiet"), "{attention}");
    assert!(
        browser.text().await.contains("linux x86_64 (<b>bold</b>)"),
        "what an agent says is text"
    );
    browser.close().await;
    // The quiet stream is still open after the unknown message.
    let run = kanade_testkit::Run::new("pc-quiet");
    quiet.send(run.started_event(1)).await;
    assert_eq!(quiet.answers(1).await.0, [1]);
}

#[tokio::test]
async fn a_killed_replica_leaves_no_endpoint_connected_for_more_than_three_presence_intervals() {
    let db = TestDb::postgres().await;
    let every = Duration::from_millis(700);
    let start = |id: &'static str| {
        let url = db.url.clone();
        async move {
            TestIngest::builder(&url)
                .args(&["--replica-id", id, "--presence-every", "700ms"])
                .start()
                .await
        }
    };
    let (survivor, mut doomed) = (start("survivor").await, start("doomed").await);
    let home = AgentHome::new(&doomed.url(), "");
    let _daemon = home.daemon();
    let (e, _) = endpoint_when(&survivor, "pc-test", Duration::from_secs(10), |e| {
        e.connected
    })
    .await;
    assert_eq!(e.replica, "doomed", "seen through the other replica");

    doomed.sigkill();
    let (e, took) = endpoint_when(&survivor, "pc-test", Duration::from_secs(10), |e| {
        !e.connected
    })
    .await;
    assert_eq!(e.replica, "doomed", "the row still says where it was");
    assert!(
        took <= every * 3 + Duration::from_millis(800),
        "not connected only after {took:?}"
    );
    eprintln!("not connected {took:?} after its replica was killed");
}
