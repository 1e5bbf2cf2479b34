//! The runner against real child processes: exit codes, signals, timeouts that end whole
//! process trees, cancellation, output capture and the environment a script sees (SPEC §4).
//!
//! Most tests call [`run_process`] directly; where the exit code of `kanade-agent exec` or the
//! agent process's own environment matters, they run the real binary.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use kanade_agent::runner::{
    Echo, ProcessOutcome, ProcessSpec, RunOutput, SpawnFailure, Stops, run_process,
};
use kanade_shared::wire::ExecStatus;
use tokio_util::sync::CancellationToken;

use kanade_testkit::{AgentHome, agent::alive, eventually};

use crate::outbox::queued_results;

/// Nothing listens there: `exec` without `--wait` only records into the outbox.
const NO_INGEST: &str = "http://127.0.0.1:9";
const KILL_GRACE: Duration = Duration::from_millis(300);
const CAP: usize = 1024 * 1024;

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// How a test runs `argv`: no extra environment, nothing echoed.
fn spec(argv: &[String], timeout: Option<Duration>, cap: usize) -> ProcessSpec<'_> {
    ProcessSpec {
        argv,
        env: &[],
        timeout,
        output: RunOutput::new(cap),
        kill_grace: KILL_GRACE,
        echo: Echo::Nothing,
    }
}

/// Nothing that ends the run before it ends by itself.
fn never() -> Stops<'static> {
    static NEVER: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();
    let never = NEVER.get_or_init(CancellationToken::new);
    Stops {
        kill: never,
        cancel: never,
    }
}

/// Runs `args` with no extra environment, and nothing stopping it.
async fn run(args: &[&str], timeout: Option<Duration>, cap: usize) -> ProcessOutcome {
    run_process(spec(&argv(args), timeout, cap), never()).await
}

/// A shell script whose child forks a grandchild that ignores TERM and writes its pid to
/// `pid_file`; the child waits for it.
fn tree_with_a_term_ignoring_grandchild(pid_file: &Path) -> Vec<String> {
    let script = format!(
        r#"sh -c 'trap "" TERM; echo $$ > {}; sleep 60' & wait"#,
        pid_file.display()
    );
    argv(&["sh", "-c", &script])
}

/// Waits for the grandchild to have written its pid.
async fn grandchild_pid(pid_file: &Path) -> i32 {
    eventually(
        Duration::from_secs(5),
        "the grandchild writes its pid",
        || async {
            std::fs::read_to_string(pid_file).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
        },
    )
    .await;
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn assert_gone(pid: i32) {
    eventually(
        Duration::from_secs(3),
        &format!("grandchild {pid} to be gone"),
        || async move { !alive(pid) },
    )
    .await;
}

#[tokio::test]
async fn exit_codes_pass_through_and_zero_is_success() {
    let ok = run(&["sh", "-c", "exit 0"], None, CAP).await;
    assert_eq!(ok.status, ExecStatus::Succeeded);
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.shell_exit_code(), 0);

    let failed = run(&["sh", "-c", "exit 3"], None, CAP).await;
    assert_eq!(failed.status, ExecStatus::Failed);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.signal, None);
    assert_eq!(failed.shell_exit_code(), 3);
}

#[tokio::test]
async fn a_process_killed_by_a_signal_is_killed_without_exit_code_and_exits_128_plus_n() {
    let outcome = run(&["sh", "-c", "kill -9 $$"], None, CAP).await;
    assert_eq!(outcome.status, ExecStatus::Killed);
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.signal, Some(9));
    assert_eq!(outcome.shell_exit_code(), 137);
}

