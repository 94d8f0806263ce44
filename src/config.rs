//! The `pool.toml` model: parsing, defaults, `CLX_POOL_*` overrides and
//! validation. Every problem in a file is collected and reported together,
//! each with the file, the line and the field it concerns. This module knows
//! nothing about processes or the database; it only produces a [`Config`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::vocab::Protocol;

/// A fully validated configuration, with every path absolute.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file this came from.
    pub path: PathBuf,
    pub pool: PoolConfig,
    pub workers: Vec<WorkerConfig>,
}

#[derive(Debug, Clone)]
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

/// What `inherit_env = false` keeps: nothing secret, only what programs
/// need to find themselves and speak the user's language.
pub const BASIC_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
];

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

/// `inherit_env` as written: a boolean or a list of names.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawInheritEnv {
    All(bool),
    Only(Vec<String>),
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

#[derive(Debug, Clone)]
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
    /// Line of the `[[workers]]` header, for messages about this entry.
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HungCpu {
    pub window: Duration,
    pub percent: f64,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pool: Option<toml::Value>,
    workers: Option<Vec<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    protocol: Option<Protocol>,
    db_path: Option<PathBuf>,
    workspace_path: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    log_level: Option<String>,
    #[serde(default, with = "humantime_serde")]
    check_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stop_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    startup_timeout: Option<Duration>,
    network: Option<String>,
    log_max_size: Option<String>,
    log_keep: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    restart_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    restart_backoff_max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    healthy_after: Option<Duration>,
    restart_limit: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    restart_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    restart_cooldown: Option<Duration>,
    inherit_env: Option<RawInheritEnv>,
    events_keep: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    events_max_age: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    worker_type: Option<String>,
    count: Option<i64>,
    execution_mode: Option<ExecutionMode>,
    image: Option<String>,
    memory_limit: Option<String>,
    #[serde(default, with = "humantime_serde")]
    max_job_time: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    hung_cpu_window: Option<Duration>,
    hung_cpu_percent: Option<f64>,
    command: Option<Vec<String>>,
    job_command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
}

/// `[pool]` keys that `CLX_POOL_<KEY>` environment variables may override.
const POOL_KEYS: &[&str] = &[
    "protocol",
    "db_path",
    "workspace_path",
    "log_dir",
    "log_level",
    "check_interval",
    "heartbeat_timeout",
    "stop_timeout",
    "startup_timeout",
    "network",
    "log_max_size",
    "log_keep",
    "restart_backoff",
    "restart_backoff_max",
    "healthy_after",
    "restart_limit",
    "restart_window",
    "restart_cooldown",
    "inherit_env",
    "events_keep",
    "events_max_age",
];

const INTEGER_POOL_KEYS: &[&str] = &["log_keep", "restart_limit", "events_keep"];

