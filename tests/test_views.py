"""The two HTTP endpoints (docs/protocol.md sections 1, 3, 5 and 7), against the real Redis store
and queues, the real Celery broker and, where a handler must run, a real worker.

Requests go through Django's test client with CSRF checks enforced, as a peer's POST
would arrive. What a request queues for handlers is what it pushed onto the Redis ``in``
queue (the ``enqueued`` fixture records each push once Redis took it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import threading
import uuid
from typing import Any
from unittest.mock import create_autospec
from urllib.parse import urlencode

import pytest
import redis as redis_py
from django.conf import settings
from django.test import override_settings
from django.urls import include, path, reverse
from django.utils import timezone

from devtools.processes import free_port
from tests.broker import broker_unreachable_and_no_drain
from tests.utils import callback_urls, store_contents
from toot import Event, subscribe
from toot.conf import conf
from toot.engine import queue
from toot.protocol import signing
from toot.protocol.events import BATCH_MAX_BYTES, BATCH_WRAPPER_BYTES, wire_json
from toot.protocol.validation import MAX_JSON_DEPTH
from toot.publisher import lanes, sending, store
from toot.publisher.publishing import encoded
from toot.subscriber import handling
from toot.views import MAX_SUBSCRIPTION_BYTES

pytestmark = pytest.mark.usefixtures("handled_while_subscribed")

SUBSCRIPTIONS = "/toot/subscriptions"
CALLBACKS = "/toot/callbacks"
OWN_PREFIX = settings.TOOT["CHANNEL_PREFIX"]  # this app as a publisher
SOURCE_PREFIX = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]  # a source it follows
CALLBACK_URL = "http://subscriber.example/toot/callbacks"
UTC = dt.timezone.utc


def on_event(event: Event) -> None:
    """The shape of a subscriber's handler; the tests' handlers are autospecs of it."""


def new_handler():
    return create_autospec(on_event)


def post_json(client, path, data, **extra):
    return client.post(path, json.dumps(data), content_type="application/json", **extra)


def post_raw(client, path, body, **extra):
    return client.post(path, body, content_type="application/json", **extra)


def assert_refused(response, status, error_part):
    """``error_part`` is in the JSON error (or one of them, given a tuple)."""
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str)
    parts = error_part if isinstance(error_part, tuple) else (error_part,)
    assert any(part in error for part in parts), error


@pytest.fixture
def seeded(redis):
    """A store holding subscriptions on our prefix (one in batches) and another, and its
    contents."""
    store.add(OWN_PREFIX + "users.updated.v1", CALLBACK_URL, batch=True)
    store.add(OWN_PREFIX + "users.updated.v1", "http://other.example/callbacks")
    store.add("org.example.other.orders.v1", CALLBACK_URL)
    return stored(redis)


def stored(redis):
    """The subscription store (tests.utils.store_contents) and its batch flags."""
    prefix = settings.TOOT["KEY_PREFIX"]
    flags = redis.scan_iter(match=f"{prefix}batch:*", count=1000)
    return {**store_contents(redis), **{key: redis.smembers(key) for key in flags}}


@pytest.fixture
def channel():
    """A fresh full channel of the "publisher" source, so no other test's job matches it."""
    return f"{SOURCE_PREFIX}users.{uuid.uuid4().hex[:12]}.v1"


@pytest.fixture
def subscribed(channel):
    """A handler subscribed to ``channel``; the full channel and the handler."""
    handler = new_handler()
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), handler)
    return channel, handler


def wire_event(channel, **fields):
    event = {
        "id": str(uuid.uuid4()),
        "timestamp": "2015-10-23T11:50:09.000-05:00",
        "payload": {"key": "value"},
        "channel": channel,
    }
    event.update(fields)
    return event


def received_event(handler):
    [call] = handler.call_args_list
    [event] = call.args
    return event


def test_endpoints_are_named_and_have_no_trailing_slash():
    assert reverse("toot:subscriptions") == SUBSCRIPTIONS
    assert reverse("toot:callbacks") == CALLBACKS


class OneEndpointEach:
    """A project that mounts each endpoint on its own, as one that only publishes or only
    subscribes mounts one of them."""

    urlpatterns = [
        path("pub/", include("toot.urls.subscriptions")),
        path("sub/", include("toot.urls.callbacks")),
    ]


def test_each_endpoint_can_be_mounted_alone(client, redis):
    with override_settings(ROOT_URLCONF=OneEndpointEach):
        assert reverse("toot:subscriptions") == "/pub/subscriptions"  # the first "toot"
        assert client.get("/pub/subscriptions", HTTP_ACCEPT="application/json").status_code == 200
        assert client.get("/sub/callbacks").status_code == 405  # POST only
        assert client.get("/sub/subscriptions").status_code == 404


# Subscriptions endpoint (section 1) ---------------------------------------------------


def test_post_new_subscription_answers_201_and_stores_it(client, redis):
    response = post_json(
        client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL}
    )

    assert response.status_code == 201
    assert callback_urls(OWN_PREFIX + "a.v1") == [CALLBACK_URL]


def test_post_existing_subscription_answers_204_and_keeps_one(client, redis):
    body = {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL}
    assert post_json(client, SUBSCRIPTIONS, body).status_code == 201

    response = post_json(client, SUBSCRIPTIONS, body)

    assert response.status_code == 204
    assert callback_urls(OWN_PREFIX + "a.v1") == [CALLBACK_URL]


def test_post_second_callback_url_to_a_channel_answers_201(client, redis):
    post_json(client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL})

    response = post_json(
        client,
        SUBSCRIPTIONS,
        {"channel": OWN_PREFIX + "a.v1", "callback_url": "http://b.example/cb"},
    )

    assert response.status_code == 201
    assert callback_urls(OWN_PREFIX + "a.v1") == ["http://b.example/cb", CALLBACK_URL]


def test_post_without_channel_answers_422(client, seeded, redis):
    response = post_json(client, SUBSCRIPTIONS, {"callback_url": CALLBACK_URL})

    assert_refused(response, 422, "channel required")
    assert stored(redis) == seeded


def test_post_without_callback_url_answers_422(client, seeded, redis):
    response = post_json(client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1"})

    assert_refused(response, 422, "callback_url required")
    assert stored(redis) == seeded


def test_post_of_longest_allowed_channel_and_url_is_stored(client, redis):
    channel = OWN_PREFIX + "c" * (255 - len(OWN_PREFIX))
    url = "https://subscriber.example/" + "u" * (2048 - len("https://subscriber.example/"))

    response = post_json(client, SUBSCRIPTIONS, {"channel": channel, "callback_url": url})

    assert response.status_code == 201
    assert callback_urls(channel) == [url]


def test_get_lists_only_channels_with_our_prefix(client, redis):
    store.add(OWN_PREFIX + "users.updated.v1", CALLBACK_URL)
    store.add(OWN_PREFIX + "users.updated.v1", "http://b.example/cb")
    store.add(OWN_PREFIX + "orders.created.v1", CALLBACK_URL)
    store.add("org.example.publisher.users.updated.v1", CALLBACK_URL)  # another publisher's
    store.add(OWN_PREFIX.rstrip("."), CALLBACK_URL)  # the prefix without its final dot
    store.add("com.example." + OWN_PREFIX + "x.v1", CALLBACK_URL)  # holds it, not at the start

    response = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "channels": [OWN_PREFIX + "orders.created.v1", OWN_PREFIX + "users.updated.v1"],
        "subscriptions": {
            OWN_PREFIX + "orders.created.v1": [CALLBACK_URL],
            OWN_PREFIX + "users.updated.v1": ["http://b.example/cb", CALLBACK_URL],
        },
    }


def test_get_follows_the_channel_prefix_setting(client, redis):
    store.add(OWN_PREFIX + "users.updated.v1", CALLBACK_URL)
    store.add("org.example.other.orders.v1", CALLBACK_URL)

    with override_settings(TOOT={**settings.TOOT, "CHANNEL_PREFIX": "org.example.other."}):
        response = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="application/json")

    assert response.json() == {
        "channels": ["org.example.other.orders.v1"],
        "subscriptions": {"org.example.other.orders.v1": [CALLBACK_URL]},
    }


def test_get_of_empty_store_lists_nothing(client, redis):
    store.add("org.example.other.orders.v1", CALLBACK_URL)

    response = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    assert response.json() == {"channels": [], "subscriptions": {}}


def test_get_with_json_among_other_types_in_accept_answers_200(client, redis):
    store.add(OWN_PREFIX + "users.updated.v1", CALLBACK_URL)

    response = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="text/html, application/json;q=0.9, */*;q=0.8")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json()["channels"] == [OWN_PREFIX + "users.updated.v1"]


@pytest.mark.parametrize(
    "accept", ["text/html", "*/*", "application/xml", "text/plain, text/*", ""]
)
def test_get_without_json_in_accept_answers_406(client, seeded, accept):
    response = client.get(SUBSCRIPTIONS, HTTP_ACCEPT=accept)

    assert_refused(response, 406, "application/json")


