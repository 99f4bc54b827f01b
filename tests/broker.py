"""Real brokers for tests: one that is unreachable for a while, one that never answers, one
that falls silent once connected, and queues a test reads."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from django.conf import settings
from kombu import pools
from kombu.utils.collections import eqhash

from devtools.broker import amqp_connection, delete_queues, is_redis
from devtools.processes import free_port, wait_for
from tests.celery import app as celery_app
from tests.utils import live_leases
from toot.conf import conf
from toot.engine import broker
from toot.engine.connection import get_redis


def _pools(app: Celery) -> tuple[Any, Any]:
    # Celery's own attributes (Celery._after_fork() resets them the same way).
    return app._pool, app.amqp._producer_pool  # type: ignore[attr-defined]


def _set_pools(app: Celery, saved: tuple[Any, Any]) -> None:
    app._pool, app.amqp._producer_pool = saved  # type: ignore[attr-defined]


@contextmanager
def broker_unreachable(app: Celery = celery_app) -> Iterator[str]:
    """Point ``app`` at a port where nothing listens, as if its broker had stopped.

    Setting ``broker_url`` alone changes nothing: the app keeps publishing through the
    connection and producer pools it already holds. So those are set aside for the
    duration, and put back afterwards with the URL. (The in-process worker shares the
    app: what it publishes meanwhile fails too.)
    """
    saved_url, saved_pools = app.conf.broker_url, _pools(app)
    url = url_of(scheme_of(saved_url), free_port())
    app.conf.update(broker_url=url)
    _set_pools(app, (None, None))
    try:
        yield url
    finally:
        # The app's connection, and toot's own with its timeouts (toot.engine.broker).
        down = [
            eqhash(app.connection_for_write()),
            eqhash(broker.connection_for(app, conf.REDIS_TIMEOUT)),
        ]
        app.conf.update(broker_url=saved_url)
        _set_pools(app, saved_pools)
        # kombu keeps its pools per URL in global groups: drop the dead URL's.
        for group in (pools.producers, pools.connections):
            for key in down:
                pool = group.pop(key, None)
                if pool is not None:
                    pool.force_close_all()


@contextmanager
def broker_unreachable_and_no_drain(name: str) -> Iterator[str]:
    """``broker_unreachable``, once no drain of queue ``name`` holds a lease: the next push
    must start one, and fails to.

    A drain that the relay started just before (for work an earlier test left) ends once
    it finds nothing more to do, and none can start meanwhile.
    """
    with broker_unreachable() as url:
        wait_for(lambda: not live_leases(get_redis(), name), 30, f"the {name} queue's drains")
        yield url


PROBE_TASK = "tests.probe"


@contextmanager
def probe_app(queue: str, broker_url: str | None = None) -> Iterator[Celery]:
    """A Celery app on the tests' broker (or ``broker_url``, a way to it) whose default queue
    is ``queue``, one no worker reads.

    Its one task, PROBE_TASK, never runs: a test reads what was sent with ``queued()``, in
    the block (a RabbitMQ queue goes away with it).
    """
    app = Celery(
        "toot-probe", broker=broker_url or settings.CELERY_BROKER_URL, set_as_current=False
    )
    app.conf.task_default_queue = queue

    @app.task(name=PROBE_TASK, shared=False)
    def probe(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never runs
        pass

    try:
        yield app
    finally:
        app.close()
        if is_redis(settings.CELERY_BROKER_URL):
            # Messages under the run's KEY_PREFIX go with the `redis` fixture; kombu's
            # bindings don't.
            get_redis().delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        else:
            delete_queues(settings.CELERY_BROKER_URL, [queue])


def queued(queue: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """The (task name, args, kwargs) of every message waiting on ``queue`` of the tests'
    broker, oldest first, left there."""
    url = settings.CELERY_BROKER_URL
    messages: list[tuple[str, list[Any], dict[str, Any]]] = []
    if is_redis(url):
        for raw in reversed(get_redis().lrange(queue, 0, -1)):
            message = json.loads(raw)
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            messages.append((message["headers"]["task"], args, kwargs))
        return messages
    with amqp_connection(url) as connection:
        channel: Any = connection.channel()  # py-amqp's, beyond kombu's StdChannel
        try:
            # Taken unacknowledged: closing the connection puts them back, in their places.
            while (message := channel.basic_get(queue, no_ack=False)) is not None:
                args, kwargs, _ = json.loads(message.body)
                messages.append((message.headers["task"], args, kwargs))
        except connection.channel_errors:  # 404: nothing was ever sent to it
            pass
    return messages


def scheme_of(url: str) -> str:
    return "redis" if is_redis(url) else "amqp"


def url_of(scheme: str, port: int) -> str:
    """A URL of a broker of ``scheme`` ("redis" or "amqp") at 127.0.0.1:``port``."""
    return {
        "redis": f"redis://127.0.0.1:{port}/0",
        "amqp": f"amqp://guest:guest@127.0.0.1:{port}//",
    }[scheme]


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
    sock.close()


class SilentBroker:
    """A port that accepts connections and never answers: a broker behind a load balancer
    whose backend is gone, or a stuck one. It reads what it is sent, and keeps every
    connection open for as long as the client does."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted: list[socket.socket] = []
        self._closed_by_client: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="silent-broker", daemon=True)

    def url(self, scheme: str) -> str:
        return url_of(scheme, self.port)

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self._accepted)

    def open_connections(self) -> int:
        """How many of the connections accepted so far the client has not closed."""
        with self._lock:
            for sock in self._accepted:
                if sock not in self._closed_by_client and self._client_closed(sock):
                    self._closed_by_client.add(sock)
            return len(self._accepted) - len(self._closed_by_client)

    @staticmethod
    def _client_closed(sock: socket.socket) -> bool:
        try:
            while sock.recv(65536, socket.MSG_DONTWAIT):  # what it sent: never answered
                pass
        except BlockingIOError:
            return False  # nothing more to read, and no end of file: still open
        except OSError:
            return True  # reset
        return True  # end of file

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            with self._lock:
                self._accepted.append(sock)

    def __enter__(self) -> SilentBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        _hang_up(self._listener)
        self._thread.join(10)
        with self._lock:
            for sock in self._accepted:
                sock.close()


