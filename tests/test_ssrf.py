"""The SSRF guard (toot.http.ssrf): the address rules, the allow-lists, and where they apply.

The subscriptions endpoint refuses a URL with 422 and stores nothing; a delivery to it
is refused before any connection is opened, and dead-lettered at once. (How a delivery's
connection makes the check is tested in tests/test_transport.py.) Names that must
resolve to chosen addresses (a public and a private one together, a rebinding answer)
come from the ``dns`` fixture, the one stand-in here: no real resolver gives such
answers offline. Everything else resolves for real (``localhost``) or is an IP literal.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import uuid

import pytest
from django.urls import reverse

import toot
from tests.http_server import HTTPServer
from tests.utils import callback_urls, toot_settings
from toot.http import ssrf
from toot.models import DeadLetter
from toot.protocol.events import Event, wire_json
from toot.publisher import delivery, store

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",  # IPv4-mapped form of a public address
    "2002:808:808::1",  # 6to4 form of 8.8.8.8
    "64:ff9b::808:808",  # NAT64 form of 8.8.8.8
]

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local address (where clouds serve instance metadata)"),
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("fc00::1", "unique local"),
    ("fd12:3456:789a::1", "unique local"),
    ("fec0::1", "site-local"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("2001::1", "Teredo"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    # IPv4-mapped, 6to4 and NAT64 forms lead to the IPv4 address they carry.
    ("::ffff:127.0.0.1", "leads to 127.0.0.1, a loopback"),
    ("::ffff:10.0.0.1", "leads to 10.0.0.1, a private"),
    ("::ffff:169.254.169.254", "leads to 169.254.169.254, a link-local"),
    ("::ffff:100.64.0.1", "leads to 100.64.0.1, a carrier-grade NAT"),
    ("2002:7f00:1::1", "leads to 127.0.0.1, a loopback"),
    ("2002:a9fe:a9fe::", "leads to 169.254.169.254, a link-local"),
    ("2002:c0a8:101::1", "leads to 192.168.1.1, a private"),
    ("64:ff9b::7f00:1", "leads to 127.0.0.1, a loopback"),
    ("64:ff9b::a9fe:a9fe", "leads to 169.254.169.254, a link-local"),
    ("64:ff9b::10.0.0.1", "leads to 10.0.0.1, a private"),
]


def at_delivery(url):
    """What a delivery checks: the URL's form before the request, then, as its connection
    opens, the host's addresses; where that connection may go."""
    return ssrf.addresses(*ssrf.callback_host(url))


def no_allow_lists(**options):
    """The tests' settings without their loopback allow-lists: the rules as shipped."""
    return toot_settings(
        **{"ALLOWED_CALLBACK_HOSTS": [], "ALLOWED_CALLBACK_NETWORKS": [], **options}
    )


# The address rules --------------------------------------------------------------------


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert ssrf.address_error(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_addresses_that_are_not_public_are_refused(address, reason):
    error = ssrf.address_error(ipaddress.ip_address(address))

    assert error is not None
    assert reason in error


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("10.20.30.40", "10.0.0.0/8"),
        ("fd00::5", "fd00::/8"),
        ("::ffff:127.0.0.1", "127.0.0.0/8"),  # the mapped form of an allowed address
        ("64:ff9b::a00:5", "10.0.0.0/8"),
    ],
)
def test_an_allowed_network_admits_its_addresses(address, network):
    allowed = (ipaddress.ip_network(network),)

    assert ssrf.address_error(ipaddress.ip_address(address), allowed) is None
    assert ssrf.address_error(ipaddress.ip_address(address)) is not None


def test_an_allowed_network_admits_nothing_else():
    allowed = (ipaddress.ip_network("127.0.0.0/8"),)

    assert "private" in str(ssrf.address_error(ipaddress.ip_address("10.0.0.1"), allowed))
    assert "loopback" in str(ssrf.address_error(ipaddress.ip_address("::1"), allowed))


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("hooks.internal", ["hooks.internal"], True),
        ("hooks.internal.", ["hooks.internal"], True),
        ("hooks.internal", ["hooks.internal."], True),
        ("hooks.internal", ["Hooks.Internal"], True),
        ("a.hooks.internal", ["hooks.internal"], False),
        ("a.corp.example", [".corp.example"], True),
        ("a.b.corp.example", [".corp.example"], True),
        ("corp.example", [".corp.example"], True),
        ("evilcorp.example", [".corp.example"], False),
        ("corp.example.evil", [".corp.example"], False),
        ("10.1.2.3", ["10.1.2.3"], True),
        ("::1", ["[::1]"], True),
        ("hooks.internal", [], False),
    ],
)
def test_allowed_callback_hosts_match_as_django_allowed_hosts(host, patterns, allowed):
    with toot_settings(ALLOWED_CALLBACK_HOSTS=patterns):
        assert ssrf.host_allowed(host) is allowed


