//! Every default of `pool.toml` in one table, and the keys each table
//! knows (for unknown-key messages and `CLX_POOL_*` overrides). The
//! reference in docs/config.md lists the same keys (a test holds them
//! together).

use std::time::Duration;

/// The defaults of `[pool]` and `[[workers]]` keys.
pub struct Defaults {
    pub db_path: &'static str,
    pub workspace_path: &'static str,
    pub log_level: &'static str,
    pub check_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub stop_timeout: Duration,
    pub startup_timeout: Duration,
    pub network: &'static str,
    pub log_max_size: u64,
    pub log_keep: u32,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    pub healthy_after: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub restart_cooldown: Duration,
    pub events_keep: u32,
    pub events_max_age: Duration,
    pub count: u32,
    pub max_job_time: Duration,
    pub hung_cpu_percent: f64,
    pub health_window: Duration,
    pub health_failure_rate: f64,
}

pub const DEFAULTS: Defaults = Defaults {
    db_path: "jobs.db",
    workspace_path: "workspace",
    log_level: "info",
    check_interval: Duration::from_secs(2),
    heartbeat_timeout: Duration::from_secs(30),
    stop_timeout: Duration::from_secs(10),
    startup_timeout: Duration::from_secs(30),
    network: "clx_app-network",
    log_max_size: 10 * 1024 * 1024,
    log_keep: 3,
    restart_backoff: Duration::from_millis(500),
    restart_backoff_max: Duration::from_secs(60),
    healthy_after: Duration::from_secs(10),
    restart_limit: 5,
    restart_window: Duration::from_secs(10),
    restart_cooldown: Duration::from_secs(60),
    events_keep: 10_000,
    events_max_age: Duration::from_secs(30 * 24 * 3600),
    count: 1,
    max_job_time: Duration::from_secs(600),
    hung_cpu_percent: 1.0,
    health_window: Duration::from_secs(300),
    health_failure_rate: 0.2,
};

/// What `inherit_env = false` keeps: nothing secret, only what programs
/// need to find themselves and speak the user's language.
pub const BASIC_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
];

/// The keys of `[pool]`; each may be overridden by `CLX_POOL_<KEY>`.
pub const POOL_KEYS: &[&str] = &[
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
    "data_dir",
    "cache_db_path",
    "api_listen",
    "api_token_file",
    "on_event",
    "metrics_listen",
    "api_advertise",
    "api_insecure_http",
    "api_tls_cert",
    "api_tls_key",
    "api_tls_ca",
    "health_window",
    "health_failure_rate",
];

/// The keys of `[swarm]`.
pub const SWARM_KEYS: &[&str] = &["docker_host", "files"];

/// The keys of a `[[workers]]` entry.
pub const WORKER_KEYS: &[&str] = &[
    "worker_type",
    "count",
    "execution_mode",
    "image",
    "memory_limit",
    "max_job_time",
    "heartbeat_timeout",
    "hung_cpu_window",
    "hung_cpu_percent",
    "command",
    "job_command",
    "env",
    "user",
    "max_jobs",
    "max_memory",
    "constraints",
    "spread",
    "cpu_limit",
    "memory_reservation",
    "cpu_reservation",
];

/// The top-level tables.
pub const ROOT_KEYS: &[&str] = &["pool", "workers", "swarm"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/config.md");
        for key in POOL_KEYS.iter().chain(WORKER_KEYS) {
            assert!(doc.contains(&format!("| `{key}` |")), "docs/config.md lacks `{key}`");
        }
    }
}
