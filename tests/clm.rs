//! Today's CLM workers (PyPI `coding-academy-lecture-manager` 1.35) under
//! `protocol = "clm"`, against the real package: its schema, its JobQueue,
//! its WorkerDiscovery, its PlantUML worker and `clm build` itself. The
//! venv comes from `scripts/clm-venv.sh` (run by `make test`); without it
//! these tests skip with a message, and fail under CI=true. Tests of the
//! protocol that need no Python (the built-in worker, refusals) always run.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::clm::{Clm, clm, copy_dir, find_files};
use common::{Pool, env_of, kill9, repo_path, stderr, stdout, toml_str, wait_for};

/// `sqlite_master` without clx-pool's own tables: (type, name, sql).
fn schema_of(db: &Path) -> Vec<(String, String, Option<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare(
            "SELECT type, name, sql FROM sqlite_master
             WHERE name NOT LIKE 'clx_pool_%' AND tbl_name NOT LIKE 'clx_pool_%' ORDER BY type, name",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn reverse_workers(clm: &Clm, count: u32) -> String {
    format!(
        "[[workers]]\nworker_type = \"reverse\"\ncount = {count}\ncommand = [{}, {}]\n",
        toml_str(clm.python().to_str().unwrap()),
        toml_str(repo_path("tests/workers/clm_test_worker.py").to_str().unwrap())
    )
}

const CP_WORKERS: &str =
    "[[workers]]\nworker_type = \"copy\"\ncount = 2\njob_command = [\"cp\", \"{input}\", \"{output}\"]\n";

#[test]
fn the_schema_is_the_one_clm_init_database_creates_and_clm_opens_it_without_migrating() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool(CP_WORKERS);
    pool.start_ready();
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let theirs = pool.path("theirs.db");
    clm.py(
        "import sys\nfrom pathlib import Path\n\
         from clm.infrastructure.database.schema import init_database\n\
         init_database(Path(sys.argv[1]))\n",
        &[theirs.to_str().unwrap()],
    );
    let ours = schema_of(&pool.db_path());
    assert!(ours.iter().any(|(_, name, _)| name == "worker_heartbeats"), "{ours:#?}");
    assert_eq!(ours, schema_of(&theirs));
    assert_eq!(pool.schema_versions(), vec![11]);
    // CLM's own code opens it and changes nothing (no migration).
    clm.py(
        "import sys\nfrom pathlib import Path\n\
         from clm.infrastructure.database.schema import init_database\n\
         from clm.infrastructure.database.job_queue import JobQueue\n\
         init_database(Path(sys.argv[1]))\n\
         q = JobQueue(Path(sys.argv[1])); q.get_job_stats(); q.close()\n",
        &[pool.db_path().to_str().unwrap()],
    );
    assert_eq!(schema_of(&pool.db_path()), ours);
    assert_eq!(pool.schema_versions(), vec![11]);
}

