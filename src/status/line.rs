//! systemd's STATUS line (`systemctl status`), from the pool's summary.

use super::Summary;

/// The one-line STATUS systemd shows (`systemctl status`): the workers, the
/// queue, and what this run has done.
pub fn status_line(s: &Summary) -> String {
    let j = &s.jobs;
    let mut line = format!("{}/{} workers running", s.running, s.slots);
    if s.waiting > 0 {
        line += &format!(", {} waiting", s.waiting);
    }
    line += &match (j.pending, j.processing) {
        (0, 0) => " · queue empty".to_string(),
        (p, b) => format!(" · {p} pending, {b} processing"),
    };
    line += &format!(" · this run: {} completed, {} failed", j.completed, j.failed);
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::jobs::JobCounts;

    #[test]
    fn the_status_line_says_what_an_operator_asks_first() {
        let s = |running, slots, waiting, pending, processing, completed, failed| Summary {
            running,
            slots,
            waiting,
            jobs: JobCounts {
                pending,
                processing,
                completed,
                failed,
                cancelled: 0,
            },
        };
        for (summary, line) in [
            (
                s(2, 2, 0, 0, 0, 0, 0),
                "2/2 workers running · queue empty · this run: 0 completed, 0 failed",
            ),
            (
                s(3, 4, 1, 12, 3, 40, 1),
                "3/4 workers running, 1 waiting · 12 pending, 3 processing · this run: 40 completed, 1 failed",
            ),
            (
                s(0, 1, 1, 0, 1, 0, 0),
                "0/1 workers running, 1 waiting · 0 pending, 1 processing · this run: 0 completed, 0 failed",
            ),
        ] {
            assert_eq!(status_line(&summary), line);
        }
    }
}
