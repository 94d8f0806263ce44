"""A CLX worker written from SPEC section 4, with nothing but the standard
library: it registers with WORKER_ID (or HOSTNAME), claims jobs atomically,
marks itself busy/idle, writes the output file, records the outcome,
heartbeats while idle and on SIGTERM marks itself dead and exits.

Used by the tests (and the benchmarks) to prove that clx-pool supervises a
CLX worker that is not the built-in one. Its "conversion" reverses the
input text; a payload of {"crash": true} makes it exit abruptly mid-job,
{"crash_attempts": N} does so on the job's first N attempts only, and
{"sleep": N} makes the job take N seconds.
"""

import json
import os
import signal
import sqlite3
import sys
import time

worker_type = os.environ["WORKER_TYPE"]
worker_id = os.environ.get("WORKER_ID") or os.environ["HOSTNAME"]
db_path = os.environ["DB_PATH"]
workspace = os.environ.get("WORKSPACE_PATH", ".")
heartbeat_every = float(os.environ.get("TEST_HEARTBEAT_SECONDS", "1"))

stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


# Test switches: a worker that ignores SIGTERM, and one that starts a helper
# in a session of its own (as Jupyter starts kernels).
if os.environ.get("TEST_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
if os.environ.get("TEST_SETSID_HELPER"):
    import subprocess
    subprocess.Popen(["setsid", "sleep", "300"])

db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
db.execute("PRAGMA busy_timeout = 30000")
row = db.execute(
    "INSERT INTO workers (worker_type, container_id, status) VALUES (?, ?, 'idle')",
    (worker_type, worker_id),
).lastrowid
print(f"registered {worker_id} as row {row}", flush=True)


def claim():
    db.execute("BEGIN IMMEDIATE")
    try:
        job = db.execute(
            "SELECT id, input_file, output_file, payload, attempts FROM jobs"
            " WHERE status = 'pending' AND job_type = ? AND attempts < max_attempts"
            " ORDER BY priority DESC, created_at, id LIMIT 1",
            (worker_type,),
        ).fetchone()
        if job:
            db.execute(
                "UPDATE jobs SET status = 'processing', started_at = CURRENT_TIMESTAMP,"
                " worker_id = ?, attempts = attempts + 1 WHERE id = ?",
                (row, job[0]),
            )
            db.execute("UPDATE workers SET status = 'busy' WHERE id = ?", (row,))
        db.execute("COMMIT")
        return job
    except BaseException:
        db.execute("ROLLBACK")
        raise


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(workspace, path)


last_heartbeat = 0.0
while not stopping:
    job = claim()
    if job is None:
        if time.monotonic() - last_heartbeat >= heartbeat_every:
            db.execute("UPDATE workers SET last_heartbeat = CURRENT_TIMESTAMP WHERE id = ?", (row,))
            last_heartbeat = time.monotonic()
        time.sleep(0.02)
        continue
    job_id, input_file, output_file, payload, attempts = job
    options = json.loads(payload or "{}")
    attempt = attempts + 1
    if options.get("crash") or attempt <= int(options.get("crash_attempts", 0)):
        print(f"job {job_id}: crashing as asked", flush=True)
        os._exit(17)
    if options.get("sleep"):
        time.sleep(float(options["sleep"]))
    try:
        with open(resolve(input_file)) as f:
            text = f.read()
        out = resolve(output_file)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text[::-1])
        status, error = "completed", None
    except OSError as e:
        status, error = "failed", str(e)
    db.execute(
        "UPDATE jobs SET status = ?, completed_at = CURRENT_TIMESTAMP, error = ? WHERE id = ?",
        (status, error, job_id),
    )
    db.execute(
        "UPDATE workers SET status = 'idle', last_heartbeat = CURRENT_TIMESTAMP,"
        " jobs_processed = jobs_processed + 1 WHERE id = ?",
        (row,),
    )
    last_heartbeat = time.monotonic()

db.execute("UPDATE workers SET status = 'dead' WHERE id = ?", (row,))
print(f"{worker_id} stopped", flush=True)
sys.exit(0)