#[tokio::test]
async fn exec_returns_the_scripts_exit_code_or_128_plus_its_signal() {
    let home = AgentHome::new(NO_INGEST, "");
    let exited = home.exec(&[], "exit-3", &["sh", "-c", "exit 3"]);
    assert_eq!(exited.status.code(), Some(3), "{exited:?}");
    let killed = home.exec(&[], "kill-9", &["sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.status.code(), Some(137), "{killed:?}");

    let results = queued_results(&home.outbox().await).await;
    let status_of = |manifest: &str| {
        let r = results.iter().find(|r| r.manifest_id == manifest).unwrap();
        (r.status, r.exit_code)
    };
    assert_eq!(status_of("exit-3"), (ExecStatus::Failed, Some(3)));
    assert_eq!(status_of("kill-9"), (ExecStatus::Killed, None));
}

#[tokio::test]
async fn exec_exits_127_for_a_missing_command_and_126_for_a_file_that_is_not_executable() {
    let home = AgentHome::new(NO_INGEST, "");
    let missing = home.exec(&[], "missing", &["/nonexistent/kanade-no-such-command"]);
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("kanade-no-such-command"),
        "the agent says which command it could not run: {missing:?}"
    );

    let script = home.dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let denied = home.exec(&[], "denied", &[script.to_str().unwrap()]);
    assert_eq!(denied.status.code(), Some(126), "{denied:?}");

    let results = queued_results(&home.outbox().await).await;
    for manifest in ["missing", "denied"] {
        let r = results.iter().find(|r| r.manifest_id == manifest).unwrap();
        assert_eq!(r.status, ExecStatus::SpawnFailed, "{manifest}");
        assert_eq!(r.exit_code, None, "{manifest}");
        assert!(!r.stderr.is_empty(), "{manifest}: the reason is recorded");
    }
}

/// SPEC §12: what ingest would reject is refused at the command line, with the rule it broke,
/// and nothing is enqueued (the command does not even run).
#[tokio::test]
async fn exec_refuses_ids_ingest_would_reject_and_enqueues_nothing() {
    let home = AgentHome::new(NO_INGEST, "");
    let marker = home.dir.path().join("ran");
    let touch = ["touch", marker.to_str().unwrap()];
    let long_manifest = "m".repeat(129);
    let long_version = "v".repeat(129);
    for (flags, manifest, needle) in [
        (
            &[][..],
            long_manifest.as_str(),
            "--manifest: manifest_id is 129 bytes long, at most 128",
        ),
        (
            &["--version", &long_version][..],
            "ok",
            "--version: version is 129 bytes long",
        ),
        (
            &["--request-id", ""][..],
            "ok",
            "--request-id: request_id must not be empty",
        ),
        (
            &["--exec-id", &"e".repeat(200)][..],
            "ok",
            "--exec-id: exec_id is 200 bytes long",
        ),
    ] {
        let out = home.exec(flags, manifest, &touch);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!marker.exists(), "no refused command ran");
    let status = home.outbox().await.status().await.unwrap();
    assert_eq!(status.pending_events, 0, "nothing was enqueued");
}

#[tokio::test]
async fn spawn_failures_are_told_apart() {
    let missing = run(&["/nonexistent/kanade-no-such-command"], None, CAP).await;
    assert_eq!(missing.status, ExecStatus::SpawnFailed);
    assert_eq!(missing.spawn_failure, Some(SpawnFailure::NotFound));
    assert_eq!(missing.shell_exit_code(), 127);

    let empty = run(&[], None, CAP).await;
    assert_eq!(empty.status, ExecStatus::SpawnFailed);
    assert_eq!(empty.shell_exit_code(), 125);
}

#[tokio::test]
async fn timeout_kills_the_whole_tree_including_a_grandchild_that_ignores_term() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let began = Instant::now();
    let argv = tree_with_a_term_ignoring_grandchild(&pid_file);
    let outcome = run_process(spec(&argv, Some(Duration::from_secs(1)), CAP), never()).await;
    let took = began.elapsed();

    assert_eq!(outcome.status, ExecStatus::TimedOut);
    assert_eq!(outcome.exit_code, None);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "run_process returned after {took:?}"
    );
    assert_gone(grandchild_pid(&pid_file).await).await;
}

