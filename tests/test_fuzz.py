"""Generated requests against both endpoints (issue 4, item 5), with Hypothesis.

Bodies (arbitrary bytes, JSON-ish values with the protocol's field names, near-valid
events and registrations with one field mutated, deep nesting, padding around the size
limits), headers (Content-Type, lying Content-Length, Accept, Authorization, the
Standard Webhooks headers, random ones), query strings and methods are sent through
Django's test client with CSRF checks enforced and Django's default middleware, against
the real Redis store and queues and the real Celery broker. What must hold, whatever
arrives:

1. no 5xx: every answer is a 2xx or 4xx the protocol lists, every 4xx a JSON
   ``{"error": "..."}``;
2. a refused request changes nothing in the store (every key under ``KEY_PREFIX`` but the
   work queues) and pushes nothing onto a queue; an accepted one changes exactly what it
   says it did, and a callback's 200 has queued every event of the body, in order, in one
   push (a batch is all or none: docs/protocol.md section 7);
3. when the source has a signing secret, no event that is not signed with it is enqueued
   or reaches a handler (judged by the ``standardwebhooks`` package, not by toot's code);
4. with bearer tokens, no request without one changes the store or learns anything.

Profiles: ``ci`` (the default: 200 derandomized examples per test, so that CI is
deterministic and quick) and ``deep`` (5,000 random examples per test), chosen with
``HYPOTHESIS_PROFILE=deep python -m pytest tests/test_fuzz.py``. A failure prints the
falsifying request; pin it in tests/test_views.py as a plain regression test.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import socket
import string
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest.mock import create_autospec
from urllib.parse import quote, urlencode

import hypothesis
import pytest
import standardwebhooks
from django.conf import settings
from django.test import Client, override_settings
from django.utils.http import parse_header_parameters
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.utils import addrinfo
from toot import subscribe
from toot.engine import queue
from toot.protocol import signing
from toot.protocol.events import BATCH_MAX_BYTES, Event
from toot.protocol.validation import MAX_JSON_DEPTH
from toot.publisher import store
from toot.subscriber import handling
from toot.views import MAX_SUBSCRIPTION_BYTES

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

hypothesis.settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,  # a request, Redis round trips and sometimes a broker publish
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,  # and writes no example database into the checkout
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the fixtures hold for every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
hypothesis.settings.register_profile(
    "deep", hypothesis.settings.get_profile("ci"), max_examples=5000, derandomize=False
)
FUZZ = hypothesis.settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SUBSCRIPTIONS = "/toot/subscriptions"
CALLBACKS = "/toot/callbacks"
KEY_PREFIX = settings.TOOT["KEY_PREFIX"]
STORE_BASE = f"{KEY_PREFIX}subscriptions:{{{KEY_PREFIX}out}}:"
CHANNEL_KEY_PREFIX = f"{STORE_BASE}urls:".encode()
BATCH_KEY_PREFIX = f"{STORE_BASE}batch:".encode()
QUEUE_KEY_PREFIX = f"{KEY_PREFIX}queue:".encode()
INDEX_KEY = f"{STORE_BASE}channels".encode()
OWN_PREFIX = settings.TOOT["CHANNEL_PREFIX"]  # this app as a publisher
SOURCE_PREFIX = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]  # a source it follows
CALLBACK_URL = "http://subscriber.example/toot/callbacks"
SEEDED = [
    (OWN_PREFIX + "users.updated.v1", CALLBACK_URL),
    (OWN_PREFIX + "users.updated.v1", "http://other.example/callbacks"),
    ("org.example.other.orders.v1", CALLBACK_URL),
]
# The channel a local handler listens on. Fixed, so that the derandomized examples are
# the same on every run; no other test subscribes to it.
SUBSCRIBED_SUFFIX = "fuzz.subscribed.v1"
SUBSCRIBED = SOURCE_PREFIX + SUBSCRIBED_SUFFIX
# Small, so that generated bodies reach it cheaply.
MAX_EVENT_BYTES = 4096


def whsec(seed: str) -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


SECRET = whsec("the publisher's secret")
OLD_SECRET = whsec("the publisher's previous secret")
WRONG_SECRET = whsec("an attacker's guess")
TOKENS = ("fuzz-token-A1b2C3", "fuzz-token-Z9y8X7")

# Django's default project middleware (startproject), CSRF included.
PROJECT_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

SUBSCRIPTION_STATUSES = {200, 201, 204, 400, 401, 404, 405, 406, 413, 422}
CALLBACK_STATUSES = {200, 400, 401, 405, 413, 422}


# Strategies -----------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """``one_of`` with weights (it draws each branch about as often as the others)."""
    branches = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(branches).flatmap(lambda strategy: strategy)


TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"  # an HTTP token's characters
PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))  # what a channel or an id may hold

# Any code point, lone surrogates included (JSON's "\ud800" escape yields one).
any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=30)
# What a header value can be: WSGI servers decode header bytes as latin-1.
latin1_text = st.text(st.characters(max_codepoint=0xFF), max_size=30)
printable_word = st.text(st.sampled_from(PRINTABLE), min_size=1, max_size=24)

channels = st.one_of(
    st.sampled_from(
        [
            SUBSCRIBED,
            SOURCE_PREFIX + "nobody.listens.v1",
            SEEDED[0][0],
            SEEDED[2][0],
            OWN_PREFIX + "new.v1",
            OWN_PREFIX,
            SOURCE_PREFIX.rstrip("."),
            "",
            " ",
        ]
    ),
    st.builds(
        str.__add__,
        st.sampled_from([OWN_PREFIX, SOURCE_PREFIX, "org.example.", ""]),
        st.one_of(printable_word, any_text),
    ),
    # Around the 255-character limit.
    st.builds(
        lambda prefix, size: prefix + "c" * (size - len(prefix)),
        st.sampled_from([OWN_PREFIX, SOURCE_PREFIX]),
        st.integers(250, 260),
    ),
)


def make_url(scheme: str, userinfo: str, host: str, port: str, path: str) -> str:
    return f"{scheme}://{userinfo}{host}{port}{path}"


hosts = st.one_of(
    st.sampled_from(
        [
            "subscriber.example",
            "other.example",
            "SUBSCRIBER.EXAMPLE.",
            "localhost",
            "testserver",
            "127.0.0.1",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "0",
            "2130706433",
            "[::ffff:10.0.0.1]",
            "[::ffff:169.254.169.254]",
            "[64:ff9b::a9fe:a9fe]",
            "[2002:a9fe:a9fe::1]",
            "[fe80::1%25eth0]",
            "[::1",
            "hooks.fuzz.test",
            "metadata.fuzz.test",
            "xn--nxasmq6b.test",
            "\u00e9v\u00e9nements.test",
            "a" * 64 + ".test",
            "",
        ]
    ),
    printable_word,
    any_text,
)
urls = st.one_of(
    st.sampled_from(
        [CALLBACK_URL, "http://other.example/callbacks", "https://hooks.fuzz.test/toot/callbacks"]
    ),
    st.builds(
        make_url,
        st.sampled_from(["http", "https", "HTTPS", "ftp", "file", "gopher", "javascript", ""]),
        st.sampled_from(["", "", "user@", "user:secret@", ":secret@", "@"]),
        hosts,
        st.sampled_from(["", "", ":0", ":443", ":8000", ":65535", ":65536", ":-1", ":x", ":"]),
        st.one_of(st.just("/toot/callbacks"), any_text.map("/".__add__)),
    ),
    any_text,
    # Around the 2,048-character limit.
    st.integers(2040, 2060).map(lambda size: "https://subscriber.example/" + "u" * (size - 27)),
)

GOOD_TIMESTAMPS = [
    "2015-10-23 11:50:09 -0500",
    "2015-10-23T11:50:09.000-05:00",
    "2015-10-23T16:50:09Z",
    "2015-10-23T16:50:09",
]
utc_offsets = st.integers(-1439, 1439).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)
timestamps = st.one_of(
    st.sampled_from(
        [
            *GOOD_TIMESTAMPS,
            "",
            "yesterday",
            "2015-13-01T00:00:00Z",
            "2015-10-23 11:50:09 +9900",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "2015-10-23T11:50:09.123456789123+05:00",
        ]
    ),
    st.builds(
        lambda when, form: when.strftime("%Y-%m-%d %H:%M:%S %z") if form else when.isoformat(),
        st.datetimes(timezones=utc_offsets),
        st.booleans(),
    ),
    any_text,
)
event_ids = st.one_of(
    st.uuids().map(str),
    printable_word,
    st.integers(250, 260).map(lambda size: "i" * size),
    any_text,
)

FIELDS = ["channel", "callback_url", "id", "timestamp", "payload", "events", "batch"]


def json_values(finite: bool) -> st.SearchStrategy[Any]:
    """JSON-ish values: the protocol's field names and values mixed with anything."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=not finite, allow_infinity=not finite),
        any_text,
        channels,
        urls,
        timestamps,
        event_ids,
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), children, max_size=5),
        ),
        max_leaves=12,
    )


