//! Spawns a run's process and watches it: timeout, process-group kill, output capture.
//!
//! Every run gets a process group of its own, so a timeout (or the daemon's shutdown) ends the
//! whole tree — TERM first, KILL after a grace period — including grandchildren that ignore
//! TERM. stdout and stderr are captured as lossy UTF-8 under a per-stream cap: the head and the
//! tail are kept, the bytes dropped from the middle are counted. While the run goes, its
//! [`RunOutput`] is what live output reads ([`crate::live`]): the capture itself, which always
//! holds at least the last [`limits::LIVE_OUTPUT_HELD_BYTES`] of each stream, so following a run
//! costs no copy while nobody follows it. The child's environment loses the agent's own
//! configuration and secrets (`KANADE_*`, `OTEL_*`).

use std::{
    collections::VecDeque,
    io,
    os::unix::process::ExitStatusExt,
    process::{ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kanade_shared::{limits, wire::ExecStatus};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{io::AsyncReadExt, process::Command, sync::Notify};
use tokio_util::sync::CancellationToken;

/// How long output is still read after the process exited, for grandchildren holding the pipes.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Environment prefixes a child never inherits.
const WITHHELD_ENV_PREFIXES: [&str; 2] = ["KANADE_", "OTEL_"];

/// Why a process could not be started, mapped to the shell's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnFailure {
    /// 127.
    NotFound,
    /// 126.
    NotExecutable,
    /// Anything else (125).
    Other,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutcome {
    pub status: ExecStatus,
    /// The exit code when the process exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub spawn_failure: Option<SpawnFailure>,
    pub stdout: Captured,
    pub stderr: Captured,
    /// When the process ended (or failed to start), on a monotonic clock.
    pub ended: Instant,
}

/// One captured output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub text: String,
    pub dropped_bytes: u64,
}

/// Keeps the first and last bytes of a stream within a cap, counting what falls out between.
///
/// The tail kept while the run goes is at least [`limits::LIVE_OUTPUT_HELD_BYTES`], whatever the
/// cap, so live output always has the last bytes written; the capture is cut to the cap itself.
#[derive(Debug)]
struct HeadTail {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    /// What `tail` holds at most: `tail_cap`, or more for live output.
    tail_kept: usize,
    /// Bytes that fell out of `tail` (beyond `tail_kept`).
    dropped: u64,
}

impl HeadTail {
    fn new(cap: usize) -> HeadTail {
        let head_cap = cap / 2;
        let tail_cap = cap - head_cap;
        HeadTail {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_cap,
            tail_cap,
            tail_kept: tail_cap.max(limits::LIVE_OUTPUT_HELD_BYTES),
            dropped: 0,
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        let to_head = bytes.len().min(self.head_cap - self.head.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        bytes = &bytes[to_head..];
        if bytes.len() >= self.tail_kept {
            self.dropped += (self.tail.len() + bytes.len() - self.tail_kept) as u64;
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_kept..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_kept);
        self.tail.drain(..overflow);
        self.dropped += overflow as u64;
        self.tail.extend(bytes);
    }

    /// Bytes written so far.
    fn written(&self) -> u64 {
        self.head.len() as u64 + self.dropped + self.tail.len() as u64
    }

    /// The bytes from `from` on (or from the oldest byte still held after it, when `from` fell
    /// out), at most the newest `limit` of them: where they start, and the bytes.
    fn since(&self, from: u64, limit: usize) -> (u64, Vec<u8>) {
        let written = self.written();
        let tail_start = written - self.tail.len() as u64;
        // With nothing dropped between them, the head and the tail are one run of bytes.
        let held_start = if tail_start == self.head.len() as u64 {
            0
        } else {
            tail_start
        };
        let start = from
            .max(held_start)
            .max(written.saturating_sub(limit as u64))
            .min(written);
        let mut bytes = Vec::with_capacity((written - start) as usize);
        if start < self.head.len() as u64 {
            bytes.extend_from_slice(&self.head[start as usize..]);
        }
        let in_tail = start.saturating_sub(tail_start) as usize;
        let (a, b) = self.tail.as_slices();
        if in_tail < a.len() {
            bytes.extend_from_slice(&a[in_tail..]);
            bytes.extend_from_slice(b);
        } else {
            bytes.extend_from_slice(&b[in_tail - a.len()..]);
        }
        (start, bytes)
    }

    fn captured(&self) -> Captured {
        let cap = self.head_cap + self.tail_cap;
        let captured = self.decode();
        // Invalid bytes decode to U+FFFD, three bytes each: binary output can grow up to
        // threefold in decoding, so the text is cut to the cap again.
        let (text, cut) = keep_head_and_tail(&captured.text, cap);
        Captured {
            text,
            dropped_bytes: captured.dropped_bytes + cut,
        }
    }

    fn decode(&self) -> Captured {
        // The tail beyond the cap was kept for live output only.
        let beyond_cap = self.tail.len().saturating_sub(self.tail_cap);
        let dropped = self.dropped + beyond_cap as u64;
        let mut head = self.head.clone();
        let mut tail: Vec<u8> = self.tail.iter().skip(beyond_cap).copied().collect();
        if dropped == 0 {
            // Nothing was cut: the bytes are the output, in order, decoded as one.
            head.extend_from_slice(&tail);
            return Captured {
                text: String::from_utf8_lossy(&head).into_owned(),
                dropped_bytes: 0,
            };
        }
        // The cut may have split characters at both of its edges: those partial characters
        // count as dropped rather than turning into replacement characters.
        let head_partial = incomplete_suffix(&head);
        head.truncate(head.len() - head_partial);
        let tail_partial = leading_continuations(&tail);
        tail.drain(..tail_partial);
        let mut text = String::from_utf8_lossy(&head).into_owned();
        text.push_str(&String::from_utf8_lossy(&tail));
        Captured {
            text,
            dropped_bytes: dropped + (head_partial + tail_partial) as u64,
        }
    }
}

/// A run's two outputs as they are captured: what the result reports once the run ended, and
/// what live output reads while it goes. Shared by the capture and whoever follows the run.
#[derive(Debug)]
pub struct RunOutput {
    streams: [Mutex<HeadTail>; 2],
    /// Woken whenever bytes were captured, and when the output ended.
    written: Notify,
    ended: AtomicBool,
}

impl RunOutput {
    /// Each stream captured up to `cap` bytes (head and tail).
    pub fn new(cap: usize) -> Arc<RunOutput> {
        Arc::new(RunOutput {
            streams: [
                Mutex::new(HeadTail::new(cap)),
                Mutex::new(HeadTail::new(cap)),
            ],
            written: Notify::new(),
            ended: AtomicBool::new(false),
        })
    }

    fn stream(&self, stream: OutputStream) -> MutexGuard<'_, HeadTail> {
        self.streams[stream as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stream: OutputStream, bytes: &[u8]) {
        self.stream(stream).push(bytes);
        self.written.notify_waiters();
    }

    /// Bytes written to `stream` so far.
    pub fn written(&self, stream: OutputStream) -> u64 {
        self.stream(stream).written()
    }

    /// `stream`'s bytes from `from` on, or from the oldest still held after it, at most the
    /// newest `limit`: where they start, and the bytes.
    pub fn since(&self, stream: OutputStream, from: u64, limit: usize) -> (u64, Vec<u8>) {
        self.stream(stream).since(from, limit)
    }

    /// Notified when bytes are captured and when the output ends ([`Notify::notify_waiters`]:
    /// enable the future before looking).
    pub fn changes(&self) -> &Notify {
        &self.written
    }

    /// Whether both streams are closed: nothing more will be written.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.written.notify_waiters();
    }

    /// What the result reports of `stream`.
    fn captured(&self, stream: OutputStream) -> Captured {
        self.stream(stream).captured()
    }
}

pub(crate) fn is_continuation(byte: u8) -> bool {
    byte & 0b1100_0000 == 0b1000_0000
}

/// How many bytes at the start of `bytes` end a UTF-8 character whose first bytes are missing.
pub(crate) fn leading_continuations(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(3)
        .take_while(|b| is_continuation(**b))
        .count()
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character whose remaining bytes
/// are missing.
pub(crate) fn incomplete_suffix(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if is_continuation(byte) {
            continue;
        }
        let needed = match byte {
            b if b >= 0b1111_0000 => 4,
            b if b >= 0b1110_0000 => 3,
            b if b >= 0b1100_0000 => 2,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Cuts text to at most `max` bytes, keeping its head and tail on character boundaries; returns
/// the kept text and how many bytes were cut.
pub fn keep_head_and_tail(text: &str, max: usize) -> (String, u64) {
    if text.len() <= max {
        return (text.to_string(), 0);
    }
    let mut head_end = max / 2;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - (max - max / 2);
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    let kept = format!("{}{}", &text[..head_end], &text[tail_start..]);
    let cut = (text.len() - kept.len()) as u64;
    (kept, cut)
}

/// Where else a run's output goes while it is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Echo {
    /// Captured only (the daemon's runs).
    #[default]
    Nothing,
    /// Also written, as it comes, to the agent's own stdout and stderr (`kanade-agent exec`, so
    /// it can wrap a cron job or run in a terminal).
    ToOwnOutputs,
}

/// Which of the run's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout = 0,
    Stderr = 1,
}

impl OutputStream {
    pub const BOTH: [OutputStream; 2] = [OutputStream::Stdout, OutputStream::Stderr];
}

/// Writes output through to the agent's own stream; stops at the first failure (a closed
/// terminal or pipe must not end the capture).
struct Passthrough(Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>);

impl Passthrough {
    fn new(echo: Echo, stream: OutputStream) -> Passthrough {
        Passthrough(match (echo, stream) {
            (Echo::Nothing, _) => None,
            (Echo::ToOwnOutputs, OutputStream::Stdout) => Some(Box::new(tokio::io::stdout())),
            (Echo::ToOwnOutputs, OutputStream::Stderr) => Some(Box::new(tokio::io::stderr())),
        })
    }

    async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        if let Some(out) = &mut self.0 {
            let written = async {
                out.write_all(bytes).await?;
                out.flush().await
            };
            if written.await.is_err() {
                self.0 = None;
            }
        }
    }
}

/// Reads a pipe into `output` until its end, or until `stop` (a grandchild may hold the pipe
/// open long after the run ended): what was read by then is kept.
async fn capture(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    output: Arc<RunOutput>,
    stream: OutputStream,
    mut passthrough: Passthrough,
    stop: CancellationToken,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = pipe.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    output.push(stream, &chunk[..n]);
                    passthrough.write(&chunk[..n]).await;
                }
            },
            _ = stop.cancelled() => break,
        }
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // The group may be gone already; that is the outcome we wanted.
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), signal);
    }
}

