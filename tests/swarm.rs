//! `execution_mode = "swarm"` on a real two-node Docker Swarm: two private
//! dockerds on this machine (manager on 127.0.0.3, worker on 127.0.0.4),
//! started by `scripts/swarm-ci.sh up` (which `make test` runs), named by
//! `CLX_SWARM_HOST` and `CLX_SWARM_WORKER`. The workers are CLM 1.35's own
//! worker code in `clx-pool/clm-test` (tests/fixtures/clm-image), reaching
//! the Worker API over host networking. Without the swarm, the image or
//! the CLM venv these tests skip with a message, and fail under CI=true.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::clm::{Clm, clm};
use common::{Pool, http, kill9, stderr, stdout, wait_for};

const IMAGE: &str = "clx-pool/clm-test:1.35.0";

/// The manager's and the worker's engine.
struct Swarm {
    manager: String,
    worker: String,
}

impl Swarm {
    /// `docker` against one engine.
    fn docker(host: &str, args: &[&str]) -> String {
        let out = Command::new("docker")
            .env("DOCKER_HOST", host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        stdout(&out)
    }

    /// The pool's services on the manager.
    fn services(&self, pool: &Pool) -> Vec<String> {
        let label = format!("label=clx-pool.db-id={}", db_id(pool));
        Swarm::docker(&self.manager, &["service", "ls", "-q", "--filter", &label])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `clx-pool stop` of the pool succeeds and leaves none of its services.
    fn stop(&self, pool: &Pool) {
        let out = pool.cli(&["stop", "--timeout", "60s"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let left = self.services(pool);
        assert!(left.is_empty(), "services left: {left:?}");
    }

    /// The pool's containers on both nodes.
    fn containers(&self, pool: &Pool) -> Vec<String> {
        let label = format!("label=clx-pool.db-id={}", db_id(pool));
        [&self.manager, &self.worker]
            .iter()
            .flat_map(|h| {
                Swarm::docker(h, &["ps", "-aq", "--filter", &label])
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The running tasks of the pool's services: (service name, node id,
    /// container id).
    fn running_tasks(&self, pool: &Pool) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for service in self.services(pool) {
            let ids = Swarm::docker(
                &self.manager,
                &["service", "ps", "-q", "--filter", "desired-state=running", &service],
            );
            for task in ids.lines() {
                let line = Swarm::docker(
                    &self.manager,
                    &[
                        "inspect",
                        "-f",
                        "{{.Status.State}} {{.NodeID}} {{.Status.ContainerStatus.ContainerID}}",
                        task,
                    ],
                );
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() == 3 && parts[0] == "running" {
                    let name = Swarm::docker(&self.manager, &["service", "inspect", "-f", "{{.Spec.Name}}", &service]);
                    out.push((name.trim().to_string(), parts[1].into(), parts[2].into()));
                }
            }
        }
        out.sort();
        out
    }

    /// A variable of a service's worker environment.
    fn service_env(&self, service: &str, name: &str) -> String {
        let env = Swarm::docker(
            &self.manager,
            &[
                "service",
                "inspect",
                "-f",
                "{{range .Spec.TaskTemplate.ContainerSpec.Env}}{{println .}}{{end}}",
                service,
            ],
        );
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {service}'s environment:\n{env}"))
            .to_string()
    }

    /// A running task's token, as its container reads it from its secret
    /// (never in the service's environment).
    fn token_of(&self, task: &(String, String, String)) -> String {
        let (service, node, container) = task;
        let env = Swarm::docker(
            &self.manager,
            &[
                "service",
                "inspect",
                "-f",
                "{{.Spec.TaskTemplate.ContainerSpec.Env}}",
                service,
            ],
        );
        assert!(
            !env.contains("CLM_API_TOKEN"),
            "a token in the service's environment: {env}"
        );
        let host = if *node == self.node_id(&self.manager) {
            &self.manager
        } else {
            &self.worker
        };
        let token = Swarm::docker(host, &["exec", container, "cat", "/run/secrets/clm_api_token"]);
        assert_eq!(token.trim().len(), 64, "the token secret of {service}: {token:?}");
        token.trim().to_string()
    }

    fn node_id(&self, host: &str) -> String {
        Swarm::docker(host, &["info", "-f", "{{.Swarm.NodeID}}"])
            .trim()
            .to_string()
    }
}

fn db_id(pool: &Pool) -> String {
    clx_pool::executor::docker::db_id(&pool.db_path())
}

/// Removes whatever of a pool is left on the swarm when a test ends (also
/// when it fails); declared after the pool, so it runs after the pool's
/// supervisor is stopped.
struct Leftovers<'a> {
    swarm: &'a Swarm,
    db_id: String,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let label = format!("label=clx-pool.db-id={}", self.db_id);
        let services = Swarm::docker(&self.swarm.manager, &["service", "ls", "-q", "--filter", &label]);
        for s in services.lines() {
            Swarm::docker(&self.swarm.manager, &["service", "rm", s]);
        }
    }
}

/// The swarm, the CLM venv and the image on both nodes, or None.
fn ready() -> Option<(Swarm, Clm)> {
    let clm = clm()?;
    let swarm = match (std::env::var("CLX_SWARM_HOST"), std::env::var("CLX_SWARM_WORKER")) {
        (Ok(manager), Ok(worker)) => Swarm { manager, worker },
        _ => {
            let problem =
                "no swarm: CLX_SWARM_HOST/CLX_SWARM_WORKER unset (`make test` starts one with scripts/swarm-ci.sh)";
            common::skip(&format!("swarm tests: {problem}"));
            return None;
        }
    };
    for host in [&swarm.manager, &swarm.worker] {
        let found = Swarm::docker(host, &["image", "ls", "-q", IMAGE]);
        assert!(
            !found.trim().is_empty(),
            "{IMAGE} is not on {host}; scripts/swarm-ci.sh up loads it"
        );
    }
    Some((swarm, clm))
}

/// `POST /api/worker/heartbeat` for `row` with `token`: the status code.
fn heartbeat(port: u16, token: &str, row: &str) -> u16 {
    let auth = format!("Bearer {token}");
    let body = format!("{{\"worker_id\": {row}}}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    http(addr, "POST", "/api/worker/heartbeat", &headers, body.as_bytes())
        .unwrap()
        .0
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `clm` pool whose entries run as swarm services on `swarm`; its
/// workspace anyone may write (the image's user is 1000 unless "auto").
fn pool(clm: &Clm, swarm: &Swarm, workers: &str) -> (Pool, u16) {
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let extra = format!(
        "data_dir = \"data\"\napi_listen = \"127.0.0.1:{port}\"\napi_advertise = \"http://127.0.0.1:{port}\"\nstartup_timeout = \"60s\"\n\n[swarm]\ndocker_host = \"{}\"\n",
        swarm.manager
    );
    let pool = clm.pool_with(&extra, workers);
    std::fs::create_dir_all(pool.path("data")).unwrap();
    std::fs::create_dir_all(pool.path("workspace/out")).unwrap();
    for dir in ["workspace", "workspace/out"] {
        std::fs::set_permissions(pool.path(dir), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    (pool, port)
}

fn entry(worker_type: &str, count: u32, constraint: &str) -> String {
    format!(
        "[[workers]]\nworker_type = \"{worker_type}\"\ncount = {count}\nexecution_mode = \"swarm\"\nimage = \"{IMAGE}\"\nconstraints = [\"{constraint}\"]\n"
    )
}

/// Queues `n` jobs of `job_type` with CLM's own `JobQueue`.
fn add_jobs(clm: &Clm, pool: &Pool, job_type: &str, first: usize, n: usize) {
    for i in first..first + n {
        let input = pool.path(&format!("data/{job_type}-{i}.txt"));
        std::fs::write(&input, format!("{job_type} {i}\n")).unwrap();
        let output = pool.path(&format!("workspace/out/{job_type}-{i}.txt"));
        clm.add_job(&pool.db_path(), job_type, &input, &output, "{}");
    }
}

/// Queues one job of `job_type` that sleeps `seconds` before it writes
/// its output; its id.
fn add_sleeping_job(clm: &Clm, pool: &Pool, job_type: &str, name: &str, seconds: u32) -> i64 {
    let input = pool.path(&format!("data/{name}.txt"));
    std::fs::write(&input, format!("{name}\n")).unwrap();
    let output = pool.path(&format!("workspace/out/{name}.txt"));
    clm.add_job(
        &pool.db_path(),
        job_type,
        &input,
        &output,
        &format!("{{\"sleep\": {seconds}}}"),
    )
}

/// Waits until job `id` is held by a worker; that worker's row.
fn held_by(pool: &Pool, id: i64) -> i64 {
    wait_for(&format!("job {id} to be taken"), Duration::from_secs(60), || {
        pool.try_i64(&format!(
            "SELECT COALESCE(MAX(worker_id), 0) FROM jobs WHERE id = {id} AND status = 'processing'"
        ))
        .filter(|row| *row > 0)
    })
}

fn wait_ready(pool: &Pool) {
    pool.wait_ready_within("120s");
}

#[test]
fn swarm_slots_run_clm_jobs_on_both_nodes_replace_a_killed_task_and_stop_leaves_nothing() {
    let Some((swarm, clm)) = ready() else { return };
    let workers = format!(
        "{}{}",
        entry("echo-m", 1, "node.role == manager"),
        entry("echo-w", 1, "node.role == worker")
    );
    let (mut pool, port) = pool(&clm, &swarm, &workers);
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    pool.start();
    wait_ready(&pool);
    let log = pool.supervisor_log();
    assert_eq!(
        log.matches("preflight: the worker API answers").count(),
        2,
        "one per placement: {log}"
    );
    // One service per slot, one task each, on the node its entry asked for.
    let tasks = swarm.running_tasks(&pool);
    let (manager, worker) = (swarm.node_id(&swarm.manager), swarm.node_id(&swarm.worker));
    let names: Vec<&str> = tasks.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names.len(), 2, "{tasks:?}");
    for (name, node, _) in &tasks {
        let wanted = if name.starts_with("clx-echo-m-") {
            &manager
        } else {
            &worker
        };
        assert_eq!(node, wanted, "{name} runs on the node its constraint names: {tasks:?}");
    }
    // Both pre-registered rows were activated through the API; CLM sees
    // container workers.
    assert_eq!(
        pool.query_strings("SELECT DISTINCT status || ' ' || execution_mode FROM workers"),
        vec!["idle docker"]
    );
    let stats = stdout(&pool.cli(&["stats"]));
    assert!(stats.contains("swarm"), "{stats}");
    // Each worker's node, in `stats --workers`.
    let workers = stdout(&pool.cli(&["stats", "--workers"]));
    for node in [&manager, &worker] {
        assert!(workers.contains(&node[..12]), "node {node} in:\n{workers}");
    }
    // … and what Swarm says of its task (at its next poll).
    wait_for("stats to show both tasks running", Duration::from_secs(30), || {
        let out = pool.cli(&["stats", "--workers", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let tasks: Vec<&str> = json["worker_list"]
            .as_array()?
            .iter()
            .map(|w| w["task"].as_str().unwrap_or("none"))
            .collect();
        (tasks == ["running", "running"]).then_some(())
    });
    let workers = stdout(&pool.cli(&["stats", "--workers"]));
    let header = workers
        .lines()
        .find(|l| l.trim_start().starts_with("ROW"))
        .unwrap_or_default();
    assert!(header.trim_end().ends_with("TASK"), "{workers}");

    add_jobs(&clm, &pool, "echo-m", 0, 3);
    add_jobs(&clm, &pool, "echo-w", 0, 3);
    pool.drained("120s");
    for kind in ["echo-m", "echo-w"] {
        for i in 0..3 {
            let out = std::fs::read_to_string(pool.path(&format!("workspace/out/{kind}-{i}.txt")));
            assert_eq!(out.unwrap(), format!("{kind} {i}\n"));
        }
    }

    // Each worker has a token of its own, bound to its row.
    // (Delivered as a Swarm secret, read into CLM_API_TOKEN by a wrapper.)
    let row_of = |name: &str| swarm.service_env(name, "CLM_WORKER_ID");
    let (w_name, m_name) = (&tasks[1].0, &tasks[0].0);
    let (old_token, old_row) = (swarm.token_of(&tasks[1]), row_of(w_name));
    assert_ne!(old_token, swarm.token_of(&tasks[0]));
    assert_eq!(heartbeat(port, &old_token, &old_row), 200);
    assert_eq!(
        heartbeat(port, &old_token, &row_of(m_name)),
        403,
        "another worker's row"
    );

    // The worker node's task is killed: the slot sees it at its next poll
    // and starts a new worker (a new row), which takes the next jobs.
    let (_, _, container) = tasks
        .iter()
        .find(|(n, _, _)| n.starts_with("clx-echo-w-"))
        .unwrap()
        .clone();
    Swarm::docker(&swarm.worker, &["kill", &container]);
    wait_for(
        "the killed worker to be recorded and replaced",
        Duration::from_secs(90),
        || {
            let died =
                pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'died' AND worker_type = 'echo-w'");
            let live = pool.query_i64("SELECT COUNT(*) FROM workers WHERE worker_type = 'echo-w' AND status = 'idle'");
            (died == 1 && live == 1).then_some(())
        },
    );
    let cause = pool.first_cause("died");
    assert!(cause.contains("137") || cause.contains("SIGKILL"), "{cause}");
    // The dead worker's token was revoked with its end: a replica that
    // lived on would be refused.
    assert_eq!(heartbeat(port, &old_token, &old_row), 401);
    add_jobs(&clm, &pool, "echo-w", 3, 2);
    pool.drained("120s");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'"),
        8
    );

    swarm.stop(&pool);
    let label = format!("label=clx-pool.db-id={}", db_id(&pool));
    let secrets = Swarm::docker(&swarm.manager, &["secret", "ls", "-q", "--filter", &label]);
    assert_eq!(secrets.trim(), "", "the workers' token secrets are gone");
    wait_for(
        "the tasks' containers to be removed on both nodes",
        Duration::from_secs(60),
        || swarm.containers(&pool).is_empty().then_some(()),
    );
}

#[test]
fn after_the_supervisor_is_killed_its_guard_removes_every_service_of_the_pool() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("echo", 2, "node.labels.clx-test == 1"));
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    pool.start();
    wait_ready(&pool);
    assert_eq!(swarm.services(&pool).len(), 2);
    kill9(pool.supervisor_pid());
    wait_for(
        "the guard to remove the pool's services",
        Duration::from_secs(60),
        || swarm.services(&pool).is_empty().then_some(()),
    );
    wait_for(
        "the tasks' containers to be removed on both nodes",
        Duration::from_secs(60),
        || swarm.containers(&pool).is_empty().then_some(()),
    );
    // The rows the dead run left are buried.
    wait_for("the worker rows to be marked dead", Duration::from_secs(30), || {
        (pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'") == 0).then_some(())
    });
}

#[test]
fn a_task_no_node_can_take_cools_the_slot_down_with_swarms_reason() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("echo", 1, "node.labels.nowhere == 1"));
    // (`startup_timeout` of the pool is 60 s; this entry's attempt ends
    // just before a shorter one.)
    let config = std::fs::read_to_string(pool.config()).unwrap().replace(
        "startup_timeout = \"60s\"",
        "startup_timeout = \"4s\"\nrestart_limit = 2\nrestart_window = \"1m\"\nrestart_cooldown = \"10m\"",
    );
    std::fs::write(pool.config(), config).unwrap();
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    // `check` says so before anything starts.
    let config = pool.config();
    let check = pool.cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1), "{}", stdout(&check));
    assert!(
        stderr(&check).contains(
            "none of the swarm's 2 node(s) can take its tasks (ready and active, `node.labels.nowhere == 1`)"
        ),
        "{}",
        stderr(&check)
    );
    pool.start();
    // While it waits, `stats --workers` says why, in Swarm's words.
    wait_for("stats to show the task pending", Duration::from_secs(60), || {
        let out = pool.cli(&["stats", "--workers", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let task = json["worker_list"].get(0)?["task"].as_str()?.to_string();
        task.starts_with("pending: no suitable node").then_some(())
    });
    // Two attempts that no node took: then a cool-down, never a give-up.
    let note = wait_for("the slot to cool down", Duration::from_secs(60), || {
        let conn = rusqlite::Connection::open(pool.db_path()).ok()?;
        conn.query_row(
            "SELECT state || ' ' || COALESCE(note, '') FROM clx_pool_slots
             WHERE state = 'backoff' AND note LIKE '%fault outside the worker%'",
            [],
            |r| r.get::<_, String>(0),
        )
        .ok()
    });
    assert!(note.contains("fault outside the worker"), "{note}");
    assert!(note.contains("no suitable node"), "Swarm's reason: {note}");
    let cause = pool.first_cause("died");
    assert!(cause.starts_with("was never placed (no suitable node"), "{cause}");
    // Not given up: it waits for restart_cooldown.
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'failed'"),
        0
    );
    swarm.stop(&pool);
}

/// Pauses scheduling on a node until dropped.
struct Paused<'a> {
    swarm: &'a Swarm,
    node: String,
}

impl<'a> Paused<'a> {
    fn new(swarm: &'a Swarm, node: String) -> Paused<'a> {
        Swarm::docker(&swarm.manager, &["node", "update", "--availability", "pause", &node]);
        Paused { swarm, node }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        Swarm::docker(
            &self.swarm.manager,
            &["node", "update", "--availability", "active", &self.node],
        );
    }
}

/// Freezes an engine (SIGSTOP) until dropped: its node looks lost to the
/// swarm while its containers run on.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        common::signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

#[test]
fn a_worker_on_a_lost_node_is_ended_and_replaced_on_a_live_one_and_its_token_refused() {
    let Some((swarm, clm)) = ready() else { return };
    let root = std::env::var("CLX_SWARM_ROOT").unwrap_or_else(|_| "/tmp/clx-swarm".into());
    let Ok(pid) = std::fs::read_to_string(format!("{root}/w/docker.pid")) else {
        panic!("no pid file of the worker node's dockerd under {root}");
    };
    let (mut pool, port) = pool(&clm, &swarm, &entry("echo", 1, "node.labels.clx-test == 1"));
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    let (manager, worker) = (swarm.node_id(&swarm.manager), swarm.node_id(&swarm.worker));
    let config = pool.config();
    let check = pool.cli(&["check", "--config", config.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stdout(&check).contains("2 of 2 node(s) can take its tasks"),
        "{}",
        stdout(&check)
    );
    assert!(
        stdout(&check).contains("ok: workers `echo`: preflight on "),
        "{}",
        stdout(&check)
    );
    {
        // The first task goes to the worker node.
        let _paused = Paused::new(&swarm, manager.clone());
        pool.start();
        wait_ready(&pool);
    }
    let tasks = swarm.running_tasks(&pool);
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].1, worker, "{tasks:?}");
    let (token, row) = (
        swarm.token_of(&tasks[0]),
        swarm.service_env(&tasks[0].0, "CLM_WORKER_ID"),
    );
    // It holds a job when its node is lost (its container keeps running:
    // only the node's engine is frozen).
    let job = add_sleeping_job(&clm, &pool, "echo", "held", 40);
    assert_eq!(held_by(&pool, job).to_string(), row);
    let frozen = Frozen(pid.trim().parse().unwrap());
    common::signal(frozen.0, nix::sys::signal::Signal::SIGSTOP);
    // Swarm marks the node down (about 15 s); the slot ends the worker
    // with that cause and starts a new one, which Swarm puts on the
    // manager.
    let cause = wait_for(
        "the worker on the lost node to be ended",
        Duration::from_secs(90),
        || {
            pool.query_strings("SELECT cause FROM clx_pool_events WHERE event = 'died'")
                .into_iter()
                .next()
        },
    );
    assert!(
        cause.contains("is down") || cause.contains("no longer runs its task"),
        "{cause}"
    );
    wait_for("a new worker on the manager", Duration::from_secs(90), || {
        let idle = pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'idle'");
        let on_manager = swarm.running_tasks(&pool).iter().any(|(_, node, _)| *node == manager);
        (idle == 1 && on_manager).then_some(())
    });
    // The replica on the frozen node still runs, but its token is dead.
    assert_eq!(heartbeat(port, &token, &row), 401);
    add_jobs(&clm, &pool, "echo", 0, 2);
    pool.drained("180s");
    // The held job went back and was done once, by the new worker; the
    // zombie's own report (when its sleep ended) was refused.
    let (status, attempts, by): (String, i64, String) = {
        let conn = rusqlite::Connection::open(pool.db_path()).unwrap();
        conn.query_row(
            &format!("SELECT status, attempts, CAST(worker_id AS TEXT) FROM jobs WHERE id = {job}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    assert_eq!((status.as_str(), attempts), ("completed", 2), "{by}");
    assert_ne!(by, row, "completed by the replacement");
    assert_eq!(
        std::fs::read_to_string(pool.path("workspace/out/held.txt")).unwrap(),
        "held\n"
    );
    // Its engine back, Swarm stops the zombie: one worker, one container.
    drop(frozen);
    wait_for("the zombie's container to be stopped", Duration::from_secs(90), || {
        (swarm.containers(&pool).len() == 1).then_some(())
    });
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'"),
        3
    );
    swarm.stop(&pool);
}

/// `openssl ARGS` in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = Command::new("openssl").args(&args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with
/// `openssl` in `dir`: (ca.pem, api.crt, api.key). Both carry what Python
/// 3.13's strict verification (CLM's images) wants: key usages, a CA's
/// basic constraints, key identifiers.
fn private_ca(dir: &std::path::Path) -> (String, String, String) {
    openssl(
        dir,
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=clx-test-ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
         -keyout ca.key -out ca.pem",
    );
    issue(dir, "clx-test-api");
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    (path("ca.pem"), path("api.crt"), path("api.key"))
}

/// A new key and certificate for 127.0.0.1 named `cn`, signed by the CA
/// of `dir`, into api.key and api.crt.
fn issue(dir: &std::path::Path, cn: &str) {
    openssl(
        dir,
        &format!("req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={cn} -keyout api.key -out api.csr"),
    );
    let ext = "subjectAltName = IP:127.0.0.1\nkeyUsage = critical,digitalSignature\n\
               extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n";
    std::fs::write(dir.join("api.ext"), ext).unwrap();
    openssl(
        dir,
        "x509 -req -in api.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile api.ext -out api.crt",
    );
}

/// The subject of the certificate the API at `port` presents.
fn presented_subject(ca: &str, port: u16) -> String {
    let out = Command::new("curl")
        .args(["-sSv", "--cacert", ca, &format!("https://127.0.0.1:{port}/health")])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(stdout(&out).contains("\"status\":\"ok\""), "{}{log}", stdout(&out));
    log.lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
        .unwrap_or_else(|| panic!("no subject in curl's log:\n{log}"))
        .to_string()
}

#[test]
fn the_worker_api_serves_https_and_swarm_workers_trust_its_private_ca() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, port) = pool(&clm, &swarm, &entry("echo", 2, "node.labels.clx-test == 1"));
    let (ca, cert, key) = private_ca(&pool.path(""));
    let config = std::fs::read_to_string(pool.config()).unwrap().replace(
        &format!("api_advertise = \"http://127.0.0.1:{port}\""),
        &format!(
            "api_advertise = \"https://127.0.0.1:{port}\"\napi_tls_cert = \"{cert}\"\napi_tls_key = \"{key}\"\napi_tls_ca = \"{ca}\""
        ),
    );
    std::fs::write(pool.config(), config).unwrap();
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    let label = format!("label=clx-pool.db-id={}", db_id(&pool));
    let secrets = || Swarm::docker(&swarm.manager, &["secret", "ls", "-q", "--filter", &label]);
    // `check` runs the preflight over HTTPS with the CA (serving /health
    // itself, as no supervisor runs) and leaves nothing on the swarm.
    let check = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(check.status.success(), "{}{}", stdout(&check), stderr(&check));
    assert!(
        stdout(&check).contains(&format!(
            "the worker API answers at https://127.0.0.1:{port} and the shared workspace is read and written there"
        )),
        "{}",
        stdout(&check)
    );
    assert!(swarm.services(&pool).is_empty(), "no preflight service left by check");
    assert_eq!(secrets().trim(), "", "no CA secret left by check");
    pool.start();
    wait_ready(&pool);
    // CLM's own client (httpx) registered and works over HTTPS, trusting
    // the private CA through the secret clx-pool handed it.
    add_jobs(&clm, &pool, "echo", 0, 4);
    pool.drained("120s");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'"),
        4
    );
    let service = &swarm.running_tasks(&pool)[0].0;
    assert_eq!(swarm.service_env(service, "SSL_CERT_FILE"), "/run/secrets/clx_ca.pem");
    // Plain HTTP gets no HTTP answer; HTTPS with the CA does.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let plain = http(addr, "GET", "/health", &[], b"");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    assert!(presented_subject(&ca, port).contains("CN=clx-test-api"));
    // A renewed certificate in the same files is served after a reload.
    issue(&pool.path(""), "clx-test-renewed");
    let out = pool.cli(&["reload"]);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("re-read the worker API's certificate and key"), "{said}");
    assert!(presented_subject(&ca, port).contains("CN=clx-test-renewed"));
    assert_eq!(secrets().lines().count(), 3, "the CA's secret and each worker's token");
    swarm.stop(&pool);
    assert_eq!(secrets().trim(), "", "no secret left");
}

#[test]
fn start_refuses_a_swarm_pool_whose_nodes_cannot_reach_the_worker_api_and_says_why() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, port) = pool(&clm, &swarm, &entry("echo", 2, "node.labels.clx-test == 1"));
    // The nodes are told a port nobody listens on.
    let wrong = free_port();
    let config = std::fs::read_to_string(pool.config()).unwrap().replace(
        &format!("api_advertise = \"http://127.0.0.1:{port}\""),
        &format!("api_advertise = \"http://127.0.0.1:{wrong}\""),
    );
    std::fs::write(pool.config(), config).unwrap();
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    refused_by_preflight(
        &mut pool,
        &swarm,
        &format!("cannot reach the worker API at http://127.0.0.1:{wrong}/health"),
    );
}

