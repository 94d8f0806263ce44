//! A slot's life as a state machine, without I/O: the phases (the worker
//! lives inside the phases that have one, as watchexec's `CommandState`
//! owns its child), the events the driver observes, and a pure [`next`]
//! that maps a phase and an event to the next phase and the actions to
//! carry out (Horust's service handler). [`ALLOWED`] lists every
//! transition; a test walks them all. The restart policy decides what
//! follows a failure.

use std::time::Duration;

use tokio::time::Instant;

use super::super::policy::{Decision, RestartPolicy};
use crate::config::RestartConfig;
use crate::vocab::{EndCause, EndEvent, HungReason, SlotState, WorkerRow};

/// What a slot is doing; `W` is the running worker.
#[derive(Debug)]
pub enum Phase<W> {
    /// About to start a worker (the `Launch` action is under way).
    Launching,
    /// A worker was started and has not registered yet. `then`: an order
    /// that came meanwhile, to carry out once it has (it may have claimed
    /// a job already: it is never stopped mid-job on purpose).
    AwaitingRegistration {
        worker: W,
        since: Instant,
        then: Option<(After, Why)>,
    },
    /// Its worker registered and takes jobs.
    Serving { worker: W, row: WorkerRow, since: Instant },
    /// Waiting before the next start (backoff, or a cool-down after faults
    /// outside the worker).
    BackingOff { until: Instant },
    /// Given up (until an order revives it).
    GivenUp,
    /// Its worker serves until it is told to finish (after its current job),
    /// then the slot starts a new one or ends: a restart, a recycle, a
    /// scale-down. `signalled` once the worker was told.
    Draining {
        worker: W,
        row: WorkerRow,
        then: After,
        why: Why,
        signalled: bool,
    },
    /// The pool stopped.
    Stopped,
    /// The slot ended for good (scaled down, or its entry removed).
    Retired,
}

/// What follows a drained worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Relaunch,
    Retire,
}

/// Why a worker is replaced on purpose (not a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// `clx-pool restart`, or a reload that changed the entry.
    Restart(String),
    /// `max_jobs` or `max_memory` reached, or the worker finished by itself.
    Recycle(String),
    /// `clx-pool scale` down, or a reload that removed the entry.
    Retire(String),
}

impl Why {
    pub fn event(&self) -> EndEvent {
        match self {
            Why::Restart(_) => EndEvent::Replaced,
            Why::Recycle(_) => EndEvent::Recycled,
            Why::Retire(_) => EndEvent::Retired,
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Why::Restart(t) | Why::Recycle(t) | Why::Retire(t) => t,
        }
    }
}

/// An order from the supervisor (scale, restart, reload, recycling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Replace the worker: after its current job, or at once with `now`; a
    /// slot without a serving worker (waiting, given up) starts one at once.
    Replace { now: bool, why: Why },
    /// End the slot: after the current job, or at once with `now`.
    Retire { now: bool, why: Why },
}

/// The phases without their data, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Launching,
    AwaitingRegistration,
    Serving,
    BackingOff,
    GivenUp,
    Draining,
    Stopped,
    Retired,
}

impl<W> Phase<W> {
    pub fn kind(&self) -> Kind {
        match self {
            Phase::Launching => Kind::Launching,
            Phase::AwaitingRegistration { .. } => Kind::AwaitingRegistration,
            Phase::Serving { .. } => Kind::Serving,
            Phase::BackingOff { .. } => Kind::BackingOff,
            Phase::GivenUp => Kind::GivenUp,
            Phase::Draining { .. } => Kind::Draining,
            Phase::Stopped => Kind::Stopped,
            Phase::Retired => Kind::Retired,
        }
    }
}

