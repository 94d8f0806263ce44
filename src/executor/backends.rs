//! The backends a pool's workers run on, reached once per run: everything
//! the supervisor asks of "a backend" — how an entry runs, the executor
//! for it, the usage of running workers, what a pool left behind — without
//! naming one. The supervisor holds a [`Backends`] and never an engine;
//! adding a backend touches `executor/` and `config/` only.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use super::docker::{self, DockerEngine};
use super::plan::{self, Decision};
use super::swarm::{Checked, SwarmEngine, SwarmLaunch};
use super::{Executor, direct};
use crate::api;
use crate::config::{Config, ExecutionMode, WorkerConfig, WorkerProgram};
use crate::db::{self, Db};
use crate::vocab::{Mode, ModeKind, Protocol, WorkerId, WorkerRow};

/// The engines of a running pool (none for a direct-only pool).
#[derive(Clone, Default)]
pub struct Backends {
    docker: Option<Arc<DockerEngine>>,
    /// CLM's Worker API, for CLM workers in containers.
    api: Option<Arc<api::Endpoint>>,
    /// A swarm manager, for swarm entries.
    swarm: Option<Arc<SwarmEngine>>,
    /// The Worker API as swarm nodes reach it (`api_advertise`), and
    /// where their tokens are minted.
    swarm_api: Option<(String, api::tokens::WorkerTokens)>,
    /// The Worker API's TLS, read again by a reload.
    api_tls: Option<api::Tls>,
}

/// Where a running worker is, for its usage.
#[derive(Debug, Clone)]
pub enum Place {
    /// A direct worker: its process tree.
    Process(i32),
    /// A container, by id.
    Container(WorkerId),
}

/// Why an entry added or changed at run time cannot run in this pool.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("{at}: {why}")]
    Cannot { at: String, why: String },
    #[error("{at}: the pool started without Docker; an entry in docker mode needs a restart of the supervisor")]
    NoEngine { at: String },
    #[error("{at}: CLM workers in containers need the worker API, which starts with the supervisor; restart it")]
    NoApi { at: String },
    #[error("{at}: the pool started without a swarm manager; a swarm entry needs a restart of the supervisor")]
    NoSwarm { at: String },
}

/// What `start` learns by reaching the backends: them, each entry's
/// executor and mode, and the Worker API server if it started one.
pub struct Reached {
    pub backends: Backends,
    pub executors: Vec<(Executor, Mode)>,
    pub api: Option<api::ApiServer>,
}

impl Backends {
    /// Runs the plan for `start`: each entry's executor, or the first
    /// reason one cannot run; creates the docker network if an entry uses
    /// it, and starts CLM's Worker API if CLM workers will run in
    /// containers.
    pub async fn reach(config: &Config, protocol: Protocol) -> anyhow::Result<Reached> {
        let plan = plan::plan(config).await;
        let mut modes = Vec::new();
        for (w, decision) in config.workers.iter().zip(&plan.decisions) {
            let (mode, why) = match decision {
                Decision::Cannot(why) => anyhow::bail!("{}: {why}", at(config, w)),
                Decision::Runs { mode, why } => (*mode, why),
            };
            if let Some(why) = why {
                info!(worker_type = %w.worker_type, "execution_mode = \"auto\": {why}");
            }
            modes.push(mode);
        }
        let mut backends = Backends {
            docker: plan.engine.clone(),
            swarm: plan.swarm.clone(),
            ..Backends::default()
        };
        let mut server = None;
        if let (true, Some(engine)) = (plan.uses_docker(), &plan.engine) {
            engine
                .ensure_network(&config.pool.network)
                .await
                .context("preparing the docker network")?;
            let needs_api = config
                .workers
                .iter()
                .zip(&modes)
                .any(|(w, m)| m.kind == ModeKind::Docker && needs_api(protocol, w));
            if needs_api {
                anyhow::ensure!(
                    config.pool.api_tls.is_none(),
                    "{}: [pool] api_tls_cert: HTTPS for the worker API is built for swarm entries; CLM workers in local containers reach it over plain HTTP on this machine: remove api_tls_* or run those entries in swarm mode",
                    config.path.display()
                );
                let started = start_api(config, engine).await?;
                backends.api = Some(started.endpoint.clone());
                server = Some(started);
            }
        }
        if modes.iter().any(|m| m.kind == ModeKind::Swarm) {
            let started = match server.take() {
                Some(s) => s,
                None => start_api_for_swarm(config).await?,
            };
            let url = config.pool.api_advertise.clone().unwrap_or_default();
            backends.swarm_api = Some((url, started.tokens.clone()));
            backends.api_tls = started.tls.clone();

            server = Some(started);
        }
        let executors = config
            .workers
            .iter()
            .zip(modes)
            .map(|(w, mode)| (backends.executor(config, w, mode.kind), mode))
            .collect();
        Ok(Reached {
            backends,
            executors,
            api: server,
        })
    }

