//! The monitor's periodic tick, for what sends no event: hung workers
//! (the pure rules in `rules.rs`), each worker's CPU and memory
//! (`usage.rs`, sampled from its process tree in `/proc` or from the
//! engine, written only when moved), the reconciliation pass that puts
//! back jobs of workers that are gone, the bounded event history, and the
//! reaping of orphans adopted as child subreaper. A hung worker is
//! reported to its slot, which stops and replaces it.

pub mod rules;
pub mod usage;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Config;
use crate::db::Db;
use crate::db::monitor::{Filter, Observed};
use crate::executor::docker::DockerEngine;
use crate::procs;
use crate::vocab::{HungReason, SlotId, WorkerRow};
use rules::{Limits, Sample, Seen};

/// A worker found hung: its row and why.
#[derive(Debug, Clone)]
pub struct Hung {
    pub worker_row: WorkerRow,
    pub reason: HungReason,
}

pub struct Monitor {
    pub config: Arc<Config>,
    pub db: Db,
    pub token: CancellationToken,
    pub slots: HashMap<SlotId, mpsc::UnboundedSender<Hung>>,
    /// For the CPU and memory of docker workers.
    pub engine: Option<Arc<DockerEngine>>,
}

/// How often CPU and memory are sampled when no zero-CPU rule needs every
/// tick: an idle pool should cost next to nothing.
const USAGE_PERIOD: Duration = Duration::from_secs(30);

/// A job claimed this recently is never taken back by reconciliation: its
/// worker may have registered a moment before its slot recorded it.
const RECONCILE_GRACE_SECONDS: i64 = 5;

#[derive(Default)]
struct State {
    usage: usage::Usage,
    /// Start of the current window of the zero-CPU rule, per (row, job).
    windows: HashMap<(WorkerRow, i64), Sample>,
    /// Rows already reported hung (their slot is replacing them).
    reported: HashSet<WorkerRow>,
    /// When usage was last sampled for every worker.
    sampled_at: Option<Instant>,
}

