//! Run-time control of a running pool: scale, rolling restart, reload and
//! SIGHUP, logs -f, recycling after max_jobs or past max_memory, on_event,
//! and who may give orders over the control socket. Real processes.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{COPY, Pool, bin, ledger_job, sh_workers, signal, stderr, stdout, wait_for};

fn submit_many(pool: &Pool, job_type: &str, n: usize) -> Vec<i64> {
    (0..n)
        .map(|i| pool.submit_with(job_type, &format!("{job_type}{i}.txt"), &[]))
        .collect()
}

/// Every job ran exactly once and completed on its first attempt.
fn each_once(pool: &Pool, ids: &[i64]) {
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap();
    let mut ran: Vec<i64> = ledger.lines().map(|l| l.parse().unwrap()).collect();
    ran.sort();
    assert_eq!(ran, ids, "each job ran exactly once");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND attempts = 1"),
        ids.len() as i64
    );
}

fn running(pool: &Pool, worker_type: &str) -> i64 {
    pool.try_i64(&format!(
        "SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = '{worker_type}' AND state = 'running'"
    ))
    .unwrap_or(-1)
}

fn pids(pool: &Pool, worker_type: &str) -> Vec<i64> {
    let c = pool.conn();
    let mut stmt = c
        .prepare("SELECT pid FROM clx_pool_slots WHERE worker_type = ?1 AND state = 'running' ORDER BY slot")
        .unwrap();
    stmt.query_map([worker_type], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn scale_up_and_down_with_busy_workers_loses_no_job_and_runs_none_twice() {
    let mut pool = Pool::new("", &sh_workers("copy", 2, &ledger_job("0.3")));
    pool.start_ready();
    let ids = submit_many(&pool, "copy", 40);
    let out = pool.cli(&["scale", "copy=6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("copy: 2 → 6"), "{}", stdout(&out));
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["pools"]["copy"]["wanted"], 6, "{json}");
    wait_for("six workers", Duration::from_secs(20), || {
        (running(&pool, "copy") == 6).then_some(())
    });
    // Shrink while they are busy: they finish their jobs first.
    wait_for("several busy workers", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status = 'busy'")? >= 3).then_some(())
    });
    let out = pool.cli(&["scale", "copy=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("copy: 6 → 1"), "{}", stdout(&out));
    pool.drained("60s");
    each_once(&pool, &ids);
    wait_for("one slot left", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = 'copy'")? == 1).then_some(())
    });
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["pools"]["copy"]["slots"], 1, "{json}");
    assert_eq!(json["pools"]["copy"]["wanted"], 1, "{json}");
    assert_eq!(
        json["pools"]["copy"]["restarts"], 0,
        "retirements are not failures: {json}"
    );
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'retired'"),
        5
    );
    let out = pool.cli(&["scale", "nope=2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no pool takes `nope`"));
}

#[test]
fn a_rolling_restart_keeps_all_but_one_worker_and_every_job() {
    let mut pool = Pool::new("", &sh_workers("copy", 4, &ledger_job("0.5")));
    pool.start_ready();
    let before = pids(&pool, "copy");
    let ids = submit_many(&pool, "copy", 24);
    wait_for("every worker busy", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status = 'busy'")? == 4).then_some(())
    });
    // Sample the registered workers while the restart runs.
    let done = Arc::new(AtomicBool::new(false));
    let least = Arc::new(AtomicI64::new(i64::MAX));
    let sampler = {
        let (done, least, db) = (done.clone(), least.clone(), pool.db_path());
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(db).unwrap();
            while !done.load(Ordering::SeqCst) {
                let n: i64 = c
                    .query_row("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'", [], |r| {
                        r.get(0)
                    })
                    .unwrap_or(i64::MAX);
                least.fetch_min(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = pool.cli(&["restart", "copy", "--rolling"]);
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert!(out.status.success(), "{}{}", stderr(&out), pool.supervisor_log());
    assert!(stdout(&out).contains("one at a time"), "{}", stdout(&out));
    assert!(
        least.load(Ordering::SeqCst) >= 3,
        "capacity fell to {}",
        least.load(Ordering::SeqCst)
    );
    let after = pids(&pool, "copy");
    assert!(after.iter().all(|p| !before.contains(p)), "{before:?} → {after:?}");
    pool.drained("60s");
    each_once(&pool, &ids);
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'replaced'"),
        4
    );
}

#[test]
fn reload_applies_only_the_difference_and_refuses_a_broken_config() {
    let entry = |t: &str, n: u32, script: &str| sh_workers(t, n, script);
    let mut pool = Pool::new(
        "",
        &format!(
            "{}\n{}\n{}",
            entry("same", 1, COPY),
            entry("changed", 2, COPY),
            entry("gone", 1, COPY)
        ),
    );
    pool.start_ready();
    let same = pids(&pool, "same");
    let changed = pids(&pool, "changed");
    let config = std::fs::read_to_string(pool.config()).unwrap();
    let head = &config[..config.find("[[workers]]").unwrap()];

    // A broken config changes nothing and says everything that is wrong.
    let broken = format!("{head}\n[[workers]]\nworker_type = \"same\"\ncount = \"x\"\nbogus = 1\n");
    std::fs::write(pool.config(), &broken).unwrap();
    let out = pool.cli(&["reload", "--db", pool.db_path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("nothing changed") && err.contains("count") && err.contains("bogus"),
        "{err}"
    );
    assert_eq!(pids(&pool, "same"), same);
    assert_eq!(pids(&pool, "gone").len(), 1);

    // Added, removed, changed and unchanged entries.
    let new = format!(
        "{head}\n{}\n{}\n{}",
        entry("same", 1, COPY),
        entry("changed", 2, &format!("true; {COPY}")),
        entry("added", 1, COPY)
    );
    std::fs::write(pool.config(), new).unwrap();
    let out = pool.cli(&["reload", "--db", pool.db_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stderr(&out), pool.supervisor_log());
    let text = stdout(&out);
    for want in ["removed `gone`", "added `added`", "changed `changed`"] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert_eq!(pids(&pool, "same"), same, "the unchanged worker keeps its pid");
    let now = pids(&pool, "changed");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|p| !changed.contains(p)), "{changed:?} → {now:?}");
    wait_for("the removed entry's slots to go", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = 'gone'")? == 0).then_some(())
    });
    wait_for("the added entry to run", Duration::from_secs(20), || {
        (running(&pool, "added") == 1).then_some(())
    });
    // The new command is what the changed workers run.
    let job = pool.submit_with("changed", "c.txt", &[]);
    let out = pool.cli(&["wait", "--jobs", &job.to_string(), "--timeout", "20s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let argv = common::cmdline(pids(&pool, "changed")[0] as i32);
    assert!(argv.contains("true; cp"), "{argv}");
}

#[test]
fn sighup_reloads_a_changed_config() {
    let mut pool = Pool::new("", &sh_workers("copy", 1, COPY));
    pool.start_ready();
    let config = std::fs::read_to_string(pool.config()).unwrap();
    std::fs::write(pool.config(), format!("{config}\n{}", sh_workers("more", 2, COPY))).unwrap();
    signal(pool.supervisor_pid(), nix::sys::signal::Signal::SIGHUP);
    wait_for("the new entry to run", Duration::from_secs(20), || {
        (running(&pool, "more") == 2).then_some(())
    });
    assert!(
        pool.supervisor_log().contains("reload: added `more`"),
        "{}",
        pool.supervisor_log()
    );
}

#[test]
fn logs_interleave_workers_and_follow_across_rotation() {
    let mut pool = Pool::new(
        "log_max_size = \"2k\"\nlog_keep = 5\n",
        &sh_workers(
            "copy",
            2,
            // A long line, then the one the test looks for: the 2k logs rotate.
            "printf '%0200d\\n' 0 >&2; echo \"working on $CLX_JOB_ID\" >&2; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"",
        ),
    );
    pool.start_ready();
    for i in 0..4 {
        pool.submit_with("copy", &format!("a{i}.txt"), &[]);
    }
    pool.drained("30s");
    let out = pool.cli(&["logs", "-n", "200"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("copy-0") && text.contains("copy-1"), "{text}");
    let out = pool.cli(&["logs", "copy-1", "-n", "200"]);
    assert!(!stdout(&out).contains("copy-0 "), "{}", stdout(&out));

    let mut follower = Command::new(bin())
        .args(["logs", "-f", "-n", "0", "--db"])
        .arg(pool.db_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = common::ChildGuard(Some(follower.id() as i32));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (seen, out) = (seen.clone(), follower.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        })
    };
    // Enough output to rotate the 2k logs several times.
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(pool.submit_with("copy", &format!("b{i}.txt"), &[]));
    }
    pool.drained("60s");
    assert!(pool.path("logs/copy-0.log.1").exists() || pool.path("logs/copy-1.log.1").exists());
    let last = *ids.last().unwrap();
    wait_for("the last job's line", Duration::from_secs(10), || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l.ends_with(&format!("working on {last}")))
            .then_some(())
    });
    let lines = seen.lock().unwrap().clone();
    let from = |slot: &str| lines.iter().filter(|l| l.starts_with(slot)).count();
    assert!(from("copy-0") > 0 && from("copy-1") > 0, "{lines:#?}");
    let jobs_seen = ids
        .iter()
        .filter(|id| lines.iter().any(|l| l.ends_with(&format!("working on {id}"))))
        .count();
    assert_eq!(jobs_seen, ids.len(), "every job's line, rotations or not: {lines:#?}");
    drop(guard);
    follower.wait().unwrap();
    reader.join().unwrap();
}

