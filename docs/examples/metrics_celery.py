"""In the module that defines the project's Celery app (``myproject/celery.py``)."""

import os
from typing import Any

from celery.signals import worker_process_shutdown
from prometheus_client import multiprocess


@worker_process_shutdown.connect
def mark_process_dead(pid: int | None = None, **kwargs: Any) -> None:
    # Sent in each pool process as it exits: as gunicorn's child_exit, for Celery's.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())
