//! What the running supervisor does when asked (control socket) or told
//! (SIGHUP): scale, restart, reload. Requests are handled one at a time and
//! each is answered at once: nothing here waits for a worker. Replacing
//! workers goes on in the background (`rollout.rs`) while later requests
//! are served; a later request changes what the pool wants (the last
//! writer wins). A reload applies only the difference between the config
//! in force and the file (see [`plan_reload`], a pure function with table
//! tests).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::fleet::{Fleet, Refused};
use super::server::{Incoming, Request, Response};
use crate::config::{Config, PoolConfig, WorkerConfig};
use crate::contract::SlotId;
use crate::executor::backends::{Backends, EntryError};
use crate::supervisor::slot::Entry;
use crate::vocab::Protocol;

/// How long reading the config file may take (a hung mount, a FIFO).
const READ_WITHIN: Duration = Duration::from_secs(5);

/// How long deciding how a changed entry runs may take (the engine is
/// asked about its image).
const DECIDE_WITHIN: Duration = Duration::from_secs(5);

pub struct Manager {
    pub fleet: Fleet,
    pub protocol: Protocol,
    pub backends: Backends,
    pub token: CancellationToken,
    pub metrics: Arc<crate::supervisor::observe::metrics::Metrics>,
    pub db: crate::db::Db,
}

/// What a reload did so far: the answer's lines, whether a step failed,
/// and the changed entries' roll-outs still to start.
#[derive(Default)]
struct Applied {
    lines: Vec<String>,
    failed: bool,
    /// Per changed entry: its type, the slots to replace, the setup they
    /// run and the new setup's generation.
    rollouts: Vec<(String, Vec<SlotId>, Entry, u64)>,
}

impl Applied {
    fn fail(&mut self, line: String) {
        self.failed = true;
        self.lines.push(line);
    }
}

