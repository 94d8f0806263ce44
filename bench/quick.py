#!/usr/bin/env python3
"""Quick figures for one pool size: start → all registered, kill -9 →
replacement registered, stop, supervisor peak RSS. Uses the release binary,
the database for registration times and monotonic clocks.

usage: bench/quick.py [N] [KILLS]
"""
import os, signal, sqlite3, statistics, subprocess, sys, tempfile, time

BIN = os.path.abspath(os.environ.get("CLX_POOL", "target/release/clx-pool"))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
KILLS = int(sys.argv[2]) if len(sys.argv) > 2 else 20

def poll(cond, limit=30.0, every=0.001):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError

with tempfile.TemporaryDirectory(prefix="clx-quick-") as d:
    with open(f"{d}/pool.toml", "w") as f:
        f.write(f'[pool]\ndb_path = "jobs.db"\nstop_timeout = "5s"\n\n[[workers]]\nworker_type = "t"\ncount = {N}\njob_command = ["true"]\n')
    t0 = time.monotonic()
    sup = subprocess.Popen([BIN, "start", "--config", f"{d}/pool.toml"], stderr=open(f"{d}/sup.log", "w"))
    def conn():
        c = sqlite3.connect(f"{d}/jobs.db", timeout=10)
        return c
    def running():
        try:
            return conn().execute("SELECT COUNT(*) FROM clx_pool_slots WHERE state = 'running'").fetchone()[0] == N
        except sqlite3.Error:
            return False
    poll(running)
    start_s = time.monotonic() - t0
    c = conn()
    restarts = []
    for i in range(KILLS):
        slot = i % N
        wid, pid = c.execute("SELECT worker_id, pid FROM clx_pool_slots WHERE slot = ?", (slot,)).fetchone()
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        poll(lambda: c.execute("SELECT 1 FROM clx_pool_slots WHERE slot = ? AND state = 'running' AND worker_id != ?", (slot, wid)).fetchone())
        restarts.append(time.monotonic() - t)
        time.sleep(0.05)
    rss = [l for l in open(f"/proc/{sup.pid}/status") if l.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))]
    t = time.monotonic()
    subprocess.run([BIN, "stop", "--db", f"{d}/jobs.db"], check=True, capture_output=True)
    stop_s = time.monotonic() - t
    sup.wait()
    print(f"N={N}: start→all registered {start_s:.3f}s; kill -9→replacement registered median {statistics.median(restarts)*1000:.1f}ms "
          f"(min {min(restarts)*1000:.1f}, max {max(restarts)*1000:.1f}, {KILLS} kills); stop {stop_s:.3f}s; "
          + ", ".join(x.strip().replace("\t", " ") for x in rss))
