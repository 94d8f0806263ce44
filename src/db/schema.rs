//! Schema: the CLX version-1 tables, byte for byte what the Python workers
//! create and expect, plus clx-pool's own tables. clx-pool's migrations are
//! counted in `clx_pool_schema`, never in CLX's `schema_version`, so a CLX
//! version-1 reader or writer sees exactly the schema it knows.

use rusqlite::{Connection, params};

use crate::vocab::{CLM_SCHEMA_VERSION, Protocol};

/// The CLX version-1 schema (SPEC §3).
pub const CLX_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_type TEXT NOT NULL,
    status TEXT NOT NULL CHECK(status IN ('pending', 'processing', 'completed', 'failed')),
    priority INTEGER DEFAULT 0,
    input_file TEXT NOT NULL,
    output_file TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    started_at TIMESTAMP,
    completed_at TIMESTAMP,
    worker_id INTEGER,
    attempts INTEGER DEFAULT 0,
    max_attempts INTEGER DEFAULT 3,
    error TEXT,
    FOREIGN KEY (worker_id) REFERENCES workers(id)
);
CREATE INDEX IF NOT EXISTS idx_jobs_status ON jobs(status, job_type);
CREATE INDEX IF NOT EXISTS idx_jobs_content_hash ON jobs(content_hash);

CREATE TABLE IF NOT EXISTS results_cache (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    output_file TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    result_metadata TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    last_accessed TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    access_count INTEGER DEFAULT 0,
    UNIQUE(output_file, content_hash)
);

CREATE TABLE IF NOT EXISTS workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_type TEXT NOT NULL,
    container_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK(status IN ('idle', 'busy', 'hung', 'dead')),
    started_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    last_heartbeat TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    cpu_usage REAL,
    memory_usage REAL,
    jobs_processed INTEGER DEFAULT 0,
    jobs_failed INTEGER DEFAULT 0,
    avg_processing_time REAL
);
CREATE INDEX IF NOT EXISTS idx_workers_status ON workers(worker_type, status);

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
INSERT OR IGNORE INTO schema_version (version) VALUES (1);
"#;

/// clx-pool's own migrations, applied in order; index + 1 is the version.
/// Each is SQL for every database, and SQL for CLX databases only (what
/// CLM's schema already has).
const POOL_MIGRATIONS: &[(&str, &str)] = &[
    (
        // 1: the supervisor record, its slots and the restart history.
        r#"
    CREATE TABLE clx_pool_supervisor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        proc_start INTEGER,
        hostname TEXT,
        config_path TEXT,
        workspace_path TEXT,
        state TEXT NOT NULL,
        expected_workers INTEGER NOT NULL DEFAULT 0,
        started_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        ready_at TIMESTAMP,
        stopped_at TIMESTAMP
    );
    CREATE TABLE clx_pool_slots (
        worker_type TEXT NOT NULL,
        slot INTEGER NOT NULL,
        execution_mode TEXT NOT NULL,
        state TEXT NOT NULL,
        worker_id TEXT,
        worker_row INTEGER,
        pid INTEGER,
        proc_start INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0,
        last_cause TEXT,
        updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        PRIMARY KEY (worker_type, slot)
    );
    CREATE TABLE clx_pool_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        worker_type TEXT NOT NULL,
        slot INTEGER NOT NULL,
        worker_id TEXT,
        event TEXT NOT NULL,
        cause TEXT,
        job_id INTEGER,
        log_tail TEXT
    );
    "#,
        "",
    ),
    (
        // 2: why a slot waits, for `stats`; and the index that makes claiming
        // a lookup instead of a sort of every pending job. It serves the claim
        // of clx-pool, of CLX's Python workers and of CLM's (status, type,
        // then priority and age order); an extra index keeps both schemas
        // compatible with their readers and writers.
        r#"
    ALTER TABLE clx_pool_slots ADD COLUMN note TEXT;
    CREATE INDEX IF NOT EXISTS clx_pool_jobs_claim ON jobs(status, job_type, priority DESC, created_at);
    "#,
        "",
    ),
    (
        // 3: how many workers of each type the running pool wants (`scale`,
        // `reload`), for `stats`.
        r#"
    CREATE TABLE clx_pool_wanted (
        worker_type TEXT PRIMARY KEY,
        wanted INTEGER NOT NULL
    );
    "#,
        "",
    ),
    (
        // 4: the jobs finished since a moment (the monitor's job-duration
        // histogram every tick, a run's counts) found by a range instead of a
        // scan of the whole history; CLM's schema has idx_jobs_completed_at.
        "",
        "CREATE INDEX IF NOT EXISTS clx_pool_jobs_completed_at ON jobs(completed_at);",
    ),
    (
        // 5: when a run was found to have ended without stopping its pool
        // (the supervisor killed or crashed), for `stats`.
        "ALTER TABLE clx_pool_supervisor ADD COLUMN ended_uncleanly_at TIMESTAMP;",
        "",
    ),
    (
        // 6: where a slot's worker runs when it is not this machine (a swarm
        // node), for `stats --workers` and `top`.
        "ALTER TABLE clx_pool_slots ADD COLUMN node TEXT;",
        "",
    ),
    (
        // 7: the state of a swarm worker's task as Swarm reports it
        // (`pending: no suitable node …`, `preparing`, `running`), for
        // `stats --workers` and `top`.
        "ALTER TABLE clx_pool_slots ADD COLUMN task TEXT;",
        "",
    ),
    (
        // 8: the run's health rules (`health_window` in seconds,
        // `health_failure_rate`), for `stats --check` in another process.
        r#"
    ALTER TABLE clx_pool_supervisor ADD COLUMN health_window INTEGER;
    ALTER TABLE clx_pool_supervisor ADD COLUMN health_failure_rate REAL;
    "#,
        "",
    ),
];

