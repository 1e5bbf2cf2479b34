//! `--read-database-url` against a real streaming standby of the test server (SPEC §15, Read
//! replicas): Activity reads there, writes stay on the primary, a lagging replica answers with
//! what it has replayed, and a replica that is down fails reads with UNAVAILABLE while writes go
//! on.

use std::time::Duration;

use kanade_shared::pb;
use kanade_testkit::{NOT_SERVING, Run, SERVING, Standby, TestDb, TestIngest, eventually, health};
use tonic::Code;

async fn get(ingest: &TestIngest, run: &Run) -> Result<pb::Execution, tonic::Status> {
    ingest
        .activity()
        .await
        .get_execution(pb::GetExecutionRequest {
            result_id: run.result_id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn publish_result(ingest: &TestIngest, run: &Run) {
    ingest
        .ingest()
        .await
        .publish(run.result_event(0))
        .await
        .expect("the primary takes writes");
}

#[tokio::test]
async fn activity_reads_the_replica_and_writes_stay_on_the_primary() {
    let db = TestDb::postgres().await;
    // Migrated before the base backup, so the standby starts with the schema.
    let primary = db.store().await;
    let standby = Standby::start().await;
    let replica_url = standby.url(db.postgres_name().expect("a PostgreSQL test database"));
    let ingest = TestIngest::builder(&db.url)
        .args(&["--read-database-url", &replica_url])
        .start()
        .await;
    eventually(Duration::from_secs(10), "Activity SERVING", || async {
        health(ingest.addr, "kanade.v1.Activity").await == SERVING
    })
    .await;

    // Written through ingest (a read-only replica would refuse it), read back from the replica.
    let first = Run::new("pc-replica");
    publish_result(&ingest, &first).await;
    eventually(Duration::from_secs(10), "the run replicated", || async {
        get(&ingest, &first).await.is_ok()
    })
    .await;

    // A lagging replica: the run is committed on the primary, and missing from Activity until
    // the replica replays it.
    standby.pause_replay().await;
    let second = Run::new("pc-replica");
    publish_result(&ingest, &second).await;
    assert!(
        second.stored_in(primary.as_ref()).await.is_some(),
        "acknowledged, so committed on the primary"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&ingest, &second).await.unwrap_err().code(),
        Code::NotFound,
        "Activity reads the replica, which has not replayed the run yet"
    );
    standby.resume_replay().await;
    eventually(Duration::from_secs(10), "the replica caught up", || async {
        get(&ingest, &second).await.is_ok()
    })
    .await;

    // The replica down: reads fail UNAVAILABLE and Activity is NOT_SERVING; writes go on.
    standby.stop();
    let status = get(&ingest, &first).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let listed = ingest
        .activity()
        .await
        .list_executions(pb::ListExecutionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::Unavailable, "{listed:?}");
    eventually(Duration::from_secs(10), "Activity NOT_SERVING", || async {
        health(ingest.addr, "kanade.v1.Activity").await == NOT_SERVING
    })
    .await;
    assert_eq!(health(ingest.addr, "kanade.v1.Ingest").await, SERVING);
    assert_eq!(health(ingest.addr, "").await, SERVING);
    let third = Run::new("pc-replica");
    publish_result(&ingest, &third).await;
    assert!(third.stored_in(primary.as_ref()).await.is_some());

    // Back up: it catches up on what was written meanwhile and Activity serves again.
    standby.start_again().await;
    eventually(
        Duration::from_secs(20),
        "reads back after the replica restarts",
        || async { get(&ingest, &third).await.is_ok() },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "Activity SERVING again",
        || async { health(ingest.addr, "kanade.v1.Activity").await == SERVING },
    )
    .await;
    assert!(
        ingest.log().contains("read replica is unavailable"),
        "{}",
        ingest.log()
    );
}

#[tokio::test]
async fn a_read_replica_needs_postgresql_on_both_sides() {
    let db = TestDb::sqlite();
    let out = std::process::Command::new(kanade_testkit::workspace_binary("kanade-ingest"))
        .args(["--listen", "127.0.0.1:0", "--database-url", &db.url])
        .args(["--read-database-url", "postgres://postgres@127.0.0.1:1/x"])
        .output()
        .expect("running kanade-ingest");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--read-database-url needs a PostgreSQL --database-url"),
        "{err}"
    );
}
