//! The words clx-pool's records are made of, as types: which generation of
//! workers a database serves, and the statuses its rows take. Each has one
//! spelling, used by `Display`, serde and SQL alike, so a typo does not
//! compile and a `match` is exhaustive.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// Implements `Display`, `FromStr`, `ToSql` and `FromSql` for a fieldless
/// enum from one table of spellings.
macro_rules! spelled {
    ($ty:ident, $human:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(UnknownWord {
                        what: $human,
                        word: s.to_string(),
                        known: &[$($text),+],
                    }),
                }
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let s = value.as_str()?;
                s.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

/// A spelling that names none of a type's values.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{word}` is not a {what} (known: {})", known.join(", "))]
pub struct UnknownWord {
    pub what: &'static str,
    pub word: String,
    pub known: &'static [&'static str],
}

/// Which generation of workers a database serves: the CLX workers of the
/// seed (schema version 1) or today's CLM workers (PyPI
/// `coding-academy-lecture-manager`, schema version 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Clx,
    Clm,
}

spelled!(Protocol, "protocol" { Clx => "clx", Clm => "clm" });

/// The `schema_version` a CLM 1.35 database carries.
pub const CLM_SCHEMA_VERSION: i64 = 11;

impl Protocol {
    /// The worker types this generation ships, with the command that runs
    /// each one directly.
    pub fn known_types(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Protocol::Clx => &[
                ("notebook", &["python3", "-m", "nb"]),
                ("drawio", &["python3", "-m", "drawio_converter"]),
                ("plantuml", &["python3", "-m", "plantuml_converter"]),
            ],
            Protocol::Clm => &[
                ("notebook", &["python3", "-m", "clm.workers.notebook"]),
                ("plantuml", &["python3", "-m", "clm.workers.plantuml"]),
                ("drawio", &["python3", "-m", "clm.workers.drawio"]),
                ("jupyterlite", &["python3", "-m", "clm.workers.jupyterlite"]),
            ],
        }
    }

    /// The default direct command for `worker_type`, if this generation
    /// knows the type.
    pub fn default_command(self, worker_type: &str) -> Option<Vec<String>> {
        self.known_types()
            .iter()
            .find(|(t, _)| *t == worker_type)
            .map(|(_, argv)| argv.iter().map(|s| s.to_string()).collect())
    }

    /// The names of the known types, for messages.
    pub fn type_names(self) -> String {
        self.known_types()
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The environment variable naming the database for a worker.
    pub fn db_env_var(self) -> &'static str {
        match self {
            Protocol::Clx => crate::contract::env::DB_PATH,
            Protocol::Clm => crate::contract::env::CLM_JOBS_DB_PATH,
        }
    }
}

/// A job's status in the `jobs` table. `Cancelled` exists only in CLM
/// databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

spelled!(JobStatus, "job status" {
    Pending => "pending",
    Processing => "processing",
    Completed => "completed",
    Failed => "failed",
    Cancelled => "cancelled",
});

/// A worker row's status in the `workers` table. `Created` (pre-registered
/// by the supervisor, not yet activated by the worker) exists only in CLM
/// databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    Created,
    Idle,
    Busy,
    Hung,
    Dead,
}

spelled!(WorkerStatus, "worker status" {
    Created => "created",
    Idle => "idle",
    Busy => "busy",
    Hung => "hung",
    Dead => "dead",
});

/// The supervisor's state in `clx_pool_supervisor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorState {
    /// Cleaning up and starting workers.
    Starting,
    /// Every slot has settled (registered or given up).
    Running,
    Stopping,
    Stopped,
}

spelled!(SupervisorState, "supervisor state" {
    Starting => "starting",
    Running => "running",
    Stopping => "stopping",
    Stopped => "stopped",
});

/// A slot's state in `clx_pool_slots`, as `stats` and `wait` read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// A worker was launched and has not registered yet.
    Starting,
    /// Its worker registered.
    Running,
    /// Waiting to start a replacement.
    Backoff,
    /// Given up after too many failures.
    Failed,
    Stopped,
}

