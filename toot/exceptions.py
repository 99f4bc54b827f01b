from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation


class TootError(Exception):
    """Base class of every error toot raises."""


class ConfigError(TootError, ImproperlyConfigured):
    """The ``TOOT`` setting, or a subscription, is misconfigured."""


class InvalidEvent(TootError, ValueError):
    """An event, or its wire JSON, breaks the protocol."""


class InvalidChannel(TootError, ValueError):
    """A channel name is too long or holds characters the protocol forbids."""


class EventTooLarge(TootError, ValueError):
    """An event whose wire JSON is over ``TOOT["MAX_EVENT_BYTES"]``: subscribers refuse it."""

    def __init__(self, channel: str, size: int, limit: int) -> None:
        self.channel = channel
        self.size = size
        self.limit = limit
        super().__init__(
            f'event on {channel} is {size} bytes of JSON, over TOOT["MAX_EVENT_BYTES"] ({limit})'
        )


class InvalidCallback(TootError, ValueError):
    """A callback URL toot will not call: bad scheme, credentials, a non-public address (SSRF)."""


class NotIsolated(TootError):
    """A test made toot reach Redis, the broker or the network where it must not (toot.testing)."""


class DeliveryRefused(TootError, AssertionError):
    """The callbacks endpoint refused an event that ``toot.testing`` delivered."""

    def __init__(self, status: int, error: str) -> None:
        self.status = status
        self.error = error
        super().__init__(f"the callbacks endpoint answered {status}: {error}")


class InvalidSignature(TootError, SuspiciousOperation):
    """A callback's Standard Webhooks signature headers are missing, stale or do not match."""


class RegisterSubscriptionFailure(TootError):
    """A source's subscriptions endpoint refused a registration."""

    def __init__(self, subscription_url: str, channel: str, status: int, detail: str = "") -> None:
        self.subscription_url = subscription_url
        self.channel = channel
        self.status = status
        self.detail = detail
        super().__init__(
            f"registering {channel} at {subscription_url} failed with status {status}"
            f"{': ' + detail if detail else ''}"
        )

    def __reduce__(self) -> tuple[type[RegisterSubscriptionFailure], tuple[str, str, int, str]]:
        return type(self), (self.subscription_url, self.channel, self.status, self.detail)


class LeaseLost(TootError):
    """A drain's lease ran out, and the relay gave what it held to another drain.

    The drain stops at once: the other drain sends that work, and schedules its retries,
    in its place.
    """


class AlreadyRunning(TootError):
    """Another run, alive, holds the claim on this (event, handler)."""


class Refused(TootError):
    """Ends a request to one of toot's endpoints with ``status`` and a JSON error body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