anything = json_values(finite=False)  # NaN and Infinity too, which toot refuses
payloads = json_values(finite=True)

valid_events = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str),
        "timestamp": st.sampled_from(GOOD_TIMESTAMPS),
        "payload": payloads,
        "channel": st.just(SUBSCRIBED),
    }
)
valid_subscriptions = st.fixed_dictionaries(
    {
        "channel": st.one_of(
            st.sampled_from([channel for channel, _url in SEEDED]),
            printable_word.map(OWN_PREFIX.__add__),
        ),
        "callback_url": st.sampled_from(
            [url for _channel, url in SEEDED] + ["https://hooks.fuzz.test/cb", "http://a.example/"]
        ),
    },
    optional={"batch": st.booleans()},
)


@st.composite
def near_valid(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid body with one field removed, replaced by anything, or one key added."""
    data = dict(draw(valid))
    key = draw(st.sampled_from(FIELDS))
    action = draw(st.sampled_from(["delete", "replace", "replace-text", "add"]))
    if action == "delete":
        data.pop(key, None)
    elif action == "replace":
        data[key] = draw(anything)
    elif action == "replace-text":
        data[key] = draw(st.one_of(channels, urls, timestamps, event_ids))
    else:
        data[draw(any_text)] = draw(anything)
    return data


batches = st.fixed_dictionaries(
    {"events": st.lists(st.one_of(valid_events, near_valid(valid_events), anything), max_size=4)},
    optional={"channel": channels, "id": event_ids},
)


def each_fits(events: list[Any], limit: int) -> bool:
    """Whether every event is within ``limit`` bytes however it is measured: as the body
    holds it, or ASCII-escaped as a publisher sends it."""
    return all(
        max(
            len(json.dumps(event)),
            len(json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        )
        <= limit
        for event in events
    )


def well_formed(body: bytes) -> bool:
    """Whether the JSON ``body`` is text a database stores: UTF-8, as JSON must be, with no
    lone surrogate, written out (not UTF-8) or escaped (not text once read), and no NUL
    (which PostgreSQL's jsonb refuses)."""
    try:
        data = json.loads(body.decode("utf-8"))
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        return False
    return not any("\x00" in string for string in strings_in(data))


def strings_in(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from strings_in(value)
    elif isinstance(data, list):
        for value in data:
            yield from strings_in(value)


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """JSON bytes, ASCII-escaped or not; a lone surrogate unescaped is invalid UTF-8."""
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deep(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]], key: str) -> bytes:
    """A valid body whose ``key`` is nested deep (the parser's own limit has a test below)."""
    depth = draw(st.integers(0, 3000))
    text = json.dumps({**draw(valid), key: "DEEP"})
    return text.replace('"DEEP"', "[" * depth + "]" * depth).encode()


@st.composite
def padded(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]], limit: int) -> bytes:
    """A valid body grown to a few bytes either side of ``limit``."""
    text = json.dumps({**draw(valid), "pad": ""})
    size = draw(st.integers(limit - 8, limit + 8))
    return text.replace('"pad": ""', '"pad": "' + "p" * max(0, size - len(text)) + '"').encode()