impl Manager {
    /// Serves requests and SIGHUP until the pool stops.
    pub async fn run(&mut self, mut requests: mpsc::Receiver<Incoming>, mut hangups: Signal) {
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                Some((request, reply)) = requests.recv() => {
                    if reply.is_closed() {
                        // Its client was refused (not answered in time).
                        debug!(?request, "dropped a request nobody waits for");
                        continue;
                    }
                    if let Request::Metrics = request {
                        // A read that a database lock may hold up: beside
                        // the other requests, not in front of them.
                        let (db, metrics) = (self.db.clone(), self.metrics.clone());
                        self.fleet.tasks.spawn(async move {
                            let r = match crate::supervisor::observe::metrics::scrape(&db, &metrics).await {
                                Ok(text) => Response::ok(text.lines().map(str::to_string).collect()),
                                Err(e) => Response::error(format!("{e:#}")),
                            };
                            reply.send(r).ok();
                        });
                        continue;
                    }
                    let response = self.handle(request).await;
                    reply.send(response).ok();
                }
                Some(()) = hangups.recv() => {
                    info!("SIGHUP: reloading the config");
                    let r = self.reload().await;
                    self.fleet.record_wanted().await;
                    for line in &r.lines {
                        if r.ok { info!("reload: {line}") } else { error!("reload refused: {line}") }
                    }
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) -> Response {
        let response = self.carry_out(request).await;
        self.fleet.record_wanted().await;
        response
    }

    async fn carry_out(&mut self, request: Request) -> Response {
        match request {
            Request::Ping => Response::ok(vec![format!("supervisor pid {}", std::process::id())]),
            Request::Stop => {
                info!("stop requested");
                self.token.cancel();
                Response::ok(vec!["stopping".into()])
            }
            Request::Scale { counts, now } => {
                if let Some((t, n)) = counts.iter().find(|(_, n)| *n > crate::config::MAX_COUNT) {
                    return Response::error(format!(
                        "`{t}={n}`: at most {} workers of a type",
                        crate::config::MAX_COUNT
                    ));
                }
                let mut lines = Vec::new();
                for (t, n) in counts {
                    match self.fleet.scale(&t, n, now).await {
                        Ok(s) => lines.push(s.line),
                        Err(e) => return Response::error(e.to_string()),
                    }
                }
                info!("scaled: {}", lines.join("; "));
                Response::ok(lines)
            }
            Request::Restart { targets, rolling, now } => {
                let slots = match self.targets(&targets) {
                    Ok(s) if s.is_empty() => self.fleet.all_slots(),
                    Ok(s) => s,
                    Err(e) => return Response::error(e.to_string()),
                };
                let op = self.fleet.restart(slots, rolling, now, "clx-pool restart");
                super::server::progress(&self.fleet.operations, op)
            }
            Request::Reload => self.reload().await,
            Request::Metrics => Response::error("metrics are answered beside the other requests"),
            Request::Progress { operation } => super::server::progress(&self.fleet.operations, operation),
        }
    }

    /// `TYPE` (every slot of it) or `TYPE-N` names.
    fn targets(&self, names: &[String]) -> Result<Vec<SlotId>, Refused> {
        let mut out = Vec::new();
        for name in names {
            let of_type = self.fleet.slot_ids(name);
            if !of_type.is_empty() {
                out.extend(of_type);
                continue;
            }
            let slot = name
                .parse::<SlotId>()
                .ok()
                .filter(|s| self.fleet.slot_ids(&s.worker_type).contains(s));
            match slot {
                Some(s) => out.push(s),
                None => return Err(Refused::UnknownTarget(name.clone())),
            }
        }
        out.dedup();
        Ok(out)
    }

    /// Re-reads the config; applies the difference, or changes nothing and
    /// says why. Changed entries roll out in the background, one worker at
    /// a time; the answer names the operation that follows them.
    pub async fn reload(&mut self) -> Response {
        let new = match self.read_config().await {
            Ok(c) => c,
            Err(refused) => return refused,
        };
        let current = self.fleet.current();
        let plan = plan_reload(&current, &new);
        let mut entries = match self.prepare_entries(&new, &plan).await {
            Ok(e) => e,
            Err(refused) => return refused,
        };
        let mut applied = Applied::default();
        for t in &plan.removed {
            let slots = self.fleet.remove_entry(t);
            applied.lines.push(format!(
                "removed `{t}` (retiring {} worker(s) after their jobs)",
                slots.len()
            ));
        }
        for t in &plan.added {
            let e = entries.remove(t).expect("prepared");
            applied
                .lines
                .push(format!("added `{t}` ({} worker(s))", e.worker.count));
            self.fleet.add_entry(e);
        }
        for (t, n) in &plan.scaled {
            match self.fleet.scale(t, *n, false).await {
                Ok(s) => applied.lines.push(format!("scaled {}", s.line)),
                Err(e) => applied.fail(format!("scaling `{t}`: {e}")),
            }
        }
        for t in &plan.changed {
            let e = entries.remove(t).expect("prepared");
            self.change(t, e, &mut applied).await;
        }
        match self.backends.reload_tls() {
            Some(Ok(())) => applied
                .lines
                .push("re-read the worker API's certificate and key".into()),
            Some(Err(e)) => applied.fail(format!("kept the worker API's certificate: {e:#}")),
            None => {}
        }
        self.finish_reload(&plan, &current, new, applied)
    }

    /// The config file, read again within [`READ_WITHIN`]; or the answer
    /// that refuses the reload.
    async fn read_config(&self) -> Result<Config, Response> {
        let path = self.fleet.config_path();
        let reading = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path))
        };
        match tokio::time::timeout(READ_WITHIN, reading).await {
            Ok(Ok(Ok(c))) => Ok(c),
            Ok(Ok(Err(e))) => {
                let mut r = Response::error(format!("{} is not valid; nothing changed:", path.display()));
                r.lines.push(format!("{e:#}"));
                Err(r)
            }
            Ok(Err(e)) => Err(Response::error(format!(
                "reading {}: {e}; nothing changed",
                path.display()
            ))),
            Err(_) => Err(Response::error(format!(
                "reading {} took longer than {}; nothing changed",
                path.display(),
                humantime::format_duration(READ_WITHIN)
            ))),
        }
        .and_then(|new: Config| match new.check_protocol(self.protocol) {
            Ok(()) => Ok(new),
            Err(e) => Err(Response::error(format!("{e}; nothing changed"))),
        })
    }

    /// How every added or changed entry will run, decided before anything
    /// changes; or the answer that refuses the reload.
    async fn prepare_entries(&self, new: &Config, plan: &ReloadPlan) -> Result<BTreeMap<String, Entry>, Response> {
        let mut entries = BTreeMap::new();
        for t in plan.added.iter().chain(&plan.changed) {
            let w = new
                .workers
                .iter()
                .find(|w| &w.worker_type == t)
                .expect("planned from new");
            match tokio::time::timeout(DECIDE_WITHIN, self.entry_for(new, w)).await {
                Ok(Ok(e)) => entries.insert(t.clone(), e),
                Ok(Err(e)) => return Err(Response::error(format!("{e}; nothing changed"))),
                Err(_) => {
                    return Err(Response::error(format!(
                        "workers `{t}`: the Docker engine did not answer within {}; nothing changed",
                        humantime::format_duration(DECIDE_WITHIN)
                    )));
                }
            };
        }
        Ok(entries)
    }

    /// Puts a changed entry in force: new slots start with it, the others
    /// are queued for replacement.
    async fn change(&mut self, t: &str, e: Entry, applied: &mut Applied) {
        let wanted = e.worker.count;
        let Some((previous, generation)) = self.fleet.change_entry(e) else {
            return;
        };
        let started = match self.fleet.scale(t, wanted, false).await {
            Ok(s) => s.started,
            Err(e) => {
                applied.fail(format!("scaling `{t}`: {e}"));
                Vec::new()
            }
        };
        let old: Vec<SlotId> = self
            .fleet
            .slot_ids(t)
            .into_iter()
            .filter(|s| !started.contains(&s.index))
            .collect();
        if old.is_empty() {
            applied.lines.push(format!("changed `{t}` (no worker to replace)"));
        } else {
            applied.rollouts.push((t.to_string(), old, previous, generation));
        }
    }

    /// Keeps the file's entries (and the pool settings in force), starts
    /// the roll-outs and answers with the operation that follows them.
    fn finish_reload(&mut self, plan: &ReloadPlan, current: &Config, new: Config, mut applied: Applied) -> Response {
        if !plan.pool_keys.is_empty() {
            applied.lines.push(format!(
                "[pool] {} changed: not applied until the supervisor is restarted",
                plan.pool_keys.join(", ")
            ));
        }
        if applied.lines.is_empty() && applied.rollouts.is_empty() {
            applied.lines.push("nothing changed".into());
        }
        for w in &plan.unchanged {
            tracing::debug!(worker_type = %w, "unchanged by the reload");
        }
        self.fleet.set_config(Arc::new(Config {
            path: new.path,
            pool: current.pool.clone(),
            workers: new.workers,
            warnings: new.warnings,
        }));
        let groups = applied
            .rollouts
            .iter()
            .map(|(t, slots, _, _)| (format!("changed `{t}`: "), slots.clone(), true))
            .collect();
        let op = self.fleet.operations.create(applied.lines, applied.failed, groups);
        for (_, slots, previous, generation) in applied.rollouts {
            self.fleet.roll_out(op, slots, previous, generation);
        }
        super::server::progress(&self.fleet.operations, op)
    }

    /// How an added or changed entry runs, with the backends of the pool.
    async fn entry_for(&self, config: &Config, w: &WorkerConfig) -> Result<Entry, EntryError> {
        let (executor, mode) = self.backends.executor_for(config, w, self.protocol).await?;
        Ok(Entry {
            worker: Arc::new(w.clone()),
            executor,
            mode,
            generation: 0,
        })
    }
}