/// Ends a tree with a TERM-ignoring grandchild by `kill` (the agent stopping) or `cancel` (an
/// operator), once the tree is complete, so it proves the grandchild is ended too.
async fn end_the_tree(by_operator: bool) -> ProcessOutcome {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let (kill, cancel) = (CancellationToken::new(), CancellationToken::new());
    let argv = tree_with_a_term_ignoring_grandchild(&pid_file);
    let began = Instant::now();
    let run = run_process(
        spec(&argv, None, CAP),
        Stops {
            kill: &kill,
            cancel: &cancel,
        },
    );
    tokio::pin!(run);
    let pid = tokio::select! {
        pid = grandchild_pid(&pid_file) => pid,
        outcome = &mut run => panic!("the run ended by itself: {outcome:?}"),
    };
    if by_operator { &cancel } else { &kill }.cancel();
    let outcome = run.await;
    let took = began.elapsed();
    assert_eq!(outcome.exit_code, None);
    assert!(
        took < Duration::from_secs(5),
        "run_process returned after {took:?}"
    );
    assert_gone(pid).await;
    outcome
}

#[tokio::test]
async fn the_agent_stopping_kills_the_whole_tree_and_reports_killed() {
    assert_eq!(end_the_tree(false).await.status, ExecStatus::Killed);
}

#[tokio::test]
async fn an_operator_cancel_kills_the_whole_tree_and_reports_cancelled() {
    let outcome = end_the_tree(true).await;
    assert_eq!(outcome.status, ExecStatus::Cancelled);
    assert_eq!(
        outcome.shell_exit_code(),
        128 + 15,
        "the script died of TERM"
    );
}

/// `text` is a head of `full` followed by a tail of `full`, each at least `min` bytes.
fn assert_head_and_tail(text: &str, full: &str, min: usize) {
    assert!(text.starts_with(&full[..min]), "head lost: {text:?}");
    assert!(
        text.ends_with(&full[full.len() - min..]),
        "tail lost: {text:?}"
    );
    let head = text
        .bytes()
        .zip(full.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        full.ends_with(&text[head..]),
        "the kept text is not a head plus a tail of the output: {text:?}"
    );
}

/// 10 000 numbered lines, each written and flushed alone; the last 50 paced so they reach the
/// agent as chunks far smaller than the cap.
const PACED_LINES: &str = r"import sys, time
for i in range(10000):
    sys.stdout.write(f'line {i:04}\n')
    sys.stdout.flush()
    if i >= 9950:
        time.sleep(0.002)
sys.stderr.write('small')
";

#[tokio::test]
async fn output_over_the_cap_keeps_head_and_tail_and_counts_the_dropped_middle() {
    let one_write = format!("HEAD{}TAIL", "x".repeat(100_000));
    let many_writes: String = (0..10_000).map(|i| format!("line {i:04}\n")).collect();
    let scripts = [
        (
            "import sys; sys.stdout.write('HEAD' + 'x' * 100000 + 'TAIL'); sys.stderr.write('small')",
            one_write,
        ),
        (PACED_LINES, many_writes),
    ];
    for (script, full) in scripts {
        let outcome = run(&["python3", "-c", script], None, 1000).await;
        assert_eq!(
            outcome.status,
            ExecStatus::Succeeded,
            "{:?}",
            outcome.stderr
        );
        let stdout = &outcome.stdout;
        assert!(
            stdout.text.len() <= 1000,
            "{} bytes kept",
            stdout.text.len()
        );
        assert_head_and_tail(&stdout.text, &full, 100);
        assert_eq!(
            stdout.dropped_bytes as usize,
            full.len() - stdout.text.len()
        );
        // The cap is per stream: a small stderr is kept whole.
        assert_eq!(outcome.stderr.text, "small");
        assert_eq!(outcome.stderr.dropped_bytes, 0);
    }
}

#[tokio::test]
async fn invalid_utf8_becomes_replacement_characters_and_nul_bytes_are_kept() {
    let script = r"import sys; sys.stdout.buffer.write(b'ok\xff\xfe\x00end'); sys.stderr.buffer.write(b'\xc3')";
    let outcome = run(&["python3", "-c", script], None, CAP).await;
    assert_eq!(outcome.status, ExecStatus::Succeeded);
    assert_eq!(outcome.stdout.text, "ok\u{FFFD}\u{FFFD}\0end");
    assert_eq!(outcome.stderr.text, "\u{FFFD}");
    assert_eq!(outcome.stdout.dropped_bytes, 0);
}

