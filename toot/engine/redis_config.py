"""What toot needs of its Redis server, read from the server itself.

toot's queues, pending retries, subscriptions and handler marks live only in Redis. A
Redis that evicts keys when it is full, or that persists nothing, loses them without an
error to anyone: ``publish()`` has returned, and no log line says what went. So the deploy
system checks (``toot.checks.check_redis``, run by ``manage.py check --deploy``) and a
warning as each Celery worker starts (``on_worker_ready``) report what ``inspect()`` finds.
Neither runs at import or in ``ready()``: both talk to Redis.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from toot.engine import isolation
from toot.engine.connection import as_text, get_redis
from toot.exceptions import ConfigError, NotIsolated

logger = logging.getLogger(__name__)

# The lowest Redis toot runs on: drains wait for work with BLMOVE, and the lanes' scripts
# make a URL due sooner with ZADD ... LT, both new in 6.2. (Nothing toot sends needs 7.0:
# no LMPOP, no script flags, no multi-pattern CONFIG GET.)
MIN_VERSION = (6, 2)
NEEDS = "BLMOVE, ZADD ... LT"
DOCS = 'See "Redis for toot" in toot\'s docs.'
# The ids of what inspect() reports (the system checks' ids, also in the worker's log).
EVICTS = "toot.W010"
NO_PERSISTENCE = "toot.W011"
UNCHECKED = "toot.W012"
UNREADABLE = "toot.W013"
SHARED_BROKER = "toot.W014"
TOO_OLD = "toot.E009"


@dataclass(frozen=True)
class Finding:
    """Something wrong with toot's Redis: the check id, what is wrong, and the fix."""

    id: str
    message: str
    hint: str

    @property
    def is_error(self) -> bool:
        return self.id.startswith("toot.E")


@dataclass
class ServerState:
    """What toot's Redis says of itself; None where it would not say."""

    version: str | None = None
    policy: str | None = None
    maxmemory: int | None = None
    aof: bool | None = None  # the append-only file is on
    rdb: bool | None = None  # RDB snapshots are scheduled ("save")
    refused: tuple[str, ...] = ()  # why something could not be read


def read(client: redis.Redis) -> ServerState:
    """Read INFO and CONFIG GET; a command the server refuses (CONFIG is often renamed or
    forbidden on a managed Redis) leaves its values None. Redis being unreachable raises.

    Every command works on 6.2: one CONFIG GET per parameter, since several in one call
    came with 7.0.
    """
    refused: dict[str, str] = {}  # the first refusal of each command
    info: dict[str, Any] = {}
    for section in ("server", "memory", "persistence"):
        try:
            info.update(client.info(section))
        except redis.ResponseError as exc:  # a renamed or forbidden INFO
            refused.setdefault("INFO", f"INFO {section}: {exc}")
    config: dict[str, str] = {}
    for parameter in ("maxmemory-policy", "maxmemory", "save", "appendonly"):
        try:
            reply = client.config_get(parameter)
        except redis.ResponseError as exc:
            refused.setdefault("CONFIG", f"CONFIG GET {parameter}: {exc}")
        else:
            config.update({as_text(key): as_text(value) for key, value in reply.items()})
    policy = config.get("maxmemory-policy", info.get("maxmemory_policy"))
    maxmemory = config.get("maxmemory", info.get("maxmemory"))
    aof: bool | None = None
    if "aof_enabled" in info:
        aof = bool(int(info["aof_enabled"]))
    elif "appendonly" in config:
        aof = config["appendonly"] == "yes"
    return ServerState(
        version=None if "redis_version" not in info else str(info["redis_version"]),
        policy=None if policy is None else str(policy),
        maxmemory=None if maxmemory is None else int(maxmemory),
        aof=aof,
        rdb=None if "save" not in config else bool(config["save"].strip()),
        refused=tuple(refused.values()),
    )


def inspect(broker_url: str | None = None) -> list[Finding]:
    """What is wrong with toot's Redis, for toot; empty for a Redis that keeps what toot
    gives it. ``broker_url`` is Celery's, to tell whether it shares that Redis."""
    where = isolation.where("Redis")
    try:
        client = get_redis()
        states = [(name, read(server)) for name, server in _servers(client, where)]
    except (redis.RedisError, OSError, ValueError, NotIsolated) as exc:
        return [
            Finding(
                UNCHECKED,
                f"toot's Redis ({where}) could not be checked: {exc}",
                "Make sure Redis answers from here at REDIS_URL (or REDIS_CONNECTION): "
                "toot's queues live there. Until it does, toot cannot check its eviction "
                "policy, persistence and version.",
            )
        ]
    findings = []
    for name, state in states:
        findings += _version(name, state) + _eviction(name, state) + _persistence(name, state)
        findings += _unreadable(name, state)
    [(_, state), *others] = states
    if broker_url and not others and state.maxmemory and _same_server(broker_url, client):
        findings.append(
            Finding(
                SHARED_BROKER,
                f"Celery's broker is toot's Redis ({where}), which has a maxmemory: once "
                "toot's queues fill it, the broker's writes fail too and each worker "
                "exits (Unrecoverable error: OutOfMemoryError), and nothing moves until "
                "someone makes room.",
                "Give Celery's broker a Redis of its own without a maxmemory (or a "
                "RabbitMQ), so that workers keep delivering, and emptying toot's queues, "
                f"when toot's Redis is full. {DOCS}",
            )
        )
    return findings


