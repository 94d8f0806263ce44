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

/// Kills slot 0's worker, waits for its replacement, and stops the pool.
fn replaced_and_stopped(pool: &Pool, how: &str) {
    let running = |pool: &Pool| {
        pool.try_i64("SELECT pid FROM clx_pool_slots WHERE worker_type = 'w' AND slot = 0 AND state = 'running'")
    };
    let worker = wait_for("slot 0's worker", Duration::from_secs(30), || running(pool));
    common::kill9(worker as i32);
    wait_for(&format!("{how}: a replacement"), Duration::from_secs(20), || {
        running(pool).filter(|pid| *pid != worker)
    });
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    assert!(out.status.success(), "{how}: {}", stderr(&out));
}

/// Its stderr gone — the pipe's reader exited, or the terminal closed — the
/// supervisor logs on (the lines are dropped and counted), replaces a
/// killed worker, and stops cleanly.
#[test]
fn a_gone_stderr_never_stops_supervision() {
    // A pipe whose reader goes away at once.
    let pool = Pool::new("", &sh_workers("w", 2, COPY));
    let mut child = std::process::Command::new(common::bin())
        .args(["start", "--config"])
        .arg(pool.config())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let mut supervisor = common::OwnedChild(child);
    replaced_and_stopped(&pool, "closed pipe");
    let status = wait_for("the supervisor to exit", Duration::from_secs(10), || {
        supervisor.0.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "closed pipe");

    // A terminal (pty) that goes away: a helper starts the supervisor on
    // it, waits for its pool, closes the terminal and exits.
    let pool = Pool::new("", &sh_workers("w", 2, COPY));
    let script = format!(
        "import os, pty, sqlite3, time\n\
         pid, fd = pty.fork()\n\
         if pid == 0:\n    os.execv({bin:?}, [{bin:?}, 'start', '--config', {cfg:?}])\n\
         print(pid, flush=True)\n\
         for _ in range(600):\n\
         \x20   try:\n\
         \x20       if sqlite3.connect({db:?}).execute(\"SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'\").fetchone()[0] == 2: break\n\
         \x20   except Exception: pass\n\
         \x20   time.sleep(0.05)\n\
         os.close(fd)\n",
        bin = common::bin(),
        cfg = pool.config().to_str().unwrap(),
        db = pool.db_path().to_str().unwrap()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let pid: i32 = stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", stderr(&out)));
    let _supervisor = common::ChildGuard(Some(pid));
    assert!(common::alive(pid), "the supervisor died with its terminal");
    replaced_and_stopped(&pool, "vanished terminal");
    wait_for("the supervisor to exit", Duration::from_secs(10), || {
        (!common::alive(pid)).then_some(())
    });
}

/// Runs a clx-pool command that must end within `limit`; its output.
fn within(limit: Duration, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let child = std::process::Command::new(common::bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::OwnedChild(child);
    let what = format!("{args:?} to end");
    wait_for(&what, limit, || child.0.try_wait().unwrap());
    let mut out = std::process::Output {
        status: child.0.try_wait().unwrap().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    child.0.stdout.take().unwrap().read_to_end(&mut out.stdout).unwrap();
    child.0.stderr.take().unwrap().read_to_end(&mut out.stderr).unwrap();
    out
}

fn mkfifo(path: &std::path::Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A config (or database) that is a FIFO is refused at once: reading it
/// would wait for a writer for ever. A reload of one leaves the running
/// pool as it was, supervising.
#[test]
fn a_fifo_is_refused_at_once_and_never_freezes_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pool.toml");
    mkfifo(&fifo);
    for cmd in ["check", "start"] {
        let out = within(
            Duration::from_secs(10),
            &[cmd.as_ref(), "--config".as_ref(), fifo.as_os_str()],
        );
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("a FIFO, not a regular file"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
    let db = dir.path().join("jobs.db");
    mkfifo(&db);
    let out = within(
        Duration::from_secs(10),
        &["stats".as_ref(), "--db".as_ref(), db.as_os_str()],
    );
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("a FIFO, not a regular file"), "{}", stderr(&out));

    let mut pool = Pool::new("", &sh_workers("w", 1, COPY));
    pool.start_ready();
    std::fs::remove_file(pool.config()).unwrap();
    mkfifo(&pool.config());
    let out = within(
        Duration::from_secs(15),
        &["reload".as_ref(), "--db".as_ref(), pool.db_path().as_os_str()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("a FIFO, not a regular file"), "{}", stderr(&out));
    common::signal(pool.supervisor_pid(), nix::sys::signal::Signal::SIGHUP);
    replaced_and_stopped_one(&pool);
}

/// Kills the one worker of `w`, waits for its replacement, stops the pool.
fn replaced_and_stopped_one(pool: &Pool) {
    replaced_and_stopped(pool, "after a FIFO");
}
