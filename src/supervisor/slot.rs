//! One slot of a pool: keeps one worker running, replacing it in the same
//! slot when it dies or does not register, under the restart policy. Every
//! end of a worker goes through `db::pool::record_end`, which marks it dead,
//! puts its jobs back and records the event in one transaction. Under CLM
//! the slot pre-registers each worker's row (`created`, persistent, no
//! session) before starting it, as CLM's own pool does, and the worker
//! counts as up once it has activated that row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::monitor::Hung;
use super::policy::{Decision, RestartPolicy};
use super::registry::Registry;
use crate::config::{Config, WorkerConfig, WorkerProgram};
use crate::db::{self, Db};
use crate::executor::{ExitCause, Launch, Mode, Running};
use crate::vocab::{EndEvent, Protocol, SlotState, WorkerStatus};

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
    Died(ExitCause),
    Hung(String),
    NoRegister,
    /// It could not be started; `outside` when the cause lies outside the
    /// worker and goes away by itself (a full disk, a busy database, an
    /// engine error), not a missing program.
    SpawnFailed {
        error: String,
        outside: bool,
    },
}

impl Failure {
    /// The event and the cause in words.
    fn describe(&self, startup_timeout: Duration) -> (EndEvent, String) {
        match self {
            Failure::Died(c) => (EndEvent::Died, c.to_string()),
            Failure::Hung(reason) => (EndEvent::Hung, format!("was hung ({reason})")),
            Failure::NoRegister => (
                EndEvent::NoRegister,
                format!(
                    "did not register within {}",
                    humantime::format_duration(startup_timeout)
                ),
            ),
            Failure::SpawnFailed { error, .. } => (EndEvent::SpawnFailed, format!("could not be started: {error}")),
        }
    }

    /// A fault outside the worker: it pauses the slot instead of giving it
    /// up for good (the built-in worker exits with EX_TEMPFAIL when the
    /// database is unavailable).
    fn is_outside_worker(&self) -> bool {
        match self {
            Failure::SpawnFailed { outside, .. } => *outside,
            Failure::Died(ExitCause::Code(c)) => *c == crate::worker::EXIT_DATABASE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// A worker whose time in the slot ended.
struct Ended {
    failure: Failure,
    worker_id: String,
    worker_row: Option<i64>,
    running: Option<Running>,
}

/// Whether a launch error lies outside the worker and goes away by itself
/// (a full disk, too many open files or processes, a busy engine), unlike a
/// missing program, a forbidden path or a missing image.
fn launch_error_is_outside(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                StorageFull | QuotaExceeded | WouldBlock | ResourceBusy | OutOfMemory | Interrupted | TimedOut
            ) || matches!(
                io.raw_os_error(),
                Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::EIO | nix::libc::EAGAIN)
            );
        }
        if let Some(bollard::errors::Error::DockerResponseServerError { status_code, .. }) =
            cause.downcast_ref::<bollard::errors::Error>()
        {
            return *status_code != 404;
        }
    }
    true
}

/// How supervising one worker ended.
enum Supervised {
    /// The pool is stopping; the worker is still running.
    ShuttingDown,
    /// The worker is gone (or was stopped as hung or unregistered), with
    /// its row if it had one.
    Ended(Failure, Option<i64>),
}

/// A worker this slot started, and the row it pre-registered for it.
struct Started {
    running: Running,
    preregistered: Option<i64>,
}

impl Slot {
    fn name(&self) -> String {
        format!("{}-{}", self.worker.worker_type, self.index)
    }

    fn protocol(&self) -> Protocol {
        self.db.protocol()
    }

