"""The two HTTP endpoints (PROTOCOL.md sections 1, 3 and 5), against the real Redis store,
the real Celery broker and, where a handler must run, a real worker.

Requests go through Django's test client with CSRF checks enforced, as a peer's POST
would arrive. What a request enqueues is read from Celery's own ``after_task_publish``
signal, which fires once the message is in the broker.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from unittest.mock import create_autospec
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from devtools.processes import free_port
from tests.utils import store_contents
from toot import Event, signing, store, subscribe
from toot.conf import conf
from toot.validation import MAX_JSON_DEPTH
from toot.views import MAX_SUBSCRIPTION_BYTES

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
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str)
    assert error_part in error


@pytest.fixture
def seeded(redis):
    """A store holding subscriptions on our prefix and another, and its contents."""
    store.add(OWN_PREFIX + "users.updated.v1", CALLBACK_URL)
    store.add(OWN_PREFIX + "users.updated.v1", "http://other.example/callbacks")
    store.add("org.example.other.orders.v1", CALLBACK_URL)
    return store_contents(redis)


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


# Subscriptions endpoint (section 1) ---------------------------------------------------


def test_post_new_subscription_answers_201_and_stores_it(client, redis):
    response = post_json(
        client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL}
    )

    assert response.status_code == 201
    assert store.callback_urls(OWN_PREFIX + "a.v1") == [CALLBACK_URL]


def test_post_existing_subscription_answers_204_and_keeps_one(client, redis):
    body = {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL}
    assert post_json(client, SUBSCRIPTIONS, body).status_code == 201

    response = post_json(client, SUBSCRIPTIONS, body)

    assert response.status_code == 204
    assert store.callback_urls(OWN_PREFIX + "a.v1") == [CALLBACK_URL]


def test_post_second_callback_url_to_a_channel_answers_201(client, redis):
    post_json(client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL})

    response = post_json(
        client,
        SUBSCRIPTIONS,
        {"channel": OWN_PREFIX + "a.v1", "callback_url": "http://b.example/cb"},
    )

    assert response.status_code == 201
    assert store.callback_urls(OWN_PREFIX + "a.v1") == ["http://b.example/cb", CALLBACK_URL]


def test_post_without_channel_answers_422(client, seeded, redis):
    response = post_json(client, SUBSCRIPTIONS, {"callback_url": CALLBACK_URL})

    assert_refused(response, 422, "channel required")
    assert store_contents(redis) == seeded


def test_post_without_callback_url_answers_422(client, seeded, redis):
    response = post_json(client, SUBSCRIPTIONS, {"channel": OWN_PREFIX + "a.v1"})

    assert_refused(response, 422, "callback_url required")
    assert store_contents(redis) == seeded


def test_post_of_longest_allowed_channel_and_url_is_stored(client, redis):
    channel = OWN_PREFIX + "c" * (255 - len(OWN_PREFIX))
    url = "https://subscriber.example/" + "u" * (2048 - len("https://subscriber.example/"))

    response = post_json(client, SUBSCRIPTIONS, {"channel": channel, "callback_url": url})

    assert response.status_code == 201
    assert store.callback_urls(channel) == [url]


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
    assert store.callback_urls(channel) == ["http://other.example/callbacks"]
    assert store.callback_urls("org.example.other.orders.v1") == [CALLBACK_URL]


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
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


def test_delete_reads_the_query_string_not_the_body(client, seeded, redis):
    body = {"channel": OWN_PREFIX + "users.updated.v1", "callback_url": CALLBACK_URL}

    response = client.delete(SUBSCRIPTIONS, json.dumps(body), content_type="application/json")

    assert_refused(response, 400, "channel and callback_url required")
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


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


@pytest.fixture
def unreachable_store():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with override_settings(TOOT={**settings.TOOT, "REDIS_URL": url}):
        yield


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
def test_unreachable_store_answers_503(client, unreachable_store, method, path, extra):
    body = (
        json.dumps({"channel": OWN_PREFIX + "a.v1", "callback_url": CALLBACK_URL})
        if method == "POST"
        else ""
    )

    response = client.generic(method, path, body, content_type="application/json", **extra)

    assert_refused(response, 503, "unavailable")


# Bad input, as an attacker sends it (section 5) ----------------------------------------

NEW_SUBSCRIPTION = f'"channel": "{OWN_PREFIX}new.v1", "callback_url": "{CALLBACK_URL}"'
DEEP = 100_000


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
    # 5,000 levels: as deep as fits in a registration's 16 KiB, far past the parser's limit.
    pytest.param(nested(5_000).encode(), 400, "not valid JSON", id="deep-array"),
    pytest.param(
        with_new_subscription(f', "x": {nested(5_000)}'), 400, "not valid JSON", id="deep-field"
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
    assert store_contents(redis) == seeded
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
    pytest.param({**VALID, "channel": OWN_PREFIX + "a\x00"}, "printable ASCII", id="channel-nul"),
    pytest.param({**VALID, "channel": OWN_PREFIX + "a\x7f"}, "printable ASCII", id="channel-del"),
    pytest.param(
        {**VALID, "channel": OWN_PREFIX + "caf\u00e9"}, "printable ASCII", id="channel-non-ascii"
    ),
    pytest.param(
        {**VALID, "channel": OWN_PREFIX + "\ud800"}, "printable ASCII", id="channel-surrogate"
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
    pytest.param(
        {**VALID, "callback_url": "http://subscriber.example/\x00"}, "control", id="url-nul"
    ),
    pytest.param(
        {**VALID, "callback_url": "http://subscriber.example/\ud800"},
        "surrogate",
        id="url-surrogate",
    ),
]


@pytest.mark.parametrize(("data", "error"), BAD_SUBSCRIPTION_FIELDS)
def test_bad_subscription_field_answers_422(client, seeded, redis, data, error):
    response = post_json(client, SUBSCRIPTIONS, data)

    assert_refused(response, 422, error)
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


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
    assert store_contents(redis) == seeded


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
    return {SUBSCRIPTIONS: MAX_SUBSCRIPTION_BYTES, CALLBACKS: conf.MAX_EVENT_BYTES}


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
    assert store_contents(redis) == seeded
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
    assert store_contents(redis) == seeded
    assert enqueued == []


def test_a_body_longer_than_its_content_length_is_still_bounded(rf):
    """Under ASGI a chunked body has no Content-Length; the read itself is bounded too."""
    from toot.views import Refused, read_json

    request = rf.post("/toot/callbacks", data=b"x" * 2048, content_type="application/json")
    del request.META["CONTENT_LENGTH"]

    with pytest.raises(Refused) as refused:
        read_json(request, 1024)
    assert refused.value.status == 413


# Found by tests/test_fuzz.py -----------------------------------------------------------


def test_delete_with_more_query_fields_than_django_parses_answers_a_json_400(client, seeded, redis):
    # Past DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000) Django raises TooManyFieldsSent, which
    # it answers with an HTML page of its own.
    response = client.delete(f"{SUBSCRIPTIONS}?{'&'.join(['channel=x'] * 1001)}")

    assert_refused(response, 400, "too many query parameters")
    assert store_contents(redis) == seeded


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

    before = store_contents(redis)
    refused = post_raw(client, path, body(MAX_JSON_DEPTH + 1))
    assert store_contents(redis) == before
    accepted = post_raw(client, path, body(MAX_JSON_DEPTH))

    assert_refused(refused, 400, f"nested too deeply (over {MAX_JSON_DEPTH} levels)")
    assert accepted.status_code == (200 if path == CALLBACKS else 201)
    assert len(enqueued) == (1 if path == CALLBACKS else 0)
