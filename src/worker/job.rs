//! Running one job's command: its argv (placeholders filled in one pass),
//! its environment (a large payload goes to a file, never into a failing
//! exec), its own process group tied to the worker's life, its stderr kept
//! for the job's error, and how it ended: done when the command exits, even
//! if something it left in the background still holds its stderr.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tracing::warn;

use crate::contract::env::job as env;
use crate::contract::placeholders;
use crate::db::jobs::ClaimedJob;
use crate::procs;

/// How much of a failed command's stderr goes into the job's `error`.
const ERROR_TAIL: usize = 2000;

/// Payloads up to this size travel in `CLX_PAYLOAD`; larger ones in a
/// file named by `CLX_PAYLOAD_FILE` (Linux refuses a single argument or
/// variable over 128 KiB at exec).
pub const PAYLOAD_INLINE_MAX: usize = 100 * 1024;

/// How long the rest of a command's stderr is read after it exited, before
/// whatever still holds the pipe is ignored.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// SIGTERM and SIGINT, which ask the worker to stop.
pub struct StopSignals {
    term: SignalStream,
    int: SignalStream,
}

impl StopSignals {
    pub fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when either arrives.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// What a job runs with.
pub struct Setup<'a> {
    pub worker_type: &'a str,
    pub workspace: &'a Path,
    pub command: &'a [String],
    /// In a container, whose cgroup is the worker's own: its OOM count
    /// before the job.
    pub own_cgroup: Option<u64>,
}

/// How running a job ended.
pub enum Ran {
    /// The command ran (or could not be run): completed, or failed with why.
    Done(Result<(), String>),
    /// The worker was asked to stop meanwhile; the command was killed.
    Interrupted,
    /// The job stopped being this worker's (cancelled, or given to another
    /// attempt); the command was killed.
    TakenAway,
    /// The command could not be started for a reason that passes (too many
    /// processes or open files, no memory): the job did nothing wrong and
    /// goes back to the queue without counting the attempt.
    NotStarted(String),
}

/// How often a running job is checked for cancellation.
pub const CANCEL_CHECK: Duration = Duration::from_millis(500);

fn resolve(workspace: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace.join(p)
    }
}

/// Runs `job` to its end, until `stop` fires, or until `still_mine` says
/// the job was cancelled or taken away.
pub async fn run(setup: &Setup<'_>, job: &ClaimedJob, stop: &mut StopSignals, still_mine: impl FnMut() -> bool) -> Ran {
    let input = resolve(setup.workspace, &job.input_file);
    let output = resolve(setup.workspace, &job.output_file);
    // Kept until the job has ended: dropping it removes the payload file.
    let (_payload, mut cmd) = match command(setup, job, &input, &output) {
        Ok(c) => c,
        Err(e) => return Ran::Done(Err(e)),
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if passes(&e) => return Ran::NotStarted(format!("could not start `{}`: {e}", setup.command[0])),
        Err(e) => return Ran::Done(Err(format!("could not run `{}`: {e}", setup.command[0]))),
    };
    let pgid = child.id().map(|p| p as i32);
    let started = pgid.map(|p| (p, procs::start_ticks(p)));
    let tail = Arc::new(Mutex::new(Vec::new()));
    let mut collector = tokio::spawn(collect_stderr(
        child.stderr.take().expect("stderr is piped"),
        tail.clone(),
    ));
    let status = watch(&mut child, stop, still_mine).await;
    // Whatever the command left running in its group goes too; that also
    // closes the stderr they held, so the collector ends.
    if let Some(pgid) = pgid
        && let Err(e) = procs::signal_group(pgid, Signal::SIGKILL)
    {
        warn!(job = job.id, "killing what the job command left running: {e}");
    }
    let status = match status {
        Ok(status) => status,
        Err(why) => {
            if let Err(e) = child.wait().await {
                warn!(job = job.id, "waiting for the killed job command: {e}");
            }
            end_leftovers(job.id).await;
            collector.abort();
            return why;
        }
    };
    // And whatever left the group (a new session, a double fork, nohup):
    // nothing outlives its job. That also closes the stderr they held.
    end_leftovers(job.id).await;
    if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut collector).await.is_err() {
        // Something this worker did not start holds the pipe.
        collector.abort();
    }
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ran::Done(judge(setup.command, &output, status, &tail, started, setup.own_cgroup))
}

