"""toot.http.client: what every outgoing call promises, against a real local HTTP server.

A delivery (post_to_callback) goes through toot's own urllib3 pools and raises urllib3's
errors; a registration (post_to_source) goes through requests and raises requests'.
The SSRF check at connect time and TLS are tested in tests/test_transport.py.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from types import SimpleNamespace

import pytest
import requests
import urllib3
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import toot_settings
from toot import InvalidCallback
from toot.http import client, transport
from toot.http.client import MAX_RESPONSE_BYTES, post_to_callback, post_to_source

# Per path: how it is called, and the errors it raises.
PATHS = {
    "delivery": SimpleNamespace(
        post=lambda url, body, headers: post_to_callback(
            url, body.encode() if isinstance(body, str) else body, headers or {}
        ),
        read_timeout=urllib3.exceptions.ReadTimeoutError,
        connect_timeout=urllib3.exceptions.ConnectTimeoutError,
        connection_error=urllib3.exceptions.NewConnectionError,
    ),
    "registration": SimpleNamespace(
        post=lambda url, body, headers: post_to_source(
            url, body.decode() if isinstance(body, bytes) else body, headers or {}
        ),
        read_timeout=requests.ReadTimeout,
        connect_timeout=requests.ConnectTimeout,
        connection_error=requests.ConnectionError,
    ),
}


@pytest.fixture
def server():
    with HTTPServer() as server:
        yield server


@pytest.fixture(params=PATHS)
def path(request):
    return PATHS[request.param]


@pytest.fixture
def post(path):
    """post(url, body, headers) through a delivery or a registration."""

    def post(url, body="{}", headers=None):
        return path.post(url, body, headers)

    return post


def test_posts_the_body_as_json(server, post):
    body = json.dumps({"channel": "org.example.x.v1", "callback_url": "http://sub.example/cb"})

    response = post(f"{server.url}/toot/subscriptions", body)

    assert response.status == 200
    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/toot/subscriptions"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == body.encode()


def test_accepts_bytes(server, post):
    post(server.url, b'{"a": 1}')

    assert server.requests[0].json() == {"a": 1}


def test_sends_extra_headers_beside_the_json_content_type(server, post):
    post(server.url, "{}", {"webhook-id": "evt-1", "Authorization": "Bearer t"})

    [request] = server.requests
    assert request.headers["webhook-id"] == "evt-1"
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Host"] == f"127.0.0.1:{server.port}"


def test_returns_status_headers_and_body(server, post):
    server.reply = Reply(201, {"X-Toot-Unsubscribe": "True"}, b'{"ok": true}')

    response = post(server.url, "{}")

    assert response.status == 201
    assert response.ok
    assert response.headers["x-toot-unsubscribe"] == "True"  # any case
    assert response.body == b'{"ok": true}'


@pytest.mark.parametrize("status", [301, 400, 404, 503])
def test_only_2xx_is_ok(server, status, post):
    server.reply = Reply(status)

    assert not post(server.url, "{}").ok


def test_excerpt_is_the_start_of_the_body_as_text(server, post):
    server.reply = Reply(500, body="é".encode() + b"\xff" + b"z" * 500)

    excerpt = post(server.url, "{}").excerpt()

    assert excerpt == "é\ufffd" + "z" * 197


def test_excerpt_is_one_line_of_printable_text(server, post):
    server.reply = Reply(500, body=b"<h1>Not Found</h1>\r\n\n  <p>\x1b[31mgone\ttoo</p>\n")

    excerpt = post(server.url, "{}").excerpt()

    assert excerpt == "<h1>Not Found</h1> <p> [31mgone too</p>"


def test_never_follows_a_redirect(server, post):
    server.reply = Reply(302, {"Location": f"{server.url}/elsewhere"})

    response = post(f"{server.url}/toot/callbacks", "{}")

    assert response.status == 302
    assert not response.ok
    assert [request.path for request in server.requests] == ["/toot/callbacks"]


def test_response_body_is_capped(server, post):
    server.reply = Reply(200, body=b"x" * (MAX_RESPONSE_BYTES + 100_000))

    response = post(server.url, "{}")

    assert response.body == b"x" * MAX_RESPONSE_BYTES


def test_an_endless_response_body_is_not_read_to_the_end(server, post):
    server.reply = Reply(200, endless=True)

    response = post(server.url, "{}")

    assert response.status == 200
    assert len(response.body) == MAX_RESPONSE_BYTES


def test_a_compressed_body_is_capped_once_decompressed(server, post):
    server.reply = Reply(200, {"Content-Encoding": "gzip"}, gzip.compress(b"\0" * 10_000_000))

    response = post(server.url, "{}")

    assert len(server.reply.body) < MAX_RESPONSE_BYTES
    assert response.body == b"\0" * MAX_RESPONSE_BYTES


def test_read_timeout_comes_from_the_settings(server, eventually, path, post):
    server.reply = Reply(hang=True)
    started = time.monotonic()

    with (
        toot_settings(READ_TIMEOUT=0.2, CONNECT_TIMEOUT=30),
        pytest.raises(path.read_timeout),
    ):
        post(server.url, "{}")

    assert time.monotonic() - started < 5
    eventually(lambda: len(server.requests) == 1, what="the server to record the request")


@pytest.fixture
def unaccepting_port():
    """A port that listens but never accepts, its backlog full: a connect there hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        # Fill the accept queue; once it is full the kernel drops further SYNs.
        for _ in range(8):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            queued.append(sock)
        yield port
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_connect_timeout_comes_from_the_settings(unaccepting_port, path, post):
    started = time.monotonic()

    with (
        toot_settings(CONNECT_TIMEOUT=0.2, READ_TIMEOUT=30),
        pytest.raises(path.connect_timeout),
    ):
        post(f"http://127.0.0.1:{unaccepting_port}/", "{}")

    assert time.monotonic() - started < 5


