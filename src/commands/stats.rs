//! `clx-pool stats`: worker counts per type and status, slot health and
//! restarts, job counts, the supervisor's state; `--json` for scripts (shape
//! documented in docs/cli.md), `--watch` to refresh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use comfy_table::Table;
use serde::Serialize;

use super::target;
use crate::cli::DbArgs;
use crate::db::{self, jobs::JobCounts, pool::EventRow};
use crate::lock;
use crate::vocab::{Mode, Protocol, SlotState, SupervisorState, WorkerStatus};

#[derive(Debug, Serialize)]
pub struct Stats {
    pub db_path: String,
    /// The generation of workers the database serves: `clx` or `clm`.
    pub protocol: Protocol,
    pub supervisor: SupervisorStats,
    /// Worker rows per type, then per status (idle, busy, hung, dead; and
    /// created under CLM).
    pub workers: BTreeMap<String, BTreeMap<String, i64>>,
    /// The supervisor's slots per type.
    pub pools: BTreeMap<String, PoolStats>,
    pub jobs: JobCounts,
    /// Slots that wait (backing off, cooling down, given up), and why.
    pub waiting: Vec<Waiting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventRow>>,
}

#[derive(Debug, Serialize)]
pub struct Waiting {
    pub worker_type: String,
    pub slot: u32,
    pub state: SlotState,
    pub why: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SupervisorStats {
    pub running: bool,
    pub pid: Option<i64>,
    /// starting, running, stopping, stopped; null if no pool ever ran here.
    pub state: Option<SupervisorState>,
    pub started_at: Option<String>,
    pub ready_at: Option<String>,
    pub stopped_at: Option<String>,
    pub config_path: Option<String>,
    pub expected_workers: i64,
}

#[derive(Debug, Serialize)]
pub struct PoolStats {
    pub execution_mode: Mode,
    pub slots: i64,
    pub running: i64,
    pub starting: i64,
    pub backoff: i64,
    pub failed: i64,
    pub stopped: i64,
    pub restarts: i64,
}

pub fn collect(db_path: &Path, events: bool) -> anyhow::Result<Stats> {
    let (conn, protocol) = db::open_for_reading(db_path)?;
    let running_pid = super::supervisor_pid(db_path).or_else(|| lock::running_supervisor(db_path).map(|_| 0));
    let record = db::pool::supervisor(&conn)?;
    let supervisor = SupervisorStats {
        running: running_pid.is_some(),
        pid: running_pid
            .map(i64::from)
            .or(record.as_ref().map(|r| r.pid))
            .filter(|_| running_pid.is_some()),
        state: record.as_ref().map(|r| {
            if running_pid.is_some() {
                r.state
            } else {
                SupervisorState::Stopped
            }
        }),
        started_at: record.as_ref().map(|r| r.started_at.clone()),
        ready_at: record.as_ref().and_then(|r| r.ready_at.clone()),
        stopped_at: record.as_ref().and_then(|r| r.stopped_at.clone()),
        config_path: record.as_ref().and_then(|r| r.config_path.clone()),
        expected_workers: record.as_ref().map(|r| r.expected_workers).unwrap_or(0),
    };
    let mut pools: BTreeMap<String, PoolStats> = BTreeMap::new();
    let mut waiting = Vec::new();
    for s in db::pool::slots(&conn)? {
        if matches!(s.state, SlotState::Backoff | SlotState::Failed) && running_pid.is_some() {
            waiting.push(Waiting {
                worker_type: s.worker_type.clone(),
                slot: s.slot,
                state: s.state,
                why: s.note.clone().or_else(|| s.last_cause.clone()),
            });
        }
        let p = pools.entry(s.worker_type.clone()).or_insert_with(|| PoolStats {
            execution_mode: s.execution_mode,
            slots: 0,
            running: 0,
            starting: 0,
            backoff: 0,
            failed: 0,
            stopped: 0,
            restarts: 0,
        });
        p.execution_mode = s.execution_mode;
        p.slots += 1;
        p.restarts += s.restarts;
        *match s.state {
            SlotState::Running => &mut p.running,
            SlotState::Starting => &mut p.starting,
            SlotState::Backoff => &mut p.backoff,
            SlotState::Failed => &mut p.failed,
            SlotState::Stopped => &mut p.stopped,
        } += 1;
    }
    Ok(Stats {
        db_path: db_path.display().to_string(),
        protocol,
        supervisor,
        workers: db::workers::counts(&conn, protocol)?,
        pools,
        jobs: db::jobs::counts(&conn, None)?,
        waiting,
        events: if events {
            Some(db::pool::recent_events(&conn, 20)?)
        } else {
            None
        },
    })
}

pub fn render(s: &Stats) -> String {
    let mut out = format!(
        "database:   {}\nprotocol:   {}\n{}\n\n{}\n\n{}",
        s.db_path,
        s.protocol,
        supervisor_line(&s.supervisor),
        pools_table(s),
        jobs_line(s)
    );
    if !s.waiting.is_empty() {
        out.push_str("\nwaiting slots:\n");
        for w in &s.waiting {
            out.push_str(&format!(
                "  {}-{} {}: {}\n",
                w.worker_type,
                w.slot,
                w.state,
                w.why.as_deref().unwrap_or("-")
            ));
        }
    }
    if let Some(events) = &s.events {
        out.push_str(&events_text(events));
    }
    out
}

fn supervisor_line(sup: &SupervisorStats) -> String {
    match (sup.running, &sup.state) {
        (true, state) => format!(
            "supervisor: {} (pid {}, since {} UTC, {} workers configured)",
            state.unwrap_or(SupervisorState::Starting),
            sup.pid.unwrap_or(0),
            sup.started_at.as_deref().unwrap_or("?"),
            sup.expected_workers
        ),
        (false, Some(_)) => format!(
            "supervisor: not running (last run stopped {} UTC)",
            sup.stopped_at.as_deref().unwrap_or("uncleanly")
        ),
        (false, None) => "supervisor: not running (no pool has run on this database)".into(),
    }
}

fn pools_table(s: &Stats) -> Table {
    let mut types: Vec<&String> = s.workers.keys().chain(s.pools.keys()).collect();
    types.sort();
    types.dedup();
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "TYPE", "MODE", "SLOTS", "RUNNING", "STARTING", "BACKOFF", "FAILED", "RESTARTS", "IDLE", "BUSY", "HUNG", "DEAD",
    ]);
    let empty = BTreeMap::new();
    for ty in types {
        let p = s.pools.get(ty);
        let w = s.workers.get(ty).unwrap_or(&empty);
        let n = |k: WorkerStatus| w.get(k.as_str()).copied().unwrap_or(0).to_string();
        let pn = |f: fn(&PoolStats) -> i64| p.map(|p| f(p).to_string()).unwrap_or_else(|| "-".into());
        t.add_row(vec![
            ty.clone(),
            p.map(|p| p.execution_mode.to_string()).unwrap_or_else(|| "-".into()),
            pn(|p| p.slots),
            pn(|p| p.running),
            pn(|p| p.starting),
            pn(|p| p.backoff),
            pn(|p| p.failed),
            pn(|p| p.restarts),
            n(WorkerStatus::Idle),
            n(WorkerStatus::Busy),
            n(WorkerStatus::Hung),
            n(WorkerStatus::Dead),
        ]);
    }
    t
}