/// The job's payload file if it has one and its command, ready to spawn;
/// or why the job fails before it starts.
fn command(
    setup: &Setup<'_>,
    job: &ClaimedJob,
    input: &Path,
    output: &Path,
) -> Result<(PayloadFile, tokio::process::Command), String> {
    if let Some(dir) = output.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return Err(format!("cannot create the output folder {}: {e}", dir.display()));
    }
    let payload = PayloadFile::for_job(setup.command, job)?;
    let argv = argv(setup.command, input, output, job, payload.path())?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env(env::INPUT_FILE, input)
        .env(env::OUTPUT_FILE, output)
        .env(env::JOB_ID, job.id.to_string())
        .env(env::JOB_ATTEMPT, job.attempt.to_string())
        .env(env::JOB_TYPE, setup.worker_type)
        .current_dir(setup.workspace)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group: a stop signal for the worker does not reach the
        // command, so the worker alone decides what becomes of the job.
        .process_group(0);
    match payload.path() {
        Some(file) => cmd.env(env::PAYLOAD_FILE, file),
        None => cmd.env(env::PAYLOAD, &job.payload),
    };
    tie_to_worker(&mut cmd);
    Ok((payload, cmd))
}

/// Waits for the command to exit, checking every [`CANCEL_CHECK`] that the
/// job is still this worker's; `Err` with why it must be killed instead.
async fn watch(
    child: &mut tokio::process::Child,
    stop: &mut StopSignals,
    mut still_mine: impl FnMut() -> bool,
) -> Result<std::io::Result<ExitStatus>, Ran> {
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + CANCEL_CHECK, CANCEL_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.recv() => return Err(Ran::Interrupted),
            s = child.wait() => return Ok(s),
            _ = check.tick() => {
                if !still_mine() {
                    return Err(Ran::TakenAway);
                }
            }
        }
    }
}

/// Whether a failed start is one that passes by itself: the process or
/// open-files limit reached, memory short for a moment.
fn passes(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EAGAIN | nix::libc::ENOMEM | nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

/// Kills what a finished job command left running anywhere below this
/// worker (its child subreaper: every orphan of the command is ours).
async fn end_leftovers(job: i64) {
    let n = procs::end_descendants(Duration::from_secs(5), &[]).await;
    if n > 0 {
        tracing::info!(job, processes = n, "killed what the job command left running");
    }
}

/// The job command dies with the worker, even if the worker is SIGKILLed.
fn tie_to_worker(cmd: &mut tokio::process::Command) {
    let worker = std::process::id() as i32;
    // SAFETY: runs in the forked child before exec and only makes the
    // async-signal-safe prctl and getppid syscalls.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The worker may have died before prctl took effect.
            if nix::unistd::getppid().as_raw() != worker {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Copies the command's stderr to the worker's own (its log) and keeps the
/// last part for the job's error.
async fn collect_stderr(mut stderr: tokio::process::ChildStderr, tail: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::AsyncWriteExt;
    let mut buf = [0u8; 8192];
    let mut out = tokio::io::stderr();
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // The worker's own stderr is its log pipe; if that is gone
                // the worker is going too, and the tail below still counts.
                if out.write_all(&buf[..n]).await.is_err() {
                    tracing::debug!("the worker's stderr is closed");
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.extend_from_slice(&buf[..n]);
                if t.len() > 2 * ERROR_TAIL {
                    let excess = t.len() - ERROR_TAIL;
                    t.drain(..excess);
                }
            }
        }
    }
}

/// Completed (`Ok`) or failed with why, from how the command ended.
fn judge(
    command: &[String],
    output: &Path,
    status: std::io::Result<ExitStatus>,
    tail: &[u8],
    started: Option<(i32, Option<i64>)>,
    own_cgroup: Option<u64>,
) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    let status = status.map_err(|e| format!("waiting for `{}`: {e}", command[0]))?;
    if status.success() {
        return if output.exists() {
            Ok(())
        } else {
            Err(format!(
                "`{}` exited 0 but did not write {}",
                command[0],
                output.display()
            ))
        };
    }
    let text = String::from_utf8_lossy(tail);
    let text = last_chars(text.trim(), ERROR_TAIL);
    // Named OOM only on the command's own evidence: the kernel's record of
    // killing this very process, or the OOM count of a cgroup that is the
    // worker's own (its container's), never the host's count.
    let oom = status.signal() == Some(Signal::SIGKILL as i32)
        && (started.is_some_and(|(pid, start)| procs::killed_by_oom(pid, start))
            || own_cgroup.is_some_and(|before| procs::own_cgroup_oom_kills().is_some_and(|now| now > before)));
    let what = match (status.code(), oom) {
        (_, true) => "was killed by the kernel's OOM killer (out of memory)".to_string(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, _) => format!("was killed ({status})"),
    };
    Err(if text.is_empty() {
        format!("`{}` {what}", command[0])
    } else {
        format!("`{}` {what}: {text}", command[0])
    })
}

