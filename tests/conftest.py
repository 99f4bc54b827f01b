from __future__ import annotations

import contextlib
import math
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state
from django.conf import settings
from django.test import Client
from pytest_django import live_server_helper

from devtools import broker
from devtools.processes import wait_for
from tests.celery import app as celery_app
from tests.utils import addrinfo, relaying_lanes, spy_pushes
from toot.conf import conf
from toot.engine import connection, queue, relay
from toot.engine import drain as tasks
from toot.protocol.events import Event
from toot.subscriber import handling
from toot.subscriber.registry import registry

# A project of its own, with its own settings: tests/test_testing.py and .ci/run run it apart.
collect_ignore = ["sample_project"]


@pytest.fixture
def redis():
    """The store's real Redis; every key of this run's namespace is removed afterwards."""
    client = connection.get_redis()
    yield client
    keys = list(client.scan_iter(match=f"{settings.TOOT['KEY_PREFIX']}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(autouse=True)
def _fresh_settings():
    """toot reads its settings again in each test, and after it: a test that patches one
    without override_settings (patch_toot, an environment variable) leaves no trace."""
    conf.forget()
    yield
    conf.forget()


@pytest.fixture(autouse=True)
def _loud_warnings(monkeypatch):
    """Each test sees toot's first "cannot start a drain" warning, not a quiet repeat."""
    monkeypatch.setattr(tasks, "_last_warning", -math.inf)


@pytest.fixture(autouse=True)
def _clean_registry():
    saved = registry.subscriptions
    registry.reset()
    yield
    registry.reset()
    for subscription in saved:
        registry.register(*subscription)


@pytest.fixture(scope="session")
def _worker_session(django_db_setup, django_db_blocker):
    """A real Celery worker in this process, consuming this run's queue."""
    with contextlib.ExitStack() as stack:
        # Celery's Django fixup runs the system checks as the worker starts, and Django
        # 6.1's reach the database: the test database, whichever test starts the worker.
        with django_db_blocker.unblock():
            worker = stack.enter_context(
                start_worker(
                    celery_app,
                    pool="threads",
                    concurrency=4,
                    perform_ping_check=False,
                    shutdown_timeout=30,
                )
            )
        # The CLI worker starts the relay on worker_ready. Its outbox step needs the
        # database, which most tests may not touch; test_outbox runs that step itself.
        relay.start(celery_app, [relay.wake])
        yield worker
        relay.stop()
    broker.delete_queues(settings.CELERY_BROKER_URL, [settings.CELERY_TASK_DEFAULT_QUEUE])


@pytest.fixture
def celery_worker(_worker_session, redis):
    yield _worker_session


@pytest.fixture
def eventually():
    """Poll for an outcome with a deadline instead of sleeping."""

    def poll(predicate, timeout=20.0, what="the expected outcome"):
        wait_for(predicate, timeout, what)

    return poll


@pytest.fixture
def dns(monkeypatch):
    """DNS answers for chosen names: a list of addresses, an exception, or a function
    giving either; every other name goes to the real resolver. ``lookups`` lists the
    chosen names asked for, in order.

    The one stand-in of the suite: no real resolver answers a public and a private address
    for one name, or changes its answer (DNS rebinding), offline.
    """
    answers: dict[str, Any] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, family, type, proto, flags)
        lookups.append(name)
        answer = answers[name]() if callable(answers[name]) else answers[name]
        if isinstance(answer, Exception):
            raise answer
        return addrinfo(answer, port)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return SimpleNamespace(answers=answers, lookups=lookups)


@pytest.fixture
def client():
    """A test client that enforces CSRF checks, as a peer's POST would meet them."""
    return Client(enforce_csrf_checks=True)


@pytest.fixture
def enqueued(monkeypatch):
    """The events queued for handlers (the ``in`` queue) during the test, as pushed."""
    return spy_pushes(monkeypatch, queue.IN)


@pytest.fixture
def handled_while_subscribed(request, eventually):
    """Every event a test queued is handled before conftest's _clean_registry unsubscribes
    its handlers: left behind, it would fail for want of a handler, and be dead-lettered
    into a database most tests here may not touch."""
    if "enqueued" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("celery_worker")
    request.getfixturevalue("redis")  # its clean-up runs after this wait
    enqueued = request.getfixturevalue("enqueued")
    yield

    def handled():
        return all(
            handling.state(event, name) == handling.DONE
            for event in map(Event.from_dict, enqueued)
            for name in handling.handlers_by_name(event.channel)
        )

    eventually(handled, what="every queued event to be handled")


@pytest.fixture
def fresh_clients(monkeypatch):
    """An empty client cache, so that the clients a test creates go away with it."""
    clients: dict[tuple[str, float], Any] = {}
    monkeypatch.setattr(connection, "_clients", clients)
    yield clients
    # A copy: the tests' worker threads may still add a client (the suite's own URL, once
    # a test's settings are gone), which the original cache then serves.
    for client in list(clients.values()):
        client.close()


@pytest.fixture
def worker(celery_worker, no_drain_at_work):
    """The real worker, its relay sending the lanes' retries as a project's does."""
    with relaying_lanes():
        yield celery_worker


@pytest.fixture
def no_drain_at_work(eventually):
    """The settings these tests change are every thread's, the drains of the tests' worker
    included: one at work would reach another Redis, or none, and end without giving back its
    lease, which holds new drains back for a minute."""
    queued = settings.CELERY_TASK_DEFAULT_QUEUE

    def idle():
        return not (
            worker_state.requests or broker.queue_length(settings.CELERY_BROKER_URL, queued)
        )

    eventually(idle, what="the worker's drains to end")


@pytest.fixture(scope="session")
def live_server(django_db_setup):
    """pytest-django's, started once the test database exists.

    Started before it, the server thread would take the in-memory SQLite settings and
    share the test thread's connection, which crashes when a test's flush meets a request.
    """
    server = live_server_helper.LiveServer("localhost")
    yield server
    server.stop()
