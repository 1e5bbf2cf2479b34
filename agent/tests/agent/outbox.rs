//! The durable outbox (SPEC §4): Started committed before spawn, runs of dead agent processes
//! reported INTERRUPTED exactly once, the size cap that cuts outputs but never drops events,
//! dead letters, and private files. Real `kanade-agent exec` processes share the outbox with
//! the test process, as they would with a daemon.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use kanade_agent::{config::Synchronous, data_dir::OUTBOX_FILE, outbox::Outbox};
use kanade_shared::wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus};
use nix::{sys::signal::Signal, unistd::Pid};

use kanade_testkit::{AgentHome, Run, agent::alive, eventually, workspace_binary};

/// Nothing listens there: `exec` without `--wait` only records into the outbox.
const NO_INGEST: &str = "http://127.0.0.1:9";
const DEFAULT_CAP: u64 = 512 * 1024 * 1024;

/// Every pending event, decoded and validated as ingest would.
pub async fn queued(outbox: &Outbox) -> Vec<Event> {
    outbox
        .pending(0, 100_000)
        .await
        .expect("reading the outbox")
        .into_iter()
        .map(|p| Event::try_from(p.event).expect("a pending event is valid"))
        .collect()
}

/// Every pending result.
pub async fn queued_results(outbox: &Outbox) -> Vec<ExecResult> {
    queued(outbox)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::Result(r) => Some(r),
            EventBody::Started(_) => None,
        })
        .collect()
}

fn started_of(events: &[Event], manifest: &str) -> EventStarted {
    events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Started(s) if s.manifest_id == manifest => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Started event for {manifest} in {events:?}"))
}

/// A `kanade-agent exec` whose script (`sleep 30`, in a process group of its own) is still
/// running. Dropping it SIGKILLs the agent and the script's group, whatever the test did.
struct RunningExec {
    agent: Child,
    pid_file: PathBuf,
}

