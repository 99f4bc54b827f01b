"""The publisher's deliveries: fan events out to their subscribers' lanes, and send them.

Events come off the ``out`` queue (``toot.engine.queue``) in batches and go into a lane
per callback URL (``toot.publisher.lanes``), from which sender threads
(``toot.publisher.senders``) send them at each URL's own pace. A subscriber gets one POST
per event, or, where it registered with ``"batch": true``, one per batch of up to
``BATCH_MAX_EVENTS`` events of one channel (docs/protocol.md section 7): a batch holds only
what was already waiting, so under light load it holds one event and adds no latency.
A failed delivery goes back to its lane as a delayed retry of the same events under the
same webhook-id, and to the dead letters once the schedule is spent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypedDict, final

from celery import Celery
from django.utils import timezone

from toot import signals
from toot.conf import conf
from toot.engine import drain, queue
from toot.engine.per_process import PerProcess
from toot.engine.queue import FAILED_WORK_DELAY, Lease, Retry, encode
from toot.engine.retries import next_delay
from toot.protocol.events import BATCH_MAX_BYTES, BATCH_WRAPPER_BYTES, Event, batch_body, wire_json
from toot.publisher import lanes, store
from toot.publisher.delivery import Outcome, attempt
from toot.publisher.senders import Senders

if TYPE_CHECKING:
    from toot.models import DeadLetter

logger = logging.getLogger(__name__)


class _Published(TypedDict):
    event: dict[str, Any]


@final
class NewEvent(_Published, total=False):
    """An out queue item: an event publish() pushed, to fan out (its wire form); with
    ``traceparent`` when its publish was traced (toot.tracing)."""

    traceparent: str


class _Record(TypedDict):
    url: str
    events: list[dict[str, Any]]
    batch: bool
    id: str
    attempts: int
    first_attempt_at: str | None


class DeliveryRecord(_Record, total=False):
    """A delivery that failed, as it waits for its retry; with ``traceparents``, its
    events' publish contexts (None for one that has none), when any was traced."""

    traceparents: list[str | None]


@final
class DeliveryRetry(TypedDict):
    """An out queue item: a delivery to try again, to the same URL with the same id."""

    delivery: DeliveryRecord


OutItem = NewEvent | DeliveryRetry


@dataclass(frozen=True)
class Delivery:
    """One POST to send: a single event, or a batch of events of one channel."""

    url: str
    channel: str
    events: list[dict[str, Any]]
    batch: bool
    id: str  # the webhook-id: the event's id, or the batch's
    body: bytes
    attempts: int = 0
    first_attempt_at: str | None = None
    # Each event's publish context (toot.tracing), or none at all when none was traced.
    traceparents: tuple[str | None, ...] = ()

    @classmethod
    def from_item(cls, item: DeliveryRecord) -> Delivery:
        events, batch = item["events"], item["batch"]
        return cls(
            item["url"],
            events[0]["channel"],
            events,
            batch,
            item["id"],
            batch_body(map(wire_json, events)) if batch else wire_json(events[0]).encode(),
            item["attempts"],
            item["first_attempt_at"],
            tuple(item.get("traceparents", ())),
        )

    def as_item(self) -> DeliveryRetry:
        record: DeliveryRecord = {
            "url": self.url,
            "events": self.events,
            "batch": self.batch,
            "id": self.id,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
        }
        if self.traceparents:
            record["traceparents"] = list(self.traceparents)
        return {"delivery": record}

    @property
    def event_ids(self) -> str:
        return ", ".join(event["id"] for event in self.events)

    @property
    def what(self) -> str:
        """The delivery as log lines name it: its events' ids and channel, and a batch's id."""
        if not self.batch:
            return f"Event {self.event_ids} on {self.channel}"
        return f"Events {self.event_ids} on {self.channel} (batch {self.id})"


