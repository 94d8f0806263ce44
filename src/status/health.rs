//! The health verdict of a pool (what `stats --check` exits with): a pure
//! rule over the supervisor, the slots and the run's jobs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{PoolStats, SupervisorStats};
use crate::contract::exit;
use crate::vocab::SupervisorState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Down,
}

impl HealthStatus {
    /// The exit code of `stats --check`.
    pub fn exit_code(self) -> i32 {
        match self {
            HealthStatus::Healthy => exit::OK,
            HealthStatus::Degraded => exit::FAILURE,
            HealthStatus::Down => exit::USAGE,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: HealthStatus,
    pub reasons: Vec<String>,
}

/// `1 job`, `2 jobs`: a count with its noun.
pub fn plural(n: impl Into<i64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The jobs that finished within the health window, and the rule they are
/// judged by (`health_window`, `health_failure_rate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recent {
    pub window_secs: i64,
    pub completed: i64,
    pub failed: i64,
    /// Degraded when more than this fraction of them failed.
    pub failure_rate: f64,
}

impl Recent {
    /// Whether the failures of the window are over the rate.
    fn too_many_failed(&self) -> bool {
        let finished = self.completed + self.failed;
        self.failed > 0 && self.failed as f64 > self.failure_rate * finished as f64
    }
}

/// What the verdict weighs beside the supervisor: what is wrong now.
#[derive(Debug, Clone, Copy)]
pub struct Signals<'a> {
    pub pools: &'a BTreeMap<String, PoolStats>,
    /// Pending jobs of each type no worker of the running pool serves.
    pub unserved: &'a BTreeMap<String, i64>,
    pub recent: Recent,
}

/// Down without a running supervisor or while it stops. Degraded, with a
/// reason each, while something is wrong now: the pool is starting, slots
/// are given up or wait to restart, wanted workers have no slot at work,
/// pending jobs have a type no worker serves, or more than the failure
/// rate of the jobs that finished within the window failed (a failure
/// longer ago does not count). Healthy otherwise.
pub fn verdict(sup: &SupervisorStats, s: Signals) -> Health {
    let down = |reason: &str| Health {
        status: HealthStatus::Down,
        reasons: vec![reason.to_string()],
    };
    if !sup.running {
        return down(if sup.stopped_uncleanly {
            "the supervisor ended without stopping its pool"
        } else {
            "no supervisor is running"
        });
    }
    let mut reasons = Vec::new();
    match sup.state {
        Some(SupervisorState::Stopping | SupervisorState::Stopped) => return down("the pool is stopping"),
        Some(SupervisorState::Starting) | None => reasons.push("the pool is starting".to_string()),
        Some(SupervisorState::Running) => {}
    }
    for (ty, p) in s.pools {
        reasons.extend(slot_reasons(ty, p));
    }
    for (ty, n) in s.unserved {
        reasons.push(format!(
            "{} of type `{ty}`, which no worker of the pool serves",
            plural(*n, "pending job", "pending jobs")
        ));
    }
    let r = s.recent;
    if r.too_many_failed() {
        reasons.push(format!(
            "{} of {} that finished in the last {} failed (more than {}%: health_failure_rate)",
            r.failed,
            plural(r.completed + r.failed, "job", "jobs"),
            humantime::format_duration(std::time::Duration::from_secs(r.window_secs.max(0) as u64)),
            (r.failure_rate * 100.0).round()
        ));
    }
    let status = if reasons.is_empty() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    };
    Health { status, reasons }
}

