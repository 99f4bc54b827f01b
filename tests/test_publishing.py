"""toot.publish: the event it returns, and when it is sent relative to the caller's transaction."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection, transaction
from django.test import AsyncClient, override_settings
from django.utils.translation import gettext_lazy

import toot
from tests.broker import broker_unreachable_and_no_drain
from tests.http_server import HTTPServer
from tests.utils import redis_down, spy_pushes
from toot.engine import queue
from toot.models import OutboxEvent
from toot.publisher import store

PREFIX = "org.example.test."


@pytest.fixture
def suffix():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"users.updated.{uuid.uuid4().hex[:8]}.v1"


@pytest.fixture
def pushed(monkeypatch):
    """The events pushed onto the ``out`` queue during the test, as pushed."""
    return spy_pushes(monkeypatch, queue.OUT)


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


def test_publish_pushes_the_event_onto_the_out_queue(celery_worker, suffix, pushed):
    event = toot.publish(suffix, {"id": 1})
    assert pushed == [event.to_dict()]


def test_published_while_the_broker_is_down_the_event_waits_on_the_queue(
    celery_worker, no_drain_at_work, eventually, suffix, caplog
):
    # No django_db mark: the event is safe in Redis, the outbox is not needed.
    caplog.set_level(logging.WARNING, logger="toot.engine.drain")  # a started worker sets ERROR
    with HTTPServer() as subscriber:
        store.add(PREFIX + suffix, subscriber.url)
        # No drain at work (the fixture waited for the worker to be idle): this publish
        # tries to start one.
        with broker_unreachable_and_no_drain(queue.OUT):
            event = toot.publish(suffix, {"id": "while down"})  # raises nothing
            assert any(
                "Cannot start a drain of the out queue now" in record.getMessage()
                for record in caplog.records
                if record.thread == threading.get_ident()
            )

        # A drain already running takes it, or the worker's relay starts one once the
        # broker answers.
        eventually(lambda: subscriber.requests, what="the event to be delivered")
        assert [r.json() for r in subscriber.requests] == [event.to_dict()]


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


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
def test_a_rolled_back_transaction_on_another_database_publishes_nothing(
    celery_worker, suffix, pushed
):
    with pytest.raises(RuntimeError), transaction.atomic(using="other"):
        toot.publish(suffix, {"id": "rolled back"})
        raise RuntimeError("roll back")

    assert pushed == []


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.parametrize("rolled_back", [None, "default", "other"])
def test_publish_in_transactions_on_two_databases_is_sent_once_both_commit(
    celery_worker, suffix, pushed, rolled_back
):
    with contextlib.suppress(RuntimeError), transaction.atomic():
        with contextlib.suppress(RuntimeError), transaction.atomic(using="other"):
            event = toot.publish(suffix, {"id": 4})
            if rolled_back == "other":
                raise RuntimeError("roll back")
        assert pushed == []  # "other" is done, the default database not yet
        if rolled_back == "default":
            raise RuntimeError("roll back")

    assert [sent["id"] for sent in pushed] == ([event.id] if rolled_back is None else [])


@pytest.mark.django_db(databases=["default", "other"])
def test_a_test_on_two_databases_sees_the_event_on_the_default_ones_commit(
    celery_worker, suffix, pushed, django_capture_on_commit_callbacks
):
    # The test's own atomic blocks on each database never commit: as with one database,
    # running the default one's callbacks sends the event.
    with django_capture_on_commit_callbacks(execute=True):
        event = toot.publish(suffix, {"id": 5})
        assert pushed == []

    assert [sent["id"] for sent in pushed] == [event.id]


# Redis unreachable: the event waits in the outbox (toot.publisher.outbox)


@pytest.mark.django_db(transaction=True)
def test_publish_keeps_the_event_in_the_outbox_when_redis_is_unreachable(suffix, caplog):
    with redis_down(), caplog.at_level(logging.WARNING, logger="toot.publisher.outbox"):
        started = time.monotonic()
        events = [toot.publish(suffix, {"n": n}) for n in range(3)]  # raises nothing
        elapsed = time.monotonic() - started

    kept = [row.event for row in OutboxEvent.objects.order_by("id")]
    assert kept == [event.to_dict() for event in events]
    # One connection attempt each, in the caller's request: no retry loop holds it.
    assert elapsed < 2.0
    warnings = [
        record.getMessage() for record in caplog.records if record.name == "toot.publisher.outbox"
    ]
    assert len(warnings) == 3
    for event, message in zip(events, warnings, strict=True):
        assert event.id in message
        assert event.channel in message
        assert "Redis failed" in message
        assert "outbox" in message


def test_what_django_code_sends_is_encoded_as_djangos_json_encoder_does(
    celery_worker, eventually, suffix, pushed
):
    """Datetimes, Decimals, UUIDs and lazy strings: subscribers get strings, and so does
    the caller in the event publish() returns."""
    at = dt.datetime(2026, 12, 6, 10, 30, tzinfo=dt.timezone.utc)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    payload = {
        "at": at,
        "on": at.date(),
        "time": at.time(),
        "price": Decimal("12.30"),
        "id": ident,
        "label": gettext_lazy("Toot"),
        "items": [{"n": 1}],
    }
    expected = {
        "at": "2026-12-06T10:30:00Z",
        "on": "2026-12-06",
        "time": "10:30:00",
        "price": "12.30",
        "id": "12345678-1234-5678-1234-567812345678",
        "label": "Toot",
        "items": [{"n": 1}],
    }
    with HTTPServer() as subscriber:
        store.add(f"{PREFIX}{suffix}", subscriber.url)
        event = toot.publish(suffix, payload)
        eventually(lambda: subscriber.requests)

    assert event.payload == expected
    assert [e["payload"] for e in pushed] == [expected]
    assert subscriber.requests[0].json()["payload"] == expected


class CentsEncoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        if isinstance(o, Decimal):
            return int(o * 100)
        return super().default(o)


def test_json_encoder_is_the_projects_to_choose(suffix, pushed):
    with override_settings(
        TOOT={**settings.TOOT, "JSON_ENCODER": "tests.test_publishing.CentsEncoder"}
    ):
        event = toot.publish(suffix, {"price": Decimal("12.30")})
    assert event.payload == {"price": 1230}
    assert [e["payload"] for e in pushed] == [{"price": 1230}]


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"items": [{}, {}, {}, {"price": object()}]}, 'payload["items"][3]["price"] is a object'),
        ([1, {"at": float("nan")}], 'payload[1]["at"] is nan'),
        ({"tags": {"a", "b"}}, 'payload["tags"] is a set'),
        ({"when": {"at": dt.datetime.now(tz=dt.timezone.utc), "x": 1j}}, 'payload["when"]["x"]'),
        ({(1, 2): "tuple key"}, "payload has a key of type tuple"),
    ],
    ids=["object", "nan", "set", "complex-after-a-datetime", "tuple-key"],
)
def test_a_value_no_encoder_takes_is_refused_naming_where_it_is(suffix, pushed, payload, where):
    with pytest.raises(toot.InvalidEvent, match="payload is not JSON") as raised:
        toot.publish(suffix, payload)
    assert where in str(raised.value)
    assert pushed == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("redis_up", [True, False], ids=["queued", "kept"])
def test_publish_from_an_async_view_sends_or_keeps_the_event(celery_worker, pushed, redis_up):
    # The ORM refuses to run in an event loop's thread: the outbox must not need it to.
    with contextlib.nullcontext() if redis_up else redis_down():
        response = async_to_sync(AsyncClient().get)("/async-publish/")

    assert response.status_code == 200
    event_id = response.json()["id"]
    if redis_up:
        assert [event["id"] for event in pushed] == [event_id]
    else:
        kept = [row.event for row in OutboxEvent.objects.all()]
        assert [event["id"] for event in kept] == [event_id]


@pytest.mark.django_db(transaction=True)
def test_publish_in_a_transaction_keeps_the_event_on_commit_when_redis_is_down(suffix):
    with redis_down():
        with transaction.atomic():
            event = toot.publish(suffix, {"id": 3})
            assert not OutboxEvent.objects.exists()  # nothing is sent or kept before commit
        [row] = OutboxEvent.objects.all()
    assert row.event == event.to_dict()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("redis_up", [True, False], ids=["queued", "kept"])
def test_a_payload_changed_before_the_commit_is_sent_as_published(
    celery_worker, suffix, pushed, redis_up
):
    payload = {"n": 1}
    with contextlib.nullcontext() if redis_up else redis_down(), transaction.atomic():
        toot.publish(suffix, payload)
        payload["n"] = 2  # the caller's dict, changed before the commit sends the event

    sent = pushed if redis_up else [row.event for row in OutboxEvent.objects.all()]
    assert [event["payload"] for event in sent] == [{"n": 1}]


@pytest.mark.django_db(transaction=True)
def test_publish_with_redis_back_sends_again(celery_worker, eventually, suffix):
    with HTTPServer() as subscriber:
        store.add(PREFIX + suffix, subscriber.url)
        with redis_down():
            toot.publish(suffix, {"id": "kept"})
        event = toot.publish(suffix, {"id": "sent"})

        eventually(lambda: subscriber.requests)
        assert [r.json()["id"] for r in subscriber.requests] == [event.id]
    assert [row.event["payload"] for row in OutboxEvent.objects.all()] == [{"id": "kept"}]


# Limits: an event that subscribers would refuse is refused here, before it is pushed


def max_event_bytes(limit):
    return override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": limit})


def test_an_event_over_max_event_bytes_is_refused_before_anything_is_enqueued(suffix, pushed):
    with max_event_bytes(1024), pytest.raises(toot.EventTooLarge) as refused:
        toot.publish(suffix, {"text": "p" * 2000})

    assert isinstance(refused.value, ValueError)
    assert isinstance(refused.value, toot.TootError)
    assert (refused.value.channel, refused.value.limit) == (PREFIX + suffix, 1024)
    assert refused.value.size > 2000
    assert 'TOOT["MAX_EVENT_BYTES"] (1024)' in str(refused.value)
    assert pushed == []


def test_an_event_of_exactly_max_event_bytes_is_published(celery_worker, suffix, pushed):
    with max_event_bytes(1024), pytest.raises(toot.EventTooLarge) as refused:
        toot.publish(suffix, "p" * 2000)
    fitting = "p" * (2000 - (refused.value.size - 1024))

    with max_event_bytes(1024):
        event = toot.publish(suffix, fitting)

    [sent] = pushed
    assert sent["id"] == event.id
    assert len(json.dumps(sent, separators=(",", ":")).encode()) == 1024


def test_the_limit_counts_the_bytes_sent(suffix, pushed):
    # JSON escapes non-ASCII text: "é" travels as the six bytes \u00e9.
    with max_event_bytes(1024), pytest.raises(toot.EventTooLarge):
        toot.publish(suffix, "é" * 200)
    with max_event_bytes(1024):
        toot.publish(suffix, "e" * 200)
    assert len(pushed) == 1


def test_the_default_limit_is_256_kib(suffix, pushed):
    with pytest.raises(toot.EventTooLarge, match=r"\(262144\)"):
        toot.publish(suffix, "x" * 256 * 1024)
    assert pushed == []


@pytest.mark.django_db(transaction=True)
def test_an_oversized_event_is_refused_at_once_inside_a_transaction(suffix, pushed):
    with transaction.atomic(), max_event_bytes(1024):
        with pytest.raises(toot.EventTooLarge):
            toot.publish(suffix, "p" * 2000)
        assert connection.run_on_commit == []  # nothing waits for the commit either
    assert pushed == []
    assert not OutboxEvent.objects.exists()


@pytest.mark.parametrize(
    "payload",
    [object(), {"at": float("nan")}, [float("inf")], {1j}],
    ids=["object", "nan", "infinity", "set"],
)
def test_a_payload_that_is_not_json_is_refused(suffix, pushed, payload):
    with pytest.raises(toot.InvalidEvent, match="payload is not JSON"):
        toot.publish(suffix, payload)
    assert pushed == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("redis_up", [True, False], ids=["queued", "kept"])
@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param({"s": "\ud800"}, "lone surrogate", id="high"),
        pytest.param(["\udfff"], "lone surrogate", id="low"),
        pytest.param({"\udc00\ud800": 1}, "lone surrogate", id="key"),
        pytest.param({"s": "a\x00b"}, "NUL character", id="nul"),
        pytest.param({"a\x00": [1]}, "NUL character", id="nul-key"),
    ],
)
def test_a_payload_with_text_no_database_stores_is_refused(
    suffix, pushed, payload, error, redis_up
):
    # Valid JSON as escapes, but a lone surrogate is no Unicode text, and PostgreSQL's jsonb
    # refuses NUL: the outbox row, or a subscriber's dead letter, could not be written.
    with (
        contextlib.nullcontext() if redis_up else redis_down(),
        pytest.raises(toot.InvalidEvent, match=error),
    ):
        toot.publish(suffix, payload)
    assert pushed == []
    assert not OutboxEvent.objects.exists()


def test_a_payload_with_characters_past_the_bmp_is_sent(celery_worker, suffix, pushed):
    toot.publish(suffix, {"s": "\U0001f600"})  # a surrogate pair escape in the JSON

    assert [event["payload"] for event in pushed] == [{"s": "\U0001f600"}]


def test_a_payload_nested_deeper_than_subscribers_read_is_refused(celery_worker):
    from toot.protocol.validation import MAX_JSON_DEPTH

    deep: list[Any] = []
    for _ in range(MAX_JSON_DEPTH - 1):  # with the event's own object: one level too many
        deep = [deep]
    with pytest.raises(toot.InvalidEvent, match="nested more than"):
        toot.publish("x.v1", deep)
    shallower = deep[0]
    toot.publish("x.v1", shallower)  # exactly MAX_JSON_DEPTH levels: sent


def test_apublish_waits_for_redis_off_the_event_loop(celery_worker, suffix, pushed, monkeypatch):
    from toot.engine import drain

    threads = []
    real_enqueue = drain.enqueue

    def enqueue(*args, **kwargs):
        threads.append(threading.get_ident())
        return real_enqueue(*args, **kwargs)

    monkeypatch.setattr(drain, "enqueue", enqueue)

    async def view():
        return threading.get_ident(), await toot.apublish(suffix, {"at": Decimal("1.50")})

    loop_thread, event = async_to_sync(view)()

    assert event.channel == PREFIX + suffix
    assert event.payload == {"at": "1.50"}
    assert [e["id"] for e in pushed] == [event.id]
    assert threads and loop_thread not in threads


@pytest.mark.django_db(transaction=True)
def test_apublish_in_a_transaction_waits_for_its_commit(celery_worker, suffix, pushed):
    from asgiref.sync import sync_to_async

    async def view():
        def in_atomic():
            with transaction.atomic():
                event = async_to_sync(toot.apublish)(suffix, {"n": 1})
                assert pushed == []  # the transaction of the thread it runs in is open
                return event

        return await sync_to_async(in_atomic)()

    event = async_to_sync(view)()

    assert [e["id"] for e in pushed] == [event.id]