/// Every transition a slot may make.
pub const ALLOWED: &[(Kind, Kind)] = &[
    (Kind::Launching, Kind::AwaitingRegistration),
    (Kind::Launching, Kind::Launching),
    (Kind::Launching, Kind::BackingOff),
    (Kind::Launching, Kind::GivenUp),
    (Kind::Launching, Kind::Stopped),
    (Kind::AwaitingRegistration, Kind::Serving),
    // An order before it registered: kept, carried out once it has.
    (Kind::AwaitingRegistration, Kind::AwaitingRegistration),
    (Kind::AwaitingRegistration, Kind::Draining),
    (Kind::AwaitingRegistration, Kind::Launching),
    (Kind::AwaitingRegistration, Kind::BackingOff),
    (Kind::AwaitingRegistration, Kind::GivenUp),
    (Kind::AwaitingRegistration, Kind::Stopped),
    (Kind::Serving, Kind::Launching),
    (Kind::Serving, Kind::BackingOff),
    (Kind::Serving, Kind::GivenUp),
    (Kind::Serving, Kind::Stopped),
    (Kind::BackingOff, Kind::Launching),
    (Kind::BackingOff, Kind::Stopped),
    (Kind::GivenUp, Kind::Stopped),
    // Orders: replace, retire, revive.
    (Kind::Serving, Kind::Draining),
    (Kind::Serving, Kind::Retired),
    (Kind::AwaitingRegistration, Kind::Retired),
    (Kind::BackingOff, Kind::Retired),
    (Kind::GivenUp, Kind::Launching),
    (Kind::GivenUp, Kind::Retired),
    (Kind::Draining, Kind::Draining),
    (Kind::Draining, Kind::Launching),
    (Kind::Draining, Kind::Retired),
    (Kind::Draining, Kind::Stopped),
];

/// Why a worker stopped being useful.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Died(EndCause),
    /// The monitor found it hung; it was stopped.
    Hung(HungReason),
    /// It did not register within `startup_timeout`; it was stopped.
    NoRegister,
    /// It could not be started; `outside` when the cause lies outside the
    /// worker and goes away by itself (a full disk, a busy database, an
    /// engine error), not a missing program.
    SpawnFailed {
        error: String,
        outside: bool,
    },
}

impl Failure {
    /// The event and the cause in words.
    pub fn describe(&self, startup_timeout: Duration) -> (EndEvent, String) {
        match self {
            Failure::Died(c) => (EndEvent::Died, c.to_string()),
            Failure::Hung(reason) => (EndEvent::Hung, format!("was hung ({reason})")),
            Failure::NoRegister => (
                EndEvent::NoRegister,
                format!(
                    "did not register within {}",
                    humantime::format_duration(startup_timeout)
                ),
            ),
            Failure::SpawnFailed { error, .. } => (EndEvent::SpawnFailed, format!("could not be started: {error}")),
        }
    }

    /// A fault outside the worker pauses the slot instead of giving it up
    /// (the built-in worker exits with EX_TEMPFAIL when its database is
    /// unavailable).
    pub fn is_outside_worker(&self) -> bool {
        match self {
            Failure::SpawnFailed { outside, .. } => *outside,
            Failure::Died(EndCause::Code(c)) => *c == EndCause::DATABASE_UNAVAILABLE,
            Failure::Died(EndCause::NotPlaced(_) | EndCause::NotStarted(_)) => true,
            _ => false,
        }
    }
}

/// What the driver observed.
#[derive(Debug)]
pub enum Event<W> {
    Launched(W),
    LaunchFailed(Failure),
    Registered(WorkerRow),
    /// The worker is gone: it died, or was stopped as hung or unregistered.
    Ended(Failure),
    /// A backoff or cool-down is over.
    TimerFired,
    /// The pool is stopping.
    Shutdown,
    /// An order from the supervisor.
    Order(Order),
    /// A draining worker may be told to finish now (it is idle, or it
    /// finishes its job by itself).
    ReadyToDrain,
}

impl<W> Event<W> {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Launched(_) => "launched",
            Event::LaunchFailed(_) => "launch failed",
            Event::Registered(_) => "registered",
            Event::Ended(_) => "ended",
            Event::TimerFired => "timer fired",
            Event::Shutdown => "shutdown",
            Event::Order(_) => "order",
            Event::ReadyToDrain => "ready to drain",
        }
    }
}

