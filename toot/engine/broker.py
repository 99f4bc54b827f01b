"""Sending a task to the broker with one connection attempt, and timeouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis
from celery import Celery, Task
from kombu import Connection, pools
from kombu.exceptions import LimitExceeded, OperationalError
from kombu.pools import ProducerPool

from toot.conf import conf
from toot.engine import isolation

# What sending a task raises when the broker is unreachable, or does not answer in time.
BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)

# The transport options that bound a kombu transport's blocking calls, by its driver_name.
# Left unset they wait forever (kombu's Redis transport, py-amqp after connecting): a
# broker that accepts connections and never answers (a load balancer whose backend is
# gone, a stuck server) would hold a web request, or the relay, for good.
TIMEOUT_OPTIONS: dict[str, tuple[str, ...]] = {
    # kombu.transport.redis (sentinel:// too) hands them to redis-py's connections.
    "redis": ("socket_connect_timeout", "socket_timeout"),
    # kombu.transport.pyamqp passes its transport options to amqp.Connection, over the
    # connection's own connect_timeout: that one bounds the TCP connect and the AMQP
    # handshake, read_timeout and write_timeout every later read and write (SO_RCVTIMEO,
    # SO_SNDTIMEO): opening the channel, declaring the queue, publishing.
    "py-amqp": ("connect_timeout", "read_timeout", "write_timeout"),
}

# Transport options of toot's own connection, whatever the project's say, by driver_name.
# py-amqp publishes without waiting for an answer: to a RabbitMQ that fell silent, or over a
# connection it has closed, a send "succeeds" and the drain message is gone, its lease held
# until LEASE_SECONDS end with nothing to run it. With publisher confirms a send waits, within
# read_timeout, for the broker's basic.ack: one round trip, and toot sends one message per
# drain, not per event.
FORCED_OPTIONS: dict[str, dict[str, Any]] = {"py-amqp": {"confirm_publish": True}}


def send_now(task: Task[Any, Any], args: Sequence[Any], **options: Any) -> None:
    """Send ``task`` with one connection attempt, raising BROKER_ERRORS at once if it fails,
    or within a few times REDIS_TIMEOUT if the broker does not answer or refuses the message.

    Even with ``retry=False`` kombu retries connecting for its connect timeout (about 6 s),
    which would hold a web request, or a relay past the timeout of its claims.
    """
    isolation.check("the broker")
    # REDIS_TIMEOUT because the same web requests and relay steps wait that long at most
    # for toot's Redis, which is often the broker too (REDIS_URL falls back to a Redis
    # CELERY_BROKER_URL): one bound on what they wait for, and one setting to tune it.
    timeout = conf.REDIS_TIMEOUT
    pool: ProducerPool = pools.producers[connection_for(task.app, timeout)]
    try:
        # Every producer is busy only while a send is, within its timeouts; but there may
        # be more sends than producers (broker_pool_limit, 10 by default).
        producer = pool.acquire(block=True, timeout=timeout)
    except LimitExceeded as exc:
        raise OperationalError(f"No broker connection free within {timeout:g} s") from exc
    with producer:
        connection = cast("Connection", producer.connection)  # a pool's producers have one
        # BROKER_ERRORS and what the transport raises besides: py-amqp's AMQP errors, which
        # Celery passes on as they are unless "recoverable" (a queue declared with other
        # arguments, 406, or refused to this user, 403, are not): publish() raised them.
        errors: tuple[type[BaseException], ...] = (
            *BROKER_ERRORS,
            *connection.connection_errors,
            *connection.channel_errors,
            *connection.recoverable_connection_errors,
        )
        try:
            # One attempt at each of the broker's URLs ("redis://a;redis://b"), at once.
            tries = max(len(connection.alt), 1)
            connection.ensure_connection(
                max_retries=tries - 1, interval_start=0, interval_step=0, interval_max=0
            )
            task.apply_async(tuple(args), retry=False, producer=producer, **options)
        except errors as exc:
            # A connection cut short by a timeout may be out of step with the broker (an
            # answer still to come): the next send starts on a new one. collect() closes
            # it without a word to the broker, which would mean waiting for an answer again.
            connection.collect()
            # One kind of error for the callers, that says what happened: Celery passes a
            # nacked message on as an OperationalError with no text, its cause says it.
            cause = exc.__cause__ or exc
            raise OperationalError(f"Sending to the broker failed: {cause!r}") from exc


def connection_for(app: Celery, timeout: float) -> Connection:
    """A (lazy) connection to ``app``'s broker with the app's options, but no timeout over
    ``timeout`` seconds where its transport has them (TIMEOUT_OPTIONS: Redis, RabbitMQ), and
    publisher confirms on RabbitMQ (FORCED_OPTIONS).

    toot's own, not the app's, so that toot changes none of the project's Celery settings:
    the app's connections may serve calls of the project's that must wait longer. Its
    pools live in kombu's global pool groups as the app's do, keyed by the connection's
    options (the timeouts among them): one per broker and timeout, not one per call.
    """
    # As the app makes the connections it publishes through, from its settings: not one of
    # those, whose options its sends change (kombu adds their retry policy), which would
    # make a new pool of toot's, and leave the last one open, at each change.
    theirs = app.connection_for_write()
    transport_options = dict(theirs.transport_options or {})
    driver = theirs.get_transport_cls().driver_name
    for key in TIMEOUT_OPTIONS.get(driver, ()):
        # A shorter timeout of the project's stands. py-amqp's connect_timeout comes from
        # the connection unless a transport option overrides it: Celery's
        # broker_connection_timeout, 4 s by default.
        current = transport_options.get(
            key, theirs.connect_timeout if key == "connect_timeout" else None
        )
        bounded = isinstance(current, (int, float)) and 0 < current <= timeout
        transport_options[key] = current if bounded else timeout
    transport_options.update(FORCED_OPTIONS.get(driver, {}))
    return theirs.clone(transport_options=transport_options)
