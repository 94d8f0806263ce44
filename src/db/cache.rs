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

/// A completed job's result, remembered for the next build (as CLX's
/// workers record it): `{"job_id": N}` under its output file and content.
pub fn remember(conn: &Connection, job: &crate::db::jobs::ClaimedJob) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO results_cache (output_file, content_hash, result_metadata)
         VALUES (?1, ?2, ?3)
         ON CONFLICT(output_file, content_hash) DO UPDATE SET
             last_accessed = CURRENT_TIMESTAMP, result_metadata = excluded.result_metadata",
    )?
    .execute(params![
        job.output_file,
        job.content_hash,
        format!("{{\"job_id\": {}}}", job.id)
    ])?;
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
    // A table from a pickle-era CLM (before 1.23) has no format column:
    // every row in it is a pickle, as CLM's own upgrade says.
    let has_format = conn
        .prepare("SELECT 1 FROM pragma_table_info('executed_notebooks') WHERE name = 'payload_format'")?
        .exists([])?;
    if !has_format {
        conn.execute_batch("ALTER TABLE executed_notebooks ADD COLUMN payload_format TEXT NOT NULL DEFAULT 'pickle'")?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fixture::memory_db as db;
    use crate::db::jobs::ClaimedJob;

    use crate::vocab::Protocol;

    fn completed(id: i64, output_file: &str, content_hash: &str) -> ClaimedJob {
        ClaimedJob {
            id,
            input_file: "slides.py".into(),
            output_file: output_file.into(),
            content_hash: content_hash.into(),
            payload: "{}".into(),
            attempt: 1,
        }
    }

    /// (output_file, content_hash, result_metadata, access_count), by id.
    fn entries(conn: &Connection) -> Vec<(String, String, String, i64)> {
        conn.prepare("SELECT output_file, content_hash, result_metadata, access_count FROM results_cache ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn key<'a>(language: &'a str) -> NotebookKey<'a> {
        NotebookKey {
            input_file: "slides_010.py",
            content_hash: "abc",
            language,
            prog_lang: "python",
        }
    }

    #[test]
    fn a_completed_jobs_result_is_remembered_once_per_output_and_content() {
        for protocol in Protocol::ALL.iter().copied() {
            let conn = db(protocol);
            remember(&conn, &completed(1, "out.html", "h1")).unwrap();
            // Read by a build meanwhile (CLX's and CLM's readers count it).
            conn.execute("UPDATE results_cache SET access_count = 5", []).unwrap();
            remember(&conn, &completed(2, "out.html", "h1")).unwrap();
            remember(&conn, &completed(3, "out.html", "h2")).unwrap();
            assert_eq!(
                entries(&conn),
                vec![
                    ("out.html".into(), "h1".into(), "{\"job_id\": 2}".into(), 5),
                    ("out.html".into(), "h2".into(), "{\"job_id\": 3}".into(), 0),
                ],
                "{protocol}"
            );
            let metadata: serde_json::Value = serde_json::from_str(&entries(&conn)[0].2).unwrap();
            assert_eq!(metadata["job_id"], 2, "{protocol}: JSON the workers can read");
        }
    }

    #[test]
    fn cache_add_replaces_the_entry_for_the_same_output_and_content() {
        let conn = db(Protocol::Clm);
        cache_add(&conn, "out.png", "h", "{\"warnings\": []}").unwrap();
        cache_add(&conn, "out.png", "h", "{\"warnings\": [\"late\"]}").unwrap();
        cache_add(&conn, "out.svg", "h", "{}").unwrap();
        let shown: Vec<(String, String)> = entries(&conn).into_iter().map(|e| (e.0, e.2)).collect();
        assert_eq!(
            shown,
            vec![
                ("out.png".into(), "{\"warnings\": [\"late\"]}".into()),
                ("out.svg".into(), "{}".into()),
            ]
        );
    }

    #[test]
    fn an_executed_notebook_is_served_only_for_its_exact_key_and_the_latest_store_wins() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_cache(&dir.path().join("clm_cache.db")).unwrap();
        assert_eq!(notebook(&conn, &key("de")).unwrap(), None);
        store_notebook(&conn, &key("de"), b"{\"cells\": [1]}").unwrap();
        store_notebook(&conn, &key("de"), b"{\"cells\": [2]}").unwrap();
        assert_eq!(
            notebook(&conn, &key("de")).unwrap().as_deref(),
            Some(&b"{\"cells\": [2]}"[..])
        );
        assert_eq!(notebook(&conn, &key("en")).unwrap(), None, "another language");
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM executed_notebooks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        drop(conn);
        // Kept across openings.
        let again = open_cache(&dir.path().join("clm_cache.db")).unwrap();
        assert!(notebook(&again, &key("de")).unwrap().is_some());
    }

    #[test]
    fn opening_an_old_cache_drops_its_pickled_notebooks_once_and_never_serves_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clm_cache.db");
        {
            // A cache an older CLM wrote: user_version 0, a pickled row.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(EXECUTED_NOTEBOOKS).unwrap();
            old.execute(
                "INSERT INTO executed_notebooks
                    (input_file, content_hash, language, prog_lang, executed_notebook, payload_format)
                 VALUES ('slides_010.py', 'abc', 'de', 'python', x'80049500', 'pickle'),
                        ('slides_010.py', 'abc', 'en', 'python', CAST('{}' AS BLOB), 'nbformat-json')",
                [],
            )
            .unwrap();
        }
        let conn = open_cache(&path).unwrap();
        let formats: Vec<String> = conn
            .prepare("SELECT payload_format FROM executed_notebooks ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(formats, vec!["nbformat-json"]);
        assert_eq!(notebook(&conn, &key("en")).unwrap().as_deref(), Some(&b"{}"[..]));
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 1);

        // A pickled row an older CLM writes later is left there (CLM's
        // marker says the cleanup was done) but never served.
        conn.execute(
            "INSERT INTO executed_notebooks
                (input_file, content_hash, language, prog_lang, executed_notebook, payload_format)
             VALUES ('slides_010.py', 'abc', 'de', 'python', x'80049500', 'pickle')",
            [],
        )
        .unwrap();
        drop(conn);
        let conn = open_cache(&path).unwrap();
        assert_eq!(notebook(&conn, &key("de")).unwrap(), None);
    }

    #[test]
    fn a_pickle_era_cache_without_a_format_column_is_opened_and_its_pickles_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clm_cache.db");
        {
            // CLM before 1.23: no payload_format column, every row a pickle.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE executed_notebooks (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     input_file TEXT NOT NULL,
                     content_hash TEXT NOT NULL,
                     language TEXT NOT NULL,
                     prog_lang TEXT NOT NULL,
                     executed_notebook BLOB NOT NULL,
                     created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
                     UNIQUE(input_file, content_hash, language, prog_lang));
                 INSERT INTO executed_notebooks (input_file, content_hash, language, prog_lang, executed_notebook)
                 VALUES ('slides_010.py', 'abc', 'de', 'python', x'80049500');",
            )
            .unwrap();
        }
        let conn = open_cache(&path).expect("CLM 1.35 opens such a cache");
        assert_eq!(notebook(&conn, &key("de")).unwrap(), None);
        store_notebook(&conn, &key("de"), b"{}").unwrap();
        assert_eq!(notebook(&conn, &key("de")).unwrap().as_deref(), Some(&b"{}"[..]));
    }
}
