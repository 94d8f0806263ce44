//! `clx-pool top`: a live view of a pool (ratatui): one row per worker
//! (slot, pid or container, status, current job and its age, CPU, memory,
//! jobs done), totals per type, the queue and a sparkline of completed jobs
//! per second, the latest events; keys to restart the selected worker or
//! scale its type through the control socket. What it draws is a pure
//! function of a [`Snapshot`] ([`draw`]), tested with ratatui's test
//! backend.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Sparkline, Table, TableState};

use super::stats::{self, Stats};
use super::target;
use crate::cli::DbArgs;
use crate::contract::control::{self, Request};
use crate::db::workers::WorkerLine;
use crate::procs;
use crate::procs::{Sample, cpu_percent};

/// What one refresh shows.
pub struct Snapshot {
    pub stats: Stats,
    /// Pending jobs and the oldest one's age in seconds, per job type.
    pub queue: HashMap<String, (i64, f64)>,
    /// Jobs completed per second, oldest first.
    pub rates: Vec<u64>,
}

/// What the person at the keyboard did.
pub struct Ui {
    pub selected: TableState,
    /// The answer to the last key, for the bottom line.
    pub message: String,
    /// Why the last refresh failed, shown instead while it lasts.
    pub problem: Option<String>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            selected: TableState::default().with_selected(Some(0)),
            message: "q quit · ↑↓ select · r restart the worker · +/- scale its type".into(),
            problem: None,
        }
    }
}

/// Draws a snapshot.
pub fn draw(frame: &mut Frame, snap: &Snapshot, ui: &mut Ui) {
    let s = &snap.stats;
    let [head, types, workers, spark, events, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(
            (s.pools.len() + snap.queue.keys().filter(|t| !s.pools.contains_key(*t)).count()) as u16 + 3,
        ),
        Constraint::Min(5),
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header(s)), head);
    frame.render_widget(types_table(s, &snap.queue), types);
    let rows = s.worker_list.as_deref().unwrap_or(&[]);
    keep_selection_within(&mut ui.selected, rows.len());
    frame.render_stateful_widget(workers_table(rows), workers, &mut ui.selected);
    frame.render_widget(rates_sparkline(&snap.rates), spark);
    frame.render_widget(
        Paragraph::new(event_lines(s)).block(Block::bordered().title("recent events")),
        events,
    );
    frame.render_widget(
        Paragraph::new(ui.problem.clone().unwrap_or_else(|| ui.message.clone())),
        foot,
    );
}

/// The top two lines: the pool, its supervisor and health, then the queue
/// and this run's job counts.
fn header(s: &Stats) -> Vec<Line<'static>> {
    let sup = match (s.supervisor.running, s.supervisor.pid) {
        (true, Some(pid)) => format!(
            "supervisor pid {pid}, {}",
            s.supervisor.state.map(|st| st.to_string()).unwrap_or_default()
        ),
        _ if s.supervisor.stopped_uncleanly => "supervisor: ended without stopping its pool".into(),
        _ => "supervisor: not running".into(),
    };
    let j = &s.jobs;
    vec![
        Line::from(format!("clx-pool top · {} · {} · health: {:?}", s.db_path, sup, s.health.status).to_lowercase()),
        Line::from(format!(
            "queue: {} pending, {} processing · this run: {} completed, {} failed, {} cancelled",
            j.pending, j.processing, j.completed, j.failed, j.cancelled
        )),
    ]
}

/// Moves the selection onto the last worker row when the rows it pointed at
/// are gone.
fn keep_selection_within(selected: &mut TableState, rows: usize) {
    if let Some(sel) = selected.selected()
        && sel >= rows
    {
        selected.select(rows.checked_sub(1));
    }
}

/// Jobs completed per second, titled with the latest rate.
fn rates_sparkline(rates: &[u64]) -> Sparkline<'_> {
    let last = rates.last().copied().unwrap_or(0);
    Sparkline::default()
        .block(Block::bordered().title(format!("jobs completed per second (now {last})")))
        .data(rates)
}

