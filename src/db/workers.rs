//! The `workers` table: every statement that writes it. Registration (by
//! the worker itself, directly or over the Worker API, or pre-registration
//! by the supervisor and activation by the worker, as CLM does),
//! heartbeats, status, usage figures, and the one way a worker is marked
//! dead ([`mark_dead`], with its jobs put back by [`bury`]).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::vocab::{MANAGED_BY_PERSISTENT, ModeKind, Protocol, WorkerId, WorkerRow, WorkerStatus};

/// Registers a worker the way the protocol's workers do and returns its
/// row id. CLM rows also record the parent process, as CLM's workers do.
pub fn register(
    conn: &Connection,
    protocol: Protocol,
    worker_type: &str,
    container_id: &str,
) -> rusqlite::Result<WorkerRow> {
    let row = match protocol {
        Protocol::Clx => super::returning_one(
            &mut conn.prepare(
                "INSERT INTO workers (worker_type, container_id, status) VALUES (?1, ?2, 'idle') RETURNING id",
            )?,
            params![worker_type, container_id],
            |r| r.get(0),
        )?,
        Protocol::Clm => super::returning_one(
            &mut conn.prepare(
                "INSERT INTO workers (worker_type, container_id, status, parent_pid) VALUES (?1, ?2, 'idle', ?3)
                 RETURNING id",
            )?,
            params![worker_type, container_id, nix::unistd::getppid().as_raw()],
            |r| r.get(0),
        )?,
    };
    row.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// A worker that registers itself (no pre-registered row): CLM's
/// `POST /api/worker/register`.
pub fn register_remote(
    conn: &Connection,
    worker_type: &str,
    container_id: &str,
    parent_pid: Option<i64>,
) -> rusqlite::Result<WorkerRow> {
    conn.execute(
        "INSERT INTO workers (worker_type, container_id, status, parent_pid) VALUES (?1, ?2, 'idle', ?3)",
        params![worker_type, container_id, parent_pid],
    )?;
    Ok(WorkerRow(conn.last_insert_rowid()))
}

/// The row a supervisor writes for a CLM worker before starting it
/// (status `created`, which the worker turns `idle`), marked persistent so
/// every `clm build` may reuse the worker, with no session so it takes any
/// session's jobs.
pub struct Preregistration<'a> {
    pub worker_type: &'a str,
    pub container_id: &'a WorkerId,
    pub execution_mode: ModeKind,
    pub parent_pid: i64,
}

pub fn preregister(conn: &Connection, p: &Preregistration) -> rusqlite::Result<WorkerRow> {
    super::returning_one(
        &mut conn.prepare(
            "INSERT INTO workers (worker_type, container_id, status, execution_mode, managed_by, parent_pid)
             VALUES (?1, ?2, 'created', ?3, ?4, ?5) RETURNING id",
        )?,
        params![
            p.worker_type,
            p.container_id,
            p.execution_mode,
            MANAGED_BY_PERSISTENT,
            p.parent_pid
        ],
        |r| r.get(0),
    )?
    .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Activates a pre-registered row (`created` → `idle`), as CLM's
/// `activate_pre_registered_worker` does. Returns false while the row is
/// not there yet.
pub fn activate(conn: &Connection, row: WorkerRow) -> Result<bool, ActivationError> {
    let n = conn.execute(
        "UPDATE workers SET status = 'idle', last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1 AND status = 'created'",
        [row],
    )?;
    if n == 1 {
        return Ok(true);
    }
    match status(conn, row)? {
        None => Ok(false),
        Some(s) => Err(ActivationError::NotCreated(s)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("the row has status `{0}`, expected `created`")]
    NotCreated(WorkerStatus),
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
}

pub fn status(conn: &Connection, row: WorkerRow) -> rusqlite::Result<Option<WorkerStatus>> {
    conn.prepare_cached("SELECT status FROM workers WHERE id = ?1")?
        .query_row([row], |r| r.get(0))
        .optional()
}

/// Refreshes the heartbeat; false when the row is gone (the worker was
/// deregistered and should stop, as CLM's workers do).
pub fn heartbeat(conn: &Connection, row: WorkerRow) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached("UPDATE workers SET last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1")?
        .execute([row])?;
    Ok(n == 1)
}

pub fn set_status(conn: &Connection, row: WorkerRow, status: WorkerStatus) -> rusqlite::Result<()> {
    conn.execute("UPDATE workers SET status = ?2 WHERE id = ?1", params![row, status])?;
    Ok(())
}

/// A busy worker whose job was taken away is idle again.
pub fn release(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE workers SET status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END,
             last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1",
        [row],
    )?;
    Ok(())
}

