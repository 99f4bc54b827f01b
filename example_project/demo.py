"""The toot demo: a publisher and a subscriber project, live, exchanging a stream of events.

Run it with ``python3 dev.py demo`` from the repository root; dev.py makes the virtualenv
and runs this file in it. It starts Redis (embedded, unless $TOOT_REDIS_URL is set), a
gunicorn and a Celery worker for each project, registers the subscriber's subscriptions,
publishes events and shows each one reaching the subscriber's handler. Every process it
started is stopped at the end, on Ctrl-C and on error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "example_project"), str(ROOT)]

from devtools.processes import (  # noqa: E402
    WORKER_READY,
    Process,
    celery_worker,
    free_port,
    project_env,
    wait_for_http,
    web_server,
)
from devtools.redis_server import start_redis  # noqa: E402

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
    def __init__(self, count: int, rate: float) -> None:
        self.count = count
        self.rate = rate
        self.run_id = uuid.uuid4().hex[:8]
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"toot-demo-{self.run_id}-"))
        self.processes: list[Process] = []
        self.sent: dict[int, str] = {}  # n -> event id
        self.latencies: dict[int, float] = {}  # n -> ms
        self.receipts = 0
        self.redis_url = os.environ.get("TOOT_REDIS_URL", "")
        self.shared_redis = bool(self.redis_url)

    def start(self) -> None:
        say(f"Logs of every process: {self.log_dir}")
        if self.shared_redis:
            say(f"Redis: {self.redis_url} (from TOOT_REDIS_URL)")
        else:
            server, self.redis_url = start_redis(log_dir=self.log_dir)
            self.processes.append(server)
            say(f"Redis: embedded redis-server at {self.redis_url}")
        pub_port, sub_port = free_port(), free_port()
        prefix = f"toot-demo-{self.run_id}"
        token = secrets.token_urlsafe(24)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        # Unique keys and queues per run: a shared Redis is never polluted or confused.
        common = {
            "TOOT_REDIS_URL": self.redis_url,
            "EXAMPLE_RECEIPTS_KEY": f"{prefix}:receipts",
            "TOOT_CALLBACK_URL": f"http://127.0.0.1:{sub_port}/toot/callbacks",
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": f"http://127.0.0.1:{pub_port}/toot/subscriptions",
            "TOOT_RETRY_SCHEDULE": "0.5,1,2,5",
            # Secured as the README advises: subscribing takes a token, deliveries are signed.
            "TOOT_SUBSCRIPTIONS_TOKENS": token,
            "TOOT_PUBLISHER_TOKEN": token,
            "TOOT_SIGNING_SECRETS": secret,
            "TOOT_PUBLISHER_SECRETS": secret,
            "PYTHONUNBUFFERED": "1",
        }
        self.publisher_env = {
            **common,
            "CELERY_QUEUE": f"{prefix}-publisher",
            # Each project its own keys: a worker drains the queues under its prefix.
            "TOOT_KEY_PREFIX": f"{prefix}:publisher:",
            "DATABASE_URL": f"sqlite:///{self.log_dir / 'publisher.sqlite3'}",
        }
        self.subscriber_env = {
            **common,
            "CELERY_QUEUE": f"{prefix}-subscriber",
            "TOOT_KEY_PREFIX": f"{prefix}:subscriber:",
            "DATABASE_URL": f"sqlite:///{self.log_dir / 'subscriber.sqlite3'}",
        }
        self.receipts_key = common["EXAMPLE_RECEIPTS_KEY"]
        # toot keeps dead letters and its outbox in each project's database.
        self.manage("publisher", "migrate", "--noinput")
        self.manage("subscriber", "migrate", "--noinput")

        # Start all four at once and only then wait for each: startup overlaps.
        say("Starting publisher and subscriber (gunicorn + Celery worker each) ...")
        started = time.monotonic()
        pub_web = self._add(
            web_server(
                "publisher-web",
                "example_project.publisher",
                pub_port,
                self.publisher_env,
                log_dir=self.log_dir,
                wait=False,
            )
        )
        sub_web = self._add(
            web_server(
                "subscriber-web",
                "example_project.subscriber",
                sub_port,
                self.subscriber_env,
                log_dir=self.log_dir,
                wait=False,
            )
        )
        pub_worker = self._add(
            celery_worker(
                "publisher-worker",
                "example_project.publisher",
                self.publisher_env,
                log_dir=self.log_dir,
                wait=False,
            )
        )
        sub_worker = self._add(
            celery_worker(
                "subscriber-worker",
                "example_project.subscriber",
                self.subscriber_env,
                log_dir=self.log_dir,
                wait=False,
            )
        )
        wait_for_http(pub_web, f"http://127.0.0.1:{pub_port}/")
        wait_for_http(sub_web, f"http://127.0.0.1:{sub_port}/")
        pub_worker.wait_for_log(WORKER_READY)
        sub_worker.wait_for_log(WORKER_READY)
        say(f"  publisher:  http://127.0.0.1:{pub_port}/toot/  queue {prefix}-publisher")
        say(f"  subscriber: http://127.0.0.1:{sub_port}/toot/  queue {prefix}-subscriber")
        say(f"  all up in {time.monotonic() - started:.1f}s")
        say("  subscribing takes a bearer token; deliveries are signed (Standard Webhooks)")

    def _add(self, process: Process) -> Process:
        self.processes.append(process)
        return process

    def manage(self, project: str, *args: str, show: bool = False) -> None:
        """Run ``manage.py`` for ``project``; its output goes to a log, or here with show."""
        env = self.publisher_env if project == "publisher" else self.subscriber_env
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT / "example_project",
            env={**os.environ, **project_env(env, f"example_project.{project}")},
            capture_output=True,
            text=True,
            check=False,
        )
        log = self.log_dir / f"{project}-{args[0]}.log"
        log.write_text(result.stdout + result.stderr)
        # Its log lines stay in the log file unless it failed; its report is shown.
        output = result.stdout if result.returncode == 0 else result.stdout + result.stderr
        if show or result.returncode != 0:
            for line in output.splitlines():
                say(f"  {line}")
        if result.returncode != 0:
            raise DemoError(f"manage.py {' '.join(args)} failed (exit {result.returncode}): {log}")

    def register(self) -> None:
        say()
        say("Subscriber: $ manage.py toot_register_subscriptions")
        self.manage("subscriber", "toot_register_subscriptions", show=True)

    def setup_publisher(self) -> None:
        """Make this process the publisher project, as a view or a task of it would be."""
        os.environ.update(self.publisher_env)
        os.environ["DJANGO_SETTINGS_MODULE"] = "example_project.publisher"
        os.environ["TOOT_LOG_LEVEL"] = "WARNING"  # this terminal shows the receipts instead
        import django

        django.setup()

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
        client = redis.Redis.from_url(self.redis_url)
        try:
            while not done.is_set():
                item = client.blpop([self.receipts_key], timeout=0.5)
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

    def stop(self) -> None:
        say()
        say(f"Stopping {len(self.processes)} processes ...")
        for process in reversed(self.processes):
            process.stop()
        if self.shared_redis:
            # Leave no key or queue of this run behind.
            try:
                client = redis.Redis.from_url(self.redis_url)
                keys = list(client.scan_iter(match=f"*toot-demo-{self.run_id}*"))
                if keys:
                    client.delete(*keys)
                say(f"  removed this run's {len(keys)} keys from {self.redis_url}")
            except redis.RedisError as exc:
                say(f"  could not remove this run's keys from {self.redis_url}: {exc}")
        say(f"Stopped. Logs: {self.log_dir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="events to publish (default 50)")
    parser.add_argument("--rate", type=float, default=10, help="events per second (default 10)")
    args = parser.parse_args()
    if args.count < 1 or args.rate <= 0:
        parser.error("--count and --rate must be positive")

    demo = Demo(args.count, args.rate)
    try:
        demo.start()
        demo.register()
        demo.setup_publisher()
        demo.publish_and_watch()
        return demo.summary()
    except KeyboardInterrupt:
        say("\nInterrupted.")
        return 130
    except DemoError as exc:
        say(f"Demo failed: {exc}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
