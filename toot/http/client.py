"""Every outgoing HTTP call toot makes: timeouts, no redirects, a capped response read.

Deliveries also connect only to the address the SSRF guard checked (``target``). By
default they go straight through urllib3 pools of toot's own, keyed by that address and
the host name: ``requests`` costs about twice the CPU of the call itself, and a delivery
needs none of what it adds. A delivery goes through ``requests`` and
``toot.http.transport.TootAdapter`` instead when a proxy is set in the environment, or with
``TOOT["HTTP_SESSION"]``: then through a shallow copy of that session with toot's adapter
mounted in place of its own, so that its auth, headers, cookies, proxies, ``verify`` and
``cert`` apply, its mounted adapters do not (a session that already mounts a TootAdapter
is used as it is). Registrations are not pinned and use the session as it is.
"""

from __future__ import annotations

import os
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH, select_proxy, should_bypass_proxies
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ReadTimeoutError,
)

from toot.conf import conf
from toot.engine.per_process import PerProcess
from toot.http import transport
from toot.http.ssrf import Target

# Only the start of an answer is kept, for error messages: a peer must not be able to
# make a worker read an endless body.
MAX_RESPONSE_BYTES = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}


def _new_session() -> requests.Session:
    """toot's session, sending through a TootAdapter."""
    session = requests.Session()
    adapter = transport.TootAdapter()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


_own_session = PerProcess(_new_session)


def get_session() -> requests.Session:
    """``TOOT["HTTP_SESSION"]``'s session if set, else one per process."""
    factory = conf.HTTP_SESSION
    if factory is not None:
        return factory()
    return _own_session()


def pinning_session(session: requests.Session, url: str) -> requests.Session:
    """``session``, or a copy of it, that sends ``url`` through a TootAdapter."""
    try:
        if isinstance(session.get_adapter(url), transport.TootAdapter):
            return session
    except requests.exceptions.InvalidSchema:  # it mounts nothing for http(s): ours will do
        pass
    # A shallow copy of every attribute (auth, headers, cookies, proxies, hooks, and a
    # subclass's own), which copy.copy would limit to Session.__attrs__.
    pinning = object.__new__(type(session))
    pinning.__dict__.update(session.__dict__)
    pinning.adapters = OrderedDict()  # the user's session keeps its own
    adapter = _own_session().get_adapter("https://")  # its pools are reused across calls
    pinning.mount("https://", adapter)
    pinning.mount("http://", adapter)
    return pinning


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


def post_json(
    url: str,
    body: bytes | str,
    headers: Mapping[str, str] | None = None,
    *,
    target: Target | None = None,
) -> Response:
    """POST a JSON body, with ``headers`` added; network errors and timeouts raise requests'.

    With ``target`` (from ``toot.http.ssrf.target(url)``) the call connects to its address. The
    whole call, however slowly the peer answers, ends with ``requests.ReadTimeout`` after
    CONNECT_TIMEOUT + READ_TIMEOUT seconds.
    """
    # A target for another host and port pins nothing: the call connects as usual.
    if target is not None and target.matches(url) and not conf.HTTP_SESSION and not _proxied(url):
        return _post_pinned(url, body.encode() if isinstance(body, str) else body, headers, target)
    session = get_session()
    if target is not None:
        session = pinning_session(session, url)
    deadline = transport.Deadline(conf.CONNECT_TIMEOUT + conf.READ_TIMEOUT)
    with deadline, transport.pinned(target):
        try:
            with session.post(
                url,
                data=body,
                headers={**JSON_HEADERS, **(headers or {})},
                timeout=(conf.CONNECT_TIMEOUT, conf.READ_TIMEOUT),
                allow_redirects=False,
                stream=True,
            ) as response:
                deadline.watch(response.raw)  # the body's socket, whatever the adapter
                try:
                    content = _read_capped(response)
                finally:
                    deadline.cancel()  # before the connection goes back to its pool
        except requests.RequestException as exc:
            if deadline.expired:
                raise deadline.timeout() from exc
            raise
        if deadline.expired:  # the cut looked like the end of a body without a length
            raise deadline.timeout()
        return Response(response.status_code, response.headers, content)


