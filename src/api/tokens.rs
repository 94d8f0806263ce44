//! Tokens of single workers (swarm workers on other hosts): each bound to
//! one worker row, minted when its worker is launched and revoked the
//! moment its end is seen, before its row is ended and its jobs go back,
//! so a replica that lives on (on a partitioned node) is refused (401). A
//! request with such a token that names another worker's row is refused
//! (403). Kept only in memory, hashed: a new supervisor replaces every
//! worker, and so mints fresh tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::vocab::WorkerRow;

/// The live tokens of single workers: sha256(token) → row.
#[derive(Clone, Default)]
pub struct WorkerTokens(Arc<Mutex<HashMap<[u8; 32], WorkerRow>>>);

impl WorkerTokens {
    /// A new token for the worker of `row` (32 random bytes, hex).
    pub fn mint(&self, row: WorkerRow) -> anyhow::Result<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a worker's API token: {e}"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.lock().insert(digest(&token), row);
        Ok(token)
    }

    /// Revokes every token of `row`.
    pub fn revoke(&self, row: WorkerRow) {
        self.lock().retain(|_, r| *r != row);
    }

    /// The row a live token belongs to.
    pub fn row_of(&self, token: &str) -> Option<WorkerRow> {
        self.lock().get(&digest(token)).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], WorkerRow>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for WorkerTokens {
    /// How many are live, never which.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerTokens({} live)", self.lock().len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A holder of the pool's token (containers on this machine, workers
    /// run by hand with `api_token_file`).
    Pool,
    /// The one worker whose row the token is bound to.
    Worker(WorkerRow),
}

impl Caller {
    /// A request that names `row` must come from that row's worker (or
    /// from a holder of the pool's token).
    pub fn may_act_for(self, row: WorkerRow) -> Result<(), NotYours> {
        match self {
            Caller::Worker(own) if own != row => Err(NotYours { own, named: row }),
            _ => Ok(()),
        }
    }
}

/// A worker's own token naming another worker's row (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this token belongs to worker {own}, not to worker {named}")]
pub struct NotYours {
    pub own: WorkerRow,
    pub named: WorkerRow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_row_until_it_is_revoked() {
        let tokens = WorkerTokens::default();
        let (a, b) = (tokens.mint(WorkerRow(1)).unwrap(), tokens.mint(WorkerRow(2)).unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(tokens.row_of(&a), Some(WorkerRow(1)));
        assert_eq!(tokens.row_of(&b), Some(WorkerRow(2)));
        assert_eq!(tokens.row_of("guess"), None);
        tokens.revoke(WorkerRow(1));
        assert_eq!(tokens.row_of(&a), None);
        assert_eq!(tokens.row_of(&b), Some(WorkerRow(2)));
        assert!(Caller::Worker(WorkerRow(2)).may_act_for(WorkerRow(2)).is_ok());
        assert!(Caller::Worker(WorkerRow(2)).may_act_for(WorkerRow(1)).is_err());
        assert!(Caller::Pool.may_act_for(WorkerRow(1)).is_ok());
    }
}
