//! Activity/ListExecutions and Activity/GetExecution over real gRPC.

use kanade_shared::{
    limits, pb,
    wire::{EventBody, ExecStatus},
};
use tonic::Code;

use kanade_testkit::{Run, TestDb, TestIngest, now};

#[tokio::test]
async fn list_pages_newest_first_and_caps_page_size() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let base = now() - chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for i in 0..7 {
        let run = Run::at("pc-a", base + chrono::Duration::seconds(i));
        ingest.publish(EventBody::Started(run.started())).await;
        ids.push(run.result_id);
    }
    ids.reverse();
    let mut activity = ingest.activity().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = activity
            .list_executions(pb::ListExecutionsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.executions.len() <= 3);
        seen.extend(page.executions.into_iter().map(|e| e.result_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);

    let all = activity
        .list_executions(pb::ListExecutionsRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.executions.len(), 7);
    assert!(all.next_page_token.is_empty());
}

#[tokio::test]
async fn list_cuts_outputs_to_4_kib_and_get_returns_them_whole() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let run = Run::new("pc-a");
    let mut result = run.result(ExecStatus::Failed, Some(3));
    result.stdout = "é".repeat(5000);
    result.stderr = "short".into();
    ingest.publish(EventBody::Result(result.clone())).await;

    let mut activity = ingest.activity().await;
    let listed = activity
        .list_executions(pb::ListExecutionsRequest {
            states: vec![pb::ExecutionState::Failed as i32],
            pc_id: "pc-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .executions;
    assert_eq!(listed.len(), 1);
    let e = &listed[0];
    assert!(e.stdout_truncated && !e.stderr_truncated);
    assert_eq!(e.stdout.len(), limits::LIST_OUTPUT_BYTES);
    assert_eq!(e.stderr, "short");
    assert_eq!(e.exit_code, Some(3));
    assert_eq!(e.state, pb::ExecutionState::Failed as i32);
    assert_eq!(e.status, pb::ExecStatus::Failed as i32);

    let whole = activity
        .get_execution(pb::GetExecutionRequest {
            result_id: run.result_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.stdout, result.stdout);
    assert!(!whole.stdout_truncated);
    assert!(whole.received_at.is_some() && whole.finished_at.is_some());
}

#[tokio::test]
async fn activity_refuses_bad_requests_clearly() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let mut activity = ingest.activity().await;
    let unknown = activity
        .get_execution(pb::GetExecutionRequest {
            result_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let not_uuid = activity
        .get_execution(pb::GetExecutionRequest {
            result_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_uuid.code(), Code::InvalidArgument);
    for request in [
        pb::ListExecutionsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        pb::ListExecutionsRequest {
            states: vec![pb::ExecutionState::Unspecified as i32],
            ..Default::default()
        },
        pb::ListExecutionsRequest {
            states: vec![99],
            ..Default::default()
        },
    ] {
        let err = activity.list_executions(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}
