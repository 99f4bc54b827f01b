"""The ``TOOT`` setting, read on every access so that ``override_settings`` works."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from django.conf import settings

from toot.exceptions import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Svix / Standard Webhooks schedule: about 28 hours in all.
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

DEFAULTS: dict[str, Any] = {
    "CHANNEL_PREFIX": "",
    "CALLBACK_URL": None,
    "SOURCES": {},
    "REDIS_URL": None,
    "REDIS_CONNECTION": None,
    "HTTP_SESSION": None,
    "KEY_PREFIX": "toot:",
    "CONNECT_TIMEOUT": 5.0,
    "READ_TIMEOUT": 15.0,
    "REDIS_TIMEOUT": 5.0,
    "MAX_EVENT_BYTES": 256 * 1024,
    "RETRY_SCHEDULE": DEFAULT_RETRY_SCHEDULE,
    "DEDUPE_TTL": 3 * 24 * 3600,
    "RELAY_INTERVAL": 1.0,
}
SOURCE_KEYS = ("SUBSCRIPTION_URL", "CHANNEL_PREFIX")


class Source(NamedTuple):
    """A publisher as this app knows it."""

    name: str
    subscription_url: str
    channel_prefix: str


class Settings:
    """Typed access to ``settings.TOOT``; each property raises ConfigError naming a bad key."""

    @property
    def raw(self) -> Mapping[str, Any]:
        value = getattr(settings, "TOOT", {})
        if not isinstance(value, Mapping):
            raise ConfigError("The TOOT setting must be a dict.")
        return value

    def get(self, key: str) -> Any:
        return self.raw.get(key, DEFAULTS[key])

    def _str(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise ConfigError(f'TOOT["{key}"] must be a string, not {type(value).__name__}.')
        return value

    def _optional_str(self, key: str) -> str | None:
        return None if self.get(key) is None else self._str(key)

    def _positive(self, key: str) -> float:
        value = self.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 < value < math.inf:  # NaN and infinity are not timeouts
            raise ConfigError(f'TOOT["{key}"] must be a positive number, not {value!r}.')
        return float(value)

    def _whole(self, key: str) -> int:
        value = self._positive(key)
        if value != int(value):  # 0.5 would otherwise become 0
            raise ConfigError(f'TOOT["{key}"] must be a whole number, not {value!r}.')
        return int(value)

    @property
    def CHANNEL_PREFIX(self) -> str:
        return self._str("CHANNEL_PREFIX")

    @property
    def CALLBACK_URL(self) -> str | None:
        return self._optional_str("CALLBACK_URL")

    @property
    def SOURCES(self) -> dict[str, Source]:
        value = self.get("SOURCES")
        if not isinstance(value, Mapping):
            raise ConfigError('TOOT["SOURCES"] must be a dict of source name to dict.')
        sources = {}
        for name, options in value.items():
            if not isinstance(options, Mapping):
                raise ConfigError(f'TOOT["SOURCES"]["{name}"] must be a dict.')
            for key in SOURCE_KEYS:
                if not isinstance(options.get(key), str):
                    raise ConfigError(f'TOOT["SOURCES"]["{name}"]["{key}"] must be set to a string.')
            sources[name] = Source(name, options["SUBSCRIPTION_URL"], options["CHANNEL_PREFIX"])
        return sources

    def source(self, name: str) -> Source:
        try:
            return self.SOURCES[name]
        except KeyError:
            raise ConfigError(
                f'Unknown toot source "{name}": define it in TOOT["SOURCES"]["{name}"].'
            ) from None

    @property
    def REDIS_URL(self) -> str:
        """The explicit setting, else $TOOT_REDIS_URL, else a Redis Celery broker, else the default."""
        value = self._optional_str("REDIS_URL")
        if value:
            return value
        if os.environ.get("TOOT_REDIS_URL"):
            return os.environ["TOOT_REDIS_URL"]
        broker = getattr(settings, "CELERY_BROKER_URL", None)
        if isinstance(broker, str) and broker.startswith(("redis://", "rediss://")):
            return broker
        return DEFAULT_REDIS_URL

    @property
    def REDIS_CONNECTION(self) -> str | None:
        return self._optional_str("REDIS_CONNECTION")

    @property
    def HTTP_SESSION(self) -> str | None:
        return self._optional_str("HTTP_SESSION")

    @property
    def KEY_PREFIX(self) -> str:
        return self._str("KEY_PREFIX")

    @property
    def CONNECT_TIMEOUT(self) -> float:
        return self._positive("CONNECT_TIMEOUT")

    @property
    def READ_TIMEOUT(self) -> float:
        return self._positive("READ_TIMEOUT")

    @property
    def REDIS_TIMEOUT(self) -> float:
        return self._positive("REDIS_TIMEOUT")

    @property
    def MAX_EVENT_BYTES(self) -> int:
        return self._whole("MAX_EVENT_BYTES")

    @property
    def RETRY_SCHEDULE(self) -> tuple[float, ...]:
        value = self.get("RETRY_SCHEDULE")
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(delay, (int, float)) and not isinstance(delay, bool)
            and 0 <= delay < math.inf
            for delay in value
        ):
            raise ConfigError('TOOT["RETRY_SCHEDULE"] must be a list of delays in seconds (>= 0).')
        return tuple(float(delay) for delay in value)

    @property
    def DEDUPE_TTL(self) -> int:
        """Seconds a handled event id is remembered; must outlast the publisher's retries."""
        return self._whole("DEDUPE_TTL")

    @property
    def RELAY_INTERVAL(self) -> float:
        return self._positive("RELAY_INTERVAL")


conf = Settings()
