from __future__ import annotations

import gzip
import json
import socket
import time

import pytest
import requests
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply, in_order
from toot.http import ssrf
from toot.http.client import MAX_RESPONSE_BYTES, post_json

# A delivery is pinned to the address the SSRF guard checked and goes through toot's own
# urllib3 pools; an unpinned call (a registration), a proxied one, or any call with
# TOOT["HTTP_SESSION"] goes through requests. What post_json promises holds for both.
PATHS = ["requests", "own pools"]


@pytest.fixture
def server():
    with HTTPServer() as server:
        yield server


@pytest.fixture(params=PATHS)
def post(request):
    """post_json(url, body, headers) through one path or the other."""
    pinned = request.param == "own pools"

    def post(url, body="{}", headers=None):
        return post_json(url, body, headers, target=ssrf.target(url) if pinned else None)

    return post


def marked_session():
    """The TOOT["HTTP_SESSION"] factory of these tests: a session that tags its requests."""
    session = requests.Session()
    session.headers["X-Test-Session"] = "marked"
    return session


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


def test_returns_status_headers_and_body(server, post):
    server.reply = Reply(201, {"X-Toot-Unsubscribe": "True"}, b'{"ok": true}')

    response = post(server.url, "{}")

    assert response.status == 201
    assert response.ok
    assert response.headers["X-Toot-Unsubscribe"] == "True"
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


def test_read_timeout_comes_from_the_settings(server, eventually, post):
    server.reply = Reply(hang=True)
    started = time.monotonic()

    with (
        override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 0.2, "CONNECT_TIMEOUT": 30}),
        pytest.raises(requests.ReadTimeout),
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


def test_connect_timeout_comes_from_the_settings(unaccepting_port, post):
    started = time.monotonic()

    with (
        override_settings(TOOT={**settings.TOOT, "CONNECT_TIMEOUT": 0.2, "READ_TIMEOUT": 30}),
        pytest.raises(requests.ConnectTimeout),
    ):
        post(f"http://127.0.0.1:{unaccepting_port}/", "{}")

    assert time.monotonic() - started < 5


def test_connection_refused_raises_requests_connection_error(post):
    with pytest.raises(requests.ConnectionError):
        post(f"http://127.0.0.1:{free_port()}/", "{}")


def test_http_session_setting_names_the_session_factory(server):
    with override_settings(
        TOOT={**settings.TOOT, "HTTP_SESSION": "tests.test_client.marked_session"}
    ):
        post_json(server.url, "{}")

    assert server.requests[0].headers["X-Test-Session"] == "marked"


def test_default_session_is_used_without_the_setting(server):
    post_json(server.url, "{}")

    assert "X-Test-Session" not in server.requests[0].headers


def test_a_compressed_body_is_capped_once_decompressed(server, post):
    server.reply = Reply(200, {"Content-Encoding": "gzip"}, gzip.compress(b"\0" * 10_000_000))

    response = post(server.url, "{}")

    assert len(server.reply.body) < MAX_RESPONSE_BYTES
    assert response.body == b"\0" * MAX_RESPONSE_BYTES


# The total deadline: READ_TIMEOUT bounds each read, CONNECT_TIMEOUT + READ_TIMEOUT the call.

# One second in all, while each trickled byte comes within 0.05 s: far within a read timeout.
ONE_SECOND = {"CONNECT_TIMEOUT": 0.5, "READ_TIMEOUT": 0.5}
TRICKLE = 0.05
BODY = b"x" * 2000  # 100 s at that pace


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_a_trickling_answer_is_cut_at_the_total_deadline(trickle_headers, post):
    reply = Reply(body=BODY, trickle=TRICKLE, trickle_headers=trickle_headers)
    with HTTPServer(reply) as server, override_settings(TOOT={**settings.TOOT, **ONE_SECOND}):
        started = time.monotonic()
        with pytest.raises(requests.ReadTimeout, match="no complete answer within 1 seconds"):
            post(server.url, "{}")
        elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 5


