//! The slot's driver on a fake world: workers that die, hang or never
//! register on cue, and time that only moves when every task waits
//! (`tokio::time::pause`), so the restart policy's delays are checked
//! exactly, in milliseconds of real time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::machine::{Context, Failure, Order, Settled, Why};
use super::{Command, Done, Io, NotDone, Timing, Worker, run};
use crate::config::RestartConfig;
use crate::vocab::{EndCause, HungReason, SlotState, WorkerId, WorkerRow};

/// What a fake worker does once started (times from its start).
#[derive(Clone, Copy, Debug, Default)]
struct Script {
    /// Registers after this long; never when None.
    registers: Option<Duration>,
    /// Exits with code 1 after this long.
    dies: Option<Duration>,
    /// Exits with code 0 after this long (the built-in worker after
    /// `max_jobs`).
    finishes: Option<Duration>,
    /// Reported hung this long after the slot starts watching for it.
    hangs: Option<Duration>,
    /// Its job never ends: it never gets idle to be told to finish.
    stuck: bool,
}

/// Registers at once and serves until stopped.
fn serves() -> Script {
    Script {
        registers: Some(Duration::ZERO),
        ..Script::default()
    }
}

/// Registers at once, then dies after `d`.
fn dies_after(d: Duration) -> Script {
    Script {
        dies: Some(d),
        ..serves()
    }
}

/// Never registers.
fn silent() -> Script {
    Script::default()
}

/// Registers, then is reported hung after `d`.
fn hangs_after(d: Duration) -> Script {
    Script {
        hangs: Some(d),
        ..serves()
    }
}

/// Registers, then exits with code 0 after `d`.
fn finishes_after(d: Duration) -> Script {
    Script {
        finishes: Some(d),
        ..serves()
    }
}

/// Registers, takes a job that never ends, and is reported hung after `d`.
fn stuck_after(d: Duration) -> Script {
    Script {
        stuck: true,
        ..hangs_after(d)
    }
}

/// Registers only after `d`, then serves.
fn registers_after(d: Duration) -> Script {
    Script {
        registers: Some(d),
        ..Script::default()
    }
}

struct FakeWorker {
    id: WorkerId,
    script: Script,
    started: Instant,
    stopped: bool,
    /// Told to finish: it ends its job (a second) and exits with 0.
    drained_at: Option<Instant>,
}

impl Worker for FakeWorker {
    fn id(&self) -> &WorkerId {
        &self.id
    }

    async fn wait(&mut self) -> EndCause {
        if let Some(at) = self.drained_at {
            tokio::time::sleep_until(at + Duration::from_secs(1)).await;
            return EndCause::Code(0);
        }
        if self.stopped {
            return EndCause::Signal(15);
        }
        match (self.script.finishes, self.script.dies) {
            (Some(d), _) => {
                tokio::time::sleep_until(self.started + d).await;
                EndCause::Code(0)
            }
            (None, Some(d)) => {
                tokio::time::sleep_until(self.started + d).await;
                EndCause::Code(1)
            }
            (None, None) => std::future::pending().await,
        }
    }

    async fn stop(&mut self, _grace: Duration) -> EndCause {
        self.stopped = true;
        EndCause::Signal(15)
    }

    async fn drain(&mut self) {
        self.drained_at = Some(Instant::now());
    }
}

/// Everything the driver did, with the (paused) time it did it at.
#[derive(Default)]
struct Log(Vec<(Duration, String)>);

struct FakeIo {
    t0: Instant,
    scripts: VecDeque<Result<Script, Failure>>,
    current: Option<Script>,
    /// When the current worker was launched.
    started: Instant,
    launches: u32,
    log: Arc<Mutex<Log>>,
}

impl FakeIo {
    fn note(&self, what: String) {
        self.log.lock().unwrap().0.push((self.t0.elapsed(), what));
    }
}

impl Io for FakeIo {
    type Worker = FakeWorker;

