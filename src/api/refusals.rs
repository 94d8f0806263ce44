//! Failed authentications per peer: every refusal (401, 403) is logged
//! with the peer's address; a peer that fails more than [`BUDGET`] times
//! within [`WINDOW`] gets 429 for every request without a valid token
//! until the window has passed, and its further refusals are not logged one
//! by one. Valid tokens always pass: workers behind one address (a node)
//! are never locked out by another's guessing. Tokens are 32 random bytes,
//! so the budget is about noise and logs, not about the odds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Refusals a peer may earn within [`WINDOW`] before it gets 429.
pub const BUDGET: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);

/// The peer of a connection, set by the listener on each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub std::net::SocketAddr);

/// What a refusal means for its peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused as asked (401/403), and logged.
    Refuse,
    /// Refused and logged for the last time: from now on the peer gets
    /// 429 until its window has passed.
    LastWarning,
    /// Over the budget: 429 without looking at the request.
    TooMany,
}

/// Refusals per peer address: when its window began, and how many since.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>);

impl Refusals {
    /// Whether `peer` is over its budget at `now`.
    pub fn over_budget(&self, peer: IpAddr, now: Instant) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&peer)
            .is_some_and(|(since, n)| now.duration_since(*since) < WINDOW && *n >= BUDGET)
    }

    /// Counts a refusal of `peer` at `now`; says what it means.
    pub fn record(&self, peer: IpAddr, now: Instant) -> Verdict {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Forget peers whose window passed (the map stays small).
        map.retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
        let (_, n) = map.entry(peer).or_insert((now, 0));
        *n += 1;
        match *n {
            n if n < BUDGET => Verdict::Refuse,
            n if n == BUDGET => Verdict::LastWarning,
            _ => Verdict::TooMany,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_peer_over_its_budget_gets_429_until_its_window_passes() {
        let r = Refusals::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 1..BUDGET {
            assert_eq!(r.record(a, t0), Verdict::Refuse, "refusal {i}");
            assert!(!r.over_budget(a, t0));
        }
        assert_eq!(r.record(a, t0), Verdict::LastWarning, "the last one logged says so");
        assert!(r.over_budget(a, t0));
        assert_eq!(r.record(a, t0), Verdict::TooMany);
        assert!(!r.over_budget(b, t0), "another peer is not affected");
        assert_eq!(r.record(b, t0), Verdict::Refuse);
        let later = t0 + WINDOW;
        assert!(!r.over_budget(a, later), "a new window");
        assert_eq!(r.record(a, later), Verdict::Refuse);
    }
}
