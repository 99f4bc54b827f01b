"""A real HTTP peer for tests: it answers as told and records every request it gets."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devtools.processes import free_port


@dataclass
class Reply:
    """What the server answers.

    ``hang`` never answers (until the server stops); ``endless`` streams a body that
    never ends, for as long as the client keeps reading. ``trickle`` sends the body one
    byte at a time, that many seconds apart (the status line and headers too, with
    ``trickle_headers``): each byte comes well within a read timeout, the whole never.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False
    endless: bool = False
    trickle: float = 0.0
    trickle_headers: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: Any  # an email.message.Message: case-insensitive, like HTTP headers
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


ReplySpec = Reply | Callable[[RecordedRequest], Reply]


def in_order(*replies: Reply) -> Callable[[RecordedRequest], Reply]:
    """Answer the first request with the first reply, and so on; the last one repeats."""
    remaining = list(replies)
    lock = threading.Lock()

    def reply(request: RecordedRequest) -> Reply:
        with lock:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return reply


class HTTPServer:
    """An HTTP/1.1 server on a free loopback port, serving from daemon threads.

    ``reply`` is a Reply for every request, or a function of the request returning one.
    With ``tls`` (a server-side SSLContext) it speaks https. Use it as a context manager,
    or call ``start()`` and ``stop()``.
    """

    def __init__(self, reply: ReplySpec | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.reply: ReplySpec = reply or Reply()
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def start(self) -> HTTPServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        if self.tls is not None:
            # The handshake happens in the request's thread, on its first read; a client
            # that refuses the certificate ends it there, which is no error of the server's.
            self._server.socket = self.tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # releases hanging and endless replies
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> HTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
        return self.reply(request) if callable(self.reply) else self.reply

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # an idle keep-alive connection ends, and its thread with it

            def handle_one_request(self) -> None:
                try:
                    self.raw_requestline = self.rfile.readline(65537)
                except TimeoutError:
                    self.raw_requestline = b""
                if not self.raw_requestline:
                    self.close_connection = True
                    return
                if not self.parse_request():
                    return
                request = RecordedRequest(self.command, self.path, self.headers, self._read_body())
                self._answer(server._record(request))
                self.wfile.flush()

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, reply: Reply) -> None:
                if reply.hang:
                    server._stopped.wait()
                    self.close_connection = True
                    return
                if reply.trickle:
                    self._trickle(reply)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.endless:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    chunk = b"x" * 65536
                    try:
                        while not server._stopped.is_set():
                            self.wfile.write(chunk)
                    except OSError:  # the client stopped reading and closed
                        pass
                    return
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            def _trickle(self, reply: Reply) -> None:
                self.close_connection = True
                headers = {**reply.headers, "Content-Length": str(len(reply.body))}
                head = f"HTTP/1.1 {reply.status} {self.responses[reply.status][0]}\r\n"
                head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                data = (head + "Connection: close\r\n\r\n").encode("latin-1") + reply.body
                at_once = 0 if reply.trickle_headers else len(data) - len(reply.body)
                try:
                    self.wfile.write(data[:at_once])
                    for i in range(at_once, len(data)):
                        if server._stopped.wait(reply.trickle):
                            return
                        self.wfile.write(data[i : i + 1])
                except OSError:  # the client gave up and closed
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
