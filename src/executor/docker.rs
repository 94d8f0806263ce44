//! Docker mode: a worker is a container created from the entry's image,
//! with the database folder bind-mounted at `/db`, the workspace at
//! `/workspace`, the memory limit, the pool's network, and labels naming the
//! pool's database so every command can find its containers. Deaths come
//! from the engine's event stream (`die`), with a slow inspect as a
//! fallback; exit code and OOM flag come from inspecting the container.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::Launch;
use crate::api::Endpoint;
use crate::config::WorkerProgram;
use crate::contract::env;
use crate::logs::{self, RotatingLog, Tail};
use crate::vocab::{EndCause, ModeKind, Protocol, WorkerId};

/// Label keys on every container clx-pool creates.
pub const LABEL_DB_ID: &str = "clx-pool.db-id";
pub const LABEL_DB: &str = "clx-pool.db";
pub const LABEL_TYPE: &str = "clx-pool.worker-type";
pub const LABEL_SLOT: &str = "clx-pool.slot";
/// The worker a swarm task belongs to (its slot holds one at a time).
pub const LABEL_WORKER: &str = "clx-pool.worker-id";

/// How long to wait for the engine to answer before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A short, stable identity of a database path, used in container names and
/// labels so two pools on one host never collide.
pub fn db_id(db: &Path) -> String {
    let digest = Sha256::digest(db.to_string_lossy().as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// For an engine's error, whether it lies outside the worker (a busy or
/// failing engine) rather than in its entry (a missing image: 404); None
/// for errors that are not the engine's.
pub fn error_is_outside(cause: &(dyn std::error::Error + 'static)) -> Option<bool> {
    match cause.downcast_ref::<bollard::errors::Error>()? {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code != 404),
        _ => None,
    }
}

/// Where the engine is expected, for messages.
pub fn engine_address() -> String {
    std::env::var(env::cli::DOCKER_HOST).unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// Connects to the engine named by `DOCKER_HOST` (or the local socket) and
/// checks that it answers.
pub async fn connect() -> anyhow::Result<Docker> {
    let attempt = async {
        let docker = Docker::connect_with_defaults()?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(docker)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => anyhow::bail!("no Docker engine answers at {}: {e}", engine_address()),
        Err(_) => anyhow::bail!(
            "the Docker engine at {} did not answer within {}s",
            engine_address(),
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

pub async fn image_exists(docker: &Docker, image: &str) -> bool {
    docker.inspect_image(image).await.is_ok()
}

/// Networks Docker itself provides, used as they are.
pub fn is_predefined_network(network: &str) -> bool {
    ["none", "host", "bridge", "default"].contains(&network) || network.starts_with("container:")
}

/// How many networks carry exactly this name (the engine's name filter
/// matches substrings).
pub async fn networks_named(docker: &Docker, network: &str) -> anyhow::Result<usize> {
    let filters = HashMap::from([("name", vec![network.to_string()])]);
    let list = docker
        .list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filters).build()))
        .await
        .with_context(|| format!("listing docker networks named {network}"))?;
    Ok(list.iter().filter(|n| n.name.as_deref() == Some(network)).count())
}

/// The engine as one pool uses it: its client, its database's identity and
/// the deaths its event stream reported.
pub struct DockerEngine {
    pub client: Docker,
    db_id: String,
    db_path: PathBuf,
    deaths: Mutex<HashSet<String>>,
    died: Notify,
    /// Its event follower and the workers' output drains.
    pub tasks: super::tasks::EngineTasks,
}

impl DockerEngine {
    /// Wraps a connected client for the pool of `db_path` and starts
    /// following its containers' `die` events.
    pub fn new(client: Docker, db_path: &Path) -> Arc<DockerEngine> {
        let engine = Arc::new(DockerEngine {
            client,
            db_id: db_id(db_path),
            db_path: db_path.to_path_buf(),
            deaths: Mutex::new(HashSet::new()),
            died: Notify::new(),
            tasks: super::tasks::EngineTasks::default(),
        });
        let e = engine.clone();
        engine.tasks.follow(async move { e.follow_events().await });
        engine
    }

    fn label_filter(&self) -> HashMap<&'static str, Vec<String>> {
        HashMap::from([("label", vec![format!("{LABEL_DB_ID}={}", self.db_id)])])
    }

    async fn follow_events(self: Arc<Self>) {
        // Replaying from a second ago covers containers that die before
        // the subscription is established.
        let mut since = unix_now() - 1;
        loop {
            let mut filters = self.label_filter();
            filters.insert("type", vec!["container".into()]);
            filters.insert("event", vec!["die".into()]);
            let opts = EventsOptionsBuilder::default()
                .since(&since.to_string())
                .filters(&filters)
                .build();
            let mut stream = self.client.events(Some(opts));
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(ev) => {
                        if let Some(id) = ev.actor.and_then(|a| a.id) {
                            self.deaths.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                            self.died.notify_waiters();
                        }
                        since = ev.time.unwrap_or(since);
                    }
                    Err(e) => {
                        tracing::warn!("docker event stream: {e}");
                        break;
                    }
                }
            }
            if Arc::strong_count(&self) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Makes sure `network` exists (listing first: an old engine accepts
    /// two networks of one name, after which the name is ambiguous).
    pub async fn ensure_network(&self, network: &str) -> anyhow::Result<()> {
        if is_predefined_network(network) || networks_named(&self.client, network).await? > 0 {
            return Ok(());
        }
        self.client
            .create_network(NetworkCreateRequest {
                name: network.to_string(),
                driver: Some("bridge".into()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the docker network {network}"))?;
        tracing::info!(network, "created the docker network");
        Ok(())
    }

    /// The gateway of a bridge network: the host's address on it, which
    /// its containers reach.
    pub async fn gateway(&self, network: &str) -> anyhow::Result<Option<std::net::IpAddr>> {
        let inspect = self
            .client
            .inspect_network(network, None)
            .await
            .with_context(|| format!("inspecting the docker network {network}"))?;
        let gateways = inspect
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.gateway?.parse::<std::net::IpAddr>().ok());
        // IPv4 first: what `host-gateway` would give.
        let mut all: Vec<_> = gateways.collect();
        all.sort_by_key(|ip| !ip.is_ipv4());
        Ok(all.into_iter().next())
    }

    /// Removes every container of this pool, running or not; returns how many.
    pub async fn remove_pool_containers(&self) -> anyhow::Result<usize> {
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&self.label_filter())
            .build();
        let list = self
            .client
            .list_containers(Some(opts))
            .await
            .context("listing the pool's containers")?;
        let removals = list
            .iter()
            .filter_map(|c| c.id.clone())
            .map(|id| async move { self.remove(&id).await });
        let n = futures_util::future::join_all(removals).await.len();
        Ok(n)
    }

    async fn remove(&self, id: &str) {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self.client.remove_container(id, Some(opts)).await
            && !is_not_found(&e)
        {
            tracing::warn!(container = id, "removing container: {e}");
        }
    }

    /// Total CPU seconds and memory in use (without the page cache) of a
    /// container: one fast one-shot sample.
    pub async fn usage(&self, id: &str) -> Option<(f64, u64)> {
        let opts = StatsOptionsBuilder::default().stream(false).one_shot(true).build();
        let stats = self.client.stats(id, Some(opts)).next().await?.ok()?;
        let cpu_ns = stats.cpu_stats.as_ref()?.cpu_usage.as_ref()?.total_usage?;
        let mem = stats.memory_stats.as_ref()?;
        let cache = mem
            .stats
            .as_ref()
            .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied())
            .unwrap_or(0);
        Some((cpu_ns as f64 / 1e9, mem.usage?.saturating_sub(cache)))
    }

    pub async fn launch(
        self: &Arc<Self>,
        spec: &Launch,
        image: &str,
        network: &str,
        api: Option<&Endpoint>,
    ) -> anyhow::Result<DockerWorker> {
        let name = format!("clx-{}-worker-{}-{}", spec.worker_type, spec.slot, self.db_id);
        // A container of that name from an earlier run goes first.
        self.remove(&name).await;
        let body = self.container(spec, image, network, api)?;
        let created = self
            .client
            .create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body)
            .await
            .with_context(|| format!("creating container {name} from {image}"))?;
        let id = created.id;
        let mut log = logs::open_worker_log(&spec.log_path, spec.log_max_size, spec.log_keep)?;
        logs::mark(
            &mut log,
            &format!("starting container {name} ({}) from {image}", &id[..12]),
        );
        if let Err(e) = self.client.start_container(&id, None).await {
            self.remove(&id).await;
            return Err(anyhow::Error::new(e).context(format!("starting container {name}")));
        }
        let tail = Tail::default();
        self.tasks.spawn(drain_logs(
            self.client.logs(&id, Some(follow_output())),
            log,
            tail.clone(),
        ));
        Ok(DockerWorker {
            short_id: WorkerId(id[..12].to_string()),
            tail,
            engine: self.clone(),
            id,
            name,
            exit: None,
            builtin: matches!(spec.program, WorkerProgram::JobCommand(_)),
        })
    }

    /// The container of one worker: the protocol's environment and
    /// mounts, the memory limit, the user, the network, labels naming the
    /// pool. A CLM worker program reaches the queue through the Worker API
    /// (`api`), as CLM's Docker executor sets it up; everything else gets
    /// the database's folder at `/db`.
    fn container(
        &self,
        spec: &Launch,
        image: &str,
        network: &str,
        api: Option<&Endpoint>,
    ) -> anyhow::Result<ContainerCreateBody> {
        let through_api = match (&spec.program, api) {
            (WorkerProgram::JobCommand(_), _) | (_, None) => None,
            (_, Some(api)) if spec.protocol == Protocol::Clm => Some(api),
            _ => None,
        };
        let (env, binds, extra_hosts) = match through_api {
            Some(api) => clm_api_contract(spec, api),
            None => database_contract(spec)?,
        };
        // `command` is the whole argv, as in direct mode: it replaces the
        // image's entrypoint too. `job_command` runs the built-in worker,
        // which must be the image's entrypoint (as in `make docker-image`).
        let (entrypoint, cmd) = match &spec.program {
            WorkerProgram::JobCommand(c) => (None, Some(spec.builtin_worker_args(ModeKind::Docker, c))),
            WorkerProgram::Command(c) if !c.is_empty() => (Some(vec![c[0].clone()]), Some(c[1..].to_vec())),
            WorkerProgram::Command(_) | WorkerProgram::Default => (None, None),
        };
        let labels = HashMap::from([
            (LABEL_DB_ID.to_string(), self.db_id.clone()),
            (LABEL_DB.to_string(), self.db_path.display().to_string()),
            (LABEL_TYPE.to_string(), spec.worker_type.clone()),
            (LABEL_SLOT.to_string(), spec.slot.to_string()),
        ]);
        let host_config = HostConfig {
            binds: Some(binds),
            memory: spec.memory_limit.map(|m| m as i64),
            // No swap beyond the limit: exceeding it is an OOM kill.
            memory_swap: spec.memory_limit.map(|m| m as i64),
            network_mode: Some(network.to_string()),
            extra_hosts,
            // Minimal images have no /tmp, which SQLite needs for temp files.
            tmpfs: Some(HashMap::from([("/tmp".to_string(), "rw,mode=1777".to_string())])),
            ..Default::default()
        };
        Ok(ContainerCreateBody {
            image: Some(image.to_string()),
            user: spec.container_user.clone(),
            env: Some(env),
            entrypoint,
            cmd,
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        })
    }
}

type Contract = (Vec<String>, Vec<String>, Option<Vec<String>>);

/// A worker that opens the database itself: its folder at `/db`, the
/// workspace at `/workspace`.
fn database_contract(spec: &Launch) -> anyhow::Result<Contract> {
    let db_file = spec.db_path.file_name().context("db_path has no file name")?;
    let db_dir = spec.db_path.parent().unwrap_or(Path::new("/"));
    let db_in_container = format!("/db/{}", db_file.to_string_lossy());
    let env = spec
        .environment(&super::Seen {
            db_path: &db_in_container,
            workspace: "/workspace",
            worker_id: None,
            tagged: false,
        })
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let binds = vec![
        format!("{}:/db", db_dir.display()),
        format!("{}:/workspace", spec.workspace.display()),
    ];
    Ok((env, binds, None))
}

/// Worker types whose CLM workers write into the course sources (rendered
/// diagrams), as in CLM's Docker executor; the others get them read-only.
const SOURCE_WRITING_TYPES: &[&str] = &["plantuml", "drawio"];

/// A CLM worker in a container, as CLM's `DockerWorkerExecutor` starts
/// it: the API's address and token, its pre-registered row, the host
/// paths it translates job paths from, the workspace at `/workspace` and
/// the course sources at `/source`.
fn clm_api_contract(spec: &Launch, api: &Endpoint) -> Contract {
    let env = clm_env(spec, &api.url, &api.token);
    let binds = clm_mounts(spec)
        .into_iter()
        .map(|(host, inside, writable)| format!("{}:{inside}:{}", host.display(), if writable { "rw" } else { "ro" }))
        .collect();
    let extra_hosts = api
        .host_alias
        .map(|ip| vec![format!("{}:{ip}", crate::api::HOST_ALIAS)]);
    (
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        binds,
        extra_hosts,
    )
}

/// The environment of a CLM worker in a container (docker or swarm
/// mode): the API's URL and token, its pre-registered row, the host paths
/// it translates job paths from; then the entry's own `env`, which wins.
pub(super) fn clm_env(spec: &Launch, url: &str, token: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (env::WORKER_TYPE.into(), spec.worker_type.clone()),
        (env::CLM_API_URL.into(), url.to_string()),
        (env::CLM_API_TOKEN.into(), token.to_string()),
        (env::CLM_HOST_WORKSPACE.into(), spec.workspace.display().to_string()),
        (env::LOG_LEVEL.into(), spec.log_level.clone()),
        ("PYTHONUNBUFFERED".into(), "1".into()),
    ];
    if let Some(row) = spec.preregistered_row {
        env.push((env::CLM_WORKER_ID.into(), row.to_string()));
    }
    if let Some(data) = &spec.data_dir {
        env.push((env::CLM_HOST_DATA_DIR.into(), data.display().to_string()));
    }
    for (k, v) in &spec.extra_env {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// The folders a CLM container sees: (host path, path inside, writable).
/// The workspace is written; the course sources only by the types that
/// render into them.
pub(super) fn clm_mounts(spec: &Launch) -> Vec<(PathBuf, &'static str, bool)> {
    let mut mounts = vec![(spec.workspace.clone(), "/workspace", true)];
    if let Some(data) = &spec.data_dir {
        let writes = SOURCE_WRITING_TYPES.contains(&spec.worker_type.as_str());
        mounts.push((data.clone(), "/source", writes));
    }
    mounts
}

/// A container's (or service's) stdout and stderr, followed.
pub(super) fn follow_output() -> bollard::query_parameters::LogsOptions {
    LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build()
}

pub(super) async fn drain_logs(
    mut stream: impl futures_util::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Unpin,
    mut log: RotatingLog,
    tail: Tail,
) {
    while let Some(Ok(chunk)) = stream.next().await {
        let bytes = chunk.into_bytes();
        log.write_lines(&bytes);
        tail.push(&bytes);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(super) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 304,
            ..
        }
    )
}

pub struct DockerWorker {
    /// The id the worker registers with (the container's short id).
    pub short_id: WorkerId,
    pub tail: Tail,
    engine: Arc<DockerEngine>,
    id: String,
    name: String,
    exit: Option<EndCause>,
    /// The built-in worker finishes its job on SIGUSR1 (see direct mode).
    builtin: bool,
}

impl DockerWorker {
    /// Resolves when the container has exited: on its `die` event, or at
    /// worst on the next inspect (every few seconds, should events stall).
    /// Cancel-safe.
    pub async fn wait(&mut self) -> EndCause {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        loop {
            let notified = self.engine.died.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .engine
                .deaths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id)
            {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if !self.is_running().await {
                        break;
                    }
                }
            }
        }
        let cause = self.exit_cause().await;
        self.exit = Some(cause.clone());
        cause
    }

    async fn is_running(&self) -> bool {
        match self.engine.client.inspect_container(&self.id, None).await {
            Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn exit_cause(&self) -> EndCause {
        match self.engine.client.inspect_container(&self.id, None).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                let code = state.exit_code.unwrap_or(-1) as i32;
                if state.oom_killed == Some(true) {
                    EndCause::Oom
                } else if code > 128 && code < 160 {
                    EndCause::Signal(code - 128)
                } else {
                    EndCause::Code(code)
                }
            }
            Err(e) => EndCause::Unknown(format!("container {} vanished: {e}", self.name)),
        }
    }

    /// `docker stop` with the grace time (SIGTERM, then SIGKILL), then remove.
    /// Tells the container's worker to finish (see `DirectWorker::finish`).
    pub async fn finish(&self) {
        if self.exit.is_some() {
            return;
        }
        let signal = if self.builtin { "SIGUSR1" } else { "SIGTERM" };
        let opts = KillContainerOptionsBuilder::default().signal(signal).build();
        if let Err(e) = self.engine.client.kill_container(&self.id, Some(opts)).await
            && !is_not_found(&e)
        {
            tracing::warn!(container = %self.name, "telling the worker to finish ({signal}): {e}");
        }
    }

    pub async fn stop(&mut self, grace: Duration) -> EndCause {
        if self.exit.is_none() {
            let t = grace.as_secs_f64().ceil() as i32;
            let opts = StopContainerOptionsBuilder::default().t(t).build();
            if let Err(e) = self.engine.client.stop_container(&self.id, Some(opts)).await
                && !is_not_found(&e)
            {
                tracing::warn!(container = %self.name, "docker stop: {e}");
            }
        }
        let cause = self.wait().await;
        self.engine.remove(&self.id).await;
        cause
    }

    pub async fn sweep(&self) {
        self.engine.remove(&self.id).await;
    }
}
