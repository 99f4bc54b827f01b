from __future__ import annotations

import json
import os
import select
import signal
import socket
import time

import pytest
import requests
from django.conf import settings
from django.test import override_settings

from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply
from toot import client
from toot.client import MAX_RESPONSE_BYTES, post_json


@pytest.fixture
def server():
    with HTTPServer() as server:
        yield server


def marked_session():
    """The TOOT["HTTP_SESSION"] factory of these tests: a session that tags its requests."""
    session = requests.Session()
    session.headers["X-Test-Session"] = "marked"
    return session


def test_posts_the_body_as_json(server):
    body = json.dumps({"channel": "org.example.x.v1", "callback_url": "http://sub.example/cb"})

    response = post_json(f"{server.url}/toot/subscriptions", body)

    assert response.status == 200
    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/toot/subscriptions"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == body.encode()


def test_accepts_bytes(server):
    post_json(server.url, b'{"a": 1}')

    assert server.requests[0].json() == {"a": 1}


def test_returns_status_headers_and_body(server):
    server.reply = Reply(201, {"X-Toot-Unsubscribe": "True"}, b'{"ok": true}')

    response = post_json(server.url, "{}")

    assert response.status == 201
    assert response.ok
    assert response.headers["X-Toot-Unsubscribe"] == "True"
    assert response.body == b'{"ok": true}'


@pytest.mark.parametrize("status", [301, 400, 404, 503])
def test_only_2xx_is_ok(server, status):
    server.reply = Reply(status)

    assert not post_json(server.url, "{}").ok


def test_excerpt_is_the_start_of_the_body_as_text(server):
    server.reply = Reply(500, body="é".encode() + b"\xff" + b"z" * 500)

    excerpt = post_json(server.url, "{}").excerpt()

    assert excerpt == "é\ufffd" + "z" * 197


def test_excerpt_is_one_line_of_printable_text(server):
    server.reply = Reply(500, body=b"<h1>Not Found</h1>\r\n\n  <p>\x1b[31mgone\ttoo</p>\n")

    excerpt = post_json(server.url, "{}").excerpt()

    assert excerpt == "<h1>Not Found</h1> <p> [31mgone too</p>"


def test_never_follows_a_redirect(server):
    server.reply = Reply(302, {"Location": f"{server.url}/elsewhere"})

    response = post_json(f"{server.url}/toot/callbacks", "{}")

    assert response.status == 302
    assert not response.ok
    assert [request.path for request in server.requests] == ["/toot/callbacks"]


def test_response_body_is_capped(server):
    server.reply = Reply(200, body=b"x" * (MAX_RESPONSE_BYTES + 100_000))

    response = post_json(server.url, "{}")

    assert response.body == b"x" * MAX_RESPONSE_BYTES


def test_an_endless_response_body_is_not_read_to_the_end(server):
    server.reply = Reply(200, endless=True)

    response = post_json(server.url, "{}")

    assert response.status == 200
    assert len(response.body) == MAX_RESPONSE_BYTES


def test_read_timeout_comes_from_the_settings(server, eventually):
    server.reply = Reply(hang=True)
    started = time.monotonic()

    with (
        override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 0.2, "CONNECT_TIMEOUT": 30}),
        pytest.raises(requests.ReadTimeout),
    ):
        post_json(server.url, "{}")

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


def test_connect_timeout_comes_from_the_settings(unaccepting_port):
    started = time.monotonic()

    with (
        override_settings(TOOT={**settings.TOOT, "CONNECT_TIMEOUT": 0.2, "READ_TIMEOUT": 30}),
        pytest.raises(requests.ConnectTimeout),
    ):
        post_json(f"http://127.0.0.1:{unaccepting_port}/", "{}")

    assert time.monotonic() - started < 5


def test_connection_refused_raises_requests_connection_error():
    with pytest.raises(requests.ConnectionError):
        post_json(f"http://127.0.0.1:{free_port()}/", "{}")


def test_http_session_setting_names_the_session_factory(server):
    with override_settings(
        TOOT={**settings.TOOT, "HTTP_SESSION": "tests.test_client.marked_session"}
    ):
        post_json(server.url, "{}")

    assert server.requests[0].headers["X-Test-Session"] == "marked"


def test_default_session_is_used_without_the_setting(server):
    post_json(server.url, "{}")

    assert "X-Test-Session" not in server.requests[0].headers


# The child only builds a session; the fork warning of Python 3.12+ is about other work.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_default_session_is_one_per_process():
    session = client.get_session()
    assert client.get_session() is session

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, b"new" if client.get_session() is not session else b"same")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answered, _, _ = select.select([read], [], [], 30)
        if not answered:
            os.kill(pid, signal.SIGKILL)
        answer = os.read(read, 16) if answered else b"no answer"
    finally:
        os.close(read)
        os.waitpid(pid, 0)

    assert answer == b"new"
    assert client.get_session() is session
