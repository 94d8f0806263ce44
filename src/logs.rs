//! Worker output: every worker's stdout and stderr go into one pipe that a
//! task drains continuously into the slot's log file, so a worker never
//! blocks on a full pipe however much it prints. Files rotate by size
//! (`<type>-<slot>.log`, `.log.1`, … up to `log_keep`), and the last lines
//! are kept in memory for error messages and the restart history.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::unix::pipe;

/// How much of a worker's latest output is kept in memory.
const TAIL_BYTES: usize = 4096;

/// A worker's log could not be opened (a full disk, a path that became a
/// folder, permissions): a fault outside the worker, which the slot waits
/// out (a cool-down) instead of giving up on.
#[derive(Debug, thiserror::Error)]
#[error("opening the worker log {}: {source}", path.display())]
pub struct LogUnavailable {
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Opens a worker's log.
pub fn open_worker_log(path: &Path, max_size: u64, keep: u32) -> Result<RotatingLog, LogUnavailable> {
    RotatingLog::open(path, max_size, keep).map_err(|source| LogUnavailable {
        path: path.to_path_buf(),
        source,
    })
}

/// A size-rotated log file.
pub struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_size: u64,
    keep: u32,
    /// The last write or rotation failed (said once, not per write).
    failing: bool,
    /// The next byte written starts a line (and gets a timestamp).
    line_start: bool,
}

impl RotatingLog {
    pub fn open(path: &Path, max_size: u64, keep: u32) -> std::io::Result<RotatingLog> {
        if let Some(dir) = path.parent() {
            crate::files::create_dirs(dir)?;
        }
        let file = crate::files::open_own_file(path, true)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_size,
            keep,
            failing: false,
            line_start: true,
        })
    }

    /// Reports a failed write or rotation once until it works again: a
    /// worker's output is never worth stopping the worker for.
    fn report(&mut self, result: std::io::Result<()>, what: &str) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(log = %self.path.display(), "{what}: {e}; output is lost until it works again");
            }
            Err(_) => {}
        }
    }

    /// Writes output, each line prefixed with the time it was read
    /// (RFC 3339, UTC, milliseconds), so `clx-pool logs` can interleave
    /// the logs of several workers.
    pub fn write_lines(&mut self, buf: &[u8]) {
        let stamp = format!("{} ", humantime::format_rfc3339_millis(std::time::SystemTime::now()));
        let mut out = Vec::with_capacity(buf.len() + 32);
        for &b in buf {
            if self.line_start {
                out.extend_from_slice(stamp.as_bytes());
                self.line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.line_start = true;
            }
        }
        self.write(&out);
    }

    pub fn write(&mut self, buf: &[u8]) {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate();
        }
        if self.file.is_none() {
            // A rotation that failed to reopen: try again now.
            self.file = crate::files::open_own_file(&self.path, true).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let written = f.write_all(buf);
        if written.is_ok() {
            self.size += buf.len() as u64;
        }
        self.report(written, "writing the worker log");
    }

    fn rotate(&mut self) {
        self.file = None;
        let numbered = |n: u32| {
            let mut name = self.path.as_os_str().to_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        let missing_ok = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        let moved = if self.keep == 0 {
            missing_ok(std::fs::remove_file(&self.path))
        } else {
            missing_ok(std::fs::remove_file(numbered(self.keep)))
                .and_then(|()| {
                    (1..self.keep)
                        .rev()
                        .try_for_each(|n| missing_ok(std::fs::rename(numbered(n), numbered(n + 1))))
                })
                .and_then(|()| std::fs::rename(&self.path, numbered(1)))
        };
        self.report(moved, "rotating the worker log");
        let reopened = crate::files::open_own_file(&self.path, true);
        self.file = match reopened {
            Ok(f) => Some(f),
            Err(e) => {
                self.report(Err(e), "reopening the worker log");
                None
            }
        };
        self.size = 0;
    }
}

/// The last few kilobytes a worker printed, shared with its slot.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    pub fn push(&self, buf: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let buf = &buf[buf.len().saturating_sub(TAIL_BYTES)..];
        let excess = (t.len() + buf.len()).saturating_sub(TAIL_BYTES);
        t.drain(..excess);
        t.extend(buf);
    }

    /// The last `lines` lines, as text.
    pub fn lines(&self, lines: usize) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = t.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Copies everything from `reader` into `log` and `tail` until every writer
/// has closed the pipe.
///
/// The read buffer lives on the stack only while data is copied, never in
/// the waiting task: a pool keeps one drain per worker, mostly idle, and an
/// 8 KiB buffer held across the wait would cost 8 MB at 1000 workers.
pub async fn drain(reader: pipe::Receiver, mut log: RotatingLog, tail: Tail) {
    while reader.readable().await.is_ok() && copy_available(&reader, &mut log, &tail) {}
}

/// Copies what the pipe holds now into `log` and `tail`; false at end of
/// file or on an error (nothing there yet is not one: wait again).
fn copy_available(reader: &pipe::Receiver, log: &mut RotatingLog, tail: &Tail) -> bool {
    let mut buf = [0u8; 8 * 1024];
    match reader.try_read(&mut buf) {
        Ok(0) => false,
        Ok(n) => {
            log.write_lines(&buf[..n]);
            tail.push(&buf[..n]);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Writes a marker line (worker started, stopped…) into a slot's log.
pub fn mark(log: &mut RotatingLog, text: &str) {
    if !log.line_start {
        log.write_lines(b"\n");
    }
    log.write_lines(format!("=== {text} ===\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let mut log = RotatingLog::open(&path, 100, 2).unwrap();
        for i in 0..10 {
            log.write(format!("{i:>59}\n").as_bytes());
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(dir.path().join("w.log.1").exists());
        assert!(dir.path().join("w.log.2").exists());
        assert!(!dir.path().join("w.log.3").exists());
    }

    #[test]
    fn every_line_gets_the_time_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let mut log = RotatingLog::open(&path, 1 << 20, 1).unwrap();
        log.write_lines(b"one\ntw");
        log.write_lines(b"o\nthree\n");
        mark(&mut log, "started");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for (line, rest) in lines.iter().zip(["one", "two", "three", "=== started ==="]) {
            let (stamp, after) = line.split_once(' ').unwrap();
            assert!(humantime::parse_rfc3339(stamp).is_ok(), "{line}");
            assert_eq!(after, rest);
        }
    }

    #[test]
    fn tail_keeps_last_lines() {
        let t = Tail::default();
        for i in 0..2000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(t.lines(2), "line 1998\nline 1999");
    }
}
