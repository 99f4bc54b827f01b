"""Running local handlers at most once per event, whatever the publisher retries.

Each (event id, handler) is claimed with Redis ``SET NX`` before the handler runs and
marked done for ``DEDUPE_TTL`` seconds after; the TTL must outlast the publisher's retry
window, so that a delivery retried after the handler ran does not run it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.utils import timezone

from toot import deadletters
from toot.conf import conf
from toot.delivery import next_delay
from toot.events import Event
from toot.queue import Retry
from toot.registry import Handler, registry
from toot.store import get_redis

logger = logging.getLogger(__name__)

DONE = "done"
# How long a claim protects a running handler; a worker that dies mid-handler leaves
# the claim behind, and the retry after it expires runs the handler again.
CLAIM_SECONDS = 600


# Stands for every handler of the channel where none was found: its retry (and dead
# letter) runs them all once there are some again.
ALL = "*"


class AlreadyRunning(Exception):
    """Another execution holds the claim on this (event, handler)."""


def handler_name(handler: Handler) -> str:
    # A callable object goes by its class: its repr holds an address, different in each process.
    named = handler if hasattr(handler, "__qualname__") else type(handler)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"


def handlers_by_name(channel: str) -> dict[str, Handler]:
    """The channel's handlers by stable name; same-named ones (lambdas) get #2, #3..."""
    named: dict[str, Handler] = {}
    for handler in registry.handlers_for(channel):
        name = base = handler_name(handler)
        n = 1
        while name in named:
            n += 1
            name = f"{base}#{n}"
        named[name] = handler
    return named


def _key(event: Event, name: str) -> str:
    return f"{conf.KEY_PREFIX}handled:{event.id}:{name}"


def run(event: Event, names: list[str] | None = None) -> dict[str, Exception]:
    """Run the event's handlers (only ``names`` if given); returns the failures by name."""
    return run_many([(event, names)])[0]


def run_many(
    jobs: list[tuple[Event, list[str] | None]], keep_alive: Callable[[], None] = lambda: None
) -> list[dict[str, Exception]]:
    """Run each event's handlers (only the names given, if any); the failures of each.

    The claims and done marks of the whole batch take one round trip each. A name that
    is no longer subscribed (renamed or removed by a deploy) is a failure, not a silent
    success: its retries and its dead letter keep the work visible. ``keep_alive`` is
    called before each handler runs (a drain renews its lease there).
    """
    failures: list[dict[str, Exception]] = []
    planned: list[tuple[int, Event, str, Handler]] = []
    for index, (event, names) in enumerate(jobs):
        named = handlers_by_name(event.channel)
        if names == [ALL]:
            names = None
        if names is None and not named:
            # Unsubscribed since the event was accepted (a deploy), or queued by a project
            # that shares this KEY_PREFIX: kept visible, not dropped as handled.
            failures.append({ALL: LookupError(f"no handler for {event.channel} here")})
            continue
        failures.append(
            {
                name: LookupError(f"{name} is not subscribed to {event.channel} here")
                for name in names or ()
                if name not in named
            }
        )
        planned += [
            (index, event, name, handler)
            for name, handler in named.items()
            if names is None or name in names
        ]
    if not planned:
        return failures
    client = get_redis()
    with client.pipeline(transaction=False) as pipe:
        for _, event, name, _ in planned:
            pipe.set(_key(event, name), "running", nx=True, ex=CLAIM_SECONDS)
            pipe.get(_key(event, name))
        replies = pipe.execute()
    # None where this run claimed the handler, else the state another run left.
    states = [
        None if claimed else state
        for claimed, state in zip(replies[::2], replies[1::2], strict=True)
    ]
    with client.pipeline(transaction=False) as marks:
        for (index, event, name, handler), state in zip(planned, states, strict=True):
            if state in (DONE, DONE.encode()):
                logger.info(
                    "Event %s on %s: %s already handled it, skipped", event.id, event.channel, name
                )
            elif state is not None:
                failures[index][name] = AlreadyRunning(
                    f"{name} is already running for event {event.id}"
                )
            else:
                keep_alive()
                try:
                    handler(event)
                except Exception as exc:
                    marks.delete(_key(event, name))
                    logger.exception(
                        "Event %s on %s: handler %s raised", event.id, event.channel, name
                    )
                    failures[index][name] = exc
                else:
                    marks.set(_key(event, name), DONE, ex=conf.DEDUPE_TTL)
        marks.execute()
    return failures


def process(items: list[dict[str, Any]], keep_alive: Callable[[], None]) -> list[Retry]:
    """Run the handlers of the claimed items; returns the retries to schedule.

    A handler that failed is retried alone on the publisher's schedule, then dead-lettered.
    """
    jobs = [(Event.from_dict(item["event"]), item.get("handlers")) for item in items]
    retries: list[Retry] = []
    for item, (event, _), failed in zip(items, jobs, run_many(jobs, keep_alive), strict=True):
        attempts = item.get("attempts", 0) + 1
        first_attempt_at = item.get("first_attempt_at") or timezone.now().isoformat()
        if not failed:
            logger.info("Event %s on %s: handled", event.id, event.channel)
            continue
        delay = next_delay(attempts)
        if delay is None:
            for name, error in failed.items():
                deadletters.bury_handler(item["event"], name, attempts, error, first_attempt_at)
            continue
        retry = {
            "event": item["event"],
            "handlers": sorted(failed),
            "attempts": attempts,
            "first_attempt_at": first_attempt_at,
        }
        retries.append((retry, delay))
        logger.warning(
            "Event %s on %s: %d handlers failed (attempt %d), retrying them in %.1fs",
            event.id,
            event.channel,
            len(failed),
            attempts,
            delay,
        )
    return retries
