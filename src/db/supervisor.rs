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
    /// The run's health rules: window in seconds, failure rate.
    pub health: Option<(i64, f64)>,
}

pub struct NewSupervisor<'a> {
    pub pid: i64,
    pub proc_start: Option<i64>,
    pub hostname: &'a str,
    pub config_path: &'a str,
    pub workspace_path: &'a str,
    pub expected_workers: i64,
    /// `health_window` (seconds) and `health_failure_rate`.
    pub health: (i64, f64),
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
            (id, pid, proc_start, hostname, config_path, workspace_path, state, expected_workers, started_at, ready_at,
             stopped_at, health_window, health_failure_rate)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?7, ?6, CURRENT_TIMESTAMP, NULL, NULL, ?8, ?9)",
        params![
            s.pid,
            s.proc_start,
            s.hostname,
            s.config_path,
            s.workspace_path,
            s.expected_workers,
            SupervisorState::Starting,
            s.health.0,
            s.health.1
        ],
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
    let (unclean, health) = match super::schema::pool_version(conn)? {
        0 => return Ok(None),
        1..5 => ("NULL", "NULL, NULL"),
        v if v < super::schema::HEALTH_RULES_VERSION => ("ended_uncleanly_at", "NULL, NULL"),
        _ => ("ended_uncleanly_at", "health_window, health_failure_rate"),
    };
    conn.query_row(
        &format!(
            "SELECT pid, proc_start, hostname, config_path, workspace_path, state, expected_workers,
                    started_at, ready_at, stopped_at, {unclean}, {health} FROM clx_pool_supervisor WHERE id = 1"
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
                health: match (r.get::<_, Option<i64>>(11)?, r.get::<_, Option<f64>>(12)?) {
                    (Some(w), Some(f)) => Some((w, f)),
                    _ => None,
                },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SlotId;
    use crate::db::fixture::memory_db as db;
    use crate::db::{schema, slots};
    use crate::vocab::{Mode, ModeKind, WorkerId};

    fn run(pid: i64, expected_workers: i64) -> NewSupervisor<'static> {
        NewSupervisor {
            pid,
            proc_start: Some(pid * 10),
            hostname: "here",
            config_path: "/etc/pool.toml",
            workspace_path: "/ws",
            expected_workers,
            health: (300, 0.2),
        }
    }

    /// A slot whose worker process is running.
    fn launched(conn: &Connection, index: u32) {
        let slot = SlotId {
            worker_type: "notebook".into(),
            index,
        };
        let mode = Mode {
            kind: ModeKind::Direct,
            auto: false,
        };
        slots::set_slot_state(conn, &slot, mode, SlotState::Starting, None).unwrap();
        slots::slot_launched(
            conn,
            &slot,
            &WorkerId(format!("w{index}")),
            Some((1000 + index as i32, Some(5))),
        )
        .unwrap();
    }

    fn record(conn: &Connection) -> SupervisorRecord {
        supervisor(conn).unwrap().unwrap()
    }

    fn clm_events(conn: &Connection) -> Vec<(String, String, String)> {
        conn.prepare("SELECT event_type, worker_type, message FROM worker_events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_new_run_replaces_the_last_one_and_forgets_its_slots() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            begin_run(&mut conn, protocol, &run(100, 2)).unwrap();
            launched(&conn, 0);
            set_state(&conn, protocol, SupervisorState::Running).unwrap();
            close_run(&conn).unwrap();
            assert!(record(&conn).ended_uncleanly_at.is_some(), "{protocol}");

            begin_run(&mut conn, protocol, &run(200, 3)).unwrap();
            let r = record(&conn);
            assert_eq!(
                (r.pid, r.proc_start, r.expected_workers),
                (200, Some(2000), 3),
                "{protocol}"
            );
            assert_eq!(r.state, SupervisorState::Starting, "{protocol}");
            assert_eq!(
                (
                    r.hostname.as_deref(),
                    r.config_path.as_deref(),
                    r.workspace_path.as_deref()
                ),
                (Some("here"), Some("/etc/pool.toml"), Some("/ws"))
            );
            assert_eq!(
                (r.ready_at, r.stopped_at, r.ended_uncleanly_at),
                (None, None, None),
                "{protocol}: nothing of the last run's end is kept"
            );
            assert!(slots::slots(&conn).unwrap().is_empty(), "{protocol}");
            assert_eq!(run_started(&conn).unwrap(), Some(r.started_at), "{protocol}");
        }
    }

    #[test]
    fn a_run_is_ready_once_and_stopped_when_it_stops() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            begin_run(&mut conn, protocol, &run(100, 1)).unwrap();
            set_state(&conn, protocol, SupervisorState::Running).unwrap();
            assert!(record(&conn).ready_at.is_some(), "{protocol}");
            // Running again (after a reload) keeps when it first was ready.
            conn.execute("UPDATE clx_pool_supervisor SET ready_at = '2001-01-01 00:00:00'", [])
                .unwrap();
            set_state(&conn, protocol, SupervisorState::Running).unwrap();
            assert_eq!(record(&conn).ready_at.as_deref(), Some("2001-01-01 00:00:00"));

            set_state(&conn, protocol, SupervisorState::Stopping).unwrap();
            let r = record(&conn);
            assert_eq!((r.state, r.stopped_at), (SupervisorState::Stopping, None), "{protocol}");
            set_state(&conn, protocol, SupervisorState::Stopped).unwrap();
            let r = record(&conn);
            assert_eq!(r.state, SupervisorState::Stopped, "{protocol}");
            assert!(r.stopped_at.is_some(), "{protocol}");
            assert_eq!(r.ended_uncleanly_at, None, "{protocol}");
        }
    }

    #[test]
    fn clm_tools_see_the_pool_start_and_stop_and_clx_databases_get_no_events() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            begin_run(&mut conn, protocol, &run(100, 4)).unwrap();
            for state in [
                SupervisorState::Starting,
                SupervisorState::Running,
                SupervisorState::Stopping,
                SupervisorState::Stopped,
            ] {
                set_state(&conn, protocol, state).unwrap();
            }
            if protocol == Protocol::Clx {
                continue;
            }
            let events = clm_events(&conn);
            let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(
                types,
                vec!["pool_starting", "pool_started", "pool_stopping", "pool_stopped"]
            );
            assert!(events.iter().all(|e| e.1 == "all"), "pool events are of type `all`");
            assert!(events[0].2.contains("4 worker(s)"), "{}", events[0].2);
        }
    }

    #[test]
    fn a_run_that_ended_without_stopping_is_closed_as_unclean() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            begin_run(&mut conn, protocol, &run(100, 2)).unwrap();
            launched(&conn, 0);
            launched(&conn, 1);
            set_state(&conn, protocol, SupervisorState::Running).unwrap();
            close_run(&conn).unwrap();
            let r = record(&conn);
            assert_eq!(r.state, SupervisorState::Stopped, "{protocol}");
            assert!(r.stopped_at.is_some() && r.ended_uncleanly_at.is_some(), "{protocol}");
            for s in slots::slots(&conn).unwrap() {
                assert_eq!(
                    (s.state, s.pid, s.proc_start),
                    (SlotState::Stopped, None, None),
                    "{protocol}"
                );
                assert!(s.worker_id.is_some(), "{protocol}: which worker it ran is kept");
            }
        }
    }

    #[test]
    fn a_run_that_stopped_cleanly_stays_clean_when_closed() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            begin_run(&mut conn, protocol, &run(100, 1)).unwrap();
            set_state(&conn, protocol, SupervisorState::Stopped).unwrap();
            conn.execute("UPDATE clx_pool_supervisor SET stopped_at = '2001-01-01 00:00:00'", [])
                .unwrap();
            close_run(&conn).unwrap();
            let r = record(&conn);
            assert_eq!(r.ended_uncleanly_at, None, "{protocol}");
            assert_eq!(r.stopped_at.as_deref(), Some("2001-01-01 00:00:00"), "{protocol}");
        }
    }

    #[test]
    fn run_started_is_known_only_once_a_run_began_also_in_an_older_clx_pool_database() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::CLX_SCHEMA).unwrap();
        assert_eq!(run_started(&conn).unwrap(), None, "no clx-pool tables at all");

        let mut conn = db(Protocol::Clx);
        assert_eq!(run_started(&conn).unwrap(), None, "no run yet");
        begin_run(&mut conn, Protocol::Clx, &run(100, 1)).unwrap();
        conn.execute("UPDATE clx_pool_supervisor SET started_at = '2024-05-06 07:08:09'", [])
            .unwrap();
        assert_eq!(run_started(&conn).unwrap().as_deref(), Some("2024-05-06 07:08:09"));

        // As an older clx-pool left it (before migration 5, and so the later).
        conn.execute_batch(
            "ALTER TABLE clx_pool_supervisor DROP COLUMN ended_uncleanly_at;
             ALTER TABLE clx_pool_slots DROP COLUMN node;
             ALTER TABLE clx_pool_slots DROP COLUMN task;
             ALTER TABLE clx_pool_supervisor DROP COLUMN health_window;
             ALTER TABLE clx_pool_supervisor DROP COLUMN health_failure_rate;
             DELETE FROM clx_pool_schema WHERE version >= 5;",
        )
        .unwrap();
        let r = record(&conn);
        assert_eq!((r.pid, r.ended_uncleanly_at), (100, None));
        assert_eq!(run_started(&conn).unwrap().as_deref(), Some("2024-05-06 07:08:09"));
    }
}
