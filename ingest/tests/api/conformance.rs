//! The store conformance suite: every coalescing and query rule of SPEC §3, run against both
//! stores. `conformance!` instantiates each scenario once per backend.

use chrono::Duration;
use kanade_ingest::store::{
    AgentReport, CancelOutcome, CancelRequest, Cursor, EndpointOrder, EndpointQuery, EndpointRow,
    ExecutionRow, FleetTotals, ListQuery, ManifestSummary, PendingCancel, PresenceWrite, RunState,
    RunWrite, Store, SummaryQuery,
};
use kanade_shared::wire::{EventBody, ExecStatus};
use uuid::Uuid;

use kanade_testkit::{Backend, Run, TestDb, now};

fn started(run: &Run) -> RunWrite {
    RunWrite::from_event(EventBody::Started(run.started())).unwrap()
}

fn result(run: &Run, status: ExecStatus, exit_code: Option<i32>) -> RunWrite {
    RunWrite::from_event(EventBody::Result(run.result(status, exit_code))).unwrap()
}

fn id(run: &Run) -> Uuid {
    Uuid::parse_str(&run.result_id).unwrap()
}

const GRACE: Duration = Duration::minutes(5);

async fn get(store: &dyn Store, run: &Run) -> ExecutionRow {
    store
        .get(id(run), now(), GRACE)
        .await
        .unwrap()
        .expect("row exists")
}

async fn count(store: &dyn Store) -> usize {
    store
        .list(&ListQuery::all(now(), GRACE, 500))
        .await
        .unwrap()
        .len()
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test] async fn $scenario() { super::$scenario(super::Backend::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $scenario() { super::$scenario(super::Backend::Sqlite).await })*
        }
    };
}

conformance!(
    started_then_result_finishes_one_row,
    result_then_late_started_fills_only_missing_columns,
    an_empty_version_is_filled_whatever_the_order,
    the_first_trace_id_known_stays,
    duplicates_are_no_ops,
    first_committed_result_wins,
    another_pc_can_never_modify_a_run,
    nul_bytes_and_any_unicode_are_stored,
    a_run_without_result_turns_lost_after_timeout_and_grace,
    a_late_real_result_wins_over_lost,
    listing_filters_orders_newest_first_and_pages_by_keyset,
    manifests_are_summarized_per_state_with_percentiles_and_the_last_failure,
    unknown_run_is_none,
    retention_deletes_only_old_rows_in_batches,
    migrations_are_idempotent,
    a_cancel_is_kept_once_on_a_run_without_result_and_refused_on_a_finished_one,
    a_cancelled_run_is_listed_and_summarized_as_failed,
    presence_follows_the_newest_stream_of_each_endpoint,
    endpoints_are_listed_by_pc_id_or_attention_first,
);

async fn started_then_result_finishes_one_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    assert_eq!(store.apply(&[started(&run)], now()).await.unwrap(), [true]);
    let row = get(store.as_ref(), &run).await;
    assert_eq!(row.state, RunState::Running);
    assert_eq!(row.timeout_secs, Some(60));
    assert!(row.outcome.is_none());

    let res = result(&run, ExecStatus::Failed, Some(2));
    assert_eq!(
        store
            .apply(std::slice::from_ref(&res), now())
            .await
            .unwrap(),
        [true]
    );
    let row = get(store.as_ref(), &run).await;
    assert_eq!(row.state, RunState::Finished(ExecStatus::Failed));
    assert_eq!(row.outcome, res.outcome);
    assert_eq!(row.timeout_secs, Some(60));
    assert_eq!(count(store.as_ref()).await, 1);
}

async fn result_then_late_started_fills_only_missing_columns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    let res = result(&run, ExecStatus::Succeeded, Some(0));
    store
        .apply(std::slice::from_ref(&res), now())
        .await
        .unwrap();
    let row = get(store.as_ref(), &run).await;
    assert_eq!(row.state, RunState::Finished(ExecStatus::Succeeded));
    assert_eq!(row.timeout_secs, None);

    let mut late = started(&run);
    late.version = "a different version".into();
    assert_eq!(store.apply(&[late], now()).await.unwrap(), [true]);
    let row = get(store.as_ref(), &run).await;
    assert_eq!(
        row.state,
        RunState::Finished(ExecStatus::Succeeded),
        "never un-finished"
    );
    assert_eq!(row.outcome, res.outcome);
    assert_eq!(row.timeout_secs, Some(60), "the NULL column was filled");
    assert_eq!(row.version, "3", "a set column is never overwritten");
}

