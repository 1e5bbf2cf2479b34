//! Operator cancel end to end (SPEC §14): real agents run real `sleep 300`s, which operators
//! cancel through grpcurl, the console and the gRPC API — with the agent's stream on the same
//! replica or another, while the agent is offline, and with an agent too old to know Cancel —
//! and every refusal says what it takes.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kanade_shared::{pb, wire::EventBody};
use serde_json::json;

use kanade_testkit::{
    AgentHome, AgentStream, Browser, FaultProxy, Run, TestDb, TestIngest, add_token,
    agent::alive,
    eventually,
    grpcurl::{grpcurl, grpcurl_over},
};

/// A scheduled job that fires within a second, once: its run writes its pid to `DIR/pid` and
/// sleeps five minutes (later firings see `DIR/fired` and exit at once).
fn sleeper_job(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
[[job]]
manifest_id = "sleeper"
command = ["sh", "-c", "if [ -e {d}/fired ]; then exit 0; fi; touch {d}/fired; echo $$ > {d}/pid; echo sleeping; exec sleep 300"]
every = "1s"
"#
    )
}

/// The pid a run wrote to `file`, once it did.
async fn pid_in(file: &Path) -> i32 {
    let mut pid = None;
    eventually(Duration::from_secs(15), "the run writes its pid", || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        std::future::ready(pid.is_some())
    })
    .await;
    pid.unwrap()
}

/// Waits until process `pid` is gone; panics after `within`.
async fn gone(pid: i32, within: Duration) -> Duration {
    let began = Instant::now();
    eventually(within, &format!("process {pid} is gone"), || {
        std::future::ready(!alive(pid))
    })
    .await;
    began.elapsed()
}

/// The run once it has a result.
async fn finished(ingest: &TestIngest, result_id: &str) -> pb::Execution {
    let mut activity = ingest.activity().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let run = activity
            .get_execution(pb::GetExecutionRequest {
                result_id: result_id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        if run.finished_at.is_some() {
            return run;
        }
        assert!(Instant::now() < deadline, "the run never finished: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cancel_request(result_id: &str, reason: &str) -> pb::CancelExecutionRequest {
    pb::CancelExecutionRequest {
        result_id: result_id.to_string(),
        reason: reason.to_string(),
    }
}

fn assert_cancelled(run: &pb::Execution, by: &str, reason: &str) {
    assert_eq!(run.state(), pb::ExecutionState::Cancelled, "{run:?}");
    assert_eq!(run.status(), pb::ExecStatus::Cancelled);
    assert_eq!(run.exit_code, None, "ended by a signal");
    assert_eq!(
        (run.cancel_requested_by.as_str(), run.cancel_reason.as_str()),
        (by, reason)
    );
    assert!(
        run.stderr
            .ends_with(&format!("kanade-agent: run cancelled by {by}: {reason}\n")),
        "the run's stderr says who cancelled it and why: {:?}",
        run.stderr
    );
    // One machine's clock: the run ended after it was asked to.
    let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(
        at(&run.finished_at) >= at(&run.cancel_requested_at),
        "finished {:?} before the cancel was requested {:?}",
        run.finished_at,
        run.cancel_requested_at
    );
}

#[tokio::test]
async fn a_scheduled_run_is_cancelled_through_grpcurl_and_its_processes_are_gone() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&ingest.url(), &sleeper_job(work.path()));
    let _daemon = home.daemon();
    let pid = pid_in(&work.path().join("pid")).await;
    let result_id = ingest.running_run().await;

    let cancel = json!({"result_id": result_id, "reason": "stuck since 09:00"});
    let answer = grpcurl(
        &ingest,
        Some(&cancel),
        &["kanade.v1.Control/CancelExecution"],
    )
    .await
    .json();
    assert_eq!(answer["state"], "EXECUTION_STATE_RUNNING", "{answer}");
    assert_eq!(answer["cancelReason"], "stuck since 09:00");
    assert!(answer["cancelRequestedAt"].is_string(), "{answer}");

    gone(pid, Duration::from_secs(5)).await;
    let by = "anonymous (ingest runs without tokens)";
    let run = finished(&ingest, &result_id).await;
    assert_cancelled(&run, by, "stuck since 09:00");
    assert!(
        run.stdout.contains("sleeping"),
        "what it wrote before is kept"
    );

    // Asking again once it ended: refused, naming the state.
    let (code, message) = grpcurl(
        &ingest,
        Some(&cancel),
        &["kanade.v1.Control/CancelExecution"],
    )
    .await
    .status();
    assert_eq!(code, "FailedPrecondition");
    assert!(
        message.contains("already finished (cancelled)"),
        "{message}"
    );
}

#[tokio::test]
async fn a_cancel_reaches_the_agent_on_another_replica() {
    let db = TestDb::postgres().await;
    let (near, far) = (
        TestIngest::start(&db.url).await,
        TestIngest::start(&db.url).await,
    );
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&far.url(), &sleeper_job(work.path()));
    let _daemon = home.daemon();
    let pid = pid_in(&work.path().join("pid")).await;
    let result_id = near.running_run().await;

    let asked = Instant::now();
    near.control()
        .await
        .cancel_execution(cancel_request(&result_id, "wrong host"))
        .await
        .unwrap();
    let took = gone(pid, Duration::from_secs(5)).await;
    let run = finished(&near, &result_id).await;
    assert_cancelled(&run, "anonymous (ingest runs without tokens)", "wrong host");
    eprintln!(
        "cancel through another replica: process gone {:?} after the request",
        asked.elapsed().min(took)
    );
}

