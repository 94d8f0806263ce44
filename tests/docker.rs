//! Docker mode against a real engine (no mocked API): containers from the
//! project's own test image (`make docker-image`), deaths from the event
//! stream, OOM, mixed pools, cleanup after a crash, `auto` mode.
//! Without an engine these tests skip with a message, except under CI=true.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{COPY, Pool, SLOW_FIRST, docker_ready, sh_workers, stderr, stdout, test_image, wait_for};

fn docker_workers(worker_type: &str, count: u32, mode: &str, script: &str) -> String {
    format!(
        "{}execution_mode = \"{mode}\"\nimage = \"{}\"\n",
        sh_workers(worker_type, count, script),
        test_image()
    )
}

/// Tests use no network (SPEC: network mode none or a user network).
const NO_NETWORK: &str = "network = \"none\"\ncheck_interval = \"200ms\"\n";

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn docker_pool_registers_and_completes_jobs_in_the_workspace() {
    if !docker_ready() {
        return;
    }
    let mut pool = Pool::new(NO_NETWORK, &docker_workers("copy", 3, "docker", COPY));
    pool.start_ready();
    let ids = pool.query_strings("SELECT container_id FROM workers WHERE status = 'idle'");
    assert_eq!(ids.len(), 3);
    assert!(
        ids.iter()
            .all(|id| id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit())),
        "{ids:?}"
    );
    let containers = pool.containers();
    assert_eq!(containers.len(), 3);
    let name = docker(&[
        "inspect",
        "-f",
        "{{.Name}} {{index .Config.Labels \"clx-pool.db\"}}",
        &ids[0],
    ]);
    assert!(name.starts_with("/clx-copy-worker-"), "{name}");
    assert!(name.trim_end().ends_with(pool.db_path().to_str().unwrap()), "{name}");
    for i in 0..12 {
        pool.submit("copy", &format!("d{i}.txt"), &format!("from a container {i}"));
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    for i in 0..12 {
        assert_eq!(pool.output(&format!("d{i}.txt")), Some(format!("from a container {i}")));
    }
    // Container CPU and memory come from the engine.
    wait_for("container memory figures", Duration::from_secs(10), || {
        (pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle' AND memory_usage > 0") == 3).then_some(())
    });
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.containers(), Vec::<String>::new(), "stop removes the containers");
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
}

#[test]
fn docker_kill_is_noticed_and_the_job_completes_on_the_replacement() {
    if !docker_ready() {
        return;
    }
    let mut pool = Pool::new(NO_NETWORK, &docker_workers("copy", 1, "docker", SLOW_FIRST));
    pool.start_ready();
    let id = pool.submit("copy", "k.txt", "kept");
    // The job command marks its first attempt before it starts to sleep.
    wait_for("the job's first attempt to run", Duration::from_secs(20), || {
        pool.path(&format!("workspace/attempted-{id}")).exists().then_some(())
    });
    let (_, container) = pool.slot_worker("copy", 0);
    docker(&["kill", &container]);
    let replacement = pool.wait_replacement("copy", 0, &container, Duration::from_secs(20));
    assert_ne!(replacement, container);
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.output("k.txt").as_deref(), Some("kept"));
    assert_eq!(pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {id}")), 2);
    let cause: String = pool.cause_of(&container);
    assert_eq!(cause, "was killed by SIGKILL");
    assert_eq!(pool.containers().len(), 1, "the killed container was removed");
}

#[test]
fn container_over_its_memory_limit_is_recorded_as_oom() {
    if !docker_ready() {
        return;
    }
    let workers = format!(
        "[[workers]]\nworker_type = \"hog\"\ncount = 1\nexecution_mode = \"docker\"\nimage = \"{}\"\nmemory_limit = \"16m\"\ncommand = [\"/bin/sh\", \"-c\", \"x=$(head -c 200000000 /dev/zero | tr '\\\\0' x); sleep 60\"]\n",
        test_image()
    );
    let mut pool = Pool::new(&format!("{NO_NETWORK}restart_limit = 1\n"), &workers);
    pool.start();
    let cause = wait_for("the OOM kill to be recorded", Duration::from_secs(30), || {
        pool.try_i64("SELECT COUNT(*) FROM clx_pool_events")?;
        pool.conn()
            .query_row("SELECT cause FROM clx_pool_events LIMIT 1", [], |r| {
                r.get::<_, String>(0)
            })
            .ok()
    });
    assert_eq!(
        cause,
        "was killed by the kernel's OOM killer (out of memory)",
        "{}",
        pool.supervisor_log()
    );
}

