"""The outbox: events kept while Redis was unreachable, moved onto the queue once it is back."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid

import pytest
import redis as redis_py
from django.db import connection
from django.test import override_settings
from django.utils import timezone

import toot
from tests.broker import broker_unreachable_and_no_drain
from tests.celery import app as celery_app
from tests.http_server import HTTPServer
from tests.utils import redis_down
from toot.engine import queue
from toot.models import OutboxEvent
from toot.publisher import outbox, store

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


def publish_while_redis_is_down(suffix, count):
    with redis_down():
        events = [toot.publish(suffix, {"n": n}) for n in range(count)]
    assert OutboxEvent.objects.count() == count
    return events


def delivered(subscriber):
    return sorted((request.json() for request in subscriber.requests), key=lambda e: e["id"])


def as_sent(events):
    return sorted((event.to_dict() for event in events), key=lambda e: e["id"])


def test_the_relay_moves_kept_events_onto_the_queue_and_a_drain_delivers_them(
    celery_worker, eventually, suffix, subscriber, caplog
):
    events = publish_while_redis_is_down(suffix, 5)

    with caplog.at_level(logging.INFO, logger="toot.publisher.outbox"):
        assert outbox.relay(celery_app) == 5

    assert not OutboxEvent.objects.exists()
    eventually(lambda: len(subscriber.requests) == 5, what="the kept events to be delivered")
    assert delivered(subscriber) == as_sent(events)
    logged = [
        record.getMessage()
        for record in caplog.records
        if "moved from the outbox to the queue" in record.getMessage()
    ]
    assert len(logged) == 5
    for event, message in zip(events, logged, strict=True):
        assert event.id in message
        assert event.channel in message
    assert outbox.relay(celery_app) == 0


def test_the_relay_moves_the_oldest_first_in_batches(celery_worker, eventually, suffix, subscriber):
    events = publish_while_redis_is_down(suffix, 5)

    assert outbox.relay(celery_app, limit=2) == 2
    assert [row.event["id"] for row in OutboxEvent.objects.all()] == [e.id for e in events[2:]]
    eventually(lambda: len(subscriber.requests) == 2)
    assert delivered(subscriber) == as_sent(events[:2])

    assert outbox.relay(celery_app, limit=2) == 2
    assert outbox.relay(celery_app, limit=2) == 1
    assert not OutboxEvent.objects.exists()
    eventually(lambda: len(subscriber.requests) == 5)
    assert delivered(subscriber) == as_sent(events)


def test_a_relay_while_redis_is_still_down_keeps_every_row(
    celery_worker, eventually, suffix, subscriber
):
    events = publish_while_redis_is_down(suffix, 3)
    rows = list(OutboxEvent.objects.values_list("pk", "event"))

    with redis_down(), pytest.raises(redis_py.ConnectionError):
        outbox.relay(celery_app)  # the relay thread logs it and tries again next round

    assert list(OutboxEvent.objects.values_list("pk", "event")) == rows
    # Not left claimed either: the next round need not wait for CLAIM_TIMEOUT.
    assert set(OutboxEvent.objects.values_list("claim", "claimed_at")) == {("", None)}
    assert outbox.relay(celery_app) == 3
    eventually(lambda: len(subscriber.requests) == 3)
    assert delivered(subscriber) == as_sent(events)


def test_a_relay_while_the_broker_is_down_moves_the_rows_and_a_drain_starts_later(
    celery_worker, no_drain_at_work, eventually, suffix, subscriber, caplog
):
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")  # a started worker sets ERROR
    events = publish_while_redis_is_down(suffix, 3)

    with broker_unreachable_and_no_drain(queue.OUT):
        assert outbox.relay(celery_app) == 3  # on the queue: the rows have done their part

    assert not OutboxEvent.objects.exists()
    [warning] = [r for r in caplog.records if r.thread == threading.get_ident()]
    assert "Cannot start a drain of the out queue now" in warning.getMessage()
    # The worker's relay starts a drain once the broker answers.
    eventually(lambda: len(subscriber.requests) == 3, what="the events to be delivered")
    assert delivered(subscriber) == as_sent(events)


def test_a_claim_older_than_claim_timeout_is_taken_over(
    celery_worker, eventually, suffix, subscriber
):
    stale, fresh = publish_while_redis_is_down(suffix, 2)
    now = timezone.now()
    # One relay died holding its claim; another is moving its row right now.
    died_at = now - dt.timedelta(seconds=outbox.CLAIM_TIMEOUT + 1)
    OutboxEvent.objects.filter(event__id=stale.id).update(claim="dead", claimed_at=died_at)
    OutboxEvent.objects.filter(event__id=fresh.id).update(claim="busy", claimed_at=now)

    assert outbox.relay(celery_app) == 1

    eventually(lambda: subscriber.requests)
    assert [request.json() for request in subscriber.requests] == [stale.to_dict()]
    [row] = OutboxEvent.objects.all()
    assert (row.event["id"], row.claim) == (fresh.id, "busy")


def test_a_relay_that_loses_the_race_for_its_rows_moves_nothing(redis, suffix):
    publish_while_redis_is_down(suffix, 2)
    raced: list[str] = []

    def another_relay_claims_first(execute, sql, params, many, context):
        # Between this relay's look at the free rows and its own claim, another claims them.
        if not raced and sql.lstrip().upper().startswith("UPDATE"):
            raced.append(sql)
            OutboxEvent.objects.update(claim="other", claimed_at=timezone.now())
        return execute(sql, params, many, context)

    with connection.execute_wrapper(another_relay_claims_first):
        assert outbox.relay(celery_app) == 0

    assert raced
    assert set(OutboxEvent.objects.values_list("claim", flat=True)) == {"other"}


class ReadsFromTheReplica:
    """The router of Django's multi-database guide: reads go to a replica, which lags."""

    def db_for_read(self, model, **hints):
        return "other"

    def db_for_write(self, model, **hints):
        return "default"


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
def test_the_relay_reads_its_rows_from_the_database_it_claims_them_in(
    celery_worker, eventually, suffix, subscriber
):
    events = publish_while_redis_is_down(suffix, 2)

    with override_settings(DATABASE_ROUTERS=[f"{__name__}.ReadsFromTheReplica"]):
        assert outbox.relay(celery_app) == 2

    assert not OutboxEvent.objects.exists()
    eventually(lambda: len(subscriber.requests) == 2, what="the kept events to be delivered")
    assert delivered(subscriber) == as_sent(events)
