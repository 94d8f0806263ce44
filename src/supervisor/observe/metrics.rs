//! Prometheus metrics (OpenMetrics text, prometheus-client): the counters
//! the supervisor keeps while it runs (worker ends by cause, restarts, a
//! job-duration histogram), rendered beside the gauges of the pool's
//! picture at each scrape (`status::prometheus`). Served on `[pool]
//! metrics_listen` at `/metrics`; `clx-pool stats --prometheus` prints the
//! same text (asked of the supervisor over its control socket, or the
//! gauges alone when none runs).

use std::sync::Arc;

use axum::response::IntoResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::db;
use crate::status::prometheus::{self, EndLabels, TypeLabel};
use crate::status::{self, Detail, Liveness};
use crate::vocab::EndEvent;

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

impl Metrics {
    /// Registers the counters beside the gauges.
    pub fn register(&self, r: &mut Registry) {
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
    prometheus::render(&status, |r| metrics.register(r))
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
    tasks: &tokio_util::task::TaskTracker,
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
    tasks.spawn(crate::listen::serve(listener, LIMITS, token, "/metrics", move |io| {
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
