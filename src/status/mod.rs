//! The pool's picture, built once: the supervisor (running or not, its
//! record), every slot and live worker (state, pid or container, job, CPU,
//! memory), the jobs of the run and of every type, the queue, and the
//! health verdict with its reasons. Everything that shows a pool renders a
//! [`Status`]: `stats` (text, `--json`, `--check`), the Prometheus gauges
//! (`stats --prometheus`, `/metrics`), `top`, systemd's STATUS line and
//! `wait --ready`. A supervisor's live counters (worker ends, restarts,
//! job durations) come beside it from the supervisor over its control
//! socket; everything else is read from the database here, once.
//!
//! One rule holds in every rendering: without a running supervisor no
//! worker is live (rows it left alive count as dead) and every slot is
//! stopped.

mod health;
mod line;
pub mod prometheus;
mod ready;

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

pub use health::{Health, HealthStatus, plural};
pub use line::status_line;
pub use ready::Ready;

use crate::db;
use crate::db::events::EventRow;
use crate::db::jobs::{JobCounts, counts::TypeCount};
use crate::db::workers::WorkerLine;
use crate::vocab::{JobStatus, Mode, Protocol, SlotState, SupervisorState, WorkerStatus};

/// The picture of one pool. Its JSON is `stats --json` (docs/cli.md).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub db_path: String,
    /// The generation of workers the database serves: `clx` or `clm`.
    pub protocol: Protocol,
    pub supervisor: SupervisorStats,
    /// healthy, degraded or down, and why (what `stats --check` exits with).
    pub health: Health,
    /// Worker rows of the current (or last) run per type, then per status
    /// (idle, busy, hung, dead; and created under CLM). Without a running
    /// supervisor no row counts as live: they are all under dead.
    pub workers: BTreeMap<String, BTreeMap<String, i64>>,
    /// The supervisor's slots per type.
    pub pools: BTreeMap<String, PoolStats>,
    /// Jobs of the current (or last) run: pending and processing ones, and
    /// those that finished since it started.
    pub jobs: JobCounts,
    /// Slots that wait (backing off, cooling down, given up), and why.
    pub waiting: Vec<Waiting>,
    /// With `Detail::workers`: one line per live worker of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_list: Option<Vec<WorkerLine>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventRow>>,
    /// Pending jobs of each type no worker of the running pool serves.
    pub unserved: BTreeMap<String, i64>,
    /// The jobs that finished within the health window.
    pub recent: health::Recent,
    /// Every job in the database by type and status (not only this run's),
    /// with the oldest one's age: the queue.
    #[serde(skip)]
    pub queue: Vec<TypeCount>,
    /// The supervisor record is the running supervisor's own (not yet an
    /// earlier run's, while a new supervisor cleans up after it).
    #[serde(skip)]
    pub record_is_current: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Waiting {
    pub worker_type: String,
    pub slot: u32,
    pub state: SlotState,
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SupervisorStats {
    pub running: bool,
    pub pid: Option<i64>,
    /// starting, running, stopping, stopped; null if no pool ever ran here.
    pub state: Option<SupervisorState>,
    /// The last run ended without stopping its pool (killed, crashed).
    pub stopped_uncleanly: bool,
    /// When that was found (by its guard, or the next `start`/`stop`); null
    /// while nobody has looked yet.
    pub ended_uncleanly_at: Option<String>,
    pub started_at: Option<String>,
    pub ready_at: Option<String>,
    pub stopped_at: Option<String>,
    pub config_path: Option<String>,
    pub expected_workers: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub execution_mode: Mode,
    /// How many workers the running pool wants (`scale`, `reload`).
    pub wanted: i64,
    pub slots: i64,
    pub running: i64,
    pub starting: i64,
    pub backoff: i64,
    pub failed: i64,
    pub stopped: i64,
    pub restarts: i64,
    /// Memory of its live workers, MiB (as the monitor last measured it).
    pub memory_mib: f64,
}

impl PoolStats {
    fn new(execution_mode: Mode) -> PoolStats {
        PoolStats {
            execution_mode,
            wanted: 0,
            slots: 0,
            running: 0,
            starting: 0,
            backoff: 0,
            failed: 0,
            stopped: 0,
            restarts: 0,
            memory_mib: 0.0,
        }
    }

    /// Its slots in `state`.
    pub fn in_state(&self, state: SlotState) -> i64 {
        match state {
            SlotState::Running => self.running,
            SlotState::Starting => self.starting,
            SlotState::Backoff => self.backoff,
            SlotState::Failed => self.failed,
            SlotState::Stopped => self.stopped,
        }
    }

    fn count(&mut self, state: SlotState) {
        *match state {
            SlotState::Running => &mut self.running,
            SlotState::Starting => &mut self.starting,
            SlotState::Backoff => &mut self.backoff,
            SlotState::Failed => &mut self.failed,
            SlotState::Stopped => &mut self.stopped,
        } += 1;
    }
}

/// What to read beyond the counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detail {
    /// One line per live worker (`stats --workers`, `top`, the per-worker
    /// gauges).
    pub workers: bool,
    /// The latest worker events (`stats --events`, `top`).
    pub events: bool,
}

