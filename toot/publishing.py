"""``publish``: hand an event to the fan-out task, after the caller's transaction commits."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from kombu.exceptions import OperationalError

from toot import outbox
from toot.conf import conf
from toot.events import Event
from toot.tasks import fan_out
from toot.validation import check_channel

logger = logging.getLogger(__name__)

BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)


def publish(channel: str, payload: Any = None, *, prefix: str | None = None) -> Event:
    """Publish ``payload`` on ``CHANNEL_PREFIX + channel`` (or ``prefix + channel``).

    Returns at once with the event. Inside ``transaction.atomic()`` the event is sent
    only when the transaction commits, so a rolled-back change announces nothing. When
    the broker is unreachable the event waits in the database outbox instead.
    """
    full_channel = check_channel((conf.CHANNEL_PREFIX if prefix is None else prefix) + channel)
    event = Event(full_channel, payload)
    wire = event.to_dict()

    def send() -> None:
        try:
            # No retry loop inside the caller's request: the outbox is the retry.
            fan_out.apply_async((wire,), retry=False)
        except BROKER_ERRORS as exc:
            outbox.keep(wire, exc)
        else:
            logger.info("Event %s on %s: published", event.id, event.channel)

    # Checking the flag first spares a project with no database (or outside any
    # transaction) the connection that on_commit() opens to ask about autocommit.
    if connections[DEFAULT_DB_ALIAS].in_atomic_block:
        transaction.on_commit(send)
    else:
        send()
    return event