#[tokio::test]
async fn a_cancel_made_while_the_agent_is_offline_is_delivered_when_it_reconnects() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let proxy = FaultProxy::start(ingest.addr).await;
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&format!("http://{}", proxy.addr), &sleeper_job(work.path()));
    let _daemon = home.daemon();
    let pid = pid_in(&work.path().join("pid")).await;
    let result_id = ingest.running_run().await;

    // The network path dies: the cancel is committed, but nothing reaches the agent.
    proxy.blackhole();
    let run = ingest
        .control()
        .await
        .cancel_execution(cancel_request(&result_id, "maintenance window"))
        .await
        .unwrap()
        .into_inner();
    assert!(run.cancel_requested_at.is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(alive(pid), "the agent cannot have heard of it");

    // Back online: the agent reconnects, and ingest follows its Welcome with the cancel.
    proxy.heal();
    gone(pid, Duration::from_secs(15)).await;
    let run = finished(&ingest, &result_id).await;
    assert_cancelled(
        &run,
        "anonymous (ingest runs without tokens)",
        "maintenance window",
    );
}

/// Tokens for an endpoint, a reader and an operator, in a tokens file under `dir`.
struct Tokens {
    file: PathBuf,
    endpoint: String,
    reader: String,
    operator: String,
}

fn tokens(dir: &Path, pc_id: &str) -> Tokens {
    let file = dir.join("tokens.toml");
    Tokens {
        endpoint: add_token(&file, &[pc_id]),
        reader: add_token(&file, &["--reader", "--name", "rita"]),
        operator: add_token(&file, &["--operator", "--name", "alice"]),
        file,
    }
}

