//! Checking each table of `pool.toml` and building the model from it:
//! every key read through [`Reader::get`] (so each problem has its line),
//! its default from [`DEFAULTS`], and every rule that spans keys (docker
//! needs an image, `command` and `job_command` exclude each other, a type
//! no protocol knows needs a command).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::defaults::{POOL_KEYS, ROOT_KEYS, SWARM_KEYS, WORKER_KEYS};
use super::read::{Origin, Reader, Table};
use super::{
    ApiTls, Config, ConfigError, ContainerUser, DEFAULTS, ExecutionMode, HealthRules, HungCpu, InheritEnv, NfsShare,
    Placement, PoolConfig, Problem, RestartConfig, Source, SwarmConfig, SwarmFiles, WorkerConfig, WorkerProgram,
    normalize, parse_size, real_path,
};
use crate::contract::env::job as job_env;
use crate::vocab::Protocol;

const DURATION: &str = "a duration such as \"30s\" or \"1m 30s\"";

/// A duration written the humantime way ("30s", "1m 30s").
#[derive(Deserialize)]
struct Dur(#[serde(with = "humantime_serde")] Duration);

/// `inherit_env` as written: a boolean or a list of names.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawInheritEnv {
    All(bool),
    Only(Vec<String>),
}

pub(super) fn config(path: &Path, text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut r = Reader::new(path, text);
    let Some(mut root) = r.document() else {
        return Err(ConfigError(r.problems));
    };
    let mut pool_table = r.sub_table(&mut root, "pool");
    let swarm_table = r.sub_table(&mut root, "swarm");
    let worker_tables = r.table_array(&mut root, "workers");
    r.unknown_keys(&root, ROOT_KEYS);
    let warnings: Vec<String> = r
        .overlay_env(&mut pool_table, env, POOL_KEYS)
        .into_iter()
        .map(|name| {
            format!(
                "environment variable {name} names no [pool] key; ignored (the keys: {})",
                POOL_KEYS.join(", ")
            )
        })
        .collect();
    r.unknown_keys(&pool_table, POOL_KEYS);
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    r.unknown_keys(&swarm_table, SWARM_KEYS);
    let mut pool = pool(&mut r, &pool_table, &base);
    let mut swarm_keys = Keys {
        r: &mut r,
        t: &swarm_table,
    };
    pool.swarm = SwarmConfig {
        docker_host: swarm_keys.string("docker_host"),
        files: swarm_files(&mut swarm_keys, &pool),
    };
    let workers = workers(&mut r, path, &worker_tables, &pool, &pool_table);
    if !r.problems.is_empty() {
        let mut problems = r.problems;
        // In file order; variables after the file.
        problems.sort_by_key(|p| match &p.source {
            Source::File { line, .. } => (0, line.unwrap_or(usize::MAX)),
            Source::Env(_) => (1, 0),
        });
        return Err(ConfigError(problems));
    }
    Ok(Config {
        path: path.to_path_buf(),
        pool,
        workers,
        warnings,
    })
}

/// The `[[workers]]` entries, each checked, then what they need of the
/// pool together (one type per entry; what swarm entries need of `[pool]`).
fn workers<'t>(
    r: &mut Reader<'t>,
    path: &Path,
    tables: &[Table<'t>],
    pool: &PoolConfig,
    pool_table: &Table<'t>,
) -> Vec<WorkerConfig> {
    if tables.is_empty() {
        r.problems.push(Problem {
            source: Source::File {
                path: path.to_path_buf(),
                line: None,
            },
            field: "workers".into(),
            message: "no [[workers]] entry: a pool needs at least one (see docs/config.md)".into(),
        });
    }
    let mut workers = Vec::new();
    let mut seen_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_swarm = None;
    for (i, t) in tables.iter().enumerate() {
        r.unknown_keys(t, WORKER_KEYS);
        let Some(w) = worker(r, t, pool.heartbeat_timeout, pool.protocol) else {
            continue;
        };
        if let Some(first) = seen_types.insert(w.worker_type.clone(), i) {
            let message = format!(
                "`{}` is already configured by workers[{first}]; use one entry per type",
                w.worker_type
            );
            r.problem(t, Some("worker_type"), "worker_type", message);
        }
        swarm_entry(r, t, &w, pool);
        if w.execution_mode == ExecutionMode::Swarm {
            first_swarm.get_or_insert(i);
        }
        workers.push(w);
    }
    if let Some(i) = first_swarm {
        swarm_pool(r, &tables[i], pool, pool_table);
    }
    workers
}

