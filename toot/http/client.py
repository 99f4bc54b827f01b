"""Every outgoing HTTP call toot makes: timeouts, no redirects, a capped response read.

Deliveries (``post_to_callback``) go through urllib3 pools of toot's own, whose connections
make the SSRF check as they open (``toot.http.transport``), within a total deadline.
Registrations (``post_to_source``) go through requests: the operator chose their URLs.
Both take ``PROXY_URL``, ``CA_BUNDLE`` and ``CLIENT_CERT`` from the settings, and nothing
from the environment (no ``HTTPS_PROXY``, no ``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import certifi
import requests
import urllib3
from urllib3.exceptions import NameResolutionError
from urllib3.util import parse_url

from toot.conf import conf
from toot.engine import isolation
from toot.engine.per_process import PerProcess
from toot.http import ssrf, transport

# Only the start of an answer is kept, for error messages: a peer must not be able to
# make a worker read an endless body.
MAX_RESPONSE_BYTES = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}
# What post_to_callback raises when no complete answer comes (DeadlineExceeded included).
ERRORS = (urllib3.exceptions.HTTPError, OSError)


class Response:
    """What toot keeps of an answer: status, headers and at most MAX_RESPONSE_BYTES of body."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def excerpt(self, limit: int = 200) -> str:
        # One line of printable text: it comes from a peer and ends up in logs and command output.
        text = self.body[:limit].decode("utf-8", "replace")
        return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


class Pools:
    """A process's PoolManagers, one per outgoing setup (proxy, TLS files, allow-lists).

    A new setup (``override_settings``, in tests) gets pools of its own: a connection
    opened under other allow-lists, or verified against another CA, is never reused.
    """

    LIMIT = 8  # setups kept; in production there is one

    def __init__(self) -> None:
        self._managers: OrderedDict[tuple[Any, ...], urllib3.PoolManager] = OrderedDict()
        self._lock = threading.Lock()

    def manager(self) -> urllib3.PoolManager:
        proxy, bundle, cert = conf.PROXY_URL, conf.CA_BUNDLE, conf.CLIENT_CERT
        # A connection per sender thread, the most requests this process has in flight to
        # one host (several callback URLs may share it, MAX_IN_FLIGHT each): a thread
        # finding none kept would open one, and the pool close it after.
        size = max(10, conf.SENDERS)
        raw = conf.raw
        rules = (
            repr(raw.get("ALLOWED_CALLBACK_HOSTS")),
            repr(raw.get("ALLOWED_CALLBACK_NETWORKS")),
        )
        key = (proxy, bundle, cert, size, *rules)
        manager = self._managers.get(key)
        if manager is not None:
            with contextlib.suppress(KeyError):  # another setup's thread just dropped it
                self._managers.move_to_end(key)  # the least recently used goes first
        else:
            with self._lock:
                manager = self._managers.get(key) or _new_manager(proxy, bundle, cert, size)
                self._managers[key] = manager
                while len(self._managers) > self.LIMIT:
                    self._managers.popitem(last=False)[1].clear()  # closes its idle connections
        return manager


def _new_manager(
    proxy: str | None, bundle: str | None, cert: tuple[str, str | None] | None, size: int
) -> urllib3.PoolManager:
    bundle = bundle or certifi.where()
    tls: dict[str, Any] = {"ca_cert_dir" if os.path.isdir(bundle) else "ca_certs": bundle}
    if cert is not None:
        tls["cert_file"], tls["key_file"] = cert
    manager: urllib3.PoolManager
    if proxy is None:
        manager = urllib3.PoolManager(num_pools=100, maxsize=size, **tls)
    else:
        url = parse_url(proxy)
        headers = None
        if url.auth:  # urllib3 would send no Proxy-Authorization for the URL's user:password
            headers = urllib3.make_headers(proxy_basic_auth=unquote(url.auth))
        proxy = url._replace(auth=None).url
        manager = urllib3.ProxyManager(
            proxy, num_pools=100, maxsize=size, proxy_headers=headers, **tls
        )
    manager.pool_classes_by_scheme = transport.POOL_CLASSES
    return manager


_pools = PerProcess(Pools)


