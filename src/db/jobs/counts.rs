//! What is counted of the `jobs` table: jobs per status (of the current run
//! or all), per type with the oldest one's age, the run's failures, and
//! the jobs completed or failed lately (for the metrics and `on_event`).

use rusqlite::Connection;
use serde::Serialize;

use super::{CANCELLED, OPEN, shown_status};
use crate::db::lits;
use crate::vocab::{JobStatus, Protocol};

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
pub fn run_counts(
    conn: &Connection,
    protocol: Protocol,
    since: Option<&str>,
) -> rusqlite::Result<crate::db::jobs::JobCounts> {
    let Some(since) = since else {
        return crate::db::jobs::JobCounts::from_rows(
            &mut conn.prepare(&format!("SELECT {}, COUNT(*) FROM jobs GROUP BY 1", shown_status()))?,
            [],
        );
    };
    // finished_at >= ?1 for finished jobs, spelled as disjoint ranges of indexes (status; completed_at) so
    // that a monitor tick does not read the whole history (`+status` keeps
    // the planner off the status index where completed_at narrows more).
    crate::db::jobs::JobCounts::from_rows(
        &mut conn.prepare(&format!(
            "SELECT {shown}, COUNT(*) FROM (
                 SELECT status, error FROM jobs WHERE status IN ({open})
                 UNION ALL
                 SELECT status, error FROM jobs
                 WHERE +status NOT IN ({open}) AND completed_at >= ?1
                 UNION ALL
                 SELECT status, error FROM jobs
                 WHERE +status NOT IN ({open}) AND completed_at IS NULL
                   AND {finished} >= ?1)
             GROUP BY 1",
            shown = shown_status(),
            open = lits(&OPEN),
            finished = super::finished_at(protocol),
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
        "SELECT job_type, {shown}, COUNT(*), (julianday('now') - julianday(MIN(created_at))) * 86400.0
         FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
        shown = shown_status()
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
         WHERE +status = ?2 AND completed_at IS NOT NULL AND started_at IS NOT NULL
           AND completed_at >= COALESCE(?1, (SELECT started_at FROM clx_pool_supervisor WHERE id = 1), '')
         ORDER BY completed_at, id LIMIT 10000",
    )?
    .query_map(rusqlite::params![since, JobStatus::Completed], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?
    .collect()
}

/// Jobs that failed for good in the last hour: (id, type, error).
pub fn recently_failed(c: &mut Connection) -> rusqlite::Result<Vec<(i64, String, Option<String>)>> {
    c.prepare_cached(
        "SELECT id, job_type, error FROM jobs
         WHERE status = ?1 AND COALESCE(completed_at, started_at) >= datetime('now', '-1 hour')
           AND error IS NOT ?2
         ORDER BY id DESC LIMIT 100",
    )?
    .query_map(rusqlite::params![JobStatus::Failed, CANCELLED], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fixture::add_job;
    use crate::db::fixture::memory_db as db;
    use crate::db::jobs::admin::{self, Filter};

    use crate::db::supervisor;
    use crate::vocab::Protocol;

    fn add(conn: &Connection, job_type: &str) -> i64 {
        add_job(conn, job_type, 3)
    }

    /// Sets a job's columns (SQL expressions, as written).
    fn set(conn: &Connection, id: i64, assignments: &str) {
        conn.execute(&format!("UPDATE jobs SET {assignments} WHERE id = ?1"), [id])
            .unwrap();
    }

    fn cancel(conn: &mut Connection, protocol: Protocol, id: i64) {
        let one = Filter {
            ids: vec![id],
            ..Filter::default()
        };
        assert_eq!(admin::cancel(conn, protocol, &one).unwrap(), vec![id]);
    }

    #[test]
    fn jobs_per_type_and_status_tell_the_age_of_the_oldest_and_show_cancellations() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let old = add(&conn, "notebook");
            set(&conn, old, "created_at = datetime('now', '-1 hour')");
            add(&conn, "notebook");
            let done = add(&conn, "drawio");
            set(&conn, done, "status = 'completed'");
            let cancelled = add(&conn, "drawio");
            cancel(&mut conn, protocol, cancelled);

            let rows: Vec<(String, JobStatus, i64)> = by_type(&conn)
                .unwrap()
                .into_iter()
                .map(|t| (t.job_type, t.status, t.count))
                .collect();
            assert_eq!(
                rows,
                vec![
                    ("drawio".into(), JobStatus::Cancelled, 1),
                    ("drawio".into(), JobStatus::Completed, 1),
                    ("notebook".into(), JobStatus::Pending, 2),
                ],
                "{protocol}"
            );
            let pending = by_type(&conn).unwrap().pop().unwrap();
            let age = pending.oldest_age.unwrap();
            assert!(
                (3590.0..3700.0).contains(&age),
                "{protocol}: the oldest is an hour old, not {age}"
            );
        }
    }

    #[test]
    fn a_waiting_job_cancelled_during_the_run_stays_in_the_runs_counts_under_both_protocols() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let waiting = add(&conn, "t");
            set(&conn, waiting, "created_at = '2000-01-01 00:00:00'");
            let since = "2020-01-01 00:00:00";
            assert_eq!(
                run_counts(&conn, protocol, Some(since)).unwrap().pending,
                1,
                "{protocol}"
            );
            cancel(&mut conn, protocol, waiting);
            let c = run_counts(&conn, protocol, Some(since)).unwrap();
            assert_eq!((c.pending, c.cancelled, c.failed), (0, 1, 0), "{protocol}");
        }
    }

    #[test]
    fn the_completed_jobs_of_the_current_run_come_oldest_first_with_their_run_time() {
        let mut conn = db(Protocol::Clx);
        let job = |conn: &Connection, status: &str, started: &str, completed: &str| {
            let id = add(conn, "t");
            set(
                conn,
                id,
                &format!("status = '{status}', started_at = '{started}', completed_at = '{completed}'"),
            );
            id
        };
        let before = job(&conn, "completed", "2010-01-01 00:00:00", "2010-01-01 00:00:05");
        let late = job(&conn, "completed", "2030-01-01 00:01:00", "2030-01-01 00:01:30");
        let early = job(&conn, "completed", "2030-01-01 00:00:00", "2030-01-01 00:00:02");
        // A clock step backwards during the job: no negative time.
        let stepped = job(&conn, "completed", "2030-01-01 00:03:00", "2030-01-01 00:02:00");
        job(&conn, "failed", "2030-01-01 00:00:00", "2030-01-01 00:00:01");
        job(&conn, "processing", "2030-01-01 00:00:00", "2030-01-01 00:00:01");
        let unstarted = add(&conn, "t");
        set(
            &conn,
            unstarted,
            "status = 'completed', completed_at = '2030-01-01 00:00:00'",
        );

        // No run recorded: every completed job.
        let all = completed_since(&mut conn, None).unwrap();
        assert_eq!(
            all.iter().map(|j| j.0).collect::<Vec<_>>(),
            vec![before, early, late, stepped]
        );

        supervisor::begin_run(
            &mut conn,
            Protocol::Clx,
            &supervisor::NewSupervisor {
                pid: 1,
                proc_start: None,
                hostname: "here",
                config_path: "/pool.toml",
                workspace_path: "/ws",
                expected_workers: 1,
                health: (300, 0.2),
            },
        )
        .unwrap();
        conn.execute("UPDATE clx_pool_supervisor SET started_at = '2020-01-01 00:00:00'", [])
            .unwrap();
        let run = completed_since(&mut conn, None).unwrap();
        assert_eq!(
            run.iter().map(|j| (j.0, j.2.round() as i64)).collect::<Vec<_>>(),
            vec![(early, 2), (late, 30), (stepped, 0)]
        );
        assert_eq!((run[0].1.as_str(), run[0].3.as_str()), ("t", "2030-01-01 00:00:02"));
        let later = completed_since(&mut conn, Some("2030-01-01 00:01:00")).unwrap();
        assert_eq!(later.iter().map(|j| j.0).collect::<Vec<_>>(), vec![late, stepped]);
    }

    #[test]
    fn recent_failures_leave_out_old_ones_and_cancellations() {
        for protocol in Protocol::ALL.iter().copied() {
            let mut conn = db(protocol);
            let failed = add(&conn, "notebook");
            set(
                &conn,
                failed,
                "status = 'failed', error = 'boom', completed_at = CURRENT_TIMESTAMP",
            );
            // A failure reported without completed_at (CLM's Worker API).
            let reported = add(&conn, "plantuml");
            set(
                &conn,
                reported,
                "status = 'failed', started_at = datetime('now', '-5 minutes')",
            );
            let old = add(&conn, "notebook");
            set(
                &conn,
                old,
                "status = 'failed', error = 'old', completed_at = datetime('now', '-2 hours')",
            );
            let cancelled = add(&conn, "notebook");
            cancel(&mut conn, protocol, cancelled);
            let done = add(&conn, "notebook");
            set(&conn, done, "status = 'completed', completed_at = CURRENT_TIMESTAMP");

            assert_eq!(
                recently_failed(&mut conn).unwrap(),
                vec![
                    (reported, "plantuml".to_string(), None),
                    (failed, "notebook".to_string(), Some("boom".to_string())),
                ],
                "{protocol}"
            );
        }
    }
}
