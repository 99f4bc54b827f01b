"""The relay thread: its rounds, its resilience, and how a worker starts and stops it."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from itertools import pairwise
from types import SimpleNamespace

import pytest
from celery.signals import worker_ready, worker_shutting_down
from django.conf import settings
from django.test import override_settings

from tests.broker import PROBE_TASK, probe_app, queued
from tests.http_server import HTTPServer
from toot import relay, retries, store
from toot.events import Event
from toot.models import OutboxEvent
from toot.relay import QUIET_SECONDS, Relay


@pytest.fixture
def probe(redis):
    """A Celery app whose queue only the test reads; relays send its retries there."""
    with probe_app(f"{settings.TOOT['KEY_PREFIX']}relay-{uuid.uuid4().hex[:8]}") as app:
        yield app


@pytest.fixture
def own_relay():
    """The process's relay slot, free: the session worker's relay is stopped meanwhile."""
    session = relay._relay
    relay.stop()
    yield
    relay.stop()
    if session is not None:
        # Restarted as it was (conftest's has no outbox step).
        relay.start(session.app, session.queues, outbox=len(session.steps) > 1)


@pytest.fixture
def running():
    """Start a Relay; it is stopped after the test, whatever happens."""
    started = []

    def start(relay_thread):
        started.append(relay_thread)
        relay_thread.start()
        return relay_thread

    yield start
    for relay_thread in started:
        relay_thread.stopping.set()
        relay_thread.join(10)


def relay_threads():
    return [thread for thread in threading.enumerate() if thread.name == "toot-relay"]


def relayed(app, label):
    """Schedule a retry due now; returns a predicate, true once a relay has sent it."""
    queue = app.conf.task_default_queue
    retries.schedule(PROBE_TASK, [label], {}, 0.0, queue)
    return lambda: (PROBE_TASK, [label], {}) in queued(queue)


def test_a_relay_sends_due_retries_every_relay_interval(probe, running, eventually):
    rounds: list[float] = []
    with override_settings(TOOT={**settings.TOOT, "RELAY_INTERVAL": 0.2}):
        relay_thread = Relay(probe, [probe.conf.task_default_queue], outbox=False)

        def watch():  # one more step, that only notes when each round ran
            rounds.append(time.monotonic())
            return 0

        relay_thread.steps.append(watch)
        running(relay_thread)

        eventually(relayed(probe, "first"), what="the due retry to be relayed")
        eventually(lambda: len(rounds) >= 4, what="four rounds")
        eventually(relayed(probe, "second"), what="a later retry to be relayed")

    gaps = [later - earlier for earlier, later in pairwise(rounds)]
    assert min(gaps) >= 0.2 * 0.95  # each round waits RELAY_INTERVAL after the last
    assert [args for _, args, _ in queued(probe.conf.task_default_queue)] == [["first"], ["second"]]


@pytest.mark.parametrize("outbox", [True, False])
def test_a_relay_relays_the_outbox_only_when_asked(probe, outbox):
    relay_thread = Relay(probe, [probe.conf.task_default_queue], outbox=outbox)
    assert len(relay_thread.steps) == (2 if outbox else 1)
    assert relay_thread.daemon  # never holds a worker's exit


def test_a_failing_step_is_logged_once_per_quiet_period_and_relaying_goes_on(
    probe, running, eventually, caplog, monkeypatch
):
    # No django_db mark: the database refuses this test (pytest-django), so the outbox
    # step fails every round, as it would with the database down. The clock is the
    # relay's own, set as on a machine booted 10 s ago (time.monotonic() counts from boot).
    caplog.set_level(
        logging.WARNING, logger="toot.relay"
    )  # a started worker sets the root's to ERROR
    clock = SimpleNamespace(now=10.0)
    monkeypatch.setattr(relay, "time", SimpleNamespace(monotonic=lambda: clock.now))
    relay_thread = running(Relay(probe, [probe.conf.task_default_queue], outbox=True))

    def complaints():
        return [
            r for r in caplog.records if r.name == "toot.relay" and r.thread == relay_thread.ident
        ]

    eventually(lambda: complaints(), what="the first failure to be logged at once")
    # Two more rounds, each relaying a retry and then failing the outbox again: not logged.
    eventually(relayed(probe, "after one failure"))
    eventually(relayed(probe, "after two failures"))
    [complaint] = complaints()
    assert complaint.levelno == logging.WARNING
    assert "toot relay failed, will keep trying" in complaint.getMessage()
    assert "Database access not allowed" in complaint.getMessage()
    assert complaint.exc_info is not None

    clock.now += QUIET_SECONDS + 1  # a quiet period later, still failing: logged again
    eventually(lambda: len(complaints()) == 2, what="the failure to be logged again")
    eventually(relayed(probe, "still relaying"))
    assert len(complaints()) == 2
    assert relay_thread.is_alive()


def test_every_failure_is_logged_without_a_quiet_period(
    probe, running, eventually, caplog, monkeypatch
):
    caplog.set_level(logging.WARNING, logger="toot.relay")
    monkeypatch.setattr(relay, "QUIET_SECONDS", 0.0)
    relay_thread = running(Relay(probe, [probe.conf.task_default_queue], outbox=True))

    def complaints():
        return [
            r for r in caplog.records if r.name == "toot.relay" and r.thread == relay_thread.ident
        ]

    eventually(lambda: len(complaints()) >= 3, what="three failures logged")


def test_start_and_stop_are_idempotent(own_relay, probe):
    queues = [probe.conf.task_default_queue]
    assert relay_threads() == []

    relay.start(probe, queues, outbox=False)
    [first] = relay_threads()
    relay.start(probe, queues, outbox=False)
    assert relay_threads() == [first]

    relay.stop()
    assert not first.is_alive()
    assert relay_threads() == []
    relay.stop()

    relay.start(probe, queues, outbox=False)
    [second] = relay_threads()
    assert second is not first
    assert second.app is probe
    assert second.queues == queues


def test_start_replaces_a_relay_that_died(own_relay, probe):
    queues = [probe.conf.task_default_queue]
    relay.start(probe, queues, outbox=False)
    [first] = relay_threads()
    first.stopping.set()  # it ended without stop(), as a crashed thread would
    first.join(10)

    relay.start(probe, queues, outbox=False)

    [second] = relay_threads()
    assert second is not first


@pytest.mark.django_db(transaction=True)
def test_a_ready_worker_starts_the_relay_for_its_app_and_queues(
    own_relay, celery_worker, eventually
):
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as subscriber:
        store.add(channel, subscriber.url)
        event = Event(channel, {"id": 1}).to_dict()
        OutboxEvent.objects.create(event=event)  # kept while the broker was down

        # What the `celery worker` command sends once its consumer is ready.
        worker_ready.send(sender=celery_worker.consumer)

        [started] = relay_threads()
        assert started.app is celery_worker.app
        assert started.queues == [settings.CELERY_TASK_DEFAULT_QUEUE]
        # Its outbox step runs: the kept event goes out through the worker's app.
        eventually(lambda: subscriber.requests, what="the outbox event to be delivered")
        assert subscriber.requests[0].json() == event
        eventually(lambda: not OutboxEvent.objects.exists())

        worker_shutting_down.send(sender=celery_worker, sig="TERM", how="Warm", exitcode=0)

    assert relay_threads() == []
    assert not started.is_alive()
