//! The doorbells of the built-in workers (see `worker::wake`): the
//! supervisor alone watches the database, and when a commit leaves jobs of
//! a type pending it writes to that type's bell file, which only that
//! type's idle workers watch. One process looking at every commit instead
//! of every idle worker: the heartbeats of hundreds of idle workers then
//! wake nobody.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::worker::wake::{Wake, bell_path};

/// After a write to the WAL the commit is published a moment later: look
/// again after these delays until it shows.
const SETTLE: [u64; 7] = [0, 1, 2, 4, 8, 16, 32];

/// Rings bells until `token` is cancelled.
pub async fn run(db_path: PathBuf, token: CancellationToken) {
    let Some((conn, _)) = db::open_read_only(&db_path).ok().flatten() else {
        tracing::warn!("the bells cannot read the database; built-in workers poll instead");
        return;
    };
    let mut wake = Wake::new(&db_path, None);
    let mut seen: Option<i64> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            // A periodic look as well: a change inotify did not report.
            _ = wake.changed(Duration::from_secs(1)) => {}
        }
        for delay in SETTLE {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match look(&conn, &db_path, &mut seen) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!("bells: {e}");
                    break;
                }
            }
        }
    }
}

/// Rings the bells of the types with pending jobs if the database changed
/// since the last look; false if it did not change.
fn look(conn: &Connection, db_path: &Path, seen: &mut Option<i64>) -> rusqlite::Result<bool> {
    let version: i64 = conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?;
    if *seen == Some(version) {
        return Ok(false);
    }
    *seen = Some(version);
    let types: Vec<String> = conn
        .prepare_cached("SELECT DISTINCT job_type FROM jobs WHERE status = 'pending'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for t in types {
        ring(&bell_path(db_path, &t));
    }
    Ok(true)
}

fn ring(bell: &Path) {
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(bell)
        .and_then(|mut f| f.write_all(b"1"));
    if let Err(e) = written {
        tracing::debug!(bell = %bell.display(), "ringing: {e}");
    }
}

/// Creates the bells of `types` before their workers start watching them.
pub fn install(db_path: &Path, types: &[String]) {
    for t in types {
        ring(&bell_path(db_path, t));
    }
}

/// Removes the bells when the pool stops.
pub fn remove(db_path: &Path, types: &[String]) {
    for t in types {
        let bell = bell_path(db_path, t);
        if let Err(e) = std::fs::remove_file(&bell)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(bell = %bell.display(), "removing: {e}");
        }
    }
}
