"""Signed deliveries (Standard Webhooks): toot.signing, the publisher's signed delivery and the
callback endpoint's verification, checked against the ``standardwebhooks`` package.

The callback tests go through Django's test client with CSRF checks enforced, the real
broker (what is enqueued is read from Celery's ``after_task_publish`` signal) and, where a
handler must run, a real worker. The delivery tests run ``deliver`` in a real worker
against a real HTTP peer, and the round trip below against the live server.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import time
import uuid
from unittest.mock import create_autospec

import pytest
import standardwebhooks
from django.conf import settings
from django.test import override_settings

from tests.http_server import HTTPServer, Reply, in_order
from toot import Event, subscribe
from toot.conf import conf
from toot.exceptions import ConfigError, InvalidSignature
from toot.models import DeadLetter
from toot.signing import (
    MAX_SIGNATURES,
    TOLERANCE_SECONDS,
    decode_secret,
    secret_error,
    sign,
    signature_headers,
    verify,
)
from toot.tasks import deliver

CALLBACKS = "/toot/callbacks"
SOURCE = conf.raw["SOURCES"]["publisher"]
SOURCE_PREFIX = SOURCE["CHANNEL_PREFIX"]
UTC = dt.timezone.utc

# The example of the Standard Webhooks spec and of Svix's documentation.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def new_secret(size=32):
    return "whsec_" + base64.b64encode(secrets.token_bytes(size)).decode()


def toot_settings(**options):
    return override_settings(TOOT={**settings.TOOT, **options})


def source_settings(**source_options):
    """The tests' settings with the "publisher" source's options changed."""
    return toot_settings(SOURCES={"publisher": {**SOURCE, **source_options}})


def on_event(event: Event) -> None:
    """The shape of a handler; the tests' handlers are autospecs of it."""


@pytest.fixture
def secret():
    return new_secret()


@pytest.fixture
def subscribed():
    """A handler subscribed to a fresh channel of the "publisher" source."""
    channel = f"{SOURCE_PREFIX}users.{uuid.uuid4().hex[:12]}.v1"
    handler = create_autospec(on_event)
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), handler)
    return channel, handler


def wire_body(channel, **fields):
    event = {
        "id": str(uuid.uuid4()),
        "timestamp": "2015-10-23T11:50:09.000-05:00",
        "payload": {"key": "value"},
        "channel": channel,
        **fields,
    }
    return json.dumps(event).encode()


