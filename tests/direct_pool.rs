//! Direct pools of built-in workers, driven through the real binary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Pool, sh_workers, stderr, stdout, wait_for};

const UPPER: &str = "printf '%s\\n' \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; tr a-z A-Z < \"$CLX_INPUT_FILE\" > \"$CLX_OUTPUT_FILE\"";

#[test]
fn pool_processes_100_jobs_once_each() {
    let mut pool = Pool::new("", &sh_workers("upper", 4, UPPER));
    pool.start_ready();
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle'"), 4);
    let ids: Vec<i64> = (0..100)
        .map(|i| pool.submit("upper", &format!("in{i}.txt"), &format!("text number {i}\n")))
        .collect();
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    for i in 0..100 {
        assert_eq!(
            pool.output(&format!("in{i}.txt")).as_deref(),
            Some(format!("TEXT NUMBER {i}\n").as_str())
        );
    }
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap();
    let runs: Vec<i64> = ledger.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(runs.len(), 100, "every job ran exactly once");
    assert_eq!(runs.iter().collect::<HashSet<_>>(), ids.iter().collect::<HashSet<_>>());
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND attempts = 1"),
        100
    );
    // More than one worker took part.
    assert!(pool.query_i64("SELECT COUNT(DISTINCT worker_id) FROM jobs") > 1);
}

#[test]
fn failing_command_fails_the_job_with_its_stderr() {
    let mut pool = Pool::new(
        "",
        &sh_workers("bad", 1, "echo 'converter says: input is broken' >&2; exit 3"),
    );
    pool.start_ready();
    let id = pool.submit("bad", "x.txt", "x");
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(1), "wait --drained must fail when a job failed");
    assert!(stderr(&out).contains(&format!("job {id} ")), "{}", stderr(&out));
    let error: String = pool
        .conn()
        .query_row("SELECT error FROM jobs WHERE id = ?1", [id], |r| r.get(0))
        .unwrap();
    assert!(error.contains("exited with code 3"), "{error}");
    assert!(error.contains("converter says: input is broken"), "{error}");
    assert_eq!(
        pool.query_i64("SELECT jobs_failed FROM workers WHERE status = 'idle'"),
        1
    );
}

