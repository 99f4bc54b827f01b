"""What the protocol accepts as a channel name or a callback URL (PROTOCOL.md section 5)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from toot.exceptions import InvalidChannel

MAX_CHANNEL_LENGTH = 255
MAX_URL_LENGTH = 2048
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
    # JSON's "\ud800" escape yields a lone surrogate, which no UTF-8 client (Redis) can encode.
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in url):
        return f"{name} must not contain lone surrogates"
    return None
