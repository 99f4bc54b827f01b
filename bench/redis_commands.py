"""What a burst asks of Redis: the commands it ran, by name, and Redis's own CPU.

Read from Redis itself, INFO before and after the burst: ``commandstats`` (calls by
command) and ``cpu`` (``used_cpu_sys`` + ``used_cpu_user``, every thread of redis-server).
Redis counts a command that a Lua script calls as it counts one from a client, and the
script's EVALSHA besides: toot's scripts' TIME, ZADD, HSET and the like are in the counts.

The counts take in every client of that Redis. The benchmark's own are taken out: the
LLEN by which it polls the receipts list, the RPUSH of the example handler's receipt (one
per handler run) and the INFO that reads the counters. Everything else is toot's,
Celery's (the broker: toot's tasks go through it) and redis-py's, including what the
workers do whether or not events come (their idle polls), shared among the burst's events.
On a shared Redis (``$TOOT_REDIS_URL``) other work counts too, and the figures say nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

# Not the pipeline's: the benchmark's reading of the counters.
IGNORED = ("info",)


@dataclass
class Snapshot:
    calls: dict[str, int]  # by command, lower case, as commandstats names it
    cpu_seconds: float  # used_cpu_sys + used_cpu_user, every thread of redis-server


def snapshot(client: redis.Redis) -> Snapshot:
    stats: dict[str, Any] = client.info("commandstats")
    calls = {
        # redis-py keys them cmdstat_<name>; a subcommand is <name>|<sub> on Redis 7.
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in stats.items()
        if key.startswith("cmdstat_")
    }
    cpu = client.info("cpu")
    return Snapshot(calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))


def delta(
    before: Snapshot,
    after: Snapshot,
    *,
    events: int,
    deliveries: int,
    polls: int,
    receipts: int,
) -> dict[str, Any]:
    """The burst's commands and Redis CPU, less the benchmark's own, per event and per
    delivery. ``polls``: the LLENs of the receipts list; ``receipts``: the handler runs,
    each an RPUSH."""
    own = {"llen": polls, "rpush": receipts}
    calls: dict[str, int] = {}
    for name, count in after.calls.items():
        if name in IGNORED:
            continue
        ran = count - before.calls.get(name, 0) - own.get(name, 0)
        if ran > 0:
            calls[name] = ran
    cpu_ms = (after.cpu_seconds - before.cpu_seconds) * 1000
    total = sum(calls.values())
    ranked = dict(sorted(calls.items(), key=lambda item: (-item[1], item[0])))
    return {
        "calls": ranked,
        "by_command_per_event": {name: count / events for name, count in ranked.items()},
        "by_command_per_delivery": {name: count / deliveries for name, count in ranked.items()},
        "calls_total": total,
        "calls_per_event": total / events,
        "calls_per_delivery": total / deliveries,
        "cpu_ms": cpu_ms,
        "cpu_ms_per_event": cpu_ms / events,
        "cpu_ms_per_delivery": cpu_ms / deliveries,
        # What one Redis core did per command here: the base of docs/capacity.md's limit.
        "cpu_us_per_call": cpu_ms * 1000 / total if total else None,
        "excluded": {"llen (receipt polls)": polls, "rpush (handler receipts)": receipts},
    }


def idle(before: Snapshot, after: Snapshot, seconds: float) -> dict[str, Any]:
    """What Redis does a second while no event comes: the workers' polls (Celery's broker,
    toot's drains, relay and retries), which a burst's counts hold too, over its seconds."""
    calls = {
        name: count - before.calls.get(name, 0)
        for name, count in after.calls.items()
        if name not in IGNORED and count > before.calls.get(name, 0)
    }
    return {
        "seconds": seconds,
        "calls": dict(sorted(calls.items(), key=lambda item: (-item[1], item[0]))),
        "calls_per_s": sum(calls.values()) / seconds,
        "cpu_ms_per_s": (after.cpu_seconds - before.cpu_seconds) * 1000 / seconds,
    }
