"""The example project as real processes: Redis, and gunicorn + a Celery worker for each side.

As in the test suite's topology (tests/topology.py), each run has keys, queues and a
receipts list of its own in Redis, and a database per project in a temporary folder,
so that a shared Redis (``$TOOT_REDIS_URL``) is neither polluted nor confusing. Unlike
the tests', the processes log only warnings: an INFO line per event or task costs CPU
that the benchmark would count as toot's.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from bench import procstat
from devtools.processes import (
    ROOT,
    Process,
    celery_worker_argv,
    free_port,
    gunicorn_argv,
    project_env,
    project_process,
    wait_for_http,
)
from devtools.redis_server import start_redis

SUBSCRIBER_CHANNEL = "bench.v1"  # as example_app/bench.py subscribes it
CHANNEL_PREFIX = "org.example.publisher."
CHANNEL = CHANNEL_PREFIX + SUBSCRIBER_CHANNEL
ROLES = ("publisher", "subscriber")
APP_PROCESSES = ("publisher-web", "publisher-worker", "subscriber-web", "subscriber-worker")


class BenchError(Exception):
    """The benchmark cannot go on."""


@dataclass
class Options:
    web_workers: int = 2
    web_threads: int = 4
    concurrency: int = 2
    signed: bool = True
    copies: int = 1  # the most callback URLs any burst subscribes


class Topology:
    def __init__(self, options: Options, log_dir: Path | None = None) -> None:
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"toot-bench-{self.run_id}"
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.processes: dict[str, Process] = {}
        self.redis_url = os.environ.get("TOOT_REDIS_URL", "")
        self.embedded_redis = not self.redis_url
        self.ports = {role: free_port() for role in ROLES}
        self.publisher_url = f"http://127.0.0.1:{self.ports['publisher']}"
        self.subscriber_url = f"http://127.0.0.1:{self.ports['subscriber']}"
        self.callback_url = f"{self.subscriber_url}/toot/callbacks"
        self.subscriptions_url = f"{self.publisher_url}/toot/subscriptions"
        self.receipts_key = f"{self.prefix}:receipts"
        self.queues = {role: f"{self.prefix}-{role}" for role in ROLES}
        self.token = secrets.token_urlsafe(24)
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.subscribed: list[str] = []
        self.batch = False  # whether copies register for batches (PROTOCOL.md section 7)
        self._client: redis.Redis | None = None
        self.env: dict[str, dict[str, str]] = {}

    # Processes

    def start_redis(self) -> None:
        if self.embedded_redis:
            self.processes["redis"], self.redis_url = start_redis(log_dir=self.log_dir)
        self._client = redis.Redis.from_url(self.redis_url)
        self.client.ping()

    def _build_env(self, mode: str) -> None:
        common = {
            "TOOT_REDIS_URL": self.redis_url,
            "TOOT_CALLBACK_URL": self.callback_url,
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": self.subscriptions_url,
            "TOOT_SUBSCRIPTIONS_TOKENS": self.token,
            "TOOT_PUBLISHER_TOKEN": self.token,
            # A failed delivery is retried within the run, so it shows as slow, not lost.
            "TOOT_RETRY_SCHEDULE": "1,2,5,10",
            "TOOT_LOG_LEVEL": "WARNING",
            "EXAMPLE_RECEIPTS_KEY": self.receipts_key,
            "EXAMPLE_BENCH_COPIES": str(self.options.copies),
            "PYTHONUNBUFFERED": "1",
        }
        if self.options.signed:
            # As the README advises: deliveries signed (Standard Webhooks), checked on receipt.
            common |= {"TOOT_SIGNING_SECRETS": self.secret, "TOOT_PUBLISHER_SECRETS": self.secret}
        # The subscriber's TOOT["BATCH"]; subscribe_copies registers the same way.
        common["TOOT_BATCH"] = "1" if mode == "batch" else "0"
        self.batch = mode == "batch"
        self.env = {
            role: {
                **common,
                "CELERY_QUEUE": self.queues[role],
                # Each project its own keys: a worker drains the queues under its prefix.
                "TOOT_KEY_PREFIX": f"{self.prefix}:{role}:",
                "DATABASE_URL": f"sqlite:///{self.log_dir / role}.sqlite3",
            }
            for role in ROLES
        }

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise BenchError("Redis is not started")
        return self._client

    def start_apps(self, mode: str) -> None:
        """gunicorn and a Celery worker for each side, in ``mode``, answering HTTP.

        The first time, the databases are migrated first; later (another mode) the
        running ones are stopped first. Redis, keys and queues stay.
        """
        first = not self.env
        for name in APP_PROCESSES:
            if name in self.processes:
                self.processes.pop(name).stop()
        self._build_env(mode)
        if first:
            migrations = [self._manage(role, "migrate", "--noinput") for role in ROLES]
            for role, migration in zip(ROLES, migrations, strict=True):
                if migration.wait(timeout=120) != 0:
                    log = self.log_dir / f"{role}-migrate.log"
                    raise BenchError(f"migrate of {role} failed: see {log}")
        for role in ROLES:
            self.processes[f"{role}-web"] = self._web(role)
            self.processes[f"{role}-worker"] = self._worker(role)
        for role in ROLES:
            url = self.publisher_url if role == "publisher" else self.subscriber_url
            wait_for_http(self.processes[f"{role}-web"], f"{url}/")
        # The workers log no "ready." at WARNING: the warm-up's events prove them ready.

    def setting(self, role: str, key: str) -> str:
        """``conf.get(key)`` of toot as ``role``'s settings give it, as text."""
        code = f"from toot.conf import conf; print('toot-setting', conf.get({key!r}))"
        process = self._manage(role, "shell", "-c", code, log=f"{role}-setting")
        if process.wait(timeout=120) != 0:
            raise BenchError(f"reading {key} of {role} failed: see {self.log_dir}")
        for line in (self.log_dir / f"{role}-setting.log").read_text().splitlines():
            if line.startswith("toot-setting "):
                return line.split(" ", 1)[1]
        raise BenchError(f"reading {key} of {role} printed nothing: see {self.log_dir}")

    def _manage(self, role: str, *args: str, log: str = "") -> subprocess.Popen[bytes]:
        output = open(self.log_dir / f"{log or role + '-' + args[0]}.log", "wb")  # noqa: SIM115
        try:
            return subprocess.Popen(
                [sys.executable, "manage.py", *args],
                cwd=ROOT / "example_project",
                env={**os.environ, **project_env(self.env[role], f"example_project.{role}")},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        finally:
            output.close()

    def _process(self, name: str, role: str, argv: list[str], env: Mapping[str, str]) -> Process:
        return project_process(name, argv, env, f"example_project.{role}", self.log_dir)

    def _web(self, role: str) -> Process:
        argv = gunicorn_argv(
            self.ports[role], self.options.web_workers, self.options.web_threads, quiet=True
        )
        return self._process(f"{role}-web", role, argv, self.env[role])

    def _worker(self, role: str) -> Process:
        argv = celery_worker_argv(
            "example_project",
            f"{self.prefix}-{role}@%h",
            self.options.concurrency,
            loglevel="WARNING",
        )
        return self._process(f"{role}-worker", role, argv, self.env[role])

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

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if not process.running:
                raise BenchError(f"{name} exited:\n{process.log()[-3000:]}")

    def pids(self) -> dict[str, int]:
        """The measured processes by name (their process trees are what is counted)."""
        names = list(APP_PROCESSES)
        if self.embedded_redis:
            names.append("redis")
        return {
            name: self.processes[name].popen.pid  # type: ignore[union-attr]
            for name in names
            if name in self.processes and self.processes[name].popen is not None
        }

    def cpu(self) -> dict[str, float]:
        return {name: procstat.cpu_seconds(pid) for name, pid in self.pids().items()}

    def stop(self) -> list[str]:
        """Stop every process; on a shared Redis remove this run's keys. Says what it did."""
        said = []
        for name in reversed(list(self.processes)):
            if name != "redis":
                self.processes[name].stop()
        if self._client is not None and not self.embedded_redis:
            try:
                keys = list(self.client.scan_iter(match=f"*{self.prefix}*", count=1000))
                if keys:
                    self.client.delete(*keys)
                said.append(f"removed this run's {len(keys)} keys from {self.redis_url}")
            except redis.RedisError as exc:
                said.append(f"could not remove this run's keys from {self.redis_url}: {exc}")
        if "redis" in self.processes:
            self.processes["redis"].stop()
        return said

    # Subscriptions: M callback URLs for the one channel

    def copy_url(self, copy: int) -> str:
        return self.callback_url if copy == 0 else f"{self.callback_url}?copy={copy}"

    def subscribe_copies(self, copies: int) -> None:
        """Subscribe exactly copies 0..copies-1 of the callback URL to the channel."""
        wanted = [self.copy_url(copy) for copy in range(copies)]
        headers = {"Authorization": f"Bearer {self.token}"}
        with requests.Session() as session:
            for url in self.subscribed:
                if url not in wanted:
                    response = session.delete(
                        self.subscriptions_url,
                        params={"channel": CHANNEL, "callback_url": url},
                        headers=headers,
                        timeout=10,
                    )
                    if response.status_code != 204:
                        raise BenchError(
                            f"unsubscribing {url}: {response.status_code} {response.text}"
                        )
            for url in wanted:
                response = session.post(
                    self.subscriptions_url,
                    json={"channel": CHANNEL, "callback_url": url, "batch": self.batch},
                    headers=headers,
                    timeout=10,
                )
                if response.status_code not in (201, 204):
                    raise BenchError(f"subscribing {url}: {response.status_code} {response.text}")
            response = session.get(
                self.subscriptions_url,
                headers={**headers, "Accept": "application/json"},
                timeout=10,
            )
        listed = response.json()["subscriptions"].get(CHANNEL, [])
        if sorted(listed) != sorted(wanted):
            raise BenchError(f"the publisher lists {listed} for {CHANNEL}, not {wanted}")
        self.subscribed = wanted

    # Receipts: one per handler run, {"id", "copy", "sent_at", "received_at"}

    def receipt_count(self) -> int:
        return int(self.client.llen(self.receipts_key))

    def receipts(self) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.receipts_key, 0, -1)]

    def clear_receipts(self) -> None:
        self.client.delete(self.receipts_key)

    def wait_for_receipts(self, expected: int, stall: float, interval: float = 0.01) -> bool:
        """Until ``expected`` receipts are in, or none came for ``stall`` seconds."""
        count, last_change = -1, time.monotonic()
        polls = 0
        while True:
            current = self.receipt_count()
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

    def queues_empty(self) -> bool:
        return not any(self.client.llen(queue) for queue in self.queues.values())
