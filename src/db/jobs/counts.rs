//! What is counted of the `jobs` table: jobs per status (of the current run
//! or all), per type with the oldest one's age, the run's failures, and
//! the jobs completed or failed lately (for the metrics and `on_event`).

use rusqlite::Connection;
use serde::Serialize;

use super::SHOWN_STATUS;
use crate::vocab::JobStatus;

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

/// Per-status counts of the jobs of the run that began at `since` (all
/// jobs without it), cancelled CLX jobs counted as cancelled.
pub fn run_counts(conn: &Connection, since: Option<&str>) -> rusqlite::Result<crate::db::jobs::JobCounts> {
    let Some(since) = since else {
        return crate::db::jobs::JobCounts::from_rows(
            &mut conn.prepare(&format!("SELECT {SHOWN_STATUS}, COUNT(*) FROM jobs GROUP BY 1"))?,
            [],
        );
    };
    // COALESCE(completed_at, started_at, created_at) >= ?1 for finished
    // jobs, spelled as disjoint ranges of indexes (status; completed_at) so
    // that a monitor tick does not read the whole history (`+status` keeps
    // the planner off the status index where completed_at narrows more).
    crate::db::jobs::JobCounts::from_rows(
        &mut conn.prepare(&format!(
            "SELECT {SHOWN_STATUS}, COUNT(*) FROM (
                 SELECT status, error FROM jobs WHERE status IN ('pending', 'processing')
                 UNION ALL
                 SELECT status, error FROM jobs
                 WHERE +status NOT IN ('pending', 'processing') AND completed_at >= ?1
                 UNION ALL
                 SELECT status, error FROM jobs
                 WHERE +status NOT IN ('pending', 'processing') AND completed_at IS NULL
                   AND COALESCE(started_at, created_at) >= ?1)
             GROUP BY 1"
        ))?,
        [since],
    )
}

/// How many jobs of a type have a status, and the age of the oldest.
#[derive(Debug, Clone)]
pub struct TypeCount {
    pub job_type: String,
    pub status: JobStatus,
    pub count: i64,
    /// Seconds since the oldest of them was created.
    pub oldest_age: Option<f64>,
}

/// Jobs per type and status (as shown), for metrics.
pub fn by_type(conn: &Connection) -> rusqlite::Result<Vec<TypeCount>> {
    conn.prepare(&format!(
        "SELECT job_type, {SHOWN_STATUS}, COUNT(*), (julianday('now') - julianday(MIN(created_at))) * 86400.0
         FROM jobs GROUP BY 1, 2 ORDER BY 1, 2"
    ))?
    .query_map([], |r| {
        Ok(TypeCount {
            job_type: r.get(0)?,
            status: r.get(1)?,
            count: r.get(2)?,
            oldest_age: r.get(3)?,
        })
    })?
    .collect()
}

/// Jobs completed at or after `since` (those of the current run when
/// None), oldest first: (id, type, seconds from claim to completion,
/// completion time).
/// (`+status`: the completed_at index narrows to the new ones; the status
/// index would read every completed job.)
pub fn completed_since(c: &mut Connection, since: Option<&str>) -> rusqlite::Result<Vec<(i64, String, f64, String)>> {
    c.prepare_cached(
        "SELECT id, job_type, MAX(0.0, (julianday(completed_at) - julianday(started_at)) * 86400.0), completed_at
         FROM jobs
         WHERE +status = 'completed' AND completed_at IS NOT NULL AND started_at IS NOT NULL
           AND completed_at >= COALESCE(?1, (SELECT started_at FROM clx_pool_supervisor WHERE id = 1), '')
         ORDER BY completed_at, id LIMIT 10000",
    )?
    .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
    .collect()
}

/// Jobs that failed for good in the last hour: (id, type, error).
pub fn recently_failed(c: &mut Connection) -> rusqlite::Result<Vec<(i64, String, Option<String>)>> {
    c.prepare_cached(
        "SELECT id, job_type, error FROM jobs
         WHERE status = 'failed' AND COALESCE(completed_at, started_at) >= datetime('now', '-1 hour')
           AND error IS NOT 'cancelled (clx-pool jobs cancel)'
         ORDER BY id DESC LIMIT 100",
    )?
    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
    .collect()
}
