"""toot's Redis connection, and the Lua scripts run on it.

Every module that touches Redis goes through ``get_redis()`` and ``run_script()``: one
client per URL and timeout (or the project's own, ``REDIS_CONNECTION``), scripts run by
their SHA. A ``redis+sentinel://`` URL names a master that Redis Sentinel fails over: the
client asks the sentinels where it is, and asks again once it stops answering.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import Sentinel

from toot.conf import conf
from toot.engine import isolation

_clients: dict[tuple[str, float], redis.Redis] = {}
_scripts: dict[str, Script] = {}


def get_redis() -> redis.Redis:
    """The client for toot's Redis: ``TOOT["REDIS_CONNECTION"]`` if set, else one per URL.

    Raises NotIsolated where a test must not reach it (``toot.engine.isolation``).
    """
    isolation.check("Redis")
    factory = conf.REDIS_CONNECTION
    if factory is not None:
        return factory()
    key = (conf.REDIS_URL, conf.REDIS_TIMEOUT)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = new_client(*key)
    return client


# Celery's rediss:// URLs name ssl's constants, ssl_cert_reqs=CERT_REQUIRED, which redis-py
# refuses: it takes required, optional or none. REDIS_URL defaults to the broker's URL.
_CELERY_CERT_REQS = re.compile(r"([?&]ssl_cert_reqs=)CERT_(REQUIRED|OPTIONAL|NONE)(?=&|$)", re.I)


def new_client(url: str, timeout: float) -> redis.Redis:
    """The client toot builds from REDIS_URL and REDIS_TIMEOUT."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": 30,
        # No retry of a command whose reply was lost: a claim run twice would drop the
        # batch the first run took. redis-py's Redis() has retried by default since 6.0.
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith(SENTINEL_SCHEMES):
        return _sentinel_client(parse_sentinel_url(url), options)
    return redis.Redis.from_url(
        _CELERY_CERT_REQS.sub(lambda match: match[1] + match[2].lower(), url), **options
    )


SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL_PORT = 26379
# Query options passed to the connections to the master (TLS files and checks); the
# sentinels get the same TLS options, and a password of their own if one is given.
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``,
    ``rediss+sentinel://`` for TLS; query: ``sentinel_username``, ``sentinel_password``
    (the sentinels' own AUTH, when they have one) and ``ssl_*`` options."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_auth: dict[str, str] = field(default_factory=dict)
    tls_options: dict[str, str] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a ``redis+sentinel://`` URL; ValueError saying what is wrong."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = [_host_port(part) for part in hosts.split(",") if part]
    if not sentinels:
        raise ValueError("it names no sentinel (host:port, comma-separated)")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("it names no service after the sentinels (…:26379/mymaster)")
    if db and not db.isdigit():
        raise ValueError(f"its database must be a number, not {db!r}")
    options = dict(parse_qsl(query))
    unknown = set(options) - {"sentinel_username", "sentinel_password", *_TLS_OPTIONS}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}")
    return SentinelURL(
        sentinels,
        unquote(service),
        int(db or 0),
        username,
        password,
        scheme == "rediss+sentinel",
        {
            key.removeprefix("sentinel_"): value
            for key, value in options.items()
            if key.startswith("sentinel_")
        },
        {key: value for key, value in options.items() if key in _TLS_OPTIONS},
    )


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port or _SENTINEL_PORT)


def _sentinel_client(url: SentinelURL, options: dict[str, Any]) -> redis.Redis:
    tls: dict[str, Any] = {"ssl": True, **url.tls_options} if url.tls else {}
    sentinel = Sentinel(
        url.sentinels,
        sentinel_kwargs={
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": options["socket_timeout"],
            **url.sentinel_auth,
            **tls,
        },
        **options,
    )
    client: redis.Redis = sentinel.master_for(
        url.service, db=url.db, username=url.username, password=url.password, **tls
    )
    return client


def run_script(text: str, keys: Sequence[str], args: Iterable[Any]) -> Any:
    """Run a Lua script by its SHA (EVALSHA), loading it once per server."""
    client = get_redis()
    return _script(client, text)(keys=keys, args=list(args), client=client)


class NotReplicated(redis.ConnectionError):
    """A write reached the master, but not ``REDIS_WAIT_REPLICAS`` replicas within
    ``REDIS_WAIT_TIMEOUT``: a failover now could lose it, so it counts as not done (the
    caller keeps the event in the outbox, or answers 503 for the publisher to retry)."""


def run_scripts(
    calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]],
    before: Callable[[Pipeline], object] = lambda pipe: None,
    *,
    replicated: bool = False,
) -> list[Any]:
    """Run several Lua scripts (text, keys, args) in one round trip, after the commands
    that ``before`` adds to the pipeline; the scripts' results, in order.

    A pipeline, not a transaction. A script the server has not loaded (after a restart)
    is loaded and the calls that met it run again: redis-py's own pipelined scripts would
    ask the server which it has on every call, a second round trip. ``replicated``: then,
    on the same connection, WAIT for ``REDIS_WAIT_REPLICAS`` replicas to hold the writes
    (raises NotReplicated when fewer did in time).
    """
    client = get_redis()
    replicas = conf.REDIS_WAIT_REPLICAS if replicated else 0
    results: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    first = True
    while True:
        with client.pipeline(transaction=False) as pipe:
            if first:  # not again with the calls that met NoScriptError
                before(pipe)
                first = False
            skipped = len(pipe)
            for i in pending:
                text, keys, args = calls[i]
                pipe.evalsha(_script(client, text).sha, len(keys), *keys, *args)
            if replicas:
                pipe.wait(replicas, int(conf.REDIS_WAIT_TIMEOUT * 1000))
            replies = pipe.execute(raise_on_error=False)[skipped:]
        for i, reply in zip(pending, replies, strict=False):
            if isinstance(reply, Exception) and not isinstance(reply, NoScriptError):
                raise reply
            results[i] = reply
        missing = [i for i in pending if isinstance(results[i], NoScriptError)]
        if not missing:
            break
        for i in missing:  # nothing ran of a call that met NoScriptError: it runs again
            client.script_load(calls[i][0])
        pending = missing
    if replicas:
        acknowledged = replies[-1]
        if isinstance(acknowledged, Exception):
            raise acknowledged
        if int(acknowledged) < replicas:
            raise NotReplicated(
                f"{acknowledged} of {replicas} replicas acknowledged the write within "
                f"{conf.REDIS_WAIT_TIMEOUT:g}s (REDIS_WAIT_REPLICAS)"
            )
    return results


def _script(client: redis.Redis, text: str) -> Script:
    script = _scripts.get(text)
    if script is None:
        script = _scripts[text] = client.register_script(text)
    return script


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write because it is over its maxmemory
    (``noeviction``): raised as OutOfMemoryError, or inside a script's error on 6.2."""
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "command not allowed when used memory" in str(exc)
    )


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
