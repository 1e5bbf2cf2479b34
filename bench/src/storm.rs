//! `kanade-bench storm`: SPEC §15's storm. A fleet of agents, each with a backlog queued while
//! ingest was down, reconnects when ingest comes back and flushes into it at once: how long until
//! every event is committed, and whether every agent gets its turn (no agent starves while others
//! flush).
//!
//! Unlike `connections`, whose agents are idle (the storm there is handshakes only), every agent
//! here has work queued, so the storm is handshakes and a burst of writes from every stream.
//!
//! The agents are the real sender (`kanade_agent::sender`), each over its own connection, fed by
//! an in-memory queue that holds its backlog before the clock starts. They reconnect as the real
//! agent does: exponential backoff from the agent's base (200 ms) with full jitter, capped at
//! `--reconnect-max` (the agent's default, 30 s). Ingest is not running when they start, so for
//! the whole outage every attempt is refused and each agent's backoff climbs to the cap, as a
//! real fleet's would. Then the real ingest starts on the port they are trying, on a database
//! already migrated (as after a crash or an upgrade), and the clock starts when it says it is
//! listening.
//!
//! Three times per agent separate what a slow storm is made of:
//! - reconnect delay, restart → its first `Welcome`: the backoff's jitter, which ingest cannot
//!   shorten;
//! - drain from connect, first `Welcome` → its last ack: ingest's throughput and fairness;
//! - drain, restart → its last ack: the sum, which §15's targets are about.
//!
//! Ingest acks only after commit, so an agent's last ack means its events are committed; at the
//! end the database is counted to check that every run is there exactly once and finished.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::Args;
use kanade_agent::{
    config::{DEFAULT_RECONNECT_MAX, RECONNECT_BASE},
    outbox::Pending,
    sender::Queue,
};
use kanade_shared::wire::EventBody;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    load::{self, Latencies, MemoryQueue},
    process::{self, BenchDb, IngestProcess, RunCounts},
};

#[derive(Debug, Args)]
pub struct StormArgs {
    /// postgres://USER@HOST/DB (a fresh database is created beside it) or sqlite://ANY.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Simulated agents, each with its own stream over its own connection.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Events each agent has queued when ingest comes back: runs of two (EventStarted, then its
    /// ExecResult), so an even number.
    #[arg(long, default_value_t = 20)]
    pub events_per_agent: usize,
    /// Bytes of stdout in each run's result.
    #[arg(long, default_value_t = 200)]
    pub output_bytes: usize,
    /// How long ingest is down while the agents try to reach it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    /// The agents' longest wait between reconnects (the agent's `reconnect_max`; its default is
    /// what a fleet runs with). The first wait is up to 200 ms, doubling per failure, full jitter.
    #[arg(long, default_value_t = DEFAULT_RECONNECT_MAX.into())]
    pub reconnect_max: humantime::Duration,
    /// Give up, with an error, when no event has been acknowledged for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Append the summary as a CSV row to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// RUST_LOG for ingest (`info` is its default, what production runs).
    #[arg(long, default_value = "info")]
    pub ingest_rust_log: String,
    /// Extra flags for kanade-ingest (e.g. --batch-linger=2ms).
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    pub ingest_args: Vec<String>,
}

/// What every agent reports to, and what the benchmark watches while it waits.
struct Fleet {
    /// When the restarted ingest said it was listening.
    restarted: OnceLock<Instant>,
    /// Agents that have read a `Welcome`.
    connected: AtomicUsize,
    /// Agents whose every event is acknowledged.
    drained: watch::Sender<usize>,
    /// When the first ack arrived, anywhere.
    first_ack: OnceLock<Instant>,
    /// Attempts that failed before the restart (ingest down: refused).
    outage_failures: AtomicU64,
    /// Attempts that failed after the restart, by error: a healthy storm has none.
    later_failures: Mutex<BTreeMap<String, usize>>,
    /// Events ingest rejected (none should be: the benchmark's events are valid).
    rejected: Mutex<Vec<String>>,
}

/// One simulated agent: its backlog, and when things happened to it.
struct StormAgent {
    queue: MemoryQueue,
    fleet: Arc<Fleet>,
    /// Failed attempts so far.
    failures: AtomicU32,
    /// When it first read a `Welcome`.
    connected: OnceLock<Instant>,
    /// When its last queued event was acknowledged.
    drained: OnceLock<Instant>,
}

