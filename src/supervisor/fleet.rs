//! The pool's slots while it runs: all started by `start`, added and
//! retired by `scale`, replaced by `restart` and recycling, and changed by
//! `reload`. Each slot is a task (`slot::run`) that takes orders through
//! its channel; the [`Directory`] of those channels is shared with the
//! monitor (hung reports, recycling). What an entry runs is a
//! [`SharedEntry`] its slots read at every launch, so a reload changes what
//! the next worker runs, and a rolling replacement makes it happen.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::monitor::Hung;
use super::slot::io::Links;
use super::slot::{self, Command, Order, Why};
use crate::config::{Config, WorkerConfig, WorkerProgram};
use crate::db;
use crate::executor::Executor;
use crate::vocab::{Mode, SlotId};

/// What an entry's workers run; its slots read it at every launch.
#[derive(Clone)]
pub struct Entry {
    pub worker: Arc<WorkerConfig>,
    pub executor: Executor,
    pub mode: Mode,
}

pub type SharedEntry = Arc<Mutex<Entry>>;

/// The config in force (replaced by a reload).
pub type SharedConfig = Arc<RwLock<Arc<Config>>>;

/// How to reach a running slot.
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

pub struct Fleet {
    pub config: SharedConfig,
    pub directory: Directory,
    pub tasks: JoinSet<()>,
    links: Links,
    token: CancellationToken,
    entries: BTreeMap<String, SharedEntry>,
    /// The next slot index of each type: indices are never used twice in
    /// a run, so a new slot never takes the identity (its records, its
    /// worker's jobs) of one that is still draining.
    next_index: HashMap<String, u32>,
}

/// Orders sent, and how to hear back.
type Waiting = Vec<(SlotId, oneshot::Receiver<Result<(), String>>)>;

impl Fleet {
    pub fn new(config: Arc<Config>, executors: &[(Executor, Mode)], links: Links, token: CancellationToken) -> Fleet {
        let entries = config
            .workers
            .iter()
            .zip(executors)
            .map(|(w, (executor, mode))| {
                let entry = Entry {
                    worker: Arc::new(w.clone()),
                    executor: executor.clone(),
                    mode: *mode,
                };
                (w.worker_type.clone(), Arc::new(Mutex::new(entry)))
            })
            .collect();
        Fleet {
            config: Arc::new(RwLock::new(config)),
            directory: Arc::new(Mutex::new(HashMap::new())),
            tasks: JoinSet::new(),
            links,
            token,
            entries,
            next_index: HashMap::new(),
        }
    }

    pub fn current(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records what the pool wants now, for `stats`.
    pub async fn record_wanted(&self) {
        let wanted: Vec<(String, u32)> = self
            .entries
            .iter()
            .map(|(t, e)| (t.clone(), lock(e).worker.count))
            .collect();
        if let Err(e) = self
            .links
            .db
            .call_until_done("recording the wanted workers", move |c| {
                db::pool::set_wanted(c, &wanted)
            })
            .await
        {
            warn!("{e:#}");
        }
    }

    /// Starts every slot of every entry.
    pub fn start_all(&mut self) {
        let counts: Vec<(String, u32)> = self
            .entries
            .iter()
            .map(|(t, e)| (t.clone(), lock(e).worker.count))
            .collect();
        for (worker_type, count) in counts {
            for _ in 0..count {
                self.spawn_slot(&worker_type);
            }
        }
    }

    /// Starts a new slot of a type, with an index never used before in
    /// this run; returns it.
    fn spawn_slot(&mut self, worker_type: &str) -> Option<u32> {
        let entry = self.entries.get(worker_type).cloned()?;
        let next = self.next_index.entry(worker_type.to_string()).or_insert(0);
        let index = *next;
        *next += 1;
        let config = self.current();
        let (hung_tx, hung) = mpsc::unbounded_channel();
        let (orders_tx, orders) = mpsc::unbounded_channel();
        let id = SlotId {
            worker_type: worker_type.to_string(),
            index,
        };
        lock(&self.directory).insert(
            id.clone(),
            SlotChannels {
                hung: hung_tx,
                orders: orders_tx,
                retiring: false,
            },
        );
        let builtin = matches!(lock(&entry).worker.program, WorkerProgram::JobCommand(_));
        let mut io = slot::SlotIo::new(config.clone(), entry, index, self.links.clone(), hung);
        let mut ctx = slot::machine::Context::new(config.pool.restart.clone(), config.pool.startup_timeout);
        ctx.clean_exit_is_recycle = builtin;
        let timing = slot::Timing {
            startup_timeout: config.pool.startup_timeout,
            stop_timeout: config.pool.stop_timeout,
        };
        let (token, directory) = (self.token.clone(), self.directory.clone());
        self.tasks.spawn(async move {
            slot::run(&mut io, ctx, timing, token, orders).await;
            lock(&directory).remove(&id);
        });
        Some(index)
    }

    /// The slots of a type that are not retiring, lowest index first.
    fn slots_of(&self, worker_type: &str) -> Vec<u32> {
        let mut v: Vec<u32> = lock(&self.directory)
            .iter()
            .filter(|(s, c)| s.worker_type == worker_type && !c.retiring)
            .map(|(s, _)| s.index)
            .collect();
        v.sort();
        v
    }

    /// Sends an order to a slot; None if it is not running.
    fn order(&self, slot: &SlotId, order: Order) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (tx, rx) = oneshot::channel();
        let channels = lock(&self.directory).get(slot).cloned()?;
        channels.orders.send(Command { order, done: Some(tx) }).ok()?;
        Some(rx)
    }

