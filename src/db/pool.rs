//! clx-pool's own records: the supervisor that owns the database, the slot
//! behind each worker (the process running it, its restarts) and the
//! restart history. Workers never read these tables. In a CLM database the
//! same moments are also written to CLM's `worker_events`, in the same
//! transaction, so `clm status` and `clm monitor` show what clx-pool did.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use crate::contract::SlotId;
use crate::vocab::{
    ClmEvent, EndEvent, Mode, ModeKind, Protocol, SlotState, SupervisorState, WorkerId, WorkerRow, WorkerStatus,
};

/// One row of CLM's `worker_events` (CLM databases only).
struct ClmEventRow<'a> {
    event: ClmEvent,
    worker_row: Option<WorkerRow>,
    /// `all` for pool events, as CLM writes them.
    worker_type: &'a str,
    execution_mode: Option<ModeKind>,
    message: String,
    metadata: serde_json::Value,
}

fn clm_event(conn: &Connection, protocol: Protocol, e: ClmEventRow) -> rusqlite::Result<()> {
    if protocol != Protocol::Clm {
        return Ok(());
    }
    let mut metadata = e.metadata;
    if let Some(m) = metadata.as_object_mut() {
        m.insert("supervisor".into(), json!("clx-pool"));
        m.insert("supervisor_pid".into(), json!(std::process::id()));
    }
    conn.prepare_cached(
        "INSERT INTO worker_events (event_type, worker_id, worker_type, execution_mode, message, metadata)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        e.event,
        e.worker_row,
        e.worker_type,
        e.execution_mode,
        e.message,
        metadata.to_string()
    ])?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct SupervisorRecord {
    pub pid: i64,
    pub proc_start: Option<i64>,
    pub hostname: Option<String>,
    pub config_path: Option<String>,
    pub workspace_path: Option<String>,
    pub state: SupervisorState,
    pub expected_workers: i64,
    pub started_at: String,
    pub ready_at: Option<String>,
    pub stopped_at: Option<String>,
    /// When the run was found to have ended without stopping its pool.
    pub ended_uncleanly_at: Option<String>,
}

pub struct NewSupervisor<'a> {
    pub pid: i64,
    pub proc_start: Option<i64>,
    pub hostname: &'a str,
    pub config_path: &'a str,
    pub workspace_path: &'a str,
    pub expected_workers: i64,
}

/// Records a new supervisor run and forgets the slots of the previous one.
pub fn begin_run(conn: &mut Connection, protocol: Protocol, s: &NewSupervisor) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    clm_event(
        &tx,
        protocol,
        ClmEventRow {
            event: ClmEvent::PoolStarting,
            worker_row: None,
            worker_type: "all",
            execution_mode: None,
            message: format!("clx-pool starting a worker pool with {} worker(s)", s.expected_workers),
            metadata: json!({ "total_workers": s.expected_workers, "config": s.config_path }),
        },
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO clx_pool_supervisor
            (id, pid, proc_start, hostname, config_path, workspace_path, state, expected_workers, started_at, ready_at, stopped_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, 'starting', ?6, CURRENT_TIMESTAMP, NULL, NULL)",
        params![s.pid, s.proc_start, s.hostname, s.config_path, s.workspace_path, s.expected_workers],
    )?;
    tx.execute("DELETE FROM clx_pool_slots", [])?;
    tx.commit()
}

pub fn set_state(conn: &Connection, protocol: Protocol, state: SupervisorState) -> rusqlite::Result<()> {
    let (extra, event) = match state {
        SupervisorState::Starting => ("", None),
        SupervisorState::Running => (
            ", ready_at = COALESCE(ready_at, CURRENT_TIMESTAMP)",
            Some((ClmEvent::PoolStarted, "clx-pool worker pool started")),
        ),
        SupervisorState::Stopping => ("", Some((ClmEvent::PoolStopping, "clx-pool stopping the worker pool"))),
        SupervisorState::Stopped => (
            ", stopped_at = CURRENT_TIMESTAMP",
            Some((ClmEvent::PoolStopped, "clx-pool worker pool stopped")),
        ),
    };
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        &format!("UPDATE clx_pool_supervisor SET state = ?1{extra} WHERE id = 1"),
        [state],
    )?;
    if let Some((event, message)) = event {
        clm_event(
            &tx,
            protocol,
            ClmEventRow {
                event,
                worker_row: None,
                worker_type: "all",
                execution_mode: None,
                message: message.into(),
                metadata: json!({}),
            },
        )?;
    }
    tx.commit()
}