/// proto3 cannot tell an unset string from an empty one: a result written with `version: ""`
/// must not leave the row's version empty once the run's Started (which knows it) arrives, in
/// another batch or in the same one.
async fn the_first_trace_id_known_stays(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let traced = |w: RunWrite, trace: &str| {
        let context = [(
            "traceparent".to_string(),
            format!("00-{trace}-00f067aa0ba902b7-01"),
        )];
        w.with_trace_context(context.iter().map(|(k, v)| (k, v)))
    };
    let (first, second) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
    );

    // Started without a trace, the result with one: the result's fills it in.
    let run = Run::new("pc-a");
    store.apply(&[started(&run)], now()).await.unwrap();
    assert_eq!(get(store.as_ref(), &run).await.trace_id, None);
    let res = traced(result(&run, ExecStatus::Succeeded, Some(0)), first);
    store.apply(&[res], now()).await.unwrap();
    assert_eq!(
        get(store.as_ref(), &run).await.trace_id.as_deref(),
        Some(first)
    );
    // A later event with another trace (a resend from a restarted agent) changes nothing.
    let again = traced(result(&run, ExecStatus::Succeeded, Some(0)), second);
    store.apply(&[again], now()).await.unwrap();
    assert_eq!(
        get(store.as_ref(), &run).await.trace_id.as_deref(),
        Some(first)
    );

    // Merged in one batch: the first event's trace.
    let merged_run = Run::new("pc-a");
    let mut merged = traced(started(&merged_run), first);
    merged.absorb(traced(
        result(&merged_run, ExecStatus::Failed, Some(1)),
        second,
    ));
    store.apply(&[merged], now()).await.unwrap();
    assert_eq!(
        get(store.as_ref(), &merged_run).await.trace_id.as_deref(),
        Some(first)
    );

    // Not a trace id: ignored.
    for bad in [
        "00000000000000000000000000000000",
        "4BF92F3577B34DA6A3CE929D0E0E4736",
        "short",
    ] {
        assert_eq!(
            traced(started(&Run::new("pc-a")), bad).trace_id,
            None,
            "{bad}"
        );
    }
}

async fn an_empty_version_is_filled_whatever_the_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let with_version = |mut w: RunWrite| {
        w.version = "2.1.0".into();
        w
    };
    let without_version = |mut w: RunWrite| {
        w.version = String::new();
        w
    };

    let result_first = Run::new("pc-a");
    let res = without_version(result(&result_first, ExecStatus::Succeeded, Some(0)));
    store.apply(&[res], now()).await.unwrap();
    assert_eq!(get(store.as_ref(), &result_first).await.version, "");
    store
        .apply(&[with_version(started(&result_first))], now())
        .await
        .unwrap();
    assert_eq!(get(store.as_ref(), &result_first).await.version, "2.1.0");

    let started_first = Run::new("pc-a");
    store
        .apply(&[without_version(started(&started_first))], now())
        .await
        .unwrap();
    let res = with_version(result(&started_first, ExecStatus::Failed, Some(1)));
    store.apply(&[res], now()).await.unwrap();
    assert_eq!(get(store.as_ref(), &started_first).await.version, "2.1.0");

    // Merged inside one batch, as the batcher does.
    let same_batch = Run::new("pc-a");
    let mut merged = without_version(result(&same_batch, ExecStatus::Succeeded, Some(0)));
    merged.absorb(with_version(started(&same_batch)));
    store.apply(&[merged], now()).await.unwrap();
    let row = get(store.as_ref(), &same_batch).await;
    assert_eq!(row.version, "2.1.0");
    assert_eq!(row.timeout_secs, Some(60));
}

async fn duplicates_are_no_ops(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    let first_seen = now() - Duration::seconds(10);
    store.apply(&[started(&run)], first_seen).await.unwrap();
    store
        .apply(&[result(&run, ExecStatus::Succeeded, Some(0))], first_seen)
        .await
        .unwrap();
    let before = get(store.as_ref(), &run).await;
    for _ in 0..3 {
        let applied = store.apply(&[started(&run)], now()).await.unwrap();
        assert_eq!(applied, [true], "a redelivery is acknowledged");
        store
            .apply(&[result(&run, ExecStatus::Succeeded, Some(0))], now())
            .await
            .unwrap();
    }
    assert_eq!(get(store.as_ref(), &run).await, before);
    assert_eq!(
        before.received_at, first_seen,
        "received_at is the first insert's"
    );
    assert_eq!(count(store.as_ref()).await, 1);
}

