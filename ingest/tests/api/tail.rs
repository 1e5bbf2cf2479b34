//! Live output end to end (SPEC §14): real agents run real scripts that print a numbered line
//! every 200 ms, and watchers follow them through `Control/TailExecution` — on the replica
//! holding the agent's stream and on another, two at once, one that stops reading, across an
//! agent's reconnect, with grpcurl — and each line arrives once, in order, while the script
//! runs, then the run's final row.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use kanade_shared::pb::{self, tail_execution_response::Event};
use serde_json::json;

use kanade_testkit::{
    AgentHome, FaultProxy, TestDb, TestIngest, add_token, eventually, grpcurl::grpcurl_over,
};

/// Lines the counting job prints, one every 200 ms (about four seconds).
const LINES: usize = 20;

/// A scheduled job that fires within a second, once: it prints `line 1` … `line N`, one every
/// 200 ms, then `done` on stderr, and exits 0. `pad` bytes of `x` end each line.
fn counting_job(dir: &Path, lines: usize, pause: &str, pad: usize) -> String {
    let d = dir.display();
    let pad = "x".repeat(pad);
    format!(
        r#"
[[job]]
manifest_id = "counter"
command = ["sh", "-c", "if [ -e {d}/fired ]; then exit 0; fi; touch {d}/fired; i=1; while [ $i -le {lines} ]; do echo \"line $i {pad}\"; i=$((i+1)); sleep {pause}; done; echo done >&2"]
every = "1s"
"#
    )
}

/// What one watcher saw: every event with when it arrived.
struct Watched {
    chunks: Vec<(Instant, pb::OutputChunk)>,
    notices: Vec<pb::TailNotice>,
    finished: Option<(Instant, pb::Execution)>,
}

impl Watched {
    /// The stdout chunks, checked to follow each other without a gap or an overlap.
    fn stdout_without_gaps(&self) -> String {
        let mut next = None;
        let mut text = String::new();
        for (_, chunk) in self.stdout() {
            if let Some(next) = next {
                assert_eq!(chunk.offset, next, "a gap or an overlap in stdout");
            }
            next = Some(chunk.offset + chunk.length);
            text.push_str(&chunk.data);
        }
        text
    }

    fn stdout(&self) -> impl Iterator<Item = &(Instant, pb::OutputChunk)> {
        self.chunks
            .iter()
            .filter(|(_, c)| c.stream() == pb::OutputStream::Stdout)
    }

    fn stderr_text(&self) -> String {
        self.chunks
            .iter()
            .filter(|(_, c)| c.stream() == pb::OutputStream::Stderr)
            .map(|(_, c)| c.data.as_str())
            .collect()
    }
}

