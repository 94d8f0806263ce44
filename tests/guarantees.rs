//! The guarantees of SPEC §5 where run-time control, clock steps, database
//! locks and workers the pool did not start meet: every job runs exactly
//! once (a command starts again only when its holder is known dead or
//! hung), and nothing outlives its job or the pool. Real processes, real
//! SQLite files.

mod common;

use std::time::Duration;

use common::{Pool, ledger_job, sh_workers, stderr, stdout, wait_for};

/// How many times each job's command started, by job id.
fn starts(pool: &Pool) -> std::collections::BTreeMap<i64, usize> {
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for line in ledger.lines() {
        *out.entry(line.trim().parse::<i64>().unwrap()).or_insert(0) += 1;
    }
    out
}

/// Every job in `ids` ran its command once and completed on attempt 1.
fn each_once(pool: &Pool, ids: &[i64]) {
    let ran = starts(pool);
    let twice: Vec<_> = ran.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "jobs whose command ran more than once: {twice:?}\n{:#?}\n{}",
        pool.query_strings(
            "SELECT 'job ' || id || ' ' || status || ' attempts ' || attempts || ': ' || COALESCE(error, '') FROM jobs"
        ),
        pool.supervisor_log()
    );
    assert_eq!(ran.keys().copied().collect::<Vec<_>>(), ids, "every job ran");
    let bad = pool.query_strings(
        "SELECT id || ' ' || status || ' attempts ' || attempts || ' ' || COALESCE(error, '') FROM jobs
         WHERE status != 'completed' OR attempts != 1",
    );
    assert!(bad.is_empty(), "{bad:#?}\n{}", pool.supervisor_log());
}

fn scale(pool: &Pool, to: &str) {
    let out = pool.cli(&["scale", to]);
    assert!(
        out.status.success(),
        "scale {to}: {}{}",
        stderr(&out),
        pool.supervisor_log()
    );
}

fn busy(pool: &Pool) -> i64 {
    pool.try_i64("SELECT COUNT(*) FROM workers WHERE status = 'busy'")
        .unwrap_or(0)
}

/// Scaling down while workers are busy and up again at once: the new
/// workers never take the identity of the draining ones, whose retirement
/// then touches only its own records; no job is taken from a live worker.
#[test]
fn scaling_down_and_up_while_busy_runs_every_job_once() {
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &sh_workers("w", 2, &ledger_job("8")));
    pool.start_ready();
    let mut ids: Vec<i64> = (0..2)
        .map(|i| pool.submit_with("w", &format!("a{i}.txt"), &[]))
        .collect();
    wait_for("both workers busy", Duration::from_secs(20), || {
        (busy(&pool) == 2).then_some(())
    });
    // Down to 1 and back to 2: one worker drains its job meanwhile.
    scale(&pool, "w=1");
    scale(&pool, "w=2");
    ids.extend((0..2).map(|i| pool.submit_with("w", &format!("b{i}.txt"), &[])));
    // To 0 and back: both drain.
    wait_for("three workers busy", Duration::from_secs(30), || {
        (busy(&pool) >= 3).then_some(())
    });
    scale(&pool, "w=0");
    scale(&pool, "w=2");
    ids.extend((0..2).map(|i| pool.submit_with("w", &format!("c{i}.txt"), &[])));
    pool.drained("120s");
    each_once(&pool, &ids);
    // Two slots in the end, each running its own worker, and stats agree.
    wait_for("the drained slots to retire", Duration::from_secs(30), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots")? == 2).then_some(())
    });
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["pools"]["w"]["running"], 2, "{json}");
    let live = pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'");
    assert_eq!(live, 2, "{}", stdout(&pool.cli(&["stats", "--workers"])));
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event NOT IN ('retired')"),
        0,
        "only retirements: {:?}",
        pool.query_strings("SELECT event || ' ' || worker_id || ' ' || cause FROM clx_pool_events")
    );
}

