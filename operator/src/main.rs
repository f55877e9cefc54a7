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
        Command::Run(_) => {
            eprintln!("tessera-operator run: the controller is not implemented yet");
            ExitCode::from(2)
        }
    }
}
