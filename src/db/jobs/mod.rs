//! The `jobs` table: every statement that writes it. The queue as workers
//! use it — submitting, claiming, finishing, giving back and recovering
//! jobs ([`self`]); as people and CI scripts handle it ([`admin`]); and
//! what is counted of it ([`counts`]). Every state change is one guarded
//! statement or transaction, so two workers never get the same job and a
//! late write from a worker that was declared dead never overwrites the
//! outcome of a later attempt.

pub mod admin;
pub mod counts;
pub mod recovery;

use rusqlite::{Connection, OptionalExtension, params};

pub use counts::JobCounts;
pub use recovery::{Reconciled, bury, bury_pool_rows, held_by, reconcile, recover};

use std::sync::LazyLock;

use crate::db::{cache, lit, workers};
use crate::vocab::{JobStatus, ModeKind, Protocol, WorkerRow, WorkerStatus};

/// The error a cancelled CLX job carries (see the module's note).
pub const CANCELLED: &str = "cancelled (clx-pool jobs cancel)";

/// The status as shown, an SQL expression: a CLX job failed with
/// [`CANCELLED`] is cancelled.
pub(crate) fn shown_status() -> &'static str {
    static SHOWN: LazyLock<String> = LazyLock::new(|| {
        format!(
            "CASE WHEN status = {failed} AND error = {cancelled_error} THEN {cancelled} ELSE status END",
            failed = lit(JobStatus::Failed),
            cancelled_error = lit(CANCELLED),
            cancelled = lit(JobStatus::Cancelled)
        )
    });
    &SHOWN
}

/// The statuses of jobs not finished yet.
pub(crate) const OPEN: [JobStatus; 2] = [JobStatus::Pending, JobStatus::Processing];

/// A job as a worker sees it after claiming it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: i64,
    pub input_file: String,
    pub output_file: String,
    pub content_hash: String,
    pub payload: String,
    /// The attempt number this claim is (1 for the first).
    pub attempt: i64,
}

pub struct NewJob<'a> {
    pub job_type: &'a str,
    pub input_file: &'a str,
    pub output_file: &'a str,
    pub content_hash: &'a str,
    pub payload: &'a str,
    pub priority: i64,
    pub max_attempts: i64,
}

