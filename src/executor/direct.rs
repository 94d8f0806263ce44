//! Direct mode: a worker is a child process leading its own process group,
//! with stdout and stderr drained into its log, killed by the kernel if the
//! supervisor dies (parent-death signal), stopped with SIGTERM to the group,
//! SIGKILL after the grace time, then checked until the group is empty.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use process_wrap::tokio::{KillOnDrop, ProcessGroup, TokioChildWrapper, TokioCommandWrap};
use tokio::net::unix::pipe;

use super::{ExitCause, Launch, Running};
use crate::config::{InheritEnv, WorkerProgram};
use crate::logs::{self, RotatingLog, Tail};
use crate::procs;

pub struct DirectWorker {
    child: Box<dyn TokioChildWrapper>,
    pgid: i32,
    worker_id: String,
    exit: Option<ExitCause>,
    /// The host's OOM-kill count when the worker started.
    oom_kills_at_start: Option<u64>,
    /// Set once we send SIGKILL ourselves, so that exit is not blamed on OOM.
    killed_by_us: bool,
}

pub fn launch(spec: &Launch) -> anyhow::Result<Running> {
    let worker_id = spec.worker_id.clone();
    let argv = match &spec.program {
        WorkerProgram::Command(c) => c.clone(),
        WorkerProgram::JobCommand(c) => {
            let exe = std::env::current_exe().context("finding the clx-pool executable for the built-in worker")?;
            let mut argv = vec![exe.to_string_lossy().into_owned()];
            argv.extend(spec.builtin_worker_args("direct", c));
            argv
        }
        WorkerProgram::Default => anyhow::bail!("no command to run worker type `{}` directly", spec.worker_type),
    };
    let db = spec.db_path.to_string_lossy();
    let workspace = spec.workspace.to_string_lossy();
    let env = spec.environment(&super::Seen {
        db_path: &db,
        workspace: &workspace,
        worker_id: Some(&worker_id),
        tagged: true,
    });
    let mut log = RotatingLog::open(&spec.log_path, spec.log_max_size, spec.log_keep)
        .with_context(|| format!("opening the worker log {}", spec.log_path.display()))?;
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the worker's output pipe")?;
    let write_end_2: OwnedFd = write_end.try_clone().context("duplicating the output pipe")?;
    let parent = std::process::id() as i32;
    let memory_limit = spec.memory_limit;

    let inherit = spec.inherit_env.clone();
    let mut cmd = TokioCommandWrap::with_new(&argv[0], |c| {
        if inherit != InheritEnv::All {
            c.env_clear()
                .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(|k| inherit.passes(k))));
        }
        c.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(write_end_2));
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
    cmd.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
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
    let pid = child
        .id()
        .map(|p| p as i32)
        .context("worker exited before its pid was read")?;
    // tokio reaps this one; reap_strays must leave it alone.
    procs::track(pid);
    let tail = Tail::default();
    let reader = pipe::Receiver::from_owned_fd(read_end).context("reading the worker's output pipe")?;
    tokio::spawn(logs::drain(reader, log, tail.clone()));
    let worker = DirectWorker {
        child,
        pgid: pid,
        worker_id: worker_id.clone(),
        exit: None,
        oom_kills_at_start: procs::oom_kills(),
        killed_by_us: false,
    };
    Ok(Running::direct(worker_id, pid, tail, worker))
}

impl DirectWorker {
    /// Waits for the group leader (the worker itself) to exit, then kills
    /// what is left in its process group. Cancel-safe: the only await is the
    /// child's wait.
    pub async fn wait(&mut self) -> ExitCause {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let mut cause = match self.child.inner_mut().wait().await {
            Ok(status) => exit_cause(status),
            Err(e) => ExitCause::Unknown(e.to_string()),
        };
        procs::untrack(self.pgid);
        if cause == ExitCause::Signal(Signal::SIGKILL as i32)
            && !self.killed_by_us
            && let (Some(before), Some(now)) = (self.oom_kills_at_start, procs::oom_kills())
            && now > before
        {
            cause = ExitCause::Oom;
        }
        self.exit = Some(cause.clone());
        let _ = procs::signal_group(self.pgid, Signal::SIGKILL);
        cause
    }

    pub async fn stop(&mut self, grace: Duration) -> ExitCause {
        if self.exit.is_none() {
            let _ = procs::signal_group(self.pgid, Signal::SIGTERM);
            // A stopped (SIGSTOP) worker must run to see the SIGTERM.
            let _ = procs::signal_group(self.pgid, Signal::SIGCONT);
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                tracing::warn!(
                    worker = %self.worker_id,
                    "worker did not exit within {} of SIGTERM; sending SIGKILL",
                    humantime::format_duration(grace)
                );
                self.killed_by_us = true;
                let _ = procs::signal_group(self.pgid, Signal::SIGKILL);
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
        let n = procs::sweep(move || procs::find_worker_processes(&id), Duration::from_secs(5)).await;
        if n > 0 {
            tracing::info!(worker = %self.worker_id, processes = n, "killed what the worker left running");
        }
    }
}

fn exit_cause(status: std::process::ExitStatus) -> ExitCause {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCause::Code(c),
        (None, Some(s)) => ExitCause::Signal(s),
        _ => ExitCause::Unknown(format!("{status}")),
    }
}
