//! Swarm mode: each slot's worker is a Docker Swarm service of one replica
//! on a manager's engine, placed by Swarm on any node of the swarm
//! (notes/swarm.md §5). Swarm places, starts, stops and reports; every
//! supervision decision stays with the slot (Swarm's own restart policy is
//! `none`). Swarm emits no event when a task dies, so one pool-wide task
//! list per second (filtered by label: a filter by service answers 404
//! once the service is gone) and the nodes' states are read by one poller
//! and judged per service by [`verdict`], a pure function.
//!
//! Workers speak CLM's Worker API (`CLM_API_URL` = `api_advertise`) with
//! host networking; they see the workspace and course sources at the
//! coordinator's paths (`[swarm] files = "bind"`: a shared filesystem
//! mounted at the same path on every node).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bollard::Docker;
use bollard::models::{
    Limit, Mount, MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig, NetworkAttachmentConfig, NodeState,
    ResourceObject, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecPlacementPreferences,
    TaskSpecPlacementSpread, TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListNodesOptions, ListSecretsOptionsBuilder, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
    LogsOptionsBuilder, UpdateServiceOptionsBuilder,
};
use sha2::Digest;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Launch;
use super::docker::{self, LABEL_DB, LABEL_DB_ID, LABEL_SLOT, LABEL_TYPE, LABEL_WORKER, is_not_found};
use super::placement::NodeFacts;
use crate::api::tokens::WorkerTokens;
use crate::config::{Placement, SwarmFiles, WorkerProgram};
use crate::db::slots::TaskLine;
use crate::logs::{self, Tail};
use crate::vocab::{EndCause, WorkerId, WorkerRow};

/// How often the poller lists the pool's tasks and the swarm's nodes.
const POLL: Duration = Duration::from_secs(1);

/// How long a worker's output is still drained once the worker is gone.
const LAST_LINES_WITHIN: Duration = Duration::from_millis(500);

/// How long a connection to the manager may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The manager's engine for one pool, and what its poller last saw.
pub struct SwarmEngine {
    pub client: Docker,
    /// Where the manager was reached, for messages.
    pub address: String,
    db_id: String,
    db_path: PathBuf,
    seen: watch::Receiver<Arc<Seen>>,
    /// The CA's secret, once made.
    ca: tokio::sync::OnceCell<Secret>,
    /// Whether the log said that tokens go into the environment.
    said_env: std::sync::atomic::AtomicBool,
    /// Its task poller, the workers' output drains, and removals of
    /// workers' token secrets (which wait for their tasks).
    pub tasks: super::tasks::EngineTasks,
    /// The CA secret, when this engine made it (not found on the swarm).
    ca_made: std::sync::Mutex<Option<String>>,
}

/// One poll: the newest task of each of the pool's services, and the
/// nodes that are down (id → hostname).
#[derive(Debug, Default)]
pub struct Seen {
    pub tasks: HashMap<String, TaskView>,
    pub down: HashMap<String, String>,
    pub hostnames: HashMap<String, String>,
    /// Why the last poll failed, if it did (the previous view stays).
    pub error: Option<String>,
}

/// What a worker's end is judged by: its newest task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    pub id: String,
    /// The worker it belongs to (its container's label).
    pub worker: Option<WorkerId>,
    pub node: Option<String>,
    pub state: TaskState,
    pub desired: TaskState,
    pub exit_code: Option<i64>,
    /// Swarm's error (`task: non-zero exit (137)`, `no suitable node …`).
    pub err: Option<String>,
    pub message: Option<String>,
}

/// Connects to the manager named by `[swarm] docker_host` (else
/// `DOCKER_HOST`, else the local socket) and checks that it is a manager.
pub async fn connect(docker_host: Option<&str>) -> anyhow::Result<(Docker, String)> {
    let address = docker_host.map(str::to_string).unwrap_or_else(docker::engine_address);
    let attempt = async {
        let client = Docker::connect_with_host(&address)?;
        let client = client.negotiate_version().await?;
        let info = client.info().await?;
        Ok::<_, bollard::errors::Error>((client, info))
    };
    let (client, info) = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => anyhow::bail!("no Docker engine answers at {address}: {e}"),
        Err(_) => anyhow::bail!(
            "the Docker engine at {address} did not answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ),
    };
    let manager = info.swarm.as_ref().and_then(|s| s.control_available) == Some(true);
    anyhow::ensure!(
        manager,
        "the Docker engine at {address} is not a swarm manager (docker info: Swarm.ControlAvailable = false); swarm entries need a manager's engine ([swarm] docker_host or DOCKER_HOST); clx-pool never inits or joins a swarm"
    );
    Ok((client, address))
}

impl SwarmEngine {
    /// Wraps a manager's client for the pool of `db_path` and starts the
    /// poller; it ends when the engine is dropped.
    pub fn new(client: Docker, address: String, db_path: &Path) -> Arc<SwarmEngine> {
        let (tx, seen) = watch::channel(Arc::new(Seen::default()));
        let db_id = docker::db_id(db_path);
        let tasks = super::tasks::EngineTasks::default();
        tasks.follow(poll(client.clone(), db_id.clone(), tx));
        Arc::new(SwarmEngine {
            client,
            address,
            db_id,
            db_path: db_path.to_path_buf(),
            seen,
            ca: tokio::sync::OnceCell::new(),
            said_env: std::sync::atomic::AtomicBool::new(false),
            tasks,
            ca_made: std::sync::Mutex::new(None),
        })
    }

