use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kanade_ingest::{
    app,
    auth::{NewToken, add_token},
    batcher::BatchConfig,
    config::{Cli, Command, TokenCommand},
};
use kanade_shared::telemetry::{self, LogFormat};

/// Allocations at least this large get pages of their own, returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 128 * 1024;

/// glibc's allocator raises its mmap threshold to the size of every large block freed, so after
/// a burst of large outputs (megabyte strings) later ones come from its heaps, which it keeps:
/// ingest stayed near its peak long after the burst. A fixed threshold keeps large blocks
/// mmapped and gives them back when freed (BENCHMARKS.md, memory).
fn keep_large_allocations_returnable() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it is called first thing in main,
    // before any other thread exists or anything is allocated that depends on the setting.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

fn main() -> ExitCode {
    keep_large_allocations_returnable();
    let cli = Cli::parse();
    kanade_shared::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kanade-ingest: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("kanade-ingest: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Some(Command::Migrate(args)) => {
            let _telemetry = telemetry::init(
                LogFormat::Text,
                SERVICE_NAME,
                "info",
                telemetry::SDK_MAX_LINKS_PER_SPAN,
            );
            app::migrate(&args.database_url).await?;
            println!("migrations applied to {}", app::redact(&args.database_url));
            return Ok(());
        }
        Some(Command::Token(TokenCommand::Add(args))) => {
            let new = match (args.pc_id, args.operator) {
                (Some(pc_id), _) => NewToken::Agent { pc_id },
                (None, true) => NewToken::Operator { name: args.name },
                (None, false) => NewToken::Reader { name: args.name },
            };
            let token = add_token(&args.tokens_file, &new)?;
            eprintln!(
                "added {} to {}; the token is printed on standard output, this once (only its \
                 SHA-256 is kept): save it now",
                match &new {
                    NewToken::Agent { pc_id } => format!("a token for pc_id {pc_id:?}"),
                    NewToken::Reader { .. } => "a reader token".to_string(),
                    NewToken::Operator { name: Some(name) } =>
                        format!("an operator token ({name})"),
                    NewToken::Operator { name: None } => "an operator token".to_string(),
                },
                args.tokens_file.display()
            );
            println!("{token}");
            return Ok(());
        }
        Some(Command::Serve(args)) => *args,
        None => cli.serve,
    };
    // A batch's span links every event the batch holds, however large batches are made.
    let links = u32::try_from(BatchConfig::from(&args).max_events()).unwrap_or(u32::MAX);
    let telemetry = telemetry::init(args.log_format, SERVICE_NAME, "info", links);
    let served = serve(args).await;
    // Flushing blocks; the exporter needs the runtime's other threads meanwhile.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    served
}

/// The default OpenTelemetry service name.
const SERVICE_NAME: &str = "kanade-ingest";

async fn serve(args: kanade_ingest::config::ServeArgs) -> anyhow::Result<()> {
    let ingest = app::start(args).await?;
    // Scripts and tests wait for this line.
    println!("kanade-ingest listening on {}", ingest.addr);
    if let Some(console) = &ingest.console_url {
        println!("console on {console}");
    }
    let shutdown = ingest.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    ingest.wait().await.context("serving")
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