impl RunningExec {
    fn start(home: &AgentHome, manifest: &str) -> RunningExec {
        let pid_file = home.dir.path().join(format!("{manifest}.pid"));
        let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
        let agent = home
            .command(&["exec", "--manifest", manifest, "--", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kanade-agent exec");
        RunningExec { agent, pid_file }
    }

    /// Waits until the run is journaled and its script runs.
    async fn wait_running(&self, outbox: &Outbox) {
        eventually(
            Duration::from_secs(10),
            "the run is journaled and its script runs",
            || async {
                outbox.status().await.unwrap().running_runs == 1 && self.script_pid().is_some()
            },
        )
        .await;
    }

    fn script_pid(&self) -> Option<i32> {
        fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for RunningExec {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        if let Some(pid) = self.script_pid().filter(|&pid| alive(pid)) {
            // The script leads its own process group (the runner's process_group(0)).
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[tokio::test]
async fn started_is_committed_before_the_process_is_spawned() {
    let home = AgentHome::new(NO_INGEST, "");
    // The script looks for its own run in the outbox and in the run journal.
    let script = "import os, sqlite3, sys\n\
                  db = sqlite3.connect(sys.argv[1])\n\
                  rid = os.environ['KANADE_RESULT_ID']\n\
                  q = 'SELECT COUNT(*) FROM {} WHERE result_id = ?'\n\
                  print(db.execute(q.format(\"outbox\") + \" AND kind = 'started'\", (rid,)).fetchone()[0])\n\
                  print(db.execute(q.format('runs'), (rid,)).fetchone()[0])\n";
    let db = home.data_dir().join(OUTBOX_FILE);
    let output = home.exec(
        &[],
        "observer",
        &["python3", "-c", script, db.to_str().unwrap()],
    );
    assert!(output.status.success(), "{output:?}");

    let results = queued_results(&home.outbox().await).await;
    let [result] = results.as_slice() else {
        panic!("expected one result, got {results:?}");
    };
    assert_eq!(result.status, ExecStatus::Succeeded, "{}", result.stderr);
    assert_eq!(
        result.stdout, "1\n1\n",
        "the child saw (Started rows, journal rows) for its own run"
    );
}

#[tokio::test]
async fn a_run_whose_agent_was_killed_is_reported_interrupted_once_by_the_next_exec() {
    let home = AgentHome::new(NO_INGEST, "");
    let outbox = home.outbox().await;
    let mut running = RunningExec::start(&home, "crashes");
    running.wait_running(&outbox).await;
    let started = started_of(&queued(&outbox).await, "crashes");

    running.agent.kill().unwrap(); // SIGKILL: no chance to clean up.
    running.agent.wait().unwrap();
    // The orphaned script still runs (its group is its own): the run's lock must be free anyway.
    let orphan = running.script_pid().unwrap();
    assert!(alive(orphan), "the orphaned script is still running");

    let next = home.exec(&[], "after", &["true"]);
    assert!(next.status.success(), "{next:?}");

    let events = queued(&outbox).await;
    let for_run: Vec<&ExecResult> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Result(r) if r.result_id == started.result_id => Some(r),
            _ => None,
        })
        .collect();
    let [interrupted] = for_run.as_slice() else {
        panic!("expected exactly one result for the killed run, got {for_run:?}");
    };
    assert_eq!(interrupted.status, ExecStatus::Interrupted);
    assert_eq!(interrupted.exit_code, None);
    assert_eq!(
        (interrupted.stdout.as_str(), interrupted.stderr.as_str()),
        ("", "")
    );
    assert_eq!(
        (
            interrupted.stdout_dropped_bytes,
            interrupted.stderr_dropped_bytes
        ),
        (0, 0)
    );
    assert_eq!(interrupted.started_at, started.started_at);
    assert!(interrupted.finished_at >= interrupted.started_at);
    assert_eq!(
        (
            interrupted.pc_id.as_str(),
            interrupted.manifest_id.as_str(),
            interrupted.request_id.as_str(),
            interrupted.exec_id.as_str()
        ),
        (
            started.pc_id.as_str(),
            started.manifest_id.as_str(),
            started.request_id.as_str(),
            started.exec_id.as_str()
        )
    );
    let after = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Result(r) if r.manifest_id == "after" => Some(r),
            _ => None,
        })
        .expect("the next exec's own run is recorded");
    assert_eq!(after.status, ExecStatus::Succeeded);

    // Exactly once: the claim removed the run from the journal.
    assert_eq!(outbox.recover_interrupted().await.unwrap(), 0);
    assert_eq!(outbox.status().await.unwrap().running_runs, 0);
    assert_eq!(queued(&outbox).await.len(), events.len());
}

#[tokio::test]
async fn a_run_whose_agent_is_alive_is_not_reported_interrupted() {
    let home = AgentHome::new(NO_INGEST, "");
    let outbox = home.outbox().await;
    let mut running = RunningExec::start(&home, "long");
    running.wait_running(&outbox).await;

    assert_eq!(outbox.recover_interrupted().await.unwrap(), 0);
    // Another agent process (the next exec also checks at start) leaves it alone too.
    let other = home.exec(&[], "other", &["true"]);
    assert!(other.status.success(), "{other:?}");
    assert_eq!(outbox.status().await.unwrap().running_runs, 1);
    assert!(
        queued_results(&outbox)
            .await
            .iter()
            .all(|r| r.status != ExecStatus::Interrupted),
        "a live run was reported INTERRUPTED"
    );

    // Ended by a signal to its agent, the run gets its real result, not INTERRUPTED.
    kanade_testkit::agent::signal(running.agent.id(), "TERM");
    let status = running.agent.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    let results = queued_results(&outbox).await;
    let long: Vec<_> = results.iter().filter(|r| r.manifest_id == "long").collect();
    let [long] = long.as_slice() else {
        panic!("expected one result for the long run, got {results:?}");
    };
    assert_eq!(long.status, ExecStatus::Killed);
    assert_eq!(outbox.status().await.unwrap().running_runs, 0);
}

#[tokio::test]
async fn concurrent_recoveries_report_each_dead_run_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), Synchronous::Full, DEFAULT_CAP)
        .await
        .unwrap();
    let mut dead = Vec::new();
    for _ in 0..20 {
        let run = Run::new("pc-race");
        // Releasing the run's lock with its row still journaled is what a dead process leaves.
        let (lock, _) = outbox
            .begin_run(&run.started(), &BTreeMap::new())
            .await
            .unwrap();
        drop(lock);
        dead.push(run.result_id);
    }

    let mut recoverers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let dir = dir.path().to_path_buf();
        recoverers.spawn(async move {
            let outbox = Outbox::open(&dir, Synchronous::Full, DEFAULT_CAP)
                .await
                .unwrap();
            outbox.recover_interrupted().await.unwrap()
        });
    }
    let recovered: usize = recoverers.join_all().await.into_iter().sum();

    assert_eq!(recovered, dead.len());
    let results = queued_results(&outbox).await;
    for result_id in &dead {
        let reports = results.iter().filter(|r| &r.result_id == result_id).count();
        assert_eq!(reports, 1, "run {result_id} reported {reports} times");
    }
    assert!(results.iter().all(|r| r.status == ExecStatus::Interrupted));
    assert_eq!(outbox.status().await.unwrap().running_runs, 0);
}

