//! `[pool] protocol`: which generation of workers a database serves,
//! decided by the database, refused before any write when the config
//! contradicts it; and the built-in worker speaking CLM (no Python needed).

mod common;

use common::{Pool, stderr, stdout};

const CP_WORKERS: &str =
    "[[workers]]\nworker_type = \"copy\"\ncount = 2\njob_command = [\"cp\", \"{input}\", \"{output}\"]\n";

/// Creates the pool's database (through `submit`) without starting anything.
fn create_db(pool: &Pool) {
    let out = pool.cli(&[
        "submit",
        "--config",
        pool.config().to_str().unwrap(),
        "copy",
        "a.txt",
        "out/a.txt",
        "--content-hash",
        "h",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn the_builtin_worker_speaks_clm() {
    let mut pool = Pool::new("protocol = \"clm\"\n", CP_WORKERS);
    pool.start_ready();
    assert_eq!(pool.schema_versions(), vec![11]);
    let sup = pool.supervisor_pid();
    assert_eq!(
        pool.query_i64(&format!(
            "SELECT COUNT(*) FROM workers WHERE status = 'idle' AND managed_by = 'persistent'
             AND execution_mode = 'direct' AND session_id IS NULL AND parent_pid = {sup}"
        )),
        2
    );
    for i in 0..10 {
        pool.submit("copy", &format!("c{i}.txt"), &format!("copy {i}"));
    }
    let out = pool.cli(&["wait", "--drained", "--timeout", "30s"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    for i in 0..10 {
        assert_eq!(pool.output(&format!("c{i}.txt")), Some(format!("copy {i}")));
    }
    assert!(stdout(&pool.cli(&["stats"])).contains("protocol:   clm"));
    let out = pool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Like CLM's workers, it removes its row when it stops.
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers"), 0);
    assert_eq!(
        pool.query_strings("SELECT event_type FROM worker_events WHERE event_type LIKE 'pool_%' ORDER BY id"),
        vec!["pool_starting", "pool_started", "pool_stopping", "pool_stopped"]
    );
    assert_eq!(pool.schema_versions(), vec![11], "never a version row added");
}

#[test]
fn a_contradicting_protocol_is_refused_and_the_database_left_untouched() {
    for (made_as, asked) in [("clm", "clx"), ("clx", "clm")] {
        let maker = Pool::new(&format!("protocol = \"{made_as}\"\n"), CP_WORKERS);
        create_db(&maker);
        let pool = Pool::new(&format!("protocol = \"{asked}\"\n"), CP_WORKERS);
        std::fs::copy(maker.db_path(), pool.db_path()).unwrap();
        let before = std::fs::read(pool.db_path()).unwrap();
        for args in [
            vec!["start", "--config", pool.config().to_str().unwrap()],
            vec![
                "submit",
                "--config",
                pool.config().to_str().unwrap(),
                "copy",
                "b.txt",
                "out/b.txt",
                "--content-hash",
                "h",
            ],
        ] {
            let out = pool.cli(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            let want = format!(
                "{}: it is a {made_as} database (schema_version {}), but the config says protocol = \"{asked}\"",
                pool.db_path().display(),
                if made_as == "clm" { 11 } else { 1 }
            );
            assert!(stderr(&out).contains(&want), "{}", stderr(&out));
            assert_eq!(
                std::fs::read(pool.db_path()).unwrap(),
                before,
                "{args:?} changed the file"
            );
        }
        assert!(pool.processes().is_empty());
    }
}

#[test]
fn unset_the_database_decides_and_a_new_one_is_clx() {
    let maker = Pool::new("protocol = \"clm\"\n", CP_WORKERS);
    create_db(&maker);
    let mut pool = Pool::new("", CP_WORKERS);
    std::fs::copy(maker.db_path(), pool.db_path()).unwrap();
    pool.start_ready();
    assert_eq!(
        pool.query_i64("SELECT COUNT(*) FROM workers WHERE managed_by = 'persistent'"),
        2
    );
    let out = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert!(stdout(&out).contains("protocol clm (the database"), "{}", stdout(&out));

    let mut fresh = Pool::new("", CP_WORKERS);
    let out = fresh.cli(&["check", "--config", fresh.config().to_str().unwrap()]);
    assert!(stdout(&out).contains("protocol clx (the default"), "{}", stdout(&out));
    fresh.start_ready();
    assert_eq!(fresh.schema_versions(), vec![1]);
    let json: serde_json::Value = serde_json::from_slice(&fresh.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(json["protocol"], "clx");
}

#[test]
fn a_database_that_is_not_a_job_database_is_refused() {
    let pool = Pool::new("", CP_WORKERS);
    {
        let c = rusqlite::Connection::open(pool.db_path()).unwrap();
        c.execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine')")
            .unwrap();
    }
    let before = std::fs::read(pool.db_path()).unwrap();
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("it is not a job database: it has the tables notes but no schema_version"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(pool.db_path()).unwrap(), before);
}

#[test]
fn a_type_the_databases_protocol_does_not_know_needs_a_command() {
    // jupyterlite is a CLM type: accepted while the database is unknown,
    // refused with its line once the database turns out to be CLX.
    let maker = Pool::new("protocol = \"clx\"\n", CP_WORKERS);
    create_db(&maker);
    let pool = Pool::new("", "[[workers]]\nworker_type = \"jupyterlite\"\n");
    std::fs::copy(maker.db_path(), pool.db_path()).unwrap();
    let out = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let config = std::fs::read_to_string(pool.config()).unwrap();
    let line = config.lines().position(|l| l == "[[workers]]").unwrap() + 1;
    assert!(
        stderr(&out).contains(&format!(
            "pool.toml:{line}: workers[0].command: missing; `jupyterlite` is not a known type (clx:"
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("the database serves protocol clx"),
        "{}",
        stderr(&out)
    );
}
