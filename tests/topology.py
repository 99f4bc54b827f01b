"""The example project as real processes, for the end-to-end and fault tests.

Publisher and subscriber each run gunicorn and a Celery worker, with their own SQLite
database (toot's outbox and dead letters) in a temporary folder, on the tests' Redis.
Keys, queues and the receipts list carry a name of their own, so topologies never see
each other's data. The example subscriber's handler appends a receipt for every event
it runs for to a Redis list, which tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests
from django.conf import settings

from devtools.processes import ROOT, Process, celery_worker, free_port, project_env, web_server
from devtools.redis_server import start_redis
from tests.http_server import RecordedRequest, Reply

PREFIX = "org.example.publisher."
ROLES = ("publisher", "subscriber")


class Topology:
    def __init__(
        self,
        name: str,
        *,
        retry_schedule: str = "0.2,0.5,1,1,1",
        separate_broker: bool = False,
        visibility_timeout: int = 3600,
    ) -> None:
        run = f"{settings.RUN_ID}-{name}"
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"toot-{name}-"))
        self.ports = {role: free_port() for role in ROLES}
        self.publisher_url = f"http://127.0.0.1:{self.ports['publisher']}"
        self.callback_url = f"http://127.0.0.1:{self.ports['subscriber']}/toot/callbacks"
        self.subscriptions_url = f"{self.publisher_url}/toot/subscriptions"
        self.key_prefix = f"toot-test-{run}:"
        self.receipts_key = f"{self.key_prefix}receipts"
        self.queues = {role: f"toot-test-{run}-{role}" for role in ROLES}
        self.separate_broker = separate_broker
        self.broker: Process | None = None
        self.broker_port = free_port()
        common = {
            "TOOT_REDIS_URL": settings.REDIS_URL,
            "TOOT_KEY_PREFIX": self.key_prefix,
            "TOOT_RETRY_SCHEDULE": retry_schedule,
            "TOOT_CALLBACK_URL": self.callback_url,
            "TOOT_PUBLISHER_SUBSCRIPTION_URL": self.subscriptions_url,
            "EXAMPLE_RECEIPTS_KEY": self.receipts_key,
            "CELERY_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "CELERY_UNACKED_RESTORE_INTERVAL": "1",
            "CELERY_UNACKED_RESTORE_THROTTLE": "1",
            "CELERY_UNACKED_MUTEX_EXPIRE": "5",
        }
        self.env = {
            role: {
                **common,
                "CELERY_QUEUE": self.queues[role],
                "DATABASE_URL": f"sqlite:///{self.log_dir / role}.sqlite3",
            }
            for role in ROLES
        }
        if separate_broker:
            self.env["publisher"]["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{self.broker_port}/0"
        self.processes: dict[str, Process] = {}
        # What ``register()`` printed, kept by a test fixture that registers once for a module.
        self.registration_output = ""

    # Processes

    def start(self) -> None:
        if self.separate_broker:
            self.start_broker()
        for role in ROLES:
            self.manage(role, "migrate", "--verbosity", "0", check=True)
        for role in ROLES:
            self.start_web(role)
            self.start_worker(role)

    def start_broker(self) -> None:
        self.broker, _ = start_redis(log_dir=self.log_dir, port=self.broker_port)

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
        if self.broker is not None:
            self.broker.stop()
        keys = list(redis.scan_iter(match=f"{self.key_prefix}*", count=1000))
        redis.delete(*keys, *self.queues.values())

    def manage(
        self, role: str, *args: str, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT / "example_project",
            env={**os.environ, **project_env(self.env[role], f"example_project.{role}")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    # What a user does

    def register(self) -> str:
        return self.manage("subscriber", "toot_register_subscriptions", check=True).stdout

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

    def subscribe(self, channel: str, callback_url: str) -> None:
        response = requests.post(
            self.subscriptions_url,
            json={"channel": channel, "callback_url": callback_url},
            timeout=5,
        )
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
