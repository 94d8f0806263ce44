//! Schema: the CLX version-1 tables, byte for byte what the Python workers
//! create and expect, plus clx-pool's own tables. clx-pool's migrations are
//! counted in `clx_pool_schema`, never in CLX's `schema_version`, so a CLX
//! version-1 reader or writer sees exactly the schema it knows.

use rusqlite::{Connection, params};

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
const POOL_MIGRATIONS: &[&str] = &[
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
];

/// Creates the CLX tables if missing and applies pending clx-pool migrations.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(CLX_SCHEMA)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS clx_pool_schema (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
    )?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM clx_pool_schema", [], |r| {
        r.get(0)
    })?;
    for (i, sql) in POOL_MIGRATIONS.iter().enumerate() {
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
            tx.execute_batch(sql)?;
            tx.execute("INSERT INTO clx_pool_schema (version) VALUES (?1)", params![version])?;
        }
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_is_idempotent_and_keeps_clx_version_1() {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        migrate(&conn).unwrap();
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, vec![1]);
        let pool: i64 = conn
            .query_row("SELECT MAX(version) FROM clx_pool_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pool, POOL_MIGRATIONS.len() as i64);
    }
}
