//! `kanade-bench activity`: the read path at fleet scale (SPEC §15, Reads). Builds a table of N
//! runs in PostgreSQL the fast way (one `INSERT … SELECT FROM generate_series` per million rows,
//! indexes built after the load) with a realistic shape — 30 days, 10,000 endpoints, 50
//! manifests, 2 % failed, a few running, some lost, a few interrupted, none timed out, killed or
//! spawn-failed (states with no rows), 200-byte outputs — starts the real ingest on it, and
//! times every Activity case over gRPC: each `ListExecutions` filter and state alone, the common
//! pairs, page 100 of deep listings, `GetExecution`, `SummarizeManifests` over 1 h / 24 h / 7 d.
//! p50 and p99 per case; for a case over its target, the plan PostgreSQL ran
//! (`EXPLAIN (ANALYZE, BUFFERS)`).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use kanade_ingest::{
    activity::state_to_proto,
    store::{ListQuery, PostgresStore, RunState, SummaryQuery},
};
use kanade_shared::{
    pb::{self, activity_client::ActivityClient},
    wire::{ExecStatus, timestamp_to_proto},
};
use tonic::transport::Channel;

use crate::process::IngestProcess;

#[derive(Debug, Args)]
pub struct ActivityArgs {
    /// The PostgreSQL server (its URL with any database: the benchmark's own is made beside it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Runs in the table.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: u64,
    /// Keep the database under this name and use it again next time (building ten million rows
    /// takes minutes). Without it, a fresh database is made and dropped.
    #[arg(long)]
    pub reuse: Option<String>,
    /// Calls per case.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// Append one summary row per case to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Extra flags for kanade-ingest.
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    pub ingest_args: Vec<String>,
}

const ENDPOINTS: u64 = 10_000;
const MANIFESTS: u64 = 50;
const DAYS: i64 = 30;
/// Targets (SPEC §15): a 50-run page, page 100 too; the 24 h summary.
const LIST_TARGET: Duration = Duration::from_millis(20);
const SUMMARY_TARGET: Duration = Duration::from_millis(500);
/// A case stops after this long once it has made CASE_MIN_CALLS calls.
const CASE_TIME_BUDGET: Duration = Duration::from_secs(20);
const CASE_MIN_CALLS: usize = 10;

/// The rows of one generated chunk: `$1..=$2` are the row numbers of `$5`, `$3` the instant the
/// data ends at, `$4` the days it spans. Rows come in start order (±30 s), as a fleet inserts
/// them: a day's runs sit together on disk, as in a real table. Row i's kind comes from a hash of i: 2 % failed, 0.01 % running (started in the last
/// hour), 0.05 % lost (no result, past its timeout), 0.01 % interrupted, the rest succeeded.
pub const GENERATE: &str = "
INSERT INTO execution_results (result_id, request_id, exec_id, pc_id, manifest_id, version,
    timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes, stderr_dropped_bytes,
    started_at, finished_at, received_at)
SELECT
    (lpad(to_hex((extract(epoch FROM g.started_at) * 1000)::bigint), 12, '0') || '7'
        || substr(g.h, 1, 3) || '8' || substr(g.h, 4, 15))::uuid,
    'req-' || g.i,
    'exec-' || (g.i / 500),
    'pc-' || lpad((g.i % 10000)::text, 5, '0'),
    'manifest-' || lpad(((g.i * 7 + g.i / 10000) % 50)::text, 2, '0'),
    '1.' || (g.i % 7),
    3600,
    CASE WHEN g.kind < 200 THEN 'failed' WHEN g.kind < 206 THEN NULL
         WHEN g.kind = 206 THEN 'interrupted' ELSE 'succeeded' END,
    CASE WHEN g.kind < 200 THEN 1 + g.i % 3 WHEN g.kind < 207 THEN NULL ELSE 0 END,
    CASE WHEN g.kind BETWEEN 200 AND 205 THEN NULL
         ELSE 'disk / 93% used; 12 packages upgradable; uptime 41 days; load 0.42 0.38 0.31; '
           || 'eth0 up 10Gb/s; ntp synchronised; last backup 2 h ago; no pending reboot; '
           || 'users 3; processes 214; zombies 0; swap 0%; ok' END,
    CASE WHEN g.kind < 200 THEN 'error: check failed with status ' || (1 + g.i % 3)
         WHEN g.kind BETWEEN 200 AND 205 THEN NULL ELSE '' END,
    CASE WHEN g.kind BETWEEN 200 AND 205 THEN NULL ELSE 0 END,
    CASE WHEN g.kind BETWEEN 200 AND 205 THEN NULL ELSE 0 END,
    g.started_at,
    CASE WHEN g.kind BETWEEN 200 AND 205 THEN NULL
         ELSE g.started_at + (1 + g.i % 120) * interval '1 second' END,
    g.started_at + interval '1 second'