/// A worker told to leave after its job is still supervised: a job that
/// never ends is found past `max_job_time`, and its worker stopped.
#[test]
fn a_draining_worker_whose_job_never_ends_is_stopped_as_hung() {
    let workers = format!(
        "{}max_job_time = \"3s\"\n",
        sh_workers(
            "w",
            1,
            "echo \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; exec sleep 1000"
        )
    );
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &workers);
    pool.start_ready();
    let job = pool.submit_with("w", "a.txt", &["--max-attempts", "1"]);
    wait_for("the job to run", Duration::from_secs(20), || {
        (busy(&pool) == 1).then_some(())
    });
    scale(&pool, "w=0");
    let status = wait_for("the job to end", Duration::from_secs(30), || {
        let s = pool.query_strings(&format!("SELECT status FROM jobs WHERE id = {job}"));
        (s[0] != "processing").then(|| s[0].clone())
    });
    assert_eq!(status, "failed", "its one attempt was used");
    let cause = pool.first_cause("hung");
    assert!(cause.contains("longer than max_job_time 3s"), "{cause}");
    wait_for("the slot to retire", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots")? == 0).then_some(())
    });
    assert!(pool.processes().is_empty(), "the job's command is gone");
}

/// Runs a worker by hand on the pool's database (as docs/cli.md shows):
/// the built-in one with `job`, or the Python CLX worker of the tests.
fn hand_worker(pool: &Pool, worker_type: &str, id: &str, job: Option<&str>) -> common::OwnedChild {
    let mut cmd = match job {
        Some(script) => {
            let mut c = std::process::Command::new(common::bin());
            c.args(["worker", "--", "sh", "-c", script]);
            c
        }
        None => {
            let mut c = std::process::Command::new("python3");
            c.arg(common::repo_path("tests/workers/clx_protocol_worker.py"));
            c
        }
    };
    let log = std::fs::File::create(pool.path(&format!("{id}.log"))).unwrap();
    let child = cmd
        .env("WORKER_TYPE", worker_type)
        .env("WORKER_ID", id)
        .env("DB_PATH", pool.db_path())
        .env("CLM_JOBS_DB_PATH", pool.db_path())
        .env("WORKSPACE_PATH", pool.path("workspace"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    common::OwnedChild(child)
}

/// Jobs held by live workers the pool did not start are theirs: the
/// reconciliation leaves them alone, under both protocols.
#[test]
fn jobs_of_workers_the_pool_did_not_start_are_left_to_them() {
    for protocol in ["clx", "clm"] {
        let mut pool = Pool::new(
            &format!("protocol = \"{protocol}\"\ncheck_interval = \"200ms\"\n"),
            &sh_workers("own", 1, common::COPY),
        );
        pool.start_ready();
        let _builtin = hand_worker(&pool, "byhand", "by-hand-1", Some(&ledger_job("8")));
        let _python = (protocol == "clx").then(|| hand_worker(&pool, "python", "by-hand-2", None));
        wait_for("the hand-run workers to register", Duration::from_secs(20), || {
            let want = if protocol == "clx" { 2 } else { 1 };
            (pool.try_i64("SELECT COUNT(*) FROM workers WHERE container_id LIKE 'by-hand-%'")? == want).then_some(())
        });
        let mut ids = vec![pool.submit_with("byhand", "h.txt", &[])];
        if protocol == "clx" {
            ids.push(pool.submit_with("python", "p.txt", &["--payload", "{\"sleep\": 8}"]));
        }
        pool.drained("60s");
        assert_eq!(
            starts(&pool).get(&ids[0]),
            Some(&1),
            "{protocol}: the built-in worker's job ran once"
        );
        let bad = pool.query_strings(
            "SELECT id || ' ' || status || ' attempts ' || attempts || ' ' || COALESCE(error, '') FROM jobs
             WHERE status != 'completed' OR attempts != 1",
        );
        assert!(bad.is_empty(), "{protocol}: {bad:#?}\n{}", pool.supervisor_log());
        assert!(
            !pool.supervisor_log().contains("put them back"),
            "{protocol}: {}",
            pool.supervisor_log()
        );
    }
}

/// libfaketime, which moves the real-time clock of the processes it is
/// preloaded into (Debian's `faketime`); None (skipped with a message)
/// without it, except under CI=true, where .ci/run installs it.
fn faketime() -> Option<&'static str> {
    const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    if std::path::Path::new(LIB).exists() {
        return Some(LIB);
    }
    common::skip("clock-step tests need libfaketime (apt-get install faketime)");
    None
}

/// A pool whose processes all read the real-time clock through
/// libfaketime, offset by what the file `clock` says ("+0", "+3600", …);
/// the monotonic clock is left alone, as a real clock step leaves it.
fn pool_with_clock(pool_extra: &str, workers: &str) -> Option<Pool> {
    let lib = faketime()?;
    let pool = Pool::new(pool_extra, workers);
    std::fs::write(pool.path("clock"), "+0").unwrap();
    let clock = pool.path("clock").to_string_lossy().into_owned();
    Some(
        pool.with_env("LD_PRELOAD", lib)
            .with_env("FAKETIME_TIMESTAMP_FILE", &clock)
            .with_env("FAKETIME_CACHE_DURATION", "1")
            .with_env("DONT_FAKE_MONOTONIC", "1"),
    )
}

fn step_clock(pool: &Pool, offset: &str) {
    std::fs::write(pool.path("clock"), offset).unwrap();
}

fn slot_pids(pool: &Pool) -> Vec<i64> {
    let c = pool.conn();
    let mut stmt = c
        .prepare("SELECT pid FROM clx_pool_slots WHERE state = 'running' ORDER BY worker_type, slot")
        .unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// Worker ends recorded so far, as "event cause".
fn ends(pool: &Pool) -> Vec<String> {
    pool.query_strings("SELECT event || ' ' || worker_id || ': ' || COALESCE(cause, '') FROM clx_pool_events")
}

/// The real-time clock jumps an hour ahead: no idle worker is taken for
/// hung, no job is taken for too long, nothing runs twice.
#[test]
fn a_clock_step_forward_kills_nobody_and_runs_nothing_twice() {
    let workers = format!(
        "{}max_job_time = \"60s\"\n\n{}",
        sh_workers("busy", 1, &ledger_job("8")),
        sh_workers("idle", 3, common::COPY)
    );
    let Some(mut pool) = pool_with_clock("check_interval = \"200ms\"\nheartbeat_timeout = \"3s\"\n", &workers) else {
        return;
    };
    pool.start_ready();
    let job = pool.submit_with("busy", "a.txt", &[]);
    wait_for("the job to run", Duration::from_secs(20), || {
        (busy(&pool) == 1).then_some(())
    });
    let before = slot_pids(&pool);
    step_clock(&pool, "+3600");
    // Through several heartbeat timeouts, and past the job's end.
    std::thread::sleep(Duration::from_secs(4));
    pool.drained("60s");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ends(&pool), Vec::<String>::new(), "{}", pool.supervisor_log());
    assert_eq!(slot_pids(&pool), before);
    each_once(&pool, &[job]);
}

/// The real-time clock jumps an hour back: a worker that stops answering
/// is still found hung within its heartbeat_timeout, not an hour later.
#[test]
fn a_clock_step_back_does_not_hide_a_hung_worker() {
    let Some(mut pool) = pool_with_clock(
        "check_interval = \"200ms\"\nheartbeat_timeout = \"3s\"\n",
        &sh_workers("idle", 2, common::COPY),
    ) else {
        return;
    };
    pool.start_ready();
    let (pid, id) = pool.slot_worker("idle", 0);
    step_clock(&pool, "-3600");
    std::thread::sleep(Duration::from_secs(1));
    common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let cause = wait_for("the stopped worker to be found hung", Duration::from_secs(20), || {
        pool.try_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'hung'")
            .filter(|n| *n > 0)
            .map(|_| pool.cause_of(&id))
    });
    assert!(cause.contains("heartbeat"), "{cause}");
    let hung = pool.query_strings("SELECT worker_id FROM clx_pool_events WHERE event = 'hung'");
    assert_eq!(hung, vec![id], "only the stopped worker");
}

/// A write lock longer than heartbeat_timeout (and than a job's
/// max_job_time): no worker could heartbeat or record a result meanwhile,
/// so that time is no evidence against any of them.
#[test]
fn a_lock_longer_than_heartbeat_timeout_kills_nobody() {
    let workers = format!(
        "{}max_job_time = \"4s\"\n\n{}",
        sh_workers("busy", 1, &ledger_job("2")),
        sh_workers("idle", 3, common::COPY)
    );
    let mut pool = Pool::new("check_interval = \"200ms\"\nheartbeat_timeout = \"2s\"\n", &workers);
    pool.start_ready();
    let job = pool.submit_with("busy", "a.txt", &["--max-attempts", "1"]);
    wait_for("the job to run", Duration::from_secs(20), || {
        (busy(&pool) == 1).then_some(())
    });
    let before = slot_pids(&pool);
    common::WriteLock::hold(&pool.db_path(), Duration::from_secs(8)).join();
    pool.drained("60s");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ends(&pool), Vec::<String>::new(), "{}", pool.supervisor_log());
    assert_eq!(slot_pids(&pool), before);
    each_once(&pool, &[job]);
}

