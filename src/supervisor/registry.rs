//! Notices worker registrations: while any slot waits for its worker to
//! appear in `workers`, one task reads the rows added since the last look
//! (an indexed range read on the row id) every few milliseconds and hands
//! each waiting slot its worker's row id. A worker whose row the slot
//! pre-registered (CLM) is up once it has activated that row; those rows
//! are looked up by id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::{self, Db};
use crate::vocab::{WorkerId, WorkerRow};

const POLL: Duration = Duration::from_millis(5);

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    /// Told whenever workers registered (the monitor measures them soon).
    registered: Arc<Notify>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<WorkerId, oneshot::Sender<WorkerRow>>,
    /// Pre-registered rows whose activation a slot waits for.
    waiting_rows: HashMap<WorkerRow, oneshot::Sender<WorkerRow>>,
    /// Registrations nobody waited for yet (a fast worker can register
    /// before its slot starts waiting).
    seen: HashMap<WorkerId, WorkerRow>,
}

impl Registry {
    /// Starts the watcher task; it reads rows with ids above `after_row`.
    pub fn spawn(db: Db, after_row: WorkerRow, token: CancellationToken, tasks: &TaskTracker) -> Registry {
        let registry = Registry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                registered: Arc::new(Notify::new()),
            }),
        };
        let r = registry.clone();
        tasks.spawn(async move { r.watch(db, after_row, token).await });
        registry
    }

    /// Notified (coalesced) whenever workers have registered.
    pub fn registrations(&self) -> Arc<Notify> {
        self.inner.registered.clone()
    }

    /// Resolves with the worker's row id once `worker_id` has registered.
    pub fn expect(&self, worker_id: &WorkerId) -> oneshot::Receiver<WorkerRow> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(row) = st.seen.remove(worker_id) {
            tx.send(row).ok();
        } else {
            st.waiting.insert(worker_id.clone(), tx);
            self.inner.wake.notify_one();
        }
        rx
    }

    /// Resolves with `row` once its worker has activated that
    /// pre-registered row.
    pub fn expect_row(&self, row: WorkerRow) -> oneshot::Receiver<WorkerRow> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting_rows.insert(row, tx);
        self.inner.wake.notify_one();
        rx
    }

    /// Stops waiting for `worker_id` or its pre-registered `row` (it died
    /// or timed out).
    pub fn forget(&self, worker_id: &WorkerId, row: Option<WorkerRow>) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.remove(worker_id);
        st.seen.remove(worker_id);
        if let Some(row) = row {
            st.waiting_rows.remove(&row);
        }
    }

    async fn watch(&self, db: Db, mut last_row: WorkerRow, token: CancellationToken) {
        loop {
            let (by_id, rows): (bool, Vec<WorkerRow>) = {
                let st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                (!st.waiting.is_empty(), st.waiting_rows.keys().copied().collect())
            };
            if !by_id && rows.is_empty() {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = self.inner.wake.notified() => {}
                }
                continue;
            }
            let after = last_row;
            let looked = db
                .call(move |c| {
                    let new = if by_id {
                        db::workers::registered_since(c, after)?
                    } else {
                        Vec::new()
                    };
                    Ok((new, db::workers::activated(c, &rows)?))
                })
                .await;
            match looked {
                Ok((new, activated)) => {
                    if !new.is_empty() || !activated.is_empty() {
                        self.inner.registered.notify_one();
                    }
                    let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                    for (row, cid) in new {
                        last_row = last_row.max(row);
                        match st.waiting.remove(&cid) {
                            Some(tx) => {
                                tx.send(row).ok();
                            }
                            None => {
                                st.seen.insert(cid, row);
                            }
                        }
                    }
                    for row in activated {
                        if let Some(tx) = st.waiting_rows.remove(&row) {
                            tx.send(row).ok();
                        }
                    }
                }
                Err(e) => tracing::warn!("reading worker registrations: {e:#}"),
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