    /// The backends a cleanup needs: these, and for the modes the pool's
    /// slots ran in that none was reached for, a new connection (Docker;
    /// the swarm manager at `swarm_host`).
    pub async fn for_cleanup(
        mut self,
        db_path: &Path,
        modes: impl IntoIterator<Item = ModeKind>,
        swarm_host: Option<&str>,
    ) -> Backends {
        let modes: Vec<ModeKind> = modes.into_iter().collect();
        if self.docker.is_none() && modes.contains(&ModeKind::Docker) {
            match docker::connect().await {
                Ok(client) => self.docker = Some(DockerEngine::new(client, db_path)),
                Err(e) => warn!("cannot look for this pool's leftover containers: {e:#}"),
            }
        }
        if self.swarm.is_none() && modes.contains(&ModeKind::Swarm) {
            match super::swarm::connect(swarm_host).await {
                Ok((client, address)) => self.swarm = Some(SwarmEngine::new(client, address, db_path)),
                Err(e) => warn!("cannot look for this pool's leftover swarm services: {e:#}"),
            }
        }
        self
    }

    /// How an entry added or changed at run time runs, with the engines
    /// and API this pool started with.
    pub async fn executor_for(
        &self,
        config: &Config,
        w: &WorkerConfig,
        protocol: Protocol,
    ) -> Result<(Executor, Mode), EntryError> {
        let at = at(config, w);
        let docker = self.docker.as_ref().map(|e| &e.client);
        let mode = match plan::decide_one(w, docker, self.swarm.as_deref()).await {
            Decision::Cannot(why) => return Err(EntryError::Cannot { at, why }),
            Decision::Runs { mode, .. } => mode,
        };
        match (mode.kind, &self.docker) {
            (ModeKind::Docker, None) => Err(EntryError::NoEngine { at }),
            (ModeKind::Docker, Some(_)) if needs_api(protocol, w) && self.api.is_none() => {
                Err(EntryError::NoApi { at })
            }
            (ModeKind::Swarm, _) if self.swarm.is_none() => Err(EntryError::NoSwarm { at }),
            (ModeKind::Swarm, _) if self.swarm_api.is_none() => Err(EntryError::NoApi { at }),
            (kind, _) => Ok((self.executor(config, w, kind), mode)),
        }
    }

    /// The executor of an entry in a mode whose backend was reached.
    fn executor(&self, config: &Config, w: &WorkerConfig, kind: ModeKind) -> Executor {
        if let (ModeKind::Swarm, Some(engine), Some((url, tokens))) = (kind, &self.swarm, &self.swarm_api) {
            return Executor::Swarm {
                engine: engine.clone(),
                how: Arc::new(SwarmLaunch {
                    image: w.image.clone().unwrap_or_default(),
                    placement: w.placement.clone(),
                    stop_grace: config.pool.stop_timeout,
                    api_url: url.clone(),
                    tokens: tokens.clone(),
                    ca: config.pool.api_tls_ca.clone(),
                    files: config.pool.swarm.files.clone(),
                    place_within: config
                        .pool
                        .startup_timeout
                        .saturating_sub(Duration::from_millis(500))
                        .max(Duration::from_millis(100)),
                }),
            };
        }
        match (kind, &self.docker) {
            (ModeKind::Docker, Some(engine)) => Executor::Docker {
                engine: engine.clone(),
                image: w.image.clone().unwrap_or_default(),
                network: config.pool.network.clone(),
                api: self.api.clone(),
            },
            _ => Executor::Direct,
        }
    }