def _chunks(encoded: list[str]) -> Iterator[tuple[slice, bytes]]:
    """The events cut into batches of at most BATCH_MAX_EVENTS and about BATCH_MAX_BYTES:
    which of them, and the batch's body."""
    start, size = 0, BATCH_WRAPPER_BYTES
    for end, text in enumerate(encoded):
        full = end - start == conf.BATCH_MAX_EVENTS or size + len(text) > BATCH_MAX_BYTES
        if end > start and full:
            yield slice(start, end), batch_body(encoded[start:end])
            start, size = end, BATCH_WRAPPER_BYTES
        size += len(text) + 1  # and its comma
    yield slice(start, None), batch_body(encoded[start:])  # never called with no events


def fan_out(items: list[OutItem]) -> dict[str, tuple[bool, list[str]]]:
    """What each callback URL's lane gets for claimed items: (batch flag, lane items)."""
    by_url: dict[str, tuple[bool, list[str]]] = {}
    by_channel: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for item in items:
        if "delivery" in item:  # queued by a toot from before the lanes: sent as it was
            record = item["delivery"]
            by_url.setdefault(record["url"], (False, []))[1].append(encode(item))
        else:
            event = item["event"]
            text = wire_json(event)
            if "traceparent" in item:  # between the prefix and the JSON (see plan())
                text = item["traceparent"] + text
            by_channel.setdefault(event["channel"], []).append((event, text))
    if not by_channel:
        return by_url
    for channel, urls in store.subscribers(by_channel).items():
        if logger.isEnabledFor(logging.INFO):
            listed = ", ".join(url for url, _ in urls[:LISTED_URLS])
            more = f", and {len(urls) - LISTED_URLS} more" if len(urls) > LISTED_URLS else ""
            for event, _ in by_channel[channel]:
                logger.info(
                    "Event %s on %s: sending to %d subscribers%s",
                    event["id"],
                    channel,
                    len(urls),
                    f" ({listed}{more})" if urls else "",
                )
        for url, batch in urls:
            prefix = lanes.BATCHED if batch else lanes.SINGLE
            was_batch, lane = by_url.setdefault(url, (batch, []))
            by_url[url] = (was_batch or batch, lane)
            lane += [prefix + text for _, text in by_channel[channel]]
    return by_url


# The callback URLs a fan-out's log line names, at most.
LISTED_URLS = 5
# After a fan-out the drain waits up to this long for a sender to claim (see Senders.nudge).
FAN_OUT_WAIT = 0.05


def process(items: list[OutItem], lease: Lease) -> list[Retry]:
    """Fan the claimed items out to their URLs' lanes, for this process's senders (and
    every other's) to send; schedules no retries of its own. The fan-out runs on a full
    Redis too (lanes.PUSH_SCRIPT): the deliveries that follow make room."""
    by_url = fan_out(items)
    if by_url:
        lanes.push(by_url)
        pool().nudge(wait=FAN_OUT_WAIT)
    return []


def plan(url: str, items: list[str]) -> list[Delivery]:
    """The deliveries for a claim of ``url``'s lane: events alone, in batches of one
    channel, and retries as they were."""
    deliveries: list[Delivery] = []
    batched: dict[str, tuple[list[dict[str, Any]], list[str], list[str | None]]] = {}
    for item in items:
        if item.startswith(lanes.SINGLE):
            traceparent, text = _traced(item)
            event = json.loads(text)
            deliveries.append(
                Delivery(
                    url,
                    event["channel"],
                    [event],
                    False,
                    event["id"],
                    text.encode(),
                    traceparents=(traceparent,) if traceparent else (),
                )
            )
        elif item.startswith(lanes.BATCHED):
            traceparent, text = _traced(item)
            event = json.loads(text)
            events, texts, traceparents = batched.setdefault(event["channel"], ([], [], []))
            events.append(event)
            texts.append(text)
            traceparents.append(traceparent)
        else:
            deliveries.append(Delivery.from_item(json.loads(item)["delivery"]))
    for channel, (events, texts, traceparents) in batched.items():
        traced = any(traceparents)
        deliveries += [
            Delivery(
                url,
                channel,
                events[chunk],
                True,
                uuid.uuid4().hex,
                body,
                traceparents=tuple(traceparents[chunk]) if traced else (),
            )
            for chunk, body in _chunks(texts)
        ]
    return deliveries


