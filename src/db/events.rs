//! The event tables: clx-pool's own history of worker ends
//! (`clx_pool_events`, shown by `stats --events` and `top`) and CLM's
//! `worker_events` (CLM databases only), written in the same transaction as
//! what they tell, so `clm status` and `clm monitor` show what clx-pool did.

use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::json;

use crate::contract::SlotId;
use crate::vocab::{ClmEvent, EndEvent, ModeKind, Protocol, WorkerId, WorkerRow};

/// One row of CLM's `worker_events` (CLM databases only).
pub(super) struct ClmEventRow<'a> {
    pub(super) event: ClmEvent,
    pub(super) worker_row: Option<WorkerRow>,
    /// `all` for pool events, as CLM writes them.
    pub(super) worker_type: &'a str,
    pub(super) execution_mode: Option<ModeKind>,
    pub(super) message: String,
    pub(super) metadata: serde_json::Value,
}

pub(super) fn clm_event(conn: &Connection, protocol: Protocol, e: ClmEventRow) -> rusqlite::Result<()> {
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

/// One row of `clx_pool_events`: a worker's time in a slot ended.
pub struct EndRow<'a> {
    pub slot: &'a SlotId,
    pub worker_id: &'a WorkerId,
    pub event: EndEvent,
    pub cause: &'a str,
    /// The job it held, if any.
    pub job_id: Option<i64>,
    pub log_tail: &'a str,
}

pub fn record_end(conn: &Connection, e: &EndRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO clx_pool_events (worker_type, slot, worker_id, event, cause, job_id, log_tail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            e.slot.worker_type,
            e.slot.index,
            e.worker_id,
            e.event,
            e.cause,
            e.job_id,
            e.log_tail
        ],
    )?;
    Ok(())
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
