//! The `workers` table: registration (by the worker itself, or
//! pre-registration by the supervisor and activation by the worker, as CLM
//! does), heartbeats and status.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

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

/// Marks the live worker rows of a pool whose supervisor is gone dead and
/// puts back their jobs; pre-registered rows that never came alive go. A
/// CLX database belongs to its pool alone, so every row counts; a CLM
/// database is shared with `clm build`'s own workers, so only the pool's
/// rows do (its slots' rows, and persistent rows the old supervisor
/// started). Returns (workers, jobs requeued, jobs failed).
pub fn bury_pool_rows(
    conn: &mut Connection,
    protocol: Protocol,
    old_supervisor: Option<i64>,
    cause: &str,
) -> rusqlite::Result<(usize, usize, usize)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Both forms take the old supervisor's pid as ?1, so one parameter list
    // serves every statement below.
    let ours = match protocol {
        Protocol::Clx => "(?1 IS NULL OR ?1 IS NOT NULL)",
        Protocol::Clm => {
            "(id IN (SELECT worker_row FROM clx_pool_slots WHERE worker_row IS NOT NULL)
              OR container_id IN (SELECT worker_id FROM clx_pool_slots WHERE worker_id IS NOT NULL)
              OR (managed_by = 'persistent' AND parent_pid = ?1))"
        }
    };
    let with_owner = |sql: &str| sql.replace("?OURS", ours);
    tx.execute(
        &with_owner("DELETE FROM workers WHERE status = 'created' AND ?OURS"),
        [old_supervisor],
    )?;
    let rows: Vec<(WorkerRow, String)> = tx
        .prepare(&with_owner(
            "SELECT id, container_id FROM workers WHERE status != 'dead' AND ?OURS",
        ))?
        .query_map([old_supervisor], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let (mut requeued, mut failed) = (0, 0);
    for (row, cid) in &rows {
        tx.execute("UPDATE workers SET status = 'dead' WHERE id = ?1", [row])?;
        let (r, f) = super::jobs::recover(&tx, Some(*row), cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    // Jobs held by rows of the pool that were already dead (an earlier
    // crash mid-recovery).
    let orphans: Vec<(WorkerRow, String)> = tx
        .prepare(&with_owner(
            "SELECT DISTINCT w.id, w.container_id FROM jobs j JOIN workers w ON w.id = j.worker_id
             WHERE j.status = 'processing' AND w.status = 'dead' AND w.id IN
                 (SELECT id FROM workers WHERE ?OURS)",
        ))?
        .query_map([old_supervisor], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (row, cid) in &orphans {
        let (r, f) = super::jobs::recover(&tx, Some(*row), cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    tx.commit()?;
    Ok((rows.len(), requeued, failed))
}
