//! The `trustflow` command line: a thin layer over the library (anyhow lives here only).
//! The commands are in `cli/`, one file per group.

use std::process::ExitCode;

use clap::Parser;
use trustflow_engine::Error;

mod cli;

fn main() -> ExitCode {
    // The engine's own threads (the shard reader evaluates `source.filter` again) take
    // std's default stack, 2 MiB, unless RUST_MIN_STACK says otherwise; see `main`'s
    // command thread for why that is too little. std reads the variable when it
    // spawns its first thread, which has not happened yet.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet, so none can read the environment while it
        // changes.
        unsafe { std::env::set_var("RUST_MIN_STACK", ENGINE_THREAD_STACK_BYTES.to_string()) };
    }
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
    // pages are touched only as deep as the input really goes.
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

/// Default stack of every other thread this process starts (see `main`): enough for the
/// deepest `source.filter` that `validate` lets through, in a debug build.
const ENGINE_THREAD_STACK_BYTES: usize = 64 << 20;