/// Why the agent ended a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    ByItself,
    TimedOut,
    /// The daemon's shutdown (KILLED).
    Killed,
    /// An operator's cancel (CANCELLED).
    Cancelled,
}

/// What may end a run before it ends by itself (besides its timeout).
#[derive(Debug, Clone, Copy)]
pub struct Stops<'a> {
    /// The agent is stopping: the run is reported KILLED.
    pub kill: &'a CancellationToken,
    /// An operator cancelled it: reported CANCELLED.
    pub cancel: &'a CancellationToken,
}

/// What to run and how to watch it.
#[derive(Debug, Clone)]
pub struct ProcessSpec<'a> {
    /// The program and its arguments.
    pub argv: &'a [String],
    /// Added to the inherited environment, minus the withheld prefixes.
    pub env: &'a [(String, String)],
    /// The process group is ended after this long.
    pub timeout: Option<Duration>,
    /// Where the outputs are captured (each up to the cap it was made with).
    pub output: Arc<RunOutput>,
    /// Between TERM and KILL.
    pub kill_grace: Duration,
    pub echo: Echo,
}

/// Runs a process to completion (or timeout, or one of `stops`) and reports how it ended.
pub async fn run_process(spec: ProcessSpec<'_>, stops: Stops<'_>) -> ProcessOutcome {
    let ProcessSpec {
        argv,
        env,
        timeout,
        output,
        kill_grace,
        echo,
    } = spec;
    let Some((program, args)) = argv.split_first() else {
        output.end();
        return spawn_failed(SpawnFailure::Other, "empty command".into());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && WITHHELD_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
        {
            command.env_remove(&key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let failure = match err.kind() {
                io::ErrorKind::NotFound => SpawnFailure::NotFound,
                io::ErrorKind::PermissionDenied => SpawnFailure::NotExecutable,
                _ => SpawnFailure::Other,
            };
            output.end();
            return spawn_failed(failure, format!("cannot run {program:?}: {err}"));
        }
    };
    let pid = child.id().unwrap_or(0);
    let stop_reading = CancellationToken::new();
    let stdout = tokio::spawn(capture(
        child.stdout.take().expect("piped"),
        output.clone(),
        OutputStream::Stdout,
        Passthrough::new(echo, OutputStream::Stdout),
        stop_reading.clone(),
    ));
    let stderr = tokio::spawn(capture(
        child.stderr.take().expect("piped"),
        output.clone(),
        OutputStream::Stderr,
        Passthrough::new(echo, OutputStream::Stderr),
        stop_reading.clone(),
    ));

    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let (exit, ending) = tokio::select! {
        exit = child.wait() => (exit, Ending::ByItself),
        _ = deadline => (terminate(&mut child, pid, kill_grace).await, Ending::TimedOut),
        _ = stops.kill.cancelled() => (terminate(&mut child, pid, kill_grace).await, Ending::Killed),
        _ = stops.cancel.cancelled() => (terminate(&mut child, pid, kill_grace).await, Ending::Cancelled),
    };
    if ending != Ending::ByItself {
        // Whatever of the tree survived TERM goes now.
        signal_group(pid, Signal::SIGKILL);
    }
    let ended = Instant::now();
    let drained = async {
        let _ = tokio::join!(stdout, stderr);
    };
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        _ = tokio::time::sleep(OUTPUT_DRAIN) => {
            stop_reading.cancel();
            drained.await
        }
    }
    output.end();
    let (stdout, stderr) = (
        output.captured(OutputStream::Stdout),
        output.captured(OutputStream::Stderr),
    );
    outcome(exit, ending, stdout, stderr, ended)
}

