"""The drain task, run by a real worker against real HTTP peers and the real Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import pytest
import redis as redis_py
from celery import Celery
from celery.signals import task_postrun
from django.conf import settings

from devtools.broker import delete_queues
from devtools.processes import free_port
from tests.broker import probe_app, queued
from tests.http_server import HTTPServer, Reply, in_order
from tests.topology import RedisServer
from tests.utils import (
    callback_urls,
    expire,
    live_leases,
    patch_toot,
    redis_down,
    redis_now,
    relaying_lanes,
    toot_settings,
)
from toot.conf import conf
from toot.engine import connection, queue
from toot.engine import drain as tasks
from toot.models import DeadLetter
from toot.protocol.events import Event
from toot.publisher import lanes, sending, store
from toot.subscriber import handling
from toot.subscriber.registry import subscribe


@pytest.fixture
def channel():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"org.example.test.{uuid.uuid4().hex[:8]}.v1"


@pytest.fixture(autouse=True)
def _lanes_relayed(request):
    """Where the worker runs, its relay sends the lanes' retries due after a drain ended,
    as a project's does; not for the tests of the drains of the test's own queue (there the
    drain's own senders send what it fanned out)."""
    if "celery_worker" not in request.fixturenames or "own_queue" in request.fixturenames:
        yield
        return
    request.getfixturevalue("celery_worker")
    with relaying_lanes():
        yield


@pytest.fixture
def peer():
    with HTTPServer() as server:
        yield server


@pytest.fixture
def own_queue(monkeypatch, redis):
    """A queue drained as ``out`` is (toot.publisher.sending), that only the test wakes.

    No relay runs wake() on it: what the drains do with it, the test alone decides.
    """
    name = f"out-{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(tasks.PROCESSORS, name, sending.process)
    monkeypatch.setitem(tasks.HOSTS, name, sending.hosting)
    return name


@pytest.fixture
def drains(own_queue):
    """(queue, drain id, items processed) of each drain of ``own_queue`` the worker ran."""
    runs: list[tuple[Any, ...]] = []

    def record(sender=None, args=None, retval=None, **kwargs):
        if getattr(sender, "name", None) == "toot.drain" and args[0] == own_queue:
            runs.append((*args, retval))

    task_postrun.connect(record, weak=False)
    yield runs
    task_postrun.disconnect(record)


@pytest.fixture
def down_app():
    """A Celery app whose broker is a port where nothing listens."""
    app = Celery("toot-down", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    yield app
    app.close()


def make_event(channel: str) -> dict[str, Any]:
    return Event(channel, {"id": 123}).to_dict()


def ids(event: dict[str, Any]) -> str:
    return str(event["id"])


def send(*events: dict[str, Any], name: str = queue.OUT) -> str | None:
    """What publish() does: push the events onto a queue, and start a drain if one may."""
    drain_id = queue.push(name, [{"event": event} for event in events])
    tasks.start(name, drain_id)
    return drain_id


def handle(*events: dict[str, Any]) -> None:
    """What the callback view does with events it received."""
    send(*events, name=queue.IN)


# The out queue: events delivered to subscribers


def test_a_drain_posts_each_event_to_every_subscriber_of_its_channel(
    celery_worker, eventually, channel
):
    events = [make_event(channel), make_event(channel)]
    with HTTPServer() as first, HTTPServer() as second, HTTPServer() as elsewhere:
        store.add(channel, first.url)
        store.add(channel, second.url)
        store.add("org.example.test.other.v1", elsewhere.url)

        send(*events)

        eventually(lambda: len(first.requests) == len(second.requests) == 2)
        for server in (first, second):
            assert [request.method for request in server.requests] == ["POST", "POST"]
            assert all(r.headers["Content-Type"] == "application/json" for r in server.requests)
            delivered = sorted((request.json() for request in server.requests), key=ids)
            assert delivered == sorted(events, key=ids)
        assert elsewhere.requests == []


def test_a_batch_subscriber_gets_the_waiting_events_in_one_post(
    celery_worker, eventually, channel, own_queue
):
    events = [make_event(channel) for _ in range(3)]
    with HTTPServer() as batched, HTTPServer() as single:
        store.add(channel, batched.url, batch=True)
        store.add(channel, single.url)

        send(*events, name=own_queue)

        eventually(lambda: batched.requests and len(single.requests) == 3)
        [request] = batched.requests
        assert request.json() == {"events": events}
        # Up to SENDERS deliveries are in flight at once: in any order.
        assert sorted((r.json() for r in single.requests), key=ids) == sorted(events, key=ids)


def test_a_delivery_sends_the_wire_json(celery_worker, eventually, channel, peer):
    event = make_event(channel)
    store.add(channel, peer.url + "/toot/callbacks")
    send(event)
    eventually(lambda: peer.requests)
    [request] = peer.requests
    assert request.path == "/toot/callbacks"
    assert set(request.json()) == {"id", "timestamp", "payload", "channel"}
    assert Event.from_dict(request.json()).timestamp.utcoffset() is not None


@pytest.mark.parametrize("failure", [500, 503, 404, 302, 301])
def test_non_2xx_answer_is_retried_until_2xx(celery_worker, eventually, channel, failure):
    event = make_event(channel)
    replies = in_order(
        Reply(failure, headers={"Location": "http://127.0.0.1:1/"}), Reply(failure), Reply(204)
    )
    with HTTPServer(replies) as server:
        # A URL of the test's own: its port may be an earlier test's, whose URL's state
        # (requests in flight, a circuit) the lanes keep a while.
        url = f"{server.url}/{channel}"
        store.add(channel, url)
        send(event)
        eventually(lambda: len(server.requests) == 3)
        assert [r.json()["id"] for r in server.requests] == [event["id"]] * 3
        # A redirect is never followed.
        assert all(r.path == f"/{channel}" for r in server.requests)


def test_connection_error_is_retried(celery_worker, eventually, channel, caplog):
    caplog.set_level(
        logging.WARNING, logger="toot.publisher.sending"
    )  # a worker sets the root's to ERROR
    port = free_port()
    server = HTTPServer()
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    store.add(channel, server.url)
    event = make_event(channel)

    send(event)  # nothing listens yet: the first attempt fails
    eventually(
        lambda: any(f"delivery to {server.url} failed" in r.getMessage() for r in caplog.records),
        what="the first attempt to fail",
    )
    with server:
        eventually(lambda: server.requests)
    assert server.requests[0].json() == event


def test_timeout_is_a_failure_and_retried(celery_worker, eventually, channel):
    replies = in_order(Reply(hang=True), Reply(200))
    with HTTPServer(replies) as server, toot_settings(READ_TIMEOUT=0.3):
        store.add(channel, server.url)
        send(make_event(channel))
        eventually(lambda: len(server.requests) == 2)


@pytest.mark.django_db(transaction=True)
def test_delivery_is_dead_lettered_when_the_schedule_is_spent(celery_worker, eventually, channel):
    with HTTPServer(Reply(500, body=b"still broken")) as server:
        store.add(channel, server.url)
        event = make_event(channel)
        send(event)
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
def test_gone_removes_the_subscription_at_once(celery_worker, eventually, channel, own_queue):
    with HTTPServer(Reply(410)) as gone:
        store.add(channel, gone.url)
        send(make_event(channel), name=own_queue)
        eventually(lambda: callback_urls(channel) == [])
        eventually(lambda: queue.pending(own_queue) == 0, what="the drain to be done")
        assert len(gone.requests) == 1
    assert not DeadLetter.objects.exists()


def test_retry_after_is_honoured(celery_worker, eventually, channel):
    replies = in_order(Reply(429, headers={"Retry-After": "1"}), Reply(200))
    with HTTPServer(replies) as server:
        store.add(channel, server.url)
        send(make_event(channel))
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
        send(make_event(channel))
        eventually(lambda: callback_urls(channel) == [stays.url])
        assert len(gone.requests) == 1


def test_unsubscribe_header_on_a_failure_is_ignored(celery_worker, eventually, channel):
    replies = in_order(Reply(500, headers={"X-Toot-Unsubscribe": "True"}), Reply(200))
    with HTTPServer(replies) as server:
        store.add(channel, server.url)
        send(make_event(channel))
        eventually(lambda: len(server.requests) == 2)
        assert callback_urls(channel) == [server.url]


# The in queue: local handlers


def test_a_drain_runs_every_handler_of_the_channel(celery_worker, eventually):
    seen: list[tuple[str, Event]] = []
    subscribe("publisher", "users.updated.v1", lambda event: seen.append(("first", event)))
    subscribe("publisher", "users.updated.v1", lambda event: seen.append(("second", event)))
    subscribe("publisher", "users.deleted.v1", lambda event: seen.append(("other", event)))
    event = make_event("org.example.publisher.users.updated.v1")

    handle(event)

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
    handle(make_event("org.example.publisher.users.updated.v1"))

    eventually(lambda: calls["flaky"] == 2)
    assert calls == {"good": 1, "flaky": 2}


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_always_fails_is_dead_lettered(celery_worker, eventually):
    def broken(event):
        raise RuntimeError("boom")

    subscribe("publisher", "users.updated.v1", broken)
    event = make_event("org.example.publisher.users.updated.v1")
    handle(event)

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

    handle(event)
    eventually(lambda: len(seen) == 1)
    handle(event, marker)  # the publisher retried a delivery the subscriber had handled
    eventually(lambda: Event.from_dict(marker) in seen)

    assert seen == [Event.from_dict(event), Event.from_dict(marker)]


# The in queue's lanes: a handler's events wait, run and are retried apart from others'


def handle_in_lanes(event: dict[str, Any], *names: str) -> None:
    """What the callback view does with an event it received: a push onto each handler's lane."""
    item = {"event": event}
    tasks.enqueue_many(
        {handling.lane(name): [queue.encode({**item, "handlers": [name]})] for name in names}
    )


def test_a_failing_handlers_retries_stay_in_its_lane(celery_worker, eventually, monkeypatch):
    calls = {"good": 0, "flaky": 0}

    def good(event):
        calls["good"] += 1

    def flaky(event):
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise RuntimeError("boom")

    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    retried: list[str] = []
    claim = queue.claim

    def spy(name, drain_id, limit, retries=(), **options):
        retried.extend(name for _ in retries)
        return claim(name, drain_id, limit, retries, **options)

    monkeypatch.setattr(queue, "claim", spy)
    channel = "org.example.publisher.users.updated.v1"
    handle_in_lanes(make_event(channel), *handling.handlers_by_name(channel))

    eventually(lambda: calls["flaky"] == 3)
    assert calls == {"good": 1, "flaky": 3}
    assert retried == [handling.lane(handling.handler_name(flaky))] * 2


@pytest.mark.django_db(transaction=True)
def test_an_event_for_a_handler_gone_from_its_lane_is_retried_there_then_dead_lettered(
    celery_worker, eventually
):
    """A deploy removed the handler after the callback queued its event: kept visible."""
    gone = "tests.test_tasks.removed_handler"
    event = make_event("org.example.publisher.users.updated.v1")

    handle_in_lanes(event, gone)

    eventually(DeadLetter.objects.exists)
    letter = DeadLetter.objects.get()
    assert (letter.handler, letter.event) == (gone, event)
    assert letter.attempts == 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    assert "is not subscribed to" in letter.last_error
    assert queue.pending(handling.lane(gone)) == 0


def test_a_lanes_drain_goes_to_the_celery_queue_its_handler_is_subscribed_with():
    routed = f"{conf.KEY_PREFIX}slow-{uuid.uuid4().hex[:8]}"
    default = f"{conf.KEY_PREFIX}default-{uuid.uuid4().hex[:8]}"

    def slow(event):
        pass

    def fast(event):
        pass

    subscribe("publisher", "users.updated.v1", slow, queue=routed)
    subscribe("publisher", "users.updated.v1", fast)
    with probe_app(default) as app:
        for handler in (slow, fast):
            tasks.start(
                handling.lane(handling.handler_name(handler)), f"drain-{handler.__name__}", app
            )

        assert queued(routed) == [
            ("toot.drain", [handling.lane(handling.handler_name(slow)), "drain-slow"], {})
        ]
        assert queued(default) == [
            ("toot.drain", [handling.lane(handling.handler_name(fast)), "drain-fast"], {})
        ]
    delete_queues(settings.CELERY_BROKER_URL, [routed, default])


# How a drain works through its queue


def test_a_lingering_drain_takes_an_event_pushed_meanwhile_without_a_new_message(
    celery_worker, eventually, channel, own_queue, drains, redis, monkeypatch
):
    patch_toot(monkeypatch, DRAIN_LINGER=2.0)  # time enough for the test to push
    first, second = make_event(channel), make_event(channel)
    with HTTPServer() as subscriber, toot_settings(MAX_DRAINS=1):
        store.add(channel, subscriber.url)
        drain_id = send(first, name=own_queue)
        assert drain_id is not None
        # Delivered, and its batch ended: the drain now waits for more.
        eventually(
            lambda: subscriber.requests and not redis.exists(queue.claimed_key(own_queue, drain_id))
        )

        assert send(second, name=own_queue) is None  # its drain runs: no other is started

        eventually(lambda: len(subscriber.requests) == 2)
        eventually(lambda: drains, what="the drain to end")
    assert [r.json() for r in subscriber.requests] == [first, second]
    assert drains == [(own_queue, drain_id, 2)]
    assert live_leases(redis, own_queue) == []


def test_a_retry_due_while_the_drain_lingers_is_sent_by_the_same_drain(
    celery_worker, eventually, channel, own_queue, drains, redis
):
    # RETRY_SCHEDULE starts at 0.1 s, well within LINGER_SECONDS (0.5 s).
    event = make_event(channel)
    with HTTPServer(in_order(Reply(500), Reply(200))) as subscriber:
        store.add(channel, subscriber.url)
        drain_id = send(event, name=own_queue)

        eventually(lambda: drains, what="the drain to end")
        # Sent before the drain ended, by its senders: no relay sends the lanes here.
        sent = [r.json() for r in subscriber.requests]
    assert sent == [event, event]
    # The retry waited in the URL's lane, not in the queue: one item drained.
    assert drains == [(own_queue, drain_id, 1)]
    assert queue.pending(own_queue) == 0
    assert live_leases(redis, own_queue) == []


def test_a_drain_hands_over_to_a_new_message_after_drain_seconds(
    celery_worker, eventually, channel, own_queue, drains, redis, monkeypatch
):
    # Hand over after every batch, of two items (fanned out in well under a millisecond).
    patch_toot(monkeypatch, DRAIN_SECONDS=1e-9, DRAIN_BATCH=2)
    events = [make_event(channel) for _ in range(5)]
    with HTTPServer() as subscriber:
        store.add(channel, subscriber.url)
        drain_id = send(*events, name=own_queue)

        eventually(lambda: len(drains) == 4, what="the drain's last message to end")
    assert sorted((r.json() for r in subscriber.requests), key=ids) == sorted(events, key=ids)
    # One lease throughout, carried from message to message; the last found nothing left.
    assert drains == [(own_queue, drain_id, n) for n in (2, 2, 1, 0)]
    assert live_leases(redis, own_queue) == []


def test_a_long_batch_renews_the_drains_lease(
    celery_worker, eventually, channel, own_queue, drains, monkeypatch
):
    # A lease of 2 s, renewed when over a quarter of it has passed; the batch takes 3 s,
    # one delivery after another.
    patch_toot(monkeypatch, SENDERS=1)
    woken: list[str | None] = []
    lock = threading.Lock()

    def slow(request):
        with lock:  # what a relay does at that moment: it must find the drain alive
            woken.append(queue.wake(own_queue))
        return Reply(200, body=b"ok!", trickle=0.25)

    events = [make_event(channel) for _ in range(4)]
    with HTTPServer(slow) as subscriber, toot_settings(LEASE_SECONDS=2.0):
        store.add(channel, subscriber.url)
        drain_id = send(*events, name=own_queue)

        eventually(lambda: drains, what="the drain to end")
    assert woken == [None] * 4  # nothing given back to be sent a second time
    assert sorted((r.json() for r in subscriber.requests), key=ids) == sorted(events, key=ids)
    assert drains == [(own_queue, drain_id, 4)]


def test_a_sender_pool_whose_lease_went_to_another_schedules_nothing(
    celery_worker, eventually, channel, redis
):
    """A pool that went quiet past its lease: a relay put what it held back in its lane.

    Its late answer is dropped, not scheduled as a retry: the event is sent again from
    the lane, once, and nothing waits in the delayed set for it.
    """
    given_back: list[float | None] = []

    def hung(request):
        if not given_back:
            hosts = lanes.base() + "hosts"
            for host in redis.zrange(hosts, 0, -1):
                redis.zadd(hosts, {host: 0})  # its lease ran out
            given_back.append(lanes.wake())  # what the relay does next
            return Reply(500)
        return Reply(200)

    event = make_event(channel)
    with HTTPServer(hung) as subscriber:
        store.add(channel, subscriber.url)
        send(event)
        eventually(lambda: len(subscriber.requests) == 2, what="the event sent again")
        eventually(lambda: not redis.hget(lanes.base() + "inflight", subscriber.url))
    # Given back by wake() here, or by the worker's relay first: either way, once.
    assert len(given_back) == 1
    assert [json.loads(r.body)["id"] for r in subscriber.requests] == [event["id"]] * 2
    delayed = redis.zrange(lanes.base() + "delayed:" + subscriber.url, 0, -1)
    assert not [item for item in delayed if event["id"].encode() in item]


@pytest.mark.parametrize("taken_over_by", ["relay", "redelivery"])
def test_a_drain_killed_mid_batch_loses_nothing(
    celery_worker, eventually, channel, own_queue, redis, taken_over_by
):
    """What it held is sent by the drain a relay starts once its lease runs out, or by its
    own message run again under the same id (a project's acks_late, a broker's redelivery)."""
    events = [make_event(channel) for _ in range(3)]
    with HTTPServer() as subscriber:
        store.add(channel, subscriber.url)
        dead = queue.push(own_queue, [{"event": event} for event in events])
        assert dead is not None
        # Its drain claimed the batch, and its worker was killed before it was done.
        assert len(queue.claim(own_queue, dead, conf.DRAIN_BATCH)) == 3
        drain_id = dead
        if taken_over_by == "relay":
            assert queue.wake(own_queue) is None  # its lease is live: its batch stays with it
            expire(redis, own_queue, dead)  # the lease ran out
            woken = queue.wake(own_queue)  # what the relay does next
            assert woken is not None and woken != dead
            drain_id = woken
        tasks.start(own_queue, drain_id)

        eventually(lambda: len(subscriber.requests) == 3)
        assert sorted(r.json()["id"] for r in subscriber.requests) == sorted(
            e["id"] for e in events
        )
        eventually(lambda: queue.pending(own_queue) == 0)


def test_a_drain_is_acknowledged_as_it_starts_whatever_the_project_says(celery_worker):
    app = tasks.drain.app
    assert app.conf.task_acks_late is False  # the tests' own default ...
    app.conf.task_acks_late = app.conf.task_reject_on_worker_lost = True
    try:  # ... and a project's that acknowledges late: toot's lease is what recovers work
        assert tasks.drain.acks_late is False
        assert tasks.drain.reject_on_worker_lost is False
    finally:
        app.conf.task_acks_late = app.conf.task_reject_on_worker_lost = False


# Starting a drain


def test_start_with_the_broker_unreachable_forgets_the_lease_and_the_relay_starts_a_drain(
    celery_worker, eventually, channel, own_queue, down_app, redis, caplog, monkeypatch
):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")  # a started worker sets ERROR
    # The worker's relay wakes the test's queue too; no drain already running takes from it.
    monkeypatch.setattr(queue, "QUEUES", (*queue.QUEUES, own_queue))
    event = make_event(channel)
    with HTTPServer() as subscriber:
        store.add(channel, subscriber.url)
        drain_id = queue.push(own_queue, [{"event": event}])
        assert drain_id is not None

        tasks.start(own_queue, drain_id, down_app)  # raises nothing

        [warning] = [
            r
            for r in caplog.records
            if r.name == "toot.engine.drain" and r.thread == threading.get_ident()
        ]
        assert warning.levelno == logging.WARNING
        assert f"Cannot start a drain of the {own_queue} queue now" in warning.getMessage()
        assert drain_id not in live_leases(redis, own_queue)  # so that the relay may start one
        # The event is safe in Redis: the worker's relay starts a drain for it.
        eventually(lambda: subscriber.requests, what="the relay to start a drain")
    assert subscriber.requests[0].json() == event


def test_while_the_broker_is_down_one_warning_a_minute_says_so(down_app, redis, caplog):
    caplog.set_level(logging.DEBUG, logger="toot.engine.drain")
    name = f"out-{uuid.uuid4().hex[:8]}"

    for _ in range(3):  # three publishes, or relay ticks, in a row
        tasks.start(name, queue.push(name, []), down_app)

    # Only this queue's: a drain of another test's may still be ending in the worker.
    levels = [r.levelno for r in caplog.records if name in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_start_with_redis_down_too_leaves_the_lease_to_end_by_itself(down_app, redis, caplog):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")
    name = f"out-{uuid.uuid4().hex[:8]}"
    drain_id = queue.push(name, [])

    with redis_down():
        tasks.start(name, drain_id, down_app)  # raises nothing

    assert "Cannot start a drain of the out-" in caplog.text
    assert live_leases(redis, name) == [drain_id]


def test_start_without_a_lease_sends_nothing(down_app, caplog):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")
    tasks.start(queue.OUT, None, down_app)  # its broker is down: sending would fail
    assert caplog.records == []


def test_a_failing_drain_puts_its_batch_back_for_later_and_ends_its_lease(
    celery_worker, eventually, own_queue, redis, monkeypatch
):
    failures: list[list[Any]] = []

    def failing(items, keep_alive):  # as a dead-letter write with the database down
        failures.append(items)
        raise RuntimeError("database down")

    monkeypatch.setitem(tasks.PROCESSORS, own_queue, failing)
    drain_id = send({"n": 1}, {"n": 2}, name=own_queue)
    assert drain_id is not None

    eventually(lambda: failures and not live_leases(redis, own_queue), what="the drain to fail")
    # Back as retries some seconds out, not at once (a failure again would spin):
    ready, delayed, _ = queue._keys(own_queue)
    assert redis.llen(ready) == 0
    due = [score - redis_now(redis) for _, score in redis.zrange(delayed, 0, -1, withscores=True)]
    assert len(due) == 2
    assert all(queue.FAILED_WORK_DELAY - 5 < seconds <= queue.FAILED_WORK_DELAY for seconds in due)
    assert not redis.exists(queue.claimed_key(own_queue, drain_id))
    # No lease is left behind: the next push starts a drain at once.
    assert queue.push(own_queue, [{"n": 3}]) is not None


def test_the_relay_starts_a_drain_for_a_due_lane_when_none_runs(
    celery_worker, eventually, channel, redis
):
    """A retry that comes due after the drains ended: the relay's lanes step sends it."""
    with HTTPServer() as subscriber:
        lanes.push({subscriber.url: (False, ["S" + json.dumps(make_event(channel))])})
        sending.relay_step(celery_worker.app)
        eventually(lambda: len(subscriber.requests) == 1, what="the lane's event sent")


def test_a_drain_that_lost_redis_gives_its_batch_back_once_redis_answers(
    tmp_path, fresh_clients, monkeypatch
):
    """Redis restarts (or fails over) while a drain holds a batch: the drain fails, and puts
    the batch back, due at once, as soon as Redis answers again: seconds, not a lease."""
    server = RedisServer("store", tmp_path)  # keeps its data across the kill
    server.start()
    name = "out:lost"  # a lane of the out queue of the test's own, which no relay wakes
    with toot_settings(REDIS_URL=server.url, REDIS_TIMEOUT=1.0, LEASE_SECONDS=60):
        channel = f"org.example.test.lost.{uuid.uuid4().hex[:8]}.v1"
        store.add(channel, "http://sub.example/toot/callbacks")
        event = Event(channel, {"n": 1}).to_dict()
        drain_id = queue.push(name, [{"event": event}])
        assert drain_id is not None
        lost = threading.Event()

        def lose_redis(by_url):  # the drain's next step, with Redis gone
            server.kill()
            lost.set()
            connection.get_redis().ping()

        monkeypatch.setattr(lanes, "push", lose_redis)
        failed: list[BaseException] = []
        draining = threading.Thread(target=lambda: raised(failed, tasks.drain, name, drain_id))
        started = time.monotonic()
        draining.start()
        assert lost.wait(10)
        server.start()  # from this thread: a server dies with the thread that started it
        draining.join(30)

        assert isinstance(failed[0], redis_py.ConnectionError)  # for Celery to log
        assert time.monotonic() - started < conf.LEASE_SECONDS / 4
        client = connection.get_redis()
        retries: Any = client.zrange(queue._keys(name)[1], 0, -1, withscores=True)
        [(waiting, due)] = retries
        assert json.loads(waiting) == {"event": event}  # its batch, a retry due at once
        seconds, micro = client.time()
        assert due <= seconds + micro / 1e6
        assert client.zcard(queue.leases_key(name)) == 0  # and its lease given up
    server.stop()


def raised(into: list[BaseException], function: Any, *args: Any) -> None:
    try:
        function(*args)
    except BaseException as exc:
        into.append(exc)
