use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tessera_worker::cli::{Cli, Command};
use tessera_worker::telemetry::{Telemetry, fake::FakeTelemetry, nvml};
use tessera_worker::{agent, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    match cli.command {
        Command::Telemetry { fake, labels } => telemetry(fake.as_deref(), labels),
        Command::Agent(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        other => {
            eprintln!(
                "tessera-worker {}: not implemented yet (the inference core has its own issue)",
                other.name()
            );
            ExitCode::from(2)
        }
    }
}

fn telemetry(fake: Option<&std::path::Path>, labels: bool) -> ExitCode {
    let backend: Box<dyn Telemetry> = match fake {
        Some(path) => match FakeTelemetry::from_file(path) {
            Ok(t) => Box::new(t),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => nvml::detect(),
    };
    let snapshot = backend.snapshot();
    let json = if labels {
        serde_json::to_string_pretty(&agent::node_labels(&snapshot))
    } else {
        serde_json::to_string_pretty(&snapshot)
    }
    .expect("snapshots serialise");
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{json}") {
        eprintln!("error: writing to stdout: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