pub fn submit(conn: &Connection, job: &NewJob) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO jobs (job_type, status, priority, input_file, output_file, content_hash, payload, max_attempts)
         VALUES (?1, ?8, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            job.job_type,
            job.priority,
            job.input_file,
            job.output_file,
            job.content_hash,
            job.payload,
            job.max_attempts,
            JobStatus::Pending
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Who claims a job: the worker's row, and under CLM the execution mode it
/// runs in (a job tagged for the other mode is not its to take).
#[derive(Debug, Clone, Copy)]
pub struct Claimant {
    pub protocol: Protocol,
    pub worker_row: WorkerRow,
    pub execution_mode: ModeKind,
}

/// Claims the oldest highest-priority pending job of `job_type` for the
/// claimant, marking the worker busy in the same transaction. The
/// pending-job lookup is a plain read, so idle polling takes no write lock.
/// Under CLM it follows CLM's own rules: jobs tagged for another execution
/// mode are left alone, and a worker whose session is set takes only that
/// session's jobs (or untagged ones).
pub fn claim(conn: &mut Connection, job_type: &str, who: Claimant) -> rusqlite::Result<Option<ClaimedJob>> {
    let worker_row = who.worker_row;
    loop {
        let candidate = candidate(conn, job_type, who)?;
        let Some(id) = candidate else { return Ok(None) };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let job = take(&tx, id, worker_row)?;
        tx.commit()?;
        if job.is_some() {
            return Ok(job);
        }
        // Another worker took it between our read and our write: look again.
    }
}

/// The candidate job for `who` (none for a worker declared dead): a read,
/// for a look inside a transaction of the caller's; `claim` takes it.
pub fn candidate(conn: &Connection, job_type: &str, who: Claimant) -> rusqlite::Result<Option<i64>> {
    match who.protocol {
        Protocol::Clx => conn
            .prepare_cached(
                "SELECT id FROM jobs
                 WHERE status = ?2 AND job_type = ?1
                   AND COALESCE(attempts, 0) < COALESCE(max_attempts, 3)
                   AND NOT EXISTS (SELECT 1 FROM workers WHERE id = ?3 AND status = ?4)
                 ORDER BY priority DESC, created_at, id LIMIT 1",
            )?
            .query_row(
                params![job_type, JobStatus::Pending, who.worker_row, WorkerStatus::Dead],
                |r| r.get(0),
            )
            .optional(),
        Protocol::Clm => conn
            .prepare_cached(
                "SELECT id FROM jobs
                 WHERE status = ?4 AND job_type = ?1
                   AND COALESCE(attempts, 0) < COALESCE(max_attempts, 3)
                   AND (execution_mode IS NULL OR execution_mode = ?2)
                   AND (session_id IS NULL
                        OR session_id IS (SELECT session_id FROM workers WHERE id = ?3)
                        OR (SELECT session_id FROM workers WHERE id = ?3) IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM workers WHERE id = ?3 AND status = ?5)
                 ORDER BY priority DESC, created_at, id LIMIT 1",
            )?
            .query_row(
                params![
                    job_type,
                    who.execution_mode,
                    who.worker_row,
                    JobStatus::Pending,
                    WorkerStatus::Dead
                ],
                |r| r.get(0),
            )
            .optional(),
    }
}

/// Marks job `id` as the worker's, if it is still pending and the worker
/// is not dead (inside a write transaction), and the worker busy. A worker
/// declared dead takes nothing: nobody would put its job back while the
/// pool runs.
fn take(tx: &Connection, id: i64, worker_row: WorkerRow) -> rusqlite::Result<Option<ClaimedJob>> {
    let job = super::returning_one(
        &mut *tx.prepare_cached(
            "UPDATE jobs SET status = ?3, started_at = CURRENT_TIMESTAMP,
                    worker_id = ?2, attempts = COALESCE(attempts, 0) + 1, completed_at = NULL
             WHERE id = ?1 AND status = ?4
               AND NOT EXISTS (SELECT 1 FROM workers WHERE id = ?2 AND status = ?5)
             RETURNING id, input_file, output_file, content_hash, payload, attempts",
        )?,
        params![
            id,
            worker_row,
            JobStatus::Processing,
            JobStatus::Pending,
            WorkerStatus::Dead
        ],
        |r| {
            Ok(ClaimedJob {
                id: r.get(0)?,
                input_file: r.get(1)?,
                output_file: r.get(2)?,
                content_hash: r.get(3)?,
                payload: r.get(4)?,
                attempt: r.get(5)?,
            })
        },
    )?;
    if job.is_some() {
        workers::set_busy(tx, worker_row)?;
    }
    Ok(job)
}

/// When a finished job finished, as SQL: under CLM a cancelled job has
/// only `cancelled_at` (CLM's own cancel sets no `completed_at`).
pub fn finished_at(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Clx => "COALESCE(completed_at, started_at, created_at)",
        Protocol::Clm => "COALESCE(completed_at, cancelled_at, started_at, created_at)",
    }
}

/// Outcome of one job run, as the worker saw it.
pub enum Outcome<'a> {
    Completed,
    Failed(&'a str),
}

/// Records a job's outcome and sets the worker idle with fresh statistics.
/// Returns false when the job was no longer this worker's (it was declared
/// dead or hung meanwhile and the job was given to another attempt).
pub fn finish(
    conn: &mut Connection,
    job: &ClaimedJob,
    worker_row: WorkerRow,
    outcome: Outcome,
    seconds: f64,
) -> rusqlite::Result<bool> {
    finish_and_claim(conn, job, worker_row, outcome, seconds, None).map(|(recorded, _)| recorded)
}

