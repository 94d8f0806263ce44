//! `clx-pool worker`: the built-in worker. It speaks the worker protocol of
//! the database it is given (CLX, SPEC §4, or CLM, SPEC §7) itself and runs
//! a command once per job (`job.rs`), so any command-line converter becomes
//! a worker. It registers (or activates the row its supervisor
//! pre-registered), claims jobs atomically, keeps its heartbeat fresh while
//! idle (at `--heartbeat-interval`, not on every poll), stops when its row
//! is gone, and on SIGTERM gives its current job back, marks itself dead
//! (CLX) or removes its row (CLM, as CLM's workers do) and exits.
//!
//! A busy or full database never costs a result: a job's outcome is
//! written again until it lands, and other database errors that go away by
//! themselves make the worker wait, not exit. A worker that cannot register
//! at all exits with code 75 (EX_TEMPFAIL), which the supervisor reads as a
//! fault outside the worker.

pub mod job;
pub mod wake;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::Connection;
use tracing::{info, warn};

use crate::contract::env;
use crate::db::{self, Backoff, jobs};
use crate::vocab::{ModeKind, Protocol, WorkerRow, WorkerStatus};
use job::{Ran, StopSignals};

/// After a write to the WAL, an idle worker looks again after 1, 2, … up to
/// this many ms: the commit is published a moment after its last write.
const RECHECK_MAX: Duration = Duration::from_millis(32);

/// The database stayed unavailable while the worker tried to register.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct DatabaseUnavailable(pub anyhow::Error);

pub struct WorkerOptions {
    pub job_command: Vec<String>,
    /// Complete jobs without running anything (benchmarks of the queue).
    pub no_command: bool,
    pub heartbeat_interval: Duration,
    pub poll_interval: Duration,
    pub execution_mode: ModeKind,
    /// Exit (code 0) after this many jobs: the supervisor replaces it.
    pub max_jobs: Option<u32>,
}

struct Identity {
    worker_type: String,
    worker_id: String,
    db_path: PathBuf,
    workspace: PathBuf,
    /// The row the supervisor pre-registered (`CLM_WORKER_ID`).
    preregistered: Option<WorkerRow>,
}

