//! The SQL behind CLM's Worker API (`src/api`): what a CLM worker in a
//! container asks of the queue over HTTP, written as CLM 1.35's own routes
//! write it, except where CLM's write is unguarded (a report for a job that
//! is no longer the worker's changes nothing here). Claiming and activation
//! are the same functions direct-mode workers use (`jobs::claim`,
//! `workers::activate`).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::vocab::{JobStatus, WorkerRow};

/// A worker that registers itself (no pre-registered row): CLM's
/// `POST /api/worker/register`.
pub fn register(
    conn: &Connection,
    worker_type: &str,
    container_id: &str,
    parent_pid: Option<i64>,
) -> rusqlite::Result<WorkerRow> {
    conn.execute(
        "INSERT INTO workers (worker_type, container_id, status, parent_pid) VALUES (?1, ?2, 'idle', ?3)",
        params![worker_type, container_id, parent_pid],
    )?;
    Ok(WorkerRow(conn.last_insert_rowid()))
}

/// A worker's finished job, as it reports it.
pub struct Report<'a> {
    pub job_id: i64,
    pub worker_row: WorkerRow,
    /// `Completed` or `Failed`.
    pub status: JobStatus,
    /// JSON text, or None.
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Records a reported outcome, as CLM's `update_job_status` does (completed:
/// `completed_at`, no error, the result; failed: the error and the result),
/// but only while the job is still this worker's and `processing`: a worker
/// declared dead meanwhile cannot overwrite a later attempt, nor a
/// cancelled job. Sets the worker idle with fresh statistics in the same
/// transaction. Returns whether the job was the worker's to report.
pub fn report(conn: &mut Connection, r: &Report) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seconds: Option<f64> = tx
        .query_row(
            "SELECT (julianday('now') - julianday(started_at)) * 86400.0 FROM jobs
             WHERE id = ?1 AND worker_id = ?2 AND status = 'processing'",
            params![r.job_id, r.worker_row],
            |row| row.get(0),
        )
        .optional()?
        .flatten();
    let changed = match r.status {
        JobStatus::Completed => tx.execute(
            "UPDATE jobs SET status = 'completed', completed_at = CURRENT_TIMESTAMP, error = NULL, result = ?3
             WHERE id = ?1 AND worker_id = ?2 AND status = 'processing'",
            params![r.job_id, r.worker_row, r.result],
        )?,
        _ => tx.execute(
            "UPDATE jobs SET status = 'failed', error = ?3, result = ?4
             WHERE id = ?1 AND worker_id = ?2 AND status = 'processing'",
            params![r.job_id, r.worker_row, r.error, r.result],
        )?,
    };
    if changed == 1 {
        super::jobs::count_outcome(
            &tx,
            r.worker_row,
            r.status == JobStatus::Completed,
            seconds.unwrap_or(0.0),
        )?;
    }
    tx.commit()?;
    Ok(changed == 1)
}

/// A CLM job's correlation id (for the worker's logs).
pub fn correlation_id(conn: &Connection, job_id: i64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT correlation_id FROM jobs WHERE id = ?1")?
        .query_row([job_id], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// Fails a claimed job the API cannot hand out (its payload is not JSON),
/// so it is not left `processing`.
pub fn fail_unservable(conn: &Connection, job_id: i64, worker_row: WorkerRow, error: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE jobs SET status = 'failed', completed_at = CURRENT_TIMESTAMP, error = ?3
         WHERE id = ?1 AND worker_id = ?2 AND status = 'processing'",
        params![job_id, worker_row, error],
    )?;
    conn.execute(
        "UPDATE workers SET status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END WHERE id = ?1",
        [worker_row],
    )?;
    Ok(())
}

/// What `GET /jobs/{id}/cancelled` tells: None when there is no such job.
pub struct Cancellation {
    pub cancelled: bool,
    pub cancelled_at: Option<String>,
    pub cancelled_by: Option<String>,
}

pub fn cancellation(conn: &Connection, job_id: i64) -> rusqlite::Result<Option<Cancellation>> {
    conn.prepare_cached("SELECT status, cancelled_at, cancelled_by FROM jobs WHERE id = ?1")?
        .query_row([job_id], |r| {
            Ok(Cancellation {
                cancelled: r.get::<_, JobStatus>(0)? == JobStatus::Cancelled,
                cancelled_at: r.get(1)?,
                cancelled_by: r.get(2)?,
            })
        })
        .optional()
}

/// A worker saying goodbye: its row `dead`, as CLM's route does (the
/// supervisor puts back any job it still held when the container ends).
pub fn unregister(conn: &Connection, row: WorkerRow) -> rusqlite::Result<bool> {
    Ok(conn.execute("UPDATE workers SET status = 'dead' WHERE id = ?1", [row])? == 1)
}

/// `POST /cache/add`: CLM's `JobQueue.add_to_cache`.
pub fn cache_add(conn: &Connection, output_file: &str, content_hash: &str, metadata: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO results_cache (output_file, content_hash, result_metadata) VALUES (?1, ?2, ?3)",
        params![output_file, content_hash, metadata],
    )?;
    Ok(())
}

/// The `executed_notebooks` table of CLM's cache database (`clm_cache.db`),
/// created as CLM 1.35's `ExecutedNotebookCache` creates it.
const EXECUTED_NOTEBOOKS: &str = "
    CREATE TABLE IF NOT EXISTS executed_notebooks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        input_file TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        language TEXT NOT NULL,
        prog_lang TEXT NOT NULL,
        executed_notebook BLOB NOT NULL,
        payload_format TEXT NOT NULL DEFAULT 'nbformat-json',
        created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,

        UNIQUE(input_file, content_hash, language, prog_lang)
    );
    CREATE INDEX IF NOT EXISTS idx_executed_notebooks_lookup
        ON executed_notebooks(input_file, content_hash, language, prog_lang);";

/// The format CLM 1.35 reads (older pickled rows are never served).
const PAYLOAD_FORMAT: &str = "nbformat-json";

/// An executed notebook's cache key.
pub struct NotebookKey<'a> {
    pub input_file: &'a str,
    pub content_hash: &'a str,
    pub language: &'a str,
    pub prog_lang: &'a str,
}

/// Opens the cache database (created if missing), with its table.
pub fn open_cache(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(EXECUTED_NOTEBOOKS)?;
    // CLM's marker that the table holds no legacy (pickled) rows.
    if conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? < 1 {
        conn.execute(
            "DELETE FROM executed_notebooks WHERE payload_format != ?1",
            [PAYLOAD_FORMAT],
        )?;
        conn.execute_batch("PRAGMA user_version = 1")?;
    }
    Ok(conn)
}

pub fn notebook(conn: &Connection, key: &NotebookKey) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT executed_notebook FROM executed_notebooks
         WHERE input_file = ?1 AND content_hash = ?2 AND language = ?3 AND prog_lang = ?4 AND payload_format = ?5
         ORDER BY created_at DESC LIMIT 1",
        params![
            key.input_file,
            key.content_hash,
            key.language,
            key.prog_lang,
            PAYLOAD_FORMAT
        ],
        |r| r.get(0),
    )
    .optional()
}

pub fn store_notebook(conn: &Connection, key: &NotebookKey, json: &[u8]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO executed_notebooks
            (input_file, content_hash, language, prog_lang, executed_notebook, payload_format)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            key.input_file,
            key.content_hash,
            key.language,
            key.prog_lang,
            json,
            PAYLOAD_FORMAT
        ],
    )?;
    Ok(())
}