    fn labels(&self, spec: Option<&Launch>) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_DB_ID.to_string(), self.db_id.clone()),
            (LABEL_DB.to_string(), self.db_path.display().to_string()),
        ]);
        if let Some(spec) = spec {
            labels.insert(LABEL_TYPE.to_string(), spec.worker_type.clone());
            labels.insert(LABEL_SLOT.to_string(), spec.slot.to_string());
            labels.insert(LABEL_WORKER.to_string(), spec.worker_id.to_string());
        }
        labels
    }

    /// The secret holding `ca` (PEM) and this machine's bundle, made once
    /// per content (secrets are immutable: a new CA is a new name).
    pub async fn ca_secret(&self, ca: &Path) -> anyhow::Result<Secret> {
        use base64::Engine;
        let mut pem =
            crate::files::read_regular(ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
        anyhow::ensure!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "{} holds no PEM certificate",
            ca.display()
        );
        if let Ok(system) = std::fs::read_to_string(SYSTEM_BUNDLE) {
            pem = format!("{pem}\n{system}");
        }
        let digest = sha2::Sha256::digest(pem.as_bytes());
        let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let name = format!("clx-{}-ca-{hash}", self.db_id);
        if let Ok(found) = self.client.inspect_secret(&name).await
            && let Some(id) = found.id
        {
            return Ok(Secret { id, name });
        }
        let spec = bollard::models::SecretSpec {
            name: Some(name.clone()),
            labels: Some(self.labels(None)),
            data: Some(base64::engine::general_purpose::STANDARD.encode(pem)),
            ..Default::default()
        };
        let created = self
            .client
            .create_secret(spec)
            .await
            .with_context(|| format!("creating the secret {name} on {}", self.address))?;
        *self.ca_made.lock().unwrap_or_else(|e| e.into_inner()) = Some(created.id.clone());
        Ok(Secret { id: created.id, name })
    }

    /// Removes the CA secret if this engine made it (`check`: a running
    /// pool's own stays); a task still stopping holds it for a moment.
    pub async fn remove_made_ca(&self) {
        let Some(id) = self.ca_made.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.client.delete_secret(&id).await {
                Ok(()) => return,
                Err(e) if is_not_found(&e) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return tracing::warn!("removing the CA secret {id} on {}: {e}", self.address);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// What placement looks at on each node of the swarm.
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeFacts>> {
        use bollard::models::{NodeSpecAvailabilityEnum, NodeSpecRoleEnum};
        let nodes = self
            .client
            .list_nodes(None::<ListNodesOptions>)
            .await
            .with_context(|| format!("listing the swarm's nodes on {}", self.address))?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let spec = n.spec.unwrap_or_default();
                let desc = n.description.unwrap_or_default();
                let platform = desc.platform.unwrap_or_default();
                let resources = desc.resources.unwrap_or_default();
                let ready = n.status.and_then(|s| s.state) == Some(NodeState::READY);
                let active = spec.availability == Some(NodeSpecAvailabilityEnum::ACTIVE);
                NodeFacts {
                    id: n.id.unwrap_or_default(),
                    hostname: desc.hostname.unwrap_or_default(),
                    role: match spec.role {
                        Some(NodeSpecRoleEnum::MANAGER) => "manager".into(),
                        _ => "worker".into(),
                    },
                    os: platform.os.unwrap_or_default(),
                    arch: platform.architecture.unwrap_or_default(),
                    labels: spec.labels.unwrap_or_default(),
                    engine_labels: desc.engine.and_then(|e| e.labels).unwrap_or_default(),
                    schedulable: ready && active,
                    nano_cpus: resources.nano_cpus.unwrap_or(0),
                    memory_bytes: resources.memory_bytes.unwrap_or(0),
                }
            })
            .collect())
    }

    /// Removes every service of this pool, then its secrets; returns how
    /// many services.
    pub async fn remove_pool_services(&self) -> anyhow::Result<usize> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_DB_ID}={}", self.db_id)])]);
        let list = self
            .client
            .list_services(Some(ListServicesOptionsBuilder::default().filters(&filters).build()))
            .await
            .with_context(|| format!("listing the pool's services on {}", self.address))?;
        let mut n = 0;
        for id in list.iter().filter_map(|s| s.id.as_deref()) {
            match self.client.delete_service(id).await {
                Ok(()) => n += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(service = id, "removing service: {e}"),
            }
        }
        self.remove_pool_secrets(&filters).await;
        Ok(n)
    }

    /// The pool's secrets; one still in use by a task that is stopping is
    /// tried again for a while.
    async fn remove_pool_secrets(&self, filters: &HashMap<&str, Vec<String>>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let opts = ListSecretsOptionsBuilder::default().filters(filters).build();
            let secrets = match self.client.list_secrets(Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("listing the pool's secrets on {}: {e}", self.address);
                    return;
                }
            };
            let mut in_use = 0;
            for id in secrets.iter().filter_map(|s| s.id.as_deref()) {
                match self.client.delete_secret(id).await {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(_) => in_use += 1,
                }
            }
            if in_use == 0 || tokio::time::Instant::now() >= deadline {
                if in_use > 0 {
                    tracing::warn!(
                        secrets = in_use,
                        "some of the pool's secrets are still in use; left on the swarm"
                    );
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Creates the slot's service (after removing one of the same name,
    /// left by its previous worker).
    pub async fn launch(self: &Arc<Self>, spec: &Launch, how: &SwarmLaunch) -> anyhow::Result<SwarmWorker> {
        let name = format!("clx-{}-{}-{}", spec.worker_type, spec.slot, self.db_id);
        if let Err(e) = self.client.delete_service(&name).await
            && !is_not_found(&e)
        {
            tracing::warn!(service = %name, "removing the slot's earlier service: {e}");
        }
        // Its own token, bound to its row: revoked the moment its end is
        // seen, so a replica that lives on is refused.
        let row = spec
            .preregistered_row
            .context("a swarm worker needs the row the supervisor registers for it")?;
        let ca = self.ca_once(how.ca.as_deref()).await.context("[pool] api_tls_ca")?;
        let token = how.tokens.mint(row)?;
        let delivery = match self.token_secret(spec, how, row, &token).await {
            Ok(d) => d,
            Err(e) => {
                how.tokens.revoke(row);
                return Err(e);
            }
        };
        let service = self.service(spec, how, &name, &delivery, ca.as_ref());
        let created = match self.client.create_service(service, None).await {
            Ok(c) => c,
            Err(e) => {
                how.tokens.revoke(row);
                if let Delivery::Secret { secret, .. } = &delivery {
                    self.forget_secret(secret.id.clone());
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "creating service {name} from {} on {}",
                    how.image, self.address
                )));
            }
        };
        let id = created.id.context("the manager answered without a service id")?;
        let (tail, output) = self.follow_output(spec, &name, &id, &how.image)?;
        Ok(SwarmWorker {
            _output: output,
            worker_id: spec.worker_id.clone(),
            token_secret: match delivery {
                Delivery::Secret { secret, .. } => Some(secret.id),
                Delivery::Env(_) => None,
            },
            tail,
            place_by: tokio::time::Instant::now() + how.place_within,
            row,
            tokens: how.tokens.clone(),
            engine: self.clone(),
            service_id: id,
            name,
            ever_seen: false,
            exit: None,
        })
    }

    /// The CA's secret (made once, at the first launch: after the
    /// takeover's cleanup, which removes the pool's old secrets).
    async fn ca_once(&self, ca: Option<&Path>) -> anyhow::Result<Option<Secret>> {
        let Some(path) = ca else { return Ok(None) };
        Ok(Some(self.ca.get_or_try_init(|| self.ca_secret(path)).await?.clone()))
    }

    /// Follows a service's output into the slot's log and tail.
    /// A service's log stream does not end with the service: the drain
    /// ends a moment (for the last lines) after the returned guard drops
    /// with its worker.
    fn follow_output(&self, spec: &Launch, name: &str, id: &str, image: &str) -> anyhow::Result<(Tail, DropGuard)> {
        let mut log = logs::open_worker_log(&spec.log_path, spec.log_max_size, spec.log_keep)?;
        logs::mark(&mut log, &format!("created service {name} ({id}) from {image}"));
        let tail = Tail::default();
        let ended = CancellationToken::new();
        let drain = docker::drain_logs(
            self.client.service_logs(id, Some(docker::follow_output())),
            log,
            tail.clone(),
        );
        let worker_ended = ended.clone();
        self.tasks.spawn(async move {
            tokio::pin!(drain);
            tokio::select! {
                _ = &mut drain => {}
                _ = worker_ended.cancelled() => {
                    if tokio::time::timeout(LAST_LINES_WITHIN, &mut drain).await.is_err() {
                        tracing::debug!("a swarm worker's output stream outlived it; closed");
                    }
                }
            }
        });
        Ok((tail, ended.drop_guard()))
    }

    /// The service of one worker: one replica, Swarm's restart policy
    /// `none`, host networking, the CLM container contract, the entry's
    /// placement and resources, labels on service and container.
    fn service(
        &self,
        spec: &Launch,
        how: &SwarmLaunch,
        name: &str,
        delivery: &Delivery,
        ca: Option<&Secret>,
    ) -> ServiceSpec {
        let in_env = match delivery {
            Delivery::Env(token) => token.as_str(),
            Delivery::Secret { .. } => "",
        };
        let mut env = docker::clm_env(spec, &how.api_url, in_env);
        if let Delivery::Secret { .. } = delivery {
            env.retain(|(k, _)| k != crate::contract::env::CLM_API_TOKEN);
        }
        if ca.is_some() {
            env.push(("SSL_CERT_FILE".into(), CA_FILE.into()));
        }
        let (secrets, command, args) = secrets_and_program(spec, delivery, ca);
        let secrets = Some(secrets);
        let mounts = mounts(&how.files, &self.db_id, &docker::clm_mounts(spec));
        let container = TaskSpecContainerSpec {
            image: Some(how.image.clone()),
            labels: Some(self.labels(Some(spec))),
            command,
            args,
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            user: spec.container_user.clone(),
            mounts: Some(mounts),
            stop_grace_period: Some(how.stop_grace.as_nanos().min(i64::MAX as u128) as i64),
            secrets,
            init: Some(true),
            ..Default::default()
        };
        one_task(
            name,
            self.labels(Some(spec)),
            container,
            Some(resources(spec.memory_limit, &how.placement)),
            &how.placement,
        )
    }
}

