//! Worker output: every worker's stdout and stderr go into one pipe that a
//! task drains continuously into the slot's log file, so a worker never
//! blocks on a full pipe however much it prints. Files rotate by size
//! (`<type>-<slot>.log`, `.log.1`, … up to `log_keep`), and the last lines
//! are kept in memory for error messages and the restart history.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

/// How much of a worker's latest output is kept in memory.
const TAIL_BYTES: usize = 4096;

/// A size-rotated log file.
pub struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_size: u64,
    keep: u32,
}

impl RotatingLog {
    pub fn open(path: &Path, max_size: u64, keep: u32) -> std::io::Result<RotatingLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_size,
            keep,
        })
    }

    pub fn write(&mut self, buf: &[u8]) {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(buf).is_ok() {
                self.size += buf.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let numbered = |n: u32| {
            let mut name = self.path.as_os_str().to_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            let _ = std::fs::rename(&self.path, numbered(1));
        }
        self.file = OpenOptions::new().create(true).append(true).open(&self.path).ok();
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
pub async fn drain(mut reader: pipe::Receiver, mut log: RotatingLog, tail: Tail) {
    let mut buf = [0u8; 8 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.write(&buf[..n]);
                tail.push(&buf[..n]);
            }
        }
    }
}

/// Writes a marker line (worker started, stopped…) into a slot's log.
pub fn mark(log: &mut RotatingLog, text: &str) {
    log.write(
        format!(
            "=== {} {text} ===\n",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        )
        .as_bytes(),
    );
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
    fn tail_keeps_last_lines() {
        let t = Tail::default();
        for i in 0..2000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(t.lines(2), "line 1998\nline 1999");
    }
}
