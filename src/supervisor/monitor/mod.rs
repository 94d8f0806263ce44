//! The monitor's periodic tick, for what sends no event: hung workers
//! (the pure rules in `rules.rs`), each worker's CPU and memory
//! (`usage.rs`, sampled from its process tree in `/proc` or from the
//! engine, written only when moved), the reconciliation pass that puts
//! back jobs of workers that are gone, the bounded event history, and the
//! reaping of orphans adopted as child subreaper. A hung worker is
//! reported to its slot, which stops and replaces it.

pub mod liveness;
pub mod rules;
pub mod usage;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::observe::notify::Notifier;
use super::observe::sdnotify::SdNotify;
use super::shared::{SharedConfig, lock};
use super::slot::{Command, Directory, Hung, Order, Why};
use crate::config::{Config, WorkerProgram};
use crate::db::Db;
use crate::db::slots::Observed;
use crate::executor::backends::{Backends, Place};
use crate::procs;
use crate::vocab::{HungReason, WorkerRow};
use rules::{Limits, Sample, Seen};

pub struct Monitor {
    /// The config in force (a reload replaces it).
    pub config: SharedConfig,
    pub db: Db,
    pub token: CancellationToken,
    /// The running slots: hung reports and recycling orders go there.
    pub slots: Directory,
    /// For the CPU and memory of docker workers.
    pub backends: Backends,
    /// `on_event`: told of hung kills and jobs failed for good.
    pub notifier: Notifier,
    /// systemd's watchdog is fed from every tick.
    pub sd: SdNotify,
    /// Job durations go into its histogram.
    pub metrics: Arc<super::observe::metrics::Metrics>,
    /// Told when workers registered.
    pub registrations: Arc<tokio::sync::Notify>,
}

/// How often CPU and memory are sampled when no zero-CPU rule needs every
/// tick: an idle pool should cost next to nothing.
const USAGE_PERIOD: Duration = Duration::from_secs(30);

/// How long a tick waits for the database's write lock: a worker's own
/// writes take well under a millisecond; a writer holding it longer is a
/// lock no worker can heartbeat through.
const PROBE_WAIT: Duration = Duration::from_millis(200);

/// A tick whose look at the database took longer than this waited for it
/// (a write of the supervisor's own stuck behind a lock): it is no
/// evidence against a worker.
const SLOW_LOOK: Duration = Duration::from_secs(1);

/// How soon after workers registered the monitor looks at them (their
/// memory in `stats`), when its next regular look is later.
const MEASURE_NEW_WITHIN: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    /// Signs of life and job ages on the monotonic clock.
    liveness: liveness::Liveness,
    usage: usage::Usage,
    /// Start of the current window of the zero-CPU rule, per (row, job).
    windows: HashMap<(WorkerRow, i64), Sample>,
    /// Rows already reported hung (their slot is replacing them).
    reported: HashSet<WorkerRow>,
    /// When usage was last sampled for every worker.
    sampled_at: Option<Instant>,
    /// Rows already asked to recycle.
    recycling: HashSet<WorkerRow>,
    /// Failed jobs already notified (with `on_event`).
    notified: HashSet<i64>,
    /// Completed jobs already counted in the duration histogram: the
    /// latest completion time seen, and the ids completed at that time.
    completed_since: Option<String>,
    completed_at_edge: HashSet<i64>,
    /// The STATUS last sent to systemd.
    sd_status: Option<String>,
}

impl State {
    /// Forgets the workers that are gone.
    fn forget(&mut self, live: impl Fn(&WorkerRow) -> bool) {
        self.liveness.retain(&live);
        self.usage.retain(&live);
        self.windows.retain(|(r, _), _| live(r));
        self.reported.retain(|r| live(r));
        self.recycling.retain(|r| live(r));
    }
}

/// What a type's workers are judged by.
struct Rules {
    limits: Limits,
    max_jobs: Option<u32>,
    max_memory: Option<u64>,
    /// The built-in worker counts its jobs itself (`--max-jobs`).
    builtin: bool,
}

