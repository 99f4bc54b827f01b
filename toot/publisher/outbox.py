"""The outbox: events published while Redis was unreachable wait in the database.

``publish`` never raises into the caller's request because Redis is down; the event is
written here instead and the relay (``toot.engine.relay``) moves it onto the ``out`` queue once
Redis answers again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from django.db import close_old_connections, connections, router
from django.db.models import Q
from django.utils import timezone

from toot.engine import drain, queue
from toot.publisher.sending import NewEvent

logger = logging.getLogger(__name__)

# Rows moved onto the queue per relay round.
RELAY_ROWS = 500
CLAIM_TIMEOUT = 60.0


def keep(event: dict[str, Any], error: Exception) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _keep(event)
    else:
        # publish() from async code, an async view: the ORM refuses to run in the event
        # loop's thread, and the event must not be lost. The loop waits, as it did for Redis.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(_keep_and_close, event).result()
    logger.warning(
        "Event %s on %s: Redis failed (%s); kept in the outbox",
        event["id"],
        event["channel"],
        error,
    )


def _keep(event: dict[str, Any]) -> None:
    from toot.models import OutboxEvent

    OutboxEvent.objects.create(event=event)


def _keep_and_close(event: dict[str, Any]) -> None:
    try:
        _keep(event)
    finally:
        connections.close_all()  # this thread's own, which would otherwise stay open


def relay(app: Celery, limit: int = RELAY_ROWS) -> int:
    """Move up to ``limit`` outbox events onto the ``out`` queue, starting a drain through ``app``.

    Rows are claimed with one UPDATE, so that relays in several workers never send the
    same row, and no transaction stays open while Redis is called (SQLite would lock
    publishers out meanwhile). A claim older than CLAIM_TIMEOUT is taken over.
    """
    from toot.models import OutboxEvent

    # Every query on the database the rows are written to: a replica that reads go to
    # would not have the claim just made, and the rows would never leave.
    rows_in = OutboxEvent.objects.using(router.db_for_write(OutboxEvent))
    now = timezone.now()
    free = Q(claimed_at__isnull=True) | Q(claimed_at__lt=now - dt.timedelta(seconds=CLAIM_TIMEOUT))
    ids = list(rows_in.filter(free).values_list("pk", flat=True)[:limit])
    if not ids:
        return 0
    token = uuid.uuid4().hex
    rows_in.filter(free, pk__in=ids).update(claim=token, claimed_at=now)
    try:
        rows = list(rows_in.filter(claim=token))
        if not rows:  # another relay claimed them first
            return 0
        drain.enqueue(queue.OUT, [queue.encode(NewEvent(event=row.event)) for row in rows], app)
        rows_in.filter(pk__in=[row.pk for row in rows]).delete()
    finally:
        rows_in.filter(claim=token).update(claim="", claimed_at=None)
    for row in rows:
        logger.info(
            "Event %s on %s: moved from the outbox to the queue",
            row.event.get("id"),
            row.event.get("channel"),
        )
    return len(rows)


def relay_step(app: Celery) -> None:
    """The relay's step for the outbox (``toot.engine.relay``), added by ``toot.apps``."""
    try:
        relay(app)
    finally:
        close_old_connections()  # this thread's connection would otherwise go stale
