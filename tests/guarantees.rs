//! The guarantees of SPEC §5 where run-time control, clock steps, database
//! locks and workers the pool did not start meet: every job runs exactly
//! once (a command starts again only when its holder is known dead or
//! hung), and nothing outlives its job or the pool. Real processes, real
//! SQLite files.

mod common;

use std::time::Duration;

use common::{Pool, sh_workers, stderr, stdout, wait_for};

/// Each job notes its id in the ledger when its command starts, works for
/// `work`, then copies its input.
fn ledger_job(work: &str) -> String {
    format!(
        "echo \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; sleep {work}; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\""
    )
}

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
    assert!(twice.is_empty(), "jobs whose command ran more than once: {twice:?}");
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
fn hand_worker(pool: &Pool, worker_type: &str, id: &str, job: Option<&str>) -> common::ChildGuard {
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
    common::ChildGuard(Some(child.id() as i32))
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