/// The latest five events, newest first, or a line saying what would show.
fn event_lines(s: &Stats) -> Vec<Line<'static>> {
    let mut lines: Vec<Line> = s
        .events
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .rev()
        .take(5)
        .map(|e| {
            Line::from(format!(
                "{} {}-{} {}: {}",
                e.at,
                e.worker_type,
                e.slot,
                e.event,
                e.cause.as_deref().unwrap_or("")
            ))
        })
        .collect();
    if lines.is_empty() {
        lines.push(Line::from(
            "none: worker deaths, hung kills, recycles and restarts show here",
        ));
    }
    lines
}

fn types_table(s: &Stats, queue: &HashMap<String, (i64, f64)>) -> Table<'static> {
    let pending = |t: &str| match queue.get(t) {
        Some(&(n, age)) if n > 0 => format!(
            "{n} (oldest {})",
            humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
        ),
        _ => "0".into(),
    };
    let mut rows: Vec<Row> = s
        .pools
        .iter()
        .map(|(t, p)| {
            Row::new(vec![
                t.clone(),
                p.execution_mode.to_string(),
                p.wanted.to_string(),
                p.running.to_string(),
                (p.starting + p.backoff).to_string(),
                p.failed.to_string(),
                p.restarts.to_string(),
                format!("{:.0} MiB", p.memory_mib),
                pending(t),
            ])
        })
        .collect();
    // Jobs no worker of this pool takes wait forever: show them too.
    let mut unserved: Vec<&String> = queue.keys().filter(|t| !s.pools.contains_key(*t)).collect();
    unserved.sort();
    for t in unserved {
        let dash = || "-".to_string();
        rows.push(Row::new(vec![
            t.clone(),
            "no workers".into(),
            dash(),
            dash(),
            dash(),
            dash(),
            dash(),
            dash(),
            pending(t),
        ]));
    }
    Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(14),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Min(8),
        ],
    )
    .header(Row::new(vec![
        "TYPE", "MODE", "WANTED", "RUNNING", "WAITING", "FAILED", "RESTARTS", "MEMORY", "PENDING",
    ]))
    .block(Block::bordered().title("pools"))
}

fn workers_table(list: &[WorkerLine]) -> Table<'static> {
    let dash = || "-".to_string();
    let rows: Vec<Row> = list
        .iter()
        .map(|w| {
            let first = [
                format!(
                    "{}-{}",
                    w.worker_type,
                    w.slot.map(|s| s.to_string()).unwrap_or_else(dash)
                ),
                stats::where_cell(w).unwrap_or_else(|| w.worker_id.to_string()),
                stats::status_cell(w),
                w.job_id.map(|j| j.to_string()).unwrap_or_else(dash),
            ];
            Row::new(
                first
                    .into_iter()
                    .chain(stats::usage_cells(w))
                    .chain([format!("{}/{}", w.jobs_done, w.jobs_failed)]),
            )
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(18),
            Constraint::Length(14),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(12),
        ],
    )
    .header(Row::new(vec![
        "SLOT",
        "PID/NODE/ID",
        "STATUS",
        "JOB",
        "FOR",
        "CPU",
        "MEMORY",
        "DONE/FAILED",
    ]))
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
    .block(Block::bordered().title("workers"))
}

/// What top remembers between refreshes: the last minute of completed-job
/// counts, and each direct worker's last CPU sample.
#[derive(Default)]
pub struct History {
    last: Option<(Instant, i64)>,
    per_second: VecDeque<u64>,
    cpu: HashMap<i64, Sample>,
}

impl History {
    fn rates(&mut self, completed: i64) -> Vec<u64> {
        let now = Instant::now();
        if let Some((at, before)) = self.last {
            let secs = now.duration_since(at).as_secs_f64().max(0.001);
            self.per_second
                .push_back(((completed - before).max(0) as f64 / secs).round() as u64);
            if self.per_second.len() > 60 {
                self.per_second.pop_front();
            }
        }
        self.last = Some((now, completed));
        self.per_second.iter().copied().collect()
    }

    /// Direct workers run on this machine: their CPU (since the last
    /// refresh) and memory come from `/proc`, fresher than the
    /// supervisor's figures in the database (taken every 30 s).
    fn live_usage(&mut self, workers: &mut [WorkerLine]) {
        let hz = procs::clock_ticks_per_second() as f64;
        let now = tokio::time::Instant::now();
        let mut seen = HashMap::new();
        for w in workers.iter_mut() {
            let Some(pid) = w.pid else { continue };
            let Some((ticks, rss)) = i32::try_from(pid).ok().and_then(procs::tree_usage_of) else {
                continue;
            };
            let sample = Sample {
                at: now,
                cpu_seconds: ticks as f64 / hz,
            };
            if let Some(prev) = self.cpu.get(&pid) {
                w.cpu_percent = Some(cpu_percent(prev, &sample));
            }
            w.memory_mib = Some(rss as f64 / (1024.0 * 1024.0));
            seen.insert(pid, sample);
        }
        self.cpu = seen;
    }
}

