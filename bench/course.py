"""The course-build benchmark: what users run is `clm build` of a course.

A course in CLM's own layout (course-specs/course.xml, slides/module_*/
topic_*/slides_*.py in jupytext percent format, PlantUML diagrams in pu/)
is generated, then built by CLM 1.35 from PyPI in alternating rounds:

- clm alone:       `clm build --workers direct` starting its own workers;
- warm pool:       the same build on a clx-pool pool of the same workers,
                   already running (the build must start none of its own);
- warm pool, kill: the same, with a pool worker killed -9 every 10 s;
- clm alone, kill: CLM's own workers, one of them killed -9 once, with a
                   bounded wait.

Every round starts cold: a fresh output folder, a fresh cache database
and --clear-cache (CLM would otherwise answer from its result cache). Each
finished build's file list is compared with the first clean build's.
"""

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

NOTEBOOKS = 8
DIAGRAMS = 2
KILL_EVERY = 10.0

COURSE_XML = """<?xml version="1.0" encoding="UTF-8"?>
<course>
    <name><de>Benchmarkkurs</de><en>Benchmark Course</en></name>
    <prog-lang>python</prog-lang>
    <description><de>Ein erzeugter Kurs</de><en>A generated course</en></description>
    <certificate><de>-</de><en>-</en></certificate>
    <project-slug>bench-course</project-slug>
    <sections>
%s
    </sections>
</course>
"""

SECTION = """        <section>
            <name><de>Woche %(n)d</de><en>Week %(n)d</en></name>
            <topics>
%(topics)s
            </topics>
        </section>"""

NOTEBOOK = '''# j2 from 'macros.j2' import header
# {{ header("Thema %(n)d", "Topic %(n)d") }}

# %% [markdown] lang="de" tags=["slide"]
#
# ## Zahlen und Listen (%(n)d)
#
# Wir berechnen etwas, damit das Notebook wirklich ausgefuehrt wird.

# %% [markdown] lang="en" tags=["slide"]
#
# ## Numbers and lists (%(n)d)
#
# We compute something so that the notebook really executes.

# %%
numbers = [i * i for i in range(%(size)d)]
sum(numbers)

# %%
def primes(limit):
    sieve = [True] * (limit + 1)
    sieve[0:2] = [False, False]
    for i in range(2, int(limit ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = [False] * len(sieve[i * i :: i])
    return [i for i, p in enumerate(sieve) if p]

# %%
len(primes(%(limit)d))

# %% [markdown] lang="de" tags=["subslide"]
#
# ## Texte

# %% [markdown] lang="en" tags=["subslide"]
#
# ## Text

# %% tags=["keep"]
words = "the quick brown fox jumps over the lazy dog".split()
sorted(words, key=len)

# %%
{w: len(w) for w in words}

# %% tags=["start"]
def fib(n):
    pass

# %%
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

# %%
[fib(i) for i in range(%(fib)d)]

# %%
print("topic %(n)d done")
'''

DIAGRAM = """@startuml
title Diagram %(n)d
class Pool%(n)d {
  +start()
  +stop()
}
class Worker%(n)d {
  +claim()
  +complete()
}
Pool%(n)d "1" *-- "many" Worker%(n)d
@enduml
"""


