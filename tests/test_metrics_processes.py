"""toot's metrics across real processes: the example project (gunicorn with two workers
and a Celery prefork worker of two children per side, and the ``manage.py shell`` that
publishes) with ``TOOT["METRICS"]`` on and prometheus_client's multiprocess mode, each
side scraped at its /metrics as Prometheus would.

Each process counts its own part in its own files under ``$PROMETHEUS_MULTIPROC_DIR``;
what a scrape of either gunicorn worker serves must add them up.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from devtools.processes import ROOT, WORKER_READY, Process, celery_worker_argv, wait_for
from devtools.topology import gunicorn_argv
from tests.http_server import HTTPServer, Reply
from tests.topology import PREFIX, Scrape, Topology, attempts

# The example project as real processes, with SQLite databases of their own.
pytestmark = pytest.mark.processes

EVENTS = 20
RETRY_SCHEDULE = "0.2,0.5,1,1,1"
ATTEMPTS = 1 + len(RETRY_SCHEDULE.split(","))
UPDATED = f"{PREFIX}users.updated.v1"
DELETED = f"{PREFIX}users.deleted.v1"
FAILING = f"{PREFIX}metrics.failing.v1"  # subscribed by a test server that answers 503


# What docs/metrics.md shows: gunicorn's configuration, and the Celery app's hook.
GUNICORN_CONF = ROOT / "docs" / "examples" / "metrics_gunicorn.py"
CELERY_HOOK = "docs.examples.metrics_celery"


class MetricsTopology(Topology):
    """The example project, its servers and workers started as docs/metrics.md says."""

    multiproc_dirs: dict[str, Path]

    def start_web(self, role: str, *, wait: bool = True) -> Process:
        argv = gunicorn_argv(self.ports[role], self.web_workers, self.web_threads)
        process = self.project_process(f"{role}-web", role, [*argv, "--config", str(GUNICORN_CONF)])
        if wait:
            self.wait_for_web(role)
        return process

    def start_worker(self, role: str, name: str | None = None, *, wait: bool = True) -> Process:
        name = name or f"{role}-worker"
        argv = celery_worker_argv("example_project", f"{self.prefix}-{name}@%h", self.concurrency)
        process = self.project_process(name, role, [*argv, "--include", CELERY_HOOK])
        if wait:
            process.wait_for_log(WORKER_READY)
        return process


@pytest.fixture(scope="module")
def topology():
    topology = MetricsTopology(
        "metrics",
        retry_schedule=RETRY_SCHEDULE,
        # No circuit breaker's rest between the failing URL's attempts: its every attempt
        # within seconds.
        env={"TOOT_METRICS": "1", "TOOT_BREAKER_FAILURES": "100"},
    )
    topology.multiproc_dirs = {}
    for role in ("publisher", "subscriber"):
        # Empty at start, as a deployment must make it (docs/metrics.md).
        directory = topology.log_dir / f"prometheus-{role}"
        directory.mkdir()
        topology.multiproc_dirs[role] = directory
        topology.role_env[role]["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    try:
        topology.start()
        topology.register()
        yield topology
    finally:
        topology.stop()


def pids(directory: Path) -> set[str]:
    """The processes that wrote counters or histograms there (``<kind>_<pid>.db``)."""
    return {
        match[1]
        for path in directory.iterdir()
        if (match := re.fullmatch(r"(?:counter|histogram)_(\d+)\.db", path.name))
    }


def test_both_sides_scrapes_add_up_every_process_s_counts(topology):
    sender_log = topology.log_from_now("publisher-worker")
    topology.clear_receipts()
    with HTTPServer(Reply(503, body=b"down")) as failing:
        topology.subscribe(FAILING, failing.url)
        sent = topology.publish("users.updated.v1", {"id": 1}, count=EVENTS)
        assert len(sent) == EVENTS
        topology.publish("metrics.failing.v1", {"id": 2})

        def publisher() -> Scrape:
            return Scrape(topology.publisher_url)

        def subscriber() -> Scrape:
            return Scrape(topology.subscriber_url)

        wait_for(lambda: topology.receipt_count() == EVENTS, 60, "every event handled")
        wait_for(
            lambda: subscriber().total("toot_events_handled_total", channel=UPDATED) == EVENTS,
            30,
            "the subscriber's scrape to count every handler run",
        )
        wait_for(
            lambda: (
                publisher().total("toot_events_delivered_total", channel=UPDATED) == EVENTS
                and publisher().total("toot_events_dead_lettered_total", channel=FAILING) == 1
            ),
            60,
            "the publisher's scrape to count the deliveries and the dead letter",
        )
        topology.unsubscribe(FAILING, failing.url)
    pub, sub = publisher(), subscriber()

    # The publisher: published in the shell's process, delivered by the worker's children.
    assert pub.total("toot_events_published_total", channel=UPDATED) == EVENTS
    assert pub.total("toot_events_published_total", channel=FAILING) == 1
    assert pub.total("toot_events_delivered_total", channel=UPDATED) == EVENTS
    assert pub.total("toot_deliveries_failed_total", channel=UPDATED) == 0
    assert pub.total("toot_deliveries_failed_total", channel=FAILING, status_class="5xx") == (
        ATTEMPTS
    )
    assert pub.total("toot_events_dead_lettered_total", channel=FAILING, kind="delivery") == 1
    # One observation per request the worker's children logged.
    logged = attempts(sender_log())
    to_subscriber = [a for a in logged if a.url == topology.callback_url]
    assert sum(len(a.event_ids) for a in to_subscriber if a.ok) == EVENTS
    assert pub.total("toot_delivery_duration_seconds_count", channel=UPDATED) == len(to_subscriber)
    assert pub.total("toot_delivery_duration_seconds_count", channel=FAILING) == ATTEMPTS
    assert pub.total("toot_delivery_duration_seconds_sum", channel=UPDATED) > 0
    assert pub.total("toot_redis_up") == 1
    assert pub.total("toot_retries_waiting", queue="deliveries") == 0
    assert pub.total("toot_queue_depth", queue="out") == 0

    # The subscriber: received by gunicorn's workers, handled by the worker's children.
    assert sub.total("toot_events_received_total", channel=UPDATED) == EVENTS
    assert sub.total("toot_events_handled_total", channel=UPDATED) == EVENTS
    assert sub.total("toot_handler_failures_total") == 0
    assert sub.total("toot_handler_duration_seconds_count", channel=UPDATED) == EVENTS
    assert sub.total("toot_publish_to_handled_seconds_count", channel=UPDATED) == EVENTS
    assert sub.total("toot_publish_to_handled_seconds_bucket", channel=UPDATED, le="+Inf") == (
        EVENTS
    )
    # On one machine, each event reached its handler within a minute of its publishing.
    assert sub.total("toot_publish_to_handled_seconds_bucket", channel=UPDATED, le="60.0") == (
        EVENTS
    )
    assert sub.total("toot_redis_up") == 1

    # Several processes counted: the shell and the worker's children on the publisher's
    # side, gunicorn's workers and the worker's children on the subscriber's.
    for role in ("publisher", "subscriber"):
        assert len(pids(topology.multiproc_dirs[role])) >= 2, role
    # And either gunicorn worker serves the same sums.
    for _ in range(4):
        scrape = Scrape(topology.subscriber_url)
        assert scrape.total("toot_events_handled_total", channel=UPDATED) == EVENTS


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_counts_outlive_a_killed_gunicorn_worker(topology):
    """A worker killed and replaced (gunicorn's child_exit marks it dead): what it
    counted stays in every scrape."""
    already = Scrape(topology.subscriber_url).total("toot_events_handled_total", channel=DELETED)
    topology.publish("users.deleted.v1", {"id": 3}, count=3)  # apart from the test above
    wait_for(
        lambda: (
            Scrape(topology.subscriber_url).total("toot_events_handled_total", channel=DELETED)
            == already + 3
        ),
        60,
        "three more events handled",
    )
    received = Scrape(topology.subscriber_url).total("toot_events_received_total")
    master = topology.processes["subscriber-web"].popen.pid
    workers = children(master)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_for(
        lambda: len(set(children(master)) - set(workers)) == 1 and len(children(master)) == 2,
        30,
        "gunicorn to replace the worker",
    )
    for _ in range(4):
        scrape = Scrape(topology.subscriber_url)
        assert scrape.total("toot_events_received_total") == received
    assert topology.processes["subscriber-web"].running


def test_a_fresh_scrape_without_events_serves_the_gauges(topology):
    scrape = Scrape(topology.publisher_url)
    assert scrape.total("toot_redis_up") == 1
    assert "toot_queue_depth" in scrape.samples and "toot_retries_waiting" in scrape.samples