def test_get_without_accept_header_answers_406(client, seeded):
    response = client.get(SUBSCRIPTIONS)

    assert "HTTP_ACCEPT" not in response.wsgi_request.META
    assert_refused(response, 406, "Accept")


def test_delete_removes_the_subscription_and_answers_204(client, seeded, redis):
    channel = OWN_PREFIX + "users.updated.v1"
    query = urlencode({"channel": channel, "callback_url": CALLBACK_URL})

    response = client.delete(f"{SUBSCRIPTIONS}?{query}")

    assert response.status_code == 204
    assert callback_urls(channel) == ["http://other.example/callbacks"]
    assert callback_urls("org.example.other.orders.v1") == [CALLBACK_URL]


def test_delete_of_the_last_url_drops_the_channel_from_the_listing(client, redis):
    channel = OWN_PREFIX + "users.updated.v1"
    store.add(channel, CALLBACK_URL)

    response = client.delete(
        f"{SUBSCRIPTIONS}?{urlencode({'channel': channel, 'callback_url': CALLBACK_URL})}"
    )

    assert response.status_code == 204
    listing = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="application/json").json()
    assert listing == {"channels": [], "subscriptions": {}}


@pytest.mark.parametrize(
    ("channel", "callback_url"),
    [
        pytest.param(OWN_PREFIX + "users.updated.v1", "http://never.example/cb", id="other-url"),
        pytest.param(OWN_PREFIX + "never.v1", CALLBACK_URL, id="unknown-channel"),
    ],
)
def test_delete_of_absent_subscription_answers_404(client, seeded, redis, channel, callback_url):
    response = client.delete(
        f"{SUBSCRIPTIONS}?{urlencode({'channel': channel, 'callback_url': callback_url})}"
    )

    assert_refused(response, 404, "is not subscribed")
    assert stored(redis) == seeded


@pytest.mark.parametrize(
    ("query", "missing"),
    [
        pytest.param(
            {"channel": OWN_PREFIX + "users.updated.v1"}, "callback_url required", id="no-url"
        ),
        pytest.param({"callback_url": CALLBACK_URL}, "channel required", id="no-channel"),
        pytest.param({}, "channel and callback_url required", id="neither"),
        pytest.param(
            {"channel": "", "callback_url": CALLBACK_URL}, "channel required", id="empty-channel"
        ),
        pytest.param(
            {"channel": OWN_PREFIX + "users.updated.v1", "callback_url": ""},
            "callback_url required",
            id="empty-url",
        ),
    ],
)
def test_delete_with_a_parameter_missing_answers_400(client, seeded, redis, query, missing):
    response = client.delete(f"{SUBSCRIPTIONS}?{urlencode(query)}")

    assert_refused(response, 400, missing)
    assert stored(redis) == seeded


def test_delete_reads_the_query_string_not_the_body(client, seeded, redis):
    body = {"channel": OWN_PREFIX + "users.updated.v1", "callback_url": CALLBACK_URL}

    response = client.delete(SUBSCRIPTIONS, json.dumps(body), content_type="application/json")

    assert_refused(response, 400, "channel and callback_url required")
    assert stored(redis) == seeded


@pytest.mark.parametrize(
    "method", ["HEAD", "OPTIONS", "PUT", "PATCH", "TRACE", "CONNECT", "PROPFIND"]
)
def test_other_methods_on_subscriptions_answer_405(client, seeded, redis, method):
    body = json.dumps({"channel": OWN_PREFIX + "new.v1", "callback_url": CALLBACK_URL})

    response = client.generic(method, SUBSCRIPTIONS, body, content_type="application/json")

    assert response.status_code == 405
    assert response["Allow"] == "GET, POST, DELETE"
    assert response["Content-Type"] == "application/json"
    if method != "HEAD":  # a HEAD answer carries no body
        assert response.json() == {"error": f"method {method} is not allowed"}
    assert stored(redis) == seeded


# Batched delivery, asked for at registration (section 7) ----------------------------


def subscribers(channel):
    return store.subscribers([channel])[channel]


# A registration without batches: no "batch", or false.
WITHOUT_BATCH = [pytest.param({}, id="without-batch"), pytest.param({"batch": False}, id="false")]


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        pytest.param({"batch": True}, True, id="true"),
        *(pytest.param(*param.values, False, id=param.id) for param in WITHOUT_BATCH),
    ],
)
def test_post_stores_the_batch_flag(client, redis, extra, flag):
    body = {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL, **extra}

    assert post_json(client, SUBSCRIPTIONS, body).status_code == 201
    assert subscribers(OWN_PREFIX + "a.v1") == [(CALLBACK_URL, flag)]


@pytest.mark.parametrize("extra", WITHOUT_BATCH)
def test_registering_again_without_batch_turns_it_off(client, redis, extra):
    channel = OWN_PREFIX + "a.v1"
    body = {"channel": channel, "callback_url": CALLBACK_URL}
    assert post_json(client, SUBSCRIPTIONS, {**body, "batch": True}).status_code == 201

    response = post_json(client, SUBSCRIPTIONS, {**body, **extra})

    assert response.status_code == 204
    assert subscribers(channel) == [(CALLBACK_URL, False)]
    # And on again, still 204: the URL was there.
    assert post_json(client, SUBSCRIPTIONS, {**body, "batch": True}).status_code == 204
    assert subscribers(channel) == [(CALLBACK_URL, True)]


def test_the_flag_is_per_callback_url(client, redis):
    channel = OWN_PREFIX + "a.v1"
    post_json(client, SUBSCRIPTIONS, {"channel": channel, "callback_url": CALLBACK_URL})
    post_json(
        client,
        SUBSCRIPTIONS,
        {"channel": channel, "callback_url": "http://b.example/cb", "batch": True},
    )

    assert subscribers(channel) == [("http://b.example/cb", True), (CALLBACK_URL, False)]
    listing = client.get(SUBSCRIPTIONS, HTTP_ACCEPT="application/json").json()
    assert listing["subscriptions"] == {channel: ["http://b.example/cb", CALLBACK_URL]}


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param("yes", id="string"),
        pytest.param("true", id="string-true"),
        pytest.param(1, id="one"),
        pytest.param(0, id="zero"),
        pytest.param(None, id="null"),
        pytest.param([True], id="array"),
        pytest.param({"batch": True}, id="object"),
    ],
)
def test_batch_of_the_wrong_type_answers_422_and_changes_nothing(client, seeded, redis, batch):
    # The seeded subscription asked for batches: a refused registration leaves it so.
    for channel in (OWN_PREFIX + "users.updated.v1", OWN_PREFIX + "new.v1"):
        body = {"channel": channel, "callback_url": CALLBACK_URL, "batch": batch}

        response = post_json(client, SUBSCRIPTIONS, body)

        assert_refused(response, 422, "batch must be true or false")
    assert stored(redis) == seeded
    assert subscribers(OWN_PREFIX + "users.updated.v1")[1] == (CALLBACK_URL, True)


def test_batch_of_the_wrong_type_is_refused_as_raw_json_would_send_it(client, seeded, redis):
    body = with_new_subscription(', "batch": "true"')

    assert_refused(post_raw(client, SUBSCRIPTIONS, body), 422, "batch must be true or false")
    assert stored(redis) == seeded


def test_a_registration_the_resolver_cannot_check_now_answers_503_and_stores_nothing(
    client, seeded, redis, dns
):
    dns.answers["flaky.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
    body = {"channel": OWN_PREFIX + "a.v1", "callback_url": "https://flaky.test/cb", "batch": True}

    response = post_json(client, SUBSCRIPTIONS, body)

    assert_refused(response, 503, "try again")
    assert stored(redis) == seeded
    assert dns.lookups == ["flaky.test"]


def test_delete_drops_the_batch_flag(client, seeded, redis):
    channel = OWN_PREFIX + "users.updated.v1"
    query = urlencode({"channel": channel, "callback_url": CALLBACK_URL})

    assert client.delete(f"{SUBSCRIPTIONS}?{query}").status_code == 204

    assert subscribers(channel) == [("http://other.example/callbacks", False)]
    flags = redis.smembers(f"{settings.TOOT['KEY_PREFIX']}batch:{channel}")
    assert flags == set()


# Callback endpoint (section 3) --------------------------------------------------------


def test_event_for_subscribed_channel_runs_every_handler_in_one_job(
    client, celery_worker, eventually, enqueued, subscribed
):
    channel, first = subscribed
    second, elsewhere = new_handler(), new_handler()
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), second)
    subscribe("publisher", "users.elsewhere.v1", elsewhere)
    event = wire_event(channel)

    response = post_json(client, CALLBACKS, event)

    assert response.status_code == 200
    assert "X-Toot-Unsubscribe" not in response
    assert [job["id"] for job in enqueued] == [event["id"]]
    eventually(lambda: first.called and second.called, what="both handlers to run")
    assert received_event(first).id == event["id"]
    assert received_event(second).id == event["id"]
    assert not elsewhere.called


