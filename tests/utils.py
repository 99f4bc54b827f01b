"""Helpers several test modules share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.test import override_settings

from toot.conf import conf
from toot.engine import queue
from toot.publisher import store


def store_contents(redis: Any) -> dict[Any, Any]:
    """The subscription store: every channel's set of callback URLs, and the channel index.

    Only these sets: retries and handler marks that tasks of earlier tests still write
    share the namespace and are not the store.
    """
    keys = [*redis.scan_iter(match=store._channel_key("*"), count=1000), store._index_key()]
    return {key: redis.smembers(key) for key in keys}


def sources(options: dict[str, Any] | None = None, /, **urls: str) -> override_settings:
    """The tests' settings with ``options`` and a source per keyword, at that subscription URL.

    Each source ``name`` has the channel prefix ``org.example.<name>.``.
    """
    return override_settings(
        TOOT={
            **settings.TOOT,
            **(options or {}),
            "SOURCES": {
                name: {"SUBSCRIPTION_URL": url, "CHANNEL_PREFIX": f"org.example.{name}."}
                for name, url in urls.items()
            },
        }
    )


def callback_urls(channel: str) -> list[str]:
    """The callback URLs subscribed to ``channel``, as the publisher's drain finds them."""
    from toot.publisher import store

    return [url for url, _batch in store.subscribers([channel])[channel]]


def unreachable_redis() -> Any:
    """A TOOT["REDIS_CONNECTION"] of Redis being down: a client of a port nobody serves."""
    import redis

    from devtools.processes import free_port

    return redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")


def toot_settings(**options: Any) -> override_settings:
    """The tests' settings with these TOOT keys changed."""
    return override_settings(TOOT={**settings.TOOT, **options})


def redis_down() -> override_settings:
    """The tests' settings with toot's Redis unreachable."""
    return toot_settings(REDIS_CONNECTION="tests.utils.unreachable_redis")


def redis_now(redis: Any) -> float:
    """Redis' own clock, which toot's queues run on."""
    seconds, microseconds = redis.time()
    return float(seconds + microseconds / 1_000_000)


def live_leases(redis: Any, name: str) -> list[str]:
    """The drain ids holding a live lease on queue ``name``."""
    from toot.engine import queue

    leases = redis.zrangebyscore(queue._keys(name)[2], redis_now(redis), "+inf")
    return sorted(lease.decode() for lease in leases)


def expire(redis: Any, name: str, drain_id: str) -> None:
    """End a drain's lease now, as time does for a drain that died: its score in the past."""
    from toot.engine import queue

    redis.zadd(queue._keys(name)[2], {drain_id: redis_now(redis) - 1})


def patch_toot(monkeypatch: Any, **options: Any) -> None:
    """The tests' settings with these TOOT keys changed until the test ends, for every
    thread (the in-process worker's drains read them as they start)."""
    monkeypatch.setattr(settings, "TOOT", {**settings.TOOT, **options})
    conf.forget()  # Django says nothing of a monkeypatched setting; the tests' fixture
    # forgets the patched values as the test ends (tests/conftest.py)


def spy_pushes(monkeypatch: Any, name: str) -> list[dict[str, Any]]:
    """The events pushed onto queue ``name`` or its lanes from now on, as pushed, each once
    per push however many lanes it went to.

    A spy, not a stand-in: every push still goes to Redis, and is recorded once it did.
    """
    import json

    from toot.engine import queue

    events: list[dict[str, Any]] = []
    real_push, real_push_many = queue.push_encoded, queue.push_many

    def push_encoded(queue_name: str, items: Any) -> str | None:
        drain_id = real_push(queue_name, items)
        if queue_name == name:
            events.extend(json.loads(item)["event"] for item in items)
        return drain_id

    def push_many(pushes: Any) -> dict[str, str | None]:
        drains = real_push_many(pushes)
        pushed: dict[str, dict[str, Any]] = {}
        for queue_name, items in pushes.items():
            if queue.kind(queue_name) == name:
                for item in map(json.loads, items):
                    pushed.setdefault(item["event"]["id"], item["event"])
        events.extend(pushed.values())
        return drains

    monkeypatch.setattr(queue, "push_encoded", push_encoded)
    monkeypatch.setattr(queue, "push_many", push_many)
    return events


def addrinfo(addresses: list[str], port: Any) -> list[tuple[Any, ...]]:
    """What socket.getaddrinfo answers for ``addresses``: the stand-in resolvers' reply."""
    import socket

    return [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
        if ":" in address
        else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
        for address in addresses
    ]


class WatchedLease(queue.Lease):
    """A drain's lease, as a processor gets it, that calls ``watch`` instead of renewing.

    Its id names no live lease: claims taken under it are a dead drain's to any other run.
    """

    def __init__(self, watch: Callable[[], object] = lambda: None, name: str = queue.IN) -> None:
        super().__init__(name, f"test-drain-{queue.new_id()}")
        self.watch = watch

    def keep_alive(self) -> None:
        self.watch()


# The host id under which tests send the publisher's lanes in their own thread.
TEST_SENDER = "test-sender"


def send_due(keep_alive: Callable[[], None] = lambda: None) -> list[tuple[Any, float]]:
    """Send what the publisher's lanes have due, as a sender thread does, in the test's
    thread: claim after claim (each ending the one before) under ``TEST_SENDER`` until
    nothing is due. Returns the retries the claims scheduled, (item as JSON, delay), taken
    back out of the lanes' ``delayed:<url>`` ZSETs, where each must have been: the test decides
    when they are sent again (``sending.process`` of the items)."""
    import json

    from toot.engine.connection import get_redis
    from toot.publisher import lanes, sending

    lanes.renew(TEST_SENDER)
    retries: list[tuple[Any, float]] = []
    ended: lanes.Claim | None = None
    while True:
        reply = lanes.claim(TEST_SENDER, queue.new_id(), ended)
        assert reply is not None, "the test sender's lease ended"
        ended = reply.claim
        if ended is None:
            break
        sending.send_claim(ended, keep_alive)
        retries += ended.retries
    client = get_redis()
    for item, _ in retries:
        delayed = lanes.base() + "delayed:" + item["delivery"]["url"]
        assert client.zrem(delayed, queue.encode(item)) == 1, "a retry not scheduled"
        if not client.exists(delayed):
            client.zrem(lanes.base() + "delayed", item["delivery"]["url"])
    return [(json.loads(queue.encode(item)), delay) for item, delay in retries]


def relaying_lanes() -> Any:
    """The tests' worker relay (conftest) with the publisher's lanes step too, as a
    project's worker runs it (toot.apps): retries due after a drain ended are sent."""
    import contextlib

    from toot.engine import relay
    from toot.publisher import sending

    @contextlib.contextmanager
    def relaying() -> Any:
        running = relay._relay
        steps = [] if running is None else running.steps
        added = sending.relay_step not in steps and running is not None
        if added:
            steps.append(sending.relay_step)
        try:
            yield
        finally:
            if added:
                steps.remove(sending.relay_step)

    return relaying()


def retry_item(url: str, channel: str, n: int = 1) -> dict[str, Any]:
    """A delivery's retry as the lanes keep it: one event, attempted once."""
    from toot.protocol.events import Event

    event = Event(channel, {"n": n}).to_dict()
    return {
        "delivery": {
            "url": url,
            "events": [event],
            "batch": False,
            "id": event["id"],
            "attempts": 1,
            "first_attempt_at": None,
        }
    }
