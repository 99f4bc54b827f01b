"""The relay thread: its rounds, its resilience, and how a worker starts and stops it."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from itertools import count, pairwise
from types import SimpleNamespace

import pytest
from celery.signals import worker_ready, worker_shutting_down
from django.conf import settings

from tests.broker import broker_unreachable, probe_app, queued
from tests.http_server import HTTPServer
from tests.utils import expire, toot_settings
from toot.engine import queue, relay
from toot.engine.relay import QUIET_SECONDS, Relay
from toot.models import OutboxEvent
from toot.protocol.events import Event
from toot.publisher import outbox, sending, store

labels = count()


@pytest.fixture
def probe(redis):
    """A Celery app whose queue only the test reads: the drains a relay starts wait there."""
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
        relay.start(session.app, session.steps)  # as it was: no outbox step


@pytest.fixture
def own_queues(own_relay, redis, monkeypatch):
    """Queues of the test's own in place of ``out`` and ``in``, that no drain takes from.

    The drains a relay starts wait in the probe's queue and never run, so their leases
    stay live; with MAX_DRAINS at 1 a relay then starts no other for that queue.
    """
    tag = uuid.uuid4().hex[:8]
    names = SimpleNamespace(out=f"out-{tag}", in_=f"in-{tag}")
    monkeypatch.setattr(queue, "QUEUES", (names.out, names.in_))
    with toot_settings(MAX_DRAINS=1):
        yield names


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


def started(app):
    """(queue, drain id) of each drain sent through ``app``, oldest first."""
    return [tuple(args) for task, args, _ in queued(app.conf.task_default_queue)]


def waiting(app, name):
    """Work on queue ``name`` and no drain running; a predicate, true once a relay started one."""
    before = len(started(app))
    for queue_name, drain_id in started(app):
        if queue_name == name:
            queue.forget(name, drain_id)  # the drains started so far have ended
    drain_id = queue.push(name, [{"n": next(labels)}])
    if drain_id is not None:
        queue.forget(name, drain_id)  # as tasks.start does when it cannot send the drain
    return lambda: len(started(app)) > before


def test_a_relay_starts_a_drain_where_work_waits_every_relay_interval(
    probe, own_queues, running, eventually
):
    rounds: list[float] = []
    with toot_settings(RELAY_INTERVAL=0.2):
        relay_thread = Relay(probe, [relay.wake])

        def watch(app):  # one more step, that only notes when each round ran
            rounds.append(time.monotonic())

        relay_thread.steps.append(watch)
        running(relay_thread)

        eventually(waiting(probe, own_queues.out), what="a drain of the out queue")
        eventually(waiting(probe, own_queues.in_), what="a drain of the in queue")
        eventually(lambda: len(rounds) >= 4, what="four rounds")
        eventually(waiting(probe, own_queues.out), what="a later drain of the out queue")

    gaps = [later - earlier for earlier, later in pairwise(rounds)]
    assert min(gaps) >= 0.2 * 0.95  # each round waits RELAY_INTERVAL after the last
    # One drain each time: with one running, a relay starts no other (MAX_DRAINS is 1).
    out, in_ = own_queues.out, own_queues.in_
    assert [name for name, _ in started(probe)] == [out, in_, out]
    assert len({drain_id for _, drain_id in started(probe)}) == 3


def test_a_relay_wakes_a_lane_whose_only_work_is_a_retry(probe, own_queues, eventually):
    lane = f"{own_queues.in_}:a.handler"
    [drain_id] = queue.push_many({lane: [queue.encode({"n": 1})]}).values()
    assert drain_id is not None
    assert queue.claim(lane, drain_id, 100) == [{"n": 1}]
    queue.claim(lane, drain_id, 0, [({"n": 1}, 0.3)])  # it failed: a retry, in 0.3 s
    assert queue.release(lane, drain_id)  # nothing ready or due: that drain ends

    def started_for_the_lane():
        relay.wake(probe)
        return [drain for name, drain in started(probe) if name == lane]

    eventually(started_for_the_lane, what="the relay to start a drain of the lane")
    [woken] = started_for_the_lane()
    assert queue.claim(lane, woken, 100, first=True) == [{"n": 1}]


def test_a_relay_gives_a_dead_drains_batch_back_and_starts_a_drain(
    probe, own_queues, running, eventually, redis
):
    out = own_queues.out
    items = [{"n": n} for n in range(3)]
    dead = queue.push(out, items)
    assert dead is not None
    assert queue.claim(out, dead, 100) == items  # and then its worker was killed
    running(Relay(probe, [relay.wake]))
    expire(redis, out, dead)  # its lease ran out

    eventually(lambda: started(probe), what="a drain to be started")

    [(name, drain_id)] = started(probe)
    assert name == out
    assert drain_id != dead
    assert sorted(queue.claim(out, drain_id, 100), key=lambda item: item["n"]) == items


def test_a_relay_keeps_starting_a_drain_until_the_broker_answers(
    probe, own_queues, running, eventually, caplog
):
    caplog.set_level(logging.DEBUG, logger="toot.engine.drain")  # a started worker sets ERROR
    relay_thread = running(Relay(probe, [relay.wake]))

    def complaints():
        return [r for r in caplog.records if r.thread == relay_thread.ident]

    with broker_unreachable(probe):
        relayed = waiting(probe, own_queues.out)
        eventually(lambda: len(complaints()) >= 2, what="two rounds to fail")
        first, second = complaints()[:2]
        assert f"Cannot start a drain of the {own_queues.out} queue now" in first.getMessage()
        assert (first.levelno, second.levelno) == (logging.WARNING, logging.DEBUG)
    eventually(relayed, what="a drain once the broker is back")


def test_a_relay_wakes_the_queues_and_relays_the_outbox_unless_told_otherwise(probe):
    """The app, once ready, gave the relay the publisher's lanes and outbox steps."""
    assert Relay(probe).steps == [relay.wake, sending.relay_step, outbox.relay_step]
    assert Relay(probe, [relay.wake]).steps == [relay.wake]
    assert Relay(probe).daemon  # never holds a worker's exit


