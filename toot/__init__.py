"""Publish/subscribe between Django projects over HTTP, wire-compatible with Ruby toot."""

from __future__ import annotations

from toot.events import Event
from toot.exceptions import (
    ConfigError,
    EventTooLarge,
    InvalidCallback,
    InvalidChannel,
    InvalidEvent,
    RegisterSubscriptionFailure,
    TootError,
)
from toot.publishing import publish
from toot.registration import register_subscriptions
from toot.registry import subscribe

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "EventTooLarge",
    "InvalidCallback",
    "InvalidChannel",
    "InvalidEvent",
    "RegisterSubscriptionFailure",
    "TootError",
    "publish",
    "register_subscriptions",
    "subscribe",
]
