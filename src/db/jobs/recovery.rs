//! Putting back the jobs of workers that are gone: one worker's end
//! ([`bury`]), every worker of a supervisor that is gone
//! ([`bury_pool_rows`]), and the monitor's reconciliation pass for jobs
//! whose holder is known dead ([`reconcile`]). Each is one transaction
//! with the worker rows' change.

use rusqlite::{Connection, OptionalExtension, params};

use crate::db::workers;
use crate::vocab::{Protocol, WorkerRow};

/// Puts back every job the worker row held in `processing`: to `pending`, or
/// to `failed` once its attempts are used up. Returns the ids put back and
/// the ids failed. Call inside the transaction that marks the worker dead.
pub fn recover(
    conn: &Connection,
    worker_row: Option<WorkerRow>,
    worker_id: &str,
    cause: &str,
) -> rusqlite::Result<(Vec<i64>, Vec<i64>)> {
    let failed: Vec<i64> = conn
        .prepare(
            "UPDATE jobs SET status = 'failed', completed_at = CURRENT_TIMESTAMP,
                error = 'gave up after ' || attempts || ' attempts: worker ' || ?2 || ' ' || ?3 || ' while processing this job'
             WHERE status = 'processing' AND worker_id IS ?1 AND attempts >= COALESCE(max_attempts, 3)
             RETURNING id",
        )?
        .query_map(params![worker_row, worker_id, cause], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let requeued: Vec<i64> = conn
        .prepare(
            "UPDATE jobs SET status = 'pending', started_at = NULL, worker_id = NULL,
                error = 'attempt ' || attempts || ': worker ' || ?2 || ' ' || ?3
             WHERE status = 'processing' AND worker_id IS ?1
             RETURNING id",
        )?
        .query_map(params![worker_row, worker_id, cause], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok((requeued, failed))
}

/// What the reconciliation pass put back, per worker that was gone.
#[derive(Debug)]
pub struct Reconciled {
    pub worker_row: Option<WorkerRow>,
    pub worker_id: Option<String>,
    pub requeued: Vec<i64>,
    pub failed: Vec<i64>,
}

/// Jobs left `processing` by a worker known to be dead, found by the
/// monitor's reconciliation pass: its row says `dead` (it said so itself
/// on its way out, or was recorded dead), or, in a CLX database, its row is
/// gone. Nothing else is evidence: a live worker the pool did not start
/// (run by hand, by a `clm build`) keeps its jobs however long they run,
/// and in a shared CLM database only the pool's own rows count
/// (persistent, started by `supervisor_pid`). Puts their jobs back (or
/// fails them) in one transaction.
pub fn reconcile(conn: &mut Connection, protocol: Protocol, supervisor_pid: i64) -> rusqlite::Result<Vec<Reconciled>> {
    const ORPHANED: &str =
        "SELECT DISTINCT j.worker_id, w.container_id FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id
         WHERE j.status = 'processing'";
    let find = |c: &Connection| -> rusqlite::Result<Vec<(Option<WorkerRow>, Option<String>)>> {
        let map = |r: &rusqlite::Row| Ok((r.get(0)?, r.get(1)?));
        match protocol {
            Protocol::Clx => c
                .prepare_cached(&format!("{ORPHANED} AND (w.id IS NULL OR w.status = 'dead')"))?
                .query_map([], map)?
                .collect(),
            Protocol::Clm => c
                .prepare_cached(&format!(
                    "{ORPHANED} AND w.status = 'dead' AND w.managed_by = 'persistent' AND w.parent_pid = ?1"
                ))?
                .query_map([supervisor_pid], map)?
                .collect(),
        }
    };
    // A plain read first: a healthy pool's tick takes no write lock.
    if find(conn)?.is_empty() {
        return Ok(Vec::new());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let orphaned = find(&tx)?;
    let mut out = Vec::new();
    for (row, cid) in orphaned {
        let who = cid.clone().unwrap_or_else(|| "(unknown)".into());
        let (requeued, failed) = recover(&tx, row, &who, "was no longer running (found by the monitor)")?;
        out.push(Reconciled {
            worker_row: row,
            worker_id: cid,
            requeued,
            failed,
        });
    }
    tx.commit()?;
    Ok(out)
}

/// The job a worker holds (the oldest, if several).
pub fn held_by(conn: &Connection, row: WorkerRow) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT id FROM jobs WHERE worker_id = ?1 AND status = 'processing' ORDER BY id LIMIT 1",
        [row],
        |r| r.get(0),
    )
    .optional()
}

/// A worker that is gone (call inside a write transaction): a
/// pre-registered row it never activated goes, any other is marked dead,
/// and its jobs are put back (or failed, with no attempts left). Returns
/// the jobs requeued and failed.
pub fn bury(tx: &Connection, row: WorkerRow, worker_id: &str, cause: &str) -> rusqlite::Result<(Vec<i64>, Vec<i64>)> {
    workers::discard_created(tx, row)?;
    workers::mark_dead(tx, row)?;
    recover(tx, Some(row), worker_id, cause)
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
    let with_owner = |sql: &str| sql.replace("?OURS", workers::pool_rows(protocol));
    workers::discard_pool_created(&tx, protocol, old_supervisor)?;
    let rows: Vec<(WorkerRow, String)> = tx
        .prepare(&with_owner(
            "SELECT id, container_id FROM workers WHERE status != 'dead' AND ?OURS",
        ))?
        .query_map([old_supervisor], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let (mut requeued, mut failed) = (0, 0);
    for (row, cid) in &rows {
        let (r, f) = bury(&tx, *row, cid, cause)?;
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
        let (r, f) = recover(&tx, Some(*row), cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    tx.commit()?;
    Ok((rows.len(), requeued, failed))
}
