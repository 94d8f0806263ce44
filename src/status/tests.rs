use super::*;
use crate::db::fixture::Fixture;

fn running(f: &Fixture) -> Liveness {
    Liveness::Running(Some(f.pid as i32))
}

fn picture(f: &Fixture, live: Liveness) -> Status {
    let all = Detail {
        workers: true,
        events: true,
    };
    build(&f.conn, f.protocol, &f.path, live, all).unwrap()
}

#[test]
fn a_running_pool_is_shown_as_recorded() {
    for protocol in Protocol::ALL {
        let f = Fixture::new(*protocol);
        let s = picture(&f, running(&f));
        assert!(s.supervisor.running && s.record_is_current, "{protocol}");
        assert_eq!(s.supervisor.pid, Some(f.pid));
        let upper = &s.pools["upper"];
        assert_eq!((upper.slots, upper.running, upper.backoff, upper.wanted), (3, 2, 1, 3));
        assert_eq!((s.pools["copy"].slots, s.pools["copy"].running), (1, 1));
        assert_eq!(s.running_slots(), 3);
        assert_eq!(
            (
                s.workers_in("upper", WorkerStatus::Idle),
                s.workers_in("upper", WorkerStatus::Busy),
                s.workers_in("copy", WorkerStatus::Idle)
            ),
            (1, 1, 1),
            "{protocol}"
        );
        let j = &s.jobs;
        assert_eq!(
            (j.pending, j.processing, j.completed, j.failed),
            (2, 1, 2, 1),
            "{protocol}"
        );
        let pending: Vec<(&str, i64)> = s.pending().map(|(t, n, _)| (t, n)).collect();
        assert_eq!(pending, [("nobody", 1), ("upper", 1)]);
        assert_eq!(s.worker_list.as_ref().map(Vec::len), Some(3));
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].why.as_deref(), Some("cooling down after 3 quick deaths"));
        assert_eq!(s.health.status, HealthStatus::Degraded);
        assert_eq!(
            s.health.reasons,
            [
                "1 slot of `upper` waiting to restart",
                "1 pending job of type `nobody`, which no worker of the pool serves",
                "1 of 3 jobs that finished in the last 5m failed (more than 20%: health_failure_rate)"
            ],
            "{protocol}"
        );
        assert_eq!(s.unserved, BTreeMap::from([("nobody".to_string(), 1)]), "{protocol}");
        assert_eq!((s.recent.completed, s.recent.failed, s.recent.window_secs), (2, 1, 300));
    }
}

#[test]
fn without_a_supervisor_no_worker_is_live_and_every_slot_is_stopped() {
    for protocol in Protocol::ALL {
        let f = Fixture::new(*protocol);
        let s = picture(&f, Liveness::NotRunning);
        assert!(!s.supervisor.running && s.supervisor.stopped_uncleanly, "{protocol}");
        assert_eq!(s.supervisor.pid, None);
        assert_eq!(s.supervisor.state, Some(SupervisorState::Stopped));
        assert_eq!(s.running_slots(), 0);
        assert_eq!(s.pools["upper"].stopped, 3);
        assert_eq!(s.workers_in("upper", WorkerStatus::Dead), 2);
        assert_eq!(s.workers_in("upper", WorkerStatus::Idle), 0);
        assert!(s.waiting.is_empty());
        assert_eq!(s.worker_list.as_ref().map(Vec::len), Some(0));
        assert_eq!(s.pools["upper"].memory_mib, 0.0);
        assert_eq!(s.health.status, HealthStatus::Down);
        // The jobs are what they are, supervisor or not.
        assert_eq!((s.jobs.pending, s.jobs.completed), (2, 2));
    }
}

#[test]
fn a_new_supervisor_before_its_record_is_written_is_not_ready() {
    let f = Fixture::new(Protocol::Clx);
    let s = picture(&f, Liveness::Running(Some(7)));
    assert!(s.supervisor.running && !s.record_is_current);
    assert_eq!(
        s.ready(),
        Ready::NotYet {
            running: 0,
            expected: 0,
            why: "the supervisor is starting".into()
        }
    );
}

