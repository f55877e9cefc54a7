use std::process::ExitCode;

use clap::Parser;
use tessera_worker::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "tessera-worker {}: not implemented yet (this build carries the command-line surface only)",
        cli.command.name()
    );
    ExitCode::from(2)
}
