//! Several ingest replicas on one PostgreSQL database (SPEC §15, Replicas): three real
//! `kanade-ingest` processes behind a round-robin front (as a Kubernetes Service would be), a
//! short `--max-stream-age` so agents keep moving between them, and one replica SIGKILLed while
//! the load is running. Real agents (daemons fed by `kanade-agent exec`) and simulated ones (the
//! real sender over an in-memory queue, for volume) write through the front. What must hold at
//! the end, read straight from PostgreSQL and from the agents' own outboxes: every run stored
//! exactly once and finished with its own outcome, no agent holding anything unsent, and no
//! deadlock or serialization failure logged as an error by any replica.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use kanade_shared::wire::{EventBody, ExecStatus};
use kanade_testkit::{
    AgentHome, RoundRobin, Run, StoredRun, TestDb, TestIngest, eventually, procfs,
    queue::{Latencies, MemoryQueue, sender_config},
};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const REPLICAS: usize = 3;
/// Real agents: a daemon each, fed by `exec` one run after another.
const REAL_AGENTS: usize = 6;
const EXECS_PER_REAL_AGENT: usize = 16;
/// A pause between one agent's runs, so its runs span the whole load.
const EXEC_PAUSE: Duration = Duration::from_millis(150);
/// Simulated agents: the real sender over a queue in memory, each run's Started and Result
/// enqueued apart (as a real run's are), so the replicas always have batches in flight.
const SIMULATED_AGENTS: usize = 24;
const RUNS_PER_SIMULATED_AGENT: usize = 60;
/// Streams end this often (±10 %): every agent reconnects many times through the front.
const STREAM_AGE: &str = "500ms";
/// How long writes stay stalled, once the victim has a batch waiting on the database, before
/// the SIGKILL: it lands on events read, not committed and not acknowledged.
const STALL: Duration = Duration::from_millis(300);
/// What a replica must never log as an error: deadlocks and serialization failures are
/// transient (SPEC §3), retried in place and at most worth a warning.
const SERIALIZATION_FAILURES: [&str; 4] = ["40p01", "40001", "deadlock", "could not serialize"];
/// How long anything the test waits for may take on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(20);

/// One run a real agent made: it was run with this exec_id, and must be stored with this outcome.
#[derive(Debug, Clone)]
struct ExecRun {
    pc_id: String,
    exec_id: String,
    status: ExecStatus,
    exit_code: i32,
}

/// The `--timeout` of every real run: it reaches the row only through the run's EventStarted, so
/// a row that has it proves its Started was stored too, not only its Result.
const EXEC_TIMEOUT_SECS: i64 = 30;

/// Runs `count` commands through `home`'s `kanade-agent exec`, one at a time; every fourth one
/// fails with exit code 1, the others succeed. Counts each in `done` once it is in the outbox.
fn exec_runs(home: &AgentHome, count: usize, done: &AtomicUsize) -> Vec<ExecRun> {
    (0..count)
        .map(|i| {
            let exec_id = format!("{}-run-{i:02}", home.pc_id());
            let (argv, status, exit_code) = match i % 4 {
                3 => ("false", ExecStatus::Failed, 1),
                _ => ("true", ExecStatus::Succeeded, 0),
            };
            let timeout = format!("{EXEC_TIMEOUT_SECS}s");
            let flags = ["--exec-id", &exec_id, "--timeout", &timeout];
            let out = home.exec(&flags, "replicas", &[argv]);
            assert_eq!(
                out.status.code(),
                Some(exit_code),
                "exec {exec_id}: {out:?}"
            );
            done.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(EXEC_PAUSE);
            ExecRun {
                pc_id: home.pc_id().to_string(),
                exec_id,
                status,
                exit_code,
            }
        })
        .collect()
}

/// Enqueues `runs` on a simulated agent's queue, Started and Result apart, at a jittered pace.
async fn feed(queue: &MemoryQueue, runs: &[Run], enqueued: &AtomicUsize) {
    for run in runs {
        for body in [
            EventBody::Started(run.started()),
            EventBody::Result(run.result(ExecStatus::Succeeded, Some(0))),
        ] {
            queue.enqueue(body);
            enqueued.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(20..60))).await;
        }
    }
}