/// What the driver must do; it records every transition.
#[derive(Debug)]
pub enum Action<W> {
    /// Start a worker (a `Launched` or `LaunchFailed` event follows).
    Launch,
    /// Record the worker's registration.
    RecordRegistered { row: WorkerRow },
    /// Remove what the worker left running and record its end.
    RecordEnd {
        worker: Option<W>,
        row: Option<WorkerRow>,
        failure: Failure,
    },
    /// Stop the worker (the pool is stopping) and record that.
    StopAndRecord { worker: W, row: Option<WorkerRow> },
    /// Write the slot's state, with why it waits.
    SetState(SlotState, Option<String>),
    /// Tell the supervisor the slot settled (once).
    Announce(Settled),
    /// Tell the draining worker to finish after its current job.
    SignalDrain,
    /// Stop the worker at once (if still running) and record its end as
    /// on purpose: not a failure, not counted by the restart policy.
    EndOnPurpose {
        worker: Option<W>,
        row: Option<WorkerRow>,
        why: Why,
    },
    /// Remove the slot's record (it is retired).
    RemoveSlot,
}

/// How a slot first settled, for the supervisor's readiness count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Registered,
    GaveUp,
}

/// What the transitions need besides the phase.
pub struct Context {
    pub policy: RestartPolicy,
    pub restart: RestartConfig,
    pub startup_timeout: Duration,
    /// The supervisor was told how the slot settled.
    pub announced: bool,
    /// Its workers (the built-in worker) exit with code 0 only on purpose
    /// (`max_jobs` reached, or told to finish): a recycle, not a failure.
    pub clean_exit_is_recycle: bool,
}

impl Context {
    pub fn new(restart: RestartConfig, startup_timeout: Duration) -> Context {
        Context {
            policy: RestartPolicy::new(restart.clone()),
            restart,
            startup_timeout,
            announced: false,
            clean_exit_is_recycle: false,
        }
    }
}

/// The next phase and the actions that take the slot there.
pub fn next<W>(phase: Phase<W>, event: Event<W>, ctx: &mut Context, now: Instant) -> (Phase<W>, Vec<Action<W>>) {
    use Event as E;
    use Phase as P;
    match (phase, event) {
        (phase, E::Order(order)) => ordered(phase, order, ctx),
        (P::Launching, E::Launched(worker)) => (
            P::AwaitingRegistration {
                worker,
                since: now,
                then: None,
            },
            vec![],
        ),
        (P::Launching, E::LaunchFailed(failure)) => failed(None, None, failure, now, now, ctx),
        (P::AwaitingRegistration { worker, since, then }, E::Registered(row)) => {
            registered(worker, row, since, then, ctx)
        }
        // It was told to end meanwhile: it ends, recorded as it failed.
        (
            P::AwaitingRegistration {
                worker,
                then: Some((After::Retire, _)),
                ..
            },
            E::Ended(failure),
        ) => failed_on_its_way(worker, None, failure, After::Retire),
        (P::AwaitingRegistration { worker, since, .. }, E::Ended(failure)) => {
            failed(Some(worker), None, failure, since, now, ctx)
        }
        (P::Serving { worker, row, .. }, E::Ended(Failure::Died(EndCause::Code(0)))) if ctx.clean_exit_is_recycle => {
            let why = Why::Recycle("finished by itself (max_jobs reached)".into());
            relaunch(Some(worker), Some(row), why)
        }
        (P::Serving { worker, row, since }, E::Ended(failure)) => {
            failed(Some(worker), Some(row), failure, since, now, ctx)
        }
        (
            P::Draining {
                worker,
                row,
                then,
                why,
                signalled,
            },
            event @ (E::ReadyToDrain | E::Ended(_) | E::Shutdown),
        ) => draining(
            Draining {
                worker,
                row,
                then,
                why,
                signalled,
            },
            event,
            ctx,
        ),
        (P::BackingOff { .. }, E::TimerFired) => (P::Launching, vec![Action::Launch]),
        (P::AwaitingRegistration { worker, .. }, E::Shutdown) => stopping(Some(worker), None),
        (P::Serving { worker, row, .. }, E::Shutdown) => stopping(Some(worker), Some(row)),
        (P::Launching | P::BackingOff { .. }, E::Shutdown) => stopping(None, None),
        // A given-up slot stays shown as failed after the pool stops.
        (P::GivenUp, E::Shutdown) => (P::Stopped, vec![]),
        (phase, event) => cannot_happen(phase, event),
    }
}

