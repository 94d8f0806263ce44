//! One slot of a pool: keeps one worker running, replacing it in the same
//! slot when it dies, hangs or does not register, under the restart
//! policy. The rules are a pure state machine (`machine.rs`); this module
//! is its driver: it waits for the event each phase can end with and
//! carries out the actions, through [`Io`], whose real implementation
//! ([`SlotIo`], in `io.rs`) launches workers and records every transition
//! in the database. Tests drive the same loop with a fake `Io` and paused
//! time.

pub mod io;
pub mod machine;
pub mod reach;

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::vocab::{EndCause, HungReason, SlotState, WorkerId, WorkerRow};
pub use io::SlotIo;
use machine::{Action, Context, Event, Failure, Phase};
pub use machine::{Order, Settled, Why};
pub use reach::{Directory, Entry, Hung, SharedEntry, SlotChannels};

/// An order for a slot, and who wants to hear when it is carried out: the
/// new worker registered (or the slot ended), or why not.
pub struct Command {
    pub order: Order,
    pub done: Option<oneshot::Sender<Done>>,
}

/// Whether an order was carried out.
pub type Done = Result<(), NotDone>;

/// Why an order was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDone {
    /// The worker started for it failed (why, as the event says).
    #[error("its new worker {0}")]
    NewWorkerFailed(String),
    #[error("the slot was given up (see `clx-pool stats --events`)")]
    GivenUp,
    #[error("the pool stopped")]
    PoolStopped,
    /// The slot's task ended without answering.
    #[error("the slot ended")]
    SlotEnded,
    #[error("not replaced within {}", humantime::format_duration(*.0))]
    TooSlow(std::time::Duration),
}

pub type Orders = mpsc::UnboundedReceiver<Command>;

/// A running worker, as the driver needs it.
pub trait Worker {
    fn id(&self) -> &WorkerId;
    /// Resolves when it has exited. Cancel-safe.
    fn wait(&mut self) -> impl Future<Output = EndCause>;
    /// Stops it (SIGTERM, SIGKILL after `grace`).
    fn stop(&mut self, grace: Duration) -> impl Future<Output = EndCause>;
    /// Tells it to finish after its current job (the built-in worker) or to
    /// stop now that it is idle (other workers).
    fn drain(&mut self) -> impl Future<Output = ()>;
}

/// What the slot does to the world.
pub trait Io {
    type Worker: Worker;
    /// Starts a worker (and records the launch).
    fn launch(&mut self) -> impl Future<Output = Result<Self::Worker, Failure>>;
    /// Resolves once the worker `id` has registered, with its row.
    fn registered(&mut self, id: &WorkerId) -> impl Future<Output = WorkerRow>;
    /// Stops waiting for `id` to register.
    fn forget(&mut self, id: &WorkerId);
    /// Resolves when the monitor reports the worker of `row` hung.
    fn hung(&self, row: WorkerRow) -> impl Future<Output = HungReason>;
    /// Marks the worker of `row` hung before it is stopped.
    fn mark_hung(&mut self, row: WorkerRow) -> impl Future<Output = ()>;
    /// Records that `worker` registered as `row`.
    fn record_registered(&mut self, worker: &Self::Worker, row: WorkerRow) -> impl Future<Output = ()>;
    /// Removes what an ended worker left running and records its end.
    fn record_end(
        &mut self,
        worker: Option<Self::Worker>,
        row: Option<WorkerRow>,
        failure: Failure,
    ) -> impl Future<Output = ()>;
    /// Stops a worker because the pool stops, and records it.
    fn stop_and_record(&mut self, worker: Self::Worker, row: Option<WorkerRow>) -> impl Future<Output = ()>;
    fn set_state(&mut self, state: SlotState, note: Option<String>) -> impl Future<Output = ()>;
    fn announce(&mut self, settled: Settled);
    /// Resolves when the worker of `row` may be told to finish: at once for
    /// a worker that finishes its job by itself, else once it is idle.
    fn ready_to_drain(&self, row: WorkerRow) -> impl Future<Output = ()>;
    /// Stops a worker (if it still runs) that ends on purpose and records
    /// it: not a failure.
    fn end_on_purpose(
        &mut self,
        worker: Option<Self::Worker>,
        row: Option<WorkerRow>,
        why: Why,
    ) -> impl Future<Output = ()>;
    /// Removes the slot's record: it ended for good.
    fn remove_slot(&mut self) -> impl Future<Output = ()>;
}