#[test]
fn the_real_plantuml_worker_converts_diagrams_clm_queued_and_is_healthy_for_clm() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool("[[workers]]\nworker_type = \"plantuml\"\ncount = 2\n");
    pool.start_ready();
    let db = pool.db_path();
    let ws = pool.path("workspace");
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            let input = ws.join(format!("d{i}.pu"));
            std::fs::write(&input, format!("@startuml\nAlice -> Bob: hello {i}\n@enduml\n")).unwrap();
            clm.add_job(&db, "plantuml", &input, &ws.join(format!("out/d{i}.png")), "{}")
        })
        .collect();
    pool.drained("120s");
    for i in 0..3 {
        let png = std::fs::read(ws.join(format!("out/d{i}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "d{i}.png is a PNG");
    }
    let ids = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    assert_eq!(
        pool.query_i64(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id IN ({ids}) AND status = 'completed' AND attempts = 1"
        )),
        3
    );
    // The rows are the pool's: pre-registered, persistent, no session.
    let sup = pool.supervisor_pid() as i64;
    assert_eq!(
        pool.query_i64(&format!(
            "SELECT COUNT(*) FROM workers WHERE status = 'idle' AND managed_by = 'persistent'
             AND execution_mode = 'direct' AND session_id IS NULL AND parent_pid = {sup}
             AND container_id LIKE 'direct-plantuml-%'"
        )),
        2
    );
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM jobs WHERE worker_id NOT IN (SELECT worker_row FROM clx_pool_slots)"),
        0
    );
    // The worker got CLM's environment, and its row's id as CLM_WORKER_ID.
    let (pid, worker_id) = pool.slot_worker("plantuml", 0);
    assert_eq!(env_of(pid, "CLM_JOBS_DB_PATH").as_deref(), db.to_str());
    assert_eq!(env_of(pid, "WORKER_ID").as_deref(), Some(worker_id.as_str()));
    assert_eq!(env_of(pid, "DB_PATH"), None);
    let row = pool.query_i64(&format!("SELECT id FROM workers WHERE container_id = '{worker_id}'"));
    assert_eq!(env_of(pid, "CLM_WORKER_ID"), Some(row.to_string()));

    // CLM's WorkerDiscovery, with its process check, counts them healthy
    // and reusable by any build session.
    let out = clm.py(
        "import sys\nfrom pathlib import Path\n\
         from clm.infrastructure.workers.discovery import WorkerDiscovery\n\
         from clm.infrastructure.workers.worker_executor import DirectWorkerExecutor\n\
         db = Path(sys.argv[1])\n\
         ex = DirectWorkerExecutor(db_path=db, workspace_path=Path(sys.argv[2]), log_level='INFO')\n\
         with WorkerDiscovery(db, executors={'direct': ex}) as d:\n\
         \x20   print(d.count_healthy_workers('plantuml', execution_mode='direct', reusable_for_session='some-build'))\n",
        &[db.to_str().unwrap(), ws.to_str().unwrap()],
    );
    assert_eq!(stdout(&out).trim(), "2");

    // `clm status` sees them as CLM's own, in direct mode.
    let out = Command::new(clm.venv.join("bin/clm"))
        .args(["status", "--format", "json", "--jobs-db-path"])
        .arg(&db)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("clm status: {e}: {}{}", stdout(&out), stderr(&out)));
    assert_eq!(status["workers"]["plantuml"]["idle"], 2, "{status}");
    assert_eq!(status["workers"]["plantuml"]["execution_mode"], "direct", "{status}");

    let stats = pool.cli(&["stats", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(json["protocol"], "clm");
    assert_eq!(json["jobs"]["completed"], 3);
    assert!(stdout(&pool.cli(&["stats"])).contains("protocol:   clm"));
    let events = pool.query_strings("SELECT event_type FROM worker_events ORDER BY id");
    for e in ["pool_starting", "worker_starting", "worker_registered", "pool_started"] {
        assert!(events.iter().any(|x| x == e), "{e} missing from {events:?}");
    }

    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // CLM workers remove their own rows when they stop; history stays in
    // clx-pool's tables and worker_events.
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers"), 0);
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'stopped'"),
        2
    );
    let events = pool.query_strings("SELECT event_type FROM worker_events ORDER BY id");
    for e in ["pool_stopping", "worker_stopped", "pool_stopped"] {
        assert!(events.iter().any(|x| x == e), "{e} missing from {events:?}");
    }
    assert!(pool.processes().is_empty());
}

