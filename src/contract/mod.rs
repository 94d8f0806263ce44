//! Everything two processes must agree on, spelled once: the environment a
//! worker or job command is started with, the files beside a database,
//! exit codes, the tags on a pool's processes, a slot's name (`TYPE-N`),
//! the control socket's messages ([`control`]) and the placeholders of a
//! `job_command` ([`placeholders`]). Every other module imports these; none
//! spells them again. This module depends on nothing else of the crate.

pub mod control;
pub mod placeholders;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The environment of a worker (SPEC §4, §7).
pub mod env {
    pub const WORKER_TYPE: &str = "WORKER_TYPE";
    pub const WORKER_ID: &str = "WORKER_ID";
    /// A container's own id, when it has no `WORKER_ID`.
    pub const HOSTNAME: &str = "HOSTNAME";
    /// The database, for CLX workers.
    pub const DB_PATH: &str = "DB_PATH";
    /// The database, for CLM workers (which do not read `DB_PATH`).
    pub const CLM_JOBS_DB_PATH: &str = "CLM_JOBS_DB_PATH";
    pub const WORKSPACE_PATH: &str = "WORKSPACE_PATH";
    pub const LOG_LEVEL: &str = "LOG_LEVEL";
    pub const USE_SQLITE_QUEUE: &str = "USE_SQLITE_QUEUE";
    /// The row pre-registered for a CLM worker.
    pub const CLM_WORKER_ID: &str = "CLM_WORKER_ID";
    /// CLM's variables passed on from the supervisor's environment.
    pub const CLM_PASS_THROUGH: &[&str] = &["PLANTUML_JAR", "DRAWIO_EXECUTABLE", "CLM_CACHE_DB_PATH"];
    /// CLM's Worker API, for CLM workers in containers.
    pub const CLM_API_URL: &str = "CLM_API_URL";
    pub const CLM_API_TOKEN: &str = "CLM_API_TOKEN";
    pub const CLM_HOST_WORKSPACE: &str = "CLM_HOST_WORKSPACE";
    pub const CLM_HOST_DATA_DIR: &str = "CLM_HOST_DATA_DIR";
    /// The bell an idle built-in worker waits on.
    pub const BELL: &str = "CLX_POOL_BELL";
    /// The pool tag: the database a process of the pool serves.
    pub const POOL_TAG: &str = "CLX_SUPERVISOR_DB";
    /// The run tag: which supervisor's life a process belongs to.
    pub const RUN_TAG: &str = "CLX_POOL_RUN";

    /// What a job command of the built-in worker is started with.
    pub mod job {
        pub const INPUT_FILE: &str = "CLX_INPUT_FILE";
        pub const OUTPUT_FILE: &str = "CLX_OUTPUT_FILE";
        pub const PAYLOAD: &str = "CLX_PAYLOAD";
        pub const PAYLOAD_FILE: &str = "CLX_PAYLOAD_FILE";
        pub const JOB_ID: &str = "CLX_JOB_ID";
        pub const JOB_ATTEMPT: &str = "CLX_JOB_ATTEMPT";
        pub const JOB_TYPE: &str = "CLX_JOB_TYPE";
    }

    /// Read by the commands themselves.
    pub mod cli {
        /// The database when neither `--db` nor `--config` names it.
        pub const DB_PATH: &str = "CLX_DB_PATH";
        /// The prefix of the variables that override `[pool]` keys.
        pub const POOL_OVERRIDE_PREFIX: &str = "CLX_POOL_";
        /// Set: no progress bars, even on a terminal.
        pub const NO_PROGRESS: &str = "CLX_POOL_NO_PROGRESS";
        /// systemd's notification socket and watchdog period.
        pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
        pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
        pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
        /// The Docker engine to use.
        pub const DOCKER_HOST: &str = "DOCKER_HOST";
    }
}

/// Exit codes of every command and of the built-in worker.
pub mod exit {
    pub const OK: i32 = 0;
    /// A runtime failure (a timeout, a failed job, a degraded pool).
    pub const FAILURE: i32 = 1;
    /// A usage or config error, a refused database; `stats --check`: down.
    pub const USAGE: i32 = 2;
    /// The built-in worker could not reach its database (EX_TEMPFAIL): a
    /// fault outside the worker.
    pub const DATABASE_UNAVAILABLE: i32 = 75;
}

/// A file beside the database `db`: `<db><suffix>`.
fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// `<db>.lock`: the supervisor's pid (a hint; the lock is on the database).
pub fn lock_path(db: &Path) -> PathBuf {
    beside(db, ".lock")
}

