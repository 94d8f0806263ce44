//! SPEC §5: dead and hung workers are replaced, their jobs are never lost,
//! slots that keep failing are given up, and nothing outlives `stop` or a
//! killed supervisor. Ages are computed in SQL in UTC, so these tests run
//! the supervisor in non-UTC zones.

mod common;

use std::time::{Duration, Instant};

use common::{
    COPY, Pool, SLOW_FIRST, alive, cmdline, repo_path, sh_workers, signal, stderr, stdout, toml_str, wait_for,
};
use nix::sys::signal::Signal;

const ZONES: [&str; 2] = ["America/New_York", "Europe/Berlin"];

fn python_worker(worker_type: &str, count: u32, env: &str) -> String {
    let script = repo_path("tests/workers/clx_protocol_worker.py");
    format!(
        "[[workers]]\nworker_type = \"{worker_type}\"\ncount = {count}\ncommand = [\"python3\", {}]\nenv = {{ {env} }}\n",
        toml_str(script.to_str().unwrap())
    )
}

#[test]
fn killed_busy_worker_job_completes_on_the_replacement() {
    for zone in ZONES {
        let mut pool = Pool::new("", &sh_workers("copy", 1, SLOW_FIRST)).tz(zone);
        pool.start_ready();
        let id = pool.submit("copy", "a.txt", "payload");
        wait_for("the job command to run", Duration::from_secs(10), || {
            pool.processes()
                .into_iter()
                .find(|&p| cmdline(p).starts_with("sleep 60"))
        });
        let (pid, worker) = pool.slot_worker("copy", 0);
        signal(pid, Signal::SIGKILL);
        pool.wait_replacement("copy", 0, &worker, Duration::from_secs(10));
        let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
        assert!(out.status.success(), "{zone}: {}", stderr(&out));
        assert_eq!(pool.output("a.txt").as_deref(), Some("payload"));
        let (status, attempts): (String, i64) = pool
            .conn()
            .query_row("SELECT status, attempts FROM jobs WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((status.as_str(), attempts), ("completed", 2), "{zone}");
        let (event, job): (String, i64) = pool
            .conn()
            .query_row(
                "SELECT cause, job_id FROM clx_pool_events WHERE worker_id = ?1",
                [&worker],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(event, "was killed by SIGKILL");
        assert_eq!(job, id, "the history names the job the worker held");
        // The job command of the killed worker died with it.
        let left: Vec<i32> = pool
            .processes()
            .into_iter()
            .filter(|&p| cmdline(p).starts_with("sleep"))
            .collect();
        assert!(
            left.is_empty(),
            "{zone}: the job command's sleep survived its worker: {left:?}"
        );
    }
}

#[test]
fn job_that_kills_its_worker_every_time_fails_after_max_attempts() {
    let mut pool = Pool::new("restart_backoff = \"100ms\"\n", &python_worker("reverse", 2, "")).tz(ZONES[0]);
    pool.start_ready();
    std::fs::write(pool.path("workspace/poison.txt"), "x").unwrap();
    let ws = pool.path("workspace");
    let out = pool.cli(&[
        "submit",
        "reverse",
        "poison.txt",
        "out/poison.txt",
        "--payload",
        "{\"crash\": true}",
        "--workspace",
        ws.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let poison: i64 = stdout(&out).trim().parse().unwrap();
    let good: Vec<i64> = (0..10)
        .map(|i| pool.submit("reverse", &format!("g{i}.txt"), "abc"))
        .collect();
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the poisoned job must fail: {}",
        stderr(&out)
    );
    let (status, attempts, error): (String, i64, String) = pool
        .conn()
        .query_row(
            "SELECT status, attempts, error FROM jobs WHERE id = ?1",
            [poison],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("failed", 3));
    assert!(
        error.starts_with("gave up after 3 attempts: worker direct-reverse-"),
        "{error}"
    );
    assert!(
        error.contains("exited with code 17 while processing this job"),
        "{error}"
    );
    for id in good {
        let s: String = pool
            .conn()
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert_eq!(s, "completed");
    }
    // The pool is whole again once the last replacement has registered.
    let v = wait_for("both slots running", Duration::from_secs(20), || {
        let v: serde_json::Value = serde_json::from_str(&stdout(&pool.cli(&["stats", "--json"]))).unwrap();
        (v["pools"]["reverse"]["running"] == 2).then_some(v)
    });
    assert_eq!(v["pools"]["reverse"]["restarts"], 3, "{v}");
}

#[test]
fn job_running_past_max_job_time_is_killed_and_retried() {
    for zone in ZONES {
        let workers = format!("{}max_job_time = \"2s\"\n", sh_workers("copy", 1, SLOW_FIRST));
        let mut pool = Pool::new("check_interval = \"200ms\"\n", &workers).tz(zone);
        pool.start_ready();
        let id = pool.submit("copy", "a.txt", "late but done");
        let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
        assert!(
            out.status.success(),
            "{zone}: {}\n{}",
            stderr(&out),
            pool.supervisor_log()
        );
        assert_eq!(pool.output("a.txt").as_deref(), Some("late but done"));
        assert_eq!(pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {id}")), 2);
        let cause: String = pool.first_cause("hung");
        assert!(
            cause.contains(&format!("job {id} has run for")) && cause.contains("longer than max_job_time 2s"),
            "{zone}: {cause}"
        );
        let started: f64 = pool
            .conn()
            .query_row(
                "SELECT unixepoch(completed_at) - unixepoch(started_at) FROM jobs WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            started < 5.0,
            "{zone}: timestamps are UTC text, the retry took {started}s"
        );
    }
}

#[test]
fn idle_worker_that_stops_heartbeating_is_replaced() {
    for zone in ZONES {
        let mut pool = Pool::new(
            "heartbeat_timeout = \"2s\"\ncheck_interval = \"200ms\"\n",
            &sh_workers("copy", 2, COPY),
        )
        .tz(zone);
        pool.start_ready();
        let (pid, worker) = pool.slot_worker("copy", 1);
        let frozen_at = Instant::now();
        signal(pid, Signal::SIGSTOP);
        let new = pool.wait_replacement("copy", 1, &worker, Duration::from_secs(20));
        let took = frozen_at.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "{zone}: replaced after {took:?}, before the heartbeat could be 2s old"
        );
        let cause: String = pool.cause_of(&worker);
        assert!(
            cause.contains("heartbeat") && cause.contains("older than heartbeat_timeout 2s"),
            "{zone}: {cause}"
        );
        assert!(new.starts_with("direct-copy-1-"));
        // The other worker, heartbeating normally, was left alone.
        assert_eq!(
            pool.query_i64("SELECT restarts FROM clx_pool_slots WHERE slot = 0"),
            0,
            "{zone}"
        );
        assert!(!pool.processes().contains(&pid), "{zone}: the frozen worker is gone");
    }
}

#[test]
fn busy_worker_using_no_cpu_is_hung_when_the_rule_is_on() {
    let workers = format!(
        "{}hung_cpu_window = \"1s\"\nhung_cpu_percent = 5.0\n",
        sh_workers("copy", 1, SLOW_FIRST)
    );
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &workers).tz(ZONES[1]);
    pool.start_ready();
    let id = pool.submit("copy", "a.txt", "z");
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cause: String = pool.first_cause("hung");
    assert!(
        cause.contains(&format!("job {id} used")) && cause.contains("CPU over"),
        "{cause}"
    );
    assert_eq!(pool.query_i64("SELECT attempts FROM jobs"), 2);
    // CPU and memory use are recorded for the live worker.
    wait_for("memory_usage to be recorded", Duration::from_secs(5), || {
        (pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle' AND memory_usage > 0") == 1).then_some(())
    });
}

#[test]
fn crash_looping_slot_is_given_up_while_other_pools_go_on() {
    let workers = format!(
        "[[workers]]\nworker_type = \"broken\"\ncount = 1\ncommand = [\"sh\", \"-c\", \"echo 'ImportError: no module named nb' >&2; exit 1\"]\n\n{}",
        sh_workers("copy", 1, COPY)
    );
    let mut pool = Pool::new(
        "restart_backoff = \"50ms\"\nrestart_limit = 3\nrestart_window = \"30s\"\n",
        &workers,
    )
    .tz(ZONES[0]);
    pool.start();
    let out = pool.cli(&["wait", "--ready", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("broken-0 were given up"), "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&pool.cli(&["stats", "--json"]))).unwrap();
    assert_eq!(stats["pools"]["broken"]["failed"], 1, "{stats}");
    assert_eq!(stats["pools"]["copy"]["running"], 1, "{stats}");
    assert!(
        pool.supervisor_log().contains("GIVING UP on slot broken-0"),
        "{}",
        pool.supervisor_log()
    );
    let tail: String = pool
        .conn()
        .query_row(
            "SELECT log_tail FROM clx_pool_events WHERE worker_type = 'broken' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(tail.contains("ImportError"), "{tail}");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE worker_type = 'broken'"),
        3
    );
    pool.submit("copy", "a.txt", "still working");
    assert!(pool.cli(&["wait", "--drained", "--timeout", "30s"]).status.success());
    assert_eq!(pool.output("a.txt").as_deref(), Some("still working"));
    let events = stdout(&pool.cli(&["stats", "--events"]));
    assert!(
        events.contains("broken-0") && events.contains("exited with code 1"),
        "{events}"
    );
}

#[test]
fn worker_ignoring_sigterm_is_killed_after_stop_timeout() {
    let mut pool = Pool::new(
        "stop_timeout = \"1s\"\n",
        &python_worker("stubborn", 2, "TEST_IGNORE_TERM = \"1\""),
    )
    .tz(ZONES[1]);
    pool.start_ready();
    let started = Instant::now();
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        took >= Duration::from_secs(1),
        "stop took {took:?}: the grace time was not given"
    );
    assert!(pool.processes().is_empty(), "{:?}", pool.processes());
    assert!(
        pool.supervisor_log()
            .contains("did not exit within 1s of SIGTERM; sending SIGKILL"),
        "{}",
        pool.supervisor_log()
    );
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
}

#[test]
fn setsid_grandchild_does_not_survive_stop_or_a_worker_death() {
    let mut pool = Pool::new("", &python_worker("kernel", 1, "TEST_SETSID_HELPER = \"1\"")).tz(ZONES[0]);
    pool.start_ready();
    let helper = wait_for("the setsid helper", Duration::from_secs(10), || {
        pool.processes()
            .into_iter()
            .find(|&p| cmdline(p).starts_with("sleep 300"))
    });
    let (worker_pid, worker) = pool.slot_worker("kernel", 0);
    assert_ne!(
        session_of(helper),
        session_of(worker_pid),
        "the helper runs in a session of its own"
    );
    // The worker dies: its escaped helper goes with it.
    signal(worker_pid, Signal::SIGKILL);
    pool.wait_replacement("kernel", 0, &worker, Duration::from_secs(10));
    wait_for("the orphaned helper to be killed", Duration::from_secs(5), || {
        (!alive(helper)).then_some(())
    });
    // The replacement's helper does not survive stop either.
    let second = wait_for("the second helper", Duration::from_secs(10), || {
        pool.processes()
            .into_iter()
            .find(|&p| cmdline(p).starts_with("sleep 300"))
    });
    let out = pool.cli(&["stop"]);
    assert!(out.status.success());
    assert!(!alive(second), "the setsid helper survived stop");
    assert!(pool.processes().is_empty(), "{:?}", pool.processes());
}

fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn killed_supervisor_leaves_no_worker_and_next_start_cleans_up() {
    let mut pool = Pool::new(
        "",
        &format!(
            "{}\n{}",
            sh_workers("copy", 3, SLOW_FIRST),
            python_worker("kernel", 1, "TEST_SETSID_HELPER = \"1\"")
        ),
    )
    .tz(ZONES[1]);
    pool.start_ready();
    // The python worker starts its setsid helper after it registered.
    wait_for("the setsid helper", Duration::from_secs(10), || {
        pool.processes()
            .into_iter()
            .find(|&p| cmdline(p).starts_with("sleep 300"))
    });
    let id = pool.submit("copy", "a.txt", "survives");
    // The job command marks its first attempt before it starts to sleep.
    wait_for("the job's first attempt to run", Duration::from_secs(10), || {
        pool.path(&format!("workspace/attempted-{id}")).exists().then_some(())
    });
    let workers: Vec<i32> = pool
        .conn()
        .prepare("SELECT pid FROM clx_pool_slots")
        .unwrap()
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|p| p.unwrap() as i32)
        .collect();
    // The guard would clean up at once; this is the case where it died too.
    pool.kill_supervisor_and_guard();
    wait_for(
        "every worker to die with the supervisor",
        Duration::from_secs(1),
        || workers.iter().all(|&p| !alive(p)).then_some(()),
    );
    // What no parent-death signal reaches may be left (the setsid helper,
    // the job command's own children), but no worker.
    let left: Vec<String> = pool.processes().into_iter().map(cmdline).collect();
    assert!(left.iter().all(|c| c.starts_with("sleep ")), "{left:?}");
    assert!(
        !left.is_empty(),
        "the test should leave something for the next start to clean"
    );
    // The database still says the workers are alive and the job is taken.
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 4);
    pool.start_ready();
    let log = pool.supervisor_log();
    assert!(
        log.contains("cleaned up after an earlier run of this database"),
        "{log}"
    );
    assert!(
        log.contains("marked 4 stale worker row(s) dead, put 1 job(s) back in the queue"),
        "{log}"
    );
    assert!(
        pool.processes().iter().all(|&p| !left_over(p)),
        "the old helpers were cleaned up"
    );
    assert!(pool.cli(&["wait", "--drained", "--timeout", "30s"]).status.success());
    assert_eq!(pool.output("a.txt").as_deref(), Some("survives"));
    assert_eq!(pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {id}")), 2);
}

/// A process still running from before the restart (older than 1 s).
fn left_over(pid: i32) -> bool {
    cmdline(pid).starts_with("sleep ") && {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ticks: u64 = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(19)?.parse().ok())
            .unwrap_or(0);
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        uptime - ticks as f64 / 100.0 > 1.0
    }
}

#[test]
fn stop_after_a_killed_supervisor_cleans_leftovers() {
    let mut pool = Pool::new("", &python_worker("kernel", 1, "TEST_SETSID_HELPER = \"1\"")).tz(ZONES[0]);
    pool.start_ready();
    wait_for("the setsid helper", Duration::from_secs(10), || {
        pool.processes()
            .into_iter()
            .find(|&p| cmdline(p).starts_with("sleep 300"))
    });
    // The guard would clean up at once; this is the case where it died too.
    pool.kill_supervisor_and_guard();
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("no supervisor is running") && said.contains("marked 1 stale worker row(s) dead"),
        "{said}"
    );
    assert!(pool.processes().is_empty(), "{:?}", pool.processes());
}