/// [`finish`], and in the same transaction the claim of the next job of
/// `next` (a job type and claimant), if one waits: one write transaction
/// per job instead of two.
pub fn finish_and_claim(
    conn: &mut Connection,
    job: &ClaimedJob,
    worker_row: WorkerRow,
    outcome: Outcome,
    seconds: f64,
    next: Option<(&str, Claimant)>,
) -> rusqlite::Result<(bool, Option<ClaimedJob>)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (status, error) = match outcome {
        Outcome::Completed => (JobStatus::Completed, None),
        Outcome::Failed(e) => (JobStatus::Failed, Some(e)),
    };
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET status = ?1, completed_at = CURRENT_TIMESTAMP, error = ?2
         WHERE id = ?3 AND worker_id = ?4 AND status = ?6 AND attempts = ?5",
        )?
        .execute(params![
            status,
            error,
            job.id,
            worker_row,
            job.attempt,
            JobStatus::Processing
        ])?;
    if changed == 1 && status == JobStatus::Completed {
        cache::remember(&tx, job)?;
    }
    workers::count_outcome(&tx, worker_row, status == JobStatus::Completed, seconds)?;
    let claimed = match next {
        Some((job_type, who)) => match candidate(&tx, job_type, who)? {
            Some(id) => take(&tx, id, worker_row)?,
            None => None,
        },
        None => None,
    };
    tx.commit()?;
    Ok((changed == 1, claimed))
}

/// Whether `job` is still this worker's attempt and `processing` (not
/// cancelled, not given to another attempt).
pub fn still_mine(conn: &Connection, job: &ClaimedJob, worker_row: WorkerRow) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT COUNT(*) FROM jobs WHERE id = ?1 AND worker_id = ?2 AND status = ?4 AND attempts = ?3")?
        .query_row(params![job.id, worker_row, job.attempt, JobStatus::Processing], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n == 1)
}

/// Gives a job back to the queue without counting the attempt (the worker
/// is shutting down; the job did nothing wrong).
pub fn give_back(conn: &Connection, job: &ClaimedJob, worker_row: WorkerRow) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET status = ?4, started_at = NULL, worker_id = NULL, attempts = attempts - 1
         WHERE id = ?1 AND worker_id = ?2 AND status = ?5 AND attempts = ?3",
        params![
            job.id,
            worker_row,
            job.attempt,
            JobStatus::Pending,
            JobStatus::Processing
        ],
    )?;
    Ok(n == 1)
}

/// A worker's finished job, as it reports it.
pub struct Report<'a> {
    pub job_id: i64,
    pub worker_row: WorkerRow,
    /// `Completed` or `Failed`.
    pub status: JobStatus,
    /// JSON text, or None.
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Records a reported outcome, as CLM's `update_job_status` does (completed:
/// `completed_at`, no error, the result; failed: the error and the result),
/// but only while the job is still this worker's and `processing`: a worker
/// declared dead meanwhile cannot overwrite a later attempt, nor a
/// cancelled job. Sets the worker idle with fresh statistics in the same
/// transaction. Returns whether the job was the worker's to report.
pub fn report(conn: &mut Connection, r: &Report) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seconds: Option<f64> = tx
        .query_row(
            "SELECT (julianday('now') - julianday(started_at)) * 86400.0 FROM jobs
             WHERE id = ?1 AND worker_id = ?2 AND status = ?3",
            params![r.job_id, r.worker_row, JobStatus::Processing],
            |row| row.get(0),
        )
        .optional()?
        .flatten();
    let changed = match r.status {
        JobStatus::Completed => tx.execute(
            "UPDATE jobs SET status = ?4, completed_at = CURRENT_TIMESTAMP, error = NULL, result = ?3
             WHERE id = ?1 AND worker_id = ?2 AND status = ?5",
            params![
                r.job_id,
                r.worker_row,
                r.result,
                JobStatus::Completed,
                JobStatus::Processing
            ],
        )?,
        _ => tx.execute(
            "UPDATE jobs SET status = ?5, error = ?3, result = ?4
             WHERE id = ?1 AND worker_id = ?2 AND status = ?6",
            params![
                r.job_id,
                r.worker_row,
                r.error,
                r.result,
                JobStatus::Failed,
                JobStatus::Processing
            ],
        )?,
    };
    if changed == 1 {
        workers::count_outcome(
            &tx,
            r.worker_row,
            r.status == JobStatus::Completed,
            seconds.unwrap_or(0.0),
        )?;
    }
    tx.commit()?;
    Ok(changed == 1)
}

