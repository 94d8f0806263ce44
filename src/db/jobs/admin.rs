//! The queue as people and CI scripts handle it (`clx-pool jobs ...`,
//! `wait --jobs`, `wait --drained`): listing with filters, one job in full,
//! cancelling, retrying, pruning.
//!
//! A CLX database (schema v1) has no `cancelled` status (its CHECK allows
//! four), so a cancelled CLX job is `failed` with the error [`CANCELLED`];
//! every function here shows and counts it as cancelled, never as failed.

use std::time::Duration;

use rusqlite::types::ToSql;
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde::Serialize;

use super::{CANCELLED, OPEN, shown_status};
use crate::db::{lit, lits};
use crate::vocab::{JobStatus, Protocol};

/// Which jobs: every given condition holds.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub ids: Vec<i64>,
    pub job_type: Option<String>,
    /// Any of these (as shown); empty: any status.
    pub statuses: Vec<JobStatus>,
    /// Created at most this long ago.
    pub newer_than: Option<Duration>,
    /// Created (for `prune`: finished) longer ago than this.
    pub older_than: Option<Duration>,
}

impl Filter {
    /// The WHERE clause and its parameters.
    fn sql(&self, age_column: &str) -> (String, Vec<Box<dyn ToSql>>) {
        let mut conds: Vec<String> = vec!["1 = 1".into()];
        let mut params: Vec<Box<dyn ToSql>> = Vec::new();
        if !self.ids.is_empty() {
            conds.push(format!("id IN ({})", vec!["?"; self.ids.len()].join(", ")));
            params.extend(self.ids.iter().map(|id| Box::new(*id) as Box<dyn ToSql>));
        }
        if let Some(t) = &self.job_type {
            conds.push("job_type = ?".into());
            params.push(Box::new(t.clone()));
        }
        if !self.statuses.is_empty() {
            conds.push(format!(
                "{} IN ({})",
                shown_status(),
                vec!["?"; self.statuses.len()].join(", ")
            ));
            params.extend(self.statuses.iter().map(|s| Box::new(*s) as Box<dyn ToSql>));
        }
        if let Some(d) = self.newer_than {
            conds.push(format!("{age_column} >= datetime('now', ?)"));
            params.push(Box::new(format!("-{} seconds", d.as_secs())));
        }
        if let Some(d) = self.older_than {
            conds.push(format!("{age_column} < datetime('now', ?)"));
            params.push(Box::new(format!("-{} seconds", d.as_secs())));
        }
        (conds.join(" AND "), params)
    }
}

/// A job in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: i64,
    pub job_type: String,
    pub status: JobStatus,
    pub attempts: i64,
    pub input_file: String,
    pub output_file: String,
    pub created_at: Option<String>,
    pub error: Option<String>,
}

/// A [`Listed`] job from `SELECT id, job_type, {SHOWN_STATUS},
/// COALESCE(attempts, 0), input_file, output_file, created_at, error`.
pub(super) fn listed(r: &rusqlite::Row) -> rusqlite::Result<Listed> {
    Ok(Listed {
        id: r.get(0)?,
        job_type: r.get(1)?,
        status: r.get(2)?,
        attempts: r.get(3)?,
        input_file: r.get(4)?,
        output_file: r.get(5)?,
        created_at: r.get(6)?,
        error: r.get(7)?,
    })
}

/// Matching jobs, newest first, at most `limit`; and how many matched.
pub fn list(conn: &Connection, filter: &Filter, limit: i64) -> rusqlite::Result<(Vec<Listed>, i64)> {
    let (cond, params) = filter.sql("created_at");
    let total: i64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM jobs WHERE {cond}"),
        params_from_iter(params.iter()),
        |r| r.get(0),
    )?;
    let rows = conn
        .prepare(&format!(
            "SELECT id, job_type, {shown}, COALESCE(attempts, 0), input_file, output_file, created_at, error
             FROM jobs WHERE {cond} ORDER BY id DESC LIMIT {limit}",
            shown = shown_status()
        ))?
        .query_map(params_from_iter(params.iter()), listed)?
        .collect::<rusqlite::Result<_>>()?;
    Ok((rows, total))
}

