//! The genbackdoor command line (thin: parsing and exit codes; the work is in the library).

use clap::Parser;

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc hands large ones back to the
/// kernel, and re-faulting their pages cost about a sixth of a training step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`, the option just before `mi_option_use_numa_nodes` in
/// the `mi_option_t` enum of its `mimalloc.h` (v2 and v3 alike; the sys crate names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

fn main() -> std::process::ExitCode {
    // By default mimalloc hands memory it has not reused for a while back to the kernel, and
    // a training step then faults (and zeroes) several megabytes of fresh pages for its
    // large tensors again: about a tenth of a reference-DCGAN step. Never purging keeps the
    // step's working set mapped; the process is short-lived and its peak does not change.
    // SAFETY: sets one integer option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