/// Typed reads of one table, each falling back to its default.
struct Keys<'r, 't> {
    r: &'r mut Reader<'t>,
    t: &'r Table<'t>,
}

impl Keys<'_, '_> {
    fn problem(&mut self, key: &str, message: String) {
        self.r.problem(self.t, Some(key), key, message);
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        self.r
            .get::<Dur>(self.t, key, DURATION)
            .map(|(d, _)| d.0)
            .unwrap_or(default)
    }

    fn positive(&mut self, key: &str, default: Duration) -> Duration {
        let d = self.duration(key, default);
        if d.is_zero() {
            self.problem(key, "must be greater than 0".into());
        }
        d
    }

    /// Ages are measured by the database's clock in whole seconds, so a
    /// limit below one second would judge healthy workers hung.
    fn whole_seconds(&mut self, key: &str, default: Duration) -> Duration {
        let d = self.duration(key, default);
        if d < Duration::from_secs(1) {
            let message = format!(
                "must be at least 1s, got {}: ages are measured in whole seconds of the database's clock",
                humantime::format_duration(d)
            );
            self.problem(key, message);
        }
        d
    }

    fn int(&mut self, key: &str, default: u32, min: i64, max: i64) -> u32 {
        match self.r.get::<i64>(self.t, key, "a whole number") {
            None => default,
            Some((n, _)) if (min..=max).contains(&n) => n as u32,
            Some((n, _)) => {
                self.problem(key, format!("must be between {min} and {max}, got {n}"));
                default
            }
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        self.r
            .get::<String>(self.t, key, "a string (in quotes)")
            .map(|(s, _)| s)
    }

    fn size(&mut self, key: &str, min: u64, example: &str) -> Option<u64> {
        let text = self.string(key)?;
        match parse_size(&text) {
            Some(n) if n >= min => Some(n),
            _ => {
                let message = format!(
                    "`{text}` is not a size of at least {} (e.g. {example})",
                    crate::config::format_size(min)
                );
                self.problem(key, message);
                None
            }
        }
    }

    /// A path: relative to the config file's folder, or to the current
    /// directory when it came from a variable.
    fn path(&mut self, key: &str, base: &Path) -> Option<PathBuf> {
        let (p, origin) = self.r.get::<PathBuf>(self.t, key, "a path (in quotes)")?;
        let base = match origin {
            Origin::File => base.to_path_buf(),
            Origin::Env => std::env::current_dir().unwrap_or_else(|_| base.to_path_buf()),
        };
        Some(normalize(&base.join(p)))
    }

    fn list(&mut self, key: &str) -> Option<Vec<String>> {
        self.r
            .get::<Vec<String>>(self.t, key, "a list of strings such as [\"prog\", \"arg\"]")
            .map(|(v, _)| v)
    }
}

fn pool<'t>(r: &mut Reader<'t>, t: &Table<'t>, base: &Path) -> PoolConfig {
    let mut k = Keys { r, t };
    let protocol = k.r.get::<Protocol>(t, "protocol", "\"clx\" or \"clm\"").map(|(p, _)| p);
    let db_path = real_path(
        k.path("db_path", base)
            .unwrap_or_else(|| normalize(&base.join(DEFAULTS.db_path))),
    );
    let workspace_path = k
        .path("workspace_path", base)
        .unwrap_or_else(|| normalize(&base.join(DEFAULTS.workspace_path)));
    let log_dir = k
        .path("log_dir", base)
        .unwrap_or_else(|| db_path.parent().unwrap_or(Path::new(".")).join("logs"));
    let log_level = k.string("log_level").unwrap_or_else(|| DEFAULTS.log_level.into());
    if !["trace", "debug", "info", "warn", "warning", "error", "critical"]
        .contains(&log_level.to_ascii_lowercase().as_str())
    {
        k.problem(
            "log_level",
            format!("unknown level `{log_level}`; use one of trace, debug, info, warn, error"),
        );
    }
    let cache_db_path = k
        .path("cache_db_path", base)
        .unwrap_or_else(|| db_path.parent().unwrap_or(Path::new(".")).join("clm_cache.db"));
    let restart = RestartConfig {
        backoff_initial: k.positive("restart_backoff", DEFAULTS.restart_backoff),
        backoff_max: k.positive("restart_backoff_max", DEFAULTS.restart_backoff_max),
        healthy_after: k.duration("healthy_after", DEFAULTS.healthy_after),
        burst_limit: k.int("restart_limit", DEFAULTS.restart_limit, 1, i64::from(u32::MAX)),
        burst_window: k.positive("restart_window", DEFAULTS.restart_window),
        cooldown: k.positive("restart_cooldown", DEFAULTS.restart_cooldown),
    };
    PoolConfig {
        protocol,
        db_path,
        workspace_path,
        log_dir,
        log_level,
        check_interval: k.positive("check_interval", DEFAULTS.check_interval),
        heartbeat_timeout: k.whole_seconds("heartbeat_timeout", DEFAULTS.heartbeat_timeout),
        stop_timeout: k.duration("stop_timeout", DEFAULTS.stop_timeout),
        startup_timeout: k.positive("startup_timeout", DEFAULTS.startup_timeout),
        network: k.string("network").unwrap_or_else(|| DEFAULTS.network.into()),
        log_max_size: k
            .size("log_max_size", 1024, "\"10m\", \"512k\"")
            .unwrap_or(DEFAULTS.log_max_size),
        log_keep: k.int("log_keep", DEFAULTS.log_keep, 0, 1000),
        restart,
        inherit_env: inherit_env(&mut k),
        events_keep: k.int("events_keep", DEFAULTS.events_keep, 100, 10_000_000),
        events_max_age: k.positive("events_max_age", DEFAULTS.events_max_age),
        data_dir: k.path("data_dir", base),
        cache_db_path,
        api_listen: api_listen(&mut k),
        api_token_file: k.path("api_token_file", base),
        on_event: on_event(&mut k),
        metrics_listen: metrics_listen(&mut k),
        api_advertise: api_advertise(&mut k),
        api_insecure_http: k
            .r
            .get::<bool>(t, "api_insecure_http", "true or false")
            .is_some_and(|(b, _)| b),
        api_tls: api_tls(&mut k, base),
        api_tls_ca: k.path("api_tls_ca", base),
        swarm: SwarmConfig::default(),
        health: health(&mut k),
    }
}

