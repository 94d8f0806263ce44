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

/// A sample: its name, its labels, its value.
type Sample = (String, std::collections::BTreeMap<String, String>, f64);

/// Parses an OpenMetrics text with the reference parser (prometheus_client):
/// its samples, or the parser's error.
fn parse_metrics(python: &std::path::Path, text: &str) -> Result<Vec<Sample>, String> {
    use std::io::Write;
    let script = "import json, sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        try:\n    fams = list(text_string_to_metric_families(sys.stdin.read()))\n\
        except Exception as e:\n    print(json.dumps({'error': repr(e)})); sys.exit(0)\n\
        print(json.dumps({'samples': [[s.name, s.labels, s.value] for f in fams for s in f.samples]}))\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if let Some(e) = json.get("error") {
        return Err(e.to_string());
    }
    Ok(json["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (s[0].as_str().unwrap().to_string(), labels, s[2].as_f64().unwrap())
        })
        .collect())
}

/// Job types and worker types are anyone's to choose (a job queued, a
/// worker run by hand): whatever they hold, the metrics stay well-formed —
/// the reference parser reads every series, with the exact values, and no
/// series is forged.
#[test]
fn metrics_are_well_formed_whatever_the_job_and_worker_types() {
    let Some(python) = common::tools_python() else { return };
    let mut pool = Pool::new("", &sh_workers("copy", 1, COPY));
    pool.start_ready();
    // Fuzzed names, from a fixed seed, with the characters that matter.
    let alphabet: Vec<char> = "ab \"\\\n{}=,#;:'\t\rüÿ✓💥/_-.0".chars().collect();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut names: Vec<String> = vec![
        "x\"} 1\nforged_series{a=\"b\"} 99\n# EOF\n".into(),
        "quote\"".into(),
        "back\\slash".into(),
        "new\nline".into(),
    ];
    for _ in 0..40 {
        let len = 1 + next() % 12;
        names.push(
            (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect(),
        );
    }
    names.sort();
    names.dedup();
    let c = pool.conn();
    for (i, name) in names.iter().enumerate() {
        for _ in 0..=i % 3 {
            c.execute(
                "INSERT INTO jobs (job_type, status, input_file, output_file, content_hash, payload)
                 VALUES (?1, 'pending', 'in', 'out', 'h', '{}')",
                [name],
            )
            .unwrap();
        }
        c.execute(
            "INSERT INTO workers (worker_type, container_id, status) VALUES (?1, ?2, 'idle')",
            rusqlite::params![name, format!("by-hand-{i}")],
        )
        .unwrap();
    }
    let out = pool.cli(&["stats", "--prometheus"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let samples = parse_metrics(&python, &text).unwrap_or_else(|e| panic!("the scrape does not parse: {e}\n{text}"));
    assert!(
        samples.iter().all(|(n, _, _)| n.starts_with("clx_pool_")),
        "forged series: {:?}",
        samples
            .iter()
            .filter(|(n, _, _)| !n.starts_with("clx_pool_"))
            .collect::<Vec<_>>()
    );
    for (i, name) in names.iter().enumerate() {
        let depth = samples
            .iter()
            .find(|(n, l, _)| n == "clx_pool_queue_depth" && l.get("worker_type") == Some(name))
            .unwrap_or_else(|| panic!("no queue depth for {name:?}"));
        assert_eq!(depth.2, (i % 3 + 1) as f64, "{name:?}");
        assert!(
            samples.iter().any(|(n, l, v)| n == "clx_pool_workers"
                && l.get("worker_type") == Some(name)
                && l.get("state").map(String::as_str) == Some("idle")
                && *v == 1.0),
            "no worker series for {name:?}"
        );
    }
}

/// Hundreds of idle and half-sent connections to the control socket and to
/// `/metrics` (anyone on the machine may connect there), under a lowered
/// descriptor limit: the listeners cap and time them out, so a killed
/// worker is still replaced at once, the accept loops never spin, and the
/// pool stops cleanly.
#[test]
fn idle_and_half_sent_connections_never_stop_supervision() {
    use std::io::Write;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut pool = Pool::new(
        &format!("metrics_listen = \"127.0.0.1:{port}\"\ncheck_interval = \"200ms\"\n"),
        &sh_workers("w", 2, COPY),
    );
    let log = std::fs::File::create(pool.path("supervisor.log")).unwrap();
    let child = std::process::Command::new("prlimit")
        .args(["--nofile=200:200", common::bin(), "start", "--config"])
        .arg(pool.config())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    pool.supervisor = Some(child);
    let out = pool.cli(&["wait", "--ready", "--timeout", "30s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    let socket = format!("{}.sock", pool.db_path().display());
    // (Each listener's backlog holds 128 beyond what it accepted; more
    // would wait in connect.)
    let mut held = Vec::new();
    for i in 0..150 {
        let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        if i % 2 == 0 {
            unix.write_all(b"{\"command\": ").unwrap();
        }
        held.push(Box::new(unix) as Box<dyn std::any::Any>);
    }
    for i in 0..140 {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        held.push(Box::new(tcp));
    }
    let supervisor = pool.supervisor_pid();
    let fds = std::fs::read_dir(format!("/proc/{supervisor}/fd")).unwrap().count();
    assert!(fds < 200, "the supervisor holds {fds} descriptors");
    replaced_and_stopped(&pool, "under a flood of connections");
    let status = pool.wait_supervisor_exit(Duration::from_secs(20));
    assert_eq!(status, 0, "{}", pool.supervisor_log());
    let complaints = pool.supervisor_log().matches("cannot accept").count();
    assert!(
        complaints <= 4,
        "{complaints} accept warnings:\n{}",
        pool.supervisor_log()
    );
    drop(held);
}

/// The control socket, removed by someone, is made again: `scale` and
/// `stop` reach the supervisor.
#[test]
fn a_removed_control_socket_is_made_again() {
    let mut pool = Pool::new("", &sh_workers("w", 1, COPY));
    pool.start_ready();
    std::fs::remove_file(format!("{}.sock", pool.db_path().display())).unwrap();
    wait_for("the control socket to answer again", Duration::from_secs(20), || {
        pool.cli(&["scale", "w=2"]).status.success().then_some(())
    });
    wait_for("two workers", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'")? == 2).then_some(())
    });
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped the supervisor"), "{}", stdout(&out));
}

/// A bell removed by someone is made again, and the workers that opened
/// the old one still hear it: idle workers are woken by jobs at once, not
/// at their next heartbeat (every 10 s here).
#[test]
fn a_removed_bell_still_wakes_the_idle_workers() {
    let mut pool = Pool::new("heartbeat_timeout = \"60s\"\n", &sh_workers("w", 2, COPY));
    pool.start_ready();
    let bell = pool.path(".jobs.db.bell-w");
    assert!(bell.exists());
    std::fs::remove_file(&bell).unwrap();
    // Workers started after the removal wait on the bell made again.
    let out = pool.cli(&["scale", "w=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the bell to be made again", Duration::from_secs(10), || {
        bell.exists().then_some(())
    });
    wait_for("three workers", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle'")? == 3).then_some(())
    });
    for i in 0..5 {
        let job = pool.submit_with("w", &format!("b{i}.txt"), &[]);
        let out = pool.cli(&["wait", "--jobs", &job.to_string(), "--timeout", "5s"]);
        assert!(
            out.status.success(),
            "job {i} was not picked up at once: {}",
            stderr(&out)
        );
    }
}

/// The database deleted under a running pool: the supervisor says so and
/// stops the pool cleanly, instead of running on unseen.
#[test]
fn a_deleted_database_stops_the_pool_with_a_clear_error() {
    let mut pool = Pool::new("", &sh_workers("w", 2, COPY));
    pool.start_ready();
    let workers = pool.processes();
    assert!(!workers.is_empty());
    std::fs::remove_file(pool.db_path()).unwrap();
    let code = pool.wait_supervisor_exit(Duration::from_secs(20));
    assert_eq!(code, 1, "{}", pool.supervisor_log());
    assert!(
        pool.supervisor_log().contains("was deleted while the pool ran"),
        "{}",
        pool.supervisor_log()
    );
    assert!(workers.iter().all(|p| !common::alive(*p)), "workers left running");
}

/// A database deep in a folder tree: its socket's path is longer than a
/// socket address holds; the pool starts, answers and stops all the same.
#[test]
fn a_database_path_longer_than_a_socket_address_works() {
    let dir = tempfile::Builder::new().prefix("clx-pool-test-").tempdir().unwrap();
    let deep = dir
        .path()
        .join("a-rather-long-folder-name-".repeat(5))
        .join("and-one-more-level-of-it");
    std::fs::create_dir_all(&deep).unwrap();
    let db = deep.join("jobs.db");
    assert!(format!("{}.sock", db.display()).len() > 107);
    let mut pool = Pool::with_db("", &sh_workers("w", 1, COPY), &db);
    pool.start_ready();
    let out = pool.cli(&["scale", "w=2"]);
    assert!(out.status.success(), "{}{}", stderr(&out), pool.supervisor_log());
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped the supervisor"), "{}", stdout(&out));
}

/// The database's folder seen read-only (a mounted snapshot): `stats` and
/// `jobs` read it, as docs/cli.md promises.
#[test]
fn stats_and_jobs_read_a_database_on_a_read_only_file_system() {
    if !nix::unistd::geteuid().is_root() {
        common::skip("a read-only bind mount needs root");
        return;
    }
    let mut pool = Pool::new("", &sh_workers("w", 1, COPY));
    pool.start_ready();
    let job = pool.submit_with("w", "a.txt", &[]);
    pool.drained("30s");
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The same folder, mounted read-only elsewhere.
    let ro = tempfile::tempdir().unwrap();
    let mount = |args: &[&str]| {
        let out = std::process::Command::new("mount").args(args).output().unwrap();
        assert!(out.status.success(), "mount {args:?}: {}", stderr(&out));
    };
    let (from, to) = (pool.dir.path().to_str().unwrap(), ro.path().to_str().unwrap());
    mount(&["--bind", from, to]);
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).output();
        }
    }
    let _mounted = Unmount(to.to_string());
    mount(&["-o", "remount,bind,ro", to]);
    let db = ro.path().join("jobs.db");
    let out = pool.cli(&["stats", "--json", "--db", db.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["jobs"]["completed"], 1, "{json}");
    let out = pool.cli(&["jobs", "show", &job.to_string(), "--db", db.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("completed"), "{}", stdout(&out));
}

/// After kill -9 of the supervisor, `stats` says its run ended without
/// stopping its pool, and about when — also once its guard cleaned up.
#[test]
fn after_a_kill_stats_says_the_run_ended_uncleanly_and_when() {
    let mut pool = Pool::new("", &sh_workers("w", 1, COPY));
    pool.start_ready();
    common::kill9(pool.supervisor_pid());
    pool.wait_supervisor_exit(Duration::from_secs(10));
    // The guard cleans up (its rows dead) within moments.
    wait_for("the guard's cleanup", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'")? == 0).then_some(())
    });
    let out = pool.cli(&["stats", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["supervisor"]["stopped_uncleanly"], true, "{json}");
    assert!(json["supervisor"]["ended_uncleanly_at"].is_string(), "{json}");
    let text = stdout(&pool.cli(&["stats"]));
    assert!(
        text.contains("ended without stopping its pool (killed or crashed) at about"),
        "{text}"
    );
}

/// A guard that dies is reported and replaced; the new one cleans up after
/// a later kill of the supervisor.
#[test]
fn a_guard_that_dies_is_replaced() {
    let events = tempfile::NamedTempFile::new().unwrap();
    let hook = format!(
        "on_event = [\"sh\", \"-c\", {}]\n",
        common::toml_str(&format!(
            "cat >> {}; echo >> {}",
            events.path().display(),
            events.path().display()
        ))
    );
    let mut pool = Pool::new(&hook, &sh_workers("w", 1, &common::ledger_job("60")));
    pool.start_ready();
    let first = pool.guard_pid();
    common::kill9(first);
    let second = wait_for("a new guard", Duration::from_secs(20), || {
        let g = pool.guard_pid();
        (g != first).then_some(g)
    });
    wait_for("the event", Duration::from_secs(20), || {
        std::fs::read_to_string(events.path())
            .ok()?
            .contains("guard_restarted")
            .then_some(())
    });
    assert!(
        pool.supervisor_log().contains("the guard ended"),
        "{}",
        pool.supervisor_log()
    );
    // A job command running; then the supervisor dies: the new guard kills
    // what the run left.
    pool.submit_with("w", "j.txt", &[]);
    wait_for("the job command", Duration::from_secs(20), || {
        pool.path("workspace/ledger").exists().then_some(())
    });
    let left = pool.processes();
    assert!(!left.is_empty());
    common::kill9(pool.supervisor_pid());
    pool.wait_supervisor_exit(Duration::from_secs(10));
    wait_for("the new guard's cleanup", Duration::from_secs(20), || {
        left.iter().all(|p| !common::alive(*p)).then_some(())
    });
    wait_for("the new guard to finish", Duration::from_secs(20), || {
        (!common::alive(second)).then_some(())
    });
}

/// A worker log that cannot be opened (here a folder took its name) is a
/// fault outside the worker: its slot cools down and tries again, saying
/// which file, and comes back once the file can be opened.
#[test]
fn an_unopenable_log_file_cools_down_and_comes_back() {
    let mut pool = Pool::new(
        "restart_limit = 2\nrestart_window = \"30s\"\nrestart_backoff = \"50ms\"\nrestart_cooldown = \"2s\"\n",
        &sh_workers("w", 1, COPY),
    );
    pool.start_ready();
    let log = pool.path("logs/w-0.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let (pid, _) = pool.slot_worker("w", 0);
    common::kill9(pid);
    let why = wait_for("the slot to cool down", Duration::from_secs(20), || {
        pool.query_strings("SELECT COALESCE(note, '') FROM clx_pool_slots WHERE state = 'backoff'")
            .pop()
            .filter(|n| n.contains("outside the worker"))
    });
    assert!(why.contains(&log.display().to_string()), "{why}");
    assert!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'failed'") == 0,
        "given up"
    );
    let causes = pool.query_strings("SELECT cause FROM clx_pool_events WHERE event = 'spawn-failed'");
    assert!(causes.iter().any(|c| c.contains("w-0.log")), "{causes:?}");
    std::fs::remove_dir(&log).unwrap();
    wait_for("the slot to come back", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'")? == 1).then_some(())
    });
}