FROM (
    SELECT i, md5(i::text) AS h, (i * 2654435761) % 10000 AS kind,
        CASE WHEN (i * 2654435761) % 10000 = 200
             THEN $3::timestamptz - (i % 3600) * interval '1 second'
             ELSE $3::timestamptz - $4::bigint * interval '1 day'
                 + (i::float8 / $5::float8) * $4::bigint * interval '1 day'
                 + ((i * 40503) % 60000 - 30000) * interval '1 millisecond'
        END AS started_at
    FROM generate_series($1::bigint, $2::bigint) AS i
) g";

/// One thing to time, with a fresh request per call.
struct Case {
    name: &'static str,
    make: Box<dyn Fn(&mut fastrand::Rng) -> Call>,
    target: Duration,
}

enum Call {
    List(ListQuery),
    Get(uuid::Uuid),
    Summary(SummaryQuery),
}

fn list_request(q: &ListQuery, page_token: String) -> pb::ListExecutionsRequest {
    pb::ListExecutionsRequest {
        states: q.states.iter().map(|&s| state_to_proto(s) as i32).collect(),
        pc_id: q.pc_id.clone().unwrap_or_default(),
        manifest_id: q.manifest_id.clone().unwrap_or_default(),
        exec_id: q.exec_id.clone().unwrap_or_default(),
        started_after: q.started_after.map(timestamp_to_proto),
        started_before: q.started_before.map(timestamp_to_proto),
        page_size: q.limit,
        page_token,
    }
}

fn random_pc(rng: &mut fastrand::Rng) -> Option<String> {
    Some(format!("pc-{:05}", rng.u64(0..ENDPOINTS)))
}

fn random_manifest(rng: &mut fastrand::Rng) -> Option<String> {
    Some(format!("manifest-{:02}", rng.u64(0..MANIFESTS)))
}

type Edit = Box<dyn Fn(&mut fastrand::Rng, &mut ListQuery, DateTime<Utc>)>;