/// A result for `run` whose stdout is `HEAD-i`, `len` bytes of filler, `TAIL-i`.
fn big_result(run: &Run, i: usize, len: usize) -> ExecResult {
    ExecResult {
        stdout: format!("HEAD-{i}{}TAIL-{i}", "x".repeat(len)),
        stderr: format!("stderr of run {i}"),
        ..run.result(ExecStatus::Failed, Some(i as i32 + 1))
    }
}

async fn record(outbox: &Outbox, run: &Run, result: ExecResult) {
    let trace_context = BTreeMap::new();
    let (lock, _) = outbox
        .begin_run(&run.started(), &trace_context)
        .await
        .unwrap();
    outbox
        .finish_run(lock, result, &trace_context)
        .await
        .unwrap();
}

/// Checks that `events` are exactly each run's Started then its result, and that every result
/// kept its metadata, its stderr, its head and its tail, with the cut counted to the byte.
fn assert_all_kept(events: &[Event], runs: &[(Run, ExecResult)]) {
    assert_eq!(events.len(), 2 * runs.len(), "an event was dropped");
    for (pair, (run, sent)) in events.chunks(2).zip(runs) {
        let EventBody::Started(s) = &pair[0].body else {
            panic!("expected Started, got {:?}", pair[0]);
        };
        assert_eq!(s, &run.started());
        let EventBody::Result(r) = &pair[1].body else {
            panic!("expected a result, got {:?}", pair[1]);
        };
        let kept = ExecResult {
            stdout: sent.stdout.clone(),
            stdout_dropped_bytes: 0,
            ..r.clone()
        };
        assert_eq!(&kept, sent, "metadata or stderr changed");
        let (head, tail) = sent.stdout.split_once('x').unwrap();
        let tail = tail.trim_start_matches('x');
        assert!(r.stdout.starts_with(head) && r.stdout.ends_with(tail));
        assert_eq!(
            r.stdout.len() as u64 + r.stdout_dropped_bytes,
            sent.stdout.len() as u64,
            "kept + dropped == original"
        );
    }
}

#[tokio::test]
async fn results_bigger_than_the_outbox_cap_are_cut_but_every_event_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 * 1024;
    let outbox = Outbox::open(dir.path(), Synchronous::Full, cap)
        .await
        .unwrap();
    let mut runs = Vec::new();
    for i in 0..5 {
        let run = Run::new("pc-cap");
        let result = big_result(&run, i, 100 * 1024);
        record(&outbox, &run, result.clone()).await;
        runs.push((run, result));
    }

    let events = queued(&outbox).await;
    assert_all_kept(&events, &runs);
    for e in &events {
        if let EventBody::Result(r) = &e.body {
            assert!(
                r.stdout_dropped_bytes > 0,
                "a 100 KiB output was kept whole"
            );
        }
    }
    // `bytes` are the queued events' JSON sizes, which the cap bounds.
    let status = outbox.status().await.unwrap();
    assert!(
        status.pending_bytes <= cap,
        "{} bytes queued over a {cap}-byte cap",
        status.pending_bytes
    );
}

