"""One receipt handler per copy of the callback URL, and each delivery routed to its copy's.

Each copy of the callback URL must stand for a subscriber of its own, whose handler runs
once per event; but toot runs a handler at most once per (event id, handler) in
``toot.subscriber.handling``, so M URLs with one handler would run it once per event, and a
second delivery of the same event arriving while the first runs would even be retried as
"already running". Hence, with ``BENCH_COPIES=K``:

* K handlers ``bench_copy_0`` .. ``bench_copy_<K-1>`` subscribe to ``bench.v1``; each
  appends a receipt ``{"id", "copy", "sent_at", "received_at"}`` to
  ``EXAMPLE_RECEIPTS_KEY``;
* ``CopyMiddleware`` notes the ``copy`` of a callback request (toot's callback view ignores
  the query string, so every copy goes through the same, unchanged view), and a wrapper of
  ``toot.subscriber.handling.handlers_by_name`` has the view queue the request's events
  for that copy's handler only;
* the copies' handlers share one lane of the in queue (``toot.subscriber.handling.lane``),
  where toot gives each handler its own: the M copies stand for M subscriber projects,
  each with its own workers, not for M handlers of one project competing for its worker.

So every delivery runs exactly one handler, keyed (event id, copy): N events to M URLs
make N x M receipts, and the benchmark counts losses and duplicates by (event id, copy).
The request body is left as sent, so signed deliveries verify as usual.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextvars import ContextVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse

import toot
from bench.subscriber import CHANNEL
from toot.engine.connection import get_redis
from toot.subscriber import handling
from toot.subscriber.handling import handler_name
from toot.subscriber.registry import Handler

SOURCE = "publisher"
CALLBACK_PATH = "/toot/callbacks"

_copy: ContextVar[int | None] = ContextVar("bench_copy", default=None)
_handler_names: dict[int, str] = {}


def make_handler(copy: int) -> Callable[[toot.Event], None]:
    def handler(event: toot.Event) -> None:
        received_at = time.time()
        payload = event.payload if isinstance(event.payload, dict) else {}
        receipt = {
            "id": event.id,
            "copy": copy,
            "sent_at": payload.get("sent_at"),
            "received_at": received_at,
        }
        key = getattr(settings, "EXAMPLE_RECEIPTS_KEY", "example:receipts")  # a project setting
        get_redis().rpush(key, json.dumps(receipt))

    # A name of its own: toot keys "handled once" by the handler's module and qualname.
    handler.__name__ = handler.__qualname__ = f"bench_copy_{copy}"
    return handler


def install(copies: int) -> None:
    """Subscribe ``copies`` receipt handlers to bench.v1 (from AppConfig.ready())."""
    for copy in range(copies):
        handler = make_handler(copy)
        _handler_names[copy] = handler_name(handler)
        toot.subscribe(SOURCE, CHANNEL, handler)
    by_name = handling.handlers_by_name

    def copy_handler_only(channel: str) -> dict[str, Handler]:
        # Only the callback view looks handlers up while a request's copy is set.
        copy, named = _copy.get(), by_name(channel)
        return named if copy is None else route_copy(named, copy)

    handling.handlers_by_name = copy_handler_only
    lane = handling.lane
    copies_lane = lane("bench_copies")

    def shared_lane(name: str) -> str:
        return copies_lane if name in copy_names else lane(name)

    copy_names = set(_handler_names.values())
    handling.lane = shared_lane


class CopyMiddleware:
    """Notes which copy of the callback URL a request came to (``?copy=N``, default 0)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        copy = None
        if request.path_info == CALLBACK_PATH:
            try:
                copy = int(request.GET.get("copy", "0"))
            except ValueError:
                copy = None
        token = _copy.set(copy)
        try:
            return self.get_response(request)
        finally:
            _copy.reset(token)


def route_copy(named: dict[str, Handler], copy: int) -> dict[str, Handler]:
    """The handlers the callback view queues an event for, for a request to copy ``copy``:
    its own of the copies' (none for an unknown copy: the benchmark sees a loss)."""
    own = _handler_names.get(copy)
    copies = set(_handler_names.values())
    return {name: handler for name, handler in named.items() if name == own or name not in copies}
