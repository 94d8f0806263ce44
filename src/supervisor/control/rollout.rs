//! Replacing workers in the background, so that a control request is
//! answered at once and the next one never waits behind a long operation.
//!
//! A `restart` or `reload` becomes an [`Operation`]: the slots it replaces,
//! and what became of each (replaced, failed, superseded by a later
//! request, retired meanwhile). Its client asks for its progress until it
//! is done (`Request::Progress`). Replacements one at a time (`restart
//! --rolling`, a changed entry of a reload) go through one queue, served
//! by one task ([`run`]): at most one queued replacement per slot, so a
//! storm of requests collapses into one replacement of each slot (later
//! requests join the queued one: the last writer wins).
//!
//! A reload rolls out safely: if a new worker fails to start or register,
//! the roll-out of that entry stops, the entry goes back to its previous
//! setup (the slot that failed is replaced again with it), and the workers
//! not yet replaced keep running.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::contract::SlotId;
use crate::supervisor::shared::{SharedConfig, lock};
use crate::supervisor::slot::{Command, Directory, Done, Entry, NotDone, Order, SharedEntry, Why};

pub type OperationId = u64;

/// What became of one slot of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Replaced,
    /// A later request replaces it instead (a later reload of its entry).
    Superseded(String),
    /// The slot ended meanwhile (scaled down, its entry removed).
    Retired,
    /// Not replaced: the roll-out of its entry stopped; its worker runs on.
    Kept,
    Failed(String),
}

/// A group of slots an operation replaces, reported as one line.
#[derive(Debug)]
struct Group {
    /// The line's start, e.g. "changed `w`: ".
    prefix: String,
    slots: Vec<SlotId>,
    /// "one at a time" or "all at once".
    how: &'static str,
    outcomes: BTreeMap<SlotId, Outcome>,
    /// Said when the group ends (a roll-back).
    notes: Vec<String>,
}

impl Group {
    fn done(&self) -> bool {
        self.slots.iter().all(|s| self.outcomes.contains_key(s))
    }

    fn ok(&self) -> bool {
        !self.outcomes.values().any(|o| matches!(o, Outcome::Failed(_)))
    }

    fn line(&self) -> String {
        let names = |f: &dyn Fn(&Outcome) -> bool| -> Vec<String> {
            self.slots
                .iter()
                .filter(|s| self.outcomes.get(*s).is_some_and(f))
                .map(|s| s.to_string())
                .collect()
        };
        let mut parts = Vec::new();
        let failed: Vec<String> = self
            .slots
            .iter()
            .filter_map(|s| match self.outcomes.get(s) {
                Some(Outcome::Failed(why)) => Some(format!("{s}: {why}")),
                _ => None,
            })
            .collect();
        let replaced = names(&|o| matches!(o, Outcome::Replaced | Outcome::Superseded(_)));
        if failed.is_empty() {
            parts.push(format!("replaced {} ({})", replaced.join(", "), self.how));
        } else {
            parts.push(failed.join("; "));
            if !replaced.is_empty() {
                parts.push(format!("replaced {}", replaced.join(", ")));
            }
        }
        let kept = names(&|o| matches!(o, Outcome::Kept));
        if !kept.is_empty() {
            parts.push(format!("not replaced: {}", kept.join(", ")));
        }
        let retired = names(&|o| matches!(o, Outcome::Retired));
        if !retired.is_empty() {
            parts.push(format!("{} retired meanwhile", retired.join(", ")));
        }
        parts.extend(self.notes.iter().cloned());
        format!("{}{}", self.prefix, parts.join("; "))
    }
}

/// A `restart` or `reload` under way, or done.
#[derive(Debug)]
struct Operation {
    /// What was done at once (a reload's added and removed entries).
    lines: Vec<String>,
    groups: Vec<Group>,
    /// The request itself failed in part (a reload's scale of an entry).
    failed_at_once: bool,
}

/// How an operation stands, for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub done: bool,
    pub ok: bool,
    pub lines: Vec<String>,
    /// Slots dealt with, of all the operation's slots.
    pub settled: usize,
    pub total: usize,
}

/// Every operation of this run (the latest [`KEEP`]).
#[derive(Clone, Default)]
pub struct Operations(Arc<Mutex<Ops>>);

#[derive(Default)]
struct Ops {
    next: OperationId,
    all: BTreeMap<OperationId, Operation>,
}

/// How many operations are remembered.
const KEEP: usize = 256;