#[test]
fn the_summary_counts_slots_waiting_and_jobs() {
    let f = Fixture::new(Protocol::Clm);
    let s = picture(&f, running(&f));
    let sum = s.summary();
    assert_eq!((sum.running, sum.slots, sum.waiting), (3, 4, 1));
    assert_eq!(sum.jobs, s.jobs);
}

#[test]
fn the_json_is_the_documented_shape() {
    let f = Fixture::new(Protocol::Clx);
    let s = build(&f.conn, f.protocol, &f.path, running(&f), Detail::default()).unwrap();
    let v = serde_json::to_value(&s).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "db_path",
            "health",
            "jobs",
            "pools",
            "protocol",
            "recent",
            "supervisor",
            "unserved",
            "waiting",
            "workers"
        ]
    );
    assert_eq!(v["pools"]["upper"]["backoff"], 1);
    assert_eq!(v["workers"]["upper"]["busy"], 1);
    assert_eq!(v["health"]["status"], "degraded");
}

fn status_with(running: bool, state: Option<SupervisorState>, current: bool, slots: &[SlotState]) -> Status {
    let f = Fixture::new(Protocol::Clx);
    let live = if running {
        Liveness::Running(Some(f.pid as i32))
    } else {
        Liveness::NotRunning
    };
    let mut s = picture(&f, live);
    s.supervisor.state = state;
    s.supervisor.expected_workers = slots.len() as i64;
    s.record_is_current = current;
    let mut p = s.pools["upper"].clone();
    (p.running, p.starting, p.backoff, p.failed, p.stopped) = (0, 0, 0, 0, 0);
    s.waiting.clear();
    for (i, &state) in slots.iter().enumerate() {
        p.count(state);
        if matches!(state, SlotState::Backoff | SlotState::Failed) {
            s.waiting.push(Waiting {
                worker_type: "upper".into(),
                slot: i as u32,
                state,
                why: None,
            });
        }
    }
    s.pools = BTreeMap::from([("upper".to_string(), p)]);
    s
}

#[test]
fn ready_means_every_configured_worker_of_the_live_supervisor_runs() {
    use SlotState::*;
    use SupervisorState as S;
    let not_yet = |running, expected, why: &str| Ready::NotYet {
        running,
        expected,
        why: why.into(),
    };
    for (running, state, current, slots, want) in [
        (
            false,
            Some(S::Running),
            true,
            vec![Running],
            not_yet(0, 0, "no supervisor is running"),
        ),
        (
            true,
            None,
            true,
            vec![Running],
            not_yet(0, 0, "the supervisor is starting"),
        ),
        (
            true,
            Some(S::Running),
            false,
            vec![Running],
            not_yet(0, 0, "the supervisor is starting"),
        ),
        (
            true,
            Some(S::Stopping),
            true,
            vec![Running],
            not_yet(0, 0, "the supervisor is stopping"),
        ),
        (
            true,
            Some(S::Starting),
            true,
            vec![Running, Running],
            not_yet(2, 2, "2 of 2 workers registered"),
        ),
        (
            true,
            Some(S::Running),
            true,
            vec![Running, Starting],
            not_yet(1, 2, "1 of 2 workers registered"),
        ),
        (
            true,
            Some(S::Running),
            true,
            vec![Running, Backoff],
            not_yet(1, 2, "1 of 2 workers registered"),
        ),
        (
            true,
            Some(S::Running),
            true,
            vec![Running, Failed, Failed],
            Ready::Never {
                given_up: vec!["upper-1".into(), "upper-2".into()],
            },
        ),
        (
            true,
            Some(S::Running),
            true,
            vec![Running, Running],
            Ready::Yes { workers: 2 },
        ),
    ] {
        let s = status_with(running, state, current, &slots);
        assert_eq!(s.ready(), want, "{running} {state:?} {current} {slots:?}");
    }
}