# Checking a URL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://8.8.8.8/cb", "must be an https URL"),
        ("ftp://8.8.8.8/cb", "must be an http or https URL"),
        ("https://user:secret@8.8.8.8/cb", "must not carry credentials"),
        ("https://:secret@8.8.8.8/cb", "must not carry credentials"),
        ("https://127.0.0.1/cb", "host 127.0.0.1 is a loopback address"),
        ("https://[::1]:8443/cb", "host ::1 is a loopback address"),
        ("https://169.254.169.254/latest/meta-data/", "instance metadata"),
        (
            "https://[::ffff:169.254.169.254]/latest",
            "host ::ffff:169.254.169.254 is an address that leads to 169.254.169.254, a link-local",
        ),
        ("https://[64:ff9b::a9fe:a9fe]/latest", "leads to 169.254.169.254"),
        ("https://10.0.0.1/cb", "private"),
        # A real name that resolves locally, and the spellings of 127.0.0.1 that
        # inet_aton reads: only the resolved address tells.
        ("https://localhost/cb", "host localhost resolves to"),
        ("https://LOCALHOST:8443/cb", "host localhost resolves to"),
        ("https://2130706433/cb", "resolves to 127.0.0.1, a loopback"),
        ("https://0x7f.1/cb", "resolves to 127.0.0.1, a loopback"),
        ("https://127.1/cb", "resolves to 127.0.0.1, a loopback"),
        ("https://0/cb", "resolves to 0.0.0.0"),
        (f"https://{'a' * 64}.com/cb", "not a valid host name"),
    ],
)
def test_refused_urls(url, reason):
    with no_allow_lists(), pytest.raises(toot.InvalidCallback, match="callback_url") as refused:
        ssrf.check_callback_url(url)
    assert reason in str(refused.value)
    with no_allow_lists(), pytest.raises(toot.InvalidCallback) as delivering:
        at_delivery(url)
    assert str(delivering.value) == str(refused.value)


@pytest.mark.parametrize(
    "url", ["https://8.8.8.8/cb", "https://[2606:4700::1111]:8443/cb", "https://8.8.8.8:443/x?y=1"]
)
def test_public_https_urls_pass(url):
    with no_allow_lists():
        ssrf.check_callback_url(url)
        [address] = at_delivery(url)
    host, _port = ssrf.callback_host(url)
    assert ipaddress.ip_address(address) == ipaddress.ip_address(host)


def test_a_host_is_refused_when_any_of_its_addresses_is_not_public(dns):
    dns.answers["mixed.test"] = ["93.184.216.34", "2606:4700::1111", "10.0.0.1"]

    with no_allow_lists(), pytest.raises(toot.InvalidCallback) as refused:
        at_delivery("https://mixed.test/cb")

    assert "mixed.test resolves to 10.0.0.1, a private address" in str(refused.value)


def test_a_host_whose_addresses_are_all_public_connects_to_them_in_order(dns):
    dns.answers["public.test"] = ["93.184.216.34", "2606:4700::1111"]

    with no_allow_lists():
        addresses = at_delivery("https://public.test:8443/cb")

    assert addresses == ["93.184.216.34", "2606:4700::1111"]
    assert ssrf.callback_host("https://public.test:8443/cb") == ("public.test", 8443)


def test_an_ipv4_mapped_answer_is_connected_to_as_ipv4(dns):
    dns.answers["mapped.test"] = ["::ffff:93.184.216.34"]

    with no_allow_lists():
        assert at_delivery("https://mapped.test/cb") == ["93.184.216.34"]


def test_allowed_networks_admit_a_private_answer_but_not_plain_http(dns):
    dns.answers["mixed.test"] = ["93.184.216.34", "10.0.0.1"]

    with no_allow_lists(ALLOWED_CALLBACK_NETWORKS=["10.0.0.0/8"]):
        assert at_delivery("https://mixed.test/cb") == ["93.184.216.34", "10.0.0.1"]
        with pytest.raises(toot.InvalidCallback, match="must be an https URL"):
            at_delivery("http://mixed.test/cb")


