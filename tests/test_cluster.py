"""toot's Redis on a Redis Cluster: the redis+cluster:// URL, every script's keys in one
slot while a project's queues spread over the masters, the deploy checks of each master,
and a master killed while events stream through real processes (devtools.redis_cluster:
three masters, a replica each, on loopback).

The end-to-end tests also run on a cluster: .ci/run's Cluster pass.
"""

from __future__ import annotations

import os
import shutil

import pytest
from django.core.checks import run_checks
from redis.cluster import RedisCluster
from redis.crc import key_slot

from devtools.redis_cluster import Cluster
from tests.topology import Topology, running, stream_through_failover
from tests.utils import WatchedLease, toot_settings
from toot import status
from toot.conf import conf
from toot.engine import queue, redis_config
from toot.engine.connection import ClusterURL, get_redis, parse_cluster_url
from toot.protocol.events import Event
from toot.publisher import lanes, store
from toot.subscriber import handling
from toot.subscriber.handling import handler_name
from toot.subscriber.registry import subscribe

CHANNEL = "org.example.publisher.users.updated.v1"


def new_cluster() -> Cluster:
    """A cluster of its own; skipped where redis-cli is missing, unless .ci/run says not to."""
    if shutil.which("redis-cli") is None and not os.environ.get("TOOT_REQUIRE_CLUSTER"):
        pytest.skip("redis-cli creates the cluster: install redis-tools (Debian) or redis")
    return Cluster().start()


@pytest.fixture(scope="module")
def cluster():
    cluster = new_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def on_cluster(cluster, fresh_clients):
    """toot's Redis is the cluster for the test; its keys are removed afterwards."""
    with toot_settings(REDIS_URL=cluster.url):
        client = get_redis()
        assert isinstance(client, RedisCluster)
        yield client
        keys = list(client.scan_iter(match=f"{conf.KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)


# The URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, parsed",
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2",
            ClusterURL([("10.0.0.1", 7000), ("10.0.0.2", 6379)]),
        ),
        (
            "rediss+cluster://app:s%40cret@[::1]:7000/0?ssl_ca_certs=/etc/ca.pem",
            ClusterURL([("::1", 7000)], "app", "s@cret", True, {"ssl_ca_certs": "/etc/ca.pem"}),
        ),
    ],
)
def test_a_cluster_url_names_the_nodes_and_credentials(url, parsed):
    assert parse_cluster_url(url) == parsed


@pytest.mark.parametrize(
    "url, error",
    [
        ("redis+cluster:///", "it names no node (host:port, comma-separated)"),
        ("redis+cluster://10.0.0.1:7000/1", "a Redis Cluster has database 0 only, not '1'"),
        ("redis+cluster://10.0.0.1:port", "'10.0.0.1:port' is not host:port"),
        ("redis+cluster://10.0.0.1?db=2", "unknown option 'db'"),
    ],
)
def test_a_bad_cluster_url_is_a_system_check_error_that_says_what_is_wrong(url, error):
    with toot_settings(REDIS_URL=url):
        [message] = [m for m in run_checks() if m.id == "toot.E005"]
    assert message.msg == f'TOOT["REDIS_URL"] is not a Redis Cluster URL toot can use: {error}.'


def test_wait_for_replicas_is_refused_on_a_cluster():
    with toot_settings(REDIS_URL="redis+cluster://10.0.0.1:7000", REDIS_WAIT_REPLICAS=1):
        [message] = [m for m in run_checks() if m.id == "toot.E005"]
    assert "not with Redis Cluster" in message.msg
    assert message.hint == 'Set TOOT["REDIS_WAIT_REPLICAS"] to 0.'


# Keys and scripts on a real cluster ---------------------------------------------------


def test_the_subscription_store_runs_on_a_cluster(on_cluster):
    assert store.add(CHANNEL, "http://a.example/cb", batch=True) is True
    assert store.add(CHANNEL + ".other", "http://b.example/cb") is True

    assert store.every() == [
        (CHANNEL, "http://a.example/cb", True),
        (CHANNEL + ".other", "http://b.example/cb", False),
    ]
    assert store.subscribers([CHANNEL]) == {CHANNEL: [("http://a.example/cb", True)]}
    assert store.remove(CHANNEL, "http://a.example/cb") is True
    assert store.subscriptions() == {CHANNEL + ".other": ["http://b.example/cb"]}


def test_a_queue_runs_on_a_cluster(on_cluster):
    name = f"test-{queue.new_id()}"
    drain = queue.push(name, [{"n": 1}, {"n": 2}])
    assert drain is not None

    assert queue.claim(name, drain, 1, first=True) == [{"n": 1}]
    assert queue.claim(name, drain, 10, [({"n": 1}, 60)]) == [{"n": 2}]
    assert queue.retry_now(name) == 1
    queue.abandon(name, drain, 0)
    assert queue.wake(name) is not None  # the abandoned item and the retry, ready again
    assert queue.pending(name) == 2


