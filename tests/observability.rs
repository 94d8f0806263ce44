//! What a service manager and a dashboard see: systemd's notify protocol
//! (a fake NOTIFY_SOCKET), Prometheus metrics scraped during a run and
//! checked against the database, and the `top` view of a known pool.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{COPY, Pool, sh_workers, wait_for};

#[test]
fn systemd_hears_ready_a_live_status_watchdog_and_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let listener = {
        let heard = heard.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let stop = m.starts_with("STOPPING=1");
                    heard.lock().unwrap().push(m);
                    if stop {
                        return;
                    }
                }
            }
        })
    };
    let mut pool = Pool::new("", &sh_workers("copy", 2, COPY));
    pool.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    pool.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    pool.start_ready();
    wait_for("two watchdog pings", Duration::from_secs(10), || {
        (heard.lock().unwrap().iter().filter(|m| *m == "WATCHDOG=1").count() >= 2).then_some(())
    });
    // The STATUS line follows the pool: a finished job shows.
    pool.submit("copy", "a.txt", "x");
    pool.drained("20s");
    let done = "STATUS=2/2 workers running · queue empty · this run: 1 completed, 0 failed";
    wait_for("the status to count the job", Duration::from_secs(10), || {
        heard.lock().unwrap().iter().any(|m| m == done).then_some(())
    });
    assert!(pool.cli(&["stop"]).status.success());
    listener.join().unwrap();
    let heard = heard.lock().unwrap().clone();
    assert!(heard[0].starts_with("READY=1\nSTATUS=2 workers running"), "{heard:?}");
    assert!(
        heard[1..heard.len() - 1]
            .iter()
            .all(|m| m == "WATCHDOG=1" || m.starts_with("STATUS=")),
        "{heard:?}"
    );
    assert!(heard.last().unwrap().starts_with("STOPPING=1"), "{heard:?}");
}