fn identity() -> anyhow::Result<Identity> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let worker_type = var(env::WORKER_TYPE)
        .context("WORKER_TYPE is not set (the supervisor sets it; set it by hand to run a worker yourself)")?;
    let worker_id = var(env::WORKER_ID)
        .or_else(|| var(env::HOSTNAME))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .context("neither WORKER_ID nor HOSTNAME is set")?;
    let db_path = PathBuf::from(
        var(env::CLM_JOBS_DB_PATH)
            .or_else(|| var(env::DB_PATH))
            .context("neither CLM_JOBS_DB_PATH (CLM) nor DB_PATH (CLX) is set")?,
    );
    let workspace = PathBuf::from(var(env::WORKSPACE_PATH).unwrap_or_else(|| ".".into()));
    let preregistered = match var(env::CLM_WORKER_ID) {
        None => None,
        Some(v) => Some(WorkerRow(
            v.parse()
                .with_context(|| format!("CLM_WORKER_ID is not a row id: {v}"))?,
        )),
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
/// How long registration rides out a busy or full database.
const REGISTRATION_PATIENCE: Duration = Duration::from_secs(5);
/// How long the last writes on the way out (give the job back, leave) try.
const LEAVING_PATIENCE: Duration = Duration::from_secs(3);

/// A database fault that goes away by itself becomes [`DatabaseUnavailable`]
/// (exit 75), with a full disk named as such.
fn unavailable(e: anyhow::Error, me: &Identity) -> anyhow::Error {
    if e.downcast_ref::<DatabaseUnavailable>().is_some() || !db::is_transient_any(&e) {
        return e;
    }
    let e = match db::disk_full_hint(&me.db_path) {
        Some(hint) => e.context(hint),
        None => e,
    };
    DatabaseUnavailable(e).into()
}

/// Registers, or activates the pre-registered row; returns the row id. Only
/// a committed row counts: the log says "registered" after the commit.
async fn register(conn: &Connection, protocol: Protocol, me: &Identity) -> anyhow::Result<WorkerRow> {
    let deadline = Instant::now() + REGISTRATION_PATIENCE.max(ACTIVATION_TIMEOUT);
    let transient_deadline = Instant::now() + REGISTRATION_PATIENCE;
    let mut backoff = Backoff::default();
    loop {
        let attempt = match me.preregistered {
            None => db::workers::register(conn, protocol, &me.worker_type, &me.worker_id)
                .map(Some)
                .map_err(anyhow::Error::from),
            Some(row) => match db::workers::activate(conn, row) {
                Ok(true) => Ok(Some(row)),
                Ok(false) if Instant::now() < deadline => Ok(None),
                Ok(false) => bail!(
                    "the pre-registered worker row {row} (CLM_WORKER_ID) is not in {}",
                    me.db_path.display()
                ),
                Err(db::workers::ActivationError::Sql(e)) => Err(e.into()),
                Err(e) => return Err(e).with_context(|| format!("activating worker row {row}")),
            },
        };
        match attempt {
            Ok(Some(row)) => {
                let how = if me.preregistered.is_some() {
                    "activated the pre-registered row"
                } else {
                    "registered"
                };
                info!(worker = %me.worker_id, %row, worker_type = %me.worker_type, %protocol, "{how}");
                return Ok(row);
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) if db::is_transient_any(&e) && Instant::now() < transient_deadline => {
                if backoff.should_log() || backoff.attempts == 0 {
                    warn!(worker = %me.worker_id, "registering: {e:#}; trying again");
                }
                tokio::time::sleep(backoff.step()).await;
            }
            Err(e) if db::is_transient_any(&e) => {
                return Err(DatabaseUnavailable(e.context(format!(
                    "registering worker {} in {}",
                    me.worker_id,
                    me.db_path.display()
                )))
                .into());
            }
            Err(e) => {
                return Err(e.context(format!(
                    "registering worker {} in {}",
                    me.worker_id,
                    me.db_path.display()
                )));
            }
        }
    }
}

pub async fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    if opts.job_command.is_empty() && !opts.no_command {
        bail!("no job command given: run `clx-pool worker -- COMMAND [ARGS...]`");
    }
    let me = identity()?;
    // What a job command leaves behind (a new session, a double fork)
    // becomes this worker's child, and ends with the job.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let (conn, protocol) = db::open_existing(&me.db_path).map_err(|e| unavailable(e, &me))?;
    let row = register(&conn, protocol, &me).await.map_err(|e| unavailable(e, &me))?;
    // SIGUSR1: finish the current job, then leave (a graceful
    // replacement); an idle worker leaves at once.
    let finish = Arc::new(Told::default());
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let told = finish.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            told.flag.store(true, Ordering::SeqCst);
            told.wake.notify_one();
        }
    });
    let bell = std::env::var_os(env::BELL).map(PathBuf::from);
    let wake = wake::Wake::new(&me.db_path, bell.as_deref());
    let mut worker = Worker {
        wake,
        recheck: None,
        next: None,
        stop: StopSignals::install()?,
        finish,
        jobs_done: 0,
        spawn_faults: Backoff::default(),
        conn,
        protocol,
        row,
        me,
        opts,
        last_heartbeat: Instant::now(),
        nothing_since: None,
        stopping: false,
    };
    worker.serve().await
}

/// SIGUSR1 came: finish the current job, then leave.
#[derive(Default)]
struct Told {
    flag: AtomicBool,
    /// Wakes an idle worker at once.
    wake: tokio::sync::Notify,
}

