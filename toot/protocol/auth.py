"""Who may use the subscriptions endpoint: ``TOOT["SUBSCRIPTIONS_AUTH"]``.

The Ruby gem leaves the endpoint open, and so does toot by default (a Ruby subscriber
sends no credentials). Open, anyone who reaches it can point a publisher's events at any
URL, list every subscriber and unsubscribe them; toot.W003 says so when DEBUG is off.
"""

from __future__ import annotations

from django.http import HttpRequest
from django.utils.crypto import constant_time_compare

from toot.conf import conf

BEARER = "bearer"


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == BEARER and token else None


def authentication_error(request: HttpRequest) -> str | None:
    """Why ``request`` may not use the subscriptions endpoint, or None when it may."""
    auth = conf.SUBSCRIPTIONS_AUTH
    if auth is None:
        return None
    if callable(auth):
        # Only True lets a request in: a callable that forgets to return must not.
        return None if auth(request) is True else "not authorized"
    token = bearer_token(request)
    if token is None:
        return "authentication required: send Authorization: Bearer <token>"
    # Compared with every token, in constant time, so timing reveals neither token nor match.
    matches = [constant_time_compare(token, accepted) for accepted in auth]
    if not any(matches):
        return "invalid bearer token"
    return None


def authorization_header(token: str | None) -> dict[str, str]:
    """The header a subscriber sends a source with ``TOKEN``; none without."""
    return {"Authorization": f"Bearer {token}"} if token else {}
