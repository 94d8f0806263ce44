//! Prometheus metrics (OpenMetrics text, prometheus-client): counters the
//! supervisor keeps while it runs (worker ends by cause, restarts, a
//! job-duration histogram) and gauges read from the database at each
//! scrape (workers by state, slots, jobs by status, queue depth and the
//! oldest pending job's age, each worker's CPU and memory, the
//! supervisor's memory). Served on `[pool] metrics_listen` at `/metrics`;
//! `clx-pool stats --prometheus` prints the same text (asked of the
//! supervisor over its control socket, or the gauges alone when none runs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use rusqlite::Connection;

use crate::db;
use crate::vocab::{EndEvent, Protocol};

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
/// the database's gauges.
pub fn render(conn: &Connection, protocol: Protocol, counters: Option<&Metrics>) -> anyhow::Result<String> {
    let mut r = Registry::default();
    if let Some(m) = counters {
        r.register(
            "clx_pool_worker_ends",
            "Workers that ended, by cause (died, hung, no-register, spawn-failed, stopped, replaced, recycled, retired)",
            m.ends.clone(),
        );
        r.register(
            "clx_pool_restarts",
            "Workers replaced after a failure",
            m.restarts.clone(),
        );
        r.register_with_unit(
            "clx_pool_job_duration",
            "How long completed jobs ran, from claim to completion (the database's clock: whole seconds)",
            Unit::Seconds,
            m.job_seconds.clone(),
        );
        let dropped = Counter::<u64>::default();
        dropped.inc_by(crate::stderr::dropped());
        r.register(
            "clx_pool_log_lines_dropped",
            "Lines the supervisor could not write to its stderr (a closed terminal or pipe)",
            dropped,
        );
    }
    gauges(conn, protocol, &mut r)?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r)?;
    Ok(text)
}

fn gauges(conn: &Connection, protocol: Protocol, r: &mut Registry) -> anyhow::Result<()> {
    let since = db::admin::run_started(conn)?;
    let workers = Family::<StateLabels, Gauge>::default();
    for (t, by_status) in db::workers::counts(conn, protocol, since.as_deref())? {
        for (status, n) in by_status {
            workers
                .get_or_create(&StateLabels {
                    worker_type: t.clone().into(),
                    state: status.into(),
                })
                .set(n);
        }
    }
    r.register("clx_pool_workers", "Worker rows of the current run, by status", workers);
    let slots = Family::<StateLabels, Gauge>::default();
    let mut per_type: HashMap<String, i64> = HashMap::new();
    for s in db::pool::slots(conn)? {
        *per_type.entry(s.worker_type.clone()).or_default() += 1;
        slots
            .get_or_create(&StateLabels {
                worker_type: s.worker_type.into(),
                state: s.state.to_string().into(),
            })
            .inc();
    }
    r.register("clx_pool_slots", "Slots of the pool, by state", slots);
    let wanted = Family::<TypeLabel, Gauge>::default();
    let recorded = db::pool::wanted(conn)?;
    for (t, &n) in &per_type {
        let n = recorded.get(t).copied().unwrap_or(n);
        wanted
            .get_or_create(&TypeLabel {
                worker_type: t.clone().into(),
            })
            .set(n);
    }
    r.register("clx_pool_workers_wanted", "Workers the pool wants, per type", wanted);
    queue(conn, per_type.keys(), r)?;
    per_worker(conn, since.as_deref(), r)?;
    let rss = FloatGauge::default();
    let me = crate::procs::stat(std::process::id() as i32);
    rss.set(me.map(|s| s.rss_pages * crate::procs::page_size()).unwrap_or(0) as f64);
    r.register_with_unit(
        "clx_pool_supervisor_resident_memory",
        "Resident memory of the process that renders these metrics",
        Unit::Bytes,
        rss,
    );
    Ok(())
}

/// Jobs by type and status; the queue of each type the pool serves (0 when
/// empty) and of any other type with pending jobs.
fn queue<'a>(conn: &Connection, served: impl Iterator<Item = &'a String>, r: &mut Registry) -> anyhow::Result<()> {
    let jobs = Family::<StateLabels, Gauge>::default();
    let depth = Family::<TypeLabel, Gauge>::default();
    let oldest = Family::<TypeLabel, FloatGauge>::default();
    for t in served {
        let label = TypeLabel {
            worker_type: t.clone().into(),
        };
        drop(depth.get_or_create(&label));
        drop(oldest.get_or_create(&label));
    }
    for c in db::admin::by_type(conn)? {
        jobs.get_or_create(&StateLabels {
            worker_type: c.job_type.clone().into(),
            state: c.status.to_string().into(),
        })
        .set(c.count);
        if c.status == crate::vocab::JobStatus::Pending {
            depth
                .get_or_create(&TypeLabel {
                    worker_type: c.job_type.clone().into(),
                })
                .set(c.count);
            oldest
                .get_or_create(&TypeLabel {
                    worker_type: c.job_type.into(),
                })
                .set(c.oldest_age.unwrap_or(0.0));
        }
    }
    r.register("clx_pool_jobs", "Jobs in the database, by type and status", jobs);
    r.register("clx_pool_queue_depth", "Pending jobs, by type", depth);
    r.register_with_unit(
        "clx_pool_oldest_pending_age",
        "How long the oldest pending job of a type has waited",
        Unit::Seconds,
        oldest,
    );
    Ok(())
}

fn per_worker(conn: &Connection, since: Option<&str>, r: &mut Registry) -> anyhow::Result<()> {
    let cpu = Family::<WorkerLabels, FloatGauge>::default();
    let rss = Family::<WorkerLabels, FloatGauge>::default();
    for w in db::pool::worker_lines(conn, since, false)? {
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
    Ok(())
}

/// The exposition text of the running supervisor (its counters and the
/// database's gauges), as `/metrics` and the control request `metrics`
/// answer.
pub async fn scrape(db: &db::Db, metrics: &Arc<Metrics>) -> anyhow::Result<String> {
    let (m, protocol) = (metrics.clone(), db.protocol());
    db.call(move |c| Ok(render(c, protocol, Some(&m)))).await?
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