/// The value of one series in an OpenMetrics text, e.g.
/// `clx_pool_workers{state="idle",worker_type="copy"}`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn metrics_are_scraped_during_a_run_and_agree_with_the_database() {
    let mut pool = Pool::new(
        "metrics_listen = \"127.0.0.1:0\"\ncheck_interval = \"200ms\"\n",
        &sh_workers("copy", 2, COPY),
    );
    pool.start_ready();
    let addr: std::net::SocketAddr = wait_for("the metrics address in the log", Duration::from_secs(10), || {
        let log = pool.supervisor_log();
        let line = log.lines().find(|l| l.contains("serving Prometheus metrics"))?;
        line.split("bound=").nth(1)?.split_whitespace().next()?.parse().ok()
    });
    for i in 0..5 {
        pool.submit_with("copy", &format!("m{i}.txt"), &[]);
    }
    pool.drained("30s");
    pool.submit_with("nobody", "waits.txt", &["--allow-unserved"]);
    let (pid, _) = pool.slot_worker("copy", 0);
    common::kill9(pid);
    // The death recorded, then both slots running again (until the slot
    // notices, it is still `running` too).
    wait_for("the replacement", Duration::from_secs(20), || {
        let died = pool.try_i64("SELECT COUNT(*) FROM clx_pool_events WHERE event = 'died'")?;
        let running = pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'")?;
        (died == 1 && running == 2).then_some(())
    });
    let scrape = || {
        let (status, body) = common::http(addr, "GET", "/metrics", &[], b"").unwrap();
        assert_eq!(status, 200);
        body
    };
    // The gauges are the monitor's last look: the replacement counts as
    // idle from the look after it registered.
    let text = wait_for(
        "the histogram to count the jobs and both workers idle",
        Duration::from_secs(10),
        || {
            let t = scrape();
            (value(&t, "clx_pool_job_duration_seconds_count{worker_type=\"copy\"}")? == 5.0
                && value(&t, "clx_pool_workers{worker_type=\"copy\",state=\"idle\"}")? == 2.0)
                .then_some(t)
        },
    );
    assert_eq!(
        value(&text, "clx_pool_workers{worker_type=\"copy\",state=\"dead\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "clx_pool_jobs{worker_type=\"copy\",state=\"completed\"}"),
        Some(pool.query_i64("SELECT COUNT(*) FROM jobs WHERE status = 'completed'") as f64)
    );
    assert_eq!(
        value(&text, "clx_pool_queue_depth{worker_type=\"nobody\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "clx_pool_worker_ends_total{worker_type=\"copy\",cause=\"died\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "clx_pool_restarts_total{worker_type=\"copy\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "clx_pool_workers_wanted{worker_type=\"copy\"}"),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(&text, "clx_pool_supervisor_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    assert!(
        text.contains("clx_pool_oldest_pending_age_seconds{worker_type=\"nobody\"}"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    // The same text for node_exporter's textfile collector.
    let printed = common::stdout(&pool.cli(&["stats", "--prometheus"]));
    assert!(
        printed.contains("clx_pool_restarts_total{worker_type=\"copy\"} 1"),
        "{printed}"
    );
    assert!(printed.trim_end().ends_with("# EOF"));
}

#[test]
fn top_shows_every_worker_of_a_known_pool() {
    use clx_pool::commands::top::{History, Ui, draw, snapshot};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    let mut pool = Pool::new(
        "",
        &format!(
            "{}\n{}",
            sh_workers("copy", 2, COPY),
            sh_workers("upper", 1, "tr a-z A-Z < \"$CLX_INPUT_FILE\" > \"$CLX_OUTPUT_FILE\"")
        ),
    );
    pool.start_ready();
    pool.submit_with("nobody", "waits.txt", &["--allow-unserved"]);
    let snap = snapshot(&pool.db_path(), &mut History::default()).unwrap();
    let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
    terminal.draw(|f| draw(f, &snap, &mut Ui::default())).unwrap();
    let screen: String = terminal
        .backend()
        .buffer()
        .content()
        .chunks(120)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
        .collect();
    for (t, slot) in [("copy", 0), ("copy", 1), ("upper", 0)] {
        let (pid, _) = pool.slot_worker(t, slot);
        let line = screen
            .lines()
            .find(|l| l.contains(&format!("{t}-{slot} ")))
            .unwrap_or_else(|| panic!("no row for {t}-{slot}:\n{screen}"));
        assert!(line.contains(&pid.to_string()) && line.contains("idle"), "{line}");
    }
    assert!(screen.contains("queue: 1 pending"), "{screen}");
    let unserved = screen
        .lines()
        .find(|l| l.contains("nobody"))
        .unwrap_or_else(|| panic!("no row for the type nobody serves:\n{screen}"));
    assert!(
        unserved.contains("no workers") && unserved.contains("1 (oldest"),
        "{unserved}"
    );
    // A pending job no worker serves is something wrong now.
    assert!(screen.contains("health: degraded"), "{screen}");
    assert!(screen.contains("jobs completed per second"), "{screen}");

    // Under tmux, on a real terminal: it draws every worker, `r` restarts
    // the selected one (the first), `+` scales its type, `q` quits.
    let tmux = Tmux::new(&pool.dir.path().join("tmux.sock"));
    tmux.run(&[
        "new-session",
        "-d",
        "-x",
        "120",
        "-y",
        "40",
        &format!("{} top --db {}", common::bin(), pool.db_path().display()),
    ]);
    let old_pid = pool.slot_worker("copy", 0).0 as i64;
    wait_for("top to draw the workers", Duration::from_secs(20), || {
        let screen = tmux.screen();
        (screen.contains("copy-0 ")
            && screen.contains("copy-1 ")
            && screen.contains("upper-0 ")
            && screen.contains(&old_pid.to_string()))
        .then_some(())
    });
    tmux.run(&["send-keys", "r"]);
    let new_pid = wait_for("the selected worker to be restarted", Duration::from_secs(20), || {
        running_pid(&pool, "copy", 0).filter(|&pid| pid != old_pid)
    });
    wait_for("top to show the new worker", Duration::from_secs(20), || {
        tmux.screen().contains(&new_pid.to_string()).then_some(())
    });
    tmux.run(&["send-keys", "+"]);
    wait_for("a third copy worker", Duration::from_secs(20), || {
        running_pid(&pool, "copy", 2).map(drop)
    });
    wait_for("top to show it", Duration::from_secs(20), || {
        tmux.screen().contains("copy-2 ").then_some(())
    });
    tmux.run(&["send-keys", "q"]);
    wait_for("top to quit on q", Duration::from_secs(10), || {
        (!tmux.alive()).then_some(())
    });
}

/// The pid of the worker running in a slot, if one runs.
fn running_pid(pool: &Pool, worker_type: &str, slot: u32) -> Option<i64> {
    use rusqlite::OptionalExtension;
    pool.conn()
        .query_row(
            "SELECT pid FROM clx_pool_slots WHERE worker_type = ?1 AND slot = ?2 AND state = 'running'",
            rusqlite::params![worker_type, slot],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()
        .unwrap()
        .flatten()
}

/// A private tmux server, killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn new(socket: &std::path::Path) -> Tmux {
        Tmux {
            socket: socket.to_path_buf(),
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (.ci/run installs it)")
    }

    fn run(&self, args: &[&str]) {
        let out = self.command(args);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.command(&["capture-pane", "-p"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.command(&["has-session"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // A failed test's top goes with its server; the result is not a write.
        if self.command(&["kill-server"]).status.success() {
            std::fs::remove_file(&self.socket).ok();
        }
    }
}

#[test]
fn a_taken_metrics_port_stops_start_before_any_worker_runs() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let pool = Pool::new(&format!("metrics_listen = \"{addr}\"\n"), &sh_workers("copy", 2, COPY));
    let config = pool.config();
    let out = pool.cli(&["start", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!("metrics_listen = \"{addr}\"")) && err.contains("in use"),
        "{err}"
    );
    assert!(
        !err.contains("cleaning up"),
        "nothing started, so nothing to clean up: {err}"
    );
    assert_eq!(pool.query_i64("SELECT COUNT(*) FROM workers"), 0);
    assert!(pool.processes().is_empty());
}

/// What `stats --json`, `stats --prometheus` and `top` must agree on: the
/// running slots and live workers per type, and the jobs by status.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    running: std::collections::BTreeMap<String, i64>,
    live: std::collections::BTreeMap<String, i64>,
    jobs: [i64; 4],
}

const JOB_WORDS: [&str; 4] = ["pending", "processing", "completed", "failed"];

fn counts_from_json(pool: &Pool) -> Counts {
    let v: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    let mut c = Counts::default();
    for (t, p) in v["pools"].as_object().unwrap() {
        c.running.insert(t.clone(), p["running"].as_i64().unwrap());
    }
    for (t, by) in v["workers"].as_object().unwrap() {
        let n = ["idle", "busy", "hung"].iter().filter_map(|k| by[*k].as_i64()).sum();
        c.live.insert(t.clone(), n);
    }
    c.jobs = JOB_WORDS.map(|k| v["jobs"][k].as_i64().unwrap());
    c
}

fn counts_from_prometheus(pool: &Pool) -> Counts {
    let out = pool.cli(&["stats", "--prometheus"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let mut c = Counts::default();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let label = |name: &str| {
            let at = series.find(&format!("{name}=\"")).map(|i| i + name.len() + 2)?;
            Some(series[at..].split('"').next().unwrap().to_string())
        };
        let (Some(t), Some(state)) = (label("worker_type"), label("state")) else {
            continue;
        };
        let n: i64 = value.parse().unwrap();
        match series.split('{').next().unwrap() {
            "clx_pool_slots" => *c.running.entry(t).or_default() += if state == "running" { n } else { 0 },
            "clx_pool_workers" => {
                *c.live.entry(t).or_default() += if ["idle", "busy", "hung"].contains(&state.as_str()) {
                    n
                } else {
                    0
                }
            }
            "clx_pool_jobs" => {
                if let Some(i) = JOB_WORDS.iter().position(|w| *w == state) {
                    c.jobs[i] += n;
                }
            }
            _ => {}
        }
    }
    c
}

/// The numbers before each of `words` in `line` ("2 pending, 1 …").
fn numbers_before(line: &str, words: &[&str]) -> Vec<i64> {
    let tokens: Vec<&str> = line.split([' ', ',', '·']).filter(|t| !t.is_empty()).collect();
    words
        .iter()
        .map(|w| {
            let at = tokens
                .iter()
                .position(|t| t == w)
                .unwrap_or_else(|| panic!("no `{w}` in {line}"));
            tokens[at - 1].parse().unwrap()
        })
        .collect()
}

/// What `top` shows for `types`, once its screen has drawn them all.
fn counts_from_top(screen: &str, types: &[&str]) -> Option<Counts> {
    let lines: Vec<String> = screen.lines().map(|l| l.replace('│', " ")).collect();
    let first = |l: &String| l.split_whitespace().next().map(str::to_string);
    let mut c = Counts::default();
    for t in types {
        let row = lines.iter().find(|l| first(l).as_deref() == Some(*t))?;
        c.running
            .insert(t.to_string(), row.split_whitespace().nth(3)?.parse().ok()?);
        let live = lines
            .iter()
            .filter(|l| first(l).is_some_and(|w| w.starts_with(&format!("{t}-"))))
            .count();
        c.live.insert(t.to_string(), live as i64);
    }
    let queue = lines.iter().find(|l| l.trim_start().starts_with("queue:"))?;
    c.jobs = numbers_before(queue, &JOB_WORDS).try_into().ok()?;
    Some(c)
}

#[test]
fn stats_json_stats_prometheus_and_top_show_the_same_counts() {
    let mut pool = Pool::new(
        "",
        &format!(
            "{}\n{}",
            sh_workers("copy", 2, COPY),
            sh_workers("broken", 1, "echo no >&2; exit 3")
        ),
    );
    pool.start_ready();
    for i in 0..3 {
        pool.submit("copy", &format!("c{i}.txt"), "x");
    }
    pool.submit_with("broken", "b.txt", &["--max-attempts", "1"]);
    pool.submit_with("nobody", "n.txt", &["--allow-unserved"]);
    // A quiet pool: every job that can finish has finished.
    let want_jobs = [1, 0, 3, 1];
    let json = wait_for("the jobs to finish", Duration::from_secs(60), || {
        let c = counts_from_json(&pool);
        (c.jobs == want_jobs).then_some(c)
    });
    assert_eq!(json.running, [("broken".into(), 1), ("copy".into(), 2)].into());
    assert_eq!(json.live, json.running, "every running slot has a live worker");
    assert_eq!(
        counts_from_prometheus(&pool),
        json,
        "stats --prometheus vs stats --json"
    );
    let tmux = Tmux::new(&pool.dir.path().join("tmux.sock"));
    tmux.run(&[
        "new-session",
        "-d",
        "-x",
        "140",
        "-y",
        "40",
        &format!("{} top --db {}", common::bin(), pool.db_path().display()),
    ]);
    let top = wait_for("top to draw the pool", Duration::from_secs(20), || {
        counts_from_top(&tmux.screen(), &["broken", "copy"]).filter(|c| c.live == json.live)
    });
    assert_eq!(top, json, "top vs stats --json");
    assert_eq!(counts_from_json(&pool), json, "nothing changed meanwhile");
    tmux.run(&["send-keys", "q"]);
    wait_for("top to quit", Duration::from_secs(10), || (!tmux.alive()).then_some(()));
}

/// New workers' memory is in `stats` as soon as the pool is ready (a
/// process's is read when it registers), not only at the monitor's next
/// regular look (`check_interval`, 30 s here).
#[test]
fn new_workers_are_measured_soon_after_they_register() {
    let mut pool = Pool::new("check_interval = \"30s\"\n", &sh_workers("copy", 2, COPY));
    pool.start_ready();
    let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).unwrap();
    assert!(
        json["pools"]["copy"]["memory_mib"].as_f64().unwrap() > 0.0,
        "no memory once ready: {json}"
    );
    let started = std::time::Instant::now();
    wait_for("the pool's memory in stats", Duration::from_secs(10), || {
        let json: serde_json::Value = serde_json::from_slice(&pool.cli(&["stats", "--json"]).stdout).ok()?;
        (json["pools"]["copy"]["memory_mib"].as_f64()? > 0.0).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "measured only at the regular look"
    );
}