/// Nothing else can happen; an event that does is ignored.
fn cannot_happen<W>(phase: Phase<W>, event: Event<W>) -> (Phase<W>, Vec<Action<W>>) {
    tracing::error!(phase = ?phase.kind(), event = event.name(), "a slot event that cannot happen; ignored");
    (phase, vec![])
}

/// A new worker registered: it serves, or (told to end meanwhile) drains
/// at once. The first registration of a slot is announced.
fn registered<W>(
    worker: W,
    row: WorkerRow,
    since: Instant,
    then: Option<(After, Why)>,
    ctx: &mut Context,
) -> (Phase<W>, Vec<Action<W>>) {
    let mut actions = vec![Action::RecordRegistered { row }];
    if !std::mem::replace(&mut ctx.announced, true) {
        actions.push(Action::Announce(Settled::Registered));
    }
    match then {
        None => (Phase::Serving { worker, row, since }, actions),
        Some((then, why)) => (
            Phase::Draining {
                worker,
                row,
                then,
                why,
                signalled: false,
            },
            actions,
        ),
    }
}

/// The fields of [`Phase::Draining`], for the transitions out of it.
struct Draining<W> {
    worker: W,
    row: WorkerRow,
    then: After,
    why: Why,
    signalled: bool,
}

impl<W> Draining<W> {
    fn phase(self) -> Phase<W> {
        let Draining {
            worker,
            row,
            then,
            why,
            signalled,
        } = self;
        Phase::Draining {
            worker,
            row,
            then,
            why,
            signalled,
        }
    }
}

/// A draining worker is told to end once it is ready; when it ends as
/// told, what was ordered happens; otherwise it failed on its way.
fn draining<W>(d: Draining<W>, event: Event<W>, ctx: &Context) -> (Phase<W>, Vec<Action<W>>) {
    match event {
        Event::ReadyToDrain if !d.signalled => (Draining { signalled: true, ..d }.phase(), vec![Action::SignalDrain]),
        Event::Ended(failure) if drained_as_told(&failure, d.signalled, ctx) => end_as_ordered(d),
        Event::Ended(failure) => failed_on_its_way(d.worker, Some(d.row), failure, d.then),
        Event::Shutdown => stopping(Some(d.worker), Some(d.row)),
        event => cannot_happen(d.phase(), event),
    }
}

/// Whether a draining worker's end is the one it was told to make: after
/// it was told, the built-in worker exits with 0 (others may exit as they
/// like, they were sent SIGTERM). A hung verdict or a death before it was
/// told is a failure.
fn drained_as_told(failure: &Failure, signalled: bool, ctx: &Context) -> bool {
    match failure {
        Failure::Died(EndCause::Code(0)) => signalled || ctx.clean_exit_is_recycle,
        Failure::Died(_) => signalled && !ctx.clean_exit_is_recycle,
        _ => false,
    }
}

/// A worker told to go hung or died on its way out: a failure, recorded
/// as such; then what was ordered still happens.
fn failed_on_its_way<W>(
    worker: W,
    row: Option<WorkerRow>,
    failure: Failure,
    then: After,
) -> (Phase<W>, Vec<Action<W>>) {
    let end = Action::RecordEnd {
        worker: Some(worker),
        row,
        failure,
    };
    match then {
        After::Relaunch => (
            Phase::Launching,
            vec![end, Action::SetState(SlotState::Starting, None), Action::Launch],
        ),
        After::Retire => (Phase::Retired, vec![end, Action::RemoveSlot]),
    }
}

/// A worker replaced on purpose: recorded (not counted), then a new one.
fn relaunch<W>(worker: Option<W>, row: Option<WorkerRow>, why: Why) -> (Phase<W>, Vec<Action<W>>) {
    (
        Phase::Launching,
        vec![
            Action::EndOnPurpose { worker, row, why },
            Action::SetState(SlotState::Starting, None),
            Action::Launch,
        ],
    )
}

fn retire<W>(worker: Option<W>, row: Option<WorkerRow>, why: Why) -> (Phase<W>, Vec<Action<W>>) {
    (
        Phase::Retired,
        vec![Action::EndOnPurpose { worker, row, why }, Action::RemoveSlot],
    )
}