/// The config of the storm test: `w` with its count and a setting that a
/// reload sees as a change.
fn storm_config(pool: &Pool, count: u32, flavour: u32) -> String {
    let config = std::fs::read_to_string(pool.config()).unwrap();
    let head = &config[..config.find("[[workers]]").unwrap()];
    format!(
        "{head}{}env = {{ FLAVOUR = \"{flavour}\" }}\n",
        sh_workers("w", count, &ledger_job("0.5"))
    )
}

/// Fifty requests at once (scale, rolling restarts, reloads, SIGHUP), then a
/// last `scale w=3`: every request is answered or refused in time, the last
/// scale is what the pool ends with, and every job runs once.
#[test]
fn a_storm_of_control_requests_is_answered_and_the_last_scale_wins() {
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &sh_workers("w", 2, &ledger_job("0.5")));
    std::fs::write(pool.config(), storm_config(&pool, 2, 0)).unwrap();
    pool.start_ready();
    let ids: Vec<i64> = (0..10)
        .map(|i| pool.submit_with("w", &format!("a{i}.txt"), &[]))
        .collect();
    let db = pool.db_path();
    let mut clients = Vec::new();
    for i in 0..50u32 {
        let args: Vec<String> = match i % 5 {
            0 | 3 => vec!["scale".into(), format!("w={}", (i * 7) % 6)],
            1 => vec!["restart".into(), "w".into(), "--rolling".into()],
            2 => {
                std::fs::write(pool.config(), storm_config(&pool, 2 + i % 3, i)).unwrap();
                vec!["reload".into()]
            }
            _ => {
                common::signal(pool.supervisor_pid(), nix::sys::signal::Signal::SIGHUP);
                vec!["restart".into(), format!("w-{}", i % 4)]
            }
        };
        let mut cmd = std::process::Command::new(common::bin());
        cmd.args(&args).arg("--db").arg(&db);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        clients.push((args.join(" "), std::time::Instant::now(), cmd.spawn().unwrap()));
    }
    let more: Vec<i64> = (0..10)
        .map(|i| pool.submit_with("w", &format!("b{i}.txt"), &[]))
        .collect();
    // Every client hears back (its answer or a refusal) within a minute.
    for (what, started, child) in clients {
        let mut child = common::OwnedChild(child);
        let status = wait_for(&format!("`{what}` to be answered"), Duration::from_secs(60), || {
            child.0.try_wait().unwrap()
        });
        let mut out = String::new();
        use std::io::Read;
        child.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        child.0.stderr.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(
            matches!(status.code(), Some(0 | 1)),
            "`{what}` after {:?}: {status:?} {out}",
            started.elapsed()
        );
    }
    std::fs::write(pool.config(), storm_config(&pool, 3, 99)).unwrap();
    scale(&pool, "w=3");
    pool.drained("120s");
    let mut all = ids.clone();
    all.extend(more);
    each_once(&pool, &all);
    wait_for("three slots of w", Duration::from_secs(60), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = 'w' AND state = 'running'")? == 3
            && pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots")? == 3)
            .then_some(())
    });
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["pools"]["w"]["wanted"], 3, "{json}");
    assert_eq!(json["pools"]["w"]["running"], 3, "{json}");
}

