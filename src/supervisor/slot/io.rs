//! The real [`Io`] of a slot: workers started through the slot's
//! [`Executor`], registrations from the [`Registry`], hung reports from
//! the monitor, and every transition written to the database with
//! `Db::call_until_done` (retried until it lands).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::machine::{Failure, Settled, Why};
use super::{Hung, SharedEntry};
use super::{Io, Worker, heartbeat_interval};
use crate::config::{Config, WorkerConfig, WorkerProgram};
use crate::contract::SlotId;
use crate::db::{self, Db};
use crate::executor::{self, Executor, Launch, Running};
use crate::supervisor::observe::notify::Notifier;
use crate::supervisor::registry::Registry;
use crate::supervisor::shared::lock;
use crate::vocab::{EndCause, EndEvent, HungReason, Mode, Protocol, SlotState, WorkerId, WorkerRow, WorkerStatus};

impl Worker for Running {
    fn id(&self) -> &WorkerId {
        self.worker_id()
    }

    async fn wait(&mut self) -> EndCause {
        Running::wait(self).await
    }

    async fn stop(&mut self, grace: Duration) -> EndCause {
        Running::stop(self, grace).await
    }

    async fn drain(&mut self) {
        self.finish().await;
    }
}

/// Everything a slot touches.
pub struct SlotIo {
    pub config: Arc<Config>,
    pub worker: Arc<WorkerConfig>,
    pub slot: SlotId,
    pub db: Db,
    pub registry: Registry,
    /// Reports from the monitor that a worker of this slot is hung.
    /// (Behind a lock so that it can be awaited beside the other waits of
    /// a phase, all of which only read.)
    pub hung: tokio::sync::Mutex<mpsc::UnboundedReceiver<Hung>>,
    pub executor: Executor,
    /// How `stats` shows the mode (e.g. "docker (auto)").
    pub mode: Mode,
    /// Told once how the slot settled.
    pub ready: mpsc::UnboundedSender<Settled>,
    /// The entry's setup, shared with the fleet (a reload changes it).
    entry: SharedEntry,
    /// `on_event`: a slot given up, a crash loop.
    notifier: Notifier,
    metrics: Arc<crate::supervisor::observe::metrics::Metrics>,
    /// The id of the current (or last) worker, and the row pre-registered
    /// for it (CLM).
    current: Option<WorkerId>,
    preregistered: Option<WorkerRow>,
    /// CLM: while the slot waits to start its next worker, that worker's
    /// row is pre-registered already (`created`), so that a `clm build`
    /// meanwhile sees a worker coming, never none.
    reserved: Option<(WorkerId, WorkerRow)>,
}

/// What every slot of a pool shares.
#[derive(Clone)]
pub struct Links {
    pub db: Db,
    pub registry: Registry,
    /// Told once how each slot settled.
    pub ready: mpsc::UnboundedSender<Settled>,
    pub notifier: Notifier,
    pub metrics: Arc<crate::supervisor::observe::metrics::Metrics>,
}

impl SlotIo {
    pub fn new(
        config: Arc<Config>,
        entry: SharedEntry,
        index: u32,
        links: Links,
        hung: mpsc::UnboundedReceiver<Hung>,
    ) -> SlotIo {
        let Links {
            db,
            registry,
            ready,
            notifier,
            metrics,
        } = links;
        let e = lock(&entry).clone();
        SlotIo {
            slot: SlotId {
                worker_type: e.worker.worker_type.clone(),
                index,
            },
            config,
            worker: e.worker,
            executor: e.executor,
            mode: e.mode,
            entry,
            notifier,
            metrics,
            db,
            registry,
            hung: tokio::sync::Mutex::new(hung),
            ready,
            current: None,
            preregistered: None,
            reserved: None,
        }
    }

    /// What the entry runs now (a reload may have changed it).
    fn refresh(&mut self) {
        let e = lock(&self.entry).clone();
        self.worker = e.worker;
        self.executor = e.executor;
        self.mode = e.mode;
    }

    fn protocol(&self) -> Protocol {
        self.db.protocol()
    }