/// What an order does in each phase: a serving worker drains (or stops at
/// once with `now`); one not yet registered has no job and stops at once;
/// a slot without a worker starts one (a revived slot forgets its failures)
/// or ends.
fn ordered<W>(phase: Phase<W>, order: Order, ctx: &mut Context) -> (Phase<W>, Vec<Action<W>>) {
    use Phase as P;
    let (now, then, why) = match order {
        Order::Replace { now, why } => (now, After::Relaunch, why),
        Order::Retire { now, why } => (now, After::Retire, why),
    };
    let end = |worker: Option<W>, row: Option<WorkerRow>, why: Why| match then {
        After::Relaunch => relaunch(worker, row, why),
        After::Retire => retire(worker, row, why),
    };
    match phase {
        P::Serving { worker, row, .. } if now => end(Some(worker), Some(row), why),
        P::Serving { worker, row, .. } => (
            P::Draining {
                worker,
                row,
                then,
                why,
                signalled: false,
            },
            vec![],
        ),
        P::Draining {
            worker,
            row,
            then: before,
            signalled,
            ..
        } => {
            // A retirement wins over a replacement.
            let then = if before == After::Retire { After::Retire } else { then };
            let d = Draining {
                worker,
                row,
                then,
                why,
                signalled,
            };
            if now { end_as_ordered(d) } else { (d.phase(), vec![]) }
        }
        P::AwaitingRegistration { worker, .. } if now => end(Some(worker), None, why),
        // It may have claimed a job already: told once it registered.
        P::AwaitingRegistration {
            worker,
            since,
            then: before,
        } => {
            // A retirement wins over a replacement.
            let then = match before {
                Some((After::Retire, earlier)) => (After::Retire, earlier),
                _ => (then, why),
            };
            let then = Some(then);
            (P::AwaitingRegistration { worker, since, then }, vec![])
        }
        P::BackingOff { .. } | P::GivenUp if then == After::Relaunch => {
            ctx.policy = RestartPolicy::new(ctx.restart.clone());
            (
                P::Launching,
                vec![Action::SetState(SlotState::Starting, None), Action::Launch],
            )
        }
        P::BackingOff { .. } | P::GivenUp => (P::Retired, vec![Action::RemoveSlot]),
        phase @ (P::Launching | P::Stopped | P::Retired) => (phase, vec![]),
    }
}

/// A draining worker ends: what it was ordered to end for happens.
fn end_as_ordered<W>(d: Draining<W>) -> (Phase<W>, Vec<Action<W>>) {
    match d.then {
        After::Relaunch => relaunch(Some(d.worker), Some(d.row), d.why),
        After::Retire => retire(Some(d.worker), Some(d.row), d.why),
    }
}

fn stopping<W>(worker: Option<W>, row: Option<WorkerRow>) -> (Phase<W>, Vec<Action<W>>) {
    let mut actions = Vec::new();
    if let Some(worker) = worker {
        actions.push(Action::StopAndRecord { worker, row });
    }
    actions.push(Action::SetState(SlotState::Stopped, None));
    (Phase::Stopped, actions)
}

