//! `clx-pool start`: owns the database (through the supervisor lock),
//! cleans what an earlier run left, runs one task per worker slot (each a
//! state machine, `slot/`), the monitor and the reaper, and on
//! SIGINT/SIGTERM (which `clx-pool stop` sends) stops every worker in
//! parallel before exiting; a second signal kills them at once.

pub mod bells;
pub mod control;
pub mod guard;
pub mod monitor;
pub mod observe;
pub mod policy;
pub mod registry;
pub mod shared;
pub mod slot;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api;
use crate::config::{Config, WorkerProgram};
use crate::db::{self, Db};
use crate::executor::Executor;
use crate::executor::backends::{Backends, Reached};
use crate::procs;
use crate::takeover::{self, Takeover, Taker};
use crate::vocab::{Mode, Protocol, SupervisorState, WorkerRow};
use control::{fleet, manage, rollout};
use observe::{metrics, notify, sdnotify};
use slot::Settled;

/// What `start` prepared before any worker runs.
struct Prepared {
    db: Db,
    guard: guard::Guard,
    backends: Backends,
    /// CLM's Worker API, when CLM workers run in containers.
    api: Option<api::ApiServer>,
    /// Per `[[workers]]` entry: how it runs.
    executors: Vec<(Executor, Mode)>,
    /// `metrics_listen`, bound.
    metrics_listener: Option<tokio::net::TcpListener>,
    /// Rows registered before this run are not its workers'.
    after_row: WorkerRow,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let started = Instant::now();
    let prepared = prepare(&config).await?;
    let token = CancellationToken::new();
    let signals = handle_signals(&token, &config)?;
    // The one reaper runs until every worker is stopped and reaped.
    let reaper_token = CancellationToken::new();
    let reaper = spawn_reaper(reaper_token.clone())?;
    // Every task beside the slots; all are joined before `start` exits.
    let background = TaskTracker::new();
    // Orders from `scale`, `restart`, `reload` and `stop`; SIGHUP reloads.
    let operations = rollout::Operations::default();
    let requests = control::server::serve(&config.pool.db_path, token.clone(), operations.clone(), &background)?;
    let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let sd = sdnotify::SdNotify::from_env();
    let bell_ringer = ring_bells(&config, &token, &background);
    let database = background.spawn(watch_database(config.pool.db_path.clone(), token.clone()));
    let notifier = notify::Notifier::new(config.pool.on_event.clone(), &config.pool.db_path, background.clone());
    let (ready_rx, manager, monitor) = start_pool(
        &config,
        &prepared,
        &token,
        &sd,
        operations,
        notifier.clone(),
        &background,
    );
    let Prepared {
        db,
        guard,
        backends,
        api,
        metrics_listener,
        ..
    } = prepared;
    let guard = guard::Keeper::start(guard, &config.pool.db_path, notifier);
    info!(workers = config.total_workers(), db = %config.pool.db_path.display(), "starting pool");
    if let Some(listener) = metrics_listener {
        let bound = metrics::serve(
            listener,
            db.clone(),
            manager.metrics.clone(),
            token.clone(),
            &background,
        )?;
        info!(%bound, "serving Prometheus metrics at /metrics");
    }
    let mut running = Running {
        config,
        db,
        backends,
        api,
        sd,
        manager,
        guard,
        bell_ringer,
        database,
        monitor,
        reaper_token,
        reaper,
        signals,
        background,
    };
    running.manager.fleet.record_wanted().await;
    if await_settled(ready_rx, running.config.total_workers(), &token, started).await {
        running.serve(requests, hangups).await;
    }
    running.stop().await
}

/// Idle built-in workers wait for their type's bell, rung from here.
fn ring_bells(config: &Config, token: &CancellationToken, background: &TaskTracker) -> JoinHandle<()> {
    let types: Vec<String> = config.workers.iter().map(|w| w.worker_type.clone()).collect();
    bells::install(&config.pool.db_path, &types);
    background.spawn(bells::run(config.pool.db_path.clone(), token.clone()))
}

/// A running pool: what its stop ends, in order.
struct Running {
    config: Arc<Config>,
    db: Db,
    backends: Backends,
    api: Option<api::ApiServer>,
    sd: sdnotify::SdNotify,
    manager: manage::Manager,
    guard: guard::Keeper,
    bell_ringer: JoinHandle<()>,
    database: JoinHandle<Option<String>>,
    monitor: JoinHandle<()>,
    reaper_token: CancellationToken,
    reaper: JoinHandle<()>,
    signals: JoinSet<()>,
    background: TaskTracker,
}

