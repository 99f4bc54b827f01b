"""Running local handlers at most once per event, whatever the publisher retries.

Each (event id, handler) is claimed with Redis ``SET NX`` before the handler runs and
marked done for ``DEDUPE_TTL`` seconds after; the TTL must outlast the publisher's retry
window, so that a delivery retried after the handler ran does not run it again.
"""

from __future__ import annotations

import logging

from toot.conf import conf
from toot.events import Event
from toot.registry import Handler, registry
from toot.store import get_redis

logger = logging.getLogger(__name__)

DONE = "done"
# How long a claim protects a running handler; a worker that dies mid-handler leaves
# the claim behind, and the retry after it expires runs the handler again.
CLAIM_SECONDS = 600


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
    """Run the event's handlers (only ``names`` if given); returns the failures by name.

    A name that is no longer subscribed (renamed or removed by a deploy) is a failure, not
    a silent success: its retries and its dead letter keep the work visible.
    """
    client = get_redis()
    named = handlers_by_name(event.channel)
    failures: dict[str, Exception] = {
        name: LookupError(f"{name} is not subscribed to {event.channel} here")
        for name in names or ()
        if name not in named
    }
    for name, handler in named.items():
        if names is not None and name not in names:
            continue
        key = _key(event, name)
        if not client.set(key, "running", nx=True, ex=CLAIM_SECONDS):
            state = client.get(key)
            if state in (DONE, DONE.encode()):
                logger.info(
                    "Event %s on %s: %s already handled it, skipped", event.id, event.channel, name
                )
                continue
            failures[name] = AlreadyRunning(f"{name} is already running for event {event.id}")
            continue
        try:
            handler(event)
        except Exception as exc:
            client.delete(key)
            logger.exception("Event %s on %s: handler %s raised", event.id, event.channel, name)
            failures[name] = exc
        else:
            client.set(key, DONE, ex=conf.DEDUPE_TTL)
    return failures