/// A reload whose new worker program cannot start stops its roll-out at
/// the first failure: the workers not yet replaced keep running, the one
/// that failed starts again with the setup it had, and `reload` says so.
#[test]
fn a_reload_that_breaks_the_workers_rolls_back_and_keeps_the_old_ones() {
    let python = |t: &str, n: u32, command: &str| {
        format!("[[workers]]\nworker_type = \"{t}\"\ncount = {n}\ncommand = {command}\n")
    };
    let worker = format!(
        "[\"python3\", {}]",
        common::toml_str(
            common::repo_path("tests/workers/clx_protocol_worker.py")
                .to_str()
                .unwrap()
        )
    );
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &python("rev", 3, &worker));
    pool.start_ready();
    let before = slot_pids(&pool);
    let config = std::fs::read_to_string(pool.config()).unwrap();
    let head = &config[..config.find("[[workers]]").unwrap()];
    std::fs::write(
        pool.config(),
        format!(
            "{head}{}",
            python("rev", 3, "[\"sh\", \"-c\", \"echo broken >&2; exit 3\"]")
        ),
    )
    .unwrap();
    let out = pool.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("exited with code 3") && err.contains("roll-out stopped") && err.contains("not replaced: rev-"),
        "{err}"
    );
    // Three workers of the old setup: two never touched, one started again.
    let after = wait_for("three running workers", Duration::from_secs(30), || {
        let p = slot_pids(&pool);
        (p.len() == 3).then_some(p)
    });
    let kept = after.iter().filter(|p| before.contains(p)).count();
    assert_eq!(kept, 2, "{before:?} → {after:?}");
    for pid in after {
        assert!(common::cmdline(pid as i32).contains("clx_protocol_worker.py"), "{pid}");
    }
    let job = pool.submit("rev", "r.txt", "abc");
    let out = pool.cli(&["wait", "--jobs", &job.to_string(), "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The config in force is the one that runs: the next reload of the
    // same file tries again.
    let out = pool.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
}

/// Live processes whose command line is exactly `cmd`.
fn processes_named(cmd: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| common::alive(pid) && common::cmdline(pid).trim_end() == cmd)
        .collect()
}

