//! A real PostgreSQL streaming standby of the test server, for the read-replica tests: a base
//! backup (`pg_basebackup -R`) in a temporary directory, started with `pg_ctl` on a free
//! loopback port, stopped and started again at will.
//!
//! The test server must accept replication connections from 127.0.0.1 (`.ci/prepare-tests`
//! adds the `pg_hba.conf` line when it can). PostgreSQL refuses to run as root, so under root
//! the standby runs as the `postgres` user.
use std::{
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
    time::Duration,
};

use sqlx::{ConnectOptions, postgres::PgConnectOptions};

use crate::{
    db::{cleanup_on_test_server, postgres_admin_url},
    eventually, free_addr,
};

/// Names of the replication slots test standbys use on the test server.
const SLOT_PREFIX: &str = "kanade_test_standby_";

/// A standby streaming from the test server; stopped (immediately) when dropped.
pub struct Standby {
    port: u16,
    /// Its replication slot on the primary (dropped with the standby).
    slot: String,
    data: PathBuf,
    user: String,
    run_as: Option<String>,
    _dir: tempfile::TempDir,
}

/// Where a PostgreSQL server program is: `pg_config --bindir` (Debian keeps `pg_ctl` off PATH),
/// else PATH.
fn pg_program(name: &str) -> PathBuf {
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a PostgreSQL program, as `run_as` when given.
fn pg_command(run_as: Option<&str>, name: &str) -> Command {
    let program = pg_program(name);
    match run_as {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn run(mut command: Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The uid and gid of a system user (`id`; the harness needs no passwd parser of its own).
fn ids_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let mut command = Command::new("id");
        command.args([flag, user]);
        run(command, &format!("looking up user {user}"))
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

impl Standby {
    /// Makes a standby of the test server and waits until it accepts read-only connections.
    pub async fn start() -> Standby {
        let primary = PgConnectOptions::from_str(&postgres_admin_url()).expect("admin URL");
        let run_as = rustix::process::geteuid()
            .is_root()
            .then(|| "postgres".to_string());
        let dir = tempfile::Builder::new()
            .prefix("kanade-standby-")
            .tempdir()
            .expect("temp dir");
        if let Some(user) = &run_as {
            let (uid, gid) = ids_of(user);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown standby dir");
        }
        let data = dir.path().join("data");
        // A replication slot keeps the primary's WAL until the standby has it, so a standby that
        // was stopped catches up however much the other tests wrote meanwhile (CREATE DATABASE
        // checkpoints, which would otherwise recycle the segments it needs). Slots left behind
        // by a killed test run would keep WAL forever: those go first.
        let slot = format!("{SLOT_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let mut conn = primary
            .connect()
            .await
            .expect("connecting to the test server");
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE $1 AND NOT active",
        )
        .bind(format!("{SLOT_PREFIX}%"))
        .execute(&mut conn)
        .await
        .expect("dropping stale test slots");
        let mut backup = pg_command(run_as.as_deref(), "pg_basebackup");
        backup
            .args(["-h", primary.get_host()])
            .args(["-p", &primary.get_port().to_string()])
            .args(["-U", primary.get_username()])
            .arg("-D")
            .arg(&data)
            .args(["-X", "stream", "-R", "--checkpoint=fast", "--no-sync"])
            .args(["--create-slot", "--slot", &slot]);
        let out = backup.output().expect("running pg_basebackup");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let hint = if err.contains("pg_hba.conf") {
                "\nthe test server refuses replication connections: add \
                 `host replication all 127.0.0.1/32 trust` to its pg_hba.conf and reload it \
                 (.ci/prepare-tests does this)"
            } else {
                ""
            };
            panic!("pg_basebackup failed ({}):\n{err}{hint}", out.status);
        }
        let port = free_addr().port();
        // The base backup carries the primary's data directory; the configuration is the
        // standby's own (Debian keeps the primary's outside the data directory anyway), with
        // the settings a standby must not have below its primary's copied over.
        let mut conn = primary
            .connect()
            .await
            .expect("connecting to the test server");
        let mut at_least_primary = String::new();
        for setting in STANDBY_AT_LEAST_PRIMARY {
            let value: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(setting)
                .fetch_one(&mut conn)
                .await
                .expect("reading the primary's settings");
            at_least_primary.push_str(&format!("{setting} = {value}\n"));
        }
        write_config(&data, port, dir.path(), &at_least_primary);
        let standby = Standby {
            port,
            slot,
            data,
            user: primary.get_username().to_string(),
            run_as,
            _dir: dir,
        };
        standby.start_again().await;
        standby
    }

    /// The URL of `database` on the standby.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            self.user, self.port
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> String {
        let mut command = pg_command(self.run_as.as_deref(), "pg_ctl");
        command.arg("-D").arg(&self.data).args(args);
        run(command, &format!("pg_ctl {}", args.join(" ")))
    }

    /// Stops the standby (fast shutdown: connections are cut).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// Starts the (stopped) standby again and waits until it answers queries.
    pub async fn start_again(&self) {
        let log = self.data.join("standby.log");
        let mut command = pg_command(self.run_as.as_deref(), "pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .args(["start", "-w", "-t", "60", "-l"])
            .arg(&log);
        let out = command.output().expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "the standby did not start ({}); its log:\n{}",
            out.status,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let url = self.url("postgres");
        eventually(Duration::from_secs(60), "the standby answering", || {
            let url = url.clone();
            async move { self::in_recovery(&url).await == Some(true) }
        })
        .await;
    }

    /// Pauses WAL replay: the standby keeps answering, with what it had (a lagging replica).
    pub async fn pause_replay(&self) {
        self.sql("SELECT pg_wal_replay_pause()").await;
    }

    /// Resumes WAL replay: the standby catches up.
    pub async fn resume_replay(&self) {
        self.sql("SELECT pg_wal_replay_resume()").await;
    }

    async fn sql(&self, statement: &'static str) {
        let mut conn = PgConnectOptions::from_str(&self.url("postgres"))
            .expect("standby URL")
            .connect()
            .await
            .expect("connecting to the standby");
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{statement} on the standby: {e}"));
    }
}

/// `Some(true)` once the server at `url` answers as a standby.
async fn in_recovery(url: &str) -> Option<bool> {
    let mut conn = PgConnectOptions::from_str(url).ok()?.connect().await.ok()?;
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut conn)
        .await
        .ok()
}

/// Settings PostgreSQL refuses to recover with when the standby's are lower than the primary's.
const STANDBY_AT_LEAST_PRIMARY: [&str; 5] = [
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
];

fn write_config(data: &Path, port: u16, socket_dir: &Path, at_least_primary: &str) {
    let conf = format!(
        "port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{}'\n\
         hot_standby = on\n\
         {at_least_primary}\
         shared_buffers = 32MB\n\
         fsync = off\n\
         hba_file = '{}'\n\
         ident_file = '{}'\n",
        socket_dir.display(),
        data.join("pg_hba.conf").display(),
        data.join("pg_ident.conf").display(),
    );
    for (name, text) in [
        ("postgresql.conf", conf.as_str()),
        (
            "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        ),
        ("pg_ident.conf", ""),
    ] {
        // Written as root into a directory of the postgres user: the files stay readable
        // (0644) to the server.
        std::fs::write(data.join(name), text).expect("writing the standby's configuration");
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let mut command = pg_command(self.run_as.as_deref(), "pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate", "-w"]);
        let _ = command.output();
        // The slot name is ours (a prefix and a UUID's hex digits): safe to write in.
        cleanup_on_test_server(format!("SELECT pg_drop_replication_slot('{}')", self.slot));
    }
}