/// What is wrong with one type's slots: given up, waiting to restart, or
/// wanted workers that no slot is running or starting.
fn slot_reasons(ty: &str, p: &PoolStats) -> Vec<String> {
    let mut reasons = Vec::new();
    if p.failed > 0 {
        reasons.push(format!("{} of `{ty}` given up", plural(p.failed, "slot", "slots")));
    }
    if p.backoff > 0 {
        reasons.push(format!(
            "{} of `{ty}` waiting to restart",
            plural(p.backoff, "slot", "slots")
        ));
    }
    let missing = p.wanted - (p.running + p.starting + p.backoff + p.failed);
    if missing > 0 {
        reasons.push(format!(
            "{} of `{ty}` missing ({} wanted, {} running)",
            plural(missing, "worker", "workers"),
            p.wanted,
            p.running
        ));
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{Mode, ModeKind};

    fn sup(running: bool, state: Option<SupervisorState>, unclean: bool) -> SupervisorStats {
        SupervisorStats {
            running,
            pid: running.then_some(1),
            state,
            stopped_uncleanly: unclean,
            ended_uncleanly_at: None,
            started_at: None,
            ready_at: None,
            stopped_at: None,
            config_path: None,
            expected_workers: 2,
        }
    }

    fn pool(failed: i64, backoff: i64) -> BTreeMap<String, PoolStats> {
        let mut p = PoolStats::new(Mode {
            kind: ModeKind::Direct,
            auto: false,
        });
        (p.failed, p.backoff, p.running) = (failed, backoff, 2 - failed - backoff);
        (p.wanted, p.slots) = (2, 2);
        BTreeMap::from([("upper".to_string(), p)])
    }

    fn recent(completed: i64, failed: i64) -> Recent {
        Recent {
            window_secs: 300,
            completed,
            failed,
            failure_rate: 0.2,
        }
    }

    #[test]
    fn the_verdict_says_what_is_wrong_now() {
        use HealthStatus::*;
        use SupervisorState::*;
        let running = sup(true, Some(Running), false);
        let nothing = BTreeMap::new();
        let typo = BTreeMap::from([("uper".to_string(), 3)]);
        let mut short = pool(0, 0);
        short.get_mut("upper").unwrap().wanted = 4;
        type Case<'a> = (
            SupervisorStats,
            BTreeMap<String, PoolStats>,
            &'a BTreeMap<String, i64>,
            Recent,
            HealthStatus,
            Vec<&'a str>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (sup(false, None, false), pool(0, 0), &nothing, recent(0, 0), Down, vec!["no supervisor is running"]),
            (sup(false, Some(Running), true), pool(0, 0), &nothing, recent(0, 0), Down, vec!["the supervisor ended without stopping its pool"]),
            (sup(true, Some(Stopping), false), pool(1, 0), &typo, recent(0, 9), Down, vec!["the pool is stopping"]),
            (sup(true, Some(Stopped), false), pool(0, 0), &nothing, recent(0, 0), Down, vec!["the pool is stopping"]),
            (sup(true, Some(Starting), false), pool(0, 0), &nothing, recent(0, 0), Degraded, vec!["the pool is starting"]),
            (sup(true, None, false), pool(0, 0), &nothing, recent(0, 0), Degraded, vec!["the pool is starting"]),
            (running.clone(), pool(0, 0), &nothing, recent(0, 0), Healthy, vec![]),
            (running.clone(), pool(1, 1), &nothing, recent(0, 0), Degraded, vec!["1 slot of `upper` given up", "1 slot of `upper` waiting to restart"]),
            (running.clone(), short, &nothing, recent(0, 0), Degraded, vec!["2 workers of `upper` missing (4 wanted, 2 running)"]),
            (running.clone(), pool(0, 0), &typo, recent(0, 0), Degraded, vec!["3 pending jobs of type `uper`, which no worker of the pool serves"]),
            // One broken notebook among many is no sign of a sick pool ...
            (running.clone(), pool(0, 0), &nothing, recent(149, 1), Healthy, vec![]),
            (running.clone(), pool(0, 0), &nothing, recent(8, 2), Healthy, vec![]),
            // ... a share of failures over the rate is; none at all never is.
            (running.clone(), pool(0, 0), &nothing, recent(7, 3), Degraded, vec!["3 of 10 jobs that finished in the last 5m failed (more than 20%: health_failure_rate)"]),
            (running.clone(), pool(0, 0), &nothing, recent(0, 1), Degraded, vec!["1 of 1 job that finished in the last 5m failed (more than 20%: health_failure_rate)"]),
            (running.clone(), pool(0, 0), &nothing, recent(0, 0), Healthy, vec![]),
        ];
        for (sup, pools, unserved, recent, status, reasons) in cases {
            let h = verdict(
                &sup,
                Signals {
                    pools: &pools,
                    unserved,
                    recent,
                },
            );
            assert_eq!(
                (h.status, h.reasons.iter().map(String::as_str).collect::<Vec<_>>()),
                (status, reasons)
            );
        }
    }

    #[test]
    fn check_exits_0_1_2() {
        assert_eq!(
            [HealthStatus::Healthy, HealthStatus::Degraded, HealthStatus::Down].map(HealthStatus::exit_code),
            [0, 1, 2]
        );
    }
}