impl Detail {
    /// What the Prometheus gauges need: each live worker's usage.
    pub const GAUGES: Detail = Detail {
        workers: true,
        events: false,
    };
}

/// Whether a supervisor runs for the database, as its lock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    NotRunning,
    /// Running; its pid when the pid file or the record (checked against
    /// the process's start time) names it.
    Running(Option<i32>),
}

impl Liveness {
    /// This process is the supervisor (it holds the lock).
    pub fn this_process() -> Liveness {
        Liveness::Running(Some(std::process::id() as i32))
    }

    /// Asks the lock of `db` (and its pid file, and the record in `conn`).
    pub fn of(db: &Path, conn: &Connection) -> Liveness {
        match crate::lock::running_supervisor(db) {
            None => Liveness::NotRunning,
            Some(r) => Liveness::Running(r.pid.or_else(|| recorded_pid(conn))),
        }
    }
}

/// The recorded supervisor's pid, if that process still runs (a reused pid
/// has another start time).
fn recorded_pid(conn: &Connection) -> Option<i32> {
    let record = db::supervisor::supervisor(conn).ok()??;
    let pid = record.pid as i32;
    let ticks = crate::procs::start_ticks(pid);
    (ticks.is_some() && ticks == record.proc_start).then_some(pid)
}

/// The pid of the supervisor running for `db`: from its pid file, or else
/// from its record in the database (checked against the process's start
/// time, so a reused pid is never taken for it).
pub fn supervisor_pid(db: &Path) -> Option<i32> {
    let running = crate::lock::running_supervisor(db)?;
    if let Some(pid) = running.pid {
        return Some(pid);
    }
    let (conn, _) = db::open_read_only(db).ok()??;
    recorded_pid(&conn)
}

/// Reads the picture of the pool at `db` (read-only).
pub fn read(db_path: &Path, detail: Detail) -> anyhow::Result<Status> {
    let (conn, protocol) = db::open_for_reading(db_path)?;
    let live = Liveness::of(db_path, &conn);
    Ok(build(&conn, protocol, db_path, live, detail)?)
}

/// Builds the picture from an open database and what the lock says.
pub fn build(
    conn: &Connection,
    protocol: Protocol,
    db_path: &Path,
    live: Liveness,
    detail: Detail,
) -> rusqlite::Result<Status> {
    let record = db::supervisor::supervisor(conn)?;
    let supervisor = supervisor(record.as_ref(), live);
    let running = supervisor.running;
    let since = supervisor.started_at.clone();
    let lines = db::workers::worker_lines(conn, since.as_deref(), false)?;
    let (pools, waiting) = slots(conn, running, &lines)?;
    let mut workers = db::workers::counts(conn, protocol, since.as_deref())?;
    if !running {
        all_dead(&mut workers);
    }
    let jobs = db::jobs::counts::run_counts(conn, protocol, since.as_deref())?;
    let record_is_current = match (live, &record) {
        (Liveness::Running(Some(pid)), Some(r)) => r.pid == i64::from(pid),
        _ => false,
    };
    let queue = db::jobs::counts::by_type(conn)?;
    let unserved = if running {
        unserved(&queue, &db::slots::served_types(conn)?)
    } else {
        BTreeMap::new()
    };
    let recent = recent(conn, protocol, record.as_ref())?;
    let signals = health::Signals {
        pools: &pools,
        unserved: &unserved,
        recent,
    };
    Ok(Status {
        db_path: db_path.display().to_string(),
        protocol,
        health: health::verdict(&supervisor, signals),
        unserved,
        recent,
        supervisor,
        workers,
        pools,
        jobs,
        waiting,
        worker_list: detail.workers.then(|| if running { lines } else { Vec::new() }),
        events: if detail.events {
            Some(db::events::recent_events(conn, 20)?)
        } else {
            None
        },
        queue,
        record_is_current,
    })
}

/// Pending jobs of each type nothing serves (`db::slots::served_types`,
/// the one answer `submit` and `wait --jobs` use too).
fn unserved(queue: &[TypeCount], served: &[String]) -> BTreeMap<String, i64> {
    queue
        .iter()
        .filter(|c| c.status == JobStatus::Pending && !served.contains(&c.job_type))
        .map(|c| (c.job_type.clone(), c.count))
        .collect()
}

/// The jobs of this run that finished within its health window (the
/// run's own rules, else the defaults).
fn recent(
    conn: &Connection,
    protocol: Protocol,
    record: Option<&db::supervisor::SupervisorRecord>,
) -> rusqlite::Result<health::Recent> {
    let defaults = crate::config::HealthRules::default();
    let (window_secs, failure_rate) = record
        .and_then(|r| r.health)
        .unwrap_or((defaults.window.as_secs() as i64, defaults.failure_rate));
    let window_start: String =
        conn.query_row("SELECT datetime('now', '-' || ?1 || ' seconds')", [window_secs], |r| {
            r.get(0)
        })?;
    let since = match record.map(|r| r.started_at.as_str()) {
        Some(started) if started > window_start.as_str() => started.to_string(),
        _ => window_start,
    };
    let c = db::jobs::counts::run_counts(conn, protocol, Some(&since))?;
    Ok(health::Recent {
        window_secs,
        completed: c.completed,
        failed: c.failed,
        failure_rate,
    })
}