def test_connection_refused_raises_a_connection_error(path, post):
    with pytest.raises(path.connection_error):
        post(f"http://127.0.0.1:{free_port()}/", "{}")


# The total deadline of a delivery: READ_TIMEOUT bounds each read, CONNECT_TIMEOUT +
# READ_TIMEOUT the call. (A registration goes to the operator's own source: each of its
# reads is bounded, not the whole.)

# One second in all, while each trickled byte comes within 0.05 s: far within a read timeout.
ONE_SECOND = {"CONNECT_TIMEOUT": 0.5, "READ_TIMEOUT": 0.5}
TRICKLE = 0.05
BODY = b"x" * 2000  # 100 s at that pace


def deliver(url, body=b"{}"):
    return post_to_callback(url, body, {})


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_a_trickling_answer_is_cut_at_the_total_deadline(trickle_headers):
    reply = Reply(body=BODY, trickle=TRICKLE, trickle_headers=trickle_headers)
    with HTTPServer(reply) as server, toot_settings(**ONE_SECOND):
        started = time.monotonic()
        with pytest.raises(transport.DeadlineExceeded, match="no complete answer within 1 seconds"):
            deliver(server.url)
        elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 5


def test_a_slow_answer_within_the_deadline_is_read_whole():
    # About 80 bytes, headers included, 0.01 s apart: well within two seconds.
    reply = Reply(201, body=b"0123456789", trickle=0.01, trickle_headers=True)
    with HTTPServer(reply) as server, toot_settings(CONNECT_TIMEOUT=1, READ_TIMEOUT=1):
        response = deliver(server.url)

    assert (response.status, response.body) == (201, b"0123456789")


def test_a_call_after_a_cut_one_gets_a_fresh_connection():
    replies = in_order(Reply(body=BODY, trickle=TRICKLE), Reply(200, body=b"fine"))
    with HTTPServer(replies) as server, toot_settings(**ONE_SECOND):
        with pytest.raises(transport.DeadlineExceeded):
            deliver(server.url)
        response = deliver(server.url)

    assert response.body == b"fine"
    assert len(server.requests) == 2