def _traced(item: str) -> tuple[str | None, str]:
    """A lane item's traceparent, if its publish was traced, and its event's JSON: the
    traceparent goes between the S or B prefix and the JSON, which starts with ``{``."""
    if item[1] == "{":
        return None, item[1:]
    start = item.index("{")
    return item[1:start], item[start:]


def send_claim(claim: lanes.Claim, keep_alive: Callable[[], None]) -> None:
    """Send a claim's deliveries one after another; sets its outcome and retries.

    A URL that failed as a whole (Outcome.of_the_url) is not tried again in the same
    claim: its other deliveries count the same failure, so that an unreachable subscriber
    costs one timeout, not one each. How it went feeds the URL's circuit breaker.
    """
    failed: Outcome | None = None
    answered = False
    retries: list[Retry] = []
    for delivery in plan(claim.url, claim.items):
        outcome, sent = failed, failed is None
        if outcome is None:
            keep_alive()
            outcome = send(delivery)
            if outcome.of_the_url:
                failed = outcome
            else:
                answered = True
        if outcome.ok:
            claim.delivered += 1
        elif not outcome.gone:
            claim.failed += 1
            claim.failure = f"status {outcome.status}" if outcome.status else outcome.error
        try:
            retry = settle(delivery, outcome, sent=sent)
        except Exception:
            # The database down as a dead letter is written, say: only this delivery
            # waits, as if this attempt had not been made.
            logger.exception(
                "%s: cannot record its outcome, delivery to %s; trying it again in %.0fs",
                delivery.what,
                delivery.url,
                FAILED_WORK_DELAY,
            )
            retry = delivery.as_item(), FAILED_WORK_DELAY
        if retry is not None:
            retries.append(retry)
    claim.retries = retries
    if failed is not None and not (failed.gone or failed.refused or failed.ours):
        claim.outcome = lanes.FAILED
    elif answered:
        claim.outcome = lanes.OK


def send(delivery: Delivery) -> Outcome:
    """One attempt at the delivery, in a span of its own when tracing (toot.tracing)."""
    if not conf.TRACING:
        return attempt(
            delivery.url, delivery.channel, delivery.body, delivery.id, what=delivery.what
        )
    from toot import tracing

    with tracing.sending(
        delivery.url,
        delivery.channel,
        delivery.id,
        delivery.batch,
        [event["id"] for event in delivery.events],
        delivery.traceparents or [None] * len(delivery.events),
        delivery.attempts + 1,
    ) as (headers, span):
        outcome = attempt(
            delivery.url,
            delivery.channel,
            delivery.body,
            delivery.id,
            what=delivery.what,
            headers=headers,
        )
        tracing.sent(span, outcome.status, outcome.error)
    return outcome


# This process's sender threads (a new pool after a fork).
pool: PerProcess[Senders] = PerProcess(lambda: Senders(send_claim))


def hosting() -> AbstractContextManager[Callable[[], bool]]:
    """What a drain of the out queue runs inside: this process's senders at work."""
    return pool().hosting()


def relay_step(app: Celery) -> None:
    """The relay's share of the lanes: turn what waits for disabled URLs into dead
    letters, give back what dead pools held, and start a drain (and so senders) where a
    lane is due and no drain runs."""
    for url, items in lanes.take_disabled().items():
        outcome = Outcome(error="the callback URL is disabled (toot_callbacks --enable)")
        for delivery in plan(url, items):
            for event in delivery.events:
                bury_delivery(event, url, delivery.attempts, outcome, delivery.first_attempt_at)
    if lanes.wake() == 0:
        drain.start(queue.OUT, queue.lease_if_idle(queue.OUT), app)


