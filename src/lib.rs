//! clx-pool: a pool supervisor for CLX workers. `run` dispatches a parsed
//! command line and turns errors into one clear message and an exit code
//! (0 ok, 1 runtime failure, 2 usage or config error).

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod contract;
pub mod db;
pub mod executor;
pub mod files;
#[cfg(test)]
mod layering;
pub mod listen;
pub mod lock;
pub mod logs;
pub mod procs;
pub mod status;
pub mod stderr;
pub mod supervisor;
pub mod takeover;
pub mod vocab;
pub mod worker;

use cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

/// An error in what the user asked for (exit code 2), as opposed to a
/// failure while doing it (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs one command and returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    // One thread runs every command, the supervisor included: its work is
    // waiting, and children spawned from the main thread keep their
    // parent-death signal armed for the supervisor's whole life (Linux
    // fires it when the spawning *thread* exits). Database calls go to a
    // small blocking pool; they share one connection, so more threads
    // would only queue on its lock.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            stderr::line(&format!("error: cannot start the async runtime: {e}"));
            return contract::exit::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Don't wait for leftover blocking tasks (a stats --watch sleeping, …).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<config::ConfigError>() {
                stderr::line(&format!("error: {c}"));
                contract::exit::USAGE
            } else if let Some(u) = e.downcast_ref::<UsageError>() {
                stderr::line(&format!("error: {u}"));
                contract::exit::USAGE
            } else if let Some(r) = e.downcast_ref::<db::Refused>() {
                stderr::line(&format!("error: {r}"));
                contract::exit::USAGE
            } else if let Some(n) = e.downcast_ref::<db::NoDatabase>() {
                stderr::line(&format!("error: {n}"));
                contract::exit::USAGE
            } else if let Some(d) = e.downcast_ref::<worker::DatabaseUnavailable>() {
                stderr::line(&format!("error: {d}"));
                contract::exit::DATABASE_UNAVAILABLE
            } else {
                stderr::line(&format!("error: {e:#}"));
                contract::exit::FAILURE
            }
        }
    }
}

fn init_logging(cli: &Cli, default_level: &str) {
    let level = match (cli.verbose, &cli.log_level) {
        (0, Some(l)) => l.to_ascii_lowercase(),
        (0, None) => default_level.to_ascii_lowercase(),
        (1, _) => "debug".into(),
        _ => "trace".into(),
    };
    let level = match level.as_str() {
        "warning" => "warn".to_string(),
        "critical" => "error".to_string(),
        _ => level,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    if let Err(e) = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr::Stderr)
        .with_ansi(commands::colour::enabled_on_stderr())
        .log_internal_errors(false)
        .try_init()
    {
        stderr::line(&format!("warning: logging is not set up: {e}"));
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    commands::colour::set(cli.color);
    match &cli.command {
        Command::Start { config } => {
            let cfg = config::Config::load(config)?;
            init_logging(&cli, &cfg.pool.log_level);
            supervisor::run(cfg).await?;
            Ok(contract::exit::OK)
        }
        Command::Worker(args) => {
            let level = std::env::var(contract::env::LOG_LEVEL).unwrap_or_else(|_| "info".into());
            init_logging(&cli, &level);
            worker::run(worker::WorkerOptions {
                job_command: args.job_command.clone(),
                no_command: args.no_command,
                heartbeat_interval: args.heartbeat_interval,
                poll_interval: args.poll_interval,
                execution_mode: args.execution_mode,
                max_jobs: args.max_jobs,
            })
            .await?;
            Ok(contract::exit::OK)
        }
        Command::Guard { db, run, swarm_host } => {
            init_logging(&cli, "info");
            supervisor::guard::run(db, run, swarm_host.as_deref()).await?;
            Ok(contract::exit::OK)
        }
        other => {
            init_logging(&cli, "warn");
            commands::run(other).await
        }
    }
}