@st.composite
def mangled(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """Valid bytes with one byte changed, inserted or removed, or cut short."""
    body = bytearray(draw(bodies))
    at = draw(st.integers(0, len(body)))
    action = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
    byte = draw(st.integers(0, 255))
    if action == "set" and at < len(body):
        body[at] = byte
    elif action == "insert":
        body.insert(at, byte)
    elif action == "delete" and at < len(body):
        del body[at]
    else:
        del body[at:]
    return bytes(body)


def bodies(valid: st.SearchStrategy[dict[str, Any]], limit: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        encoded(anything),
        encoded(valid),
        encoded(near_valid(valid)),
        encoded(batches),
        deep(valid, "payload"),
        mangled(encoded(valid)),
        padded(valid, limit),
    )


subscription_bodies = bodies(valid_subscriptions, MAX_SUBSCRIPTION_BYTES)
callback_bodies = bodies(valid_events, MAX_EVENT_BYTES)


def django_reads(content_type: str) -> bool:
    """Whether Django can build a request with this Content-Type at all.

    Django's WSGIRequest parses the header before any view or middleware runs and raises
    for an RFC 2231 parameter with an unknown encoding or a charset holding NUL: a 500 of
    Django's own (every view of every project) that toot cannot answer. Left out here.
    """
    try:
        _type, params = parse_header_parameters(content_type)
        if "charset" in params:
            with contextlib.suppress(LookupError):  # Django ignores an unknown charset
                codecs.lookup(params["charset"])
    except Exception:
        return False
    return True


def django_builds(request_headers: Mapping[str, str], query_string: bytes) -> bool:
    """Whether Django can build this request at all (see django_reads).

    A known charset in Content-Type makes WSGIRequest re-parse the query string while it
    is being built, and more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS then raise
    TooManyFieldsSent out of the constructor: again Django's own 500, before any view.
    """
    content_type = next(
        (value for name, value in request_headers.items() if name.lower() == "content-type"),
        "application/json",
    )
    _type, params = parse_header_parameters(content_type)
    try:
        known_charset = "charset" in params and bool(codecs.lookup(params["charset"]))
    except LookupError:
        known_charset = False
    too_many_fields = query_string.count(b"&") >= settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    return not (known_charset and too_many_fields)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


HEADER_VALUES: dict[str, st.SearchStrategy[str]] = {
    "Content-Type": st.one_of(
        st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "application/json; charset=latin-1",
                "application/json; charset=nope",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=----fuzz",
                "",
            ]
        ),
        latin1_text,
    ).filter(django_reads),
    "Content-Length": st.one_of(
        st.sampled_from(
            ["0", "-1", "", " ", "abc", "1e3", "0x10", "+5", "1_0", " 7 ", "\u00b2", str(10**12)]
        ),
        st.integers(-10, 20_000).map(str),
        st.integers(20, 5000).map(lambda digits: "9" * digits),  # past int()'s 4,300 digits
        latin1_text,
    ),
    "Accept": st.one_of(
        st.sampled_from(
            [
                "application/json",
                "*/*",
                "text/html",
                "application/json;q=0",
                "text/html, application/json;q=0.9",
                "APPLICATION/JSON",
                "",
            ]
        ),
        latin1_text,
    ),
    "Authorization": st.one_of(
        st.sampled_from(["Bearer ", "Bearer", "Basic dXNlcjpwdw==", "bearer x y", ""]),
        st.builds("Bearer {}".format, st.one_of(printable_word, latin1_text)),
        latin1_text,
    ),
    "webhook-id": event_ids.filter(lambda text: max(text, default="\0") <= "\xff"),
    "webhook-timestamp": st.one_of(
        st.integers(-(10**13), 10**13).map(str), st.sampled_from(["", "0", "1e9"]), latin1_text
    ),
    "webhook-signature": st.one_of(
        latin1_text,
        st.lists(
            st.builds(
                "{},{}".format,
                st.sampled_from(["v1", "v1", "v2", "v1a", "V1", ""]),
                st.one_of(st.binary(min_size=32, max_size=32).map(b64), latin1_text),
            ),
            max_size=40,
        ).map(" ".join),
    ),
    "X-Toot-Unsubscribe": st.just("True"),
}
header_names = st.one_of(
    st.sampled_from(sorted(HEADER_VALUES)),
    st.text(st.sampled_from(TCHAR), min_size=1, max_size=16).map("X-".__add__),
)


@st.composite
def headers(draw: st.DrawFn, names: Iterable[str] | None = None) -> dict[str, str]:
    """Some headers, their names in any case, values typed by name or anything."""
    chosen = draw(st.lists(header_names, max_size=6, unique_by=str.lower))
    if names is not None:
        chosen = [name for name in chosen if name in names]
    result = {}
    for name in chosen:
        values = HEADER_VALUES.get(name, latin1_text)
        spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
        result[spelled] = draw(values)
    return result


REAL_METHODS = ["GET", "POST", "DELETE"]
OTHER_METHODS = [
    "HEAD",
    "OPTIONS",
    "PUT",
    "PATCH",
    "TRACE",
    "CONNECT",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "LOCK",
    "QUERY",
    "get",
    "post",
    "delete",
    "Post",
]
methods = weighted(
    (6, st.sampled_from(REAL_METHODS)),
    (3, st.sampled_from(OTHER_METHODS)),
    (1, st.text(st.sampled_from(TCHAR), min_size=1, max_size=12)),
)


def query(pairs: list[tuple[str, str]]) -> bytes:
    """A query string as a client sends it: percent-encoded UTF-8, surrogates escaped."""
    return urlencode(pairs, quote_via=quote, errors="surrogatepass").encode("ascii")


queries = st.one_of(
    st.just(b""),
    # The seeded subscriptions, and near misses of them.
    st.sampled_from(SEEDED).map(
        lambda pair: query([("channel", pair[0]), ("callback_url", pair[1])])
    ),
    st.tuples(st.sampled_from(SEEDED), st.sampled_from(["channel", "callback_url"]), any_text).map(
        lambda args: query(
            [("channel", args[0][0]), ("callback_url", args[0][1]), (args[1], args[2])]
        )
    ),
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(["channel", "callback_url"]), any_text),
            st.one_of(channels, urls, any_text),
        ),
        max_size=4,
    ).map(query),
    st.binary(max_size=200),  # raw bytes, as a server passes them on
    any_text.map(lambda text: text.encode("utf-8", "surrogatepass")),  # unescaped
    st.integers(0, 10_000).map(
        lambda size: query([("channel", "c" * size), ("callback_url", "u")])
    ),
    st.integers(900, 1100).map(lambda count: b"&".join([b"channel=x"] * count)),  # many fields
)


# Sending and checking -------------------------------------------------------------------


def send(
    client: Client,
    method: str,
    path: str,
    body: bytes = b"",
    request_headers: Mapping[str, str] | None = None,
    query_string: bytes = b"",
) -> Response:
    """One request. The body is read from a stream as a server gives it, so that a lying
    Content-Length makes a short read rather than trip the test client's own assertion."""
    hypothesis.assume(django_builds(request_headers or {}, query_string))
    environ: dict[str, Any] = {
        "QUERY_STRING": query_string.decode("latin-1"),
        "wsgi.input": io.BytesIO(body),
    }
    return client.generic(
        method,
        path,
        body,
        content_type="application/json",
        headers=dict(request_headers or {}),
        **environ,
    )


