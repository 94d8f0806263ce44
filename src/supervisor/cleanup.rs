//! Cleaning up after a supervisor that is gone (crashed, killed with
//! SIGKILL): the worker processes it recorded are stopped if they still
//! run (checked by pid *and* start time), and every worker row still marked
//! alive is marked dead with its jobs put back. Used by `start` before it
//! runs and by `stop` when no supervisor is running.

use std::fmt;
use std::time::Duration;

use crate::db::{self, Db};
use crate::procs;

#[derive(Debug, Default)]
pub struct CleanupReport {
    pub processes_stopped: usize,
    pub workers_marked_dead: usize,
    pub jobs_requeued: usize,
    pub jobs_failed: usize,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.processes_stopped + self.workers_marked_dead + self.jobs_requeued + self.jobs_failed == 0
    }
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped {} orphaned worker process(es), marked {} stale worker row(s) dead, put {} job(s) back in the queue, failed {} job(s) with no attempts left",
            self.processes_stopped, self.workers_marked_dead, self.jobs_requeued, self.jobs_failed
        )
    }
}

/// Call only while holding the supervisor lock or after checking that no
/// supervisor runs.
pub async fn orphans(db: &Db, grace: Duration) -> anyhow::Result<CleanupReport> {
    let slots = db.call(|c| db::pool::slots(c)).await?;
    let mut report = CleanupReport::default();
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
    // Descendants that had left their worker's process group (setsid) and
    // were not in any recorded group: found by the environment they carry.
    let leftovers = procs::find_pool_leftovers(db.path());
    if !leftovers.is_empty() {
        for &pid in &leftovers {
            let _ = procs::signal_process(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !procs::find_pool_leftovers(db.path()).is_empty() && std::time::Instant::now() < deadline {
            procs::reap_strays();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        report.processes_stopped += leftovers.len();
    }
    let (dead, requeued, failed) = db
        .call(|c| {
            let r = db::workers::bury_all(c, "was left behind by a supervisor that is gone")?;
            c.execute("UPDATE clx_pool_slots SET pid = NULL, proc_start = NULL, state = 'stopped'", [])?;
            c.execute("UPDATE clx_pool_supervisor SET state = 'stopped', stopped_at = COALESCE(stopped_at, CURRENT_TIMESTAMP) WHERE state != 'stopped'", [])?;
            Ok(r)
        })
        .await?;
    report.workers_marked_dead = dead;
    report.jobs_requeued = requeued;
    report.jobs_failed = failed;
    Ok(report)
}
