"""The whole path through real processes: two gunicorn servers (publisher and subscriber
from example_project), a Celery worker for each, and a real Redis.

The example subscriber's handler records each event it runs for in a Redis list, which
these tests read.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import requests

from devtools.processes import wait_for
from tests.http_server import HTTPServer, Reply
from tests.topology import PREFIX, Topology


@pytest.fixture(scope="module")
def topology():
    from toot.store import get_redis

    topology = Topology("e2e")
    try:
        topology.start()
        topology.registration_output = topology.register()
        yield topology
    finally:
        topology.stop(get_redis())


@pytest.fixture
def receipts(topology, redis):
    redis.delete(topology.receipts_key)
    return lambda: topology.receipts(redis)


def test_register_subscriptions_reaches_the_publisher(topology):
    assert (
        f"{PREFIX}users.updated.v1 -> {topology.subscriptions_url}: created"
        in topology.registration_output
    )
    subscriptions = topology.subscriptions()
    assert subscriptions[f"{PREFIX}users.updated.v1"] == [topology.callback_url]
    assert subscriptions[f"{PREFIX}users.deleted.v1"] == [topology.callback_url]


def test_published_event_reaches_the_subscribers_handler(topology, receipts):
    [sent] = topology.publish("users.updated.v1", {"id": 123})

    wait_for(receipts, 30, "the handler to run")
    [receipt] = receipts()
    assert receipt["id"] == sent["id"]
    assert receipt["channel"] == f"{PREFIX}users.updated.v1"
    assert receipt["payload"] == {"id": 123, "n": 0}
    assert dt.datetime.fromisoformat(receipt["timestamp"]) == dt.datetime.fromisoformat(
        sent["timestamp"]
    )


def test_unsubscribe_header_removes_the_subscription(topology):
    channel = f"{PREFIX}nobody.listens.v1"
    topology.subscribe(channel, topology.callback_url)

    topology.publish("nobody.listens.v1", {"id": 1})

    wait_for(lambda: channel not in topology.subscriptions(), 30, "the subscription to be removed")


def test_failed_delivery_is_retried_until_the_subscriber_answers_200(topology, receipts):
    """The subscriber is reached through a proxy that answers 500 twice before passing through."""
    channel = f"{PREFIX}users.deleted.v1"

    def flaky_then_forward(request):
        if len(flaky.requests) <= 2:
            return Reply(status=500, body=b"down for maintenance")
        return topology.forward(request)

    with HTTPServer(flaky_then_forward) as flaky:
        topology.unsubscribe(channel, topology.callback_url)
        topology.subscribe(channel, flaky.url)
        try:
            [sent] = topology.publish("users.deleted.v1", {"id": 7})
            wait_for(receipts, 30, "the retried delivery to reach the handler")
        finally:
            topology.unsubscribe(channel, flaky.url)
            topology.subscribe(channel, topology.callback_url)
    assert [r.json()["id"] for r in flaky.requests] == [sent["id"]] * 3
    assert [(r["id"], r["payload"]) for r in receipts()] == [(sent["id"], {"id": 7, "n": 0})]


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2015-10-23 11:50:09 -0500", dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=dt.timezone.utc)),
        (
            "2015-10-23T11:50:09.000-05:00",
            dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=dt.timezone.utc),
        ),
    ],
    ids=["ruby", "iso8601"],
)
def test_ruby_publisher_timestamps_reach_the_handler_as_aware_datetimes(
    topology, receipts, timestamp, expected
):
    event = {
        "id": str(uuid.uuid4()),
        "timestamp": timestamp,
        "payload": {"id": 5},
        "channel": f"{PREFIX}users.updated.v1",
    }

    response = requests.post(topology.callback_url, json=event, timeout=5)

    assert response.status_code == 200
    wait_for(receipts, 30, "the handler to run")
    [receipt] = receipts()
    handled = dt.datetime.fromisoformat(receipt["timestamp"])
    assert handled.tzinfo is not None
    assert handled == expected