    /// What the swarm manager's poller sees, when swarm entries run.
    pub fn swarm_tasks(&self) -> Option<tokio::sync::watch::Receiver<Arc<super::swarm::Seen>>> {
        self.swarm.as_ref().map(|s| s.seen())
    }

    /// CPU seconds and resident bytes of running workers, each from its
    /// backend (containers concurrently: each is a round trip). Workers
    /// that are gone are left out.
    pub async fn usage(&self, places: Vec<(WorkerRow, Place)>) -> anyhow::Result<HashMap<WorkerRow, (f64, u64)>> {
        let (processes, containers): (Vec<_>, Vec<_>) =
            places.into_iter().partition(|(_, p)| matches!(p, Place::Process(_)));
        let pids: Vec<(WorkerRow, i32)> = processes
            .into_iter()
            .filter_map(|(row, p)| match p {
                Place::Process(pid) => Some((row, pid)),
                Place::Container(_) => None,
            })
            .collect();
        let mut out = tokio::task::spawn_blocking(move || direct::usage(pids)).await?;
        if let Some(engine) = &self.docker {
            let asks = containers.into_iter().filter_map(|(row, p)| match p {
                Place::Container(id) => Some(async move { engine.usage(id.as_str()).await.map(|u| (row, u)) }),
                Place::Process(_) => None,
            });
            out.extend(futures_util::future::join_all(asks).await.into_iter().flatten());
        }
        Ok(out)
    }

    /// Before any swarm worker starts (after the takeover's cleanup): one
    /// preflight task per distinct placement of the swarm entries must
    /// reach the Worker API and read and write the shared workspace. Every
    /// failure is named, with its entry and the task's words.
    pub async fn preflight(&self, config: &Config) -> anyhow::Result<()> {
        let (Some(swarm), Some((url, _))) = (&self.swarm, &self.swarm_api) else {
            return Ok(());
        };
        let mut failures = Vec::new();
        for (w, outcome) in preflight_entries(swarm, url, config).await {
            match outcome {
                Ok(Checked::Passed(node)) => info!(
                    worker_type = %w.worker_type,
                    %node,
                    "preflight: the worker API answers and the shared workspace is read and written there"
                ),
                Ok(Checked::NotPlaced(why)) => warn!(
                    worker_type = %w.worker_type,
                    "preflight: no node took its task ({why}); its workers wait (cooling down) until one can"
                ),
                Err(why) => failures.push(format!("{}: preflight: {why}", at(config, w))),
            }
        }
        anyhow::ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    }

    /// Reads the Worker API's certificate and key again (a reload); None
    /// when it serves plain HTTP.
    pub fn reload_tls(&self) -> Option<anyhow::Result<()>> {
        self.api_tls.as_ref().map(api::Tls::reload)
    }

    /// Removes what of this pool outlived its workers in the backends
    /// (containers found by their labels); returns how many.
    pub async fn remove_leftovers(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        if let Some(swarm) = &self.swarm {
            n += swarm.remove_pool_services().await?;
        }
        if let Some(engine) = &self.docker {
            n += engine.remove_pool_containers().await?;
        }
        Ok(n)
    }

    /// Ends the engines' own tasks (followers at once; output drains and
    /// cleanups after a grace of a few seconds), at the end of a run once
    /// every worker is gone.
    pub async fn end(&self) {
        const GRACE: Duration = Duration::from_secs(5);
        let docker = async {
            match &self.docker {
                Some(engine) => engine.tasks.end(GRACE).await,
                None => 0,
            }
        };
        let swarm = async {
            match &self.swarm {
                Some(engine) => engine.tasks.end(GRACE).await,
                None => 0,
            }
        };
        let (a, b) = tokio::join!(docker, swarm);
        if a + b > 0 {
            warn!(
                tasks = a + b,
                "the engines' output drains or cleanups did not end within {GRACE:?}; ended"
            );
        }
    }