spelled!(SlotState, "slot state" {
    Starting => "starting",
    Running => "running",
    Backoff => "backoff",
    Failed => "failed",
    Stopped => "stopped",
});

/// How a worker's time in a slot ended, in `clx_pool_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndEvent {
    #[serde(rename = "died")]
    Died,
    #[serde(rename = "hung")]
    Hung,
    #[serde(rename = "no-register")]
    NoRegister,
    #[serde(rename = "spawn-failed")]
    SpawnFailed,
    #[serde(rename = "stopped")]
    Stopped,
    /// Replaced on purpose (`restart`, a reload that changed its entry).
    #[serde(rename = "replaced")]
    Replaced,
    /// Replaced after `max_jobs` or `max_memory`.
    #[serde(rename = "recycled")]
    Recycled,
    /// Its slot ended (`scale` down, a reload that removed its entry).
    #[serde(rename = "retired")]
    Retired,
}

spelled!(EndEvent, "worker event" {
    Died => "died",
    Hung => "hung",
    NoRegister => "no-register",
    SpawnFailed => "spawn-failed",
    Stopped => "stopped",
    Replaced => "replaced",
    Recycled => "recycled",
    Retired => "retired",
});

/// The event types of CLM's `worker_events` table that clx-pool writes, so
/// `clm status` and `clm monitor` show what the supervisor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClmEvent {
    WorkerStarting,
    WorkerRegistered,
    WorkerStopping,
    WorkerStopped,
    WorkerFailed,
    PoolStarting,
    PoolStarted,
    PoolStopping,
    PoolStopped,
}

spelled!(ClmEvent, "CLM worker event" {
    WorkerStarting => "worker_starting",
    WorkerRegistered => "worker_registered",
    WorkerStopping => "worker_stopping",
    WorkerStopped => "worker_stopped",
    WorkerFailed => "worker_failed",
    PoolStarting => "pool_starting",
    PoolStarted => "pool_started",
    PoolStopping => "pool_stopping",
    PoolStopped => "pool_stopped",
});

/// Where a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeKind {
    Direct,
    Docker,
    /// A Docker Swarm service per slot, its task on any node of a swarm.
    Swarm,
}

spelled!(ModeKind, "execution mode" { Direct => "direct", Docker => "docker", Swarm => "swarm" });

impl ModeKind {
    /// The word CLM's own tables use (`workers.execution_mode`): a swarm
    /// task is a container to CLM, and takes the jobs meant for containers.
    pub fn for_clm(self) -> ModeKind {
        match self {
            ModeKind::Swarm => ModeKind::Docker,
            kind => kind,
        }
    }
}

/// How a slot runs its workers: the kind, and whether `execution_mode =
/// "auto"` chose it. Spelled `docker`, `direct (auto)`, … in `stats` and in
/// `clx_pool_slots.execution_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mode {
    pub kind: ModeKind,
    pub auto: bool,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind, if self.auto { " (auto)" } else { "" })
    }
}

impl FromStr for Mode {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, UnknownWord> {
        let (kind, auto) = match s.strip_suffix(" (auto)") {
            Some(k) => (k, true),
            None => (s, false),
        };
        Ok(Mode {
            kind: kind.parse()?,
            auto,
        })
    }
}

impl ToSql for Mode {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_string()))
    }
}

