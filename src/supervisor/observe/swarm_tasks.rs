//! What Swarm says of each swarm worker's task (its node, `pending: no
//! suitable node …`, `preparing`, `running`), written into its slot's row
//! as the engine's poller hears it, for `stats --workers` and `top`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::db::Db;
use crate::db::slots::TaskLine;
use crate::executor::swarm::Seen;
use crate::vocab::WorkerId;

/// Follows the poller until `token` is cancelled or the engine is gone;
/// writes only what changed, and tries a line again at the next poll
/// while no slot holds its worker yet (the launch not yet recorded).
pub async fn record(db: Db, mut seen: watch::Receiver<Arc<Seen>>, token: CancellationToken) {
    let mut written: HashMap<WorkerId, TaskLine> = HashMap::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            changed = seen.changed() => if changed.is_err() { return },
        }
        let lines = seen.borrow_and_update().task_lines();
        let fresh: Vec<TaskLine> = lines
            .iter()
            .filter(|l| written.get(&l.worker_id) != Some(*l))
            .cloned()
            .collect();
        written.retain(|id, _| lines.iter().any(|l| &l.worker_id == id));
        if fresh.is_empty() {
            continue;
        }
        let writing = fresh.clone();
        match db.call(move |c| crate::db::slots::write_tasks(c, &writing)).await {
            Ok(unmatched) => {
                failing = false;
                for l in fresh.into_iter().filter(|l| !unmatched.contains(&l.worker_id)) {
                    written.insert(l.worker_id.clone(), l);
                }
            }
            Err(e) if !failing => {
                failing = true;
                warn!("recording the swarm workers' task states: {e:#} (tried again at every poll, logged once)");
            }
            Err(_) => {}
        }
    }
}