def test_a_connection_left_mid_body_is_not_reused(server):
    server.reply = in_order(Reply(200, endless=True), Reply(200, body=b"next"))

    first = deliver(server.url)
    second = deliver(server.url)

    assert len(first.body) == MAX_RESPONSE_BYTES
    assert second.body == b"next"


def test_a_deadline_stops_watching_once_cancelled():
    deadline = transport.Deadline(30)
    with deadline:
        deadline.cancel()
        deadline._expire()  # the timer firing just after the call ended
        deadline.watch(object())

    assert not deadline.expired


def test_deliveries_reuse_their_connection(server):
    for _ in range(3):
        deliver(server.url)

    pool = client._pools().manager().connection_from_url(server.url)
    assert pool.num_connections == 1
    assert pool.num_requests == 3


def test_toots_pools_work_outside_a_call_too(server):
    # Only post_to_callback uses them, inside its deadline; outside one, nothing is cut.
    response = client._pools().manager().request("POST", server.url, body=b"{}", retries=False)

    assert response.status == 200


def test_other_settings_get_pools_of_their_own(server, no_drain_at_work):
    deliver(server.url)
    default = client._pools().manager()

    with toot_settings(ALLOWED_CALLBACK_NETWORKS=["127.0.0.0/8"]):
        deliver(server.url)
        assert client._pools().manager() is not default
    assert client._pools().manager() is default


def test_the_setup_in_use_keeps_its_pools_however_many_others_came_and_went(server):
    deliver(server.url)
    default = client._pools().manager()

    for n in range(client.Pools.LIMIT + 1):  # each a setup of its own, then the default again
        with toot_settings(SENDERS=100 + n):
            deliver(server.url)
        deliver(server.url)

    assert client._pools().manager() is default


@pytest.mark.parametrize("senders, kept", [(4, 10), (40, 40)])
def test_a_pool_keeps_a_connection_per_sender_thread_to_a_host(senders, kept):
    """Several callback URLs on one host share its pool: as many connections as this
    process's sender threads, not one URL's MAX_IN_FLIGHT, or the pool would close those
    it could not keep."""
    with toot_settings(SENDERS=senders, MAX_IN_FLIGHT=2):
        assert client._pools().manager().connection_pool_kw["maxsize"] == kept


def test_only_a_few_setups_keep_pools(server):
    managers = []
    for n in range(client.Pools.LIMIT + 1):
        with toot_settings(CONNECT_TIMEOUT=1, ALLOWED_CALLBACK_HOSTS=["127.0.0.1", f"{n}.test"]):
            deliver(server.url)
            managers.append(client._pools().manager())

    assert len(client._pools()._managers) == client.Pools.LIMIT
    assert len(managers[0].pools) == 0  # closed as it went


# Error texts: the kinds of requests' errors, which dead letters have always shown


def test_a_refused_connection_is_a_connection_error_with_the_reason():
    url = f"http://127.0.0.1:{free_port()}/cb"
    with pytest.raises(client.ERRORS) as raised:
        deliver(url)

    text = client.error_text(raised.value, url)

    assert text.startswith("ConnectionError: [Errno 111] Connection refused")
    assert "object at 0x" not in text


def test_a_read_timeout_is_a_read_timeout(server):
    server.reply = Reply(hang=True)
    with toot_settings(READ_TIMEOUT=0.2), pytest.raises(client.ERRORS) as raised:
        deliver(server.url)

    assert client.error_text(raised.value, server.url).startswith("ReadTimeout: ")
    assert "timed out" in client.error_text(raised.value, server.url)


def test_a_cut_call_is_a_read_timeout():
    with (
        HTTPServer(Reply(body=BODY, trickle=TRICKLE)) as server,
        toot_settings(**ONE_SECOND),
        pytest.raises(client.ERRORS) as raised,
    ):
        deliver(server.url)

    text = client.error_text(raised.value, server.url)
    assert text == "ReadTimeout: no complete answer within 1 seconds"