/// A snapshot of the pool at `db_path` (its workers and recent events too).
pub fn snapshot(db_path: &std::path::Path, history: &mut History) -> anyhow::Result<Snapshot> {
    let mut stats = stats::collect(db_path, true, true)?;
    if let Some(list) = stats.worker_list.as_mut() {
        history.live_usage(list);
        for (t, p) in stats.pools.iter_mut() {
            p.memory_mib = list
                .iter()
                .filter(|w| &w.worker_type == t)
                .filter_map(|w| w.memory_mib)
                .sum();
        }
    }
    let rates = history.rates(stats.jobs.completed);
    let queue = stats.pending().map(|(t, n, age)| (t.to_string(), (n, age))).collect();
    Ok(Snapshot { stats, queue, rates })
}

pub async fn run(args: &DbArgs) -> anyhow::Result<i32> {
    let t = target(args)?;
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(crate::UsageError("`top` needs a terminal (use `stats --watch` in a pipe)".into()).into());
    }
    let mut terminal = ratatui::init();
    let result = view(&mut terminal, &t.db_path).await;
    ratatui::restore();
    result.map(|()| 0)
}

async fn view(terminal: &mut ratatui::DefaultTerminal, db: &std::path::Path) -> anyhow::Result<()> {
    let (mut ui, mut history) = (Ui::default(), History::default());
    let mut snap = snapshot(db, &mut history)?;
    let mut refreshed = Instant::now();
    let mut acted = false;
    // Drawn when something changed (a refresh, a key, a resize), not at
    // every wake-up: a frame of a thousand workers costs more than a poll.
    let mut changed = true;
    loop {
        if std::mem::take(&mut changed) {
            terminal.draw(|f| draw(f, &snap, &mut ui))?;
        }
        // A key or a resize: drawn again either way.
        changed = event::poll(Duration::from_millis(100))?;
        if changed
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            let selected = ui
                .selected
                .selected()
                .and_then(|i| snap.stats.worker_list.as_ref()?.get(i).cloned());
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Down => ui.selected.select_next(),
                KeyCode::Up => ui.selected.select_previous(),
                KeyCode::Char('r') => {
                    if let Some(w) = selected.filter(|w| w.slot.is_some()) {
                        let slot = format!("{}-{}", w.worker_type, w.slot.unwrap_or(0));
                        let request = Request::Restart {
                            targets: vec![slot],
                            rolling: false,
                            now: false,
                        };
                        ui.message = ask(db, request).await;
                    }
                }
                KeyCode::Char(c @ ('+' | '-')) => {
                    if let Some(w) = selected
                        && let Some(p) = snap.stats.pools.get(&w.worker_type)
                    {
                        let n = if c == '+' { p.wanted + 1 } else { (p.wanted - 1).max(0) };
                        let request = Request::Scale {
                            counts: vec![(w.worker_type.clone(), n as u32)],
                            now: false,
                        };
                        ui.message = ask(db, request).await;
                    }
                }
                _ => {}
            }
            // What a key did shows at once, not at the next second.
            acted = matches!(key.code, KeyCode::Char('r' | '+' | '-'));
        }
        if std::mem::take(&mut acted) || refreshed.elapsed() >= Duration::from_secs(1) {
            // A failed refresh (the file moved, a disk error) is shown and
            // retried; the last picture stays.
            match snapshot(db, &mut history) {
                Ok(s) => (snap, ui.problem) = (s, None),
                Err(e) => ui.problem = Some(format!("refreshing: {e:#}")),
            }
            refreshed = Instant::now();
            changed = true;
        }
    }
}

async fn ask(db: &std::path::Path, request: Request) -> String {
    match control::ask(db, &request, control::ANSWER_WITHIN).await {
        Ok(Some(r)) => r.lines.join("; "),
        Ok(None) => "no supervisor is running".into(),
        Err(e) => format!("{e:#}"),
    }
}
