//! The `trustflow` command line: a thin layer over the library (anyhow lives here only).
//! The commands are in `cli/`, one file per group.

use std::process::ExitCode;

use clap::Parser;
use trustflow_engine::Error;

mod cli;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRUSTFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    // Deeply nested input must not abort the process: a `source.filter` of 1,000 `OR`
    // terms is an expression tree 1,000 levels deep, which DataFusion's recursive
    // passes walk with large (debug) frames, far past the main thread's 8 MiB. So the
    // command runs on a thread with a large stack; only address space is reserved, and
    // pages are touched only as deep as the input really goes. The engine's own threads
    // set theirs (`trustflow_engine::runtime::THREAD_STACK_BYTES`).
    let command = std::thread::Builder::new()
        .name("trustflow".into())
        .stack_size(COMMAND_STACK_BYTES)
        .spawn(move || cli::dispatch(cli));
    let result = match command.map(std::thread::JoinHandle::join) {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            // The panic hook has printed where it happened; say what it means.
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            eprintln!("error: internal error (please report it): {what}");
            return ExitCode::FAILURE;
        }
        Err(e) => Err(anyhow::Error::new(e).context("starting the command thread")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::output::error_text(&e));
            ExitCode::from(e.downcast_ref::<Error>().map_or(1, Error::exit_code))
        }
    }
}

/// Stack of the thread that runs the command (see `main`).
const COMMAND_STACK_BYTES: usize = 256 << 20;