/// What is wrong with the stored rows: each of `execs` stored once under its exec_id with its
/// own outcome, each of `simulated` once under its result_id, finished, both of every run's
/// events in its row, and nothing else.
fn storage_problems(
    stored: &BTreeMap<Uuid, StoredRun>,
    execs: &[ExecRun],
    simulated: &[Run],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut unclaimed: BTreeSet<Uuid> = stored.keys().copied().collect();
    let mut by_exec: BTreeMap<&str, Vec<&StoredRun>> = BTreeMap::new();
    for row in stored.values() {
        by_exec.entry(row.exec_id.as_str()).or_default().push(row);
    }
    for run in execs {
        let rows = by_exec
            .get(run.exec_id.as_str())
            .map_or(&[][..], Vec::as_slice);
        let [row] = rows else {
            problems.push(format!("{} is stored {} times", run.exec_id, rows.len()));
            continue;
        };
        unclaimed.remove(&row.result_id);
        let expected = (
            run.pc_id.as_str(),
            Some(EXEC_TIMEOUT_SECS),
            Some(run.status.as_str()),
            Some(run.exit_code),
            true,
        );
        let got = (
            row.pc_id.as_str(),
            row.timeout_secs,
            row.status.as_deref(),
            row.exit_code,
            row.finished_at.is_some(),
        );
        if got != expected {
            problems.push(format!(
                "{}: (pc_id, timeout_secs, status, exit_code, finished) is {got:?}, expected \
                 {expected:?}",
                run.exec_id
            ));
        }
    }
    for run in simulated {
        let id = Uuid::parse_str(&run.result_id).expect("test runs have UUID result_ids");
        unclaimed.remove(&id);
        match stored.get(&id) {
            None => problems.push(format!("simulated run {id} of {} is missing", run.pc_id)),
            Some(row) => {
                let both_events = row.timeout_secs == run.started().timeout_secs.map(i64::from)
                    && row.status.as_deref() == Some(ExecStatus::Succeeded.as_str())
                    && row.finished_at.is_some();
                if !both_events || row.pc_id != run.pc_id {
                    problems.push(format!("simulated run {id} is stored as {row:?}"));
                }
            }
        }
    }
    problems.extend(
        unclaimed
            .iter()
            .map(|id| format!("row {:?} belongs to no run the agents made", stored[id])),
    );
    problems
}

/// Whether the ingest process `pid` has a database session waiting on a lock: a batch it read,
/// neither committed nor acknowledged. `db_port` is the port PostgreSQL serves on.
async fn batch_waiting(db: &TestDb, pid: u32, db_port: u16) -> bool {
    let ports: Vec<i32> = procfs::ports_connected_to(pid, db_port)
        .into_iter()
        .map(i32::from)
        .collect();
    let mut conn = PgConnection::connect(&db.url).await.expect("connecting");
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
         AND client_port = ANY($1))",
    )
    .bind(ports)
    .fetch_one(&mut conn)
    .await
    .expect("reading pg_stat_activity")
}

fn is_serialization_failure(line: &str) -> bool {
    let line = line.to_lowercase();
    SERIALIZATION_FAILURES.iter().any(|m| line.contains(m))
}