/// `check`, then `start`, refuse the pool with the preflight's words:
/// `check` exits 1, the supervisor exits 1, and no service is left.
fn refused_by_preflight(pool: &mut Pool, swarm: &Swarm, words: &str) {
    let check = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1), "{}", stdout(&check));
    assert!(swarm.services(pool).is_empty(), "no preflight service left by check");
    pool.start();
    assert_eq!(
        pool.wait_supervisor_exit(Duration::from_secs(180)),
        1,
        "{}",
        pool.supervisor_log()
    );
    for said in [stderr(&check), pool.supervisor_log()] {
        assert!(
            said.contains("workers `echo`: preflight: the preflight task on"),
            "{said}"
        );
        assert!(said.contains(words), "{said}");
    }
    assert!(
        swarm.services(pool).is_empty(),
        "no worker was started, no preflight left"
    );
}

/// The pool's volumes on both nodes (`[swarm] files = { nfs = ... }`),
/// removed when dropped: Swarm never removes them itself.
struct Volumes<'a> {
    swarm: &'a Swarm,
    db_id: String,
}

impl Volumes<'_> {
    /// (node, volume name, its driver's options as JSON) of each volume.
    fn list(&self) -> Vec<(String, String, String)> {
        let label = format!("label=clx-pool.db-id={}", self.db_id);
        let mut all = Vec::new();
        for host in [&self.swarm.manager, &self.swarm.worker] {
            for name in Swarm::docker(host, &["volume", "ls", "-q", "--filter", &label]).lines() {
                let options = Swarm::docker(host, &["volume", "inspect", "-f", "{{json .Options}}", name]);
                all.push((host.clone(), name.to_string(), options.trim().to_string()));
            }
        }
        all
    }
}

