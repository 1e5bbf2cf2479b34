//! `kanade-bench presence`: what fleet presence costs the database with many idle agents (SPEC
//! §14's target: at most one statement per second per replica per 1,000 idle streams).
//!
//! K simulated agents open a stream each (sharing a few HTTP/2 connections: presence does not
//! care how streams are carried), say Hello, and then do what an idle agent does: send their
//! `AgentStatus` right after `Welcome` and every `--status-every` (the agent's 60 s), spread
//! over the interval. Ingest (real, on a fresh database) refreshes its streams every
//! `--presence-every` (30 s) on top. After the fleet is up and a first round of reports is in,
//! the benchmark counts over `--window`: the statements and rows ingest's presence writer sent
//! (its metrics), what PostgreSQL saw (`pg_stat_user_tables` for `endpoints`,
//! `pg_stat_database` transactions), and the CPU of ingest and PostgreSQL.
//!
//! The baseline, counted in the same window, is what one statement per presence message would
//! have been: the reports received plus the streams refreshed.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use kanade_shared::pb::{self, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    process::{BenchDb, IngestProcess, PgCpu},
    report,
};

#[derive(Debug, Args)]
pub struct PresenceArgs {
    /// postgres://USER@HOST/DB (a fresh database is created beside it) or sqlite://ANY.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Idle agent streams.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// HTTP/2 connections the streams share (real agents have one each; a connection carries
    /// fewer than 200 streams here, the server's limit of concurrent streams per connection).
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// How often each simulated agent reports (the agent's `status_every`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub status_every: Duration,
    /// Ingest's `--presence-every`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub presence_every: Duration,
    /// How long the idle fleet is counted.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// A counter of ingest's `/metrics` page.
async fn counter(metrics: SocketAddr, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(metrics).await?;
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut page = String::new();
    tcp.read_to_string(&mut page).await?;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("{name} is not on ingest's metrics page"))
}

/// What PostgreSQL counted for the bench database: (rows inserted + updated in `endpoints`,
/// transactions committed).
async fn pg_counts(db: &BenchDb) -> anyhow::Result<(i64, i64)> {
    let pool = sqlx::PgPool::connect(&db.url).await?;
    // The statistics a backend keeps are flushed at least every second; read after that.
    let rows: (i64,) = sqlx::query_as(
        "SELECT COALESCE(n_tup_ins + n_tup_upd, 0) FROM pg_stat_user_tables \
         WHERE relname = 'endpoints'",
    )
    .fetch_one(&pool)
    .await?;
    let xacts: (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok((rows.0, xacts.0))
}

/// One idle agent: Hello, then a report after Welcome and every `every` (from `offset` on).
async fn idle_agent(
    channel: Channel,
    pc_id: String,
    every: Duration,
    offset: Duration,
    reports: Arc<AtomicU64>,
    welcomed: mpsc::Sender<()>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            pc_id: pc_id.clone(),
            agent_version: "kanade-bench".into(),
        })),
    })
    .await?;
    let mut inbound = IngestClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(pb::IngestMessage {
            msg: Some(pb::ingest_message::Msg::Welcome(_)),
        }) => {}
        other => bail!("expected Welcome, got {other:?}"),
    }
    let _ = welcomed.send(()).await;
    let report = || pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Status(pb::AgentStatus {
            hostname: pc_id.clone(),
            os: "linux x86_64 (kanade-bench)".into(),
            ..Default::default()
        })),
    };
    tx.send(report()).await?;
    reports.fetch_add(1, Ordering::Relaxed);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                tx.send(report()).await?;
                reports.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing comes on an idle stream; reading keeps its window open.
            message = inbound.message() => if message?.is_none() { return Ok(()) },
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

