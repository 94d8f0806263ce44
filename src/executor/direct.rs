//! Direct mode: a worker is a child process leading its own process group
//! (spawned with process-wrap), with stdout and stderr drained into its
//! log, killed by the kernel if the supervisor dies (parent-death signal),
//! stopped with SIGTERM to the group, SIGKILL after the grace time, then
//! checked until the group is empty. Its exit status comes from the one
//! reaper of the supervisor (`procs::reap`), never from a wait of its own.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use process_wrap::std::{ProcessGroup, StdCommandWrap};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::{Launch, Process};
use crate::config::{InheritEnv, WorkerProgram};
use crate::logs::{self, Tail};
use crate::procs;
use crate::vocab::{EndCause, ModeKind, WorkerId, WorkerRow};

pub struct DirectWorker {
    pub worker_id: WorkerId,
    pub process: Process,
    pub tail: Tail,
    pgid: i32,
    /// Its exit status, from the reaper.
    exited: oneshot::Receiver<WaitStatus>,
    exit: Option<EndCause>,
    /// Set once we send SIGKILL ourselves, so that exit is not blamed on OOM.
    killed_by_us: bool,
    /// The task copying its output to the log and the tail.
    drain: Option<tokio::task::JoinHandle<()>>,
    /// The built-in worker finishes its job on SIGUSR1; other workers are
    /// only told to stop once idle (SIGTERM to the group).
    builtin: bool,
}

/// How long the output of a worker that exited may take to be read to its
/// end (a process outside its group may hold the pipe open for longer).
const OUTPUT_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How long the output pipe may stay open after the worker's group is
/// gone before what else holds it is looked for.
const OUTPUT_SETTLES: Duration = Duration::from_millis(5);

pub fn launch(spec: &Launch) -> anyhow::Result<DirectWorker> {
    let worker_id = spec.worker_id.clone();
    let argv = argv(spec)?;
    let mut log = logs::open_worker_log(&spec.log_path, spec.log_max_size, spec.log_keep)?;
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the worker's output pipe")?;
    let mut cmd = command(spec, &argv, write_end)?;
    logs::mark(&mut log, &format!("starting worker {worker_id} ({})", argv.join(" ")));
    let spawned = cmd.spawn();
    // Close our copies of the pipe's write end, or the drain never sees EOF.
    drop(cmd);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            logs::mark(&mut log, &format!("could not start {}: {e}", argv[0]));
            return Err(anyhow::Error::new(e).context(format!("starting `{}`", argv[0])));
        }
    };
    let pid = child.id() as i32;
    // The reaper reports its exit; the wrapper is never waited on (and
    // never kills on drop: a reaped pid may be reused).
    let exited = procs::watch(pid);
    drop(child);
    let tail = Tail::default();
    let reader = pipe::Receiver::from_owned_fd(read_end).context("reading the worker's output pipe")?;
    let drain = tokio::spawn(logs::drain(reader, log, tail.clone()));
    Ok(DirectWorker {
        worker_id,
        process: Process {
            pid,
            start_ticks: procs::start_ticks(pid),
        },
        tail,
        pgid: pid,
        exited,
        exit: None,
        killed_by_us: false,
        drain: Some(drain),
        builtin: matches!(spec.program, WorkerProgram::JobCommand(_)),
    })
}

/// What runs: the configured command, or clx-pool itself as the built-in
/// worker.
fn argv(spec: &Launch) -> anyhow::Result<Vec<String>> {
    Ok(match &spec.program {
        WorkerProgram::Command(c) => c.clone(),
        WorkerProgram::JobCommand(c) => {
            let exe = std::env::current_exe().context("finding the clx-pool executable for the built-in worker")?;
            let mut argv = vec![exe.to_string_lossy().into_owned()];
            argv.extend(spec.builtin_worker_args(ModeKind::Direct, c));
            argv
        }
        WorkerProgram::Default => anyhow::bail!("no command to run worker type `{}` directly", spec.worker_type),
    })
}

/// The worker's command: its environment, working folder, output into the
/// pipe, its own process group, tied to the supervisor's life.
fn command(spec: &Launch, argv: &[String], output: OwnedFd) -> anyhow::Result<StdCommandWrap> {
    let db = spec.db_path.to_string_lossy();
    let workspace = spec.workspace.to_string_lossy();
    let env = spec.environment(&super::Seen {
        db_path: &db,
        workspace: &workspace,
        worker_id: Some(spec.worker_id.as_str()),
        tagged: true,
    });
    let stderr: OwnedFd = output.try_clone().context("duplicating the output pipe")?;
    let parent = std::process::id() as i32;
    let memory_limit = spec.memory_limit;
    let inherit = spec.inherit_env.clone();
    let mut cmd = StdCommandWrap::with_new(&argv[0], |c| {
        if inherit != InheritEnv::All {
            c.env_clear()
                .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(|k| inherit.passes(k))));
        }
        c.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(stderr));
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe syscalls (prctl, getppid, setrlimit); it
        // allocates nothing and takes no locks.
        unsafe {
            c.pre_exec(move || {
                // The worker dies with the supervisor, however the supervisor dies.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The supervisor may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() != parent {
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                if let Some(bytes) = memory_limit {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_DATA, bytes, bytes)?;
                }
                Ok(())
            });
        }
    });
    cmd.wrap(ProcessGroup::leader());
    Ok(cmd)
}

