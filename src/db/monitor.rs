//! What the supervisor's monitor reads and writes: the live workers of
//! running slots with their ages (computed by SQLite, in UTC), and their
//! CPU and memory figures.

use std::time::Duration;

use rusqlite::Connection;

use crate::contract::SlotId;
use crate::vocab::{Mode, ModeKind, WorkerId, WorkerRow, WorkerStatus};

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
    /// `last_heartbeat` as written: compared only with its own earlier
    /// values, never with a clock.
    pub heartbeat: Option<String>,
    /// The job in hand (the oldest if several) and its attempt.
    pub job: Option<(i64, i64)>,
    /// No memory figure was written for it yet (a new worker).
    pub unmeasured: bool,
    /// Jobs it finished (completed or failed).
    pub jobs_done: i64,
}

/// Every live worker of a running slot, with its job. No age is computed
/// here: the monitor measures time on its own monotonic clock.
pub fn observe(c: &mut Connection) -> rusqlite::Result<Vec<Observed>> {
    let mut stmt = c.prepare_cached(
        "SELECT s.worker_type, s.slot, w.id, s.pid, w.status, s.execution_mode, s.worker_id,
                w.last_heartbeat, j.id, COALESCE(j.attempts, 0), w.memory_usage IS NULL,
                COALESCE(w.jobs_processed, 0) + COALESCE(w.jobs_failed, 0)
         FROM clx_pool_slots s
         JOIN workers w ON w.id = s.worker_row
         LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = 'processing'
         WHERE s.state = 'running'
         ORDER BY s.worker_type, s.slot, j.id",
    )?;
    let rows = stmt.query_map([], |r| {
        let job: Option<i64> = r.get(8)?;
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
            heartbeat: r.get(7)?,
            job: job.map(|j| Ok::<_, rusqlite::Error>((j, r.get(9)?))).transpose()?,
            unmeasured: r.get(10)?,
            jobs_done: r.get(11)?,
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

/// Whether the database can be written now: a write transaction is begun
/// (waiting at most `wait` for another writer) and rolled back, writing
/// nothing. A worker cannot heartbeat or record a result while this is
/// false, so that time is no evidence against it.
pub fn writable(c: &mut Connection, wait: Duration) -> rusqlite::Result<bool> {
    c.busy_timeout(wait)?;
    let probe = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .and_then(|tx| tx.rollback());
    c.busy_timeout(super::BUSY_TIMEOUT)?;
    match probe {
        Ok(()) => Ok(true),
        Err(e) if super::is_transient(&e) => Ok(false),
        Err(e) => Err(e),
    }
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
