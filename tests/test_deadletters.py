"""Dead letters: burying what failed for good, and replaying it against real peers."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets

import pytest
import standardwebhooks
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

import toot
from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply
from tests.utils import callback_urls
from toot.deadletters import Replay, redeliver
from toot.models import DeadLetter
from toot.protocol.events import Event, wire_json
from toot.publisher import store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber.handling import ALL, bury_handler, handler_name

pytestmark = pytest.mark.django_db

PUBLISHED = "org.example.test.users.updated.v1"
SUBSCRIBED = "org.example.publisher.users.updated.v1"
FIRST_ATTEMPT = "2026-01-02T03:04:05+00:00"


def letter_for_delivery(callback_url, channel=PUBLISHED):
    event = Event(channel, {"id": 1}).to_dict()
    return bury_delivery(event, callback_url, 4, Outcome(status=500, error="down"), FIRST_ATTEMPT)


def letter_for_handler(handler, channel=SUBSCRIBED):
    event = Event(channel, {"id": 1}).to_dict()
    return bury_handler(event, handler_name(handler), 4, RuntimeError("boom"), FIRST_ATTEMPT)


def on_update(event):
    pass


def test_bury_delivery_keeps_everything_about_the_failure():
    event = Event(PUBLISHED, {"id": 1}).to_dict()
    before = timezone.now()

    letter = bury_delivery(
        event, "http://peer/cb", 4, Outcome(status=503, error="busy"), FIRST_ATTEMPT
    )

    letter = DeadLetter.objects.get(pk=letter.pk)
    assert letter.kind == DeadLetter.Kind.DELIVERY
    assert (letter.event_id, letter.channel, letter.event) == (event["id"], PUBLISHED, event)
    assert (letter.callback_url, letter.handler) == ("http://peer/cb", "")
    assert (letter.attempts, letter.last_status, letter.last_error) == (4, 503, "busy")
    assert letter.first_attempt_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert before <= letter.last_attempt_at <= timezone.now()


def test_bury_handler_keeps_everything_about_the_failure():
    event = Event(SUBSCRIBED, {"id": 1}).to_dict()

    letter = bury_handler(
        event, "app.handlers.on_update", 5, ValueError("bad payload"), FIRST_ATTEMPT
    )

    letter = DeadLetter.objects.get(pk=letter.pk)
    assert letter.kind == DeadLetter.Kind.HANDLER
    assert (letter.event_id, letter.channel, letter.event) == (event["id"], SUBSCRIBED, event)
    assert (letter.callback_url, letter.handler) == ("", "app.handlers.on_update")
    assert (letter.attempts, letter.last_status) == (5, None)
    assert letter.last_error == "ValueError('bad payload')"
    assert letter.first_attempt_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def test_a_missing_first_attempt_time_is_now():
    before = timezone.now()
    letter = bury_delivery(Event(PUBLISHED).to_dict(), "http://peer/", 1, Outcome(error="x"), None)
    assert before <= letter.first_attempt_at <= letter.last_attempt_at


def test_bury_logs_an_error_with_the_event(caplog):
    caplog.set_level(logging.ERROR, logger="toot.publisher.sending")
    letter = letter_for_delivery("http://peer/cb")
    [record] = [r for r in caplog.records if r.name == "toot.publisher.sending"]
    assert record.levelname == "ERROR"
    assert letter.event_id in record.getMessage()
    assert PUBLISHED in record.getMessage()


# redeliver(): deliveries


def test_a_redelivered_delivery_is_deleted():
    with HTTPServer(Reply(204)) as peer:
        letter = letter_for_delivery(peer.url + "/toot/callbacks")

        assert redeliver(letter) is Replay.REDELIVERED

    assert not DeadLetter.objects.filter(pk=letter.pk).exists()
    [request] = peer.requests
    assert request.path == "/toot/callbacks"
    assert request.json() == letter.event


def test_a_redelivery_sends_the_single_event_signed_under_its_id(redis):
    """A dead letter holds one event, though it may have failed in a batch: it goes alone."""
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with (
        HTTPServer(Reply(200)) as peer,
        override_settings(TOOT={**settings.TOOT, "SIGNING_SECRETS": [secret]}),
    ):
        store.add(PUBLISHED, peer.url, batch=True)
        letter = letter_for_delivery(peer.url)

        assert redeliver(letter) is Replay.REDELIVERED

    [request] = peer.requests
    assert request.body == wire_json(letter.event).encode()
    assert request.headers["webhook-id"] == letter.event_id
    webhook = standardwebhooks.Webhook(secret)
    assert webhook.verify(request.body, dict(request.headers.items())) == letter.event


def test_a_delivery_that_fails_again_is_kept_as_one_more_attempt():
    with HTTPServer(Reply(502, body=b"bad gateway")) as peer:
        letter = letter_for_delivery(peer.url)
        before = DeadLetter.objects.get(pk=letter.pk)

        assert redeliver(letter) is Replay.FAILED

    after = DeadLetter.objects.get(pk=letter.pk)
    assert len(peer.requests) == 1
    assert after.attempts == before.attempts + 1
    assert (after.last_status, after.last_error) == (502, "bad gateway")
    assert after.last_attempt_at > before.last_attempt_at
    assert (after.first_attempt_at, after.event) == (before.first_attempt_at, before.event)


def test_a_delivery_that_cannot_connect_is_kept_with_the_error():
    letter = letter_for_delivery(f"http://127.0.0.1:{free_port()}/toot/callbacks")

    assert redeliver(letter) is Replay.FAILED

    letter.refresh_from_db()
    assert letter.attempts == 5
    assert letter.last_status is None
    assert letter.last_error.startswith("ConnectionError: ")


def test_a_gone_subscriber_ends_the_dead_letter_and_the_subscription(redis, caplog):
    """A 410 is no delivery: the event reached nobody, and the log says so, not "redelivered"."""
    caplog.set_level(logging.INFO, logger="toot.deadletters")
    with HTTPServer(Reply(410)) as peer:
        store.add(PUBLISHED, peer.url)
        letter = letter_for_delivery(peer.url)
        pk = letter.pk  # None once deleted
        caplog.clear()

        assert redeliver(letter) is Replay.GONE

    assert not DeadLetter.objects.exists()
    assert peer.url not in callback_urls(PUBLISHED)
    [record] = [r for r in caplog.records if r.name == "toot.deadletters"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"Event {letter.event_id} on {PUBLISHED}: dead letter {pk} not delivered, "
        f"{peer.url} is gone (410); removed"
    )


def test_an_unsubscribe_with_a_2xx_is_still_a_delivery(redis):
    """The subscriber took the event (docs/protocol.md section 2), though it wants no more."""
    with HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "True"})) as peer:
        store.add(PUBLISHED, peer.url)
        letter = letter_for_delivery(peer.url)

        assert redeliver(letter) is Replay.REDELIVERED

    assert not DeadLetter.objects.exists()
    assert peer.url not in callback_urls(PUBLISHED)


# redeliver(): handlers


def test_a_redelivered_handler_runs_and_is_deleted(redis):
    seen = []

    def on_event(event):
        seen.append(event)

    toot.subscribe("publisher", "users.updated.v1", on_event)
    letter = letter_for_handler(on_event)

    assert redeliver(letter) is Replay.REDELIVERED

    assert seen == [Event.from_dict(letter.event)]
    assert seen[0].payload == {"id": 1}
    assert not DeadLetter.objects.exists()


def test_a_handler_that_fails_again_is_kept_as_one_more_attempt(redis):
    def still_broken(event):
        raise KeyError("customer")

    toot.subscribe("publisher", "users.updated.v1", still_broken)
    letter = letter_for_handler(still_broken)

    assert redeliver(letter) is Replay.FAILED

    letter.refresh_from_db()
    assert letter.attempts == 5
    assert (letter.last_status, letter.last_error) == (None, "KeyError('customer')")


def test_a_handler_no_longer_subscribed_is_kept(redis):
    calls = []

    def gone(event):
        calls.append(event)

    letter = letter_for_handler(gone)  # buried, then the subscription was removed
    toot.subscribe("publisher", "users.updated.v1", on_update)

    assert redeliver(letter) is Replay.FAILED

    letter.refresh_from_db()
    assert calls == []
    assert letter.attempts == 5
    assert letter.last_error == repr(
        LookupError(f"{handler_name(gone)} is not subscribed to {SUBSCRIBED} here")
    )


def test_redelivery_runs_only_the_dead_lettered_handler(redis):
    calls = []

    def healthy(event):
        calls.append("healthy")

    def recovered(event):
        calls.append("recovered")

    toot.subscribe("publisher", "users.updated.v1", healthy)
    toot.subscribe("publisher", "users.updated.v1", recovered)

    assert redeliver(letter_for_handler(recovered)) is Replay.REDELIVERED
    assert calls == ["recovered"]


def letter_for_every_handler():
    """As filed when an event found no handler at all (unsubscribed since it was accepted)."""
    event = Event(SUBSCRIBED, {"id": 1}).to_dict()
    return bury_handler(event, ALL, 4, LookupError("no handler"), FIRST_ATTEMPT)


def test_a_letter_for_every_handler_runs_the_handlers_there_are_now(redis):
    calls = []
    toot.subscribe("publisher", "users.updated.v1", lambda event: calls.append("one"))
    toot.subscribe("publisher", "users.updated.v1", lambda event: calls.append("two"))

    assert redeliver(letter_for_every_handler()) is Replay.REDELIVERED

    assert sorted(calls) == ["one", "two"]
    assert not DeadLetter.objects.exists()


def test_a_letter_for_every_handler_keeps_the_errors_of_those_that_fail(redis):
    def broken(event):
        raise KeyError("customer")

    toot.subscribe("publisher", "users.updated.v1", on_update)
    toot.subscribe("publisher", "users.updated.v1", broken)
    letter = letter_for_every_handler()

    assert redeliver(letter) is Replay.FAILED

    letter.refresh_from_db()
    assert (letter.handler, letter.attempts) == (ALL, 5)
    assert letter.last_error == "KeyError('customer')"


def test_a_letter_for_every_handler_with_still_none_is_kept(redis):
    letter = letter_for_every_handler()

    assert redeliver(letter) is Replay.FAILED

    letter.refresh_from_db()
    assert letter.attempts == 5
    assert letter.last_error == repr(LookupError(f"no handler for {SUBSCRIBED} here"))
