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
use crate::contract::exit;
use crate::db::{self, jobs::JobCounts, pool::EventRow, pool::WorkerLine};
use crate::lock;
use crate::vocab::{Mode, Protocol, SlotState, SupervisorState, WorkerStatus};

#[derive(Debug, Serialize)]
pub struct Stats {
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
    /// With --workers: one line per live worker of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_list: Option<Vec<WorkerLine>>,
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

#[derive(Debug, Serialize)]
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

/// What `stats --check` judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Down,
}

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: HealthStatus,
    pub reasons: Vec<String>,
}

impl HealthStatus {
    /// The exit code of `stats --check`.
    pub fn exit_code(self) -> i32 {
        match self {
            HealthStatus::Healthy => 0,
            HealthStatus::Degraded => exit::FAILURE,
            HealthStatus::Down => exit::USAGE,
        }
    }
}

fn plural(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The rule, from what `collect` found.
fn health(sup: &SupervisorStats, pools: &BTreeMap<String, PoolStats>, jobs: &JobCounts) -> Health {
    let mut reasons = Vec::new();
    if !sup.running {
        reasons.push(if sup.stopped_uncleanly {
            "the supervisor ended without stopping its pool".to_string()
        } else {
            "no supervisor is running".to_string()
        });
        return Health {
            status: HealthStatus::Down,
            reasons,
        };
    }
    match sup.state {
        Some(SupervisorState::Stopping | SupervisorState::Stopped) => {
            return Health {
                status: HealthStatus::Down,
                reasons: vec!["the pool is stopping".into()],
            };
        }
        Some(SupervisorState::Starting) | None => reasons.push("the pool is starting".into()),
        Some(SupervisorState::Running) => {}
    }
    for (ty, p) in pools {
        if p.failed > 0 {
            reasons.push(format!("{} of `{ty}` given up", plural(p.failed, "slot", "slots")));
        }
        if p.backoff > 0 {
            reasons.push(format!(
                "{} of `{ty}` waiting to restart",
                plural(p.backoff, "slot", "slots")
            ));
        }
    }
    if jobs.failed > 0 {
        reasons.push(format!("{} failed in this run", plural(jobs.failed, "job", "jobs")));
    }
    let status = if reasons.is_empty() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    };
    Health { status, reasons }
}

pub fn collect(db_path: &Path, events: bool, workers: bool) -> anyhow::Result<Stats> {
    let (conn, protocol) = db::open_for_reading(db_path)?;
    let running_pid = super::supervisor_pid(db_path).or_else(|| lock::running_supervisor(db_path).map(|_| 0));
    let running = running_pid.is_some();
    let record = db::pool::supervisor(&conn)?;
    let supervisor = SupervisorStats {
        running,
        pid: running_pid
            .map(i64::from)
            .or(record.as_ref().map(|r| r.pid))
            .filter(|_| running),
        state: record
            .as_ref()
            .map(|r| if running { r.state } else { SupervisorState::Stopped }),
        stopped_uncleanly: !running
            && record
                .as_ref()
                .is_some_and(|r| r.state != SupervisorState::Stopped || r.ended_uncleanly_at.is_some()),
        ended_uncleanly_at: record.as_ref().and_then(|r| r.ended_uncleanly_at.clone()),
        started_at: record.as_ref().map(|r| r.started_at.clone()),
        ready_at: record.as_ref().and_then(|r| r.ready_at.clone()),
        stopped_at: record.as_ref().and_then(|r| r.stopped_at.clone()),
        config_path: record.as_ref().and_then(|r| r.config_path.clone()),
        expected_workers: record.as_ref().map(|r| r.expected_workers).unwrap_or(0),
    };
    let since = supervisor.started_at.clone();
    let live = db::pool::worker_lines(&conn, since.as_deref(), false)?;
    let (pools, waiting) = slots(&conn, running, &live)?;
    let mut counts = db::workers::counts(&conn, protocol, since.as_deref())?;
    if !running {
        // Rows a dead supervisor left live are not running.
        for by_status in counts.values_mut() {
            let gone: i64 = by_status
                .iter_mut()
                .filter(|(s, _)| s.as_str() != WorkerStatus::Dead.as_str())
                .map(|(_, n)| std::mem::take(n))
                .sum();
            *by_status.entry(WorkerStatus::Dead.to_string()).or_insert(0) += gone;
        }
    }
    let jobs = db::admin::run_counts(&conn, since.as_deref())?;
    Ok(Stats {
        db_path: db_path.display().to_string(),
        protocol,
        health: health(&supervisor, &pools, &jobs),
        supervisor,
        workers: counts,
        pools,
        jobs,
        waiting,
        worker_list: (workers && running).then_some(live).or_else(|| workers.then(Vec::new)),
        events: if events {
            Some(db::pool::recent_events(&conn, 20)?)
        } else {
            None
        },
    })
}

