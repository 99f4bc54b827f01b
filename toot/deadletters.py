"""Replaying dead letters: what failed every attempt, kept in the database until then.

Each side files its own (``toot.publisher.sending.bury_delivery``,
``toot.subscriber.handling.bury_handler``); replaying one takes both sides.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from django.utils import timezone

from toot.engine import drain, queue
from toot.protocol.events import Event, wire_json
from toot.publisher import delivery, lanes, sending
from toot.subscriber import handling

if TYPE_CHECKING:
    from toot.models import DeadLetter

logger = logging.getLogger(__name__)


class Replay(enum.Enum):
    """What replaying a dead letter came to."""

    REDELIVERED = "redelivered"
    # Answered 410: the letter is removed, as a 410 ends a delivery's retries, but the
    # event reached nobody, so it is not counted as redelivered.
    GONE = "gone"
    FAILED = "failed"


def redeliver(letter: DeadLetter) -> Replay:
    """Replay one dead letter now, in this process; deleted on success or 410, else updated.

    Each replay counts as an attempt.
    """
    if letter.kind == "delivery":  # DeadLetter.Kind.DELIVERY
        body = wire_json(letter.event).encode()
        outcome = delivery.attempt(letter.callback_url, letter.channel, body, letter.event_id)
        replayed = sending.Delivery(
            letter.callback_url, letter.channel, [letter.event], False, letter.event_id, body
        )
        sending.signal_outcome(replayed, outcome, letter.attempts + 1)
        if outcome.gone:  # attempt() removed the subscription; retrying is pointless
            logger.warning(
                "Event %s on %s: dead letter %s not delivered, %s is gone (410); removed",
                letter.event_id,
                letter.channel,
                letter.pk,
                letter.callback_url,
            )
            letter.delete()
            return Replay.GONE
        ok, status, error = outcome.ok, outcome.status, outcome.error
    else:
        failures = handling.run(
            Event.from_dict(letter.event), [letter.handler], attempt=letter.attempts + 1
        )
        ok, status = not failures, None
        # Keyed by each handler's name: a letter filed under ALL runs every handler.
        error = "; ".join(map(repr, failures.values()))
    if ok:
        logger.info(
            "Event %s on %s: dead letter %s redelivered (%s)",
            letter.event_id,
            letter.channel,
            letter.pk,
            _concerns(letter),
        )
        letter.delete()
        return Replay.REDELIVERED
    letter.attempts += 1
    letter.last_status = status
    letter.last_error = error
    letter.last_attempt_at = timezone.now()
    letter.save(update_fields=["attempts", "last_status", "last_error", "last_attempt_at"])
    logger.warning(
        "Event %s on %s: dead letter %s failed again (%s): %s",
        letter.event_id,
        letter.channel,
        letter.pk,
        _concerns(letter),
        error,
    )
    return Replay.FAILED


def requeue(letters: list[DeadLetter]) -> int:
    """Put the letters' work back on the queues, for a worker to send or run once more, and
    delete them; how many. A delivery goes to its callback URL's lane, a handler run to its
    handler's lane, each with its attempts: one that fails again is a dead letter again,
    with one more attempt. Nothing is sent in this process (an admin request would wait on
    a subscriber)."""
    by_url: dict[str, tuple[bool, list[str]]] = {}
    by_lane: dict[str, list[str]] = {}
    for letter in letters:
        first = letter.first_attempt_at.isoformat()
        if letter.kind == "delivery":  # DeadLetter.Kind.DELIVERY
            record = {
                "url": letter.callback_url,
                "events": [letter.event],
                "batch": False,
                "id": letter.event_id,
                "attempts": letter.attempts,
                "first_attempt_at": first,
            }
            by_url.setdefault(letter.callback_url, (False, []))[1].append(
                queue.encode({"delivery": record})
            )
        else:
            name = queue.IN if letter.handler == handling.ALL else handling.lane(letter.handler)
            item = {"event": letter.event, "attempts": letter.attempts, "first_attempt_at": first}
            if letter.handler != handling.ALL:
                item["handlers"] = [letter.handler]
            by_lane.setdefault(name, []).append(queue.encode(item))
    if by_url:
        lanes.push(by_url)  # a worker's relay starts a drain, and so senders, for them
    if by_lane:
        drain.enqueue_many(by_lane)
    for letter in letters:
        logger.info(
            "Event %s on %s: dead letter %s queued to be redelivered (%s)",
            letter.event_id,
            letter.channel,
            letter.pk,
            _concerns(letter),
        )
        letter.delete()
    return len(letters)


def _concerns(letter: DeadLetter) -> str:
    """What a letter's log line names beside its event: the callback URL or the handler."""
    if letter.kind == "delivery":  # DeadLetter.Kind.DELIVERY
        return f"to {letter.callback_url}"
    return f"handler {letter.handler}"
