//! `clx-pool stop`: signals the supervisor that holds the database's lock
//! and waits until the lock is released (the supervisor has exited). With no
//! supervisor running, it stops the orphaned workers a crashed one left.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::target;
use crate::cli::DbArgs;
use crate::contract::exit;
use crate::db;
use crate::lock;
use crate::procs;
use crate::takeover::{self, Takeover, Taker};

pub async fn run(args: &DbArgs, timeout: Duration) -> anyhow::Result<i32> {
    let t = target(args)?;
    let db_path = t.db_path;
    let started = Instant::now();
    let deadline = started + timeout;
    if lock::running_supervisor(&db_path).is_some() {
        // The pid file is written right after the lock is taken.
        let mut pid = crate::status::supervisor_pid(&db_path);
        while pid.is_none() && lock::running_supervisor(&db_path).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            pid = crate::status::supervisor_pid(&db_path);
        }
        if let Some(pid) = pid {
            // The control socket first (briefly: stop is answered at once);
            // a signal if it does not answer.
            let within = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            let asked = matches!(
                crate::contract::control::ask(&db_path, &crate::contract::control::Request::Stop, within).await,
                Ok(Some(r)) if r.ok
            );
            if !asked {
                procs::signal_process(pid, Signal::SIGTERM)?;
            }
            eprintln!("stopping the supervisor (pid {pid}) of {} ...", db_path.display());
            let progress = super::progress::Progress::new("workers stopped");
            let mut looked = Instant::now() - Duration::from_secs(1);
            while lock::running_supervisor(&db_path).is_some() {
                if looked.elapsed() >= Duration::from_millis(100) {
                    looked = Instant::now();
                    if let Some((stopped, total)) = stopped_workers(&db_path) {
                        progress.update(stopped, total, "");
                    }
                }
                if Instant::now() >= deadline {
                    progress.finish();
                    anyhow::bail!(
                        "the supervisor (pid {pid}) is still running after {}; it may still be stopping workers (see its log), or use a longer --timeout",
                        humantime::format_duration(timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            progress.finish();
            super::print(&format!(
                "stopped the supervisor of {} in {:.2}s",
                db_path.display(),
                started.elapsed().as_secs_f64()
            ));
            return Ok(exit::OK);
        }
    }
    if !db_path.exists() {
        super::print(&format!(
            "no supervisor is running for {} (there is no database there)",
            db_path.display()
        ));
        return Ok(exit::OK);
    }
    // The lock is held while cleaning, so no `start` runs meanwhile.
    let taken = takeover::take_over(
        Takeover {
            db_path: &db_path,
            taker: Taker::Stop,
            protocol: t.config.as_ref().and_then(|c| c.pool.protocol),
            grace: t
                .config
                .as_ref()
                .map(|c| c.pool.stop_timeout)
                .unwrap_or(Duration::from_secs(10)),
        },
        takeover::nothing,
    )
    .await?;
    let report = taken.report;
    if report.is_empty() {
        super::print(&format!(
            "no supervisor is running for {}; nothing to stop",
            db_path.display()
        ));
    } else {
        super::print(&format!("no supervisor is running for {}; {report}", db_path.display()));
    }
    Ok(exit::OK)
}

/// How many of the pool's slots no longer run a worker, of how many.
fn stopped_workers(db_path: &std::path::Path) -> Option<(u64, u64)> {
    let (conn, _) = db::open_read_only(db_path).ok()??;
    let slots = db::slots::slots(&conn).ok()?;
    let live = slots
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                crate::vocab::SlotState::Running | crate::vocab::SlotState::Starting
            )
        })
        .count();
    Some(((slots.len() - live) as u64, slots.len() as u64))
}