async fn first_committed_result_wins(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    store.apply(&[started(&run)], now()).await.unwrap();
    let first = result(&run, ExecStatus::TimedOut, None);
    store
        .apply(std::slice::from_ref(&first), now())
        .await
        .unwrap();
    let other = result(&run, ExecStatus::Succeeded, Some(0));
    assert_eq!(
        store.apply(&[other], now()).await.unwrap(),
        [true],
        "acked as a no-op"
    );
    let row = get(store.as_ref(), &run).await;
    assert_eq!(row.outcome, first.outcome);
    assert_eq!(row.state, RunState::Finished(ExecStatus::TimedOut));
}

async fn another_pc_can_never_modify_a_run(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    store.apply(&[started(&run)], now()).await.unwrap();
    let before = get(store.as_ref(), &run).await;

    let intruder = Run {
        pc_id: "pc-b".into(),
        ..run.clone()
    };
    let other = Run::new("pc-b");
    let applied = store
        .apply(
            &[
                result(&intruder, ExecStatus::Succeeded, Some(0)),
                started(&other),
            ],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(applied, [false, true], "only the foreign write is refused");
    assert_eq!(get(store.as_ref(), &run).await, before);

    // Both endpoints in one batch, owner first: the owner's write lands, the intruder's not.
    let fresh = Run::new("pc-a");
    let fresh_intruder = Run {
        pc_id: "pc-b".into(),
        ..fresh.clone()
    };
    let applied = store
        .apply(
            &[
                started(&fresh),
                result(&fresh_intruder, ExecStatus::Failed, Some(1)),
            ],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(applied, [true, false]);
    let row = get(store.as_ref(), &fresh).await;
    assert_eq!(row.pc_id, "pc-a");
    assert_eq!(row.state, RunState::Running);
}

async fn nul_bytes_and_any_unicode_are_stored(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-ü");
    let mut res = run.result(ExecStatus::Failed, Some(1));
    res.stdout = "a\0b — ✓ 日本語 🎉 \u{7f}\r\n".into();
    res.stderr = "\0\0".into();
    let write = RunWrite::from_event(EventBody::Result(res)).unwrap();
    store.apply(&[write], now()).await.unwrap();
    let out = get(store.as_ref(), &run).await.outcome.unwrap();
    assert_eq!(out.stdout, "a\u{FFFD}b — ✓ 日本語 🎉 \u{7f}\r\n");
    assert_eq!(out.stderr, "\u{FFFD}\u{FFFD}");
}

async fn a_run_without_result_turns_lost_after_timeout_and_grace(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let received = now();
    let with_timeout = Run::new("pc-a"); // timeout 60 s
    let mut no_timeout = started(&Run::new("pc-a"));
    no_timeout.timeout_secs = None;
    store
        .apply(&[started(&with_timeout), no_timeout.clone()], received)
        .await
        .unwrap();
    let state_at = |secs: i64, id: Uuid| {
        let store = store.clone();
        async move {
            store
                .get(id, received + Duration::seconds(secs), GRACE)
                .await
                .unwrap()
                .unwrap()
                .state
        }
    };
    let timed = id(&with_timeout);
    assert_eq!(state_at(60 + 300, timed).await, RunState::Running);
    assert_eq!(state_at(60 + 301, timed).await, RunState::Lost);
    assert_eq!(
        state_at(86_400, no_timeout.result_id).await,
        RunState::Running
    );
    assert_eq!(state_at(86_401, no_timeout.result_id).await, RunState::Lost);

    let lost_now = ListQuery {
        states: vec![RunState::Lost],
        ..ListQuery::all(received + Duration::seconds(400), GRACE, 50)
    };
    let lost: Vec<Uuid> = store
        .list(&lost_now)
        .await
        .unwrap()
        .iter()
        .map(|r| r.result_id)
        .collect();
    assert_eq!(lost, [timed]);
    let running = ListQuery {
        states: vec![RunState::Running],
        ..lost_now
    };
    let running: Vec<Uuid> = store
        .list(&running)
        .await
        .unwrap()
        .iter()
        .map(|r| r.result_id)
        .collect();
    assert_eq!(running, [no_timeout.result_id]);
}

async fn a_late_real_result_wins_over_lost(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let run = Run::new("pc-a");
    let received = now() - Duration::days(2);
    store.apply(&[started(&run)], received).await.unwrap();
    assert_eq!(get(store.as_ref(), &run).await.state, RunState::Lost);
    store
        .apply(&[result(&run, ExecStatus::Succeeded, Some(0))], now())
        .await
        .unwrap();
    assert_eq!(
        get(store.as_ref(), &run).await.state,
        RunState::Finished(ExecStatus::Succeeded)
    );
}

async fn listing_filters_orders_newest_first_and_pages_by_keyset(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let base = now() - Duration::hours(1);
    // 30 runs on two endpoints; pairs share a started_at so the result_id tie-break matters.
    let runs: Vec<Run> = (0..30)
        .map(|i| {
            Run::at(
                if i % 3 == 0 { "pc-b" } else { "pc-a" },
                base + Duration::seconds(i / 2),
            )
        })
        .collect();
    let mut writes = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        writes.push(started(run));
        if i % 2 == 0 {
            writes.push(result(run, ExecStatus::Failed, Some(1)));
        }
    }
    // The batcher hands stores writes sorted by result_id, one per run and endpoint.
    let mut merged: Vec<RunWrite> = Vec::new();
    for w in writes {
        match merged.iter_mut().find(|m| m.result_id == w.result_id) {
            Some(m) => m.absorb(w),
            None => merged.push(w),
        }
    }
    merged.sort_by_key(|w| w.result_id);
    store.apply(&merged, now()).await.unwrap();

    let mut expected: Vec<&Run> = runs.iter().collect();
    expected.sort_by_key(|r| std::cmp::Reverse((r.started_at, id(r))));

    // Page through everything, 7 at a time.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&ListQuery {
                after,
                ..ListQuery::all(now(), GRACE, 7)
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| Cursor {
            started_at: r.started_at,
            result_id: r.result_id,
        });
        seen.extend(page.into_iter().map(|r| r.result_id));
    }
    assert_eq!(seen, expected.iter().map(|r| id(r)).collect::<Vec<_>>());

    // Filters combine.
    let failed_on_b = ListQuery {
        states: vec![RunState::Finished(ExecStatus::Failed)],
        pc_id: Some("pc-b".into()),
        started_after: Some(base + Duration::seconds(2)),
        started_before: Some(base + Duration::seconds(12)),
        ..ListQuery::all(now(), GRACE, 500)
    };
    let got: Vec<Uuid> = store
        .list(&failed_on_b)
        .await
        .unwrap()
        .iter()
        .map(|r| r.result_id)
        .collect();
    let want: Vec<Uuid> = expected
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            let i = runs
                .iter()
                .position(|x| x.result_id == r.result_id)
                .unwrap();
            r.pc_id == "pc-b"
                && i % 2 == 0
                && r.started_at >= base + Duration::seconds(2)
                && r.started_at < base + Duration::seconds(12)
        })
        .map(|(_, r)| id(r))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    let by_manifest = ListQuery {
        manifest_id: Some("nothing-like-this".into()),
        ..ListQuery::all(now(), GRACE, 500)
    };
    assert!(store.list(&by_manifest).await.unwrap().is_empty());
    let by_exec = ListQuery {
        exec_id: Some("exec-1".into()),
        states: vec![RunState::Running, RunState::Finished(ExecStatus::Failed)],
        ..ListQuery::all(now(), GRACE, 500)
    };
    assert_eq!(store.list(&by_exec).await.unwrap().len(), 30);
}

