//! One trace from script run to database commit, in a real OTLP receiver.

use std::time::Duration;

use kanade_testkit::{AgentHome, OtlpReceiver, TestDb, TestIngest, eventually};

#[tokio::test]
async fn an_agent_run_and_its_ingest_commit_share_one_trace() {
    let receiver = OtlpReceiver::start().await;
    let env = receiver.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url).envs(&env_refs).start().await;
    let home = AgentHome::new(&ingest.url(), "");
    let mut exec = home.command(&[
        "exec",
        "--wait",
        "--manifest",
        "traced",
        "--",
        "sh",
        "-c",
        "echo $TRACEPARENT",
    ]);
    exec.envs(env_refs.iter().copied());
    // The receiver runs on this test's runtime: wait for the agent off it.
    let out = tokio::task::spawn_blocking(move || exec.output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    eventually(
        Duration::from_secs(15),
        "agent and ingest spans exported",
        || async {
            let spans = receiver.spans();
            spans.iter().any(|s| s.name == "run traced")
                && spans.iter().filter(|s| s.name == "ingest.event").count() >= 2
                && spans.iter().any(|s| s.name == "UPSERT execution_results")
        },
    )
    .await;
    let spans = receiver.spans();
    let run = spans.iter().find(|s| s.name == "run traced").unwrap();
    assert_eq!(run.service, "kanade-agent");
    assert_eq!(run.attributes["manifest_id"], "traced");
    assert_eq!(run.attributes["status"], "succeeded");
    assert_eq!(run.attributes["exit_code"], "0");

    // Both events continue the run's trace inside ingest.
    let events: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "ingest.event" && s.trace_id == run.trace_id)
        .collect();
    assert_eq!(events.len(), 2, "{spans:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.parent_span_id == run.span_id && e.service == "kanade-ingest")
    );

    // Each event is linked from the batch that committed it, whose child is the database write.
    for event in &events {
        let batch = spans
            .iter()
            .find(|s| {
                s.name == "ingest.batch"
                    && s.links
                        .contains(&(event.trace_id.clone(), event.span_id.clone()))
            })
            .expect("a batch span linking the event");
        assert!(
            spans
                .iter()
                .any(|s| s.name == "UPSERT execution_results" && s.parent_span_id == batch.span_id),
            "the database span under the batch"
        );
    }

    // The script saw the run's span as its TRACEPARENT.
    let stored = db
        .store()
        .await
        .get(
            run.attributes["result_id"].parse().unwrap(),
            kanade_testkit::now(),
            chrono::Duration::minutes(5),
        )
        .await
        .unwrap()
        .unwrap();
    let printed = stored.outcome.unwrap().stdout;
    assert!(
        printed.starts_with(&format!("00-{}-{}-", run.trace_id, run.span_id)),
        "TRACEPARENT was {printed:?}"
    );
    // The agent's outbox writes and stream connection are spans too.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "outbox.begin_run" && s.trace_id == run.trace_id)
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == "ingest.stream" && s.service == "kanade-agent")
    );
}