fn cases(end: DateTime<Utc>, grace: chrono::Duration, rows: u64) -> Vec<Case> {
    use ExecStatus::*;
    let finished = RunState::Finished;
    let mut cases = Vec::new();
    let mut list = |name: &'static str, edit: Edit| {
        cases.push(Case {
            name,
            make: Box::new(move |rng| {
                let mut q = ListQuery::all(end, grace, 50);
                edit(rng, &mut q, end);
                Call::List(q)
            }),
            target: LIST_TARGET,
        })
    };
    list("all runs, newest first", Box::new(|_, _, _| {}));
    for (name, state) in [
        ("state running", RunState::Running),
        ("state succeeded", finished(Succeeded)),
        ("state failed", finished(Failed)),
        ("state timed_out (no rows)", finished(TimedOut)),
        ("state killed (no rows)", finished(Killed)),
        ("state spawn_failed (no rows)", finished(SpawnFailed)),
        ("state interrupted (rare)", finished(Interrupted)),
        ("state lost", RunState::Lost),
    ] {
        list(name, Box::new(move |_, q, _| q.states = vec![state]));
    }
    list(
        "states failed + timed_out + killed",
        Box::new(move |_, q, _| {
            q.states = vec![finished(Failed), finished(TimedOut), finished(Killed)]
        }),
    );
    list(
        "states running + lost",
        Box::new(|_, q, _| q.states = vec![RunState::Running, RunState::Lost]),
    );
    list("pc", Box::new(|rng, q, _| q.pc_id = random_pc(rng)));
    list(
        "pc + failed",
        Box::new(move |rng, q, _| {
            q.pc_id = random_pc(rng);
            q.states = vec![finished(Failed)];
        }),
    );
    list(
        "pc + timed_out (no rows)",
        Box::new(move |rng, q, _| {
            q.pc_id = random_pc(rng);
            q.states = vec![finished(TimedOut)];
        }),
    );
    list(
        "pc + running",
        Box::new(|rng, q, _| {
            q.pc_id = random_pc(rng);
            q.states = vec![RunState::Running];
        }),
    );
    list(
        "manifest",
        Box::new(|rng, q, _| q.manifest_id = random_manifest(rng)),
    );
    list(
        "manifest + failed + last 24 h",
        Box::new(move |rng, q, end| {
            q.manifest_id = random_manifest(rng);
            q.states = vec![finished(Failed)];
            q.started_after = Some(end - chrono::Duration::hours(24));
        }),
    );
    list(
        "manifest + timed_out + last 7 d (no rows)",
        Box::new(move |rng, q, end| {
            q.manifest_id = random_manifest(rng);
            q.states = vec![finished(TimedOut)];
            q.started_after = Some(end - chrono::Duration::days(7));
        }),
    );
    list(
        "manifest + succeeded + a day 10 days ago",
        Box::new(move |rng, q, end| {
            q.manifest_id = random_manifest(rng);
            q.states = vec![finished(Succeeded)];
            q.started_after = Some(end - chrono::Duration::days(11));
            q.started_before = Some(end - chrono::Duration::days(10));
        }),
    );
    list(
        "exec",
        Box::new(move |rng, q, _| q.exec_id = Some(format!("exec-{}", rng.u64(0..rows / 500)))),
    );
    list(
        "last hour",
        Box::new(|_, q, end| q.started_after = Some(end - chrono::Duration::hours(1))),
    );
    let ten_days_ago = |rng: &mut fastrand::Rng, q: &mut ListQuery, end: DateTime<Utc>| {
        let at = end - chrono::Duration::days(10) - chrono::Duration::minutes(rng.i64(0..600));
        q.started_after = Some(at);
        q.started_before = Some(at + chrono::Duration::hours(1));
    };
    list("an hour 10 days ago", Box::new(ten_days_ago));
    list(
        "failed in an hour 10 days ago",
        Box::new(move |rng, q, end| {
            ten_days_ago(rng, q, end);
            q.states = vec![finished(Failed)];
        }),
    );
    for (name, hours) in [
        ("summarize manifests, 1 h", 1),
        ("summarize manifests, 24 h", 24),
        ("summarize manifests, 7 d", 24 * 7),
    ] {
        cases.push(Case {
            name,
            make: Box::new(move |_| {
                Call::Summary(SummaryQuery {
                    started_after: end - chrono::Duration::hours(hours),
                    started_before: end,
                    manifest_id: None,
                    now: end,
                    lost_grace: grace,
                })
            }),
            // SPEC §15 sets the 24 h figure; the others are reported.
            target: if hours == 24 {
                SUMMARY_TARGET
            } else {
                Duration::MAX
            },
        });
    }
    cases
}

/// Builds the table when it is not there yet; returns the instant its data ends at.
async fn populate(store: &PostgresStore, rows: u64) -> anyhow::Result<DateTime<Utc>> {
    let pool = store.pool();
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM execution_results")
        .fetch_one(&pool)
        .await?;
    if have as u64 >= rows {
        let end: DateTime<Utc> =
            sqlx::query_scalar("SELECT max(received_at) FROM execution_results")
                .fetch_one(&pool)
                .await?;
        println!("reusing the table: {have} runs");
        return Ok(end);
    }
    let end = Utc::now();
    // The days the data spans need their partitions first, or the rows land in the default one.
    let first_day = (end - chrono::Duration::days(DAYS + 1)).date_naive();
    kanade_ingest::store::Store::prepare_days(store, first_day, DAYS as u32 + 4).await?;
    // Indexes are built once after the load: far faster than maintained row by row.
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'execution_results' \
         AND indexname <> 'execution_results_pkey'",
    )
    .fetch_all(&pool)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
            .execute(&pool)
            .await?;
    }
    let started = Instant::now();
    let chunk = 1_000_000u64;
    let mut from = have as u64 + 1;
    while from <= rows {
        let to = (from + chunk - 1).min(rows);
        sqlx::query(GENERATE)
            .bind(from as i64)
            .bind(to as i64)
            .bind(end)
            .bind(DAYS)
            .bind(rows as i64)
            .execute(&pool)
            .await
            .with_context(|| format!("generating rows {from}..={to}"))?;
        println!("  {to} rows ({:.0} s)", started.elapsed().as_secs_f64());
        from = to + 1;
    }
    let mut conn = pool.acquire().await?;
    sqlx::query("SET maintenance_work_mem = '1GB'")
        .execute(&mut *conn)
        .await?;
    for (name, def) in &indexes {
        // A partitioned table's index reads `ON ONLY`: built that way it would cover no partition.
        let def = def.replace(" ON ONLY ", " ON ");
        sqlx::query(sqlx::AssertSqlSafe(def))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("building {name}"))?;
    }
    drop(conn);
    sqlx::query("VACUUM ANALYZE execution_results")
        .execute(&pool)
        .await?;
    println!(
        "built {rows} runs and their indexes in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(end)
}

