"""The relay: a thread in each Celery worker that keeps toot's queues moving.

Every ``RELAY_INTERVAL`` it gives back what dead drains held, makes due retries ready and
starts a drain where work waits and none runs (``toot.queue.wake``), and moves events
from the database outbox onto the queue. It needs no beat process: every worker runs
one, and the atomic steps of ``toot.queue`` (and the claims on the outbox) keep two
relays from doing the same work.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from django.db import close_old_connections

from toot import outbox, queue, tasks
from toot.conf import conf

logger = logging.getLogger(__name__)

# A failing relay (Redis or the database down) logs once per this many seconds.
QUIET_SECONDS = 60.0


def wake(app: Celery) -> None:
    for name in queue.QUEUES:
        tasks.start(name, queue.wake(name), app)


def relay_outbox(app: Celery) -> None:
    try:
        outbox.relay(app)
    finally:
        close_old_connections()  # this thread's connection would otherwise go stale


class Relay(threading.Thread):
    def __init__(self, app: Celery, *, outbox: bool = True) -> None:
        super().__init__(name="toot-relay", daemon=True)
        self.app = app
        self.steps: list[Callable[[], None]] = [lambda: wake(self.app)]
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


def start(app: Celery, *, outbox: bool = True) -> None:
    """Start this process's relay, sending drains through ``app``."""
    global _relay
    if _relay is None or not _relay.is_alive():
        _relay = Relay(app, outbox=outbox)
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
    start(sender.app)


@worker_shutting_down.connect(dispatch_uid="toot.relay.stop")
def _on_worker_shutting_down(**kwargs: Any) -> None:
    stop()