impl Drop for Volumes<'_> {
    fn drop(&mut self) {
        for (host, name, _) in self.list() {
            Swarm::docker(&host, &["volume", "rm", "-f", &name]);
        }
    }
}

/// `files = { nfs = ... }`: the preflight task gets its workspace as an
/// NFS volume that Swarm creates on its node (type nfs, the server, the
/// export path of the workspace); a share no node can mount stops `start`
/// with the node and Swarm's words, and no service is left.
#[test]
fn an_nfs_share_no_node_can_mount_stops_start_at_the_preflight_with_swarms_words() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("echo", 1, "node.labels.clx-test == 1"));
    let root = pool.path("");
    let files = format!(
        "[swarm]\nfiles = {{ nfs = \"127.0.0.9:/clx-nowhere\", options = \"nfsvers=4.1,soft,timeo=10,retrans=1\", mounted_at = {} }}\n",
        common::toml_str(root.to_str().unwrap())
    );
    let config = std::fs::read_to_string(pool.config())
        .unwrap()
        .replace("[swarm]\n", &files);
    std::fs::write(pool.config(), config).unwrap();
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    let volumes = Volumes {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    // Swarm's own words: what it tried to mount, and why it could not.
    refused_by_preflight(
        &mut pool,
        &swarm,
        "failed to mount local volume: mount :/clx-nowhere/workspace",
    );
    // One volume on each node that ran a preflight task (check's, start's).
    let made = volumes.list();
    assert!((1..=2).contains(&made.len()), "{made:?}");
    for (_, name, options) in &made {
        assert!(name.starts_with(&format!("clx-{}-workspace-", db_id(&pool))), "{name}");
        let options: serde_json::Value = serde_json::from_str(options).unwrap();
        assert_eq!(options["type"], "nfs", "{options}");
        assert_eq!(options["device"], ":/clx-nowhere/workspace", "{options}");
        assert_eq!(
            options["o"], "addr=127.0.0.9,nfsvers=4.1,soft,timeo=10,retrans=1",
            "{options}"
        );
    }
}

