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
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api;
use crate::config::{Config, WorkerProgram};
use crate::db::{self, Db};
use crate::executor::Executor;
use crate::executor::docker::DockerEngine;
use crate::executor::plan::{self, Decision};
use crate::procs;
use crate::takeover::{self, Takeover, Taker};
use crate::vocab::{Mode, ModeKind, Protocol, SupervisorState, WorkerRow};
use control::{fleet, manage, rollout};
use observe::{metrics, notify, sdnotify};
use slot::Settled;

/// What `start` prepared before any worker runs.
struct Prepared {
    db: Db,
    guard: guard::Guard,
    engine: Option<Arc<DockerEngine>>,
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
    let mut signals = handle_signals(&token, &config)?;
    // The one reaper runs until every worker is stopped and reaped.
    let reaper_token = CancellationToken::new();
    let reaper = spawn_reaper(reaper_token.clone())?;
    // Orders from `scale`, `restart`, `reload` and `stop`; SIGHUP reloads.
    let operations = rollout::Operations::default();
    let requests = control::server::serve(&config.pool.db_path, token.clone(), operations.clone())?;
    let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let sd = sdnotify::SdNotify::from_env();
    // Idle built-in workers wait for their type's bell, rung from here.
    let types: Vec<String> = config.workers.iter().map(|w| w.worker_type.clone()).collect();
    bells::install(&config.pool.db_path, &types);
    let bell_ringer = tokio::spawn(bells::run(config.pool.db_path.clone(), token.clone()));
    let database = tokio::spawn(watch_database(config.pool.db_path.clone(), token.clone()));
    let notifier = notify::Notifier::new(config.pool.on_event.clone(), &config.pool.db_path);
    let (ready_rx, mut manager, monitor) = start_pool(&config, &prepared, &token, &sd, operations, notifier.clone());
    let guard = guard::Keeper::start(prepared.guard, &config.pool.db_path, notifier);
    info!(workers = config.total_workers(), db = %config.pool.db_path.display(), "starting pool");
    if let Some(listener) = prepared.metrics_listener {
        let bound = metrics::serve(listener, prepared.db.clone(), manager.metrics.clone(), token.clone())?;
        info!(%bound, "serving Prometheus metrics at /metrics");
    }
    manager.fleet.record_wanted().await;
    if await_settled(ready_rx, config.total_workers(), &token, started).await {
        record_state(&prepared.db, SupervisorState::Running).await;
        sd.ready(&format!(
            "{} workers running on {}",
            config.total_workers(),
            config.pool.db_path.display()
        ));
        manager.run(requests, hangups).await;
    }
    sd.stopping();
    record_state(&prepared.db, SupervisorState::Stopping).await;
    let stopping = Instant::now();
    while let Some(res) = manager.fleet.tasks.join_next().await {
        if let Err(e) = res {
            error!("a slot task failed: {e}");
        }
    }
    sweep_leftovers(&config, prepared.engine.as_deref()).await;
    // What the workers started and left, without the tags (a cleared
    // environment), was adopted by this child subreaper: it goes too.
    let adopted = procs::end_descendants(Duration::from_secs(5), &[guard.pid() as i32]).await;
    if adopted > 0 {
        info!(processes = adopted, "killed processes the workers left running");
    }
    if let Err(e) = bell_ringer.await {
        error!("the bell task failed: {e}");
    }
    let types: Vec<String> = manager
        .fleet
        .current()
        .workers
        .iter()
        .map(|w| w.worker_type.clone())
        .collect();
    bells::remove(&config.pool.db_path, &types);
    if let Some(api) = prepared.api {
        api.stop().await;
    }
    if let Err(e) = monitor.await {
        error!("the monitor task failed: {e}");
    }
    reaper_token.cancel();
    if let Err(e) = reaper.await {
        error!("the reaper task failed: {e}");
    }
    procs::reap();
    record_state(&prepared.db, SupervisorState::Stopped).await;
    info!("all workers stopped in {:.3}s", stopping.elapsed().as_secs_f64());
    signals.abort_all();
    guard.dismiss().await;
    match database.await {
        Ok(Some(lost)) => Err(anyhow::anyhow!(lost)),
        Ok(None) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("the database watch failed: {e}")),
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
        let (engine, executors, api) = executors(config, db.protocol()).await?;
        let metrics_listener = match pool.metrics_listen {
            Some(addr) => Some(metrics::listen(addr).await?),
            None => None,
        };
        Ok(((engine.clone(), executors, api, metrics_listener), engine))
    })
    .await?;
    if !taken.report.is_empty() {
        warn!("cleaned up after an earlier run of this database: {}", taken.report);
    }
    let ((engine, executors, api, metrics_listener), db) = (taken.prepared, taken.db);
    // From here on, if this process dies without stopping the pool, the
    // guard cleans up after it. Nothing of this run started yet: if it
    // cannot start, the guard has nothing to clean up.
    let guard = guard::spawn(&pool.db_path)?;
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
        engine,
        api,
        executors,
        metrics_listener,
        after_row,
    })
}