/// One job in full.
#[derive(Debug, Clone, Serialize)]
pub struct Detail {
    pub id: i64,
    pub job_type: String,
    pub status: JobStatus,
    pub priority: i64,
    pub input_file: String,
    pub output_file: String,
    pub content_hash: String,
    pub payload: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// The row of the worker that took it last, and that worker's id.
    pub worker_row: Option<i64>,
    pub worker: Option<String>,
    pub error: Option<String>,
}

pub fn show(conn: &Connection, id: i64) -> rusqlite::Result<Option<Detail>> {
    conn.query_row(
        &format!(
            "SELECT j.id, j.job_type, {}, COALESCE(j.priority, 0), j.input_file, j.output_file, j.content_hash,
                    j.payload, COALESCE(j.attempts, 0), COALESCE(j.max_attempts, 3), j.created_at, j.started_at,
                    j.completed_at, j.worker_id, w.container_id, j.error
             FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id WHERE j.id = ?1",
            shown_status().replace("status", "j.status").replace("error", "j.error")
        ),
        [id],
        |r| {
            Ok(Detail {
                id: r.get(0)?,
                job_type: r.get(1)?,
                status: r.get(2)?,
                priority: r.get(3)?,
                input_file: r.get(4)?,
                output_file: r.get(5)?,
                content_hash: r.get(6)?,
                payload: r.get(7)?,
                attempts: r.get(8)?,
                max_attempts: r.get(9)?,
                created_at: r.get(10)?,
                started_at: r.get(11)?,
                completed_at: r.get(12)?,
                worker_row: r.get(13)?,
                worker: r.get(14)?,
                error: r.get(15)?,
            })
        },
    )
    .optional()
}

