"""A small CLM worker for clx-pool's tests: a subclass of CLM's own Worker
(clm.infrastructure.workers.worker_base), so registration, activation of a
pre-registered row, claiming, heartbeats, status updates and deregistration
are CLM's real code. Its job: write the input file's text reversed to the
output file, after sleeping `payload["sleep"]` seconds (to be caught busy).
It needs no Java and no converter, so it also fits a small test image.

Run as `python clm_test_worker.py` with the environment CLM's executors
give a worker (CLM_JOBS_DB_PATH or CLM_API_URL, CLM_WORKER_ID, WORKER_TYPE).
"""

import logging
import os
import sys
import time
from pathlib import Path

from clm.infrastructure.database.job_queue import Job
from clm.infrastructure.workers.worker_base import Worker, resolve_jobs_db_path

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s - clm-test-worker - %(levelname)s - %(message)s",
)
logger = logging.getLogger("clm-test-worker")


class ReverseWorker(Worker):
    def process_job(self, job: Job) -> None:
        if self.job_queue.is_job_cancelled(job.id):
            logger.info("job %s was cancelled before it started", job.id)
            return
        seconds = float(job.payload.get("sleep", 0))
        if seconds:
            logger.info("job %s: sleeping %.1fs", job.id, seconds)
            time.sleep(seconds)
        text = Path(job.input_file).read_text(encoding="utf-8")
        out = Path(job.output_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text[::-1], encoding="utf-8")
        logger.info("job %s: wrote %s", job.id, out)


def main() -> None:
    worker_type = os.environ.get("WORKER_TYPE", "reverse")
    api_url = os.environ.get("CLM_API_URL")
    db_path = None if api_url else resolve_jobs_db_path()
    if api_url is None and db_path is None:
        sys.exit("neither CLM_JOBS_DB_PATH nor CLM_API_URL is set")
    worker_id = Worker.get_or_register_worker(db_path=db_path, api_url=api_url, worker_type=worker_type)
    worker = ReverseWorker(worker_id, worker_type, db_path=db_path, api_url=api_url)
    try:
        worker.run()
    finally:
        worker.cleanup()


if __name__ == "__main__":
    main()
