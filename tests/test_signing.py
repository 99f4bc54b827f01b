"""Signed deliveries (Standard Webhooks): toot.protocol.signing, the publisher's signed deliveries
(single events and batches) and the callback endpoint's verification, checked against the
``standardwebhooks`` package.

The callback tests go through Django's test client with CSRF checks enforced, the real
Redis queue (what is queued for handlers is read by the ``enqueued`` fixture) and, where a
handler must run, a real worker. The delivery tests publish to a real HTTP peer through a
real worker, and the round trip below to the live server.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
import time
import uuid
from unittest.mock import create_autospec

import pytest
import standardwebhooks

import toot
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import relaying_lanes, toot_settings
from toot import Event, subscribe
from toot.conf import conf
from toot.exceptions import ConfigError, InvalidSignature
from toot.models import DeadLetter
from toot.protocol.signing import (
    MAX_SIGNATURES,
    TOLERANCE_SECONDS,
    decode_secret,
    secret_error,
    sign,
    signature_headers,
    verify,
)
from toot.publisher import store

pytestmark = pytest.mark.usefixtures("handled_while_subscribed")

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


def test_the_source_is_the_one_with_the_longest_matching_prefix(
    client, secret, enqueued, eventually
):
    handler = create_autospec(on_event)
    open_source = {"SUBSCRIPTION_URL": "https://org.example/subs", "CHANNEL_PREFIX": "org.example."}
    signed_source = {**SOURCE, "SECRET": secret}

    with toot_settings(SOURCES={"open": open_source, "publisher": signed_source}):
        subscribe("open", "publisher.x.v1", handler)  # the same full channel as below
        subscribe("publisher", "x.v1", handler)
        subscribe("open", "other.x.v1", handler)
        under_secret = post(client, wire_body(SOURCE_PREFIX + "x.v1"))
        under_open = post(client, wire_body("org.example.other.x.v1"))
        # While "open" is a source: without it, the handler matches nothing.
        eventually(lambda: handler.called, what="the open source's handler to run")

    assert_unauthorized(under_secret, "signature required")
    assert under_open.status_code == 200
    assert [job["channel"] for job in enqueued] == ["org.example.other.x.v1"]
    assert [call.args[0].channel for call in handler.call_args_list] == ["org.example.other.x.v1"]


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
def test_a_batch_cannot_carry_an_event_of_a_signed_source_past_the_check(
    client, secret, subscribed, enqueued, outer
):
    """Not behind an event of no source (which needs no signature), nor behind a decoy
    channel beside the events."""
    channel, _handler = subscribed
    events = [json.loads(wire_body("com.elsewhere.x.v1")), json.loads(wire_body(channel))]
    mixed = json.dumps({**outer, "events": events}).encode()
    decoyed = json.dumps({**outer, "events": events[1:]}).encode()

    with source_settings(SECRET=secret):
        mixed_response = post(client, mixed)
        decoyed_response = post(client, decoyed)

    assert mixed_response.status_code == 422
    assert mixed_response.json()["error"].startswith("events[1]: ")
    assert_unauthorized(decoyed_response, "signature required")
    assert enqueued == []


def batch_body(channel, count=3):
    return json.dumps({"events": [json.loads(wire_body(channel)) for _ in range(count)]}).encode()


def batch_ids(body):
    return [event["id"] for event in json.loads(body)["events"]]


def test_a_batch_signed_by_standardwebhooks_queues_every_event(
    client, secret, subscribed, enqueued, celery_worker, eventually
):
    channel, handler = subscribed
    body = batch_body(channel)

    with source_settings(SECRET=secret):
        response = post(client, body, their_headers(secret, "msg_batch1", body))

    assert response.status_code == 200
    assert [job["id"] for job in enqueued] == batch_ids(body)
    eventually(lambda: handler.call_count == 3, what="the handler to run for every event")
    assert sorted(handled_ids(handler)) == sorted(batch_ids(body))


def test_an_unsigned_batch_to_a_source_with_a_secret_answers_401(
    client, secret, subscribed, enqueued
):
    channel, _handler = subscribed

    with source_settings(SECRET=secret):
        response = post(client, batch_body(channel))

    assert_unauthorized(response, "signature required")
    assert enqueued == []


def drop_last(events):
    return events[:-1]


def reverse(events):
    return events[::-1]


def change_a_payload(events):
    return [*events[:-1], {**events[-1], "payload": {"key": "forged"}}]


def add_one(events):
    return [*events, {**events[0], "id": str(uuid.uuid4())}]


@pytest.mark.parametrize("tamper", [drop_last, reverse, change_a_payload, add_one])
def test_a_tampered_batch_answers_401_and_queues_nothing(
    client, secret, subscribed, enqueued, tamper
):
    channel, _handler = subscribed
    body = batch_body(channel)
    headers = their_headers(secret, "msg_batch1", body)
    tampered = json.dumps({"events": tamper(json.loads(body)["events"])}).encode()

    with source_settings(SECRET=secret):
        refused = post(client, tampered, headers)
        genuine = post(client, body, headers)  # the same headers fit the genuine batch

    assert_unauthorized(refused, "does not match")
    assert genuine.status_code == 200
    assert [job["id"] for job in enqueued] == batch_ids(body)


def test_the_signature_of_one_event_does_not_pass_its_batch(client, secret, subscribed, enqueued):
    channel, _handler = subscribed
    body = wire_body(channel)
    headers = their_headers(secret, json.loads(body)["id"], body)
    batch = b'{"events": [' + body + b"]}"

    with source_settings(SECRET=secret):
        refused = post(client, batch, headers)
        alone = post(client, body, headers)

    assert_unauthorized(refused, "does not match")
    assert alone.status_code == 200
    assert len(enqueued) == 1


def test_a_batch_is_verified_over_its_bytes_as_received(client, secret, subscribed, enqueued):
    channel, _handler = subscribed
    # Spacing and escapes that json.dumps would not reproduce.
    quoted = json.dumps(channel)
    events = [
        '{"channel":' + quoted + ',"id":"evt-a","payload":"Jos\\u00e9"}',
        '{ "id" : "evt-b" ,\n "channel" : ' + quoted + " }",
    ]
    body = ('{\n  "events" : [ ' + " ,\n".join(events) + " ]\n}").encode()

    with source_settings(SECRET=secret):
        response = post(client, body, their_headers(secret, "msg_raw", body))

    assert response.status_code == 200
    assert [(job["id"], job["payload"]) for job in enqueued] == [("evt-a", "José"), ("evt-b", None)]


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


@pytest.fixture
def fresh_channel():
    """A channel of the test's own: events of other tests still in flight never match it."""
    return f"{SOURCE_PREFIX}signed.{uuid.uuid4().hex[:12]}.v1"


