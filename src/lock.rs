//! One database, one supervisor: the supervisor holds an exclusive `flock`
//! on the database file itself, so the same database reached through a
//! symlink or a hard link is the same lock, and no file can be deleted to
//! make a running supervisor invisible. The kernel drops the lock when the
//! supervisor dies, however it dies. `<db>.lock` beside the database holds
//! the owner's pid for `stop` (written through `files::open_own_file`: no
//! symlink followed, mode 0644 whatever the umask); it is a hint, never the
//! lock.
//!
//! `flock` and SQLite's own POSIX locks do not interact on Linux, but
//! closing *any* descriptor of the database file drops every POSIX lock the
//! process holds on it, SQLite's included. So every descriptor opened here
//! stays open until the process exits.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use crate::contract::lock_path;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Descriptors of database files, one per path, open until the process
/// exits (see the module comment).
static HANDLES: LazyLock<Mutex<HashMap<PathBuf, &'static File>>> = LazyLock::new(Default::default);

/// The process's descriptor of the database file at `db`, opened once.
fn handle(db: &Path, create: bool) -> std::io::Result<&'static File> {
    let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = handles.get(db) {
        return Ok(f);
    }
    crate::files::regular_or_missing(db)?;
    let existed = db.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .mode(crate::files::FILE_MODE)
        .open(db)?;
    if create && !existed {
        file.set_permissions(std::fs::Permissions::from_mode(crate::files::FILE_MODE))?;
    }
    let file: &'static File = Box::leak(Box::new(file));
    handles.insert(db.to_path_buf(), file);
    Ok(file)
}

/// Databases whose exclusive lock this process holds.
static HELD: LazyLock<Mutex<Vec<PathBuf>>> = LazyLock::new(Default::default);

/// Proof that this process holds the supervisor lock; the lock itself
/// lives in a descriptor kept open until the process exits.
pub struct SupervisorLock {
    _private: (),
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another clx-pool supervisor ({}) is already running for {db}; stop it with `clx-pool stop --db {db}`",
        pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into())
    )]
    Held { pid: Option<i32>, db: String },
    #[error("cannot lock the database {path}: {err}")]
    Io { path: String, err: std::io::Error },
}

/// How long `start` or `stop` waits for the guard of a supervisor that
/// died to finish cleaning up after it (it holds the lock meanwhile).
const GUARD_WAIT: Duration = Duration::from_secs(30);

/// What the pid file says after the pid of a guard holding the lock.
const GUARD_MARK: &str = "guard";

impl SupervisorLock {
    /// Takes the lock of `db` (creating the file if needed) and writes this
    /// process's pid into the pid file. Waits while the guard of a dead
    /// supervisor holds it (a `start` right after a crash).
    pub fn acquire(db: &Path) -> Result<SupervisorLock, LockError> {
        Self::take(db, false)
    }

    /// The lock for the guard, marked as such in the pid file.
    pub fn acquire_as_guard(db: &Path) -> Result<SupervisorLock, LockError> {
        Self::take(db, true)
    }

    fn take(db: &Path, guard: bool) -> Result<SupervisorLock, LockError> {
        let io = |err: std::io::Error| LockError::Io {
            path: db.display().to_string(),
            err,
        };
        if let Some(dir) = db.parent() {
            crate::files::create_dirs(dir).map_err(io)?;
        }
        let file = handle(db, true).map_err(io)?;
        // A brief retry, so that a `stop` or `stats` probing the lock at the
        // same moment does not make this start fail; a longer one while a
        // guard cleans up.
        let started = Instant::now();
        loop {
            let waited = started.elapsed();
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock)
                    if waited < Duration::from_millis(300) || (!guard && waited < GUARD_WAIT && held_by_guard(db)) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::Held {
                        pid: pid_hint(db),
                        db: db.display().to_string(),
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(db.to_path_buf());
        write_pid_file(db, guard).map_err(|err| LockError::Io {
            path: lock_path(db).display().to_string(),
            err,
        })?;
        Ok(SupervisorLock { _private: () })
    }
}

/// Writes this process's pid into `<db>.lock` (and, for a guard, that it
/// is one), refusing to follow a symlink there (which could point
/// anywhere).
fn write_pid_file(db: &Path, guard: bool) -> std::io::Result<()> {
    let mut f = crate::files::open_own_file(&lock_path(db), false)?;
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    if guard {
        writeln!(f, "{} {GUARD_MARK}", std::process::id())?;
    } else {
        writeln!(f, "{}", std::process::id())?;
    }
    f.sync_data()
}

/// The pid in the pid file, if it names a live process, and whether it
/// is a guard's.
fn pid_file(db: &Path) -> Option<(i32, bool)> {
    let mut text = String::new();
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(lock_path(db))
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    let mut words = text.split_whitespace();
    let pid: i32 = words.next()?.parse().ok()?;
    let guard = words.next() == Some(GUARD_MARK);
    (pid > 0 && crate::procs::start_ticks(pid).is_some()).then_some((pid, guard))
}

/// The pid in the pid file, if it names a live process.
fn pid_hint(db: &Path) -> Option<i32> {
    pid_file(db).map(|(pid, _)| pid)
}

/// Whether the lock's holder is the guard of a supervisor that died.
fn held_by_guard(db: &Path) -> bool {
    pid_file(db).is_some_and(|(_, guard)| guard)
}

/// A supervisor running for a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// From the pid file, when it names a live process; else the caller
    /// asks the database's supervisor record.
    pub pid: Option<i32>,
}

/// Whether a supervisor holds the lock of `db` (and its pid, if known).
/// The guard of a supervisor that died, cleaning up after it, is none.
pub fn running_supervisor(db: &Path) -> Option<Running> {
    // A probe through our own descriptor would convert (and then drop) a
    // lock this process holds.
    if HELD.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|p| p == db) {
        return Some(Running {
            pid: Some(std::process::id() as i32),
        });
    }
    let file = handle(db, false).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            if let Err(e) = file.unlock() {
                tracing::debug!("releasing the probe lock of {}: {e}", db.display());
            }
            None
        }
        Err(TryLockError::WouldBlock) => match pid_file(db) {
            Some((_, true)) => None,
            found => Some(Running {
                pid: found.map(|(pid, _)| pid),
            }),
        },
        Err(TryLockError::Error(_)) => None,
    }
}
