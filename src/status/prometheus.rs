//! The pool's picture as Prometheus gauges (OpenMetrics text,
//! prometheus-client): workers by state, slots, jobs by status, queue depth
//! and the oldest pending job's age, each live worker's CPU and memory,
//! and the resident memory of the process that renders them. A running
//! supervisor adds its counters (`supervisor::observe::metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::Status;
use crate::db::workers::WorkerLine;
use crate::vocab::SlotState;

/// A label value, escaped as the text format asks (a backslash, a double
/// quote and a line feed become `\\`, `\"` and `\n`): prometheus-client
/// writes values as they are, so a job type with a `"` in it (anyone may
/// queue one) would break the whole scrape or forge series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Text(pub String);

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(s)
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(s.to_string())
    }
}

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub worker_type: Text,
}

impl TypeLabel {
    pub fn new(worker_type: &str) -> TypeLabel {
        TypeLabel {
            worker_type: worker_type.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub worker_type: Text,
    pub cause: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    worker_type: Text,
    state: Text,
}

impl StateLabels {
    pub fn new(worker_type: &str, state: &str) -> StateLabels {
        StateLabels {
            worker_type: worker_type.into(),
            state: state.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    worker_type: Text,
    slot: Text,
    worker: Text,
}

pub type FloatGauge = Gauge<f64, AtomicU64>;

/// The exposition text: the counters (when the supervisor renders it) and
/// the gauges of the pool's picture.
pub fn render(status: &Status, counters: impl FnOnce(&mut Registry)) -> anyhow::Result<String> {
    let mut r = Registry::default();
    counters(&mut r);
    gauges(status, &mut r);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r)?;
    Ok(text)
}

fn gauges(s: &Status, r: &mut Registry) {
    let workers = Family::<StateLabels, Gauge>::default();
    for (t, by_status) in &s.workers {
        for (status, &n) in by_status {
            workers.get_or_create(&StateLabels::new(t, status)).set(n);
        }
    }
    r.register("clx_pool_workers", "Worker rows of the current run, by status", workers);
    let slots = Family::<StateLabels, Gauge>::default();
    let wanted = Family::<TypeLabel, Gauge>::default();
    for (t, p) in &s.pools {
        for &state in SlotState::ALL {
            let n = p.in_state(state);
            if n > 0 {
                slots.get_or_create(&StateLabels::new(t, state.as_str())).set(n);
            }
        }
        wanted.get_or_create(&TypeLabel::new(t)).set(p.wanted);
    }
    r.register("clx_pool_slots", "Slots of the pool, by state", slots);
    r.register("clx_pool_workers_wanted", "Workers the pool wants, per type", wanted);
    queue(s, r);
    per_worker(s.worker_list.as_deref().unwrap_or_default(), r);
    let rss = FloatGauge::default();
    let me = crate::procs::stat(std::process::id() as i32);
    rss.set(me.map(|s| s.rss_pages * crate::procs::page_size()).unwrap_or(0) as f64);
    r.register_with_unit(
        "clx_pool_supervisor_resident_memory",
        "Resident memory of the process that renders these metrics",
        Unit::Bytes,
        rss,
    );
}

/// Jobs by type and status; the queue of each type the pool serves (0 when
/// empty) and of any other type with pending jobs.
fn queue(s: &Status, r: &mut Registry) {
    let jobs = Family::<StateLabels, Gauge>::default();
    let depth = Family::<TypeLabel, Gauge>::default();
    let oldest = Family::<TypeLabel, FloatGauge>::default();
    for t in s.pools.keys() {
        drop(depth.get_or_create(&TypeLabel::new(t)));
        drop(oldest.get_or_create(&TypeLabel::new(t)));
    }
    for c in &s.queue {
        jobs.get_or_create(&StateLabels::new(&c.job_type, c.status.as_str()))
            .set(c.count);
    }
    for (t, n, age) in s.pending() {
        depth.get_or_create(&TypeLabel::new(t)).set(n);
        oldest.get_or_create(&TypeLabel::new(t)).set(age);
    }
    r.register("clx_pool_jobs", "Jobs in the database, by type and status", jobs);
    r.register("clx_pool_queue_depth", "Pending jobs, by type", depth);
    r.register_with_unit(
        "clx_pool_oldest_pending_age",
        "How long the oldest pending job of a type has waited",
        Unit::Seconds,
        oldest,
    );
}

fn per_worker(lines: &[WorkerLine], r: &mut Registry) {
    let cpu = Family::<WorkerLabels, FloatGauge>::default();
    let rss = Family::<WorkerLabels, FloatGauge>::default();
    for w in lines {
        let labels = WorkerLabels {
            worker_type: w.worker_type.clone().into(),
            slot: w.slot.map(|s| s.to_string()).unwrap_or_default().into(),
            worker: w.worker_id.to_string().into(),
        };
        if let Some(c) = w.cpu_percent {
            cpu.get_or_create(&labels).set(c / 100.0);
        }
        if let Some(m) = w.memory_mib {
            rss.get_or_create(&labels).set(m * 1024.0 * 1024.0);
        }
    }
    r.register_with_unit(
        "clx_pool_worker_cpu",
        "CPU of each live worker (process tree or container), in cores",
        Unit::Ratios,
        cpu,
    );
    r.register_with_unit(
        "clx_pool_worker_resident_memory",
        "Resident memory of each live worker (process tree or container)",
        Unit::Bytes,
        rss,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_asks() {
        let family = Family::<TypeLabel, Gauge>::default();
        for name in ["plain", "a\"b", "c\\d", "e\nf", "ü✓ {x=\"y\"} 1"] {
            family
                .get_or_create(&TypeLabel {
                    worker_type: name.into(),
                })
                .set(1);
        }
        let mut r = Registry::default();
        r.register("t", "test", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for want in [
            r#"t{worker_type="plain"} 1"#,
            r#"t{worker_type="a\"b"} 1"#,
            r#"t{worker_type="c\\d"} 1"#,
            r#"t{worker_type="e\nf"} 1"#,
            r#"t{worker_type="ü✓ {x=\"y\"} 1"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == want), "{want}\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("t{")).count(), 5, "{text}");
    }
}
