//! `clx-pool init`: the pool it writes is one `check` accepts and `start`
//! runs, it never overwrites a file without `--force`, and `init --clm`
//! writes, against the real CLM venv, a pool that the `clm build` line it
//! prints reuses without starting a worker of its own.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::clm::{clm, copy_dir, find_files};
use common::{Pool, bin, repo_path, stderr, stdout, toml_str};

/// Runs `clx-pool init ARGS` in `dir`, with CLM's variables unset unless
/// `env` sets them.
fn init(dir: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(bin())
        .arg("init")
        .args(args)
        .current_dir(dir)
        .env_remove("CLM_JOBS_DB_PATH")
        .env_remove("CLM_CACHE_DB_PATH")
        .env_remove("VIRTUAL_ENV")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn init_writes_a_pool_check_accepts_and_overwrites_it_only_with_force() {
    let pool = Pool::bare();
    let dir = pool.dir.path();
    let out = init(dir, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("clx-pool check --config pool.toml"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("clx-pool start --config pool.toml"),
        "{}",
        stdout(&out)
    );
    let written = std::fs::read_to_string(pool.config()).unwrap();
    assert!(
        written.contains("job_command = [\"cp\", \"{input}\", \"{output}\"]"),
        "{written}"
    );
    let check = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(check.status.success(), "{}{}", stdout(&check), stderr(&check));

    let mine = format!("{written}# mine\n");
    std::fs::write(pool.config(), &mine).unwrap();
    let again = init(dir, &[], &[]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("pool.toml exists"), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(pool.config()).unwrap(), mine);

    let forced = init(dir, &["--force", "--config", "pool.toml"], &[]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_eq!(std::fs::read_to_string(pool.config()).unwrap(), written);
}

#[test]
fn the_written_example_runs_its_jobs() {
    let mut pool = Pool::bare();
    let out = init(pool.dir.path(), &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    pool.start_ready();
    std::fs::create_dir_all(pool.path("workspace")).unwrap();
    std::fs::write(pool.path("workspace/in.txt"), "hello init\n").unwrap();
    let config = pool.config();
    let config = config.to_str().unwrap();
    for (job_type, expected) in [("upper", "HELLO INIT\n"), ("copy", "hello init\n")] {
        let out_name = format!("{job_type}.txt");
        let done = pool.cli(&["submit", "--config", config, "--wait", job_type, "in.txt", &out_name]);
        assert!(done.status.success(), "{}{}", stderr(&done), pool.supervisor_log());
        assert_eq!(
            std::fs::read_to_string(pool.path("workspace").join(&out_name)).unwrap(),
            expected
        );
    }
    let stop = pool.cli(&["stop", "--config", config]);
    assert!(stop.status.success(), "{}", stderr(&stop));
}

#[test]
fn init_clm_names_what_it_looked_at_when_it_finds_no_course_or_no_clm() {
    let pool = Pool::bare();
    let dir = pool.dir.path();
    let out = init(dir, &["--clm", "no-such-course"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-course"), "{}", stderr(&out));

    let out = init(dir, &["--clm", ".", "--python", "/no/such/python"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("/no/such/python (--python)"), "{}", stderr(&out));

    // No `clm` on this PATH, no venv: whatever python3 is there has no CLM.
    let bare_path = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let out = init(dir, &["--clm"], &bare_path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no CLM"), "{err}");
    assert!(err.contains("`clm` on PATH: not there"), "{err}");
    assert!(err.contains("$VIRTUAL_ENV: not set"), "{err}");
    assert!(!pool.config().exists(), "nothing written");

    let out = init(dir, &["--clm", "--config", "clm.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("CLM reads its own settings"), "{}", stderr(&out));
}

#[test]
fn init_clm_writes_a_pool_that_the_printed_clm_build_line_reuses() {
    let Some(clm) = clm() else { return };
    let mut pool = Pool::bare();
    let course = pool.path("course");
    copy_dir(&repo_path("tests/fixtures/clm-course"), &course);
    let course = course.canonicalize().unwrap();
    // The venv first on PATH, as for an author who activated it.
    let out = init(pool.dir.path(), &["--clm", "course"], &clm.env());
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);

    let text = std::fs::read_to_string(pool.config()).unwrap();
    let python = clm.venv.join("bin/python");
    let cache = course.join("clm_cache.db");
    let cache = toml_str(cache.to_str().unwrap());
    for wanted in [
        "protocol = \"clm\"".to_string(),
        format!("db_path = {}", toml_str(course.join("clm_jobs.db").to_str().unwrap())),
        format!("cache_db_path = {cache}"),
        format!("CLM_CACHE_DB_PATH = {cache}"),
        format!(
            "command = [{}, \"-m\", \"clm.workers.plantuml\"]",
            toml_str(python.to_str().unwrap())
        ),
    ] {
        assert!(text.contains(&wanted), "no `{wanted}` in\n{text}");
    }
    let line = printed
        .lines()
        .map(str::trim)
        .find(|l| l.contains(" build ") && l.contains("--fail-on-error"))
        .unwrap_or_else(|| panic!("no clm build line in\n{printed}"))
        .to_string();
    let db = course.join("clm_jobs.db");
    assert!(line.contains(&format!("--jobs-db-path {}", db.display())), "{line}");
    assert!(line.contains("--workers direct"), "{line}");

    // The supervisor's PATH lacks the venv: the written pool names its
    // Python, and the jar.
    pool.db = Some(db);
    let check = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(check.status.success(), "{}{}", stdout(&check), stderr(&check));
    assert!(!stdout(&check).contains("note:"), "{}", stdout(&check));
    pool.start();
    pool.wait_ready_within("60s");
    let log_dir = pool.path("clm-logs");
    let build = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .current_dir(pool.dir.path())
        .envs(clm.env())
        .env("CLM_LOG_DIR", &log_dir)
        .env("COLUMNS", "200")
        .env_remove("CI")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(log_dir.join("clm.log")).unwrap_or_default();
    assert!(build.status.success(), "`{line}` failed: {}\n{log}", stderr(&build));
    assert!(log.contains("Sufficient healthy workers already running"), "{log}");
    assert!(!log.contains("Starting managed workers"), "{log}");
    let pngs = find_files(&course.join("output"), "png");
    assert!(pngs.iter().any(|p| p.ends_with("hello.png")), "{pngs:?}");
    assert_eq!(
        pool.query_i64(
            "SELECT COUNT(*) FROM jobs WHERE worker_id IS NULL OR worker_id NOT IN (SELECT worker_row FROM clx_pool_slots)"
        ),
        0,
        "every job ran on the pool's workers"
    );
    let stop = pool.cli(&["stop", "--config", pool.config().to_str().unwrap()]);
    assert!(stop.status.success(), "{}", stderr(&stop));
}

#[test]
fn check_notes_a_clm_cache_other_than_the_one_clm_build_and_the_workers_would_use() {
    let pool = Pool::new(
        "protocol = \"clm\"\ndb_path = \"clm_jobs.db\"\ncache_db_path = \"caches/cache.db\"",
        "[[workers]]\nworker_type = \"notebook\"\ncommand = [\"true\"]\n",
    );
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(pool.config())
        .env_remove("CLM_CACHE_DB_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let said = stdout(&out);
    let dir = pool.dir.path().canonicalize().unwrap();
    let beside = dir.join("clm_cache.db");
    assert!(
        said.contains(&format!("uses the cache {}, not cache_db_path", beside.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "workers `notebook` keep executed notebooks in {}",
            beside.display()
        )),
        "{said}"
    );
}