/// The first pool version whose slots say where their worker runs.
pub const SLOT_NODE_VERSION: i64 = 6;
/// The first pool version whose slots say what Swarm does with their task.
pub const SLOT_TASK_VERSION: i64 = 7;
/// The first pool version whose supervisor record holds its health rules.
pub const HEALTH_RULES_VERSION: i64 = 8;

/// CLM 1.35's `SCHEMA_SQL` (`clm/infrastructure/database/schema.py`),
/// byte for byte: SQLite keeps each `CREATE` statement's text in
/// `sqlite_master`, so a database made from it is indistinguishable from
/// one CLM's `init_database` made.
pub const CLM_SCHEMA: &str = include_str!("clm_schema.sql");

/// What a database file holds, before anything is written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No tables of a job database: a new (or empty) file.
    Empty,
    /// A job database of this generation.
    Protocol(Protocol),
    /// A `schema_version` clx-pool serves under neither protocol (e.g. an
    /// older CLM, or none recorded at all).
    OtherVersion(Option<i64>),
    /// Tables, but not those of a job database.
    Foreign(Vec<String>),
}

/// Looks at the tables and `schema_version` of a database without writing
/// anything (not even the journal mode).
pub fn detect(conn: &Connection) -> rusqlite::Result<Found> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
               AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'clx_pool_%' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if tables.is_empty() {
        return Ok(Found::Empty);
    }
    if !tables.iter().any(|t| t == "schema_version") {
        return Ok(Found::Foreign(tables));
    }
    // A CLM database that an older clx-pool stamped with version 1 too is
    // still CLM's: the highest version decides, as it does for CLM.
    let version: Option<i64> = conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    Ok(match version {
        Some(1) => Found::Protocol(Protocol::Clx),
        Some(v) if v >= CLM_SCHEMA_VERSION => Found::Protocol(Protocol::Clm),
        other => Found::OtherVersion(other),
    })
}

/// Why clx-pool will not use a database, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "it is a {found} database (schema_version {}), but the config says protocol = \"{wanted}\"; \
         use a database of that protocol, or set protocol = \"{found}\" (or leave protocol out to follow the database)",
        found.schema_version()
    )]
    Contradiction { found: Protocol, wanted: Protocol },
    #[error(
        "its schema_version is {}, which clx-pool serves under neither protocol (clx is version 1, clm is version 11 or newer); \
         a CLM database of an older version is brought up to date by running CLM 1.35 on it once (e.g. `clm status --jobs-db-path FILE`)",
        .0.map(|v| v.to_string()).unwrap_or_else(|| "empty".into())
    )]
    OtherVersion(Option<i64>),
    #[error("it is not a job database: it has the tables {} but no schema_version", .0.join(", "))]
    Foreign(Vec<String>),
    #[error("it is not an SQLite database at all (a wrong --db or db_path?)")]
    NotSqlite,
}

impl Protocol {
    /// The `schema_version` a database of this protocol carries.
    pub fn schema_version(self) -> i64 {
        match self {
            Protocol::Clx => 1,
            Protocol::Clm => CLM_SCHEMA_VERSION,
        }
    }
}

