//! CLM's caches, as the Worker API serves them: the `results_cache` table
//! of the job database and the executed notebooks of CLM's cache database
//! (`clm_cache.db`).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

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
