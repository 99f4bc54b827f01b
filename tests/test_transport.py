"""toot.http.transport: a delivery's connection checks its host, and connects to what it checked.

Real servers on loopback, reached under names that the ``dns`` fixture answers once
with 127.0.0.1 and then never again (or differently, as a rebinding attacker would): a
call that looked the name up a second time would fail. TLS uses real certificates from
a throwaway CA (trustme), so SNI, verification against the name, CA_BUNDLE and
CLIENT_CERT are checked for real.
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

import toot
from tests.http_server import HTTPServer, Reply
from tests.utils import toot_settings
from toot.http import client, ssrf
from toot.protocol.events import Event, wire_json
from toot.publisher import delivery, publishing, store

NOT_AGAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def answer_once(dns, name, then=NOT_AGAIN):
    """``name`` resolves to 127.0.0.1 on the first lookup, to ``then`` afterwards."""
    answers = iter([["127.0.0.1"]])
    dns.answers[name] = lambda: next(answers, then)


def attempt(url):
    """One delivery attempt of a new event to ``url``."""
    event = Event(f"org.example.test.{uuid.uuid4().hex[:8]}.v1", {"id": 1}).to_dict()
    return delivery.attempt(url, event["channel"], wire_json(event).encode(), event["id"])


def deliver(url):
    return client.post_to_callback(url, b"{}", {})


# Plain http ---------------------------------------------------------------------------


def test_a_delivery_connects_to_the_checked_address_under_its_name(dns):
    answer_once(dns, "rebind.test", then=["10.255.255.1"])
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["rebind.test"]):
        response = deliver(f"http://rebind.test:{server.port}/toot/callbacks")

    assert response.status == 200
    [request] = server.requests
    assert request.path == "/toot/callbacks"
    assert request.headers["Host"] == f"rebind.test:{server.port}"
    assert dns.lookups == ["rebind.test"]


def test_a_check_before_the_request_would_not_be_enough(dns):
    # The control of the test above: checking the name, then letting a client connect to
    # it (as requests does for registrations) looks it up twice, and the second answer
    # is the rebinding attacker's (here, none at all).
    answer_once(dns, "rebind.test")
    with HTTPServer() as server:
        ssrf.addresses("rebind.test", server.port)

        with pytest.raises(requests.ConnectionError):
            client.post_to_source(f"http://rebind.test:{server.port}/", "{}", {})

    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert server.requests == []


def test_a_kept_alive_connection_is_reused_without_a_lookup(dns):
    answer_once(dns, "kept.test")
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["kept.test"]):
        for _ in range(3):
            assert deliver(f"http://kept.test:{server.port}/").ok

    assert dns.lookups == ["kept.test"]
    assert len(server.requests) == 3


def test_every_checked_address_is_tried_in_turn(dns):
    # Nobody listens on 127.0.0.2 (the server binds 127.0.0.1): the first address
    # refuses, the second answers, with no second lookup in between.
    dns.answers["two.test"] = ["127.0.0.2", "127.0.0.1"]
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["two.test"]):
        response = deliver(f"http://two.test:{server.port}/")

    assert response.ok
    assert dns.lookups == ["two.test"]


def test_a_published_event_is_delivered_to_the_address_checked(celery_worker, eventually, dns):
    answer_once(dns, "sub.test")
    channel = f"org.example.test.{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as server, toot_settings(ALLOWED_CALLBACK_HOSTS=["sub.test"]):
        store.add(channel, f"http://sub.test:{server.port}/toot/callbacks")
        publishing.publish(channel, {"id": 1}, prefix="")

        eventually(lambda: server.requests, what="the delivery")

    assert server.requests[0].headers["Host"] == f"sub.test:{server.port}"
    assert dns.lookups == ["sub.test"]


def test_through_a_proxy_an_allowed_host_is_left_to_the_proxy(dns):
    dns.answers["hooks.internal.test"] = ["10.1.2.3"]
    with (
        HTTPServer() as proxy,
        toot_settings(PROXY_URL=proxy.url, ALLOWED_CALLBACK_HOSTS=[".internal.test"]),
    ):
        outcome = attempt("http://hooks.internal.test:8765/cb")

    assert outcome.ok
    [request] = proxy.requests
    assert request.path == "http://hooks.internal.test:8765/cb"
    assert request.headers["Host"] == "hooks.internal.test:8765"
    assert dns.lookups == []  # an allowed host may resolve to anything: the proxy's to look up


# TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def bundle(ca, tmp_path):
    """The test CA as a PEM file."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(params=["file", "directory"])
def trusting(request, ca, bundle, tmp_path):
    """CA_BUNDLE set to the test CA: a PEM file, or a directory as c_rehash makes it."""
    if request.param == "directory":
        subject_hash = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(bundle)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        directory = tmp_path / "certs"
        directory.mkdir()
        ca.cert_pem.write_to_path(str(directory / f"{subject_hash}.0"))
        bundle = directory
    with toot_settings(CA_BUNDLE=str(bundle)):
        yield bundle


class TLSServer(HTTPServer):
    """An https server with a certificate for ``names``; ``sni`` lists the names it is sent.

    With ``client_ca``, it asks for a client certificate issued by that CA.
    """

    def __init__(self, ca, *names, client_ca=None):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
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


