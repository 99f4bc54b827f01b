"""The capacity model of docs/capacity.md, from the benchmark's own figures.

    python -m bench.capacity bench-results/<time>.json [more.json ...] [--utilisation U]

Reads the bursts of one or more benchmark runs (the median of each figure over the runs),
and for 1,000, 10,000 and 100,000 events a second at each mode and M that the runs
measured, prints the processes and cores each part needs, and the Redis calls and Redis
CPU, if every part's CPU per delivery stays as measured. A part runs at most
``--utilisation`` of each core it has (default 0.7), so that bursts and retries have room.

The parts, by the benchmark's process trees: the publisher's Celery workers (drains, fan
out and the sender threads that POST), the subscriber's gunicorn (receives each request),
the subscriber's Celery workers (the handlers), and the publisher's code that calls
``publish()`` (the benchmark's driver): it is per event, not per delivery. A Celery
prefork child or a gunicorn worker process is one core at most: each needed core is a
process. Redis runs commands on one core, whatever the machine has.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

RATES = (1_000, 10_000, 100_000)
# Benchmark process tree -> the part of a deployment it stands for.
PARTS = {
    "publisher-worker": "publisher workers",
    "subscriber-web": "subscriber web",
    "subscriber-worker": "subscriber workers",
}
CALLER = "driver (publish)"


def figures(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (mode, M): CPU ms per delivery of each part, of the caller per event, and Redis's
    calls and CPU per delivery; the median over the runs."""
    found: dict[tuple[str, int], list[dict[str, float]]] = {}
    for run in runs:
        for burst in run.get("bursts", []):
            cpu, redis = burst["cpu_ms_per_delivery"], burst.get("redis")
            if not redis or not burst["complete"]:
                continue
            found.setdefault((burst["mode"], burst["copies"]), []).append(
                {
                    **{part: cpu.get(name, 0.0) for name, part in PARTS.items()},
                    "publish() per event": cpu.get(CALLER, 0.0) * burst["copies"],
                    "redis calls": redis["calls_per_delivery"],
                    "redis cpu": redis["cpu_ms_per_delivery"],
                }
            )
    return {
        key: {name: statistics.median(value[name] for value in values) for name in values[0]}
        for key, values in sorted(found.items())
    }


def plan(
    measured: dict[str, float], events: int, copies: int, utilisation: float
) -> dict[str, Any]:
    """What ``events`` a second to ``copies`` URLs each need, at ``measured``'s figures."""
    deliveries = events * copies

    def cores(ms_per_second: float) -> float:
        return ms_per_second / 1000 / utilisation

    parts = {part: cores(deliveries * measured[part]) for part in PARTS.values()}
    caller = cores(events * measured["publish() per event"])
    redis_cores = deliveries * measured["redis cpu"] / 1000  # busy share of one core
    return {
        "events": events,
        "copies": copies,
        "deliveries": deliveries,
        "processes": {part: math.ceil(value) for part, value in parts.items()},
        "caller_cores": caller,
        "cores": sum(parts.values()) + caller,
        "redis_calls": deliveries * measured["redis calls"],
        "redis_core_share": redis_cores,
        # Redis at ``utilisation`` of its one core: how many such Redis the load needs.
        "redis_servers": math.ceil(redis_cores / utilisation),
    }


def table(runs: list[dict[str, Any]], utilisation: float) -> list[str]:
    measured = figures(runs)
    if not measured:
        return [
            "no complete burst with Redis counts in these results (a benchmark from "
            "before --workers counted none)"
        ]
    lines = ["Measured, per delivery (median over the runs): CPU ms by part; Redis calls and CPU"]
    lines.append(
        "  mode    M  publisher workers  subscriber web  subscriber workers  publish()/event"
        "  Redis calls  Redis CPU ms  deliveries/s per Redis core"
    )
    for (mode, copies), value in measured.items():
        limit = 1000 / value["redis cpu"] if value["redis cpu"] else math.inf
        lines.append(
            f"  {mode:<6} {copies:>2} {value['publisher workers']:>18.2f} "
            f"{value['subscriber web']:>15.2f} {value['subscriber workers']:>19.2f} "
            f"{value['publish() per event']:>16.2f} {value['redis calls']:>12.1f} "
            f"{value['redis cpu']:>13.3f} {limit:>28,.0f}"
        )
    lines.append("")
    lines.append(
        f"Needed, each part at {utilisation:.0%} of its cores: processes (one core each) and Redis"
    )
    lines.append(
        "  mode    M   events/s  deliveries/s  publisher workers  subscriber web  "
        "subscriber workers  publish() cores  cores  Redis calls/s  one Redis core  Redis"
    )
    for (mode, copies), value in measured.items():
        for events in RATES:
            need = plan(value, events, copies, utilisation)
            processes = need["processes"]
            lines.append(
                f"  {mode:<6} {copies:>2} {events:>10,} {need['deliveries']:>13,} "
                f"{processes['publisher workers']:>18,} {processes['subscriber web']:>15,} "
                f"{processes['subscriber workers']:>19,} {need['caller_cores']:>16.1f} "
                f"{need['cores']:>6,.0f} {need['redis_calls']:>14,.0f} "
                f"{need['redis_core_share']:>14.0%} {need['redis_servers']:>6,}"
            )
    lines.append(
        "  one Redis core: the share of one core Redis's commands take; Redis: how many "
        f"Redis at {utilisation:.0%} carry them"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.capacity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", nargs="+", type=Path, help="the benchmark's JSON files")
    parser.add_argument(
        "--utilisation",
        type=float,
        default=0.7,
        metavar="U",
        help="the share of each core a part may use (default 0.7)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        parser.error("--utilisation is a share of a core: over 0, at most 1")
    runs = [json.loads(path.read_text()) for path in args.results]
    for line in table(runs, args.utilisation):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
