"""Faults reproduced for real on the example topology (issue: delivery that loses nothing).

Events wait in Redis queues (``toot.queue``) until a drain delivers them; a drain that
dies leaves what it held to the relay once its lease ends, and publishing falls back to
the database outbox only when toot's Redis is unreachable. Each test prints one line of
counts (published, delivered, duplicated, lost); run with ``-s`` to see them.
"""

from __future__ import annotations

import threading

import pytest

from devtools.processes import wait_for
from tests.http_server import HTTPServer
from tests.topology import PREFIX, Topology, attempts, count, event_ids
from toot import queue
from toot.store import get_redis

CHANNEL = f"{PREFIX}users.deleted.v1"


@pytest.fixture
def topology(request, redis):
    topology = Topology(request.param["name"], **request.param.get("options", {}))
    try:
        topology.start()
        topology.register()
        yield topology
    finally:
        topology.stop(get_redis())


def receipts_of(topology, redis, sent):
    return lambda: count(sent, topology.receipts(redis))


def report(name, counts):
    print(f"\nFAULT {name}: " + " ".join(f"{key}={value}" for key, value in counts.items()))


def assert_no_dead_letters(topology):
    assert (
        topology.count_rows("publisher", "DeadLetter")
        == topology.count_rows("subscriber", "DeadLetter")
        == 0
    )


@pytest.mark.parametrize("topology", [{"name": "kill9"}], indirect=True)
def test_worker_killed_mid_delivery_loses_nothing(topology, redis):
    """kill -9 the publisher's worker while a subscriber holds a delivery open.

    The subscriber got that delivery's events, but the publisher never learns it did: they
    are sent again, and the subscriber's dedupe runs each handler once all the same.
    """
    held, release, lock = threading.Event(), threading.Event(), threading.Lock()

    def forward_then_hold_the_first(request):
        reply = topology.forward(request)
        with lock:
            first = not held.is_set()
            held.set()
        if first:
            release.wait(60)  # until the worker that asked is dead
        return reply

    with HTTPServer(forward_then_hold_the_first) as proxy:
        topology.unsubscribe(CHANNEL, topology.callback_url)
        topology.subscribe(CHANNEL, proxy.url, batch=True)  # as the example subscriber asks
        sent = topology.publish("users.deleted.v1", {"id": 1}, count=20)
        wait_for(held.is_set, 30, "a delivery to be in flight")

        topology.processes["publisher-worker"].kill()
        release.set()
        held_then = topology.pending("publisher", queue.OUT)
        # Time would end the dead drains' leases LEASE_SECONDS (60) after their last renewal.
        dead = topology.end_leases("publisher", queue.OUT)
        topology.start_worker("publisher", name="publisher-worker-2")

        counts = receipts_of(topology, redis, sent)
        wait_for(lambda: counts()["lost"] == 0, 30, "every event to reach the handler")
        wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")
    report("kill -9 worker mid-delivery", counts())
    assert dead
    assert held_then > 0  # the dead drain held at least the delivery in flight
    assert counts() == {"published": 20, "delivered": 20, "duplicated": 0, "lost": 0}
    forwarded = [i for r in proxy.requests for i in event_ids(r.body)]
    assert set(forwarded) == {event["id"] for event in sent}
    assert len(forwarded) > len(set(forwarded))  # the held delivery came again: deduped
    assert "already handled it, skipped" in topology.processes["subscriber-worker"].log()
    assert_no_dead_letters(topology)


@pytest.mark.parametrize(
    "topology", [{"name": "broker", "options": {"own_broker": True}}], indirect=True
)
def test_publish_while_the_broker_is_down_loses_nothing(topology, redis):
    """Only Celery's broker is down: events wait in toot's Redis queue, not the outbox."""
    topology.broker.kill()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=100)  # raises nothing
    assert len(sent) == 100
    assert topology.pending("publisher", queue.OUT) == 100
    assert topology.count_rows("publisher", "OutboxEvent") == 0

    topology.broker.start()
    counts = receipts_of(topology, redis, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("broker down while publishing", counts())
    assert counts() == {"published": 100, "delivered": 100, "duplicated": 0, "lost": 0}
    wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")


@pytest.mark.parametrize(
    "topology", [{"name": "store", "options": {"own_store": True}}], indirect=True
)
def test_publish_while_redis_is_down_loses_nothing(topology, redis):
    """toot's Redis (and so the broker, which shares it) is down: events wait in the outbox."""
    topology.store.kill()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=100)  # raises nothing
    assert len(sent) == 100
    assert topology.count_rows("publisher", "OutboxEvent") == 100

    topology.store.start()
    counts = receipts_of(topology, redis, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("Redis down while publishing", counts())
    assert counts() == {"published": 100, "delivered": 100, "duplicated": 0, "lost": 0}
    assert topology.count_rows("publisher", "OutboxEvent") == 0
    wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")


@pytest.mark.parametrize(
    "topology", [{"name": "down", "options": {"retry_schedule": "1,1,2,2,4,4,8,8"}}], indirect=True
)
def test_subscriber_down_for_a_while_gets_every_event_once(topology, redis):
    topology.processes["subscriber-web"].stop()
    sent_attempts = topology.log_from_now("publisher-worker")

    sent = topology.publish("users.updated.v1", {"id": 1}, count=200)

    def failed_thrice():
        return {
            i for a in attempts(sent_attempts()) if not a.ok and a.number == 3 for i in a.event_ids
        }

    # Several retry rounds: every event has failed its third attempt.
    ids = {event["id"] for event in sent}
    wait_for(lambda: failed_thrice() >= ids, 60, "three failed rounds")
    topology.start_web("subscriber")
    counts = receipts_of(topology, redis, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("subscriber down for three retry rounds", counts())
    assert counts() == {"published": 200, "delivered": 200, "duplicated": 0, "lost": 0}
    assert_no_dead_letters(topology)