#[tokio::test]
async fn only_operators_cancel_and_every_refusal_says_what_it_takes() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens(dir.path(), "pc-1");
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.file.to_str().unwrap()])
        .start()
        .await;
    let (running, done) = (Run::new("pc-1"), Run::new("pc-1"));
    let bearer = |token: &str| format!("authorization: Bearer {token}");
    let mut client = ingest.ingest().await;
    for body in [
        EventBody::Started(running.started()),
        EventBody::Started(done.started()),
        EventBody::Result(done.result(kanade_shared::wire::ExecStatus::Succeeded, Some(0))),
    ] {
        let event = pb::Event::from(kanade_shared::wire::Event {
            seq: 0,
            body,
            trace_context: Default::default(),
        });
        client
            .publish(with_token(event, &tokens.endpoint))
            .await
            .unwrap();
    }
    let cancel = |token: &str, result_id: &str, reason: &str| {
        let header = bearer(token);
        let data = json!({"result_id": result_id, "reason": reason});
        let ingest = &ingest;
        async move {
            grpcurl_over(
                ingest,
                &["-plaintext", "-H", &header],
                Some(&data),
                &["kanade.v1.Control/CancelExecution"],
            )
            .await
        }
    };

    for (who, token) in [("reader", &tokens.reader), ("endpoint", &tokens.endpoint)] {
        let (code, message) = cancel(token, &running.result_id, "x").await.status();
        assert_eq!(code, "PermissionDenied", "{who}");
        assert!(message.contains("operator token"), "{who}: {message}");
    }
    let (code, message) = cancel("not-a-token", &running.result_id, "x")
        .await
        .status();
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("Unauthenticated", "unknown token")
    );

    let unknown = uuid::Uuid::now_v7().to_string();
    let (code, message) = cancel(&tokens.operator, &unknown, "x").await.status();
    assert_eq!(code, "NotFound");
    assert!(message.contains(&unknown), "{message}");
    let (code, message) = cancel(&tokens.operator, &done.result_id, "x")
        .await
        .status();
    assert_eq!(code, "FailedPrecondition");
    assert!(
        message.contains("already finished (succeeded)"),
        "{message}"
    );
    let (code, message) = cancel(&tokens.operator, &running.result_id, "  ")
        .await
        .status();
    assert_eq!(code, "InvalidArgument");
    assert!(message.contains("reason is required"), "{message}");
    let (code, _) = cancel(&tokens.operator, &running.result_id, &"x".repeat(1025))
        .await
        .status();
    assert_eq!(code, "InvalidArgument");

    let first = cancel(&tokens.operator, &running.result_id, "stuck")
        .await
        .json();
    assert_eq!(first["cancelRequestedBy"], "alice");
    // A repeat is a no-op: the first request, its time and its author stay.
    let again = cancel(&tokens.operator, &running.result_id, "really stuck")
        .await
        .json();
    assert_eq!(again["cancelReason"], "stuck");
    assert_eq!(again["cancelRequestedAt"], first["cancelRequestedAt"]);
    // Readers see the request.
    let read = grpcurl_over(
        &ingest,
        &["-plaintext", "-H", &bearer(&tokens.reader)],
        Some(&json!({"result_id": running.result_id})),
        &["kanade.v1.Activity/GetExecution"],
    )
    .await
    .json();
    assert_eq!(read["cancelRequestedBy"], "alice");
    assert_eq!(read["state"], "EXECUTION_STATE_RUNNING");
}

