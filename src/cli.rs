//! Command-line definitions (clap) and nothing else.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::vocab::{JobStatus, ModeKind};

const AFTER_HELP: &str = "\
Examples:
  clx-pool start --config pool.toml &          # supervise in the background
  clx-pool wait --ready --config pool.toml     # until every worker registered
  id=$(clx-pool submit --config pool.toml upper in.txt out.txt)
  clx-pool wait --jobs \"$id\" --config pool.toml
  clx-pool stats --check --config pool.toml    # 0 healthy, 1 degraded, 2 down
  clx-pool stop --config pool.toml

Every command but start and check finds the database from --config, --db or CLX_DB_PATH.

Exit codes:
  0  success
  1  failure: a timeout, a failed or cancelled job, a supervisor already running, a degraded pool (stats --check)
  2  usage or configuration error, a refused database; a pool that is down (stats --check)
  75 the built-in worker cannot reach its database (EX_TEMPFAIL)";

const WAIT_HELP: &str = "\
Exit codes: 0 the condition holds; 1 timed out, a job failed or was cancelled (--jobs), a job of the run failed (--drained), a slot was given up (--ready); 2 usage error or an unknown job id.
On a terminal a progress bar shows counts and an ETA on stderr; on a pipe nothing but the result is printed.";

const INIT_HELP: &str = "\
Examples:
  clx-pool init                          # built-in workers (cp, tr) to start from
  clx-pool init --clm course/            # CLM's workers for `clm build` of that course
Exit codes: 0 written; 2 the file exists (without --force), COURSE_OR_DB not found, no CLM in the Python looked at.";

#[derive(Debug, Parser)]
#[command(
    name = "clx-pool",
    version,
    about = "Pool supervisor for CLX workers",
    propagate_version = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Log level for clx-pool's own messages (trace, debug, info, warn, error); RUST_LOG overrides.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Colour in output: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the database is: `--config` (its db_path), `--db`, or CLX_DB_PATH.