def their_headers(secret, msg_id, body, timestamp=None):
    """Headers as the standardwebhooks package signs a message."""
    when = timestamp or dt.datetime.now(tz=UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, when, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


def post(client, body, headers=None):
    return client.post(CALLBACKS, body, content_type="application/json", headers=headers or {})


def assert_unauthorized(response, error_part):
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert error_part in response.json()["error"]


def handled_ids(handler):
    return [call.args[0].id for call in handler.call_args_list]


# Secrets ----------------------------------------------------------------------------------


def test_a_generated_secret_is_well_formed_and_decodes_to_its_bytes():
    raw = secrets.token_bytes(32)

    assert secret_error("whsec_" + base64.b64encode(raw).decode()) is None
    assert decode_secret("whsec_" + base64.b64encode(raw).decode()) == raw


def test_unpadded_base64_is_accepted_as_standardwebhooks_does():
    raw = secrets.token_bytes(25)  # 25 bytes: base64 ends in "=="
    unpadded = "whsec_" + base64.b64encode(raw).decode().rstrip("=")

    assert decode_secret(unpadded) == raw


@pytest.mark.parametrize(
    ("secret", "error"),
    [
        pytest.param(None, "must be a string", id="none"),
        pytest.param(b"whsec_" + b"A" * 32, "must be a string", id="bytes"),
        pytest.param("", 'must start with "whsec_"', id="empty"),
        pytest.param(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", 'must start with "whsec_"', id="no-prefix"
        ),
        pytest.param("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start", id="upper-prefix"),
        pytest.param("whsec_", "at least 24", id="prefix-only"),
        pytest.param("whsec_not base64 at all!", "standard base64", id="not-base64"),
        pytest.param("whsec_" + "A" * 31 + "-", "standard base64", id="urlsafe-char"),
        pytest.param("whsec_" + base64.b64encode(b"x" * 23).decode(), "not 23", id="23-bytes"),
    ],
)
def test_malformed_secrets_are_refused(secret, error):
    assert error in (secret_error(secret) or "")
    with pytest.raises(ConfigError, match='TOOT\\["X"\\]'):
        decode_secret(secret, name='TOOT["X"]')


def test_a_malformed_secret_is_never_quoted():
    secret = "whsec_" + "s3cr3t!" * 5

    message = secret_error(secret)

    assert message
    assert "s3cr3t" not in message


# Signing and verifying, against the spec's example and the standardwebhooks package ----


def test_signature_matches_the_spec_example():
    key = decode_secret(SPEC_SECRET)

    assert sign(key, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_spec_example_verifies():
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }

    verify(SPEC_BODY, headers, [SPEC_SECRET], now=SPEC_TIMESTAMP + 10)
    with pytest.raises(InvalidSignature):
        verify(SPEC_BODY + b" ", headers, [SPEC_SECRET], now=SPEC_TIMESTAMP + 10)


def test_signed_with_ours_verifies_with_theirs(secret):
    body = wire_body(SOURCE_PREFIX + "users.updated.v1")

    headers = signature_headers("evt-1", body, [secret])

    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == "evt-1"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert standardwebhooks.Webhook(secret).verify(body, headers) == json.loads(body)


def test_signed_with_theirs_verifies_with_ours(secret):
    body = wire_body(SOURCE_PREFIX + "users.updated.v1")

    verify(body, their_headers(secret, "evt-1", body), [secret])


def test_theirs_refuses_ours_under_another_secret(secret):
    body = wire_body(SOURCE_PREFIX + "users.updated.v1")
    headers = signature_headers("evt-1", body, [secret])

    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, headers)


def test_rotation_signs_once_per_secret_and_each_verifies_with_theirs():
    old, new = new_secret(), new_secret()
    body = wire_body(SOURCE_PREFIX + "users.updated.v1")

    headers = signature_headers("evt-1", body, [old, new])

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(part.startswith("v1,") for part in headers["webhook-signature"].split(" "))
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(body, headers)
        verify(body, headers, [secret])
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, headers)


def test_no_secret_means_no_headers():
    assert signature_headers("evt-1", b"{}", []) == {}


def test_a_malformed_signing_secret_raises_config_error_naming_its_place(secret):
    with pytest.raises(ConfigError, match=r'TOOT\["SIGNING_SECRETS"\]\[1\]'):
        signature_headers("evt-1", b"{}", [secret, "whsec_short"])


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_refuses_a_missing_header(secret, missing):
    body = b"{}"
    headers = their_headers(secret, "evt-1", body)
    verify(body, headers, [secret])  # complete, it passes
    del headers[missing]

    with pytest.raises(InvalidSignature, match=missing):
        verify(body, headers, [secret])


@pytest.mark.parametrize(
    "timestamp", ["", "abc", "-5", "+1700000000", " 1700000000", "1.7e9", "1700000000.5", "١٢٣"]
)
def test_verify_refuses_a_timestamp_that_is_not_unix_seconds(secret, timestamp):
    body = b"{}"
    headers = {**their_headers(secret, "evt-1", body), "webhook-timestamp": timestamp}

    with pytest.raises(InvalidSignature, match="webhook-timestamp"):
        verify(body, headers, [secret])


@pytest.mark.parametrize(
    ("skew", "accepted"),
    [
        pytest.param(-TOLERANCE_SECONDS - 1, False, id="too-old"),
        pytest.param(-TOLERANCE_SECONDS, True, id="oldest"),
        pytest.param(0, True, id="now"),
        pytest.param(TOLERANCE_SECONDS, True, id="newest"),
        pytest.param(TOLERANCE_SECONDS + 1, False, id="too-new"),
    ],
)
def test_verify_accepts_timestamps_within_five_minutes_either_way(secret, skew, accepted):
    now = 1_700_000_000
    headers = signature_headers("evt-1", b"{}", [secret], timestamp=now + skew)

    if accepted:
        verify(b"{}", headers, [secret], now=now)
    else:
        with pytest.raises(InvalidSignature, match="too old" if skew < 0 else "in the future"):
            verify(b"{}", headers, [secret], now=now)


