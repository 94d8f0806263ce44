//! The subcommands other than `start` and `worker`, one file each, and how
//! every command finds its database.

pub mod check;
pub mod jobs;
pub mod stats;
pub mod stop;
pub mod submit;
pub mod wait;

use std::path::PathBuf;

use crate::UsageError;
use crate::cli::{Command, DbArgs};
use crate::config::Config;

pub async fn run(cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Stop { db, timeout } => stop::run(db, *timeout).await,
        Command::Stats {
            db,
            json,
            watch,
            events,
        } => stats::run(db, *json, *watch, *events).await,
        Command::Submit {
            db,
            job_type,
            input,
            output,
            payload,
            priority,
            max_attempts,
            content_hash,
            workspace,
        } => submit::run(submit::Submit {
            db,
            job_type,
            input,
            output,
            payload,
            priority: *priority,
            max_attempts: *max_attempts,
            content_hash: content_hash.as_deref(),
            workspace: workspace.as_deref(),
        }),
        Command::Wait { db, ready, timeout, .. } => wait::run(db, *ready, *timeout).await,
        Command::Jobs {
            db,
            status,
            limit,
            json,
        } => jobs::run(db, status.as_deref(), *limit, *json),
        Command::Check { config } => check::run(config).await,
        Command::Start { .. } | Command::Worker(_) | Command::Guard { .. } => {
            unreachable!("handled by lib::dispatch")
        }
    }
}

/// The pid of the supervisor running for `db`: from its pid file, or else
/// from its record in the database (checked against the process's start
/// time, so a reused pid is never taken for it).
pub fn supervisor_pid(db: &std::path::Path) -> Option<i32> {
    let running = crate::lock::running_supervisor(db)?;
    if let Some(pid) = running.pid {
        return Some(pid);
    }
    let (conn, _) = crate::db::open_read_only(db).ok()??;
    let record = crate::db::pool::supervisor(&conn).ok()??;
    let pid = record.pid as i32;
    (crate::procs::start_ticks(pid).is_some() && crate::procs::start_ticks(pid) == record.proc_start).then_some(pid)
}

/// The database a command works on, and the config if one was named.
pub struct Target {
    pub db_path: PathBuf,
    pub config: Option<Config>,
}

/// `--config` wins over `--db`, which wins over CLX_DB_PATH (clap folds the
/// variable into `--db`).
pub fn target(args: &DbArgs) -> anyhow::Result<Target> {
    if let Some(path) = &args.config {
        let config = Config::load(path)?;
        return Ok(Target {
            db_path: config.pool.db_path.clone(),
            config: Some(config),
        });
    }
    if let Some(db) = &args.db {
        let db_path = crate::config::real_path(crate::config::normalize(&std::path::absolute(db)?));
        return Ok(Target { db_path, config: None });
    }
    Err(UsageError(
        "which pool? name its config with --config FILE, its database with --db FILE, or set CLX_DB_PATH".into(),
    )
    .into())
}
