//! The `pool.toml` model: what a validated configuration is (here), where
//! its defaults live (`defaults.rs`), how the file and `CLX_POOL_*`
//! variables are read with the line of every key (`read.rs`), and how each
//! table is checked (`validate.rs`). Every problem is collected and
//! reported together, sorted by line, each with its source (file and line,
//! or environment variable) and its field. This module knows nothing about
//! processes or the database; it only produces a [`Config`].

mod defaults;
mod read;
pub use read::suggest;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::vocab::Protocol;
pub use defaults::{BASIC_ENV, DEFAULTS, Defaults};

/// The most workers of one type, for `count` and `clx-pool scale` alike.
pub const MAX_COUNT: u32 = 10_000;

/// A fully validated configuration, with every path absolute.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file this came from.
    pub path: PathBuf,
    pub pool: PoolConfig,
    pub workers: Vec<WorkerConfig>,
    /// Things worth a word that are not errors (an unknown `CLX_POOL_*`
    /// variable); `load` prints them on stderr.
    pub warnings: Vec<String>,
}

/// When `stats --check` calls a pool degraded for its failed jobs: more
/// than `failure_rate` of the jobs that finished within `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthRules {
    pub window: Duration,
    pub failure_rate: f64,
}

impl Default for HealthRules {
    fn default() -> HealthRules {
        HealthRules {
            window: DEFAULTS.health_window,
            failure_rate: DEFAULTS.health_failure_rate,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The generation of workers; unset, the database decides (a new one
    /// gets CLX).
    pub protocol: Option<Protocol>,
    pub db_path: PathBuf,
    pub workspace_path: PathBuf,
    pub log_dir: PathBuf,
    pub log_level: String,
    pub check_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub stop_timeout: Duration,
    pub startup_timeout: Duration,
    pub network: String,
    pub log_max_size: u64,
    pub log_keep: u32,
    pub restart: RestartConfig,
    /// What of the supervisor's environment direct workers see.
    pub inherit_env: InheritEnv,
    /// `clx_pool_events` keeps at most this many events …
    pub events_keep: u32,
    /// … none older than this.
    pub events_max_age: Duration,
    /// CLM's course sources: mounted at `/source` in CLM containers.
    pub data_dir: Option<PathBuf>,
    /// CLM's cache database (executed notebooks), for the Worker API.
    pub cache_db_path: PathBuf,
    /// Where CLM's Worker API listens instead of loopback + the network's
    /// gateway.
    pub api_listen: Option<std::net::SocketAddr>,
    /// The Worker API's token, instead of a random one per run.
    pub api_token_file: Option<PathBuf>,
    /// Run on notable events (a slot given up, a crash loop, a hung kill, a
    /// job failing for good), with the event as JSON on stdin.
    pub on_event: Option<Vec<String>>,
    /// Where to serve Prometheus metrics (`/metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The Worker API's URL as workers on other hosts reach it
    /// (`CLM_API_URL` of swarm workers).
    pub api_advertise: Option<String>,
    /// Plain HTTP for a Worker API that listens beyond this machine.
    pub api_insecure_http: bool,
    /// HTTPS for the Worker API: the certificate chain and key (PEM).
    pub api_tls: Option<ApiTls>,
    /// A private CA that signed `api_tls`' certificate, handed to swarm
    /// workers (as a Swarm secret, with `SSL_CERT_FILE`).
    pub api_tls_ca: Option<PathBuf>,
    /// `[swarm]`: where swarm entries' services are created.
    pub swarm: SwarmConfig,
    /// `health_window`, `health_failure_rate`.
    pub health: HealthRules,
}

/// The Worker API's certificate chain and private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[swarm]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmConfig {
    /// A manager's engine (`unix://…`, `tcp://…`); unset, `DOCKER_HOST`
    /// or the local socket.
    pub docker_host: Option<String>,
    /// How tasks on other nodes see the workspace and data folders.
    pub files: SwarmFiles,
}

/// `[swarm] files`: how a swarm task sees `workspace_path` and `data_dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SwarmFiles {
    /// `"bind"`: every node mounts the shared folder at this machine's
    /// paths; tasks bind-mount them as docker mode does.
    #[default]
    Bind,
    /// `{ nfs = "server:/export", options = "...", mounted_at = "/path" }`:
    /// Swarm makes a `local` volume of type NFS on each node that runs a
    /// task.
    Nfs(NfsShare),
}

/// An NFS export that holds the workspace and data folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsShare {
    /// The file server's name or address.
    pub server: String,
    /// The exported path on the server.
    pub export: PathBuf,
    /// Mount options beside `addr=` (`nfsvers=4.1,hard`).
    pub options: Option<String>,
    /// Where this machine sees the export (default: the export's own path).
    pub mounted_at: PathBuf,
}

