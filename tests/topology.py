"""The example project as real processes, for the end-to-end and fault tests.

Publisher and subscriber each run gunicorn and a Celery worker, with their own SQLite
database (toot's outbox and dead letters) in a temporary folder, on the tests' Redis.
Keys, queues and the receipts list carry a name of their own, so topologies never see
each other's data; publisher and subscriber have a key prefix each, as two projects
sharing a Redis must (a worker's relay drains every toot queue under its prefix). The
example subscriber's handler appends a receipt for every event it runs for to a Redis
list, which tests read.

The publisher may get a Redis of its own, for a fault test to kill: as its Celery broker
only (``own_broker``), or as toot's store, which its broker then shares as it does by
default (``own_store``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import redis
import requests
from django.conf import settings

from devtools.processes import (
    ROOT,
    Process,
    celery_worker,
    free_port,
    project_env,
    wait_for,
    web_server,
)
from devtools.redis_server import redis_server_binary
from tests.http_server import RecordedRequest, Reply

PREFIX = "org.example.publisher."
ROLES = ("publisher", "subscriber")
# What toot.publisher.sending logs for each attempt (toot's own log format names the logger; the
# Celery worker repeats each line in its own format, which this leaves out).
ATTEMPT_LOG = re.compile(
    r" toot\.publisher\.sending Events? (?P<ids>[\w-]+(?:, [\w-]+)*) on \S+(?: \(batch \w+\))?: "
    r"(?:delivered to (?P<delivered_to>\S+) \(status \w+, attempt (?P<attempt>\d+)\)"
    r"|delivery to (?P<failed_to>\S+) failed \(attempt (?P<failed_attempt>\d+),)"
)
# What gunicorn's access log says of a callback its server accepted.
CALLBACK_ACCEPTED = '"POST /toot/callbacks HTTP/1.1" 200 '


class Attempt(NamedTuple):
    """One POST the publisher logged: the events it carried, where, and how it went."""

    event_ids: tuple[str, ...]
    url: str
    number: int
    ok: bool


def attempts(log: str) -> list[Attempt]:
    """The delivery attempts a publisher's worker logged, in order."""
    found = []
    for match in ATTEMPT_LOG.finditer(log):
        ids = tuple(match["ids"].split(", "))
        if match["delivered_to"]:
            found.append(Attempt(ids, match["delivered_to"], int(match["attempt"]), True))
        else:
            found.append(Attempt(ids, match["failed_to"], int(match["failed_attempt"]), False))
    return found