pub async fn run(args: ActivityArgs) -> anyhow::Result<()> {
    let base = args
        .database_url
        .rsplit_once('/')
        .map_or(args.database_url.as_str(), |(b, _)| b);
    let name = args
        .reuse
        .clone()
        .unwrap_or_else(|| format!("kanade_bench_{}", uuid::Uuid::new_v4().simple()));
    let admin = sqlx::PgPool::connect(&args.database_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
    }
    let url = format!("{base}/{name}");
    let store = PostgresStore::connect(&url).await?;
    kanade_ingest::store::Store::migrate(&store).await?;
    let end = populate(&store, args.rows).await?;

    let ingest = IngestProcess::start(&url, "127.0.0.1:0", &args.ingest_args)?;
    let mut client = ActivityClient::connect(format!("http://{}", ingest.addr)).await?;
    let grace = chrono::Duration::minutes(5);
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT result_id FROM execution_results TABLESAMPLE BERNOULLI (0.1) LIMIT 2000",
    )
    .fetch_all(&store.pool())
    .await?;
    anyhow::ensure!(!ids.is_empty(), "the table holds too few runs to sample");
    let mut rng = fastrand::Rng::with_seed(7);
    let mut cases = cases(end, grace, args.rows);
    let sampled = ids.clone();
    cases.push(Case {
        name: "get one run",
        make: Box::new(move |rng| Call::Get(sampled[rng.usize(0..sampled.len())])),
        target: LIST_TARGET,
    });
    println!(
        "{:<46} {:>9} {:>9} {:>7}",
        "case", "p50 ms", "p99 ms", "rows"
    );
    let mut over = Vec::new();
    for case in &cases {
        let mut times = Vec::with_capacity(args.calls);
        let mut rows = 0usize;
        let mut last = None;
        let case_began = Instant::now();
        for _ in 0..args.calls {
            let call = (case.make)(&mut rng);
            let began = Instant::now();
            rows += timed_call(&mut client, &call).await?;
            times.push(began.elapsed());
            last = Some(call);
            // A slow case (the 7-day summary) gets fewer calls, at least CASE_MIN_CALLS.
            if times.len() >= CASE_MIN_CALLS && case_began.elapsed() > CASE_TIME_BUDGET {
                break;
            }
        }
        report(
            case.name,
            case.target,
            &mut times,
            rows,
            &args,
            &mut over,
            last,
        );
    }
    for (name, filter) in [
        ("page 100 of all runs", ListQuery::all(end, grace, 50)),
        (
            "page 100 of succeeded runs",
            ListQuery {
                states: vec![RunState::Finished(ExecStatus::Succeeded)],
                ..ListQuery::all(end, grace, 50)
            },
        ),
        (
            "page 100 of failed runs",
            ListQuery {
                states: vec![RunState::Finished(ExecStatus::Failed)],
                ..ListQuery::all(end, grace, 50)
            },
        ),
    ] {
        let mut token = String::new();
        for _ in 0..99 {
            token = client
                .list_executions(list_request(&filter, token))
                .await?
                .into_inner()
                .next_page_token;
        }
        let mut times = Vec::with_capacity(args.calls);
        let mut rows = 0;
        for _ in 0..args.calls {
            let began = Instant::now();
            rows += client
                .list_executions(list_request(&filter, token.clone()))
                .await?
                .into_inner()
                .executions
                .len();
            times.push(began.elapsed());
        }
        report(name, LIST_TARGET, &mut times, rows, &args, &mut over, None);
    }
    // The console's pages (SPEC §15: within 50 ms of their query): the same queries as the
    // cases above, rendered as HTML, over HTTP/1.1.
    let console = ingest
        .console
        .context("ingest printed no console address")?;
    let sample = ids;
    let pages: [(&'static str, PagePath, Duration); 4] = [
        (
            "console / (running now + newest 50)",
            Box::new(|_| "/".into()),
            LIST_TARGET + PAGE_RENDER,
        ),
        (
            "console /?state=failed",
            Box::new(|_| "/?state=failed".into()),
            LIST_TARGET + PAGE_RENDER,
        ),
        (
            "console /runs/{id}",
            Box::new(move |rng| format!("/runs/{}", sample[rng.usize(0..sample.len())])),
            LIST_TARGET + PAGE_RENDER,
        ),
        (
            "console /manifests?window=24h",
            Box::new(|_| "/manifests?window=24h".into()),
            SUMMARY_TARGET + PAGE_RENDER,
        ),
    ];
    for (name, path, target) in &pages {
        let mut times = Vec::with_capacity(args.calls);
        let case_began = Instant::now();
        for _ in 0..args.calls {
            let path = path(&mut rng);
            let began = Instant::now();
            console_page(console, &path).await?;
            times.push(began.elapsed());
            if times.len() >= CASE_MIN_CALLS && case_began.elapsed() > CASE_TIME_BUDGET {
                break;
            }
        }
        report(name, *target, &mut times, 1, &args, &mut Vec::new(), None);
    }
    for (name, call) in over {
        let plan = match &call {
            Some(Call::List(q)) => store.explain_list(q).await?,
            Some(Call::Summary(q)) => store.explain_summary(q).await?,
            _ => continue,
        };
        println!("\nover target: {name}\n{plan}");
    }
    drop(ingest);
    if args.reuse.is_none() {
        store.pool().close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
    }
    Ok(())
}