/// `health_window` and `health_failure_rate` (a fraction, 0 to 1).
fn health(k: &mut Keys) -> HealthRules {
    let window = k.positive("health_window", DEFAULTS.health_window);
    let failure_rate = match k.r.get::<f64>(k.t, "health_failure_rate", "a fraction such as 0.2") {
        None => DEFAULTS.health_failure_rate,
        Some((f, _)) if (0.0..=1.0).contains(&f) => f,
        Some((f, _)) => {
            let message =
                format!("must be a fraction between 0 and 1 (0.2: more than a fifth of the jobs failed), got {f}");
            k.problem("health_failure_rate", message);
            DEFAULTS.health_failure_rate
        }
    };
    HealthRules { window, failure_rate }
}

/// `api_tls_cert` and `api_tls_key`: both or neither.
fn api_tls(k: &mut Keys, base: &Path) -> Option<ApiTls> {
    match (k.path("api_tls_cert", base), k.path("api_tls_key", base)) {
        (Some(cert), Some(key)) => Some(ApiTls { cert, key }),
        (None, None) => None,
        (Some(_), None) => {
            k.problem(
                "api_tls_cert",
                "needs api_tls_key, the certificate's private key (PEM)".into(),
            );
            None
        }
        (None, Some(_)) => {
            k.problem("api_tls_key", "needs api_tls_cert, the certificate chain (PEM)".into());
            None
        }
    }
}

