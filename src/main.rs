//! The `dormant` binary: parses the command line and runs one command.

use std::process::ExitCode;

use clap::Parser;
use dormant::cli::{Cli, Command, PolicyCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(PolicyCommand::Lint { files }) => {
            let ok = dormant::cli::lint::run(&files, &mut std::io::stdout(), &mut std::io::stderr())?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Crd => {
            print!("{}", dormant::cli::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
