"""Sending a drain to a broker that does not answer: toot gives up in time, and recovers."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import pytest
from celery import Celery
from django.conf import settings
from kombu import Exchange, pools
from kombu import Queue as KombuQueue

from devtools.broker import amqp_connection, is_redis
from devtools.processes import free_port, wait_for
from tests.broker import (
    PROBE_TASK,
    BrokerProxy,
    SilentBroker,
    probe_app,
    queued,
    scheme_of,
    url_of,
)
from tests.utils import live_leases, toot_settings
from toot.conf import conf
from toot.engine import broker, queue
from toot.engine import drain as tasks

# REDIS_TIMEOUT in these tests, and how long a send may take at most: a few of them. Without
# timeouts kombu's Redis transport waits forever, py-amqp as long as the project's
# broker_connection_timeout allows, a minute here.
TIMEOUT = 0.5
DEADLINE = 10.0


def in_time(call: Callable[[], object], deadline: float = DEADLINE) -> threading.Thread:
    """Run ``call`` in a thread of its own, and fail unless it returns within ``deadline``
    seconds: a call that hangs fails the test instead of holding the whole run."""
    thread = threading.Thread(target=call, name="toot-send", daemon=True)
    thread.start()
    wait_for(lambda: not thread.is_alive(), deadline, "the call to return")
    return thread


def warnings_of(caplog: pytest.LogCaptureFixture, thread: threading.Thread) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "toot.engine.drain"
        and r.thread == thread.ident
        and r.levelno == logging.WARNING
    ]


def new_queue() -> str:
    return f"out-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_start_gives_up_on_a_broker_that_never_answers_and_gives_up_the_lease(
    scheme, redis, caplog, eventually
):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")  # a started worker sets ERROR
    name = new_queue()
    drain_id = queue.push(name, [])
    assert drain_id is not None
    with (
        SilentBroker() as silent,
        Celery("toot-silent", broker=silent.url(scheme), set_as_current=False) as app,
        toot_settings(REDIS_TIMEOUT=TIMEOUT),
    ):
        # A project that lets connecting take a minute: toot's own bound stands.
        app.conf.broker_connection_timeout = 60.0

        thread = in_time(lambda: tasks.start(name, drain_id, app))

        [warning] = warnings_of(caplog, thread)
        assert f"Cannot start a drain of the {name} queue now" in warning
        assert drain_id not in live_leases(redis, name)  # so that the relay may start one
        # It did reach the broker; what it opened, it closed.
        assert silent.accepted
        eventually(lambda: silent.open_connections() == 0, what="toot to close its connections")


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_every_send_to_a_broker_that_never_answers_closes_what_it_opened(scheme, redis, eventually):
    with (
        SilentBroker() as silent,
        Celery("toot-silent", broker=silent.url(scheme), set_as_current=False) as app,
        toot_settings(REDIS_TIMEOUT=TIMEOUT),
    ):
        for _ in range(3):  # three publishes, or relay ticks, in a row
            name = new_queue()
            in_time(lambda: tasks.start(name, queue.push(name, []), app))  # noqa: B023

        assert silent.accepted >= 3  # one connection at least per attempt: none was kept
        eventually(lambda: silent.open_connections() == 0, what="toot to close its connections")


def test_a_broker_that_falls_silent_once_connected_is_given_up_on_and_reconnected(redis, caplog):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}hushed-{uuid.uuid4().hex[:8]}"
    first, second, third = new_queue(), new_queue(), new_queue()
    with (
        BrokerProxy(settings.CELERY_BROKER_URL) as proxy,
        probe_app(celery_queue, proxy.url) as app,
        toot_settings(REDIS_TIMEOUT=TIMEOUT),
    ):
        sent = [(name, queue.push(name, [])) for name in (first, second, third)]
        in_time(lambda: tasks.start(*sent[0], app))
        connections = proxy.connections
        assert [args for _, args, _ in queued(celery_queue)] == [list(sent[0])]

        proxy.hush()  # the connection toot keeps for the next send no longer answers
        thread = in_time(lambda: tasks.start(*sent[1], app))
        [warning] = warnings_of(caplog, thread)
        assert f"Cannot start a drain of the {second} queue now" in warning
        assert sent[1][1] not in live_leases(redis, second)
        assert proxy.connections == connections  # it was that connection that failed

        proxy.resume()
        in_time(lambda: tasks.start(*sent[2], app))
        assert proxy.connections > connections  # a new one, not the one that failed
        assert [args for _, args, _ in queued(celery_queue)] == [list(sent[0]), list(sent[2])]


@pytest.mark.skipif(
    is_redis(settings.CELERY_BROKER_URL),
    reason="RabbitMQ's refusals: .ci/run's RabbitMQ pass (TOOT_TEST_BROKER_URL) runs them",
)
@pytest.mark.parametrize(
    ("declared", "arguments", "error"),
    [
        # A queue that is always full and refuses more: RabbitMQ nacks every message, which
        # Celery passes on as an OperationalError with no text.
        ("as_celery_does", {"x-max-length": 0, "x-overflow": "reject-publish"}, "MessageNacked"),
        # A queue declared with other arguments (by hand, a policy, another version of the
        # project): declaring it again closes the channel (406), an error py-amqp raises as
        # it is, not as a broker error.
        ("otherwise", {"x-max-length": 10}, "PRECONDITION_FAILED"),
    ],
)
def test_a_message_rabbitmq_refuses_gives_up_the_lease(redis, caplog, declared, arguments, error):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}refused-{uuid.uuid4().hex[:8]}"
    name = new_queue()
    with probe_app(celery_queue) as app:
        bounded = KombuQueue(
            celery_queue, Exchange(celery_queue), celery_queue, queue_arguments=arguments
        )
        if declared == "as_celery_does":
            app.conf.task_queues = [bounded]
        else:
            with amqp_connection(settings.CELERY_BROKER_URL) as connection:
                bounded(connection.default_channel).declare()
        drain_id = queue.push(name, [])

        thread = in_time(lambda: tasks.start(name, drain_id, app))

        [warning] = warnings_of(caplog, thread)
        assert f"Cannot start a drain of the {name} queue now" in warning
        assert "Sending to the broker failed" in warning
        assert error in warning
        assert drain_id not in live_leases(redis, name)  # so that the relay may start one
        assert queued(celery_queue) == []


def test_sends_share_a_connection(redis):
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}shared-{uuid.uuid4().hex[:8]}"
    with (
        BrokerProxy(settings.CELERY_BROKER_URL) as proxy,
        probe_app(celery_queue, proxy.url) as app,
    ):
        names = [new_queue() for _ in range(5)]
        tasks.start(names[0], queue.push(names[0], []), app)
        connections = proxy.connections
        for name in names[1:]:
            tasks.start(name, queue.push(name, []), app)

        assert proxy.connections == connections
        assert [args[0] for _, args, _ in queued(celery_queue)] == names


def test_a_send_that_finds_no_free_connection_in_time_gives_up(redis, caplog):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}busy-{uuid.uuid4().hex[:8]}"
    name = new_queue()
    with probe_app(celery_queue) as app, toot_settings(REDIS_TIMEOUT=TIMEOUT):
        pool = pools.producers[broker.connection_for(app, TIMEOUT)]
        busy = [pool.acquire() for _ in range(pool.limit)]  # other sends, all under way
        try:
            thread = in_time(lambda: tasks.start(name, queue.push(name, []), app))
        finally:
            for producer in busy:
                producer.release()
        assert queued(celery_queue) == []

    [warning] = warnings_of(caplog, thread)
    assert "No broker connection free within 0.5 s" in warning
    assert live_leases(redis, name) == []


def test_the_projects_own_sends_leave_toots_pool_as_it_was(redis):
    # kombu adds a send's retry policy to its connection's transport options: toot's pool,
    # keyed by its options, must not follow them (a new pool, the last left open).
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}own-{uuid.uuid4().hex[:8]}"
    first, second = new_queue(), new_queue()
    with probe_app(celery_queue) as app:
        tasks.start(first, queue.push(first, []), app)
        pool = pools.producers[broker.connection_for(app, conf.REDIS_TIMEOUT)]
        app.tasks[PROBE_TASK].apply_async(retry_policy={"max_retries": 1})

        tasks.start(second, queue.push(second, []), app)

        assert pools.producers[broker.connection_for(app, conf.REDIS_TIMEOUT)] is pool
        assert len(queued(celery_queue)) == 3


def test_a_send_tries_each_of_the_brokers_urls(redis):
    celery_queue = f"{settings.TOOT['KEY_PREFIX']}failover-{uuid.uuid4().hex[:8]}"
    tests_broker = settings.CELERY_BROKER_URL
    down_first = f"{url_of(scheme_of(tests_broker), free_port())};{tests_broker}"
    names = [new_queue() for _ in range(3)]
    with probe_app(celery_queue, down_first) as app, toot_settings(REDIS_TIMEOUT=TIMEOUT):
        for name in names:
            tasks.start(name, queue.push(name, []), app)

        assert [args[0] for _, args, _ in queued(celery_queue)] == names


@pytest.mark.parametrize(
    ("scheme", "keys", "forced"),
    [
        ("redis", ["socket_connect_timeout", "socket_timeout"], {}),
        # Publisher confirms: a send to a RabbitMQ that fell silent fails, not vanishes.
        ("amqp", ["connect_timeout", "read_timeout", "write_timeout"], {"confirm_publish": True}),
    ],
)
def test_toot_bounds_its_own_connection_and_leaves_the_apps_alone(scheme, keys, forced):
    project_options = {"visibility_timeout": 7200, keys[-1]: 1.0, keys[0]: 3600.0}
    if forced:
        project_options["confirm_publish"] = False
    with Celery("toot-options", broker=url_of(scheme, 1), set_as_current=False) as app:
        app.conf.broker_transport_options = dict(project_options)

        connection = broker.connection_for(app, 5.0)

        assert connection.as_uri() == app.connection_for_write().as_uri()
        # Its own timeouts, but where the project's is shorter; the project's other options.
        expected = {
            **dict.fromkeys(keys, 5.0),
            keys[-1]: 1.0,
            "visibility_timeout": 7200,
            **forced,
        }
        assert connection.transport_options == expected
        # Nothing of the app's changed.
        assert app.conf.broker_transport_options == project_options
        assert app.producer_pool.connections.connection.transport_options == project_options


def test_py_amqp_connects_within_the_apps_broker_connection_timeout_when_shorter():
    with Celery("toot-options", broker=url_of("amqp", 1), set_as_current=False) as app:
        app.conf.broker_connection_timeout = 2.0
        options = broker.connection_for(app, 5.0).transport_options
        assert options == {
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
            "write_timeout": 5.0,
            "confirm_publish": True,
        }
