//! Process helpers on Linux: identifying a process by its start time (so a
//! recorded pid that was reused is never killed), signalling process
//! groups, and confirming a group is empty. ESRCH means "already gone".

use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// The start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`
/// field 22): with the pid, it identifies one process for its whole life.
pub fn start_ticks(pid: i32) -> Option<i64> {
    stat(pid).map(|s| s.start_ticks)
}

fn is_zombie(pid: i32) -> bool {
    stat(pid).is_none_or(|s| s.state == 'Z')
}

/// Sends `sig` to every process in group `pgid`; a group that is already
/// empty is not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> nix::Result<()> {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Pids of the live (non-zombie) processes in group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat(pid).is_some_and(|s| s.state != 'Z' && s.pgrp == pgid))
        .collect()
}

/// True while any live process is in group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => false,
        // Members may all be zombies waiting for their parent: look closer.
        _ => !group_members(pgid).is_empty(),
    }
}

/// Waits until group `pgid` is empty, SIGKILLing stragglers; returns false
/// if something survived `limit`.
pub async fn ensure_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if let Err(e) = signal_group(pgid, Signal::SIGKILL) {
            tracing::warn!(pgid, "cannot kill the process group: {e}");
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops a process group left behind by an earlier supervisor: only when its
/// leader is still the process that was recorded (or already gone, leaving
/// members behind). SIGTERM, then SIGKILL after `grace`. Returns true if it
/// found something to stop.
pub async fn stop_orphan_group(pid: i32, recorded_start: Option<i64>, grace: Duration) -> bool {
    if pid <= 1 {
        return false;
    }
    match (start_ticks(pid), recorded_start) {
        // The pid now belongs to another process: our group cannot exist,
        // since Linux never reuses a pid that is still some group's id.
        (Some(now), Some(then)) if now != then => return false,
        (Some(_), None) => return false,
        _ => {}
    }
    if !group_alive(pid) {
        return false;
    }
    if let Err(e) = signal_group(pid, Signal::SIGTERM) {
        tracing::warn!(pgid = pid, "cannot signal the process group: {e}");
    }
    let deadline = Instant::now() + grace;
    while group_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure_group_gone(pid, Duration::from_secs(5)).await;
    true
}

/// Sends `sig` to a single process, ignoring "no such process".
pub fn signal_process(pid: i32, sig: Signal) -> nix::Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_stable() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).unwrap();
        assert_eq!(start_ticks(me), Some(t));
        assert!(!is_zombie(me));
    }
}

/// One line of `/proc/<pid>/stat`, the fields clx-pool uses; the one
/// place that file is parsed.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time, in clock ticks since boot.
    pub start_ticks: i64,
    /// Resident pages.
    pub rss_pages: u64,
}

pub fn stat(pid: i32) -> Option<ProcStat> {
    let s = read_proc_file(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): index = field - 3.
    Some(ProcStat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
    })
}

/// CPU ticks and resident bytes of `root` and its descendants, found
/// through `/proc/<pid>/task/<tid>/children` (no scan of every process).
pub fn tree_usage_of(root: i32) -> Option<(u64, u64)> {
    let first = stat(root)?;
    let (mut ticks, mut pages) = (first.cpu_ticks, first.rss_pages);
    let mut stack = children_of(root);
    while let Some(pid) = stack.pop() {
        if let Some(p) = stat(pid) {
            ticks += p.cpu_ticks;
            pages += p.rss_pages;
            stack.extend(children_of(pid));
        }
    }
    Some((ticks, pages * page_size()))
}

/// Every live descendant of `root` (zombies left out), found through the
/// children lists of `/proc`; `spare` and theirs left out.
pub fn descendants_of(root: i32, spare: &[i32]) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = children_of(root);
    while let Some(pid) = stack.pop() {
        if spare.contains(&pid) {
            continue;
        }
        if !is_zombie(pid) {
            out.push(pid);
        }
        stack.extend(children_of(pid));
    }
    out
}

