//! Agent-side harness: a data dir with a config file, the real `kanade-agent` binary as a daemon
//! or for one `exec`, and a view of the outbox.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use kanade_agent::{config::Synchronous, outbox::Outbox};

use crate::workspace_binary;

/// A data dir and config file of its own, plus the settings tests scale down.
pub struct AgentHome {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    ingest: String,
}

/// Fast timings so no test waits for production defaults.
pub const FAST: &str = r#"
keepalive = "500ms"
keepalive_timeout = "1s"
reconnect_max = "500ms"
interrupted_check = "300ms"
kill_grace = "300ms"
shutdown_grace = "2s"
"#;

impl AgentHome {
    /// `ingest` is a URL; `extra` is appended to the config file (e.g. `[[job]]` tables).
    pub fn new(ingest: &str, extra: &str) -> AgentHome {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("agent.toml");
        let home = AgentHome {
            dir,
            config,
            ingest: ingest.to_string(),
        };
        home.rewrite(extra);
        home
    }

    /// Rewrites the config file with another `extra` part (same data dir and ingest).
    pub fn rewrite(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "pc_id = \"pc-test\"\ningest = \"{}\"\ndata_dir = \"{}\"\n{FAST}{extra}",
                self.ingest,
                self.data_dir().display()
            ),
        )
        .unwrap();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A `kanade-agent` command with this home's config.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_binary("kanade-agent"));
        let config = self.config.display().to_string();
        if let Some((sub, rest)) = args.split_first() {
            cmd.arg(sub).args(["--config", &config]).args(rest);
        }
        cmd.env("RUST_LOG", "info");
        cmd
    }

    /// Runs `kanade-agent exec [flags] --manifest M -- argv` to completion.
    pub fn exec(&self, flags: &[&str], manifest: &str, argv: &[&str]) -> Output {
        let mut args = vec!["exec"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--manifest", manifest, "--"]);
        args.extend_from_slice(argv);
        self.command(&args)
            .output()
            .expect("running kanade-agent exec")
    }

    /// Starts the daemon; it is killed when the returned guard drops.
    pub fn daemon(&self) -> Daemon {
        let log = self
            .dir
            .path()
            .join(format!("daemon-{}.log", uuid::Uuid::new_v4()));
        let child = self
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the daemon");
        Daemon { child, log }
    }

    /// The outbox, opened from the test process (several processes may share it).
    pub async fn outbox(&self) -> Outbox {
        Outbox::open(&self.data_dir(), Synchronous::Full, 512 * 1024 * 1024)
            .await
            .expect("opening the outbox")
    }
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "daemon ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub fn signal(pid: u32, name: &str) {
    Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
}

/// Whether a process exists (signal 0).
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
}
