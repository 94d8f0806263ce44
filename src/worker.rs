//! `clx-pool worker`: the built-in worker. It speaks the worker protocol of
//! the database it is given (CLX, SPEC §4, or CLM, SPEC §7) itself and runs
//! a command once per job, so any command-line converter becomes a worker.
//! It registers (or activates the row its supervisor pre-registered),
//! claims jobs atomically, keeps its heartbeat fresh while idle (at
//! `--heartbeat-interval`, not on every poll), stops when its row is gone,
//! and on SIGTERM gives its current job back, marks itself dead (CLX) or
//! removes its row (CLM, as CLM's workers do) and exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::Connection;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::db::{self, jobs};
use crate::vocab::{Protocol, WorkerStatus};

pub struct WorkerOptions {
    pub job_command: Vec<String>,
    /// Complete jobs without running anything (benchmarks of the queue).
    pub no_command: bool,
    pub heartbeat_interval: Duration,
    pub poll_interval: Duration,
    /// `direct` or `docker`.
    pub execution_mode: String,
}

/// How much of a failed command's stderr goes into the job's `error`.
const ERROR_TAIL: usize = 2000;

struct Identity {
    worker_type: String,
    worker_id: String,
    db_path: PathBuf,
    workspace: PathBuf,
    /// The row the supervisor pre-registered (`CLM_WORKER_ID`).
    preregistered: Option<i64>,
}

fn identity() -> anyhow::Result<Identity> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let worker_type = var("WORKER_TYPE")
        .context("WORKER_TYPE is not set (the supervisor sets it; set it by hand to run a worker yourself)")?;
    let worker_id = var("WORKER_ID")
        .or_else(|| var("HOSTNAME"))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .context("neither WORKER_ID nor HOSTNAME is set")?;
    let db_path = PathBuf::from(
        var("CLM_JOBS_DB_PATH")
            .or_else(|| var("DB_PATH"))
            .context("neither CLM_JOBS_DB_PATH (CLM) nor DB_PATH (CLX) is set")?,
    );
    let workspace = PathBuf::from(var("WORKSPACE_PATH").unwrap_or_else(|| ".".into()));
    let preregistered = match var("CLM_WORKER_ID") {
        None => None,
        Some(v) => Some(
            v.parse()
                .with_context(|| format!("CLM_WORKER_ID is not a row id: {v}"))?,
        ),
    };
    Ok(Identity {
        worker_type,
        worker_id,
        db_path,
        workspace,
        preregistered,
    })
}

/// How long a worker waits for the row its supervisor pre-registered to
/// become visible (CLM's workers wait as long).
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Registers, or activates the pre-registered row; returns the row id.
async fn register(conn: &Connection, protocol: Protocol, me: &Identity) -> anyhow::Result<i64> {
    let Some(row) = me.preregistered else {
        let row = db::workers::register(conn, protocol, &me.worker_type, &me.worker_id)
            .with_context(|| format!("registering worker {} in {}", me.worker_id, me.db_path.display()))?;
        info!(worker = %me.worker_id, row, worker_type = %me.worker_type, %protocol, "registered");
        return Ok(row);
    };
    let deadline = Instant::now() + ACTIVATION_TIMEOUT;
    loop {
        match db::workers::activate(conn, row) {
            Ok(true) => {
                info!(worker = %me.worker_id, row, worker_type = %me.worker_type, %protocol, "activated the pre-registered row");
                return Ok(row);
            }
            Ok(false) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(false) => bail!(
                "the pre-registered worker row {row} (CLM_WORKER_ID) is not in {}",
                me.db_path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("activating worker row {row}")),
        }
    }
}

pub async fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    if opts.job_command.is_empty() && !opts.no_command {
        bail!("no job command given: run `clx-pool worker -- COMMAND [ARGS...]`");
    }
    let me = identity()?;
    let (mut conn, protocol) = db::open_existing(&me.db_path)?;
    let row = register(&conn, protocol, &me).await?;
    let claimant = jobs::Claimant {
        protocol,
        worker_row: row,
        execution_mode: &opts.execution_mode,
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut last_heartbeat = Instant::now();
    // `PRAGMA data_version` changes only when another connection commits:
    // while it stands still, nothing new can have been queued.
    let mut nothing_since: Option<i64> = None;
    let mut stopping = false;
    while !stopping {
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if nothing_since != Some(version) {
            match jobs::claim(&mut conn, &me.worker_type, claimant)? {
                Some(job) if opts.no_command => {
                    jobs::finish(&mut conn, &job, row, jobs::Outcome::Completed, 0.0)?;
                    nothing_since = None;
                    continue;
                }
                Some(job) => {
                    stopping = run_job(&mut conn, &me, row, &job, &opts.job_command, &mut sigterm, &mut sigint).await?;
                    last_heartbeat = Instant::now();
                    nothing_since = None;
                    continue;
                }
                None => nothing_since = Some(version),
            }
        }
        if last_heartbeat.elapsed() >= opts.heartbeat_interval {
            if !db::workers::heartbeat(&conn, row)? {
                info!(worker = %me.worker_id, row, "my worker row is gone (deregistered): stopping");
                return Ok(());
            }
            last_heartbeat = Instant::now();
        }
        tokio::select! {
            biased;
            _ = sigterm.recv() => stopping = true,
            _ = sigint.recv() => stopping = true,
            _ = tokio::time::sleep(opts.poll_interval) => {}
        }
    }
    match protocol {
        Protocol::Clx => db::workers::set_status(&conn, row, WorkerStatus::Dead)?,
        Protocol::Clm => db::workers::deregister(&conn, row)?,
    }
    info!(worker = %me.worker_id, "stopped");
    Ok(())
}