def test_verify_refuses_when_one_of_id_timestamp_or_body_changed(secret):
    now = 1_700_000_000
    body = b'{"a":1}'
    headers = signature_headers("evt-1", body, [secret], timestamp=now)
    verify(body, headers, [secret], now=now)

    for changed_body, changed in [
        (b'{"a":2}', {}),
        (body, {"webhook-id": "evt-2"}),
        (body, {"webhook-timestamp": str(now + 1)}),
    ]:
        with pytest.raises(InvalidSignature, match="does not match"):
            verify(changed_body, {**headers, **changed}, [secret], now=now)


@pytest.mark.parametrize(
    "signature",
    [
        "garbage",
        "v1a,abcd",
        "v2,{VALID}",
        "v1,",
        "v1,not base64!",
        "V1,{VALID}",
        "v1;{VALID}",
        "\udcff,x",
    ],
)
def test_verify_refuses_malformed_signatures(secret, signature):
    body = b"{}"
    headers = their_headers(secret, "evt-1", body)
    valid = headers["webhook-signature"].partition(",")[2]
    headers["webhook-signature"] = signature.replace("{VALID}", valid)

    with pytest.raises(InvalidSignature):
        verify(body, headers, [secret])


def test_verify_finds_the_matching_signature_among_others(secret):
    body = b"{}"
    headers = their_headers(secret, "evt-1", body)
    others = " ".join(sign(decode_secret(new_secret()), "evt-1", 0, body) for _ in range(3))
    headers["webhook-signature"] = f"v1a,xyz {others} {headers['webhook-signature']}"

    verify(body, headers, [secret])


def test_verify_looks_at_a_bounded_number_of_signatures(secret):
    body = b"{}"
    headers = their_headers(secret, "evt-1", body)
    padding = " ".join(["v1,AAAA"] * MAX_SIGNATURES)
    headers["webhook-signature"] = f"{padding} {headers['webhook-signature']}"

    with pytest.raises(InvalidSignature, match="does not match"):
        verify(body, headers, [secret])


# The callback endpoint verifies before it enqueues --------------------------------------


def test_callback_signed_by_standardwebhooks_runs_the_handler(
    client, secret, subscribed, enqueued, celery_worker, eventually
):
    channel, handler = subscribed
    body = wire_body(channel)
    event_id = json.loads(body)["id"]

    with source_settings(SECRET=secret):
        response = post(client, body, their_headers(secret, event_id, body))

    assert response.status_code == 200
    assert [job["id"] for job in enqueued] == [event_id]
    eventually(lambda: handler.called, what="the handler to run")
    assert handled_ids(handler) == [event_id]


def test_callback_signed_by_toot_is_accepted(client, secret, subscribed, enqueued):
    channel, _handler = subscribed
    body = wire_body(channel)

    with source_settings(SECRETS=[secret]):
        response = post(client, body, signature_headers("evt-1", body, [secret]))

    assert response.status_code == 200
    assert len(enqueued) == 1


def test_callback_verifies_the_body_bytes_as_received(client, secret, subscribed, enqueued):
    channel, _handler = subscribed
    # Spacing, key order and escapes that json.dumps would not reproduce.
    head = '{ "payload" : {"name":"Jos\\u00e9", "n": 1.50},\n  "channel":'
    tail = ',"id":"evt-raw","timestamp":"2015-10-23 11:50:09 -0500"}'
    body = (head + json.dumps(channel) + tail).encode()

    with source_settings(SECRET=secret):
        response = post(client, body, their_headers(secret, "evt-raw", body))

    assert response.status_code == 200
    assert [job["payload"] for job in enqueued] == [{"name": "José", "n": 1.5}]