def publish_to(url, channel, *, batch=False, count=1):
    """Subscribe ``url`` to ``channel`` (in batches or not) and publish ``count`` events."""
    store.add(channel, url, batch=batch)
    return [toot.publish(channel, {"n": n}, prefix="") for n in range(count)]


def delivered_ids(request):
    """The ids of the events a request carried: one event, or a batch."""
    data = request.json()
    return [event["id"] for event in data["events"]] if "events" in data else [data["id"]]


def headers_of(request):
    return dict(request.headers.items())


def test_a_delivery_is_signed_so_that_standardwebhooks_accepts_it(
    redis, celery_worker, eventually, fresh_channel
):
    old, new = new_secret(), new_secret()

    with HTTPServer() as peer, toot_settings(SIGNING_SECRETS=[old, new]):
        [event] = publish_to(peer.url, fresh_channel)
        eventually(lambda: peer.requests, what="the delivery")

    [request] = peer.requests
    for secret in (old, new):
        assert standardwebhooks.Webhook(secret).verify(request.body, headers_of(request)) == (
            event.to_dict()
        )
    assert request.headers["webhook-id"] == event.id
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    assert len(request.headers["webhook-signature"].split(" ")) == 2


def test_a_batch_is_signed_over_its_whole_body_under_an_id_of_its_own(
    redis, celery_worker, eventually, fresh_channel, secret
):
    with HTTPServer() as peer, toot_settings(SIGNING_SECRETS=[secret]):
        events = publish_to(peer.url, fresh_channel, batch=True, count=5)
        eventually(
            lambda: sum(len(delivered_ids(r)) for r in peer.requests) == 5,
            what="every event delivered",
        )

    event_ids = {event.id for event in events}
    batch_ids = [request.headers["webhook-id"] for request in peer.requests]
    for request in peer.requests:
        verified = standardwebhooks.Webhook(secret).verify(request.body, headers_of(request))
        assert set(verified) == {"events"}  # the whole body, every event in it
        assert request.headers["webhook-id"] not in event_ids
    assert len(set(batch_ids)) == len(batch_ids)  # one id per batch
    assert sorted(i for r in peer.requests for i in delivered_ids(r)) == sorted(event_ids)


