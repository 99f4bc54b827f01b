"""Every outgoing HTTP call toot makes: timeouts, no redirects, a capped response read."""

from __future__ import annotations

import os
from typing import Any

import requests
from django.utils.module_loading import import_string

from toot.conf import conf

# Only the start of an answer is kept, for error messages: a peer must not be able to
# make a worker read an endless body.
MAX_RESPONSE_BYTES = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}

_default_session: tuple[int, requests.Session] | None = None


def get_session() -> requests.Session:
    """``TOOT["HTTP_SESSION"]``'s session if set, else one per process."""
    global _default_session
    if conf.HTTP_SESSION:
        session: requests.Session = import_string(conf.HTTP_SESSION)()
        return session
    # A pool inherited through fork() shares sockets with the parent.
    if _default_session is None or _default_session[0] != os.getpid():
        _default_session = (os.getpid(), requests.Session())
    return _default_session[1]


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


def post_json(url: str, body: bytes | str) -> Response:
    """POST a JSON body; network errors and timeouts raise requests' exceptions."""
    with get_session().post(
        url,
        data=body,
        headers=JSON_HEADERS,
        timeout=(conf.CONNECT_TIMEOUT, conf.READ_TIMEOUT),
        allow_redirects=False,
        stream=True,
    ) as response:
        content = b""
        for chunk in response.iter_content(8192):
            content += chunk
            if len(content) >= MAX_RESPONSE_BYTES:
                content = content[:MAX_RESPONSE_BYTES]
                break
        return Response(response.status_code, response.headers, content)
