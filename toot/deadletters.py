"""Dead letters: what failed every attempt, kept in the database until replayed or removed."""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from toot import delivery, handling
from toot.events import Event, wire_json

if TYPE_CHECKING:
    from toot.models import DeadLetter

logger = logging.getLogger(__name__)


def _when(value: str | None) -> Any:
    return (parse_datetime(value) if value else None) or timezone.now()


def _bury(
    event: dict[str, Any], attempts: int, first_attempt_at: str | None, **fields: Any
) -> DeadLetter:
    from toot.models import DeadLetter

    letter: DeadLetter = DeadLetter.objects.create(
        event_id=event["id"],
        channel=event["channel"],
        event=event,
        attempts=attempts,
        first_attempt_at=_when(first_attempt_at),
        last_attempt_at=timezone.now(),
        **fields,
    )
    return letter


def bury_delivery(
    event: dict[str, Any],
    callback_url: str,
    attempts: int,
    outcome: delivery.Outcome,
    first_attempt_at: str | None,
) -> DeadLetter:
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
    return _bury(
        event,
        attempts,
        first_attempt_at,
        kind="delivery",
        callback_url=callback_url,
        last_status=outcome.status,
        last_error=outcome.error,
    )


def bury_handler(
    event: dict[str, Any],
    handler: str,
    attempts: int,
    error: Exception,
    first_attempt_at: str | None,
) -> DeadLetter:
    logger.error(
        "Event %s on %s: handler %s failed for good after %d attempts (%r); dead-lettered",
        event["id"],
        event["channel"],
        handler,
        attempts,
        error,
    )
    return _bury(
        event, attempts, first_attempt_at, kind="handler", handler=handler, last_error=repr(error)
    )


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
        failures = handling.run(Event.from_dict(letter.event), [letter.handler])
        ok, status = not failures, None
        # Keyed by each handler's name: a letter filed under ALL runs every handler.
        error = "; ".join(map(repr, failures.values()))
    if ok:
        logger.info(
            "Event %s on %s: dead letter %s redelivered", letter.event_id, letter.channel, letter.pk
        )
        letter.delete()
        return Replay.REDELIVERED
    letter.attempts += 1
    letter.last_status = status
    letter.last_error = error
    letter.last_attempt_at = timezone.now()
    letter.save(update_fields=["attempts", "last_status", "last_error", "last_attempt_at"])
    logger.warning(
        "Event %s on %s: dead letter %s failed again: %s",
        letter.event_id,
        letter.channel,
        letter.pk,
        error,
    )
    return Replay.FAILED