def test_handler_receives_the_event(client, celery_worker, eventually, subscribed):
    channel, handler = subscribed
    event = wire_event(channel, payload={"key": "value", "n": [1, 2.5, None, True]})

    assert post_json(client, CALLBACKS, event).status_code == 200

    eventually(lambda: handler.called, what="the handler to run")
    received = received_event(handler)
    assert isinstance(received, Event)
    assert received.id == event["id"]
    assert received.channel == channel
    assert received.payload == {"key": "value", "n": [1, 2.5, None, True]}
    assert received["key"] == "value"
    assert received.timestamp == dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=UTC)
    assert received.timestamp.utcoffset() is not None


def test_event_for_unsubscribed_channel_asks_to_unsubscribe_and_enqueues_nothing(
    client, celery_worker, eventually, enqueued, subscribed
):
    subscribed_channel, handler = subscribed
    event = wire_event(SOURCE_PREFIX + "nobody.listens.v1")

    response = post_json(client, CALLBACKS, event)

    assert response.status_code == 200
    assert response["X-Toot-Unsubscribe"] == "True"
    assert enqueued == []
    # The same request on the subscribed channel does enqueue: the check above can fail.
    assert post_json(client, CALLBACKS, wire_event(subscribed_channel)).status_code == 200
    assert len(enqueued) == 1
    eventually(lambda: handler.called, what="the handler to run")


def test_event_for_a_source_no_longer_in_settings_asks_to_unsubscribe(client, enqueued, subscribed):
    channel, _handler = subscribed

    with override_settings(TOOT={**settings.TOOT, "SOURCES": {}}):
        response = post_json(client, CALLBACKS, wire_event(channel))

    assert response.status_code == 200
    assert response["X-Toot-Unsubscribe"] == "True"
    assert enqueued == []


@pytest.mark.parametrize(
    "timestamp",
    [
        pytest.param("2015-10-23 11:50:09 -0500", id="ruby"),
        pytest.param("2015-10-23T11:50:09.000-05:00", id="rails-iso"),
        pytest.param("2015-10-23T16:50:09Z", id="z"),
        pytest.param("2015-10-23T16:50:09.000Z", id="z-millis"),
        pytest.param("2015-10-23T16:50:09", id="naive-is-utc"),
        pytest.param("2015-10-24 01:50:09 +0900", id="ruby-east"),
    ],
)
def test_timestamp_forms_reach_the_handler_as_aware_instants(
    client, celery_worker, eventually, subscribed, timestamp
):
    channel, handler = subscribed

    assert post_json(client, CALLBACKS, wire_event(channel, timestamp=timestamp)).status_code == 200

    eventually(lambda: handler.called, what="the handler to run")
    received = received_event(handler).timestamp
    assert received.utcoffset() is not None
    assert received == dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=UTC)


def test_missing_id_and_timestamp_are_made_up(client, celery_worker, eventually, subscribed):
    channel, handler = subscribed
    before = timezone.now()

    assert (
        post_json(client, CALLBACKS, {"channel": channel, "payload": {"key": 1}}).status_code == 200
    )

    eventually(lambda: handler.called, what="the handler to run")
    received = received_event(handler)
    assert uuid.UUID(received.id).version == 4
    assert received.timestamp.utcoffset() is not None
    assert before <= received.timestamp <= timezone.now()
    assert received["key"] == 1


def test_null_id_and_timestamp_are_made_up_like_missing_ones(
    client, celery_worker, eventually, subscribed
):
    channel, handler = subscribed

    response = post_json(client, CALLBACKS, {"channel": channel, "id": None, "timestamp": None})

    assert response.status_code == 200
    eventually(lambda: handler.called, what="the handler to run")
    received = received_event(handler)
    assert received.id and received.timestamp.utcoffset() is not None
    assert received.payload is None


def test_unparsable_timestamp_answers_422(client, enqueued, subscribed):
    channel, _handler = subscribed

    response = post_json(client, CALLBACKS, wire_event(channel, timestamp="yesterday at noon"))

    assert_refused(response, 422, "timestamp is not a date and time")
    assert enqueued == []


def test_event_without_channel_answers_422(client, enqueued, subscribed):
    event = wire_event("unused")
    del event["channel"]

    response = post_json(client, CALLBACKS, event)

    assert_refused(response, 422, "channel is missing")
    assert enqueued == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "TRACE"])
def test_other_methods_on_callbacks_answer_405(client, enqueued, subscribed, method):
    channel, _handler = subscribed

    response = client.generic(
        method, CALLBACKS, json.dumps(wire_event(channel)), content_type="application/json"
    )

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response["Content-Type"] == "application/json"
    if method != "HEAD":
        assert response.json() == {"error": f"method {method} is not allowed"}
    assert enqueued == []


# CSRF and an unreachable store ---------------------------------------------------------


# Django's default project middleware; tests/settings.py has none, so CSRF is checked here.
PROJECT_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


def test_endpoints_are_csrf_exempt(client, redis, eventually, celery_worker, subscribed):
    channel, handler = subscribed
    subscription = {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL}

    with override_settings(MIDDLEWARE=PROJECT_MIDDLEWARE):
        assert post_json(client, SUBSCRIPTIONS, subscription).status_code == 201
        assert client.delete(f"{SUBSCRIPTIONS}?{urlencode(subscription)}").status_code == 204
        assert post_json(client, CALLBACKS, wire_event(channel)).status_code == 200

    eventually(lambda: handler.called, what="the handler to run")


_outage: dict[str, Any] = {}


def redis_down_in_the_tests_thread():
    """The TOOT["REDIS_CONNECTION"] of ``redis_down_here``."""
    return _outage["down"] if threading.get_ident() == _outage["thread"] else _outage["up"]


@contextlib.contextmanager
def redis_down_here(redis):
    """Redis unreachable (a port where nothing listens) from the test's own thread, where the
    test client runs the view; the store's Redis for the worker's threads. An outage for all
    would also kill the drains at work, whose leases then hold new ones back a minute."""
    down = redis_py.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    _outage.update(thread=threading.get_ident(), down=down, up=redis)
    options = {"REDIS_CONNECTION": f"{__name__}.redis_down_in_the_tests_thread"}
    try:
        with override_settings(TOOT={**settings.TOOT, **options}):
            yield
    finally:
        _outage["thread"] = None  # a worker's thread may still ask for its client: "up"
        down.close()


