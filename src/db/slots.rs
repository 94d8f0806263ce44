//! The slot tables: `clx_pool_slots` (the slot behind each worker: the
//! process running it, its state, its restarts) and `clx_pool_wanted` (how
//! many workers of each type the pool wants). A slot's transitions that
//! touch a worker (pre-registration, its end) are one transaction with
//! the worker's row and the events.

use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::json;

use super::events::{self, ClmEventRow, clm_event};
use super::jobs;
use crate::contract::SlotId;
use crate::vocab::{
    ClmEvent, EndEvent, JobStatus, Mode, ModeKind, Protocol, SlotState, WorkerId, WorkerRow, WorkerStatus,
};

/// A CLM worker about to be started in a slot: its pre-registered row
/// (see `workers::preregister`) and CLM's `worker_starting` event, in one
/// transaction. Returns the row, whose id the worker gets as `CLM_WORKER_ID`.
pub fn preregister_worker(
    conn: &mut Connection,
    slot: u32,
    p: &crate::db::workers::Preregistration,
) -> rusqlite::Result<WorkerRow> {
    let tx = conn.transaction()?;
    let row = crate::db::workers::preregister(&tx, p)?;
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
             note = NULL, updated_at = CURRENT_TIMESTAMP,
             -- where a swarm worker runs may already be written (see write_tasks)
             node = CASE WHEN worker_id = ?3 THEN node END, task = CASE WHEN worker_id = ?3 THEN task END
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

/// What Swarm says of one worker's task: its node (`hostname (id)`) and
/// its state in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLine {
    pub worker_id: WorkerId,
    pub node: Option<String>,
    pub task: String,
}

/// Writes where swarm workers run and what their tasks do, to the slots
/// that hold them now; the lines that matched no slot (a worker not yet
/// recorded as launched, or already replaced) come back, to be tried again.
pub fn write_tasks(conn: &Connection, lines: &[TaskLine]) -> rusqlite::Result<Vec<WorkerId>> {
    let tx = conn.unchecked_transaction()?;
    let mut unmatched = Vec::new();
    {
        let mut update = tx.prepare_cached(
            "UPDATE clx_pool_slots SET node = COALESCE(?2, node), task = ?3, updated_at = CURRENT_TIMESTAMP
             WHERE worker_id = ?1",
        )?;
        for l in lines {
            if update.execute(params![l.worker_id, l.node, l.task])? == 0 {
                unmatched.push(l.worker_id.clone());
            }
        }
    }
    tx.commit()?;
    Ok(unmatched)
}

/// A slot's worker registered (or activated its pre-registered row).
pub struct Registered<'a> {
    pub slot: &'a SlotId,
    pub worker_row: WorkerRow,
    pub worker_id: &'a WorkerId,
    pub execution_mode: ModeKind,
    /// Where it runs when not on this machine (a swarm node).
    pub node: Option<&'a str>,
}

