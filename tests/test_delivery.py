"""One delivery attempt against a real HTTP peer, Retry-After, and the retry schedule."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import socket
import uuid
from email.utils import format_datetime

import pytest
import standardwebhooks
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply
from tests.utils import callback_urls
from toot.engine.retries import MAX_RETRY_AFTER_EXTRA, next_delay
from toot.protocol.events import Event, wire_json
from toot.publisher import store
from toot.publisher.delivery import attempt, parse_retry_after

DRAWS = 2000


@pytest.fixture
def channel():
    return f"org.example.test.{uuid.uuid4().hex[:8]}.v1"


@pytest.fixture
def event(channel):
    return Event(channel, {"id": 7}).to_dict()


def send(event, url):
    """One attempt to deliver ``event`` alone, as the publisher's drain sends it."""
    return attempt(url, event["channel"], wire_json(event).encode(), event["id"])


def http_date(seconds_from_now):
    return format_datetime(
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now), usegmt=True
    )


def delay(attempts, retry_after=None) -> float:
    """next_delay(), for attempts within the schedule."""
    value = next_delay(attempts, retry_after)
    assert value is not None
    return value


def retry_after(value) -> float:
    """parse_retry_after(), for a value it understands."""
    seconds = parse_retry_after(value)
    assert seconds is not None
    return seconds


def schedule(*delays):
    return override_settings(TOOT={**settings.TOOT, "RETRY_SCHEDULE": list(delays)})


# parse_retry_after


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0)])
def test_retry_after_in_seconds(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_after_as_a_future_http_date():
    # An HTTP date has whole seconds: up to one is lost to truncation, a little to the clock.
    assert 115.0 <= retry_after(http_date(120)) <= 120.0


@pytest.mark.parametrize(
    "value", [http_date(-3600), "Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:00 -0000"]
)
def test_retry_after_as_a_past_http_date_is_zero(value):
    assert parse_retry_after(value) == 0.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "1.5", "1e3", "Mon, 32 Jan 2020 00:00:00 GMT", "²", "1²", "٣"],
)
def test_garbage_retry_after_is_none(value):
    assert parse_retry_after(value) is None


# next_delay


def test_next_delay_follows_the_schedule_with_20_percent_jitter():
    with schedule(10, 100, 1000):
        for attempts, base in [(1, 10), (2, 100), (3, 1000)]:
            draws = [delay(attempts) for _ in range(DRAWS)]
            assert all(0.8 * base <= draw <= 1.2 * base for draw in draws)
            # Spread over the whole band, not a constant: retries of many events scatter.
            assert min(draws) < 0.85 * base
            assert max(draws) > 1.15 * base


def test_next_delay_is_none_past_the_schedule():
    with schedule(10, 100):
        assert next_delay(2) is not None
        assert next_delay(3) is None
        assert next_delay(30) is None
    with schedule():
        assert next_delay(1) is None  # an empty schedule: no retries at all


def test_the_default_schedule_is_svix_s():
    with override_settings(
        TOOT={key: value for key, value in settings.TOOT.items() if key != "RETRY_SCHEDULE"}
    ):
        bases = [5, 300, 1800, 7200, 18000, 36000, 36000]
        for attempts, base in enumerate(bases, start=1):
            assert 0.8 * base <= delay(attempts) <= 1.2 * base
        assert next_delay(len(bases) + 1) is None


def test_a_longer_retry_after_is_honoured():
    with schedule(10):
        assert next_delay(1, retry_after=30.0) == 30.0
        draws = [delay(1, retry_after=1.0) for _ in range(DRAWS)]  # shorter: the schedule wins
        assert all(8.0 <= draw <= 12.0 for draw in draws)
        assert len(set(draws)) > 1


def test_retry_after_is_capped_at_the_backoff_plus_two_hours():
    assert MAX_RETRY_AFTER_EXTRA == 2 * 3600
    with schedule(10):
        draws = [delay(1, retry_after=10**9) for _ in range(DRAWS)]
        assert all(
            8.0 + MAX_RETRY_AFTER_EXTRA <= draw <= 12.0 + MAX_RETRY_AFTER_EXTRA for draw in draws
        )
        assert delay(1, retry_after=retry_after("9" * 400)) <= 12.0 + MAX_RETRY_AFTER_EXTRA