impl Running {
    /// Every slot settled: the pool runs and is changed on request until
    /// it stops.
    async fn serve(&mut self, requests: mpsc::Receiver<control::server::Incoming>, hangups: Signal) {
        record_state(&self.db, SupervisorState::Running).await;
        self.sd.ready(&format!(
            "{} workers running on {}",
            self.config.total_workers(),
            self.config.pool.db_path.display()
        ));
        self.manager.run(requests, hangups).await;
    }

    /// Stops every worker (the slots stop theirs when the token is
    /// cancelled), sweeps what they left, ends every task, and records the
    /// stop. Fails when the database went away under the pool.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.sd.stopping();
        record_state(&self.db, SupervisorState::Stopping).await;
        let stopping = Instant::now();
        while let Some(res) = self.manager.fleet.tasks.join_next().await {
            if let Err(e) = res {
                error!("a slot task failed: {e}");
            }
        }
        sweep_leftovers(&self.config, &self.backends).await;
        self.backends.end().await;
        // What the workers started and left, without the tags (a cleared
        // environment), was adopted by this child subreaper: it goes too.
        let adopted = procs::end_descendants(Duration::from_secs(5), &[self.guard.pid() as i32]).await;
        if adopted > 0 {
            info!(processes = adopted, "killed processes the workers left running");
        }
        joined("the bell task", self.bell_ringer).await;
        let types: Vec<String> = self
            .manager
            .fleet
            .current()
            .workers
            .iter()
            .map(|w| w.worker_type.clone())
            .collect();
        bells::remove(&self.config.pool.db_path, &types);
        if let Some(api) = self.api {
            api.stop().await;
        }
        joined("the monitor task", self.monitor).await;
        end_background(&self.background).await;
        self.reaper_token.cancel();
        joined("the reaper task", self.reaper).await;
        procs::reap();
        record_state(&self.db, SupervisorState::Stopped).await;
        info!("all workers stopped in {:.3}s", stopping.elapsed().as_secs_f64());
        self.signals.abort_all();
        self.guard.dismiss().await;
        match self.database.await {
            Ok(Some(lost)) => Err(anyhow::anyhow!(lost)),
            Ok(None) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("the database watch failed: {e}")),
        }
    }
}

/// Waits for a task, saying so if it failed (panicked).
async fn joined(what: &str, task: JoinHandle<()>) {
    if let Err(e) = task.await {
        error!("{what} failed: {e}");
    }
}

/// Waits for the background tasks; each ends with the root token, a hook
/// run within its timeout. A task still running after that is reported.
async fn end_background(tasks: &TaskTracker) {
    tasks.close();
    let limit = notify::TIMEOUT + Duration::from_secs(1);
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        warn!(
            tasks = tasks.len(),
            "background tasks still running {} after the stop; leaving them",
            humantime::format_duration(limit)
        );
    }
}

/// Watches the database file: one deleted or replaced under a running
/// pool (a cleanup job, a user's `rm`) would leave it running unseen, on a
/// file nobody else can open. The pool is stopped cleanly instead, and
/// `start` ends with the reason.
async fn watch_database(path: std::path::PathBuf, token: CancellationToken) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let first = id(&path);
    loop {
        tokio::select! {
            _ = token.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = id(&path);
        if now != first {
            let how = if now.is_none() {
                "deleted"
            } else {
                "replaced by another file"
            };
            let why = format!(
                "the database {} was {how} while the pool ran; the pool stopped (its jobs were in that file)",
                path.display()
            );
            error!("{why}: stopping the pool");
            token.cancel();
            return Some(why);
        }
    }
}

