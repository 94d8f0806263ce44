//! Test helpers: a pool in a temp directory driven through the real
//! binary, polling with deadlines, and guards that end every process a test
//! started, also when the test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;

pub mod clm;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clx-pool")
}

/// Polls `cond` every 10 ms until it returns Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pool directory: config, database, workspace, logs.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub supervisor: Option<Child>,
    /// Extra environment for the supervisor and every command (e.g. TZ).
    pub env: Vec<(String, String)>,
    /// The database, when not `jobs.db` in the pool's folder.
    pub db: Option<PathBuf>,
}

impl Pool {
    /// Creates a pool whose config is `[pool]` defaults for tests plus `workers`
    /// (TOML text of `[[workers]]` entries). `pool_extra` is added to `[pool]`.
    pub fn new(pool_extra: &str, workers: &str) -> Pool {
        let dir = tempfile::Builder::new().prefix("clx-pool-test-").tempdir().unwrap();
        let mut pool = String::from("[pool]\n");
        for (key, value) in [
            ("db_path", "\"jobs.db\""),
            ("workspace_path", "\"workspace\""),
            ("stop_timeout", "\"3s\""),
            ("startup_timeout", "\"10s\""),
        ] {
            if !pool_extra.contains(key) {
                pool.push_str(&format!("{key} = {value}\n"));
            }
        }
        let config = format!("{pool}{pool_extra}\n\n{workers}\n");
        std::fs::write(dir.path().join("pool.toml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("workspace")).unwrap();
        Pool {
            dir,
            supervisor: None,
            env: Vec::new(),
            db: None,
        }
    }

    /// A pool folder without a config yet (the test writes one, e.g. with
    /// `clx-pool init`).
    pub fn bare() -> Pool {
        Pool {
            dir: tempfile::Builder::new().prefix("clx-pool-test-").tempdir().unwrap(),
            supervisor: None,
            env: Vec::new(),
            db: None,
        }
    }

    /// A pool whose database is `db` (elsewhere: a small file system).
    pub fn with_db(pool_extra: &str, workers: &str, db: &Path) -> Pool {
        let extra = format!("db_path = {}\n{pool_extra}", toml_str(db.to_str().unwrap()));
        let mut pool = Pool::new(&extra, workers);
        pool.db = Some(db.to_path_buf());
        pool
    }

    /// Runs the supervisor and commands with `TZ=zone`.
    pub fn tz(self, zone: &str) -> Pool {
        self.with_env("TZ", zone)
    }

    /// Runs the supervisor and commands with `name=value` set.
    pub fn with_env(mut self, name: &str, value: &str) -> Pool {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("pool.toml")
    }

    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| self.path("jobs.db"))
    }

