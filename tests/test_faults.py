"""Faults reproduced for real on the example topology (issue: delivery that loses nothing).

Each test prints one line of counts (published, delivered, duplicated, lost); run with
``-s`` to see them.
"""

from __future__ import annotations

import threading

import pytest

from devtools.processes import wait_for
from tests.http_server import HTTPServer, Reply
from tests.topology import PREFIX, Topology, count
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


@pytest.mark.parametrize(
    "topology", [{"name": "kill9", "options": {"visibility_timeout": 5}}], indirect=True
)
def test_worker_killed_mid_delivery_loses_nothing(topology, redis):
    """kill -9 the publisher's worker while a subscriber holds a delivery open."""
    held, release = threading.Event(), threading.Event()

    def hold_first_then_forward(request):
        if not held.is_set():
            held.set()
            release.wait(60)
            return Reply(status=200)  # too late: the worker that asked is dead
        return topology.forward(request)

    with HTTPServer(hold_first_then_forward) as proxy:
        topology.unsubscribe(CHANNEL, topology.callback_url)
        topology.subscribe(CHANNEL, proxy.url)
        sent = topology.publish("users.deleted.v1", {"id": 1}, count=20)
        wait_for(held.is_set, 30, "a delivery to be in flight")

        topology.processes["publisher-worker"].kill()
        release.set()
        topology.start_worker("publisher", name="publisher-worker-2")

        counts = receipts_of(topology, redis, sent)
        wait_for(lambda: counts()["lost"] == 0, 90, "every event to reach the handler")
    report("kill -9 worker mid-delivery", counts())
    assert counts() == {"published": 20, "delivered": 20, "duplicated": 0, "lost": 0}
    assert (
        topology.count_rows("publisher", "DeadLetter")
        == topology.count_rows("subscriber", "DeadLetter")
        == 0
    )


@pytest.mark.parametrize(
    "topology", [{"name": "broker", "options": {"separate_broker": True}}], indirect=True
)
def test_publish_while_the_broker_is_down_loses_nothing(topology, redis):
    topology.broker.kill()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=100)  # raises nothing
    assert len(sent) == 100
    assert topology.count_rows("publisher", "OutboxEvent") == 100

    topology.start_broker()
    counts = receipts_of(topology, redis, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("broker down while publishing", counts())
    assert counts() == {"published": 100, "delivered": 100, "duplicated": 0, "lost": 0}
    assert topology.count_rows("publisher", "OutboxEvent") == 0


@pytest.mark.parametrize(
    "topology", [{"name": "down", "options": {"retry_schedule": "1,1,2,2,4,4,8,8"}}], indirect=True
)
def test_subscriber_down_for_a_while_gets_every_event_once(topology, redis):
    topology.processes["subscriber-web"].stop()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=200)
    worker = topology.processes["publisher-worker"]
    # Several retry rounds: every event has failed its third attempt.
    wait_for(lambda: worker.log().count("(attempt 3,") >= 200, 60, "three failed rounds")

    topology.start_web("subscriber")
    counts = receipts_of(topology, redis, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("subscriber down for three retry rounds", counts())
    assert counts() == {"published": 200, "delivered": 200, "duplicated": 0, "lost": 0}
    assert (
        topology.count_rows("publisher", "DeadLetter")
        == topology.count_rows("subscriber", "DeadLetter")
        == 0
    )
