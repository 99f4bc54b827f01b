"""A Celery app with one task that does nothing: the broker's and Celery's own limit.

Its worker runs as ``celery -A bench.noop_app worker`` with BENCH_NOOP_BROKER_URL,
BENCH_NOOP_QUEUE and BENCH_NOOP_KEY_PREFIX set; the benchmark sends the tasks with an
app from ``make_app`` that does not become Celery's current app (toot's tasks are
shared tasks, bound to the current app, which in the benchmark is the publisher's).
The task has the options of toot's tasks (acknowledged late, no result) and the worker
the example project's (prefetch multiplier 1), so that the two compare.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

TASK = "bench.noop"


def make_app(broker_url: str, queue: str, key_prefix: str, *, current: bool) -> Celery:
    # No Django fixup: the worker inherits the benchmark's DJANGO_SETTINGS_MODULE.
    app = Celery("bench_noop", set_as_current=current, fixups=[])
    app.conf.update(
        broker_url=broker_url,
        # Every key kombu makes (queue, unacked messages, bindings) starts with this.
        broker_transport_options={"global_keyprefix": key_prefix},
        task_default_queue=queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def noop() -> None:
        return None

    return app


def queued(client: redis.Redis, key_prefix: str, queue: str) -> int:
    """Messages waiting in ``queue`` or taken by a worker and not yet acknowledged."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(key_prefix + queue)
        pipe.hlen(key_prefix + "unacked")  # kombu's key for messages taken, not acknowledged
        waiting, unacked = pipe.execute()
    return int(waiting) + int(unacked)


if os.environ.get("BENCH_NOOP_QUEUE"):  # the worker process
    app = make_app(
        os.environ["BENCH_NOOP_BROKER_URL"],
        os.environ["BENCH_NOOP_QUEUE"],
        os.environ["BENCH_NOOP_KEY_PREFIX"],
        current=True,
    )
