"""Publish/subscribe between Django projects over HTTP, wire-compatible with Ruby toot."""

from __future__ import annotations

from toot.exceptions import (
    ConfigError,
    EventTooLarge,
    InvalidCallback,
    InvalidChannel,
    InvalidEvent,
    NotIsolated,
    RegisterSubscriptionFailure,
    TootError,
)
from toot.protocol.events import Event
from toot.publisher.publishing import apublish, publish
from toot.subscriber.registration import register_subscriptions
from toot.subscriber.registry import subscribe

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "EventTooLarge",
    "InvalidCallback",
    "InvalidChannel",
    "InvalidEvent",
    "NotIsolated",
    "RegisterSubscriptionFailure",
    "TootError",
    "apublish",
    "publish",
    "register_subscriptions",
    "subscribe",
]