/// After a supervisor that is gone: its slots run nothing and it is
/// recorded as stopped — uncleanly, and when that was found, if it had
/// not stopped its pool.
pub fn close_run(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE clx_pool_slots SET pid = NULL, proc_start = NULL, state = ?1",
        [SlotState::Stopped],
    )?;
    conn.execute(
        "UPDATE clx_pool_supervisor SET state = ?1, stopped_at = COALESCE(stopped_at, CURRENT_TIMESTAMP),
             ended_uncleanly_at = CURRENT_TIMESTAMP
         WHERE state != ?1",
        [SupervisorState::Stopped],
    )?;
    Ok(())
}

pub fn supervisor(conn: &Connection) -> rusqlite::Result<Option<SupervisorRecord>> {
    let unclean = match super::schema::pool_version(conn)? {
        0 => return Ok(None),
        1..5 => "NULL",
        _ => "ended_uncleanly_at",
    };
    conn.query_row(
        &format!(
            "SELECT pid, proc_start, hostname, config_path, workspace_path, state, expected_workers,
                    started_at, ready_at, stopped_at, {unclean} FROM clx_pool_supervisor WHERE id = 1"
        ),
        [],
        |r| {
            Ok(SupervisorRecord {
                pid: r.get(0)?,
                proc_start: r.get(1)?,
                hostname: r.get(2)?,
                config_path: r.get(3)?,
                workspace_path: r.get(4)?,
                state: r.get(5)?,
                expected_workers: r.get(6)?,
                started_at: r.get(7)?,
                ready_at: r.get(8)?,
                stopped_at: r.get(9)?,
                ended_uncleanly_at: r.get(10)?,
            })
        },
    )
    .optional()
}

/// A CLM worker about to be started in a slot: its pre-registered row
/// (see `workers::preregister`) and CLM's `worker_starting` event, in one
/// transaction. Returns the row, whose id the worker gets as `CLM_WORKER_ID`.
pub fn preregister_worker(
    conn: &mut Connection,
    slot: u32,
    p: &super::workers::Preregistration,
) -> rusqlite::Result<WorkerRow> {
    let tx = conn.transaction()?;
    let row = super::workers::preregister(&tx, p)?;
    clm_event(
        &tx,
        Protocol::Clm,
        ClmEventRow {
            event: ClmEvent::WorkerStarting,
            worker_row: Some(row),
            worker_type: p.worker_type,
            execution_mode: Some(p.execution_mode),
            message: format!(
                "clx-pool starting {} worker {}-{slot} ({})",
                p.execution_mode, p.worker_type, p.container_id
            ),
            metadata: json!({ "index": slot, "executor_id": p.container_id }),
        },
    )?;
    tx.commit()?;
    Ok(row)
}

/// Records the process now running in a slot (before it registers), so that
/// a later `start` or `stop` can find it even if this supervisor crashes:
/// its pid and start time (direct mode).
pub fn slot_launched(
    conn: &Connection,
    slot: &SlotId,
    worker_id: &WorkerId,
    process: Option<(i32, Option<i64>)>,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE clx_pool_slots SET state = ?6, worker_id = ?3, worker_row = NULL, pid = ?4, proc_start = ?5,
             note = NULL, updated_at = CURRENT_TIMESTAMP
         WHERE worker_type = ?1 AND slot = ?2",
        params![
            slot.worker_type,
            slot.index,
            worker_id,
            process.map(|p| p.0),
            process.and_then(|p| p.1),
            SlotState::Starting
        ],
    )?;
    Ok(())
}

/// A slot's worker registered (or activated its pre-registered row).
pub struct Registered<'a> {
    pub slot: &'a SlotId,
    pub worker_row: WorkerRow,
    pub worker_id: &'a WorkerId,
    pub execution_mode: ModeKind,
}

pub fn slot_registered(conn: &Connection, protocol: Protocol, r: &Registered) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE clx_pool_slots SET state = ?4, worker_row = ?3, updated_at = CURRENT_TIMESTAMP
         WHERE worker_type = ?1 AND slot = ?2",
        params![r.slot.worker_type, r.slot.index, r.worker_row, SlotState::Running],
    )?;
    clm_event(
        &tx,
        protocol,
        ClmEventRow {
            event: ClmEvent::WorkerRegistered,
            worker_row: Some(r.worker_row),
            worker_type: &r.slot.worker_type,
            execution_mode: Some(r.execution_mode),
            message: format!(
                "Worker {} #{} registered (executor: {}, slot {})",
                r.slot.worker_type, r.worker_row, r.worker_id, r.slot
            ),
            metadata: json!({ "index": r.slot.index, "executor_id": r.worker_id }),
        },
    )?;
    tx.commit()
}

