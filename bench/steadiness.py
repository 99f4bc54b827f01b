"""How steady the machine's CPUs are: a spinner's speed in short windows, on every core.

The host of a virtual machine may slow its CPUs for a while (other tenants, a quota). A
pipeline at half load then falls behind for that while and takes a moment to catch up:
it shows in the tail of paced latency, not in a plain POST, which has nothing queued
behind it. On the 2-core machine toot was measured on, both cores ran at 10-20 % of
their speed for about 100 ms every 1.5 s on some days, and not on others.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

WINDOW = 0.05  # seconds


def spin(core: int, seconds: float) -> list[int]:
    """Rounds of busy work done in each WINDOW, for ``seconds``, on ``core``."""
    os.sched_setaffinity(0, {core})
    counts: list[int] = []
    end = time.monotonic() + seconds
    while (started := time.monotonic()) < end:
        rounds = 0
        while time.monotonic() - started < WINDOW:
            for _ in range(1000):
                pass
            rounds += 1
        counts.append(rounds)
    return counts


def measure(seconds: float) -> dict[str, Any]:
    """Each core's speed per window, as a share of the fastest window seen on any core."""
    cores = sorted(os.sched_getaffinity(0))
    # Spawned, not forked: the benchmark process has threads and a Django project loaded.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(cores), mp_context=context) as pool:
        runs = list(pool.map(spin, cores, [seconds] * len(cores)))
    # Here, not at the top: the spawned spinners import this module, and need none of it.
    from bench.measure import percentile

    fastest = max(max(run) for run in runs)
    speeds = [count / fastest for run in runs for count in run]
    return {
        "cores": len(cores),
        "seconds": seconds,
        "window_ms": WINDOW * 1000,
        "median": percentile(speeds, 50),
        "p5": percentile(speeds, 5),
        "slowest": min(speeds),
        "under_half": sum(speed < 0.5 for speed in speeds) / len(speeds),
    }
