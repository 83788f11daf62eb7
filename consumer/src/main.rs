fn main() -> std::process::ExitCode {
    sluice_consumer::cli::main()
}
