//! The health verdict of a pool (what `stats --check` exits with): a pure
//! rule over the supervisor, the slots and the run's jobs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{PoolStats, SupervisorStats};
use crate::contract::exit;
use crate::db::jobs::JobCounts;
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

fn plural(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Down without a running supervisor or while it stops; degraded while it
/// starts, while slots wait or are given up, or after a job failed in this
/// run; healthy otherwise.
pub fn verdict(sup: &SupervisorStats, pools: &BTreeMap<String, PoolStats>, jobs: &JobCounts) -> Health {
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
    for (ty, p) in pools {
        if p.failed > 0 {
            reasons.push(format!("{} of `{ty}` given up", plural(p.failed, "slot", "slots")));
        }
        if p.backoff > 0 {
            reasons.push(format!(
                "{} of `{ty}` waiting to restart",
                plural(p.backoff, "slot", "slots")
            ));
        }
    }
    if jobs.failed > 0 {
        reasons.push(format!("{} failed in this run", plural(jobs.failed, "job", "jobs")));
    }
    let status = if reasons.is_empty() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    };
    Health { status, reasons }
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
        BTreeMap::from([("upper".to_string(), p)])
    }

    #[test]
    fn the_verdict_follows_the_supervisor_the_slots_and_failed_jobs() {
        use HealthStatus::*;
        use SupervisorState::*;
        let failed_job = JobCounts {
            failed: 1,
            ..JobCounts::default()
        };
        let none = JobCounts::default();
        for (sup, pools, jobs, status, reasons) in [
            (
                sup(false, None, false),
                pool(0, 0),
                &none,
                Down,
                vec!["no supervisor is running"],
            ),
            (
                sup(false, Some(Running), true),
                pool(0, 0),
                &none,
                Down,
                vec!["the supervisor ended without stopping its pool"],
            ),
            (
                sup(true, Some(Stopping), false),
                pool(1, 0),
                &failed_job,
                Down,
                vec!["the pool is stopping"],
            ),
            (
                sup(true, Some(Stopped), false),
                pool(0, 0),
                &none,
                Down,
                vec!["the pool is stopping"],
            ),
            (
                sup(true, Some(Starting), false),
                pool(0, 0),
                &none,
                Degraded,
                vec!["the pool is starting"],
            ),
            (
                sup(true, None, false),
                pool(0, 0),
                &none,
                Degraded,
                vec!["the pool is starting"],
            ),
            (sup(true, Some(Running), false), pool(0, 0), &none, Healthy, vec![]),
            (
                sup(true, Some(Running), false),
                pool(1, 1),
                &none,
                Degraded,
                vec!["1 slot of `upper` given up", "1 slot of `upper` waiting to restart"],
            ),
            (
                sup(true, Some(Running), false),
                pool(2, 0),
                &failed_job,
                Degraded,
                vec!["2 slots of `upper` given up", "1 job failed in this run"],
            ),
        ] {
            let h = verdict(&sup, &pools, jobs);
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
