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
  ``toot.engine.queue.encode`` names that copy's handler in the ``handlers`` of each item
  the view queues (the field toot's own retries use to run only some handlers).

So every delivery runs exactly one handler, keyed (event id, copy): N events to M URLs
make N x M receipts, and the benchmark counts losses and duplicates by (event id, copy).
The request body is left as sent, so signed deliveries verify as usual.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse

import toot
from bench.subscriber import CHANNEL
from toot.conf import conf
from toot.engine import queue as toot_queue
from toot.engine.connection import get_redis
from toot.subscriber.handling import handler_name

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
    encode = toot_queue.encode

    def encode_routed(item: Mapping[str, Any]) -> str:
        # Only the callback view encodes items while a request's copy is set.
        copy = _copy.get()
        return encode(item if copy is None else route_copy(item, copy))

    toot_queue.encode = encode_routed


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


def route_copy(item: Mapping[str, Any], copy: int) -> Mapping[str, Any]:
    """The queued item of a bench.v1 event, to run only the copy's handler."""
    channel = conf.source(SOURCE).channel_prefix + CHANNEL
    if item["event"].get("channel") != channel or "handlers" in item:
        return item
    # Unknown copies name no handler: nothing runs, and the benchmark sees a loss.
    return {**item, "handlers": [_handler_names.get(copy, f"bench_copy_{copy}:unknown")]}