def test_the_deadline_cuts_a_trickle_through_a_users_session_too():
    reply = Reply(body=BODY, trickle=TRICKLE)
    with (
        HTTPServer(reply) as server,
        override_settings(
            TOOT={**settings.TOOT, **ONE_SECOND, "HTTP_SESSION": "tests.test_client.marked_session"}
        ),
    ):
        started = time.monotonic()
        with pytest.raises(requests.ReadTimeout):
            post_json(server.url, "{}")

    assert time.monotonic() - started < 5
    assert server.requests[0].headers["X-Test-Session"] == "marked"


def test_a_slow_answer_within_the_deadline_is_read_whole(post):
    # About 80 bytes, headers included, 0.01 s apart: well within two seconds.
    reply = Reply(201, body=b"0123456789", trickle=0.01, trickle_headers=True)
    two_seconds = {"CONNECT_TIMEOUT": 1, "READ_TIMEOUT": 1}
    with HTTPServer(reply) as server, override_settings(TOOT={**settings.TOOT, **two_seconds}):
        response = post(server.url, "{}")

    assert (response.status, response.body) == (201, b"0123456789")


def test_a_call_after_a_cut_one_gets_a_fresh_connection(post):
    replies = in_order(Reply(body=BODY, trickle=TRICKLE), Reply(200, body=b"fine"))
    with HTTPServer(replies) as server, override_settings(TOOT={**settings.TOOT, **ONE_SECOND}):
        with pytest.raises(requests.ReadTimeout):
            post(server.url, "{}")
        response = post(server.url, "{}")

    assert response.body == b"fine"
    assert len(server.requests) == 2


# Which path a call takes


def user_agent(server):
    return server.requests[-1].headers["User-Agent"].split("/")[0]


def test_a_pinned_call_goes_through_toots_own_pools(server):
    post_json(server.url, "{}", target=ssrf.target(server.url))

    assert user_agent(server) == "python-urllib3"


def test_a_pinned_call_with_a_users_session_goes_through_requests(server):
    with override_settings(
        TOOT={**settings.TOOT, "HTTP_SESSION": "tests.test_client.marked_session"}
    ):
        post_json(server.url, "{}", target=ssrf.target(server.url))

    assert user_agent(server) == "python-requests"
    assert server.requests[0].headers["X-Test-Session"] == "marked"


def test_a_pinned_call_through_a_proxy_from_the_environment_goes_through_requests(
    monkeypatch, server
):
    with HTTPServer() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        url = "http://sub.example:8765/cb"  # allowed in the test settings, never resolved...
        target = ssrf.Target("http", "sub.example", 8765, "127.0.0.1")  # ...as checked

        response = post_json(url, "{}", target=target)

    assert response.status == 200
    [request] = proxy.requests
    assert request.path == "http://127.0.0.1:8765/cb"  # pinned through the proxy too
    assert request.headers["User-Agent"].startswith("python-requests/")
    assert server.requests == []


def test_a_host_the_environment_exempts_from_its_proxy_goes_through_toots_pools(
    monkeypatch, server
):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    response = post_json(server.url, "{}", target=ssrf.target(server.url))

    assert response.ok
    assert user_agent(server) == "python-urllib3"


def test_a_connection_left_mid_body_is_not_reused(server):
    server.reply = in_order(Reply(200, endless=True), Reply(200, body=b"next"))
    target = ssrf.target(server.url)

    first = post_json(server.url, "{}", target=target)
    second = post_json(server.url, "{}", target=target)

    assert len(first.body) == MAX_RESPONSE_BYTES
    assert second.body == b"next"


@pytest.mark.parametrize(
    "environment",
    [{"NO_PROXY": "*"}, {"HTTPS_PROXY": "http://127.0.0.1:9"}],
    ids=["only-no-proxy", "a-proxy-for-another-scheme"],
)
def test_a_proxy_setting_that_names_no_proxy_for_the_url_leaves_it_to_toots_pools(
    monkeypatch, server, environment
):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    response = post_json(server.url, "{}", target=ssrf.target(server.url))

    assert response.ok
    assert user_agent(server) == "python-urllib3"