impl Monitor {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.config.pool.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::default();
        let limits: HashMap<String, Limits> = self
            .config
            .workers
            .iter()
            .map(|w| {
                let l = Limits {
                    heartbeat_timeout: w.heartbeat_timeout,
                    max_job_time: w.max_job_time,
                    hung_cpu: w.hung_cpu,
                };
                (w.worker_type.clone(), l)
            })
            .collect();
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.tick(&mut state, &limits).await {
                warn!("monitor check failed: {e:#}");
            }
            if let Err(e) = self.reconcile().await {
                warn!("monitor reconciliation failed: {e:#}");
            }
            procs::reap();
        }
    }

    fn filter(&self, everything: bool) -> Filter {
        let w = &self.config.workers;
        Filter {
            min_heartbeat: w.iter().map(|w| w.heartbeat_timeout).min().unwrap_or_default(),
            min_job_time: w.iter().map(|w| w.max_job_time).min().unwrap_or_default(),
            all_busy: w.iter().any(|w| w.hung_cpu.is_some()),
            everything,
        }
    }

    async fn tick(&self, state: &mut State, limits: &HashMap<String, Limits>) -> anyhow::Result<()> {
        let now = Instant::now();
        let period_due = state.sampled_at.is_none_or(|t| now.duration_since(t) >= USAGE_PERIOD);
        if period_due {
            state.sampled_at = Some(now);
        }
        let filter = self.filter(period_due);
        let observed = self.db.call(move |c| crate::db::monitor::observe(c, &filter)).await?;
        // Sample a worker when its type has the zero-CPU rule, when it is
        // new, or once per period.
        let due: Vec<&Observed> = observed
            .iter()
            .filter(|o| {
                period_due || o.unmeasured || limits.get(&o.slot.worker_type).is_some_and(|l| l.hung_cpu.is_some())
            })
            .collect();
        let samples = self.sample(&due, now).await?;
        if period_due {
            // Only a full observation tells which workers are gone.
            let live: HashSet<WorkerRow> = observed.iter().map(|o| o.row).collect();
            state.usage.retain(|r| live.contains(r));
            state.windows.retain(|(r, _), _| live.contains(r));
            state.reported.retain(|r| live.contains(r));
            let (keep, age) = (self.config.pool.events_keep, self.config.pool.events_max_age.as_secs());
            self.db
                .call(move |c| crate::db::pool::prune_events(c, keep, age))
                .await?;
        }
        let mut writes = Vec::new();
        for o in &observed {
            let sample = samples.get(&o.row).copied();
            if let Some((s, rss)) = sample
                && let Some((cpu, mem)) = state.usage.record(o.row, s, rss)
            {
                writes.push((o.row, cpu, mem));
            }
            let Some(l) = limits.get(&o.slot.worker_type) else {
                continue;
            };
            if !state.reported.contains(&o.row)
                && let Some(reason) = judge(state, o, l, sample.map(|(s, _)| s))
            {
                self.report(state, o, reason);
            }
        }
        if !writes.is_empty() {
            self.db
                .call(move |c| crate::db::monitor::write_usage(c, &writes))
                .await?;
        }
        Ok(())
    }

    /// CPU seconds and resident bytes of each worker due: its process tree
    /// from `/proc`, or its container from the engine (concurrently: each
    /// is a round trip).
    async fn sample(&self, due: &[&Observed], now: Instant) -> anyhow::Result<HashMap<WorkerRow, (Sample, u64)>> {
        let hz = procs::clock_ticks_per_second() as f64;
        let pids: Vec<(WorkerRow, i32)> = due.iter().filter_map(|o| Some((o.row, o.pid?))).collect();
        let mut out: HashMap<WorkerRow, (Sample, u64)> = tokio::task::spawn_blocking(move || {
            pids.into_iter()
                .filter_map(|(row, pid)| {
                    let (ticks, rss) = procs::tree_usage_of(pid)?;
                    Some((
                        row,
                        (
                            Sample {
                                at: now,
                                cpu_seconds: ticks as f64 / hz,
                            },
                            rss,
                        ),
                    ))
                })
                .collect()
        })
        .await?;
        if let Some(engine) = &self.engine {
            let asks = due.iter().filter_map(|o| {
                let id = o.container.clone()?;
                let row = o.row;
                Some(async move {
                    engine.usage(id.as_str()).await.map(|(cpu, rss)| {
                        (
                            row,
                            (
                                Sample {
                                    at: now,
                                    cpu_seconds: cpu,
                                },
                                rss,
                            ),
                        )
                    })
                })
            });
            out.extend(futures_util::future::join_all(asks).await.into_iter().flatten());
        }
        Ok(out)
    }

    fn report(&self, state: &mut State, o: &Observed, reason: HungReason) {
        let Some(tx) = self.slots.get(&o.slot) else { return };
        warn!(slot = %o.slot, "worker is hung: {reason}");
        state.reported.insert(o.row);
        // A slot that went away has nothing left to replace.
        drop(tx.send(Hung {
            worker_row: o.row,
            reason,
        }));
    }

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

/// Applies the hung rules to one worker, keeping the window of the
/// zero-CPU rule: it starts at the first sample of a job and restarts at
/// each verdict.
fn judge(state: &mut State, o: &Observed, limits: &Limits, sample: Option<Sample>) -> Option<HungReason> {
    let seen = Seen {
        status: o.status,
        heartbeat_age: o.heartbeat_age,
        job: o.job,
    };
    let cpu = match (o.job, limits.hung_cpu, sample) {
        (Some((job, _)), Some(rule), Some(now)) => {
            let start = *state.windows.entry((o.row, job)).or_insert(now);
            let full = now.at.duration_since(start.at) >= rule.window;
            if full {
                state.windows.insert((o.row, job), now);
            }
            full.then_some((start, now))
        }
        _ => None,
    };
    rules::verdict(&seen, limits, cpu)
}
