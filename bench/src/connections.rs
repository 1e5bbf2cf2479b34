//! `kanade-bench connections`: what an idle agent stream costs ingest, and how long a fleet takes
//! to come back after ingest dies.
//!
//! K simulated agents each open their own TCP connection (their own tonic channel), send `Hello`,
//! read `Welcome` and then send nothing: HTTP/2 keepalive is the only traffic, as from an idle
//! agent. Ingest's resident memory before and after the K streams gives the cost per stream.
//! Then ingest is SIGKILLed and a new one started on the same address and database; every agent
//! reconnects the way the real sender does (a fresh connection, exponential backoff with full
//! jitter, the delay's ceiling doubling on every failure and never reset, since an idle agent
//! never sees an ack), and is counted back when it has read the new `Welcome`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use kanade_shared::{
    backoff::Backoff,
    pb::{self, ingest_client::IngestClient},
};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Streaming,
    transport::{Channel, Endpoint},
};

use crate::process::{self, BenchDb, IngestProcess};

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    /// Idle agent streams, each over its own TCP connection.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// sqlite://ANY (a fresh file) or postgres://USER@HOST/DB (a fresh database beside it).
    #[arg(long, default_value = "sqlite://bench")]
    pub database_url: String,
    /// Streams being opened at once while the fleet first comes up (the storm is not gated).
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Pause after the last stream opened before ingest's memory is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Then ingest's CPU is watched this long while the streams idle: longer than the agents'
    /// 10 s keepalive, so the pings are what it measures (0 skips it).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
    /// Ceiling of the first reconnect delay; it doubles per failure (the agent's default).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// No reconnect delay is longer than this (the agent's `reconnect_max` default).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_cap: Duration,
    /// Stop waiting for the fleet to open, or to reconnect, after this long.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Extra flags for kanade-ingest (e.g. --max-stream-age=1h).
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    pub ingest_args: Vec<String>,
}

/// What the simulated agents report back.
struct Fleet {
    /// Agents that have read their first `Welcome`.
    opened: watch::Sender<usize>,
    /// Agents that have read a `Welcome` from the restarted ingest.
    reconnected: watch::Sender<usize>,
    /// When the new ingest was started.
    restarted_at: OnceLock<Instant>,
    /// Per agent: from the restart to its new `Welcome`.
    reconnect_times: Mutex<Vec<Duration>>,
    /// While the fleet first comes up, opening is gated; the storm is not.
    opening: AtomicBool,
    /// Failed attempts to open a stream, by error.
    failures: Mutex<BTreeMap<String, usize>>,
}