#[tokio::test]
async fn queued_outputs_are_cut_to_make_room_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 * 1024;
    let outbox = Outbox::open(dir.path(), Synchronous::Full, cap)
        .await
        .unwrap();
    let mut runs = Vec::new();
    // Two results that fit whole, together just under the cap ...
    for i in 0..2 {
        let run = Run::new("pc-cap");
        let result = big_result(&run, i, 28 * 1024);
        record(&outbox, &run, result.clone()).await;
        runs.push((run, result));
    }
    assert!(
        queued_results(&outbox)
            .await
            .iter()
            .all(|r| r.stdout_dropped_bytes == 0),
        "test setup: the first two results should fit whole"
    );
    // ... then small ones that do not need cutting themselves but push the total over it.
    for i in 2..7 {
        let run = Run::new("pc-cap");
        let result = big_result(&run, i, 2 * 1024);
        record(&outbox, &run, result.clone()).await;
        runs.push((run, result));
    }

    let events = queued(&outbox).await;
    assert_all_kept(&events, &runs);
    let results = queued_results(&outbox).await;
    assert!(
        results[..2].iter().any(|r| r.stdout_dropped_bytes > 0),
        "no queued output was cut"
    );
    assert!(
        results[2..].iter().all(|r| r.stdout_dropped_bytes == 0),
        "small outputs were cut while big queued ones could be"
    );
    let status = outbox.status().await.unwrap();
    assert!(
        status.pending_bytes <= cap,
        "{} bytes queued over a {cap}-byte cap",
        status.pending_bytes
    );
}

#[tokio::test]
async fn event_metadata_is_never_dropped_even_when_nothing_is_left_to_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 1024;
    let outbox = Outbox::open(dir.path(), Synchronous::Full, cap)
        .await
        .unwrap();
    let mut runs = Vec::new();
    for i in 0..10 {
        let run = Run::new("pc-cap");
        let result = big_result(&run, i, 10);
        record(&outbox, &run, result.clone()).await;
        runs.push((run, result));
    }
    let events = queued(&outbox).await;
    assert_all_kept(&events, &runs);
    assert!(outbox.status().await.unwrap().pending_bytes > cap);
}

async fn raw_pool(dir: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join(OUTBOX_FILE).display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_undecodable_row_moves_to_the_dead_letters_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), Synchronous::Full, DEFAULT_CAP)
        .await
        .unwrap();
    let before = Run::new("pc-dead");
    let (lock, before_seq) = outbox
        .begin_run(&before.started(), &BTreeMap::new())
        .await
        .unwrap();
    drop(lock);
    let pool = raw_pool(dir.path()).await;
    let garbage_seq: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (result_id, kind, payload, bytes, enqueued_at) \
         VALUES ('garbage-run', 'result', '{\"seq\": not json', 18, 0) RETURNING seq",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    let after = Run::new("pc-dead");
    record(
        &outbox,
        &after,
        after.result(ExecStatus::Succeeded, Some(0)),
    )
    .await;

    let seqs = |pending: Vec<kanade_agent::outbox::Pending>| {
        pending.iter().map(|p| p.seq).collect::<Vec<_>>()
    };
    let first = seqs(outbox.pending(0, 100).await.unwrap());
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first[0], before_seq);
    assert!(!first.contains(&(garbage_seq as u64)));
    assert!(
        first[1] > garbage_seq as u64,
        "the valid events after it came out"
    );

    let letters = outbox.dead_letters().await.unwrap();
    let [letter] = letters.as_slice() else {
        panic!("expected one dead letter, got {letters:?}");
    };
    assert_eq!(letter.seq, garbage_seq);
    assert_eq!(letter.result_id, "garbage-run");
    assert!(letter.reason.contains("undecodable"), "{}", letter.reason);

    // It stays out of the queue; the rest stays in it.
    assert_eq!(seqs(outbox.pending(0, 100).await.unwrap()), first);
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending_events, status.dead_letters), (3, 1));
}

