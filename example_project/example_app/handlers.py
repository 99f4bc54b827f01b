"""The subscriber's handlers: log each event and record when it arrived."""

from __future__ import annotations

import json
import logging
import os
import time

from django.conf import settings

import toot
from toot.engine.connection import get_redis

logger = logging.getLogger(__name__)


def record(event: toot.Event) -> None:
    received_at = time.time()
    sent_at = event.payload.get("sent_at") if isinstance(event.payload, dict) else None
    receipt = {
        "id": event.id,
        "channel": event.channel,
        "timestamp": event.timestamp.isoformat(),
        "payload": event.payload,
        "received_at": received_at,
        "pid": os.getpid(),
    }
    key = getattr(settings, "EXAMPLE_RECEIPTS_KEY", "example:receipts")  # a project setting
    time.sleep(getattr(settings, "EXAMPLE_HANDLER_SECONDS", 0.0))  # a project setting
    logger.info("event %s on %s: handled", event.id, event.channel)
    if key:  # the demo reads them; the project's tests need none (example_app/tests.py)
        get_redis().rpush(key, json.dumps(receipt))
    if sent_at is not None:
        logger.info(
            "event %s on %s: %.1f ms after publish",
            event.id,
            event.channel,
            (received_at - sent_at) * 1000,
        )


def user_updated(event: toot.Event) -> None:
    record(event)


def user_deleted(event: toot.Event) -> None:
    record(event)
