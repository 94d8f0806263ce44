//! How an idle built-in worker learns that a job may wait for it without
//! polling the database every few milliseconds.
//!
//! Under a supervisor, a doorbell: the supervisor watches the database
//! (one process), and when a type has pending jobs it writes to that
//! type's bell file (`.<db>.bell-<type>` beside the database, named by
//! `CLX_POOL_BELL`); the type's idle workers watch only that file
//! (inotify), so the heartbeats of hundreds of idle workers wake nobody.
//! Run by hand, a worker watches the database's WAL itself, and after a
//! write it looks again a few times within 30 ms, because inotify reports
//! the WAL's write before SQLite publishes the commit. Without inotify it
//! polls at `--poll-interval`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The variable naming a worker's bell file.
pub const BELL_VAR: &str = "CLX_POOL_BELL";

/// The bell of `worker_type` for the database at `db`.
pub fn bell_path(db: &Path, worker_type: &str) -> PathBuf {
    let dir = db.parent().unwrap_or(Path::new("."));
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.bell-{worker_type}"))
}

/// `AsyncFd` wants `AsRawFd`; nix's `Inotify` offers `AsFd`.
struct Fd(Inotify);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// What is watched.
enum Watched {
    /// The bell file: any event is a ring.
    Bell,
    /// The database's folder: writes to these names (the file, its WAL).
    Folder([OsString; 2]),
}

pub struct Wake {
    watch: Option<(AsyncFd<Fd>, Watched)>,
}

fn inotify() -> Option<Inotify> {
    Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()
}

fn register(inotify: Inotify, what: Watched) -> Option<(AsyncFd<Fd>, Watched)> {
    // SAFETY: the descriptor belongs to the `Inotify` that the `AsyncFd`
    // owns for its whole life; `as_raw_fd` always returns it.
    let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), tokio::io::Interest::READABLE) }.ok()?;
    Some((fd, what))
}

impl Wake {
    /// Watches `bell` if given and watchable, else the folder of `db`.
    pub fn new(db: &Path, bell: Option<&Path>) -> Wake {
        let by_bell = bell.and_then(|b| {
            let i = inotify()?;
            i.add_watch(b, AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE)
                .ok()?;
            register(i, Watched::Bell)
        });
        let watch = by_bell.or_else(|| {
            let dir = db
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = db.file_name()?.to_os_string();
            let mut wal = name.clone();
            wal.push("-wal");
            let i = inotify()?;
            i.add_watch(
                dir,
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .ok()?;
            register(i, Watched::Folder([name, wal]))
        });
        match &watch {
            None => tracing::debug!("no inotify: polling the database"),
            Some((_, Watched::Bell)) => tracing::debug!("waiting for the supervisor's bell"),
            Some((_, Watched::Folder(_))) => tracing::debug!("watching the database's WAL"),
        }
        Wake { watch }
    }

    /// Whether changes are signalled at all (else the caller polls).
    pub fn signalled(&self) -> bool {
        self.watch.is_some()
    }

    /// Whether a wake may come a moment before the change is visible (the
    /// WAL is written before the commit is published): look again shortly.
    pub fn needs_settling(&self) -> bool {
        matches!(self.watch, Some((_, Watched::Folder(_))))
    }

    /// How long an idle worker waits at most, when changes are signalled:
    /// the bell is rung by a supervisor that watches every commit; a folder
    /// watch can miss a commit published after its last write.
    pub fn fallback(&self) -> Duration {
        match self.watch {
            Some((_, Watched::Bell)) => Duration::from_secs(5),
            _ => Duration::from_secs(1),
        }
    }

    /// Resolves true on a change (a ring, a write to the database), false
    /// after `limit`.
    pub async fn changed(&mut self, limit: Duration) -> bool {
        let Some((fd, watched)) = &mut self.watch else {
            tokio::time::sleep(limit).await;
            return false;
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ready = tokio::select! {
                r = fd.readable() => r,
                _ = tokio::time::sleep_until(deadline) => return false,
            };
            let Ok(mut guard) = ready else {
                tokio::time::sleep_until(deadline).await;
                return false;
            };
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => events,
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    tracing::debug!("reading inotify events: {e}");
                    return false;
                }
            };
            let relevant = match watched {
                Watched::Bell => !events.is_empty(),
                Watched::Folder(names) => events
                    .iter()
                    .any(|e| e.name.as_ref().is_some_and(|n| names.contains(n))),
            };
            if relevant {
                return true;
            }
        }
    }
}
