//! Putting back the jobs of workers that are gone: one worker's end
//! ([`bury`]), every worker of a supervisor that is gone
//! ([`bury_pool_rows`]), and the monitor's reconciliation pass for jobs
//! whose holder is known dead ([`reconcile`]). Each is one transaction
//! with the worker rows' change.

use rusqlite::{Connection, OptionalExtension, params};

use crate::db::workers;
use crate::vocab::{JobStatus, MANAGED_BY_PERSISTENT, Protocol, WorkerRow, WorkerStatus};

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
            "UPDATE jobs SET status = ?4, completed_at = CURRENT_TIMESTAMP,
                error = 'gave up after ' || attempts || ' attempts: worker ' || ?2 || ' ' || ?3 || ' while processing this job'
             WHERE status = ?5 AND worker_id IS ?1 AND attempts >= COALESCE(max_attempts, 3)
             RETURNING id",
        )?
        .query_map(
            params![worker_row, worker_id, cause, JobStatus::Failed, JobStatus::Processing],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    let requeued: Vec<i64> = conn
        .prepare(
            "UPDATE jobs SET status = ?4, started_at = NULL, worker_id = NULL,
                error = 'attempt ' || attempts || ': worker ' || ?2 || ' ' || ?3
             WHERE status = ?5 AND worker_id IS ?1
             RETURNING id",
        )?
        .query_map(
            params![worker_row, worker_id, cause, JobStatus::Pending, JobStatus::Processing],
            |r| r.get(0),
        )?
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
         WHERE j.status = ?1 AND ";
    let find = |c: &Connection| -> rusqlite::Result<Vec<(Option<WorkerRow>, Option<String>)>> {
        let map = |r: &rusqlite::Row| Ok((r.get(0)?, r.get(1)?));
        let (processing, dead) = (JobStatus::Processing, WorkerStatus::Dead);
        match protocol {
            Protocol::Clx => c
                .prepare_cached(&format!("{ORPHANED} (w.id IS NULL OR w.status = ?2)"))?
                .query_map(params![processing, dead], map)?
                .collect(),
            Protocol::Clm => c
                .prepare_cached(&format!(
                    "{ORPHANED} w.status = ?2 AND w.managed_by = ?3 AND w.parent_pid = ?4"
                ))?
                .query_map(params![processing, dead, MANAGED_BY_PERSISTENT, supervisor_pid], map)?
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
        "SELECT id FROM jobs WHERE worker_id = ?1 AND status = ?2 ORDER BY id LIMIT 1",
        params![row, JobStatus::Processing],
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
    let with_owner = |sql: &str| sql.replace("?OURS", &workers::pool_rows(protocol));
    workers::discard_pool_created(&tx, protocol, old_supervisor)?;
    let rows: Vec<(WorkerRow, String)> = tx
        .prepare(&with_owner(
            "SELECT id, container_id FROM workers WHERE status != ?2 AND ?OURS",
        ))?
        .query_map(params![old_supervisor, WorkerStatus::Dead], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
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
             WHERE j.status = ?2 AND w.status = ?3 AND w.id IN
                 (SELECT id FROM workers WHERE ?OURS)",
        ))?
        .query_map(
            params![old_supervisor, JobStatus::Processing, WorkerStatus::Dead],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    for (row, cid) in &orphans {
        let (r, f) = recover(&tx, Some(*row), cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    tx.commit()?;
    Ok((rows.len(), requeued, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SlotId;
    use crate::db::fixture::add_job as add;
    use crate::db::fixture::memory_db as db;
    use crate::db::jobs::{Claimant, claim};
    use crate::db::slots;
    use crate::vocab::{Mode, ModeKind, SlotState, WorkerId};

    /// Submits a job of type `t` and has `row` claim it.
    fn held(conn: &mut Connection, protocol: Protocol, row: WorkerRow, max_attempts: i64) -> i64 {
        let id = add(conn, "t", max_attempts);
        let who = Claimant {
            protocol,
            worker_row: row,
            execution_mode: ModeKind::Direct,
        };
        assert_eq!(claim(conn, "t", who).unwrap().unwrap().id, id);
        id
    }

    /// (status, worker_id, started_at is set, error).
    fn job(conn: &Connection, id: i64) -> (JobStatus, Option<i64>, bool, Option<String>) {
        conn.query_row(
            "SELECT status, worker_id, started_at IS NOT NULL, error FROM jobs WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    }

    fn status_of(conn: &Connection, id: i64) -> JobStatus {
        job(conn, id).0
    }

    #[test]
    fn a_gone_workers_job_goes_back_with_the_reason_and_other_jobs_stay_as_they_are() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let w1 = workers::register(&conn, protocol, "t", "w1").unwrap();
            let w2 = workers::register(&conn, protocol, "t", "w2").unwrap();
            let finished = held(&mut conn, protocol, w1, 3);
            conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?1", [finished])
                .unwrap();
            let mine = held(&mut conn, protocol, w1, 3);
            let theirs = held(&mut conn, protocol, w2, 3);

            assert_eq!(
                recover(&conn, Some(w1), "w1", "was killed by SIGKILL").unwrap(),
                (vec![mine], vec![]),
                "{protocol}"
            );
            assert_eq!(
                job(&conn, mine),
                (
                    JobStatus::Pending,
                    None,
                    false,
                    Some("attempt 1: worker w1 was killed by SIGKILL".into())
                ),
                "{protocol}"
            );
            assert_eq!(status_of(&conn, theirs), JobStatus::Processing, "{protocol}");
            assert_eq!(status_of(&conn, finished), JobStatus::Completed, "{protocol}");
            assert_eq!(
                recover(&conn, Some(w1), "w1", "again").unwrap(),
                (vec![], vec![]),
                "{protocol}: nothing twice"
            );
        }
    }

    #[test]
    fn the_job_a_worker_holds_is_its_oldest_processing_one() {
        let mut conn = db(Protocol::Clx);
        let w = workers::register(&conn, Protocol::Clx, "t", "w").unwrap();
        assert_eq!(held_by(&conn, w).unwrap(), None);
        let first = held(&mut conn, Protocol::Clx, w, 3);
        let _second = held(&mut conn, Protocol::Clx, w, 3);
        assert_eq!(held_by(&conn, w).unwrap(), Some(first));
        conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?1", [first])
            .unwrap();
        assert_eq!(held_by(&conn, w).unwrap(), Some(first + 1));
        assert_eq!(held_by(&conn, WorkerRow(w.0 + 1)).unwrap(), None);
    }

    #[test]
    fn burying_a_worker_marks_it_dead_and_a_row_it_never_activated_goes() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let w = workers::register(&conn, protocol, "t", "w").unwrap();
            let last_try = held(&mut conn, protocol, w, 1);
            let (requeued, failed) = bury(&conn, w, "w", "hung").unwrap();
            assert_eq!((requeued, failed), (vec![], vec![last_try]), "{protocol}");
            assert_eq!(
                workers::status(&conn, w).unwrap(),
                Some(WorkerStatus::Dead),
                "{protocol}"
            );
            let (status, _, _, error) = job(&conn, last_try);
            assert_eq!(status, JobStatus::Failed, "{protocol}");
            assert_eq!(
                error.as_deref(),
                Some("gave up after 1 attempts: worker w hung while processing this job"),
                "{protocol}"
            );
        }
        let conn = db(Protocol::Clm);
        let wid = WorkerId("pre".into());
        let pre = workers::preregister(
            &conn,
            &workers::Preregistration {
                worker_type: "t",
                container_id: &wid,
                execution_mode: ModeKind::Direct,
                parent_pid: 42,
            },
        )
        .unwrap();
        bury(&conn, pre, "pre", "did not register").unwrap();
        assert_eq!(workers::status(&conn, pre).unwrap(), None, "CLM's tools never see it");
    }

    #[test]
    fn reconciliation_fails_a_job_with_no_attempts_left_and_says_who_held_it() {
        let mut conn = db(Protocol::Clx);
        let gone = workers::register(&conn, Protocol::Clx, "t", "gone").unwrap();
        let dead = workers::register(&conn, Protocol::Clx, "t", "dead").unwrap();
        let used_up = held(&mut conn, Protocol::Clx, gone, 1);
        let again = held(&mut conn, Protocol::Clx, dead, 3);
        workers::deregister(&conn, gone).unwrap();
        workers::mark_dead(&conn, dead).unwrap();

        let mut found = reconcile(&mut conn, Protocol::Clx, 42).unwrap();
        found.sort_by_key(|r| r.worker_row);
        let summary: Vec<_> = found
            .iter()
            .map(|r| (r.worker_row, r.worker_id.clone(), r.requeued.clone(), r.failed.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some(gone), None, vec![], vec![used_up]),
                (Some(dead), Some("dead".into()), vec![again], vec![]),
            ]
        );
        assert_eq!(
            job(&conn, used_up).3.as_deref(),
            Some(
                "gave up after 1 attempts: worker (unknown) was no longer running (found by the monitor) \
                 while processing this job"
            )
        );
        assert_eq!(
            job(&conn, again).3.as_deref(),
            Some("attempt 1: worker dead was no longer running (found by the monitor)")
        );
        assert!(reconcile(&mut conn, Protocol::Clx, 42).unwrap().is_empty(), "done once");
    }

    #[test]
    fn a_healthy_pool_is_reconciled_without_waiting_for_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let (mut conn, protocol) = crate::db::open(&path, Some(Protocol::Clx)).unwrap();
        let w = workers::register(&conn, protocol, "t", "w").unwrap();
        held(&mut conn, protocol, w, 3);
        // Another writer (a worker recording its result) holds the lock.
        let (mut other, _) = crate::db::open(&path, None).unwrap();
        let lock = other
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        assert!(reconcile(&mut conn, protocol, 42).unwrap().is_empty());
        lock.rollback().unwrap();
    }

    #[test]
    fn a_gone_supervisors_workers_are_buried_but_other_programs_workers_keep_their_jobs() {
        let mut conn = db(Protocol::Clm);
        let old_supervisor = 42;
        let mode = Mode {
            kind: ModeKind::Direct,
            auto: false,
        };
        let slot = SlotId {
            worker_type: "t".into(),
            index: 0,
        };
        let preregister = |conn: &Connection, id: &str| {
            workers::preregister(
                conn,
                &workers::Preregistration {
                    worker_type: "t",
                    container_id: &WorkerId(id.into()),
                    execution_mode: ModeKind::Direct,
                    parent_pid: old_supervisor,
                },
            )
            .unwrap()
        };
        // The pool's: a slot's worker holding a job, an idle persistent
        // worker, a row never activated, a dead row still holding a job.
        let in_slot = workers::register(&conn, Protocol::Clm, "t", "in-slot").unwrap();
        slots::set_slot_state(&conn, &slot, mode, SlotState::Running, None).unwrap();
        slots::slot_launched(&conn, &slot, &WorkerId("in-slot".into()), None).unwrap();
        let slot_job = held(&mut conn, Protocol::Clm, in_slot, 3);
        let idle = preregister(&conn, "idle");
        workers::activate(&conn, idle).unwrap();
        let never = preregister(&conn, "never");
        let dead = preregister(&conn, "dead");
        workers::activate(&conn, dead).unwrap();
        let dead_job = held(&mut conn, Protocol::Clm, dead, 3);
        workers::mark_dead(&conn, dead).unwrap();
        // A `clm build`'s own worker, busy.
        let build = workers::register_remote(&conn, "t", "clm-build", Some(old_supervisor)).unwrap();
        let build_job = held(&mut conn, Protocol::Clm, build, 3);

        let buried = bury_pool_rows(&mut conn, Protocol::Clm, Some(old_supervisor), "the supervisor died").unwrap();
        assert_eq!(buried, (2, 2, 0), "(workers, requeued, failed)");
        for row in [in_slot, idle, dead] {
            assert_eq!(workers::status(&conn, row).unwrap(), Some(WorkerStatus::Dead));
        }
        assert_eq!(workers::status(&conn, never).unwrap(), None);
        assert_eq!(workers::status(&conn, build).unwrap(), Some(WorkerStatus::Busy));
        assert_eq!(status_of(&conn, slot_job), JobStatus::Pending);
        assert_eq!(status_of(&conn, dead_job), JobStatus::Pending);
        assert_eq!(
            job(&conn, build_job).0,
            JobStatus::Processing,
            "another program's job is left alone"
        );
        assert_eq!(job(&conn, build_job).1, Some(build.0));
    }

    #[test]
    fn in_a_clx_database_every_worker_belongs_to_the_gone_pool() {
        let mut conn = db(Protocol::Clx);
        let a = workers::register(&conn, Protocol::Clx, "t", "a").unwrap();
        let b = workers::register(&conn, Protocol::Clx, "t", "b").unwrap();
        let c = workers::register(&conn, Protocol::Clx, "t", "c").unwrap();
        let back = held(&mut conn, Protocol::Clx, a, 3);
        let spent = held(&mut conn, Protocol::Clx, b, 1);
        workers::mark_dead(&conn, c).unwrap();
        assert_eq!(
            bury_pool_rows(&mut conn, Protocol::Clx, None, "crashed").unwrap(),
            (2, 1, 1)
        );
        for row in [a, b, c] {
            assert_eq!(workers::status(&conn, row).unwrap(), Some(WorkerStatus::Dead));
        }
        assert_eq!(
            (status_of(&conn, back), status_of(&conn, spent)),
            (JobStatus::Pending, JobStatus::Failed)
        );
        assert_eq!(job(&conn, back).3.as_deref(), Some("attempt 1: worker a crashed"));
    }
}
