//! Fault injection against the real binary (SPEC §3 "Acks and failures", §5 graceful shutdown):
//! the database connection cut under a live stream and a pending Publish, SIGTERM with batches in
//! flight, and SIGKILL. What must hold throughout: nothing is acked before it is committed,
//! everything acked survives, and redelivery never duplicates a run.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use kanade_shared::{pb, wire::ExecStatus};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_client::HealthClient};
use uuid::Uuid;

use kanade_testkit::{
    AgentStream, FaultProxy, NOT_SERVING, Run, SERVING, TestDb, TestIngest, eventually, health,
};

const PC: &str = "pc-faults";
/// The readiness services that must follow the store (SPEC §5).
const READINESS: [&str; 2] = ["", "kanade.v1.Ingest"];
/// How long a healthy ingest takes at most to notice a change, with the harness's timings.
const NOTICE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Started,
    Result,
}

/// One event an agent has in its outbox: its seq, which run, which lifecycle event.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    run: usize,
    kind: Kind,
}

impl Sent {
    fn event(&self, runs: &[Run]) -> pb::Event {
        match self.kind {
            Kind::Started => runs[self.run].started_event(self.seq),
            Kind::Result => runs[self.run].result_event(self.seq),
        }
    }
}

/// Started then Result for each of `runs[range]`, numbered from `first_seq`.
fn lifecycles(range: std::ops::Range<usize>, first_seq: u64) -> Vec<Sent> {
    range
        .flat_map(|run| [(run, Kind::Started), (run, Kind::Result)])
        .zip(first_seq..)
        .map(|((run, kind), seq)| Sent { seq, run, kind })
        .collect()
}

fn seqs(sent: &[Sent]) -> Vec<u64> {
    sent.iter().map(|s| s.seq).collect()
}

async fn send_all(stream: &AgentStream, runs: &[Run], sent: &[Sent]) {
    for s in sent {
        stream.send(s.event(runs)).await;
    }
}

/// Every row of `execution_results`, read straight from PostgreSQL (not through any proxy):
/// `result_id` → `status` (None while running).
async fn rows(db: &TestDb) -> BTreeMap<Uuid, Option<String>> {
    db.stored_runs()
        .await
        .into_iter()
        .map(|(id, row)| (id, row.status))
        .collect()
}

fn id(run: &Run) -> Uuid {
    Uuid::parse_str(&run.result_id).expect("test runs have UUID result_ids")
}

/// Asserts that the table holds exactly one finished (succeeded) row per run and nothing else.
async fn assert_exactly_once_and_finished(db: &TestDb, runs: &[Run]) {
    let stored = rows(db).await;
    let expected: BTreeMap<Uuid, Option<String>> = runs
        .iter()
        .map(|r| (id(r), Some(ExecStatus::Succeeded.as_str().to_string())))
        .collect();
    assert_eq!(stored, expected, "expected one finished row per run");
}

/// The `host:port` a database URL points at (PostgreSQL's default port when none is given).
async fn database_addr(url: &str) -> SocketAddr {
    let (_, rest) = url.split_once("://").expect("a database URL");
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(&host)
        .await
        .expect("resolving the database host")
        .next()
        .expect("the database host has an address")
}

/// `url` with its host and port replaced by `addr`: the same database, reached through `addr`.
fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a database URL");
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let userinfo = authority
        .rsplit_once('@')
        .map_or(String::new(), |(u, _)| format!("{u}@"));
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// A fresh PostgreSQL database, a proxy in front of it, and ingest connected through the proxy.
async fn ingest_behind_proxy(args: &[&str]) -> (TestDb, FaultProxy, TestIngest) {
    let db = TestDb::postgres().await;
    let proxy = FaultProxy::start(database_addr(&db.url).await).await;
    let ingest = TestIngest::builder(&via(&db.url, proxy.addr))
        .args(args)
        .start()
        .await;
    (db, proxy, ingest)
}

async fn readiness_is(addr: SocketAddr, status: i32) -> bool {
    for service in READINESS {
        if health(addr, service).await != status {
            return false;
        }
    }
    true
}

