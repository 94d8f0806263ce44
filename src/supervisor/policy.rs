//! When a slot's worker is replaced: at once after a healthy run, then with
//! exponential backoff for repeated failures, and not at all once the slot
//! has failed `burst_limit` times within `burst_window` (systemd's
//! StartLimitBurst / StartLimitIntervalSec) — unless the failures came from
//! outside the worker (a full disk, a locked database, an engine error):
//! those only pause the slot for `cooldown`, since they go away by
//! themselves. Pure logic, no timers.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RestartConfig;

/// The longest backoff of a slot in a CLM pool: a `clm build` that finds
/// no live worker waits up to 30 s for a pre-registered one to activate,
/// then declares it dead; the slot's next worker must come well before.
pub const CLM_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The restart settings of a slot under `protocol` (backoff capped for CLM).
pub fn for_protocol(mut cfg: RestartConfig, protocol: crate::vocab::Protocol) -> RestartConfig {
    if protocol == crate::vocab::Protocol::Clm {
        cfg.backoff_max = cfg.backoff_max.min(CLM_BACKOFF_MAX);
    }
    cfg
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a replacement after this delay (zero: at once).
    RestartAfter(Duration),
    /// Too many failures in the window: leave the slot empty.
    GiveUp,
    /// Too many failures in the window, from outside the worker: try again
    /// after this pause, with a fresh count.
    CoolDown(Duration),
}

pub struct RestartPolicy {
    cfg: RestartConfig,
    /// Failures since the slot last ran healthy.
    consecutive: u32,
    recent: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(cfg: RestartConfig) -> Self {
        RestartPolicy {
            cfg,
            consecutive: 0,
            recent: VecDeque::new(),
        }
    }

    /// A worker of this slot failed at `now` after running for `ran_for`;
    /// `outside` says the cause lay outside the worker.
    pub fn on_failure(&mut self, now: Instant, ran_for: Duration, outside: bool) -> Decision {
        if ran_for >= self.cfg.healthy_after {
            self.consecutive = 0;
        }
        self.recent.push_back(now);
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) > self.cfg.burst_window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() as u32 >= self.cfg.burst_limit {
            if outside {
                self.recent.clear();
                self.consecutive = 0;
                return Decision::CoolDown(self.cfg.cooldown);
            }
            return Decision::GiveUp;
        }
        self.consecutive += 1;
        if self.consecutive == 1 {
            return Decision::RestartAfter(Duration::ZERO);
        }
        let factor = 1u32.checked_shl(self.consecutive - 2).unwrap_or(u32::MAX);
        let delay = self.cfg.backoff_initial.saturating_mul(factor);
        Decision::RestartAfter(delay.min(self.cfg.backoff_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RestartConfig {
        RestartConfig {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(10),
            burst_limit: 5,
            burst_window: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn first_failure_restarts_at_once_then_backs_off_to_the_cap() {
        let mut p = RestartPolicy::new(RestartConfig {
            burst_limit: 100,
            ..cfg()
        });
        let t0 = Instant::now();
        let delays: Vec<_> = (0..10)
            .map(
                |i| match p.on_failure(t0 + Duration::from_secs(100 * i), Duration::from_millis(1), false) {
                    Decision::RestartAfter(d) => d.as_millis(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(delays, vec![0, 500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
    }

    #[test]
    fn healthy_run_resets_backoff() {
        let mut p = RestartPolicy::new(cfg());
        let t0 = Instant::now();
        p.on_failure(t0, Duration::ZERO, false);
        assert_eq!(
            p.on_failure(t0 + Duration::from_secs(20), Duration::ZERO, false),
            Decision::RestartAfter(Duration::from_millis(500))
        );
        assert_eq!(
            p.on_failure(t0 + Duration::from_secs(60), Duration::from_secs(30), false),
            Decision::RestartAfter(Duration::ZERO)
        );
    }

    #[test]
    fn burst_in_window_gives_up() {
        let mut p = RestartPolicy::new(cfg());
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(matches!(
                p.on_failure(t0 + Duration::from_secs(i), Duration::ZERO, false),
                Decision::RestartAfter(_)
            ));
        }
        assert_eq!(
            p.on_failure(t0 + Duration::from_secs(4), Duration::ZERO, false),
            Decision::GiveUp
        );
    }

    #[test]
    fn failures_spread_beyond_the_window_never_give_up() {
        let mut p = RestartPolicy::new(cfg());
        let t0 = Instant::now();
        for i in 0..50 {
            assert!(matches!(
                p.on_failure(t0 + Duration::from_secs(3 * i), Duration::ZERO, false),
                Decision::RestartAfter(_)
            ));
        }
    }

    #[test]
    fn failures_outside_the_worker_cool_down_instead_of_giving_up() {
        let mut p = RestartPolicy::new(cfg());
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(matches!(
                p.on_failure(t0 + Duration::from_secs(i), Duration::ZERO, true),
                Decision::RestartAfter(_)
            ));
        }
        assert_eq!(
            p.on_failure(t0 + Duration::from_secs(4), Duration::ZERO, true),
            Decision::CoolDown(Duration::from_secs(60))
        );
        // A fresh count afterwards: the next failure restarts at once.
        assert_eq!(
            p.on_failure(t0 + Duration::from_secs(65), Duration::ZERO, true),
            Decision::RestartAfter(Duration::ZERO)
        );
    }
}
