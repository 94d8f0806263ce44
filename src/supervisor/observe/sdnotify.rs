//! systemd's `Type=notify` protocol (sd_notify(3)), for running the pool as
//! a service: `READY=1` once every worker registered, `STATUS=` a one-line
//! summary, `WATCHDOG=1` from the monitor while `WATCHDOG_USEC` is set,
//! `STOPPING=1` when the pool stops. Datagrams to `NOTIFY_SOCKET` (a path,
//! or an abstract name written `@name`); without it nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::contract::env::cli as env;

#[derive(Clone, Default)]
pub struct SdNotify {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    socket: UnixDatagram,
    to: SocketAddr,
    watchdog: Option<Duration>,
    ready: AtomicBool,
}

impl SdNotify {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (for this process only, if
    /// `WATCHDOG_PID` says so).
    pub fn from_env() -> SdNotify {
        let Some(path) = std::env::var_os(env::NOTIFY_SOCKET).filter(|p| !p.is_empty()) else {
            return SdNotify::default();
        };
        let to = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
            None => SocketAddr::from_pathname(&path),
        };
        let (Ok(to), Ok(socket)) = (to, UnixDatagram::unbound()) else {
            tracing::warn!(
                "NOTIFY_SOCKET={}: not usable; systemd will not be told",
                path.to_string_lossy()
            );
            return SdNotify::default();
        };
        let ours = std::env::var(env::WATCHDOG_PID)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var(env::WATCHDOG_USEC)
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|_| ours)
            .map(Duration::from_micros);
        SdNotify {
            inner: Some(Arc::new(Inner {
                socket,
                to,
                watchdog,
                ready: AtomicBool::new(false),
            })),
        }
    }

    /// The watchdog period systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.inner.as_ref().and_then(|i| i.watchdog)
    }

    fn send(&self, message: &str) {
        if let Some(i) = &self.inner
            && let Err(e) = i.socket.send_to_addr(message.as_bytes(), &i.to)
        {
            tracing::debug!("telling systemd {message:?}: {e}");
        }
    }

    /// Every worker registered: the service is up.
    pub fn ready(&self, status: &str) {
        if let Some(i) = &self.inner {
            i.ready.store(true, Ordering::SeqCst);
        }
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// Whether READY=1 was sent (and so a systemd is listening).
    pub fn is_ready(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.ready.load(Ordering::SeqCst))
    }

    /// The monitor is alive (sent once ready, when systemd asked for it).
    pub fn watchdog_ping(&self) {
        if let Some(i) = &self.inner
            && i.watchdog.is_some()
            && i.ready.load(Ordering::SeqCst)
        {
            self.send("WATCHDOG=1");
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping every worker");
    }
}
