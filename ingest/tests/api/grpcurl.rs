//! Ingest as an operator meets it with grpcurl (SPEC §2, §5): the real `grpcurl` binary (1.8,
//! which speaks only reflection v1alpha) against the real server, with nothing but reflection to
//! learn the schema. These are the commands the README shows, so a change that breaks them (a
//! renamed service, a dropped reflection version, lost doc comments, an error code that moved)
//! fails here first.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use kanade_testkit::{
    Backend, TestDb, TestIngest,
    grpcurl::{grpcurl, grpcurl_at, grpcurl_over},
    now,
};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A timestamp field of grpcurl's JSON output, which must be RFC 3339.
fn timestamp(v: &Value, field: &str) -> DateTime<Utc> {
    let text = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing or not a string in {v:#}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{field} = {text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// The `result_id`s of a ListExecutions answer, in the order listed.
fn listed(response: &Value) -> Vec<String> {
    response["executions"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| r["resultId"].as_str().expect("resultId").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Lists the runs in one state.
async fn list_in_state(ingest: &TestIngest, state: &str) -> Value {
    grpcurl(
        ingest,
        Some(&json!({ "states": [state] })),
        &["kanade.v1.Activity/ListExecutions"],
    )
    .await
    .json()
}

/// Publish bodies exactly as a person would type them after `-d`.
fn started_json(result_id: &str, started_at: DateTime<Utc>) -> Value {
    json!({ "started": {
        "result_id": result_id,
        "request_id": "req-1",
        "exec_id": "exec-1",
        "pc_id": "pc-grpcurl",
        "started_at": rfc3339(started_at),
        "manifest_id": "inventory",
        "version": "3",
        "timeout_secs": 60,
    }})
}

fn failed_result_json(
    result_id: &str,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
) -> Value {
    json!({ "result": {
        "result_id": result_id,
        "request_id": "req-1",
        "exec_id": "exec-1",
        "pc_id": "pc-grpcurl",
        "manifest_id": "inventory",
        "version": "3",
        "status": "EXEC_STATUS_FAILED",
        "exit_code": 2,
        "stdout": "disk: 93% used\n",
        "stderr": "warning: disk almost full\n",
        "started_at": rfc3339(started_at),
        "finished_at": rfc3339(finished_at),
    }})
}

#[tokio::test]
async fn list_through_reflection_shows_ingest_activity_and_health() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;

    let out = grpcurl(&ingest, None, &["list"]).await;
    let services = out.names();
    for expected in [
        "kanade.v1.Ingest",
        "kanade.v1.Activity",
        "kanade.v1.Control",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(&expected),
            "{expected} missing from `grpcurl list`: {services:?}"
        );
    }

    let out = grpcurl(&ingest, None, &["list", "kanade.v1.Ingest"]).await;
    let methods = out.names();
    assert!(
        methods.contains(&"kanade.v1.Ingest.Publish")
            && methods.contains(&"kanade.v1.Ingest.Stream"),
        "Ingest methods through reflection: {methods:?}"
    );
    let out = grpcurl(&ingest, None, &["list", "kanade.v1.Activity"]).await;
    let methods = out.names();
    assert!(
        methods.contains(&"kanade.v1.Activity.ListExecutions")
            && methods.contains(&"kanade.v1.Activity.GetExecution")
            && methods.contains(&"kanade.v1.Activity.ListEndpoints")
            && methods.contains(&"kanade.v1.Activity.GetEndpoint"),
        "Activity methods through reflection: {methods:?}"
    );
    let out = grpcurl(&ingest, None, &["list", "kanade.v1.Control"]).await;
    assert_eq!(
        out.names(),
        [
            "kanade.v1.Control.CancelExecution",
            "kanade.v1.Control.TailExecution"
        ]
    );
}

#[tokio::test]
async fn describe_event_started_shows_the_proto_doc_comments() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;

    let out = grpcurl(&ingest, None, &["describe", "kanade.v1.EventStarted"]).await;
    let text = out.text();
    assert!(
        text.contains("kanade.v1.EventStarted is a message"),
        "{text}"
    );
    // The message's own comment, a field's comment, and the fields with their numbers.
    assert!(
        text.contains("// A run is about to start"),
        "message doc comment missing:\n{text}"
    );
    assert!(
        text.contains("// Agent-minted id of this run"),
        "result_id doc comment missing:\n{text}"
    );
    for field in [
        "string result_id = 1;",
        "string pc_id = 4;",
        ".google.protobuf.Timestamp started_at = 5;",
        "optional uint32 timeout_secs = 8;",
    ] {
        assert!(text.contains(field), "{field} missing:\n{text}");
    }

    let out = grpcurl(&ingest, None, &["describe", "kanade.v1.Activity"]).await;
    assert!(
        out.text()
            .contains("// One run with its outputs whole; NOT_FOUND"),
        "rpc doc comments missing:\n{}",
        out.text()
    );
}

#[tokio::test]
async fn health_check_is_serving_overall_per_service_and_for_liveness() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;

    let overall = grpcurl(&ingest, None, &["grpc.health.v1.Health/Check"]).await;
    assert_eq!(
        overall.json(),
        json!({ "status": "SERVING" }),
        "service \"\""
    );
    for service in [
        "kanade.v1.Ingest",
        "kanade.v1.Activity",
        "kanade.v1.Control",
        "liveness",
    ] {
        let out = grpcurl(
            &ingest,
            Some(&json!({ "service": service })),
            &["grpc.health.v1.Health/Check"],
        )
        .await;
        assert_eq!(out.json(), json!({ "status": "SERVING" }), "{service}");
    }

    let unknown = grpcurl(
        &ingest,
        Some(&json!({ "service": "kanade.v1.NoSuchService" })),
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert_eq!(unknown.status().0, "NotFound");
    assert_eq!(unknown.code, Some(64 + 5), "grpcurl exits 64 + NOT_FOUND");
}

/// The health-only port (`--health-listen`, where Kubernetes probes go) answers grpcurl as an
/// operator debugging a probe types it: plaintext, no proto files, only reflection.
#[tokio::test]
async fn grpcurl_checks_health_on_the_health_port_as_an_operator_types_it() {
    let db = TestDb::sqlite();
    let health_addr = kanade_testkit::free_addr();
    let _ingest = TestIngest::builder(&db.url)
        .args(&["--health-listen", &health_addr.to_string()])
        .start()
        .await;
    let check = grpcurl_at(
        health_addr,
        &["-plaintext"],
        None,
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert_eq!(check.json(), json!({ "status": "SERVING" }));
    let liveness = grpcurl_at(
        health_addr,
        &["-plaintext"],
        Some(&json!({ "service": "liveness" })),
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert_eq!(liveness.json(), json!({ "status": "SERVING" }));
    let listed = grpcurl_at(health_addr, &["-plaintext"], None, &["list"]).await;
    assert!(
        listed.names().contains(&"grpc.health.v1.Health"),
        "{}",
        listed.stdout
    );
    assert!(
        !listed.names().contains(&"kanade.v1.Ingest"),
        "the health port serves health only: {}",
        listed.stdout
    );
}

mod sqlite {
    #[tokio::test]
    async fn published_run_is_listed_running_then_failed_and_fetched_whole() {
        super::published_run_is_listed_running_then_failed_and_fetched_whole(super::Backend::Sqlite)
            .await
    }
}

mod postgres {
    #[tokio::test]
    async fn published_run_is_listed_running_then_failed_and_fetched_whole() {
        super::published_run_is_listed_running_then_failed_and_fetched_whole(
            super::Backend::Postgres,
        )
        .await
    }
}

/// A run published as Started shows up as RUNNING; its Result turns it FAILED. A second run
/// that never ends stays RUNNING, so the state filter is seen to select rather than pass all.
async fn published_run_is_listed_running_then_failed_and_fetched_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ingest = TestIngest::start(&db.url).await;
    let run = Uuid::now_v7().to_string();
    let other = Uuid::now_v7().to_string();
    let started_at = now() - chrono::Duration::seconds(5);
    let finished_at = started_at + chrono::Duration::milliseconds(1500);
    let before = Utc::now();

    for (id, at) in [
        (&run, started_at),
        (&other, started_at + chrono::Duration::seconds(1)),
    ] {
        let published = grpcurl(
            &ingest,
            Some(&started_json(id, at)),
            &["kanade.v1.Ingest/Publish"],
        )
        .await;
        assert_eq!(published.json(), json!({ "resultId": id }));
    }
    let after_started = Utc::now();

    // After the Started events: both runs running, newest first, nothing failed.
    let running = list_in_state(&ingest, "EXECUTION_STATE_RUNNING").await;
    assert_eq!(listed(&running), [other.as_str(), run.as_str()]);
    let row = &running["executions"][1];
    assert_eq!(row["state"], "EXECUTION_STATE_RUNNING");
    assert_eq!(row["pcId"], "pc-grpcurl");
    assert_eq!(row["requestId"], "req-1");
    assert_eq!(row["execId"], "exec-1");
    assert_eq!(row["manifestId"], "inventory");
    assert_eq!(row["version"], "3");
    assert_eq!(row["timeoutSecs"], 60);
    assert_eq!(timestamp(row, "startedAt"), started_at);
    let received_at = timestamp(row, "receivedAt");
    assert!(
        received_at >= before - chrono::Duration::seconds(1)
            && received_at <= after_started + chrono::Duration::seconds(1),
        "receivedAt {received_at} is not ingest's clock at publish time ({before}..{after_started})"
    );
    for absent in ["finishedAt", "exitCode", "status"] {
        assert!(
            row.get(absent).is_none(),
            "a running run has no {absent}: {row:#}"
        );
    }
    let failed = list_in_state(&ingest, "EXECUTION_STATE_FAILED").await;
    assert_eq!(listed(&failed), Vec::<String>::new(), "{failed:#}");

    // The Result: the run is FAILED, with the result's columns and the Started's timeout kept.
    let published = grpcurl(
        &ingest,
        Some(&failed_result_json(&run, started_at, finished_at)),
        &["kanade.v1.Ingest/Publish"],
    )
    .await;
    assert_eq!(published.json(), json!({ "resultId": run }));

    let failed = list_in_state(&ingest, "EXECUTION_STATE_FAILED").await;
    assert_eq!(listed(&failed), [run.as_str()]);
    let row = &failed["executions"][0];
    assert_eq!(row["state"], "EXECUTION_STATE_FAILED");
    assert_eq!(row["status"], "EXEC_STATUS_FAILED");
    assert_eq!(row["exitCode"], 2);
    assert_eq!(row["timeoutSecs"], 60, "the Started's timeout survives");
    assert_eq!(row["stdout"], "disk: 93% used\n");
    assert_eq!(row["stderr"], "warning: disk almost full\n");
    assert_eq!(timestamp(row, "startedAt"), started_at);
    assert_eq!(timestamp(row, "finishedAt"), finished_at);
    assert_eq!(
        timestamp(row, "receivedAt"),
        received_at,
        "receivedAt is set once, when the row is first inserted"
    );
    let running = list_in_state(&ingest, "EXECUTION_STATE_RUNNING").await;
    assert_eq!(listed(&running), [other.as_str()], "{running:#}");

    // GetExecution returns the same row.
    let got = grpcurl(
        &ingest,
        Some(&json!({ "result_id": run })),
        &["kanade.v1.Activity/GetExecution"],
    )
    .await
    .json();
    assert_eq!(&got, row, "GetExecution and ListExecutions disagree");

    // The manifest's summary over the default window (the last 24 hours): uint64 counts come as
    // JSON strings, durations as seconds, zero counts are left out.
    let summary = grpcurl(
        &ingest,
        Some(&json!({ "manifest_id": "inventory" })),
        &["kanade.v1.Activity/SummarizeManifests"],
    )
    .await
    .json();
    let mut manifest = summary["manifests"][0].clone();
    assert_eq!(timestamp(&manifest, "lastFailureAt"), finished_at);
    manifest.as_object_mut().unwrap().remove("lastFailureAt");
    assert_eq!(
        json!({ "manifests": [manifest] }),
        json!({ "manifests": [{
            "manifestId": "inventory",
            "runs": "2",
            "running": "1",
            "failed": "1",
            "p50Duration": "1.500s",
            "p95Duration": "1.500s",
            "lastFailureResultId": run,
        }]}),
        "{summary:#}"
    );
}

#[tokio::test]
async fn get_execution_of_an_unknown_run_is_not_found() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let unknown = Uuid::now_v7().to_string();

    let out = grpcurl(
        &ingest,
        Some(&json!({ "result_id": unknown })),
        &["kanade.v1.Activity/GetExecution"],
    )
    .await;
    let (code, message) = out.status();
    assert_eq!(code, "NotFound", "{}", out.stderr);
    assert!(
        message.contains(&unknown),
        "message names the id: {message}"
    );
    assert_eq!(out.code, Some(64 + 5), "grpcurl exits 64 + NOT_FOUND");
}

#[tokio::test]
async fn invalid_publish_is_invalid_argument_naming_the_field_and_stores_nothing() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;

    let bad = started_json("not-a-uuid", now());
    let out = grpcurl(&ingest, Some(&bad), &["kanade.v1.Ingest/Publish"]).await;
    let (code, message) = out.status();
    assert_eq!(code, "InvalidArgument", "{}", out.stderr);
    assert!(
        message.contains("result_id") && message.contains("not-a-uuid"),
        "message names the field and the value: {message}"
    );
    assert_eq!(
        out.code,
        Some(64 + 3),
        "grpcurl exits 64 + INVALID_ARGUMENT"
    );

    // A missing timestamp is named just as clearly.
    let mut no_start = started_json(&Uuid::now_v7().to_string(), now());
    no_start["started"]
        .as_object_mut()
        .unwrap()
        .remove("started_at");
    let out = grpcurl(&ingest, Some(&no_start), &["kanade.v1.Ingest/Publish"]).await;
    let (code, message) = out.status();
    assert_eq!(code, "InvalidArgument", "{}", out.stderr);
    assert!(message.contains("started_at"), "{message}");

    let all = grpcurl(
        &ingest,
        Some(&json!({})),
        &["kanade.v1.Activity/ListExecutions"],
    )
    .await
    .json();
    assert_eq!(
        listed(&all),
        Vec::<String>::new(),
        "nothing stored: {all:#}"
    );
}

