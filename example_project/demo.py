"""The toot demo: a publisher and a subscriber project, live, exchanging a stream of events.

Run it with ``python3 dev.py demo`` from the repository root; dev.py makes the virtualenv
and runs this file in it. It starts Redis (embedded, unless $TOOT_REDIS_URL is set), a
gunicorn and a Celery worker for each project, registers the subscriber's subscriptions,
publishes events and shows each one reaching the subscriber's handler. Every process it
started is stopped at the end, on Ctrl-C and on error.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "example_project"), str(ROOT)]

from devtools.topology import Topology, TopologyError  # noqa: E402

CHANNEL = "users.updated.v1"
# How long to wait for the last events after publishing, and for any duplicate.
SETTLE_TIMEOUT = 15.0
DUPLICATE_GRACE = 1.0


class DemoError(Exception):
    """The demo cannot go on."""


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def say(message: str = "") -> None:
    print(message, flush=True)


class Demo:
    def __init__(self, count: int, rate: float, *, metrics: bool = False) -> None:
        self.count = count
        self.rate = rate
        self.metrics = metrics
        # Secured as docs/security.md advises: subscribing takes a token, deliveries are signed.
        self.topology = Topology("demo", retry_schedule="0.5,1,2,5", token=True, signed=True)
        if metrics:
            # docs/metrics.md: TOOT["METRICS"] on, each side's processes sharing a directory.
            self.topology.env["TOOT_METRICS"] = "1"
            for role in ("publisher", "subscriber"):
                directory = self.topology.log_dir / f"prometheus-{role}"
                directory.mkdir()
                self.topology.role_env[role]["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        self.sent: dict[int, str] = {}  # n -> event id
        self.latencies: dict[int, float] = {}  # n -> ms
        self.receipts = 0

    def start(self) -> None:
        topology = self.topology
        say(f"Logs of every process: {topology.log_dir}")
        topology.start_redis()
        if topology.embedded_redis:
            say(f"Redis: embedded redis-server at {topology.redis_url}")
        else:
            say(f"Redis: {topology.redis_url} (from TOOT_REDIS_URL)")
        topology.migrate()
        say("Starting publisher and subscriber (gunicorn + Celery worker each) ...")
        started = time.monotonic()
        topology.start()
        say(f"  publisher:  {topology.publisher_url}/toot/  queue {topology.queues['publisher']}")
        say(f"  subscriber: {topology.subscriber_url}/toot/  queue {topology.queues['subscriber']}")
        say(f"  all up in {time.monotonic() - started:.1f}s")
        say("  subscribing takes a bearer token; deliveries are signed (Standard Webhooks)")

    def register(self) -> None:
        say()
        say("Subscriber: $ manage.py toot_register_subscriptions")
        for line in self.topology.register().splitlines():
            say(f"  {line}")

    def setup_publisher(self) -> None:
        """Make this process the publisher project, as a view or a task of it would be."""
        # This terminal shows the receipts instead of toot's log lines.
        self.topology.setup_publisher(TOOT_LOG_LEVEL="WARNING")

    def publish_and_watch(self) -> None:
        import toot

        say()
        say(f"Publishing {self.count} events on {CHANNEL} at {self.rate:g}/s. Each line is one")
        say("event run by the subscriber's handler, with its latency from publish() to handler:")
        receipts: queue.Queue[dict[str, Any]] = queue.Queue()
        done = threading.Event()
        reader = threading.Thread(target=self._read_receipts, args=(receipts, done), daemon=True)
        reader.start()
        try:
            # One event first, so that the stream measures warm processes; its own latency
            # (imports, first connections) is shown apart.
            self.sent[0] = toot.publish(CHANNEL, {"id": 0, "sent_at": time.time()}).id
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while 0 not in self.latencies and time.monotonic() < deadline:
                self._show_until(receipts, min(deadline, time.monotonic() + 0.1))
            if 0 not in self.latencies:
                raise DemoError(f"the warm-up event did not arrive in {SETTLE_TIMEOUT:.0f}s")
            next_at = time.monotonic()
            for n in range(1, self.count + 1):
                event = toot.publish(CHANNEL, {"id": n, "sent_at": time.time()})
                self.sent[n] = event.id
                next_at += 1 / self.rate
                self._show_until(receipts, next_at)
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while len(self.latencies) <= self.count and time.monotonic() < deadline:
                self._show_until(receipts, min(deadline, time.monotonic() + 0.1))
            self._show_until(receipts, time.monotonic() + DUPLICATE_GRACE)
        finally:
            done.set()
            reader.join()

    def _read_receipts(self, receipts: queue.Queue[dict[str, Any]], done: threading.Event) -> None:
        """BLPOP the handler's receipts into ``receipts`` until ``done``."""
        client = redis.Redis.from_url(self.topology.redis_url)
        try:
            while not done.is_set():
                item = client.blpop([self.topology.receipts_key], timeout=0.5)
                if item is not None:
                    receipts.put(json.loads(item[1]))
        finally:
            client.close()

    def _show_until(self, receipts: queue.Queue[dict[str, Any]], until: float) -> None:
        while (remaining := until - time.monotonic()) > 0:
            try:
                receipt = receipts.get(timeout=remaining)
            except queue.Empty:
                return
            self._show(receipt)

    def _show(self, receipt: dict[str, Any]) -> None:
        self.receipts += 1
        payload = receipt["payload"]
        n = payload["id"]
        if self.sent.get(n) != receipt["id"]:
            say(f"  ?? a receipt for an event this run did not publish: {receipt['id']}")
            return
        if n in self.latencies:
            say(f"  event {n:>4}  DUPLICATE  {receipt['id']}")
            return
        self.latencies[n] = latency = (receipt["received_at"] - payload["sent_at"]) * 1000
        label = "warm-up" if n == 0 else f"event {n:>4}"
        say(f"  {label}  {latency:7.1f} ms  {receipt['channel']}  {receipt['id']}")

    def summary(self) -> int:
        warmup = self.latencies.pop(0, None)
        received = len(self.latencies)
        lost = self.count - received
        duplicated = self.receipts - received - (warmup is not None)
        say()
        say("Summary")
        say(f"  published:  {self.count}")
        say(f"  received:   {received}")
        say(f"  lost:       {lost}")
        say(f"  duplicated: {duplicated}")
        if self.latencies:
            values = list(self.latencies.values())
            say(
                f"  latency:    p50 {percentile(values, 50):.1f} ms, "
                f"p95 {percentile(values, 95):.1f} ms, max {max(values):.1f} ms"
            )
        if warmup is not None:
            say(f"  warm-up event (not counted above): {warmup:.1f} ms")
        if lost:
            missing = sorted(set(range(1, self.count + 1)) - set(self.latencies))
            say(f"  missing events: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        return 1 if lost or duplicated else 0

    def show_metrics(self) -> None:
        """toot's samples, as a scrape of each side's /metrics returns them (buckets left
        out)."""
        import requests

        for role, url in (
            ("publisher", self.topology.publisher_url),
            ("subscriber", self.topology.subscriber_url),
        ):
            say()
            say(f"Metrics of the {role}: $ curl {url}/metrics  (toot_*, buckets left out)")
            response = requests.get(f"{url}/metrics", timeout=10)
            response.raise_for_status()
            for line in response.text.splitlines():
                if line.startswith("toot_") and "_bucket{" not in line and "_created" not in line:
                    say(f"  {line}")

    def stop(self) -> None:
        say()
        say(f"Stopping {len(self.topology.processes)} processes ...")
        for line in self.topology.stop():
            say(f"  {line}")
        say(f"Stopped. Logs: {self.topology.log_dir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="events to publish (default 50)")
    parser.add_argument("--rate", type=float, default=10, help="events per second (default 10)")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="Prometheus metrics on in both projects (docs/metrics.md), shown at the end",
    )
    args = parser.parse_args()
    if args.count < 1 or args.rate <= 0:
        parser.error("--count and --rate must be positive")

    demo = Demo(args.count, args.rate, metrics=args.metrics)
    try:
        demo.start()
        demo.register()
        demo.setup_publisher()
        demo.publish_and_watch()
        status = demo.summary()
        if demo.metrics:
            demo.show_metrics()
        return status
    except KeyboardInterrupt:
        say("\nInterrupted.")
        return 130
    except (DemoError, TopologyError, TimeoutError, RuntimeError) as exc:
        say(f"Demo failed: {exc}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