/// What a reload changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Only the count differs: (type, new count).
    pub scaled: Vec<(String, u32)>,
    /// What the workers run differs (image, command, env, limits, …):
    /// replaced one at a time.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// `[pool]` keys that differ (not applied while running).
    pub pool_keys: Vec<String>,
}

/// The difference between the config in force and a new one.
pub fn plan_reload(current: &Config, new: &Config) -> ReloadPlan {
    let mut p = ReloadPlan::default();
    let old: BTreeMap<&str, &WorkerConfig> = current.workers.iter().map(|w| (w.worker_type.as_str(), w)).collect();
    let now: BTreeMap<&str, &WorkerConfig> = new.workers.iter().map(|w| (w.worker_type.as_str(), w)).collect();
    for (t, w) in &now {
        match old.get(t) {
            None => p.added.push(t.to_string()),
            Some(o) if same_setup(o, w) && o.count == w.count => p.unchanged.push(t.to_string()),
            Some(o) if same_setup(o, w) => p.scaled.push((t.to_string(), w.count)),
            Some(_) => p.changed.push(t.to_string()),
        }
    }
    p.removed = old
        .keys()
        .filter(|t| !now.contains_key(*t))
        .map(|t| t.to_string())
        .collect();
    p.pool_keys = pool_differences(&current.pool, &new.pool);
    p
}

