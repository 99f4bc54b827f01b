"""The example project as real processes, for the demo, the tests and the benchmark.

Redis (an embedded redis-server unless a URL is given), and for the publisher and the
subscriber each a gunicorn and a Celery worker, with a SQLite database each (toot's outbox
and dead letters) in a temporary folder that also holds every process's log. Keys, queues
and the receipts list carry the topology's prefix, so that a shared Redis is neither
polluted nor confusing, and lose them when it stops; publisher and subscriber have a key
prefix each, as two projects sharing a Redis must (a worker's relay drains every toot
queue under its prefix). The example subscriber's handler appends a receipt for every
event it runs for to the receipts list, which the callers read.

The demo, the tests (tests/topology.py) and the benchmark (bench/topology.py) each add
what is their own.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests

from devtools import broker
from devtools.processes import (
    ROOT,
    WORKER_READY,
    Process,
    celery_worker_argv,
    free_port,
    wait_for_http,
)
from devtools.redis_server import start_redis
from toot.engine.connection import new_client

ROLES = ("publisher", "subscriber")
APP_PROCESSES = ("publisher-web", "publisher-worker", "subscriber-web", "subscriber-worker")
# The example publisher's TOOT["CHANNEL_PREFIX"], before every channel it publishes on.
CHANNEL_PREFIX = "org.example.publisher."
PROJECT_DIR = ROOT / "example_project"


class TopologyError(Exception):
    """The topology cannot start, or a request to it failed."""


def project_env(env: Mapping[str, str], settings_module: str) -> dict[str, str]:
    """``env`` for a process of the example project, importing toot from this checkout."""
    paths = [str(ROOT), *filter(None, [env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))])]
    return {
        **env,
        "DJANGO_SETTINGS_MODULE": settings_module,
        "PYTHONPATH": os.pathsep.join(paths),
    }


def gunicorn_argv(port: int, workers: int, threads: int, *, quiet: bool = False) -> list[str]:
    """gunicorn serving the example project on loopback (``quiet``: warnings, no access log)."""
    logging = ["--log-level", "warning"] if quiet else ["--access-logfile", "-"]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--worker-class",
        "gthread",
        *logging,
        "--graceful-timeout",
        "5",
        "example_project.wsgi:application",
    ]


class Topology:
    """Redis, and gunicorn and a Celery worker for each of the example's two projects.

    ``kind`` and ``run_id`` name the run (``toot-<kind>-<run_id>``, a new run id by
    default); ``redis_url`` is the Redis to use, by default ``$TOOT_REDIS_URL`` or else an
    embedded one. ``token`` closes the publisher's subscriptions endpoint with a bearer
    token that the subscriber sends, ``broker_url`` is Celery's broker (by default toot's
    Redis, as the example's settings fall back to), ``signed`` signs deliveries with a secret the
    subscriber checks (both as docs/security.md advises). ``quiet`` processes log warnings only.
    ``env`` goes over the environment of both projects' processes; ``role_env[role]`` (set
    it before starting) over one project's.
    """

    def __init__(
        self,
        kind: str,
        *,
        run_id: str | None = None,
        redis_url: str | None = None,
        broker_url: str | None = None,
        retry_schedule: str = "0.5,1,2,5",
        token: bool = False,
        signed: bool = False,
        quiet: bool = False,
        web_workers: int = 2,
        web_threads: int = 4,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.prefix = f"toot-{kind}-{self.run_id}"
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.redis_url = redis_url or os.environ.get("TOOT_REDIS_URL", "")
        self.embedded_redis = not self.redis_url
        self.broker_url = broker_url
        self.retry_schedule = retry_schedule
        self.token = secrets.token_urlsafe(24) if token else None
        self.secret = (
            "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode() if signed else None
        )
        self.quiet = quiet
        self.web_workers, self.web_threads, self.concurrency = web_workers, web_threads, concurrency
        self.env = dict(env or {})
        self.role_env: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        self.settings_modules = {role: f"example_project.{role}" for role in ROLES}
        self.ports = {role: free_port() for role in ROLES}
        self.publisher_url = f"http://127.0.0.1:{self.ports['publisher']}"
        self.subscriber_url = f"http://127.0.0.1:{self.ports['subscriber']}"
        self.callback_url = f"{self.subscriber_url}/toot/callbacks"
        self.subscriptions_url = f"{self.publisher_url}/toot/subscriptions"
        self.key_prefixes = {role: f"{self.prefix}:{role}:" for role in ROLES}
        self.queues = {role: f"{self.prefix}-{role}" for role in ROLES}
        # Celery queues besides each role's own, that the caller's workers consume: deleted
        # with those from a broker that is not toot's Redis.
        self.other_queues: list[str] = []
        self.receipts_key = f"{self.prefix}:receipts"
        self.processes: dict[str, Process] = {}
        self.migrated = False
        self._client: redis.Redis | None = None

    def environ(self, role: str) -> dict[str, str]:
        """The environment of ``role``'s processes (the example's settings read it)."""
        env = {
            "TOOT_REDIS_URL": self.redis_url,
            "TOOT_CALLBACK_URL": self.callback_url,
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": self.subscriptions_url,
            "TOOT_RETRY_SCHEDULE": self.retry_schedule,
            "EXAMPLE_RECEIPTS_KEY": self.receipts_key,
            "PYTHONUNBUFFERED": "1",
        }
        if self.broker_url:
            env["CELERY_BROKER_URL"] = self.broker_url
        if self.quiet:
            env["TOOT_LOG_LEVEL"] = "WARNING"
        if self.token:
            env |= {"TOOT_SUBSCRIPTIONS_TOKENS": self.token, "TOOT_PUBLISHER_TOKEN": self.token}
        if self.secret:
            env |= {"TOOT_SIGNING_SECRETS": self.secret, "TOOT_PUBLISHER_SECRETS": self.secret}
        return {
            **env,
            **self.env,
            "CELERY_QUEUE": self.queues[role],
            # Each project its own keys: a worker drains the queues under its prefix.
            "TOOT_KEY_PREFIX": self.key_prefixes[role],
            "DATABASE_URL": f"sqlite:///{self.log_dir / role}.sqlite3",
            **self.role_env[role],
        }

    # Processes

    def start_redis(self) -> None:
        """The embedded redis-server, if the topology has one and it is not running yet."""
        if self.embedded_redis and "redis" not in self.processes:
            self.processes["redis"], self.redis_url = start_redis(log_dir=self.log_dir)
        self.client.ping()

    @property
    def client(self) -> redis.Redis:
        """A client of the topology's Redis (the one toot and the receipts use)."""
        if not self.redis_url:
            raise TopologyError("Redis is not started")
        if self._client is None:  # any URL toot takes, a Redis Cluster's too
            self._client = new_client(self.redis_url, 10)
        return self._client

    def start(self) -> None:
        """Redis, the databases (migrated the first time) and the four processes, started
        at once so that their startups overlap; then waits until each answers.

        A quiet Celery worker does not log that it is ready: the caller's first events
        prove it.
        """
        self.start_redis()
        if not self.migrated:
            self.migrate()
        for role in ROLES:
            self.start_web(role, wait=False)
            self.start_worker(role, wait=False)
        for role in ROLES:
            self.wait_for_web(role)
        if not self.quiet:
            for role in ROLES:
                self.processes[f"{role}-worker"].wait_for_log(WORKER_READY)

    def migrate(self) -> None:
        """Create both projects' databases (toot keeps dead letters and its outbox there)."""
        with ThreadPoolExecutor(len(ROLES)) as pool:
            list(pool.map(lambda role: self.manage(role, "migrate", "--noinput"), ROLES))
        self.migrated = True

    def project_process(self, name: str, role: str, argv: Sequence[str]) -> Process:
        """Start ``argv`` as a process ``name`` of ``role``'s project."""
        env = project_env(self.environ(role), self.settings_modules[role])
        process = Process(name, argv, env, cwd=PROJECT_DIR, log_dir=self.log_dir).start()
        self.processes[name] = process
        return process

    def start_web(self, role: str, *, wait: bool = True) -> Process:
        argv = gunicorn_argv(self.ports[role], self.web_workers, self.web_threads, quiet=self.quiet)
        process = self.project_process(f"{role}-web", role, argv)
        if wait:
            self.wait_for_web(role)
        return process

    def wait_for_web(self, role: str) -> None:
        url = self.publisher_url if role == "publisher" else self.subscriber_url
        wait_for_http(self.processes[f"{role}-web"], f"{url}/")

    def start_worker(self, role: str, name: str | None = None, *, wait: bool = True) -> Process:
        """A Celery worker of ``role``, named ``<role>-worker`` unless ``name`` is given; with
        wait (not when quiet), once it is ready."""
        name = name or f"{role}-worker"
        loglevel = "WARNING" if self.quiet else "INFO"
        argv = celery_worker_argv(
            "example_project", f"{self.prefix}-{name}@%h", self.concurrency, loglevel=loglevel
        )
        process = self.project_process(name, role, argv)
        if wait and not self.quiet:
            process.wait_for_log(WORKER_READY)
        return process

    def stop_apps(self) -> None:
        """Stop the four processes (and the tests' more workers); Redis, keys and queues stay.

        All at once: a Celery worker's warm shutdown waits for its drains, each up to 5 s,
        and one after the other these added up to 20 s per topology.
        """
        stopping = [self.processes.pop(n) for n in reversed(list(self.processes)) if n != "redis"]
        if stopping:
            with ThreadPoolExecutor(len(stopping)) as pool:
                list(pool.map(Process.stop, stopping))

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if not process.running:
                raise TopologyError(f"{name} exited:\n{process.log()[-3000:]}")

    def stop(self) -> list[str]:
        """Stop every process; on a shared Redis remove this run's keys, on a broker of its
        own this run's queues. Says what it did."""
        said = []
        self.stop_apps()
        if self.broker_url and not broker.is_redis(self.broker_url):
            try:
                broker.delete_queues(self.broker_url, [*self.queues.values(), *self.other_queues])
                said.append(f"deleted this run's queues from {self.broker_url}")
            except Exception as exc:  # kombu's and py-amqp's errors share no base
                said.append(f"could not delete this run's queues from {self.broker_url}: {exc}")
        if self._client is not None and not self.embedded_redis:
            try:
                # Keys under the prefix, the queues and kombu's bindings of them, not
                # another run whose prefix starts with this one.
                match = f"*{self.prefix}[-:]*"
                keys = list(self.client.scan_iter(match=match, count=1000))
                if keys:
                    self.client.delete(*keys)
                said.append(f"removed this run's {len(keys)} keys from {self.redis_url}")
            except redis.RedisError as exc:
                said.append(f"could not remove this run's keys from {self.redis_url}: {exc}")
        if "redis" in self.processes:
            self.processes.pop("redis").stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        return said

    def manage(
        self,
        role: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``manage.py *args`` as ``role``, with ``env`` over its environment; its output is
        also appended to ``<role>-<command>.log``. With check, a failure raises."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=PROJECT_DIR,
            env={
                **os.environ,
                **project_env({**self.environ(role), **(env or {})}, self.settings_modules[role]),
            },
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log = self.log_dir / f"{role}-{args[0]}.log"
        with log.open("a") as file:
            file.write(f"$ manage.py {shlex.join(args)}\n{result.stdout}{result.stderr}")
        if check and result.returncode != 0:
            raise TopologyError(
                f"manage.py {shlex.join(args)} of the {role} failed (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result

    def setup_publisher(self, **env: str) -> None:
        """Make this process the publisher project, as a view or a task of it would be, with
        ``env`` over its environment; then ``toot.publish()`` publishes from here."""
        os.environ.update(
            project_env({**self.environ("publisher"), **env}, self.settings_modules["publisher"])
        )
        if str(PROJECT_DIR) not in sys.path:
            sys.path.insert(0, str(PROJECT_DIR))
        import django

        django.setup()

    # What a user does

    def register(self, **env: str) -> str:
        """Run the subscriber's ``toot_register_subscriptions``, with ``env`` over its own;
        what it printed."""
        return self.manage("subscriber", "toot_register_subscriptions", env=env).stdout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def subscriptions(self) -> dict[str, list[str]]:
        """What the publisher lists: callback URLs by channel."""
        response = requests.get(
            self.subscriptions_url,
            headers={**self._headers(), "Accept": "application/json"},
            timeout=10,
        )
        response.raise_for_status()
        subscriptions: dict[str, list[str]] = response.json()["subscriptions"]
        return subscriptions

    def subscribe(
        self,
        channel: str,
        callback_url: str,
        *,
        batch: bool = False,
        rate_limit: float | None = None,
    ) -> None:
        """Subscribe ``callback_url`` to ``channel`` (the whole name, with its prefix)."""
        body: dict[str, Any] = {"channel": channel, "callback_url": callback_url, "batch": batch}
        if rate_limit is not None:
            body["rate_limit"] = rate_limit
        response = requests.post(
            self.subscriptions_url,
            json=body,
            headers=self._headers(),
            timeout=10,
        )
        if response.status_code not in (201, 204):
            raise TopologyError(
                f"subscribing {callback_url}: {response.status_code} {response.text}"
            )

    def unsubscribe(self, channel: str, callback_url: str) -> None:
        response = requests.delete(
            self.subscriptions_url,
            params={"channel": channel, "callback_url": callback_url},
            headers=self._headers(),
            timeout=10,
        )
        if response.status_code != 204:
            raise TopologyError(
                f"unsubscribing {callback_url}: {response.status_code} {response.text}"
            )

    # Receipts: what the subscriber's handlers record, one JSON object per run

    def receipts(self) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.receipts_key, 0, -1)]

    def receipt_count(self) -> int:
        return int(self.client.llen(self.receipts_key))

    def clear_receipts(self) -> None:
        self.client.delete(self.receipts_key)
