//! Notices worker registrations: while any slot waits for its worker to
//! appear in `workers`, one task reads the rows added since the last look
//! (an indexed range read on the row id) every few milliseconds and hands
//! each waiting slot its worker's row id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::db::{self, Db};

const POLL: Duration = Duration::from_millis(5);

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    waiting: HashMap<String, oneshot::Sender<i64>>,
    /// Registrations nobody waited for yet (a fast worker can register
    /// before its slot starts waiting).
    seen: HashMap<String, i64>,
}

impl Registry {
    /// Starts the watcher task; it reads rows with ids above `after_row`.
    pub fn spawn(db: Db, after_row: i64, token: CancellationToken) -> Registry {
        let registry = Registry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Notify::new(),
            }),
        };
        let r = registry.clone();
        tokio::spawn(async move { r.watch(db, after_row, token).await });
        registry
    }

    /// Resolves with the worker's row id once `worker_id` has registered.
    pub fn expect(&self, worker_id: &str) -> oneshot::Receiver<i64> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(row) = st.seen.remove(worker_id) {
            let _ = tx.send(row);
        } else {
            st.waiting.insert(worker_id.to_string(), tx);
            self.inner.wake.notify_one();
        }
        rx
    }

    /// Stops waiting for `worker_id` (it died or timed out).
    pub fn forget(&self, worker_id: &str) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.remove(worker_id);
        st.seen.remove(worker_id);
    }

    async fn watch(&self, db: Db, mut last_row: i64, token: CancellationToken) {
        loop {
            let idle = self
                .inner
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waiting
                .is_empty();
            if idle {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = self.inner.wake.notified() => {}
                }
            }
            let after = last_row;
            match db.call(move |c| db::workers::registered_since(c, after)).await {
                Ok(rows) => {
                    let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                    for (row, cid) in rows {
                        last_row = last_row.max(row);
                        match st.waiting.remove(&cid) {
                            Some(tx) => {
                                let _ = tx.send(row);
                            }
                            None => {
                                st.seen.insert(cid, row);
                            }
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
