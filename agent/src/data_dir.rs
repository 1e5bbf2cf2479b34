//! The agent's data dir: every file in it, and the locks and socket through which the agent
//! processes sharing it (one daemon, any number of `exec`) coordinate.
//!
//! Layout (directory 0700, files 0600):
//! - `outbox.db` (+ its `-wal` and `-shm`): the outbox, see [`crate::outbox`].
//! - `open.lock`: held while a process opens and migrates the outbox, so two processes opening a
//!   fresh data dir at once do not race the journal-mode switch or the migrations.
//! - `sender.lock`: held by the one process that streams the outbox to ingest (the daemon, or an
//!   `exec --wait` when no daemon runs).
//! - `runs/RESULT_ID.lock`: held by the process running that run. A run journalled as running
//!   whose lock is free belongs to a process that died; pids are never consulted (they are
//!   reused).
//! - `runs/RESULT_ID.sock`: the running run listens here for what the sending process passes on
//!   from ingest (an operator's cancel), see [`crate::control`].
//! - `wake.sock`: the sending process listens on this datagram socket; any other process pokes
//!   it after enqueueing, so events leave at once instead of at the next poll.
//! - `output.sock`: the sending process listens here for the live output of runs someone
//!   watches, whichever process runs them, see [`crate::live`].
//! - `outbox.reserve`: [`RESERVE_BYTES`] of real blocks, kept so that a run whose Started was
//!   committed can always commit its result: when the disk fills, the agent deletes it to make
//!   room, and writes it again once there is room (a run only starts while it exists).
//!
//! Locks are advisory `flock`s on files whose contents are never used: the kernel releases them
//! when their process dies, however it dies.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::UnixDatagram, sync::Notify};
use tokio_util::sync::CancellationToken;

/// The outbox database, in the data dir.
pub const OUTBOX_FILE: &str = "outbox.db";
const OPEN_LOCK: &str = "open.lock";
const SENDER_LOCK: &str = "sender.lock";
const WAKE_SOCKET: &str = "wake.sock";
const OUTPUT_SOCKET: &str = "output.sock";
const RUNS_DIR: &str = "runs";
const RESERVE_FILE: &str = "outbox.reserve";
/// Room held back on the data dir's disk for results of runs already started: several result
/// commits with cut-down outputs (each a few pages of WAL).
pub const RESERVE_BYTES: usize = 256 * 1024;

/// What went wrong with a file of the data dir; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another live process holds the lock of this run.
    #[error("the lock {path} is held by another process (result_id reused?)")]
    RunLockHeld { path: PathBuf },
}

fn io_error<'a>(
    doing: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        doing,
        path: path.to_path_buf(),
        source,
    }
}

/// One data dir: where its files are.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct HeldLock {
    _file: File,
}

