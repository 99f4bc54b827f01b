"""toot.http.transport: a delivery connects to the address the SSRF guard checked.

Real servers on loopback, reached under names that the ``dns`` fixture answers once
with 127.0.0.1 and then never again (or differently, as a rebinding attacker would): a
call that looked the name up a second time would fail. TLS uses real certificates from
a throwaway CA (trustme), so SNI and verification against the name are checked for real.
"""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import threading
import uuid

import pytest
import requests
import trustme

from tests.http_server import HTTPServer
from tests.utils import toot_settings
from toot.http import client, ssrf, transport
from toot.protocol.events import Event, wire_json
from toot.publisher import delivery, publishing, store

NOT_AGAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

# The HTTP_SESSION of these tests, set up per test: ``session`` returns it.
SESSION: dict[str, requests.Session] = {}


def session() -> requests.Session:
    return SESSION["session"]


def answer_once(dns, name, then=NOT_AGAIN):
    """``name`` resolves to 127.0.0.1 on the first lookup, to ``then`` afterwards."""
    answers = iter([["127.0.0.1"]])
    dns.answers[name] = lambda: next(answers, then)


def attempt(url):
    """One delivery attempt of a new event to ``url``."""
    event = Event(f"org.example.test.{uuid.uuid4().hex[:8]}.v1", {"id": 1}).to_dict()
    return delivery.attempt(url, event["channel"], wire_json(event).encode(), event["id"])


# Plain http ---------------------------------------------------------------------------


def test_a_pinned_call_connects_to_the_checked_address_under_its_name(dns):
    answer_once(dns, "rebind.test", then=["10.255.255.1"])
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["rebind.test"]):
        url = f"http://rebind.test:{server.port}/toot/callbacks"
        target = ssrf.target(url)

        response = client.post_json(url, "{}", target=target)

    assert response.status == 200
    [request] = server.requests
    assert request.path == "/toot/callbacks"
    assert request.headers["Host"] == f"rebind.test:{server.port}"
    assert dns.lookups == ["rebind.test"]


def test_without_the_pin_the_name_is_looked_up_again(dns):
    # The control of the test above: requests alone resolves the name a second time.
    answer_once(dns, "rebind.test")
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["rebind.test"]):
        url = f"http://rebind.test:{server.port}/"
        ssrf.target(url)

        with pytest.raises(requests.ConnectionError):
            client.post_json(url, "{}")

    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert server.requests == []


def test_the_pin_applies_only_to_its_own_host_and_port(dns):
    answer_once(dns, "pinned.test")
    with (
        HTTPServer() as pinned,
        HTTPServer() as other,
        toot_settings(ALLOWED_CALLBACK_HOSTS=["pinned.test"]),
    ):
        target = ssrf.target(f"http://pinned.test:{pinned.port}/")

        client.post_json(other.url, "{}", target=target)  # another host: connects as usual

    assert pinned.requests == []
    assert other.requests[0].headers["Host"] == f"127.0.0.1:{other.port}"


def test_a_published_event_is_delivered_to_the_address_checked(celery_worker, eventually, dns):
    answer_once(dns, "sub.test")
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["sub.test"]):
        store.add(channel, f"http://sub.test:{server.port}/toot/callbacks")
        publishing.publish(channel, {"id": 1}, prefix="")

        eventually(lambda: server.requests, what="the delivery")

    assert server.requests[0].headers["Host"] == f"sub.test:{server.port}"
    assert dns.lookups == ["sub.test"]


def test_plain_http_through_a_proxy_names_the_checked_address(dns):
    answer_once(dns, "proxied.test")
    with (
        HTTPServer() as proxy,
        toot_settings(
            ALLOWED_CALLBACK_HOSTS=["proxied.test"], HTTP_SESSION="tests.test_transport.session"
        ),
    ):
        SESSION["session"] = requests.Session()
        SESSION["session"].trust_env = False
        SESSION["session"].proxies = {"http": proxy.url}

        outcome = attempt("http://proxied.test:8765/cb")

    assert outcome.ok
    [request] = proxy.requests
    assert request.path == "http://127.0.0.1:8765/cb"  # the proxy does not resolve the name
    assert request.headers["Host"] == "proxied.test:8765"
    assert dns.lookups == ["proxied.test"]


