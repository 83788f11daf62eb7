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
    Run,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", sluice_operator::generate::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run => {
            // The reconciler lands in the next step (operator team).
            eprintln!("sluice-operator run: not implemented yet");
            ExitCode::FAILURE
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
        assert!(matches!(Cli::try_parse_from(["sluice-operator", "crd"]).unwrap().command, Command::Crd));
        assert!(matches!(Cli::try_parse_from(["sluice-operator", "run"]).unwrap().command, Command::Run));
        assert!(Cli::try_parse_from(["sluice-operator"]).is_err());
    }
}