/// Removes a pre-registered row that nobody activated (and only such).
pub fn discard_created(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM workers WHERE id = ?1 AND status = 'created'", [row])?;
    Ok(())
}

/// Removes a worker's row, as a CLM worker does when it stops.
pub fn deregister(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM workers WHERE id = ?1", [row])?;
    Ok(())
}

/// Marks a worker's row dead: the one statement that does (a worker saying
/// goodbye over the Worker API, as CLM's route does; [`bury`]). Returns
/// whether there was such a row.
pub fn mark_dead(conn: &Connection, row: WorkerRow) -> rusqlite::Result<bool> {
    Ok(conn.execute("UPDATE workers SET status = 'dead' WHERE id = ?1", [row])? == 1)
}

/// Rows registered after `after_row` that are live (neither pre-registered
/// and waiting nor dead): `(row, container_id)`.
pub fn registered_since(conn: &Connection, after_row: WorkerRow) -> rusqlite::Result<Vec<(WorkerRow, WorkerId)>> {
    conn.prepare_cached(
        "SELECT id, container_id FROM workers WHERE id > ?1 AND status NOT IN ('dead', 'created') ORDER BY id",
    )?
    .query_map([after_row], |r| Ok((r.get(0)?, r.get(1)?)))?
    .collect()
}

/// Which of the pre-registered `rows` their workers have activated.
pub fn activated(conn: &Connection, rows: &[WorkerRow]) -> rusqlite::Result<Vec<WorkerRow>> {
    let mut out = Vec::new();
    for &row in rows {
        if matches!(
            status(conn, row)?,
            Some(WorkerStatus::Idle | WorkerStatus::Busy | WorkerStatus::Hung)
        ) {
            out.push(row);
        }
    }
    Ok(out)
}

pub fn max_row(conn: &Connection) -> rusqlite::Result<WorkerRow> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM workers", [], |r| r.get(0))
}

/// The row registered under `container_id`, if any.
pub fn row_of(conn: &Connection, container_id: &WorkerId) -> rusqlite::Result<Option<WorkerRow>> {
    conn.query_row("SELECT id FROM workers WHERE container_id = ?1", [container_id], |r| {
        r.get(0)
    })
    .optional()
}

/// A pre-registered row takes the id the worker really goes by, once it is
/// known (a container's id), so `clm status` and discovery find it.
pub fn set_container_id(conn: &Connection, row: WorkerRow, container_id: &WorkerId) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE workers SET container_id = ?2 WHERE id = ?1",
        params![row, container_id],
    )?;
    Ok(())
}

/// Worker counts per type, then per status (every status of the protocol
/// present).
/// Worker rows per type and status, of the run that began at `since` (all
/// rows without it).
pub fn counts(
    conn: &Connection,
    protocol: Protocol,
    since: Option<&str>,
) -> rusqlite::Result<BTreeMap<String, BTreeMap<String, i64>>> {
    let statuses: Vec<WorkerStatus> = WorkerStatus::ALL
        .iter()
        .copied()
        .filter(|s| protocol == Protocol::Clm || *s != WorkerStatus::Created)
        .collect();
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut stmt = conn.prepare(
        "SELECT worker_type, status, COUNT(*) FROM workers WHERE ?1 IS NULL OR started_at >= ?1
         GROUP BY worker_type, status",
    )?;
    let rows = stmt.query_map([since], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
    })?;
    for row in rows {
        let (t, s, n) = row?;
        let entry = out
            .entry(t)
            .or_insert_with(|| statuses.iter().map(|s| (s.to_string(), 0)).collect());
        entry.insert(s, n);
    }
    Ok(out)
}