impl Monitor {
    fn current(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn rules(&self) -> HashMap<String, Rules> {
        self.current()
            .workers
            .iter()
            .map(|w| {
                let r = Rules {
                    limits: Limits {
                        heartbeat_timeout: w.heartbeat_timeout,
                        max_job_time: w.max_job_time,
                        hung_cpu: w.hung_cpu,
                    },
                    max_jobs: w.max_jobs,
                    max_memory: w.max_memory,
                    builtin: matches!(w.program, WorkerProgram::JobCommand(_)),
                };
                (w.worker_type.clone(), r)
            })
            .collect()
    }

    pub async fn run(self) {
        // Often enough for systemd's watchdog, if it asked for one.
        let mut every = self.current().pool.check_interval;
        if let Some(w) = self.sd.watchdog() {
            every = every.min(w / 2);
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::default();
        // When the next look is due: new workers bring it forward (their
        // usage is shown soon), never later (the hung rules keep their pace).
        let mut scheduled = Instant::now();
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.registrations.notified() => {
                    let soon = Instant::now() + MEASURE_NEW_WITHIN;
                    if soon < scheduled {
                        tick.reset_at(soon);
                        scheduled = soon;
                    }
                    continue;
                }
            }
            scheduled = Instant::now() + every;
            let rules = self.rules();
            match self.tick(&mut state, &rules).await {
                Ok(()) => self.sd.watchdog_ping(),
                Err(e) => warn!("monitor check failed: {e:#}"),
            }
            if let Err(e) = self.count_completed_jobs(&mut state).await {
                warn!("monitor: reading completed jobs: {e:#}");
            }
            if self.sd.is_ready()
                && let Err(e) = self.tell_systemd(&mut state).await
            {
                tracing::debug!("monitor: the status for systemd: {e:#}");
            }
            if self.notifier.enabled()
                && let Err(e) = self.notify_failed_jobs(&mut state).await
            {
                warn!("monitor: looking for failed jobs: {e:#}");
            }
            if let Err(e) = self.reconcile().await {
                warn!("monitor reconciliation failed: {e:#}");
            }
            procs::reap();
        }
    }

    async fn tick(&self, state: &mut State, rules: &HashMap<String, Rules>) -> anyhow::Result<()> {
        let now = Instant::now();
        let period_due = state.sampled_at.is_none_or(|t| now.duration_since(t) >= USAGE_PERIOD);
        if period_due {
            state.sampled_at = Some(now);
        }
        let observed = self.look(state, now).await?;
        // Sample a worker when its type has the zero-CPU rule, when it is
        // new, or once per period.
        let due: Vec<&Observed> = observed
            .iter()
            .filter(|o| {
                period_due
                    || o.unmeasured
                    || rules
                        .get(&o.slot.worker_type)
                        .is_some_and(|r| r.limits.hung_cpu.is_some() || r.max_memory.is_some())
            })
            .collect();
        let samples = self.sample(&due, now).await?;
        let live: HashSet<WorkerRow> = observed.iter().map(|o| o.row).collect();
        state.forget(|r| live.contains(r));
        if period_due {
            let pool = self.current().pool.clone();
            let (keep, age) = (pool.events_keep, pool.events_max_age.as_secs());
            self.db
                .call(move |c| crate::db::events::prune_events(c, keep, age))
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
            self.watch(state, o, rules, sample);
        }
        if !writes.is_empty() {
            self.db
                .call(move |c| crate::db::workers::write_usage(c, &writes))
                .await?;
        }
        Ok(())
    }

    /// What the database says of every worker; whether it could be written
    /// (quickly) feeds the credible clock.
    async fn look(&self, state: &mut State, now: Instant) -> anyhow::Result<Vec<Observed>> {
        let looked = self
            .db
            .call(|c| {
                let observed = crate::db::slots::observe(c)?;
                Ok((observed, crate::db::writable(c, PROBE_WAIT)?))
            })
            .await;
        let healthy = matches!(looked, Ok((_, true))) && now.elapsed() < SLOW_LOOK;
        state.liveness.tick(now, healthy);
        if !healthy {
            // No worker could write meanwhile: CPU windows start again.
            state.windows.clear();
        }
        Ok(looked?.0)
    }

    /// Judges one worker: hung (reported, then stopped by its slot), or
    /// due for recycling (its memory).
    fn watch(&self, state: &mut State, o: &Observed, rules: &HashMap<String, Rules>, sample: Option<(Sample, u64)>) {
        let sign = liveness::Sign {
            heartbeat: o.heartbeat.clone(),
            status: o.status.to_string(),
            jobs_done: o.jobs_done,
        };
        let ages = state.liveness.observe(o.row, sign, o.job);
        let Some(r) = rules.get(&o.slot.worker_type) else {
            return;
        };
        let verdict = if state.liveness.healthy() && !state.reported.contains(&o.row) {
            judge(state, o, ages, &r.limits, sample.map(|(s, _)| s))
        } else {
            None
        };
        if let Some(reason) = verdict {
            self.report(state, o, reason);
        } else if !state.recycling.contains(&o.row)
            && let Some(why) = recycle_reason(o, r, sample.map(|(_, rss)| rss))
        {
            self.recycle(state, o, why);
        }
    }