impl Operations {
    /// A new operation: `lines` happened at once; each group's slots are
    /// to be replaced.
    pub fn create(
        &self,
        lines: Vec<String>,
        failed_at_once: bool,
        groups: Vec<(String, Vec<SlotId>, bool)>,
    ) -> OperationId {
        let mut ops = lock(&self.0);
        ops.next += 1;
        let id = ops.next;
        let groups = groups
            .into_iter()
            .map(|(prefix, slots, rolling)| Group {
                prefix,
                slots,
                how: if rolling { "one at a time" } else { "all at once" },
                outcomes: BTreeMap::new(),
                notes: Vec::new(),
            })
            .collect();
        ops.all.insert(
            id,
            Operation {
                lines,
                groups,
                failed_at_once,
            },
        );
        while ops.all.len() > KEEP {
            ops.all.pop_first();
        }
        id
    }

    /// Records what became of `slot` in operation `id`.
    pub fn resolve(&self, id: OperationId, slot: &SlotId, outcome: Outcome) {
        let mut ops = lock(&self.0);
        let Some(op) = ops.all.get_mut(&id) else { return };
        for g in &mut op.groups {
            if g.slots.contains(slot) && !g.outcomes.contains_key(slot) {
                g.outcomes.insert(slot.clone(), outcome);
                return;
            }
        }
    }

    /// Adds a note to the group of `slot` in operation `id`.
    fn note(&self, id: OperationId, slot: &SlotId, note: String) {
        let mut ops = lock(&self.0);
        let Some(op) = ops.all.get_mut(&id) else { return };
        if let Some(g) = op.groups.iter_mut().find(|g| g.slots.contains(slot)) {
            g.notes.push(note);
        }
    }

    pub fn progress(&self, id: OperationId) -> Option<Progress> {
        let ops = lock(&self.0);
        let op = ops.all.get(&id)?;
        let done = op.groups.iter().all(Group::done);
        let (settled, total) = op
            .groups
            .iter()
            .fold((0, 0), |(s, t), g| (s + g.outcomes.len(), t + g.slots.len()));
        let mut lines = op.lines.clone();
        if done {
            lines.extend(op.groups.iter().map(Group::line));
        } else {
            lines.push(format!("{settled} of {total} replaced so far"));
        }
        Some(Progress {
            done,
            ok: !op.failed_at_once && op.groups.iter().all(Group::ok),
            lines,
            settled,
            total,
        })
    }
}

/// What a reload's replacement must know to roll the entry back.
#[derive(Clone)]
pub struct Reload {
    /// The reload's operation.
    pub op: OperationId,
    /// The setup this replacement rolls out.
    pub generation: u64,
    pub entry: SharedEntry,
    /// The entry's setup before the reload.
    pub previous: Entry,
    pub config: SharedConfig,
    pub generations: Arc<AtomicU64>,
}

/// One queued replacement of a slot, and the operations waiting for it.
pub struct Item {
    pub slot: SlotId,
    pub ops: Vec<OperationId>,
    pub why: String,
    pub now: bool,
    pub reload: Option<Reload>,
}

/// The queue's handle.
#[derive(Clone)]
pub struct Rollouts {
    tx: mpsc::UnboundedSender<Vec<Item>>,
}

impl Rollouts {
    /// Starts the task that serves the queue.
    pub fn spawn(
        directory: Directory,
        operations: Operations,
        limit: Arc<dyn Fn() -> Duration + Send + Sync>,
        token: CancellationToken,
    ) -> (Rollouts, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(rx, directory, operations, limit, token));
        (Rollouts { tx }, task)
    }

    /// Queues replacements, one at a time after those already queued.
    pub fn enqueue(&self, items: Vec<Item>) {
        // The task ends only with the pool; then nothing is replaced.
        self.tx.send(items).ok();
    }
}

/// An ordered replacement, and how to hear it was carried out.
type Ordered = (Item, oneshot::Receiver<Done>);

/// The replacement under way, with its deadline.
struct InFlight {
    item: Item,
    deadline: tokio::time::Instant,
    done: oneshot::Receiver<Done>,
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Vec<Item>>,
    directory: Directory,
    operations: Operations,
    limit: Arc<dyn Fn() -> Duration + Send + Sync>,
    token: CancellationToken,
) {
    let mut queue: VecDeque<Item> = VecDeque::new();
    let mut in_flight: Option<InFlight> = None;
    loop {
        if in_flight.is_none() {
            in_flight = start_next(&mut queue, &directory, &operations).map(|(item, done)| InFlight {
                item,
                deadline: tokio::time::Instant::now() + limit(),
                done,
            });
        }
        tokio::select! {
            _ = token.cancelled() => {
                let left = queue.drain(..).chain(in_flight.take().map(|f| f.item));
                for item in left {
                    for op in &item.ops {
                        operations.resolve(*op, &item.slot, Outcome::Failed("the pool stopped".into()));
                    }
                }
                return;
            }
            items = rx.recv() => match items {
                Some(items) => merge(&mut queue, items, &operations),
                None => return,
            },
            result = async {
                match &mut in_flight {
                    Some(f) => tokio::time::timeout_at(f.deadline, &mut f.done).await,
                    None => std::future::pending().await,
                }
            } => {
                let item = in_flight.take().expect("in flight").item;
                let outcome = match result {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => Err(e),
                    Ok(Err(_)) => Err(NotDone::SlotEnded),
                    Err(_) => Err(NotDone::TooSlow(limit())),
                };
                finish(item, outcome, &mut queue, &directory, &operations);
            }
        }
    }
}

