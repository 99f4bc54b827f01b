"""toot's Redis behind Redis Sentinel: the redis+sentinel:// URL, REDIS_WAIT_REPLICAS, and
a master killed while events stream through real processes (devtools.redis_sentinel: a
master, a replica and three sentinels on loopback)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.test import override_settings

import toot
from devtools.redis_sentinel import SentinelGroup
from tests.topology import Topology, running, stream_through_failover
from tests.utils import patch_toot
from toot.engine import connection, queue
from toot.engine.connection import NotReplicated, SentinelURL, parse_sentinel_url
from toot.models import OutboxEvent


@pytest.fixture(scope="module")
def group():
    group = SentinelGroup().start()
    yield group
    group.stop()


# The URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, parsed",
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster",
            SentinelURL([("10.0.0.1", 26379), ("10.0.0.2", 26380)], "mymaster"),
        ),
        (
            "redis+sentinel://:s%40cret@sentinel.example/mymaster/3",
            SentinelURL([("sentinel.example", 26379)], "mymaster", 3, None, "s@cret"),
        ),
        (
            "rediss+sentinel://app:pw@[::1]:26379/mymaster/0?sentinel_password=sp"
            "&ssl_ca_certs=/etc/ca.pem",
            SentinelURL(
                [("::1", 26379)],
                "mymaster",
                0,
                "app",
                "pw",
                True,
                {"password": "sp"},
                {"ssl_ca_certs": "/etc/ca.pem"},
            ),
        ),
    ],
)
def test_a_sentinel_url_names_the_sentinels_service_database_and_credentials(url, parsed):
    assert parse_sentinel_url(url) == parsed


@pytest.mark.parametrize(
    "url, error",
    [
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://10.0.0.1:26379", "names no service"),
        ("redis+sentinel://10.0.0.1:26379/", "names no service"),
        ("redis+sentinel://10.0.0.1:port/mymaster", "is not host:port"),
        ("redis+sentinel://10.0.0.1/mymaster/zero", "database must be a number"),
        ("redis+sentinel://10.0.0.1/mymaster?socket_timeout=1", "unknown option"),
    ],
)
def test_a_bad_sentinel_url_is_a_system_check_error_that_says_what_is_wrong(url, error):
    with pytest.raises(ValueError, match=error):
        parse_sentinel_url(url)
    with override_settings(TOOT={**settings.TOOT, "REDIS_URL": url}):
        [message] = [m for m in run_checks() if m.id == "toot.E005"]
    assert error in message.msg and "Sentinel URL" in message.msg


@pytest.mark.parametrize("value", [-1, 1.5, "1", True])
def test_redis_wait_replicas_must_be_a_whole_number(value):
    with override_settings(TOOT={**settings.TOOT, "REDIS_WAIT_REPLICAS": value}):
        [message] = [m for m in run_checks() if m.id == "toot.E002"]
    assert 'TOOT["REDIS_WAIT_REPLICAS"] must be a whole number' in message.msg


# A client of the group ------------------------------------------------------------------


def test_toots_client_follows_the_master_the_sentinels_name(group):
    client = connection.new_client(group.url, 2.0)
    key = f"{settings.TOOT['KEY_PREFIX']}sentinel-{uuid.uuid4().hex[:8]}"
    try:
        client.set(key, "kept")
        pool: Any = client.connection_pool  # a SentinelConnectionPool
        assert pool.get_master_address()[1] == group.master_port()
        assert client.get(key) == b"kept"
    finally:
        client.delete(key)
        client.close()


@pytest.fixture
def on_group(monkeypatch, group, no_drain_at_work):
    """toot's Redis is the group's, for every thread: no drain of the tests' worker may be
    at work, and the relay finds nothing under a KEY_PREFIX of the test's own."""
    prefix = f"{settings.TOOT['KEY_PREFIX']}{uuid.uuid4().hex[:8]}:"
    patch_toot(monkeypatch, REDIS_URL=group.url, KEY_PREFIX=prefix, REDIS_WAIT_TIMEOUT=0.2)
    yield connection.get_redis()
    keys = list(connection.get_redis().scan_iter(match=f"{prefix}*"))
    if keys:
        connection.get_redis().delete(*keys)