/// Sets a slot's state (creating its row the first time), with why it
/// waits (`note`, shown by `stats`) or None.
pub fn set_slot_state(
    conn: &Connection,
    slot: &SlotId,
    mode: Mode,
    state: SlotState,
    note: Option<&str>,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO clx_pool_slots (worker_type, slot, execution_mode, state, note) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(worker_type, slot) DO UPDATE SET
             execution_mode = excluded.execution_mode, state = excluded.state, note = excluded.note,
             updated_at = CURRENT_TIMESTAMP",
        params![slot.worker_type, slot.index, mode, state, note],
    )?;
    Ok(())
}

/// A worker that ended, as the supervisor saw it.
pub struct WorkerEnd<'a> {
    pub slot: &'a SlotId,
    pub worker_id: &'a WorkerId,
    pub worker_row: Option<WorkerRow>,
    pub execution_mode: ModeKind,
    pub event: EndEvent,
    pub cause: &'a str,
    pub log_tail: &'a str,
    /// Counts as a restart of the slot (false for a clean stop).
    pub restart: bool,
}

/// In one transaction: marks the worker dead (a pre-registered row it
/// never activated goes), puts its jobs back (or fails them), clears the
/// slot's process and records the event. Returns (jobs requeued, jobs failed).
pub fn record_end(
    conn: &mut Connection,
    protocol: Protocol,
    end: &WorkerEnd,
) -> rusqlite::Result<(Vec<i64>, Vec<i64>)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (held, requeued, failed) = match end.worker_row {
        Some(row) => bury_worker(&tx, row, end)?,
        None => (None, Vec::new(), Vec::new()),
    };
    clm_end_event(&tx, protocol, end, held, &requeued, &failed)?;
    tx.execute(
        "UPDATE clx_pool_slots SET pid = NULL, proc_start = NULL, worker_row = NULL,
             restarts = restarts + ?3, last_cause = CASE WHEN ?3 = 1 THEN ?4 ELSE last_cause END,
             updated_at = CURRENT_TIMESTAMP
         WHERE worker_type = ?1 AND slot = ?2",
        params![end.slot.worker_type, end.slot.index, end.restart as i64, end.cause],
    )?;
    tx.execute(
        "INSERT INTO clx_pool_events (worker_type, slot, worker_id, event, cause, job_id, log_tail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            end.slot.worker_type,
            end.slot.index,
            end.worker_id,
            end.event,
            end.cause,
            held,
            end.log_tail
        ],
    )?;
    tx.commit()?;
    Ok((requeued, failed))
}

/// Marks a worker's row dead (or removes a pre-registered row it never
/// activated) and puts back its jobs. Returns the job it held first, and
/// the jobs requeued and failed.
fn bury_worker(
    tx: &Connection,
    row: WorkerRow,
    end: &WorkerEnd,
) -> rusqlite::Result<(Option<i64>, Vec<i64>, Vec<i64>)> {
    let held = tx
        .query_row(
            "SELECT id FROM jobs WHERE worker_id = ?1 AND status = 'processing' ORDER BY id LIMIT 1",
            [row],
            |r| r.get::<_, i64>(0),
        )
        .optional()?;
    tx.execute("DELETE FROM workers WHERE id = ?1 AND status = 'created'", [row])?;
    tx.execute("UPDATE workers SET status = 'dead' WHERE id = ?1", [row])?;
    let (requeued, failed) = super::jobs::recover(tx, Some(row), end.worker_id.as_str(), end.cause)?;
    Ok((held, requeued, failed))
}

/// CLM's `worker_stopped` or `worker_failed` for a worker's end.
fn clm_end_event(
    tx: &Connection,
    protocol: Protocol,
    end: &WorkerEnd,
    held: Option<i64>,
    requeued: &[i64],
    failed: &[i64],
) -> rusqlite::Result<()> {
    let t = &end.slot.worker_type;
    let (event, message) = match end.event {
        EndEvent::Stopped => (
            ClmEvent::WorkerStopped,
            format!("Worker {t} {} stopped by clx-pool ({})", end.worker_id, end.cause),
        ),
        _ => (
            ClmEvent::WorkerFailed,
            format!(
                "Worker {t} failed: {} {}{}",
                end.worker_id,
                end.cause,
                if end.restart { "; clx-pool replaces it" } else { "" }
            ),
        ),
    };
    clm_event(
        tx,
        protocol,
        ClmEventRow {
            event,
            worker_row: end.worker_row,
            worker_type: t,
            execution_mode: Some(end.execution_mode),
            message,
            metadata: json!({
                "index": end.slot.index,
                "executor_id": end.worker_id,
                "reason": end.event,
                "error": end.cause,
                "job_id": held,
                "requeued_jobs": requeued,
                "failed_jobs": failed,
            }),
        },
    )
}

