//! `clx-pool start`: owns the database (through the supervisor lock),
//! cleans what an earlier run left, runs one task per worker slot, and on
//! SIGINT/SIGTERM (which `clx-pool stop` sends) stops every worker in
//! parallel before exiting.

pub mod cleanup;
pub mod guard;
pub mod monitor;
pub mod policy;
pub mod registry;
pub mod slot;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ExecutionMode};
use crate::db::{self, Db};
use crate::executor::Mode;
use crate::executor::docker::{self, DockerEngine};
use crate::lock::SupervisorLock;
use crate::vocab::SupervisorState;
use slot::{Slot, SlotReady};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let pool = &config.pool;
    let started = Instant::now();
    raise_open_files_limit(config.total_workers())?;
    let _lock = SupervisorLock::acquire(&pool.db_path)?;
    // Orphaned descendants of workers (a `setsid` grandchild whose parent
    // died) become our children instead of init's, so none escapes `stop`.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    for dir in [&pool.workspace_path, &pool.log_dir] {
        crate::files::create_dirs(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (db_path, wanted) = (pool.db_path.clone(), pool.protocol);
    let (conn, protocol) = tokio::task::spawn_blocking(move || db::open(&db_path, wanted)).await??;
    config.check_protocol(protocol)?;
    let db = Db::new(conn, &pool.db_path, protocol);
    info!(protocol = %protocol, db = %pool.db_path.display(), "opened the job database");
    // From here on, if this process dies without stopping the pool, the
    // guard cleans up after it.
    let guard = guard::spawn(&pool.db_path)?;
    tracing::debug!(pid = guard.pid(), "started the guard");

    // Docker is touched only when an entry may use it.
    let (engine, modes) = resolve_modes(&config).await?;
    let report = cleanup::orphans(&db, pool.stop_timeout, engine.clone()).await?;
    if !report.is_empty() {
        warn!("cleaned up after an earlier run of this database: {report}");
    }

    let me = std::process::id() as i64;
    let record = (
        crate::procs::start_ticks(me as i32),
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config.path.to_string_lossy().into_owned(),
        pool.workspace_path.to_string_lossy().into_owned(),
        config.total_workers() as i64,
    );
    let after_row = db
        .call(move |c| {
            db::pool::begin_run(
                c,
                protocol,
                &db::pool::NewSupervisor {
                    pid: me,
                    proc_start: record.0,
                    hostname: &record.1,
                    config_path: &record.2,
                    workspace_path: &record.3,
                    expected_workers: record.4,
                },
            )?;
            db::workers::max_row(c)
        })
        .await?;

    let token = CancellationToken::new();
    let mut signals = JoinSet::new();
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        let mut s = signal(kind).context("installing signal handlers")?;
        let token = token.clone();
        signals.spawn(async move {
            s.recv().await;
            info!("signal received: stopping all workers");
            token.cancel();
        });
    }
    // A closed terminal sends SIGHUP: it must not end the pool.
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    signals.spawn(async move {
        while hangups.recv().await.is_some() {
            warn!("SIGHUP received and ignored (the pool goes on; stop it with `clx-pool stop` or SIGTERM)");
        }
    });

    let registry = registry::Registry::spawn(db.clone(), after_row, token.child_token());
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut slots = JoinSet::new();
    let mut hung_senders = std::collections::HashMap::new();
    for (worker, (mode, mode_label)) in config.workers.iter().zip(modes) {
        let worker = Arc::new(worker.clone());
        for index in 0..worker.count {
            let (hung_tx, hung) = mpsc::unbounded_channel();
            hung_senders.insert((worker.worker_type.clone(), index), hung_tx);
            let slot = Slot {
                config: config.clone(),
                worker: worker.clone(),
                index,
                db: db.clone(),
                registry: registry.clone(),
                token: token.clone(),
                ready: ready_tx.clone(),
                hung,
                mode: mode.clone(),
                mode_label: mode_label.clone(),
            };
            slots.spawn(slot.run());
        }
    }
    drop(ready_tx);
    let monitor = monitor::Monitor {
        config: config.clone(),
        db: db.clone(),
        token: token.clone(),
        slots: hung_senders,
        engine: engine.clone(),
    };
    let monitor = tokio::spawn(monitor.run());
    // As child subreaper the supervisor inherits its workers' orphaned
    // descendants; collect them as they exit.
    let mut sigchld = signal(SignalKind::child()).context("installing the SIGCHLD handler")?;
    let reaper_token = token.clone();
    let reaper = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = reaper_token.cancelled() => return,
                _ = sigchld.recv() => crate::procs::reap_strays(),
            }
        }
    });
    let total = config.total_workers();
    info!(workers = total, db = %pool.db_path.display(), "starting pool");

    let (mut registered, mut failed) = (0u32, 0u32);
    while registered + failed < total {
        tokio::select! {
            _ = token.cancelled() => break,
            msg = ready_rx.recv() => match msg {
                Some(SlotReady::Registered) => registered += 1,
                Some(SlotReady::Failed) => failed += 1,
                None => break,
            },
        }
    }
    if !token.is_cancelled() {
        let elapsed = started.elapsed();
        if failed == 0 {
            info!(
                workers = total,
                "all {total} workers registered in {:.3}s",
                elapsed.as_secs_f64()
            );
        } else {
            error!("{registered} of {total} workers registered; {failed} slots failed (see `clx-pool stats`)");
        }
        record_state(&db, SupervisorState::Running).await;
        token.cancelled().await;
    }

    record_state(&db, SupervisorState::Stopping).await;
    let stopping = Instant::now();
    while let Some(res) = slots.join_next().await {
        if let Err(e) = res {
            error!("a slot task failed: {e}");
        }
    }
    // Whatever the stopped workers left outside their process groups.
    let db_path = pool.db_path.clone();
    let swept = crate::procs::sweep(
        move || crate::procs::find_pool_processes(&db_path),
        std::time::Duration::from_secs(5),
    )
    .await;
    if swept > 0 {
        info!(processes = swept, "killed processes the workers left running");
    }
    if let Some(engine) = &engine
        && let Ok(n) = engine.remove_pool_containers().await
        && n > 0
    {
        info!(containers = n, "removed leftover containers");
    }
    let _ = monitor.await;
    reaper.abort();
    crate::procs::reap_strays();
    record_state(&db, SupervisorState::Stopped).await;
    info!("all workers stopped in {:.3}s", stopping.elapsed().as_secs_f64());
    signals.abort_all();
    guard.dismiss();
    Ok(())
}