fn jobs_line(s: &Stats) -> String {
    let j = &s.jobs;
    let mut out = format!(
        "jobs: {} pending, {} processing, {} completed, {} failed",
        j.pending, j.processing, j.completed, j.failed
    );
    if s.protocol == Protocol::Clm {
        out.push_str(&format!(", {} cancelled", j.cancelled));
    }
    out.push('\n');
    out
}

fn events_text(events: &[EventRow]) -> String {
    let mut out = String::from("\nrecent worker events:\n");
    if events.is_empty() {
        out.push_str("  (none)\n");
    }
    for e in events {
        out.push_str(&format!(
            "  {} UTC  {}-{}  {}  {}: {}{}\n",
            e.at,
            e.worker_type,
            e.slot,
            e.worker_id.as_ref().map(|w| w.as_str()).unwrap_or("-"),
            e.event,
            e.cause.as_deref().unwrap_or(""),
            e.job_id.map(|j| format!(" (holding job {j})")).unwrap_or_default()
        ));
    }
    out
}

pub async fn run(args: &DbArgs, json: bool, watch: Option<Duration>, events: bool) -> anyhow::Result<i32> {
    let t = target(args)?;
    loop {
        let s = collect(&t.db_path, events)?;
        let text = if json {
            serde_json::to_string_pretty(&s)?
        } else {
            render(&s)
        };
        match watch {
            None => {
                println!("{text}");
                return Ok(0);
            }
            Some(every) => {
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    print!("\x1b[2J\x1b[H{text}");
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(0),
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
    }
}
