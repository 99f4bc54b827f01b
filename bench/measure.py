"""The measurements: bursts, paced latency, the machine's limits and the memory check.

The benchmark process itself is the publisher's caller: it imports the publisher
project (``django.setup()`` on ``example_project.publisher``) and calls ``toot.publish``,
as a view or a task of the publisher would.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

from bench import noop_app, procstat, redis_commands
from bench.subscriber import CHANNEL as SUBSCRIBER_CHANNEL
from bench.topology import CHANNEL, BenchError, Topology
from devtools.processes import wait_for

Say = Callable[[str], None]
# Told the ids of a measurement's events once they are published (bench/slow.py counts them).
Published = Callable[[set[str]], None]


def percentile(values: Iterable[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, round(pct / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


# The body of a plain POST: an event as toot sends it, to a view that does nothing.
PLAIN_BODY = json.dumps(
    {
        "id": "00000000-0000-0000-0000-000000000000",
        "timestamp": "2024-01-01T00:00:00+00:00",
        "payload": {"n": 0, "sent_at": 1700000000.0},
        "channel": CHANNEL,
    }
).encode()
JSON_HEADERS = {"Content-Type": "application/json"}


def _sleep_until(moment: float) -> None:
    pause = moment - time.monotonic()
    if pause > 0:
        time.sleep(pause)


def spread_ms(seconds: list[float]) -> dict[str, float | None]:
    ms = [value * 1000 for value in seconds]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else None,
        "mean": statistics.fmean(ms) if ms else None,
    }


def batch_available() -> str | None:
    """None if toot has a batched delivery switch; else why batch mode cannot run.

    Batched delivery (docs/protocol.md section 7) is to be switched on by a ``TOOT["BATCH"]``
    setting; the example settings are then to map ``$TOOT_BATCH`` to it, which the
    topology sets for mode=batch. Rename here if the switch gets another name.
    """
    from toot.conf import DEFAULTS

    if "BATCH" in DEFAULTS:
        return None
    return 'toot has no TOOT["BATCH"] switch yet (batched delivery is not implemented)'


@dataclass
class Tally:
    expected: int
    delivered: int  # distinct (event id, copy) received
    lost: int
    duplicated: int
    stray: int  # receipts of events this measurement did not publish, or of unknown copies

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicated == 0


def tally(sent_ids: set[str], copies: int, receipts: list[dict[str, Any]]) -> Tally:
    """Losses and duplicates, counted by (event id, copy)."""
    mine = [
        (r["id"], r["copy"]) for r in receipts if r["id"] in sent_ids and 0 <= r["copy"] < copies
    ]
    distinct = set(mine)
    expected = len(sent_ids) * copies
    return Tally(
        expected=expected,
        delivered=len(distinct),
        lost=expected - len(distinct),
        duplicated=len(mine) - len(distinct),
        stray=len(receipts) - len(mine),
    )


@dataclass
class Burst:
    mode: str
    copies: int
    events: int
    deliveries: int
    seconds: float  # first publish to last handler run
    deliveries_per_s: float
    complete: bool
    publish_seconds: float  # how long publishing the N events took
    publish_ms: dict[str, float | None]
    latency_ms: dict[str, float | None]
    cpu_ms_per_delivery: dict[str, float]
    # CPU (in cores) that processes outside the benchmark used during the burst: the
    # machine is shared if this is not near 0, and every figure is lower for it.
    other_cores: float
    tally: dict[str, int]
    progress: list[tuple[float, int]] = field(default_factory=list)  # (s, handler runs)
    # Redis's commands by name and its CPU, less the benchmark's own (bench/redis_commands.py)
    redis: dict[str, Any] = field(default_factory=dict)


@dataclass
class Paced:
    mode: str
    copies: int
    rate: float
    events: int
    achieved_rate: float
    latency_ms: dict[str, float | None]
    publish_ms: dict[str, float | None]
    tally: dict[str, int]
    latencies_ms: list[float] = field(default_factory=list)


class Driver:
    """The benchmark's own process, as the publisher project's caller."""

    def __init__(self, topology: Topology, say: Say) -> None:
        self.topology = topology
        self.say = say
        self._publish: Callable[..., Any] | None = None

    def setup_publisher(self) -> None:
        self.topology.setup_publisher()
        import toot

        self._publish = toot.publish

    def set_mode(self, mode: str) -> None:
        if batch_available() is None:  # the switch exists: say which mode this process is in
            from django.conf import settings

            settings.TOOT = {**settings.TOOT, "BATCH": mode == "batch"}

    def publish(self, n: int) -> tuple[str, float]:
        """Publish event ``n``; its id and how long ``publish()`` took (s)."""
        assert self._publish is not None
        sent_at = time.time()
        started = time.perf_counter()
        event = self._publish(SUBSCRIBER_CHANNEL, {"n": n, "sent_at": sent_at})
        return event.id, time.perf_counter() - started

    # Warm-up: imports, connections and the workers' children, before anything is timed

    def warm_up(self, copies: int, events: int = 20, timeout: float = 90) -> None:
        self.topology.clear_receipts()
        sent = {self.publish(n)[0] for n in range(events)}
        deadline = time.monotonic() + timeout
        while self.topology.receipt_count() < events * copies:
            self.topology.check_running()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the warm-up's {events} events did not all arrive in {timeout:.0f}s "
                    f"({self.topology.receipt_count()} of {events * copies} handler runs); "
                    f"logs in {self.topology.log_dir}"
                )
            time.sleep(0.05)
        result = tally(sent, copies, self.topology.receipts())
        if not result.clean:
            raise BenchError(f"the warm-up lost or duplicated events: {result}")
        self.topology.clear_receipts()

    # Burst: N events as fast as publish() goes, until all N x M handler runs are in

    def burst(
        self,
        mode: str,
        copies: int,
        events: int,
        stall: float,
        grace: float,
        published_hook: Published | None = None,
    ) -> Burst:
        topology = self.topology
        topology.clear_receipts()
        sent: set[str] = set()
        durations: list[float] = []
        cpu_before = topology.cpu()
        redis_before = redis_commands.snapshot(topology.client)
        polls_before = topology.receipt_polls
        machine_before, own_before = procstat.machine_busy_seconds(), procstat.own_cpu_seconds()
        driver_before = time.process_time()
        started = time.time()
        for n in range(events):
            event_id, took = self.publish(n)
            sent.add(event_id)
            durations.append(took)
        published = time.time()
        driver_cpu = time.process_time() - driver_before
        if published_hook is not None:
            published_hook(sent)
        complete = topology.wait_for_receipts(events * copies, stall)
        cpu_after = topology.cpu()
        redis_after = redis_commands.snapshot(topology.client)
        polls = topology.receipt_polls
        handler_runs = topology.receipt_count()  # after the snapshot: not counted in it
        machine = procstat.machine_busy_seconds() - machine_before
        own = procstat.own_cpu_seconds() - own_before
        waited = time.time() - started
        time.sleep(grace)  # any duplicate has time to show
        receipts = topology.receipts()
        result = tally(sent, copies, receipts)
        mine = [r for r in receipts if r["id"] in sent]
        last = max((r["received_at"] for r in mine), default=published)
        seconds = last - started
        deliveries = events * copies
        cpu = {"driver (publish)": driver_cpu, **_delta(cpu_before, cpu_after)}
        return Burst(
            mode=mode,
            copies=copies,
            events=events,
            deliveries=deliveries,
            seconds=seconds,
            deliveries_per_s=result.delivered / seconds if seconds > 0 else 0.0,
            complete=complete and result.lost == 0,
            publish_seconds=published - started,
            publish_ms=spread_ms(durations),
            latency_ms=spread_ms([r["received_at"] - r["sent_at"] for r in mine]),
            cpu_ms_per_delivery={name: value * 1000 / deliveries for name, value in cpu.items()},
            other_cores=max(0.0, machine - own - sum(_delta(cpu_before, cpu_after).values()))
            / waited,
            tally=asdict(result),
            progress=_progress(started, [r["received_at"] for r in mine]),
            redis=redis_commands.delta(
                redis_before,
                redis_after,
                events=events,
                deliveries=deliveries,
                polls=polls - polls_before,
                receipts=handler_runs,
            ),
        )

    def redis_idle(self, seconds: float) -> dict[str, Any]:
        """Redis's calls and CPU a second over ``seconds`` in which nothing is published."""
        client = self.topology.client
        before, started = redis_commands.snapshot(client), time.monotonic()
        time.sleep(seconds)  # a window measured, not a wait for an outcome
        after = redis_commands.snapshot(client)
        return redis_commands.idle(before, after, time.monotonic() - started)

    # Paced: a fixed rate for a while; the latency from publish() to handler

    def paced(
        self,
        mode: str,
        rate: float,
        duration: float,
        stall: float,
        grace: float,
        published_hook: Published | None = None,
    ) -> Paced:
        topology = self.topology
        topology.clear_receipts()
        events = max(1, round(rate * duration))
        sent: set[str] = set()
        durations: list[float] = []
        started = next_at = time.monotonic()
        for n in range(events):
            event_id, took = self.publish(n)
            sent.add(event_id)
            durations.append(took)
            next_at += 1 / rate
            _sleep_until(next_at)
        elapsed = time.monotonic() - started
        if published_hook is not None:
            published_hook(sent)
        topology.wait_for_receipts(events, stall)
        time.sleep(grace)
        receipts = topology.receipts()
        result = tally(sent, 1, receipts)
        latencies = [r["received_at"] - r["sent_at"] for r in receipts if r["id"] in sent]
        return Paced(
            mode=mode,
            copies=1,
            rate=rate,
            events=events,
            achieved_rate=events / elapsed,
            latency_ms=spread_ms(latencies),
            publish_ms=spread_ms(durations),
            tally=asdict(result),
            latencies_ms=sorted(round(value * 1000, 3) for value in latencies),
        )

    # Slow URLs beside the measured subscriber (--slow, bench/slow.py)

    def dead_letters(self, urls: list[str], sent: set[str]) -> dict[str, int]:
        """For each URL, how many of the events ``sent`` the publisher gave up on for it."""
        from toot.models import DeadLetter

        found: dict[str, set[str]] = {url: set() for url in urls}
        rows = DeadLetter.objects.filter(
            kind=DeadLetter.Kind.DELIVERY, callback_url__in=urls, event_id__in=sent
        ).values_list("callback_url", "event_id")
        for url, event_id in rows:
            found[url].add(event_id)
        return {url: len(ids) for url, ids in found.items()}

    def publisher_limits(self) -> dict[str, Any]:
        """The publisher's settings that bound the requests it holds open at once."""
        from toot.conf import conf

        return {
            "read_timeout": conf.READ_TIMEOUT,
            "senders": conf.SENDERS,
            # Per callback URL, across every worker (toot.publisher.lanes).
            "in_flight": conf.MAX_IN_FLIGHT,
        }

    # The machine's limits, measured in the same run

    def celery_noop_rate(self, tasks: int) -> dict[str, Any]:
        """How fast a worker like toot's consumes a task that does nothing, same broker."""
        topology = self.topology
        queue = f"{topology.prefix}-noop"
        key_prefix = f"{topology.prefix}:noop:"
        app = noop_app.make_app(topology.redis_url, queue, key_prefix, current=False)
        worker = topology.noop_worker(queue, key_prefix)

        def queued() -> int:
            if not worker.running:
                raise BenchError(f"the no-op worker exited:\n{worker.log()[-3000:]}")
            return noop_app.queued(topology.client, key_prefix, queue)

        try:
            with app.producer_or_acquire() as producer:
                # Warm-up: the worker's pool children take their first tasks.
                for _ in range(20 * self.topology.options.concurrency):
                    app.send_task(noop_app.TASK, producer=producer)
                wait_for(lambda: queued() == 0, 90, "the no-op worker's warm-up", interval=0.05)
                pid = worker.popen.pid  # type: ignore[union-attr]
                cpu_before = procstat.cpu_seconds(pid)
                started = time.perf_counter()
                for _ in range(tasks):
                    app.send_task(noop_app.TASK, producer=producer)
                sent = time.perf_counter()
                left = queued()
                wait_for(lambda: queued() == 0, 300, "the no-op tasks", interval=0.005)
                done = time.perf_counter()
                cpu = procstat.cpu_seconds(pid) - cpu_before
        finally:
            worker.stop()
            del topology.processes["noop-worker"]
            keys = list(topology.client.scan_iter(match=f"{key_prefix}*", count=1000))
            if keys:
                topology.client.delete(*keys)
            app.close()
        # Counted from the end of sending, so that the sending does not share the CPU; the
        # tasks consumed while sending are taken out.
        after = left / (done - sent) if left > tasks // 4 and done > sent else None
        overall = tasks / (done - started)
        return {
            "tasks": tasks,
            "tasks_per_s": after if after is not None else overall,
            "tasks_per_s_incl_sending": overall,
            "send_per_s": tasks / (sent - started),
            "worker_cpu_ms_per_task": cpu * 1000 / tasks,
            "concurrency": self.topology.options.concurrency,
        }

    def _plain_post(self, session: requests.Session) -> None:
        """One POST of an event's size to the subscriber's trivial view (no toot in it)."""
        url = f"{self.topology.subscriber_url}/bench/noop"
        response = session.post(url, data=PLAIN_BODY, headers=JSON_HEADERS, timeout=10)
        if response.status_code != 200:
            raise BenchError(f"POST {url}: {response.status_code}")

    def post_rate(self, duration: float) -> dict[str, Any]:
        """Plain POSTs to the subscriber's gunicorn from one requests.Session, one at a time."""
        pid = self.topology.pids()["subscriber-web"]
        with requests.Session() as session:
            for _ in range(50):
                self._plain_post(session)
            count = 0
            cpu_before = procstat.cpu_seconds(pid)
            client_before = time.process_time()
            started = time.perf_counter()
            deadline = started + duration
            while time.perf_counter() < deadline:
                self._plain_post(session)
                count += 1
            elapsed = time.perf_counter() - started
            client_cpu = time.process_time() - client_before
            cpu = procstat.cpu_seconds(pid) - cpu_before
        return {
            "requests": count,
            "requests_per_s": count / elapsed,
            "seconds": elapsed,
            "server_cpu_ms_per_request": cpu * 1000 / count,
            "client_cpu_ms_per_request": client_cpu * 1000 / count,
        }

    def paced_floor(self, rate: float, duration: float) -> dict[str, Any]:
        """At ``rate`` a second: how long a plain POST to the subscriber's gunicorn takes,
        and a Redis round trip of toot's own client (what publish() waits for), half a
        period later. Paced latency and publish() cannot go below these on this machine:
        a machine that is slow to wake after a pause makes both slower at 20/s than at 200/s.
        """
        from toot.engine.connection import get_redis

        client = get_redis()
        posts: list[float] = []
        pings: list[float] = []
        period = 1 / rate
        with requests.Session() as session:
            self._plain_post(session)
            next_at = time.monotonic()
            for _ in range(max(1, round(rate * duration))):
                started = time.perf_counter()
                self._plain_post(session)
                posts.append(time.perf_counter() - started)
                _sleep_until(next_at + period / 2)
                started = time.perf_counter()
                client.ping()
                pings.append(time.perf_counter() - started)
                next_at += period
                _sleep_until(next_at)
        return {"rate": rate, "post_ms": spread_ms(posts), "redis_ms": spread_ms(pings)}

    # Flat memory: worker RSS after 10 % of the events and after all of them

    def memory(self, events: int, chunk: int, stall: float) -> dict[str, Any]:
        topology = self.topology
        topology.subscribe_copies(1)
        checkpoint = max(chunk, (events // 10) // chunk * chunk)
        rss: dict[str, dict[str, float]] = {}
        redis_mib: dict[str, float] = {}
        lost = duplicated = 0
        done = 0
        started = time.monotonic()
        while done < events:
            count = min(chunk, events - done)
            topology.clear_receipts()
            sent = {self.publish(done + n)[0] for n in range(count)}
            topology.wait_for_receipts(count, stall)
            result = tally(sent, 1, topology.receipts())
            lost += result.lost
            duplicated += result.duplicated
            done += count
            if done in (checkpoint, events):
                rss[str(done)] = topology.by_kind(procstat.rss_mib)
                # Redis holds toot's "handled" key per delivery for DEDUPE_TTL (3 days).
                redis_mib[str(done)] = int(topology.client.info("memory")["used_memory"]) / 2**20
            if done % (chunk * 10) == 0 or done == events:
                elapsed = time.monotonic() - started
                self.say(f"  memory check: {done}/{events} events, {done / elapsed:.0f}/s")
        topology.clear_receipts()
        first, last = rss[str(checkpoint)], rss[str(events)]
        growth = {
            name: (last[name] - first[name]) / first[name] * 100 if first[name] else 0.0
            for name in first
        }
        return {
            "events": events,
            "checkpoint": checkpoint,
            "rss_mib": rss,
            "growth_pct": growth,
            "redis_used_memory_mib": redis_mib,
            "redis_bytes_per_event": (redis_mib[str(events)] - redis_mib[str(checkpoint)])
            * 2**20
            / max(1, events - checkpoint),
            "lost": lost,
            "duplicated": duplicated,
        }


def driver_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def _progress(started: float, received: list[float], points: int = 200) -> list[tuple[float, int]]:
    """(seconds since the first publish, handler runs so far), at most ``points`` of them."""
    times = sorted(received)
    if not times:
        return []
    step = max(1, len(times) // points)
    marks = [(round(times[i] - started, 4), i + 1) for i in range(0, len(times), step)]
    if marks[-1][1] != len(times):
        marks.append((round(times[-1] - started, 4), len(times)))
    return marks