@pytest.mark.parametrize("batch", [False, True], ids=["event", "batch"])
def test_every_attempt_is_signed_under_the_same_webhook_id(
    redis, celery_worker, eventually, fresh_channel, secret, batch
):
    with (
        HTTPServer(in_order(Reply(500), Reply(200))) as peer,
        toot_settings(SIGNING_SECRETS=[secret]),
    ):
        [event] = publish_to(peer.url, fresh_channel, batch=batch)
        eventually(lambda: len(peer.requests) == 2, what="the retried delivery")

    first, second = peer.requests
    for request in (first, second):
        standardwebhooks.Webhook(secret).verify(request.body, headers_of(request))
        assert delivered_ids(request) == [event.id]
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert (first.headers["webhook-id"] == event.id) is not batch  # a batch has its own id
    assert first.body == second.body


@pytest.mark.parametrize("batch", [False, True], ids=["event", "batch"])
def test_without_signing_secrets_a_delivery_is_unsigned_as_ruby_sends_it(
    redis, celery_worker, eventually, fresh_channel, batch
):
    with HTTPServer() as peer:
        publish_to(peer.url, fresh_channel, batch=batch)
        eventually(lambda: peer.requests, what="the delivery")

    [request] = peer.requests
    assert not [name for name in request.headers if name.lower().startswith("webhook-")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("batch", [False, True], ids=["event", "batch"])
def test_a_malformed_signing_secret_sends_nothing_and_dead_letters(
    redis, celery_worker, eventually, fresh_channel, batch
):
    # Its retries come due after the drain ended: the relay's lanes step sends them.
    with (
        relaying_lanes(),
        HTTPServer() as peer,
        # Each failed claim counts for the URL's breaker: five would open it for 30 s.
        toot_settings(SIGNING_SECRETS=["whsec_tooshort"]),
    ):
        events = publish_to(peer.url, fresh_channel, batch=batch, count=2)
        eventually(lambda: DeadLetter.objects.count() == 2, what="a dead letter per event")

    assert peer.requests == []
    letters = DeadLetter.objects.order_by("id")
    assert sorted(letter.event_id for letter in letters) == sorted(e.id for e in events)
    for letter in letters:
        assert 'TOOT["SIGNING_SECRETS"][0]' in letter.last_error
        assert letter.attempts == 1 + len(conf.RETRY_SCHEDULE)
        assert letter.callback_url == peer.url


# Both sides, through the live server ----------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letter
@pytest.mark.parametrize("batch", [False, True], ids=["event", "batch"])
def test_round_trip_from_publish_to_a_verifying_callback(
    live_server, redis, celery_worker, eventually, subscribed, secret, batch, caplog
):
    channel, handler = subscribed
    url = f"{live_server.url}{CALLBACKS}"
    source = {"publisher": {**SOURCE, "SECRET": secret}}

    with toot_settings(SIGNING_SECRETS=[secret], SOURCES=source):
        accepted = publish_to(url, channel, batch=batch, count=3)
        eventually(lambda: handler.call_count == 3, what="the signed deliveries' handler")

    # The publisher signs with a secret the subscriber does not hold: refused, not retried.
    # Its dead letter is watched for in the log, not in the database: pytest-django's live
    # server shares this thread's SQLite connection, which a query here while the server
    # closes it after a request can crash.
    with (
        toot_settings(SIGNING_SECRETS=[new_secret()], SOURCES=source, RETRY_SCHEDULE=[]),
        caplog.at_level(logging.ERROR, logger="toot.publisher.sending"),
    ):
        [refused] = publish_to(url, channel, batch=batch)
        eventually(
            lambda: [r for r in caplog.records if r.name == "toot.publisher.sending"],
            what="the refused delivery's dead letter",
        )

    assert sorted(handled_ids(handler)) == sorted(event.id for event in accepted)
    [letter] = [r.getMessage() for r in caplog.records if r.name == "toot.publisher.sending"]
    assert letter.startswith(f"Event {refused.id} on {channel}: delivery to {url} failed")
    assert "(status 401: " in letter
    assert "signature does not match" in letter
