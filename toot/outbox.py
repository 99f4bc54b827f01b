"""The outbox: events published while the broker was unreachable wait in the database.

``publish`` never raises into the caller's request because the broker is down; the
event is written here instead and the relay (``toot.relay``) sends it once the broker
answers again.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from celery import Celery
from django.db.models import Q
from django.utils import timezone

from toot.broker import send_now

logger = logging.getLogger(__name__)

BATCH = 500
CLAIM_TIMEOUT = 60.0


def keep(event: dict[str, Any], error: Exception) -> None:
    from toot.models import OutboxEvent

    OutboxEvent.objects.create(event=event)
    logger.warning(
        "Event %s on %s: broker unreachable (%s); kept in the outbox",
        event["id"],
        event["channel"],
        error,
    )


def relay(app: Celery, limit: int = BATCH) -> int:
    """Send up to ``limit`` outbox events to the fan-out task through ``app``.

    Rows are claimed with one UPDATE, so that relays in several workers never send the
    same row, and no transaction stays open while the broker is called (SQLite would
    lock publishers out meanwhile). A claim older than CLAIM_TIMEOUT is taken over.
    """
    from toot.models import OutboxEvent
    from toot.tasks import fan_out

    now = timezone.now()
    free = Q(claimed_at__isnull=True) | Q(claimed_at__lt=now - dt.timedelta(seconds=CLAIM_TIMEOUT))
    ids = list(OutboxEvent.objects.filter(free).values_list("pk", flat=True)[:limit])
    if not ids:
        return 0
    token = uuid.uuid4().hex
    OutboxEvent.objects.filter(free, pk__in=ids).update(claim=token, claimed_at=now)
    sent = 0
    try:
        for row in OutboxEvent.objects.filter(claim=token):
            send_now(app.tasks[fan_out.name], (row.event,))
            row.delete()
            sent += 1
            logger.info(
                "Event %s on %s: sent from the outbox",
                row.event.get("id"),
                row.event.get("channel"),
            )
    finally:
        OutboxEvent.objects.filter(claim=token).update(claim="", claimed_at=None)
    return sent
