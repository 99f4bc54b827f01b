from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class TootError(Exception):
    """Base class of every error toot raises."""


class ConfigError(TootError, ImproperlyConfigured):
    """The ``TOOT`` setting, or a subscription, is misconfigured."""


class InvalidEvent(TootError, ValueError):
    """An event, or its wire JSON, breaks the protocol."""


class InvalidChannel(TootError, ValueError):
    """A channel name is too long or holds characters the protocol forbids."""


class CallbackFailure(TootError):
    """A delivery to a subscriber's callback URL did not get a 2xx answer."""

    def __init__(self, callback_url: str, status: int | None, detail: str = "") -> None:
        self.callback_url = callback_url
        self.status = status
        self.detail = detail
        super().__init__(f"POST {callback_url} answered {status}{': ' + detail if detail else ''}")


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
