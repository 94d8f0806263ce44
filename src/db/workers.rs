//! The `workers` table: every statement that writes it. Registration (by
//! the worker itself, directly or over the Worker API, or pre-registration
//! by the supervisor and activation by the worker, as CLM does),
//! heartbeats, status, usage figures, and the one way a worker is marked
//! dead ([`mark_dead`], with its jobs put back by [`bury`]).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::vocab::{JobStatus, MANAGED_BY_PERSISTENT, ModeKind, Protocol, WorkerId, WorkerRow, WorkerStatus};

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
            &mut conn
                .prepare("INSERT INTO workers (worker_type, container_id, status) VALUES (?1, ?2, ?3) RETURNING id")?,
            params![worker_type, container_id, WorkerStatus::Idle],
            |r| r.get(0),
        )?,
        Protocol::Clm => super::returning_one(
            &mut conn.prepare(
                "INSERT INTO workers (worker_type, container_id, status, parent_pid) VALUES (?1, ?2, ?4, ?3)
                 RETURNING id",
            )?,
            params![
                worker_type,
                container_id,
                nix::unistd::getppid().as_raw(),
                WorkerStatus::Idle
            ],
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
        "INSERT INTO workers (worker_type, container_id, status, parent_pid) VALUES (?1, ?2, ?4, ?3)",
        params![worker_type, container_id, parent_pid, WorkerStatus::Idle],
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
             VALUES (?1, ?2, ?6, ?3, ?4, ?5) RETURNING id",
        )?,
        params![
            p.worker_type,
            p.container_id,
            // CLM's own table: a swarm task is a container to CLM.
            p.execution_mode.for_clm(),
            MANAGED_BY_PERSISTENT,
            p.parent_pid,
            WorkerStatus::Created
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
        "UPDATE workers SET status = ?2, last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1 AND status = ?3",
        params![row, WorkerStatus::Idle, WorkerStatus::Created],
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

/// A worker found hung (its slot then stops it and records its end); a
/// row already dead stays dead.
pub fn mark_hung(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE workers SET status = ?2 WHERE id = ?1 AND status != ?3",
        params![row, WorkerStatus::Hung, WorkerStatus::Dead],
    )?;
    Ok(())
}

/// A busy worker whose job was taken away is idle again.
pub fn release(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE workers SET status = CASE WHEN status = ?2 THEN ?3 ELSE status END,
             last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1",
        params![row, WorkerStatus::Busy, WorkerStatus::Idle],
    )?;
    Ok(())
}

/// Removes a pre-registered row that nobody activated (and only such).
pub fn discard_created(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM workers WHERE id = ?1 AND status = ?2",
        params![row, WorkerStatus::Created],
    )?;
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
    let n = conn.execute(
        "UPDATE workers SET status = ?2 WHERE id = ?1",
        params![row, WorkerStatus::Dead],
    )?;
    Ok(n == 1)
}

/// Rows registered after `after_row` that are live (neither pre-registered
/// and waiting nor dead): `(row, container_id)`.
pub fn registered_since(conn: &Connection, after_row: WorkerRow) -> rusqlite::Result<Vec<(WorkerRow, WorkerId)>> {
    conn.prepare_cached("SELECT id, container_id FROM workers WHERE id > ?1 AND status NOT IN (?2, ?3) ORDER BY id")?
        .query_map(params![after_row, WorkerStatus::Dead, WorkerStatus::Created], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
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
            status = CASE WHEN status = ?5 THEN ?6 ELSE status END,
            last_heartbeat = CURRENT_TIMESTAMP,
            avg_processing_time = (COALESCE(avg_processing_time, 0) * (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0)) + ?2)
                                  / (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0) + 1),
            jobs_processed = COALESCE(jobs_processed, 0) + ?3,
            jobs_failed = COALESCE(jobs_failed, 0) + ?4
         WHERE id = ?1",
    )?
    .execute(params![
        worker_row,
        seconds,
        done,
        failed,
        WorkerStatus::Busy,
        WorkerStatus::Idle
    ])?;
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
pub fn pool_rows(protocol: Protocol) -> String {
    match protocol {
        Protocol::Clx => "(?1 IS NULL OR ?1 IS NOT NULL)".into(),
        Protocol::Clm => format!(
            "(id IN (SELECT worker_row FROM clx_pool_slots WHERE worker_row IS NOT NULL)
              OR container_id IN (SELECT worker_id FROM clx_pool_slots WHERE worker_id IS NOT NULL)
              OR (managed_by = '{MANAGED_BY_PERSISTENT}' AND parent_pid = ?1))"
        ),
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
        &format!("DELETE FROM workers WHERE status = ?2 AND {}", pool_rows(protocol)),
        params![old_supervisor, WorkerStatus::Created],
    )?;
    Ok(())
}