/// A swarm worker over `max_job_time` is found hung: its token is revoked
/// (401), its service replaced by a new worker with a row of its own.
#[test]
fn a_hung_swarm_worker_is_replaced_and_its_token_refused() {
    let Some((swarm, clm)) = ready() else { return };
    let workers = entry("echo", 1, "node.labels.clx-test == 1") + "max_job_time = \"3s\"\n";
    let (mut pool, port) = pool(&clm, &swarm, &workers);
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    pool.start();
    wait_ready(&pool);
    let first = swarm.running_tasks(&pool).remove(0);
    let (token, row) = (swarm.token_of(&first), swarm.service_env(&first.0, "CLM_WORKER_ID"));
    let job = add_sleeping_job(&clm, &pool, "echo", "stuck", 60);
    held_by(&pool, job);
    let cause = wait_for("the worker to be found hung", Duration::from_secs(60), || {
        pool.query_strings("SELECT cause FROM clx_pool_events WHERE event = 'hung'")
            .into_iter()
            .next()
    });
    assert!(cause.contains("max_job_time"), "{cause}");
    assert_eq!(heartbeat(port, &token, &row), 401, "the hung worker's token is revoked");
    wait_for("a new worker in its place", Duration::from_secs(90), || {
        let tasks = swarm.running_tasks(&pool);
        let fresh = tasks.len() == 1 && swarm.service_env(&tasks[0].0, "CLM_WORKER_ID") != row;
        (fresh && pool.query_i64("SELECT COUNT(*) FROM workers WHERE status IN ('idle', 'busy')") == 1).then_some(())
    });
    let out = pool.cli(&["jobs", "cancel", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    swarm.stop(&pool);
}

/// `scale` down retires an idle swarm worker first: the busy one keeps
/// its job to the end, and its service stays.
#[test]
fn a_scale_down_retires_the_idle_swarm_worker_and_keeps_the_busy_one() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("echo", 2, "node.labels.clx-test == 1"));
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    pool.start();
    wait_ready(&pool);
    let job = add_sleeping_job(&clm, &pool, "echo", "long", 15);
    let busy = held_by(&pool, job).to_string();
    let out = pool.cli(&["scale", "echo=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("one service left", Duration::from_secs(60), || {
        (swarm.services(&pool).len() == 1).then_some(())
    });
    let kept = swarm.running_tasks(&pool);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        swarm.service_env(&kept[0].0, "CLM_WORKER_ID"),
        busy,
        "the busy worker stays"
    );
    pool.drained("120s");
    assert_eq!(
        pool.query_strings(&format!("SELECT status || ' ' || attempts FROM jobs WHERE id = {job}")),
        vec!["completed 1"]
    );
    swarm.stop(&pool);
}