/// Takes the database over (lock, schema, the plan of every entry, the
/// cleanup after an earlier run), then starts the guard and records the
/// new run.
async fn prepare(config: &Arc<Config>) -> anyhow::Result<Prepared> {
    let pool = &config.pool;
    raise_open_files_limit(config.total_workers(), listener_connections(config))?;
    let takeover = Takeover {
        db_path: &pool.db_path,
        taker: Taker::Start,
        protocol: pool.protocol,
        grace: pool.stop_timeout,
        swarm_host: pool.swarm.docker_host.as_deref(),
    };
    // The lock is held until the process exits (see `lock`).
    let taken = takeover::take_over(takeover, async |db: &Db| {
        // Orphaned descendants of workers (a `setsid` grandchild whose
        // parent died) become our children instead of init's, so none
        // escapes `stop`.
        nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
        for dir in [&pool.workspace_path, &pool.log_dir] {
            crate::files::create_dirs(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        config.check_protocol(db.protocol())?;
        info!(protocol = %db.protocol(), db = %pool.db_path.display(), "opened the job database");
        let reached = Backends::reach(config, db.protocol()).await?;
        let metrics_listener = match pool.metrics_listen {
            Some(addr) => Some(metrics::listen(addr).await?),
            None => None,
        };
        let backends = reached.backends.clone();
        Ok(((reached, metrics_listener), backends))
    })
    .await?;
    if !taken.report.is_empty() {
        warn!("cleaned up after an earlier run of this database: {}", taken.report);
    }
    let ((reached, metrics_listener), db) = (taken.prepared, taken.db);
    let Reached {
        backends,
        executors,
        api,
    } = reached;
    // Swarm workers would fail one by one without the API or the shared
    // workspace; one task per placement says so first.
    backends.preflight(config).await?;
    // From here on, if this process dies without stopping the pool, the
    // guard cleans up after it. Nothing of this run started yet: if it
    // cannot start, the guard has nothing to clean up.
    let guard = guard::spawn(&pool.db_path, pool.swarm.docker_host.as_deref())?;
    tracing::debug!(pid = guard.pid(), "started the guard");
    let after_row = match begin_run(config, &db).await {
        Ok(row) => row,
        Err(e) => {
            guard.dismiss();
            return Err(e);
        }
    };
    Ok(Prepared {
        db,
        guard,
        backends,
        api,
        executors,
        metrics_listener,
        after_row,
    })
}

/// Records the new run; returns the highest worker row before it.
async fn begin_run(config: &Config, db: &Db) -> anyhow::Result<WorkerRow> {
    let me = std::process::id() as i64;
    let (proc_start, host, config_path, workspace, total) = (
        procs::start_ticks(me as i32),
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config.path.to_string_lossy().into_owned(),
        config.pool.workspace_path.to_string_lossy().into_owned(),
        config.total_workers() as i64,
    );
    let protocol = db.protocol();
    let health = config.pool.health;
    db.call(move |c| {
        db::supervisor::begin_run(
            c,
            protocol,
            &db::supervisor::NewSupervisor {
                pid: me,
                proc_start,
                hostname: &host,
                config_path: &config_path,
                workspace_path: &workspace,
                expected_workers: total,
                health: (health.window.as_secs() as i64, health.failure_rate),
            },
        )?;
        db::workers::max_row(c)
    })
    .await
}

/// SIGINT/SIGTERM stop the pool; a second one kills every worker at once
/// instead of waiting out `stop_timeout`. SIGHUP (a closed terminal) is
/// logged and ignored.
fn handle_signals(token: &CancellationToken, config: &Arc<Config>) -> anyhow::Result<JoinSet<()>> {
    let mut signals = JoinSet::new();
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        let mut s = signal(kind).context("installing signal handlers")?;
        let (token, config) = (token.clone(), config.clone());
        signals.spawn(async move {
            s.recv().await;
            info!("signal received: stopping all workers (a second one kills them at once)");
            token.cancel();
            s.recv().await;
            warn!("second signal: killing every worker now");
            let db = config.pool.db_path.clone();
            let run = crate::contract::this_run();
            procs::sweep(
                move || procs::find_pool_processes(&db, Some(run)),
                Duration::from_secs(5),
            )
            .await;
        });
    }
    Ok(signals)
}

/// Starts the registry, one task per slot, and the monitor; returns the
/// manager that changes the pool while it runs.
fn start_pool(
    config: &Arc<Config>,
    p: &Prepared,
    token: &CancellationToken,
    sd: &sdnotify::SdNotify,
    operations: rollout::Operations,
    notifier: notify::Notifier,
    background: &TaskTracker,
) -> (mpsc::UnboundedReceiver<Settled>, manage::Manager, JoinHandle<()>) {
    let registry = registry::Registry::spawn(p.db.clone(), p.after_row, token.child_token(), background);
    let registrations = registry.registrations();
    if let Some(seen) = p.backends.swarm_tasks() {
        background.spawn(observe::swarm_tasks::record(p.db.clone(), seen, token.child_token()));
    }
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(metrics::Metrics::for_types(
        config.workers.iter().map(|w| w.worker_type.as_str()),
    ));
    let links = slot::io::Links {
        db: p.db.clone(),
        registry,
        ready: ready_tx,
        notifier: notifier.clone(),
        metrics: metrics.clone(),
    };
    let mut fleet = fleet::Fleet::new(config.clone(), &p.executors, links, token.clone(), operations);
    fleet.start_all();
    let monitor = monitor::Monitor {
        config: fleet.config.clone(),
        db: p.db.clone(),
        token: token.clone(),
        slots: fleet.directory.clone(),
        backends: p.backends.clone(),
        notifier,
        sd: sd.clone(),
        metrics: metrics.clone(),
        registrations: registrations.clone(),
    };
    let manager = manage::Manager {
        fleet,
        protocol: p.db.protocol(),
        backends: p.backends.clone(),
        token: token.clone(),
        metrics,
        db: p.db.clone(),
    };
    (ready_rx, manager, background.spawn(monitor.run()))
}

/// The one reaper: as child subreaper the supervisor also inherits its
/// workers' orphaned descendants; every child is collected as it exits.
fn spawn_reaper(token: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sigchld = signal(SignalKind::child()).context("installing the SIGCHLD handler")?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = sigchld.recv() => procs::reap(),
            }
        }
    }))
}

