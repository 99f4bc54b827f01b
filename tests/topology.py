"""The example project as real processes (devtools/topology.py), for the end-to-end and
fault tests, on the tests' Redis and Celery broker, with what only the tests need: logs
read for delivery attempts, toot's queues read for what drains hold, counts by event id,
and a side's metrics scraped.

The publisher may get a broker of its own, for a fault test to kill (``own_broker``): a
Redis, or on RabbitMQ a proxy in front of the tests' RabbitMQ, which other users share
and must stay up. Or it may get a Redis of its own as toot's store (``own_store``), which
its broker then shares as it does by default, unless the tests' broker is RabbitMQ.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import redis
import requests
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from devtools import topology as base
from devtools.broker import is_redis
from devtools.processes import WORKER_READY, Process, celery_worker_argv, free_port, wait_for
from devtools.redis_server import redis_server_binary
from tests.broker import BrokerProxy
from tests.http_server import RecordedRequest, Reply
from toot.engine.connection import new_client

PREFIX = base.CHANNEL_PREFIX
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


class Topology(base.Topology):
    """The example project on the tests' Redis, named ``name`` within this test run."""

    def __init__(
        self,
        name: str,
        *,
        retry_schedule: str = "0.2,0.5,1,1,1",
        own_broker: bool = False,
        own_store: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        # The example's broker defaults to toot's Redis: set only when it is another.
        other_broker = settings.CELERY_BROKER_URL != settings.REDIS_URL
        super().__init__(
            "test",
            run_id=f"{settings.RUN_ID}-{name}",
            redis_url=settings.REDIS_URL,
            broker_url=settings.CELERY_BROKER_URL if other_broker else None,
            retry_schedule=retry_schedule,
            env=env,
            log_dir=Path(tempfile.mkdtemp(prefix=f"toot-{name}-")),
        )
        self.broker: RedisServer | BrokerProxy | None = None
        if own_broker and is_redis(settings.CELERY_BROKER_URL):
            self.broker = RedisServer("broker", self.log_dir)
        elif own_broker:
            self.broker = BrokerProxy(settings.CELERY_BROKER_URL)
        self.store = RedisServer("store", self.log_dir) if own_store else None
        if self.store is not None:
            # The example's broker defaults to toot's Redis: the two go down together, but
            # for a broker_url of the topology's.
            self.role_env["publisher"]["TOOT_REDIS_URL"] = self.store.url
        if self.broker is not None:
            self.role_env["publisher"]["CELERY_BROKER_URL"] = self.broker.url
        # What ``register()`` printed, kept by a test fixture that registers once for a module.
        self.registration_output = ""

    def start(self) -> None:
        for server in (self.broker, self.store):
            if server is not None:
                server.start()
        super().start()

    def stop(self) -> list[str]:
        said = super().stop()
        for server in (self.broker, self.store):
            if server is not None:
                server.stop()
        return said

    def start_queue_worker(self, role: str, name: str, celery_queue: str) -> Process:
        """A Celery worker of ``role``, named ``name``, that consumes ``celery_queue`` only."""
        argv = celery_worker_argv("example_project", f"{self.prefix}-{name}@%h", self.concurrency)
        process = self.project_process(name, role, [*argv, "--queues", celery_queue])
        self.other_queues.append(celery_queue)
        process.wait_for_log(WORKER_READY)
        return process

    def log_from_now(self, name: str) -> Callable[[], str]:
        """What process ``name`` logs from now on."""
        process = self.processes[name]
        start = len(process.log())
        return lambda: process.log()[start:]

    # toot's state, as the role's processes see it

    def _toot_redis(self, role: str) -> redis.Redis:
        return new_client(self.environ(role)["TOOT_REDIS_URL"], 10, decode_responses=True)

    def pending(self, role: str, name: str) -> int:
        """Items in ``role``'s queue ``name``: ready, held by drains, or waiting for a retry.

        Read from toot.engine.queue's documented key layout with a client of its own, not through
        toot with the settings overridden: an override reaches every thread of this
        process, the relay of the tests' own worker included, which would then wake
        ``role``'s queue and start a drain there that no worker of ``role`` runs.
        """
        held = sum(self.claimed(role, name).values())
        client = self._toot_redis(role)
        try:
            base = self._queue_base(role, name)
            count = int(client.llen(f"{base}ready")) + int(client.zcard(f"{base}delayed")) + held
            if name != "out":
                return count
            # And what waits in the lanes of toot.publisher.lanes, or is held by senders.
            lanes = self._lanes_base(role)
            count += sum(self.held(role).values())
            # Each callback URL's retries, in a sorted set of its own (the index lists them).
            for url in map(str, client.zrange(f"{lanes}delayed", 0, -1)):  # decoded already
                count += int(client.zcard(f"{lanes}delayed:{url}"))
            return count + sum(int(client.llen(k)) for k in client.scan_iter(f"{lanes}ready:*"))
        finally:
            client.close()

    def _lanes_base(self, role: str) -> str:
        prefix = self.key_prefixes[role]
        return f"{prefix}lanes:{{{prefix}out}}:"

    def held(self, role: str) -> dict[str, int]:
        """How many items each sender pool of ``role`` holds (toot.publisher.lanes' layout:
        a claim per thread, its URL and items one per line)."""
        client = self._toot_redis(role)
        try:
            base = self._lanes_base(role)
            hosts = [str(host) for host in client.zrange(f"{base}hosts", 0, -1)]
            return {
                host: sum(str(claim).count("\n") for claim in client.hvals(f"{base}held:{host}"))
                for host in hosts
            }
        finally:
            client.close()

    def claimed(self, role: str, name: str) -> dict[str, int]:
        """How many items each drain with a lease on ``role``'s queue ``name`` holds."""
        client = self._toot_redis(role)
        try:
            base = self._queue_base(role, name)
            drains = [str(drain) for drain in client.zrange(f"{base}leases", 0, -1)]
            return {drain: int(client.llen(f"{base}claimed:{drain}")) for drain in drains}
        finally:
            client.close()

    def _queue_base(self, role: str, name: str) -> str:
        """Where ``role``'s queue ``name`` keeps its keys (toot.engine.queue's layout)."""
        prefix = self.key_prefixes[role]
        return f"{prefix}queue:{{{prefix}{name}}}:"

    def worker_running(self, drain_id: str) -> str | None:
        """The name of the worker that last logged a claim for drain (or sender pool)
        ``drain_id``.

        A drain hands over to a new message between batches, on any worker: the latest
        claim names the worker that holds the current one. toot logs each claim at DEBUG:
        start the topology with ``TOOT_LOG_LEVEL=DEBUG``. Log lines start with their time.
        """
        claims = re.compile(rf"^(\S+ \S+) DEBUG toot\.\S+ (?:Drain|Senders) {drain_id} ", re.M)
        latest = {}
        for name, process in self.processes.items():
            times = claims.findall(process.log()) if process.running else []
            if times:
                latest[name] = max(times)
        return max(latest, key=latest.__getitem__, default=None)

    # What a user does, beyond the shared topology's

    def publish(self, channel: str, payload, count: int = 1) -> list[dict[str, Any]]:
        """``toot.publish()`` ``count`` times in a publisher process; the events' wire forms."""
        code = (
            "import toot\n"
            f"for n in range({count}):\n"
            f"    payload = {payload!r}\n"
            "    if isinstance(payload, dict): payload = {**payload, 'n': n}\n"
            f"    print(toot.publish({channel!r}, payload).to_json())\n"
        )
        result = self.manage("publisher", "shell", "-c", code)
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def forward(self, request: RecordedRequest) -> Reply:
        """Pass a delivery a test server received on to the subscriber; its answer back."""
        forwarded = requests.post(
            self.callback_url,
            data=request.body,
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        return Reply(status=forwarded.status_code)

    def count_rows(self, role: str, model: str) -> int:
        """Rows of a toot model in ``role``'s database."""
        code = f"from toot.models import {model}; print({model}.objects.count())"
        # Django 5.2's shell may print its automatic imports first.
        return int(self.manage(role, "shell", "-c", code).stdout.split()[-1])


class Scrape:
    """One scrape of a side's /metrics: samples by name, each with its labels."""

    def __init__(self, url: str) -> None:
        response = requests.get(f"{url}/metrics", timeout=10)
        response.raise_for_status()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return sum(
            value
            for found, value in self.samples.get(name, [])
            if all(found.get(k) == v for k, v in labels.items())
        )


@contextmanager
def running(topology: Topology) -> Iterator[Topology]:
    """``topology`` started, with the subscriber registered, until the block ends."""
    try:
        topology.start()
        topology.register()
        yield topology
    finally:
        topology.stop()


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


PACED_PUBLISH = """
import time, toot
for n in range({count}):
    print(toot.publish("users.updated.v1", {{"id": 1, "n": n}}).to_json(), flush=True)
    time.sleep(0.004)
"""


def stream_through_failover(
    topology: Topology, events: int, fail: Callable[[], object]
) -> dict[str, Any]:
    """Publish ``events`` events at about 200 a second from the publisher's shell; once a
    third are handled, ``fail()`` (a Redis master killed, returning once another took
    over); then wait until every event is handled. What it took: the counts (``count``),
    ``delivered_twice`` (by the publisher's log), ``published_to_the_outbox``,
    ``failover_seconds`` (what ``fail()`` took) and ``longest_pause`` between two handled
    events."""
    log = topology.log_from_now("publisher-worker")
    sent: list[dict[str, Any]] = []
    outboxed: list[int] = []

    def publish() -> None:
        result = topology.manage("publisher", "shell", "-c", PACED_PUBLISH.format(count=events))
        sent.extend(json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{")
        outboxed.append(result.stderr.count("kept in the outbox"))

    publishing = threading.Thread(target=publish)
    publishing.start()
    wait_for(lambda: topology.receipt_count() >= events // 3, 60, "a third handled")
    started = time.monotonic()
    fail()
    failover = time.monotonic() - started
    publishing.join(120)
    assert len(sent) == events
    counts = lambda: count(sent, topology.receipts())  # noqa: E731
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    delivered = [i for a in attempts(log()) if a.ok for i in a.event_ids]
    handled_at = sorted(receipt["received_at"] for receipt in topology.receipts())
    return {
        **counts(),
        "delivered_twice": len(delivered) - len(set(delivered)),
        "published_to_the_outbox": outboxed[0],
        "failover_seconds": round(failover, 1),
        "longest_pause": round(max(b - a for a, b in pairwise(handled_at)), 1),
    }
