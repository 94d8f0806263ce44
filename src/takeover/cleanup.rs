//! Cleaning up after a supervisor that is gone (crashed, killed with
//! SIGKILL): the worker processes it recorded are stopped if they still
//! run (checked by pid *and* start time), and every worker row still marked
//! alive is marked dead with its jobs put back. Used by `start` before it
//! runs and by `stop` when no supervisor is running.

use std::fmt;
use std::time::Duration;

use crate::db::{self, Db};
use crate::executor::backends::Backends;
use crate::procs;

#[derive(Debug, Default)]
pub struct CleanupReport {
    pub containers_removed: usize,
    pub processes_stopped: usize,
    pub workers_marked_dead: usize,
    pub jobs_requeued: usize,
    pub jobs_failed: usize,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.containers_removed
            + self.processes_stopped
            + self.workers_marked_dead
            + self.jobs_requeued
            + self.jobs_failed
            == 0
    }
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removed {} container(s), stopped {} orphaned worker process(es), marked {} stale worker row(s) dead, put {} job(s) back in the queue, failed {} job(s) with no attempts left",
            self.containers_removed,
            self.processes_stopped,
            self.workers_marked_dead,
            self.jobs_requeued,
            self.jobs_failed
        )
    }
}

/// Call only while holding the supervisor lock or after checking that no
/// supervisor runs.
pub async fn orphans(
    db: &Db,
    grace: Duration,
    backends: Backends,
    swarm_host: Option<&str>,
) -> anyhow::Result<CleanupReport> {
    let slots = db.call(|c| db::slots::slots(c)).await?;
    let mut report = CleanupReport::default();
    // Containers outlive a crashed supervisor; find them by label. Docker
    // is asked only if this pool used it (or is about to).
    let backends = backends
        .for_cleanup(db.path(), slots.iter().map(|s| s.execution_mode.kind), swarm_host)
        .await;
    report.containers_removed = backends.remove_leftovers().await?;
    let mut stops = tokio::task::JoinSet::new();
    for s in slots {
        if let Some(pid) = s.pid {
            stops.spawn(procs::stop_orphan_group(pid as i32, s.proc_start, grace));
        }
    }
    while let Some(r) = stops.join_next().await {
        if r.unwrap_or(false) {
            report.processes_stopped += 1;
        }
    }
    // Descendants that had left their worker's process group (setsid, job
    // commands), found by the environment they inherited.
    let db_path = db.path().to_path_buf();
    report.processes_stopped += procs::sweep(
        move || procs::find_pool_processes(&db_path, None),
        Duration::from_secs(5),
    )
    .await;
    let protocol = db.protocol();
    let (dead, requeued, failed) = db
        .call(move |c| {
            let old = db::supervisor::supervisor(c)?.map(|s| s.pid);
            let r = db::jobs::bury_pool_rows(c, protocol, old, "was left behind by a supervisor that is gone")?;
            db::supervisor::close_run(c)?;
            Ok(r)
        })
        .await?;
    report.workers_marked_dead = dead;
    report.jobs_requeued = requeued;
    report.jobs_failed = failed;
    Ok(report)
}