def check_answer(response: Response, method: str, statuses: set[int]) -> None:
    """Invariant 1: a status the protocol lists, never a 5xx; a 4xx is a JSON error."""
    status = response.status_code
    hypothesis.event("status", status)  # see --hypothesis-show-statistics
    assert status < 500, (status, response.content[:300])
    assert status in statuses, (status, response.content[:300])
    if status >= 400 and method != "HEAD":  # the answer to HEAD has no body
        assert response["Content-Type"] == "application/json", response.content[:300]
        error = json.loads(response.content)["error"]
        assert isinstance(error, str) and error


Snapshot = dict[bytes, tuple[bytes, Any]]


def snapshot(redis: Any) -> Snapshot:
    """Every key under KEY_PREFIX with its type and contents."""
    keys = sorted(redis.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = pipe.execute()
    readers: dict[bytes, Callable[[Any, bytes], Any]] = {
        b"set": lambda pipe, key: pipe.smembers(key),
        b"string": lambda pipe, key: pipe.get(key),
        b"hash": lambda pipe, key: pipe.hgetall(key),
        b"zset": lambda pipe, key: pipe.zrange(key, 0, -1, withscores=True),
        b"list": lambda pipe, key: pipe.lrange(key, 0, -1),
    }
    with redis.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds, strict=True):
            readers.get(kind, lambda pipe, key: pipe.exists(key))(pipe, key)
        values = pipe.execute()
    return {key: (kind, value) for key, kind, value in zip(keys, kinds, values, strict=True)}


def store_snapshot(redis: Any) -> Snapshot:
    """The snapshot of every key but the work queues, the publisher's lanes and the
    handlers' dedupe keys, which the worker writes in the background whatever the request
    at hand. What a request pushes onto a queue, the ``pushed`` fixture sees."""
    work = (QUEUE_KEY_PREFIX, f"{KEY_PREFIX}handled:".encode(), f"{KEY_PREFIX}lanes:".encode())
    return {key: value for key, value in snapshot(redis).items() if not key.startswith(work)}


def members(state: Snapshot) -> set[tuple[bytes, bytes]]:
    """The (key, member) pairs of the subscription sets and the channel index."""
    return {
        (key, member)
        for key, (kind, value) in state.items()
        if kind == b"set" and not key.startswith(BATCH_KEY_PREFIX)
        for member in value
    }


def flags(state: Snapshot) -> set[tuple[bytes, bytes]]:
    """The (channel, callback URL) pairs that asked for batches."""
    return {
        (key[len(BATCH_KEY_PREFIX) :], member)
        for key, (kind, value) in state.items()
        if kind == b"set" and key.startswith(BATCH_KEY_PREFIX)
        for member in value
    }


def check_store_change(response: Response, method: str, before: Snapshot, after: Snapshot) -> None:
    """Invariant 2 on the subscriptions endpoint: refusals change nothing, and an accepted
    request changes exactly the one subscription it names, and its batch flag."""
    status = response.status_code
    added, removed = members(after) - members(before), members(before) - members(after)
    flipped = flags(after) ^ flags(before)
    if method.upper() == "POST" and status in (201, 204):
        # One callback URL added to one channel (and the channel indexed), or already there;
        # either way its batch flag is now what the body asked for.
        data = json.loads(response.wsgi_request.body)
        channel, url = data["channel"].encode(), data["callback_url"].encode()
        key = CHANNEL_KEY_PREFIX + channel
        if status == 201:
            assert added - {(INDEX_KEY, channel)} == {(key, url)}, (added, removed)
            assert (INDEX_KEY, channel) in members(after)
        else:
            assert (key, url) in members(before) and not added, (added, removed)
        assert not removed, removed
        assert flipped <= {(channel, url)}, flipped
        assert ((channel, url) in flags(after)) is data.get("batch", False), data
    elif status == 204 and method.upper() == "DELETE":  # one removed (and unindexed if last)
        subscription = {pair for pair in removed if pair[0] != INDEX_KEY}
        assert len(subscription) == 1 and not added, (added, removed)
        [(key, url)] = subscription
        channel = key[len(CHANNEL_KEY_PREFIX) :]
        assert removed - subscription <= {(INDEX_KEY, channel)}
        if key not in after:  # the channel's last subscription
            assert (INDEX_KEY, channel) not in members(after)
        # Its batch flag, if it had one, went with it.
        assert flipped <= {(channel, url)} and (channel, url) not in flags(after), flipped
    else:  # a refusal or a listing
        assert after == before, (status, response.content[:300])


def check_listing(response: Response, state: Snapshot) -> None:
    """A GET's 200 lists exactly the store's channels under our prefix."""
    listing = json.loads(response.content)
    expected = {
        key[len(CHANNEL_KEY_PREFIX) :].decode(): sorted(url.decode() for url in value)
        for key, (kind, value) in state.items()
        if key.startswith(CHANNEL_KEY_PREFIX) and kind == b"set" and value
    }
    expected = {
        channel: urls for channel, urls in expected.items() if channel.startswith(OWN_PREFIX)
    }
    assert listing == {"channels": sorted(expected), "subscriptions": expected}


# Fixtures -------------------------------------------------------------------------------

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
# What a name resolves to, chosen by its hash: public, mixed, private, metadata, none.
ANSWERS: list[list[str] | None] = [
    [PUBLIC_V4],
    [PUBLIC_V6, PUBLIC_V4],
    [PUBLIC_V4, "10.0.0.7"],
    ["169.254.169.254"],
    ["127.0.0.1"],
    None,
]


@pytest.fixture
def offline_dns(monkeypatch):
    """A resolver that never goes to the network: generated callback URLs name random hosts.

    Address literals and localhost resolve as usual (Redis is reached that way); any other
    name gets a fixed answer chosen by its hash. No temporary failure (EAI_AGAIN), which the
    endpoint rightly answers with 503.
    """
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        try:
            return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        name = host.decode() if isinstance(host, bytes) else host
        if name.lower().rstrip(".") == "localhost":
            return real(host, port, family, type, proto, flags)
        name.encode("idna")  # raises UnicodeError for a bad name, as the real call does
        answer = ANSWERS[zlib.crc32(name.lower().encode()) % len(ANSWERS)]
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return addrinfo(answer, port)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def pushed(monkeypatch):
    """Every push onto a toot queue from the test's thread (not the worker's), as (queue,
    items), recorded once Redis took it. A spy: each push still goes to Redis."""
    records: list[tuple[str, list[dict[str, Any]]]] = []
    thread = threading.get_ident()
    real_push, real_push_many = queue.push_encoded, queue.push_many

    def push_encoded(name, items):
        drain_id = real_push(name, items)
        if threading.get_ident() == thread:
            records.append((name, [json.loads(item) for item in items]))
        return drain_id

    def push_many(pushes):
        drains = real_push_many(pushes)
        if threading.get_ident() == thread:
            records.extend(
                (name, [json.loads(item) for item in items]) for name, items in pushes.items()
            )
        return drains

    monkeypatch.setattr(queue, "push_encoded", push_encoded)
    monkeypatch.setattr(queue, "push_many", push_many)
    return records