/// A worker failed: record it, then restart at once, back off, cool down
/// or give up, as the restart policy says.
fn failed<W>(
    worker: Option<W>,
    row: Option<WorkerRow>,
    failure: Failure,
    since: Instant,
    now: Instant,
    ctx: &mut Context,
) -> (Phase<W>, Vec<Action<W>>) {
    let (_, cause) = failure.describe(ctx.startup_timeout);
    let outside = failure.is_outside_worker();
    let mut actions = vec![Action::RecordEnd { worker, row, failure }];
    let d = humantime::format_duration;
    let r = &ctx.restart;
    let phase = match ctx.policy.on_failure(now, now.duration_since(since), outside) {
        Decision::RestartAfter(delay) if delay.is_zero() => {
            actions.push(Action::Launch);
            Phase::Launching
        }
        Decision::RestartAfter(delay) => {
            let note = format!("restarting in {} (last: {cause})", d(delay));
            actions.push(Action::SetState(SlotState::Backoff, Some(note)));
            Phase::BackingOff { until: now + delay }
        }
        Decision::CoolDown(delay) => {
            let note = format!(
                "failed {} times within {} because of a fault outside the worker (last: {cause}); trying again in {} (restart_cooldown)",
                r.burst_limit,
                d(r.burst_window),
                d(delay)
            );
            actions.push(Action::SetState(SlotState::Backoff, Some(note)));
            Phase::BackingOff { until: now + delay }
        }
        Decision::GiveUp => {
            let note = format!(
                "gave up: its worker failed {} times within {} (last: {cause})",
                r.burst_limit,
                d(r.burst_window)
            );
            actions.push(Action::SetState(SlotState::Failed, Some(note)));
            if !std::mem::replace(&mut ctx.announced, true) {
                actions.push(Action::Announce(Settled::GaveUp));
            }
            Phase::GivenUp
        }
    };
    (phase, actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart() -> RestartConfig {
        RestartConfig {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(10),
            burst_limit: 3,
            burst_window: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
        }
    }

    fn ctx() -> Context {
        Context::new(restart(), Duration::from_secs(30))
    }

    /// A phase of every kind, with a worker named "w" where one lives.
    fn phases(now: Instant) -> Vec<Phase<&'static str>> {
        vec![
            Phase::Launching,
            Phase::AwaitingRegistration {
                worker: "w",
                since: now,
                then: None,
            },
            Phase::AwaitingRegistration {
                worker: "w",
                since: now,
                then: Some((After::Retire, Why::Retire("test".into()))),
            },
            Phase::Serving {
                worker: "w",
                row: WorkerRow(1),
                since: now,
            },
            Phase::BackingOff { until: now },
            Phase::GivenUp,
            Phase::Draining {
                worker: "w",
                row: WorkerRow(1),
                then: After::Relaunch,
                why: Why::Restart("test".into()),
                signalled: false,
            },
            Phase::Draining {
                worker: "w",
                row: WorkerRow(1),
                then: After::Retire,
                why: Why::Retire("test".into()),
                signalled: true,
            },
            Phase::Stopped,
            Phase::Retired,
        ]
    }

    fn events() -> Vec<Event<&'static str>> {
        vec![
            Event::Launched("w2"),
            Event::LaunchFailed(Failure::SpawnFailed {
                error: "no such file".into(),
                outside: false,
            }),
            Event::Registered(WorkerRow(2)),
            Event::Ended(Failure::Died(EndCause::Code(1))),
            Event::Ended(Failure::Hung(HungReason::Heartbeat {
                age: Duration::from_secs(40),
                limit: Duration::from_secs(30),
            })),
            Event::Ended(Failure::NoRegister),
            Event::TimerFired,
            Event::Shutdown,
            Event::ReadyToDrain,
            Event::Order(Order::Replace {
                now: false,
                why: Why::Restart("test".into()),
            }),
            Event::Order(Order::Replace {
                now: true,
                why: Why::Recycle("test".into()),
            }),
            Event::Order(Order::Retire {
                now: false,
                why: Why::Retire("test".into()),
            }),
            Event::Order(Order::Retire {
                now: true,
                why: Why::Retire("test".into()),
            }),
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn every_transition_is_in_the_table() {
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        // With no earlier failure a failure restarts at once; after one it
        // backs off; after burst_limit - 1 it gives up.
        for earlier in [0, 1, 2] {
            for i in 0..phases(now).len() {
                for j in 0..events().len() {
                    let phase = phases(now).remove(i);
                    let event = events().remove(j);
                    let from = phase.kind();
                    let mut c = ctx();
                    for _ in 0..earlier {
                        c.policy.on_failure(now, Duration::ZERO, false);
                    }
                    let (to, _) = next(phase, event, &mut c, now);
                    if from != to.kind()
                        || matches!(from, Kind::Launching | Kind::Draining | Kind::AwaitingRegistration)
                    {
                        assert!(ALLOWED.contains(&(from, to.kind())), "{from:?} -> {:?}", to.kind());
                        seen.insert((from, to.kind()));
                    }
                }
            }
        }
        for pair in ALLOWED {
            assert!(seen.contains(pair), "{pair:?} is never taken");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn registration_is_announced_once_and_a_shutdown_stops_the_worker() {
        let now = Instant::now();
        let mut c = ctx();
        let p = Phase::AwaitingRegistration {
            worker: "w",
            since: now,
            then: None,
        };
        let (p, actions) = next(p, Event::Registered(WorkerRow(7)), &mut c, now);
        assert!(matches!(p, Phase::Serving { row: WorkerRow(7), .. }));
        assert!(matches!(
            actions[..],
            [Action::RecordRegistered { .. }, Action::Announce(Settled::Registered)]
        ));
        let (p, actions) = next(p, Event::Shutdown, &mut c, now);
        assert_eq!(p.kind(), Kind::Stopped);
        assert!(matches!(
            actions[..],
            [
                Action::StopAndRecord {
                    worker: "w",
                    row: Some(WorkerRow(7))
                },
                Action::SetState(SlotState::Stopped, None)
            ]
        ));
        // A second registration (after a restart) is not announced again.
        let p = Phase::AwaitingRegistration {
            worker: "v",
            since: now,
            then: None,
        };
        let (_, actions) = next(p, Event::Registered(WorkerRow(8)), &mut c, now);
        assert_eq!(actions.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_restart_at_once_then_back_off_then_give_up() {
        let mut c = ctx();
        let mut now = Instant::now();
        let died = || Event::Ended(Failure::Died(EndCause::Code(1)));
        // 1st: at once.
        let p = Phase::Serving {
            worker: "w",
            row: WorkerRow(1),
            since: now,
        };
        let (p, actions) = next(p, died(), &mut c, now);
        assert_eq!(p.kind(), Kind::Launching);
        assert!(matches!(
            actions[..],
            [
                Action::RecordEnd {
                    worker: Some("w"),
                    row: Some(WorkerRow(1)),
                    ..
                },
                Action::Launch
            ]
        ));
        // 2nd: back off 500 ms, saying why.
        let (p, _) = next(p, Event::Launched("w2"), &mut c, now);
        now += Duration::from_millis(10);
        let (p, actions) = next(p, died(), &mut c, now);
        let Phase::BackingOff { until } = p else {
            panic!("{:?}", p.kind())
        };
        assert_eq!(until - now, Duration::from_millis(500));
        let Action::SetState(SlotState::Backoff, Some(note)) = &actions[1] else {
            panic!("{actions:?}")
        };
        assert_eq!(note, "restarting in 500ms (last: exited with code 1)");
        // 3rd within the window: given up, announced as such.
        let (p, actions) = next(p, Event::TimerFired, &mut c, until);
        assert!(matches!(actions[..], [Action::Launch]));
        let (p, _) = next(p, Event::LaunchFailed(Failure::Died(EndCause::Code(1))), &mut c, until);
        assert_eq!(p.kind(), Kind::GivenUp);
        let (p, actions) = next(p, Event::Shutdown, &mut c, until);
        assert_eq!(p.kind(), Kind::Stopped);
        assert!(actions.is_empty(), "a given-up slot stays shown as failed");
    }

    #[tokio::test(start_paused = true)]
    async fn faults_outside_the_worker_cool_down_instead() {
        let mut c = ctx();
        let now = Instant::now();
        let outside = || {
            Event::LaunchFailed(Failure::SpawnFailed {
                error: "database or disk is full".into(),
                outside: true,
            })
        };
        let mut p = Phase::<&str>::Launching;
        for _ in 0..2 {
            (p, _) = next(p, outside(), &mut c, now);
            if let Phase::BackingOff { until } = p {
                (p, _) = next(p, Event::TimerFired, &mut c, until);
            }
        }
        let (p, actions) = next(p, outside(), &mut c, now);
        let Phase::BackingOff { until } = p else {
            panic!("{:?}", p.kind())
        };
        assert_eq!(until - now, Duration::from_secs(60));
        let Action::SetState(SlotState::Backoff, Some(note)) = &actions[1] else {
            panic!("{actions:?}")
        };
        assert!(
            note.contains("fault outside the worker") && note.contains("database or disk is full"),
            "{note}"
        );
        assert!(Failure::Died(EndCause::Code(75)).is_outside_worker());
        assert!(!Failure::Died(EndCause::Code(1)).is_outside_worker());
        assert!(Failure::Died(EndCause::NotPlaced("no suitable node".into())).is_outside_worker());
        assert!(Failure::Died(EndCause::NotStarted("No such image: nb:1".into())).is_outside_worker());
    }
}
