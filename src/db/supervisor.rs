//! The `clx_pool_supervisor` table: the supervisor that owns the database,
//! its run (when it started, became ready, stopped, and whether it ended
//! without stopping its pool). Workers never read it.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use super::events::{ClmEventRow, clm_event};
use crate::vocab::{ClmEvent, Protocol, SlotState, SupervisorState};

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

/// When the current (or last) supervisor run began, if there was one: the
/// jobs of a run are those still to do and those that ended since.
pub fn run_started(conn: &Connection) -> rusqlite::Result<Option<String>> {
    Ok(crate::db::supervisor::supervisor(conn)?.map(|s| s.started_at))
}
