"""The example project as real processes (devtools/topology.py), as the benchmark runs it.

Unlike the tests' and the demo's, the processes log only warnings: an INFO line per event
or task costs CPU that the benchmark would count as toot's. Besides, the benchmark
subscribes M callback URLs of the one subscriber to one channel (the subscriber runs
bench.subscriber.settings for them), counts each process tree's CPU, and runs a Celery
worker of a no-op task for the broker's own limit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import procstat
from bench.subscriber import CHANNEL as SUBSCRIBER_CHANNEL
from devtools import topology as base
from devtools.processes import ROOT, Process, celery_worker_argv

CHANNEL = base.CHANNEL_PREFIX + SUBSCRIBER_CHANNEL
WORKER_NUMBER = re.compile(r"(?<=-worker)-\d+$")  # publisher-worker-2 is a publisher-worker


class BenchError(base.TopologyError):
    """The benchmark cannot go on."""


@dataclass
class Options:
    web_workers: int = 2
    web_threads: int = 4
    concurrency: int = 2
    workers: int = 1  # Celery worker processes per side (--workers), each a -n of its own
    signed: bool = True
    copies: int = 1  # the most callback URLs any burst subscribes
    read_timeout: float | None = None  # the publisher's READ_TIMEOUT; None: toot's default
    metrics: bool = False  # TOOT["METRICS"] in both projects (--metrics)
    tracing: bool = False  # TOOT["TRACING"], spans dropped (example_project/tracing.py)


class Topology(base.Topology):
    def __init__(self, options: Options) -> None:
        super().__init__(
            "bench",
            # A failed delivery is retried within the run, so it shows as slow, not lost.
            retry_schedule="1,2,5,10",
            # Subscribing takes a token; deliveries signed (Standard Webhooks) as docs/security.md
            # advises, and checked on receipt, unless --unsigned.
            token=True,
            signed=options.signed,
            quiet=True,
            web_workers=options.web_workers,
            web_threads=options.web_threads,
            concurrency=options.concurrency,
            env={"BENCH_COPIES": str(options.copies)},
        )
        if options.tracing:
            self.env["TOOT_TRACE_FILE"] = "discard"
        # The example subscriber with M copies of its callback URL (bench/subscriber/).
        self.settings_modules["subscriber"] = "bench.subscriber.settings"
        if options.read_timeout is not None:
            self.settings_modules["publisher"] = "bench.publisher_settings"
            self.role_env["publisher"]["BENCH_READ_TIMEOUT"] = str(options.read_timeout)
        if options.metrics:
            # Both projects count, each process in its own files of its side's directory,
            # as under gunicorn and Celery in production (docs/metrics.md).
            self.env["TOOT_METRICS"] = "1"
            for role in base.ROLES:
                directory = self.log_dir / f"prometheus-{role}"
                directory.mkdir()
                self.role_env[role]["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        self.options = options
        self.subscribed: list[str] = []
        self.slow_subscribed: list[str] = []  # the slow URLs beside them (bench/slow.py)
        self.batch = False  # whether copies register for batches (docs/protocol.md section 7)
        # wait_for_receipts's LLENs so far: Redis commands of the benchmark's, not toot's.
        self.receipt_polls = 0

    def start_apps(self, mode: str) -> None:
        """gunicorn and ``workers`` Celery workers for each side, in ``mode``, answering HTTP.

        The first time, the databases are migrated first; later (another mode) the
        running ones are stopped first. Redis, keys and queues stay. The workers log no
        "ready." at WARNING: the warm-up's events prove them ready.
        """
        self.stop_apps()
        # The subscriber's TOOT["BATCH"]; subscribe_copies registers the same way.
        self.batch = mode == "batch"
        self.env["TOOT_BATCH"] = "1" if self.batch else "0"
        self.start()
        # More workers per side share the side's queues, as more hosts of a project would:
        # <role>-worker-2 and on, each its own Celery node name (-n).
        for n in range(2, self.options.workers + 1):
            for role in base.ROLES:
                self.start_worker(role, f"{role}-worker-{n}", wait=False)

    def setting(self, role: str, key: str) -> str:
        """``conf.get(key)`` of toot as ``role``'s settings give it, as text."""
        code = f"from toot.conf import conf; print('toot-setting', conf.get({key!r}))"
        output = self.manage(role, "shell", "-c", code).stdout
        for line in output.splitlines():
            if line.startswith("toot-setting "):
                return line.split(" ", 1)[1]
        raise BenchError(f"reading {key} of {role} printed nothing: see {self.log_dir}")

    def noop_worker(self, queue: str, key_prefix: str) -> Process:
        """A worker of bench/noop_app.py, with the toot workers' pool and concurrency."""
        argv = celery_worker_argv(
            "bench.noop_app", f"{self.prefix}-noop@%h", self.options.concurrency, loglevel="WARNING"
        )
        env = {
            "BENCH_NOOP_BROKER_URL": self.redis_url,
            "BENCH_NOOP_QUEUE": queue,
            "BENCH_NOOP_KEY_PREFIX": key_prefix,
            "PYTHONPATH": str(ROOT),
        }
        process = Process("noop-worker", argv, env, cwd=ROOT, log_dir=self.log_dir).start()
        self.processes["noop-worker"] = process
        return process

    # CPU and memory of the measured processes

    def pids(self) -> dict[str, int]:
        """The measured processes by name (their process trees are what is counted)."""
        names = list(base.APP_PROCESSES)
        names += [
            f"{role}-worker-{n}" for n in range(2, self.options.workers + 1) for role in base.ROLES
        ]
        if self.embedded_redis:
            names.append("redis")
        return {
            name: self.processes[name].popen.pid  # type: ignore[union-attr]
            for name in names
            if name in self.processes and self.processes[name].popen is not None
        }

    def by_kind(self, measure: Callable[[int], float]) -> dict[str, float]:
        """``measure`` of each process tree, the N workers of a side summed under
        ``<role>-worker``: the table's rows stay those of one worker per side."""
        found: dict[str, float] = {}
        for name, pid in self.pids().items():
            kind = WORKER_NUMBER.sub("", name)
            found[kind] = found.get(kind, 0.0) + measure(pid)
        return found

    def cpu(self) -> dict[str, float]:
        return self.by_kind(procstat.cpu_seconds)

    # Subscriptions: M callback URLs for the one channel

    def copy_url(self, copy: int) -> str:
        return self.callback_url if copy == 0 else f"{self.callback_url}?copy={copy}"

    def subscribe_copies(self, copies: int) -> None:
        """Subscribe exactly copies 0..copies-1 of the callback URL to the channel."""
        wanted = [self.copy_url(copy) for copy in range(copies)]
        for url in self.subscribed:
            if url not in wanted:
                self.unsubscribe(CHANNEL, url)
        for url in wanted:
            self.subscribe(CHANNEL, url, batch=self.batch)
        self._check_listed([*wanted, *self.slow_subscribed])
        self.subscribed = wanted

    def subscribe_slow(self, urls: list[str]) -> None:
        """Subscribe exactly ``urls``, the slow ones (bench/slow.py), beside the copies."""
        for url in self.slow_subscribed:
            if url not in urls:
                self.unsubscribe(CHANNEL, url)
        for url in urls:
            self.subscribe(CHANNEL, url, batch=self.batch)
        self._check_listed([*self.subscribed, *urls])
        self.slow_subscribed = list(urls)

    def _check_listed(self, wanted: list[str]) -> None:
        listed = self.subscriptions().get(CHANNEL, [])
        if sorted(listed) != sorted(wanted):
            raise BenchError(f"the publisher lists {listed} for {CHANNEL}, not {wanted}")

    # Receipts: one per handler run, {"id", "copy", "sent_at", "received_at"}

    def wait_for_receipts(self, expected: int, stall: float, interval: float = 0.01) -> bool:
        """Until ``expected`` receipts are in, or none came for ``stall`` seconds."""
        count, last_change = -1, time.monotonic()
        polls = 0
        while True:
            current = self.receipt_count()
            self.receipt_polls += 1
            if current >= expected:
                return True
            if current != count:
                count, last_change = current, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return False
            polls += 1
            if polls % 100 == 0:
                self.check_running()
            time.sleep(interval)
