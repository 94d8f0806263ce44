//! The doorbells of the built-in workers (see `worker::wake`): the
//! supervisor alone watches the database, and when a commit leaves jobs of
//! a type pending it writes a byte to that type's bell, a FIFO that only
//! that type's idle workers wait on. One process looking at every commit
//! instead of every idle worker: the heartbeats of hundreds of idle
//! workers then wake nobody.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::worker::wake::{Wake, bell_path, open_bell};

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
    // One ring per idle worker of each type with pending jobs: busy
    // workers claim their next job as they finish one, nobody to wake.
    let wanted: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT w.worker_type, COUNT(*) FROM workers w
             WHERE w.status = 'idle'
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'pending' AND j.job_type = w.worker_type)
             GROUP BY w.worker_type",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (t, n) in wanted {
        ring(&bell_path(db_path, &t), n.clamp(1, MAX_RINGS));
    }
    Ok(true)
}

/// Rings per look and type: enough to wake that many idle workers.
const MAX_RINGS: i64 = 64;

/// `times` bytes into the bell, one per job waiting: each wakes one idle
/// worker; a full bell (nobody listening) stays full.
fn ring(bell: &Path, times: i64) {
    let Some(mut f) = open_bell(bell) else {
        tracing::debug!(bell = %bell.display(), "no bell to ring");
        return;
    };
    if let Err(e) = f.write_all(&vec![b'1'; times as usize])
        && e.kind() != std::io::ErrorKind::WouldBlock
    {
        tracing::debug!(bell = %bell.display(), "ringing: {e}");
    }
}

/// Creates the bells (FIFOs) of `types` before their workers start.
pub fn install(db_path: &Path, types: &[String]) {
    use nix::sys::stat::Mode;
    for t in types {
        let bell = bell_path(db_path, t);
        if open_bell(&bell).is_some() {
            continue;
        }
        // Whatever is there instead (an older clx-pool's bell file) goes.
        if let Err(e) = std::fs::remove_file(&bell)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(bell = %bell.display(), "replacing: {e}");
        }
        // Readable and writable by the workers' users (containers may run
        // as another uid); the database's folder guards who gets here.
        let made = nix::unistd::mkfifo(&bell, Mode::from_bits_truncate(0o666)).and_then(|()| {
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                &bell,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
        });
        if let Err(e) = made {
            tracing::warn!(bell = %bell.display(), "creating the bell: {e}; its workers will watch the database instead");
        }
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