/// The worker took a job: busy, and alive now.
pub fn set_busy(conn: &Connection, row: WorkerRow) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE workers SET status = ?2, last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1")?
        .execute(params![row, WorkerStatus::Busy])?;
    Ok(())
}

/// The idle workers of each type that has pending jobs: (type, how many).
/// With nothing pending (an idle pool, asked at every commit) one probe of
/// the jobs' status index answers and no worker row is read; otherwise one
/// probe per idle worker, however deep the queue.
pub fn idle_with_work(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let pending: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE status = ?1)")?
        .query_row(params![JobStatus::Pending], |r| r.get(0))?;
    if !pending {
        return Ok(Vec::new());
    }
    conn.prepare_cached(
        "SELECT w.worker_type, COUNT(*) FROM workers w
         WHERE w.status = ?1
           AND EXISTS (SELECT 1 FROM jobs j WHERE j.status = ?2 AND j.job_type = w.worker_type)
         GROUP BY w.worker_type",
    )?
    .query_map(params![WorkerStatus::Idle, JobStatus::Pending], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?
    .collect()
}

/// The types of the workers alive now (idle or busy), whoever started them.
pub fn live_types(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT DISTINCT worker_type FROM workers WHERE status IN (?1, ?2)")?
        .query_map(params![WorkerStatus::Idle, WorkerStatus::Busy], |r| r.get(0))?
        .collect()
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
    /// The node it runs on (swarm mode), from its slot.
    pub node: Option<String>,
    /// What Swarm says its task does (swarm mode), from its slot.
    pub task: Option<String>,
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
    let version = super::schema::pool_version(conn)?;
    let slots = match version {
        0 => "(SELECT NULL AS worker_id, NULL AS pid, NULL AS slot, NULL AS node, NULL AS task WHERE 0)",
        v if v < super::schema::SLOT_NODE_VERSION => {
            "(SELECT worker_id, pid, slot, NULL AS node, NULL AS task FROM clx_pool_slots)"
        }
        v if v < super::schema::SLOT_TASK_VERSION => {
            "(SELECT worker_id, pid, slot, node, NULL AS task FROM clx_pool_slots)"
        }
        _ => "clx_pool_slots",
    };
    conn.prepare(&format!(
        "SELECT w.id, w.worker_type, w.container_id, w.status, s.pid, s.slot, s.node, s.task,
                j.id, unixepoch('now') - unixepoch(j.started_at),
                w.cpu_usage, w.memory_usage, COALESCE(w.jobs_processed, 0), COALESCE(w.jobs_failed, 0)
         FROM workers w
         LEFT JOIN {slots} s ON s.worker_id = w.container_id
         LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = ?3
         WHERE (?1 IS NULL OR w.started_at >= ?1) AND (?2 OR w.status != ?4)
         GROUP BY w.id ORDER BY w.worker_type, s.slot, w.id"
    ))?
    .query_map(params![since, dead, JobStatus::Processing, WorkerStatus::Dead], |r| {
        Ok(WorkerLine {
            row: r.get(0)?,
            worker_type: r.get(1)?,
            worker_id: r.get(2)?,
            status: r.get(3)?,
            pid: r.get(4)?,
            slot: r.get(5)?,
            node: r.get(6)?,
            task: r.get(7)?,
            job_id: r.get(8)?,
            job_seconds: r.get(9)?,
            cpu_percent: r.get(10)?,
            memory_mib: r.get(11)?,
            jobs_done: r.get(12)?,
            jobs_failed: r.get(13)?,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SlotId;
    use crate::db::fixture::Fixture;
    use crate::db::fixture::add_job;
    use crate::db::fixture::memory_db as db;
    use crate::db::{jobs, schema, slots};
    use crate::vocab::{Mode, SlotState};

    fn id(s: &str) -> WorkerId {
        WorkerId(s.into())
    }

    fn submit(conn: &Connection, job_type: &str) -> i64 {
        add_job(conn, job_type, 3)
    }

    fn preregistration<'a>(container_id: &'a WorkerId, parent_pid: i64) -> Preregistration<'a> {
        Preregistration {
            worker_type: "notebook",
            container_id,
            execution_mode: ModeKind::Direct,
            parent_pid,
        }
    }

    fn figures(conn: &Connection, row: WorkerRow) -> (i64, i64, Option<f64>) {
        conn.query_row(
            "SELECT jobs_processed, jobs_failed, avg_processing_time FROM workers WHERE id = ?1",
            [row],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    /// A condition every row meets (taking the owner as `?1`, as
    /// [`pool_rows`] does).
    const EVERY_ROW: &str = "?1 IS ?1";

    fn containers(conn: &Connection, condition: &str, owner: Option<i64>) -> Vec<String> {
        conn.prepare(&format!(
            "SELECT container_id FROM workers WHERE {condition} ORDER BY id"
        ))
        .unwrap()
        .query_map([owner], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn a_worker_registers_idle_once_per_id_under_both_protocols() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            assert_eq!(max_row(&conn).unwrap(), WorkerRow(0), "{protocol}");
            let a = register(&conn, protocol, "notebook", "w-a").unwrap();
            let b = register(&conn, protocol, "notebook", "w-b").unwrap();
            assert!(b > a, "{protocol}");
            assert_eq!(status(&conn, a).unwrap(), Some(WorkerStatus::Idle), "{protocol}");
            assert_eq!(row_of(&conn, &id("w-b")).unwrap(), Some(b), "{protocol}");
            assert_eq!(row_of(&conn, &id("w-c")).unwrap(), None, "{protocol}");
            assert_eq!(max_row(&conn).unwrap(), b, "{protocol}");
            assert!(
                register(&conn, protocol, "notebook", "w-a").is_err(),
                "{protocol}: a second worker cannot take an id already registered"
            );
            if protocol == Protocol::Clm {
                // As CLM's workers do, for its orphan detection.
                let parent: i64 = conn
                    .query_row("SELECT parent_pid FROM workers WHERE id = ?1", [a], |r| r.get(0))
                    .unwrap();
                assert_eq!(parent, i64::from(nix::unistd::getppid().as_raw()));
                let remote = register_remote(&conn, "plantuml", "c0ffee", Some(4242)).unwrap();
                let row: (String, WorkerStatus, Option<i64>) = conn
                    .query_row(
                        "SELECT worker_type, status, parent_pid FROM workers WHERE id = ?1",
                        [remote],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .unwrap();
                assert_eq!(row, ("plantuml".into(), WorkerStatus::Idle, Some(4242)));
                assert_eq!(row_of(&conn, &id("c0ffee")).unwrap(), Some(remote));
            }
        }
    }

    #[test]
    fn a_preregistered_row_counts_as_registered_only_once_its_worker_activates_it() {
        let conn = db(Protocol::Clm);
        let before = max_row(&conn).unwrap();
        let wid = id("direct-notebook-0-0123abcd");
        let row = preregister(&conn, &preregistration(&wid, 42)).unwrap();
        let written: (WorkerStatus, String, i64, String, Option<String>) = conn
            .query_row(
                "SELECT status, managed_by, parent_pid, execution_mode, session_id FROM workers WHERE id = ?1",
                [row],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(
            written,
            (WorkerStatus::Created, "persistent".into(), 42, "direct".into(), None),
            "reusable by every `clm build`, of no session"
        );
        assert!(registered_since(&conn, before).unwrap().is_empty());
        assert!(activated(&conn, &[row]).unwrap().is_empty());

        assert!(activate(&conn, row).unwrap());
        assert_eq!(status(&conn, row).unwrap(), Some(WorkerStatus::Idle));
        assert_eq!(registered_since(&conn, before).unwrap(), vec![(row, wid.clone())]);
        assert_eq!(activated(&conn, &[row]).unwrap(), vec![row]);
        assert!(matches!(
            activate(&conn, row),
            Err(ActivationError::NotCreated(WorkerStatus::Idle))
        ));
        assert!(!activate(&conn, WorkerRow(row.0 + 1)).unwrap(), "not there yet");

        // The row takes the id its container goes by.
        set_container_id(&conn, row, &id("0123456789ab")).unwrap();
        assert_eq!(row_of(&conn, &id("0123456789ab")).unwrap(), Some(row));
        assert_eq!(row_of(&conn, &wid).unwrap(), None);
    }

    #[test]
    fn a_row_the_supervisor_gave_up_on_cannot_be_activated_later() {
        let conn = db(Protocol::Clm);
        let (late, buried, live) = (id("late"), id("buried"), id("live"));
        let late = preregister(&conn, &preregistration(&late, 42)).unwrap();
        let buried = preregister(&conn, &preregistration(&buried, 42)).unwrap();
        let live = preregister(&conn, &preregistration(&live, 42)).unwrap();
        assert!(activate(&conn, live).unwrap());

        discard_created(&conn, late).unwrap();
        discard_created(&conn, live).unwrap();
        assert_eq!(status(&conn, late).unwrap(), None);
        assert_eq!(
            status(&conn, live).unwrap(),
            Some(WorkerStatus::Idle),
            "only a row nobody activated is discarded"
        );
        assert!(!activate(&conn, late).unwrap());

        assert!(mark_dead(&conn, buried).unwrap());
        assert!(matches!(
            activate(&conn, buried),
            Err(ActivationError::NotCreated(WorkerStatus::Dead))
        ));
        assert_eq!(status(&conn, buried).unwrap(), Some(WorkerStatus::Dead));
    }

    #[test]
    fn a_dead_worker_never_comes_back_by_a_late_heartbeat_release_result_or_hung_verdict() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            let w = register(&conn, protocol, "t", "w").unwrap();
            set_busy(&conn, w).unwrap();
            assert!(mark_dead(&conn, w).unwrap());
            assert!(heartbeat(&conn, w).unwrap(), "{protocol}: the row is still there");
            release(&conn, w).unwrap();
            count_outcome(&conn, w, true, 1.0).unwrap();
            mark_hung(&conn, w).unwrap();
            assert_eq!(status(&conn, w).unwrap(), Some(WorkerStatus::Dead), "{protocol}");
            assert!(registered_since(&conn, WorkerRow(0)).unwrap().is_empty(), "{protocol}");
            assert!(activated(&conn, &[w]).unwrap().is_empty(), "{protocol}");
            assert!(
                !mark_dead(&conn, WorkerRow(w.0 + 1)).unwrap(),
                "{protocol}: no such row"
            );

            // A worker whose row was removed is told so by its heartbeat.
            let gone = register(&conn, protocol, "t", "gone").unwrap();
            deregister(&conn, gone).unwrap();
            assert!(!heartbeat(&conn, gone).unwrap(), "{protocol}");
        }
    }

    #[test]
    fn a_worker_declared_dead_claims_nothing_and_stays_dead() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let w = register(&conn, protocol, "t", "w").unwrap();
            assert!(mark_dead(&conn, w).unwrap());
            let job = submit(&conn, "t");
            let who = jobs::Claimant {
                protocol,
                worker_row: w,
                execution_mode: ModeKind::Direct,
            };
            // Nobody would put its job back while the pool runs.
            assert!(jobs::claim(&mut conn, "t", who).unwrap().is_none(), "{protocol}");
            assert_eq!(status(&conn, w).unwrap(), Some(WorkerStatus::Dead), "{protocol}");
            let job_status: JobStatus = conn
                .query_row("SELECT status FROM jobs WHERE id = ?1", [job], |r| r.get(0))
                .unwrap();
            assert_eq!(job_status, JobStatus::Pending, "{protocol}");
            // A live worker takes it.
            let live = register(&conn, protocol, "t", "w2").unwrap();
            let who = jobs::Claimant {
                worker_row: live,
                ..who
            };
            assert_eq!(
                jobs::claim(&mut conn, "t", who).unwrap().map(|j| j.id),
                Some(job),
                "{protocol}"
            );
        }
    }

    #[test]
    fn each_finished_job_updates_the_worker_figures_and_a_busy_worker_turns_idle() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            let w = register(&conn, protocol, "t", "w").unwrap();
            for (completed, seconds) in [(true, 1.0), (true, 3.0), (false, 5.0)] {
                set_busy(&conn, w).unwrap();
                assert_eq!(status(&conn, w).unwrap(), Some(WorkerStatus::Busy), "{protocol}");
                count_outcome(&conn, w, completed, seconds).unwrap();
                assert_eq!(status(&conn, w).unwrap(), Some(WorkerStatus::Idle), "{protocol}");
            }
            assert_eq!(figures(&conn, w), (2, 1, Some(3.0)), "{protocol}");
            // Declared hung meanwhile: a late result does not clear that.
            mark_hung(&conn, w).unwrap();
            count_outcome(&conn, w, true, 7.0).unwrap();
            assert_eq!(status(&conn, w).unwrap(), Some(WorkerStatus::Hung), "{protocol}");
            assert_eq!(figures(&conn, w), (3, 1, Some(4.0)), "{protocol}");
        }
    }

    #[test]
    fn a_usage_reading_without_cpu_keeps_the_last_cpu_figure() {
        let mut conn = db(Protocol::Clx);
        let a = register(&conn, Protocol::Clx, "t", "a").unwrap();
        let b = register(&conn, Protocol::Clx, "t", "b").unwrap();
        write_usage(&mut conn, &[(a, Some(12.5), 100.0), (b, Some(50.0), 200.0)]).unwrap();
        write_usage(&mut conn, &[(a, None, 110.0), (WorkerRow(999), Some(1.0), 1.0)]).unwrap();
        let usage = |row: WorkerRow| -> (Option<f64>, Option<f64>) {
            conn.query_row(
                "SELECT cpu_usage, memory_usage FROM workers WHERE id = ?1",
                [row],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        assert_eq!(usage(a), (Some(12.5), Some(110.0)));
        assert_eq!(usage(b), (Some(50.0), Some(200.0)), "untouched by a's reading");
        assert_eq!(max_row(&conn).unwrap(), b, "a reading for no row adds none");
    }

    #[test]
    fn counts_show_every_status_of_the_protocol_for_each_type_of_the_run() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            register(&conn, protocol, "notebook", "a").unwrap();
            let b = register(&conn, protocol, "notebook", "b").unwrap();
            set_busy(&conn, b).unwrap();
            let old = register(&conn, protocol, "plantuml", "old").unwrap();
            mark_dead(&conn, old).unwrap();
            conn.execute(
                "UPDATE workers SET started_at = '2000-01-01 00:00:00' WHERE id = ?1",
                [old],
            )
            .unwrap();

            let all = counts(&conn, protocol, None).unwrap();
            let words: Vec<&str> = all["notebook"].keys().map(String::as_str).collect();
            let expected: &[&str] = match protocol {
                Protocol::Clx => &["busy", "dead", "hung", "idle"],
                Protocol::Clm => &["busy", "created", "dead", "hung", "idle"],
            };
            assert_eq!(words, expected, "{protocol}");
            assert_eq!(
                (
                    all["notebook"]["idle"],
                    all["notebook"]["busy"],
                    all["notebook"]["dead"]
                ),
                (1, 1, 0),
                "{protocol}"
            );
            assert_eq!(all["plantuml"]["dead"], 1, "{protocol}");

            let run = counts(&conn, protocol, Some("2020-01-01 00:00:00")).unwrap();
            assert_eq!(
                run.keys().collect::<Vec<_>>(),
                vec!["notebook"],
                "{protocol}: an earlier run's rows"
            );
        }
    }

    #[test]
    fn a_gone_pools_preregistered_rows_are_discarded_but_no_other_programs() {
        let conn = db(Protocol::Clm);
        let direct = Mode {
            kind: ModeKind::Direct,
            auto: false,
        };
        let slot = |i: u32| SlotId {
            worker_type: "notebook".into(),
            index: i,
        };
        // A slot whose worker was pre-registered and registered by row …
        let by_row = preregister(&conn, &preregistration(&id("by-row"), 7)).unwrap();
        slots::set_slot_state(&conn, &slot(0), direct, SlotState::Starting, None).unwrap();
        slots::slot_registered(
            &conn,
            Protocol::Clm,
            &slots::Registered {
                slot: &slot(0),
                worker_row: by_row,
                worker_id: &id("by-row"),
                execution_mode: ModeKind::Direct,
                node: None,
            },
        )
        .unwrap();
        // … one launched (by id) and not registered yet.
        preregister(&conn, &preregistration(&id("by-id"), 7)).unwrap();
        slots::set_slot_state(&conn, &slot(1), direct, SlotState::Starting, None).unwrap();
        slots::slot_launched(&conn, &slot(1), &id("by-id"), Some((123, None))).unwrap();
        // Persistent rows of the old supervisor (42) and of another (7).
        preregister(&conn, &preregistration(&id("ours"), 42)).unwrap();
        preregister(&conn, &preregistration(&id("another-pool"), 7)).unwrap();
        // A `clm build`'s own rows, started by the same pid.
        let build = register_remote(&conn, "notebook", "clm-build", Some(42)).unwrap();
        conn.execute("UPDATE workers SET status = 'created' WHERE id = ?1", [build])
            .unwrap();
        // A live row of the old pool.
        let live = preregister(&conn, &preregistration(&id("live"), 42)).unwrap();
        activate(&conn, live).unwrap();

        assert_eq!(
            containers(&conn, &pool_rows(Protocol::Clm), Some(42)),
            vec!["by-row", "by-id", "ours", "live"]
        );
        discard_pool_created(&conn, Protocol::Clm, Some(42)).unwrap();
        assert_eq!(
            containers(&conn, EVERY_ROW, None),
            vec!["another-pool", "clm-build", "live"]
        );
    }

    #[test]
    fn every_row_of_a_clx_database_is_the_pools() {
        let conn = db(Protocol::Clx);
        for w in ["a", "b", "c"] {
            register(&conn, Protocol::Clx, "t", w).unwrap();
        }
        for owner in [None, Some(42)] {
            assert_eq!(containers(&conn, &pool_rows(Protocol::Clx), owner), vec!["a", "b", "c"]);
        }
        discard_pool_created(&conn, Protocol::Clx, None).unwrap();
        assert_eq!(
            containers(&conn, EVERY_ROW, None).len(),
            3,
            "no row is pre-registered in CLX"
        );
    }

    #[test]
    fn idle_workers_are_counted_only_for_types_with_pending_work() {
        let conn = db(Protocol::Clx);
        for w in ["nb-1", "nb-2"] {
            register(&conn, Protocol::Clx, "notebook", w).unwrap();
        }
        register(&conn, Protocol::Clx, "plantuml", "pu").unwrap();
        let drawio = register(&conn, Protocol::Clx, "drawio", "dr").unwrap();
        set_busy(&conn, drawio).unwrap();
        assert_eq!(
            idle_with_work(&conn).unwrap(),
            vec![],
            "nothing pending: nobody to wake"
        );
        submit(&conn, "notebook");
        submit(&conn, "drawio");
        let done = submit(&conn, "plantuml");
        conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?1", [done])
            .unwrap();
        assert_eq!(idle_with_work(&conn).unwrap(), vec![("notebook".to_string(), 2)]);
    }

    /// Slot `echo-0` of a swarm entry, starting.
    fn swarm_slot(conn: &Connection) -> SlotId {
        let slot = SlotId {
            worker_type: "echo".into(),
            index: 0,
        };
        let mode = Mode {
            kind: ModeKind::Swarm,
            auto: false,
        };
        slots::set_slot_state(conn, &slot, mode, SlotState::Starting, None).unwrap();
        slot
    }

    #[test]
    fn a_swarm_workers_node_is_shown_and_older_pool_tables_read_as_no_node() {
        let conn = db(Protocol::Clm);
        let slot = swarm_slot(&conn);
        let wid = WorkerId("swarm-echo-0-1".into());
        slots::slot_launched(&conn, &slot, &wid, None).unwrap();
        let row = register(&conn, Protocol::Clm, "echo", wid.as_str()).unwrap();
        let registered = slots::Registered {
            slot: &slot,
            worker_row: row,
            worker_id: &wid,
            execution_mode: ModeKind::Swarm,
            node: Some("build2 (abc123def456)"),
        };
        slots::slot_registered(&conn, Protocol::Clm, &registered).unwrap();
        let lines = worker_lines(&conn, None, false).unwrap();
        assert_eq!(lines[0].node.as_deref(), Some("build2 (abc123def456)"));
        assert_eq!(lines[0].pid, None);
        // CLM's own tables call it a container.
        let mode: String = conn
            .query_row(
                "SELECT execution_mode FROM worker_events ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(mode, "docker");
        // Pool tables from before the node column.
        conn.execute_batch(
            "ALTER TABLE clx_pool_slots DROP COLUMN node;
             DELETE FROM clx_pool_schema WHERE version >= 6;",
        )
        .unwrap();
        let lines = worker_lines(&conn, None, false).unwrap();
        assert_eq!((lines.len(), lines[0].node.as_deref()), (1, None));
    }

    /// What Swarm says of a task reaches the slot that holds its worker,
    /// also when it is heard before the slot recorded the launch; a line
    /// for a replaced worker changes nothing; the registration keeps a
    /// node already known; older pool tables read as no task.
    #[test]
    fn a_swarm_workers_task_state_reaches_its_slot_and_only_its_slot() {
        let conn = db(Protocol::Clm);
        let slot = swarm_slot(&conn);
        let line = |id: &str, node: Option<&str>, task: &str| slots::TaskLine {
            worker_id: WorkerId(id.into()),
            node: node.map(str::to_string),
            task: task.into(),
        };
        let first = WorkerId("swarm-echo-0-1".into());
        // Heard before the launch was recorded: tried again later.
        let pending = [line("swarm-echo-0-1", None, "pending: no suitable node")];
        assert_eq!(slots::write_tasks(&conn, &pending).unwrap(), vec![first.clone()]);
        slots::slot_launched(&conn, &slot, &first, None).unwrap();
        assert_eq!(slots::write_tasks(&conn, &pending).unwrap(), vec![]);
        let row = register(&conn, Protocol::Clm, "echo", first.as_str()).unwrap();
        let shown = |conn: &Connection| {
            let l = worker_lines(conn, None, false).unwrap();
            (l[0].node.clone(), l[0].task.clone())
        };
        assert_eq!(shown(&conn), (None, Some("pending: no suitable node".into())));
        slots::write_tasks(&conn, &[line("swarm-echo-0-1", Some("build2 (abc)"), "running")]).unwrap();
        // The launch recorded again for the same worker keeps what was heard.
        slots::slot_launched(&conn, &slot, &first, None).unwrap();
        let registered = slots::Registered {
            slot: &slot,
            worker_row: row,
            worker_id: &first,
            execution_mode: ModeKind::Swarm,
            node: None,
        };
        slots::slot_registered(&conn, Protocol::Clm, &registered).unwrap();
        assert_eq!(shown(&conn), (Some("build2 (abc)".into()), Some("running".into())));
        // A replaced worker's last word does not reach its successor.
        let second = WorkerId("swarm-echo-0-2".into());
        slots::slot_launched(&conn, &slot, &second, None).unwrap();
        let stale = [line("swarm-echo-0-1", Some("build2 (abc)"), "failed")];
        assert_eq!(slots::write_tasks(&conn, &stale).unwrap(), vec![first.clone()]);
        let (node, task): (Option<String>, Option<String>) = conn
            .query_row("SELECT node, task FROM clx_pool_slots", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((node, task), (None, None));
        // Pool tables from before the task column.
        slots::slot_launched(&conn, &slot, &first, None).unwrap();
        slots::write_tasks(&conn, &[line("swarm-echo-0-1", Some("build2 (abc)"), "running")]).unwrap();
        conn.execute_batch(
            "ALTER TABLE clx_pool_slots DROP COLUMN task;
             DELETE FROM clx_pool_schema WHERE version >= 7;",
        )
        .unwrap();
        assert_eq!(shown(&conn), (Some("build2 (abc)".into()), None));
    }

    #[test]
    fn worker_lines_show_the_runs_workers_with_their_slot_process_and_job() {
        for protocol in Protocol::ALL.iter().copied() {
            let f = Fixture::new(protocol);
            let lines = worker_lines(&f.conn, None, false).unwrap();
            let names: Vec<&str> = lines.iter().map(|l| l.worker_id.as_str()).collect();
            assert_eq!(names, vec!["copy-0-w", "upper-0-w", "upper-1-w"], "{protocol}");
            let busy = &lines[1];
            let held: i64 = f
                .conn
                .query_row("SELECT id FROM jobs WHERE status = 'processing'", [], |r| r.get(0))
                .unwrap();
            assert_eq!(busy.status, WorkerStatus::Busy, "{protocol}");
            assert_eq!((busy.slot, busy.pid), (Some(0), Some(5_000_000)), "{protocol}");
            assert_eq!(busy.job_id, Some(held), "{protocol}");
            assert!(busy.job_seconds.is_some_and(|s| s >= 0), "{protocol}");
            assert_eq!((busy.jobs_done, busy.jobs_failed), (2, 1), "{protocol}");
            let idle = &lines[2];
            assert_eq!(
                (idle.status, idle.job_id, idle.slot),
                (WorkerStatus::Idle, None, Some(1))
            );

            mark_dead(&f.conn, idle.row).unwrap();
            assert_eq!(worker_lines(&f.conn, None, false).unwrap().len(), 2, "{protocol}");
            assert_eq!(worker_lines(&f.conn, None, true).unwrap().len(), 3, "{protocol}");
            assert!(
                worker_lines(&f.conn, Some("2999-01-01 00:00:00"), true)
                    .unwrap()
                    .is_empty(),
                "{protocol}: none of a later run"
            );
        }
    }

    #[test]
    fn worker_lines_read_a_database_the_python_workers_made_alone() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::CLX_SCHEMA).unwrap();
        let w = register(&conn, Protocol::Clx, "notebook", "py-1").unwrap();
        let lines = worker_lines(&conn, None, false).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].row, lines[0].slot, lines[0].pid), (w, None, None));
        assert_eq!(lines[0].worker_id, id("py-1"));
    }
}