/// Runs the plan: each entry's executor, or the first reason one cannot
/// run; creates the docker network if an entry uses it, and starts CLM's
/// Worker API if CLM workers will run in containers.
async fn executors(config: &Config, protocol: Protocol) -> anyhow::Result<Executors> {
    let plan = plan::plan(config).await;
    let mut modes = Vec::new();
    for (w, decision) in config.workers.iter().zip(&plan.decisions) {
        let at = format!("{}:{}: workers `{}`", config.path.display(), w.line, w.worker_type);
        let (mode, why) = match decision {
            Decision::Cannot(why) => anyhow::bail!("{at}: {why}"),
            Decision::Runs { mode, why } => (*mode, why),
        };
        if let Some(why) = why {
            info!(worker_type = %w.worker_type, "execution_mode = \"auto\": {why}");
        }
        modes.push(mode);
    }
    let mut api = None;
    if let (true, Some(engine)) = (plan.uses_docker(), &plan.engine) {
        let network = &config.pool.network;
        engine
            .ensure_network(network)
            .await
            .context("preparing the docker network")?;
        let needs_api = protocol == Protocol::Clm
            && config
                .workers
                .iter()
                .zip(&modes)
                .any(|(w, m)| m.kind == ModeKind::Docker && !matches!(w.program, WorkerProgram::JobCommand(_)));
        if needs_api {
            api = Some(start_api(config, engine).await?);
        }
    }
    let endpoint = api.as_ref().map(|a: &api::ApiServer| a.endpoint.clone());
    let executors = config
        .workers
        .iter()
        .zip(modes)
        .map(|(w, mode)| {
            let executor = match (mode.kind, &plan.engine) {
                (ModeKind::Docker, Some(engine)) => Executor::Docker {
                    engine: engine.clone(),
                    image: w.image.clone().unwrap_or_default(),
                    network: config.pool.network.clone(),
                    api: endpoint.clone(),
                },
                _ => Executor::Direct,
            };
            (executor, mode)
        })
        .collect();
    Ok((plan.engine, executors, api))
}

type Executors = (Option<Arc<DockerEngine>>, Vec<(Executor, Mode)>, Option<api::ApiServer>);

/// Starts CLM's Worker API where the pool's containers reach it.
async fn start_api(config: &Config, engine: &DockerEngine) -> anyhow::Result<api::ApiServer> {
    let pool = &config.pool;
    let at = format!("{}: [pool] network = \"{}\"", config.path.display(), pool.network);
    let reach = match pool.network.as_str() {
        "host" => api::Reach::HostNetwork,
        "none" => anyhow::bail!(
            "{at}: CLM workers in containers reach the queue through the worker API, over a network; use a bridge network (the default) or \"host\""
        ),
        n => match engine.gateway(n).await? {
            Some(gateway) => api::Reach::Gateway(gateway),
            None => {
                anyhow::bail!("{at}: the network has no gateway address, so its containers cannot reach the worker API")
            }
        },
    };
    if let Some(addr) = pool.api_listen
        && !api::is_local(addr.ip(), reach)
    {
        warn!(%addr, "the worker API listens beyond this machine (api_listen); requests need the token from api_token_file");
    }
    let token = api::token(pool.api_token_file.as_deref())
        .with_context(|| format!("{}: [pool] api_token_file", config.path.display()))?;
    let (db_path, protocol) = (pool.db_path.clone(), Protocol::Clm);
    let conn = tokio::task::spawn_blocking(move || db::open_existing(&db_path))
        .await??
        .0;
    let db = Db::new(conn, &pool.db_path, protocol);
    let server = api::start(db, pool.cache_db_path.clone(), token, pool.api_listen, reach).await?;
    let at: Vec<String> = server.listening.iter().map(|a| a.to_string()).collect();
    info!(listening = %at.join(", "), url = %server.endpoint.url, "the worker API is up (bearer token required)");
    Ok(server)
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
) -> (
    mpsc::UnboundedReceiver<Settled>,
    manage::Manager,
    tokio::task::JoinHandle<()>,
) {
    let registry = registry::Registry::spawn(p.db.clone(), p.after_row, token.child_token());
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
        engine: p.engine.clone(),
        notifier,
        sd: sd.clone(),
        metrics: metrics.clone(),
    };
    let manager = manage::Manager {
        fleet,
        protocol: p.db.protocol(),
        engine: p.engine.clone(),
        api: p.api.as_ref().map(|a| a.endpoint.clone()),
        token: token.clone(),
        metrics,
        db: p.db.clone(),
    };
    (ready_rx, manager, tokio::spawn(monitor.run()))
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
async fn sweep_leftovers(config: &Config, engine: Option<&DockerEngine>) {
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
    if let Some(engine) = engine {
        match engine.remove_pool_containers().await {
            Ok(0) => {}
            Ok(n) => info!(containers = n, "removed leftover containers"),
            Err(e) => warn!("removing leftover containers: {e:#}"),
        }
    }
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
