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
            cap_malloc_arenas();
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

/// Caps glibc's malloc arenas at 2. glibc gives each thread that allocates while the others
/// hold their arenas an arena of its own (up to 8 per core), and an arena keeps what was freed
/// in it for reuse instead of returning it: the tokio worker and blocking threads that decode
/// the watches' lists each end up holding their own peak. Two arenas keep the operator's
/// resident memory close to what its caches hold (measured in docs/operator.md, "At fleet
/// scale"). Called before the runtime starts any thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn cap_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called once, before any other
    // thread exists. Its result (0 if refused) changes nothing but memory use, so it is ignored.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

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
