"""toot's Redis connection, and the Lua scripts run on it.

Every module that touches Redis goes through ``get_redis()`` and ``run_script()``: one
client per URL and timeout (or the project's own, ``REDIS_CONNECTION``), scripts run by
their SHA.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

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
    return redis.Redis.from_url(
        _CELERY_CERT_REQS.sub(lambda match: match[1] + match[2].lower(), url),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        # No retry of a command whose reply was lost: a claim run twice would drop the
        # batch the first run took. redis-py's Redis() has retried by default since 6.0.
        retry=Retry(NoBackoff(), 0),
    )


def run_script(text: str, keys: Sequence[str], args: Iterable[Any]) -> Any:
    """Run a Lua script by its SHA (EVALSHA), loading it once per server."""
    client = get_redis()
    return _script(client, text)(keys=keys, args=list(args), client=client)


def run_scripts(
    calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]],
    before: Callable[[Pipeline], object] = lambda pipe: None,
) -> list[Any]:
    """Run several Lua scripts (text, keys, args) in one round trip, after the commands
    that ``before`` adds to the pipeline; the scripts' results, in order.

    A pipeline, not a transaction. A script the server has not loaded (after a restart)
    runs again through ``run_script``, which loads it: redis-py's own pipelined scripts
    would ask the server which it has on every call, a second round trip.
    """
    client = get_redis()
    with client.pipeline(transaction=False) as pipe:
        before(pipe)
        skipped = len(pipe)
        for text, keys, args in calls:
            pipe.evalsha(_script(client, text).sha, len(keys), *keys, *args)
        results = pipe.execute(raise_on_error=False)[skipped:]
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, NoScriptError):
            raise result
    return [
        run_script(*call) if isinstance(result, NoScriptError) else result
        for call, result in zip(calls, results, strict=True)
    ]


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
