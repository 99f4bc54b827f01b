"""gunicorn's configuration for toot's metrics: ``gunicorn -c gunicorn.conf.py ...``."""

import os
from typing import Any

from prometheus_client import multiprocess


def child_exit(server: Any, worker: Any) -> None:
    # A worker that exited (restarted, killed) no longer reports its live gauges; its
    # counters and histograms stay in the directory and in every scrape.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
