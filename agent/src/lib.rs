//! kanade-agent: runs scripts on an endpoint and streams their lifecycle events to ingest.
//!
//! - [`cli`], [`config`]: the command line and the settings merged from file, env and flags.
//! - [`runner`]: spawns a run's process group, enforces its timeout, captures its output.
//! - [`data_dir`]: the files of the data dir, and the locks and socket agent processes share.
//! - [`control`]: what reaches a running run from outside its process (an operator's cancel).
//! - [`outbox`]: the durable SQLite queue every event goes through, and the run journal.
//! - [`execution`]: one run from Started to Result through the outbox.
//! - [`sender`]: the stream to ingest: window, acks, rejects, reconnects.
//! - [`schedule`], [`daemon`]: scheduled jobs and the long-running process.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod data_dir;
pub mod execution;
pub mod live;
pub mod outbox;
pub mod runner;
pub mod schedule;
pub mod sender;

use std::time::Duration;

use anyhow::Context;

use tokio_util::sync::CancellationToken;

use crate::{
    cli::{Command, CommonArgs, DeadLetterAction, ExecArgs, OutboxAction},
    config::{Program, Settings},
    execution::RunRequest,
    outbox::{Outbox, OutboxError},
    runner::Echo,
};

/// Exit status for an agent error (SPEC §4).
pub const EXIT_AGENT_ERROR: u8 = 125;
/// Exit status when `exec --wait` gave up with events still pending.
pub const EXIT_WAIT_TIMED_OUT: u8 = 75;
/// Exit status of the daemon when its outbox is damaged (EX_DATAERR): restarting it would
/// change nothing until `kanade-agent outbox salvage` (the systemd unit does not restart it).
pub const EXIT_OUTBOX_DAMAGED: u8 = 65;

/// Cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(error = %err, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

async fn open_outbox(settings: &Settings) -> anyhow::Result<Outbox> {
    Ok(Outbox::open(
        &settings.data_dir,
        settings.outbox_synchronous,
        settings.outbox_cap_bytes,
    )
    .await?)
}

/// Runs one parsed command line; returns the process exit code.
pub async fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run { common } => {
            let settings = Settings::load(&common)?;
            match daemon::run(settings, shutdown_on_signal()).await {
                Ok(()) => Ok(0),
                Err(err) if OutboxError::is_damage_in(&err) => {
                    eprintln!("kanade-agent: {err:#}");
                    Ok(EXIT_OUTBOX_DAMAGED)
                }
                Err(err) => Err(err),
            }
        }
        Command::Exec(args) => exec(args).await,
        Command::Status { common } => status(&common).await,
        Command::DeadLetters { common, action } => dead_letters(&common, action).await,
        Command::Outbox { common, action } => outbox_command(&common, action).await,
    }
}

async fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    let settings = Settings::load(&args.common)?;
    let request = RunRequest {
        manifest_id: args.manifest,
        version: args.version,
        program: Program::Command(args.command),
        timeout: args.timeout,
        request_id: args.request_id.unwrap_or_else(execution::mint_id),
        exec_id: args.exec_id.unwrap_or_else(execution::mint_id),
        echo: if args.quiet {
            Echo::Nothing
        } else {
            Echo::ToOwnOutputs
        },
    };
    // Refused here, before anything is enqueued, with the rule ingest would apply.
    request.check(&settings.pc_id).map_err(|e| {
        let flag = match e.field() {
            "manifest_id" => "--manifest",
            "version" => "--version",
            "request_id" => "--request-id",
            "exec_id" => "--exec-id",
            "pc_id" => "--pc-id",
            other => other,
        };
        anyhow::anyhow!("{flag}: {e}")
    })?;
    let not_started = "the run is not started";
    let outbox = open_outbox(&settings).await.context(not_started)?;
    outbox.recover_interrupted().await.context(not_started)?;
    // With --wait and no daemon, this process streams from the start, so ingest sees the run
    // while it runs and an operator's cancel reaches it.
    let own_sender = match args.wait {
        true => OwnSender::start(&outbox, &settings)?,
        false => None,
    };
    let finished = execution::execute(&outbox, &settings, request, &shutdown_on_signal()).await?;
    if let Some(failure) = finished.outcome.spawn_failure {
        eprintln!("kanade-agent: {} ({failure:?})", finished.result.stderr);
    }
    if let Some(cancel) = &finished.cancelled {
        eprint!("{}", cancel.stderr_line());
    }
    let code = finished.outcome.shell_exit_code();
    if args.wait {
        let seqs = [finished.started_seq, finished.result_seq];
        if let Some(code) = wait_for_acks(&outbox, &seqs, args.wait_timeout, own_sender).await? {
            return Ok(code);
        }
    }
    Ok(code)
}

