//! What the supervisor's monitor reads and writes: the live workers of
//! running slots with their ages (computed by SQLite, in UTC), and their
//! CPU and memory figures.

use std::time::Duration;

use rusqlite::Connection;

use crate::vocab::{Mode, ModeKind, SlotId, WorkerId, WorkerRow, WorkerStatus};

/// Which workers a tick reads: on most ticks only those that could be hung
/// (heartbeat or job older than the smallest limit), so an idle pool's tick
/// reads next to nothing; with `everything`, all of them.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    pub min_heartbeat: Duration,
    pub min_job_time: Duration,
    /// Some type has the zero-CPU rule: every busy worker is read.
    pub all_busy: bool,
    pub everything: bool,
}

/// A registered worker of a running slot, as a monitor tick sees it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub slot: SlotId,
    pub row: WorkerRow,
    /// The worker's process (direct) …
    pub pid: Option<i32>,
    /// … or its container (docker).
    pub container: Option<WorkerId>,
    pub status: WorkerStatus,
    pub heartbeat_age: Duration,
    /// The job in hand (the oldest if several) and how long it has run.
    pub job: Option<(i64, Duration)>,
    /// No memory figure was written for it yet (a new worker).
    pub unmeasured: bool,
    /// Jobs it finished (completed or failed).
    pub jobs_done: i64,
}

pub fn observe(c: &mut Connection, f: &Filter) -> rusqlite::Result<Vec<Observed>> {
    let mut stmt = c.prepare_cached(
        "SELECT * FROM (
            SELECT s.worker_type, s.slot, w.id, s.pid, w.status, s.execution_mode, s.worker_id,
                   COALESCE(unixepoch('now') - unixepoch(w.last_heartbeat), 0) AS hb_age,
                   j.id AS job, unixepoch('now') - unixepoch(j.started_at) AS job_age,
                   w.memory_usage IS NULL AS unmeasured, j.started_at AS job_started,
                   COALESCE(w.jobs_processed, 0) + COALESCE(w.jobs_failed, 0) AS done
            FROM clx_pool_slots s
            JOIN workers w ON w.id = s.worker_row
            LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = 'processing'
            WHERE s.state = 'running')
         WHERE ?4 OR unmeasured
            OR (job IS NULL AND hb_age > ?1)
            OR (job IS NOT NULL AND (job_age > ?2 OR ?3))
         ORDER BY worker_type, slot, job_started",
    )?;
    let params = rusqlite::params![
        f.min_heartbeat.as_secs() as i64,
        f.min_job_time.as_secs() as i64,
        f.all_busy,
        f.everything
    ];
    let secs = |s: i64| Duration::from_secs(s.max(0) as u64);
    let rows = stmt.query_map(params, |r| {
        let job: Option<i64> = r.get(8)?;
        let age: Option<i64> = r.get(9)?;
        let mode: Mode = r.get(5)?;
        Ok(Observed {
            slot: SlotId {
                worker_type: r.get(0)?,
                index: r.get(1)?,
            },
            row: r.get(2)?,
            pid: r.get::<_, Option<i64>>(3)?.map(|p| p as i32),
            container: match mode.kind {
                ModeKind::Docker => r.get(6)?,
                ModeKind::Direct => None,
            },
            status: r.get(4)?,
            heartbeat_age: secs(r.get(7)?),
            job: job.map(|j| (j, secs(age.unwrap_or(0)))),
            unmeasured: r.get(10)?,
            jobs_done: r.get(12)?,
        })
    })?;
    let mut out: Vec<Observed> = Vec::new();
    for o in rows {
        let o = o?;
        // Several jobs in hand: the oldest (first) decides.
        if out.last().is_some_and(|l| l.row == o.row) {
            continue;
        }
        out.push(o);
    }
    Ok(out)
}

/// Jobs completed at or after `since` (those of the current run when
/// None), oldest first: (id, type, seconds from claim to completion,
/// completion time).
/// (`+status`: the completed_at index narrows to the new ones; the status
/// index would read every completed job.)
pub fn completed_since(c: &mut Connection, since: Option<&str>) -> rusqlite::Result<Vec<(i64, String, f64, String)>> {
    c.prepare_cached(
        "SELECT id, job_type, MAX(0.0, (julianday(completed_at) - julianday(started_at)) * 86400.0), completed_at
         FROM jobs
         WHERE +status = 'completed' AND completed_at IS NOT NULL AND started_at IS NOT NULL
           AND completed_at >= COALESCE(?1, (SELECT started_at FROM clx_pool_supervisor WHERE id = 1), '')
         ORDER BY completed_at, id LIMIT 10000",
    )?
    .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
    .collect()
}

/// Jobs that failed for good in the last hour: (id, type, error).
pub fn recently_failed(c: &mut Connection) -> rusqlite::Result<Vec<(i64, String, Option<String>)>> {
    c.prepare_cached(
        "SELECT id, job_type, error FROM jobs
         WHERE status = 'failed' AND COALESCE(completed_at, started_at) >= datetime('now', '-1 hour')
           AND error IS NOT 'cancelled (clx-pool jobs cancel)'
         ORDER BY id DESC LIMIT 100",
    )?
    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
    .collect()
}

/// Writes CPU % (kept when None) and memory (MiB) of workers, in one
/// transaction.
pub fn write_usage(c: &mut Connection, usage: &[(WorkerRow, Option<f64>, f64)]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE workers SET cpu_usage = COALESCE(?2, cpu_usage), memory_usage = ?3 WHERE id = ?1",
        )?;
        for (row, cpu, mem) in usage {
            stmt.execute(rusqlite::params![row, cpu, mem])?;
        }
    }
    tx.commit()
}

/// The figures of systemd's STATUS line: slots running and in all, slots
/// waiting (backoff, cooling down, given up), and the jobs of this run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub running: usize,
    pub slots: usize,
    pub waiting: usize,
    pub jobs: super::jobs::JobCounts,
}

pub fn summary(c: &mut Connection) -> rusqlite::Result<Summary> {
    use crate::vocab::SlotState;
    let slots = super::pool::slots(c)?;
    let count = |f: fn(SlotState) -> bool| slots.iter().filter(|s| f(s.state)).count();
    Ok(Summary {
        running: count(|s| s == SlotState::Running),
        slots: slots.len(),
        waiting: count(|s| matches!(s, SlotState::Backoff | SlotState::Failed)),
        jobs: super::admin::run_counts(c, super::admin::run_started(c)?.as_deref())?,
    })
}