@pytest.mark.parametrize(
    ("method", "path", "extra"),
    [
        pytest.param("GET", SUBSCRIPTIONS, {"HTTP_ACCEPT": "application/json"}, id="get"),
        pytest.param("POST", SUBSCRIPTIONS, {}, id="post"),
        pytest.param(
            "DELETE",
            f"{SUBSCRIPTIONS}?{urlencode({'channel': 'a.b', 'callback_url': CALLBACK_URL})}",
            {},
            id="delete",
        ),
    ],
)
def test_unreachable_store_answers_503(client, redis, method, path, extra):
    body = (
        json.dumps({"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL})
        if method == "POST"
        else ""
    )

    with redis_down_here(redis):
        response = client.generic(method, path, body, content_type="application/json", **extra)

    assert_refused(response, 503, "unavailable")


def waiting(redis, lane):
    """The events ready on the ``lane``, oldest first, that no drain has claimed."""
    prefix = settings.TOOT["KEY_PREFIX"]
    ready = f"{prefix}queue:{{{prefix}{lane}}}:ready"  # toot.engine.queue's layout
    return [json.loads(item)["event"] for item in redis.lrange(ready, 0, -1)]


@pytest.mark.parametrize("batched", [False, True], ids=["event", "batch"])
def test_unreachable_redis_at_the_callback_answers_503_and_the_retry_is_queued_whole(
    client, redis, celery_worker, eventually, enqueued, subscribed, batched
):
    channel, handler = subscribed
    events = batch_of(channel, 3 if batched else 1)
    body = {"events": events} if batched else events[0]
    with redis_down_here(redis):
        refused = post_json(client, CALLBACKS, body)
    queued_then = list(enqueued)

    retried = post_json(client, CALLBACKS, body)  # the publisher retries, Redis back

    assert_refused(refused, 503, "unavailable")
    assert queued_then == []
    assert retried.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(events)
    eventually(lambda: handler.call_count == len(events), what="the handler to run for each")
    assert handled_ids(handler) == sorted(ids_of(events))


def test_a_broker_failure_when_starting_the_drain_still_answers_200_and_the_events_wait(
    client, redis, celery_worker, no_drain_at_work, eventually, enqueued, subscribed, caplog
):
    # No drain at work (the fixture waited): only one started for this batch could take it.
    channel, handler = subscribed
    events = batch_of(channel, 3)
    lane = handling.lane(handling.handler_name(handler))

    with (
        broker_unreachable_and_no_drain(lane),
        caplog.at_level(logging.WARNING, logger="toot.engine.drain"),
    ):
        response = post_json(client, CALLBACKS, {"events": events})
        waiting_then, handled_then = waiting(redis, lane), handler.called

    assert response.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(events)
    assert ids_of(waiting_then) == ids_of(events)  # safe in Redis, in order
    assert not handled_then
    assert f"Cannot start a drain of the {lane} queue now" in caplog.text
    # Once the broker answers, the relay starts a drain.
    eventually(lambda: handler.call_count == 3, what="the handler to run for each event")
    assert handled_ids(handler) == sorted(ids_of(events))


# Bad input, as an attacker sends it (section 5) ----------------------------------------

NEW_SUBSCRIPTION = f'"channel": "{OWN_PREFIX}new.v1", "callback_url": "{CALLBACK_URL}"'
DEEP = 100_000
TOO_DEEP_FOR_JSON = ("not valid JSON", "nested too deeply")


def nested(depth):
    return "[" * depth + "]" * depth


def with_new_subscription(tail):
    """A new subscription's JSON object with ``tail`` added after its two fields."""
    return ("{" + NEW_SUBSCRIPTION + tail + "}").encode()


# Bodies that would be a valid new subscription but for what their id names.
BAD_SUBSCRIPTION_BODIES = [
    pytest.param(
        b"channel=org.example.test.new.v1&callback_url=http://a.example/",
        400,
        "not valid JSON",
        id="form",
    ),
    pytest.param(b"", 400, "not valid JSON", id="empty"),
    pytest.param(b"   ", 400, "not valid JSON", id="blank"),
    pytest.param(with_new_subscription("")[:-1], 400, "not valid JSON", id="truncated"),
    pytest.param(with_new_subscription("}"), 400, "not valid JSON", id="trailing-garbage"),
    pytest.param(
        with_new_subscription(', "x": "X"').replace(b'"X"', b'"\xff"'),
        400,
        "not valid JSON",
        id="invalid-utf8",
    ),
    pytest.param(b"\xff\xfe\x00\x00garbage", 400, "not valid JSON", id="binary"),
    pytest.param(b"[" + with_new_subscription("") + b"]", 422, "must be a JSON object", id="array"),
    pytest.param(b"42", 422, "must be a JSON object", id="number"),
    pytest.param(b'"org.example.test.new.v1"', 422, "must be a JSON object", id="string"),
    pytest.param(b"null", 422, "must be a JSON object", id="null"),
    pytest.param(b"true", 422, "must be a JSON object", id="true"),
    pytest.param(with_new_subscription(', "x": NaN'), 400, "not valid JSON", id="nan"),
    pytest.param(with_new_subscription(', "x": Infinity'), 400, "not valid JSON", id="infinity"),
    pytest.param(with_new_subscription(', "x": -Infinity'), 400, "not valid JSON", id="-infinity"),
    # 5,000 levels: as deep as fits in a registration's 16 KiB. Python 3.11's parser gives
    # up on it; that of 3.12 and later reads it, and the depth check refuses it.
    pytest.param(nested(5_000).encode(), 400, TOO_DEEP_FOR_JSON, id="deep-array"),
    pytest.param(
        with_new_subscription(f', "x": {nested(5_000)}'), 400, TOO_DEEP_FOR_JSON, id="deep-field"
    ),
    pytest.param(nested(DEEP).encode(), 413, "larger than 16384 bytes", id="deep-100000"),
    pytest.param(
        with_new_subscription(f', "x": {"9" * 5000}'), 400, "not valid JSON", id="huge-int"
    ),
]


@pytest.mark.parametrize(("body", "status", "error"), BAD_SUBSCRIPTION_BODIES)
def test_bad_subscription_body_is_refused(client, seeded, redis, enqueued, body, status, error):
    response = post_raw(client, SUBSCRIPTIONS, body)

    assert_refused(response, status, error)
    assert stored(redis) == seeded
    assert enqueued == []


VALID = {"channel": OWN_PREFIX + "new.v1", "callback_url": CALLBACK_URL}
LONG_CHANNEL = OWN_PREFIX + "c" * (256 - len(OWN_PREFIX))
LONG_URL = "https://subscriber.example/" + "u" * (2049 - len("https://subscriber.example/"))

BAD_SUBSCRIPTION_FIELDS = [
    pytest.param({}, "channel and callback_url required", id="empty-object"),
    pytest.param({"callback_url": CALLBACK_URL}, "channel required", id="no-channel"),
    pytest.param({"channel": VALID["channel"]}, "callback_url required", id="no-url"),
    pytest.param({**VALID, "channel": None}, "channel required", id="channel-null"),
    pytest.param({**VALID, "channel": ""}, "channel required", id="channel-empty"),
    pytest.param({**VALID, "callback_url": None}, "callback_url required", id="url-null"),
    pytest.param({**VALID, "channel": 5}, "channel must be a string", id="channel-number"),
    pytest.param({**VALID, "channel": 0}, "channel must be a string", id="channel-zero"),
    pytest.param({**VALID, "channel": True}, "channel must be a string", id="channel-bool"),
    pytest.param(
        {**VALID, "channel": [VALID["channel"]]}, "channel must be a string", id="channel-array"
    ),
    pytest.param({**VALID, "channel": {"a": 1}}, "channel must be a string", id="channel-object"),
    pytest.param({**VALID, "callback_url": 5}, "callback_url must be a string", id="url-number"),
    pytest.param(
        {**VALID, "callback_url": [CALLBACK_URL]}, "callback_url must be a string", id="url-array"
    ),
    pytest.param({**VALID, "channel": LONG_CHANNEL}, "longer than 255", id="channel-256"),
    pytest.param({**VALID, "channel": "x" * 10_000}, "longer than 255", id="channel-10000"),
    pytest.param({**VALID, "channel": OWN_PREFIX + "a b"}, "printable ASCII", id="channel-space"),
    pytest.param({**VALID, "channel": OWN_PREFIX + "a\tb"}, "printable ASCII", id="channel-tab"),
    pytest.param(
        {**VALID, "channel": OWN_PREFIX + "a\nb"}, "printable ASCII", id="channel-newline"
    ),
    pytest.param({**VALID, "channel": OWN_PREFIX + "a\x7f"}, "printable ASCII", id="channel-del"),
    pytest.param(
        {**VALID, "channel": OWN_PREFIX + "caf\u00e9"}, "printable ASCII", id="channel-non-ascii"
    ),
    pytest.param(
        {**VALID, "callback_url": "ftp://subscriber.example/cb"}, "http or https", id="url-ftp"
    ),
    pytest.param({**VALID, "callback_url": "file:///etc/passwd"}, "http or https", id="url-file"),
    pytest.param(
        {**VALID, "callback_url": "javascript:alert(1)"}, "http or https", id="url-javascript"
    ),
    pytest.param(
        {**VALID, "callback_url": "gopher://127.0.0.1:6379/_FLUSHALL"},
        "http or https",
        id="url-gopher",
    ),
    pytest.param({**VALID, "callback_url": "/toot/callbacks"}, "http or https", id="url-relative"),
    pytest.param(
        {**VALID, "callback_url": "subscriber.example/cb"}, "http or https", id="url-no-scheme"
    ),
    pytest.param({**VALID, "callback_url": "http:///cb"}, "must name a host", id="url-no-host"),
    pytest.param(
        {**VALID, "callback_url": "http://user:secret@subscriber.example/cb"},
        "userinfo",
        id="url-user-password",
    ),
    pytest.param(
        {**VALID, "callback_url": "http://user@subscriber.example/cb"}, "userinfo", id="url-user"
    ),
    pytest.param(
        {**VALID, "callback_url": "http://:secret@subscriber.example/cb"},
        "userinfo",
        id="url-password",
    ),
    pytest.param({**VALID, "callback_url": LONG_URL}, "longer than 2048", id="url-2049"),
    pytest.param(
        {**VALID, "callback_url": "http://subscriber.example:99999/cb"},
        "not a valid URL",
        id="url-port",
    ),
    pytest.param({**VALID, "callback_url": "http://[::1/cb"}, "not a valid URL", id="url-bad-ipv6"),
    pytest.param(
        {**VALID, "callback_url": "http://subscriber.example/a b"}, "whitespace", id="url-space"
    ),
    pytest.param(
        {**VALID, "callback_url": "http://subscriber.example/\r\nX: y"}, "whitespace", id="url-crlf"
    ),
]


@pytest.mark.parametrize(("data", "error"), BAD_SUBSCRIPTION_FIELDS)
def test_bad_subscription_field_answers_422(client, seeded, redis, data, error):
    response = post_json(client, SUBSCRIPTIONS, data)

    assert_refused(response, 422, error)


@pytest.mark.parametrize(("escaped", "error"), [("\ud800", "lone surrogate"), ("\x00", "NUL")])
@pytest.mark.parametrize("field", ["channel", "callback_url"])
def test_an_unstorable_escape_in_a_subscription_answers_400(
    client, seeded, redis, field, escaped, error
):
    # Valid JSON escapes, but a lone surrogate is no text, and NUL no text PostgreSQL keeps.
    response = post_json(client, SUBSCRIPTIONS, {**VALID, field: VALID[field] + escaped})

    assert_refused(response, 400, error)
    assert stored(redis) == seeded
    assert stored(redis) == seeded


SEEDED = {"channel": OWN_PREFIX + "users.updated.v1", "callback_url": CALLBACK_URL}


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        pytest.param({"channel": SEEDED["channel"]}, 400, "callback_url required", id="no-url"),
        pytest.param({"callback_url": CALLBACK_URL}, 400, "channel required", id="no-channel"),
        pytest.param({**SEEDED, "channel": LONG_CHANNEL}, 422, "longer than 255", id="channel-256"),
        pytest.param(
            {**SEEDED, "channel": SEEDED["channel"] + " x"},
            422,
            "printable ASCII",
            id="channel-space",
        ),
        pytest.param(
            {**SEEDED, "channel": SEEDED["channel"] + "\u00e9"},
            422,
            "printable ASCII",
            id="channel-non-ascii",
        ),
        pytest.param(
            {**SEEDED, "callback_url": "ftp://subscriber.example/"},
            422,
            "http or https",
            id="url-ftp",
        ),
        pytest.param(
            {**SEEDED, "callback_url": "http://u:p@subscriber.example/toot/callbacks"},
            422,
            "userinfo",
            id="url-user",
        ),
        pytest.param({**SEEDED, "callback_url": LONG_URL}, 422, "longer than 2048", id="url-2049"),
    ],
)
def test_bad_delete_query_is_refused(client, seeded, redis, query, status, error):
    response = client.delete(f"{SUBSCRIPTIONS}?{urlencode(query)}")

    assert_refused(response, status, error)
    assert stored(redis) == seeded


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        pytest.param(
            "channel=%FF%FE&callback_url=" + CALLBACK_URL, 422, "printable ASCII", id="channel"
        ),
        pytest.param(
            f"channel={OWN_PREFIX}users.updated.v1&callback_url=http://subscriber.example/%ED%A0%80",
            404,
            "is not subscribed",
            id="url-surrogate",
        ),
    ],
)
def test_delete_with_invalid_utf8_in_query_removes_nothing(
    client, seeded, redis, query, status, error
):
    response = client.delete(f"{SUBSCRIPTIONS}?{query}")

    assert_refused(response, status, error)
    assert stored(redis) == seeded