/// Waits until every slot settled (registered or given up); false if the
/// pool is stopping before that.
async fn await_settled(
    mut ready: mpsc::UnboundedReceiver<Settled>,
    total: u32,
    token: &CancellationToken,
    started: Instant,
) -> bool {
    let (mut registered, mut failed) = (0u32, 0u32);
    while registered + failed < total {
        tokio::select! {
            _ = token.cancelled() => return false,
            msg = ready.recv() => match msg {
                Some(Settled::Registered) => registered += 1,
                Some(Settled::GaveUp) => failed += 1,
                None => break,
            },
        }
    }
    if failed == 0 {
        info!(
            workers = total,
            "all {total} workers registered in {:.3}s",
            started.elapsed().as_secs_f64()
        );
    } else {
        error!("{registered} of {total} workers registered; {failed} slots failed (see `clx-pool stats`)");
    }
    true
}

/// Whatever the stopped workers left outside their process groups, and
/// containers of the pool that are still there.
async fn sweep_leftovers(config: &Config, backends: &Backends) {
    let db_path = config.pool.db_path.clone();
    let run = crate::contract::this_run();
    let swept = procs::sweep(
        move || procs::find_pool_processes(&db_path, Some(run)),
        Duration::from_secs(5),
    )
    .await;
    if swept > 0 {
        info!(processes = swept, "killed processes the workers left running");
    }
    backends.sweep().await;
}

/// Records the supervisor's state, retrying until it lands: `stats` and
/// `wait --ready` must never read a state the supervisor left.
async fn record_state(db: &Db, state: SupervisorState) {
    let protocol = db.protocol();
    let what = format!("recording the supervisor's state {state}");
    if let Err(e) = db
        .call_until_done(&what, move |c| db::supervisor::set_state(c, protocol, state))
        .await
    {
        error!("{e:#}");
    }
}

/// Open files a pool needs: a few for the supervisor itself and its
/// control socket's connections, per worker its output pipe, its log file
/// and its process handle (or, in docker mode, its log stream), with room
/// for a replacement starting while the old worker is being stopped, and
/// the connections `/metrics` and the Worker API may hold.
fn open_files_needed(workers: u32, listeners: u64) -> u64 {
    64 + 6 * u64::from(workers) + listeners
}

/// Connections the pool's listeners other than the control socket may hold.
fn listener_connections(config: &Config) -> u64 {
    let metrics = if config.pool.metrics_listen.is_some() { 16 } else { 0 };
    let api = config.pool.protocol != Some(Protocol::Clx)
        && config.workers.iter().any(|w| {
            w.execution_mode != crate::config::ExecutionMode::Direct
                && !matches!(w.program, WorkerProgram::JobCommand(_))
        });
    metrics + if api { api::CONNECTIONS as u64 } else { 0 }
}

/// Raises the soft open-files limit to the hard one (workers inherit it)
/// and refuses, before anything starts, a pool that cannot fit under it.
fn raise_open_files_limit(workers: u32, listeners: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-files limit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open-files limit")?;
    }
    let needed = open_files_needed(workers, listeners);
    if hard < needed {
        anyhow::bail!(
            "a pool of {workers} workers needs about {needed} open files, but the limit is {hard} (hard limit); \
             raise it (`ulimit -n {needed}` as root, or LimitNOFILE= in a systemd unit) or run fewer workers"
        );
    }
    if soft < hard {
        info!(from = soft, to = hard, "raised the open-files limit");
    }
    Ok(())
}