impl NfsShare {
    /// The export's path for a folder of this machine under `mounted_at`,
    /// or None when the folder is not under it.
    pub fn device_for(&self, folder: &std::path::Path) -> Option<PathBuf> {
        let sub = folder.strip_prefix(&self.mounted_at).ok()?;
        Some(if sub.as_os_str().is_empty() {
            self.export.clone()
        } else {
            self.export.join(sub)
        })
    }
}

/// Where and with what a swarm entry's tasks run: passed to Swarm as
/// written (`constraints`, `spread`) or as its resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// Swarm constraints, e.g. `node.labels.clm == true`.
    pub constraints: Vec<String>,
    /// Spread tasks over the values of this node attribute.
    pub spread: Option<String>,
    /// CPUs a task may use (`Limits.NanoCPUs`).
    pub cpu_limit: Option<f64>,
    /// Memory a node must have free for a task (`Reservations.MemoryBytes`).
    pub memory_reservation: Option<u64>,
    /// CPUs a node must have free for a task (`Reservations.NanoCPUs`).
    pub cpu_reservation: Option<f64>,
}

/// What of the supervisor's environment a direct worker inherits (the
/// protocol's own variables and the entry's `env` are always set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InheritEnv {
    /// Everything (the default, as supervisord and a shell do).
    All,
    /// Only the basics a program needs to run: [`BASIC_ENV`].
    Basic,
    /// Exactly these names.
    Only(Vec<String>),
}