def test_a_push_waits_for_the_replica(on_group, monkeypatch):
    patch_toot(monkeypatch, REDIS_WAIT_REPLICAS=1)
    on_group.script_flush()  # as after a restart: the script is loaded, and the WAIT kept

    queue.push("sentinel-test", [{"event": {"n": 1}}])

    assert queue.depth("sentinel-test").ready == 1


def test_a_push_fewer_replicas_took_in_time_is_not_kept(on_group, monkeypatch):
    patch_toot(monkeypatch, REDIS_WAIT_REPLICAS=2)  # the group has one

    with pytest.raises(NotReplicated, match="1 of 2 replicas acknowledged the write"):
        queue.push("sentinel-test", [{"event": {"n": 1}}])
    with pytest.raises(NotReplicated):
        queue.push_many({"sentinel-test:a": ["{}"], "sentinel-test:b": ["{}"]})


@pytest.mark.django_db(transaction=True)
def test_publish_keeps_an_event_no_replica_took_in_the_outbox(on_group, monkeypatch):
    patch_toot(monkeypatch, REDIS_WAIT_REPLICAS=2)

    event = toot.publish("users.updated.v1", {"id": 1})

    assert [row.event["id"] for row in OutboxEvent.objects.all()] == [event.id]
    OutboxEvent.objects.all().delete()


def test_the_callbacks_endpoint_answers_503_for_an_event_no_replica_took(
    on_group, monkeypatch, client
):
    patch_toot(monkeypatch, REDIS_WAIT_REPLICAS=2)
    channel = f"users.{uuid.uuid4().hex[:8]}.v1"
    toot.subscribe("publisher", channel, lambda event: None)
    prefix = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]
    event = toot.Event(prefix + channel, {"id": 1}).to_dict()

    response = client.post("/toot/callbacks", json.dumps(event), content_type="application/json")

    assert response.status_code == 503  # the publisher sends it again
    assert "unavailable" in response.json()["error"]


# A failover while events stream through real processes -----------------------------------

EVENTS = 1000


@pytest.mark.failover
@pytest.mark.processes
@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_the_stream_goes_on_when_the_master_dies(redis, wait_replicas):
    """The publisher's toot Redis is the group (its Celery broker a Redis of its own): the
    master is killed once a third of the events are handled, with deliveries in flight;
    Sentinel promotes the replica, and every event is handled once. What a failover may
    lose (a write the replica never got) or send twice is counted and printed."""
    # One replica more than the publisher waits for: one is promoted, the other then
    # replicates the new master (with none left, every push would wait out its timeout).
    group = SentinelGroup(replicas=wait_replicas + 1).start()
    topology = Topology(f"sentinel{wait_replicas}", own_broker=True)
    topology.role_env["publisher"]["TOOT_REDIS_URL"] = group.url
    topology.role_env["publisher"]["TOOT_REDIS_WAIT_REPLICAS"] = str(wait_replicas)
    try:
        with running(topology):
            figures = stream_through_failover(
                topology, EVENTS, lambda: group.wait_for_failover(group.kill_master())
            )
            print(
                f"\nFAILOVER wait_replicas={wait_replicas}: "
                + " ".join(f"{key}={value}" for key, value in figures.items())
            )
            assert (figures["published"], figures["delivered"]) == (EVENTS, EVENTS)
            # Handled once each: a batch a drain held as Redis went is sent again (the
            # delivered_twice printed), and the subscriber's dedupe runs no handler twice.
            assert (figures["duplicated"], figures["lost"]) == (0, 0)
    finally:
        group.stop()
