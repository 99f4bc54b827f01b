"""The authenticated subscriptions endpoint (TOOT["SUBSCRIPTIONS_AUTH"]) and the subscriber
sending its source's TOKEN, against the real Redis store and, for registration, a real
toot publisher (the live server) and a recording HTTP peer.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.test import RequestFactory

import toot
from tests.http_server import HTTPServer, Reply
from tests.utils import callback_urls, store_contents, toot_settings
from toot.conf import conf
from toot.protocol.auth import authorization_header, bearer_token
from toot.publisher import store

SUBSCRIPTIONS = "/toot/subscriptions"
OWN_PREFIX = conf.CHANNEL_PREFIX
CHANNEL = OWN_PREFIX + "users.updated.v1"
CALLBACK_URL = "http://subscriber.example/toot/callbacks"
SUBSCRIPTION = {"channel": CHANNEL, "callback_url": CALLBACK_URL}
TOKENS = ["first-token-0123456789", "second-token-9876543210"]
PREFIX = conf.source("publisher").channel_prefix


def with_tokens(tokens=TOKENS):
    return toot_settings(SUBSCRIPTIONS_AUTH={"TOKENS": tokens})


def allow_the_key(request):
    """A SUBSCRIPTIONS_AUTH callable of these tests."""
    return request.headers.get("X-Test-Key") == "open sesame"


def truthy_but_not_true(request):
    return "yes"


def on_user(event):
    pass


@pytest.fixture
def seeded(redis):
    """A store holding one subscription, and its contents."""
    store.add(CHANNEL, "http://other.example/callbacks")
    return store_contents(redis)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def get(client, headers):
    return client.get(SUBSCRIPTIONS, headers={"Accept": "application/json", **headers})


def post(client, headers):
    body = json.dumps(SUBSCRIPTION)
    return client.post(SUBSCRIPTIONS, body, content_type="application/json", headers=headers)


def delete(client, headers, subscription=SUBSCRIPTION):
    return client.delete(f"{SUBSCRIPTIONS}?{urlencode(subscription)}", headers=headers)


REQUESTS = [pytest.param(f, id=f.__name__) for f in (get, post, delete)]


def assert_unauthorized(response, error_part):
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response["Content-Type"] == "application/json"
    assert error_part in response.json()["error"]


# Bearer tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("request_", REQUESTS)
def test_without_a_token_every_method_answers_401_and_changes_nothing(
    client, seeded, redis, request_
):
    with with_tokens():
        response = request_(client, {})

    assert_unauthorized(response, "Authorization: Bearer")
    assert store_contents(redis) == seeded


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer wrong-token", id="wrong"),
        pytest.param(f"Bearer {TOKENS[0]}x", id="longer"),
        pytest.param(f"Bearer {TOKENS[0][:-1]}", id="shorter"),
        pytest.param(f"Bearer {TOKENS[0].upper()}", id="other-case"),
        pytest.param(f"Bearer {TOKENS[0]},{TOKENS[1]}", id="both-joined"),
        pytest.param(f"Bearer \u00e9{TOKENS[0]}", id="non-ascii"),
    ],
)
@pytest.mark.parametrize("request_", REQUESTS)
def test_a_wrong_token_answers_401_and_changes_nothing(
    client, seeded, redis, request_, authorization
):
    with with_tokens():
        response = request_(client, {"Authorization": authorization})

    assert_unauthorized(response, "invalid bearer token")
    assert store_contents(redis) == seeded


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Basic {TOKENS[0]}", id="basic"),
        pytest.param("Bearer", id="no-token"),
        pytest.param("Bearer   ", id="blank-token"),
        pytest.param(TOKENS[0], id="no-scheme"),
        pytest.param("", id="empty"),
    ],
)
def test_anything_but_a_bearer_token_answers_401(client, seeded, redis, authorization):
    with with_tokens():
        response = post(client, {"Authorization": authorization})

    assert_unauthorized(response, "authentication required")
    assert store_contents(redis) == seeded


@pytest.mark.parametrize("token", TOKENS)
def test_any_accepted_token_lets_every_method_through(client, redis, token):
    with with_tokens():
        created = post(client, bearer(token))
        listed = get(client, bearer(token))
        removed = delete(client, bearer(token))

    assert created.status_code == 201
    assert listed.status_code == 200
    assert listed.json()["subscriptions"] == {CHANNEL: [CALLBACK_URL]}
    assert removed.status_code == 204
    assert callback_urls(CHANNEL) == []


@pytest.mark.parametrize(
    "authorization",
    [f"bearer {TOKENS[0]}", f"BEARER {TOKENS[0]}", f"Bearer   {TOKENS[0]}  "],
)
def test_the_scheme_is_case_insensitive_and_spaces_are_tolerated(client, redis, authorization):
    with with_tokens():
        response = post(client, {"Authorization": authorization})

    assert response.status_code == 201
    assert callback_urls(CHANNEL) == [CALLBACK_URL]


def test_authentication_comes_before_the_method_check(client, seeded, redis):
    with with_tokens():
        stranger = client.put(SUBSCRIPTIONS, json.dumps(SUBSCRIPTION))
        known = client.put(SUBSCRIPTIONS, json.dumps(SUBSCRIPTION), headers=bearer(TOKENS[0]))

    assert_unauthorized(stranger, "authentication required")
    assert known.status_code == 405
    assert store_contents(redis) == seeded


def test_the_tokens_follow_the_settings(client, redis):
    with with_tokens(["rotated-token-0123456789"]):
        old = post(client, bearer(TOKENS[0]))
        new = post(client, bearer("rotated-token-0123456789"))

    assert_unauthorized(old, "invalid bearer token")
    assert new.status_code == 201


def test_the_callbacks_endpoint_needs_no_token(client, redis):
    body = json.dumps({"channel": PREFIX + "nobody.listens.v1", "id": "e", "payload": None})

    with with_tokens():
        response = client.post("/toot/callbacks", body, content_type="application/json")

    assert response.status_code == 200


def test_open_by_default_as_the_ruby_gem_is(client, redis):
    assert "SUBSCRIPTIONS_AUTH" not in settings.TOOT

    response = post(client, {})

    assert response.status_code == 201
    assert callback_urls(CHANNEL) == [CALLBACK_URL]


# A callable --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", REQUESTS)
def test_a_callable_that_allows_lets_the_request_through(client, redis, request_):
    store.add(CHANNEL, CALLBACK_URL)

    with toot_settings(SUBSCRIPTIONS_AUTH="tests.test_auth.allow_the_key"):
        response = request_(client, {"X-Test-Key": "open sesame"})

    assert response.status_code in (200, 204)  # 204: the POST found it there already
    expected = [] if request_ is delete else [CALLBACK_URL]
    assert callback_urls(CHANNEL) == expected


@pytest.mark.parametrize("request_", REQUESTS)
def test_a_callable_that_denies_answers_401_and_changes_nothing(client, seeded, redis, request_):
    with toot_settings(SUBSCRIPTIONS_AUTH="tests.test_auth.allow_the_key"):
        response = request_(client, {"X-Test-Key": "open barley", **bearer(TOKENS[0])})

    assert_unauthorized(response, "not authorized")
    assert store_contents(redis) == seeded


def test_only_true_from_the_callable_lets_a_request_through(client, seeded, redis):
    with toot_settings(SUBSCRIPTIONS_AUTH="tests.test_auth.truthy_but_not_true"):
        response = post(client, {})

    assert_unauthorized(response, "not authorized")
    assert store_contents(redis) == seeded


# The subscriber sends its source's TOKEN ---------------------------------------------------


def test_bearer_token_reads_the_authorization_header():
    assert bearer_token(RequestFactory().get(SUBSCRIPTIONS, headers=bearer("abc"))) == "abc"
    assert bearer_token(RequestFactory().get(SUBSCRIPTIONS)) is None
    assert authorization_header("abc") == {"Authorization": "Bearer abc"}
    assert authorization_header(None) == {}


def sources(publisher_url, **options):
    source = {"SUBSCRIPTION_URL": publisher_url, "CHANNEL_PREFIX": PREFIX, **options}
    return {"publisher": source}


def test_registration_sends_the_source_token(redis):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with HTTPServer(Reply(201)) as peer:
        with toot_settings(SOURCES=sources(peer.url, TOKEN=TOKENS[1])):
            toot.register_subscriptions()
        with toot_settings(SOURCES=sources(peer.url)):
            toot.register_subscriptions()

    with_token, without = peer.requests
    assert with_token.headers["Authorization"] == f"Bearer {TOKENS[1]}"
    assert "Authorization" not in without.headers


@pytest.mark.django_db(transaction=True)
def test_registration_with_the_token_at_a_publisher_that_requires_it(live_server, redis):
    url = f"{live_server.url}{SUBSCRIPTIONS}"
    toot.subscribe("publisher", "users.updated.v1", on_user)

    def register(**source_options):
        """Register with this process as a publisher requiring TOKENS, and as the subscriber."""
        options = {
            "SUBSCRIPTIONS_AUTH": {"TOKENS": TOKENS},
            "SOURCES": sources(url, **source_options),
        }
        with toot_settings(**options):
            return toot.register_subscriptions()

    with pytest.raises(toot.RegisterSubscriptionFailure) as without:
        register()
    with pytest.raises(toot.RegisterSubscriptionFailure) as wrong:
        register(TOKEN="wrong-token")
    assert callback_urls(PREFIX + "users.updated.v1") == []

    [registration] = register(TOKEN=TOKENS[0])

    assert (without.value.status, wrong.value.status) == (401, 401)
    assert "authentication required" in without.value.detail
    assert "invalid bearer token" in wrong.value.detail
    assert registration.status == 201
    assert callback_urls(PREFIX + "users.updated.v1") == [settings.TOOT["CALLBACK_URL"]]