def test_an_allowed_host_takes_any_address_and_plain_http(dns):
    dns.answers["hooks.internal.test"] = ["10.1.2.3"]

    with no_allow_lists(ALLOWED_CALLBACK_HOSTS=[".internal.test"]):
        addresses = at_delivery("http://hooks.internal.test:8000/cb")

    assert addresses == ["10.1.2.3"]


def test_an_allowed_host_is_not_even_resolved_at_registration(dns):
    dns.answers["hooks.internal.test"] = socket.gaierror(socket.EAI_NONAME, "unknown")

    with no_allow_lists(ALLOWED_CALLBACK_HOSTS=["hooks.internal.test"]):
        ssrf.check_callback_url("http://hooks.internal.test/cb")
    with no_allow_lists(), pytest.raises(toot.InvalidCallback, match="does not resolve"):
        ssrf.check_callback_url("https://hooks.internal.test/cb")
    assert dns.lookups == ["hooks.internal.test"]  # only the second check asked


def test_idn_hosts_are_checked_as_urllib3_connects_to_them(dns):
    dns.answers["xn--bcher-kva.test"] = ["10.0.0.1"]

    with no_allow_lists(), pytest.raises(toot.InvalidCallback, match="xn--bcher-kva.test"):
        at_delivery("https://bücher.test/cb")
    with no_allow_lists(ALLOWED_CALLBACK_HOSTS=["xn--bcher-kva.test"]):
        assert ssrf.callback_host("https://BÜCHER.test/cb") == ("xn--bcher-kva.test", 443)
        assert at_delivery("https://BÜCHER.test/cb") == ["10.0.0.1"]


def test_a_name_that_does_not_resolve_is_an_oserror_at_delivery(dns):
    dns.answers["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with no_allow_lists(), pytest.raises(socket.gaierror):
        at_delivery("https://gone.test/cb")


# The subscriptions endpoint -----------------------------------------------------------

CHANNEL = "org.example.test.users.updated.v1"


def subscribe(client, callback_url):
    return client.post(
        reverse("toot:subscriptions"),
        json.dumps({"channel": CHANNEL, "callback_url": callback_url}),
        content_type="application/json",
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://8.8.8.8/toot/callbacks", "must be an https URL"),
        ("https://127.0.0.1:8000/toot/callbacks", "loopback"),
        ("https://localhost/toot/callbacks", "host localhost resolves to"),
        ("https://169.254.169.254/latest/meta-data/", "instance metadata"),
        ("https://[::ffff:10.0.0.1]/cb", "leads to 10.0.0.1"),
        ("https://[fd00::1]/cb", "unique local"),
        ("https://mixed.test/cb", "resolves to 10.0.0.1, a private address"),
        ("https://gone.test/cb", "host gone.test does not resolve"),
    ],
)
def test_registering_a_refused_url_answers_422_and_stores_nothing(client, redis, dns, url, reason):
    dns.answers["mixed.test"] = ["93.184.216.34", "10.0.0.1"]
    dns.answers["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    store.add(CHANNEL, "https://kept.example/cb")

    with no_allow_lists():
        response = subscribe(client, url)

    assert response.status_code == 422
    assert response["Content-Type"] == "application/json"
    assert reason in response.json()["error"]
    assert callback_urls(CHANNEL) == ["https://kept.example/cb"]


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("https://8.8.8.8/toot/callbacks", {}),
        ("https://public.test/toot/callbacks", {}),
        (
            "http://hooks.internal.test/toot/callbacks",
            {"ALLOWED_CALLBACK_HOSTS": [".internal.test"]},
        ),
        ("https://10.9.8.7/toot/callbacks", {"ALLOWED_CALLBACK_NETWORKS": ["10.0.0.0/8"]}),
    ],
)
def test_registering_an_allowed_url_answers_201(client, redis, dns, url, options):
    dns.answers["public.test"] = ["93.184.216.34"]

    with no_allow_lists(**options):
        response = subscribe(client, url)

    assert response.status_code == 201, response.content
    assert callback_urls(CHANNEL) == [url]


