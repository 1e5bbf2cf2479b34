//! PostgreSQL's day partitions (SPEC §15, Storage): keyed by result_id's mint time, so every
//! event of a run finds its row however late it comes; days dropped whole, never holding writers
//! up behind a busy table; days created ahead by replicas taking turns; a database made by the
//! previous release upgraded without losing a row.

use chrono::{Duration, NaiveDate, Utc};
use kanade_ingest::store::{DroppedDays, ExecutionRow, ListQuery, PostgresStore, RunWrite, Store};
use kanade_shared::wire::{EventBody, ExecStatus};
use kanade_testkit::{Run, TestDb, now, workspace_binary};
use uuid::Uuid;

const GRACE: Duration = Duration::minutes(5);

fn started(run: &Run) -> RunWrite {
    RunWrite::from_event(EventBody::Started(run.started())).unwrap()
}

fn finished(run: &Run) -> RunWrite {
    RunWrite::from_event(EventBody::Result(
        run.result(ExecStatus::Succeeded, Some(0)),
    ))
    .unwrap()
}

async fn postgres() -> (TestDb, PostgresStore) {
    let db = TestDb::postgres().await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    (db, store)
}

/// Which table holds a run's row.
async fn partition_of(store: &PostgresStore, result_id: &str) -> String {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM execution_results WHERE result_id = $1",
    )
    .bind(Uuid::parse_str(result_id).unwrap())
    .fetch_one(&store.pool())
    .await
    .unwrap()
}

async fn table_exists(store: &PostgresStore, name: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(&store.pool())
        .await
        .unwrap()
}

fn day_table(day: NaiveDate) -> String {
    format!("execution_results_p{}", day.format("%Y%m%d"))
}

async fn all_rows(store: &dyn Store) -> Vec<ExecutionRow> {
    store
        .list(&ListQuery::all(now(), GRACE, 500))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_result_days_after_its_start_finds_its_run_in_the_runs_day() {
    let (_db, store) = postgres().await;
    let start = now() - Duration::days(3);
    store.prepare_days(start.date_naive(), 3).await.unwrap();
    let run = Run::minted_at("pc-a", start);
    store.apply(&[started(&run)], start).await.unwrap();
    // The result comes three days later (an agent that was offline): same row, same partition.
    store.apply(&[finished(&run)], now()).await.unwrap();
    let rows = all_rows(&store).await;
    assert_eq!(rows.len(), 1, "one row per run");
    assert!(rows[0].outcome.is_some(), "finished");
    assert_eq!(
        rows[0].received_at, start,
        "received_at is when the run was first seen"
    );
    assert_eq!(
        partition_of(&store, &run.result_id).await,
        day_table(start.date_naive())
    );
    // A result first, its Started days later: the same.
    let late = Run::minted_at("pc-a", start);
    store.apply(&[finished(&late)], start).await.unwrap();
    store.apply(&[started(&late)], now()).await.unwrap();
    assert_eq!(all_rows(&store).await.len(), 2);
    // An id that is not a UUIDv7 (any UUID is valid) lives in the default partition.
    let mut foreign = Run::new("pc-a");
    foreign.result_id = Uuid::new_v4().to_string();
    store.apply(&[started(&foreign)], now()).await.unwrap();
    store.apply(&[finished(&foreign)], now()).await.unwrap();
    assert_eq!(
        partition_of(&store, &foreign.result_id).await,
        "execution_results_default"
    );
    assert_eq!(all_rows(&store).await.len(), 3);
}

#[tokio::test]
async fn old_days_are_dropped_whole_and_recent_ones_kept() {
    let (_db, store) = postgres().await;
    let old_day = now() - Duration::days(100);
    store.prepare_days(old_day.date_naive(), 2).await.unwrap();
    let mut old: Vec<RunWrite> = (0..3)
        .flat_map(|d| {
            (0..200).map(move |_| started(&Run::minted_at("pc-a", old_day + Duration::days(d))))
        })
        .collect();
    old.sort_by_key(|w| w.result_id);
    store.apply(&old, old_day).await.unwrap();
    let recent = Run::new("pc-a");
    store.apply(&[started(&recent)], now()).await.unwrap();

    let cutoff = now() - Duration::days(90);
    let swept = store.drop_days_before(cutoff).await.unwrap();
    let expected: Vec<NaiveDate> = (0..3)
        .map(|d| (old_day + Duration::days(d)).date_naive())
        .collect();
    assert_eq!(swept.dropped, expected);
    assert!(swept.postponed.is_empty());
    let rows = all_rows(&store).await;
    assert_eq!(rows.len(), 1, "the 600 old runs went with their days");
    assert_eq!(rows[0].result_id.to_string(), recent.result_id);
    for day in &expected {
        assert!(
            !table_exists(&store, &day_table(*day)).await,
            "{day}'s files went too"
        );
    }
    assert_eq!(
        store.drop_days_before(cutoff).await.unwrap(),
        DroppedDays::default()
    );
    // Today and the days ahead are never dropped: the cutoff's own day is not over.
    let today = day_table(Utc::now().date_naive());
    assert!(table_exists(&store, &today).await, "{today}");
}

#[tokio::test]
async fn a_day_waits_for_the_next_sweep_while_long_queries_hold_the_table() {
    let (_db, store) = postgres().await;
    let old_day = now() - Duration::days(100);
    store.prepare_days(old_day.date_naive(), 0).await.unwrap();
    let old = Run::minted_at("pc-a", old_day);
    store.apply(&[started(&old)], old_day).await.unwrap();
    let cutoff = now() - Duration::days(90);

    // A long Activity query (here: a transaction that read the table and has not ended).
    let mut reader = store.pool().begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM execution_results")
        .execute(&mut *reader)
        .await
        .unwrap();
    // The sweep gives up on the day instead of waiting for the reader (which this task holds:
    // waiting would never end).
    let swept = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.drop_days_before(cutoff),
    )
    .await
    .expect("the sweep does not wait for the reader")
    .unwrap();
    assert_eq!(swept.dropped, Vec::<NaiveDate>::new());
    assert_eq!(swept.postponed, vec![old_day.date_naive()]);
    // Writers were not left queued behind the retention: a write goes through while the
    // reader still holds the table.
    let fresh = Run::new("pc-a");
    store.apply(&[started(&fresh)], now()).await.unwrap();
    assert_eq!(all_rows(&store).await.len(), 2, "nothing went yet");
    reader.rollback().await.unwrap();

    let swept = store.drop_days_before(cutoff).await.unwrap();
    assert_eq!(swept.dropped, vec![old_day.date_naive()]);
    assert!(swept.postponed.is_empty());
    let rows = all_rows(&store).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].result_id.to_string(), fresh.result_id);
}