/// Whether two entries run the same workers (the count and the line in
/// the file aside).
fn same_setup(a: &WorkerConfig, b: &WorkerConfig) -> bool {
    let mut b = b.clone();
    b.count = a.count;
    b.line = a.line;
    *a == b
}

fn pool_differences(a: &PoolConfig, b: &PoolConfig) -> Vec<String> {
    let mut keys = Vec::new();
    macro_rules! diff {
        ($($field:ident),+) => {$(
            if a.$field != b.$field {
                keys.push(stringify!($field).to_string());
            }
        )+};
    }
    diff!(
        protocol,
        db_path,
        workspace_path,
        log_dir,
        log_level,
        check_interval,
        heartbeat_timeout,
        stop_timeout,
        startup_timeout,
        network,
        log_max_size,
        log_keep,
        restart,
        inherit_env,
        events_keep,
        events_max_age,
        data_dir,
        cache_db_path,
        api_listen,
        api_token_file,
        on_event,
        metrics_listen
    );
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(std::path::Path::new("/cfg/pool.toml"), text, &[]).unwrap()
    }

    fn entry(t: &str, count: u32, cmd: &str) -> String {
        format!("[[workers]]\nworker_type = \"{t}\"\ncount = {count}\njob_command = [\"{cmd}\"]\n\n")
    }

    #[test]
    fn a_reload_touches_only_what_changed() {
        let current = config(&format!(
            "{}{}{}{}",
            entry("same", 1, "a"),
            entry("more", 1, "a"),
            entry("other", 2, "a"),
            entry("gone", 1, "a")
        ));
        let new = config(&format!(
            "[pool]\nstop_timeout = \"3s\"\n\n{}{}{}{}",
            entry("same", 1, "a"),
            entry("more", 3, "a"),
            entry("other", 2, "b"),
            entry("new", 1, "a")
        ));
        let p = plan_reload(&current, &new);
        assert_eq!(
            p,
            ReloadPlan {
                added: vec!["new".into()],
                removed: vec!["gone".into()],
                scaled: vec![("more".into(), 3)],
                changed: vec!["other".into()],
                unchanged: vec!["same".into()],
                pool_keys: vec!["stop_timeout".into()],
            }
        );
        // A line moved in the file is no change.
        let moved = config(&format!("\n\n\n{}", entry("same", 1, "a")));
        let just = config(&entry("same", 1, "a"));
        assert_eq!(plan_reload(&just, &moved).unchanged, vec!["same".to_string()]);
    }
}