def toot_settings(**options: Any) -> override_settings:
    return override_settings(
        MIDDLEWARE=PROJECT_MIDDLEWARE,
        TOOT={**settings.TOOT, "MAX_EVENT_BYTES": MAX_EVENT_BYTES, **options},
    )


def seed() -> None:
    for channel, url in SEEDED:
        store.add(channel, url)


def on_event(event: Event) -> None:
    """The shape of a handler; the handler here is an autospec of it."""


class Subscriber:
    """The handler on SUBSCRIBED, and every event this test enqueued for it.

    Not a dataclass: Hypothesis prints a failing example's arguments, and would print
    every enqueued event, however deep, field by field.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.enqueued: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"<Subscriber: {len(self.enqueued)} events enqueued>"

    def handled_ids(self) -> set[str]:
        """The ids of the events the handler was called with, by the worker."""
        return {call.args[0].id for call in self.handler.call_args_list}

    def drain(self, eventually: Any) -> None:
        """Wait until the worker has handled every enqueued event, so that nothing of this
        test is still writing when the next test looks at the store."""
        names = list(handling.handlers_by_name(SUBSCRIBED))
        events = [Event.from_dict(event) for event in self.enqueued]

        def done() -> bool:
            return all(
                handling.state(event, name) == handling.DONE for event in events for name in names
            )

        eventually(done, what="the worker to handle every enqueued event")


@pytest.fixture
def subscriber(celery_worker, redis, eventually):
    """A handler on SUBSCRIBED, run by a real worker; drained at the end of the test."""
    handler = create_autospec(on_event)
    subscribe("publisher", SUBSCRIBED_SUFFIX, handler)
    result = Subscriber(handler)
    yield result
    result.drain(eventually)
    # The worker's side: the handler ran for the events the test saw enqueued, no other.
    assert result.handled_ids() == {event["id"] for event in result.enqueued}


def queued_events(records: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The events of one request's pushes: onto the one handler's lane of the ``in`` queue
    only, in one push."""
    assert len(records) <= 1 and all(queue.kind(name) == queue.IN for name, _ in records), records
    return [item["event"] for _name, items in records for item in items]


def sent_events(response: Response) -> list[Any]:
    """The events of the body as the endpoint read it: one, or a batch's."""
    data = json.loads(response.wsgi_request.body)
    return data["events"] if isinstance(data, dict) and "events" in data else [data]


def check_queued(response: Response, jobs: list[dict[str, Any]]) -> None:
    """Invariant 2 on the callback endpoint: a 200 without X-Toot-Unsubscribe has queued
    every event of the body, in order (made-up ids aside), for the subscribed channel; any
    other answer, none."""
    if response.status_code != 200 or "X-Toot-Unsubscribe" in response:
        assert jobs == [], (response.status_code, jobs)
        return
    sent = sent_events(response)
    assert 1 <= len(jobs) == len(sent), (len(jobs), len(sent))
    for job, event in zip(jobs, sent, strict=True):
        assert job["channel"] == event["channel"] == SUBSCRIBED
        if event.get("id") is not None:
            assert job["id"] == event["id"]
        assert job["payload"] == event.get("payload")


# Subscriptions endpoint -----------------------------------------------------------------


@FUZZ
@given(
    method=methods,
    body=subscription_bodies,
    request_headers=headers(),
    accept_json=st.booleans(),
    query_string=queries,
)
def test_subscriptions_endpoint_answers_anything_and_refusals_change_nothing(
    client, redis, offline_dns, pushed, method, body, request_headers, accept_json, query_string
):
    if accept_json:  # else a GET almost never lists
        request_headers = {"Accept": "application/json", **request_headers}
    with toot_settings():
        seed()
        before = store_snapshot(redis)

        response = send(client, method, SUBSCRIPTIONS, body, request_headers, query_string)

        after = store_snapshot(redis)
    check_answer(response, method, SUBSCRIPTION_STATUSES)
    check_store_change(response, method, before, after)
    if response.status_code == 200:
        check_listing(response, after)
    assert pushed == []


@FUZZ
@given(
    body=st.one_of(subscription_bodies, encoded(valid_subscriptions)),
    request_headers=headers(["Content-Type", "Content-Length", "Accept"]),
)
def test_registration_bodies_are_stored_or_refused_whole(
    client, redis, offline_dns, pushed, body, request_headers
):
    with toot_settings():
        seed()
        before = store_snapshot(redis)

        response = send(client, "POST", SUBSCRIPTIONS, body, request_headers)

        after = store_snapshot(redis)
    check_answer(response, "POST", {201, 204, 400, 413, 422})
    check_store_change(response, "POST", before, after)
    assert pushed == []


@FUZZ
@given(query_string=queries, request_headers=headers(["Accept", "Content-Length"]))
def test_removals_take_out_one_subscription_or_nothing(
    client, redis, offline_dns, pushed, query_string, request_headers
):
    with toot_settings():
        seed()
        before = store_snapshot(redis)

        response = send(client, "DELETE", SUBSCRIPTIONS, b"", request_headers, query_string)

        after = store_snapshot(redis)
    check_answer(response, "DELETE", {204, 400, 404, 422})
    check_store_change(response, "DELETE", before, after)
    assert pushed == []


def carries_a_token(authorization: str | None) -> bool:
    """Whether a header holds "Bearer" and an accepted token as its first two words.

    Looser than toot, on purpose: what toot accepts must pass this, never the reverse.
    """
    words = (authorization or "").split()
    return len(words) >= 2 and words[0].lower() == "bearer" and words[1] in TOKENS


