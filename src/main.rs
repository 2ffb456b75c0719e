fn main() -> std::process::ExitCode {
    phasegate::cli::main()
}
