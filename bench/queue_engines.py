"""toot's queue engine against Redis Streams with a consumer group, on one Redis.

    python -m bench.queue_engines [--events N] [--batch B] [--size BYTES]

The docs' architecture page weighs the two: Streams keep a pending list per consumer
and hand a dead consumer's entries to another (XAUTOCLAIM), which toot's claimed lists,
leases and Lua scripts do by hand. This measures the operations a drain's life is made
of, on a redis-server of its own:

- push: one item per call, as ``publish()`` and the callbacks view do. toot runs its
  real PUSH_SCRIPT (append, and decide whether a drain should start); Streams run a bare
  XADD, which decides nothing;
- claim and end: batches of ``--batch`` items until the queue is empty. toot runs its
  real CLAIM_SCRIPT (end the last batch, renew the lease, make due retries ready, claim
  the next batch into the drain's list); Streams run XREADGROUP, then XACK and XDEL of
  the batch (without XDEL, acknowledged entries stay in memory until trimmed);
- memory: Redis' used_memory per waiting item.

The Streams side does less than toot's (no lease, no drain start, no delayed retries):
it is the floor a Streams engine would start from.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from devtools.redis_server import start_redis
from toot.engine import queue as toot_queue


def item(size: int, n: int) -> str:
    event = {"id": str(uuid.uuid4()), "channel": "org.example.bench.v1", "n": n}
    event["payload"] = "x" * max(0, size - len(json.dumps(event)) - 13)
    return json.dumps({"event": event}, separators=(",", ":"))


def timed(run: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    done = run()
    return done, time.perf_counter() - started


class TootQueue:
    name = "toot lists + Lua"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        base = "bench:queue:{q}:"
        self.ready, self.delayed, self.leases = base + "ready", base + "delayed", base + "leases"
        self.claimed = base + "claimed:d1"
        self.push_script = client.register_script(toot_queue.PUSH_SCRIPT)
        self.claim_script = client.register_script(toot_queue.CLAIM_SCRIPT)

    def push(self, items: list[str]) -> int:
        for text in items:
            # MAX_DRAINS 4, lease 60 s, a new drain id: as queue.push_encoded sends it.
            self.push_script(
                keys=[self.ready, self.leases], args=[4, 60, toot_queue.new_id(), text]
            )
        return len(items)

    def drain(self, batch: int) -> int:
        self.client.zadd(self.leases, {"d1": time.time() + 600})
        done, first = 0, 1
        while True:
            claimed = self.claim_script(
                keys=[self.ready, self.delayed, self.leases, self.claimed],
                args=["d1", batch, 60, first],
            )
            first = 0
            if not claimed:
                return done
            done += len(claimed)


# XADD, then toot's own decision whether a drain should start, on the stream's length:
# what a Streams engine's push would still have to run. KEYS: stream, leases.
STREAM_PUSH_SCRIPT = (
    toot_queue.NOW
    + """
local live = redis.call('ZCOUNT', KEYS[2], now, '+inf')
redis.call('XADD', KEYS[1], '*', 'item', ARGV[4])
if live >= tonumber(ARGV[1]) then return false end
if live > 0 and redis.call('XLEN', KEYS[1]) <= live * 20 then return false end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
return ARGV[3]
"""
)


class StreamQueue:
    name = "Streams + group"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.stream = "bench:stream:{q}"
        client.xgroup_create(self.stream, "drains", id="0", mkstream=True)

    def push(self, items: list[str]) -> int:
        for text in items:
            self.client.xadd(self.stream, {"item": text})
        return len(items)

    def drain(self, batch: int) -> int:
        done = 0
        while True:
            reply: Any = self.client.xreadgroup("drains", "d1", {self.stream: ">"}, count=batch)
            if not reply:
                return done
            ids = [entry_id for entry_id, _ in reply[0][1]]
            with self.client.pipeline(transaction=True) as pipe:  # one round trip, as toot's
                pipe.xack(self.stream, "drains", *ids)
                pipe.xdel(self.stream, *ids)
                pipe.execute()
            done += len(ids)


class StreamQueueStarting(StreamQueue):
    """Streams whose push also decides whether a drain should start, as toot's does."""

    name = "Streams + Lua push"

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.leases = "bench:stream:{q}:leases"
        self.push_script = client.register_script(STREAM_PUSH_SCRIPT)

    def push(self, items: list[str]) -> int:
        for text in items:
            self.push_script(
                keys=[self.stream, self.leases], args=[4, 60, toot_queue.new_id(), text]
            )
        return len(items)


def measure(engine: TootQueue | StreamQueue, items: list[str], batch: int) -> dict[str, float]:
    client = engine.client
    before = client.info("memory")["used_memory"]
    pushed, push_seconds = timed(lambda: engine.push(items))
    waiting = client.info("memory")["used_memory"] - before
    drained, drain_seconds = timed(lambda: engine.drain(batch))
    assert pushed == drained == len(items), (pushed, drained)
    return {
        "push_per_s": pushed / push_seconds,
        "drain_per_s": drained / drain_seconds,
        "bytes_per_item": waiting / len(items),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=300, help="bytes of JSON per item")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    process, url = start_redis()
    try:
        client = redis.Redis.from_url(url)
        print(f"{args.events} items of {args.size} bytes, batches of {args.batch}, one client")
        print(f"{'engine':19} {'round':>5} {'push/s':>9} {'claim+end/s':>12} {'bytes/item':>11}")
        for round_ in range(1, args.rounds + 1):
            for engine_type in (TootQueue, StreamQueue, StreamQueueStarting):
                client.flushdb()
                engine = engine_type(client)
                items = [item(args.size, n) for n in range(args.events)]
                figures = measure(engine, items, args.batch)
                print(
                    f"{engine.name:19} {round_:>5} {figures['push_per_s']:>9,.0f} "
                    f"{figures['drain_per_s']:>12,.0f} {figures['bytes_per_item']:>11,.0f}"
                )
    finally:
        process.stop()


if __name__ == "__main__":
    main()