@st.composite
def authorizations(draw: st.DrawFn) -> str | None:
    """None, garbage, near misses of a token, and the tokens in various spellings."""
    token = draw(st.sampled_from(TOKENS))
    near_miss = st.one_of(
        st.just(token[:-1]),
        st.just(token + "x"),
        st.just(token.upper()),
        st.just(token.swapcase()),
        st.just(token[1:]),
        st.just(" ".join(TOKENS)),
        st.just(b64(token.encode())),
        st.integers(0, len(token) - 1).map(
            lambda at: token[:at] + chr(ord(token[at]) ^ 1) + token[at + 1 :]
        ),
        printable_word,
    )
    return draw(  # type: ignore[no-any-return]
        weighted(
            (1, st.none()),
            (1, HEADER_VALUES["Authorization"]),
            (2, near_miss.map("Bearer {}".format)),
            (
                2,
                st.sampled_from(["Bearer", "bearer", "BEARER", "Token", "Basic", ""]).map(
                    lambda scheme: f"{scheme} {token}"
                ),
            ),
            (
                1,
                st.sampled_from(
                    [
                        f"Bearer  {token}",
                        f" Bearer {token} ",
                        f"Bearer\t{token}",
                        f"Bearer {token} x",
                        token,
                    ]
                ),
            ),
            (2, st.just(f"Bearer {token}")),  # the control
        )
    )


@FUZZ
@given(
    method=methods,
    body=st.one_of(encoded(valid_subscriptions), subscription_bodies),
    authorization=authorizations(),
    request_headers=headers(["Accept", "Content-Type", "Content-Length"]),
    query_string=st.one_of(
        st.sampled_from(SEEDED).map(
            lambda pair: query([("channel", pair[0]), ("callback_url", pair[1])])
        ),
        queries,
    ),
)
def test_without_the_bearer_token_nothing_changes_and_nothing_is_listed(
    client,
    redis,
    offline_dns,
    pushed,
    method,
    body,
    authorization,
    request_headers,
    query_string,
):
    request_headers = {**request_headers, "Accept": "application/json"}
    if authorization is not None:
        request_headers["Authorization"] = authorization
    with toot_settings(SUBSCRIPTIONS_AUTH={"TOKENS": list(TOKENS)}):
        seed()
        before = store_snapshot(redis)

        response = send(client, method, SUBSCRIPTIONS, body, request_headers, query_string)

        after = store_snapshot(redis)
    check_answer(response, method, SUBSCRIPTION_STATUSES)
    assert pushed == []
    if not carries_a_token(authorization):
        assert response.status_code == 401, response.content[:300]
        assert response["WWW-Authenticate"] == "Bearer"
        assert after == before
    else:
        check_store_change(response, method, before, after)
    if authorization in {f"Bearer {token}" for token in TOKENS}:  # the control: it can pass
        assert response.status_code != 401


# Callback endpoint ----------------------------------------------------------------------


@FUZZ
@given(
    method=weighted((3, st.just("POST")), (2, methods)),
    body=callback_bodies,
    request_headers=headers(),
    query_string=st.one_of(st.just(b""), queries),
)
def test_callback_endpoint_answers_anything_and_refusals_enqueue_nothing(
    client, redis, subscriber, pushed, method, body, request_headers, query_string
):
    with toot_settings():
        seed()
        before = store_snapshot(redis)
        pushed.clear()

        response = send(client, method, CALLBACKS, body, request_headers, query_string)

        jobs = queued_events(pushed)
        subscriber.enqueued.extend(jobs)
        after = store_snapshot(redis)
    check_answer(response, method, CALLBACK_STATUSES)
    # The callback endpoint is the subscriber's side: it never touches the store.
    assert after == before
    check_queued(response, jobs)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@FUZZ
@given(
    path=st.sampled_from([SUBSCRIPTIONS, CALLBACKS, "batch"]),
    depth=weighted(
        # At toot's fixed limit (the body's own object is one level), and under it.
        (2, st.sampled_from(range(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 2))),
        (1, st.integers(1, 2 * MAX_JSON_DEPTH)),
        # Around where the JSON parser gives up, which depends on the stack (and Hypothesis
        # raises the recursion limit while it runs): nested this deep, a body once parsed
        # here and then failed the broker's serializer (a 500) or, after a 200, the
        # worker's deserializer (the event lost).
        (2, st.integers(-20, 400).map(lambda below: ("below-the-recursion-limit", below))),
    ),
)
def test_deep_nesting_is_refused_past_the_limit_and_accepted_whole_below(
    client, redis, offline_dns, subscriber, pushed, path, depth
):
    levels = depth if isinstance(depth, int) else sys.getrecursionlimit() - depth[1]
    if path == SUBSCRIPTIONS:
        fields = f'"channel": "{OWN_PREFIX}deep.v1", "callback_url": "{CALLBACK_URL}", "x"'
    else:
        fields = f'"channel": "{SUBSCRIBED}", "payload"'
    body = f"{{{fields}: {nested(levels)}}}"  # nests levels + 1 deep
    body_levels = levels + 1
    if path == "batch":  # two levels more: {"events": [...]}
        path, body, body_levels = CALLBACKS, f'{{"events": [{body}]}}', levels + 3
    with toot_settings(MAX_EVENT_BYTES=64 * 1024):
        before = store_snapshot(redis)
        pushed.clear()

        response = send(client, "POST", path, body.encode())

        jobs = queued_events(pushed)
        subscriber.enqueued.extend(jobs)
        after = store_snapshot(redis)
    check_answer(response, "POST", {200, 201, 204, 400})
    assert after == before or path == SUBSCRIPTIONS
    if levels + 1 > MAX_JSON_DEPTH:  # the event, or the registration, itself too deep
        assert response.status_code == 400
        assert after == before and jobs == []
    elif path == SUBSCRIPTIONS:
        assert response.status_code in (201, 204)
        check_store_change(response, "POST", before, after)
    elif body_levels <= MAX_JSON_DEPTH:
        assert response.status_code == 200 and len(jobs) == 1
    else:  # an event a publisher may send, in a batch over the limit (a known bug: see
        # test_views.test_an_event_as_deep_as_publish_takes_is_accepted_in_a_batch)
        assert (response.status_code, len(jobs)) in ((200, 1), (400, 0))
    # The subscriber fixture then waits for the worker to handle every enqueued event.


# Signed deliveries ----------------------------------------------------------------------

# Source layouts with a secret on "publisher", whose channel SUBSCRIBED is; the others
# have none, and prefixes that are shorter, longer or beside "publisher"'s.
SIGNED_SOURCE = {**settings.TOOT["SOURCES"]["publisher"], "SECRET": SECRET}
ROTATING_SOURCE = {**settings.TOOT["SOURCES"]["publisher"], "SECRETS": [OLD_SECRET, SECRET]}


def unsigned_source(prefix: str) -> dict[str, str]:
    return {
        "SUBSCRIPTION_URL": "http://unsigned.example/toot/subscriptions",
        "CHANNEL_PREFIX": prefix,
    }


