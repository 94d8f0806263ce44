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