/// SummarizeManifests' numbers (SPEC §13): every state counted, `failed` = every finished state
/// but succeeded, durations of finished runs only, percentile_disc (the value at ⌈p·n⌉), the
/// newest failure, the window on started_at, one manifest on request.
async fn manifests_are_summarized_per_state_with_percentiles_and_the_last_failure(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let base = now() - Duration::hours(1);
    let mut writes = Vec::new();
    let mut finished = |manifest: &str, minute: i64, secs: i64, status: ExecStatus| {
        let run = Run::at("pc-a", base + Duration::minutes(minute));
        let mut w = result(&run, status, (status == ExecStatus::Succeeded).then_some(0));
        w.manifest_id = manifest.into();
        let outcome = w.outcome.as_mut().unwrap();
        outcome.finished_at = run.started_at + Duration::seconds(secs);
        writes.push(w);
        run
    };
    for (minute, secs) in [(1, 10), (2, 20), (3, 30)] {
        finished("backup", minute, secs, ExecStatus::Succeeded);
    }
    finished("backup", 4, 40, ExecStatus::Failed);
    let newest_failure = finished("backup", 5, 50, ExecStatus::TimedOut);
    finished("inventory", 6, 5, ExecStatus::Succeeded);
    // Outside the window.
    finished("backup", -120, 1, ExecStatus::Failed);
    let received = now();
    let mut running = started(&Run::at("pc-a", base + Duration::minutes(7)));
    running.manifest_id = "backup".into();
    running.timeout_secs = None;
    let mut lost = started(&Run::at("pc-a", base + Duration::minutes(8)));
    lost.manifest_id = "backup".into();
    lost.timeout_secs = Some(1);
    writes.push(running);
    writes.push(lost);
    writes.sort_by_key(|w| w.result_id);
    store.apply(&writes, received).await.unwrap();

    let query = SummaryQuery {
        started_after: base,
        started_before: base + Duration::hours(1),
        manifest_id: None,
        // Past the lost run's timeout and grace, not past the 24 h of the one without timeout.
        now: received + Duration::minutes(10),
        lost_grace: GRACE,
    };
    let summaries = store.summarize(&query).await.unwrap();
    let secs = |s: u64| Some(std::time::Duration::from_secs(s));
    assert_eq!(
        summaries,
        [
            ManifestSummary {
                manifest_id: "backup".into(),
                runs: 7,
                running: 1,
                succeeded: 3,
                failed: 2,
                lost: 1,
                // Finished durations 10, 20, 30, 40, 50: position ⌈2.5⌉ = 3 and ⌈4.75⌉ = 5.
                p50_duration: secs(30),
                p95_duration: secs(50),
                last_failure: Some((
                    id(&newest_failure),
                    newest_failure.started_at + Duration::seconds(50)
                )),
            },
            ManifestSummary {
                manifest_id: "inventory".into(),
                runs: 1,
                running: 0,
                succeeded: 1,
                failed: 0,
                lost: 0,
                p50_duration: secs(5),
                p95_duration: secs(5),
                last_failure: None,
            },
        ]
    );
    let only = store
        .summarize(&SummaryQuery {
            manifest_id: Some("inventory".into()),
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].manifest_id, "inventory");
    let empty = store
        .summarize(&SummaryQuery {
            started_after: base - Duration::days(7),
            started_before: base - Duration::days(6),
            ..query
        })
        .await
        .unwrap();
    assert!(empty.is_empty());
}