/// An entry whose image no node has (added by `reload`, after the
/// preflight): its nodes cannot start its tasks, which is a fault outside
/// the worker: the slot cools down with Swarm's words, never given up,
/// and the pool's other workers are untouched.
#[test]
fn an_image_no_node_has_cools_the_slot_down_with_swarms_words() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("echo", 1, "node.labels.clx-test == 1"));
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    pool.start();
    wait_ready(&pool);
    let missing = entry("ghost", 1, "node.labels.clx-test == 1").replace(IMAGE, "clx-pool/no-such-image:1");
    let config = std::fs::read_to_string(pool.config()).unwrap().replace(
        "startup_timeout = \"60s\"",
        "startup_timeout = \"60s\"\nrestart_limit = 2\nrestart_window = \"5m\"\nrestart_cooldown = \"10m\"",
    ) + &missing;
    std::fs::write(pool.config(), config).unwrap();
    let out = pool.cli(&["reload"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let note = wait_for("the ghost slot to cool down", Duration::from_secs(120), || {
        pool.query_strings(
            "SELECT COALESCE(note, '') FROM clx_pool_slots
             WHERE worker_type = 'ghost' AND state = 'backoff' AND note LIKE '%fault outside the worker%'",
        )
        .into_iter()
        .next()
    });
    assert!(note.contains("never started (its node"), "{note}");
    assert!(note.contains("no-such-image"), "Swarm's words name the image: {note}");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'failed'"),
        0,
        "never given up"
    );
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE worker_type = 'echo' AND state = 'running'"),
        1
    );
    swarm.stop(&pool);
}

