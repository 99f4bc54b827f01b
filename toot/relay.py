"""The relay: a thread in each Celery worker that sends due retries and the outbox.

It needs no beat process: every worker runs one, and the atomic claims in
``toot.retries`` (and row locks on the outbox) keep two relays from sending the same
thing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from django.db import close_old_connections

from toot import outbox, retries
from toot.conf import conf

logger = logging.getLogger(__name__)

# A failing relay (Redis or the database down) logs once per this many seconds.
QUIET_SECONDS = 60.0


def relay_outbox(app: Celery) -> int:
    try:
        return outbox.relay(app)
    finally:
        close_old_connections()  # this thread's connection would otherwise go stale


class Relay(threading.Thread):
    def __init__(self, app: Celery, queues: Sequence[str], *, outbox: bool = True) -> None:
        super().__init__(name="toot-relay", daemon=True)
        self.app = app
        self.queues = queues
        self.steps: list[Callable[[], int]] = [lambda: retries.relay_due(self.app, self.queues)]
        if outbox:
            self.steps.append(lambda: relay_outbox(self.app))
        self.stopping = threading.Event()
        self._last_complaint = -math.inf  # monotonic() starts near 0 at boot: log the first

    def run(self) -> None:
        while not self.stopping.wait(conf.RELAY_INTERVAL):
            for step in self.steps:
                try:
                    step()
                except Exception as exc:  # keep relaying once Redis or the database is back
                    if time.monotonic() - self._last_complaint > QUIET_SECONDS:
                        self._last_complaint = time.monotonic()
                        logger.warning(
                            "toot relay failed, will keep trying: %s", exc, exc_info=True
                        )


_relay: Relay | None = None


def start(app: Celery, queues: Sequence[str], *, outbox: bool = True) -> None:
    """Start this process's relay for the ``queues`` its worker consumes."""
    global _relay
    if _relay is None or not _relay.is_alive():
        _relay = Relay(app, queues, outbox=outbox)
        _relay.start()


def stop() -> None:
    global _relay
    if _relay is not None:
        _relay.stopping.set()
        _relay.join(10)
        _relay = None


@worker_ready.connect(dispatch_uid="toot.relay.start")
def _on_worker_ready(sender: Any, **kwargs: Any) -> None:
    # The worker's app, not current_app: a new thread would see the default app.
    start(sender.app, [queue.name for queue in sender.task_consumer.queues])


@worker_shutting_down.connect(dispatch_uid="toot.relay.stop")
def _on_worker_shutting_down(**kwargs: Any) -> None:
    stop()
