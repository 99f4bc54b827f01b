"""One slow handler holds back only its own events (issue 15), on real processes.

The example topology's subscriber runs ``tests.slow_handler.settings``: the example's
fast handler on users.updated.v1, and beside it a handler on reports.requested.v1 that
takes a second per event. Each handler has its own lane of the in queue, drained apart;
when the slow handler's load outgrows the workers, ``subscribe(..., queue=...)`` gives its
drains a Celery queue and a worker of their own. The fast handler's latency is from
``publish()`` (the payload's ``sent_at``) to the handler's receipt; each test prints its
figures (run with ``-s``).
"""

from __future__ import annotations

import math

import pytest

from devtools.processes import wait_for
from tests.slow_handler import CHANNEL as SLOW
from tests.topology import PREFIX, Topology, running

pytestmark = [pytest.mark.isolation, pytest.mark.processes]

FAST = "users.updated.v1"
FAST_RATE = 20.0  # events per second
SECONDS = 10.0  # of publishing, per measurement
P99_MS = 100.0


def with_slow_handler(name: str) -> Topology:
    topology = Topology(name, env={"SLOW_HANDLER_SECONDS": "1.0"})
    topology.settings_modules["subscriber"] = "tests.slow_handler.settings"
    return topology


@pytest.fixture
def topology(redis):
    with running(with_slow_handler("lanes")) as topology:
        yield topology


@pytest.fixture
def routed(redis):
    """The slow handler's drains on a Celery queue of their own, and a worker for it."""
    topology = with_slow_handler("routed")
    slow_queue = f"{topology.prefix}-slow"
    topology.role_env["subscriber"]["SLOW_HANDLER_QUEUE"] = slow_queue
    try:
        topology.start()
        topology.start_queue_worker("subscriber", "subscriber-slow-worker", slow_queue)
        topology.register()
        yield topology
    finally:
        topology.stop()


def publish_paced(topology: Topology, rates: dict[str, float]) -> None:
    """Publish on each channel at its rate (events per second) for SECONDS, in one
    publisher process; each payload carries its ``sent_at``."""
    code = (
        "import time, toot\n"
        f"plan = sorted((n / rate, channel) for channel, rate in {rates!r}.items()"
        f" for n in range(int(rate * {SECONDS})))\n"
        "start = time.monotonic()\n"
        "for at, channel in plan:\n"
        "    time.sleep(max(0.0, start + at - time.monotonic()))\n"
        "    toot.publish(channel, {'sent_at': time.time()})\n"
    )
    topology.manage("publisher", "shell", "-c", code)


def fast_latencies(topology: Topology, rates: dict[str, float]) -> list[float]:
    """Publish at ``rates``; the fast handler's latency (ms) for each of its events."""
    topology.clear_receipts()
    publish_paced(topology, rates)
    expected = int(rates[FAST] * SECONDS)

    def fast():
        return [r for r in topology.receipts() if r["channel"] == PREFIX + FAST]

    wait_for(lambda: len(fast()) >= expected, 60, f"the fast handler to run {expected} times")
    return sorted((r["received_at"] - r["payload"]["sent_at"]) * 1000 for r in fast())


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def report(what: str, latencies: list[float]) -> tuple[float, float]:
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(
        f"\nLANES fast handler {what}: {len(latencies)} events at {FAST_RATE:g}/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
    )
    return p50, p99


def warm_up(topology: Topology) -> None:
    """One event on each channel through every process, so that no first-call cost counts."""
    topology.publish(FAST, {})
    topology.publish(SLOW, {})
    wait_for(lambda: topology.receipt_count() >= 2, 60, "both handlers to run once")


def test_a_slow_handler_does_not_hold_back_a_fast_one(topology):
    """The fast handler at 20/s, alone and then beside the slow one (1 s per event, 1/s)."""
    warm_up(topology)
    _, alone = report("alone", fast_latencies(topology, {FAST: FAST_RATE}))
    _, beside = report(
        "beside a 1-s handler at 1/s", fast_latencies(topology, {FAST: FAST_RATE, SLOW: 1.0})
    )
    slow = [r for r in topology.receipts() if r["channel"] == PREFIX + SLOW]
    assert slow, "the slow handler ran meanwhile"
    assert alone < P99_MS
    assert beside < P99_MS


def test_a_slow_handler_over_capacity_routed_to_its_own_queue_holds_back_nothing(routed):
    """The slow handler at 5/s, more than the workers can run, on its own Celery queue."""
    warm_up(routed)
    _, p99 = report(
        "beside a 1-s handler at 5/s, routed to its own queue",
        fast_latencies(routed, {FAST: FAST_RATE, SLOW: 5.0}),
    )
    pids = {
        channel: {r["pid"] for r in routed.receipts() if r["channel"] == PREFIX + channel}
        for channel in (FAST, SLOW)
    }
    assert pids[SLOW] and not pids[SLOW] & pids[FAST]  # the slow worker's processes ran it
    assert p99 < P99_MS