    /// CPU seconds and resident bytes of each worker due, from its backend.
    async fn sample(&self, due: &[&Observed], now: Instant) -> anyhow::Result<HashMap<WorkerRow, (Sample, u64)>> {
        let places = due
            .iter()
            .filter_map(|o| match (o.pid, &o.container) {
                (_, Some(id)) => Some((o.row, Place::Container(id.clone()))),
                (Some(pid), None) => Some((o.row, Place::Process(pid))),
                (None, None) => None,
            })
            .collect();
        let usage = self.backends.usage(places).await?;
        Ok(usage
            .into_iter()
            .map(|(row, (cpu_seconds, rss))| (row, (Sample { at: now, cpu_seconds }, rss)))
            .collect())
    }

    fn report(&self, state: &mut State, o: &Observed, reason: HungReason) {
        let Some(slot) = lock(&self.slots).get(&o.slot).cloned() else {
            return;
        };
        warn!(slot = %o.slot, "worker is hung: {reason}");
        state.reported.insert(o.row);
        self.notifier.send(
            "hung",
            serde_json::json!({ "slot": o.slot.to_string(), "worker_row": o.row, "reason": reason.to_string() }),
        );
        // A slot that went away has nothing left to replace.
        drop(slot.hung.send(Hung {
            worker_row: o.row,
            reason,
        }));
    }

    /// Asks the worker's slot to replace it after its current job.
    fn recycle(&self, state: &mut State, o: &Observed, why: String) {
        let Some(slot) = lock(&self.slots).get(&o.slot).cloned() else {
            return;
        };
        tracing::info!(slot = %o.slot, "recycling the worker: {why}");
        state.recycling.insert(o.row);
        let order = Order::Replace {
            now: false,
            why: Why::Recycle(why),
        };
        drop(slot.orders.send(Command { order, done: None }));
    }

    /// Puts the durations of jobs completed since the last tick (of this
    /// run) into the metrics' histogram.
    async fn count_completed_jobs(&self, state: &mut State) -> anyhow::Result<()> {
        let since = state.completed_since.clone();
        let done = self
            .db
            .call(move |c| crate::db::jobs::counts::completed_since(c, since.as_deref()))
            .await?;
        for (id, job_type, seconds, at) in done {
            if state.completed_since.as_deref() == Some(at.as_str()) && !state.completed_at_edge.insert(id) {
                continue;
            }
            if state.completed_since.as_deref() != Some(at.as_str()) {
                state.completed_since = Some(at);
                state.completed_at_edge = HashSet::from([id]);
            }
            self.metrics.job_finished(&job_type, seconds);
        }
        Ok(())
    }

    /// Keeps systemd's STATUS line current (sent when it changes).
    async fn tell_systemd(&self, state: &mut State) -> anyhow::Result<()> {
        let (protocol, path) = (self.db.protocol(), self.db.path().to_path_buf());
        let status = self
            .db
            .call(move |c| {
                let live = crate::status::Liveness::this_process();
                crate::status::build(c, protocol, &path, live, crate::status::Detail::default())
            })
            .await?;
        let line = crate::status::status_line(&status.summary());
        if state.sd_status.as_deref() != Some(line.as_str()) {
            self.sd.status(&line);
            state.sd_status = Some(line);
        }
        Ok(())
    }

    /// Tells `on_event` of jobs that failed for good since it last looked.
    async fn notify_failed_jobs(&self, state: &mut State) -> anyhow::Result<()> {
        let failed = self.db.call(crate::db::jobs::counts::recently_failed).await?;
        for (id, job_type, error) in failed {
            if state.notified.insert(id) {
                self.notifier.send(
                    "job_failed",
                    serde_json::json!({ "job_id": id, "job_type": job_type, "error": error }),
                );
            }
        }
        Ok(())
    }

    /// The safety net under every other recovery: any job still
    /// `processing` under a worker known to be dead goes back to the queue.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let protocol = self.db.protocol();
        let me = i64::from(std::process::id());
        let found = self
            .db
            .call(move |c| crate::db::jobs::reconcile(c, protocol, me))
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

/// Whether a worker is due for recycling (see `rules::recycle`).
fn recycle_reason(o: &Observed, r: &Rules, rss: Option<u64>) -> Option<String> {
    // The built-in worker stops after `max_jobs` by itself (exactly).
    let max_jobs = if r.builtin { None } else { r.max_jobs };
    rules::recycle(o.jobs_done, rss, max_jobs, r.max_memory)
}

/// Applies the hung rules to one worker, with its ages on the monotonic
/// clock, keeping the window of the zero-CPU rule: it starts at the first
/// sample of a job and restarts at each verdict.
fn judge(
    state: &mut State,
    o: &Observed,
    ages: liveness::Ages,
    limits: &Limits,
    sample: Option<Sample>,
) -> Option<HungReason> {
    let job = o.job.map(|(id, _)| (id, ages.job.unwrap_or_default()));
    let seen = Seen {
        status: o.status,
        heartbeat_age: ages.quiet,
        job,
    };
    let cpu = match (job, limits.hung_cpu, sample) {
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
