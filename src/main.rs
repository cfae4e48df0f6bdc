//! The genbackdoor command line (thin: parsing and exit codes; the work is in the library).

use clap::Parser;

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc hands large ones back to the
/// kernel, and re-faulting their pages cost about a sixth of a training step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
