"""The outbox: events kept while the broker was unreachable, relayed once it is back."""

from __future__ import annotations

import logging
import uuid

import pytest
from kombu.exceptions import OperationalError

import toot
from tests.broker import broker_unreachable
from tests.celery import app as celery_app
from tests.http_server import HTTPServer
from toot import outbox, store
from toot.models import OutboxEvent

pytestmark = pytest.mark.django_db(transaction=True)

PREFIX = "org.example.test."


@pytest.fixture
def suffix():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"orders.created.{uuid.uuid4().hex[:8]}.v1"


@pytest.fixture
def subscriber(redis, suffix):
    with HTTPServer() as server:
        store.add(PREFIX + suffix, server.url)
        yield server


def publish_while_the_broker_is_down(suffix, count):
    with broker_unreachable():
        events = [toot.publish(suffix, {"n": n}) for n in range(count)]
    assert OutboxEvent.objects.count() == count
    return events


def test_the_relay_sends_kept_events_once_the_broker_is_back(
    celery_worker, eventually, suffix, subscriber, caplog
):
    events = publish_while_the_broker_is_down(suffix, 5)

    with caplog.at_level(logging.INFO, logger="toot.outbox"):
        assert outbox.relay(celery_app) == 5

    assert not OutboxEvent.objects.exists()
    eventually(lambda: len(subscriber.requests) == 5, what="the kept events to be delivered")
    delivered = sorted(
        (request.json() for request in subscriber.requests), key=lambda e: e["payload"]["n"]
    )
    assert delivered == [event.to_dict() for event in events]
    logged = [
        record.getMessage()
        for record in caplog.records
        if "sent from the outbox" in record.getMessage()
    ]
    assert len(logged) == 5
    for event, message in zip(events, logged, strict=True):
        assert event.id in message
        assert event.channel in message
    assert outbox.relay(celery_app) == 0


def test_the_relay_sends_the_oldest_first_in_batches(celery_worker, eventually, suffix, subscriber):
    events = publish_while_the_broker_is_down(suffix, 5)

    assert outbox.relay(celery_app, limit=2) == 2
    assert [row.event["id"] for row in OutboxEvent.objects.all()] == [e.id for e in events[2:]]
    eventually(lambda: len(subscriber.requests) == 2)
    assert {r.json()["id"] for r in subscriber.requests} == {e.id for e in events[:2]}

    assert outbox.relay(celery_app, limit=2) == 2
    assert outbox.relay(celery_app, limit=2) == 1
    assert not OutboxEvent.objects.exists()
    eventually(lambda: len(subscriber.requests) == 5)


def test_a_relay_that_fails_keeps_every_row(celery_worker, eventually, suffix, subscriber):
    events = publish_while_the_broker_is_down(suffix, 3)
    rows = list(OutboxEvent.objects.values_list("pk", "event"))

    with broker_unreachable(), pytest.raises(OperationalError):
        outbox.relay(celery_app)  # the broker is still down: the relay thread logs and retries

    assert list(OutboxEvent.objects.values_list("pk", "event")) == rows
    assert outbox.relay(celery_app) == 3
    eventually(lambda: len(subscriber.requests) == 3)
    assert sorted(r.json()["id"] for r in subscriber.requests) == sorted(e.id for e in events)
