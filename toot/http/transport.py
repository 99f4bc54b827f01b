"""The connections under toot's deliveries: the SSRF check where they open, and a total deadline.

SSRF: a connection to a callback host resolves it once, refuses it (``InvalidCallback``)
unless every address is allowed (``toot.http.ssrf``), and connects to the addresses it
checked: no second lookup, which a rebinding attacker's name server could answer with
127.0.0.1. The connection keeps the host name, so ``Host``, TLS SNI and certificate
verification name the host. A connection to a proxy is not checked: the operator chose
the proxy, and ``toot.http.client`` checks the callback host before the request.

Deadline: the read timeout bounds each socket read, not the answer, so a peer that
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
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import urllib3.exceptions
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

from toot.engine.per_process import PerProcess
from toot.http import ssrf

_deadline: ContextVar[Deadline | None] = ContextVar("toot_deadline", default=None)


class DeadlineExceeded(urllib3.exceptions.TimeoutError):
    """A call had no complete answer within CONNECT_TIMEOUT + READ_TIMEOUT seconds."""


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
            if not self._done:
                self._watched.append(connection_or_response)
                if self.expired:
                    _cut(connection_or_response)

    def cancel(self) -> None:
        """Stop watching; call it before the connection goes back to its pool."""
        with self._lock:
            self._done = True
            self._watched.clear()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no complete answer within {self.seconds:g} seconds")

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
        # It raises once the connection is back in its pool (nothing to cut).
        with contextlib.suppress(AttributeError, ValueError, RuntimeError, OSError):
            watched.shutdown()
        return
    # A connection: on a TLS socket, the plain socket's shutdown, leaving the TLS object alone.
    sock = getattr(watched, "sock", None)
    sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _checked_socket(connection: HTTPConnection) -> socket.socket:
    """A socket to one of the addresses ``connection``'s host resolved to, all checked."""
    try:
        addresses = ssrf.addresses(connection.host, connection.port)
    except socket.gaierror as exc:
        raise NameResolutionError(connection.host, connection, exc) from exc
    timeout = connection.timeout
    error: OSError | None = None
    for address in addresses:
        try:
            return create_connection(
                (address, connection.port),
                timeout,
                source_address=connection.source_address,
                socket_options=connection.socket_options,
            )
        except TimeoutError as exc:  # CONNECT_TIMEOUT spent: the next would double it
            message = f"Connection to {connection.host} timed out. (connect timeout={timeout})"
            raise ConnectTimeoutError(connection, message) from exc
        except OSError as exc:  # refused, unreachable: the next address may answer
            error = exc
    raise NewConnectionError(
        connection, f"Failed to establish a new connection: {error}"
    ) from error


class CheckedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return super()._new_conn() if self.proxy else _checked_socket(self)


class CheckedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return super()._new_conn() if self.proxy else _checked_socket(self)


def _watched(connection: Any) -> Any:
    deadline = _deadline.get()
    if deadline is not None:
        deadline.watch(connection)
    return connection


class CheckedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = CheckedHTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _watched(super()._get_conn(timeout))


class CheckedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = CheckedHTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _watched(super()._get_conn(timeout))


POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {
    "http": CheckedHTTPConnectionPool,
    "https": CheckedHTTPSConnectionPool,
}
