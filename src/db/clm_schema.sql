
-- Jobs table (replaces message queue)
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_type TEXT NOT NULL,
    status TEXT NOT NULL CHECK(status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    priority INTEGER DEFAULT 0,

    input_file TEXT NOT NULL,
    output_file TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    payload TEXT NOT NULL,  -- JSON
    correlation_id TEXT,  -- Optional correlation ID for tracing

    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    started_at TIMESTAMP,
    completed_at TIMESTAMP,
    worker_id INTEGER,

    attempts INTEGER DEFAULT 0,
    max_attempts INTEGER DEFAULT 3,
    error TEXT,
    traceback TEXT,

    -- Cancellation tracking (v4)
    cancelled_at TIMESTAMP,
    cancelled_by TEXT,  -- correlation_id of superseding job

    -- Result data (v6) - stores warnings and other result metadata as JSON
    result TEXT,

    -- Required worker execution mode (v10): 'docker' or 'direct'. NULL means
    -- any worker of the matching job_type may claim the job. Prevents a
    -- Direct-mode worker (e.g. from a concurrent build sharing this jobs DB)
    -- from stealing jobs that need a toolchain only the Docker image has,
    -- such as the xeus-cpp C++ kernel.
    execution_mode TEXT,

    -- Owning build session (v11): the session_id of the WorkerLifecycleManager
    -- that submitted this job, mirroring workers.session_id (issue #594). A
    -- worker claims only jobs whose session matches its own (plus NULL legacy
    -- jobs), so a killed or concurrent build's still-pending jobs — which
    -- reference a workspace this worker cannot address — are never stolen and
    -- failed with "is not in the subpath of" against an innocent slide file
    -- (issue #620). NULL means any worker of the matching job_type/mode may
    -- claim it (legacy / tests).
    session_id TEXT,

    FOREIGN KEY (worker_id) REFERENCES workers(id)
);

CREATE INDEX IF NOT EXISTS idx_jobs_status ON jobs(status, job_type);
CREATE INDEX IF NOT EXISTS idx_jobs_content_hash ON jobs(content_hash);
-- v9: time-windowed status queries ("completed/failed in the last hour",
-- retention cleanup) and "most recently completed" lookups used by
-- clm status / clm monitor. Without these every such query scans all
-- completed jobs, which makes monitor startup crawl on big databases.
CREATE INDEX IF NOT EXISTS idx_jobs_status_completed ON jobs(status, completed_at);
CREATE INDEX IF NOT EXISTS idx_jobs_completed_at ON jobs(completed_at);

-- Results cache table
CREATE TABLE IF NOT EXISTS results_cache (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    output_file TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    result_metadata TEXT,  -- JSON
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    last_accessed TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    access_count INTEGER DEFAULT 0,

    UNIQUE(output_file, content_hash)
);

CREATE INDEX IF NOT EXISTS idx_cache_lookup ON results_cache(output_file, content_hash);

-- Workers table
CREATE TABLE IF NOT EXISTS workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_type TEXT NOT NULL,
    container_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK(status IN ('created', 'idle', 'busy', 'hung', 'dead')),

    started_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    last_heartbeat TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    cpu_usage REAL,
    memory_usage REAL,

    jobs_processed INTEGER DEFAULT 0,
    jobs_failed INTEGER DEFAULT 0,
    avg_processing_time REAL,

    -- v3 schema additions
    execution_mode TEXT,
    config TEXT,
    session_id TEXT,
    managed_by TEXT,

    -- v5 schema additions: Parent process tracking for orphan detection
    parent_pid INTEGER  -- PID of the parent CLM process that started this worker
);

CREATE INDEX IF NOT EXISTS idx_workers_status ON workers(worker_type, status);

-- Worker lifecycle events (audit log)
CREATE TABLE IF NOT EXISTS worker_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL CHECK(event_type IN (
        'worker_starting',     -- Worker process/container starting
        'worker_registered',   -- Worker successfully registered in DB
        'worker_ready',        -- Worker ready to accept jobs
        'worker_stopping',     -- Worker shutdown initiated
        'worker_stopped',      -- Worker successfully stopped
        'worker_failed',       -- Worker failed to start or crashed
        'parent_died',         -- Worker detected parent process death (v5)
        'pool_starting',       -- Worker pool starting
        'pool_started',        -- Worker pool fully started
        'pool_stopping',       -- Worker pool shutdown initiated
        'pool_stopped'         -- Worker pool fully stopped
    )),

    -- Worker identification
    worker_id INTEGER,                    -- NULL for pool-level events
    worker_type TEXT NOT NULL,
    execution_mode TEXT,                  -- 'docker' or 'direct'

    -- Event details
    message TEXT,                         -- Human-readable message
    metadata TEXT,                        -- JSON with event-specific details

    -- Timestamps
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,

    -- Session tracking
    session_id TEXT,

    -- Correlation with worker record
    FOREIGN KEY (worker_id) REFERENCES workers(id)
);

CREATE INDEX IF NOT EXISTS idx_worker_events_type ON worker_events(event_type, created_at);
CREATE INDEX IF NOT EXISTS idx_worker_events_worker ON worker_events(worker_id, created_at);
CREATE INDEX IF NOT EXISTS idx_worker_events_time ON worker_events(created_at);
CREATE INDEX IF NOT EXISTS idx_worker_events_session ON worker_events(session_id, created_at);

-- Schema version tracking
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

-- Worker heartbeats (v8): per-cell activity beacons for in-process visibility.
-- One row per worker; UPSERT on update. Live notebook workers stamp this
-- before each cell and on every stream output. Consumers (clm monitor,
-- clm status) join workers.id <-> worker_heartbeats.worker_id to render
-- the current cell index, in-cell elapsed time, and last stdout/stderr
-- line for each busy worker.
CREATE TABLE IF NOT EXISTS worker_heartbeats (
    worker_id INTEGER PRIMARY KEY,
    job_id INTEGER,
    current_cell_index INTEGER,
    total_cells INTEGER,
    current_cell_started_at TIMESTAMP,
    last_output_excerpt TEXT,
    last_output_at TIMESTAMP,
    heartbeat_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (worker_id) REFERENCES workers(id)
);

CREATE INDEX IF NOT EXISTS idx_worker_heartbeats_job ON worker_heartbeats(job_id);
