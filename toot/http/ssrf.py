"""The SSRF guard: which callback URLs a publisher may POST to, and the address it connects to.

Anyone who can reach a publisher's subscriptions endpoint chooses the URLs its workers
POST to. Unchecked, that lets them aim the workers at the publisher's own network: the
cloud's instance metadata (169.254.169.254), an admin port on loopback, a database on a
private address. So a callback URL must be https and resolve only to public addresses,
unless the project allows the host (``ALLOWED_CALLBACK_HOSTS``) or the address's network
(``ALLOWED_CALLBACK_NETWORKS``). It is checked when it is registered, and again by every
delivery: its form and scheme before each request, its addresses as each connection opens,
which then connects to the very addresses that were checked (``toot.http.transport``): a
second DNS lookup could be answered differently by an attacker's name server (DNS
rebinding). Through a forward proxy (``PROXY_URL``) the proxy connects, after a lookup of
its own: the addresses are checked before each request, and cannot be pinned.

Subscription URLs (registering with a source) are not checked: the operator sets them in
``TOOT["SOURCES"]``, and they are often internal.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from urllib3.util import parse_url

from toot.conf import IPNetwork, conf
from toot.exceptions import InvalidCallback
from toot.protocol.validation import url_error

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv6 forms that carry an IPv4 address: judged by the IPv4 address they lead to.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

# Not public, with the reason a refusal gives. Most of IANA's special-purpose registries;
# ``is_global`` catches what Python's copy of them adds, but its answers differ between
# Python versions, so the ranges that matter are spelled out.
BLOCKED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), reason)
    for network, reason in [
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (where clouds serve instance metadata)"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),  # 255.255.255.255 included
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "an IPv4-compatible address (deprecated)"),
        ("::ffff:0:0:0/96", "an IPv4-translated address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/23", "an IETF protocol address (Teredo, benchmarking, ...)"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique local (private) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address (deprecated)"),
        ("ff00::/8", "a multicast address"),
    ]
)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 address leads to."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in SIX_TO_FOUR:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_error(address: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why a callback may not connect to ``address``, or None if it may."""
    embedded = embedded_ipv4(address)
    if any(address in network or (embedded and embedded in network) for network in allowed):
        return None
    if embedded is not None:
        reason = address_error(embedded)
        return reason and f"an address that leads to {embedded}, {reason}"
    for network, reason in BLOCKED_NETWORKS:
        if address in network:
            return reason
    if not address.is_global:  # what a newer Python's copy of the registries adds
        return "not a public address"
    return None


def host_allowed(host: str) -> bool:
    """Whether ``host`` (lower case) is in ALLOWED_CALLBACK_HOSTS, matched as ALLOWED_HOSTS is."""
    host = host.rstrip(".")
    return any(
        host == pattern.rstrip(".")
        or (pattern.startswith(".") and (host.endswith(pattern) or host == pattern[1:]))
        for pattern in conf.ALLOWED_CALLBACK_HOSTS
    )


# Pure, and called before every delivery: a publisher sends to few URLs, many times.
@functools.lru_cache(maxsize=1024)
def _parse(url: str) -> tuple[str, str, int]:
    error = url_error(url)
    if error:
        raise InvalidCallback(error)
    # The host as urllib3 connects to it (IDNA-encoded, lower case): the name checked here
    # must be the one the connection resolves.
    try:
        parts = parse_url(url)
    except ValueError:
        raise InvalidCallback("callback_url is not a valid URL") from None
    host = (parts.host or "").strip("[]")
    if not host or not parts.scheme:  # pragma: no cover - url_error has required both
        raise InvalidCallback("callback_url must name a host")
    return parts.scheme, host, parts.port or DEFAULT_PORTS[parts.scheme]


def _allowed_scheme(url: str) -> tuple[str, str, int, bool]:
    scheme, host, port = _parse(url)
    allowed = host_allowed(host)
    if scheme != "https" and not allowed:
        raise InvalidCallback(
            f"callback_url must be an https URL: plain http only goes to a host in "
            f'TOOT["ALLOWED_CALLBACK_HOSTS"], which {host} is not'
        )
    return scheme, host, port, allowed


def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    """Every address ``host`` resolves to, in the resolver's order of preference.

    A resolver failure raises ``socket.gaierror``: a name that does not resolve now may
    resolve later.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # the idna codec refuses, e.g., a label over 63 characters
        raise InvalidCallback(f"callback_url host {host} is not a valid host name") from None
    addresses = tuple(
        dict.fromkeys(
            ipaddress.ip_address(info[4][0])
            for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6)
        )
    )
    if not addresses:
        raise InvalidCallback(f"callback_url host {host} resolves to no IP address")
    return addresses


def _is_address(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def _check_addresses(host: str, addresses: tuple[IPAddress, ...]) -> None:
    allowed = conf.ALLOWED_CALLBACK_NETWORKS
    for address in addresses:
        reason = address_error(address, allowed)
        if reason:
            what = f"{host} is" if _is_address(host, address) else f"{host} resolves to {address},"
            raise InvalidCallback(
                f"callback_url host {what} {reason}; "
                'allow it with TOOT["ALLOWED_CALLBACK_HOSTS"] or TOOT["ALLOWED_CALLBACK_NETWORKS"]'
            )


def check_callback_url(url: str) -> None:
    """Refuse, with InvalidCallback and the reason, a URL that a delivery would refuse.

    What the subscriptions endpoint runs on a registration. An allowed host is not resolved
    (its addresses are allowed anyway); a temporary resolver failure (EAI_AGAIN) raises
    ``socket.gaierror``, which the endpoint answers with 503.
    """
    _scheme, host, port, allowed = _allowed_scheme(url)
    if allowed:
        return
    try:
        addresses = resolve(host, port)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise
        raise InvalidCallback(
            f"callback_url host {host} does not resolve ({exc.strerror})"
        ) from None
    _check_addresses(host, addresses)


def callback_host(url: str) -> tuple[str, int]:
    """The host and port a delivery to ``url`` connects to, once its form and scheme pass.

    Raises InvalidCallback for a URL no retry will make acceptable; its addresses are
    checked as the connection opens (``addresses``).
    """
    _scheme, host, port, _allowed = _allowed_scheme(url)
    return host, port


def addresses(host: str, port: int) -> list[str]:
    """Resolve ``host`` once; where a connection to it may go, or InvalidCallback.

    Every address must be allowed, unless the host is. In the resolver's order of
    preference; an IPv4-mapped address as the IPv4 address it is, for a host without IPv6.
    A host that does not resolve raises ``socket.gaierror`` (which may pass).
    """
    resolved = resolve(host, port)
    if not host_allowed(host):
        _check_addresses(host, resolved)
    return [str(getattr(address, "ipv4_mapped", None) or address) for address in resolved]
