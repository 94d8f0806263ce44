//! The pool's slots while it runs: all started by `start`, added and
//! retired by `scale`, replaced by `restart` and recycling, and changed by
//! `reload`. Each slot is a task (`slot::run`) that takes orders through
//! its channel; the [`Directory`] of those channels is shared with the
//! monitor (hung reports, recycling). What an entry runs is a
//! [`SharedEntry`] its slots read at every launch, so a reload changes what
//! the next worker runs, and a rolling replacement makes it happen.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::rollout::{self, OperationId, Operations, Outcome, Rollouts};
use crate::config::{Config, WorkerProgram};
use crate::contract::SlotId;
use crate::db;
use crate::executor::Executor;
use crate::supervisor::shared::{SharedConfig, lock};
use crate::supervisor::slot::io::Links;
use crate::supervisor::slot::{self, Command, Directory, Done, Entry, Order, SharedEntry, SlotChannels, Why};
use crate::vocab::Mode;

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
    generations: Arc<AtomicU64>,
    /// Restarts and reloads under way (their clients ask how they stand).
    pub operations: Operations,
    rollouts: Rollouts,
    wanted: Wanted,
}

/// Why the fleet refuses a request; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no pool takes `{worker_type}` (known: {known})")]
    UnknownType { worker_type: String, known: String },
    #[error("`{0}` names no running type or slot (TYPE or TYPE-N)")]
    UnknownTarget(String),
}

/// What a scale did.
#[derive(Debug, Default)]
pub struct Scaled {
    pub line: String,
    pub started: Vec<u32>,
    pub retiring: Vec<u32>,
}

/// How long a write of the wanted counts may hold up a request: it goes on
/// in the background (a database lock) and the last value wins.
const WANTED_WAIT: Duration = Duration::from_secs(1);

/// Writes what the pool wants, for `stats`, in the background: the latest
/// value wins, and a database lock never holds up a control request.
struct Wanted {
    tx: watch::Sender<(u64, Vec<(String, u32)>)>,
    written: watch::Receiver<u64>,
}

impl Wanted {
    fn spawn(db: db::Db, token: CancellationToken, tasks: &mut JoinSet<()>) -> Wanted {
        let (tx, mut rx) = watch::channel((0u64, Vec::new()));
        let (written_tx, written) = watch::channel(0u64);
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let (version, wanted) = rx.borrow_and_update().clone();
                let result = db
                    .call_until_done("recording the wanted workers", move |c| {
                        db::slots::set_wanted(c, &wanted)
                    })
                    .await;
                if let Err(e) = result {
                    warn!("{e:#}");
                }
                written_tx.send_replace(version);
            }
        });
        Wanted { tx, written }
    }

    /// Records `wanted`; waits a moment for it to be written.
    async fn record(&mut self, wanted: Vec<(String, u32)>) {
        let version = self.tx.borrow().0 + 1;
        self.tx.send_replace((version, wanted));
        // Written in the background if not within the wait.
        tokio::time::timeout(WANTED_WAIT, self.written.wait_for(|v| *v >= version))
            .await
            .ok();
    }
}