/// Decides which protocol a database serves: its own if it has one (and
/// `wanted`, if given, must agree), else `wanted`, else CLX.
pub fn decide(found: &Found, wanted: Option<Protocol>) -> Result<Protocol, Refusal> {
    match (found, wanted) {
        (Found::Empty, w) => Ok(w.unwrap_or(Protocol::Clx)),
        (Found::Protocol(p), None) => Ok(*p),
        (Found::Protocol(p), Some(w)) if *p == w => Ok(w),
        (Found::Protocol(p), Some(w)) => Err(Refusal::Contradiction { found: *p, wanted: w }),
        (Found::OtherVersion(v), _) => Err(Refusal::OtherVersion(*v)),
        (Found::Foreign(t), _) => Err(Refusal::Foreign(t.clone())),
    }
}

/// Creates the job tables of `protocol` if the database has none (deciding
/// again under the write lock, in case another process created them
/// meanwhile), then applies clx-pool's own migrations. It never adds a row
/// to `schema_version` of an existing database.
pub fn prepare(conn: &Connection, wanted: Option<Protocol>) -> Result<Protocol, PrepareError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let found = detect(&tx)?;
    let protocol = decide(&found, wanted)?;
    if found == Found::Empty {
        match protocol {
            Protocol::Clx => tx.execute_batch(CLX_SCHEMA)?,
            Protocol::Clm => {
                tx.execute_batch(CLM_SCHEMA)?;
                tx.execute(
                    "INSERT OR IGNORE INTO schema_version (version) VALUES (?1)",
                    [CLM_SCHEMA_VERSION],
                )?;
            }
        }
    }
    tx.commit()?;
    migrate_pool_tables(conn, protocol)?;
    Ok(protocol)
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
}

/// The version of clx-pool's own tables (0 when they are not there yet):
/// commands that only read must cope with a database no supervisor of
/// this version has prepared.
pub fn pool_version(conn: &Connection) -> rusqlite::Result<i64> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'clx_pool_schema')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM clx_pool_schema", [], |r| {
        r.get(0)
    })
}

/// Applies pending clx-pool migrations (its own tables only).
pub fn migrate_pool_tables(conn: &Connection, protocol: Protocol) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS clx_pool_schema (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
    )?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM clx_pool_schema", [], |r| {
        r.get(0)
    })?;
    for (i, (all, clx)) in POOL_MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        let tx = conn.unchecked_transaction()?;
        // Another process may have migrated between our read and our lock.
        let done: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM clx_pool_schema WHERE version = ?1)",
            [version],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(all)?;
            if protocol == Protocol::Clx {
                tx.execute_batch(clx)?;
            }
            tx.execute("INSERT INTO clx_pool_schema (version) VALUES (?1)", params![version])?;
        }
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn prepare_is_idempotent_and_keeps_clx_version_1() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(prepare(&conn, None).unwrap(), Protocol::Clx);
        assert_eq!(prepare(&conn, None).unwrap(), Protocol::Clx);
        assert_eq!(versions(&conn), vec![1]);
        let pool: i64 = conn
            .query_row("SELECT MAX(version) FROM clx_pool_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pool, POOL_MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_clm_database_keeps_its_versions_and_is_followed() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(prepare(&conn, Some(Protocol::Clm)).unwrap(), Protocol::Clm);
        assert_eq!(versions(&conn), vec![11]);
        assert_eq!(prepare(&conn, None).unwrap(), Protocol::Clm);
        assert_eq!(prepare(&conn, Some(Protocol::Clm)).unwrap(), Protocol::Clm);
        assert_eq!(versions(&conn), vec![11], "no version row added");
        let refused = prepare(&conn, Some(Protocol::Clx)).unwrap_err();
        assert!(matches!(
            refused,
            PrepareError::Refused(Refusal::Contradiction {
                found: Protocol::Clm,
                wanted: Protocol::Clx
            })
        ));
    }

    #[test]
    fn detection_table() {
        let cases: &[(&str, Found)] = &[
            ("", Found::Empty),
            ("CREATE TABLE clx_pool_schema (version INTEGER)", Found::Empty),
            ("CREATE TABLE notes (x TEXT)", Found::Foreign(vec!["notes".into()])),
            (
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY)",
                Found::OtherVersion(None),
            ),
            (
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY); INSERT INTO schema_version VALUES (1)",
                Found::Protocol(Protocol::Clx),
            ),
            (
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY); INSERT INTO schema_version VALUES (7)",
                Found::OtherVersion(Some(7)),
            ),
            (
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY); INSERT INTO schema_version VALUES (1), (11)",
                Found::Protocol(Protocol::Clm),
            ),
        ];
        for (sql, expected) in cases {
            let conn = Connection::open_in_memory().unwrap();
            conn.execute_batch(sql).unwrap();
            assert_eq!(&detect(&conn).unwrap(), expected, "{sql}");
        }
    }
}
