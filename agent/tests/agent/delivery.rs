//! Delivery through the real sender to the real ingest: outages, ingest crashes, dead network
//! paths, rejects, the daemon's schedules and its own crashes. Nothing lost, nothing duplicated,
//! no run left running forever.

use std::{collections::HashMap, time::Duration};

use chrono::Duration as ChronoDuration;
use kanade_ingest::store::{ExecutionRow, ListQuery, RunState, Store};
use kanade_shared::wire::{EventStarted, ExecResult, ExecStatus};

use kanade_testkit::{AgentHome, FaultProxy, TestDb, TestIngest, eventually, free_addr, now};

async fn rows(store: &dyn Store) -> Vec<ExecutionRow> {
    store
        .list(&ListQuery::all(now(), ChronoDuration::minutes(5), 500))
        .await
        .unwrap()
}

/// Rows per exec_id.
async fn by_exec(store: &dyn Store) -> HashMap<String, Vec<ExecutionRow>> {
    let mut map: HashMap<String, Vec<ExecutionRow>> = HashMap::new();
    for row in rows(store).await {
        map.entry(row.exec_id.clone()).or_default().push(row);
    }
    map
}

fn exec_ok(home: &AgentHome, exec_id: &str, argv: &[&str]) {
    let out = home.exec(&["--exec-id", exec_id], "delivery", argv);
    assert!(out.status.success(), "exec failed: {out:?}");
}

#[tokio::test]
async fn events_wait_while_ingest_is_down_and_flow_when_it_comes_up() {
    let db = TestDb::sqlite();
    let addr = free_addr();
    let home = AgentHome::new(&format!("http://{addr}"), "");
    exec_ok(&home, "e-1", &["true"]);
    let failing = home.exec(&["--exec-id", "e-2"], "delivery", &["sh", "-c", "exit 4"]);
    assert_eq!(failing.status.code(), Some(4));
    assert_eq!(
        home.outbox().await.status().await.unwrap().pending_events,
        4
    );

    let _daemon = home.daemon();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        home.outbox().await.status().await.unwrap().pending_events,
        4,
        "nothing to send to"
    );
    let _ingest = TestIngest::builder(&db.url).listen(addr).start().await;
    let store = db.store().await;
    eventually(Duration::from_secs(15), "both runs delivered", || async {
        home.outbox().await.status().await.unwrap().pending_events == 0
    })
    .await;
    let rows = by_exec(store.as_ref()).await;
    assert_eq!(
        rows["e-1"][0].state,
        RunState::Finished(ExecStatus::Succeeded)
    );
    assert_eq!(rows["e-2"][0].state, RunState::Finished(ExecStatus::Failed));
    assert_eq!(rows["e-2"][0].outcome.as_ref().unwrap().exit_code, Some(4));
}

#[tokio::test]
async fn ingest_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() {
    let db = TestDb::postgres().await;
    let addr = free_addr();
    let mut ingest = TestIngest::builder(&db.url).listen(addr).start().await;
    let home = AgentHome::new(&format!("http://{addr}"), "");
    let _daemon = home.daemon();
    let mut n = 0;
    for _ in 0..10 {
        n += 1;
        exec_ok(&home, &format!("e-{n}"), &["echo", "before"]);
    }
    let _ = ingest.child.kill();
    let _ = ingest.child.wait();
    for _ in 0..10 {
        n += 1;
        exec_ok(&home, &format!("e-{n}"), &["echo", "during"]);
    }
    let _ingest = TestIngest::builder(&db.url).listen(addr).start().await;
    for _ in 0..10 {
        n += 1;
        exec_ok(&home, &format!("e-{n}"), &["echo", "after"]);
    }
    eventually(Duration::from_secs(20), "the outbox drained", || async {
        home.outbox().await.status().await.unwrap().pending_events == 0
    })
    .await;
    let store = db.store().await;
    let rows = by_exec(store.as_ref()).await;
    assert_eq!(rows.len(), 30, "one row per run");
    for i in 1..=30 {
        let runs = &rows[&format!("e-{i}")];
        assert_eq!(runs.len(), 1, "e-{i} stored once");
        assert_eq!(runs[0].state, RunState::Finished(ExecStatus::Succeeded));
    }
}