    /// Grows at once; shrinks by retiring idle workers first, busy ones
    /// after their current job (unless `now`). Returns what it did.
    pub async fn scale(&mut self, worker_type: &str, wanted: u32, now: bool) -> Result<String, String> {
        let Some(entry) = self.entries.get(worker_type).cloned() else {
            return Err(format!("no pool takes `{worker_type}` (known: {})", self.types()));
        };
        let running = self.slots_of(worker_type);
        let have = running.len() as u32;
        {
            let mut e = lock(&entry);
            let mut w = (*e.worker).clone();
            w.count = wanted;
            e.worker = Arc::new(w);
        }
        if wanted > have {
            let added: Vec<u32> = (have..wanted).filter_map(|_| self.spawn_slot(worker_type)).collect();
            return Ok(format!(
                "{worker_type}: {have} → {wanted} (started slots {})",
                list(&added)
            ));
        }
        if wanted == have {
            return Ok(format!("{worker_type}: already {have}"));
        }
        let order = self.retire_order(worker_type, &running).await;
        let retired: Vec<u32> = order.into_iter().take((have - wanted) as usize).collect();
        for &i in &retired {
            let slot = SlotId {
                worker_type: worker_type.to_string(),
                index: i,
            };
            self.retire(&slot, now, Why::Retire(format!("scaled to {wanted}")));
        }
        let how = if now {
            "at once"
        } else {
            "idle ones now, busy ones after their job"
        };
        Ok(format!(
            "{worker_type}: {have} → {wanted} (retiring slots {}, {how})",
            list(&retired)
        ))
    }

    /// Tells a slot to end (after its worker's job unless `now`); from now
    /// on it no longer counts among its type's slots.
    fn retire(&self, slot: &SlotId, now: bool, why: Why) {
        if self.order(slot, Order::Retire { now, why }).is_some()
            && let Some(c) = lock(&self.directory).get_mut(slot)
        {
            c.retiring = true;
        }
    }

    /// Which slots of a type to retire first: idle ones, highest first.
    async fn retire_order(&self, worker_type: &str, running: &[u32]) -> Vec<u32> {
        let t = worker_type.to_string();
        let busy: Vec<u32> = self
            .links
            .db
            .call(move |c| db::pool::busy_slots(c, &t))
            .await
            .unwrap_or_default();
        let mut order: Vec<u32> = running.iter().rev().copied().collect();
        order.sort_by_key(|i| busy.contains(i));
        order
    }