#[tokio::test]
async fn a_new_day_takes_its_runs_from_the_default_partition_and_replicas_take_turns() {
    let (db, store) = postgres().await;
    let ahead = now() + Duration::days(10);
    // An agent whose clock runs ten days ahead: no partition for that day yet.
    let early = Run::minted_at("pc-a", ahead);
    store.apply(&[started(&early)], now()).await.unwrap();
    assert_eq!(
        partition_of(&store, &early.result_id).await,
        "execution_results_default"
    );
    // Four replicas preparing the same days at once: each day is created once, nobody fails.
    let mut replicas = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        replicas.push(tokio::spawn(async move {
            let store = PostgresStore::connect(&url).await.unwrap();
            store
                .prepare_days(ahead.date_naive() - chrono::Days::new(2), 2)
                .await
        }));
    }
    let mut created = 0;
    for r in replicas {
        created += r.await.unwrap().unwrap();
    }
    assert_eq!(created, 3, "three new days, each created by one replica");
    assert_eq!(
        partition_of(&store, &early.result_id).await,
        day_table(ahead.date_naive()),
        "the early run moved into its day"
    );
    store.apply(&[finished(&early)], now()).await.unwrap();
    assert!(all_rows(&store).await[0].outcome.is_some());
}

/// The previous release's schema (migration 0001 alone), filled, then `kanade-ingest migrate`:
/// every row is still there, byte for byte, each in its day (or the default partition).
#[tokio::test]
async fn a_database_of_the_previous_release_is_upgraded_without_losing_a_row() {
    let db = TestDb::postgres().await;
    let previous = tempfile::tempdir().unwrap();
    let first = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations/postgres/0001_execution_results.sql");
    std::fs::copy(&first, previous.path().join("0001_execution_results.sql")).unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::migrate::Migrator::new(previous.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    let mut writes = Vec::new();
    for days_ago in [0i64, 1, 5, 40, 500] {
        for n in 0..20 {
            let run = Run::minted_at("pc-a", now() - Duration::days(days_ago));
            writes.push(if n % 2 == 0 {
                started(&run)
            } else {
                finished(&run)
            });
        }
    }
    let mut v4 = Run::new("pc-b");
    v4.result_id = Uuid::new_v4().to_string();
    writes.push(finished(&v4));
    // Written as that release wrote them: its columns only (today's store writes more).
    for w in &writes {
        let o = w.outcome.as_ref();
        sqlx::query(
            "INSERT INTO execution_results (result_id, request_id, exec_id, pc_id, manifest_id, \
             version, timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes, \
             stderr_dropped_bytes, started_at, finished_at, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, now())",
        )
        .bind(w.result_id)
        .bind(&w.request_id)
        .bind(&w.exec_id)
        .bind(&w.pc_id)
        .bind(&w.manifest_id)
        .bind(&w.version)
        .bind(w.timeout_secs.map(i64::from))
        .bind(o.map(|o| o.status.as_str()))
        .bind(o.and_then(|o| o.exit_code))
        .bind(o.map(|o| o.stdout.as_str()))
        .bind(o.map(|o| o.stderr.as_str()))
        .bind(o.map(|o| o.stdout_dropped_bytes as i64))
        .bind(o.map(|o| o.stderr_dropped_bytes as i64))
        .bind(w.started_at)
        .bind(o.map(|o| o.finished_at))
        .execute(&pool)
        .await
        .unwrap();
    }
    // The columns of that release, compared after the upgrade (which adds some).
    let snapshot = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT row_to_json(r)::text FROM (SELECT result_id, request_id, exec_id, pc_id, \
             manifest_id, version, timeout_secs, status, exit_code, stdout, stderr, \
             stdout_dropped_bytes, stderr_dropped_bytes, started_at, finished_at, received_at \
             FROM execution_results ORDER BY result_id) r",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = snapshot(pool.clone()).await;
    assert_eq!(before.len(), 101);

    let migrated = std::process::Command::new(workspace_binary("kanade-ingest"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(
        snapshot(pool.clone()).await,
        before,
        "every row, byte for byte"
    );
    let partitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'execution_results'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(partitions >= 5, "{partitions} partitions");
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM execution_results_default")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        in_default, 21,
        "the v4 run and the 500-day-old ones (past 400 days)"
    );
    pool.close().await;
}
