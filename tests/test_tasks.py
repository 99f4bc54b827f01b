"""The Celery tasks, run by a real worker against real HTTP peers and the real Redis."""

from __future__ import annotations

import logging
import uuid

import pytest
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply, in_order
from toot import store
from toot.events import Event
from toot.registry import subscribe
from toot.tasks import deliver, fan_out, handle, retry_delay



@pytest.fixture
def channel():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"org.example.test.{uuid.uuid4().hex[:8]}.v1"


def make_event(channel: str = "org.example.test.users.updated.v1") -> dict:
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
    replies = in_order(Reply(failure, headers={"Location": "http://127.0.0.1:1/"}), Reply(failure), Reply(204))
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
    with HTTPServer(replies) as server, override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 0.3}):
        deliver.delay(make_event(), server.url)
        eventually(lambda: len(server.requests) == 2)


def test_delivery_gives_up_after_the_retry_schedule(celery_worker, eventually, caplog):
    with HTTPServer(Reply(500)) as server, caplog.at_level(logging.ERROR, logger="toot.tasks"):
        event = make_event()
        deliver.delay(event, server.url)
        eventually(lambda: any("failed for good" in r.getMessage() for r in caplog.records))
        assert len(server.requests) == 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    [record] = [r for r in caplog.records if "failed for good" in r.getMessage()]
    assert event["id"] in record.getMessage() and event["channel"] in record.getMessage()


def test_unsubscribe_header_removes_the_callback(celery_worker, eventually, channel):
    with HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "True"})) as gone, HTTPServer() as stays:
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


def test_a_failing_handler_does_not_stop_the_others(caplog):
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    subscribe("publisher", "users.updated.v1", broken)
    subscribe("publisher", "users.updated.v1", seen.append)
    event = make_event("org.example.publisher.users.updated.v1")

    with pytest.raises(RuntimeError, match="boom"), caplog.at_level(logging.ERROR, logger="toot.tasks"):
        handle(event)

    assert seen == [Event.from_dict(event)]
    [record] = caplog.records
    assert event["id"] in record.getMessage() and event["channel"] in record.getMessage()


def test_retry_delay_follows_the_schedule_with_jitter():
    with override_settings(TOOT={**settings.TOOT, "RETRY_SCHEDULE": [10, 100]}):
        first = [retry_delay(0) for _ in range(200)]
        second = [retry_delay(1) for _ in range(200)]
        assert retry_delay(2) is None
    assert 8 <= min(first) < max(first) <= 12
    assert 80 <= min(second) < max(second) <= 120
