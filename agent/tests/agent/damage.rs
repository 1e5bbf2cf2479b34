//! A damaged outbox (SPEC §12), four ways: garbage over the header, over the schema page, over
//! table pages, and a file cut in half. Every command names the file and says what to do; the
//! daemon logs one error and exits 65 instead of looping; `outbox check` finds it;
//! `outbox salvage` moves it aside, starts a fresh outbox with everything still readable, and
//! what it recovered reaches ingest.

use std::{
    fs::{self, OpenOptions},
    io::{Seek, SeekFrom, Write},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use kanade_agent::data_dir::OUTBOX_FILE;
use kanade_testkit::{AgentHome, TestDb, TestIngest, eventually, free_addr};
use sqlx::Connection;

const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy)]
enum Damage {
    Header,
    SchemaPage,
    TablePages,
    CutInHalf,
}

/// Garbage that is not a valid page of anything.
fn garbage(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 13) as u8 | 0x80).collect()
}

fn damage(file: &std::path::Path, how: Damage) {
    let len = fs::metadata(file).unwrap().len();
    let mut f = OpenOptions::new().write(true).open(file).unwrap();
    match how {
        Damage::Header => {
            f.write_all(&garbage(100)).unwrap();
        }
        Damage::SchemaPage => {
            f.seek(SeekFrom::Start(100)).unwrap();
            f.write_all(&garbage((PAGE - 100) as usize)).unwrap();
        }
        Damage::TablePages => {
            // Pages in the middle of the file: the queue's leaves, past the small tables' roots.
            let pages = len / PAGE;
            f.seek(SeekFrom::Start(pages / 2 * PAGE)).unwrap();
            f.write_all(&garbage(4 * PAGE as usize)).unwrap();
        }
        Damage::CutInHalf => f.set_len(len / PAGE / 2 * PAGE).unwrap(),
    }
}

/// An agent home whose outbox holds a run of a dead agent process and 60 finished runs with
/// some output, all checkpointed into the database file; then damaged `how`. The test process
/// itself never opens the outbox before the damage, so no cached page hides it.
async fn damaged_home(ingest: &str, how: Damage) -> AgentHome {
    let home = AgentHome::new(ingest, "");
    // A run whose agent dies mid-run: its journal entry stays behind.
    let pid_file = home.dir.path().join("dying.pid");
    let mut dying = home
        .command(&["exec", "--quiet", "--manifest", "dying", "--", "sh", "-c"])
        .arg(format!("echo $$ > {}; exec sleep 30", pid_file.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the dying run started", || async {
        fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))
    })
    .await;
    dying.kill().unwrap();
    dying.wait().unwrap();
    let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
    // The script has a process group of its own: end it too.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
    for n in 0..60 {
        let out = home.exec(
            &["--quiet", "--exec-id", &format!("e-{n}")],
            "filler",
            &["sh", "-c", "head -c 1500 /dev/zero | tr '\\0' x"],
        );
        assert!(out.status.success(), "{out:?}");
    }
    // Everything into the database file (the agents closed it; make sure).
    let file = home.data_dir().join(OUTBOX_FILE);
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    damage(&file, how);
    home
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The message every command gives for a damaged outbox.
fn names_the_file_and_the_way_out(text: &str, home: &AgentHome) -> bool {
    text.contains(&home.data_dir().join(OUTBOX_FILE).display().to_string())
        && text.contains("is damaged")
        && text.contains("kanade-agent outbox salvage")
}