fn resolve(workspace: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace.join(p)
    }
}

/// Runs one job. Returns true if the worker was asked to stop meanwhile (the
/// job has then been given back).
async fn run_job(
    conn: &mut Connection,
    me: &Identity,
    row: i64,
    job: &jobs::ClaimedJob,
    command: &[String],
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let input = resolve(&me.workspace, &job.input_file);
    let output = resolve(&me.workspace, &job.output_file);
    if let Some(dir) = output.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    info!(job = job.id, attempt = job.attempt, input = %input.display(), "job started");
    let argv = expand(command, &input, &output, job);
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("CLX_INPUT_FILE", &input)
        .env("CLX_OUTPUT_FILE", &output)
        .env("CLX_PAYLOAD", &job.payload)
        .env("CLX_JOB_ID", job.id.to_string())
        .env("CLX_JOB_TYPE", &me.worker_type)
        .current_dir(&me.workspace)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group: a stop signal for the worker does not reach the
        // command, so the worker alone decides what becomes of the job.
        .process_group(0);
    // SAFETY: runs in the forked child before exec and only makes the
    // async-signal-safe prctl and getppid syscalls.
    let me = std::process::id() as i32;
    unsafe {
        cmd.pre_exec(move || {
            // The command dies with the worker, even if the worker is SIGKILLed.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The worker may have died before prctl took effect.
            if nix::unistd::getppid().as_raw() != me {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("could not run `{}`: {e}", command[0]);
            warn!(job = job.id, "{msg}");
            jobs::finish(
                conn,
                job,
                row,
                jobs::Outcome::Failed(&msg),
                started.elapsed().as_secs_f64(),
            )?;
            return Ok(false);
        }
    };
    let pgid = child.id();
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let collect = async move {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        let mut out = tokio::io::stderr();
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = out.write_all(&buf[..n]).await;
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * ERROR_TAIL {
                        tail.drain(..tail.len() - ERROR_TAIL);
                    }
                }
            }
        }
        tail
    };
    let result = tokio::select! {
        biased;
        _ = sigterm.recv() => None,
        _ = sigint.recv() => None,
        r = async { let tail = collect.await; (child.wait().await, tail) } => Some(r),
    };
    let kill_group = |_: &tokio::process::Child| {
        if let Some(pgid) = pgid {
            let _ = crate::procs::signal_group(pgid as i32, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let Some((status, tail)) = result else {
        kill_group(&child);
        let _ = child.wait().await;
        if db::workers::status(conn, row)? == Some(WorkerStatus::Hung) {
            // The supervisor declared this worker hung: the attempt counts,
            // and the supervisor puts the job back (or fails it).
            info!(job = job.id, "stopped as hung: leaving the job to the supervisor");
        } else {
            jobs::give_back(conn, job, row)?;
            info!(job = job.id, "asked to stop: gave the job back to the queue");
        }
        return Ok(true);
    };
    let seconds = started.elapsed().as_secs_f64();
    // Whatever the command left running in the background goes too.
    kill_group(&child);
    let failure = match status {
        Ok(s) if s.success() => {
            if output.exists() {
                None
            } else {
                Some(format!(
                    "`{}` exited 0 but did not write {}",
                    command[0],
                    output.display()
                ))
            }
        }
        Ok(s) => {
            let text = String::from_utf8_lossy(&tail);
            let text = text.trim();
            let text = last_chars(text, ERROR_TAIL);
            let what = match s.code() {
                Some(c) => format!("exited with code {c}"),
                None => format!("was killed ({s})"),
            };
            Some(if text.is_empty() {
                format!("`{}` {what}", command[0])
            } else {
                format!("`{}` {what}: {text}", command[0])
            })
        }
        Err(e) => Some(format!("waiting for `{}`: {e}", command[0])),
    };
    let outcome = match &failure {
        None => jobs::Outcome::Completed,
        Some(e) => jobs::Outcome::Failed(e),
    };
    if !jobs::finish(conn, job, row, outcome, seconds)? {
        warn!(
            job = job.id,
            "the job was taken from this worker meanwhile; its result was not recorded"
        );
    } else if let Some(e) = failure {
        warn!(job = job.id, "job failed: {e}");
    } else {
        info!(job = job.id, seconds, "job completed");
    }
    Ok(false)
}

/// The last `n` bytes of `s`, moved forward to a character boundary.
fn last_chars(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Fills the placeholders `{input}`, `{output}`, `{payload}` and `{job_id}`
/// in the command's arguments, so simple converters need no shell:
/// `["cp", "{input}", "{output}"]`.
fn expand(command: &[String], input: &Path, output: &Path, job: &jobs::ClaimedJob) -> Vec<String> {
    command
        .iter()
        .map(|arg| {
            if !arg.contains('{') {
                return arg.clone();
            }
            arg.replace("{input}", &input.to_string_lossy())
                .replace("{output}", &output.to_string_lossy())
                .replace("{payload}", &job.payload)
                .replace("{job_id}", &job.id.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_other_braces_kept() {
        let job = jobs::ClaimedJob {
            id: 7,
            input_file: "a".into(),
            output_file: "b".into(),
            content_hash: "h".into(),
            payload: "{\"k\": 1}".into(),
            attempt: 1,
        };
        let cmd: Vec<String> = [
            "conv",
            "--in={input}",
            "{output}",
            "{job_id}",
            "{payload}",
            "awk '{print}'",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand(&cmd, Path::new("/w/a"), Path::new("/w/b"), &job);
        assert_eq!(
            out,
            vec!["conv", "--in=/w/a", "/w/b", "7", "{\"k\": 1}", "awk '{print}'"]
        );
    }
}
