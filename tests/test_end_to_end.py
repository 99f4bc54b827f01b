"""The whole path through real processes: two gunicorn servers (publisher and subscriber
from example_project), a Celery worker for each, and a real Redis.

The example subscriber's handler records each event it runs for in a Redis list, which
these tests read; the publisher's worker logs every delivery attempt and the subscriber's
gunicorn every request, which they read too.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid

import pytest
import requests

from devtools.processes import wait_for
from tests.http_server import HTTPServer, Reply
from tests.topology import CALLBACK_ACCEPTED, PREFIX, Topology, attempts, count, event_ids

# The example project as real processes, with SQLite databases of their own.
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def topology():
    topology = Topology("e2e")
    try:
        topology.start()
        topology.registration_output = topology.register()
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def receipts(topology):
    topology.clear_receipts()
    return topology.receipts


@pytest.fixture
def unbatched(topology):
    """The example subscriber registered again with TOOT_BATCH=0; what the publisher logged."""
    publisher_log = topology.log_from_now("publisher-web")
    topology.register(TOOT_BATCH="0")
    yield publisher_log
    topology.register()


def traffic(topology):
    """Delivery attempts the publisher's worker logs, and callbacks the subscriber's
    gunicorn accepts, from now on."""
    sender = topology.log_from_now("publisher-worker")
    receiver = topology.log_from_now("subscriber-web")
    return lambda: attempts(sender()), lambda: receiver().count(CALLBACK_ACCEPTED)


def test_register_subscriptions_reaches_the_publisher(topology):
    for channel in ("users.updated.v1", "users.deleted.v1"):
        assert (
            f"{PREFIX}{channel} -> {topology.subscriptions_url}: created"
            in topology.registration_output
        )
        assert topology.subscriptions()[f"{PREFIX}{channel}"] == [topology.callback_url]
        # The example subscriber asks for batches (TOOT["BATCH"] defaults to true).
        assert (
            f"Subscription {topology.callback_url} to {PREFIX}{channel} added, in batches"
            in topology.processes["publisher-web"].log()
        )


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


def test_a_burst_of_events_arrives_in_batches_each_handled_once(topology, receipts):
    sent_attempts, accepted = traffic(topology)

    sent = topology.publish("users.updated.v1", {"id": 1}, count=200)

    ids = {event["id"] for event in sent}
    counts = lambda: count(sent, receipts())  # noqa: E731
    wait_for(lambda: counts()["delivered"] == 200, 60, "every event to reach the handler")
    delivered = lambda: [a for a in sent_attempts() if a.ok and ids & set(a.event_ids)]  # noqa: E731
    # The publisher logs a delivery once answered, the subscriber's gunicorn once it answered.
    wait_for(lambda: sum(len(a.event_ids) for a in delivered()) >= 200, 30, "the sender's log")
    wait_for(lambda: accepted() >= len(delivered()), 30, "the subscriber's access log")
    assert counts() == {"published": 200, "delivered": 200, "duplicated": 0, "lost": 0}
    assert sorted(i for a in delivered() for i in a.event_ids) == sorted(ids)
    assert all(a.url == topology.callback_url for a in delivered())
    # 200 events, each handled once, came in fewer requests: some carried several.
    assert accepted() == len(delivered()) < 200
    assert max(len(a.event_ids) for a in delivered()) > 1
    assert not [a for a in sent_attempts() if not a.ok and ids & set(a.event_ids)]


def test_a_subscriber_that_asks_for_no_batches_gets_one_event_per_request(
    topology, receipts, unbatched
):
    # No "batch" in its registration: the publisher turned batching off for its URL.
    subscription = f"Subscription {topology.callback_url} to {PREFIX}users.updated.v1"
    assert f"{subscription} already there\n" in unbatched()
    sent_attempts, accepted = traffic(topology)

    sent = topology.publish("users.updated.v1", {"id": 1}, count=50)

    ids = {event["id"] for event in sent}
    counts = lambda: count(sent, receipts())  # noqa: E731
    ours = lambda: [a for a in sent_attempts() if ids & set(a.event_ids)]  # noqa: E731
    wait_for(lambda: counts()["delivered"] == 50, 60, "every event to reach the handler")
    wait_for(lambda: len(ours()) >= 50, 30, "the sender's log")
    wait_for(lambda: accepted() >= 50, 30, "the subscriber's access log")
    assert counts() == {"published": 50, "delivered": 50, "duplicated": 0, "lost": 0}
    assert sorted(a.event_ids for a in ours()) == sorted((i,) for i in ids)
    assert all(a.ok and a.url == topology.callback_url for a in ours())
    assert accepted() == 50  # one request per event


def test_unsubscribe_header_removes_the_subscription(topology):
    channel = f"{PREFIX}nobody.listens.v1"
    topology.subscribe(channel, topology.callback_url)

    topology.publish("nobody.listens.v1", {"id": 1})

    wait_for(lambda: channel not in topology.subscriptions(), 30, "the subscription to be removed")


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_failed_delivery_is_retried_until_the_subscriber_answers_200(topology, receipts, batch):
    """The subscriber is reached through a proxy that answers 500 twice before passing through."""
    channel = f"{PREFIX}users.deleted.v1"

    def flaky_then_forward(request):
        if len(flaky.requests) <= 2:
            return Reply(status=500, body=b"down for maintenance")
        return topology.forward(request)

    with HTTPServer(flaky_then_forward) as flaky:
        topology.unsubscribe(channel, topology.callback_url)
        topology.subscribe(channel, flaky.url, batch=batch)
        try:
            [sent] = topology.publish("users.deleted.v1", {"id": 7})
            wait_for(receipts, 30, "the retried delivery to reach the handler")
        finally:
            topology.unsubscribe(channel, flaky.url)
            topology.subscribe(channel, topology.callback_url, batch=True)
    assert [event_ids(r.body) for r in flaky.requests] == [[sent["id"]]] * 3
    assert ("events" in flaky.requests[0].json()) is batch
    assert len({r.body for r in flaky.requests}) == 1  # retried as it was first sent
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


# Traces ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The example project with tracing on: each of its processes appends the spans it
    finishes to one file (example_project/tracing.py); returns the topology and a reader."""
    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    path.touch()
    topology = Topology("e2e-traces", env={"TOOT_TRACE_FILE": str(path)})
    try:
        topology.start()
        topology.register()
        yield topology, lambda: [json.loads(line) for line in path.read_text().splitlines()]
    finally:
        topology.stop()