def generate(root):
    """Writes the course under `root`; returns its spec file."""
    topics = []
    for n in range(1, NOTEBOOKS + 1):
        name = "bench_topic_%d" % n
        folder = os.path.join(root, "slides", "module_%03d_bench" % (100 + 10 * ((n - 1) // 4)),
                              "topic_%03d_%s" % (100 + n, name))
        os.makedirs(folder)
        with open(os.path.join(folder, "slides_%s.py" % name), "w") as f:
            f.write(NOTEBOOK % {"n": n, "size": 1000 * n, "limit": 20000 + 5000 * n, "fib": 20 + n})
        if n <= DIAGRAMS:
            os.makedirs(os.path.join(folder, "pu"))
            with open(os.path.join(folder, "pu", "diagram_%d.pu" % n), "w") as f:
                f.write(DIAGRAM % {"n": n})
        topics.append(name)
    sections = [SECTION % {"n": s + 1, "topics": "\n".join("                <topic>%s</topic>" % t for t in topics[s * 4:s * 4 + 4])}
                for s in range((len(topics) + 3) // 4)]
    os.makedirs(os.path.join(root, "course-specs"))
    spec = os.path.join(root, "course-specs", "course.xml")
    with open(spec, "w") as f:
        f.write(COURSE_XML % "\n".join(sections))
    return spec


def file_list(folder):
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if not rel.startswith(".clm") and name != ".clm-manifest.json":
                out.append(rel)
    return sorted(out)


class Course:
    """The generated course, CLM's venv and a scratch folder for rounds."""

    def __init__(self, work, venv, bin_path, jar):
        self.dir = tempfile.mkdtemp(prefix="clx-course-", dir=work)
        self.venv = venv
        self.bin = bin_path
        self.jar = jar
        self.spec = generate(os.path.join(self.dir, "course"))
        self.round = 0
        self.reference = None

    def env(self):
        env = dict(os.environ)
        env["PATH"] = os.path.join(self.venv, "bin") + os.pathsep + env.get("PATH", "")
        env["PLANTUML_JAR"] = self.jar
        env["VIRTUAL_ENV"] = self.venv
        env.pop("CI", None)
        return env

    def build(self, jobs_db, on_start=None, limit=600.0, cache=None):
        """One cold `clm build` (a fresh output folder; a fresh cache
        database unless `cache`); returns (seconds or None if cut off at
        `limit`, file list, CLM's output). `on_start(proc, stop)` runs in a
        thread while the build runs. A build that exits nonzero raises
        BuildFailed."""
        self.round += 1
        out = os.path.join(self.dir, "out-%d" % self.round)
        cache = cache or os.path.join(self.dir, "cache-%d.db" % self.round)
        cmd = [os.path.join(self.venv, "bin", "clm"), "--jobs-db-path", jobs_db, "--cache-db-path", cache,
               "build", self.spec, "--output-dir", out, "--clear-cache",
               "--workers", "direct", "--notebook-workers", "1", "--plantuml-workers", "1", "--drawio-workers", "0",
               "--no-progress", "--no-color", "--no-env-file", "--log-level", "info"]
        log = os.path.join(self.dir, "clm-%d.log" % self.round)
        env = self.env()
        env["CLM_LOG_DIR"] = os.path.join(self.dir, "clm-logs-%d" % self.round)
        t0 = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                    start_new_session=True)
            stop = threading.Event()
            helper = threading.Thread(target=on_start, args=(proc, stop), daemon=True) if on_start else None
            if helper:
                helper.start()
            try:
                proc.wait(limit)
                took = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                took = None
            finally:
                stop.set()
                if helper:
                    helper.join()
                end_group(proc)
        text = ""
        for path in (log, os.path.join(env["CLM_LOG_DIR"], "clm.log")):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        if took is not None and proc.returncode != 0:
            raise BuildFailed(proc.returncode, took, file_list(out), text)
        return took, file_list(out), text


class BuildFailed(RuntimeError):
    """`clm build` exited nonzero: its status, time, files and output."""

    def __init__(self, code, took, files, text):
        super().__init__("clm build failed (exit %s); its output:\n%s" % (code, text[-3000:]))
        self.code, self.took, self.files = code, took, files


def end_group(proc):
    """Ends `clm build` and every worker it started: its session, and the
    processes below it that lead sessions of their own (CLM starts its
    workers so; killed with the session alone, they lingered ~20 s)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants(pid):
    """Every process below `pid`, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class WarmPool:
    """A clx-pool pool of CLM's workers (one notebook, one plantuml, as CLM
    starts on its own), started once and reused by every warm round."""

    def __init__(self, course):
        self.course = course
        self.dir = os.path.join(course.dir, "pool")
        os.makedirs(os.path.join(self.dir, "workspace"))
        self.db = os.path.join(self.dir, "jobs.db")
        self.cache = os.path.join(self.dir, "cache.db")
        self.config = os.path.join(self.dir, "pool.toml")
        python = os.path.join(course.venv, "bin", "python")
        entry = ('[[workers]]\nworker_type = "%s"\ncount = 1\ncommand = %s\nenv = %s\n')
        env = lambda extra: "{ " + ", ".join('%s = "%s"' % kv for kv in [("CLM_CACHE_DB_PATH", self.cache)] + extra) + " }"
        with open(self.config, "w") as f:
            f.write('[pool]\nprotocol = "clm"\ndb_path = "jobs.db"\ncache_db_path = "cache.db"\n'
                    'workspace_path = "workspace"\nlog_dir = "logs"\n\n')
            f.write(entry % ("notebook", json.dumps([python, "-m", "clm.workers.notebook"]), env([])))
            f.write(entry % ("plantuml", json.dumps([python, "-m", "clm.workers.plantuml"]),
                             env([("PLANTUML_JAR", course.jar)])))
        self.proc = subprocess.Popen([course.bin, "start", "--config", self.config], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "supervisor.log"), "w"))
        self.ready()

    def ready(self):
        """Waits until every slot holds a registered worker."""
        subprocess.run([self.course.bin, "wait", "--ready", "--config", self.config, "--timeout", "180s"],
                       check=True, capture_output=True)

    def query(self, sql):
        c = sqlite3.connect(self.db, timeout=30)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()

    def workers_registered(self):
        return self.query("SELECT COUNT(*) FROM workers")[0][0]

    def restarts(self):
        return self.query("SELECT COALESCE(SUM(restarts), 0) FROM clx_pool_slots")[0][0]

    def clear_caches(self):
        """What a cold build must not find: CLM's result cache and executed
        notebooks (their tables, if CLM made them yet)."""
        for db, tables in ((self.db, ("results_cache",)),
                           (self.cache, ("processed_files", "executed_notebooks", "processing_issues"))):
            if not os.path.exists(db):
                continue
            c = sqlite3.connect(db, timeout=30)
            try:
                have = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                for t in tables:
                    if t in have:
                        c.execute("DELETE FROM %s" % t)
                c.commit()
            finally:
                c.close()

    def running(self):
        """(pid, worker type) of every running worker."""
        return self.query("SELECT pid, worker_type FROM clx_pool_slots WHERE state = 'running' AND pid IS NOT NULL "
                          "ORDER BY worker_type")

    def close(self):
        if self.proc.poll() is None:
            subprocess.run([self.course.bin, "stop", "--config", self.config, "--timeout", "30s"], capture_output=True)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def warm_build(course, pool, kills, seed):
    """One cold build on the warm pool; with `kills`, a pool worker (chosen
    at random) is killed -9 every KILL_EVERY seconds. Returns (seconds,
    files, kills made). Raises if the build started a worker of its own."""
    pool.ready()
    pool.clear_caches()
    rows0, restarts0 = pool.workers_registered(), pool.restarts()
    made = []
    foreign = []

    def during(proc, stop):
        rng = random.Random(seed)
        next_kill = time.monotonic() + KILL_EVERY
        while not stop.wait(0.5):
            foreign.extend(p for p in descendants(proc.pid) if "clm.workers" in cmdline(p))
            if kills and time.monotonic() >= next_kill:
                running = pool.running()
                if running:
                    pid, worker_type = rng.choice(running)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        made.append(worker_type)
                    except ProcessLookupError:
                        pass
                next_kill += KILL_EVERY

    took, files, text = course.build(pool.db, on_start=during, cache=pool.cache)
    # Every worker row that appeared is one of the pool's replacements: the
    # build registered none of its own.
    pool.ready()
    new_rows = pool.workers_registered() - rows0
    replaced = pool.restarts() - restarts0
    if foreign or new_rows != replaced or "Sufficient healthy workers already running" not in text:
        raise RuntimeError("the build on the warm pool started workers of its own (processes %s, %d new worker rows "
                           "for %d replacements); its output:\n%s" % (foreign, new_rows, replaced, text[-3000:]))
    if kills and replaced != len(made):
        raise RuntimeError("%d workers killed but the pool replaced %d" % (len(made), replaced))
    return took, files, made


def alone_build_with_a_kill(course, limit):
    """CLM alone, its notebook worker killed -9 once, KILL_EVERY seconds
    in; returns (seconds or None when not finished within `limit`, files,
    job states, CLM's exit status: 0, N when it gave up, None when cut off)."""
    db = os.path.join(course.dir, "alone-kill-%d.db" % (course.round + 1))
    killed = []

    def during(proc, stop):
        deadline = time.monotonic() + KILL_EVERY
        while not stop.wait(0.5):
            if not killed and time.monotonic() >= deadline:
                workers = [p for p in descendants(proc.pid) if "clm.workers.notebook" in cmdline(p)]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])

    try:
        took, files, _ = course.build(db, on_start=during, limit=limit)
        code = None if took is None else 0
    except BuildFailed as e:
        took, files, code = e.took, e.files, e.code
    if not killed:
        raise RuntimeError("the build ended before its notebook worker could be killed")
    c = sqlite3.connect(db, timeout=30)
    try:
        states = dict(c.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    finally:
        c.close()
    return took, files, states, code


def bench(record, work, venv, bin_path, jar, rounds, alone_kills):
    """The course-build rows: `rounds` alternating rounds of CLM alone, the
    warm pool and the warm pool with kills, then `alone_kills` builds of
    CLM alone with one kill, bounded at three times its clean median."""
    course = Course(work, venv, bin_path, jar)
    times = {"alone": [], "warm": [], "kills": []}
    correct = {"alone": 0, "warm": 0, "kills": 0}
    kills_made = []
    pool = None
    try:
        for r in range(rounds):
            took, files, _ = course.build(os.path.join(course.dir, "alone-%d.db" % r))
            if course.reference is None:
                course.reference = files
            times["alone"].append(took)
            correct["alone"] += files == course.reference
            print("    round %d: clm alone %.1f s, %d files" % (r + 1, took, len(files)), flush=True)
            if pool is None:
                pool = WarmPool(course)
            took, files, _ = warm_build(course, pool, False, r)
            times["warm"].append(took)
            correct["warm"] += files == course.reference
            print("    round %d: warm pool %.1f s, %d files" % (r + 1, took, len(files)), flush=True)
            took, files, made = warm_build(course, pool, True, r)
            times["kills"].append(took)
            kills_made.append("%d (%d notebook)" % (len(made), made.count("notebook")))
            correct["kills"] += files == course.reference
            print("    round %d: warm pool, %s kills %.1f s, %d files" % (r + 1, kills_made[-1], took, len(files)),
                  flush=True)
    finally:
        if pool is not None:
            pool.close()
    limit = 3 * sorted(times["alone"])[len(times["alone"]) // 2]
    finished, alone_kill_times, alone_kill_correct, left = 0, [], 0, []
    for _ in range(alone_kills):
        took, files, states, code = alone_build_with_a_kill(course, limit)
        jobs = ", ".join("%d %s" % (n, s) for s, n in sorted(states.items()))
        if code == 0:
            outcome = "finished in %.1f s" % took
            finished += 1
            alone_kill_times.append(took)
            alone_kill_correct += files == course.reference
        elif code is None:
            outcome = "not finished in %.0f s" % limit
        else:
            outcome = "CLM gave up after %.1f s (exit %d, %d of %d files)" % (took, code, len(files), len(course.reference))
        if code != 0:
            left.append("%s, jobs: %s" % (outcome, jobs))
        print("    clm alone, one kill: %s (jobs: %s)" % (outcome, jobs), flush=True)
    n_files = len(course.reference)
    what = "%d notebooks, %d diagrams, %d output files; CLM 1.35 from PyPI, 1 notebook + 1 plantuml worker" % (
        NOTEBOOKS, DIAGRAMS, n_files)
    cold = "cold: fresh output folder, cache database cleared, --clear-cache"
    record("course build: clm alone", 2, "clm", "s", times["alone"], "`clm build --workers direct` starting its own workers (%s)" % what,
           "%d rounds alternating with the pool rounds, %s" % (rounds, cold))
    record("course build: warm pool", 2, "clx-pool", "s", times["warm"],
           "the same build reusing a running clx-pool pool of the same workers; it started none of its own (checked)",
           "%d rounds, %s" % (rounds, cold))
    record("course build: warm pool, kill -9 every 10 s", 2, "clx-pool", "s", times["kills"],
           "the same, a random pool worker killed -9 every 10 s (kills per build: %s); each one replaced, its job requeued"
           % ", ".join(kills_made),
           "%d rounds, %s" % (rounds, cold))
    alone = sorted(times["alone"])[len(times["alone"]) // 2]
    warm = sorted(times["warm"])[len(times["warm"]) // 2]
    kills = sorted(times["kills"])[len(times["kills"]) // 2]
    record("course build warm pool / clm alone", 2, "clx-pool", "ratio", [warm / alone],
           "median of the warm-pool builds over the median of CLM alone", "the rows above")
    record("course build with kills / warm pool", 2, "clx-pool", "ratio", [kills / warm],
           "median with a kill every 10 s over the median clean warm build", "the rows above")
    total = 3 * rounds
    record("course outputs correct", 2, "clx-pool", "of %d" % total, [correct["alone"] + correct["warm"] + correct["kills"]],
           "builds whose output file list equals the first clean build's (%d files): clm alone %d, warm %d, with kills %d of %d each"
           % (n_files, correct["alone"], correct["warm"], correct["kills"], rounds), "file lists under --output-dir")
    record("course build: clm alone, one kill", 2, "clm", "finished", [finished],
           "CLM starting its own workers, its notebook worker killed -9 once 10 s in: %d of %d builds finished within %.0f s "
           "(3 x its clean median)%s%s" % (
               finished, alone_kills, limit,
               ", in %s (outputs correct in %d)" % (", ".join("%.1f s" % t for t in alone_kill_times), alone_kill_correct)
               if alone_kill_times else "",
               "; the others: %s" % "; ".join(left) if left else ""),
           "%d builds, bounded wait, then the build and its workers killed" % alone_kills)
    shutil.rmtree(course.dir, ignore_errors=True)
