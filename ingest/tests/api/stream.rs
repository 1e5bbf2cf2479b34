//! Ingest/Stream and Ingest/Publish over real gRPC against the real binary.

use std::time::Duration;

use kanade_ingest::store::{ListQuery, RunState};
use kanade_shared::{pb, wire::ExecStatus};
use tonic::Code;

use kanade_shared::pb::ingest_client::IngestClient;

use kanade_testkit::{AgentStream, Run, TestDb, TestIngest, event_msg, eventually, hello, now};

async fn rows(db: &TestDb) -> Vec<kanade_ingest::store::ExecutionRow> {
    db.store()
        .await
        .list(&ListQuery::all(now(), chrono::Duration::minutes(5), 500))
        .await
        .unwrap()
}

#[tokio::test]
async fn every_valid_event_is_acked_after_commit() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    let runs: Vec<Run> = (0..50).map(|_| Run::new("pc-a")).collect();
    for (i, run) in runs.iter().enumerate() {
        stream.send(run.started_event(2 * i as u64 + 1)).await;
        stream.send(run.result_event(2 * i as u64 + 2)).await;
    }
    let (acked, rejected) = stream.answers(100).await;
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(acked, (1..=100).collect::<Vec<u64>>());
    let rows = rows(&db).await;
    assert_eq!(rows.len(), 50);
    assert!(
        rows.iter()
            .all(|r| r.state == RunState::Finished(ExecStatus::Succeeded))
    );
}

#[tokio::test]
async fn invalid_events_are_rejected_with_reasons_and_the_stream_carries_on() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-a").await;

    let mut bad_id = Run::new("pc-a").started_event(1);
    if let Some(pb::event::Body::Started(s)) = &mut bad_id.body {
        s.result_id = "run-17".into();
    }
    stream.send(bad_id).await;
    let mut no_body = Run::new("pc-a").started_event(2);
    no_body.body = None;
    stream.send(no_body).await;
    stream.send(Run::new("pc-b").started_event(3)).await;
    let good = Run::new("pc-a");
    stream.send(good.started_event(4)).await;

    let (acked, mut rejected) = stream.answers(4).await;
    rejected.sort();
    assert_eq!(acked, [4]);
    assert_eq!(rejected.len(), 3);
    assert_eq!(rejected[0].0, 1);
    assert!(
        rejected[0].1.contains("result_id must be a UUID"),
        "{}",
        rejected[0].1
    );
    assert_eq!(rejected[1].0, 2);
    assert!(
        rejected[1].1.contains("body is missing"),
        "{}",
        rejected[1].1
    );
    assert_eq!(rejected[2].0, 3);
    assert!(
        rejected[2].1.contains("does not match this stream's pc_id"),
        "{}",
        rejected[2].1
    );
    assert_eq!(rows(&db).await.len(), 1);
}

#[tokio::test]
async fn redelivered_events_are_acked_again_without_duplicate_rows() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let runs: Vec<Run> = (0..10).map(|_| Run::new("pc-a")).collect();
    for _ in 0..3 {
        // Each delivery on a fresh stream, as after a reconnect.
        let mut stream = AgentStream::open(&mut client, "pc-a").await;
        for (i, run) in runs.iter().enumerate() {
            stream.send(run.result_event(2 * i as u64 + 1)).await;
            stream.send(run.started_event(2 * i as u64 + 2)).await;
        }
        let (acked, rejected) = stream.answers(20).await;
        assert_eq!(acked.len(), 20);
        assert!(rejected.is_empty());
    }
    let rows = rows(&db).await;
    assert_eq!(rows.len(), 10);
    assert!(
        rows.iter()
            .all(|r| r.timeout_secs == Some(60) && r.outcome.is_some())
    );
}