pub async fn run(args: PresenceArgs) -> anyhow::Result<()> {
    let db = BenchDb::fresh(&args.database_url).await?;
    let metrics_addr = kanade_testkit::free_addr();
    let ingest = IngestProcess::start(
        &db.url,
        "127.0.0.1:0",
        &[
            "--presence-every".into(),
            humantime::format_duration(args.presence_every).to_string(),
            "--metrics-listen".into(),
            metrics_addr.to_string(),
            "--max-streams".into(),
            (args.streams + 100).to_string(),
        ],
    )?;
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://{}", ingest.addr))?
                .connect()
                .await
                .context("connecting to ingest")?,
        );
    }
    let stop = CancellationToken::new();
    let reports = Arc::new(AtomicU64::new(0));
    let (welcomed_tx, mut welcomed) = mpsc::channel(1024);
    let mut agents = tokio::task::JoinSet::new();
    let opened_at = Instant::now();
    for i in 0..args.streams {
        let offset = args.status_every.mul_f64(fastrand::f64());
        agents.spawn(idle_agent(
            channels[i % channels.len()].clone(),
            format!("bench-pc-{i:06}"),
            args.status_every,
            offset,
            reports.clone(),
            welcomed_tx.clone(),
            stop.clone(),
        ));
    }
    drop(welcomed_tx);
    for n in 0..args.streams {
        tokio::select! {
            got = welcomed.recv() => if got.is_none() { bail!("{n} of {} streams opened", args.streams) },
            Some(ended) = agents.join_next() => {
                ended??;
                bail!("an agent ended before the fleet was up");
            }
        }
    }
    let opening = opened_at.elapsed();
    println!(
        "{} idle streams open in {:.1} s; letting the first reports and a refresh land",
        args.streams,
        opening.as_secs_f64()
    );
    tokio::time::sleep(args.presence_every + Duration::from_secs(3)).await;

    let statements = "kanade_ingest_presence_statements_total";
    let rows = "kanade_ingest_presence_rows_total";
    let pg_cpu = db.is_postgres().then(|| PgCpu::start(db.name()));
    let before = (
        counter(metrics_addr, statements).await?,
        counter(metrics_addr, rows).await?,
        reports.load(Ordering::Relaxed),
        ingest.cpu_seconds(),
        pg_cpu.as_ref().map(PgCpu::seconds),
        if db.is_postgres() {
            Some(pg_counts(&db).await?)
        } else {
            None
        },
    );
    let began = Instant::now();
    tokio::time::sleep(args.window).await;
    let seconds = began.elapsed().as_secs_f64();
    // PostgreSQL's statistics trail by up to a second: count a moment later, over the same span.
    let after = (
        counter(metrics_addr, statements).await?,
        counter(metrics_addr, rows).await?,
        reports.load(Ordering::Relaxed),
        ingest.cpu_seconds(),
        pg_cpu.as_ref().map(PgCpu::seconds),
        if db.is_postgres() {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Some(pg_counts(&db).await?)
        } else {
            None
        },
    );
    stop.cancel();
    while agents.join_next().await.is_some() {}
    let streams_k = args.streams as f64 / 1000.0;
    let statements_per_s = (after.0 - before.0) / seconds;
    let rows_per_s = (after.1 - before.1) / seconds;
    let reports_per_s = (after.2 - before.2) as f64 / seconds;
    let refreshes_per_s = args.streams as f64 / args.presence_every.as_secs_f64();
    let messages_per_s = reports_per_s + refreshes_per_s;
    let ingest_cpu = (after.3 - before.3) / seconds;
    println!(
        "over {seconds:.0} s: {statements_per_s:.2} presence statements/s carrying {rows_per_s:.0} rows/s \
         = {:.3} statements/s per 1,000 idle streams (target ≤ 1)",
        statements_per_s / streams_k
    );
    println!(
        "baseline, one statement per presence message: {messages_per_s:.0}/s ({reports_per_s:.0} reports + \
         {refreshes_per_s:.0} stream refreshes); batched: {:.4} of it",
        statements_per_s / messages_per_s
    );
    let mut pg = String::new();
    if let (Some((rows_before, xacts_before)), Some((rows_after, xacts_after))) =
        (before.5, after.5)
    {
        let pg_rows = (rows_after - rows_before) as f64 / seconds;
        let xacts = (xacts_after - xacts_before) as f64 / seconds;
        println!(
            "PostgreSQL: {pg_rows:.0} endpoint rows written/s; {xacts:.2} transactions/s in the \
             database (presence, health probes, the fleet count, pending cancels)"
        );
        pg = format!(" pg_endpoint_rows_per_s={pg_rows:.0} pg_xacts_per_s={xacts:.2}");
    }
    if let (Some(a), Some(b)) = (before.4, after.4) {
        let cpu = (b - a) / seconds;
        println!(
            "CPU: ingest {:.2} %, PostgreSQL {:.2} % of one core",
            ingest_cpu * 100.0,
            cpu * 100.0
        );
        pg.push_str(&format!(" pg_cpu_pct={:.2}", cpu * 100.0));
    }
    drop(ingest);
    db.drop_database().await;
    let summary = format!(
        "mode=presence streams={} window_s={seconds:.0} statements_per_s={statements_per_s:.3} \
         rows_per_s={rows_per_s:.1} statements_per_s_per_1k_streams={:.4} messages_per_s={messages_per_s:.1} \
         ingest_cpu_pct={:.2}{pg}",
        args.streams,
        statements_per_s / streams_k,
        ingest_cpu * 100.0
    );
    if let Some(csv) = &args.csv {
        report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