#[tokio::test]
async fn dead_letters_can_be_retried_and_purged() {
    let home = AgentHome::new(NO_INGEST, "");
    let outbox = home.outbox().await;
    let (retried, purged) = (Run::new("pc-test"), Run::new("pc-test"));
    record(
        &outbox,
        &retried,
        retried.result(ExecStatus::Succeeded, Some(0)),
    )
    .await;
    record(&outbox, &purged, purged.result(ExecStatus::Failed, Some(2))).await;
    let pending = outbox.pending(0, 100).await.unwrap();
    let result_seq = |run: &Run| {
        pending
            .iter()
            .find(|p| {
                matches!(&p.event.body, Some(kanade_shared::pb::event::Body::Result(r))
                    if r.result_id == run.result_id)
            })
            .unwrap()
            .seq
    };
    let last_seq = pending.last().unwrap().seq;
    outbox
        .dead_letter(result_seq(&retried), "refused: first")
        .await
        .unwrap();
    outbox
        .dead_letter(result_seq(&purged), "refused: second")
        .await
        .unwrap();
    assert_eq!(queued_results(&outbox).await, []);
    let letters = outbox.dead_letters().await.unwrap();
    let id_of = |run: &Run| {
        letters
            .iter()
            .find(|d| d.result_id == run.result_id)
            .unwrap()
            .id
    };
    let (retry_id, purge_id) = (id_of(&retried), id_of(&purged));
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .any(|d| d.reason == "refused: first" && d.kind == "result")
    );

    outbox.retry_dead_letter(retry_id).await.unwrap();
    let back = outbox.pending(last_seq, 100).await.unwrap();
    let [back] = back.as_slice() else {
        panic!("expected the retried event back at the end of the queue, got {back:?}");
    };
    let back = Event::try_from(back.event.clone()).unwrap();
    assert_eq!(
        back.body,
        EventBody::Result(retried.result(ExecStatus::Succeeded, Some(0)))
    );

    outbox.purge_dead_letter(purge_id).await.unwrap();
    assert!(outbox.dead_letters().await.unwrap().is_empty());
    assert!(
        queued_results(&outbox)
            .await
            .iter()
            .all(|r| r.result_id != purged.result_id),
        "a purged event came back"
    );

    for unknown in [purge_id, 424_242] {
        let err = outbox.purge_dead_letter(unknown).await.unwrap_err();
        assert!(format!("{err:#}").contains(&unknown.to_string()), "{err:#}");
        let err = outbox.retry_dead_letter(unknown).await.unwrap_err();
        assert!(format!("{err:#}").contains(&unknown.to_string()), "{err:#}");
    }
    let cli = home
        .command(&["dead-letters", "purge", "424242"])
        .output()
        .unwrap();
    assert_eq!(cli.status.code(), Some(125), "{cli:?}");
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("424242"),
        "{cli:?}"
    );
}

/// A retried dead letter must count the same bytes as before: the cap and the send window
/// are measured in bytes.
#[tokio::test]
async fn a_retried_dead_letter_keeps_its_byte_size() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), Synchronous::Full, DEFAULT_CAP)
        .await
        .unwrap();
    let run = Run::new("pc-dead");
    let result = ExecResult {
        stdout: "é".repeat(1000),
        ..run.result(ExecStatus::Succeeded, Some(0))
    };
    record(&outbox, &run, result).await;
    let original = outbox.pending(0, 100).await.unwrap().pop().unwrap();
    outbox.dead_letter(original.seq, "refused").await.unwrap();
    let id = outbox.dead_letters().await.unwrap()[0].id;
    outbox.retry_dead_letter(id).await.unwrap();
    let back = outbox
        .pending(original.seq, 100)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(back.bytes, original.bytes);
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every directory under `dir` is 0700 and every regular file 0600.
fn assert_private_tree(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let (path, kind) = (entry.path(), entry.file_type().unwrap());
        if kind.is_dir() {
            assert_private_tree(&path);
        } else if kind.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}