/// Reads a health Watch until it reports NOT_SERVING; false if it ends or stays silent first.
async fn watch_reports_not_serving(
    mut watch: tonic::Streaming<HealthCheckResponse>,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, watch.message()).await {
            Ok(Ok(Some(r))) if r.status == NOT_SERVING => return true,
            Ok(Ok(Some(_))) => continue,
            _ => return false,
        }
    }
}

#[tokio::test]
async fn database_cut_mid_stream_acks_nothing_then_commits_everything_exactly_once() {
    let (db, proxy, ingest) = ingest_behind_proxy(&[]).await;
    let runs: Vec<Run> = (0..20).map(|_| Run::new(PC)).collect();
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;

    let before = lifecycles(0..5, 1);
    send_all(&stream, &runs, &before).await;
    let (acked, rejected) = stream.answers(before.len()).await;
    assert_eq!((acked, rejected), (seqs(&before), vec![]));
    assert!(readiness_is(ingest.addr, SERVING).await);

    proxy.cut();
    let after = lifecycles(5..20, before.len() as u64 + 1);
    send_all(&stream, &runs, &after).await;
    let silence = tokio::time::timeout(Duration::from_millis(1500), stream.rx.message()).await;
    assert!(
        silence.is_err(),
        "ingest answered while its database was unreachable: {silence:?}"
    );
    eventually(
        NOTICE,
        "readiness NOT_SERVING while the database is cut",
        || readiness_is(ingest.addr, NOT_SERVING),
    )
    .await;

    proxy.heal();
    let healed = Instant::now();
    // The same stream carries on: every event sent during the outage is acked once committed.
    let (acked, rejected) = stream.answers(after.len()).await;
    assert_eq!((acked, rejected), (seqs(&after), vec![]));
    println!("acks resumed {:?} after heal", healed.elapsed());
    eventually(
        NOTICE,
        "readiness SERVING after the database is back",
        || readiness_is(ingest.addr, SERVING),
    )
    .await;
    assert_exactly_once_and_finished(&db, &runs).await;
}

#[tokio::test]
async fn while_the_database_is_cut_the_queue_depth_gauge_counts_the_events_waiting() {
    let metrics = kanade_testkit::free_addr();
    let metrics_arg = metrics.to_string();
    // One batch of one run (at most its two events) commits at a time, so all but two of the
    // events wait while it retries.
    let (db, proxy, ingest) = ingest_behind_proxy(&[
        "--metrics-listen",
        &metrics_arg,
        "--batch-max-rows",
        "1",
        "--commits-in-flight",
        "1",
    ])
    .await;
    let runs: Vec<Run> = (0..5).map(|_| Run::new(PC)).collect();
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;

    proxy.cut();
    let sent = lifecycles(0..5, 1);
    send_all(&stream, &runs, &sent).await;
    let waiting = (sent.len() - 2) as f64;
    eventually(
        NOTICE,
        "the gauge counting the events that wait",
        || async {
            crate::telemetry::sample(
                &crate::telemetry::scrape(metrics).await,
                "kanade_ingest_queue_depth",
            ) >= waiting
        },
    )
    .await;

    proxy.heal();
    let (acked, rejected) = stream.answers(sent.len()).await;
    assert_eq!((acked, rejected), (seqs(&sent), vec![]));
    assert_eq!(
        crate::telemetry::sample(
            &crate::telemetry::scrape(metrics).await,
            "kanade_ingest_queue_depth"
        ),
        0.0,
        "nothing waits once everything is answered"
    );
    assert_exactly_once_and_finished(&db, &runs).await;
}

