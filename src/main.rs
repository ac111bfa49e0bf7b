//! e2ebackup: a thin entry point; everything lives in the library.

fn main() -> std::process::ExitCode {
    e2ebackup::cli::main()
}