    async fn launch(&mut self) -> Result<FakeWorker, Failure> {
        self.launches += 1;
        let next = self.scripts.pop_front().unwrap_or(Ok(serves()));
        self.note(format!("launch {}", self.launches));
        let script = next?;
        self.current = Some(script);
        self.started = Instant::now();
        Ok(FakeWorker {
            id: WorkerId(format!("w{}", self.launches)),
            script,
            started: Instant::now(),
            stopped: false,
            drained_at: None,
        })
    }

    async fn registered(&mut self, _id: &WorkerId) -> WorkerRow {
        match self.current.and_then(|s| s.registers) {
            None => std::future::pending().await,
            Some(d) => {
                tokio::time::sleep_until(self.started + d).await;
                WorkerRow(i64::from(self.launches))
            }
        }
    }

    fn forget(&mut self, id: &WorkerId) {
        self.note(format!("forget {id}"));
    }

    async fn hung(&self, _row: WorkerRow) -> HungReason {
        match self.current.and_then(|s| s.hangs) {
            Some(d) => {
                tokio::time::sleep(d).await;
                HungReason::Heartbeat {
                    age: Duration::from_secs(31),
                    limit: Duration::from_secs(30),
                }
            }
            None => std::future::pending().await,
        }
    }

    async fn mark_hung(&mut self, row: WorkerRow) {
        self.note(format!("hung {row}"));
    }

    async fn record_registered(&mut self, worker: &FakeWorker, row: WorkerRow) {
        self.note(format!("registered {} as {row}", worker.id));
    }

    async fn record_end(&mut self, worker: Option<FakeWorker>, row: Option<WorkerRow>, failure: Failure) {
        let (event, cause) = failure.describe(Duration::from_secs(10));
        let id = worker.map(|w| w.id.0).unwrap_or_else(|| "-".into());
        self.note(format!("end {id} row {row:?} {event}: {cause}"));
    }

    async fn stop_and_record(&mut self, worker: FakeWorker, _row: Option<WorkerRow>) {
        self.note(format!("stopped {}", worker.id));
    }

    async fn set_state(&mut self, state: SlotState, note: Option<String>) {
        self.note(format!(
            "state {state}{}",
            note.map(|n| format!(": {n}")).unwrap_or_default()
        ));
    }

    fn announce(&mut self, settled: Settled) {
        self.note(format!("settled {settled:?}"));
    }

    async fn ready_to_drain(&self, _row: WorkerRow) {
        if self.current.is_some_and(|s| s.stuck) {
            return std::future::pending().await;
        }
        self.note("drain".into());
    }

    async fn end_on_purpose(&mut self, worker: Option<FakeWorker>, row: Option<WorkerRow>, why: Why) {
        let id = worker.map(|w| w.id.0).unwrap_or_else(|| "-".into());
        self.note(format!("{} {id} row {row:?}: {}", why.event(), why.text()));
    }

    async fn remove_slot(&mut self) {
        self.note("removed".into());
    }
}

fn restart() -> RestartConfig {
    RestartConfig {
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(4),
        healthy_after: Duration::from_secs(10),
        burst_limit: 5,
        burst_window: Duration::from_secs(10),
        cooldown: Duration::from_secs(60),
    }
}

const TIMING: Timing = Timing {
    startup_timeout: Duration::from_secs(10),
    stop_timeout: Duration::from_secs(3),
};

/// Runs a slot over `scripts` until `until`, then stops the pool; returns
/// the log.
async fn drive(
    scripts: Vec<Result<Script, Failure>>,
    config: RestartConfig,
    until: Duration,
) -> Vec<(Duration, String)> {
    drive_with(scripts, config, until, Vec::new(), false).await.0
}

