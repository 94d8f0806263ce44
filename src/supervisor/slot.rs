//! One slot of a pool: keeps one worker running, replacing it in the same
//! slot when it dies or does not register, under the restart policy. Every
//! end of a worker goes through `db::pool::record_end`, which marks it dead,
//! puts its jobs back and records the event in one transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::monitor::Hung;
use super::policy::{Decision, RestartPolicy};
use super::registry::Registry;
use crate::config::{Config, WorkerConfig};
use crate::db::{self, Db};
use crate::executor::{Launch, Mode, Running};

/// What a slot tells the supervisor the first time it settles.
#[derive(Debug)]
pub enum SlotReady {
    Registered,
    Failed,
}

pub struct Slot {
    pub config: Arc<Config>,
    pub worker: Arc<WorkerConfig>,
    pub index: u32,
    pub db: Db,
    pub registry: Registry,
    pub token: CancellationToken,
    pub ready: mpsc::UnboundedSender<SlotReady>,
    /// Reports from the monitor that this slot's worker is hung.
    pub hung: mpsc::UnboundedReceiver<Hung>,
    pub mode: Mode,
    /// How `stats` shows the mode (e.g. "docker (auto)").
    pub mode_label: String,
}

/// Why a worker stopped being useful.
enum Failure {
    Died(String),
    Hung(String),
    NoRegister,
    SpawnFailed(String),
}

impl Slot {
    fn name(&self) -> String {
        format!("{}-{}", self.worker.worker_type, self.index)
    }

    fn launch_spec(&self) -> Launch {
        let pool = &self.config.pool;
        Launch {
            worker_type: self.worker.worker_type.clone(),
            slot: self.index,
            program: self.worker.program.clone(),
            image_default: self.worker.image_default,
            extra_env: self.worker.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            db_path: pool.db_path.clone(),
            workspace: pool.workspace_path.clone(),
            log_level: pool.log_level.to_ascii_uppercase(),
            heartbeat_interval: heartbeat_interval(self.worker.heartbeat_timeout),
            cwd: self
                .config
                .path
                .parent()
                .map(|p| p.to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| ".".into()),
            memory_limit: self.worker.memory_limit,
            log_path: pool.log_dir.join(format!("{}.log", self.name())),
            log_max_size: pool.log_max_size,
            log_keep: pool.log_keep,
        }
    }