async fn every_command_says_so_and_salvage_recovers(how: Damage) {
    let db = TestDb::sqlite();
    let ingest_addr = free_addr();
    let home = damaged_home(&format!("http://{ingest_addr}"), how).await;
    let _ingest = TestIngest::builder(&db.url)
        .listen(ingest_addr)
        .start()
        .await;

    let exec = home.exec(&[], "after", &["true"]);
    assert_eq!(exec.status.code(), Some(125), "{how:?} exec: {exec:?}");
    assert!(
        names_the_file_and_the_way_out(&stderr(&exec), &home),
        "{how:?}: {}",
        stderr(&exec)
    );
    // A command that meets the damage names it (one that reads only sound pages may work).
    let letters = home.command(&["dead-letters", "list"]).output().unwrap();
    assert!(
        letters.status.success() || names_the_file_and_the_way_out(&stderr(&letters), &home),
        "{how:?}: {letters:?}"
    );
    let status = home.command(&["status"]).output().unwrap();
    assert_eq!(status.status.code(), Some(1), "{how:?}: {status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("outbox:        damaged"));
    assert!(
        names_the_file_and_the_way_out(&stderr(&status), &home),
        "{how:?}"
    );
    let check = home.command(&["outbox", "check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(1), "{how:?}: {check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("DAMAGED"),
        "{how:?}: {check:?}"
    );

    // The daemon says it once and stops; it does not loop reconnecting.
    let mut daemon = home.daemon();
    let began = Instant::now();
    let code = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "{how:?}: the daemon kept running on a damaged outbox:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = daemon.log();
    assert_eq!(code, Some(65), "{how:?}:\n{log}");
    assert!(
        names_the_file_and_the_way_out(&log, &home),
        "{how:?}:\n{log}"
    );
    assert!(
        log.matches(" ERROR ").count() <= 3,
        "{how:?}: errors repeat:\n{log}"
    );
    assert!(
        !log.contains("stream to ingest failed"),
        "{how:?}: it looped:\n{log}"
    );

    // Salvage: the damaged file kept, a fresh outbox with what could still be read.
    let salvage = home.command(&["outbox", "salvage"]).output().unwrap();
    let said = String::from_utf8_lossy(&salvage.stdout).into_owned();
    assert!(salvage.status.success(), "{how:?}: {salvage:?}");
    let kept: Vec<_> = fs::read_dir(home.data_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.damaged-")
        })
        .collect();
    assert!(!kept.is_empty(), "{how:?}: the damaged file is kept");
    assert!(
        said.contains("moved the damaged outbox to"),
        "{how:?}: {said}"
    );
    let recovered: u64 = said
        .split("recovered ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{how:?}: no count in {said}"));
    match how {
        Damage::Header | Damage::SchemaPage => assert_eq!(recovered, 0, "{how:?}: {said}"),
        Damage::TablePages | Damage::CutInHalf => {
            assert!(recovered > 0, "{how:?}: {said}");
            assert!(
                said.contains("could not be read: events"),
                "{how:?}: {said}"
            );
        }
    }
    let check = home.command(&["outbox", "check"]).output().unwrap();
    assert!(
        check.status.success(),
        "{how:?}: the fresh outbox is sound: {check:?}"
    );
    let fresh = home.outbox().await.status().await.unwrap();
    assert!(
        fresh.pending_events >= recovered,
        "{how:?}: {fresh:?} after {said}"
    );

    // What was recovered reaches ingest, and the outbox works again.
    let out = home.exec(
        &["--wait", "--wait-timeout", "30s", "--exec-id", "after"],
        "m",
        &["true"],
    );
    assert!(out.status.success(), "{how:?}: {out:?}");
    assert_eq!(
        home.outbox().await.status().await.unwrap().pending_events,
        0
    );
    let rows = db
        .store()
        .await
        .list(&kanade_ingest::store::ListQuery::all(
            kanade_testkit::now(),
            chrono::Duration::minutes(5),
            500,
        ))
        .await
        .unwrap();
    assert!(
        rows.len() as u64 > recovered.div_ceil(2),
        "{how:?}: {} rows for {recovered} recovered events",
        rows.len()
    );
}

#[tokio::test]
async fn garbage_over_the_header() {
    every_command_says_so_and_salvage_recovers(Damage::Header).await;
}

#[tokio::test]
async fn garbage_over_the_schema_page() {
    every_command_says_so_and_salvage_recovers(Damage::SchemaPage).await;
}

#[tokio::test]
async fn garbage_over_table_pages() {
    every_command_says_so_and_salvage_recovers(Damage::TablePages).await;
}

#[tokio::test]
async fn a_file_cut_in_half() {
    every_command_says_so_and_salvage_recovers(Damage::CutInHalf).await;
}

#[tokio::test]
async fn a_sound_outbox_checks_ok_and_salvage_refuses_while_a_daemon_runs() {
    let home = AgentHome::new(&format!("http://{}", free_addr()), "");
    assert!(home.exec(&["--quiet"], "m", &["true"]).status.success());
    let check = home.command(&["outbox", "check"]).output().unwrap();
    assert!(check.status.success(), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains(": ok (2 event(s) pending"));
    let _daemon = home.daemon();
    eventually(
        Duration::from_secs(10),
        "the daemon holds the sender lock",
        || async {
            String::from_utf8_lossy(&home.command(&["status"]).output().unwrap().stdout)
                .contains("a kanade-agent process holds the sender lock")
        },
    )
    .await;
    let salvage = home.command(&["outbox", "salvage"]).output().unwrap();
    assert_eq!(salvage.status.code(), Some(125), "{salvage:?}");
    assert!(stderr(&salvage).contains("stop it first"), "{salvage:?}");
    assert!(
        home.data_dir().join(OUTBOX_FILE).exists(),
        "nothing was moved"
    );
}