async fn unknown_run_is_none(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    assert!(
        store
            .get(Uuid::now_v7(), now(), GRACE)
            .await
            .unwrap()
            .is_none()
    );
}

async fn retention_deletes_only_old_rows_in_batches(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    // Minted 100 days ago, older than any day partition PostgreSQL keeps: deleted row by row.
    let long_ago = now() - Duration::days(100);
    let mut old: Vec<RunWrite> = (0..25)
        .map(|_| started(&Run::minted_at("pc-a", long_ago)))
        .collect();
    old.sort_by_key(|w| w.result_id);
    store.apply(&old, long_ago).await.unwrap();
    let young = Run::new("pc-a");
    store.apply(&[started(&young)], now()).await.unwrap();
    let cutoff = now() - Duration::days(90);
    assert_eq!(store.delete_received_before(cutoff, 10).await.unwrap(), 10);
    assert_eq!(store.delete_received_before(cutoff, 10).await.unwrap(), 10);
    assert_eq!(store.delete_received_before(cutoff, 10).await.unwrap(), 5);
    assert_eq!(store.delete_received_before(cutoff, 10).await.unwrap(), 0);
    assert_eq!(count(store.as_ref()).await, 1);
    get(store.as_ref(), &young).await;
}

async fn migrations_are_idempotent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    store.migrate().await.unwrap();
    let other = db.store().await;
    other.migrate().await.unwrap();
    other.ping().await.unwrap();
}

fn cancel(reason: &str, by: &str) -> CancelRequest {
    CancelRequest {
        at: now(),
        reason: reason.into(),
        by: by.into(),
    }
}

