"""The Celery tasks, run by a real worker against real HTTP peers and the real Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply, in_order
from toot import retries, store
from toot.events import Event
from toot.models import DeadLetter
from toot.registry import subscribe
from toot.tasks import deliver, fan_out, handle


@pytest.fixture
def channel():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"org.example.test.{uuid.uuid4().hex[:8]}.v1"


def make_event(channel: str = "org.example.test.users.updated.v1") -> dict[str, Any]:
    return Event(channel, {"id": 123}).to_dict()


@pytest.fixture
def peer():
    with HTTPServer() as server:
        yield server


def test_fan_out_posts_the_event_to_every_subscribed_callback(celery_worker, eventually, channel):
    event = make_event(channel)
    with HTTPServer() as first, HTTPServer() as second, HTTPServer() as elsewhere:
        store.add(channel, first.url)
        store.add(channel, second.url)
        store.add("org.example.test.other.v1", elsewhere.url)

        fan_out.delay(event)

        eventually(lambda: first.requests and second.requests)
        for server in (first, second):
            [request] = server.requests
            assert request.method == "POST"
            assert request.headers["Content-Type"] == "application/json"
            assert request.json() == event
        assert elsewhere.requests == []


def test_delivery_sends_the_wire_json(celery_worker, peer, eventually):
    event = make_event()
    deliver.delay(event, peer.url + "/toot/callbacks")
    eventually(lambda: peer.requests)
    [request] = peer.requests
    assert request.path == "/toot/callbacks"
    assert set(request.json()) == {"id", "timestamp", "payload", "channel"}
    assert Event.from_dict(request.json()).timestamp.utcoffset() is not None


@pytest.mark.parametrize("failure", [500, 503, 404, 302, 301])
def test_non_2xx_answer_is_retried_until_2xx(celery_worker, eventually, failure):
    event = make_event()
    replies = in_order(
        Reply(failure, headers={"Location": "http://127.0.0.1:1/"}), Reply(failure), Reply(204)
    )
    with HTTPServer(replies) as server:
        deliver.delay(event, server.url)
        eventually(lambda: len(server.requests) == 3)
        assert [r.json()["id"] for r in server.requests] == [event["id"]] * 3
        assert all(r.path == "/" for r in server.requests)  # a redirect is never followed


def test_connection_error_is_retried(celery_worker, eventually):
    port = free_port()
    server = HTTPServer()
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    deliver.delay(make_event(), server.url)  # nothing listens yet: the first attempt fails
    with server:
        eventually(lambda: server.requests)


def test_timeout_is_a_failure_and_retried(celery_worker, eventually):
    replies = in_order(Reply(hang=True), Reply(200))
    with (
        HTTPServer(replies) as server,
        override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 0.3}),
    ):
        deliver.delay(make_event(), server.url)
        eventually(lambda: len(server.requests) == 2)


@pytest.mark.django_db(transaction=True)
def test_delivery_is_dead_lettered_when_the_schedule_is_spent(celery_worker, eventually):
    with HTTPServer(Reply(500, body=b"still broken")) as server:
        event = make_event()
        deliver.delay(event, server.url)
        eventually(DeadLetter.objects.exists)
        assert len(server.requests) == 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    letter = DeadLetter.objects.get()
    assert letter.kind == DeadLetter.Kind.DELIVERY
    assert (letter.event, letter.event_id, letter.channel) == (event, event["id"], event["channel"])
    assert letter.callback_url == server.url
    assert letter.attempts == 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    assert (letter.last_status, letter.last_error) == (500, "still broken")
    assert letter.first_attempt_at < letter.last_attempt_at


@pytest.mark.django_db(transaction=True)
def test_gone_removes_the_subscription_at_once(celery_worker, eventually, channel):
    with HTTPServer(Reply(410)) as gone:
        store.add(channel, gone.url)
        fan_out.delay(make_event(channel))
        eventually(lambda: store.callback_urls(channel) == [])
        assert len(gone.requests) == 1
    assert not DeadLetter.objects.exists()
    assert retries.pending(settings.CELERY_TASK_DEFAULT_QUEUE) == 0


def test_retry_after_is_honoured(celery_worker, eventually):
    replies = in_order(Reply(429, headers={"Retry-After": "1"}), Reply(200))
    with HTTPServer(replies) as server:
        deliver.delay(make_event(), server.url)
        eventually(lambda: len(server.requests) == 2)
    first, second = server.requests
    # The schedule says 0.1 s; the subscriber asked for 1 s.
    assert second.received_at - first.received_at >= 0.9


def test_unsubscribe_header_removes_the_callback(celery_worker, eventually, channel):
    with (
        HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "True"})) as gone,
        HTTPServer() as stays,
    ):
        store.add(channel, gone.url)
        store.add(channel, stays.url)
        fan_out.delay(make_event(channel))
        eventually(lambda: store.callback_urls(channel) == [stays.url])
        assert len(gone.requests) == 1


def test_unsubscribe_header_on_a_failure_is_ignored(celery_worker, eventually, channel):
    replies = in_order(Reply(500, headers={"X-Toot-Unsubscribe": "True"}), Reply(200))
    with HTTPServer(replies) as server:
        store.add(channel, server.url)
        fan_out.delay(make_event(channel))
        eventually(lambda: len(server.requests) == 2)
        assert store.callback_urls(channel) == [server.url]


def test_handle_runs_every_handler_of_the_channel(celery_worker, eventually):
    seen: list[tuple[str, Event]] = []
    subscribe("publisher", "users.updated.v1", lambda event: seen.append(("first", event)))
    subscribe("publisher", "users.updated.v1", lambda event: seen.append(("second", event)))
    subscribe("publisher", "users.deleted.v1", lambda event: seen.append(("other", event)))
    event = make_event("org.example.publisher.users.updated.v1")

    handle.delay(event)

    eventually(lambda: len(seen) == 2)
    assert sorted(name for name, _ in seen) == ["first", "second"]
    assert all(handled == Event.from_dict(event) and handled["id"] == 123 for _, handled in seen)


def test_a_failing_handler_is_retried_alone(celery_worker, eventually):
    calls = {"good": 0, "flaky": 0}

    def good(event):
        calls["good"] += 1

    def flaky(event):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("boom")

    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    handle.delay(make_event("org.example.publisher.users.updated.v1"))

    eventually(lambda: calls["flaky"] == 2)
    assert calls == {"good": 1, "flaky": 2}


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_always_fails_is_dead_lettered(celery_worker, eventually, caplog):
    def broken(event):
        raise RuntimeError("boom")

    subscribe("publisher", "users.updated.v1", broken)
    event = make_event("org.example.publisher.users.updated.v1")
    handle.delay(event)

    eventually(DeadLetter.objects.exists)
    letter = DeadLetter.objects.get()
    assert letter.kind == DeadLetter.Kind.HANDLER
    assert letter.handler.endswith(
        "test_a_handler_that_always_fails_is_dead_lettered.<locals>.broken"
    )
    assert letter.attempts == 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    assert "boom" in letter.last_error
    assert letter.event == event


def test_a_handled_event_is_not_handled_again(celery_worker, eventually):
    seen: list[Event] = []
    subscribe("publisher", "users.updated.v1", seen.append)
    event = make_event("org.example.publisher.users.updated.v1")
    marker = make_event("org.example.publisher.users.updated.v1")

    handle.delay(event)
    eventually(lambda: len(seen) == 1)
    handle.delay(event)  # the publisher retried a delivery the subscriber had handled
    handle.delay(marker)
    eventually(lambda: Event.from_dict(marker) in seen)

    assert seen == [Event.from_dict(event), Event.from_dict(marker)]


@pytest.mark.parametrize(
    ("delivery_info", "queue"),
    [
        (None, "default"),
        ({"routing_key": "somewhere-else"}, "default"),
        ({"routing_key": "mine"}, "mine"),
    ],
)
def test_retries_go_back_to_the_queue_the_message_came_from(delivery_info, queue):
    from kombu import Queue

    from toot.tasks import origin_queue

    app = deliver.app
    saved = app.amqp.queues.copy()
    app.amqp.queues["mine"] = Queue("mine", routing_key="mine")
    deliver.push_request(delivery_info=delivery_info)
    try:
        expected = app.conf.task_default_queue if queue == "default" else queue
        assert origin_queue(deliver) == expected
    finally:
        deliver.pop_request()
        app.amqp.queues.clear()
        app.amqp.queues.update(saved)


@pytest.mark.django_db
def test_a_dead_lettered_delivery_fails_the_task_with_callback_failure():
    from toot import CallbackFailure

    last = len(settings.TOOT["RETRY_SCHEDULE"])
    with HTTPServer(Reply(502, body=b"bad gateway")) as server:
        result = deliver.apply(args=(make_event(), server.url), kwargs={"attempts": last})

    assert result.failed()
    assert isinstance(result.result, CallbackFailure)
    assert (result.result.callback_url, result.result.status) == (server.url, 502)
    assert DeadLetter.objects.get().attempts == last + 1