#[test]
fn mixed_pool_runs_docker_and_direct_workers_and_stop_leaves_nothing() {
    if !docker_ready() {
        return;
    }
    let workers = format!(
        "{}\n{}",
        docker_workers("boxed", 2, "docker", COPY),
        sh_workers("native", 2, COPY)
    );
    let mut pool = Pool::new(NO_NETWORK, &workers);
    pool.start_ready();
    for i in 0..5 {
        pool.submit("boxed", &format!("b{i}.txt"), "in a box");
        pool.submit("native", &format!("n{i}.txt"), "on the host");
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&pool.cli(&["stats", "--json"]))).unwrap();
    assert_eq!(v["pools"]["boxed"]["execution_mode"], "docker", "{v}");
    assert_eq!(v["pools"]["native"]["execution_mode"], "direct", "{v}");
    assert_eq!(v["jobs"]["completed"], 10, "{v}");
    assert_eq!(pool.containers().len(), 2);
    assert_eq!(pool.processes().len(), 2);
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.wait_supervisor_exit(Duration::from_secs(10)), 0);
    assert!(pool.containers().is_empty(), "{:?}", pool.containers());
    assert!(pool.processes().is_empty(), "{:?}", pool.processes());
}

#[test]
fn a_killed_supervisors_guard_removes_its_containers() {
    if !docker_ready() {
        return;
    }
    let mut pool = Pool::new(NO_NETWORK, &docker_workers("copy", 2, "docker", COPY));
    pool.start_ready();
    assert_eq!(pool.containers().len(), 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.supervisor_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pool.wait_supervisor_exit(Duration::from_secs(5));
    wait_for("the guard to remove the containers", Duration::from_secs(20), || {
        pool.containers().is_empty().then_some(())
    });
    wait_for("the guard to mark the workers dead", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'")? == 0).then_some(())
    });
}

#[test]
fn stop_after_a_killed_supervisor_removes_leftover_containers() {
    if !docker_ready() {
        return;
    }
    let mut pool = Pool::new(NO_NETWORK, &docker_workers("copy", 2, "docker", COPY));
    pool.start_ready();
    // The guard would remove them at once; this is the case where it died too.
    pool.kill_supervisor_and_guard();
    assert_eq!(
        pool.containers().len(),
        2,
        "containers outlive a killed supervisor and guard"
    );
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed 2 container(s)"), "{}", stdout(&out));
    assert!(pool.containers().is_empty());
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
}

#[test]
fn auto_mode_picks_docker_when_the_engine_answers_and_direct_otherwise() {
    if !docker_ready() {
        return;
    }
    let mut up = Pool::new(NO_NETWORK, &docker_workers("copy", 1, "auto", COPY));
    up.start_ready();
    let v: serde_json::Value = serde_json::from_str(&stdout(&up.cli(&["stats", "--json"]))).unwrap();
    assert_eq!(v["pools"]["copy"]["execution_mode"], "docker (auto)", "{v}");
    assert_eq!(up.containers().len(), 1);

    let mut down = Pool::new(NO_NETWORK, &docker_workers("copy", 1, "auto", COPY));
    down.env
        .push(("DOCKER_HOST".into(), "unix:///nonexistent/docker.sock".into()));
    down.start_ready();
    let v: serde_json::Value = serde_json::from_str(&stdout(&down.cli(&["stats", "--json"]))).unwrap();
    assert_eq!(v["pools"]["copy"]["execution_mode"], "direct (auto)", "{v}");
    assert!(
        down.supervisor_log()
            .contains("running directly (no Docker engine answers at unix:///nonexistent/docker.sock"),
        "{}",
        down.supervisor_log()
    );
    down.submit("copy", "a.txt", "direct after all");
    assert!(down.cli(&["wait", "--drained", "--timeout", "30s"]).status.success());
    assert_eq!(down.output("a.txt").as_deref(), Some("direct after all"));
}

