//! The CLX job queue: submitting, claiming, finishing and recovering jobs.
//! Every state change is one guarded statement or transaction, so two
//! workers never get the same job and a late write from a worker that was
//! declared dead never overwrites the outcome of a later attempt.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::vocab::{JobStatus, ModeKind, Protocol, WorkerRow};

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
         VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            job.job_type,
            job.priority,
            job.input_file,
            job.output_file,
            job.content_hash,
            job.payload,
            job.max_attempts
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

/// The candidate job for `who`, read inside the caller's transaction.
fn candidate(conn: &Connection, job_type: &str, who: Claimant) -> rusqlite::Result<Option<i64>> {
    match who.protocol {
        Protocol::Clx => conn
            .prepare_cached(
                "SELECT id FROM jobs
                 WHERE status = 'pending' AND job_type = ?1
                   AND COALESCE(attempts, 0) < COALESCE(max_attempts, 3)
                 ORDER BY priority DESC, created_at, id LIMIT 1",
            )?
            .query_row([job_type], |r| r.get(0))
            .optional(),
        Protocol::Clm => conn
            .prepare_cached(
                "SELECT id FROM jobs
                 WHERE status = 'pending' AND job_type = ?1
                   AND COALESCE(attempts, 0) < COALESCE(max_attempts, 3)
                   AND (execution_mode IS NULL OR execution_mode = ?2)
                   AND (session_id IS NULL
                        OR session_id IS (SELECT session_id FROM workers WHERE id = ?3)
                        OR (SELECT session_id FROM workers WHERE id = ?3) IS NULL)
                 ORDER BY priority DESC, created_at, id LIMIT 1",
            )?
            .query_row(params![job_type, who.execution_mode, who.worker_row], |r| r.get(0))
            .optional(),
    }
}

/// Marks job `id` as the worker's, if it is still pending (inside a
/// write transaction), and the worker busy.
fn take(tx: &Connection, id: i64, worker_row: WorkerRow) -> rusqlite::Result<Option<ClaimedJob>> {
    let job = super::returning_one(
        &mut *tx.prepare_cached(
            "UPDATE jobs SET status = 'processing', started_at = CURRENT_TIMESTAMP,
                    worker_id = ?2, attempts = COALESCE(attempts, 0) + 1, completed_at = NULL
             WHERE id = ?1 AND status = 'pending'
             RETURNING id, input_file, output_file, content_hash, payload, attempts",
        )?,
        params![id, worker_row],
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
        tx.prepare_cached("UPDATE workers SET status = 'busy', last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1")?
            .execute([worker_row])?;
    }
    Ok(job)
}

/// A worker's figures after a job (done or failed, its time into the
/// average), and the worker idle again.
pub(super) fn count_outcome(
    tx: &Connection,
    worker_row: WorkerRow,
    completed: bool,
    seconds: f64,
) -> rusqlite::Result<()> {
    let (done, failed) = if completed { (1, 0) } else { (0, 1) };
    tx.prepare_cached(
        "UPDATE workers SET
            status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END,
            last_heartbeat = CURRENT_TIMESTAMP,
            avg_processing_time = (COALESCE(avg_processing_time, 0) * (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0)) + ?2)
                                  / (COALESCE(jobs_processed, 0) + COALESCE(jobs_failed, 0) + 1),
            jobs_processed = COALESCE(jobs_processed, 0) + ?3,
            jobs_failed = COALESCE(jobs_failed, 0) + ?4
         WHERE id = ?1",
    )?
    .execute(params![worker_row, seconds, done, failed])?;
    Ok(())
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
         WHERE id = ?3 AND worker_id = ?4 AND status = 'processing' AND attempts = ?5",
        )?
        .execute(params![status, error, job.id, worker_row, job.attempt])?;
    if changed == 1 && status == JobStatus::Completed {
        tx.prepare_cached(
            "INSERT INTO results_cache (output_file, content_hash, result_metadata)
             VALUES (?1, ?2, ?3)
             ON CONFLICT(output_file, content_hash) DO UPDATE SET
                 last_accessed = CURRENT_TIMESTAMP, result_metadata = excluded.result_metadata",
        )?
        .execute(params![
            job.output_file,
            job.content_hash,
            format!("{{\"job_id\": {}}}", job.id)
        ])?;
    }
    count_outcome(&tx, worker_row, status == JobStatus::Completed, seconds)?;
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
    conn.prepare_cached(
        "SELECT COUNT(*) FROM jobs WHERE id = ?1 AND worker_id = ?2 AND status = 'processing' AND attempts = ?3",
    )?
    .query_row(params![job.id, worker_row, job.attempt], |r| r.get::<_, i64>(0))
    .map(|n| n == 1)
}

/// Gives a job back to the queue without counting the attempt (the worker
/// is shutting down; the job did nothing wrong).
pub fn give_back(conn: &Connection, job: &ClaimedJob, worker_row: WorkerRow) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET status = 'pending', started_at = NULL, worker_id = NULL, attempts = attempts - 1
         WHERE id = ?1 AND worker_id = ?2 AND status = 'processing' AND attempts = ?3",
        params![job.id, worker_row, job.attempt],
    )?;
    Ok(n == 1)
}

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

/// Job counts per status (every status always present; `cancelled` is
/// always 0 in a CLX database).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct JobCounts {
    pub pending: i64,
    pub processing: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl JobCounts {
    /// Adds `n` jobs of `status`.
    pub fn add(&mut self, status: JobStatus, n: i64) {
        *match status {
            JobStatus::Pending => &mut self.pending,
            JobStatus::Processing => &mut self.processing,
            JobStatus::Completed => &mut self.completed,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        } += n;
    }

    /// Counts from rows of (status, count).
    pub fn from_rows(stmt: &mut rusqlite::Statement, params: impl rusqlite::Params) -> rusqlite::Result<JobCounts> {
        let mut c = JobCounts::default();
        for row in stmt.query_map(params, |r| Ok((r.get::<_, JobStatus>(0)?, r.get::<_, i64>(1)?)))? {
            let (status, n) = row?;
            c.add(status, n);
        }
        Ok(c)
    }
}

pub fn counts(conn: &Connection, job_type: Option<&str>) -> rusqlite::Result<JobCounts> {
    JobCounts::from_rows(
        &mut conn.prepare("SELECT status, COUNT(*) FROM jobs WHERE ?1 IS NULL OR job_type = ?1 GROUP BY status")?,
        [job_type],
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub job_type: String,
    pub status: JobStatus,
    pub input_file: String,
    pub output_file: String,
    pub attempts: i64,
    pub error: Option<String>,
}

/// Jobs in `status`, oldest first, for listings.
pub fn list(conn: &Connection, status: Option<JobStatus>, limit: i64) -> rusqlite::Result<Vec<JobRow>> {
    conn.prepare(
        "SELECT id, job_type, status, input_file, output_file, COALESCE(attempts, 0), error FROM jobs
         WHERE ?1 IS NULL OR status = ?1 ORDER BY id LIMIT ?2",
    )?
    .query_map(params![status, limit], |r| {
        Ok(JobRow {
            id: r.get(0)?,
            job_type: r.get(1)?,
            status: r.get(2)?,
            input_file: r.get(3)?,
            output_file: r.get(4)?,
            attempts: r.get(5)?,
            error: r.get(6)?,
        })
    })?
    .collect()
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