/// `api_advertise`: the Worker API's URL for workers on other hosts.
fn api_advertise(k: &mut Keys) -> Option<String> {
    let text = k.string("api_advertise")?;
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Some(text.trim_end_matches('/').to_string()),
        _ => {
            let message =
                format!("`{text}` is not a URL such as \"https://build1.example.org:8765\" (http:// or https://)");
            k.problem("api_advertise", message);
            None
        }
    }
}

/// What a swarm entry needs (notes/swarm.md §5.1): CLM workers that
/// speak the Worker API, never the built-in worker (it opens SQLite).
fn swarm_entry<'t>(r: &mut Reader<'t>, t: &Table<'t>, w: &WorkerConfig, pool: &PoolConfig) {
    if w.execution_mode != ExecutionMode::Swarm {
        return;
    }
    let at_mode = |r: &mut Reader<'t>, message: String| r.problem(t, Some("execution_mode"), "execution_mode", message);
    if pool.protocol != Some(Protocol::Clm) {
        at_mode(
            r,
            "execution_mode = \"swarm\" runs CLM workers through the Worker API; set [pool] protocol = \"clm\"".into(),
        );
    }
    if matches!(w.program, WorkerProgram::JobCommand(_)) {
        r.problem(
            t,
            Some("job_command"),
            "job_command",
            "the built-in worker opens the SQLite database, which must not be shared with other hosts; swarm entries run CLM worker images".into(),
        );
    }
}

/// What swarm entries need of `[pool]`, said once however many there are:
/// the Worker API at a fixed address the nodes are told, over HTTPS or
/// plain HTTP beyond loopback only when asked for.
fn swarm_pool<'t>(r: &mut Reader<'t>, t: &Table<'t>, pool: &PoolConfig, pool_table: &Table<'t>) {
    let at_mode = |r: &mut Reader<'t>, message: String| r.problem(t, Some("execution_mode"), "execution_mode", message);
    match pool.api_listen {
        None => at_mode(
            r,
            "execution_mode = \"swarm\" needs [pool] api_listen with a fixed port (e.g. \"0.0.0.0:8765\") and api_advertise".into(),
        ),
        Some(addr) if addr.port() == 0 => r.problem(
            pool_table,
            Some("api_listen"),
            "api_listen",
            "swarm workers on other hosts must know the Worker API's port: give a fixed one (e.g. \"0.0.0.0:8765\")"
                .into(),
        ),
        Some(addr) if !addr.ip().is_loopback() && pool.api_tls.is_none() && !pool.api_insecure_http => r.problem(
            pool_table,
            Some("api_listen"),
            "api_listen",
            format!(
                "{addr} reaches beyond this machine over plain HTTP: the workers' tokens would cross the network in clear text; set api_tls_cert and api_tls_key, or api_insecure_http = true on a trusted network only"
            ),
        ),
        Some(_) => {}
    }
    if let (Some(url), Some(_)) = (&pool.api_advertise, &pool.api_tls)
        && !url.starts_with("https://")
    {
        r.problem(
            pool_table,
            Some("api_advertise"),
            "api_advertise",
            format!("`{url}`: the worker API serves HTTPS (api_tls_cert); advertise an https:// URL"),
        );
    }
    if pool.api_advertise.is_none() && !r.has(pool_table, "api_advertise") {
        at_mode(
            r,
            "execution_mode = \"swarm\" needs [pool] api_advertise: the Worker API's URL as the swarm's nodes reach it"
                .into(),
        );
    }
}

/// `[swarm] files` as written: a word, or an NFS share.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawFiles {
    Word(String),
    Nfs(RawNfs),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNfs {
    nfs: String,
    options: Option<String>,
    mounted_at: Option<PathBuf>,
}