# HTTP_SESSION -------------------------------------------------------------------------


class TaggingSession(requests.Session):
    """A project's Session subclass, with state of its own that its methods use."""

    def __init__(self, tag):
        super().__init__()
        self.tag = tag

    def request(self, method, url, *args, **kwargs):
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "X-Tag": self.tag}
        return super().request(method, url, *args, **kwargs)


def test_http_session_settings_apply_but_its_adapters_are_left_alone(dns):
    answer_once(dns, "sub.test")
    user_session = TaggingSession("tagged")
    user_session.headers["X-Test-Session"] = "marked"
    user_session.auth = ("toot", "s3cret")
    adapters = dict(user_session.adapters)
    SESSION["session"] = user_session
    with (
        HTTPServer() as server,
        toot_settings(
            ALLOWED_CALLBACK_HOSTS=["sub.test"], HTTP_SESSION="tests.test_transport.session"
        ),
    ):
        outcome = attempt(f"http://sub.test:{server.port}/cb")

    assert outcome.ok
    [request] = server.requests
    assert request.headers["X-Test-Session"] == "marked"
    assert request.headers["X-Tag"] == "tagged"
    assert request.headers["Authorization"].startswith("Basic ")
    assert request.headers["Host"] == f"sub.test:{server.port}"
    assert dns.lookups == ["sub.test"]
    assert user_session.adapters == adapters  # the same HTTPAdapter objects, not toot's
    assert not any(isinstance(a, transport.TootAdapter) for a in user_session.adapters.values())


def test_a_session_that_mounts_a_toot_adapter_is_used_as_it_is():
    user_session = requests.Session()
    user_session.mount("https://", transport.TootAdapter(pool_maxsize=50))

    assert client.pinning_session(user_session, "https://sub.example/cb") is user_session
    copy = client.pinning_session(user_session, "http://sub.example/cb")
    assert copy is not user_session
    assert isinstance(copy.get_adapter("http://sub.example/cb"), transport.TootAdapter)


# TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def trusting_session(ca, tmp_path):
    """HTTP_SESSION: a session that trusts the test CA."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    SESSION["session"] = requests.Session()
    SESSION["session"].verify = str(bundle)
    SESSION["session"].trust_env = False  # else $REQUESTS_CA_BUNDLE would win over verify
    with toot_settings(HTTP_SESSION="tests.test_transport.session"):
        yield SESSION["session"]


@pytest.fixture(params=["requests", "own pools", "own pools, a CA directory"])
def trusting(request, ca, tmp_path, monkeypatch):
    """The test CA trusted by a user's session (requests), or by toot's own pools, which
    take the CA bundle the environment names, a file or a hashed directory, as requests
    would."""
    if request.param == "requests":
        yield request.getfixturevalue("trusting_session")
        return
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    if request.param.endswith("directory"):
        subject_hash = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(bundle)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        bundle = tmp_path / "certs"
        bundle.mkdir()
        ca.cert_pem.write_to_path(str(bundle / f"{subject_hash}.0"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    yield None


class TLSServer(HTTPServer):
    """An https server with a certificate for ``names``; ``sni`` lists the names it is sent."""

    def __init__(self, ca, *names):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        self.sni: list[str | None] = []
        context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        super().__init__(tls=context)


def test_https_keeps_sni_and_verification_for_the_name(ca, trusting, dns):
    answer_once(dns, "secure.test")
    server = TLSServer(ca, "secure.test")
    with server, toot_settings(ALLOWED_CALLBACK_HOSTS=[]):
        url = f"https://secure.test:{server.port}/toot/callbacks"  # loopback: allowed network

        outcome = attempt(url)

    assert outcome.ok, outcome.error
    assert server.sni == ["secure.test"]
    assert server.requests[0].headers["Host"] == f"secure.test:{server.port}"
    assert dns.lookups == ["secure.test"]


@pytest.mark.parametrize("names", [("127.0.0.1",), ("other.test",)])
def test_https_refuses_a_certificate_for_another_name(ca, trusting, dns, names):
    # A certificate for the address toot connects to is no certificate for the name.
    answer_once(dns, "secure.test")
    with TLSServer(ca, *names) as server:
        outcome = attempt(f"https://secure.test:{server.port}/")

    assert not outcome.ok
    assert "SSLError" in outcome.error
    assert "secure.test" in outcome.error
    assert server.requests == []


def test_two_names_on_one_address_never_share_a_verified_connection(ca, trusting, dns):
    # Kept-alive connections are pooled per address and name: b.test must get its own
    # handshake (and fail it), not a.test's verified connection.
    dns.answers["a.test"] = dns.answers["b.test"] = ["127.0.0.1"]
    server = TLSServer(ca, "a.test")
    with server:
        first = attempt(f"https://a.test:{server.port}/")
        second = attempt(f"https://b.test:{server.port}/")
        third = attempt(f"https://a.test:{server.port}/")

    assert first.ok, first.error
    assert not second.ok
    assert "SSLError" in second.error
    assert third.ok
    assert server.sni == ["a.test", "b.test"]  # the third reused the first's connection
    assert [r.headers["Host"] for r in server.requests] == [f"a.test:{server.port}"] * 2


class ConnectProxy:
    """A forward proxy for https: it records each CONNECT target and relays the tunnel."""

    def __init__(self):
        self.targets: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopped = threading.Event()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self._stopped.set()

    def _serve(self):
        with self._listener:
            while not self._stopped.is_set():
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ")[1].decode()
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                peers = {client: upstream, upstream: client}
                while not self._stopped.is_set():
                    readable, _, _ = select.select(list(peers), [], [], 0.05)
                    for sock in readable:
                        data = sock.recv(65536)
                        if not data:
                            return
                        peers[sock].sendall(data)


def test_https_through_a_proxy_tunnels_to_the_checked_address(ca, trusting_session, dns):
    answer_once(dns, "secure.test")
    server = TLSServer(ca, "secure.test")
    with server, ConnectProxy() as proxy:
        trusting_session.proxies = {"https": proxy.url}

        outcome = attempt(f"https://secure.test:{server.port}/cb")

    assert outcome.ok, outcome.error
    assert proxy.targets == [f"127.0.0.1:{server.port}"]  # not the name, to look up again
    assert server.sni == ["secure.test"]
    assert server.requests[0].headers["Host"] == f"secure.test:{server.port}"
    assert dns.lookups == ["secure.test"]


def test_a_session_with_nothing_mounted_for_the_scheme_gets_toots_adapter():
    bare = requests.Session()
    bare.adapters.clear()

    copy = client.pinning_session(bare, "https://sub.example/cb")

    assert isinstance(copy.get_adapter("https://sub.example/cb"), transport.TootAdapter)
    assert not bare.adapters


def test_a_toot_adapter_works_outside_toot_calls_too():
    # A project may mount one on its own session and use it for anything: no pin, no
    # deadline, a plain HTTPAdapter.
    session = requests.Session()
    session.mount("http://", transport.TootAdapter())
    with HTTPServer() as server:
        response = session.post(server.url, data=b"{}", timeout=5)

    assert response.status_code == 200
    assert server.requests[0].headers["Host"] == f"127.0.0.1:{server.port}"


def test_a_deadline_stops_watching_once_cancelled():
    deadline = transport.Deadline(30)
    with deadline:
        deadline.cancel()
        deadline._expire()  # the timer firing just after the call ended
        deadline.watch(object())

    assert not deadline.expired
