//! Supervision never stops: hostile or careless local clients, files that
//! disappear, descriptors that run out, a closed stderr, a crash. Real
//! processes, real sockets, real SQLite files.

mod common;

use std::time::{Duration, Instant};

use common::{COPY, Pool, sh_workers, stderr, stdout, wait_for};

/// Idle workers told to leave go at once, not at their next heartbeat: a
/// rolling restart of idle workers takes moments, not heartbeat intervals.
#[test]
fn idle_workers_told_to_leave_go_at_once() {
    // Heartbeats every 10 s: an idle worker sleeps that long between looks.
    let mut pool = Pool::new("heartbeat_timeout = \"30s\"\n", &sh_workers("w", 3, COPY));
    pool.start_ready();
    let started = Instant::now();
    let child = std::process::Command::new(common::bin())
        .args(["restart", "w", "--rolling", "--db"])
        .arg(pool.db_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::OwnedChild(child);
    let status = wait_for(
        "the rolling restart of three idle workers",
        Duration::from_secs(8),
        || child.0.try_wait().unwrap(),
    );
    assert!(status.success(), "{:?}", started.elapsed());
    let out = pool.cli(&["scale", "w=0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the idle workers to retire", Duration::from_secs(8), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots")? == 0).then_some(())
    });
    let _ = stdout(&out);
}
