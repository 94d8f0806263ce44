//! `clx-pool stats`: worker counts per type and status, slot health and
//! restarts, job counts, the supervisor's state; `--json` for scripts (shape
//! documented in docs/cli.md), `--watch` to refresh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use comfy_table::Table;

use super::target;
use crate::cli::DbArgs;
use crate::contract::exit;
use crate::db::{events::EventRow, workers::WorkerLine};
use crate::status::plural;
use crate::status::{self, Detail, Health, HealthStatus, PoolStats, SupervisorStats};
use crate::vocab::{Protocol, SupervisorState, WorkerStatus};

/// The picture `stats` shows (in every format).
pub use crate::status::Status as Stats;

/// Reads the pool's picture for `stats` (and `top`).
pub fn collect(db_path: &Path, events: bool, workers: bool) -> anyhow::Result<Stats> {
    status::read(db_path, Detail { workers, events })
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
    // ENDED: workers of this run that have ended (replaced, retired,
    // stopped), history beside the health verdict, not a sign of trouble.
    t.set_header([
        "TYPE", "MODE", "WANTED", "RUNNING", "STARTING", "BACKOFF", "FAILED", "RESTARTS", "IDLE", "BUSY", "HUNG",
        "ENDED", "MEMORY",
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
    // Swarm workers' tasks get a column of their own, in a pool that has any.
    let tasks = list.iter().any(|w| w.task.is_some());
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    let header = [
        "ROW", "TYPE", "SLOT", "WORKER", "PID/NODE", "STATUS", "JOB", "FOR", "CPU", "MEMORY", "DONE", "FAILED",
    ];
    t.set_header(header.into_iter().chain(tasks.then_some("TASK")));
    let dash = || "-".to_string();
    for w in list {
        t.add_row(
            [
                w.row.to_string(),
                w.worker_type.clone(),
                w.slot.map(|s| s.to_string()).unwrap_or_else(dash),
                w.worker_id.to_string(),
                where_cell(w).unwrap_or_else(dash),
                w.status.to_string(),
                w.job_id.map(|j| j.to_string()).unwrap_or_else(dash),
            ]
            .into_iter()
            .chain(usage_cells(w))
            .chain([w.jobs_done.to_string(), w.jobs_failed.to_string()])
            .chain(tasks.then(|| w.task.clone().unwrap_or_else(dash)))
            .collect::<Vec<_>>(),
        );
    }
    format!("{t}\n")
}

/// Where a worker runs: its swarm node, else its process.
pub fn where_cell(w: &WorkerLine) -> Option<String> {
    match (&w.node, w.pid) {
        (Some(node), _) => Some(node.clone()),
        (None, Some(p)) => Some(p.to_string()),
        (None, None) => None,
    }
}

/// A worker's status in a word (`top`): its swarm task's state while
/// that is not `running` (`pending`, `preparing`: the word before Swarm's
/// reason), else the worker's own.
pub fn status_cell(w: &WorkerLine) -> String {
    match w.task.as_deref().map(|t| t.split(':').next().unwrap_or(t)) {
        Some(state) if state != "running" => state.to_string(),
        _ => w.status.to_string(),
    }
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
    use crate::contract::control::{self, Request};
    let t = target(args)?;
    if let Some(r) = control::ask(&t.db_path, &Request::Metrics, control::ANSWER_WITHIN).await?
        && r.ok
    {
        super::print(&r.lines.join("\n"));
        return Ok(exit::OK);
    }
    let status = status::read(&t.db_path, Detail::GAUGES)?;
    super::print(crate::status::prometheus::render(&status, |_| ())?.trim_end());
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
        let s = match collect(&t.db_path, o.events, o.workers) {
            // A pool without a database is down, in --check's one line.
            Err(e)
                if o.check && !o.json && o.watch.is_none() && e.downcast_ref::<crate::db::NoDatabase>().is_some() =>
            {
                super::print(&format!("down: {e}"));
                return Ok(HealthStatus::Down.exit_code());
            }
            other => other?,
        };
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