pub fn slot_registered(conn: &Connection, protocol: Protocol, r: &Registered) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE clx_pool_slots SET state = ?4, worker_row = ?3, node = COALESCE(?5, node), updated_at = CURRENT_TIMESTAMP
         WHERE worker_type = ?1 AND slot = ?2",
        params![
            r.slot.worker_type,
            r.slot.index,
            r.worker_row,
            SlotState::Running,
            r.node
        ],
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
    let held = match end.worker_row {
        Some(row) => jobs::held_by(&tx, row)?,
        None => None,
    };
    let (requeued, failed) = match end.worker_row {
        Some(row) => jobs::bury(&tx, row, end.worker_id.as_str(), end.cause)?,
        None => (Vec::new(), Vec::new()),
    };
    clm_end_event(&tx, protocol, end, held, &requeued, &failed)?;
    tx.execute(
        "UPDATE clx_pool_slots SET pid = NULL, proc_start = NULL, worker_row = NULL,
             restarts = restarts + ?3, last_cause = CASE WHEN ?3 = 1 THEN ?4 ELSE last_cause END,
             updated_at = CURRENT_TIMESTAMP
         WHERE worker_type = ?1 AND slot = ?2",
        params![end.slot.worker_type, end.slot.index, end.restart as i64, end.cause],
    )?;
    events::record_end(
        &tx,
        &events::EndRow {
            slot: end.slot,
            worker_id: end.worker_id,
            event: end.event,
            cause: end.cause,
            job_id: held,
            log_tail: end.log_tail,
        },
    )?;
    tx.commit()?;
    Ok((requeued, failed))
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
/// The job types served on the database: those of its pool (the slots and
/// wanted counts of its running or last run) and of every live worker
/// (one run by hand beside the pool serves its type too).
pub fn served_types(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut types: Vec<String> = slots(conn)?.into_iter().map(|s| s.worker_type).collect();
    types.extend(wanted(conn)?.into_iter().filter(|(_, n)| *n > 0).map(|(t, _)| t));
    types.extend(super::workers::live_types(conn)?);
    types.sort();
    types.dedup();
    Ok(types)
}

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
         WHERE s.worker_type = ?1 AND w.status = ?2",
    )?
    .query_map(params![worker_type, WorkerStatus::Busy], |r| r.get(0))?
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
         LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = ?1
         WHERE s.state = ?2
         ORDER BY s.worker_type, s.slot, j.id",
    )?;
    let rows = stmt.query_map(params![JobStatus::Processing, SlotState::Running], |r| {
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
                ModeKind::Direct | ModeKind::Swarm => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fixture::{add_job, memory_db as db};
    use crate::db::{schema, workers};

    const DIRECT: Mode = Mode {
        kind: ModeKind::Direct,
        auto: false,
    };

    fn slot(worker_type: &str, index: u32) -> SlotId {
        SlotId {
            worker_type: worker_type.into(),
            index,
        }
    }

    fn id(s: &str) -> WorkerId {
        WorkerId(s.into())
    }

    /// A slot running a registered worker: its row.
    fn running(conn: &Connection, protocol: Protocol, s: &SlotId, mode: Mode, wid: &WorkerId) -> WorkerRow {
        set_slot_state(conn, s, mode, SlotState::Starting, None).unwrap();
        // A process in direct mode; a container has none of its own.
        let process = (mode.kind == ModeKind::Direct).then_some((4321 + s.index as i32, Some(99)));
        slot_launched(conn, s, wid, process).unwrap();
        let row = workers::register(conn, protocol, &s.worker_type, wid.as_str()).unwrap();
        let r = Registered {
            slot: s,
            worker_row: row,
            worker_id: wid,
            execution_mode: mode.kind,
            node: None,
        };
        slot_registered(conn, protocol, &r).unwrap();
        row
    }

    /// A job of `job_type` claimed by `row`.
    fn claimed(conn: &mut Connection, protocol: Protocol, job_type: &str, row: WorkerRow) -> i64 {
        add_job(conn, job_type, 3);
        let who = jobs::Claimant {
            protocol,
            worker_row: row,
            execution_mode: ModeKind::Direct,
        };
        jobs::claim(conn, job_type, who).unwrap().unwrap().id
    }

    fn the_slot(conn: &Connection, s: &SlotId) -> SlotRow {
        slots(conn)
            .unwrap()
            .into_iter()
            .find(|r| r.worker_type == s.worker_type && r.slot == s.index)
            .unwrap()
    }

    fn job_status(conn: &Connection, id: i64) -> JobStatus {
        conn.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    }

    fn clm_events(conn: &Connection) -> Vec<(String, Option<i64>, serde_json::Value)> {
        conn.prepare("SELECT event_type, worker_id, metadata FROM worker_events ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                let metadata: String = r.get(2)?;
                Ok((r.get(0)?, r.get(1)?, serde_json::from_str(&metadata).unwrap()))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn end<'a>(s: &'a SlotId, wid: &'a WorkerId, row: Option<WorkerRow>, event: EndEvent) -> WorkerEnd<'a> {
        WorkerEnd {
            slot: s,
            worker_id: wid,
            worker_row: row,
            execution_mode: ModeKind::Direct,
            event,
            cause: "was killed by SIGKILL",
            log_tail: "Traceback …",
            restart: event != EndEvent::Stopped,
        }
    }

    #[test]
    fn a_slot_keeps_its_process_and_restarts_across_state_changes_and_a_launch_clears_its_note() {
        let conn = db(Protocol::Clx);
        let s = slot("notebook", 0);
        set_slot_state(&conn, &s, DIRECT, SlotState::Starting, None).unwrap();
        slot_launched(&conn, &s, &id("w0"), Some((4321, Some(77)))).unwrap();
        conn.execute("UPDATE clx_pool_slots SET restarts = 2", []).unwrap();
        let auto_docker = Mode {
            kind: ModeKind::Docker,
            auto: true,
        };
        set_slot_state(&conn, &s, auto_docker, SlotState::Backoff, Some("cooling down")).unwrap();
        let r = the_slot(&conn, &s);
        assert_eq!(slots(&conn).unwrap().len(), 1, "one row per slot");
        assert_eq!(
            (r.execution_mode, r.state, r.note.as_deref()),
            (auto_docker, SlotState::Backoff, Some("cooling down"))
        );
        assert_eq!(
            (r.worker_id, r.pid, r.proc_start, r.restarts),
            (Some(id("w0")), Some(4321), Some(77), 2)
        );

        slot_launched(&conn, &s, &id("w1"), None).unwrap();
        let r = the_slot(&conn, &s);
        assert_eq!((r.state, r.note, r.pid), (SlotState::Starting, None, None));
        assert_eq!(r.worker_id, Some(id("w1")));
    }

    #[test]
    fn a_registered_worker_is_observed_in_its_running_slot_with_its_oldest_job() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let docker = Mode {
                kind: ModeKind::Docker,
                auto: true,
            };
            let direct_row = running(&conn, protocol, &slot("a", 0), DIRECT, &id("direct-a-0"));
            let docker_row = running(&conn, protocol, &slot("b", 0), docker, &id("0123456789ab"));
            let first = claimed(&mut conn, protocol, "a", direct_row);
            let _second = claimed(&mut conn, protocol, "a", direct_row);
            // A slot backing off is not observed, nor one without a worker.
            let off = running(&conn, protocol, &slot("c", 0), DIRECT, &id("off"));
            set_slot_state(&conn, &slot("c", 0), DIRECT, SlotState::Backoff, None).unwrap();
            set_slot_state(&conn, &slot("d", 0), DIRECT, SlotState::Starting, None).unwrap();
            workers::write_usage(&mut conn, &[(docker_row, None, 10.0)]).unwrap();

            let seen = observe(&mut conn).unwrap();
            let rows: Vec<WorkerRow> = seen.iter().map(|o| o.row).collect();
            assert_eq!(rows, vec![direct_row, docker_row], "{protocol}");
            assert!(!rows.contains(&off));
            let (a, b) = (&seen[0], &seen[1]);
            assert_eq!((a.pid, a.container.clone()), (Some(4321), None), "{protocol}");
            assert_eq!(
                (b.pid, b.container.clone()),
                (None, Some(id("0123456789ab"))),
                "{protocol}"
            );
            assert_eq!((a.status, a.job), (WorkerStatus::Busy, Some((first, 1))), "{protocol}");
            assert_eq!((b.status, b.job), (WorkerStatus::Idle, None), "{protocol}");
            assert!(a.unmeasured && !b.unmeasured, "{protocol}");
            assert!(a.heartbeat.is_some(), "{protocol}");
            assert_eq!(busy_slots(&conn, "a").unwrap(), vec![0], "{protocol}");
            assert!(busy_slots(&conn, "b").unwrap().is_empty(), "{protocol}");
        }
    }

    #[test]
    fn a_workers_end_puts_its_job_back_clears_the_slots_process_and_counts_a_restart() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let s = slot("notebook", 0);
            let wid = id("direct-notebook-0-aaaaaaaa");
            let row = running(&conn, protocol, &s, DIRECT, &wid);
            let job = claimed(&mut conn, protocol, "notebook", row);

            let e = end(&s, &wid, Some(row), EndEvent::Died);
            assert_eq!(
                record_end(&mut conn, protocol, &e).unwrap(),
                (vec![job], vec![]),
                "{protocol}"
            );
            assert_eq!(job_status(&conn, job), JobStatus::Pending, "{protocol}");
            assert_eq!(
                workers::status(&conn, row).unwrap(),
                Some(WorkerStatus::Dead),
                "{protocol}"
            );
            let r = the_slot(&conn, &s);
            assert_eq!((r.pid, r.proc_start, r.restarts), (None, None, 1), "{protocol}");
            assert_eq!(r.last_cause.as_deref(), Some("was killed by SIGKILL"), "{protocol}");
            assert!(
                observe(&mut conn).unwrap().is_empty(),
                "{protocol}: no worker in the slot"
            );

            let events = events::recent_events(&conn, 10).unwrap();
            assert_eq!(events.len(), 1, "{protocol}");
            assert_eq!(
                (events[0].event, events[0].job_id, events[0].worker_id.clone()),
                (EndEvent::Died, Some(job), Some(wid.clone())),
                "{protocol}"
            );
            assert_eq!(events[0].log_tail.as_deref(), Some("Traceback …"));
            if protocol == Protocol::Clm {
                let (event, worker, metadata) = clm_events(&conn).pop().unwrap();
                assert_eq!((event.as_str(), worker), ("worker_failed", Some(row.0)));
                assert_eq!(metadata["reason"], "died");
                assert_eq!(metadata["job_id"], job);
                assert_eq!(metadata["requeued_jobs"], json!([job]));
                assert_eq!(metadata["failed_jobs"], json!([]));
            }
        }
    }

    #[test]
    fn a_clean_stop_is_no_restart_and_keeps_the_last_cause() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let s = slot("notebook", 0);
            let wid = id("w");
            let row = running(&conn, protocol, &s, DIRECT, &wid);
            conn.execute("UPDATE clx_pool_slots SET restarts = 3, last_cause = 'earlier'", [])
                .unwrap();
            let e = end(&s, &wid, Some(row), EndEvent::Stopped);
            assert_eq!(record_end(&mut conn, protocol, &e).unwrap(), (vec![], vec![]));
            let r = the_slot(&conn, &s);
            assert_eq!(
                (r.restarts, r.last_cause.as_deref()),
                (3, Some("earlier")),
                "{protocol}"
            );
            assert_eq!(
                workers::status(&conn, row).unwrap(),
                Some(WorkerStatus::Dead),
                "{protocol}"
            );
            if protocol == Protocol::Clm {
                assert_eq!(clm_events(&conn).pop().unwrap().0, "worker_stopped");
            }
        }
    }

    #[test]
    fn a_preregistered_worker_that_never_came_up_leaves_no_row_only_its_events() {
        let mut conn = db(Protocol::Clm);
        let s = slot("notebook", 2);
        let wid = id("direct-notebook-2-bbbbbbbb");
        set_slot_state(&conn, &s, DIRECT, SlotState::Starting, None).unwrap();
        let p = workers::Preregistration {
            worker_type: "notebook",
            container_id: &wid,
            execution_mode: ModeKind::Direct,
            parent_pid: 42,
        };
        let row = preregister_worker(&mut conn, 2, &p).unwrap();
        assert_eq!(workers::status(&conn, row).unwrap(), Some(WorkerStatus::Created));
        slot_launched(&conn, &s, &wid, Some((555, None))).unwrap();

        let e = end(&s, &wid, Some(row), EndEvent::NoRegister);
        record_end(&mut conn, Protocol::Clm, &e).unwrap();
        assert_eq!(workers::status(&conn, row).unwrap(), None, "the row goes");
        let events = clm_events(&conn);
        let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(types, vec!["worker_starting", "worker_failed"]);
        assert_eq!(events[0].1, Some(row.0));
        assert_eq!(
            (events[0].2["index"].clone(), events[0].2["executor_id"].clone()),
            (json!(2), json!(wid.0))
        );
        assert_eq!(the_slot(&conn, &s).restarts, 1);
        assert_eq!(events::recent_events(&conn, 10).unwrap()[0].event, EndEvent::NoRegister);
    }

    #[test]
    fn a_clm_worker_that_removed_its_own_row_still_has_its_job_put_back() {
        let mut conn = db(Protocol::Clm);
        let s = slot("notebook", 0);
        let wid = id("w");
        let row = running(&conn, Protocol::Clm, &s, DIRECT, &wid);
        let job = claimed(&mut conn, Protocol::Clm, "notebook", row);
        workers::deregister(&conn, row).unwrap();
        let e = end(&s, &wid, Some(row), EndEvent::Died);
        assert_eq!(record_end(&mut conn, Protocol::Clm, &e).unwrap(), (vec![job], vec![]));
        assert_eq!(job_status(&conn, job), JobStatus::Pending);
        assert_eq!(workers::status(&conn, row).unwrap(), None, "no row comes back");
    }

    #[test]
    fn the_wanted_counts_are_replaced_as_a_whole_and_a_removed_slot_is_gone() {
        let mut conn = db(Protocol::Clx);
        set_wanted(&mut conn, &[("notebook".into(), 2), ("plantuml".into(), 1)]).unwrap();
        set_wanted(&mut conn, &[("notebook".into(), 3)]).unwrap();
        let wanted = wanted(&conn).unwrap();
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            vec![("notebook".to_string(), 3)]
        );

        for i in 0..3 {
            set_slot_state(&conn, &slot("notebook", i), DIRECT, SlotState::Running, None).unwrap();
        }
        remove_slot(&conn, &slot("notebook", 1)).unwrap();
        let left: Vec<u32> = slots(&conn).unwrap().iter().map(|r| r.slot).collect();
        assert_eq!(left, vec![0, 2]);
    }

    #[test]
    fn a_database_no_supervisor_has_prepared_has_no_slots_and_wants_nothing() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::CLX_SCHEMA).unwrap();
        assert!(slots(&conn).unwrap().is_empty());
        assert!(wanted(&conn).unwrap().is_empty());
    }
}