/// A secret as a file in `/run/secrets`.
fn secret_file(secret: &Secret, path: &str, owner: (String, String), mode: u32) -> TaskSpecContainerSpecSecrets {
    TaskSpecContainerSpecSecrets {
        file: Some(TaskSpecContainerSpecFile {
            name: Some(path.trim_start_matches("/run/secrets/").into()),
            uid: Some(owner.0),
            gid: Some(owner.1),
            mode: Some(mode),
        }),
        secret_id: Some(secret.id.clone()),
        secret_name: Some(secret.name.clone()),
    }
}

/// The secrets a worker's task mounts (the CA, its token) and what it
/// runs: the token wrapper around its program, or its program as is.
type Program = (
    Vec<TaskSpecContainerSpecSecrets>,
    Option<Vec<String>>,
    Option<Vec<String>>,
);

fn secrets_and_program(spec: &Launch, delivery: &Delivery, ca: Option<&Secret>) -> Program {
    let root = || ("0".to_string(), "0".to_string());
    let mut secrets: Vec<_> = ca
        .map(|ca| secret_file(ca, CA_FILE, root(), 0o444))
        .into_iter()
        .collect();
    match delivery {
        Delivery::Secret { secret, argv } => {
            // Readable only by the task's user, when it is known by number.
            let (owner, mode) = match spec.container_user.as_deref().and_then(numeric_owner) {
                Some(owner) => (owner, 0o400),
                None => (root(), 0o444),
            };
            secrets.push(secret_file(secret, TOKEN_FILE, owner, mode));
            let wrapper = vec!["/bin/sh".to_string(), "-c".into(), TOKEN_WRAPPER.into()];
            (secrets, Some(wrapper), Some(argv.clone()))
        }
        Delivery::Env(_) => match &spec.program {
            WorkerProgram::Command(c) if !c.is_empty() => (secrets, Some(vec![c[0].clone()]), Some(c[1..].to_vec())),
            _ => (secrets, None, None),
        },
    }
}

/// What a preflight task runs in the entry's image: the Worker API's
/// `/health` as the workers will reach it (TLS with the CA), then the
/// nonce file clx-pool wrote into the shared workspace, then an answer
/// written beside it. Exit 3, 4, 5 say which failed.
const PREFLIGHT: &str = r#"
import os, sys, urllib.request
url = os.environ["CLM_API_URL"].rstrip("/") + "/health"
try:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    if '"ok"' not in body:
        raise ValueError("unexpected answer: " + body[:200])
except Exception as e:
    print("cannot reach the worker API at %s: %s" % (url, e)); sys.exit(3)
nonce = os.environ["CLX_NONCE"]
path = "/workspace/.clx-preflight-" + nonce
try:
    got = open(path).read().strip()
    if got != nonce:
        raise ValueError("it holds %r" % got)
except Exception as e:
    print("cannot read the shared workspace (%s): %s" % (path, e)); sys.exit(4)
try:
    with open(path + ".ok", "w") as f:
        f.write(nonce)
except Exception as e:
    print("cannot write the shared workspace (%s.ok): %s" % (path, e)); sys.exit(5)
print("ok")
"#;

/// What a preflight checks for one placement of swarm entries.
pub struct Preflight<'a> {
    pub image: &'a str,
    pub placement: &'a Placement,
    pub api_url: &'a str,
    pub ca: Option<&'a Path>,
    /// The workspace on this machine, which every node must see alike …
    pub workspace: &'a Path,
    /// … through the share of `[swarm] files`.
    pub files: &'a SwarmFiles,
    pub user: Option<&'a str>,
    /// How long the task may wait for a node (`startup_timeout`) …
    pub place_within: Duration,
    /// … and then take to start and finish.
    pub finish_within: Duration,
}

/// What a preflight found, when nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Its task ran on this node and all was well.
    Passed(String),
    /// No node took its task (Swarm's reason): nothing could be checked;
    /// the entry's workers will cool down until a node can take them.
    NotPlaced(String),
}

impl SwarmEngine {
    /// Runs one task like the entry's workers (image, placement, user,
    /// host network, the workspace at its path, the CA): it must reach the
    /// Worker API and read and write the shared workspace. The node it ran
    /// on, or why not (with the task's own words).
    pub async fn preflight(&self, p: &Preflight<'_>) -> Result<Checked, String> {
        let nonce = crate::api::token(None).map_err(|e| format!("{e:#}"))?[..16].to_string();
        let file = p.workspace.join(format!(".clx-preflight-{nonce}"));
        let answer = p.workspace.join(format!(".clx-preflight-{nonce}.ok"));
        std::fs::write(&file, &nonce).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let outcome = self.run_preflight(p, &nonce).await;
        let answered = std::fs::read_to_string(&answer).is_ok_and(|a| a.trim() == nonce);
        for f in [&file, &answer] {
            if let Err(e) = std::fs::remove_file(f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing the preflight file {}: {e}", f.display());
            }
        }
        match outcome {
            Ok(Checked::Passed(node)) if !answered => Err(format!(
                "on {node} the task wrote its answer, but {} does not show it here: the workspace is not the same folder on that node",
                answer.display()
            )),
            other => other,
        }
    }