#[test]
fn killed_worker_is_replaced_in_its_slot() {
    let mut pool = Pool::new("", &sh_workers("upper", 2, UPPER));
    pool.start_ready();
    let victim: (String, i64) = pool
        .conn()
        .query_row(
            "SELECT worker_id, pid FROM clx_pool_slots WHERE worker_type = 'upper' AND slot = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replacement = wait_for("a replacement in slot 1", Duration::from_secs(10), || {
        let (id, state): (Option<String>, String) = pool
            .conn()
            .query_row(
                "SELECT worker_id, state FROM clx_pool_slots WHERE worker_type = 'upper' AND slot = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        (state == "running" && id.as_deref() != Some(victim.0.as_str())).then_some(id.unwrap())
    });
    assert!(replacement.starts_with("direct-upper-1-"), "{replacement}");
    let status: String = pool
        .conn()
        .query_row("SELECT status FROM workers WHERE container_id = ?1", [&victim.0], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(status, "dead");
    assert_eq!(
        pool.query_i64("SELECT restarts FROM clx_pool_slots WHERE worker_type = 'upper' AND slot = 1"),
        1
    );
    let event: String = pool
        .conn()
        .query_row(
            "SELECT cause FROM clx_pool_events WHERE worker_id = ?1",
            [&victim.0],
            |r| r.get(0),
        )
        .unwrap();
    assert!(event.contains("SIGKILL"), "{event}");
    // The replacement works.
    pool.submit("upper", "a.txt", "abc");
    assert!(pool.cli(&["wait", "--drained", "--timeout", "30s"]).status.success());
    assert_eq!(pool.output("a.txt").as_deref(), Some("ABC"));
}

#[test]
fn stop_from_another_process_ends_everything() {
    let mut pool = Pool::new(
        "",
        &format!(
            "{}\n{}",
            sh_workers("upper", 3, UPPER),
            sh_workers("slow", 1, "sleep 30")
        ),
    );
    pool.start_ready();
    pool.submit("slow", "s.txt", "s");
    // Claimed first, then started: wait for the job command itself.
    wait_for(
        "the 4 workers and the job command to run",
        Duration::from_secs(10),
        || {
            (pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'processing'") == 1
                && pool.processes().len() >= 5)
                .then_some(())
        },
    );
    let out = pool.cli(&["stop", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped the supervisor"), "{}", stdout(&out));
    assert_eq!(
        pool.wait_supervisor_exit(Duration::from_secs(5)),
        0,
        "{}",
        pool.supervisor_log()
    );
    assert_eq!(
        pool.processes(),
        Vec::<i32>::new(),
        "no worker or job process may survive stop"
    );
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
    // The interrupted job went back to the queue, its attempt not counted.
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'pending' AND attempts = 0"),
        1
    );
    let again = pool.cli(&["stop"]);
    assert!(again.status.success());
    assert!(
        stdout(&again).contains("no supervisor is running"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn sigint_stops_the_pool_like_ctrl_c() {
    let mut pool = Pool::new("", &sh_workers("upper", 2, UPPER));
    pool.start_ready();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.supervisor_pid()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(pool.wait_supervisor_exit(Duration::from_secs(10)), 0);
    assert!(pool.processes().is_empty());
}

#[test]
fn second_start_on_the_same_database_is_refused() {
    let mut pool = Pool::new("", &sh_workers("upper", 1, UPPER));
    pool.start_ready();
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "another clx-pool supervisor (pid {}) is already running",
            pool.supervisor_pid()
        )),
        "{err}"
    );
    // The first one is unharmed.
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle'"), 1);
}

#[test]
fn stats_json_reports_pool_workers_and_jobs() {
    let mut pool = Pool::new("", &sh_workers("upper", 2, UPPER));
    pool.start_ready();
    pool.submit("upper", "a.txt", "a");
    assert!(pool.cli(&["wait", "--drained", "--timeout", "30s"]).status.success());
    let out = pool.cli(&["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["supervisor"]["running"], true);
    assert_eq!(v["supervisor"]["pid"], pool.supervisor_pid());
    assert_eq!(v["supervisor"]["state"], "running");
    assert_eq!(v["workers"]["upper"]["idle"], 2);
    assert_eq!(v["pools"]["upper"]["running"], 2);
    assert_eq!(v["jobs"]["completed"], 1);
    assert_eq!(v["jobs"]["pending"], 0);
    let table = stdout(&pool.cli(&["stats"]));
    assert!(table.contains("supervisor: running"), "{table}");
    assert!(table.contains("1 completed"), "{table}");
}

#[test]
fn worker_that_never_registers_is_stopped_and_retried() {
    let mut pool = Pool::new(
        "startup_timeout = \"300ms\"\nrestart_backoff = \"50ms\"\nrestart_limit = 100\n",
        "[[workers]]\nworker_type = \"mute\"\ncount = 1\ncommand = [\"sh\", \"-c\", \"echo 'loading models...'; exec sleep 60\"]\n",
    );
    pool.start();
    wait_for("two registration timeouts", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'no-register'")? >= 2).then_some(())
    });
    let tail: String = pool
        .conn()
        .query_row(
            "SELECT log_tail FROM clx_pool_events WHERE event = 'no-register' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(tail.contains("loading models..."), "{tail}");
    assert!(
        pool.supervisor_log().contains("did not register within 300ms"),
        "{}",
        pool.supervisor_log()
    );
    // Only the current attempt's process is alive.
    assert!(pool.processes().len() <= 1, "{:?}", pool.processes());
}

#[test]
fn submit_rejects_bad_payload_and_missing_input() {
    let pool = Pool::new("", "");
    let bad = pool.cli(&["submit", "upper", "a.txt", "b.txt", "--payload", "{nope"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--payload is not valid JSON"), "{}", stderr(&bad));
    let missing = pool.cli(&[
        "submit",
        "upper",
        "no-such.txt",
        "b.txt",
        "--workspace",
        pool.path("workspace").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("no-such.txt"), "{}", stderr(&missing));
}

#[test]
fn wait_times_out_with_exit_1() {
    let pool = Pool::new("", "");
    let out = pool.cli(&["wait", "--ready", "--timeout", "200ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("timed out after 200ms"), "{}", stderr(&out));
}

/// A job type no worker serves (a typo) is refused by `submit` with the
/// served types and the likeliest one, and nothing is queued; with
/// `--allow-unserved` it is queued, `wait --jobs` on it ends at once with
/// exit 1, and `stats --check` calls the pool degraded for it.
#[test]
fn a_job_type_no_worker_serves_is_refused_unless_asked_and_never_waited_for_silently() {
    let mut pool = Pool::new("", &sh_workers("upper", 1, UPPER));
    std::fs::create_dir_all(pool.path("workspace")).unwrap();
    std::fs::write(pool.path("workspace/x.txt"), "x").unwrap();
    let ws = pool.path("workspace");
    let submit = |pool: &Pool, by: &[&str], ty: &str, extra: &[&str]| {
        let mut args = vec!["submit", ty, "x.txt", "out/x.txt", "--workspace", ws.to_str().unwrap()];
        args.extend(by);
        args.extend(extra);
        pool.cli(&args)
    };
    let config = pool.config();
    let by_config = ["--config", config.to_str().unwrap()];
    // Before any pool ran: the config says what is served.
    let out = submit(&pool, &by_config, "uper", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no worker serves job type `uper`: the workers of")
            && stderr(&out).contains("serve `upper`; did you mean `upper`?"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--allow-unserved"), "{}", stderr(&out));
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM jobs"), 0, "nothing queued");
    pool.start_ready();
    // By the database alone: the running pool's types.
    let out = submit(&pool, &[], "lower", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("the pool of"), "{}", stderr(&out));
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM jobs"), 0, "nothing queued");
    assert_eq!(
        pool.cli(&["stats", "--check"]).status.code(),
        Some(0),
        "healthy: nothing unserved is pending"
    );
    // Asked for: queued, said, and never waited for in vain.
    let out = submit(&pool, &[], "lower", &["--allow-unserved"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("queued anyway (--allow-unserved)"),
        "{}",
        stderr(&out)
    );
    let id = stdout(&out).trim().to_string();
    let out = pool.cli(&["wait", "--jobs", &id, "--timeout", "10m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("waiting for a type no worker of the running pool serves (it serves: upper)")
            && stderr(&out).contains(&format!("job {id} (`lower`)")),
        "{}",
        stderr(&out)
    );
    let out = pool.cli(&["stats", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1 pending job of type `lower`, which no worker of the pool serves"),
        "{}",
        stdout(&out)
    );
    // A served type is queued without a word.
    let known = submit(&pool, &[], "upper", &[]);
    assert!(known.status.success(), "{}", stderr(&known));
    assert!(!stderr(&known).contains("warning"), "{}", stderr(&known));
}
