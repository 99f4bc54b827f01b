"""Many workers, many hosts (issue 19 part 3): 20,000 events to five callback URLs through
three Celery workers per side, while one worker per side is killed with ``-9`` and another
is stopped gracefully.

Five callback URLs must stand for five subscribers, each running its handler once per
event; with one handler, toot's dedupe by (event id, handler) would hide a URL that never
got an event. So the subscriber is the benchmark's (``bench/subscriber/``): the example
subscriber with five copies of its callback URL (``.../toot/callbacks`` and
``?copy=1`` to ``?copy=4``) and a receipt handler per copy, each delivery queued for its
copy's handler only. A receipt ``(event id, copy)`` is then proof that the event reached
that URL, and two receipts of one pair are a handler run twice: the test counts both by
(event id, copy), with one subscriber project and no other server. Every URL asks for
batches (docs/protocol.md section 7), as the example subscriber does: with one URL of the
five taking single events instead, the stream took 284 s where it took 145 to 180 s.

Deliveries (events the subscriber's endpoint accepted, a redelivery counted again) come
from toot's metrics, ``toot_events_received_total`` of the subscriber's web and
``toot_events_delivered_total`` of the publisher's workers (docs/metrics.md).

The kills come while events stream: on the publisher once its subscriber has received a
fifth of the deliveries (kill -9) and a half (SIGTERM), on the subscriber once a fifth and
a half of the handler runs are done; each time the worker chosen is one running a drain
(its log shows a ``toot.drain`` received and not yet finished). What a killed worker held
waits for its lease (10 s here); a worker stopped with SIGTERM finishes its drains first
(docs/deployment.md). Only a handler running at the kill -9 may run twice, one per process
of the killed worker's pool (docs/architecture.md, "Handler dedupe").

``TOOT_SCALE_EVENTS`` sets another number of events. The test prints one line of figures;
run it with ``-s`` to see it. It took three to four and a half minutes on two cores shared
with other test runs, 145 to 180 s of them from the first ``publish()`` to the last
handler (docs/deployment.md): it is marked ``scale``, which the database passes of
.ci/run leave out.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from bench.subscriber import CHANNEL as COPIES_CHANNEL
from devtools.processes import WORKER_READY, wait_for
from tests.topology import PREFIX, Scrape, Topology
from toot.engine import queue
from toot.subscriber import handling

pytestmark = [pytest.mark.scale, pytest.mark.processes]

EVENTS = int(os.environ.get("TOOT_SCALE_EVENTS", "20000"))
URLS = 5
WORKERS = 3
CONCURRENCY = 2  # each worker's prefork pool: the most handlers one kill -9 can interrupt
LEASE_SECONDS = 10
CHANNEL = PREFIX + COPIES_CHANNEL
# The one lane the copies' handlers share (bench/subscriber/copies.py).
COPIES_LANE = handling.lane("bench_copies")
# What a Celery worker logs at INFO of each task it receives, and of each that ended.
TASK_RECEIVED = re.compile(r"Task toot\.drain\[([\w-]+)\] received")
TASK_ENDED = re.compile(r"Task toot\.drain\[([\w-]+)\] (?:succeeded|failed|raised)")
# Generous: the machine is shared, and a kill costs a lease.
DEADLINE = 600


class ScaleTopology(Topology):
    """The example publisher, the benchmark's subscriber with five callback URLs, three
    workers per side, toot's metrics on, toot logging warnings only (an INFO line per
    event would cost more CPU than the event)."""

    def __init__(self) -> None:
        super().__init__(
            "scale",
            retry_schedule="1,2,4,8,16,32",
            env={
                "TOOT_LEASE_SECONDS": str(LEASE_SECONDS),
                "TOOT_LOG_LEVEL": "WARNING",
                "BENCH_COPIES": str(URLS),
                "TOOT_METRICS": "1",
            },
        )
        self.settings_modules["subscriber"] = "bench.subscriber.settings"
        for role in ("publisher", "subscriber"):
            directory = self.log_dir / f"prometheus-{role}"
            directory.mkdir()
            self.role_env[role]["PROMETHEUS_MULTIPROC_DIR"] = str(directory)

    def workers(self, role: str) -> list[str]:
        return [name for name in self.processes if name.startswith(f"{role}-worker")]

    def start(self) -> None:
        """Redis, the databases, both web servers and all six workers, started at once so
        that their startups overlap; then waits until each answers."""
        self.start_redis()
        self.migrate()
        for role in ("publisher", "subscriber"):
            self.start_web(role, wait=False)
            for n in range(1, WORKERS + 1):
                self.start_worker(role, f"{role}-worker" + (f"-{n}" if n > 1 else ""), wait=False)
        for role in ("publisher", "subscriber"):
            self.wait_for_web(role)
            for name in self.workers(role):
                self.processes[name].wait_for_log(WORKER_READY, timeout=120)

    def copy_url(self, copy: int) -> str:
        return self.callback_url if copy == 0 else f"{self.callback_url}?copy={copy}"

    def busy_worker(self, role: str) -> str | None:
        """A running worker of ``role`` with a drain at work, the one with the most."""
        busy = {}
        for name in self.workers(role):
            process = self.processes[name]
            if process.running:
                log = process.log()
                running = set(TASK_RECEIVED.findall(log)) - set(TASK_ENDED.findall(log))
                if running:
                    busy[name] = len(running)
        return max(busy, key=busy.__getitem__, default=None)


@pytest.fixture
def topology(redis):
    topology = ScaleTopology()
    try:
        topology.start()
        topology.register()  # copy 0, asking for batches as the example subscriber does
        for copy in range(1, URLS):
            topology.subscribe(CHANNEL, topology.copy_url(copy), batch=True)
        yield topology
    finally:
        topology.stop()


class Fault:
    """One worker of ``role`` stopped (``how``: kill or term) once ``progress()`` reaches
    ``at`` of ``total``; when, and how far the stream had come."""

    def __init__(self, role: str, how: str, at: float, progress: Callable[[], int]) -> None:
        self.role, self.how, self.at, self.progress = role, how, at, progress
        self.worker: str | None = None
        self.done_at: float | None = None
        self.progress_then = 0
        self.shutdown_seconds = 0.0

    def due(self, total: int) -> bool:
        return self.done_at is None and self.progress() >= self.at * total

    def run(self, topology: ScaleTopology) -> bool:
        """Stop the busy worker; False if none is busy yet (the caller tries again)."""
        victim = topology.busy_worker(self.role)
        if victim is None:
            return False
        self.worker, self.progress_then = victim, self.progress()
        process = topology.processes[victim]
        self.done_at = time.monotonic()
        if self.how == "kill":
            process.kill()
        else:
            # Celery's warm shutdown: SIGTERM to the main process only, as a deploy sends it.
            assert process.popen is not None
            process.popen.send_signal(signal.SIGTERM)
            threading.Thread(target=self._wait_for_exit, args=(process,), daemon=True).start()
        return True

    def _wait_for_exit(self, process) -> None:
        process.popen.wait(120)
        self.shutdown_seconds = time.monotonic() - (self.done_at or 0)


def test_three_workers_a_side_lose_nothing_when_one_is_killed_and_one_stopped(topology):
    expected = EVENTS * URLS
    assert sorted(topology.subscriptions()[CHANNEL]) == sorted(
        topology.copy_url(copy) for copy in range(URLS)
    )

    def received() -> int:
        return int(Scrape(topology.subscriber_url).total("toot_events_received_total"))

    handled = topology.receipt_count
    faults = [
        Fault("publisher", "kill", 0.2, received),
        Fault("subscriber", "kill", 0.2, handled),
        Fault("publisher", "term", 0.5, received),
        Fault("subscriber", "term", 0.5, handled),
    ]
    code = (
        "import toot\n"
        f"for n in range({EVENTS}):\n"
        f"    print('event', toot.publish({COPIES_CHANNEL!r}, {{'n': n}}).id)\n"
    )
    published: list[str] = []
    publish_seconds: list[float] = []
    publish_errors: list[BaseException] = []

    def publish() -> None:
        started = time.monotonic()
        try:
            output = topology.manage("publisher", "shell", "-c", code, timeout=DEADLINE).stdout
        except BaseException as exc:  # the test's loop fails with it
            publish_errors.append(exc)
            raise
        publish_seconds.append(time.monotonic() - started)
        published.extend(line.split()[1] for line in output.splitlines() if line[:6] == "event ")

    started = time.monotonic()
    publisher = threading.Thread(target=publish)
    publisher.start()
    deadline = started + DEADLINE
    while handled() < expected:
        for fault in faults:
            if fault.due(expected):
                fault.run(topology)
        assert not publish_errors, publish_errors
        assert time.monotonic() < deadline, f"{handled()} of {expected} handler runs"
        time.sleep(0.5)
    finished = time.monotonic()
    publisher.join(DEADLINE)
    assert len(published) == EVENTS

    # What dead drains held comes back a lease after the kills: wait until it is all done.
    def settled() -> bool:
        return bool(
            topology.pending("publisher", queue.OUT) == 0
            and topology.pending("subscriber", COPIES_LANE) == 0
        )

    wait_for(settled, LEASE_SECONDS * 6, "toot's queues to empty", interval=0.5)
    runs = Counter((r["id"], r["copy"]) for r in topology.receipts())
    sent = set(published)
    delivered = {(event_id, copy) for event_id, copy in runs if event_id in sent}
    duplicates = sum(n - 1 for n in runs.values())
    deliveries = received()
    sent_ok = int(Scrape(topology.publisher_url).total("toot_events_delivered_total"))
    takeovers = sum(
        topology.processes[name].log().count("whose lease ended; running it here")
        for name in topology.workers("subscriber")
    )
    figures = {
        "events": EVENTS,
        "urls": URLS,
        "deliveries": deliveries,
        "redelivered": deliveries - expected,
        "delivered_by_publisher": sent_ok,
        "handler_runs": sum(runs.values()),
        "duplicates": duplicates,
        "lost": expected - len(delivered),
        "taken_over": takeovers,
        "seconds": f"{finished - started:.1f}",
        "publish_seconds": f"{publish_seconds[0]:.1f}" if publish_seconds else "?",
    }
    for fault in faults:
        what = f"{fault.how}_{fault.role}"
        after = finished - fault.done_at if fault.done_at is not None else None
        figures[what] = f"{fault.worker}@{fault.progress_then}"
        figures[f"{what}_seconds_after"] = f"{after:.1f}" if after is not None else "-"
        if fault.how == "term":
            figures[f"{what}_shutdown_seconds"] = f"{fault.shutdown_seconds:.1f}"
    print("\nSCALE " + " ".join(f"{key}={value}" for key, value in figures.items()))

    for fault in faults:  # each came mid-stream, before the last handler run
        assert fault.done_at is not None, f"no busy {fault.role} worker to {fault.how}"
        assert fault.progress_then < expected
        assert not topology.processes[fault.worker].running
    for fault in faults:
        if fault.how == "term":
            log = topology.processes[fault.worker].log()
            assert topology.processes[fault.worker].popen.returncode == 0, log[-3000:]
    assert len(delivered) == expected  # every event reached every URL
    assert deliveries >= expected
    # Each handler once per event, but those running at the kill -9, one per pool process.
    assert duplicates <= CONCURRENCY
    assert (
        topology.count_rows("publisher", "DeadLetter")
        == topology.count_rows("subscriber", "DeadLetter")
        == 0
    )