#[test]
fn a_killed_busy_clm_worker_has_its_job_finished_by_the_replacement() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool(&reverse_workers(&clm, 1));
    pool.start_ready();
    let ws = pool.path("workspace");
    let input = ws.join("k.txt");
    std::fs::write(&input, "kill me").unwrap();
    let job = clm.add_job(
        &pool.db_path(),
        "reverse",
        &input,
        &ws.join("out/k.txt"),
        "{\"sleep\": 3}",
    );
    let (pid, old_id) = pool.slot_worker("reverse", 0);
    let old_row = pool.query_i64(&format!("SELECT id FROM workers WHERE container_id = '{old_id}'"));
    wait_for("the job to be processing", Duration::from_secs(20), || {
        (pool.try_i64(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = {job} AND status = 'processing' AND worker_id = {old_row}"
        ))? == 1)
            .then_some(())
    });
    kill9(pid);
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}{}", stderr(&out), pool.supervisor_log());
    assert_eq!(std::fs::read_to_string(ws.join("out/k.txt")).unwrap(), "em llik");
    assert_eq!(
        pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {job}")),
        2
    );
    assert_ne!(
        pool.query_i64(&format!("SELECT worker_id FROM jobs WHERE id = {job}")),
        old_row
    );
    assert_eq!(
        pool.query_strings(&format!("SELECT status FROM workers WHERE id = {old_row}")),
        vec!["dead"]
    );
    assert!(pool.cause_of(&old_id).contains("SIGKILL"), "{}", pool.cause_of(&old_id));
    assert_eq!(
        pool.query_i64(&format!(
            "SELECT COUNT(*) FROM worker_events WHERE event_type = 'worker_failed' AND worker_id = {old_row}"
        )),
        1
    );
    // The restart shows as a second start of slot 0.
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM worker_events WHERE event_type = 'worker_starting'"),
        2
    );
}

#[test]
fn a_hung_clm_worker_is_replaced_and_the_kill_is_in_worker_events() {
    let Some(clm) = clm() else { return };
    let workers = format!("{}max_job_time = \"1s\"\n", reverse_workers(&clm, 1));
    let mut pool = Pool::new(
        "protocol = \"clm\"\ncheck_interval = \"200ms\"\nstop_timeout = \"1s\"\n",
        &workers,
    );
    pool.env.extend(clm.env());
    pool.start_ready();
    let ws = pool.path("workspace");
    let input = ws.join("h.txt");
    std::fs::write(&input, "hang").unwrap();
    let job = clm.add_job(
        &pool.db_path(),
        "reverse",
        &input,
        &ws.join("out/h.txt"),
        "{\"sleep\": 60}",
    );
    let (_, old_id) = pool.slot_worker("reverse", 0);
    let old_row = pool.query_i64(&format!("SELECT id FROM workers WHERE container_id = '{old_id}'"));
    pool.wait_replacement("reverse", 0, &old_id, Duration::from_secs(30));
    assert!(
        pool.cause_of(&old_id).contains("longer than max_job_time 1s"),
        "{}",
        pool.cause_of(&old_id)
    );
    let (message, metadata): (String, String) = pool
        .conn()
        .query_row(
            "SELECT message, metadata FROM worker_events WHERE event_type = 'worker_failed' AND worker_id = ?1",
            [old_row],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(message.contains("was hung (job"), "{message}");
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["reason"], "hung", "{metadata}");
    assert_eq!(metadata["job_id"], job, "{metadata}");
    assert_eq!(
        pool.query_strings(&format!("SELECT status FROM workers WHERE id = {old_row}")),
        vec!["dead"]
    );
    // The attempt counted: the job is back for a second one.
    wait_for("the second attempt", Duration::from_secs(10), || {
        (pool.try_i64(&format!("SELECT attempts FROM jobs WHERE id = {job}"))? >= 2).then_some(())
    });
}

