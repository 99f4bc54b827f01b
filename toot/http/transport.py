"""The requests transport adapter under toot's calls: pinned addresses and a total deadline.

Pinning: a delivery connects to the address ``toot.http.ssrf`` checked, never to what a second
DNS lookup says, while the ``Host`` header, TLS SNI and certificate verification keep the
URL's host name. The adapter learns the checked address from ``pinned()``, a context
variable (so each thread or task sees its own), and keys its urllib3 pools by that address
and host name, so that a kept-alive connection is reused only for the same pair.

Deadline: requests' read timeout bounds each socket read, not the answer, so a peer that
trickles a byte every few seconds could hold a worker for hours. ``Deadline`` cuts the
connection of a call that is still going after its time, whatever it is waiting for. One
watchdog thread per process keeps every deadline: a timer thread per call cost more CPU
than the rest of the call.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

from requests import PreparedRequest, ReadTimeout, Response
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool

from toot.engine.per_process import PerProcess
from toot.http.ssrf import Target

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

_pin: ContextVar[Target | None] = ContextVar("toot_pin", default=None)
_deadline: ContextVar[Deadline | None] = ContextVar("toot_deadline", default=None)


@contextlib.contextmanager
def pinned(target: Target | None) -> Iterator[None]:
    """Calls to ``target``'s host and port inside the block connect to its address."""
    token = _pin.set(target)
    try:
        yield
    finally:
        _pin.reset(token)


class Deadline:
    """Cuts the connection of one call once ``seconds`` have passed.

    It watches the connection toot's pools hand out inside the block, and the response
    once the caller has it (``watch``): with ``Connection: close`` the connection lets go
    of its socket as soon as the headers are in, and only the response still reaches it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._watched: list[Any] = []
        self._done = False
        self._lock = threading.Lock()

    def __enter__(self) -> Deadline:
        self._token = _deadline.set(self)
        _watchdog().keep(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
        _deadline.reset(self._token)

    def watch(self, connection_or_response: Any) -> None:
        with self._lock:
            if connection_or_response is not None and not self._done:
                self._watched.append(connection_or_response)
                if self.expired:
                    _cut(connection_or_response)

    def cancel(self) -> None:
        """Stop watching; call it before the connection goes back to its pool."""
        with self._lock:
            self._done = True
            self._watched.clear()

    def timeout(self) -> ReadTimeout:
        return ReadTimeout(f"no complete answer within {self.seconds:g} seconds")

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for watched in self._watched:
                _cut(watched)


class Watchdog(threading.Thread):
    """Expires each kept Deadline at its time; cancelled ones are dropped when they come up."""

    def __init__(self) -> None:
        super().__init__(name="toot-deadlines", daemon=True)
        self._due: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties never compare Deadlines
        self._changed = threading.Condition()

    def keep(self, deadline: Deadline) -> None:
        with self._changed:
            entry = (time.monotonic() + deadline.seconds, next(self._order), deadline)
            heapq.heappush(self._due, entry)
            if self._due[0] is entry:
                self._changed.notify()

    def run(self) -> None:
        while True:
            with self._changed:
                while self._due and self._due[0][2]._done:
                    heapq.heappop(self._due)
                if not self._due:
                    self._changed.wait()
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                deadline = heapq.heappop(self._due)[2]
            deadline._expire()  # outside the lock: cutting a socket may take a moment


def _start_watchdog() -> Watchdog:
    watchdog = Watchdog()
    watchdog.start()
    return watchdog


_watchdog = PerProcess(_start_watchdog)


def _cut(watched: Any) -> None:
    # shutdown(), not close(): it wakes a recv() blocked in another thread, at once.
    if isinstance(watched, BaseHTTPResponse):
        # urllib3 >= 2.3; it raises once the connection is back in its pool (nothing to cut).
        with contextlib.suppress(AttributeError, ValueError, RuntimeError, OSError):
            watched.shutdown()
        return
    # A connection: on a TLS socket, the plain socket's shutdown, leaving the TLS object alone.
    sock = getattr(watched, "sock", None)
    sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watched(connection: BaseHTTPConnection) -> BaseHTTPConnection:
    deadline = _deadline.get()
    if deadline is not None:
        deadline.watch(connection)
    return connection


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _watched(super()._get_conn(timeout))


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _watched(super()._get_conn(timeout))


WATCHED_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": WatchedHTTPConnectionPool,
    "https": WatchedHTTPSConnectionPool,
}


def _netloc(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port else host


class TootAdapter(HTTPAdapter):
    """An HTTPAdapter that connects to the pinned address and lets a Deadline cut its calls."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # SOCKS pools (PySocks) are classes of their own: there, the Deadline only cuts the
        # body, through the response that post_json watches.
        if not proxy.lower().startswith("socks"):  # pragma: no branch
            manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager

    @staticmethod
    def _target_for(url: str | None) -> Target | None:
        target = _pin.get()
        return target if target is not None and url and target.matches(url) else None

    def build_connection_pool_key_attributes(
        self, request: PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:
        params = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params, pool_kwargs = cast("tuple[dict[str, Any], dict[str, Any]]", params)
        target = self._target_for(request.url)
        if target is not None:
            host_params["host"] = target.address
            if target.scheme == "https":
                # SNI and certificate checks for the name; both are part of the pool key.
                pool_kwargs["server_hostname"] = target.host
                pool_kwargs["assert_hostname"] = target.host
        return host_params, pool_kwargs

    def request_url(self, request: PreparedRequest, proxies: Any) -> str:
        url: str = super().request_url(request, proxies)
        target = self._target_for(request.url)
        if target is not None and "://" in url:
            # Plain http through a forward proxy names the host in the request line; name
            # the address instead, or the proxy would look the host up again.
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(netloc=_netloc(target.address, parts.port)))
        return url

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        if self._target_for(request.url) is not None:
            # urllib3 would name the address it connects to; the peer wants its own name.
            request.headers["Host"] = urlsplit(str(request.url)).netloc
        return super().send(request, *args, **kwargs)
