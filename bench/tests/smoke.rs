//! CI runs every benchmark mode in a short smoke configuration: it proves the modes work and
//! print their machine-readable summary; the figures themselves are not asserted.

use std::process::Command;

use kanade_testkit::postgres_admin_url;

/// What a successful `kanade-bench` prints.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kanade-bench"))
        .args(args)
        .output()
        .expect("running kanade-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kanade-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `key=value` summary a mode prints last.
fn run(args: &[&str]) -> std::collections::BTreeMap<String, String> {
    let stdout = stdout_of(args);
    let last = stdout.lines().last().expect("a summary line");
    last.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn throughput_delivers_every_event_and_measures_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bench.csv");
    let admin = postgres_admin_url();
    let s = run(&[
        "throughput",
        "--database-url",
        &admin,
        "--agents",
        "3",
        "--runs",
        "20",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(
        (s["mode"].as_str(), s["shape"].as_str()),
        ("throughput", "separated")
    );
    assert_eq!(s["events"], "120");
    assert!(s["events_per_s"].parse::<f64>().unwrap() > 0.0);
    assert!(s["ratio"].parse::<f64>().unwrap() > 0.0, "{s:?}");
    assert!(
        s["ceiling_back_to_back"].parse::<f64>().unwrap() > 0.0,
        "{s:?}"
    );
    assert!(
        s["ceiling_out_of_order"].parse::<f64>().unwrap() > 0.0,
        "{s:?}"
    );
    // 120 events may take less than one clock tick of PostgreSQL's CPU: only the field's form.
    assert!(s["pg_cpu_s_per_1k"].parse::<f64>().unwrap() >= 0.0, "{s:?}");
    // Two replicas on one database: the same load against one first, for the ratio.
    let s = run(&[
        "throughput",
        "--database-url",
        &admin,
        "--shape",
        "back-to-back",
        "--agents",
        "4",
        "--runs",
        "10",
        "--replicas",
        "2",
        "--no-ceiling",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(s["events"], "80");
    assert!(s["replicas_ratio"].parse::<f64>().unwrap() > 0.0, "{s:?}");
    // A run's two events go through a real outbox together: back to back only.
    let refused = Command::new(env!("CARGO_BIN_EXE_kanade-bench"))
        .args(["throughput", "--database-url", "sqlite://x", "--outbox"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--shape back-to-back"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let s = run(&[
        "throughput",
        "--database-url",
        "sqlite://x",
        "--shape",
        "back-to-back",
        "--agents",
        "2",
        "--runs",
        "10",
        "--outbox",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(s["events"], "40");
    assert_eq!(s["ratio"], "na");
    let png = dir.path().join("plot.png");
    let s = run(&[
        "plot",
        "--csv",
        csv.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert_eq!(s["mode"], "plot");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

#[test]
fn connections_open_idle_streams_and_survive_a_restart() {
    let s = run(&[
        "connections",
        "--streams",
        "20",
        "--idle",
        "0s",
        "--settle",
        "100ms",
    ]);
    assert_eq!(s["mode"], "connections");
    assert_eq!(s["failed"], "0");
}

#[test]
fn storm_commits_every_backlog_after_an_outage() {
    let admin = postgres_admin_url();
    let s = run(&[
        "storm",
        "--database-url",
        &admin,
        "--agents",
        "200",
        "--events-per-agent",
        "20",
        "--outage",
        "2s",
        "--reconnect-max",
        "1s",
        "--stall-timeout",
        "30s",
    ]);
    assert_eq!(s["mode"], "storm");
    assert_eq!(s["events"], "4000");
    assert_eq!(
        s["refused_agents"], "200",
        "every agent tried during the outage: {s:?}"
    );
    assert_eq!(s["rows"], "2000");
    assert_eq!(s["finished"], "2000");
    assert_eq!(s["verified"], "true");
    assert!(s["agent_drain_max_s"].parse::<f64>().unwrap() > 0.0);
}

#[test]
fn agent_mode_measures_the_daemon_exec_and_outbox() {
    let s = run(&[
        "agent",
        "--idle-seconds",
        "1",
        "--execs",
        "2",
        "--enqueues",
        "5",
    ]);
    assert_eq!(s["mode"], "agent");
    assert!(s["enqueue_runs_per_s"].parse::<f64>().unwrap() > 0.0);
}

#[test]
fn cancel_times_cancels_through_both_replicas() {
    let s = run(&[
        "cancel",
        "--database-url",
        &postgres_admin_url(),
        "--cancels",
        "4",
    ]);
    assert_eq!(s["mode"], "cancel");
    for key in ["same_p99_ms", "other_p99_ms", "rpc_p50_ms"] {
        assert!(s[key].parse::<f64>().unwrap() > 0.0, "{key}: {s:?}");
    }
}

#[test]
fn tail_times_live_output_on_both_replicas_and_measures_its_cost() {
    let s = run(&[
        "tail",
        "--database-url",
        &postgres_admin_url(),
        "--lines",
        "5",
        "--cpu-seconds",
        "1",
        "--watched",
        "3",
        "--measure",
        "1s",
    ]);
    assert_eq!(s["mode"], "tail");
    for key in ["same_p99_ms", "other_p99_ms", "crossing_kib_s"] {
        assert!(s[key].parse::<f64>().unwrap() > 0.0, "{key}: {s:?}");
    }
}

#[test]
fn presence_counts_what_idle_streams_cost() {
    let s = run(&[
        "presence",
        "--database-url",
        &postgres_admin_url(),
        "--streams",
        "100",
        "--connections",
        "2",
        "--status-every",
        "1s",
        "--presence-every",
        "1s",
        "--window",
        "3s",
    ]);
    assert_eq!(
        (s["mode"].as_str(), s["streams"].as_str()),
        ("presence", "100")
    );
    assert!(s["statements_per_s"].parse::<f64>().unwrap() > 0.0, "{s:?}");
    assert!(s["rows_per_s"].parse::<f64>().unwrap() > 0.0, "{s:?}");
    assert!(
        s["pg_endpoint_rows_per_s"].parse::<f64>().unwrap() > 0.0,
        "{s:?}"
    );
}

#[test]
fn activity_times_every_case_on_a_small_table() {
    let out = stdout_of(&[
        "activity",
        "--database-url",
        &postgres_admin_url(),
        "--rows",
        "3000",
        "--calls",
        "3",
    ]);
    // Each case's line gives p50, p99, mean rows per call and calls (and says OVER TARGET when
    // its p99 is: a debug build on a busy machine may be; not asserted here).
    for (case, rows) in [
        ("all runs, newest first", "50.0"),
        ("state timed_out (no rows)", "0.0"),
        ("page 100 of all runs", "50.0"),
        ("get one run", "1.0"),
        ("summarize manifests, 24 h", "50.0"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("no line for {case}:\n{out}"));
        let fields: Vec<&str> = line[case.len()..].split_whitespace().collect();
        assert!(fields.len() >= 4, "{line}");
        assert_eq!((fields[2], fields[3]), (rows, "3"), "{line}");
    }
    assert!(out.contains("console /runs/{id}"), "{out}");
}

#[test]
fn indexes_measures_the_writes_with_and_without_each_index() {
    let s = run(&[
        "indexes",
        "--database-url",
        &postgres_admin_url(),
        "--runs",
        "1000",
        "--repeat",
        "1",
    ]);
    for key in [
        "all",
        "none",
        "execution_results_running",
        "execution_results_pc",
    ] {
        assert!(s[key].parse::<f64>().unwrap() > 0.0, "{key}: {s:?}");
    }
}

#[test]
fn memory_reads_ingest_under_a_burst() {
    let s = run(&[
        "memory",
        "--database-url",
        &postgres_admin_url(),
        "--agents",
        "4",
        "--runs",
        "1",
        "--output-bytes",
        "10000",
        "--settle",
        "1s",
    ]);
    assert_eq!(s["mode"], "memory");
    assert_eq!(s["events"], "8");
    assert!(s["peak_rss_mib"].parse::<f64>().unwrap() > 0.0, "{s:?}");
}

#[test]
fn retention_drops_two_days_while_a_writer_writes() {
    let s = run(&[
        "retention",
        "--database-url",
        &postgres_admin_url(),
        "--small-day",
        "10",
        "--large-day",
        "2000",
    ]);
    assert_eq!(s["mode"], "retention");
    assert_eq!(
        (s["small_rows"].as_str(), s["large_rows"].as_str()),
        ("10", "2000")
    );
    for key in [
        "small_ms",
        "large_ms",
        "small_stall_ms",
        "large_stall_ms",
        "rowwise_ms",
    ] {
        assert!(s[key].parse::<f64>().is_ok(), "{key}: {s:?}");
    }
}
