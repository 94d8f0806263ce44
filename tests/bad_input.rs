//! Bad input never turns into a wrong file, a command injection, a failing
//! exec or a false hung verdict; the worker's environment is what the
//! config says; the event history stays bounded.

mod common;

use std::time::Duration;

use common::{Pool, docker_ready, sh_workers, stderr, stdout, test_image, wait_for};

fn start_fails(pool: &Pool) -> String {
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!pool.db_path().exists(), "nothing was created");
    stderr(&out)
}

#[test]
fn placeholders_are_filled_once_and_refused_inside_shell_scripts() {
    let mut pool = Pool::new(
        "",
        "[[workers]]\nworker_type = \"copy\"\njob_command = [\"cp\", \"{input}\", \"{output}\"]\n",
    );
    pool.start_ready();
    // A file whose name holds a placeholder keeps its name.
    std::fs::write(pool.path("workspace/y1.txt"), "the wrong file").unwrap();
    let id = pool.submit("copy", "y{job_id}.txt", "the right file");
    assert_eq!(id, 1);
    assert!(pool.cli(&["wait", "--drained", "--timeout", "20s"]).status.success());
    assert_eq!(pool.output("y{job_id}.txt").as_deref(), Some("the right file"));

    let pool = Pool::new("", &sh_workers("copy", 1, "cp {input} {output}"));
    let err = start_fails(&pool);
    assert!(
        err.contains("workers[0].job_command: {input} inside a shell script"),
        "{err}"
    );
    assert!(err.contains("write \"$CLX_INPUT_FILE\" in the script instead"), "{err}");
}

#[test]
fn payloads_of_any_size_reach_the_job_command() {
    let script = "if [ -n \"$CLX_PAYLOAD_FILE\" ]; then printf 'file %s' \"$(wc -c < \"$CLX_PAYLOAD_FILE\")\"; else printf 'env %s' \"${#CLX_PAYLOAD}\"; fi > \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new("", &sh_workers("size", 1, script));
    pool.start_ready();
    let big = format!("{{\"data\": \"{}\"}}", "x".repeat(300 * 1024));
    let c = pool.conn();
    for (name, payload) in [("small", "{\"k\": 1}".to_string()), ("big", big.clone())] {
        c.execute(
            "INSERT INTO jobs (job_type, status, input_file, output_file, content_hash, payload)
             VALUES ('size', 'pending', 'in', ?1, 'h', ?2)",
            rusqlite::params![format!("out/{name}"), payload],
        )
        .unwrap();
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(pool.output("small").as_deref(), Some("env 8"));
    assert_eq!(
        pool.output("big")
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")),
        Some(format!("file {}", big.len()))
    );
    assert_eq!(
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("clx-payload-{}-", pool.slot_worker("size", 0).0)))
            .count(),
        0,
        "payload files are removed after the job"
    );
}

#[test]
fn limits_below_what_the_database_clock_measures_are_refused() {
    let pool = Pool::new(
        "heartbeat_timeout = \"900ms\"\n",
        &format!("{}max_job_time = \"500ms\"\n", sh_workers("copy", 1, "true")),
    );
    let err = start_fails(&pool);
    assert!(
        err.contains("pool.heartbeat_timeout: must be at least 1s, got 900ms: ages are measured in whole seconds"),
        "{err}"
    );
    assert!(
        err.contains("workers[0].max_job_time: must be at least 1s, got 500ms"),
        "{err}"
    );
}

#[test]
fn inherit_env_decides_what_workers_see_of_the_supervisors_environment() {
    let script = "env > \"$CLX_OUTPUT_FILE\"";
    for (setting, secret_seen, path_seen) in [
        ("", true, true),
        ("inherit_env = false\n", false, true),
        ("inherit_env = [\"SECRET_TOKEN\"]\n", true, false),
    ] {
        let mut pool = Pool::new(setting, &sh_workers("env", 1, script));
        pool.env.push(("SECRET_TOKEN".into(), "hunter2".into()));
        pool.start_ready();
        pool.submit("env", "e.txt", "e");
        let out = pool.cli(&["wait", "--drained", "--timeout", "20s"]);
        assert!(out.status.success(), "{setting}: {}", stderr(&out));
        let env = pool.output("e.txt").unwrap();
        assert_eq!(env.contains("SECRET_TOKEN=hunter2"), secret_seen, "{setting}: {env}");
        assert_eq!(
            env.lines().any(|l| l.starts_with("PATH=")),
            path_seen,
            "{setting}: {env}"
        );
        // The protocol's own variables are always there.
        assert!(
            env.contains("WORKER_TYPE=env") && env.contains("CLX_JOB_ID=1"),
            "{setting}: {env}"
        );
    }
}

#[test]
fn the_event_history_stays_bounded() {
    let mut pool = Pool::new(
        "events_keep = 100\nevents_max_age = \"7days\"\ncheck_interval = \"200ms\"\n",
        &sh_workers("copy", 1, "true"),
    );
    // An old history: 300 events, the first 50 of them 40 days old.
    let out = pool.cli(&[
        "submit",
        "--config",
        pool.config().to_str().unwrap(),
        "copy",
        "a",
        "b",
        "--content-hash",
        "h",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    {
        let c = pool.conn();
        for i in 0..300 {
            let at = if i < 50 {
                "datetime('now', '-40 days')"
            } else {
                "CURRENT_TIMESTAMP"
            };
            c.execute(
                &format!("INSERT INTO clx_pool_events (at, worker_type, slot, event, cause) VALUES ({at}, 'copy', 0, 'died', 'old')"),
                [],
            )
            .unwrap();
        }
    }
    pool.start_ready();
    wait_for("the history to be pruned", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_events")? <= 100).then_some(())
    });
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE at < datetime('now', '-7 days')"),
        0
    );
    assert!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events") >= 90,
        "the newest are kept"
    );
}

#[test]
fn an_oom_killed_job_command_in_a_container_is_reported_as_oom() {
    if !docker_ready() {
        return;
    }
    let workers = format!(
        "{}execution_mode = \"docker\"\nimage = \"{}\"\nmemory_limit = \"32m\"\n",
        sh_workers(
            "hog",
            1,
            "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo done > \"$CLX_OUTPUT_FILE\""
        ),
        test_image()
    );
    let mut pool = Pool::new("network = \"none\"\n", &workers);
    pool.start_ready();
    let out = pool.cli(&[
        "submit",
        "hog",
        "in",
        "out/hog",
        "--content-hash",
        "h",
        "--max-attempts",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "the job failed");
    let error: String = pool
        .conn()
        .query_row("SELECT error FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert!(
        error.contains("was killed by the kernel's OOM killer (out of memory)"),
        "{error}\n{}",
        pool.supervisor_log()
    );
}