# Where a broker listens when its URL names no port.
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671}


class BrokerProxy:
    """A way to a real broker (Redis or RabbitMQ), on a port of its own, that a test controls.

    It passes everything on both ways until ``hush()``; from then on, until ``resume()``, it
    swallows whatever either side sends, on connections old and new: a broker that falls
    silent once connected, without closing anything. ``kill()`` closes its port and every
    connection through it, as a broker that crashed: the broker behind it, shared with
    others (the machine's RabbitMQ), stays up. ``start()`` opens the same port again.
    """

    def __init__(self, url: str) -> None:
        upstream = urlsplit(url)
        self._upstream = (
            upstream.hostname or "127.0.0.1",
            upstream.port or DEFAULT_PORTS[upstream.scheme],
        )
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        netloc = upstream.netloc.rpartition("@")[0]
        self.url = upstream._replace(
            netloc=f"{netloc}@127.0.0.1:{self.port}" if netloc else f"127.0.0.1:{self.port}"
        ).geturl()
        self.hushed = threading.Event()
        self._lock = threading.Lock()
        self._passed = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def connections(self) -> int:
        """How many connections it has passed on so far."""
        with self._lock:
            return self._passed

    def hush(self) -> None:
        self.hushed.set()

    def resume(self) -> None:
        self.hushed.clear()

    def start(self) -> None:
        """Accept connections on its port: the first time, or again after ``kill()``."""
        with self._lock:
            if self._listener is None:
                self._listener = socket.create_server(("127.0.0.1", self.port))
            listener = self._listener
            thread = threading.Thread(
                target=self._accept, args=(listener,), name="proxy", daemon=True
            )
            self._threads.append(thread)
        thread.start()

    def kill(self) -> None:
        """Close its port and hang up every connection through it, on both sides."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        if listener is not None:
            _hang_up(listener)
        for sock in sockets:
            _hang_up(sock)

    def stop(self) -> None:
        self.kill()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self._upstream, timeout=10)
            except OSError:  # the listener was closed
                return
            server.settimeout(None)
            pumps = [
                threading.Thread(target=self._pump, args=pair, name="proxy-pump", daemon=True)
                for pair in ((client, server), (server, client))
            ]
            with self._lock:
                killed = self._listener is not listener
                if not killed:
                    self._passed += 1
                    self._sockets += [client, server]
                    self._threads += pumps
            if killed:  # accepted just as kill() closed the port
                _hang_up(client)
                _hang_up(server)
                return
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.hushed.is_set():
                    target.sendall(data)
        # One side hung up: so does the other.
        _hang_up(source)
        _hang_up(target)

    def __enter__(self) -> BrokerProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
