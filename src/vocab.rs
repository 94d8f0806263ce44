//! The words clx-pool's records are made of, as types: which generation of
//! workers a database serves, and the statuses its rows take. Each has one
//! spelling, used by `Display`, serde and SQL alike, so a typo does not
//! compile and a `match` is exhaustive.

use std::fmt;
use std::str::FromStr;

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
            Protocol::Clx => "DB_PATH",
            Protocol::Clm => "CLM_JOBS_DB_PATH",
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
}

spelled!(EndEvent, "worker event" {
    Died => "died",
    Hung => "hung",
    NoRegister => "no-register",
    SpawnFailed => "spawn-failed",
    Stopped => "stopped",
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