#[test]
fn cancelled_jobs_are_never_requeued_claimed_or_counted_as_failed() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool(&reverse_workers(&clm, 1));
    pool.start_ready();
    let db = pool.db_path();
    let ws = pool.path("workspace");
    let (busy_in, waiting_in) = (ws.join("busy.txt"), ws.join("waiting.txt"));
    std::fs::write(&busy_in, "busy").unwrap();
    std::fs::write(&waiting_in, "waiting").unwrap();
    let busy = clm.add_job(&db, "reverse", &busy_in, &ws.join("out/busy.txt"), "{\"sleep\": 3}");
    let (pid, old_id) = pool.slot_worker("reverse", 0);
    wait_for("the first job to be processing", Duration::from_secs(20), || {
        (pool.try_i64(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = {busy} AND status = 'processing'"
        ))? == 1)
            .then_some(())
    });
    // The only worker is busy: the second job waits, and is cancelled.
    let waiting = clm.add_job(&db, "reverse", &waiting_in, &ws.join("out/waiting.txt"), "{}");
    clm.cancel_jobs_for_file(&db, &waiting_in);
    // The running one is cancelled too, then its worker dies.
    clm.cancel_jobs_for_file(&db, &busy_in);
    kill9(pid);
    pool.wait_replacement("reverse", 0, &old_id, Duration::from_secs(20));
    let out = pool.cli(&["wait", "--drained", "--timeout", "20s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("2 cancelled"), "{}", stdout(&out));
    // A new job still flows: the replacement is up and took neither.
    let after_in = ws.join("after.txt");
    std::fs::write(&after_in, "after").unwrap();
    let after = clm.add_job(&db, "reverse", &after_in, &ws.join("out/after.txt"), "{}");
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        pool.query_strings(&format!(
            "SELECT status FROM jobs WHERE id IN ({busy}, {waiting}, {after}) ORDER BY id"
        )),
        vec!["cancelled", "cancelled", "completed"]
    );
    assert_eq!(
        pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {waiting}")),
        0
    );
    assert_eq!(
        pool.query_i64(&format!("SELECT attempts FROM jobs WHERE id = {busy}")),
        1
    );
    assert!(!ws.join("out/waiting.txt").exists());
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["jobs"]["cancelled"], 2);
    assert_eq!(json["jobs"]["failed"], 0);
    let listed = stdout(&pool.cli(&["jobs", "--status", "cancelled"]));
    assert!(
        listed.contains("busy.txt") && listed.contains("waiting.txt"),
        "{listed}"
    );
}

#[test]
fn clm_build_reuses_the_pool_and_starts_no_worker_of_its_own() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool("[[workers]]\nworker_type = \"plantuml\"\ncount = 2\n");
    pool.start_ready();
    let course = pool.path("course");
    copy_dir(&repo_path("tests/fixtures/clm-course"), &course);
    let slots_before = pool.query_strings("SELECT worker_id || ':' || pid FROM clx_pool_slots ORDER BY slot");
    let rows_before = pool.query_strings("SELECT CAST(id AS TEXT) FROM workers ORDER BY id");
    let log_dir = pool.path("clm-logs");
    let out = clm
        .build(&pool, &course, &pool.path("site"), "direct", 2)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(log_dir.join("clm.log")).unwrap_or_default();
    assert!(out.status.success(), "clm build failed: {}\n{log}", stderr(&out));
    assert!(log.contains("Sufficient healthy workers already running"), "{log}");
    assert!(!log.contains("Starting managed workers"), "{log}");
    assert!(
        !log_dir.join("workers").exists(),
        "clm build started workers of its own"
    );
    let pngs = find_files(&pool.path("site"), "png");
    assert!(pngs.iter().any(|p| p.ends_with("hello.png")), "{pngs:?}");
    assert!(pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'") >= 2);
    assert_eq!(
        pool.query_i64(
            "SELECT COUNT(*) FROM jobs WHERE worker_id IS NULL OR worker_id NOT IN (SELECT worker_row FROM clx_pool_slots)"
        ),
        0,
        "every job ran on the pool's workers"
    );
    // The same processes and rows, no more.
    assert_eq!(
        pool.query_strings("SELECT worker_id || ':' || pid FROM clx_pool_slots ORDER BY slot"),
        slots_before
    );
    assert_eq!(
        pool.query_strings("SELECT CAST(id AS TEXT) FROM workers ORDER BY id"),
        rows_before
    );
    assert_eq!(pool.query_i64("SELECT MAX(restarts) FROM clx_pool_slots"), 0);
}