async fn a_cancel_is_kept_once_on_a_run_without_result_and_refused_on_a_finished_one(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let (running, other_pc, finished) = (Run::new("pc-a"), Run::new("pc-b"), Run::new("pc-a"));
    store
        .apply(&[started(&running), started(&other_pc)], now())
        .await
        .unwrap();
    store
        .apply(&[result(&finished, ExecStatus::Succeeded, Some(0))], now())
        .await
        .unwrap();

    let unknown = Uuid::now_v7();
    assert_eq!(
        store
            .request_cancel(unknown, &cancel("x", "alice"), now(), GRACE)
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );
    let first = cancel("stuck since 09:00", "alice");
    let CancelOutcome::Requested { run, first: true } = store
        .request_cancel(id(&running), &first, now(), GRACE)
        .await
        .unwrap()
    else {
        panic!("a running run takes the request");
    };
    assert_eq!(run.cancel, Some(first.clone()));
    assert_eq!(
        run.state,
        RunState::Running,
        "still running until its agent ends it"
    );
    // Asked again, by someone else: nothing changes.
    let CancelOutcome::Requested { run, first: false } = store
        .request_cancel(id(&running), &cancel("again", "bob"), now(), GRACE)
        .await
        .unwrap()
    else {
        panic!("a pending request stays pending");
    };
    assert_eq!(run.cancel, Some(first.clone()), "the first request stays");
    assert_eq!(
        get(store.as_ref(), &running).await.cancel,
        Some(first.clone())
    );

    let CancelOutcome::Finished(done) = store
        .request_cancel(id(&finished), &cancel("late", "alice"), now(), GRACE)
        .await
        .unwrap()
    else {
        panic!("a finished run refuses");
    };
    assert_eq!(done.state, RunState::Finished(ExecStatus::Succeeded));
    assert_eq!(done.cancel, None, "nothing was written");

    let expected = PendingCancel {
        pc_id: "pc-a".into(),
        result_id: id(&running),
        reason: first.reason.clone(),
        by: first.by.clone(),
    };
    let pcs = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        store.pending_cancels(&pcs(&["pc-a"])).await.unwrap(),
        std::slice::from_ref(&expected)
    );
    assert_eq!(
        store
            .pending_cancels(&pcs(&["pc-b", "pc-a", "pc-z"]))
            .await
            .unwrap(),
        [expected]
    );
    assert!(
        store
            .pending_cancels(&pcs(&["pc-b"]))
            .await
            .unwrap()
            .is_empty()
    );

    // The agent ends the run: it is cancelled, the request kept, nothing more to deliver.
    store
        .apply(&[result(&running, ExecStatus::Cancelled, None)], now())
        .await
        .unwrap();
    let row = get(store.as_ref(), &running).await;
    assert_eq!(row.state, RunState::Finished(ExecStatus::Cancelled));
    assert_eq!(row.cancel, Some(first));
    assert!(
        store
            .pending_cancels(&pcs(&["pc-a"]))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.forget_settled_cancels().await.unwrap(), 1);
    assert_eq!(store.forget_settled_cancels().await.unwrap(), 0);
}

async fn a_cancelled_run_is_listed_and_summarized_as_failed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let (cancelled, succeeded) = (Run::new("pc-a"), Run::new("pc-a"));
    store
        .apply(
            &[
                result(&cancelled, ExecStatus::Cancelled, None),
                result(&succeeded, ExecStatus::Succeeded, Some(0)),
            ],
            now(),
        )
        .await
        .unwrap();
    let q = ListQuery {
        states: vec![RunState::Finished(ExecStatus::Cancelled)],
        ..ListQuery::all(now(), GRACE, 50)
    };
    let listed: Vec<Uuid> = store
        .list(&q)
        .await
        .unwrap()
        .iter()
        .map(|r| r.result_id)
        .collect();
    assert_eq!(listed, [id(&cancelled)]);
    let summary = store
        .summarize(&SummaryQuery {
            started_after: now() - Duration::hours(1),
            started_before: now() + Duration::hours(1),
            manifest_id: None,
            now: now(),
            lost_grace: GRACE,
        })
        .await
        .unwrap();
    assert_eq!((summary[0].succeeded, summary[0].failed), (1, 1));
}

fn presence(
    pc: &str,
    stream: u128,
    replica: &str,
    since_secs_ago: i64,
    connected: bool,
) -> PresenceWrite {
    PresenceWrite {
        pc_id: pc.into(),
        stream_id: Uuid::from_u128(stream),
        replica: replica.into(),
        connected_since: now() - Duration::seconds(since_secs_ago),
        agent_version: "1.2.3".into(),
        seen_at: now(),
        connected,
        report: None,
    }
}

fn report(depth: u64, oldest_secs_ago: Option<i64>) -> AgentReport {
    AgentReport {
        at: now(),
        outbox_depth: depth,
        outbox_bytes: depth * 100,
        oldest_pending_at: oldest_secs_ago.map(|s| now() - Duration::seconds(s)),
        dead_letters: 2,
        running_runs: 1,
        hostname: "host-a".into(),
        os: "linux x86_64".into(),
    }
}

/// Endpoints seen by a query made now, with rows refreshed within the last 90 s trusted.
fn connected_after() -> chrono::DateTime<chrono::Utc> {
    now() - Duration::seconds(90)
}

async fn endpoint(store: &dyn Store, pc: &str) -> EndpointRow {
    store
        .get_endpoint(pc, connected_after())
        .await
        .unwrap()
        .expect("the endpoint is known")
}

