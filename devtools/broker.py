"""Celery's broker for the tests and the example topology: Redis, or RabbitMQ (``amqp://``).

The tests run on either (``TOOT_TEST_BROKER_URL``, tests/settings.py). What differs is where
a Celery queue lives and how it goes away: on Redis it is a list (and kombu's binding
sets) among the run's keys; on RabbitMQ, a durable queue and the direct exchange of the
same name that Celery declares for it, which stay on the broker until deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu import Connection

# What a broker gets to answer a connection or a queue declaration, in seconds.
TIMEOUT = 10.0


def is_redis(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss")


def amqp_connection(url: str) -> Connection:
    return Connection(url, connect_timeout=TIMEOUT, transport_options={"read_timeout": TIMEOUT})


def queue_length(url: str, name: str) -> int:
    """How many messages wait on Celery queue ``name`` of the broker at ``url`` (not those a
    worker holds unacknowledged); 0 for a queue that does not exist."""
    if is_redis(url):
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT)
        try:
            return int(client.llen(name))
        finally:
            client.close()
    with amqp_connection(url) as connection:
        try:
            channel: Any = connection.default_channel  # py-amqp's, beyond kombu's StdChannel
            return int(channel.queue_declare(name, passive=True).message_count)
        except connection.channel_errors:  # 404: never declared, or deleted
            return 0


def delete_queues(url: str, names: Iterable[str]) -> None:
    """Delete Celery queues ``names`` from the broker at ``url``, with what Celery declared
    for them, whatever they hold."""
    names = list(names)
    if is_redis(url):
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT)
        try:
            for name in names:
                client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
        finally:
            client.close()
        return
    with amqp_connection(url) as connection:
        channel: Any = connection.channel()  # py-amqp's, beyond kombu's StdChannel
        for name in names:
            # Deleting what does not exist is no error for RabbitMQ (since 3.2).
            channel.queue_delete(name)
            channel.exchange_delete(name)  # Celery's default exchange is named as its queue
