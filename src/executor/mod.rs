//! Executors start one worker and report how it ended. The supervisor's
//! slots use only [`Launch`] and [`Running`], so restart policy, job
//! recovery and history are one piece of code for every execution mode.

pub mod direct;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::logs::Tail;

/// Everything needed to start one worker in one slot.
#[derive(Debug, Clone)]
pub struct Launch {
    pub worker_type: String,
    pub slot: u32,
    /// The id the worker will register with (`WORKER_ID` in direct mode).
    pub worker_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub memory_limit: Option<u64>,
    pub log_path: PathBuf,
    pub log_max_size: u64,
    pub log_keep: u32,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    Code(i32),
    Signal(i32),
    /// SIGKILLed while the kernel's OOM killer was at work.
    Oom,
    Unknown(String),
}

impl fmt::Display for ExitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitCause::Code(c) => write!(f, "exited with code {c}"),
            ExitCause::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "was killed by {sig}"),
                Err(_) => write!(f, "was killed by signal {s}"),
            },
            ExitCause::Oom => write!(f, "was killed by the kernel's OOM killer (out of memory)"),
            ExitCause::Unknown(e) => write!(f, "ended ({e})"),
        }
    }
}

/// A started worker.
pub struct Running {
    pub worker_id: String,
    pub pid: Option<i32>,
    pub proc_start: Option<i64>,
    pub tail: Tail,
    inner: direct::DirectWorker,
}

impl Running {
    /// Resolves when the worker has exited. Cancel-safe (for `select!`).
    pub async fn wait(&mut self) -> ExitCause {
        self.inner.wait().await
    }

    /// Stops the worker: SIGTERM, SIGKILL after `grace`, and makes sure
    /// nothing it started is left.
    pub async fn stop(&mut self, grace: Duration) -> ExitCause {
        self.inner.stop(grace).await
    }

    /// After the worker ended: kills whatever it started that outlived it.
    pub async fn sweep(&self) {
        self.inner.sweep().await
    }
}

/// Starts a worker.
pub fn launch(spec: &Launch) -> anyhow::Result<Running> {
    direct::launch(spec)
}
