"""toot's Django signals (toot.signals), sent by the real pipeline: publish() and the
worker's senders against real HTTP peers, the callbacks endpoint served by a live server,
handlers run by the real worker, and the subscriptions endpoint and admin."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import re
import threading
import uuid
from typing import Any

import pytest
from django.db import transaction
from django.urls import reverse

import toot
from devtools.processes import ROOT
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import redis_down
from toot import signals
from toot.deadletters import Replay, redeliver
from toot.engine import queue
from toot.engine.connection import get_redis
from toot.exceptions import AlreadyRunning
from toot.models import DeadLetter, Subscription
from toot.publisher import delivery, lanes, sending, store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber import handling
from toot.subscriber.registry import subscribe

SOURCE_PREFIX = "org.example.publisher."
NAMES = [
    "event_published",
    "delivery_succeeded",
    "delivery_failed",
    "dead_lettered",
    "subscription_added",
    "subscription_removed",
    "event_received",
    "handler_succeeded",
    "handler_failed",
]
BATCH_ID = re.compile(r"[0-9a-f]{32}")


class Sent:
    """Every toot signal sent during a test, as its receivers got it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def receiver(self, name: str) -> Any:
        def receive(sender: Any, signal: Any, **kwargs: Any) -> None:
            with self._lock:
                self.calls.append((name, sender, kwargs))

        return receive

    def of(self, name: str, channel: str | None = None) -> list[dict[str, Any]]:
        """The keyword arguments of each ``name`` signal about ``channel``, in order."""
        with self._lock:
            calls = list(self.calls)
        return [
            kwargs
            for sent, _, kwargs in calls
            if sent == name and (channel is None or _about(kwargs) == channel)
        ]

    def senders(self, name: str) -> set[Any]:
        with self._lock:
            return {sender for sent, sender, _ in self.calls if sent == name}


def _about(kwargs: dict[str, Any]) -> str | None:
    if "channel" in kwargs:
        return str(kwargs["channel"])
    event = kwargs.get("event")
    return None if event is None else str(event.channel)


@pytest.fixture
def sent():
    """Receivers on every toot signal, recording what they get; disconnected after."""
    recorder = Sent()
    connected = [(getattr(signals, name), recorder.receiver(name)) for name in NAMES]
    for signal, receiver in connected:
        signal.connect(receiver, weak=False)
    yield recorder
    for signal, receiver in connected:
        signal.disconnect(receiver)


@pytest.fixture
def raising():
    """A receiver that raises, connected to every toot signal; disconnected after."""

    def broken_receiver(sender, **kwargs):
        raise RuntimeError("a project's bug")

    for name in NAMES:
        getattr(signals, name).connect(broken_receiver, weak=False)
    yield broken_receiver
    for name in NAMES:
        getattr(signals, name).disconnect(broken_receiver)


@pytest.fixture
def suffix():
    return f"signals.{uuid.uuid4().hex[:8]}.v1"


def callbacks_url(live_server) -> str:
    return f"{live_server.url}/toot/callbacks"


def no_retries_waiting(url: str, lane: str) -> bool:
    """Nothing of the callback URL's or of the handler's lane waits for a retry."""
    client = get_redis()
    return not client.exists(lanes.base() + "delayed:" + url) and queue.depth(lane).retries == 0


