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
    data_dir: PathBuf,
    ingest: String,
    pc_id: String,
}

/// The endpoint every [`AgentHome`] speaks for unless the test names another.
pub const TEST_PC_ID: &str = "pc-test";

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
        AgentHome::with_data_dir(ingest, extra, None)
    }

    /// Like [`AgentHome::new`], with the data dir at `data_dir` (say, on a [`SmallDisk`]).
    pub fn with_data_dir(ingest: &str, extra: &str, data_dir: Option<PathBuf>) -> AgentHome {
        AgentHome::build(TEST_PC_ID, ingest, extra, data_dir)
    }

    /// Like [`AgentHome::new`], for the endpoint `pc_id` (one of several agents in a test).
    pub fn named(pc_id: &str, ingest: &str, extra: &str) -> AgentHome {
        AgentHome::build(pc_id, ingest, extra, None)
    }

    fn build(pc_id: &str, ingest: &str, extra: &str, data_dir: Option<PathBuf>) -> AgentHome {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("agent.toml");
        let home = AgentHome {
            data_dir: data_dir.unwrap_or_else(|| dir.path().join("data")),
            dir,
            config,
            ingest: ingest.to_string(),
            pc_id: pc_id.to_string(),
        };
        home.rewrite(extra);
        home
    }

    /// Rewrites the config file with another `extra` part (same data dir and ingest).
    pub fn rewrite(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "pc_id = \"{}\"\ningest = \"{}\"\ndata_dir = \"{}\"\n{FAST}{extra}",
                self.pc_id,
                self.ingest,
                self.data_dir().display()
            ),
        )
        .unwrap();
    }

    /// The endpoint this agent speaks for.
    pub fn pc_id(&self) -> &str {
        &self.pc_id
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
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

/// A small tmpfs mounted for one test (the test runs as root: `mount -t tmpfs`), unmounted when
/// dropped. For what an agent does when its disk fills up.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `2m`).
    pub fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} failed: the disk-full tests need root",
            dir.path().display()
        );
        SmallDisk { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows (or shrinks) the filesystem in place, as freeing space would.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "resizing the tmpfs failed");
    }

    /// Fills what is left with a file, so the next write finds no room at all.
    pub fn fill(&self) -> PathBuf {
        let filler = self.dir.path().join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