/// Adds items to the queue; a slot already queued gets one replacement.
fn merge(queue: &mut VecDeque<Item>, items: Vec<Item>, operations: &Operations) {
    for item in items {
        let Some(queued) = queue.iter_mut().find(|q| q.slot == item.slot) else {
            queue.push_back(item);
            continue;
        };
        if let Some(later) = item.reload {
            // A later reload of the entry: what an earlier one would have
            // rolled out is superseded.
            if let Some(earlier) = queued.reload.replace(later) {
                queued.ops.retain(|op| *op != earlier.op);
                operations.resolve(earlier.op, &item.slot, Outcome::Superseded("by a later reload".into()));
            }
            queued.why = item.why;
        }
        queued.now |= item.now;
        queued.ops.extend(item.ops);
    }
}

/// Takes the next queued replacement that still makes sense and orders it.
fn start_next(queue: &mut VecDeque<Item>, directory: &Directory, operations: &Operations) -> Option<Ordered> {
    while let Some(mut item) = queue.pop_front() {
        if let Some(r) = item.reload.take_if(|r| lock(&r.entry).generation != r.generation) {
            // The entry changed again since (a roll-back): this setup is no
            // longer the one to roll out; restarts that joined still happen.
            item.ops.retain(|op| *op != r.op);
            operations.resolve(r.op, &item.slot, Outcome::Superseded("by a later change".into()));
            if item.ops.is_empty() {
                continue;
            }
        }
        let channels = lock(directory).get(&item.slot).cloned();
        let Some(channels) = channels.filter(|c| !c.retiring) else {
            for op in &item.ops {
                operations.resolve(*op, &item.slot, Outcome::Retired);
            }
            continue;
        };
        let (tx, rx) = oneshot::channel();
        let order = Order::Replace {
            now: item.now,
            why: Why::Restart(item.why.clone()),
        };
        if channels.orders.send(Command { order, done: Some(tx) }).is_err() {
            for op in &item.ops {
                operations.resolve(*op, &item.slot, Outcome::Retired);
            }
            continue;
        }
        return Some((item, rx));
    }
    None
}

/// What a finished replacement means for its operations, and for the rest
/// of a reload's roll-out when it failed.
fn finish(item: Item, outcome: Done, queue: &mut VecDeque<Item>, directory: &Directory, operations: &Operations) {
    let error = match outcome {
        Ok(()) => {
            info!(slot = %item.slot, "replaced");
            for op in &item.ops {
                operations.resolve(*op, &item.slot, Outcome::Replaced);
            }
            return;
        }
        Err(e) => e,
    };
    warn!(slot = %item.slot, "replacing the worker failed: {error}");
    for op in &item.ops {
        operations.resolve(*op, &item.slot, Outcome::Failed(error.to_string()));
    }
    let Some(reload) = item.reload else { return };
    // The roll-out of this setup stops: the workers not yet replaced keep
    // theirs; the restarts that joined them still happen.
    let mut kept = Vec::new();
    for q in queue.iter_mut() {
        // Generations are numbered across entries: one names one change.
        if let Some(r) = q.reload.take_if(|r| r.generation == reload.generation) {
            q.ops.retain(|op| *op != r.op);
            operations.resolve(r.op, &q.slot, Outcome::Kept);
            kept.push(q.slot.to_string());
        }
    }
    queue.retain(|q| !q.ops.is_empty());
    let rolled_back = roll_back(&reload);
    let note = if rolled_back {
        // The slot that failed starts again at once, with the setup it had.
        let order = Order::Replace {
            now: true,
            why: Why::Restart("rolled back to the previous setup".into()),
        };
        if let Some(c) = lock(directory).get(&item.slot) {
            c.orders.send(Command { order, done: None }).ok();
        }
        format!(
            "roll-out stopped; `{}` is back to its previous setup, and {} starts again with it",
            item.slot.worker_type, item.slot
        )
    } else {
        "roll-out stopped".to_string()
    };
    warn!(worker_type = %item.slot.worker_type, kept = ?kept, "{note}");
    for op in &item.ops {
        operations.note(*op, &item.slot, note.clone());
    }
}

