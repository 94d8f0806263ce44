//! How the rest of the supervisor reaches a slot: what its workers run
//! ([`SharedEntry`], read at every launch), its channels ([`SlotChannels`])
//! and the [`Directory`] of every running slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::Command;
use crate::config::WorkerConfig;
use crate::contract::SlotId;
use crate::executor::Executor;
use crate::vocab::{HungReason, Mode, WorkerRow};

/// What an entry's workers run; its slots read it at every launch.
#[derive(Clone)]
pub struct Entry {
    pub worker: Arc<WorkerConfig>,
    pub executor: Executor,
    pub mode: Mode,
    /// Which setup this is: every change of what the workers run (a
    /// reload, a roll-back) gets a new number, across all entries.
    pub generation: u64,
}

pub type SharedEntry = Arc<Mutex<Entry>>;

/// The monitor found a slot's worker hung.
#[derive(Debug, Clone)]
pub struct Hung {
    pub worker_row: WorkerRow,
    pub reason: HungReason,
}

/// How to reach a running slot. Both channels are unbounded: a slot
/// drains them at once, and their senders (the monitor, control
/// requests) must never wait on a slot that is busy stopping a worker;
/// what queues is bounded by the requests themselves (the control socket
/// admits a few at a time, the monitor reports a worker once per tick).
#[derive(Clone)]
pub struct SlotChannels {
    pub hung: mpsc::UnboundedSender<Hung>,
    pub orders: mpsc::UnboundedSender<Command>,
    /// Told to end (scaled down, its entry removed): it no longer counts
    /// among its type's slots, but stays here, and supervised (hung
    /// reports, recycling), until its task has ended.
    pub retiring: bool,
}

/// Every slot whose task runs, shared with the monitor. A slot leaves it
/// when its task ends, never before.
pub type Directory = Arc<Mutex<HashMap<SlotId, SlotChannels>>>;
