"""``publish``: put an event on the ``out`` queue, after the caller's transaction commits."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from toot import signals
from toot.conf import conf
from toot.engine import drain, isolation, queue
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
    return _encoded(wire)[0]


def _encoded(wire: dict[str, Any]) -> tuple[str, bool]:
    """``encoded``, and whether ``JSON_ENCODER`` had to turn values into JSON."""
    converted = False
    try:
        # ensure_ascii makes its length in characters its size in bytes.
        text = wire_json(wire)
    except TypeError:  # a datetime, a Decimal, a UUID...: what the project's encoder takes
        converted = True
        try:
            text = wire_json(wire, conf.JSON_ENCODER)
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"payload is not JSON: {not_json(wire, exc)}") from None
    except ValueError as exc:  # NaN or infinity
        raise InvalidEvent(f"payload is not JSON: {not_json(wire, exc)}") from None
    if len(text) > conf.MAX_EVENT_BYTES:
        raise EventTooLarge(wire["channel"], len(text), conf.MAX_EVENT_BYTES)
    if nests_deeper(wire, text=text):  # a toot subscriber refuses it (400), every retry again
        raise InvalidEvent(f"payload is nested more than {MAX_JSON_DEPTH - 1} levels deep")
    unstorable = unstorable_text(wire, text)
    if unstorable:  # a toot subscriber refuses it too (400)
        raise InvalidEvent(f"payload holds {unstorable}")
    return text, converted


def not_json(wire: dict[str, Any], error: Exception) -> str:
    """Where in the payload the value JSON cannot hold is, and what it is, for the error."""
    encoder = conf.JSON_ENCODER()

    def find(value: Any, path: str) -> str | None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    return f"{path} has a key of type {type(key).__name__}"
                found = find(item, f"{path}[{json.dumps(key)}]")
                if found:
                    return found
            return None
        if isinstance(value, (list, tuple)):
            return next(
                (f for i, item in enumerate(value) if (f := find(item, f"{path}[{i}]"))), None
            )
        if isinstance(value, float) and not math.isfinite(value):
            return f"{path} is {value!r}, which JSON cannot hold"
        if value is None or isinstance(value, (str, int, float, bool)):
            return None
        try:
            converted = encoder.default(value)
        except (TypeError, ValueError):
            return (
                f"{path} is a {type(value).__name__}, which {type(encoder).__name__} cannot encode"
            )
        return find(converted, path)

    return find(wire.get("payload"), "payload") or str(error)


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
    if not conf.TRACING:
        return _publish(event)
    from toot import tracing

    with tracing.publishing(event) as traceparent:
        return _publish(event, traceparent)


def _publish(event: Event, traceparent: str | None = None) -> Event:
    """``publish`` once the event is made; ``traceparent``: the publish span's context,
    which the queue item carries to the deliveries (toot.tracing)."""
    # The text is what is sent, on commit: a payload the caller changes meanwhile is not.
    text, converted = _encoded(event.to_dict())
    if converted:  # the event as subscribers get it: datetimes as strings, and so on
        event.payload = json.loads(text)["payload"]
    # The out queue's item (sending.NewEvent), made by hand: the text is not parsed again.
    item = (
        f'{{"event":{text}}}'
        if traceparent is None
        else (f'{{"event":{text},"traceparent":"{traceparent}"}}')
    )
    replacement = isolation.stand_in()
    if replacement is not None:  # toot.testing: the call is seen now, the event on commit
        replacement.publishing(json.loads(text))

    def send() -> None:
        try:
            drain.enqueue(queue.OUT, [item])
        except BROKER_ERRORS as exc:  # no retry loop in the caller's request: the outbox is it
            outbox.keep(json.loads(text), exc)
            kept = True
        else:
            kept = False
            logger.info("Event %s on %s: published", event.id, event.channel)
        if signals.event_published.receivers:
            signals.send(
                signals.event_published,
                Event,
                f"Event {event.id} on {event.channel}",
                event=event,
                outbox=kept,
            )

    atomic = in_transaction()
    if atomic:
        after_commits(atomic, send)
    else:
        send()
    return event


async def apublish(channel: str, payload: Any = None, *, prefix: str | None = None) -> Event:
    """``publish`` for async code, such as an async view: the event loop goes on while it
    waits for Redis (or the outbox).

    It runs ``publish`` through ``sync_to_async(thread_sensitive=True)``, in the thread
    where Django runs the request's sync code and its ORM calls: ``publish`` waits for the
    transactions open on that thread's connections, as it does in sync code. An async
    Redis client (redis.asyncio) would not see them, and would need a second connection
    pool and copies of the queue's scripts for the same single round trip.
    """
    return await sync_to_async(publish, thread_sensitive=True)(channel, payload, prefix=prefix)


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
