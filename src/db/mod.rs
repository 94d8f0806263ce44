//! The SQLite file shared by the supervisor, the workers and the CLI, one
//! module per table: every statement that writes a table is in its module.
//!
//! | module | tables |
//! |---|---|
//! | [`schema`] | creates them, exactly as the workers of the chosen protocol expect them (CLX version 1 or CLM version 11), and migrates clx-pool's own |
//! | [`jobs`] | `jobs`: the queue (`jobs`), its handling by people (`jobs::admin`), its counts (`jobs::counts`) |
//! | [`workers`] | `workers` |
//! | [`events`] | `clx_pool_events`, CLM's `worker_events` |
//! | [`supervisor`] | `clx_pool_supervisor` |
//! | [`slots`] | `clx_pool_slots`, `clx_pool_wanted` |
//! | [`cache`] | CLM's `results_cache` and executed-notebook cache |
//!
//! Status words in SQL are the vocabulary's (`crate::vocab`), bound as
//! parameters. [`Db`] runs queries for async code on the blocking pool, so
//! no connection is ever held across an await.

pub mod cache;
pub mod events;
#[cfg(test)]
pub(crate) mod fixture;
pub mod jobs;
pub mod schema;
pub mod slots;
pub mod supervisor;
pub mod workers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;

use crate::vocab::Protocol;

/// How long a statement waits for a lock held by another connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A database clx-pool will not use, and why; decided before anything
/// is written to the file (exit code 2: the user named the wrong file or
/// protocol).
#[derive(Debug, thiserror::Error)]
#[error("{}: {refusal}", path.display())]
pub struct Refused {
    pub path: PathBuf,
    pub refusal: schema::Refusal,
}

/// Opens `path` (creating it and its folder if needed) in WAL mode with a
/// busy timeout, creates the job tables of `wanted` (CLX if unset) in a new
/// database, checks that an existing one serves `wanted`, and brings
/// clx-pool's own tables up to date. A database that is refused is left
/// byte for byte as it was.
pub fn open(path: &Path, wanted: Option<Protocol>) -> anyhow::Result<(Connection, Protocol)> {
    regular(path)?;
    if let Some(dir) = path.parent() {
        crate::files::create_dirs(dir).with_context(|| format!("creating the database folder {}", dir.display()))?;
    }
    let conn = Connection::open(path).with_context(|| format!("opening the database {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Refuse before the first write (switching to WAL is one).
    let found = detect(&conn, path)?;
    refuse_unless(path, schema::decide(&found, wanted))?;
    set_pragmas(&conn, path)?;
    match schema::prepare(&conn, wanted) {
        Ok(p) => Ok((conn, p)),
        Err(schema::PrepareError::Refused(refusal)) => Err(Refused {
            path: path.to_path_buf(),
            refusal,
        }
        .into()),
        Err(schema::PrepareError::Sql(e)) => {
            Err(anyhow::Error::new(e).context(format!("preparing the database {}", path.display())))
        }
    }
}

/// What an existing database holds, read without writing to it; None if
/// there is no file.
pub fn peek(path: &Path) -> anyhow::Result<Option<schema::Found>> {
    match read_only_connection(path)? {
        None => Ok(None),
        Some(conn) => {
            let found = detect(&conn, path)?;
            Ok(Some(found))
        }
    }
}

/// A database path that is there must be a regular file: SQLite would
/// wait for ever on a FIFO.
fn regular(path: &Path) -> anyhow::Result<()> {
    crate::files::regular_or_missing(path).with_context(|| format!("the database {}", path.display()))
}

fn read_only_connection(path: &Path) -> anyhow::Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    regular(path)?;
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening the database {} read-only", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // A database in WAL mode needs its `-shm` file, which SQLite cannot
    // make on a read-only file system (a mounted snapshot, a read-only
    // share): there, with no writer possible, it is read as immutable.
    match conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)) {
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen) && on_read_only_fs(path) => {
            let uri = format!("file:{}?immutable=1", uri_path(path));
            let conn = Connection::open_with_flags(
                &uri,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .with_context(|| format!("opening the database {} on a read-only file system", path.display()))?;
            Ok(Some(conn))
        }
        _ => Ok(Some(conn)),
    }
}

