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
        e.execution_mode.map(ModeKind::for_clm),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fixture::memory_db as db;
    use crate::db::schema;

    fn end(conn: &Connection, index: u32, event: EndEvent, job_id: Option<i64>) {
        let slot = SlotId {
            worker_type: "notebook".into(),
            index,
        };
        let worker_id = WorkerId(format!("direct-notebook-{index}-0000000{index}"));
        record_end(
            conn,
            &EndRow {
                slot: &slot,
                worker_id: &worker_id,
                event,
                cause: &format!("cause {index}"),
                job_id,
                log_tail: "last words",
            },
        )
        .unwrap();
    }

    fn ids(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT id FROM clx_pool_events ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn clm_events_reach_clms_table_naming_clx_pool_and_clx_databases_get_none() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            clm_event(
                &conn,
                protocol,
                ClmEventRow {
                    event: ClmEvent::WorkerRegistered,
                    worker_row: Some(WorkerRow(7)),
                    worker_type: "plantuml",
                    execution_mode: Some(ModeKind::Docker),
                    message: "registered".into(),
                    metadata: json!({ "index": 3 }),
                },
            )
            .unwrap();
            let has_table: bool = conn
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE name = 'worker_events')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(
                has_table,
                protocol == Protocol::Clm,
                "{protocol}: CLX has no such table"
            );
            if protocol == Protocol::Clx {
                continue;
            }
            let (event, worker, t, mode, message, metadata): (String, i64, String, String, String, String) = conn
                .query_row(
                    "SELECT event_type, worker_id, worker_type, execution_mode, message, metadata FROM worker_events",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .unwrap();
            assert_eq!(
                (event.as_str(), worker, t.as_str(), mode.as_str(), message.as_str()),
                ("worker_registered", 7, "plantuml", "docker", "registered")
            );
            let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
            assert_eq!(metadata["index"], 3, "the caller's metadata is kept");
            assert_eq!(metadata["supervisor"], "clx-pool");
            assert_eq!(metadata["supervisor_pid"], std::process::id());
        }
    }

    #[test]
    fn recent_events_are_the_latest_ones_oldest_first() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            end(&conn, 0, EndEvent::Died, Some(11));
            end(&conn, 1, EndEvent::NoRegister, None);
            end(&conn, 2, EndEvent::SpawnFailed, None);
            let events = recent_events(&conn, 2).unwrap();
            let shown: Vec<(u32, EndEvent)> = events.iter().map(|e| (e.slot, e.event)).collect();
            assert_eq!(
                shown,
                vec![(1, EndEvent::NoRegister), (2, EndEvent::SpawnFailed)],
                "{protocol}"
            );
            let all = recent_events(&conn, 10).unwrap();
            assert_eq!(all.len(), 3, "{protocol}");
            let first = &all[0];
            assert_eq!(first.worker_type, "notebook");
            assert_eq!(first.worker_id, Some(WorkerId("direct-notebook-0-00000000".into())));
            assert_eq!(
                (first.cause.as_deref(), first.job_id, first.log_tail.as_deref()),
                (Some("cause 0"), Some(11), Some("last words"))
            );
            assert!(!first.at.is_empty());
        }
    }

    #[test]
    fn pruning_keeps_the_newest_events_up_to_the_limit() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            for i in 0..5 {
                end(&conn, i, EndEvent::Died, None);
            }
            let before = ids(&conn);
            assert_eq!(prune_events(&conn, 3, 86_400).unwrap(), 2, "{protocol}");
            assert_eq!(ids(&conn), before[2..].to_vec(), "{protocol}: the newest three");
            assert_eq!(prune_events(&conn, 3, 86_400).unwrap(), 0, "{protocol}");
            end(&conn, 5, EndEvent::Hung, None);
            assert_eq!(prune_events(&conn, 3, 86_400).unwrap(), 1, "{protocol}");
            let slots: Vec<u32> = recent_events(&conn, 10).unwrap().iter().map(|e| e.slot).collect();
            assert_eq!(slots, vec![3, 4, 5], "{protocol}");
        }
    }

    #[test]
    fn pruning_drops_events_older_than_the_age_limit_however_few_there_are() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            end(&conn, 0, EndEvent::Died, None);
            end(&conn, 1, EndEvent::Died, None);
            conn.execute(
                "UPDATE clx_pool_events SET at = datetime('now', '-2 days') WHERE slot = 0",
                [],
            )
            .unwrap();
            assert_eq!(prune_events(&conn, 1000, 86_400).unwrap(), 1, "{protocol}");
            let left: Vec<u32> = recent_events(&conn, 10).unwrap().iter().map(|e| e.slot).collect();
            assert_eq!(left, vec![1], "{protocol}: the fresh one stays");
        }
    }

    #[test]
    fn a_database_no_supervisor_has_prepared_shows_no_events() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::CLX_SCHEMA).unwrap();
        assert!(recent_events(&conn, 10).unwrap().is_empty());
    }
}
