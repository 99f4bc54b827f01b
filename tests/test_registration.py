"""PROTOCOL.md section 4, against a real toot publisher (the live server) and a real HTTP peer."""

from __future__ import annotations

import logging

import pytest
import requests
from django.conf import settings
from django.test import override_settings

import toot
from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import callback_urls, sources
from toot.publisher import lanes, store
from toot.subscriber.registration import Registration, planned_registrations, register

pytestmark = pytest.mark.django_db(transaction=True)

CALLBACK_URL = settings.TOOT["CALLBACK_URL"]
PREFIX = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]
USERS = PREFIX + "users.updated.v1"
ORDERS = PREFIX + "orders.created.v1"


def on_user(event):
    pass


def on_order(event):
    pass


@pytest.fixture
def publisher(live_server, redis):
    """The "publisher" source at a real toot publisher, storing into the tests' Redis."""
    url = f"{live_server.url}/toot/subscriptions"
    with sources(publisher=url):
        yield url


@pytest.fixture
def peer():
    with HTTPServer(Reply(201)) as server:
        yield server


def closed_url():
    return f"http://127.0.0.1:{free_port()}/toot/subscriptions"


def test_registers_with_the_publisher(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [registration] = toot.register_subscriptions()

    assert callback_urls(USERS) == [CALLBACK_URL]
    assert registration.status == 201
    assert registration.created
    assert registration.error is None
    assert (registration.source, registration.channel) == ("publisher", USERS)
    assert registration.subscription_url == publisher
    assert registration.callback_url == CALLBACK_URL


def test_one_post_per_channel(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "orders.created.v1", on_order)

    registrations = toot.register_subscriptions()

    assert sorted(r.channel for r in registrations) == [ORDERS, USERS]
    assert store.subscriptions(PREFIX) == {ORDERS: [CALLBACK_URL], USERS: [CALLBACK_URL]}


def test_request_is_a_json_post_of_callback_url_and_channel(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources(publisher=f"{peer.url}/toot/subscriptions"):
        toot.register_subscriptions()

    [request] = peer.requests
    assert request.method == "POST"
    assert request.path == "/toot/subscriptions"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {"callback_url": CALLBACK_URL, "channel": USERS, "batch": True}


# Batches (PROTOCOL.md section 7): asked for unless TOOT["BATCH"] is False.


def test_without_batches_the_body_is_the_ruby_gems_with_no_batch_key(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources({"BATCH": False}, publisher=f"{peer.url}/toot/subscriptions"):
        toot.register_subscriptions()

    [request] = peer.requests
    assert request.json() == {"callback_url": CALLBACK_URL, "channel": USERS}


def test_registering_asks_a_toot_publisher_for_batches(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [registration] = toot.register_subscriptions()

    assert registration.status == 201
    assert store.subscribers([USERS]) == {USERS: [(CALLBACK_URL, True)]}


def test_registering_again_with_batch_off_turns_batches_off_at_the_publisher(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.register_subscriptions()

    with sources({"BATCH": False}, publisher=publisher):
        [registration] = toot.register_subscriptions()

    assert registration.status == 204
    assert store.subscribers([USERS]) == {USERS: [(CALLBACK_URL, False)]}
    [registration] = toot.register_subscriptions()  # and on again
    assert registration.status == 204
    assert store.subscribers([USERS]) == {USERS: [(CALLBACK_URL, True)]}


def test_one_request_per_source_and_channel(peer):
    with sources(first=f"{peer.url}/first", second=f"{peer.url}/second"):
        toot.subscribe("first", "users.updated.v1", on_user)
        toot.subscribe("first", "orders.created.v1", on_order)
        toot.subscribe("second", "users.updated.v1", on_user)

        toot.register_subscriptions()

    sent = sorted((request.path, request.json()["channel"]) for request in peer.requests)
    assert sent == [
        ("/first", "org.example.first.orders.created.v1"),
        ("/first", "org.example.first.users.updated.v1"),
        ("/second", "org.example.second.users.updated.v1"),
    ]


def test_duplicate_subscriptions_send_one_request(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "users.updated.v1", on_order)
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources(publisher=f"{peer.url}/toot/subscriptions"):
        registrations = toot.register_subscriptions()

    assert len(registrations) == 1
    assert [request.json()["channel"] for request in peer.requests] == [USERS]


def test_201_is_created(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [registration] = toot.register_subscriptions()

    assert (registration.status, registration.created) == (201, True)


def test_204_is_already_registered(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.register_subscriptions()

    [registration] = toot.register_subscriptions()

    assert (registration.status, registration.created) == (204, False)
    assert registration.error is None
    assert callback_urls(USERS) == [CALLBACK_URL]


@pytest.mark.parametrize("status", [200, 202])
def test_any_2xx_is_success(peer, status):
    peer.reply = Reply(status)
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources(publisher=f"{peer.url}/toot/subscriptions"):
        [registration] = toot.register_subscriptions()

    assert registration.status == status
    assert registration.error is None


def test_refusal_raises_with_the_status(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    # The publisher refuses a callback URL that is not http(s).
    with (
        override_settings(
            TOOT={**settings.TOOT, "CALLBACK_URL": "ftp://sub.example/toot/callbacks"}
        ),
        pytest.raises(toot.RegisterSubscriptionFailure) as excinfo,
    ):
        toot.register_subscriptions()

    assert excinfo.value.status == 422
    assert excinfo.value.channel == USERS
    assert excinfo.value.subscription_url == publisher
    assert "422" in str(excinfo.value)
    assert "callback_url" in excinfo.value.detail  # the publisher's JSON error
    assert callback_urls(USERS) == []


def test_wrong_subscription_url_raises_with_the_404(live_server):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with (
        sources(publisher=f"{live_server.url}/toot/nowhere"),
        pytest.raises(toot.RegisterSubscriptionFailure) as excinfo,
    ):
        toot.register_subscriptions()

    assert excinfo.value.status == 404


@pytest.mark.parametrize("status", [301, 302, 400, 500, 503])
def test_non_2xx_raises_with_the_status(peer, status):
    peer.reply = Reply(status, {"Location": f"{peer.url}/elsewhere"}, b'{"error": "no"}')
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with (
        sources(publisher=f"{peer.url}/toot/subscriptions"),
        pytest.raises(toot.RegisterSubscriptionFailure) as excinfo,
    ):
        toot.register_subscriptions()

    assert excinfo.value.status == status
    assert len(peer.requests) == 1  # a redirect is not followed


def test_connection_failure_is_raised_as_it_is():
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources(publisher=closed_url()), pytest.raises(requests.ConnectionError) as excinfo:
        toot.register_subscriptions()

    assert not isinstance(excinfo.value, toot.TootError)


def test_timeout_is_raised_as_it_is(peer):
    peer.reply = Reply(hang=True)
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources({"READ_TIMEOUT": 0.2}, publisher=peer.url), pytest.raises(requests.Timeout):
        toot.register_subscriptions()


def test_every_registration_is_tried_before_the_first_error_is_raised(peer, caplog):
    caplog.set_level(
        logging.WARNING, logger="toot.subscriber.registration"
    )  # a started worker sets ERROR
    peer.reply = in_order(Reply(500, body=b'{"error": "down"}'), Reply(201))
    with sources(first=f"{peer.url}/first", second=closed_url(), third=f"{peer.url}/third"):
        toot.subscribe("first", "users.updated.v1", on_user)
        toot.subscribe("second", "users.updated.v1", on_user)
        toot.subscribe("third", "users.updated.v1", on_user)
        reported: list[Registration] = []

        with pytest.raises(toot.RegisterSubscriptionFailure) as excinfo:
            toot.register_subscriptions(report=reported.append)

    assert excinfo.value.status == 500  # the first error
    assert [request.path for request in peer.requests] == ["/first", "/third"]
    assert [r.source for r in reported] == ["first", "second", "third"]
    assert isinstance(reported[0].error, toot.RegisterSubscriptionFailure)
    assert isinstance(reported[1].error, requests.ConnectionError)
    assert (reported[2].status, reported[2].error) == (201, None)
    # Each failure logged once, its reason not repeating the channel and URL it follows.
    first, second = [
        r.getMessage() for r in caplog.records if r.name == "toot.subscriber.registration"
    ]
    assert first == (
        f"Registering {reported[0].channel} at {peer.url}/first failed: "
        'the source answered 500: {"error": "down"}'
    )
    assert second.startswith(f"Registering {reported[1].channel} at {reported[1].subscription_url}")


def test_report_sees_each_registration(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "orders.created.v1", on_order)
    reported: list[Registration] = []

    registrations = toot.register_subscriptions(report=reported.append)

    assert reported == registrations
    assert all(r.status == 201 for r in reported)


def test_dry_run_sends_nothing(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources(publisher=f"{peer.url}/toot/subscriptions"):
        [registration] = toot.register_subscriptions(dry_run=True)

    assert peer.requests == []
    assert registration.channel == "org.example.publisher.users.updated.v1"
    assert registration.status is None


def test_no_subscriptions_send_nothing(peer):
    with sources(publisher=f"{peer.url}/toot/subscriptions"):
        assert toot.register_subscriptions() == []

    assert peer.requests == []


@pytest.mark.parametrize("callback_url", [None, ""])
def test_missing_callback_url_raises_config_error(peer, callback_url):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    options = {**settings.TOOT, "CALLBACK_URL": callback_url}
    options["SOURCES"] = {"publisher": {"SUBSCRIPTION_URL": peer.url, "CHANNEL_PREFIX": PREFIX}}

    with (
        override_settings(TOOT=options),
        pytest.raises(toot.ConfigError, match=r'TOOT\["CALLBACK_URL"\]'),
    ):
        toot.register_subscriptions()

    assert peer.requests == []


def test_source_gone_from_the_settings_raises_config_error(peer):
    with sources(gone=peer.url):
        toot.subscribe("gone", "users.updated.v1", on_user)

    with pytest.raises(toot.ConfigError, match='"gone"'):
        toot.register_subscriptions()

    assert peer.requests == []


def test_planned_registrations_follow_the_settings(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with override_settings(TOOT={**settings.TOOT, "CALLBACK_URL": "https://sub.example/cb"}):
        [planned] = planned_registrations()

    assert planned.callback_url == "https://sub.example/cb"
    assert planned.channel == USERS


def test_register_one(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    [planned] = planned_registrations()

    assert register(planned).status == 201
    assert register(planned).status == 204
    assert callback_urls(USERS) == [CALLBACK_URL]


# Channels are checked again at registration: the source's prefix may have changed.


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        ("org.example." + "p" * 240 + ".", "longer than 255 characters"),
        ("org.example publisher.", "printable ASCII"),
    ],
)
def test_a_channel_made_invalid_by_a_new_prefix_is_not_registered(peer, prefix, error):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    source = {"SUBSCRIPTION_URL": f"{peer.url}/toot/subscriptions", "CHANNEL_PREFIX": prefix}

    with (
        override_settings(TOOT={**settings.TOOT, "SOURCES": {"publisher": source}}),
        pytest.raises(toot.InvalidChannel, match=error),
    ):
        toot.register_subscriptions()

    assert peer.requests == []


# Rate limits (docs/protocol.md section 4): asked for when TOOT["RATE_LIMIT"] is set.


def test_a_rate_limit_goes_along_with_each_registration(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources({"RATE_LIMIT": 12.5}, publisher=f"{peer.url}/toot/subscriptions"):
        toot.register_subscriptions()

    [request] = peer.requests
    assert request.json()["rate_limit"] == 12.5


def test_a_rate_limit_registered_is_kept_for_the_url_by_a_toot_publisher(live_server, redis):
    """Registered with a real publisher (the suite's own views): the lanes keep it."""
    toot.subscribe("publisher", "users.updated.v1", on_user)

    url = f"{live_server.url}/toot/subscriptions"
    with sources({"RATE_LIMIT": 3}, publisher=url):
        toot.register_subscriptions()
    assert lanes.status([CALLBACK_URL])[0].rate == 3.0
    with sources(publisher=url):  # registering again without it lifts it
        toot.register_subscriptions()
    assert lanes.status([CALLBACK_URL])[0].rate is None
