use std::process::ExitCode;

use clap::Parser;
use kanade_agent::{EXIT_AGENT_ERROR, cli::Cli};

fn main() -> ExitCode {
    match kanade_agent::run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("kanade-agent: {err:#}");
            ExitCode::from(EXIT_AGENT_ERROR)
        }
    }
}
