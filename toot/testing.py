"""Test helpers for projects that publish and subscribe with toot.

``isolated()`` (the pytest fixture ``toot_isolated``, the unittest mixin
``TootIsolationMixin``) keeps toot off Redis, the broker and the network for its duration:

- what the code under test publishes is captured in ``Isolation.published``, as Django's
  ``mail.outbox`` captures mail, once its transaction commits, as production sends it: an
  event published in a transaction that rolls back is never captured;
- ``Isolation.deliver()`` posts an event to this project's callbacks endpoint, signed when
  its source has a secret, and the handlers run at once in the test's thread, at most
  once per event; a test client's POST to the endpoint runs them the same way;
- anything else that would reach Redis, the broker or a peer raises ``toot.NotIsolated``.

Outside the helpers, a test that would reach a Redis or broker raises ``NotIsolated`` too,
unless ``TOOT["ALLOW_REDIS_IN_TESTS"]`` says they are the tests' own (docs/testing.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import urlsplit

from django.test import RequestFactory
from django.urls import reverse

from toot.conf import conf
from toot.engine import isolation as engine_isolation
from toot.engine import queue
from toot.exceptions import DeliveryRefused, NotIsolated
from toot.protocol import signing
from toot.protocol.events import Event, wire_json
from toot.subscriber import handling
from toot.subscriber.registry import registry
from toot.views import CallbackView

if TYPE_CHECKING:
    import unittest

    from django.http import HttpResponse
    from django.test import Client
    from django.test.client import _MonkeyPatchedWSGIResponse

    _TestCase = unittest.TestCase
else:
    _TestCase = object

__all__ = [
    "Delivery",
    "DeliveryRefused",
    "Isolation",
    "NotIsolated",
    "TootIsolationMixin",
    "isolated",
]


# assert_published's payload when none is given: any payload matches.
ANYTHING: Any = object()


class Delivery(NamedTuple):
    """What ``Isolation.deliver()`` did: the handlers it ran, by name, and those that had
    already handled the event (once per event, as in production)."""

    event: Event
    ran: list[str]
    skipped: list[str]


class Isolation:
    """What toot did while ``isolated()`` was active, and how to drive its subscriber side."""

    def __init__(self) -> None:
        #: The events published and committed, as subscribers get them (after JSON_ENCODER).
        self.published: list[Event] = []
        #: (event, handler name) for every handler run, in order.
        self.handled: list[tuple[Event, str]] = []
        #: Handler runs skipped because the handler had handled the event already.
        self.skipped: list[tuple[Event, str]] = []
        self._called: dict[str, str] = {}  # publish() calls: event id -> channel
        self._lock = threading.Lock()

    # What toot.engine.isolation hands over -----------------------------------------------

    def publishing(self, wire: dict[str, Any]) -> None:
        with self._lock:
            self._called[wire["id"]] = wire["channel"]

    def push(self, pushes: Mapping[str, Sequence[str]]) -> None:
        for name, items in pushes.items():
            if queue.kind(name) == queue.OUT:
                with self._lock:
                    self.published += [Event.from_dict(json.loads(i)["event"]) for i in items]
            else:  # the in queue's lanes: the callbacks endpoint accepted events
                for item in items:
                    self._handle(json.loads(item))

    def _handle(self, item: dict[str, Any]) -> None:
        event = Event.from_dict(item["event"])
        named = handling.handlers_by_name(event.channel)
        for name in item.get("handlers") or list(named):
            with self._lock:
                done = (event, name) in self.handled
                if done:
                    self.skipped.append((event, name))
            if not done:
                handler = named.get(name)
                if handler is None:  # as a drain counts it: a failure, not a success
                    raise LookupError(f"{name} is not subscribed to {event.channel} here")
                # A handler that raises raises here, to the test, and is not marked done:
                # delivered again, it runs again, as a retry would.
                handling.call(handler, event)
                with self._lock:
                    self.handled.append((event, name))

    # Publishing ------------------------------------------------------------------------

    def events(self, channel: str | None = None) -> list[Event]:
        """The events published on ``channel`` (a suffix of ``CHANNEL_PREFIX``, or a full
        channel), or all."""
        with self._lock:
            return [e for e in self.published if channel is None or _on(e, channel)]

    def clear(self) -> None:
        """Forget what was published and handled so far."""
        with self._lock:
            self.published.clear()
            self.handled.clear()
            self.skipped.clear()
            self._called.clear()

    def assert_published(
        self,
        channel: str,
        payload: Any = ANYTHING,
        *,
        contains: Mapping[str, Any] | None = None,
        keys: Iterable[str] = (),
        count: int | None = None,
    ) -> Event:
        """Assert that an event was published on ``channel`` (a suffix of
        ``CHANNEL_PREFIX``, or a full channel) and committed; returns the first that matches.

        ``payload`` is the whole payload, ``contains`` some of its keys and their values,
        ``keys`` keys it must have; values are compared as subscribers get them, so a
        ``datetime`` matches its ISO 8601 string. With ``count``, exactly that many must
        match.
        """
        wanted = _as_sent(payload) if payload is not ANYTHING else ANYTHING
        subset = _as_sent(dict(contains)) if contains is not None else {}
        keys = list(keys)
        events = self.events()
        matching = [e for e in events if _on(e, channel) and not _mismatch(e, wanted, subset, keys)]
        if matching and (count is None or len(matching) == count):
            return matching[0]
        what = _describe(channel, wanted, subset, keys)
        if matching:
            raise AssertionError(
                f"expected {count} events published {what}, found {len(matching)}:\n"
                + _listing(matching, wanted, subset, keys)
            )
        message = f"no event published {what}."
        if events:
            message += f"\nPublished ({len(events)}):\n" + _listing(events, wanted, subset, keys)
        else:
            message += "\nNothing was published."
        raise AssertionError(message + self._waiting(channel))

    def assert_nothing_published(self, channel: str | None = None) -> None:
        """Assert that no event was published (on ``channel``, if given) and committed."""
        events = self.events(channel)
        if events:
            where = f" on {channel}" if channel is not None else ""
            raise AssertionError(
                f"expected no event published{where}, found {len(events)}:\n"
                + _listing(events, ANYTHING, {}, [])
            )

    def _waiting(self, channel: str) -> str:
        with self._lock:
            sent = {event.id for event in self.published}
            waiting = [c for i, c in self._called.items() if i not in sent and _on_name(c, channel)]
        if not waiting:
            return ""
        return (
            f"\n{len(waiting)} publish() call(s) on {channel} are waiting for their "
            "transaction to commit, or were rolled back. Under django.test.TestCase the "
            "test's transaction never commits: publish inside "
            "self.captureOnCommitCallbacks(execute=True) (pytest-django: "
            "django_capture_on_commit_callbacks(execute=True))."
        )

    # Subscribing -----------------------------------------------------------------------

    def event(self, source: str, channel: str, payload: Any = None, **fields: Any) -> Event:
        """An event on ``source``'s ``CHANNEL_PREFIX + channel``, as that publisher would
        send it; ``fields`` may set its ``id`` and ``timestamp``."""
        return Event(conf.source(source).channel_prefix + channel, payload, **fields)

    def deliver(self, source: str, channel: str, payload: Any = None, **fields: Any) -> Delivery:
        """Deliver an event on ``source``'s ``channel`` to this project's handlers, through
        the callbacks endpoint, and run them here and now; see ``deliver_event``."""
        return self.deliver_event(self.event(source, channel, payload, **fields))

    def deliver_event(self, event: Event | Mapping[str, Any]) -> Delivery:
        """Deliver ``event`` (an Event or its wire form) as its publisher would: POSTed to
        the callbacks view, signed when its source has secrets. The view validates it,
        finds its source and handlers, checks the signature, and the handlers run in this
        thread, each at most once per event id; an ``async def`` handler is awaited.

        Raises DeliveryRefused if the endpoint refuses the event, or has no handler for
        its channel; a handler's exception propagates, and the handler runs again if the
        event is delivered again.
        """
        wire = event.to_dict() if isinstance(event, Event) else dict(event)
        body, headers = self.callback_request(wire)
        path = urlsplit(conf.CALLBACK_URL or "").path or "/"
        request = RequestFactory().post(
            path, body, content_type="application/json", headers=headers
        )
        with self._lock:
            handled, skipped = len(self.handled), len(self.skipped)
        with engine_isolation.standing_in(self):  # the innermost, whichever this is
            response = cast("HttpResponse", CallbackView.as_view()(request))
        if response.status_code != 200:
            raise DeliveryRefused(response.status_code, _error_of(response.content))
        if response.has_header("X-Toot-Unsubscribe"):
            raise DeliveryRefused(
                200, f"no handler here is subscribed to {wire.get('channel')} (X-Toot-Unsubscribe)"
            )
        with self._lock:
            ran = [name for _, name in self.handled[handled:]]
            already = [name for _, name in self.skipped[skipped:]]
        return Delivery(Event.from_dict(wire), ran, already)

    def post(
        self, client: Client, event: Event | Mapping[str, Any], **extra: Any
    ) -> _MonkeyPatchedWSGIResponse:
        """POST ``event`` to the project's callbacks endpoint (``toot:callbacks``) with
        Django's test ``client``, signed as its publisher would; the response."""
        wire = event.to_dict() if isinstance(event, Event) else dict(event)
        body, headers = self.callback_request(wire)
        return client.post(
            reverse("toot:callbacks"),
            body,
            content_type="application/json",
            headers={**headers, **extra.pop("headers", {})},
            **extra,
        )

    def callback_request(self, event: Event | Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The body and the signature headers of ``event``'s delivery: signed with the
        secrets of the sources its channel may come from, none if they have none."""
        wire = event.to_dict() if isinstance(event, Event) else dict(event)
        body = wire_json(wire, conf.JSON_ENCODER).encode()
        channel = wire.get("channel")
        sources = {conf.source_for_channel(channel)} if isinstance(channel, str) else set()
        if isinstance(channel, str):
            sources.update(source for source, _ in registry.matching(channel))
        secrets = [secret for source in sources if source for secret in source.secrets]
        msg_id = str(wire.get("id") or "")
        return body, signing.signature_headers(msg_id, body, secrets)


@contextmanager
def isolated() -> Iterator[Isolation]:
    """Keep toot off Redis, the broker and the network for the block; yields the
    Isolation that records what was published and handled."""
    isolation = Isolation()
    with engine_isolation.standing_in(isolation):
        yield isolation


class TootIsolationMixin(_TestCase):
    """For ``unittest`` and Django test cases: each test runs inside ``isolated()``, whose
    Isolation is ``self.toot``. Call ``super().setUp()`` from a ``setUp`` of your own."""

    toot: Isolation

    def setUp(self) -> None:
        super().setUp()
        context = isolated()
        self.toot = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)


# The failure messages ----------------------------------------------------------------------


def _on(event: Event, channel: str) -> bool:
    return _on_name(event.channel, channel)


def _on_name(full: str, channel: str) -> bool:
    return full in (channel, conf.CHANNEL_PREFIX + channel)


def _as_sent(value: Any) -> Any:
    """``value`` as a subscriber would get it, through the project's JSON_ENCODER."""
    return json.loads(wire_json({"v": value}, conf.JSON_ENCODER))["v"]


def _mismatch(event: Event, payload: Any, contains: Mapping[str, Any], keys: list[str]) -> str:
    """Why ``event``'s payload does not match, or ``""``."""
    if payload is not ANYTHING and event.payload != payload:
        return f"payload is {_short(event.payload)}"
    if (contains or keys) and not isinstance(event.payload, dict):
        return f"payload is not an object but {_short(event.payload)}"
    for key in keys:
        if key not in event.payload:
            return f"payload has no key {key!r}"
    for key, value in contains.items():
        if key not in event.payload:
            return f"payload has no key {key!r}"
        if event.payload[key] != value:
            where = f"payload[{json.dumps(key)}]"
            return f"{where} is {_short(event.payload[key])}, not {_short(value)}"
    return ""


def _describe(channel: str, payload: Any, contains: Mapping[str, Any], keys: list[str]) -> str:
    what = f"on {channel}"
    if payload is not ANYTHING:
        what += f" with the payload {_short(payload)}"
    if contains:
        what += f" with a payload containing {_short(contains)}"
    if keys:
        what += f" with the keys {', '.join(map(repr, keys))}"
    return what


def _listing(
    events: list[Event], payload: Any, contains: Mapping[str, Any], keys: list[str]
) -> str:
    lines = []
    for event in events:
        line = f"  {event.channel} {_short(event.payload)}"
        why = _mismatch(event, payload, contains, keys)
        lines.append(f"{line}: {why}" if why else line)
    return "\n".join(lines)


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_of(content: bytes) -> str:
    try:
        return str(json.loads(content)["error"])
    except (ValueError, KeyError, TypeError):
        return content[:200].decode("utf-8", "replace")