/// Puts the entry back to its setup before the reload, if nothing changed
/// it since (the count is kept: a scale meanwhile stands). Returns whether
/// it did.
fn roll_back(reload: &Reload) -> bool {
    let back = {
        let mut entry = lock(&reload.entry);
        if entry.generation != reload.generation {
            return false;
        }
        let mut worker = (*reload.previous.worker).clone();
        worker.count = entry.worker.count;
        *entry = Entry {
            worker: Arc::new(worker),
            generation: reload.generations.fetch_add(1, Ordering::SeqCst) + 1,
            ..reload.previous.clone()
        };
        entry.worker.clone()
    };
    let mut config = reload.config.write().unwrap_or_else(|e| e.into_inner());
    let mut c: Config = (**config).clone();
    for w in &mut c.workers {
        if w.worker_type == back.worker_type {
            *w = (*back).clone();
        }
    }
    *config = Arc::new(c);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{Mode, ModeKind};

    fn slot(i: u32) -> SlotId {
        SlotId {
            worker_type: "w".into(),
            index: i,
        }
    }

    fn config() -> Config {
        let text = "[[workers]]\nworker_type = \"w\"\ncount = 2\njob_command = [\"true\"]\n";
        Config::parse(std::path::Path::new("/cfg/pool.toml"), text, &[]).unwrap()
    }

    fn reload(op: OperationId, generation: u64) -> Reload {
        let config = config();
        let entry = Entry {
            worker: Arc::new(config.workers[0].clone()),
            executor: crate::executor::Executor::Direct,
            mode: Mode {
                kind: ModeKind::Direct,
                auto: false,
            },
            generation,
        };
        Reload {
            op,
            generation,
            entry: Arc::new(Mutex::new(entry.clone())),
            previous: entry,
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
            generations: Arc::new(AtomicU64::new(generation)),
        }
    }

    fn item(i: u32, op: OperationId, reload: Option<Reload>) -> Item {
        Item {
            slot: slot(i),
            ops: vec![op],
            why: "test".into(),
            now: false,
            reload,
        }
    }

    #[test]
    fn an_operation_tells_how_far_it_got_then_what_became_of_each_slot() {
        let ops = Operations::default();
        let id = ops.create(
            vec!["added `x` (1 worker(s))".into()],
            false,
            vec![("changed `w`: ".into(), vec![slot(0), slot(1), slot(2)], true)],
        );
        ops.resolve(id, &slot(0), Outcome::Replaced);
        let p = ops.progress(id).unwrap();
        assert!(!p.done && p.ok);
        assert_eq!((p.settled, p.total), (1, 3));
        assert_eq!(p.lines, ["added `x` (1 worker(s))", "1 of 3 replaced so far"]);
        ops.resolve(
            id,
            &slot(1),
            Outcome::Failed("its new worker exited with code 3".into()),
        );
        ops.note(id, &slot(1), "roll-out stopped".into());
        ops.resolve(id, &slot(2), Outcome::Kept);
        let p = ops.progress(id).unwrap();
        assert!(p.done && !p.ok);
        assert_eq!(
            p.lines[1],
            "changed `w`: w-1: its new worker exited with code 3; replaced w-0; not replaced: w-2; roll-out stopped"
        );
        // A plain restart that went well reads as it always did.
        let id = ops.create(Vec::new(), false, vec![(String::new(), vec![slot(0), slot(3)], false)]);
        ops.resolve(id, &slot(0), Outcome::Replaced);
        ops.resolve(id, &slot(3), Outcome::Retired);
        let p = ops.progress(id).unwrap();
        assert!(p.done && p.ok);
        assert_eq!(p.lines, ["replaced w-0 (all at once); w-3 retired meanwhile"]);
        assert!(ops.progress(99).is_none());
    }

    #[test]
    fn a_slot_is_queued_once_and_a_later_reload_supersedes_an_earlier_one() {
        let ops = Operations::default();
        let first = ops.create(Vec::new(), false, vec![(String::new(), vec![slot(0)], true)]);
        let restart = ops.create(Vec::new(), false, vec![(String::new(), vec![slot(1)], true)]);
        let later = ops.create(Vec::new(), false, vec![(String::new(), vec![slot(0), slot(1)], true)]);
        let mut queue = VecDeque::new();
        merge(
            &mut queue,
            vec![item(0, first, Some(reload(first, 1))), item(1, restart, None)],
            &ops,
        );
        merge(
            &mut queue,
            vec![
                item(0, later, Some(reload(later, 2))),
                item(1, later, Some(reload(later, 2))),
            ],
            &ops,
        );
        assert_eq!(queue.len(), 2, "one replacement per slot");
        assert_eq!(queue[0].ops, vec![later]);
        assert_eq!(queue[0].reload.as_ref().map(|r| r.generation), Some(2));
        assert_eq!(
            queue[1].ops,
            vec![restart, later],
            "the restart is carried out by the reload's replacement"
        );
        let p = ops.progress(first).unwrap();
        assert!(p.done && p.ok, "superseded: {p:?}");
        assert!(!ops.progress(restart).unwrap().done);
    }
}