/// Each run's row version: the transaction that wrote it (`xmin`) and the one that last
/// updated, deleted or locked it (`xmax`, 0 when none did), in the order of `runs`.
async fn row_versions(db: &TestDb, runs: &[&Run]) -> Vec<(String, String)> {
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut versions = Vec::new();
    for run in runs {
        versions.push(
            sqlx::query_as(
                "SELECT xmin::text, xmax::text FROM execution_results WHERE result_id = $1::uuid",
            )
            .bind(&run.result_id)
            .fetch_one(&pool)
            .await
            .unwrap(),
        );
    }
    pool.close().await;
    versions
}

/// SPEC §15, Duplicates: a redelivered event that changes nothing writes nothing — no new row
/// version, no row lock — and is still acked; an event that does change its row still writes
/// it, and an endpoint resending another's run is still refused.
#[tokio::test]
async fn a_resend_that_changes_nothing_writes_no_row_version_and_is_acked() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let (running, finished) = (Run::new("pc-a"), Run::new("pc-a"));
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    stream.send(running.started_event(1)).await;
    stream.send(finished.started_event(2)).await;
    stream.send(finished.result_event(3)).await;
    assert_eq!(stream.answers(3).await, (vec![1, 2, 3], vec![]));
    let before = row_versions(&db, &[&running, &finished]).await;

    // Everything again on a fresh stream, as after a lost ack, in another order; and a late
    // Started of the finished run on its own.
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    stream.send(finished.result_event(1)).await;
    stream.send(running.started_event(2)).await;
    assert_eq!(stream.answers(2).await, (vec![1, 2], vec![]));
    stream.send(finished.started_event(3)).await;
    assert_eq!(stream.answers(1).await, (vec![3], vec![]));
    assert_eq!(
        row_versions(&db, &[&running, &finished]).await,
        before,
        "a resend that changes nothing wrote or locked its row"
    );

    // The running run's result does change its row.
    stream.send(running.result_event(4)).await;
    assert_eq!(stream.answers(1).await, (vec![4], vec![]));
    let after = row_versions(&db, &[&running, &finished]).await;
    assert_ne!(after[0], before[0], "a result must write its run's row");
    assert_eq!(after[1], before[1]);

    // Another endpoint's resend of a run it does not own is refused, not taken for a no-op.
    let mut other = AgentStream::open(&mut client, "pc-b").await;
    let stolen = Run {
        pc_id: "pc-b".into(),
        ..finished.clone()
    };
    other.send(stolen.result_event(1)).await;
    let (acked, rejected) = other.answers(1).await;
    assert!(acked.is_empty(), "{rejected:?}");
    assert!(rejected[0].1.contains("another pc_id"), "{}", rejected[0].1);
    assert_eq!(row_versions(&db, &[&finished]).await[0], before[1]);
}

#[tokio::test]
async fn a_stream_must_start_with_hello() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--hello-timeout", "300ms"])
        .start()
        .await;
    let mut client = ingest.ingest().await;

    let first_event = AgentStream::open_with(
        &mut client,
        Some(event_msg(Run::new("pc-a").started_event(1))),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(first_event.code(), Code::InvalidArgument);
    assert!(first_event.message().contains("must be Hello"));

    let silent = AgentStream::open_with(&mut client, None)
        .await
        .err()
        .expect("refused");
    assert_eq!(silent.code(), Code::DeadlineExceeded);

    let empty_pc = AgentStream::open_with(&mut client, Some(hello("")))
        .await
        .err()
        .expect("refused");
    assert_eq!(empty_pc.code(), Code::InvalidArgument);

    // A second Hello on an open stream ends it.
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    stream.tx.send(hello("pc-a")).await.unwrap();
    let err = stream.try_next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn two_streams_of_one_pc_work_concurrently_and_acks_go_to_their_sender() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let mut one = AgentStream::open(&mut client, "pc-a").await;
    let mut two = AgentStream::open(&mut client, "pc-a").await;
    let runs: Vec<Run> = (0..20).map(|_| Run::new("pc-a")).collect();
    for (i, run) in runs.iter().enumerate() {
        let seq = i as u64 + 1;
        if i % 2 == 0 {
            one.send(run.started_event(seq)).await;
        } else {
            two.send(run.started_event(seq)).await;
        }
    }
    let (a, _) = one.answers(10).await;
    let (b, _) = two.answers(10).await;
    assert_eq!(a, (1..=20).step_by(2).collect::<Vec<u64>>());
    assert_eq!(b, (2..=20).step_by(2).collect::<Vec<u64>>());
    assert_eq!(rows(&db).await.len(), 20);
}