#[test]
fn docker_entry_without_engine_or_image_fails_fast_with_the_reason() {
    // The engine check needs no engine: it must fail cleanly.
    let pool = Pool::new(NO_NETWORK, &docker_workers("copy", 1, "docker", COPY));
    let mut cmd = Command::new(common::bin());
    cmd.args(["start", "--config"])
        .arg(pool.config())
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "start must not hang without an engine"
    );
    let err = stderr(&out);
    assert!(err.contains("workers `copy`: execution_mode = \"docker\" needs a Docker engine: no Docker engine answers at unix:///nonexistent/docker.sock"), "{err}");
    let check = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(pool.config())
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    assert!(stderr(&check).contains("needs a Docker engine"), "{}", stderr(&check));

    if !docker_ready() {
        return;
    }
    let missing = Pool::new(
        NO_NETWORK,
        "[[workers]]\nworker_type = \"notebook\"\nexecution_mode = \"docker\"\nimage = \"clx-pool/no-such-image:0\"\n",
    );
    let out = missing.cli(&["start", "--config", missing.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the image clx-pool/no-such-image:0 is not on this host; clx-pool never pulls: get it with `docker pull clx-pool/no-such-image:0`"), "{}", stderr(&out));
    let check = missing.cli(&["check", "--config", missing.config().to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1));
    assert!(stderr(&check).contains("is not on this host"), "{}", stderr(&check));
}

#[test]
fn docker_network_is_created_once_and_containers_join_it() {
    if !docker_ready() {
        return;
    }
    let network = format!("clx-test-{}", std::process::id());
    let mut pool = Pool::new(
        &format!("network = \"{network}\"\n"),
        &docker_workers("copy", 2, "docker", COPY),
    );
    pool.start_ready();
    let found = docker(&["network", "ls", "-q", "--filter", &format!("name=^{network}$")]);
    assert_eq!(found.lines().count(), 1, "exactly one network named {network}");
    let (_, container) = pool.slot_worker("copy", 0);
    let joined = docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &container]);
    assert_eq!(joined.trim(), network);
    assert!(pool.cli(&["stop"]).status.success());
    let check = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(
        stdout(&check).contains(&format!("docker network {network} exists")),
        "{}",
        stdout(&check)
    );
    docker(&["network", "rm", &network]);
}

#[test]
fn builtin_worker_in_a_container_speaks_clm() {
    if !docker_ready() {
        return;
    }
    let mut pool = Pool::new(
        &format!("protocol = \"clm\"\n{NO_NETWORK}"),
        &docker_workers("copy", 2, "docker", COPY),
    );
    pool.start_ready();
    // The pre-registered rows took the containers' ids once they were known.
    let ids = pool.query_strings(
        "SELECT container_id FROM workers WHERE status = 'idle' AND managed_by = 'persistent'
         AND execution_mode = 'docker' AND session_id IS NULL",
    );
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        ids.iter()
            .all(|id| id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit())),
        "{ids:?}"
    );
    let env = docker(&["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", &ids[0]]);
    assert!(env.lines().any(|l| l == "CLM_JOBS_DB_PATH=/db/jobs.db"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("CLM_WORKER_ID=")), "{env}");
    assert!(!env.lines().any(|l| l.starts_with("DB_PATH=")), "{env}");
    for i in 0..6 {
        pool.submit("copy", &format!("m{i}.txt"), &format!("clm in a container {i}"));
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    for i in 0..6 {
        assert_eq!(
            pool.output(&format!("m{i}.txt")),
            Some(format!("clm in a container {i}"))
        );
    }
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.containers(), Vec::<String>::new());
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM workers"),
        0,
        "the workers removed their rows"
    );
}

#[test]
fn docker_workers_scale_and_restart_rolling_without_losing_jobs() {
    if !docker_ready() {
        return;
    }
    let script =
        "echo \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; sleep 0.3; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new(NO_NETWORK, &docker_workers("copy", 1, "docker", script));
    pool.start_ready();
    let ids: Vec<i64> = (0..12)
        .map(|i| pool.submit_with("copy", &format!("d{i}.txt"), &[]))
        .collect();
    let out = pool.cli(&["scale", "copy=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("three containers", Duration::from_secs(30), || {
        (pool.containers().len() == 3).then_some(())
    });
    // A rolling restart of busy containers: each finishes its job first
    // (SIGUSR1 to the built-in worker inside).
    let before = pool.containers();
    let out = pool.cli(&["restart", "--rolling"]);
    assert!(out.status.success(), "{}{}", stderr(&out), pool.supervisor_log());
    let out = pool.cli(&["scale", "copy=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    pool.drained("60s");
    wait_for("one container left", Duration::from_secs(30), || {
        (pool.containers().len() == 1).then_some(())
    });
    assert!(
        pool.containers().iter().all(|c| !before.contains(c)),
        "every container was replaced"
    );
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap();
    let mut ran: Vec<i64> = ledger.lines().map(|l| l.parse().unwrap()).collect();
    ran.sort();
    assert_eq!(ran, ids, "each job ran exactly once");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE attempts = 1 AND status = 'completed'"),
        12
    );
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'replaced'"),
        3
    );
}