/// The timing of one slot.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub startup_timeout: Duration,
    pub stop_timeout: Duration,
}

/// Runs a slot until the pool stops or the slot is retired, carrying out
/// the supervisor's orders.
pub async fn run<I: Io>(io: &mut I, mut ctx: Context, timing: Timing, token: CancellationToken, mut orders: Orders) {
    let mut phase: Phase<I::Worker> = Phase::Launching;
    let mut pending: VecDeque<Action<I::Worker>> =
        VecDeque::from([Action::SetState(SlotState::Starting, None), Action::Launch]);
    let mut waiters: Vec<oneshot::Sender<Done>> = Vec::new();
    loop {
        let mut launched = None;
        while let Some(action) = pending.pop_front() {
            launched = carry_out(io, &mut phase, action, timing).await.or(launched);
        }
        tell(&mut waiters, &phase);
        if matches!(phase, Phase::Stopped | Phase::Retired) {
            return;
        }
        let event = match launched {
            Some(event) => event,
            None => observe(io, &mut phase, timing, &token, &mut orders, &mut waiters).await,
        };
        // A worker started since an order failed: those waiting hear it
        // now, not after the restart policy's retries.
        let failed_start = match (&phase, &event) {
            (Phase::Launching, Event::LaunchFailed(f)) | (Phase::AwaitingRegistration { .. }, Event::Ended(f)) => {
                Some(f.describe(ctx.startup_timeout).1)
            }
            _ => None,
        };
        let (next, actions) = machine::next(phase, event, &mut ctx, Instant::now());
        phase = next;
        pending.extend(actions);
        if let Some(cause) = failed_start {
            for w in waiters.drain(..) {
                w.send(Err(NotDone::NewWorkerFailed(cause.clone()))).ok();
            }
        }
    }
}

/// Tells those waiting for an order whether it was carried out, once the
/// slot got somewhere.
fn tell<W>(waiters: &mut Vec<oneshot::Sender<Done>>, phase: &Phase<W>) {
    let outcome = match phase {
        Phase::Serving { .. } | Phase::Retired => Ok(()),
        Phase::GivenUp => Err(NotDone::GivenUp),
        Phase::Stopped => Err(NotDone::PoolStopped),
        _ => return,
    };
    for w in waiters.drain(..) {
        w.send(outcome.clone()).ok();
    }
}

/// Carries out one action; a launch yields its event.
async fn carry_out<I: Io>(
    io: &mut I,
    phase: &mut Phase<I::Worker>,
    action: Action<I::Worker>,
    _timing: Timing,
) -> Option<Event<I::Worker>> {
    match action {
        Action::Launch => {
            return Some(match io.launch().await {
                Ok(w) => Event::Launched(w),
                Err(f) => Event::LaunchFailed(f),
            });
        }
        Action::RecordRegistered { row } => {
            if let Phase::Serving { worker, .. } | Phase::Draining { worker, .. } = phase {
                io.record_registered(worker, row).await;
            }
        }
        Action::RecordEnd { worker, row, failure } => io.record_end(worker, row, failure).await,
        Action::StopAndRecord { worker, row } => io.stop_and_record(worker, row).await,
        Action::SetState(state, note) => io.set_state(state, note).await,
        Action::Announce(settled) => io.announce(settled),
        Action::SignalDrain => {
            if let Phase::Draining { worker, .. } = phase {
                worker.drain().await;
            }
        }
        Action::EndOnPurpose { worker, row, why } => io.end_on_purpose(worker, row, why).await,
        Action::RemoveSlot => io.remove_slot().await,
    }
    None
}