/// Reads a TailExecution stream to its end (at most `within`).
async fn watch_to_end(Tail(mut stream, _client): Tail, within: Duration) -> Watched {
    let mut watched = Watched {
        chunks: Vec::new(),
        notices: Vec::new(),
        finished: None,
    };
    let read = async {
        while let Some(message) = stream.message().await.unwrap_or_else(|e| {
            panic!(
                "the tail stream failed after {} chunks, finished {}: {e}",
                watched.chunks.len(),
                watched.finished.is_some()
            )
        }) {
            let at = Instant::now();
            match message.event.expect("every message holds an event") {
                Event::Chunk(chunk) => watched.chunks.push((at, chunk)),
                Event::Notice(notice) => watched.notices.push(notice),
                Event::Finished(run) => {
                    assert!(watched.finished.is_none(), "finished twice");
                    watched.finished = Some((at, run));
                }
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("the tail did not end in time");
    watched
}

/// A TailExecution call: its responses, and the client they come through (kept open while
/// they are read).
struct Tail(
    tonic::Streaming<pb::TailExecutionResponse>,
    pb::control_client::ControlClient<tonic::transport::Channel>,
);

async fn tail(ingest: &TestIngest, result_id: &str) -> Tail {
    let mut client = ingest.control().await;
    let stream = client
        .tail_execution(pb::TailExecutionRequest {
            result_id: result_id.to_string(),
        })
        .await
        .expect("TailExecution answers")
        .into_inner();
    Tail(stream, client)
}

/// Every line `line 1` … `line n` once, in this order, and nothing else on stdout.
fn assert_lines_once_in_order(stdout: &str, n: usize) {
    let numbers: Vec<usize> = stdout
        .lines()
        .map(|l| {
            l.strip_prefix("line ")
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a line of the script: {l:?}"))
        })
        .collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>());
}

/// The watcher saw output while the script ran: chunk after chunk over more than a second, not
/// in one piece at the end, and all of them before the final row.
fn assert_live(watched: &Watched) {
    let (finished_at, run) = watched.finished.as_ref().expect("the final row came");
    assert_eq!(run.state(), pb::ExecutionState::Succeeded, "{run:?}");
    let arrivals: Vec<Instant> = watched.stdout().map(|(at, _)| *at).collect();
    let (first, last) = (arrivals[0], *arrivals.last().unwrap());
    assert!(
        arrivals.len() >= 5 && last.duration_since(first) > Duration::from_secs(1),
        "output arrived at once ({} chunks over {:?}), not as it was written",
        arrivals.len(),
        last.duration_since(first)
    );
    assert!(*finished_at >= last, "finished is the last message");
}

#[tokio::test]
async fn a_running_scripts_lines_arrive_once_in_order_while_it_runs_then_the_final_row() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&ingest.url(), &counting_job(work.path(), LINES, "0.2", 0));
    let _daemon = home.daemon();
    let result_id = ingest.running_run().await;

    let watched = watch_to_end(tail(&ingest, &result_id).await, Duration::from_secs(30)).await;
    assert_lines_once_in_order(&watched.stdout_without_gaps(), LINES);
    assert_eq!(watched.stderr_text(), "done\n");
    assert_live(&watched);
    assert!(watched.notices.is_empty(), "{:?}", watched.notices);
    // The watcher gets, at the end, the run as stored: the same lines.
    let (_, run) = watched.finished.unwrap();
    assert_lines_once_in_order(&run.stdout, LINES);

    // A finished run answers its stored outputs, then its row.
    let again = watch_to_end(tail(&ingest, &result_id).await, Duration::from_secs(5)).await;
    assert_lines_once_in_order(&again.stdout_without_gaps(), LINES);
    assert_eq!(again.stdout().next().unwrap().1.offset, 0);
    assert!(again.finished.is_some());
}