/// How many `plantuml` workers CLM 1.35's own discovery counts as healthy
/// docker workers a build may reuse, as `clm build --workers docker` asks
/// (`LifecycleManager`: a `DockerWorkerExecutor` when an engine answers
/// at DOCKER_HOST, whose `is_worker_running` looks for the worker's
/// container there), with `docker_host` as DOCKER_HOST.
fn clm_counts_reusable(clm: &Clm, db: &std::path::Path, docker_host: &str) -> i64 {
    let out = clm.py_env(
        "import sys\n\
         from pathlib import Path\n\
         from clm.infrastructure.workers.discovery import WorkerDiscovery\n\
         executors = {}\n\
         try:\n\
         \x20   import docker\n\
         \x20   from clm.infrastructure.workers.worker_executor import DockerWorkerExecutor\n\
         \x20   executors['docker'] = DockerWorkerExecutor(docker_client=docker.from_env(), db_path=Path(sys.argv[1]), workspace_path=Path('/tmp'), data_dir=None, network_name='clm_app_network', log_level='INFO')\n\
         except Exception as e:\n\
         \x20   print('no docker executor:', e, file=sys.stderr)\n\
         d = WorkerDiscovery(Path(sys.argv[1]), executors=executors)\n\
         print(d.count_healthy_workers('plantuml', execution_mode='docker', reusable_for_session='s'))\n",
        &[db.to_str().unwrap()],
        &[("DOCKER_HOST", docker_host)],
    );
    stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}{}", stdout(&out), stderr(&out)))
}