#[tokio::test]
async fn three_replicas_one_sigkilled_mid_load_store_every_run_exactly_once() {
    let began = Instant::now();
    let db = TestDb::postgres().await;
    // Started together on a fresh database: their migrations and partitions race too.
    let mut replicas: Vec<TestIngest> = join_all((0..REPLICAS).map(|_| {
        TestIngest::builder(&db.url)
            .args(&["--max-stream-age", STREAM_AGE])
            .start()
    }))
    .await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let front = RoundRobin::start(&addrs).await;

    // Real agents: a daemon each, holding a stream through the front.
    let homes: Vec<Arc<AgentHome>> = (0..REAL_AGENTS)
        .map(|a| {
            Arc::new(AgentHome::named(
                &format!("pc-real-{a:02}"),
                &front.url(),
                "",
            ))
        })
        .collect();
    let mut daemons: Vec<_> = homes.iter().map(|h| h.daemon()).collect();
    let outboxes = join_all(homes.iter().map(|h| h.outbox())).await;

    // Simulated agents: the real sender, an in-memory queue.
    let latencies = Arc::new(Latencies::default());
    let stop = CancellationToken::new();
    let simulated: Vec<(Arc<MemoryQueue>, Vec<Run>)> = (0..SIMULATED_AGENTS)
        .map(|a| {
            let pc_id = format!("pc-sim-{a:02}");
            let runs = (0..RUNS_PER_SIMULATED_AGENT)
                .map(|_| Run::new(&pc_id))
                .collect();
            (Arc::new(MemoryQueue::new(latencies.clone())), runs)
        })
        .collect();
    let mut senders = tokio::task::JoinSet::new();
    for (queue, runs) in &simulated {
        let config = sender_config(&front.url(), &runs[0].pc_id);
        senders.spawn(kanade_agent::sender::run(
            queue.clone(),
            config,
            stop.clone(),
        ));
    }

    // The load: every agent at once.
    let execs_done = Arc::new(AtomicUsize::new(0));
    let events_enqueued = Arc::new(AtomicUsize::new(0));
    let mut real_load = tokio::task::JoinSet::new();
    for home in &homes {
        let (home, done) = (home.clone(), execs_done.clone());
        real_load.spawn_blocking(move || exec_runs(&home, EXECS_PER_REAL_AGENT, &done));
    }
    let mut simulated_load = tokio::task::JoinSet::new();
    for (queue, runs) in &simulated {
        let (queue, runs, enqueued) = (queue.clone(), runs.clone(), events_enqueued.clone());
        simulated_load.spawn(async move { feed(&queue, &runs, &enqueued).await });
    }
    let total_execs = REAL_AGENTS * EXECS_PER_REAL_AGENT;
    let total_events = 2 * SIMULATED_AGENTS * RUNS_PER_SIMULATED_AGENT;

    // Mid-load: a third of it made, the replica holding the most connections is SIGKILLed
    // while its writes are stalled (a table lock), so it dies holding a batch in flight.
    eventually(WITHIN, "a third of the load made", || {
        let third = execs_done.load(Ordering::SeqCst) >= total_execs / 3
            && events_enqueued.load(Ordering::SeqCst) >= total_events / 3;
        async move { third }
    })
    .await;
    let victim = (0..REPLICAS)
        .max_by_key(|&r| front.open(addrs[r]))
        .expect("replicas");
    let (victim_addr, victim_pid) = (addrs[victim], replicas[victim].child.id());
    let mut locker = PgConnection::connect(&db.url).await.expect("connecting");
    let db_port: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(&mut locker)
        .await
        .expect("the database's port");
    let db_port = u16::try_from(db_port).expect("a TCP port");
    let mut stall = locker.begin().await.expect("BEGIN");
    sqlx::query("LOCK TABLE execution_results IN EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .expect("stalling writes");
    eventually(WITHIN, "a batch of the victim waiting on the stall", || {
        batch_waiting(&db, victim_pid, db_port)
    })
    .await;
    // More of the victim's streams' events pile up behind that batch, unacknowledged.
    tokio::time::sleep(STALL).await;
    let open_at_kill = front.open(victim_addr);
    replicas[victim].sigkill();
    let at_kill = (
        execs_done.load(Ordering::SeqCst),
        events_enqueued.load(Ordering::SeqCst),
    );
    stall.commit().await.expect("ending the stall");
    // Until the front notices, the dead replica refuses its share of the reconnects; then it is
    // out of rotation, as a Service drops an endpoint that failed its probes.
    eventually(WITHIN, "a reconnect refused by the dead replica", || {
        let refused = front.refused(victim_addr) > 0;
        async move { refused }
    })
    .await;
    front.remove(victim_addr);

    let mut execs = Vec::new();
    while let Some(made) = real_load.join_next().await {
        execs.extend(made.expect("an agent's runs"));
    }
    while let Some(fed) = simulated_load.join_next().await {
        fed.expect("a simulated agent's runs");
    }
    let load_done = began.elapsed();
    assert!(
        at_kill.0 < total_execs && at_kill.1 < total_events,
        "the replica died after the load ended ({at_kill:?} of ({total_execs}, {total_events}))"
    );

    // Everything delivered: every real outbox and every simulated queue empty.
    eventually(WITHIN, "every agent's events acknowledged", || async {
        for outbox in &outboxes {
            if outbox.status().await.expect("outbox status").pending_events > 0 {
                return false;
            }
        }
        simulated.iter().all(|(queue, _)| queue.is_empty())
    })
    .await;
    let drained = began.elapsed();
    // The agents did move between replicas: every real agent opens streams on at least two.
    // Each stream lives 500 ms and the front hands each new connection to the next replica in
    // its turn, whoever connects, so an agent may land on the same replica a few times running:
    // the daemons keep reconnecting until each has been on two.
    let streamed_to = |home: &AgentHome| -> Vec<usize> {
        let opened = format!("pc_id={} ", home.pc_id());
        (0..REPLICAS)
            .filter(|&r| {
                replicas[r]
                    .log()
                    .lines()
                    .any(|l| l.contains("agent stream opened") && l.contains(&opened))
            })
            .collect()
    };
    let deadline = Instant::now() + WITHIN;
    loop {
        let unmoved: Vec<(&str, Vec<usize>)> = homes
            .iter()
            .map(|home| (home.pc_id(), streamed_to(home)))
            .filter(|(_, on)| on.len() < 2)
            .collect();
        if unmoved.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents that only ever streamed to one replica (agent, replicas): {unmoved:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    while let Some(sender) = senders.join_next().await {
        sender
            .expect("a simulated sender")
            .expect("a simulated sender ends cleanly");
    }
    for daemon in &mut daemons {
        assert!(daemon.terminate().success(), "{}", daemon.log());
    }

    // Each real agent's outbox, after its daemon stopped: nothing pending, dead or running.
    for (home, outbox) in homes.iter().zip(&outboxes) {
        let status = outbox.status().await.expect("outbox status");
        assert_eq!(
            (
                status.pending_events,
                status.dead_letters,
                status.running_runs
            ),
            (0, 0, 0),
            "{}'s outbox (pending, dead letters, running) at the end",
            home.pc_id()
        );
    }

    // Every run exactly once and finished, read straight from PostgreSQL.
    let simulated_runs: Vec<Run> = simulated.iter().flat_map(|(_, r)| r.clone()).collect();
    let stored = db.stored_runs().await;
    let problems = storage_problems(&stored, &execs, &simulated_runs);
    assert!(
        problems.is_empty(),
        "{} problems in {} stored rows, for {} runs; the first:\n{}",
        problems.len(),
        stored.len(),
        execs.len() + simulated_runs.len(),
        problems[..problems.len().min(20)].join("\n")
    );

    // No replica logged a deadlock or a serialization failure as an error (the killed one's
    // log up to its death included).
    let errors: Vec<(usize, String)> = replicas
        .iter()
        .enumerate()
        .flat_map(|(r, replica)| {
            replica
                .log_lines_at("ERROR")
                .into_iter()
                .map(move |l| (r, l))
        })
        .collect();
    let serialization: Vec<_> = errors
        .iter()
        .filter(|(_, line)| is_serialization_failure(line))
        .collect();
    assert!(
        serialization.is_empty(),
        "replicas logged deadlocks or serialization failures as errors:\n{serialization:#?}"
    );

    // Retried in place, they may be warnings: say how many, for whoever reads the output.
    let retried = replicas
        .iter()
        .flat_map(|r| r.log_lines_at("WARN"))
        .filter(|l| is_serialization_failure(l))
        .count();
    let (p50, p99, max) = latencies.summary();
    println!(
        "{} runs; replica {victim} SIGKILLed with {open_at_kill} connections open, at {at_kill:?} \
         of ({total_execs} execs, {total_events} simulated events); load made in {load_done:?}, \
         all acknowledged after {drained:?}; connections per replica {:?}, refused by the dead \
         one {}; simulated acks p50 {p50:?} p99 {p99:?} max {max:?}; {retried} deadlocks or \
         serialization failures retried (warnings); {} error lines:",
        stored.len(),
        addrs
            .iter()
            .map(|&a| front.forwarded(a))
            .collect::<Vec<_>>(),
        front.refused(victim_addr),
        errors.len(),
    );
    for (r, line) in &errors {
        println!("  replica {r}: {line}");
    }
}