def settle(delivery: Delivery, outcome: Outcome, *, sent: bool = True) -> Retry | None:
    """Log the attempt's outcome and signal it; the retry to schedule, unless delivered or
    dead-lettered. ``sent``: whether a request was made (not when its URL had already
    failed in the same claim)."""
    attempts = delivery.attempts + 1
    first_attempt_at = delivery.first_attempt_at or timezone.now().isoformat()
    if outcome.gone:  # attempt() logged the unsubscription
        signal_outcome(delivery, outcome, attempts, sent=sent)
        return None
    if outcome.ok:
        logger.info(
            "%s: delivered to %s (status %s, attempt %d)",
            delivery.what,
            delivery.url,
            outcome.status,
            attempts,
        )
        signal_outcome(delivery, outcome, attempts)
        return None
    # A URL the SSRF guard refused is dead-lettered at once (see delivery.Outcome.refused).
    delay = None if outcome.refused else next_delay(attempts, outcome.retry_after)
    if delay is None:
        for event in delivery.events:
            bury_delivery(event, delivery.url, attempts, outcome, first_attempt_at)
        signal_outcome(delivery, outcome, attempts, sent=sent)
        return None
    logger.warning(
        "%s: delivery to %s failed (attempt %d, status %s: %s), retrying in %.1fs",
        delivery.what,
        delivery.url,
        attempts,
        outcome.status,
        outcome.error,
        delay,
    )
    signal_outcome(delivery, outcome, attempts, sent=sent, retry_in=delay)
    retry = replace(delivery, attempts=attempts, first_attempt_at=first_attempt_at)
    return retry.as_item(), delay


def signal_outcome(
    delivery: Delivery,
    outcome: Outcome,
    attempt: int,
    *,
    sent: bool = True,
    retry_in: float | None = None,
) -> None:
    """Send ``delivery_succeeded`` or ``delivery_failed`` (toot.signals), once per request."""
    signal = signals.delivery_succeeded if outcome.ok else signals.delivery_failed
    if not signal.receivers:  # no Event built for nobody
        return
    failure = {} if outcome.ok else {"error": outcome.error, "retry_in": retry_in}
    signals.send(
        signal,
        Event,
        delivery.what,
        callback_url=delivery.url,
        channel=delivery.channel,
        events=list(map(_event, delivery.events)),
        delivery_id=delivery.id,
        batch=delivery.batch,
        attempt=attempt,
        status=outcome.status,
        duration=outcome.duration if sent else None,
        **failure,
    )


def _event(wire: dict[str, Any]) -> Event:
    """An event of a delivery, for the signals: those publish() made, checked then, are
    rebuilt without checking again (four times faster than Event.from_dict), others in
    full."""
    try:
        timestamp = dt.datetime.fromisoformat(wire["timestamp"])
    except (KeyError, TypeError, ValueError):
        return Event.from_dict(wire)
    if timestamp.tzinfo is None:
        return Event.from_dict(wire)
    return Event(wire["channel"], wire.get("payload"), id=wire["id"], timestamp=timestamp)


def bury_delivery(
    event: dict[str, Any],
    callback_url: str,
    attempts: int,
    outcome: Outcome,
    first_attempt_at: str | None,
) -> DeadLetter:
    from toot.models import DeadLetter

    logger.error(
        "Event %s on %s: delivery to %s failed for good after %d attempts (status %s: %s); "
        "dead-lettered",
        event["id"],
        event["channel"],
        callback_url,
        attempts,
        outcome.status,
        outcome.error,
    )
    letter = DeadLetter.bury(
        event,
        attempts,
        first_attempt_at,
        kind=DeadLetter.Kind.DELIVERY,
        callback_url=callback_url,
        last_status=outcome.status,
        last_error=outcome.error,
    )
    signals.send(
        signals.dead_lettered,
        DeadLetter,
        f"Event {event['id']} on {event['channel']}",
        dead_letter=letter,
        event=Event.from_dict(event),
        kind=str(letter.kind),
    )
    return letter
