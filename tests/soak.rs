//! The chaos soak: jobs are submitted steadily while workers and job
//! commands are killed, workers stopped and continued, write locks held,
//! the supervisor killed and started again, reloads, scales and rolling
//! restarts issued. Then, from a ledger the job command writes: every job
//! ran exactly once per attempt, an attempt was started again only when
//! its holder was known dead, none is missing, and nothing is left after
//! `stop`. About 2.5 minutes; `CLX_POOL_SOAK_SECS` makes it longer,
//! `CLX_POOL_SOAK_SEED` repeats a run.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Pool, WriteLock, env_of, kill9, sh_workers, signal, stderr, wait_for};
use nix::sys::signal::Signal;

/// Each job notes its start and end, with its attempt and worker, and
/// takes 0.1 to 1.9 s; every fifth leaves a process behind in a session of
/// its own.
const JOB: &str = "echo \"start $CLX_JOB_ID $CLX_JOB_ATTEMPT $WORKER_ID\" >> \"$WORKSPACE_PATH/ledger\"; \
    case $((CLX_JOB_ID % 5)) in 0) setsid sleep 7777 </dev/null >/dev/null 2>&1 & ;; esac; \
    sleep $((CLX_JOB_ID % 2)).$((CLX_JOB_ID % 9 + 1)); \
    cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"; \
    echo \"end $CLX_JOB_ID $CLX_JOB_ATTEMPT $WORKER_ID\" >> \"$WORKSPACE_PATH/ledger\"";

const POOL: &str = "check_interval = \"300ms\"\nheartbeat_timeout = \"3s\"\nstop_timeout = \"3s\"\n\
    restart_backoff = \"100ms\"\nrestart_backoff_max = \"2s\"\nrestart_limit = 1000\nrestart_window = \"10s\"\n";

/// xorshift64*: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The config: `count` workers of `a`, and a setting a reload sees as a
/// change.
fn config(count: u32, flavour: u64) -> String {
    format!(
        "[pool]\ndb_path = \"jobs.db\"\nworkspace_path = \"workspace\"\n{POOL}\n{}max_job_time = \"30s\"\nenv = {{ FLAVOUR = \"{flavour}\" }}\n",
        sh_workers("a", count, JOB)
    )
}

/// The pool's built-in worker processes, with their WORKER_ID.
fn workers(pool: &Pool) -> Vec<(i32, String)> {
    pool.processes()
        .into_iter()
        .filter(|&pid| env_of(pid, "CLX_JOB_ID").is_none() && common::cmdline(pid).contains(" worker "))
        .filter_map(|pid| Some((pid, env_of(pid, "WORKER_ID")?)))
        .collect()
}

/// The job commands running now: (pid, job id).
fn job_commands(pool: &Pool) -> Vec<(i32, i64)> {
    pool.processes()
        .into_iter()
        .filter(|&pid| common::cmdline(pid).starts_with("sh -c"))
        .filter_map(|pid| Some((pid, env_of(pid, "CLX_JOB_ID")?.parse().ok()?)))
        .collect()
}

fn leftovers() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| common::alive(pid) && common::cmdline(pid).trim_end() == "sleep 7777")
        .collect()
}

/// What the soak did to whom.
#[derive(Default)]
struct Record {
    /// Workers killed by the test, or alive when the supervisor was killed.
    killed_workers: HashSet<String>,
    /// Jobs whose command the test killed (they fail).
    killed_jobs: HashSet<i64>,
    /// Control commands started, to be answered.
    clients: Vec<(String, Instant, Child)>,
    actions: BTreeMap<&'static str, u32>,
}