/// Makes the path of a console page to time.
type PagePath = Box<dyn Fn(&mut fastrand::Rng) -> String>;

/// How long rendering may add to a page's query (SPEC §15).
const PAGE_RENDER: Duration = Duration::from_millis(50);

/// One console page over a fresh HTTP/1.1 connection.
async fn console_page(console: std::net::SocketAddr, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(console).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {console}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await?;
    anyhow::ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{path}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    Ok(())
}

async fn timed_call(client: &mut ActivityClient<Channel>, call: &Call) -> anyhow::Result<usize> {
    Ok(match call {
        Call::List(q) => client
            .list_executions(list_request(q, String::new()))
            .await?
            .into_inner()
            .executions
            .len(),
        Call::Get(id) => {
            client
                .get_execution(pb::GetExecutionRequest {
                    result_id: id.to_string(),
                })
                .await?;
            1
        }
        Call::Summary(q) => client
            .summarize_manifests(pb::SummarizeManifestsRequest {
                started_after: Some(timestamp_to_proto(q.started_after)),
                started_before: Some(timestamp_to_proto(q.started_before)),
                manifest_id: String::new(),
            })
            .await?
            .into_inner()
            .manifests
            .len(),
    })
}

fn report(
    name: &'static str,
    target: Duration,
    times: &mut [Duration],
    rows: usize,
    args: &ActivityArgs,
    over: &mut Vec<(&'static str, Option<Call>)>,
    last: Option<Call>,
) {
    times.sort_unstable();
    let at = |q: f64| kanade_testkit::percentile(times, q).expect("timed samples");
    let (p50, p99) = (at(0.5), at(0.99));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mark = if p99 > target { "  OVER TARGET" } else { "" };
    println!(
        "{name:<46} {:>9.2} {:>9.2} {:>7.1} {:>6}{mark}",
        ms(p50),
        ms(p99),
        rows as f64 / times.len() as f64,
        times.len()
    );
    if p99 > target {
        over.push((name, last));
    }
    if let Some(csv) = &args.csv {
        let summary = format!(
            "mode=activity rows={} case={} p50_ms={:.2} p99_ms={:.2}",
            args.rows,
            name.replace([' ', ','], "_"),
            ms(p50),
            ms(p99)
        );
        let _ = crate::report::append_csv(csv, &summary);
    }
}
