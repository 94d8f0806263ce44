//! How an idle built-in worker learns that a job may wait for it without
//! polling the database every few milliseconds.
//!
//! Under a supervisor, a doorbell: the supervisor watches the database
//! (one process), and when a type has pending jobs it writes a byte to
//! that type's bell, a FIFO beside the database (`.<db>.bell-<type>`,
//! named by `CLX_POOL_BELL`); the type's idle workers wait only for it to
//! become readable, so the heartbeats of hundreds of idle workers wake
//! nobody. A FIFO costs each worker one descriptor and no inotify
//! instance (a user has 128 of those by default).
//! Run by hand, a worker watches the database's WAL itself, and after a
//! write it looks again a few times within 30 ms, because inotify reports
//! the WAL's write before SQLite publishes the commit. Without inotify it
//! polls at `--poll-interval`.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// `AsyncFd` wants `AsRawFd`; nix's `Inotify` offers `AsFd`.
struct Fd(Inotify);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// The bell: a FIFO opened for reading and writing (so it never reports
/// end of file), without blocking.
struct BellFd(std::fs::File);

impl std::os::fd::AsRawFd for BellFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// What is watched.
enum Watched {
    /// The bell: readable means rung.
    Bell(AsyncFd<BellFd>),
    /// The database's folder: writes to these names (the file, its WAL).
    Folder(AsyncFd<Fd>, [OsString; 2]),
}

pub struct Wake {
    watch: Option<Watched>,
}

/// Opens a bell (a FIFO, nothing else) for waiting on it.
pub fn open_bell(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    f.metadata().ok()?.file_type().is_fifo().then_some(f)
}

/// Waits until `fd` is readable, or `deadline` (None then; a descriptor
/// that cannot be waited on waits out the deadline, as a poll would).
async fn readable_by<T: std::os::fd::AsRawFd>(
    fd: &AsyncFd<T>,
    deadline: tokio::time::Instant,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'_, T>> {
    tokio::select! {
        r = fd.readable() => match r {
            Ok(guard) => Some(guard),
            Err(_) => {
                tokio::time::sleep_until(deadline).await;
                None
            }
        },
        _ = tokio::time::sleep_until(deadline) => None,
    }
}

fn inotify() -> Option<Inotify> {
    Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()
}

fn register<T: std::os::fd::AsRawFd>(inner: T) -> Option<AsyncFd<T>> {
    // SAFETY: the descriptor belongs to `inner`, which the `AsyncFd` owns
    // for its whole life; `as_raw_fd` always returns it.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }.ok()
}

impl Wake {
    /// Watches `bell` if given and watchable, else the folder of `db`.
    pub fn new(db: &Path, bell: Option<&Path>) -> Wake {
        let by_bell = bell
            .and_then(open_bell)
            .and_then(|f| register(BellFd(f)))
            .map(Watched::Bell);
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
            Some(Watched::Folder(register(Fd(i))?, [name, wal]))
        });
        match &watch {
            None => tracing::debug!("no bell and no inotify: polling the database"),
            Some(Watched::Bell(_)) => tracing::debug!("waiting for the supervisor's bell"),
            Some(Watched::Folder(..)) => tracing::debug!("watching the database's WAL"),
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
        matches!(self.watch, Some(Watched::Folder(..)))
    }

    /// How long an idle worker waits at most, when changes are signalled:
    /// the bell is rung by a supervisor that watches every commit (and the
    /// worker wakes for its heartbeat anyway); a folder watch can miss a
    /// commit published after its last write.
    pub fn fallback(&self) -> Duration {
        match self.watch {
            Some(Watched::Bell(_)) => Duration::from_secs(60),
            _ => Duration::from_secs(1),
        }
    }

    /// Resolves true on a change (a ring, a write to the database), false
    /// after `limit`.
    pub async fn changed(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        match &mut self.watch {
            None => {
                tokio::time::sleep(limit).await;
                false
            }
            Some(Watched::Bell(fd)) => loop {
                let Some(mut guard) = readable_by(fd, deadline).await else {
                    return false;
                };
                // One ring is one job: take one byte; a worker that finds
                // none (another took it) goes back to sleep without a look.
                let mut byte = [0u8; 1];
                match guard.try_io(|f| std::io::Read::read(&mut &f.get_ref().0, &mut byte)) {
                    Ok(Ok(1)) => return true,
                    Ok(_) | Err(_) => continue,
                }
            },
            Some(Watched::Folder(fd, names)) => loop {
                let Some(mut guard) = readable_by(fd, deadline).await else {
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
                if events
                    .iter()
                    .any(|e| e.name.as_ref().is_some_and(|n| names.contains(n)))
                {
                    return true;
                }
            },
        }
    }
}
