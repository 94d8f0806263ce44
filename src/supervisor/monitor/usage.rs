//! CPU and memory figures of workers: samples turned into CPU % and MiB,
//! written only when they moved, so an idle pool's rows are not rewritten.

use std::collections::HashMap;

use super::rules::{Sample, cpu_percent};
use crate::vocab::WorkerRow;

/// Figures are rewritten only when they moved this much.
const CPU_STEP: f64 = 1.0;
const MEM_STEP_MIB: f64 = 1.0;

#[derive(Default)]
pub struct Usage {
    /// Latest sample per worker, for CPU %.
    last: HashMap<WorkerRow, Sample>,
    /// What was last written per worker: CPU %, MiB.
    written: HashMap<WorkerRow, (Option<f64>, f64)>,
}

impl Usage {
    /// Takes a sample (and the resident bytes) of a worker; returns the
    /// figures to write (CPU %, if a previous sample allows it, and MiB),
    /// or None when they did not move.
    pub fn record(&mut self, row: WorkerRow, sample: Sample, rss: u64) -> Option<(Option<f64>, f64)> {
        let cpu = self.last.insert(row, sample).map(|prev| cpu_percent(&prev, &sample));
        let mem = rss as f64 / (1024.0 * 1024.0);
        let moved = match self.written.get(&row) {
            None => true,
            Some(&(old_cpu, old_mem)) => {
                (mem - old_mem).abs() >= MEM_STEP_MIB
                    || match (cpu, old_cpu) {
                        (Some(c), Some(o)) => (c - o).abs() >= CPU_STEP,
                        // The first figure, so 0 % is shown as 0 %, not unknown.
                        (Some(_), None) => true,
                        _ => false,
                    }
            }
        };
        moved.then(|| {
            self.written.insert(row, (cpu, mem));
            (cpu, mem)
        })
    }

    /// Forgets the workers not in `live`.
    pub fn retain(&mut self, live: impl Fn(&WorkerRow) -> bool) {
        self.last.retain(|r, _| live(r));
        self.written.retain(|r, _| live(r));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn figures_are_written_when_they_move() {
        let mut u = Usage::default();
        let t0 = Instant::now();
        let at = |s: u64, cpu: f64| Sample {
            at: t0 + Duration::from_secs(s),
            cpu_seconds: cpu,
        };
        let row = WorkerRow(1);
        assert_eq!(u.record(row, at(0, 0.0), 10 << 20), Some((None, 10.0)), "first: memory");
        assert_eq!(
            u.record(row, at(30, 0.0), 10 << 20),
            Some((Some(0.0), 10.0)),
            "the first CPU figure, even 0"
        );
        assert_eq!(u.record(row, at(45, 0.0), 10 << 20), None, "nothing moved");
        assert_eq!(
            u.record(row, at(60, 3.0), 10 << 20),
            Some((Some(20.0), 10.0)),
            "3 s of CPU in 15 s: 20% of a CPU"
        );
        assert_eq!(
            u.record(row, at(75, 6.0), (10 << 20) + 4096),
            None,
            "same CPU, a page more"
        );
        u.retain(|_| false);
        assert!(
            u.record(row, at(120, 6.0), 10 << 20).is_some(),
            "forgotten, so written again"
        );
    }
}