    fn launch_spec(&self, worker_id: WorkerId) -> Launch {
        let pool = &self.config.pool;
        let program = self.executor.program(&self.worker, self.protocol());
        Launch {
            worker_type: self.slot.worker_type.clone(),
            slot: self.slot.index,
            program,
            protocol: self.protocol(),
            worker_id,
            preregistered_row: self.preregistered,
            extra_env: self.worker.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            inherit_env: pool.inherit_env.clone(),
            db_path: pool.db_path.clone(),
            workspace: pool.workspace_path.clone(),
            log_level: pool.log_level.to_ascii_uppercase(),
            heartbeat_interval: heartbeat_interval(self.worker.heartbeat_timeout),
            max_jobs: self.worker.max_jobs,
            cwd: self
                .config
                .path
                .parent()
                .map(|p| p.to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| ".".into()),
            memory_limit: self.worker.memory_limit,
            container_user: self.worker.user.docker_user(),
            data_dir: pool.data_dir.clone(),
            log_path: crate::contract::log_path(&pool.log_dir, &self.slot),
            log_max_size: pool.log_max_size,
            log_keep: pool.log_keep,
        }
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
                error!(slot = %self.slot, "{e:#}");
                None
            }
        }
    }

    /// A new worker's id: `{mode}-{type}-{slot}-{8 hex}`.
    fn new_worker_id(&self) -> WorkerId {
        WorkerId(format!(
            "{}-{}-{}-{}",
            self.executor.kind(),
            self.slot.worker_type,
            self.slot.index,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
    }

    /// Pre-registers the worker's row (CLM), as CLM's own pool does; a row
    /// reserved while the slot waited serves, if it is still `created`.
    async fn preregister(&mut self, worker_id: &WorkerId) -> Result<(), Failure> {
        self.preregistered = None;
        if self.protocol() != Protocol::Clm {
            return Ok(());
        }
        if let Some((id, row)) = self.reserved.take_if(|(id, _)| id == worker_id) {
            let status = self.db.call(move |c| db::workers::status(c, row)).await;
            if matches!(status, Ok(Some(WorkerStatus::Created))) {
                self.preregistered = Some(row);
                return Ok(());
            }
            // A build that waited for it in vain declared it dead.
            debug!(worker = %id, %row, "the reserved row is no longer `created`; pre-registering anew");
        }
        self.preregistered = Some(self.preregister_row(worker_id).await?);
        Ok(())
    }

    /// CLM: while the slot waits, pre-registers its next worker's row.
    async fn reserve(&mut self) {
        if self.protocol() != Protocol::Clm || self.reserved.is_some() {
            return;
        }
        let id = self.new_worker_id();
        match self.preregister_row(&id).await {
            Ok(row) => {
                debug!(worker = %id, %row, "pre-registered the next worker while the slot waits");
                self.reserved = Some((id, row));
            }
            Err(e) => warn!(slot = %self.slot, "pre-registering the next worker: {e:?}"),
        }
    }

    /// Removes a reserved row nobody will activate (the slot ends or gives up).
    async fn unreserve(&mut self) {
        if let Some((_, row)) = self.reserved.take() {
            self.write("removing the reserved worker row", move |c| {
                db::workers::discard_created(c, row)
            })
            .await;
        }
    }

    /// Writes a pre-registered (`created`) row for `worker_id`.
    async fn preregister_row(&self, worker_id: &WorkerId) -> Result<WorkerRow, Failure> {
        let (slot, id, mode) = (self.slot.clone(), worker_id.clone(), self.executor.kind());
        self.db
            .call(move |c| {
                db::slots::preregister_worker(
                    c,
                    slot.index,
                    &db::workers::Preregistration {
                        worker_type: &slot.worker_type,
                        container_id: &id,
                        execution_mode: mode,
                        parent_pid: i64::from(std::process::id()),
                    },
                )
            })
            .await
            .map_err(|e| Failure::SpawnFailed {
                error: format!("pre-registering its worker row: {e:#}"),
                outside: db::is_transient_any(&e),
            })
    }

    /// The worker's row, if it registered (possibly just before it died).
    async fn row_of(&self, id: &WorkerId) -> Option<WorkerRow> {
        if self.preregistered.is_some() {
            return self.preregistered;
        }
        let id = id.clone();
        match self.db.call(move |c| db::workers::row_of(c, &id)).await {
            Ok(row) => row,
            Err(e) => {
                warn!(slot = %self.slot, "looking up the worker's row: {e:#}");
                None
            }
        }
    }

    async fn record_launch(&self, running: &Running) {
        let (slot, id, process) = (self.slot.clone(), running.worker_id().clone(), running.process());
        self.write("recording the worker's launch", move |c| {
            db::slots::slot_launched(c, &slot, &id, process.map(|p| (p.pid, p.start_ticks)))
        })
        .await;
    }

    /// Records a worker's end in one transaction: row dead, jobs back,
    /// slot cleared, event written.
    async fn record(
        &self,
        id: &WorkerId,
        row: Option<WorkerRow>,
        event: EndEvent,
        cause: String,
        tail: String,
        restart: bool,
    ) {
        self.metrics.worker_ended(&self.slot.worker_type, event, restart);
        let (slot, owned_id, mode, protocol) = (self.slot.clone(), id.clone(), self.executor.kind(), self.protocol());
        let result = self
            .write("recording the worker's end", move |c| {
                db::slots::record_end(
                    c,
                    protocol,
                    &db::slots::WorkerEnd {
                        slot: &slot,
                        worker_id: &owned_id,
                        worker_row: row,
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
                info!(worker = %id, jobs = ?requeued, "put the worker's unfinished jobs back in the queue");
            }
            if !failed.is_empty() {
                warn!(worker = %id, jobs = ?failed, "failed the worker's jobs: no attempts left");
            }
        }
    }
}

impl Io for SlotIo {
    type Worker = Running;

    async fn launch(&mut self) -> Result<Running, Failure> {
        self.refresh();
        // The worker a reserved row was made for, if it was made for this
        // mode (a reload may have changed it).
        let kind = self.executor.kind().to_string();
        let worker_id = match &self.reserved {
            Some((id, _)) if id.as_str().starts_with(&format!("{kind}-")) => id.clone(),
            _ => {
                self.unreserve().await;
                self.new_worker_id()
            }
        };
        // Reports about an earlier worker of this slot are stale.
        while self.hung.get_mut().try_recv().is_ok() {}
        self.current = Some(worker_id.clone());
        self.preregister(&worker_id).await?;
        let running = self
            .executor
            .launch(&self.launch_spec(worker_id.clone()))
            .await
            .map_err(|e| Failure::SpawnFailed {
                error: format!("{e:#}"),
                outside: executor::launch_error_is_outside(&e),
            })?;
        // A container goes by its own id, known only now.
        if let Some(row) = self.preregistered
            && running.worker_id() != &worker_id
        {
            let id = running.worker_id().clone();
            self.write("recording the container id of the worker row", move |c| {
                db::workers::set_container_id(c, row, &id)
            })
            .await;
        }
        self.record_launch(&running).await;
        Ok(running)
    }

    async fn registered(&mut self, id: &WorkerId) -> WorkerRow {
        let rx = match self.preregistered {
            Some(row) => self.registry.expect_row(row),
            None => self.registry.expect(id),
        };
        match rx.await {
            Ok(row) => row,
            // The registry is gone: the pool is stopping.
            Err(_) => std::future::pending().await,
        }
    }

    fn forget(&mut self, id: &WorkerId) {
        self.registry.forget(id, self.preregistered);
    }

    async fn hung(&self, row: WorkerRow) -> HungReason {
        let mut reports = self.hung.lock().await;
        loop {
            match reports.recv().await {
                Some(h) if h.worker_row == row => return h.reason,
                // About an earlier worker of this slot.
                Some(_) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    async fn mark_hung(&mut self, row: WorkerRow) {
        self.write("marking the worker hung", move |c| db::workers::mark_hung(c, row))
            .await;
    }

    async fn record_registered(&mut self, worker: &Running, row: WorkerRow) {
        let (slot, id, mode, protocol) = (
            self.slot.clone(),
            worker.worker_id().clone(),
            self.executor.kind(),
            self.protocol(),
        );
        let node = worker.node().await;
        // A process's memory is known at once (the monitor adds its CPU
        // later): `stats` need not show `-` for a worker that just came up.
        let memory_mib = worker
            .process()
            .and_then(|p| crate::procs::tree_usage_of(p.pid))
            .map(|(_, bytes)| bytes as f64 / (1024.0 * 1024.0));
        self.write("recording the worker's registration", move |c| {
            db::slots::slot_registered(
                c,
                protocol,
                &db::slots::Registered {
                    slot: &slot,
                    worker_row: row,
                    worker_id: &id,
                    execution_mode: mode,
                    node: node.as_deref(),
                },
            )?;
            match memory_mib {
                Some(mib) => db::workers::write_usage(c, &[(row, None, mib)]),
                None => Ok(()),
            }
        })
        .await;
    }

    async fn record_end(&mut self, worker: Option<Running>, row: Option<WorkerRow>, failure: Failure) {
        let (event, cause) = failure.describe(self.config.pool.startup_timeout);
        let (id, tail) = match &worker {
            Some(w) => (w.worker_id().clone(), w.tail(20)),
            None => (
                self.current
                    .clone()
                    .unwrap_or_else(|| WorkerId(format!("{}-{}", self.executor.kind(), self.slot))),
                String::new(),
            ),
        };
        if tail.is_empty() {
            warn!(worker = %id, slot = %self.slot, "worker {cause}");
        } else {
            warn!(worker = %id, slot = %self.slot, "worker {cause}; last output:\n{tail}");
        }
        if let Some(w) = &worker {
            w.sweep().await;
        }
        let row = match row {
            Some(r) => Some(r),
            None => self.row_of(&id).await,
        };
        self.record(&id, row, event, cause, tail, true).await;
    }

    async fn stop_and_record(&mut self, mut worker: Running, row: Option<WorkerRow>) {
        let cause = worker.stop(self.config.pool.stop_timeout).await;
        info!(worker = %worker.worker_id(), slot = %self.slot, "stopped ({cause})");
        let id = worker.worker_id().clone();
        let row = match row {
            Some(r) => Some(r),
            None => self.row_of(&id).await,
        };
        self.record(&id, row, EndEvent::Stopped, cause.to_string(), worker.tail(20), false)
            .await;
    }

    async fn set_state(&mut self, state: SlotState, note: Option<String>) {
        match state {
            SlotState::Backoff => self.reserve().await,
            SlotState::Failed | SlotState::Stopped => self.unreserve().await,
            SlotState::Starting | SlotState::Running => {}
        }
        let event = match state {
            SlotState::Failed => Some("slot_given_up"),
            SlotState::Backoff => Some("crash_loop"),
            _ => None,
        };
        if let Some(event) = event {
            let why = note.clone().unwrap_or_default();
            self.notifier
                .send(event, serde_json::json!({ "slot": self.slot.to_string(), "why": why }));
        }
        if state == SlotState::Failed {
            error!(slot = %self.slot, "GIVING UP on slot {}: {}; the rest of the pool goes on", self.slot, note.as_deref().unwrap_or(""));
        } else if let Some(n) = &note {
            info!(slot = %self.slot, "{n}");
        }
        let (slot, mode) = (self.slot.clone(), self.mode);
        let what = format!("recording slot {} as {state}", self.slot);
        self.write(&what, move |c| {
            db::slots::set_slot_state(c, &slot, mode, state, note.as_deref())
        })
        .await;
    }

    async fn ready_to_drain(&self, row: WorkerRow) {
        // The built-in worker finishes its job by itself once told.
        if matches!(self.worker.program, WorkerProgram::JobCommand(_)) {
            return;
        }
        loop {
            let busy = self
                .db
                .call(move |c| db::workers::status(c, row))
                .await
                .map(|s| s == Some(WorkerStatus::Busy))
                .unwrap_or(true);
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn end_on_purpose(&mut self, worker: Option<Running>, row: Option<WorkerRow>, why: Why) {
        let Some(mut worker) = worker else {
            return;
        };
        let cause = worker.stop(self.config.pool.stop_timeout).await;
        info!(worker = %worker.worker_id(), slot = %self.slot, "{}: {} ({cause})", why.event(), why.text());
        worker.sweep().await;
        let id = worker.worker_id().clone();
        let row = match row {
            Some(r) => Some(r),
            None => self.row_of(&id).await,
        };
        self.record(&id, row, why.event(), why.text().to_string(), worker.tail(20), false)
            .await;
    }

    async fn remove_slot(&mut self) {
        self.unreserve().await;
        let slot = self.slot.clone();
        self.write("removing the retired slot", move |c| db::slots::remove_slot(c, &slot))
            .await;
        info!(slot = %self.slot, "slot retired");
    }

    fn announce(&mut self, settled: Settled) {
        // The supervisor stops listening once every slot settled.
        self.ready.send(settled).ok();
    }
}