/// A registered worker.
struct Worker {
    conn: Connection,
    protocol: Protocol,
    row: WorkerRow,
    me: Identity,
    opts: WorkerOptions,
    stop: StopSignals,
    /// Wakes the idle loop when the database changes.
    wake: wake::Wake,
    /// After a wake from the WAL: look again after this (doubling to 32 ms).
    recheck: Option<Duration>,
    /// The job claimed with the last one's outcome.
    next: Option<jobs::ClaimedJob>,
    /// Set by SIGUSR1: finish the current job, then leave.
    finish: Arc<Told>,
    jobs_done: u32,
    /// Pacing while job commands cannot be started (a process limit).
    spawn_faults: Backoff,
    last_heartbeat: Instant,
    /// `PRAGMA data_version` changes only when another connection commits:
    /// while it stands still, nothing new can have been queued.
    nothing_since: Option<i64>,
    stopping: bool,
}

/// What one turn of the idle loop found.
enum Turn {
    Job(jobs::ClaimedJob),
    Idle,
    /// The worker's row is gone: it was deregistered and stops.
    Deregistered,
}

impl Worker {
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        while !self.stopping {
            if self.finish.flag.load(Ordering::SeqCst) {
                info!(worker = %self.me.worker_id, "told to finish (SIGUSR1): leaving");
                break;
            }
            if let Some(n) = self.opts.max_jobs
                && self.jobs_done >= n
            {
                info!(worker = %self.me.worker_id, "did {n} jobs (max_jobs): leaving to be replaced");
                break;
            }
            let turn = match self.next.take() {
                Some(job) => Ok(Turn::Job(job)),
                None => self.turn(),
            };
            match turn {
                Ok(Turn::Job(job)) => {
                    backoff = Backoff::default();
                    self.recheck = None;
                    if self.work(&job).await? {
                        self.jobs_done += 1;
                    }
                }
                Ok(Turn::Idle) => {
                    backoff = Backoff::default();
                    self.idle().await;
                }
                Ok(Turn::Deregistered) => {
                    info!(worker = %self.me.worker_id, row = %self.row, "my worker row is gone (deregistered): stopping");
                    return Ok(());
                }
                Err(e) if db::is_transient_any(&e) => {
                    let delay = backoff.step();
                    if backoff.should_log() {
                        warn!(worker = %self.me.worker_id, "the database is unavailable: {e:#}; waiting");
                    }
                    self.pause(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        // A job claimed with the last outcome goes back, uncounted.
        if let Some(job) = self.next.take() {
            self.hand_back(&job).await?;
        }
        self.leave().await;
        Ok(())
    }

    /// Waits for a change to the database (a job may have been queued), the
    /// next heartbeat, or the fallback period; without inotify, polls at
    /// `--poll-interval`.
    async fn idle(&mut self) {
        let heartbeat_due = self
            .opts
            .heartbeat_interval
            .saturating_sub(self.last_heartbeat.elapsed());
        if let Some(d) = self.recheck {
            self.recheck = (d < RECHECK_MAX).then_some(d * 2);
            self.pause(d.min(heartbeat_due)).await;
            return;
        }
        let limit = if self.wake.signalled() {
            self.wake.fallback().min(heartbeat_due)
        } else {
            self.opts.poll_interval.min(heartbeat_due)
        };
        let woke = tokio::select! {
            biased;
            _ = self.stop.recv() => {
                self.stopping = true;
                false
            }
            // Told to leave: the loop sees the flag at once.
            _ = self.finish.wake.notified() => false,
            changed = self.wake.changed(limit) => changed,
        };
        if woke && self.wake.needs_settling() {
            self.recheck = Some(Duration::from_millis(1));
        }
    }

    /// Sleeps `d`, or until asked to stop or to leave.
    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            biased;
            _ = self.stop.recv() => self.stopping = true,
            _ = self.finish.wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    /// Looks for a job (only if something was committed since the last
    /// look) and keeps the heartbeat fresh, in one transaction: each one
    /// takes locks that every other connection to the database holds too,
    /// so an idle pool's cost grows with its size times its transactions.
    fn turn(&mut self) -> anyhow::Result<Turn> {
        let beat = self.last_heartbeat.elapsed() >= self.opts.heartbeat_interval;
        let claimant = jobs::Claimant {
            protocol: self.protocol,
            worker_row: self.row,
            execution_mode: self.opts.execution_mode,
        };
        // The heartbeat writes: then the write lock is taken first, as a
        // read turned write could fail on a commit in between.
        let behavior = if beat {
            rusqlite::TransactionBehavior::Immediate
        } else {
            rusqlite::TransactionBehavior::Deferred
        };
        let tx = self.conn.transaction_with_behavior(behavior)?;
        let version: i64 = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        let waiting =
            self.nothing_since != Some(version) && jobs::candidate(&tx, &self.me.worker_type, claimant)?.is_some();
        let registered = !beat || db::workers::heartbeat(&tx, self.row)?;
        tx.commit()?;
        if beat {
            if !registered {
                return Ok(Turn::Deregistered);
            }
            self.last_heartbeat = Instant::now();
        }
        if !waiting {
            self.nothing_since = Some(version);
            return Ok(Turn::Idle);
        }
        match jobs::claim(&mut self.conn, &self.me.worker_type, claimant)? {
            Some(job) => {
                self.nothing_since = None;
                Ok(Turn::Job(job))
            }
            None => {
                // Another worker took it: look again at the next change.
                self.nothing_since = Some(version);
                Ok(Turn::Idle)
            }
        }
    }

    /// Runs a claimed job and records its outcome; false when the job went
    /// back to the queue without running.
    async fn work(&mut self, job: &jobs::ClaimedJob) -> anyhow::Result<bool> {
        let started = Instant::now();
        let outcome = if self.opts.no_command {
            Ok(())
        } else {
            tracing::debug!(job = job.id, attempt = job.attempt, input = %job.input_file, "job started");
            let setup = job::Setup {
                worker_type: &self.me.worker_type,
                workspace: &self.me.workspace,
                command: &self.opts.job_command,
                // A container's cgroup is its own; a direct worker's is not.
                own_cgroup: match self.opts.execution_mode {
                    ModeKind::Docker | ModeKind::Swarm => crate::procs::own_cgroup_oom_kills(),
                    ModeKind::Direct => None,
                },
            };
            let (conn, row) = (&self.conn, self.row);
            let still_mine = || jobs::still_mine(conn, job, row).unwrap_or(true);
            match job::run(&setup, job, &mut self.stop, still_mine).await {
                Ran::Done(outcome) => outcome,
                Ran::Interrupted => {
                    self.stopping = true;
                    self.hand_back(job).await?;
                    return Ok(false);
                }
                Ran::NotStarted(why) => {
                    // Not the job's fault: back to the queue, uncounted;
                    // this worker waits a moment before it claims again.
                    let delay = self.spawn_faults.step();
                    warn!(
                        job = job.id,
                        "{why}; the job goes back to the queue (its attempt is not counted); claiming again in {}",
                        humantime::format_duration(delay)
                    );
                    self.hand_back(job).await?;
                    if let Err(e) = db::workers::release(&self.conn, self.row) {
                        warn!(job = job.id, "setting the worker idle again: {e}");
                    }
                    self.pause(delay).await;
                    return Ok(false);
                }
                Ran::TakenAway => {
                    info!(
                        job = job.id,
                        "the job was cancelled or given to another attempt: its command was stopped"
                    );
                    if let Err(e) = db::workers::release(&self.conn, self.row) {
                        warn!(job = job.id, "setting the worker idle again: {e}");
                    }
                    return Ok(true);
                }
            }
        };
        self.spawn_faults = Backoff::default();
        self.record(job, outcome, started.elapsed().as_secs_f64()).await?;
        Ok(true)
    }

    /// Writes a job's outcome until it lands: a command that ran is never
    /// run again, nor failed, because the database was busy or full. The
    /// heartbeat is refreshed between tries, as CLM's workers do.
    async fn record(
        &mut self,
        job: &jobs::ClaimedJob,
        outcome: Result<(), String>,
        seconds: f64,
    ) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        // The next job is claimed in the same transaction, unless this
        // worker is about to leave.
        let leaving = self.finish.flag.load(Ordering::SeqCst)
            || self.opts.max_jobs.is_some_and(|n| self.jobs_done + 1 >= n)
            || self.stopping;
        let claimant = jobs::Claimant {
            protocol: self.protocol,
            worker_row: self.row,
            execution_mode: self.opts.execution_mode,
        };
        let worker_type = self.me.worker_type.clone();
        let recorded = loop {
            let o = match &outcome {
                Ok(()) => jobs::Outcome::Completed,
                Err(e) => jobs::Outcome::Failed(e),
            };
            let next = (!leaving).then_some((worker_type.as_str(), claimant));
            match jobs::finish_and_claim(&mut self.conn, job, self.row, o, seconds, next) {
                Ok((recorded, next)) => {
                    self.next = next;
                    break recorded;
                }
                Err(e) if db::is_transient(&e) => {
                    let delay = backoff.step();
                    if backoff.should_log() {
                        warn!(
                            job = job.id,
                            "recording the job's outcome: {e}; retrying until it is written"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    if let Err(e) = db::workers::heartbeat(&self.conn, self.row) {
                        tracing::debug!(job = job.id, "heartbeat while waiting to record: {e}");
                    }
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("recording the outcome of job {}", job.id))),
            }
        };
        self.last_heartbeat = Instant::now();
        match (&outcome, recorded) {
            (_, false) => warn!(
                job = job.id,
                "the job was taken from this worker meanwhile; its result was not recorded"
            ),
            (Err(e), true) => warn!(job = job.id, "job failed: {e}"),
            (Ok(()), true) => tracing::debug!(job = job.id, seconds, "job completed"),
        }
        Ok(())
    }

    /// Asked to stop mid-job: gives the job back without counting the
    /// attempt, unless the supervisor declared this worker hung (then the
    /// attempt counts, and the supervisor puts the job back).
    async fn hand_back(&mut self, job: &jobs::ClaimedJob) -> anyhow::Result<()> {
        let (row, id) = (self.row, job.id);
        let result = self
            .patiently("giving the job back", |conn| {
                if db::workers::status(conn, row)? == Some(WorkerStatus::Hung) {
                    return Ok(false);
                }
                jobs::give_back(conn, job, row)
            })
            .await;
        match result {
            Some(true) => info!(job = id, "asked to stop: gave the job back to the queue"),
            Some(false) => info!(job = id, "stopped as hung: leaving the job to the supervisor"),
            None => warn!(job = id, "could not give the job back; the supervisor will put it back"),
        }
        Ok(())
    }

    /// On the way out: marks the row dead (CLX) or removes it (CLM).
    async fn leave(&mut self) {
        let (row, protocol) = (self.row, self.protocol);
        let left = self
            .patiently("leaving", |conn| match protocol {
                Protocol::Clx => db::workers::mark_dead(conn, row).map(|_| ()),
                Protocol::Clm => db::workers::deregister(conn, row),
            })
            .await;
        if left.is_none() {
            warn!(worker = %self.me.worker_id, "could not record leaving; the supervisor marks the worker dead");
        }
        info!(worker = %self.me.worker_id, "stopped");
    }

    /// Tries a write for a few seconds (the supervisor's `stop_timeout`
    /// runs meanwhile); None if it never landed.
    async fn patiently<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + LEAVING_PATIENCE;
        let mut backoff = Backoff::default();
        loop {
            match f(&mut self.conn) {
                Ok(v) => return Some(v),
                Err(e) if db::is_transient(&e) && Instant::now() < deadline => {
                    if backoff.attempts == 0 {
                        warn!(worker = %self.me.worker_id, "{what}: {e}; trying again");
                    }
                    tokio::time::sleep(backoff.step()).await;
                }
                Err(e) => {
                    warn!(worker = %self.me.worker_id, "{what}: {e}");
                    return None;
                }
            }
        }
    }
}