#[test]
fn max_jobs_recycles_after_the_third_job() {
    let mut pool = Pool::new("", &format!("{}max_jobs = 3\n", sh_workers("copy", 1, COPY)));
    pool.start_ready();
    let ids = submit_many(&pool, "copy", 7);
    pool.drained("60s");
    assert_eq!(ids.len(), 7);
    let done: Vec<String> = pool
        .query_strings("SELECT COALESCE(jobs_processed, 0) || '' FROM workers WHERE jobs_processed > 0 ORDER BY id");
    assert_eq!(done, vec!["3", "3", "1"], "a new worker after every third job");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'recycled'"),
        2
    );
    assert_eq!(
        pool.query_i64("SELECT restarts FROM clx_pool_slots"),
        0,
        "not counted as failures"
    );
}

#[test]
fn max_memory_recycles_a_worker_that_grows_past_it() {
    let grow = "python3 -c 'import time; x = bytearray(150 * 1024 * 1024); time.sleep(2)'; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new(
        "check_interval = \"300ms\"\n",
        &format!("{}max_memory = \"100m\"\n", sh_workers("big", 1, grow)),
    );
    pool.start_ready();
    let (first, _) = pool.slot_worker("big", 0);
    pool.submit_with("big", "m.txt", &[]);
    pool.drained("60s");
    wait_for("the worker to be recycled", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'recycled'")? == 1).then_some(())
    });
    let cause = pool.first_cause("recycled");
    assert!(cause.contains("over max_memory = 100m"), "{cause}");
    wait_for("a new worker", Duration::from_secs(20), || {
        let pid = pool.try_i64("SELECT pid FROM clx_pool_slots WHERE worker_type = 'big' AND state = 'running'")?;
        (pid != i64::from(first) && pid != 0).then_some(())
    });
    assert_eq!(
        pool.query_strings("SELECT status FROM jobs"),
        vec!["completed"],
        "the job finished first"
    );
}