# attempt() against a real HTTP peer


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_a_2xx_answer_is_ok(event, status):
    with HTTPServer(Reply(status)) as peer:
        outcome = send(event, peer.url + "/toot/callbacks")
    assert (outcome.ok, outcome.gone, outcome.status, outcome.error, outcome.retry_after) == (
        True,
        False,
        status,
        "",
        None,
    )
    [request] = peer.requests
    assert (request.method, request.path) == ("POST", "/toot/callbacks")
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == event


@pytest.mark.parametrize("status", [400, 404, 409, 500, 502])
def test_a_non_2xx_answer_fails_with_an_excerpt_of_the_body(event, status):
    body = b"the database\n\tis on fire \x00" + b"x" * 1000
    with HTTPServer(Reply(status, body=body)) as peer:
        outcome = send(event, peer.url)
    assert not outcome.ok
    assert outcome.status == status
    assert outcome.error.startswith("the database is on fire x")
    assert len(outcome.error) <= 200
    assert outcome.retry_after is None


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failure_and_not_followed(event, status):
    with (
        HTTPServer() as elsewhere,
        HTTPServer(Reply(status, headers={"Location": elsewhere.url})) as peer,
    ):
        outcome = send(event, peer.url)
    assert not outcome.ok
    assert outcome.status == status
    assert len(peer.requests) == 1
    assert elsewhere.requests == []


def test_a_network_error_is_an_outcome_with_the_error(event):
    outcome = send(event, f"http://127.0.0.1:{free_port()}/toot/callbacks")
    assert not outcome.ok
    assert outcome.status is None
    assert outcome.error.startswith("ConnectionError: ")
    assert "Connection refused" in outcome.error


def test_a_timeout_is_an_outcome_with_the_error(event):
    with (
        HTTPServer(Reply(hang=True)) as peer,
        override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 0.2}),
    ):
        outcome = send(event, peer.url)
    assert (outcome.ok, outcome.status) == (False, None)
    assert "timed out" in outcome.error
    assert outcome.error.startswith(("ReadTimeout: ", "ConnectionError: "))


def test_unsubscribe_header_on_a_2xx_removes_the_subscription(redis, event, channel, caplog):
    with (
        HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "true"})) as leaving,
        HTTPServer() as staying,
    ):
        store.add(channel, leaving.url)
        store.add(channel, staying.url)
        with caplog.at_level(logging.INFO, logger="toot.publisher.delivery"):
            outcome = send(event, leaving.url)
        assert outcome.ok
        assert callback_urls(channel) == [staying.url]
        assert send(event, staying.url).ok
        assert callback_urls(channel) == [staying.url]
    [record] = [r for r in caplog.records if "unsubscribe" in r.getMessage()]
    assert event["id"] in record.getMessage()
    assert channel in record.getMessage()


def test_unsubscribe_header_on_a_failure_keeps_the_subscription(redis, event, channel):
    with HTTPServer(Reply(500, headers={"X-Toot-Unsubscribe": "true"})) as peer:
        store.add(channel, peer.url)
        assert not send(event, peer.url).ok
    assert callback_urls(channel) == [peer.url]


def test_gone_removes_the_subscription(redis, event, channel):
    with HTTPServer(Reply(410, body=b"gone for good")) as peer, HTTPServer() as staying:
        store.add(channel, peer.url)
        store.add(channel, staying.url)
        outcome = send(event, peer.url)
    assert outcome.gone
    assert not outcome.ok
    assert (outcome.status, outcome.error) == (410, "gone for good")
    assert callback_urls(channel) == [staying.url]


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_carry_retry_after(event, status):
    with HTTPServer(Reply(status, headers={"Retry-After": "42"})) as peer:
        assert send(event, peer.url).retry_after == 42.0
        peer.reply = Reply(status, headers={"Retry-After": http_date(600)})
        assert 590.0 <= (send(event, peer.url).retry_after or 0.0) <= 600.0
        peer.reply = Reply(status)
        assert send(event, peer.url).retry_after is None


