//! The real `kanade-ingest` binary as a child process, and what /proc says about it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kanade_shared::pb::{self, activity_client::ActivityClient};
use tonic::transport::Channel;

/// A binary of this workspace, built next to the benchmark (`cargo build --release --workspace`).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("benchmark executable has no directory")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build everything first with `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// A running ingest process.
pub struct IngestProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where its web console listens.
    pub console: Option<SocketAddr>,
}

impl IngestProcess {
    /// Starts ingest and waits for its "listening on" line.
    pub fn start(
        database_url: &str,
        listen: &str,
        extra: &[String],
    ) -> anyhow::Result<IngestProcess> {
        IngestProcess::start_logging(database_url, listen, extra, "warn")
    }

    /// Starts ingest with a given `RUST_LOG` (its default, `info`, is what production runs).
    pub fn start_logging(
        database_url: &str,
        listen: &str,
        extra: &[String],
        rust_log: &str,
    ) -> anyhow::Result<IngestProcess> {
        let mut child = Command::new(workspace_binary("kanade-ingest")?)
            .args(["--listen", listen, "--database-url", database_url])
            // Several replicas run side by side: none takes the console's default port.
            .args(["--console-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting kanade-ingest")?;
        let stdout = child.stdout.take().context("ingest stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .context("kanade-ingest exited before listening")??;
        let addr = line
            .rsplit_once("listening on ")
            .context("unexpected first line from kanade-ingest")?
            .1
            .trim()
            .parse()?;
        let console = match lines.next() {
            Some(line) => {
                let line = line?;
                line.strip_prefix("console on http://")
                    .or_else(|| line.strip_prefix("console on https://"))
                    .map(|a| a.trim().parse())
                    .transpose()?
            }
            None => None,
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(IngestProcess {
            child,
            addr,
            console,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the process used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Resident memory now.
    pub fn rss_bytes(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// Highest resident memory so far.
    pub fn peak_rss_bytes(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds of a process from /proc/PID/stat (clock ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is parenthesised and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The PostgreSQL server processes working for `database`: its backends (their process title
/// names the database) and the server's shared writers (WAL writer, checkpointer, background
/// writer), which work for every database and so also count what else ran meanwhile.
fn postgres_processes(database: &str) -> Vec<u32> {
    const SHARED: [&str; 3] = ["walwriter", "checkpointer", "background writer"];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter(|pid| {
            let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let title = title.trim_end_matches('\0');
            title.split_whitespace().any(|word| word == database)
                || SHARED.iter().any(|shared| title.ends_with(shared))
        })
        .collect()
}

/// PostgreSQL's CPU for one database, measured from [`PgCpu::start`] to [`PgCpu::seconds`]:
/// backends that ended in between are missed (the pools here keep theirs open).
pub struct PgCpu {
    database: String,
    before: std::collections::HashMap<u32, f64>,
}

impl PgCpu {
    pub fn start(database: &str) -> PgCpu {
        let database = database.to_string();
        let before = postgres_processes(&database)
            .into_iter()
            .map(|pid| (pid, cpu_seconds(pid)))
            .collect();
        PgCpu { database, before }
    }

    /// CPU seconds since `start`, backends started since included whole.
    pub fn seconds(&self) -> f64 {
        postgres_processes(&self.database)
            .into_iter()
            .map(|pid| cpu_seconds(pid) - self.before.get(&pid).copied().unwrap_or(0.0))
            .sum()
    }
}

/// CPU seconds this benchmark process used so far (its simulated agents).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}

/// The whole machine's CPU time so far from /proc/stat, in clock ticks: (busy, total), where
/// busy is everything but idle and iowait.
pub fn machine_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A `VmXXX:` line of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Counts over `execution_results`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunCounts {
    /// Rows.
    pub rows: u64,
    /// Distinct `result_id`s: equal to `rows` when no run has two rows.
    pub runs: u64,
    /// Rows with a result (`finished_at` set).
    pub finished: u64,
    /// Distinct `pc_id`s.
    pub pcs: u64,
}

/// A database of its own for one measurement: a fresh PostgreSQL database on the server the URL
/// names, or a fresh SQLite file.
pub struct BenchDb {
    pub url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl BenchDb {
    pub async fn fresh(url: &str) -> anyhow::Result<BenchDb> {
        if url.starts_with("sqlite:") {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            return Ok(BenchDb {
                url,
                admin: None,
                _dir: Some(dir),
            });
        }
        let name = format!("kanade_bench_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await?;
        pool.close().await;
        let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
        Ok(BenchDb {
            url: format!("{base}/{name}"),
            admin: Some((url.to_string(), name)),
            _dir: None,
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.admin.is_some()
    }

    /// The database's name (the SQLite file's path).
    pub fn name(&self) -> &str {
        self.admin
            .as_ref()
            .map_or(self.url.as_str(), |(_, name)| name.as_str())
    }

    /// What `execution_results` holds, counted by the database.
    pub async fn run_counts(&self) -> anyhow::Result<RunCounts> {
        const COUNTS: &str = "SELECT count(*), count(DISTINCT result_id), \
             count(*) FILTER (WHERE finished_at IS NOT NULL), count(DISTINCT pc_id) \
             FROM execution_results";
        let (rows, runs, finished, pcs): (i64, i64, i64, i64) = if self.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.url).await?;
            let counts = sqlx::query_as(COUNTS).fetch_one(&pool).await?;
            pool.close().await;
            counts
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url).await?;
            let counts = sqlx::query_as(COUNTS).fetch_one(&pool).await?;
            pool.close().await;
            counts
        };
        Ok(RunCounts {
            rows: rows as u64,
            runs: runs as u64,
            finished: finished as u64,
            pcs: pcs as u64,
        })
    }

    /// Drops the PostgreSQL database (call when done).
    pub async fn drop_database(mut self) {
        if let Some((admin, name)) = self.admin.take() {
            drop_postgres_database(&admin, &name).await;
        }
    }
}

async fn drop_postgres_database(admin: &str, name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

/// A benchmark that stops early (an error, a failed check) leaves no database behind: a
/// read-path table is gigabytes.
impl Drop for BenchDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.admin.take() else {
            return;
        };
        // Its own thread and runtime: this may run inside the benchmark's runtime.
        let shown = name.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(drop_postgres_database(&admin, &name)))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the benchmark's database {shown}: drop it by hand");
        }
    }
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The run a fresh `exec` started, once ingest lists it as running.
pub async fn running(
    activity: &mut ActivityClient<Channel>,
    manifest: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = activity
            .list_executions(pb::ListExecutionsRequest {
                states: vec![pb::ExecutionState::Running as i32],
                manifest_id: manifest.to_string(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if let Some(run) = page.executions.first() {
            return Ok(run.result_id.clone());
        }
        if Instant::now() > deadline {
            bail!("run {manifest} was never listed as running");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Two real ingest replicas on one fresh PostgreSQL database and a real agent daemon streaming to
/// the first ("near"): the setting of the modes that act through the replica holding an agent's
/// stream and through another (cancel, tail).
pub struct TwoReplicas {
    pub db: BenchDb,
    pub near: IngestProcess,
    pub other: IngestProcess,
    pub near_channel: Channel,
    pub other_channel: Channel,
    /// The agent's config file (its data dir beside it) and binary, for `exec` runs.
    pub config: PathBuf,
    pub agent: PathBuf,
    /// The daemon, until [`TwoReplicas::stop_daemon`].
    pub daemon: Option<Guard>,
    dir: tempfile::TempDir,
}

impl TwoReplicas {
    /// Starts everything; the agent speaks for `pc_id`. `mode` names what needs PostgreSQL.
    pub async fn start(database_url: &str, pc_id: &str, mode: &str) -> anyhow::Result<TwoReplicas> {
        let db = BenchDb::fresh(database_url).await?;
        if !db.is_postgres() {
            bail!("{mode} through another replica needs PostgreSQL (--database-url postgres://…)");
        }
        let near = IngestProcess::start(&db.url, "127.0.0.1:0", &[])?;
        let other = IngestProcess::start(&db.url, "127.0.0.1:0", &[])?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "pc_id = \"{pc_id}\"\ningest = \"http://{}\"\ndata_dir = \"{}\"\n",
                near.addr,
                dir.path().join("data").display()
            ),
        )?;
        let agent = workspace_binary("kanade-agent")?;
        let daemon = Guard(
            Command::new(&agent)
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("starting the agent daemon")?,
        );
        let connect = |addr: SocketAddr| async move {
            Channel::from_shared(format!("http://{addr}"))
                .expect("an address")
                .connect()
                .await
        };
        let (near_channel, other_channel) = (connect(near.addr).await?, connect(other.addr).await?);
        Ok(TwoReplicas {
            db,
            near,
            other,
            near_channel,
            other_channel,
            config,
            agent,
            daemon: Some(daemon),
            dir,
        })
    }

    /// A directory for the mode's own files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn stop_daemon(&mut self) {
        self.daemon = None;
    }

    /// Stops the processes, then drops the database.
    pub async fn finish(self) {
        let TwoReplicas {
            db,
            near,
            other,
            daemon,
            ..
        } = self;
        drop((daemon, near, other));
        db.drop_database().await;
    }
}