/// An output that fits the cap comes back exactly as written, whatever its characters.
#[tokio::test]
async fn output_under_the_cap_is_kept_exactly() {
    // 601 bytes under a 1000-byte cap; byte 500 (cap / 2) is the middle of an 'é'.
    let script = "import sys; sys.stdout.write('a' + 'é' * 300)";
    let outcome = run(&["python3", "-c", script], None, 1000).await;
    assert_eq!(outcome.stdout.dropped_bytes, 0);
    assert_eq!(outcome.stdout.text, format!("a{}", "é".repeat(300)));
}

/// Cutting valid UTF-8 must not invent replacement characters at the cut, nor go over the cap.
#[tokio::test]
async fn output_cut_keeps_multibyte_characters_whole() {
    // One ASCII byte first, so the head's cut (at cap / 2 bytes) falls inside an 'é'.
    let script = "import sys; sys.stdout.write('a' + 'é' * 100000)";
    let outcome = run(&["python3", "-c", script], None, 1000).await;
    let text = &outcome.stdout.text;
    assert!(text.starts_with('a'));
    assert!(
        text.chars().skip(1).all(|c| c == 'é'),
        "a replacement character was invented: {:?}",
        text.char_indices()
            .find(|&(_, c)| c == '\u{FFFD}')
            .map(|(i, _)| &text[i.saturating_sub(4)..i + 5])
    );
    assert!(text.len() <= 1000, "{} bytes kept", text.len());
    assert_eq!(
        outcome.stdout.dropped_bytes as usize,
        1 + 200_000 - text.len()
    );
}

#[tokio::test]
async fn the_script_sees_its_run_ids_but_not_the_agents_secrets() {
    let home = AgentHome::new(NO_INGEST, "");
    let output = home
        .command(&["exec", "--manifest", "env-check", "--", "env"])
        .env("KANADE_SECRET_TOKEN", "s3cret")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector.invalid:4317",
        )
        .env("KANADE_TEST_ORDINARY", "x")
        .env("ORDINARY_VARIABLE", "inherited")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let results = queued_results(&home.outbox().await).await;
    let [result] = results.as_slice() else {
        panic!("expected one result, got {results:?}");
    };
    let env: Vec<(&str, &str)> = result
        .stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let value = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);

    assert_eq!(value("KANADE_RESULT_ID"), Some(result.result_id.as_str()));
    assert_eq!(value("KANADE_MANIFEST_ID"), Some("env-check"));
    assert_eq!(value("ORDINARY_VARIABLE"), Some("inherited"));
    for (key, _) in &env {
        assert!(
            !key.starts_with("OTEL_"),
            "{key} leaked into the script's environment"
        );
        assert!(
            !key.starts_with("KANADE_") || ["KANADE_RESULT_ID", "KANADE_MANIFEST_ID"].contains(key),
            "{key} leaked into the script's environment"
        );
    }
    assert!(!result.stdout.contains("s3cret"));
}

#[tokio::test]
async fn binary_output_stays_within_the_cap_after_decoding() {
    // Every byte is invalid UTF-8 and decodes to a 3-byte U+FFFD.
    let out = run(
        &[
            "python3",
            "-c",
            "import sys; sys.stdout.buffer.write(bytes([0xff]) * 5000)",
        ],
        None,
        1000,
    )
    .await;
    assert_eq!(out.status, ExecStatus::Succeeded);
    assert!(
        out.stdout.text.len() <= 1000,
        "{} bytes",
        out.stdout.text.len()
    );
    assert!(out.stdout.text.chars().all(|c| c == '\u{FFFD}'));
    assert!(out.stdout.dropped_bytes > 0);
}

#[tokio::test]
async fn output_read_before_a_grandchild_holds_the_pipe_is_kept() {
    let started = std::time::Instant::now();
    let out = run(
        &["sh", "-c", "echo before; sleep 5 & echo after"],
        None,
        CAP,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for the grandchild"
    );
    assert_eq!(out.status, ExecStatus::Succeeded);
    assert_eq!(out.stdout.text, "before\nafter\n");
}