/// Slots per type; without a running supervisor every slot is stopped.
fn slots(
    conn: &rusqlite::Connection,
    running: bool,
    live: &[WorkerLine],
) -> anyhow::Result<(BTreeMap<String, PoolStats>, Vec<Waiting>)> {
    let mut pools: BTreeMap<String, PoolStats> = BTreeMap::new();
    let mut waiting = Vec::new();
    for s in db::pool::slots(conn)? {
        let state = if running { s.state } else { SlotState::Stopped };
        if matches!(state, SlotState::Backoff | SlotState::Failed) {
            waiting.push(Waiting {
                worker_type: s.worker_type.clone(),
                slot: s.slot,
                state,
                why: s.note.clone().or_else(|| s.last_cause.clone()),
            });
        }
        let p = pools.entry(s.worker_type.clone()).or_insert_with(|| PoolStats {
            execution_mode: s.execution_mode,
            wanted: 0,
            slots: 0,
            running: 0,
            starting: 0,
            backoff: 0,
            failed: 0,
            stopped: 0,
            restarts: 0,
            memory_mib: 0.0,
        });
        p.execution_mode = s.execution_mode;
        p.slots += 1;
        p.restarts += s.restarts;
        *match state {
            SlotState::Running => &mut p.running,
            SlotState::Starting => &mut p.starting,
            SlotState::Backoff => &mut p.backoff,
            SlotState::Failed => &mut p.failed,
            SlotState::Stopped => &mut p.stopped,
        } += 1;
    }
    let wanted = db::pool::wanted(conn)?;
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

pub fn render(s: &Stats) -> String {
    let mut out = format!(
        "database:   {}\nprotocol:   {}\n{}\n{}\n\n{}\n\n{}",
        s.db_path,
        s.protocol,
        supervisor_line(&s.supervisor),
        health_line(&s.health),
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
    if let Some(list) = &s.worker_list {
        out.push('\n');
        out.push_str(&workers_table(list));
    }
    if let Some(events) = &s.events {
        out.push_str(&events_text(events));
    }
    out
}

fn supervisor_line(sup: &SupervisorStats) -> String {
    let since = sup.started_at.as_deref().unwrap_or("?");
    match (sup.running, &sup.state) {
        (true, state) => format!(
            "supervisor: {} (pid {}, since {since} UTC, {} configured)",
            state.unwrap_or(SupervisorState::Starting),
            sup.pid.unwrap_or(0),
            plural(sup.expected_workers, "worker", "workers")
        ),
        (false, Some(_)) if sup.stopped_uncleanly => format!(
            "supervisor: not running; the run started {since} UTC ended without stopping its pool (killed or crashed){}, so none of its workers runs",
            sup.ended_uncleanly_at
                .as_deref()
                .map(|at| format!(" at about {at} UTC"))
                .unwrap_or_default()
        ),
        (false, Some(_)) => format!(
            "supervisor: not running (the last run stopped {} UTC)",
            sup.stopped_at.as_deref().unwrap_or("?")
        ),
        (false, None) => "supervisor: not running (no pool has run on this database)".into(),
    }
}

fn health_line(h: &Health) -> String {
    let status = match h.status {
        HealthStatus::Healthy => paint("healthy", "32"),
        HealthStatus::Degraded => paint("degraded", "33"),
        HealthStatus::Down => paint("down", "31"),
    };
    if h.reasons.is_empty() {
        format!("health:     {status}")
    } else {
        format!("health:     {status}: {}", h.reasons.join("; "))
    }
}

/// `text` in an ANSI colour, when colour is on for stdout.
fn paint(text: &str, code: &str) -> String {
    if super::colour::enabled_on_stdout() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn pools_table(s: &Stats) -> Table {
    let mut types: Vec<&String> = s.workers.keys().chain(s.pools.keys()).collect();
    types.sort();
    types.dedup();
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "TYPE", "MODE", "WANTED", "RUNNING", "STARTING", "BACKOFF", "FAILED", "RESTARTS", "IDLE", "BUSY", "HUNG",
        "DEAD", "MEMORY",
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
            pn(|p| p.wanted),
            pn(|p| p.running),
            pn(|p| p.starting),
            pn(|p| p.backoff),
            pn(|p| p.failed),
            pn(|p| p.restarts),
            n(WorkerStatus::Idle),
            n(WorkerStatus::Busy),
            n(WorkerStatus::Hung),
            n(WorkerStatus::Dead),
            p.filter(|p| p.memory_mib > 0.0)
                .map(|p| format!("{:.0} MiB", p.memory_mib))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

fn workers_table(list: &[WorkerLine]) -> String {
    if list.is_empty() {
        return "workers: none running\n".into();
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "ROW", "TYPE", "SLOT", "WORKER", "PID", "STATUS", "JOB", "FOR", "CPU", "MEMORY", "DONE", "FAILED",
    ]);
    let dash = || "-".to_string();
    for w in list {
        t.add_row(
            [
                w.row.to_string(),
                w.worker_type.clone(),
                w.slot.map(|s| s.to_string()).unwrap_or_else(dash),
                w.worker_id.to_string(),
                w.pid.map(|p| p.to_string()).unwrap_or_else(dash),
                w.status.to_string(),
                w.job_id.map(|j| j.to_string()).unwrap_or_else(dash),
            ]
            .into_iter()
            .chain(usage_cells(w))
            .chain([w.jobs_done.to_string(), w.jobs_failed.to_string()])
            .collect::<Vec<_>>(),
        );
    }
    format!("{t}\n")
}

/// A worker's current job's age, CPU and memory, as `stats --workers` and
/// `top` show them ("-" when unknown).
pub fn usage_cells(w: &WorkerLine) -> [String; 3] {
    let dash = || "-".to_string();
    [
        w.job_seconds
            .map(|s| humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string())
            .unwrap_or_else(dash),
        w.cpu_percent.map(|c| format!("{c:.1}%")).unwrap_or_else(dash),
        w.memory_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(dash),
    ]
}

fn jobs_line(s: &Stats) -> String {
    let j = &s.jobs;
    let scope = if s.supervisor.started_at.is_some() {
        "jobs (this run)"
    } else {
        "jobs"
    };
    let mut out = format!(
        "{scope}: {} pending, {} processing, {} completed, {} failed",
        j.pending, j.processing, j.completed, j.failed
    );
    if j.cancelled > 0 || s.protocol == Protocol::Clm {
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
        let tail: Vec<&str> = e
            .log_tail
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        for line in &tail[tail.len().saturating_sub(5)..] {
            out.push_str(&format!("      | {line}\n"));
        }
    }
    out
}

/// `stats --prometheus`: the running supervisor's metrics, or (none
/// running) the database's gauges alone.
pub async fn prometheus(args: &DbArgs) -> anyhow::Result<i32> {
    use crate::supervisor::control::{self, Request};
    let t = target(args)?;
    if let Some(r) = control::ask(&t.db_path, &Request::Metrics, control::ANSWER_WITHIN).await?
        && r.ok
    {
        super::print(&r.lines.join("\n"));
        return Ok(exit::OK);
    }
    let (conn, protocol) = db::open_for_reading(&t.db_path)?;
    super::print(crate::supervisor::metrics::render(&conn, protocol, None)?.trim_end());
    Ok(exit::OK)
}

/// The shortest `--watch` interval: each refresh reads the whole database.
pub const MIN_WATCH: Duration = Duration::from_millis(200);

pub struct Options {
    pub json: bool,
    pub watch: Option<Duration>,
    pub events: bool,
    pub workers: bool,
    pub check: bool,
}

pub async fn run(args: &DbArgs, o: Options) -> anyhow::Result<i32> {
    if let Some(every) = o.watch
        && every < MIN_WATCH
    {
        return Err(crate::UsageError(format!(
            "--watch {}: the shortest interval is {}",
            humantime::format_duration(every),
            humantime::format_duration(MIN_WATCH)
        ))
        .into());
    }
    let t = target(args)?;
    loop {
        let s = collect(&t.db_path, o.events, o.workers)?;
        let Some(every) = o.watch else {
            if o.check && !o.json {
                super::print(&health_line(&s.health).replacen("health:     ", "", 1));
            } else if o.json {
                super::print(&serde_json::to_string_pretty(&s)?);
            } else {
                super::print(&render(&s));
            }
            return Ok(if o.check { s.health.status.exit_code() } else { 0 });
        };
        if o.json {
            super::print(&serde_json::to_string(&s)?);
        } else if super::colour::stdout_is_terminal() {
            super::print(&format!("\x1b[2J\x1b[H{}", render(&s)));
        } else {
            super::print(&format!("{}\n", render(&s)));
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
