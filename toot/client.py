"""Every outgoing HTTP call toot makes: timeouts, no redirects, a capped response read.

Deliveries also connect only to the address the SSRF guard checked (``target``), through
``toot.transport.TootAdapter``. With ``TOOT["HTTP_SESSION"]``, a delivery goes through a
shallow copy of that session with toot's adapter mounted in place of its own: its auth,
headers, cookies, proxies, ``verify`` and ``cert`` apply, its mounted adapters do not (a
session that already mounts a TootAdapter is used as it is). Registrations are not pinned
and use the session as it is.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import requests
from django.utils.module_loading import import_string

from toot import transport
from toot.conf import conf
from toot.ssrf import Target

# Only the start of an answer is kept, for error messages: a peer must not be able to
# make a worker read an endless body.
MAX_RESPONSE_BYTES = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}

_default_session: tuple[int, requests.Session] | None = None


def _own_session() -> requests.Session:
    """toot's session, sending through a TootAdapter: one per process."""
    global _default_session
    # A pool inherited through fork() shares sockets with the parent.
    if _default_session is None or _default_session[0] != os.getpid():
        session = requests.Session()
        adapter = transport.TootAdapter()
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        _default_session = (os.getpid(), session)
    return _default_session[1]


def get_session() -> requests.Session:
    """``TOOT["HTTP_SESSION"]``'s session if set, else one per process."""
    if conf.HTTP_SESSION:
        session: requests.Session = import_string(conf.HTTP_SESSION)()
        return session
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

    With ``target`` (from ``toot.ssrf.target(url)``) the call connects to its address. The
    whole call, however slowly the peer answers, ends with ``requests.ReadTimeout`` after
    CONNECT_TIMEOUT + READ_TIMEOUT seconds.
    """
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
