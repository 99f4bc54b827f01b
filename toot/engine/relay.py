"""The relay: a thread in each Celery worker that keeps toot's queues moving.

Every ``RELAY_INTERVAL`` it gives back what dead drains held, makes due retries ready and
starts a drain where work waits and none runs (``toot.engine.queue.wake``), and moves events
from the database outbox onto the queue. It needs no beat process: every worker runs
one, and the atomic steps of ``toot.engine.queue`` (and the claims on the outbox) keep two
relays from doing the same work.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from toot.conf import conf
from toot.engine import drain, queue

logger = logging.getLogger(__name__)

# A failing relay (Redis or the database down) logs once per this many seconds.
QUIET_SECONDS = 60.0

Step = Callable[[Celery], object]


def wake(app: Celery) -> None:
    for name in (*queue.QUEUES, *queue.lanes()):
        drain.start(name, queue.wake(name), app)


# What every relay does at each round: wake the queues, and what the sides add when the
# app is ready (the publisher's outbox).
STEPS: list[Step] = [wake]


class Relay(threading.Thread):
    def __init__(self, app: Celery, steps: Sequence[Step] | None = None) -> None:
        super().__init__(name="toot-relay", daemon=True)
        self.app = app
        self.steps = list(STEPS if steps is None else steps)
        self.stopping = threading.Event()
        self._last_complaint = -math.inf  # monotonic() starts near 0 at boot: log the first

    def run(self) -> None:
        while not self.stopping.wait(conf.RELAY_INTERVAL):
            for step in self.steps:
                try:
                    step(self.app)
                except Exception as exc:  # keep relaying once Redis or the database is back
                    if time.monotonic() - self._last_complaint > QUIET_SECONDS:
                        self._last_complaint = time.monotonic()
                        logger.warning(
                            "toot relay failed, will keep trying: %s", exc, exc_info=True
                        )


_relay: Relay | None = None


def start(app: Celery, steps: Sequence[Step] | None = None) -> None:
    """Start this process's relay, sending drains through ``app``."""
    global _relay
    if _relay is None or not _relay.is_alive():
        _relay = Relay(app, steps)
        _relay.start()


def stop() -> None:
    global _relay
    if _relay is not None:
        _relay.stopping.set()
        _relay.join(10)
        _relay = None


def on_worker_ready(sender: Any, **kwargs: Any) -> None:
    """Connected to Celery's ``worker_ready`` by ``toot.apps``."""
    # The worker's app, not current_app: a new thread would see the default app.
    start(sender.app)


def on_worker_shutting_down(**kwargs: Any) -> None:
    """Connected to Celery's ``worker_shutting_down`` by ``toot.apps``."""
    stop()
