//! Executors start one worker and report how it ended. The supervisor's
//! slots use only [`Mode::launch`] and [`Running`], so restart policy, job
//! recovery and history are one piece of code for both execution modes.

pub mod backends;
pub mod direct;
pub mod docker;
pub mod placement;
pub mod plan;
pub mod swarm;
pub mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{InheritEnv, WorkerConfig, WorkerProgram};
use crate::contract::{self, env};
use crate::vocab::{EndCause, ModeKind, Protocol, WorkerId, WorkerRow};

/// Where a worker finds the database and the workspace: host paths for a
/// direct worker, mount points inside a container.
pub struct Seen<'a> {
    pub db_path: &'a str,
    pub workspace: &'a str,
    /// `WORKER_ID`, for direct workers (a container uses its `HOSTNAME`).
    pub worker_id: Option<&'a str>,
    /// Direct workers carry the pool tag; containers are found by their
    /// labels instead (their processes must not match a host-side sweep).
    pub tagged: bool,
}

impl Launch {
    /// The worker's environment under its protocol (SPEC §4 for CLX, §7
    /// for CLM), the pool tag, then the entry's own `env`, which wins.
    pub fn environment(&self, seen: &Seen) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![(env::WORKER_TYPE.into(), self.worker_type.clone())];
        if let Some(id) = seen.worker_id {
            env.push((env::WORKER_ID.into(), id.to_string()));
        }
        env.push((self.protocol.db_env_var().into(), seen.db_path.to_string()));
        env.push((env::WORKSPACE_PATH.into(), seen.workspace.to_string()));
        env.push((env::LOG_LEVEL.into(), self.log_level.clone()));
        match self.protocol {
            Protocol::Clx => env.push((env::USE_SQLITE_QUEUE.into(), "true".into())),
            Protocol::Clm => {
                if let Some(row) = self.preregistered_row {
                    env.push((env::CLM_WORKER_ID.into(), row.to_string()));
                }
                for name in env::CLM_PASS_THROUGH {
                    if let Ok(value) = std::env::var(name) {
                        env.push((name.to_string(), value));
                    }
                }
            }
        }
        if seen.tagged {
            env.extend(contract::tags(&self.db_path));
        }
        if matches!(self.program, WorkerProgram::JobCommand(_)) {
            let bell = contract::bell_path(std::path::Path::new(seen.db_path), &self.worker_type);
            env.push((env::BELL.into(), bell.to_string_lossy().into_owned()));
        }
        for (k, v) in &self.extra_env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// The built-in worker's arguments (after the program name) for a
    /// `job_command` entry, in either mode.
    pub fn builtin_worker_args(&self, mode: ModeKind, job_command: &[String]) -> Vec<String> {
        let mut argv = vec![
            "worker".to_string(),
            "--heartbeat-interval".into(),
            humantime::format_duration(self.heartbeat_interval).to_string(),
            "--execution-mode".into(),
            mode.to_string(),
        ];
        if let Some(n) = self.max_jobs {
            argv.extend(["--max-jobs".to_string(), n.to_string()]);
        }
        argv.push("--".into());
        argv.extend(job_command.iter().cloned());
        argv
    }
}

/// Everything needed to start one worker in one slot, whatever the mode.
#[derive(Debug, Clone)]
pub struct Launch {
    pub worker_type: String,
    pub slot: u32,
    /// What to run; `Default` only in docker mode (the image's own command).
    pub program: WorkerProgram,
    pub protocol: Protocol,
    /// The `WORKER_ID` of a direct worker (`direct-{type}-{slot}-{8 hex}`);
    /// a docker worker goes by its container id instead.
    pub worker_id: WorkerId,
    /// The worker row the supervisor pre-registered (`created`), which the
    /// worker activates (CLM).
    pub preregistered_row: Option<WorkerRow>,
    /// The entry's `env`.
    pub extra_env: Vec<(String, String)>,
    /// What of the supervisor's environment a direct worker inherits.
    pub inherit_env: InheritEnv,
    pub db_path: PathBuf,
    pub workspace: PathBuf,
    pub log_level: String,
    /// Passed to the built-in worker.
    pub heartbeat_interval: Duration,
    /// Passed to the built-in worker: it leaves after this many jobs.
    pub max_jobs: Option<u32>,
    /// Working directory of a direct worker (the config file's folder).
    pub cwd: PathBuf,
    pub memory_limit: Option<u64>,
    /// Docker's `User` for the container (None: the image's).
    pub container_user: Option<String>,
    /// CLM's course sources, mounted at `/source` in CLM containers.
    pub data_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    pub log_max_size: u64,
    pub log_keep: u32,
}

/// How a slot runs its workers (for `auto` entries, as planned at start).
#[derive(Clone)]
pub enum Executor {
    Direct,
    Docker {
        engine: Arc<docker::DockerEngine>,
        image: String,
        network: String,
        /// CLM's Worker API, for CLM worker programs under `clm`.
        api: Option<Arc<crate::api::Endpoint>>,
    },
    Swarm {
        engine: Arc<swarm::SwarmEngine>,
        how: Arc<swarm::SwarmLaunch>,
    },
}

