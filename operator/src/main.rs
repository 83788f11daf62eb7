//! The `sluice-operator` binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Sluice operator.
#[derive(Parser, Debug)]
#[command(name = "sluice-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the EventConsumer CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator.
    Run(Box<sluice_operator::run::RunArgs>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", sluice_operator::generate::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sluice-operator run: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(sluice_operator::run::main(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice-operator run: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn crd_and_run_subcommands_parse() {
        assert!(matches!(
            Cli::try_parse_from(["sluice-operator", "crd"])
                .unwrap()
                .command,
            Command::Crd
        ));
        assert!(matches!(
            Cli::try_parse_from(["sluice-operator", "run"])
                .unwrap()
                .command,
            Command::Run(_)
        ));
        assert!(Cli::try_parse_from(["sluice-operator"]).is_err());
    }
}
