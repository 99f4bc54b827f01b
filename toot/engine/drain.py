"""The one Celery task: a drain, which works through a ``toot.engine.queue`` queue in batches.

It is a ``shared_task``, so it binds to whatever Celery app the project has. What it
works on lives in Redis, not in its message: a drain killed at any point loses nothing,
as the relay gives what it held back to the queue once its lease ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import redis
from celery import Celery, shared_task

from toot.conf import conf
from toot.engine import isolation, queue
from toot.engine.broker import BROKER_ERRORS, send_now
from toot.engine.connection import out_of_memory
from toot.exceptions import LeaseLost

logger = logging.getLogger(__name__)

# While the broker is down, every publish and every relay tick fails to start a drain:
# one warning per this many seconds says so, the rest are logged at DEBUG.
QUIET_SECONDS = 60.0
# A drain that lost Redis tries to give its batch back this often until Redis answers.
GIVE_BACK_POLL = 0.5
_last_warning = -math.inf
# The same for drains that find toot's Redis full (docs/redis.md).
_last_full = -math.inf

# What works through a claimed batch of each queue (and of its lanes), given by its side
# when the app is ready (toot.apps): the items and the drain's lease in, the retries to
# schedule out.
Processor = Callable[[list[Any], queue.Lease], list[queue.Retry]]
PROCESSORS: dict[str, Processor] = {}
# What each queue's drain runs inside (the publisher's senders, the subscriber's event
# loop for async handlers): entered for the run, it yields whether work of the side's is
# still under way, which keeps the drain from ending.
Host = Callable[[], AbstractContextManager[Callable[[], bool]]]
HOSTS: dict[str, Host] = {}
# The Celery queue that a lane's drains are sent to, if not the task's default, by the
# queue the lane belongs to: the subscriber routes a handler's lane where subscribe(...,
# queue=...) says.
Router = Callable[[str], str | None]
ROUTERS: dict[str, Router] = {}


# Acknowledged as it starts, whatever the project's Celery settings say: a drain's work
# is safe in Redis, and its lease, not the broker, decides when another drain takes it.
@shared_task(name="toot.drain", ignore_result=True, acks_late=False, reject_on_worker_lost=False)
def drain(name: str, drain_id: str) -> int:
    """Process ``name``'s items until it is empty; returns how many were processed.

    A drain that went without renewing its lease for ``LEASE_SECONDS`` (a call that hung)
    stops, and schedules no retries: what it held is another drain's by then. A drain that
    fails (the database down while it writes a dead letter, say) puts what it held back
    for another drain in queue.FAILED_WORK_DELAY seconds, and raises; one that lost Redis
    does so at once, as soon as Redis answers again (``_give_back``). One that finds
    toot's Redis full gives its batch back too, but says so in a warning a minute rather
    than raise on every try: the other drains' deliveries make room meanwhile.
    """
    try:
        return _drain(name, drain_id)
    except LeaseLost:
        logger.warning(
            "Drain %s of the %s queue stopped: its lease ran out, and what it held went to "
            "another drain",
            drain_id,
            name,
        )
        return 0
    except Exception as exc:
        _give_back(name, drain_id, exc)
        if not out_of_memory(exc):
            raise
        global _last_full
        level = logging.DEBUG
        if time.monotonic() - _last_full > QUIET_SECONDS:
            level, _last_full = logging.WARNING, time.monotonic()
        logger.log(
            level,
            "Drain %s of the %s queue stopped: toot's Redis is full (%s); what it held is "
            "tried again in %.0fs, as deliveries make room",
            drain_id,
            name,
            exc,
            queue.FAILED_WORK_DELAY,
        )
        return 0


def _give_back(name: str, drain_id: str, error: Exception) -> None:
    """Put what a failing drain held back for another drain: in FAILED_WORK_DELAY seconds
    when its work failed, at once when it lost Redis (a restart, a failover), as soon as
    Redis answers again. Waiting for the lease would stall that batch for LEASE_SECONDS
    behind a failover of two seconds; past a quarter of the lease, the lease ends soon
    enough by itself."""
    lost = isinstance(error, (redis.ConnectionError, redis.TimeoutError))
    deadline = time.monotonic() + (conf.LEASE_SECONDS / 4 if lost else 0)
    while True:
        try:
            queue.abandon(name, drain_id, 0 if lost else queue.FAILED_WORK_DELAY)
            return
        except Exception:
            if time.monotonic() >= deadline:
                return  # the lease ends by itself
            time.sleep(GIVE_BACK_POLL)


def _drain(name: str, drain_id: str) -> int:
    with HOSTS[queue.kind(name)]() as busy:
        return _run(name, drain_id, busy)


def _run(name: str, drain_id: str, busy: Callable[[], bool]) -> int:
    process = PROCESSORS[queue.kind(name)]
    lease = queue.Lease(name, drain_id)
    # Within the client's socket timeout, which would otherwise end the wait.
    batch, seconds, linger = conf.DRAIN_BATCH, conf.DRAIN_SECONDS, conf.DRAIN_LINGER
    linger = min(linger, conf.REDIS_TIMEOUT / 2)
    started = time.monotonic()
    count, retries, first = 0, list[queue.Retry](), True
    while True:
        items = queue.claim(name, drain_id, batch, retries, first=first)
        lease.renewed, retries, first = time.monotonic(), [], False
        if items:
            logger.debug("Drain %s of the %s queue claimed %d items", drain_id, name, len(items))
        elif queue.other_lanes_waiting(name) and not busy():
            # Other lanes have work waiting: it ends at once, rather than hold for a linger
            # a worker slot that they need.
            if queue.release(name, drain_id):
                return count
            continue  # work came in as the lease was about to end
        else:
            item = queue.wait(name, drain_id, linger)
            if item is not None:
                items = [item]
            elif not busy() and queue.release(name, drain_id):
                return count
            else:
                continue  # work came in as the lease was about to end
        retries = process(items, lease)
        count += len(items)
        if time.monotonic() - started > seconds:
            queue.claim(name, drain_id, 0, retries)
            start(name, drain_id)  # the lease goes with it
            return count


def enqueue(name: str, items: Sequence[str], app: Celery | None = None) -> None:
    """Put ``items`` (encoded with ``queue.encode``) on queue ``name``, all or none, and
    start a drain if one should.

    Redis errors are the caller's (nothing was queued); a broker that is down only delays
    the drain (see ``start``). While toot.testing's helpers are active, they take the
    items instead (``toot.engine.isolation``).
    """
    replacement = isolation.stand_in()
    if replacement is not None:
        replacement.push({name: items})
        return
    start(name, queue.push_encoded(name, items), app)


def enqueue_many(pushes: Mapping[str, Sequence[str]]) -> None:
    """``enqueue`` onto several lanes in one round trip to Redis (``queue.push_many``)."""
    replacement = isolation.stand_in()
    if replacement is not None:
        replacement.push(pushes)
        return
    for name, drain_id in queue.push_many(pushes).items():
        start(name, drain_id)


def start(name: str, drain_id: str | None, app: Celery | None = None) -> None:
    """Send a drain for the lease ``drain_id`` (from queue.push or queue.wake), if any, to
    the Celery queue its router names.

    When the broker is unreachable the lease is given up, and the relay starts a drain
    once the broker answers: the items themselves are safe in Redis.
    """
    if drain_id is None:
        return
    try:
        router = ROUTERS.get(queue.kind(name))
        celery_queue = router(name) if router else None
        options = {} if celery_queue is None else {"queue": celery_queue}
        send_now(drain if app is None else app.tasks[drain.name], (name, drain_id), **options)
    except BROKER_ERRORS as exc:
        global _last_warning
        level = logging.DEBUG
        if time.monotonic() - _last_warning > QUIET_SECONDS:
            level, _last_warning = logging.WARNING, time.monotonic()
        logger.log(
            level,
            "Cannot start a drain of the %s queue now (%s); a worker's relay will once the "
            "broker answers",
            name,
            exc,
        )
        with contextlib.suppress(*BROKER_ERRORS):  # else the lease ends by itself
            queue.forget(name, drain_id)