/// `[swarm] files`: `"bind"` (the default) or `{ nfs = "server:/export",
/// options = "...", mounted_at = "/path" }`, whose export must hold the
/// workspace and data folders as this machine sees them.
fn swarm_files(k: &mut Keys, pool: &PoolConfig) -> SwarmFiles {
    let expect = "\"bind\" or { nfs = \"server:/export\", options = \"nfsvers=4.1\", mounted_at = \"/path\" }";
    let nfs = match k.r.get::<RawFiles>(k.t, "files", expect).map(|(v, _)| v) {
        None => return SwarmFiles::Bind,
        Some(RawFiles::Word(w)) if w == "bind" => return SwarmFiles::Bind,
        Some(RawFiles::Word(w)) => {
            k.problem("files", format!("`{w}`: expected {expect}"));
            return SwarmFiles::Bind;
        }
        Some(RawFiles::Nfs(nfs)) => nfs,
    };
    let Some((server, export)) = nfs
        .nfs
        .split_once(':')
        .filter(|(server, export)| !server.is_empty() && export.starts_with('/'))
    else {
        let message = format!(
            "nfs = `{}`: expected \"server:/export\" (a host, a colon, an absolute path)",
            nfs.nfs
        );
        k.problem("files", message);
        return SwarmFiles::Bind;
    };
    let share = NfsShare {
        server: server.to_string(),
        export: PathBuf::from(export),
        options: nfs.options.filter(|o| !o.trim().is_empty()),
        mounted_at: normalize(&nfs.mounted_at.unwrap_or_else(|| PathBuf::from(export))),
    };
    if !share.mounted_at.is_absolute() {
        k.problem(
            "files",
            format!(
                "mounted_at = `{}`: must be an absolute path",
                share.mounted_at.display()
            ),
        );
    }
    let folders = [
        ("workspace_path", Some(&pool.workspace_path)),
        ("data_dir", pool.data_dir.as_ref()),
    ];
    for (key, folder) in folders {
        if let Some(folder) = folder
            && share.device_for(folder).is_none()
        {
            let message = format!(
                "[pool] {key} {} is not under {}, where this machine sees {}: swarm tasks could not see it (set mounted_at, or move the folder onto the share)",
                folder.display(),
                share.mounted_at.display(),
                nfs.nfs
            );
            k.problem("files", message);
        }
    }
    SwarmFiles::Nfs(share)
}

/// `metrics_listen`: `"ADDRESS:PORT"` (`"127.0.0.1:9464"`).
fn metrics_listen(k: &mut Keys) -> Option<std::net::SocketAddr> {
    let text = k.string("metrics_listen")?;
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            let message = format!("`{text}` is not an address with a port, such as \"127.0.0.1:9464\"");
            k.problem("metrics_listen", message);
            None
        }
    }
}

fn on_event(k: &mut Keys) -> Option<Vec<String>> {
    let cmd = k.list("on_event")?;
    if cmd.is_empty() || cmd[0].is_empty() {
        k.problem("on_event", "needs a program: [\"notify-send\", \"clx-pool\"]".into());
        return None;
    }
    Some(cmd)
}

/// `api_listen`: `"ADDRESS:PORT"` or `"ADDRESS"` (any free port). An
/// address that reaches beyond this machine needs a token the operator
/// chose, since a generated one cannot be handed to another machine.
fn api_listen(k: &mut Keys) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, SocketAddr};
    let text = k.string("api_listen")?;
    let addr = text.parse::<SocketAddr>().or_else(|_| {
        let bare = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(&text);
        bare.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0))
    });
    let Ok(addr) = addr else {
        let message = format!("`{text}` is not an address such as \"0.0.0.0:8765\", \"192.168.1.5\" or \"[::1]:8765\"");
        k.problem("api_listen", message);
        return None;
    };
    if !addr.ip().is_loopback() && !k.r.has(k.t, "api_token_file") {
        let message = format!(
            "`{text}` makes the worker API reachable beyond this machine; set api_token_file to a file holding the token its workers will present"
        );
        k.problem("api_listen", message);
    }
    Some(addr)
}