/// TERM to the whole group, KILL after the grace period; returns the child's exit.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: u32,
    kill_grace: Duration,
) -> io::Result<ExitStatus> {
    signal_group(pid, Signal::SIGTERM);
    match tokio::time::timeout(kill_grace, child.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            child.wait().await
        }
    }
}

fn spawn_failed(failure: SpawnFailure, message: String) -> ProcessOutcome {
    ProcessOutcome {
        status: ExecStatus::SpawnFailed,
        exit_code: None,
        signal: None,
        spawn_failure: Some(failure),
        stdout: Captured::default(),
        stderr: Captured {
            text: message,
            dropped_bytes: 0,
        },
        ended: Instant::now(),
    }
}

fn outcome(
    exit: io::Result<ExitStatus>,
    ending: Ending,
    stdout: Captured,
    stderr: Captured,
    ended: Instant,
) -> ProcessOutcome {
    let (code, signal) = match &exit {
        Ok(status) => (status.code(), status.signal()),
        Err(_) => (None, None),
    };
    let status = match (ending, code) {
        (Ending::TimedOut, _) => ExecStatus::TimedOut,
        (Ending::Killed, _) => ExecStatus::Killed,
        (Ending::Cancelled, _) => ExecStatus::Cancelled,
        (Ending::ByItself, Some(0)) => ExecStatus::Succeeded,
        (Ending::ByItself, Some(_)) => ExecStatus::Failed,
        (Ending::ByItself, None) => ExecStatus::Killed,
    };
    ProcessOutcome {
        status,
        exit_code: if ending == Ending::ByItself {
            code
        } else {
            None
        },
        signal,
        spawn_failure: None,
        stdout,
        stderr,
        ended,
    }
}