impl Fleet {
    fn failed(&self, error: &anyhow::Error) {
        let key: String = format!("{error:#}").chars().take(160).collect();
        *self.failures.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// One open stream: held, never written to, until it breaks.
struct Session {
    _client: IngestClient<Channel>,
    _outbound: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::IngestMessage>,
}

/// Connects (a fresh TCP connection), sends `Hello` and reads `Welcome`.
async fn open(endpoint: &Endpoint, pc_id: &str) -> anyhow::Result<Session> {
    let channel = endpoint.connect().await.context("connecting")?;
    let mut client = IngestClient::new(channel);
    // Nothing is sent after Hello: the smallest channel will do.
    let (outbound, rx) = mpsc::channel(1);
    outbound
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                pc_id: pc_id.to_string(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        })
        .await
        .context("queueing Hello")?;
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .context("opening the stream")?
        .into_inner();
    match inbound.message().await.context("waiting for Welcome")? {
        Some(pb::IngestMessage {
            msg: Some(pb::ingest_message::Msg::Welcome(_)),
        }) => Ok(Session {
            _client: client,
            _outbound: outbound,
            inbound,
        }),
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
}

/// One idle agent: opens its stream, holds it, and reconnects like the real sender when it
/// breaks, until `stop`.
async fn agent(
    pc_id: String,
    endpoint: Endpoint,
    backoff: Backoff,
    gate: Arc<Semaphore>,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut retry = false;
    let mut counted_open = false;
    let mut counted_reconnect = false;
    loop {
        if retry {
            let delay = backoff.next_delay(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
        retry = true;
        let permit = if fleet.opening.load(Ordering::SeqCst) {
            gate.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let opened = tokio::select! {
            o = open(&endpoint, &pc_id) => o,
            _ = stop.cancelled() => return,
        };
        drop(permit);
        let mut session = match opened {
            Ok(s) => s,
            Err(e) => {
                fleet.failed(&e);
                continue;
            }
        };
        let now = Instant::now();
        let was_open = counted_open;
        if !counted_open {
            counted_open = true;
            fleet.opened.send_modify(|n| *n += 1);
        }
        if let Some(&restarted) = fleet.restarted_at.get()
            && was_open
            && !counted_reconnect
        {
            counted_reconnect = true;
            fleet
                .reconnect_times
                .lock()
                .unwrap()
                .push(now.saturating_duration_since(restarted));
            fleet.reconnected.send_modify(|n| *n += 1);
        }
        loop {
            tokio::select! {
                m = session.inbound.message() => if !matches!(m, Ok(Some(_))) { break },
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Waits until `counter` reaches `target` or `timeout` passes; returns the count reached.
async fn wait_for(counter: &watch::Sender<usize>, target: usize, timeout: Duration) -> usize {
    let mut rx = counter.subscribe();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= target)).await;
    *counter.borrow()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    let k = args.streams;
    let db = BenchDb::fresh(&args.database_url).await?;
    let mut ingest_args = vec!["--max-streams".to_string(), (k + 100).to_string()];
    ingest_args.extend(args.ingest_args.iter().cloned());
    let ingest = {
        let (url, extra) = (db.url.clone(), ingest_args.clone());
        tokio::task::spawn_blocking(move || IngestProcess::start(&url, "127.0.0.1:0", &extra))
            .await??
    };
    let addr = ingest.addr;
    // Let the runtime finish starting (threads, pools) before the baseline is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = ingest.rss_bytes();
    let bench_rss_before = process::status_kib(std::process::id(), "VmRSS:") * 1024;

    // The same connection settings as the agent's sender.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let backoff = Backoff {
        base: args.backoff_base,
        cap: args.backoff_cap,
    };
    let fleet = Arc::new(Fleet {
        opened: watch::Sender::new(0),
        reconnected: watch::Sender::new(0),
        restarted_at: OnceLock::new(),
        reconnect_times: Mutex::new(Vec::with_capacity(k)),
        opening: AtomicBool::new(true),
        failures: Mutex::new(BTreeMap::new()),
    });
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let stop = CancellationToken::new();
    let mut agents = JoinSet::new();

    println!(
        "opening {k} idle streams to ingest at {addr} ({} at a time)",
        args.concurrency
    );
    let opening_started = Instant::now();
    for i in 0..k {
        agents.spawn(agent(
            format!("conn-{i}"),
            endpoint.clone(),
            backoff,
            gate.clone(),
            fleet.clone(),
            stop.clone(),
        ));
    }
    let opened = wait_for(&fleet.opened, k, args.timeout).await;
    let open_s = opening_started.elapsed().as_secs_f64();
    fleet.opening.store(false, Ordering::SeqCst);
    tokio::time::sleep(args.settle).await;
    let rss_after = ingest.rss_bytes();
    let bench_rss = process::status_kib(std::process::id(), "VmRSS:") * 1024;
    let bytes_per_stream = rss_after.saturating_sub(rss_before) as f64 / opened.max(1) as f64;
    println!(
        "{opened}/{k} streams open in {open_s:.1} s; ingest RSS {:.1} MiB before, {:.1} MiB after: \
         {:.0} bytes ({:.1} KiB) per idle stream; bench RSS {:.1} MiB (was {:.1})",
        mib(rss_before),
        mib(rss_after),
        bytes_per_stream,
        bytes_per_stream / 1024.0,
        mib(bench_rss),
        mib(bench_rss_before),
    );
    let idle_cpu_pct = if args.idle.is_zero() {
        None
    } else {
        let cpu = ingest.cpu_seconds();
        tokio::time::sleep(args.idle).await;
        let pct = 100.0 * (ingest.cpu_seconds() - cpu) / args.idle.as_secs_f64();
        println!(
            "idle: ingest used {pct:.1} % of one core over {:?} holding {opened} streams \
             (keepalive pings only), RSS {:.1} MiB",
            args.idle,
            mib(ingest.rss_bytes()),
        );
        Some(pct)
    };

    // The reconnect storm: SIGKILL, then a new ingest on the same address and database.
    let killed_at = Instant::now();
    tokio::task::spawn_blocking(move || drop(ingest)).await?;
    let restarted_at = Instant::now();
    let _ = fleet.restarted_at.set(restarted_at);
    let ingest = {
        let (url, extra, listen) = (db.url.clone(), ingest_args.clone(), addr.to_string());
        tokio::task::spawn_blocking(move || IngestProcess::start(&url, &listen, &extra))
            .await?
            .with_context(|| format!("restarting ingest on {addr}"))?
    };
    let listening_s = restarted_at.elapsed().as_secs_f64();
    let reconnected = wait_for(&fleet.reconnected, opened, args.timeout).await;
    let all_s = restarted_at.elapsed().as_secs_f64();
    let storm_cpu = ingest.cpu_seconds();
    let storm_peak_rss = ingest.peak_rss_bytes();
    let storm_rss = ingest.rss_bytes();

    stop.cancel();
    while agents.join_next().await.is_some() {}
    drop(ingest);
    db.drop_database().await;

    let mut times = fleet.reconnect_times.lock().unwrap().clone();
    times.sort_unstable();
    let at = |q: f64| kanade_testkit::percentile(&times, q).map_or(f64::NAN, |d| d.as_secs_f64());
    let failed = k - reconnected;
    println!(
        "storm: ingest SIGKILLed (reaped in {:.2} s), restarted on {addr}, listening after \
         {listening_s:.2} s; {reconnected}/{opened} reconnected, all within {all_s:.2} s \
         (per agent p50 {:.2} s, p99 {:.2} s, max {:.2} s); backoff {:?} doubling to {:?}, full \
         jitter",
        restarted_at.duration_since(killed_at).as_secs_f64(),
        at(0.5),
        at(0.99),
        at(1.0),
        backoff.base,
        backoff.cap,
    );
    println!(
        "storm: new ingest used {storm_cpu:.2} CPU s ({:.0} % of one core), peak RSS {:.1} MiB, \
         RSS {:.1} MiB with the fleet back",
        100.0 * storm_cpu / all_s,
        mib(storm_peak_rss),
        mib(storm_rss),
    );
    let failures = fleet.failures.lock().unwrap();
    if !failures.is_empty() {
        let total: usize = failures.values().sum();
        println!("failed attempts to open a stream (retried with backoff): {total}");
        let mut by_count: Vec<_> = failures.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        for (error, n) in by_count.into_iter().take(5) {
            println!("  {n:>6} × {error}");
        }
    }
    let summary = format!(
        "mode=connections streams={k} rss_before_mib={:.1} rss_after_mib={:.1} \
         bytes_per_stream={bytes_per_stream:.0} reconnect_all_s={all_s:.2} \
         reconnect_p50_s={:.2} reconnect_p99_s={:.2} failed={failed} opened={opened} \
         open_s={open_s:.1} idle_cpu_pct={} restart_listening_s={listening_s:.2} \
         storm_cpu_s={storm_cpu:.2} storm_peak_rss_mib={:.1} bench_rss_mib={:.1} \
         backoff_base_ms={} backoff_cap_s={}",
        mib(rss_before),
        mib(rss_after),
        at(0.5),
        at(0.99),
        idle_cpu_pct.map_or("na".to_string(), |p| format!("{p:.1}")),
        mib(storm_peak_rss),
        mib(bench_rss),
        backoff.base.as_millis(),
        backoff.cap.as_secs(),
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    Ok(())
}
