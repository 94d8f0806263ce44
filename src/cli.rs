//! Command-line definitions (clap) and nothing else.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::vocab::ModeKind;

#[derive(Debug, Parser)]
#[command(
    name = "clx-pool",
    version,
    about = "Pool supervisor for CLX workers",
    propagate_version = true
)]
pub struct Cli {
    /// Log level for clx-pool's own messages (trace, debug, info, warn, error); RUST_LOG overrides.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    #[arg(long, value_name = "FILE", env = "CLX_DB_PATH")]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start every pool of a config and supervise it in the foreground.
    Start {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the running supervisor to stop, and wait until it has.
    Stop {
        #[command(flatten)]
        db: DbArgs,
        /// How long to wait for the supervisor to exit.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Worker, job and supervisor status.
    Stats {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output (see docs/cli.md for the shape).
        #[arg(long)]
        json: bool,
        /// Refresh every INTERVAL until interrupted.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
        /// Also show the latest worker restarts and stops.
        #[arg(long)]
        events: bool,
    },
    /// Queue a job.
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
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        #[arg(long, default_value_t = 3)]
        max_attempts: i64,
        /// Use this content hash instead of hashing the input file.
        #[arg(long)]
        content_hash: Option<String>,
        /// Workspace the relative paths refer to (default: the config's, or the running pool's).
        #[arg(long)]
        workspace: Option<PathBuf>,
    },
    /// Block until the pool is ready or the queue is drained.
    Wait {
        #[command(flatten)]
        db: DbArgs,
        /// Until every worker of the running supervisor has registered.
        #[arg(long, conflicts_with = "drained", required_unless_present = "drained")]
        ready: bool,
        /// Until no job is pending or processing; fails if any job failed.
        #[arg(long)]
        drained: bool,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List jobs.
    Jobs {
        #[command(flatten)]
        db: DbArgs,
        /// Only jobs with this status (pending, processing, completed, failed).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Validate a config and the environment it needs, without starting anything.
    Check {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// The built-in worker: runs COMMAND once per job (started by `start` for `job_command` entries).
    Worker(WorkerArgs),
    /// Started by `start` beside the supervisor: cleans up if the supervisor dies without stopping its pool.
    #[command(hide = true)]
    Guard {
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// How often to refresh the heartbeat while idle.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How often to look for new jobs.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Where this worker runs (direct or docker); under CLM it takes only
    /// jobs meant for that mode (or for any).
    #[arg(long, default_value_t = ModeKind::Direct, value_parser = parse_mode_kind)]
    pub execution_mode: ModeKind,
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