    /// The preflight task, from creation to removal: the node it ran on,
    /// or why it failed.
    async fn run_preflight(&self, p: &Preflight<'_>, nonce: &str) -> Result<Checked, String> {
        let ca = self.ca_once(p.ca).await.map_err(|e| format!("{e:#}"))?;
        let name = format!("clx-preflight-{}-{nonce}", self.db_id);
        let spec = self.preflight_service(p, &name, nonce, ca.as_ref());
        let id = self
            .client
            .create_service(spec, None)
            .await
            .map_err(|e| format!("creating the preflight service on {}: {e}", self.address))?
            .id
            .ok_or("the manager answered without a service id")?;
        let result = self.await_preflight(&id, p.place_within, p.finish_within).await;
        let said = self.service_output(&id).await;
        if let Err(e) = self.client.delete_service(&id).await
            && !is_not_found(&e)
        {
            tracing::warn!(service = %name, "removing the preflight service: {e}");
        }
        result.map_err(|why| if said.is_empty() { why } else { format!("{why}: {said}") })
    }

    fn preflight_service(&self, p: &Preflight<'_>, name: &str, nonce: &str, ca: Option<&Secret>) -> ServiceSpec {
        let mut env = vec![format!("CLM_API_URL={}", p.api_url), format!("CLX_NONCE={nonce}")];
        let mut secrets = Vec::new();
        if let Some(ca) = ca {
            env.push(format!("SSL_CERT_FILE={CA_FILE}"));
            secrets.push(secret_file(ca, CA_FILE, ("0".into(), "0".into()), 0o444));
        }
        let mut labels = self.labels(None);
        labels.insert("clx-pool.preflight".into(), nonce.into());
        let container = TaskSpecContainerSpec {
            image: Some(p.image.into()),
            labels: Some(labels.clone()),
            command: Some(vec!["python3".into(), "-c".into(), PREFLIGHT.into()]),
            env: Some(env),
            user: p.user.map(str::to_string),
            mounts: Some(mounts(
                p.files,
                &self.db_id,
                &[(p.workspace.to_path_buf(), "/workspace", true)],
            )),
            secrets: Some(secrets),
            ..Default::default()
        };
        one_task(name, labels, container, None, p.placement)
    }

