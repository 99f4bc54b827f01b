"""toot's Redis connection, and the Lua scripts run on it.

Every module that touches Redis goes through ``get_redis()`` and ``run_script()``: one
client per URL and timeout (or the project's own, ``REDIS_CONNECTION``), scripts run by
their SHA. A ``redis+sentinel://`` URL names a master that Redis Sentinel fails over: the
client asks the sentinels where it is, and asks again once it stops answering. A
``redis+cluster://`` URL names nodes of a Redis Cluster: the client learns from them which
master serves which hash slot, and every script's keys share one slot (``slot()``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
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


def new_client(url: str, timeout: float, **extra: Any) -> redis.Redis:
    """The client toot builds from REDIS_URL and REDIS_TIMEOUT (``extra``: more options of
    redis-py's, for a tool that reads toot's keys)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": 30,
        # No retry of a command whose reply was lost: a claim run twice would drop the
        # batch the first run took. redis-py's Redis() has retried by default since 6.0.
        "retry": Retry(NoBackoff(), 0),
        **extra,
    }
    if url.startswith(SENTINEL_SCHEMES):
        return _sentinel_client(parse_sentinel_url(url), options)
    if url.startswith(CLUSTER_SCHEMES):
        return _cluster_client(parse_cluster_url(url), options)
    return redis.Redis.from_url(
        _CELERY_CERT_REQS.sub(lambda match: match[1] + match[2].lower(), url), **options
    )


SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
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


@dataclass(frozen=True)
class ClusterURL:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``, ``rediss+cluster://``
    for TLS; query: ``ssl_*`` options. The nodes are where the client starts: it learns
    the others from them."""

    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ManyHostsURL:
    scheme: str
    hosts: list[tuple[str, int]]
    path: str
    username: str | None
    password: str | None
    options: dict[str, str]


def _parse_many_hosts(url: str, default_port: int, options: Iterable[str]) -> _ManyHostsURL:
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    found = dict(parse_qsl(query))
    unknown = set(found) - {*options, *_TLS_OPTIONS}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}")
    return _ManyHostsURL(
        scheme,
        [_host_port(part, default_port) for part in hosts.split(",") if part],
        path.strip("/"),
        username,
        password,
        found,
    )


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a ``redis+sentinel://`` URL; ValueError saying what is wrong."""
    parts = _parse_many_hosts(url, _SENTINEL_PORT, ("sentinel_username", "sentinel_password"))
    if not parts.hosts:
        raise ValueError("it names no sentinel (host:port, comma-separated)")
    service, _, db = parts.path.partition("/")
    if not service:
        raise ValueError("it names no service after the sentinels (…:26379/mymaster)")
    if db and not db.isdigit():
        raise ValueError(f"its database must be a number, not {db!r}")
    return SentinelURL(
        parts.hosts,
        unquote(service),
        int(db or 0),
        parts.username,
        parts.password,
        parts.scheme == "rediss+sentinel",
        {
            key.removeprefix("sentinel_"): value
            for key, value in parts.options.items()
            if key.startswith("sentinel_")
        },
        {key: value for key, value in parts.options.items() if key in _TLS_OPTIONS},
    )


def parse_cluster_url(url: str) -> ClusterURL:
    """The parts of a ``redis+cluster://`` URL; ValueError saying what is wrong."""
    parts = _parse_many_hosts(url, _REDIS_PORT, ())
    if not parts.hosts:
        raise ValueError("it names no node (host:port, comma-separated)")
    if parts.path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {parts.path!r}")
    return ClusterURL(
        parts.hosts, parts.username, parts.password, parts.scheme == "rediss+cluster", parts.options
    )


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port or default_port)


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


def _cluster_client(url: ClusterURL, options: dict[str, Any]) -> redis.Redis:
    tls: dict[str, Any] = {"ssl": True, **url.tls_options} if url.tls else {}
    if int(redis.__version__.split(".")[0]) < 6:  # before 6.0, `retry` left these at 3
        options = {**options, "cluster_error_retry_attempts": 0}
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],  # type: ignore[no-untyped-call]
        username=url.username,
        password=url.password,
        # A MOVED or ASK reply is followed (the command did not run); a command whose
        # reply was lost is not run again, as on one Redis. The slots are read again on
        # the next command.
        require_full_coverage=False,
        **tls,
        **options,
    )
    # The commands toot uses are RedisCluster's too, routed by their keys' slot.
    return cast(redis.Redis, client)


def slot(name: str) -> str:
    """A hash tag that puts a key in the Redis Cluster slot of this project's ``name``.

    Every key a script touches carries the same tag, as a cluster runs a script on the
    one master that holds its keys' slot; the project's prefix inside the tag spreads two
    projects' queues of the same name over different slots.
    """
    return f"{{{conf.KEY_PREFIX}{name}}}"


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