    /// Runs a clx-pool command against this pool's config and waits for it.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        if !args
            .iter()
            .any(|a| *a == "--db" || *a == "--config" || *a == "check" || *a == "start")
        {
            cmd.arg("--db").arg(self.db_path());
        }
        cmd.stdin(Stdio::null()).output().unwrap()
    }

    /// Starts the supervisor in the background (stderr to supervisor.log).
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.path("supervisor.log")).unwrap();
        let child = Command::new(bin())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["start", "--config"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.supervisor = Some(child);
    }

    /// Starts the supervisor and waits until every worker has registered.
    pub fn start_ready(&mut self) {
        self.start_ready_within("30s");
    }

    /// Starts the supervisor and waits up to `timeout` until every worker
    /// has registered (containers take longer on a loaded machine).
    pub fn start_ready_within(&mut self, timeout: &str) {
        self.start();
        self.wait_ready_within(timeout);
    }

    /// Waits up to `timeout` until every worker has registered.
    pub fn wait_ready_within(&self, timeout: &str) {
        let out = self.cli(&["wait", "--ready", "--timeout", timeout]);
        assert!(
            out.status.success(),
            "pool did not become ready: {}\n{}",
            stderr(&out),
            self.supervisor_log()
        );
    }

    pub fn supervisor_log(&self) -> String {
        std::fs::read_to_string(self.path("supervisor.log")).unwrap_or_default()
    }

    /// A connection as the Python workers open one (no foreign keys).
    pub fn conn(&self) -> Connection {
        let c = Connection::open(self.db_path()).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.pragma_update(None, "foreign_keys", false).unwrap();
        c
    }

    pub fn query_i64(&self, sql: &str) -> i64 {
        self.conn().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Like `query_i64`, but None while the database or table is not there yet.
    pub fn try_i64(&self, sql: &str) -> Option<i64> {
        if !self.db_path().exists() {
            return None;
        }
        self.conn().query_row(sql, [], |r| r.get(0)).ok()
    }

    pub fn query_strings(&self, sql: &str) -> Vec<String> {
        let c = self.conn();
        let mut stmt = c.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Writes a workspace file and queues a job for it; returns the job id.
    pub fn submit(&self, job_type: &str, name: &str, content: &str) -> i64 {
        std::fs::write(self.path("workspace").join(name), content).unwrap();
        let out = self.cli(&[
            "submit",
            job_type,
            name,
            &format!("out/{name}"),
            "--workspace",
            self.path("workspace").to_str().unwrap(),
        ]);
        assert!(out.status.success(), "submit failed: {}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    }

    pub fn output(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path("workspace/out").join(name)).ok()
    }

    /// Live processes started for this pool (their environment names its database).
    pub fn processes(&self) -> Vec<i32> {
        processes_with_env(&format!("CLX_SUPERVISOR_DB={}", self.db_path().display()))
    }

    /// Waits for the supervisor to exit and returns its exit code.
    pub fn wait_supervisor_exit(&mut self, limit: Duration) -> i32 {
        let child = self.supervisor.as_mut().expect("supervisor started");
        let status = wait_for("the supervisor to exit", limit, || child.try_wait().unwrap());
        status.code().unwrap_or(-1)
    }

    /// The pid and worker id of the worker in slot `slot` of `worker_type`
    /// once it is running.
    /// (pid, worker id); the pid is 0 for a container.
    pub fn slot_worker(&self, worker_type: &str, slot: u32) -> (i32, String) {
        self.conn()
            .query_row(
                "SELECT COALESCE(pid, 0), worker_id FROM clx_pool_slots WHERE worker_type = ?1 AND slot = ?2 AND state = 'running'",
                rusqlite::params![worker_type, slot],
                |r| Ok((r.get::<_, i64>(0)? as i32, r.get(1)?)),
            )
            .unwrap()
    }

    /// Waits until slot `slot` runs a worker other than `old_id`; returns its id.
    pub fn wait_replacement(&self, worker_type: &str, slot: u32, old_id: &str, limit: Duration) -> String {
        wait_for(&format!("a replacement for {old_id}"), limit, || {
            let (id, state): (Option<String>, String) = self
                .conn()
                .query_row(
                    "SELECT worker_id, state FROM clx_pool_slots WHERE worker_type = ?1 AND slot = ?2",
                    rusqlite::params![worker_type, slot],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok()?;
            (state == "running" && id.as_deref() != Some(old_id)).then_some(id?)
        })
    }

    /// The recorded cause of the end of worker `worker_id`.
    pub fn cause_of(&self, worker_id: &str) -> String {
        self.conn()
            .query_row(
                "SELECT cause FROM clx_pool_events WHERE worker_id = ?1",
                [worker_id],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// The cause of the first recorded event of kind `event` (died, hung, …).
    pub fn first_cause(&self, event: &str) -> String {
        self.conn()
            .query_row(
                "SELECT cause FROM clx_pool_events WHERE event = ?1 ORDER BY id LIMIT 1",
                [event],
                |r| r.get(0),
            )
            .unwrap()
    }

    pub fn supervisor_pid(&self) -> i32 {
        self.supervisor.as_ref().unwrap().id() as i32
    }

    /// The pid of the supervisor's guard process (`clx-pool guard`).
    pub fn guard_pid(&self) -> i32 {
        let want = format!("{} guard --db {}", bin(), self.db_path().display());
        wait_for("the guard process", Duration::from_secs(10), || {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.starts_with(&format!("{want} --run ")).then_some(pid)
            })
        })
    }

    /// Kills the supervisor and its guard with SIGKILL: as if the machine
    /// had lost both, so that only the next `start` or `stop` cleans up.
    pub fn kill_supervisor_and_guard(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let both = [self.guard_pid(), self.supervisor_pid()];
        // Both frozen first: a supervisor that saw its guard die would start
        // a new one, and a guard that saw the supervisor die would clean up.
        for sig in [Signal::SIGSTOP, Signal::SIGKILL] {
            for pid in both {
                kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
            }
        }
        self.wait_supervisor_exit(Duration::from_secs(5));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisor.take()
            && child.try_wait().ok().flatten().is_none()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        // (Only a regular file: a test may have put a FIFO there.)
        let config = std::fs::metadata(self.config())
            .ok()
            .filter(|m| m.is_file())
            .and_then(|_| std::fs::read_to_string(self.config()).ok())
            .unwrap_or_default();
        if config.contains("\"docker\"") || config.contains("\"auto\"") {
            for id in self.containers() {
                let _ = Command::new("docker").args(["rm", "-f", &id]).output();
            }
        }
    }
}

impl Pool {
    /// Ids of this pool's containers, running or not (found by label).
    pub fn containers(&self) -> Vec<String> {
        let label = format!(
            "label=clx-pool.db-id={}",
            clx_pool::executor::docker::db_id(&self.db_path())
        );
        let out = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect(),
            _ => Vec::new(),
        }
    }
}

/// The test image (`make docker-image`).
pub fn test_image() -> String {
    format!("clx-pool/test:{}", env!("CARGO_PKG_VERSION"))
}

/// True when a Docker engine answers and the test image is there. Without
/// them a test is skipped with a message on a developer machine, and fails
/// under CI=true, where .ci/run provides both.
pub fn docker_ready() -> bool {
    let engine = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let image = engine
        && Command::new("docker")
            .args(["image", "inspect", &test_image()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let problem = if !engine {
        "no Docker engine answers (start dockerd)"
    } else if !image {
        "the test image is missing (run `make docker-image`)"
    } else {
        return true;
    };
    skip(&format!("docker tests: {problem}"));
    false
}

/// Pids of live processes whose environment contains `needle` (a
/// `NAME=value` pair), zombies excluded.
pub fn processes_with_env(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) && !is_zombie(pid) {
            found.push(pid);
        }
    }
    found
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')).unwrap_or(true))
        .unwrap_or(true)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A job command that notes its job's id in `$WORKSPACE_PATH/ledger` when
/// it starts, works for `work` (sleep's argument), then copies.
pub fn ledger_job(work: &str) -> String {
    format!("echo \"$CLX_JOB_ID\" >> \"$WORKSPACE_PATH/ledger\"; sleep {work}; {COPY}")
}

/// A job command that copies its input to its output.
pub const COPY: &str = "cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";

/// Copies input to output; the first attempt of each job first sleeps, so
/// it can be caught in the act.
pub const SLOW_FIRST: &str = "m=\"$WORKSPACE_PATH/attempted-$CLX_JOB_ID\"; if [ ! -e \"$m\" ]; then touch \"$m\"; sleep 60; fi; cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\"";

/// A TOML `[[workers]]` entry for built-in workers running `sh -c script`.
pub fn sh_workers(worker_type: &str, count: u32, script: &str) -> String {
    format!(
        "[[workers]]\nworker_type = \"{worker_type}\"\ncount = {count}\njob_command = [\"sh\", \"-c\", {}]\n",
        toml_str(script)
    )
}

pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Holds `BEGIN EXCLUSIVE` on a database from another connection (a
/// thread of the test) for `hold`, like a long writer would. Returns once
/// the lock is held; the guard's `join` waits for its release.
pub struct WriteLock(Option<std::thread::JoinHandle<()>>);

impl WriteLock {
    pub fn hold(db: &Path, hold: Duration) -> WriteLock {
        let db = db.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let c = Connection::open(&db).unwrap();
            c.busy_timeout(Duration::from_secs(30)).unwrap();
            c.execute_batch("BEGIN EXCLUSIVE").unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(hold);
            c.execute_batch("COMMIT").unwrap();
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the write lock was taken");
        WriteLock(Some(handle))
    }

    pub fn join(mut self) {
        if let Some(h) = self.0.take() {
            h.join().unwrap();
        }
    }

    /// True once the holder has committed.
    pub fn is_released(&self) -> bool {
        self.0.as_ref().is_none_or(|h| h.is_finished())
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// A small tmpfs mounted for one test (root only), unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (skipped with a message) without root, except under CI=true.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            skip("mounting a tmpfs (disk-full tests) needs root");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("clx-pool-tmpfs-").tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file `name`; returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).output();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

pub fn kill9(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

/// True while `pid` runs (a zombie does not count: it waits for a parent
/// to collect it, which a dead supervisor no longer is).
pub fn alive(pid: i32) -> bool {
    !is_zombie(pid)
}

/// A process's command line, arguments separated by spaces.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The value of `name` in a process's environment.
pub fn env_of(pid: i32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

impl Pool {
    /// `wait --drained` must succeed within `timeout`; returns its output.
    pub fn drained(&self, timeout: &str) -> Output {
        let out = self.cli(&["wait", "--drained", "--timeout", timeout]);
        assert!(
            out.status.success(),
            "{}{}\n{}",
            stdout(&out),
            stderr(&out),
            self.supervisor_log()
        );
        out
    }

    /// The rows of `schema_version`.
    pub fn schema_versions(&self) -> Vec<i64> {
        let c = self.conn();
        let mut stmt = c
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Writes a workspace file named `name` (holding its name) and queues
    /// a job for it with extra `submit` arguments; returns the job id.
    pub fn submit_with(&self, job_type: &str, name: &str, extra: &[&str]) -> i64 {
        std::fs::write(self.path("workspace").join(name), name).unwrap();
        let output = format!("out/{name}");
        let ws = self.path("workspace");
        let mut args = vec!["submit", job_type, name, &output, "--workspace", ws.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(out.status.success(), "submit failed: {}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    }
}

/// One HTTP/1.1 request (the connection closed after it): the status and
/// the body, or the error if the server cut the connection. For the tests
/// of the worker API; the body is written from a thread, so a server that
/// answers before reading all of it is heard.
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut writer = stream.try_clone()?;
    let body = body.to_vec();
    let sending = std::thread::spawn(move || {
        // The server may answer and close before it read everything.
        writer.write_all(&body).ok();
    });
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    sending.join().ok();
    if raw.is_empty() {
        read?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Ends a process the test started (SIGTERM, then SIGKILL after 10 s) when
/// dropped, also when the test fails.
pub struct ChildGuard(pub Option<i32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(pid) = self.0.take() else { return };
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && alive(pid.as_raw()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if alive(pid.as_raw()) {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).ok();
        }
    }
}

/// A child process the test owns: SIGTERM, then SIGKILL after 10 s, and
/// collected, when dropped (also when the test fails).
pub struct OwnedChild(pub Child);

impl Drop for OwnedChild {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if self.0.try_wait().ok().flatten().is_none() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).ok();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.0.kill().ok();
        }
        self.0.wait().ok();
    }
}

/// A cgroup of one controller (`pids` or `memory`, cgroup v1 or v2) that a
/// test puts processes in and sets limits on (past `pids.max` fork fails
/// with EAGAIN; past the memory limit the kernel's OOM killer acts).
/// Removed, its processes moved back, when dropped.
pub struct Cgroup {
    dir: PathBuf,
    parent_procs: PathBuf,
    v2: bool,
    members: Vec<i32>,
}

impl Cgroup {
    /// A new cgroup of `controller`; None (skipped with a message) where
    /// none can be made, except under CI=true.
    pub fn new(controller: &str) -> Option<Cgroup> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("clx-pool-test-{}-{n}", std::process::id());
        for (root, v2) in [
            (PathBuf::from("/sys/fs/cgroup").join(controller), false),
            (PathBuf::from("/sys/fs/cgroup"), true),
        ] {
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            if v2 {
                let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == controller)
                    || std::fs::write(root.join("cgroup.subtree_control"), format!("+{controller}")).is_err()
                {
                    continue;
                }
            }
            let dir = root.join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                return Some(Cgroup {
                    dir,
                    parent_procs: root.join("cgroup.procs"),
                    v2,
                    members: Vec::new(),
                });
            }
        }
        skip(&format!("no writable {controller} cgroup"));
        None
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves `pid` (all its threads) in.
    pub fn add(&mut self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        self.members.push(pid);
    }

    /// Tasks (threads) in it now.
    pub fn pids_current(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sets the process limit: a number, or "max".
    pub fn pids_max(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).unwrap();
    }

    /// Sets the memory limit, in bytes.
    pub fn memory_max(&self, bytes: u64) {
        let file = if self.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(self.dir.join(file), bytes.to_string()).unwrap();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("pids.max"), "max");
        for pid in &self.members {
            if alive(*pid) {
                let _ = std::fs::write(&self.parent_procs, pid.to_string());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The Python of the tools venv (`scripts/tools-venv.sh`, run by `make
/// test`), with the reference Prometheus parser; None (skipped with a
/// message) without it, except under CI=true.
pub fn tools_python() -> Option<PathBuf> {
    let venv = std::env::var_os("TOOLS_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/tools-venv"));
    if venv.join(".clx-pool-installed").exists() {
        return Some(venv.join("bin/python"));
    }
    skip(&format!(
        "no tools venv at {} (run scripts/tools-venv.sh)",
        venv.display()
    ));
    None
}

/// A test that cannot run here (no Docker, no image, no Python >= 3.12, no
/// root): under `CI=true` that is a failure; otherwise it says so on stderr
/// and in the file `CLX_TEST_SKIPS` names (`make test` lists them after the
/// run, since a test that returns early counts as passed), and the caller
/// returns.
pub fn skip(problem: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test cannot run under CI: {problem}");
    }
    eprintln!("SKIPPED: {problem}");
    if let Some(file) = std::env::var_os("CLX_TEST_SKIPS") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let line = format!("{}::{test}: {problem}\n", env!("CARGO_CRATE_NAME"));
        // One line, one write: tests run in parallel processes.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("recording the skip in {}: {e}", file.to_string_lossy()));
    }
}