#[tokio::test]
async fn two_watchers_on_two_replicas_each_get_every_line_once() {
    let db = TestDb::postgres().await;
    let (near, far) = (
        TestIngest::start(&db.url).await,
        TestIngest::start(&db.url).await,
    );
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&far.url(), &counting_job(work.path(), LINES, "0.2", 0));
    let _daemon = home.daemon();
    let result_id = near.running_run().await;

    let (on_near, on_far) = tokio::join!(
        async { watch_to_end(tail(&near, &result_id).await, Duration::from_secs(30)).await },
        async { watch_to_end(tail(&far, &result_id).await, Duration::from_secs(30)).await },
    );
    for (replica, watched) in [
        ("another replica", &on_near),
        ("the agent's replica", &on_far),
    ] {
        eprintln!("{replica}: {} chunks", watched.chunks.len());
        assert_lines_once_in_order(&watched.stdout_without_gaps(), LINES);
        assert_live(watched);
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_loses_output_but_slows_nobody() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let work = tempfile::tempdir().unwrap();
    // 8 KiB lines every 20 ms (about 400 KiB/s, for about 3 s): more than a watcher's queue and
    // the HTTP/2 buffers in front of it hold. The agent's rate cap is raised above it, so a
    // watcher that reads sees every byte.
    let lines = 150;
    let job = format!(
        "tail_rate_bytes = 4194304\n{}",
        counting_job(work.path(), lines, "0.02", 8 * 1024)
    );
    let home = AgentHome::new(&ingest.url(), &job);
    let _daemon = home.daemon();
    let result_id = ingest.running_run().await;

    // HTTP/2's own default window (hyper's client would take 2 MiB before it stops the server).
    let channel = tonic::transport::Endpoint::from_shared(ingest.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut client = pb::control_client::ControlClient::new(channel);
    let stream = client
        .tail_execution(pb::TailExecutionRequest {
            result_id: result_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let stalled = Tail(stream, client);
    let reading = watch_to_end(tail(&ingest, &result_id).await, Duration::from_secs(30)).await;
    assert_lines_once_in_order(&reading.stdout_without_gaps(), lines);
    let (_, run) = reading.finished.as_ref().expect("the final row");
    let script_took = (run.finished_at.unwrap().seconds - run.started_at.unwrap().seconds) as u64;
    assert!(
        script_took < 10,
        "the script ran at its own pace ({script_took} s)"
    );

    // The one that stopped reading lost some output (it sees the gap) and still gets the end of
    // the output, then the final row.
    let stalled = watch_to_end(stalled, Duration::from_secs(10)).await;
    let mut next = None;
    let mut gaps = 0;
    for (_, chunk) in stalled.stdout() {
        if next.is_some_and(|n| chunk.offset > n) {
            gaps += 1;
        }
        assert!(
            next.is_none_or(|n| chunk.offset >= n),
            "output never repeats"
        );
        next = Some(chunk.offset + chunk.length);
    }
    let got: u64 = stalled.stdout().map(|(_, c)| c.length).sum();
    let all: u64 = reading.stdout().map(|(_, c)| c.length).sum();
    assert!(
        gaps >= 1,
        "a watcher that did not read for seconds lost output (it got {got} of {all} bytes)"
    );
    assert_eq!(
        next,
        Some(all),
        "after the gap, the end of the output ({got} of {all} bytes)"
    );
    assert!(stalled.finished.is_some(), "and it still got the final row");
}

#[tokio::test]
async fn when_the_agent_reconnects_mid_tail_the_watcher_is_told_and_output_resumes() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let proxy = FaultProxy::start(ingest.addr).await;
    let work = tempfile::tempdir().unwrap();
    let lines = 30;
    let home = AgentHome::new(
        &format!("http://{}", proxy.addr),
        &counting_job(work.path(), lines, "0.2", 0),
    );
    let _daemon = home.daemon();
    let result_id = ingest.running_run().await;

    let Tail(mut stream, client) = tail(&ingest, &result_id).await;
    // A few lines, then the connection is cut for a moment: the agent reconnects (its backoff is
    // at most 500 ms here) and the lines written meanwhile come from what it holds.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        if let Some(Event::Chunk(chunk)) = stream.message().await.unwrap().unwrap().event {
            seen.push(chunk);
        }
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.heal();
    let watched = tokio::spawn(watch_to_end(Tail(stream, client), Duration::from_secs(30)));
    let watched = match watched.await {
        Ok(w) => w,
        Err(e) => panic!("{e}\n--- ingest ---\n{}", ingest.log()),
    };
    let told: Vec<(bool, &str)> = watched
        .notices
        .iter()
        .map(|n| (n.agent_connected, n.message.as_str()))
        .collect();
    assert!(
        told.len() >= 2 && !told[0].0 && told.last().unwrap().0,
        "told that the agent's stream ended, then that it is back: {told:?}"
    );
    let mut all = seen;
    all.extend(watched.chunks.into_iter().map(|(_, c)| c));
    let mut next = None;
    let mut text = String::new();
    for chunk in all
        .iter()
        .filter(|c| c.stream() == pb::OutputStream::Stdout)
    {
        if let Some(next) = next {
            assert_eq!(chunk.offset, next, "nothing lost, nothing twice");
        }
        next = Some(chunk.offset + chunk.length);
        text.push_str(&chunk.data);
    }
    assert_lines_once_in_order(&text, lines);
    assert!(watched.finished.is_some());
}

/// `kanade-agent exec FLAGS` of a script printing LINES numbered lines, one every 200 ms.
fn counting_exec(home: &AgentHome, flags: &[&str]) -> std::process::Child {
    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.2; done");
    let mut args = vec!["exec"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--manifest", "counter", "--", "sh", "-c", &script]);
    home.command(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_run_started_by_exec_is_followed_through_the_daemon() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    let daemon = home.daemon();
    eventually(
        Duration::from_secs(10),
        "the daemon is connected",
        || async { daemon.log().contains("connected to ingest") },
    )
    .await;
    let mut exec = counting_exec(&home, &[]);
    let result_id = ingest.running_run().await;
    let watched = watch_to_end(tail(&ingest, &result_id).await, Duration::from_secs(30)).await;
    assert_lines_once_in_order(&watched.stdout_without_gaps(), LINES);
    assert_live(&watched);
    assert!(exec.wait().unwrap().success());
}

#[tokio::test]
async fn an_exec_wait_run_ends_with_its_row_and_no_word_of_a_stream_ending() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let home = AgentHome::new(&ingest.url(), "");
    // No daemon: `exec --wait` holds the stream itself and closes it right after its result is
    // acknowledged, which is no interruption to tell watchers of.
    let mut exec = counting_exec(&home, &["--wait"]);
    let result_id = ingest.running_run().await;
    let watched = watch_to_end(tail(&ingest, &result_id).await, Duration::from_secs(30)).await;
    assert_lines_once_in_order(&watched.stdout_without_gaps(), LINES);
    assert!(
        watched
            .notices
            .iter()
            .all(|n| !n.message.contains("stream ended")),
        "{:?}",
        watched.notices
    );
    assert!(exec.wait().unwrap().success());
}

#[tokio::test]
async fn grpcurl_follows_a_run_and_refusals_say_what_it_takes() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let agent_token = add_token(&tokens, &[kanade_testkit::agent::TEST_PC_ID]);
    let reader = add_token(&tokens, &["--reader", "--name", "rita"]);
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, &agent_token).unwrap();
    let work = tempfile::tempdir().unwrap();
    let job = format!(
        "token_file = \"{}\"\n{}",
        token_file.display(),
        counting_job(work.path(), 10, "0.2", 0)
    );
    let home = AgentHome::new(&ingest.url(), &job);
    let _daemon = home.daemon();

    // Find the run with the reader token, then follow it as the README does.
    let header = format!("authorization: Bearer {reader}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let result_id = loop {
        let listed = grpcurl_over(
            &ingest,
            &["-plaintext", "-H", &header],
            Some(&json!({"states": ["EXECUTION_STATE_RUNNING"]})),
            &["kanade.v1.Activity/ListExecutions"],
        )
        .await
        .json();
        if let Some(id) = listed["executions"][0]["resultId"].as_str() {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "the run is never listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let request = json!({"result_id": result_id});
    let followed = grpcurl_over(
        &ingest,
        &["-plaintext", "-H", &header],
        Some(&request),
        &["kanade.v1.Control/TailExecution"],
    )
    .await;
    let messages = followed.messages();
    let (last, chunks) = messages.split_last().expect("grpcurl printed messages");
    let stdout: String = chunks
        .iter()
        .filter(|m| m["chunk"]["stream"] == "OUTPUT_STREAM_STDOUT")
        .map(|m| m["chunk"]["data"].as_str().unwrap())
        .collect();
    assert_lines_once_in_order(&stdout, 10);
    assert_eq!(
        last["finished"]["state"], "EXECUTION_STATE_SUCCEEDED",
        "{last}"
    );

    // Without a reader's token: refused, saying which one is needed.
    for (who, args) in [
        ("no token", vec!["-plaintext"]),
        ("an endpoint's token", vec!["-plaintext", "-H"]),
    ] {
        let mut args = args;
        let endpoint_header = format!("authorization: Bearer {agent_token}");
        if args.len() == 2 {
            args.push(&endpoint_header);
        }
        let (code, message) = grpcurl_over(
            &ingest,
            &args,
            Some(&request),
            &["kanade.v1.Control/TailExecution"],
        )
        .await
        .status();
        match who {
            "no token" => assert_eq!(code, "Unauthenticated", "{message}"),
            _ => {
                assert_eq!(code, "PermissionDenied", "{who}");
                assert!(message.contains("reader token"), "{who}: {message}");
            }
        }
    }
    // Control decides who may call per call: every method of it refuses an endpoint's token
    // (a method that forgot to check would let agents act).
    let endpoint_header = format!("authorization: Bearer {agent_token}");
    let methods = grpcurl_over(
        &ingest,
        &["-plaintext"],
        None,
        &["list", "kanade.v1.Control"],
    )
    .await
    .names()
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    assert!(methods.len() >= 2, "{methods:?}");
    for method in methods {
        let method = method.replacen("kanade.v1.Control.", "kanade.v1.Control/", 1);
        let (code, message) = grpcurl_over(
            &ingest,
            &["-plaintext", "-H", &endpoint_header],
            Some(&request),
            &[&method],
        )
        .await
        .status();
        assert_eq!(code, "PermissionDenied", "{method}: {message}");
    }
    let unknown = json!({"result_id": uuid::Uuid::now_v7().to_string()});
    let (code, _) = grpcurl_over(
        &ingest,
        &["-plaintext", "-H", &header],
        Some(&unknown),
        &["kanade.v1.Control/TailExecution"],
    )
    .await
    .status();
    assert_eq!(code, "NotFound");
}

#[tokio::test]
async fn the_console_shows_a_running_runs_output_live_as_text_then_its_final_state() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let work = tempfile::tempdir().unwrap();
    let d = work.path().display();
    // Numbered lines, a hostile line among them, on both streams, until the test says stop.
    let job = format!(
        r#"
[[job]]
manifest_id = "counter"
command = ["sh", "-c", "if [ -e {d}/fired ]; then exit 0; fi; touch {d}/fired; echo '<script>window.pwned=1</script><img src=x onerror=window.pwned=2>'; i=1; while [ ! -e {d}/stop ] && [ $i -le 300 ]; do echo \"line $i\"; echo \"warn $i\" >&2; i=$((i+1)); sleep 0.2; done"]
every = "1s"
"#
    );
    let home = AgentHome::new(&ingest.url(), &job);
    let _daemon = home.daemon();
    let result_id = ingest.running_run().await;

    let browser = kanade_testkit::Browser::start(1280, 900).await;
    browser
        .client
        .goto(&format!("{}/runs/{result_id}", ingest.console_url()))
        .await
        .unwrap();
    browser
        .wait_for_text("line 5", Duration::from_secs(10))
        .await;
    let page = browser.text().await;
    assert!(page.contains("no result yet"), "still running: {page}");
    assert!(page.contains("warn 5"), "stderr too: {page}");
    let shown = browser.text_of("[data-tail-stream=stdout]").await;
    assert!(
        shown.starts_with("<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"),
        "hostile output is text: {shown}"
    );
    let injected = browser
        .client
        .execute(
            "return [window.pwned === undefined, document.querySelectorAll('[data-tail] script, [data-tail] img').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        injected,
        json!([true, 0]),
        "nothing in the output ran or became markup"
    );
    browser.screenshot("run-live-output").await;

    // The run ends: the page shows its final state and the outputs as stored.
    std::fs::write(work.path().join("stop"), "").unwrap();
    browser
        .wait_for_text("succeeded, exit code 0", Duration::from_secs(15))
        .await;
    // The stored output, whole and in order. How many lines follow "line 5" depends on when the
    // script saw the stop file (and the browser trims the text's last newline), so the check ends
    // at the last line the page showed while the run was live.
    let stdout = browser.text_of("#out-stdout").await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.get(1..6),
        Some(&["line 1", "line 2", "line 3", "line 4", "line 5"][..]),
        "{stdout}"
    );
    eventually(
        Duration::from_secs(5),
        "the live panel goes away",
        || async {
            !browser
                .client
                .find(fantoccini::Locator::Css("[data-tail]"))
                .await
                .unwrap()
                .is_displayed()
                .await
                .unwrap()
        },
    )
    .await;
    browser.screenshot("run-live-output-finished").await;
    browser.close().await;
}

#[tokio::test]
async fn an_open_tail_ends_with_unavailable_when_ingest_shuts_down_and_holds_nothing_up() {
    let db = TestDb::sqlite();
    let mut ingest = TestIngest::builder(&db.url)
        .args(&["--shutdown-timeout", "20s"])
        .start()
        .await;
    let work = tempfile::tempdir().unwrap();
    let home = AgentHome::new(&ingest.url(), &counting_job(work.path(), 300, "0.2", 0));
    let _daemon = home.daemon();
    let result_id = ingest.running_run().await;
    let Tail(mut stream, _client) = tail(&ingest, &result_id).await;
    // It follows the run…
    loop {
        if let Some(Event::Chunk(_)) = stream.message().await.unwrap().unwrap().event {
            break;
        }
    }
    // …until ingest is told to stop: the call ends at once, saying why, and ingest is gone
    // long before its shutdown timeout.
    let began = Instant::now();
    let (ended, exited) = tokio::join!(
        async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        },
        ingest.terminate()
    );
    let status = ended.expect_err("the tail ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    assert!(exited, "ingest exited cleanly");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with a tail open",
        began.elapsed()
    );
}