/// Records how many workers of each type the pool wants (all of them: the
/// types not given are gone).
pub fn set_wanted(conn: &mut Connection, wanted: &[(String, u32)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM clx_pool_wanted", [])?;
    for (t, n) in wanted {
        tx.execute(
            "INSERT INTO clx_pool_wanted (worker_type, wanted) VALUES (?1, ?2)",
            params![t, n],
        )?;
    }
    tx.commit()
}

/// How many workers of each type the pool wants (empty before version 3).
pub fn wanted(conn: &Connection) -> rusqlite::Result<std::collections::BTreeMap<String, i64>> {
    if super::schema::pool_version(conn)? < 3 {
        return Ok(Default::default());
    }
    conn.prepare("SELECT worker_type, wanted FROM clx_pool_wanted")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// The slots of a type whose worker is busy.
pub fn busy_slots(conn: &Connection, worker_type: &str) -> rusqlite::Result<Vec<u32>> {
    conn.prepare(
        "SELECT s.slot FROM clx_pool_slots s JOIN workers w ON w.id = s.worker_row
         WHERE s.worker_type = ?1 AND w.status = 'busy'",
    )?
    .query_map([worker_type], |r| r.get(0))?
    .collect()
}

/// A slot that ended for good (scaled down, its entry removed).
pub fn remove_slot(conn: &Connection, slot: &SlotId) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM clx_pool_slots WHERE worker_type = ?1 AND slot = ?2",
        params![slot.worker_type, slot.index],
    )?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotRow {
    pub worker_type: String,
    pub slot: u32,
    pub execution_mode: Mode,
    pub state: SlotState,
    pub worker_id: Option<WorkerId>,
    pub pid: Option<i64>,
    pub proc_start: Option<i64>,
    pub restarts: i64,
    pub last_cause: Option<String>,
    /// Why the slot waits (cooling down, given up), if it does.
    pub note: Option<String>,
}

pub fn slots(conn: &Connection) -> rusqlite::Result<Vec<SlotRow>> {
    let note = match super::schema::pool_version(conn)? {
        0 => return Ok(Vec::new()),
        1 => "NULL",
        _ => "note",
    };
    conn.prepare(&format!(
        "SELECT worker_type, slot, execution_mode, state, worker_id, pid, proc_start, restarts, last_cause, {note}
         FROM clx_pool_slots ORDER BY worker_type, slot"
    ))?
    .query_map([], |r| {
        Ok(SlotRow {
            worker_type: r.get(0)?,
            slot: r.get(1)?,
            execution_mode: r.get(2)?,
            state: r.get(3)?,
            worker_id: r.get(4)?,
            pid: r.get(5)?,
            proc_start: r.get(6)?,
            restarts: r.get(7)?,
            last_cause: r.get(8)?,
            note: r.get(9)?,
        })
    })?
    .collect()
}

/// Keeps `clx_pool_events` bounded: at most `keep` events, none older
/// than `max_age_seconds`. Returns how many went.
pub fn prune_events(conn: &Connection, keep: u32, max_age_seconds: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM clx_pool_events
         WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM clx_pool_events) - ?1
            OR unixepoch('now') - unixepoch(at) > ?2",
        params![keep, max_age_seconds as i64],
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub at: String,
    pub worker_type: String,
    pub slot: u32,
    pub worker_id: Option<WorkerId>,
    pub event: EndEvent,
    pub cause: Option<String>,
    pub job_id: Option<i64>,
    pub log_tail: Option<String>,
}

pub fn recent_events(conn: &Connection, limit: i64) -> rusqlite::Result<Vec<EventRow>> {
    if super::schema::pool_version(conn)? == 0 {
        return Ok(Vec::new());
    }
    let mut rows: Vec<EventRow> = conn
        .prepare(
            "SELECT at, worker_type, slot, worker_id, event, cause, job_id, log_tail
             FROM clx_pool_events ORDER BY id DESC LIMIT ?1",
        )?
        .query_map([limit], |r| {
            Ok(EventRow {
                at: r.get(0)?,
                worker_type: r.get(1)?,
                slot: r.get(2)?,
                worker_id: r.get(3)?,
                event: r.get(4)?,
                cause: r.get(5)?,
                job_id: r.get(6)?,
                log_tail: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    rows.reverse();
    Ok(rows)
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