def test_one_trace_runs_from_the_publisher_s_request_to_the_subscriber_s_handler(traced):
    topology, spans = traced
    code = (
        "from opentelemetry import trace\n"
        "import toot\n"
        "with trace.get_tracer('example').start_as_current_span('POST /orders'):\n"
        "    print(toot.publish('users.updated.v1', {'id': 7}).to_json())\n"
    )
    result = topology.manage("publisher", "shell", "-c", code)
    [sent] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    channel = f"{PREFIX}users.updated.v1"

    def of_the_event():
        return [
            span
            for span in spans()
            if span["attributes"].get("messaging.message.id") == sent["id"]
            or sent["id"] in span["attributes"].get("messaging.toot.event.ids", ())
        ]

    wait_for(
        lambda: any(span["name"] == f"process {channel}" for span in of_the_event()),
        30,
        "the handler's span",
    )
    wait_for(lambda: len(of_the_event()) >= 4, 30, "the delivery's span to end")
    by_name = {span["name"]: span for span in of_the_event()}
    publish, send = by_name[f"publish {channel}"], by_name[f"send {channel}"]
    receive, process = by_name[f"receive {channel}"], by_name[f"process {channel}"]
    [request] = [span for span in spans() if span["span_id"] == publish["parent_id"]]
    chain = [request, publish, send, receive, process]
    print(
        "\n".join(
            f"{s['service']:<10} {s['kind']:<8} {s['name']:<45} trace {s['trace_id']} "
            f"span {s['span_id']} parent {s['parent_id']}"
            for s in chain
        )
    )
    assert {span["trace_id"] for span in chain} == {request["trace_id"]}
    assert request["parent_id"] is None
    for parent, child in itertools.pairwise(chain):
        assert child["parent_id"] == parent["span_id"], child["name"]
    assert [s["service"] for s in chain] == ["publisher"] * 3 + ["subscriber"] * 2
    assert [s["kind"] for s in chain] == ["INTERNAL", "PRODUCER", "CLIENT", "SERVER", "CONSUMER"]
    # The example subscriber asks for batches: the delivery links its event's publish.
    assert send["links"] == [{"trace_id": publish["trace_id"], "span_id": publish["span_id"]}]
    assert send["attributes"]["url.full"] == topology.callback_url
    assert send["attributes"]["http.response.status_code"] == 200
    assert process["attributes"]["messaging.toot.handler"] == "example_app.handlers.user_updated"
    assert all(span["status"] != "ERROR" for span in chain)
    assert topology.receipts()[-1]["id"] == sent["id"]