/// The same, sending `orders` at their times; also returns what each
/// order's waiter heard.
async fn drive_with(
    scripts: Vec<Result<Script, Failure>>,
    config: RestartConfig,
    until: Duration,
    orders: Vec<(Duration, Order)>,
    clean_exit_is_recycle: bool,
) -> (Vec<(Duration, String)>, Vec<Done>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let mut io = FakeIo {
        t0: Instant::now(),
        scripts: scripts.into(),
        current: None,
        started: Instant::now(),
        launches: 0,
        log: log.clone(),
    };
    let token = CancellationToken::new();
    let stopper = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(until).await;
        stopper.cancel();
    });
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = Instant::now();
    let heard = tokio::spawn(async move {
        let mut answers = Vec::new();
        for (at, order) in orders {
            tokio::time::sleep_until(t0 + at).await;
            let (done, waiter) = tokio::sync::oneshot::channel();
            tx.send(Command {
                order,
                done: Some(done),
            })
            .ok();
            answers.push(waiter);
        }
        let mut out = Vec::new();
        for w in answers {
            out.push(w.await.unwrap_or(Err(NotDone::SlotEnded)));
        }
        out
    });
    let mut ctx = Context::new(config, TIMING.startup_timeout);
    ctx.clean_exit_is_recycle = clean_exit_is_recycle;
    run(&mut io, ctx, TIMING, token, rx).await;
    let log = log.lock().unwrap().0.clone();
    (log, heard.await.unwrap())
}

