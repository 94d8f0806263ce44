//! The CLX `workers` table: registration, heartbeats and status.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

/// Registers a worker the way CLX workers do and returns its row id.
pub fn register(conn: &Connection, worker_type: &str, container_id: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "INSERT INTO workers (worker_type, container_id, status) VALUES (?1, ?2, 'idle') RETURNING id",
        params![worker_type, container_id],
        |r| r.get(0),
    )
}

pub fn heartbeat(conn: &Connection, row: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE workers SET last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?1",
        [row],
    )?;
    Ok(())
}

pub fn set_status(conn: &Connection, row: i64, status: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE workers SET status = ?2 WHERE id = ?1", params![row, status])?;
    Ok(())
}

/// Rows registered after `after_row` that are not dead: `(row, container_id)`.
pub fn registered_since(conn: &Connection, after_row: i64) -> rusqlite::Result<Vec<(i64, String)>> {
    conn.prepare_cached("SELECT id, container_id FROM workers WHERE id > ?1 AND status != 'dead' ORDER BY id")?
        .query_map([after_row], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

pub fn max_row(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM workers", [], |r| r.get(0))
}

/// Worker counts per type, then per status.
pub fn counts(conn: &Connection) -> rusqlite::Result<BTreeMap<String, BTreeMap<String, i64>>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT worker_type, status, COUNT(*) FROM workers GROUP BY worker_type, status")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
    })?;
    for row in rows {
        let (t, s, n) = row?;
        let entry = out.entry(t).or_insert_with(|| {
            ["idle", "busy", "hung", "dead"]
                .iter()
                .map(|s| (s.to_string(), 0))
                .collect()
        });
        entry.insert(s, n);
    }
    Ok(out)
}

/// Marks every worker that is not dead as dead and puts back its jobs; for
/// cleaning up after a supervisor that is gone. Returns (workers, jobs requeued, jobs failed).
pub fn bury_all(conn: &mut Connection, cause: &str) -> rusqlite::Result<(usize, usize, usize)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rows: Vec<(i64, String)> = tx
        .prepare("SELECT id, container_id FROM workers WHERE status != 'dead'")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let (mut requeued, mut failed) = (0, 0);
    for (row, cid) in &rows {
        tx.execute("UPDATE workers SET status = 'dead' WHERE id = ?1", [row])?;
        let (r, f) = super::jobs::recover(&tx, *row, cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    // Jobs held by rows that were already dead (an earlier crash mid-recovery).
    let orphans: Vec<(i64, String)> = tx
        .prepare(
            "SELECT DISTINCT w.id, w.container_id FROM jobs j JOIN workers w ON w.id = j.worker_id
             WHERE j.status = 'processing' AND w.status = 'dead'",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (row, cid) in &orphans {
        let (r, f) = super::jobs::recover(&tx, *row, cid, cause)?;
        requeued += r.len();
        failed += f.len();
    }
    tx.commit()?;
    Ok((rows.len(), requeued, failed))
}
