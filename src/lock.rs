//! The supervisor lock: an exclusive `flock` on `<db>.lock` beside the
//! database. The kernel releases it when the supervisor dies, however it
//! dies, so "is a supervisor running?" never depends on a stale record.
//! The file holds the owner's pid for `stop` to signal.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db.with_file_name(name)
}

/// Held for the supervisor's whole life.
pub struct SupervisorLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another clx-pool supervisor (pid {pid}) is already running for {db}; stop it with `clx-pool stop --db {db}`"
    )]
    Held { pid: String, db: String },
    #[error("cannot use the lock file {path}: {err}")]
    Io { path: String, err: std::io::Error },
}

impl SupervisorLock {
    pub fn acquire(db: &Path) -> Result<SupervisorLock, LockError> {
        let path = lock_path(db);
        let io = |err: std::io::Error| LockError::Io {
            path: path.display().to_string(),
            err,
        };
        // A brief retry, so that a `stop` or `stats` probing the lock at the
        // same moment does not make this start fail.
        let deadline = Instant::now() + Duration::from_millis(300);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    lock.set_len(0).map_err(io)?;
                    lock.seek(SeekFrom::Start(0)).map_err(io)?;
                    writeln!(lock, "{}", std::process::id()).map_err(io)?;
                    lock.sync_data().map_err(io)?;
                    return Ok(SupervisorLock { _lock: lock });
                }
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        let mut pid = String::new();
                        let _ = file.read_to_string(&mut pid);
                        return Err(LockError::Held {
                            pid: pid.trim().to_string(),
                            db: db.display().to_string(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, e)) => return Err(io(e.into())),
            }
        }
    }
}

/// The pid of the supervisor holding the lock of `db`, if one is running.
pub fn running_supervisor(db: &Path) -> Option<i32> {
    let path = lock_path(db);
    let mut file = File::open(&path).ok()?;
    let mut pid = String::new();
    file.read_to_string(&mut pid).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err((_, Errno::EWOULDBLOCK)) => Some(pid.trim().parse().unwrap_or(0)),
        Err(_) => None,
    }
}