    fn launch_spec(&self, worker_id: String, preregistered_row: Option<i64>) -> Launch {
        let pool = &self.config.pool;
        let program = match &self.mode {
            // `start` checked that the protocol knows every direct type
            // that has no command (Config::check_protocol).
            Mode::Direct => self
                .worker
                .direct_program(self.protocol())
                .unwrap_or(WorkerProgram::Default),
            Mode::Docker { .. } => self.worker.program.clone(),
        };
        Launch {
            worker_type: self.worker.worker_type.clone(),
            slot: self.index,
            program,
            protocol: self.protocol(),
            worker_id,
            preregistered_row,
            extra_env: self.worker.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            inherit_env: pool.inherit_env.clone(),
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
        let mut policy = RestartPolicy::new(self.config.pool.restart.clone());
        let mut announced = false;
        let (t, index, mode) = (self.worker.worker_type.clone(), self.index, self.mode_label.clone());
        self.write("recording the slot", move |c| {
            db::pool::upsert_slot(c, &t, index, &mode, SlotState::Starting)
        })
        .await;

        while !self.token.is_cancelled() {
            let started_at = Instant::now();
            let ended = match self.start().await {
                Err(ended) => ended,
                Ok(Started {
                    mut running,
                    preregistered,
                }) => match self.supervise(&mut running, preregistered, &mut announced).await {
                    Supervised::ShuttingDown => {
                        self.stop_for_shutdown(running, preregistered).await;
                        break;
                    }
                    Supervised::Ended(failure, row) => Ended {
                        failure,
                        worker_id: running.worker_id.clone(),
                        worker_row: row,
                        running: Some(running),
                    },
                },
            };
            let outside = ended.failure.is_outside_worker();
            let cause = self.finish(ended).await;
            let keep_going = match policy.on_failure(Instant::now(), started_at.elapsed(), outside) {
                Decision::RestartAfter(delay) if delay.is_zero() => true,
                Decision::RestartAfter(delay) => {
                    info!(slot = %self.name(), "restarting in {}", humantime::format_duration(delay));
                    let note = format!("restarting in {} (last: {cause})", humantime::format_duration(delay));
                    self.wait_before_restart(delay, note).await
                }
                Decision::CoolDown(delay) => {
                    let r = &self.config.pool.restart;
                    let note = format!(
                        "failed {} times within {} because of a fault outside the worker (last: {cause}); trying again in {} (restart_cooldown)",
                        r.burst_limit,
                        humantime::format_duration(r.burst_window),
                        humantime::format_duration(delay)
                    );
                    warn!(slot = %self.name(), "{note}");
                    self.wait_before_restart(delay, note).await
                }
                Decision::GiveUp => {
                    self.give_up(&cause, announced).await;
                    return;
                }
            };
            if !keep_going {
                break;
            }
        }
        self.set_state(SlotState::Stopped, None).await;
    }

    /// Stops the worker as part of the pool's shutdown and records it.
    async fn stop_for_shutdown(&self, mut running: Running, preregistered: Option<i64>) {
        let cause = running.stop(self.config.pool.stop_timeout).await;
        info!(worker = %running.worker_id, slot = %self.name(), "stopped ({cause})");
        let row = self.row_of(&running, preregistered).await;
        self.record_end(
            &running.worker_id,
            row,
            EndEvent::Stopped,
            &cause.to_string(),
            &running.tail.lines(20),
            false,
        )
        .await;
    }

    /// After a worker failed: logs why, removes what it left running and
    /// records its end. Returns the cause, in words.
    async fn finish(&self, ended: Ended) -> String {
        let (event, cause) = ended.failure.describe(self.config.pool.startup_timeout);
        let tail = ended.running.as_ref().map(|r| r.tail.lines(20)).unwrap_or_default();
        if tail.is_empty() {
            warn!(worker = %ended.worker_id, slot = %self.name(), "worker {cause}");
        } else {
            warn!(worker = %ended.worker_id, slot = %self.name(), "worker {cause}; last output:\n{tail}");
        }
        if let Some(r) = &ended.running {
            r.sweep().await;
        }
        self.record_end(&ended.worker_id, ended.worker_row, event, &cause, &tail, true)
            .await;
        cause
    }

    /// Waits `delay` in the backoff state, saying why; false if the pool
    /// is stopping meanwhile.
    async fn wait_before_restart(&self, delay: Duration, note: String) -> bool {
        self.set_state(SlotState::Backoff, Some(note)).await;
        tokio::select! {
            _ = self.token.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Leaves the slot empty for the rest of the run.
    async fn give_up(&self, cause: &str, announced: bool) {
        let r = &self.config.pool.restart;
        let note = format!(
            "gave up: its worker failed {} times within {} (last: {cause})",
            r.burst_limit,
            humantime::format_duration(r.burst_window)
        );
        error!(slot = %self.name(), "GIVING UP on slot {}: {note}; the rest of the pool goes on", self.name());
        self.set_state(SlotState::Failed, Some(note)).await;
        if !announced {
            let _ = self.ready.send(SlotReady::Failed);
        }
        self.token.cancelled().await;
    }

    /// Pre-registers the worker's row (CLM) and launches the worker. On
    /// failure: why, the id the worker would have had, and its row.
    async fn start(&self) -> Result<Started, Ended> {
        let worker_id = format!(
            "{}-{}-{}-{}",
            self.mode.name(),
            self.worker.worker_type,
            self.index,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let preregistered = match self.protocol() {
            Protocol::Clx => None,
            Protocol::Clm => {
                let (t, id, mode, index) = (
                    self.worker.worker_type.clone(),
                    worker_id.clone(),
                    self.mode.name(),
                    self.index,
                );
                let row = self
                    .db
                    .call(move |c| {
                        db::pool::preregister_worker(
                            c,
                            index,
                            &db::workers::Preregistration {
                                worker_type: &t,
                                container_id: &id,
                                execution_mode: mode,
                                parent_pid: i64::from(std::process::id()),
                            },
                        )
                    })
                    .await
                    .map_err(|e| Ended {
                        failure: Failure::SpawnFailed {
                            error: format!("pre-registering its worker row: {e:#}"),
                            outside: db::is_transient_any(&e),
                        },
                        worker_id: worker_id.clone(),
                        worker_row: None,
                        running: None,
                    })?;
                Some(row)
            }
        };
        let spec = self.launch_spec(worker_id.clone(), preregistered);
        let running = match self.mode.launch(&spec).await {
            Ok(r) => r,
            Err(e) => {
                return Err(Ended {
                    failure: Failure::SpawnFailed {
                        error: format!("{e:#}"),
                        outside: launch_error_is_outside(&e),
                    },
                    worker_id,
                    worker_row: preregistered,
                    running: None,
                });
            }
        };
        // A container goes by its own id, known only now.
        if let Some(row) = preregistered
            && running.worker_id != worker_id
        {
            let id = running.worker_id.clone();
            if let Err(e) = self.db.call(move |c| db::workers::set_container_id(c, row, &id)).await {
                warn!(worker = %running.worker_id, "recording the container id of the worker row: {e:#}");
            }
        }
        self.record_launch(&running).await;
        Ok(Started { running, preregistered })
    }

    /// Waits for registration, then for the worker's end.
    async fn supervise(
        &mut self,
        running: &mut Running,
        preregistered: Option<i64>,
        announced: &mut bool,
    ) -> Supervised {
        // Reports about an earlier worker of this slot are stale.
        while self.hung.try_recv().is_ok() {}
        let registered = match preregistered {
            Some(row) => self.registry.expect_row(row),
            None => self.registry.expect(&running.worker_id),
        };
        let row = tokio::select! {
            biased;
            _ = self.token.cancelled() => return Supervised::ShuttingDown,
            cause = running.wait() => {
                self.registry.forget(&running.worker_id, preregistered);
                return Supervised::Ended(Failure::Died(cause), self.row_of(running, preregistered).await);
            }
            r = tokio::time::timeout(self.config.pool.startup_timeout, registered) => match r {
                Ok(Ok(row)) => row,
                _ => {
                    self.registry.forget(&running.worker_id, preregistered);
                    running.stop(self.config.pool.stop_timeout).await;
                    return Supervised::Ended(Failure::NoRegister, self.row_of(running, preregistered).await);
                }
            },
        };
        self.record_registered(running, row).await;
        if !*announced {
            *announced = true;
            let _ = self.ready.send(SlotReady::Registered);
        }
        loop {
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Supervised::ShuttingDown,
                cause = running.wait() => return Supervised::Ended(Failure::Died(cause), Some(row)),
                Some(hung) = self.hung.recv() => {
                    if hung.worker_row != row {
                        continue;
                    }
                    if let Err(e) = self.db.call(move |c| db::workers::set_status(c, row, WorkerStatus::Hung)).await {
                        warn!(worker = %running.worker_id, "marking the worker hung: {e:#}");
                    }
                    let cause = running.stop(self.config.pool.stop_timeout).await;
                    info!(worker = %running.worker_id, slot = %self.name(), "stopped the hung worker ({cause})");
                    return Supervised::Ended(Failure::Hung(hung.reason), Some(row));
                }
            }
        }
    }

    /// The worker's row, if it registered (possibly just before it died).
    async fn row_of(&self, running: &Running, preregistered: Option<i64>) -> Option<i64> {
        if preregistered.is_some() {
            return preregistered;
        }
        let id = running.worker_id.clone();
        match self.db.call(move |c| db::workers::row_of(c, &id)).await {
            Ok(row) => row,
            Err(e) => {
                warn!(worker = %running.worker_id, "looking up the worker's row: {e:#}");
                None
            }
        }
    }

    async fn record_launch(&self, running: &Running) {
        let (t, index, id, pid, start) = (
            self.worker.worker_type.clone(),
            self.index,
            running.worker_id.clone(),
            running.pid.map(i64::from),
            running.proc_start,
        );
        self.write("recording the worker's launch", move |c| {
            db::pool::slot_launched(c, &t, index, &id, pid, start)
        })
        .await;
    }

    async fn record_registered(&self, running: &Running, row: i64) {
        let (t, index, id, mode, protocol) = (
            self.worker.worker_type.clone(),
            self.index,
            running.worker_id.clone(),
            self.mode.name(),
            self.protocol(),
        );
        self.write("recording the worker's registration", move |c| {
            db::pool::slot_registered(
                c,
                protocol,
                &db::pool::Registered {
                    worker_type: &t,
                    slot: index,
                    worker_row: row,
                    worker_id: &id,
                    execution_mode: mode,
                },
            )
        })
        .await;
    }

    async fn record_end(
        &self,
        worker_id: &str,
        worker_row: Option<i64>,
        event: EndEvent,
        cause: &str,
        tail: &str,
        restart: bool,
    ) {
        let (t, index, id, cause, tail, mode, protocol) = (
            self.worker.worker_type.clone(),
            self.index,
            worker_id.to_string(),
            cause.to_string(),
            tail.to_string(),
            self.mode.name(),
            self.protocol(),
        );
        let result = self
            .write("recording the worker's end", move |c| {
                db::pool::record_end(
                    c,
                    protocol,
                    &db::pool::WorkerEnd {
                        worker_type: &t,
                        slot: index,
                        worker_id: &id,
                        worker_row,
                        execution_mode: mode,
                        event,
                        cause: &cause,
                        log_tail: &tail,
                        restart,
                    },
                )
            })
            .await;
        if let Some((requeued, failed)) = result {
            if !requeued.is_empty() {
                info!(worker = %worker_id, jobs = ?requeued, "put the worker's unfinished jobs back in the queue");
            }
            if !failed.is_empty() {
                warn!(worker = %worker_id, jobs = ?failed, "failed the worker's jobs: no attempts left");
            }
        }
    }

    async fn set_state(&self, state: SlotState, note: Option<String>) {
        let (t, index) = (self.worker.worker_type.clone(), self.index);
        self.write(&format!("recording slot {} as {state}", self.name()), move |c| {
            db::pool::set_slot_state(c, &t, index, state, note.as_deref())
        })
        .await;
    }

    /// A write that must not be dropped: retried until it lands (a lock or
    /// a full disk is waited out); any other error is logged.
    async fn write<T, F>(&self, what: &str, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: Fn(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + Sync + Clone + 'static,
    {
        match self.db.call_until_done(what, f).await {
            Ok(v) => Some(v),
            Err(e) => {
                error!(slot = %self.name(), "{e:#}");
                None
            }
        }
    }
}

/// How often an idle built-in worker refreshes its heartbeat: often enough
/// to stay well inside `heartbeat_timeout`, rarely enough to keep an idle
/// pool's writes low.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(10))
}