/// Kills what a test left, whatever happened to it.
struct KillOnDrop(Vec<&'static str>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            for pid in processes_named(name) {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).ok();
            }
        }
    }
}

/// Whatever a job command starts ends with the job: a process in a new
/// session, a double fork, `nohup`, one that cleared its environment.
#[test]
fn nothing_a_job_command_starts_outlives_the_job() {
    let names = ["sleep 4101", "sleep 4102", "sleep 4103", "sleep 4104"];
    let _left = KillOnDrop(names.to_vec());
    let script = "setsid sleep 4101 </dev/null >/dev/null 2>&1 & \
                  ( sleep 4102 </dev/null >/dev/null 2>&1 & ) ; \
                  nohup sleep 4103 </dev/null >/dev/null 2>&1 & \
                  env -i setsid sleep 4104 </dev/null >/dev/null 2>&1 & \
                  sleep 0.3; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new("", &sh_workers("leaky", 1, script));
    pool.start_ready();
    for round in 0..3 {
        let job = pool.submit_with("leaky", &format!("l{round}.txt"), &[]);
        let out = pool.cli(&["wait", "--jobs", &job.to_string(), "--timeout", "30s"]);
        assert!(out.status.success(), "{}", stderr(&out));
        // Gone by the time the job is recorded, not at the pool's stop.
        for name in names {
            assert_eq!(
                processes_named(name),
                Vec::<i32>::new(),
                "round {round}: `{name}` outlived its job"
            );
        }
    }
    let (pid, _) = pool.slot_worker("leaky", 0);
    assert!(common::alive(pid), "the worker itself goes on");
}