# Event bodies; CHANNEL stands for a channel with a local handler, so that a body that got
# through would enqueue a job.
BAD_EVENT_BODIES = [
    pytest.param("channel=CHANNEL&payload=1", 400, "not valid JSON", id="form"),
    pytest.param("", 400, "not valid JSON", id="empty"),
    pytest.param('{"channel": "CHANNEL", "payload": ', 400, "not valid JSON", id="truncated"),
    pytest.param('{"channel": "CHANNEL"}}', 400, "not valid JSON", id="trailing-garbage"),
    pytest.param(
        '{"channel": "CHANNEL", "payload": "\xff"}', 400, "not valid JSON", id="invalid-utf8"
    ),
    pytest.param('[{"channel": "CHANNEL"}]', 422, "must be a JSON object", id="array"),
    pytest.param("42", 422, "must be a JSON object", id="number"),
    pytest.param('"CHANNEL"', 422, "must be a JSON object", id="string"),
    pytest.param("null", 422, "must be a JSON object", id="null"),
    pytest.param("false", 422, "must be a JSON object", id="false"),
    pytest.param('{"channel": "CHANNEL", "payload": NaN}', 400, "not valid JSON", id="nan"),
    pytest.param(
        '{"channel": "CHANNEL", "payload": {"x": Infinity}}', 400, "not valid JSON", id="infinity"
    ),
    pytest.param(
        '{"channel": "CHANNEL", "payload": [-Infinity]}', 400, "not valid JSON", id="-infinity"
    ),
    pytest.param(
        '{"channel": "CHANNEL", "payload": {"x": 1e400}}', 400, "not valid JSON", id="overflow"
    ),
    pytest.param(nested(DEEP), 400, "not valid JSON", id="deep-array"),
    pytest.param(
        f'{{"channel": "CHANNEL", "payload": {nested(DEEP)}}}',
        400,
        "not valid JSON",
        id="deep-payload",
    ),
    pytest.param(
        f'{{"channel": "CHANNEL", "payload": {"9" * 5000}}}', 400, "not valid JSON", id="huge-int"
    ),
]


@pytest.mark.parametrize(("body", "status", "error"), BAD_EVENT_BODIES)
def test_bad_event_body_is_refused(
    client, seeded, redis, enqueued, subscribed, body, status, error
):
    channel, _handler = subscribed

    response = post_raw(client, CALLBACKS, body.replace("CHANNEL", channel).encode("latin-1"))

    assert_refused(response, status, error)
    assert enqueued == []
    assert stored(redis) == seeded


BAD_EVENT_FIELDS = [
    pytest.param({"channel": None}, "channel must be a string", id="channel-null"),
    pytest.param({"channel": 5}, "channel must be a string", id="channel-number"),
    pytest.param({"channel": ["CHANNEL"]}, "channel must be a string", id="channel-array"),
    pytest.param({"channel": {"name": "CHANNEL"}}, "channel must be a string", id="channel-object"),
    pytest.param({"channel": ""}, "channel must not be empty", id="channel-empty"),
    pytest.param({"channel": SOURCE_PREFIX + "c" * 300}, "longer than 255", id="channel-300"),
    pytest.param({"channel": "CHANNEL x"}, "printable ASCII", id="channel-space"),
    pytest.param({"channel": "CHANNEL\n"}, "printable ASCII", id="channel-newline"),
    pytest.param({"channel": "CHANNEL\u00e9"}, "printable ASCII", id="channel-non-ascii"),
    pytest.param({"id": 5}, "id must be a non-empty string", id="id-number"),
    pytest.param({"id": ""}, "id must be a non-empty string", id="id-empty"),
    pytest.param({"id": True}, "id must be a non-empty string", id="id-bool"),
    pytest.param({"id": ["x"]}, "id must be a non-empty string", id="id-array"),
    pytest.param({"id": "x" * 256}, "id is longer than 255", id="id-256"),
    pytest.param({"timestamp": 1445619009}, "timestamp must be a string", id="timestamp-number"),
    pytest.param({"timestamp": ["2015-10-23"]}, "timestamp must be a string", id="timestamp-array"),
    pytest.param(
        {"timestamp": "yesterday"}, "timestamp is not a date and time", id="timestamp-garbage"
    ),
    pytest.param({"timestamp": ""}, "timestamp is not a date and time", id="timestamp-empty"),
    pytest.param(
        {"timestamp": "2015-13-01T00:00:00Z"},
        "timestamp is not a date and time",
        id="timestamp-month-13",
    ),
    pytest.param(
        {"timestamp": "2015-10-23 11:50:09 +9900"},
        "timestamp is not a date and time",
        id="timestamp-offset-99h",
    ),
]


@pytest.mark.parametrize(("fields", "error"), BAD_EVENT_FIELDS)
def test_bad_event_field_answers_422(client, seeded, redis, enqueued, subscribed, fields, error):
    channel, _handler = subscribed
    fields = json.loads(json.dumps(fields).replace("CHANNEL", channel))

    response = post_json(client, CALLBACKS, {**wire_event(channel), **fields})

    assert_refused(response, 422, error)
    assert enqueued == []
    assert stored(redis) == seeded


def test_event_over_max_bytes_answers_413_and_at_max_is_accepted(
    client, celery_worker, eventually, enqueued, subscribed
):
    channel, handler = subscribed
    event = wire_event(channel, payload="")
    padding = 2048 - len(json.dumps(event))
    exact = json.dumps(wire_event(channel, payload="p" * padding))
    over = json.dumps(wire_event(channel, payload="p" * (padding + 1)))
    assert len(exact) == 2048

    with override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": 2048}):
        refused = post_raw(client, CALLBACKS, over)
        accepted = post_raw(client, CALLBACKS, exact)

    assert_refused(refused, 413, "larger than 2048 bytes")
    assert accepted.status_code == 200
    assert [job["payload"] for job in enqueued] == ["p" * padding]
    eventually(lambda: handler.called, what="the handler to run")


TEN_MB = 10 * 1024 * 1024


