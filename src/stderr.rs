//! Writing to stderr never kills the process. A terminal that closed or a
//! pipe whose reader went away makes the write fail (EPIPE, EIO); the line
//! is then dropped and counted ([`dropped`], also shown in `/metrics`),
//! never a panic (as `eprintln!` and tracing's own error report would).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines that could not be written to stderr since the process started.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Writes one line to stderr, or counts it as dropped.
pub fn line(text: &str) {
    let mut err = std::io::stderr().lock();
    if writeln!(err, "{text}").is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// stderr for the log: what cannot be written is dropped and counted.
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if std::io::stderr().flush().is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}
