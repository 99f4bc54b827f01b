"""What the benchmark (``python -m bench``) needs of the subscriber; off unless it asks.

The benchmark subscribes M callback URLs to one channel, all served by this one
subscriber: ``.../toot/callbacks`` (copy 0) and ``.../toot/callbacks?copy=1`` up to
``copy=M-1``. toot's callback view ignores the query string, so every copy goes through
the same, unchanged view. Each copy must stand for a subscriber of its own, whose handler
runs once per event; but toot runs a handler at most once per (event id, handler) in
``toot.handling``, so M URLs with one handler would run it once per event, and a second
delivery of the same event arriving while the first runs would even be retried as
"already running". Hence, with ``EXAMPLE_BENCH_COPIES=K``:

* K handlers ``bench_copy_0`` .. ``bench_copy_<K-1>`` subscribe to ``bench.v1``; each
  appends a receipt ``{"id", "copy", "sent_at", "received_at"}`` to
  ``EXAMPLE_RECEIPTS_KEY``;
* ``CopyMiddleware`` notes the ``copy`` of a callback request, and a
  ``before_task_publish`` receiver names that copy's handler in the ``handlers``
  argument of the ``toot.handle`` task the view enqueues (the argument toot's own
  retries use to run only some handlers).

So every delivery runs exactly one handler, keyed (event id, copy): N events to M URLs
make N x M receipts, and the benchmark counts losses and duplicates by (event id, copy).
The request body is left as sent, so signed deliveries verify as usual.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from celery.signals import before_task_publish
from django.conf import settings
from django.http import HttpRequest, HttpResponse

import toot
from toot.conf import conf
from toot.handling import handler_name
from toot.store import get_redis

SOURCE = "publisher"
CHANNEL = "bench.v1"
CALLBACK_PATH = "/toot/callbacks"

_copy: ContextVar[int | None] = ContextVar("example_bench_copy", default=None)
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
    before_task_publish.connect(route_copy, weak=False, dispatch_uid="example_bench_copy")


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


def route_copy(sender: Any = None, body: Any = None, **kwargs: Any) -> None:
    """Run only the copy's handler for a bench.v1 event the callback view enqueues."""
    copy = _copy.get()
    if sender != "toot.handle" or copy is None or not isinstance(body, tuple):
        return
    args, task_kwargs = body[0], body[1]
    event = args[0] if args else task_kwargs.get("event")
    channel = conf.source(SOURCE).channel_prefix + CHANNEL
    if not isinstance(event, dict) or event.get("channel") != channel:
        return
    if task_kwargs.get("handlers") is None and len(args) < 2:
        # Unknown copies name no handler: nothing runs, and the benchmark sees a loss.
        task_kwargs["handlers"] = [_handler_names.get(copy, f"bench_copy_{copy}:unknown")]
