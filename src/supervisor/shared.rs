//! What the parts of a running supervisor share.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::config::Config;

/// The config in force (replaced by a reload).
pub type SharedConfig = Arc<RwLock<Arc<Config>>>;

/// Locks `m`; a lock poisoned by a panicking task is taken all the same
/// (what it guards is plain data, consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
