//! The `mmpipe` command line: allocator, logging and dispatch; the subcommands live in
//! [`cli`], the work in the library.
//!
//! ```text
//! mmpipe train                                   # embedded default: synthetic shapes, cpu-2x1
//! mmpipe plan --topology topology/4x4.toml       # placement and bytes per step
//! ```

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the memory a step frees for the next step: mimalloc otherwise returns freed
/// pages to the OS after 10 ms, and the next step's fresh buffers fault them back in, each
/// page cleared by the kernel (measured: about a third of a CPU training step).
fn keep_freed_memory() {
    // mimalloc's option numbers (mimalloc.h, v2 and v3 alike).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain setters of mimalloc's global options.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        // Warnings (skipped samples, with shard and key) show unless MMPIPE_LOG says otherwise.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MMPIPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = cli::run(cli::args::Cli::parse().command);
    #[cfg(feature = "mpi")]
    mmpipe::comm::mpi::finalize();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