impl DirectWorker {
    /// Waits for the group leader (the worker itself) to exit, then kills
    /// what is left in its process group. Cancel-safe: the only await is the
    /// reaper's report.
    pub async fn wait(&mut self) -> EndCause {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let mut cause = match (&mut self.exited).await {
            Ok(status) => end_cause(status),
            Err(_) => EndCause::Unknown("its exit status was lost".into()),
        };
        if cause == EndCause::Signal(Signal::SIGKILL as i32)
            && !self.killed_by_us
            && procs::killed_by_oom(self.process.pid, self.process.start_ticks)
        {
            cause = EndCause::Oom;
        }
        self.exit = Some(cause.clone());
        self.signal(Signal::SIGKILL);
        // Its last words are in the pipe still: the tail that goes with
        // its end must have them.
        if let Some(mut drain) = self.drain.take()
            && tokio::time::timeout(OUTPUT_SETTLES, &mut drain).await.is_err()
        {
            // A process it started outside its group (a job command's
            // child) holds the pipe: it goes now rather than after the
            // wait, so the worker's job is not kept from the queue.
            self.sweep().await;
            if tokio::time::timeout(OUTPUT_AFTER_EXIT, drain).await.is_err() {
                tracing::debug!(worker = %self.worker_id, "its output pipe is still open after it exited");
            }
        }
        cause
    }

    /// Tells the worker to finish: the built-in worker after its current
    /// job (SIGUSR1 to it alone, so its job command is not touched), any
    /// other worker now (SIGTERM to its group; it is idle by then).
    pub fn finish(&self) {
        if self.exit.is_some() {
            return;
        }
        if self.builtin {
            if let Err(e) = procs::signal_process(self.process.pid, Signal::SIGUSR1) {
                tracing::warn!(worker = %self.worker_id, "telling the worker to finish: {e}");
            }
        } else {
            self.signal(Signal::SIGTERM);
        }
    }

    /// Signals the worker's process group; a group already gone is fine.
    fn signal(&self, sig: Signal) {
        if let Err(e) = procs::signal_group(self.pgid, sig) {
            tracing::warn!(worker = %self.worker_id, pgid = self.pgid, "sending {sig}: {e}");
        }
    }

    pub async fn stop(&mut self, grace: Duration) -> EndCause {
        if self.exit.is_none() {
            self.signal(Signal::SIGTERM);
            // A stopped (SIGSTOP) worker must run to see the SIGTERM.
            self.signal(Signal::SIGCONT);
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                tracing::warn!(
                    worker = %self.worker_id,
                    "worker did not exit within {} of SIGTERM; sending SIGKILL",
                    humantime::format_duration(grace)
                );
                self.killed_by_us = true;
                self.signal(Signal::SIGKILL);
            }
        }
        let cause = self.wait().await;
        if !procs::ensure_group_gone(self.pgid, Duration::from_secs(5)).await {
            tracing::error!(worker = %self.worker_id, pgid = self.pgid, "processes of the worker's group survived SIGKILL");
        }
        cause
    }

    /// Kills every process the worker started that is still alive outside
    /// its group (job commands in their own groups, `setsid` helpers).
    pub async fn sweep(&self) {
        let id = self.worker_id.clone();
        let n = procs::sweep(
            move || procs::find_worker_processes(id.as_str()),
            Duration::from_secs(5),
        )
        .await;
        if n > 0 {
            tracing::info!(worker = %self.worker_id, processes = n, "killed what the worker left running");
        }
    }
}

/// CPU seconds and resident bytes of each worker's process tree, read
/// from `/proc`; workers that are gone are left out. Blocking.
pub fn usage(pids: Vec<(WorkerRow, i32)>) -> HashMap<WorkerRow, (f64, u64)> {
    let hz = procs::clock_ticks_per_second() as f64;
    pids.into_iter()
        .filter_map(|(row, pid)| {
            let (ticks, rss) = procs::tree_usage_of(pid)?;
            Some((row, (ticks as f64 / hz, rss)))
        })
        .collect()
}

fn end_cause(status: WaitStatus) -> EndCause {
    match status {
        WaitStatus::Exited(_, code) => EndCause::Code(code),
        WaitStatus::Signaled(_, sig, _) => EndCause::Signal(sig as i32),
        other => EndCause::Unknown(format!("{other:?}")),
    }
}
