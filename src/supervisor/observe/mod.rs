//! What the supervisor tells the world while it runs: Prometheus metrics
//! ([`metrics`], served on `metrics_listen`), systemd's notify protocol
//! ([`sdnotify`]) and the `on_event` hooks ([`notify`]).

pub mod metrics;
pub mod notify;
pub mod sdnotify;
