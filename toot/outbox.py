"""The outbox: events published while the broker was unreachable wait in the database.

``publish`` never raises into the caller's request because the broker is down; the
event is written here instead and the relay (``toot.relay``) sends it once the broker
answers again.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, current_app
from django.db import transaction

logger = logging.getLogger(__name__)

BATCH = 500


def keep(event: dict[str, Any], error: Exception) -> None:
    from toot.models import OutboxEvent

    OutboxEvent.objects.create(event=event)
    logger.warning(
        "Event %s on %s: broker unreachable (%s); kept in the outbox", event["id"], event["channel"], error
    )


def relay(app: Celery | None = None, limit: int = BATCH) -> int:
    """Send up to ``limit`` outbox events to the fan-out task through ``app``."""
    from toot.models import OutboxEvent
    from toot.tasks import fan_out

    with transaction.atomic():
        rows = list(OutboxEvent.objects.select_for_update(skip_locked=True)[:limit])
        for row in rows:
            (app or current_app).tasks[fan_out.name].apply_async((row.event,), retry=False)
            logger.info("Event %s on %s: sent from the outbox", row.event.get("id"), row.event.get("channel"))
        OutboxEvent.objects.filter(pk__in=[row.pk for row in rows]).delete()
    return len(rows)