impl FromSql for Mode {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A worker's row id in the `workers` table (what `jobs.worker_id` holds):
/// not to be confused with its [`WorkerId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerRow(pub i64);

/// The id a worker registers with (`workers.container_id`): its
/// `WORKER_ID` (`direct-{type}-{slot}-{8 hex}`) or its container's short id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

macro_rules! transparent_sql {
    ($ty:ident, $inner:ty) => {
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                <$inner>::column_result(value).map($ty)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

transparent_sql!(WorkerRow, i64);
transparent_sql!(WorkerId, String);

impl WorkerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a worker process or container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    Code(i32),
    Signal(i32),
    /// Killed by the kernel's OOM killer.
    Oom,
    Unknown(String),
    /// It never ran, for a reason outside it that may pass (no node of a
    /// swarm could take its task): a fault outside the worker.
    NotPlaced(String),
    /// Its node could not start it (the image missing there, a mount that
    /// failed): its program never ran; a fault outside the worker.
    NotStarted(String),
}

impl EndCause {
    /// The exit code of a built-in worker that could not reach its
    /// database (EX_TEMPFAIL): a fault outside the worker.
    pub const DATABASE_UNAVAILABLE: i32 = crate::contract::exit::DATABASE_UNAVAILABLE;
}

impl fmt::Display for EndCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndCause::Code(c) => write!(f, "exited with code {c}"),
            EndCause::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "was killed by {sig}"),
                Err(_) => write!(f, "was killed by signal {s}"),
            },
            EndCause::Oom => write!(f, "was killed by the kernel's OOM killer (out of memory)"),
            EndCause::Unknown(e) => write!(f, "ended ({e})"),
            EndCause::NotPlaced(why) => write!(f, "was never placed ({why})"),
            EndCause::NotStarted(why) => write!(f, "never started ({why})"),
        }
    }
}

/// Why the monitor judged a worker hung.
#[derive(Debug, Clone, PartialEq)]
pub enum HungReason {
    /// Idle, and its heartbeat is older than the limit.
    Heartbeat { age: Duration, limit: Duration },
    /// Its job has run longer than `max_job_time`.
    JobTooLong { job: i64, ran: Duration, limit: Duration },
    /// Busy, using less than the threshold of one CPU over the window.
    NoCpu {
        job: i64,
        percent: f64,
        window: Duration,
        threshold: f64,
    },
}

impl fmt::Display for HungReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = humantime::format_duration;
        match self {
            HungReason::Heartbeat { age, limit } => write!(
                f,
                "its heartbeat is {} old, older than heartbeat_timeout {}",
                d(*age),
                d(*limit)
            ),
            HungReason::JobTooLong { job, ran, limit } => write!(
                f,
                "job {job} has run for {}, longer than max_job_time {}",
                d(*ran),
                d(*limit)
            ),
            HungReason::NoCpu {
                job,
                percent,
                window,
                threshold,
            } => write!(
                f,
                "job {job} used {percent:.1}% CPU over {} (hung_cpu_percent {threshold})",
                d(*window)
            ),
        }
    }
}

/// The marker CLM's `WorkerDiscovery` reads in `workers.managed_by`: a
/// persistent worker is reusable by every build session.
pub const MANAGED_BY_PERSISTENT: &str = "persistent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>().unwrap(), *p);
        }
        for s in JobStatus::ALL {
            assert_eq!(s.to_string().parse::<JobStatus>().unwrap(), *s);
        }
        for s in WorkerStatus::ALL {
            assert_eq!(s.to_string().parse::<WorkerStatus>().unwrap(), *s);
        }
        let e = "clz".parse::<Protocol>().unwrap_err();
        assert_eq!(e.to_string(), "`clz` is not a protocol (known: clx, clm)");
    }

    #[test]
    fn modes_round_trip_through_their_spelling() {
        for kind in ModeKind::ALL {
            for auto in [false, true] {
                let m = Mode { kind: *kind, auto };
                assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
            }
        }
        assert_eq!(
            "docker (auto)".parse::<Mode>().unwrap(),
            Mode {
                kind: ModeKind::Docker,
                auto: true
            }
        );
        assert!("podman".parse::<Mode>().is_err());
    }

    #[test]
    fn each_generation_has_its_own_commands() {
        assert_eq!(
            Protocol::Clm.default_command("plantuml").unwrap(),
            ["python3", "-m", "clm.workers.plantuml"]
        );
        assert_eq!(
            Protocol::Clx.default_command("plantuml").unwrap(),
            ["python3", "-m", "plantuml_converter"]
        );
        assert!(Protocol::Clx.default_command("jupyterlite").is_none());
    }
}