fn supervisor(record: Option<&db::supervisor::SupervisorRecord>, live: Liveness) -> SupervisorStats {
    let running = live != Liveness::NotRunning;
    let live_pid = match live {
        Liveness::Running(pid) => Some(pid.unwrap_or(0)),
        Liveness::NotRunning => None,
    };
    SupervisorStats {
        running,
        pid: live_pid.map(i64::from).or(record.map(|r| r.pid)).filter(|_| running),
        state: record.map(|r| if running { r.state } else { SupervisorState::Stopped }),
        stopped_uncleanly: !running
            && record.is_some_and(|r| r.state != SupervisorState::Stopped || r.ended_uncleanly_at.is_some()),
        ended_uncleanly_at: record.and_then(|r| r.ended_uncleanly_at.clone()),
        started_at: record.map(|r| r.started_at.clone()),
        ready_at: record.and_then(|r| r.ready_at.clone()),
        stopped_at: record.and_then(|r| r.stopped_at.clone()),
        config_path: record.and_then(|r| r.config_path.clone()),
        expected_workers: record.map(|r| r.expected_workers).unwrap_or(0),
    }
}

/// Rows a dead supervisor left live are not running: every count moves
/// under dead.
fn all_dead(workers: &mut BTreeMap<String, BTreeMap<String, i64>>) {
    for by_status in workers.values_mut() {
        let gone: i64 = by_status
            .iter_mut()
            .filter(|(s, _)| s.as_str() != WorkerStatus::Dead.as_str())
            .map(|(_, n)| std::mem::take(n))
            .sum();
        *by_status.entry(WorkerStatus::Dead.to_string()).or_insert(0) += gone;
    }
}

/// Slots per type; without a running supervisor every slot is stopped.
fn slots(
    conn: &Connection,
    running: bool,
    live: &[WorkerLine],
) -> rusqlite::Result<(BTreeMap<String, PoolStats>, Vec<Waiting>)> {
    let mut pools: BTreeMap<String, PoolStats> = BTreeMap::new();
    let mut waiting = Vec::new();
    for s in db::slots::slots(conn)? {
        let state = if running { s.state } else { SlotState::Stopped };
        if matches!(state, SlotState::Backoff | SlotState::Failed) {
            waiting.push(Waiting {
                worker_type: s.worker_type.clone(),
                slot: s.slot,
                state,
                why: s.note.clone().or_else(|| s.last_cause.clone()),
            });
        }
        let p = pools
            .entry(s.worker_type.clone())
            .or_insert_with(|| PoolStats::new(s.execution_mode));
        p.execution_mode = s.execution_mode;
        p.slots += 1;
        p.restarts += s.restarts;
        p.count(state);
    }
    let wanted = db::slots::wanted(conn)?;
    for (t, p) in pools.iter_mut() {
        p.wanted = wanted.get(t).copied().unwrap_or(p.slots);
    }
    if running {
        for w in live {
            if let Some(p) = pools.get_mut(&w.worker_type) {
                p.memory_mib += w.memory_mib.unwrap_or(0.0);
            }
        }
    }
    Ok((pools, waiting))
}

/// The figures of systemd's STATUS line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Slots running a worker, and slots in all.
    pub running: i64,
    pub slots: i64,
    /// Slots waiting (backing off, cooling down, given up).
    pub waiting: usize,
    pub jobs: JobCounts,
}

impl Status {
    /// Slots running a worker, over every type.
    pub fn running_slots(&self) -> i64 {
        self.pools.values().map(|p| p.running).sum()
    }

    pub fn summary(&self) -> Summary {
        Summary {
            running: self.running_slots(),
            slots: self.pools.values().map(|p| p.slots).sum(),
            waiting: self.waiting.len(),
            jobs: self.jobs.clone(),
        }
    }

    /// Worker rows of `worker_type` in `status`.
    pub fn workers_in(&self, worker_type: &str, status: WorkerStatus) -> i64 {
        self.workers
            .get(worker_type)
            .and_then(|m| m.get(status.as_str()))
            .copied()
            .unwrap_or(0)
    }

    /// Pending jobs of each type and how long the oldest has waited (s).
    pub fn pending(&self) -> impl Iterator<Item = (&str, i64, f64)> {
        self.queue
            .iter()
            .filter(|c| c.status == JobStatus::Pending)
            .map(|c| (c.job_type.as_str(), c.count, c.oldest_age.unwrap_or(0.0)))
    }

    /// Whether `wait --ready` is over, and how.
    pub fn ready(&self) -> Ready {
        ready::judge(self)
    }
}

#[cfg(test)]
mod tests;
