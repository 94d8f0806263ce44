//! Database faults: a write lock held past busy_timeout, a full disk. A job
//! is never lost, never stuck, never run twice; a worker never exits over
//! a busy database; the pool never gives up for good over a fault outside
//! its workers; state writes are never dropped.

mod common;

use std::time::Duration;

use common::{COPY, Pool, Tmpfs, WriteLock, bin, kill9, sh_workers, stderr, stdout, toml_str, wait_for};

/// Longer than the 10 s busy_timeout of every connection.
const LONG_LOCK: Duration = Duration::from_secs(12);

/// Longer than two busy_timeouts: a write that gives up once and is tried
/// again later fails again, so only retrying until it lands gets through.
const LOCK_PAST_TWO_TIMEOUTS: Duration = Duration::from_secs(25);

#[test]
fn finished_commands_are_recorded_once_through_a_lock_longer_than_busy_timeout() {
    let script =
        "sleep 1; echo \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new("", &sh_workers("slow", 4, script));
    pool.start_ready();
    let ids: Vec<i64> = (0..4)
        .map(|i| pool.submit_with("slow", &format!("s{i}.txt"), &["--max-attempts", "1"]))
        .collect();
    wait_for("all four jobs processing", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM jobs WHERE status = 'processing'")? == 4).then_some(())
    });
    // The commands finish while the database is locked for longer than
    // any busy_timeout.
    let lock = WriteLock::hold(&pool.db_path(), LONG_LOCK);
    lock.join();
    pool.drained("60s");
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap();
    let mut ran: Vec<i64> = ledger.lines().map(|l| l.parse().unwrap()).collect();
    ran.sort();
    assert_eq!(ran, ids, "each command ran exactly once");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND attempts = 1"),
        4
    );
    assert_eq!(
        pool.query_i64("SELECT SUM(restarts) FROM clx_pool_slots"),
        0,
        "no worker exited"
    );
}

#[test]
fn a_worker_killed_during_a_long_lock_has_its_job_recovered_once_the_lock_goes() {
    let script = "m=\"$WORKSPACE_PATH/tried-$CLX_JOB_ID\"; if [ ! -e \"$m\" ]; then touch \"$m\"; sleep 60; fi; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new("", &sh_workers("once", 2, script));
    pool.start_ready();
    let job = pool.submit_with("once", "k.txt", &[]);
    let row = wait_for("the job to be processing", Duration::from_secs(20), || {
        pool.try_i64(&format!(
            "SELECT worker_id FROM jobs WHERE id = {job} AND status = 'processing'"
        ))
    });
    let pid = pool.query_i64(&format!(
        "SELECT s.pid FROM clx_pool_slots s JOIN workers w ON w.container_id = s.worker_id WHERE w.id = {row}"
    )) as i32;
    // The first attempt is in its long sleep (its marker is there), so the
    // second one, after the kill, completes.
    wait_for("the first attempt's marker", Duration::from_secs(20), || {
        pool.path(&format!("workspace/tried-{job}")).exists().then_some(())
    });
    let lock = WriteLock::hold(&pool.db_path(), LONG_LOCK);
    kill9(pid);
    lock.join();
    pool.drained("60s");
    assert_eq!(pool.output("k.txt").as_deref(), Some("k.txt"));
    assert_eq!(
        pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {job}")),
        2
    );
    assert_eq!(
        pool.query_strings(&format!("SELECT status FROM workers WHERE id = {row}")),
        vec!["dead"]
    );
}

#[test]
fn reconciliation_puts_back_a_job_whose_worker_is_gone() {
    let mut pool = Pool::new("check_interval = \"200ms\"\n", &sh_workers("copy", 1, COPY));
    pool.start_ready();
    // A job left processing by a worker row that no longer exists (as if
    // its end had never been recorded).
    let job = pool.submit_with("held", "r.txt", &["--allow-unserved"]);
    pool.conn()
        .execute(
            "UPDATE jobs SET job_type = 'copy', status = 'processing', worker_id = 9999, attempts = 1,
                 started_at = datetime('now', '-10 seconds') WHERE id = ?1",
            [job],
        )
        .unwrap();
    pool.drained("30s");
    assert_eq!(
        pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {job}")),
        2
    );
    assert!(
        pool.supervisor_log()
            .contains("found jobs held by a worker that is gone")
    );
}