impl Queue for StormAgent {
    async fn pending(&self, after_seq: u64, limit: usize) -> anyhow::Result<Vec<Pending>> {
        self.queue.pending(after_seq, limit).await
    }

    async fn ack(&self, seqs: &[u64]) -> anyhow::Result<()> {
        self.queue.ack(seqs).await?;
        let now = Instant::now();
        let _ = self.fleet.first_ack.set(now);
        if self.queue.is_empty() && self.drained.set(now).is_ok() {
            self.fleet.drained.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    async fn dead_letter(&self, seq: u64, reason: &str) -> anyhow::Result<()> {
        self.fleet.rejected.lock().unwrap().push(reason.to_string());
        self.queue.dead_letter(seq, reason).await
    }

    /// The sender's account of its connection: "connected to …" after a `Welcome`,
    /// "disconnected from URL: ERROR" after each failed attempt.
    async fn set_connection(&self, state: &str) -> anyhow::Result<()> {
        if state.starts_with("connected") {
            if self.connected.set(Instant::now()).is_ok() {
                self.fleet.connected.fetch_add(1, Ordering::SeqCst);
            }
        } else if let Some(failure) = state.strip_prefix("disconnected from ") {
            self.failures.fetch_add(1, Ordering::SeqCst);
            if self.fleet.restarted.get().is_some() {
                let error = failure.split_once(": ").map_or(failure, |(_, e)| e);
                let key: String = error.chars().take(160).collect();
                *self
                    .fleet
                    .later_failures
                    .lock()
                    .unwrap()
                    .entry(key)
                    .or_default() += 1;
            } else {
                self.fleet.outage_failures.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn wake(&self) -> &Notify {
        self.queue.wake()
    }
}

/// p50, p99 and max of a time per agent, in seconds.
#[derive(Debug, Clone, Copy)]
struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Spread {
    fn of(mut times: Vec<Duration>) -> Spread {
        times.sort_unstable();
        let at =
            |q: f64| kanade_testkit::percentile(&times, q).map_or(f64::NAN, |d| d.as_secs_f64());
        Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    fn slowest_over_median(&self) -> f64 {
        self.max / self.p50
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            self.p50, self.p99, self.max
        )
    }
}

/// The fleet's progress, sampled once a second after the restart.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    connected: usize,
    acked: u64,
    drained: usize,
}

/// CPU seconds of the processes sharing the machine, read at the restart and at the end.
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    ingest: f64,
    postgres: f64,
    bench: f64,
    machine_busy: u64,
    machine_total: u64,
}

impl CpuReading {
    fn now(ingest: &IngestProcess, postgres: &process::PgCpu) -> CpuReading {
        let (machine_busy, machine_total) = process::machine_cpu_ticks();
        CpuReading {
            ingest: ingest.cpu_seconds(),
            postgres: postgres.seconds(),
            bench: process::cpu_seconds(std::process::id()),
            machine_busy,
            machine_total,
        }
    }
}

/// What one storm measured.
struct Measured {
    addr: String,
    /// From starting ingest to its "listening on" line.
    listening: Duration,
    /// Agents refused at least once during the outage.
    refused_agents: usize,
    timeline: Vec<Sample>,
    /// Restart → the last ack.
    all_committed: Duration,
    /// Restart → the first ack anywhere.
    first_ack: Duration,
    drain: Spread,
    reconnect: Spread,
    from_connect: Spread,
    cpu_before: CpuReading,
    cpu_after: CpuReading,
    ingest_peak_rss: u64,
    /// Attempts that failed after the restart, by error, until the last agent drained.
    later_failures: BTreeMap<String, usize>,
    counts: RunCounts,
}

pub async fn run(args: StormArgs) -> anyhow::Result<()> {
    ensure!(args.agents > 0, "--agents must be at least 1");
    ensure!(
        args.events_per_agent >= 2 && args.events_per_agent.is_multiple_of(2),
        "--events-per-agent must be a positive even number (runs of EventStarted + ExecResult), \
         not {}",
        args.events_per_agent
    );
    // One socket per agent in this process (ingest raises its own limit).
    let fd_limit = kanade_ingest::listen::raise_fd_limit().context("raising RLIMIT_NOFILE")?;
    let needed = args.agents as u64 + 512;
    ensure!(
        fd_limit >= needed,
        "{} agents need about {needed} open files in the benchmark (one socket each), but its \
         limit is {fd_limit}: raise the hard limit (ulimit -Hn)",
        args.agents
    );
    let db = BenchDb::fresh(&args.database_url).await?;
    let measured = storm(&args, &db).await;
    db.drop_database().await;
    report(&args, &measured?)
}

async fn storm(args: &StormArgs, db: &BenchDb) -> anyhow::Result<Measured> {
    let runs_per_agent = args.events_per_agent / 2;
    let total_events = (args.agents * args.events_per_agent) as u64;
    let reconnect_max: Duration = args.reconnect_max.into();
    // Migrated before the outage, as an upgrade does before the servers restart.
    kanade_ingest::store::open(&db.url, "kanade-bench")
        .await?
        .migrate()
        .await
        .context("migrating the benchmark database")?;
    let port = kanade_testkit::free_port_outside_ephemeral_range()?;
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let fleet = Arc::new(Fleet {
        restarted: OnceLock::new(),
        connected: AtomicUsize::new(0),
        drained: watch::Sender::new(0),
        first_ack: OnceLock::new(),
        outage_failures: AtomicU64::new(0),
        later_failures: Mutex::new(BTreeMap::new()),
        rejected: Mutex::new(Vec::new()),
    });
    let latencies = Arc::new(Latencies::default());

    // The backlogs, queued before anything runs.
    let agents: Vec<Arc<StormAgent>> = (0..args.agents)
        .map(|a| {
            let queue = MemoryQueue::new(latencies.clone());
            for _ in 0..runs_per_agent {
                let (started, result) = load::run_events(&pc_id(a), args.output_bytes);
                queue.enqueue(EventBody::Started(started));
                queue.enqueue(EventBody::Result(result));
            }
            Arc::new(StormAgent {
                queue,
                fleet: fleet.clone(),
                failures: AtomicU32::new(0),
                connected: OnceLock::new(),
                drained: OnceLock::new(),
            })
        })
        .collect();

    println!(
        "storm: {} agents × {} queued events ({runs_per_agent} runs of EventStarted + ExecResult \
         with {} B of stdout), ingest down for {:?} on {addr}; reconnect backoff {:?} doubling \
         to {:?}, full jitter",
        args.agents,
        args.events_per_agent,
        args.output_bytes,
        args.outage,
        RECONNECT_BASE,
        reconnect_max,
    );
    let stop = CancellationToken::new();
    let senders: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(a, agent)| {
            let config = load::agent_sender_config(&url, &pc_id(a), reconnect_max);
            load::spawn_sender_with(agent.clone(), config, &stop)
        })
        .collect();
    let measured = measure(args, db, &addr, &fleet, &agents, &latencies, total_events).await;
    stop.cancel();
    for sender in senders {
        let _ = sender.await;
    }
    measured
}

fn pc_id(agent: usize) -> String {
    format!("storm-{agent:05}")
}

/// The outage, the restart and the drain, with the senders running.
async fn measure(
    args: &StormArgs,
    db: &BenchDb,
    addr: &str,
    fleet: &Fleet,
    agents: &[Arc<StormAgent>],
    latencies: &Latencies,
    total_events: u64,
) -> anyhow::Result<Measured> {
    tokio::time::sleep(args.outage).await;
    let refused_agents = agents
        .iter()
        .filter(|a| a.failures.load(Ordering::SeqCst) > 0)
        .count();
    let outage_failures = fleet.outage_failures.load(Ordering::SeqCst);
    println!(
        "outage: {outage_failures} refused attempts ({:.1} per agent); {refused_agents}/{} \
         agents refused at least once",
        outage_failures as f64 / agents.len() as f64,
        agents.len(),
    );

    let mut ingest_args = vec![
        "--max-streams".to_string(),
        (agents.len() + 100).to_string(),
    ];
    ingest_args.extend(args.ingest_args.iter().cloned());
    let spawned = Instant::now();
    let mut ingest = {
        let (url, listen, log) = (
            db.url.clone(),
            addr.to_string(),
            args.ingest_rust_log.clone(),
        );
        tokio::task::spawn_blocking(move || {
            IngestProcess::start_logging(&url, &listen, &ingest_args, &log)
        })
        .await?
        .with_context(|| format!("starting ingest on {addr} after the outage"))?
    };
    let restarted = Instant::now();
    let _ = fleet.restarted.set(restarted);
    let listening = restarted - spawned;
    let postgres_cpu = process::PgCpu::start(db.name());
    let cpu_before = CpuReading::now(&ingest, &postgres_cpu);

    // The drain: wait until every agent has drained, sampling once a second.
    let mut drained_rx = fleet.drained.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut timeline = Vec::new();
    let (mut last_acked, mut last_progress) = (0u64, restarted);
    loop {
        tokio::select! {
            _ = drained_rx.wait_for(|n| *n >= agents.len()) => break,
            _ = tick.tick() => {}
        }
        let acked = latencies.acked.load(Ordering::SeqCst);
        timeline.push(Sample {
            at: restarted.elapsed(),
            connected: fleet.connected.load(Ordering::SeqCst),
            acked,
            drained: *fleet.drained.borrow(),
        });
        if acked > last_acked {
            (last_acked, last_progress) = (acked, Instant::now());
        }
        if let Some(status) = ingest.child.try_wait()? {
            bail!("ingest exited during the storm ({status}) with {acked}/{total_events} acked");
        }
        if last_progress.elapsed() >= args.stall_timeout {
            let rejected = fleet.rejected.lock().unwrap();
            let failures = fleet.later_failures.lock().unwrap();
            bail!(
                "no event acknowledged for {:?}: {acked}/{total_events} acked, {}/{} agents \
                 connected, {} drained; rejected: {:?}; failed attempts since the restart: {:?}",
                args.stall_timeout,
                fleet.connected.load(Ordering::SeqCst),
                agents.len(),
                *fleet.drained.borrow(),
                rejected.first(),
                *failures,
            );
        }
    }
    timeline.push(Sample {
        at: restarted.elapsed(),
        connected: fleet.connected.load(Ordering::SeqCst),
        acked: latencies.acked.load(Ordering::SeqCst),
        drained: *fleet.drained.borrow(),
    });
    let cpu_after = CpuReading::now(&ingest, &postgres_cpu);
    let ingest_peak_rss = ingest.peak_rss_bytes();
    let later_failures = fleet.later_failures.lock().unwrap().clone();
    let counts = db.run_counts().await?;
    drop(ingest);

    let since = |at: Instant, from: Instant| at.saturating_duration_since(from);
    let drained_at = |a: &StormAgent| *a.drained.get().expect("every agent drained");
    // An agent connects before it drains.
    let connected_at = |a: &StormAgent| *a.connected.get().unwrap_or(&drained_at(a));
    let last = agents.iter().map(|a| drained_at(a)).max();
    Ok(Measured {
        addr: addr.to_string(),
        listening,
        refused_agents,
        timeline,
        all_committed: last.map_or(Duration::ZERO, |l| since(l, restarted)),
        first_ack: fleet
            .first_ack
            .get()
            .map_or(Duration::ZERO, |f| since(*f, restarted)),
        drain: Spread::of(
            agents
                .iter()
                .map(|a| since(drained_at(a), restarted))
                .collect(),
        ),
        reconnect: Spread::of(
            agents
                .iter()
                .map(|a| since(connected_at(a), restarted))
                .collect(),
        ),
        from_connect: Spread::of(
            agents
                .iter()
                .map(|a| since(drained_at(a), connected_at(a)))
                .collect(),
        ),
        cpu_before,
        cpu_after,
        ingest_peak_rss,
        later_failures,
        counts,
    })
}

fn report(args: &StormArgs, m: &Measured) -> anyhow::Result<()> {
    let total_events = (args.agents * args.events_per_agent) as u64;
    let runs = (args.agents * args.events_per_agent / 2) as u64;
    let secs = m.all_committed.as_secs_f64();
    println!(
        "restart: ingest listening on {} {:.2} s after it was started (schema already migrated)",
        m.addr,
        m.listening.as_secs_f64()
    );
    println!(
        "timeline (seconds after the restart: agents connected, events acked, agents drained):"
    );
    let mut peak_rate = 0.0f64;
    let mut previous = (Duration::ZERO, 0u64);
    for s in &m.timeline {
        let rate = (s.acked - previous.1) as f64 / (s.at - previous.0).as_secs_f64().max(1e-3);
        peak_rate = peak_rate.max(rate);
        previous = (s.at, s.acked);
        println!(
            "  {:>5.1} s  {:>6} connected  {:>7} acked ({rate:>6.0}/s)  {:>6} drained",
            s.at.as_secs_f64(),
            s.connected,
            s.acked,
            s.drained
        );
    }
    let events_per_s = total_events as f64 / secs;
    println!(
        "all {total_events} events committed and acked {secs:.2} s after the restart (the first \
         ack at {:.2} s); {events_per_s:.0} events/s over the drain, {peak_rate:.0}/s \
         in the best second",
        m.first_ack.as_secs_f64(),
    );
    println!(
        "per agent, restart → drained: {}; slowest / median = {:.2}",
        m.drain.describe(),
        m.drain.slowest_over_median()
    );
    println!(
        "per agent, restart → first Welcome (the reconnect backoff): {}",
        m.reconnect.describe()
    );
    println!(
        "per agent, first Welcome → drained (ingest throughput and fairness): {}; slowest / \
         median = {:.2}",
        m.from_connect.describe(),
        m.from_connect.slowest_over_median()
    );
    let (before, after) = (m.cpu_before, m.cpu_after);
    let ingest_cpu = after.ingest - before.ingest;
    let machine_pct = 100.0 * (after.machine_busy - before.machine_busy) as f64
        / (after.machine_total - before.machine_total).max(1) as f64;
    println!(
        "cpu over the drain: ingest {ingest_cpu:.2} s ({:.0} % of one core), postgres {:.2} s, \
         bench {:.2} s; machine {machine_pct:.0} % busy (all cores); ingest peak RSS {:.1} MiB",
        100.0 * ingest_cpu / secs,
        after.postgres - before.postgres,
        after.bench - before.bench,
        m.ingest_peak_rss as f64 / 1048576.0,
    );
    let later_failures: usize = m.later_failures.values().sum();
    println!("failed attempts after the restart (retried with backoff): {later_failures}");
    let mut by_count: Vec<_> = m.later_failures.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1));
    for (error, n) in by_count.into_iter().take(5) {
        println!("  {n:>6} × {error}");
    }
    let c = m.counts;
    let verified =
        c.rows == runs && c.runs == runs && c.finished == runs && c.pcs == args.agents as u64;
    println!(
        "database: {} rows, {} distinct runs, {} finished, {} endpoints (expected {runs} runs of \
         {} agents){}",
        c.rows,
        c.runs,
        c.finished,
        c.pcs,
        args.agents,
        if verified {
            ": every run exactly once, finished"
        } else {
            ": MISMATCH"
        }
    );
    let summary = format!(
        "mode=storm agents={} events_per_agent={} events={total_events} outage_s={} \
         reconnect_base_ms={} reconnect_cap_s={} all_committed_s={secs:.2} \
         agent_drain_p50_s={:.2} agent_drain_p99_s={:.2} agent_drain_max_s={:.2} \
         slowest_over_median={:.2} reconnect_delay_p50_s={:.2} reconnect_delay_max_s={:.2} \
         from_connect_p50_s={:.2} from_connect_p99_s={:.2} from_connect_max_s={:.2} \
         from_connect_slowest_over_median={:.2} events_per_s={events_per_s:.0} \
         peak_events_per_s={peak_rate:.0} refused_agents={} \
         failed_after_restart={later_failures} ingest_listening_s={:.2} \
         ingest_cpu_pct={:.0} ingest_peak_rss_mib={:.1} postgres_cpu_s={:.2} bench_cpu_s={:.2} \
         machine_cpu_pct={machine_pct:.0} rows={} finished={} verified={verified}",
        args.agents,
        args.events_per_agent,
        args.outage.as_secs_f64(),
        RECONNECT_BASE.as_millis(),
        Duration::from(args.reconnect_max).as_secs_f64(),
        m.drain.p50,
        m.drain.p99,
        m.drain.max,
        m.drain.slowest_over_median(),
        m.reconnect.p50,
        m.reconnect.max,
        m.from_connect.p50,
        m.from_connect.p99,
        m.from_connect.max,
        m.from_connect.slowest_over_median(),
        m.refused_agents,
        m.listening.as_secs_f64(),
        100.0 * ingest_cpu / secs,
        m.ingest_peak_rss as f64 / 1048576.0,
        after.postgres - before.postgres,
        after.bench - before.bench,
        c.rows,
        c.finished,
    );
    if let Some(csv) = &args.csv {
        crate::report::append_csv(csv, &summary)?;
    }
    println!("{summary}");
    ensure!(
        verified,
        "the database does not hold every run exactly once and finished: {c:?}, expected {runs} \
         runs from {} agents",
        args.agents
    );
    Ok(())
}