#[test]
fn worker_printing_megabytes_keeps_working_and_its_log_rotates() {
    let script = "head -c 4000000 /dev/zero | tr '\\0' x; echo; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new(
        "log_max_size = \"1m\"\nlog_keep = 2\n",
        &sh_workers("chatty", 1, script),
    )
    .tz(ZONES[1]);
    pool.start_ready();
    for i in 0..3 {
        pool.submit("chatty", &format!("c{i}.txt"), "quiet output");
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'"),
        3
    );
    let logs = pool.path("logs");
    wait_for("the log to rotate", Duration::from_secs(10), || {
        logs.join("chatty-0.log.2").exists().then_some(())
    });
    assert!(
        !logs.join("chatty-0.log.3").exists(),
        "only log_keep = 2 rotated files are kept"
    );
    for name in ["chatty-0.log", "chatty-0.log.1", "chatty-0.log.2"] {
        let size = std::fs::metadata(logs.join(name)).unwrap().len();
        assert!(size <= 1024 * 1024, "{name} is {size} bytes, over log_max_size");
    }
}

#[test]
fn exit_causes_survive_a_busy_reaper() {
    // With the monitor (and its reaper of orphaned descendants) ticking
    // every millisecond, each killed worker's own exit status must still
    // reach its slot: the reaper leaves the workers it spawned alone.
    let mut pool = Pool::new("check_interval = \"1ms\"\n", &sh_workers("copy", 3, "true")).tz(ZONES[0]);
    pool.start_ready();
    for round in 0..3 {
        for slot in 0..3 {
            let (pid, worker) = pool.slot_worker("copy", slot);
            signal(pid, Signal::SIGKILL);
            pool.wait_replacement("copy", slot, &worker, Duration::from_secs(10));
            let cause: String = pool.cause_of(&worker);
            assert_eq!(cause, "was killed by SIGKILL", "round {round}, slot {slot}");
        }
    }
}

