//! What a service manager and a dashboard see: systemd's notify protocol
//! (a fake NOTIFY_SOCKET), Prometheus metrics scraped during a run and
//! checked against the database, and the `top` view of a known pool.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Pool, sh_workers, wait_for};

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping_in_order() {
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
    let mut pool = Pool::new("", &sh_workers("copy", 2, "true"));
    pool.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    pool.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    pool.start_ready();
    wait_for("two watchdog pings", Duration::from_secs(10), || {
        (heard.lock().unwrap().iter().filter(|m| *m == "WATCHDOG=1").count() >= 2).then_some(())
    });
    assert!(pool.cli(&["stop"]).status.success());
    listener.join().unwrap();
    let heard = heard.lock().unwrap().clone();
    assert!(heard[0].starts_with("READY=1\nSTATUS=2 workers running"), "{heard:?}");
    assert!(heard[1..heard.len() - 1].iter().all(|m| m == "WATCHDOG=1"), "{heard:?}");
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
        &sh_workers("copy", 2, "cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\""),
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
    pool.submit_with("nobody", "waits.txt", &[]);
    let (pid, _) = pool.slot_worker("copy", 0);
    common::kill9(pid);
    wait_for("the replacement", Duration::from_secs(20), || {
        (pool.try_i64("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'")? == 2).then_some(())
    });
    let scrape = || {
        let (status, body) = common::http(addr, "GET", "/metrics", &[], b"").unwrap();
        assert_eq!(status, 200);
        body
    };
    let text = wait_for("the histogram to count the jobs", Duration::from_secs(10), || {
        let t = scrape();
        (value(&t, "clx_pool_job_duration_seconds_count{worker_type=\"copy\"}")? == 5.0).then_some(t)
    });
    assert_eq!(
        value(&text, "clx_pool_workers{worker_type=\"copy\",state=\"idle\"}"),
        Some(2.0),
        "{text}"
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