def test_a_temporary_resolver_failure_answers_503(client, redis, dns):
    dns.answers["flaky.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")

    with no_allow_lists():
        response = subscribe(client, "https://flaky.test/cb")

    assert response.status_code == 503
    assert "try again" in response.json()["error"]
    assert callback_urls(CHANNEL) == []


def test_a_url_stored_before_the_rules_can_still_be_unsubscribed(client, redis):
    store.add(CHANNEL, "http://10.0.0.1/cb")

    with no_allow_lists():
        response = client.delete(
            reverse("toot:subscriptions"),
            QUERY_STRING=f"channel={CHANNEL}&callback_url=http://10.0.0.1/cb",
        )

    assert response.status_code == 204
    assert callback_urls(CHANNEL) == []


# Deliveries ---------------------------------------------------------------------------


def make_event(channel=CHANNEL):
    return Event(channel, {"id": 1}).to_dict()


def attempt(url):
    event = make_event()
    return delivery.attempt(url, event["channel"], wire_json(event).encode(), event["id"])


@pytest.fixture
def listener():
    """A bare listening socket on loopback: a connection to it shows up as readable."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def connection_waiting(listener):
    readable, _, _ = select.select([listener], [], [], 0)
    return bool(readable)


def test_a_refused_delivery_never_opens_a_connection(listener, redis):
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/cb"

    with no_allow_lists():
        outcome = attempt(url)

    assert outcome.refused
    assert not outcome.ok
    assert outcome.status is None
    assert "InvalidCallback" in outcome.error
    assert "host 127.0.0.1 is a loopback address" in outcome.error
    assert not connection_waiting(listener)
    # With loopback allowed, the same attempt does reach the socket (and times out there).
    with toot_settings(CONNECT_TIMEOUT=0.2, READ_TIMEOUT=0.2):
        allowed = attempt(url)
    assert not allowed.refused
    assert connection_waiting(listener)


@pytest.mark.django_db(transaction=True)
def test_a_refused_delivery_is_dead_lettered_at_once(celery_worker, eventually):
    suffix = f"{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as subscriber:
        store.add(f"org.example.test.{suffix}", subscriber.url)

        with no_allow_lists():
            event = toot.publish(suffix, {"id": 1})
            eventually(DeadLetter.objects.exists, what="the dead letter")

        assert subscriber.requests == []
    letter = DeadLetter.objects.get()
    assert (letter.event_id, letter.callback_url) == (event.id, subscriber.url)
    assert letter.attempts == 1  # RETRY_SCHEDULE has three retries; none was used
    assert letter.last_status is None
    assert "must be an https URL" in letter.last_error
    assert callback_urls(event.channel) == [subscriber.url]  # refused, not unsubscribed


def test_a_host_that_does_not_resolve_yet_is_retried(celery_worker, eventually, dns):
    answers = iter([socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), ["127.0.0.1"]])
    dns.answers["late.test"] = lambda: next(answers, ["127.0.0.1"])
    suffix = f"{uuid.uuid4().hex[:8]}.v1"
    with HTTPServer() as subscriber, toot_settings(ALLOWED_CALLBACK_HOSTS=["late.test"]):
        store.add(f"org.example.test.{suffix}", f"http://late.test:{subscriber.port}/cb")
        event = toot.publish(suffix, {"id": 1})

        eventually(lambda: subscriber.requests, what="the retried delivery")

    assert dns.lookups == ["late.test", "late.test"]
    [request] = subscriber.requests
    assert request.headers["Host"] == f"late.test:{subscriber.port}"
    assert request.json() == event.to_dict()


def test_an_address_that_python_knows_is_not_global_is_refused_too(monkeypatch):
    # Python's copy of IANA's registries backs up the explicit table.
    monkeypatch.setattr(ssrf, "BLOCKED_NETWORKS", ())

    assert ssrf.address_error(ipaddress.ip_address("10.0.0.1")) == "not a public address"
    assert ssrf.address_error(ipaddress.ip_address("8.8.8.8")) is None


def test_a_url_urllib3_cannot_encode_is_refused():
    with no_allow_lists(), pytest.raises(toot.InvalidCallback, match="not a valid URL"):
        ssrf.check_callback_url("https://\u0300a.example/cb")  # a label may not start so


def test_a_name_with_no_ip_address_is_refused(dns):
    dns.answers["empty.test"] = []

    with no_allow_lists(), pytest.raises(toot.InvalidCallback, match="resolves to no IP address"):
        at_delivery("https://empty.test/cb")