#[tokio::test]
async fn publish_while_database_is_down_times_out_with_unavailable() {
    let (db, proxy, ingest) = ingest_behind_proxy(&["--publish-timeout", "1s"]).await;
    let mut client = ingest.ingest().await;
    let run = Run::new(PC);

    proxy.cut();
    let asked = Instant::now();
    let status = client
        .publish(run.result_event(0))
        .await
        .expect_err("Publish cannot succeed while the database is cut");
    let waited = asked.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(5),
        "Publish should wait for its 1 s deadline, then give up; it answered after {waited:?}"
    );

    proxy.heal();
    eventually(
        NOTICE,
        "readiness SERVING after the database is back",
        || readiness_is(ingest.addr, SERVING),
    )
    .await;
    let answer = client
        .publish(run.result_event(0))
        .await
        .expect("the retried Publish commits once the database is back")
        .into_inner();
    assert_eq!(answer.result_id, run.result_id);
    // The timed-out attempt may have committed too, after its caller gave up: still one row.
    assert_exactly_once_and_finished(&db, std::slice::from_ref(&run)).await;
}

#[tokio::test]
async fn sigterm_flushes_in_flight_batches_acks_them_and_ends_streams_with_unavailable() {
    let db = TestDb::postgres().await;
    // A long linger keeps the events in an open batch when SIGTERM arrives.
    let mut ingest = TestIngest::builder(&db.url)
        .args(&["--batch-linger", "2s", "--shutdown-timeout", "15s"])
        .start()
        .await;
    let runs: Vec<Run> = (0..10).map(|_| Run::new(PC)).collect();
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;

    let channel = Channel::from_shared(ingest.url())
        .unwrap()
        .connect()
        .await
        .expect("connecting for health");
    let mut watches = Vec::new();
    for service in READINESS {
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("watching health")
            .into_inner();
        let first = watch
            .message()
            .await
            .expect("health watch")
            .expect("a status");
        assert_eq!(first.status, SERVING, "service {service:?} before SIGTERM");
        watches.push(watch);
    }

    let sent = lifecycles(0..10, 1);
    send_all(&stream, &runs, &sent).await;
    // Let ingest read the events into its lingering batch; none may be committed yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rows(&db).await.is_empty(),
        "the batch committed before SIGTERM; the linger did not hold it open"
    );

    let terminated = Instant::now();
    let drained_health = async {
        let mut all = true;
        for watch in watches {
            all &= watch_reports_not_serving(watch, Duration::from_secs(5)).await;
        }
        all
    };
    let stream_outcome = async {
        let answers = stream.answers(sent.len()).await;
        let end = stream.try_next().await;
        (answers, end)
    };
    let (exited_ok, not_serving, ((acked, rejected), end)) =
        tokio::join!(ingest.terminate(), drained_health, stream_outcome);
    let took = terminated.elapsed();

    assert!(
        not_serving,
        "health did not turn NOT_SERVING while draining"
    );
    assert_eq!((acked, rejected), (seqs(&sent), vec![]));
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("expected the stream to end with UNAVAILABLE, got {other:?}"),
    }
    assert!(exited_ok, "ingest exited with failure:\n{}", ingest.log());
    assert!(
        took < Duration::from_secs(10) && !ingest.log().contains("shutdown timeout reached"),
        "the drain should end by itself, not at --shutdown-timeout (took {took:?}):\n{}",
        ingest.log()
    );
    println!("SIGTERM to exit: {took:?}");
    assert_exactly_once_and_finished(&db, &runs).await;
}