#[tokio::test]
async fn the_data_dir_is_0700_and_the_outbox_files_0600_whatever_the_umask() {
    let home = AgentHome::new(NO_INGEST, "");
    // Even an existing, world-readable data dir is restricted.
    fs::create_dir(home.data_dir()).unwrap();
    fs::set_permissions(home.data_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let config = home.config.display().to_string();
    let status = Command::new("sh")
        .args(["-c", "umask 000; exec \"$@\"", "sh"])
        .arg(workspace_binary("kanade-agent"))
        .args(["exec", "--config", &config, "--manifest", "files", "--"])
        .args(["sh", "-c", "exit 0"])
        .status()
        .unwrap();
    assert!(status.success());

    let data = home.data_dir();
    assert_eq!(mode(&data.join(OUTBOX_FILE)), 0o600);
    assert_private_tree(&data);
    // A fresh data dir, parents included, is created private too.
    let nested = home.dir.path().join("fresh/data");
    let outbox = Outbox::open(&nested, Synchronous::Full, DEFAULT_CAP)
        .await
        .unwrap();
    queued(&outbox).await;
    assert_private_tree(&nested);
}

/// Fills `disk` until about `left` bytes are free (a filler file next to the data dir).
fn fill_until(disk: &kanade_testkit::SmallDisk, left: u64) {
    let free = nix::sys::statvfs::statvfs(disk.path()).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    let filler = disk.path().join(format!("filler-{}", uuid::Uuid::new_v4()));
    fs::write(&filler, vec![0u8; free.saturating_sub(left) as usize]).unwrap();
}

/// SPEC §12, agent disk full, step by step on a 2 MiB disk: a result that no longer fits is
/// recorded with its outputs cut (the reserve gives the room, the dropped bytes are counted) and
/// the run exits with its own code; on a disk with no room at all no run starts; a result
/// whose disk is taken entirely mid-run is recorded cut or the exec exits 125 saying it is not.
/// Once space is freed everything drains: every run one row at ingest, finished, none running.
#[tokio::test]
async fn a_full_disk_never_reports_success_for_an_unrecorded_result_and_drains_when_freed() {
    let disk = kanade_testkit::SmallDisk::mount("2m");
    let db = kanade_testkit::TestDb::sqlite();
    let ingest_addr = kanade_testkit::free_addr();
    let home = AgentHome::with_data_dir(
        &format!("http://{ingest_addr}"),
        "",
        Some(disk.path().join("data")),
    );
    let run = |exec_id: &str, argv: &[&str]| {
        let out = home.exec(&["--quiet", "--exec-id", exec_id], "full", argv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("disk I/O error"),
            "SQLite's words: {stderr}"
        );
        (out.status.code(), stderr)
    };
    assert_eq!(run("first", &["true"]).0, Some(0));

    // Room for a Started, not for a 675 KB result: the reserve's room and cut outputs.
    fill_until(&disk, 150 * 1024);
    let script = "head -c 500000 /dev/urandom | base64";
    let (code, stderr) = run("cut", &["sh", "-c", script]);
    assert_eq!(code, Some(0), "{stderr}");

    // With the disk taken entirely, nothing starts (it could not be recorded).
    disk.fill();
    let marker = home.dir.path().join("ran");
    let (code, stderr) = run("refused", &["touch", marker.to_str().unwrap()]);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("the run is not started: the disk holding")
            && stderr.contains("is full (")
            && stderr.contains("bytes free)"),
        "{stderr}"
    );
    assert!(!marker.exists(), "a refused run never runs");

    // A run that started with its reserve, and whose disk is then taken entirely (the reserve
    // too): its result is recorded cut if any room turns up, else the exec says it is not.
    disk.resize("3m");
    let go = home.dir.path().join("go");
    let running = home.dir.path().join("running");
    let exec = home
        .command(&[
            "exec",
            "--quiet",
            "--exec-id",
            "lost",
            "--manifest",
            "full",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "echo output; touch {}; while [ ! -e {} ]; do sleep 0.05; done",
            running.display(),
            go.display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the run started", || async {
        running.exists()
    })
    .await;
    fs::remove_file(disk.path().join("data").join("outbox.reserve")).unwrap();
    disk.fill();
    fs::write(&go, "").unwrap();
    let out = exec.wait_with_output().unwrap();
    let lost_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // SQLite may still find room (closing the failed connection frees its -shm and WAL), in
    // which case the cut result is recorded; if not, the exec says so. Never 0 without it.
    let lost_code = out.status.code();
    match lost_code {
        Some(0) => {}
        Some(125) => assert!(
            lost_stderr.contains("is not recorded") && lost_stderr.contains("INTERRUPTED"),
            "{lost_stderr}"
        ),
        other => panic!("exit {other:?}: {lost_stderr}"),
    }

    // Space comes back: everything drains.
    disk.resize("64m");
    for filler in fs::read_dir(disk.path()).unwrap().flatten() {
        if filler.file_name().to_string_lossy().starts_with("filler") {
            fs::remove_file(filler.path()).unwrap();
        }
    }
    let _ingest = kanade_testkit::TestIngest::builder(&db.url)
        .listen(ingest_addr)
        .start()
        .await;
    let out = home.exec(
        &["--wait", "--wait-timeout", "30s", "--exec-id", "after"],
        "full",
        &["true"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        home.outbox().await.status().await.unwrap().pending_events,
        0,
        "drained"
    );
    let all = db
        .store()
        .await
        .list(&kanade_ingest::store::ListQuery::all(
            kanade_testkit::now(),
            chrono::Duration::minutes(5),
            100,
        ))
        .await
        .unwrap();
    let row = |exec_id: &str| {
        let rows: Vec<_> = all.iter().filter(|r| r.exec_id == exec_id).collect();
        assert!(rows.len() <= 1, "{exec_id}: {rows:?}");
        rows.first()
            .map(|r| r.outcome.clone().expect("finished, not running"))
    };
    let cut = row("cut").expect("the cut result was recorded");
    assert_eq!(cut.status, ExecStatus::Succeeded);
    assert!(cut.stdout_dropped_bytes > 0, "cut to fit");
    let full_length: u64 = 500_000_u64.div_ceil(3) * 4 + (500_000_u64.div_ceil(3) * 4).div_ceil(76);
    assert_eq!(
        cut.stdout.len() as u64 + cut.stdout_dropped_bytes,
        full_length,
        "every byte kept or counted as dropped"
    );
    assert!(row("refused").is_none(), "a refused run is nowhere");
    let lost = row("lost").expect("reported either way");
    if lost_code == Some(0) {
        assert_eq!(lost.status, ExecStatus::Succeeded, "{lost_stderr}");
        assert_eq!(
            lost.stdout.len() as u64 + lost.stdout_dropped_bytes,
            "output\n".len() as u64
        );
    } else {
        assert_eq!(lost.status, ExecStatus::Interrupted, "{lost_stderr}");
    }
    for exec_id in ["first", "after"] {
        assert_eq!(row(exec_id).unwrap().status, ExecStatus::Succeeded);
    }
}

/// With no byte free at all (SQLite cannot even grow its `-shm` file), every command says the
/// disk is full, naming the directory, instead of "disk I/O error"; nothing runs.
#[tokio::test]
async fn a_completely_full_disk_is_named_by_every_command() {
    let disk = kanade_testkit::SmallDisk::mount("2m");
    let home = AgentHome::with_data_dir(NO_INGEST, "", Some(disk.path().join("data")));
    let first = home.exec(&["--quiet"], "before", &["true"]);
    assert!(first.status.success(), "{first:?}");
    disk.fill();
    let marker = home.dir.path().join("ran");
    let exec = home.exec(&[], "after", &["touch", marker.to_str().unwrap()]);
    let status = home.command(&["status"]).output().unwrap();
    for (what, out) in [("exec", &exec), ("status", &status)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{what}: {out:?}");
        assert!(
            stderr.contains(&format!("the disk holding {}", home.data_dir().display()))
                && stderr.contains("is full"),
            "{what}: {stderr}"
        );
        assert!(!stderr.contains("disk I/O error"), "{what}: {stderr}");
    }
    assert!(!marker.exists(), "nothing ran on a full disk");
}