/// The last `n` bytes of `s`, moved forward to a character boundary.
fn last_chars(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The command's argv with its placeholders filled.
fn argv(
    command: &[String],
    input: &Path,
    output: &Path,
    job: &ClaimedJob,
    payload_file: Option<&Path>,
) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(command.len());
    for arg in command {
        if arg.contains("{payload}") && job.payload.len() > PAYLOAD_INLINE_MAX {
            return Err(format!(
                "the payload ({} bytes) is too large for a command-line argument; use {{payload_file}} or $CLX_PAYLOAD_FILE instead of {{payload}}",
                job.payload.len()
            ));
        }
        out.push(placeholders::expand(arg, |name| match name {
            "input" => input.to_string_lossy().into_owned(),
            "output" => output.to_string_lossy().into_owned(),
            "payload" => job.payload.clone(),
            "payload_file" => payload_file
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            "job_id" => job.id.to_string(),
            other => unreachable!("unknown placeholder {other}"),
        }));
    }
    Ok(out)
}

/// The job's payload in a private file, when it is too large for the
/// environment or the command asks for `{payload_file}`; removed with the
/// value.
struct PayloadFile(Option<PathBuf>);

impl PayloadFile {
    fn for_job(command: &[String], job: &ClaimedJob) -> Result<PayloadFile, String> {
        let asked = command
            .iter()
            .any(|a| placeholders::used_in(a).contains(&"payload_file"));
        if !asked && job.payload.len() <= PAYLOAD_INLINE_MAX {
            return Ok(PayloadFile(None));
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "clx-payload-{}-{}-{}.json",
            std::process::id(),
            job.id,
            job.attempt
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(job.payload.as_bytes()).map(|_| f))
            .map_err(|e| format!("cannot write the payload to {}: {e}", path.display()))?;
        file.flush()
            .map_err(|e| format!("cannot write the payload to {}: {e}", path.display()))?;
        Ok(PayloadFile(Some(path)))
    }

    fn path(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl Drop for PayloadFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0
            && let Err(e) = std::fs::remove_file(p)
        {
            warn!("removing the payload file {}: {e}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(payload: &str) -> ClaimedJob {
        ClaimedJob {
            id: 7,
            input_file: "a".into(),
            output_file: "b".into(),
            content_hash: "h".into(),
            payload: payload.into(),
            attempt: 1,
        }
    }

    #[test]
    fn placeholders_are_filled_once_and_other_braces_kept() {
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
        let out = argv(
            &cmd,
            Path::new("/w/y{job_id}.txt"),
            Path::new("/w/b"),
            &job("{\"k\": 1}"),
            None,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                "conv",
                "--in=/w/y{job_id}.txt",
                "/w/b",
                "7",
                "{\"k\": 1}",
                "awk '{print}'"
            ]
        );
    }

    #[test]
    fn a_large_payload_goes_to_a_file_and_never_into_an_argument() {
        let big = format!("\"{}\"", "x".repeat(PAYLOAD_INLINE_MAX + 1));
        let cmd = vec!["conv".to_string(), "{payload}".to_string()];
        let e = argv(&cmd, Path::new("/i"), Path::new("/o"), &job(&big), None).unwrap_err();
        assert!(e.contains("too large for a command-line argument"), "{e}");
        let file = PayloadFile::for_job(&["cat".to_string()], &job(&big)).unwrap();
        let path = file.path().unwrap().to_path_buf();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), big);
        drop(file);
        assert!(!path.exists());
        assert!(
            PayloadFile::for_job(&["cat".to_string()], &job("{}"))
                .unwrap()
                .path()
                .is_none()
        );
    }
}