async fn presence_follows_the_newest_stream_of_each_endpoint(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let stale = connected_after();
    assert_eq!(store.get_endpoint("pc-a", stale).await.unwrap(), None);

    // Opened on replica A, then a report.
    store
        .write_presence(&[presence("pc-a", 1, "A", 60, true)], stale)
        .await
        .unwrap();
    let e = endpoint(store.as_ref(), "pc-a").await;
    assert!(e.connected);
    assert_eq!(
        (e.replica.as_str(), e.agent_version.as_str()),
        ("A", "1.2.3")
    );
    assert_eq!(
        e.report, None,
        "no report yet (an older agent never sends one)"
    );
    let first_seen = e.first_seen;
    let mut reported = presence("pc-a", 1, "A", 60, true);
    reported.report = Some(report(500, Some(120)));
    store
        .write_presence(&[reported.clone()], stale)
        .await
        .unwrap();
    let e = endpoint(store.as_ref(), "pc-a").await;
    assert_eq!(e.report, reported.report);
    assert_eq!(e.first_seen, first_seen);

    // The agent reconnects to replica B; A notices its old stream closed only afterwards.
    store
        .write_presence(&[presence("pc-a", 2, "B", 5, true)], stale)
        .await
        .unwrap();
    store
        .write_presence(&[presence("pc-a", 1, "A", 60, false)], stale)
        .await
        .unwrap();
    let e = endpoint(store.as_ref(), "pc-a").await;
    assert!(
        e.connected,
        "the old stream's closing does not undo the new one"
    );
    assert_eq!(e.replica, "B");
    assert_eq!(e.report, reported.report, "the last report stays");
    // A's refresh of its half-dead older stream does not take the row back either.
    store
        .write_presence(&[presence("pc-a", 1, "A", 60, true)], stale)
        .await
        .unwrap();
    assert_eq!(endpoint(store.as_ref(), "pc-a").await.replica, "B");
    // An older report (sent before the newest) does not replace a newer one.
    let mut older = presence("pc-a", 2, "B", 5, true);
    older.report = Some(AgentReport {
        at: now() - Duration::seconds(30),
        ..report(7, None)
    });
    store.write_presence(&[older], stale).await.unwrap();
    assert_eq!(
        endpoint(store.as_ref(), "pc-a").await.report,
        reported.report
    );

    // The stream of the row closes: disconnected, last seen then.
    store
        .write_presence(&[presence("pc-a", 2, "B", 5, false)], stale)
        .await
        .unwrap();
    let e = endpoint(store.as_ref(), "pc-a").await;
    assert!(!e.connected);
    assert_eq!(e.replica, "B");

    // Replica C dies with pc-c connected: once its rows are stale, nobody says connected.
    let mut dead = presence("pc-c", 3, "C", 300, true);
    dead.seen_at = now() - Duration::seconds(200);
    store.write_presence(&[dead], stale).await.unwrap();
    assert!(!endpoint(store.as_ref(), "pc-c").await.connected);
    assert!(
        store
            .get_endpoint("pc-c", now() - Duration::seconds(300))
            .await
            .unwrap()
            .unwrap()
            .connected,
        "fresh enough for a longer interval"
    );
    // The agent comes back on another replica with a stream older than C's (clocks differ):
    // the stale row is taken over all the same.
    store
        .write_presence(&[presence("pc-c", 4, "D", 400, true)], stale)
        .await
        .unwrap();
    let e = endpoint(store.as_ref(), "pc-c").await;
    assert!(e.connected);
    assert_eq!(e.replica, "D");

    // Retention forgets endpoints not seen for long.
    assert_eq!(
        store
            .forget_endpoints_seen_before(now() - Duration::seconds(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .forget_endpoints_seen_before(now() + Duration::seconds(1))
            .await
            .unwrap(),
        2
    );
}

async fn endpoints_are_listed_by_pc_id_or_attention_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let stale = connected_after();
    let mut writes = Vec::new();
    // web-1..web-4 connected (web-3 with an old backlog, web-4 with a young one), db-1 and
    // db-2 disconnected (db-2 more recently), Zeta (capital: byte order) connected.
    for (i, pc) in ["web-1", "web-2", "web-3", "web-4", "db-1", "db-2", "Zeta"]
        .into_iter()
        .enumerate()
    {
        let mut w = presence(pc, i as u128 + 1, "A", 60, !pc.starts_with("db"));
        w.report = Some(match pc {
            "web-3" => report(50, Some(600)),
            "web-4" => report(10, Some(5)),
            _ => report(0, None),
        });
        if pc == "db-1" {
            w.seen_at = now() - Duration::seconds(30);
        }
        writes.push(w);
    }
    store.write_presence(&writes, stale).await.unwrap();
    let query = |order, connected, prefix: Option<&str>, after: Option<&str>| EndpointQuery {
        connected,
        pc_id_prefix: prefix.map(str::to_string),
        after: after.map(str::to_string),
        limit: 3,
        order,
        connected_after: stale,
        backlogged_before: now() - Duration::seconds(60),
    };
    let names =
        |rows: Vec<EndpointRow>| -> Vec<String> { rows.into_iter().map(|e| e.pc_id).collect() };
    let page = |q| {
        let store = store.clone();
        async move { names(store.list_endpoints(&q).await.unwrap()) }
    };
    assert_eq!(
        page(query(EndpointOrder::PcId, None, None, None)).await,
        ["Zeta", "db-1", "db-2"]
    );
    assert_eq!(
        page(query(EndpointOrder::PcId, None, None, Some("db-2"))).await,
        ["web-1", "web-2", "web-3"]
    );
    assert_eq!(
        page(query(EndpointOrder::PcId, Some(false), None, None)).await,
        ["db-1", "db-2"]
    );
    assert_eq!(
        page(query(
            EndpointOrder::PcId,
            Some(true),
            Some("web-"),
            Some("web-1")
        ))
        .await,
        ["web-2", "web-3", "web-4"]
    );
    assert_eq!(
        page(query(EndpointOrder::AttentionFirst, None, None, None)).await,
        ["db-2", "db-1", "web-3"],
        "disconnected (the latest lost first), then the old backlog; a young backlog is fine"
    );
    assert_eq!(
        store.fleet_totals(stale).await.unwrap(),
        FleetTotals {
            connected: 5,
            disconnected: 2,
            backlog_events: 60,
            dead_letters: 14,
        }
    );
}

/// One scenario, both stores: every answer identical, byte for byte.
#[tokio::test]
async fn both_stores_give_identical_answers() {
    let pg = TestDb::postgres().await;
    let lite = TestDb::sqlite();
    let (pg, lite) = (pg.store().await, lite.store().await);
    let received = now() - Duration::minutes(30);
    let mut writes = Vec::new();
    for i in 0..40 {
        let run = Run::at("pc-a", received - Duration::milliseconds(i * 250));
        writes.push(started(&run));
        let status = ExecStatus::ALL[i as usize % ExecStatus::ALL.len()];
        if i % 4 != 0 {
            let mut r = run.result(status, (i % 2 == 0).then_some(i as i32));
            r.stdout = format!("line {i}\0 ünïcödé\n").repeat(i as usize);
            r.stdout_dropped_bytes = i as u64 * 1000;
            let w = RunWrite::from_event(EventBody::Result(r)).unwrap();
            writes.last_mut().unwrap().absorb(w);
        }
    }
    writes.sort_by_key(|w| w.result_id);
    assert_eq!(
        pg.apply(&writes, received).await.unwrap(),
        lite.apply(&writes, received).await.unwrap()
    );
    for states in [
        vec![],
        vec![RunState::Running],
        vec![RunState::Lost],
        vec![RunState::Finished(ExecStatus::Killed), RunState::Running],
    ] {
        let q = ListQuery {
            states,
            ..ListQuery::all(now(), Duration::seconds(1), 500)
        };
        let (a, b) = (pg.list(&q).await.unwrap(), lite.list(&q).await.unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    let running = writes.iter().find(|w| w.outcome.is_none()).unwrap();
    let request = cancel("ünïcödé \u{1F600}", "alice");
    let (a, b) = (
        pg.request_cancel(running.result_id, &request, now(), Duration::seconds(1))
            .await
            .unwrap(),
        lite.request_cancel(running.result_id, &request, now(), Duration::seconds(1))
            .await
            .unwrap(),
    );
    assert_eq!(format!("{a:?}"), format!("{b:?}"));

    let mut presence_writes = Vec::new();
    for i in 0..20u64 {
        let mut w = presence(&format!("pc-{i:02}é"), u128::from(i), "A", 60, i % 3 != 0);
        if i % 2 == 0 {
            w.report = Some(report(i * 10, Some(i as i64 * 20)));
        }
        presence_writes.push(w);
    }
    let stale = connected_after();
    pg.write_presence(&presence_writes, stale).await.unwrap();
    lite.write_presence(&presence_writes, stale).await.unwrap();
    for order in [EndpointOrder::PcId, EndpointOrder::AttentionFirst] {
        let q = EndpointQuery {
            connected: None,
            pc_id_prefix: None,
            after: None,
            limit: 100,
            order,
            connected_after: stale,
            backlogged_before: now() - Duration::seconds(60),
        };
        let (a, b) = (
            pg.list_endpoints(&q).await.unwrap(),
            lite.list_endpoints(&q).await.unwrap(),
        );
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
    assert_eq!(
        pg.fleet_totals(stale).await.unwrap(),
        lite.fleet_totals(stale).await.unwrap()
    );
}