#[tokio::test]
async fn sigkill_of_ingest_loses_nothing_acked() {
    let (db, proxy, mut first) = ingest_behind_proxy(&[]).await;
    let runs: Vec<Run> = (0..12).map(|_| Run::new(PC)).collect();
    let mut client = first.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;

    // Phase one, committed and acked: every run started, the first four finished.
    let phase_one: Vec<Sent> = (0..8)
        .map(|run| (run, Kind::Started))
        .chain((0..4).map(|run| (run, Kind::Result)))
        .zip(1..)
        .map(|((run, kind), seq)| Sent { seq, run, kind })
        .collect();
    // Phase two, stuck in a batch that cannot commit when ingest dies: the results of runs
    // 4..8 and whole runs 8..12.
    let phase_two: Vec<Sent> = (4..8)
        .map(|run| (run, Kind::Result))
        .chain((8..12).flat_map(|run| [(run, Kind::Started), (run, Kind::Result)]))
        .zip(phase_one.len() as u64 + 1..)
        .map(|((run, kind), seq)| Sent { seq, run, kind })
        .collect();
    let all: Vec<Sent> = phase_one.iter().chain(&phase_two).copied().collect();

    send_all(&stream, &runs, &phase_one).await;
    let (mut acked, rejected) = stream.answers(phase_one.len()).await;
    assert_eq!((acked.clone(), rejected), (seqs(&phase_one), vec![]));

    proxy.cut();
    send_all(&stream, &runs, &phase_two).await;
    // Give ingest time to try (and fail) to commit phase two, and to ack it if it wrongly would.
    let until = tokio::time::Instant::now() + Duration::from_millis(700);
    while let Ok(message) = tokio::time::timeout_at(until, stream.rx.message()).await {
        match message.expect("the stream stays open while the database is down") {
            Some(pb::IngestMessage {
                msg: Some(pb::ingest_message::Msg::Ack(a)),
            }) => acked.extend(a.seqs),
            other => panic!("unexpected {other:?}"),
        }
    }
    first.sigkill();
    // Anything acked just before the kill counts too.
    while let Ok(Some(message)) = stream.try_next().await {
        match message {
            pb::ingest_message::Msg::Ack(a) => acked.extend(a.seqs),
            other => panic!("unexpected {other:?}"),
        }
    }

    // Read straight from PostgreSQL: every acked event must be there.
    let stored = rows(&db).await;
    let finished = Some(ExecStatus::Succeeded.as_str().to_string());
    for s in all.iter().filter(|s| acked.contains(&s.seq)) {
        let row = stored.get(&id(&runs[s.run]));
        match s.kind {
            Kind::Started => assert!(row.is_some(), "acked {s:?} has no row after SIGKILL"),
            Kind::Result => assert_eq!(
                row,
                Some(&finished),
                "acked {s:?} is not finished after SIGKILL"
            ),
        }
    }

    // Another ingest on the same database; the agent resends everything, acked events included
    // (as after a lost ack), and every event is acked again without duplicating a run.
    let second = TestIngest::start(&db.url).await;
    let mut client = second.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;
    send_all(&stream, &runs, &all).await;
    let (acked, rejected) = stream.answers(all.len()).await;
    assert_eq!((acked, rejected), (seqs(&all), vec![]));
    assert_exactly_once_and_finished(&db, &runs).await;
}

/// A database connection that goes silent (no FIN, no RST) while a batch waits for its commit
/// must not hold that batch forever: the attempt times out, the batch is retried on a fresh
/// connection, and its events are acked once.
#[tokio::test]
async fn a_connection_that_goes_silent_mid_commit_is_abandoned_and_the_batch_retried() {
    let (db, proxy, ingest) = ingest_behind_proxy(&["--commit-timeout", "1s"]).await;
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, PC).await;
    let first = Run::new(PC);
    stream.send(first.started_event(1)).await;
    assert_eq!(stream.answers(1).await.0, [1]);

    // Hold the table so the next upsert waits inside its transaction on the proxied connection.
    use sqlx::Connection;
    let mut locker = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE execution_results IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let second = Run::new(PC);
    stream.send(second.started_event(2)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.blackhole();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.heal();

    let healed = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(15), stream.answers(1)).await;
    let Ok((acked, _)) = answered else {
        panic!(
            "no answer 15 s after the heal; ingest log:\n{}",
            ingest.log()
        );
    };
    assert_eq!(acked, [2]);
    assert!(
        healed.elapsed() < Duration::from_secs(8),
        "took {:?}",
        healed.elapsed()
    );
    let row = db
        .store()
        .await
        .get(
            second.result_id.parse().unwrap(),
            kanade_testkit::now(),
            chrono::Duration::minutes(5),
        )
        .await
        .unwrap();
    assert!(row.is_some(), "the acked event is committed");
}