class RedisServer:
    """A redis-server of the topology's own, restartable on the same port.

    It keeps its data across a kill -9 (an append-only file, written at every command), as
    a production Redis that holds toot's subscriptions must.
    """

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_dir = log_dir
        self.data_dir = log_dir / name
        self.data_dir.mkdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Process | None = None

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        argv += ["--dir", str(self.data_dir)]
        self.process = Process(self.name, argv, log_dir=self.log_dir).start()
        try:
            wait_for(self.answers, 20, f"{self.name} on port {self.port}")
        except BaseException:
            self.process.stop()
            raise

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed but what the append-only file already holds."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Topology:
    def __init__(
        self,
        name: str,
        *,
        retry_schedule: str = "0.2,0.5,1,1,1",
        own_broker: bool = False,
        own_store: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        run = f"{settings.RUN_ID}-{name}"
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"toot-{name}-"))
        self.ports = {role: free_port() for role in ROLES}
        self.publisher_url = f"http://127.0.0.1:{self.ports['publisher']}"
        self.callback_url = f"http://127.0.0.1:{self.ports['subscriber']}/toot/callbacks"
        self.subscriptions_url = f"{self.publisher_url}/toot/subscriptions"
        self.key_prefix = f"toot-test-{run}:"
        self.key_prefixes = {role: f"{self.key_prefix}{role}:" for role in ROLES}
        self.receipts_key = f"{self.key_prefix}receipts"
        self.queues = {role: f"toot-test-{run}-{role}" for role in ROLES}
        self.broker = RedisServer("broker", self.log_dir) if own_broker else None
        self.store = RedisServer("store", self.log_dir) if own_store else None
        common = {
            "TOOT_REDIS_URL": settings.REDIS_URL,
            "TOOT_RETRY_SCHEDULE": retry_schedule,
            "TOOT_CALLBACK_URL": self.callback_url,
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": self.subscriptions_url,
            "EXAMPLE_RECEIPTS_KEY": self.receipts_key,
            **(env or {}),
        }
        self.env = {
            role: {
                **common,
                # A key prefix of each project's own, as two projects on one Redis need:
                # each worker's relay drains every toot queue under its prefix.
                "TOOT_KEY_PREFIX": self.key_prefixes[role],
                "CELERY_QUEUE": self.queues[role],
                "DATABASE_URL": f"sqlite:///{self.log_dir / role}.sqlite3",
            }
            for role in ROLES
        }
        if self.store is not None:
            # The example's broker defaults to toot's Redis: the two go down together.
            self.env["publisher"]["TOOT_REDIS_URL"] = self.store.url
        if self.broker is not None:
            self.env["publisher"]["CELERY_BROKER_URL"] = self.broker.url
        self.processes: dict[str, Process] = {}
        # What ``register()`` printed, kept by a test fixture that registers once for a module.
        self.registration_output = ""

    # Processes

    def start(self) -> None:
        for server in (self.broker, self.store):
            if server is not None:
                server.start()
        for role in ROLES:
            self.manage(role, "migrate", "--verbosity", "0", check=True)
        for role in ROLES:
            self.start_web(role)
            self.start_worker(role)

    def start_web(self, role: str) -> None:
        self.processes[f"{role}-web"] = web_server(
            f"{role}-web",
            f"example_project.{role}",
            self.ports[role],
            self.env[role],
            log_dir=self.log_dir,
        )

    def start_worker(self, role: str, name: str | None = None) -> Process:
        name = name or f"{role}-worker"
        self.processes[name] = process = celery_worker(
            name, f"example_project.{role}", self.env[role], log_dir=self.log_dir
        )
        return process

    def stop(self, redis) -> None:
        for process in self.processes.values():
            process.stop()
        for server in (self.broker, self.store):
            if server is not None:
                server.stop()
        keys = list(redis.scan_iter(match=f"{self.key_prefix}*", count=1000))
        redis.delete(*keys, *self.queues.values())

    def manage(
        self, role: str, *args: str, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``manage.py *args`` as ``role``, with ``env`` over the role's environment."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT / "example_project",
            env={
                **os.environ,
                **project_env({**self.env[role], **(env or {})}, f"example_project.{role}"),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def log_from_now(self, name: str) -> Callable[[], str]:
        """What process ``name`` logs from now on."""
        process = self.processes[name]
        start = len(process.log())
        return lambda: process.log()[start:]

    # toot's state, as the role's processes see it

    def pending(self, role: str, name: str) -> int:
        """Items in ``role``'s queue ``name``: ready, held by drains, or waiting for a retry.

        Read from toot.engine.queue's documented key layout with a client of its own, not through
        toot with the settings overridden: an override reaches every thread of this
        process, the relay of the tests' own worker included, which would then wake
        ``role``'s queue and start a drain there that no worker of ``role`` runs.
        """
        client = redis.Redis.from_url(self.env[role]["TOOT_REDIS_URL"], decode_responses=True)
        try:
            base = f"{self.key_prefixes[role]}queue:{{{name}}}:"
            drains = [str(drain) for drain in client.zrange(f"{base}leases", 0, -1)]
            held = [int(client.llen(f"{base}claimed:{drain}")) for drain in drains]
            return (
                int(client.llen(f"{base}ready")) + int(client.zcard(f"{base}delayed")) + sum(held)
            )
        finally:
            client.close()

    def claimed(self, role: str, name: str) -> dict[str, int]:
        """How many items each drain with a lease on ``role``'s queue ``name`` holds."""
        client = redis.Redis.from_url(self.env[role]["TOOT_REDIS_URL"], decode_responses=True)
        try:
            base = f"{self.key_prefixes[role]}queue:{{{name}}}:"
            drains = [str(drain) for drain in client.zrange(f"{base}leases", 0, -1)]
            return {drain: int(client.llen(f"{base}claimed:{drain}")) for drain in drains}
        finally:
            client.close()

    def worker_running(self, drain_id: str) -> str | None:
        """The name of the worker that last logged a claim for drain ``drain_id``.

        A drain hands over to a new message between batches, on any worker: the latest
        claim names the worker that holds the current one. toot logs each claim at DEBUG:
        start the topology with ``TOOT_LOG_LEVEL=DEBUG``. Log lines start with their time.
        """
        claims = re.compile(rf"^(\S+ \S+) DEBUG toot\.engine\.drain Drain {drain_id} of the ", re.M)
        latest = {}
        for name, process in self.processes.items():
            times = claims.findall(process.log()) if process.running else []
            if times:
                latest[name] = max(times)
        return max(latest, key=latest.__getitem__, default=None)

    def end_leases(self, role: str, name: str) -> list[str]:
        """End every live lease on ``role``'s queue ``name`` now; the drain ids.

        What time does ``toot.engine.queue.LEASE_SECONDS`` after a drain died, without the wait:
        the lease's score (when it ends, in Redis time) is set to a second ago, so the next
        relay gives back what the drain held. Leases live under toot.engine.queue's documented
        layout, ``KEY_PREFIX + "queue:{<name>}:leases"``.
        """
        client = redis.Redis.from_url(self.env[role]["TOOT_REDIS_URL"], decode_responses=True)
        try:
            key = f"{self.key_prefixes[role]}queue:{{{name}}}:leases"
            seconds, _ = client.time()
            drains = [str(drain) for drain in client.zrangebyscore(key, seconds, "+inf")]
            if drains:
                client.zadd(key, dict.fromkeys(drains, seconds - 1), xx=True)
            return drains
        finally:
            client.close()

    # What a user does

    def register(self, **env: str) -> str:
        """Run the subscriber's ``toot_register_subscriptions``, with ``env`` over its own."""
        return self.manage("subscriber", "toot_register_subscriptions", check=True, env=env).stdout

    def publish(self, channel: str, payload, count: int = 1) -> list[dict[str, Any]]:
        """``toot.publish()`` ``count`` times in a publisher process; the events' wire forms."""
        code = (
            "import toot\n"
            f"for n in range({count}):\n"
            f"    payload = {payload!r}\n"
            "    if isinstance(payload, dict): payload = {**payload, 'n': n}\n"
            f"    print(toot.publish({channel!r}, payload).to_json())\n"
        )
        result = self.manage("publisher", "shell", "-c", code, check=True)
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def subscriptions(self) -> dict[str, list[str]]:
        response = requests.get(
            self.subscriptions_url, headers={"Accept": "application/json"}, timeout=5
        )
        response.raise_for_status()
        subscriptions: dict[str, list[str]] = response.json()["subscriptions"]
        return subscriptions

    def subscribe(self, channel: str, callback_url: str, *, batch: bool = False) -> None:
        body: dict[str, Any] = {"channel": channel, "callback_url": callback_url}
        if batch:
            body["batch"] = True
        response = requests.post(self.subscriptions_url, json=body, timeout=5)
        assert response.status_code in (201, 204), response.text

    def unsubscribe(self, channel: str, callback_url: str) -> None:
        response = requests.delete(
            self.subscriptions_url,
            params={"channel": channel, "callback_url": callback_url},
            timeout=5,
        )
        assert response.status_code == 204, response.text

    def forward(self, request: RecordedRequest) -> Reply:
        """Pass a delivery a test server received on to the subscriber; its answer back."""
        forwarded = requests.post(
            self.callback_url,
            data=request.body,
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        return Reply(status=forwarded.status_code)

    def receipts(self, redis) -> list[dict[str, Any]]:
        return [json.loads(item) for item in redis.lrange(self.receipts_key, 0, -1)]

    def count_rows(self, role: str, model: str) -> int:
        """Rows of a toot model in ``role``'s database."""
        code = f"from toot.models import {model}; print({model}.objects.count())"
        # Django 5.2's shell may print its automatic imports first.
        return int(self.manage(role, "shell", "-c", code, check=True).stdout.split()[-1])


def event_ids(body: bytes | dict[str, Any]) -> list[str]:
    """The ids of the events in a callback body: one event, or a batch."""
    data = json.loads(body) if isinstance(body, bytes) else body
    return [event["id"] for event in data["events"]] if "events" in data else [data["id"]]


def count(sent: list[dict[str, Any]], receipts: list[dict[str, Any]]) -> dict[str, int]:
    """Published, delivered, duplicated and lost, by event id."""
    sent_ids = {event["id"] for event in sent}
    received = [receipt["id"] for receipt in receipts if receipt["id"] in sent_ids]
    return {
        "published": len(sent_ids),
        "delivered": len(set(received)),
        "duplicated": len(received) - len(set(received)),
        "lost": len(sent_ids - set(received)),
    }
