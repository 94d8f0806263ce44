//! Prometheus metrics (OpenMetrics text, prometheus-client): counters the
//! supervisor keeps while it runs (worker ends by cause, restarts, a
//! job-duration histogram) and gauges read from the database at each
//! scrape (workers by state, slots, jobs by status, queue depth and the
//! oldest pending job's age, each worker's CPU and memory, the
//! supervisor's memory). Served on `[pool] metrics_listen` at `/metrics`;
//! `clx-pool stats --prometheus` prints the same text (asked of the
//! supervisor over its control socket, or the gauges alone when none runs).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::db::{self, pool::WorkerLine};
use crate::status::{self, Detail, Liveness, Status};
use crate::vocab::{EndEvent, SlotState};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

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
    fn new(worker_type: &str) -> TypeLabel {
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
struct StateLabels {
    worker_type: Text,
    state: Text,
}

impl StateLabels {
    fn new(worker_type: &str, state: &str) -> StateLabels {
        StateLabels {
            worker_type: worker_type.into(),
            state: state.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker_type: Text,
    slot: Text,
    worker: Text,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn job_buckets() -> Histogram {
    // Claim and completion times are the database's, in whole seconds.
    Histogram::new([
        0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

/// What the supervisor counts as it runs.
#[derive(Clone)]
pub struct Metrics {
    ends: Family<EndLabels, Counter>,
    restarts: Family<TypeLabel, Counter>,
    job_seconds: Family<TypeLabel, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ends: Family::default(),
            restarts: Family::default(),
            job_seconds: Family::new_with_constructor(job_buckets),
        }
    }
}

impl Metrics {
    /// Counters for the given worker types, each series present from the
    /// start at 0 (so `rate()` and `increase()` see the first restart).
    pub fn for_types<'a>(types: impl IntoIterator<Item = &'a str>) -> Metrics {
        let m = Metrics::default();
        for t in types {
            let label = TypeLabel {
                worker_type: t.to_string().into(),
            };
            drop(m.restarts.get_or_create(&label));
            drop(m.job_seconds.get_or_create(&label));
        }
        m
    }

    /// A worker's time in a slot ended (`restart`: it is replaced after a
    /// failure).
    pub fn worker_ended(&self, worker_type: &str, event: EndEvent, restart: bool) {
        self.ends
            .get_or_create(&EndLabels {
                worker_type: worker_type.to_string().into(),
                cause: event.to_string().into(),
            })
            .inc();
        if restart {
            self.restarts
                .get_or_create(&TypeLabel {
                    worker_type: worker_type.to_string().into(),
                })
                .inc();
        }
    }

    pub fn job_finished(&self, worker_type: &str, seconds: f64) {
        self.job_seconds
            .get_or_create(&TypeLabel {
                worker_type: worker_type.to_string().into(),
            })
            .observe(seconds);
    }
}

/// The exposition text: the counters (when the supervisor renders it) and
/// the gauges of the pool's picture.
pub fn render(status: &Status, counters: Option<&Metrics>) -> anyhow::Result<String> {
    let mut r = Registry::default();
    if let Some(m) = counters {
        m.register(&mut r);
    }
    gauges(status, &mut r);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r)?;
    Ok(text)
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "clx_pool_worker_ends",
            "Workers that ended, by cause (died, hung, no-register, spawn-failed, stopped, replaced, recycled, retired)",
            self.ends.clone(),
        );
        r.register(
            "clx_pool_restarts",
            "Workers replaced after a failure",
            self.restarts.clone(),
        );
        r.register_with_unit(
            "clx_pool_job_duration",
            "How long completed jobs ran, from claim to completion (the database's clock: whole seconds)",
            Unit::Seconds,
            self.job_seconds.clone(),
        );
        let dropped = Counter::<u64>::default();
        dropped.inc_by(crate::stderr::dropped());
        r.register(
            "clx_pool_log_lines_dropped",
            "Lines the supervisor could not write to its stderr (a closed terminal or pipe)",
            dropped,
        );
    }
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

/// The exposition text of the running supervisor (its counters and the
/// database's gauges), as `/metrics` and the control request `metrics`
/// answer.
pub async fn scrape(db: &db::Db, metrics: &Arc<Metrics>) -> anyhow::Result<String> {
    let (protocol, path) = (db.protocol(), db.path().to_path_buf());
    let status = db
        .call(move |c| {
            let live = Liveness::this_process();
            status::build(c, protocol, &path, live, Detail::GAUGES)
        })
        .await?;
    render(&status, Some(metrics))
}

/// Binds `metrics_listen` (before any worker starts, so a taken port
/// stops `start` with nothing to undo).
pub async fn listen(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("[pool] metrics_listen = \"{addr}\": cannot listen there"))
}

/// Serves `/metrics` on `listener` until `token` is cancelled.
pub fn serve(
    listener: tokio::net::TcpListener,
    db: db::Db,
    metrics: Arc<Metrics>,
    token: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    use axum::http::header;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (db, metrics) = (db.clone(), metrics.clone());
            async move {
                match scrape(&db, &metrics).await {
                    Ok(text) => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
                }
            }
        }),
    );
    tokio::spawn(crate::listen::serve(listener, LIMITS, token, "/metrics", move |io| {
        crate::listen::http(io, app.clone(), LIMITS)
    }));
    Ok(bound)
}

/// What one client of `/metrics` gets: a scraper needs one connection, a
/// few seconds for its request and a few for the answer.
const LIMITS: crate::listen::Limits = crate::listen::Limits {
    connections: 16,
    request_within: std::time::Duration::from_secs(5),
    connection_within: std::time::Duration::from_secs(60),
};

use axum::response::IntoResponse;

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