#[tokio::test]
async fn a_dead_network_path_is_noticed_by_keepalive_and_recovered() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let proxy = FaultProxy::start(ingest.addr).await;
    let home = AgentHome::new(&format!("http://{}", proxy.addr), "");
    let daemon = home.daemon();
    let store = db.store().await;
    exec_ok(&home, "e-1", &["true"]);
    eventually(
        Duration::from_secs(10),
        "the first run delivered",
        || async { rows(store.as_ref()).await.len() == 1 },
    )
    .await;

    proxy.blackhole();
    exec_ok(&home, "e-2", &["true"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rows(store.as_ref()).await.len(),
        1,
        "nothing crosses a dead path"
    );
    // New connections pass again; the old one stays dead, so only a sender that noticed it
    // (HTTP/2 keepalive: 500 ms interval, 1 s timeout here) gets through.
    proxy.heal();
    eventually(
        Duration::from_secs(10),
        "the second run delivered",
        || async { rows(store.as_ref()).await.len() == 2 },
    )
    .await;
    assert!(
        daemon.log().contains("stream to ingest failed"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn rejected_events_are_dead_lettered_with_their_reason() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    let outbox = home.outbox().await;
    // An event for another endpoint: ingest refuses it on this agent's stream.
    let started = EventStarted {
        result_id: uuid::Uuid::now_v7().to_string(),
        request_id: "r".into(),
        exec_id: "e".into(),
        pc_id: "someone-else".into(),
        started_at: now(),
        manifest_id: "m".into(),
        version: String::new(),
        timeout_secs: None,
    };
    let (lock, _) = outbox
        .begin_run(&started, &Default::default())
        .await
        .unwrap();
    let result = ExecResult {
        result_id: started.result_id.clone(),
        request_id: "r".into(),
        exec_id: "e".into(),
        pc_id: "someone-else".into(),
        manifest_id: "m".into(),
        version: String::new(),
        status: ExecStatus::Succeeded,
        exit_code: Some(0),
        stdout: String::new(),
        stderr: String::new(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        started_at: started.started_at,
        finished_at: started.started_at,
    };
    outbox
        .finish_run(lock, result, &Default::default())
        .await
        .unwrap();
    exec_ok(&home, "fine", &["true"]);

    let _daemon = home.daemon();
    eventually(Duration::from_secs(10), "the outbox drained", || async {
        outbox.status().await.unwrap().pending_events == 0
    })
    .await;
    let dead = outbox.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|d| d.reason.contains("does not match this stream's pc_id")),
        "{dead:?}"
    );
    assert_eq!(
        rows(db.store().await.as_ref()).await.len(),
        1,
        "the valid run went through"
    );

    let listed = home.command(&["dead-letters", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains(&started.result_id) && text.contains("pc_id"),
        "{text}"
    );
}

#[tokio::test]
async fn scheduled_runs_show_running_then_finished_in_postgres() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let job = r#"
[[job]]
manifest_id = "slow-inventory"
version = "7"
script = "sleep 1; echo counted"
every = "700ms"
timeout = "10s"
"#;
    let home = AgentHome::new(&ingest.url(), job);
    let _daemon = home.daemon();
    let store = db.store().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        if let Some(row) = rows(store.as_ref())
            .await
            .into_iter()
            .find(|r| r.state == RunState::Running)
        {
            break row.result_id;
        }
        assert!(std::time::Instant::now() < deadline, "no run seen running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eventually(Duration::from_secs(10), "the same run finished", || async {
        let row = store
            .get(id, now(), ChronoDuration::minutes(5))
            .await
            .unwrap()
            .unwrap();
        row.state == RunState::Finished(ExecStatus::Succeeded)
    })
    .await;
    let row = store
        .get(id, now(), ChronoDuration::minutes(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.manifest_id, "slow-inventory");
    assert_eq!(row.version, "7");
    assert_eq!(row.timeout_secs, Some(10));
    assert_eq!(row.pc_id, "pc-test");
    assert_eq!(row.outcome.unwrap().stdout, "counted\n");
}

#[tokio::test]
async fn a_daemon_killed_mid_run_has_the_run_reported_interrupted_by_the_next_one() {
    let db = TestDb::postgres().await;
    let ingest = TestIngest::start(&db.url).await;
    let job = r#"
[[job]]
manifest_id = "long"
command = ["sleep", "3"]
every = "300ms"
"#;
    let home = AgentHome::new(&ingest.url(), job);
    let store = db.store().await;
    let mut daemon = home.daemon();
    eventually(
        Duration::from_secs(10),
        "a run in progress at ingest",
        || async {
            rows(store.as_ref())
                .await
                .iter()
                .any(|r| r.state == RunState::Running)
        },
    )
    .await;
    daemon.sigkill();
    let running: Vec<_> = rows(store.as_ref())
        .await
        .into_iter()
        .filter(|r| r.state == RunState::Running)
        .map(|r| r.result_id)
        .collect();
    assert_eq!(running.len(), 1);

    // The next daemon on the same data dir (without jobs) reports it, once.
    home.rewrite("");
    let _daemon = home.daemon();
    eventually(
        Duration::from_secs(10),
        "the run reported interrupted",
        || async {
            let row = store
                .get(running[0], now(), ChronoDuration::minutes(5))
                .await
                .unwrap()
                .unwrap();
            row.state == RunState::Finished(ExecStatus::Interrupted)
        },
    )
    .await;
    let row = store
        .get(running[0], now(), ChronoDuration::minutes(5))
        .await
        .unwrap()
        .unwrap();
    let outcome = row.outcome.unwrap();
    assert!(outcome.stdout.is_empty() && outcome.exit_code.is_none());
    assert!(outcome.finished_at >= row.started_at);
    assert!(
        rows(store.as_ref())
            .await
            .iter()
            .all(|r| r.state != RunState::Running),
        "no run is left running"
    );
}

#[tokio::test]
async fn exec_wait_sends_its_own_events_or_gives_up_with_75() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    let out = home.exec(
        &["--wait", "--wait-timeout", "10s", "--exec-id", "w-1"],
        "m",
        &["sh", "-c", "echo hi; exit 5"],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let rows = by_exec(db.store().await.as_ref()).await;
    assert_eq!(
        rows["w-1"][0].state,
        RunState::Finished(ExecStatus::Failed),
        "acked before exit"
    );

    let down = AgentHome::new(&format!("http://{}", free_addr()), "");
    let out = down.exec(&["--wait", "--wait-timeout", "1s"], "m", &["true"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 event(s) of this run still wait"));
}

/// SPEC §9: `exec` wraps a command like `time` does — its output passes through as written,
/// the agent's own log stays at warnings unless asked — and `--wait` says why it still waits.
#[tokio::test]
async fn exec_passes_the_output_through_and_says_why_it_still_waits() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    let script = ["sh", "-c", "echo out; echo err >&2; echo more"];
    let exec = |flags: &[&str]| {
        let mut args = vec!["exec"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--manifest", "wrap", "--"]);
        args.extend_from_slice(&script);
        let mut cmd = home.command(&args);
        cmd.env_remove("RUST_LOG");
        cmd.output().unwrap()
    };
    let out = exec(&["--wait", "--exec-id", "plain"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nmore\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "err\n",
        "no log lines by default"
    );
    let stored = &by_exec(db.store().await.as_ref()).await["plain"][0];
    let outcome = stored.outcome.as_ref().unwrap();
    assert_eq!(
        (outcome.stdout.as_str(), outcome.stderr.as_str()),
        ("out\nmore\n", "err\n")
    );

    let quiet = exec(&["--quiet", "--exec-id", "quiet"]);
    assert!(quiet.status.success());
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );
    let verbose = exec(&["-v", "--exec-id", "verbose"]);
    assert!(
        String::from_utf8_lossy(&verbose.stderr).contains("INFO"),
        "{verbose:?}"
    );

    // An ingest that never answers: the wait says why instead of staying silent.
    let down = AgentHome::new(&format!("http://{}", free_addr()), "");
    let started = std::time::Instant::now();
    let out = down
        .command(&[
            "exec",
            "--wait",
            "--wait-timeout",
            "3s",
            "--manifest",
            "m",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let explained = stderr
        .lines()
        .find(|l| l.contains("waiting for ingest to acknowledge 2 event(s)"))
        .unwrap_or_else(|| panic!("no explanation while waiting: {stderr}"));
    assert!(
        explained.contains("disconnected from http://") && explained.contains("connecting to"),
        "{explained}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn daemon_shutdown_kills_runs_past_the_grace_and_reports_them_killed() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let job = r#"
[[job]]
manifest_id = "stubborn"
command = ["sleep", "60"]
every = "200ms"
"#;
    let home = AgentHome::new(&ingest.url(), job);
    let store = db.store().await;
    let mut daemon = home.daemon();
    eventually(
        Duration::from_secs(10),
        "the run in progress at ingest",
        || async {
            rows(store.as_ref())
                .await
                .iter()
                .any(|r| r.state == RunState::Running)
        },
    )
    .await;
    let asked = std::time::Instant::now();
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    // shutdown_grace is 2 s and kill_grace 300 ms in the harness.
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "took {:?}",
        asked.elapsed()
    );

    // Whatever the first daemon could not deliver, the next one does.
    home.rewrite("");
    let _next = home.daemon();
    eventually(
        Duration::from_secs(10),
        "the run reported killed",
        || async {
            let rows = rows(store.as_ref()).await;
            rows.len() == 1 && rows[0].state == RunState::Finished(ExecStatus::Killed)
        },
    )
    .await;
}

#[tokio::test]
async fn a_backlog_larger_than_the_byte_window_is_delivered() {
    let db = TestDb::sqlite();
    let addr = free_addr();
    // Each result is ~8 KB: the window holds two of them at a time.
    let home = AgentHome::new(&format!("http://{addr}"), "send_window_bytes = 20000\n");
    for i in 0..6 {
        exec_ok(
            &home,
            &format!("big-{i}"),
            &["sh", "-c", "head -c 8000 /dev/zero | tr '\\0' x"],
        );
    }
    let _ingest = TestIngest::builder(&db.url).listen(addr).start().await;
    let _daemon = home.daemon();
    let store = db.store().await;
    eventually(
        Duration::from_secs(15),
        "the whole backlog delivered",
        || async { home.outbox().await.status().await.unwrap().pending_events == 0 },
    )
    .await;
    assert_eq!(rows(store.as_ref()).await.len(), 6);
}

#[tokio::test]
async fn an_agent_sends_its_token_and_one_without_waits() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let token = kanade_testkit::add_token(&tokens, &["pc-test"]);
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;

    let without = AgentHome::new(&ingest.url(), "");
    let waited = without.exec(&["--wait", "--wait-timeout", "1s"], "m", &["true"]);
    assert_eq!(waited.status.code(), Some(75), "{waited:?}");
    assert!(
        String::from_utf8_lossy(&waited.stderr).contains("token"),
        "{waited:?}"
    );

    let with = AgentHome::new(
        &ingest.url(),
        &format!("token_file = \"{}\"\n", token_file.display()),
    );
    let out = with.exec(
        &["--wait", "--wait-timeout", "10s", "--exec-id", "t-1"],
        "m",
        &["true"],
    );
    assert!(out.status.success(), "{out:?}");
    let secret = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(secret.trim()),
        "the token is never logged"
    );
    assert_eq!(by_exec(db.store().await.as_ref()).await["t-1"].len(), 1);
}

#[tokio::test]
async fn an_agent_delivers_over_mtls_as_the_endpoint_its_certificate_names() {
    let ca = kanade_testkit::TestCa::new("kanade test CA");
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url).mtls(&ca).start().await;
    let url = format!("https://{}", ingest.addr);
    let tls_settings = |cert: &kanade_testkit::IssuedCert| {
        format!(
            "ca_cert = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            ca.cert_path().display(),
            cert.cert.display(),
            cert.key.display()
        )
    };

    // The harness's agents are pc-test: a certificate for that name delivers.
    let own = ca.client("pc-test", false);
    let home = AgentHome::new(&url, &tls_settings(&own));
    let out = home.exec(
        &["--wait", "--wait-timeout", "10s", "--exec-id", "tls-1"],
        "m",
        &["true"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(by_exec(db.store().await.as_ref()).await["tls-1"].len(), 1);
    let key = own.key_pem();
    let key_body = key.lines().nth(1).unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(key_body),
        "key material is never logged"
    );

    // A certificate naming another endpoint gets nothing written as pc-test.
    let foreign = ca.client("pc-elsewhere", false);
    let home = AgentHome::new(&url, &tls_settings(&foreign));
    let out = home.exec(
        &["--wait", "--wait-timeout", "2s", "--exec-id", "tls-2"],
        "m",
        &["true"],
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pc-elsewhere"), "{stderr}");
    assert!(
        !by_exec(db.store().await.as_ref())
            .await
            .contains_key("tls-2")
    );
}
