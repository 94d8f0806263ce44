//! CLM workers in containers under `protocol = "clm"`: clx-pool serves
//! CLM's Worker API, and the containers run CLM 1.35's own worker code (a
//! small `Worker` subclass, tests/fixtures/clm-image) in an image built by
//! `make clm-test-image`. Jobs are queued with CLM's own `JobQueue`.
//! Without Docker, the image or the CLM venv these tests skip with a
//! message, and fail under CI=true.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::clm::{Clm, clm};
use common::{Pool, http, stdout, wait_for};

const IMAGE: &str = "clx-pool/clm-test:1.35.0";

/// The CLM venv (to queue jobs), a Docker engine and the image, or None.
fn ready() -> Option<Clm> {
    let clm = clm()?;
    let image = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if image {
        return Some(clm);
    }
    let problem = format!("no Docker engine or no {IMAGE} (run `make clm-test-image`)");
    common::skip(&format!("CLM docker tests: {problem}"));
    None
}

/// A bridge network of the test's own, removed when the test ends (declare
/// it before the pool, so the pool's containers are gone first).
struct Network(String);

impl Network {
    fn new(tag: &str) -> Network {
        Network(format!("clx-test-{tag}-{}", std::process::id()))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Command::new("docker")
            .args(["network", "rm", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

/// A `clm` pool on `net` whose sources are in `data/` and whose workspace
/// anyone may write (the image's own user is 1000).
fn pool(clm: &Clm, net: &Network, extra: &str, workers: &str) -> Pool {
    // A Python container can take 15 s to register on a loaded machine.
    let startup = if extra.contains("startup_timeout") {
        ""
    } else {
        "startup_timeout = \"60s\"\n"
    };
    let pool = clm.pool_with(
        &format!("network = \"{}\"\ndata_dir = \"data\"\n{startup}{extra}", net.0),
        workers,
    );
    std::fs::create_dir_all(pool.path("data")).unwrap();
    std::fs::create_dir_all(pool.path("workspace/out")).unwrap();
    for dir in ["workspace", "workspace/out"] {
        std::fs::set_permissions(pool.path(dir), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    pool
}

/// Starts the pool and waits (up to two minutes) until every container
/// registered.
fn start_ready(pool: &mut Pool) {
    pool.start_ready_within("120s");
}

fn echo_workers(worker_type: &str, count: u32, more: &str) -> String {
    format!(
        "[[workers]]\nworker_type = \"{worker_type}\"\ncount = {count}\nexecution_mode = \"docker\"\nimage = \"{IMAGE}\"\n{more}\n"
    )
}

/// Queues `n` jobs of `job_type` with CLM's `JobQueue.add_job`, inputs in
/// `data/`, outputs in `workspace/out/`; returns their ids.
fn add_jobs(clm: &Clm, pool: &Pool, job_type: &str, n: usize, payload: &str) -> Vec<i64> {
    for i in 0..n {
        std::fs::write(
            pool.path(&format!("data/{job_type}-{i}.txt")),
            format!("{job_type} {i}\n"),
        )
        .unwrap();
    }
    let out = clm.py(
        "import json, sys\n\
         from pathlib import Path\n\
         from clm.infrastructure.database.job_queue import JobQueue\n\
         db, kind, n, data, out, payload = sys.argv[1:7]\n\
         q = JobQueue(Path(db))\n\
         for i in range(int(n)):\n\
         \x20   src = f'{data}/{kind}-{i}.txt'\n\
         \x20   print(q.add_job(kind, src, f'{out}/{kind}-{i}.txt', f'hash-{kind}-{i}', json.loads(payload)))\n\
         q.close()\n",
        &[
            pool.db_path().to_str().unwrap(),
            job_type,
            &n.to_string(),
            pool.path("data").to_str().unwrap(),
            pool.path("workspace/out").to_str().unwrap(),
            payload,
        ],
    );
    stdout(&out).lines().map(|l| l.parse().unwrap()).collect()
}

/// `CLM_API_URL` and `CLM_API_TOKEN` as a container of the pool got them.
fn api_of(pool: &Pool) -> (String, String) {
    let id = pool.containers().into_iter().next().expect("a container");
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", &id])
        .output()
        .unwrap();
    let env = stdout(&out);
    let get = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in the container's environment:\n{env}"))
            .to_string()
    };
    (get("CLM_API_URL"), get("CLM_API_TOKEN"))
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn clm_containers_register_through_the_api_and_complete_clm_jobs_as_the_host_user() {
    let Some(clm) = ready() else { return };
    let net = Network::new("basic");
    let workers = format!(
        "{}{}",
        echo_workers("echo", 2, ""),
        echo_workers("echo-image-user", 1, "user = \"image\"")
    );
    let mut pool = pool(&clm, &net, "", &workers);
    start_ready(&mut pool);
    assert!(
        pool.supervisor_log().contains("the worker API is up"),
        "{}",
        pool.supervisor_log()
    );
    // The rows were pre-registered and activated through the API.
    assert_eq!(
        pool.query_strings("SELECT DISTINCT status || ' ' || execution_mode FROM workers ORDER BY 1"),
        vec!["idle docker"]
    );
    let containers = pool.containers();
    assert_eq!(containers.len(), 3);
    for id in pool.query_strings("SELECT container_id FROM workers") {
        assert!(containers.iter().any(|c| c.starts_with(&id)), "{id} is not a container");
    }

    let mine = add_jobs(&clm, &pool, "echo", 6, "{}");
    let theirs = add_jobs(&clm, &pool, "echo-image-user", 2, "{}");
    pool.drained("90s");
    for (kind, ids, owner) in [
        ("echo", &mine, nix::unistd::getuid().as_raw()),
        ("echo-image-user", &theirs, 1000),
    ] {
        for i in 0..ids.len() {
            let out = pool.path(&format!("workspace/out/{kind}-{i}.txt"));
            assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{kind} {i}\n"));
            assert_eq!(
                std::fs::metadata(&out).unwrap().uid(),
                owner,
                "owner of {}",
                out.display()
            );
        }
    }
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND attempts = 1"),
        8
    );
    // Reported through the API: the worker's statistics and its cache entries.
    assert_eq!(pool.query_i64("SELECT SUM(jobs_processed) FROM workers"), 8);
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM results_cache"), 8);
    let out = pool.cli(&["stop"]);
    assert!(out.status.success());
    wait_for("the containers to be removed", Duration::from_secs(20), || {
        pool.containers().is_empty().then_some(())
    });
}

#[test]
fn ten_containers_claim_three_hundred_jobs_each_exactly_once() {
    let Some(clm) = ready() else { return };
    let net = Network::new("many");
    let workers = echo_workers("echo", 10, "env = { CLX_TEST_LEDGER = \"/workspace/ledger\" }");
    let mut pool = pool(&clm, &net, "startup_timeout = \"60s\"\n", &workers);
    pool.start();
    let out = pool.cli(&["wait", "--ready", "--timeout", "120s"]);
    assert!(out.status.success(), "{}", pool.supervisor_log());
    let ids = add_jobs(&clm, &pool, "echo", 300, "{}");
    pool.drained("180s");
    let ledger = std::fs::read_to_string(pool.path("workspace/ledger")).unwrap();
    let mut ran: Vec<i64> = ledger.lines().map(|l| l.parse().unwrap()).collect();
    ran.sort();
    assert_eq!(ran, ids, "every job ran exactly once");
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND attempts = 1"),
        300
    );
    // The work was shared.
    assert!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE jobs_processed > 0") >= 2);
}

#[test]
fn a_killed_busy_container_s_job_completes_on_its_replacement() {
    let Some(clm) = ready() else { return };
    let net = Network::new("kill");
    let mut pool = pool(&clm, &net, "", &echo_workers("echo", 1, ""));
    start_ready(&mut pool);
    let job = add_jobs(&clm, &pool, "echo", 1, "{\"sleep_once\": 60}")[0];
    let row = wait_for("the job to be processing", Duration::from_secs(30), || {
        pool.try_i64(&format!(
            "SELECT worker_id FROM jobs WHERE id = {job} AND status = 'processing'"
        ))
    });
    // The first run is in its long sleep (its marker is there).
    wait_for("the first run's marker", Duration::from_secs(30), || {
        pool.path(&format!("workspace/.slept-{job}")).exists().then_some(())
    });
    let container = pool.query_strings(&format!("SELECT container_id FROM workers WHERE id = {row}"))[0].clone();
    let killed = Command::new("docker").args(["kill", &container]).output().unwrap();
    assert!(killed.status.success(), "{}", common::stderr(&killed));
    pool.drained("90s");
    assert_eq!(
        pool.query_strings(&format!("SELECT status || ' ' || attempts FROM jobs WHERE id = {job}")),
        vec!["completed 2"]
    );
    assert_ne!(
        pool.query_i64(&format!("SELECT worker_id FROM jobs WHERE id = {job}")),
        row
    );
    assert_eq!(
        pool.query_strings(&format!("SELECT status FROM workers WHERE id = {row}")),
        vec!["dead"]
    );
    assert_eq!(
        std::fs::read_to_string(pool.path("workspace/out/echo-0.txt")).unwrap(),
        "echo 0\n"
    );
}

#[test]
fn a_hung_container_is_replaced_and_its_job_retried() {
    let Some(clm) = ready() else { return };
    let net = Network::new("hung");
    let workers = echo_workers("echo", 1, "max_job_time = \"3s\"");
    let mut pool = pool(&clm, &net, "check_interval = \"500ms\"\n", &workers);
    start_ready(&mut pool);
    let first = pool.containers();
    let job = add_jobs(&clm, &pool, "echo", 1, "{\"sleep_once\": 120}")[0];
    pool.drained("90s");
    assert_eq!(job_state(&pool, job), "completed 2");
    assert!(
        pool.first_cause("hung").contains("max_job_time"),
        "{}",
        pool.first_cause("hung")
    );
    let now = pool.containers();
    assert!(
        now.iter().all(|c| !first.contains(c)),
        "the hung container is still there: {first:?} {now:?}"
    );
}

/// A job's status and attempts.
fn job_state(pool: &Pool, job: i64) -> String {
    pool.query_strings(&format!("SELECT status || ' ' || attempts FROM jobs WHERE id = {job}"))[0].clone()
}

#[test]
fn requests_without_the_token_or_with_a_bad_body_are_refused_and_change_nothing() {
    let Some(clm) = ready() else { return };
    let net = Network::new("auth");
    let mut pool = pool(&clm, &net, "", &echo_workers("echo", 1, ""));
    start_ready(&mut pool);
    let (url, token) = api_of(&pool);
    let api = loopback(port_of(&url));
    // A job no container takes, and a worker row to claim it with.
    let job = add_jobs(&clm, &pool, "nobody", 1, "{}")[0];
    let row = pool.query_i64("SELECT id FROM workers LIMIT 1");
    let claim = format!("{{\"worker_id\": {row}, \"job_type\": \"nobody\"}}");
    let bearer = format!("Bearer {token}");
    let json = ("Content-Type", "application/json");
    let path = "/api/worker/jobs/claim";

    let refused = |headers: &[(&str, &str)], path: &str, body: &[u8]| -> Option<u16> {
        let answer = http(api, "POST", path, headers, body);
        assert_eq!(job_state(&pool, job), "pending 0", "after {answer:?}");
        answer.ok().map(|(status, _)| status)
    };
    assert_eq!(refused(&[json], path, claim.as_bytes()), Some(401));
    assert_eq!(
        refused(&[json, ("Authorization", "Bearer wrong")], path, claim.as_bytes()),
        Some(401)
    );
    assert_eq!(
        refused(&[json, ("Authorization", &token)], path, claim.as_bytes()),
        Some(401)
    );
    let in_query = format!("{path}?token={token}");
    assert_eq!(refused(&[json], &in_query, claim.as_bytes()), Some(401));
    let auth = ("Authorization", bearer.as_str());
    assert_eq!(refused(&[json, auth], path, b"{\"worker_id\": "), Some(422));
    assert_eq!(
        refused(&[json, auth], path, b"{\"worker_id\": \"one\", \"job_type\": 1}"),
        Some(422)
    );
    // 10 MB: answered 413 or cut off, never read into a claim.
    let mut big = claim.clone().into_bytes();
    big.truncate(big.len() - 1);
    big.extend(format!(", \"pad\": \"{}\"}}", "x".repeat(10 * 1024 * 1024)).bytes());
    let status = refused(&[json, auth], path, &big);
    assert!(matches!(status, Some(413) | None), "{status:?}");
    let status_path = format!("/api/worker/jobs/{job}/status");
    let done = format!("{{\"worker_id\": {row}, \"status\": \"completed\"}}");
    assert_eq!(refused(&[json], &status_path, done.as_bytes()), Some(401));

    // The same requests with the token do what they say.
    let (status, body) = http(api, "GET", "/health", &[], b"").unwrap();
    assert_eq!((status, body.contains("\"ok\"")), (200, true), "{body}");
    let (status, body) = http(api, "POST", path, &[json, auth], claim.as_bytes()).unwrap();
    assert_eq!(status, 200, "{body}");
    let claimed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(claimed["job"]["id"], job, "{body}");
    assert_eq!(claimed["job"]["payload"], serde_json::json!({}));
    assert_eq!(job_state(&pool, job), "processing 1");
    let (status, body) = http(api, "POST", &status_path, &[json, auth], done.as_bytes()).unwrap();
    assert_eq!((status, body.as_str()), (200, "{\"acknowledged\":true}"));
    assert_eq!(job_state(&pool, job), "completed 1");
    let (status, _) = http(api, "POST", "/api/worker/jobs/x/status", &[json, auth], done.as_bytes()).unwrap();
    assert_eq!(status, 422);
}

/// A global IPv4 address of this host outside docker's bridges, if any.
fn outside_address() -> Option<IpAddr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    stdout(&out).lines().find_map(|l| {
        let mut words = l.split_whitespace();
        let iface = words.nth(1)?;
        if iface.starts_with("br-") || iface.starts_with("docker") || iface.starts_with("veth") {
            return None;
        }
        words
            .skip_while(|w| *w != "inet")
            .nth(1)?
            .split('/')
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn the_api_is_reachable_beyond_this_machine_only_when_configured() {
    let Some(clm) = ready() else { return };
    let Some(outside) = outside_address() else {
        let problem = "this host has no global address outside docker's bridges (`ip -4 addr`)";
        common::skip(problem);
        return;
    };
    let net = Network::new("reach");
    let mut local = pool(&clm, &net, "", &echo_workers("echo", 1, ""));
    start_ready(&mut local);
    let port = port_of(&api_of(&local).0);
    assert_eq!(http(loopback(port), "GET", "/health", &[], b"").unwrap().0, 200);
    assert!(
        http(SocketAddr::new(outside, port), "GET", "/health", &[], b"").is_err(),
        "the API answers on {outside} without api_listen"
    );
    drop(local);

    // Beyond loopback only with a token the operator chose.
    let refused = pool(&clm, &net, "api_listen = \"0.0.0.0\"\n", &echo_workers("echo", 1, ""));
    let out = refused.cli(&["check", "--config", refused.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("api_token_file"),
        "{}",
        common::stderr(&out)
    );

    let token_file = "api_token_file = \"token\"\napi_listen = \"0.0.0.0\"\n";
    let mut open = pool(&clm, &net, token_file, &echo_workers("echo", 1, ""));
    std::fs::write(open.path("token"), "the-operators-token\n").unwrap();
    start_ready(&mut open);
    let (url, token) = api_of(&open);
    assert_eq!(token, "the-operators-token");
    let there = SocketAddr::new(outside, port_of(&url));
    assert_eq!(http(there, "GET", "/health", &[], b"").unwrap().0, 200);
    let beat = format!(
        "{{\"worker_id\": {}}}",
        open.query_i64("SELECT id FROM workers LIMIT 1")
    );
    let path = "/api/worker/heartbeat";
    assert_eq!(http(there, "POST", path, &[], beat.as_bytes()).unwrap().0, 401);
    let auth = ("Authorization", "Bearer the-operators-token");
    assert_eq!(http(there, "POST", path, &[auth], beat.as_bytes()).unwrap().0, 200);
    // The workers themselves got there too.
    let done = add_jobs(&clm, &open, "echo", 1, "{}");
    open.drained("60s");
    assert_eq!(job_state(&open, done[0]), "completed 1");
}