def test_handlers_in_several_slots_are_claimed_in_one_round_trip(on_cluster):
    """Each handler's claims are in its lane's slot: a run of several handlers is a script
    per slot, pipelined; the heartbeat holds claims of several slots."""
    ran: list[str] = []
    seen: list[int] = []

    def first(event: Event) -> None:
        ran.append("first")

    def second(event: Event) -> None:
        ran.append("second")
        handling.heartbeat().beat()  # holds the claims of both handlers' slots
        seen.append(len({key_slot(claim.encode()) for claim in claims(event)}))

    def claims(event: Event) -> list[str]:
        return [handling._claim_key(event, handler_name(h)) for h in (first, second)]

    subscribe("publisher", "users.updated.v1", first)
    subscribe("publisher", "users.updated.v1", second)
    event = Event(CHANNEL, {"id": 1})

    assert handling.run_many([(event, None)], WatchedLease()) == [{}]
    assert handling.run_many([(event, None)], WatchedLease()) == [{}]  # done: deduped

    assert ran == ["first", "second"]
    assert seen == [2]  # two slots (the test fails if the two ever hash alike)
    assert handling.minutes(1)[1][-1]["handled"] == 2


def test_a_projects_queues_spread_over_the_masters_each_queue_in_one_slot(cluster, on_cluster):
    names = [f"handler_{n}" for n in range(12)]
    slots = {}
    for name in names:
        lane = handling.lane(name)
        event = Event(CHANNEL, {"id": 1})
        keys = [
            *queue._keys(lane),
            queue.claimed_key(lane, "drain"),
            handling._done_key(event, name),
            handling._claim_key(event, name),
        ]
        [slots[name]] = {key_slot(key.encode()) for key in keys}  # one slot per lane

    publisher = [queue._keys(queue.OUT)[0], lanes.base() + "due", store._index_key()]
    assert len({key_slot(key.encode()) for key in publisher}) == 1
    masters = {on_cluster.nodes_manager.get_node_from_slot(slot).name for slot in slots.values()}
    assert len(masters) >= 2  # twelve lanes on one of three masters: (1/3)**11


def test_the_lanes_index_and_records_run_on_a_cluster(on_cluster):
    lanes.set_rate("http://a.example/cb", 5.0)

    assert lanes.index(every=True) == ([], None)
    [record] = lanes.records(["http://a.example/cb"])
    assert (record.url, record.rate, record.waiting) == ("http://a.example/cb", 5.0, 0)
    assert status.retry_now(every=True) == 0


def test_the_deploy_checks_look_at_every_master(cluster, on_cluster):
    findings = redis_config.inspect()

    unpersisted = [f.message for f in findings if f.id == redis_config.NO_PERSISTENCE]
    assert len(unpersisted) == 3  # the test cluster persists nothing, on each master
    for port in cluster.masters_ports():
        assert sum(f", master 127.0.0.1:{port})" in message for message in unpersisted) == 1


# A master failover while events stream through real processes --------------------------

EVENTS = 1000


@pytest.mark.failover
@pytest.mark.processes
def test_the_stream_goes_on_when_a_master_dies(redis):
    """The publisher's toot Redis is the cluster (its Celery broker and the subscriber on
    Redis of their own): the master that serves its queue's and lanes' slot is killed
    once a third of the events are handled, with deliveries in flight; its replica takes
    over, and every event is handled once. What the failover loses (a write the replica
    never got) or sends twice, and the longest pause in the stream, are printed."""
    cluster = new_cluster()
    topology = Topology("cluster", own_broker=True)
    topology.role_env["publisher"]["TOOT_REDIS_URL"] = cluster.url
    prefix = topology.key_prefixes["publisher"]
    try:
        with running(topology):
            figures = stream_through_failover(
                topology,
                EVENTS,
                lambda: cluster.wait_for_failover(
                    cluster.kill_master_of(f"{prefix}queue:{{{prefix}out}}:ready")
                ),
            )
            print("\nCLUSTER FAILOVER: " + " ".join(f"{k}={v}" for k, v in figures.items()))
            assert (figures["published"], figures["delivered"]) == (EVENTS, EVENTS)
            # Handled once each: a batch a drain held as Redis went is sent again (the
            # delivered_twice printed), and the subscriber's dedupe runs no handler twice.
            assert (figures["duplicated"], figures["lost"]) == (0, 0)
    finally:
        cluster.stop()