/// A hook that hangs ends with the pool: when it stops, and when the
/// supervisor is killed.
#[test]
fn a_hanging_on_event_hook_ends_with_the_pool() {
    for kill in [false, true] {
        let name = if kill { "sleep 4112" } else { "sleep 4111" };
        let _left = KillOnDrop(vec![name]);
        let hook = format!(
            "on_event = [\"sh\", \"-c\", {}]\nrestart_limit = 1\n",
            common::toml_str(&format!("cat >/dev/null; {name}"))
        );
        let workers = format!(
            "{}\n[[workers]]\nworker_type = \"broken\"\ncommand = [\"sh\", \"-c\", \"exit 1\"]\n",
            sh_workers("copy", 1, "true")
        );
        let mut pool = Pool::new(&hook, &workers);
        pool.start();
        wait_for("the hook to run", Duration::from_secs(20), || {
            (!processes_named(name).is_empty()).then_some(())
        });
        if kill {
            common::kill9(pool.supervisor_pid());
            pool.wait_supervisor_exit(Duration::from_secs(10));
        } else {
            let out = pool.cli(&["stop", "--timeout", "30s"]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        wait_for(
            &format!("`{name}` to end (kill -9: {kill})"),
            Duration::from_secs(10),
            || processes_named(name).is_empty().then_some(()),
        );
    }
}

/// kill -9 of the supervisor, then at once a new `start`: the guard of the
/// dead one cleans up after its own run only, never the new workers. (The
/// old guard is held up until the new pool runs, as a loaded machine may.)
#[test]
fn the_guard_of_a_killed_supervisor_never_touches_the_next_pools_workers() {
    let mut pool = Pool::new("", &sh_workers("w", 3, &ledger_job("30")));
    pool.start_ready();
    // A busy worker, with a job command for the guard to kill.
    let job = pool.submit_with("w", "j.txt", &[]);
    wait_for("the job to run", Duration::from_secs(20), || {
        (starts(&pool).contains_key(&job)).then_some(())
    });
    let old = pool.processes();
    let guard = pool.guard_pid();
    common::signal(guard, nix::sys::signal::Signal::SIGSTOP);
    common::kill9(pool.supervisor_pid());
    pool.wait_supervisor_exit(Duration::from_secs(10));
    pool.start_ready();
    let workers = slot_pids(&pool);
    assert_eq!(workers.len(), 3);
    common::signal(guard, nix::sys::signal::Signal::SIGCONT);
    wait_for("the old guard to finish", Duration::from_secs(20), || {
        (!common::alive(guard)).then_some(())
    });
    for pid in &workers {
        assert!(
            common::alive(*pid as i32),
            "worker {pid} of the new pool was killed\n{}",
            pool.supervisor_log()
        );
    }
    let left: Vec<&i32> = old.iter().filter(|p| common::alive(**p)).collect();
    assert!(left.is_empty(), "processes of the old run left: {left:?}");
    let run_started = pool.query_strings("SELECT started_at FROM clx_pool_supervisor")[0].clone();
    let ends = pool.query_i64(&format!(
        "SELECT COUNT(*) FROM clx_pool_events WHERE at >= '{run_started}' AND event != 'stopped'"
    ));
    assert_eq!(ends, 0, "{:?}", self::ends(&pool));
}

/// Live built-in worker processes of the pool: (pid, WORKER_ID).
fn worker_processes(pool: &Pool) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = pool
        .processes()
        .into_iter()
        .filter(|&pid| common::cmdline(pid).contains(" worker "))
        .filter_map(|pid| Some((pid, common::env_of(pid, "WORKER_ID")?)))
        .collect();
    out.sort();
    out
}

/// The live workers `stats --workers` shows: (pid, worker id).
fn shown_workers(pool: &Pool) -> Vec<(i32, String)> {
    let out = pool.cli(&["stats", "--workers", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut shown: Vec<(i32, String)> = json["worker_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["pid"].as_i64().unwrap_or(0) as i32,
                w["worker_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    shown.sort();
    shown
}

/// A full disk while workers die and are replaced: once it has room
/// again, every worker process that runs is one `stats` shows, and every
/// one it shows runs.
#[test]
fn after_a_disk_full_spell_stats_shows_every_running_worker() {
    let Some(fs) = common::Tmpfs::mount("6m") else { return };
    let db = fs.path().join("jobs.db");
    let mut pool = Pool::with_db(
        "check_interval = \"200ms\"\nrestart_backoff = \"50ms\"\nrestart_cooldown = \"1s\"\n",
        &sh_workers("w", 3, common::COPY),
        &db,
    );
    pool.start_ready();
    let ids: Vec<i64> = (0..3)
        .map(|i| pool.submit_with("w", &format!("a{i}.txt"), &[]))
        .collect();
    pool.drained("30s");
    let filler = fs.fill("filler");
    for round in 0..3 {
        if let Some((pid, _)) = worker_processes(&pool).first() {
            common::kill9(*pid);
        }
        std::thread::sleep(Duration::from_millis(700 + 300 * round));
    }
    std::fs::remove_file(filler).unwrap();
    wait_for("three worker processes again", Duration::from_secs(60), || {
        (worker_processes(&pool).len() == 3
            && pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'")? == 3)
            .then_some(())
    });
    let more: Vec<i64> = (0..3)
        .map(|i| pool.submit_with("w", &format!("b{i}.txt"), &[]))
        .collect();
    pool.drained("60s");
    let running = worker_processes(&pool);
    assert_eq!(running.len(), 3, "{running:?}\n{}", pool.supervisor_log());
    assert_eq!(shown_workers(&pool), running, "{}", pool.supervisor_log());
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'"),
        (ids.len() + more.len()) as i64
    );
}

/// A job command that cannot be started for a reason that passes (the
/// process limit reached: fork fails with EAGAIN) is no failure of the
/// job: it goes back to the queue, its attempt not counted, and runs once
/// the limit allows.
#[test]
fn a_job_command_that_cannot_start_for_now_goes_back_uncounted() {
    let mut pool = Pool::new("", &sh_workers("w", 1, &ledger_job("0")));
    pool.start_ready();
    let (pid, _) = pool.slot_worker("w", 0);
    let Some(mut cgroup) = common::Cgroup::new("pids") else {
        return;
    };
    cgroup.add(pid);
    cgroup.pids_max(&cgroup.pids_current().to_string());
    let job = pool.submit_with("w", "a.txt", &["--max-attempts", "1"]);
    wait_for("the worker to try", Duration::from_secs(20), || {
        let gave_back = std::fs::read_to_string(pool.path("logs/w-0.log"))
            .ok()?
            .contains("the job goes back to the queue");
        let failed = pool.try_i64(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = {job} AND status = 'failed'"
        ))? == 1;
        (gave_back || failed).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let error = pool.query_strings(&format!("SELECT COALESCE(error, '') FROM jobs WHERE id = {job}"));
    assert_ne!(
        pool.query_strings(&format!("SELECT status FROM jobs WHERE id = {job}")),
        ["failed"],
        "failed for good at its first attempt: {error:?}"
    );
    let (status, attempts) = pool
        .conn()
        .query_row(
            &format!("SELECT status, attempts FROM jobs WHERE id = {job}"),
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .unwrap();
    assert!(status == "pending" || status == "processing", "{status}");
    assert!(attempts <= 1, "{attempts}");
    cgroup.pids_max("max");
    pool.drained("30s");
    each_once(&pool, &[job]);
    assert!(common::alive(pid), "the worker rode it out");
}

/// The shell command that grows past any small memory limit.
const HOG: &str = "x=$(head -c 200000000 /dev/zero | tr '\\0' x)";

/// A worker killed with SIGKILL is not said to be OOM-killed because the
/// OOM killer acted elsewhere on the host meanwhile; a job command the OOM
/// killer did kill is named as such, from the kernel's own record.
#[test]
fn oom_is_named_only_from_the_processs_own_evidence() {
    let Some(mut elsewhere) = common::Cgroup::new("memory") else {
        return;
    };
    elsewhere.memory_max(32 * 1024 * 1024);
    let mut pool = Pool::new("", &sh_workers("w", 1, common::COPY));
    pool.start_ready();
    let (pid, id) = pool.slot_worker("w", 0);
    // Another program, in a cgroup of its own, is OOM-killed.
    let mut hog = std::process::Command::new("sh")
        .args(["-c", &format!("read _; {HOG}")])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    elsewhere.add(hog.id() as i32);
    drop(hog.stdin.take());
    let status = hog.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the hog was OOM-killed: {status:?}");
    // Then our worker is killed, by SIGKILL and not by the OOM killer.
    common::kill9(pid);
    let cause = wait_for("the worker's end", Duration::from_secs(20), || {
        pool.try_i64(&format!(
            "SELECT COUNT(*) FROM clx_pool_events WHERE worker_id = '{id}'"
        ))
        .filter(|n| *n == 1)
        .map(|_| pool.cause_of(&id))
    });
    assert_eq!(cause, "was killed by SIGKILL");

    // A job command the OOM killer kills (its worker in a small cgroup).
    let Some(mut small) = common::Cgroup::new("memory") else {
        return;
    };
    small.memory_max(64 * 1024 * 1024);
    let mut pool = Pool::new(
        "",
        &sh_workers("hog", 1, &format!("{HOG}; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"")),
    );
    pool.start_ready();
    let (pid, _) = pool.slot_worker("hog", 0);
    small.add(pid);
    let job = pool.submit_with("hog", "h.txt", &["--max-attempts", "1"]);
    let error = wait_for("the job to fail", Duration::from_secs(60), || {
        pool.query_strings(&format!(
            "SELECT COALESCE(error, '') FROM jobs WHERE id = {job} AND status = 'failed'"
        ))
        .pop()
    });
    // The kernel's log is the evidence; where it cannot be read (no
    // privilege), no OOM kill is claimed.
    if std::fs::File::open("/dev/kmsg").is_ok() {
        assert!(
            error.contains("was killed by the kernel's OOM killer (out of memory)"),
            "{error}"
        );
    } else {
        eprintln!("/dev/kmsg cannot be read here: the kill is reported without naming OOM");
        assert!(error.contains("was killed"), "{error}");
    }
}

/// What a worker (not the built-in one) starts in a session of its own
/// with a cleared environment (no tag, no WORKER_ID) ends with the pool:
/// the supervisor adopted it as child subreaper.
#[test]
fn nothing_a_worker_starts_outlives_the_pool() {
    let _left = KillOnDrop(vec!["sleep 4121"]);
    let python = common::repo_path("tests/workers/clx_protocol_worker.py");
    let script = format!(
        "env -i setsid sleep 4121 </dev/null >/dev/null 2>&1 & exec python3 {}",
        python.display()
    );
    let mut pool = Pool::new(
        "",
        &format!(
            "[[workers]]\nworker_type = \"rev\"\ncount = 1\ncommand = [\"sh\", \"-c\", {}]\n",
            common::toml_str(&script)
        ),
    );
    pool.start_ready();
    wait_for("the helper", Duration::from_secs(10), || {
        (!processes_named("sleep 4121").is_empty()).then_some(())
    });
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(processes_named("sleep 4121"), Vec::<i32>::new(), "outlived the pool");
}
