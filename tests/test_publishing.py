"""toot.publish: the event it returns, and when it is sent relative to the caller's transaction."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection, transaction

import toot
from tests.http_server import HTTPServer
from toot import store

PREFIX = "org.example.test."


@pytest.fixture
def suffix():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"users.updated.{uuid.uuid4().hex[:8]}.v1"


def test_publish_returns_the_event_on_the_prefixed_channel(celery_worker):
    event = toot.publish("users.updated.v1", {"id": 123})
    assert isinstance(event, toot.Event)
    assert event.channel == PREFIX + "users.updated.v1"
    assert event.payload == {"id": 123}
    assert event["id"] == 123
    assert event.timestamp.tzinfo is not None


def test_prefix_argument_overrides_channel_prefix(celery_worker):
    assert toot.publish("x.v1", prefix="com.other.").channel == "com.other.x.v1"
    assert toot.publish("x.v1", prefix="").channel == "x.v1"


@pytest.mark.parametrize("channel", ["has space", "ünïcode", "x" * 300])
def test_invalid_channel_is_refused(channel):
    with pytest.raises(toot.InvalidChannel):
        toot.publish(channel, {})


def test_published_event_is_delivered_to_subscribers(celery_worker, eventually, suffix):
    # No django_db mark: pytest-django fails the test if publish() touched the database.
    with HTTPServer() as subscriber:
        store.add(PREFIX + suffix, subscriber.url)
        event = toot.publish(suffix, {"id": 1})
        eventually(lambda: subscriber.requests)
        assert subscriber.requests[0].json() == event.to_dict()


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_publishes_nothing(celery_worker, eventually, suffix):
    with HTTPServer() as subscriber:
        store.add(PREFIX + suffix, subscriber.url)

        with pytest.raises(RuntimeError), transaction.atomic():
            toot.publish(suffix, {"id": "rolled back"})
            raise RuntimeError("roll back")
        marker = toot.publish(suffix, {"id": "after"})

        # Events go through one queue in order, so once the later one has arrived the
        # rolled-back one would have too.
        eventually(lambda: subscriber.requests)
        assert [r.json()["id"] for r in subscriber.requests] == [marker.id]


@pytest.mark.django_db(transaction=True)
def test_publish_in_a_transaction_is_sent_on_commit(celery_worker, eventually, suffix):
    with HTTPServer() as subscriber:
        store.add(PREFIX + suffix, subscriber.url)
        with transaction.atomic():
            event = toot.publish(suffix, {"id": 2})
            assert len(connection.run_on_commit) == 1  # held until commit, not sent inline
        eventually(lambda: subscriber.requests)
        assert subscriber.requests[0].json()["id"] == event.id

