"""Sending a task to the broker without kombu's connection retries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from celery import Task
from kombu.exceptions import OperationalError

# What sending a task raises when the broker is unreachable.
BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)


def send_now(task: Task[Any, Any], args: Sequence[Any], **options: Any) -> None:
    """Send ``task`` with one connection attempt, raising BROKER_ERRORS at once if it fails.

    Even with ``retry=False`` kombu retries connecting for its connect timeout (about 6 s),
    which would hold a web request, or a relay past the timeout of its claims.
    """
    with task.app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=0)
        task.apply_async(tuple(args), retry=False, producer=producer, **options)