#[tokio::test]
async fn stream_limits_answer_resource_exhausted() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--max-streams", "3", "--max-streams-per-pc", "2"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let _a1 = AgentStream::open(&mut client, "pc-a").await;
    let _a2 = AgentStream::open(&mut client, "pc-a").await;
    let third = AgentStream::open_with(&mut client, Some(hello("pc-a")))
        .await
        .err()
        .expect("refused");
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("--max-streams-per-pc"));

    let b = AgentStream::open(&mut client, "pc-b").await;
    let over = AgentStream::open_with(&mut client, Some(hello("pc-c")))
        .await
        .err()
        .expect("refused");
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(over.message().contains("--max-streams"));

    // A closed stream frees its place.
    drop(b);
    kanade_testkit::eventually(Duration::from_secs(5), "a freed stream slot", || {
        let mut client = client.clone();
        async move {
            AgentStream::open_with(&mut client, Some(hello("pc-c")))
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test]
async fn the_window_bounds_unacked_events_held_for_a_stream() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--max-unacked", "4", "--batch-linger", "400ms"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open_with(&mut client, Some(hello("pc-a")))
        .await
        .unwrap();
    match stream.next().await {
        Some(pb::ingest_message::Msg::Welcome(w)) => assert_eq!(w.max_unacked, 4),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // A client that ignores the window is slowed, never failed.
    for i in 0..12u64 {
        stream.send(Run::new("pc-a").started_event(i + 1)).await;
    }
    let mut acked = Vec::new();
    while acked.len() < 12 {
        match stream.next().await {
            Some(pb::ingest_message::Msg::Ack(a)) => {
                assert!(
                    a.seqs.len() <= 4,
                    "one batch held {} events of a 4-event window",
                    a.seqs.len()
                );
                acked.extend(a.seqs);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=12).collect::<Vec<u64>>());
}

#[tokio::test]
async fn oversized_events_get_a_clear_error_and_nothing_accepted_is_lost() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--max-event-bytes", "2000"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    let first = Run::new("pc-a");
    stream.send(first.started_event(1)).await;
    let big = Run::new("pc-a");
    let mut e = big.result_event(2);
    if let Some(pb::event::Body::Result(r)) = &mut e.body {
        r.stdout = "x".repeat(5000);
    }
    stream.send(e).await;
    stream.send(big.started_event(3)).await;
    let (acked, rejected) = stream.answers(3).await;
    assert_eq!(acked, [1, 3]);
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0]
            .1
            .contains("larger than this ingest's limit of 2000 bytes"),
        "{}",
        rejected[0].1
    );

    // Over the transport limit the stream fails; the server keeps serving.
    let mut huge = Run::new("pc-a").result_event(4);
    if let Some(pb::event::Body::Result(r)) = &mut huge.body {
        r.stdout = "y".repeat(kanade_shared::limits::MAX_DECODING_MESSAGE_BYTES + 1);
    }
    stream.send(huge).await;
    let err = loop {
        match stream.try_next().await {
            Err(status) => break status,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended cleanly"),
        }
    };
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );
    let mut again = AgentStream::open(&mut client, "pc-a").await;
    again.send(Run::new("pc-a").started_event(1)).await;
    assert_eq!(again.answers(1).await.0, [1]);
    assert_eq!(rows(&db).await.len(), 3);
}