/// grpcurl 1.8 speaks only v1alpha; newer clients use v1, which must answer the same.
#[tokio::test]
async fn reflection_v1_lists_every_service_for_newer_clients() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let channel = tonic::transport::Channel::from_shared(ingest.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "kanade.v1.Ingest",
        "kanade.v1.Activity",
        "kanade.v1.Control",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
}

#[tokio::test]
async fn grpcurl_reads_activity_over_mtls_with_a_reader_token() {
    let ca = kanade_testkit::TestCa::new("kanade test CA");
    let operator = ca.client("ops-reader", false);
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let reader = kanade_ingest::auth::add_token(
        &tokens,
        &kanade_ingest::auth::NewToken::Reader { name: None },
    )
    .unwrap();
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .mtls(&ca)
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;
    let (ca_path, cert, key) = (
        ca.cert_path().display().to_string(),
        operator.cert.display().to_string(),
        operator.key.display().to_string(),
    );
    let mtls = ["-cacert", &ca_path, "-cert", &cert, "-key", &key];

    // Reflection needs no token, only the handshake.
    let out = grpcurl_over(&ingest, &mtls, None, &["list"]).await;
    assert!(
        out.names().contains(&"kanade.v1.Activity"),
        "{}",
        out.text()
    );
    // Activity needs the reader token on top of the certificate.
    let bearer = format!("authorization: Bearer {reader}");
    let mut with_token = mtls.to_vec();
    with_token.extend(["-H", &bearer]);
    let listed = grpcurl_over(
        &ingest,
        &with_token,
        Some(&json!({})),
        &["kanade.v1.Activity/ListExecutions"],
    )
    .await
    .json();
    assert!(listed.is_object(), "{listed}");
    let anonymous = grpcurl_over(
        &ingest,
        &mtls,
        Some(&json!({})),
        &["kanade.v1.Activity/ListExecutions"],
    )
    .await;
    assert_eq!(
        anonymous.status().0,
        "Unauthenticated",
        "{}",
        anonymous.stderr
    );
    // Without a client certificate the handshake fails.
    let no_certificate = grpcurl_over(&ingest, &["-cacert", &ca_path], None, &["list"]).await;
    assert_ne!(no_certificate.code, Some(0), "{}", no_certificate.stderr);
}