def test_a_registration_trusts_the_ca_bundle_too(ca, trusting):
    server = TLSServer(ca, "localhost")
    with server:
        url = f"https://localhost:{server.port}/toot/subscriptions"

        response = client.post_to_source(url, "{}", {})

    assert response.ok
    assert server.sni == ["localhost"]


def test_without_the_ca_bundle_the_test_ca_is_not_trusted(ca):
    with TLSServer(ca, "localhost") as server:
        url = f"https://localhost:{server.port}/"

        outcome = attempt(url)
        with pytest.raises(requests.exceptions.SSLError):
            client.post_to_source(url, "{}", {})

    assert outcome.error.startswith("SSLError: ")
    assert "certificate verify failed" in outcome.error
    assert server.requests == []


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


def test_a_new_connection_checks_the_name_again(ca, trusting, dns):
    # The peer closes each connection: the next one resolves the name again, and is
    # refused on a rebinding answer (the fixture's second) before anything is sent.
    answer_once(dns, "rebind.test", then=["127.0.0.1", "10.0.0.1"])
    with TLSServer(ca, "rebind.test") as server, toot_settings(ALLOWED_CALLBACK_HOSTS=[]):
        server.reply = Reply(200, headers={"Connection": "close"})
        first = attempt(f"https://rebind.test:{server.port}/")
        second = attempt(f"https://rebind.test:{server.port}/")

    assert first.ok, first.error
    assert second.refused
    assert "rebind.test resolves to 10.0.0.1, a private address" in second.error
    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert len(server.requests) == 1


def test_two_names_on_one_address_never_share_a_verified_connection(ca, trusting, dns):
    # Kept-alive connections are pooled per host name: b.test must get its own handshake
    # (and fail it), not a.test's verified connection.
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


# CLIENT_CERT --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_ca():
    return trustme.CA()


@pytest.fixture
def client_cert(client_ca, tmp_path):
    """A client certificate of client_ca: (certificate file, key file, both in one file)."""
    issued = client_ca.issue_cert("publisher@example.org")
    cert, key, both = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "both.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    issued.private_key_and_cert_chain_pem.write_to_path(str(both))
    return str(cert), str(key), str(both)


@pytest.mark.parametrize("form", ["pair", "one file"])
def test_the_client_certificate_is_presented(ca, bundle, client_ca, client_cert, form, dns):
    cert, key, both = client_cert
    dns.answers["mtls.test"] = ["127.0.0.1"]
    with (
        TLSServer(ca, "mtls.test", client_ca=client_ca) as server,
        toot_settings(CA_BUNDLE=str(bundle), CLIENT_CERT=[cert, key] if form == "pair" else both),
    ):
        url = f"https://mtls.test:{server.port}/"
        outcome = attempt(url)
        registered = client.post_to_source(url, "{}", {})

    assert outcome.ok, outcome.error
    assert registered.ok
    assert len(server.requests) == 2


def test_without_a_client_certificate_such_a_peer_refuses(ca, bundle, client_ca, dns):
    dns.answers["mtls.test"] = ["127.0.0.1"]
    with (
        TLSServer(ca, "mtls.test", client_ca=client_ca) as server,
        toot_settings(CA_BUNDLE=str(bundle)),
    ):
        outcome = attempt(f"https://mtls.test:{server.port}/")

    assert not outcome.ok
    assert outcome.status is None
    assert server.requests == []


# A proxy for https ----------------------------------------------------------------------


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


def test_https_through_a_proxy_tunnels_to_the_host_checked(ca, bundle, dns):
    # toot checks the host's addresses, then names the host in the CONNECT: the proxy
    # looks it up again (this proxy with the same stand-in resolver) and connects.
    dns.answers["secure.test"] = ["127.0.0.1"]
    server = TLSServer(ca, "secure.test")
    with (
        server,
        ConnectProxy() as proxy,
        toot_settings(CA_BUNDLE=str(bundle), PROXY_URL=proxy.url, ALLOWED_CALLBACK_HOSTS=[]),
    ):
        outcome = attempt(f"https://secure.test:{server.port}/cb")

    assert outcome.ok, outcome.error
    assert proxy.targets == [f"secure.test:{server.port}"]
    assert server.sni == ["secure.test"]
    assert server.requests[0].headers["Host"] == f"secure.test:{server.port}"
    assert dns.lookups == ["secure.test", "secure.test"]  # toot's check, the proxy's connect


def test_https_through_a_proxy_to_a_refused_host_sends_no_connect(dns):
    dns.answers["metadata.test"] = ["169.254.169.254"]
    with ConnectProxy() as proxy, toot_settings(PROXY_URL=proxy.url, ALLOWED_CALLBACK_HOSTS=[]):
        outcome = attempt("https://metadata.test/latest/meta-data/")

    assert outcome.refused
    assert "instance metadata" in outcome.error
    assert proxy.targets == []


def test_a_refused_connection_raises_invalid_callback_through_the_pool(dns):
    dns.answers["private.test"] = ["10.0.0.1"]
    with (
        toot_settings(ALLOWED_CALLBACK_HOSTS=[]),
        pytest.raises(toot.InvalidCallback, match="private.test resolves to 10.0.0.1"),
    ):
        deliver("https://private.test/cb")
