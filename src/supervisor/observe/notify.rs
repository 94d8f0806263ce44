//! `[pool] on_event`: a command run on notable events (a slot given up, a
//! crash loop, a hung worker killed, a job failed for good) with the event
//! as one JSON object on stdin. It runs beside supervision, never in its
//! way: each run gets its own process group and is killed after
//! [`TIMEOUT`]; its exit status is logged, nothing else. It ends with the
//! pool: it carries the pool's tags (`stop` and the guard sweep what it
//! left), and dies with the supervisor (parent-death signal).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::procs;

/// How long one notification may run.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
pub struct Notifier {
    command: Option<Arc<Vec<String>>>,
    /// The pool's and run's tags, for the hook's environment.
    tags: Arc<Vec<(String, String)>>,
    /// The supervisor's background tasks: each run of the hook is one.
    tasks: TaskTracker,
}

impl Notifier {
    pub fn new(command: Option<Vec<String>>, db: &std::path::Path, tasks: TaskTracker) -> Notifier {
        Notifier {
            command: command.map(Arc::new),
            tags: Arc::new(crate::contract::tags(db).to_vec()),
            tasks,
        }
    }

    pub fn enabled(&self) -> bool {
        self.command.is_some()
    }

    /// Runs the command for `event` (its `event` key names it) in the
    /// background.
    pub fn send(&self, event: &str, mut fields: Value) {
        let Some(command) = self.command.clone() else { return };
        if let Value::Object(map) = &mut fields {
            map.insert("event".into(), json!(event));
            map.insert("supervisor_pid".into(), json!(std::process::id()));
        }
        let body = fields.to_string();
        let tags = self.tags.clone();
        self.tasks.spawn(async move {
            if let Err(e) = run(&command, &tags, body).await {
                warn!(command = %command.join(" "), "on_event: {e:#}");
            }
        });
    }
}

async fn run(command: &[String], tags: &[(String, String)], body: String) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .envs(tags.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let supervisor = std::process::id() as i32;
    // SAFETY: runs in the forked child before exec and only makes the
    // async-signal-safe prctl and getppid syscalls.
    unsafe {
        cmd.pre_exec(move || {
            // It dies with the supervisor, however the supervisor dies.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            if nix::unistd::getppid().as_raw() != supervisor {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting `{}`", command[0]))?;
    let pid = child.id() as i32;
    // The supervisor's one reaper collects it (see `procs::reap`).
    let exited = procs::watch(pid);
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(body.as_bytes())
    {
        debug!("on_event: writing the event: {e}");
    }
    drop(child);
    match tokio::time::timeout(TIMEOUT, exited).await {
        Ok(Ok(status)) => {
            debug!(?status, "on_event ran");
            Ok(())
        }
        Ok(Err(_)) => Ok(()),
        Err(_) => {
            if let Err(e) = procs::signal_group(pid, nix::sys::signal::Signal::SIGKILL) {
                debug!("on_event: killing it: {e}");
            }
            anyhow::bail!("did not finish within {}s; killed", TIMEOUT.as_secs())
        }
    }
}
