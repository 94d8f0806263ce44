//! Nothing outlives the supervisor; a job ends with its command; SIGHUP
//! does not end the pool; the open-files limit is raised or the pool is
//! refused before anything starts.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Pool, bin, cmdline, sh_workers, signal, stderr, stdout, wait_for};

#[test]
fn killing_the_supervisor_leaves_no_process_of_the_pool() {
    // A busy job command with a child of its own and a setsid grandchild:
    // no parent-death signal reaches those.
    let script = "(sleep 300; echo late) & setsid sleep 301 & sleep 302";
    let mut pool = Pool::new("", &sh_workers("busy", 2, script));
    pool.start_ready();
    let job = pool.submit("busy", "b.txt", "b");
    wait_for("the job command's children", Duration::from_secs(10), || {
        let cmds: Vec<String> = pool.processes().into_iter().map(cmdline).collect();
        ["sleep 300", "sleep 301", "sleep 302"]
            .iter()
            .all(|s| cmds.iter().any(|c| c.starts_with(s)))
            .then_some(())
    });
    signal(pool.supervisor_pid(), nix::sys::signal::Signal::SIGKILL);
    pool.wait_supervisor_exit(Duration::from_secs(5));
    wait_for("every process of the pool to be gone", Duration::from_secs(10), || {
        pool.processes().is_empty().then_some(())
    });
    // The guard also did what `stop` would: rows dead, the job back.
    wait_for("the job to be back in the queue", Duration::from_secs(10), || {
        (pool.try_i64(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = {job} AND status = 'pending'"
        ))? == 1)
            .then_some(())
    });
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers WHERE status != 'dead'"), 0);
    // A clean stop dismisses the guard: it leaves nothing and says nothing.
    let mut again = Pool::new("", &sh_workers("busy", 1, "true"));
    again.start_ready();
    let guard = again.guard_pid();
    assert!(again.cli(&["stop"]).status.success());
    wait_for("the guard to exit", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{guard}/cmdline")).exists() || cmdline(guard).is_empty()).then_some(())
    });
    assert!(
        !again.supervisor_log().contains("cleaning up after it"),
        "{}",
        again.supervisor_log()
    );
}

#[test]
fn a_job_is_done_when_its_command_exits_even_if_a_background_child_holds_stderr() {
    let script = "sleep 300 & cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";
    let mut pool = Pool::new("", &sh_workers("bg", 1, script));
    pool.start_ready();
    pool.submit("bg", "g.txt", "done");
    // Far less than the 300 s the background child would hold stderr.
    let out = pool.cli(&["wait", "--drained", "--timeout", "60s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(pool.output("g.txt").as_deref(), Some("done"));
    // What the command left in the background went with it.
    wait_for("the background child to be gone", Duration::from_secs(10), || {
        (!pool
            .processes()
            .into_iter()
            .any(|p| cmdline(p).starts_with("sleep 300")))
        .then_some(())
    });
}

#[test]
fn sighup_reloads_and_an_unchanged_config_touches_nothing() {
    // A closed terminal sends SIGHUP: the pool reloads its config (the same
    // one), and goes on as it was.
    let mut pool = Pool::new("", &sh_workers("copy", 2, "true"));
    pool.start_ready();
    let workers: Vec<i32> = (0..2).map(|s| pool.slot_worker("copy", s).0).collect();
    signal(pool.supervisor_pid(), nix::sys::signal::Signal::SIGHUP);
    wait_for("the reload to be logged", Duration::from_secs(10), || {
        pool.supervisor_log().contains("reload: nothing changed").then_some(())
    });
    assert!(
        pool.supervisor.as_mut().unwrap().try_wait().unwrap().is_none(),
        "still running"
    );
    assert!(pool.cli(&["wait", "--ready", "--timeout", "5s"]).status.success());
    assert_eq!(
        (0..2).map(|s| pool.slot_worker("copy", s).0).collect::<Vec<_>>(),
        workers
    );
    assert!(pool.cli(&["stop"]).status.success());
    assert_eq!(pool.wait_supervisor_exit(Duration::from_secs(10)), 0);
}

#[test]
fn the_open_files_limit_is_raised_or_the_pool_refused_before_anything_starts() {
    // 30 workers need about 244 open files.
    let pool = Pool::new("", &sh_workers("copy", 30, "true"));
    let out = Command::new("prlimit")
        .args(["--nofile=100:100", bin(), "start", "--config"])
        .arg(pool.config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a pool of 30 workers needs about 244 open files, but the limit is 100"),
        "{}",
        stderr(&out)
    );
    assert!(!pool.db_path().exists(), "nothing was started or created");

    // A low soft limit under a high hard one is raised, and the pool runs.
    let mut pool = Pool::new("", &sh_workers("copy", 30, "true"));
    let log = std::fs::File::create(pool.path("supervisor.log")).unwrap();
    let child = Command::new("prlimit")
        .args(["--nofile=100:4096", bin(), "start", "--config"])
        .arg(pool.config())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    pool.supervisor = Some(child);
    let out = pool.cli(&["wait", "--ready", "--timeout", "30s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pool.supervisor_pid())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert!(open_files.split_whitespace().nth(3) == Some("4096"), "{open_files}");
}

#[test]
fn a_second_signal_kills_the_workers_at_once() {
    // Workers that ignore SIGTERM, and a stop_timeout far longer than the test.
    let script = common::repo_path("tests/workers/clx_protocol_worker.py");
    let workers = format!(
        "[[workers]]\nworker_type = \"stubborn\"\ncount = 2\ncommand = [\"python3\", {}]\nenv = {{ TEST_IGNORE_TERM = \"1\" }}\n",
        common::toml_str(script.to_str().unwrap())
    );
    let mut pool = Pool::new("stop_timeout = \"5m\"\n", &workers);
    pool.start_ready();
    let sup = pool.supervisor_pid();
    signal(sup, nix::sys::signal::Signal::SIGTERM);
    wait_for("the first signal to be logged", Duration::from_secs(10), || {
        pool.supervisor_log()
            .contains("signal received: stopping all workers")
            .then_some(())
    });
    assert!(
        pool.supervisor.as_mut().unwrap().try_wait().unwrap().is_none(),
        "waits for its workers"
    );
    signal(sup, nix::sys::signal::Signal::SIGTERM);
    // Minutes before stop_timeout would have ended them.
    assert_eq!(pool.wait_supervisor_exit(Duration::from_secs(30)), 0);
    assert!(
        pool.supervisor_log()
            .contains("second signal: killing every worker now")
    );
    assert!(pool.processes().is_empty(), "{:?}", pool.processes());
}