SOURCE_LAYOUTS = {
    "alone": {"publisher": SIGNED_SOURCE},
    "rotating": {"publisher": ROTATING_SOURCE},
    "beside": {"publisher": SIGNED_SOURCE, "other": unsigned_source("org.example.other.")},
    "shorter": {"publisher": SIGNED_SOURCE, "parent": unsigned_source("org.example.")},
    "longer": {"publisher": SIGNED_SOURCE, "nested": unsigned_source(SOURCE_PREFIX + "fuzz.")},
}

SIGNATURE_KINDS = [
    *["valid"] * 3,  # the control, more often
    *["valid-among-others"] * 2,
    "unsigned",
    "partial",
    "garbage",
    "wrong-secret",
    "stale",
    "other-body",
    "other-id",
    "other-timestamp",
    "other-version",
    "mangled",
]


@dataclass
class SignaturePlan:
    """How to sign a body; the test applies it at request time, when "now" is known."""

    kind: str
    msg_id: str
    offset: int  # seconds from now
    other: str  # what the "other-*" kinds sign instead, or the wrong version
    garbage: dict[str, str]  # the "garbage" kind's headers
    extras: list[str]  # other signatures, one token each, beside the valid one
    drop: list[str]  # the headers the "partial" kind leaves out
    position: int


@st.composite
def signature_plans(draw: st.DrawFn) -> SignaturePlan:
    kind = draw(st.sampled_from(SIGNATURE_KINDS))
    stale = st.one_of(st.integers(400, 10**9), st.integers(-(10**9), -400))
    return SignaturePlan(
        kind=kind,
        msg_id=draw(st.one_of(st.uuids().map(lambda u: f"msg_{u.hex}"), printable_word)),
        offset=draw(stale if kind == "stale" else st.integers(-200, 200)),
        other=draw(
            st.sampled_from(["v2", "V1", "v1a", "", "v1 ", "1"])
            if kind == "other-version"
            else st.text(st.sampled_from(PRINTABLE), min_size=1, max_size=8)
        ),
        garbage=draw(
            st.fixed_dictionaries(
                {},
                optional={
                    name: HEADER_VALUES[name]
                    for name in [
                        signing.ID_HEADER,
                        signing.TIMESTAMP_HEADER,
                        signing.SIGNATURE_HEADER,
                    ]
                },
            )
        ),
        extras=draw(
            st.lists(
                st.builds(
                    "{},{}".format,
                    st.sampled_from(["v1", "v2", ""]),
                    st.one_of(
                        st.binary(min_size=32, max_size=32).map(b64),
                        st.text(st.sampled_from(PRINTABLE), max_size=50),
                    ),
                ),
                max_size=4,
            )
        ),
        drop=draw(
            st.lists(
                st.sampled_from(
                    [signing.ID_HEADER, signing.TIMESTAMP_HEADER, signing.SIGNATURE_HEADER]
                ),
                min_size=1,
                max_size=3,
                unique=True,
            )
        ),
        position=draw(st.integers(0, 4)),
    )


def sign_with(secret: str, msg_id: str, when: int, body: bytes) -> str:
    return signing.sign(signing.decode_secret(secret), msg_id, when, body)


def signature_headers(plan: SignaturePlan, body: bytes, now: int) -> dict[str, str]:
    """The webhook-* headers ``plan`` makes for ``body`` at ``now``."""
    when = now + plan.offset
    headers = {
        signing.ID_HEADER: plan.msg_id,
        signing.TIMESTAMP_HEADER: str(when),
        signing.SIGNATURE_HEADER: sign_with(SECRET, plan.msg_id, when, body),
    }
    kind = plan.kind
    if kind == "unsigned":
        return {}
    if kind == "partial":
        return {name: value for name, value in headers.items() if name not in plan.drop}
    if kind == "garbage":
        return plan.garbage
    if kind == "wrong-secret":
        headers[signing.SIGNATURE_HEADER] = sign_with(WRONG_SECRET, plan.msg_id, when, body)
    elif kind == "other-body":
        headers[signing.SIGNATURE_HEADER] = sign_with(
            SECRET, plan.msg_id, when, body + plan.other.encode()
        )
    elif kind == "other-id":
        headers[signing.SIGNATURE_HEADER] = sign_with(SECRET, plan.msg_id + plan.other, when, body)
    elif kind == "other-timestamp":
        headers[signing.TIMESTAMP_HEADER] = str(when + 1 + len(plan.other))
    elif kind == "other-version":
        headers[signing.SIGNATURE_HEADER] = plan.other + headers[signing.SIGNATURE_HEADER][2:]
    elif kind == "mangled":
        signature = headers[signing.SIGNATURE_HEADER]
        at = 3 + plan.position * 7
        flipped = "A" if signature[at] != "A" else "B"
        headers[signing.SIGNATURE_HEADER] = signature[:at] + flipped + signature[at + 1 :]
    elif kind == "valid-among-others":
        others = [sign_with(WRONG_SECRET, plan.msg_id, when, body), *plan.extras]
        others.insert(min(plan.position, len(others)), headers[signing.SIGNATURE_HEADER])
        headers[signing.SIGNATURE_HEADER] = " ".join(others)
    return headers


def verified_by_standardwebhooks(body: bytes, headers: Mapping[str, str]) -> bool:
    """The reference implementation's verdict on a request as Django read it.

    One signature at a time: the package gives up at the first one it cannot parse,
    where the spec (and toot) go on to the next.
    """
    webhook = standardwebhooks.Webhook(SECRET)
    for signature in headers.get(signing.SIGNATURE_HEADER, "").split():
        try:
            webhook.verify(body, {**headers, signing.SIGNATURE_HEADER: signature}, json_parse=False)
        except Exception:
            continue
        return True
    return False


valid_batches = st.fixed_dictionaries({"events": st.lists(valid_events, min_size=1, max_size=4)})


