"""The whole path through real processes: two gunicorn servers (publisher and subscriber
from example_project), a Celery worker for each, and a real Redis.

The example subscriber's handler records each event it runs for in a Redis list, which
these tests read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from django.conf import settings

from devtools.processes import ROOT, celery_worker, free_port, wait_for, web_server
from tests.http_server import HTTPServer, Reply

PREFIX = "org.example.publisher."


class Topology:
    def __init__(self) -> None:
        run = f"{settings.RUN_ID}-e2e"
        self.log_dir = Path(tempfile.mkdtemp(prefix="toot-e2e-"))
        self.publisher_port, self.subscriber_port = free_port(), free_port()
        self.publisher_url = f"http://127.0.0.1:{self.publisher_port}"
        self.subscriber_url = f"http://127.0.0.1:{self.subscriber_port}"
        self.callback_url = f"{self.subscriber_url}/toot/callbacks"
        self.subscriptions_url = f"{self.publisher_url}/toot/subscriptions"
        self.receipts_key = f"toot-test-{run}:receipts"
        self.key_prefix = f"toot-test-{run}:"
        self.queues = [f"toot-test-{run}-publisher", f"toot-test-{run}-subscriber"]
        common = {
            "TOOT_REDIS_URL": settings.REDIS_URL,
            "TOOT_KEY_PREFIX": self.key_prefix,
            "TOOT_RETRY_SCHEDULE": "0.2,0.5,1,1,1",
            "TOOT_CALLBACK_URL": self.callback_url,
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": self.subscriptions_url,
            "EXAMPLE_RECEIPTS_KEY": self.receipts_key,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        }
        self.publisher_env = {**common, "CELERY_QUEUE": self.queues[0]}
        self.subscriber_env = {**common, "CELERY_QUEUE": self.queues[1]}
        self.processes = []

    def start(self) -> None:
        pub, sub = "example_project.publisher", "example_project.subscriber"
        self.processes = [
            web_server("publisher-web", pub, self.publisher_port, self.publisher_env, log_dir=self.log_dir),
            web_server("subscriber-web", sub, self.subscriber_port, self.subscriber_env, log_dir=self.log_dir),
            celery_worker("publisher-worker", pub, self.publisher_env, log_dir=self.log_dir),
            celery_worker("subscriber-worker", sub, self.subscriber_env, log_dir=self.log_dir),
        ]

    def stop(self, redis) -> None:
        for process in self.processes:
            process.stop()
        keys = list(redis.scan_iter(match=f"{self.key_prefix}*", count=1000))
        redis.delete(*keys, *self.queues, self.receipts_key)

    def manage(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **(self.publisher_env if role == "publisher" else self.subscriber_env),
               "DJANGO_SETTINGS_MODULE": f"example_project.{role}"}
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT / "example_project", env=env,
            capture_output=True, text=True, timeout=60,
        )

    def publish(self, channel: str, payload) -> dict:
        """toot.publish() in a publisher process; the event's wire form."""
        code = f"import json, toot; print(toot.publish({channel!r}, {payload!r}).to_json())"
        result = self.manage("publisher", "shell", "-c", code)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def subscriptions(self) -> dict[str, list[str]]:
        response = requests.get(self.subscriptions_url, headers={"Accept": "application/json"}, timeout=5)
        response.raise_for_status()
        return response.json()["subscriptions"]

    def receipts(self, redis) -> list[dict]:
        return [json.loads(item) for item in redis.lrange(self.receipts_key, 0, -1)]

    def unsubscribe(self, channel: str, callback_url: str) -> None:
        response = requests.delete(self.subscriptions_url, params={"channel": channel, "callback_url": callback_url}, timeout=5)
        assert response.status_code == 204, response.text

    def subscribe(self, channel: str, callback_url: str) -> None:
        response = requests.post(self.subscriptions_url, json={"channel": channel, "callback_url": callback_url}, timeout=5)
        assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def topology():
    from toot.store import get_redis

    topology = Topology()
    try:
        topology.start()
        registered = topology.manage("subscriber", "toot_register_subscriptions")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        topology.registration_output = registered.stdout
        yield topology
    finally:
        topology.stop(get_redis())


@pytest.fixture
def receipts(topology, redis):
    redis.delete(topology.receipts_key)
    return lambda: topology.receipts(redis)


def test_register_subscriptions_reaches_the_publisher(topology):
    assert f"{PREFIX}users.updated.v1 -> {topology.subscriptions_url}: created" in topology.registration_output
    subscriptions = topology.subscriptions()
    assert subscriptions[f"{PREFIX}users.updated.v1"] == [topology.callback_url]
    assert subscriptions[f"{PREFIX}users.deleted.v1"] == [topology.callback_url]


def test_published_event_reaches_the_subscribers_handler(topology, receipts):
    sent = topology.publish("users.updated.v1", {"id": 123})

    wait_for(receipts, 30, "the handler to run")
    [receipt] = receipts()
    assert receipt["id"] == sent["id"]
    assert receipt["channel"] == f"{PREFIX}users.updated.v1"
    assert receipt["payload"] == {"id": 123}
    assert dt.datetime.fromisoformat(receipt["timestamp"]) == dt.datetime.fromisoformat(sent["timestamp"])


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
        forwarded = requests.post(topology.callback_url, data=request.body,
                                  headers={"Content-Type": "application/json"}, timeout=5)
        return Reply(status=forwarded.status_code)

    with HTTPServer(flaky_then_forward) as flaky:
        topology.unsubscribe(channel, topology.callback_url)
        topology.subscribe(channel, flaky.url)
        try:
            sent = topology.publish("users.deleted.v1", {"id": 7})
            wait_for(receipts, 30, "the retried delivery to reach the handler")
        finally:
            topology.unsubscribe(channel, flaky.url)
            topology.subscribe(channel, topology.callback_url)
    assert [r.json()["id"] for r in flaky.requests] == [sent["id"]] * 3
    assert [(r["id"], r["payload"]) for r in receipts()] == [(sent["id"], {"id": 7})]


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2015-10-23 11:50:09 -0500", dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=dt.timezone.utc)),
        ("2015-10-23T11:50:09.000-05:00", dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=dt.timezone.utc)),
    ],
    ids=["ruby", "iso8601"],
)
def test_ruby_publisher_timestamps_reach_the_handler_as_aware_datetimes(topology, receipts, timestamp, expected):
    event = {"id": f"ruby-{timestamp}", "timestamp": timestamp, "payload": {"id": 5},
             "channel": f"{PREFIX}users.updated.v1"}

    response = requests.post(topology.callback_url, json=event, timeout=5)

    assert response.status_code == 200
    wait_for(receipts, 30, "the handler to run")
    [receipt] = receipts()
    handled = dt.datetime.fromisoformat(receipt["timestamp"])
    assert handled.tzinfo is not None
    assert handled == expected