impl Executor {
    /// What a worker of this entry runs: in a container the entry's
    /// program (`Default`: the image's own command); directly the
    /// protocol's default command where the entry names none (`start`
    /// checked that the protocol knows it, `Config::check_protocol`).
    pub fn program(&self, worker: &WorkerConfig, protocol: Protocol) -> WorkerProgram {
        match self {
            Executor::Direct => worker.direct_program(protocol).unwrap_or(WorkerProgram::Default),
            Executor::Docker { .. } | Executor::Swarm { .. } => worker.program.clone(),
        }
    }

    pub fn kind(&self) -> ModeKind {
        match self {
            Executor::Direct => ModeKind::Direct,
            Executor::Docker { .. } => ModeKind::Docker,
            Executor::Swarm { .. } => ModeKind::Swarm,
        }
    }

    /// Starts a worker.
    pub async fn launch(&self, spec: &Launch) -> anyhow::Result<Running> {
        match self {
            Executor::Direct => direct::launch(spec).map(Running::Direct),
            Executor::Docker {
                engine,
                image,
                network,
                api,
            } => engine
                .launch(spec, image, network, api.as_deref())
                .await
                .map(Running::Docker),
            Executor::Swarm { engine, how } => engine.launch(spec, how).await.map(Running::Swarm),
        }
    }
}

/// A process identified for its whole life: its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub start_ticks: Option<i64>,
}

/// A started worker; what only one mode has lives in its variant.
pub enum Running {
    Direct(direct::DirectWorker),
    Docker(docker::DockerWorker),
    Swarm(swarm::SwarmWorker),
}

impl Running {
    /// The id it registers with: `WORKER_ID` (direct) or the short
    /// container id (docker).
    pub fn worker_id(&self) -> &WorkerId {
        match self {
            Running::Direct(w) => &w.worker_id,
            Running::Docker(w) => &w.short_id,
            Running::Swarm(w) => &w.worker_id,
        }
    }

    /// Its process (direct mode), recorded so that a later `start` or
    /// `stop` can find it after a crash.
    pub fn process(&self) -> Option<Process> {
        match self {
            Running::Direct(w) => Some(w.process),
            Running::Docker(_) | Running::Swarm(_) => None,
        }
    }

    /// The node it runs on, when that is not this machine (swarm mode):
    /// `hostname (node id)`.
    pub async fn node(&self) -> Option<String> {
        match self {
            Running::Swarm(w) => w.node().await,
            Running::Direct(_) | Running::Docker(_) => None,
        }
    }

    /// The last lines it printed.
    pub fn tail(&self, lines: usize) -> String {
        match self {
            Running::Direct(w) => w.tail.lines(lines),
            Running::Docker(w) => w.tail.lines(lines),
            Running::Swarm(w) => w.tail.lines(lines),
        }
    }

    /// Resolves when the worker has exited. Cancel-safe (for `select!`).
    pub async fn wait(&mut self) -> EndCause {
        match self {
            Running::Direct(w) => w.wait().await,
            Running::Docker(w) => w.wait().await,
            Running::Swarm(w) => w.wait().await,
        }
    }

    /// Stops the worker: SIGTERM, SIGKILL after `grace`, and makes sure
    /// nothing of it is left.
    pub async fn stop(&mut self, grace: Duration) -> EndCause {
        match self {
            Running::Direct(w) => w.stop(grace).await,
            Running::Docker(w) => w.stop(grace).await,
            Running::Swarm(w) => w.stop(grace).await,
        }
    }

    /// Tells the worker to finish (after its current job, for the built-in
    /// worker); `wait` then sees it exit.
    pub async fn finish(&self) {
        match self {
            Running::Direct(w) => w.finish(),
            Running::Docker(w) => w.finish().await,
            Running::Swarm(w) => w.finish().await,
        }
    }

    /// After the worker ended: removes whatever of it outlived it.
    pub async fn sweep(&self) {
        match self {
            Running::Direct(w) => w.sweep().await,
            Running::Docker(w) => w.sweep().await,
            Running::Swarm(w) => w.sweep().await,
        }
    }
}

/// Whether a launch error lies outside the worker and goes away by itself
/// (a full disk, too many open files or processes, a busy engine), unlike a
/// missing program, a forbidden path or a missing image.
pub fn launch_error_is_outside(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    for cause in e.chain() {
        if cause.downcast_ref::<crate::logs::LogUnavailable>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                StorageFull | QuotaExceeded | WouldBlock | ResourceBusy | OutOfMemory | Interrupted | TimedOut
            ) || matches!(
                io.raw_os_error(),
                Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::EIO | nix::libc::EAGAIN)
            );
        }
        if let Some(outside) = docker::error_is_outside(cause) {
            return outside;
        }
    }
    true
}