/// Records the supervisor's state, retrying until it lands: `stats` and
/// `wait --ready` must never read a state the supervisor left.
async fn record_state(db: &Db, state: SupervisorState) {
    let protocol = db.protocol();
    let what = format!("recording the supervisor's state {state}");
    if let Err(e) = db
        .call_until_done(&what, move |c| db::pool::set_state(c, protocol, state))
        .await
    {
        error!("{e:#}");
    }
}

/// Decides how each `[[workers]]` entry runs: `docker` needs a reachable
/// engine and the image on this host (clx-pool never pulls), `auto` falls
/// back to direct without them. Connects to Docker only if some entry may
/// use it; a pool of direct entries never touches Docker.
async fn resolve_modes(config: &Config) -> anyhow::Result<(Option<Arc<DockerEngine>>, Vec<(Mode, String)>)> {
    let pool = &config.pool;
    let mut engine = None;
    let mut engine_error = None;
    if config.workers.iter().any(|w| w.execution_mode != ExecutionMode::Direct) {
        match docker::connect().await {
            Ok(client) => engine = Some(DockerEngine::new(client, &pool.db_path)),
            Err(e) => engine_error = Some(e),
        }
    }
    let mut network_ready = false;
    let mut modes = Vec::new();
    for w in &config.workers {
        let at = format!("{}:{}: workers `{}`", config.path.display(), w.line, w.worker_type);
        let image = w.image.clone().unwrap_or_default();
        let docker_ok = match (&engine, w.execution_mode) {
            (_, ExecutionMode::Direct) => false,
            (None, ExecutionMode::Docker) => {
                anyhow::bail!(
                    "{at}: execution_mode = \"docker\" needs a Docker engine: {:#}",
                    engine_error.as_ref().expect("an error when there is no engine")
                )
            }
            (Some(e), ExecutionMode::Docker) => {
                if !docker::image_exists(&e.client, &image).await {
                    anyhow::bail!(
                        "{at}: the image {image} is not on this host; clx-pool never pulls: get it with `docker pull {image}`{}",
                        build_hint(&image)
                    );
                }
                true
            }
            (None, ExecutionMode::Auto) => {
                info!(worker_type = %w.worker_type, "execution_mode = \"auto\": running directly ({:#})", engine_error.as_ref().expect("an error when there is no engine"));
                false
            }
            (Some(e), ExecutionMode::Auto) => {
                if image.is_empty() {
                    info!(worker_type = %w.worker_type, "execution_mode = \"auto\": running directly (no image configured)");
                    false
                } else if docker::image_exists(&e.client, &image).await {
                    info!(worker_type = %w.worker_type, image, "execution_mode = \"auto\": running in docker");
                    true
                } else {
                    info!(worker_type = %w.worker_type, image, "execution_mode = \"auto\": running directly (the image is not on this host)");
                    false
                }
            }
        };
        let auto = if w.execution_mode == ExecutionMode::Auto {
            " (auto)"
        } else {
            ""
        };
        if docker_ok {
            let engine = engine.clone().expect("docker_ok implies an engine");
            if !network_ready {
                engine
                    .ensure_network(&pool.network)
                    .await
                    .with_context(|| format!("{at}: preparing the docker network"))?;
                network_ready = true;
            }
            modes.push((
                Mode::Docker {
                    engine,
                    image,
                    network: pool.network.clone(),
                },
                format!("docker{auto}"),
            ));
        } else {
            modes.push((Mode::Direct, format!("direct{auto}")));
        }
    }
    Ok((engine, modes))
}

/// Open files a pool needs: a few for the supervisor itself, and per worker
/// its output pipe, its log file and its process handle (or, in docker
/// mode, its log stream), with room for a replacement starting while the
/// old worker is being stopped.
fn open_files_needed(workers: u32) -> u64 {
    64 + 6 * u64::from(workers)
}

/// Raises the soft open-files limit to the hard one (workers inherit it)
/// and refuses, before anything starts, a pool that cannot fit under it.
fn raise_open_files_limit(workers: u32) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-files limit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open-files limit")?;
    }
    let needed = open_files_needed(workers);
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

/// For the project's own test image, where it comes from.
fn build_hint(image: &str) -> &'static str {
    if image.starts_with("clx-pool/") {
        " (or build it: `make docker-image`)"
    } else {
        ""
    }
}