def test_callback_rotation_accepts_either_secret_of_the_source(client, subscribed, enqueued):
    channel, _handler = subscribed
    old, new, stranger = new_secret(), new_secret(), new_secret()

    answers = []
    with source_settings(SECRETS=[old, new]):
        for signer in (old, new, stranger):
            body = wire_body(channel)
            answers.append(post(client, body, their_headers(signer, "evt", body)).status_code)

    assert answers == [200, 200, 401]
    assert len(enqueued) == 2


def test_callback_accepts_a_publisher_signing_with_two_secrets_when_it_holds_one(
    client, subscribed, enqueued
):
    channel, _handler = subscribed
    old, new = new_secret(), new_secret()
    body = wire_body(channel)

    with source_settings(SECRET=new):
        response = post(client, body, signature_headers("evt", body, [old, new]))

    assert response.status_code == 200
    assert len(enqueued) == 1


@pytest.mark.parametrize(
    ("age", "error"),
    [
        pytest.param(dt.timedelta(minutes=6), "too old", id="expired"),
        pytest.param(-dt.timedelta(minutes=6), "in the future", id="future"),
    ],
)
def test_callback_with_a_stale_timestamp_answers_401(
    client, secret, subscribed, enqueued, age, error
):
    channel, _handler = subscribed
    body = wire_body(channel)
    headers = their_headers(secret, "evt", body, dt.datetime.now(tz=UTC) - age)

    with source_settings(SECRET=secret):
        response = post(client, body, headers)

    assert_unauthorized(response, error)
    assert enqueued == []


def test_callback_with_a_tampered_body_answers_401(client, secret, subscribed, enqueued):
    channel, _handler = subscribed
    body = wire_body(channel, payload={"amount": 10})
    headers = their_headers(secret, "evt", body)
    tampered = body.replace(b'"amount": 10', b'"amount": 1000')
    assert tampered != body

    with source_settings(SECRET=secret):
        response = post(client, tampered, headers)
        genuine = post(client, body, headers)

    assert_unauthorized(response, "does not match")
    assert genuine.status_code == 200  # the same headers do fit the genuine body
    assert [job["payload"] for job in enqueued] == [{"amount": 10}]


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_callback_missing_a_signature_header_answers_401(
    client, secret, subscribed, enqueued, missing
):
    channel, _handler = subscribed
    body = wire_body(channel)
    headers = their_headers(secret, "evt", body)
    del headers[missing]

    with source_settings(SECRET=secret):
        response = post(client, body, headers)

    assert_unauthorized(response, missing)
    assert enqueued == []


@pytest.mark.parametrize(
    "signature", ["", "v1,", "v1,AAAA", "v2,AAAA", "not-a-signature", "v1,\u00e9\u00e9"]
)
def test_callback_with_a_malformed_signature_header_answers_401(
    client, secret, subscribed, enqueued, signature
):
    channel, _handler = subscribed
    body = wire_body(channel)
    headers = {**their_headers(secret, "evt", body), "webhook-signature": signature}

    with source_settings(SECRET=secret):
        response = post(client, body, headers)

    assert_unauthorized(response, "signature")
    assert enqueued == []


def test_unsigned_callback_to_a_source_with_a_secret_answers_401_and_runs_no_handler(
    client, secret, subscribed, enqueued, celery_worker, eventually
):
    channel, handler = subscribed
    unsigned, signed = wire_body(channel), wire_body(channel)
    signed_id = json.loads(signed)["id"]

    with source_settings(SECRET=secret):
        refused = post(client, unsigned)
        accepted = post(client, signed, their_headers(secret, signed_id, signed))

    assert_unauthorized(refused, "signature required")
    assert accepted.status_code == 200
    eventually(lambda: handler.called, what="the signed event's handler to run")
    assert handled_ids(handler) == [signed_id]  # never the unsigned one
    assert [job["id"] for job in enqueued] == [signed_id]


