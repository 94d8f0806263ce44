//! The monitor's periodic check, for what sends no event: heartbeats that
//! stopped, jobs that run too long, busy workers that use no CPU. Ages are
//! computed in SQL from UTC `CURRENT_TIMESTAMP` text, never against local
//! time. It also writes each worker's CPU and memory use (its whole process
//! tree, from `/proc`) into `workers.cpu_usage` / `memory_usage`, all rows
//! in one transaction per tick. A hung worker is reported to its slot,
//! which stops and replaces it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{Config, WorkerConfig};
use crate::db::Db;
use crate::executor::docker::DockerEngine;
use crate::procs;

/// A worker found hung: its row and why.
#[derive(Debug, Clone)]
pub struct Hung {
    pub worker_row: i64,
    pub reason: String,
}

pub type SlotKey = (String, u32);

pub struct Monitor {
    pub config: Arc<Config>,
    pub db: Db,
    pub token: CancellationToken,
    pub slots: HashMap<SlotKey, mpsc::UnboundedSender<Hung>>,
    /// For the CPU and memory of docker workers.
    pub engine: Option<Arc<DockerEngine>>,
}

#[derive(Debug)]
struct Observed {
    key: SlotKey,
    row: i64,
    /// The worker's process (direct) …
    pid: Option<i32>,
    /// … or its container (docker).
    container: Option<String>,
    status: String,
    heartbeat_age: i64,
    /// The job in hand: (id, seconds since it started).
    job: Option<(i64, i64)>,
    /// No memory figure was written for it yet (a new worker).
    unmeasured: bool,
}

/// Which workers a tick looks at: on most ticks only those that could be
/// hung (heartbeat or job older than the smallest limit), so an idle pool's
/// tick reads next to nothing; every `USAGE_PERIOD` all of them.
#[derive(Clone, Copy)]
struct Filter {
    min_heartbeat: i64,
    min_job_time: i64,
    /// Some type has the zero-CPU rule: every busy worker is looked at.
    all_busy: bool,
    everything: bool,
}

/// A CPU sample of one worker (its process tree, or its container).
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    cpu_seconds: f64,
}

#[derive(Default)]
struct State {
    /// Latest sample per worker row, for `cpu_usage`.
    last: HashMap<i64, Sample>,
    /// Start of the current low-CPU window per (worker row, job).
    window: HashMap<(i64, i64), Sample>,
    /// Rows already reported hung (the slot is replacing them).
    reported: HashSet<i64>,
    /// What was last written per row: CPU %, MiB.
    written: HashMap<i64, (Option<f64>, f64)>,
    /// When usage was last sampled for every worker.
    sampled_at: Option<Instant>,
}

/// How often CPU and memory are sampled when no zero-CPU rule needs every
/// tick: an idle pool should cost next to nothing.
const USAGE_PERIOD: Duration = Duration::from_secs(30);
/// Figures are rewritten only when they moved this much, so an idle pool's
/// rows are not rewritten every period.
const CPU_STEP: f64 = 1.0;
const MEM_STEP_MIB: f64 = 1.0;

