//! How long a worker has shown no sign of life, and how long its job has
//! run, measured on the supervisor's monotonic clock, never by comparing
//! wall-clock timestamps: a step of the real-time clock (NTP, a laptop
//! resuming) moves every timestamp in the database at once and would make
//! every idle worker look hung, or hide a hung one for as long as the step.
//!
//! A sign of life is any change the monitor observes in a worker's row: its
//! heartbeat, its status, its job, its count of jobs done. The timestamps
//! are compared only with their own earlier values.
//!
//! Time during which the database could not be written (a long write lock
//! held by another program, the supervisor's own reads failing) is no
//! evidence against anyone: no worker could have written a heartbeat or a
//! result then. The clock of this module, the *credible* clock, stands
//! still over every interval that does not lie between two healthy ticks.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::vocab::WorkerRow;

/// What a worker's row looked like: any change is a sign of life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sign {
    pub heartbeat: Option<String>,
    pub status: String,
    pub jobs_done: i64,
}

/// A job in hand: its id and attempt.
pub type JobAttempt = (i64, i64);

/// A worker's ages on the credible clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ages {
    /// Since its last observed sign of life.
    pub quiet: Duration,
    /// Since its current job was first seen, if it has one.
    pub job: Option<Duration>,
}

#[derive(Debug)]
struct Watched {
    sign: Sign,
    alive_at: Duration,
    job: Option<(JobAttempt, Duration)>,
}

#[derive(Debug, Default)]
pub struct Liveness {
    /// Credible time since the monitor started.
    credible: Duration,
    last_tick: Option<(Instant, bool)>,
    watched: HashMap<WorkerRow, Watched>,
}

impl Liveness {
    /// A monitor tick at `at`: `healthy` when the database could be read
    /// and written at that moment. The clock advances by the time since
    /// the previous tick only when both ends of it were healthy.
    pub fn tick(&mut self, at: Instant, healthy: bool) {
        if let Some((last, last_healthy)) = self.last_tick
            && last_healthy
            && healthy
        {
            self.credible += at.saturating_duration_since(last);
        }
        self.last_tick = Some((at, healthy));
    }

    /// Whether the last tick was healthy (an unhealthy one judges nobody).
    pub fn healthy(&self) -> bool {
        self.last_tick.is_some_and(|(_, h)| h)
    }

    /// Records what the worker of `row` looks like now; returns its ages.
    pub fn observe(&mut self, row: WorkerRow, sign: Sign, job: Option<JobAttempt>) -> Ages {
        let now = self.credible;
        let w = self.watched.entry(row).or_insert_with(|| Watched {
            sign: sign.clone(),
            alive_at: now,
            job: None,
        });
        if w.sign != sign {
            w.sign = sign;
            w.alive_at = now;
        }
        match (job, w.job) {
            (Some(j), Some((seen, _))) if j == seen => {}
            (Some(j), _) => {
                w.job = Some((j, now));
                w.alive_at = now;
            }
            (None, _) => w.job = None,
        }
        Ages {
            quiet: now - w.alive_at,
            job: w.job.map(|(_, since)| now - since),
        }
    }

    /// Forgets workers that are no longer observed.
    pub fn retain(&mut self, live: impl Fn(&WorkerRow) -> bool) {
        self.watched.retain(|r, _| live(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(hb: &str, status: &str) -> Sign {
        Sign {
            heartbeat: Some(hb.into()),
            status: status.into(),
            jobs_done: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_time_counts_only_between_healthy_ticks() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::default();
        let row = WorkerRow(1);
        // (second, healthy, heartbeat, job, want quiet, want job age)
        type Step<'a> = (u64, bool, &'a str, Option<JobAttempt>, u64, Option<u64>);
        let steps: Vec<Step> = vec![
            (0, true, "12:00:00", None, 0, None),
            (2, true, "12:00:00", None, 2, None),
            (4, true, "12:00:04", None, 0, None),
            (10, true, "12:00:04", None, 6, None),
            // The database is locked from 10 s to 40 s: no worker can
            // write, and that time counts for nothing.
            (12, false, "12:00:04", None, 6, None),
            (40, false, "12:00:04", None, 6, None),
            (42, true, "12:00:04", None, 6, None),
            (44, true, "12:00:04", None, 8, None),
            // The real-time clock steps an hour back: the heartbeat's text
            // changes, which is all that counts.
            (46, true, "11:00:46", None, 0, None),
            // A job: its age starts when it is first seen.
            (48, true, "11:00:46", Some((7, 1)), 0, Some(0)),
            (50, true, "11:00:46", Some((7, 1)), 2, Some(2)),
            (52, false, "11:00:46", Some((7, 1)), 2, Some(2)),
            (54, true, "11:00:46", Some((7, 1)), 2, Some(2)),
            (56, true, "11:00:46", Some((7, 1)), 4, Some(4)),
            // Its next attempt is a new job.
            (58, true, "11:00:46", Some((7, 2)), 0, Some(0)),
        ];
        for (at, healthy, hb, job, quiet, job_age) in steps {
            l.tick(t0 + s(at), healthy);
            let status = if job.is_some() { "busy" } else { "idle" };
            let ages = l.observe(row, sign(hb, status), job);
            assert_eq!(
                (ages.quiet, ages.job),
                (s(quiet), job_age.map(s)),
                "at {at} s (healthy {healthy})"
            );
            assert_eq!(l.healthy(), healthy);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn any_change_of_the_row_is_a_sign_of_life_and_new_workers_start_fresh() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.tick(t0, true);
        l.observe(WorkerRow(1), sign("a", "idle"), None);
        l.tick(t0 + Duration::from_secs(20), true);
        let mut done = sign("a", "idle");
        done.jobs_done = 1;
        assert_eq!(l.observe(WorkerRow(1), done, None).quiet, Duration::ZERO);
        assert_eq!(l.observe(WorkerRow(2), sign("a", "idle"), None).quiet, Duration::ZERO);
        l.retain(|r| *r == WorkerRow(2));
        l.tick(t0 + Duration::from_secs(25), true);
        assert_eq!(
            l.observe(WorkerRow(1), sign("a", "idle"), None).quiet,
            Duration::ZERO,
            "forgotten, then seen anew"
        );
        assert_eq!(
            l.observe(WorkerRow(2), sign("a", "idle"), None).quiet,
            Duration::from_secs(5)
        );
    }
}