    /// Like [`Backends::remove_leftovers`], for the end of a run: logged,
    /// never failing the stop.
    pub async fn sweep(&self) {
        match self.remove_leftovers().await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed leftover containers and services"),
            Err(e) => warn!("removing leftover containers and services: {e:#}"),
        }
    }
}

/// Whether a CLM entry's containers reach the queue through the Worker API
/// (its own worker programs; the built-in worker opens the database).
fn needs_api(protocol: Protocol, w: &WorkerConfig) -> bool {
    protocol == Protocol::Clm && !matches!(w.program, WorkerProgram::JobCommand(_))
}

/// Where an entry is written, for messages.
fn at(config: &Config, w: &WorkerConfig) -> String {
    format!("{}:{}: workers `{}`", config.path.display(), w.line, w.worker_type)
}

/// Runs one preflight task per distinct placement (image, constraints,
/// user) of the swarm entries, against the Worker API at `url`; what each
/// found, beside the first entry of its placement (`start` and `check`).
pub async fn preflight_entries<'c>(
    swarm: &SwarmEngine,
    url: &str,
    config: &'c Config,
) -> Vec<(&'c WorkerConfig, Result<Checked, String>)> {
    let mut tried: Vec<(String, Vec<String>, Option<String>)> = Vec::new();
    let mut found = Vec::new();
    for w in config
        .workers
        .iter()
        .filter(|w| w.execution_mode == ExecutionMode::Swarm)
    {
        let image = w.image.clone().unwrap_or_default();
        let user = w.user.docker_user();
        let key = (image.clone(), w.placement.constraints.clone(), user.clone());
        if tried.contains(&key) {
            continue;
        }
        tried.push(key);
        let check = super::swarm::Preflight {
            image: &image,
            placement: &w.placement,
            api_url: url,
            ca: config.pool.api_tls_ca.as_deref(),
            workspace: &config.pool.workspace_path,
            files: &config.pool.swarm.files,
            user: user.as_deref(),
            place_within: config.pool.startup_timeout,
            finish_within: Duration::from_secs(60),
        };
        found.push((w, swarm.preflight(&check).await));
    }
    found
}

/// Starts CLM's Worker API for swarm entries: exactly at `api_listen`
/// (checked with the config: a fixed port, and plain HTTP beyond loopback
/// only when asked for).
async fn start_api_for_swarm(config: &Config) -> anyhow::Result<api::ApiServer> {
    let server = serve_api(config, api::Reach::HostNetwork).await?;
    let at: Vec<String> = server.listening.iter().map(|a| a.to_string()).collect();
    info!(listening = %at.join(", "), url = ?config.pool.api_advertise, "the worker API is up for swarm workers (bearer token required)");
    Ok(server)
}

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
    let server = serve_api(config, reach).await?;
    let at: Vec<String> = server.listening.iter().map(|a| a.to_string()).collect();
    info!(listening = %at.join(", "), url = %server.endpoint.url, "the worker API is up (bearer token required)");
    Ok(server)
}

/// The Worker API on its own connection to the database, with the token
/// of `api_token_file` (or a fresh one).
async fn serve_api(config: &Config, reach: api::Reach) -> anyhow::Result<api::ApiServer> {
    let pool = &config.pool;
    let token = api::token(pool.api_token_file.as_deref())
        .with_context(|| format!("{}: [pool] api_token_file", config.path.display()))?;
    let db_path = pool.db_path.clone();
    let conn = tokio::task::spawn_blocking(move || db::open_existing(&db_path))
        .await??
        .0;
    let db = Db::new(conn, &pool.db_path, Protocol::Clm);
    let tls = match &pool.api_tls {
        Some(files) => {
            Some(api::Tls::load(files).with_context(|| format!("{}: [pool] api_tls_cert", config.path.display()))?)
        }
        None => None,
    };
    api::start(db, pool.cache_db_path.clone(), token, pool.api_listen, reach, tls).await
}
