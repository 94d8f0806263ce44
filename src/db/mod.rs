//! The SQLite file shared by the supervisor, the workers and the CLI.
//!
//! `schema` creates the CLX version-1 tables exactly as the Python workers
//! expect them and adds clx-pool's own tables; `jobs` is the job queue,
//! `workers` the CLX worker registry, `pool` clx-pool's own records (the
//! supervisor, its slots, the restart history). [`Db`] runs queries for async
//! code on the blocking pool, so no connection is ever held across an await.

pub mod jobs;
pub mod pool;
pub mod schema;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;

/// How long a statement waits for a lock held by another connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `path` (creating it and its folder if needed) in WAL mode with a
/// busy timeout, and brings the schema up to date.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the database folder {}", dir.display()))?;
    }
    let conn = open_existing(path)?;
    schema::migrate(&conn).with_context(|| format!("preparing the database {}", path.display()))?;
    Ok(conn)
}

/// Opens a database without creating or migrating it (for commands that only
/// read, and for workers, which never change the schema).
pub fn open_existing(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening the database {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .with_context(|| format!("switching {} to WAL mode", path.display()))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Opens a database that must already exist, for read-only commands: a
/// missing file is a clear error, not a new empty database.
pub fn open_for_reading(path: &Path) -> anyhow::Result<Connection> {
    if !path.exists() {
        anyhow::bail!(
            "no database at {} (start a pool first, or point --db / --config / CLX_DB_PATH at the right file)",
            path.display()
        );
    }
    open(path)
}

/// A connection for async code: each call runs on tokio's blocking pool.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Db {
    pub fn new(conn: Connection, path: &Path) -> Self {
        Db {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection off the async threads.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard).with_context(|| format!("database {}", path.display()))
        })
        .await
        .context("database task panicked")?
    }
}