impl Monitor {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.config.pool.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::default();
        let w = &self.config.workers;
        let limits = Filter {
            min_heartbeat: w.iter().map(|w| w.heartbeat_timeout.as_secs()).min().unwrap_or(0) as i64,
            min_job_time: w.iter().map(|w| w.max_job_time.as_secs()).min().unwrap_or(0) as i64,
            all_busy: w.iter().any(|w| w.hung_cpu.is_some()),
            everything: false,
        };
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.check(&mut state, &limits).await {
                warn!("monitor check failed: {e:#}");
            }
            if let Err(e) = self.reconcile().await {
                warn!("monitor reconciliation failed: {e:#}");
            }
            procs::reap_strays();
        }
    }

    async fn check(&self, state: &mut State, limits: &Filter) -> anyhow::Result<()> {
        let now = Instant::now();
        let period_due = state.sampled_at.is_none_or(|t| now.duration_since(t) >= USAGE_PERIOD);
        if period_due {
            state.sampled_at = Some(now);
        }
        let filter = Filter {
            everything: period_due,
            ..*limits
        };
        let observed = self.db.call(move |c| observe(c, &filter)).await?;
        let hz = procs::clock_ticks_per_second() as f64;
        let cpu_rule = |t: &str| {
            self.config
                .workers
                .iter()
                .any(|w| w.worker_type == t && w.hung_cpu.is_some())
        };
        // Sample a worker when its type has the zero-CPU rule, when it is
        // new, or once per period.
        let due: HashSet<i64> = observed
            .iter()
            .filter(|o| period_due || cpu_rule(&o.key.0) || o.unmeasured)
            .map(|o| o.row)
            .collect();
        let pids: Vec<(i64, i32)> = observed
            .iter()
            .filter(|o| due.contains(&o.row))
            .filter_map(|o| Some((o.row, o.pid?)))
            .collect();
        let process_usage: HashMap<i64, (u64, u64)> = tokio::task::spawn_blocking(move || {
            pids.into_iter()
                .filter_map(|(row, pid)| Some((row, procs::tree_usage_of(pid)?)))
                .collect()
        })
        .await?;
        // Containers are sampled concurrently: one-shot stats are fast,
        // but each is a round trip to the engine.
        let container_usage: HashMap<i64, (f64, u64)> = match &self.engine {
            Some(engine) => {
                let asks = observed.iter().filter(|o| due.contains(&o.row)).filter_map(|o| {
                    let id = o.container.clone()?;
                    let row = o.row;
                    Some(async move { engine.usage(&id).await.map(|u| (row, u)) })
                });
                futures_util::future::join_all(asks)
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            }
            None => HashMap::new(),
        };
        let mut usage = Vec::new();
        let by_type: HashMap<&str, &WorkerConfig> = self
            .config
            .workers
            .iter()
            .map(|w| (w.worker_type.as_str(), w))
            .collect();
        if period_due {
            let (keep, age) = (self.config.pool.events_keep, self.config.pool.events_max_age.as_secs());
            self.db
                .call(move |c| crate::db::pool::prune_events(c, keep, age))
                .await?;
        }
        // Only a full observation tells which workers are gone.
        if period_due {
            let live: HashSet<i64> = observed.iter().map(|o| o.row).collect();
            state.last.retain(|row, _| live.contains(row));
            state.window.retain(|(row, _), _| live.contains(row));
            state.reported.retain(|row| live.contains(row));
            state.written.retain(|row, _| live.contains(row));
        }

        for o in &observed {
            let Some(wc) = by_type.get(o.key.0.as_str()) else {
                continue;
            };
            let measured = match o.pid {
                Some(_) => process_usage.get(&o.row).map(|&(ticks, rss)| (ticks as f64 / hz, rss)),
                None => container_usage.get(&o.row).copied(),
            };
            let sample = measured.map(|(cpu_seconds, rss)| (Sample { at: now, cpu_seconds }, rss));
            if let Some((s, rss)) = sample {
                let cpu = state.last.get(&o.row).map(|p| cpu_percent(p, &s));
                state.last.insert(o.row, s);
                let mem = rss as f64 / (1024.0 * 1024.0);
                let moved = match state.written.get(&o.row) {
                    None => true,
                    Some(&(old_cpu, old_mem)) => {
                        (mem - old_mem).abs() >= MEM_STEP_MIB
                            || match (cpu, old_cpu) {
                                (Some(c), Some(o)) => (c - o).abs() >= CPU_STEP,
                                (Some(c), None) => c >= CPU_STEP,
                                _ => false,
                            }
                    }
                };
                if moved {
                    state.written.insert(o.row, (cpu, mem));
                    usage.push((o.row, cpu, mem));
                }
            }
            if state.reported.contains(&o.row) {
                continue;
            }
            let reason = match o.job {
                Some((job, age)) if age as f64 > wc.max_job_time.as_secs_f64() => Some(format!(
                    "job {job} has run for {}, longer than max_job_time {}",
                    humantime::format_duration(Duration::from_secs(age as u64)),
                    humantime::format_duration(wc.max_job_time)
                )),
                Some((job, _)) => match (wc.hung_cpu, sample) {
                    (Some(rule), Some((s, _))) => {
                        let start = *state.window.entry((o.row, job)).or_insert(s);
                        let elapsed = s.at.duration_since(start.at);
                        if elapsed >= rule.window {
                            let pct = cpu_percent(&start, &s);
                            state.window.insert((o.row, job), s);
                            (pct < rule.percent).then(|| {
                                format!(
                                    "job {job} used {pct:.1}% CPU over {} (hung_cpu_percent {})",
                                    humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                                    rule.percent
                                )
                            })
                        } else {
                            None
                        }
                    }
                    _ => None,
                },
                None if o.status == "idle" && o.heartbeat_age as f64 > wc.heartbeat_timeout.as_secs_f64() => {
                    Some(format!(
                        "its heartbeat is {} old, older than heartbeat_timeout {}",
                        humantime::format_duration(Duration::from_secs(o.heartbeat_age as u64)),
                        humantime::format_duration(wc.heartbeat_timeout)
                    ))
                }
                None => None,
            };
            if let Some(reason) = reason
                && let Some(tx) = self.slots.get(&o.key)
            {
                warn!(slot = %format!("{}-{}", o.key.0, o.key.1), "worker is hung: {reason}");
                state.reported.insert(o.row);
                let _ = tx.send(Hung {
                    worker_row: o.row,
                    reason,
                });
            }
        }
        if !usage.is_empty() {
            self.db
                .call(move |c| {
                    let tx = c.transaction()?;
                    {
                        let mut stmt = tx.prepare_cached(
                            "UPDATE workers SET cpu_usage = COALESCE(?2, cpu_usage), memory_usage = ?3 WHERE id = ?1",
                        )?;
                        for (row, cpu, mem) in usage {
                            stmt.execute(rusqlite::params![row, cpu, mem])?;
                        }
                    }
                    tx.commit()
                })
                .await?;
        }
        Ok(())
    }
}