def limit():
    """The body size limit of each endpoint, which its 413 error names."""
    return {
        SUBSCRIPTIONS: MAX_SUBSCRIPTION_BYTES,
        CALLBACKS: max(conf.MAX_EVENT_BYTES + BATCH_WRAPPER_BYTES, BATCH_MAX_BYTES),
    }


@pytest.mark.parametrize(
    ("path", "template"),
    [
        pytest.param(SUBSCRIPTIONS, "{" + NEW_SUBSCRIPTION + ', "x": "PAD"}', id="subscriptions"),
        pytest.param(CALLBACKS, '{"channel": "CHANNEL", "payload": "PAD"}', id="callbacks"),
    ],
)
def test_ten_megabyte_body_answers_413(client, seeded, redis, enqueued, subscribed, path, template):
    channel, _handler = subscribed
    body = template.replace("CHANNEL", channel).replace("PAD", "x" * TEN_MB)

    response = post_raw(client, path, body)

    assert_refused(response, 413, f"larger than {limit()[path]} bytes")
    assert stored(redis) == seeded
    assert enqueued == []


def test_body_over_djangos_upload_limit_answers_413_not_400(client, enqueued, subscribed):
    channel, _handler = subscribed
    body = json.dumps(wire_event(channel, payload="x" * TEN_MB))

    with override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": 4 * TEN_MB}):
        response = post_raw(client, CALLBACKS, body)

    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert_refused(response, 413, "larger than the server accepts")
    assert enqueued == []


@pytest.mark.parametrize(
    ("content_length", "status", "error"),
    [
        pytest.param("SHORT", 400, "not valid JSON", id="one-byte-short"),
        pytest.param("0", 400, "not valid JSON", id="zero"),
        pytest.param("-1", 400, "not valid JSON", id="negative"),
        pytest.param("", 400, "not valid JSON", id="empty"),
        pytest.param("abc", 400, "Content-Length is not a number", id="not-a-number"),
        pytest.param("1e3", 400, "Content-Length is not a number", id="float"),
        pytest.param(str(10**12), 413, "LIMIT", id="huge"),
    ],
)
@pytest.mark.parametrize("path", [SUBSCRIPTIONS, CALLBACKS])
def test_lying_content_length_is_refused(
    client, seeded, redis, enqueued, subscribed, path, content_length, status, error
):
    channel, _handler = subscribed
    body = json.dumps(VALID if path == SUBSCRIPTIONS else wire_event(channel))
    if content_length == "SHORT":
        content_length = str(len(body) - 1)
    if error == "LIMIT":  # refused on the declared length, before the body is read
        error = f"larger than {limit()[path]} bytes"

    response = post_raw(client, path, body, CONTENT_LENGTH=content_length)

    assert_refused(response, status, error)
    assert stored(redis) == seeded
    assert enqueued == []


def test_a_body_longer_than_its_content_length_is_still_bounded(rf):
    """Under ASGI a chunked body has no Content-Length; the read itself is bounded too."""
    from toot.exceptions import Refused
    from toot.views import read_json

    request = rf.post("/toot/callbacks", data=b"x" * 2048, content_type="application/json")
    del request.META["CONTENT_LENGTH"]

    with pytest.raises(Refused) as refused:
        read_json(request, 1024)
    assert refused.value.status == 413


# Batches on the callback endpoint (section 7), as a publisher or an attacker sends them --


def batch_of(channel, count, **fields):
    return [wire_event(channel, **fields) for _ in range(count)]


def ids_of(events):
    return [event["id"] for event in events]


def handled_ids(handler):
    return sorted(call.args[0].id for call in handler.call_args_list)


def test_each_handler_gets_the_events_on_a_lane_of_its_own_in_one_push(
    client, celery_worker, eventually, enqueued, channel, monkeypatch
):
    first, second = new_handler(), new_handler()
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), first)
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), second)
    pushes: list[dict[str, Any]] = []
    push_many = queue.push_many

    def spy(lanes):
        pushes.append(lanes)
        return push_many(lanes)

    monkeypatch.setattr(queue, "push_many", spy)
    events = batch_of(channel, 2)

    response = post_json(client, CALLBACKS, {"events": events})

    assert response.status_code == 200
    [pushed] = pushes  # one round trip for every lane
    assert {
        lane: [(item["event"]["id"], item["handlers"]) for item in map(json.loads, items)]
        for lane, items in pushed.items()
    } == {
        handling.lane(name): [(event["id"], [name]) for event in events]
        for name in handling.handlers_by_name(channel)
    }
    assert len(pushed) == 2
    eventually(lambda: handled_ids(first) == handled_ids(second) == sorted(ids_of(events)))


def test_batch_queues_every_event_in_order_and_each_runs_every_handler(
    client, celery_worker, eventually, enqueued, subscribed
):
    channel, first = subscribed
    second = new_handler()
    subscribe("publisher", channel.removeprefix(SOURCE_PREFIX), second)
    events = [wire_event(channel, payload={"n": n}) for n in range(5)]

    response = post_json(client, CALLBACKS, {"events": events})

    assert response.status_code == 200
    assert "X-Toot-Unsubscribe" not in response
    assert [job["id"] for job in enqueued] == ids_of(events)
    assert [job["payload"] for job in enqueued] == [{"n": n} for n in range(5)]
    eventually(
        lambda: first.call_count == second.call_count == 5,
        what="both handlers to run for every event",
    )
    assert handled_ids(first) == handled_ids(second) == sorted(ids_of(events))
    received = {call.args[0].id: call.args[0] for call in first.call_args_list}
    for n, event in enumerate(events):
        assert received[event["id"]].payload == {"n": n}
        assert received[event["id"]].timestamp == dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=UTC)


def test_batch_of_one_event_is_accepted(client, enqueued, subscribed):
    channel, _handler = subscribed
    [event] = batch_of(channel, 1)

    response = post_json(client, CALLBACKS, {"events": [event]})

    assert response.status_code == 200
    assert [job["id"] for job in enqueued] == [event["id"]]


def test_events_of_a_batch_without_id_or_timestamp_get_their_own(client, enqueued, subscribed):
    channel, _handler = subscribed
    before = timezone.now()

    response = post_json(client, CALLBACKS, {"events": [{"channel": channel}] * 3})

    assert response.status_code == 200
    assert len({job["id"] for job in enqueued}) == 3
    for job in enqueued:
        assert uuid.UUID(job["id"]).version == 4
        assert before <= dt.datetime.fromisoformat(job["timestamp"]) <= timezone.now()


@pytest.mark.parametrize("max_events", [1, 3])
def test_batch_of_batch_max_events_is_accepted_and_one_more_is_refused(
    client, enqueued, subscribed, max_events
):
    channel, _handler = subscribed
    full, over = batch_of(channel, max_events), batch_of(channel, max_events + 1)

    with override_settings(TOOT={**settings.TOOT, "BATCH_MAX_EVENTS": max_events}):
        refused = post_json(client, CALLBACKS, {"events": over})
        accepted = post_json(client, CALLBACKS, {"events": full})

    assert_refused(refused, 422, f"events must be a list of 1 to {max_events} events")
    assert accepted.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(full)


def test_batch_max_events_is_100_by_default(client, enqueued, subscribed):
    channel, _handler = subscribed
    full, over = batch_of(channel, 100), batch_of(channel, 101)

    refused = post_json(client, CALLBACKS, {"events": over})
    accepted = post_json(client, CALLBACKS, {"events": full})

    assert_refused(refused, 422, "events must be a list of 1 to 100 events")
    assert accepted.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(full)


# EVENT stands for a valid event on a subscribed channel, so that a body that got through
# would queue it.
BAD_BATCH_BODIES = [
    pytest.param('{"events": []}', id="empty"),
    pytest.param('{"events": "x"}', id="string"),
    pytest.param('{"events": ""}', id="empty-string"),
    pytest.param('{"events": null}', id="null"),
    pytest.param('{"events": 1}', id="number"),
    pytest.param('{"events": true}', id="true"),
    pytest.param('{"events": {}}', id="object"),
    pytest.param('{"events": EVENT}', id="an-event-not-in-a-list"),
    pytest.param('{"events": {"0": EVENT}}', id="events-by-index"),
    pytest.param('{"channel": "CHANNEL", "events": []}', id="empty-beside-a-channel"),
]


@pytest.mark.parametrize("body", BAD_BATCH_BODIES)
def test_events_that_are_not_a_list_of_events_answer_422(
    client, seeded, redis, enqueued, subscribed, body
):
    channel, _handler = subscribed
    body = body.replace("EVENT", json.dumps(wire_event(channel))).replace("CHANNEL", channel)

    response = post_raw(client, CALLBACKS, body)

    assert_refused(response, 422, "events must be a list of 1 to 100 events")
    assert enqueued == []
    assert stored(redis) == seeded


