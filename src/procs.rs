//! Process helpers on Linux: identifying a process by its start time (so a
//! recorded pid that was reused is never killed), signalling process
//! groups, and confirming a group is empty. ESRCH means "already gone".

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`
/// field 22): with the pid, it identifies one process for its whole life.
pub fn start_ticks(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if `pid` is alive (a zombie counts as gone) and started at `ticks`.
pub fn is_same_process(pid: i32, ticks: i64) -> bool {
    start_ticks(pid) == Some(ticks) && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
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
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    let mut f = rest.split_whitespace();
                    let state = f.next()?;
                    let pgrp: i32 = f.nth(1)?.parse().ok()?;
                    Some(state != "Z" && pgrp == pgid)
                })
                .unwrap_or(false)
        })
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
        let _ = signal_group(pgid, Signal::SIGKILL);
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
    let _ = signal_group(pid, Signal::SIGTERM);
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
        assert!(is_same_process(me, t));
        assert!(!is_same_process(me, t + 1));
    }
}
