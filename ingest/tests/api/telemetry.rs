//! Observability of ingest: Prometheus counts after a known workload, and OpenTelemetry spans in
//! a real OTLP receiver.

use std::time::Duration;

use kanade_shared::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kanade_testkit::{AgentStream, OtlpReceiver, Run, TestDb, TestIngest, eventually, free_addr};

/// GET /metrics over plain HTTP/1.1.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of one sample line, e.g. `kanade_ingest_events_received_total`.
pub(crate) fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    let db = TestDb::sqlite();
    let metrics = free_addr();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--metrics-listen", &metrics.to_string()])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-m").await;
    let runs: Vec<Run> = (0..3).map(|_| Run::new("pc-m")).collect();
    for (i, run) in runs.iter().enumerate() {
        stream.send(run.started_event(2 * i as u64 + 1)).await;
        stream.send(run.result_event(2 * i as u64 + 2)).await;
    }
    let mut invalid = Run::new("pc-m").started_event(7);
    invalid.body = None;
    stream.send(invalid).await;
    stream.send(Run::new("pc-other").started_event(8)).await;
    let (acked, rejected) = stream.answers(8).await;
    assert_eq!((acked.len(), rejected.len()), (6, 2));
    client
        .publish(Run::new("pc-p").started_event(0))
        .await
        .unwrap();

    let text = scrape(metrics).await;
    assert_eq!(sample(&text, "kanade_ingest_events_received_total"), 9.0);
    assert_eq!(sample(&text, "kanade_ingest_events_committed_total"), 7.0);
    assert_eq!(
        sample(
            &text,
            "kanade_ingest_events_rejected_total{reason=\"invalid\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "kanade_ingest_events_rejected_total{reason=\"wrong_pc\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "kanade_ingest_open_streams"), 1.0);
    assert_eq!(sample(&text, "kanade_ingest_queue_depth"), 0.0);
    let batches = sample(&text, "kanade_ingest_batch_size_count");
    assert!(batches >= 2.0, "{text}");
    assert_eq!(sample(&text, "kanade_ingest_batch_size_sum"), 7.0);
    assert_eq!(sample(&text, "kanade_ingest_commit_seconds_count"), batches);
    drop(stream);
    eventually(
        Duration::from_secs(5),
        "the stream gone from the gauge",
        || async { sample(&scrape(metrics).await, "kanade_ingest_open_streams") == 0.0 },
    )
    .await;
}

#[tokio::test]
async fn a_unary_call_with_traceparent_joins_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let mut env = receiver.env();
    env.push(("RUST_LOG", "info,kanade_ingest=debug".to_string()));
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url).envs(&env).start().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(Run::new("pc-t").started_event(0));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    ingest.ingest().await.publish(request).await.unwrap();

    eventually(
        Duration::from_secs(10),
        "the call's spans exported",
        || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.trace_id == trace_id && s.name == "ingest.event")
        },
    )
    .await;
    let spans = receiver.spans();
    let call = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.name == "/kanade.v1.Ingest/Publish")
        .expect("the gRPC call's span");
    assert_eq!(call.parent_span_id, caller_span);
    assert_eq!(call.service, "kanade-ingest");
    let event = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.name == "ingest.event")
        .unwrap();
    assert_eq!(event.parent_span_id, call.span_id);
    eventually(
        Duration::from_secs(10),
        "the batch span exported",
        || async { receiver.spans().iter().any(|s| s.name == "ingest.batch") },
    )
    .await;
    let spans = receiver.spans();
    let batch = spans.iter().find(|s| s.name == "ingest.batch").unwrap();
    assert!(
        batch
            .links
            .contains(&(trace_id.to_string(), event.span_id.clone())),
        "the batch links the event: {batch:?}"
    );
    assert_eq!(batch.attributes["batch.size"], "1");
    let db_span = spans
        .iter()
        .find(|s| s.name == "UPSERT execution_results")
        .expect("the database span");
    assert_eq!(db_span.parent_span_id, batch.span_id);
    assert_eq!(db_span.attributes["db.system.name"], "sqlite");
    assert_eq!(
        db_span.attributes["db.collection.name"],
        "execution_results"
    );
    // Log lines carry the trace id.
    assert!(ingest.log().contains(trace_id), "{}", ingest.log());
}

#[tokio::test]
async fn a_batch_span_links_every_event_of_a_batch_larger_than_the_default() {
    let receiver = OtlpReceiver::start().await;
    let mut env = receiver.env();
    // Every event's span is exported too: room for all of them in the exporter's queue.
    env.push(("OTEL_BSP_MAX_QUEUE_SIZE", "20000".to_string()));
    let db = TestDb::sqlite();
    // 1,500 rows hold 3,000 events; 2,500 arrive within the linger, so they are one batch of
    // more events than a batch of the default 1,000 rows could hold.
    let ingest = TestIngest::builder(&db.url)
        .envs(&env)
        .args(&["--batch-max-rows", "1500", "--batch-linger", "5s"])
        .start()
        .await;
    let (streams, runs_per_stream) = (5, 250);
    let mut client = ingest.ingest().await;
    let mut opened = Vec::new();
    for s in 0..streams {
        let pc_id = format!("pc-links-{s}");
        let stream = AgentStream::open(&mut client, &pc_id).await;
        for r in 0..runs_per_stream {
            let run = Run::new(&pc_id);
            stream.send(run.started_event(2 * r + 1)).await;
            stream.send(run.result_event(2 * r + 2)).await;
        }
        opened.push(stream);
    }
    let events = (streams * runs_per_stream * 2) as usize;
    for stream in &mut opened {
        let (acked, _) = stream.answers(events / streams as usize).await;
        assert_eq!(acked.len(), events / streams as usize);
    }
    eventually(
        Duration::from_secs(20),
        "the batch span exported",
        || async { receiver.spans().iter().any(|s| s.name == "ingest.batch") },
    )
    .await;
    let spans = receiver.spans();
    let batches: Vec<_> = spans.iter().filter(|s| s.name == "ingest.batch").collect();
    assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    assert_eq!(batches[0].attributes["batch.size"], events.to_string());
    assert_eq!(batches[0].links.len(), events, "a link for every event");
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_set_up_for_export() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    ingest
        .ingest()
        .await
        .publish(Run::new("pc-q").started_event(0))
        .await
        .unwrap();
    let log = ingest.log();
    assert!(!log.contains("exporting traces"), "{log}");
    assert!(
        !log.contains("trace_id="),
        "no trace ids without export: {log}"
    );
    let _ = pb::Event::default();
}