impl Fleet {
    pub fn new(
        config: Arc<Config>,
        executors: &[(Executor, Mode)],
        links: Links,
        token: CancellationToken,
        operations: Operations,
    ) -> Fleet {
        let entries = config
            .workers
            .iter()
            .zip(executors)
            .map(|(w, (executor, mode))| {
                let entry = Entry {
                    worker: Arc::new(w.clone()),
                    executor: executor.clone(),
                    mode: *mode,
                    generation: 0,
                };
                (w.worker_type.clone(), Arc::new(Mutex::new(entry)))
            })
            .collect();
        let config: SharedConfig = Arc::new(RwLock::new(config));
        let directory: Directory = Arc::new(Mutex::new(HashMap::new()));
        let limit = {
            let config = config.clone();
            Arc::new(move || replace_limit(&config.read().unwrap_or_else(|e| e.into_inner())))
        };
        let (rollouts, rolling) = Rollouts::spawn(directory.clone(), operations.clone(), limit, token.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            if let Err(e) = rolling.await {
                tracing::error!("the roll-out task failed: {e}");
            }
        });
        let wanted = Wanted::spawn(links.db.clone(), token.clone(), &mut tasks);
        Fleet {
            config,
            directory,
            tasks,
            links,
            token,
            entries,
            next_index: HashMap::new(),
            generations: Arc::new(AtomicU64::new(0)),
            operations,
            rollouts,
            wanted,
        }
    }

    pub fn current(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records what the pool wants now, for `stats` (waiting at most a
    /// second for the write).
    pub async fn record_wanted(&mut self) {
        let wanted: Vec<(String, u32)> = self
            .entries
            .iter()
            .map(|(t, e)| (t.clone(), lock(e).worker.count))
            .collect();
        self.wanted.record(wanted).await;
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
        let restart = crate::supervisor::policy::for_protocol(config.pool.restart.clone(), self.links.db.protocol());
        let mut ctx = slot::machine::Context::new(restart, config.pool.startup_timeout);
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
    fn order(&self, slot: &SlotId, order: Order) -> Option<oneshot::Receiver<Done>> {
        let (tx, rx) = oneshot::channel();
        let channels = lock(&self.directory).get(slot).cloned()?;
        channels.orders.send(Command { order, done: Some(tx) }).ok()?;
        Some(rx)
    }

    /// Grows at once; shrinks by retiring idle workers first, busy ones
    /// after their current job (unless `now`). Returns what it did.
    pub async fn scale(&mut self, worker_type: &str, wanted: u32, now: bool) -> Result<Scaled, Refused> {
        let Some(entry) = self.entries.get(worker_type).cloned() else {
            return Err(Refused::UnknownType {
                worker_type: worker_type.to_string(),
                known: self.types(),
            });
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
            let started: Vec<u32> = (have..wanted).filter_map(|_| self.spawn_slot(worker_type)).collect();
            let line = format!("{worker_type}: {have} → {wanted} (started slots {})", list(&started));
            return Ok(Scaled {
                line,
                started,
                ..Scaled::default()
            });
        }
        if wanted == have {
            return Ok(Scaled {
                line: format!("{worker_type}: already {have}"),
                ..Scaled::default()
            });
        }
        let order = self.retire_order(worker_type, &running).await;
        let retiring: Vec<u32> = order.into_iter().take((have - wanted) as usize).collect();
        for &i in &retiring {
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
        Ok(Scaled {
            line: format!(
                "{worker_type}: {have} → {wanted} (retiring slots {}, {how})",
                list(&retiring)
            ),
            retiring,
            ..Scaled::default()
        })
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
    /// The database is asked which are busy, briefly: behind a lock, the
    /// highest go first.
    async fn retire_order(&self, worker_type: &str, running: &[u32]) -> Vec<u32> {
        let t = worker_type.to_string();
        let asked = self.links.db.call(move |c| db::slots::busy_slots(c, &t));
        let busy: Vec<u32> = match tokio::time::timeout(Duration::from_secs(1), asked).await {
            Ok(Ok(busy)) => busy,
            Ok(Err(e)) => {
                warn!("which workers are busy: {e:#}");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let mut order: Vec<u32> = running.iter().rev().copied().collect();
        order.sort_by_key(|i| busy.contains(i));
        order
    }

    /// Every slot that is not retiring, in order.
    pub fn all_slots(&self) -> Vec<SlotId> {
        let mut all: Vec<SlotId> = lock(&self.directory)
            .iter()
            .filter(|(_, c)| !c.retiring)
            .map(|(s, _)| s.clone())
            .collect();
        all.sort();
        all
    }

    /// Starts replacing the workers of `slots`: one at a time with
    /// `rolling` (each replacement registered before the next goes, after
    /// the replacements already queued), else all at once; busy workers
    /// finish their job first unless `now`. Given-up slots start again.
    /// Returns the operation its client follows.
    pub fn restart(&mut self, slots: Vec<SlotId>, rolling: bool, now: bool, why: &str) -> OperationId {
        let op = self
            .operations
            .create(Vec::new(), false, vec![(String::new(), slots.clone(), rolling)]);
        if rolling {
            let items = slots
                .into_iter()
                .map(|slot| rollout::Item {
                    slot,
                    ops: vec![op],
                    why: why.to_string(),
                    now,
                    reload: None,
                })
                .collect();
            self.rollouts.enqueue(items);
            return op;
        }
        let mut waiting = Vec::new();
        for slot in slots {
            let order = Order::Replace {
                now,
                why: Why::Restart(why.to_string()),
            };
            match self.order(&slot, order) {
                Some(rx) => waiting.push((slot, rx)),
                None => self.operations.resolve(op, &slot, Outcome::Retired),
            }
        }
        let (operations, limit) = (self.operations.clone(), replace_limit(&self.current()));
        self.tasks.spawn(async move {
            let settled = waiting.into_iter().map(|(slot, rx)| async move {
                let outcome = match tokio::time::timeout(limit, rx).await {
                    Ok(Ok(Ok(()))) => Outcome::Replaced,
                    Ok(Ok(Err(e))) => Outcome::Failed(e.to_string()),
                    Ok(Err(_)) => Outcome::Retired,
                    Err(_) => Outcome::Failed(slot::NotDone::TooSlow(limit).to_string()),
                };
                (slot, outcome)
            });
            for (slot, outcome) in futures_util::future::join_all(settled).await {
                operations.resolve(op, &slot, outcome);
            }
        });
        op
    }

    /// Queues a reload's replacement of `slots` (one at a time): the new
    /// setup of their entry, generation `generation`, rolls out unless a
    /// new worker fails, which brings `previous` back.
    pub fn roll_out(&mut self, op: OperationId, slots: Vec<SlotId>, previous: Entry, generation: u64) {
        let Some(entry) = slots.first().and_then(|s| self.entries.get(&s.worker_type)).cloned() else {
            return;
        };
        let reload = rollout::Reload {
            op,
            generation,
            entry,
            previous,
            config: self.config.clone(),
            generations: self.generations.clone(),
        };
        let items = slots
            .into_iter()
            .map(|slot| rollout::Item {
                slot,
                ops: vec![op],
                why: "the config changed (reload)".into(),
                now: false,
                reload: Some(reload.clone()),
            })
            .collect();
        self.rollouts.enqueue(items);
    }

    fn types(&self) -> String {
        self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The entries (for reload): type → its current setup.
    pub fn entry(&self, worker_type: &str) -> Option<Entry> {
        self.entries.get(worker_type).map(|e| lock(e).clone())
    }

    /// A new entry (reload): its slots start.
    pub fn add_entry(&mut self, mut entry: Entry) {
        let (t, count) = (entry.worker.worker_type.clone(), entry.worker.count);
        crate::supervisor::bells::install(&self.current().pool.db_path, std::slice::from_ref(&t));
        entry.generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
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
    /// Returns the setup it had, and the new one's generation.
    pub fn change_entry(&mut self, mut entry: Entry) -> Option<(Entry, u64)> {
        let shared = self.entries.get(&entry.worker.worker_type)?;
        entry.generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let generation = entry.generation;
        let previous = std::mem::replace(&mut *lock(shared), entry);
        Some((previous, generation))
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

    pub fn config_path(&self) -> std::path::PathBuf {
        self.current().path.clone()
    }

    pub fn set_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

/// How long one replacement may take: the old worker's job, then the
/// new worker's start.
fn replace_limit(c: &Config) -> Duration {
    let job = c.workers.iter().map(|w| w.max_job_time).max().unwrap_or_default();
    job + c.pool.startup_timeout + c.pool.stop_timeout * 2
}

fn list(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}
