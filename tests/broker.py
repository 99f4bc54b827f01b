"""Real brokers for tests: one that is unreachable for a while, and queues a test reads."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from django.conf import settings
from kombu import pools
from kombu.utils.collections import eqhash

from devtools.processes import free_port, wait_for
from tests.celery import app as celery_app
from tests.utils import live_leases
from toot.store import get_redis


def _pools(app: Celery) -> tuple[Any, Any]:
    # Celery's own attributes (Celery._after_fork() resets them the same way).
    return app._pool, app.amqp._producer_pool  # type: ignore[attr-defined]


def _set_pools(app: Celery, saved: tuple[Any, Any]) -> None:
    app._pool, app.amqp._producer_pool = saved  # type: ignore[attr-defined]


@contextmanager
def broker_unreachable(app: Celery = celery_app) -> Iterator[str]:
    """Point ``app`` at a port where nothing listens, as if its Redis had stopped.

    Setting ``broker_url`` alone changes nothing: the app keeps publishing through the
    connection and producer pools it already holds. So those are set aside for the
    duration, and put back afterwards with the URL. (The in-process worker shares the
    app: what it publishes meanwhile fails too.)
    """
    saved_url, saved_pools = app.conf.broker_url, _pools(app)
    url = f"redis://127.0.0.1:{free_port()}/0"
    app.conf.update(broker_url=url)
    _set_pools(app, (None, None))
    try:
        yield url
    finally:
        down = eqhash(app.connection_for_write())
        app.conf.update(broker_url=saved_url)
        _set_pools(app, saved_pools)
        # kombu keeps its pools per URL in global groups: drop the dead URL's.
        for group in (pools.producers, pools.connections):
            pool = group.pop(down, None)
            if pool is not None:
                pool.force_close_all()


@contextmanager
def broker_unreachable_and_no_drain(name: str) -> Iterator[str]:
    """``broker_unreachable``, once no drain of queue ``name`` holds a lease: the next push
    must start one, and fails to.

    A drain that the relay started just before (for work an earlier test left) ends once
    it finds nothing more to do, and none can start meanwhile.
    """
    with broker_unreachable() as url:
        wait_for(lambda: not live_leases(get_redis(), name), 30, f"the {name} queue's drains")
        yield url


PROBE_TASK = "tests.probe"


@contextmanager
def probe_app(queue: str) -> Iterator[Celery]:
    """A Celery app on the tests' broker whose default queue is ``queue``, one no worker reads.

    Its one task, PROBE_TASK, never runs: a test reads what was sent with ``queued()``.
    """
    app = Celery("toot-probe", broker=settings.CELERY_BROKER_URL, set_as_current=False)
    app.conf.task_default_queue = queue

    @app.task(name=PROBE_TASK, shared=False)
    def probe(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never runs
        pass

    try:
        yield app
    finally:
        app.close()
        # Messages under the run's KEY_PREFIX go with the `redis` fixture; kombu's bindings don't.
        get_redis().delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def queued(queue: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """The (task name, args, kwargs) of every message waiting on ``queue``, oldest first."""
    messages: list[tuple[str, list[Any], dict[str, Any]]] = []
    for raw in reversed(get_redis().lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], args, kwargs))
    return messages
