"""``publish``: put an event on the ``out`` queue, after the caller's transaction commits."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from toot.conf import conf
from toot.engine import drain, queue
from toot.engine.broker import BROKER_ERRORS
from toot.exceptions import EventTooLarge, InvalidEvent
from toot.protocol.events import Event, wire_json
from toot.protocol.validation import MAX_JSON_DEPTH, check_channel, nests_deeper, unstorable_text
from toot.publisher import outbox

logger = logging.getLogger(__name__)


def encoded(wire: dict[str, Any]) -> str:
    """The event's JSON as deliveries send it, refused before anything is enqueued when
    subscribers would refuse it.

    A toot subscriber answers 413 to a body over its MAX_EVENT_BYTES, and every retry would
    fail the same way; so would a payload that is not JSON (NaN included, which no JSON
    parser reads back).
    """
    try:
        # ensure_ascii makes its length in characters its size in bytes.
        text = wire_json(wire)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"payload is not JSON: {exc}") from None
    if len(text) > conf.MAX_EVENT_BYTES:
        raise EventTooLarge(wire["channel"], len(text), conf.MAX_EVENT_BYTES)
    if nests_deeper(wire, text=text):  # a toot subscriber refuses it (400), every retry again
        raise InvalidEvent(f"payload is nested more than {MAX_JSON_DEPTH - 1} levels deep")
    unstorable = unstorable_text(wire, text)
    if unstorable:  # a toot subscriber refuses it too (400)
        raise InvalidEvent(f"payload holds {unstorable}")
    return text


def publish(channel: str, payload: Any = None, *, prefix: str | None = None) -> Event:
    """Publish ``payload`` on ``CHANNEL_PREFIX + channel`` (or ``prefix + channel``).

    Returns at once with the event. Inside ``transaction.atomic()``, on any database, the
    event is sent only once the transaction commits, so a rolled-back change announces
    nothing. When Redis is unreachable the event waits in the database outbox instead. An
    event whose JSON is over ``MAX_EVENT_BYTES`` raises EventTooLarge, a payload that is
    not JSON, or that no database stores (encoded()), InvalidEvent, and nothing is sent.
    """
    full_channel = check_channel((conf.CHANNEL_PREFIX if prefix is None else prefix) + channel)
    event = Event(full_channel, payload)
    # The text is what is sent, on commit: a payload the caller changes meanwhile is not.
    text = encoded(event.to_dict())

    def send() -> None:
        try:
            drain.enqueue(queue.OUT, [f'{{"event":{text}}}'])
        except BROKER_ERRORS as exc:  # no retry loop in the caller's request: the outbox is it
            outbox.keep(json.loads(text), exc)
            return
        logger.info("Event %s on %s: published", event.id, event.channel)

    atomic = in_transaction()
    if atomic:
        after_commits(atomic, send)
    else:
        send()
    return event


def in_transaction() -> list[str]:
    """The databases in a transaction now, whose commits the event waits for.

    Only connections already open can be: asking the others would open them (on_commit()
    asks about autocommit), in a project that may have no database. The blocks a test case
    opens on each database (Django's TestCase, pytest-django's django_db) never commit:
    they count on the default database only, where captureOnCommitCallbacks() runs them.
    """
    return [
        connection.alias
        for connection in connections.all(initialized_only=True)
        if connection.in_atomic_block
        and (
            connection.alias == DEFAULT_DB_ALIAS
            or not all(getattr(b, "_from_testcase", False) for b in connection.atomic_blocks)
        )
    ]


def after_commits(aliases: list[str], send: Callable[[], None]) -> None:
    """Call ``send`` once the transactions on every one of ``aliases`` have committed.

    A change made in any of them may be what the event announces: if one rolls back, its
    callback is dropped and ``send`` never runs.
    """
    waiting = set(aliases)

    def committed(alias: str) -> None:
        waiting.discard(alias)
        if not waiting:
            send()

    for alias in aliases:
        transaction.on_commit(functools.partial(committed, alias), using=alias)