/// A CLM job's correlation id (for the worker's logs).
pub fn correlation_id(conn: &Connection, job_id: i64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT correlation_id FROM jobs WHERE id = ?1")?
        .query_row([job_id], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// Fails a claimed job the API cannot hand out (its payload is not JSON),
/// so it is not left `processing`.
pub fn fail_unservable(conn: &Connection, job_id: i64, worker_row: WorkerRow, error: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE jobs SET status = ?4, completed_at = CURRENT_TIMESTAMP, error = ?3
         WHERE id = ?1 AND worker_id = ?2 AND status = ?5",
        params![job_id, worker_row, error, JobStatus::Failed, JobStatus::Processing],
    )?;
    workers::release(conn, worker_row)?;
    Ok(())
}

/// What `GET /jobs/{id}/cancelled` tells: None when there is no such job.
pub struct Cancellation {
    pub cancelled: bool,
    pub cancelled_at: Option<String>,
    pub cancelled_by: Option<String>,
}

pub fn cancellation(conn: &Connection, job_id: i64) -> rusqlite::Result<Option<Cancellation>> {
    conn.prepare_cached("SELECT status, cancelled_at, cancelled_by FROM jobs WHERE id = ?1")?
        .query_row([job_id], |r| {
            Ok(Cancellation {
                cancelled: r.get::<_, JobStatus>(0)? == JobStatus::Cancelled,
                cancelled_at: r.get(1)?,
                cancelled_by: r.get(2)?,
            })
        })
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{schema, workers};

    fn queue() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        schema::prepare(&conn, None).unwrap();
        conn
    }

    fn clx(worker_row: WorkerRow) -> Claimant {
        Claimant {
            protocol: Protocol::Clx,
            worker_row,
            execution_mode: ModeKind::Direct,
        }
    }

    fn job<'a>(job_type: &'a str, input: &'a str, priority: i64) -> NewJob<'a> {
        NewJob {
            job_type,
            input_file: input,
            output_file: "out",
            content_hash: "h",
            payload: "{}",
            priority,
            max_attempts: 2,
        }
    }

    #[test]
    fn claims_by_priority_then_age_and_only_own_type() {
        let mut conn = queue();
        let w = workers::register(&conn, Protocol::Clx, "t", "w1").unwrap();
        submit(&conn, &job("t", "a", 0)).unwrap();
        submit(&conn, &job("t", "b", 5)).unwrap();
        submit(&conn, &job("other", "c", 9)).unwrap();
        assert_eq!(claim(&mut conn, "t", clx(w)).unwrap().unwrap().input_file, "b");
        assert_eq!(claim(&mut conn, "t", clx(w)).unwrap().unwrap().input_file, "a");
        assert!(claim(&mut conn, "t", clx(w)).unwrap().is_none());
    }

    #[test]
    fn recovery_requeues_then_fails_and_blocks_late_writes() {
        let mut conn = queue();
        let w1 = workers::register(&conn, Protocol::Clx, "t", "w1").unwrap();
        let w2 = workers::register(&conn, Protocol::Clx, "t", "w2").unwrap();
        let id = submit(&conn, &job("t", "a", 0)).unwrap();
        let first = claim(&mut conn, "t", clx(w1)).unwrap().unwrap();
        assert_eq!(
            recover(&conn, Some(w1), "w1", "was killed").unwrap(),
            (vec![id], vec![])
        );
        let second = claim(&mut conn, "t", clx(w2)).unwrap().unwrap();
        assert_eq!(second.attempt, 2);
        // The first worker's late write must not count.
        assert!(!finish(&mut conn, &first, w1, Outcome::Completed, 0.1).unwrap());
        assert_eq!(
            recover(&conn, Some(w2), "w2", "was killed").unwrap(),
            (vec![], vec![id])
        );
        let (status, error): (String, String) = conn
            .query_row("SELECT status, error FROM jobs WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(status, "failed");
        assert!(
            error.contains("gave up after 2 attempts: worker w2 was killed"),
            "{error}"
        );
    }

    #[test]
    fn reconciliation_takes_back_only_jobs_of_workers_known_dead() {
        // (holder, its row's status or None for a row that is gone, whose
        // row: the pool's (parent 42) or another program's; put back under
        // CLX, under CLM)
        let cases = [
            ("pool worker, live", Some("busy"), 42, false, false),
            ("worker run by hand, live", Some("busy"), 7, false, false),
            ("pool worker, dead", Some("dead"), 42, true, true),
            ("another program's worker, dead", Some("dead"), 7, true, false),
            ("a row that is gone", None, 42, true, false),
        ];
        for protocol in Protocol::ALL.iter().copied() {
            for (name, status, parent, clx_back, clm_back) in cases {
                let mut conn = Connection::open_in_memory().unwrap();
                // As every connection of the workers and the supervisor.
                conn.pragma_update(None, "foreign_keys", false).unwrap();
                schema::prepare(&conn, Some(protocol)).unwrap();
                let w = workers::register(&conn, protocol, "t", "w").unwrap();
                let id = submit(&conn, &job("t", "a", 0)).unwrap();
                claim(&mut conn, "t", clx_or_clm(protocol, w)).unwrap().unwrap();
                // Claimed long ago: age is no evidence either way.
                conn.execute("UPDATE jobs SET started_at = datetime('now', '-1 day')", [])
                    .unwrap();
                if protocol == Protocol::Clm {
                    conn.execute(
                        "UPDATE workers SET managed_by = 'persistent', parent_pid = ?1",
                        [parent],
                    )
                    .unwrap();
                }
                match status {
                    Some(s) => conn.execute("UPDATE workers SET status = ?1", [s]).unwrap(),
                    None => conn.execute("DELETE FROM workers", []).unwrap(),
                };
                let found = reconcile(&mut conn, protocol, 42).unwrap();
                let want = if protocol == Protocol::Clx { clx_back } else { clm_back };
                let back: Vec<i64> = found.iter().flat_map(|r| r.requeued.clone()).collect();
                assert_eq!(back, if want { vec![id] } else { vec![] }, "{protocol}: {name}");
            }
        }
    }

    fn clx_or_clm(protocol: Protocol, worker_row: WorkerRow) -> Claimant {
        Claimant {
            protocol,
            worker_row,
            execution_mode: ModeKind::Direct,
        }
    }

    #[test]
    fn claiming_is_an_index_lookup_for_clx_pool_and_the_python_workers() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = Connection::open_in_memory().unwrap();
            schema::prepare(&conn, Some(protocol)).unwrap();
            let ours = "SELECT id FROM jobs WHERE status = 'pending' AND job_type = 't'
                          AND COALESCE(attempts, 0) < COALESCE(max_attempts, 3)
                        ORDER BY priority DESC, created_at, id LIMIT 1";
            // The claim of CLX's Python workers and CLM's JobQueue.
            let theirs = "SELECT * FROM jobs WHERE status = 'pending' AND job_type = 't'
                            AND attempts < max_attempts ORDER BY priority DESC, created_at ASC LIMIT 1";
            for sql in [ours, theirs] {
                let plan: Vec<String> = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .unwrap()
                    .query_map([], |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let plan = plan.join(" / ");
                assert!(plan.contains("USING INDEX clx_pool_jobs_claim"), "{protocol}: {plan}");
                assert!(!plan.contains("TEMP B-TREE"), "{protocol}: no sort: {plan}");
            }
        }
    }
}