/// `<db>.sock`: the supervisor's control socket.
pub fn socket_path(db: &Path) -> PathBuf {
    beside(db, ".sock")
}

/// `.<db>.bell-<type>` in the database's folder: the bell of a type.
pub fn bell_path(db: &Path, worker_type: &str) -> PathBuf {
    let dir = db.parent().unwrap_or(Path::new("."));
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.bell-{worker_type}"))
}

/// The log of a slot's workers in the pool's log folder: `TYPE-N.log`,
/// rotated to `TYPE-N.log.1` (newest) … `TYPE-N.log.<log_keep>`.
pub fn log_path(log_dir: &Path, slot: &SlotId) -> PathBuf {
    log_dir.join(log_file(&slot.to_string()))
}

/// The name of the live log file of the slot named `slot`.
pub fn log_file(slot: &str) -> String {
    format!("{slot}.log")
}

/// A log folder entry read back: the slot's name and the rotation (0 for
/// the live file); `None` for a file that is no slot's log.
pub fn parse_log_file(name: &str) -> Option<(&str, u32)> {
    match name.split_once(".log")? {
        (slot, "") => Some((slot, 0)),
        (slot, n) => Some((slot, n.strip_prefix('.')?.parse().ok()?)),
    }
}

/// This process's run: its pid and start time, which no other process on
/// this machine shares (the start time is field 22 of `/proc/<pid>/stat`).
pub fn this_run() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let pid = std::process::id();
        let start = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s[s.rfind(')')? + 2..].to_string();
                rest.split_whitespace().nth(19).map(str::to_string)
            })
            .unwrap_or_else(|| "0".into());
        format!("{pid}-{start}")
    })
}

/// The pool and run tags, for every process a run starts on the host
/// (direct workers, `on_event` hooks).
pub fn tags(db: &Path) -> [(String, String); 2] {
    [
        (env::POOL_TAG.into(), db.to_string_lossy().into_owned()),
        (env::RUN_TAG.into(), this_run().into()),
    ]
}

/// One slot of a pool: the `[[workers]]` type and its index, named
/// `plantuml-1` (types may contain `-`: the number is after the last one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SlotId {
    pub worker_type: String,
    pub index: u32,
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.worker_type, self.index)
    }
}

/// Not a `TYPE-N` slot name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a slot name (TYPE-N)")]
pub struct NotASlot(pub String);

impl FromStr for SlotId {
    type Err = NotASlot;

    fn from_str(s: &str) -> Result<SlotId, NotASlot> {
        let (t, n) = s.rsplit_once('-').ok_or_else(|| NotASlot(s.into()))?;
        let index = n.parse().map_err(|_| NotASlot(s.into()))?;
        if t.is_empty() {
            return Err(NotASlot(s.into()));
        }
        Ok(SlotId {
            worker_type: t.to_string(),
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_names_read_back_as_written() {
        for (name, parsed) in [
            ("upper-0.log", Some(("upper-0", 0))),
            ("my-type-12.log.3", Some(("my-type-12", 3))),
            ("upper-0.log.x", None),
            ("upper-0.log3", None),
            ("notes.txt", None),
        ] {
            assert_eq!(parse_log_file(name), parsed, "{name}");
        }
        let slot: SlotId = "upper-2".parse().unwrap();
        let path = log_path(Path::new("/l"), &slot);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_log_file(name), Some(("upper-2", 0)));
    }

    #[test]
    fn slot_names_read_back_as_written() {
        for (text, slot) in [
            ("upper-0", Some(("upper", 0))),
            ("my-type-12", Some(("my-type", 12))),
            ("upper", None),
            ("upper-", None),
            ("-3", None),
            ("upper-x", None),
        ] {
            let parsed: Result<SlotId, _> = text.parse();
            match slot {
                Some((t, i)) => {
                    let s = parsed.unwrap();
                    assert_eq!((s.worker_type.as_str(), s.index), (t, i));
                    assert_eq!(s.to_string(), text);
                }
                None => assert!(parsed.is_err(), "{text}"),
            }
        }
    }

    #[test]
    fn files_beside_the_database() {
        let db = Path::new("/srv/run/jobs.db");
        assert_eq!(lock_path(db), Path::new("/srv/run/jobs.db.lock"));
        assert_eq!(socket_path(db), Path::new("/srv/run/jobs.db.sock"));
        assert_eq!(bell_path(db, "upper"), Path::new("/srv/run/.jobs.db.bell-upper"));
        let slot = SlotId {
            worker_type: "upper".into(),
            index: 2,
        };
        assert_eq!(log_path(Path::new("/l"), &slot), Path::new("/l/upper-2.log"));
    }
}
