//! A CLX worker not written in Rust (Python, stdlib sqlite3 only, written
//! from SPEC §4) runs under `clx-pool start` and completes jobs that
//! `clx-pool submit` queued — and reads a database clx-pool created.

mod common;

use common::{Pool, repo_path, stderr, toml_str};

fn python_pool(count: u32) -> Pool {
    let script = repo_path("tests/workers/clx_protocol_worker.py");
    Pool::new(
        "",
        &format!(
            "[[workers]]\nworker_type = \"reverse\"\ncount = {count}\ncommand = [\"python3\", {}]\n",
            toml_str(script.to_str().unwrap())
        ),
    )
}

#[test]
fn python_protocol_worker_completes_submitted_jobs() {
    let mut pool = python_pool(2);
    pool.start_ready();
    let ids: Vec<i64> = (0..20)
        .map(|i| pool.submit("reverse", &format!("r{i}.txt"), &format!("abc{i}")))
        .collect();
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    for i in 0..20 {
        let expected: String = format!("abc{i}").chars().rev().collect();
        assert_eq!(pool.output(&format!("r{i}.txt")), Some(expected));
    }
    let done = pool.query_i64(&format!(
        "SELECT COUNT(*) FROM jobs WHERE status = 'completed' AND id IN ({})",
        ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    ));
    assert_eq!(done, 20, "every submitted job completed");
    // The worker registered with the WORKER_ID the supervisor gave it.
    let ids = pool.query_strings("SELECT container_id FROM workers WHERE status = 'idle' ORDER BY container_id");
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| id.starts_with("direct-reverse-")), "{ids:?}");
    let log = std::fs::read_to_string(pool.path("logs/reverse-0.log")).unwrap();
    assert!(log.contains("registered direct-reverse-0-"), "{log}");
}

#[test]
fn python_worker_crash_mid_job_requeues_the_job_for_the_replacement() {
    let mut pool = python_pool(1);
    pool.start_ready();
    std::fs::write(pool.path("workspace/c.txt"), "xyz").unwrap();
    // The worker crashes on the job's first attempt only.
    let out = pool.cli(&[
        "submit",
        "reverse",
        "c.txt",
        "out/c.txt",
        "--payload",
        "{\"crash_attempts\": 1}",
        "--workspace",
        pool.path("workspace").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.output("c.txt").as_deref(), Some("zyx"));
    assert_eq!(pool.query_i64("SELECT attempts FROM jobs"), 2);
    assert_eq!(pool.query_i64("SELECT restarts FROM clx_pool_slots"), 1);
    let cause: String = pool.first_cause("died");
    assert_eq!(cause, "exited with code 17");
}