def test_unsigned_callback_to_a_source_without_secret_is_accepted_as_from_ruby(
    client, subscribed, enqueued, celery_worker, eventually
):
    channel, handler = subscribed
    body = wire_body(channel)

    response = post(client, body)

    assert response.status_code == 200
    eventually(lambda: handler.called, what="the handler to run")
    assert handled_ids(handler) == [json.loads(body)["id"]]


def test_unsigned_callback_for_an_unsubscribed_channel_is_refused_too(client, secret, enqueued):
    body = wire_body(SOURCE_PREFIX + "nobody.listens.v1")

    with source_settings(SECRET=secret):
        response = post(client, body)

    assert_unauthorized(response, "signature required")
    assert "X-Toot-Unsubscribe" not in response


def test_the_source_is_the_one_with_the_longest_matching_prefix(client, secret, enqueued):
    handler = create_autospec(on_event)
    open_source = {"SUBSCRIPTION_URL": "https://org.example/subs", "CHANNEL_PREFIX": "org.example."}
    signed_source = {**SOURCE, "SECRET": secret}

    with toot_settings(SOURCES={"open": open_source, "publisher": signed_source}):
        subscribe("open", "publisher.x.v1", handler)  # the same full channel as below
        subscribe("publisher", "x.v1", handler)
        subscribe("open", "other.x.v1", handler)
        under_secret = post(client, wire_body(SOURCE_PREFIX + "x.v1"))
        under_open = post(client, wire_body("org.example.other.x.v1"))

    assert_unauthorized(under_secret, "signature required")
    assert under_open.status_code == 200
    assert [job["channel"] for job in enqueued] == ["org.example.other.x.v1"]


def test_a_handler_of_a_signed_source_never_runs_for_an_unsigned_event(client, secret, enqueued):
    """Even when an unsigned source's longer prefix claims the same full channel."""
    handler = create_autospec(on_event)
    signed_source = {
        "SUBSCRIPTION_URL": "https://org.example/subs",
        "CHANNEL_PREFIX": "org.example.",
        "SECRET": secret,
    }

    with toot_settings(SOURCES={"signed": signed_source, "publisher": SOURCE}):
        subscribe("signed", SOURCE_PREFIX.removeprefix("org.example.") + "x.v1", handler)
        response = post(client, wire_body(SOURCE_PREFIX + "x.v1"))

    assert_unauthorized(response, "signature required")
    assert enqueued == []


def test_a_longer_prefix_without_secret_wins_over_a_shorter_one_with(client, secret, enqueued):
    handler = create_autospec(on_event)
    signed_source = {
        "SUBSCRIPTION_URL": "https://org.example/subs",
        "CHANNEL_PREFIX": "org.example.",
        "SECRET": secret,
    }
    subscribe("publisher", "x.v1", handler)

    with toot_settings(SOURCES={"signed": signed_source, "publisher": SOURCE}):
        response = post(client, wire_body(SOURCE_PREFIX + "x.v1"))

    assert response.status_code == 200
    assert len(enqueued) == 1


@pytest.mark.parametrize(
    "outer", [{}, {"channel": "com.elsewhere.x.v1"}], ids=["batch", "batch-with-decoy-channel"]
)
def test_an_unsigned_batch_shaped_body_carries_no_event_past_the_check(
    client, secret, subscribed, enqueued, outer
):
    """Batches (PROTOCOL.md section 7) are not read yet: their events are never enqueued."""
    channel, _handler = subscribed
    events = [json.loads(wire_body("com.elsewhere.x.v1")), json.loads(wire_body(channel))]
    body = json.dumps({**outer, "events": events}).encode()

    with source_settings(SECRET=secret):
        response = post(client, body)

    assert enqueued == []
    if outer:  # an event of no source, which nothing here handles
        assert response.status_code == 200
        assert response["X-Toot-Unsubscribe"] == "True"
    else:
        assert response.status_code == 422


def test_a_channel_of_no_source_needs_no_signature(client, secret, enqueued):
    with source_settings(SECRET=secret):
        response = post(client, wire_body("com.elsewhere.x.v1"))

    assert response.status_code == 200
    assert response["X-Toot-Unsubscribe"] == "True"
    assert enqueued == []


