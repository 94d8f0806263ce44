//! Exit codes exactly as docs/cli.md says, one table over the commands a
//! script calls × what it may meet: success, a runtime failure, a usage or
//! config error, no database, a file that is not a database, a pool whose
//! supervisor is down.
//!
//! 0 success · 1 runtime failure (a timeout, a failed job, a degraded pool,
//! no supervisor to act) · 2 usage or config error, a refused or missing
//! database, an unknown job id, a pool that is down under `stats --check`.

mod common;

use common::{COPY, Pool, sh_workers, stderr, stdout};

/// Runs `args` (with `--db` as the pool's, unless given) and checks the
/// exit code, saying which row of the table failed.
fn expect(pool: &Pool, situation: &str, args: &[&str], code: i32) {
    let out = pool.cli(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{situation}: `clx-pool {}` exited {:?}, not {code}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
}

fn table(pool: &Pool, situation: &str, rows: &[(&[&str], i32)]) {
    for (args, code) in rows {
        expect(pool, situation, args, *code);
    }
}

#[test]
fn every_command_exits_as_documented() {
    let workers = format!("{}\n{}", sh_workers("copy", 1, COPY), sh_workers("fail", 1, "exit 3"));
    let mut pool = Pool::new("", &workers);
    let config = pool.config();
    let config = config.to_str().unwrap();
    let dir = pool.path("");
    let nodb = dir.join("none/jobs.db");
    let nodb = nodb.to_str().unwrap();
    let notdb = dir.join("notes.txt");
    std::fs::write(&notdb, "these are my notes, not a database\n").unwrap();
    let notdb = notdb.to_str().unwrap();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[pool\n").unwrap();
    let broken = broken.to_str().unwrap();

    // Usage and config errors, before anything runs.
    table(
        &pool,
        "usage",
        &[
            (&["stats", "--bogus"], 2),
            (&["submit", "copy"], 2),
            (&["wait"], 2),
            (&["jobs", "cancel"], 2),
            (&["stats", "--watch", "0s"], 2),
            (&["check", "--config", broken], 2),
            (&["start", "--config", broken], 2),
            (&["stats", "--config", broken], 2),
            (&["check", "--config", "/nonexistent/pool.toml"], 2),
        ],
    );
    // No database at the path.
    table(
        &pool,
        "no database",
        &[
            (&["stats", "--db", nodb], 2),
            (&["stats", "--check", "--db", nodb], 2),
            (&["stats", "--json", "--db", nodb], 2),
            (&["jobs", "list", "--db", nodb], 2),
            (&["jobs", "cancel", "1", "--db", nodb], 2),
            (&["jobs", "retry", "--failed", "--db", nodb], 2),
            // `wait` waits for the database to appear (a pool starting).
            (&["wait", "--drained", "--timeout", "300ms", "--db", nodb], 1),
            (&["stop", "--db", nodb], 0),
            (&["scale", "copy=2", "--db", nodb], 1),
            (&["restart", "copy", "--db", nodb], 1),
            (&["reload", "--db", nodb], 1),
            (&["logs", "--db", nodb], 2),
            // Off a terminal `top` says to use `stats --watch`.
            (&["top", "--db", nodb], 2),
        ],
    );
    // A file that is not a database at all.
    table(
        &pool,
        "not a database",
        &[
            (&["stats", "--db", notdb], 2),
            (&["stats", "--check", "--db", notdb], 2),
            (&["jobs", "list", "--db", notdb], 2),
            (&["jobs", "cancel", "1", "--db", notdb], 2),
            (&["wait", "--drained", "--timeout", "1s", "--db", notdb], 2),
            (&["submit", "copy", "x", "y", "--content-hash", "h", "--db", notdb], 2),
            (&["stop", "--db", notdb], 2),
            (&["jobs", "retry", "--failed", "--db", notdb], 2),
            (&["scale", "copy=2", "--db", notdb], 1),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(notdb).unwrap(),
        "these are my notes, not a database\n",
        "a refused file is left as it was"
    );

    // A running pool: success, and runtime failures.
    pool.start_ready();
    let copied = pool.submit("copy", "a.txt", "a");
    let failed = pool.submit_with("fail", "b.txt", &["--max-attempts", "1"]);
    expect(
        &pool,
        "running",
        &["wait", "--jobs", &copied.to_string(), "--timeout", "60s"],
        0,
    );
    let (copied, failed) = (copied.to_string(), failed.to_string());
    table(
        &pool,
        "running",
        &[
            (&["wait", "--jobs", &failed, "--timeout", "60s"], 1),
            (&["wait", "--drained", "--timeout", "60s"], 1),
            (&["wait", "--ready", "--timeout", "60s"], 0),
            (&["wait", "--jobs", "999999"], 2),
            (&["stats"], 0),
            (&["stats", "--json"], 0),
            // Half of the jobs that finished in the window failed.
            (&["stats", "--check"], 1),
            (&["jobs", "list"], 0),
            (&["jobs", "show", &copied], 0),
            (&["jobs", "show", "999999"], 2),
            (&["jobs", "cancel", "999999"], 2),
            (&["jobs", "retry", "999999"], 2),
            (&["submit", "nosuch", "x", "y", "--content-hash", "h"], 2),
            (
                &["submit", "copy", "x", "y", "--payload", "{", "--content-hash", "h"],
                2,
            ),
            (&["scale", "copy=2"], 0),
            (&["scale", "nosuch=2"], 1),
            (&["restart", "copy"], 0),
            (&["reload", "--config", config], 0),
            (&["logs", "copy"], 0),
            (&["check", "--config", config], 0),
            (&["start", "--config", config], 1),
            (&["stop"], 0),
        ],
    );
    pool.wait_supervisor_exit(std::time::Duration::from_secs(30));
    // Its supervisor down.
    table(
        &pool,
        "down",
        &[
            (&["stats"], 0),
            (&["stats", "--check"], 2),
            (&["jobs", "list"], 0),
            (&["wait", "--drained", "--timeout", "1s"], 1),
            (&["scale", "copy=2"], 1),
            (&["restart", "copy"], 1),
            (&["reload"], 1),
            (&["logs", "copy"], 0),
            (&["check", "--config", config], 0),
            (&["submit", "copy", "x", "y", "--content-hash", "h"], 0),
            (&["stop"], 0),
        ],
    );
}
