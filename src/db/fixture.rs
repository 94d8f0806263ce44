//! A pool written into a temporary database the way a supervisor and its
//! workers write it, for unit tests of everything that reads a pool.

use std::path::PathBuf;

use rusqlite::Connection;

use crate::contract::SlotId;
use crate::db::{self, jobs, slots, supervisor, workers};
use crate::vocab::{Mode, ModeKind, Protocol, SlotState, WorkerId, WorkerRow};

/// A pool in a temporary database: type `upper` with three slots (two
/// running workers, one idle and one busy; one slot backing off), type
/// `copy` with one running idle worker; jobs of this run: 2 completed,
/// 1 failed, 1 processing (held by the busy worker), 1 pending `upper`
/// and 1 pending `nobody` (a type no worker takes).
pub struct Fixture {
    /// Holds the database; removed on drop.
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub conn: Connection,
    pub protocol: Protocol,
    /// The pid recorded for the supervisor.
    pub pid: i64,
}

const DIRECT: Mode = Mode {
    kind: ModeKind::Direct,
    auto: false,
};

impl Fixture {
    pub fn new(protocol: Protocol) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let (mut conn, protocol) = db::open(&path, Some(protocol)).unwrap();
        let pid = 4_000_000;
        supervisor::begin_run(
            &mut conn,
            protocol,
            &supervisor::NewSupervisor {
                pid,
                proc_start: Some(1),
                hostname: "here",
                config_path: "/pool.toml",
                workspace_path: "/ws",
                expected_workers: 4,
                health: (300, 0.2),
            },
        )
        .unwrap();
        let mut f = Fixture {
            _dir: dir,
            path,
            conn,
            protocol,
            pid,
        };
        let upper0 = f.running("upper", 0);
        let _upper1 = f.running("upper", 1);
        f.slot(
            "upper",
            2,
            SlotState::Backoff,
            Some("cooling down after 3 quick deaths"),
        );
        let _copy0 = f.running("copy", 0);
        for (t, n) in [("upper", 5), ("nobody", 1)] {
            for i in 0..n {
                f.submit(t, &format!("{t}-{i}.txt"));
            }
        }
        for outcome in [
            jobs::Outcome::Completed,
            jobs::Outcome::Completed,
            jobs::Outcome::Failed("boom"),
        ] {
            let job = f.claim("upper", upper0);
            jobs::finish(&mut f.conn, &job, upper0, outcome, 0.5).unwrap();
        }
        f.claim("upper", upper0);
        supervisor::set_state(&f.conn, protocol, crate::vocab::SupervisorState::Running).unwrap();
        f
    }

    fn slot(&self, t: &str, i: u32, state: SlotState, note: Option<&str>) -> SlotId {
        let slot = SlotId {
            worker_type: t.into(),
            index: i,
        };
        slots::set_slot_state(&self.conn, &slot, DIRECT, state, note).unwrap();
        slot
    }

    /// A slot running a registered idle worker.
    fn running(&self, t: &str, i: u32) -> WorkerRow {
        let slot = self.slot(t, i, SlotState::Starting, None);
        let id = WorkerId(format!("{t}-{i}-w"));
        slots::slot_launched(&self.conn, &slot, &id, Some((5_000_000 + i as i32, Some(1)))).unwrap();
        let row = workers::register(&self.conn, self.protocol, t, id.as_str()).unwrap();
        let registered = slots::Registered {
            slot: &slot,
            worker_row: row,
            worker_id: &id,
            execution_mode: ModeKind::Direct,
            node: None,
        };
        slots::slot_registered(&self.conn, self.protocol, &registered).unwrap();
        row
    }

    fn submit(&self, t: &str, input: &str) {
        let job = jobs::NewJob {
            job_type: t,
            input_file: input,
            output_file: &format!("{input}.out"),
            content_hash: input,
            payload: "{}",
            priority: 0,
            max_attempts: 1,
        };
        jobs::submit(&self.conn, &job).unwrap();
    }

    fn claim(&mut self, t: &str, row: WorkerRow) -> jobs::ClaimedJob {
        let who = jobs::Claimant {
            protocol: self.protocol,
            worker_row: row,
            execution_mode: ModeKind::Direct,
        };
        jobs::claim(&mut self.conn, t, who).unwrap().unwrap()
    }
}

/// A job database in memory as `db::open` leaves it (foreign keys off, as
/// on every connection of the workers and the supervisor).
pub fn memory_db(protocol: Protocol) -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    conn.pragma_update(None, "foreign_keys", false).unwrap();
    crate::db::schema::prepare(&conn, Some(protocol)).unwrap();
    conn
}

/// Submits a pending job of `job_type` (input `in`, output `out`) that
/// may be tried `max_attempts` times; returns its id.
pub fn add_job(conn: &Connection, job_type: &str, max_attempts: i64) -> i64 {
    jobs::submit(
        conn,
        &jobs::NewJob {
            job_type,
            input_file: "in",
            output_file: "out",
            content_hash: "h",
            payload: "{}",
            priority: 0,
            max_attempts,
        },
    )
    .unwrap()
}
