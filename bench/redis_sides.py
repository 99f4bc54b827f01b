"""Whose keys Redis's commands touch: the publisher's, the subscriber's, Celery's broker's.

    python -m bench.redis_sides REDIS_URL PREFIX OUTPUT.json

The benchmark runs this beside itself with ``--redis-sides``. It reads Redis's MONITOR
feed, every command a client or a script runs as Redis runs it, sorts each by the keys it
names, and when stopped (SIGTERM) writes the calls by side and command to OUTPUT.json.
The benchmark's topology gives each side its own key prefix and Celery queue
(devtools/topology.py), which is what tells them apart: in production the two projects may
each have a Redis of their own, and this says what each would carry.

A command in a script that names no key (``TIME``) goes to the side of the script's own
``EVALSHA``, which MONITOR shows just before it. MONITOR costs Redis CPU for every command
it feeds: a run with it measures the shares, not Redis's CPU.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import redis

SIDES = ("publisher", "subscriber", "broker", "benchmark", "other")
# kombu's keys of its own, besides the queues named after each side's CELERY_QUEUE.
BROKER_KEYS = ("unacked", "_kombu.", "celery")


class Tally:
    """Calls by side and command, fed MONITOR's commands one at a time."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
        self._script_side = "other"

    def side_of(self, command: str) -> str | None:
        """The side whose keys ``command`` names, or None if it names none of them."""
        prefix = self.prefix
        if f"{prefix}:receipts" in command or f"{prefix}:noop:" in command:
            return "benchmark"
        if f"{prefix}-noop" in command:
            return "benchmark"
        if f"{prefix}:publisher:" in command:
            return "publisher"
        if f"{prefix}:subscriber:" in command:
            return "subscriber"
        if f"{prefix}-publisher" in command or f"{prefix}-subscriber" in command:
            return "broker"
        if any(key in command for key in BROKER_KEYS):
            return "broker"
        return None

    def add(self, command: str, in_script: bool) -> None:
        name = command.split(" ", 1)[0].lower()
        if name in ("info", "monitor"):  # the benchmark's reading of Redis
            return
        side = self.side_of(command)
        if not in_script:
            self._script_side = side or "other"
        elif side is None:
            side = self._script_side
        self.calls[side or "other"][name] += 1

    def result(self) -> dict[str, Any]:
        """Each side's calls by command, and its share of the calls that are not the
        benchmark's own."""
        counted = sum(sum(self.calls[side].values()) for side in SIDES if side != "benchmark")
        return {
            side: {
                "calls": sum(calls.values()),
                "share": sum(calls.values()) / counted if counted else 0.0,
                "by_command": dict(calls.most_common()),
            }
            for side, calls in self.calls.items()
        }


def stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    url, prefix, output = argv if argv is not None else sys.argv[1:]
    tally = Tally(prefix)
    signal.signal(signal.SIGTERM, stop)
    # No read timeout: the feed may be quiet for a while between the benchmark's parts.
    client = redis.Redis.from_url(url, socket_timeout=None)
    try:
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            print("monitoring", flush=True)  # the benchmark waits for this line
            for command in monitor.listen():
                tally.add(command["command"], command["client_type"] == "lua")
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        Path(output).write_text(json.dumps(tally.result(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
