"""Slow callback URLs beside the measured subscriber (``--slow``), as issue 15 meets them.

``--slow 3x3s,1xsilent`` subscribes four more callback URLs to the measured channel: three
that answer ``200`` after 3 s, and one that never answers, holding the connection until
the publisher gives up (its ``READ_TIMEOUT``, ``--read-timeout``) and hangs up. One process,
``python -m bench.slow --port P --spec SPEC``, serves them all from a
``ThreadingHTTPServer``: ``/slow/0``, ``/slow/1``, ... in the order of the spec.

Each URL counts the requests it got, single events and batches (docs/protocol.md section
7), the events they held, the distinct events it received and answered ``200`` for, the
requests the publisher hung up on before the answer, and the most requests it held at
once. ``GET /stats`` gives them as JSON; ``POST /reset`` starts them from zero, and
``POST /expect`` (a JSON list of event ids) names the events a measurement published, so
that the stats count those of them that arrived.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from devtools.processes import ROOT, Process, free_port, wait_for_http

# One part of a spec: "3x3s", "2x0.5s", "1xsilent".
PART = re.compile(r"(?P<count>[1-9]\d*)x(?:(?P<seconds>\d+(?:\.\d+)?)s|(?P<silent>silent))")
MAX_URLS = 50
PATH = re.compile(r"/slow/(?P<index>\d+)")
# How often a held request looks whether the publisher hung up.
POLL_SECONDS = 0.1

Delay = float | None  # seconds before the 200; None: never answers


def parse_spec(text: str) -> list[Delay]:
    """The delay of each slow URL of a spec such as ``1x1s`` or ``3x3s,1xsilent``."""
    delays: list[Delay] = []
    for part in (part.strip() for part in text.split(",")):
        match = PART.fullmatch(part)
        if match is None:
            raise ValueError(
                f"{part!r} in {text!r}: each part is <count>x<seconds>s (3x3s, 2x0.5s) or "
                "<count>xsilent"
            )
        delay = None if match["silent"] else float(match["seconds"])
        if delay is not None and delay <= 0:
            raise ValueError(f"{part!r} in {text!r}: the delay must be positive")
        delays += [delay] * int(match["count"])
    if len(delays) > MAX_URLS:
        raise ValueError(f"{text!r} makes {len(delays)} URLs, more than {MAX_URLS}")
    return delays


def describe_delay(delay: Delay) -> str:
    return "silent" if delay is None else f"{delay:g}s"


def describe(delays: Sequence[Delay]) -> str:
    """The spec of ``delays``, runs of equal ones grouped: ``3x3s,1xsilent``."""
    parts: list[list[Any]] = []
    for delay in delays:
        if parts and parts[-1][1] == delay:
            parts[-1][0] += 1
        else:
            parts.append([1, delay])
    return ",".join(f"{count}x{describe_delay(delay)}" for count, delay in parts)


def event_ids(body: bytes) -> tuple[list[str], bool]:
    """The ids of the events a delivery holds, and whether it is a batch ``{"events": [...]}``
    (else one event)."""
    try:
        data = json.loads(body)
    except ValueError:
        return [], False
    events = data.get("events") if isinstance(data, dict) else None
    if isinstance(events, list):
        return [str(event.get("id")) for event in events if isinstance(event, dict)], True
    return ([str(data["id"])] if isinstance(data, dict) and "id" in data else []), False


@dataclass
class Counts:
    """What one slow URL got since the last reset."""

    delay: Delay
    requests: int = 0
    batches: int = 0  # of the requests, those with a batch body
    events: int = 0  # events in all requests, each time it came
    received: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    hung_up: int = 0  # requests the publisher gave up on before the answer
    in_flight: int = 0
    max_in_flight: int = 0

    def stats(self, expected: set[str]) -> dict[str, Any]:
        return {
            "delay": self.delay,
            "requests": self.requests,
            "batches": self.batches,
            "events": self.events,
            "received": len(self.received),
            "answered": len(self.answered),
            "expected": len(expected),
            "expected_received": len(self.received & expected),
            "expected_answered": len(self.answered & expected),
            "hung_up": self.hung_up,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


class SlowServer:
    """The slow URLs ``/slow/<i>`` on a loopback port, each with its delay; ``start()`` serves
    them from a daemon thread, ``serve()`` from the calling one."""

    def __init__(self, delays: Sequence[Delay], port: int | None = None) -> None:
        self.delays = list(delays)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts = [Counts(delay) for delay in self.delays]
        self._expected: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [f"{self.url}/slow/{index}" for index in range(len(self.delays))]

    def serve(self) -> None:
        self._server.serve_forever(poll_interval=0.05)

    def start(self) -> SlowServer:
        self._thread = threading.Thread(target=self.serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases the held requests
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [counts.stats(self._expected) for counts in self._counts]

    def reset(self) -> None:
        with self._lock:
            self._expected = set()
            self._counts = [
                # The requests held now still end: they stay counted as in flight.
                Counts(c.delay, in_flight=c.in_flight, max_in_flight=c.in_flight)
                for c in self._counts
            ]

    def expect(self, ids: Sequence[str]) -> None:
        with self._lock:
            self._expected.update(ids)

    def _received(self, index: int, ids: list[str], batch: bool) -> None:
        with self._lock:
            counts = self._counts[index]
            counts.requests += 1
            counts.batches += batch
            counts.events += len(ids)
            counts.received.update(ids)
            counts.in_flight += 1
            counts.max_in_flight = max(counts.max_in_flight, counts.in_flight)

    def _done(self, index: int, ids: list[str], answered: bool) -> None:
        with self._lock:
            # The counts of now: a request held across a reset is in flight in the new ones.
            counts = self._counts[index]
            counts.in_flight -= 1
            if answered:
                counts.answered.update(ids)
            else:
                counts.hung_up += 1

    def _hold(self, connection: socket.socket, seconds: Delay) -> bool:
        """Hold a request ``seconds`` (None: for good); False if the client hung up first, or
        the server stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.stopping.is_set():
            wait = (
                POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
            )
            if wait <= 0:
                return True
            readable, _, _ = select.select([connection], [], [], wait)
            if readable:
                try:
                    more = connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    return False
                if not more:  # the publisher closed: it gave up
                    return False
                time.sleep(wait)  # a next request already: it waits its turn
        return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 120  # an idle keep-alive connection ends, and its thread with it

            def do_GET(self) -> None:
                if self.path == "/stats":
                    self._reply(200, json.dumps(server.stats()).encode())
                else:
                    self._reply(404)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/reset":
                    server.reset()
                    self._reply(204)
                    return
                if self.path == "/expect":
                    server.expect(json.loads(body))
                    self._reply(204)
                    return
                match = PATH.fullmatch(self.path)
                if match is None or int(match["index"]) >= len(server.delays):
                    self._reply(404)
                    return
                index = int(match["index"])
                ids, batch = event_ids(body)
                server._received(index, ids, batch)
                answered = False
                try:
                    if server._hold(self.connection, server.delays[index]):
                        self._reply(200)
                        answered = True
                    else:
                        self.close_connection = True
                finally:
                    server._done(index, ids, answered)

            def _reply(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                if body:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a line per delivery would cost the machine what the benchmark measures

        return Handler


class SlowCallbacks:
    """The benchmark's side: the slow URLs' process, and their counts over HTTP."""

    def __init__(self, delays: Sequence[Delay], log_dir: Path) -> None:
        self.delays = list(delays)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.urls = [f"{self.url}/slow/{index}" for index in range(len(self.delays))]
        argv = [sys.executable, "-m", "bench.slow", "--port", str(self.port)]
        argv += ["--spec", describe(self.delays)]
        self.process = Process("slow-callbacks", argv, {"PYTHONPATH": str(ROOT)}, log_dir=log_dir)
        self.session = requests.Session()

    def start(self) -> None:
        self.process.start()
        wait_for_http(self.process, f"{self.url}/stats")

    def stop(self) -> None:
        self.session.close()
        self.process.stop()

    def stats(self) -> list[dict[str, Any]]:
        response = self.session.get(f"{self.url}/stats", timeout=10)
        response.raise_for_status()
        stats: list[dict[str, Any]] = response.json()
        return stats

    def reset(self) -> None:
        self.session.post(f"{self.url}/reset", timeout=10).raise_for_status()

    def expect(self, ids: Sequence[str]) -> None:
        self.session.post(f"{self.url}/expect", json=list(ids), timeout=10).raise_for_status()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.slow", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", type=parse_spec, required=True, help="e.g. 3x3s,1xsilent")
    args = p.parse_args(argv)
    server = SlowServer(args.spec, port=args.port)
    print(f"serving {describe(args.spec)} at {server.url}/slow/<0..>", flush=True)
    server.serve()


if __name__ == "__main__":
    main()
