"""The publisher's drain: fan events out to their subscribers and deliver them.

Events come off the ``out`` queue (``toot.engine.queue``) in batches. A subscriber gets one POST
per event, or, where it registered with ``"batch": true``, one per batch of up to
``BATCH_MAX_EVENTS`` events of one channel (docs/protocol.md section 7): a batch holds only
what was already waiting, so under light load it holds one event and adds no latency.
A failed delivery goes back to the queue as a delayed retry of the same events under the
same webhook-id, and to the dead letters once the schedule is spent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypedDict, final

from django.utils import timezone

from toot.conf import conf
from toot.engine.per_process import PerProcess
from toot.engine.queue import FAILED_WORK_DELAY, Lease, Retry
from toot.engine.retries import next_delay
from toot.protocol.events import BATCH_MAX_BYTES, BATCH_WRAPPER_BYTES, batch_body, wire_json
from toot.publisher import store
from toot.publisher.delivery import Outcome, attempt

if TYPE_CHECKING:
    from toot.models import DeadLetter

logger = logging.getLogger(__name__)


@final
class NewEvent(TypedDict):
    """An out queue item: an event publish() pushed, to fan out (its wire form)."""

    event: dict[str, Any]


class DeliveryRecord(TypedDict):
    """A delivery that failed, as it waits for its retry."""

    url: str
    events: list[dict[str, Any]]
    batch: bool
    id: str
    attempts: int
    first_attempt_at: str | None


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
        )

    def as_item(self) -> DeliveryRetry:
        return {
            "delivery": {
                "url": self.url,
                "events": self.events,
                "batch": self.batch,
                "id": self.id,
                "attempts": self.attempts,
                "first_attempt_at": self.first_attempt_at,
            }
        }

    @property
    def event_ids(self) -> str:
        return ", ".join(event["id"] for event in self.events)


def _chunks(events: list[dict[str, Any]], encoded: list[str]) -> Iterator[tuple[list[Any], bytes]]:
    """The events cut into batches of at most BATCH_MAX_EVENTS and about BATCH_MAX_BYTES."""
    start, size = 0, BATCH_WRAPPER_BYTES
    for end, text in enumerate(encoded):
        full = end - start == conf.BATCH_MAX_EVENTS or size + len(text) > BATCH_MAX_BYTES
        if end > start and full:
            yield events[start:end], batch_body(encoded[start:end])
            start, size = end, BATCH_WRAPPER_BYTES
        size += len(text) + 1  # and its comma
    yield events[start:], batch_body(encoded[start:])  # plan() never passes no events


def plan(items: list[OutItem]) -> list[Delivery]:
    """The deliveries for claimed items: retries as they were, new events fanned out."""
    deliveries: list[Delivery] = []
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if "delivery" in item:
            deliveries.append(Delivery.from_item(item["delivery"]))
        else:
            by_channel.setdefault(item["event"]["channel"], []).append(item["event"])
    if not by_channel:
        return deliveries
    for channel, urls in store.subscribers(by_channel).items():
        events = by_channel[channel]
        for event in events:
            logger.info(
                "Event %s on %s: sending to %d subscribers", event["id"], channel, len(urls)
            )
        encoded = [wire_json(event) for event in events]
        chunks = list(_chunks(events, encoded)) if any(batch for _, batch in urls) else []
        for url, batch in urls:
            if batch:
                deliveries += [
                    Delivery(url, channel, chunk, True, uuid.uuid4().hex, body)
                    for chunk, body in chunks
                ]
            else:
                deliveries += [
                    Delivery(url, channel, [event], False, event["id"], text.encode())
                    for event, text in zip(events, encoded, strict=True)
                ]
    return deliveries


def lanes(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """The deliveries in about ``SENDERS`` lanes, each of one URL, sent one after another.

    A URL with many deliveries (one subscriber, a burst of single events) gets several
    lanes; many URLs get a lane each.
    """
    by_url: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        by_url.setdefault(delivery.url, []).append(delivery)
    per_url = max(1, conf.SENDERS // max(1, len(by_url)))
    return [group[i::per_url] for group in by_url.values() for i in range(min(per_url, len(group)))]


# This process's sender threads, by their number: a pool per value of SENDERS.
_pools: PerProcess[dict[int, ThreadPoolExecutor]] = PerProcess(dict)


def senders(count: int) -> ThreadPoolExecutor:
    pools = _pools()
    pool = pools.get(count)
    if pool is None:  # two drains of the process may make one each: one is kept
        pool = pools.setdefault(count, ThreadPoolExecutor(count, thread_name_prefix="toot-send"))
    return pool


def process(items: list[OutItem], lease: Lease) -> list[Retry]:
    """Send the claimed items' deliveries; returns the retries to schedule.

    Up to ``SENDERS`` deliveries are in flight at once: most of a delivery's time is spent
    waiting for the subscriber. A URL that failed as a whole (Outcome.of_the_url) is not
    tried again in the same batch: its other deliveries count the same failure, so that
    one unreachable subscriber costs one timeout, not one each. Outcomes are settled
    (logged, retried, dead-lettered) here, in the drain's own thread.
    """
    failed: dict[str, Outcome] = {}

    def send(lane: list[Delivery]) -> list[tuple[Delivery, Outcome]]:
        sent = []
        for delivery in lane:
            lease.keep_alive()
            outcome = failed.get(delivery.url)
            if outcome is None:
                outcome = attempt(delivery.url, delivery.channel, delivery.body, delivery.id)
                if outcome.of_the_url:
                    failed.setdefault(delivery.url, outcome)
            sent.append((delivery, outcome))
        return sent

    planned = lanes(plan(items))
    many = len(planned) > 1
    results = senders(conf.SENDERS).map(send, planned) if many else map(send, planned)
    retries: list[Retry] = []
    for delivery, outcome in (pair for lane in results for pair in lane):
        try:
            retry = settle(delivery, outcome)
        except Exception:
            # The database down as a dead letter is written, say. Raising would put the
            # whole batch back, to be sent again to every subscriber: only this delivery
            # waits, as if this attempt had not been made.
            logger.exception(
                "Delivery %s to %s: cannot record its outcome; trying it again in %.0fs",
                delivery.id,
                delivery.url,
                FAILED_WORK_DELAY,
            )
            retry = delivery.as_item(), FAILED_WORK_DELAY
        if retry is not None:
            retries.append(retry)
    return retries


def settle(delivery: Delivery, outcome: Outcome) -> Retry | None:
    """Log the attempt's outcome; the retry to schedule, unless delivered or dead-lettered."""
    attempts = delivery.attempts + 1
    first_attempt_at = delivery.first_attempt_at or timezone.now().isoformat()
    what = f"{'Events' if delivery.batch else 'Event'} {delivery.event_ids} on {delivery.channel}"
    if delivery.batch:
        what += f" (batch {delivery.id})"
    if outcome.gone:  # attempt() logged the unsubscription
        return None
    if outcome.ok:
        logger.info(
            "%s: delivered to %s (status %s, attempt %d)",
            what,
            delivery.url,
            outcome.status,
            attempts,
        )
        return None
    # A URL the SSRF guard refused is dead-lettered at once (see delivery.Outcome.refused).
    delay = None if outcome.refused else next_delay(attempts, outcome.retry_after)
    if delay is None:
        for event in delivery.events:
            bury_delivery(event, delivery.url, attempts, outcome, first_attempt_at)
        return None
    logger.warning(
        "%s: delivery to %s failed (attempt %d, status %s: %s), retrying in %.1fs",
        what,
        delivery.url,
        attempts,
        outcome.status,
        outcome.error,
        delay,
    )
    retry = replace(delivery, attempts=attempts, first_attempt_at=first_attempt_at)
    return retry.as_item(), delay


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
    return DeadLetter.bury(
        event,
        attempts,
        first_attempt_at,
        kind=DeadLetter.Kind.DELIVERY,
        callback_url=callback_url,
        last_status=outcome.status,
        last_error=outcome.error,
    )