impl Config {
    /// Reads, overrides from the environment, and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = &normalize(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                field: String::new(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("CLX_POOL_")).collect();
        Config::parse(path, &text, &env)
    }

    /// Parses `text` as the contents of `path`; `env` holds `CLX_POOL_*`
    /// variables. Kept apart from [`Config::load`] so tests need no files.
    pub fn parse(path: &Path, text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut v = Validator::new(path, text);
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| line_of_offset(text, s.start));
                v.problems.push(Problem {
                    file: path.to_path_buf(),
                    line,
                    field: String::new(),
                    message: e.message().trim().to_string(),
                });
                return Err(ConfigError(v.problems));
            }
        };
        let mut pool_table = match raw.pool {
            Some(toml::Value::Table(t)) => t,
            Some(_) => {
                v.push(Section::Pool, None, "pool", "must be a table ([pool])".into());
                toml::Table::new()
            }
            None => toml::Table::new(),
        };
        let env_keys = apply_env_overrides(&mut pool_table, env, &mut v);
        let raw_pool: RawPool = v.section(Section::Pool, "pool", &pool_table, &env_keys);
        let pool = v.pool(raw_pool);
        let mut workers = Vec::new();
        let mut seen_types: BTreeMap<String, usize> = BTreeMap::new();
        for (i, value) in raw.workers.unwrap_or_default().into_iter().enumerate() {
            let table = match value {
                toml::Value::Table(t) => t,
                _ => {
                    v.push(
                        Section::Worker(i),
                        None,
                        &format!("workers[{i}]"),
                        "must be a table".into(),
                    );
                    continue;
                }
            };
            let raw_worker: RawWorker = v.section(Section::Worker(i), &format!("workers[{i}]"), &table, &[]);
            let pool_heartbeat = pool
                .as_ref()
                .map(|p| p.heartbeat_timeout)
                .unwrap_or(Duration::from_secs(30));
            let protocol = pool.as_ref().and_then(|p| p.protocol);
            if let Some(w) = v.worker(i, raw_worker, pool_heartbeat, protocol) {
                if let Some(first) = seen_types.insert(w.worker_type.clone(), i) {
                    v.push(
                        Section::Worker(i),
                        Some("worker_type"),
                        &format!("workers[{i}].worker_type"),
                        format!(
                            "`{}` is already configured by workers[{first}]; use one entry per type",
                            w.worker_type
                        ),
                    );
                }
                workers.push(w);
            }
        }
        if v.problems.is_empty() {
            Ok(Config {
                path: path.to_path_buf(),
                pool: pool.expect("pool is valid when there are no problems"),
                workers,
            })
        } else {
            Err(ConfigError(v.problems))
        }
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
                    && w.execution_mode != ExecutionMode::Docker
                    && protocol.default_command(&w.worker_type).is_none()
            })
            .map(|(i, w)| Problem {
                file: self.path.clone(),
                line: Some(w.line),
                field: format!("workers[{i}].command"),
                message: format!(
                    "{} (the database serves protocol {protocol})",
                    missing_command_message(&w.worker_type, &[protocol])
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

/// Puts `CLX_POOL_<KEY>` values into the `[pool]` table; returns the keys set
/// that way so problems with them name the variable, not the file.
fn apply_env_overrides(table: &mut toml::Table, env: &[(String, String)], v: &mut Validator) -> Vec<String> {
    let mut keys = Vec::new();
    for (name, value) in env {
        let Some(key) = name.strip_prefix("CLX_POOL_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if !POOL_KEYS.contains(&key.as_str()) {
            v.problems.push(Problem {
                file: PathBuf::from(format!("environment variable {name}")),
                line: None,
                field: String::new(),
                message: format!("not a [pool] key; known keys: {}", POOL_KEYS.join(", ")),
            });
            continue;
        }
        let value = if key == "inherit_env" {
            // `true`, `false`, or names separated by commas.
            match value.trim() {
                "true" => toml::Value::Boolean(true),
                "false" => toml::Value::Boolean(false),
                list => toml::Value::Array(
                    list.split(',')
                        .map(|n| n.trim())
                        .filter(|n| !n.is_empty())
                        .map(|n| toml::Value::String(n.to_string()))
                        .collect(),
                ),
            }
        } else if INTEGER_POOL_KEYS.contains(&key.as_str()) {
            match value.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => toml::Value::String(value.clone()),
            }
        } else if key.ends_with("_path") || key == "log_dir" {
            // Relative paths from the environment are relative to where the
            // command runs, as a shell user expects.
            let p = PathBuf::from(value);
            let p = if p.is_relative() {
                std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
            } else {
                p
            };
            toml::Value::String(p.to_string_lossy().into_owned())
        } else {
            toml::Value::String(value.clone())
        };
        table.insert(key.clone(), value);
        keys.push(key);
    }
    keys
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Pool,
    Worker(usize),
}

/// Collects problems and knows where each key of the file sits.
struct Validator<'a> {
    path: &'a Path,
    base: PathBuf,
    lines: KeyLines,
    problems: Vec<Problem>,
    env_keys: Vec<String>,
}

impl<'a> Validator<'a> {
    fn new(path: &'a Path, text: &str) -> Self {
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Validator {
            path,
            base,
            lines: KeyLines::scan(text),
            problems: Vec::new(),
            env_keys: Vec::new(),
        }
    }

    fn push(&mut self, section: Section, key: Option<&str>, field: &str, message: String) {
        if section == Section::Pool
            && let Some(key) = key
            && self.env_keys.iter().any(|k| k == key)
        {
            self.problems.push(Problem {
                file: PathBuf::from(format!("environment variable CLX_POOL_{}", key.to_ascii_uppercase())),
                line: None,
                field: String::new(),
                message,
            });
            return;
        }
        let line = self.lines.find(section, key);
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            line,
            field: field.to_string(),
            message,
        });
    }

    /// Deserializes one table; on failure, finds every bad key by trying the
    /// keys one at a time (all fields are optional, so a single good key
    /// always deserializes).
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        section: Section,
        name: &str,
        table: &toml::Table,
        env_keys: &[String],
    ) -> T {
        self.env_keys = env_keys.to_vec();
        if let Ok(t) = T::deserialize(toml::Value::Table(table.clone())) {
            return t;
        }
        let mut good = toml::Table::new();
        for (key, value) in table {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            match T::deserialize(toml::Value::Table(one)) {
                Ok(_) => {
                    good.insert(key.clone(), value.clone());
                }
                Err(e) => {
                    let msg = e.message().trim().to_string();
                    let msg = if msg.starts_with("unknown field") {
                        format!("unknown key `{key}`{}", expected_suffix(&msg))
                    } else {
                        msg
                    };
                    self.push(section, Some(key), &format!("{name}.{key}"), msg);
                }
            }
        }
        // Keys that are fine on their own are fine together (all optional),
        // so the rest of the entry is still validated.
        T::deserialize(toml::Value::Table(good)).unwrap_or_default()
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            normalize(&p)
        } else {
            normalize(&self.base.join(p))
        }
    }

    /// Ages are measured by the database's clock in whole seconds, so a
    /// limit below one second would judge healthy workers hung.
    fn whole_seconds(&mut self, section: Section, key: &str, field: &str, d: Duration) {
        if d < Duration::from_secs(1) {
            self.push(
                section,
                Some(key),
                field,
                format!(
                    "must be at least 1s, got {}: ages are measured in whole seconds of the database's clock",
                    humantime::format_duration(d)
                ),
            );
        }
    }

    /// A placeholder inside a shell script is pasted into the script
    /// unquoted: a file named `$(rm -rf ~)` would run. The script must read
    /// the variables instead, quoted.
    fn no_placeholders_in_scripts(&mut self, section: Section, field: &str, command: &[String]) {
        const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "busybox"];
        let is_shell = Path::new(&command[0])
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| SHELLS.contains(&n));
        let Some(script_at) = command.iter().position(|a| a == "-c").filter(|_| is_shell) else {
            return;
        };
        let used: Vec<&str> = command[script_at + 1..]
            .iter()
            .flat_map(|a| crate::worker::placeholders::used_in(a))
            .collect();
        if let Some(first) = used.first() {
            let var = match *first {
                "input" => "CLX_INPUT_FILE",
                "output" => "CLX_OUTPUT_FILE",
                "payload" => "CLX_PAYLOAD",
                "payload_file" => "CLX_PAYLOAD_FILE",
                _ => "CLX_JOB_ID",
            };
            self.push(
                section,
                Some("job_command"),
                field,
                format!(
                    "{{{first}}} inside a shell script would be pasted into the script unquoted (a file name could run commands); \
                     write \"${var}\" in the script instead (the variables: $CLX_INPUT_FILE, $CLX_OUTPUT_FILE, $CLX_PAYLOAD, $CLX_PAYLOAD_FILE, $CLX_JOB_ID)"
                ),
            );
        }
    }

    fn positive(&mut self, key: &str, d: Option<Duration>, default: Duration) -> Duration {
        let d = d.unwrap_or(default);
        if d.is_zero() {
            self.push(
                Section::Pool,
                Some(key),
                &format!("pool.{key}"),
                "must be greater than 0".into(),
            );
        }
        d
    }

    fn pool(&mut self, raw: RawPool) -> Option<PoolConfig> {
        let before = self.problems.len();
        let db_path = real_path(self.resolve(raw.db_path.unwrap_or_else(|| PathBuf::from("jobs.db"))));
        let workspace_path = self.resolve(raw.workspace_path.unwrap_or_else(|| PathBuf::from("workspace")));
        let log_dir = match raw.log_dir {
            Some(p) => self.resolve(p),
            None => db_path.parent().unwrap_or(Path::new(".")).join("logs"),
        };
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if !["trace", "debug", "info", "warn", "warning", "error", "critical"]
            .contains(&log_level.to_ascii_lowercase().as_str())
        {
            self.push(
                Section::Pool,
                Some("log_level"),
                "pool.log_level",
                format!("unknown level `{log_level}`; use one of trace, debug, info, warn, error"),
            );
        }
        let check_interval = self.positive("check_interval", raw.check_interval, Duration::from_secs(2));
        let heartbeat_timeout = raw.heartbeat_timeout.unwrap_or(Duration::from_secs(30));
        self.whole_seconds(
            Section::Pool,
            "heartbeat_timeout",
            "pool.heartbeat_timeout",
            heartbeat_timeout,
        );
        let stop_timeout = raw.stop_timeout.unwrap_or(Duration::from_secs(10));
        let startup_timeout = self.positive("startup_timeout", raw.startup_timeout, Duration::from_secs(30));
        let log_max_size = match raw.log_max_size {
            None => 10 * 1024 * 1024,
            Some(s) => match parse_size(&s) {
                Some(n) if n >= 1024 => n,
                _ => {
                    self.push(
                        Section::Pool,
                        Some("log_max_size"),
                        "pool.log_max_size",
                        format!("`{s}` is not a size of at least 1k (e.g. \"10m\", \"512k\")"),
                    );
                    0
                }
            },
        };
        let log_keep = match raw.log_keep {
            None => 3,
            Some(n) if (0..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.push(
                    Section::Pool,
                    Some("log_keep"),
                    "pool.log_keep",
                    format!("must be between 0 and 1000, got {n}"),
                );
                0
            }
        };
        let restart = RestartConfig {
            backoff_initial: self.positive("restart_backoff", raw.restart_backoff, Duration::from_millis(500)),
            backoff_max: self.positive("restart_backoff_max", raw.restart_backoff_max, Duration::from_secs(60)),
            healthy_after: raw.healthy_after.unwrap_or(Duration::from_secs(10)),
            burst_limit: match raw.restart_limit {
                None => 5,
                Some(n) if n >= 1 => n as u32,
                Some(n) => {
                    self.push(
                        Section::Pool,
                        Some("restart_limit"),
                        "pool.restart_limit",
                        format!("must be at least 1, got {n}"),
                    );
                    1
                }
            },
            burst_window: self.positive("restart_window", raw.restart_window, Duration::from_secs(10)),
            cooldown: self.positive("restart_cooldown", raw.restart_cooldown, Duration::from_secs(60)),
        };
        let inherit_env = match raw.inherit_env {
            None | Some(RawInheritEnv::All(true)) => InheritEnv::All,
            Some(RawInheritEnv::All(false)) => InheritEnv::Basic,
            Some(RawInheritEnv::Only(names)) => {
                for n in &names {
                    if n.is_empty() || n.contains('=') {
                        self.push(
                            Section::Pool,
                            Some("inherit_env"),
                            "pool.inherit_env",
                            format!("`{n}` is not a variable name"),
                        );
                    }
                }
                InheritEnv::Only(names)
            }
        };
        let events_keep = match raw.events_keep {
            None => 10_000,
            Some(n) if (100..=10_000_000).contains(&n) => n as u32,
            Some(n) => {
                self.push(
                    Section::Pool,
                    Some("events_keep"),
                    "pool.events_keep",
                    format!("must be between 100 and 10000000, got {n}"),
                );
                0
            }
        };
        let events_max_age = self.positive(
            "events_max_age",
            raw.events_max_age,
            Duration::from_secs(30 * 24 * 3600),
        );
        if self.problems.len() > before {
            return None;
        }
        Some(PoolConfig {
            protocol: raw.protocol,
            db_path,
            workspace_path,
            log_dir,
            log_level,
            check_interval,
            heartbeat_timeout,
            stop_timeout,
            startup_timeout,
            network: raw.network.unwrap_or_else(|| "clx_app-network".into()),
            log_max_size,
            log_keep,
            restart,
            inherit_env,
            events_keep,
            events_max_age,
        })
    }

    fn worker(
        &mut self,
        i: usize,
        raw: RawWorker,
        pool_heartbeat: Duration,
        protocol: Option<Protocol>,
    ) -> Option<WorkerConfig> {
        let before = self.problems.len();
        let s = Section::Worker(i);
        let f = |k: &str| format!("workers[{i}].{k}");
        let worker_type = match raw.worker_type {
            Some(t) if valid_type_name(&t) => t,
            Some(t) => {
                self.push(
                    s,
                    Some("worker_type"),
                    &f("worker_type"),
                    format!("`{t}` is not a valid type name (letters, digits, `_` and `-`)"),
                );
                String::new()
            }
            None => {
                self.push(
                    s,
                    None,
                    &f("worker_type"),
                    "missing; every [[workers]] entry needs a worker_type".into(),
                );
                String::new()
            }
        };
        let count = match raw.count {
            None => 1,
            Some(n) if (0..=10_000).contains(&n) => n as u32,
            Some(n) => {
                self.push(
                    s,
                    Some("count"),
                    &f("count"),
                    format!("must be between 0 and 10000, got {n}"),
                );
                0
            }
        };
        let execution_mode = raw.execution_mode.unwrap_or(ExecutionMode::Direct);
        if execution_mode == ExecutionMode::Docker && raw.image.is_none() {
            self.push(
                s,
                Some("execution_mode"),
                &f("image"),
                "missing; execution_mode = \"docker\" needs an image".into(),
            );
        }
        let memory_limit = match raw.memory_limit {
            None => None,
            Some(m) => match parse_size(&m) {
                Some(n) if n >= 4 * 1024 * 1024 => Some(n),
                _ => {
                    self.push(
                        s,
                        Some("memory_limit"),
                        &f("memory_limit"),
                        format!("`{m}` is not a memory size of at least 4m (e.g. \"512m\", \"1g\")"),
                    );
                    None
                }
            },
        };
        let max_job_time = raw.max_job_time.unwrap_or(Duration::from_secs(600));
        self.whole_seconds(s, "max_job_time", &f("max_job_time"), max_job_time);
        let heartbeat_timeout = raw.heartbeat_timeout.unwrap_or(pool_heartbeat);
        if raw.heartbeat_timeout.is_some() {
            self.whole_seconds(s, "heartbeat_timeout", &f("heartbeat_timeout"), heartbeat_timeout);
        }
        if let Some(c) = &raw.job_command {
            self.no_placeholders_in_scripts(s, &f("job_command"), c);
        }
        let hung_cpu = match (raw.hung_cpu_window, raw.hung_cpu_percent) {
            (None, None) => None,
            (None, Some(_)) => {
                self.push(
                    s,
                    Some("hung_cpu_percent"),
                    &f("hung_cpu_window"),
                    "missing; hung_cpu_percent needs a hung_cpu_window".into(),
                );
                None
            }
            (Some(window), percent) => {
                let percent = percent.unwrap_or(1.0);
                if window.is_zero() {
                    self.push(
                        s,
                        Some("hung_cpu_window"),
                        &f("hung_cpu_window"),
                        "must be greater than 0".into(),
                    );
                }
                if !(0.0..=100.0).contains(&percent) {
                    self.push(
                        s,
                        Some("hung_cpu_percent"),
                        &f("hung_cpu_percent"),
                        format!("must be between 0 and 100, got {percent}"),
                    );
                }
                Some(HungCpu { window, percent })
            }
        };
        for (key, cmd) in [("command", &raw.command), ("job_command", &raw.job_command)] {
            if let Some(cmd) = cmd
                && (cmd.is_empty() || cmd[0].is_empty())
            {
                self.push(
                    s,
                    Some(key),
                    &f(key),
                    "must name a program: a non-empty list like [\"prog\", \"arg\"]".into(),
                );
            }
        }
        let program = match (raw.command, raw.job_command) {
            (Some(_), Some(_)) => {
                self.push(
                    s,
                    Some("job_command"),
                    &f("job_command"),
                    "`command` and `job_command` exclude each other; keep one".into(),
                );
                None
            }
            (Some(c), None) => Some(WorkerProgram::Command(c)),
            (None, Some(c)) => Some(WorkerProgram::JobCommand(c)),
            (None, None) => {
                // Which protocols could run this type without a command; with
                // `protocol` unset the database decides later, so either will do.
                let one;
                let protocols: &[Protocol] = match protocol {
                    Some(p) => {
                        one = [p];
                        &one
                    }
                    None => Protocol::ALL,
                };
                let known = protocols.iter().any(|p| p.default_command(&worker_type).is_some());
                if !known && execution_mode != ExecutionMode::Docker && !worker_type.is_empty() {
                    self.push(
                        s,
                        Some("worker_type"),
                        &f("command"),
                        missing_command_message(&worker_type, protocols),
                    );
                }
                Some(WorkerProgram::Default)
            }
        };
        if self.problems.len() > before {
            return None;
        }
        Some(WorkerConfig {
            worker_type,
            count,
            execution_mode,
            image: raw.image,
            memory_limit,
            max_job_time,
            heartbeat_timeout,
            hung_cpu,
            program: program.unwrap_or(WorkerProgram::Default),
            env: raw.env.unwrap_or_default(),
            line: self.lines.find(s, None).unwrap_or(1),
        })
    }
}