/// A worker's figures after a job (done or failed, its time into the
/// average), and the worker idle again.
pub(crate) fn count_outcome(
    tx: &Connection,
    worker_row: WorkerRow,
    completed: bool,
    seconds: f64,
) -> rusqlite::Result<()> {
    let (done, failed) = if completed { (1, 0) } else { (0, 1) };
    tx.prepare_cached(
        "UPDATE workers SET
            status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END,
            last_heartbeat = CURRENT_TIMESTAMP,
            avg_processing_time = (COALESCE(avg_processing_time, 0) * (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0)) + ?2)
                                  / (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0) + 1),
            jobs_processed = COALESCE(jobs_processed, 0) + ?3,
            jobs_failed = COALESCE(jobs_failed, 0) + ?4
         WHERE id = ?1",
    )?
    .execute(params![worker_row, seconds, done, failed])?;
    Ok(())
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

/// The rows of a pool whose supervisor is gone, as an SQL condition over
/// `workers` taking that supervisor's pid as `?1`. A CLX database belongs
/// to its pool alone, so every row counts; a CLM database is shared with
/// `clm build`'s own workers, so only the pool's rows do (its slots' rows,
/// and persistent rows the old supervisor started).
pub fn pool_rows(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Clx => "(?1 IS NULL OR ?1 IS NOT NULL)",
        Protocol::Clm => {
            "(id IN (SELECT worker_row FROM clx_pool_slots WHERE worker_row IS NOT NULL)
              OR container_id IN (SELECT worker_id FROM clx_pool_slots WHERE worker_id IS NOT NULL)
              OR (managed_by = 'persistent' AND parent_pid = ?1))"
        }
    }
}

/// Removes the pre-registered rows of a pool whose supervisor is gone
/// (see [`pool_rows`]).
pub fn discard_pool_created(
    conn: &Connection,
    protocol: Protocol,
    old_supervisor: Option<i64>,
) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "DELETE FROM workers WHERE status = 'created' AND {}",
            pool_rows(protocol)
        ),
        [old_supervisor],
    )?;
    Ok(())
}

/// The worker took a job: busy, and alive now.
pub fn set_busy(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE workers SET status = 'busy', last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1")?
        .execute([row])?;
    Ok(())
}

/// One worker of the current run, for `stats --workers`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerLine {
    pub row: WorkerRow,
    pub worker_type: String,
    pub worker_id: WorkerId,
    pub status: WorkerStatus,
    /// Its process (direct mode), from its slot.
    pub pid: Option<i64>,
    pub slot: Option<u32>,
    pub job_id: Option<i64>,
    /// Seconds the current job has run.
    pub job_seconds: Option<i64>,
    pub cpu_percent: Option<f64>,
    pub memory_mib: Option<f64>,
    pub jobs_done: i64,
    pub jobs_failed: i64,
}

/// The workers registered since `since` (the run's start; all without it),
/// dead ones left out unless `dead`.
pub fn worker_lines(conn: &Connection, since: Option<&str>, dead: bool) -> rusqlite::Result<Vec<WorkerLine>> {
    let slots = if super::schema::pool_version(conn)? == 0 {
        "(SELECT NULL AS worker_id, NULL AS pid, NULL AS slot WHERE 0)"
    } else {
        "clx_pool_slots"
    };
    conn.prepare(&format!(
        "SELECT w.id, w.worker_type, w.container_id, w.status, s.pid, s.slot,
                j.id, unixepoch('now') - unixepoch(j.started_at),
                w.cpu_usage, w.memory_usage, COALESCE(w.jobs_processed, 0), COALESCE(w.jobs_failed, 0)
         FROM workers w
         LEFT JOIN {slots} s ON s.worker_id = w.container_id
         LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = 'processing'
         WHERE (?1 IS NULL OR w.started_at >= ?1) AND (?2 OR w.status != 'dead')
         GROUP BY w.id ORDER BY w.worker_type, s.slot, w.id"
    ))?
    .query_map(params![since, dead], |r| {
        Ok(WorkerLine {
            row: r.get(0)?,
            worker_type: r.get(1)?,
            worker_id: r.get(2)?,
            status: r.get(3)?,
            pid: r.get(4)?,
            slot: r.get(5)?,
            job_id: r.get(6)?,
            job_seconds: r.get(7)?,
            cpu_percent: r.get(8)?,
            memory_mib: r.get(9)?,
            jobs_done: r.get(10)?,
            jobs_failed: r.get(11)?,
        })
    })?
    .collect()
}
