use std::process::ExitCode;

use clap::Parser;
use kanade_agent::{EXIT_AGENT_ERROR, cli::Cli};
use kanade_shared::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    kanade_shared::tls::install_crypto_provider();
    // One thread: the agent waits on processes, disk and the network, never on CPU, and every
    // extra thread costs memory on a machine where the agent should be invisible.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kanade-agent: starting the async runtime: {err}");
            return ExitCode::from(EXIT_AGENT_ERROR);
        }
    };
    let outcome = runtime.block_on(async {
        let telemetry = telemetry::init(
            cli.log_format,
            "kanade-agent",
            cli.command.log_filter(),
            telemetry::SDK_MAX_LINKS_PER_SPAN,
        );
        let outcome = kanade_agent::run(cli.command).await;
        // Flushing blocks; the exporter needs the runtime's other threads meanwhile.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        outcome
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("kanade-agent: {err:#}");
            ExitCode::from(EXIT_AGENT_ERROR)
        }
    }
}