# The whole path: publish, deliver, receive, handle ----------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_an_event_s_path_sends_each_signal_once(
    worker, live_server, eventually, sent, suffix, batch
):
    seen: list[toot.Event] = []
    subscribe("publisher", suffix, seen.append)
    channel = SOURCE_PREFIX + suffix
    url = callbacks_url(live_server)
    store.add(channel, url, batch=batch)
    [name] = handling.handlers_by_name(channel)

    event = toot.publish(suffix, {"id": 1}, prefix=SOURCE_PREFIX)

    eventually(lambda: sent.of("handler_succeeded", channel), what="the handler to run")
    eventually(lambda: sent.of("delivery_succeeded", channel), what="the 200 to be read")
    assert seen == [event]
    assert sent.of("event_published", channel) == [{"event": event, "outbox": False}]
    [delivered] = sent.of("delivery_succeeded", channel)
    assert delivered["events"] == [event]
    assert delivered["events"][0].payload == {"id": 1}
    assert (delivered["callback_url"], delivered["channel"]) == (url, channel)
    assert (delivered["batch"], delivered["attempt"], delivered["status"]) == (batch, 1, 200)
    if batch:
        assert BATCH_ID.fullmatch(delivered["delivery_id"])
    else:
        assert delivered["delivery_id"] == event.id
    assert delivered["duration"] > 0
    [received] = sent.of("event_received", channel)
    assert received == {"events": [event], "channel": channel, "handlers": [name]}
    [handled] = sent.of("handler_succeeded", channel)
    assert (handled["event"], handled["handler"], handled["attempt"]) == (event, name, 1)
    assert handled["duration"] >= 0
    assert sent.of("delivery_failed", channel) == sent.of("handler_failed", channel) == []
    order = [signal for signal, _, kwargs in sent.calls if _about(kwargs) == channel]
    # The subscriber answers once it queued the handler, which may have run by then.
    assert order[0] == "event_published"
    assert order.index("event_received") < order.index("delivery_succeeded")
    assert sorted(order) == sorted(
        ["event_published", "delivery_succeeded", "event_received", "handler_succeeded"]
    )
    for signal in ("event_published", "delivery_succeeded", "event_received"):
        assert sent.senders(signal) == {toot.Event}


def test_a_receiver_that_raises_is_logged_and_changes_nothing(
    worker, live_server, eventually, sent, raising, suffix, caplog
):
    seen: list[toot.Event] = []
    subscribe("publisher", suffix, seen.append)
    channel = SOURCE_PREFIX + suffix
    url = callbacks_url(live_server)
    store.add(channel, url, batch=True)
    [name] = handling.handlers_by_name(channel)

    with caplog.at_level(logging.ERROR, logger="toot.signals"):
        event = toot.publish(suffix, {"id": 1}, prefix=SOURCE_PREFIX)

        eventually(lambda: sent.of("handler_succeeded", channel), what="the handler to run")
        eventually(lambda: sent.of("delivery_succeeded", channel), what="the 200 to be read")
        eventually(
            lambda: no_retries_waiting(url, handling.lane(name)) and len(logged(caplog)) >= 4,
            what="the pipeline to be done",
        )
    # Once each, and the other receivers got every signal.
    assert seen == [event]
    assert [len(sent.of(signal, channel)) for signal in NAMES] == [1, 1, 0, 0, 0, 0, 1, 1, 0]
    assert not sent.of("delivery_failed", channel)
    lines = logged(caplog)
    what, receiver = f"Event {event.id} on {channel}", raising.__qualname__
    error = 'raised, ignored: RuntimeError("a project\'s bug")'
    assert f"{what}: receiver {receiver} of toot.signals.event_published {error}" in lines
    assert f"{what}: receiver {receiver} of toot.signals.event_received {error}" in lines
    assert any(
        line.startswith(f"Events {event.id} on {channel} (batch ")
        and line.endswith(f": receiver {receiver} of toot.signals.delivery_succeeded {error}")
        for line in lines
    )
    assert (
        f"{what}, handler {name}: receiver {receiver} of toot.signals.handler_succeeded {error}"
        in lines
    )
    records = [r for r in caplog.records if r.name == "toot.signals"]
    assert all(r.levelname == "ERROR" and r.exc_info for r in records)
    assert sent.of("event_received", channel)


def logged(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "toot.signals"]


# Deliveries that fail --------------------------------------------------------------------