#[test]
fn check_imports_the_worker_module() {
    let Some(clm) = clm() else { return };
    let pool = clm.pool("[[workers]]\nworker_type = \"plantuml\"\ncount = 1\n");
    let out = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("`python3 -m clm.workers.plantuml` imports"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("protocol clm (configured"), "{}", stdout(&out));
    let pool = clm.pool(
        "[[workers]]\nworker_type = \"plantuml\"\ncount = 1\ncommand = [\"python3\", \"-m\", \"clm.workers.no_such_worker\"]\n",
    );
    let out = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("`python3 -m clm.workers.no_such_worker` fails to import: ModuleNotFoundError"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_clm_made_database_is_followed_when_unset_and_refused_under_clx() {
    let Some(clm) = clm() else { return };
    let mut pool = Pool::new("", CP_WORKERS);
    clm.py(
        "import sys\nfrom pathlib import Path\n\
         from clm.infrastructure.database.schema import init_database\n\
         init_database(Path(sys.argv[1]))\n",
        &[pool.db_path().to_str().unwrap()],
    );
    let before = std::fs::read(pool.db_path()).unwrap();
    // Refused under a contradicting protocol, byte for byte unchanged.
    let contra = Pool::new("protocol = \"clx\"\n", CP_WORKERS);
    std::fs::copy(pool.db_path(), contra.db_path()).unwrap();
    let out = contra.cli(&["start", "--config", contra.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("it is a clm database (schema_version 11), but the config says protocol = \"clx\""));
    assert_eq!(std::fs::read(contra.db_path()).unwrap(), before);
    // Unset: the database decides.
    pool.start_ready();
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM workers WHERE managed_by = 'persistent' AND status = 'idle'"),
        2
    );
    assert_eq!(pool.schema_versions(), vec![11]);
}

/// What `clm build` sees of the `reverse` workers when it submits: live
/// ones it may use, and pre-registered ones it waits for (CLM's own
/// functions, as its submission gate calls them for a build session).
fn clm_gate(clm: &Clm, db: &Path) -> (i64, i64) {
    let out = clm.py(
        "import sqlite3, sys\n\
         from clm.infrastructure.database.worker_liveness import count_available_workers, count_workers_awaiting_activation\n\
         c = sqlite3.connect(sys.argv[1])\n\
         print(count_available_workers(c, 'reverse', execution_mode='direct', session_id='a-build'),\n\
               count_workers_awaiting_activation(c, 'reverse', execution_mode='direct', session_id='a-build'))\n",
        &[db.to_str().unwrap()],
    );
    let text = stdout(&out);
    let mut n = text.split_whitespace().map(|v| v.parse::<i64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

/// A worker killed again and again backs off; while its slot waits, the
/// next worker's row is pre-registered already, so a `clm build` that
/// submits meanwhile waits for it instead of concluding there is none.
#[test]
fn a_slot_waiting_to_restart_is_never_invisible_to_clm() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool_with(
        "restart_limit = 100\nrestart_window = \"60s\"\nrestart_backoff = \"2s\"\nrestart_backoff_max = \"60s\"\n",
        &reverse_workers(&clm, 1),
    );
    pool.start_ready();
    // Each kill of a worker that just started backs the slot off longer:
    // at once, 2 s, 4 s, 8 s.
    for _ in 0..4 {
        let (pid, id) = wait_for("a registered worker", Duration::from_secs(30), || {
            let c = pool.conn();
            c.query_row(
                "SELECT pid, worker_id FROM clx_pool_slots WHERE state = 'running'",
                [],
                |r| Ok((r.get::<_, i64>(0)? as i32, r.get::<_, String>(1)?)),
            )
            .ok()
        });
        kill9(pid);
        wait_for("the kill to be recorded", Duration::from_secs(20), || {
            (pool.try_i64(&format!(
                "SELECT COUNT(*) FROM clx_pool_events WHERE worker_id = '{id}'"
            ))? == 1)
                .then_some(())
        });
    }
    let note = wait_for("the slot to back off", Duration::from_secs(10), || {
        pool.query_strings("SELECT COALESCE(note, '') FROM clx_pool_slots WHERE state = 'backoff'")
            .pop()
    });
    assert!(note.contains("restarting in"), "{note}");
    // Until a worker runs again, CLM always sees one live or coming.
    let mut looks = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'") != Some(1) {
        let (live, coming) = clm_gate(&clm, &pool.db_path());
        assert!(live + coming >= 1, "after {looks} looks, CLM sees no worker: {note}");
        looks += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back\n{}",
            pool.supervisor_log()
        );
    }
    assert!(looks > 3, "the backoff was over before CLM looked ({looks} looks)");
    // Capped for CLM: well inside the 30 s a build waits for activation.
    assert!(
        pool.supervisor_log().contains("restarting in 8s") || pool.supervisor_log().contains("restarting in 4s"),
        "{}",
        pool.supervisor_log()
    );
    // And it works.
    let ws = pool.path("workspace");
    std::fs::write(ws.join("r.txt"), "abc").unwrap();
    let job = clm.add_job(
        &pool.db_path(),
        "reverse",
        &ws.join("r.txt"),
        &ws.join("out/r.txt"),
        "{}",
    );
    let out = pool.cli(&["wait", "--jobs", &job.to_string(), "--timeout", "30s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Stopped while it waits, a slot leaves no row that promises a worker.
    let (pid, _) = pool.slot_worker("reverse", 0);
    kill9(pid);
    wait_for("the slot to back off again", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM workers WHERE status = 'created'")? == 1).then_some(())
    });
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM workers WHERE status = 'created'"),
        0
    );
}

/// A real `clm build` that reuses the pool while its one worker is killed
/// again and again (whenever it is idle, so no job runs out of attempts):
/// the build waits for the slot's next worker and completes.
#[test]
fn clm_build_completes_while_its_worker_is_killed_again_and_again() {
    let Some(clm) = clm() else { return };
    let mut pool = clm.pool_with(
        "restart_limit = 100\nrestart_window = \"60s\"\nrestart_backoff = \"2s\"\ncheck_interval = \"200ms\"\n",
        "[[workers]]\nworker_type = \"plantuml\"\ncount = 1\n",
    );
    pool.start_ready();
    let course = pool.path("course");
    copy_dir(&repo_path("tests/fixtures/clm-course"), &course);
    let log_dir = pool.path("clm-logs");
    let build = clm
        .build(&pool, &course, &pool.path("site"), "direct", 1)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(pool.path("clm-build.err")).unwrap())
        .spawn()
        .unwrap();
    let mut build = common::OwnedChild(build);
    // Once the build chose to reuse the pool, its worker dies whenever it
    // is idle, four times: the slot backs off 2 s, 4 s, 8 s meanwhile.
    let log = || std::fs::read_to_string(log_dir.join("clm.log")).unwrap_or_default();
    wait_for("the build to choose the pool", Duration::from_secs(120), || {
        log()
            .contains("Sufficient healthy workers already running")
            .then_some(())
    });
    for kill in 0..4 {
        let pid = wait_for("an idle worker", Duration::from_secs(60), || {
            let c = pool.conn();
            c.query_row(
                "SELECT s.pid FROM clx_pool_slots s JOIN workers w ON w.id = s.worker_row
                 WHERE s.state = 'running' AND w.status = 'idle'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .ok()
        });
        assert!(
            build.0.try_wait().unwrap().is_none() || kill > 0,
            "the build ended before the kills"
        );
        kill9(pid as i32);
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = wait_for("the build to finish", Duration::from_secs(240), || {
        build.0.try_wait().unwrap()
    });
    let err = std::fs::read_to_string(pool.path("clm-build.err")).unwrap_or_default();
    assert!(
        status.success(),
        "clm build failed: {err}\n{}\n{}",
        log(),
        pool.supervisor_log()
    );
    assert!(!log().contains("Starting managed workers"), "{}", log());
    let pngs = find_files(&pool.path("site"), "png");
    assert!(pngs.iter().any(|p| p.ends_with("hello.png")), "{pngs:?}");
    assert!(pool.query_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'died'") >= 4);
}