fn inherit_env(k: &mut Keys) -> InheritEnv {
    let expect = "true, false, or a list of variable names such as [\"PATH\", \"HOME\"]";
    match k.r.get::<RawInheritEnv>(k.t, "inherit_env", expect).map(|(v, _)| v) {
        None | Some(RawInheritEnv::All(true)) => InheritEnv::All,
        Some(RawInheritEnv::All(false)) => InheritEnv::Basic,
        Some(RawInheritEnv::Only(names)) => {
            for n in names.iter().filter(|n| n.is_empty() || n.contains('=')) {
                k.problem("inherit_env", format!("`{n}` is not a variable name"));
            }
            InheritEnv::Only(names)
        }
    }
}

fn worker<'t>(
    r: &mut Reader<'t>,
    t: &Table<'t>,
    pool_heartbeat: Duration,
    protocol: Option<Protocol>,
) -> Option<WorkerConfig> {
    let before = r.problems.len();
    let mut k = Keys { r, t };
    let worker_type = worker_type(&mut k);
    let count = k.int("count", DEFAULTS.count, 0, i64::from(super::MAX_COUNT));
    let execution_mode =
        k.r.get::<ExecutionMode>(t, "execution_mode", "\"direct\", \"docker\", \"auto\" or \"swarm\"")
            .map(|(m, _)| m)
            .unwrap_or(ExecutionMode::Direct);
    let image = image(&mut k, execution_mode);
    let memory_limit = k.size("memory_limit", 4 * 1024 * 1024, "\"512m\", \"1g\"");
    let max_job_time = k.whole_seconds("max_job_time", DEFAULTS.max_job_time);
    let heartbeat_timeout = if k.r.has(t, "heartbeat_timeout") {
        k.whole_seconds("heartbeat_timeout", pool_heartbeat)
    } else {
        pool_heartbeat
    };
    let hung_cpu = hung_cpu(&mut k);
    let program = program(&mut k, &worker_type, execution_mode, protocol);
    let env =
        k.r.get::<BTreeMap<String, String>>(t, "env", "a table of strings such as { JAVA_OPTS = \"-Xmx512m\" }")
            .map(|(e, _)| e)
            .unwrap_or_default();
    let user = container_user(&mut k, execution_mode);
    let max_jobs = max_jobs(&mut k);
    let max_memory = k.size("max_memory", 1024 * 1024, "\"512m\", \"2g\"");
    let placement = placement(&mut k, execution_mode);
    let line = k.r.line_of(t, "worker_type").or(t.line).unwrap_or(1);
    if k.r.problems.len() > before {
        return None;
    }
    Some(WorkerConfig {
        worker_type,
        count,
        execution_mode,
        image,
        memory_limit,
        max_job_time,
        heartbeat_timeout,
        hung_cpu,
        program,
        env,
        user,
        max_jobs,
        max_memory,
        placement,
        line: t.line.unwrap_or(line),
    })
}

/// `constraints`, `spread` and the CPU and memory figures Swarm places by;
/// only swarm entries have them.
fn placement(k: &mut Keys, mode: ExecutionMode) -> Placement {
    const KEYS: [&str; 5] = [
        "constraints",
        "spread",
        "cpu_limit",
        "memory_reservation",
        "cpu_reservation",
    ];
    if mode != ExecutionMode::Swarm {
        let set: Vec<&str> = KEYS.into_iter().filter(|key| k.r.has(k.t, key)).collect();
        for key in set {
            k.problem(key, "applies to execution_mode = \"swarm\" only".into());
        }
        return Placement::default();
    }
    let constraints = k.list("constraints").unwrap_or_default();
    for c in &constraints {
        let shaped = ["==", "!="].iter().any(|op| {
            c.split_once(op)
                .is_some_and(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty())
        });
        if !shaped {
            k.problem(
                "constraints",
                format!(
                    "`{c}` is not a Swarm constraint such as \"node.labels.clm == true\" (KEY == VALUE or KEY != VALUE)"
                ),
            );
        }
    }
    let cpus = |k: &mut Keys, key: &str| {
        let n =
            k.r.get::<f64>(k.t, key, "a number of CPUs such as 1.5")
                .map(|(n, _)| n)?;
        if n > 0.0 && n <= 1024.0 {
            Some(n)
        } else {
            k.problem(key, format!("must be more than 0 and at most 1024 CPUs, got {n}"));
            None
        }
    };
    Placement {
        constraints,
        spread: k.string("spread"),
        cpu_limit: cpus(k, "cpu_limit"),
        memory_reservation: k.size("memory_reservation", 4 * 1024 * 1024, "\"512m\", \"1g\""),
        cpu_reservation: cpus(k, "cpu_reservation"),
    }
}

