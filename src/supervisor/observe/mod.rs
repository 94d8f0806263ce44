//! What the supervisor tells the world while it runs: Prometheus metrics
//! ([`metrics`], served on `metrics_listen`), systemd's notify protocol
//! ([`sdnotify`]), the `on_event` hooks ([`notify`]), and what Swarm says
//! of swarm workers' tasks ([`swarm_tasks`]).

pub mod metrics;
pub mod notify;
pub mod sdnotify;
pub mod swarm_tasks;