/// Idle built-in workers sleep until the supervisor rings their type's
/// bell (a FIFO beside the database); their heartbeat, every 10 s here, is
/// not what finds new jobs.
#[test]
fn idle_workers_are_woken_by_their_bell_not_by_their_heartbeat() {
    use std::os::unix::fs::FileTypeExt;
    let mut pool = Pool::new("heartbeat_timeout = \"60s\"\n", &sh_workers("copy", 2, COPY));
    pool.start_ready();
    let (pid, _) = pool.slot_worker("copy", 0);
    let bell = common::env_of(pid, "CLX_POOL_BELL").expect("a built-in worker under a supervisor has a bell");
    assert!(
        std::fs::metadata(&bell).unwrap().file_type().is_fifo(),
        "{bell} is a FIFO"
    );
    assert_eq!(std::path::Path::new(&bell).parent(), pool.db_path().parent());
    for i in 0..5 {
        let id = pool.submit("copy", &format!("bell{i}.txt"), "rung");
        wait_for(
            &format!("job {id} to be taken by an idle worker well before its next heartbeat"),
            Duration::from_secs(4),
            || (pool.query_strings(&format!("SELECT status FROM jobs WHERE id = {id}")) == ["completed"]).then_some(()),
        );
    }
    assert_eq!(pool.output("bell4.txt").as_deref(), Some("rung"));
}
