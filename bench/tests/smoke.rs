//! CI runs every benchmark mode in a short smoke configuration: it proves the modes work and
//! print their machine-readable summary; the figures themselves are not asserted.

use std::process::Command;

use kanade_testkit::postgres_admin_url;

fn run(args: &[&str]) -> std::collections::BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kanade-bench"))
        .args(args)
        .output()
        .expect("running kanade-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kanade-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