BAD_BATCH_MEMBERS = [
    pytest.param(5, "event must be a JSON object", id="number"),
    pytest.param(None, "event must be a JSON object", id="null"),
    pytest.param("EVENT", "event must be a JSON object", id="string"),
    pytest.param([], "event must be a JSON object", id="array"),
    pytest.param({"events": []}, "channel is missing", id="nested-batch"),
    pytest.param({"payload": {"key": "value"}}, "channel is missing", id="no-channel"),
]


def malformed_event(channel, member):
    """A BAD_BATCH_MEMBERS or BAD_EVENT_FIELDS value as an event of ``channel``."""
    if not (isinstance(member, dict) and "events" not in member and "payload" not in member):
        return member
    return {**wire_event(channel), **json.loads(json.dumps(member).replace("CHANNEL", channel))}


@pytest.mark.parametrize(
    ("member", "error"),
    BAD_BATCH_MEMBERS + [pytest.param(p.values[0], p.values[1], id=p.id) for p in BAD_EVENT_FIELDS],
)
def test_a_malformed_event_in_a_batch_is_named_and_nothing_is_queued(
    client, seeded, redis, enqueued, subscribed, member, error
):
    channel, _handler = subscribed
    events = batch_of(channel, 5)
    events[3] = malformed_event(channel, member)

    response = post_json(client, CALLBACKS, {"events": events})

    assert_refused(response, 422, error)
    assert response.json()["error"].startswith("events[3]: ")
    assert enqueued == []  # not even the three valid events before it
    assert stored(redis) == seeded


@pytest.mark.parametrize(
    ("channels", "stray"),
    [
        pytest.param(["A", "A", "B", "A"], 2, id="one-stray"),
        pytest.param(["A", "B"], 1, id="second"),
        pytest.param(["U", "A", "A"], 1, id="after-an-unsubscribed-one"),
        pytest.param(["A", "A", "U"], 2, id="an-unsubscribed-one-last"),
        pytest.param(["A", "A."], 1, id="a-longer-name"),
    ],
)
def test_a_batch_of_mixed_channels_answers_422_naming_the_first_stray(
    client, enqueued, subscribed, channels, stray
):
    channel, _handler = subscribed
    other = SOURCE_PREFIX + "orders." + uuid.uuid4().hex[:12] + ".v1"
    subscribe("publisher", other.removeprefix(SOURCE_PREFIX), new_handler())
    names = {"A": channel, "A.": channel + ".x", "B": other, "U": SOURCE_PREFIX + "nobody.v1"}
    events = [wire_event(names[name]) for name in channels]

    response = post_json(client, CALLBACKS, {"events": events})

    assert_refused(response, 422, f"events[{stray}]: every event of a batch must be of one channel")
    assert "X-Toot-Unsubscribe" not in response
    assert enqueued == []


def test_batch_on_an_unsubscribed_channel_asks_to_unsubscribe_and_queues_nothing(
    client, enqueued, subscribed
):
    _channel, _handler = subscribed
    events = batch_of(SOURCE_PREFIX + "nobody.listens.v1", 3)

    response = post_json(client, CALLBACKS, {"events": events})

    assert response.status_code == 200
    assert response["X-Toot-Unsubscribe"] == "True"
    assert enqueued == []


def padded_batch(channel, count, size):
    """``count`` events of ``channel`` whose batch body (json.dumps) is ``size`` bytes."""
    events = batch_of(channel, count, payload="")
    padding = size - len(json.dumps({"events": events}))
    for index, event in enumerate(events):
        event["payload"] = "p" * (padding // count + (index < padding % count))
    body = json.dumps({"events": events})
    assert len(body) == size
    return events, body


def test_a_batch_over_the_body_limit_answers_413_and_at_it_is_accepted(
    client, enqueued, subscribed
):
    channel, _handler = subscribed
    # Five events, each well under MAX_EVENT_BYTES (256 KiB): only the whole is too large.
    over_events, over = padded_batch(channel, 5, BATCH_MAX_BYTES + 1)
    exact_events, exact = padded_batch(channel, 5, BATCH_MAX_BYTES)
    assert max(len(json.dumps(event)) for event in over_events) < conf.MAX_EVENT_BYTES

    refused = post_raw(client, CALLBACKS, over)
    accepted = post_raw(client, CALLBACKS, exact)

    assert_refused(refused, 413, f"larger than {BATCH_MAX_BYTES} bytes")
    assert accepted.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(exact_events)


def test_a_larger_max_event_bytes_raises_the_batch_body_limit_too(client, enqueued, subscribed):
    channel, _handler = subscribed
    limit = 2 * BATCH_MAX_BYTES
    # Room for a batch of one event of MAX_EVENT_BYTES: the event and {"events":[]}.
    body_limit = limit + BATCH_WRAPPER_BYTES
    events, body = padded_batch(channel, 4, body_limit)
    _, over = padded_batch(channel, 4, body_limit + 1)

    with override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": limit}):
        refused = post_raw(client, CALLBACKS, over)
        accepted = post_raw(client, CALLBACKS, body)

    assert_refused(refused, 413, f"larger than {body_limit} bytes")
    assert accepted.status_code == 200
    assert [job["id"] for job in enqueued] == ids_of(events)


def test_a_batch_of_one_event_of_max_event_bytes_is_accepted(client, enqueued, subscribed):
    channel, _handler = subscribed
    limit = 2 * BATCH_MAX_BYTES  # over the batch limit: the event goes in a batch of its own
    event = wire_event(channel, payload="")
    event["payload"] = "p" * (limit - len(wire_json(event)))
    assert len(wire_json(event)) == limit  # as much as publish() takes

    with override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": limit}):
        [(_, body)] = sending._chunks([wire_json(event)])  # as a publisher sends it
        accepted = post_raw(client, CALLBACKS, body)

    assert accepted.status_code == 200
    assert [job["id"] for job in enqueued] == [event["id"]]


def test_a_single_event_over_max_event_bytes_is_413_though_a_batch_may_be_larger(
    client, enqueued, subscribed
):
    channel, _handler = subscribed
    event = wire_event(channel, payload="")
    padding = conf.MAX_EVENT_BYTES - len(json.dumps(event))
    exact = json.dumps(wire_event(channel, payload="p" * padding))
    over = json.dumps(wire_event(channel, payload="p" * (padding + 1)))
    assert len(over) < BATCH_MAX_BYTES

    refused = post_raw(client, CALLBACKS, over)
    accepted = post_raw(client, CALLBACKS, exact)

    assert_refused(refused, 413, f"event is larger than {conf.MAX_EVENT_BYTES} bytes")
    assert accepted.status_code == 200
    assert [job["payload"] for job in enqueued] == ["p" * padding]


def test_a_batch_with_an_event_nested_past_max_json_depth_is_refused(client, enqueued, subscribed):
    channel, _handler = subscribed
    # {"events": [event]} is two levels around the event's own object, and the event one
    # around its payload. (Between the two: see the known bug below.)
    batch = json.dumps({"events": [wire_event(channel, payload="DEEP")]})

    refused = post_raw(client, CALLBACKS, batch.replace('"DEEP"', nested(MAX_JSON_DEPTH)))
    accepted = post_raw(client, CALLBACKS, batch.replace('"DEEP"', nested(MAX_JSON_DEPTH - 3)))

    assert_refused(refused, 400, "nested too deeply")
    assert accepted.status_code == 200
    assert len(enqueued) == 1


# What a toot publisher sends (toot.publisher.sending), the callback endpoint takes ---


def publisher_bodies(channel, events):
    """The bodies toot.publisher.sending builds from ``events`` for a batched subscriber."""
    url = "http://batched.example/toot/callbacks"
    store.add(channel, url, batch=True)
    _batch, lane = sending.fan_out([{"event": event} for event in events])[url]
    return [delivery.body for delivery in sending.plan(url, lane)]


def test_a_batch_a_toot_publisher_builds_near_the_body_limit_is_accepted(
    client, redis, enqueued, subscribed
):
    channel, _handler = subscribed
    events = batch_of(channel, 5, payload="")
    # Encoded compactly as the publisher sends them: five events of BATCH_MAX_BYTES - 4 bytes
    # in all, each far under MAX_EVENT_BYTES, so that publish() takes every one. With the
    # commas and the {"events":[...]} around them that is over the body limit (a batch once
    # came out 13 bytes over it: refused, retried, dead-lettered).
    padding = BATCH_MAX_BYTES - 4 - sum(len(wire_json(event)) for event in events)
    for index, event in enumerate(events):
        event["payload"] = "p" * (padding // 5 + (index < padding % 5))
        encoded(event)
    bodies = publisher_bodies(channel, events)

    responses = [post_raw(client, CALLBACKS, body) for body in bodies]

    assert [r.status_code for r in responses] == [200] * len(bodies), [len(b) for b in bodies]
    assert [job["id"] for job in enqueued] == ids_of(events)


# Known bugs (see each reason): strict, so that a fix makes them fail until unmarked.


def test_an_event_as_deep_as_publish_takes_is_accepted_in_a_batch(
    client, redis, enqueued, subscribed
):
    channel, _handler = subscribed
    event = wire_event(channel, payload=json.loads(nested(MAX_JSON_DEPTH - 1)))
    encoded(event)  # publish() takes it, and a single delivery of it is accepted
    assert post_json(client, CALLBACKS, event).status_code == 200
    [body] = publisher_bodies(channel, [event])

    response = post_raw(client, CALLBACKS, body)

    assert response.status_code == 200, response.content
    assert [job["id"] for job in enqueued] == [event["id"]] * 2


def test_an_event_over_max_event_bytes_is_refused_in_a_batch_too(client, enqueued, subscribed):
    channel, _handler = subscribed
    large = wire_event(channel, payload="p" * 4000)

    with override_settings(TOOT={**settings.TOOT, "MAX_EVENT_BYTES": 2048}):
        alone = post_json(client, CALLBACKS, large)
        batched = post_json(client, CALLBACKS, {"events": [wire_event(channel), large]})

    assert_refused(alone, 413, "larger than 2048 bytes")
    assert_refused(batched, 413, "larger than 2048 bytes")
    assert enqueued == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(b"\xed\xa0\x80", "not valid JSON", id="surrogate-written-out"),
        pytest.param(b"\\ud800", "lone surrogate", id="high"),
        pytest.param(b"\\uDFFF", "lone surrogate", id="low"),
        pytest.param(b"\\udc00\\ud800", "lone surrogate", id="reversed-pair"),
        pytest.param(b"\\ud83dx", "lone surrogate", id="high-then-other"),
        pytest.param(b"a\\u0000b", "NUL character", id="nul"),
    ],
)
@pytest.mark.parametrize("batched", [False, True], ids=["event", "batch"])
def test_text_no_database_stores_is_refused(client, enqueued, subscribed, batched, text, error):
    channel, _handler = subscribed
    event = json.dumps(wire_event(channel, payload="TEXT")).encode()
    body = b'{"events": [' + event + b"]}" if batched else event

    response = post_raw(client, CALLBACKS, body.replace(b"TEXT", text))

    assert_refused(response, 400, error)
    assert enqueued == []