def post_to_callback(url: str, body: bytes, headers: Mapping[str, str]) -> Response:
    """POST a delivery: a JSON ``body`` with ``headers`` added, under the SSRF rules.

    Raises InvalidCallback for a URL the rules refuse, before any connection to it is
    made, and one of ERRORS for no complete answer. The whole call, however slowly the
    peer answers, ends with ``transport.DeadlineExceeded`` after CONNECT_TIMEOUT +
    READ_TIMEOUT seconds.
    """
    isolation.check("the network", outside_helpers=False)
    host, port = ssrf.callback_host(url)
    manager = _pools().manager()
    if isinstance(manager, urllib3.ProxyManager) and not ssrf.host_allowed(host):
        # The proxy connects, after a lookup of its own that toot cannot pin: the host's
        # addresses are checked now, and a rebinding answer to the proxy is its to refuse.
        ssrf.addresses(host, port)
    deadline = transport.Deadline(conf.CONNECT_TIMEOUT + conf.READ_TIMEOUT)
    with deadline:
        try:
            response = manager.urlopen(
                "POST",
                url,
                body=body,
                headers={**JSON_HEADERS, **headers},
                retries=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=conf.CONNECT_TIMEOUT, read=conf.READ_TIMEOUT),
                preload_content=False,
            )
            deadline.watch(response)
            complete = False
            try:
                content, complete = _read_capped(response.stream(8192))
            finally:
                deadline.cancel()  # before the connection goes back to its pool
                if not complete:  # what is left of the body must not meet the next call
                    response.close()
                response.release_conn()
        except ERRORS as exc:
            if deadline.expired:
                raise deadline.exceeded() from exc
            raise
        if deadline.expired:  # the cut looked like the end of a body without a length
            raise deadline.exceeded()
        return Response(response.status, response.headers, content)


def error_text(exc: BaseException, url: str) -> str:
    """``Kind: what happened`` for one of ERRORS, in the kinds dead letters have always shown."""
    if isinstance(exc, (NameResolutionError, socket.gaierror)):
        return f"ConnectionError: cannot resolve {url}: {exc.__cause__ or exc}"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        # Its own text starts with the repr of a connection object.
        return f"ConnectionError: {exc.__cause__ or exc}"
    kinds = [
        (urllib3.exceptions.SSLError, "SSLError"),
        (urllib3.exceptions.ProxyError, "ProxyError"),
        (urllib3.exceptions.ConnectTimeoutError, "ConnectTimeout"),
        (urllib3.exceptions.TimeoutError, "ReadTimeout"),
    ]
    kind = next((name for cls, name in kinds if isinstance(exc, cls)), "ConnectionError")
    return f"{kind}: {exc}"


def _read_capped(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """At most MAX_RESPONSE_BYTES of the body, and whether that was all of it."""
    content = b""
    for chunk in chunks:
        content += chunk
        if len(content) >= MAX_RESPONSE_BYTES:
            return content[:MAX_RESPONSE_BYTES], False
    return content, True


def _new_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # the settings say where calls go, not $HTTPS_PROXY
    return session


get_session = PerProcess(_new_session)


def post_to_source(url: str, body: str, headers: Mapping[str, str]) -> Response:
    """POST a registration: no SSRF rules, requests' errors, each read within READ_TIMEOUT."""
    isolation.check("the network", outside_helpers=False)
    proxy = conf.PROXY_URL
    with get_session().post(
        url,
        data=body,
        headers={**JSON_HEADERS, **headers},
        timeout=(conf.CONNECT_TIMEOUT, conf.READ_TIMEOUT),
        allow_redirects=False,
        stream=True,
        proxies={"http": proxy, "https": proxy} if proxy else {},
        verify=conf.CA_BUNDLE or True,
        cert=_requests_cert(),
    ) as response:
        content, _complete = _read_capped(response.iter_content(8192))
    return Response(response.status_code, response.headers, content)


def _requests_cert() -> str | tuple[str, str] | None:
    cert = conf.CLIENT_CERT
    if cert is None:
        return None
    certificate, key = cert
    return certificate if key is None else (certificate, key)