    pub async fn run(mut self) {
        let t = self.worker.worker_type.clone();
        let index = self.index;
        let mut policy = RestartPolicy::new(self.config.pool.restart.clone());
        let mut announced = false;
        let mode = self.mode_label.clone();
        let _ = self
            .db
            .call({
                let t = t.clone();
                move |c| db::pool::upsert_slot(c, &t, index, &mode, "starting")
            })
            .await;

        while !self.token.is_cancelled() {
            let spec = self.launch_spec();
            let started = Instant::now();
            let (failure, worker_row, running) = match self.mode.launch(&spec).await {
                Err(e) => (Failure::SpawnFailed(format!("{e:#}")), None, None),
                Ok(mut running) => {
                    self.record_launch(&running).await;
                    match self.supervise(&mut running, &mut announced).await {
                        Ok(()) => {
                            // Cancelled: stop the worker as part of shutdown.
                            let cause = running.stop(self.config.pool.stop_timeout).await;
                            info!(worker = %running.worker_id, slot = %self.name(), "stopped ({cause})");
                            self.record_end(
                                &running.worker_id,
                                self.row_of(&running).await,
                                "stopped",
                                &cause.to_string(),
                                &running.tail.lines(20),
                                false,
                            )
                            .await;
                            break;
                        }
                        Err((failure, row)) => (failure, row, Some(running)),
                    }
                }
            };
            let ran_for = started.elapsed();
            let (event, cause) = match &failure {
                Failure::Died(c) => ("died", c.clone()),
                Failure::Hung(reason) => ("hung", format!("was hung ({reason})")),
                Failure::NoRegister => (
                    "no-register",
                    format!(
                        "did not register within {}",
                        humantime::format_duration(self.config.pool.startup_timeout)
                    ),
                ),
                Failure::SpawnFailed(e) => ("spawn-failed", format!("could not be started: {e}")),
            };
            let worker_id = running
                .as_ref()
                .map(|r| r.worker_id.clone())
                .unwrap_or_else(|| format!("{}-{}", self.mode.name(), self.name()));
            let tail = running.as_ref().map(|r| r.tail.lines(20)).unwrap_or_default();
            if tail.is_empty() {
                warn!(worker = %worker_id, slot = %self.name(), "worker {cause}");
            } else {
                warn!(worker = %worker_id, slot = %self.name(), "worker {cause}; last output:\n{tail}");
            }
            if let Some(r) = &running {
                r.sweep().await;
            }
            self.record_end(&worker_id, worker_row, event, &cause, &tail, true)
                .await;
            drop(running);

            match policy.on_failure(Instant::now(), ran_for) {
                Decision::RestartAfter(delay) => {
                    if !delay.is_zero() {
                        self.set_state("backoff").await;
                        info!(slot = %self.name(), "restarting in {}", humantime::format_duration(delay));
                        tokio::select! {
                            _ = self.token.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
                Decision::GiveUp => {
                    let r = &self.config.pool.restart;
                    error!(
                        slot = %self.name(),
                        "GIVING UP on slot {}: its worker failed {} times within {} (last: {cause}); the rest of the pool goes on",
                        self.name(), r.burst_limit, humantime::format_duration(r.burst_window)
                    );
                    self.set_state("failed").await;
                    if !announced {
                        let _ = self.ready.send(SlotReady::Failed);
                    }
                    self.token.cancelled().await;
                    return;
                }
            }
        }
        self.set_state("stopped").await;
    }

    /// Waits for registration, then for the worker's end. Ok(()) means the
    /// supervisor is shutting down; Err carries why the worker is gone.
    async fn supervise(&mut self, running: &mut Running, announced: &mut bool) -> Result<(), (Failure, Option<i64>)> {
        // Reports about an earlier worker of this slot are stale.
        while self.hung.try_recv().is_ok() {}
        let registered = self.registry.expect(&running.worker_id);
        let row = tokio::select! {
            biased;
            _ = self.token.cancelled() => return Ok(()),
            cause = running.wait() => {
                self.registry.forget(&running.worker_id);
                return Err((Failure::Died(cause.to_string()), self.row_of(running).await));
            }
            r = tokio::time::timeout(self.config.pool.startup_timeout, registered) => match r {
                Ok(Ok(row)) => row,
                _ => {
                    self.registry.forget(&running.worker_id);
                    running.stop(self.config.pool.stop_timeout).await;
                    return Err((Failure::NoRegister, self.row_of(running).await));
                }
            },
        };
        let (t, index) = (self.worker.worker_type.clone(), self.index);
        let _ = self
            .db
            .call(move |c| db::pool::slot_registered(c, &t, index, row))
            .await;
        if !*announced {
            *announced = true;
            let _ = self.ready.send(SlotReady::Registered);
        }
        loop {
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Ok(()),
                cause = running.wait() => return Err((Failure::Died(cause.to_string()), Some(row))),
                Some(hung) = self.hung.recv() => {
                    if hung.worker_row != row {
                        continue;
                    }
                    let _ = self.db.call(move |c| db::workers::set_status(c, row, "hung")).await;
                    let cause = running.stop(self.config.pool.stop_timeout).await;
                    info!(worker = %running.worker_id, slot = %self.name(), "stopped the hung worker ({cause})");
                    return Err((Failure::Hung(hung.reason), Some(row)));
                }
            }
        }
    }

    /// The worker's row, if it registered (possibly just before it died).
    async fn row_of(&self, running: &Running) -> Option<i64> {
        let id = running.worker_id.clone();
        self.db
            .call(move |c| {
                use rusqlite::OptionalExtension;
                c.query_row("SELECT id FROM workers WHERE container_id = ?1", [id], |r| r.get(0))
                    .optional()
            })
            .await
            .ok()
            .flatten()
    }

    async fn record_launch(&self, running: &Running) {
        let (t, index, id, pid, start) = (
            self.worker.worker_type.clone(),
            self.index,
            running.worker_id.clone(),
            running.pid.map(i64::from),
            running.proc_start,
        );
        if let Err(e) = self
            .db
            .call(move |c| db::pool::slot_launched(c, &t, index, &id, pid, start))
            .await
        {
            warn!("recording worker launch: {e:#}");
        }
    }

    async fn record_end(
        &self,
        worker_id: &str,
        worker_row: Option<i64>,
        event: &'static str,
        cause: &str,
        tail: &str,
        restart: bool,
    ) {
        let (t, index, id, cause, tail) = (
            self.worker.worker_type.clone(),
            self.index,
            worker_id.to_string(),
            cause.to_string(),
            tail.to_string(),
        );
        let result = self
            .db
            .call(move |c| {
                db::pool::record_end(
                    c,
                    &db::pool::WorkerEnd {
                        worker_type: &t,
                        slot: index,
                        worker_id: &id,
                        worker_row,
                        event,
                        cause: &cause,
                        log_tail: &tail,
                        restart,
                    },
                )
            })
            .await;
        match result {
            Ok((requeued, failed)) => {
                if !requeued.is_empty() {
                    info!(worker = %worker_id, jobs = ?requeued, "put the worker's unfinished jobs back in the queue");
                }
                if !failed.is_empty() {
                    warn!(worker = %worker_id, jobs = ?failed, "failed the worker's jobs: no attempts left");
                }
            }
            Err(e) => error!(worker = %worker_id, "recording the worker's end: {e:#}"),
        }
    }

    async fn set_state(&self, state: &'static str) {
        let (t, index) = (self.worker.worker_type.clone(), self.index);
        let _ = self
            .db
            .call(move |c| db::pool::set_slot_state(c, &t, index, state))
            .await;
    }
}

/// How often an idle built-in worker refreshes its heartbeat: often enough
/// to stay well inside `heartbeat_timeout`, rarely enough to keep an idle
/// pool's writes low.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(10))
}
