//! The doorbells of the built-in workers (see `worker::wake`): the
//! supervisor alone watches the database, and when a commit leaves jobs of
//! a type pending it writes a byte to that type's bell, a FIFO that only
//! that type's idle workers wait on. One process looking at every commit
//! instead of every idle worker: the heartbeats of hundreds of idle
//! workers then wake nobody.
//!
//! The supervisor keeps every bell it made open and rings through that
//! descriptor, so a bell removed by someone (a cleanup job, `rm`) still
//! reaches the workers that opened it; within a second it is made again
//! for the workers that start later, and both are rung.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

use crate::contract::bell_path;
use crate::db;
use crate::worker::wake::{Wake, open_bell};

/// The bells made, by path: every one made there (the latest last), open.
static BELLS: LazyLock<Mutex<HashMap<PathBuf, Vec<std::fs::File>>>> = LazyLock::new(Default::default);

fn bells() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Vec<std::fs::File>>> {
    BELLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// After a write to the WAL the commit is published a moment later: look
/// again after these delays until it shows.
const SETTLE: [u64; 7] = [0, 1, 2, 4, 8, 16, 32];

/// How often the bells are checked for removal (`heal`).
const HEAL_EVERY: Duration = Duration::from_secs(1);

/// Rings bells until `token` is cancelled.
pub async fn run(db_path: PathBuf, token: CancellationToken) {
    let Some((conn, _)) = db::open_read_only(&db_path).ok().flatten() else {
        tracing::warn!("the bells cannot read the database; built-in workers poll instead");
        return;
    };
    let mut wake = Wake::new(&db_path, None);
    let mut seen: Option<i64> = None;
    let mut healed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            // A periodic look as well: a change inotify did not report.
            _ = wake.changed(Duration::from_secs(1)) => {}
        }
        // Every commit wakes this loop (an idle pool's heartbeats too):
        // the bells are checked once a second, not at each.
        if healed.is_none_or(|t| t.elapsed() >= HEAL_EVERY) {
            heal();
            healed = Some(Instant::now());
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
/// since the last look; false if it did not change. One read transaction:
/// each costs locks on the database's shared memory that every worker's
/// connection holds too, so their price grows with the pool.
fn look(conn: &Connection, db_path: &Path, seen: &mut Option<i64>) -> rusqlite::Result<bool> {
    let tx = conn.unchecked_transaction()?;
    let version: i64 = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
    if *seen == Some(version) {
        return Ok(false);
    }
    // One ring per idle worker of each type with pending jobs: busy
    // workers claim their next job as they finish one, nobody to wake.
    let waiting = db::workers::idle_with_work(&tx)?;
    tx.commit()?;
    *seen = Some(version);
    for (t, n) in waiting {
        ring(&bell_path(db_path, &t), n.clamp(1, MAX_RINGS));
    }
    Ok(true)
}

/// Rings per look and type: enough to wake that many idle workers.
const MAX_RINGS: i64 = 64;

/// `times` bytes into the bell, one per job waiting: each wakes one idle
/// worker; a full bell (nobody listening) stays full. Every bell made at
/// that path is rung (workers started before it was removed wait on the
/// old one).
fn ring(bell: &Path, times: i64) {
    let mut all = bells();
    let Some(open) = all.get_mut(bell) else {
        tracing::debug!(bell = %bell.display(), "no bell to ring");
        return;
    };
    for f in open.iter_mut() {
        if let Err(e) = f.write_all(&vec![b'1'; times as usize])
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            tracing::debug!(bell = %bell.display(), "ringing: {e}");
        }
    }
}

/// Makes again every bell that is gone or is no longer the one made.
fn heal() {
    let lost: Vec<PathBuf> = bells()
        .iter()
        .filter(|(path, open)| !is_current(path, open.last()))
        .map(|(path, _)| path.clone())
        .collect();
    for path in lost {
        tracing::warn!(bell = %path.display(), "a bell was removed or replaced: making it again");
        make(&path);
    }
}

/// Whether the FIFO at `path` is the one `open` holds.
fn is_current(path: &Path, open: Option<&std::fs::File>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(there), Some(Ok(held))) = (std::fs::symlink_metadata(path), open.map(|f| f.metadata())) else {
        return false;
    };
    (there.dev(), there.ino()) == (held.dev(), held.ino())
}

/// Creates the bells (FIFOs) of `types` before their workers start.
pub fn install(db_path: &Path, types: &[String]) {
    for t in types {
        let bell = bell_path(db_path, t);
        if is_current(&bell, bells().get(&bell).and_then(|o| o.last())) {
            continue;
        }
        make(&bell);
    }
}

/// Makes the bell at `path` (whatever else is there goes) and keeps it open.
fn make(bell: &Path) {
    use nix::sys::stat::Mode;
    if let Err(e) = std::fs::remove_file(bell)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(bell = %bell.display(), "replacing: {e}");
    }
    // Readable and writable by the workers' users (containers may run as
    // another uid); the database's folder guards who gets here.
    let made = nix::unistd::mkfifo(bell, Mode::from_bits_truncate(0o666)).and_then(|()| {
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            bell,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
    });
    match made.map(|()| open_bell(bell)) {
        Ok(Some(f)) => bells().entry(bell.to_path_buf()).or_default().push(f),
        Ok(None) => tracing::warn!(bell = %bell.display(), "cannot open the bell just made"),
        Err(e) => {
            tracing::warn!(bell = %bell.display(), "creating the bell: {e}; its workers will watch the database instead")
        }
    }
}

/// Removes the bells when the pool stops.
pub fn remove(db_path: &Path, types: &[String]) {
    for t in types {
        let bell = bell_path(db_path, t);
        bells().remove(&bell);
        if let Err(e) = std::fs::remove_file(&bell)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(bell = %bell.display(), "removing: {e}");
        }
    }
}