def test_a_deep_body_with_an_escape_is_refused_for_its_depth(client, enqueued):
    # The check of the escapes walks the body: only once its depth is known to be safe.
    # Around Python's recursion limit, a body json.loads just read could fail to re-encode.
    depths = [MAX_JSON_DEPTH + 1, *range(850, 1050), 5000]
    bodies = ["[" * depth + '"\\ud83d\\ude00\\u0000"' + "]" * depth for depth in depths]

    statuses = {post_raw(client, CALLBACKS, body).status_code for body in bodies}

    assert statuses == {400}
    assert enqueued == []


def test_escaped_backslashes_before_u_are_not_escapes(client, enqueued, subscribed):
    channel, _handler = subscribed
    payload = "\\ud800 \\u0000"  # a backslash, then the letters: nothing to refuse
    body = json.dumps(wire_event(channel, payload=payload)).encode()

    response = post_raw(client, CALLBACKS, body)

    assert response.status_code == 200
    assert [job["payload"] for job in enqueued] == [payload]


def test_a_surrogate_pair_escape_is_the_character_it_encodes(client, enqueued, subscribed):
    channel, _handler = subscribed
    body = json.dumps(wire_event(channel, payload="\U0001f600")).encode()
    assert b"\\ud83d\\ude00" in body

    response = post_raw(client, CALLBACKS, body)

    assert response.status_code == 200
    assert [job["payload"] for job in enqueued] == ["\U0001f600"]


# Found by tests/test_fuzz.py -----------------------------------------------------------


def test_delete_with_more_query_fields_than_django_parses_answers_a_json_400(client, seeded, redis):
    # Past DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000) Django raises TooManyFieldsSent, which
    # it answers with an HTML page of its own.
    response = client.delete(f"{SUBSCRIPTIONS}?{'&'.join(['channel=x'] * 1001)}")

    assert_refused(response, 400, "too many query parameters")
    assert stored(redis) == seeded


def test_event_nested_about_as_deep_as_the_parser_reads_is_enqueued_or_refused(
    client, celery_worker, enqueued, subscribed
):
    """Just under the depth where json.loads gives up lies a depth it reads but that the
    broker's serializer, called deeper in the stack, cannot write: that was a 500. (And
    one the worker's deserializer could not read after a 200: the event lost. Such bodies
    are now past MAX_JSON_DEPTH.)"""
    channel, _handler = subscribed

    def post(depth):
        return post_raw(
            client, CALLBACKS, f'{{"channel": "{channel}", "payload": {nested(depth)}}}'
        )

    def parses(depth):
        response = post(depth)
        return response.status_code != 400 or response.json()["error"] != "body is not valid JSON"

    deepest, too_deep = 1, 5_000  # the deepest body the parser reads, found by bisection
    while too_deep - deepest > 1:
        middle = (deepest + too_deep) // 2
        deepest, too_deep = (middle, too_deep) if parses(middle) else (deepest, middle)

    for depth in range(deepest - 60, deepest + 1):
        before = len(enqueued)
        response = post(depth)
        if response.status_code == 200:
            assert len(enqueued) == before + 1
        else:
            assert_refused(response, 400, "nested too deeply")
            assert len(enqueued) == before


SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_unsigned_source_whose_prefix_extends_a_signed_ones_cannot_run_its_handlers(
    client, enqueued, subscribed
):
    channel, _handler = subscribed  # SOURCE_PREFIX + "users.<hex>.v1"
    sources = {
        "publisher": {**settings.TOOT["SOURCES"]["publisher"], "SECRET": SPEC_SECRET},
        # No secret, and the longest prefix of the handler's channel.
        "nested": {
            "SUBSCRIPTION_URL": "http://nested.example/toot/subscriptions",
            "CHANNEL_PREFIX": SOURCE_PREFIX + "users.",
        },
    }
    body = json.dumps(wire_event(channel)).encode()
    headers = signing.signature_headers("msg_1", body, [SPEC_SECRET])

    with override_settings(TOOT={**settings.TOOT, "SOURCES": sources}):
        unsigned = post_raw(client, CALLBACKS, body)
        signed = post_raw(client, CALLBACKS, body, headers=headers)

    assert_refused(unsigned, 401, "signature required")
    assert signed.status_code == 200
    assert [job["channel"] for job in enqueued] == [channel]


@pytest.mark.parametrize("path", [SUBSCRIPTIONS, CALLBACKS])
def test_body_nested_past_max_json_depth_is_refused_and_at_it_accepted(
    client, redis, enqueued, subscribed, path
):
    channel, _handler = subscribed
    if path == CALLBACKS:
        fields = f'"channel": "{channel}", "payload"'
    else:
        fields = f'"channel": "{OWN_PREFIX}deep.v1", "callback_url": "{CALLBACK_URL}", "x"'

    def body(depth):  # the object around the nested arrays is one level
        return f"{{{fields}: {nested(depth - 1)}}}"

    before = stored(redis)
    refused = post_raw(client, path, body(MAX_JSON_DEPTH + 1))
    assert stored(redis) == before
    accepted = post_raw(client, path, body(MAX_JSON_DEPTH))

    assert_refused(refused, 400, f"nested too deeply (over {MAX_JSON_DEPTH} levels)")
    assert accepted.status_code == (200 if path == CALLBACKS else 201)
    assert len(enqueued) == (1 if path == CALLBACKS else 0)


@pytest.mark.parametrize(
    "rate",
    [
        pytest.param("10", id="string"),
        pytest.param(True, id="true"),
        pytest.param(0, id="zero"),
        pytest.param(-5, id="negative"),
        pytest.param(100_001, id="over-the-maximum"),
        pytest.param([10], id="array"),
    ],
)
def test_a_rate_limit_that_is_not_a_positive_number_answers_422_and_changes_nothing(
    client, seeded, redis, rate
):
    body = {"channel": OWN_PREFIX + "new.v1", "callback_url": CALLBACK_URL, "rate_limit": rate}

    response = post_json(client, SUBSCRIPTIONS, body)

    assert_refused(response, 422, "rate_limit must be a number of events per second")
    assert stored(redis) == seeded


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "1e999"])
def test_a_rate_limit_json_cannot_hold_is_refused(client, seeded, redis, raw):
    body = with_new_subscription(f', "rate_limit": {raw}')

    assert_refused(post_raw(client, SUBSCRIPTIONS, body), 400, "body is not valid JSON")
    assert stored(redis) == seeded


def test_a_rate_limit_is_kept_for_the_callback_url(client, redis):
    body = {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL, "rate_limit": 2.5}

    assert post_json(client, SUBSCRIPTIONS, body).status_code == 201

    assert lanes.status([CALLBACK_URL])[0].rate == 2.5
