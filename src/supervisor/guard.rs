//! The guard: a small process the supervisor starts beside itself, which
//! cleans up if the supervisor dies without stopping its pool (`kill -9`,
//! a crash, the OOM killer). Workers die with the supervisor through their
//! parent-death signal, but what *they* started (a job command's children,
//! `setsid` helpers) and containers would live on until the next `start`.
//!
//! The supervisor holds the only write end of a pipe whose read end is the
//! guard's stdin. A supervisor that stops cleanly writes one byte and the
//! guard exits; if the pipe closes without it, the supervisor is gone, and
//! the guard kills every process carrying the pool's tag at once, then —
//! holding the supervisor lock, as `clx-pool stop` does — removes the
//! pool's containers, marks its worker rows dead and puts their jobs back.
//! The guard runs in a session of its own, so what kills the supervisor's
//! process group or terminal does not kill it.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::OFlag;
use tracing::{error, info, warn};

use crate::lock::LockError;
use crate::procs;
use crate::takeover::{self, Takeover, Taker};

/// The byte a supervisor that stops cleanly sends.
const DISMISS: u8 = b'x';

/// The supervisor's end of the guard.
pub struct Guard {
    pipe: Option<std::fs::File>,
    child: Child,
    /// Its exit, from the supervisor's reaper.
    exited: Option<tokio::sync::oneshot::Receiver<nix::sys::wait::WaitStatus>>,
    /// The swarm manager it cleans up on (a replacement gets it too).
    swarm_host: Option<String>,
}

/// Starts the guard for the pool of `db`.
pub fn spawn(db: &Path, swarm_host: Option<&str>) -> anyhow::Result<Guard> {
    // O_CLOEXEC: no worker inherits the write end, or the guard would not
    // see the supervisor die while workers live.
    let (read_end, write_end): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the guard's pipe")?;
    let exe = std::env::current_exe().context("finding the clx-pool executable for the guard")?;
    let mut command = Command::new(exe);
    command
        .arg("guard")
        .arg("--db")
        .arg(db)
        .args(["--run", crate::contract::this_run()]);
    if let Some(host) = swarm_host {
        command.args(["--swarm-host", host]);
    }
    let child = command
        .stdin(Stdio::from(read_end))
        .stdout(Stdio::null())
        .spawn()
        .context("starting the guard process")?;
    // The supervisor's one reaper collects it; no await since the spawn.
    let exited = Some(procs::watch(child.id() as i32));
    Ok(Guard {
        pipe: Some(std::fs::File::from(write_end)),
        child,
        exited,
        swarm_host: swarm_host.map(str::to_string),
    })
}

/// Keeps a guard beside the supervisor while it runs: one that dies
/// (killed, crashed) is reported (a log line, `on_event` `guard_restarted`)
/// and replaced, so a later crash of the supervisor is still cleaned up.
pub struct Keeper {
    dismiss: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Keeper {
    pub fn start(guard: Guard, db: &Path, notifier: super::observe::notify::Notifier) -> Keeper {
        let (dismiss, mut dismissed) = tokio::sync::oneshot::channel();
        let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(guard.pid()));
        let (db, current) = (db.to_path_buf(), pid.clone());
        let task = tokio::spawn(async move {
            let mut guard = guard;
            loop {
                let exited = guard.exited.take();
                let status = tokio::select! {
                    _ = &mut dismissed => {
                        guard.dismiss();
                        return;
                    }
                    status = async {
                        match exited {
                            Some(rx) => rx.await.ok(),
                            None => std::future::pending().await,
                        }
                    } => status,
                };
                let why = status.map(|s| format!("{s:?}")).unwrap_or_else(|| "it is gone".into());
                let old = guard.pid();
                let swarm_host = guard.swarm_host.clone();
                // Until a new one runs, nobody would clean up after a crash.
                guard = loop {
                    match spawn(&db, swarm_host.as_deref()) {
                        Ok(g) => break g,
                        Err(e) => {
                            error!("starting a new guard: {e:#}; trying again in a second");
                            tokio::select! {
                                _ = &mut dismissed => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                };
                current.store(guard.pid(), std::sync::atomic::Ordering::SeqCst);
                error!(old, new = guard.pid(), "the guard ended ({why}); started a new one");
                notifier.send(
                    "guard_restarted",
                    serde_json::json!({ "old_pid": old, "new_pid": guard.pid(), "why": why }),
                );
            }
        });
        Keeper {
            dismiss: Some(dismiss),
            task,
            pid,
        }
    }

    /// The guard's pid now.
    pub fn pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The pool stopped cleanly: the guard exits without doing anything.
    pub async fn dismiss(mut self) {
        if let Some(tx) = self.dismiss.take() {
            tx.send(()).ok();
        }
        if let Err(e) = self.task.await {
            error!("the guard's keeper failed: {e}");
        }
    }
}

impl Guard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pool stopped cleanly: the guard exits without doing anything.
    pub fn dismiss(mut self) {
        if let Some(mut pipe) = self.pipe.take()
            && let Err(e) = pipe.write_all(&[DISMISS])
        {
            warn!("dismissing the guard: {e}; it will clean up after this supervisor instead");
        }
    }
}

/// `clx-pool guard --db DB`: waits for the supervisor's pipe to close, then
/// cleans up if it was not dismissed.
pub async fn run(db_path: &Path, run: &str, swarm_host: Option<&str>) -> anyhow::Result<()> {
    nix::unistd::setsid().context("leaving the supervisor's session")?;
    let outcome = tokio::task::spawn_blocking(|| {
        let mut byte = [0u8; 1];
        std::io::stdin()
            .lock()
            .read(&mut byte)
            .map(|n| n == 1 && byte[0] == DISMISS)
    })
    .await?;
    if matches!(outcome, Ok(true)) {
        return Ok(());
    }
    warn!(db = %db_path.display(), "the supervisor is gone without stopping its pool: cleaning up after it");
    // First and at once: every process of the run, wherever it went (and
    // only of that run: a new supervisor may be starting its own).
    let (db, run) = (db_path.to_path_buf(), run.to_string());
    let killed = procs::sweep(
        move || procs::find_pool_processes(&db, Some(&run)),
        Duration::from_secs(5),
    )
    .await;
    if killed > 0 {
        info!(processes = killed, "killed what the pool left running");
    }
    // Then, as `clx-pool stop` would: containers, rows, jobs. A supervisor
    // that started meanwhile does that itself.
    let takeover = Takeover {
        db_path,
        taker: Taker::Guard,
        protocol: None,
        grace: Duration::ZERO,
        swarm_host,
    };
    match takeover::take_over(takeover, takeover::nothing).await {
        Ok(taken) => {
            info!("cleaned up after the supervisor: {}", taken.report);
            Ok(())
        }
        Err(e) if e.downcast_ref::<LockError>().is_some() => {
            info!("another supervisor took over this database; it cleans up instead");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