/// The held lock of one running run. Released (and its file removed) by [`RunLock::release`]
/// once the run's result is committed, or by the kernel if the process dies first.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Removes the lock file (and the run's control socket, left behind when its process died),
    /// then releases the lock.
    pub fn release(self) {
        let _ = fs::remove_file(self.path.with_extension("sock"));
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

impl DataDir {
    /// The data dir at `path`, created (with its `runs/` folder) readable by its owner only.
    pub fn create(path: &Path) -> Result<DataDir, DataDirError> {
        private_dir(path)?;
        private_dir(&path.join(RUNS_DIR))?;
        Ok(DataDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The outbox database file.
    pub fn outbox_file(&self) -> PathBuf {
        self.path.join(OUTBOX_FILE)
    }

    /// Creates the outbox file 0600 when missing (SQLite would create it with the umask's mode).
    pub fn create_outbox_file(&self) -> Result<PathBuf, DataDirError> {
        let db = self.outbox_file();
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .map_err(io_error("creating", &db))?;
        fs::set_permissions(&db, fs::Permissions::from_mode(0o600))
            .map_err(io_error("restricting to its owner", &db))?;
        Ok(db)
    }

    /// Waits for the open lock (blocking: call off the async workers).
    pub fn lock_for_opening(&self) -> Result<HeldLock, DataDirError> {
        let path = self.path.join(OPEN_LOCK);
        let file = lock_file(&path)?;
        file.lock().map_err(io_error("locking", &path))?;
        Ok(HeldLock { _file: file })
    }

    /// Takes the sender lock: only one process sends at a time. `None` when another holds it.
    pub fn try_sender_lock(&self) -> Result<Option<HeldLock>, DataDirError> {
        let file = lock_file(&self.path.join(SENDER_LOCK))?;
        Ok(file.try_lock().is_ok().then_some(HeldLock { _file: file }))
    }

    fn run_lock_path(&self, result_id: &str) -> PathBuf {
        self.path.join(RUNS_DIR).join(format!("{result_id}.lock"))
    }

    /// The control socket of a running run ([`crate::control`]).
    pub fn run_socket(&self, result_id: &str) -> PathBuf {
        self.path.join(RUNS_DIR).join(format!("{result_id}.sock"))
    }

    /// Takes the lock of a run about to start.
    pub fn lock_run(&self, result_id: &str) -> Result<RunLock, DataDirError> {
        let path = self.run_lock_path(result_id);
        let file = lock_file(&path)?;
        if file.try_lock().is_err() {
            return Err(DataDirError::RunLockHeld { path });
        }
        Ok(RunLock { file, path })
    }

    /// The lock of a journalled run when no live process holds it (its process died), else
    /// `None`.
    pub fn claim_orphaned_run(&self, result_id: &str) -> Option<RunLock> {
        let path = self.run_lock_path(result_id);
        let file = lock_file(&path).ok()?;
        file.try_lock().ok()?;
        Some(RunLock { file, path })
    }

    /// The runs whose lock a live process holds (they are running now).
    pub fn runs_in_progress(&self) -> Result<Vec<String>, DataDirError> {
        let runs = self.path.join(RUNS_DIR);
        let entries = fs::read_dir(&runs).map_err(io_error("reading", &runs))?;
        let mut held = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(result_id) = name.strip_suffix(".lock") else {
                continue;
            };
            match self.claim_orphaned_run(result_id) {
                Some(lock) => drop(lock), // free: its process is gone
                None => held.push(result_id.to_string()),
            }
        }
        Ok(held)
    }

    /// Renames the outbox and its WAL and shared-memory files to `outbox.db.SUFFIX` (and
    /// `…-wal`, `…-shm`, so SQLite still reads them together); returns the new database path.
    pub fn move_outbox_aside(&self, suffix: &str) -> Result<PathBuf, DataDirError> {
        let moved = self.path.join(format!("{OUTBOX_FILE}.{suffix}"));
        for companion in ["", "-wal", "-shm"] {
            let from = self.path.join(format!("{OUTBOX_FILE}{companion}"));
            let to = PathBuf::from(format!("{}{companion}", moved.display()));
            match fs::rename(&from, &to) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound && !companion.is_empty() => {}
                Err(err) => {
                    return Err(DataDirError::Io {
                        doing: "moving aside",
                        path: from,
                        source: err,
                    });
                }
            }
        }
        Ok(moved)
    }

    /// Makes sure the reserve exists (writing it if it does not); false when there is no room for
    /// it: the disk is full.
    pub fn ensure_reserve(&self) -> bool {
        use std::io::Write;
        let path = self.path.join(RESERVE_FILE);
        if fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64) {
            return true;
        }
        let written = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&path)?;
            // Real blocks, not a sparse file: the point is to hold the space.
            file.write_all(&vec![0u8; RESERVE_BYTES])?;
            file.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&path);
        }
        written.is_ok()
    }

    /// Gives the reserve's room back to the disk; true when there was a reserve to give.
    pub fn release_reserve(&self) -> bool {
        fs::remove_file(self.path.join(RESERVE_FILE)).is_ok()
    }

    /// Bytes free for this process on the disk holding the data dir.
    pub fn free_bytes(&self) -> Option<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.path).ok()?;
        Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
    }

    /// Where the sending process listens for live output ([`crate::live`]).
    pub fn output_socket(&self) -> PathBuf {
        self.path.join(OUTPUT_SOCKET)
    }

    /// Pokes the sending process (if one listens) so it reads the outbox now.
    pub fn poke_sender(&self) {
        if let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() {
            // No sender listening is normal: it finds the events when it starts.
            let _ = socket.send_to(b"!", self.path.join(WAKE_SOCKET));
        }
    }

    /// Listens on the wake socket (the sending process only: hold the sender lock first) and
    /// notifies `wake` at every poke, until `stop`.
    pub fn listen_for_pokes(
        &self,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) -> Result<(), DataDirError> {
        let path = self.path.join(WAKE_SOCKET);
        // A socket file left by a dead sender; we hold the sender lock, so it is not in use.
        let _ = fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).map_err(io_error("binding", &path))?;
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            loop {
                tokio::select! {
                    r = socket.recv(&mut buf) => if r.is_ok() { wake.notify_one() },
                    _ = stop.cancelled() => return,
                }
            }
        });
        Ok(())
    }
}

/// Creates `dir` (and parents) readable by its owner only.
fn private_dir(dir: &Path) -> Result<(), DataDirError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_error("restricting to its owner", dir))
}

/// Opens (creating, 0600) a file that exists to be locked.
fn lock_file(path: &Path) -> Result<File, DataDirError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("opening the lock file", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_lock_is_exclusive_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::create(&tmp.path().join("data")).unwrap();
        let lock = dir.lock_run("r1").unwrap();
        assert!(matches!(
            dir.lock_run("r1"),
            Err(DataDirError::RunLockHeld { .. })
        ));
        assert!(dir.claim_orphaned_run("r1").is_none());
        lock.release();
        let claimed = dir.claim_orphaned_run("r1").expect("free once released");
        claimed.release();
    }

    #[test]
    fn one_sender_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::create(tmp.path()).unwrap();
        let held = dir.try_sender_lock().unwrap().expect("free");
        assert!(dir.try_sender_lock().unwrap().is_none());
        drop(held);
        assert!(dir.try_sender_lock().unwrap().is_some());
    }
}