#[derive(Debug, Args, Clone, Default)]
pub struct DbArgs {
    /// The pool's config file; its db_path names the database.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The database file.
    #[arg(long, value_name = "FILE", env = crate::contract::env::cli::DB_PATH)]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start every pool of a config and supervise it in the foreground.
    Start {
        /// The pool's config file (see docs/config.md).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the running supervisor to stop, and wait until it has.
    #[command(after_help = "Exit codes: 0 stopped (or nothing was running); 1 still running after --timeout.")]
    Stop {
        #[command(flatten)]
        db: DbArgs,
        /// How long to wait for the supervisor to exit.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Worker, job and supervisor status of the current run.
    #[command(after_help = "Exit codes: 0; with --check 0 healthy, 1 degraded, 2 down.")]
    Stats {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output (see docs/cli.md for the shape).
        #[arg(long)]
        json: bool,
        /// Refresh every INTERVAL (at least 200ms; default 2s) until interrupted.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
        /// Also show the latest worker restarts and stops, with each dead worker's last output.
        #[arg(long)]
        events: bool,
        /// Also show each live worker: pid or container, status, current job and its age, CPU, memory, jobs done.
        #[arg(long)]
        workers: bool,
        /// Judge the pool: exit 0 healthy, 1 degraded (slots waiting or given up, failed jobs this run), 2 down.
        #[arg(long, conflicts_with = "watch")]
        check: bool,
        /// Prometheus metrics (OpenMetrics text), as `metrics_listen` serves them; for node_exporter's textfile collector.
        #[arg(long, conflicts_with_all = ["watch", "check", "json"])]
        prometheus: bool,
    },
    /// Queue a job; prints its id.
    #[command(
        after_help = "Exit codes: 0 queued (with --wait: completed); 1 with --wait: failed, cancelled or timed out; 2 usage error."
    )]
    Submit {
        #[command(flatten)]
        db: DbArgs,
        /// The job type (the worker_type that will process it).
        job_type: String,
        /// Input file; relative paths are relative to the workspace.
        input: String,
        /// Output file; relative paths are relative to the workspace.
        output: String,
        /// JSON payload handed to the worker.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Higher runs first (default 0; negative allowed).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        /// How many times the job may be tried before it fails for good.
        #[arg(long, default_value_t = 3)]
        max_attempts: i64,
        /// Use this content hash instead of hashing the input file.
        #[arg(long)]
        content_hash: Option<String>,
        /// Workspace the relative paths refer to (default: the config's, or the running pool's).
        #[arg(long)]
        workspace: Option<PathBuf>,
        /// Queue it even if no worker serves its type (a pool that does may come later).
        #[arg(long)]
        allow_unserved: bool,
        /// Then wait until the job has finished (exit 0 completed, 1 failed or cancelled or timed out).
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
    },
    /// Block until the pool is ready, the queue is drained, or given jobs have finished.
    #[command(group = clap::ArgGroup::new("until").required(true), after_help = WAIT_HELP)]
    Wait {
        #[command(flatten)]
        db: DbArgs,
        /// Until every worker of the running supervisor has registered.
        #[arg(long, group = "until")]
        ready: bool,
        /// Until no job of the current run is pending or processing; fails if one of them failed.
        #[arg(long, group = "until")]
        drained: bool,
        /// Until these jobs (ids as `submit` prints them) have finished; fails if one failed or was cancelled.
        #[arg(long, group = "until", num_args = 1.., value_name = "ID")]
        jobs: Vec<i64>,
        /// With --drained: judge every job in the database, not only the current run's.
        #[arg(long, requires = "drained")]
        all: bool,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List, show, cancel, retry or prune jobs (`jobs` alone lists).
    #[command(args_conflicts_with_subcommands = true)]
    Jobs {
        #[command(subcommand)]
        action: Option<JobsAction>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Validate a config and the environment it needs, without starting anything.
    Check {
        /// The pool's config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Write a commented pool.toml for the case at hand (built-in workers, or `--clm` for a course author) and print what to run next.
    #[command(after_help = INIT_HELP)]
    Init {
        /// Where to write it.
        #[arg(long, short = 'c', value_name = "FILE", default_value = "pool.toml")]
        config: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
        /// A pool of CLM's workers for `clm build`: on the jobs database of a course folder, its spec file, or a jobs database (default: the current folder's project, as `clm build` finds it).
        #[arg(long, value_name = "COURSE_OR_DB", num_args = 0..=1, default_missing_value = ".")]
        clm: Option<PathBuf>,
        /// With --clm: the Python where CLM is installed (default: the one of `clm` on PATH, else $VIRTUAL_ENV/bin/python).
        #[arg(long, value_name = "PATH", requires = "clm")]
        python: Option<PathBuf>,
    },
    /// Change how many workers of types run: `scale upper=4 wordcount=1`.
    #[command(
        after_help = "Grows at once; shrinks by retiring idle workers first, busy ones after their current job (unless --now).\nExit codes: 0 done; 1 no supervisor, or it refused; 2 usage error."
    )]
    Scale {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE=N pairs (N from 0 to 10000, as `count`).
        #[arg(required = true, value_parser = parse_scale, value_name = "TYPE=N")]
        counts: Vec<(String, u32)>,
        /// Retire busy workers at once (their jobs go back to the queue).
        #[arg(long)]
        now: bool,
        /// How long to wait for the supervisor's answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Replace workers: all, a type's, or single slots (`TYPE-N`); revives given-up slots.
    #[command(
        after_help = "Busy workers finish their job first unless --now. With --rolling one slot at a time, each replacement registered before the next goes.\nExit codes: 0 replaced; 1 no supervisor, or a replacement did not register; 2 usage error."
    )]
    Restart {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE or TYPE-N; every worker when none.
        targets: Vec<String>,
        /// One at a time, so capacity never drops by more than one worker.
        #[arg(long)]
        rolling: bool,
        /// Do not wait for busy workers to finish their job.
        #[arg(long)]
        now: bool,
        /// How long to wait for the replacements (they go on after it).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Re-read the config and apply the difference (as SIGHUP does).
    #[command(
        after_help = "New entries start, removed ones stop after their jobs, count changes scale, changed entries are replaced one at a time; unchanged workers are not touched. An invalid config changes nothing.\nExit codes: 0 applied; 1 refused (every problem is printed) or no supervisor."
    )]
    Reload {
        #[command(flatten)]
        db: DbArgs,
        /// How long to wait for changed entries to be replaced (they go on after it).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// A live view: workers, pools, queue, throughput, events; r restarts the selected worker, +/- scale its type.
    Top {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show the workers' logs, interleaved by time: `logs upper-0 -f`.
    Logs {
        #[command(flatten)]
        db: DbArgs,
        /// TYPE or TYPE-N; every worker when none.
        targets: Vec<String>,
        /// Keep following (across rotations and restarts) until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Show the last N lines first.
        #[arg(short = 'n', long = "lines", default_value_t = 20, value_name = "N")]
        lines: usize,
        /// Only lines written within this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
        since: Option<Duration>,
        /// The log folder (default: the config's log_dir, or `logs` beside the database).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
    },
    /// Print a shell completion script: `clx-pool completions bash > /etc/bash_completion.d/clx-pool`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// For the completion scripts: the job types of the pool (its config's
    /// entries, else its database's), one per line; nothing on any error.
    #[command(hide = true, name = "complete-types")]
    CompleteTypes {
        #[command(flatten)]
        db: DbArgs,
        /// Also the slots (`TYPE-N`).
        #[arg(long)]
        slots: bool,
        /// Put this after each type (`=` for `scale`).
        #[arg(long, default_value = "")]
        suffix: String,
    },
    /// Write the man pages (clx-pool.1 and one per command) into a folder.
    Man {
        /// Where to write them.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
    },
    /// The built-in worker: runs COMMAND once per job (started by `start` for `job_command` entries).
    Worker(WorkerArgs),
    /// Started by `start` beside the supervisor: cleans up if the supervisor dies without stopping its pool.
    #[command(hide = true)]
    Guard {
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// The run it guards (`CLX_POOL_RUN` of that run's processes).
        #[arg(long, value_name = "RUN")]
        run: String,
        /// The swarm manager the run's swarm slots use.
        #[arg(long, value_name = "HOST")]
        swarm_host: Option<String>,
    },
}

/// Which jobs `jobs list` shows.
#[derive(Debug, Args, Clone, Default)]
pub struct ListArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Only jobs of this type.
    #[arg(long = "type", value_name = "TYPE")]
    pub job_type: Option<String>,
    /// Only jobs with these statuses (pending, processing, completed, failed, cancelled; comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_job_status, value_name = "STATUS")]
    pub status: Vec<JobStatus>,
    /// Only jobs created within this long (e.g. 1h).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    pub since: Option<Duration>,
    /// Show at most this many (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// Jobs, newest first (the default).
    List(ListArgs),
    /// One job in full: paths, payload, attempts, times, worker, error.
    Show {
        #[command(flatten)]
        db: DbArgs,
        /// The job's id.
        id: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Cancel pending or processing jobs (a built-in worker stops the running command).
    #[command(group = clap::ArgGroup::new("which").required(true).multiple(true).args(["ids", "job_type", "all"]))]
    Cancel {
        #[command(flatten)]
        db: DbArgs,
        /// The jobs to cancel.
        ids: Vec<i64>,
        /// Every pending or processing job of this type.
        #[arg(long = "type", value_name = "TYPE")]
        job_type: Option<String>,
        /// Every pending or processing job.
        #[arg(long)]
        all: bool,
    },
    /// Put failed or cancelled jobs back in the queue, with a fresh attempt budget.
    #[command(group = clap::ArgGroup::new("which").required(true).multiple(true).args(["ids", "job_type", "failed"]))]
    Retry {
        #[command(flatten)]
        db: DbArgs,
        /// The jobs to retry.
        ids: Vec<i64>,
        /// Every failed job of this type.
        #[arg(long = "type", value_name = "TYPE")]
        job_type: Option<String>,
        /// Every failed job.
        #[arg(long)]
        failed: bool,
    },
    /// Delete finished jobs (never pending or processing ones).
    Prune {
        #[command(flatten)]
        db: DbArgs,
        /// Only jobs that finished longer ago than this (e.g. 7d).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
        older_than: Duration,
        /// Which finished jobs (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = parse_job_status, default_value = "completed,failed,cancelled", value_name = "STATUS")]
        status: Vec<JobStatus>,
        /// Then give the freed space back to the file system (VACUUM).
        #[arg(long)]
        vacuum: bool,
    },
}

fn parse_scale(s: &str) -> Result<(String, u32), String> {
    let (t, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected TYPE=N, e.g. upper=4"))?;
    let n: u32 = n.parse().map_err(|_| format!("`{s}`: N must be a whole number"))?;
    if n > crate::config::MAX_COUNT {
        return Err(format!("`{s}`: N must be between 0 and {}", crate::config::MAX_COUNT));
    }
    if t.is_empty() {
        return Err(format!("`{s}`: the type is missing"));
    }
    Ok((t.to_string(), n))
}

fn parse_job_status(s: &str) -> Result<JobStatus, String> {
    s.parse().map_err(|e: crate::vocab::UnknownWord| e.to_string())
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// How often to refresh the heartbeat while idle.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How often to look for new jobs when changes to the database cannot be watched (inotify); with inotify an idle worker wakes on every commit, and looks at least once a second.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Where this worker runs (direct or docker); under CLM it takes only
    /// jobs meant for that mode (or for any).
    #[arg(long, default_value_t = ModeKind::Direct, value_parser = parse_mode_kind)]
    pub execution_mode: ModeKind,
    /// Leave (exit 0) after this many jobs, to be replaced (`max_jobs`).
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u32>,
    /// Benchmarking aid: complete every claimed job at once without running
    /// anything, to measure the queue alone.
    #[arg(long, hide = true)]
    pub no_command: bool,
    /// The command to run per job, with CLX_INPUT_FILE, CLX_OUTPUT_FILE, CLX_PAYLOAD and CLX_JOB_ID set.
    #[arg(last = true, required_unless_present = "no_command", value_name = "COMMAND")]
    pub job_command: Vec<String>,
}

fn parse_mode_kind(s: &str) -> Result<ModeKind, String> {
    s.parse().map_err(|e: crate::vocab::UnknownWord| e.to_string())
}

/// `--color`: when to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_and_command_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "clx-pool", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:?}");
    }
}