/// Waits for whatever ends the current phase, or for an order.
async fn observe<I: Io>(
    io: &mut I,
    phase: &mut Phase<I::Worker>,
    timing: Timing,
    token: &CancellationToken,
    orders: &mut Orders,
    waiters: &mut Vec<oneshot::Sender<Done>>,
) -> Event<I::Worker> {
    match phase {
        Phase::AwaitingRegistration { worker, since, .. } => {
            let deadline = *since + timing.startup_timeout;
            await_registration(io, worker, deadline, timing, token, orders, waiters).await
        }
        Phase::Serving { worker, row, .. } => {
            let row = *row;
            tokio::select! {
                biased;
                _ = token.cancelled() => Event::Shutdown,
                cause = worker.wait() => Event::Ended(Failure::Died(cause)),
                c = next_order(orders) => heard(waiters, c),
                reason = io.hung(row) => stop_hung(io, worker, row, reason, timing).await,
            }
        }
        Phase::Draining {
            worker, row, signalled, ..
        } => {
            let (row, signalled) = (*row, *signalled);
            tokio::select! {
                biased;
                _ = token.cancelled() => Event::Shutdown,
                cause = worker.wait() => Event::Ended(Failure::Died(cause)),
                c = next_order(orders) => heard(waiters, c),
                _ = io.ready_to_drain(row), if !signalled => Event::ReadyToDrain,
                // Still supervised on its way out: a job that never ends
                // must not keep it (and its job) for ever.
                reason = io.hung(row) => stop_hung(io, worker, row, reason, timing).await,
            }
        }
        Phase::BackingOff { until } => tokio::select! {
            biased;
            _ = token.cancelled() => Event::Shutdown,
            c = next_order(orders) => heard(waiters, c),
            _ = tokio::time::sleep_until(*until) => Event::TimerFired,
        },
        Phase::GivenUp => tokio::select! {
            biased;
            _ = token.cancelled() => Event::Shutdown,
            c = next_order(orders) => heard(waiters, c),
        },
        Phase::Launching | Phase::Stopped | Phase::Retired => {
            token.cancelled().await;
            Event::Shutdown
        }
    }
}

/// Waits for a new worker to register (or die, or miss its deadline). An
/// order meanwhile is carried out once it registered.
async fn await_registration<I: Io>(
    io: &mut I,
    worker: &mut I::Worker,
    deadline: Instant,
    timing: Timing,
    token: &CancellationToken,
    orders: &mut Orders,
    waiters: &mut Vec<oneshot::Sender<Done>>,
) -> Event<I::Worker> {
    let id = worker.id().clone();
    let event = tokio::select! {
        biased;
        _ = token.cancelled() => Event::Shutdown,
        cause = worker.wait() => Event::Ended(Failure::Died(cause)),
        row = io.registered(&id) => return Event::Registered(row),
        c = next_order(orders) => return heard(waiters, c),
        _ = tokio::time::sleep_until(deadline) => {
            worker.stop(timing.stop_timeout).await;
            Event::Ended(Failure::NoRegister)
        }
    };
    io.forget(&id);
    event
}

/// The next order; a closed channel never fires.
async fn next_order(orders: &mut Orders) -> Command {
    match orders.recv().await {
        Some(c) => c,
        None => std::future::pending().await,
    }
}

/// An order heard: its waiter waits for the slot to get somewhere.
fn heard<W>(waiters: &mut Vec<oneshot::Sender<Done>>, c: Command) -> Event<W> {
    waiters.extend(c.done);
    Event::Order(c.order)
}

/// Marks a worker found hung, stops it, and says so.
async fn stop_hung<I: Io>(
    io: &mut I,
    worker: &mut I::Worker,
    row: WorkerRow,
    reason: HungReason,
    timing: Timing,
) -> Event<I::Worker> {
    io.mark_hung(row).await;
    let cause = worker.stop(timing.stop_timeout).await;
    tracing::info!(worker = %worker.id(), "stopped the hung worker ({cause})");
    Event::Ended(Failure::Hung(reason))
}

/// How often an idle built-in worker refreshes its heartbeat: often enough
/// to stay well inside `heartbeat_timeout`, rarely enough to keep an idle
/// pool's writes low.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

#[cfg(test)]
mod tests;