#[test]
fn state_writes_survive_a_lock_so_stats_never_shows_workers_that_are_gone() {
    let mut pool = Pool::new("", &sh_workers("copy", 2, COPY));
    pool.start_ready();
    let lock = WriteLock::hold(&pool.db_path(), LOCK_PAST_TWO_TIMEOUTS);
    let out = pool.cli(&["stop", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    lock.join();
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["pools"]["copy"]["running"], 0, "{json}");
    assert_eq!(json["pools"]["copy"]["stopped"], 2, "{json}");
    assert_eq!(json["supervisor"]["state"], "stopped", "{json}");
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
    assert!(pool.processes().is_empty());
}

#[test]
fn a_worker_death_during_a_lock_is_recorded_so_stats_never_shows_a_gone_worker() {
    // One failure gives the slot up, and the idle-heartbeat limit is long:
    // only the slot's own record can tell that its worker is gone.
    let mut pool = Pool::new(
        "restart_limit = 1\nheartbeat_timeout = \"120s\"\n",
        &sh_workers("copy", 1, COPY),
    );
    pool.start_ready();
    let (pid, _) = pool.slot_worker("copy", 0);
    let lock = WriteLock::hold(&pool.db_path(), LOCK_PAST_TWO_TIMEOUTS);
    kill9(pid);
    lock.join();
    let mut last = String::new();
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("stats to show the worker gone", Duration::from_secs(15), || {
            let out = pool.cli(&["stats", "--json"]);
            last = stdout(&out);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let live = pool.try_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'")?;
            (json["pools"]["copy"]["running"] == 0 && live == 0).then_some(())
        })
    }));
    assert!(found.is_ok(), "last stats: {last}");
}

#[test]
fn a_slot_failing_outside_its_worker_cools_down_and_comes_back() {
    // Exit code 75 (EX_TEMPFAIL) is how a worker says the fault lies outside
    // it (the built-in worker uses it for an unavailable database).
    let fault = "[ -e \"$WORKSPACE_PATH/fault\" ] && { echo 'database or disk is full' >&2; exit 75; }";
    let broken = "echo 'a bug in the worker' >&2; exit 1";
    let workers = format!(
        "[[workers]]\nworker_type = \"flaky\"\ncommand = [\"sh\", \"-c\", {}]\n\n[[workers]]\nworker_type = \"buggy\"\ncommand = [\"sh\", \"-c\", {}]\n",
        toml_str(&format!("{fault}; exec {} worker -- cp {{input}} {{output}}", bin())),
        toml_str(broken),
    );
    let mut pool = Pool::new(
        "restart_limit = 3\nrestart_window = \"30s\"\nrestart_backoff = \"50ms\"\nrestart_cooldown = \"2s\"\n",
        &workers,
    );
    std::fs::write(pool.path("workspace/fault"), "").unwrap();
    pool.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let why = loop {
        let out = pool.cli(&["stats", "--json"]);
        let last = format!("{}{}", stdout(&out), stderr(&out));
        let found = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|json| {
                let waiting = json["waiting"].as_array()?.clone();
                let flaky = waiting.iter().find(|w| w["worker_type"] == "flaky")?;
                let buggy = waiting
                    .iter()
                    .find(|w| w["worker_type"] == "buggy" && w["state"] == "failed")?;
                let why = flaky["why"].as_str()?.to_string();
                (why.contains("outside the worker")).then_some((why, buggy["why"].as_str()?.to_string()))
            });
        if let Some(why) = found {
            break why;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flaky slot never cooled down; last stats:\n{last}\n{}",
            pool.supervisor_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(why.0.contains("exited with code 75"), "{}", why.0);
    assert!(why.0.contains("trying again in 2s"), "{}", why.0);
    assert!(why.1.starts_with("gave up"), "{}", why.1);
    assert!(
        stdout(&pool.cli(&["stats"])).contains("flaky-0 backoff:"),
        "human stats show why"
    );
    // The fault goes away: the slot comes back by itself.
    std::fs::remove_file(pool.path("workspace/fault")).unwrap();
    wait_for("the flaky slot to run again", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = 'flaky' AND state = 'running'")? == 1)
            .then_some(())
    });
    let job = pool.submit_with("flaky", "f.txt", &[]);
    let out = pool.cli(&["wait", "--drained", "--timeout", "20s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pool.query_strings(&format!("SELECT status FROM jobs WHERE id = {job}")),
        vec!["completed"]
    );
}

#[test]
fn registration_on_a_full_disk_says_so_and_registers_nothing() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let db = fs.path().join("jobs.db");
    let config = fs.path().join("pool.toml");
    std::fs::write(
        &config,
        "[[workers]]\nworker_type = \"copy\"\njob_command = [\"true\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["submit", "--config"])
        .arg(&config)
        .args(["copy", "a", "b", "--content-hash", "h"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Another connection keeps the WAL and shared memory open, as a
    // running supervisor does; then the disk fills up.
    let keeper = rusqlite::Connection::open(&db).unwrap();
    keeper
        .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))
        .unwrap();
    fs.fill("filler");
    let out = std::process::Command::new(bin())
        .args(["worker", "--", "true"])
        .env("WORKER_TYPE", "copy")
        .env("WORKER_ID", "w-full")
        .env("DB_PATH", &db)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("database or disk is full") || err.contains("is full"),
        "{err}"
    );
    assert!(!err.contains("registered"), "no registration is claimed: {err}");
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let rows: i64 = keeper
        .query_row("SELECT COUNT(*) FROM workers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}