impl ProcessOutcome {
    /// The exit code `kanade-agent exec` returns for this outcome (SPEC §4).
    pub fn shell_exit_code(&self) -> u8 {
        match (self.spawn_failure, self.exit_code, self.signal) {
            (Some(SpawnFailure::NotFound), _, _) => 127,
            (Some(SpawnFailure::NotExecutable), _, _) => 126,
            (Some(SpawnFailure::Other), _, _) => 125,
            (None, Some(code), _) => (code & 0xff) as u8,
            (None, None, Some(signal)) => 128u8.saturating_add(signal as u8),
            (None, None, None) => 125,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_tail_are_kept_and_the_middle_counted() {
        let mut b = HeadTail::new(10);
        b.push(b"0123");
        b.push(b"456789abcdef");
        b.push(b"XYZ");
        let c = b.captured();
        assert_eq!(c.text, "01234efXYZ");
        assert_eq!(c.dropped_bytes, 19 - 10);
    }

    #[test]
    fn small_outputs_are_kept_whole() {
        let mut b = HeadTail::new(100);
        b.push(b"hello ");
        b.push(b"world");
        assert_eq!(
            b.captured(),
            Captured {
                text: "hello world".into(),
                dropped_bytes: 0
            }
        );
    }

    #[test]
    fn the_last_bytes_written_are_held_for_live_output_whatever_the_cap() {
        let held = limits::LIVE_OUTPUT_HELD_BYTES;
        let mut b = HeadTail::new(10);
        let written: Vec<u8> = (0..3 * held).map(|i| (i % 251) as u8).collect();
        for piece in written.chunks(1000) {
            b.push(piece);
        }
        assert_eq!(b.written(), written.len() as u64);
        // From the start: the head, then (after what fell out) the last `held` bytes.
        let (start, bytes) = b.since(0, usize::MAX);
        assert_eq!(start, (written.len() - held) as u64);
        assert_eq!(bytes, &written[written.len() - held..]);
        // From a later offset, and capped to the newest bytes.
        let from = (written.len() - 100) as u64;
        assert_eq!(
            b.since(from, usize::MAX),
            (from, written[written.len() - 100..].to_vec())
        );
        assert_eq!(b.since(from, 10).0, (written.len() - 10) as u64);
        assert_eq!(b.since(written.len() as u64, 10).1, Vec::<u8>::new());
        // The capture itself still keeps only its cap.
        assert_eq!(b.captured().text.len(), 10);
    }

    #[test]
    fn without_a_gap_the_head_and_the_tail_read_as_one() {
        let mut b = HeadTail::new(100);
        b.push(b"hello ");
        b.push(&[b'x'; 60]);
        assert_eq!(
            b.since(3, usize::MAX),
            (3, [&b"lo "[..], &[b'x'; 60]].concat())
        );
    }

    #[test]
    fn text_cut_keeps_characters_whole() {
        let (kept, cut) = keep_head_and_tail(&"é".repeat(100), 11);
        assert!(kept.len() <= 11 && kept.chars().all(|c| c == 'é'));
        assert_eq!(cut as usize, 200 - kept.len());
        assert_eq!(keep_head_and_tail("short", 10), ("short".to_string(), 0));
    }
}