/// A job claimed this recently is never taken back by reconciliation: its
/// worker may have registered a moment before its slot recorded it.
const RECONCILE_GRACE_SECONDS: i64 = 5;

impl Monitor {
    /// The safety net under every other recovery: any job still
    /// `processing` under a worker that is gone goes back to the queue.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let protocol = self.db.protocol();
        let me = i64::from(std::process::id());
        let found = self
            .db
            .call(move |c| crate::db::jobs::reconcile(c, protocol, me, RECONCILE_GRACE_SECONDS))
            .await?;
        for r in found {
            warn!(
                worker = r.worker_id.as_deref().unwrap_or("(unknown)"),
                row = ?r.worker_row,
                requeued = ?r.requeued,
                failed = ?r.failed,
                "found jobs held by a worker that is gone; put them back"
            );
        }
        Ok(())
    }
}

fn cpu_percent(from: &Sample, to: &Sample) -> f64 {
    let secs = to.at.duration_since(from.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (to.cpu_seconds - from.cpu_seconds).max(0.0) / secs * 100.0
}

/// Every registered worker of a running slot, with its heartbeat age and
/// the age of the job it holds, all computed by SQLite in UTC.
fn observe(c: &mut rusqlite::Connection, f: &Filter) -> rusqlite::Result<Vec<Observed>> {
    let mut stmt = c.prepare_cached(
        "SELECT * FROM (
            SELECT s.worker_type, s.slot, w.id, s.pid, w.status, s.execution_mode, s.worker_id,
                   COALESCE(unixepoch('now') - unixepoch(w.last_heartbeat), 0) AS hb_age,
                   j.id AS job, unixepoch('now') - unixepoch(j.started_at) AS job_age,
                   w.memory_usage IS NULL AS unmeasured, j.started_at AS job_started
            FROM clx_pool_slots s
            JOIN workers w ON w.id = s.worker_row
            LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = 'processing'
            WHERE s.state = 'running')
         WHERE ?4 OR unmeasured
            OR (job IS NULL AND hb_age > ?1)
            OR (job IS NOT NULL AND (job_age > ?2 OR ?3))
         ORDER BY worker_type, slot, job_started",
    )?;
    let params = rusqlite::params![f.min_heartbeat, f.min_job_time, f.all_busy, f.everything];
    let rows = stmt.query_map(params, |r| {
        let job: Option<i64> = r.get(8)?;
        let age: Option<i64> = r.get(9)?;
        let mode: String = r.get(5)?;
        Ok(Observed {
            key: (r.get(0)?, r.get(1)?),
            row: r.get(2)?,
            pid: r.get::<_, Option<i64>>(3)?.map(|p| p as i32),
            container: if mode.starts_with("docker") { r.get(6)? } else { None },
            status: r.get(4)?,
            heartbeat_age: r.get(7)?,
            job: job.map(|j| (j, age.unwrap_or(0))),
            unmeasured: r.get(10)?,
        })
    })?;
    let mut out: Vec<Observed> = Vec::new();
    for o in rows {
        let o = o?;
        // Several jobs in hand: the oldest (first) decides.
        if out.last().is_some_and(|l| l.row == o.row) {
            continue;
        }
        out.push(o);
    }
    Ok(out)
}