/// A real `clm build --workers docker` and the pool's swarm workers:
/// CLM counts a docker worker as alive only if it finds its container on
/// the engine at DOCKER_HOST, which never holds a swarm worker's (they run
/// on any node), so with an engine at hand it would start workers of its
/// own. With no engine to ask (DOCKER_HOST naming none), CLM trusts the
/// heartbeats: the build reuses the pool, starts nothing, and the pool's
/// workers on the swarm convert its jobs (docs/swarm.md, "clm build").
#[test]
fn clm_build_reuses_the_swarm_pool_when_it_has_no_engine_to_ask() {
    let Some((swarm, clm)) = ready() else { return };
    let (mut pool, _) = pool(&clm, &swarm, &entry("plantuml", 1, "node.labels.clx-test == 1"));
    let _leftovers = Leftovers {
        swarm: &swarm,
        db_id: db_id(&pool),
    };
    common::clm::copy_dir(&common::repo_path("tests/fixtures/clm-course"), &pool.path("data"));
    pool.start();
    wait_ready(&pool);
    assert_eq!(clm_counts_reusable(&clm, &pool.db_path(), &swarm.manager), 0);
    let nowhere = "unix:///nonexistent/docker.sock";
    assert_eq!(clm_counts_reusable(&clm, &pool.db_path(), nowhere), 1);
    let logs = pool.path("clm-logs");
    let out = clm
        .build(&pool, &pool.path("data"), &pool.path("workspace/site"), "docker", 1)
        .env("DOCKER_HOST", nowhere)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(logs.join("clm.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "clm build failed: {}{}\n{log}",
        stdout(&out),
        stderr(&out)
    );
    assert!(log.contains("Sufficient healthy workers already running"), "{log}");
    assert!(!log.contains("Starting managed workers"), "{log}");
    let pngs = common::clm::find_files(&pool.path("workspace/site"), "png");
    assert!(pngs.iter().any(|p| p.ends_with("hello.png")), "{pngs:?}");
    assert_eq!(
        pool.query_i64(
            "SELECT COUNT(*) FROM jobs WHERE worker_id IS NULL OR worker_id NOT IN (SELECT worker_row FROM clx_pool_slots)"
        ),
        0,
        "every job ran on the pool's swarm worker"
    );
    swarm.stop(&pool);
}
