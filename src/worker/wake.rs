//! How an idle built-in worker learns that something may have been queued
//! without polling the database every few milliseconds: every commit
//! writes to the database's WAL (or the database file itself), and inotify
//! reports that write. The worker sleeps until such a change or its
//! fallback period, whichever comes first; without inotify (a file system
//! that lacks it, a limit reached) it polls at the fallback period's pace
//! given by `--poll-interval`.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

pub struct Wake {
    watch: Option<Watch>,
}

/// `AsyncFd` wants `AsRawFd`; nix's `Inotify` offers `AsFd`.
struct Fd(Inotify);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

struct Watch {
    fd: AsyncFd<Fd>,
    /// The database file's name and its WAL's.
    names: [OsString; 2],
}

impl Wake {
    /// Watches the folder of `db` for writes to it or its WAL.
    pub fn new(db: &Path) -> Wake {
        let watch = (|| {
            let dir = db
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = db.file_name()?.to_os_string();
            let mut wal = name.clone();
            wal.push("-wal");
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
            inotify
                .add_watch(
                    dir,
                    AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
                )
                .ok()?;
            // SAFETY: the descriptor belongs to the `Inotify` that the
            // `AsyncFd` owns for its whole life; `as_raw_fd` always returns it.
            let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), tokio::io::Interest::READABLE) }.ok()?;
            Some(Watch { fd, names: [name, wal] })
        })();
        if watch.is_none() {
            tracing::debug!("no inotify for the database's folder: polling instead");
        }
        Wake { watch }
    }

    /// Whether changes are signalled (else the caller must poll often).
    pub fn signalled(&self) -> bool {
        self.watch.is_some()
    }

    /// Resolves when the database may have changed, or after `limit`.
    pub async fn changed(&mut self, limit: Duration) {
        let Some(w) = &mut self.watch else {
            tokio::time::sleep(limit).await;
            return;
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ready = tokio::select! {
                r = w.fd.readable() => r,
                _ = tokio::time::sleep_until(deadline) => return,
            };
            let Ok(mut guard) = ready else {
                tokio::time::sleep_until(deadline).await;
                return;
            };
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => events,
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    tracing::debug!("reading inotify events: {e}");
                    return;
                }
            };
            if events
                .iter()
                .any(|e| e.name.as_ref().is_some_and(|n| w.names.contains(n)))
            {
                return;
            }
        }
    }
}