    /// Replaces the workers of `targets` (every slot when empty): one at a
    /// time with `rolling` (each replacement registered before the next
    /// goes), else all at once; busy workers finish their job first unless
    /// `now`. Given-up slots start again.
    pub async fn restart(&mut self, targets: &[SlotId], rolling: bool, now: bool, why: &str) -> Result<String, String> {
        let slots: Vec<SlotId> = if targets.is_empty() {
            let mut all: Vec<SlotId> = lock(&self.directory)
                .iter()
                .filter(|(_, c)| !c.retiring)
                .map(|(s, _)| s.clone())
                .collect();
            all.sort();
            all
        } else {
            targets.to_vec()
        };
        let mut waiting: Waiting = Vec::new();
        let mut failed = Vec::new();
        let limit = self.replace_limit();
        for slot in &slots {
            let order = Order::Replace {
                now,
                why: Why::Restart(why.to_string()),
            };
            let Some(rx) = self.order(slot, order) else {
                failed.push(format!("{slot}: no such running slot"));
                continue;
            };
            if rolling {
                if let Err(e) = settle(slot, rx, limit).await {
                    failed.push(e);
                }
            } else {
                waiting.push((slot.clone(), rx));
            }
        }
        for (slot, rx) in waiting {
            if let Err(e) = settle(&slot, rx, limit).await {
                failed.push(e);
            }
        }
        let names: Vec<String> = slots.iter().map(|s| s.to_string()).collect();
        if failed.is_empty() {
            Ok(format!(
                "replaced {} ({})",
                names.join(", "),
                if rolling { "one at a time" } else { "all at once" }
            ))
        } else {
            Err(format!("replacing {}: {}", names.join(", "), failed.join("; ")))
        }
    }

    /// How long one replacement may take: the old worker's job, then the
    /// new worker's start.
    fn replace_limit(&self) -> Duration {
        let c = self.current();
        let job = c.workers.iter().map(|w| w.max_job_time).max().unwrap_or_default();
        job + c.pool.startup_timeout + c.pool.stop_timeout * 2
    }

    fn types(&self) -> String {
        self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The entries (for reload): type → its current setup.
    pub fn entry(&self, worker_type: &str) -> Option<Entry> {
        self.entries.get(worker_type).map(|e| lock(e).clone())
    }

    /// A new entry (reload): its slots start.
    pub fn add_entry(&mut self, entry: Entry) {
        let (t, count) = (entry.worker.worker_type.clone(), entry.worker.count);
        super::bells::install(&self.current().pool.db_path, std::slice::from_ref(&t));
        self.entries.insert(t.clone(), Arc::new(Mutex::new(entry)));
        for _ in 0..count {
            self.spawn_slot(&t);
        }
    }

    /// A removed entry (reload): its slots retire gracefully.
    pub fn remove_entry(&mut self, worker_type: &str) -> Vec<u32> {
        let slots = self.slots_of(worker_type);
        for &i in &slots {
            let slot = SlotId {
                worker_type: worker_type.to_string(),
                index: i,
            };
            self.retire(
                &slot,
                false,
                Why::Retire("its entry was removed from the config".into()),
            );
        }
        self.entries.remove(worker_type);
        slots
    }

    /// A changed entry (reload): the next workers run the new setup.
    pub fn change_entry(&mut self, entry: Entry) {
        if let Some(shared) = self.entries.get(&entry.worker.worker_type) {
            *lock(shared) = entry;
        }
    }

    /// The running slots of a type, as ids.
    pub fn slot_ids(&self, worker_type: &str) -> Vec<SlotId> {
        self.slots_of(worker_type)
            .into_iter()
            .map(|index| SlotId {
                worker_type: worker_type.to_string(),
                index,
            })
            .collect()
    }

    /// Replaces one worker gracefully (recycling); false if its slot is gone.
    pub fn recycle(&self, slot: &SlotId, why: String) -> bool {
        let order = Order::Replace {
            now: false,
            why: Why::Recycle(why),
        };
        self.order(slot, order).is_some()
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.current().path.clone()
    }

    pub fn set_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

/// Waits for a slot to carry out an order.
async fn settle(slot: &SlotId, rx: oneshot::Receiver<Result<(), String>>, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(()))) => {
            info!(%slot, "replaced");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(format!("{slot}: {e}")),
        Ok(Err(_)) => Err(format!("{slot}: the slot ended")),
        Err(_) => {
            warn!(%slot, "its replacement did not register in time");
            Err(format!(
                "{slot}: not replaced within {}",
                humantime::format_duration(limit)
            ))
        }
    }
}

fn list(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
