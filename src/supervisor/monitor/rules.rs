//! When a worker is hung, as a pure rule with table tests (Horust's
//! `Check`): an idle worker that showed no sign of life (its heartbeat
//! unchanged) for longer than its type's `heartbeat_timeout`; a busy one whose job has run longer than
//! `max_job_time`; optionally a busy one that used less than
//! `hung_cpu_percent` of one CPU over a `hung_cpu_window`.

use std::time::Duration;

use crate::config::HungCpu;
pub use crate::procs::{Sample, cpu_percent};
use crate::vocab::{HungReason, WorkerStatus};

/// `last_heartbeat` is written in whole seconds: a worker that heartbeats
/// more often than once a second shows a change at most once a second.
pub const HEARTBEAT_RESOLUTION: Duration = Duration::from_secs(1);

/// A worker's type's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub heartbeat_timeout: Duration,
    pub max_job_time: Duration,
    pub hung_cpu: Option<HungCpu>,
}

/// What the monitor saw of a worker, its ages measured on the monotonic
/// clock (see `liveness.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub status: WorkerStatus,
    /// How long no sign of life was seen (its heartbeat, status or job
    /// unchanged).
    pub heartbeat_age: Duration,
    /// The job in hand and how long it has run.
    pub job: Option<(i64, Duration)>,
}

/// Whether the worker is hung, and why. `cpu` is its CPU use over the
/// whole window of the zero-CPU rule (from the window's start to now),
/// when a full window has passed.
pub fn verdict(seen: &Seen, limits: &Limits, cpu: Option<(Sample, Sample)>) -> Option<HungReason> {
    match seen.job {
        Some((job, ran)) if ran > limits.max_job_time => Some(HungReason::JobTooLong {
            job,
            ran,
            limit: limits.max_job_time,
        }),
        Some((job, _)) => {
            let rule = limits.hung_cpu?;
            let (from, to) = cpu?;
            let window = to.at.duration_since(from.at);
            let percent = cpu_percent(&from, &to);
            (window >= rule.window && percent < rule.percent).then(|| HungReason::NoCpu {
                job,
                percent,
                window: Duration::from_secs(window.as_secs()),
                threshold: rule.percent,
            })
        }
        None if seen.status == WorkerStatus::Idle
            && seen.heartbeat_age > limits.heartbeat_timeout + HEARTBEAT_RESOLUTION =>
        {
            Some(HungReason::Heartbeat {
                age: seen.heartbeat_age,
                limit: limits.heartbeat_timeout,
            })
        }
        None => None,
    }
}

/// Why a worker should be replaced after its current job, if it should:
/// it did `max_jobs` jobs, or its memory passed `max_memory`.
pub fn recycle(jobs_done: i64, rss: Option<u64>, max_jobs: Option<u32>, max_memory: Option<u64>) -> Option<String> {
    if let Some(n) = max_jobs
        && jobs_done >= i64::from(n)
    {
        return Some(format!("{jobs_done} jobs done (max_jobs = {n})"));
    }
    match (rss, max_memory) {
        (Some(r), Some(m)) if r >= m => Some(format!(
            "memory {} over max_memory = {}",
            crate::config::format_size(r),
            crate::config::format_size(m)
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rules() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let limits = Limits {
            heartbeat_timeout: s(30),
            max_job_time: s(600),
            hung_cpu: Some(HungCpu {
                window: s(60),
                percent: 1.0,
            }),
        };
        let idle = |age| Seen {
            status: WorkerStatus::Idle,
            heartbeat_age: s(age),
            job: None,
        };
        let busy = |ran| Seen {
            status: WorkerStatus::Busy,
            heartbeat_age: s(999),
            job: Some((7, s(ran))),
        };
        let span = |secs: u64, cpu: f64| {
            Some((
                Sample {
                    at: t0,
                    cpu_seconds: 10.0,
                },
                Sample {
                    at: t0 + s(secs),
                    cpu_seconds: 10.0 + cpu,
                },
            ))
        };
        type Case<'a> = (&'a str, Seen, Option<(Sample, Sample)>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("fresh idle", idle(29), None, None),
            ("idle at the limit", idle(30), None, None),
            ("idle within the timestamps' resolution", idle(31), None, None),
            (
                "idle past the limit",
                idle(32),
                None,
                Some("its heartbeat is 32s old, older than heartbeat_timeout 30s"),
            ),
            ("a busy worker's old heartbeat is fine", busy(10), None, None),
            ("job at the limit", busy(600), None, None),
            (
                "job past the limit",
                busy(601),
                None,
                Some("job 7 has run for 10m 1s, longer than max_job_time 10m"),
            ),
            ("busy, no full window yet", busy(10), span(30, 0.0), None),
            (
                "busy, idle CPU over the window",
                busy(100),
                span(60, 0.3),
                Some("job 7 used 0.5% CPU over 1m (hung_cpu_percent 1)"),
            ),
            ("busy, working", busy(100), span(60, 6.0), None),
        ];
        for (name, seen, cpu, want) in cases {
            let got = verdict(&seen, &limits, cpu).map(|r| r.to_string());
            assert_eq!(got.as_deref(), want, "{name}");
        }
        // Without the zero-CPU rule, CPU use never matters.
        let no_rule = Limits {
            hung_cpu: None,
            ..limits
        };
        assert_eq!(verdict(&busy(100), &no_rule, span(60, 0.0)), None);
        // A hung (or dead) row's old heartbeat is not judged again.
        let hung = Seen {
            status: WorkerStatus::Hung,
            ..idle(100)
        };
        assert_eq!(verdict(&hung, &limits, None), None);
    }

    #[test]
    fn recycling_after_max_jobs_or_past_max_memory() {
        let mib = 1024 * 1024;
        for (done, rss, jobs, mem, want) in [
            (2, None, Some(3), None, None),
            (3, None, Some(3), None, Some("3 jobs done (max_jobs = 3)")),
            (
                0,
                Some(100 * mib),
                None,
                Some(64 * mib),
                Some("memory 100m over max_memory = 64m"),
            ),
            (0, Some(10 * mib), None, Some(64 * mib), None),
            (9, Some(10 * mib), None, None, None),
        ] {
            assert_eq!(
                recycle(done, rss, jobs, mem).as_deref(),
                want,
                "{done} {rss:?} {jobs:?} {mem:?}"
            );
        }
    }
}
