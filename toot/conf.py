"""The ``TOOT`` setting, read and checked once, and again after any setting changes.

A value is kept from its first read until Django's ``setting_changed`` signal (which
``override_settings`` sends): every delivery reads a dozen of them, and checking each
again each time cost a tenth of a subscriber worker's time in the benchmark.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, overload
from urllib.parse import urlsplit

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from toot.exceptions import ConfigError

if TYPE_CHECKING:
    import redis
    from django.http import HttpRequest

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Svix / Standard Webhooks schedule: about 28 hours in all.
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

DEFAULTS: dict[str, Any] = {
    "CHANNEL_PREFIX": "",
    "CALLBACK_URL": None,
    "SOURCES": {},
    "REDIS_URL": None,
    "REDIS_CONNECTION": None,
    "PROXY_URL": None,
    "CA_BUNDLE": None,
    "CLIENT_CERT": None,
    "KEY_PREFIX": "toot:",
    "CONNECT_TIMEOUT": 5.0,
    "READ_TIMEOUT": 15.0,
    "REDIS_TIMEOUT": 5.0,
    "REDIS_WAIT_REPLICAS": 0,
    "REDIS_WAIT_TIMEOUT": 1.0,
    "MAX_EVENT_BYTES": 256 * 1024,
    "RETRY_SCHEDULE": DEFAULT_RETRY_SCHEDULE,
    "DEDUPE_TTL": 3 * 24 * 3600,
    "RELAY_INTERVAL": 1.0,
    "MAX_DRAINS": 4,
    "LEASE_SECONDS": 60.0,
    "DRAIN_BATCH": 100,
    "DRAIN_SECONDS": 5.0,
    "DRAIN_LINGER": 0.5,
    "SENDERS": 32,
    "MAX_IN_FLIGHT": 8,
    "BREAKER_FAILURES": 5,
    "BREAKER_SECONDS": 30.0,
    "DISABLE_AFTER": 5 * 24 * 3600.0,
    "CALLBACK_RATE_LIMIT": None,
    "RATE_LIMIT": None,
    "JSON_ENCODER": "django.core.serializers.json.DjangoJSONEncoder",
    "BATCH": True,
    "BATCH_MAX_EVENTS": 100,
    "SIGNING_SECRETS": (),
    "SUBSCRIPTIONS_AUTH": None,
    "ALLOWED_CALLBACK_HOSTS": (),
    "ALLOWED_CALLBACK_NETWORKS": (),
    "ALLOW_REDIS_IN_TESTS": False,
    "METRICS": False,
    "TRACING": False,
}
REQUIRED_SOURCE_KEYS = ("SUBSCRIPTION_URL", "CHANNEL_PREFIX")
SOURCE_KEYS = (*REQUIRED_SOURCE_KEYS, "SECRET", "SECRETS", "TOKEN")
# What can travel in "Authorization: Bearer <token>" unambiguously: printable ASCII, no space.
TOKEN_RE = re.compile(r"[\x21-\x7e]+")

Authenticator = Callable[["HttpRequest"], bool]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# An ALLOWED_CALLBACK_HOSTS entry: a host name as it appears in a URL (ASCII, IDNA-encoded),
# a leading dot for a domain and its subdomains, as in Django's ALLOWED_HOSTS.
HOST_PATTERN_RE = re.compile(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


class Source(NamedTuple):
    """A publisher as this app knows it."""

    name: str
    subscription_url: str
    channel_prefix: str
    # whsec_ secrets its deliveries must be signed with; none: unsigned ones are accepted.
    secrets: tuple[str, ...] = ()
    # Sent as "Authorization: Bearer <token>" when registering with it.
    token: str | None = None

    def __repr__(self) -> str:
        # Sources end up in logs and error messages; their secrets must not.
        hidden = ", secrets=***" if self.secrets else ""
        hidden += ", token=***" if self.token else ""
        return f"Source({self.name!r}, {self.subscription_url!r}, {self.channel_prefix!r}{hidden})"


def _secret_list(value: object, name: str) -> tuple[str, ...]:
    # Only the shape: what makes a secret well formed is checked by toot.E007.
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'{name} must be a list of "whsec_..." strings, not {type(value).__name__}.'
        )
    return tuple(value)


def _token(value: object, name: str) -> str:
    if not isinstance(value, str) or not TOKEN_RE.fullmatch(value):
        # Never the value itself: it is a credential.
        raise ConfigError(f"{name} must be a non-empty string of printable ASCII without spaces.")
    return value


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


T = TypeVar("T")


class setting(Generic[T]):
    """A property of ``Settings`` whose value is kept until a Django setting changes.

    A value read while another thread forgets them all is not kept: it may be the old
    one. An error is not kept either, so that a fixed setting is seen at once.
    """

    def __init__(self, read: Callable[[Settings], T]) -> None:
        self.read = read
        self.name = read.__name__
        self.__doc__ = read.__doc__

    @overload
    def __get__(self, instance: None, owner: type) -> setting[T]: ...

    @overload
    def __get__(self, instance: Settings, owner: type) -> T: ...

    def __get__(self, instance: Settings | None, owner: type) -> setting[T] | T:
        if instance is None:
            return self
        values = instance._values  # a dict forget() replaces: what it read then is dropped
        try:
            return values[self.name]  # type: ignore[no-any-return]
        except KeyError:
            value = values[self.name] = self.read(instance)
            return value


class Settings:
    """Typed access to ``settings.TOOT``; each property raises ConfigError naming a bad key."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def forget(self, **kwargs: Any) -> None:
        """Read every value again from now on (connected to ``setting_changed``)."""
        self._values = {}

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

    def _optional_positive(self, key: str) -> float | None:
        return None if self.get(key) is None else self._positive(key)

    def _positive(self, key: str) -> float:
        value = self.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 < value < math.inf:  # NaN and infinity are not timeouts
            raise ConfigError(f'TOOT["{key}"] must be a positive number, not {value!r}.')
        return float(value)

    def _factory(self, key: str) -> Callable[..., Any] | None:
        """The callable a dotted-path setting names, or None when the setting is None."""
        path = self._optional_str(key)
        if path is None:
            return None
        try:
            factory = import_string(path)
        except ImportError as exc:
            raise ConfigError(
                f'TOOT["{key}"] names {path!r}, which cannot be imported: {exc}'
            ) from None
        if not callable(factory):
            raise ConfigError(f'TOOT["{key}"] names {path!r}, which is not callable.')
        return factory  # type: ignore[no-any-return]

    def _whole(self, key: str) -> int:
        value = self._positive(key)
        if value != int(value):  # 0.5 would otherwise become 0
            raise ConfigError(f'TOOT["{key}"] must be a whole number, not {value!r}.')
        return int(value)

    @setting
    def CHANNEL_PREFIX(self) -> str:
        return self._str("CHANNEL_PREFIX")

    @setting
    def CALLBACK_URL(self) -> str | None:
        return self._optional_str("CALLBACK_URL")

    @setting
    def SOURCES(self) -> dict[str, Source]:
        value = self.get("SOURCES")
        if not isinstance(value, Mapping):
            raise ConfigError('TOOT["SOURCES"] must be a dict of source name to dict.')
        sources = {}
        for name, options in value.items():
            if not isinstance(options, Mapping):
                raise ConfigError(f'TOOT["SOURCES"]["{name}"] must be a dict.')
            for key in REQUIRED_SOURCE_KEYS:
                if not isinstance(options.get(key), str):
                    raise ConfigError(
                        f'TOOT["SOURCES"]["{name}"]["{key}"] must be set to a string.'
                    )
            sources[name] = Source(
                name,
                options["SUBSCRIPTION_URL"],
                options["CHANNEL_PREFIX"],
                secrets=self._source_secrets(name, options),
                token=self._source_token(name, options),
            )
        return sources

    @staticmethod
    def _source_secrets(name: str, options: Mapping[str, Any]) -> tuple[str, ...]:
        secret, secrets = options.get("SECRET"), options.get("SECRETS")
        if secret is not None and secrets is not None:
            raise ConfigError(
                f'TOOT["SOURCES"]["{name}"] sets both "SECRET" and "SECRETS"; '
                "list every secret in SECRETS."
            )
        if secret is not None:
            return _secret_list([secret], f'TOOT["SOURCES"]["{name}"]["SECRET"]')
        if secrets is not None:
            return _secret_list(secrets, f'TOOT["SOURCES"]["{name}"]["SECRETS"]')
        return ()

    @staticmethod
    def _source_token(name: str, options: Mapping[str, Any]) -> str | None:
        token = options.get("TOKEN")
        return None if token is None else _token(token, f'TOOT["SOURCES"]["{name}"]["TOKEN"]')

    def source_for_channel(self, channel: str) -> Source | None:
        """The source whose CHANNEL_PREFIX starts ``channel``, the longest if several do."""
        matching = [s for s in self.SOURCES.values() if channel.startswith(s.channel_prefix)]
        return max(matching, key=lambda s: len(s.channel_prefix), default=None)

    def source(self, name: str) -> Source:
        try:
            return self.SOURCES[name]
        except KeyError:
            raise ConfigError(
                f'Unknown toot source "{name}": define it in TOOT["SOURCES"]["{name}"].'
            ) from None

    @setting
    def REDIS_URL(self) -> str:
        """The setting, else $TOOT_REDIS_URL, else a Redis Celery broker, else the default."""
        value = self._optional_str("REDIS_URL")
        if value:
            return value
        if os.environ.get("TOOT_REDIS_URL"):
            return os.environ["TOOT_REDIS_URL"]
        broker = getattr(settings, "CELERY_BROKER_URL", None)
        if isinstance(broker, str) and broker.startswith(("redis://", "rediss://")):
            return broker
        return DEFAULT_REDIS_URL

    @setting
    def REDIS_CONNECTION(self) -> Callable[[], redis.Redis] | None:
        return self._factory("REDIS_CONNECTION")

    @setting
    def PROXY_URL(self) -> str | None:
        """The http(s) proxy every outgoing call goes through; None: straight to the peer."""
        value = self.get("PROXY_URL")
        if value is None:
            return None
        if isinstance(value, str):
            try:
                parts = urlsplit(value)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname)
                valid = valid and parts.path in ("", "/") and not (parts.query or parts.fragment)
                parts.port  # noqa: B018 - raises ValueError for a port out of range
            except ValueError:
                valid = False
            if valid:
                return value
        # Never the value itself: it may hold the proxy's password.
        raise ConfigError(
            'TOOT["PROXY_URL"] must be an http:// or https:// URL such as '
            '"http://proxy.internal:3128" (user:password@ for Basic authentication), '
            f"not a {type(value).__name__} of another form."
        )

    @setting
    def CA_BUNDLE(self) -> str | None:
        """The CA certificates peers' certificates are verified against; None: certifi's."""
        value = self.get("CA_BUNDLE")
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
            return os.fsdecode(value)
        raise ConfigError(
            'TOOT["CA_BUNDLE"] must be the path of a PEM file of CA certificates, or of a '
            f"directory of them prepared with c_rehash, that exists: not {value!r}."
        )

    @setting
    def CLIENT_CERT(self) -> tuple[str, str | None] | None:
        """(certificate, private key or None) toot presents to TLS peers that ask for one."""
        value = self.get("CLIENT_CERT")
        if value is None:
            return None
        paths = [value] if isinstance(value, (str, os.PathLike)) else value
        if (
            isinstance(paths, (list, tuple))
            and len(paths) in (1, 2)
            and all(isinstance(p, (str, os.PathLike)) and os.path.isfile(p) for p in paths)
        ):
            files = [os.fsdecode(path) for path in paths]
            return files[0], files[1] if len(files) == 2 else None
        raise ConfigError(
            'TOOT["CLIENT_CERT"] must be the path of a PEM file holding the certificate and '
            "its unencrypted private key, or a pair [certificate, key] of paths, each an "
            f"existing file: not {value!r}."
        )

    @setting
    def KEY_PREFIX(self) -> str:
        return self._str("KEY_PREFIX")

    @setting
    def CONNECT_TIMEOUT(self) -> float:
        return self._positive("CONNECT_TIMEOUT")

    @setting
    def READ_TIMEOUT(self) -> float:
        return self._positive("READ_TIMEOUT")

    @setting
    def REDIS_TIMEOUT(self) -> float:
        return self._positive("REDIS_TIMEOUT")

    @setting
    def REDIS_WAIT_REPLICAS(self) -> int:
        """Replicas that must hold an event before publish() or the callbacks endpoint
        counts it as kept (Redis' WAIT); 0: none, the master's word is enough."""
        value = self.get("REDIS_WAIT_REPLICAS")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f'TOOT["REDIS_WAIT_REPLICAS"] must be a whole number, 0 or more, not {value!r}.'
            )
        return value

    @setting
    def REDIS_WAIT_TIMEOUT(self) -> float:
        return self._positive("REDIS_WAIT_TIMEOUT")

    @setting
    def MAX_EVENT_BYTES(self) -> int:
        return self._whole("MAX_EVENT_BYTES")

    @setting
    def ALLOWED_CALLBACK_HOSTS(self) -> tuple[str, ...]:
        """Callback hosts exempt from the SSRF address rules, and allowed over plain http."""
        value = self.get("ALLOWED_CALLBACK_HOSTS")
        # Not a bare string, which would be read letter by letter; a URL or a port never matches.
        if isinstance(value, (list, tuple)):
            hosts = tuple(h.lower().strip("[]") if isinstance(h, str) else "" for h in value)
            if all(HOST_PATTERN_RE.fullmatch(host) or _is_ip(host) for host in hosts):
                return hosts
        raise ConfigError(
            'TOOT["ALLOWED_CALLBACK_HOSTS"] must be a list of host names such as '
            f'["hooks.internal", ".corp.example", "10.1.2.3"], not {value!r}.'
        )

    @setting
    def ALLOWED_CALLBACK_NETWORKS(self) -> tuple[IPNetwork, ...]:
        """Networks whose addresses callbacks may resolve to although they are not public."""
        value = self.get("ALLOWED_CALLBACK_NETWORKS")
        if isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
            try:
                return tuple(ipaddress.ip_network(network, strict=False) for network in value)
            except ValueError:
                pass
        raise ConfigError(
            'TOOT["ALLOWED_CALLBACK_NETWORKS"] must be a list of networks such as '
            f'["10.0.0.0/8", "fd00::/8"], not {value!r}.'
        )

    @setting
    def RETRY_SCHEDULE(self) -> tuple[float, ...]:
        value = self.get("RETRY_SCHEDULE")
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(delay, (int, float))
            and not isinstance(delay, bool)
            and 0 <= delay < math.inf
            for delay in value
        ):
            raise ConfigError('TOOT["RETRY_SCHEDULE"] must be a list of delays in seconds (>= 0).')
        return tuple(float(delay) for delay in value)

    @setting
    def DEDUPE_TTL(self) -> int:
        """Seconds a handled event id is remembered; must outlast the publisher's retries."""
        return self._whole("DEDUPE_TTL")

    @setting
    def RELAY_INTERVAL(self) -> float:
        return self._positive("RELAY_INTERVAL")

    @setting
    def MAX_DRAINS(self) -> int:
        """Drain tasks that may run at once per queue, across every worker."""
        return self._whole("MAX_DRAINS")

    @setting
    def DRAIN_BATCH(self) -> int:
        """Items a drain claims at a time: one round trip to Redis for each this many."""
        return self._whole("DRAIN_BATCH")

    @setting
    def DRAIN_SECONDS(self) -> float:
        """A drain hands over to a new message after this long, so that a worker's other
        tasks get their turn under a steady stream of events."""
        return self._positive("DRAIN_SECONDS")

    @setting
    def DRAIN_LINGER(self) -> float:
        """An idle drain waits this long for more before it ends: under a light, steady
        load one drain picks up each event as it comes, without a Celery message."""
        return self._positive("DRAIN_LINGER")

    @setting
    def SENDERS(self) -> int:
        """Sender threads a publisher's worker process may run, each with one request in
        flight; started as work needs them."""
        return self._whole("SENDERS")

    @setting
    def MAX_IN_FLIGHT(self) -> int:
        """Requests in flight to one callback URL at once, across every worker."""
        return self._whole("MAX_IN_FLIGHT")

    @setting
    def BREAKER_FAILURES(self) -> int:
        """Failed requests in a row that open a callback URL's circuit."""
        return self._whole("BREAKER_FAILURES")

    @setting
    def BREAKER_SECONDS(self) -> float:
        """How long an open circuit waits before a probe delivery."""
        return self._positive("BREAKER_SECONDS")

    @setting
    def DISABLE_AFTER(self) -> float:
        """Seconds of failing without a success after which a callback URL is disabled."""
        return self._positive("DISABLE_AFTER")

    @setting
    def CALLBACK_RATE_LIMIT(self) -> float | None:
        """Events per second sent to a callback URL that asked for no rate of its own."""
        return self._optional_positive("CALLBACK_RATE_LIMIT")

    @setting
    def RATE_LIMIT(self) -> float | None:
        """Events per second this subscriber asks its sources for, when it registers."""
        return self._optional_positive("RATE_LIMIT")

    @setting
    def JSON_ENCODER(self) -> type[json.JSONEncoder]:
        """What turns a payload's datetimes, Decimals, UUIDs and lazy strings into JSON."""
        encoder = self._factory("JSON_ENCODER")
        if not (isinstance(encoder, type) and issubclass(encoder, json.JSONEncoder)):
            raise ConfigError(
                'TOOT["JSON_ENCODER"] must name a json.JSONEncoder subclass, such as '
                '"django.core.serializers.json.DjangoJSONEncoder".'
            )
        return encoder

    @setting
    def ALLOW_REDIS_IN_TESTS(self) -> bool:
        """Whether tests may reach toot's Redis and the broker outside toot.testing's helpers."""
        value = self.get("ALLOW_REDIS_IN_TESTS")
        if not isinstance(value, bool):
            raise ConfigError(f'TOOT["ALLOW_REDIS_IN_TESTS"] must be True or False, not {value!r}.')
        return value

    @setting
    def METRICS(self) -> bool:
        """Whether toot.metrics counts what toot does for Prometheus (the prometheus extra)."""
        value = self.get("METRICS")
        if not isinstance(value, bool):
            raise ConfigError(f'TOOT["METRICS"] must be True or False, not {value!r}.')
        return value

    @setting
    def LEASE_SECONDS(self) -> float:
        """How long a drain that stopped renewing its lease is presumed alive."""
        return self._positive("LEASE_SECONDS")

    @setting
    def BATCH(self) -> bool:
        """Whether this subscriber asks its sources for batches of events."""
        value = self.get("BATCH")
        if not isinstance(value, bool):
            raise ConfigError(f'TOOT["BATCH"] must be True or False, not {value!r}.')
        return value

    @setting
    def TRACING(self) -> bool:
        """Whether toot makes OpenTelemetry spans and carries their context (toot.tracing)."""
        value = self.get("TRACING")
        if not isinstance(value, bool):
            raise ConfigError(f'TOOT["TRACING"] must be True or False, not {value!r}.')
        return value

    @setting
    def BATCH_MAX_EVENTS(self) -> int:
        """The most events one batched delivery carries, and one callback accepts."""
        return self._whole("BATCH_MAX_EVENTS")

    @setting
    def SIGNING_SECRETS(self) -> tuple[str, ...]:
        """``whsec_`` secrets every delivery is signed with; none: deliveries go unsigned."""
        return _secret_list(self.get("SIGNING_SECRETS"), 'TOOT["SIGNING_SECRETS"]')

    @setting
    def SUBSCRIPTIONS_AUTH(self) -> tuple[str, ...] | Authenticator | None:
        """None (an open endpoint), the accepted bearer tokens, or a callable that decides."""
        value = self.get("SUBSCRIPTIONS_AUTH")
        name = 'TOOT["SUBSCRIPTIONS_AUTH"]'
        if value is None:
            return None
        if isinstance(value, Mapping):
            if set(value) != {"TOKENS"}:
                raise ConfigError(f'{name} must be a dict with the one key "TOKENS".')
            tokens = value["TOKENS"]
            if not isinstance(tokens, (list, tuple)) or not tokens:
                raise ConfigError(f'{name}["TOKENS"] must be a non-empty list of tokens.')
            return tuple(_token(token, f'{name}["TOKENS"][{i}]') for i, token in enumerate(tokens))
        if isinstance(value, str):
            return self._factory("SUBSCRIPTIONS_AUTH")
        raise ConfigError(
            f'{name} must be None, {{"TOKENS": [...]}} or the dotted path of a callable, '
            f"not {type(value).__name__}."
        )


conf = Settings()
# Django sends it from override_settings and the like, in tests: never in production.
setting_changed.connect(conf.forget)
