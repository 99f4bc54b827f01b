"""System checks for the ``TOOT`` setting, the local subscriptions and the Celery app."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import celery
from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.urls import NoReverseMatch, reverse

from toot.conf import DEFAULTS, SOURCE_KEYS, conf
from toot.engine import connection, redis_config
from toot.engine.retries import JITTER
from toot.exceptions import ConfigError
from toot.protocol.signing import secret_error
from toot.protocol.validation import CHANNEL_RE, url_error
from toot.subscriber.handling import handler_name
from toot.subscriber.registry import registry

DOCS_HINT = "See the Configuration section of toot's README."
# Settings toot no longer reads, and what to use instead: set, each is an error, not the
# W001 of a typo, since the project counts on what it did.
REMOVED_SETTINGS = {
    "HTTP_SESSION": (
        'TOOT["HTTP_SESSION"] is no longer supported: toot sends with urllib3, not through '
        "a requests session of yours.",
        'Remove it. For a forward proxy set TOOT["PROXY_URL"]; for a private CA, '
        'TOOT["CA_BUNDLE"]; for a TLS client certificate, TOOT["CLIENT_CERT"]. Deliveries '
        'are authenticated by TOOT["SIGNING_SECRETS"], registrations by a source\'s TOKEN.',
    ),
}
# Where clouds serve instance metadata, credentials included: most clouds, AWS over IPv6,
# Alibaba Cloud.
METADATA_ADDRESSES = tuple(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    if not hasattr(settings, "TOOT"):
        return [
            Error(
                "The TOOT setting is missing.",
                hint='Add TOOT = {"CHANNEL_PREFIX": ..., ...} to your settings. ' + DOCS_HINT,
                id="toot.E001",
            )
        ]
    try:
        raw = conf.raw
    except ConfigError as exc:
        return [Error(str(exc), hint=DOCS_HINT, id="toot.E001")]

    messages: list[CheckMessage] = [
        Error(*REMOVED_SETTINGS[key], id="toot.E008")
        if key in REMOVED_SETTINGS
        else Warning(
            f'TOOT["{key}"] is not a toot setting.',
            hint=f"Known settings: {', '.join(DEFAULTS)}.",
            id="toot.W001",
        )
        for key in raw
        if key not in DEFAULTS
    ]
    for key in DEFAULTS:
        try:
            getattr(conf, key)
        except ConfigError as exc:
            messages.append(Error(str(exc), hint=DOCS_HINT, id="toot.E002"))
    if any(message.id == "toot.E002" for message in messages):
        return messages  # the checks below read the same values

    messages += _url_errors()
    messages += _tls_errors()
    prefixes = [('TOOT["CHANNEL_PREFIX"]', conf.CHANNEL_PREFIX)] + [
        (f'TOOT["SOURCES"]["{s.name}"]["CHANNEL_PREFIX"]', s.channel_prefix)
        for s in conf.SOURCES.values()
    ]
    messages += [
        Error(
            f"{name} may hold only printable ASCII characters without spaces: {prefix!r}.",
            hint='Use a reverse-DNS prefix such as "org.example.publisher.".',
            id="toot.E006",
        )
        for name, prefix in prefixes
        if prefix and not CHANNEL_RE.fullmatch(prefix)
    ]
    for source, keys in ((name, options) for name, options in raw.get("SOURCES", {}).items()):
        messages += [
            Warning(
                f'TOOT["SOURCES"]["{source}"]["{key}"] is not a source setting.',
                hint=f"Known source settings: {', '.join(SOURCE_KEYS)}.",
                id="toot.W002",
            )
            for key in keys
            if key not in SOURCE_KEYS
        ]
    messages += _secret_errors(raw)
    messages += _allowed_network_warnings()
    messages += _dedupe_warnings()
    messages += _lease_warnings()
    messages += _sender_warnings()
    messages += _metrics_errors()
    messages += _tracing_errors()
    return messages


def _metrics_errors() -> list[CheckMessage]:
    from toot import metrics

    if not conf.METRICS or metrics.available():
        return []
    return [
        Error(
            'TOOT["METRICS"] is on, but prometheus_client is not installed.',
            hint='Install toot with its prometheus extra: pip install "django-toot[prometheus]"; '
            'or set TOOT["METRICS"] to False.',
            id="toot.E011",
        )
    ]


def _tracing_errors() -> list[CheckMessage]:
    # Found, not imported: toot.tracing imports it only when a span is to be made.
    if not conf.TRACING or importlib.util.find_spec("opentelemetry.trace") is not None:
        return []
    return [
        Error(
            'TOOT["TRACING"] is on, but opentelemetry-api is not installed.',
            hint="Install toot's otel extra (pip install django-toot[otel]) and an "
            "OpenTelemetry SDK to export the spans, or set TRACING to False.",
            id="toot.E010",
        )
    ]


def _tls_errors() -> list[CheckMessage]:
    # conf only sees that the files exist: one that is not PEM, or a key that is not the
    # certificate's, would fail every https call.
    context = ssl.create_default_context()
    failures: list[tuple[str, Exception]] = []
    bundle, cert = conf.CA_BUNDLE, conf.CLIENT_CERT
    if bundle is not None and not os.path.isdir(bundle):  # a directory is read per peer
        try:
            context.load_verify_locations(cafile=bundle)
        except (ssl.SSLError, OSError) as exc:
            failures.append(('TOOT["CA_BUNDLE"]', exc))
    if cert is not None:
        try:
            # An empty password, so that an encrypted key fails here instead of prompting.
            context.load_cert_chain(*cert, password=b"")
        except (ssl.SSLError, OSError) as exc:
            failures.append(('TOOT["CLIENT_CERT"]', exc))
    return [
        Error(
            f"{name} cannot be loaded: {exc}.",
            hint="Give PEM files; a client certificate's private key must match it and "
            "must not be encrypted.",
            id="toot.E002",
        )
        for name, exc in failures
    ]


def _lease_warnings() -> list[CheckMessage]:
    # A drain renews its lease before a POST once a quarter of it has passed: one POST
    # must end within the other three quarters, or another drain sends the batch again.
    longest = conf.CONNECT_TIMEOUT + conf.READ_TIMEOUT
    if longest <= conf.LEASE_SECONDS * 3 / 4:
        return []
    return [
        Warning(
            f'TOOT["CONNECT_TIMEOUT"] + TOOT["READ_TIMEOUT"] ({longest:g} s) is over three '
            f'quarters of TOOT["LEASE_SECONDS"] ({conf.LEASE_SECONDS:g} s).',
            hint="A delivery that takes that long outlives its drain's lease, and another "
            "drain sends the same events again: raise LEASE_SECONDS or lower the timeouts.",
            id="toot.W007",
        )
    ]


def _sender_warnings() -> list[CheckMessage]:
    # A slow subscriber holds up to MAX_IN_FLIGHT sender threads: with no more than that,
    # one can hold a worker process's every thread, and the others wait for it.
    if conf.SENDERS > conf.MAX_IN_FLIGHT:
        return []
    return [
        Warning(
            f'TOOT["SENDERS"] ({conf.SENDERS}) is not more than TOOT["MAX_IN_FLIGHT"] '
            f"({conf.MAX_IN_FLIGHT}).",
            hint="One slow subscriber could hold every sender thread of a worker process, "
            "and the others would wait for it: keep SENDERS well above MAX_IN_FLIGHT.",
            id="toot.W009",
        )
    ]


def _dedupe_warnings() -> list[CheckMessage]:
    # Done marks only matter to a subscriber. Its publishers' schedules are not known
    # here: its own stands in for them, as a toot publisher's default is the same.
    window = sum(conf.RETRY_SCHEDULE) * (1 + JITTER)
    if not conf.SOURCES or window <= conf.DEDUPE_TTL:
        return []
    return [
        Warning(
            f'TOOT["DEDUPE_TTL"] ({conf.DEDUPE_TTL} s) is shorter than the retry window of '
            f'TOOT["RETRY_SCHEDULE"] (up to {window:.0f} s).',
            hint="A delivery retried after its handler ran would run the handler again: "
            "raise DEDUPE_TTL above your publishers' retry window (this project's own "
            "RETRY_SCHEDULE stands in for theirs here).",
            id="toot.W005",
        )
    ]


def _allowed_network_warnings() -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for network in conf.ALLOWED_CALLBACK_NETWORKS:
        reached = [str(address) for address in METADATA_ADDRESSES if address in network]
        if reached:
            messages.append(
                Warning(
                    f'TOOT["ALLOWED_CALLBACK_NETWORKS"] allows {network}, which holds '
                    f"{', '.join(reached)}: a subscriber could make deliveries reach your "
                    "cloud's instance metadata service, credentials included.",
                    hint="Allow only the networks your subscribers are in, or name their "
                    'hosts in TOOT["ALLOWED_CALLBACK_HOSTS"].',
                    id="toot.W004",
                )
            )
    return messages


def _secret_errors(raw: Any) -> list[CheckMessage]:
    named = [(f'TOOT["SIGNING_SECRETS"][{i}]', s) for i, s in enumerate(conf.SIGNING_SECRETS)]
    for source in conf.SOURCES.values():
        if raw["SOURCES"][source.name].get("SECRET") is not None:  # as conf reads it
            named.append((f'TOOT["SOURCES"]["{source.name}"]["SECRET"]', source.secrets[0]))
        else:
            key = f'TOOT["SOURCES"]["{source.name}"]["SECRETS"]'
            named += [(f"{key}[{i}]", secret) for i, secret in enumerate(source.secrets)]
    # The message never quotes the secret: check output ends up in CI logs.
    return [
        Error(
            f"{name} {error}.",
            hint='Generate one with: python -c "import base64, secrets; '
            "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\"",
            id="toot.E007",
        )
        for name, secret in named
        if (error := secret_error(secret))
    ]


def _url_errors() -> list[CheckMessage]:
    urls = [('TOOT["CALLBACK_URL"]', conf.CALLBACK_URL)] + [
        (f'TOOT["SOURCES"]["{s.name}"]["SUBSCRIPTION_URL"]', s.subscription_url)
        for s in conf.SOURCES.values()
    ]
    messages: list[CheckMessage] = []
    for name, url in urls:
        error = url is not None and url_error(url, name=name)
        if error:
            messages.append(
                Error(f"{error}: {url!r}.", hint="Give an absolute http(s) URL.", id="toot.E005")
            )
    return messages + _redis_url_errors()


# The URLs of many hosts: their schemes, parser, name and an example.
_MANY_HOSTS: list[tuple[tuple[str, ...], Callable[[str], object], str, str]] = [
    (
        connection.SENTINEL_SCHEMES,
        connection.parse_sentinel_url,
        "Sentinel",
        "redis+sentinel://:password@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster/0",
    ),
    (
        connection.CLUSTER_SCHEMES,
        connection.parse_cluster_url,
        "Redis Cluster",
        "redis+cluster://:password@10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379",
    ),
]


def _redis_url_errors() -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if conf.REDIS_URL.startswith(connection.CLUSTER_SCHEMES) and conf.REDIS_WAIT_REPLICAS:
        messages.append(
            Error(
                'TOOT["REDIS_WAIT_REPLICAS"] works with one master (redis:// or '
                "redis+sentinel://), not with Redis Cluster: WAIT counts the writes of "
                "one connection, and a cluster's pushes go to several masters.",
                hint='Set TOOT["REDIS_WAIT_REPLICAS"] to 0.',
                id="toot.E005",
            )
        )
    for schemes, parse, kind, example in _MANY_HOSTS:
        if conf.REDIS_URL.startswith(schemes):
            try:
                parse(conf.REDIS_URL)
            except ValueError as exc:
                messages.append(
                    Error(
                        f'TOOT["REDIS_URL"] is not a {kind} URL toot can use: {exc}.',
                        hint=f"For example {example}.",
                        id="toot.E005",
                    )
                )
            return messages
    try:
        redis_scheme = urlsplit(conf.REDIS_URL).scheme
    except ValueError:  # e.g. an unclosed IPv6 bracket: report it, don't crash the checks
        redis_scheme = ""
    if redis_scheme not in ("redis", "rediss", "unix"):
        messages.append(
            Error(
                'TOOT["REDIS_URL"] must be a redis://, rediss://, unix://, redis+sentinel:// '
                f"or redis+cluster:// URL: {conf.REDIS_URL!r}.",
                hint="For example redis://127.0.0.1:6379/0.",
                id="toot.E005",
            )
        )
    return messages


def check_subscriptions(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    try:
        sources = conf.SOURCES
        callback_url = conf.CALLBACK_URL
    except ConfigError:
        return []  # check_settings reports it
    messages: list[CheckMessage] = []
    if registry.subscriptions and not callback_url:
        messages.append(
            Error(
                'There are toot subscriptions but TOOT["CALLBACK_URL"] is not set.',
                hint="Set it to the absolute URL of toot's callbacks endpoint, "
                'e.g. "https://sub.example.org/toot/callbacks".',
                id="toot.E003",
            )
        )
    messages += [
        Error(
            f'Subscription to "{sub.channel}" names the undefined source "{sub.source}".',
            hint=f'Define it in TOOT["SOURCES"]["{sub.source}"].',
            obj=sub.handler,
            id="toot.E004",
        )
        for sub in registry.subscriptions
        if sub.source not in sources
    ]
    queues: dict[str, list[str | None]] = {}
    for sub in registry.subscriptions:
        queues.setdefault(handler_name(sub.handler), []).append(sub.queue)
    messages += [
        Warning(
            f"{name} is subscribed with different Celery queues: {', '.join(map(repr, named))}.",
            hint="A handler's drains go to one Celery queue, the first subscription's: give "
            "every subscription of the handler the same queue=.",
            obj=name,
            id="toot.W008",
        )
        for name, named in queues.items()
        if len(set(named)) > 1
    ]
    return messages


def check_celery(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    # Celery's fallback, made when no app of the project was loaded, is named "default".
    if celery.current_app.main != "default":
        return []
    return [
        Warning(
            "No Celery app of this project is loaded: publish() and the callbacks endpoint "
            "would send toot.drain through Celery's default app, to amqp://localhost, not to "
            "your broker.",
            hint="Import your Celery app in your project package's __init__.py "
            "(from .celery import app as celery_app), as Celery's Django guide does; see "
            "step 4 of Setup in toot's README.",
            id="toot.W006",
        )
    ]


def check_security(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    try:
        auth = conf.SUBSCRIPTIONS_AUTH
    except ConfigError:
        return []  # check_settings reports it
    if auth is not None or settings.DEBUG:
        return []
    try:
        reverse("toot:subscriptions")
    except NoReverseMatch:
        return []  # the project serves no subscriptions endpoint
    return [
        Warning(
            "toot's subscriptions endpoint is open: anyone who can reach it can subscribe any URL "
            "to your events, list the subscribers and remove them.",
            hint='Set TOOT["SUBSCRIPTIONS_AUTH"] to {"TOKENS": [...]} (each subscriber sends '
            'its source\'s TOKEN) or to a callable; see "Securing toot" in the README.',
            id="toot.W003",
        )
    ]


def check_redis(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """toot's Redis as it is now: its eviction policy, persistence and version.

    A deploy check (``manage.py check --deploy``): it talks to Redis, within
    ``REDIS_TIMEOUT``, which the other checks never do.
    """
    broker_url = celery.current_app.conf.broker_url
    try:
        findings = redis_config.inspect(broker_url if isinstance(broker_url, str) else None)
    except ConfigError:
        return []  # check_settings reports it
    return [
        (Error if finding.is_error else Warning)(finding.message, hint=finding.hint, id=finding.id)
        for finding in findings
    ]