#[tokio::test]
async fn streams_past_their_maximum_age_end_cleanly_after_their_acks() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--max-stream-age", "1s"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-a").await;
    stream.send(Run::new("pc-a").started_event(1)).await;
    assert_eq!(stream.answers(1).await.0, [1]);
    let started = std::time::Instant::now();
    assert!(
        stream
            .try_next()
            .await
            .expect("ends without error")
            .is_none()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn publish_commits_before_answering_and_refuses_bad_input() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let mut client = ingest.ingest().await;
    let run = Run::new("pc-a");
    let answer = client
        .publish(run.started_event(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.result_id, run.result_id);
    let row = db
        .store()
        .await
        .get(
            run.result_id.parse().unwrap(),
            now(),
            chrono::Duration::minutes(5),
        )
        .await
        .unwrap()
        .expect("committed before the answer");
    assert_eq!(row.state, RunState::Running);

    let mut bad = run.result_event(0);
    if let Some(pb::event::Body::Result(r)) = &mut bad.body {
        r.status = 0;
    }
    let err = client.publish(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("status must be set"),
        "{}",
        err.message()
    );

    let intruder = Run {
        pc_id: "pc-b".into(),
        ..run.clone()
    };
    let err = client.publish(intruder.result_event(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("another pc_id"));
    assert_eq!(rows(&db).await[0].state, RunState::Running);
}

#[tokio::test]
async fn one_batch_commits_events_of_many_streams_and_acks_each_its_own() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::builder(&db.url)
        .args(&["--batch-linger", "500ms"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    let mut streams = Vec::new();
    for pc in ["pc-a", "pc-b", "pc-c"] {
        streams.push((pc, AgentStream::open(&mut client, pc).await));
    }
    for (pc, stream) in &streams {
        for seq in 1..=5 {
            stream.send(Run::new(pc).started_event(seq)).await;
        }
    }
    // All fifteen events were in one batch: each stream gets ONE Ack with its own five seqs.
    for (_, stream) in &mut streams {
        match stream.next().await {
            Some(pb::ingest_message::Msg::Ack(a)) => {
                let mut seqs = a.seqs;
                seqs.sort_unstable();
                assert_eq!(seqs, [1, 2, 3, 4, 5]);
            }
            other => panic!("expected one Ack, got {other:?}"),
        }
    }
    assert_eq!(rows(&db).await.len(), 15);
}

#[tokio::test]
async fn retention_deletes_old_runs_in_the_background() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--retention", "1s", "--retention-every", "200ms"])
        .start()
        .await;
    let mut client = ingest.ingest().await;
    client
        .publish(Run::new("pc-a").started_event(0))
        .await
        .unwrap();
    assert_eq!(rows(&db).await.len(), 1);
    kanade_testkit::eventually(Duration::from_secs(10), "the old run deleted", || async {
        rows(&db).await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn migrate_command_prepares_a_database_and_replicas_can_migrate_together() {
    let db = TestDb::postgres().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kanade-ingest"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("migrations applied"));

    // Several replicas starting together on a fresh database all come up.
    let fresh = TestDb::postgres().await;
    let (a, b, c) = tokio::join!(
        TestIngest::start(&fresh.url),
        TestIngest::start(&fresh.url),
        TestIngest::start(&fresh.url)
    );
    for ingest in [&a, &b, &c] {
        ingest
            .ingest()
            .await
            .publish(Run::new("pc-a").started_event(0))
            .await
            .unwrap();
    }
    assert_eq!(rows(&fresh).await.len(), 3);

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kanade-ingest"))
        .args(["migrate", "--database-url", "mysql://localhost/x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unsupported database URL"));
}

#[tokio::test]
async fn plaintext_without_authentication_on_a_non_loopback_address_is_refused() {
    let db = TestDb::sqlite();
    let refused = std::process::Command::new(kanade_testkit::workspace_binary("kanade-ingest"))
        .args(["--listen", "0.0.0.0:0", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext")
            && stderr.contains("--allow-insecure")
            && stderr.contains("--tls-cert"),
        "{stderr}"
    );
    // What is allowed with --allow-insecure, tokens or TLS (and the warnings logged) is checked
    // in the config module's tests: tests never bind beyond loopback.
}

#[tokio::test]
async fn a_client_that_never_reads_its_acks_is_ended_within_its_slot_and_loses_nothing() {
    let db = TestDb::postgres().await;
    // One event per Ack message, so the queue of acks towards the client fills quickly.
    let ingest = TestIngest::builder(&db.url)
        .args(&[
            "--max-streams-per-pc",
            "1",
            "--max-unacked",
            "1",
            "--batch-linger",
            "1ms",
        ])
        .start()
        .await;
    // A tiny receive window: a client that does not read blocks ingest's sends at once.
    let channel = tonic::transport::Endpoint::from_shared(ingest.url())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut stubborn = IngestClient::new(channel);
    let mut stream = AgentStream::open(&mut stubborn, "pc-a").await;
    let events: Vec<pb::Event> = (1..=1000u64)
        .map(|seq| Run::new("pc-a").started_event(seq))
        .collect();
    let sender = {
        let tx = stream.tx.clone();
        let events = events.clone();
        tokio::spawn(async move {
            for e in events {
                if tx.send(kanade_testkit::event_msg(e)).await.is_err() {
                    return;
                }
            }
        })
    };
    eventually(
        Duration::from_secs(30),
        "ingest gives up on the stream",
        || async { ingest.log().contains("not reading its acks") },
    )
    .await;
    sender.abort();

    // Until the client lets go of it, the stream keeps its slot: memory stays bounded by
    // --max-streams-per-pc. Other endpoints are served meanwhile.
    let mut client = ingest.ingest().await;
    let second = AgentStream::open_with(&mut client, Some(hello("pc-a")))
        .await
        .err()
        .expect("the stubborn stream still holds pc-a's only slot");
    assert_eq!(second.code(), Code::ResourceExhausted);
    let mut other = AgentStream::open(&mut client, "pc-b").await;
    other.send(Run::new("pc-b").started_event(1)).await;
    assert_eq!(other.answers(1).await.0, [1]);

    // Reading now: the acks ingest had queued, then UNAVAILABLE.
    let mut acked = std::collections::HashSet::new();
    let ending = loop {
        match stream.try_next().await {
            Ok(Some(pb::ingest_message::Msg::Ack(a))) => acked.extend(a.seqs),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ending.code(), Code::Unavailable, "{ending}");
    assert!(ending.message().contains("acks were not read"), "{ending}");
    drop(stream);

    // Like an agent, reconnect and resend everything unacknowledged: all of it is stored once.
    let mut retry = None;
    for _ in 0..50 {
        if let Ok(s) = AgentStream::open_with(&mut client, Some(hello("pc-a"))).await {
            retry = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut retry = retry.expect("the slot is freed once the client lets go");
    assert!(matches!(
        retry.next().await,
        Some(pb::ingest_message::Msg::Welcome(_))
    ));
    let unacked: Vec<pb::Event> = events
        .into_iter()
        .filter(|e| !acked.contains(&e.seq))
        .collect();
    let resend = unacked.len();
    assert!(resend > 0, "the stubborn client had unacknowledged events");
    for e in unacked {
        retry.send(e).await;
    }
    let (acked_again, rejected) = retry.answers(resend).await;
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(acked_again.len(), resend);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (rows, runs): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT result_id) FROM execution_results")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (rows, runs),
        (1001, 1001),
        "every pc-a run once, and pc-b's"
    );
}

#[tokio::test]
async fn a_second_ingest_on_the_same_sqlite_file_is_refused_saying_why() {
    let db = TestDb::sqlite();
    let first = TestIngest::start(&db.url).await;
    let second = tokio::process::Command::new(kanade_testkit::workspace_binary("kanade-ingest"))
        .args(["--listen", "127.0.0.1:0", "--database-url", &db.url])
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .expect("a second ingest went on serving the same SQLite file")
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another kanade-ingest already serves")
            && stderr.contains("ingest.db")
            && stderr.contains("PostgreSQL"),
        "{stderr}"
    );
    // The first one serves on, and `migrate` (not a server) still works on the file.
    first
        .ingest()
        .await
        .publish(Run::new("pc-a").started_event(0))
        .await
        .unwrap();
    let migrate = std::process::Command::new(kanade_testkit::workspace_binary("kanade-ingest"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(migrate.status.success(), "{migrate:?}");
}