@st.composite
def signed_batches(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    data = draw(valid_batches)
    body = json.dumps(data, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    fits = len(body) <= BATCH_MAX_BYTES and each_fits(data["events"], MAX_EVENT_BYTES)
    return body, well_formed(body), fits


# (body, whether only a signature may stop it, whether it is under the size limits)
signed_bodies = weighted(
    (
        3,
        encoded(valid_events).map(
            lambda body: (body, well_formed(body), len(body) <= MAX_EVENT_BYTES)
        ),
    ),
    (2, signed_batches()),
    (1, encoded(batches).map(lambda body: (body, False, False))),
    (2, callback_bodies.map(lambda body: (body, False, False))),
)


@FUZZ
@given(
    layout=st.sampled_from(sorted(SOURCE_LAYOUTS)),
    body_and_intact=signed_bodies,
    plan=signature_plans(),
    request_headers=headers(["Content-Type", "Content-Length", "Accept", "X-Toot-Unsubscribe"]),
)
def test_a_signed_source_runs_only_events_signed_with_its_secret(
    client, redis, subscriber, pushed, layout, body_and_intact, plan, request_headers
):
    body, intact, fits = body_and_intact
    with toot_settings(SOURCES=SOURCE_LAYOUTS[layout]):
        before = store_snapshot(redis)
        pushed.clear()
        webhook_headers = signature_headers(plan, body, int(time.time()))

        response = send(client, "POST", CALLBACKS, body, {**request_headers, **webhook_headers})

        jobs = queued_events(pushed)
        subscriber.enqueued.extend(jobs)
        after = store_snapshot(redis)
    check_answer(response, "POST", CALLBACK_STATUSES)
    assert after == before
    check_queued(response, jobs)
    if jobs:  # whatever toot accepted, the reference implementation must verify
        request = response.wsgi_request
        assert verified_by_standardwebhooks(request.body, request.headers), plan
        assert plan.kind in ("valid", "valid-among-others"), plan
    else:
        lying_length = any(name.lower() == "content-length" for name in request_headers)
        if intact and fits and not lying_length and plan.kind in ("valid", "valid-among-others"):
            # The control: a signed event does get through, so the refusals above can fail.
            raise AssertionError(f"a signed event was not enqueued: {response.content[:300]!r}")


# Batches on the callback endpoint (docs/protocol.md section 7) -------------------------------

# Small, so that generated batches reach it.
BATCH_MAX_EVENTS = 5
# Large enough that a batch of a few events reaches the body limit (BATCH_MAX_BYTES, the
# larger) with every event under it.
BATCH_EVENT_BYTES = 512 * 1024

# A member of a batch, and whether it is a valid event of the subscribed channel (False
# where unsure: near_valid may leave an event valid).
batch_members = weighted(
    (6, valid_events.map(lambda event: (event, True))),
    (1, near_valid(valid_events).map(lambda event: (event, False))),
    (
        1,
        st.builds(lambda event, channel: {**event, "channel": channel}, valid_events, channels).map(
            lambda event: (event, event["channel"] == SUBSCRIBED)
        ),
    ),
    (1, anything.map(lambda value: (value, False))),
)


@st.composite
def attacker_batches(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A batch body, and whether it must be queued: 1 to BATCH_MAX_EVENTS valid events of
    the subscribed channel, every one and the whole under their size limits."""
    shape = draw(st.sampled_from(["list"] * 3 + ["not-a-list", "padded"] * 2))
    outer = draw(
        st.fixed_dictionaries(
            {}, optional={"channel": channels, "id": event_ids, "batch": payloads}
        )
    )
    ascii_only = draw(st.booleans())
    if shape == "not-a-list":
        value = draw(
            st.one_of(
                anything,
                valid_events,  # one event, not in a list
                st.dictionaries(any_text, valid_events, max_size=3),
                st.lists(valid_events, max_size=2).map(json.dumps),
            )
        )
        data = {**outer, "events": value}
        hypothesis.event("shape", "not a list")
        return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"), False
    if shape == "padded":  # mostly valid events, so that the limit decides
        sizes = st.integers(1, BATCH_MAX_EVENTS + 1)
        members = draw(sizes.flatmap(lambda n: st.lists(batch_members, min_size=n, max_size=n)))
        if not all(isinstance(event, dict) for event, _valid in members):
            members = [(event, valid) for event, valid in members if isinstance(event, dict)]
    else:
        members = draw(st.lists(batch_members, max_size=BATCH_MAX_EVENTS + 2))
    events = [event for event, _valid in members]
    intact = 1 <= len(members) <= BATCH_MAX_EVENTS and all(valid for _event, valid in members)
    if shape == "padded" and events:
        # A few bytes either side of the body limit, spread over the events (an extra field
        # that the endpoint does not keep).
        size = draw(st.integers(BATCH_MAX_BYTES - 8, BATCH_MAX_BYTES + 8))
        events = [{**event, "pad": ""} for event in events]
        padding = size - len(json.dumps({**outer, "events": events}, ensure_ascii=True))
        for index, event in enumerate(events):
            event["pad"] = "p" * max(0, padding // len(events) + (index < padding % len(events)))
        ascii_only = True  # the padded size is in ASCII bytes
        intact = intact and size <= BATCH_MAX_BYTES
        hypothesis.event("padded", f"padded {'over' if size > BATCH_MAX_BYTES else 'to'} the limit")
    body = json.dumps({**outer, "events": events}, ensure_ascii=ascii_only)
    raw = body.encode("utf-8", "surrogatepass")
    intact = intact and well_formed(raw) and each_fits(events, BATCH_EVENT_BYTES)
    hypothesis.event("batch", "must be queued" if intact else "may be refused")
    return raw, intact


@FUZZ
@given(
    batch=attacker_batches(),
    request_headers=headers(["Content-Type", "Content-Length", "Accept", "X-Toot-Unsubscribe"]),
)
def test_a_batch_is_queued_whole_or_not_at_all(
    client, redis, subscriber, pushed, batch, request_headers
):
    body, intact = batch
    with toot_settings(MAX_EVENT_BYTES=BATCH_EVENT_BYTES, BATCH_MAX_EVENTS=BATCH_MAX_EVENTS):
        seed()
        before = store_snapshot(redis)
        pushed.clear()

        response = send(client, "POST", CALLBACKS, body, request_headers)

        jobs = queued_events(pushed)
        subscriber.enqueued.extend(jobs)
        after = store_snapshot(redis)
    check_answer(response, "POST", CALLBACK_STATUSES)
    assert after == before
    check_queued(response, jobs)  # a 200 queued every event, in order; else none
    assert len(jobs) <= BATCH_MAX_EVENTS
    if "X-Toot-Unsubscribe" in response:  # only for a channel nothing here handles
        assert response.status_code == 200
        assert {event["channel"] for event in sent_events(response)} != {SUBSCRIBED}
    lying_length = any(name.lower() == "content-length" for name in request_headers)
    if intact and not lying_length:
        # The control: a valid batch does get through, so the refusals above can fail.
        assert response.status_code == 200, response.content[:300]
        assert len(jobs) == len(json.loads(body)["events"])