fn at(log: &[(Duration, String)], prefix: &str) -> Vec<u128> {
    log.iter()
        .filter(|(_, w)| w.starts_with(prefix))
        .map(|(t, _)| t.as_millis())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_crashing_worker_is_restarted_at_once_then_with_doubling_backoff_until_given_up() {
    let dies = || Ok(dies_after(Duration::from_millis(100)));
    let log = drive(
        vec![dies(), dies(), dies(), dies(), dies(), dies()],
        restart(),
        Duration::from_secs(30),
    )
    .await;
    // Launched at 0; died at 100 and restarted at once; then 500 ms, 1 s
    // and 2 s of backoff; the fifth failure within 10 s gives up.
    assert_eq!(at(&log, "launch"), vec![0, 100, 700, 1800, 3900], "{log:#?}");
    assert_eq!(at(&log, "end"), vec![100, 200, 800, 1900, 4000]);
    let last: Vec<&String> = log.iter().map(|(_, w)| w).collect();
    assert!(
        last.iter()
            .any(|w| w.starts_with("state backoff: restarting in 500ms (last: exited with code 1)")),
        "{log:#?}"
    );
    assert!(
        last.iter()
            .any(|w| w.starts_with("state failed: gave up: its worker failed 5 times within 10s")),
        "{log:#?}"
    );
    // It had registered once, so it was announced then, and not again.
    assert_eq!(last.iter().filter(|w| w.starts_with("settled")).count(), 1);
    // After giving up nothing more happens, even when the pool stops.
    assert!(log.last().unwrap().1.starts_with("state failed"), "{log:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_healthy_worker_is_replaced_at_once_and_stopped_with_the_pool() {
    let log = drive(
        vec![Ok(dies_after(Duration::from_secs(20))), Ok(serves())],
        restart(),
        Duration::from_secs(25),
    )
    .await;
    let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        what,
        vec![
            "state starting",
            "launch 1",
            "registered w1 as 1",
            "settled Registered",
            "end w1 row Some(WorkerRow(1)) died: exited with code 1",
            "launch 2",
            "registered w2 as 2",
            "stopped w2",
            "state stopped",
        ]
    );
    assert_eq!(at(&log, "launch"), vec![0, 20_000], "no backoff after a healthy run");
    assert_eq!(at(&log, "stopped"), vec![25_000]);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_never_registers_is_stopped_after_startup_timeout() {
    let log = drive(vec![Ok(silent()), Ok(serves())], restart(), Duration::from_secs(15)).await;
    assert!(
        log.iter()
            .any(|(t, w)| *t == Duration::from_secs(10)
                && w == "end w1 row None no-register: did not register within 10s"),
        "{log:#?}"
    );
    assert!(log.iter().any(|(_, w)| w == "forget w1"));
    assert_eq!(at(&log, "launch"), vec![0, 10_000]);
}

#[tokio::test(start_paused = true)]
async fn a_hung_worker_is_marked_stopped_and_replaced() {
    let log = drive(
        vec![Ok(hangs_after(Duration::from_secs(40))), Ok(serves())],
        restart(),
        Duration::from_secs(45),
    )
    .await;
    let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
    let hung = what.iter().position(|w| *w == "hung 1").expect("marked hung");
    assert!(
        what[hung + 1].starts_with("end w1 row Some(WorkerRow(1)) hung: was hung (its heartbeat is 31s old"),
        "{what:#?}"
    );
    assert_eq!(what[hung + 2], "launch 2");
}

#[tokio::test(start_paused = true)]
async fn faults_outside_the_worker_cool_down_and_the_slot_comes_back() {
    let outside = || {
        Err(Failure::SpawnFailed {
            error: "database or disk is full".into(),
            outside: true,
        })
    };
    let mut scripts: Vec<Result<Script, Failure>> = (0..5).map(|_| outside()).collect();
    scripts.push(Ok(serves()));
    let log = drive(scripts, restart(), Duration::from_secs(120)).await;
    // Five quick failures (0, 0.5, 1.5, 3.5 s backoff), then a 60 s
    // cool-down instead of giving up, then it serves.
    assert_eq!(at(&log, "launch"), vec![0, 0, 500, 1500, 3500, 63_500], "{log:#?}");
    assert!(!log.iter().any(|(_, w)| w.starts_with("state failed")), "{log:#?}");
    assert!(log.iter().any(|(_, w)| w == "settled Registered"));
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_backoff_ends_the_slot_at_once() {
    let dies = || Ok(dies_after(Duration::from_millis(10)));
    let log = drive(vec![dies(), dies(), dies()], restart(), Duration::from_millis(300)).await;
    // Died at 10 and 20 ms; backing off 500 ms when the pool stops at 300.
    assert_eq!(at(&log, "launch"), vec![0, 10]);
    assert_eq!(
        log.last().unwrap(),
        &(Duration::from_millis(300), "state stopped".to_string())
    );
}

fn restart_order(now: bool) -> Order {
    Order::Replace {
        now,
        why: Why::Restart("test".into()),
    }
}

#[tokio::test(start_paused = true)]
async fn a_replace_order_lets_the_job_finish_then_starts_a_new_worker_without_a_failure() {
    let (log, heard) = drive_with(
        vec![Ok(serves()), Ok(serves())],
        restart(),
        Duration::from_secs(10),
        vec![(Duration::from_secs(5), restart_order(false))],
        false,
    )
    .await;
    let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        what[4..9],
        [
            "drain",
            "replaced w1 row Some(WorkerRow(1)): test",
            "state starting",
            "launch 2",
            "registered w2 as 2"
        ],
        "{log:#?}"
    );
    // Told at 5 s; its job took a second more.
    assert_eq!(at(&log, "launch"), vec![0, 6000]);
    assert!(!what.iter().any(|w| w.starts_with("state backoff")), "not a failure");
    assert_eq!(heard, vec![Ok(())], "the waiter hears once the new worker registered");
}

#[tokio::test(start_paused = true)]
async fn a_retire_order_ends_the_slot_before_the_pool_stops() {
    let retire = Order::Retire {
        now: true,
        why: Why::Retire("scaled to 0".into()),
    };
    let (log, heard) = drive_with(
        vec![Ok(serves())],
        restart(),
        Duration::from_secs(10),
        vec![(Duration::from_secs(2), retire)],
        false,
    )
    .await;
    let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        what[4..],
        ["retired w1 row Some(WorkerRow(1)): scaled to 0", "removed"],
        "{log:#?}"
    );
    assert_eq!(heard, vec![Ok(())]);
}

#[tokio::test(start_paused = true)]
async fn a_replace_order_revives_a_given_up_slot() {
    let dies = || Ok(dies_after(Duration::from_millis(100)));
    let mut scripts: Vec<_> = (0..5).map(|_| dies()).collect();
    scripts.push(Ok(serves()));
    let (log, heard) = drive_with(
        scripts,
        restart(),
        Duration::from_secs(30),
        vec![(Duration::from_secs(20), restart_order(false))],
        false,
    )
    .await;
    assert_eq!(at(&log, "launch"), vec![0, 100, 700, 1800, 3900, 20_000], "{log:#?}");
    assert_eq!(heard, vec![Ok(())]);
}

#[tokio::test(start_paused = true)]
async fn a_built_in_worker_that_finishes_by_itself_is_recycled_not_counted() {
    let finishes = || Ok(finishes_after(Duration::from_secs(1)));
    let (log, _) = drive_with(
        (0..8).map(|_| finishes()).collect(),
        restart(),
        Duration::from_millis(7500),
        Vec::new(),
        true,
    )
    .await;
    // Eight exits within ten seconds would give a crash-looping slot up;
    // these are recycles: relaunched at once, every time.
    assert_eq!(
        at(&log, "launch"),
        vec![0, 1000, 2000, 3000, 4000, 5000, 6000, 7000],
        "{log:#?}"
    );
    assert_eq!(at(&log, "recycled").len(), 7);
    assert!(
        !log.iter()
            .any(|(_, w)| w.starts_with("state backoff") || w.starts_with("end"))
    );
}

/// The orders that tell a worker to go after its job, and what follows
/// once it went.
fn orders_to_go() -> [(Order, &'static str); 2] {
    [
        (restart_order(false), "launch 2"),
        (
            Order::Retire {
                now: false,
                why: Why::Retire("scaled to 0".into()),
            },
            "removed",
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn a_worker_told_to_leave_after_its_job_is_still_judged_hung() {
    for (order, then) in orders_to_go() {
        let (log, heard) = drive_with(
            vec![Ok(stuck_after(Duration::from_secs(40))), Ok(serves())],
            restart(),
            Duration::from_secs(60),
            vec![(Duration::from_secs(5), order)],
            false,
        )
        .await;
        let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
        // Told at 5 s, its job never ends; 40 s later it is found hung,
        // stopped and recorded as such, and then what was ordered happens.
        let hung = what
            .iter()
            .position(|w| *w == "hung 1")
            .expect("judged hung while draining");
        assert_eq!(at(&log, "hung"), vec![45_000], "{log:#?}");
        assert!(
            what[hung + 1].starts_with("end w1 row Some(WorkerRow(1)) hung: was hung"),
            "{what:#?}"
        );
        assert!(what[hung + 2..].contains(&then), "{what:#?}");
        assert_eq!(heard, vec![Ok(())]);
    }
}

#[tokio::test(start_paused = true)]
async fn an_order_before_registration_waits_for_it_and_never_stops_a_job() {
    for (order, then) in orders_to_go() {
        let (log, heard) = drive_with(
            vec![Ok(registers_after(Duration::from_secs(1))), Ok(serves())],
            restart(),
            Duration::from_secs(10),
            vec![(Duration::from_millis(100), order)],
            false,
        )
        .await;
        let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
        // Not stopped when told at 0.1 s (it may have claimed a job): it
        // registers at 1 s, is told to finish after its job, then goes.
        let registered = what
            .iter()
            .position(|w| *w == "registered w1 as 1")
            .unwrap_or_else(|| panic!("{what:#?}"));
        assert_eq!(what[registered + 2], "drain", "{what:#?}");
        assert!(what[registered + 3].contains(" w1 row Some(WorkerRow(1))"), "{what:#?}");
        assert!(what.contains(&then), "{what:#?}");
        assert_eq!(heard, vec![Ok(())]);
    }
}

/// Every interleaving of orders (replace or retire, after the job or at
/// once; given before the worker registered, while it serves, and again
/// while it drains) with what befalls the worker (it serves, dies before or
/// after the order, hangs, or its job never ends): the rules always hold.
/// A worker is never ended on purpose while it may be in a job unless an
/// order said `now`; each worker ends once; nothing happens after the slot
/// retired, and it retires exactly when told to; every order is answered.
#[tokio::test(start_paused = true)]
async fn every_interleaving_of_orders_and_failures_keeps_the_rules() {
    let ms = Duration::from_millis;
    let replace = |now| restart_order(now);
    let retire = |now| Order::Retire {
        now,
        why: Why::Retire("scaled down".into()),
    };
    let fates: Vec<(&str, Script)> = vec![
        ("serves", registers_after(ms(1000))),
        (
            "dies early",
            Script {
                dies: Some(ms(1500)),
                ..registers_after(ms(1000))
            },
        ),
        (
            "dies late",
            Script {
                dies: Some(ms(2600)),
                ..registers_after(ms(1000))
            },
        ),
        (
            "hangs",
            Script {
                hangs: Some(ms(1700)),
                ..registers_after(ms(1000))
            },
        ),
        (
            "stuck in its job",
            Script {
                stuck: true,
                hangs: Some(ms(3000)),
                ..registers_after(ms(1000))
            },
        ),
        ("never registers", silent()),
    ];
    let mut cases = 0;
    for (fate, script) in &fates {
        for first_at in [ms(100), ms(2000)] {
            for first in [replace(false), replace(true), retire(false), retire(true)] {
                for second in [None, Some(replace(false)), Some(retire(false)), Some(retire(true))] {
                    let mut orders = vec![(first_at, first.clone())];
                    if let Some(o) = &second {
                        orders.push((first_at + ms(300), o.clone()));
                    }
                    let now_given = orders
                        .iter()
                        .any(|(_, o)| matches!(o, Order::Replace { now: true, .. } | Order::Retire { now: true, .. }));
                    let retire_given = orders.iter().any(|(_, o)| matches!(o, Order::Retire { .. }));
                    let (log, heard) = drive_with(
                        vec![Ok(*script)],
                        restart(),
                        Duration::from_secs(30),
                        orders.clone(),
                        false,
                    )
                    .await;
                    let what: Vec<&str> = log.iter().map(|(_, w)| w.as_str()).collect();
                    let case = format!("{fate}, {orders:?}: {what:#?}");
                    // Every order is answered (one sent after the slot
                    // retired finds no slot, as the fleet's would).
                    assert_eq!(heard.len(), orders.len(), "{case}");
                    let removed_at = log.iter().find(|(_, w)| w == "removed").map(|(t, _)| *t);
                    for ((at, _), h) in orders.iter().zip(&heard) {
                        if h.as_ref().err().is_some_and(|e| *e == NotDone::SlotEnded) {
                            assert!(removed_at.is_some_and(|t| t <= *at), "an order went unanswered: {case}");
                        }
                    }
                    // It retires exactly when told to; nothing happens after.
                    let removed = what.iter().position(|w| *w == "removed");
                    assert_eq!(removed.is_some(), retire_given, "{case}");
                    if let Some(r) = removed {
                        assert_eq!(r, what.len() - 1, "{case}");
                    }
                    // Each worker ends once.
                    let launched = what.iter().filter(|w| w.starts_with("launch")).count();
                    for k in 1..=launched {
                        let id = format!(" w{k} ");
                        let ends = what
                            .iter()
                            .filter(|w| {
                                w.contains(&id)
                                    && ["end", "replaced", "retired", "recycled", "stopped"]
                                        .iter()
                                        .any(|e| w.starts_with(e))
                            })
                            .count()
                            + what.iter().filter(|w| **w == format!("stopped w{k}")).count();
                        assert!(ends <= 1, "w{k} ended {ends} times: {case}");
                    }
                    // Never ended on purpose while it may be in a job.
                    if !now_given {
                        for (i, w) in what.iter().enumerate() {
                            let Some(k) = ["replaced w", "retired w"].iter().find_map(|p| w.strip_prefix(p)) else {
                                continue;
                            };
                            let k = k.split(' ').next().unwrap();
                            // Started, it may have claimed a job before the
                            // slot saw it register.
                            let launched = what[..i].iter().rposition(|x| *x == format!("launch {k}"));
                            if let Some(l) = launched {
                                assert!(
                                    what[l..i].contains(&"drain"),
                                    "w{k} ended on purpose without being told to finish its job: {case}"
                                );
                            }
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 6 * 2 * 4 * 4);
}