/// Kills every descendant of this process but `spare` and collects them:
/// what a job command left behind, in a session of its own (`setsid`),
/// after a double fork or `nohup` — as child subreaper this process adopted
/// them all. Call only when no other child of this process may live on
/// (between jobs; after the pool stopped): it reaps any child. Returns how
/// many it found.
pub async fn end_descendants(limit: Duration, spare: &[i32]) -> usize {
    // The common case after a job, in one call instead of a walk of /proc.
    if !has_children() {
        return 0;
    }
    let me = std::process::id() as i32;
    let first = descendants_of(me, spare);
    let deadline = Instant::now() + limit;
    let mut left = first.clone();
    while !left.is_empty() {
        for &pid in &left {
            if let Err(e) = signal_process(pid, Signal::SIGKILL) {
                tracing::debug!(pid, "SIGKILL: {e}");
            }
        }
        reap();
        if Instant::now() >= deadline {
            tracing::warn!(processes = ?left, "descendants survived SIGKILL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        // Killed ones' children are ours now; killed ones are zombies.
        reap();
        left = descendants_of(me, spare);
    }
    reap();
    first.len()
}

/// The text of a small `/proc` file in one read: `/proc` reports a size
/// of 0, so `fs::read_to_string` would ask for the size and then read in
/// growing steps from 32 bytes (seven calls where three do).
fn read_proc_file(path: impl AsRef<std::path::Path>) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(1024);
    // `Take` hides the file from `read_to_end`'s size probe.
    file.take(u64::MAX).read_to_end(&mut buf).ok()?;
    String::from_utf8(buf).ok()
}

/// Whether this process has any child at all, live or a zombie. Without
/// one it has no descendant either (every descendant is reached through
/// a live child; a child subreaper adopts the orphans below it).
fn has_children() -> bool {
    use nix::sys::wait::{Id, waitid};
    // WNOWAIT: a zombie found here stays to be reaped by whoever waits.
    !matches!(
        waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Err(Errno::ECHILD)
    )
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some(text) = read_proc_file(t.path().join("children")) {
                out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(4096)
}

pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(100)
}

/// Whether the kernel logged that its OOM killer killed process `pid`
/// (started at `start_ticks`): the process's own evidence, from the
/// kernel's log (`/dev/kmsg`). False when the log cannot be read (no
/// privilege, a container), never a guess from the host's OOM count.
pub fn killed_by_oom(pid: i32, start_ticks: Option<i64>) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut log) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    // Records carry microseconds since boot; the process began at this.
    let since = start_ticks.map_or(0, |t| t.max(0) as u64 * 1_000_000 / clock_ticks_per_second());
    let mut record = vec![0u8; 8192];
    loop {
        match log.read(&mut record) {
            Ok(0) => return false,
            Ok(n) => {
                if kmsg_says_oom_killed(&record[..n], pid, since) {
                    return true;
                }
            }
            // Records overwritten while reading: read on.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            // EAGAIN: the end of the log.
            Err(_) => return false,
        }
    }
}

/// Whether one `/dev/kmsg` record ("prio,seq,usec,flags;message") says
/// the OOM killer killed `pid`, at or after `since` µs since boot.
fn kmsg_says_oom_killed(record: &[u8], pid: i32, since: u64) -> bool {
    let text = String::from_utf8_lossy(record);
    let Some((head, message)) = text.split_once(';') else {
        return false;
    };
    let at: u64 = head.split(',').nth(2).and_then(|u| u.parse().ok()).unwrap_or(0);
    let message = message.lines().next().unwrap_or("");
    at >= since
        && message.to_ascii_lowercase().contains("out of memory")
        && message.contains(&format!("Killed process {pid} ("))
}

/// The OOM kills counted by this process's own cgroup, when it has one to
/// itself (inside a container): `memory.events` (cgroup v2) or
/// `memory.oom_control` (v1), as the container sees them.
pub fn own_cgroup_oom_kills() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.events",
        "/sys/fs/cgroup/memory/memory.oom_control",
    ]
    .iter()
    .find_map(|file| {
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
    })
}

