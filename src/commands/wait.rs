//! `clx-pool wait --ready | --drained | --jobs ID...`: polls the database
//! until the condition holds (exit 0), it cannot hold any more or the
//! timeout passes (exit 1, saying why), with a progress bar on a terminal.

use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::target;
use crate::UsageError;
use crate::cli::DbArgs;
use crate::contract::exit;
use crate::db::jobs::{admin, counts};
use crate::db::{self, supervisor};
use crate::status::{self, Ready};
use crate::vocab::{JobStatus, Protocol};

const POLL: Duration = Duration::from_millis(20);

/// What to wait for.
#[derive(Debug, Clone)]
pub enum Until {
    Ready,
    /// The current run's jobs (every job with `all`).
    Drained {
        all: bool,
    },
    Jobs(Vec<i64>),
}

/// One look at the database.
enum Look {
    /// Over: the exit code, what to print on stdout, what on stderr.
    Over(i32, String, Vec<String>),
    /// Not yet: how far (for the progress bar) and what is missing.
    NotYet { done: u64, total: u64, why: String },
}

pub async fn run(args: &DbArgs, until: Until, timeout: Duration) -> anyhow::Result<i32> {
    let t = target(args)?;
    let deadline = Instant::now() + timeout;
    let progress = super::progress::Progress::new(match &until {
        Until::Ready => "workers registered",
        Until::Drained { .. } => "jobs finished",
        Until::Jobs(_) => "jobs finished",
    });
    let mut last = String::from("the database does not exist yet");
    loop {
        if let Some((conn, protocol)) = db::open_read_only(&t.db_path)? {
            let look = match &until {
                Until::Ready => ready(&conn, protocol, &t.db_path)?,
                Until::Drained { all } => drained(&conn, protocol, *all)?,
                Until::Jobs(ids) => jobs(&conn, ids, &t.db_path)?,
            };
            match look {
                Look::Over(code, out, err) => {
                    progress.finish();
                    for line in err {
                        eprintln!("{line}");
                    }
                    super::print(&out);
                    return Ok(code);
                }
                Look::NotYet { done, total, why } => {
                    progress.update(done, total, &why);
                    last = why;
                }
            }
        }
        if Instant::now() >= deadline {
            progress.finish();
            eprintln!("error: timed out after {}: {last}", humantime::format_duration(timeout));
            return Ok(exit::FAILURE);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    crate::status::plural(n as i64, one, many)
}

fn failures(rows: &[admin::Listed]) -> Vec<String> {
    rows.iter()
        .map(|j| {
            format!(
                "  job {} ({}, {} -> {}): {}",
                j.id,
                j.job_type,
                j.input_file,
                j.output_file,
                j.error.as_deref().unwrap_or("")
            )
        })
        .collect()
}

fn drained(conn: &Connection, protocol: Protocol, all: bool) -> anyhow::Result<Look> {
    let since = if all { None } else { supervisor::run_started(conn)? };
    let c = counts::run_counts(conn, protocol, since.as_deref())?;
    let finished = c.completed + c.failed + c.cancelled;
    if c.pending > 0 || c.processing > 0 {
        return Ok(Look::NotYet {
            done: finished as u64,
            total: (finished + c.pending + c.processing) as u64,
            why: format!("{} pending, {} processing", c.pending, c.processing),
        });
    }
    let scope = if since.is_some() { " of this run" } else { "" };
    if c.failed > 0 {
        let failed = admin::run_failures(conn, since.as_deref(), 1000)?;
        let mut err = vec![format!(
            "error: the queue is drained, but {}{scope} failed:",
            plural(c.failed as usize, "job", "jobs")
        )];
        err.extend(failures(&failed));
        err.push(
            "(`clx-pool jobs retry --failed` puts them back; `wait --drained` judges only the current run's jobs)"
                .into(),
        );
        return Ok(Look::Over(1, String::new(), err));
    }
    let mut out = format!(
        "drained: {}{scope} completed",
        plural(c.completed as usize, "job", "jobs")
    );
    if c.cancelled > 0 {
        out.push_str(&format!(", {} cancelled", c.cancelled));
    }
    Ok(Look::Over(0, out, Vec::new()))
}

fn jobs(conn: &Connection, ids: &[i64], db_path: &std::path::Path) -> anyhow::Result<Look> {
    let found = admin::statuses(conn, ids)?;
    if let Some(missing) = ids.iter().find(|id| !found.iter().any(|(f, _, _)| f == *id)) {
        return Err(UsageError(format!("there is no job {missing} in {}", db_path.display())).into());
    }
    if let Some(over) = unserved(conn, &found, db_path)? {
        return Ok(over);
    }
    let found: Vec<(i64, JobStatus)> = found.into_iter().map(|(id, s, _)| (id, s)).collect();
    let open = found
        .iter()
        .filter(|(_, s)| matches!(s, JobStatus::Pending | JobStatus::Processing))
        .count();
    if open > 0 {
        return Ok(Look::NotYet {
            done: (found.len() - open) as u64,
            total: found.len() as u64,
            why: format!("{} of {} not finished", open, plural(found.len(), "job", "jobs")),
        });
    }
    let bad: Vec<i64> = found
        .iter()
        .filter(|(_, s)| *s != JobStatus::Completed)
        .map(|(id, _)| *id)
        .collect();
    if bad.is_empty() {
        return Ok(Look::Over(
            0,
            format!("{} completed", plural(ids.len(), "job", "jobs")),
            Vec::new(),
        ));
    }
    let mut err = vec![format!("error: {} did not complete:", plural(bad.len(), "job", "jobs"))];
    for id in bad {
        if let Some(d) = admin::show(conn, id)? {
            err.push(format!(
                "  job {id} ({}) {}: {}",
                d.job_type,
                d.status,
                d.error.unwrap_or_default()
            ));
        }
    }
    Ok(Look::Over(1, String::new(), err))
}

fn ready(conn: &Connection, protocol: Protocol, db_path: &std::path::Path) -> anyhow::Result<Look> {
    let live = status::Liveness::of(db_path, conn);
    let status = status::build(conn, protocol, db_path, live, status::Detail::default())?;
    Ok(match status.ready() {
        Ready::Yes { workers } => {
            let out = match workers {
                1 => "the worker is registered".to_string(),
                n => format!("all {n} workers registered"),
            };
            Look::Over(exit::OK, out, Vec::new())
        }
        Ready::NotYet { running, expected, why } => Look::NotYet {
            done: running.max(0) as u64,
            total: expected.max(0) as u64,
            why,
        },
        Ready::Never { given_up } => {
            let err = format!(
                "error: the pool cannot become ready: slot(s) {} were given up (see `clx-pool stats --events`)",
                given_up.join(", ")
            );
            Look::Over(exit::FAILURE, String::new(), vec![err])
        }
    })
}

/// A pending job of a type no worker of the running pool serves would be
/// waited for in vain: over at once (exit 1), saying which and why. With
/// no supervisor running nothing is known yet (a pool may start).
fn unserved(
    conn: &Connection,
    found: &[(i64, JobStatus, String)],
    db_path: &std::path::Path,
) -> anyhow::Result<Option<Look>> {
    if crate::lock::running_supervisor(db_path).is_none() {
        return Ok(None);
    }
    let served = db::slots::served_types(conn)?;
    let stuck: Vec<String> = found
        .iter()
        .filter(|(_, s, ty)| *s == JobStatus::Pending && !served.contains(ty))
        .map(|(id, _, ty)| format!("  job {id} (`{ty}`)"))
        .collect();
    if stuck.is_empty() {
        return Ok(None);
    }
    let mut err = vec![format!(
        "error: {} waiting for a type no worker of the running pool serves (it serves: {}):",
        plural(stuck.len(), "job is", "jobs are"),
        served.join(", ")
    )];
    err.extend(stuck);
    err.push(
        "(a [[workers]] entry for it and `clx-pool reload` would serve it; `clx-pool jobs cancel ID` drops it)".into(),
    );
    Ok(Some(Look::Over(exit::FAILURE, String::new(), err)))
}
