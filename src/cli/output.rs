//! Writing to stdout without dying of a closed pipe, and error text.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Result;

/// Set once stdout's reader has gone away; later output is dropped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Write to stdout. A reader that closed the pipe early (`trustflow validate x | head
/// -1`) got what it wanted: that is not an error of ours, so the output is dropped
/// quietly and the command goes on (`print!` would panic on EPIPE). Resetting SIGPIPE
/// to its default instead would kill the process by a signal, mid-run for `run`,
/// before its report and `sink.train` step.
pub fn write_stdout(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    if STDOUT_CLOSED.load(Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// The error and its causes, joined by `: `, each distinct message once: some errors'
/// own text already ends with their source's (`Error::Io` is `{path}: {source}`), and
/// anyhow's `{:#}` would print that source a second time.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}