#[test]
fn chaos_soak_runs_every_job_exactly_once_and_leaves_nothing() {
    let secs: u64 = std::env::var("CLX_POOL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let seed: u64 = std::env::var("CLX_POOL_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos soak: {secs} s, CLX_POOL_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let _left = KillLeftovers;
    let mut pool = Pool::new(POOL, &sh_workers("a", 3, JOB));
    std::fs::write(pool.config(), config(3, 0)).unwrap();
    pool.start_ready();

    // Jobs go in steadily, whatever happens to the pool.
    let submitted = Arc::new(Mutex::new(Vec::<i64>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (submitted, done) = (submitted.clone(), done.clone());
        let (db, ws) = (pool.db_path(), pool.path("workspace"));
        std::thread::spawn(move || {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                let name = format!("j{n}.txt");
                std::fs::write(ws.join(&name), &name).unwrap();
                let out = Command::new(common::bin())
                    .args([
                        "submit",
                        "a",
                        &name,
                        &format!("out/{name}"),
                        "--max-attempts",
                        "20",
                        "--workspace",
                    ])
                    .arg(&ws)
                    .arg("--db")
                    .arg(&db)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "submit: {}", stderr(&out));
                let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                submitted.lock().unwrap().push(id);
                n += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    let mut rec = Record::default();
    let mut flavour = 0;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let roll = rng.below(100);
        let action = match roll {
            0..20 => {
                let ws = workers(&pool);
                if let Some((pid, id)) = ws.get(rng.below(ws.len().max(1) as u64) as usize) {
                    rec.killed_workers.insert(id.clone());
                    kill9(*pid);
                }
                "kill a worker"
            }
            20..28 => {
                let cmds = job_commands(&pool);
                if let Some((pid, job)) = cmds.get(rng.below(cmds.len().max(1) as u64) as usize) {
                    rec.killed_jobs.insert(*job);
                    kill9(*pid);
                }
                "kill a job command"
            }
            28..38 => {
                let ws = workers(&pool);
                if let Some((pid, _)) = ws.get(rng.below(ws.len().max(1) as u64) as usize) {
                    signal(*pid, Signal::SIGSTOP);
                    std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                    signal(*pid, Signal::SIGCONT);
                }
                "stop and continue a worker"
            }
            38..46 => {
                // Longer than heartbeat_timeout, now and then.
                WriteLock::hold(&pool.db_path(), Duration::from_millis(1000 + rng.below(5000))).join();
                "hold a write lock"
            }
            46..51 => {
                for (_, id) in workers(&pool) {
                    rec.killed_workers.insert(id);
                }
                kill9(pool.supervisor_pid());
                pool.wait_supervisor_exit(Duration::from_secs(10));
                // The dead run's workers die with it; their ids are known.
                for (_, id) in workers(&pool) {
                    rec.killed_workers.insert(id);
                }
                pool.start_ready();
                "kill and start the supervisor"
            }
            51..63 => {
                flavour += 1;
                let count = 1 + rng.below(5) as u32;
                std::fs::write(pool.config(), config(count, flavour)).unwrap();
                if rng.below(2) == 0 {
                    signal(pool.supervisor_pid(), Signal::SIGHUP);
                    "reload (SIGHUP)"
                } else {
                    client(&pool, &mut rec, &["reload", "--timeout", "60s"]);
                    "reload"
                }
            }
            63..78 => {
                let to = format!("a={}", 1 + rng.below(5));
                client(&pool, &mut rec, &["scale", &to]);
                "scale"
            }
            78..88 => {
                client(&pool, &mut rec, &["restart", "a", "--rolling", "--timeout", "60s"]);
                "rolling restart"
            }
            _ => "nothing",
        };
        *rec.actions.entry(action).or_default() += 1;
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
    }
    done.store(true, Ordering::SeqCst);
    submitter.join().unwrap();
    eprintln!("chaos soak actions: {:?}", rec.actions);

    // Every control request was answered (or refused) in time.
    for (what, started, child) in rec.clients.drain(..) {
        let mut child = common::OwnedChild(child);
        let status = wait_for(&format!("`{what}` to end"), Duration::from_secs(120), || {
            child.0.try_wait().unwrap()
        });
        assert!(
            matches!(status.code(), Some(0 | 1)),
            "`{what}` (started {:?} ago): {status:?}",
            started.elapsed()
        );
    }

    // The pool settles with three workers and drains the queue.
    std::fs::write(pool.config(), config(3, flavour + 1)).unwrap();
    let out = pool.cli(&["reload", "--timeout", "120s"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    let out = pool.cli(&["scale", "a=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the queue to drain", Duration::from_secs(300), || {
        (pool.try_i64("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'processing')")? == 0).then_some(())
    });
    check(&pool, &submitted.lock().unwrap(), &rec);
    assert_eq!(leftovers(), Vec::<i32>::new(), "processes jobs left behind");

    let out = pool.cli(&["stop", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.processes(), Vec::<i32>::new(), "processes of the pool after stop");
    assert_eq!(leftovers(), Vec::<i32>::new());
}

/// Starts a control command in the background (it is checked at the end).
fn client(pool: &Pool, rec: &mut Record, args: &[&str]) {
    let child = Command::new(common::bin())
        .args(args)
        .arg("--db")
        .arg(pool.db_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rec.clients.push((args.join(" "), Instant::now(), child));
}

/// One line of the ledger: (start or end, job, attempt, worker).
fn ledger(pool: &Pool) -> Vec<(String, i64, i64, String)> {
    std::fs::read_to_string(pool.path("workspace/ledger"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "a torn ledger line: {l:?}");
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect()
}

/// Exactly once, from the ledger and the database.
fn check(pool: &Pool, submitted: &[i64], rec: &Record) {
    // Workers known dead: killed by the test, or ended as dead or hung.
    let mut dead: HashSet<String> = rec.killed_workers.clone();
    dead.extend(pool.query_strings(
        "SELECT worker_id FROM clx_pool_events WHERE event IN ('died', 'hung', 'no-register') AND worker_id IS NOT NULL",
    ));
    let lines = ledger(pool);
    let mut problems = Vec::new();
    let mut completed = 0;
    for &job in submitted {
        let (status, attempts, error): (String, i64, Option<String>) = pool
            .conn()
            .query_row("SELECT status, attempts, error FROM jobs WHERE id = ?1", [job], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        let of = |kind: &str| -> Vec<(i64, String)> {
            lines
                .iter()
                .filter(|(k, j, _, _)| k == kind && *j == job)
                .map(|(_, _, a, w)| (*a, w.clone()))
                .collect()
        };
        let (starts, ends) = (of("start"), of("end"));
        // A command runs once per attempt.
        let mut seen = HashSet::new();
        for (attempt, worker) in &starts {
            if !seen.insert(*attempt) {
                problems.push(format!("job {job}: attempt {attempt} started twice ({worker})"));
            }
        }
        // An attempt starts again only when its holder is known dead.
        for (attempt, worker) in starts.iter().chain(&ends) {
            if *attempt < attempts && !dead.contains(worker) {
                problems.push(format!(
                    "job {job}: attempt {attempt} of {attempts} ran on {worker}, which was not known dead"
                ));
            }
        }
        match status.as_str() {
            "completed" => {
                completed += 1;
                if !ends.iter().any(|(a, _)| *a == attempts) {
                    problems.push(format!("job {job}: completed, but attempt {attempts} never ended"));
                }
            }
            "failed" if rec.killed_jobs.contains(&job) => {}
            other => problems.push(format!("job {job}: {other} after {attempts} attempts: {error:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in {} jobs:\n{}\n{}",
        problems.len(),
        submitted.len(),
        problems.join("\n"),
        pool.supervisor_log()
    );
    assert!(completed > 100, "only {completed} jobs completed");
    let all = pool.query_i64("SELECT COUNT(*) FROM jobs");
    assert_eq!(all as usize, submitted.len(), "no job went missing or appeared");
}

/// Kills what a failed run of the soak left behind.
struct KillLeftovers;

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in leftovers() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).ok();
        }
    }
}
