"""Signed deliveries, in the Standard Webhooks scheme (https://www.standardwebhooks.com/).

A publisher with ``TOOT["SIGNING_SECRETS"]`` adds three headers to every delivery::

    webhook-id: <the event id>
    webhook-timestamp: <unix seconds at send time>
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")> ...

with one ``v1,`` signature per secret, so that a subscriber holding any one of them
accepts the delivery while secrets rotate. A subscriber whose source has a ``SECRET``
verifies them over the body bytes exactly as received: re-serialised JSON would not
match. A Ruby peer sends and expects none of this; signing is off unless configured.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from toot.exceptions import ConfigError, InvalidSignature

SECRET_PREFIX = "whsec_"
# The Standard Webhooks spec asks for 24 to 64 random bytes; fewer are guessable offline
# from one captured delivery.
MIN_SECRET_BYTES = 24
# How far webhook-timestamp may be from the receiver's clock, either way: bounds how long a
# captured delivery can be replayed (the handler dedupe by event id covers the window).
TOLERANCE_SECONDS = 5 * 60
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SIGNATURE_VERSION = "v1"
# A peer could send thousands of candidate signatures; each costs a comparison per secret.
MAX_SIGNATURES = 32


def secret_error(secret: object) -> str | None:
    """Why ``secret`` is not a usable ``whsec_<base64>`` secret, or None. Never quotes it."""
    if not isinstance(secret, str):
        return f"must be a string, not {type(secret).__name__}"
    if not secret.startswith(SECRET_PREFIX):
        return f'must start with "{SECRET_PREFIX}"'
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        # Unpadded base64 is common in the wild; the standardwebhooks package accepts it too.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return f'must be "{SECRET_PREFIX}" followed by standard base64'
    if len(key) < MIN_SECRET_BYTES:
        return f"must hold at least {MIN_SECRET_BYTES} random bytes, not {len(key)}"
    return None


def decode_secret(secret: str, *, name: str = "secret") -> bytes:
    """The HMAC key of a ``whsec_`` secret; ConfigError naming ``name`` if it is malformed."""
    error = secret_error(secret)
    if error:
        raise ConfigError(f"{name} {error}.")
    encoded = secret[len(SECRET_PREFIX) :]
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` as sent under ``msg_id`` at ``timestamp``."""
    # surrogatepass: a header decoded by the server can hold anything; it must not raise here.
    signed = b"%s.%d.%s" % (msg_id.encode("utf-8", "surrogatepass"), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(
    msg_id: str, body: bytes, secrets: Sequence[str], *, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery; none when there is no secret."""
    if not secrets:
        return {}
    when = int(time.time()) if timestamp is None else timestamp
    keys = [
        decode_secret(secret, name=f'TOOT["SIGNING_SECRETS"][{index}]')
        for index, secret in enumerate(secrets)
    ]
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(when),
        SIGNATURE_HEADER: " ".join(sign(key, msg_id, when, body) for key in keys),
    }


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    name: str = "secret",
    now: float | None = None,
) -> None:
    """Accept ``body`` if one of its signatures matches one of ``secrets``; else InvalidSignature.

    ``headers`` must look names up case-insensitively, as ``request.headers`` does. ``name``
    says where ``secrets`` come from, for the ConfigError that a malformed one raises.
    """
    msg_id = headers.get(ID_HEADER) or ""
    timestamp = headers.get(TIMESTAMP_HEADER) or ""
    signatures = headers.get(SIGNATURE_HEADER) or ""
    missing = [
        header
        for header, value in (
            (ID_HEADER, msg_id),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, signatures),
        )
        if not value
    ]
    if missing:
        raise InvalidSignature(f"signature required: missing {', '.join(missing)} header")
    # ASCII digits only: int() would also take "+1", " 1", "1_000" and non-ASCII digits.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not unix seconds")
    sent_at = int(timestamp)
    skew = (time.time() if now is None else now) - sent_at
    if abs(skew) > TOLERANCE_SECONDS:
        raise InvalidSignature(
            f"{TIMESTAMP_HEADER} is {'too old' if skew > 0 else 'in the future'}"
            f" (more than {TOLERANCE_SECONDS} seconds from this server's clock)"
        )
    candidates = [
        signature.encode("utf-8", "surrogatepass")
        for version, _, signature in (part.partition(",") for part in signatures.split())
        if version == SIGNATURE_VERSION
    ][:MAX_SIGNATURES]
    if not candidates:
        raise InvalidSignature(f"{SIGNATURE_HEADER} holds no {SIGNATURE_VERSION} signature")
    keys = [decode_secret(secret, name=name) for secret in secrets]
    expected = [sign(key, msg_id, sent_at, body).partition(",")[2].encode("ascii") for key in keys]
    # Every pair is compared, in constant time, so that timing tells nothing of which matched.
    matches = [hmac.compare_digest(want, got) for want in expected for got in candidates]
    if not any(matches):
        raise InvalidSignature("signature does not match")