def test_a_failed_delivery_says_when_it_is_retried(worker, eventually, sent, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer(in_order(Reply(503, body=b"busy"), Reply(200))) as peer:
        store.add(channel, peer.url)

        event = toot.publish(suffix, {"id": 2})

        eventually(lambda: sent.of("delivery_succeeded", channel), what="the retry")
    [failed] = sent.of("delivery_failed", channel)
    assert failed["events"] == [event]
    assert (failed["callback_url"], failed["delivery_id"], failed["batch"]) == (
        peer.url,
        event.id,
        False,
    )
    assert (failed["attempt"], failed["status"], failed["error"]) == (1, 503, "busy")
    assert 0 < failed["retry_in"] < 1  # RETRY_SCHEDULE's first 0.1 s, ±20 %
    assert failed["duration"] > 0
    [delivered] = sent.of("delivery_succeeded", channel)
    assert (delivered["attempt"], delivered["status"]) == (2, 200)


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letter meanwhile
def test_a_delivery_that_gets_no_answer_fails_with_its_error(worker, eventually, sent, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer() as peer:
        url = peer.url
    store.add(channel, url)  # nobody listens there any more

    toot.publish(suffix, {"id": 3})

    eventually(lambda: sent.of("dead_lettered", channel), what="the dead letter")
    first, *_, last = sent.of("delivery_failed", channel)
    assert (first["status"], first["attempt"], last["retry_in"]) == (None, 1, None)
    assert first["error"]
    assert first["retry_in"] > 0 and first["duration"] > 0


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letters meanwhile
def test_a_delivery_failed_for_good_is_dead_lettered_event_by_event(
    worker, eventually, sent, suffix, settings
):
    channel = "org.example.test." + suffix
    attempts = 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    with HTTPServer(Reply(500, body=b"broken")) as peer:
        store.add(channel, peer.url, batch=True)

        events = [toot.publish(suffix, {"n": n}) for n in range(2)]

        eventually(
            lambda: (
                sum(
                    len(failed["events"])
                    for failed in sent.of("delivery_failed", channel)
                    if failed["retry_in"] is None
                )
                == 2
            ),
            what="every event's last attempt",
        )
    failures = sent.of("delivery_failed", channel)
    # One batch, or two if the second event came after the first was claimed: each event
    # failed every attempt.
    tried = sorted(event.id for failed in failures for event in failed["events"])
    assert tried == sorted(event.id for event in events for _ in range(attempts))
    for failed in failures:
        assert failed["status"] == 500 and failed["batch"] is True
        if failed["attempt"] < attempts:
            assert failed["retry_in"] > 0
        else:
            assert failed["retry_in"] is None
    letters = sent.of("dead_lettered", channel)
    assert sorted(letter["event"].id for letter in letters) == sorted(e.id for e in events)
    for letter in letters:
        assert letter["kind"] == "delivery"
        row = letter["dead_letter"]
        assert isinstance(row, DeadLetter) and DeadLetter.objects.filter(pk=row.pk).exists()
        assert (row.event_id, row.callback_url, row.attempts) == (
            letter["event"].id,
            peer.url,
            attempts,
        )
    assert sent.senders("dead_lettered") == {DeadLetter}


def test_a_410_fails_the_delivery_and_removes_the_subscription(worker, eventually, sent, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer(Reply(410)) as gone:
        store.add(channel, gone.url)

        [event] = [toot.publish(suffix, {"id": 4})]

        eventually(lambda: sent.of("subscription_removed", channel), what="the removal")
        eventually(lambda: sent.of("delivery_failed", channel), what="the failure")
    assert sent.of("subscription_removed", channel) == [
        {"channel": channel, "callback_url": gone.url, "reason": "gone"}
    ]
    [failed] = sent.of("delivery_failed", channel)
    assert (failed["events"], failed["status"], failed["retry_in"]) == ([event], 410, None)
    assert sent.senders("subscription_removed") == {Subscription}
    assert not sent.of("dead_lettered", channel)


def test_x_toot_unsubscribe_delivers_and_removes_the_subscription(worker, eventually, sent, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "True"})) as leaving:
        store.add(channel, leaving.url)

        event = toot.publish(suffix, {"id": 5})

        eventually(lambda: sent.of("delivery_succeeded", channel), what="the delivery")
    assert sent.of("subscription_removed", channel) == [
        {"channel": channel, "callback_url": leaving.url, "reason": "unsubscribe"}
    ]
    [delivered] = sent.of("delivery_succeeded", channel)
    assert (delivered["events"], delivered["status"]) == ([event], 200)


def test_the_callbacks_endpoint_that_asks_to_unsubscribe_received_the_event(
    worker, live_server, eventually, sent, suffix
):
    channel = SOURCE_PREFIX + suffix  # no handler here
    url = callbacks_url(live_server)
    store.add(channel, url)

    event = toot.publish(suffix, {"id": 6}, prefix=SOURCE_PREFIX)

    eventually(lambda: sent.of("subscription_removed", channel), what="the unsubscription")
    assert sent.of("event_received", channel) == [
        {"events": [event], "channel": channel, "handlers": []}
    ]
    assert sent.of("subscription_removed", channel)[0]["reason"] == "unsubscribe"


def test_a_batch_is_received_in_one_signal_and_handled_event_by_event(
    client, worker, eventually, sent, suffix
):
    seen: list[toot.Event] = []
    subscribe("publisher", suffix, seen.append)
    channel = SOURCE_PREFIX + suffix
    [name] = handling.handlers_by_name(channel)
    events = [toot.Event(channel, {"n": n}) for n in range(3)]

    response = client.post(
        "/toot/callbacks",
        json.dumps({"events": [event.to_dict() for event in events]}),
        content_type="application/json",
    )

    assert response.status_code == 200
    assert sent.of("event_received", channel) == [
        {"events": events, "channel": channel, "handlers": [name]}
    ]
    eventually(lambda: len(sent.of("handler_succeeded", channel)) == 3, what="every handler run")
    assert sorted(seen, key=events.index) == events
    assert sorted((h["event"].id, h["handler"]) for h in sent.of("handler_succeeded", channel)) == (
        sorted((event.id, name) for event in events)
    )


# Handlers that fail --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letter meanwhile
def test_a_failing_handler_is_signalled_at_each_attempt_then_dead_lettered(
    worker, live_server, eventually, sent, suffix, settings
):
    def broken(event):
        raise ValueError(f"cannot handle {event.id}")

    subscribe("publisher", suffix, broken)
    channel = SOURCE_PREFIX + suffix
    store.add(channel, callbacks_url(live_server))
    [name] = handling.handlers_by_name(channel)
    attempts = 1 + len(settings.TOOT["RETRY_SCHEDULE"])

    event = toot.publish(suffix, {"id": 7}, prefix=SOURCE_PREFIX)

    eventually(lambda: sent.of("dead_lettered", channel), what="the dead letter")
    eventually(lambda: len(sent.of("handler_failed", channel)) == attempts)
    failures = sent.of("handler_failed", channel)
    assert [f["attempt"] for f in failures] == list(range(1, attempts + 1))
    for failed in failures:
        assert (failed["event"], failed["handler"]) == (event, name)
        assert isinstance(failed["error"], ValueError)
        assert str(failed["error"]) == f"cannot handle {event.id}"
        assert failed["duration"] >= 0
    assert all(f["retry_in"] > 0 for f in failures[:-1])
    assert failures[-1]["retry_in"] is None
    [letter] = sent.of("dead_lettered", channel)
    assert (letter["kind"], letter["event"]) == ("handler", event)
    assert (letter["dead_letter"].handler, letter["dead_letter"].attempts) == (name, attempts)
    assert not sent.of("handler_succeeded", channel)


@pytest.mark.django_db
def test_replayed_dead_letters_are_signalled_with_their_attempt(redis, sent):
    calls: list[toot.Event] = []
    subscribe("publisher", "users.updated.v1", calls.append)
    channel = SOURCE_PREFIX + "users.updated.v1"
    [name] = handling.handlers_by_name(channel)
    event = toot.Event(channel, {"id": 8})
    letter = handling.bury_handler(event.to_dict(), name, 4, RuntimeError("boom"), None)
    with HTTPServer() as peer:
        published = toot.Event("org.example.test.replayed.v1", {"id": 9})
        filed = bury_delivery(published.to_dict(), peer.url, 4, Outcome(status=500), None)

        assert redeliver(letter) is Replay.REDELIVERED
        assert redeliver(filed) is Replay.REDELIVERED

    assert calls == [event]
    [handled] = sent.of("handler_succeeded", channel)
    assert (handled["event"], handled["handler"], handled["attempt"]) == (event, name, 5)
    [delivered] = sent.of("delivery_succeeded", published.channel)
    assert (delivered["events"], delivered["attempt"], delivered["status"]) == (
        [published],
        5,
        200,
    )
    assert [d["kind"] for d in sent.of("dead_lettered")] == ["handler", "delivery"]


# Subscriptions -------------------------------------------------------------------------


def test_the_subscriptions_endpoint_signals_each_registration_and_removal(client, redis, sent):
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    url = "http://subscriber.example/toot/callbacks"
    body = {"channel": channel, "callback_url": url, "batch": True, "rate_limit": 50}

    for status in (201, 204):
        response = client.post("/toot/subscriptions", json.dumps(body), "application/json")
        assert response.status_code == status
    response = client.delete(f"/toot/subscriptions?channel={channel}&callback_url={url}")
    assert response.status_code == 204
    response = client.delete(f"/toot/subscriptions?channel={channel}&callback_url={url}")
    assert response.status_code == 404

    added = {"channel": channel, "callback_url": url, "batch": True, "rate_limit": 50}
    assert sent.of("subscription_added", channel) == [
        {**added, "created": True},
        {**added, "created": False},
    ]
    assert sent.of("subscription_removed", channel) == [
        {"channel": channel, "callback_url": url, "reason": "request"}
    ]  # once: the 404 removed nothing
    assert sent.senders("subscription_added") == {Subscription}


def test_a_receiver_that_raises_changes_no_answer_of_the_endpoints(client, redis, raising):
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    url = "http://subscriber.example/toot/callbacks"
    body = {"channel": channel, "callback_url": url}

    response = client.post("/toot/subscriptions", json.dumps(body), "application/json")
    assert response.status_code == 201
    assert store.subscriptions(channel) == {channel: [url]}
    response = client.delete(f"/toot/subscriptions?channel={channel}&callback_url={url}")
    assert response.status_code == 204
    assert store.subscriptions(channel) == {}


@pytest.mark.django_db
@pytest.mark.urls("tests.test_admin")
def test_a_removal_in_the_admin_is_signalled(admin_client, redis, sent, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    url = "http://subscriber.example/toot/callbacks"
    store.add(channel, url)
    page = reverse("admin:toot_subscription_changelist")

    for _ in range(2):
        admin_client.post(page, {"channel": channel, "callback_url": url})

    assert sent.of("subscription_removed", channel) == [
        {"channel": channel, "callback_url": url, "reason": "admin"}
    ]


# Publishing -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_published_is_sent_once_the_transaction_commits(worker, sent, suffix):
    channel = "org.example.test." + suffix
    with transaction.atomic():
        event = toot.publish(suffix, {"id": 10})
        assert sent.of("event_published", channel) == []

    assert sent.of("event_published", channel) == [{"event": event, "outbox": False}]

    with pytest.raises(RuntimeError), transaction.atomic():
        toot.publish(suffix, {"id": 11})
        raise RuntimeError("rolled back")
    assert len(sent.of("event_published", channel)) == 1


@pytest.mark.django_db(transaction=True)
def test_an_event_kept_in_the_outbox_is_published_with_outbox_true(sent, suffix):
    channel = "org.example.test." + suffix
    with redis_down():
        event = toot.publish(suffix, {"id": 12})

    assert sent.of("event_published", channel) == [{"event": event, "outbox": True}]


def test_with_no_receiver_toot_sends_nothing(worker, eventually, suffix, monkeypatch):
    """The fast path: send_robust is not even called, so no Event is built for nobody."""
    called: list[Any] = []

    def send_robust(*args: Any, **kwargs: Any) -> list[Any]:
        called.append(args)
        return []

    for name in NAMES:
        monkeypatch.setattr(getattr(signals, name), "send_robust", send_robust)
    channel = "org.example.test." + suffix
    with HTTPServer() as peer:
        store.add(channel, peer.url)

        toot.publish(suffix, {"id": 13})

        eventually(lambda: peer.requests, what="the delivery")
    assert not signals.wanted(*(getattr(signals, name) for name in NAMES))
    assert called == []


# The receivers docs/api.md shows ----------------------------------------------------------


@pytest.fixture
def docs_receivers():
    """docs/examples/receivers.py, imported as a project imports its receivers: connected
    by @receiver as it loads; disconnected after."""
    spec = importlib.util.spec_from_file_location(
        "docs_receivers", ROOT / "docs" / "examples" / "receivers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    signals.delivery_failed.disconnect(module.subscriber_failing)
    signals.dead_lettered.disconnect(module.dead_letter_filed)
    signals.handler_succeeded.disconnect(module.handler_timing)


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letter meanwhile
def test_the_receivers_the_docs_show_log_a_failing_subscriber(
    worker, eventually, docs_receivers, suffix, caplog
):
    channel = "org.example.test." + suffix
    with (
        caplog.at_level(logging.INFO, logger="myproject.toot"),
        HTTPServer(Reply(503, body=b"busy")) as peer,
    ):
        store.add(channel, peer.url)

        event = toot.publish(suffix, {"id": 14})

        eventually(
            lambda: any(r.levelname == "ERROR" for r in ours(caplog)), what="the dead letter"
        )
    [third, letter] = [r.getMessage() for r in ours(caplog)]
    assert third.startswith(f"{peer.url} failed 3 times (status 503: busy); next try in 0.")
    [row] = DeadLetter.objects.all()
    assert letter == f"Dead letter {row.pk}: event {event.id} on {channel} (delivery)"


def ours(caplog):
    return [r for r in caplog.records if r.name == "myproject.toot"]


# Edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    ["2015-10-23 11:50:09 -0500", "2015-10-23T16:50:09", "2015-10-23T11:50:09-05:00"],
    ids=["ruby", "naive", "iso"],
)
def test_a_delivery_s_events_reach_receivers_with_aware_timestamps(sent, timestamp):
    """Events queued by publish() carry ISO 8601 with an offset; any other form (a dead
    letter's, an older toot's) is read as the callbacks endpoint reads it."""
    channel = "org.example.test.edges.v1"
    wire = {"id": "e1", "timestamp": timestamp, "payload": {"n": 1}, "channel": channel}
    sent_once = sending.Delivery("http://peer.example/cb", channel, [wire], False, "e1", b"")

    sending.signal_outcome(sent_once, Outcome(status=200, duration=0.01), 1)

    [delivered] = sent.of("delivery_succeeded", channel)
    [event] = delivered["events"]
    assert (event.id, event.payload) == ("e1", {"n": 1})
    assert event.timestamp == dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=dt.timezone.utc)


def test_a_410_for_a_url_no_longer_subscribed_removes_nothing(redis, sent, caplog):
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    event = toot.Event(channel, {"id": 1}).to_dict()
    with HTTPServer(Reply(410)) as gone, caplog.at_level(logging.INFO, "toot.publisher.delivery"):
        outcome = delivery.attempt(gone.url, channel, json.dumps(event).encode(), event["id"])

    assert outcome.gone
    assert sent.of("subscription_removed") == []
    [line] = [r.getMessage() for r in caplog.records if r.name == "toot.publisher.delivery"]
    assert line == (
        f"Event {event['id']} on {channel}: {gone.url} asked to unsubscribe from {channel} "
        "(status 410); it was not subscribed"
    )


def test_a_handler_running_elsewhere_is_neither_signal(sent):
    event = toot.Event(SOURCE_PREFIX + "edges.v1", {"id": 1})

    handling.signal_runs(event, {}, {"tests.busy": AlreadyRunning("busy")}, 1, None)

    assert sent.of("handler_failed") == sent.of("handler_succeeded") == []