/// Cancels the matching jobs that are pending or processing; returns
/// their ids. A worker running one finds it no longer `processing` (the
/// built-in worker then stops its command), and its late result is not
/// written.
pub fn cancel(conn: &mut Connection, protocol: Protocol, filter: &Filter) -> rusqlite::Result<Vec<i64>> {
    let (cond, params) = filter.sql("created_at");
    let set = match protocol {
        Protocol::Clm => format!(
            "status = {}, cancelled_at = CURRENT_TIMESTAMP, cancelled_by = 'clx-pool'",
            lit(JobStatus::Cancelled)
        ),
        Protocol::Clx => format!(
            "status = {}, completed_at = CURRENT_TIMESTAMP, error = {}",
            lit(JobStatus::Failed),
            lit(CANCELLED)
        ),
    };
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ids = tx
        .prepare(&format!(
            "UPDATE jobs SET {set} WHERE status IN ({}) AND {cond} RETURNING id",
            lits(&OPEN)
        ))?
        .query_map(params_from_iter(params.iter()), |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    tx.commit()?;
    Ok(ids)
}

/// Puts the matching failed (or cancelled) jobs back in the queue with a
/// fresh attempt budget; returns their ids.
pub fn retry(conn: &mut Connection, protocol: Protocol, filter: &Filter) -> rusqlite::Result<Vec<i64>> {
    let (cond, params) = filter.sql("created_at");
    let clear_clm = match protocol {
        Protocol::Clm => ", cancelled_at = NULL, cancelled_by = NULL, result = NULL",
        Protocol::Clx => "",
    };
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ids = tx
        .prepare(&format!(
            "UPDATE jobs SET status = {pending}, attempts = 0, error = NULL, started_at = NULL,
                 completed_at = NULL, worker_id = NULL{clear_clm}
             WHERE status IN ({ended}) AND {cond} RETURNING id",
            pending = lit(JobStatus::Pending),
            ended = lits(&[JobStatus::Failed, JobStatus::Cancelled])
        ))?
        .query_map(params_from_iter(params.iter()), |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    tx.commit()?;
    Ok(ids)
}

/// Deletes the matching finished jobs (completed, failed, cancelled: never
/// pending or processing ones), aged by when they finished; returns how
/// many.
pub fn prune(conn: &Connection, protocol: Protocol, filter: &Filter) -> rusqlite::Result<usize> {
    let (cond, params) = filter.sql(super::finished_at(protocol));
    conn.execute(
        &format!("DELETE FROM jobs WHERE status NOT IN ({}) AND {cond}", lits(&OPEN)),
        params_from_iter(params.iter()),
    )
}

/// The status (as shown) of each of `ids` that exists.
pub fn statuses(conn: &Connection, ids: &[i64]) -> rusqlite::Result<Vec<(i64, JobStatus, String)>> {
    let filter = Filter {
        ids: ids.to_vec(),
        ..Filter::default()
    };
    let (cond, params) = filter.sql("created_at");
    conn.prepare(&format!(
        "SELECT id, {}, job_type FROM jobs WHERE {cond}",
        shown_status()
    ))?
    .query_map(params_from_iter(params.iter()), |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?
    .collect()
}

/// The failed jobs of that run (as [`run_counts`] scopes it), newest first.
pub fn run_failures(conn: &Connection, since: Option<&str>, limit: i64) -> rusqlite::Result<Vec<Listed>> {
    conn.prepare(&format!(
        "SELECT id, job_type, {shown}, COALESCE(attempts, 0), input_file, output_file, created_at, error
         FROM jobs
         WHERE status = ?3 AND error IS NOT ?4
           AND (?1 IS NULL OR COALESCE(completed_at, started_at, created_at) >= ?1)
         ORDER BY id DESC LIMIT ?2",
        shown = shown_status()
    ))?
    .query_map(rusqlite::params![since, limit, JobStatus::Failed, CANCELLED], listed)?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fixture::add_job;
    use crate::db::fixture::memory_db as queue;
    use crate::db::jobs::counts::run_counts;

    fn add(conn: &Connection, job_type: &str) -> i64 {
        add_job(conn, job_type, 3)
    }

    fn status(conn: &Connection, id: i64) -> JobStatus {
        statuses(conn, &[id]).unwrap()[0].1
    }

    #[test]
    fn cancel_retry_and_prune_under_both_protocols() {
        for protocol in [Protocol::Clx, Protocol::Clm] {
            let mut conn = queue(protocol);
            let (a, b, c) = (add(&conn, "t"), add(&conn, "t"), add(&conn, "u"));
            conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?1", [c])
                .unwrap();
            let only_t = Filter {
                job_type: Some("t".into()),
                ..Filter::default()
            };
            assert_eq!(cancel(&mut conn, protocol, &only_t).unwrap(), vec![a, b]);
            assert_eq!(status(&conn, a), JobStatus::Cancelled, "{protocol}");
            assert_eq!(status(&conn, c), JobStatus::Completed, "{protocol}: finished jobs stay");
            let counts = run_counts(&conn, protocol, None).unwrap();
            assert_eq!(
                (counts.cancelled, counts.failed, counts.completed),
                (2, 0, 1),
                "{protocol}"
            );
            assert!(run_failures(&conn, None, 10).unwrap().is_empty(), "{protocol}");
            // Retry with a fresh budget.
            conn.execute("UPDATE jobs SET attempts = 3 WHERE id = ?1", [a]).unwrap();
            let one = Filter {
                ids: vec![a],
                ..Filter::default()
            };
            assert_eq!(retry(&mut conn, protocol, &one).unwrap(), vec![a]);
            assert_eq!(status(&conn, a), JobStatus::Pending);
            assert_eq!(show(&conn, a).unwrap().unwrap().attempts, 0);
            // Prune: finished and old enough only.
            let old = Filter {
                older_than: Some(Duration::from_secs(3600)),
                ..Filter::default()
            };
            assert_eq!(prune(&conn, protocol, &old).unwrap(), 0);
            conn.execute(
                "UPDATE jobs SET completed_at = datetime('now', '-2 hours') WHERE id IN (?1, ?2)",
                [b, c],
            )
            .unwrap();
            assert_eq!(prune(&conn, protocol, &old).unwrap(), 2, "{protocol}");
            assert_eq!(list(&conn, &Filter::default(), 10).unwrap().1, 1);
        }
    }

    #[test]
    fn listings_are_newest_first_and_say_how_many_matched() {
        let conn = queue(Protocol::Clx);
        let ids: Vec<i64> = (0..5).map(|_| add(&conn, "t")).collect();
        let (rows, total) = list(&conn, &Filter::default(), 2).unwrap();
        assert_eq!(total, 5);
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
        let failed = Filter {
            statuses: vec![JobStatus::Failed],
            ..Filter::default()
        };
        assert_eq!(list(&conn, &failed, 10).unwrap().1, 0);
    }

    #[test]
    fn a_run_judges_its_own_jobs_not_failures_of_earlier_runs() {
        let conn = queue(Protocol::Clx);
        let old = add(&conn, "t");
        conn.execute(
            "UPDATE jobs SET status = 'failed', completed_at = datetime('now', '-1 hour') WHERE id = ?1",
            [old],
        )
        .unwrap();
        let waiting = add(&conn, "t");
        conn.execute(
            "UPDATE jobs SET created_at = datetime('now', '-2 hours') WHERE id = ?1",
            [waiting],
        )
        .unwrap();
        let since: String = conn
            .query_row("SELECT datetime('now', '-1 minute')", [], |r| r.get(0))
            .unwrap();
        let c = run_counts(&conn, Protocol::Clx, Some(&since)).unwrap();
        assert_eq!(
            (c.failed, c.pending),
            (0, 1),
            "the old failure is not this run's; the waiting job is"
        );
        assert_eq!(run_counts(&conn, Protocol::Clx, None).unwrap().failed, 1);
    }

    /// The indexed spelling counts exactly the jobs whose
    /// COALESCE(completed_at, started_at, created_at) is in the run, plus
    /// every pending and processing one.
    #[test]
    fn run_counts_follow_the_first_known_time_of_each_job() {
        for protocol in [Protocol::Clx, Protocol::Clm] {
            let conn = queue(protocol);
            let (old, new) = ("'2000-01-01 00:00:00'", "'2030-01-01 00:00:00'");
            // status, created, started, completed: (counted?)
            let rows = [
                ("pending", old, "NULL", "NULL"), // yes: pending
                ("processing", old, old, "NULL"), // yes: processing
                ("completed", old, old, new),     // yes: completed in the run
                ("completed", new, new, old),     // no: completed before it
                ("failed", old, new, "NULL"),     // yes: started in the run
                ("failed", new, old, "NULL"),     // no: started before it
                ("failed", new, "NULL", "NULL"),  // yes: created in the run
                ("failed", old, "NULL", "NULL"),  // no
            ];
            for (status, created, started, completed) in rows {
                let id = add(&conn, "t");
                conn.execute_batch(&format!(
                    "UPDATE jobs SET status = '{status}', created_at = {created}, started_at = {started},
                     completed_at = {completed} WHERE id = {id}"
                ))
                .unwrap();
            }
            let c = run_counts(&conn, protocol, Some("2020-01-01 00:00:00")).unwrap();
            assert_eq!(
                (c.pending, c.processing, c.completed, c.failed),
                (1, 1, 1, 2),
                "{protocol}"
            );
            let all = run_counts(&conn, protocol, None).unwrap();
            assert_eq!((all.completed, all.failed), (2, 4), "{protocol}");
        }
    }
}