/// Live processes (not this one) whose environment satisfies `pred`,
/// which sees the `NAME=value` entries one by one.
fn find_by_env(mut pred: impl FnMut(&mut dyn Iterator<Item = &[u8]>) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && !is_zombie(pid))
        .filter(|&pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            pred(&mut env.split(|&b| b == 0))
        })
        .collect()
}

/// Every process started by worker `worker_id`, wherever it went: its job
/// commands, their children, helpers that left the worker's process group
/// with `setsid`. They all inherit `WORKER_ID` from the worker.
pub fn find_worker_processes(worker_id: &str) -> Vec<i32> {
    let tag = format!("{}={worker_id}", crate::contract::env::WORKER_ID);
    find_by_env(|vars| {
        for kv in vars {
            if kv == tag.as_bytes() {
                return true;
            }
        }
        false
    })
}

/// Processes of any worker of the pool whose database is `db`, and what
/// they started: they inherited the pool tag (`CLX_SUPERVISOR_DB=<db>`),
/// which the workers of other programs on the same database lack. With
/// `run`, only those of that run (`CLX_POOL_RUN`): a later run's are not
/// touched.
pub fn find_pool_processes(db: &std::path::Path, run: Option<&str>) -> Vec<i32> {
    let pool = format!("{}={}", crate::contract::env::POOL_TAG, db.display());
    let run = run.map(|r| format!("{}={r}", crate::contract::env::RUN_TAG));
    find_by_env(|vars| {
        let (mut of_pool, mut of_run) = (false, run.is_none());
        for kv in vars {
            of_pool |= kv == pool.as_bytes();
            of_run |= run.as_ref().is_some_and(|r| kv == r.as_bytes());
        }
        of_pool && of_run
    })
}

/// SIGKILLs what `find` returns until it returns nothing or `limit` passes;
/// returns how many processes the first look found.
pub async fn sweep(find: impl Fn() -> Vec<i32>, limit: Duration) -> usize {
    let first = find();
    if first.is_empty() {
        return 0;
    }
    let deadline = Instant::now() + limit;
    let mut left = first.clone();
    while !left.is_empty() && Instant::now() < deadline {
        for &pid in &left {
            if let Err(e) = signal_process(pid, Signal::SIGKILL) {
                tracing::debug!(pid, "SIGKILL: {e}");
            }
        }
        reap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        left = find();
    }
    first.len()
}

/// The one owner of `waitpid` in the supervisor: it reaps every child
/// that exits — workers, and as child subreaper the orphaned descendants of
/// workers — and hands a watched child's status to whoever watches it.
/// Spawning and reaping both happen on the runtime's one thread, and a
/// spawn is followed by its [`watch`] with no await in between, so no
/// status can come before its watch.
static WATCHING: LazyLock<Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>> = LazyLock::new(Default::default);

/// Delivers the exit status of child `pid` once it has exited. Call right
/// after spawning it.
pub fn watch(pid: i32) -> oneshot::Receiver<WaitStatus> {
    let (tx, rx) = oneshot::channel();
    WATCHING.lock().unwrap_or_else(|e| e.into_inner()).insert(pid, tx);
    rx
}

/// Reaps every child that has exited (call on SIGCHLD): watched ones are
/// reported, the rest (orphans adopted as subreaper) just collected.
pub fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                let Some(pid) = status.pid() else { continue };
                if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                    continue;
                }
                let watcher = WATCHING.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid.as_raw());
                if let Some(tx) = watcher {
                    // A watcher that went away no longer cares.
                    tx.send(status).ok();
                }
            }
        }
    }
}

/// CPU time used by a worker (its process tree, or its container) by a
/// moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: tokio::time::Instant,
    pub cpu_seconds: f64,
}

/// Percent of one CPU used between two samples.
pub fn cpu_percent(from: &Sample, to: &Sample) -> f64 {
    let secs = to.at.duration_since(from.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (to.cpu_seconds - from.cpu_seconds).max(0.0) / secs * 100.0
}