/// Whether the file system holding `path` is mounted read-only.
fn on_read_only_fs(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path).is_ok_and(|st| st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// `path` for an SQLite URI: absolute, with `%`, `?` and `#` escaped.
fn uri_path(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    absolute
        .to_string_lossy()
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23")
}

/// Opens a job database read-only, for commands that only read (`stats`,
/// `jobs`, `wait`): nothing is created, migrated or switched to WAL, so
/// they work on a read-only file and leave any file as it was. None while
/// the file or its job tables are not there yet; a file that is not a job
/// database is refused.
pub fn open_read_only(path: &Path) -> anyhow::Result<Option<(Connection, Protocol)>> {
    let Some(conn) = read_only_connection(path)? else {
        return Ok(None);
    };
    let found = detect(&conn, path)?;
    let protocol = match found {
        schema::Found::Protocol(p) => p,
        schema::Found::Empty => return Ok(None),
        other => refuse_unless(path, schema::decide(&other, None))?,
    };
    Ok(Some((conn, protocol)))
}

/// What `conn` holds ([`schema::detect`]); a file that is not SQLite at
/// all is refused like a database of another kind.
fn detect(conn: &Connection, path: &Path) -> anyhow::Result<schema::Found> {
    match schema::detect(conn) {
        Ok(found) => Ok(found),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::NotADatabase => Err(Refused {
            path: path.to_path_buf(),
            refusal: schema::Refusal::NotSqlite,
        }
        .into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading the database {}", path.display()))),
    }
}

/// No job database where one was looked for: a wrong path, or a pool
/// that never ran (a usage error, exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "no job database at {} (start a pool first, or point --db / --config / CLX_DB_PATH at the right file)",
    path.display()
)]
pub struct NoDatabase {
    pub path: PathBuf,
}

/// [`schema::decide`], with the database named in the refusal.
pub fn decide(path: &Path, found: &schema::Found, wanted: Option<Protocol>) -> Result<Protocol, Refused> {
    refuse_unless(path, schema::decide(found, wanted))
}

fn refuse_unless<T>(path: &Path, decided: Result<T, schema::Refusal>) -> Result<T, Refused> {
    decided.map_err(|refusal| Refused {
        path: path.to_path_buf(),
        refusal,
    })
}