def _servers(client: redis.Redis, where: str) -> list[tuple[str, redis.Redis]]:
    """The servers behind ``client``, named: the one, or each master of a Redis Cluster
    (every one holds a share of toot's keys)."""
    if not isinstance(client, RedisCluster):
        return [(where, client)]
    return [
        (f"{where}, master {node.name}", client.get_redis_connection(node))
        for node in client.get_primaries()
    ]


def _version(where: str, state: ServerState) -> list[Finding]:
    if state.version is None or _version_tuple(state.version) >= MIN_VERSION:
        return []
    needed = ".".join(map(str, MIN_VERSION))
    return [
        Finding(
            TOO_OLD,
            f"toot's Redis ({where}) is Redis {state.version}; toot needs {needed} or "
            f"newer ({NEEDS}), and its drains fail on this one.",
            f"Upgrade Redis to {needed} or newer.",
        )
    ]


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _eviction(where: str, state: ServerState) -> list[Finding]:
    if state.policy is None or state.policy == "noeviction":
        return []
    if state.policy.startswith("volatile-"):
        lost = (
            "it evicts keys that have an expiry: among them the marks that keep a handler "
            "from running twice for one event, and the claims of running handlers"
        )
    else:
        lost = (
            "it evicts keys to make room: toot's queued events, pending retries and "
            "subscriptions among them, while publish() returns as if all were well"
        )
    if state.maxmemory:
        limit = f"its maxmemory ({_size(state.maxmemory)})"
    else:
        limit = "a maxmemory" + (" (none is set now)" if state.maxmemory == 0 else "")
    return [
        Finding(
            EVICTS,
            f"toot's Redis ({where}) has maxmemory-policy {state.policy}: once it reaches "
            f"{limit}, {lost}.",
            'Set "maxmemory-policy noeviction" in its redis.conf (and CONFIG SET '
            "maxmemory-policy noeviction to change it now; on a managed Redis, in its "
            "parameter group): a full Redis then refuses writes, publish() keeps events in "
            "the database outbox and the callbacks endpoint answers 503, until there is "
            f"room again. {DOCS}",
        )
    ]


def _persistence(where: str, state: ServerState) -> list[Finding]:
    if not (state.aof is False and state.rdb is False):
        return []  # it persists, or would not say (_unreadable reports it)
    return [
        Finding(
            NO_PERSISTENCE,
            f'toot\'s Redis ({where}) persists nothing (appendonly no, save ""): a restart '
            "loses every subscription, queued event and pending retry it holds.",
            'Turn on the append-only file ("appendonly yes" with "appendfsync everysec", '
            "which loses about a second of writes in a crash), or at least RDB snapshots "
            f'("save 60 1000", which lose what came since the last one). {DOCS}',
        )
    ]


def _unreadable(where: str, state: ServerState) -> list[Finding]:
    unknown = []
    if state.version is None:
        unknown.append("its version")
    if state.policy is None:
        unknown.append("its maxmemory-policy")
    if not (state.aof or state.rdb) and None in (state.aof, state.rdb):
        unknown.append("whether it persists")
    if not unknown:
        return []
    return [
        Finding(
            UNREADABLE,
            f"toot's Redis ({where}) would not say {_listed(unknown)}, so toot could not "
            f"check {'them' if len(unknown) > 1 else 'it'} ({'; '.join(state.refused)}).",
            "Allow toot's Redis user INFO and CONFIG GET, or check by hand (on a managed "
            "Redis, in its provider's settings) that its maxmemory-policy is noeviction, "
            "that it persists and that it runs Redis 6.2 or newer; then add "
            f'"{UNREADABLE}" to SILENCED_SYSTEM_CHECKS. {DOCS}',
        )
    ]


def _size(size: int) -> str:
    units = ((2**30, "GB"), (2**20, "MB"))
    unit, name = next(((unit, name) for unit, name in units if size >= unit), (2**10, "kB"))
    value = size / unit
    return f"{value:.3g} {name}" if value < 100 else f"{value:.0f} {name}"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _same_server(broker_url: str, client: redis.Redis) -> bool:
    """Whether a Redis broker URL names the server ``client`` talks to (any database)."""
    try:
        parts = urlsplit(broker_url)
        port = parts.port
    except ValueError:
        return False
    kwargs = client.connection_pool.connection_kwargs
    if parts.scheme in ("redis", "rediss"):
        return (parts.hostname or "localhost", port or 6379) == (
            kwargs.get("host"),
            int(kwargs.get("port") or 6379),
        )
    if parts.scheme in ("socket", "redis+socket", "unix"):
        return bool(parts.path) and parts.path == kwargs.get("path")
    return False


def warn(broker_url: str | None = None) -> None:
    """Log what ``inspect()`` finds, each with its fix: an error for a Redis toot cannot
    run on, a warning for the rest."""
    try:
        findings = inspect(broker_url)
    except ConfigError:
        return  # the system checks say what is wrong with the settings
    for finding in findings:
        logger.log(
            logging.ERROR if finding.is_error else logging.WARNING,
            "%s: %s %s",
            finding.id,
            finding.message,
            finding.hint,
        )


def on_worker_ready(sender: Any, **kwargs: Any) -> None:
    """Connected to Celery's ``worker_ready`` by ``toot.apps``: once per worker, in its main
    process. In a thread of its own, so that a Redis that does not answer holds up
    neither the worker's start nor its other tasks."""
    broker_url = sender.app.conf.broker_url
    if not isinstance(broker_url, str):
        broker_url = None  # a list of failover URLs, or none: Celery's default, amqp
    threading.Thread(target=warn, args=(broker_url,), name="toot-redis-check", daemon=True).start()
