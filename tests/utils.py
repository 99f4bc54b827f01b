"""Helpers several test modules share."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.test import override_settings


def store_contents(redis: Any) -> dict[Any, Any]:
    """The subscription store: every channel's set of callback URLs, and the channel index.

    Only these sets: retries and handler marks that tasks of earlier tests still write
    share the namespace and are not the store.
    """
    prefix = settings.TOOT["KEY_PREFIX"]
    keys = [*redis.scan_iter(match=f"{prefix}subscriptions:*", count=1000), f"{prefix}channels"]
    return {key: redis.smembers(key) for key in keys}


def sources(options: dict[str, Any] | None = None, /, **urls: str) -> override_settings:
    """The tests' settings with ``options`` and a source per keyword, at that subscription URL.

    Each source ``name`` has the channel prefix ``org.example.<name>.``.
    """
    return override_settings(
        TOOT={
            **settings.TOOT,
            **(options or {}),
            "SOURCES": {
                name: {"SUBSCRIPTION_URL": url, "CHANNEL_PREFIX": f"org.example.{name}."}
                for name, url in urls.items()
            },
        }
    )


def callback_urls(channel: str) -> list[str]:
    """The callback URLs subscribed to ``channel``, as the publisher's drain finds them."""
    from toot import store

    return [url for url, _batch in store.subscribers([channel])[channel]]