fn set_pragmas(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    // The Python workers' connections do not enforce foreign keys (SQLite's
    // default), and CLM relies on it: its workers delete their own rows
    // while `jobs` and `worker_events` still name them. The bundled SQLite
    // enforces them by default; ours must not, or deleting a row fails.
    conn.pragma_update(None, "foreign_keys", false)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .with_context(|| format!("switching {} to WAL mode", path.display()))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

/// Opens a job database that must already exist, without creating or
/// migrating anything (for workers, which never change the schema), and
/// tells which protocol it serves.
pub fn open_existing(path: &Path) -> anyhow::Result<(Connection, Protocol)> {
    open_if_ready(path)?.ok_or_else(|| {
        NoDatabase {
            path: path.to_path_buf(),
        }
        .into()
    })
}

/// Like [`open_existing`], but None while the file or its job tables are
/// not there yet (a supervisor may be creating them).
pub fn open_if_ready(path: &Path) -> anyhow::Result<Option<(Connection, Protocol)>> {
    if !path.exists() {
        return Ok(None);
    }
    regular(path)?;
    let conn = Connection::open(path).with_context(|| format!("opening the database {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let found = detect(&conn, path)?;
    let protocol = match found {
        schema::Found::Protocol(p) => p,
        schema::Found::Empty => return Ok(None),
        other => refuse_unless(path, schema::decide(&other, None))?,
    };
    set_pragmas(&conn, path)?;
    Ok(Some((conn, protocol)))
}

/// [`open_read_only`] for a database that must exist: a missing file (or
/// one without job tables) is a clear error, not a new empty database.
pub fn open_for_reading(path: &Path) -> anyhow::Result<(Connection, Protocol)> {
    open_read_only(path)?.ok_or_else(|| {
        NoDatabase {
            path: path.to_path_buf(),
        }
        .into()
    })
}

/// Whether the database can be written now: a write transaction is begun
/// (waiting at most `wait` for another writer) and rolled back, writing
/// nothing. A worker cannot heartbeat or record a result while this is
/// false, so that time is no evidence against it.
pub fn writable(c: &mut Connection, wait: Duration) -> rusqlite::Result<bool> {
    c.busy_timeout(wait)?;
    let probe = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .and_then(|tx| tx.rollback());
    c.busy_timeout(BUSY_TIMEOUT)?;
    match probe {
        Ok(()) => Ok(true),
        Err(e) if is_transient(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A vocabulary word as an SQL literal (`'pending'`), for the statements
/// built around a dynamic filter or shared as text (where binding would
/// renumber every parameter): the word still comes from the vocabulary.
pub(crate) fn lit(word: impl std::fmt::Display) -> String {
    format!("'{word}'")
}

/// Words as a list of SQL literals (`'pending', 'processing'`).
pub(crate) fn lits<T: std::fmt::Display>(words: &[T]) -> String {
    words.iter().map(lit).collect::<Vec<_>>().join(", ")
}

/// True for errors that go away by themselves: another connection holding
/// a lock past `busy_timeout`, a full disk, a failing I/O. A write that
/// fails this way is worth retrying until it lands; any other error is a
/// bug or a broken file and is reported at once.
pub fn is_transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DatabaseBusy | DatabaseLocked | DiskFull | SystemIoFailure | CannotOpen)
    )
}

/// Says so when the file system holding `path` is full, which SQLite
/// reports as "database or disk is full" or, when a shared-memory file
/// cannot grow, as a disk I/O error.
pub fn disk_full_hint(path: &Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    (st.blocks_available() == 0).then(|| format!("the disk holding {} is full", dir.display()))
}

/// [`is_transient`] for an error that went through `anyhow` (with context).
pub fn is_transient_any(e: &anyhow::Error) -> bool {
    e.downcast_ref::<rusqlite::Error>().is_some_and(is_transient)
}

/// Retry pacing for writes that must land: 50 ms doubling to 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(50),
            attempts: 0,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(2));
        self.attempts += 1;
        d
    }

    /// Whether this failure is worth a log line (the first, then every 10th).
    pub fn should_log(&self) -> bool {
        self.attempts % 10 == 1
    }
}

/// Runs an `INSERT`/`UPDATE … RETURNING` that yields at most one row and
/// steps the statement to its end: outside a transaction the commit
/// happens there, and an error at commit (a full disk, a lock) must be
/// reported, not lost behind a row that was never written.
pub fn returning_one<T, P: rusqlite::Params>(
    stmt: &mut rusqlite::Statement<'_>,
    params: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    let mut rows = stmt.query(params)?;
    let first = match rows.next()? {
        Some(row) => Some(f(row)?),
        None => None,
    };
    while rows.next()?.is_some() {}
    Ok(first)
}

/// A connection for async code: each call runs on tokio's blocking pool.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    protocol: Protocol,
}

impl Db {
    pub fn new(conn: Connection, path: &Path, protocol: Protocol) -> Self {
        Db {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            protocol,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The protocol of the database's job tables.
    pub fn protocol(&self) -> Protocol {
        self.protocol
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

    /// Runs `f` until it succeeds, waiting out transient failures (a lock
    /// held past `busy_timeout`, a full disk) with backoff: for the writes
    /// that must never be dropped (a worker's end, a slot's state). Other
    /// errors are returned at once.
    pub async fn call_until_done<T, F>(&self, what: &str, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> rusqlite::Result<T> + Send + Sync + Clone + 'static,
    {
        let mut backoff = Backoff::default();
        loop {
            match self.call(f.clone()).await {
                Ok(v) => {
                    if backoff.attempts > 0 {
                        tracing::info!("{what}: written after {} retries", backoff.attempts);
                    }
                    return Ok(v);
                }
                Err(e) if is_transient_any(&e) => {
                    let delay = backoff.step();
                    if backoff.should_log() {
                        tracing::warn!("{what}: {e:#}; retrying until it is written");
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e.context(what.to_string())),
            }
        }
    }
}
