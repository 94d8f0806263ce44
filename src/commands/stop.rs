//! `clx-pool stop`: signals the supervisor that holds the database's lock
//! and waits until the lock is released (the supervisor has exited). With no
//! supervisor running, it stops the orphaned workers a crashed one left.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Target, target};
use crate::cli::DbArgs;
use crate::config::Config;
use crate::contract::exit;
use crate::db;
use crate::lock;
use crate::procs;
use crate::takeover::{self, Taken, Takeover, Taker};

pub async fn run(args: &DbArgs, timeout: Duration) -> anyhow::Result<i32> {
    let Target { db_path, config } = target(args)?;
    let started = Instant::now();
    let deadline = started + timeout;
    if let Some(pid) = supervisor_pid(&db_path, deadline).await {
        ask_to_stop(&db_path, pid, deadline).await?;
        eprintln!("stopping the supervisor (pid {pid}) of {} ...", db_path.display());
        wait_for_exit(&db_path, pid, deadline, timeout).await?;
        super::print(&format!(
            "stopped the supervisor of {} in {:.2}s",
            db_path.display(),
            started.elapsed().as_secs_f64()
        ));
        return Ok(exit::OK);
    }
    if !db_path.exists() {
        super::print(&format!(
            "no supervisor is running for {} (there is no database there)",
            db_path.display()
        ));
        return Ok(exit::OK);
    }
    let taken = stop_orphans(&db_path, config.as_ref()).await?;
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

/// The pid of the supervisor holding the database's lock, or `None` when
/// no supervisor holds it (or its pid did not show before `deadline`).
async fn supervisor_pid(db_path: &Path, deadline: Instant) -> Option<i32> {
    lock::running_supervisor(db_path)?;
    // The pid file is written right after the lock is taken.
    let mut pid = crate::status::supervisor_pid(db_path);
    while pid.is_none() && lock::running_supervisor(db_path).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        pid = crate::status::supervisor_pid(db_path);
    }
    pid
}

/// Asks the supervisor `pid` to stop: through its control socket, else
/// with SIGTERM.
async fn ask_to_stop(db_path: &Path, pid: i32, deadline: Instant) -> anyhow::Result<()> {
    // The control socket first (briefly: stop is answered at once);
    // a signal if it does not answer.
    let within = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(2));
    let asked = matches!(
        crate::contract::control::ask(db_path, &crate::contract::control::Request::Stop, within).await,
        Ok(Some(r)) if r.ok
    );
    if !asked {
        procs::signal_process(pid, Signal::SIGTERM)?;
    }
    Ok(())
}

/// Waits until the supervisor has released the lock, showing how many
/// workers have stopped; fails at `deadline`.
async fn wait_for_exit(db_path: &Path, pid: i32, deadline: Instant, timeout: Duration) -> anyhow::Result<()> {
    let progress = super::progress::Progress::new("workers stopped");
    let mut looked = Instant::now() - Duration::from_secs(1);
    while lock::running_supervisor(db_path).is_some() {
        if looked.elapsed() >= Duration::from_millis(100) {
            looked = Instant::now();
            if let Some((stopped, total)) = stopped_workers(db_path) {
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
    Ok(())
}

/// With no supervisor running: takes the pool over and stops the workers a
/// crashed one left; the lock comes back with what was done.
async fn stop_orphans(db_path: &Path, config: Option<&Config>) -> anyhow::Result<Taken<()>> {
    // The lock is held while cleaning, so no `start` runs meanwhile.
    takeover::take_over(
        Takeover {
            db_path,
            taker: Taker::Stop,
            protocol: config.and_then(|c| c.pool.protocol),
            grace: config.map(|c| c.pool.stop_timeout).unwrap_or(Duration::from_secs(10)),
            swarm_host: config.and_then(|c| c.pool.swarm.docker_host.as_deref()),
        },
        takeover::nothing,
    )
    .await
}

/// How many of the pool's slots no longer run a worker, of how many.
fn stopped_workers(db_path: &Path) -> Option<(u64, u64)> {
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