#[test]
fn on_event_is_told_of_a_given_up_slot() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let on_event = format!(
        "on_event = [\"sh\", \"-c\", {}]\nrestart_limit = 3\nrestart_backoff = \"50ms\"\n",
        common::toml_str(&format!("cat >> {}; echo >> {}", events.display(), events.display()))
    );
    let workers = format!(
        "{}\n[[workers]]\nworker_type = \"broken\"\ncommand = [\"sh\", \"-c\", \"exit 1\"]\n",
        sh_workers("copy", 1, "true")
    );
    let mut pool = Pool::new(&on_event, &workers);
    pool.start();
    let text = wait_for("the event", Duration::from_secs(20), || {
        let t = std::fs::read_to_string(&events).ok()?;
        t.contains("slot_given_up").then_some(t)
    });
    let given_up = text.lines().find(|l| l.contains("slot_given_up")).unwrap();
    let json: serde_json::Value = serde_json::from_str(given_up).unwrap();
    assert_eq!(json["slot"], "broken-0");
    assert!(json["why"].as_str().unwrap().contains("gave up"), "{json}");
    assert!(text.contains("crash_loop"), "{text}");
}

#[test]
fn only_the_supervisors_user_may_give_orders() {
    let mut pool = Pool::new("", &sh_workers("copy", 1, "true"));
    pool.start_ready();
    // Another user, with a copy of the binary it may run.
    std::fs::set_permissions(pool.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let own_bin = pool.path("clx-pool");
    std::fs::copy(bin(), &own_bin).unwrap();
    let socket = format!("{}.sock", pool.db_path().display());
    let as_nobody = || {
        Command::new(&own_bin)
            .args(["scale", "copy=3", "--db"])
            .arg(pool.db_path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // The socket's mode keeps it out …
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ermission denied"), "{}", stderr(&out));
    // … and were the mode too wide, its credentials would.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refused: uid 65534"), "{}", stderr(&out));
    assert_eq!(running(&pool, "copy"), 1, "nothing changed");
    // The supervisor's own user may.
    assert!(pool.cli(&["scale", "copy=2"]).status.success());
}
