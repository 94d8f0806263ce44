//! `clx-pool wait --ready | --drained`: polls the database until the
//! condition holds or the timeout passes (exit 1, saying what is missing).

use std::time::{Duration, Instant};

use super::target;
use crate::cli::DbArgs;
use crate::db;
use crate::lock;
use crate::vocab::{JobStatus, SlotState, SupervisorState};

const POLL: Duration = Duration::from_millis(20);

pub async fn run(args: &DbArgs, ready: bool, timeout: Duration) -> anyhow::Result<i32> {
    let t = target(args)?;
    let deadline = Instant::now() + timeout;
    let mut last_state = String::from("the database does not exist yet");
    loop {
        if let Some((conn, _)) = db::open_read_only(&t.db_path)? {
            if ready {
                match ready_state(&conn, &t.db_path)? {
                    Ready::Yes(n) => {
                        println!("all {n} workers registered");
                        return Ok(0);
                    }
                    Ready::Failed(slots) => {
                        eprintln!(
                            "error: the pool cannot become ready: slot(s) {} were given up (see `clx-pool stats --events`)",
                            slots.join(", ")
                        );
                        return Ok(1);
                    }
                    Ready::No(why) => last_state = why,
                }
            } else {
                let c = db::jobs::counts(&conn, None)?;
                if c.pending == 0 && c.processing == 0 {
                    if c.failed > 0 {
                        let failed = db::jobs::list(&conn, Some(JobStatus::Failed), 1000)?;
                        eprintln!("error: the queue is drained, but {} job(s) failed:", c.failed);
                        for j in failed {
                            eprintln!(
                                "  job {} ({}, {} -> {}): {}",
                                j.id,
                                j.job_type,
                                j.input_file,
                                j.output_file,
                                j.error.unwrap_or_default()
                            );
                        }
                        return Ok(1);
                    }
                    if c.cancelled > 0 {
                        println!("drained: {} job(s) completed, {} cancelled", c.completed, c.cancelled);
                    } else {
                        println!("drained: {} job(s) completed", c.completed);
                    }
                    return Ok(0);
                }
                last_state = format!("{} pending, {} processing", c.pending, c.processing);
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: timed out after {}: {last_state}",
                humantime::format_duration(timeout)
            );
            return Ok(1);
        }
        tokio::time::sleep(POLL).await;
    }
}

enum Ready {
    Yes(usize),
    No(String),
    Failed(Vec<String>),
}

fn ready_state(conn: &rusqlite::Connection, db_path: &std::path::Path) -> anyhow::Result<Ready> {
    let Some(running) = lock::running_supervisor(db_path) else {
        return Ok(Ready::No("no supervisor is running".into()));
    };
    let Some(sup) = db::pool::supervisor(conn)? else {
        return Ok(Ready::No("the supervisor is starting".into()));
    };
    // The record may still be an earlier run's until this one has cleaned
    // up: it must name the live supervisor (by pid file, or by the start
    // time of the recorded pid).
    let recorded = sup.pid as i32;
    let current = match running.pid {
        Some(pid) => pid == recorded,
        None => crate::procs::start_ticks(recorded).is_some() && crate::procs::start_ticks(recorded) == sup.proc_start,
    };
    if !current {
        return Ok(Ready::No("the supervisor is starting".into()));
    }
    if matches!(sup.state, SupervisorState::Stopping | SupervisorState::Stopped) {
        return Ok(Ready::No(format!("the supervisor is {}", sup.state)));
    }
    let slots = db::pool::slots(conn)?;
    let failed: Vec<String> = slots
        .iter()
        .filter(|s| s.state == SlotState::Failed)
        .map(|s| format!("{}-{}", s.worker_type, s.slot))
        .collect();
    if !failed.is_empty() {
        return Ok(Ready::Failed(failed));
    }
    let running = slots.iter().filter(|s| s.state == SlotState::Running).count();
    if running as i64 == sup.expected_workers && sup.state == SupervisorState::Running {
        Ok(Ready::Yes(running))
    } else {
        Ok(Ready::No(format!(
            "{running} of {} workers registered",
            sup.expected_workers
        )))
    }
}