fn missing_command_message(worker_type: &str, protocols: &[Protocol]) -> String {
    let known: Vec<String> = protocols.iter().map(|p| format!("{p}: {}", p.type_names())).collect();
    format!(
        "missing; `{worker_type}` is not a known type ({}), so it needs `command` or `job_command`",
        known.join("; ")
    )
}

fn expected_suffix(msg: &str) -> String {
    match msg.find("expected") {
        Some(i) => format!("; {}", &msg[i..]),
        None => String::new(),
    }
}

fn valid_type_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
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

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Where each `[pool]` / `[[workers]]` header and key sits in the file, found
/// by a line scan (good enough for the layouts people write by hand).
struct KeyLines {
    headers: Vec<(Section, usize)>,
    keys: Vec<(Section, String, usize)>,
}

impl KeyLines {
    fn scan(text: &str) -> Self {
        let mut headers = Vec::new();
        let mut keys = Vec::new();
        let mut current: Option<Section> = None;
        let mut workers = 0usize;
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let t = line.trim();
            if t.starts_with("[[") {
                let name = t.trim_start_matches('[').split(']').next().unwrap_or("").trim();
                current = if name == "workers" {
                    workers += 1;
                    let s = Section::Worker(workers - 1);
                    headers.push((s, line_no));
                    Some(s)
                } else {
                    None
                };
            } else if t.starts_with('[') {
                let name = t.trim_start_matches('[').split(']').next().unwrap_or("").trim();
                current = if name == "pool" {
                    headers.push((Section::Pool, line_no));
                    Some(Section::Pool)
                } else if name.starts_with("workers.") && workers > 0 {
                    // e.g. [workers.env]: a sub-table of the latest entry.
                    let key = name.trim_start_matches("workers.").to_string();
                    keys.push((Section::Worker(workers - 1), key, line_no));
                    None
                } else {
                    None
                };
            } else if let Some(section) = current
                && let Some((key, _)) = t.split_once('=')
            {
                let key = key.trim().trim_matches('"').to_string();
                if !key.is_empty() && !key.starts_with('#') {
                    keys.push((section, key, line_no));
                }
            }
        }
        KeyLines { headers, keys }
    }

    fn find(&self, section: Section, key: Option<&str>) -> Option<usize> {
        if let Some(key) = key
            && let Some((_, _, line)) = self.keys.iter().find(|(s, k, _)| *s == section && k == key)
        {
            return Some(*line);
        }
        self.headers.iter().find(|(s, _)| *s == section).map(|(_, l)| *l)
    }
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
    fn every_problem_is_reported_with_its_line() {
        let p = problems(
            "[pool]\ncheck_interval = \"2 parsecs\"\n\n[[workers]]\nworker_type = \"notebook\"\ncuont = 2\ncount = -1\n\n[[workers]]\nworker_type = \"x\"\nexecution_mode = \"docker\"\n",
        );
        assert_eq!(p.len(), 4, "{p:#?}"); // interval, cuont, count, image
        assert!(p[0].starts_with("/cfg/pool.toml:2: pool.check_interval:"), "{}", p[0]);
        assert!(
            p.iter()
                .any(|s| s.starts_with("/cfg/pool.toml:6: workers[0].cuont: unknown key `cuont`")),
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
        let p = problems("[pool]\nprotocol = \"clz\"\n");
        assert!(
            p[0].starts_with("/cfg/pool.toml:2: pool.protocol: unknown variant `clz`"),
            "{p:?}"
        );
    }

    #[test]
    fn environment_overrides_pool_keys() {
        let env = vec![
            ("CLX_POOL_STOP_TIMEOUT".to_string(), "3s".to_string()),
            ("CLX_POOL_DB_PATH".to_string(), "/data/x.db".to_string()),
        ];
        let c = Config::parse(Path::new("/cfg/pool.toml"), "[pool]\nstop_timeout = \"10s\"\n", &env).unwrap();
        assert_eq!(c.pool.stop_timeout, Duration::from_secs(3));
        assert_eq!(c.pool.db_path, PathBuf::from("/data/x.db"));
        let env = vec![("CLX_POOL_STOP_TIMEOUT".to_string(), "soon".to_string())];
        let e = Config::parse(Path::new("/cfg/pool.toml"), "", &env).unwrap_err();
        assert!(
            e.0[0]
                .to_string()
                .starts_with("environment variable CLX_POOL_STOP_TIMEOUT"),
            "{}",
            e
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
    }
}
