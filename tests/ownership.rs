//! One database, one supervisor; files clx-pool writes are its own; reading
//! commands never write.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{COPY, Pool, WriteLock, alive, bin, sh_workers, stderr, stdout};

#[test]
fn the_same_database_through_a_symlink_or_hard_link_is_refused_and_a_deleted_pid_file_changes_nothing() {
    let mut pool = Pool::new("", &sh_workers("copy", 2, COPY));
    pool.start_ready();
    let workers: Vec<i32> = (0..2).map(|s| pool.slot_worker("copy", s).0).collect();
    std::os::unix::fs::symlink(pool.db_path(), pool.path("alias.db")).unwrap();
    std::fs::hard_link(pool.db_path(), pool.path("hard.db")).unwrap();
    for alias in ["alias.db", "hard.db"] {
        let config = pool.path(&format!("{alias}.toml"));
        std::fs::write(
            &config,
            format!("[pool]\ndb_path = \"{alias}\"\n\n{}", sh_workers("copy", 1, COPY)),
        )
        .unwrap();
        let out = pool.cli(&["start", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{alias}: {}", stderr(&out));
        assert!(stderr(&out).contains("is already running"), "{alias}: {}", stderr(&out));
    }
    // Through the symlink, the readers see the same running pool. (Through
    // a hard link SQLite would pair the file with another WAL: that is why
    // a second supervisor there must be refused.)
    let out = pool.cli(&["stats", "--json", "--db", pool.path("alias.db").to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["supervisor"]["running"], true);
    assert_eq!(json["db_path"], pool.db_path().to_str().unwrap());
    assert!(
        workers.iter().all(|&p| alive(p)),
        "the first supervisor's workers live on"
    );
    // The pid file is only a hint: without it the supervisor is still seen,
    // still refuses a second start, and can still be stopped.
    std::fs::remove_file(pool.path("jobs.db.lock")).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["supervisor"]["running"], true);
    assert_eq!(json["supervisor"]["pid"], pool.supervisor_pid());
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool.wait_supervisor_exit(Duration::from_secs(10)), 0);
    assert!(pool.processes().is_empty());
}

#[test]
fn a_symlinked_pid_file_or_log_is_never_written_through() {
    let victim = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(victim.path(), "precious").unwrap();
    let pool = Pool::new("", &sh_workers("copy", 1, COPY));
    std::os::unix::fs::symlink(victim.path(), pool.path("jobs.db.lock")).unwrap();
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is a symbolic link"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(victim.path()).unwrap(), "precious");

    // A log that cannot be opened is a fault outside the worker: the slot
    // waits and tries again, saying why, and never writes through the link.
    let mut pool = Pool::new("restart_limit = 2\n", &sh_workers("copy", 1, COPY));
    std::fs::create_dir_all(pool.path("logs")).unwrap();
    std::os::unix::fs::symlink(victim.path(), pool.path("logs/copy-0.log")).unwrap();
    pool.start();
    let why = common::wait_for("the slot to wait", std::time::Duration::from_secs(20), || {
        pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots")?;
        pool.query_strings("SELECT COALESCE(note, '') FROM clx_pool_slots WHERE state = 'backoff'")
            .pop()
            .filter(|n| n.contains("outside the worker"))
    });
    assert!(why.contains("is a symbolic link"), "{why}");
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers"), 0, "no worker ran");
    assert_eq!(std::fs::read_to_string(victim.path()).unwrap(), "precious");
}

#[test]
fn files_and_folders_are_not_world_writable_whatever_the_umask() {
    let mut pool = Pool::new(
        "db_path = \"data/jobs.db\"\nworkspace_path = \"ws\"\n",
        &sh_workers("copy", 1, COPY),
    );
    std::fs::remove_dir_all(pool.path("workspace")).unwrap();
    let log = std::fs::File::create(pool.path("supervisor.log")).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} start --config {}",
            bin(),
            pool.config().display()
        ))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    pool.supervisor = Some(child);
    let out = pool.cli(&[
        "wait",
        "--ready",
        "--timeout",
        "20s",
        "--db",
        pool.path("data/jobs.db").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pool.supervisor_log());
    for (path, want) in [
        ("data", 0o755),
        ("data/jobs.db", 0o644),
        ("data/jobs.db.lock", 0o644),
        ("data/logs", 0o755),
        ("data/logs/copy-0.log", 0o644),
        ("ws", 0o755),
    ] {
        let mode = std::fs::metadata(pool.path(path)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{path}: {mode:o}");
    }
}

#[test]
fn reading_commands_never_write() {
    // A SQLite file that is not a job database: refused, byte for byte unchanged.
    let pool = Pool::new("", &sh_workers("copy", 1, COPY));
    {
        let c = rusqlite::Connection::open(pool.db_path()).unwrap();
        c.execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine')")
            .unwrap();
    }
    let before = std::fs::read(pool.db_path()).unwrap();
    for args in [
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["jobs"],
        vec!["wait", "--drained", "--timeout", "1s"],
    ] {
        let out = pool.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("it is not a job database"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(pool.db_path()).unwrap(), before, "{args:?}");
    }
    assert!(!pool.path("jobs.db-wal").exists(), "not switched to WAL");

    // A CLM database clx-pool never prepared: read as it is.
    let clm = Pool::new("", &sh_workers("copy", 1, COPY));
    {
        let c = rusqlite::Connection::open(clm.db_path()).unwrap();
        c.execute_batch(clx_pool::db::schema::CLM_SCHEMA).unwrap();
        c.execute_batch("INSERT INTO schema_version (version) VALUES (11)")
            .unwrap();
    }
    let before = std::fs::read(clm.db_path()).unwrap();
    let out = clm.cli(&["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["protocol"], "clm");
    assert!(clm.cli(&["jobs"]).status.success());
    assert_eq!(std::fs::read(clm.db_path()).unwrap(), before);
    assert_eq!(
        clm.query_i64("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'clx_pool_%'"),
        0
    );

    // A pool's database made read-only after the pool stopped, and one
    // under a write lock: both still read.
    let mut ran = Pool::new("", &sh_workers("copy", 1, COPY));
    ran.start_ready();
    ran.submit("copy", "a.txt", "a");
    assert!(ran.cli(&["wait", "--drained", "--timeout", "20s"]).status.success());
    let lock = WriteLock::hold(&ran.db_path(), Duration::from_secs(8));
    let out = ran.cli(&["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!lock.is_released(), "stats did not wait for the writer");
    lock.join();
    assert!(ran.cli(&["stop"]).status.success());
    std::fs::set_permissions(ran.db_path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = ran.cli(&["jobs", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("a.txt"));
    let out = ran.cli(&["stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ran.cli(&["wait", "--drained", "--timeout", "2s"]).status.success());
}