    /// Waits until the preflight task ended: its node when it exited 0;
    /// NotPlaced when no node took it within `place_within`.
    async fn await_preflight(
        &self,
        service: &str,
        place_within: Duration,
        within: Duration,
    ) -> Result<Checked, String> {
        let start = tokio::time::Instant::now();
        let deadline = start + place_within + within;
        let filters = HashMap::from([("service", vec![service.to_string()])]);
        loop {
            let opts = ListTasksOptionsBuilder::default().filters(&filters).build();
            let tasks = self.client.list_tasks(Some(opts)).await.unwrap_or_default();
            if let Some(t) = tasks.iter().filter_map(TaskView::of).next() {
                if let Some(why) = unplaced(Some(&t))
                    && tokio::time::Instant::now() >= start + place_within
                {
                    return Ok(Checked::NotPlaced(why));
                }
                let node = match &t.node {
                    Some(n) => self.node_name(n).await,
                    None => "no node".to_string(),
                };
                match (t.state, t.exit_code) {
                    (TaskState::COMPLETE, _) => return Ok(Checked::Passed(node)),
                    (TaskState::FAILED, Some(code)) if !failed_to_start(&t) => {
                        return Err(format!("the preflight task on {node} exited with {code}"));
                    }
                    (TaskState::FAILED | TaskState::REJECTED | TaskState::SHUTDOWN | TaskState::ORPHANED, _) => {
                        let why = t.err.or(t.message).unwrap_or_default();
                        return Err(format!("the preflight task on {node} ended: {why}"));
                    }
                    _ if tokio::time::Instant::now() >= deadline => {
                        let why = t.err.or(t.message).unwrap_or_else(|| t.state.to_string());
                        return Err(format!(
                            "the preflight task did not finish within {} ({why})",
                            humantime::format_duration(within)
                        ));
                    }
                    _ => {}
                }
            } else if tokio::time::Instant::now() >= start + place_within {
                return Ok(Checked::NotPlaced("Swarm has not scheduled its task".into()));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// What a service's tasks printed (its last lines).
    async fn service_output(&self, service: &str) -> String {
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(false)
            .build();
        let mut stream = self.client.service_logs(service, Some(opts));
        let mut text = String::new();
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut stream).await {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }

    /// `hostname (node id)` of a node.
    async fn node_name(&self, node: &str) -> String {
        let host = self
            .client
            .inspect_node(node)
            .await
            .ok()
            .and_then(|n| n.description?.hostname);
        node_words(node, host.as_ref())
    }

    /// What the poller sees, for the supervisor to record (see
    /// [`Seen::task_lines`]).
    pub fn seen(&self) -> watch::Receiver<Arc<Seen>> {
        self.seen.clone()
    }
}

/// How a worker gets its token.
enum Delivery {
    /// As a Swarm secret, read into `CLM_API_TOKEN` by a shell that then
    /// runs `argv`.
    Secret { secret: Secret, argv: Vec<String> },
    /// In its environment (when its program cannot be known: an image the
    /// manager does not have, and no `command`).
    Env(String),
}

/// `UID:GID` (or `UID`) as numbers, for a secret's owner.
fn numeric_owner(user: &str) -> Option<(String, String)> {
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    let number = |s: &str| s.parse::<u32>().ok().map(|n| n.to_string());
    Some((number(u)?, number(g)?))
}

impl SwarmEngine {
    /// The worker's token as a secret of its own, and the program the
    /// wrapper runs: the entry's `command`, or the image's entrypoint and
    /// command as the manager knows them. Without either, the token goes
    /// into the environment (said once in the log).
    async fn token_secret(
        &self,
        spec: &Launch,
        how: &SwarmLaunch,
        row: WorkerRow,
        token: &str,
    ) -> anyhow::Result<Delivery> {
        use base64::Engine;
        let argv = match &spec.program {
            WorkerProgram::Command(c) if !c.is_empty() => Some(c.clone()),
            _ => self.image_argv(&how.image).await,
        };
        let Some(argv) = argv else {
            if !self.said_env.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    image = %how.image,
                    "the manager does not have the image, so its entrypoint is unknown: its workers get their tokens in their environment; give `command` (or load the image on the manager) to deliver them as secrets"
                );
            }
            return Ok(Delivery::Env(token.to_string()));
        };
        let name = format!("clx-{}-{}-{}-w{}", self.db_id, spec.worker_type, spec.slot, row);
        let created = self
            .client
            .create_secret(bollard::models::SecretSpec {
                name: Some(name.clone()),
                labels: Some(self.labels(Some(spec))),
                data: Some(base64::engine::general_purpose::STANDARD.encode(token)),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the token secret {name} on {}", self.address))?;
        Ok(Delivery::Secret {
            secret: Secret { id: created.id, name },
            argv,
        })
    }

    /// The image's entrypoint and command, if the manager has the image.
    async fn image_argv(&self, image: &str) -> Option<Vec<String>> {
        let config = self.client.inspect_image(image).await.ok()?.config?;
        let argv: Vec<String> = config
            .entrypoint
            .unwrap_or_default()
            .into_iter()
            .chain(config.cmd.unwrap_or_default())
            .collect();
        (!argv.is_empty()).then_some(argv)
    }

    /// Removes a secret once no task uses it any more (its service was
    /// just removed): tried for a minute in the background.
    fn forget_secret(&self, id: String) {
        let client = self.client.clone();
        self.tasks.spawn(async move {
            for _ in 0..120 {
                match client.delete_secret(&id).await {
                    Ok(()) => return,
                    Err(e) if is_not_found(&e) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            tracing::debug!(secret = %id, "a worker's token secret is still in use; the pool's stop removes it");
        });
    }
}

/// What a swarm entry's services are made of, beside the [`Launch`].
#[derive(Debug, Clone)]
pub struct SwarmLaunch {
    pub image: String,
    pub placement: Placement,
    /// `StopGracePeriod`: SIGTERM, then SIGKILL after this (`stop_timeout`).
    pub stop_grace: Duration,
    /// `CLM_API_URL`: the API as the nodes reach it (`api_advertise`).
    pub api_url: String,
    /// Where each worker's own token is minted (and revoked).
    pub tokens: WorkerTokens,
    /// A task no node took by then ends the attempt as a fault outside
    /// the worker (just before the slot's own `startup_timeout`).
    pub place_within: Duration,
    /// The API's private CA (`api_tls_ca`), mounted for the workers'
    /// HTTPS client as a Swarm secret made at the first launch (after the
    /// takeover's cleanup, which removes the pool's old secrets).
    pub ca: Option<PathBuf>,
    /// How its task sees the workspace and data folders (`[swarm] files`).
    pub files: SwarmFiles,
}

/// A task's mounts of this machine's folders (`(folder, target,
/// writable)`): bind mounts of the same paths (`files = "bind"`), or
/// volumes of the `local` driver of type NFS, which Swarm creates on the
/// node that runs the task. A volume's name carries a hash of its NFS
/// source, so a changed share is never served by a node's older volume of
/// the same name (Docker keeps a volume's options for its life).
pub fn mounts(files: &SwarmFiles, db_id: &str, folders: &[(PathBuf, &str, bool)]) -> Vec<Mount> {
    folders
        .iter()
        .map(|(folder, target, writable)| {
            let mut mount = Mount {
                target: Some(target.to_string()),
                read_only: Some(!writable),
                ..Default::default()
            };
            let device = match files {
                SwarmFiles::Nfs(share) => share.device_for(folder),
                SwarmFiles::Bind => None,
            };
            match (files, device) {
                (SwarmFiles::Nfs(share), Some(device)) => {
                    let o = match &share.options {
                        Some(options) => format!("addr={},{options}", share.server),
                        None => format!("addr={}", share.server),
                    };
                    let device = format!(":{}", device.display());
                    let digest = sha2::Sha256::digest(format!("{o}\n{device}").as_bytes());
                    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
                    mount.typ = Some(MountType::VOLUME);
                    mount.source = Some(format!("clx-{db_id}-{}-{hash}", target.trim_start_matches('/')));
                    mount.volume_options = Some(MountVolumeOptions {
                        no_copy: Some(true),
                        labels: Some(HashMap::from([(LABEL_DB_ID.to_string(), db_id.to_string())])),
                        driver_config: Some(MountVolumeOptionsDriverConfig {
                            name: Some("local".into()),
                            options: Some(HashMap::from([
                                ("type".to_string(), "nfs".to_string()),
                                ("o".to_string(), o),
                                ("device".to_string(), device),
                            ])),
                        }),
                        ..Default::default()
                    });
                }
                // Outside the share (config refuses it): as the folder is.
                _ => {
                    mount.typ = Some(MountType::BIND);
                    mount.source = Some(folder.display().to_string());
                }
            }
            mount
        })
        .collect()
}

/// A Swarm secret of the pool: the CA bundle workers trust
/// (`SSL_CERT_FILE`), or one worker's token.
#[derive(Debug, Clone)]
pub struct Secret {
    pub id: String,
    pub name: String,
}

/// Where a worker finds the CA bundle (a Swarm secret's file).
const CA_FILE: &str = "/run/secrets/clx_ca.pem";

/// Where a worker finds its own token (a Swarm secret's file).
const TOKEN_FILE: &str = "/run/secrets/clm_api_token";

/// CLM reads its token only from `CLM_API_TOKEN`: the worker's program is
/// started by a shell that reads the secret into it (`$0 "$@"` is the
/// image's entrypoint and command, or the entry's `command`).
const TOKEN_WRAPPER: &str =
    "CLM_API_TOKEN=\"$(cat /run/secrets/clm_api_token)\" && export CLM_API_TOKEN && exec \"$0\" \"$@\"";

/// The system's bundle on this machine: `SSL_CERT_FILE` replaces a
/// client's bundle, so the secret carries it beside the private CA
/// (workers may need public HTTPS too).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A service of one task that Swarm never restarts (clx-pool decides),
/// on the host's network: a worker, or a preflight. (One replica, not a
/// replicated job: a job's finished container outlives its service.)
fn one_task(
    name: &str,
    labels: HashMap<String, String>,
    container: TaskSpecContainerSpec,
    resources: Option<TaskSpecResources>,
    p: &Placement,
) -> ServiceSpec {
    ServiceSpec {
        name: Some(name.to_string()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources,
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                ..Default::default()
            }),
            placement: Some(placement(p)),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some("host".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resources(memory_limit: Option<u64>, p: &Placement) -> TaskSpecResources {
    let nanos = |cpus: f64| (cpus * 1e9) as i64;
    TaskSpecResources {
        limits: Some(Limit {
            memory_bytes: memory_limit.map(|m| m as i64),
            nano_cpus: p.cpu_limit.map(nanos),
            ..Default::default()
        }),
        reservations: Some(ResourceObject {
            memory_bytes: p.memory_reservation.map(|m| m as i64),
            nano_cpus: p.cpu_reservation.map(nanos),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn placement(p: &Placement) -> TaskSpecPlacement {
    TaskSpecPlacement {
        constraints: Some(p.constraints.clone()),
        preferences: p.spread.as_ref().map(|s| {
            vec![TaskSpecPlacementPreferences {
                spread: Some(TaskSpecPlacementSpread {
                    spread_descriptor: Some(s.clone()),
                }),
            }]
        }),
        ..Default::default()
    }
}

/// Lists the pool's tasks and the swarm's nodes once per [`POLL`] until
/// nobody watches.
async fn poll(client: Docker, db_id: String, tx: watch::Sender<Arc<Seen>>) {
    let filters = HashMap::from([("label", vec![format!("{LABEL_DB_ID}={db_id}")])]);
    loop {
        let tasks = client
            .list_tasks(Some(ListTasksOptionsBuilder::default().filters(&filters).build()))
            .await;
        let nodes = client.list_nodes(None::<ListNodesOptions>).await;
        let seen = match (tasks, nodes) {
            (Ok(tasks), Ok(nodes)) => Seen::of(tasks, nodes),
            (Err(e), _) | (_, Err(e)) => {
                let before = tx.borrow().clone();
                tracing::warn!("listing the swarm's tasks: {e}");
                Seen {
                    tasks: before.tasks.clone(),
                    down: before.down.clone(),
                    hostnames: before.hostnames.clone(),
                    error: Some(e.to_string()),
                }
            }
        };
        if tx.send(Arc::new(seen)).is_err() {
            return;
        }
        tokio::time::sleep(POLL).await;
        if tx.is_closed() {
            return;
        }
    }
}

impl Seen {
    fn of(tasks: Vec<Task>, nodes: Vec<bollard::models::Node>) -> Seen {
        let mut newest: HashMap<String, (i64, TaskView)> = HashMap::new();
        for t in tasks {
            let (Some(service), Some(view)) = (t.service_id.clone(), TaskView::of(&t)) else {
                continue;
            };
            let version = t.version.as_ref().and_then(|v| v.index).map_or(0, |i| i as i64);
            if newest.get(&service).is_none_or(|(v, _)| version > *v) {
                newest.insert(service, (version, view));
            }
        }
        let mut hostnames = HashMap::new();
        let mut down = HashMap::new();
        for n in nodes {
            let Some(id) = n.id.clone() else { continue };
            let host = n
                .description
                .as_ref()
                .and_then(|d| d.hostname.clone())
                .unwrap_or_else(|| id.clone());
            if n.status.as_ref().and_then(|s| s.state) == Some(NodeState::DOWN) {
                down.insert(id.clone(), host.clone());
            }
            hostnames.insert(id, host);
        }
        Seen {
            tasks: newest.into_iter().map(|(s, (_, v))| (s, v)).collect(),
            down,
            hostnames,
            error: None,
        }
    }
}

impl TaskView {
    fn of(t: &Task) -> Option<TaskView> {
        let status = t.status.as_ref()?;
        Some(TaskView {
            id: t.id.clone()?,
            worker: t
                .spec
                .as_ref()
                .and_then(|s| s.container_spec.as_ref()?.labels.as_ref()?.get(LABEL_WORKER).cloned())
                .map(WorkerId),
            node: t.node_id.clone(),
            state: status.state?,
            desired: t.desired_state.unwrap_or(TaskState::RUNNING),
            exit_code: status.container_status.as_ref().and_then(|c| c.exit_code),
            err: status.err.clone().filter(|e| !e.is_empty()),
            message: status.message.clone(),
        })
    }
}

/// Whether a worker whose newest task is `task` has ended, and how: its
/// task ended (exit code, Swarm's error), Swarm no longer wants it to run
/// (node lost with restart `none`, a removed service), or its node is down.
/// `seen_before`: the service had a task at an earlier poll (a service
/// without tasks yet is still being scheduled).
pub fn verdict(task: Option<&TaskView>, seen_before: bool, down: &HashMap<String, String>) -> Option<EndCause> {
    use TaskState as S;
    let Some(t) = task else {
        return seen_before.then(|| EndCause::Unknown("its task is gone from the swarm".into()));
    };
    let swarm_says = |what: &str| {
        let why = t.err.as_deref().or(t.message.as_deref()).unwrap_or("no reason given");
        EndCause::Unknown(format!("{what}: {why}"))
    };
    let node_says = |what: &str| {
        let why = t.err.as_deref().or(t.message.as_deref()).unwrap_or("no reason given");
        EndCause::NotStarted(format!("{what}: {why}"))
    };
    match t.state {
        S::FAILED if failed_to_start(t) => Some(node_says("its node could not start its task")),
        S::REJECTED => Some(node_says("its node rejected its task")),
        S::COMPLETE | S::FAILED => Some(match t.exit_code {
            Some(code) if code > 128 && code < 160 => EndCause::Signal((code - 128) as i32),
            Some(code) => EndCause::Code(code as i32),
            None => swarm_says("its task failed"),
        }),
        S::SHUTDOWN | S::REMOVE | S::ORPHANED => Some(swarm_says(&format!("its task was {}", t.state))),
        _ => {
            if let Some(host) = t.node.as_ref().and_then(|n| down.get(n)) {
                return Some(EndCause::Unknown(format!("node {host} is down")));
            }
            (t.desired != S::RUNNING && t.desired != S::READY && t.desired != S::ACCEPTED).then(|| {
                EndCause::Unknown(format!(
                    "Swarm no longer runs its task (desired state {}, state {})",
                    t.desired, t.state
                ))
            })
        }
    }
}

impl Seen {
    /// Where each worker's task runs and what it does, in words, as
    /// `stats --workers` and `top` show them.
    pub fn task_lines(&self) -> Vec<TaskLine> {
        self.tasks
            .values()
            .filter_map(|t| {
                Some(TaskLine {
                    worker_id: t.worker.clone()?,
                    node: t.node.as_ref().map(|n| node_words(n, self.hostnames.get(n))),
                    task: task_words(t),
                })
            })
            .collect()
    }
}

/// A node as `hostname (id)`, the id cut to 12 characters as docker
/// prints it.
pub fn node_words(id: &str, hostname: Option<&String>) -> String {
    let short = &id[..id.len().min(12)];
    match hostname {
        Some(host) => format!("{host} ({short})"),
        None => short.to_string(),
    }
}

/// A task's state as Swarm names it, with Swarm's reason where the task
/// waits or ended: `pending: no suitable node (…)`, `preparing`,
/// `running`, `failed: task: non-zero exit (137)`.
pub fn task_words(t: &TaskView) -> String {
    use TaskState as S;
    let why = t.err.as_deref().filter(|e| !e.is_empty());
    match (t.state, why) {
        (S::RUNNING, _) => "running".into(),
        (
            S::NEW | S::ALLOCATED | S::PENDING | S::ASSIGNED | S::ACCEPTED | S::PREPARING | S::READY | S::STARTING,
            None,
        ) => t.state.to_string(),
        (state, Some(why)) => format!("{state}: {why}"),
        (state, None) => match t.exit_code {
            Some(code) if matches!(state, S::COMPLETE | S::FAILED) => format!("{state}: exit {code}"),
            _ => state.to_string(),
        },
    }
}

/// Whether a failed task never ran its program (a mount, the image, the
/// runtime): Swarm then reports an exit code of its own (128), and its
/// error says what happened; a program that ran and failed is `task:
/// non-zero exit (N)`.
fn failed_to_start(t: &TaskView) -> bool {
    t.err.as_deref().is_some_and(|e| !e.starts_with("task: non-zero exit"))
}

/// Why a worker's task is not on a node yet (Swarm's message), or None
/// once a node took it.
pub fn unplaced(task: Option<&TaskView>) -> Option<String> {
    use TaskState as S;
    match task {
        None => Some("Swarm has not scheduled its task".into()),
        Some(t) if matches!(t.state, S::NEW | S::ALLOCATED | S::PENDING) || t.node.is_none() => Some(
            t.err
                .clone()
                .or_else(|| t.message.clone())
                .unwrap_or_else(|| "no node took its task".into()),
        ),
        Some(_) => None,
    }
}

/// A started swarm worker: its service, and the verdict once it ended.
pub struct SwarmWorker {
    /// Ends its output's drain when it is dropped.
    _output: DropGuard,
    pub worker_id: WorkerId,
    /// The secret holding its token, if it got one.
    token_secret: Option<String>,
    pub tail: Tail,
    /// When a task no node took ends the attempt.
    place_by: tokio::time::Instant,
    /// Its row, and the tokens its own is revoked from when it ends.
    row: WorkerRow,
    tokens: WorkerTokens,
    engine: Arc<SwarmEngine>,
    service_id: String,
    name: String,
    ever_seen: bool,
    exit: Option<EndCause>,
}

impl SwarmWorker {
    /// The node its task runs on, as `hostname (node id)`, once placed:
    /// from the last poll, else (a worker that registered before the
    /// poller saw its task) asked of the manager.
    pub async fn node(&self) -> Option<String> {
        let seen = self.engine.seen.borrow().clone();
        let node = match seen.tasks.get(&self.service_id).and_then(|t| t.node.clone()) {
            Some(node) => node,
            None => {
                let filters = HashMap::from([("service", vec![self.service_id.clone()])]);
                let opts = ListTasksOptionsBuilder::default().filters(&filters).build();
                let tasks = self.engine.client.list_tasks(Some(opts)).await.ok()?;
                tasks.into_iter().filter_map(|t| t.node_id).next()?
            }
        };
        let host = match seen.hostnames.get(&node) {
            Some(host) => Some(host.clone()),
            None => self
                .engine
                .client
                .inspect_node(&node)
                .await
                .ok()
                .and_then(|n| n.description?.hostname),
        };
        Some(node_words(&node, host.as_ref()))
    }

    /// Resolves when the worker has ended, at the poll that shows it.
    /// Cancel-safe.
    pub async fn wait(&mut self) -> EndCause {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let mut seen = self.engine.seen.clone();
        loop {
            let now = seen.borrow_and_update().clone();
            let task = now.tasks.get(&self.service_id);
            let unplaced = unplaced(task);
            let cause = verdict(task, self.ever_seen, &now.down).or_else(|| {
                let late = tokio::time::Instant::now() >= self.place_by;
                unplaced.clone().filter(|_| late).map(EndCause::NotPlaced)
            });
            if let Some(cause) = cause {
                self.tokens.revoke(self.row);
                self.exit = Some(cause.clone());
                return cause;
            }
            self.ever_seen |= task.is_some();
            tokio::select! {
                changed = seen.changed() => if changed.is_err() {
                    std::future::pending::<()>().await;
                },
                _ = tokio::time::sleep_until(self.place_by), if unplaced.is_some() => {}
            }
        }
    }

    /// Tells the worker to finish: the service is scaled to 0, so Swarm
    /// sends SIGTERM and, after `StopGracePeriod`, SIGKILL.
    pub async fn finish(&self) {
        if self.exit.is_some() {
            return;
        }
        if let Err(e) = self.scale_to_zero().await {
            tracing::warn!(service = %self.name, "telling the worker to finish (scaling its service to 0): {e:#}");
        }
    }

    async fn scale_to_zero(&self) -> anyhow::Result<()> {
        let service = self.engine.client.inspect_service(&self.service_id, None).await?;
        let version = service
            .version
            .and_then(|v| v.index)
            .context("the service has no version")?;
        let mut spec = service.spec.context("the service has no spec")?;
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
            ..Default::default()
        });
        let opts = UpdateServiceOptionsBuilder::default().version(version as i32).build();
        self.engine
            .client
            .update_service(&self.service_id, spec, opts, None)
            .await?;
        Ok(())
    }

    /// Removes the service (Swarm stops its task: SIGTERM, SIGKILL after
    /// `StopGracePeriod`) and waits until its task is gone.
    pub async fn stop(&mut self, grace: Duration) -> EndCause {
        self.sweep().await;
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(30);
        let mut seen = self.engine.seen.clone();
        loop {
            let gone = !seen.borrow_and_update().tasks.contains_key(&self.service_id);
            if gone || tokio::time::timeout_at(deadline, seen.changed()).await.is_err() {
                break;
            }
        }
        let cause = self
            .exit
            .clone()
            .unwrap_or_else(|| EndCause::Unknown(format!("its service {} was removed", self.name)));
        self.exit = Some(cause.clone());
        cause
    }

    /// Removes the service, whatever became of its task, and (once the
    /// task is gone) its token's secret.
    pub async fn sweep(&self) {
        self.tokens.revoke(self.row);
        if let Some(id) = &self.token_secret {
            self.engine.forget_secret(id.clone());
        }
        if let Err(e) = self.engine.client.delete_service(&self.service_id).await
            && !is_not_found(&e)
        {
            tracing::warn!(service = %self.name, "removing the service: {e}");
        }
    }
}

impl Drop for SwarmWorker {
    /// However the slot lets go of it, its token goes too.
    fn drop(&mut self) {
        self.tokens.revoke(self.row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState, desired: TaskState) -> TaskView {
        TaskView {
            id: "t1".into(),
            worker: Some(WorkerId("swarm-nb-0-1".into())),
            node: Some("n2".into()),
            state,
            desired,
            exit_code: None,
            err: None,
            message: None,
        }
    }

    #[test]
    fn a_worker_ends_when_its_task_ends_swarm_stops_wanting_it_or_its_node_is_down() {
        use TaskState as S;
        let none = HashMap::new();
        let down = HashMap::from([("n2".to_string(), "build2".to_string())]);
        let with = |mut t: TaskView, f: &dyn Fn(&mut TaskView)| {
            f(&mut t);
            t
        };
        let exited = |code| with(task(S::FAILED, S::SHUTDOWN), &|t| t.exit_code = Some(code));
        let rejected = with(task(S::REJECTED, S::SHUTDOWN), &|t| {
            t.err = Some("invalid mount config for type \"bind\"".into())
        });
        let pending = with(task(S::PENDING, S::RUNNING), &|t| {
            t.node = None;
            t.err = Some("no suitable node".into())
        });
        type Case<'a> = (
            &'a str,
            Option<TaskView>,
            bool,
            &'a HashMap<String, String>,
            Option<EndCause>,
        );
        let cases: Vec<Case> = vec![
            ("not scheduled yet", None, false, &none, None),
            (
                "gone after it was seen",
                None,
                true,
                &none,
                Some(EndCause::Unknown("its task is gone from the swarm".into())),
            ),
            ("running", Some(task(S::RUNNING, S::RUNNING)), true, &none, None),
            ("starting", Some(task(S::STARTING, S::RUNNING)), true, &none, None),
            ("waiting for a node", Some(pending), true, &none, None),
            ("exit 3", Some(exited(3)), true, &none, Some(EndCause::Code(3))),
            (
                "exit 3, as Swarm says it",
                Some(with(exited(3), &|t| t.err = Some("task: non-zero exit (3)".into()))),
                true,
                &none,
                Some(EndCause::Code(3)),
            ),
            (
                "never started: a volume it cannot mount",
                Some(with(exited(128), &|t| {
                    t.err = Some("starting container failed: error while mounting volume: no such device".into())
                })),
                true,
                &none,
                Some(EndCause::NotStarted(
                    "its node could not start its task: starting container failed: error while mounting volume: no such device"
                        .into(),
                )),
            ),
            ("killed", Some(exited(137)), true, &none, Some(EndCause::Signal(9))),
            (
                "complete",
                Some(with(task(S::COMPLETE, S::SHUTDOWN), &|t| t.exit_code = Some(0))),
                true,
                &none,
                Some(EndCause::Code(0)),
            ),
            (
                "rejected",
                Some(rejected),
                true,
                &none,
                Some(EndCause::NotStarted(
                    "its node rejected its task: invalid mount config for type \"bind\"".into(),
                )),
            ),
            (
                "node lost (restart none: desired shutdown, still running)",
                Some(task(S::RUNNING, S::SHUTDOWN)),
                true,
                &none,
                Some(EndCause::Unknown(
                    "Swarm no longer runs its task (desired state shutdown, state running)".into(),
                )),
            ),
            (
                "its node is down",
                Some(task(S::RUNNING, S::RUNNING)),
                true,
                &down,
                Some(EndCause::Unknown("node build2 is down".into())),
            ),
        ];
        for (what, t, seen_before, down, expected) in cases {
            assert_eq!(verdict(t.as_ref(), seen_before, down), expected, "{what}");
        }
    }

    #[test]
    fn a_task_is_unplaced_until_a_node_takes_it_and_says_why() {
        use TaskState as S;
        let mut pending = task(S::PENDING, S::RUNNING);
        pending.node = None;
        pending.err = Some("no suitable node (scheduling constraints not satisfied on 2 nodes)".into());
        assert_eq!(
            unplaced(Some(&pending)).as_deref(),
            Some("no suitable node (scheduling constraints not satisfied on 2 nodes)")
        );
        assert_eq!(unplaced(None).as_deref(), Some("Swarm has not scheduled its task"));
        for placed in [S::ASSIGNED, S::ACCEPTED, S::PREPARING, S::STARTING, S::RUNNING] {
            assert_eq!(unplaced(Some(&task(placed, S::RUNNING))), None, "{placed}");
        }
    }

    #[test]
    fn folders_are_bind_mounted_or_nfs_volumes_named_by_their_source() {
        use crate::config::{NfsShare, SwarmFiles};
        let folders = [
            (PathBuf::from("/srv/clm/course/output"), "/workspace", true),
            (PathBuf::from("/srv/clm/course/slides"), "/source", false),
        ];
        let bind = mounts(&SwarmFiles::Bind, "db1", &folders);
        let seen: Vec<_> = bind
            .iter()
            .map(|m| (m.typ, m.source.as_deref(), m.target.as_deref(), m.read_only))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    Some(MountType::BIND),
                    Some("/srv/clm/course/output"),
                    Some("/workspace"),
                    Some(false)
                ),
                (
                    Some(MountType::BIND),
                    Some("/srv/clm/course/slides"),
                    Some("/source"),
                    Some(true)
                ),
            ]
        );
        let share = |options: Option<&str>| {
            SwarmFiles::Nfs(NfsShare {
                server: "files.lan".into(),
                export: "/export/clm".into(),
                options: options.map(str::to_string),
                mounted_at: "/srv/clm".into(),
            })
        };
        let nfs = mounts(&share(Some("nfsvers=4.1,hard")), "db1", &folders);
        let driver = |m: &Mount| {
            let o = m.volume_options.as_ref().unwrap();
            assert_eq!(o.no_copy, Some(true), "an empty share is never filled from the image");
            let d = o.driver_config.as_ref().unwrap();
            assert_eq!(d.name.as_deref(), Some("local"));
            let mut opts: Vec<(String, String)> = d.options.clone().unwrap().into_iter().collect();
            opts.sort();
            opts
        };
        assert_eq!(nfs[0].typ, Some(MountType::VOLUME));
        assert_eq!(
            driver(&nfs[0]),
            [
                ("device".to_string(), ":/export/clm/course/output".to_string()),
                ("o".to_string(), "addr=files.lan,nfsvers=4.1,hard".to_string()),
                ("type".to_string(), "nfs".to_string()),
            ]
        );
        assert_eq!(driver(&nfs[1])[0].1, ":/export/clm/course/slides");
        assert_eq!(
            (nfs[1].read_only, nfs[1].target.as_deref()),
            (Some(true), Some("/source"))
        );
        let name = nfs[0].source.clone().unwrap();
        assert!(name.starts_with("clx-db1-workspace-"), "{name}");
        // Other options, another volume: a node's old one never serves.
        let other = mounts(&share(None), "db1", &folders);
        assert_ne!(other[0].source, nfs[0].source);
        assert_eq!(driver(&other[0])[1].1, "addr=files.lan");
        assert_eq!(
            mounts(&share(Some("nfsvers=4.1,hard")), "db1", &folders)[0].source,
            nfs[0].source
        );
    }

    #[test]
    fn a_tasks_state_is_told_in_swarms_words_with_its_reason() {
        use TaskState as S;
        let with = |state, err: Option<&str>, code: Option<i64>| {
            let mut t = task(state, S::RUNNING);
            t.err = err.map(str::to_string);
            t.exit_code = code;
            t
        };
        let cases = [
            (
                with(S::PENDING, Some("no suitable node (1/2 nodes)"), None),
                "pending: no suitable node (1/2 nodes)",
            ),
            (with(S::PENDING, None, None), "pending"),
            (with(S::PREPARING, None, None), "preparing"),
            (with(S::STARTING, None, None), "starting"),
            (with(S::RUNNING, Some("stale"), None), "running"),
            (
                with(S::FAILED, Some("task: non-zero exit (137)"), Some(137)),
                "failed: task: non-zero exit (137)",
            ),
            (with(S::COMPLETE, None, Some(0)), "complete: exit 0"),
            (
                with(S::REJECTED, Some("No such image: nb:1"), None),
                "rejected: No such image: nb:1",
            ),
            (with(S::SHUTDOWN, None, None), "shutdown"),
        ];
        for (t, words) in cases {
            assert_eq!(task_words(&t), words);
        }
    }

    #[test]
    fn task_lines_name_each_worker_with_its_node_and_leave_out_foreign_tasks() {
        use TaskState as S;
        let mut mine = task(S::RUNNING, S::RUNNING);
        mine.node = Some("abcdefghijklmnopqrstuvwxyz".into());
        let mut unnamed = task(S::PENDING, S::RUNNING);
        unnamed.worker = None;
        let mut waiting = task(S::PENDING, S::RUNNING);
        waiting.worker = Some(WorkerId("swarm-nb-1-2".into()));
        waiting.node = None;
        let seen = Seen {
            tasks: HashMap::from([("s1".into(), mine), ("s2".into(), unnamed), ("s3".into(), waiting)]),
            hostnames: HashMap::from([("abcdefghijklmnopqrstuvwxyz".into(), "build2".into())]),
            ..Seen::default()
        };
        let mut lines = seen.task_lines();
        lines.sort_by(|a, b| a.worker_id.as_str().cmp(b.worker_id.as_str()));
        let shown: Vec<(&str, Option<&str>, &str)> = lines
            .iter()
            .map(|l| (l.worker_id.as_str(), l.node.as_deref(), l.task.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                ("swarm-nb-0-1", Some("build2 (abcdefghijkl)"), "running"),
                ("swarm-nb-1-2", None, "pending"),
            ]
        );
    }
}
