//! The CLI as CI scripts and people use it: scoped waits, job hygiene,
//! honest stats, terminal conventions, completions, the demo. Each drives
//! the real binary; terminals are real pseudo-terminals (`script`).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{COPY, Pool, bin, processes_with_env, repo_path, sh_workers, stderr, stdout, wait_for};

/// Fails the first time it sees a job, then copies (so a retry succeeds).
const FAIL_ONCE: &str = "m=\"$WORKSPACE_PATH/tried-$CLX_JOB_ID\"; if [ ! -e \"$m\" ]; then touch \"$m\"; echo 'no luck' >&2; exit 3; fi; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";

fn pool(extra_workers: &str) -> Pool {
    let workers = format!(
        "{}\n{}\n{extra_workers}",
        sh_workers("copy", 1, COPY),
        sh_workers("flaky", 1, FAIL_ONCE)
    );
    Pool::new("check_interval = \"500ms\"\n", &workers)
}

/// `submit` of a new workspace file `name` (holding its name), with `extra`.
fn submit(pool: &Pool, job_type: &str, name: &str, extra: &[&str]) -> std::process::Output {
    std::fs::write(pool.path("workspace").join(name), name).unwrap();
    let (output, ws) = (format!("out/{name}"), pool.path("workspace"));
    let mut args = vec!["submit", job_type, name, &output, "--workspace", ws.to_str().unwrap()];
    args.extend_from_slice(extra);
    pool.cli(&args)
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[test]
fn submit_wait_and_wait_jobs_follow_the_given_jobs_only() {
    let mut pool = pool(&sh_workers("slow", 1, "sleep 60"));
    pool.start_ready();
    let out = submit(&pool, "copy", "a.txt", &["--wait", "--timeout", "30s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    let id: i64 = lines[0].parse().unwrap();
    assert_eq!(lines[1], "1 job completed");
    let out = submit(&pool, "flaky", "b.txt", &["--max-attempts", "1", "--wait"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("did not complete") && stderr(&out).contains("no luck"),
        "{}",
        stderr(&out)
    );
    // A job that does not finish does not hold up a wait for other jobs.
    let stuck = pool.submit_with("slow", "c.txt", &[]);
    let out = pool.cli(&["wait", "--jobs", &id.to_string(), "--timeout", "5s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = pool.cli(&["wait", "--jobs", &id.to_string(), &stuck.to_string(), "--timeout", "1s"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("timed out") && stderr(&out).contains("1 of 2 jobs not finished"));
    let out = pool.cli(&["wait", "--jobs", "999999"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("no job 999999"), "{}", stderr(&out));
}

#[test]
fn wait_drained_judges_the_current_run_unless_all() {
    let mut pool = pool("");
    pool.start_ready();
    pool.submit_with("flaky", "old.txt", &["--max-attempts", "1"]);
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(stderr(&out).contains("1 job of this run failed"), "{}", stderr(&out));
    assert_eq!(code(&pool.cli(&["stop"])), 0);
    pool.wait_supervisor_exit(Duration::from_secs(10));
    // The database's clock counts whole seconds: the next run starts later.
    std::thread::sleep(Duration::from_millis(1100));
    pool.start_ready();
    pool.submit_with("copy", "new.txt", &[]);
    let out = pool.drained("30s");
    assert_eq!(stdout(&out).trim(), "drained: 1 job of this run completed");
    let out = pool.cli(&["wait", "--drained", "--all", "--timeout", "5s"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("old.txt"), "{}", stderr(&out));
}

#[test]
fn jobs_are_listed_newest_first_shown_cancelled_retried_and_pruned() {
    let slow = sh_workers("slow", 1, "sleep 60; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"");
    let mut pool = pool(&slow);
    pool.start_ready();
    // Sixty old jobs, then ours.
    {
        let c = pool.conn();
        for i in 0..60 {
            c.execute(
                "INSERT INTO jobs (job_type, status, input_file, output_file, content_hash, payload, completed_at)
                 VALUES ('copy', 'completed', ?1, ?1, 'h', '{}', datetime('now', '-2 days'))",
                [format!("old{i}")],
            )
            .unwrap();
        }
    }
    let failed = pool.submit_with("flaky", "f.txt", &["--max-attempts", "1"]);
    let running = pool.submit_with("slow", "s.txt", &[]);
    let pending = pool.submit_with("nobody", "p.txt", &["--allow-unserved"]);
    let out = pool.cli(&["jobs"]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    assert!(text.contains("… 13 more (newest 50 shown"), "{text}");
    let first_row = text.lines().nth(1).unwrap();
    assert!(first_row.trim_start().starts_with(&pending.to_string()), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&pool.cli(&["jobs", "list", "--json", "--limit", "2"]).stdout).unwrap();
    assert_eq!(
        (json["total"].as_i64(), json["jobs"][0]["id"].as_i64()),
        (Some(63), Some(pending))
    );
    let only = pool.cli(&["jobs", "--type", "flaky", "--status", "failed,completed"]);
    wait_for("the flaky job to fail", Duration::from_secs(20), || {
        let out = pool.cli(&["jobs", "show", &failed.to_string(), "--json"]);
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (d["status"] == "failed").then_some(())
    });
    assert_eq!(code(&only), 0);

    // Cancel the running job: its command is stopped.
    wait_for("the slow job to run", Duration::from_secs(20), || {
        (!processes_with_env(&format!("CLX_JOB_ID={running}")).is_empty()).then_some(())
    });
    let out = pool.cli(&["jobs", "cancel", &running.to_string(), &pending.to_string()]);
    assert_eq!(stdout(&out).trim(), format!("2 jobs cancelled: {running}, {pending}"));
    wait_for("the cancelled command to be stopped", Duration::from_secs(10), || {
        processes_with_env(&format!("CLX_JOB_ID={running}"))
            .is_empty()
            .then_some(())
    });
    let show = stdout(&pool.cli(&["jobs", "show", &running.to_string()]));
    assert!(show.contains("status: cancelled"), "{show}");
    wait_for("the slow worker to be idle again", Duration::from_secs(10), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE worker_type = 'slow' AND status = 'idle'")? == 1)
            .then_some(())
    });
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND job_type = 'slow'"),
        0
    );

    // Retry the failed job with a fresh budget: this time it works.
    let out = pool.cli(&["jobs", "retry", "--failed"]);
    assert_eq!(stdout(&out).trim(), format!("1 job put back in the queue: {failed}"));
    let out = pool.cli(&["wait", "--jobs", &failed.to_string(), "--timeout", "20s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(pool.output("f.txt").as_deref(), Some("f.txt"));

    // Prune what finished more than a day ago.
    let out = pool.cli(&["jobs", "prune", "--older-than", "1day", "--vacuum"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("60 jobs pruned"), "{}", stdout(&out));
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM jobs"), 3);
    let out = pool.cli(&["jobs", "prune", "--older-than", "1s", "--status", "pending"]);
    assert_eq!(code(&out), 2);
    let out = pool.cli(&["jobs", "cancel"]);
    assert_eq!(code(&out), 2, "cancel needs ids, --type or --all");
}

fn stats_json(pool: &Pool) -> serde_json::Value {
    serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap()
}

#[test]
fn stats_tells_the_truth_and_check_judges_the_pool() {
    let mut pool = pool("");
    pool.start_ready();
    let out = pool.cli(&["stats", "--check"]);
    assert_eq!((code(&out), stdout(&out).trim()), (0, "healthy"));
    let text = stdout(&pool.cli(&["stats"]));
    assert!(text.contains("2 workers configured"), "{text}");
    let (pid, worker) = pool.slot_worker("copy", 0);
    let workers = stdout(&pool.cli(&["stats", "--workers"]));
    let line = workers
        .lines()
        .find(|l| l.contains(&worker))
        .unwrap_or_else(|| panic!("{workers}"));
    assert!(line.contains(&pid.to_string()) && line.contains("idle"), "{line}");

    pool.submit_with("flaky", "x.txt", &["--max-attempts", "1"]);
    wait_for("the job to fail", Duration::from_secs(20), || {
        (stats_json(&pool)["jobs"]["failed"] == 1).then_some(())
    });
    let out = pool.cli(&["stats", "--check"]);
    assert_eq!(code(&out), 1);
    assert!(
        stdout(&out)
            .contains("degraded: 1 of 1 job that finished in the last 5m failed (more than 20%: health_failure_rate)"),
        "{}",
        stdout(&out)
    );

    // Killed without stopping: nothing is shown running, and the pool is down.
    pool.kill_supervisor_and_guard();
    let text = stdout(&pool.cli(&["stats"]));
    assert!(text.contains("ended without stopping its pool"), "{text}");
    let json = stats_json(&pool);
    assert_eq!(json["supervisor"]["stopped_uncleanly"], true, "{json}");
    assert_eq!(json["pools"]["copy"]["running"], 0, "{json}");
    assert_eq!(json["workers"]["copy"]["idle"], 0, "{json}");
    assert_eq!(json["workers"]["copy"]["dead"], 1, "{json}");
    let out = pool.cli(&["stats", "--check"]);
    assert_eq!(code(&out), 2);
    assert!(stdout(&out).starts_with("down"), "{}", stdout(&out));
    // What the dead workers were is cleaned up by `stop`.
    assert_eq!(code(&pool.cli(&["stop"])), 0);
}

/// Runs `command` (a shell line) under a pseudo-terminal; returns all it wrote.
fn on_a_terminal(command: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn colour_and_progress_only_where_they_belong() {
    let mut pool = pool(&sh_workers("slow", 1, "sleep 60"));
    pool.start_ready();
    let db = pool.db_path().display().to_string();
    let stats = format!("{} stats --db {db}", bin());
    assert!(on_a_terminal(&stats, &[]).contains("\x1b[32mhealthy"));
    assert!(!on_a_terminal(&stats, &[("NO_COLOR", "1")]).contains('\x1b'));
    assert!(!on_a_terminal(&format!("{stats} --color never"), &[]).contains('\x1b'));
    let piped = pool.cli(&["stats", "--color", "always"]);
    assert!(stdout(&piped).contains("\x1b[32mhealthy"));
    assert!(!stdout(&pool.cli(&["stats"])).contains('\x1b'));

    // Progress: a bar on a terminal, nothing on a pipe.
    let stuck = pool.submit_with("slow", "w.txt", &[]);
    let wait = format!("{} wait --db {db} --jobs {stuck} --timeout 2s", bin());
    let tty = on_a_terminal(&wait, &[]);
    assert!(tty.contains("0/1 jobs finished"), "{tty:?}");
    let out = pool.cli(&["wait", "--jobs", &stuck.to_string(), "--timeout", "1s"]);
    assert_eq!(
        stderr(&out).trim(),
        "error: timed out after 1s: 1 of 1 job not finished"
    );

    // --watch: a minimum interval, and no screen clearing into a pipe.
    assert_eq!(code(&pool.cli(&["stats", "--watch", "0s"])), 2);
    let mut watch = Command::new(bin())
        .args(["stats", "--db", &db, "--watch", "200ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = watch.stdout.as_mut().unwrap().read(&mut buf).unwrap();
    watch.kill().unwrap();
    watch.wait().unwrap();
    let first = String::from_utf8_lossy(&buf[..n]);
    assert!(first.contains("database:") && !first.contains('\x1b'), "{first:?}");
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    let pool = pool("");
    pool.cli(&["stats"]); // creates nothing; the database comes from the jobs below
    let c = rusqlite::Connection::open(pool.db_path()).unwrap();
    clx_pool::db::schema::prepare(&c, None).unwrap();
    for i in 0..3000 {
        c.execute(
            "INSERT INTO jobs (job_type, status, input_file, output_file, content_hash, payload) VALUES ('t', 'pending', ?1, ?1, 'h', '{}')",
            [format!("in-{i}")],
        )
        .unwrap();
    }
    for args in [
        vec!["jobs", "list", "--json", "--limit", "3000"],
        vec!["stats", "--json"],
        vec!["jobs", "--limit", "3000"],
    ] {
        let mut child = Command::new(bin())
            .args(&args)
            .arg("--db")
            .arg(pool.db_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -c 10`: read a little, then hang up.
        let mut head = [0u8; 10];
        child.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("clx-pool") && text.contains("--drained"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let page = std::fs::read_to_string(dir.path().join("clx-pool-wait.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("drained"), "{page}");
    let help = Command::new(bin()).arg("--help").output().unwrap();
    assert!(stdout(&help).contains("Exit codes:"));
}

#[test]
fn the_demo_keeps_to_itself_and_says_why_it_fails() {
    // A user's pool on the demo config (its database is ../run/jobs.db).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let config = dir.path().join("config/pool.toml");
    std::fs::copy(repo_path("config/pool.toml"), &config).unwrap();
    let theirs = dir.path().join("run/jobs.db");
    let mut user = Command::new(bin())
        .args(["start", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = common::ChildGuard(Some(user.id() as i32));
    let ready = Command::new(bin())
        .args(["wait", "--ready", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(ready.status.success(), "{}", stderr(&ready));
    let demo = Command::new("sh")
        .arg(repo_path("scripts/demo.sh"))
        .env("CLX_POOL", bin())
        .env("CONFIG", &config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(demo.status.success(), "{}{}", stdout(&demo), stderr(&demo));
    assert!(stdout(&demo).contains("demo finished"));
    assert!(user.try_wait().unwrap().is_none(), "the demo stopped the user's pool");
    let c = rusqlite::Connection::open(&theirs).unwrap();
    assert_eq!(
        c.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        0
    );
    drop(guard);
    user.wait().unwrap();

    // A config that cannot start: the demo says so and shows the log.
    std::fs::write(
        &config,
        "[pool]\nstop_timeout = \"1s\"\n\n[[workers]]\nworker_type = \"x\"\ncommand = [\"/nonexistent/worker\"]\n",
    )
    .unwrap();
    let demo = Command::new("sh")
        .arg(repo_path("scripts/demo.sh"))
        .env("CLX_POOL", bin())
        .env("CONFIG", &config)
        .output()
        .unwrap();
    assert!(!demo.status.success());
    assert!(
        stderr(&demo).contains("the demo pool did not start"),
        "{}",
        stderr(&demo)
    );
}
