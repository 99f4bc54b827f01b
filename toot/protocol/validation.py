"""What the protocol accepts as a channel name or a callback URL (docs/protocol.md section 5)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from toot.exceptions import InvalidChannel

MAX_CHANNEL_LENGTH = 255
MAX_URL_LENGTH = 2048
# Levels of arrays and objects a body may nest, the event's own object included: the
# default max_nesting of Ruby's JSON.parse, as deep as a Ruby toot subscriber reads. How
# deep Python's parser gets depends on the stack; a body it read here could still fail the
# broker's serializer or, after a 200, the worker's deserializer (the event lost).
MAX_JSON_DEPTH = 100
# Printable ASCII without space: channel names end up in Redis keys, log lines and
# URLs, where anything else invites confusion or injection.
CHANNEL_RE = re.compile(r"[\x21-\x7e]+")


def channel_error(channel: object) -> str | None:
    """Why ``channel`` is not a valid full channel name, or None."""
    if not isinstance(channel, str):
        return "channel must be a string"
    if not channel:
        return "channel must not be empty"
    if len(channel) > MAX_CHANNEL_LENGTH:
        return f"channel is longer than {MAX_CHANNEL_LENGTH} characters"
    if not CHANNEL_RE.fullmatch(channel):
        return "channel may hold only printable ASCII characters without spaces"
    return None


def check_channel(channel: str) -> str:
    error = channel_error(channel)
    if error:
        raise InvalidChannel(f"{error}: {channel!r}")
    return channel


def url_error(url: object, *, name: str = "callback_url") -> str | None:
    """Why ``url`` is not an absolute http(s) URL toot will call, or None."""
    if not isinstance(url, str):
        return f"{name} must be a string"
    if len(url) > MAX_URL_LENGTH:
        return f"{name} is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return f"{name} is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return f"{name} must be an http or https URL"
    if not parts.hostname:
        return f"{name} must name a host"
    if parts.username is not None or parts.password is not None:
        return f"{name} must not carry credentials (userinfo)"
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        return f"{name} must not contain whitespace or control characters"
    # From os.environ, bytes that are not UTF-8; no UTF-8 client (Redis) can encode them.
    if not _encodable(url):
        return f"{name} must not contain lone surrogates"
    return None


def nests_deeper(
    data: Any, limit: int = MAX_JSON_DEPTH, *, text: str | bytes | None = None
) -> bool:
    """Whether ``data`` nests arrays and objects more than ``limit`` levels deep.

    Given the JSON ``text`` that ``data`` was read from or encoded as, only a text with
    more brackets than ``limit`` is walked: no other can nest that deep, and most are not.
    """
    if isinstance(text, bytes):
        brackets = text.count(b"[") + text.count(b"{")
    else:
        brackets = limit + 1 if text is None else text.count("[") + text.count("{")
    if brackets <= limit:
        return False
    for depth, level in enumerate(_levels(data)):
        if depth == limit:  # a container this deep holds a level more than the limit
            return any(isinstance(value, (dict, list)) for value in level)
    return False


def _levels(data: Any) -> Iterator[list[Any]]:
    """``data``'s values level by level, an object's keys among its children.

    No recursion (what a depth limit guards against): a few list passes.
    """
    level = [data]
    while level:
        yield level
        children: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                children += [*value, *value.values()]
            elif isinstance(value, list):
                children += value
        level = children


# What JSON text a string no database stores can hide behind: an escape of a surrogate
# (U+D800 to U+DFFF) or of NUL.
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def unstorable_text(data: Any, text: str) -> str | None:
    """What in ``data``, read from or encoded as the JSON ``text``, PostgreSQL cannot store
    as JSON (an outbox row, a dead letter), or None.

    JSON's "\\ud800" escape makes a lone surrogate, which is not Unicode text and which no
    UTF-8 encoder takes; its "\\u0000" makes NUL, which jsonb refuses. Only a text with
    such an escape is walked: most have none. Call it once the nesting is checked.
    """
    if not _UNSTORABLE_ESCAPE.search(text):
        return None
    for level in _levels(data):
        for value in level:
            if not isinstance(value, str):
                continue
            if "\x00" in value:
                return "a NUL character (\\u0000), which PostgreSQL cannot store as JSON"
            if not _encodable(value):
                return "a lone surrogate, which is not Unicode text"
    return None


def _encodable(text: str) -> bool:
    """Whether ``text`` is Unicode text: it holds no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