def test_a_malformed_source_secret_fails_closed(client, subscribed, enqueued):
    channel, _handler = subscribed
    body = wire_body(channel)

    with (
        source_settings(SECRET="whsec_tooshort"),
        pytest.raises(ConfigError, match=r'TOOT\["SOURCES"\]\["publisher"\]'),
    ):
        post(client, body, their_headers(new_secret(), "evt", body))

    assert enqueued == []


# The publisher signs every delivery ------------------------------------------------------


def make_event(channel=SOURCE_PREFIX + "users.updated.v1"):
    return Event(channel, {"id": 123}).to_dict()


def test_a_delivery_is_signed_so_that_standardwebhooks_accepts_it(celery_worker, eventually):
    old, new = new_secret(), new_secret()
    event = make_event()

    with HTTPServer() as peer, toot_settings(SIGNING_SECRETS=[old, new]):
        deliver.delay(event, peer.url)
        eventually(lambda: peer.requests, what="the delivery")

    [request] = peer.requests
    headers = dict(request.headers.items())
    for secret in (old, new):
        assert standardwebhooks.Webhook(secret).verify(request.body, headers) == event
    assert request.headers["webhook-id"] == event["id"]
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    assert len(request.headers["webhook-signature"].split(" ")) == 2


def test_every_attempt_of_a_delivery_is_signed(celery_worker, eventually, secret):
    event = make_event()

    with (
        HTTPServer(in_order(Reply(500), Reply(200))) as peer,
        toot_settings(SIGNING_SECRETS=[secret]),
    ):
        deliver.delay(event, peer.url)
        eventually(lambda: len(peer.requests) == 2, what="the retried delivery")

    for request in peer.requests:
        standardwebhooks.Webhook(secret).verify(request.body, dict(request.headers.items()))
        assert request.headers["webhook-id"] == event["id"]


def test_without_signing_secrets_a_delivery_is_unsigned_as_ruby_sends_it(celery_worker, eventually):
    with HTTPServer() as peer:
        deliver.delay(make_event(), peer.url)
        eventually(lambda: peer.requests, what="the delivery")

    [request] = peer.requests
    assert not [name for name in request.headers if name.lower().startswith("webhook-")]


@pytest.mark.django_db(transaction=True)
def test_a_malformed_signing_secret_sends_nothing_and_dead_letters(celery_worker, eventually):
    event = make_event()

    with HTTPServer() as peer, toot_settings(SIGNING_SECRETS=["whsec_tooshort"]):
        deliver.delay(event, peer.url)
        eventually(DeadLetter.objects.exists, what="the dead letter")

    assert peer.requests == []
    letter = DeadLetter.objects.get()
    assert letter.event_id == event["id"]
    assert 'TOOT["SIGNING_SECRETS"][0]' in letter.last_error
    assert letter.attempts == 1 + len(conf.RETRY_SCHEDULE)


# Both sides, through the live server ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_round_trip_from_deliver_to_a_verifying_callback(
    live_server, celery_worker, eventually, subscribed, secret
):
    channel, handler = subscribed
    accepted, refused = make_event(channel), make_event(channel)
    url = f"{live_server.url}{CALLBACKS}"

    with toot_settings(
        SIGNING_SECRETS=[secret],
        SOURCES={"publisher": {**SOURCE, "SECRET": secret}},
    ):
        deliver.delay(accepted, url)
        eventually(lambda: handler.called, what="the signed delivery's handler")

    # The publisher signs with a secret the subscriber does not hold: refused, not retried.
    with toot_settings(
        SIGNING_SECRETS=[new_secret()],
        SOURCES={"publisher": {**SOURCE, "SECRET": secret}},
        RETRY_SCHEDULE=[],
    ):
        deliver.delay(refused, url)
        eventually(DeadLetter.objects.exists, what="the refused delivery's dead letter")

    assert handled_ids(handler) == [accepted["id"]]
    letter = DeadLetter.objects.get()
    assert (letter.event_id, letter.last_status) == (refused["id"], 401)
    assert "signature does not match" in letter.last_error