def test_a_failing_step_is_logged_once_per_quiet_period_and_relaying_goes_on(
    probe, own_queues, running, eventually, caplog, monkeypatch
):
    # No django_db mark: the database refuses this test (pytest-django), so the outbox
    # step fails every round, as it would with the database down. The clock is the
    # relay's own, set as on a machine booted 10 s ago (time.monotonic() counts from boot).
    caplog.set_level(
        logging.WARNING, logger="toot.engine.relay"
    )  # a started worker sets the root's to ERROR
    clock = SimpleNamespace(now=10.0)
    monkeypatch.setattr(relay, "time", SimpleNamespace(monotonic=lambda: clock.now))
    relay_thread = running(Relay(probe))

    def complaints():
        return [
            r
            for r in caplog.records
            if r.name == "toot.engine.relay" and r.thread == relay_thread.ident
        ]

    eventually(lambda: complaints(), what="the first failure to be logged at once")
    # Two more rounds, each starting a drain and then failing the outbox again: not logged.
    eventually(waiting(probe, own_queues.out), what="a drain after one failure")
    eventually(waiting(probe, own_queues.in_), what="a drain after two failures")
    [complaint] = complaints()
    assert complaint.levelno == logging.WARNING
    assert "toot relay failed, will keep trying" in complaint.getMessage()
    assert "Database access not allowed" in complaint.getMessage()
    assert complaint.exc_info is not None

    clock.now += QUIET_SECONDS + 1  # a quiet period later, still failing: logged again
    eventually(lambda: len(complaints()) == 2, what="the failure to be logged again")
    eventually(waiting(probe, own_queues.out), what="a drain still")
    assert len(complaints()) == 2
    assert relay_thread.is_alive()


def test_every_failure_is_logged_without_a_quiet_period(
    probe, running, eventually, caplog, monkeypatch
):
    caplog.set_level(logging.WARNING, logger="toot.engine.relay")
    monkeypatch.setattr(relay, "QUIET_SECONDS", 0.0)
    relay_thread = running(Relay(probe))

    def complaints():
        return [
            r
            for r in caplog.records
            if r.name == "toot.engine.relay" and r.thread == relay_thread.ident
        ]

    eventually(lambda: len(complaints()) >= 3, what="three failures logged")


def test_start_and_stop_are_idempotent(own_relay, probe):
    assert relay_threads() == []

    relay.start(probe, [relay.wake])
    [first] = relay_threads()
    relay.start(probe, [relay.wake])
    assert relay_threads() == [first]

    relay.stop()
    assert not first.is_alive()
    assert relay_threads() == []
    relay.stop()

    relay.start(probe, [relay.wake])
    [second] = relay_threads()
    assert second is not first
    assert second.app is probe
    assert len(second.steps) == 1


def test_start_replaces_a_relay_that_died(own_relay, probe):
    relay.start(probe, [relay.wake])
    [first] = relay_threads()
    first.stopping.set()  # it ended without stop(), as a crashed thread would
    first.join(10)

    relay.start(probe, [relay.wake])

    [second] = relay_threads()
    assert second is not first


@pytest.mark.django_db(transaction=True)
def test_a_ready_worker_starts_the_relay_for_its_app(own_relay, celery_worker, eventually):
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as subscriber:
        store.add(channel, subscriber.url)
        event = Event(channel, {"id": 1}).to_dict()
        OutboxEvent.objects.create(event=event)  # kept while Redis was down

        # What the `celery worker` command sends once its consumer is ready.
        worker_ready.send(sender=celery_worker.consumer)

        [started_relay] = relay_threads()
        assert started_relay.app is celery_worker.app
        # Its outbox step runs: the kept event goes out through the worker's app.
        eventually(lambda: subscriber.requests, what="the outbox event to be delivered")
        assert subscriber.requests[0].json() == event
        eventually(lambda: not OutboxEvent.objects.exists())

        worker_shutting_down.send(sender=celery_worker, sig="TERM", how="Warm", exitcode=0)

    assert relay_threads() == []
    assert not started_relay.is_alive()
