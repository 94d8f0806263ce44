//! Taking over a pool's database, the one way `start`, `stop` and the
//! guard do it: take the supervisor lock, open (and if need be create or
//! upgrade) the database, let the caller check and prepare, then clean up
//! what an earlier run left behind — its processes, containers, worker
//! rows and their jobs. Whoever holds a [`Taken`] owns the pool's rows
//! until the process exits.

pub mod cleanup;

use std::path::Path;
use std::time::Duration;

pub use cleanup::CleanupReport;

use crate::db::{self, Db};
use crate::executor::backends::Backends;
use crate::lock::SupervisorLock;
use crate::vocab::Protocol;

/// Who takes the pool over: the lock says so in its pid file, and only a
/// guard gives up at once when someone else holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taker {
    /// `clx-pool start`, before it runs the pool.
    Start,
    /// `clx-pool stop` with no supervisor running.
    Stop,
    /// The guard of a supervisor that died.
    Guard,
}

/// What a takeover asks for.
pub struct Takeover<'a> {
    pub db_path: &'a Path,
    pub taker: Taker,
    /// The protocol the config names, if any.
    pub protocol: Option<Protocol>,
    /// How long an orphaned worker gets between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The swarm manager an earlier run's swarm slots used (`[swarm]
    /// docker_host`; unset: `DOCKER_HOST` or the local socket).
    pub swarm_host: Option<&'a str>,
}

/// The pool, taken over: the lock, the open database, what the caller
/// prepared and what was cleaned up.
pub struct Taken<T> {
    pub lock: SupervisorLock,
    pub db: Db,
    pub prepared: T,
    pub report: CleanupReport,
}

/// lock → open → `prepare` → clean up. `prepare` checks the opened
/// database (its protocol) and readies what the caller needs before the
/// cleanup; the backends it returns are searched for the pool's leftovers
/// (without them, Docker is asked only if the pool's slots used it). Nothing is cleaned up if `prepare` fails.
pub async fn take_over<T>(
    t: Takeover<'_>,
    prepare: impl AsyncFnOnce(&Db) -> anyhow::Result<(T, Backends)>,
) -> anyhow::Result<Taken<T>> {
    let lock = match t.taker {
        Taker::Guard => SupervisorLock::acquire_as_guard(t.db_path)?,
        Taker::Start | Taker::Stop => SupervisorLock::acquire(t.db_path)?,
    };
    let (path, wanted) = (t.db_path.to_path_buf(), t.protocol);
    let (conn, protocol) = tokio::task::spawn_blocking(move || db::open(&path, wanted)).await??;
    let db = Db::new(conn, t.db_path, protocol);
    let (prepared, backends) = prepare(&db).await?;
    let report = cleanup::orphans(&db, t.grace, backends, t.swarm_host).await?;
    Ok(Taken {
        lock,
        db,
        prepared,
        report,
    })
}

/// A `prepare` for callers that need nothing but the database.
pub async fn nothing(_: &Db) -> anyhow::Result<((), Backends)> {
    Ok(((), Backends::default()))
}
