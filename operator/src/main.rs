use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tessera_operator::api;
use tessera_operator::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tessera_operator::logging::init(cli.log_format);
    match cli.command {
        Command::Crd => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(api::crd_yaml().as_bytes()) {
                eprintln!("error: writing the CRD to stdout: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Plan(args) => tessera_operator::plan_cmd::main(&args),
        Command::SimulateAutoscaling(args) => tessera_operator::simulate_cmd::main(&args),
        Command::Scrape(args) => tessera_operator::scrape_cmd::main(&args),
        Command::Predict(args) => tessera_operator::predict_cmd::main(&args),
        Command::Run(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tessera_operator::controller::run::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