impl InheritEnv {
    /// Whether the supervisor's variable `name` passes to workers.
    pub fn passes(&self, name: &str) -> bool {
        match self {
            InheritEnv::All => true,
            InheritEnv::Basic => BASIC_ENV.contains(&name),
            InheritEnv::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// When and how often a slot's worker is replaced (see `supervisor::policy`).
#[derive(Debug, Clone, PartialEq)]
pub struct RestartConfig {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A worker that ran this long counts as healthy: its slot's backoff resets.
    pub healthy_after: Duration,
    /// Give a slot up after this many failures within `burst_window`.
    pub burst_limit: u32,
    pub burst_window: Duration,
    /// How long a slot pauses instead, when its failures came from outside
    /// the worker (disk full, database or engine errors).
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionMode {
    Docker,
    Direct,
    Auto,
    /// One Docker Swarm service per slot, on the nodes of a swarm.
    Swarm,
}

impl ExecutionMode {
    /// Whether the entry always runs its image (whose own command is the
    /// default program).
    pub fn runs_images(self) -> bool {
        matches!(self, ExecutionMode::Docker | ExecutionMode::Swarm)
    }
}

/// Who a worker's container runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerUser {
    /// The supervisor's own uid:gid, so files written to the workspace
    /// belong to whoever ran `start` (the default).
    Auto,
    /// The image's `USER`.
    Image,
    /// As written: `UID:GID`, `UID`, or a user (and group) name of the image.
    Given(String),
}

impl ContainerUser {
    /// Docker's `User` setting: None leaves the image's.
    pub fn docker_user(&self) -> Option<String> {
        match self {
            ContainerUser::Auto => Some(format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid())),
            ContainerUser::Image => None,
            ContainerUser::Given(u) => Some(u.clone()),
        }
    }
}

/// What a worker process runs.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerProgram {
    /// Neither `command` nor `job_command` was given: the protocol's worker
    /// program for the type (direct mode), or the image's own entrypoint
    /// and command (docker mode).
    Default,
    /// A worker program that speaks the protocol itself.
    Command(Vec<String>),
    /// The built-in worker running this command once per job.
    JobCommand(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub worker_type: String,
    pub count: u32,
    pub execution_mode: ExecutionMode,
    pub image: Option<String>,
    pub memory_limit: Option<u64>,
    pub max_job_time: Duration,
    /// This type's idle-heartbeat limit (the pool's unless overridden).
    pub heartbeat_timeout: Duration,
    /// The optional zero-CPU rule: a busy worker whose process tree used
    /// less than `percent` of one CPU over `window` is hung.
    pub hung_cpu: Option<HungCpu>,
    pub program: WorkerProgram,
    pub env: BTreeMap<String, String>,
    /// Who a container runs as.
    pub user: ContainerUser,
    /// Replace a worker after this many jobs …
    pub max_jobs: Option<u32>,
    /// … or once its memory (process tree RSS, container usage) passes this.
    pub max_memory: Option<u64>,
    /// Swarm entries: constraints, spread and resources.
    pub placement: Placement,
    /// Line of the `[[workers]]` header, for messages about this entry.
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HungCpu {
    pub window: Duration,
    pub percent: f64,
}

/// Where a problem (or a value) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The config file, at this line if known.
    File { path: PathBuf, line: Option<usize> },
    /// A `CLX_POOL_*` environment variable.
    Env(String),
}

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub source: Source,
    /// `pool.check_interval`, `workers[1].count`; empty for the whole file.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::File { path, line } => {
                write!(f, "{}", path.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                }
            }
            Source::Env(name) => write!(f, "environment variable {name}")?,
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in a config, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for (i, p) in self.0.iter().enumerate() {
            if i + 1 < n {
                writeln!(f, "  {p}")?;
            } else {
                write!(f, "  {p}")?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads, overrides from the environment, and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = &normalize(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        let text = crate::files::read_regular(path).map_err(|e| {
            ConfigError(vec![Problem {
                source: Source::File {
                    path: path.to_path_buf(),
                    line: None,
                },
                field: String::new(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(crate::contract::env::cli::POOL_OVERRIDE_PREFIX))
            .collect();
        let config = Config::parse(path, &text, &env)?;
        for w in &config.warnings {
            crate::stderr::line(&format!("warning: {w}"));
        }
        Ok(config)
    }

    /// Parses `text` as the contents of `path`; `env` holds `CLX_POOL_*`
    /// variables. Kept apart from [`Config::load`] so tests need no files.
    pub fn parse(path: &Path, text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        validate::config(path, text, env)
    }

    pub fn total_workers(&self) -> u32 {
        self.workers.iter().map(|w| w.count).sum()
    }

    /// Checks the entries against the protocol the database turned out to
    /// serve: each entry that may run directly without a command needs a
    /// type that protocol knows.
    pub fn check_protocol(&self, protocol: Protocol) -> Result<(), ConfigError> {
        let problems: Vec<Problem> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.program == WorkerProgram::Default
                    && !w.execution_mode.runs_images()
                    && protocol.default_command(&w.worker_type).is_none()
            })
            .map(|(i, w)| Problem {
                source: Source::File {
                    path: self.path.clone(),
                    line: Some(w.line),
                },
                field: format!("workers[{i}].command"),
                message: format!(
                    "{} (the database serves protocol {protocol})",
                    validate::missing_command_message(&w.worker_type, &[protocol])
                ),
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

impl WorkerConfig {
    /// The argv of a direct worker under `protocol`: its `command`, the
    /// built-in worker's job command, or the protocol's default program.
    /// None only for a `Default` type the protocol does not know (refused
    /// by [`Config::check_protocol`]).
    pub fn direct_program(&self, protocol: Protocol) -> Option<WorkerProgram> {
        match &self.program {
            WorkerProgram::Default => protocol.default_command(&self.worker_type).map(WorkerProgram::Command),
            other => Some(other.clone()),
        }
    }
}

/// Parses sizes the way Docker does: a number with an optional b/k/m/g
/// suffix (powers of 1024), e.g. "512m", "1g", "10MB".
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix("ib").or_else(|| s.strip_suffix('b')).unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    Some((n * mult as f64) as u64)
}

/// A size the way [`parse_size`] reads it: "4m", "1k", "512".
pub fn format_size(n: u64) -> String {
    for (unit, mult) in [("g", 1u64 << 30), ("m", 1 << 20), ("k", 1 << 10)] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    n.to_string()
}

/// The database's real path (symlinks resolved, as far as it exists), so a
/// database reached through a symlink is the same database everywhere:
/// its lock, its processes' tag, its containers' label.
pub fn real_path(p: PathBuf) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(&p) {
        return real;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map(|d| d.join(name)).unwrap_or(p),
        _ => p,
    }
}

/// Folds `.` and `..` out of a path without touching the file system, so
/// messages and records show `/srv/run/jobs.db`, not `/srv/config/../run/jobs.db`.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/cfg/pool.toml"), text, &[])
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text).unwrap_err().0.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("[pool]\ndb_path = \"data/jobs.db\"\n[[workers]]\nworker_type = \"notebook\"\n").unwrap();
        assert_eq!(c.pool.db_path, PathBuf::from("/cfg/data/jobs.db"));
        assert_eq!(c.pool.workspace_path, PathBuf::from("/cfg/workspace"));
        assert_eq!(c.pool.log_dir, PathBuf::from("/cfg/data/logs"));
        assert_eq!(c.pool.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.workers[0].count, 1);
        assert_eq!(c.workers[0].program, WorkerProgram::Default);
        assert_eq!(
            c.workers[0].direct_program(Protocol::Clx),
            Some(WorkerProgram::Command(vec!["python3".into(), "-m".into(), "nb".into()]))
        );
        assert_eq!(c.pool.protocol, None);
    }

    #[test]
    fn a_swarm_entry_is_read_with_its_placement_and_manager() {
        let c = parse(
            "[pool]\nprotocol = \"clm\"\napi_listen = \"127.0.0.1:8765\"\napi_advertise = \"http://127.0.0.1:8765/\"\n\n[swarm]\ndocker_host = \"unix:///m.sock\"\n\n[[workers]]\nworker_type = \"notebook\"\nexecution_mode = \"swarm\"\nimage = \"clm:1\"\nconstraints = [\"node.labels.clm == true\"]\nspread = \"node.labels.rack\"\ncpu_limit = 2.0\nmemory_reservation = \"1g\"\ncpu_reservation = 0.5\n",
        )
        .unwrap();
        assert_eq!(c.pool.swarm.docker_host.as_deref(), Some("unix:///m.sock"));
        assert_eq!(c.pool.api_advertise.as_deref(), Some("http://127.0.0.1:8765"));
        let w = &c.workers[0];
        assert_eq!(w.execution_mode, ExecutionMode::Swarm);
        assert_eq!(
            w.placement,
            Placement {
                constraints: vec!["node.labels.clm == true".into()],
                spread: Some("node.labels.rack".into()),
                cpu_limit: Some(2.0),
                memory_reservation: Some(1 << 30),
                cpu_reservation: Some(0.5),
            }
        );
    }

    #[test]
    fn swarm_files_are_bind_mounts_or_an_nfs_share_that_holds_the_folders() {
        let read = |files: &str| {
            let text = format!(
                "[pool]\nprotocol = \"clm\"\nworkspace_path = \"/srv/clm/out\"\ndata_dir = \"/srv/clm/src\"\napi_listen = \"127.0.0.1:8765\"\napi_advertise = \"http://127.0.0.1:8765/\"\n\n[swarm]\n{files}\n\n[[workers]]\nworker_type = \"notebook\"\nexecution_mode = \"swarm\"\nimage = \"clm:1\"\n"
            );
            parse(&text)
        };
        assert_eq!(read("").unwrap().pool.swarm.files, SwarmFiles::Bind);
        assert_eq!(read("files = \"bind\"").unwrap().pool.swarm.files, SwarmFiles::Bind);
        let nfs = read("files = { nfs = \"files.lan:/srv/clm\", options = \"nfsvers=4.1\" }").unwrap();
        assert_eq!(
            nfs.pool.swarm.files,
            SwarmFiles::Nfs(NfsShare {
                server: "files.lan".into(),
                export: "/srv/clm".into(),
                options: Some("nfsvers=4.1".into()),
                mounted_at: "/srv/clm".into(),
            })
        );
        let elsewhere = read("files = { nfs = \"files.lan:/export\", mounted_at = \"/srv/clm\" }").unwrap();
        let SwarmFiles::Nfs(share) = elsewhere.pool.swarm.files else {
            panic!("not nfs")
        };
        assert_eq!(share.device_for(Path::new("/srv/clm/out")), Some("/export/out".into()));
        let problems = |files: &str| {
            let p: Vec<String> = read(files).unwrap_err().0.iter().map(|p| p.to_string()).collect();
            p.join("\n")
        };
        let p = problems("files = \"nfs\"");
        assert!(p.contains(":9: swarm.files: `nfs`: expected \"bind\" or {"), "{p}");
        let p = problems("files = { nfs = \"/srv/clm\" }");
        assert!(p.contains("expected \"server:/export\""), "{p}");
        let p = problems("files = { nfs = \"files.lan:/srv/clm\", option = \"hard\" }");
        assert!(p.contains(":9: swarm.files: expected \"bind\" or {"), "{p}");
        let p = problems("files = { nfs = \"files.lan:/export/other\" }");
        assert!(
            p.contains("[pool] workspace_path /srv/clm/out is not under /export/other, where this machine sees files.lan:/export/other"),
            "{p}"
        );
        assert!(p.contains("[pool] data_dir /srv/clm/src is not under"), "{p}");
    }

    #[test]
    fn a_swarm_entry_without_what_it_needs_names_each_missing_piece() {
        let p = problems(
            "[pool]\napi_listen = \"127.0.0.1:0\"\n\n[[workers]]\nworker_type = \"w\"\nexecution_mode = \"swarm\"\nimage = \"i\"\njob_command = [\"cp\", \"{input}\", \"{output}\"]\n",
        );
        let says_all = |p: Vec<String>, expected: &[&str]| {
            let all = p.join("\n");
            for e in expected {
                assert!(all.contains(e), "missing {e:?} in:\n{all}");
            }
        };
        says_all(
            p,
            &[
                ":6: workers[0].execution_mode: execution_mode = \"swarm\" runs CLM workers through the Worker API; set [pool] protocol = \"clm\"",
                ":8: workers[0].job_command: the built-in worker opens the SQLite database",
                ":2: pool.api_listen: swarm workers on other hosts must know the Worker API's port",
                "needs [pool] api_advertise",
            ],
        );
        let p = problems(
            "[[workers]]\nworker_type = \"w\"\nexecution_mode = \"swarm\"\nconstraints = [\"node.labels.clm\"]\n\n[[workers]]\nworker_type = \"d\"\nexecution_mode = \"docker\"\nimage = \"i\"\nspread = \"node.id\"\n",
        );
        says_all(
            p,
            &[
                ":3: workers[0].image: missing; execution_mode = \"swarm\" needs an image",
                ":4: workers[0].constraints: `node.labels.clm` is not a Swarm constraint",
                ":10: workers[1].spread: applies to execution_mode = \"swarm\" only",
            ],
        );
        let beyond = problems(
            "[pool]\nprotocol = \"clm\"\napi_listen = \"0.0.0.0:8765\"\napi_token_file = \"t\"\napi_advertise = \"http://b:8765\"\n[[workers]]\nworker_type = \"w\"\nexecution_mode = \"swarm\"\nimage = \"i\"\n",
        );
        assert_eq!(beyond.len(), 1, "{beyond:#?}");
        assert!(beyond[0].contains("over plain HTTP"), "{}", beyond[0]);
        let tls = |extra: &str| {
            format!(
                "[pool]\nprotocol = \"clm\"\napi_listen = \"0.0.0.0:8765\"\napi_token_file = \"t\"\n{extra}\n[[workers]]\nworker_type = \"w\"\nexecution_mode = \"swarm\"\nimage = \"i\"\n"
            )
        };
        let with_tls = parse(&tls("api_advertise = \"https://b:8765\"\napi_tls_cert = \"c.pem\"\napi_tls_key = \"k.pem\"\napi_tls_ca = \"ca.pem\"")).unwrap();
        assert_eq!(
            with_tls.pool.api_tls,
            Some(ApiTls {
                cert: PathBuf::from("/cfg/c.pem"),
                key: PathBuf::from("/cfg/k.pem")
            })
        );
        assert_eq!(with_tls.pool.api_tls_ca, Some(PathBuf::from("/cfg/ca.pem")));
        let p = problems(&tls("api_advertise = \"http://b:8765\"\napi_tls_cert = \"c.pem\""));
        let all = p.join("\n");
        assert!(all.contains("pool.api_tls_cert: needs api_tls_key"), "{all}");
        let p = problems(&tls(
            "api_advertise = \"http://b:8765\"\napi_tls_cert = \"c.pem\"\napi_tls_key = \"k.pem\"",
        ));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("pool.api_advertise: `http://b:8765`: the worker API serves HTTPS"),
            "{}",
            p[0]
        );
        let allowed = "[pool]\nprotocol = \"clm\"\napi_listen = \"0.0.0.0:8765\"\napi_token_file = \"t\"\napi_advertise = \"http://b:8765\"\napi_insecure_http = true\n[[workers]]\nworker_type = \"w\"\nexecution_mode = \"swarm\"\nimage = \"i\"\n";
        assert!(parse(allowed).is_ok());
    }

    #[test]
    fn every_problem_is_reported_with_its_line_in_file_order() {
        let p = problems(
            "[pool]\ncheck_interval = \"2 parsecs\"\n\n[[workers]]\nworker_type = \"notebook\"\ncuont = 2\ncount = -1\n\n[[workers]]\nworker_type = \"x\"\nexecution_mode = \"docker\"\n",
        );
        assert_eq!(p.len(), 4, "{p:#?}"); // interval, cuont, count, image
        assert_eq!(
            p[0],
            "/cfg/pool.toml:2: pool.check_interval: expected a duration such as \"30s\" or \"1m 30s\", got \"2 parsecs\""
        );
        let lines: Vec<&str> = p.iter().map(|s| s.split(':').nth(1).unwrap()).collect();
        assert_eq!(lines, vec!["2", "6", "7", "11"], "sorted by line");
        assert!(
            p.iter()
                .any(|s| s == "/cfg/pool.toml:6: workers[0].cuont: unknown key `cuont`; did you mean `count`?"),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|s| s.starts_with("/cfg/pool.toml:7: workers[0].count: must be between 0")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|s| s.starts_with("/cfg/pool.toml:11: workers[1].image: missing")),
            "{p:#?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let p = problems("[pool]\ndb_path = \"x.db\"\nnetwork = \n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("/cfg/pool.toml:3"), "{}", p[0]);
    }

    #[test]
    fn unknown_types_need_a_command() {
        let p = problems("[[workers]]\nworker_type = \"upper\"\n");
        assert!(
            p[0].starts_with("/cfg/pool.toml:2: workers[0].command: missing"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("needs `command` or `job_command`"), "{}", p[0]);
        let c = parse("[[workers]]\nworker_type = \"upper\"\njob_command = [\"tr\", \"a-z\", \"A-Z\"]\n").unwrap();
        assert!(matches!(c.workers[0].program, WorkerProgram::JobCommand(_)));
    }

    #[test]
    fn protocol_decides_which_types_need_no_command() {
        let c = parse("[pool]\nprotocol = \"clm\"\n[[workers]]\nworker_type = \"jupyterlite\"\n").unwrap();
        assert_eq!(c.pool.protocol, Some(Protocol::Clm));
        assert_eq!(
            c.workers[0].direct_program(Protocol::Clm),
            Some(WorkerProgram::Command(vec![
                "python3".into(),
                "-m".into(),
                "clm.workers.jupyterlite".into()
            ]))
        );
        let p = problems("[pool]\nprotocol = \"clx\"\n[[workers]]\nworker_type = \"jupyterlite\"\n");
        assert!(
            p[0].starts_with("/cfg/pool.toml:4: workers[0].command: missing; `jupyterlite` is not a known type (clx:"),
            "{p:?}"
        );
        // Unset, the database decides: accepted now, checked against it later.
        let c = parse("[[workers]]\nworker_type = \"jupyterlite\"\n").unwrap();
        assert!(c.check_protocol(Protocol::Clm).is_ok());
        let e = c.check_protocol(Protocol::Clx).unwrap_err().to_string();
        assert!(e.contains("/cfg/pool.toml:1: workers[0].command: missing"), "{e}");
        assert!(e.contains("the database serves protocol clx"), "{e}");
        let p = problems("[pool]\nprotocol = \"clz\"\n[[workers]]\nworker_type = \"notebook\"\n");
        assert_eq!(
            p,
            vec!["/cfg/pool.toml:2: pool.protocol: expected \"clx\" or \"clm\", got \"clz\""]
        );
    }

    #[test]
    fn environment_overrides_pool_keys() {
        let env = vec![
            ("CLX_POOL_STOP_TIMEOUT".to_string(), "3s".to_string()),
            ("CLX_POOL_DB_PATH".to_string(), "/data/x.db".to_string()),
        ];
        let c = Config::parse(
            Path::new("/cfg/pool.toml"),
            "[pool]\nstop_timeout = \"10s\"\n[[workers]]\nworker_type = \"notebook\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.pool.stop_timeout, Duration::from_secs(3));
        assert_eq!(c.pool.db_path, PathBuf::from("/data/x.db"));
        let env = vec![("CLX_POOL_STOP_TIMEOUT".to_string(), "soon".to_string())];
        let workers = "[[workers]]\nworker_type = \"notebook\"\n";
        let e = Config::parse(Path::new("/cfg/pool.toml"), workers, &env).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "environment variable CLX_POOL_STOP_TIMEOUT: expected a duration such as \"30s\" or \"1m 30s\", got \"soon\""
        );
        // Variables of other tools sharing the prefix are not errors.
        let env = vec![("CLX_POOL_BIN".to_string(), "/usr/bin/clx-pool".to_string())];
        let c = Config::parse(Path::new("/cfg/pool.toml"), workers, &env).unwrap();
        assert!(
            c.warnings[0].contains("CLX_POOL_BIN names no [pool] key"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn dotted_keys_and_inline_tables_have_their_lines() {
        let p = problems(
            "[pool]\nrestart_limit = 3\n\n[[workers]]\nworker_type = \"notebook\"\nenv.JAVA = 1\n\n[[workers]]\nworker_type = \"x\"\njob_command = [\"true\"]\nhung_cpu = { window = \"1s\" }\n",
        );
        assert_eq!(
            p,
            vec![
                "/cfg/pool.toml:6: workers[0].env: expected a table of strings such as { JAVA_OPTS = \"-Xmx512m\" }, got { JAVA = 1 }",
                "/cfg/pool.toml:11: workers[1].hung_cpu: unknown key `hung_cpu`; did you mean `hung_cpu_window`?",
            ]
        );
    }

    #[test]
    fn an_empty_config_is_an_error_not_an_idle_pool() {
        let p = problems("");
        assert_eq!(
            p,
            vec!["/cfg/pool.toml: workers: no [[workers]] entry: a pool needs at least one (see docs/config.md)"]
        );
    }

    #[test]
    fn the_worker_api_listens_beyond_loopback_only_with_a_chosen_token() {
        let docker = "[[workers]]\nworker_type = \"plantuml\"\nexecution_mode = \"docker\"\nimage = \"i\"\n";
        let c = parse(&format!("[pool]\nprotocol = \"clm\"\n{docker}")).unwrap();
        assert_eq!((c.pool.api_listen, c.pool.api_token_file), (None, None));
        assert_eq!(c.pool.cache_db_path, PathBuf::from("/cfg/clm_cache.db"));
        for (listen, token, expect) in [
            ("127.0.0.1:8765", false, Ok("127.0.0.1:8765")),
            ("[::1]", false, Ok("[::1]:0")),
            ("0.0.0.0:8765", true, Ok("0.0.0.0:8765")),
            ("0.0.0.0", false, Err("beyond this machine; set api_token_file")),
            ("192.168.1.5:80", false, Err("beyond this machine")),
            ("localhost:80", false, Err("is not an address")),
        ] {
            let token = if token { "api_token_file = \"t\"\n" } else { "" };
            let text = format!("[pool]\napi_listen = \"{listen}\"\n{token}{docker}");
            match (parse(&text), expect) {
                (Ok(c), Ok(addr)) => assert_eq!(c.pool.api_listen.unwrap().to_string(), addr),
                (Err(e), Err(why)) => {
                    let p: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
                    assert!(
                        p[0].starts_with("/cfg/pool.toml:2: pool.api_listen:") && p[0].contains(why),
                        "{p:?}"
                    );
                }
                (got, want) => panic!("{listen}: got {:?}, want {want:?}", got.map(|c| c.pool.api_listen)),
            }
        }
    }

    #[test]
    fn container_users() {
        let entry = |mode: &str, user: &str| {
            format!(
                "[[workers]]\nworker_type = \"x\"\njob_command = [\"true\"]\nexecution_mode = \"{mode}\"\nimage = \"i\"\nuser = \"{user}\"\n"
            )
        };
        let user = |mode: &str, u: &str| parse(&entry(mode, u)).map(|c| c.workers[0].user.clone());
        assert_eq!(user("docker", "auto").unwrap(), ContainerUser::Auto);
        assert_eq!(user("docker", "image").unwrap(), ContainerUser::Image);
        assert_eq!(
            user("auto", "1000:1000").unwrap(),
            ContainerUser::Given("1000:1000".into())
        );
        assert_eq!(user("docker", "worker").unwrap(), ContainerUser::Given("worker".into()));
        assert_eq!(user("direct", "auto").unwrap(), ContainerUser::Auto);
        let p = problems(&entry("docker", "10 00"));
        assert!(p[0].contains("user: `10 00` is not"), "{p:?}");
        let p = problems(&entry("direct", "1000:1000"));
        assert!(p[0].contains("user: applies to containers"), "{p:?}");
        let me = format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid());
        assert_eq!(ContainerUser::Auto.docker_user(), Some(me));
        assert_eq!(ContainerUser::Image.docker_user(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(format_size(4 << 20), "4m");
        assert_eq!(format_size(1024), "1k");
        assert_eq!(format_size(1000), "1000");
    }
}