def test_a_connect_timeout_is_a_connect_timeout(unaccepting_port):
    url = f"http://127.0.0.1:{unaccepting_port}/"
    with toot_settings(CONNECT_TIMEOUT=0.2), pytest.raises(client.ERRORS) as raised:
        deliver(url)

    assert client.error_text(raised.value, url).startswith("ConnectTimeout: ")


def test_a_host_that_does_not_resolve_says_so(dns):
    dns.answers["gone.example"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(client.ERRORS) as raised:
        deliver("http://gone.example/cb")

    text = client.error_text(raised.value, "http://gone.example/cb")
    assert text == (
        "ConnectionError: cannot resolve http://gone.example/cb: "
        "[Errno -2] Name or service not known"
    )


# PROXY_URL: deliveries and registrations through a forward proxy


@pytest.fixture
def proxy():
    """A plain http forward proxy that answers every request itself, and records it."""
    with HTTPServer(Reply(200, body=b"from the proxy")) as proxy:
        yield proxy


def test_plain_http_goes_through_the_proxy_url(proxy, post):
    with toot_settings(PROXY_URL=proxy.url):
        response = post("http://sub.example:8765/cb?x=1", "{}")

    assert response.body == b"from the proxy"
    [request] = proxy.requests
    assert request.path == "http://sub.example:8765/cb?x=1"  # the host named, for the proxy
    assert request.headers["Host"] == "sub.example:8765"
    assert "Proxy-Authorization" not in request.headers


def test_proxy_credentials_go_as_basic_authentication(proxy, post):
    credentials = "toot:p%40ss"  # "p@ss", as a URL spells it
    with toot_settings(PROXY_URL=proxy.url.replace("://", f"://{credentials}@")):
        post("http://sub.example:8765/cb", "{}")

    [request] = proxy.requests
    expected = urllib3.make_headers(proxy_basic_auth="toot:p@ss")["proxy-authorization"]
    assert request.headers["Proxy-Authorization"] == expected


def test_a_proxied_delivery_checks_the_host_it_names(proxy, dns):
    dns.answers["private.test"] = ["10.0.0.1"]
    with (
        toot_settings(PROXY_URL=proxy.url, ALLOWED_CALLBACK_HOSTS=[]),
        pytest.raises(InvalidCallback, match="private.test resolves to 10.0.0.1"),
    ):
        deliver("https://private.test/cb")

    assert proxy.requests == []
    assert dns.lookups == ["private.test"]


def test_a_proxied_delivery_to_a_host_that_does_not_resolve_sends_nothing(proxy, dns):
    dns.answers["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with (
        toot_settings(PROXY_URL=proxy.url, ALLOWED_CALLBACK_HOSTS=[]),
        pytest.raises(socket.gaierror),
    ):
        deliver("https://gone.test/cb")

    assert proxy.requests == []


def test_a_proxy_nobody_answers_is_a_proxy_error():
    url = "http://sub.example:8765/cb"
    with (
        toot_settings(PROXY_URL=f"http://127.0.0.1:{free_port()}"),
        pytest.raises(client.ERRORS) as raised,
    ):
        deliver(url)
    with (
        toot_settings(PROXY_URL=f"http://127.0.0.1:{free_port()}"),
        pytest.raises(requests.exceptions.ProxyError),
    ):
        post_to_source(url, "{}", {})

    assert client.error_text(raised.value, url).startswith("ProxyError: ")


def test_the_environments_proxy_is_not_used(monkeypatch, server, post):
    nobody = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, nobody)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    response = post(server.url, "{}")

    assert response.ok
    assert len(server.requests) == 1


def test_no_proxy_url_means_straight_to_the_peer(server, post):
    with override_settings(TOOT={**settings.TOOT, "PROXY_URL": None}):
        assert post(server.url, "{}").ok
