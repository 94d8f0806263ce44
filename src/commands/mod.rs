//! The subcommands other than `start` and `worker`, one file each, and how
//! every command finds its database.

pub mod check;
pub mod colour;
pub mod completions;
pub mod control;
pub mod init;
pub mod jobs;
pub mod logs;
pub mod progress;
#[cfg(test)]
mod renderings;
pub mod stats;
pub mod stop;
pub mod submit;
pub mod top;
pub mod wait;

use std::path::PathBuf;

use crate::UsageError;
use crate::cli::{Command, DbArgs};
use crate::config::Config;
use crate::contract::control::Request;
use crate::contract::exit;

/// Runs one of the subcommands this module owns, by family; `start`,
/// `worker` and `guard` never come here.
pub async fn run(cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Stop { .. } | Command::Scale { .. } | Command::Restart { .. } | Command::Reload { .. } => {
            supervisor_command(cmd).await
        }
        Command::Stats { .. } | Command::Top { .. } | Command::Logs { .. } => observing_command(cmd).await,
        Command::Submit { .. } | Command::Wait { .. } | Command::Jobs { .. } => jobs_command(cmd).await,
        Command::Check { config } => check::run(config).await,
        Command::Init {
            config,
            force,
            clm,
            python,
        } => {
            init::run(init::Options {
                config,
                force: *force,
                clm: clm.as_deref(),
                python: python.as_deref(),
            })
            .await
        }
        Command::Completions { shell } => completions::run(*shell),
        Command::CompleteTypes { db, slots, suffix } => Ok(completions::values(db, *slots, suffix)),
        Command::Man { out } => man_pages(out),
        Command::Start { .. } | Command::Worker(_) | Command::Guard { .. } => {
            unreachable!("handled by lib::dispatch")
        }
    }
}

/// Runs a command that tells the running supervisor what to do: `stop`,
/// `scale`, `restart`, `reload`.
async fn supervisor_command(cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Stop { db, timeout } => stop::run(db, *timeout).await,
        Command::Scale {
            db,
            counts,
            now,
            timeout,
        } => {
            let request = Request::Scale {
                counts: counts.clone(),
                now: *now,
            };
            control::run(db, request, *timeout).await
        }
        Command::Restart {
            db,
            targets,
            rolling,
            now,
            timeout,
        } => {
            let request = Request::Restart {
                targets: targets.clone(),
                rolling: *rolling,
                now: *now,
            };
            control::run(db, request, *timeout).await
        }
        Command::Reload { db, timeout } => control::run(db, Request::Reload, *timeout).await,
        _ => unreachable!("commands::run sends only supervisor commands here"),
    }
}

/// Runs a command that only looks at the pool: `stats`, `top`, `logs`.
async fn observing_command(cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Stats {
            db,
            json,
            watch,
            events,
            workers,
            check,
            prometheus,
        } => {
            if *prometheus {
                return stats::prometheus(db).await;
            }
            let options = stats::Options {
                json: *json,
                watch: *watch,
                events: *events,
                workers: *workers,
                check: *check,
            };
            stats::run(db, options).await
        }
        Command::Top { db } => top::run(db).await,
        Command::Logs {
            db,
            targets,
            follow,
            lines,
            since,
            log_dir,
        } => {
            let options = logs::Options {
                targets: targets.clone(),
                follow: *follow,
                lines: *lines,
                since: *since,
                log_dir: log_dir.clone(),
            };
            logs::run(db, options).await
        }
        _ => unreachable!("commands::run sends only observing commands here"),
    }
}

/// Runs a command about the queue: `submit`, `wait`, `jobs`.
async fn jobs_command(cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
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
            allow_unserved,
            wait,
            timeout,
        } => {
            let id = submit::run(submit::Submit {
                allow_unserved: *allow_unserved,
                db,
                job_type,
                input,
                output,
                payload,
                priority: *priority,
                max_attempts: *max_attempts,
                content_hash: content_hash.as_deref(),
                workspace: workspace.as_deref(),
            })?;
            if *wait {
                wait::run(db, wait::Until::Jobs(vec![id]), *timeout).await
            } else {
                Ok(exit::OK)
            }
        }
        Command::Wait {
            db,
            ready,
            drained: _,
            jobs,
            all,
            timeout,
        } => wait::run(db, wait_until(*ready, jobs, *all), *timeout).await,
        Command::Jobs { action, list } => jobs::run(action.as_ref(), list),
        _ => unreachable!("commands::run sends only job commands here"),
    }
}

/// What `wait` waits for: `--ready`, else `--jobs`, else `--drained`.
fn wait_until(ready: bool, jobs: &[i64], all: bool) -> wait::Until {
    if ready {
        wait::Until::Ready
    } else if !jobs.is_empty() {
        wait::Until::Jobs(jobs.to_vec())
    } else {
        wait::Until::Drained { all }
    }
}

/// `man`: writes the man pages into `out`, creating it if needed.
fn man_pages(out: &std::path::Path) -> anyhow::Result<i32> {
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, out).map_err(|e| anyhow::anyhow!("writing man pages to {}: {e}", out.display()))?;
    print(&format!("man pages written to {}", out.display()));
    Ok(exit::OK)
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`)
/// is not an error: the command ends quietly with exit code 0.
pub fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(exit::FAILURE);
    }
}

/// The database a command works on, and the config if one was named.
pub struct Target {
    pub db_path: PathBuf,
    pub config: Option<Config>,
}

impl Target {
    /// The job types served: the config's entries when one was named, else
    /// those the database's pool and live workers serve
    /// (`db::slots::served_types`; none without a database).
    pub fn served_types(&self, conn: Option<&rusqlite::Connection>) -> rusqlite::Result<Vec<String>> {
        match (&self.config, conn) {
            (Some(c), _) => Ok(c.workers.iter().map(|w| w.worker_type.clone()).collect()),
            (None, Some(conn)) => crate::db::slots::served_types(conn),
            (None, None) => Ok(Vec::new()),
        }
    }
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