/// A request carrying `token` as its bearer token.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn an_agent_that_knows_no_cancel_leaves_the_run_running_with_the_request_visible() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let run = Run::new("pc-old");
    // An older agent: its stream ignores what it does not know.
    let mut client = ingest.ingest().await;
    let mut stream = AgentStream::open(&mut client, "pc-old").await;
    stream.send(run.started_event(1)).await;
    assert_eq!(stream.answers(1).await.0, [1]);

    ingest
        .control()
        .await
        .cancel_execution(cancel_request(&run.result_id, "stuck"))
        .await
        .unwrap();
    // Ingest sends the Cancel on the endpoint's stream...
    match stream.next().await {
        Some(pb::ingest_message::Msg::Cancel(c)) => {
            assert_eq!(
                (c.result_id.as_str(), c.reason.as_str()),
                (run.result_id.as_str(), "stuck")
            );
        }
        other => panic!("expected a Cancel, got {other:?}"),
    }
    // ...and again after the Welcome of every new stream while the run has no result.
    drop(stream);
    let mut again = AgentStream::open(&mut client, "pc-old").await;
    match again.next().await {
        Some(pb::ingest_message::Msg::Cancel(c)) => assert_eq!(c.result_id, run.result_id),
        other => panic!("expected the pending Cancel after Welcome, got {other:?}"),
    }
    // The agent never acts on it: the run stays running, with the request on it.
    let row = ingest
        .activity()
        .await
        .get_execution(pb::GetExecutionRequest {
            result_id: run.result_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(row.state(), pb::ExecutionState::Running);
    assert!(row.cancel_requested_at.is_some());
    // The console says so.
    let page = reqwest_get(&ingest, &format!("/runs/{}", run.result_id)).await;
    assert!(page.contains("cancel requested"), "{page}");
    assert!(page.contains("too old to know cancel"), "{page}");
    assert!(!page.contains("Cancel run"), "no second request is offered");
    // A run that finished in the meantime is not cancelled again at the next Welcome.
    again.send(run.result_event(2)).await;
    assert_eq!(again.answers(1).await.0, [2]);
    drop(again);
    let mut third = AgentStream::open(&mut client, "pc-old").await;
    let next = tokio::time::timeout(Duration::from_millis(700), third.rx.message()).await;
    assert!(next.is_err(), "nothing pending: {next:?}");
}

/// The body of a console page (GET over a raw socket).
async fn reqwest_get(ingest: &TestIngest, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = ingest.console_addr.expect("a console");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn an_operator_cancels_an_exec_run_from_the_console_and_a_reader_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens(dir.path(), "pc-test");
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, &tokens.endpoint).unwrap();
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.file.to_str().unwrap()])
        .start()
        .await;
    let home = AgentHome::new(
        &ingest.url(),
        &format!("token_file = \"{}\"\n", token_file.display()),
    );
    // The daemon holds the stream; the run is a separate `exec` process, as cron starts one.
    let _daemon = home.daemon();
    let pid_file = dir.path().join("pid");
    let script = format!(
        "echo $$ > {}; echo working; exec sleep 300",
        pid_file.display()
    );
    let exec = home
        .command(&["exec", "--manifest", "by-hand", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = pid_in(&pid_file).await;
    let mut activity = ingest.activity().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let result_id = loop {
        let listed = activity
            .list_executions(with_token(
                pb::ListExecutionsRequest::default(),
                &tokens.reader,
            ))
            .await
            .unwrap()
            .into_inner();
        if let Some(run) = listed.executions.first() {
            break run.result_id.clone();
        }
        assert!(Instant::now() < deadline, "the exec run was never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let run_url = format!("{}/runs/{result_id}", ingest.console_url());

    let browser = Browser::start(1280, 900).await;
    // A reader sees the run, and no Cancel button.
    browser.client.goto(&run_url).await.unwrap();
    browser.type_into("input[name=token]", &tokens.reader).await;
    browser.click("form.signin button[type=submit]").await;
    browser
        .wait_for_text("no result yet", Duration::from_secs(10))
        .await;
    assert!(!browser.text().await.contains("Cancel run"));
    browser.click("form.signout button[type=submit]").await;
    // Signed out once the browser is at the sign-in page (going on sooner races the POST).
    eventually(Duration::from_secs(5), "back at /signin", || async {
        browser.client.current_url().await.unwrap().path() == "/signin"
    })
    .await;

    // An operator does: the reason is asked for, the request is kept, the run ends.
    browser.client.goto(&run_url).await.unwrap();
    browser
        .type_into("input[name=token]", &tokens.operator)
        .await;
    browser.click("form.signin button[type=submit]").await;
    browser
        .wait_for_text("Cancel run", Duration::from_secs(10))
        .await;
    browser
        .wait_for_text("alice (operator)", Duration::from_secs(1))
        .await;
    browser.screenshot("run-cancel-form").await;
    browser
        .type_into(
            "form.cancel input[name=reason]",
            "runaway <script>alert(1)</script>",
        )
        .await;
    browser.click("form.cancel button[type=submit]").await;
    gone(pid, Duration::from_secs(5)).await;
    browser
        .wait_for_text("cancelled", Duration::from_secs(10))
        .await;
    browser
        .wait_for_text("requested", Duration::from_secs(1))
        .await;
    let page = browser.text().await;
    assert!(
        page.contains("by alice: runaway <script>alert(1)</script>"),
        "the reason is shown as text: {page}"
    );
    assert!(!page.contains("Cancel run"), "nothing left to cancel");
    browser.screenshot("run-cancelled").await;
    browser.close().await;

    let out = exec.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "the script died of TERM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kanade-agent: run cancelled by alice: runaway"),
        "exec says so: {stderr}"
    );
    let run = activity
        .get_execution(with_token(
            pb::GetExecutionRequest {
                result_id: result_id.clone(),
            },
            &tokens.reader,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_cancelled(&run, "alice", "runaway <script>alert(1)</script>");
}

#[tokio::test]
async fn exec_wait_without_a_daemon_streams_its_run_from_the_start_and_can_be_cancelled() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    let work = tempfile::tempdir().unwrap();
    let pid_file = work.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
    let exec = home
        .command(&[
            "exec",
            "--wait",
            "--manifest",
            "nap",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = pid_in(&pid_file).await;
    // Listed as running while it runs: this exec holds the stream itself.
    let result_id = ingest.running_run().await;
    ingest
        .control()
        .await
        .cancel_execution(cancel_request(&result_id, "not needed any more"))
        .await
        .unwrap();
    gone(pid, Duration::from_secs(5)).await;
    let out = tokio::task::spawn_blocking(|| exec.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(143));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "run cancelled by anonymous (ingest runs without tokens): not needed any more"
        ),
        "{stderr}"
    );
    let run = finished(&ingest, &result_id).await;
    assert_cancelled(
        &run,
        "anonymous (ingest runs without tokens)",
        "not needed any more",
    );
}
