//! The genbackdoor command line (thin: parsing and exit codes; the work is in the library).

use clap::Parser;

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc hands large ones back to the
/// kernel, and re-faulting their pages cost about a sixth of a training step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // candle asks for its thread count at every matrix product, and without this variable the
    // answer comes from parsing /proc/cpuinfo each time (a few per cent of a U-Net step).
    // Fixing the variable to the count candle would choose anyway changes nothing else.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let cli = genbackdoor::cli::Cli::parse();
    match genbackdoor::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
