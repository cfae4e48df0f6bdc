//! The genbackdoor command line (thin: parsing and exit codes; the work is in the library).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = genbackdoor::cli::Cli::parse();
    match genbackdoor::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