/// `worker_type`: required, and a valid type name; empty when it is not
/// (the problem is recorded).
fn worker_type(k: &mut Keys) -> String {
    match k.string("worker_type") {
        Some(name) if valid_type_name(&name) => name,
        Some(name) => {
            k.problem(
                "worker_type",
                format!("`{name}` is not a valid type name (letters, digits, `_` and `-`)"),
            );
            String::new()
        }
        None if !k.r.has(k.t, "worker_type") => {
            k.r.problem(
                k.t,
                None,
                "worker_type",
                "missing; every [[workers]] entry needs a worker_type".into(),
            );
            String::new()
        }
        None => String::new(),
    }
}

/// `image`, which `execution_mode = "docker"` and `"swarm"` require.
fn image(k: &mut Keys, mode: ExecutionMode) -> Option<String> {
    let image = k.string("image");
    if mode.runs_images() && image.is_none() && !k.r.has(k.t, "image") {
        let word = if mode == ExecutionMode::Swarm {
            "swarm"
        } else {
            "docker"
        };
        k.r.problem(
            k.t,
            Some("execution_mode"),
            "image",
            format!("missing; execution_mode = \"{word}\" needs an image"),
        );
    }
    image
}

/// `max_jobs`: how many jobs a worker runs before it is replaced, at least 1.
fn max_jobs(k: &mut Keys) -> Option<u32> {
    k.r.get::<i64>(k.t, "max_jobs", "a whole number")
        .and_then(|(n, _)| match u32::try_from(n) {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                k.problem("max_jobs", format!("must be at least 1, got {n}"));
                None
            }
        })
}

/// `user`: `"auto"` (the supervisor's uid:gid), `"image"`, or a user as
/// Docker takes it (`"1000:1000"`, `"1000"`, `"worker"`, `"worker:staff"`).
fn container_user(k: &mut Keys, mode: ExecutionMode) -> ContainerUser {
    let Some(text) = k.string("user") else {
        return ContainerUser::Auto;
    };
    let user = match text.as_str() {
        "auto" => ContainerUser::Auto,
        "image" => ContainerUser::Image,
        u if valid_user(u) => ContainerUser::Given(u.to_string()),
        u => {
            let message = format!("`{u}` is not \"auto\", \"image\" or a user such as \"1000:1000\"");
            k.problem("user", message);
            return ContainerUser::Auto;
        }
    };
    if mode == ExecutionMode::Direct && user != ContainerUser::Auto {
        k.problem(
            "user",
            "applies to containers; direct workers run as the user who ran `start`".into(),
        );
    }
    user
}

fn valid_user(u: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    match u.split_once(':') {
        Some((user, group)) => part(user) && part(group),
        None => part(u),
    }
}