/// The sender of an `exec --wait` that found no daemon holding the data dir's sender lock.
struct OwnSender {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl OwnSender {
    /// Starts sending the outbox when no other process does; `None` when one does.
    fn start(outbox: &Outbox, settings: &Settings) -> anyhow::Result<Option<OwnSender>> {
        let Some(lock) = outbox.data_dir().try_sender_lock()? else {
            return Ok(None);
        };
        let stop = CancellationToken::new();
        let (outbox, config, until) = (
            outbox.clone(),
            daemon::sender_config(settings),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let _lock = lock;
            // A damaged outbox ends it; the wait reports that from the outbox itself.
            let _ = sender::run(outbox, config, until).await;
        });
        Ok(Some(OwnSender { stop, task }))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits until `seqs` left the outbox, sent by `own_sender` or by the daemon. Returns an exit
/// code that overrides the script's when waiting failed.
async fn wait_for_acks(
    outbox: &Outbox,
    seqs: &[u64],
    timeout: Duration,
    own_sender: Option<OwnSender>,
) -> anyhow::Result<Option<u8>> {
    let verdict = wait_until_answered(outbox, seqs, timeout, own_sender.is_some()).await?;
    if let Some(sender) = own_sender {
        sender.stop().await;
    }
    for &seq in seqs {
        if outbox.is_dead(seq).await? {
            eprintln!(
                "kanade-agent: ingest refused an event of this run; see `kanade-agent dead-letters list`"
            );
            return Ok(Some(EXIT_AGENT_ERROR));
        }
    }
    Ok(verdict)
}

/// How often `exec --wait` looks at the outbox while another process sends its events (its own
/// sender notifies it instead).
const WAIT_POLL: Duration = Duration::from_millis(50);
/// `exec --wait` says why it still waits after this long, then whenever that changes, and at
/// least this often.
const WAIT_EXPLAIN_AFTER: Duration = Duration::from_secs(1);
const WAIT_EXPLAIN_EVERY: Duration = Duration::from_secs(15);

/// Waits until none of `seqs` is pending; returns the exit code when the wait timed out. While
/// it waits it says why (the sender's connection state), so a refused certificate or an
/// unreachable ingest shows at once instead of after the whole timeout.
async fn wait_until_answered(
    outbox: &Outbox,
    seqs: &[u64],
    timeout: Duration,
    own_sender: bool,
) -> anyhow::Result<Option<u8>> {
    let began = tokio::time::Instant::now();
    let deadline = began + timeout;
    let mut explained: Option<(String, tokio::time::Instant)> = None;
    loop {
        // Registered before looking, so an answer between the look and the wait is not missed.
        let answered = outbox.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        let mut pending = 0;
        for &seq in seqs {
            if outbox.is_pending(seq).await? {
                pending += 1;
            }
        }
        if pending == 0 {
            return Ok(None);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            eprintln!(
                "kanade-agent: {pending} event(s) of this run still wait for ingest's ack after {}; \
                 they stay in the outbox and will be sent by the daemon",
                humantime::format_duration(timeout)
            );
            return Ok(Some(EXIT_WAIT_TIMED_OUT));
        }
        if now - began >= WAIT_EXPLAIN_AFTER {
            let state = outbox
                .connection_state()
                .await?
                .unwrap_or_else(|| "not connected yet".to_string());
            let due = match &explained {
                None => true,
                Some((said, at)) => *said != state || now - *at >= WAIT_EXPLAIN_EVERY,
            };
            if due {
                eprintln!(
                    "kanade-agent: waiting for ingest to acknowledge {pending} event(s) of this \
                     run ({} so far): {state}",
                    humantime::format_duration(Duration::from_secs((now - began).as_secs()))
                );
                explained = Some((state, now));
            }
        }
        let next_look = if own_sender {
            WAIT_EXPLAIN_AFTER
        } else {
            WAIT_POLL
        };
        tokio::select! {
            _ = answered => {}
            _ = tokio::time::sleep(next_look) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn outbox_command(common: &CommonArgs, action: OutboxAction) -> anyhow::Result<u8> {
    let settings = Settings::load(common)?;
    match action {
        OutboxAction::Check => {
            let report = outbox::check(&settings.data_dir).await?;
            if report.problems.is_empty() {
                println!(
                    "{}: ok ({} event(s) pending, {} dead letter(s), {} run(s) in progress)",
                    report.file.display(),
                    report.pending_events,
                    report.dead_letters,
                    report.runs_in_progress
                );
                return Ok(0);
            }
            println!("{}: DAMAGED", report.file.display());
            for problem in &report.problems {
                println!("  {problem}");
            }
            println!(
                "Stop the daemon, then run `kanade-agent outbox salvage` (same --config or \
                 --data-dir): it moves the file aside (nothing is deleted), starts a fresh outbox \
                 and queues again every event that can still be read."
            );
            Ok(1)
        }
        OutboxAction::Salvage => {
            let report = outbox::salvage(
                &settings.data_dir,
                settings.outbox_synchronous,
                settings.outbox_cap_bytes,
            )
            .await?;
            println!(
                "moved the damaged outbox to {} (kept)",
                report.moved_to.display()
            );
            println!("a fresh outbox is in place");
            if report.nothing_readable {
                println!("recovered 0 events: nothing in the damaged file could be read");
            } else {
                println!(
                    "recovered {} event(s); {} run(s) that were in progress reported INTERRUPTED; \
                     {} dead letter(s) kept; {} unreadable row(s) kept as dead letters",
                    report.recovered_events,
                    report.interrupted_runs,
                    report.dead_letters,
                    report.undecodable
                );
            }
            if report.unreadable.is_empty() {
                println!("could not be read: nothing");
            }
            for (first, last) in &report.unreadable {
                match *last {
                    i64::MAX => println!("could not be read: events from seq {first} on"),
                    last => println!("could not be read: events with seq {first} to {last}"),
                }
            }
            Ok(0)
        }
    }
}

async fn status(common: &CommonArgs) -> anyhow::Result<u8> {
    let settings = Settings::load(common)?;
    let read = async {
        let outbox = open_outbox(&settings).await?;
        let status = outbox.status().await?;
        anyhow::Ok((outbox, status))
    };
    let (outbox, s) = match read.await {
        Ok(read) => read,
        Err(err) if OutboxError::is_damage_in(&err) => {
            println!("data dir:      {}", settings.data_dir.display());
            println!("outbox:        damaged");
            eprintln!("kanade-agent: {err:#}");
            return Ok(1);
        }
        Err(err) => return Err(err),
    };
    let oldest = match s.oldest_pending {
        Some(t) => format!(
            ", oldest {} ago",
            humantime::format_duration(Duration::from_secs(
                (chrono::Utc::now() - t).num_seconds().max(0) as u64
            ))
        ),
        None => String::new(),
    };
    let sending = if outbox.data_dir().try_sender_lock()?.is_some() {
        "no process is sending (start `kanade-agent run`)"
    } else {
        "a kanade-agent process holds the sender lock"
    };
    println!("data dir:      {}", settings.data_dir.display());
    println!(
        "pending:       {} event(s), {} bytes{oldest}",
        s.pending_events, s.pending_bytes
    );
    println!("dead letters:  {}", s.dead_letters);
    println!("running runs:  {}", s.running_runs);
    println!("sender:        {sending}");
    let connection = match (s.connection, s.connection_since) {
        (Some(state), Some(since)) => format!("{state} (since {since})"),
        (Some(state), None) => state,
        (None, _) => "never connected".to_string(),
    };
    println!("connection:    {connection}");
    println!(
        "last ack:      {}",
        s.last_ack.as_deref().unwrap_or("never")
    );
    // The outbox could be read (its files were already there), but nothing new can be written.
    if let Some(free) = outbox
        .data_dir()
        .free_bytes()
        .filter(|&free| free < crate::data_dir::RESERVE_BYTES as u64)
    {
        let full = format!(
            "the disk holding {} is full ({free} bytes free): new events may not be recorded \
             until space is freed",
            settings.data_dir.display()
        );
        println!("disk:          {full}");
        eprintln!("kanade-agent: {full}");
        return Ok(125);
    }
    Ok(0)
}

async fn dead_letters(common: &CommonArgs, action: DeadLetterAction) -> anyhow::Result<u8> {
    let settings = Settings::load(common)?;
    let outbox = open_outbox(&settings).await?;
    match action {
        DeadLetterAction::List => {
            let letters = outbox.dead_letters().await?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for d in letters {
                println!(
                    "{}\t{}\t{}\tseq {}\t{}\t{}",
                    d.id,
                    d.dead_at.to_rfc3339(),
                    d.kind,
                    d.seq,
                    d.result_id,
                    d.reason
                );
            }
        }
        DeadLetterAction::Retry { id } => {
            outbox.retry_dead_letter(id).await?;
            println!("dead letter {id} is queued again");
        }
        DeadLetterAction::Purge { id } => {
            outbox.purge_dead_letter(id).await?;
            println!("dead letter {id} deleted");
        }
    }
    Ok(0)
}