@pytest.mark.parametrize("status", [500, 502, 200])
def test_retry_after_is_ignored_on_other_statuses(event, status):
    with HTTPServer(Reply(status, headers={"Retry-After": "42"})) as peer:
        assert send(event, peer.url).retry_after is None


def test_a_peer_s_odd_retry_after_is_no_crash(event):
    # Header values arrive decoded as latin-1, where "\xb2" is "²": isdigit() but not a number.
    with HTTPServer(Reply(503, headers={"Retry-After": "\xb2"})) as peer:
        outcome = send(event, peer.url)
    assert (outcome.status, outcome.retry_after) == (503, None)


def test_the_body_goes_byte_for_byte_signed_under_the_message_id(channel):
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    events = [Event(channel, {"n": n}).to_dict() for n in range(2)]
    body = ('{"events":[' + ",".join(map(wire_json, events)) + "]}").encode()
    with (
        HTTPServer() as peer,
        override_settings(TOOT={**settings.TOOT, "SIGNING_SECRETS": [secret]}),
    ):
        assert attempt(peer.url, channel, body, "batch-7").ok
    [request] = peer.requests
    assert request.body == body
    assert request.headers["webhook-id"] == "batch-7"
    verified = standardwebhooks.Webhook(secret).verify(body, dict(request.headers.items()))
    assert verified == {"events": events}


def test_unsubscribe_removes_the_url_from_the_channel_named_only(redis, channel):
    elsewhere = f"{channel}.elsewhere"
    with HTTPServer(Reply(410)) as peer:
        store.add(channel, peer.url)
        store.add(elsewhere, peer.url)
        assert attempt(peer.url, channel, b"{}", "m1").gone
    assert callback_urls(channel) == []
    assert callback_urls(elsewhere) == [peer.url]


def test_a_malformed_signing_secret_sends_nothing_and_is_a_failure(event, caplog):
    with (
        HTTPServer() as peer,
        override_settings(TOOT={**settings.TOOT, "SIGNING_SECRETS": ["whsec_tooshort"]}),
        caplog.at_level(logging.ERROR, logger="toot.publisher.delivery"),
    ):
        outcome = send(event, peer.url)
    assert peer.requests == []
    assert (outcome.ok, outcome.status, outcome.refused) == (False, None, False)
    assert outcome.error.startswith('ConfigError: TOOT["SIGNING_SECRETS"][0] must hold')
    [record] = caplog.records
    assert "cannot sign" in record.getMessage()
    assert event["id"] in record.getMessage()
    assert "whsec_tooshort" not in caplog.text


def test_a_host_that_does_not_resolve_is_a_failure_to_retry_not_a_refusal(event, dns):
    dns.answers["gone.example"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    outcome = send(event, "http://gone.example/cb")

    assert (outcome.ok, outcome.status, outcome.refused) == (False, None, False)
    assert outcome.error == (
        "ConnectionError: cannot resolve http://gone.example/cb: "
        "[Errno -2] Name or service not known"
    )
    assert dns.lookups == ["gone.example"]


@pytest.mark.parametrize(
    "options",
    [{"CA_BUNDLE": "/nonexistent/ca.pem"}, {"PROXY_URL": "socks5://proxy.internal:1080"}],
)
def test_a_bad_outgoing_setting_sends_nothing_and_is_a_failure(event, options, caplog):
    with (
        HTTPServer() as peer,
        override_settings(TOOT={**settings.TOOT, **options}),
        caplog.at_level(logging.ERROR, logger="toot.publisher.delivery"),
    ):
        outcome = send(event, peer.url)
    assert peer.requests == []
    assert (outcome.ok, outcome.status, outcome.refused) == (False, None, False)
    assert outcome.error.startswith(f'ConfigError: TOOT["{next(iter(options))}"] must be')
    [record] = caplog.records
    assert "cannot send" in record.getMessage()
    assert event["id"] in record.getMessage()