/// The optional zero-CPU rule.
fn hung_cpu(k: &mut Keys) -> Option<HungCpu> {
    let window = k.r.get::<Dur>(k.t, "hung_cpu_window", DURATION).map(|(d, _)| d.0);
    let percent =
        k.r.get::<f64>(k.t, "hung_cpu_percent", "a number of percent such as 1.0")
            .map(|(p, _)| p);
    match (window, percent) {
        (None, None) => None,
        (None, Some(_)) => {
            k.r.problem(
                k.t,
                Some("hung_cpu_percent"),
                "hung_cpu_window",
                "missing; hung_cpu_percent needs a hung_cpu_window".into(),
            );
            None
        }
        (Some(window), percent) => {
            let percent = percent.unwrap_or(DEFAULTS.hung_cpu_percent);
            if window.is_zero() {
                k.problem("hung_cpu_window", "must be greater than 0".into());
            }
            if !(0.0..=100.0).contains(&percent) {
                k.problem("hung_cpu_percent", format!("must be between 0 and 100, got {percent}"));
            }
            Some(HungCpu { window, percent })
        }
    }
}

/// `command`, `job_command`, or the protocol's default program.
fn program(k: &mut Keys, worker_type: &str, mode: ExecutionMode, protocol: Option<Protocol>) -> WorkerProgram {
    let command = k.list("command");
    let job_command = k.list("job_command");
    for (key, cmd) in [("command", &command), ("job_command", &job_command)] {
        if let Some(cmd) = cmd
            && (cmd.is_empty() || cmd[0].is_empty())
        {
            k.problem(
                key,
                "must name a program: a non-empty list like [\"prog\", \"arg\"]".into(),
            );
            return WorkerProgram::Default;
        }
    }
    match (command, job_command) {
        (Some(_), Some(_)) => {
            k.problem(
                "job_command",
                "`command` and `job_command` exclude each other; keep one".into(),
            );
            WorkerProgram::Default
        }
        (Some(c), None) => WorkerProgram::Command(c),
        (None, Some(c)) => {
            no_placeholders_in_scripts(k, &c);
            WorkerProgram::JobCommand(c)
        }
        (None, None) => {
            // With `protocol` unset the database decides later, so a type
            // either protocol knows will do for now.
            let one;
            let protocols: &[Protocol] = match protocol {
                Some(p) => {
                    one = [p];
                    &one
                }
                None => Protocol::ALL,
            };
            let known = protocols.iter().any(|p| p.default_command(worker_type).is_some());
            if !known && !mode.runs_images() && !worker_type.is_empty() {
                k.r.problem(
                    k.t,
                    Some("worker_type"),
                    "command",
                    missing_command_message(worker_type, protocols),
                );
            }
            WorkerProgram::Default
        }
    }
}

/// A placeholder inside a shell script is pasted into the script unquoted:
/// a file named `$(rm -rf ~)` would run. The script must read the
/// variables instead, quoted.
fn no_placeholders_in_scripts(k: &mut Keys, command: &[String]) {
    const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "busybox"];
    let is_shell = Path::new(&command[0])
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| SHELLS.contains(&n));
    let Some(script_at) = command.iter().position(|a| a == "-c").filter(|_| is_shell) else {
        return;
    };
    let first = command[script_at + 1..]
        .iter()
        .find_map(|a| crate::contract::placeholders::used_in(a).first().copied());
    if let Some(first) = first {
        let var = match first {
            "input" => job_env::INPUT_FILE,
            "output" => job_env::OUTPUT_FILE,
            "payload" => job_env::PAYLOAD,
            "payload_file" => job_env::PAYLOAD_FILE,
            _ => job_env::JOB_ID,
        };
        k.problem(
            "job_command",
            format!(
                "{{{first}}} inside a shell script would be pasted into the script unquoted (a file name could run commands); \
                 write \"${var}\" in the script instead (the variables: $CLX_INPUT_FILE, $CLX_OUTPUT_FILE, $CLX_PAYLOAD, $CLX_PAYLOAD_FILE, $CLX_JOB_ID)"
            ),
        );
    }
}

pub(super) fn missing_command_message(worker_type: &str, protocols: &[Protocol]) -> String {
    let known: Vec<String> = protocols.iter().map(|p| format!("{p}: {}", p.type_names())).collect();
    format!(
        "missing; `{worker_type}` is not a known type ({}), so it needs `command` or `job_command`",
        known.join("; ")
    )
}

fn valid_type_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