def _read_capped(response: requests.Response) -> bytes:
    content: bytes = b""
    for chunk in response.iter_content(8192):
        content += chunk
        if len(content) >= MAX_RESPONSE_BYTES:
            return content[:MAX_RESPONSE_BYTES]
    return content


def _proxied(url: str) -> bool:
    """Whether requests would send ``url`` through a proxy named in the environment."""
    # The common case, none of the variables that could name one, without reading the
    # whole environment as getproxies_environment() does at each call.
    names = (f"{url.partition(':')[0].lower()}_proxy", "all_proxy")
    if not any(os.environ.get(name) or os.environ.get(name.upper()) for name in names):
        return False
    proxies = urllib.request.getproxies_environment()  # as requests reads them (CGI included)
    return select_proxy(url, proxies) is not None and not should_bypass_proxies(url, None)


def _new_pools() -> urllib3.PoolManager:
    """toot's urllib3 pools, for deliveries that need neither proxy nor HTTP_SESSION."""
    # Several connections per peer: a threaded worker runs several drains at once.
    manager = urllib3.PoolManager(num_pools=100, maxsize=10)
    manager.pool_classes_by_scheme = transport.WATCHED_POOLS
    return manager


_pools = PerProcess(_new_pools)


def _post_pinned(
    url: str, body: bytes, headers: Mapping[str, str] | None, target: Target
) -> Response:
    parts = urlsplit(url)
    pool_kwargs: dict[str, Any] = {}
    if target.scheme == "https":
        # Verified as requests would: its CA bundle, or the one (file or directory) its
        # environment names.
        bundle = (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or DEFAULT_CA_BUNDLE_PATH
        )
        pool_kwargs = {
            "server_hostname": target.host,
            "assert_hostname": target.host,
            "ca_cert_dir" if os.path.isdir(bundle) else "ca_certs": bundle,
        }
    pool = _pools().connection_from_host(
        target.address, target.port, target.scheme, pool_kwargs=pool_kwargs
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The name the peer knows itself by, not the address connected to.
    all_headers = {**JSON_HEADERS, **(headers or {}), "Host": parts.netloc}
    deadline = transport.Deadline(conf.CONNECT_TIMEOUT + conf.READ_TIMEOUT)
    with deadline:
        try:
            response = pool.urlopen(
                "POST",
                path,
                body=body,
                headers=all_headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                timeout=urllib3.Timeout(connect=conf.CONNECT_TIMEOUT, read=conf.READ_TIMEOUT),
                preload_content=False,
            )
            deadline.watch(response)
            complete = False
            try:
                content, complete = _read_capped_stream(response.stream(8192))
            finally:
                deadline.cancel()  # before the connection goes back to its pool
                if not complete:  # what is left of the body must not meet the next call
                    response.close()
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.expired:
                raise deadline.timeout() from exc
            raise _as_requests_error(exc) from exc
        if deadline.expired:  # the cut looked like the end of a body without a length
            raise deadline.timeout()
        return Response(response.status, response.headers, content)


def _read_capped_stream(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """At most MAX_RESPONSE_BYTES of the body, and whether that was all of it."""
    content = b""
    for chunk in chunks:
        content += chunk
        if len(content) >= MAX_RESPONSE_BYTES:
            return content[:MAX_RESPONSE_BYTES], False
    return content, True


def _as_requests_error(exc: Exception) -> requests.RequestException:
    """The error requests would have raised, so that callers know one family of errors."""
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return requests.ConnectTimeout(str(exc))
    if isinstance(exc, ReadTimeoutError):
        return requests.ReadTimeout(str(exc))
    if isinstance(exc, urllib3.exceptions.SSLError):
        return requests.exceptions.SSLError(str(exc))
    return requests.ConnectionError(str(exc))
