"""What toot holds and how its subscribers fare: queues, retries, dead letters,
subscriptions and each callback URL's health, for an operator (``manage.py toot_status``).

Everything is read from Redis' own records and a few database counts, in a round trip or
two per part: no SCAN, no reading of the retries themselves. Times are Redis' own (UTC).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from django.db.models import Count

from toot.engine import queue
from toot.engine.connection import as_text, get_redis
from toot.publisher import lanes, store
from toot.subscriber import handling

EPOCH = dt.datetime.fromtimestamp(0, dt.timezone.utc)


def _when(timestamp: float | str | None) -> dt.datetime | None:
    if timestamp is None or timestamp == "":
        return None
    return dt.datetime.fromtimestamp(float(timestamp), dt.timezone.utc)


@dataclass
class QueueDepth:
    """A ``toot.engine.queue`` queue (or lane): items ready, held by running drains,
    waiting for a retry and when the first is due, and its drains."""

    name: str
    ready: int
    held: int
    retries: int
    next_retry: dt.datetime | None
    drains: int

    @classmethod
    def of(cls, name: str) -> QueueDepth:
        depth = queue.depth(name)
        return cls(
            name, depth.ready, depth.held, depth.retries, _when(depth.next_due), depth.drains
        )


@dataclass
class Subscription:
    channel: str
    callback_url: str
    batch: bool


@dataclass
class CallbackHealth:
    """A callback URL as the publisher sees it."""

    url: str
    channels: int  # subscribed to
    waiting: int  # in its lane, to be sent
    in_flight: int  # claims being sent
    circuit: str  # "closed", "open", "probing" or "disabled"
    failures: int  # in a row
    failing_since: dt.datetime | None
    open_until: dt.datetime | None
    rate: float | None  # events per second, None if unlimited
    last_success: dt.datetime | None
    last_failure: dt.datetime | None
    last_error: str  # the last failure's status or error
    retries: int  # failed deliveries waiting for their retry
    next_retry: dt.datetime | None  # when the first is due; now once hurried


@dataclass
class PublisherStatus:
    queue: QueueDepth  # the out queue: events to fan out to the lanes
    waiting: int  # in the callback URLs' lanes
    held: int  # by sender threads
    retries: int
    next_retry: dt.datetime | None
    outbox: int  # events kept in the database while Redis was down
    dead_letters_by_channel: dict[str, int]
    dead_letters_by_url: dict[str, int]
    subscriptions: list[Subscription]
    callbacks: list[CallbackHealth]


@dataclass
class SubscriberStatus:
    queues: list[QueueDepth]  # the in queue, and a lane per handler
    dead_letters_by_channel: dict[str, int]
    dead_letters_by_handler: dict[str, int]


@dataclass
class Status:
    at: dt.datetime
    publisher: PublisherStatus
    subscriber: SubscriberStatus
    # Per minute over the last hour, oldest first: deliveries delivered and failed,
    # handler runs handled and failed.
    minutes: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), default=dt.datetime.isoformat, indent=2)


def subscriptions() -> list[Subscription]:
    """Every subscription this publisher stores, by channel then URL."""
    return [Subscription(*row) for row in store.every()]


def _dead_letters(kind: str, by: str) -> tuple[dict[str, int], dict[str, int]]:
    from toot.models import DeadLetter

    letters = DeadLetter.objects.filter(kind=kind)

    def count(name: str) -> dict[str, int]:
        rows = letters.values_list(name).annotate(n=Count("id")).order_by(name)
        return dict(rows)

    return count("channel"), count(by)


def callbacks(subscribed: list[Subscription], known: list[str]) -> list[CallbackHealth]:
    """The health of every callback URL subscribed or ``known`` to the lanes."""
    channels: dict[str, int] = {}
    for sub in subscribed:
        channels[sub.callback_url] = channels.get(sub.callback_url, 0) + 1
    urls = set(channels) | set(known)
    return [
        CallbackHealth(
            r.url,
            channels.get(r.url, 0),
            r.waiting,
            r.in_flight,
            r.mode,
            r.failures,
            _when(r.failing_since),
            _when(r.open_until),
            r.rate,
            _when(r.last_ok),
            _when(r.last_failed),
            r.error,
            r.retries.count,
            _when(r.retries.next_due),
        )
        for r in lanes.records(sorted(urls))
    ]


def publisher() -> PublisherStatus:
    from toot.models import OutboxEvent

    subscribed = subscriptions()
    known, old = lanes.index(every=True)
    urls = callbacks(subscribed, known)
    b = lanes.base()
    client = get_redis()
    hosts = [as_text(host) for host in client.zrange(b + "hosts", 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for host in hosts:
            pipe.hvals(b + "held:" + host)
        held = sum(as_text(v).count(lanes.SEP) for values in pipe.execute() for v in values)
    dues = [url.next_retry for url in urls if url.next_retry is not None]
    if old and (first := _when(old.next_due)) is not None:
        dues.append(first)
    by_channel, by_url = _dead_letters("delivery", "callback_url")
    return PublisherStatus(
        QueueDepth.of(queue.OUT),
        sum(url.waiting for url in urls),
        held,
        sum(url.retries for url in urls) + (old.count if old else 0),
        min(dues) if dues else None,
        OutboxEvent.objects.count(),
        by_channel,
        by_url,
        subscribed,
        urls,
    )


def subscriber() -> SubscriberStatus:
    names = [queue.IN, *(lane for lane in queue.lanes() if queue.kind(lane) == queue.IN)]
    by_channel, by_handler = _dead_letters("handler", "handler")
    return SubscriberStatus([QueueDepth.of(name) for name in names], by_channel, by_handler)


def per_minute(count: int = 60) -> list[dict[str, Any]]:
    """Deliveries (``delivered``, ``failed``) and handler runs (``handled``,
    ``handler_failed``) per minute over the last ``count`` minutes, oldest first."""
    current, sent = lanes.minutes(count)
    _, ran = handling.minutes(count)
    rows = []
    for offset, (out, run) in enumerate(zip(sent, ran, strict=True)):
        minute = current - count + 1 + offset
        rows.append(
            {
                "minute": _when(minute * 60),
                "delivered": out.get("delivered", 0),
                "failed": out.get("failed", 0),
                "handled": run.get("handled", 0),
                "handler_failed": run.get("failed", 0),
            }
        )
    return rows


def retries_of(urls: list[str], most: int = 10_000) -> list[dict[str, Any]]:
    """The first ``most`` deliveries waiting for a retry to ``urls``, by URL then due time:
    ``url``, ``event_ids``, ``channel``, ``attempts``, ``due``."""
    found: list[dict[str, Any]] = []
    b = lanes.base()
    client = get_redis()
    for url in urls:
        if len(found) >= most:
            break
        last = most - len(found) - 1
        waiting = client.zrange(b + "delayed:" + url, 0, last, withscores=True)
        for item, due in cast("list[tuple[bytes, float]]", waiting):
            record = json.loads(as_text(item))["delivery"]
            found.append(
                {
                    "url": url,
                    "event_ids": ", ".join(event["id"] for event in record["events"]),
                    "channel": record["events"][0]["channel"],
                    "attempts": record["attempts"],
                    "due": _when(due),
                }
            )
    return found


def retry_now(
    urls: list[str] | None = None, channel: str | None = None, *, every: bool = False
) -> int:
    """Make waiting retries due now: the publisher's for ``urls``, both sides' of events
    on ``channel``, or (``every``) all of both sides'. Returns how many."""
    count = 0
    if urls:
        count += lanes.retry_now(urls)
    if channel:
        count += lanes.retry_channel_now(channel)
        count += sum(queue.retry_now(name, channel) for name in [queue.IN, *queue.lanes()])
    if every:
        count += lanes.retry_now()
        names = [queue.OUT, queue.IN, *queue.lanes()]
        count += sum(queue.retry_now(name) for name in names)
    return count


def status(minutes: int = 60) -> Status:
    """Both sides' status, and ``minutes`` of per-minute counts."""
    seconds, micro = get_redis().time()
    at = dt.datetime.fromtimestamp(seconds + micro / 1e6, dt.timezone.utc)
    return Status(at, publisher(), subscriber(), per_minute(minutes) if minutes else [])
